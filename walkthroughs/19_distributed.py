"""Walkthrough 19: where a training step's memory goes, and what DDP, ZeRO and activation
checkpointing do about it.

We count the bytes of one step of a small GPT (parameters, gradients, AdamW's moments,
activations) and hold the count against what tracemalloc measures; watch each ZeRO stage
divide one of those terms by the number of ranks (and reproduce the ZeRO paper's
7.5B-parameter example); see that data parallelism is gradient accumulation with the
micro-batches on different processes, summed in one flat buffer; shard the optimizer and
keep global-norm clipping exact; and trade a second forward pass for activation memory.
With mpi4py and mpiexec installed, two real ranks train and match one process exactly.
Last, the same sum across threads: the batch cut into one shard of rows per thread.

Run: python walkthroughs/19_distributed.py      (MINILLM_FAST=1 for smaller sizes)
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from _narrate import FAST, ROOT, check, step
from minillm import distributed as dist
from minillm import gpt
from minillm.optim import global_norm
from minillm.train import split_batch

C, L, T, B = (64, 2, 32, 8) if FAST else (128, 4, 64, 16)
config = gpt.GPTConfig(vocab_size=83, block_size=T, n_layer=L, n_head=4, n_embd=C)
P = sum(int(np.prod(s)) for s in gpt.param_shapes(config).values())
MB = 1e6

# ---------------------------------------------------------------------------
step(1, f"Where the memory of one step goes: a GPT of {P:,} parameters, batch {B} x {T}")
# ---------------------------------------------------------------------------
print("""In float32 each parameter costs 4 bytes, its gradient 4 more and AdamW's two
moments 8: 16 bytes a parameter before a single activation. The activations are what
the backward needs from the forward: every block's inputs, attention probabilities
(H x T numbers a token), the MLP's 4C-wide intermediates, and at the top the logits,
their softmax and dlogits (V numbers a token each). We count them from the caches'
shapes and measure a real step with tracemalloc.""")
acc = dist.memory_per_rank(config, P, B, T)
meas = dist.measure_step_peak(config, B, T)
for k in ("params", "grads", "optimizer", "activations", "workspace", "total"):
    print(f"  {k:12s} {acc[k] / MB:8.2f} MB")
ratio = meas["peak"] / acc["total"]
print(f"  measured peak {meas['peak'] / MB:.2f} MB: measured / accounted = {ratio:.3f}")
check(abs(ratio - 1) <= 0.2, f"the accounting should be within 20% of the measured peak, got ratio {ratio:.3f}")
check(abs(meas["params"] - 4 * P) <= 0.01 * 4 * P + 16e3, "parameters should take 4 bytes each")
check(acc["activations"] > acc["params"] + acc["grads"] + acc["optimizer"],
      "at this size the activations should outweigh the model states")
print("At this toy size the activations dominate; at billions of parameters the 16 bytes a\n"
      "parameter do, and that is what ZeRO attacks.")

# ---------------------------------------------------------------------------
step(2, "What each ZeRO stage removes (N = 4 ranks), and the paper's 7.5B example")
# ---------------------------------------------------------------------------
N = 4
rows = [dist.memory_per_rank(config, P, B // N, T, N, s) for s in range(4)]
print(f"  {'':8s}{'params':>9s}{'grads':>9s}{'grad_sum':>10s}{'optim':>9s}{'total':>9s}   MB per rank")
for s, r in enumerate(rows):
    print(f"  stage {s} {r['params'] / MB:9.2f}{r['grads'] / MB:9.2f}{r['grad_sum'] / MB:10.2f}"
          f"{r['optimizer'] / MB:9.2f}{r['total'] / MB:9.2f}")
check(rows[0]["optimizer"] - rows[1]["optimizer"] == 8 * P * (1 - 1 / N),
      "stage 1 should remove (1 - 1/N) of AdamW's 8 bytes a parameter")
check(rows[1]["grad_sum"] - rows[2]["grad_sum"] == 8 * P * (1 - 1 / N),
      "stage 2 should remove (1 - 1/N) of the float64 gradient sum")
check(rows[2]["params"] - rows[3]["params"] == 4 * P * (1 - 1 / N), "stage 3 should shard the parameters")
paper = [dist.zero_model_states(7_500_000_000, 64, s)["total"] / 1e9 for s in range(4)]
print("ZeRO paper, 7.5B parameters, 64 GPUs, mixed precision (2 + 2 + 12 bytes a parameter): "
      + " -> ".join(f"{g:.1f} GB" for g in paper))
check([round(g, 1) for g in paper] == [120.0, 31.4, 16.6, 1.9], f"the paper's numbers, got {paper}")

# ---------------------------------------------------------------------------
step(3, "Data parallelism is gradient accumulation, spread over processes")
# ---------------------------------------------------------------------------
print("""Each rank computes the gradient of its part of the global batch; an all-reduce
sums them, in one flat buffer (float64 here, so the sum's order barely matters; with
two ranks a + b == b + a exactly). We play two ranks in one process: each one's
micro-batch gradient, flattened, summed and divided by 2, against the reducer that
accumulates two micro-batches in one process, and against the whole batch at once.""")
params = gpt.init_params(config, seed=0)
r = np.random.default_rng(0)
x, y = r.integers(0, 83, (B, T)), r.integers(0, 83, (B, T))
halves = split_batch((x, y), 2)
per_rank = [gpt.loss_and_grads(params, config, hx, hy)[1] for hx, hy in halves]
layout = dist.shard_layout(params, 1)
buf = dist.flatten(per_rank[0], layout) + dist.flatten(per_rank[1], layout)     # the all-reduce of 2 ranks
ddp = dist.unflatten_into(buf / 2, {k: np.empty_like(v) for k, v in params.items()}, layout)
red = dist.GradReducer(params, dist.world_of_one())
red.begin()
for g in per_rank:
    red.add(g)
accum = red.finish(2)
full = gpt.loss_and_grads(params, config, x, y)[1]
exact = all(np.array_equal(ddp[k], accum[k]) for k in params)
worst = max(float(np.max(np.abs(ddp[k] - full[k])) / np.max(np.abs(full[k]))) for k in params)
print(f"  one flat buffer of {layout.total:,} numbers; 2 ranks == accumulation bit for bit: {exact}; "
      f"vs the whole batch: worst difference {worst:.1e} of an array's largest entry (float32 round-off)")
check(exact, "two ranks' sum should equal two accumulated micro-batches bit for bit")
check(worst < 1e-5, f"the whole batch's gradient should agree to round-off, got {worst:.2e}")

# ---------------------------------------------------------------------------
step(4, "ZeRO's shards, and global-norm clipping that stays exact")
# ---------------------------------------------------------------------------
print("""ZeRO gives each rank whole arrays, largest first to the least loaded rank; the rank
keeps AdamW's moments (stage 1) and the gradient sum (stage 2) of its arrays only. To clip
by the global norm, each owner sums its arrays' squares; the vector of sums is all-reduced
and added up in the parameters' order, just as one process does.""")
lay4 = dist.shard_layout(params, N)
for rank in range(N):
    print(f"  rank {rank}: {len(lay4.owned(rank))} arrays, {lay4.counts[rank]:,} numbers")
vectors = []


class PlayedWorld(dist.World):
    def allreduce_(self, buf):          # record each rank's contribution; the sum comes below
        vectors.append(buf.copy())
        return buf


for rank in range(N):
    dist.sharded_global_norm({k: full[k] for k in lay4.owned(rank)}, PlayedWorld(), lay4)
sharded = float(np.sqrt(np.sum(np.sum(vectors, axis=0))))
print(f"  sharded norm {sharded!r}, one process {global_norm(full)!r}")
check(sharded == global_norm(full), "the sharded global norm should be the unsharded one bit for bit")
check(max(lay4.counts) <= P / N + max(lay4.size.values()), "no rank should hold much more than 1/N")

# ---------------------------------------------------------------------------
step(5, "Activation checkpointing: keep each block's input, recompute the rest")
# ---------------------------------------------------------------------------
t0 = time.perf_counter()
_, g_plain = gpt.loss_and_grads(params, config, x, y)
t_plain = time.perf_counter() - t0
t0 = time.perf_counter()
_, g_ckpt = gpt.loss_and_grads(params, config, x, y, activation_checkpointing=True)
t_ckpt = time.perf_counter() - t0
m_ckpt = dist.measure_step_peak(config, B, T, activation_checkpointing=True)
print(f"  peak {meas['peak'] / MB:.2f} MB -> {m_ckpt['peak'] / MB:.2f} MB; time of a forward + backward "
      f"{t_plain * 1e3:.0f} -> {t_ckpt * 1e3:.0f} ms; the same gradients: "
      f"{all(np.array_equal(g_plain[k], g_ckpt[k]) for k in g_plain)}")
check(all(np.array_equal(g_plain[k], g_ckpt[k]) for k in g_plain), "checkpointing should not change a gradient")
check(m_ckpt["peak"] < meas["peak"], "checkpointing should lower the peak")

# ---------------------------------------------------------------------------
step(6, "Two real ranks under MPI (when mpi4py and mpiexec are installed)")
# ---------------------------------------------------------------------------
exe = shutil.which("mpiexec")
try:
    import mpi4py  # noqa: F401
except ImportError:
    exe = None
if exe is None:
    print("mpi4py or mpiexec is not installed (pip install 'minillm[distributed]'): skipping this step.")
else:
    from minillm.train import load_checkpoint
    worker = os.path.join(ROOT, "tests", "ddp_worker.py")
    env = {**os.environ, "PYTHONPATH": ROOT, "OPENBLAS_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as d:
        res = subprocess.run([exe, "-n", "2", sys.executable, worker, os.path.join(d, "ddp"), "--ddp", "--zero", "1",
                              "--steps", "3"], capture_output=True, text=True, env=env, timeout=120)
        check(res.returncode == 0, f"mpiexec -n 2 should train, got: {res.stderr[-500:]}")
        subprocess.run([sys.executable, worker, os.path.join(d, "one"), "--accum", "2", "--steps", "3"],
                       check=True, env=env, timeout=120)
        a, b = load_checkpoint(os.path.join(d, "ddp"))["params"], load_checkpoint(os.path.join(d, "one"))["params"]
        same = all(np.array_equal(a[k], b[k]) for k in a)
    print(f"  mpiexec -n 2 --ddp --zero 1 vs one process --grad-accum 2, 3 steps with dropout and clipping: "
          f"the same parameters bit for bit: {same}")
    check(same, "2 ranks with ZeRO-1 should equal one process accumulating 2 micro-batches")

# ---------------------------------------------------------------------------
step(7, "The same identity across threads: one shard of the batch per thread")
# ---------------------------------------------------------------------------
print("""Step 3's sum works inside one process too. On a CPU with several threads,
gpt.loss_and_grads cuts the batch into one shard of rows per thread. Each thread runs
the whole forward and backward of its rows, with its matmuls held at one BLAS thread
(backend.run_in_shards). Shard s starts its backward from n_s / n, its share of the
counted targets, so the shards' gradients simply add. The alternative splits every
softmax pass and every matmul across the threads, and the threads meet at the end of
each one, hundreds of times a step. Here the threads meet once, at the sum.""")
from minillm import backend  # noqa: E402

shards = max(2, backend.num_threads())
whole_loss, whole = gpt.loss_and_grads_in_shards(params, config, x, y, 1)
shard_loss, sharded = gpt.loss_and_grads_in_shards(params, config, x, y, shards)
worst = max(float(np.max(np.abs(sharded[k] - whole[k])) / np.max(np.abs(whole[k]))) for k in params)
print(f"  {shards} shards of {B // shards} rows: loss {shard_loss:.6f} vs {whole_loss:.6f} with the batch whole; "
      f"worst gradient difference {worst:.1e} of an array's largest entry")
check(abs(shard_loss - whole_loss) < 1e-5 and worst < 1e-5, "the shards should add up to the whole batch")


def step_ms(n_shards, repeats=7):
    """The median milliseconds of a forward + backward in n_shards shards."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gpt.loss_and_grads_in_shards(params, config, x, y, n_shards)
        times.append(time.perf_counter() - t0)
    return sorted(times)[repeats // 2] * 1e3


print(f"  forward + backward on {backend.num_threads()} thread(s): batch whole {step_ms(1):.0f} ms, "
      f"in {shards} shards {step_ms(shards):.0f} ms (medians of 7; on one core, or for a toy a few ms long, "
      f"the shards gain nothing; python -m minillm bench train --threads 1,2 times the step against PyTorch)")
