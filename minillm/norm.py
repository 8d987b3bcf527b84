"""Normalisation layers: LayerNorm (GPT-2, BERT) and RMSNorm (LLaMA and friends).

Both rescale each feature vector (the last axis) to a fixed size, then apply a
learned per-feature gain. LayerNorm first removes the mean; RMSNorm skips that
step and divides by the root mean square alone, which is cheaper and works as
well in practice.

The caches follow llm.c: keep the input (a reference, not a copy), the per-row
statistics (mean, rstd = 1/std: one number per row) and the gain; backward
recomputes the normalised x from them instead of holding a second full-size
array in memory.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .backend import (DEFAULT_DTYPE, array_module, check_float, check_positive, check_same_dtype,
                      to_device)

__all__ = ["layernorm_forward", "layernorm_backward", "rmsnorm_forward", "rmsnorm_backward",
           "init_norm"]


def _check_norm_args(x, weight, bias, eps):
    check_float("x", x)
    if x.ndim < 1:
        raise ValueError(f"x: expected at least 1 dimension (..., C), got shape {tuple(x.shape)}")
    C = x.shape[-1]
    check_float("weight", weight)
    if tuple(weight.shape) != (C,):
        raise ValueError(f"weight: expected shape ({C},) (x's last axis), got {tuple(weight.shape)}")
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (C,):
            raise ValueError(f"bias: expected shape ({C},) (x's last axis), got {tuple(bias.shape)}")
    check_same_dtype(x=x, weight=weight, bias=bias)
    check_positive("eps", eps)


def _sum_leading(a):
    """Sum over every axis but the last: (..., C) -> (C,). The per-feature parameter gradient."""
    return a.reshape(-1, a.shape[-1]).sum(axis=0)


def _check_dy(dy, x):
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"dy: expected shape {tuple(x.shape)} (the forward output's), got {tuple(dy.shape)}")


# ---------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------

class LayerNormCache(NamedTuple):
    x: object       # (..., C) the input (by reference)
    mean: object    # (..., 1) per-row mean
    rstd: object    # (..., 1) per-row 1 / sqrt(var + eps)
    weight: object  # (C,)
    has_bias: bool


def layernorm_forward(x, weight, bias, eps=1e-5):
    """y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, over the last axis.

    var is the biased (1/C) variance, as in PyTorch. bias may be None.
    x: (..., C), weight, bias: (C,) -> y: (..., C)
    """
    _check_norm_args(x, weight, bias, eps)
    xp = array_module(x)
    t = x.dtype.type
    mean = xp.mean(x, axis=-1, keepdims=True)
    y = x - mean
    # Two passes (mean first, then the mean of squared deviations): the one-pass
    # E[x^2] - E[x]^2 cancels catastrophically when |mean| >> std.
    var = xp.mean(y * y, axis=-1, keepdims=True)
    rstd = t(1) / xp.sqrt(var + t(eps))
    y *= rstd            # y is now the normalised x
    y *= weight
    if bias is not None:
        y += bias
    return y, LayerNormCache(x, mean, rstd, weight, bias is not None)


def layernorm_backward(dy, cache: LayerNormCache):
    """With xhat = (x - mean) * rstd and g = dy * weight:

        dx      = rstd * (g - mean(g) - xhat * mean(g * xhat))     (means over the last axis)
        dweight = sum over rows of dy * xhat
        dbias   = sum over rows of dy   (None when there was no bias)

    The two subtracted means are the gradient flowing back through the mean and
    through the variance. -> dx: (..., C), dweight: (C,), dbias: (C,) or None
    """
    x, mean, rstd, weight, has_bias = cache
    _check_dy(dy, x)
    xp = array_module(x)
    xhat = x - mean
    xhat *= rstd
    dweight = _sum_leading(dy * xhat)
    dbias = _sum_leading(dy) if has_bias else None
    g = dy * weight
    a = xp.mean(g, axis=-1, keepdims=True)
    b = xp.mean(g * xhat, axis=-1, keepdims=True)
    g -= a
    xhat *= b            # reuse the buffer: xhat is not needed after this
    g -= xhat
    g *= rstd
    return g, dweight, dbias


# ---------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------

class RMSNormCache(NamedTuple):
    x: object       # (..., C) the input (by reference)
    rstd: object    # (..., 1) per-row 1 / sqrt(mean(x^2) + eps)
    weight: object  # (C,)


def rmsnorm_forward(x, weight, eps=1e-6):
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last axis.

    x: (..., C), weight: (C,) -> y: (..., C)
    """
    _check_norm_args(x, weight, None, eps)
    xp = array_module(x)
    t = x.dtype.type
    rstd = t(1) / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + t(eps))
    y = x * rstd
    y *= weight
    return y, RMSNormCache(x, rstd, weight)


def rmsnorm_backward(dy, cache: RMSNormCache):
    """With xhat = x * rstd and g = dy * weight:

        dx      = rstd * (g - xhat * mean(g * xhat))
        dweight = sum over rows of dy * xhat

    (LayerNorm's formula without the mean term.) -> dx: (..., C), dweight: (C,)
    """
    x, rstd, weight = cache
    _check_dy(dy, x)
    xp = array_module(x)
    xhat = x * rstd
    dweight = _sum_leading(dy * xhat)
    g = dy * weight
    b = xp.mean(g * xhat, axis=-1, keepdims=True)
    xhat *= b
    g -= xhat
    g *= rstd
    return g, dweight


def init_norm(C, bias=True, dtype=DEFAULT_DTYPE, device=None):
    """(weight, bias): ones and zeros of shape (C,), the identity at initialisation.
    bias is None when ``bias`` is False (RMSNorm has none)."""
    w = to_device(np.ones(C, dtype=dtype), device)
    b = to_device(np.zeros(C, dtype=dtype), device) if bias else None
    return w, b
