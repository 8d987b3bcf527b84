"""One rank of ``bench distributed`` (launched by it under mpiexec): time train_step, print JSON.

    mpiexec -n N python -m minillm.bench._ddp_rank PRESET BATCH BLOCK STEPS ZERO ACCUM
"""
import json
import sys
import time

import numpy as np

from minillm import distributed as dist
from minillm import gpt
from minillm.optim import make_optimizer
from minillm.train import TrainConfig, train_step


class _RandomTokens:
    """A GPT task on random tokens: the speed of a step does not depend on what the tokens say."""

    def __init__(self, config, batch, block):
        self.config, self.params = config, gpt.init_params(config, seed=0)
        self.batch, self.block, self.rng = batch, block, None

    def get_batch(self, split, rng):
        x = rng.integers(0, self.config.vocab_size, (self.batch, self.block))
        return x, np.roll(x, -1, axis=1)

    def loss_and_grads(self, params, batch):
        return gpt.loss_and_grads(params, self.config, *batch)


def main(argv):
    from minillm.cli.train import PRESETS
    preset, batch, block, steps, zero, accum = argv[0], *map(int, argv[1:6])
    world = dist.mpi_world()
    config = gpt.GPTConfig(vocab_size=83, block_size=block, **PRESETS[preset][1])
    task = _RandomTokens(config, batch, block)
    dist.broadcast_params(task.params, world)
    cfg = TrainConfig(max_steps=steps + 2, batch_size=batch, block_size=block, warmup_steps=0,
                      grad_accum_steps=accum, out_dir="unused")
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps)
    opt = dist.ZeroOptimizer("adamw", task.params, world, **kw) if zero else make_optimizer("adamw", task.params, **kw)
    reducer = dist.GradReducer(task.params, world, zero)
    rng = np.random.default_rng(0)
    for s in range(2):                                   # warm up (allocations, BLAS threads)
        train_step(task, opt, rng, cfg, s, world, reducer)
    world.barrier()
    world.comm_s = 0.0
    t0 = time.perf_counter()
    for s in range(2, steps + 2):
        train_step(task, opt, rng, cfg, s, world, reducer)
    wall = time.perf_counter() - t0
    if world.rank == 0:
        print(json.dumps({"ranks": world.size, "zero": zero, "steps_per_s": steps / wall,
                          "tokens_per_s": steps * batch * block / wall, "comm_s_per_step": world.comm_s / steps,
                          "n_params": gpt.num_params(task.params)}))


if __name__ == "__main__":
    main(sys.argv[1:])
