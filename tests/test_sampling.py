"""sampling.py: logits processors, sampling, generation with a KV cache, beam
search, speculative decoding.

Two toy decoders stand in for a model: a bigram table (the next-token
distribution depends on the last token only, so exact sequence probabilities are
known, which is what the chi-square tests need) and one causal attention layer
with learned positions and a real KV cache (attention.KVCache), which is what the
cache, padding and sliding-window tests need.
"""
import itertools
import math

import numpy as np
import pytest
from hypothesis import assume, example, given, strategies as st

from helpers import np_, on
from minillm import sampling as S
from minillm.attention import KVCache
from strategies import randn, seeds


# ---------------------------------------------------------------------------
# Toy decoders
# ---------------------------------------------------------------------------

class _CountingCache:
    def __init__(self, batch_size, max_len):
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0


class BigramDecoder:
    """logits(next | context) = table[last token]. Its cache only counts positions,
    and it checks that the loop keeps the protocol (mask widths, capacity)."""

    def __init__(self, xp, table, block_size=64):
        self.xp = xp
        self.table = on(xp, np.asarray(table, dtype=np.float64))
        self.vocab_size = self.table.shape[0]
        self.block_size = block_size
        self.calls = 0

    def probs(self):
        t = np_(self.table)
        e = np.exp(t - t.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def new_cache(self, batch_size, max_len):
        assert 1 <= max_len <= self.block_size
        return _CountingCache(batch_size, max_len)

    def logits(self, ids, cache=None, attention_mask=None):
        self.calls += 1
        B, T = ids.shape
        assert T <= self.block_size
        if cache is not None:
            assert B == cache.batch_size
            assert attention_mask.shape == (B, cache.length + T)
            cache.length += T
            assert cache.length <= cache.max_len
        elif attention_mask is not None:
            assert attention_mask.shape == (B, T)
        return self.table[ids]

    def crop_cache(self, cache, length):
        cache.length = min(cache.length, length)

    def reorder_cache(self, cache, index):
        cache.batch_size = len(index)


class AttnDecoder:
    """One causal single-head attention layer with learned positions and a residual.

    Its cache is attention.KVCache (the sampling loops then use the cache's own
    crop/reorder). Pad keys (attention_mask False) get no attention, positions are
    cumsum(mask) - 1, so a left-padded row computes what it would alone.
    """

    def __init__(self, xp, V=7, C=8, block_size=12, seed=0, scale=1.0):
        rng = np.random.default_rng(seed)
        self.xp, self.vocab_size, self.block_size, self.C = xp, V, block_size, C
        self.wte, self.wpe, self.wq, self.wk, self.wv, self.wo = on(
            xp, rng.standard_normal((V, C)), rng.standard_normal((block_size, C)),
            rng.standard_normal((C, C)) / np.sqrt(C), rng.standard_normal((C, C)) / np.sqrt(C),
            rng.standard_normal((C, C)) / np.sqrt(C), rng.standard_normal((C, V)) * scale)
        self.calls = 0

    def new_cache(self, batch_size, max_len):
        assert max_len <= self.block_size
        return KVCache(1, batch_size, 1, max_len, self.C, dtype=np.float64, xp=self.xp)

    def logits(self, ids, cache=None, attention_mask=None):
        xp = self.xp
        self.calls += 1
        B, T = ids.shape
        past = cache.length(0) if cache is not None else 0
        mask = attention_mask if attention_mask is not None else xp.ones((B, past + T), dtype=bool)
        assert mask.shape == (B, past + T) and past + T <= self.block_size
        pos = xp.maximum(xp.cumsum(mask, axis=1) - 1, 0)[:, past:]
        x = self.wte[ids] + self.wpe[pos]
        q, k, v = x @ self.wq, x @ self.wk, x @ self.wv
        if cache is not None:
            k, v = cache.append(0, k[:, None], v[:, None])
            k, v = k[:, 0], v[:, 0]
        s = q @ k.transpose(0, 2, 1) / np.sqrt(self.C)
        j = xp.arange(past + T)[None, None, :]
        i = xp.arange(T)[None, :, None] + past
        allowed = (mask[:, None, :] & (j <= i)) | (j == i)   # a pad query still sees itself: no NaN
        s = xp.where(allowed, s, -np.inf)
        a = xp.exp(s - s.max(-1, keepdims=True))
        a = a / a.sum(-1, keepdims=True)
        return (x + a @ v) @ self.wo


def _bigram(xp, V, seed, scale=1.0, block_size=64):
    return BigramDecoder(xp, np.random.default_rng(seed).standard_normal((V, V)) * scale, block_size)


# ---------------------------------------------------------------------------
# Chi-square p-value without scipy: the regularized upper incomplete gamma
# ---------------------------------------------------------------------------

def _gamma_q(a, x):
    """Q(a, x) = Gamma(a, x) / Gamma(a): series for x < a + 1, continued fraction beyond."""
    if x <= 0:
        return 1.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        n = a
        for _ in range(10_000):
            n += 1
            term *= x / n
            total += term
            if abs(term) < abs(total) * 1e-16:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    tiny = 1e-300
    b = x + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return math.exp(log_front) * h


def chi_square_pvalue(counts, probs):
    """Pearson's test of observed counts against probabilities; cells expected
    below 5 are pooled into one so the chi-square approximation holds."""
    counts, probs = np.asarray(counts, float), np.asarray(probs, float)
    if counts[probs == 0].sum() > 0:
        return 0.0                                               # a draw landed on an impossible outcome
    counts, probs = counts[probs > 0], probs[probs > 0]
    n = counts.sum()
    exp_ = probs * n
    small = exp_ < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        exp_ = np.append(exp_[~small], exp_[small].sum())
    chi2 = float(((counts - exp_) ** 2 / exp_).sum())
    df = len(counts) - 1
    return _gamma_q(df / 2.0, chi2 / 2.0)


def test_chi_square_pvalue_matches_closed_forms():
    for x in (0.1, 1.0, 3.0, 10.0, 40.0):
        assert math.isclose(_gamma_q(1.0, x / 2), math.exp(-x / 2), rel_tol=1e-10)             # df = 2
        assert math.isclose(_gamma_q(0.5, x / 2), math.erfc(math.sqrt(x / 2)), rel_tol=1e-9)   # df = 1
        # df = 4: Q(2, x/2) = exp(-x/2) (1 + x/2)
        assert math.isclose(_gamma_q(2.0, x / 2), math.exp(-x / 2) * (1 + x / 2), rel_tol=1e-10)


# ---------------------------------------------------------------------------
# Processors
# ---------------------------------------------------------------------------

def _distinct_logits(seed, n, V):
    """Rows of distinct values (ties aside, as the properties state)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(V) * 0.37 + rng.standard_normal(V) * 0.01 for _ in range(n)])


def _alive(x):
    return np.isfinite(np_(x))


@given(seed=seeds, V=st.integers(1, 12), k=st.integers(1, 14))
def test_top_k_keeps_the_k_largest(xp, seed, V, k):
    x = _distinct_logits(seed, 3, V)
    y = np_(S.top_k_filter(on(xp, x), k))
    kept = np.isfinite(y)
    assert (kept.sum(1) == min(k, V)).all()
    np.testing.assert_array_equal(y[kept], x[kept])              # kept logits unchanged
    for r in range(3):
        if (~kept[r]).any():
            assert x[r][kept[r]].min() > x[r][~kept[r]].max()


def test_top_k_keeps_ties_with_the_kth_value(xp):
    y = np_(S.top_k_filter(on(xp, np.array([3.0, 1.0, 1.0, 0.0])), 2))
    np.testing.assert_array_equal(np.isfinite(y), [True, True, True, False])


@given(seed=seeds, V=st.integers(1, 12), p=st.floats(0.01, 1.0))
def test_top_p_keeps_the_minimal_nucleus(xp, seed, V, p):
    x = _distinct_logits(seed, 3, V) * 2
    y = np_(S.top_p_filter(on(xp, x), p))
    probs = np.exp(x - x.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for r in range(3):
        kept = np.isfinite(y[r])
        mass = probs[r][kept].sum()
        assume(abs(mass - p) > 1e-9)                             # stay off the exact boundary
        assert mass >= p - 1e-12                                 # reaches p ...
        assert mass - probs[r][kept].min() < p                   # ... and no smaller set would
        if (~kept).any():
            assert x[r][kept].min() > x[r][~kept].max()          # and it is the most likely tokens


@given(seed=seeds, V=st.integers(1, 12), m=st.floats(0.0, 1.0))
def test_min_p_keeps_tokens_above_a_fraction_of_the_top(xp, seed, V, m):
    x = randn(seed, 2, V, scale=2.0)
    y = np_(S.min_p_filter(on(xp, x), m))
    probs = np.exp(x - x.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    want = probs >= m * probs.max(1, keepdims=True)
    np.testing.assert_array_equal(np.isfinite(y), want)


@given(seed=seeds, V=st.integers(2, 8))
def test_temperature_to_zero_tends_to_the_argmax(xp, seed, V):
    x = _distinct_logits(seed, 2, V)                             # gaps >= 0.3 between values
    top = []
    for t in (4.0, 1.0, 0.5, 0.1, 0.01):
        z = np_(S.apply_temperature(on(xp, x), t))
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        top.append(p[np.arange(2), x.argmax(1)])
    top = np.array(top)
    assert (np.diff(top, axis=0) >= -1e-12).all()                # sharper as T falls
    assert (top[-1] > 0.999).all()
    np.testing.assert_array_equal(np_(S.greedy(on(xp, x))), x.argmax(1))


@st.composite
def _processor_case(draw):
    V = draw(st.integers(1, 10))
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, V)) * 3
    x[rng.random((3, V)) < 0.4] = -np.inf                        # already-removed tokens
    x[np.arange(3), rng.integers(0, V, 3)] = rng.standard_normal(3)   # at least one alive per row
    prev = rng.integers(0, V, (3, 4))
    kw = dict(temperature=draw(st.sampled_from([0.0, 0.3, 1.0, 2.0])),
              top_k=draw(st.one_of(st.none(), st.integers(1, 12))),
              top_p=draw(st.one_of(st.none(), st.floats(1e-6, 1.0))),
              min_p=draw(st.one_of(st.none(), st.floats(0.0, 1.0))),
              repetition_penalty=draw(st.one_of(st.none(), st.floats(0.5, 3.0))),
              frequency_penalty=draw(st.floats(-1.0, 2.0)), presence_penalty=draw(st.floats(-1.0, 2.0)))
    return x, prev, kw


@given(case=_processor_case())
def test_no_processor_removes_every_token(xp, case):
    x, prev, kw = case
    xs, ps = on(xp, x, prev)
    outs = [S.top_k_filter(xs, kw["top_k"] or 1), S.top_p_filter(xs, kw["top_p"] or 1.0),
            S.min_p_filter(xs, kw["min_p"] or 0.0), S.apply_temperature(xs, kw["temperature"] or 1.0),
            S.repetition_penalty(xs, ps, kw["repetition_penalty"] or 1.0),
            S.frequency_penalty(xs, ps, kw["frequency_penalty"]),
            S.presence_penalty(xs, ps, kw["presence_penalty"]),
            S.process_logits(xs, ps, **kw)]
    for y in outs:
        assert y.shape == x.shape and y.dtype == x.dtype
        assert _alive(y).any(axis=-1).all()
        assert not (_alive(y) & ~_alive(x)).any()               # nothing removed comes back
    # Filters keep the most likely token of every row.
    best = x.argmax(1)
    for y in outs[:3]:
        assert _alive(y)[np.arange(3), best].all()


def test_processors_keep_dtype_and_shape(xp):
    x = on(xp, randn(0, 2, 3, 6).astype(np.float32))
    prev = on(xp, np.zeros((2, 3, 2), dtype=np.int64))
    for y in (S.apply_temperature(x, 0.7), S.top_k_filter(x, 2), S.top_p_filter(x, 0.5),
              S.min_p_filter(x, 0.1), S.repetition_penalty(x, prev, 1.2),
              S.frequency_penalty(x, prev, 0.3), S.presence_penalty(x, prev, 0.3)):
        assert y.dtype == np.float32 and y.shape == (2, 3, 6)


def test_penalties_follow_their_rules(xp):
    x = np.array([[2.0, -1.0, 0.5, -3.0, 1.0]])
    prev = np.array([[0, 1, 1, 4, 3]])
    mask = np.array([[True, True, True, True, False]])           # token 3 is padding here
    xs, ps, ms = on(xp, x, prev, mask)
    rep = np_(S.repetition_penalty(xs, ps, 2.0, mask=ms))
    np.testing.assert_allclose(rep, [[1.0, -2.0, 0.5, -3.0, 0.5]])
    freq = np_(S.frequency_penalty(xs, ps, 0.5, mask=ms))
    np.testing.assert_allclose(freq, [[1.5, -2.0, 0.5, -3.0, 0.5]])
    pres = np_(S.presence_penalty(xs, ps, 0.5, mask=ms))
    np.testing.assert_allclose(pres, [[1.5, -1.5, 0.5, -3.0, 0.5]])
    np.testing.assert_array_equal(np_(S.token_counts(ps, 5, ms)), [[1, 2, 0, 0, 1]])


@given(seed=seeds, V=st.integers(2, 9))
def test_processors_match_transformers(xp, seed, V):
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(seed)
    x = _distinct_logits(seed, 3, V) * 1.5
    prev = rng.integers(0, V, (3, 5))
    tx, tprev = torch.tensor(x), torch.tensor(prev)
    xs, ps = on(xp, x, prev)
    k = int(rng.integers(1, V + 1))
    p = float(rng.uniform(0.05, 0.95))
    m = float(rng.uniform(0.0, 0.5))
    pairs = [(S.apply_temperature(xs, 0.7), lp.TemperatureLogitsWarper(0.7)),
             (S.top_k_filter(xs, k), lp.TopKLogitsWarper(k)),
             (S.top_p_filter(xs, p), lp.TopPLogitsWarper(p)),
             (S.min_p_filter(xs, m), lp.MinPLogitsWarper(m)),
             (S.repetition_penalty(xs, ps, 1.7), lp.RepetitionPenaltyLogitsProcessor(1.7))]
    for ours, hf in pairs:
        want = hf(tprev, tx.clone()).numpy()
        np.testing.assert_array_equal(np.isfinite(np_(ours)), np.isfinite(want), err_msg=type(hf).__name__)
        np.testing.assert_allclose(np_(ours)[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-12,
                                   err_msg=type(hf).__name__)


def test_process_logits_composes_in_hugging_face_order(xp):
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(3)
    x = _distinct_logits(3, 4, 9) * 1.3
    prev = rng.integers(0, 9, (4, 6))
    ours = np_(S.process_logits(on(xp, x), on(xp, prev), temperature=0.8, top_k=6, top_p=0.9,
                                min_p=0.05, repetition_penalty=1.3))
    chain = lp.LogitsProcessorList([lp.RepetitionPenaltyLogitsProcessor(1.3), lp.TemperatureLogitsWarper(0.8),
                                    lp.TopKLogitsWarper(6), lp.TopPLogitsWarper(0.9), lp.MinPLogitsWarper(0.05)])
    want = chain(torch.tensor(prev), torch.tensor(x)).numpy()
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(want))
    np.testing.assert_allclose(ours[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-12)


@given(seed=seeds, V=st.integers(2, 7), rep=st.sampled_from([1.0, 1.3]), freq=st.sampled_from([0.0, 0.4, -0.7]),
       pres=st.sampled_from([0.0, 0.6, -0.2]), temperature=st.sampled_from([1.0, 0.8]))
@example(seed=1, V=5, rep=1.3, freq=0.4, pres=0.6, temperature=0.8)
def test_process_logits_equals_its_processors_one_after_another(xp, seed, V, rep, freq, pres, temperature):
    # the composed path (one penalty from the counts) must do what the separate processors do
    rng = np.random.default_rng(seed)
    x = _distinct_logits(seed, 3, V)
    prev = rng.integers(0, V, (3, 4))
    xs, ps = on(xp, x, prev)
    ours = np_(S.process_logits(xs, ps, temperature=temperature, repetition_penalty=rep,
                                frequency_penalty=freq, presence_penalty=pres))
    want = S.repetition_penalty(xs, ps, rep)
    want = S.presence_penalty(S.frequency_penalty(want, ps, freq), ps, pres)
    want = np_(S.apply_temperature(want, temperature))
    np.testing.assert_allclose(ours, want, rtol=1e-12, atol=1e-12)


def test_processor_bad_input_names_the_argument(xp):
    x = on(xp, np.zeros((2, 4)))
    prev = on(xp, np.zeros((2, 3), dtype=np.int64))
    for fn, arg in [(lambda: S.top_p_filter(x, 0.0), "top_p"), (lambda: S.top_p_filter(x, 1.5), "top_p"),
                    (lambda: S.top_k_filter(x, 0), "top_k"), (lambda: S.top_k_filter(x, 2.5), "top_k"),
                    (lambda: S.apply_temperature(x, -1.0), "temperature"),
                    (lambda: S.apply_temperature(x, 0.0), "temperature"),
                    (lambda: S.min_p_filter(x, 1.5), "min_p"),
                    (lambda: S.repetition_penalty(x, prev, 0.0), "penalty"),
                    (lambda: S.repetition_penalty(x, prev[:1], 1.2), "prev_ids"),
                    (lambda: S.frequency_penalty(x, prev + 4, 1.0), "prev_ids")]:
        with pytest.raises(ValueError, match=arg):
            fn()
    with pytest.raises(TypeError, match="logits"):
        S.top_k_filter(on(xp, np.zeros((2, 4), dtype=np.int64)), 1)
    with pytest.raises(ValueError, match="logits"):
        S.sample(on(xp, np.full((2, 3), -np.inf)), 0)


# ---------------------------------------------------------------------------
# sample / greedy
# ---------------------------------------------------------------------------

def test_sample_draws_from_the_softmax(xp):
    x = np.array([0.3, -1.0, 1.2, 0.0, -np.inf, 0.5])
    n = 6000
    toks = np_(S.sample(on(xp, np.tile(x, (n, 1))), np.random.default_rng(11)))
    counts = np.bincount(toks, minlength=6)
    assert counts[4] == 0                                        # a removed token is never drawn
    p = np.exp(x - x[np.isfinite(x)].max())
    assert chi_square_pvalue(counts, p / p.sum()) > 1e-3
    # ... and the test has teeth: a wrong distribution is rejected.
    q = np.exp(0.8 * (x - x[np.isfinite(x)].max()))
    assert chi_square_pvalue(counts, q / q.sum()) < 1e-6


@given(seed=seeds)
def test_sample_is_reproducible_from_a_seed(xp, seed):
    x = on(xp, randn(seed, 4, 3, 7))
    a, b = S.sample(x, seed), S.sample(x, np.random.default_rng(seed))
    assert a.shape == (4, 3) and a.dtype == np.int64
    np.testing.assert_array_equal(np_(a), np_(b))


# ---------------------------------------------------------------------------
# The plain greedy loop: generate_greedy is what generate(temperature=0) computes
# ---------------------------------------------------------------------------

def test_generate_greedy_docstring_example_holds():
    import doctest
    result = doctest.testmod(S, verbose=False)
    assert result.attempted >= 2 and result.failed == 0


@st.composite
def tiny_gpt_case(draw):
    """A random tiny GPT behind the decoder protocol, a prompt and a number of new tokens
    (often more than fit in the context, so both loops must slide the window)."""
    from minillm import gpt
    n_head = draw(st.sampled_from([1, 2]))
    pos = draw(st.sampled_from(["learned", "rope"]))
    block_size = draw(st.integers(2, 8))
    cfg = gpt.GPTConfig(vocab_size=draw(st.integers(3, 12)), block_size=block_size,
                        n_layer=draw(st.integers(1, 2)), n_head=n_head,
                        n_embd=n_head * draw(st.sampled_from([2, 4])),
                        n_kv_head=draw(st.sampled_from([None, 1])), pos=pos,
                        norm=draw(st.sampled_from(["layernorm", "rmsnorm"])),
                        mlp=draw(st.sampled_from(["gelu", "swiglu"])),
                        tie_embeddings=draw(st.booleans()))
    seed = draw(seeds)
    plen = draw(st.integers(1, block_size))
    prompt = np.random.default_rng(seed).integers(0, cfg.vocab_size, plen).tolist()
    return cfg, seed, prompt, draw(st.integers(0, block_size + 4))


@given(case=tiny_gpt_case())
def test_generate_greedy_gives_the_ids_of_generate_at_temperature_zero(xp, case):
    from minillm import gpt
    cfg, seed, prompt, n_new = case
    params = gpt.init_params(cfg, seed=seed, dtype=np.float64, device="gpu" if xp is not np else "cpu")
    # GPT-2's init gives nearly uniform logits; larger weights make the choices context-dependent.
    params = {k: v * 10 if v.ndim == 2 else v for k, v in params.items()}
    dec = gpt.GPTDecoder(params, cfg)
    ids = S.generate_greedy(dec, prompt, n_new)
    assert len(ids) == len(prompt) + n_new and ids[:len(prompt)] == prompt
    assert all(type(t) is int and 0 <= t < cfg.vocab_size for t in ids)
    for use_cache in (True, False):
        assert S.generate(dec, prompt, n_new, temperature=0, use_cache=use_cache) == [ids]


@given(seed=seeds, n_new=st.integers(0, 20), plen=st.integers(1, 6))
def test_generate_greedy_equals_generate_on_the_toy_decoders(xp, seed, n_new, plen):
    prompt = np.random.default_rng(seed).integers(0, 7, plen).tolist()
    for dec in (AttnDecoder(xp, seed=seed, scale=3.0), _bigram(xp, 7, seed, scale=3.0)):
        ids = S.generate_greedy(dec, prompt, n_new)
        assert [ids] == S.generate(dec, prompt, n_new, temperature=0)
        assert [ids] == S.beam_search(dec, prompt, n_new, num_beams=1)
        calls = dec.calls
        S.generate_greedy(dec, np.asarray(prompt), n_new)                 # an array prompt works too
        assert dec.calls - calls == n_new                               # one full forward per new token


def test_generate_greedy_bad_input_names_the_argument(xp):
    dec = _bigram(xp, 5, 0, block_size=4)
    for args, name in [(([[0], [1]], 2), "prompt_ids"), (([0, 7], 2), "prompt_ids"),
                       (([0, 1, 2, 3, 4], 2), "prompt_ids"), (([0], -1), "max_new_tokens"),
                       (([0], 1.5), "max_new_tokens")]:
        with pytest.raises(ValueError, match=name):
            S.generate_greedy(dec, *args)
    with pytest.raises(TypeError, match="decoder"):
        S.generate_greedy(object(), [0], 2)


# ---------------------------------------------------------------------------
# The generation loop
# ---------------------------------------------------------------------------

@given(seed=seeds, n_new=st.integers(1, 20), plen=st.integers(1, 6))
def test_greedy_with_and_without_the_kv_cache_is_identical(xp, seed, n_new, plen):
    # block_size 12 < plen + n_new for many draws: the window slides past the cache.
    dec = AttnDecoder(xp, seed=seed, scale=3.0)
    prompt = np.random.default_rng(seed).integers(0, dec.vocab_size, plen).tolist()
    a = S.generate(dec, prompt, n_new, temperature=0, use_cache=True)
    b = S.generate(dec, prompt, n_new, temperature=0, use_cache=False)
    assert a == b and len(a[0]) == plen + n_new and a[0][:plen] == prompt


def test_the_cache_saves_model_work(xp):
    dec = AttnDecoder(xp, block_size=64)
    S.generate(dec, [1, 2, 3], 20, temperature=0, use_cache=True)
    assert dec.calls == 20                                       # prefill + one call per further token


@given(seed=seeds, lens=st.lists(st.integers(1, 6), min_size=2, max_size=4),
       use_cache=st.booleans())
def test_a_left_padded_batch_equals_each_prompt_alone(xp, seed, lens, use_cache):
    dec = AttnDecoder(xp, seed=seed, scale=3.0)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, dec.vocab_size, n).tolist() for n in lens]
    kw = dict(temperature=0, use_cache=use_cache, repetition_penalty=1.5, frequency_penalty=0.3)
    batch = S.generate(dec, prompts, 9, **kw)
    assert batch == [S.generate(dec, p, 9, **kw)[0] for p in prompts]


@given(seed=seeds)
def test_the_same_seed_gives_the_same_text(xp, seed):
    dec = AttnDecoder(xp, seed=seed % 1000)
    kw = dict(temperature=1.3, top_k=5, top_p=0.95, min_p=0.01, presence_penalty=0.2)
    a = S.generate(dec, [[1, 2], [3]], 15, seed=seed, **kw)
    assert a == S.generate(dec, [[1, 2], [3]], 15, seed=seed, **kw)
    assert a == S.generate(dec, [[1, 2], [3]], 15, rng=np.random.default_rng(seed), **kw)
    assert a == S.generate(dec, [[1, 2], [3]], 15, seed=seed, use_cache=False, **kw)


def test_different_seeds_give_different_text(xp):
    dec = _bigram(xp, 8, 0, scale=0.3)
    outs = {tuple(S.generate(dec, [0], 30, seed=s)[0]) for s in range(4)}
    assert len(outs) == 4


def test_generated_tokens_follow_the_model_distribution(xp):
    # First new token after prompt [2] from a bigram model: exactly softmax(table[2]).
    dec = _bigram(xp, 5, 4)
    rng = np.random.default_rng(0)
    toks = [t[-1] for t in S.generate(dec, [[2]] * 3000, 1, rng=rng)]
    assert chi_square_pvalue(np.bincount(toks, minlength=5), dec.probs()[2]) > 1e-3


def test_generation_stops_at_eos_and_stop_sequences(xp):
    V = 6
    table = np.full((V, V), -5.0)
    for a, b in [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 0)]:
        table[a, b] = 5.0                                        # a deterministic cycle 0 -> 1 -> ... -> 5 -> 0
    dec = BigramDecoder(xp, table)
    assert S.generate(dec, [0], 10, temperature=0, eos_id=3) == [[0, 1, 2, 3]]
    assert S.generate(dec, [0], 10, temperature=0, stop=[[5, 0], [9 % V, 4]]) == [[0, 1, 2, 3, 4]]
    assert S.generate(dec, [0], 10, temperature=0, stop=[2, 3]) == [[0, 1, 2, 3]]
    # Rows stop independently; the loop ends when all have stopped.
    out = S.generate(dec, [[0], [4], [2, 3]], 10, temperature=0, eos_id=5)
    assert out == [[0, 1, 2, 3, 4, 5], [4, 5], [2, 3, 4, 5]]
    assert S.generate(dec, [0, 1], 0) == [[0, 1]]


def test_generate_bad_input_names_the_argument(xp):
    dec = _bigram(xp, 5, 0, block_size=4)
    cases = [(dict(prompt_ids=[0, 1, 2, 3, 4]), "prompt_ids"),     # longer than the context
             (dict(prompt_ids=[0, 7]), "prompt_ids"), (dict(prompt_ids=[]), "prompt_ids"),
             (dict(prompt_ids=[[0], []]), "prompt_ids"),
             (dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=-0.5), "temperature"),
             (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"), (dict(top_k=0), "top_k"),
             (dict(eos_id=5), "eos_id"), (dict(stop=[[]]), "stop"),
             (dict(seed=1, rng=np.random.default_rng()), "seed")]
    for kw, name in cases:
        args = dict(prompt_ids=[0, 1], max_new_tokens=3)
        args.update(kw)
        with pytest.raises(ValueError, match=name):
            S.generate(dec, args.pop("prompt_ids"), args.pop("max_new_tokens"), **args)
    with pytest.raises(TypeError, match="decoder"):
        S.generate(object(), [0], 2)


# ---------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------

@given(seed=seeds, use_cache=st.booleans())
def test_one_beam_is_greedy(xp, seed, use_cache):
    dec = AttnDecoder(xp, seed=seed, scale=3.0)
    prompts = [[1, 2], [3, 4, 5]]
    assert S.beam_search(dec, prompts, 8, num_beams=1, use_cache=use_cache) == \
        S.generate(dec, prompts, 8, temperature=0)


@given(seed=seeds)
def test_enough_beams_find_the_most_likely_sequence(xp, seed):
    V, L = 3, 3
    dec = _bigram(xp, V, seed, scale=2.0)
    logp = np.log(dec.probs())
    def total(s):
        return logp[1, s[0]] + logp[s[0], s[1]] + logp[s[1], s[2]]

    best = max(total(s) for s in itertools.product(range(V), repeat=L))
    out, score = S.beam_search(dec, [1], L, num_beams=V ** (L - 1), return_scores=True)
    # Compare scores: different sequences can tie exactly (a bigram path and its rotation).
    assert math.isclose(total(out[0][1:]), best, rel_tol=1e-12)
    assert math.isclose(score[0], best / L, rel_tol=1e-12)


@given(seed=seeds)
def test_beam_search_with_and_without_the_cache_agree(xp, seed):
    dec = AttnDecoder(xp, seed=seed, scale=3.0)
    a = S.beam_search(dec, [[1, 2], [3]], 14, num_beams=3, eos_id=0)   # slides past block_size=12
    assert a == S.beam_search(dec, [[1, 2], [3]], 14, num_beams=3, eos_id=0, use_cache=False)


def test_beam_search_beats_greedy_and_length_penalty_picks_the_length(xp):
    # From 0, greedy takes 1 (0.6) and then eos (0.6): total 0.36. The path through 2
    # (0.4, then 2 -> 2 with certainty) is more likely (0.4), and beam search finds it.
    V = 4
    table = np.full((V, V), -30.0)
    table[0, 1], table[0, 2] = np.log(0.6), np.log(0.4)
    table[1, 3], table[1, 0] = np.log(0.6), np.log(0.4)         # 3 = eos
    table[2, 2] = 0.0
    dec = BigramDecoder(xp, table)
    assert S.generate(dec, [0], 3, temperature=0, eos_id=3) == [[0, 1, 3]]
    for lp in (0.0, 1.0):
        assert S.beam_search(dec, [0], 3, num_beams=2, eos_id=3, length_penalty=lp) == [[0, 2, 2, 2]]
    # Scores are sum_logprob / n_new ** length_penalty: with -3, the short [1, eos]
    # (log 0.36 * 2^3) beats the long [2, 2, 2] (log 0.4 * 3^3).
    out, score = S.beam_search(dec, [0], 3, num_beams=2, eos_id=3, length_penalty=-3.0, return_scores=True)
    assert out == [[0, 1, 3]] and math.isclose(score[0], np.log(0.36) * 8, rel_tol=1e-9)


def test_beam_search_bad_input(xp):
    dec = _bigram(xp, 4, 0)
    with pytest.raises(ValueError, match="num_beams"):
        S.beam_search(dec, [0], 3, num_beams=0)
    with pytest.raises(ValueError, match="eos_id"):
        S.beam_search(dec, [0], 3, eos_id=-1)


# ---------------------------------------------------------------------------
# Speculative decoding
# ---------------------------------------------------------------------------

def _sequence_probs(probs, start, n):
    """Exact probability of every length-n continuation of `start` under a bigram model."""
    V = probs.shape[0]
    seqs = list(itertools.product(range(V), repeat=n))
    out = []
    for s in seqs:
        p, prev = 1.0, start
        for t in s:
            p *= probs[prev, t]
            prev = t
        out.append(p)
    return seqs, np.array(out)


@pytest.mark.parametrize("k, temperature, top_k", [(2, 1.0, None), (3, 0.7, 2)])
def test_speculative_output_is_distributed_as_the_target(xp, k, temperature, top_k):
    V, n_new, n = 3, 3, 2000
    target = _bigram(xp, V, 5, scale=0.8)
    draft = _bigram(xp, V, 6, scale=0.8)                         # a deliberately different model
    rng = np.random.default_rng(1234)
    index = {s: i for i, s in enumerate(itertools.product(range(V), repeat=n_new))}
    counts = np.zeros(len(index))
    draft_counts = np.zeros(len(index))
    for _ in range(n):
        ids, _ = S.speculative_generate(target, draft, [0], n_new, k=k, temperature=temperature,
                                        top_k=top_k, rng=rng)
        counts[index[tuple(ids[1:])]] += 1
    for own in S.generate(draft, [[0]] * n, n_new, temperature=temperature, top_k=top_k, rng=rng):
        draft_counts[index[tuple(own[1:])]] += 1

    def processed(dec):
        t = np_(S.process_logits(dec.table, temperature=temperature, top_k=top_k))
        e = np.exp(t - t.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    _, want = _sequence_probs(processed(target), 0, n_new)
    assert chi_square_pvalue(counts, want) > 1e-3
    # Teeth: the draft's own samples are told apart from the target's distribution.
    assert chi_square_pvalue(draft_counts, want) < 1e-6


@given(seed=seeds, k=st.integers(1, 5), n_new=st.integers(1, 9), use_cache=st.booleans())
def test_greedy_speculative_equals_target_greedy(xp, seed, k, n_new, use_cache):
    target = AttnDecoder(xp, seed=seed, scale=3.0, block_size=16)
    draft = AttnDecoder(xp, seed=seed + 1, scale=3.0, block_size=16)
    ids, st_ = S.speculative_generate(target, draft, [1, 2, 3], n_new, k=k, temperature=0,
                                      use_cache=use_cache)
    assert ids == S.generate(target, [1, 2, 3], n_new, temperature=0)[0]
    assert st_.new_tokens == n_new and 0 <= st_.accepted <= st_.proposed
    assert st_.used_cache == (use_cache, use_cache)
    assert st_.target_calls <= n_new


def test_a_perfect_draft_is_always_accepted(xp):
    target = AttnDecoder(xp, seed=3, block_size=40)
    ids, st_ = S.speculative_generate(target, target, [1], 30, k=4, seed=0)
    assert st_.acceptance_rate == 1.0 and st_.new_tokens == 30
    assert st_.target_calls == 6                                  # 5 tokens per target call
    assert st_.tokens_per_target_call == 5.0


def test_speculative_stops_at_eos_and_checks_input(xp):
    V = 4
    table = np.full((V, V), -9.0)
    table[0, 1] = table[1, 2] = table[2, 3] = table[3, 0] = 9.0
    dec = BigramDecoder(xp, table)
    ids, _ = S.speculative_generate(dec, dec, [0], 20, k=3, temperature=0, eos_id=2)
    assert ids == [0, 1, 2]
    small = BigramDecoder(xp, table, block_size=8)
    for kw, name in [(dict(k=0), "k"), (dict(max_new_tokens=8), "max_new_tokens"),
                     (dict(prompt_ids=[[0], [1]]), "prompt_ids"), (dict(temperature=-1), "temperature")]:
        args = dict(prompt_ids=[0, 1], max_new_tokens=3)
        args.update(kw)
        with pytest.raises(ValueError, match=name):
            S.speculative_generate(small, small, args.pop("prompt_ids"), args.pop("max_new_tokens"), **args)
    with pytest.raises(ValueError, match="draft"):
        S.speculative_generate(dec, _bigram(xp, 5, 0), [0], 3)
    with pytest.raises(ValueError, match=r"eos_id: expected None or an int in \[0, 4\), got 4"):
        S.speculative_generate(dec, dec, [0], 3, eos_id=4)


# ---------------------------------------------------------------------------
# The real model behind the protocol: gpt.GPTDecoder with attention.KVCache
# ---------------------------------------------------------------------------

def _tiny_gpt_pair(xp, pos):
    """A 2-layer GPT and, as its draft, its own first layer (layer-skip self-speculation)."""
    from minillm import gpt
    cfg = gpt.GPTConfig(vocab_size=11, block_size=24, n_layer=2, n_head=2, n_embd=16, pos=pos,
                        tie_embeddings=False)
    params = gpt.init_params(cfg, seed=0, dtype=np.float64, device="gpu" if xp is not np else "cpu")
    # GPT-2's init gives nearly uniform logits; larger weights make the choices context-dependent.
    params = {k: v * 10 if v.ndim == 2 else v for k, v in params.items()}
    draft = {k: v for k, v in params.items() if not k.startswith("h.1.")}
    return gpt.GPTDecoder(params, cfg), gpt.GPTDecoder(draft, cfg.replace(n_layer=1))


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_gpt_speculative_and_beam_search_use_the_kv_cache_correctly(xp, pos):
    # Speculative decoding rolls the KVCache back (crop) after rejections and beam
    # search reorders its rows: both must give exactly what cache-free runs give.
    target, draft = _tiny_gpt_pair(xp, pos)
    prompt = [3, 1, 4, 1, 5]
    want = S.generate(target, prompt, 12, temperature=0, use_cache=False)[0]
    assert len(set(want[5:])) > 2                                # not a degenerate repetition
    for use_cache in (True, False):
        ids, st_ = S.speculative_generate(target, draft, prompt, 12, k=3, temperature=0, use_cache=use_cache)
        assert ids == want and st_.used_cache == (use_cache, use_cache)
    assert S.beam_search(target, [prompt, [2]], 10, num_beams=3) == \
        S.beam_search(target, [prompt, [2]], 10, num_beams=3, use_cache=False)
    a, st_ = S.speculative_generate(target, draft, prompt, 12, k=3, seed=7)
    assert 0 < st_.acceptance_rate < 1                           # some rollbacks happened
    assert a == S.speculative_generate(target, draft, prompt, 12, k=3, seed=7, use_cache=False)[0]
