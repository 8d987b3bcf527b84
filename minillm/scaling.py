"""Compute-optimal model size: Chinchilla's IsoFLOP method (Hoffmann et al. 2022, approach 2).

Training a transformer of N parameters on D tokens costs about

    C = 6 N D  FLOPs         (2 N a token for the forward's multiply-adds, 4 N for the backward)

For a fixed budget C, a bigger model sees fewer tokens. Train several sizes N_i at
the same C, each on D_i = C / (6 N_i) tokens with its learning-rate schedule
stretched over exactly its own run (a cosine cut short would handicap the long
runs), and the final loss traces a valley in log N. A parabola fitted to the
points,

    L(x) = a x^2 + b x + c,   x = ln N,     minimum at  x* = -b / (2 a)   (a > 0)

puts the budget's optimum at N_opt(C) = exp(x*). Over several budgets the optima
lie on a power law, a straight line on log-log axes,

    ln N_opt = alpha ln C + k       (least squares)     N_opt ~ C^alpha

and the tokens per parameter at the optimum are D_opt / N_opt = C / (6 N_opt^2).
Chinchilla found alpha ~ 0.5 (N and D grow alike) and about 20 tokens a parameter;
at toy scale (thousands of parameters, a character corpus, a CPU) the numbers are
this machine's, not Chinchilla's, and the sweep says which.

The sweep itself, :func:`isoflop_sweep`, needs only a function that trains one
model for a given number of steps and returns (parameters, final loss); the
command ``python -m minillm scaling`` supplies a GPT on Shakespeare.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np

from .backend import check_int_arg, check_number

__all__ = ["training_flops", "steps_for_budget", "fit_parabola", "parabola_minimum", "fit_power_law",
           "IsoFLOPPoint", "isoflop_sweep", "optimum_per_budget"]


def training_flops(n_params, tokens) -> float:
    """C = 6 N D."""
    return 6.0 * float(n_params) * float(tokens)


def steps_for_budget(budget, n_params, tokens_per_step) -> int:
    """Optimizer steps that spend ``budget`` FLOPs on a model of n_params (at least 1)."""
    _check_steps_for_budget(budget, n_params, tokens_per_step)
    return max(1, int(round(budget / (6.0 * n_params * tokens_per_step))))


def fit_parabola(x, y) -> tuple:
    """Least-squares (a, b, c) of y = a x^2 + b x + c (three or more points)."""
    x, y = _check_fit(x, y, 3)
    a, b, c = np.polyfit(x, y, 2)
    return float(a), float(b), float(c)


def parabola_minimum(coeffs) -> tuple:
    """(x*, y*) at the bottom of a x^2 + b x + c; ValueError when it opens downwards (a <= 0):
    the sizes did not bracket the optimum."""
    a, b, c = coeffs
    if not a > 0:
        raise ValueError(f"coeffs: expected a parabola opening upwards (a > 0), got a = {a:.3g}: the model "
                         f"sizes do not bracket this budget's optimum (add smaller or larger ones)")
    x = -b / (2.0 * a)
    return x, a * x * x + b * x + c


def fit_power_law(budgets, n_opts) -> tuple:
    """(alpha, k) of ln N_opt = alpha ln C + k (two or more budgets)."""
    x, y = _check_fit(budgets, n_opts, 2, positive=True)
    alpha, k = np.polyfit(np.log(x), np.log(y), 1)
    return float(alpha), float(k)


class IsoFLOPPoint(NamedTuple):
    budget: float        # C, FLOPs
    size: object         # what the trainer was asked for (e.g. a width)
    n_params: int        # N
    steps: int
    tokens: int          # D = steps x tokens per step
    loss: float          # the final (validation) loss


def isoflop_sweep(budgets, sizes, n_params_of: Callable, train_one: Callable, tokens_per_step: int,
                  on_point=None) -> list:
    """Train every size at every budget -> [IsoFLOPPoint].

    n_params_of(size) -> N; train_one(size, steps) -> final loss. Each run gets
    steps_for_budget(C, N, tokens_per_step) steps. ``on_point(point, i, total)`` after each.
    """
    _check_sweep(budgets, sizes, tokens_per_step)
    points, total = [], len(budgets) * len(sizes)
    for budget in budgets:
        for size in sizes:
            n = int(n_params_of(size))
            steps = steps_for_budget(budget, n, tokens_per_step)
            pt = IsoFLOPPoint(float(budget), size, n, steps, steps * tokens_per_step, float(train_one(size, steps)))
            points.append(pt)
            if on_point is not None:
                on_point(pt, len(points), total)
    return points


def optimum_per_budget(points, window=None) -> dict:
    """{C: (N_opt, loss at the optimum, (a, b, c))} from a parabola in ln N per budget.

    window: fit only the ``window`` sizes centred on the lowest loss (a parabola is the
    valley's shape near its bottom, not over decades of N); None fits them all.
    """
    out = {}
    for budget in sorted({p.budget for p in points}):
        pts = sorted((p for p in points if p.budget == budget), key=lambda p: p.n_params)
        if window is not None and len(pts) > window:
            best = min(range(len(pts)), key=lambda i: pts[i].loss)
            lo = min(max(0, best - window // 2), len(pts) - window)
            pts = pts[lo:lo + window]
        coeffs = fit_parabola([math.log(p.n_params) for p in pts], [p.loss for p in pts])
        x, loss = parabola_minimum(coeffs)
        out[budget] = (math.exp(x), loss, coeffs)
    return out


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------

def _check_steps_for_budget(budget, n_params, tokens_per_step):
    check_number("budget", budget, 0.0, lo_open=True)
    check_number("n_params", n_params, 0.0, lo_open=True)
    check_int_arg("tokens_per_step", tokens_per_step, lo=1)


def _check_fit(x, y, least, positive=False):
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x, y: expected two 1-D sequences of one length, got shapes {x.shape} and {y.shape}")
    if len(np.unique(x)) < least:
        raise ValueError(f"x: expected at least {least} distinct points to fit, got {len(np.unique(x))}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("x, y: expected finite numbers, got NaN or inf")
    if positive and not (np.all(x > 0) and np.all(y > 0)):
        raise ValueError("budgets, n_opts: expected positive numbers (their logarithms are fitted)")
    return x, y


def _check_sweep(budgets, sizes, tokens_per_step):
    if len(budgets) < 2:
        raise ValueError(f"budgets: expected at least 2 compute budgets (a power law needs two), got {len(budgets)}")
    if len(sizes) < 3:
        raise ValueError(f"sizes: expected at least 3 model sizes per budget (a parabola needs three), "
                         f"got {len(sizes)}")
    for b in budgets:
        check_number("budgets[i]", b, 0.0, lo_open=True)
    check_int_arg("tokens_per_step", tokens_per_step, lo=1)
