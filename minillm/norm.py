"""Normalisation layers: LayerNorm (GPT-2, BERT) and RMSNorm (LLaMA and friends).

Both rescale each feature vector (the last axis) to a fixed size, then apply a
learned per-feature gain. LayerNorm first removes the mean; RMSNorm skips that
step and divides by the root mean square alone, which is cheaper and works as
well in practice.

    LayerNorm:  xhat = (x - mean(x)) / sqrt(var(x) + eps),   y = xhat * weight + bias
    RMSNorm:    xhat = x / sqrt(mean(x^2) + eps),            y = xhat * weight

The caches follow llm.c: keep the input (a reference, not a copy), the per-row
statistics (mean, rstd = 1/std: one number per row) and the gain; backward
recomputes the normalised x from them instead of holding a second full-size
array in memory. Every step has its own name (xc, xhat, dxhat), so a debugger
shows each quantity as the formula defines it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .backend import (DEFAULT_DTYPE, array_module, check_float, check_positive, check_same_dtype,
                      parallel_for, to_device)

__all__ = ["layernorm_forward", "layernorm_backward", "layernorm_forward_fast", "layernorm_backward_fast",
           "rmsnorm_forward", "rmsnorm_backward",
           "init_norm"]


def _check_norm(x, weight, bias, eps):
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
    Example: x = [1, 2, 3], weight = [1, 1, 1], bias = [0, 0, 0], eps -> 0:
    mean 2, var 2/3, y = [-1.2247, 0, 1.2247].
    """
    _check_norm(x, weight, bias, eps)
    xp = array_module(x)
    t = x.dtype.type
    mean = xp.mean(x, axis=-1, keepdims=True)            # (..., 1)
    xc = x - mean                                         # (..., C) centred
    # Two passes (mean first, then the mean of squared deviations): the one-pass
    # E[x^2] - E[x]^2 cancels catastrophically when |mean| >> std.
    var = xp.mean(xc * xc, axis=-1, keepdims=True)       # (..., 1)
    rstd = t(1) / xp.sqrt(var + t(eps))                  # (..., 1)
    xhat = xc * rstd                                      # (..., C) the normalised x
    y = xhat * weight if bias is None else xhat * weight + bias
    return y, LayerNormCache(x, mean, rstd, weight, bias is not None)


def layernorm_backward(dy, cache: LayerNormCache):
    """With xhat = (x - mean) * rstd and dxhat = dy * weight (the gradient at xhat):

        dx      = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))   (means over the last axis)
        dweight = sum over rows of dy * xhat
        dbias   = sum over rows of dy   (None when there was no bias)

    The two subtracted means are the gradient flowing back through the mean and
    through the variance. -> dx: (..., C), dweight: (C,), dbias: (C,) or None
    """
    x, mean, rstd, weight, has_bias = cache
    _check_dy(dy, x)
    xp = array_module(x)
    xhat = (x - mean) * rstd                                         # (..., C), recomputed
    dweight = _sum_leading(dy * xhat)                                # (C,)
    dbias = _sum_leading(dy) if has_bias else None                   # (C,)
    dxhat = dy * weight                                              # (..., C)
    mean_dxhat = xp.mean(dxhat, axis=-1, keepdims=True)              # (..., 1)
    mean_dxhat_xhat = xp.mean(dxhat * xhat, axis=-1, keepdims=True)  # (..., 1)
    dx = (dxhat - mean_dxhat - xhat * mean_dxhat_xhat) * rstd       # (..., C)
    return dx, dweight, dbias


# The fast form the GPT runs: the same formulas on blocks of rows, each block
# written by one of backend.parallel_for's threads, with the per-row statistics
# computed as row dot products (no squared copy of x). Tested equal to the two
# functions above.

def layernorm_forward_fast(x, weight, bias, eps=1e-5):
    """layernorm_forward's (y, cache), its rows shared out among CPU threads."""
    _check_norm(x, weight, bias, eps)
    xp = array_module(x)
    t = x.dtype.type
    C = x.shape[-1]
    x2 = x.reshape(-1, C)                                           # (N, C)
    y = xp.empty_like(x2)                                           # (N, C)
    mean = xp.empty((x2.shape[0], 1), dtype=x.dtype)                # (N, 1)
    rstd = xp.empty_like(mean)                                      # (N, 1)

    def rows(lo, hi):
        xs, yc = x2[lo:hi], y[lo:hi]
        xp.mean(xs, axis=-1, keepdims=True, out=mean[lo:hi])
        xp.subtract(xs, mean[lo:hi], out=yc)                        # centred, in y's memory
        var = xp.einsum("ij,ij->i", yc, yc)[:, None] / t(C)         # mean of squared deviations
        rstd[lo:hi] = t(1) / xp.sqrt(var + t(eps))
        yc *= rstd[lo:hi]                                           # xhat
        yc *= weight
        if bias is not None:
            yc += bias
    parallel_for(rows, x2.shape[0], min_per_thread=64, xp=xp)
    lead = (*x.shape[:-1], 1)
    return (y.reshape(x.shape),
            LayerNormCache(x, mean.reshape(lead), rstd.reshape(lead), weight, bias is not None))


def layernorm_backward_fast(dy, cache: LayerNormCache):
    """layernorm_backward's (dx, dweight, dbias), its rows shared out among CPU threads; each
    thread sums its rows' share of dweight and dbias, and the shares are added at the end."""
    x, mean, rstd, weight, has_bias = cache
    _check_dy(dy, x)
    xp = array_module(x)
    t = x.dtype.type
    C = x.shape[-1]
    x2, dy2 = x.reshape(-1, C), dy.reshape(-1, C)                   # (N, C)
    mean2, rstd2 = mean.reshape(-1, 1), rstd.reshape(-1, 1)         # (N, 1)
    dx = xp.empty_like(x2)                                          # (N, C)
    shares = {}                                                     # lo -> (dweight, dbias) of rows [lo, hi)

    def rows(lo, hi):
        xhat = (x2[lo:hi] - mean2[lo:hi]) * rstd2[lo:hi]           # (n, C), recomputed
        g = dy2[lo:hi]
        shares[lo] = (xp.einsum("ij,ij->j", g, xhat), g.sum(axis=0) if has_bias else None)
        dxhat = dx[lo:hi]
        xp.multiply(g, weight, out=dxhat)                           # dxhat, in dx's memory
        mean_dxhat = dxhat.sum(axis=-1, keepdims=True) / t(C)                 # (n, 1)
        mean_dxhat_xhat = xp.einsum("ij,ij->i", dxhat, xhat)[:, None] / t(C)  # (n, 1)
        dxhat -= mean_dxhat
        xhat *= mean_dxhat_xhat
        dxhat -= xhat
        dxhat *= rstd2[lo:hi]                                       # now dx
    parallel_for(rows, x2.shape[0], min_per_thread=64, xp=xp)
    order = sorted(shares)                      # added in row order: the same sum on every run
    dweight = sum((shares[lo][0] for lo in order[1:]), shares[order[0]][0])
    dbias = sum((shares[lo][1] for lo in order[1:]), shares[order[0]][1]) if has_bias else None
    return dx.reshape(x.shape), dweight, dbias


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
    Example: x = [3, 4], weight = [1, 1], eps -> 0: rms = sqrt(12.5), y = [0.8485, 1.1314].
    """
    _check_norm(x, weight, None, eps)
    xp = array_module(x)
    t = x.dtype.type
    rstd = t(1) / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + t(eps))   # (..., 1)
    xhat = x * rstd                                                         # (..., C)
    return xhat * weight, RMSNormCache(x, rstd, weight)


def rmsnorm_backward(dy, cache: RMSNormCache):
    """With xhat = x * rstd and dxhat = dy * weight:

        dx      = rstd * (dxhat - xhat * mean(dxhat * xhat))
        dweight = sum over rows of dy * xhat

    (LayerNorm's formula without the mean term.) -> dx: (..., C), dweight: (C,)
    """
    x, rstd, weight = cache
    _check_dy(dy, x)
    xp = array_module(x)
    xhat = x * rstd                                                  # (..., C), recomputed
    dweight = _sum_leading(dy * xhat)                                # (C,)
    dxhat = dy * weight                                              # (..., C)
    mean_dxhat_xhat = xp.mean(dxhat * xhat, axis=-1, keepdims=True)  # (..., 1)
    dx = (dxhat - xhat * mean_dxhat_xhat) * rstd                    # (..., C)
    return dx, dweight


def init_norm(C, bias=True, dtype=DEFAULT_DTYPE, device=None):
    """(weight, bias): ones and zeros of shape (C,), the identity at initialisation.
    bias is None when ``bias`` is False (RMSNorm has none)."""
    w = to_device(np.ones(C, dtype=dtype), device)
    b = to_device(np.zeros(C, dtype=dtype), device) if bias else None
    return w, b
