"""scaling.py: the IsoFLOP method's fits recover what they were built from, the sweep spends
each budget, and ``python -m minillm scaling`` runs end to end."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minillm import scaling


@given(st.floats(0.05, 5.0), st.floats(-3.0, 3.0), st.floats(-2.0, 2.0), st.integers(3, 8))
def test_the_parabola_fit_finds_the_bottom_of_an_exact_parabola(a, x0, c, n):
    x = np.linspace(x0 - 2, x0 + 2.5, n)
    y = a * (x - x0) ** 2 + c
    xm, ym = scaling.parabola_minimum(scaling.fit_parabola(x, y))
    assert xm == pytest.approx(x0, abs=1e-7) and ym == pytest.approx(c, abs=1e-7)


@given(st.floats(0.2, 0.8), st.floats(-5.0, 5.0), st.integers(2, 6))
def test_the_power_law_fit_recovers_the_exponent(alpha, k, n):
    C = np.logspace(9, 13, n)
    n_opt = np.exp(k) * C ** alpha
    a, kk = scaling.fit_power_law(C, n_opt)
    assert a == pytest.approx(alpha, abs=1e-9) and kk == pytest.approx(k, abs=1e-6)


@given(st.floats(1e6, 1e13), st.integers(100, 10**7), st.integers(1, 4096))
def test_a_run_spends_its_budget_to_within_one_step(budget, n, tps):
    steps = scaling.steps_for_budget(budget, n, tps)
    spent = scaling.training_flops(n, steps * tps)
    assert steps == 1 or abs(spent - budget) <= 0.5 * scaling.training_flops(n, tps) + 1e-6 * budget


def test_the_sweep_on_a_synthetic_loss_surface_finds_chinchillas_exponent():
    """L(N, D) = E + A / N^0.34 + B / D^0.28 (Chinchilla's fitted form): equal exponents' roles
    give N_opt ~ C^(b / (a + b)) = C^0.4516; the sweep and fits must recover it."""
    def loss(n, d):
        return 1.69 + 406.4 / n ** 0.34 + 410.7 / d ** 0.28
    sizes = [int(x) for x in np.logspace(6, 9.5, 29)]
    budgets = [1e17, 1e18, 1e19]
    pts = scaling.isoflop_sweep(budgets, sizes, lambda s: s,
                                lambda s, steps: loss(s, steps * 1000), tokens_per_step=1000)
    assert len(pts) == 87 and all(p.tokens == p.steps * 1000 for p in pts)
    opt = scaling.optimum_per_budget(pts, window=5)
    alpha, _ = scaling.fit_power_law(list(opt), [v[0] for v in opt.values()])
    assert alpha == pytest.approx(0.28 / (0.34 + 0.28), abs=0.02)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="a parabola opening upwards"):
        scaling.parabola_minimum((-1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="at least 3 distinct points"):
        scaling.fit_parabola([1, 1, 2], [0, 1, 2])
    with pytest.raises(ValueError, match="sizes: expected at least 3 model sizes"):
        scaling.isoflop_sweep([1e9, 1e10], [1, 2], lambda s: s, lambda s, n: 0.0, 10)
    with pytest.raises(ValueError, match="budgets: expected at least 2"):
        scaling.isoflop_sweep([1e9], [1, 2, 3], lambda s: s, lambda s, n: 0.0, 10)


def test_the_command_runs_a_small_sweep_and_writes_its_files(tmp_path):
    from minillm.__main__ import main
    text = "".join(f"ACT {i}. Enter the {i % 7}th player, and speaks softly.\n" for i in range(300))
    (tmp_path / "t.txt").write_text(text)
    out = tmp_path / "sweep"
    assert main(["scaling", "--quick", "--budgets", "2e7,6e7", "--data", str(tmp_path / "t.txt"),
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["points"]) == 6
    for p in res["points"]:      # every run spent its budget: 6 N D within one step of C
        assert abs(6 * p["n_params"] * p["tokens"] - p["budget"]) <= 6 * p["n_params"] * 128 * 0.5 + 1
        assert math.isfinite(p["loss"])
    assert (out / "isoflop.svg").read_text().count("<polyline") == 2
    assert main(["scaling", "--widths", "8,12", "--out", str(out)]) == 2
