"""bow.py: sparse counts and TF-IDF, the sparse products, softmax regression's backward."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from helpers import assert_alive, assert_close, assert_gradcheck
from minillm import backprop as bp
from minillm import bow
from strategies import seeds


@st.composite
def id_docs(draw, max_docs=6, max_len=12, max_vocab=8):
    v = draw(st.integers(2, max_vocab))
    docs = draw(st.lists(st.lists(st.integers(0, v - 1), min_size=0, max_size=max_len),
                         min_size=1, max_size=max_docs))
    return [np.array(d, dtype=np.int64) for d in docs], v


def dense_counts(docs, v):
    out = np.zeros((len(docs), v))
    for i, d in enumerate(docs):
        np.add.at(out[i], d, 1)
    return out


# --- counts and TF-IDF --------------------------------------------------------------

@given(case=id_docs())
def test_count_ids_are_the_counts_in_csr_form(case):
    docs, v = case
    X = bow.count_ids(docs, v, dtype=np.float64)
    assert X.shape == (len(docs), v)
    assert_close(X.to_dense(), dense_counts(docs, v), rtol=0, atol=0)
    assert X.indptr[0] == 0 and X.indptr[-1] == len(X.indices) == np.count_nonzero(dense_counts(docs, v))
    for i in range(X.n_rows):   # sorted, distinct columns within a row: a real CSR
        cols = X.indices[X.indptr[i]:X.indptr[i + 1]]
        assert np.all(np.diff(cols) > 0)


@given(case=id_docs(), seed=seeds)
def test_bag_of_words_ignores_word_order(case, seed):
    docs, v = case
    rng = np.random.default_rng(seed)
    shuffled = [rng.permutation(d) for d in docs]
    a, b = bow.count_ids(docs, v, dtype=np.float64), bow.count_ids(shuffled, v, dtype=np.float64)
    assert a.shape == b.shape and np.array_equal(a.indptr, b.indptr)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.values, b.values)
    ta = bow.tfidf(a, bow.idf_weights(bow.document_frequency(a), a.n_rows))
    tb = bow.tfidf(b, bow.idf_weights(bow.document_frequency(b), b.n_rows))
    assert np.array_equal(ta.values, tb.values)


def test_order_is_all_that_tells_these_sentences_apart():
    vocab = {w: i for i, w in enumerate("the dog bit man".split())}
    X = bow.count_vectors(["the dog bit the man".split(), "the man bit the dog".split(), "a cat".split()], vocab)
    assert np.array_equal(X.to_dense()[0], X.to_dense()[1]) and X.to_dense()[0].tolist() == [2, 1, 1, 1]
    assert X.to_dense()[2].tolist() == [0, 0, 0, 0]   # unknown words are dropped


@given(case=id_docs(), smooth=st.booleans())
def test_a_word_in_every_document_gets_the_floor_idf(case, smooth):
    docs, v = case
    docs = [np.append(d, 0) for d in docs]            # word 0 is in every document
    X = bow.count_ids(docs, v, dtype=np.float64)
    df = bow.document_frequency(X)
    assert_close(df, (dense_counts(docs, v) > 0).sum(axis=0), rtol=0, atol=0)
    idf = bow.idf_weights(df, X.n_rows, smooth=smooth)
    floor = 1.0 if smooth else 0.0
    assert idf[0] == pytest.approx(floor, abs=1e-15)
    used = df > 0
    assert np.all(idf[used] >= floor - 1e-15)          # the floor: no word that occurs gets less
    T = bow.tfidf(X, idf, norm=None).to_dense()
    assert_close(T[:, 0], dense_counts(docs, v)[:, 0] * floor, rtol=1e-15, atol=1e-15)
    if smooth:
        want = np.log((1 + X.n_rows) / (1 + df)) + 1
    else:
        want = np.where(df > 0, np.log(X.n_rows / np.maximum(df, 1)), 0)
    assert_close(idf, want, rtol=1e-15)


@given(case=id_docs())
def test_tfidf_l2_rows_are_unit_length_or_zero(case):
    docs, v = case
    X = bow.count_ids(docs, v, dtype=np.float64)
    T = bow.tfidf(X, bow.idf_weights(bow.document_frequency(X), X.n_rows)).to_dense()
    norms = np.linalg.norm(T, axis=1)
    assert np.all((np.abs(norms - 1) < 1e-12) | (norms == 0))
    want = dense_counts(docs, v) * bow.idf_weights(bow.document_frequency(X), X.n_rows)
    want /= np.maximum(np.linalg.norm(want, axis=1, keepdims=True), 1e-300)
    assert_close(T, want, rtol=1e-12, atol=1e-15)


def test_tfidf_matches_gensim_tfidfmodel():
    """gensim's TfidfModel (default: raw counts x log2(N / df), unit rows) against our plain idf
    with l2 rows: the log's base cancels in the normalisation."""
    gensim = pytest.importorskip("gensim")
    docs, v = [np.array(d) for d in ([0, 1, 1, 2], [1, 3, 3, 3, 4], [0, 4], [2, 2, 5, 1], [0, 1, 5])], 6
    X = bow.count_ids(docs, v, dtype=np.float64)
    ours = bow.tfidf(X, bow.idf_weights(bow.document_frequency(X), X.n_rows, smooth=False)).to_dense()
    corpus = [[(int(w), int(c)) for w, c in zip(*np.unique(d, return_counts=True))] for d in docs]
    model = gensim.models.TfidfModel(corpus)
    theirs = np.zeros_like(ours)
    for i, row in enumerate(model[corpus]):
        for w, x in row:
            theirs[i, w] = x
    assert_close(ours, theirs, rtol=1e-6, atol=1e-7)   # gensim works in float32


# --- sparse products -------------------------------------------------------------------

@given(case=id_docs(), c=st.integers(1, 4), seed=seeds)
def test_sparse_products_match_dense_and_the_plain_loop(case, c, seed):
    docs, v = case
    rng = np.random.default_rng(seed)
    X = bow.count_ids(docs, v, dtype=np.float64)
    X = X.with_values(X.values * rng.uniform(0.5, 2.0, size=X.values.shape))
    W, G = rng.standard_normal((v, c)), rng.standard_normal((X.n_rows, c))
    D = X.to_dense()
    assert_close(bow.sparse_matmul(X, W), D @ W, rtol=1e-12, atol=1e-12)
    assert_close(bow.sparse_matmul_plain(X, W), bow.sparse_matmul(X, W), rtol=1e-12, atol=1e-12)
    assert_close(bow.sparse_t_matmul(X, G), D.T @ G, rtol=1e-12, atol=1e-12)


# --- the classifier -----------------------------------------------------------------

@st.composite
def logreg_cases(draw):
    """N >= 2 documents, C >= 2 classes, every document with at least two words."""
    n, v, c = draw(st.integers(2, 6)), draw(st.integers(2, 7)), draw(st.integers(2, 4))
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, v, size=rng.integers(2, 8)) for _ in range(n)]
    X = bow.count_ids(docs, v, dtype=np.float64)
    X = bow.tfidf(X, bow.idf_weights(bow.document_frequency(X), n)) if draw(st.booleans()) else X
    W, b = rng.standard_normal((v, c)) * 0.5, rng.standard_normal(c) * 0.5
    return X, W, b, rng.integers(0, c, size=n), draw(st.sampled_from([0.0, 0.1]))


@given(case=logreg_cases())
def test_logreg_backward_matches_finite_differences(case):
    X, W, b, y, lam = case
    report = bp.gradcheck(bow.logreg_forward, bow.logreg_backward, [X, W, b, y], wrt=[1, 2],
                          kwargs={"weight_decay": lam})
    assert_gradcheck(report)
    loss, cache = bow.logreg_forward(X, W, b, y, weight_decay=lam)
    dW, db = bow.logreg_backward(1.0, cache)
    used = np.bincount(X.indices, minlength=X.n_cols) > 0
    assert_alive([dW[used], db], loss=loss)
    if lam == 0:   # a word in no document gets no gradient
        assert not np.any(dW[~used])


@given(case=logreg_cases())
def test_logreg_loss_is_the_dense_formula(case):
    X, W, b, y, lam = case
    z = X.to_dense() @ W + b
    logp = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
    want = -logp[np.arange(len(y)), y].mean() + 0.5 * lam * np.sum(W ** 2)
    loss, _ = bow.logreg_forward(X, W, b, y, weight_decay=lam)
    assert float(loss) == pytest.approx(want, rel=1e-12)


def test_logreg_matches_torch_gradients():
    torch = pytest.importorskip("torch")
    X, W, b, y, _ = _fixed_case()
    Wt, bt = torch.tensor(W, requires_grad=True), torch.tensor(b, requires_grad=True)
    loss_t = torch.nn.functional.cross_entropy(torch.tensor(X.to_dense()) @ Wt + bt, torch.tensor(y))
    loss_t.backward()
    loss, cache = bow.logreg_forward(X, W, b, y)
    dW, db = bow.logreg_backward(1.0, cache)
    assert float(loss) == pytest.approx(loss_t.item(), rel=1e-12)
    assert_close(dW, Wt.grad.numpy(), rtol=1e-10, atol=1e-14)
    assert_close(db, bt.grad.numpy(), rtol=1e-10, atol=1e-14)


def _fixed_case():
    rng = np.random.default_rng(7)
    docs = [rng.integers(0, 9, size=6) for _ in range(5)]
    X = bow.count_ids(docs, 9, dtype=np.float64)
    return X, rng.standard_normal((9, 3)), rng.standard_normal(3), np.array([0, 1, 2, 1, 0]), 0


def test_trained_classifier_learns_topic_words():
    """Two topics with disjoint key words and shared filler: the classifier separates
    held-out documents it has never seen, better than the majority class."""
    rng = np.random.default_rng(0)
    def doc(topic):
        key = rng.integers(0, 5, size=4) + 5 * topic
        return np.concatenate([key, rng.integers(10, 20, size=8)])
    y = rng.integers(0, 2, size=80)
    X = bow.count_ids([doc(t) for t in y], 20, dtype=np.float64)
    idf = bow.idf_weights(bow.document_frequency(X), X.n_rows)
    Xt = bow.tfidf(X, idf)
    W, b, losses = bow.train_logreg(Xt, y, 2, steps=100, lr=0.1)
    assert losses[-1] < 0.5 * losses[0]
    y_test = rng.integers(0, 2, size=40)
    X_test = bow.tfidf(bow.count_ids([doc(t) for t in y_test], 20, dtype=np.float64), idf)
    assert np.mean(bow.predict(X_test, W, b) == y_test) > 0.95


def test_bow_errors():
    with pytest.raises(ValueError, match=r"docs\[1\]: expected ids in \[0, 3\), got 3"):
        bow.count_ids([np.array([0, 1]), np.array([3])], 3)
    with pytest.raises(TypeError, match=r"docs\[0\]: expected an integer array"):
        bow.count_ids([np.array([0.5])], 3)
    with pytest.raises(TypeError, match="docs: expected a list of word lists, got a str"):
        bow.count_vectors(["the dog"], {"the": 0})
    with pytest.raises(ValueError, match=r"df: expected document frequencies in \[0, n_docs=2\], got values in \[0, 3"):
        bow.idf_weights(np.array([0, 3]), 2)
    X = bow.count_ids([np.array([0, 1]), np.array([2])], 3, dtype=np.float64)
    with pytest.raises(ValueError, match=r"idf: expected shape \(3,\)"):
        bow.tfidf(X, np.ones(2))
    with pytest.raises(ValueError, match="norm: expected one of"):
        bow.tfidf(X, np.ones(3), norm="l1")
    W, b = np.zeros((3, 2)), np.zeros(2)
    with pytest.raises(ValueError, match=r"W: expected shape \(3, \*\)"):
        bow.logreg_forward(X, np.zeros((4, 2)), b, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"labels: expected ids in \[0, 2\), got 2"):
        bow.logreg_forward(X, W, b, np.array([0, 2]))
    with pytest.raises(ValueError, match=r"labels: expected shape \(2,\)"):
        bow.logreg_forward(X, W, b, np.array([0]))
    with pytest.raises(TypeError, match="X: expected a SparseRows"):
        bow.logreg_forward(X.to_dense(), W, b, np.array([0, 1]))
    with pytest.raises(ValueError, match="n_classes"):
        bow.train_logreg(X, np.array([0, 0]), 1)


def test_more_bad_input():
    X = bow.count_ids([np.array([0, 1]), np.array([2])], 3, dtype=np.float64)
    with pytest.raises(TypeError, match="X: expected a SparseRows"):
        bow.document_frequency(X.to_dense())
    with pytest.raises(ValueError, match=r"W: expected shape \(3, \*\)"):
        bow.sparse_matmul_plain(X, np.zeros((2, 2)))
    _, cache = bow.logreg_forward(X, np.zeros((3, 2)), np.zeros(2), np.array([0, 1]))
    with pytest.raises(ValueError, match="dloss: expected a scalar"):
        bow.logreg_backward(np.ones(2), cache)
