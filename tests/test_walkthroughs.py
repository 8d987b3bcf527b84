"""Every walkthrough runs to the end (in its fast mode, MINILLM_FAST=1), and its checks are live.

A walkthrough checks what it shows (by-hand results against the library's, gradient
checks against 1e-7, trained models against their baselines) and exits non-zero when a
check fails (walkthroughs/_narrate.py). The planted-bug tests prove those checks can
fail: each runs one walkthrough through a small driver that breaks one minillm function
first (in the driver's process only; the library has no hook for it) and requires the
walkthrough to stop at the check that covers that function, with its message.
"""
import importlib.util
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
WALKTHROUGHS = ROOT / "walkthroughs"
SCRIPTS = sorted(WALKTHROUGHS.glob("[0-9]*.py"))


def _env():
    return dict(os.environ, MINILLM_FAST="1", MPLBACKEND="Agg",
                MINILLM_DEVICE=os.environ.get("MINILLM_DEVICE", "cpu"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_walkthrough_runs(script, tmp_path):
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{script.name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    assert r.stdout.strip(), f"{script.name} printed nothing: a walkthrough narrates"


def _run_with(script, patch, tmp_path):
    """Run ``script`` as __main__ after executing ``patch`` (Python source) in the same process."""
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""\
        import runpy
        import sys
        sys.path.insert(0, {str(WALKTHROUGHS)!r})
        sys.path.insert(0, {str(ROOT)!r})
        """) + textwrap.dedent(patch) + textwrap.dedent(f"""\
        sys.argv = [{str(script)!r}]
        runpy.run_path({str(script)!r}, run_name="__main__")
        """))
    return subprocess.run([sys.executable, str(driver)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)


# (walkthrough, the bug planted before it runs, what its failed check must say)
PLANTED = {
    # A gradient check: a backward off by one part in a million must not pass the 1e-7 bar.
    "layernorm_backward_off_by_1e-6": ("03_norm.py", """
        import minillm.norm as m
        _right = m.layernorm_backward
        def _wrong(dy, cache):
            dx, dweight, dbias = _right(dy, cache)
            return dx * (1 + 1e-6), dweight, dbias
        m.layernorm_backward = _wrong
        """, "gradient check of layernorm"),
    # By hand vs the library: attention's output nudged by 1e-9.
    "sdpa_forward_nudged": ("06_attention.py", """
        import minillm.attention as m
        _right = m.sdpa_forward
        def _wrong(*args, **kwargs):
            out, cache = _right(*args, **kwargs)
            return out + 1e-9, cache
        m.sdpa_forward = _wrong
        """, "sdpa_forward vs the weighted average by hand"),
    # By hand vs the library, whole model: a GPT whose position-embedding gradient is halved
    # (what taking it from one row of a batch of two does).
    "gpt_backward_wpe_halved": ("08_gpt.py", """
        import minillm.gpt as m
        _right = m.backward
        def _wrong(dlogits, cache):
            grads = _right(dlogits, cache)
            grads["wpe"] = grads["wpe"] * 0.5
            return grads
        m.backward = _wrong
        """, "dwpe by hand vs gpt.backward"),
    # Bit-for-bit claims: activation checkpointing that recomputes a block from an input off
    # by one part in 1e7 changes the gradients, and walkthrough 19 must notice.
    "recompute_from_a_nudged_input": ("19_distributed.py", """
        import minillm.gpt as m
        _right = m._recompute_block
        def _wrong(cache, layer):
            saved = cache.blocks[layer]
            blocks = list(cache.blocks)
            blocks[layer] = saved._replace(x=saved.x * (1 + 1e-7))
            return _right(cache._replace(blocks=blocks), layer)
        m._recompute_block = _wrong
        """, "checkpointing should not change a gradient"),
    # Trained vs baseline: DPO whose gradient pushes the rejected response up instead of the chosen.
    "dpo_backward_swapped": ("20_rlhf.py", """
        import minillm.rlhf as m
        _right = m.dpo_loss_backward
        def _wrong(dloss, cache):
            d_chosen, d_rejected = _right(dloss, cache)
            return d_rejected, d_chosen
        m.dpo_loss_backward = _wrong
        """, "DPO's true reward"),

    # BPTT: an LSTM whose gradient at the initial cell is off by one part in a million.
    "lstm_backward_dc0_off_by_1e-6": ("15_rnn.py", """
        import minillm.rnn as m
        _right = m.lstm_backward
        def _wrong(dy, cache, **kwargs):
            g = list(_right(dy, cache, **kwargs))
            g[2] = g[2] * (1 + 1e-6)
            return tuple(g)
        m.lstm_backward = _wrong
        """, "gradient check of LSTM backward"),
    # Trained vs baseline: an optimizer that never moves the weights cannot beat a guess.
    "adamw_step_does_nothing": ("13_lora.py", """
        import minillm.optim as m
        m.AdamW.step = lambda self, grads: None
        """, "the base model's loss on 'count by 1'"),
    # A gradient check with a mask: CBOW handing gradient to the masked (absent) context slots.
    "cbow_backward_feeds_masked_slots": ("14_bow_cbow.py", """
        import minillm.word2vec as m
        _right = m.cbow_backward
        def _wrong(dloss, cache):
            d_ctx, d_t, d_n = _right(dloss, cache)
            return d_ctx + (1 - cache.mask)[:, :, None] * d_ctx.sum(axis=1, keepdims=True), d_t, d_n
        m.cbow_backward = _wrong
        """, "gradient check of cbow"),
}


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_walkthrough_fails_on_a_planted_bug(case, tmp_path):
    name, patch, message = PLANTED[case]
    r = _run_with(WALKTHROUGHS / name, patch, tmp_path)
    assert r.returncode != 0, f"{name} passed with {case} planted:\n{r.stdout[-2000:]}"
    assert "CheckFailed" in r.stderr and message in r.stderr, \
        f"{name} with {case} should stop at the check '{message}', but:\n{r.stderr[-3000:]}"


def test_the_driver_alone_passes(tmp_path):
    """The control for the planted-bug tests: through the driver, with nothing broken, a walkthrough passes."""
    r = _run_with(WALKTHROUGHS / "03_norm.py", "", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]


def _narrate():
    spec = importlib.util.spec_from_file_location("_narrate", WALKTHROUGHS / "_narrate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_checks_fail_on_what_they_should():
    import numpy as np
    n = _narrate()
    assert n.expect_close("same", np.ones(3), np.ones(3), 0) == 0
    assert n.expect_close("close", np.ones(3), np.ones(3) + 1e-13, 1e-12) == pytest.approx(1e-13, rel=0.01)
    for a, b, tol in ((np.ones(3), np.ones(3) + 1e-11, 1e-12),       # too far
                      (np.ones(3), np.array([1.0, math.nan, 1.0]), 1.0),   # NaN never passes
                      (np.ones(3), np.ones((3, 1)), 1.0)):             # no silent broadcasting
        with pytest.raises(n.CheckFailed):
            n.expect_close("x", a, b, tol)
    with pytest.raises(n.CheckFailed, match="below uniform"):
        n.expect_below("loss", 2.0, 1.0, "uniform")
    with pytest.raises(n.CheckFailed):
        n.expect_below("loss", math.nan, 1.0, "uniform")
    with pytest.raises(n.CheckFailed, match="the message"):
        n.check(False, "the message")

    class Report:                     # a GradCheckReport's two fields that matter here
        def __init__(self, err):
            self.max_rel_error = err

    assert n.expect_gradcheck("ok", Report(1e-7)).max_rel_error == 1e-7
    for err in (2e-7, math.nan):
        with pytest.raises(n.CheckFailed):
            n.expect_gradcheck("bad", Report(err))
