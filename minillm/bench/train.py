"""Training step speed of the GPT: ms per step and tokens/s, side by side with the same model in PyTorch.

One step = forward, loss, the whole backward, and an AdamW update, on a batch of
random token ids (the data pipeline is not timed). The PyTorch reference is the
same architecture written with torch ops (eager mode: explicit attention
matmuls, as minillm does; plus F.scaled_dot_product_attention as a second
column), and Hugging Face's GPT2LMHeadModel (its default SDPA attention) when
transformers is installed, each loaded with the *same* weights, and each loss is
checked against ours before anything is timed, so all sides provably compute the
same thing. On several threads minillm cuts the batch into one shard of rows per
thread (gpt.loss_and_grads_in_shards); the row "minillm, batch whole" is the same
step with the batch in one piece, every pass and matmul split across the threads
instead, to show what the shards are worth.

Runs alternate (minillm step, torch step, minillm step, ...) so that both meet the
same machine load; the table shows the median and the best of --repeat steps.
On a shared machine compare the CPU seconds too: wall time includes waiting for
a core. NumPy's BLAS threads are set by OPENBLAS_NUM_THREADS / OMP_NUM_THREADS
before Python starts; torch is given the same count.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from minillm import backend
from minillm.bench._util import print_table


def add_arguments(parser):
    parser.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
    parser.add_argument("--n-embd", type=int, default=192, help="model width C")
    parser.add_argument("--n-head", type=int, default=6, help="attention heads")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--vocab-size", type=int, default=65, help="vocabulary (65: Shakespeare's characters)")
    parser.add_argument("--repeat", type=int, default=10, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", choices=["cpu", "gpu"], default=None,
                        help="minillm's device (default: $MINILLM_DEVICE); torch runs on the CPU or CUDA to match")
    parser.add_argument("--skip-reference", action="store_true", help="do not time PyTorch")
    parser.add_argument("--threads", default=None,
                        help="comma-separated thread counts to measure, e.g. 1,2: NumPy's BLAS "
                             "(backend.set_blas_threads), minillm's own CPU threads "
                             "(backend.set_num_threads) and torch.set_num_threads (default: as started)")
    parser.add_argument("--gap-ms", type=float, default=50.0,
                        help="idle milliseconds before each timed step, so that threads the previous "
                             "implementation left spinning (torch's OpenMP pool, BLAS workers) do not eat "
                             "into the next one's time (default: 50)")
    parser.add_argument("--profile", action="store_true",
                        help="also print a cProfile of minillm's step (the hot spots, by own time)")


def _limit_threads(n):
    """A context that runs NumPy's BLAS with n threads, or None if its thread count cannot be set."""
    return backend.blas_threads_held(n) if backend.blas_threads() is not None else None


def _blas_threads():
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var):
            return int(os.environ[var]), var
    return os.cpu_count() or 1, "default: one per core"


def _torch_model(torch, cfg, params, device):
    """The same GPT in torch ops, holding copies of ``params`` (float32)."""
    F = torch.nn.functional
    P = torch.nn.ParameterDict({k.replace(".", "__"): torch.nn.Parameter(torch.tensor(np.asarray(v),
                                                                                       device=device))
                                for k, v in params.items()})
    H, D = cfg.n_head, cfg.head_dim

    def forward(idx, fused):
        B, T = idx.shape
        x = P["wte"][idx] + P["wpe"][:T]
        mask = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
        for i in range(cfg.n_layer):
            g = lambda n: P[f"h__{i}__{n}"]  # noqa: E731
            h = F.layer_norm(x, (cfg.n_embd,), g("ln_1__weight"), g("ln_1__bias"), cfg.eps)
            q, k, v = (h @ g("attn__w_qkv") + g("attn__b_qkv")).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
            if fused:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                s = (q @ k.transpose(-1, -2)) / D ** 0.5
                a = s.masked_fill(~mask, float("-inf")).softmax(-1) @ v
            x = x + a.transpose(1, 2).reshape(B, T, H * D) @ g("attn__w_o") + g("attn__b_o")
            h = F.layer_norm(x, (cfg.n_embd,), g("ln_2__weight"), g("ln_2__bias"), cfg.eps)
            x = x + F.gelu(h @ g("mlp__w1") + g("mlp__b1"), approximate="tanh") @ g("mlp__w2") + g("mlp__b2")
        x = F.layer_norm(x, (cfg.n_embd,), P["ln_f__weight"], P["ln_f__bias"], cfg.eps)
        return x @ P["wte"].T

    return P, forward


def run(args):
    """Build the model and one batch, the minillm step, the torch steps (same weights, loss
    checked equal first), then time them at each thread count; optionally profile ours."""
    from minillm import backend, gpt

    device = backend.device_name(args.device)
    xp = backend.xp_for(device)
    cfg = gpt.GPTConfig(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                        n_head=args.n_head, n_embd=args.n_embd)
    params = gpt.init_params(cfg, seed=0, device=device)
    rng = np.random.default_rng(0)
    B, T = args.batch_size, args.block_size
    batch_np = rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))
    threads, how = _blas_threads()
    print(f"GPT {cfg.n_layer} layers x {cfg.n_embd}, {cfg.n_head} heads, vocab {cfg.vocab_size}: "
          f"{gpt.num_params(params):,} parameters; batch {B} x {T} = {B * T:,} tokens; float32; "
          f"device {device}; BLAS threads {threads} ({how})")
    ours = _minillm_step(cfg, params, [xp.asarray(a) for a in batch_np])
    impls = [("minillm (numpy)" if xp is np else "minillm (cupy)", ours)]
    torch = None if args.skip_reference else _import_torch()
    tdev = "cuda" if device == "gpu" else "cpu"
    if torch is not None:
        if tdev == "cpu":
            torch.set_num_threads(threads)
        impls += _torch_steps(torch, cfg, params, batch_np, tdev)
        impls += _hf_step(torch, cfg, params, batch_np, tdev)
    if xp is np:     # what cutting the batch into shards is worth: the same step with the batch whole
        impls.append((_WHOLE, _minillm_step(cfg, params, [xp.asarray(a) for a in batch_np], whole=True)))
    counts = [int(t) for t in args.threads.split(",")] if args.threads else [threads]
    for n_threads in counts:
        _time_at_threads(impls, args, n_threads, threads, B * T, torch if tdev == "cpu" else None,
                         torch is not None)
    if args.profile:
        _profile(ours, max(1, args.repeat // 2))
    return 0


def _minillm_step(cfg, params, batch, whole=False):
    """One step of ours: loss, the whole backward and an AdamW update, synchronised. whole: the
    batch in one piece on every thread count (no shards: each pass and matmul split instead)."""
    from minillm import backend, gpt
    from minillm.optim import AdamW
    idx, tgt = batch
    opt = AdamW(params, lr=1e-4, weight_decay=0.1)

    def step():
        if whole:
            loss, grads = gpt.loss_and_grads_in_shards(params, cfg, idx, tgt, 1)
        else:
            loss, grads = gpt.loss_and_grads(params, cfg, idx, tgt)
        opt.step(grads)
        backend.synchronize(params["wte"])
        return loss
    return step


_WHOLE = "minillm, batch whole"     # timed only on several threads (on one it is the same step)


def _import_torch():
    try:
        import torch
        return torch
    except ImportError:
        print("torch is not installed: the PyTorch reference is skipped")
        return None


def _torch_steps(torch, cfg, params, batch_np, tdev):
    """[(name, step)] for torch eager and fused SDPA, after checking that torch's loss on the
    same weights and batch equals ours (so both provably compute the same thing)."""
    from minillm import backend, gpt
    P, tforward = _torch_model(torch, cfg, {k: backend.to_numpy(v) for k, v in params.items()}, tdev)
    topt = torch.optim.AdamW(P.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
    tidx, ttgt = (torch.tensor(a, device=tdev) for a in batch_np)

    def ref(fused):
        def step():
            topt.zero_grad(set_to_none=True)
            logits = tforward(tidx, fused)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), ttgt.reshape(-1))
            loss.backward()
            topt.step()
            if tdev == "cuda":
                torch.cuda.synchronize()
            return loss.item()
        return step

    with torch.no_grad():
        tl = torch.nn.functional.cross_entropy(tforward(tidx, False).reshape(-1, cfg.vocab_size),
                                               ttgt.reshape(-1)).item()
    xp = backend.array_module(params["wte"])
    ml = gpt.loss(params, cfg, *(xp.asarray(a) for a in batch_np))
    print(f"check: loss before training, minillm {ml:.6f} vs torch {tl:.6f} (|diff| {abs(ml - tl):.1e})")
    return [(f"torch {torch.__version__} eager", ref(False)), ("torch, fused SDPA", ref(True))]


def _hf_step(torch, cfg, params, batch_np, tdev):
    """[(name, step)] for Hugging Face's GPT2LMHeadModel (its default attention: SDPA) holding
    the same weights, after checking its loss equals ours; [] without transformers."""
    from minillm import checkpoint, gpt
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except Exception as e:  # not installed, or a broken install: a benchmark degrades, it does not fail
        print(f"(Hugging Face GPT-2 skipped: {type(e).__name__}: {e})")
        return []
    hf_cfg = GPT2Config(**checkpoint._gpt2_config_to_hf(cfg))
    model = GPT2LMHeadModel(hf_cfg).to(tdev).train()
    state = {k: torch.tensor(backend.to_numpy(v)) for k, v in checkpoint.hf_state_dict(cfg, params).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):   # lm_head is tied to wte
        raise RuntimeError(f"GPT-2 weights did not load: missing {missing}, unexpected {unexpected}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
    tidx, ttgt = (torch.tensor(a, device=tdev) for a in batch_np)

    def loss_of():
        logits = model(input_ids=tidx).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), ttgt.reshape(-1))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_of()
        loss.backward()
        opt.step()
        if tdev == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    with torch.no_grad():
        hl = loss_of().item()
    xp = backend.array_module(params["wte"])
    ml = float(gpt.loss(params, cfg, *(xp.asarray(a) for a in batch_np)))
    if abs(hl - ml) > 1e-4 * max(1.0, abs(ml)):
        raise RuntimeError(f"Hugging Face GPT-2's loss {hl:.6f} differs from minillm's {ml:.6f}")
    print(f"check: loss before training, minillm {ml:.6f} vs Hugging Face GPT-2 "
          f"({model.config._attn_implementation} attention) {hl:.6f}")
    return [(f"transformers GPT-2 ({model.config._attn_implementation})", step)]


def _time_at_threads(impls, args, n_threads, threads, tokens, cpu_torch, with_reference):
    """Time every step with n_threads BLAS threads, minillm threads and torch threads."""
    import contextlib
    limiter = _limit_threads(n_threads) if args.threads else None
    if args.threads and limiter is None:
        print(f"NumPy's BLAS is not OpenBLAS: it keeps {threads} thread(s); set "
              f"OPENBLAS_NUM_THREADS={n_threads} before starting to change it")
    if cpu_torch is not None:
        cpu_torch.set_num_threads(n_threads)
    own = backend.num_threads()
    if args.threads:
        backend.set_num_threads(n_threads)      # minillm's own threads (backend.parallel_for) too
    shards = backend.batch_shards(tokens // args.block_size)
    label = f"{n_threads} thread(s)" + (f"; minillm cuts the batch into {shards} shards, one per thread, "
                                        f"each with its matmuls on one BLAS thread" if shards > 1 else "")
    if n_threads == 1:
        impls = [(name, fn) for name, fn in impls if name != _WHOLE]
    try:
        with limiter or contextlib.nullcontext():
            _time_all(impls, args, tokens, label, with_reference)
    finally:
        backend.set_num_threads(own)


def _profile(step, n):
    import cProfile
    import pstats
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        step()
    pr.disable()
    print("\ncProfile of minillm's step (own time):")
    pstats.Stats(pr).sort_stats("tottime").print_stats(15)


def _time_all(impls, args, tokens, label, with_reference):
    for _ in range(args.warmup):
        for _, fn in impls:
            fn()
    wall = {name: [] for name, _ in impls}
    cpu = {name: [] for name, _ in impls}
    for _ in range(args.repeat):
        for name, fn in impls:     # interleaved: every implementation meets the same load
            time.sleep(args.gap_ms / 1000)    # the last step's idle threads (OpenMP's spin) go to sleep
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    base = statistics.median(wall[impls[0][0]])
    rows = []
    for name, _ in impls:
        med, best = statistics.median(wall[name]), min(wall[name])
        rows.append([name, f"{med * 1e3:.1f}", f"{best * 1e3:.1f}", f"{statistics.median(cpu[name]) * 1e3:.0f}",
                     f"{tokens / med:,.0f}", f"{base / med:.2f}"])
    print(f"\n{label}:")
    print_table(rows, ["implementation", "ms/step (median)", "ms/step (best)", "CPU ms/step",
                       "tokens/s", "minillm time / this"])
    if with_reference:
        ratio = base / statistics.median(wall[impls[1][0]])
        print(f"minillm's step takes {ratio:.2f}x PyTorch eager's (median wall time; "
              f"goal <= 1.5x, then <= 1.0x)")
