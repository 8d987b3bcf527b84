"""lora.py: the adapted linear layer, the dW -> (dA, dB) identity through a GPT, merge/unmerge, fine-tuning."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from helpers import assert_close, assert_gradcheck, np_, on
from minillm import backprop as bp
from minillm import gpt, lora, optim
from strategies import randn, seeds

TINY = gpt.GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=2, n_embd=4)
TARGETS = r"attn\.w_(qkv|o)$|mlp\.w1$"


def tiny_gpt(xp, config=TINY, seed=0, dtype=np.float64):
    return {k: xp.asarray(v) for k, v in gpt.init_params(config, seed, dtype=dtype, device="cpu").items()}


@st.composite
def lora_case(draw):
    lead = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))
    n_in, n_out, r = draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.integers(1, 3))
    seed = draw(seeds)
    return (randn(seed, *lead, n_in), randn(seed + 1, n_in, n_out), randn(seed + 2, n_out),
            randn(seed + 3, n_in, r), randn(seed + 4, r, n_out), draw(st.sampled_from([1.0, 4.0, 16.0])),
            draw(st.booleans()), draw(st.sampled_from([None, "sqrt"])))


# --- the adapted linear layer ----------------------------------------------

@given(case=lora_case())
def test_lora_linear_backward_matches_finite_differences(xp, case):
    x, w, b, a, bl, alpha, use_bias, rank_scale = case
    x, w, b, a, bl = on(xp, x, w, b, a, bl)
    rep = bp.gradcheck(lora.lora_linear_forward, lora.lora_linear_backward,
                       [x, w, b if use_bias else None, a, bl], wrt=[0, 3, 4],
                       kwargs=dict(alpha=alpha, rank_scale=rank_scale))
    assert_gradcheck(rep)


@given(case=lora_case(), p=st.sampled_from([0.25, 0.5]))
def test_lora_linear_backward_with_dropout_matches_finite_differences(xp, case, p):
    x, w, b, a, bl, alpha, _, _ = case
    x, w, b, a, bl = on(xp, x, w, b, a, bl)

    def forward(*args, **kw):  # a fresh generator per call: the same mask every time
        return lora.lora_linear_forward(*args, alpha=alpha, dropout_p=p, rng=np.random.default_rng(3))

    assert_gradcheck(bp.gradcheck(forward, lora.lora_linear_backward, [x, w, b, a, bl], wrt=[0, 3, 4]))


@given(case=lora_case())
def test_lora_linear_equals_merged_weight_and_is_the_base_layer_when_b_is_zero(xp, case):
    x, w, b, a, bl, alpha, _, rank_scale = case
    x, w, b, a, bl = on(xp, x, w, b, a, bl)
    r = a.shape[1]
    s = lora.lora_scale(alpha, r, rank_scale)
    y, _ = lora.lora_linear_forward(x, w, b, a, bl, alpha, rank_scale=rank_scale)
    assert_close(y, x @ (w + s * a @ bl) + b, rtol=1e-10, atol=1e-10)
    y0, _ = lora.lora_linear_forward(x, w, b, a, xp.zeros_like(bl), alpha)
    assert_close(y0, x @ w + b, rtol=1e-12, atol=1e-12)


def test_lora_scale_and_its_errors():
    assert lora.lora_scale(16, 8) == 2.0
    assert lora.lora_scale(16, 4, "sqrt") == 8.0
    with pytest.raises(ValueError, match="rank"):
        lora.lora_scale(16, 0)
    with pytest.raises(ValueError, match="rank_scale"):
        lora.lora_scale(16, 4, "log")
    with pytest.raises(ValueError, match="alpha"):
        lora.lora_scale(float("nan"), 4)


def test_lora_linear_rejects_bad_shapes_and_dtypes(xp):
    x, w, b, a, bl = on(xp, np.ones((2, 5)), np.ones((5, 4)), np.ones(4), np.ones((5, 2)), np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"x: expected shape \(\.\.\., 5\)"):
        lora.lora_linear_forward(xp.ones((2, 3)), w, b, a, bl, 1.0)
    with pytest.raises(ValueError, match="a: expected shape"):
        lora.lora_linear_forward(x, w, b, xp.ones((4, 2)), bl, 1.0)
    with pytest.raises(ValueError, match="b_lora: expected shape"):
        lora.lora_linear_forward(x, w, b, a, xp.ones((3, 4)), 1.0)
    with pytest.raises(TypeError, match="b_lora: expected dtype float64"):
        lora.lora_linear_forward(x, w, b, a, bl.astype(np.float32), 1.0)
    with pytest.raises(ValueError, match="dy: expected shape"):
        _, cache = lora.lora_linear_forward(x, w, b, a, bl, 1.0)
        lora.lora_linear_backward(xp.ones((2, 3)), cache)


# --- adapters for a GPT ------------------------------------------------------

def test_init_lora_names_shapes_dtype_and_starts_at_the_base_model(xp):
    params = tiny_gpt(xp)
    ad = lora.init_lora(params, TARGETS, rank=2, alpha=4, seed=1)
    assert sorted(ad) == sorted(f"h.0.{w}.lora_{ab}" for w in ("attn.w_qkv", "attn.w_o", "mlp.w1")
                                for ab in "ab")
    for name in lora.lora_targets(ad):
        n_in, n_out = params[name].shape
        assert ad[name + ".lora_a"].shape == (n_in, 2) and ad[name + ".lora_b"].shape == (2, n_out)
        assert ad[name + ".lora_a"].dtype == np.float64
        assert float(abs(ad[name + ".lora_a"]).max()) <= 1 / np.sqrt(n_in)
        assert not np.any(np_(ad[name + ".lora_b"]))
    assert lora.lora_param_count(ad) == sum(2 * (i + o) for i, o in (params[n].shape for n in lora.lora_targets(ad)))
    # B = 0: the adapted model's output is the base model's, to the bit
    idx = xp.asarray(np.array([[1, 2, 3, 4], [0, 6, 5, 1]]))
    base, _ = gpt.forward(params, TINY, idx)
    adapted, _ = gpt.forward(lora.merge_lora(params, ad, alpha=4, rank=2), TINY, idx)
    assert np.array_equal(np_(base), np_(adapted))
    # same seed, same adapters; a list of names works too
    again = lora.init_lora(params, ["h.0.attn.w_qkv", "h.0.attn.w_o", "h.0.mlp.w1"], rank=2, alpha=4, seed=1)
    assert all(np.array_equal(np_(ad[k]), np_(again[k])) for k in ad)


@given(seed=seeds, rank=st.integers(1, 4), alpha=st.sampled_from([1.0, 8.0, 32.0]))
def test_merge_then_unmerge_round_trips(xp, seed, rank, alpha):
    params = tiny_gpt(xp, seed=seed % 1000)
    ad = lora.init_lora(params, TARGETS, rank=rank, alpha=alpha, seed=seed)
    for k in ad:
        if k.endswith(".lora_b"):
            ad[k] = xp.asarray(randn(seed, *ad[k].shape, scale=0.1))
    merged = lora.merge_lora(params, ad, alpha, rank)
    s = lora.lora_scale(alpha, rank)
    for name in lora.lora_targets(ad):
        assert_close(merged[name], params[name] + s * ad[name + ".lora_a"] @ ad[name + ".lora_b"])
        assert not np.array_equal(np_(merged[name]), np_(params[name]))
    assert merged["wte"] is params["wte"]          # untouched weights are shared, not copied
    back = lora.unmerge_lora(merged, ad, alpha, rank)
    for k in params:
        assert_close(back[k], params[k], rtol=0, atol=1e-14)


def test_lora_grads_from_full_match_finite_differences_through_a_gpt(xp):
    params = tiny_gpt(xp)
    alpha, rank = 3.0, 2
    ad = lora.init_lora(params, TARGETS, rank=rank, alpha=alpha, seed=2)
    for i, k in enumerate(sorted(ad)):  # B != 0, else dA = s dW B^T is trivially 0
        if k.endswith(".lora_b"):
            ad[k] = xp.asarray(randn(i, *ad[k].shape, scale=0.5))
    rng = np.random.default_rng(0)
    idx = xp.asarray(rng.integers(0, 7, size=(2, 4)))
    tgt = xp.asarray(rng.integers(0, 7, size=(2, 4)))
    loss, grads = lora.lora_loss_and_grads(lambda p: gpt.loss_and_grads(p, TINY, idx, tgt), params, ad, alpha, rank)
    assert set(grads) == set(ad)
    assert loss == pytest.approx(gpt.loss(lora.merge_lora(params, ad, alpha, rank), TINY, idx, tgt), rel=1e-12)

    def per_token_losses(a):  # an array: the checker differences it elementwise, so round-off stays tiny
        logits, _ = gpt.forward(lora.merge_lora(params, a, alpha, rank), TINY, idx)
        logp = bp.log_softmax(logits)
        return -xp.take_along_axis(logp, tgt[..., None], axis=-1) / tgt.size

    rep = bp.check_dict_gradients(per_token_losses, ad, grads)
    assert_gradcheck(rep)


def test_lora_dict_errors(xp):
    params = tiny_gpt(xp)
    with pytest.raises(ValueError, match="rank: expected an int >= 1"):
        lora.init_lora(params, TARGETS, rank=0)
    with pytest.raises(ValueError, match="rank: expected at most"):
        lora.init_lora(params, TARGETS, rank=5)
    with pytest.raises(ValueError, match="matches no parameter"):
        lora.init_lora(params, r"nonexistent")
    with pytest.raises(ValueError, match="not in params"):
        lora.init_lora(params, ["h.0.attn.w_qkv", "h.9.attn.w_o"])
    with pytest.raises(ValueError, match="2-D"):
        lora.init_lora(params, ["h.0.ln_1.weight"])
    with pytest.raises(TypeError, match="targets"):
        lora.init_lora(params, 3)
    ad = lora.init_lora(params, TARGETS, rank=2, alpha=4)
    with pytest.raises(ValueError, match=r"lora\['h.0.attn.w_qkv.lora_a'\]: expected shape \(4, 3\)"):
        lora.merge_lora(params, ad, alpha=4, rank=3)
    bad = dict(ad)
    del bad["h.0.attn.w_o.lora_b"]
    with pytest.raises(ValueError, match="no matching"):
        lora.merge_lora(params, bad, alpha=4, rank=2)
    with pytest.raises(ValueError, match="grads: no gradient"):
        lora.lora_grads_from_full({}, ad, 2.0)
    with pytest.raises(ValueError, match="scale"):
        lora.lora_grads_from_full({}, ad, None)


def _shift_task(xp, k, vocab=11):
    """Sequences where each token is followed by (token + k) mod vocab."""
    seq = (np.arange(4 * 9).reshape(4, 9) * k) % vocab
    return xp.asarray(seq[:, :-1]), xp.asarray(seq[:, 1:])


def test_lora_fine_tune_lowers_the_loss_and_leaves_the_base_bit_identical(xp):
    cfg = gpt.GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)
    params = tiny_gpt(xp, cfg, seed=0, dtype=np.float32)
    # a "pretrained" base: fully trained on task 1 (next = token + 1) ...
    idx, tgt = _shift_task(xp, 1)
    opt = optim.AdamW(params, lr=0.03, weight_decay=0.0)
    for _ in range(60):
        opt.step(gpt.loss_and_grads(params, cfg, idx, tgt)[1])
    before = {k: np_(v).copy() for k, v in params.items()}
    # ... adapted with LoRA to task 2 (next = token + 3), which it gets badly wrong at first
    idx, tgt = _shift_task(xp, 3)
    alpha, rank = 8, 2
    ad = lora.init_lora(params, r"attn\.w_(qkv|o)$|mlp\.w[12]$", rank=rank, alpha=alpha, seed=0)
    opt = optim.AdamW(ad, lr=0.03, weight_decay=0.0)
    losses = []
    for _ in range(30):
        loss, grads = lora.lora_loss_and_grads(lambda p: gpt.loss_and_grads(p, cfg, idx, tgt),
                                               params, ad, alpha, rank)
        losses.append(loss)
        opt.step(grads)
    assert losses[-1] < 0.1 * losses[0], losses
    for k, v in params.items():
        assert np.array_equal(np_(v), before[k]), k
    # the merged model (inference without adapters) has the adapted loss
    final = gpt.loss(lora.merge_lora(params, ad, alpha, rank), cfg, idx, tgt)
    assert final < 0.1 * losses[0]
