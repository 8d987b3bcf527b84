"""Low-rank adapters (LoRA, Hu et al. 2021): fine-tune a big frozen matrix through a small update.

Fine-tuning changes a pretrained weight W (in, out) by some dW. LoRA bets that
the useful dW has low rank, and writes it as a product of two thin matrices:

    W_eff = W + s A B        A: (in, r), B: (r, out), r << min(in, out), s = alpha / r

W stays frozen; only A and B are trained. A linear layer becomes

    y = x W + b + s (x A) B

and costs r (in + out) trainable numbers instead of in * out. B starts at zero,
so at step 0 the adapted model *is* the base model; A starts small and random,
so the gradient of B (s A^T x^T dy) is not zero and training can leave that point.
The scale s = alpha / r keeps the size of the update roughly independent of r
when you change r (so alpha, like a learning rate, need not be re-tuned); the
rank-stabilised variant (rsLoRA) uses alpha / sqrt(r) instead (``rank_scale="sqrt"``).

Two ways to use it here:

1. Layer by layer: ``lora_linear_forward`` / ``lora_linear_backward``, a linear
   layer with an adapter, whose backward returns gradients for x, A and B only.
2. A whole model, without touching the model's code: because W_eff = W + s A B,
   the chain rule turns the model's ordinary weight gradient dW = dL/dW_eff into

       dL/dA = s dW B^T        dL/dB = s A^T dW

   (:func:`lora_grads_from_full`). So: merge the adapters into a copy of the
   weights, run the model's own ``loss_and_grads``, map each dW to (dA, dB), and
   step an optimizer over the adapters alone. The base weights are never written.

Adapters live in their own flat dict, named after the weight they adapt:
``{"h.0.attn.w_qkv.lora_a": A, "h.0.attn.w_qkv.lora_b": B, ...}``.

    lora = init_lora(params, targets=r"attn\\.w_(qkv|o)$", rank=4, alpha=8)
    loss, grads = lora_loss_and_grads(lambda p: gpt.loss_and_grads(p, cfg, x, y),
                                      params, lora, alpha=8, rank=4)
    opt = AdamW(lora, lr=1e-3); opt.step(grads)
    merged = merge_lora(params, lora, alpha=8, rank=4)   # for inference: no extra matmuls
"""

from __future__ import annotations

import math
import re
from typing import Callable, NamedTuple

import numpy as np

from .backend import (array_module, check_array, check_choice, check_float, check_ndim, check_same_dtype,
                      check_shape, is_int, make_rng)
from .backprop import dropout_backward, dropout_forward

__all__ = ["lora_scale", "lora_linear_forward", "lora_linear_backward", "LoraLinearCache",
           "init_lora", "lora_targets", "merge_lora", "unmerge_lora", "lora_param_count",
           "lora_grads_from_full", "lora_loss_and_grads"]

SUFFIX_A = ".lora_a"
SUFFIX_B = ".lora_b"
_RANK_SCALES = (None, "linear", "sqrt")


# ---------------------------------------------------------------------------
# The scale
# ---------------------------------------------------------------------------

def _check_rank(rank):
    if not is_int(rank) or rank < 1:
        raise ValueError(f"rank: expected an int >= 1, got {rank!r}")


def _check_finite(name, value, what="a finite number"):
    """ValueError (this module's contract, also for a non-number) unless ``value`` is a finite real."""
    is_number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not (is_number and np.isfinite(value)):
        raise ValueError(f"{name}: expected {what}, got {value!r}")


def _check_lora_scale(alpha, rank, rank_scale):
    _check_rank(rank)
    _check_finite("alpha", alpha)
    check_choice("rank_scale", rank_scale, _RANK_SCALES)


def lora_scale(alpha, rank, rank_scale=None) -> float:
    """s = alpha / r (Hu et al.), or alpha / sqrt(r) with ``rank_scale="sqrt"`` (rsLoRA).

    ``rank_scale=None`` or ``"linear"`` gives alpha / r. Example: lora_scale(16, 4) = 4.0,
    lora_scale(16, 4, "sqrt") = 8.0.
    """
    _check_lora_scale(alpha, rank, rank_scale)
    if rank_scale == "sqrt":
        return float(alpha) / math.sqrt(int(rank))
    return float(alpha) / int(rank)


# ---------------------------------------------------------------------------
# One adapted linear layer
# ---------------------------------------------------------------------------

class LoraLinearCache(NamedTuple):
    h: object          # (N, in) the adapter path's input: x after dropout (x itself when p = 0)
    u: object          # (N, r) h @ A, the low-rank code
    w: object          # (in, out) the frozen weight (for dx)
    a: object          # (in, r)
    b_lora: object     # (r, out)
    scale: float       # s
    drop: object       # DropoutCache of the adapter path
    x_shape: tuple     # (..., in)


def _check_lora_linear(x, w, b, a, b_lora):
    for name, arr in (("x", x), ("w", w), ("a", a), ("b_lora", b_lora)):
        check_float(name, arr)
    if b is not None:
        check_float("b", b)
    check_same_dtype(x=x, w=w, b=b, a=a, b_lora=b_lora)
    check_ndim("w", w, 2)
    check_ndim("a", a, 2)
    check_ndim("b_lora", b_lora, 2)
    n_in, n_out = w.shape
    if x.ndim < 1 or x.shape[-1] != n_in:
        raise ValueError(f"x: expected shape (..., {n_in}) (w's first axis), got {tuple(x.shape)}")
    if b is not None:
        check_shape("b", b, (n_out,))
    check_shape("a", a, (n_in, None))
    check_shape("b_lora", b_lora, (a.shape[1], n_out))


def lora_linear_forward(x, w, b, a, b_lora, alpha, rank_scale=None, dropout_p=0.0, rng=None):
    """y = x W + b + s (dropout(x) A) B, with s = alpha / r (see :func:`lora_scale`).

    W and b are the frozen base layer; A and B the adapter. Dropout (training
    only, as in the paper's code) touches just the adapter's input, so the base
    layer sees x unchanged.
    x: (..., in), w: (in, out), b: (out,) or None, a: (in, r), b_lora: (r, out)
    -> y: (..., out)
    """
    _check_lora_linear(x, w, b, a, b_lora)
    n_in, n_out = w.shape
    scale = lora_scale(alpha, a.shape[1], rank_scale)
    x2 = x.reshape(-1, n_in)                     # (N, in)
    h, drop = dropout_forward(x2, dropout_p, rng)    # (N, in)
    u = h @ a                                    # (N, r): cheap, r is small
    # Never form A @ B here: (N, r) @ (r, out) costs r * out per row, W + s A B costs in * out once.
    y = x2 @ w + x.dtype.type(scale) * (u @ b_lora)   # (N, out)
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], n_out), LoraLinearCache(h, u, w, a, b_lora, scale, drop, tuple(x.shape))


def lora_linear_backward(dy, cache: LoraLinearCache):
    """-> (dx, da, db_lora). No gradients for W and b: they are frozen, so we skip their GEMMs.

    With u = h A and y = x W + b + s u B:
        dB = s u^T dy,   du = s dy B^T,   dA = h^T du,   dx = dy W^T + dropout_backward(du A^T)
    dy: (..., out) -> dx: (..., in), da: (in, r), db_lora: (r, out)
    """
    h, u, w, a, b_lora, scale, drop, x_shape = cache
    n_in, n_out = w.shape
    check_shape("dy", dy, (*x_shape[:-1], n_out))
    dy2 = dy.reshape(-1, n_out)                  # (N, out)
    s = dy2.dtype.type(scale)
    db_lora = s * (u.T @ dy2)                    # (r, out)
    du = s * (dy2 @ b_lora.T)                    # (N, r)
    da = h.T @ du                                # (in, r)
    dx = dy2 @ w.T + dropout_backward(du @ a.T, drop)    # (N, in)
    return dx.reshape(x_shape), da, db_lora


# ---------------------------------------------------------------------------
# Adapters for a whole parameter dict
# ---------------------------------------------------------------------------

def _check_targets(params, targets) -> list:
    """The names ``targets`` selects (a regex searched in each name, or a list of names), checked."""
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ValueError(f"targets: not a valid regular expression {targets!r}: {e}") from e
        names = [k for k in params if pattern.search(k)]
        if not names:
            raise ValueError(f"targets: the pattern {targets!r} matches no parameter; "
                             f"names look like {list(params)[:4]}")
    elif isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets):
        names = list(targets)
        missing = [t for t in names if t not in params]
        if missing:
            raise ValueError(f"targets: not in params: {missing}")
        if not names:
            raise ValueError("targets: expected at least one parameter name, got an empty list")
    else:
        raise TypeError(f"targets: expected a regular expression (str) or a list of names, "
                        f"got {type(targets).__name__}")
    return names


def _check_init_lora(params, targets, rank, alpha) -> list:
    """Checks init_lora's arguments; returns the names of the weights to adapt."""
    if not isinstance(params, dict):
        raise TypeError(f"params: expected a dict of arrays, got {type(params).__name__}")
    _check_rank(rank)
    _check_finite("alpha", alpha)
    names = _check_targets(params, targets)
    for t in names:
        check_float(f"params[{t!r}]", params[t])
        if params[t].ndim != 2:
            raise ValueError(f"targets: LoRA adapts 2-D weights (in, out); params[{t!r}] has shape "
                             f"{tuple(params[t].shape)}")
        if rank > min(params[t].shape):
            raise ValueError(f"rank: expected at most min(in, out) = {min(params[t].shape)} for "
                             f"params[{t!r}] of shape {tuple(params[t].shape)}, got {rank}")
    return names


def init_lora(params: dict, targets, rank=8, alpha=16, seed=0) -> dict:
    """Adapters for the 2-D weights named by ``targets`` (a regex searched in each name, or a list).

    For each target W (in, out): ``{name}.lora_a`` A (in, r) ~ Uniform(-1/sqrt(in), 1/sqrt(in))
    (Kaiming-uniform, as PEFT does) and ``{name}.lora_b`` B = 0 (r, out), so W + s A B = W:
    the adapted model starts exactly equal to the base model. Arrays take each
    target's dtype and device; A is drawn on the CPU from ``seed``. ``alpha`` is not
    stored; it is checked here and must be passed again to merge/grads.
    """
    names = _check_init_lora(params, targets, rank, alpha)
    rng = make_rng(seed)
    lora = {}
    for name in names:
        w = params[name]
        n_in, n_out = w.shape
        xp = array_module(w)
        bound = 1.0 / math.sqrt(n_in)
        a = rng.uniform(-bound, bound, size=(n_in, rank)).astype(w.dtype)      # (in, r)
        lora[name + SUFFIX_A] = xp.asarray(a)
        lora[name + SUFFIX_B] = xp.zeros((rank, n_out), dtype=w.dtype)        # (r, out)
    return lora


def _check_lora_dict(lora):
    """Every key ends in .lora_a or .lora_b, and every A has its B and vice versa."""
    if not isinstance(lora, dict):
        raise TypeError(f"lora: expected a dict of adapter arrays, got {type(lora).__name__}")
    for k in lora:
        if not (k.endswith(SUFFIX_A) or k.endswith(SUFFIX_B)):
            raise ValueError(f"lora: expected keys ending in {SUFFIX_A!r} or {SUFFIX_B!r}, got {k!r}")
    for k in lora:
        if k.endswith(SUFFIX_A) and k[: -len(SUFFIX_A)] + SUFFIX_B not in lora:
            raise ValueError(f"lora: {k!r} has no matching {k[: -len(SUFFIX_A)] + SUFFIX_B!r}")
    for k in lora:
        if k.endswith(SUFFIX_B) and k[: -len(SUFFIX_B)] + SUFFIX_A not in lora:
            raise ValueError(f"lora: {k!r} has no matching {k[: -len(SUFFIX_B)] + SUFFIX_A!r}")


def lora_targets(lora: dict) -> list:
    """The names of the adapted weights, checking that every A has its B and vice versa."""
    _check_lora_dict(lora)
    return [k[: -len(SUFFIX_A)] for k in lora if k.endswith(SUFFIX_A)]


def _checked_pairs(params, lora, rank):
    """[(name, W, A, B)] after checking names, shapes, dtypes and that r matches ``rank``."""
    _check_rank(rank)
    out = []
    for name in lora_targets(lora):
        if name not in params:
            raise ValueError(f"lora: adapts {name!r}, which is not in params")
        w, a, b = params[name], lora[name + SUFFIX_A], lora[name + SUFFIX_B]
        check_float(f"params[{name!r}]", w)
        check_ndim(f"params[{name!r}]", w, 2)
        check_float(f"lora[{name + SUFFIX_A!r}]", a)
        check_float(f"lora[{name + SUFFIX_B!r}]", b)
        n_in, n_out = w.shape
        check_shape(f"lora[{name + SUFFIX_A!r}]", a, (n_in, rank))
        check_shape(f"lora[{name + SUFFIX_B!r}]", b, (rank, n_out))
        if a.dtype != w.dtype or b.dtype != w.dtype:
            raise TypeError(f"lora[{name!r}.*]: expected dtype {w.dtype} (that of the weight), "
                            f"got {a.dtype} and {b.dtype}")
        out.append((name, w, a, b))
    return out


def merge_lora(params: dict, lora: dict, alpha, rank, rank_scale=None) -> dict:
    """A new params dict with W + s A B for every adapted W; ``params`` is not modified.

    Adapted entries are new arrays; every other entry is the *same* array object
    as in ``params`` (no copy: it is frozen anyway). After merging, inference costs
    exactly what the base model costs.
    """
    s = lora_scale(alpha, rank, rank_scale)
    pairs = _checked_pairs(params, lora, rank)
    merged = dict(params)
    for name, w, a, b in pairs:
        merged[name] = w + w.dtype.type(s) * (a @ b)         # (in, out)
    return merged


def unmerge_lora(params: dict, lora: dict, alpha, rank, rank_scale=None) -> dict:
    """The inverse of :func:`merge_lora`: W - s A B for every adapted W (a new dict).

    Exact in real arithmetic; in floating point (W + sAB) - sAB differs from W by
    rounding (about one ulp of W's entries), so keep the base weights if you need
    them bit for bit.
    """
    s = lora_scale(alpha, rank, rank_scale)
    pairs = _checked_pairs(params, lora, rank)
    out = dict(params)
    for name, w, a, b in pairs:
        out[name] = w - w.dtype.type(s) * (a @ b)            # (in, out)
    return out


def lora_param_count(lora: dict) -> int:
    """Number of trainable adapter numbers: sum of r (in + out) over the adapted weights."""
    _check_lora_dict(lora)
    return int(sum(int(np.prod(v.shape)) for v in lora.values()))


def _check_grads_from_full(grads, params_lora, scale):
    if not isinstance(grads, dict):
        raise TypeError(f"grads: expected a dict of arrays, got {type(grads).__name__}")
    _check_finite("scale", scale, "a finite number (alpha / rank)")
    for name in lora_targets(params_lora):
        if name not in grads:
            raise ValueError(f"grads: no gradient for the adapted weight {name!r}")
        dw, a, b = grads[name], params_lora[name + SUFFIX_A], params_lora[name + SUFFIX_B]
        check_array(f"grads[{name!r}]", dw)
        check_shape(f"grads[{name!r}]", dw, (a.shape[0], b.shape[1]))
        if dw.dtype != a.dtype:
            raise TypeError(f"grads[{name!r}]: expected dtype {a.dtype} (the adapter's), got {dw.dtype}")


def lora_grads_from_full(grads: dict, params_lora: dict, scale) -> dict:
    """Adapter gradients from the model's full-weight gradients: dA = s dW B^T, dB = s A^T dW.

    Why this is exact: the model only ever sees W_eff = W + s A B, so L(A, B) =
    L(W_eff(A, B)) and the chain rule gives, entry by entry,
        dL/dA_ik = sum_j dL/dW_eff_ij * s B_kj      -> dA = s dW B^T   (in, r)
        dL/dB_kj = sum_i dL/dW_eff_ij * s A_ik      -> dB = s A^T dW   (r, out)
    where dW = dL/dW_eff is exactly what the model's backward returns for that
    weight when run on the merged parameters. No approximation: the test checks it
    against finite differences through a whole GPT.

    The cost: the model still computes the full dW (one GEMM per weight, as in
    full fine-tuning); what LoRA saves is everything after it: the optimizer's
    state (Adam's two moments) and the update touch r (in + out) numbers per
    weight instead of in * out, and a fine-tuned model ships as a few small arrays.

    grads: {name: dW (in, out)} holding every adapted name (other keys are ignored);
    params_lora: the adapters; scale: s (see :func:`lora_scale`)
    -> {key: gradient} with exactly params_lora's keys.
    """
    _check_grads_from_full(grads, params_lora, scale)
    out = {}
    for name in lora_targets(params_lora):
        dw, a, b = grads[name], params_lora[name + SUFFIX_A], params_lora[name + SUFFIX_B]
        s = dw.dtype.type(scale)
        out[name + SUFFIX_A] = s * (dw @ b.T)                # (in, r)
        out[name + SUFFIX_B] = s * (a.T @ dw)                # (r, out)
    return {k: out[k] for k in params_lora}


def lora_loss_and_grads(loss_and_grads: Callable[[dict], tuple], params: dict, lora: dict,
                        alpha, rank, rank_scale=None):
    """Loss and adapter gradients for any model whose ``loss_and_grads(params) -> (loss, grads)``.

    Merges the adapters into a copy of the adapted weights, calls the model's own
    loss and backward once, and maps each full dW to (dA, dB) with
    :func:`lora_grads_from_full`. ``params`` is never modified.
    -> (loss, {adapter key: gradient})
    """
    s = lora_scale(alpha, rank, rank_scale)
    loss, grads = loss_and_grads(merge_lora(params, lora, alpha, rank, rank_scale))
    return loss, lora_grads_from_full(grads, lora, s)
