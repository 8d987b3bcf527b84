"""t5.py: the encoder-decoder's forward and hand-written backward (finite differences of
every parameter), its properties (causality, padding, buckets, caches), span corruption,
the Hugging Face T5 mapping, and equality with transformers' T5ForConditionalGeneration."""
import json

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from helpers import assert_alive, assert_gradcheck, np_, on, scaled
from minillm import attention, checkpoint, t5
from minillm.backprop import check_dict_gradients, gradcheck
from strategies import randn, seeds

FF = t5.FEED_FORWARD_PROJ


def tiny(**kw):
    d = dict(vocab_size=13, d_model=8, d_kv=3, d_ff=10, num_layers=2, num_decoder_layers=2, num_heads=2,
             relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.0)
    d.update(kw)
    return t5.T5Config(**d)


def fd_tiny(**kw):
    """The finite-difference model: every kind of parameter, as few entries as possible
    (one encoder block, two decoder blocks so the shared bias sums over layers)."""
    d = dict(vocab_size=7, d_model=4, d_kv=2, d_ff=5, num_layers=1, num_decoder_layers=2, num_heads=2,
             relative_attention_num_buckets=6, relative_attention_max_distance=5, dropout_rate=0.0)
    d.update(kw)
    return t5.T5Config(**d)


def random_params(xp, config, seed):
    """float64 params with O(1) entries (T5's init is already O(1)-ish; gains near 1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in t5.param_shapes(config).items():
        a = rng.standard_normal(shape) * (0.6 if len(shape) == 2 else 0.3)
        out[name] = on(xp, 1.0 + a if len(shape) == 1 else a)
    return out


def batch(config, seed, B, S, T, pad_src, pad_tgt):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, config.vocab_size, size=(B, S))
    labels = rng.integers(2, config.vocab_size, size=(B, T))
    mask = np.ones((B, S), dtype=np.int64)
    if pad_src:
        mask[0, S - pad_src:] = 0
        ids[0, S - pad_src:] = config.pad_token_id
    if pad_tgt:
        labels[0, T - pad_tgt:] = -100
    return ids, labels, mask


# --- the whole model against finite differences --------------------------------

@settings(max_examples=scaled(2))
@given(ff=st.sampled_from(FF), tie=st.booleans(), seed=seeds, B=st.integers(2, 3), S=st.integers(3, 6),
       T=st.integers(2, 5), pad_src=st.integers(1, 2))
def test_every_parameter_matches_finite_differences(xp, ff, tie, seed, B, S, T, pad_src):
    """Both feed-forwards, tied and untied heads, padding in the source (attention_mask)
    and in the target (a -100 label, which the decoder still reads as a pad token).
    Every parameter array is checked, at a few sampled entries each (each entry costs
    four forwards; the float64 comparison with transformers below checks all of them).
    eps 1e-4: 1e-3 steps across ReLU's kink at these O(1) weights."""
    config = fd_tiny(feed_forward_proj=ff, tie_word_embeddings=tie)
    params = random_params(xp, config, seed)
    ids, labels, mask = on(xp, *batch(config, seed, B, S, T, pad_src, 1))
    loss, grads = t5.loss_and_grads(params, config, ids, labels, mask)
    assert_alive(grads, loss=loss)
    rep = check_dict_gradients(lambda p: t5.loss(p, config, ids, labels, mask), params, grads,
                               max_checks_per_param=2, seed=seed)
    assert_gradcheck(rep)
    assert len(rep.per_input) == len(t5.param_shapes(config))


@pytest.mark.parametrize("ff,tie", [("relu", True), ("gated-gelu", False)])
def test_every_entry_of_every_parameter_matches_finite_differences(xp, ff, tie):
    """All 500-odd entries of the tiny model, not a sample: one case per feed-forward,
    with padding in both stacks, so no entry's gradient goes unchecked without torch."""
    config = fd_tiny(feed_forward_proj=ff, tie_word_embeddings=tie)
    params = random_params(xp, config, 11)
    ids, labels, mask = on(xp, *batch(config, 11, 2, 5, 4, 1, 1))
    loss, grads = t5.loss_and_grads(params, config, ids, labels, mask)
    assert_alive(grads, loss=loss)
    rep = check_dict_gradients(lambda p: t5.loss(p, config, ids, labels, mask), params, grads)
    assert_gradcheck(rep)
    assert set(rep.per_input) == set(t5.param_shapes(config))


def test_gradients_with_a_decoder_padding_mask_and_dropout(xp):
    """forward's decoder_attention_mask and training dropout (a fixed rng: the same masks
    on every call) are differentiated too."""
    config = fd_tiny(feed_forward_proj="gated-gelu", dropout_rate=0.2)
    params = random_params(xp, config, 3)
    ids, labels, mask = on(xp, *batch(config, 3, 2, 5, 4, 1, 0))
    dmask = on(xp, np.array([[1, 1, 1, 0], [1, 1, 1, 1]]))
    w = on(xp, randn(4, 2, 4, config.vocab_size))

    def f(p):
        logits, cache = t5.forward(p, config, ids, labels, mask, dmask, train=True, rng=np.random.default_rng(0))
        return float(np_((logits * w).sum())), cache
    _, cache = f(params)
    grads = t5.backward(w, cache)
    assert_alive(grads)
    assert_gradcheck(check_dict_gradients(lambda p: f(p)[0], params, grads, max_checks_per_param=2))


def test_sdpa_bias_gradient(xp):
    """attention.sdpa_forward's additive bias (T5's position bias), broadcast over the
    batch, with a mask: dbias = dS summed over the broadcast axes."""
    q, k, v = on(xp, randn(1, 2, 2, 3, 4), randn(2, 2, 2, 5, 4), randn(3, 2, 2, 5, 4))
    bias = on(xp, randn(4, 1, 2, 3, 5))
    mask = on(xp, np.array([True, True, False, True, True])[None, None, None])

    def fwd(q, k, v, bias):
        return attention.sdpa_forward(q, k, v, mask=mask, scale=1.0, bias=bias)
    assert_gradcheck(gradcheck(fwd, attention.sdpa_backward, [q, k, v, bias]))


# --- properties -------------------------------------------------------------------

@settings(max_examples=scaled(6))
@given(seed=seeds, T=st.integers(2, 6), t=st.integers(0, 4), ff=st.sampled_from(FF))
def test_decoder_output_at_t_ignores_later_decoder_inputs(xp, seed, T, t, ff):
    t = t % (T - 1)
    config = tiny(feed_forward_proj=ff)
    params = random_params(xp, config, seed)
    ids, labels, _ = batch(config, seed, 2, 4, T, 0, 0)
    changed = labels.copy()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1) % config.vocab_size
    a, _ = t5.forward(params, config, *on(xp, ids, labels))
    b, _ = t5.forward(params, config, *on(xp, ids, changed))
    np.testing.assert_allclose(np_(a)[:, :t + 1], np_(b)[:, :t + 1], rtol=0, atol=1e-12)
    assert not np.allclose(np_(a)[:, t + 1:], np_(b)[:, t + 1:])


@settings(max_examples=scaled(6))
@given(seed=seeds, S=st.integers(1, 5), n_pad=st.integers(1, 4))
def test_encoder_padding_changes_no_real_output(xp, seed, S, n_pad):
    """Appending padding to a source (masked) leaves every logit as it was."""
    config = tiny()
    params = random_params(xp, config, seed)
    ids, labels, _ = batch(config, seed, 1, S, 3, 0, 0)
    padded = np.concatenate([ids, np.full((1, n_pad), 5)], axis=1)
    mask = np.concatenate([np.ones((1, S), int), np.zeros((1, n_pad), int)], axis=1)
    a, _ = t5.forward(params, config, *on(xp, ids, labels))
    b, _ = t5.forward(params, config, *on(xp, padded, labels, mask))
    np.testing.assert_allclose(np_(a), np_(b), rtol=1e-12, atol=1e-12)


@settings(max_examples=scaled(12))
@given(n=st.integers(2, 24).map(lambda x: 2 * x), m=st.integers(8, 300), d=st.integers(0, 400))
@example(n=16, m=8, d=7)     # causal: max_distance = the exact range, no logarithmic buckets left (was 0/0)
def test_bucket_monotone_in_distance_and_symmetric(n, m, d):
    """Bidirectional: the bucket of +d and -d differ by exactly n/2 for d > 0 (the same
    bucket within each half), 0 only for d = 0; within a half, buckets never decrease
    with |d|. Causal: a future key (d > 0) is bucket 0, a past one uses all n buckets,
    also non-decreasing. Every bucket is in [0, n)."""
    m = max(m, n // 4 + 1)
    d_all = np.arange(0, d + 2)
    past = t5.relative_position_bucket(-d_all, True, n, m)
    future = t5.relative_position_bucket(d_all, True, n, m)
    assert np.all(np.diff(past) >= 0) and np.all(np.diff(future) >= 0)
    assert np.all(future[1:] == past[1:] + n // 2) and future[0] == past[0] == 0
    assert past.max() < n // 2 and future.max() < n
    causal_past = t5.relative_position_bucket(-d_all, False, n, m)
    assert np.all(np.diff(causal_past) >= 0) and causal_past.max() < n
    assert np.all(t5.relative_position_bucket(d_all, False, n, m) == 0)
    assert causal_past[min(d + 1, n // 2 - 1)] == min(d + 1, n // 2 - 1)   # the exact buckets


def test_bucket_matches_transformers():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = np.arange(-400, 400)
    for bidirectional in (True, False):
        for n, m in ((32, 128), (8, 12), (6, 20), (64, 1000)):
            theirs = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional, n, m).numpy()
            assert np.array_equal(t5.relative_position_bucket(rel, bidirectional, n, m), theirs)


@settings(max_examples=scaled(4))
@given(seed=seeds, ff=st.sampled_from(FF), tie=st.booleans(), temperature=st.sampled_from([0.0, 0.8]))
def test_cached_generation_equals_uncached(seed, ff, tie, temperature):
    config = tiny(feed_forward_proj=ff, tie_word_embeddings=tie)
    params = random_params(np, config, seed)
    ids, _, mask = batch(config, seed, 2, 5, 2, 2, 0)
    kw = dict(temperature=temperature, seed=1, top_k=5, repetition_penalty=1.2, eos_id=None)
    a = t5.generate(params, config, ids, 7, attention_mask=mask, use_cache=True, **kw)
    b = t5.generate(params, config, ids, 7, attention_mask=mask, use_cache=False, **kw)
    assert a == b and all(len(r) == 7 for r in a)


@settings(max_examples=scaled(12))
@given(L=st.integers(2, 60), density=st.floats(0.05, 0.9), span=st.floats(1.0, 6.0), seed=seeds)
def test_span_corruption_reconstructs(L, density, span, seed):
    ids = np.random.default_rng(seed).integers(0, 50, size=L)
    inputs, targets = t5.span_corruption(ids, density, span, sentinel_start=99, rng=seed)
    n = int(np.sum(inputs > 50))
    assert n >= 1 and np.array_equal(inputs[inputs > 50], 99 - np.arange(n))
    assert np.array_equal(targets[targets > 50], 99 - np.arange(n))
    assert t5.span_corruption_reconstruct(inputs, targets, 99) == ids.tolist()
    n_noise = len(targets) - n
    assert n_noise == min(max(round(L * density), 1), L - 1)     # the density asked for


# --- Hugging Face ------------------------------------------------------------------

def _norm_without_float32_cast(self, hidden_states):
    # transformers' T5LayerNorm computes the variance in float32 even for a float64
    # module, which drifts by 1e-9..1e-8; the float64 comparison uses the same formula
    # without that cast (the patch this test applies to the reference).
    import torch
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def hf_model(config, params, dtype="float64", patch_norm=True, monkeypatch=None):
    """T5ForConditionalGeneration with our weights. transformers 5 forces
    tie_word_embeddings=True; an untied model gets its own lm_head module (and
    scale_decoder_outputs False, what tie_word_embeddings: false in config.json sets)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.t5 import modeling_t5
    if patch_norm:
        monkeypatch.setattr(modeling_t5.T5LayerNorm, "forward", _norm_without_float32_cast)
    hf = checkpoint._t5_config_to_hf(config)
    hf = {k: v for k, v in hf.items() if k not in ("model_type", "architectures")}
    hcfg = transformers.T5Config(**hf)
    hcfg._attn_implementation = "eager"
    model = transformers.T5ForConditionalGeneration(hcfg)
    if not config.tie_word_embeddings:
        model.lm_head = torch.nn.Linear(config.d_model, config.vocab_size, bias=False)
        model.config.scale_decoder_outputs = False
    model = model.to(getattr(torch, dtype))
    state = {k: torch.tensor(np.ascontiguousarray(np_(v))) for k, v in checkpoint.hf_state_dict(config, params).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("embed_tokens" in k or k == "lm_head.weight" for k in missing)
    model.eval()
    return model


@pytest.mark.parametrize("ff", FF)
@pytest.mark.parametrize("tie", [True, False])
def test_logits_equal_transformers_float32(ff, tie, monkeypatch):
    torch = pytest.importorskip("torch")
    config = tiny(feed_forward_proj=ff, tie_word_embeddings=tie, d_model=16, d_kv=4, num_heads=3,
                  relative_attention_num_buckets=32, relative_attention_max_distance=20)
    params = {k: v.astype(np.float32) for k, v in t5.init_params(config, seed=2).items()}
    ids, labels, mask = batch(config, 2, 2, 9, 7, 3, 0)
    model = hf_model(config, params, "float32", patch_norm=False)
    ours, _ = t5.forward(params, config, ids, t5.shift_right(labels, 0, 0), mask)
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       decoder_input_ids=torch.tensor(t5.shift_right(labels, 0, 0))).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ff,tie", [("relu", True), ("gated-gelu", False)])
def test_loss_and_every_gradient_equal_transformers_float64(ff, tie, monkeypatch):
    torch = pytest.importorskip("torch")
    config = tiny(feed_forward_proj=ff, tie_word_embeddings=tie, d_model=12, d_kv=5, num_heads=2,
                  num_decoder_layers=3, relative_attention_num_buckets=16, relative_attention_max_distance=9)
    params = random_params(np, config, 7)
    ids, labels, mask = batch(config, 7, 3, 11, 9, 4, 2)
    model = hf_model(config, params, monkeypatch=monkeypatch)
    loss, grads = t5.loss_and_grads(params, config, ids, labels, mask)
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    out.loss.backward()
    assert abs(loss - out.loss.item()) <= 1e-10
    ours = checkpoint.hf_state_dict(config, grads)
    named = dict(model.named_parameters())
    assert set(ours) == set(named)
    for name, g in ours.items():
        theirs = named[name].grad.numpy()
        scale = max(np.abs(theirs).max(), 1e-30)
        assert np.abs(g - theirs).max() / scale <= 1e-8, name


def test_greedy_generation_equals_transformers(monkeypatch):
    torch = pytest.importorskip("torch")
    config = tiny(feed_forward_proj="gated-gelu", d_model=16, d_kv=4, num_heads=4, vocab_size=20)
    params = t5.init_params(config, seed=4, dtype=np.float64)
    ids, _, mask = batch(config, 4, 3, 8, 2, 3, 0)
    model = hf_model(config, params, monkeypatch=monkeypatch)
    ours = t5.generate(params, config, ids, 12, attention_mask=mask)
    with torch.no_grad():
        theirs = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                max_new_tokens=12, num_beams=1, decoder_start_token_id=0, eos_token_id=1,
                                pad_token_id=0).numpy()
    for row, hf_row in zip(ours, theirs):
        hf_row = hf_row[1:].tolist()                 # HF keeps the start token
        if 1 in hf_row:
            hf_row = hf_row[:hf_row.index(1) + 1]    # and pads after eos
        assert row == hf_row
    assert any(len(r) > 1 for r in ours)


@pytest.mark.parametrize("ff,tie", [("relu", True), ("gated-gelu", False)])
def test_save_hf_loads_in_transformers_with_the_same_logits(tmp_path, ff, tie):
    """Tied (v1.0) and untied (v1.1/Flan: lm_head.weight in the file, tie_word_embeddings
    false, which transformers then leaves untied and unscaled)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = tiny(feed_forward_proj=ff, tie_word_embeddings=tie, d_model=16, d_kv=4, num_heads=2)
    params = t5.init_params(config, seed=5)
    checkpoint.save_hf(tmp_path, config, params)
    model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, labels, mask = batch(config, 5, 2, 6, 4, 2, 0)
    dec = t5.shift_right(labels, 0, 0)
    ours, _ = t5.forward(params, config, ids, dec, mask)
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       decoder_input_ids=torch.tensor(dec)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ff,tie", [(f, t) for f in FF for t in (True, False)])
def test_save_hf_load_hf_round_trip(tmp_path, ff, tie):
    config = tiny(feed_forward_proj=ff, tie_word_embeddings=tie)
    params = t5.init_params(config, seed=6)
    checkpoint.save_hf(tmp_path, config, params)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "t5" and written["tie_word_embeddings"] is tie
    config2, params2 = checkpoint.load_hf(tmp_path, device="cpu")
    assert config2 == config and params2.keys() == params.keys()
    assert all(np.array_equal(params[k], params2[k]) for k in params)


def test_load_hf_reads_an_untied_transformers_checkpoint(tmp_path):
    """A Flan-T5-style directory written by transformers itself: own lm_head, and
    tie_word_embeddings: false in config.json."""
    torch = pytest.importorskip("torch")
    config = tiny(feed_forward_proj="gated-gelu", tie_word_embeddings=False, d_model=16, d_kv=4)
    params = t5.init_params(config, seed=8)
    model = hf_model(config, params, "float32", patch_norm=False)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    config2, params2 = checkpoint.load_hf(tmp_path, device="cpu")
    assert config2.tie_word_embeddings is False and config2.feed_forward_proj == "gated-gelu"
    for k in params:
        np.testing.assert_array_equal(params2[k], params[k], err_msg=k)


# --- bad input ------------------------------------------------------------------------

def test_bad_input_is_named():
    config = tiny()
    params = t5.init_params(config)
    ids = np.array([[2, 3, 4]])
    with pytest.raises(ValueError, match="decoder_input_ids: expected ids in \\[0, 13\\)"):
        t5.forward(params, config, ids, np.array([[0, 13]]))
    with pytest.raises(ValueError, match="decoder_input_ids: expected ids in"):
        t5.forward(params, config, ids, np.array([[0, -1]]))
    with pytest.raises(ValueError, match="attention_mask: expected shape \\(1, 3\\)"):
        t5.forward(params, config, ids, np.array([[0]]), attention_mask=np.ones((1, 4), int))
    with pytest.raises(ValueError, match="decoder_attention_mask: expected shape \\(1, 1\\)"):
        t5.forward(params, config, ids, np.array([[0]]), decoder_attention_mask=np.ones((1, 2), int))
    with pytest.raises(ValueError, match="decoder_input_ids: expected batch size 1"):
        t5.forward(params, config, ids, np.zeros((2, 1), int))
    with pytest.raises(ValueError, match="attention_mask: a source of nothing but padding"):
        t5.forward(params, config, ids, np.array([[0]]), attention_mask=np.zeros((1, 3), int))
    with pytest.raises(ValueError, match="feed_forward_proj: expected one of \\('relu', 'gated-gelu'\\)"):
        tiny(feed_forward_proj="gated-silu")
    with pytest.raises(ValueError, match="labels: expected ids in \\[0, 13\\) or -100"):
        t5.loss_and_grads(params, config, ids, np.array([[2, -5]]))
    with pytest.raises(TypeError, match="rng: expected a random Generator"):
        t5.forward(params, tiny(dropout_rate=0.1), ids, ids, train=True)
    with pytest.raises(ValueError, match="input_ids: sources of different lengths \\[2, 3\\]; pad them"):
        t5.generate(params, config, [[2, 3], [4, 5, 6]], 3)
    with pytest.raises(TypeError, match="sentinel_start: expected"):
        t5.span_corruption([1, 2, 3])


def test_load_hf_rejects_other_models_and_unknown_variants(tmp_path):
    from minillm import gpt
    gcfg = gpt.GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=4)
    checkpoint.save_hf(tmp_path / "gpt", gcfg, gpt.init_params(gcfg))
    loaded, gparams = checkpoint.load_hf(tmp_path / "gpt", device="cpu")
    assert isinstance(loaded, gpt.GPTConfig)                  # another model type loads as itself
    with pytest.raises(TypeError, match="config: expected a T5Config, got GPTConfig"):
        t5.forward(gparams, loaded, np.zeros((1, 2), int), np.zeros((1, 2), int))
    config = tiny()
    checkpoint.save_hf(tmp_path / "t5", config, t5.init_params(config))
    cfg_path = tmp_path / "t5" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["feed_forward_proj"] = "gated-silu"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="feed_forward_proj: expected one of"):
        checkpoint.load_hf(tmp_path / "t5")
    cfg["feed_forward_proj"] = "gated-gelu"                   # the file holds relu's wi, not wi_0/wi_1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unexpected tensors for a T5 model"):
        checkpoint.load_hf(tmp_path / "t5")
    cfg["model_type"] = "bart"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type: expected one of .*'t5'.* got 'bart'"):
        checkpoint.load_hf(tmp_path / "t5")


# --- the docstring examples and the command line -----------------------------------

def test_docstring_examples():
    import doctest
    from minillm import bleu
    for mod in (t5, bleu):
        assert doctest.testmod(mod).failed == 0, mod.__name__


def test_train_t5_cli_at_tiny_size(tmp_path):
    import subprocess
    import sys
    lines = ["O Romeo, Romeo! wherefore art thou Romeo?", "Deny thy father and refuse thy name;",
             "Or, if thou wilt not, be but sworn my love,", "And I'll no longer be a Capulet.",
             "'Tis but thy name that is my enemy;", "Thou art thyself, though not a Montague."]
    (tmp_path / "text.txt").write_text("\n".join(lines * 8) + "\n", encoding="utf-8")
    argv = [sys.executable, "-m", "minillm", "train", "t5", "--data", str(tmp_path / "text.txt"),
            "--pretrain-steps", "2", "--max-steps", "2", "--eval-lines", "3", "--batch-size", "4",
            "--out", str(tmp_path / "run")]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "exact match" in r.stdout and "copy the source" in r.stdout
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0 <= results["t5_exact_match"] <= 1 and results["t5_cer"] >= 0 and results["pretrain_steps"] == 2
    config, _ = checkpoint.load_hf(tmp_path / "run" / "hf-t5", device="cpu")
    assert config.feed_forward_proj == "gated-gelu"
    bad = subprocess.run(argv[:4] + ["t5", "--resume"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--resume does not apply" in bad.stderr
