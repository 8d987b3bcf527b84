"""train.py: the loop on a toy task (softmax regression with input dropout), checkpoints, resume."""
import json
import os
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import np_, on
from minillm import backprop as bp
from minillm import checkpoint
from minillm import train as tr
from minillm.train import TrainConfig


class ToyTask:
    """Softmax regression: logits = dropout(x) @ w + bias, cross-entropy loss.

    Data and initial weights come from separate seeds, so a resumed run can start
    from different weights (the checkpoint must overwrite them). Dropout draws from
    ``self.rng``, the task's own generator, which the loop checkpoints too.
    """

    def __init__(self, xp, data_seed=0, init_seed=0, D=6, C=4, N=96, B=8, p_drop=0.2, dtype=np.float32):
        r = np.random.default_rng(data_seed)
        W = r.standard_normal((D, C)) * 2
        self.X, self.Y = {}, {}
        for split in ("train", "val"):
            x = r.standard_normal((N, D))
            self.X[split] = on(xp, x.astype(dtype))
            self.Y[split] = on(xp, np.argmax(x @ W + 0.3 * r.standard_normal((N, C)), axis=1))
        ri = np.random.default_rng(1000 + init_seed)
        self.params = {"w": on(xp, (0.1 * ri.standard_normal((D, C))).astype(dtype)),
                       "bias": on(xp, np.zeros(C, dtype))}
        self.B, self.p_drop, self.N, self.xp = B, p_drop, N, xp
        self.rng = np.random.default_rng(5)
        self.tokens_per_batch = B
        self.model_config = {"kind": "softmax-regression", "D": D, "C": C}
        self.tokenizer = None

    def get_batch(self, split, rng):
        i = self.xp.asarray(rng.integers(0, self.N, size=self.B))  # drawn on the CPU by the loop's generator
        return self.X[split][i], self.Y[split][i]

    def loss_and_grads(self, params, batch):
        x, y = batch
        xd, dcache = bp.dropout_forward(x, self.p_drop, self.rng)
        loss, cache = bp.softmax_cross_entropy_forward(xd @ params["w"] + params["bias"], y)
        d = bp.softmax_cross_entropy_backward(1.0, cache)
        return loss, {"w": xd.T @ d, "bias": d.sum(0)}

    def eval_loss(self, params, batch):
        x, y = batch
        return bp.softmax_cross_entropy_forward(x @ params["w"] + params["bias"], y)[0]


class CrashingTask(ToyTask):
    """Dies (like a killed process) in its ``crash_at``-th call of loss_and_grads."""

    def __init__(self, xp, crash_at, **kw):
        super().__init__(xp, **kw)
        self.crash_at, self.calls = crash_at, 0

    def loss_and_grads(self, params, batch):
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt("simulated crash")
        return super().loss_and_grads(params, batch)


def config(out_dir, **kw):
    base = dict(max_steps=12, batch_size=8, block_size=1, lr=0.5, min_lr=0.05, warmup_steps=3,
                weight_decay=0.1, grad_clip=0.5, eval_interval=4, eval_iters=2, log_interval=1,
                checkpoint_interval=4, grad_accum_steps=2, seed=3, out_dir=str(out_dir))
    base.update(kw)
    return TrainConfig(**base)


def records(out_dir, kind):
    recs = [r for r in tr.read_metrics(out_dir) if r["kind"] == kind]
    drop = ("tokens_per_s", "elapsed_s")  # wall-clock measurements differ between runs
    return [{k: v for k, v in r.items() if k not in drop} for r in recs]


def quiet(_line):
    pass


# --- the loop -------------------------------------------------------------------------

def test_training_writes_checkpoint_metrics_and_plot_and_learns(xp, tmp_path):
    task = ToyTask(xp)
    before = tr.evaluate(task, 4, seed=0)["val"]
    lines = []
    res = tr.train(task, config(tmp_path / "run", max_steps=20, log_interval=5, eval_interval=10), log=lines.append)
    assert res["step"] == 20 and res["val_loss"] < before
    assert {"checkpoint.npz", "checkpoint.json", "metrics.jsonl", "loss.svg"} <= set(os.listdir(tmp_path / "run"))
    assert not [n for n in os.listdir(tmp_path / "run") if n.endswith(".tmp")]
    progress = [ln for ln in lines if ln.startswith("step ")]
    assert len(progress) == 4  # a plain line every log_interval steps when not on a terminal
    pat = r"step (\d+)/20 \| loss \d+\.\d{4} \| lr \d\.\d\de[-+]\d\d \| [\d,]+ tok/s \| ETA (\d\d:)?\d\d:\d\d"
    assert [int(re.fullmatch(pat, ln).group(1)) for ln in progress] == [5, 10, 15, 20]
    assert sum(ln.startswith("eval step") for ln in lines) == 2
    trains, evals = records(tmp_path / "run", "train"), records(tmp_path / "run", "eval")
    assert [r["step"] for r in trains] == [5, 10, 15, 20] and [r["step"] for r in evals] == [10, 20]
    assert trains[-1]["loss"] == pytest.approx(res["train_loss"])
    svg = ET.parse(tmp_path / "run" / "loss.svg").getroot()   # well-formed XML
    ns = "{http://www.w3.org/2000/svg}"
    assert len(svg.findall(f"{ns}polyline")) == 2                # train and val curves
    assert {"train", "val"} <= {t.text for t in svg.findall(f"{ns}text")}
    ck = tr.load_checkpoint(tmp_path / "run")
    assert ck["step"] == 20 and ck["optimizer"]["t"] == 20
    assert ck["model_config"] == task.model_config and ck["config"]["lr"] == 0.5
    for k, p in task.params.items():
        assert np.array_equal(ck["params"][k], np_(p)) and ck["params"][k].dtype == p.dtype


def test_on_a_terminal_the_progress_line_is_rewritten_in_place(xp, tmp_path, monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    tr.train(ToyTask(xp), config(tmp_path, max_steps=8, eval_interval=4, log_interval=100), log=print)
    out = term.getvalue()
    assert "\rstep " in out and "\rstep 8/8 | loss" in out       # redrawn with a carriage return
    lines = out.split("\n")
    assert any(ln.startswith("eval step 4") for ln in lines)      # evaluations get their own lines
    assert out.endswith("\n")                                     # the live line is closed at the end
    assert len(records(tmp_path, "train")) == 1                   # the log still follows log_interval


def test_resume_after_a_crash_gives_the_same_losses_as_an_uninterrupted_run(xp, tmp_path):
    tr.train(ToyTask(xp), config(tmp_path / "a"), log=quiet)
    # Crash while fetching the second micro-batch of step 10: the last checkpoint is step 8,
    # and metrics for steps 9 (and the first half of 10) were already written.
    with pytest.raises(KeyboardInterrupt):
        tr.train(CrashingTask(xp, crash_at=2 * 9 + 2), config(tmp_path / "b"), log=quiet)
    assert tr.load_checkpoint(tmp_path / "b")["step"] == 8
    fresh = ToyTask(xp, init_seed=7)  # different starting weights: the checkpoint must replace them
    fresh.rng = np.random.default_rng(12345)  # and a different dropout stream
    lines = []
    res = tr.train(fresh, config(tmp_path / "b"), resume=True, log=lines.append)
    assert lines[0].startswith("resumed") and "step 8/12" in lines[0]
    assert res["step"] == 12
    assert records(tmp_path / "b", "train") == records(tmp_path / "a", "train")  # bit-exact losses, lr, norms
    assert records(tmp_path / "b", "eval") == records(tmp_path / "a", "eval")
    a, b = tr.load_checkpoint(tmp_path / "a"), tr.load_checkpoint(tmp_path / "b")
    for k in a["params"]:
        assert np.array_equal(a["params"][k], b["params"][k])
    assert a["rng"] == b["rng"]


def test_ctrl_c_finishes_the_step_saves_and_resumes_exactly(xp, tmp_path):
    import signal
    tr.train(ToyTask(xp), config(tmp_path / "a"), log=quiet)
    task = ToyTask(xp)
    inner = task.loss_and_grads
    calls = []

    def press_ctrl_c_during_step_6(params, batch):
        calls.append(1)
        if len(calls) == 2 * 5 + 1:  # the first micro-batch of step 6
            os.kill(os.getpid(), signal.SIGINT)
        return inner(params, batch)

    task.loss_and_grads = press_ctrl_c_during_step_6
    lines = []
    res = tr.train(task, config(tmp_path / "b"), log=lines.append)
    assert res["interrupted"] and res["step"] == 6 and len(calls) == 12  # the step was completed
    assert tr.load_checkpoint(tmp_path / "b")["step"] == 6               # off the checkpoint interval
    assert any(ln.startswith("interrupted: checkpoint written at step 6/12") for ln in lines)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    res = tr.train(ToyTask(xp), config(tmp_path / "b"), resume=True, log=quiet)
    assert not res["interrupted"] and res["step"] == 12
    assert records(tmp_path / "b", "train") == records(tmp_path / "a", "train")


def test_an_interrupted_checkpoint_write_never_corrupts_the_latest(xp, tmp_path, monkeypatch):
    task = ToyTask(xp)
    first = {k: np_(v).copy() for k, v in task.params.items()}
    tr.save_checkpoint(tmp_path, task.params, step=1, config=config(tmp_path), model_config=task.model_config)
    real = checkpoint._write_arrays

    def dies_midway(f, arrays):  # write half of a real checkpoint, then fail like a full disk
        import io
        buf = io.BytesIO()
        real(buf, arrays)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError("No space left on device (simulated)")

    monkeypatch.setattr(checkpoint, "_write_arrays", dies_midway)
    for p in task.params.values():
        p += 1.0
    with pytest.raises(OSError, match="simulated"):
        tr.save_checkpoint(tmp_path, task.params, step=2, model_config=task.model_config)
    ck = tr.load_checkpoint(tmp_path)  # the previous checkpoint, whole
    assert ck["step"] == 1
    for k in first:
        assert np.array_equal(ck["params"][k], first[k])
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.json", "checkpoint.npz"]  # temp file cleaned up


def test_a_crash_inside_the_loops_checkpoint_write_then_resume_is_still_exact(xp, tmp_path, monkeypatch):
    tr.train(ToyTask(xp), config(tmp_path / "a"), log=quiet)
    real, calls = checkpoint._write_arrays, []

    def fail_third(f, arrays):
        calls.append(1)
        if len(calls) == 3:  # the step-12 checkpoint
            f.write(b"PK\x03\x04 half a zip")
            raise KeyboardInterrupt("killed while writing")
        real(f, arrays)

    monkeypatch.setattr(checkpoint, "_write_arrays", fail_third)
    with pytest.raises(KeyboardInterrupt):
        tr.train(ToyTask(xp), config(tmp_path / "b"), log=quiet)
    monkeypatch.setattr(checkpoint, "_write_arrays", real)
    assert tr.load_checkpoint(tmp_path / "b")["step"] == 8
    tr.train(ToyTask(xp), config(tmp_path / "b"), resume=True, log=quiet)
    assert records(tmp_path / "b", "train") == records(tmp_path / "a", "train")


def test_non_finite_loss_stops_with_a_clear_error(xp, tmp_path):
    task = ToyTask(xp)
    task.loss_and_grads = lambda params, batch: (float("nan"), {k: xp.zeros_like(v) for k, v in params.items()})
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 0: training diverged. Lower lr"):
        tr.train(task, config(tmp_path), log=quiet)


def test_resume_refuses_a_different_config_or_a_missing_checkpoint(xp, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint: no checkpoint.npz in"):
        tr.train(ToyTask(xp), config(tmp_path), resume=True, log=quiet)
    tr.train(ToyTask(xp), config(tmp_path, max_steps=4), log=quiet)
    with pytest.raises(ValueError, match=r"resume: the config differs .*lr: checkpoint 0.5, now 0.3"):
        tr.train(ToyTask(xp), config(tmp_path, max_steps=4, lr=0.3), resume=True, log=quiet)
    other = ToyTask(xp)
    other.model_config = {"kind": "something else"}
    with pytest.raises(ValueError, match="resume: the task's model_config"):
        tr.train(other, config(tmp_path, max_steps=4), resume=True, log=quiet)
    lines = []
    res = tr.train(ToyTask(xp), config(tmp_path, max_steps=4), resume=True, log=lines.append)
    assert res["step"] == 4 and "nothing to do" in lines[-1]


# --- checkpoints ------------------------------------------------------------------------

class CharTok:
    def to_dict(self):
        return {"type": "char", "chars": "ab\n"}


def test_checkpoint_round_trip_keeps_everything(xp, tmp_path):
    from minillm.optim import AdamW
    params = {"h.0.w": on(xp, np.arange(6, dtype=np.float32).reshape(2, 3)),
              "h.0.bias": on(xp, np.ones(3, np.float64))}
    opt = AdamW(params, lr=0.1)
    opt.step({k: xp.ones_like(v) for k, v in params.items()})
    path = tr.save_checkpoint(tmp_path, params, optimizer=opt, step=5, config=TrainConfig(out_dir="x"),
                              model_config={"n_layer": 1}, tokenizer=CharTok(), rng_state={"data": 1},
                              metrics={"val_loss": 1.5})
    assert path == tmp_path / "checkpoint.npz"
    for where in (tmp_path, path):  # a run directory or the file itself
        ck = tr.load_checkpoint(where)
        assert ck["step"] == 5 and list(ck["params"]) == ["h.0.w", "h.0.bias"]
        assert ck["params"]["h.0.w"].dtype == np.float32 and ck["params"]["h.0.bias"].dtype == np.float64
        assert np.array_equal(ck["params"]["h.0.w"], np_(params["h.0.w"]))
        assert ck["tokenizer"] == {"type": "char", "chars": "ab\n"} and ck["model_config"] == {"n_layer": 1}
        assert TrainConfig.from_dict(ck["config"]) == TrainConfig(out_dir="x")
        assert ck["rng"] == {"data": 1} and ck["metrics"] == {"val_loss": 1.5}
    fresh = AdamW({k: v.copy() for k, v in params.items()}, lr=0.1)
    fresh.load_state_dict(ck["optimizer"])
    assert fresh.t == 1
    assert np.array_equal(np_(fresh.state["exp_avg"]["h.0.w"]), np_(opt.state["exp_avg"]["h.0.w"]))
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 5  # human-readable copy


def test_truncated_or_foreign_checkpoints_are_refused(tmp_path):
    tr.save_checkpoint(tmp_path / "ok", {"w": np.ones(1000, np.float32)}, step=3)
    blob = (tmp_path / "ok" / "checkpoint.npz").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "checkpoint.npz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="checkpoint: .* is not a readable minillm checkpoint.*truncated"):
        tr.load_checkpoint(tmp_path / "cut")
    np.savez(tmp_path / "other.npz", w=np.ones(3))
    with pytest.raises(ValueError, match="no __meta__"):
        tr.load_checkpoint(tmp_path / "other.npz")


def test_latest_run_picks_the_newest_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="root: no run with a checkpoint.npz"):
        tr.latest_run(tmp_path)
    for i, name in enumerate(["old", "new", "mid"]):
        tr.save_checkpoint(tmp_path / name, {"w": np.ones(2, np.float32)}, step=i)
        t = 1_000_000 + {"old": 0, "new": 200, "mid": 100}[name]
        os.utime(tmp_path / name / "checkpoint.npz", (t, t))
    (tmp_path / "not-a-run").mkdir()
    assert tr.latest_run(tmp_path) == tmp_path / "new"


# --- configuration and bad input ----------------------------------------------------------

def test_config_round_trips_and_rejects_bad_values():
    cfg = TrainConfig(max_steps=7, betas=[0.8, 0.9], out_dir="runs/x")
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d and d["betas"] == [0.8, 0.9]
    assert TrainConfig.from_dict(d) == cfg and cfg.betas == (0.8, 0.9)
    with pytest.raises(ValueError, match=r"config: unknown TrainConfig fields \['lerning_rate'\]"):
        TrainConfig.from_dict({**d, "lerning_rate": 1.0})
    with pytest.raises(ValueError, match="max_steps: expected an int >= 1, got 0"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="lr: expected a finite number >= 0, got -1"):
        TrainConfig(lr=-1)
    with pytest.raises(ValueError, match=r"betas: expected a pair in \[0, 1\)"):
        TrainConfig(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="min_lr: expected at most lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(ValueError, match="optimizer: expected 'adamw', 'adam' or 'sgd', got 'lion'"):
        TrainConfig(optimizer="lion")


def test_a_task_without_the_protocol_is_refused(tmp_path):
    with pytest.raises(TypeError, match="task: expected an object with params, loss_and_grads.*lacks"):
        tr.train(object(), config(tmp_path), log=quiet)


def test_evaluation_uses_the_same_batches_every_time(xp):
    task = ToyTask(xp)
    assert tr.evaluate(task, 3, seed=1) == tr.evaluate(task, 3, seed=1)


def test_loss_svg_handles_empty_and_flat_series(tmp_path):
    ET.parse(tr.write_loss_svg(tmp_path / "a.svg", {"train": []}))
    root = ET.parse(tr.write_loss_svg(tmp_path / "b.svg", {"train": [(1, 2.0)], "val": [(1, 2.0), (2, float("nan"))]})).getroot()
    assert root.tag.endswith("svg")


# --- the loop's pieces and the names' new homes ---------------------------------------------

def test_train_is_train_step_in_a_loop(xp, tmp_path):
    from minillm.optim import make_optimizer
    cfg = config(tmp_path, max_steps=5, eval_interval=0, checkpoint_interval=0)
    tr.train(ToyTask(xp), cfg, log=quiet)
    task = ToyTask(xp)
    opt = make_optimizer(cfg.optimizer, task.params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                         betas=cfg.betas, eps=cfg.eps, momentum=cfg.momentum)
    data_rng = np.random.default_rng(cfg.seed)
    by_hand = [tr.train_step(task, opt, data_rng, cfg, step) for step in range(cfg.max_steps)]
    logged = records(tmp_path, "train")
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in logged] == by_hand   # bit for bit
    saved = tr.load_checkpoint(tmp_path)["params"]
    for k, p in task.params.items():
        assert np.array_equal(saved[k], np_(p))


def test_moved_names_are_the_same_objects_in_their_new_homes():
    from minillm import checkpoint, plot
    for name in ("save_checkpoint", "load_checkpoint", "latest_run", "CHECKPOINT_FILE", "CHECKPOINT_JSON",
                 "FORMAT", "FORMAT_VERSION"):
        assert getattr(tr, name) is getattr(checkpoint, name), name
    for name in ("read_metrics", "write_loss_svg", "plot_metrics", "METRICS_FILE", "PLOT_FILE"):
        assert getattr(tr, name) is getattr(plot, name), name
    assert all(hasattr(tr, name) for name in tr.__all__)
    assert (checkpoint.FORMAT, checkpoint.FORMAT_VERSION) == ("minillm-checkpoint", 1)   # old runs load



@settings(max_examples=40, deadline=None)
@given(field=st.sampled_from(TrainConfig._POSITIVE_INTS + TrainConfig._NON_NEGATIVE_INTS),
       value=st.one_of(st.integers(-5, 5), st.floats(-2, 2), st.booleans(), st.none(), st.just("3")))
def test_every_count_field_takes_exactly_the_ints_in_its_range(field, value):
    lo = 1 if field in TrainConfig._POSITIVE_INTS else 0
    kw = {field: value, "warmup_steps": 0} if field != "warmup_steps" else {field: value}
    if isinstance(value, int) and not isinstance(value, bool) and value >= lo:
        assert getattr(TrainConfig(**kw), field) == value
    else:
        with pytest.raises(ValueError, match=re.escape(f"{field}: expected an int >= {lo}, got {value!r}")):
            TrainConfig(**kw)


def test_numpy_numbers_in_a_config_become_python_numbers_that_a_checkpoint_can_store(tmp_path):
    cfg = TrainConfig(max_steps=np.int64(3), lr=np.float32(0.5), min_lr=np.float64(0.1),
                      val_fraction=np.float32(0.25), out_dir=str(tmp_path))
    assert type(cfg.max_steps) is int and type(cfg.lr) is float and type(cfg.val_fraction) is float
    assert json.loads(json.dumps(cfg.to_dict()))["lr"] == 0.5
    with pytest.raises(ValueError, match="grad_clip: expected a finite number"):
        TrainConfig(grad_clip=True)   # a flag is not a clipping threshold


def test_resume_respells_a_model_config_saved_under_old_names(xp, tmp_path):
    """A run saved when the model config used other field names resumes when the task says
    how to respell them (normalize_model_config), and is refused when it does not."""
    old = ToyTask(xp)
    old.model_config = {"kind": "softmax-regression", "width": 6, "C": 4}      # yesterday's spelling
    tr.train(old, config(tmp_path, max_steps=4), log=quiet)
    new = ToyTask(xp)                                                            # {"D": 6, "C": 4}
    with pytest.raises(ValueError, match="model_config"):
        tr.train(new, config(tmp_path, max_steps=8), resume=True, log=quiet)
    new.normalize_model_config = lambda d: {("D" if k == "width" else k): v for k, v in d.items()}
    assert tr.train(new, config(tmp_path, max_steps=8), resume=True, log=quiet)["step"] == 8


def test_bert_runs_saved_under_the_old_config_names_compare_equal():
    from minillm import bert
    from minillm.cli.train_bert import _normalize_model_config
    cfg = bert.BertConfig(vocab_size=50, n_embd=16, n_layer=1, n_head=2, mlp_hidden=32, block_size=8)
    old_name = {new: old for old, new in bert.OLD_FIELD_NAMES.items()}
    old = {old_name.get(k, k): v for k, v in cfg.to_dict().items()}
    assert old != cfg.to_dict() and "hidden_size" in old
    assert _normalize_model_config(old) == cfg.to_dict()
