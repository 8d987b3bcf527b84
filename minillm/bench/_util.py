"""Timing helpers shared by the benchmarks."""

import time

from minillm.backend import synchronize


def time_call(fn, *, repeat=5, warmup=1, sync=None):
    """Best-of-``repeat`` wall time of ``fn()`` in seconds, after ``warmup`` calls.

    ``sync`` is an array whose device is synchronised after each call so GPU
    timings measure the work, not just its launch.
    """
    for _ in range(warmup):
        out = fn()
        synchronize(sync if sync is not None else out if hasattr(out, "shape") else None)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        synchronize(sync if sync is not None else out if hasattr(out, "shape") else None)
        best = min(best, time.perf_counter() - t0)
    return best


def print_table(rows, headers):
    """Print rows (lists) under headers as an aligned plain-text table."""
    cols = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(headers))]
    for j, r in enumerate(cols):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))
