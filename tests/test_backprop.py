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


def _product(x, w, u):
    """y = u + x * w, elementwise: dL/dx = dy * w, dL/dw = dy * x (u is not differentiated)."""
    return u + x * w, (x, w)


def _product_backward(dy, cache):
    x, w = cache
    return dy * w, dy * x


def test_gradcheck_judges_gradients_below_float64_resolution_on_absolute_error():
    # y = u + x w with u ~ 1 and w ~ 1e-9: each term is ~1, so a float64 difference of the
    # objective carries ~1e-12 of round-off, and dL/dx = dy w ~ 1e-9 cannot be resolved to
    # 1e-7 relative (the plain central difference is ~1e-4 off, relatively). The checker
    # judges dx on its absolute error there, so the right dx passes; but it still compares
    # dx: 5x dx, or a dx of 0, is far more than round-off and fails, as does 1.01 dw.
    x, w, u = randn(3, 2, 3), randn(4, 2, 3) * 1e-9, 1 + randn(5, 2, 3) ** 2
    dy = randn(0, 2, 3)  # gradcheck's own draw for seed 0
    plain = bp.numerical_gradient(lambda x: np.sum(dy * _product(x, w, u)[0]), x.copy())
    assert np.max(np.abs(plain - dy * w) / np.abs(dy * w)) > 1e-6  # below what float64 resolves

    def check(backward):
        return bp.gradcheck(_product, backward, [x, w, u], wrt=[0, 1])

    good = check(_product_backward)
    assert good.max_rel_error <= 1e-7, str(good)
    for wrong_dx in (lambda dx: 5 * dx, lambda dx: 0 * dx):
        rep = check(lambda dy, c: (wrong_dx(_product_backward(dy, c)[0]), _product_backward(dy, c)[1]))
        assert rep.max_rel_error > 1e-6 and rep.where[0] == "input0", str(rep)
    rep = check(lambda dy, c: (_product_backward(dy, c)[0], _product_backward(dy, c)[1] * 1.01))
    assert rep.max_rel_error > 1e-3 and rep.where[0] == "input1", str(rep)


def _scaled_softmax(s):
    """y = s softmax(x): every gradient is s times softmax's, the objective s times its."""
    def forward(x):
        y, cache = bp.softmax_forward(x)
        return s * y, cache

    def backward(dy, cache):
        return bp.softmax_backward(s * dy, cache)
    return forward, backward


def _two_layers(s1, s2):
    """(y1, y2) = (s1 softmax(x), s2 softmax(z)): two inputs whose gradients differ in scale.
    The backward takes ``factor``, a planted error on dx."""
    (f1, b1), (f2, b2) = _scaled_softmax(s1), _scaled_softmax(s2)

    def forward(x, z):
        (y1, c1), (y2, c2) = f1(x), f2(z)
        return (y1, y2), (c1, c2)

    def backward(dys, caches, factor=1.0):
        return factor * b1(dys[0], caches[0]), b2(dys[1], caches[1])
    return forward, backward


scales = st.floats(-12, 12).map(lambda k: 10.0 ** k)


@given(s=scales, seed=seeds, shape=shapes(2, 3, lo=2, hi=4))
def test_gradcheck_finds_a_one_in_a_million_error_at_every_scale(s, seed, shape):
    # Every floor is relative: at gradients of size 1e-12 or 1e12 a correct backward passes
    # and one 1e-6 off (ten times the bar) fails, as it does at size 1.
    forward, backward = _scaled_softmax(s)
    x = randn(seed, *shape)
    good = bp.gradcheck(forward, backward, [x], seed=seed)
    assert good.max_rel_error <= 1e-7, (s, str(good))
    off = bp.gradcheck(forward, lambda dy, c: backward(dy, c) * (1 + 1e-6), [x], seed=seed)
    assert off.max_rel_error > 3e-7, (s, str(off))
    # and the same beside a layer whose gradients are 1e4 times larger (one check, two
    # scales): the error is planted in the smaller one
    forward, backward = _two_layers(s, 1e4 * s)
    xz = [randn(seed, *shape), randn(seed + 1, *shape)]
    assert bp.gradcheck(forward, backward, xz, seed=seed).max_rel_error <= 1e-7
    rep = bp.gradcheck(forward, lambda dy, c: backward(dy, c, factor=1 + 1e-6), xz, seed=seed)
    assert rep.max_rel_error > 3e-7 and rep.where[0] == "input0", (s, str(rep))


@given(s=scales, seed=seeds)
def test_gradcheck_verdict_does_not_depend_on_the_objectives_scale(s, seed):
    # Scaling f (and so every gradient) by s changes no floor's verdict: a backward 1e-5 off
    # reports about 1e-5 at every scale, not 0 because its entries happen to be small.
    x = randn(seed, 3, 4)
    reports = []
    for scale in (1.0, s):
        forward, backward = _scaled_softmax(scale)
        reports.append(bp.gradcheck(forward, lambda dy, c: backward(dy, c) * (1 + 1e-5), [x], seed=seed))
    assert reports[1].max_rel_error == pytest.approx(reports[0].max_rel_error, rel=0.05), \
        [str(r) for r in reports]


@pytest.mark.parametrize("atol", [0.0, 1e-9])
@pytest.mark.parametrize("wrong", [0.0, 5.0], ids=["zero", "five_times"])
def test_a_layer_with_tiny_gradients_is_not_forgiven_for_being_small(atol, wrong):
    # Every gradient ~1e-10: a backward returning 0, or 5x the truth, fails, checked alone or
    # beside a layer whose gradients are ~1 (then the floor is set by that layer's round-off),
    # and with the old atol=1e-9 passed explicitly (it floors the denominator, it forgives nothing).
    forward, backward = _scaled_softmax(1e-10)
    x = randn(7, 3, 4)
    rep = bp.gradcheck(forward, lambda dy, c: wrong * backward(dy, c), [x], atol=atol)
    assert rep.max_rel_error > 1e-2, str(rep)
    alone = bp.gradcheck(forward, backward, [x], atol=atol)
    assert alone.max_rel_error <= 1e-7, str(alone)

    two_forward, two_backward = _two_layers(1e-10, 1.0)  # beside an ordinary layer
    xz = [x, randn(8, 3, 4)]
    assert bp.gradcheck(two_forward, two_backward, xz, atol=atol).max_rel_error <= 1e-7
    rep = bp.gradcheck(two_forward, lambda d, c: two_backward(d, c, factor=wrong), xz, atol=atol)
    assert rep.max_rel_error > 1e-4 and rep.where[0] == "input0", str(rep)


def test_gradcheck_reports_nan_and_inf_gradients_as_infinitely_wrong():
    x = randn(0, 2, 3)
    for bad in (np.nan, np.inf):
        def backward(dy, cache):
            dx = bp.softmax_backward(dy, cache)
            dx[0, 1] = bad
            return dx
        rep = bp.gradcheck(bp.softmax_forward, backward, [x])
        assert rep.max_rel_error == np.inf and rep.where == ("input0", (0, 1)), str(rep)


def test_gradcheck_refuses_a_backward_that_returns_more_or_fewer_gradients_than_wrt():
    x, fx = randn(0, 2, 3), randn(1, 2, 3)
    with pytest.raises(ValueError, match=r"backward: expected 2 gradients .*wrt=\[0, 1\].*got 3"):
        bp.gradcheck(bp.residual_forward, lambda dy, c: (dy, dy, dy), [x, fx])
    with pytest.raises(ValueError, match=r"backward: expected 2 gradients .*got 1"):
        bp.gradcheck(bp.residual_forward, lambda dy, c: dy, [x, fx])
    with pytest.raises(ValueError, match=r"backward: expected 1 gradients .*wrt=\[1\].*got 2"):
        bp.gradcheck(bp.residual_forward, bp.residual_backward, [x, fx], wrt=[1])
    # None, the convention's gradient of an absent optional input, is not a gradient
    rep = bp.gradcheck(bp.residual_forward, lambda dy, c: (*bp.residual_backward(dy, c), None), [x, fx])
    assert rep.max_rel_error <= 1e-7
    with pytest.raises(ValueError, match=r"wrt: expected positions of float arrays"):
        bp.gradcheck(bp.residual_forward, bp.residual_backward, [x, fx], wrt=[0, 2])


# --- the textbook numerical gradient --------------------------------------------

def test_numerical_gradient_docstring_example():
    import doctest
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for test in finder.find(bp.numerical_gradient, globs={"np": np, "numerical_gradient": bp.numerical_gradient}):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0 and results.attempted == 2  # the example ran, and printed what it shows
    x = np.array([1.0, -2.0, 3.0])
    assert_close(bp.numerical_gradient(lambda x: np.sum(x ** 2), x), 2 * x, rtol=1e-9)


@given(case=ce_case())
def test_numerical_gradient_agrees_with_the_analytic_gradient_and_the_careful_checker(case):
    logits, targets, s = case
    before = logits.copy()

    def loss(z):
        return bp.softmax_cross_entropy_forward(z, targets, label_smoothing=s)[0]
    plain = bp.numerical_gradient(loss, logits)
    assert np.array_equal(logits, before)  # every entry put back exactly
    dlogits = bp.softmax_cross_entropy_backward(1.0, bp.softmax_cross_entropy_forward(
        logits, targets, label_smoothing=s)[1])
    # central differences at eps 1e-5: ~1e-10 truncation and round-off for a loss of size ~2
    assert_close(plain, dlogits, rtol=1e-6, atol=1e-9)
    # the careful checker's five-point numeric values agree with the plain ones to the same accuracy
    rep = bp.check_dict_gradients(lambda p: loss(p["z"]), {"z": logits}, {"z": plain})
    assert rep.max_rel_error <= 1e-4, str(rep)
    assert np.array_equal(logits, before)


def test_numerical_gradient_bad_input():
    with pytest.raises(TypeError, match="f: expected a function"):
        bp.numerical_gradient(3.0, np.zeros(2))
    with pytest.raises(TypeError, match="x: numerical gradients need float64"):
        bp.numerical_gradient(np.sum, np.zeros(2, dtype=np.float32))
    with pytest.raises(TypeError, match="x: expected a floating-point array"):
        bp.numerical_gradient(np.sum, np.arange(3))
    with pytest.raises(ValueError, match="eps: expected a positive number"):
        bp.numerical_gradient(np.sum, np.zeros(2), eps=0.0)
