"""A tiny GPT trained by minillm.train, for the distributed tests (tests/test_distributed.py).

    [mpiexec -n N] python tests/ddp_worker.py OUT [--ddp] [--zero Z] [--accum K] [--steps S]
        [--batch B] [--clip C] [--dropout P] [--resume] [--crash-rank R --crash-step S]

Synthetic tokens (no corpus), so a launch costs the interpreter's start and little more.
With --crash-rank, that rank raises in its loss_and_grads during step --crash-step (like
a rank that dies); the run must then end every rank with a clear error. Rank 0 writes
OUT/checkpoint.npz (every 2 steps and at the end) as the loop does.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minillm import distributed as dist, gpt  # noqa: E402
from minillm.cli.train import GPTTask  # noqa: E402
from minillm.train import TrainConfig, train  # noqa: E402


def tokens(n, vocab, seed):
    """A stream with structure to learn: token t+1 = (token t + a small step) mod vocab."""
    r = np.random.default_rng(seed)
    return (np.cumsum(r.integers(1, 3, size=n)) % vocab).astype(np.uint16)


class CrashingTask(GPTTask):
    def __init__(self, *a, crash_rank=-1, crash_step=-1, world=None, accum=1, **kw):
        super().__init__(*a, **kw)
        self.crash_rank, self.crash_call, self.rank, self.calls = crash_rank, crash_step * accum, world.rank, 0
        self.accum = accum

    def loss_and_grads(self, params, batch):
        self.calls += 1
        if self.rank == self.crash_rank and self.calls > self.crash_call - self.accum:
            raise RuntimeError(f"simulated failure of rank {self.rank}")
        return super().loss_and_grads(params, batch)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--ddp", action="store_true")
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--clip", type=float, default=0.05)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--crash-rank", type=int, default=-1)
    ap.add_argument("--crash-step", type=int, default=-1)
    ap.add_argument("--activation-checkpointing", action="store_true")
    a = ap.parse_args(argv)
    world = dist.get_world(a.ddp)
    config = gpt.GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=a.dropout)
    params = gpt.init_params(config, seed=1)
    kw = {"activation_checkpointing": True} if a.activation_checkpointing else {}
    task = CrashingTask(config, params, None, tokens(4000, 13, 0), tokens(500, 13, 1), a.batch, 8, np,
                        seed=2, crash_rank=a.crash_rank, crash_step=a.crash_step, world=world, accum=a.accum,
                        **kw)
    cfg = TrainConfig(max_steps=a.steps, batch_size=a.batch, block_size=8, lr=3e-2, min_lr=3e-3, warmup_steps=2,
                      grad_clip=a.clip, eval_interval=0, eval_iters=1, log_interval=1, checkpoint_interval=2,
                      grad_accum_steps=a.accum, seed=3, out_dir=a.out)
    train(task, cfg, resume=a.resume, log=lambda line: None, world=world, zero=a.zero)


if __name__ == "__main__":
    main()
