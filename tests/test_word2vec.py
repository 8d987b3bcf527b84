"""word2vec.py: the SGNS loss's backward, stable log-sigmoid, vocabulary, subsampling, noise, pairs, training."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from helpers import assert_close, assert_gradcheck, np_, on
from minillm import backprop as bp
from minillm import word2vec as w2v
from strategies import randn, seeds


# --- the loss and its gradient ----------------------------------------------

@st.composite
def sgns_shapes(draw):
    return draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(seeds)


def away_from_zero(seed, *shape, scale=1.0):
    """Entries with |x| in [0.2, 1] * scale and random signs."""
    rng = np.random.default_rng(seed)
    return rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0.2, 1.0, size=shape) * scale


# A finite difference of a scalar loss resolves gradients down to ~1e-12 absolute, so the
# vectors keep every entry away from 0 and the dot products O(1): then no gradient entry
# (g_neg * v_c, sigma(.) * u) is tiny. (Deep in sigmoid's tails the gradient is ~1e-7 of a
# loss of ~10; the stability there is tested separately below.)
@given(case=sgns_shapes(), scale=st.sampled_from([0.3, 0.7, 1.0]))
def test_sgns_backward_matches_finite_differences(xp, case, scale):
    b, k, d, seed = case
    c, o, n = on(xp, away_from_zero(seed, b, d, scale=scale), away_from_zero(seed + 1, b, d, scale=scale),
                 away_from_zero(seed + 2, b, k, d, scale=scale))
    assert_gradcheck(bp.gradcheck(w2v.sgns_forward, w2v.sgns_backward, [c, o, n]))


@given(case=sgns_shapes())
def test_sgns_loss_is_the_formula(xp, case):
    b, k, d, seed = case
    c, o, n = randn(seed, b, d), randn(seed + 1, b, d), randn(seed + 2, b, k, d)
    sig = lambda x: 1 / (1 + np.exp(-x))
    want = np.mean(-np.log(sig((c * o).sum(-1))) - np.log(sig(-np.einsum("bkd,bd->bk", n, c))).sum(-1))
    loss, _ = w2v.sgns_forward(*on(xp, c, o, n))
    assert loss.shape == () and float(loss) == pytest.approx(want, rel=1e-12)


@given(case=sgns_shapes())
def test_table_gradients_scatter_repeated_words_correctly(xp, case):
    """The whole-table gradient (gather -> SGNS -> scatter-add) against finite differences,
    with ids drawn from a tiny vocabulary so that words repeat inside the batch."""
    b, k, d, seed = case
    v = 3
    rng = np.random.default_rng(seed)
    params = {"w_in": on(xp, away_from_zero(seed, v, d)), "w_out": on(xp, away_from_zero(seed + 1, v, d))}
    ids = [rng.integers(0, v, size=s) for s in ((b,), (b,), (b, k))]
    _, grads = w2v.sgns_loss_and_grads(params, *ids)
    assert_gradcheck(bp.check_dict_gradients(lambda p: w2v.sgns_loss_and_grads(p, *ids)[0], params, grads))


def test_log_sigmoid_and_sigmoid_are_stable_for_huge_inputs(xp):
    x = on(xp, np.array([-1000.0, -100.0, -1.0, 0.0, 1.0, 100.0, 1000.0]))
    ls = np_(w2v.log_sigmoid(x))
    assert np.all(np.isfinite(ls))
    assert_close(ls, [-1000.0, -100.0, -np.log1p(np.e), -np.log(2), -np.log1p(np.exp(-1)), -np.exp(-100.0), 0.0],
                 rtol=1e-12, atol=0)
    s = np_(w2v.sigmoid(x))
    assert np.all(np.isfinite(s)) and s[0] == 0.0 and s[-1] == 1.0 and s[3] == 0.5
    # float32 too, and the loss stays finite for enormous dot products
    loss, cache = w2v.sgns_forward(*on(xp, np.full((1, 2), 30.0, np.float32), np.full((1, 2), -30.0, np.float32),
                                       np.full((1, 1, 2), 30.0, np.float32)))
    assert np.isfinite(float(loss)) and float(loss) == pytest.approx(3600.0, rel=1e-6)
    assert all(np.all(np.isfinite(np_(g))) for g in w2v.sgns_backward(1.0, cache))


@given(x=st.floats(-1000, 1000))
def test_log_sigmoid_matches_the_definition_where_that_is_safe(x):
    got = float(w2v.log_sigmoid(np.array(x)))
    assert np.isfinite(got) and got <= 0
    if abs(x) < 30:
        assert got == pytest.approx(np.log(1 / (1 + np.exp(-x))), rel=1e-12, abs=1e-15)
    assert float(w2v.sigmoid(np.array(x))) == pytest.approx(np.exp(got), rel=1e-12, abs=0)


def test_sgns_errors(xp):
    c, o, n = on(xp, np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 4, 3)))
    with pytest.raises(ValueError, match=r"context_vecs: expected shape \(2, 3\)"):
        w2v.sgns_forward(c, xp.ones((2, 4)), n)
    with pytest.raises(ValueError, match=r"negative_vecs: expected shape \(2, \*, 3\)"):
        w2v.sgns_forward(c, o, xp.ones((2, 4, 2)))
    with pytest.raises(TypeError, match="negative_vecs: expected dtype float64"):
        w2v.sgns_forward(c, o, n.astype(np.float32))
    _, cache = w2v.sgns_forward(c, o, n)
    with pytest.raises(ValueError, match="dloss: expected a scalar"):
        w2v.sgns_backward(xp.ones(2), cache)
    params = {"w_in": c, "w_out": o}
    with pytest.raises(ValueError, match=r"negatives: expected ids in \[0, 2\)"):
        w2v.sgns_loss_and_grads(params, np.array([0]), np.array([1]), np.array([[2]]))


# --- vocabulary, subsampling, noise, pairs ----------------------------------

def test_vocab_counts_order_min_count_and_encode():
    toks = "the cat sat on the mat the end cat".split()
    v = w2v.build_vocab(toks, min_count=2)
    assert v.words == ["the", "cat"] and list(v.counts) == [3, 2] and len(v) == 2
    assert list(w2v.encode(toks, v)) == [0, 1, 0, 0, 1]  # unknown words dropped
    full = w2v.build_vocab(toks)
    assert full.words[:2] == ["the", "cat"] and full.words[2:] == ["sat", "on", "mat", "end"]  # ties: first seen
    with pytest.raises(ValueError, match="min_count"):
        w2v.build_vocab(toks, min_count=0)
    with pytest.raises(ValueError, match="no word occurs at least min_count=9"):
        w2v.build_vocab(toks, min_count=9)
    with pytest.raises(TypeError, match="tokens: expected a list of words, got a str"):
        w2v.build_vocab("the cat")


@given(counts=st.lists(st.integers(0, 10_000), min_size=1, max_size=20).filter(lambda c: sum(c) > 0),
       power=st.sampled_from([0.0, 0.5, 0.75, 1.0]))
def test_noise_distribution_is_unigram_to_the_power_normalised(counts, power):
    c = np.array(counts)
    p = w2v.noise_distribution(c, power) if power != 0.75 else w2v.noise_distribution(c)
    want = c.astype(float) ** power
    assert_close(p, want / want.sum(), rtol=1e-12, atol=0)
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    if power == 0.75:  # flatter than the unigram: the most frequent word's share shrinks
        assert p.max() <= c.max() / c.sum() + 1e-12


def test_negative_samples_follow_the_noise_distribution():
    p = w2v.noise_distribution(np.array([100, 10, 1, 0, 50]))
    draws = w2v.sample_negatives(p, (200_000,), np.random.default_rng(0))
    freq = np.bincount(draws, minlength=5) / draws.size
    assert freq[3] == 0.0                             # a zero-count word is never drawn
    np.testing.assert_allclose(freq, p, atol=4e-3)


@given(seed=seeds, t=st.sampled_from([1e-3, 1e-2, 1e-1]))
def test_subsampling_keeps_rare_words_and_thins_frequent_ones(seed, t):
    counts = np.array([5000, 2000, 3, 2, 1])          # two frequent words, three rare ones
    ids = np.repeat(np.arange(5), counts)
    np.random.default_rng(seed).shuffle(ids)
    keep = w2v.keep_probabilities(counts, t)
    f = counts / counts.sum()
    assert_close(keep, np.minimum(1.0, np.sqrt(t / f)), rtol=1e-12)
    kept = w2v.subsample(ids, counts, t, seed)
    got = np.bincount(kept, minlength=5)
    for w in range(5):
        if f[w] <= t:                                 # rarer than t: every occurrence survives
            assert got[w] == counts[w]
    if f[0] > t:                                       # the most frequent word is thinned as the formula says
        assert abs(got[0] / counts[0] - keep[0]) < 5 * np.sqrt(keep[0] / counts[0]) + 1e-9
        assert got[0] < counts[0]


def test_skipgram_pairs_full_window_dynamic_window_and_segments():
    ids = np.array([10, 11, 12, 13])
    c, o = w2v.skipgram_pairs(ids, 2)
    pairs = sorted(zip(c.tolist(), o.tolist()))
    want = sorted((ids[i], ids[j]) for i in range(4) for j in range(4) if i != j and abs(i - j) <= 2)
    assert pairs == want
    # the dynamic window only ever drops pairs, never invents them, and keeps every distance-1 pair
    c2, o2 = w2v.skipgram_pairs(ids, 2, np.random.default_rng(0))
    sub = list(zip(c2.tolist(), o2.tolist()))
    assert set(sub) <= set(pairs) and len(sub) == len(set(sub))
    assert {(10, 11), (11, 10), (11, 12), (12, 11), (12, 13), (13, 12)} <= set(sub)
    # segments: no pair crosses a sentence boundary
    c3, o3 = w2v.skipgram_pairs(ids, 3, segments=np.array([0, 0, 1, 1]))
    assert sorted(zip(c3.tolist(), o3.tolist())) == [(10, 11), (11, 10), (12, 13), (13, 12)]
    with pytest.raises(ValueError, match="window"):
        w2v.skipgram_pairs(ids, 0)
    with pytest.raises(TypeError, match="ids: expected an integer array"):
        w2v.skipgram_pairs(ids.astype(float), 2)


def test_dynamic_window_uses_distance_d_with_probability_window_minus_d_plus_one_over_window():
    ids = np.arange(20_004) % 11
    c, o = w2v.skipgram_pairs(ids, 4, np.random.default_rng(1))
    # ids are i mod 11, so a context d to the right has (o - c) mod 11 = d, one to the left 11 - d
    n_by = np.bincount((o - c) % 11, minlength=11)
    for d in range(1, 5):
        assert n_by[d] / 20_000 == pytest.approx((4 - d + 1) / 4, abs=0.02)
        assert n_by[11 - d] / 20_000 == pytest.approx((4 - d + 1) / 4, abs=0.02)


# --- training ----------------------------------------------------------------

def two_topic_corpus(seed=0, n_sent=200, length=8):
    """Sentences drawn from one of two disjoint word clusters: a-words only meet a-words."""
    rng = np.random.default_rng(seed)
    a = [f"a{i}" for i in range(6)]
    b = [f"b{i}" for i in range(6)]
    return [[(a if s % 2 == 0 else b)[j] for j in rng.integers(0, 6, size=length)] for s in range(n_sent)], a, b


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_separates_two_topic_clusters(xp, optimizer):
    sents, a, b = two_topic_corpus()
    vocab = w2v.build_vocab([t for s in sents for t in s])
    model = w2v.Word2Vec(vocab, dim=8, seed=0, dtype=np.float32, device="gpu" if xp is not np else "cpu")
    losses = model.train([w2v.encode(s, vocab) for s in sents], epochs=5, window=3, negatives=3,
                         batch_size=64, optimizer=optimizer, subsample_t=None)
    assert np.mean(losses[-20:]) < np.mean(losses[:20])
    within = np.mean([model.similarity(x, y) for g in (a, b) for x in g for y in g if x != y])
    across = np.mean([model.similarity(x, y) for x in a for y in b])
    assert within > across + 0.5, (within, across)
    for word in ("a0", "b3"):
        neighbours = [w for w, _ in model.most_similar(word, k=5)]
        assert all(w[0] == word[0] for w in neighbours), (word, neighbours)
    assert model.params["w_in"].dtype == np.float32


def test_training_is_reproducible_from_the_seed_and_checks_its_input():
    sents, _, _ = two_topic_corpus(n_sent=20)
    vocab = w2v.build_vocab([t for s in sents for t in s])
    ids = w2v.encode([t for s in sents for t in s], vocab)
    runs = []
    for _ in range(2):
        m = w2v.Word2Vec(vocab, dim=4, seed=3)
        runs.append((m.train(ids, epochs=1, window=2, negatives=2, batch_size=16), m.vector("a1")))
    assert runs[0][0] == runs[1][0] and np.array_equal(runs[0][1], runs[1][1])
    with pytest.raises(ValueError, match=r"ids: expected ids in \[0, 12\)"):
        m.train(np.array([0, 12]))
    with pytest.raises(ValueError, match="optimizer"):
        m.train(ids, optimizer="lbfgs")
    with pytest.raises(ValueError, match="word: 'zebra' is not in the vocabulary"):
        m.most_similar("zebra")
    with pytest.raises(ValueError, match="k: expected"):
        m.most_similar("a1", k=0)
