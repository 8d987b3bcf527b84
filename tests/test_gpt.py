"""gpt.py: the whole model's backward against finite differences for every variant,
causality, overfitting, generation with and without the KV cache, and clear errors."""
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from helpers import assert_alive, assert_close, assert_gradcheck, np_, on, scaled
from minillm import backend, gpt
from minillm.backend import array_module
from minillm.backprop import check_dict_gradients, softmax_cross_entropy_backward, softmax_cross_entropy_forward
from strategies import seeds


def init_cpu(cfg, seed, dtype=np.float32):
    """Parameters on the CPU (tests move them with on(xp, ...) where the device matters)."""
    return gpt.init_params(cfg, seed, dtype=dtype, device="cpu")

# The axes of variation: norm (layernorm / rmsnorm), positions (learned / rope), MLP (gelu /
# swiglu), attention (MHA / GQA / MQA), bias or none (LayerNorm without bias included),
# tied or untied head. Each value of each axis is in at least one named case below.
VARIANTS = {
    "gpt2": dict(),                                                          # learned, LayerNorm, GELU, MHA
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, bias=False, tie_embeddings=False),
    "rope_gelu_gqa": dict(pos="rope", n_kv_head=2),
    "learned_rms_swiglu": dict(norm="rmsnorm", mlp="swiglu", bias=False),
    "untied_gqa": dict(n_kv_head=2, tie_embeddings=False),
    "mqa_no_bias_layernorm": dict(n_kv_head=1, bias=False),                  # LayerNorm without its bias
}


class Shape(NamedTuple):
    """What a whole-model check draws; tiny_case builds the model and the batch from it."""
    n_head: int        # 2 (head size 4) or 4 (head size 2); GQA variants always get 4
    vocab: int
    T: int             # >= 2: at T = 1 attention has one key and nothing to weigh
    B: int             # >= 2: a gradient summed over the batch (wpe's) must see every row
    n_layer: int
    extra_block: int   # block_size - T: position rows that get no gradient
    seed: int


# Width 8 throughout: LayerNorm over 2 or 4 features is nearly a step function (x - mean is
# +-(x1 - x2)/2), whose huge higher derivatives would defeat any finite difference. An MLP
# 8 wide keeps every entry of every parameter checkable in a few seconds.
shapes = st.builds(Shape, n_head=st.sampled_from([2, 4]), vocab=st.integers(3, 6), T=st.integers(2, 4),
                   B=st.integers(2, 3), n_layer=st.integers(1, 2), extra_block=st.integers(0, 1), seed=seeds)
# Explicit first cases, so that the ci profile's few draws (which start from the smallest
# shape: 1 layer, T = 2, B = 2, V = 3) are not all minimal: the two-layer ones prove that
# gradients pass from block to block and land under the right layer's names.
RICH = Shape(n_head=2, vocab=5, T=4, B=2, n_layer=1, extra_block=1, seed=11)
TWO_LAYERS = Shape(n_head=4, vocab=4, T=3, B=3, n_layer=2, extra_block=1, seed=7)


def tiny_case(variant, shape, **extra):
    """A tiny GPT (float64, weights perturbed away from init so every gradient is sizable),
    a batch of ids and next-token targets: about a quarter ignored, but at least one counted
    in every row (a row with none sends no gradient anywhere)."""
    kw = dict(VARIANTS[variant], **extra)
    n_kv = kw.get("n_kv_head")
    n_head = 4 if n_kv is not None and n_kv > 1 else shape.n_head   # GQA needs H > Hkv > 1
    V, T, B = shape.vocab, shape.T, shape.B
    cfg = gpt.GPTConfig(vocab_size=V, block_size=T + shape.extra_block, n_layer=shape.n_layer, n_head=n_head,
                        n_embd=8, mlp_hidden=8, **kw)
    if n_kv is not None:          # the variant is what it says: MQA (1) or GQA (1 < Hkv < H)
        assert cfg.kv_heads == n_kv < cfg.n_head
    rng = np.random.default_rng(shape.seed)
    params = init_cpu(cfg, shape.seed, dtype=np.float64)
    params = {k: v + rng.standard_normal(v.shape) * 0.3 for k, v in params.items()}
    idx = rng.integers(0, V, (B, T))
    targets = rng.integers(0, V, (B, T))
    targets[rng.random((B, T)) < 0.25] = -100
    targets[np.arange(B), rng.integers(0, T, B)] = rng.integers(0, V, B)   # one counted per row at least
    return cfg, params, idx, targets


def per_token_loss(logits, targets):
    """Each counted token's term of the mean cross-entropy (0 where ignored): their sum is the loss."""
    from minillm.backprop import log_softmax
    logp = log_softmax(logits)
    xp = array_module(logp)
    keep = targets != -100
    picked = xp.take_along_axis(logp, xp.where(keep, targets, 0)[..., None], axis=-1)[..., 0]
    return -xp.where(keep, picked, 0) / max(int(keep.sum()), 1)


def logits_with_the_same_masks(p, cfg, idx, train, rng):
    """The logits under the dropout masks gpt.loss_and_grads draws from rng(): the batch's from
    one generator, or, when it cuts the batch into shards (several threads), each shard's
    from its own generator seeded by one of the seeds drawn from rng() (loss_and_grads_in_shards)."""
    B = idx.shape[0]
    shards = backend.batch_shards(B, array_module(idx))
    if not (train and cfg.dropout > 0) or shards == 1:
        return gpt.forward(p, cfg, idx, train=train, rng=rng())[0]
    seeds = rng().integers(2**63, size=shards)
    parts = [gpt.forward(p, cfg, idx[lo:hi], train=train, rng=np.random.default_rng(int(seed)))[0]
             for (lo, hi), seed in zip(backend.shard_bounds(B, shards), seeds)]
    return array_module(parts[0]).concatenate(parts)


def _gradcheck(xp, cfg, params, idx, targets, train=False, dropout_seed=None):
    params = {k: on(xp, v) for k, v in params.items()}
    idx, targets = on(xp, idx, targets)

    def rng():
        return None if dropout_seed is None else np.random.default_rng(dropout_seed)

    loss, grads = gpt.loss_and_grads(params, cfg, idx, targets, train=train, rng=rng())
    assert set(grads) == set(params)
    for k in params:
        assert grads[k].shape == params[k].shape and grads[k].dtype == params[k].dtype, k
    # Every row counts somewhere, the loss is not 0, and every parameter has a gradient.
    assert np.all(np.any(np_(targets) != -100, axis=1)), np_(targets)
    assert_alive(grads, loss=loss)

    # The same dropout masks at every evaluation (a fresh generator with the same seed),
    # so the function being differentiated is fixed. The loss is returned per token (its
    # sum is the mean loss): the checker differences each token's term before summing,
    # so round-off scales with the terms that move, not with the logsumexps inside the
    # whole loss. That lets eps stay at 1e-4, where the stencil's truncation error
    # (~eps^4) is negligible; at eps 1e-3 some drawn models reached 3.6e-5 (llama).
    def f(p):
        return per_token_loss(logits_with_the_same_masks(p, cfg, idx, train, rng), targets)

    # Every entry of every parameter. The key bias's gradient is exactly 0 (softmax ignores
    # a shift of a query's scores), so its numeric side is pure round-off: the checker's
    # resolution floor judges it on absolute error.
    rep = check_dict_gradients(f, params, grads)
    assert_gradcheck(rep)
    return loss


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@settings(max_examples=scaled(1))
@example(shape=RICH)
@given(shape=shapes)
def test_whole_model_gradients_match_finite_differences(xp, variant, shape):
    _gradcheck(xp, *tiny_case(variant, shape))


@settings(max_examples=scaled(1))
@example(shape=TWO_LAYERS, variant="llama", seed=3, p=0.5)
@given(shape=shapes, variant=st.sampled_from(sorted(VARIANTS)), seed=seeds, p=st.sampled_from([0.1, 0.5]))
def test_gradients_with_dropout_for_fixed_masks(xp, shape, variant, seed, p):
    cfg, params, idx, targets = tiny_case(variant, shape, dropout=p)
    _gradcheck(xp, cfg, params, idx, targets, train=True, dropout_seed=seed)


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_gradients_of_a_batch_in_three_shards_match_finite_differences(variant):
    """On three threads loss_and_grads runs each of the 3 rows as its own shard, dropout
    drawn per shard: the gradient it adds up is still the whole batch's, entry by entry."""
    before = backend.num_threads()
    backend.set_num_threads(3)
    try:
        cfg, params, idx, targets = tiny_case(variant, TWO_LAYERS, dropout=0.3)
        if backend.batch_shards(idx.shape[0]) != 3:
            pytest.skip("NumPy's BLAS thread count cannot be set here: batches are not cut into shards")
        _gradcheck(np, cfg, params, idx, targets, train=True, dropout_seed=5)
    finally:
        backend.set_num_threads(before)


@settings(max_examples=scaled(1))
@example(shape=TWO_LAYERS, variant="gpt2", pads=(0, 1, 2))
@given(shape=shapes, variant=st.sampled_from(["llama", "gpt2"]),       # RoPE, then learned positions
       pads=st.lists(st.integers(0, 3), min_size=3, max_size=3))
def test_left_padded_batch_gradients_match_finite_differences(xp, shape, variant, pads):
    """A left-padded batch (attention_mask): positions restart after each row's padding
    (learned rows or RoPE angles per row), pad keys get no attention, pad targets do not count."""
    cfg, params, idx, targets = tiny_case(variant, shape)
    B, T = idx.shape
    n_pad = np.array([min(n, T - 1) for n in pads[:B]])
    n_pad[0] = 0                                                   # one row unpadded,
    n_pad[-1] = max(n_pad[-1], 1)                                  # one padded
    mask = np.arange(T)[None, :] >= n_pad[:, None]                 # (B, T), False at the left pads
    targets = np.where(mask, targets, -100)
    targets[np.arange(B), T - 1] = idx[:, 0]                       # the last token of every row counts
    params = {k: on(xp, v) for k, v in params.items()}
    idx, targets, mask = on(xp, idx, targets, mask)

    def f(p):
        return per_token_loss(gpt.forward(p, cfg, idx, attention_mask=mask)[0], targets)

    logits, cache = gpt.forward(params, cfg, idx, attention_mask=mask)
    loss, ce = softmax_cross_entropy_forward(logits, targets)
    grads = gpt.backward(softmax_cross_entropy_backward(logits.dtype.type(1.0), ce), cache)
    assert_close(xp.sum(f(params)), loss, rtol=1e-12)
    assert_alive(grads, loss=loss)
    assert_gradcheck(check_dict_gradients(f, params, grads))


@settings(max_examples=scaled(6))
@given(shape=shapes, variant=st.sampled_from(sorted(VARIANTS)), data=st.data())
def test_logits_at_t_ignore_tokens_after_t(xp, shape, variant, data):
    idx = np.random.default_rng(shape.seed).integers(0, 9, (shape.B, shape.T + data.draw(st.integers(0, 2))))
    B, T = idx.shape
    t = data.draw(st.integers(0, T - 2), label="t")   # some positions after t, whose change must not leak
    cfg = gpt.GPTConfig(vocab_size=9, block_size=T, n_layer=2, n_head=2, n_embd=8, **VARIANTS[variant])
    params = {k: on(xp, v) for k, v in init_cpu(cfg, 1, dtype=np.float64).items()}
    changed = idx.copy()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1 + np.arange(T - t - 1)) % 9
    a, _ = gpt.forward(params, cfg, on(xp, idx % 9))
    b, _ = gpt.forward(params, cfg, on(xp, changed % 9))
    assert_close(a[:, :t + 1], b[:, :t + 1], rtol=1e-12, atol=1e-12)
    # and the model does look at the past: later positions change
    assert not np.allclose(np_(a[:, t + 1:]), np_(b[:, t + 1:]))


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_overfits_one_small_batch(xp, variant):
    from minillm.optim import AdamW
    cfg = gpt.GPTConfig(vocab_size=12, block_size=8, n_layer=2, n_head=2, n_embd=16, **VARIANTS[variant])
    params = {k: on(xp, v) for k, v in init_cpu(cfg, 0).items()}
    rng = np.random.default_rng(0)
    idx = on(xp, rng.integers(0, 12, (2, 8)))
    targets = on(xp, rng.integers(0, 12, (2, 8)))      # random targets: only memorisation can fit them
    opt = AdamW(params, lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(150):
        loss, grads = gpt.loss_and_grads(params, cfg, idx, targets)
        first = loss if first is None else first
        opt.step(grads)
    assert first > 2.0 and loss < 0.05, (first, loss)


def test_init_follows_gpt2(xp):
    cfg = gpt.GPTConfig(vocab_size=50, block_size=16, n_layer=8, n_head=4, n_embd=64)
    p = init_cpu(cfg, 0)
    assert all(v.dtype == np.float32 for v in p.values())
    assert np.std(p["h.0.attn.w_qkv"]) == pytest.approx(0.02, rel=0.05)
    assert np.std(p["h.3.attn.w_o"]) == pytest.approx(0.02 / 4, rel=0.05)     # 1/sqrt(2 * 8)
    assert np.std(p["h.3.mlp.w2"]) == pytest.approx(0.02 / 4, rel=0.05)
    assert np.all(p["h.1.ln_1.weight"] == 1) and np.all(p["h.1.attn.b_qkv"] == 0)
    q = init_cpu(cfg, 0)
    assert all(np.array_equal(p[k], q[k]) for k in p)                     # reproducible from the seed
    assert gpt.num_params(p) == sum(v.size for v in p.values())


@pytest.mark.parametrize("variant", ["gpt2", "llama", "rope_gelu_gqa"])
def test_greedy_generation_is_the_same_with_and_without_the_kv_cache(xp, variant):
    cfg = gpt.GPTConfig(vocab_size=11, block_size=10, n_layer=2, n_head=4, n_embd=16, **VARIANTS[variant])
    rng = np.random.default_rng(3)
    params = {k: on(xp, (v + rng.standard_normal(v.shape) * 0.5).astype(np.float32))
              for k, v in init_cpu(cfg, 3).items()}
    # 4 + 12 tokens > block_size: the context window slides past the cache's end too.
    a = gpt.generate(params, cfg, [1, 2, 3, 4], 12, temperature=0)
    b = gpt.generate(params, cfg, [1, 2, 3, 4], 12, temperature=0, use_cache=False)
    assert a == b and len(a) == 16 and a[:4] == [1, 2, 3, 4]
    # sampling with a seed is reproducible and also cache-independent
    s = gpt.generate(params, cfg, [5], 6, temperature=0.8, top_k=5, top_p=0.9, seed=7)
    assert s == gpt.generate(params, cfg, [5], 6, temperature=0.8, top_k=5, top_p=0.9, seed=7, use_cache=False)
    # a left-padded batch gives each row what it gets alone
    batch = gpt.generate(params, cfg, [[1, 2], [3, 4, 5, 6]], 5, temperature=0)
    assert batch == [gpt.generate(params, cfg, [1, 2], 5, temperature=0),
                     gpt.generate(params, cfg, [3, 4, 5, 6], 5, temperature=0)]


def test_cached_forward_equals_the_full_forward(xp):
    from minillm.attention import KVCache
    cfg = gpt.GPTConfig(vocab_size=13, block_size=9, n_layer=2, n_head=2, n_embd=8, pos="rope", n_kv_head=1)
    params = {k: on(xp, v) for k, v in init_cpu(cfg, 2, dtype=np.float64).items()}
    idx = on(xp, np.random.default_rng(0).integers(0, 13, (2, 9)))
    full, _ = gpt.forward(params, cfg, idx)
    dec = gpt.GPTDecoder(params, cfg)
    cache = dec.new_cache(2, 9)
    parts = [dec.logits(idx[:, :4], cache), dec.logits(idx[:, 4:5], cache), dec.logits(idx[:, 5:], cache)]
    assert_close(xp.concatenate(parts, axis=1), full, rtol=1e-10, atol=1e-12)
    assert isinstance(cache, KVCache) and cache.length(0) == 9


def test_bad_input_gets_clear_errors(xp):
    cfg = gpt.GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=2, n_embd=8)
    params = {k: on(xp, v) for k, v in init_cpu(cfg, 0).items()}
    with pytest.raises(ValueError, match=r"idx: expected at most block_size=4 positions, got 5"):
        gpt.forward(params, cfg, on(xp, np.zeros((1, 5), dtype=np.int64)))
    with pytest.raises(ValueError, match=r"idx: expected ids in \[0, 10\).*got 10"):
        gpt.forward(params, cfg, on(xp, np.array([[1, 10]])))
    with pytest.raises(ValueError, match=r"idx: expected ids in \[0, 10\).*got -1"):
        gpt.forward(params, cfg, on(xp, np.array([[-1, 2]])))
    with pytest.raises(TypeError, match="idx"):
        gpt.forward(params, cfg, on(xp, np.zeros((1, 2))))
    with pytest.raises(ValueError, match=r"idx: expected shape \(B, T\)"):
        gpt.forward(params, cfg, on(xp, np.zeros(3, dtype=np.int64)))
    with pytest.raises(ValueError, match=r"targets: expected shape \(1, 2\)"):
        gpt.loss_and_grads(params, cfg, on(xp, np.zeros((1, 2), dtype=np.int64)),
                           on(xp, np.zeros((1, 3), dtype=np.int64)))
    broken = dict(params)
    del broken["h.0.attn.w_o"]
    with pytest.raises(ValueError, match=r"params: .*missing \['h.0.attn.w_o'\]"):
        gpt.forward(broken, cfg, on(xp, np.zeros((1, 2), dtype=np.int64)))
    broken = dict(params, **{"h.0.mlp.w1": params["h.0.mlp.w1"][:, :5]})
    with pytest.raises(ValueError, match=r"params\['h.0.mlp.w1'\]: expected shape \(8, 32\), got \(8, 5\)"):
        gpt.forward(broken, cfg, on(xp, np.zeros((1, 2), dtype=np.int64)))
    broken = dict(params, **{"ln_f.weight": params["ln_f.weight"].astype(np.float64)})
    with pytest.raises(TypeError, match=r"params\['ln_f.weight'\]: expected dtype float32"):
        gpt.forward(broken, cfg, on(xp, np.zeros((1, 2), dtype=np.int64)))


@pytest.mark.parametrize("kw, match", [
    (dict(n_embd=10, n_head=4), "n_head: expected a divisor of n_embd=10"),
    (dict(n_kv_head=3), "n_kv_head: expected a divisor of n_head=4"),
    (dict(norm="batchnorm"), "norm: expected one of"),
    (dict(pos="alibi"), "pos: expected one of"),
    (dict(mlp="relu"), "mlp: expected one of"),
    (dict(dropout=1.0), "dropout: expected a probability"),
    (dict(vocab_size=0), "vocab_size: expected a positive int"),
    (dict(pos="rope", n_embd=12, n_head=4), "head size"),
])
def test_bad_configs_are_refused(kw, match):
    base = dict(vocab_size=10, block_size=4, n_layer=1, n_head=4, n_embd=16)
    with pytest.raises(ValueError, match=match):
        gpt.GPTConfig(**{**base, **kw})


def test_config_round_trips_through_a_dict():
    cfg = gpt.GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=4, n_embd=16, pos="rope", n_kv_head=2)
    assert gpt.GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown GPTConfig fields"):
        gpt.GPTConfig.from_dict({**cfg.to_dict(), "n_ctx": 3})


# --- the command line: train, resume, sample ------------------------------------

def test_train_resume_and_sample_from_the_command_line(tmp_path, capsys, monkeypatch):
    from minillm.__main__ import main
    from minillm.train import load_checkpoint
    monkeypatch.setenv("MINILLM_DEVICE", "cpu")
    text = tmp_path / "poem.txt"
    text.write_text("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n" * 20)
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(text), "--out", str(out), "--max-steps", "3",
                 "--eval-interval", "2", "--sample-tokens", "20"]) == 0
    said = capsys.readouterr().out
    for words in ("corpus:", "tokenizer: CharTokenizer", "parameters", "device: cpu", "final:", "checkpoint:",
                  "loss.svg", "sample"):
        assert words in said, words
    assert load_checkpoint(out)["step"] == 3 and (out / "loss.svg").is_file()
    assert main(["train", "--resume", "--out", str(out), "--max-steps", "5", "--sample-tokens", "0"]) == 0
    assert "resuming" in capsys.readouterr().out and load_checkpoint(out)["step"] == 5
    args = ["sample", "--checkpoint", str(out), "--prompt", "Thou", "--max-new-tokens", "12", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[:3] == first.splitlines()[:3]   # same seed, same text
    assert "Thou" in first
    # Without --checkpoint: the newest GPT run under ./runs, even when a newer non-GPT run sits there.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    out.rename(tmp_path / "runs" / "gpt-a")
    other = tmp_path / "runs" / "bert-b"
    other.mkdir()
    (other / "checkpoint.npz").write_bytes(b"not a GPT")
    (other / "checkpoint.json").write_text('{"model_config": {"hidden_size": 8}}')
    assert main(["sample", "--max-new-tokens", "3", "--seed", "1"]) == 0
    assert "gpt-a" in capsys.readouterr().out


@pytest.mark.parametrize("command, options", [
    ("train", ["--preset", "--tokenizer", "--data", "--device", "--max-steps", "--out", "--resume", "--seed",
               "--eval-interval", "--batch-size", "--block-size", "--lr", "shakespeare-char"]),
    ("sample", ["--checkpoint", "--prompt", "--max-new-tokens", "--temperature", "--top-k", "--seed"]),
])
def test_every_option_has_help(command, options, capsys):
    from minillm.__main__ import main
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for o in options:
        assert o in text, o


# ---------------------------------------------------------------------------
# A second road into the final hidden state (reward/value heads, Medusa)
# ---------------------------------------------------------------------------

@settings(max_examples=scaled(2))
@example(shape=TWO_LAYERS, variant="llama", seed=1, with_logits=False)
@example(shape=RICH, variant="gpt2", seed=2, with_logits=True)
@given(shape=shapes, variant=st.sampled_from(sorted(VARIANTS)), seed=seeds, with_logits=st.booleans())
def test_backward_accepts_a_gradient_into_the_final_hidden_state(xp, with_logits, shape, variant, seed):
    """L = sum(r * (xf @ u)) [+ sum(g * logits)]: a scalar head on gpt's final hidden state.
    backward(dlogits or None, cache, dhidden=...) must give its exact gradient."""
    cfg, params, idx, _ = tiny_case(variant, shape)
    params = {k: on(xp, v) for k, v in params.items()}
    B, T = idx.shape
    idx = on(xp, idx)
    rng = np.random.default_rng(seed)
    u, r, g = on(xp, rng.standard_normal(cfg.n_embd), rng.standard_normal((B, T)),
                 rng.standard_normal((B, T, cfg.vocab_size)))

    def objective(p):
        logits, cache = gpt.forward(p, cfg, idx)
        terms = [(cache.xf @ u * r).reshape(-1)]
        if with_logits:
            terms.append((logits * g).reshape(-1))
        return xp.concatenate(terms)

    _, cache = gpt.forward(params, cfg, idx)
    dhidden = r[:, :, None] * u                                   # (B, T, C)
    grads = gpt.backward(g if with_logits else None, cache, dhidden=dhidden)
    assert float(xp.abs(grads["wte"]).max()) > 0
    assert_gradcheck(check_dict_gradients(objective, params, grads))
    with pytest.raises(ValueError, match=r"dhidden: expected shape"):
        gpt.backward(None, cache, dhidden=dhidden[:, :, :-1])
    with pytest.raises(ValueError, match="dlogits: expected an array"):
        gpt.backward(None, cache)
