"""gpt.py and bert.py read like a textbook, in one vocabulary: the checks sit in one _check_inputs at the top
of forward (and are never weaker than a full check: no silent broadcast gets through), a
block's forward is numbered and its backward undoes the same steps in reverse, and every
backward helper returns its gradients, each checked here against finite differences."""
import inspect
import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import assert_close, assert_gradcheck, np_, on
from minillm import bert, gpt
from minillm.backprop import check_dict_gradients
from strategies import randn, seeds

GPT_VARIANTS = {
    "gpt2": dict(),
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, bias=False, tie_embeddings=False),
    "rope_gelu_gqa": dict(pos="rope", n_kv_head=2),
    "learned_rms_swiglu": dict(norm="rmsnorm", mlp="swiglu", bias=False),
}


def scaled(n):
    return max(1, n * settings.default.max_examples // 12)


def perturbed(params, seed, scale=0.3):
    """float64 params moved away from init, so every gradient is sizable."""
    rng = np.random.default_rng(seed)
    return {k: v + rng.standard_normal(v.shape) * scale for k, v in params.items()}


def tiny_gpt(**kw):
    return gpt.GPTConfig(**{**dict(vocab_size=7, block_size=6, n_layer=1, n_head=2, n_embd=8), **kw})


def tiny_bert(**kw):
    return bert.BertConfig(**{**dict(vocab_size=13, n_embd=8, n_layer=1, n_head=2, mlp_hidden=12,
                                     block_size=7, norm_eps=1e-5, num_labels=3), **kw})


# --- the block's backward, alone, against finite differences -------------------------

@pytest.mark.parametrize("variant", sorted(GPT_VARIANTS))
@settings(max_examples=scaled(3))
@given(seed=seeds, B=st.integers(2, 3), T=st.integers(2, 4), p=st.sampled_from([0.0, 0.3]))
def test_gpt_block_backward_matches_finite_differences(xp, variant, seed, B, T, p):
    cfg = tiny_gpt(**GPT_VARIANTS[variant])
    params = perturbed(gpt.init_params(cfg, seed, dtype=np.float64, device="cpu"), seed)
    d = {k: on(xp, v) for k, v in params.items() if k.startswith("h.0.")}
    d["x"] = on(xp, randn(seed + 1, B, T, cfg.n_embd))
    dy = on(xp, randn(seed + 2, B, T, cfg.n_embd))

    def run(d):   # the same dropout masks at every evaluation: a fresh generator, one seed
        rng = np.random.default_rng(seed) if p else None
        return gpt._block_forward(d, cfg, 0, d["x"], p, rng, None, None, None)

    y, cache = run(d)
    assert y.shape == d["x"].shape
    dx, grads = gpt._block_backward(cfg, dy, cache)
    analytic = {"x": dx, **{"h.0." + k: g for k, g in grads.items() if g is not None}}
    assert set(analytic) == set(d)
    assert_gradcheck(check_dict_gradients(lambda d: (run(d)[0] * dy).reshape(-1), d, analytic,
                                          max_checks_per_param=4, seed=seed))


@settings(max_examples=scaled(4))
@given(seed=seeds, B=st.integers(2, 3), T=st.integers(2, 5), p=st.sampled_from([0.0, 0.3]),
       act=st.sampled_from(["gelu", "gelu_new", "relu"]), n_pad=st.integers(0, 3))
def test_bert_block_backward_matches_finite_differences(xp, seed, B, T, p, act, n_pad):
    cfg = tiny_bert(hidden_act=act)
    params = perturbed(bert.init_params(cfg, seed, dtype=np.float64, device="cpu", heads=()), seed)
    d = {k: on(xp, v) for k, v in params.items() if k.startswith("h.0.")}
    d["x"] = on(xp, randn(seed + 1, B, T, cfg.n_embd))
    dy = on(xp, randn(seed + 2, B, T, cfg.n_embd))
    real = np.ones((B, T), dtype=bool)
    real[0, T - min(n_pad, T - 1):] = False                       # padding keys in sequence 0
    real[0, 0] = True
    key_mask = on(xp, real)[:, None, None, :]

    def run(d):
        rng = np.random.default_rng(seed) if p else None
        return bert._block_forward(d, cfg, 0, d["x"], key_mask, p, p, rng)

    _, cache = run(d)
    dx, grads = bert._block_backward(dy, cache)
    analytic = {"x": dx, **{"h.0." + k: g for k, g in grads.items()}}
    assert set(analytic) == set(d)
    assert_gradcheck(check_dict_gradients(lambda d: (run(d)[0] * dy).reshape(-1), d, analytic,
                                          max_checks_per_param=4, seed=seed))


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
@given(seed=seeds)
def test_gpt_mlp_backward_returns_the_gradients_it_names(xp, mlp, seed):
    cfg = tiny_gpt(mlp=mlp)
    params = perturbed(gpt.init_params(cfg, seed, dtype=np.float64, device="cpu"), seed)
    d = {k: on(xp, v) for k, v in params.items() if k.startswith("h.0.mlp.")}
    d["h"] = on(xp, randn(seed + 1, 2, 3, cfg.n_embd))
    dm = on(xp, randn(seed + 2, 2, 3, cfg.n_embd))
    _, cache = gpt._mlp_forward(cfg, d, "h.0.", d["h"])
    dh, grads = gpt._mlp_backward(cfg, dm, cache)
    assert {"h.0." + k for k in grads} == set(d) - {"h"}
    rep = check_dict_gradients(lambda d: (gpt._mlp_forward(cfg, d, "h.0.", d["h"])[0] * dm).reshape(-1), d,
                               {"h": dh, **{"h.0." + k: g for k, g in grads.items()}})
    assert_gradcheck(rep)


# --- the backward is the forward's mirror ---------------------------------------------

def _forward_steps(fn):
    """{n: text} from the '# n. text' comments of a forward."""
    return {int(n): t.strip() for n, t in re.findall(r"#\s*(\d+)\.\s*([^\n#]+)", inspect.getsource(fn))}


def _backward_steps(fn):
    """[(n, text)] from the '# forward step n: text' comments of a backward, in order."""
    return [(int(n), t.strip()) for n, t in re.findall(r"# forward step (\d+): (.*)", inspect.getsource(fn))]


def _words(text, n=3):
    return [w.strip(",.:") for w in text.split()[:n]]


@pytest.mark.parametrize("forward, backward", [
    (gpt._block_forward, gpt._block_backward), (gpt.forward, gpt.backward),
    (bert._block_forward, bert._block_backward), (bert.forward, bert.backward)],
    ids=["gpt block", "gpt", "bert block", "bert"])
def test_the_backward_undoes_the_forward_steps_in_reverse(forward, backward):
    fwd = _forward_steps(forward)
    bwd = _backward_steps(backward)
    assert sorted(fwd) == list(range(1, len(fwd) + 1)) and len(fwd) >= 4, fwd
    assert [n for n, _ in bwd] == sorted(fwd, reverse=True), (fwd, bwd)
    for n, text in bwd:   # the label quotes the forward's step
        assert _words(text) == _words(fwd[n]), (n, text, fwd[n])


# --- checks: one place, cheap, never weaker ---------------------------------------------

CORRUPTIONS = {
    # kind: (how a parameter is changed, the error it must get)
    "broadcastable (1,) or (1, n)": (lambda a: a[..., :1] if a.ndim == 1 else a[:1], ValueError),
    "transposed": (lambda a: a.T if a.ndim == 2 and a.shape[0] != a.shape[1] else a[None], ValueError),
    "one extra axis": (lambda a: a[None], ValueError),
    "float64": (lambda a: a.astype(np.float64), TypeError),
    "int": (lambda a: a.astype(np.int64), TypeError),
    "a list": (lambda a: a.tolist(), TypeError),
}


def _names(name, kind, dtype_reference):
    """The error names the changed parameter; when that is the one whose dtype all the others
    must share and it got another float dtype, it names the first one that differs from it."""
    return r"params\[" if kind == "float64" and name == dtype_reference else re.escape(f"params[{name!r}]")


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
@settings(max_examples=scaled(6))
@given(data=st.data())
def test_gpt_forward_refuses_any_wrong_parameter(xp, kind, data):
    variant = data.draw(st.sampled_from(sorted(GPT_VARIANTS)))
    cfg = tiny_gpt(**GPT_VARIANTS[variant])
    params = gpt.init_params(cfg, 0, device="cpu")
    name = data.draw(st.sampled_from(sorted(params)))
    change, error = CORRUPTIONS[kind]
    bad = change(params[name])
    broken = {k: on(xp, v) for k, v in params.items()}
    broken[name] = bad if isinstance(bad, list) else on(xp, bad)
    idx = on(xp, np.zeros((1, 3), dtype=np.int64))
    with pytest.raises(error, match=_names(name, kind, "wte")):
        gpt.forward(broken, cfg, idx)


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
@settings(max_examples=scaled(6))
@given(data=st.data())
def test_bert_forward_refuses_any_wrong_parameter(xp, kind, data):
    cfg = tiny_bert()
    params = bert.init_params(cfg, 0, device="cpu")
    name = data.draw(st.sampled_from(sorted(bert.param_shapes(cfg, heads=()))))
    change, error = CORRUPTIONS[kind]
    bad = change(params[name])
    broken = {k: on(xp, v) for k, v in params.items()}
    broken[name] = bad if isinstance(bad, list) else on(xp, bad)
    with pytest.raises(error, match=_names(name, kind, "embeddings.word")):
        bert.forward(broken, cfg, on(xp, np.ones((1, 3), dtype=np.int64)))


def test_gpt_params_must_match_the_config_exactly(xp):
    cfg = tiny_gpt()
    params = {k: on(xp, v) for k, v in gpt.init_params(cfg, 0, device="cpu").items()}
    idx = on(xp, np.zeros((1, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"unexpected \['lm_head'\]"):
        gpt.forward({**params, "lm_head": params["wte"]}, cfg, idx)
    with pytest.raises(TypeError, match="params: expected a dict"):
        gpt.forward(list(params.values()), cfg, idx)
    with pytest.raises(TypeError, match="config: expected a GPTConfig"):
        gpt.forward(params, cfg.to_dict(), idx)


def test_param_shapes_hands_out_copies(xp):
    """The shapes are cached per config for forward's check; a caller changing the dict it
    got must change neither the next answer nor what forward accepts."""
    cfg = tiny_gpt()
    shapes = gpt.param_shapes(cfg)
    shapes["wte"] = (1, 1)
    del shapes["ln_f.weight"]
    assert gpt.param_shapes(cfg)["wte"] == (7, 8) and "ln_f.weight" in gpt.param_shapes(cfg)
    params = {k: on(xp, v) for k, v in gpt.init_params(cfg, 0, device="cpu").items()}
    gpt.forward(params, cfg, on(xp, np.zeros((1, 2), dtype=np.int64)))
    bshapes = bert.param_shapes(tiny_bert())
    bshapes.clear()
    assert bert.param_shapes(tiny_bert())


def test_gpt_inputs_are_checked_before_any_math(xp):
    cfg = tiny_gpt(dropout=0.1)
    params = {k: on(xp, v) for k, v in gpt.init_params(cfg, 0, device="cpu").items()}
    idx = on(xp, np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(TypeError, match="rng: expected a random Generator when train=True"):
        gpt.forward(params, cfg, idx, train=True)
    gpt.forward(params, cfg, idx, train=False)                    # no dropout, no rng needed
    for mask in (np.ones((2, 3), dtype=np.int64), np.ones((2, 4), dtype=bool), np.ones((3,), dtype=bool)):
        with pytest.raises(ValueError, match=r"attention_mask: expected a bool array of shape .* \(2, 3\)"):
            gpt.forward(params, cfg, idx, attention_mask=on(xp, mask))
    with pytest.raises(ValueError, match=r"idx: expected ids in \[0, 7\).*got -3"):
        gpt.forward(params, cfg, on(xp, np.array([[1, -3, 2]])))
    with pytest.raises(ValueError, match="idx: expected at least one token"):
        gpt.forward(params, cfg, on(xp, np.zeros((2, 0), dtype=np.int64)))
    with pytest.raises(ValueError, match=r"dlogits: expected shape \(2, 3, 7\)"):
        gpt.backward(on(xp, np.zeros((2, 3, 6))), gpt.forward(params, cfg, idx)[1])


def test_padding_positions_worked_example(xp):
    mask = on(xp, np.array([[False, False, True, True], [True, True, True, True]]))
    positions, key_mask = gpt._padding_positions(mask, 0)
    assert np_(positions).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    assert key_mask.shape == (2, 1, 1, 4)
    positions, _ = gpt._padding_positions(mask, 3)               # the last token, 3 already cached
    assert np_(positions).tolist() == [[1], [3]]
    assert gpt._padding_positions(None, 5) == (None, None)


def test_bert_rng_may_be_a_seed_for_the_classifier_too(xp):
    """train=True with an int seed: the encoder's dropout and the pooled [CLS]'s dropout draw
    from one generator made from it, the same numbers as passing that generator."""
    cfg = tiny_bert(dropout=0.3, attention_dropout=0.2)
    params = {k: on(xp, v) for k, v in bert.init_params(cfg, 1, dtype=np.float64, device="cpu").items()}
    ids = on(xp, np.array([[2, 5, 7, 1], [3, 3, 9, 4]]))
    labels = on(xp, np.array([0, 2]))
    loss_seed, g_seed = bert.classification_loss_and_grads(params, cfg, ids, labels, train=True, rng=5)
    loss_gen, g_gen = bert.classification_loss_and_grads(params, cfg, ids, labels, train=True,
                                                         rng=np.random.default_rng(5))
    assert loss_seed == loss_gen
    for k in g_gen:
        assert_close(g_seed[k], g_gen[k], rtol=0, atol=0, msg=k)
    with pytest.raises(TypeError, match="rng"):
        bert.classification_loss_and_grads(params, cfg, ids, labels, train=True)


def test_mask_tokens_refuses_an_all_special_vocabulary(xp):
    with pytest.raises(ValueError, match="special_ids: every id is special"):
        bert.mask_tokens(on(xp, np.zeros((1, 3), dtype=np.int64)), 0, vocab_size=3, mask_token_id=1,
                         special_ids=(0, 1, 2, 7))
    masked, labels = bert.mask_tokens(on(xp, np.zeros((1, 3), dtype=np.int64)), 0, vocab_size=3,
                                      mask_token_id=1, special_ids=(1, 2, 7), mlm_probability=1.0)
    assert set(np_(labels).ravel().tolist()) == {0}             # id 0 is ordinary: every one is chosen


# --- one vocabulary: GPTConfig's spelling for what the configs share --------------------

SHARED = ("vocab_size", "n_embd", "n_layer", "n_head", "mlp_hidden", "block_size", "norm_eps", "dropout")

# BertConfig.to_dict() of a run saved before the renaming (main at 220ca75).
SAVED_BEFORE = {"vocab_size": 13, "hidden_size": 8, "num_layers": 2, "num_heads": 2, "intermediate_size": 12,
                "max_position": 7, "type_vocab_size": 2, "layer_norm_eps": 1e-05, "hidden_dropout": 0.1,
                "attention_dropout": 0.1, "initializer_range": 0.02, "hidden_act": "gelu", "pad_token_id": 0,
                "num_labels": 3}


def test_the_same_idea_has_the_same_name_in_both_configs():
    import dataclasses
    gpt_fields = {f.name for f in dataclasses.fields(gpt.GPTConfig)}
    bert_fields = {f.name for f in dataclasses.fields(bert.BertConfig)}
    assert set(SHARED) <= gpt_fields & bert_fields
    assert set(bert.OLD_FIELD_NAMES.values()) <= set(SHARED)
    g, b = tiny_gpt(), tiny_bert()
    assert (g.head_dim, b.head_dim) == (4, 4)
    # hidden_size was the MLP's width in GPTConfig and the model's width in BertConfig
    assert not hasattr(g, "hidden_size") and g.mlp_width == 32 and b.hidden_size == b.n_embd == 8


def test_bert_config_still_takes_and_reads_the_old_names():
    old = bert.BertConfig(**SAVED_BEFORE)
    new = bert.BertConfig(vocab_size=13, n_embd=8, n_layer=2, n_head=2, mlp_hidden=12, block_size=7,
                          norm_eps=1e-5, dropout=0.1, num_labels=3)
    assert old == new and hash(old) == hash(new)
    assert bert.BertConfig.from_dict(SAVED_BEFORE) == new                   # a saved run loads
    assert bert.BertConfig.from_dict(new.to_dict()) == new
    assert set(new.to_dict()) >= set(SHARED) and not set(new.to_dict()) & set(bert.OLD_FIELD_NAMES)
    for old_name, name in bert.OLD_FIELD_NAMES.items():
        assert getattr(new, old_name) == getattr(new, name), old_name
    assert new.head_size == new.head_dim
    assert new.replace(hidden_dropout=0.0) == new.replace(dropout=0.0) != new
    assert bert.BertConfig.from_hf(new.to_hf()) == new                      # Hugging Face's names
    assert new.to_hf()["hidden_size"] == 8 and new.to_hf()["max_position_embeddings"] == 7


def test_bert_config_refuses_ambiguous_unknown_or_changed_fields():
    import dataclasses
    cfg = tiny_bert()
    with pytest.raises(TypeError, match="hidden_dropout: the old name of dropout, and both were given"):
        bert.BertConfig(**{**SAVED_BEFORE, "dropout": 0.2})
    with pytest.raises(TypeError, match="use config.replace"):
        dataclasses.replace(cfg, hidden_dropout=0.0)     # replace passes every field: both names
    with pytest.raises(ValueError, match=r"unknown BertConfig fields \['n_ctx'\]"):
        bert.BertConfig.from_dict({**cfg.to_dict(), "n_ctx": 3})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_dropout = 0.0                         # would otherwise set a stray attribute
    with pytest.raises(AttributeError, match="no attribute 'n_embed'"):
        cfg.n_embed
    # errors name a renamed field both ways while callers still use the old name
    with pytest.raises(ValueError, match="n_head/num_heads: expected a divisor of n_embd=8"):
        tiny_bert(n_head=3)
    with pytest.raises(ValueError, match="dropout/hidden_dropout: expected a probability"):
        tiny_bert(hidden_dropout=1.0)
    with pytest.raises(ValueError, match="block_size/max_position: expected a positive int"):
        tiny_bert(block_size=0)
    with pytest.raises(ValueError, match="norm_eps/layer_norm_eps: expected a positive number"):
        tiny_bert(norm_eps=0.0)
