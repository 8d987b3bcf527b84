"""Data-parallel training under MPI: steps/s, tokens/s and communication time per step for 1, 2, 4 ranks.

Launches ``mpiexec -n N`` for each N in --ranks, times --steps optimizer steps of the
preset's GPT on random tokens (the global batch fixed, so N ranks each compute 1/N of it),
and prints one row per (N, ZeRO stage). Communication time is rank 0's time inside MPI
calls, waiting for slower ranks included. On a machine with fewer cores than ranks the
ranks share cores: more ranks cannot be faster there, and the table says what the
all-reduce costs on top. Needs the distributed extra (mpi4py, mpich).
"""
import json
import os
import shutil
import subprocess
import sys

from minillm.cli import common
from minillm.cli.common import UsageError


def add_arguments(parser):
    parser.add_argument("--preset", default="default", help="the train preset's model (default: default)")
    parser.add_argument("--batch-size", type=common.positive_int, default=32, help="global batch (default: 32)")
    parser.add_argument("--block-size", type=common.positive_int, default=64, help="context (default: 64)")
    parser.add_argument("--steps", type=common.positive_int, default=10, help="timed steps (default: 10)")
    parser.add_argument("--ranks", default="1,2,4", help="rank counts to time (default: 1,2,4)")
    parser.add_argument("--zero", default="0", help="ZeRO stages to time, comma-separated (default: 0)")


def run(args, log=print):
    exe = shutil.which("mpiexec")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        exe = None
    if exe is None:
        raise UsageError("bench distributed needs mpi4py and mpiexec (pip install 'minillm[distributed]')")
    ranks = [int(r) for r in args.ranks.split(",")]
    zeros = [int(z) for z in args.zero.split(",")]
    log(f"{os.cpu_count()} CPU cores; preset {args.preset}, global batch {args.batch_size} x {args.block_size}, "
        f"{args.steps} timed steps")
    log(f"{'ranks':>5s} {'zero':>4s} {'steps/s':>8s} {'tokens/s':>9s} {'comm ms/step':>12s}")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")}
    for n in ranks:
        for z in zeros:
            if args.batch_size % n:
                log(f"{n:5d} {z:4d}  (skipped: batch {args.batch_size} does not divide into {n} ranks)")
                continue
            res = subprocess.run([exe, "-n", str(n), sys.executable, "-m", "minillm.bench._ddp_rank", args.preset,
                                  str(args.batch_size), str(args.block_size), str(args.steps), str(z), "1"],
                                 capture_output=True, text=True, env=env)
            if res.returncode != 0:
                raise RuntimeError(f"mpiexec -n {n} failed: {res.stderr.strip()[-500:]}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            log(f"{n:5d} {z:4d} {r['steps_per_s']:8.2f} {r['tokens_per_s']:9,.0f} {r['comm_s_per_step'] * 1e3:12.1f}")
    return 0
