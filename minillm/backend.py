"""Where arrays live and how they are made: NumPy on the CPU, CuPy on an NVIDIA GPU.

Two rules keep every concept file device-agnostic:

1. Functions that *take* arrays compute with the module the arrays came from:
   ``xp = array_module(x)``. A CuPy array in gives CuPy math; a NumPy array in
   gives NumPy math. Nothing is copied between devices behind your back.
2. Functions that *make* new arrays (initialisation, data batches) ask
   :func:`xp_default` for the module chosen by ``MINILLM_DEVICE=cpu|gpu``
   (default ``cpu``). Asking for ``gpu`` without CuPy or without a GPU is an
   error that says so; there is no silent fallback to the CPU.

Random initialisation is drawn on the CPU with a seeded NumPy generator and then
moved, so the same seed gives the same parameters on either device.

This module also holds the small argument checks every concept file uses, so
that bad input fails with a message naming the argument, what was expected and
what came.
"""

from __future__ import annotations

import contextlib
import os
import threading

import numpy as np

try:  # CuPy is optional: the `gpu` extra.
    import cupy as _cupy  # type: ignore
except Exception:  # ImportError, or a CUDA library that fails to load
    _cupy = None

DEFAULT_DTYPE = np.float32
_VALID_DEVICES = ("cpu", "gpu")


# ---------------------------------------------------------------------------
# Which module, which device
# ---------------------------------------------------------------------------

def array_module(*arrays):
    """The array module (numpy or cupy) that ``arrays`` belong to.

    Non-array arguments (None, Python scalars) are ignored. Mixing NumPy and
    CuPy arrays is allowed here (the answer is cupy); the operation itself will
    then fail loudly, which is what we want.
    """
    if _cupy is not None:
        for a in arrays:
            if isinstance(a, _cupy.ndarray):
                return _cupy
    return np


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    if _cupy is None:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def device_name(device: str | None = None) -> str:
    """The device new arrays are made on: ``device`` if given, else ``MINILLM_DEVICE``, else cpu."""
    name = device if device is not None else os.environ.get("MINILLM_DEVICE", "cpu")
    name = str(name).strip().lower()
    if name == "cuda":
        name = "gpu"
    if name not in _VALID_DEVICES:
        raise ValueError(f"device: expected one of {_VALID_DEVICES}, got {name!r} "
                         "(set MINILLM_DEVICE=cpu or MINILLM_DEVICE=gpu)")
    return name


def xp_for(device: str | None = None):
    """The array module for ``device`` (or the default device).

    Raises RuntimeError with the reason when a GPU is asked for and cannot be used.
    """
    name = device_name(device)
    if name == "cpu":
        return np
    if _cupy is None:
        raise RuntimeError("device 'gpu' was asked for but CuPy is not installed: "
                           "pip install -e '.[gpu]' (CUDA 12) or cupy-cuda13x (CUDA 13), "
                           "or use MINILLM_DEVICE=cpu")
    if not gpu_available():
        raise RuntimeError("device 'gpu' was asked for but CuPy finds no CUDA device; "
                           "use MINILLM_DEVICE=cpu")
    return _cupy


def xp_default():
    """The array module where new arrays are made (MINILLM_DEVICE)."""
    return xp_for(None)


def to_numpy(x):
    """A NumPy array with the same values (copies from the GPU when needed)."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return _cupy.asnumpy(x)
    return np.asarray(x)


def to_device(x, device: str | None = None):
    """Move an array (or a dict of arrays) to ``device`` (default: MINILLM_DEVICE)."""
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    xp = xp_for(device)
    if xp is np:
        return to_numpy(x)
    return xp.asarray(x)


def synchronize(x=None) -> None:
    """Wait for queued GPU work (for honest timings); a no-op on the CPU."""
    if _cupy is not None and (x is None or isinstance(x, _cupy.ndarray)):
        if gpu_available():
            _cupy.cuda.Stream.null.synchronize()


# ---------------------------------------------------------------------------
# CPU threads for the fast paths
# ---------------------------------------------------------------------------
# NumPy's matmul runs on BLAS threads, but an elementwise pass (exp, a softmax, a
# LayerNorm) runs on one core. NumPy releases Python's lock while its loops run,
# so splitting such a pass into parts and giving each part to a thread uses the
# other cores too. parallel_for does exactly that and nothing more: the parts are
# disjoint slices, each written by one thread, so the result is the same as one
# thread computing part after part. With one thread (MINILLM_NUM_THREADS=1, the
# friendliest setting for a debugger) every call runs inline.

_num_threads = None      # None: decided on first use by _default_threads()
_pool = None             # the worker threads, made on first use
_inside = threading.local()   # .flag set in a part: a parallel_for inside it runs inline


def _forget_pool_after_fork():
    """A forked child has none of the parent's worker threads: make a fresh pool on first use."""
    global _pool, _inside
    _pool, _inside = None, threading.local()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _default_threads() -> int:
    """MINILLM_NUM_THREADS, else OMP_NUM_THREADS / OPENBLAS_NUM_THREADS (what BLAS was told), else
    the cores this process may use."""
    for var in ("MINILLM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{var}: expected a positive integer, got {value!r}")
            return int(value)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:          # not on Linux
        return max(1, os.cpu_count() or 1)


def num_threads() -> int:
    """How many threads parallel_for splits CPU work across."""
    global _num_threads
    if _num_threads is None:
        _num_threads = _default_threads()
    return _num_threads


def set_num_threads(n: int) -> None:
    """Split CPU passes across n threads from now on (1: everything inline)."""
    global _num_threads, _pool
    check_int_arg("n", n, lo=1)
    if _pool is not None and n != _num_threads:
        _pool.shutdown(wait=True)
        _pool = None
    _num_threads = int(n)


def parallel_for(part, n, min_per_thread=1, xp=np) -> None:
    """Call part(lo, hi) on disjoint ranges covering range(n), one range per thread, and wait.

    Each part must write only its own slice [lo, hi) of the outputs. Runs inline (one
    call part(0, n)) with one thread, inside another parallel_for, when n is below
    2 * min_per_thread (too little work to be worth a thread), or when xp is not NumPy
    (a GPU runs the whole array at once). An exception in a part is raised here.
    """
    global _pool
    threads = min(num_threads(), n // max(1, min_per_thread)) if xp is np else 1
    if threads <= 1 or getattr(_inside, "flag", False):
        part(0, n)
        return
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor

        def mark():
            _inside.flag = True
        _pool = ThreadPoolExecutor(max_workers=num_threads() - 1, initializer=mark,
                                   thread_name_prefix="minillm")
    bounds = [n * i // threads for i in range(threads + 1)]
    futures = [_pool.submit(part, lo, hi) for lo, hi in zip(bounds[1:-1], bounds[2:])]
    _inside.flag = True             # this thread takes the first range itself
    try:
        part(bounds[0], bounds[1])
    finally:
        _inside.flag = False
        errors = [f.exception() for f in futures]
    for e in errors:
        if e is not None:
            raise e


# ---------------------------------------------------------------------------
# A batch shared out among the threads, one shard each
# ---------------------------------------------------------------------------
# parallel_for splits one pass; between the passes the threads wait on each other, and
# every matmul is split again by BLAS's own threads. For a training step there is a
# coarser cut with no waiting at all: the rows of a batch are independent until the
# gradients are summed, so each thread can run the whole forward and backward of its
# own shard of rows, its matmuls on one BLAS thread, and the shards' gradients add
# (the identity data parallelism rests on, here across threads instead of processes).
# That needs BLAS held at one thread while the shards run: two threads each asking
# OpenBLAS for two threads fight over the same cores (measured: a 4 x 192 GPT step
# 378 -> 705 ms). NumPy has no call for that, so backend finds the OpenBLAS NumPy
# loaded and calls its own openblas_set_num_threads through ctypes, as threadpoolctl
# does. Without one (another BLAS), batches are not sharded.

_blas = None     # (get, set): the ctypes functions of NumPy's OpenBLAS; False when there is none

_BLAS_SYMBOLS = ("scipy_openblas_{}_num_threads64_", "scipy_openblas_{}_num_threads",
                 "openblas_{}_num_threads64_", "openblas_{}_num_threads")


def _numpy_blas_files() -> list:
    """Paths of the OpenBLAS libraries NumPy may have loaded: its wheel's own copy (numpy.libs,
    numpy/.dylibs), then any OpenBLAS this process has mapped (a distribution's NumPy)."""
    import glob
    here = os.path.dirname(np.__file__)
    found = []
    for folder in (os.path.join(os.path.dirname(here), "numpy.libs"), os.path.join(here, ".dylibs")):
        found += sorted(glob.glob(os.path.join(folder, "*openblas*")))
    try:
        with open("/proc/self/maps") as maps:
            found += sorted({line.split()[-1] for line in maps if "openblas" in line.rsplit("/", 1)[-1]})
    except OSError:     # not Linux
        pass
    return found


def _blas_functions():
    """(get, set) for NumPy's OpenBLAS thread count, found once; False if there is none."""
    global _blas
    if _blas is None:
        _blas = False
        import ctypes
        for path in _numpy_blas_files():
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for name in _BLAS_SYMBOLS:
                get, put = (getattr(lib, name.format(verb), None) for verb in ("get", "set"))
                if get is not None and put is not None:
                    get.restype, get.argtypes = ctypes.c_int, []
                    put.restype, put.argtypes = None, [ctypes.c_int]
                    _blas = (get, put)
                    return _blas
    return _blas


def blas_threads() -> int | None:
    """How many threads NumPy's BLAS (OpenBLAS) runs a matmul on; None when it cannot be told."""
    functions = _blas_functions()
    return int(functions[0]()) if functions else None


def set_blas_threads(n: int) -> bool:
    """Run NumPy's matmuls on n BLAS threads from now on -> whether BLAS could be told."""
    check_int_arg("n", n, lo=1)
    functions = _blas_functions()
    if functions:
        functions[1](int(n))
    return bool(functions)


@contextlib.contextmanager
def blas_threads_held(n: int):
    """Inside the with block NumPy's BLAS runs on n threads; afterwards (also after an error)
    on as many as before. Does nothing when BLAS's thread count cannot be set."""
    before = blas_threads()
    if before is None:
        yield
        return
    set_blas_threads(n)
    try:
        yield
    finally:
        set_blas_threads(before)


def batch_shards(rows: int, xp=np) -> int:
    """Into how many shards run_in_shards cuts a batch of ``rows`` rows: one per thread (at
    most one per row) on NumPy with several threads and a BLAS that can be held at one
    thread; 1 (the batch whole) otherwise, and always inside a parallel_for or on a GPU."""
    if xp is not np or num_threads() < 2 or rows < 2 or getattr(_inside, "flag", False):
        return 1
    return min(num_threads(), int(rows)) if _blas_functions() else 1


def shard_bounds(rows: int, shards: int) -> list:
    """[(lo, hi)]: ``shards`` consecutive ranges of rows, as equal as they can be, covering range(rows)."""
    return [(rows * i // shards, rows * (i + 1) // shards) for i in range(shards)]


def run_in_shards(shard, rows: int, shards: int) -> list:
    """[shard(lo, hi) for each of shard_bounds(rows, shards)], the shards at the same time, one
    per thread, with BLAS held at one thread meanwhile (restored after, also on an error).

    Each call must only read what it shares with the others: the shards' results come back
    in order, and combining them (adding gradients) is the caller's. With one shard this is
    a plain call on this thread, BLAS untouched.
    """
    bounds = shard_bounds(rows, shards)
    if shards == 1:
        return [shard(*bounds[0])]
    results = [None] * shards

    def part(lo, hi):
        for i in range(lo, hi):
            results[i] = shard(*bounds[i])
    with blas_threads_held(1):
        parallel_for(part, shards)
    return results


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the system.

    A training step frees and makes again the same activation-sized arrays every step.
    By default glibc maps each array above 128 KB-32 MB fresh from the kernel and unmaps
    it when freed, so every step pays a page fault for each 4 KB it touches (and the
    faults of two threads queue on one lock). Raising the mmap threshold to its 32 MB
    maximum and the trim threshold to 2 GB keeps those blocks in the heap, where the next
    step finds them already mapped (measured on a 4 x 192 GPT step: 340 -> 272 ms). The
    process keeps its peak heap instead of shrinking between steps. Called when
    minillm.backend is imported; MINILLM_KEEP_FREED_MEMORY=0 turns it off. Returns whether
    the settings were applied (False off Linux/glibc).
    """
    if os.environ.get("MINILLM_KEEP_FREED_MEMORY", "1").strip() == "0":
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3       # <malloc.h>
        ok = libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
        ok &= libc.mallopt(m_trim_threshold, 2**31 - 1)
        ok &= libc.mallopt(m_top_pad, 64 * 1024 * 1024)
        return bool(ok)
    except (OSError, AttributeError):       # not glibc
        return False


keep_freed_memory()


# ---------------------------------------------------------------------------
# Seeding
# ---------------------------------------------------------------------------

def make_rng(seed) -> np.random.Generator:
    """A NumPy Generator from ``seed`` (int, None, or an existing Generator).

    Initialisation always draws on the CPU and then moves the result, so a seed
    means the same numbers on the CPU and the GPU.
    """
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise TypeError(f"seed: expected an int, None or numpy Generator, got {type(seed).__name__}")
    return np.random.default_rng(seed)


def randn(rng: np.random.Generator, shape, std=1.0, dtype=DEFAULT_DTYPE, device: str | None = None):
    """Normal(0, std^2) samples drawn on the CPU from ``rng``, then moved to ``device``."""
    a = (rng.standard_normal(shape) * std).astype(dtype)
    return to_device(a, device)


# ---------------------------------------------------------------------------
# Scatter-add: the backward of a gather (embedding lookup)
# ---------------------------------------------------------------------------

def scatter_add(target, indices, values) -> None:
    """target[indices] += values, accumulating repeated indices (in place).

    ``np.add.at`` on NumPy, ``cupyx.scatter_add`` on CuPy. For a 2-D target and
    1-D integer indices on NumPy we use a sort-free bincount-style matmul-free
    path: ``np.add.at`` is correct but slow for large row counts.
    """
    xp = array_module(target)
    if xp is np:
        if target.ndim == 2 and indices.ndim == 1 and values.ndim == 2 and len(indices) > 64:
            # Sum rows that share an index first (fast reduceat), then one fancy-index add.
            order = np.argsort(indices, kind="stable")
            idx_sorted = indices[order]
            starts = np.flatnonzero(np.r_[True, idx_sorted[1:] != idx_sorted[:-1]])
            sums = np.add.reduceat(values[order], starts, axis=0)
            target[idx_sorted[starts]] += sums
        else:
            np.add.at(target, indices, values)
    else:
        import cupyx  # type: ignore
        cupyx.scatter_add(target, indices, values)


# ---------------------------------------------------------------------------
# Argument checks: clear errors instead of silent broadcasts
# ---------------------------------------------------------------------------

def _describe(x) -> str:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def check_array(name: str, x) -> None:
    """TypeError unless ``x`` is a NumPy or CuPy array."""
    ok = isinstance(x, np.ndarray) or (_cupy is not None and isinstance(x, _cupy.ndarray))
    if not ok:
        raise TypeError(f"{name}: expected a numpy or cupy array, got {_describe(x)}")


def check_float(name: str, x) -> None:
    """TypeError unless ``x`` is a floating-point array (float16/32/64)."""
    check_array(name, x)
    if x.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {x.dtype}")


def check_int(name: str, x) -> None:
    """TypeError unless ``x`` is an integer array."""
    check_array(name, x)
    if x.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer array, got dtype {x.dtype}")


def check_ndim(name: str, x, ndim) -> None:
    """ValueError unless ``x.ndim`` is ``ndim`` (an int or a tuple of allowed ints)."""
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if x.ndim not in allowed:
        want = " or ".join(str(n) for n in allowed)
        raise ValueError(f"{name}: expected {want} dimensions, got shape {tuple(x.shape)}")


def check_shape(name: str, x, shape) -> None:
    """ValueError unless ``x.shape`` matches ``shape`` (None entries match any size)."""
    got = tuple(x.shape)
    if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
        parts = ["*" if s is None else str(s) for s in shape]
        want = "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"
        raise ValueError(f"{name}: expected shape {want}, got {got}")


def check_same_dtype(**arrays) -> None:
    """TypeError unless all the given float arrays share one dtype (no silent up/downcasts)."""
    items = [(k, v) for k, v in arrays.items() if v is not None]
    if not items:
        return
    k0, v0 = items[0]
    for k, v in items[1:]:
        if v.dtype != v0.dtype:
            raise TypeError(f"{k}: expected dtype {v0.dtype} (the dtype of {k0}), got {v.dtype}")


def check_like(what: str, params: dict, arrays) -> None:
    """``arrays`` is a dict with exactly the keys of ``params`` and arrays of the same
    shapes (gradients, optimizer state), else TypeError/ValueError naming the entry."""
    if not isinstance(arrays, dict):
        raise TypeError(f"{what}: expected a dict of arrays keyed like params, got {type(arrays).__name__}")
    if arrays.keys() != params.keys():
        missing = sorted(set(params) - set(arrays))
        extra = sorted(set(arrays) - set(params))
        raise ValueError(f"{what}: expected the same keys as params, missing {missing}, extra {extra}")
    for name, p in params.items():
        a = arrays[name]
        check_array(f"{what}[{name!r}]", a)
        if tuple(a.shape) != tuple(p.shape):
            raise ValueError(f"{what}[{name!r}]: expected shape {tuple(p.shape)} (the parameter's), "
                             f"got {tuple(a.shape)}")


def check_ids(name: str, ids, vocab_size: int) -> None:
    """Integer ids in [0, vocab_size), else TypeError/ValueError naming the offender."""
    check_int(name, ids)
    if ids.size:
        xp = array_module(ids)
        lo, hi = int(xp.min(ids)), int(xp.max(ids))
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name}: expected ids in [0, {vocab_size}), got {bad}")


def check_positive(name: str, value) -> None:
    """ValueError unless ``value`` is a finite number > 0."""
    if not (isinstance(value, (int, float, np.floating, np.integer)) and np.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected a positive number, got {value!r}")


def is_int(value) -> bool:
    """True for a Python or NumPy integer, False for bool (True is not a count)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int_arg(name: str, value, lo=None, hi=None, optional=False):
    """``value`` is an int in [lo, hi) (either bound may be None), else ValueError naming it.

    ``optional=True`` lets None through. Returns ``int(value)`` (or None). The
    message says what was expected: "a positive int" (lo=1), "a non-negative int"
    (lo=0), "an int >= lo", or "an int in [lo, hi)".
    """
    if optional and value is None:
        return None
    if hi is not None:
        want = f"an int in [{lo if lo is not None else '-inf'}, {hi})"
    elif lo == 1:
        want = "a positive int"
    elif lo == 0:
        want = "a non-negative int"
    elif lo is not None:
        want = f"an int >= {lo}"
    else:
        want = "an int"
    if optional:
        want = "None or " + want
    if not is_int(value) or (lo is not None and value < lo) or (hi is not None and value >= hi):
        raise ValueError(f"{name}: expected {want}, got {value!r}")
    return int(value)


def check_number(name: str, value, lo=None, hi=None, lo_open=False, hi_open=False) -> float:
    """``value`` is a finite real number in the interval lo..hi (closed unless *_open),
    else TypeError (not a number) or ValueError naming it. Returns ``float(value)``."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not ok:
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    v = float(value)
    if not np.isfinite(v) or (lo is not None and (v < lo or (lo_open and v == lo))) \
            or (hi is not None and (v > hi or (hi_open and v == hi))):
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise ValueError(f"{name}: expected a finite number in {left}{lo_s}, {hi_s}{right}, got {value!r}")
    return v


def check_probability(name: str, value, include_one=False) -> float:
    """``value`` is a probability in [0, 1) ([0, 1] with include_one), else ValueError."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not ok or not (0.0 <= value <= 1.0) or (value == 1.0 and not include_one):
        right = "]" if include_one else ")"
        raise ValueError(f"{name}: expected a probability in [0, 1{right}, got {value!r}")
    return float(value)


def check_choice(name: str, value, options) -> None:
    """ValueError unless ``value`` is one of ``options``."""
    if value not in tuple(options):
        raise ValueError(f"{name}: expected one of {tuple(options)}, got {value!r}")


def check_same_device(name: str, x, like, like_name: str) -> None:
    """TypeError unless ``x`` lives on the same device (NumPy vs CuPy) as ``like``."""
    if array_module(x) is not array_module(like):
        raise TypeError(f"{name}: expected an array on the same device as {like_name} "
                        f"({array_module(like).__name__}), got {type(x).__module__}.{type(x).__name__}")


# ---------------------------------------------------------------------------
# Files: written whole or not at all
# ---------------------------------------------------------------------------

def atomic_write(path, write, mode="wb") -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file in the same folder,
    which is flushed, fsynced and then renamed over ``path`` (``os.replace``), so a crash
    leaves either the old file or the new one, never half of one."""
    import tempfile
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def _fsync_dir(folder) -> None:
    # Makes the rename itself durable; not every OS allows it, and it is harmless to skip there.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
