"""The training loop: one loop for every model, with evaluation, checkpoints that resume exactly,
a progress line, a metrics log and a loss-curve plot.

The loop knows nothing about GPTs or BERTs. It drives a *task*, any object with

    params                        dict of parameter arrays (updated in place)
    loss_and_grads(params, batch) -> (loss, grads)   grads keyed like params
    eval_loss(params, batch)      -> loss            no gradients, no dropout
    get_batch(split, rng)         -> batch           split "train" or "val"; rng is a
                                                     numpy Generator owned by the loop
    tokens_per_batch              int (for tokens/s)
    model_config                  JSON-serialisable dict (saved in checkpoints)
    tokenizer                     object with to_dict(), or None
    rng  (optional)               a numpy Generator the task uses itself (dropout);
                                  its state is checkpointed too

One optimizer step:

    lr = lr_schedule(step)                      warmup, then cosine decay
    for each of grad_accum_steps micro-batches:
        batch = task.get_batch("train", rng)
        loss, grads = task.loss_and_grads(params, batch)
        acc += grads / grad_accum_steps         the gradient of the mean loss
    clip_grad_norm(acc, grad_clip)
    optimizer.step(acc)

Every ``eval_interval`` steps the mean loss over ``eval_iters`` batches of each
split is measured, always on the same batches (a generator seeded afresh for each
evaluation), so successive evaluations are comparable and evaluation never
disturbs the training data stream.

Checkpoint: ``out_dir/checkpoint.npz`` holds the parameters, the optimizer's
buffers and, as one JSON entry, the step, the config, the model config, the
tokenizer, the RNG states and the metrics. Being one file, it is replaced in one
``os.replace`` of a fully written and fsynced temporary file: a crash at any
moment leaves either the old checkpoint or the new one, never a mix or a torn
file. ``checkpoint.json`` beside it is the same JSON for people to read; loading
ignores it. Resuming restores every piece of state the next step depends on
(parameters, optimizer buffers and step count, the data generator, the task's
own generator), so the losses continue exactly as in an uninterrupted run.
Ctrl-C lets the current step finish, then evaluates, checkpoints and returns.

Also in ``out_dir``: ``metrics.jsonl`` (one JSON object per logged step or
evaluation, appended as training goes) and ``loss.svg`` (train and validation
loss against step, drawn by hand: no plotting library).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from .backend import array_module, to_numpy
from .optim import clip_grad_norm, global_norm, accumulate, lr_schedule, make_optimizer

__all__ = ["TrainConfig", "train", "evaluate", "save_checkpoint", "load_checkpoint", "latest_run",
           "read_metrics", "write_loss_svg", "plot_metrics", "CHECKPOINT_FILE", "METRICS_FILE",
           "PLOT_FILE"]

CHECKPOINT_FILE = "checkpoint.npz"
CHECKPOINT_JSON = "checkpoint.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.svg"
FORMAT = "minillm-checkpoint"
FORMAT_VERSION = 1


def _library_version() -> str:
    try:
        from importlib.metadata import version
        return version("minillm")
    except Exception:  # running from a source tree that is not installed
        return "unknown"


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Everything that decides a training run (the model's own config lives with the task).

    Intervals count optimizer steps; an interval of 0 means "only at the end".
    grad_clip <= 0 disables clipping. batch_size, block_size, data and
    val_fraction are read by whoever builds the task (its batches and its
    train/validation split); the loop records them in every checkpoint, so a
    checkpoint says what it was trained and validated on.
    """
    max_steps: int = 2000
    batch_size: int = 32
    block_size: int = 128
    lr: float = 1e-3              # peak learning rate, reached at the end of warmup
    min_lr: float = 1e-4          # floor of the cosine decay
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    optimizer: str = "adamw"      # "adamw", "adam" or "sgd"
    momentum: float = 0.9         # SGD only
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    checkpoint_interval: int = 500
    grad_accum_steps: int = 1
    seed: int = 1337
    out_dir: str = "runs/default"
    data: str | None = None       # text file the task trains on; None = the Shakespeare corpus
    val_fraction: float = 0.1     # share held out for validation (data.split_documents, seed 0)

    # Fields that change the trajectory: a resumed run must agree on them to be exact.
    _TRAJECTORY = ("batch_size", "block_size", "lr", "min_lr", "warmup_steps", "weight_decay",
                   "grad_clip", "betas", "eps", "optimizer", "momentum", "grad_accum_steps", "seed",
                   "data", "val_fraction")

    def __post_init__(self):
        self.betas = tuple(self.betas)
        for name in ("max_steps", "batch_size", "block_size", "eval_iters", "log_interval",
                     "grad_accum_steps"):
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "eval_interval", "checkpoint_interval", "seed"):
            _check_int(name, getattr(self, name), 0)
        for name in ("lr", "min_lr", "weight_decay", "eps", "momentum"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr: expected at most lr ({self.lr}), got {self.min_lr}")
        if self.grad_clip is None:
            self.grad_clip = 0.0
        if not isinstance(self.grad_clip, (int, float)) or not math.isfinite(self.grad_clip):
            raise ValueError(f"grad_clip: expected a finite number (<= 0 disables), got {self.grad_clip!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas: expected a pair in [0, 1), got {self.betas!r}")
        if str(self.optimizer).lower() not in ("adamw", "adam", "sgd"):
            raise ValueError(f"optimizer: expected 'adamw', 'adam' or 'sgd', got {self.optimizer!r}")
        self.out_dir = str(self.out_dir)
        if self.data is not None:
            self.data = str(self.data)
        v = self.val_fraction
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
            raise ValueError(f"val_fraction: expected a number in (0, 1), got {v!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown TrainConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)


def _check_int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------

def _write_arrays(fileobj, arrays: dict) -> None:
    """Write the arrays as an (uncompressed) .npz into an open binary file."""
    np.savez(fileobj, **arrays)


def _fsync_dir(path: Path) -> None:
    # Make the rename itself durable; not possible on every OS, harmless to skip there.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Write a file via ``write(fileobj)`` into a temporary sibling, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _tokenizer_dict(tokenizer):
    if tokenizer is None or isinstance(tokenizer, dict):
        return tokenizer
    if not hasattr(tokenizer, "to_dict"):
        raise TypeError(f"tokenizer: expected an object with to_dict(), a dict or None, "
                        f"got {type(tokenizer).__name__}")
    return tokenizer.to_dict()


def save_checkpoint(out_dir, params: dict, optimizer=None, step: int = 0, config=None,
                    model_config=None, tokenizer=None, rng_state=None, metrics=None) -> Path:
    """Write ``out_dir/checkpoint.npz`` atomically and return its path.

    params: dict of arrays (NumPy or CuPy; stored as NumPy, dtypes kept).
    optimizer: an optim.Optimizer or its state_dict(), or None.
    config: a TrainConfig or a dict; model_config: a JSON-able dict; tokenizer: an
    object with to_dict(), a dict, or None; rng_state: JSON-able dict of generator
    states; metrics: JSON-able dict. Also writes ``checkpoint.json`` for reading.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not isinstance(params, dict) or not params:
        raise TypeError(f"params: expected a non-empty dict of arrays, got {type(params).__name__}")
    arrays = {}
    for name, p in params.items():
        arrays[f"params:{name}"] = to_numpy(p)
    opt_meta = None
    if optimizer is not None:
        sd = optimizer.state_dict() if hasattr(optimizer, "state_dict") else optimizer
        opt_meta = {"type": sd["type"], "t": int(sd["t"]), "hparams": sd["hparams"],
                    "buffers": sorted(sd["buffers"])}
        for buf, named in sd["buffers"].items():
            for name, a in named.items():
                arrays[f"optimizer:{buf}:{name}"] = to_numpy(a)
    if isinstance(config, TrainConfig):
        config = config.to_dict()
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "minillm_version": _library_version(),
            "step": int(step), "param_names": list(params), "optimizer": opt_meta,
            "config": config, "model_config": model_config, "tokenizer": _tokenizer_dict(tokenizer),
            "rng": rng_state, "metrics": metrics or {}}
    try:
        meta_json = json.dumps(meta, indent=1, sort_keys=False)
    except TypeError as e:
        raise TypeError(f"checkpoint: config, model_config, tokenizer, rng_state and metrics must be "
                        f"JSON-serialisable ({e})") from e
    arrays["__meta__"] = np.frombuffer(meta_json.encode("utf-8"), dtype=np.uint8)
    target = out / CHECKPOINT_FILE
    _atomic_write(target, lambda f: _write_arrays(f, arrays))
    _atomic_write(out / CHECKPOINT_JSON, lambda f: f.write(meta_json.encode("utf-8")))
    return target


def load_checkpoint(out_dir) -> dict:
    """Read a checkpoint: ``out_dir`` is a run directory or the .npz file itself.

    -> {"path", "step", "params" (dict of NumPy arrays, saved order), "optimizer"
    (a state_dict for Optimizer.load_state_dict, or None), "config" (dict),
    "model_config", "tokenizer" (dict or None), "rng", "metrics"}.
    A missing file is FileNotFoundError; a truncated or foreign one ValueError.
    """
    p = Path(out_dir)
    f = p / CHECKPOINT_FILE if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"checkpoint: no {CHECKPOINT_FILE} in {str(p)!r}. Train a model first "
                                f"(python -m minillm train) or point at a run directory that has one.")
    try:
        with np.load(f, allow_pickle=False) as z:
            if "__meta__" not in z.files:
                raise ValueError("it has no __meta__ entry")
            meta = json.loads(bytes(z["__meta__"]).decode("utf-8"))
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError(f"its format is {meta.get('format') if isinstance(meta, dict) else meta!r}")
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format version {meta.get('format_version')!r}, this minillm reads "
                                 f"{FORMAT_VERSION}")
            params = {name: z[f"params:{name}"] for name in meta["param_names"]}
            optimizer = None
            om = meta.get("optimizer")
            if om is not None:
                buffers = {b: {name: z[f"optimizer:{b}:{name}"] for name in meta["param_names"]}
                           for b in om["buffers"]}
                optimizer = {"type": om["type"], "t": om["t"], "hparams": om["hparams"], "buffers": buffers}
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint: {str(f)!r} is not a readable minillm checkpoint "
                         f"({type(e).__name__}: {e}); it may be truncated or from another program") from e
    return {"path": str(f), "step": int(meta["step"]), "params": params, "optimizer": optimizer,
            "config": meta.get("config"), "model_config": meta.get("model_config"),
            "tokenizer": meta.get("tokenizer"), "rng": meta.get("rng"), "metrics": meta.get("metrics") or {}}


def latest_run(root="runs") -> Path:
    """The run directory under ``root`` (or ``root`` itself) whose checkpoint was written last."""
    root = Path(root)
    candidates = []
    if (root / CHECKPOINT_FILE).is_file():
        candidates.append(root)
    if root.is_dir():
        candidates += [d for d in root.iterdir() if d.is_dir() and (d / CHECKPOINT_FILE).is_file()]
    if not candidates:
        raise FileNotFoundError(f"root: no run with a {CHECKPOINT_FILE} under {str(root)!r}. Train one "
                                f"first (python -m minillm train) or pass a run directory.")
    return max(candidates, key=lambda d: (d / CHECKPOINT_FILE).stat().st_mtime_ns)


# ---------------------------------------------------------------------------
# Metrics log and the loss plot
# ---------------------------------------------------------------------------

def read_metrics(out_dir) -> list:
    """The records in ``out_dir/metrics.jsonl`` (an empty list when there is none).

    A last line cut short by a crash is ignored; training rewrites the file on resume.
    """
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _nice_ticks(lo, hi, n=5):
    """About n round-numbered ticks covering [lo, hi] (steps of 1, 2 or 5 times a power of 10)."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _fmt_tick(v):
    return f"{v:g}" if abs(v) < 1e5 else f"{v:.0e}"


def write_loss_svg(path, series: dict, title="loss") -> Path:
    """Draw {name: [(step, value), ...]} as lines on shared axes into an SVG file (atomically).

    Hand-written SVG: a frame, round-numbered ticks, one polyline per series
    (points marked when a series is sparse), and a legend. Non-finite values are skipped.
    """
    W, H = 720, 420
    left, right, top, bottom = 64, 150, 36, 48
    pw, ph = W - left - right, H - top - bottom
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    clean = {name: [(float(s), float(v)) for s, v in pts if math.isfinite(float(v))]
             for name, pts in series.items()}
    allpts = [pt for pts in clean.values() for pt in pts]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{left + pw / 2}" y="22" text-anchor="middle" font-size="15">{escape(str(title))}</text>']
    if not allpts:
        parts.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no data yet</text>')
    else:
        xs = [s for s, _ in allpts]
        ys = [v for _, v in allpts]
        x0, x1 = min(min(xs), 0.0), max(xs)  # steps from 0, so curves of different runs line up
        if x1 == x0:
            x1 = x0 + 1
        y0, y1 = min(ys), max(ys)
        pad = 0.05 * (y1 - y0) if y1 > y0 else max(abs(y0) * 0.05, 0.05)
        y0, y1 = y0 - pad, y1 + pad

        def X(s):
            return left + (s - x0) / (x1 - x0) * pw

        def Y(v):
            return top + (1 - (v - y0) / (y1 - y0)) * ph

        for t in _nice_ticks(y0, y1):
            if y0 <= t <= y1:
                parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" stroke="#e5e5e5"/>')
                parts.append(f'<text x="{left - 6}" y="{Y(t) + 4:.1f}" text-anchor="end">{_fmt_tick(t)}</text>')
        for t in _nice_ticks(x0, x1):
            if x0 <= t <= x1:
                parts.append(f'<line x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="black"/>')
                parts.append(f'<text x="{X(t):.1f}" y="{top + ph + 18}" text-anchor="middle">{_fmt_tick(t)}</text>')
        parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>')
        parts.append(f'<text x="{left + pw / 2}" y="{H - 8}" text-anchor="middle">step</text>')
        parts.append(f'<text x="16" y="{top + ph / 2}" text-anchor="middle" '
                     f'transform="rotate(-90 16 {top + ph / 2})">loss</text>')
        for i, (name, pts) in enumerate(clean.items()):
            c = colors[i % len(colors)]
            if pts:
                coords = " ".join(f"{X(s):.1f},{Y(v):.1f}" for s, v in sorted(pts))
                parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.8" points="{coords}"/>')
                if len(pts) <= 60:
                    parts += [f'<circle cx="{X(s):.1f}" cy="{Y(v):.1f}" r="2.5" fill="{c}"/>' for s, v in pts]
            ly = top + 14 + 20 * i
            parts.append(f'<line x1="{left + pw + 12}" x2="{left + pw + 36}" y1="{ly - 4}" y2="{ly - 4}" '
                         f'stroke="{c}" stroke-width="2.5"/>')
            parts.append(f'<text x="{left + pw + 42}" y="{ly}">{escape(str(name))}</text>')
    parts.append("</svg>\n")
    svg = "\n".join(parts)
    path = Path(path)
    _atomic_write(path, lambda f: f.write(svg.encode("utf-8")))
    return path


def plot_metrics(out_dir) -> Path:
    """Write ``out_dir/loss.svg`` from ``out_dir/metrics.jsonl``: train loss per logged step, val per eval."""
    recs = read_metrics(out_dir)
    train_pts = [(r["step"], r["loss"]) for r in recs if r.get("kind") == "train"]
    val_pts = [(r["step"], r["val_loss"]) for r in recs if r.get("kind") == "eval" and r.get("val_loss") is not None]
    return write_loss_svg(Path(out_dir) / PLOT_FILE, {"train": train_pts, "val": val_pts},
                          title=f"loss: {Path(out_dir).resolve().name}")


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------

def evaluate(task, eval_iters: int, seed: int = 0, splits=("train", "val"), on_batch=None) -> dict:
    """{split: mean of task.eval_loss over eval_iters batches}, always the same batches for a seed.

    A generator made afresh from (seed, split) draws the batches, so two
    evaluations at different steps see identical data (their difference is the
    model's doing, not the sample's) and the training stream is untouched.
    ``on_batch(done, total)``, if given, is called after each batch (progress).
    """
    out = {}
    n_total = eval_iters * len(splits)
    for k, split in enumerate(splits):
        rng = np.random.default_rng([int(seed), 7919, k])
        total = 0.0
        for i in range(eval_iters):
            total += float(task.eval_loss(task.params, task.get_batch(split, rng)))
            if on_batch is not None:
                on_batch(k * eval_iters + i + 1, n_total)
        out[split] = total / eval_iters
    return out


# ---------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------

def _fmt_duration(seconds):
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class _Progress:
    """A live line rewritten with '\\r' on a terminal; plain lines every log_interval otherwise."""

    def __init__(self, log, log_interval):
        self.log = log
        isatty = getattr(sys.stdout, "isatty", None)
        self.tty = log is print and callable(isatty) and bool(isatty())
        self.log_interval = log_interval
        self.live = False
        self._last_draw = 0.0

    def line(self, text):
        """A permanent line (evaluation, checkpoint, notes)."""
        if self.live:
            sys.stdout.write("\n")
            self.live = False
        self.log(text)

    def update(self, text, step, force=False):
        if self.tty:
            now = time.perf_counter()
            if force or now - self._last_draw > 0.1:  # redraw at most ~10 times a second
                sys.stdout.write("\r" + text + "\x1b[K")
                sys.stdout.flush()
                self.live = True
                self._last_draw = now
        elif force or step % self.log_interval == 0:
            self.log(text)

    def close(self):
        if self.live:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self.live = False


class _StopOnInterrupt:
    """Turn the first Ctrl-C into a request to stop after the current step.

    Stopping between steps means the parameters and the optimizer state are
    consistent, so the loop can write a checkpoint and return; a run killed in
    the middle of an update could not be saved safely. A second Ctrl-C raises
    KeyboardInterrupt at once. Only the main thread can own signal handlers;
    elsewhere Ctrl-C keeps its usual meaning.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------

_TASK_ATTRS = ("params", "loss_and_grads", "eval_loss", "get_batch", "tokens_per_batch",
               "model_config", "tokenizer")


def _check_task(task):
    missing = [a for a in _TASK_ATTRS if not hasattr(task, a)]
    if missing:
        raise TypeError(f"task: expected an object with {', '.join(_TASK_ATTRS)}; "
                        f"{type(task).__name__} lacks {', '.join(missing)}")
    if not isinstance(task.params, dict) or not task.params:
        raise TypeError(f"task.params: expected a non-empty dict of arrays, got {type(task.params).__name__}")
    rng = getattr(task, "rng", None)
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise TypeError(f"task.rng: expected a numpy Generator or None, got {type(rng).__name__}")


def _restore_params(params, saved):
    if set(saved) != set(params):
        missing = sorted(set(params) - set(saved))
        extra = sorted(set(saved) - set(params))
        raise ValueError(f"checkpoint: its parameters do not match the task's: missing {missing}, "
                         f"extra {extra}")
    for name, p in params.items():
        a = saved[name]
        if tuple(a.shape) != tuple(p.shape) or a.dtype != p.dtype:
            raise ValueError(f"checkpoint: params[{name!r}] has shape {tuple(a.shape)} and dtype "
                             f"{a.dtype}; the task's is {tuple(p.shape)} {p.dtype}")
    for name, p in params.items():
        # Copy into the existing arrays: the task and the optimizer hold references to them.
        p[...] = array_module(p).asarray(saved[name])


def _check_resume(ck, cfg, task, note):
    saved = ck.get("config") or {}
    diffs = []
    for k in TrainConfig._TRAJECTORY:
        a, b = saved.get(k), cfg.to_dict().get(k)
        if k in saved and a != b:
            diffs.append(f"{k}: checkpoint {a!r}, now {b!r}")
    if diffs:
        raise ValueError("resume: the config differs from the checkpoint's in ways that change training ("
                         + "; ".join(diffs) + "). Use the saved config (load_checkpoint(out_dir)['config']) "
                         "or start a new run.")
    if ck.get("model_config") != task.model_config:
        raise ValueError(f"resume: the task's model_config {task.model_config!r} differs from the "
                         f"checkpoint's {ck.get('model_config')!r}")
    if saved.get("max_steps") not in (None, cfg.max_steps):
        note(f"note: max_steps changed from {saved['max_steps']} to {cfg.max_steps}; the learning-rate "
             f"schedule follows the new value, so this is no longer the same run")


def _rewrite_metrics(out: Path, keep_through_step: int):
    """Drop records after the checkpoint's step: they belong to the part of the run being redone."""
    recs = [r for r in read_metrics(out) if r.get("step", 0) <= keep_through_step]
    text = "".join(json.dumps(r) + "\n" for r in recs)
    _atomic_write(out / METRICS_FILE, lambda f: f.write(text.encode("utf-8")))


def train(task, cfg: TrainConfig | None = None, resume: bool = False, log=print) -> dict:
    """Train ``task`` (see the module docstring) under ``cfg``; return the final metrics.

    resume=True continues from ``cfg.out_dir/checkpoint.npz`` exactly where it was
    written. ``log`` receives every line of text (default print; on a terminal the
    progress line is redrawn in place). Ctrl-C (SIGINT) finishes the current step,
    evaluates, writes a checkpoint and returns with "interrupted": True; a second
    Ctrl-C stops at once. Returns {"step", "train_loss", "val_loss", "best_val_loss",
    "grad_norm", "tokens_per_s", "elapsed_s", "checkpoint", "out_dir", "interrupted"}.
    """
    cfg = TrainConfig() if cfg is None else cfg
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg: expected a TrainConfig, got {type(cfg).__name__}")
    _check_task(task)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = task.params
    opt = make_optimizer(cfg.optimizer, params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                         betas=cfg.betas, eps=cfg.eps, momentum=cfg.momentum)
    data_rng = np.random.default_rng(cfg.seed)
    task_rng = getattr(task, "rng", None)
    progress = _Progress(log, cfg.log_interval)

    step, elapsed_before = 0, 0.0
    last = {"train_loss": None, "val_loss": None, "best_val_loss": None, "grad_norm": None}
    if resume:
        ck = load_checkpoint(out)
        _check_resume(ck, cfg, task, progress.line)
        _restore_params(params, ck["params"])
        if ck["optimizer"] is None:
            raise ValueError(f"resume: {ck['path']} holds no optimizer state, so training cannot "
                             f"continue exactly; start a new run instead")
        opt.load_state_dict(ck["optimizer"])
        rng = ck.get("rng") or {}
        data_rng.bit_generator.state = rng["data"]
        if task_rng is not None and rng.get("task") is not None:
            task_rng.bit_generator.state = rng["task"]
        step = ck["step"]
        m = ck["metrics"]
        elapsed_before = float(m.get("elapsed_s", 0.0))
        last.update({k: m.get(k) for k in last})
        _rewrite_metrics(out, step)
        progress.line(f"resumed {ck['path']} at step {step}/{cfg.max_steps}")
    else:
        if (out / CHECKPOINT_FILE).exists():
            progress.line(f"note: {out / CHECKPOINT_FILE} is from an earlier run and will be "
                          f"overwritten (pass resume=True / --resume to continue it instead)")
        _atomic_write(out / METRICS_FILE, lambda f: None)  # a fresh log for a fresh run

    def snapshot_metrics(elapsed):
        return {**last, "elapsed_s": elapsed}

    def save(step_done, elapsed):
        rng_state = {"data": data_rng.bit_generator.state,
                     "task": task_rng.bit_generator.state if task_rng is not None else None}
        return save_checkpoint(out, params, optimizer=opt, step=step_done, config=cfg,
                               model_config=task.model_config, tokenizer=task.tokenizer,
                               rng_state=rng_state, metrics=snapshot_metrics(elapsed))

    G = cfg.grad_accum_steps
    tokens_per_step = int(task.tokens_per_batch) * G
    t_start = time.perf_counter()
    win_t, win_steps = t_start, 0         # the window tokens/s and the ETA are measured over
    overhead = 0.0                        # seconds spent in evaluation and checkpoints
    tok_s = float("nan")
    ckpt_path = out / CHECKPOINT_FILE if resume else None
    start_step = step
    interrupted = False
    with open(out / METRICS_FILE, "a", encoding="utf-8") as metrics_file, _StopOnInterrupt() as stop:

        def record(rec):
            metrics_file.write(json.dumps(rec) + "\n")
            metrics_file.flush()

        while step < cfg.max_steps:
            lr = lr_schedule(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr)
            opt.lr = lr
            acc, loss_sum = None, 0.0
            for _ in range(G):
                batch = task.get_batch("train", data_rng)
                loss, grads = task.loss_and_grads(params, batch)
                loss = float(loss)
                if not math.isfinite(loss):
                    progress.close()
                    raise FloatingPointError(
                        f"loss is {loss} at step {step}: training diverged. Lower lr (now {lr:.3g}), "
                        f"keep grad_clip on, or resume from the last checkpoint in {out}")
                loss_sum += loss
                acc = grads if G == 1 else accumulate(acc, grads, 1.0 / G)
            grad_norm = clip_grad_norm(acc, cfg.grad_clip) if cfg.grad_clip > 0 else global_norm(acc)
            opt.step(acc)
            step += 1
            win_steps += 1
            train_loss = loss_sum / G
            last["train_loss"], last["grad_norm"] = train_loss, grad_norm
            interrupted = stop.requested and step < cfg.max_steps
            final = step == cfg.max_steps or interrupted  # Ctrl-C: log, evaluate, save, stop

            if step % cfg.log_interval == 0 or final or progress.tty:
                now = time.perf_counter()
                if win_steps and now > win_t:
                    tok_s = tokens_per_step * win_steps / (now - win_t)
                eta = (cfg.max_steps - step) * tokens_per_step / tok_s if tok_s > 0 else float("nan")
                text = (f"step {step}/{cfg.max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | "
                        f"{tok_s:,.0f} tok/s | ETA {_fmt_duration(eta)}")
                progress.update(text, step, force=final)
                if step % cfg.log_interval == 0 or final:
                    record({"kind": "train", "step": step, "loss": train_loss, "lr": lr,
                            "grad_norm": grad_norm, "tokens_per_s": tok_s,
                            "elapsed_s": elapsed_before + now - t_start})
                    win_t, win_steps = now, 0

            t0 = time.perf_counter()
            did_eval = final or (cfg.eval_interval and step % cfg.eval_interval == 0)
            if did_eval:
                def eval_progress(done, total, step=step, t_eval=time.perf_counter()):
                    # a live line on a terminal: nanoGPT-sized evaluations take minutes on a CPU
                    left = (time.perf_counter() - t_eval) * (total - done) / done
                    progress.update(f"eval step {step}: batch {done}/{total} | ETA {_fmt_duration(left)}",
                                    step, force=done == total)

                ev = evaluate(task, cfg.eval_iters, cfg.seed,
                              on_batch=eval_progress if progress.tty else None)
                last["val_loss"] = ev["val"]
                if last["best_val_loss"] is None or ev["val"] < last["best_val_loss"]:
                    last["best_val_loss"] = ev["val"]
                record({"kind": "eval", "step": step, "train_loss": ev["train"], "val_loss": ev["val"]})
                progress.line(f"eval step {step}: train {ev['train']:.4f} | val {ev['val']:.4f}")
            saved_now = final or bool(cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0)
            if saved_now:
                ckpt_path = save(step, elapsed_before + time.perf_counter() - t_start)
            if did_eval or saved_now:
                plot_metrics(out)
                spent = time.perf_counter() - t0
                overhead += spent
                win_t += spent  # keep evaluation and checkpoint time out of tokens/s and the ETA
            if interrupted:
                progress.line(f"interrupted: checkpoint written at step {step}/{cfg.max_steps}; "
                              f"resume=True (--resume) continues from it")
                break
    progress.close()
    elapsed_run = time.perf_counter() - t_start
    trained = step - start_step
    result = {**last, "step": step,
              "tokens_per_s": tokens_per_step * trained / max(elapsed_run - overhead, 1e-9) if trained else 0.0,
              "elapsed_s": elapsed_before + elapsed_run,
              "checkpoint": str(ckpt_path) if ckpt_path is not None else None,
              "out_dir": str(out), "interrupted": interrupted}
    if trained == 0:
        progress.line(f"nothing to do: the checkpoint is at step {step} and max_steps is {cfg.max_steps}")
    return result

