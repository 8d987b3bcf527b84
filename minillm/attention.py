"""Attention: scaled dot-product, masks, multi-head, GQA/MQA, RoPE, cross-attention,
a KV cache for decoding, tiled (FlashAttention-style) and fused causal attention.

The one formula everything here is built around:

    Attention(Q, K, V) = softmax(Q K^T * scale + bias) V,     scale = 1 / sqrt(D)

Each query row asks "which keys look like me?", the softmax turns the answers into
weights that sum to 1, and the output is that weighted average of the value rows.
Its backward, with S the scores, P = softmax(S) and Y = P V:

    dV = P^T dY,   dP = dY V^T,   dS = P * (dP - rowsum(dP * P)),
    dQ = dS K * scale,   dK = dS^T Q * scale.

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

Reading order: scaled dot-product attention (the plain version, which keeps the
Tq x Tk probabilities), masks, multi-head self-attention with GQA, RoPE,
cross-attention, the KV cache, then tiled attention (the fast version: the same
output without the Tq x Tk matrix, tested equal to the plain one), fused causal
attention (the fast path the GPT trains with: only the scores a causal query can
see, softmax in place, tested equal to the plain one), and last the argument checks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .backend import (array_module, check_array, check_choice, check_float, check_int, check_int_arg,
                      check_ndim, check_number, check_probability, check_same_dtype, check_shape,
                      parallel_for, xp_default)
from .backprop import dropout_backward, dropout_forward
from .ffn import linear_backward, linear_forward

__all__ = [
    "sdpa_forward", "sdpa_backward",
    "flash_attention_forward", "flash_attention_backward",
    "causal_attention_forward", "causal_attention_backward",
    "rope_forward", "rope_backward", "rope_angles",
    "self_attention_forward", "self_attention_backward",
    "cross_attention_forward", "cross_attention_backward",
    "KVCache", "causal_mask", "padding_mask",
]


# ---------------------------------------------------------------------------
# 1. Scaled dot-product attention (the plain version: keeps the Tq x Tk probabilities)
# ---------------------------------------------------------------------------

class SDPACache(NamedTuple):
    qs: object        # (B, Hkv, G*Tq, D) q * scale, grouped by K/V head
    k: object         # (B, Hkv, Tk, D)
    v: object         # (B, Hkv, Tk, D)
    p: object         # (B, Hkv, G*Tq, Tk) softmax probabilities (before dropout)
    y: object         # (B, Hkv, G*Tq, D) the output, for rowsum(dy * y)
    drop: object      # DropoutCache of the probabilities, or None without dropout
    scale: object     # scalar of q's dtype
    shape: tuple      # (B, H, Tq, D): q's shape, to give dq back
    bias_shape: tuple = None   # the additive score bias's shape, or None without one


def sdpa_forward(q, k, v, mask=None, causal=False, scale=None, dropout_p=0.0, rng=None, bias=None):
    """y = softmax(q k^T * scale + bias + mask_bias) v, per head, with grouped K/V heads.

    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with H a multiple of Hkv; mask: bool,
    broadcastable to (B, H, Tq, Tk), True = may attend; causal: query i sees keys
    j <= i + Tk - Tq (requires Tq <= Tk); scale: default 1/sqrt(D).
    dropout_p, rng: optional dropout on the attention probabilities (training only).
    bias: optional float scores added before the softmax, broadcastable to (B, H, Tq, Tk):
    a learned position bias (T5's relative buckets, minillm.t5; ALiBi's slopes). It is
    differentiable: sdpa_backward then returns its gradient as a fourth value.
    A fully masked query row gets output 0 and gradient 0.
    -> y: (B, H, Tq, D), cache

    Worked example: one head, one query, two keys, D = 2 (scale 1/sqrt(2)):

    >>> q = np.array([1.0, 0.0]).reshape(1, 1, 1, 2)
    >>> k = np.array([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 1, 2, 2)
    >>> v = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    >>> y, cache = sdpa_forward(q, k, v)      # scores q.k_j / sqrt(2) = [0.707, 0]
    >>> np.round(cache.p, 3).tolist()         # softmax of the scores
    [[[[0.67, 0.33]]]]
    >>> np.round(y, 3).tolist()               # 0.67 * [1, 2] + 0.33 * [3, 4]
    [[[[1.66, 2.66]]]]
    """
    _check_sdpa(q, k, v, mask, causal, scale, dropout_p, bias)
    xp = array_module(q)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = H // Hkv                                                      # query heads per K/V head
    scale = _scale_value(scale, D, q.dtype)

    # Query heads are ordered [the G heads of K/V head 0, the G of K/V head 1, ...], so
    # grouping them by K/V head is a plain reshape, and one matmul serves a whole group.
    # Scaling q (Tq*D numbers) is cheaper than scaling the scores (Tq*Tk numbers).
    qs = (q * scale).reshape(B, Hkv, G * Tq, D)                       # (B, Hkv, G*Tq, D)
    scores = xp.matmul(qs, k.swapaxes(-1, -2)).reshape(B, H, Tq, Tk)  # (B, H, Tq, Tk)
    # S = Q K^T * scale + bias: the bias is part of the scores, added where they are made.
    if bias is not None:
        scores = scores + bias                                        # a learned bias (e.g. T5's)
    if causal:
        scores += _causal_bias(xp, Tq, Tk, q.dtype)                   # -inf above the diagonal
    if mask is not None:
        scores += _mask_bias(mask, q.dtype)                           # -inf where mask is False
    p = _softmax_rows(scores, may_be_empty=mask is not None)          # (B, H, Tq, Tk)
    p = p.reshape(B, Hkv, G * Tq, Tk)                                 # grouped again (a view)
    p_kept, drop = dropout_forward(p, dropout_p, rng) if dropout_p else (p, None)
    y = xp.matmul(p_kept, v)                                          # (B, Hkv, G*Tq, D)
    bias_shape = None if bias is None else tuple(bias.shape)
    cache = SDPACache(qs, k, v, p, y, drop, scale, (B, H, Tq, D), bias_shape)
    return y.reshape(B, H, Tq, D), cache


def sdpa_backward(dy, cache: SDPACache):
    """Backward of sdpa_forward. -> dq: (B, H, Tq, D), dk, dv: (B, Hkv, Tk, D), and when the
    forward had a ``bias``, dbias as a fourth value: dS summed to the bias's shape.

    With P = softmax(S), Y = P V:  dV = P^T dY,  dP = dY V^T,
    dS = P * (dP - rowsum(dP * P)),  dQ = dS K * scale,  dK = dS^T (Q * scale).
    rowsum(dP * P) equals rowsum(dY * Y) (since Y = P V), a (Tq,) vector instead of a
    Tq x Tk product. A K/V head's gradient sums over its G query heads for free: the
    grouped matmuls contract over the G*Tq rows.
    """
    _check_sdpa_backward(dy, cache)
    qs, k, v, p, y, drop, scale, shape = cache[:8]
    xp = array_module(p)
    dy_grouped = dy.reshape(y.shape)                            # (B, Hkv, G*Tq, D), grouped like y
    p_kept = p if drop is None else p * drop.mask               # what V was averaged with
    dv = xp.matmul(p_kept.swapaxes(-1, -2), dy_grouped)         # (B, Hkv, Tk, D)
    dp_kept = xp.matmul(dy_grouped, v.swapaxes(-1, -2))         # (B, Hkv, G*Tq, Tk)
    dp = dp_kept if drop is None else dropout_backward(dp_kept, drop)
    # sum_j P_ij dP_ij = dY_i . Y_i, also with dropout: P * mask = P_kept and Y = P_kept V.
    delta = xp.sum(dy_grouped * y, axis=-1, keepdims=True)      # (B, Hkv, G*Tq, 1)
    ds = p * (dp - delta)                                       # (B, Hkv, G*Tq, Tk); masked: p = 0
    dq = xp.matmul(ds, k) * scale                               # (B, Hkv, G*Tq, D)
    dk = xp.matmul(ds.swapaxes(-1, -2), qs)                     # (B, Hkv, Tk, D); qs carries the scale
    if cache.bias_shape is None:
        return dq.reshape(shape), dk, dv
    # S = Q K^T * scale + bias: dbias = dS, summed over the axes the bias was broadcast along.
    dbias = _sum_to_shape(ds.reshape(shape[0], shape[1], shape[2], -1), cache.bias_shape)
    return dq.reshape(shape), dk, dv, dbias


def _sum_to_shape(a, shape):
    """Sum a broadcast result back to ``shape`` (the reverse of broadcasting)."""
    lead = a.ndim - len(shape)
    a = a.sum(axis=tuple(range(lead))) if lead else a
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and a.shape[i] != 1)
    return a.sum(axis=axes, keepdims=True) if axes else a


def _softmax_rows(scores, may_be_empty):
    """Softmax over the last axis, into fresh arrays; -inf scores get probability 0.

    A row that is entirely -inf (every key masked) would give (-inf) - (-inf) = NaN;
    such a row is shifted by 0 instead, so its exps are all 0, their sum is 0, and we
    divide by 1: the row's probabilities are all 0, hence output 0 and gradient 0.
    """
    xp = array_module(scores)
    row_max = xp.max(scores, axis=-1, keepdims=True)                  # (..., 1)
    if may_be_empty:
        row_max = xp.where(row_max == -np.inf, scores.dtype.type(0), row_max)
    exps = xp.exp(scores - row_max)                                   # (..., Tk)
    row_sum = xp.sum(exps, axis=-1, keepdims=True)                    # (..., 1)
    if may_be_empty:
        row_sum = xp.where(row_sum == 0, scores.dtype.type(1), row_sum)
    return exps / row_sum


def _scale_value(scale, D, dtype):
    """The score scale as a scalar of the data's dtype (float32 stays float32); 1/sqrt(D) by default."""
    return dtype.type(1.0 / math.sqrt(D) if scale is None else scale)


# ---------------------------------------------------------------------------
# 2. Masks, and masks as additive biases (0 where allowed, -inf where masked)
# ---------------------------------------------------------------------------

_CAUSAL_BIAS_CACHE: dict = {}


def causal_mask(Tq, Tk=None, xp=np):
    """Boolean (Tq, Tk) mask, True where query i may see key j: j <= i + (Tk - Tq).

    The queries are the last Tq of Tk positions (Tq == Tk is ordinary self-attention).
    causal_mask(2, 3) = [[1, 1, 0], [1, 1, 1]]: the 2 queries sit at positions 1 and 2.
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


# ---------------------------------------------------------------------------
# 3. Multi-head self-attention (MHA, GQA, MQA), with its projections
# ---------------------------------------------------------------------------

class SelfAttentionCache(NamedTuple):
    qkv_proj: object   # LinearCache of the q/k/v projection (x, w_qkv)
    out_proj: object   # LinearCache of the output projection (heads side by side, w_o)
    attn: object       # SDPACache or FlashCache
    rope_q: object     # RopeCache of q, or None without RoPE
    rope_k: object     # RopeCache of k, or None without RoPE
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
    impl: "plain" (sdpa_forward), "tiled" (flash_attention_forward, block_size) or
    "fused" (causal_attention_forward when causal with no mask and no dropout, else plain).
    -> y: (B, T, C), cache
    """
    _check_self_attention(x, w_qkv, b_qkv, w_o, b_o, n_head, n_kv_head, positions, rope_base,
                          dropout_p, impl)
    B, T, C = x.shape
    H, Hkv, D = _head_sizes(n_head, n_kv_head, C)
    # 1. One GEMM projects x to every query, key and value head.
    qkv, qkv_proj = linear_forward(x.reshape(B * T, C), w_qkv, b_qkv)   # (B*T, (H + 2 Hkv) D)
    heads = _split_heads(qkv, B, T, H + 2 * Hkv, D)                       # (B, H + 2 Hkv, T, D)
    q, k, v = heads[:, :H], heads[:, H:H + Hkv], heads[:, H + Hkv:]       # views, no copies
    # 2. RoPE rotates q and k by their positions (the same angles for both).
    rope_q = rope_k = None
    if rope_base is not None:
        positions = _positions_or_default(positions, kv_cache, layer, T, array_module(x))
        q, rope_q = rope_forward(q, positions, base=rope_base, interleaved=rope_interleaved)
        k, rope_k = rope_forward(k, positions, base=rope_base, interleaved=rope_interleaved)
    # 3. With a KV cache the queries attend over every position cached so far.
    if kv_cache is not None:
        k, v = kv_cache.append(layer, k, v)                               # (B, Hkv, Tk, D)
    # 4. Attention, every head at once.
    heads_y, attn = _attend(q, k, v, mask, causal, dropout_p, rng, impl, block_size)   # (B, H, T, D)
    # 5. The heads side by side, then the output projection.
    y, out_proj = linear_forward(_join_heads(heads_y), w_o, b_o)          # (B*T, C)
    cache = SelfAttentionCache(qkv_proj, out_proj, attn, rope_q, rope_k, (B, T, C, H, Hkv, D),
                               kv_cache is not None)
    return y.reshape(B, T, C), cache


def self_attention_backward(dy, cache: SelfAttentionCache):
    """Backward of self_attention_forward. -> (dx, dw_qkv, db_qkv, dw_o, db_o); bias grads None
    when the bias was None. The steps are the forward's, in reverse."""
    _check_self_attention_backward(dy, cache)
    B, T, C, H, Hkv, D = cache.dims
    # 5. In the forward: y = join_heads(heads_y) w_o + b_o.
    dheads2d, dw_o, db_o = linear_backward(dy.reshape(B * T, C), cache.out_proj)
    dheads_y = _split_heads(dheads2d, B, T, H, D)                         # (B, H, T, D)
    # 4. heads_y = attention(q, k, v).  (3. the KV cache: training never uses one.)
    dq, dk, dv = _attend_backward(dheads_y, cache.attn)
    # 2. q and k were rotated: rotate their gradients back.
    if cache.rope_q is not None:
        dq = rope_backward(dq, cache.rope_q)
        dk = rope_backward(dk, cache.rope_k)
    # 1. [q | k | v] = x w_qkv + b_qkv.
    dqkv = _join_heads(dq, dk, dv)                                        # (B*T, (H + 2 Hkv) D)
    dx, dw_qkv, db_qkv = linear_backward(dqkv, cache.qkv_proj)
    return dx.reshape(B, T, C), dw_qkv, db_qkv, dw_o, db_o


def _head_sizes(n_head, n_kv_head, C):
    """-> (H, Hkv, D): query heads, key/value heads (None = H) and the head size C // H."""
    H = int(n_head)
    Hkv = H if n_kv_head is None else int(n_kv_head)
    return H, Hkv, C // H


def _split_heads(t2d, B, T, n, D):
    """(B*T, n*D) -> (B, n, T, D), contiguous: the one transpose attention needs
    (a copy, its sequences shared out among backend.parallel_for's threads)."""
    xp = array_module(t2d)
    heads = t2d.reshape(B, T, n, D).transpose(0, 2, 1, 3)                  # (B, n, T, D), a view
    out = xp.empty(heads.shape, dtype=t2d.dtype)

    def copy(b0, b1):
        out[b0:b1] = heads[b0:b1]
    parallel_for(copy, B, xp=xp)
    return out


def _join_heads(*groups):
    """Head groups (B, n_i, T, D) -> (B*T, sum(n_i) D), side by side: _split_heads undone."""
    xp = array_module(groups[0])
    B, _, T, D = groups[0].shape
    n = sum(g.shape[1] for g in groups)
    joined = xp.empty((B, T, n, D), dtype=groups[0].dtype)                # (B, T, n, D)

    def copy(b0, b1):
        start = 0
        for g in groups:
            joined[b0:b1, :, start:start + g.shape[1]] = g[b0:b1].transpose(0, 2, 1, 3)
            start += g.shape[1]
    parallel_for(copy, B, xp=xp)
    return joined.reshape(B * T, n * D)


def _positions_or_default(positions, kv_cache, layer, T, xp):
    """The given positions, else arange(T) after the positions already in the kv_cache."""
    if positions is not None:
        return positions
    start = kv_cache.length(layer) if kv_cache is not None else 0
    return xp.arange(start, start + T)


def _attend(q, k, v, mask, causal, dropout_p, rng, impl, block_size):
    """Plain (sdpa_forward), tiled (flash_attention_forward) or fused causal
    (causal_attention_forward, where it applies: causal, no mask, no dropout) attention."""
    if impl == "tiled":
        return flash_attention_forward(q, k, v, causal=causal, mask=mask, block_size=block_size)
    if impl == "fused" and causal and mask is None and not dropout_p:
        return causal_attention_forward(q, k, v, block_size=_FUSED_BLOCK)
    return sdpa_forward(q, k, v, mask=mask, causal=causal, dropout_p=dropout_p, rng=rng)


def _attend_backward(dy, cache):
    if isinstance(cache, FlashCache):
        return flash_attention_backward(dy, cache)
    if isinstance(cache, CausalCache):
        return causal_attention_backward(dy, cache)
    return sdpa_backward(dy, cache)


_FUSED_BLOCK = 32   # query rows per block of the fused path: a (bq x Tk) score tile per head


# ---------------------------------------------------------------------------
# 4. Rotary position embedding (RoPE)
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
    angles = xp.asarray(positions).astype(np.float64)[..., None] * xp.asarray(inv_freq)
    if angles.ndim == 2:
        angles = angles[None]
    angles = angles[:, None]                             # (1 or B, 1, T, D/2)
    return xp.cos(angles).astype(dtype), xp.sin(angles).astype(dtype)


def rope_forward(x, positions, base=10000.0, interleaved=False):
    """Rotate each pair of coordinates of x by position * theta_i, theta_i = base^(-2i/D).

    Because a rotation by m theta followed by a dot product with a rotation by n theta
    depends only on (m - n) theta, q_m . k_n then depends on positions only through
    m - n: relative positions from an absolute rotation. Pairs are (i, i + D/2) by
    default (Hugging Face LLaMA convention), (2i, 2i+1) with interleaved=True (RoFormer).
    x: (B, H, T, D), D even; positions: (T,) or (B, T) int -> y: (B, H, T, D), cache
    """
    _check_rope(x, positions, base)
    cos, sin = rope_angles(positions, x.shape[-1], base, x.dtype, array_module(x))   # (1 or B, 1, T, D/2)
    return _rotate(x, cos, sin, bool(interleaved)), RopeCache(cos, sin, bool(interleaved))


def rope_backward(dy, cache: RopeCache):
    """A rotation's transpose is the rotation by the opposite angle. -> dx: (B, H, T, D)"""
    return _rotate(dy, cache.cos, -cache.sin, cache.interleaved)


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


# ---------------------------------------------------------------------------
# 5. Cross-attention: queries from x, keys and values from a context
# ---------------------------------------------------------------------------

class CrossAttentionCache(NamedTuple):
    q_proj: object     # LinearCache of the query projection (x, w_q)
    kv_proj: object    # LinearCache of the key/value projection (context, w_kv)
    out_proj: object   # LinearCache of the output projection (heads side by side, w_o)
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
    _check_cross_attention(x, context, w_q, b_q, w_kv, b_kv, w_o, b_o, n_head, n_kv_head)
    B, Tq, C = x.shape
    Tk, Cc = context.shape[1], context.shape[2]
    H, Hkv, D = _head_sizes(n_head, n_kv_head, C)
    # 1. Queries from x, keys and values from the context.
    q2d, q_proj = linear_forward(x.reshape(B * Tq, C), w_q, b_q)             # (B*Tq, H D)
    kv2d, kv_proj = linear_forward(context.reshape(B * Tk, Cc), w_kv, b_kv)  # (B*Tk, 2 Hkv D)
    q = _split_heads(q2d, B, Tq, H, D)                                       # (B, H, Tq, D)
    kv = _split_heads(kv2d, B, Tk, 2 * Hkv, D)                               # (B, 2 Hkv, Tk, D)
    # 2. Attention, every head at once.
    heads_y, attn = sdpa_forward(q, kv[:, :Hkv], kv[:, Hkv:], mask=mask)     # (B, H, Tq, D)
    # 3. The heads side by side, then the output projection.
    y, out_proj = linear_forward(_join_heads(heads_y), w_o, b_o)             # (B*Tq, C)
    cache = CrossAttentionCache(q_proj, kv_proj, out_proj, attn, (B, Tq, Tk, C, Cc, H, Hkv, D))
    return y.reshape(B, Tq, C), cache


def cross_attention_backward(dy, cache: CrossAttentionCache):
    """-> (dx, dcontext, dw_q, db_q, dw_kv, db_kv, dw_o, db_o); bias grads None when absent.
    The steps are the forward's, in reverse."""
    _check_cross_attention_backward(dy, cache)
    B, Tq, Tk, C, Cc, H, Hkv, D = cache.dims
    # 3. In the forward: y = join_heads(heads_y) w_o + b_o.
    dheads2d, dw_o, db_o = linear_backward(dy.reshape(B * Tq, C), cache.out_proj)
    dheads_y = _split_heads(dheads2d, B, Tq, H, D)                           # (B, H, Tq, D)
    # 2. heads_y = attention(q, k, v).
    dq, dk, dv = sdpa_backward(dheads_y, cache.attn)
    # 1. q = x w_q + b_q and [k | v] = context w_kv + b_kv.
    dx, dw_q, db_q = linear_backward(_join_heads(dq), cache.q_proj)
    dcontext, dw_kv, db_kv = linear_backward(_join_heads(dk, dv), cache.kv_proj)
    return dx.reshape(B, Tq, C), dcontext.reshape(B, Tk, Cc), dw_q, db_q, dw_kv, db_kv, dw_o, db_o


# ---------------------------------------------------------------------------
# 6. KV cache for incremental decoding
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
        _check_kv_cache(n_layer, batch_size, n_kv_head, max_len, head_dim, dtype)
        self.xp = xp if xp is not None else xp_default()
        self.dtype = np.dtype(dtype)
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

    def length(self, layer=0):
        """Number of positions filled in ``layer`` (= the position of the next token)."""
        self._check_layer(layer)
        return self._len[layer]

    def append(self, layer, k, v):
        """Write k, v: (B, Hkv, T_new, D) after the filled part; -> (k_all, v_all) views."""
        self._check_append(layer, k, v)
        start, end = self._len[layer], self._len[layer] + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        self._len[layer] = end
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def crop(self, length):
        """Forget every position >= ``length`` in all layers (e.g. rejected speculative tokens)."""
        length = check_int_arg("length", length, lo=0)
        self._len = [min(n, length) for n in self._len]

    def keep(self, start, index):
        """Of the positions from ``start`` on, keep only ``start + index[i]``, moved to
        ``start + i``, and forget the rest in all layers. After a tree of candidate tokens
        was verified in one pass (medusa.py), this keeps the accepted path's keys and values.

        index: (n,) int, each in [0, length - start) -> the length becomes start + n.
        Example: length 7, keep(4, [0, 2]): positions 4 and 6 move to 4 and 5; length 6.
        """
        index = self._check_keep(start, index)
        start, n = int(start), int(index.shape[0])
        rows = self.xp.asarray(index) + start                       # (n,) positions to keep
        for layer in range(self.n_layer):
            # fancy indexing copies first, so an overlap of source and target is safe
            self.k[layer][:, :, start:start + n] = self.k[layer][:, :, rows]
            self.v[layer][:, :, start:start + n] = self.v[layer][:, :, rows]
        self._len = [start + n] * self.n_layer

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

    def _check_layer(self, layer):
        check_int_arg("layer", layer, lo=0, hi=self.n_layer)

    def _check_keep(self, start, index):
        length = min(self._len)
        start = check_int_arg("start", start, lo=0, hi=length + 1)
        check_int("index", index)
        check_ndim("index", index, 1)
        host = np.asarray(index.get() if hasattr(index, "get") else index)
        if host.size and (host.min() < 0 or host.max() >= length - start):
            raise ValueError(f"index: expected positions in [0, {length - start}) (after start={start} "
                             f"of the {length} cached), got {host.tolist()}")
        return host

    def _check_append(self, layer, k, v):
        self._check_layer(layer)
        B, Hkv, _, D = self.shape
        for name, a in (("k", k), ("v", v)):
            check_float(name, a)
            check_shape(name, a, (B, Hkv, None, D))
            if a.dtype != self.dtype:
                raise TypeError(f"{name}: expected dtype {self.dtype} (the cache's dtype), got {a.dtype}")
        if tuple(v.shape) != tuple(k.shape):
            raise ValueError(f"v: expected shape {tuple(k.shape)} (the shape of k), got {tuple(v.shape)}")
        filled, T = self._len[layer], k.shape[2]
        if filled + T > self.max_len:
            raise ValueError(f"k: appending {T} positions to the {filled} cached in layer {layer} exceeds "
                             f"max_len={self.max_len}")


# ---------------------------------------------------------------------------
# 7. Tiled attention, the FlashAttention way: never the full Tq x Tk matrix
# ---------------------------------------------------------------------------

class FlashCache(NamedTuple):
    q: object          # (B, H, Tq, D)
    k: object          # (B, Hkv, Tk, D)
    v: object          # (B, Hkv, Tk, D)
    y: object          # (B, H, Tq, D)
    lse: object        # (B, H, Tq, 1) logsumexp of each score row (+inf for a fully masked row)
    mask: object       # the boolean mask, or None
    causal: bool
    scale: object
    block_size: int


class _Tiling(NamedTuple):
    """What every tile needs to know: sizes, the mask, and where the diagonal runs."""
    xp: object
    dtype: object
    B: int
    H: int
    Hkv: int
    G: int             # query heads per K/V head
    D: int
    Tk: int
    block: int         # tile edge (block_size)
    offset: int        # Tk - Tq: query i sits at position offset + i
    causal: bool
    mask4: object      # the mask as a 4-dim array, or None


def flash_attention_forward(q, k, v, causal=False, mask=None, scale=None, block_size=64):
    """The same y as sdpa_forward, computed tile by tile with an online softmax.

    For each block of queries we sweep the key blocks keeping, per query row, the
    running max m, the running sum l of exp(s - m) and the running output acc:
        m' = max(m, rowmax(S_j)),  alpha = exp(m - m'),  P_j = exp(S_j - m')
        l' = alpha l + rowsum(P_j),  acc' = alpha acc + P_j V_j
    and finish with y = acc / l. Memory for scores is one (block x block) tile per
    head instead of Tq x Tk. The cache keeps only the per-row logsumexp (m + log l),
    from which the backward recomputes each probability tile exactly. Causal tiles
    wholly above the diagonal are skipped (about half the work).
    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D); mask bool broadcastable to (B, H, Tq, Tk)
    -> y: (B, H, Tq, D), cache
    """
    _check_flash_attention(q, k, v, mask, causal, scale, block_size)
    t = _tiling(q, k, mask, causal, block_size)
    scale = _scale_value(scale, t.D, q.dtype)
    y = t.xp.empty(q.shape, dtype=q.dtype)                                # (B, H, Tq, D)
    lse = t.xp.empty(q.shape[:3] + (1,), dtype=q.dtype)                   # (B, H, Tq, 1)
    for i0, i1 in _query_blocks(q.shape[2], t.block):
        q_blk = _group_rows(q, i0, i1, t) * scale                         # (B, Hkv, G*bq, D)
        y_blk, lse_blk = _flash_forward_rows(q_blk, k, v, i0, i1, t)
        y[:, :, i0:i1] = y_blk.reshape(t.B, t.H, i1 - i0, t.D)
        lse[:, :, i0:i1] = lse_blk.reshape(t.B, t.H, i1 - i0, 1)
    return y, FlashCache(q, k, v, y, lse, mask, bool(causal), scale, t.block)


def flash_attention_backward(dy, cache: FlashCache):
    """Backward of flash_attention_forward, tile by tile. -> dq, dk, dv.

    Each probability tile is recomputed as P = exp(S - lse) (exact, no renormalising),
    then the plain formulas apply per tile: dV_j += P^T dY_i, dP = dY_i V_j^T,
    dS = P * (dP - delta_i) with delta_i = rowsum(dY_i * Y_i), dQ_i += dS K_j * scale,
    dK_j += dS^T (Q_i * scale).
    """
    _check_flash_attention_backward(dy, cache)
    q, k, v, y, lse, mask, causal, scale, block_size = cache
    t = _tiling(q, k, mask, causal, block_size)
    delta = t.xp.sum(dy * y, axis=-1, keepdims=True)                      # (B, H, Tq, 1)
    dq = t.xp.empty(q.shape, dtype=q.dtype)                               # (B, H, Tq, D)
    dk = t.xp.zeros_like(k)                                               # (B, Hkv, Tk, D)
    dv = t.xp.zeros_like(v)                                               # (B, Hkv, Tk, D)
    for i0, i1 in _query_blocks(q.shape[2], t.block):
        q_blk = _group_rows(q, i0, i1, t) * scale                         # (B, Hkv, G*bq, D)
        dy_blk = _group_rows(dy, i0, i1, t)                               # (B, Hkv, G*bq, D)
        lse_blk = _group_rows(lse, i0, i1, t)                             # (B, Hkv, G*bq, 1)
        delta_blk = _group_rows(delta, i0, i1, t)                         # (B, Hkv, G*bq, 1)
        dq_blk = _flash_backward_rows(q_blk, dy_blk, lse_blk, delta_blk, k, v, dk, dv, i0, i1, t)
        dq[:, :, i0:i1] = (dq_blk * scale).reshape(t.B, t.H, i1 - i0, t.D)
    return dq, dk, dv


def _flash_forward_rows(q_blk, k, v, i0, i1, t: _Tiling):
    """The online softmax over the key tiles for query rows [i0, i1).

    q_blk: (B, Hkv, G*bq, D), already scaled -> y_blk: (B, Hkv, G*bq, D),
    lse_blk: (B, Hkv, G*bq, 1) (+inf for a row that saw no key).
    """
    xp, dt = t.xp, t.dtype
    zero, one, inf = dt.type(0), dt.type(1), dt.type(np.inf)
    m = xp.full(q_blk.shape[:3] + (1,), -inf, dtype=dt)       # running row max        (B, Hkv, G*bq, 1)
    l = xp.zeros(q_blk.shape[:3] + (1,), dtype=dt)            # running sum of exp(s - m)
    acc = xp.zeros(q_blk.shape, dtype=dt)                     # running sum of exp(s - m) v
    for j0, j1 in _key_blocks(i1, t):
        s = _score_tile(q_blk, k, i0, i1, j0, j1, t)          # (B, Hkv, G*bq, bk)
        m_new = xp.maximum(m, xp.max(s, axis=-1, keepdims=True))
        # A row with no visible key so far has m_new = -inf; shift it by 0 (not
        # -inf) so exp gives 0 rather than NaN.
        m_safe = xp.where(m_new == -inf, zero, m_new)
        s -= m_safe                                           # in place: the fast path reuses the tile
        p = xp.exp(s, out=s)                                  # P_j = exp(S_j - m'), unnormalised
        alpha = xp.exp(m - m_safe)                            # rescales the old sums to the new max
        l *= alpha
        l += xp.sum(p, axis=-1, keepdims=True)
        acc *= alpha
        acc += xp.matmul(p, v[:, :, j0:j1])
        m = m_new
    empty = l == 0                                            # rows whose keys were all masked
    y_blk = acc / xp.where(empty, one, l)
    # logsumexp; +inf for an empty row makes every recomputed probability exp(s - inf) = 0.
    lse_blk = xp.where(empty, inf, m + xp.log(xp.where(empty, one, l)))
    return y_blk, lse_blk


def _flash_backward_rows(q_blk, dy_blk, lse_blk, delta_blk, k, v, dk, dv, i0, i1, t: _Tiling):
    """Query rows [i0, i1) against every key tile: adds their share to dk and dv (in
    place) and returns dS K summed over the tiles (dq_blk / scale): (B, Hkv, G*bq, D)."""
    xp = t.xp
    dq_blk = xp.zeros(q_blk.shape, dtype=t.dtype)                         # (B, Hkv, G*bq, D)
    for j0, j1 in _key_blocks(i1, t):
        k_j, v_j = k[:, :, j0:j1], v[:, :, j0:j1]                        # (B, Hkv, bk, D)
        s = _score_tile(q_blk, k, i0, i1, j0, j1, t)                      # (B, Hkv, G*bq, bk)
        s -= lse_blk                                                      # in place: the fast path
        p = xp.exp(s, out=s)                                              # the probabilities again
        dv[:, :, j0:j1] += xp.matmul(p.swapaxes(-1, -2), dy_blk)
        dp = xp.matmul(dy_blk, v_j.swapaxes(-1, -2))                      # (B, Hkv, G*bq, bk)
        ds = p * (dp - delta_blk)                                         # (B, Hkv, G*bq, bk)
        dq_blk += xp.matmul(ds, k_j)
        dk[:, :, j0:j1] += xp.matmul(ds.swapaxes(-1, -2), q_blk)
    return dq_blk


def _tiling(q, k, mask, causal, block_size):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    mask4 = None if mask is None else mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    return _Tiling(array_module(q), q.dtype, B, H, Hkv, H // Hkv, D, Tk, int(block_size), Tk - Tq,
                   bool(causal), mask4)


def _query_blocks(Tq, block):
    """(i0, i1) for the query rows of each block."""
    return [(i0, min(i0 + block, Tq)) for i0 in range(0, Tq, block)]


def _key_blocks(i1, t: _Tiling):
    """(j0, j1) for the key tiles that query rows < i1 can see (causal: none past the diagonal)."""
    j_end = min(t.Tk, t.offset + i1) if t.causal else t.Tk
    return [(j0, min(j0 + t.block, j_end)) for j0 in range(0, j_end, t.block)]


def _group_rows(a, i0, i1, t: _Tiling):
    """Rows [i0, i1) of a (B, H, Tq, n) array, grouped by K/V head: (B, Hkv, G*bq, n) (a copy)."""
    return a[:, :, i0:i1].reshape(t.B, t.Hkv, t.G * (i1 - i0), a.shape[-1])


def _score_tile(q_blk, k, i0, i1, j0, j1, t: _Tiling):
    """Masked scores of query rows [i0, i1) against keys [j0, j1): (B, Hkv, G*bq, bk)."""
    bq, bk = i1 - i0, j1 - j0
    s = t.xp.matmul(q_blk, k[:, :, j0:j1].swapaxes(-1, -2)).reshape(t.B, t.H, bq, bk)   # one tile per head
    bias = _tile_bias(i0, i1, j0, j1, t)
    if bias is not None:
        s += bias                                                         # in place: the fast path
    return s.reshape(t.B, t.Hkv, t.G * bq, bk)                            # grouped by K/V head again


def _tile_bias(i0, i1, j0, j1, t: _Tiling):
    """Additive bias (0 / -inf) for the score tile rows [i0, i1) x keys [j0, j1), or None.

    Built per tile from indices, so a causal mask never costs Tq x Tk memory.
    """
    xp, dt = t.xp, t.dtype
    bias = None
    if t.causal and j1 - 1 > t.offset + i0:  # the tile reaches above the diagonal
        rows = xp.arange(i0, i1)[:, None] + t.offset
        cols = xp.arange(j0, j1)[None, :]
        bias = xp.where(cols > rows, dt.type(-np.inf), dt.type(0)).astype(dt)
    if t.mask4 is not None:
        mi = slice(i0, i1) if t.mask4.shape[2] > 1 else slice(None)
        mj = slice(j0, j1) if t.mask4.shape[3] > 1 else slice(None)
        mb = _mask_bias(t.mask4[:, :, mi, mj], dt)
        bias = mb if bias is None else bias + mb
    return bias


# ---------------------------------------------------------------------------
# 8. Fused causal attention (the fast version of sdpa_forward(causal=True))
# ---------------------------------------------------------------------------

class CausalCache(NamedTuple):
    qs: object        # (B, Hkv, G, Tq, D) q * scale, grouped by K/V head
    k: object         # (B, Hkv, 1, Tk, D), broadcast over the G query heads
    v: object         # (B, Hkv, 1, Tk, D)
    p: list           # per query block: (B, Hkv, G, bq, j1) probabilities of its visible keys
    y: object         # (B, Hkv, G, Tq, D) the output, for rowsum(dy * y)
    blocks: list      # [(i0, i1, j1)]: query rows [i0, i1) see keys [0, j1)
    scale: object     # scalar of q's dtype
    shape: tuple      # (B, H, Tq, D)


def causal_attention_forward(q, k, v, scale=None, block_size=32):
    """The y of sdpa_forward(q, k, v, causal=True), in fewer passes over the scores.

    Query rows are taken block_size at a time; rows [i0, i1) can see only keys
    j < j1 = Tk - Tq + i1, so the key columns past j1 (which the plain version
    fills with -inf and exponentiates to 0) are never made: about half of the
    Tq x Tk work disappears. Each block's scores are small enough to stay in cache
    while the softmax runs over them in place (max, subtract, exp, scale by 1/sum)
    and become the probabilities the backward needs. Only the diagonal tile gets
    the -inf bias; every row sees at least its own key, so no row is empty.
    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D), Tq <= Tk -> y: (B, H, Tq, D), cache
    """
    _check_causal_attention(q, k, v, scale, block_size)
    xp = array_module(q)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = _scale_value(scale, D, q.dtype)
    qs = (q * scale).reshape(B, Hkv, G, Tq, D)                           # (B, Hkv, G, Tq, D)
    k5, v5 = k[:, :, None], v[:, :, None]                                # (B, Hkv, 1, Tk, D)
    y = xp.empty(qs.shape, dtype=q.dtype)                                # (B, Hkv, G, Tq, D)
    blocks = _causal_blocks(Tq, Tk, int(block_size))
    p = [xp.empty((B, Hkv, G, i1 - i0, j1), dtype=q.dtype) for i0, i1, j1 in blocks]

    def rows(b0, b1):                     # sequences [b0, b1): one thread's share of the batch
        for (i0, i1, j1), s in zip(blocks, p):
            s = s[b0:b1]                                                 # (b, Hkv, G, bq, j1)
            xp.matmul(qs[b0:b1, ..., i0:i1, :], k5[b0:b1, ..., :j1, :].swapaxes(-1, -2), out=s)
            s[..., j1 - (i1 - i0):] += _causal_bias(xp, i1 - i0, i1 - i0, q.dtype)  # the diagonal tile
            _softmax_rows_inplace(s)                                     # now the probabilities
            xp.matmul(s, v5[b0:b1, ..., :j1, :], out=y[b0:b1, ..., i0:i1, :])   # (b, Hkv, G, bq, D)
    parallel_for(rows, B, xp=xp)
    cache = CausalCache(qs, k5, v5, p, y, blocks, scale, (B, H, Tq, D))
    return y.reshape(B, H, Tq, D), cache


def causal_attention_backward(dy, cache: CausalCache):
    """Backward of causal_attention_forward: sdpa_backward's formulas, block by block.
    -> dq: (B, H, Tq, D), dk, dv: (B, Hkv, Tk, D)

    Per query block i with probabilities P_i over keys [0, j1):
    dV[:j1] += P_i^T dY_i,  dS_i = P_i * (dY_i V[:j1]^T - delta_i),
    dQ_i = dS_i K[:j1] * scale,  dK[:j1] += dS_i^T (Q_i * scale).
    """
    _check_causal_attention_backward(dy, cache)
    qs, k5, v5, p, y, blocks, scale, shape = cache
    xp = array_module(y)
    dy5 = dy.reshape(y.shape)                                            # (B, Hkv, G, Tq, D)
    dq = xp.empty(qs.shape, dtype=qs.dtype)                              # (B, Hkv, G, Tq, D)
    dk = xp.zeros(k5.shape, dtype=k5.dtype)                              # (B, Hkv, 1, Tk, D)
    dv = xp.zeros(v5.shape, dtype=v5.dtype)                              # (B, Hkv, 1, Tk, D)

    def rows(b0, b1):                     # sequences [b0, b1): one thread's share of the batch
        q_, k_, v_, dy_ = qs[b0:b1], k5[b0:b1], v5[b0:b1], dy5[b0:b1]
        dq_, dk_, dv_ = dq[b0:b1], dk[b0:b1], dv[b0:b1]
        delta = xp.sum(dy_ * y[b0:b1], axis=-1, keepdims=True)          # (b, Hkv, G, Tq, 1)
        for (i0, i1, j1), p_i in zip(blocks, p):
            p_i, dy_i = p_i[b0:b1], dy_[..., i0:i1, :]                   # (b, Hkv, G, bq, j1), (.., bq, D)
            dv_[..., :j1, :] += _sum_groups(xp.matmul(p_i.swapaxes(-1, -2), dy_i))
            ds = xp.matmul(dy_i, v_[..., :j1, :].swapaxes(-1, -2))       # dP_i: (b, Hkv, G, bq, j1)
            ds -= delta[..., i0:i1, :]
            ds *= p_i                                                    # now dS_i
            xp.matmul(ds, k_[..., :j1, :], out=dq_[..., i0:i1, :])
            dk_[..., :j1, :] += _sum_groups(xp.matmul(ds.swapaxes(-1, -2), q_[..., i0:i1, :]))
    parallel_for(rows, qs.shape[0], xp=xp)
    dq *= scale
    return dq.reshape(shape), dk[:, :, 0], dv[:, :, 0]


def _causal_blocks(Tq, Tk, block):
    """(i0, i1, j1) per block of query rows: rows [i0, i1) see keys [0, j1), j1 = Tk - Tq + i1."""
    return [(i0, min(i0 + block, Tq), Tk - Tq + min(i0 + block, Tq)) for i0 in range(0, Tq, block)]


def _softmax_rows_inplace(s):
    """Softmax over the last axis of s, written into s (rows must have a finite entry)."""
    xp = array_module(s)
    s -= xp.max(s, axis=-1, keepdims=True)
    xp.exp(s, out=s)
    s *= 1 / xp.sum(s, axis=-1, keepdims=True)
    return s


def _sum_groups(a):
    """(B, Hkv, G, n, D) -> (B, Hkv, 1, n, D): a K/V head's share from its G query heads."""
    return a if a.shape[2] == 1 else a.sum(axis=2, keepdims=True)



# ---------------------------------------------------------------------------
# 9. Argument checks (one _check_<op> per public function)
# ---------------------------------------------------------------------------

def _check_sdpa(q, k, v, mask, causal, scale, dropout_p, bias=None):
    _check_attention_inputs(q, k, v, mask, causal, scale)
    check_probability("dropout_p", dropout_p)
    if bias is not None:
        check_float("bias", bias)
        check_same_dtype(q=q, bias=bias)
        B, H, Tq, _ = q.shape
        target, shp = (B, H, Tq, k.shape[2]), tuple(bias.shape)
        if len(shp) > 4 or not all(m in (1, t) for m, t in zip(shp[::-1], target[::-1])):
            raise ValueError(f"bias: expected a shape broadcastable to (B, H, Tq, Tk) = {target}, got {shp}")


def _check_sdpa_backward(dy, cache):
    check_array("dy", dy)
    check_shape("dy", dy, cache.shape)


def _check_flash_attention(q, k, v, mask, causal, scale, block_size):
    _check_attention_inputs(q, k, v, mask, causal, scale)
    check_int_arg("block_size", block_size, lo=1)


def _check_flash_attention_backward(dy, cache):
    check_array("dy", dy)
    check_shape("dy", dy, cache.y.shape)


def _check_causal_attention(q, k, v, scale, block_size):
    _check_attention_inputs(q, k, v, None, True, scale)
    check_int_arg("block_size", block_size, lo=1)


def _check_causal_attention_backward(dy, cache):
    check_array("dy", dy)
    check_shape("dy", dy, cache.shape)


def _check_attention_inputs(q, k, v, mask, causal, scale):
    """What plain and tiled attention share: q/k/v shapes, the mask, causal needing
    Tq <= Tk, and the scale."""
    _check_qkv(q, k, v)
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    _check_mask(mask, (B, H, Tq, Tk), like=q)
    if causal and Tq > Tk:
        raise ValueError(f"causal: needs Tq <= Tk (queries are the last Tq of the Tk positions), "
                         f"got q with Tq={Tq} and k with Tk={Tk}")
    if scale is not None:
        check_number("scale", scale)


def _check_qkv(q, k, v):
    """q: (B, H, Tq, D), k, v: (B, Hkv, Tk, D) with Hkv dividing H."""
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


def _check_rope(x, positions, base):
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
    check_number("base", base, lo=1, lo_open=True)


def _check_heads(n_head, n_kv_head, C):
    """Head counts against the width C: H divides C, Hkv (None = H) divides H."""
    check_int_arg("n_head", n_head, lo=1)
    check_int_arg("n_kv_head", n_kv_head, lo=1, optional=True)
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    if C % n_head:
        raise ValueError(f"n_head: expected a divisor of the width C={C} (head size D = C // n_head), "
                         f"got {n_head}")
    if n_head % n_kv_head:
        raise ValueError(f"n_kv_head: expected a divisor of n_head={n_head} (each K/V head serves "
                         f"n_head / n_kv_head query heads), got {n_kv_head}")


def _check_param(name, a, shape, dtype, optional=False):
    if a is None and optional:
        return
    check_float(name, a)
    check_shape(name, a, shape)
    if a.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the dtype of x), got {a.dtype}")


def _check_self_attention(x, w_qkv, b_qkv, w_o, b_o, n_head, n_kv_head, positions, rope_base,
                          dropout_p, impl):
    check_float("x", x)
    check_ndim("x", x, 3)
    B, T, C = x.shape
    _check_heads(n_head, n_kv_head, C)
    H, Hkv, D = _head_sizes(n_head, n_kv_head, C)
    _check_param("w_qkv", w_qkv, (C, (H + 2 * Hkv) * D), x.dtype)
    _check_param("b_qkv", b_qkv, ((H + 2 * Hkv) * D,), x.dtype, optional=True)
    _check_param("w_o", w_o, (H * D, C), x.dtype)
    _check_param("b_o", b_o, (C,), x.dtype, optional=True)
    if positions is not None and rope_base is None:
        raise ValueError("positions: only used by RoPE, but rope_base is None (pass rope_base=10000.0 "
                         "to rotate q and k, or leave positions out)")
    check_choice("impl", impl, ("plain", "tiled", "fused"))
    if impl == "tiled" and dropout_p:
        raise ValueError("dropout_p: attention dropout is only implemented for impl='plain', "
                         f"got dropout_p={dropout_p!r} with impl='tiled'")


def _check_self_attention_backward(dy, cache):
    if cache.used_kv_cache:
        raise ValueError("cache: this forward used a kv_cache, which is for inference only; "
                         "run the forward without kv_cache to train")
    B, T, C = cache.dims[:3]
    check_shape("dy", dy, (B, T, C))


def _check_cross_attention(x, context, w_q, b_q, w_kv, b_kv, w_o, b_o, n_head, n_kv_head):
    check_float("x", x)
    check_ndim("x", x, 3)
    check_float("context", context)
    check_ndim("context", context, 3)
    B, Tq, C = x.shape
    if context.shape[0] != B:
        raise ValueError(f"context: expected batch size {B} (x's first axis), "
                         f"got shape {tuple(context.shape)}")
    if context.dtype != x.dtype:
        raise TypeError(f"context: expected dtype {x.dtype} (the dtype of x), got {context.dtype}")
    Cc = context.shape[2]
    _check_heads(n_head, n_kv_head, C)
    H, Hkv, D = _head_sizes(n_head, n_kv_head, C)
    _check_param("w_q", w_q, (C, H * D), x.dtype)
    _check_param("b_q", b_q, (H * D,), x.dtype, optional=True)
    _check_param("w_kv", w_kv, (Cc, 2 * Hkv * D), x.dtype)
    _check_param("b_kv", b_kv, (2 * Hkv * D,), x.dtype, optional=True)
    _check_param("w_o", w_o, (H * D, C), x.dtype)
    _check_param("b_o", b_o, (C,), x.dtype, optional=True)


def _check_cross_attention_backward(dy, cache):
    B, Tq, _, C = cache.dims[:4]
    check_shape("dy", dy, (B, Tq, C))


def _check_kv_cache(n_layer, batch_size, n_kv_head, max_len, head_dim, dtype):
    for name, value in (("n_layer", n_layer), ("batch_size", batch_size), ("n_kv_head", n_kv_head),
                        ("max_len", max_len), ("head_dim", head_dim)):
        check_int_arg(name, value, lo=1)
    if np.dtype(dtype).kind != "f":
        raise TypeError(f"dtype: expected a floating-point dtype, got {np.dtype(dtype)}")
