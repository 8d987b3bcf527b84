"""Finite-difference checks of backward helpers added with the GPT's embedding split, the
recurrent LM and T5, which the whole-model tests reach only through the model: each one
checked on its own, in float64, on drawn shapes where its gradient is alive (T >= 2, more
than one key), so a wrong gradient points at the helper, not at the model."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import assert_gradcheck, on, scaled
from minillm import gpt, rnn, t5
from minillm.backprop import check_dict_gradients, gradcheck
from strategies import randn, seeds


@pytest.mark.parametrize("per_row_positions", [False, True])
@given(seed=seeds, B=st.integers(2, 3), T=st.integers(2, 4))
def test_gpt_embed_backward(xp, per_row_positions, seed, B, T):
    """x = wte[idx] + wpe[positions]: positions shared by the batch (T,) or per row (B, T)."""
    cfg = gpt.GPTConfig(vocab_size=5, block_size=6, n_layer=1, n_head=1, n_embd=3)
    rng = np.random.default_rng(seed)
    idx = on(xp, rng.integers(0, 5, (B, T)))
    positions = on(xp, rng.integers(0, 6, (B, T))) if per_row_positions else None
    p = {"wte": on(xp, randn(seed, 5, 3)), "wpe": on(xp, randn(seed + 1, 6, 3))}
    dy = on(xp, randn(seed + 2, B, T, 3))

    def f(d):
        x, _, _ = gpt._embed_forward(d, cfg, idx, positions, 1)
        return (x * dy).reshape(-1)
    _, tok, pos = gpt._embed_forward(p, cfg, idx, positions, 1)
    dwte, dwpe = gpt._embed_backward(dy, tok, pos)
    assert_gradcheck(check_dict_gradients(f, p, {"wte": dwte, "wpe": dwpe}))


@given(seed=seeds, B=st.integers(1, 3), T=st.integers(2, 4))
def test_rnn_input_projection_backward(xp, seed, B, T):
    x, w, b = on(xp, randn(seed, B, T, 3), randn(seed + 1, 3, 8), randn(seed + 2, 8))
    def fwd(x, w, b):
        return rnn._input_projection(x, w, b), (x, w)

    def bwd(dy, cache):
        return rnn._input_projection_backward(dy, *cache)
    assert_gradcheck(gradcheck(fwd, bwd, [x, w, b]))


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@settings(max_examples=scaled(3))
@given(seed=seeds, B=st.integers(1, 2), T=st.integers(2, 4), n_layer=st.integers(1, 2))
def test_rnn_lm_backward(xp, cell, seed, B, T, n_layer):
    cfg = rnn.RNNLMConfig(cell=cell, vocab_size=5, n_embd=3, n_hidden=4, n_layer=n_layer, block_size=T)
    p = {k: on(xp, v) for k, v in rnn.init_lm_params(cfg, seed=seed, dtype=np.float64, device="cpu").items()}
    ids = on(xp, np.random.default_rng(seed).integers(0, 5, (B, T)))
    w = on(xp, randn(seed + 1, B, T, 5))

    def f(d):
        logits, _ = rnn.lm_forward(d, cfg, ids)
        return (logits * w).reshape(-1)
    _, cache = rnn.lm_forward(p, cfg, ids)
    assert_gradcheck(check_dict_gradients(f, p, rnn.lm_backward(w, cache, cfg)))


# --- T5's pieces -----------------------------------------------------------------

def _t5_config(**kw):
    d = dict(vocab_size=7, d_model=4, d_kv=2, d_ff=5, num_layers=2, num_decoder_layers=1, num_heads=2,
             relative_attention_num_buckets=6, relative_attention_max_distance=5, dropout_rate=0.0)
    d.update(kw)
    return t5.T5Config(**d)


@given(seed=seeds, Tq=st.integers(2, 4), Tk=st.integers(2, 5), bidirectional=st.booleans())
def test_t5_position_bias_backward(xp, seed, Tq, Tk, bidirectional):
    cfg = _t5_config()
    buckets = on(xp, t5._position_buckets(cfg, Tq, Tk, bidirectional))
    table = on(xp, randn(seed, 6, 2))
    assert_gradcheck(gradcheck(lambda tb: t5._position_bias_forward(tb, buckets), t5._position_bias_backward,
                               [table]))


@given(seed=seeds, B=st.integers(1, 2), T=st.integers(2, 4), causal=st.booleans(), pad=st.booleans())
def test_t5_self_attention_backward(xp, seed, B, T, causal, pad):
    H = 2
    x, w_qkv, w_o = on(xp, randn(seed, B, T, 4), randn(seed + 1, 4, 3 * H * 2), randn(seed + 2, H * 2, 4))
    bias = on(xp, randn(seed + 3, 1, H, T, T))
    keep = np.ones((B, 1, 1, T), dtype=bool)
    if pad:
        keep[0, ..., -1] = False            # a padded key in the first row (never the first key)
    mask = on(xp, keep)

    def fwd(x, w_qkv, w_o, bias):
        return t5._self_attention_forward(x, w_qkv, w_o, H, bias, mask, causal, 0.0, None)
    assert_gradcheck(gradcheck(fwd, t5._self_attention_backward, [x, w_qkv, w_o, bias]))


@given(seed=seeds, B=st.integers(1, 2), T=st.integers(2, 3), S=st.integers(2, 4))
def test_t5_cross_attention_backward(xp, seed, B, T, S):
    H = 2
    x, ctx = on(xp, randn(seed, B, T, 4), randn(seed + 1, B, S, 4))
    w_q, w_kv, w_o = on(xp, randn(seed + 2, 4, H * 2), randn(seed + 3, 4, 2 * H * 2), randn(seed + 4, H * 2, 4))
    keep = np.ones((B, 1, 1, S), dtype=bool)
    keep[0, ..., -1] = False
    mask = on(xp, keep)

    def fwd(x, ctx, w_q, w_kv, w_o):
        return t5._cross_attention_forward(x, ctx, w_q, w_kv, w_o, H, mask, 0.0, None)
    assert_gradcheck(gradcheck(fwd, t5._cross_attention_backward, [x, ctx, w_q, w_kv, w_o]))


@pytest.mark.parametrize("ff", ["relu", "gated-gelu"])
@given(seed=seeds, B=st.integers(1, 2), T=st.integers(2, 3))
def test_t5_ff_backward(xp, ff, seed, B, T):
    cfg = _t5_config(feed_forward_proj=ff)
    names = ["ff.wi_0", "ff.wi_1", "ff.wo"] if cfg.gated else ["ff.wi", "ff.wo"]
    shapes = {"ff.wi": (4, 5), "ff.wi_0": (4, 5), "ff.wi_1": (4, 5), "ff.wo": (5, 4)}
    d = {"h": on(xp, randn(seed, B, T, 4)), **{n: on(xp, randn(seed + i + 1, *shapes[n])) for i, n in enumerate(names)}}
    w = on(xp, randn(seed + 9, B, T, 4))

    def f(d):
        m, _ = t5._ff_forward(cfg, d, "", d["h"], 0.0, None)
        return (m * w).reshape(-1)
    _, cache = t5._ff_forward(cfg, d, "", d["h"], 0.0, None)
    dh, g = t5._ff_backward(cfg, w, cache)
    assert_gradcheck(check_dict_gradients(f, d, {"h": dh, **g}))


@settings(max_examples=scaled(3))
@given(seed=seeds, B=st.integers(1, 2), T=st.integers(2, 4), pad=st.booleans())
def test_t5_stack_backward(xp, seed, B, T, pad):
    """The encoder stack alone: shared embedding, the bucketed bias summed over both layers'
    use of it, the blocks and the final norm."""
    cfg = _t5_config()
    rng = np.random.default_rng(seed)
    p = {k: on(xp, (1.0 + 0.3 * rng.standard_normal(s)) if len(s) == 1 else 0.6 * rng.standard_normal(s))
         for k, s in t5.param_shapes(cfg).items() if k == "shared" or k.startswith("encoder.")}
    ids = on(xp, rng.integers(2, 7, (B, T)))
    keep = np.ones((B, 1, 1, T), dtype=bool)
    if pad:
        keep[0, ..., -1] = False
    mask = on(xp, keep)
    w = on(xp, randn(seed + 1, B, T, 4))

    def f(d):
        xf, _ = t5._stack_forward(d, cfg, "encoder", ids, mask, None, 0.0, None)
        return (xf * w).reshape(-1)
    _, cache = t5._stack_forward(p, cfg, "encoder", ids, mask, None, 0.0, None)
    dshared, dcontext, grads = t5._stack_backward(cfg, w, cache)
    assert dcontext is None
    assert_gradcheck(check_dict_gradients(f, p, {"shared": dshared, **grads}, eps=1e-4))


# --- the checks every backward calls first: the right upstream gradient passes, a wrong one
# --- is a ValueError/TypeError naming it (called directly, with just the cache fields they read)

from types import SimpleNamespace as NS                 # noqa: E402

from minillm import attention, medusa                    # noqa: E402

Z = np.zeros


@pytest.mark.parametrize("check,cache,good,bad,match", [
    (attention._check_sdpa_backward, NS(shape=(2, 3)), Z((2, 3)), Z((3, 2)), "dy: expected shape"),
    (attention._check_flash_attention_backward, NS(y=Z((2, 3))), Z((2, 3)), Z((2, 4)), "dy: expected shape"),
    (attention._check_causal_attention_backward, NS(shape=(2, 3)), Z((2, 3)), Z((2,)), "dy: expected"),
    (attention._check_self_attention_backward, NS(used_kv_cache=False, dims=(1, 2, 3)), Z((1, 2, 3)),
     Z((1, 3, 3)), "dy: expected shape"),
    (attention._check_cross_attention_backward, NS(dims=(1, 2, 5, 3)), Z((1, 2, 3)), Z((1, 5, 3)),
     "dy: expected shape"),
    (medusa._check_heads_backward, NS(hidden=Z((1, 2, 3)), lin=[0, 0], w_out=[Z((5, 3))]), Z((2, 1, 2, 5)),
     Z((1, 1, 2, 5)), "dlogits: expected shape"),
], ids=["_check_sdpa_backward", "_check_flash_attention_backward", "_check_causal_attention_backward",
        "_check_self_attention_backward", "_check_cross_attention_backward", "_check_heads_backward"])
def test_backward_checks_take_the_right_upstream_gradient_only(check, cache, good, bad, match):
    check(good, cache)
    with pytest.raises(ValueError, match=match):
        check(bad, cache)


def test_self_attention_backward_check_refuses_an_inference_forward():
    with pytest.raises(ValueError, match="cache: this forward used a kv_cache"):
        attention._check_self_attention_backward(Z((1, 2, 3)), NS(used_kv_cache=True, dims=(1, 2, 3)))


def test_gpt_check_backward():
    cache = NS(xf=Z((1, 2, 3)), config=NS(vocab_size=5))
    gpt._check_backward(Z((1, 2, 5)), cache, None)
    gpt._check_backward(None, cache, Z((1, 2, 3)))
    with pytest.raises(ValueError, match="got None for both"):
        gpt._check_backward(None, cache, None)
    with pytest.raises(ValueError, match="dhidden: expected shape"):
        gpt._check_backward(None, cache, Z((1, 2, 4)))


def test_rnn_check_backward():
    rnn._check_backward(Z((1, 2, 3)), (1, 2, 3), Z((1, 3)), (1, 3), "dh_last")
    with pytest.raises(ValueError, match="dy: expected shape"):
        rnn._check_backward(Z((1, 3, 3)), (1, 2, 3), None, (1, 3), "dh_last")
    with pytest.raises(ValueError, match="dh_last: expected shape"):
        rnn._check_backward(Z((1, 2, 3)), (1, 2, 3), Z((2, 3)), (1, 3), "dh_last")


def test_t5_check_backward():
    config = _t5_config()
    ids = np.array([[2, 3, 4]])
    params = t5.init_params(config, seed=0)
    logits, cache = t5.forward(params, config, ids, ids[:, :2])
    t5._check_backward(logits, cache)
    with pytest.raises(TypeError, match="cache: expected the T5Cache"):
        t5._check_backward(logits, NS())
    with pytest.raises(ValueError, match="dlogits: expected shape"):
        t5._check_backward(logits[:, :1], cache)
