"""The feed-forward half of a transformer block: linear layers, activations, MLP, SwiGLU.

Every operation is a forward/backward pair (see backprop.py for the convention):

    y, cache = linear_forward(x, w, b)     # y = x @ w + b
    dx, dw, db = linear_backward(dy, cache)

A linear layer is the only place a transformer learns mixing *across* features;
activations are elementwise, so their backward is an elementwise product with
the local derivative. GPT-2 and BERT use GELU in a 4x-wide MLP; LLaMA-style
models use SwiGLU, a gated MLP with three matrices and no biases.

Speed notes (this is the hot path of training):
- linear reshapes (..., in) to one 2-D matrix so that forward and backward are
  each a single BLAS/cuBLAS matmul, whatever the number of leading axes;
- activations keep constants in the input's dtype (a float64 constant would
  silently upcast float32 arrays under NumPy 2) and update temporaries in place.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

from .backend import (DEFAULT_DTYPE, array_module, check_float, check_ndim, check_same_dtype,
                      make_rng, randn, to_device)

__all__ = [
    "linear_forward", "linear_backward", "init_linear",
    "relu_forward", "relu_backward",
    "erf", "erfc", "gelu_forward", "gelu_backward",
    "sigmoid", "silu_forward", "silu_backward",
    "mlp_forward", "mlp_backward", "ACTIVATIONS",
    "swiglu_forward", "swiglu_backward",
]


def _check_grad_shape(name, dy, shape):
    if tuple(dy.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} (the forward output's), got {tuple(dy.shape)}")


# ---------------------------------------------------------------------------
# Linear
# ---------------------------------------------------------------------------

class LinearCache(NamedTuple):
    x: object       # (..., in) the input, kept by reference (no copy)
    w: object       # (in, out)
    has_bias: bool  # whether to return db or None


def _linear_forward(x, w, b, xname="x", wname="w", bname="b"):
    check_float(xname, x)
    check_float(wname, w)
    check_ndim(wname, w, 2)
    if x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"{wname}: expected shape ({x.shape[-1] if x.ndim else '?'}, *) to match "
                         f"{xname}'s last axis {tuple(x.shape)}, got {tuple(w.shape)}")
    if b is not None:
        check_float(bname, b)
        if tuple(b.shape) != (w.shape[1],):
            raise ValueError(f"{bname}: expected shape ({w.shape[1]},), got {tuple(b.shape)}")
    check_same_dtype(**{xname: x, wname: w, bname: b})
    n_in, n_out = w.shape
    # One 2-D matmul whatever the leading axes: (N, in) @ (in, out) with N = prod(...).
    y = x.reshape(-1, n_in) @ w
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], n_out), LinearCache(x, w, b is not None)


def linear_forward(x, w, b=None):
    """y = x @ w + b.

    x: (..., in), w: (in, out), b: (out,) or None -> y: (..., out)
    """
    return _linear_forward(x, w, b)


def linear_backward(dy, cache: LinearCache):
    """dx = dy @ w^T, dw = x^T dy and db = sum(dy), summed over all leading axes.

    dy: (..., out) -> dx: (..., in), dw: (in, out), db: (out,) or None
    """
    x, w, has_bias = cache
    n_in, n_out = w.shape
    _check_grad_shape("dy", dy, (*x.shape[:-1], n_out))
    dy2 = dy.reshape(-1, n_out)
    x2 = x.reshape(-1, n_in)
    dx = (dy2 @ w.T).reshape(x.shape)
    dw = x2.T @ dy2          # (in, N) @ (N, out): the sum over every position in one GEMM
    db = dy2.sum(axis=0) if has_bias else None
    return dx, dw, db


def init_linear(rng, n_in, n_out, std=0.02, bias=True, dtype=DEFAULT_DTYPE, device=None):
    """(w, b): w ~ Normal(0, std^2) of shape (n_in, n_out), b zeros (n_out,) or None.

    GPT-2 and BERT both initialise with std 0.02. Drawn on the CPU from a seeded
    generator, then moved to ``device`` (default MINILLM_DEVICE).
    """
    w = randn(make_rng(rng), (n_in, n_out), std=std, dtype=dtype, device=device)
    b = to_device(np.zeros(n_out, dtype=dtype), device) if bias else None
    return w, b


# ---------------------------------------------------------------------------
# ReLU
# ---------------------------------------------------------------------------

class ReluCache(NamedTuple):
    mask: object  # (...) bool, x > 0: one byte per element is all backward needs


def relu_forward(x):
    """y = max(x, 0). x: (...) -> y: (...)"""
    check_float("x", x)
    xp = array_module(x)
    mask = x > 0
    return xp.where(mask, x, x.dtype.type(0)), ReluCache(mask)


def relu_backward(dy, cache: ReluCache):
    """dx = dy where x > 0, else 0 (the subgradient 0 is taken at x == 0)."""
    _check_grad_shape("dy", dy, cache.mask.shape)
    xp = array_module(dy)
    return xp.where(cache.mask, dy, dy.dtype.type(0))


# ---------------------------------------------------------------------------
# erf: NumPy has none, so here is one
# ---------------------------------------------------------------------------
#
# Two regions, split at |z| = 2:
#
# |z| < 2, float64: the everywhere-convergent series
#     erf(z) = 2/sqrt(pi) * exp(-z^2) * sum_n 2^n z^(2n+1) / (1*3*5*...*(2n+1)),
#   whose terms are all positive (no cancellation, unlike the alternating Taylor
#   series, which loses a digit near z = 2): 32 terms reach ~1e-16 relative.
# |z| < 2, float32/float16: speed matters more (BERT's GELU runs on every hidden
#   unit), so we use a degree-10 (float32) polynomial in z^2, erf(z) = z P(z^2),
#   obtained by Chebyshev interpolation of the float64 series above at import
#   time (no magic constants): ~4e-7 relative, with a third of the work.
# |z| >= 2: the continued fraction for erfc (in its even, faster-converging form)
#     erfc(z) = 2z exp(-z^2)/sqrt(pi) / (2z^2+1 - 1*2/(2z^2+5 - 3*4/(2z^2+9 - ...))),
#   evaluated bottom-up at a fixed depth; erf = 1 - erfc. It keeps erfc's tiny
#   values to full relative precision (erfc(10) ~ 2e-45), which 1 - erf cannot.
#
# Arrays are evaluated with the |z| < 2 method everywhere (on z clipped to +-2,
# so nothing overflows) and then the few entries with |z| >= 2 are recomputed:
# index lists (flatnonzero/take/put) touch only those entries, where boolean
# masks would cost several passes over the whole array.
# The term counts were chosen by measuring against math.erf / math.erfc; at
# z = 2, where both expansions converge slowest, they reach rounding level.

_SERIES_TERMS = 32
_CF_DEPTH = {np.dtype(np.float64): 30, np.dtype(np.float32): 8, np.dtype(np.float16): 5}
_POLY_DEGREE = {np.dtype(np.float32): 10, np.dtype(np.float16): 5}
_ERF_SPLIT = 2.0
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


def _series_coeffs(n_terms):
    c = [1.0]
    for n in range(1, n_terms):
        c.append(c[-1] * 2.0 / (2 * n + 1))
    return c


def _erf_series(xp, z):
    """erf(z) for |z| <= 2 by the positive series (Horner in z^2), in z's dtype."""
    t = z.dtype.type
    c = _series_coeffs(_SERIES_TERMS)
    s = z * z
    acc = xp.full_like(z, t(c[-1]))
    for ck in reversed(c[:-1]):
        acc *= s
        acc += t(ck)
    acc *= z
    xp.negative(s, out=s)
    xp.exp(s, out=s)     # |z| <= 2 keeps z*z's rounding below an ulp of exp(-z^2)
    acc *= s
    acc *= t(_TWO_OVER_SQRT_PI)
    return acc


@functools.lru_cache(maxsize=None)
def _erf_poly_coeffs(dtype):
    """Power-basis coefficients of P(s) = erf(sqrt s) / sqrt s on s in [0, 4], by Chebyshev
    interpolation of the float64 series (then rounded to ``dtype``)."""
    from numpy.polynomial import Chebyshev, Polynomial

    def p(s):                       # Chebyshev nodes are interior: s > 0
        z = np.sqrt(s)
        return _erf_series(np, z) / z
    cheb = Chebyshev.interpolate(p, _POLY_DEGREE[np.dtype(dtype)], domain=[0.0, 4.0])
    return tuple(np.dtype(dtype).type(c) for c in cheb.convert(kind=Polynomial).coef)


def _erf_poly(xp, z):
    """erf(z) = z P(z^2) for |z| <= 2 in float32/float16."""
    c = _erf_poly_coeffs(z.dtype)
    s = z * z
    acc = xp.full_like(z, c[-1])
    for ck in reversed(c[:-1]):
        acc *= s
        acc += ck
    acc *= z
    return acc


def _erf_inner(xp, z):
    """erf(z) for |z| <= 2 with the dtype's method."""
    if z.dtype == np.float64 or z.dtype not in _POLY_DEGREE:
        return _erf_series(xp, z)
    return _erf_poly(xp, z)


def _erfc_large(xp, z):
    """erfc(z) for z >= 2 by the continued fraction (fixed depth, bottom-up)."""
    t = z.dtype.type
    depth = _CF_DEPTH.get(z.dtype, 30)
    z = xp.minimum(z, t(30))    # erfc(30) ~ 1e-393 is 0 in every dtype; keeps inf and 1e30 finite here
    s = 2 * z * z
    d = s + t(4 * depth + 1)
    for k in range(depth, 0, -1):
        d = s + t(4 * k - 3) - t((2 * k - 1) * (2 * k)) / d
    return t(_TWO_OVER_SQRT_PI) * z * _exp_minus_square(xp, z) / d


def _exp_minus_square(xp, z):
    """exp(-z^2) without the rounding error of z*z: for z ~ 20, z*z is off by ~4e-14
    relative, and exp turns that into a relative error of ~4e-14 * z^2. Split
    z = hi + lo with hi on a 1/256 grid, so hi*hi is exact, and z^2 = hi^2 + (2 hi + lo) lo."""
    t = z.dtype.type
    hi = xp.floor(z * t(256)) / t(256)
    lo = z - hi
    return xp.exp(-hi * hi) * xp.exp(-(hi + hi + lo) * lo)


def _special(xp, name):
    """cupyx.scipy.special's erf/erfc on CuPy (None on NumPy), returning the input's dtype:
    CuPy computes float16 in float32 or float64, and we never change dtype silently."""
    if xp is np:
        return None
    import cupyx.scipy.special  # type: ignore
    f = getattr(cupyx.scipy.special, name)
    return lambda x: f(x).astype(x.dtype, copy=False)


def _inner_and_tails(xp, z):
    """(erf of z clipped to [-2, 2], flat indices where z >= 2, where z <= -2)."""
    split = z.dtype.type(_ERF_SPLIT)
    inner = _erf_inner(xp, xp.clip(z, -split, split))
    flat = z.reshape(-1)
    return inner, xp.flatnonzero(flat >= split), xp.flatnonzero(flat <= -split)


def _patch(out, idx, values):
    """out.flat[idx] = values, for the few entries outside |z| < 2."""
    if idx.size:
        out.reshape(-1)[idx] = values


def erf(x):
    """The error function erf(x) = 2/sqrt(pi) * int_0^x exp(-t^2) dt, elementwise.

    NumPy arrays: our own series / polynomial / continued fraction (about 1e-16
    relative in float64, ~4e-7 in float32; the dtype of x is kept). CuPy arrays:
    cupyx.scipy.special.erf. x: (...) float -> (...)
    """
    check_float("x", x)
    xp = array_module(x)
    f = _special(xp, "erf")
    if f is not None:
        return f(x)
    out, hi, lo = _inner_and_tails(xp, x)
    flat = x.reshape(-1)
    _patch(out, hi, 1 - _erfc_large(xp, flat[hi]))
    _patch(out, lo, _erfc_large(xp, -flat[lo]) - 1)
    return out


def erfc(x):
    """The complementary error function erfc(x) = 1 - erf(x), accurate in the tail.

    1 - erf(x) would lose every digit once erf(x) rounds to 1 (x > ~6 in
    float64); erfc keeps them: erfc(10) ~ 2.1e-45 to full relative precision.
    (Between 0.5 and 2 it is 1 - erf, good to ~1e-13 relative in float64.)
    x: (...) float -> (...)
    """
    check_float("x", x)
    xp = array_module(x)
    f = _special(xp, "erfc")
    if f is not None:
        return f(x)
    out, hi, lo = _inner_and_tails(xp, x)
    xp.subtract(x.dtype.type(1), out, out=out)
    flat = x.reshape(-1)
    _patch(out, hi, _erfc_large(xp, flat[hi]))
    _patch(out, lo, 2 - _erfc_large(xp, -flat[lo]))
    return out


def _normal_cdf(x):
    """Phi(x) = 0.5 * erfc(-x / sqrt 2), accurate in the far left tail too."""
    xp = array_module(x)
    t = x.dtype.type
    z = x * t(-1.0 / math.sqrt(2.0))
    f = _special(xp, "erfc")
    if f is not None:
        z = f(z)
        z *= t(0.5)
        return z
    if z.size > _BLOCK:
        # The polynomial is a long chain of elementwise passes; running it block by
        # block keeps each block in the CPU cache (measured ~1.5-2x on 3M float32s).
        phi = np.empty_like(z)
        zf, pf = z.reshape(-1), phi.reshape(-1)
        for i in range(0, zf.size, _BLOCK):
            pf[i:i + _BLOCK] = _normal_cdf_of_minus_sqrt2(xp, zf[i:i + _BLOCK])
        return phi
    return _normal_cdf_of_minus_sqrt2(xp, z)


_BLOCK = 1 << 17


def _normal_cdf_of_minus_sqrt2(xp, z):
    """Phi(x) from z = -x / sqrt 2 on NumPy: 0.5 erfc(z)."""
    t = z.dtype.type
    phi, hi, lo = _inner_and_tails(xp, z)
    phi *= t(-0.5)
    phi += t(0.5)                                              # 0.5 (1 - erf(z)) = 0.5 erfc(z)
    flat = z.reshape(-1)
    _patch(phi, hi, t(0.5) * _erfc_large(xp, flat[hi]))        # x <= -2.83: the left tail
    _patch(phi, lo, 1 - t(0.5) * _erfc_large(xp, -flat[lo]))   # x >= 2.83
    return phi


# ---------------------------------------------------------------------------
# GELU
# ---------------------------------------------------------------------------

_GELU_A = 0.044715
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class GeluCache(NamedTuple):
    x: object            # (...) the input
    phi: object          # (...) Phi(x) ("none") or its tanh approximation ("tanh"): the costly part, reused
    approximate: str


def gelu_forward(x, approximate="tanh"):
    """GELU(x) = x * Phi(x), Phi the standard normal CDF.

    approximate="none":  y = 0.5 x (1 + erf(x / sqrt 2))   (BERT, PyTorch's default)
    approximate="tanh":  y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))   (GPT-2)
    The two differ by less than 1e-3 everywhere. x: (...) -> y: (...)

    The tanh form is computed as x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3),
    using the identity 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u)): the same function,
    but exp is cheaper than tanh, and in the left tail 1 + tanh(u) is a difference
    of nearly equal numbers while 1 / (1 + exp(-2u)) keeps full relative precision.
    """
    check_float("x", x)
    xp = array_module(x)
    t_ = x.dtype.type
    if approximate == "tanh":
        # -2u = x * (-2c - 2ca x^2), built in one buffer in place.
        s = x * x
        s *= t_(-2.0 * _SQRT_2_OVER_PI * _GELU_A)
        s -= t_(2.0 * _SQRT_2_OVER_PI)
        s *= x
        with np.errstate(over="ignore"):    # exp(-2u) = inf for very negative x: then s = 0, exactly right
            xp.exp(s, out=s)
        s += t_(1)
        xp.divide(t_(1), s, out=s)           # s = sigmoid(2u) = 0.5 (1 + tanh(u))
        return x * s, GeluCache(x, s, "tanh")
    if approximate == "none":
        phi = _normal_cdf(x)
        return x * phi, GeluCache(x, phi, "none")
    raise ValueError(f"approximate: expected 'tanh' or 'none', got {approximate!r}")


def gelu_backward(dy, cache: GeluCache):
    """dx = dy * GELU'(x).

    exact:  GELU'(x) = Phi(x) + x * phi(x), phi(x) = exp(-x^2/2) / sqrt(2 pi)
    tanh:   with s = sigmoid(2u), u = c (x + a x^3), c = sqrt(2/pi), and sigmoid' = s (1 - s):
            GELU'(x) = s + x s (1 - s) 2c (1 + 3 a x^2)
                     = s (1 + x (1 - s) 2c (1 + 3 a x^2))
    """
    x, phi, approximate = cache
    _check_grad_shape("dy", dy, x.shape)
    xp = array_module(x)
    t_ = x.dtype.type
    if approximate == "tanh":
        g = x * x
        g *= t_(6.0 * _GELU_A * _SQRT_2_OVER_PI)
        g += t_(2.0 * _SQRT_2_OVER_PI)
        g *= x                      # x 2c (1 + 3 a x^2)
        h = t_(1) - phi
        g *= h
        g += t_(1)
        g *= phi
        g *= dy
        return g
    # exact: phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
    g = x * x
    g *= t_(-0.5)
    xp.exp(g, out=g)
    g *= t_(_INV_SQRT_2PI)
    g *= x
    g += phi
    g *= dy
    return g


# ---------------------------------------------------------------------------
# SiLU (swish)
# ---------------------------------------------------------------------------

def sigmoid(x):
    """1 / (1 + exp(-x)), elementwise, in x's dtype.

    For very negative x, exp(-x) overflows to inf and the result is exactly 0,
    which is the correctly rounded answer, so the overflow warning is silenced
    rather than avoided. This plain form is as accurate as the branching
    e = exp(-|x|) formulation (relative error ~ |x| ulp either way, from exp's
    condition number) and needs fewer passes over the data.
    """
    check_float("x", x)
    xp = array_module(x)
    e = xp.negative(x)
    with np.errstate(over="ignore"):
        xp.exp(e, out=e)
    e += x.dtype.type(1)
    xp.divide(x.dtype.type(1), e, out=e)
    return e


class SiluCache(NamedTuple):
    x: object    # (...) the input
    sig: object  # (...) sigmoid(x)


def silu_forward(x):
    """SiLU(x) = x * sigmoid(x) (also called swish). x: (...) -> y: (...)"""
    s = sigmoid(x)
    return x * s, SiluCache(x, s)


def silu_backward(dy, cache: SiluCache):
    """dx = dy * s (1 + x (1 - s)), s = sigmoid(x), from (x s)' = s + x s (1 - s)."""
    x, s = cache
    _check_grad_shape("dy", dy, x.shape)
    t_ = x.dtype.type
    g = t_(1) - s
    g *= x
    g += t_(1)
    g *= s
    g *= dy
    return g


# ---------------------------------------------------------------------------
# MLP: the transformer's feed-forward block
# ---------------------------------------------------------------------------

# name -> (forward, backward); "gelu" is the tanh approximation (GPT-2),
# "gelu_exact" the erf form (BERT).
ACTIVATIONS = {
    "gelu": (lambda x: gelu_forward(x, "tanh"), gelu_backward),
    "gelu_exact": (lambda x: gelu_forward(x, "none"), gelu_backward),
    "relu": (relu_forward, relu_backward),
    "silu": (silu_forward, silu_backward),
}


class MlpCache(NamedTuple):
    fc: LinearCache     # first linear (holds x)
    act: tuple          # the activation's cache (holds h = x W1 + b1)
    proj: LinearCache   # second linear (holds a = act(h))
    activation: str


def mlp_forward(x, w1, b1, w2, b2, activation="gelu"):
    """y = act(x W1 + b1) W2 + b2.

    x: (..., C), w1: (C, H), b1: (H,) or None, w2: (H, C_out), b2: (C_out,) or None
    activation: "gelu" (tanh approximation), "gelu_exact", "relu" or "silu"
    -> y: (..., C_out)
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
    act_forward, _ = ACTIVATIONS[activation]
    h, fc = _linear_forward(x, w1, b1, "x", "w1", "b1")
    a, act = act_forward(h)
    y, proj = _linear_forward(a, w2, b2, "act(x @ w1 + b1)", "w2", "b2")
    return y, MlpCache(fc, act, proj, activation)


def mlp_backward(dy, cache: MlpCache):
    """Backward of mlp_forward, in reverse order. -> dx, dw1, db1, dw2, db2"""
    fc, act, proj, activation = cache
    _, act_backward = ACTIVATIONS[activation]
    da, dw2, db2 = linear_backward(dy, proj)
    dh = act_backward(da, act)
    dx, dw1, db1 = linear_backward(dh, fc)
    return dx, dw1, db1, dw2, db2


# ---------------------------------------------------------------------------
# SwiGLU: the gated MLP of LLaMA, Mistral, ...
# ---------------------------------------------------------------------------

class SwigluCache(NamedTuple):
    gate: LinearCache   # x @ w_gate (holds x)
    up_w: object        # w_up (x is shared with the gate's cache)
    u: object           # (..., H) x @ w_up
    act: SiluCache      # silu's cache (holds g = x @ w_gate and sigmoid(g); s = g * sigmoid(g)
                        # is recomputed in backward rather than kept: one multiply saves an (..., H) array)
    down: LinearCache   # (s * u) @ w_down


def swiglu_forward(x, w_gate, w_up, w_down):
    """y = (silu(x Wg) * (x Wu)) Wd, no biases.

    x: (..., C), w_gate, w_up: (C, H), w_down: (H, C_out) -> y: (..., C_out)
    """
    g, gate = _linear_forward(x, w_gate, None, "x", "w_gate")
    if tuple(w_up.shape) != tuple(w_gate.shape):
        check_float("w_up", w_up)
        raise ValueError(f"w_up: expected shape {tuple(w_gate.shape)} (that of w_gate), got {tuple(w_up.shape)}")
    u, _ = _linear_forward(x, w_up, None, "x", "w_up")
    s, act = silu_forward(g)
    s *= u                      # m = silu(g) * u, in silu's fresh output buffer
    y, down = _linear_forward(s, w_down, None, "silu(x @ w_gate) * (x @ w_up)", "w_down")
    return y, SwigluCache(gate, w_up, u, act, down)


def swiglu_backward(dy, cache: SwigluCache):
    """Backward of swiglu_forward. With m = s * u: ds = dm * u, du = dm * s, and x
    feeds both branches, so its gradient is the sum of the two.
    -> dx, dw_gate, dw_up, dw_down"""
    gate, w_up, u, act, down = cache
    dm, dw_down, _ = linear_backward(dy, down)
    du = act.x * act.sig        # s = silu(g), recomputed
    du *= dm
    dm *= u                     # dm is ours (a fresh matmul result): reuse it as ds
    dg = silu_backward(dm, act)
    dx, dw_gate, _ = linear_backward(dg, gate)
    dx_up, dw_up, _ = linear_backward(du, LinearCache(gate.x, w_up, False))
    dx += dx_up
    return dx, dw_gate, dw_up, dw_down
