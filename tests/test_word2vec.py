"""word2vec.py: the SGNS loss's backward, stable log-sigmoid, vocabulary, subsampling, noise, pairs, training."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from helpers import assert_alive, assert_close, assert_gradcheck, np_, on
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


# --- CBOW ----------------------------------------------------------------------

@st.composite
def cbow_cases(draw):
    """(B, W >= 2, K, D, seed, mask): every row keeps at least one context word, and the
    draws include partial masks (some rows with masked positions)."""
    b, w, k, d = draw(st.integers(1, 4)), draw(st.integers(2, 5)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    mask = rng.random((b, w)) < 0.6
    mask[np.arange(b), rng.integers(0, w, size=b)] = True   # at least one per row
    mask[0, 0], mask[0, 1] = True, False                       # row 0 is always partial
    return b, w, k, d, seed, mask


def cbow_inputs(xp, case, scale=1.0):
    b, w, k, d, seed, mask = case
    return on(xp, away_from_zero(seed, b, w, d, scale=scale), mask, away_from_zero(seed + 1, b, d, scale=scale),
              away_from_zero(seed + 2, b, k, d, scale=scale))


@given(case=cbow_cases(), scale=st.sampled_from([0.3, 0.7, 1.0]))
def test_cbow_backward_matches_finite_differences_and_masked_positions_get_zero(xp, case, scale):
    ctx, mask, t, n = cbow_inputs(xp, case, scale)
    assert_gradcheck(bp.gradcheck(w2v.cbow_forward, w2v.cbow_backward, [ctx, mask, t, n], wrt=[0, 2, 3]))
    _, cache = w2v.cbow_forward(ctx, mask, t, n)
    d_ctx, d_t, d_n = w2v.cbow_backward(1.0, cache)
    m = np_(mask)
    assert not np.any(np_(d_ctx)[~m]), "a masked position got a gradient"
    assert_alive([np_(d_ctx)[m], d_t, d_n])
    # each unmasked position of a row gets the same share, d/dh / |C|
    g = np_(d_ctx)
    for r in range(m.shape[0]):
        assert_close(g[r, m[r]], np.broadcast_to(g[r, m[r]][0], g[r, m[r]].shape), rtol=0, atol=0)


@given(case=cbow_cases())
def test_cbow_loss_is_the_formula_with_the_masked_mean(xp, case):
    ctx, mask, t, n = cbow_inputs(np, case)
    h = np.stack([ctx[r][mask[r]].mean(axis=0) for r in range(len(ctx))])
    sig = lambda x: 1 / (1 + np.exp(-x))
    want = np.mean(-np.log(sig((h * t).sum(-1))) - np.log(sig(-np.einsum("bkd,bd->bk", n, h))).sum(-1))
    loss, _ = w2v.cbow_forward(*on(xp, ctx, mask, t, n))
    assert loss.shape == () and float(loss) == pytest.approx(want, rel=1e-12)
    # what sits at a masked position never matters
    junk = np.where(mask[:, :, None], ctx, 1e3)
    assert float(w2v.cbow_forward(*on(xp, junk, mask, t, n))[0]) == pytest.approx(want, rel=1e-12)


@given(case=sgns_shapes(), w=st.integers(1, 4), at=st.integers(0, 3))
def test_cbow_with_one_context_word_is_skipgram_for_that_pair(xp, case, w, at):
    b, k, d, seed = case
    at = at % w
    v, u, n = randn(seed, b, d), randn(seed + 1, b, d), randn(seed + 2, b, k, d)
    ctx = randn(seed + 3, b, w, d)
    ctx[:, at] = v
    mask = np.zeros((b, w), bool)
    mask[:, at] = True
    loss_c, cache_c = w2v.cbow_forward(*on(xp, ctx, mask, u, n))
    loss_s, cache_s = w2v.sgns_forward(*on(xp, v, u, n))
    assert float(loss_c) == pytest.approx(float(loss_s), rel=1e-12)
    d_ctx, d_u, d_n = w2v.cbow_backward(1.0, cache_c)
    d_v, d_u_s, d_n_s = w2v.sgns_backward(1.0, cache_s)
    assert_close(np_(d_ctx)[:, at], d_v, rtol=1e-12)
    assert_close(d_u, d_u_s, rtol=1e-12) and assert_close(d_n, d_n_s, rtol=1e-12)


def test_cbow_windows_masks_edges_segments_and_dynamic_windows():
    ids = np.array([10, 11, 12, 13, 14])
    t, c, m = w2v.cbow_windows(ids, 2)
    assert t.tolist() == ids.tolist() and c.shape == m.shape == (5, 4)
    # offsets -2, -1, 1, 2: the first word has only right neighbours
    assert m[0].tolist() == [False, False, True, True] and c[0][m[0]].tolist() == [11, 12]
    assert c[2].tolist() == [10, 11, 13, 14] and m[2].all()
    # the same (centre, context) pairs as skip-gram's full window
    pairs = sorted((int(t[i]), int(x)) for i in range(len(t)) for x in c[i][m[i]])
    assert pairs == sorted(zip(*[a.tolist() for a in w2v.skipgram_pairs(ids, 2)]))
    t2, c2, m2 = w2v.cbow_windows(ids, 2, segments=np.array([0, 0, 0, 1, 2]))
    assert t2.tolist() == [10, 11, 12] and c2[2][m2[2]].tolist() == [10, 11]   # 13 and 14 have no context
    _, _, m3 = w2v.cbow_windows(np.arange(1000) % 7, 3, np.random.default_rng(0))
    inner = m3[3:-3]
    assert inner[:, [2, 3]].all()                                  # distance 1 always
    assert 0.25 < inner[:, [0, 5]].mean() < 0.42                   # distance 3 with probability 1/3


def test_cbow_table_gradients_scatter_repeated_words_correctly():
    rng = np.random.default_rng(4)
    v, d, b, w, k = 3, 2, 4, 3, 2
    params = {"w_in": away_from_zero(0, v, d), "w_out": away_from_zero(1, v, d)}
    ctx, t, n = rng.integers(0, v, (b, w)), rng.integers(0, v, b), rng.integers(0, v, (b, k))
    mask = np.array([[True, False, True], [True, True, True], [False, True, False], [True, True, False]])
    _, grads = w2v.cbow_loss_and_grads(params, ctx, mask, t, n)
    f = lambda p: w2v.cbow_loss_and_grads(p, ctx, mask, t, n)[0]
    assert_gradcheck(bp.check_dict_gradients(f, params, grads))


def test_cbow_errors(xp):
    ctx, mask, t, n = on(xp, np.ones((2, 3, 4)), np.ones((2, 3), bool), np.ones((2, 4)), np.ones((2, 5, 4)))
    no_context = xp.asarray(np.array([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match=r"context_mask: every row needs at least one unmasked context word; rows \[1"):
        w2v.cbow_forward(ctx, no_context, t, n)
    with pytest.raises(TypeError, match="context_mask: expected a bool array, got float64"):
        w2v.cbow_forward(ctx, mask.astype(float), t, n)
    with pytest.raises(ValueError, match=r"context_mask: expected shape \(2, 3\)"):
        w2v.cbow_forward(ctx, xp.ones((2, 2), bool), t, n)
    with pytest.raises(ValueError, match=r"context_vecs: expected 3"):
        w2v.cbow_forward(t, mask, t, n)
    with pytest.raises(ValueError, match=r"context_vecs: expected shape \(2, 4\)"):
        w2v.cbow_forward(ctx, mask, xp.ones((2, 3)), n)
    with pytest.raises(ValueError, match=r"negative_vecs: expected shape \(2, \*, 4\)"):
        w2v.cbow_forward(ctx, mask, t, xp.ones((2, 5, 3)))
    with pytest.raises(TypeError, match="negative_vecs: expected dtype float64"):
        w2v.cbow_forward(ctx, mask, t, n.astype(np.float32))
    _, cache = w2v.cbow_forward(ctx, mask, t, n)
    with pytest.raises(ValueError, match="dloss: expected a scalar"):
        w2v.cbow_backward(xp.ones(2), cache)
    vocab = w2v.build_vocab(["a", "b"])
    with pytest.raises(ValueError, match=r"sg: expected one of \(0, 1\)"):
        w2v.Word2Vec(vocab, sg=2)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_cbow_training_separates_two_topic_clusters(optimizer):
    sents, a, b = two_topic_corpus()
    vocab = w2v.build_vocab([t for s in sents for t in s])
    model = w2v.Word2Vec(vocab, dim=8, seed=0, sg=0)
    losses = model.train([w2v.encode(s, vocab) for s in sents], epochs=8, window=3, negatives=3,
                         batch_size=16 if optimizer == "sgd" else 64, optimizer=optimizer, subsample_t=None)
    assert np.mean(losses[-20:]) < np.mean(losses[:20])
    within = np.mean([model.similarity(x, y) for g in (a, b) for x in g for y in g if x != y])
    across = np.mean([model.similarity(x, y) for x in a for y in b])
    assert within > across + 0.5, (within, across)


# --- analogies and the word2vec text format ------------------------------------------

def planted_model(seed=0, dim=8):
    """A model with planted vectors: each word is a 'kind' direction plus a 'male' (e_1) or
    'female' (e_2) one, so woman - man + king = queen exactly (plus a little noise)."""
    words = ["man", "woman", "king", "queen", "boy", "girl", "prince", "princess", "apple", "stone"]
    e = np.eye(dim)
    kind = {"man": e[0], "king": e[3], "boy": e[4], "prince": e[5]}
    vec = {}
    for male, female in (("man", "woman"), ("king", "queen"), ("boy", "girl"), ("prince", "princess")):
        vec[male], vec[female] = kind[male] + e[1], kind[male] + e[2]
    vec["apple"], vec["stone"] = e[6], e[7]
    rng = np.random.default_rng(seed)
    vocab = w2v.Vocab(words, np.arange(len(words), 0, -1), {w: i for i, w in enumerate(words)})
    model = w2v.Word2Vec(vocab, dim=dim)
    model.params["w_in"] = np.stack([vec[w] for w in words]) + rng.standard_normal((len(words), dim)) * 0.05
    return model


def test_analogy_is_3cosadd_with_the_question_words_excluded():
    model = planted_model()
    assert model.analogy("man", "woman", "king")[0][0] == "queen"
    assert model.analogy("king", "queen", "boy")[0][0] == "girl"
    top = model.analogy("man", "woman", "king", k=4)
    assert len(top) == 4 and not {"man", "woman", "king"} & {w for w, _ in top}
    assert [s for _, s in top] == sorted((s for _, s in top), reverse=True)
    # the score is the cosine with e_b - e_a + e_c (unit rows)
    u = model._unit_vectors()
    i = model.vocab.index
    q = u[i["woman"]] - u[i["man"]] + u[i["king"]]
    assert top[0][1] == pytest.approx(float(u[i["queen"]] @ q / np.linalg.norm(q)), rel=1e-12)
    with pytest.raises(ValueError, match="word: 'zebra' is not in the vocabulary"):
        model.analogy("man", "zebra", "king")
    with pytest.raises(ValueError, match="k: expected"):
        model.analogy("man", "woman", "king", k=0)


def test_analogy_agrees_with_gensim_most_similar():
    gensim_models = pytest.importorskip("gensim.models")
    model = w2v.Word2Vec(w2v.build_vocab([f"w{i}" for i in range(40)]), dim=5, seed=1)
    model.params["w_in"] = np.random.default_rng(2).standard_normal((40, 5))
    kv = gensim_models.KeyedVectors(5)
    kv.add_vectors(model.vocab.words, model.params["w_in"])
    for a, b, c in [("w0", "w1", "w2"), ("w5", "w9", "w33"), ("w39", "w3", "w17")]:
        ours = model.analogy(a, b, c, k=5)
        theirs = kv.most_similar(positive=[b, c], negative=[a], topn=5)
        assert [w for w, _ in ours] == [w for w, _ in theirs]
        assert_close([s for _, s in ours], [s for _, s in theirs], rtol=1e-5)


def test_evaluate_analogies_counts_coverage_and_accuracy(tmp_path):
    model = planted_model()
    path = tmp_path / "q.txt"
    path.write_text(": family\nman woman king queen\nMan Woman Boy Girl\nman woman king zebra\n"
                    ": wrong\nking queen man apple\n")
    qs = w2v.read_analogies(path)
    assert qs[0] == ("family", "man", "woman", "king", "queen") and len(qs) == 4
    r = model.evaluate_analogies(qs)
    assert (r["total"], r["in_vocab"], r["correct"]) == (4, 3, 2)
    assert r["coverage"] == 0.75 and r["accuracy"] == pytest.approx(2 / 3)
    assert r["sections"]["family"] == {"correct": 2, "in_vocab": 2, "total": 3}
    assert model.evaluate_analogies(qs, lowercase=False)["in_vocab"] == 2   # "Man" is not "man"
    with pytest.raises(ValueError, match="analogies: expected 4 words per question line, got 3 on line 2"):
        w2v.read_analogies([": s", "a b c"])


def test_shakespeare_analogies_are_well_formed_and_answerable():
    qs = w2v.shakespeare_analogies()
    assert len(qs) > 300 and {q[0] for q in qs} == set(w2v.SHAKESPEARE_PAIRS)
    for _, a, b, c, d in qs:
        assert d not in (a, b, c) and len({a, c}) == 2


def test_questions_words_from_gensim():
    pytest.importorskip("gensim")
    qs = w2v.read_analogies(w2v.questions_words_path())
    assert len(qs) == 19544 and len({q[0] for q in qs}) == 14
    assert qs[0] == ("capital-common-countries", "Athens", "Greece", "Baghdad", "Iraq")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_word2vec_text_format_round_trips_ours_and_gensims(tmp_path, dtype):
    gensim_models = pytest.importorskip("gensim.models")
    words = ["the", "king's", "ça", "o'er", "x"]
    vocab = w2v.Vocab(words, np.arange(5, 0, -1), {w: i for i, w in enumerate(words)})
    model = w2v.Word2Vec(vocab, dim=3, dtype=dtype)
    scales = 10.0 ** np.arange(-3, 2)[:, None]   # 0.001 .. 10: every magnitude must survive the text
    model.params["w_in"] = (np.random.default_rng(0).standard_normal((5, 3)) * scales).astype(dtype)
    ours = tmp_path / "ours.txt"
    model.save_word2vec_format(ours)
    back = w2v.Word2Vec.load_word2vec_format(ours, dtype=dtype)
    assert back.vocab.words == words and np.array_equal(back.params["w_in"], model.params["w_in"])
    kv = gensim_models.KeyedVectors.load_word2vec_format(str(ours), binary=False, datatype=dtype)
    assert kv.index_to_key == words and np.array_equal(kv.vectors, model.params["w_in"])
    # and what gensim writes, we read
    theirs = tmp_path / "theirs.txt"
    kv.save_word2vec_format(str(theirs), binary=False)
    got = w2v.Word2Vec.load_word2vec_format(theirs, dtype=dtype)
    assert got.vocab.words == words and np.array_equal(got.params["w_in"], kv.vectors)
    assert got.most_similar("the", k=2) == back.most_similar("the", k=2)


def test_word2vec_text_format_errors(tmp_path):
    vocab = w2v.build_vocab(["a b", "c"])
    with pytest.raises(ValueError, match="cannot hold words that are empty or contain whitespace, got \\['a b'\\]"):
        w2v.Word2Vec(vocab, dim=2).save_word2vec_format(tmp_path / "x.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("2 3\na 1 2 3\nb 1 2\n")
    with pytest.raises(ValueError, match="expected a word and 3 numbers on line 3, got 3 fields"):
        w2v.Word2Vec.load_word2vec_format(bad)
    bad.write_text("3 2\na 1 2\n")
    with pytest.raises(ValueError, match="the header promises 3 words, the file has 1"):
        w2v.Word2Vec.load_word2vec_format(bad)
    bad.write_text("hello\n")
    with pytest.raises(ValueError, match="expected a word2vec text header 'V D' on line 1"):
        w2v.Word2Vec.load_word2vec_format(bad)


# --- bench word2vec, on a small text instead of Shakespeare ------------------------------

def test_bench_word2vec_trains_the_four_models_and_scores_them(monkeypatch, capsys):
    pytest.importorskip("gensim")
    from minillm.__main__ import main
    from minillm.bench import word2vec as bench
    sents, _, _ = two_topic_corpus(n_sent=60)
    monkeypatch.setattr(bench, "corpus_segments", lambda limit=None: sents)
    assert main(["bench", "word2vec", "--dim", "8", "--min-count", "1", "--batch-size", "64"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("model "):]
    for name in bench.MODELS:
        assert f"\n{name} " in table
    assert "qw in-vocab" in table and "0/19544" in table   # no a0/b0 word is in questions-words.txt
    assert "cross-check: gensim's own evaluate_word_analogies on gensim-sg" in out
    assert main(["bench", "word2vec", "--models", "ours-sg,glove"]) == 2
    assert "minillm bench word2vec: error: --models: expected names from" in capsys.readouterr().err


def test_analogy_scores_errors():
    unit = np.eye(4)
    with pytest.raises(ValueError, match=r"b: expected ids in \[0, 4\), got 4"):
        w2v.analogy_scores(unit, np.array([0]), np.array([4]), np.array([1]))
    with pytest.raises(ValueError, match="c: expected 1 ids, one per question, like a, got 2"):
        w2v.analogy_scores(unit, np.array([0]), np.array([1]), np.array([1, 2]))
