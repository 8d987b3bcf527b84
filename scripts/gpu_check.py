#!/usr/bin/env python
"""The GPU check: what a lent GPU runs first, in at most about 8 minutes, into one results file.

    python scripts/gpu_check.py --out DIR          on a machine with an NVIDIA GPU (CuPy + torch)
    python scripts/gpu_check.py --cpu --out DIR    the same steps on the CPU at toy sizes: proves
                                                   the script itself before GPU minutes are spent

Steps, each under its own time limit (a step that runs out is recorded as such and the
next one starts, so one slow step cannot eat the others' minutes):

  facts       the GPU, driver, CuPy and torch versions
  pytest      MINILLM_DEVICE=gpu python -m pytest: the whole suite on CuPy
  bench-train python -m minillm bench train --device gpu at nanoGPT's shakespeare-char shape
              (6 x 384, 64 x 256 tokens), beside torch eager and fused SDPA on the same GPU
  train-run   python -m minillm bench train-run --preset shakespeare-char --device gpu:
              a short training run against the same run in torch (and torch.compile)

It writes DIR/gpu-check.md (each step's command, status, seconds and the tail of its
output) and DIR/<step>.log (the whole output). Copy the .md into docs/ with the date
and the device in its name, and the numbers into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable

# name -> (seconds allowed, command on a GPU, command for --cpu at toy sizes)
STEPS = {
    "facts": (30,
              "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; "
              f"{PY} -c 'import cupy, torch; print(\"cupy\", cupy.__version__, \"torch\", torch.__version__, "
              "\"cuda\", torch.version.cuda)'",
              f"{PY} -c 'import numpy, platform; print(\"cpu\", platform.processor() or platform.machine(), "
              "\"numpy\", numpy.__version__)'"),
    "pytest": (210,
               f"MINILLM_DEVICE=gpu {PY} -m pytest -q -p no:cacheprovider",
               f"{PY} -m pytest -q -p no:cacheprovider tests/test_backend.py"),
    "bench-train": (90,
                    f"{PY} -m minillm bench train --device gpu --n-layer 6 --n-embd 384 --n-head 6 "
                    "--block-size 256 --batch-size 64 --vocab-size 65 --repeat 10 --warmup 3",
                    f"{PY} -m minillm bench train --n-layer 1 --n-embd 32 --n-head 2 --block-size 16 "
                    "--batch-size 4 --repeat 2 --warmup 1"),
    "train-run": (150,
                  f"{PY} -m minillm bench train-run --device gpu --preset shakespeare-char --max-steps 300 "
                  "--eval-interval 100 --eval-iters 20 --torch-compile --out {out}/train-run",
                  f"{PY} -m minillm bench train-run --preset tiny --max-steps 6 --eval-interval 3 "
                  "--eval-iters 2 --out {out}/train-run"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-check"),
                        help="folder for gpu-check.md and the logs (default: $OUT, else ./gpu-check)")
    parser.add_argument("--cpu", action="store_true", help="toy sizes on the CPU: check the script itself")
    parser.add_argument("--only", default=None, help=f"comma-separated steps to run (default: all of {list(STEPS)})")
    args = parser.parse_args(argv)
    chosen = list(STEPS) if args.only is None else [s.strip() for s in args.only.split(",")]
    unknown = [s for s in chosen if s not in STEPS]
    if unknown:
        parser.error(f"--only: unknown steps {unknown}; expected some of {list(STEPS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [_run_step(name, args.cpu, out) for name in chosen]
    _write_report(out / "gpu-check.md", results, args.cpu)
    print(f"wrote {out / 'gpu-check.md'}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


def _run_step(name, cpu, out: Path) -> dict:
    limit, gpu_cmd, cpu_cmd = STEPS[name]
    cmd = (cpu_cmd if cpu else gpu_cmd).format(out=out)
    print(f"== {name} (at most {limit} s): {cmd}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=limit)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        text = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        status = f"timed out after {limit} s"
        text = _text(e.stdout) + _text(e.stderr)
    seconds = time.perf_counter() - t0
    (out / f"{name}.log").write_text(text)
    print(f"   {status} in {seconds:.0f} s", flush=True)
    return {"name": name, "cmd": cmd, "status": status, "seconds": seconds, "tail": text[-3000:]}


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _write_report(path: Path, results, cpu):
    lines = [f"# GPU check, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
             + (" (--cpu: toy sizes on the CPU, a check of the script)" if cpu else ""), ""]
    lines += ["| step | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']:.0f} |" for r in results]
    for r in results:
        lines += ["", f"## {r['name']}", "", f"`{r['cmd']}`", "", "```", r["tail"].rstrip(), "```"]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
