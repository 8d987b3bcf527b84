"""attention.py read as a textbook: the worked examples in its docstrings hold, the
plain path's named quantities are what their names say (nothing overwritten in
place, a backward leaves its cache as it found it), self-attention is exactly its
numbered steps composed from the public functions (q and k both rotated with
rope_forward, and rotated back with rope_backward), and the argument checks name
the argument."""
import doctest

import numpy as np
import pytest
from hypothesis import given, strategies as st

from helpers import assert_close, np_, on
from minillm import attention as A
from minillm.ffn import linear_backward, linear_forward
from strategies import seeds


def test_the_docstring_examples_hold():
    result = doctest.testmod(A, verbose=False)
    assert result.attempted >= 5 and result.failed == 0


# --- the plain path: every name holds what it says ------------------------------

def _softmax_reference(q, k, mask, causal, scale):
    """softmax(q k^T * scale + bias) per query head, K/V heads repeated (float64 NumPy);
    a fully masked row is all zeros."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    kr = np.repeat(k, H // Hkv, axis=1)
    s = q @ kr.swapaxes(-1, -2) * (1 / np.sqrt(D) if scale is None else scale)
    allowed = np.ones((B, H, Tq, Tk), dtype=bool)
    if causal:
        allowed &= np.tril(np.ones((Tq, Tk), dtype=bool), k=Tk - Tq)
    if mask is not None:
        allowed &= mask
    s = np.where(allowed, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    e = np.where(allowed, np.exp(s - np.where(np.isfinite(m), m, 0)), 0.0)
    z = e.sum(-1, keepdims=True)
    return e / np.where(z == 0, 1, z)


@st.composite
def attention_case(draw):
    B, Hkv, G = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    D, Tq = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    causal = draw(st.booleans())
    Tk = draw(st.integers(Tq, Tq + 3)) if causal else draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(seeds))
    H = Hkv * G
    q, k, v = (rng.standard_normal(s) for s in ((B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D)))
    mask = rng.random((B, 1, Tq, Tk)) < 0.7 if draw(st.booleans()) else None   # may empty a row
    scale = draw(st.sampled_from([None, 0.4]))
    return q, k, v, mask, causal, scale, rng.standard_normal((B, H, Tq, D))


def _snapshot(cache):
    return [np_(a).copy() if hasattr(a, "shape") else a for a in cache]


def _assert_same(before, cache):
    for a, b in zip(before, cache):
        if hasattr(b, "shape"):
            np.testing.assert_array_equal(a, np_(b))


@given(case=attention_case())
def test_plain_attention_caches_the_true_probabilities_and_overwrites_nothing(xp, case):
    q, k, v, mask, causal, scale, dy = case
    inputs = [a.copy() for a in (q, k, v)]
    qx, kx, vx, dyx = on(xp, q, k, v, dy)
    mx = None if mask is None else on(xp, mask)
    y, cache = A.sdpa_forward(qx, kx, vx, mask=mx, causal=causal, scale=scale)
    for a, b in zip(inputs, (qx, kx, vx)):
        np.testing.assert_array_equal(a, np_(b))                       # the inputs are untouched
    B, H, Tq, D = q.shape
    assert_close(np_(cache.p).reshape(B, H, Tq, -1), _softmax_reference(q, k, mask, causal, scale))
    assert_close(np_(cache.y).reshape(B, H, Tq, D), y, rtol=0, atol=0)
    before = _snapshot(cache)
    grads = A.sdpa_backward(dyx, cache)
    _assert_same(before, cache)                                        # the backward keeps its cache
    for g, again in zip(grads, A.sdpa_backward(dyx, cache)):
        np.testing.assert_array_equal(np_(g), np_(again))


@given(case=attention_case(), block=st.integers(1, 4))
def test_tiled_attention_backward_leaves_its_cache_as_it_found_it(xp, case, block):
    q, k, v, mask, causal, scale, dy = case
    qx, kx, vx, dyx = on(xp, q, k, v, dy)
    mx = None if mask is None else on(xp, mask)
    y, cache = A.flash_attention_forward(qx, kx, vx, causal=causal, mask=mx, scale=scale, block_size=block)
    before = _snapshot(cache)
    grads = A.flash_attention_backward(dyx, cache)
    _assert_same(before, cache)
    for g, again in zip(grads, A.flash_attention_backward(dyx, cache)):
        np.testing.assert_array_equal(np_(g), np_(again))
    plain_y, plain_cache = A.sdpa_forward(qx, kx, vx, mask=mx, causal=causal, scale=scale)
    assert_close(y, plain_y)
    for g, g_plain in zip(grads, A.sdpa_backward(dyx, plain_cache)):
        assert_close(g, g_plain)


# --- self-attention is its numbered steps ----------------------------------------

@st.composite
def self_attention_case(draw):
    B, Hkv = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    H, D, T = Hkv * draw(st.integers(1, 2)), draw(st.sampled_from([2, 4])), draw(st.integers(2, 5))
    C = H * D
    rng = np.random.default_rng(draw(seeds))
    x = rng.standard_normal((B, T, C))
    w_qkv = rng.standard_normal((C, (H + 2 * Hkv) * D)) / np.sqrt(C)
    b_qkv = rng.standard_normal((H + 2 * Hkv) * D) * 0.5
    w_o, b_o = rng.standard_normal((C, C)) / np.sqrt(C), rng.standard_normal(C) * 0.5
    positions = np.stack([rng.choice(30, size=T, replace=False) for _ in range(B)])
    mask = (np.arange(T)[None, :] < rng.integers(1, T + 1, size=B)[:, None])[:, None, None, :]
    kw = dict(causal=draw(st.booleans()), rope_base=100.0, rope_interleaved=draw(st.booleans()))
    return x, w_qkv, b_qkv, w_o, b_o, H, Hkv, positions, mask, kw, rng.standard_normal((B, T, C))


@given(case=self_attention_case())
def test_self_attention_is_its_steps_composed_from_the_public_functions(xp, case):
    x, w_qkv, b_qkv, w_o, b_o, H, Hkv, positions, mask, kw, dy = case
    x, w_qkv, b_qkv, w_o, b_o, positions, mask, dy = on(xp, x, w_qkv, b_qkv, w_o, b_o, positions, mask, dy)
    B, T, C = x.shape
    D = C // H
    y, cache = A.self_attention_forward(x, w_qkv, b_qkv, w_o, b_o, H, n_kv_head=Hkv, mask=mask,
                                        positions=positions, **kw)
    rope = dict(base=kw["rope_base"], interleaved=kw["rope_interleaved"])
    # 1. project; 2. rotate q and k with the same public RoPE; 4. attend; 5. project back.
    qkv, qkv_proj = linear_forward(x.reshape(B * T, C), w_qkv, b_qkv)
    heads = qkv.reshape(B, T, H + 2 * Hkv, D).transpose(0, 2, 1, 3)
    q, rope_q = A.rope_forward(heads[:, :H], positions, **rope)
    k, rope_k = A.rope_forward(heads[:, H:H + Hkv], positions, **rope)
    att, att_cache = A.sdpa_forward(q, k, heads[:, H + Hkv:], mask=mask, causal=kw["causal"])
    want, out_proj = linear_forward(att.transpose(0, 2, 1, 3).reshape(B * T, C), w_o, b_o)
    assert_close(y, want.reshape(B, T, C))
    for ours, theirs in ((cache.rope_q, rope_q), (cache.rope_k, rope_k)):
        assert_close(ours.cos, theirs.cos, rtol=0, atol=0)
        assert_close(ours.sin, theirs.sin, rtol=0, atol=0)
    # The backward: the same steps in reverse, each public backward in turn.
    dx, dw_qkv, db_qkv, dw_o, db_o = A.self_attention_backward(dy, cache)
    datt2d, dw_o_want, db_o_want = linear_backward(dy.reshape(B * T, C), out_proj)
    dq, dk, dv = A.sdpa_backward(datt2d.reshape(B, T, H, D).transpose(0, 2, 1, 3), att_cache)
    dq, dk = A.rope_backward(dq, rope_q), A.rope_backward(dk, rope_k)
    dheads = xp.concatenate([dq, dk, dv], axis=1).transpose(0, 2, 1, 3).reshape(B * T, -1)
    dx_want, dw_qkv_want, db_qkv_want = linear_backward(dheads, qkv_proj)
    for ours, theirs in ((dx, dx_want.reshape(B, T, C)), (dw_qkv, dw_qkv_want), (db_qkv, db_qkv_want),
                         (dw_o, dw_o_want), (db_o, db_o_want)):
        assert_close(ours, theirs)


# --- checks name the argument ---------------------------------------------------------

def test_the_checks_name_the_argument(xp):
    z = lambda *s: on(xp, np.zeros(s))  # noqa: E731
    q = z(1, 2, 3, 4)
    for kw, name in [(dict(scale=float("inf")), "scale"), (dict(dropout_p=1.5), "dropout_p")]:
        with pytest.raises(ValueError, match=name):
            A.sdpa_forward(q, q, q, **kw)
    with pytest.raises(ValueError, match=r"dy: expected shape \(1, 2, 3, 4\)"):
        A.sdpa_backward(z(1, 2, 3, 3), A.sdpa_forward(q, q, q)[1])
    with pytest.raises(ValueError, match=r"dy: expected shape \(1, 2, 3, 4\)"):
        A.flash_attention_backward(z(1, 2, 3, 3), A.flash_attention_forward(q, q, q)[1])
    with pytest.raises(ValueError, match="block_size: expected a positive int, got True"):
        A.flash_attention_forward(q, q, q, block_size=True)
    with pytest.raises(ValueError, match="base"):
        A.rope_forward(q, on(xp, np.arange(3)), base=1.0)
    x = z(1, 3, 4)
    with pytest.raises(ValueError, match="dropout_p: attention dropout is only implemented for impl='plain'"):
        A.self_attention_forward(x, z(4, 12), None, z(4, 4), None, 2, impl="tiled", dropout_p=0.1,
                                 rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_kv_head: expected None or a positive int, got 0"):
        A.self_attention_forward(x, z(4, 12), None, z(4, 4), None, 2, n_kv_head=0)
    with pytest.raises(ValueError, match=r"dy: expected shape \(1, 3, 4\)"):
        A.self_attention_backward(z(1, 3, 5), A.self_attention_forward(x, z(4, 12), None, z(4, 4), None, 2)[1])
    with pytest.raises(ValueError, match="n_layer: expected a positive int, got 0"):
        A.KVCache(0, 1, 1, 4, 2, xp=xp)
    with pytest.raises(TypeError, match="dtype: expected a floating-point dtype"):
        A.KVCache(1, 1, 1, 4, 2, dtype=np.int32, xp=xp)
    with pytest.raises(ValueError, match="length: expected a non-negative int, got -1"):
        A.KVCache(1, 1, 1, 4, 2, xp=xp).crop(-1)
