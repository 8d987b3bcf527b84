"""Bag of words: a document as the counts of its words, with the order thrown away.

The oldest text representation, and the first stop on the road to the Transformer:
document i becomes a vector x_i over the vocabulary, x_iw = how often word w occurs
in it. "the dog bit the man" and "the man bit the dog" get the same vector: order
is lost, and with it who did what to whom. What survives, which words are there,
is often enough to tell a topic or a genre.

TF-IDF reweights the counts by how informative a word is across the N documents:

    tfidf_iw = tf_iw * idf_w,     idf_w = ln((1 + N) / (1 + df_w)) + 1     (smooth)
                                  idf_w = ln(N / df_w)                     (plain)

df_w = the number of documents that contain w. A word in every document ("the")
gets the floor value, idf = 1 smoothed (so its tf-idf is just its count) and 0
plain (it is dropped); a word in one document gets the most. Rows are then
usually scaled to unit length (norm="l2"), so long documents do not dominate.

Sparse. A vocabulary has V ~ 10^4..10^6 words and a document uses a few hundred,
so a dense N x V matrix is almost all zeros (12,000 passages x 20,000 words = 240 M
numbers, 1.9 GB of float64, to hold ~0.6 M non-zeros). Here a set of documents is
a :class:`SparseRows`, the CSR layout: for row i, the columns indices[indptr[i]:
indptr[i+1]] (sorted) hold the values values[indptr[i]:indptr[i+1]]; nothing of
size N x V is ever made (to_dense is for tests on toy sizes).

The classifier: multinomial logistic regression (softmax regression) on those rows,

    logits = X W + b,      loss = mean_i -log softmax(logits_i)[y_i] + (lam / 2) |W|^2

with X sparse (N, V), W (V, C), b (C,). Backward, with G = dloss/dlogits
= (softmax(logits) - onehot(y)) / N:

    dW = X^T G + lam W,    db = sum_i G_i

X W and X^T G only touch the stored entries: each entry (i, w, x) adds x W_w to row
i of the logits, and x G_i to row w of dW. It is the baseline for ``train bert``'s
genre task (minillm/cli/train_bert.py): ``python -m minillm bench bow-genre``.

    X = count_ids(passages, vocab_size)                   # (N, V) sparse counts
    idf = idf_weights(document_frequency(X), X.n_rows)
    Xt = tfidf(X, idf)                                    # reweighted, unit rows
    W, b, losses = train_logreg(Xt, labels, n_classes=3)
    predict(Xt_test, W, b)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .backend import DEFAULT_DTYPE, check_choice, check_float, check_ids, check_int, check_int_arg, check_ndim, \
    check_number, check_shape
from .backprop import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from .optim import Adam

__all__ = ["SparseRows", "count_ids", "count_vectors", "document_frequency", "idf_weights", "tfidf",
           "sparse_matmul_plain", "sparse_matmul", "sparse_t_matmul", "LogRegCache", "logreg_forward",
           "logreg_backward", "logreg_logits", "predict", "train_logreg"]


class SparseRows(NamedTuple):
    """N documents over V words in CSR form (see the module docstring)."""
    indptr: np.ndarray    # (N + 1,) int64: row i's entries are [indptr[i], indptr[i + 1])
    indices: np.ndarray   # (nnz,) int64 word ids, increasing within a row
    values: np.ndarray    # (nnz,) float
    n_cols: int           # V

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def shape(self) -> tuple:
        return (self.n_rows, self.n_cols)

    def rows(self) -> np.ndarray:
        """(nnz,) the row of every stored entry."""
        return np.repeat(np.arange(self.n_rows), np.diff(self.indptr))

    def with_values(self, values) -> "SparseRows":
        """The same positions with new values (a new object; this one is unchanged)."""
        return SparseRows(self.indptr, self.indices, values, self.n_cols)

    def to_dense(self) -> np.ndarray:
        """(N, V) dense: for tests and toy sizes only."""
        out = np.zeros(self.shape, dtype=self.values.dtype)
        out[self.rows(), self.indices] = self.values
        return out


# ---------------------------------------------------------------------------
# Counts and TF-IDF
# ---------------------------------------------------------------------------

def count_ids(docs, vocab_size, dtype=DEFAULT_DTYPE) -> SparseRows:
    """Word counts of each document. docs: a list of (L_i,) int id arrays, or an (N, L)
    int array (rows = documents) -> SparseRows (N, vocab_size) of counts"""
    docs = _check_count_ids(docs, vocab_size)
    lengths = np.array([len(d) for d in docs], dtype=np.int64)                  # (N,)
    ids = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs] or [np.zeros(0, np.int64)])
    row = np.repeat(np.arange(len(docs)), lengths)                              # (sum L,)
    keys, counts = np.unique(row * vocab_size + ids, return_counts=True)       # sorted by (row, word)
    per_row = np.bincount(keys // vocab_size, minlength=len(docs))              # (N,) distinct words
    indptr = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64)
    return SparseRows(indptr, keys % vocab_size, counts.astype(dtype), int(vocab_size))


def count_vectors(docs, vocab: dict, dtype=DEFAULT_DTYPE) -> SparseRows:
    """Word counts of each document. docs: a list of word lists; vocab: {word: id};
    words not in vocab are dropped. -> SparseRows (N, len(vocab))"""
    _check_count_vectors(docs, vocab)
    return count_ids([np.array([vocab[w] for w in d if w in vocab], dtype=np.int64) for d in docs],
                     len(vocab), dtype=dtype)


def document_frequency(X: SparseRows) -> np.ndarray:
    """df_w: in how many rows word w has a non-zero entry. -> (V,) int64"""
    _check_sparse("X", X)
    return np.bincount(X.indices[X.values != 0], minlength=X.n_cols).astype(np.int64)


def idf_weights(df, n_docs, smooth=True) -> np.ndarray:
    """idf_w = ln((1 + N) / (1 + df_w)) + 1 (smooth), or ln(N / df_w) (plain; 0 where
    df_w = 0, a word the documents never use). df: (V,) -> (V,) float64"""
    df = _check_idf(df, n_docs)
    if smooth:
        return np.log((1.0 + n_docs) / (1.0 + df)) + 1.0
    return np.where(df > 0, np.log(n_docs / np.maximum(df, 1)), 0.0)


def tfidf(X: SparseRows, idf, norm="l2") -> SparseRows:
    """tf_iw * idf_w at every stored entry; norm="l2" then scales each row to unit length
    (an all-zero row stays zero), norm=None leaves it. -> SparseRows, same positions"""
    _check_tfidf(X, idf, norm)
    weighted = X.values * np.asarray(idf, dtype=X.values.dtype)[X.indices]     # (nnz,)
    if norm is None:
        return X.with_values(weighted)
    sq = np.bincount(X.rows(), weights=weighted * weighted, minlength=X.n_rows)  # (N,) |row|^2
    scale = 1.0 / np.maximum(np.sqrt(sq), np.finfo(np.float64).tiny)
    return X.with_values((weighted * scale[X.rows()]).astype(X.values.dtype))


# ---------------------------------------------------------------------------
# Sparse products: the plain loop, then the vectorised one
# ---------------------------------------------------------------------------

def sparse_matmul_plain(X: SparseRows, W) -> np.ndarray:
    """X W, one document at a time: row i = sum over its entries (w, x) of x W_w. -> (N, C)"""
    _check_sparse_matmul(X, W, "W", X.n_cols)
    out = np.zeros((X.n_rows, W.shape[1]), dtype=W.dtype)
    for i in range(X.n_rows):
        s, e = X.indptr[i], X.indptr[i + 1]
        out[i] = X.values[s:e] @ W[X.indices[s:e]]                               # (nnz_i,) @ (nnz_i, C)
    return out


def sparse_matmul(X: SparseRows, W) -> np.ndarray:
    """X W for X sparse (N, V), W dense (V, C), all entries at once: each entry's
    x W_w summed into its row by bincount, one column at a time. -> (N, C)"""
    _check_sparse_matmul(X, W, "W", X.n_cols)
    contrib = X.values[:, None] * W[X.indices]                                    # (nnz, C)
    rows = X.rows()
    return np.stack([np.bincount(rows, weights=contrib[:, c], minlength=X.n_rows)
                     for c in range(W.shape[1])], axis=1).astype(W.dtype)


def sparse_t_matmul(X: SparseRows, G) -> np.ndarray:
    """X^T G for X sparse (N, V), G dense (N, C): entry (i, w, x) adds x G_i to row w. -> (V, C)"""
    _check_sparse_matmul(X, G, "G", X.n_rows)
    contrib = X.values[:, None] * G[X.rows()]                                     # (nnz, C)
    return np.stack([np.bincount(X.indices, weights=contrib[:, c], minlength=X.n_cols)
                     for c in range(G.shape[1])], axis=1).astype(G.dtype)


# ---------------------------------------------------------------------------
# Softmax regression on sparse rows
# ---------------------------------------------------------------------------

class LogRegCache(NamedTuple):
    X: SparseRows
    W: np.ndarray           # (V, C), for the weight decay's gradient
    ce: object              # the cross-entropy's cache
    weight_decay: float


def logreg_logits(X: SparseRows, W, b) -> np.ndarray:
    """logits = X W + b. -> (N, C)"""
    _check_logreg(X, W, b)
    return sparse_matmul(X, W) + b                                                # (N, C)


def logreg_forward(X: SparseRows, W, b, labels, weight_decay=0.0):
    """loss = mean_i -log softmax(X W + b)_i[y_i] + (weight_decay / 2) |W|^2.

    X: SparseRows (N, V); W: (V, C); b: (C,); labels: (N,) int in [0, C) -> (loss 0-d, cache)
    """
    _check_logreg_forward(X, W, b, labels, weight_decay)
    logits = logreg_logits(X, W, b)                                               # (N, C)
    ce, ce_cache = softmax_cross_entropy_forward(logits, np.asarray(labels))
    penalty = 0.5 * weight_decay * np.sum(W * W)
    return (ce + penalty).astype(W.dtype), LogRegCache(X, W, ce_cache, float(weight_decay))


def logreg_backward(dloss, cache: LogRegCache):
    """-> (dW (V, C), db (C,)): dW = X^T G + lam W, db = sum_i G_i, G = dloss/dlogits."""
    _check_dloss(dloss)
    X, W, ce_cache, lam = cache
    # 2. the cross-entropy (and the penalty, which depends on W alone)
    dlogits = softmax_cross_entropy_backward(float(dloss), ce_cache)              # (N, C)
    # 1. logits = X W + b
    dW = sparse_t_matmul(X, dlogits) + float(dloss) * lam * W                     # (V, C)
    db = dlogits.sum(axis=0)                                                      # (C,)
    return dW, db


def predict(X: SparseRows, W, b) -> np.ndarray:
    """The most probable class of each row. -> (N,) int64"""
    return logreg_logits(X, W, b).argmax(axis=1)


def train_logreg(X: SparseRows, labels, n_classes, steps=300, lr=0.05, weight_decay=1e-4,
                 dtype=DEFAULT_DTYPE, log_every=0):
    """Full-batch Adam on the softmax-regression loss from W = 0, b = 0 (the loss is
    convex, so there is no random start to choose). -> (W (V, C), b (C,), losses per step)"""
    _check_train_logreg(X, labels, n_classes, steps, lr, weight_decay)
    params = {"W": np.zeros((X.n_cols, n_classes), dtype=dtype), "b": np.zeros(n_classes, dtype=dtype)}
    X = X.with_values(X.values.astype(dtype))
    opt = Adam(params, lr=lr)
    losses = []
    for step in range(steps):
        loss, cache = logreg_forward(X, params["W"], params["b"], labels, weight_decay)
        dW, db = logreg_backward(1.0, cache)
        opt.step({"W": dW, "b": db})
        losses.append(float(loss))
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1:5d}  loss {loss:.4f}")
    return params["W"], params["b"], losses


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------

def _check_count_ids(docs, vocab_size):
    check_int_arg("vocab_size", vocab_size, lo=1)
    if hasattr(docs, "ndim"):
        check_int("docs", docs)
        check_ndim("docs", docs, 2)
        docs = list(docs)
    if not isinstance(docs, (list, tuple)):
        raise TypeError(f"docs: expected a list of int id arrays or an (N, L) int array, got {type(docs).__name__}")
    for i, d in enumerate(docs):
        d = np.asarray(d)
        if d.size:
            check_int(f"docs[{i}]", d)
        check_ndim(f"docs[{i}]", d, 1)
        check_ids(f"docs[{i}]", d.astype(np.int64), vocab_size)
    return docs


def _check_count_vectors(docs, vocab):
    if not isinstance(vocab, dict):
        raise TypeError(f"vocab: expected a dict word -> id, got {type(vocab).__name__}")
    if isinstance(docs, str) or any(isinstance(d, str) for d in docs):
        raise TypeError("docs: expected a list of word lists, got a str among them (split the text first)")


def _check_idf(df, n_docs):
    df = np.asarray(df)
    check_int("df", df)
    check_ndim("df", df, 1)
    check_int_arg("n_docs", n_docs, lo=1)
    if df.size and (df.min() < 0 or df.max() > n_docs):
        raise ValueError(f"df: expected document frequencies in [0, n_docs={n_docs}], "
                         f"got values in [{df.min()}, {df.max()}]")
    return df.astype(np.float64)


def _check_sparse(name, X):
    if not isinstance(X, SparseRows):
        raise TypeError(f"{name}: expected a SparseRows (from count_ids / count_vectors), got {type(X).__name__}")


def _check_tfidf(X, idf, norm):
    _check_sparse("X", X)
    check_shape("idf", np.asarray(idf), (X.n_cols,))
    check_choice("norm", norm, ("l2", None))


def _check_sparse_matmul(X, A, name, rows):
    _check_sparse("X", X)
    check_float(name, A)
    check_ndim(name, A, 2)
    check_shape(name, A, (rows, None))


def _check_logreg(X, W, b):
    _check_sparse("X", X)
    check_float("W", W)
    check_ndim("W", W, 2)
    check_shape("W", W, (X.n_cols, None))
    check_shape("b", b, (W.shape[1],))


def _check_logreg_forward(X, W, b, labels, weight_decay):
    _check_logreg(X, W, b)
    labels = np.asarray(labels)
    check_shape("labels", labels, (X.n_rows,))
    check_ids("labels", labels, W.shape[1])
    check_number("weight_decay", weight_decay, 0.0)
    if X.n_rows == 0:
        raise ValueError("X: expected at least one document (N >= 1), got N = 0")


def _check_dloss(dloss):
    if hasattr(dloss, "shape") and dloss.ndim != 0:
        raise ValueError(f"dloss: expected a scalar (the loss is a mean), got shape {tuple(dloss.shape)}")


def _check_train_logreg(X, labels, n_classes, steps, lr, weight_decay):
    _check_sparse("X", X)
    check_int_arg("n_classes", n_classes, lo=2)
    check_int_arg("steps", steps, lo=1)
    check_number("lr", lr, 0.0, lo_open=True)
    check_number("weight_decay", weight_decay, 0.0)
    labels = np.asarray(labels)
    check_shape("labels", labels, (X.n_rows,))
    check_ids("labels", labels, n_classes)
