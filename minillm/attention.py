"""Attention: scaled dot-product, masks, multi-head, GQA/MQA, RoPE, cross-attention,
a KV cache for decoding, and tiled (FlashAttention-style) attention.

The one formula everything here is built around:

    Attention(Q, K, V) = softmax(Q K^T * scale + bias) V,     scale = 1 / sqrt(D)

Each query row asks "which keys look like me?", the softmax turns the answers into
weights that sum to 1, and the output is that weighted average of the value rows.

Shapes (the names used throughout):
    B batch, T / Tq queries, Tk keys, C model width, D head size,
    H query heads, Hkv key/value heads (H a multiple of Hkv), G = H / Hkv.

Conventions:
    * Masks are boolean, True = "may attend". ``causal=True`` lets query i see keys
      j <= i; when Tq < Tk (a block of new queries after a KV cache) the queries are
      the *last* Tq positions, so query i sits at position Tk - Tq + i.
    * A query row whose keys are all masked has nothing to average. We define its
      output as 0 and its gradient as 0 (never NaN); PyTorch would give NaN.
    * Grouped-query attention (GQA; MQA is Hkv = 1) never copies K/V per query
      head: q is reshaped to (B, Hkv, G*Tq, D) so each K/V head meets its G query
      heads in one batched matmul. Query head h uses K/V head h // G (the layout of
      Hugging Face's ``repeat_kv`` / ``repeat_interleave``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .backend import (array_module, check_float, check_int, check_ndim, check_same_dtype,
                      check_shape, xp_default)
from .backprop import dropout_backward, dropout_forward
from .ffn import linear_backward, linear_forward

__all__ = [
    "sdpa_forward", "sdpa_backward",
    "flash_attention_forward", "flash_attention_backward",
    "rope_forward", "rope_backward", "rope_angles",
    "self_attention_forward", "self_attention_backward",
    "cross_attention_forward", "cross_attention_backward",
    "KVCache", "causal_mask", "padding_mask",
]


# ---------------------------------------------------------------------------
# Argument checks shared by the attention functions
# ---------------------------------------------------------------------------

def _check_attention_inputs(q, k, v, mask, causal):
    """The checks plain and tiled attention share: q/k/v shapes, the mask, and causal
    needing Tq <= Tk. -> (B, H, Hkv, Tq, Tk, D)"""
    B, H, Hkv, Tq, Tk, D = _check_qkv(q, k, v)
    _check_mask(mask, (B, H, Tq, Tk), like=q)
    if causal and Tq > Tk:
        raise ValueError(f"causal: needs Tq <= Tk (queries are the last Tq of the Tk positions), "
                         f"got q with Tq={Tq} and k with Tk={Tk}")
    return B, H, Hkv, Tq, Tk, D


def _check_qkv(q, k, v):
    """Validate q: (B, H, Tq, D), k, v: (B, Hkv, Tk, D); return (B, H, Hkv, Tq, Tk, D)."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        check_float(name, a)
        check_ndim(name, a, 4)
    check_same_dtype(q=q, k=k, v=v)
    B, H, Tq, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"k: expected batch size {B} (q's first axis), got shape {tuple(k.shape)}")
    if Dk != D:
        raise ValueError(f"k: expected head size D={D} (q's last axis), got shape {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected shape {tuple(k.shape)} (the shape of k), got {tuple(v.shape)}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"k: expected a number of key/value heads that divides q's H={H}, "
                         f"got Hkv={Hkv} (shape {tuple(k.shape)})")
    return B, H, Hkv, Tq, Tk, D


def _check_mask(mask, target, like=None):
    """mask must be boolean, on the device of ``like``, and broadcastable to ``target`` = (B, H, Tq, Tk)."""
    if mask is None:
        return
    xp = array_module(mask)
    if like is not None and xp is not array_module(like):
        raise TypeError(f"mask: expected a {array_module(like).__name__} array (where q lives), "
                        f"got a {xp.__name__} array")
    if not (hasattr(mask, "dtype") and hasattr(mask, "shape")) or mask.dtype != xp.bool_:
        got = f"dtype {mask.dtype}" if hasattr(mask, "dtype") else type(mask).__name__
        raise TypeError(f"mask: expected a boolean array (True = may attend), got {got}")
    shp = tuple(mask.shape)
    ok = len(shp) <= len(target) and all(m in (1, t) for m, t in zip(shp[::-1], target[::-1]))
    if not ok:
        raise ValueError(f"mask: expected a shape broadcastable to (B, H, Tq, Tk) = {tuple(target)}, "
                         f"got {shp}")


def _scale_for(scale, D, dtype):
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif not (isinstance(scale, (int, float, np.floating, np.integer)) and math.isfinite(scale)):
        raise ValueError(f"scale: expected a finite number or None, got {scale!r}")
    return dtype.type(scale)  # a scalar of the data's dtype: float32 stays float32


# ---------------------------------------------------------------------------
# Masks as additive biases
# ---------------------------------------------------------------------------

_CAUSAL_BIAS_CACHE: dict = {}


def causal_mask(Tq, Tk=None, xp=np):
    """Boolean (Tq, Tk) mask, True where query i may see key j: j <= i + (Tk - Tq).

    The queries are the last Tq of Tk positions (Tq == Tk is ordinary self-attention).
    """
    Tk = Tq if Tk is None else Tk
    return xp.tril(xp.ones((Tq, Tk), dtype=bool), k=Tk - Tq)


def padding_mask(lengths, T, xp=None):
    """Key padding mask (B, 1, 1, T) from true lengths (B,): True for real tokens.

    Broadcasts against scores (B, H, Tq, T), so padded keys get no attention.
    """
    check_int("lengths", lengths)
    xp = xp or array_module(lengths)
    return (xp.arange(T)[None, :] < xp.asarray(lengths)[:, None])[:, None, None, :]


def _causal_bias(xp, Tq, Tk, dtype):
    """(Tq, Tk) additive bias: 0 where allowed, -inf above the (shifted) diagonal.

    Built once per (device, shape, dtype) and reused: the training loop calls attention
    with the same T every step, so this costs nothing after the first call.
    """
    dev = getattr(getattr(xp, "cuda", None), "Device", None)
    dev_id = dev().id if (dev is not None and xp is not np) else -1
    key = (xp.__name__, dev_id, Tq, Tk, np.dtype(dtype).str)
    bias = _CAUSAL_BIAS_CACHE.get(key)
    if bias is None:
        if len(_CAUSAL_BIAS_CACHE) > 64:
            _CAUSAL_BIAS_CACHE.clear()
        allowed = causal_mask(Tq, Tk, xp)
        bias = xp.where(allowed, dtype.type(0), dtype.type(-np.inf)).astype(dtype)
        _CAUSAL_BIAS_CACHE[key] = bias
    return bias


def _mask_bias(mask, dtype):
    """A boolean mask as an additive bias of the scores' dtype (0 allowed, -inf masked)."""
    xp = array_module(mask)
    return xp.where(mask, dtype.type(0), dtype.type(-np.inf)).astype(dtype)


def _masked_softmax_(s, may_be_empty):
    """Softmax over the last axis of scores ``s`` IN PLACE; -inf entries are masked.

    Returns (p, m, l): the probabilities (which reuse s's memory), the row max m and the
    row sum l of exp(s - m). A row that is entirely -inf would give (-inf) - (-inf) = NaN;
    we shift such rows by 0 instead, so exp gives all zeros, l = 0, and we divide by 1:
    the row's probabilities are all 0, hence output 0 and gradient 0 (documented).
    """
    xp = array_module(s)
    m = xp.max(s, axis=-1, keepdims=True)
    if may_be_empty:
        m = xp.where(m == -np.inf, s.dtype.type(0), m)
    s -= m
    xp.exp(s, out=s)
    l = xp.sum(s, axis=-1, keepdims=True)
    if may_be_empty:
        s /= xp.where(l == 0, s.dtype.type(1), l)
    else:
        s /= l
    return s, m, l


# ---------------------------------------------------------------------------
# Scaled dot-product attention (the plain version: keeps the Tq x Tk probabilities)
# ---------------------------------------------------------------------------

class SDPACache(NamedTuple):
    qs: object        # (B, Hkv, G*Tq, D) q * scale, grouped by K/V head
    k: object         # (B, Hkv, Tk, D)
    v: object         # (B, Hkv, Tk, D)
    p: object         # (B, Hkv, G*Tq, Tk) softmax probabilities (before dropout)
    out: object       # (B, Hkv, G*Tq, D) the output, for rowsum(dout * out)
    drop: object      # DropoutCache of the probabilities (mask None when p == 0)
    scale: object     # scalar of q's dtype
    shape: tuple      # (B, H, Tq, D): q's shape, to give dq back


def sdpa_forward(q, k, v, mask=None, causal=False, scale=None, dropout_p=0.0, rng=None):
    """out = softmax(q k^T * scale + mask_bias) v, per head, with grouped K/V heads.

    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with H a multiple of Hkv; mask: bool,
    broadcastable to (B, H, Tq, Tk), True = may attend; causal: query i sees keys
    j <= i + Tk - Tq (requires Tq <= Tk); scale: default 1/sqrt(D).
    dropout_p, rng: optional dropout on the attention probabilities (training only).
    A fully masked query row gets output 0 and gradient 0.
    -> out: (B, H, Tq, D), cache
    """
    B, H, Hkv, Tq, Tk, D = _check_attention_inputs(q, k, v, mask, causal)
    xp = array_module(q)
    G = H // Hkv
    scale = _scale_for(scale, D, q.dtype)

    # Scale q (Tq*D numbers) rather than the scores (Tq*Tk numbers). Query heads are
    # ordered [G heads of K/V head 0, G heads of K/V head 1, ...], so (B, H, Tq, D) ->
    # (B, Hkv, G*Tq, D) is a plain reshape, and one matmul per K/V head serves its group.
    qs = (q * scale).reshape(B, Hkv, G * Tq, D)
    s = xp.matmul(qs, k.swapaxes(-1, -2)).reshape(B, H, Tq, Tk)   # a view: one row block per head
    if causal:
        s += _causal_bias(xp, Tq, Tk, q.dtype)
    if mask is not None:
        s += _mask_bias(mask, q.dtype)
    p, _, _ = _masked_softmax_(s, may_be_empty=mask is not None)
    p = p.reshape(B, Hkv, G * Tq, Tk)
    pd, drop = dropout_forward(p, dropout_p, rng) if dropout_p else (p, None)
    out = xp.matmul(pd, v)                           # (B, Hkv, G*Tq, D)
    cache = SDPACache(qs, k, v, p, out, drop, scale, (B, H, Tq, D))
    return out.reshape(B, H, Tq, D), cache


def sdpa_backward(dout, cache: SDPACache):
    """Backward of sdpa_forward. -> dq: (B, H, Tq, D), dk, dv: (B, Hkv, Tk, D).

    With P = softmax(S), O = P V:  dV = P^T dO,  dP = dO V^T,
    dS = P * (dP - rowsum(dP * P)),  dQ = dS K * scale,  dK = dS^T (Q * scale).
    rowsum(dP * P) equals rowsum(dO * O) (since O = P V), a (Tq,) vector instead of a
    Tq x Tk product. A K/V head's gradient sums over its G query heads for free: the
    grouped matmuls contract over the G*Tq rows.
    """
    qs, k, v, p, out, drop, scale, shape = cache
    xp = array_module(p)
    B, H, Tq, D = shape
    if tuple(dout.shape) != tuple(shape):
        raise ValueError(f"dout: expected shape {tuple(shape)}, got {tuple(dout.shape)}")
    do = dout.reshape(out.shape)                      # (B, Hkv, G*Tq, D)
    pd = p if drop is None else p * drop.mask
    dv = xp.matmul(pd.swapaxes(-1, -2), do)           # (B, Hkv, Tk, D)
    dp = xp.matmul(do, v.swapaxes(-1, -2))            # (B, Hkv, G*Tq, Tk)
    if drop is not None:
        dp = dropout_backward(dp, drop)
    # sum_j P_ij dP_ij = dO_i . O_i also with dropout: P * mask = P_dropped and O = P_dropped V.
    delta = xp.sum(do * out, axis=-1, keepdims=True)  # (B, Hkv, G*Tq, 1)
    dp -= delta
    dp *= p                                           # dS, in place (masked entries: p = 0)
    dq = xp.matmul(dp, k)
    dq *= scale
    dk = xp.matmul(dp.swapaxes(-1, -2), qs)           # qs already carries the scale
    return dq.reshape(B, H, Tq, D), dk, dv


# ---------------------------------------------------------------------------
# Tiled attention, the FlashAttention way: never the full Tq x Tk matrix
# ---------------------------------------------------------------------------

class FlashCache(NamedTuple):
    q: object          # (B, H, Tq, D)
    k: object          # (B, Hkv, Tk, D)
    v: object          # (B, Hkv, Tk, D)
    out: object        # (B, H, Tq, D)
    lse: object        # (B, H, Tq, 1) logsumexp of each score row (+inf for a fully masked row)
    mask: object       # the boolean mask, or None
    causal: bool
    scale: object
    block_size: int


def _mask4(mask):
    """View a mask broadcastable to 4 dims as a 4-dim array (leading 1s)."""
    return mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))


def _block_bias(xp, dtype, i0, i1, j0, j1, offset, causal, mask4):
    """Additive bias (0 / -inf) for the score tile rows [i0, i1) x keys [j0, j1), or None.

    Built per tile from indices, so a causal mask never costs Tq x Tk memory.
    """
    bias = None
    if causal and j1 - 1 > offset + i0:  # the tile reaches above the diagonal
        rows = xp.arange(i0, i1)[:, None] + offset
        cols = xp.arange(j0, j1)[None, :]
        bias = xp.where(cols > rows, dtype.type(-np.inf), dtype.type(0)).astype(dtype)
    if mask4 is not None:
        mi = slice(i0, i1) if mask4.shape[2] > 1 else slice(None)
        mj = slice(j0, j1) if mask4.shape[3] > 1 else slice(None)
        mb = _mask_bias(mask4[:, :, mi, mj], dtype)
        bias = mb if bias is None else bias + mb
    return bias


def _check_block_size(block_size):
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
    return int(block_size)


def flash_attention_forward(q, k, v, causal=False, mask=None, scale=None, block_size=64):
    """The same out as sdpa_forward, computed tile by tile with an online softmax.

    For each block of queries we sweep the key blocks keeping, per query row, the
    running max m, the running sum l of exp(s - m) and the running output acc:
        m' = max(m, rowmax(S_j)),  alpha = exp(m - m'),  P_j = exp(S_j - m')
        l' = alpha l + rowsum(P_j),  acc' = alpha acc + P_j V_j
    and finish with out = acc / l. Memory for scores is one (block x block) tile per
    head instead of Tq x Tk. The cache keeps only the per-row logsumexp (m + log l),
    from which the backward recomputes each probability tile exactly. Causal tiles
    wholly above the diagonal are skipped (about half the work).
    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D); mask bool broadcastable to (B, H, Tq, Tk)
    -> out: (B, H, Tq, D), cache
    """
    B, H, Hkv, Tq, Tk, D = _check_attention_inputs(q, k, v, mask, causal)
    bs = _check_block_size(block_size)
    xp = array_module(q)
    dt = q.dtype
    G = H // Hkv
    scale = _scale_for(scale, D, dt)
    offset = Tk - Tq
    mask4 = None if mask is None else _mask4(mask)
    q5 = q.reshape(B, Hkv, G, Tq, D)
    out = xp.empty((B, H, Tq, D), dtype=dt)
    out5 = out.reshape(B, Hkv, G, Tq, D)
    lse = xp.empty((B, H, Tq, 1), dtype=dt)
    zero, one, inf = dt.type(0), dt.type(1), dt.type(np.inf)
    for i0 in range(0, Tq, bs):
        i1 = min(i0 + bs, Tq)
        bq = i1 - i0
        qb = (q5[:, :, :, i0:i1] * scale).reshape(B, Hkv, G * bq, D)
        m = xp.full((B, H, bq, 1), -inf, dtype=dt)
        l = xp.zeros((B, H, bq, 1), dtype=dt)
        acc = xp.zeros((B, H, bq, D), dtype=dt)
        j_end = min(Tk, offset + i1) if causal else Tk   # keys after this are all masked
        for j0 in range(0, j_end, bs):
            j1 = min(j0 + bs, j_end)
            bk = j1 - j0
            s = xp.matmul(qb, k[:, :, j0:j1].swapaxes(-1, -2)).reshape(B, H, bq, bk)
            bias = _block_bias(xp, dt, i0, i1, j0, j1, offset, causal, mask4)
            if bias is not None:
                s += bias
            m_new = xp.maximum(m, xp.max(s, axis=-1, keepdims=True))
            # A row with no visible key so far has m_new = -inf; shift it by 0 (not
            # -inf) so exp gives 0 rather than NaN.
            m_safe = xp.where(m_new == -inf, zero, m_new)
            s -= m_safe
            xp.exp(s, out=s)                                     # P_j, unnormalised
            alpha = xp.exp(m - m_safe)                           # rescales the old sums
            l *= alpha
            l += xp.sum(s, axis=-1, keepdims=True)
            acc *= alpha
            acc += xp.matmul(s.reshape(B, Hkv, G * bq, bk), v[:, :, j0:j1]).reshape(B, H, bq, D)
            m = m_new
        empty = l == 0                                           # fully masked rows
        out5[:, :, :, i0:i1] = (acc / xp.where(empty, one, l)).reshape(B, Hkv, G, bq, D)
        # logsumexp; +inf for an empty row makes every recomputed probability exp(s - inf) = 0.
        lse[:, :, i0:i1] = xp.where(empty, inf, m + xp.log(xp.where(empty, one, l)))
    return out, FlashCache(q, k, v, out, lse, mask, bool(causal), scale, bs)


def flash_attention_backward(dout, cache: FlashCache):
    """Backward of flash_attention_forward, tile by tile. -> dq, dk, dv.

    Each probability tile is recomputed as P = exp(S - lse) (exact, no renormalising),
    then the plain formulas apply per tile: dV_j += P^T dO_i, dP = dO_i V_j^T,
    dS = P * (dP - delta_i) with delta_i = rowsum(dO_i * O_i), dQ_i += dS K_j * scale,
    dK_j += dS^T (Q_i * scale).
    """
    q, k, v, out, lse, mask, causal, scale, bs = cache
    xp = array_module(q)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = H // Hkv
    dt = q.dtype
    if tuple(dout.shape) != tuple(out.shape):
        raise ValueError(f"dout: expected shape {tuple(out.shape)}, got {tuple(dout.shape)}")
    offset = Tk - Tq
    mask4 = None if mask is None else _mask4(mask)
    delta = xp.sum(dout * out, axis=-1, keepdims=True)           # (B, H, Tq, 1)
    q5 = q.reshape(B, Hkv, G, Tq, D)
    do5 = dout.reshape(B, Hkv, G, Tq, D)
    dq = xp.empty(q.shape, dtype=dt)                             # C-contiguous, so dq5 is a view
    dq5 = dq.reshape(B, Hkv, G, Tq, D)
    dk = xp.zeros_like(k)
    dv = xp.zeros_like(v)
    for i0 in range(0, Tq, bs):
        i1 = min(i0 + bs, Tq)
        bq = i1 - i0
        qb = (q5[:, :, :, i0:i1] * scale).reshape(B, Hkv, G * bq, D)
        dob = do5[:, :, :, i0:i1].reshape(B, Hkv, G * bq, D)
        lse_b = lse[:, :, i0:i1]
        delta_b = delta[:, :, i0:i1]
        dqb = xp.zeros((B, Hkv, G * bq, D), dtype=dt)
        j_end = min(Tk, offset + i1) if causal else Tk
        for j0 in range(0, j_end, bs):
            j1 = min(j0 + bs, j_end)
            kj, vj = k[:, :, j0:j1], v[:, :, j0:j1]
            bk = j1 - j0
            p = xp.matmul(qb, kj.swapaxes(-1, -2)).reshape(B, H, bq, bk)
            bias = _block_bias(xp, dt, i0, i1, j0, j1, offset, causal, mask4)
            if bias is not None:
                p += bias
            p -= lse_b
            xp.exp(p, out=p)                                     # the probabilities again
            p = p.reshape(B, Hkv, G * bq, bk)
            dv[:, :, j0:j1] += xp.matmul(p.swapaxes(-1, -2), dob)
            ds = xp.matmul(dob, vj.swapaxes(-1, -2)).reshape(B, H, bq, bk)
            ds -= delta_b
            ds = ds.reshape(B, Hkv, G * bq, bk)
            ds *= p                                              # dS
            dqb += xp.matmul(ds, kj)
            dk[:, :, j0:j1] += xp.matmul(ds.swapaxes(-1, -2), qb)
        dqb *= scale
        dq5[:, :, :, i0:i1] = dqb.reshape(B, Hkv, G, bq, D)
    return dq, dk, dv


# ---------------------------------------------------------------------------
# Rotary position embedding (RoPE)
# ---------------------------------------------------------------------------

class RopeCache(NamedTuple):
    cos: object         # (1 or B, 1, T, D/2)
    sin: object         # (1 or B, 1, T, D/2)
    interleaved: bool


def rope_angles(positions, D, base=10000.0, dtype=np.float32, xp=None):
    """cos and sin of the rotation angles m * theta_i, theta_i = base^(-2i/D), i < D/2.

    positions: (T,) or (B, T) int -> cos, sin: (1 or B, 1, T, D/2), ready to broadcast
    against (B, H, T, D/2). The angles are computed in float64 and then cast, so large
    positions keep their precision in float32.
    """
    xp = xp or array_module(positions)
    inv_freq = 1.0 / (float(base) ** (np.arange(0, D, 2, dtype=np.float64) / D))   # (D/2,)
    ang = xp.asarray(positions).astype(np.float64)[..., None] * xp.asarray(inv_freq)
    if ang.ndim == 2:
        ang = ang[None]
    ang = ang[:, None]                                   # (1 or B, 1, T, D/2)
    return xp.cos(ang).astype(dtype), xp.sin(ang).astype(dtype)


def _rotate(x, cos, sin, interleaved):
    """Rotate each pair (a, b) of x by the angle whose cos/sin are given: (a c - b s, b c + a s)."""
    xp = array_module(x)
    y = xp.empty_like(x)
    if interleaved:        # pairs (2i, 2i+1): RoFormer, Meta's original LLaMA code
        a, b = x[..., 0::2], x[..., 1::2]
        y[..., 0::2] = a * cos - b * sin
        y[..., 1::2] = b * cos + a * sin
    else:                  # pairs (i, i + D/2): "rotate half", Hugging Face / GPT-NeoX
        h = x.shape[-1] // 2
        a, b = x[..., :h], x[..., h:]
        y[..., :h] = a * cos - b * sin
        y[..., h:] = b * cos + a * sin
    return y


def rope_forward(x, positions, base=10000.0, interleaved=False):
    """Rotate each pair of coordinates of x by position * theta_i, theta_i = base^(-2i/D).

    Because a rotation by m theta followed by a dot product with a rotation by n theta
    depends only on (m - n) theta, q_m . k_n then depends on positions only through
    m - n: relative positions from an absolute rotation. Pairs are (i, i + D/2) by
    default (Hugging Face LLaMA convention), (2i, 2i+1) with interleaved=True (RoFormer).
    x: (B, H, T, D), D even; positions: (T,) or (B, T) int -> y: (B, H, T, D), cache
    """
    check_float("x", x)
    check_ndim("x", x, 4)
    B, H, T, D = x.shape
    if D % 2:
        raise ValueError(f"x: expected an even head size D (coordinates are rotated in pairs), "
                         f"got shape {tuple(x.shape)}")
    check_int("positions", positions)
    if tuple(positions.shape) not in ((T,), (B, T)):
        raise ValueError(f"positions: expected shape (T,) = ({T},) or (B, T) = ({B}, {T}), "
                         f"got {tuple(positions.shape)}")
    if not (isinstance(base, (int, float, np.floating, np.integer)) and base > 1):
        raise ValueError(f"base: expected a number > 1, got {base!r}")
    cos, sin = rope_angles(positions, D, base, x.dtype, array_module(x))
    return _rotate(x, cos, sin, bool(interleaved)), RopeCache(cos, sin, bool(interleaved))


def rope_backward(dy, cache: RopeCache):
    """A rotation's transpose is the rotation by the opposite angle. -> dx: (B, H, T, D)"""
    return _rotate(dy, cache.cos, -cache.sin, cache.interleaved)


# ---------------------------------------------------------------------------
# KV cache for incremental decoding
# ---------------------------------------------------------------------------

class KVCache:
    """Preallocated key/value buffers, one pair per layer, for token-by-token decoding.

    Each layer has k and v buffers of shape (batch_size, n_kv_head, max_len, head_dim).
    ``append(layer, k, v)`` writes a block of T_new new positions after those already
    filled and returns views (B, Hkv, length, D) of everything filled so far, which the
    new queries attend over (with causal=True the new queries are the last T_new
    positions). Nothing is reallocated while decoding.

    Position offset of the next block: ``cache.length(layer)`` *before* the append is
    the number of positions already cached, so the new tokens sit at positions
    ``length, length + 1, ..., length + T_new - 1`` (what RoPE or a learned position
    embedding needs). A model reads ``cache.length(0)`` before running its layers.
    """

    def __init__(self, n_layer, batch_size, n_kv_head, max_len, head_dim, dtype=np.float32, xp=None):
        for name, val in (("n_layer", n_layer), ("batch_size", batch_size), ("n_kv_head", n_kv_head),
                          ("max_len", max_len), ("head_dim", head_dim)):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
                raise ValueError(f"{name}: expected a positive int, got {val!r}")
        self.xp = xp if xp is not None else xp_default()
        self.dtype = np.dtype(dtype)
        if self.dtype.kind != "f":
            raise TypeError(f"dtype: expected a floating-point dtype, got {self.dtype}")
        self.n_layer, self.max_len = int(n_layer), int(max_len)
        shape = (int(batch_size), int(n_kv_head), int(max_len), int(head_dim))
        self.k = [self.xp.zeros(shape, dtype=self.dtype) for _ in range(self.n_layer)]
        self.v = [self.xp.zeros(shape, dtype=self.dtype) for _ in range(self.n_layer)]
        self._len = [0] * self.n_layer

    @property
    def shape(self):
        """(batch_size, n_kv_head, max_len, head_dim) of each buffer."""
        return tuple(self.k[0].shape)

    @property
    def nbytes(self):
        """Bytes held by all the buffers (2 * n_layer * B * Hkv * max_len * D * itemsize)."""
        return sum(int(a.nbytes) for a in self.k) + sum(int(a.nbytes) for a in self.v)

    def _check_layer(self, layer):
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.n_layer:
            raise ValueError(f"layer: expected an int in [0, {self.n_layer}), got {layer!r}")

    def length(self, layer=0):
        """Number of positions filled in ``layer`` (= the position of the next token)."""
        self._check_layer(layer)
        return self._len[layer]

    def append(self, layer, k, v):
        """Write k, v: (B, Hkv, T_new, D) after the filled part; -> (k_all, v_all) views."""
        self._check_layer(layer)
        B, Hkv, _, D = self.shape
        for name, a in (("k", k), ("v", v)):
            check_float(name, a)
            check_shape(name, a, (B, Hkv, None, D))
            if a.dtype != self.dtype:
                raise TypeError(f"{name}: expected dtype {self.dtype} (the cache's dtype), got {a.dtype}")
        if tuple(v.shape) != tuple(k.shape):
            raise ValueError(f"v: expected shape {tuple(k.shape)} (the shape of k), got {tuple(v.shape)}")
        L, T = self._len[layer], k.shape[2]
        if L + T > self.max_len:
            raise ValueError(f"k: appending {T} positions to the {L} cached in layer {layer} exceeds "
                             f"max_len={self.max_len}")
        self.k[layer][:, :, L:L + T] = k
        self.v[layer][:, :, L:L + T] = v
        self._len[layer] = L + T
        return self.k[layer][:, :, :L + T], self.v[layer][:, :, :L + T]

    def crop(self, length):
        """Forget every position >= ``length`` in all layers (e.g. rejected speculative tokens)."""
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
            raise ValueError(f"length: expected a non-negative int, got {length!r}")
        self._len = [min(n, int(length)) for n in self._len]

    def reorder(self, index):
        """Keep/permute/repeat batch rows: buffers become buffer[index] (beam search).

        index: (B',) int; the batch size becomes B'.
        """
        check_int("index", index)
        check_ndim("index", index, 1)
        idx = self.xp.asarray(index)
        self.k = [a[idx] for a in self.k]
        self.v = [a[idx] for a in self.v]

    def reset(self):
        """Empty every layer (the buffers are kept and reused)."""
        self._len = [0] * self.n_layer

    def __repr__(self):
        B, Hkv, M, D = self.shape
        return (f"KVCache(n_layer={self.n_layer}, batch_size={B}, n_kv_head={Hkv}, max_len={M}, "
                f"head_dim={D}, dtype={self.dtype}, lengths={self._len}, nbytes={self.nbytes})")


# ---------------------------------------------------------------------------
# Multi-head self-attention and cross-attention, with their projections
# ---------------------------------------------------------------------------

def _heads(n_head, n_kv_head, C):
    """Validate head counts against width C; -> (H, Hkv, D)."""
    if isinstance(n_head, bool) or not isinstance(n_head, (int, np.integer)) or n_head < 1:
        raise ValueError(f"n_head: expected a positive int, got {n_head!r}")
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    if isinstance(n_kv_head, bool) or not isinstance(n_kv_head, (int, np.integer)) or n_kv_head < 1:
        raise ValueError(f"n_kv_head: expected a positive int or None, got {n_kv_head!r}")
    if C % n_head:
        raise ValueError(f"n_head: expected a divisor of the width C={C} (head size D = C // n_head), "
                         f"got {n_head}")
    if n_head % n_kv_head:
        raise ValueError(f"n_kv_head: expected a divisor of n_head={n_head} (each K/V head serves "
                         f"n_head / n_kv_head query heads), got {n_kv_head}")
    return int(n_head), int(n_kv_head), C // n_head


def _check_param(name, a, shape, dtype, optional=False):
    if a is None and optional:
        return
    check_float(name, a)
    check_shape(name, a, shape)
    if a.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the dtype of x), got {a.dtype}")


def _split_heads(t2d, B, T, n, D):
    """(B*T, n*D) -> (B, n, T, D), contiguous: the one transpose attention needs."""
    xp = array_module(t2d)
    return xp.ascontiguousarray(t2d.reshape(B, T, n, D).transpose(0, 2, 1, 3))


def _attend(q, k, v, mask, causal, dropout_p, rng, impl, block_size):
    if impl == "plain":
        return sdpa_forward(q, k, v, mask=mask, causal=causal, dropout_p=dropout_p, rng=rng)
    if impl == "tiled":
        if dropout_p:
            raise ValueError("dropout_p: attention dropout is only implemented for impl='plain', "
                             f"got dropout_p={dropout_p!r} with impl='tiled'")
        return flash_attention_forward(q, k, v, causal=causal, mask=mask, block_size=block_size)
    raise ValueError(f"impl: expected 'plain' or 'tiled', got {impl!r}")


def _attend_backward(dout, cache):
    if isinstance(cache, FlashCache):
        return flash_attention_backward(dout, cache)
    return sdpa_backward(dout, cache)


class SelfAttentionCache(NamedTuple):
    qkv: object        # LinearCache of the q/k/v projection (x, w_qkv)
    proj: object       # LinearCache of the output projection (heads side by side, w_o)
    attn: object       # SDPACache or FlashCache
    rope: object       # RopeCache or None
    dims: tuple        # (B, T, C, H, Hkv, D)
    used_kv_cache: bool


def self_attention_forward(x, w_qkv, b_qkv, w_o, b_o, n_head, n_kv_head=None, causal=False, mask=None,
                           positions=None, rope_base=None, rope_interleaved=False, kv_cache=None, layer=0,
                           dropout_p=0.0, rng=None, impl="plain", block_size=64):
    """y = concat_h(attention(x Wq_h, x Wk_h, x Wv_h)) W_o + b_o, all heads at once.

    x: (B, T, C); w_qkv: (C, (H + 2 Hkv) D) laid out [query heads | key heads | value
    heads] (GPT-2's c_attn when Hkv == H); b_qkv: ((H + 2 Hkv) D,) or None;
    w_o: (H D, C); b_o: (C,) or None; D = C // n_head; n_kv_head: None = n_head (MHA),
    1 = MQA, otherwise GQA.
    causal / mask: as sdpa_forward, mask broadcastable to (B, n_head, T, Tk) (e.g. a key
    padding mask (B, 1, 1, Tk)); Tk = T, or with kv_cache the cached length after this
    block is appended. rope_base: None = no RoPE; else RoPE(base) on q and k
    at ``positions`` ((T,) or (B, T) int; default arange(T) + the kv_cache's length).
    kv_cache (inference only): this block's k, v are appended to layer ``layer`` and the
    queries attend over everything cached. dropout_p, rng: attention-probability dropout.
    impl: "plain" (sdpa_forward) or "tiled" (flash_attention_forward, block_size).
    -> y: (B, T, C), cache
    """
    check_float("x", x)
    check_ndim("x", x, 3)
    B, T, C = x.shape
    H, Hkv, D = _heads(n_head, n_kv_head, C)
    _check_param("w_qkv", w_qkv, (C, (H + 2 * Hkv) * D), x.dtype)
    _check_param("b_qkv", b_qkv, ((H + 2 * Hkv) * D,), x.dtype, optional=True)
    _check_param("w_o", w_o, (H * D, C), x.dtype)
    _check_param("b_o", b_o, (C,), x.dtype, optional=True)
    if positions is not None and rope_base is None:
        raise ValueError("positions: only used by RoPE, but rope_base is None (pass rope_base=10000.0 "
                         "to rotate q and k, or leave positions out)")
    xp = array_module(x)

    qkv, lc_qkv = linear_forward(x.reshape(B * T, C), w_qkv, b_qkv)   # one GEMM for q, k and v
    t = _split_heads(qkv, B, T, H + 2 * Hkv, D)               # (B, H + 2 Hkv, T, D)
    q, k, v = t[:, :H], t[:, H:H + Hkv], t[:, H + Hkv:]       # views, no copies

    rc = None
    if rope_base is not None:
        if positions is None:
            start = kv_cache.length(layer) if kv_cache is not None else 0
            positions = xp.arange(start, start + T)
        q, rc = rope_forward(q, positions, base=rope_base, interleaved=rope_interleaved)
        k = _rotate(k, rc.cos, rc.sin, rc.interleaved)         # same angles as q

    if kv_cache is not None:
        k, v = kv_cache.append(layer, k, v)
    out, ac = _attend(q, k, v, mask, causal, dropout_p, rng, impl, block_size)   # (B, H, T, D)

    att2d = out.transpose(0, 2, 1, 3).reshape(B * T, H * D)   # heads side by side again
    y, lc_o = linear_forward(att2d, w_o, b_o)
    cache = SelfAttentionCache(lc_qkv, lc_o, ac, rc, (B, T, C, H, Hkv, D), kv_cache is not None)
    return y.reshape(B, T, C), cache


def self_attention_backward(dy, cache: SelfAttentionCache):
    """Backward of self_attention_forward. -> (dx, dw_qkv, db_qkv, dw_o, db_o); bias grads None
    when the bias was None."""
    lc_qkv, lc_o, ac, rc, dims, used_kv = cache
    if used_kv:
        raise ValueError("cache: this forward used a kv_cache, which is for inference only; "
                         "run the forward without kv_cache to train")
    B, T, C, H, Hkv, D = dims
    check_shape("dy", dy, (B, T, C))
    xp = array_module(dy)
    datt2d, dw_o, db_o = linear_backward(dy.reshape(B * T, C), lc_o)
    datt = _split_heads(datt2d, B, T, H, D)                   # (B, H, T, D)
    dq, dk, dv = _attend_backward(datt, ac)
    if rc is not None:
        dq = rope_backward(dq, rc)
        dk = rope_backward(dk, rc)
    # Back to the [q | k | v] column layout of w_qkv: (B, T, H + 2 Hkv, D).
    dqkv = xp.empty((B, T, H + 2 * Hkv, D), dtype=dy.dtype)
    dqkv[:, :, :H] = dq.transpose(0, 2, 1, 3)
    dqkv[:, :, H:H + Hkv] = dk.transpose(0, 2, 1, 3)
    dqkv[:, :, H + Hkv:] = dv.transpose(0, 2, 1, 3)
    dx, dw_qkv, db_qkv = linear_backward(dqkv.reshape(B * T, (H + 2 * Hkv) * D), lc_qkv)
    return dx.reshape(B, T, C), dw_qkv, db_qkv, dw_o, db_o


class CrossAttentionCache(NamedTuple):
    q: object          # LinearCache of the query projection (x, w_q)
    kv: object         # LinearCache of the key/value projection (context, w_kv)
    proj: object       # LinearCache of the output projection (heads side by side, w_o)
    attn: object       # SDPACache
    dims: tuple        # (B, Tq, Tk, C, C_ctx, H, Hkv, D)


def cross_attention_forward(x, context, w_q, b_q, w_kv, b_kv, w_o, b_o, n_head, n_kv_head=None, mask=None):
    """Queries from x, keys and values from context (an encoder's output, an image, ...).

    y = concat_h(attention(x Wq_h, c Wk_h, c Wv_h)) W_o + b_o; no causal mask (every
    query may see the whole context); mask bool broadcastable to (B, n_head, Tq, Tk),
    e.g. a context padding mask (B, 1, 1, Tk).
    x: (B, Tq, C); context: (B, Tk, C_ctx); w_q: (C, H D); b_q: (H D,) or None;
    w_kv: (C_ctx, 2 Hkv D) laid out [keys | values]; b_kv: (2 Hkv D,) or None;
    w_o: (H D, C); b_o: (C,) or None; D = C // n_head. -> y: (B, Tq, C), cache
    """
    check_float("x", x)
    check_ndim("x", x, 3)
    check_float("context", context)
    check_ndim("context", context, 3)
    B, Tq, C = x.shape
    if context.shape[0] != B:
        raise ValueError(f"context: expected batch size {B} (x's first axis), got shape {tuple(context.shape)}")
    if context.dtype != x.dtype:
        raise TypeError(f"context: expected dtype {x.dtype} (the dtype of x), got {context.dtype}")
    Tk, Cc = context.shape[1], context.shape[2]
    H, Hkv, D = _heads(n_head, n_kv_head, C)
    _check_param("w_q", w_q, (C, H * D), x.dtype)
    _check_param("b_q", b_q, (H * D,), x.dtype, optional=True)
    _check_param("w_kv", w_kv, (Cc, 2 * Hkv * D), x.dtype)
    _check_param("b_kv", b_kv, (2 * Hkv * D,), x.dtype, optional=True)
    _check_param("w_o", w_o, (H * D, C), x.dtype)
    _check_param("b_o", b_o, (C,), x.dtype, optional=True)
    q2d, lc_q = linear_forward(x.reshape(B * Tq, C), w_q, b_q)
    kv2d, lc_kv = linear_forward(context.reshape(B * Tk, Cc), w_kv, b_kv)
    q = _split_heads(q2d, B, Tq, H, D)
    kv = _split_heads(kv2d, B, Tk, 2 * Hkv, D)
    out, ac = sdpa_forward(q, kv[:, :Hkv], kv[:, Hkv:], mask=mask)
    att2d = out.transpose(0, 2, 1, 3).reshape(B * Tq, H * D)
    y, lc_o = linear_forward(att2d, w_o, b_o)
    cache = CrossAttentionCache(lc_q, lc_kv, lc_o, ac, (B, Tq, Tk, C, Cc, H, Hkv, D))
    return y.reshape(B, Tq, C), cache


def cross_attention_backward(dy, cache: CrossAttentionCache):
    """-> (dx, dcontext, dw_q, db_q, dw_kv, db_kv, dw_o, db_o); bias grads None when absent."""
    lc_q, lc_kv, lc_o, ac, dims = cache
    B, Tq, Tk, C, Cc, H, Hkv, D = dims
    check_shape("dy", dy, (B, Tq, C))
    xp = array_module(dy)
    datt2d, dw_o, db_o = linear_backward(dy.reshape(B * Tq, C), lc_o)
    datt = _split_heads(datt2d, B, Tq, H, D)
    dq, dk, dv = sdpa_backward(datt, ac)
    dq2d = dq.transpose(0, 2, 1, 3).reshape(B * Tq, H * D)
    dkv = xp.empty((B, Tk, 2 * Hkv, D), dtype=dy.dtype)
    dkv[:, :, :Hkv] = dk.transpose(0, 2, 1, 3)
    dkv[:, :, Hkv:] = dv.transpose(0, 2, 1, 3)
    dx, dw_q, db_q = linear_backward(dq2d, lc_q)
    dcontext, dw_kv, db_kv = linear_backward(dkv.reshape(B * Tk, 2 * Hkv * D), lc_kv)
    return dx.reshape(B, Tq, C), dcontext.reshape(B, Tk, Cc), dw_q, db_q, dw_kv, db_kv, dw_o, db_o
