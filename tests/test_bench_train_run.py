"""bench train-run: the same training run in minillm and in PyTorch takes the same steps.

With dropout 0 both sides start from the same weights, see the same batches, follow the
same schedule and clip the same norm, so their losses agree to float32 round-off step
after step. That makes this a check of the whole loop against torch (AdamW's update and
its decay groups, the warmup + cosine schedule, global-norm clipping), not only of one
forward pass: each is one line of train_step, and getting any wrong moves the losses.
"""

import argparse

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed: the train-run comparison needs it")

from minillm import optim                                # noqa: E402
from minillm.bench import train_run                      # noqa: E402
from minillm.cli.common import UsageError                # noqa: E402

TEXT = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate.\n" * 60)


def _args(tmp_path, **over):
    parser = argparse.ArgumentParser()
    train_run.add_arguments(parser)
    data = tmp_path / "sonnet.txt"
    data.write_text(TEXT)
    argv = ["--preset", "tiny", "--max-steps", "12", "--eval-interval", "6", "--eval-iters", "2",
            "--data", str(data), "--out", str(tmp_path / "out")]
    for k, v in over.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return parser.parse_args(argv)


def _both(tmp_path, **over):
    args = _args(tmp_path, **over)
    model_kw, tcfg = train_run._settings(args)
    task = train_run._minillm_task(model_kw, tcfg, np, "cpu")
    side = train_run._make_torch_side(task, tcfg, "cpu", args)
    history, losses = train_run._train_side_by_side(task, side, tcfg)
    return history, losses, tcfg


def test_without_dropout_minillm_and_torch_take_the_same_steps(tmp_path):
    # warmup 5 of 12 steps, so the schedule both warms up and decays; clipping at 1.0 is
    # active in the first steps of a fresh model (gradient norms above 1)
    history, losses, tcfg = _both(tmp_path, dropout=0.0)
    assert tcfg.warmup_steps < tcfg.max_steps and tcfg.grad_clip > 0
    m, t = np.array(losses["minillm"]), np.array(losses["torch"])
    assert len(m) == len(t) == 12
    assert m[-1] < m[0] - 0.1                                    # it learns: the check is not on a flat line
    np.testing.assert_allclose(m, t, rtol=2e-5)
    for row in history:
        assert row["minillm_val"] == pytest.approx(row["torch_val"], rel=2e-5)


def test_a_wrong_schedule_on_one_side_shows(tmp_path, monkeypatch):
    """The comparison can fail: torch stepping at a constant lr moves its losses apart."""
    real = train_run._TorchSide.step
    monkeypatch.setattr(train_run._TorchSide, "step", lambda self, batch, lr: real(self, batch, 3e-3))
    _, losses, _ = _both(tmp_path, dropout=0.0)
    assert not np.allclose(losses["minillm"], losses["torch"], rtol=2e-5)


def test_the_torch_side_uses_minillms_decay_groups(tmp_path):
    args = _args(tmp_path)
    model_kw, tcfg = train_run._settings(args)
    task = train_run._minillm_task(model_kw, tcfg, np, "cpu")
    side = train_run._make_torch_side(task, tcfg, "cpu", args)
    decayed = {id(p) for g in side.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in side.P.items():
        assert (id(p) in decayed) == (not optim.default_no_decay(name)), name


def test_run_writes_the_plot_and_results(tmp_path, capsys):
    assert train_run.run(_args(tmp_path, max_steps=4, eval_interval=2)) == 0
    out = capsys.readouterr().out
    assert "final val loss" in out and "PyTorch" in out
    assert (tmp_path / "out" / "val_loss.svg").read_text().startswith("<svg")
    assert '"history"' in (tmp_path / "out" / "results.json").read_text()


def test_a_preset_the_torch_side_cannot_build_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="--preset: the PyTorch side is GPT-2's block only"):
        train_run.run(argparse.Namespace(**{**vars(_args(tmp_path)), "preset": "llama"}))
    with pytest.raises(UsageError, match="--preset: expected one of"):
        train_run.run(argparse.Namespace(**{**vars(_args(tmp_path)), "preset": "huge"}))
