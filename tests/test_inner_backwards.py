"""Finite-difference checks of the backward helpers that the whole-model tests only
reach indirectly: BERT's pooler and MLM head, attention's dispatch between plain
and tiled, the shared embedding lookup, and the GPT's norm dispatch."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from helpers import assert_gradcheck, on
from minillm import attention, bert, embeddings, gpt
from minillm.backprop import check_dict_gradients, gradcheck
from strategies import randn, seeds


def _bert_params(xp, seed):
    cfg = bert.BertConfig(vocab_size=11, hidden_size=8, num_layers=1, num_heads=2,
                          intermediate_size=16, max_position=8)
    p = bert.init_params(cfg, seed=seed, dtype=np.float64, device="cpu")
    rng = np.random.default_rng(seed)
    p = {k: on(xp, v + rng.standard_normal(v.shape) * 0.3) for k, v in p.items()}
    return cfg, p


@given(seed=seeds, B=st.integers(1, 3), T=st.integers(1, 4))
def test_pooler_backward(xp, seed, B, T):
    _, p = _bert_params(xp, seed)
    h = on(xp, randn(seed, B, T, 8))
    rep = gradcheck(bert.pooler_forward, bert.pooler_backward, [h, p["pooler.w"], p["pooler.b"]])
    assert_gradcheck(rep)


@given(seed=seeds, N=st.integers(1, 4))
def test_mlm_head_backward(xp, seed, N):
    cfg, p = _bert_params(xp, seed)
    names = ["mlm.dense.w", "mlm.dense.b", "mlm.ln.weight", "mlm.ln.bias", "embeddings.word", "mlm.bias"]
    h = on(xp, randn(seed + 1, N, 8))
    dlogits = on(xp, randn(seed + 2, N, cfg.vocab_size))
    sub = {"h": h, **{k: p[k] for k in names}}

    def f(d):
        logits, _ = bert.mlm_head_forward(d["h"], d, cfg)
        return (logits * dlogits).reshape(-1)
    _, cache = bert.mlm_head_forward(h, sub, cfg)
    dh, g = bert.mlm_head_backward(dlogits, cache)
    rep = check_dict_gradients(f, sub, {"h": dh, **{k: g[k] for k in names}})
    assert_gradcheck(rep)


@pytest.mark.parametrize("impl", ["plain", "tiled", "fused"])
@given(seed=seeds, causal=st.booleans())
def test_attend_backward(xp, impl, seed, causal):
    q, k, v = (on(xp, randn(seed + i, 1, 2, 3, 4)) for i in range(3))

    def fwd(q, k, v):
        return attention._attend(q, k, v, None, causal, 0.0, None, impl, 2)
    assert_gradcheck(gradcheck(fwd, attention._attend_backward, [q, k, v]))


@given(seed=seeds, n=st.integers(1, 6))
def test_embedding_backward_helper(xp, seed, n):
    rng = np.random.default_rng(seed)
    ids = on(xp, rng.integers(0, 4, size=(n,)))
    table = on(xp, randn(seed, 4, 3))

    def fwd(table):
        return embeddings._embedding_forward(ids, table, "ids", "table")

    def bwd(dout, cache):
        return embeddings._embedding_backward(dout, cache, "dout")
    assert_gradcheck(gradcheck(fwd, bwd, [table]))


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@given(seed=seeds)
def test_gpt_norm_backward(xp, norm, seed):
    cfg = gpt.GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=2, n_embd=4, norm=norm)
    p = gpt.init_params(cfg, seed=seed, dtype=np.float64, device="cpu")
    rng = np.random.default_rng(seed)
    sub = {k: on(xp, p[k] + rng.standard_normal(p[k].shape) * 0.3) for k in p if k.startswith("ln_f.")}
    x = on(xp, randn(seed + 1, 2, 3, 4))
    dy = on(xp, randn(seed + 2, 2, 3, 4))
    d = {"x": x, **sub}

    def f(d):
        y, _ = gpt._norm_forward(cfg, d, "ln_f", d["x"])
        return (y * dy).reshape(-1)
    _, cache = gpt._norm_forward(cfg, d, "ln_f", x)
    dx, dweight, dbias = gpt._norm_backward(cfg, dy, cache)
    grads = {k: g for k, g in (("ln_f.weight", dweight), ("ln_f.bias", dbias)) if g is not None}
    assert_gradcheck(check_dict_gradients(f, d, {"x": dx, **grads}))
