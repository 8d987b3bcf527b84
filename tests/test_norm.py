"""norm.py: LayerNorm and RMSNorm."""
import math

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from helpers import assert_close, assert_gradcheck, np_, on
from minillm import backprop as bp
from minillm import norm
from strategies import randn, seeds, shapes


@st.composite
def norm_case(draw, min_c=2):
    lead = draw(shapes(0, 2, 1, 3))
    C = draw(st.integers(min_c, 6))
    return lead, C, draw(seeds)


def _data(seed, lead, C, scale=1.0, shift=0.0):
    """x with rows of varied scale and offset, so the check exercises the statistics."""
    x = randn(seed, *lead, C, scale=scale) + shift
    w = 1.0 + 0.5 * randn(seed + 1, C)
    b = randn(seed + 2, C)
    return x, w, b


# --- finite-difference checks -----------------------------------------------------

@given(case=norm_case(min_c=3), bias=st.booleans(), scale=st.sampled_from([0.3, 1.0, 5.0]),
       shift=st.sampled_from([0.0, 3.0]))
def test_layernorm_backward_matches_finite_differences(xp, case, bias, scale, shift):
    # C >= 3: with C = 2 every normalised row is (+-1, -+1) up to eps, so dx is ~eps-sized
    # and a finite difference cannot resolve it (torch parity below covers C = 2).
    lead, C, seed = case
    x, w, b = _data(seed, lead, C, scale, shift)
    # The random upstream gradient makes the check sensitive to every direction of x,
    # including the ones LayerNorm is blind to (a constant shift of a row): a backward
    # that got those wrong would be caught through the other coordinates' mismatch.
    # The finite-difference step scales with the narrowest row's spread: LN sees x only
    # through (x - mean) / std, so a fixed step would be too coarse for a narrow row
    # (truncation) or lost in the rounding of x - mean for a row far from 0 (cancellation).
    h = 1e-3 * float(np.min(x.std(axis=-1)))
    if bias:
        rep = bp.gradcheck(norm.layernorm_forward, norm.layernorm_backward, list(on(xp, x, w, b)), eps=h)
    else:
        rep = bp.gradcheck(norm.layernorm_forward, norm.layernorm_backward,
                           [*on(xp, x, w), None], wrt=[0, 1], eps=h)
    assert_gradcheck(rep)


@given(case=norm_case(min_c=2), scale=st.sampled_from([0.3, 1.0, 5.0]), eps=st.sampled_from([1e-6, 1e-2]))
def test_rmsnorm_backward_matches_finite_differences(xp, case, scale, eps):
    # C >= 2: with C = 1 the output is sign(x) * weight up to eps and dx is ~eps-sized
    lead, C, seed = case
    x, w, _ = _data(seed, lead, C, scale)
    # A step proportional to the smallest row's RMS, as for LayerNorm: RMSNorm sees x only
    # through x / rms(x), whose curvature grows as 1 / rms^2 (a step of 1e-3 x's overall
    # scale reached 8e-7 error on a row 5x smaller than the rest).
    h = 1e-3 * float(np.min(np.sqrt((x * x).mean(axis=-1))))
    rep = bp.gradcheck(norm.rmsnorm_forward, norm.rmsnorm_backward, list(on(xp, x, w)), kwargs=dict(eps=eps),
                       eps=h)
    assert_gradcheck(rep)


def test_layernorm_gradient_is_orthogonal_to_the_blind_directions(xp):
    # LayerNorm ignores x -> x + c, so dx must sum to 0 over each row; and with
    # weight 1 it ignores x -> a x up to eps, so dx . x ~ 0 per row too.
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((4, 7)) * 3 + 2, rng.standard_normal((4, 7))
    _, cache = norm.layernorm_forward(*on(xp, x, np.ones(7), np.zeros(7)), eps=1e-12)
    dx = np_(norm.layernorm_backward(on(xp, dy), cache)[0])
    assert np.max(np.abs(dx.sum(-1))) < 1e-13
    assert np.max(np.abs((dx * x).sum(-1))) < 1e-11


# --- properties -------------------------------------------------------------------

@given(case=norm_case(), scale=st.floats(0.01, 100), shift=st.floats(-100, 100))
def test_layernorm_rows_have_mean_0_and_variance_1(xp, case, scale, shift):
    lead, C, seed = case
    x = randn(seed, *lead, C) * scale + shift
    assume(np.min(np.std(x, axis=-1), initial=1.0) >= 1e-3 * scale)   # not an (almost) constant row:
    # there the variance is ~ 0 and eps dominates
    eps = 1e-12
    y = np_(norm.layernorm_forward(*on(xp, x, np.ones(C), np.zeros(C)), eps=eps)[0])
    assert np.max(np.abs(y.mean(-1))) < 1e-10
    v = x.var(-1)
    assert np.max(np.abs(y.var(-1) - v / (v + eps))) < 1e-10   # 1, up to eps's share
    assert np.all(np.abs(y.var(-1) - 1)[v > 1e-4] < 1e-7)           # which is ~1 unless var ~ eps


@given(case=norm_case(), a=st.floats(0.1, 10), c=st.floats(-10, 10))
def test_layernorm_is_invariant_to_positive_affine_maps_of_x(xp, case, a, c):
    lead, C, seed = case
    x, w, b = _data(seed, lead, C, scale=2.0)
    y1 = norm.layernorm_forward(*on(xp, x, w, b), eps=1e-14)[0]
    y2 = norm.layernorm_forward(*on(xp, a * x + c, w, b), eps=1e-14)[0]
    # Invariance is exact only up to eps: 1 / sqrt(var + eps) moves by eps / (2 var)
    # relative when var becomes a^2 var, which matters for a row of nearly equal values
    # (C = 2 with x1 ~ x2 gave 2e-8). |x_hat| <= sqrt(C), so y moves at most by:
    vmin = float(np.min(x.var(axis=-1)))
    drift = float(np.max(np.abs(w))) * np.sqrt(C) * 1e-14 / (2 * vmin) * max(1.0, a ** -2)
    assert_close(y1, y2, rtol=1e-8, atol=1e-8 + drift)


@given(case=norm_case(min_c=1), a=st.floats(0.1, 10))
def test_rmsnorm_is_invariant_to_positive_scaling_of_x(xp, case, a):
    lead, C, seed = case
    x, w, _ = _data(seed, lead, C, scale=2.0)
    y1 = norm.rmsnorm_forward(*on(xp, x, w), eps=1e-14)[0]
    y2 = norm.rmsnorm_forward(*on(xp, a * x, w), eps=1e-14)[0]
    assert_close(y1, y2, rtol=1e-9, atol=1e-9)
    # and (weight 1) every row has root mean square 1
    y = np_(norm.rmsnorm_forward(*on(xp, x, np.ones(C)), eps=1e-14)[0])
    assert_close(np.sqrt((y * y).mean(-1)), np.ones(lead), rtol=1e-9)


def test_layernorm_is_stable_when_the_mean_dwarfs_the_spread(xp):
    # one-pass E[x^2] - E[x]^2 would return garbage here; two passes do not
    x = 1e6 + np.array([[1.0, 2.0, 3.0, 4.0]])
    y = norm.layernorm_forward(*on(xp, x, np.ones(4), np.zeros(4)), eps=1e-12)[0]
    ref = (np.arange(1, 5) - 2.5) / math.sqrt(1.25)
    assert_close(y, ref[None], rtol=1e-9, atol=1e-9)


@given(case=norm_case(), bias=st.booleans())
def test_layernorm_and_rmsnorm_match_a_naive_loop(xp, case, bias):
    lead, C, seed = case
    x, w, b = _data(seed, lead, C, scale=2.0, shift=1.0)
    eps = 1e-5
    ln_ref, rms_ref = [], []
    for row in x.reshape(-1, C).tolist():
        mu = sum(row) / C
        var = sum((v - mu) ** 2 for v in row) / C
        ln_ref.append([(v - mu) / math.sqrt(var + eps) * w[i] + (b[i] if bias else 0.0) for i, v in enumerate(row)])
        ms = sum(v * v for v in row) / C
        rms_ref.append([v / math.sqrt(ms + eps) * w[i] for i, v in enumerate(row)])
    y = norm.layernorm_forward(*on(xp, x, w), on(xp, b) if bias else None, eps=eps)[0]
    assert_close(y, np.array(ln_ref).reshape(x.shape), rtol=1e-12, atol=1e-13)
    y = norm.rmsnorm_forward(*on(xp, x, w), eps=eps)[0]
    assert_close(y, np.array(rms_ref).reshape(x.shape), rtol=1e-12, atol=1e-13)


def test_float32_stays_float32(xp):
    rng = np.random.default_rng(0)
    x, dy = (on(xp, rng.standard_normal((2, 3, 8)).astype(np.float32)) for _ in range(2))
    w, b = on(xp, np.ones(8, np.float32), np.zeros(8, np.float32))
    y, cache = norm.layernorm_forward(x, w, b)
    assert y.dtype == np.float32
    assert all(g.dtype == np.float32 for g in norm.layernorm_backward(dy, cache))
    y, cache = norm.rmsnorm_forward(x, w, eps=np.float64(1e-6))   # a float64 eps must not upcast
    assert y.dtype == np.float32
    assert all(g.dtype == np.float32 for g in norm.rmsnorm_backward(dy, cache))


# --- an independent implementation: PyTorch in float64 -----------------------------------

@given(case=norm_case(), bias=st.booleans(), which=st.sampled_from(["layernorm", "rmsnorm"]))
def test_norms_agree_with_torch(xp, case, bias, which):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    lead, C, seed = case
    x, w, b = _data(seed, lead, C, scale=2.0, shift=1.0)
    dy = randn(seed + 7, *lead, C)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    if which == "layernorm":
        y, cache = norm.layernorm_forward(*on(xp, x, w), on(xp, b) if bias else None, eps=1e-5)
        grads = norm.layernorm_backward(on(xp, dy), cache)
        ref = F.layer_norm(tx, (C,), tw, tb if bias else None, eps=1e-5)
        ours, theirs = [grads[0], grads[1]] + ([grads[2]] if bias else []), [tx, tw] + ([tb] if bias else [])
        assert bias or grads[2] is None
    else:
        y, cache = norm.rmsnorm_forward(*on(xp, x, w), eps=1e-6)
        grads = norm.rmsnorm_backward(on(xp, dy), cache)
        ref = F.rms_norm(tx, (C,), tw, eps=1e-6)
        ours, theirs = list(grads), [tx, tw]
    ref.backward(torch.tensor(dy))
    assert_close(y, ref.detach().numpy(), rtol=1e-12, atol=1e-13, msg="forward")
    for g, t in zip(ours, theirs):
        assert_close(g, t.grad.numpy(), rtol=1e-11, atol=1e-13)


# --- bad input --------------------------------------------------------------------------

def test_bad_input(xp):
    x, w, b = on(xp, np.zeros((2, 4)), np.ones(4), np.zeros(4))
    for eps in (0.0, -1e-5, float("nan"), None):
        with pytest.raises(ValueError, match="eps: expected a positive number"):
            norm.layernorm_forward(x, w, b, eps=eps)
        with pytest.raises(ValueError, match="eps: expected a positive number"):
            norm.rmsnorm_forward(x, w, eps=eps)
    with pytest.raises(ValueError, match=r"weight: expected shape \(4,\) \(x's last axis\), got \(3,\)"):
        norm.layernorm_forward(x, on(xp, np.ones(3)), b)
    with pytest.raises(ValueError, match=r"weight: expected shape \(4,\)"):
        norm.rmsnorm_forward(x, on(xp, np.ones((1, 4))))        # no silent broadcast
    with pytest.raises(ValueError, match=r"bias: expected shape \(4,\)"):
        norm.layernorm_forward(x, w, on(xp, np.zeros(5)))
    with pytest.raises(TypeError, match="x: expected a floating-point array"):
        norm.layernorm_forward(on(xp, np.zeros((2, 4), dtype=np.int32)), w, b)
    with pytest.raises(TypeError, match="weight: expected a floating-point array"):
        norm.rmsnorm_forward(x, on(xp, np.ones(4, dtype=np.int64)))
    with pytest.raises(TypeError, match="weight: expected dtype float64"):
        norm.layernorm_forward(x, w.astype(np.float32), b)
    with pytest.raises(ValueError, match="x: expected at least 1 dimension"):
        norm.rmsnorm_forward(on(xp, np.array(1.0)), w)
    _, cache = norm.layernorm_forward(x, w, b)
    with pytest.raises(ValueError, match=r"dy: expected shape \(2, 4\)"):
        norm.layernorm_backward(on(xp, np.zeros((4,))), cache)


def test_init_norm():
    w, b = norm.init_norm(5, device="cpu")
    assert w.dtype == np.float32 and np.all(w == 1) and np.all(b == 0) and b.shape == (5,)
    assert norm.init_norm(5, bias=False, device="cpu")[1] is None
