"""bench train-run: the same training run in minillm and in PyTorch takes the same steps.

With dropout 0 both sides start from the same weights, see the same batches, follow the
same schedule and clip the same norm, so their losses agree to float32 round-off step
after step. That makes this a check of the whole loop against torch (AdamW's update and
its decay groups, the warmup + cosine schedule, global-norm clipping), not only of one
forward pass: each is one line of train_step, and getting any wrong moves the losses.
"""

import argparse
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed: the train-run comparison needs it")

from minillm import gpt, optim                           # noqa: E402
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


# ---------------------------------------------------------------------------
# --versus nanogpt-cpu: the main job against nanoGPT's CPU run at equal training time
# ---------------------------------------------------------------------------

TINY_NANOGPT = ["n_layer=1", "n_head=2", "n_embd=32", "block_size=32", "max_iters=8", "warmup_iters=2"]


def test_the_nanogpt_side_has_nanogpts_readme_cpu_settings():
    cfg = train_run.nanogpt_settings([])
    assert cfg == dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, bias=False, dropout=0.0,
                       learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, max_iters=2000, lr_decay_iters=2000,
                       beta1=0.9, beta2=0.99, weight_decay=0.1, grad_clip=1.0)
    # get_lr: (it + 1) / (warmup + 1) of the peak while warming up, cosine to min_lr at lr_decay_iters
    lr = lambda it: train_run.nanogpt_lr(it, cfg)                        # noqa: E731
    assert lr(0) == pytest.approx(1e-3 / 101) and lr(99) == pytest.approx(1e-3 * 100 / 101)
    assert lr(100) == pytest.approx(1e-3) and lr(1050) == pytest.approx(5.5e-4)
    assert lr(2000) == pytest.approx(1e-4) and lr(2500) == 1e-4
    assert [lr(it) for it in range(0, 2001, 7)] == pytest.approx(
        [optim.lr_schedule(it, 1e-3, 100, 2000, 1e-4) for it in range(0, 2001, 7)], rel=1e-12)
    short = train_run.nanogpt_settings(["max_iters=8", "bias=true", "learning_rate=3e-3"])
    assert (short["max_iters"], short["lr_decay_iters"], short["bias"], short["learning_rate"]) == (8, 8, True, 3e-3)
    with pytest.raises(UsageError, match="--nanogpt: expected KEY=VALUE with KEY one of"):
        train_run.nanogpt_settings(["n_layers=2"])
    with pytest.raises(UsageError, match="--nanogpt batch_size: expected int, got '1.5'"):
        train_run.nanogpt_settings(["batch_size=1.5"])
    with pytest.raises(UsageError, match="--nanogpt n_embd: expected a multiple of n_head"):
        train_run.nanogpt_settings(["n_embd=130"])


def test_the_nanogpt_side_is_nanogpts_model_optimizer_and_schedule():
    cfg = train_run.nanogpt_settings([])
    tokens = np.arange(5000, dtype=np.int64) % 65
    side = train_run._NanoGPTSide(torch, cfg, 65, tokens, seed=1, device="cpu", compile_model=False)
    assert not any(name.endswith(".bias") for name in side.P)                     # bias=False
    C = 128
    assert sum(p.numel() for p in side.P.values()) == 65 * C + 64 * C + 4 * (2 * C + 12 * C * C) + C
    decayed = {id(p) for g in side.optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert id(side.P["wte"]) in decayed and id(side.P["wpe"]) in decayed          # 2-D: decayed, unlike minillm's groups
    assert id(side.P["h.0.ln_1.weight"]) not in decayed
    assert side.optimizer.defaults["betas"] == (0.9, 0.99)
    assert float(side.P["h.0.attn.c_attn.weight"].detach().std()) == pytest.approx(0.02, rel=0.02)
    assert float(side.P["h.3.mlp.c_proj.weight"].detach().std()) == pytest.approx(0.02 / np.sqrt(8), rel=0.02)
    assert side.batches.get_batch("train", np.random.default_rng(0))[0].shape == (12, 64)
    for it in range(3):
        side.step()
        assert side.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * (it + 1) / 101)


class _FakeSide:
    """A side whose step costs ``dt`` seconds of a shared fake clock; it checks, at every
    step, that it is the side with the least time so far among those still running."""

    def __init__(self, clock, dt, max_steps, others, violations):
        self.clock, self.dt, self.max_steps, self.others, self.violations = clock, dt, max_steps, others, violations
        self.elapsed, self.steps = 0.0, 0

    def step(self):
        if any(o.steps < o.max_steps and o.elapsed < self.elapsed for o in self.others()):
            self.violations.append((self.elapsed, [o.elapsed for o in self.others()]))
        dt = self.dt(self.steps) if callable(self.dt) else self.dt
        self.clock[0] += dt
        self.elapsed += dt
        self.steps += 1

    def eval_chunk(self, x, y):
        return 3.0 - 0.01 * self.steps + 0.001 * x


def test_alternating_by_time_keeps_the_clocks_within_one_step():
    clock, violations, sides = [0.0], [], {}
    sides["slow"] = _FakeSide(clock, 1.0, 5, lambda: [sides["fast"]], violations)
    sides["fast"] = _FakeSide(clock, 0.25, 100, lambda: [sides["slow"]], violations)
    result = train_run.alternate_by_time(sides, [(0, None), (1, None), (2, None)], eval_seconds=2.0,
                                         clock=lambda: clock[0], log=lambda *_: None)
    assert not violations
    assert result["W"] == 5.0 and sides["slow"].steps == 5 and sides["fast"].steps == 100
    at_w = result["equal_time"]
    assert at_w["slow"]["seconds"] == 5.0 and 5.0 <= at_w["fast"]["seconds"] < 5.0 + 0.25 + 1e-9
    assert [r["seconds"] for r in result["history"]["slow"]] == [0.0, 2.0, 4.0, 5.0]
    fast = [r["seconds"] for r in result["history"]["fast"]]
    assert fast[0] == 0.0 and fast[-1] == 25.0 and at_w["fast"] in result["history"]["fast"]
    assert result["history"]["slow"][-1]["val"] == pytest.approx(2.951) and result["history"]["slow"][-1]["val_se"] > 0


def test_equal_time_waits_for_the_other_clock_after_a_slow_last_step():
    """A burst of load makes the slow side's last step take 10 s: the fast side is then 8 s
    behind, and is scored when its clock reaches W, not at the moment W is set."""
    clock, violations, sides = [0.0], [], {}
    sides["slow"] = _FakeSide(clock, lambda i: 10.0 if i == 2 else 1.0, 3, lambda: [sides["fast"]], violations)
    sides["fast"] = _FakeSide(clock, 0.25, 100, lambda: [sides["slow"]], violations)
    result = train_run.alternate_by_time(sides, [(0, None), (1, None)], eval_seconds=100.0,
                                         clock=lambda: clock[0], log=lambda *_: None)
    assert not violations and result["W"] == 12.0
    assert 12.0 <= result["equal_time"]["fast"]["seconds"] < 12.25 + 1e-9
    assert result["step_ms"]["slow"] == [1000.0, 1000.0, 10000.0]


def test_versus_nanogpt_cpu_runs_both_and_reports_them_at_equal_time(tmp_path, capsys):
    args = _args(tmp_path, versus="nanogpt-cpu", eval_seconds=0.05, eval_seqs=24)
    args.nanogpt = TINY_NANOGPT
    assert train_run.run(args) == 0
    out = capsys.readouterr().out
    assert "against nanoGPT's CPU run in PyTorch" in out and "bias False" in out and "12 x 32" in out
    assert "minillm - nanoGPT = " in out and "768 tokens" in out                 # 3 batches of 8 x 32
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["nanogpt_cpu"]["config"]["batch_size"] == 12 and doc["nanogpt_cpu"]["config"]["bias"] is False
    assert doc["nanogpt_cpu"]["history"][-1]["step"] == 8 and doc["minillm"]["history"][-1]["step"] == 12
    for name in ("minillm", "nanoGPT"):
        row = doc["equal_time"][name]
        assert np.isfinite(row["val"]) and row["val_se"] > 0 and len(row["chunk_losses"]) == 3
        assert abs(row["seconds"] - doc["W_seconds"]) < 2.0
    assert doc["minillm"]["history"][-1]["val"] < doc["minillm"]["history"][0]["val"]       # both learn
    assert doc["nanogpt_cpu"]["history"][-1]["val"] < doc["nanogpt_cpu"]["history"][0]["val"]
    assert (tmp_path / "out" / "val_loss.svg").read_text().count("nanoGPT CPU (PyTorch)") >= 1


def test_versus_nanogpt_cpu_bad_input_is_named(tmp_path):
    args = _args(tmp_path, versus="nanogpt-cpu")
    with pytest.raises(UsageError, match="--nanogpt block_size: both sides are scored on the same"):
        train_run.run(args)                                                      # tiny's 32 vs nanoGPT's 64
    args.nanogpt = TINY_NANOGPT
    args.eval_seqs = 0
    with pytest.raises(UsageError, match="--eval-seqs: expected a positive number, got 0"):
        train_run.run(args)


def test_the_nanogpt_model_computes_gpt_pys_loss_from_the_same_weights():
    """nanoGPT's forward (weights (out, in), exact GELU) against minillm's gpt.loss on the same
    weights transposed into minillm's names: equal but for GELU's tanh approximation (1e-5 here)."""
    cfg = train_run.nanogpt_settings(["n_layer=2", "n_head=2", "n_embd=32", "block_size=16"])
    tokens = (np.arange(3000) * 7 % 50).astype(np.int64)
    side = train_run._NanoGPTSide(torch, cfg, 50, tokens, seed=3, device="cpu", compile_model=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():                     # away from the initialisation: far-from-uniform logits
        for p in side.P.values():
            p.mul_(8) if p.dim() >= 2 else p.add_(0.3 * torch.randn(p.shape, generator=g))
    names = {"attn.c_attn.weight": "attn.w_qkv", "attn.c_proj.weight": "attn.w_o",
             "mlp.c_fc.weight": "mlp.w1", "mlp.c_proj.weight": "mlp.w2"}
    params = {}
    for name, p in side.P.items():
        w = p.detach().numpy()
        for theirs, ours in names.items():
            if name.endswith(theirs):
                name, w = name[:-len(theirs)] + ours, w.T
        params[name] = np.ascontiguousarray(w, dtype=np.float32)
    config = gpt.GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=False)
    assert sorted(params) == sorted(gpt.init_params(config, seed=0))
    x, y = side.batches.get_batch("train", np.random.default_rng(1))
    ours = float(gpt.loss(params, config, x, y))
    assert side.eval_chunk(x, y) == pytest.approx(ours, abs=1e-4)
    assert abs(ours - np.log(50)) > 0.1                                          # not a uniform guess
