"""backprop.py: softmax, cross-entropy, dropout, residual, and the checker itself."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from helpers import assert_close, assert_gradcheck, on
from minillm import backprop as bp
from strategies import randn, seeds, shapes


# --- softmax ---------------------------------------------------------------

@given(shape=shapes(1, 3), seed=seeds)
def test_softmax_backward_matches_finite_differences(xp, shape, seed):
    x = on(xp, randn(seed, *shape, scale=2.0))
    assert_gradcheck(bp.gradcheck(bp.softmax_forward, bp.softmax_backward, [x]))


@given(shape=shapes(1, 3), seed=seeds, c=st.floats(-50, 50))
def test_softmax_rows_sum_to_one_and_ignore_a_shift(xp, shape, seed, c):
    x = on(xp, randn(seed, *shape, scale=5.0))
    y, _ = bp.softmax_forward(x)
    assert_close(y.sum(-1), np.ones(shape[:-1]), rtol=1e-12)
    y2, _ = bp.softmax_forward(x + c)
    assert_close(y, y2, rtol=1e-9, atol=1e-15)


def test_softmax_is_stable_for_huge_logits(xp):
    x = on(xp, np.array([[1000.0, 1000.0, -1000.0]]))
    y, _ = bp.softmax_forward(x)
    assert_close(y, [[0.5, 0.5, 0.0]])
    assert np.all(np.isfinite(bp.log_softmax(x).get() if hasattr(x, "get") else bp.log_softmax(x)[:, :2]))


@given(shape=shapes(1, 3), seed=seeds)
def test_log_softmax_equals_log_of_softmax(xp, shape, seed):
    x = on(xp, randn(seed, *shape, scale=3.0))
    assert_close(bp.log_softmax(x), np.log(np.asarray(bp.softmax_forward(x)[0].tolist())), rtol=1e-10)


# --- cross-entropy ---------------------------------------------------------

@st.composite
def ce_case(draw):
    n = draw(st.integers(1, 4)); t = draw(st.integers(1, 3)); v = draw(st.integers(2, 7))
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, t, v)) * 2
    targets = rng.integers(0, v, size=(n, t))
    ignore = rng.random((n, t)) < 0.3
    targets[ignore] = -100
    s = draw(st.sampled_from([0.0, 0.1, 0.5]))
    return logits, targets, s


@given(case=ce_case())
def test_cross_entropy_backward_matches_finite_differences(xp, case):
    logits, targets, s = case
    logits, targets = on(xp, logits, targets)
    rep = bp.gradcheck(bp.softmax_cross_entropy_forward, bp.softmax_cross_entropy_backward,
                       [logits, targets], wrt=[0], kwargs=dict(label_smoothing=s))
    assert_gradcheck(rep)


@given(case=ce_case())
def test_cross_entropy_properties(xp, case):
    logits, targets, s = case
    lg, tg = on(xp, logits, targets)
    loss, cache = bp.softmax_cross_entropy_forward(lg, tg, label_smoothing=s)
    assert float(loss) >= 0
    # ignored targets contribute nothing to loss or gradient
    changed = logits.copy()
    changed[targets == -100] += 17.0
    loss2, _ = bp.softmax_cross_entropy_forward(on(xp, changed), tg, label_smoothing=s)
    assert abs(float(loss) - float(loss2)) < 1e-10
    d = np.asarray(bp.softmax_cross_entropy_backward(1.0, cache).tolist())
    assert np.all(d[targets == -100] == 0)
    # an independent implementation, written the long way
    V = logits.shape[-1]
    rows = [(l, t) for l, t in zip(logits.reshape(-1, V), targets.reshape(-1)) if t != -100]
    if rows:
        ref = 0.0
        for l, t in rows:
            logp = l - np.log(np.sum(np.exp(l)))
            q = np.full(V, s / V); q[t] += 1 - s
            ref += -np.sum(q * logp)
        assert abs(float(loss) - ref / len(rows)) < 1e-10
    else:
        assert float(loss) == 0.0


@given(v=st.integers(2, 50), c=st.floats(-10, 10), n=st.integers(1, 5))
def test_cross_entropy_of_constant_logits_is_log_v(xp, v, c, n):
    lg = on(xp, np.full((n, v), c))
    tg = on(xp, np.arange(n) % v)
    loss, _ = bp.softmax_cross_entropy_forward(lg, tg)
    assert abs(float(loss) - np.log(v)) < 1e-12


def test_cross_entropy_bad_input(xp):
    lg = on(xp, np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="targets"):
        bp.softmax_cross_entropy_forward(lg, on(xp, np.zeros((2, 4), dtype=np.int64)))
    with pytest.raises(TypeError, match="targets"):
        bp.softmax_cross_entropy_forward(lg, on(xp, np.zeros((2, 3))))
    with pytest.raises(TypeError, match="logits"):
        bp.softmax_cross_entropy_forward(on(xp, np.zeros((2, 3, 5), dtype=np.int64)), on(xp, np.zeros((2, 3), dtype=np.int64)))
    with pytest.raises(ValueError, match=r"targets: expected class ids in \[0, 5\)"):
        bp.softmax_cross_entropy_forward(lg, on(xp, np.full((2, 3), 5)))
    with pytest.raises(ValueError, match="label_smoothing"):
        bp.softmax_cross_entropy_forward(lg, on(xp, np.zeros((2, 3), dtype=np.int64)), label_smoothing=1.5)


# --- dropout and residual ----------------------------------------------------

@given(shape=shapes(1, 3), seed=seeds, p=st.sampled_from([0.0, 0.1, 0.5, 0.9]))
def test_dropout_backward_matches_finite_differences(xp, shape, seed, p):
    x = on(xp, randn(seed, *shape))

    def fwd(x):  # a fresh generator with the same seed: the same mask every call
        return bp.dropout_forward(x, p, np.random.default_rng(seed))
    assert_gradcheck(bp.gradcheck(fwd, bp.dropout_backward, [x]))


@given(shape=shapes(1, 3), seed=seeds)
def test_dropout_p0_is_identity(xp, shape, seed):
    x = on(xp, randn(seed, *shape))
    y, _ = bp.dropout_forward(x, 0.0, np.random.default_rng(seed))
    assert y is x


@given(p=st.sampled_from([0.1, 0.3, 0.6]), seed=seeds)
def test_dropout_preserves_expectation(xp, p, seed):
    n = 200_000
    x = on(xp, np.full(n, 2.0))
    y, cache = bp.dropout_forward(x, p, np.random.default_rng(seed))
    y = np.asarray(y.tolist())
    # the mean of n iid scaled Bernoullis: std = 2 * sqrt(p / (1 - p) / n); allow 6 sigma
    assert abs(y.mean() - 2.0) <= 6 * 2.0 * np.sqrt(p / (1 - p) / n)
    kept = np.mean(y != 0)
    assert abs(kept - (1 - p)) <= 6 * np.sqrt(p * (1 - p) / n)


def test_dropout_bad_p(xp):
    x = on(xp, np.zeros(3))
    for p in (-0.1, 1.0, 2):
        with pytest.raises(ValueError, match="p: expected a probability"):
            bp.dropout_forward(x, p, np.random.default_rng(0))
    with pytest.raises(TypeError, match="x"):
        bp.dropout_forward(on(xp, np.zeros(3, dtype=np.int32)), 0.5, np.random.default_rng(0))


@given(shape=shapes(1, 3), seed=seeds)
def test_residual_backward_matches_finite_differences(xp, shape, seed):
    x, fx = on(xp, randn(seed, *shape), randn(seed + 1, *shape))
    assert_gradcheck(bp.gradcheck(bp.residual_forward, bp.residual_backward, [x, fx]))


def test_residual_shape_mismatch(xp):
    with pytest.raises(ValueError, match="fx"):
        bp.residual_forward(on(xp, np.zeros((2, 3))), on(xp, np.zeros((3,))))


# --- the checker must be able to fail ----------------------------------------

def test_gradcheck_catches_a_wrong_backward():
    def wrong_backward(dy, cache):
        return bp.softmax_backward(dy, cache) * 1.001
    rep = bp.gradcheck(bp.softmax_forward, wrong_backward, [randn(0, 3, 4)])
    assert rep.max_rel_error > 1e-4
    assert rep.where[0] == "input0" and len(rep.where[1]) == 2
    assert "max relative error" in str(rep)


def test_gradcheck_catches_an_error_that_sums_to_zero():
    # dx + c (constant over the row) cancels against an all-ones upstream gradient
    # through softmax's shift invariance only if the checker used dy = 1; it must not.
    def shifted_backward(dy, cache):
        return bp.softmax_backward(dy, cache) + 0.01
    rep = bp.gradcheck(bp.softmax_forward, shifted_backward, [randn(1, 2, 5)])
    assert rep.max_rel_error > 1e-4


def test_gradcheck_refuses_float32():
    with pytest.raises(TypeError, match="float64"):
        bp.gradcheck(bp.softmax_forward, bp.softmax_backward, [randn(0, 3).astype(np.float32)])


def test_gradcheck_resolves_a_one_in_a_million_error():
    # The resolution floor must leave ordinary gradients judged relatively: an error of
    # 1e-6 (ten times the bar) on softmax's gradient is found, on an input and its scaled copy.
    def off_by_a_millionth(dy, cache):
        return bp.softmax_backward(dy, cache) * (1 + 1e-6)
    for scale in (1.0, 1e-3):
        rep = bp.gradcheck(bp.softmax_forward, off_by_a_millionth, [randn(2, 3, 4) * scale])
        assert rep.max_rel_error > 3e-7, (scale, str(rep))


def test_gradcheck_judges_gradients_below_float64_resolution_on_absolute_error():
    # y = x * w with w ~ 1e-12: dL/dx = dy * w is far below what a float64 difference of
    # terms of size |x w| / eps resolves, so round-off in the numeric value must not
    # count as a relative error; a wrong factor on the large gradient still does.
    x, w = randn(3, 2, 3), randn(4, 2, 3) * 1e-12

    def forward(x, w):
        return x * w, (x, w)

    def backward(dy, cache):
        x, w = cache
        return dy * w, dy * x

    assert bp.gradcheck(forward, backward, [x, w]).max_rel_error <= 1e-7
    rep = bp.gradcheck(forward, lambda dy, c: (backward(dy, c)[0], backward(dy, c)[1] * 1.01), [x, w])
    assert rep.max_rel_error > 1e-3 and rep.where[0] == "input1"
