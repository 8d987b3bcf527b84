"""The feed-forward half of a transformer block: linear layers, activations, MLP, SwiGLU.

Every operation is a forward/backward pair (see backprop.py for the convention):

    y, cache = linear_forward(x, w, b)     # y = x @ w + b
    dx, dw, db = linear_backward(dy, cache)

A linear layer is the only place a transformer learns mixing *across* features;
activations are elementwise, so their backward is an elementwise product with
the local derivative:

    ReLU(x) = max(x, 0)              GELU(x) = x Phi(x)  (Phi: the standard normal CDF)
    SiLU(x) = x sigmoid(x)           SwiGLU(x) = (SiLU(x Wg) * (x Wu)) Wd

GPT-2 and BERT use GELU in a 4x-wide MLP; LLaMA-style models use SwiGLU, a gated
MLP with three matrices and no biases. GELU comes twice: as its formula
(``gelu_forward_plain``), then as the fast form the models run (``gelu_forward``);
a test holds them equal. Exact GELU needs erf, which NumPy lacks: ours is in erf.py.

Speed notes (this is the hot path of training):
- linear reshapes (..., in) to one 2-D matrix so that forward and backward are
  each a single BLAS/cuBLAS matmul, whatever the number of leading axes;
- activations keep constants in the input's dtype (a float64 constant would
  silently upcast float32 arrays under NumPy 2); the fast GELU updates one
  buffer in place.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .backend import (DEFAULT_DTYPE, array_module, check_choice, check_float, check_ndim, check_shape,
                      make_rng, parallel_for, randn, to_device)
from .erf import erf, erfc, normal_cdf

__all__ = [
    "linear_forward", "linear_backward", "init_linear",
    "relu_forward", "relu_backward",
    "erf", "erfc", "gelu_forward", "gelu_backward", "gelu_forward_plain", "gelu_backward_plain",
    "sigmoid", "silu_forward", "silu_backward",
    "mlp_forward", "mlp_backward", "ACTIVATIONS",
    "swiglu_forward", "swiglu_backward",
]


def _check_dy(dy, shape):
    if tuple(dy.shape) != tuple(shape):
        raise ValueError(f"dy: expected shape {tuple(shape)} (the forward output's), got {tuple(dy.shape)}")


# ---------------------------------------------------------------------------
# Linear
# ---------------------------------------------------------------------------

class LinearCache(NamedTuple):
    x: object       # (..., in) the input, kept by reference (no copy)
    w: object       # (in, out)
    has_bias: bool  # whether to return db or None


def _check_linear(x, w, b, xname="x", wname="w", bname="b"):
    check_float(xname, x)
    _check_weight(w, b, x.shape, x.dtype, xname, wname, bname)


def _check_weight(w, b, x_shape, x_dtype, xname, wname, bname):
    """w (in, out) and b (out,) or None fit an input of ``x_shape`` and ``x_dtype``."""
    check_float(wname, w)
    check_ndim(wname, w, 2)
    if len(x_shape) < 1 or x_shape[-1] != w.shape[0]:
        raise ValueError(f"{wname}: expected shape ({x_shape[-1] if len(x_shape) else '?'}, *) to match "
                         f"{xname}'s last axis {tuple(x_shape)}, got {tuple(w.shape)}")
    if b is not None:
        check_float(bname, b)
        check_shape(bname, b, (w.shape[1],))
    for name, a in ((wname, w), (bname, b)):
        if a is not None and a.dtype != x_dtype:
            raise TypeError(f"{name}: expected dtype {x_dtype} (the dtype of {xname}), got {a.dtype}")


def _linear(x, w, b):
    """linear_forward's math, for callers that have checked the arguments."""
    n_in, n_out = w.shape
    y = x.reshape(-1, n_in) @ w              # (N, out), N = prod(...): one 2-D matmul whatever the leading axes
    if b is not None:
        y += b                               # y is a fresh matmul result: add b in place
    return y.reshape(*x.shape[:-1], n_out), LinearCache(x, w, b is not None)    # (..., out)


def linear_forward(x, w, b=None):
    """y = x @ w + b.

    x: (..., in), w: (in, out), b: (out,) or None -> y: (..., out)
    Example: x = [[1, 2]], w = [[1, 0, 1], [0, 1, 1]], b = [0, 0, 10] -> y = [[1, 2, 13]]
    """
    _check_linear(x, w, b)
    return _linear(x, w, b)


def linear_backward(dy, cache: LinearCache):
    """dx = dy @ w^T, dw = x^T dy and db = sum(dy), summed over all leading axes.

    dy: (..., out) -> dx: (..., in), dw: (in, out), db: (out,) or None
    """
    x, w, has_bias = cache
    n_in, n_out = w.shape
    _check_dy(dy, (*x.shape[:-1], n_out))
    dy2 = dy.reshape(-1, n_out)              # (N, out)
    x2 = x.reshape(-1, n_in)                 # (N, in)
    dx = (dy2 @ w.T).reshape(x.shape)        # (..., in)
    dw = x2.T @ dy2                          # (in, N) @ (N, out): the sum over every position in one GEMM
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
    _check_dy(dy, cache.mask.shape)
    xp = array_module(dy)
    return xp.where(cache.mask, dy, dy.dtype.type(0))


# ---------------------------------------------------------------------------
# GELU: the formula first, then the fast form the models run
# ---------------------------------------------------------------------------

_GELU_A = 0.044715
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_APPROXIMATIONS = ("tanh", "none")


class GeluCache(NamedTuple):
    x: object            # (...) the input
    phi: object          # (...) Phi(x) ("none") or its tanh approximation ("tanh"): the costly part, reused
    approximate: str


def _check_gelu(x, approximate):
    check_float("x", x)
    if approximate not in _APPROXIMATIONS:
        raise ValueError(f"approximate: expected 'tanh' or 'none', got {approximate!r}")


def gelu_forward_plain(x, approximate="tanh"):
    """GELU(x) = x * Phi(x), Phi the standard normal CDF, written as its formula.

    approximate="tanh":  y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))   (GPT-2)
    approximate="none":  y = 0.5 x (1 + erf(x / sqrt 2))                        (BERT, PyTorch's default)

        >>> gelu_forward_plain(np.array([-1.0, 0.0, 1.0, 2.0]))[0]
        array([-0.15880801,  0.        ,  0.84119199,  1.95459769])

    The same function as :func:`gelu_forward` (the tests hold them within a few
    float64 roundings of each other), but in the far left tail 1 + tanh(u) and
    1 + erf(x / sqrt 2) are differences of nearly equal numbers: at x = -10 both
    give 0 where gelu_forward gives the tiny true values. x: (...) -> y: (...)
    """
    _check_gelu(x, approximate)
    xp = array_module(x)
    t = x.dtype.type
    if approximate == "tanh":
        u = t(_SQRT_2_OVER_PI) * (x + t(_GELU_A) * x ** 3)
        phi = t(0.5) * (1 + xp.tanh(u))        # approximately Phi(x)
    else:
        phi = t(0.5) * (1 + erf(x * t(_INV_SQRT_2)))
    return x * phi, GeluCache(x, phi, approximate)


def gelu_backward_plain(dy, cache: GeluCache):
    """dx = dy * GELU'(x) = dy * (phi + x * dphi/dx), written as its formula.

    tanh:  phi = 0.5 (1 + tanh(u)), u = c (x + a x^3), c = sqrt(2/pi), a = 0.044715:
           dphi/dx = 0.5 (1 - tanh(u)^2) du/dx = 2 phi (1 - phi) c (1 + 3 a x^2)
    exact: dphi/dx = the normal density exp(-x^2 / 2) / sqrt(2 pi)
    Works on the cache of either forward (both keep x and phi).
    """
    x, phi, approximate = cache
    _check_dy(dy, x.shape)
    xp = array_module(x)
    t = x.dtype.type
    if approximate == "tanh":
        du_dx = t(_SQRT_2_OVER_PI) * (1 + t(3 * _GELU_A) * x * x)
        dphi_dx = 2 * phi * (1 - phi) * du_dx
    else:
        dphi_dx = t(_INV_SQRT_2PI) * xp.exp(-(x * x) / 2)
    return dy * (phi + x * dphi_dx)


def gelu_forward(x, approximate="tanh"):
    """GELU(x) = x * Phi(x), as the models compute it: the formula of
    :func:`gelu_forward_plain`, with phi evaluated in fewer passes and accurately
    in the tails. x: (...) -> y: (...)

    approximate="none":  phi = Phi(x) = 0.5 erfc(-x / sqrt 2)   (erf.normal_cdf: no cancellation)
    approximate="tanh":  phi = 0.5 (1 + tanh(u)) = sigmoid(2u) = 1 / (1 + exp(-2u)),
                         u = sqrt(2/pi) (x + 0.044715 x^3)
    The two differ by less than 1e-3 everywhere. The sigmoid identity is the same
    function, but exp is cheaper than tanh, and in the left tail 1 / (1 + exp(-2u))
    keeps full relative precision where 1 + tanh(u) cancels.
    """
    _check_gelu(x, approximate)
    if approximate == "tanh":
        y, phi = _gelu_tanh_fast(x)
    else:
        phi = normal_cdf(x)
        y = x * phi
    return y, GeluCache(x, phi, approximate)


def gelu_backward(dy, cache: GeluCache):
    """dx = dy * GELU'(x), the formulas of :func:`gelu_backward_plain` in fewer passes.

    exact:  GELU'(x) = Phi(x) + x * pdf(x), pdf(x) = exp(-x^2/2) / sqrt(2 pi)
    tanh:   with s = sigmoid(2u), u = c (x + a x^3), c = sqrt(2/pi), and sigmoid' = s (1 - s):
            GELU'(x) = s + x s (1 - s) 2c (1 + 3 a x^2)
                     = s (1 + x (1 - s) 2c (1 + 3 a x^2))
    """
    x, phi, approximate = cache
    _check_dy(dy, x.shape)
    if approximate == "tanh":
        return _gelu_backward_tanh_fast(dy, x, phi)
    return _gelu_backward_exact_fast(dy, x, phi)


# The fast bodies: each pass writes into a buffer given with out= (no temporaries of
# the input's size), with constants in x's dtype. On the CPU they run over the flat
# arrays _CHUNK elements at a time, the pieces shared out among backend.parallel_for's
# threads. The piece is large because every NumPy call hands Python's lock back and
# forth between the threads: on a (2048, 768) float32 activation with two threads,
# 32K-element pieces took 4.9 ms forward and 3.6 ms backward, 256K-element ones 3.4
# and 1.9 ms (one thread: 6.2 / 3.6 against 4.5 / 2.5 ms).

_CHUNK = 1 << 18        # elements per piece (1 MB of float32); a GPU takes the array whole


def _pieces(n, xp):
    """slice objects covering range(n) in pieces of _CHUNK (one piece on a GPU)."""
    step = _CHUNK if xp is np else max(n, 1)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _flat(a):
    return array_module(a).ascontiguousarray(a).reshape(-1)


def _gelu_tanh_fast(x):
    """(x * phi, phi), phi = sigmoid(2u) = 0.5 (1 + tanh(u)), u = c (x + a x^3), piece by piece
    (the pieces shared out among backend.parallel_for's threads)."""
    xp = array_module(x)
    t = x.dtype.type
    xf = _flat(x)
    phi, y = xp.empty_like(xf), xp.empty_like(xf)
    pieces = _pieces(xf.size, xp)

    def run(lo, hi):
        for c in pieces[lo:hi]:
            xc, s = xf[c], phi[c]
            xp.multiply(xc, xc, out=s)              # -2u = x * (-2c - 2ca x^2)
            s *= t(-2.0 * _SQRT_2_OVER_PI * _GELU_A)
            s -= t(2.0 * _SQRT_2_OVER_PI)
            s *= xc
            with np.errstate(over="ignore"):        # exp(-2u) = inf for very negative x: then s = 0, exactly right
                xp.exp(s, out=s)
            s += t(1)
            xp.divide(t(1), s, out=s)
            xp.multiply(xc, s, out=y[c])
    parallel_for(run, len(pieces), xp=xp)
    return y.reshape(x.shape), phi.reshape(x.shape)


def _gelu_backward_tanh_fast(dy, x, s):
    """dy * s (1 + x (1 - s) 2c (1 + 3 a x^2)), piece by piece (shared out among threads)."""
    xp = array_module(x)
    t = x.dtype.type
    xf, sf, dyf = _flat(x), _flat(s), _flat(dy)
    dx = xp.empty_like(xf)
    pieces = _pieces(xf.size, xp)

    def run(lo, hi):
        h = xp.empty(min(xf.size, _CHUNK), dtype=x.dtype)       # this thread's scratch for 1 - s
        for c in pieces[lo:hi]:
            xc, sc, g = xf[c], sf[c], dx[c]
            hc = h[:g.size] if g.size < h.size else h
            xp.multiply(xc, xc, out=g)
            g *= t(6.0 * _GELU_A * _SQRT_2_OVER_PI)
            g += t(2.0 * _SQRT_2_OVER_PI)
            g *= xc                     # x 2c (1 + 3 a x^2)
            xp.subtract(t(1), sc, out=hc)
            g *= hc
            g += t(1)
            g *= sc
            g *= dyf[c]
    parallel_for(run, len(pieces), xp=xp)
    return dx.reshape(x.shape)


def _gelu_backward_exact_fast(dy, x, phi):
    xp = array_module(x)
    t = x.dtype.type
    g = x * x
    g *= t(-0.5)
    xp.exp(g, out=g)
    g *= t(_INV_SQRT_2PI)       # the normal density
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
    with np.errstate(over="ignore"):
        return 1 / (1 + xp.exp(-x))


class SiluCache(NamedTuple):
    x: object    # (...) the input
    sig: object  # (...) sigmoid(x)


def silu_forward(x):
    """SiLU(x) = x * sigmoid(x) (also called swish). x: (...) -> y: (...)

    Example: silu_forward(np.array([-1.0, 0.0, 1.0]))[0] -> [-0.26894142, 0, 0.73105858]
    """
    s = sigmoid(x)
    return x * s, SiluCache(x, s)


def silu_backward(dy, cache: SiluCache):
    """dx = dy * s (1 + x (1 - s)), s = sigmoid(x), from (x s)' = s + x s (1 - s)."""
    x, s = cache
    _check_dy(dy, x.shape)
    return dy * (s * (1 + x * (1 - s)))


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


def _check_mlp(x, w1, b1, w2, b2, activation):
    check_choice("activation", activation, sorted(ACTIVATIONS))
    _check_linear(x, w1, b1, "x", "w1", "b1")
    h_shape = (*x.shape[:-1], w1.shape[1])
    _check_weight(w2, b2, h_shape, x.dtype, "act(x @ w1 + b1)", "w2", "b2")


def mlp_forward(x, w1, b1, w2, b2, activation="gelu"):
    """y = act(x W1 + b1) W2 + b2.

    x: (..., C), w1: (C, H), b1: (H,) or None, w2: (H, C_out), b2: (C_out,) or None
    activation: "gelu" (tanh approximation), "gelu_exact", "relu" or "silu"
    -> y: (..., C_out)
    """
    _check_mlp(x, w1, b1, w2, b2, activation)
    act_forward, _ = ACTIVATIONS[activation]
    h, fc = _linear(x, w1, b1)               # (..., H)
    a, act = act_forward(h)                  # (..., H)
    y, proj = _linear(a, w2, b2)             # (..., C_out)
    return y, MlpCache(fc, act, proj, activation)


def mlp_backward(dy, cache: MlpCache):
    """Backward of mlp_forward, in reverse order. -> dx, dw1, db1, dw2, db2"""
    fc, act, proj, activation = cache
    _, act_backward = ACTIVATIONS[activation]
    da, dw2, db2 = linear_backward(dy, proj)     # (..., H)
    dh = act_backward(da, act)                   # (..., H)
    dx, dw1, db1 = linear_backward(dh, fc)       # (..., C)
    return dx, dw1, db1, dw2, db2


# ---------------------------------------------------------------------------
# SwiGLU: the gated MLP of LLaMA, Mistral, ...
# ---------------------------------------------------------------------------

class SwigluCache(NamedTuple):
    gate: LinearCache   # g = x @ w_gate (holds x)
    up: LinearCache     # u = x @ w_up (holds the same x, by reference)
    u: object           # (..., H) x @ w_up
    act: SiluCache      # silu's cache (holds g and sigmoid(g); silu(g) = g * sigmoid(g)
                        # is recomputed in backward rather than kept: one multiply saves an (..., H) array)
    down: LinearCache   # m @ w_down, m = silu(g) * u


def _check_swiglu(x, w_gate, w_up, w_down):
    _check_linear(x, w_gate, None, "x", "w_gate")
    check_float("w_up", w_up)
    if tuple(w_up.shape) != tuple(w_gate.shape):
        raise ValueError(f"w_up: expected shape {tuple(w_gate.shape)} (that of w_gate), got {tuple(w_up.shape)}")
    _check_weight(w_up, None, x.shape, x.dtype, "x", "w_up", "b")
    m_shape = (*x.shape[:-1], w_gate.shape[1])
    _check_weight(w_down, None, m_shape, x.dtype, "silu(x @ w_gate) * (x @ w_up)", "w_down", "b")


def swiglu_forward(x, w_gate, w_up, w_down):
    """y = (silu(x Wg) * (x Wu)) Wd, no biases.

    x: (..., C), w_gate, w_up: (C, H), w_down: (H, C_out) -> y: (..., C_out)
    """
    _check_swiglu(x, w_gate, w_up, w_down)
    g, gate = _linear(x, w_gate, None)       # (..., H) the gate's pre-activation
    u, up = _linear(x, w_up, None)           # (..., H) the value it gates
    a, act = silu_forward(g)                 # (..., H)
    m = a * u                                # (..., H)
    y, down = _linear(m, w_down, None)       # (..., C_out)
    return y, SwigluCache(gate, up, u, act, down)


def swiglu_backward(dy, cache: SwigluCache):
    """Backward of swiglu_forward, in reverse order. With m = a * u, a = silu(g):
    da = dm * u and du = dm * a; x feeds both branches, so its gradient is the sum
    of the two. -> dx, dw_gate, dw_up, dw_down"""
    gate, up, u, act, down = cache
    dm, dw_down, _ = linear_backward(dy, down)       # (..., H)
    a = act.x * act.sig                              # silu(g), recomputed
    du = dm * a                                      # (..., H)
    da = dm * u                                      # (..., H)
    dg = silu_backward(da, act)                      # (..., H)
    dx_gate, dw_gate, _ = linear_backward(dg, gate)  # (..., C)
    dx_up, dw_up, _ = linear_backward(du, up)        # (..., C)
    return dx_gate + dx_up, dw_gate, dw_up, dw_down
