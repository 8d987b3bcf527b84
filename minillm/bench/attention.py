"""attention: plain vs tiled (FlashAttention-style) attention, time and peak memory as T grows.

For each sequence length T this times the forward and forward+backward of
``sdpa_forward`` (which keeps the B*H*T*T probabilities) and of
``flash_attention_forward`` (which keeps one block x block tile per head and a
logsumexp per row), measures the peak memory each needs on top of its inputs, and
times PyTorch's ``scaled_dot_product_attention`` beside them when torch is
installed (CPU, or CUDA when the run is on the GPU and torch sees one).

Peak memory: on NumPy with tracemalloc (NumPy reports its buffers to it); on CuPy
from the default memory pool (emptied first, so what it holds afterwards is the
peak of what the call needed at once).

On a shared machine with more busy processes than cores, a multithreaded BLAS can
make CPU timings erratic (threads wait for each other); OPENBLAS_NUM_THREADS=1
(or OMP_NUM_THREADS=1) before the command gives steadier numbers.
"""

from __future__ import annotations

import gc
import os
import tracemalloc

import numpy as np

from minillm import attention as A
from minillm.backend import device_name, randn, synchronize, xp_for
from minillm.bench._util import print_table, time_call


def add_arguments(parser):
    parser.add_argument("--device", choices=["cpu", "gpu"], default=None,
                        help="where to run: cpu (NumPy) or gpu (CuPy) (default: MINILLM_DEVICE, else cpu)")
    parser.add_argument("--sizes", default="256,512,1024,2048",
                        help="comma-separated sequence lengths T, queries = keys = T (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="batch size B (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=8, help="query heads H (default: %(default)s)")
    parser.add_argument("--kv-heads", type=int, default=None,
                        help="key/value heads Hkv (GQA; 1 = MQA) (default: --heads, i.e. plain multi-head)")
    parser.add_argument("--dim", type=int, default=64, help="head size D (default: %(default)s)")
    parser.add_argument("--block-size", type=int, default=64, help="tile size of the tiled version (default: %(default)s)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="data type")
    parser.add_argument("--no-causal", action="store_true", help="bidirectional attention (default: causal)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions, the best is reported (default: %(default)s)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference timing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random q, k, v")


def _peak_bytes(fn, xp):
    """Peak bytes allocated while fn() runs, beyond what was allocated before it."""
    gc.collect()
    if xp is np:
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            fn()
            return tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
    pool = xp.get_default_memory_pool()
    synchronize()
    pool.free_all_blocks()
    base = pool.used_bytes()          # the inputs, still alive
    fn()
    synchronize()
    peak = pool.total_bytes() - base  # blocks the pool had to obtain for this call
    pool.free_all_blocks()
    return peak


def _torch_timer(q, k, v, causal, repeat, on_gpu):
    """A fwd+bwd timer for torch's SDPA, or None when torch (or its CUDA) is unavailable."""
    try:
        import torch
    except Exception:
        return None
    if on_gpu and not torch.cuda.is_available():
        return None
    dev = "cuda" if on_gpu else "cpu"
    # The same thread budget as NumPy's BLAS when one was set, for a like-for-like comparison.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(var, "").isdigit() and int(os.environ[var]) > 0:
            torch.set_num_threads(int(os.environ[var]))
            break
    from minillm.backend import to_numpy
    tq, tk, tv = (torch.tensor(to_numpy(a), device=dev, requires_grad=True) for a in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    F = torch.nn.functional

    def step():
        o = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal, enable_gqa=gqa)
        o.backward(torch.ones_like(o))
        if on_gpu:
            torch.cuda.synchronize()

    try:
        return time_call(step, repeat=repeat)
    except Exception as e:  # an old torch without enable_gqa, out of memory, ...
        print(f"  (torch skipped: {type(e).__name__}: {e})")
        return None


def _fmt_ms(t):
    return "-" if t is None else f"{t * 1e3:.1f}"


def run(args):
    xp = xp_for(args.device)
    dev = device_name(args.device)
    try:
        sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    except ValueError:
        print(f"--sizes: expected comma-separated integers, got {args.sizes!r}")
        return 2
    if not sizes or min(sizes) < 1:
        print(f"--sizes: expected positive integers, got {args.sizes!r}")
        return 2
    B, H, D = args.batch, args.heads, args.dim
    Hkv = args.kv_heads or H
    if H % Hkv:
        print(f"--kv-heads: expected a divisor of --heads={H}, got {Hkv}")
        return 2
    causal = not args.no_causal
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(args.seed)
    print(f"attention on {dev}: B={B} H={H} Hkv={Hkv} D={D} {dtype} causal={causal} "
          f"block_size={args.block_size}, best of {args.repeat}")
    print("times in ms (fwd = forward, f+b = forward + backward); peak = extra memory of one f+b in MiB;")
    print("T x T = the size of one B*H*T*T probability matrix in MiB\n")
    rows = []
    for T in sizes:
        q = randn(rng, (B, H, T, D), dtype=dtype, device=dev)
        k = randn(rng, (B, Hkv, T, D), dtype=dtype, device=dev)
        v = randn(rng, (B, Hkv, T, D), dtype=dtype, device=dev)
        dout = randn(rng, (B, H, T, D), dtype=dtype, device=dev)

        def plain_fwd():
            return A.sdpa_forward(q, k, v, causal=causal)[0]

        def plain_fb():
            out, c = A.sdpa_forward(q, k, v, causal=causal)
            return A.sdpa_backward(dout, c)[0]

        def tiled_fwd():
            return A.flash_attention_forward(q, k, v, causal=causal, block_size=args.block_size)[0]

        def tiled_fb():
            out, c = A.flash_attention_forward(q, k, v, causal=causal, block_size=args.block_size)
            return A.flash_attention_backward(dout, c)[0]

        t_pf = time_call(plain_fwd, repeat=args.repeat)
        t_pb = time_call(plain_fb, repeat=args.repeat)
        t_tf = time_call(tiled_fwd, repeat=args.repeat)
        t_tb = time_call(tiled_fb, repeat=args.repeat)
        m_p = _peak_bytes(lambda: plain_fb() is None, xp)
        m_t = _peak_bytes(lambda: tiled_fb() is None, xp)
        t_torch = None if args.no_torch else _torch_timer(q, k, v, causal, args.repeat, xp is not np)
        mib = 2.0 ** 20
        rows.append([T, _fmt_ms(t_pf), _fmt_ms(t_tf), _fmt_ms(t_pb), _fmt_ms(t_tb), _fmt_ms(t_torch),
                     f"{t_tb / t_pb:.2f}", f"{m_p / mib:.1f}", f"{m_t / mib:.1f}", f"{m_p / max(m_t, 1):.1f}",
                     f"{B * H * T * T * dtype.itemsize / mib:.1f}"])
        del q, k, v, dout
    print_table(rows, ["T", "plain fwd", "tiled fwd", "plain f+b", "tiled f+b", "torch f+b",
                       "tiled/plain time", "plain peak", "tiled peak", "plain/tiled mem", "T x T"])
    print("\nThe plain version's peak grows like T^2 (it keeps the probabilities for the backward);")
    print("the tiled one's like T (a tile per head plus the output and one logsumexp per row).")
    return 0
