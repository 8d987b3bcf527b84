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
    normalize_model_config (optional)  saved dict -> dict: respells a model_config saved
                                  by an older version before resume compares it

The loop, :func:`train`, in full:

    while step < max_steps:
        train_step(...)               one optimizer step, below
        log the step                  progress line, tokens/s, ETA; a metrics record
        every eval_interval:          evaluate(...): mean train and val loss
        every checkpoint_interval:    save_checkpoint(...)
        after either:                 redraw loss.svg
    (and after the last step, or the step during which Ctrl-C came, all three)

One optimizer step, :func:`train_step`:

    lr = lr_schedule(step)                      warmup, then cosine decay
    batch = task.get_batch("train", rng)        the global batch, batch_size rows
    cut it into world.size x grad_accum_steps micro-batches; this rank takes its K
    for each of its micro-batches:
        loss, grads = task.loss_and_grads(params, micro_batch)
        acc += grads                            in one float64 buffer
    all-reduce acc over the ranks, / (N K)      the gradient of the mean loss
    clip_grad_norm(acc, grad_clip)
    optimizer.step(acc)

With one process and grad_accum_steps 1 the batch goes to loss_and_grads whole.
Under a world of N ranks (minillm.distributed; ``mpiexec -n N``) every rank draws
the same global batch from the same generator and keeps its part, so the data
stream does not depend on N: a run resumes under another number of ranks on the
same batches. Only rank 0 logs, evaluates and writes files; ZeRO (``zero=1|2``)
shards the optimizer state (and the gradients) across the ranks.

Every ``eval_interval`` steps the mean loss over ``eval_iters`` batches of each
split is measured, always on the same batches (a generator seeded afresh for each
evaluation), so successive evaluations are comparable and evaluation never
disturbs the training data stream.

Checkpoint: ``out_dir/checkpoint.npz`` holds the parameters, the optimizer's
buffers and, as one JSON entry, the step, the config, the model config, the
tokenizer, the RNG states and the metrics; it is written atomically (the format
and the writing are in ``checkpoint.py``). Resuming restores every piece of state
the next step depends on (parameters, optimizer buffers and step count, the data
generator, the task's own generator), so the losses continue exactly as in an
uninterrupted run. Ctrl-C lets the current step finish, then evaluates,
checkpoints and returns.

Also in ``out_dir``: ``metrics.jsonl`` (one JSON object per logged step or
evaluation, appended as training goes) and ``loss.svg`` (train and validation
loss against step, drawn by hand in ``plot.py``: no plotting library).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from .backend import (array_module, atomic_write, check_choice, check_int_arg, check_number,
                      check_probability)
# Re-exported: these lived here before checkpoint.py held the native format.
from .checkpoint import (CHECKPOINT_FILE, CHECKPOINT_JSON, FORMAT, FORMAT_VERSION,  # noqa: F401
                         latest_run, load_checkpoint, save_checkpoint)
from . import distributed as dist
from .optim import clip_grad_norm, global_norm, lr_schedule, make_optimizer
from .plot import METRICS_FILE, PLOT_FILE, plot_metrics, read_metrics, write_loss_svg

__all__ = ["TrainConfig", "train", "train_step", "evaluate", "save_checkpoint", "load_checkpoint",
           "latest_run", "read_metrics", "write_loss_svg", "plot_metrics", "CHECKPOINT_FILE",
           "METRICS_FILE", "PLOT_FILE"]


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Everything that decides a training run (the model's own config lives with the task).

    Intervals count optimizer steps; an interval of 0 means "only at the end".
    grad_clip <= 0 disables clipping. batch_size is the global batch of one
    optimizer step: the task's get_batch returns that many rows, which the loop
    cuts into (ranks x grad_accum_steps) equal micro-batches, so it must divide by
    both. batch_size, block_size, data and
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
                   "grad_clip", "betas", "eps", "optimizer", "momentum", "seed", "data", "val_fraction")
    # Not grad_accum_steps: the global batch is drawn whole and then cut, so how many pieces
    # it is cut into (ranks x grad_accum_steps) changes only the gradient's round-off (and which
    # dropout masks are drawn); a resumed run may change it, and is told so.
    _POSITIVE_INTS = ("max_steps", "batch_size", "block_size", "eval_iters", "log_interval",
                      "grad_accum_steps")
    _NON_NEGATIVE_INTS = ("warmup_steps", "eval_interval", "checkpoint_interval", "seed")
    _NON_NEGATIVE_NUMBERS = ("lr", "min_lr", "weight_decay", "eps", "momentum")

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.grad_clip is None:
            self.grad_clip = 0.0
        _check_train_config(self)
        for name in self._POSITIVE_INTS + self._NON_NEGATIVE_INTS + self._NON_NEGATIVE_NUMBERS + (
                "grad_clip", "val_fraction"):
            setattr(self, name, _plain(getattr(self, name)))
        self.out_dir = str(self.out_dir)
        if self.data is not None:
            self.data = str(self.data)

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


def _check_field(name, value, check, want):
    """Run ``check(name, value)``, one of backend's shared checks; a failure becomes
    "NAME: expected WANT, got VALUE", the wording TrainConfig has always used (the CLI
    shows it and tests match it, so it stays even where backend words it differently)."""
    try:
        check(name, value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {want}, got {value!r}") from None


def _check_pair_of_probabilities(name, pair):
    if len(pair) != 2:
        raise ValueError(f"{name}: expected 2 values, got {len(pair)}")
    for i, p in enumerate(pair):
        check_probability(f"{name}[{i}]", p)


def _check_train_config(cfg) -> None:
    """ValueError naming the first field of ``cfg`` that is out of range."""
    for name in cfg._POSITIVE_INTS:
        _check_field(name, getattr(cfg, name), partial(check_int_arg, lo=1), "an int >= 1")
    for name in cfg._NON_NEGATIVE_INTS:
        _check_field(name, getattr(cfg, name), partial(check_int_arg, lo=0), "an int >= 0")
    for name in cfg._NON_NEGATIVE_NUMBERS:
        _check_field(name, getattr(cfg, name), partial(check_number, lo=0.0), "a finite number >= 0")
    if cfg.min_lr > cfg.lr:
        raise ValueError(f"min_lr: expected at most lr ({cfg.lr}), got {cfg.min_lr}")
    _check_field("grad_clip", cfg.grad_clip, check_number, "a finite number (<= 0 disables)")
    _check_field("betas", cfg.betas, _check_pair_of_probabilities, "a pair in [0, 1)")
    _check_field("optimizer", cfg.optimizer,
                 lambda name, v: check_choice(name, str(v).lower(), ("adamw", "adam", "sgd")),
                 "'adamw', 'adam' or 'sgd'")
    _check_field("val_fraction", cfg.val_fraction,
                 partial(check_number, lo=0.0, hi=1.0, lo_open=True, hi_open=True), "a number in (0, 1)")


def _plain(value):
    """A NumPy scalar as the Python number it holds (checkpoints store the config as JSON,
    which has no NumPy types); anything else unchanged."""
    return value.item() if isinstance(value, np.generic) else value


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
# Progress: the line the user watches, tokens/s and the ETA
# ---------------------------------------------------------------------------

def _fmt_duration(seconds):
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class _Progress:
    """What the user sees while a run trains, and the clock behind it.

    On a terminal a live line is rewritten with '\\r'; otherwise a plain line is
    logged every log_interval steps. Tokens/s is measured over the steps since the
    last logged one, with the time spent evaluating and checkpointing taken out
    (:meth:`paused`); the ETA is the steps left at that rate.
    """

    def __init__(self, log, log_interval, max_steps, tokens_per_step):
        self.log = log
        isatty = getattr(sys.stdout, "isatty", None)
        self.tty = log is print and callable(isatty) and bool(isatty())
        self.log_interval, self.max_steps, self.tokens_per_step = log_interval, max_steps, tokens_per_step
        self.live = False
        self._last_draw = 0.0
        self.start_clock(0.0)

    def start_clock(self, elapsed_before):
        """Start timing the run (``elapsed_before``: seconds a resumed run had trained already)."""
        self.elapsed_before = elapsed_before
        self.t_start = time.perf_counter()
        self.window_start, self.window_steps = self.t_start, 0   # tokens/s is measured over this window
        self.paused_s = 0.0                                      # seconds spent evaluating and saving
        self.tokens_per_s = float("nan")

    def elapsed(self):
        """Seconds the run has trained, earlier sessions included."""
        return self.elapsed_before + time.perf_counter() - self.t_start

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

    def step_done(self, step, loss, lr, final) -> dict | None:
        """Count a finished step and show it when due. -> {"tokens_per_s", "elapsed_s"} for
        the metrics record when the step is one to log (every log_interval, and the final
        one), else None."""
        self.window_steps += 1
        logged = step % self.log_interval == 0 or final
        if not (logged or self.tty):
            return None
        now = time.perf_counter()
        if self.window_steps and now > self.window_start:
            self.tokens_per_s = self.tokens_per_step * self.window_steps / (now - self.window_start)
        rate = self.tokens_per_s
        eta = (self.max_steps - step) * self.tokens_per_step / rate if rate > 0 else float("nan")
        self.update(f"step {step}/{self.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                    f"{rate:,.0f} tok/s | ETA {_fmt_duration(eta)}", step, force=final)
        if not logged:
            return None
        self.window_start, self.window_steps = now, 0
        return {"tokens_per_s": rate, "elapsed_s": self.elapsed_before + now - self.t_start}

    @contextmanager
    def paused(self):
        """Time spent inside (evaluation, checkpoints) counts neither in tokens/s nor in the ETA."""
        t0 = time.perf_counter()
        yield
        spent = time.perf_counter() - t0
        self.paused_s += spent
        self.window_start += spent

    def eval_batches(self, step):
        """``on_batch`` for evaluate(): a live "eval step N: batch i/n | ETA" line on a terminal
        (nanoGPT-sized evaluations take minutes on a CPU); None elsewhere."""
        if not self.tty:
            return None
        t_eval = time.perf_counter()

        def on_batch(done, total):
            left = (time.perf_counter() - t_eval) * (total - done) / done
            self.update(f"eval step {step}: batch {done}/{total} | ETA {_fmt_duration(left)}",
                        step, force=done == total)
        return on_batch

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
# Starting a run: fresh, or restored from its checkpoint
# ---------------------------------------------------------------------------

_TASK_ATTRS = ("params", "loss_and_grads", "eval_loss", "get_batch", "tokens_per_batch",
               "model_config", "tokenizer")


def _check_train_args(task, cfg, world, zero) -> tuple[TrainConfig, int]:
    cfg = TrainConfig() if cfg is None else cfg
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg: expected a TrainConfig, got {type(cfg).__name__}")
    if not isinstance(world, dist.World):
        raise TypeError(f"world: expected a distributed.World, got {type(world).__name__}")
    zero = dist.check_zero(zero)
    parts = world.size * cfg.grad_accum_steps
    if cfg.batch_size % parts:
        raise ValueError(f"batch_size: expected a global batch divisible by ranks x grad_accum_steps = "
                         f"{world.size} x {cfg.grad_accum_steps} = {parts}, got {cfg.batch_size}")
    missing = [a for a in _TASK_ATTRS if not hasattr(task, a)]
    if missing:
        raise TypeError(f"task: expected an object with {', '.join(_TASK_ATTRS)}; "
                        f"{type(task).__name__} lacks {', '.join(missing)}")
    if not isinstance(task.params, dict) or not task.params:
        raise TypeError(f"task.params: expected a non-empty dict of arrays, got {type(task.params).__name__}")
    rng = getattr(task, "rng", None)
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise TypeError(f"task.rng: expected a numpy Generator or None, got {type(rng).__name__}")
    return cfg, zero


@dataclass
class _Run:
    """A run between two steps: everything the next step, evaluation and checkpoint read."""
    task: object
    cfg: TrainConfig
    out: Path                          # the run directory
    optimizer: object
    data_rng: np.random.Generator      # draws the training batches
    task_rng: np.random.Generator | None   # the task's own (dropout), or None
    progress: _Progress
    step: int = 0                      # optimizer steps done
    start_step: int = 0                # the step this session started from
    checkpoint: Path | None = None     # the latest checkpoint written (or resumed from)
    metrics_file: object = None        # metrics.jsonl, open for appending while the loop runs
    world: object = None               # distributed.World: this rank among how many
    reducer: object = None             # distributed.GradReducer, when there are micro-batches to sum
    # The latest of each, saved in checkpoints and returned by train():
    last: dict = dataclasses.field(default_factory=lambda: {
        "train_loss": None, "val_loss": None, "best_val_loss": None, "grad_norm": None})

    @property
    def writer(self) -> bool:
        """True on the rank that writes files and logs (rank 0)."""
        return self.world.rank == 0

    def record(self, rec: dict) -> None:
        """Append one record to metrics.jsonl (flushed: a crash loses at most the line being written)."""
        if not self.writer:
            return
        self.metrics_file.write(json.dumps(rec) + "\n")
        self.metrics_file.flush()


def _start_run(task, cfg, resume, log, world, zero) -> _Run:
    out = Path(cfg.out_dir)
    if world.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps, momentum=cfg.momentum)
    optimizer = (dist.ZeroOptimizer(cfg.optimizer, task.params, world, **kw) if zero
                 else make_optimizer(cfg.optimizer, task.params, **kw))
    progress = _Progress(log, cfg.log_interval, cfg.max_steps, int(task.tokens_per_batch))
    parts = world.size * cfg.grad_accum_steps
    run = _Run(task, cfg, out, optimizer, np.random.default_rng(cfg.seed), getattr(task, "rng", None),
               progress, world=world,
               reducer=dist.GradReducer(task.params, world, zero) if parts > 1 else None)
    elapsed_before = _restore_run(run) if resume else _start_fresh(run)
    dist.broadcast_params(task.params, world)      # every rank starts from rank 0's parameters
    progress.start_clock(elapsed_before)
    return run


def _start_fresh(run) -> float:
    if not run.writer:
        return 0.0
    if (run.out / CHECKPOINT_FILE).exists():
        run.progress.line(f"note: {run.out / CHECKPOINT_FILE} is from an earlier run and will be "
                          f"overwritten (pass resume=True / --resume to continue it instead)")
    atomic_write(run.out / METRICS_FILE, lambda f: None)  # a fresh log for a fresh run
    return 0.0


def _restore_run(run) -> float:
    """Load ``run.out``'s checkpoint into the run; -> the seconds it had trained."""
    ck = load_checkpoint(run.out)
    _check_resume(ck, run.cfg, run.task, run.progress.line)
    _restore_params(run.task.params, ck["params"])
    if ck["optimizer"] is None:
        raise ValueError(f"resume: {ck['path']} holds no optimizer state, so training cannot "
                         f"continue exactly; start a new run instead")
    run.optimizer.load_state_dict(ck["optimizer"])
    rng = ck.get("rng") or {}
    run.data_rng.bit_generator.state = rng["data"]
    if run.task_rng is not None and rng.get("task") is not None:
        run.task_rng.bit_generator.state = rng["task"]
    run.step = run.start_step = ck["step"]
    parts = run.world.size * run.cfg.grad_accum_steps
    saved_parts = ck["metrics"].get("micro_batches", parts)
    if parts != saved_parts:
        run.progress.line(f"note: the global batch is now cut into {parts} micro-batches (ranks x grad_accum_steps), "
                          f"{saved_parts} before: the same batches, gradients equal to round-off (dropout "
                          f"masks differ)")
    run.last.update({k: ck["metrics"].get(k) for k in run.last})
    run.checkpoint = run.out / CHECKPOINT_FILE
    if run.writer:
        _rewrite_metrics(run.out, run.step)
    run.progress.line(f"resumed {ck['path']} at step {run.step}/{run.cfg.max_steps}")
    return float(ck["metrics"].get("elapsed_s", 0.0))


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
    saved_model = ck.get("model_config")
    normalize = getattr(task, "normalize_model_config", None)
    if normalize is not None and saved_model is not None:
        saved_model = normalize(saved_model)       # a run saved under older field names
    if saved_model != task.model_config:
        raise ValueError(f"resume: the task's model_config {task.model_config!r} differs from the "
                         f"checkpoint's {ck.get('model_config')!r}")
    if saved.get("max_steps") not in (None, cfg.max_steps):
        note(f"note: max_steps changed from {saved['max_steps']} to {cfg.max_steps}; the learning-rate "
             f"schedule follows the new value, so this is no longer the same run")


def _rewrite_metrics(out: Path, keep_through_step: int):
    """Drop records after the checkpoint's step: they belong to the part of the run being redone."""
    recs = [r for r in read_metrics(out) if r.get("step", 0) <= keep_through_step]
    text = "".join(json.dumps(r) + "\n" for r in recs)
    atomic_write(out / METRICS_FILE, lambda f: f.write(text.encode("utf-8")))


# ---------------------------------------------------------------------------
# The loop: a step, an evaluation, a checkpoint
# ---------------------------------------------------------------------------

def split_batch(batch, parts: int) -> list:
    """A batch cut into ``parts`` equal micro-batches along its first axis: a tuple (or list)
    of arrays is cut array by array, an array directly. ValueError if the rows do not divide."""
    arrays = list(batch) if isinstance(batch, (tuple, list)) else [batch]
    rows = int(arrays[0].shape[0])
    if rows % parts or any(int(a.shape[0]) != rows for a in arrays):
        raise ValueError(f"batch_size: expected a batch whose {rows} rows divide into {parts} equal "
                         f"micro-batches (ranks x grad_accum_steps), got rows "
                         f"{[int(a.shape[0]) for a in arrays]}")
    n = rows // parts
    cut = [[a[i * n:(i + 1) * n] for a in arrays] for i in range(parts)]
    return [type(batch)(c) if isinstance(batch, (tuple, list)) else c[0] for c in cut]


def _reseed_task_rng(task_rng, base, m):
    """Micro-batch m of a step draws dropout from a generator seeded by (base, m), base drawn
    once per step from the task's generator: which rank computes m then does not matter.
    After the step the generator is seeded by (base, number of micro-batches) on every rank."""
    if task_rng is not None:
        task_rng.bit_generator.state = np.random.default_rng([base, m]).bit_generator.state


def _micro_loss_and_grads(task, micro, step, lr, cfg):
    loss, grads = task.loss_and_grads(task.params, micro)
    loss = float(loss)
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"loss is {loss} at step {step}: training diverged. Lower lr (now {lr:.3g}), "
            f"keep grad_clip on, or resume from the last checkpoint in {Path(cfg.out_dir)}")
    return loss, grads


def train_step(task, optimizer, data_rng, cfg: TrainConfig, step: int, world=None,
               reducer=None) -> tuple[float, float, float]:
    """One optimizer step from ``step`` steps done -> (train loss, gradient norm, lr).

    The loss is the mean over the global batch's micro-batches; the norm is the
    gradient's global norm before clipping. A non-finite loss is FloatingPointError.
    ``world`` (default: a world of one) and ``reducer`` (a distributed.GradReducer,
    made here when None) say how micro-batch gradients are summed across ranks.
    """
    lr = lr_schedule(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr)
    optimizer.lr = lr
    world = dist.world_of_one() if world is None else world
    k, parts = cfg.grad_accum_steps, world.size * cfg.grad_accum_steps
    batch = task.get_batch("train", data_rng)
    if parts == 1:                                   # one process, one micro-batch: no buffer needed
        loss, grads = _micro_loss_and_grads(task, batch, step, lr, cfg)
        grad_norm = clip_grad_norm(grads, cfg.grad_clip) if cfg.grad_clip > 0 else global_norm(grads)
        optimizer.step(grads)
        return loss, grad_norm, lr
    reducer = dist.GradReducer(task.params, world) if reducer is None else reducer
    task_rng = getattr(task, "rng", None)
    base = int(task_rng.integers(2**63)) if task_rng is not None else 0
    mine = split_batch(batch, parts)[world.rank * k:(world.rank + 1) * k]
    reducer.begin()
    loss_sum = 0.0
    for i, micro in enumerate(mine):
        _reseed_task_rng(task_rng, base, world.rank * k + i)
        loss, grads = _micro_loss_and_grads(task, micro, step, lr, cfg)
        loss_sum += loss
        reducer.add(grads)
        del grads
    _reseed_task_rng(task_rng, base, parts)          # every rank leaves the step in the same state
    grads = reducer.finish(parts)                    # the mean gradient (this rank's shard under ZeRO)
    loss_sum = float(world.allreduce_(np.array([loss_sum]))[0])
    if reducer.zero:
        grad_norm = (dist.clip_grad_norm_sharded(grads, cfg.grad_clip, world, reducer.layout)
                     if cfg.grad_clip > 0 else dist.sharded_global_norm(grads, world, reducer.layout))
    else:
        grad_norm = clip_grad_norm(grads, cfg.grad_clip) if cfg.grad_clip > 0 else global_norm(grads)
    optimizer.step(grads)
    return loss_sum / parts, grad_norm, lr


def _evaluate_now(run) -> None:
    """Measure both splits, log them and keep the best validation loss."""
    ev = evaluate(run.task, run.cfg.eval_iters, run.cfg.seed, on_batch=run.progress.eval_batches(run.step))
    run.last["val_loss"] = ev["val"]
    if run.last["best_val_loss"] is None or ev["val"] < run.last["best_val_loss"]:
        run.last["best_val_loss"] = ev["val"]
    run.record({"kind": "eval", "step": run.step, "train_loss": ev["train"], "val_loss": ev["val"]})
    run.progress.line(f"eval step {run.step}: train {ev['train']:.4f} | val {ev['val']:.4f}")


def _save_now(run) -> Path:
    """A checkpoint of everything the next step depends on; -> its path. Every rank calls it
    (a sharded optimizer gathers its state); rank 0 writes."""
    state = run.optimizer.state_dict()
    if not run.writer:
        return run.out / CHECKPOINT_FILE
    rng_state = {"data": run.data_rng.bit_generator.state,
                 "task": run.task_rng.bit_generator.state if run.task_rng is not None else None}
    return save_checkpoint(run.out, run.task.params, optimizer=state, step=run.step, config=run.cfg,
                           model_config=run.task.model_config, tokenizer=run.task.tokenizer,
                           rng_state=rng_state, metrics={**run.last, "elapsed_s": run.progress.elapsed(),
                                                         "micro_batches": run.world.size * run.cfg.grad_accum_steps})


def _every(interval, step) -> bool:
    return bool(interval) and step % interval == 0


def _evaluate_and_save_if_due(run, final) -> None:
    """At the intervals, and always at the end: evaluate, checkpoint, redraw loss.svg."""
    due_eval = final or _every(run.cfg.eval_interval, run.step)
    due_save = final or _every(run.cfg.checkpoint_interval, run.step)
    if due_eval or due_save:
        with run.progress.paused():
            if due_eval and run.writer:
                _evaluate_now(run)
            if due_save:
                run.checkpoint = _save_now(run)
                run.world.barrier()      # no rank runs ahead of a checkpoint being written
            if run.writer:
                plot_metrics(run.out)


def train(task, cfg: TrainConfig | None = None, resume: bool = False, log=print, world=None,
          zero: int = 0) -> dict:
    """Train ``task`` (see the module docstring) under ``cfg``; return the final metrics.

    resume=True continues from ``cfg.out_dir/checkpoint.npz`` exactly where it was
    written. ``log`` receives every line of text (default print; on a terminal the
    progress line is redrawn in place). Ctrl-C (SIGINT) finishes the current step,
    evaluates, writes a checkpoint and returns with "interrupted": True; a second
    Ctrl-C stops at once. Returns {"step", "train_loss", "val_loss", "best_val_loss",
    "grad_norm", "tokens_per_s", "elapsed_s", "checkpoint", "out_dir", "interrupted"}.

    ``world``: a distributed.World (default: a world of one). Every rank calls train
    with the same task and cfg; rank 0 alone logs, evaluates and writes. ``zero``: 0
    (DDP), 1 or 2 (ZeRO stage). A rank that fails prints its error and ends every
    rank (MPI_Abort); checkpoints are written atomically, so the last complete one
    stays intact.
    """
    world = dist.world_of_one() if world is None else world
    cfg, zero = _check_train_args(task, cfg, world, zero)
    if world.rank != 0:
        log = _quiet
    try:
        return _train(task, cfg, resume, log, world, zero)
    except BaseException as e:
        if world.size == 1:
            raise
        print(f"minillm: rank {world.rank} of {world.size} failed: {type(e).__name__}: {e}; ending every "
              f"rank. The last complete checkpoint in {cfg.out_dir} is intact (--resume continues from it).",
              file=sys.stderr, flush=True)
        world.abort(1)


def _quiet(_line):
    pass


def _train(task, cfg, resume, log, world, zero) -> dict:
    run = _start_run(task, cfg, resume, log, world, zero)
    interrupted = False
    metrics_path = run.out / METRICS_FILE if run.writer else os.devnull
    with open(metrics_path, "a", encoding="utf-8") as metrics_file, _StopOnInterrupt() as stop:
        run.metrics_file = metrics_file
        try:
            while run.step < cfg.max_steps:
                train_loss, grad_norm, lr = train_step(task, run.optimizer, run.data_rng, cfg, run.step,
                                                       world, run.reducer)
                run.step += 1
                run.last.update(train_loss=train_loss, grad_norm=grad_norm)
                requested = float(world.allreduce_(np.array([float(stop.requested)]))[0]) > 0
                interrupted = requested and run.step < cfg.max_steps   # every rank agrees
                final = run.step == cfg.max_steps or interrupted   # Ctrl-C: log, evaluate, save, stop
                timing = run.progress.step_done(run.step, train_loss, lr, final)
                if timing is not None:
                    run.record({"kind": "train", "step": run.step, "loss": train_loss, "lr": lr,
                                "grad_norm": grad_norm, **timing})
                _evaluate_and_save_if_due(run, final)
                if interrupted:
                    run.progress.line(f"interrupted: checkpoint written at step {run.step}/{cfg.max_steps}; "
                                      f"resume=True (--resume) continues from it")
                    break
        finally:
            run.progress.close()
    return _result(run, interrupted)


def _result(run, interrupted) -> dict:
    seconds = time.perf_counter() - run.progress.t_start
    trained = run.step - run.start_step
    tokens_per_s = (run.progress.tokens_per_step * trained / max(seconds - run.progress.paused_s, 1e-9)
                    if trained else 0.0)
    if trained == 0:
        run.progress.line(f"nothing to do: the checkpoint is at step {run.step} and max_steps is "
                          f"{run.cfg.max_steps}")
    return {**run.last, "step": run.step, "tokens_per_s": tokens_per_s,
            "elapsed_s": run.progress.elapsed_before + seconds,
            "checkpoint": str(run.checkpoint) if run.checkpoint is not None else None,
            "out_dir": str(run.out), "interrupted": interrupted}
