"""Word vectors by skip-gram and CBOW with negative sampling (SGNS, Mikolov et al. 2013).

The idea: a word is known by the company it keeps. Give every word two vectors,
v_w (as a centre word, table ``w_in``) and u_w (as a context word, table
``w_out``), and train them so that the dot product u_o . v_c is large when o
appears within a few words of c in real text, and small for random words.

Negative sampling turns that into K + 1 logistic regressions per (centre, context)
pair instead of a softmax over the whole vocabulary:

    loss = -log sigma(u_o . v_c) - sum_k log sigma(-u_k . v_c),   k = 1..K

where the "negative" words n_k are drawn from the unigram distribution raised to
the power 3/4, P(w) ~ count(w)^0.75 (which gives rare words a little more weight
than their frequency). The gradients, with sigma'(x) = sigma(x) sigma(-x):

    d/dv_c = -sigma(-u_o.v_c) u_o + sum_k sigma(u_k.v_c) u_k
    d/du_o = -sigma(-u_o.v_c) v_c        d/du_k = sigma(u_k.v_c) v_c

Two more tricks from the paper: frequent words ("the", "and") are randomly
dropped from the training text with probability 1 - sqrt(t / f(w)), f the word's
relative frequency (they carry little information and dominate the pairs); and
the context window is drawn uniformly in 1..window for each centre, so near
neighbours count more often than far ones.

CBOW (continuous bag of words), the paper's other model, turns the task around:
predict the centre word from the mean of its context words' input vectors,

    h = (1/|C|) sum_{j in C} v_j,   loss = -log sigma(u_t . h) - sum_k log sigma(-u_k . h)

(C the unmasked context positions; a window cut short by a sentence edge has
fewer). It is the SGNS loss with v_c replaced by h, so its gradient is SGNS's
d/dv_c, shared equally by the context words: d/dv_j = (1/|C|) d/dh for j in C,
and 0 at masked positions. With one context word h = v_j and CBOW's loss is
skip-gram's for that pair. One example per centre instead of one per pair makes
CBOW several times faster; averaging blurs the context, and the paper found
skip-gram better on analogies (the seeds quote 61.2 % CBOW vs 73.8 % skip-gram on
Google News; BENCHMARKS.md says what Shakespeare gives).

Analogies ("man is to king as woman is to ?"): with unit vectors e_w, 3CosAdd answers

    d* = argmax_{d not in {a, b, c}} cos(e_d, e_b - e_a + e_c)

(Mikolov et al. 2013; the ranking is that of cos(d, b) - cos(d, a) + cos(d, c), Levy
and Goldberg's reading). The standard test set, questions-words.txt (19,544
questions, 14 sections such as capital-common-countries and gram3-comparative),
ships with gensim; :func:`shakespeare_analogies` is a small set that fits a 1600s
vocabulary (king:queen::lord:lady, thou:thee::he:him). A question counts only if
all four words are in the vocabulary: report that coverage beside the accuracy.

The word2vec text format, which gensim's KeyedVectors reads and writes: a header
line "V D", then one line per word, "word x_1 ... x_D", most frequent first.

After training, words used in the same contexts have nearby v vectors: the
cosine similarity of ``w_in`` rows is the similarity of the words. An embedding
table in a transformer (embeddings.py) is learned the same way, as a gather
whose backward is a scatter-add; here the loss is just much simpler.

    vocab = build_vocab(tokens, min_count=2)
    model = Word2Vec(vocab, dim=50, seed=0)         # sg=1, skip-gram; sg=0 for CBOW
    model.train(encode(tokens, vocab), epochs=3, window=5, negatives=5)
    model.most_similar("king", k=5)
    model.analogy("man", "king", "woman")           # "man is to king as woman is to ?"
    model.save_word2vec_format("vectors.txt")       # readable by gensim's KeyedVectors
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .backend import (DEFAULT_DTYPE, array_module, check_choice, check_float, check_ids, check_int,
                      check_int_arg, check_ndim, check_positive, check_same_dtype, check_shape, make_rng,
                      atomic_write, scatter_add, to_device, to_numpy)
from .optim import Adam

__all__ = ["Vocab", "build_vocab", "encode", "keep_probabilities", "subsample", "noise_distribution",
           "sample_negatives", "skipgram_pairs", "log_sigmoid", "sigmoid", "SGNSCache", "sgns_forward",
           "sgns_backward", "sgns_loss_and_grads", "cbow_windows", "CBOWCache", "cbow_forward", "cbow_backward",
           "cbow_loss_and_grads", "Word2Vec", "analogy_scores", "read_analogies", "questions_words_path",
           "shakespeare_analogies", "evaluate_analogies"]


# ---------------------------------------------------------------------------
# Vocabulary, subsampling, noise distribution
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Vocab:
    """A word list with counts: len(vocab) is the number of words."""
    words: list          # id -> word, most frequent first (ties: first appearance)
    counts: np.ndarray   # (V,) int64 counts in the text the vocabulary was built from
    index: dict          # word -> id

    def __len__(self):
        return len(self.words)


def _check_build_vocab(tokens, min_count, max_size):
    if isinstance(tokens, str):
        raise TypeError("tokens: expected a list of words, got a str (split it first, e.g. text.split())")
    check_int_arg("min_count", min_count, lo=1)
    check_int_arg("max_size", max_size, lo=1, optional=True)


def _check_some_word_kept(kept, counts, min_count):
    if not kept:
        raise ValueError(f"tokens: no word occurs at least min_count={min_count} times "
                         f"({len(counts)} distinct words in {sum(counts.values())} tokens)")


def build_vocab(tokens, min_count=1, max_size=None) -> Vocab:
    """The words seen at least ``min_count`` times, most frequent first (at most ``max_size``)."""
    _check_build_vocab(tokens, min_count, max_size)
    counts = Counter(tokens)  # dicts keep insertion order, so equal counts stay in order of appearance
    kept = sorted(((w, c) for w, c in counts.items() if c >= min_count), key=lambda wc: -wc[1])
    if max_size is not None:
        kept = kept[:max_size]
    _check_some_word_kept(kept, counts, min_count)
    words = [w for w, _ in kept]
    return Vocab(words, np.array([c for _, c in kept], dtype=np.int64), {w: i for i, w in enumerate(words)})


def encode(tokens, vocab: Vocab) -> np.ndarray:
    """Token list -> int64 ids; words not in the vocabulary are dropped (as word2vec does)."""
    index = vocab.index
    return np.array([index[t] for t in tokens if t in index], dtype=np.int64)


def _check_counts(counts):
    if counts.ndim != 1 or counts.size == 0 or np.any(counts < 0) or counts.sum() <= 0:
        raise ValueError(f"counts: expected a non-empty 1-D array of non-negative counts with a positive "
                         f"sum, got shape {counts.shape}")


def keep_probabilities(counts, t=1e-5) -> np.ndarray:
    """P(keep w) = min(1, sqrt(t / f(w))), f(w) = count(w) / total: the paper's subsampling rule.

    Words rarer than t are always kept; a word with frequency 100 t is kept 10 % of
    the time. (The released C code uses a slightly different formula; this is the
    paper's.) counts: (V,) -> (V,) float64
    """
    counts = np.asarray(to_numpy(counts), dtype=np.float64)
    _check_counts(counts)
    check_positive("t", t)
    f = counts / counts.sum()                                   # (V,) relative frequencies
    with np.errstate(divide="ignore"):
        return np.minimum(1.0, np.sqrt(t / f))


def subsample(ids, counts, t=1e-5, rng=None) -> np.ndarray:
    """ids with each occurrence of word w dropped with probability 1 - keep_probabilities(counts)[w]."""
    keep = keep_probabilities(counts, t)                        # (V,)
    check_ids("ids", ids, len(keep))
    ids = to_numpy(ids)
    return ids[make_rng(rng).random(ids.shape) < keep[ids]]


def noise_distribution(counts, power=0.75) -> np.ndarray:
    """P_n(w) = count(w)^power / sum_v count(v)^power: where negative words are drawn from.

    power 1 is the unigram distribution, 0 the uniform one; 0.75 (the paper's
    choice) sits between, giving rare words more chances to be a negative.
    """
    counts = np.asarray(to_numpy(counts), dtype=np.float64)
    _check_counts(counts)
    p = counts ** float(power)
    return p / p.sum()


def sample_negatives(noise, shape, rng) -> np.ndarray:
    """int64 ids of ``shape`` drawn from the distribution ``noise`` (V,), on the CPU.

    Inverse-CDF sampling: one uniform number per draw and a binary search in the
    cumulative distribution (the C code's big lookup table does the same job).
    """
    cdf = np.cumsum(noise)
    u = make_rng(rng).random(shape) * cdf[-1]
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(noise) - 1).astype(np.int64)


def _check_skipgram_pairs(ids, window, segments):
    check_int("ids", ids)
    check_ndim("ids", ids, 1)
    check_int_arg("window", window, lo=1)
    if segments is not None:
        check_int("segments", segments)
        check_shape("segments", segments, (len(ids),))


def skipgram_pairs(ids, window, rng=None, segments=None):
    """All (centre, context) pairs with the context within ``window`` positions of the centre.

    With ``rng``, each centre gets its own window b ~ Uniform{1..window} (the paper's
    dynamic window: a neighbour at distance d is used with probability
    (window - d + 1) / window); with rng=None every centre uses the full window.
    ``segments`` (N,) labels sentences: a pair never crosses from one label to another.
    ids: (N,) int -> (centres, contexts): two int64 arrays of equal length, grouped by offset.
    """
    _check_skipgram_pairs(ids, window, segments)
    ids = to_numpy(ids).astype(np.int64, copy=False)
    n = len(ids)
    segments = None if segments is None else to_numpy(segments)
    reach = (np.full(n, window) if rng is None else make_rng(rng).integers(1, window + 1, size=n))
    centres, contexts = [], []
    for d in range(1, min(window, n - 1) + 1):
        same = np.ones(n - d, bool) if segments is None else segments[: n - d] == segments[d:]
        # centre i, context i + d (to the right) and centre i + d, context i (to the left)
        right = np.flatnonzero((reach[: n - d] >= d) & same)
        centres.append(ids[right]); contexts.append(ids[right + d])
        left = np.flatnonzero((reach[d:] >= d) & same)
        centres.append(ids[left + d]); contexts.append(ids[left])
    if not centres:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(centres), np.concatenate(contexts)


# ---------------------------------------------------------------------------
# The loss and its gradient
# ---------------------------------------------------------------------------

def log_sigmoid(x):
    """log sigma(x) = -log(1 + e^-x), computed as min(x, 0) - log1p(e^-|x|).

    The naive form overflows e^-x for x << 0 (and log(sigma) hits log 0 = -inf);
    this one never exponentiates a positive number, so it is finite for any finite x.
    """
    xp = array_module(x)
    return xp.minimum(x, 0) - xp.log1p(xp.exp(-xp.abs(x)))


def sigmoid(x):
    """sigma(x) = 1 / (1 + e^-x) without overflow: e^(min(x,0)) / (1 + e^-|x|)."""
    xp = array_module(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, xp.ones_like(e), e) / (1 + e)


class SGNSCache(NamedTuple):
    center: object      # (B, D) v_c
    context: object     # (B, D) u_o
    negative: object    # (B, K, D) u_k
    g_pos: object       # (B,) d loss_b / d(u_o.v_c) = -sigma(-u_o.v_c)
    g_neg: object       # (B, K) d loss_b / d(u_k.v_c) = sigma(u_k.v_c)


def _check_sgns(center_vecs, context_vecs, negative_vecs):
    for name, a in (("center_vecs", center_vecs), ("context_vecs", context_vecs),
                    ("negative_vecs", negative_vecs)):
        check_float(name, a)
    check_same_dtype(center_vecs=center_vecs, context_vecs=context_vecs, negative_vecs=negative_vecs)
    check_ndim("center_vecs", center_vecs, 2)
    b, d = center_vecs.shape
    check_shape("context_vecs", context_vecs, (b, d))
    check_ndim("negative_vecs", negative_vecs, 3)
    check_shape("negative_vecs", negative_vecs, (b, None, d))
    if b == 0:
        raise ValueError("center_vecs: expected at least one pair (B >= 1), got B = 0")


def sgns_forward(center_vecs, context_vecs, negative_vecs):
    """loss = mean_b [ -log sigma(u_o . v_c) - sum_k log sigma(-u_k . v_c) ].

    center_vecs v_c: (B, D), context_vecs u_o: (B, D), negative_vecs u_k: (B, K, D)
    -> loss: 0-d array, cache
    """
    _check_sgns(center_vecs, context_vecs, negative_vecs)
    b = center_vecs.shape[0]
    pos = (center_vecs * context_vecs).sum(axis=-1)                   # (B,)
    neg = (negative_vecs @ center_vecs[:, :, None])[..., 0]           # (B, K): u_k . v_c
    loss = -(log_sigmoid(pos).sum() + log_sigmoid(-neg).sum()) / b   # 0-d
    # d/dx [-log sigma(x)] = -sigma(-x);  d/dx [-log sigma(-x)] = sigma(x)
    return loss, SGNSCache(center_vecs, context_vecs, negative_vecs, -sigmoid(-pos), sigmoid(neg))


def _check_dloss(dloss):
    if hasattr(dloss, "shape") and dloss.ndim != 0:
        raise ValueError(f"dloss: expected a scalar (the loss is a mean), got shape {tuple(dloss.shape)}")


def sgns_backward(dloss, cache: SGNSCache):
    """-> (d_center (B, D), d_context (B, D), d_negative (B, K, D)) for the mean loss.

    d_center = (g_pos u_o + sum_k g_neg_k u_k) / B,  d_context = g_pos v_c / B,
    d_negative_k = g_neg_k v_c / B,  times dloss.
    """
    _check_dloss(dloss)
    v, u_o, u_k, g_pos, g_neg = cache
    c = v.dtype.type(float(dloss) / v.shape[0])
    gp = (c * g_pos)[:, None]                                         # (B, 1)
    gn = c * g_neg                                                    # (B, K)
    d_center = gp * u_o + (gn[:, None, :] @ u_k)[:, 0, :]             # (B,1,K) @ (B,K,D)
    d_context = gp * v                                                # (B, D)
    d_negative = gn[:, :, None] * v[:, None, :]                       # (B, K, D)
    return d_center, d_context, d_negative


def _check_sgns_ids(vocab_size, **ids):
    for name, a in ids.items():
        check_ids(name, a, vocab_size)


def sgns_loss_and_grads(params: dict, centers, contexts, negatives):
    """The SGNS loss for a batch of pairs, with gradients for the two whole tables.

    Gathers v_c = w_in[centers], u_o = w_out[contexts], u_k = w_out[negatives], runs
    sgns_forward/backward, then scatter-adds the row gradients back into zero
    tables: a word that appears several times in the batch (as a centre, a
    context or a negative) gets the sum of its rows' gradients.
    params: {"w_in": (V, D), "w_out": (V, D)}; centers, contexts: (B,) int;
    negatives: (B, K) int -> (loss: float, {"w_in": (V, D), "w_out": (V, D)})
    """
    w_in, w_out = params["w_in"], params["w_out"]
    xp = array_module(w_in)
    centers, contexts, negatives = (xp.asarray(a) for a in (centers, contexts, negatives))
    _check_sgns_ids(w_in.shape[0], centers=centers, contexts=contexts, negatives=negatives)
    loss, cache = sgns_forward(w_in[centers], w_out[contexts], w_out[negatives])
    d_c, d_o, d_k = sgns_backward(1.0, cache)
    g_in = xp.zeros_like(w_in)
    g_out = xp.zeros_like(w_out)
    scatter_add(g_in, centers, d_c)
    scatter_add(g_out, contexts, d_o)
    scatter_add(g_out, negatives.reshape(-1), d_k.reshape(-1, w_out.shape[1]))
    return float(loss), {"w_in": g_in, "w_out": g_out}


# ---------------------------------------------------------------------------
# CBOW: the centre word from the mean of its context
# ---------------------------------------------------------------------------

def _check_cbow_windows(ids, window, segments):
    _check_skipgram_pairs(ids, window, segments)


def cbow_windows(ids, window, rng=None, segments=None):
    """One CBOW example per centre: its id and the ids of its context window.

    Offsets -window..-1, 1..window; a position is masked out (False) where it falls
    off the text, crosses into another ``segments`` label, or lies beyond the
    centre's dynamic window (with ``rng``: b ~ Uniform{1..window}, as skipgram_pairs).
    Centres with no context at all are dropped. Masked ids are 0 (never used).
    ids: (N,) int -> (targets (M,), contexts (M, 2 window), mask (M, 2 window) bool)
    """
    _check_cbow_windows(ids, window, segments)
    ids = to_numpy(ids).astype(np.int64, copy=False)
    n = len(ids)
    segments = None if segments is None else to_numpy(segments)
    reach = (np.full(n, window) if rng is None else make_rng(rng).integers(1, window + 1, size=n))
    offsets = np.array([d for d in range(-window, window + 1) if d != 0])   # (2 window,)
    pos = np.arange(n)[:, None] + offsets[None, :]                          # (N, 2 window)
    inside = (pos >= 0) & (pos < n) & (np.abs(offsets)[None, :] <= reach[:, None])
    safe = np.clip(pos, 0, max(n - 1, 0))
    if segments is not None:
        inside &= segments[safe] == segments[:, None]
    keep = inside.any(axis=1)                                                # (N,)
    contexts = np.where(inside, ids[safe], 0)
    return ids[keep], contexts[keep], inside[keep]


class CBOWCache(NamedTuple):
    mask: object        # (B, W) bool, the context positions that count
    count: object       # (B,) |C|, how many do
    sgns: SGNSCache     # the SGNS cache with h in the centre's place


def _check_cbow(context_vecs, context_mask, target_vecs, negative_vecs):
    check_float("context_vecs", context_vecs)
    check_ndim("context_vecs", context_vecs, 3)
    b, w, d = context_vecs.shape
    if getattr(context_mask, "dtype", None) != bool:
        raise TypeError(f"context_mask: expected a bool array, got "
                        f"{getattr(context_mask, 'dtype', type(context_mask).__name__)}")
    check_shape("context_mask", context_mask, (b, w))
    if b and w == 0:
        raise ValueError("context_vecs: expected at least one context position (W >= 1), got W = 0")
    empty = ~context_mask.any(axis=1)
    if bool(empty.any()):
        raise ValueError(f"context_mask: every row needs at least one unmasked context word; "
                         f"rows {to_numpy(empty).nonzero()[0][:5].tolist()} have none")
    _check_sgns(context_vecs[:, 0, :], target_vecs, negative_vecs)  # B >= 1, D, dtypes, (B, K, D)


def cbow_forward(context_vecs, context_mask, target_vecs, negative_vecs):
    """loss = mean_b [ -log sigma(u_t . h) - sum_k log sigma(-u_k . h) ], h the masked mean.

    context_vecs v_j: (B, W, D), context_mask: (B, W) bool, target_vecs u_t: (B, D),
    negative_vecs u_k: (B, K, D) -> loss: 0-d array, cache
    """
    _check_cbow(context_vecs, context_mask, target_vecs, negative_vecs)
    m = context_mask.astype(context_vecs.dtype)                              # (B, W)
    count = m.sum(axis=1)                                                    # (B,) |C|
    h = (m[:, :, None] * context_vecs).sum(axis=1) / count[:, None]          # (B, D)
    loss, sgns = sgns_forward(h, target_vecs, negative_vecs)                 # 0-d
    return loss, CBOWCache(m, count, sgns)


def cbow_backward(dloss, cache: CBOWCache):
    """-> (d_context (B, W, D), d_target (B, D), d_negative (B, K, D)) for the mean loss.

    Backward of the SGNS loss gives d/dh; the mean hands d/dh / |C| to every
    unmasked context position and 0 to the masked ones.
    """
    m, count, sgns = cache
    # 2. the loss of h: SGNS's backward with h as the centre
    d_h, d_target, d_negative = sgns_backward(dloss, sgns)                   # (B, D)
    # 1. h = sum_j m_j v_j / |C|
    d_context = m[:, :, None] * (d_h / count[:, None])[:, None, :]           # (B, W, D)
    return d_context, d_target, d_negative


def cbow_loss_and_grads(params: dict, contexts, mask, targets, negatives):
    """The CBOW loss for a batch, with gradients for the two whole tables.

    h from w_in[contexts] (masked mean), u_t = w_out[targets], u_k = w_out[negatives];
    the context rows' gradients are scatter-added into w_in at the unmasked positions.
    params: {"w_in": (V, D), "w_out": (V, D)}; contexts, mask: (B, W); targets: (B,);
    negatives: (B, K) -> (loss: float, {"w_in": (V, D), "w_out": (V, D)})
    """
    w_in, w_out = params["w_in"], params["w_out"]
    xp = array_module(w_in)
    contexts, mask, targets, negatives = (xp.asarray(a) for a in (contexts, mask, targets, negatives))
    _check_sgns_ids(w_in.shape[0], contexts=contexts, targets=targets, negatives=negatives)
    loss, cache = cbow_forward(w_in[contexts], mask, w_out[targets], w_out[negatives])
    d_ctx, d_t, d_k = cbow_backward(1.0, cache)
    g_in = xp.zeros_like(w_in)
    g_out = xp.zeros_like(w_out)
    scatter_add(g_in, contexts[mask], d_ctx[mask])
    scatter_add(g_out, targets, d_t)
    scatter_add(g_out, negatives.reshape(-1), d_k.reshape(-1, w_out.shape[1]))
    return float(loss), {"w_in": g_in, "w_out": g_out}


# ---------------------------------------------------------------------------
# Analogies
# ---------------------------------------------------------------------------

def _unit_rows(vectors):
    w = np.asarray(to_numpy(vectors), dtype=np.float64)
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def analogy_scores(unit, a, b, c):
    """cos(e_d, q) for every word d, q = (e_b - e_a + e_c) / |.|, and -inf at a, b and c.

    unit: (V, D) unit rows; a, b, c: (Q,) int ids -> (Q, V) float64
    """
    _check_analogy_scores(unit, a=a, b=b, c=c)
    q = unit[b] - unit[a] + unit[c]                                   # (Q, D)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    scores = q @ unit.T                                               # (Q, V)
    for ids in (a, b, c):                                             # a new array each time
        scores = np.where(np.arange(unit.shape[0])[None, :] == np.asarray(ids)[:, None], -np.inf, scores)
    return scores


def read_analogies(source) -> list:
    """Analogy questions in questions-words.txt's format: ": section" lines, then
    "a b c d" lines (a is to b as c is to d). source: a path or an iterable of lines.
    -> [(section, a, b, c, d)], words as written"""
    lines = _analogy_lines(source)
    out, section = [], ""
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith(":"):
            section = line[1:].strip()
            continue
        words = line.split()
        _check_analogy_line(source, n, line, words)
        out.append((section, *words))
    return out


def questions_words_path():
    """The path of questions-words.txt inside gensim's test data, or None without gensim."""
    try:
        from gensim.test.utils import datapath
    except ImportError:
        return None
    path = datapath("questions-words.txt")
    return path if os.path.isfile(path) else None


# Our own analogy set: word pairs that recur in Shakespeare, lower case. Each section's
# questions are every ordered choice of two different pairs (p, q): p0 p1 q0 q1.
SHAKESPEARE_PAIRS = {
    "gender": [("king", "queen"), ("lord", "lady"), ("prince", "princess"), ("duke", "duchess"),
               ("father", "mother"), ("son", "daughter"), ("brother", "sister"), ("husband", "wife"),
               ("man", "woman"), ("uncle", "aunt"), ("master", "mistress"), ("sir", "madam"),
               ("gentleman", "gentlewoman"), ("boy", "girl"), ("he", "she"), ("his", "her"), ("him", "her"),
               ("himself", "herself")],
    "pronoun-subject-object": [("i", "me"), ("thou", "thee"), ("he", "him"), ("she", "her"), ("we", "us"),
                               ("they", "them"), ("ye", "you"), ("who", "whom")],
    "pronoun-subject-possessive": [("i", "my"), ("thou", "thy"), ("he", "his"), ("she", "her"), ("we", "our"),
                                   ("you", "your"), ("they", "their")],
    "plural": [("king", "kings"), ("lord", "lords"), ("man", "men"), ("woman", "women"), ("eye", "eyes"),
               ("hand", "hands"), ("friend", "friends"), ("heart", "hearts"), ("word", "words"),
               ("day", "days"), ("son", "sons"), ("brother", "brothers"), ("soldier", "soldiers"),
               ("enemy", "enemies"), ("child", "children")],
    "verb-thou-form": [("do", "dost"), ("have", "hast"), ("will", "wilt"), ("shall", "shalt"),
                       ("can", "canst"), ("are", "art"), ("may", "mayst"), ("know", "knowest")],
}


def shakespeare_analogies() -> list:
    """Our analogy questions from SHAKESPEARE_PAIRS: [(section, a, b, c, d)]."""
    return [(section, p[0], p[1], q[0], q[1]) for section, pairs in SHAKESPEARE_PAIRS.items()
            for p in pairs for q in pairs if p != q and p[0] != q[0] and p[1] != q[1]]


def evaluate_analogies(vectors, words, questions, lowercase=True, batch=512) -> dict:
    """3CosAdd accuracy of word vectors on analogy questions, over the questions whose
    four words are all in ``words`` (the in-vocabulary coverage is reported beside it).

    vectors: (V, D); words: V words (row order); questions: [(section, a, b, c, d)]
    (from read_analogies) -> {"correct", "in_vocab", "total", "coverage", "accuracy",
    "sections": {section: {"correct", "in_vocab", "total"}}}
    """
    _check_evaluate_analogies(vectors, words, questions)
    index = {w: i for i, w in enumerate(words)}
    norm = (lambda w: w.lower()) if lowercase else (lambda w: w)
    sections, known = {}, []
    for sec, *four in questions:
        ids = [index.get(norm(w)) for w in four]
        sections.setdefault(sec, {"correct": 0, "in_vocab": 0, "total": 0})["total"] += 1
        if None not in ids:
            known.append((sec, *ids))
    unit = _unit_rows(vectors)
    for start in range(0, len(known), batch):
        chunk = known[start:start + batch]
        a, b, c, d = (np.array([q[j] for q in chunk]) for j in range(1, 5))
        guess = analogy_scores(unit, a, b, c).argmax(axis=1)           # (Q,)
        for (sec, *_), ok in zip(chunk, guess == d):
            sections[sec]["in_vocab"] += 1
            sections[sec]["correct"] += int(ok)
    correct, in_vocab = sum(v["correct"] for v in sections.values()), len(known)
    return {"correct": correct, "in_vocab": in_vocab, "total": len(questions),
            "coverage": in_vocab / max(len(questions), 1), "accuracy": correct / in_vocab if in_vocab else float("nan"),
            "sections": sections}


# ---------------------------------------------------------------------------
# The word2vec text format
# ---------------------------------------------------------------------------

def _write_word2vec_text(f, words, vectors):
    fmt = "%.17g" if vectors.dtype == np.float64 else "%.9g"   # enough digits to read back the same number
    f.write(f"{len(words)} {vectors.shape[1]}\n")
    for w, row in zip(words, vectors):
        f.write(w + " " + " ".join(fmt % x for x in row.tolist()) + "\n")


def _read_word2vec_text(path, dtype):
    """-> (words, (V, D) array) of a word2vec text file."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().split()
        _check_word2vec_header(path, header)
        v, d = int(header[0]), int(header[1])
        words, rows = [], []
        for n, line in enumerate(f, 2):
            if not line.strip():
                continue
            parts = line.rstrip("\n").rstrip().rsplit(" ", d)
            _check_word2vec_row(path, n, parts, d)
            words.append(parts[0])
            rows.append([float(x) for x in parts[1:]])
    _check_word2vec_count(path, words, v)
    return words, np.array(rows, dtype=dtype).reshape(v, d)


# ---------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------

def _id_stream(ids):
    """(ids, segments): one int64 id array, and for a list of sentences the sentence
    index of every id (None for a single array), so that pairs stay inside sentences."""
    if isinstance(ids, (list, tuple)):
        for i, sent in enumerate(ids):
            check_int(f"ids[{i}]", sent)
            check_ndim(f"ids[{i}]", sent, 1)
        empty = [np.zeros(0, np.int64)]
        segments = np.concatenate([np.full(len(a), i, np.int64) for i, a in enumerate(ids)] or empty)
        return np.concatenate([to_numpy(a).astype(np.int64) for a in ids] or empty), segments
    check_int("ids", ids)
    check_ndim("ids", ids, 1)
    return to_numpy(ids), None


def _check_train(ids, vocab_size, epochs, negatives, batch_size, optimizer, lr):
    """-> the learning rate to use, after checking the arguments of Word2Vec.train."""
    check_ids("ids", ids, vocab_size)
    for name, v in (("epochs", epochs), ("negatives", negatives), ("batch_size", batch_size)):
        check_int_arg(name, v, lo=1)
    check_choice("optimizer", optimizer, ("sgd", "adam"))
    lr0 = (0.025 if optimizer == "sgd" else 0.01) if lr is None else lr
    check_positive("lr", lr0)
    return lr0


def _check_has_pairs(centres, seq):
    if len(centres) == 0:
        raise ValueError(f"ids: too short to make a training example (got {len(seq)} ids after subsampling)")


def _check_word2vec(vocab, dim, sg):
    if not isinstance(vocab, Vocab):
        raise TypeError(f"vocab: expected a Vocab (from build_vocab), got {type(vocab).__name__}")
    check_int_arg("dim", dim, lo=1)
    check_choice("sg", sg, (0, 1))


class Word2Vec:
    """Two embedding tables trained with SGNS (sg=1, skip-gram) or CBOW (sg=0), and
    cosine-similarity and analogy queries.

    params: {"w_in": (V, D) centre vectors (the word vectors you keep),
             "w_out": (V, D) context vectors}
    Initialised as the C code does: w_in ~ Uniform(-0.5/D, 0.5/D), w_out = 0 (the
    first updates then move w_out towards the centres, and w_in follows).
    """

    def __init__(self, vocab: Vocab, dim=50, seed=0, dtype=DEFAULT_DTYPE, device=None, sg=1):
        _check_word2vec(vocab, dim, sg)
        self.vocab = vocab
        self.dim = int(dim)
        self.sg = int(sg)   # 1: skip-gram (a centre predicts each context word), 0: CBOW
        self.rng = make_rng(seed)
        w_in = ((self.rng.random((len(vocab), dim)) - 0.5) / dim).astype(dtype)
        self.params = to_device({"w_in": w_in, "w_out": np.zeros((len(vocab), dim), dtype=dtype)}, device)

    def train(self, ids, epochs=1, window=5, negatives=5, batch_size=256, lr=None, optimizer="adam",
              subsample_t=1e-3, min_lr_fraction=1e-4, log_every=0) -> list:
        """Train on word ids, (N,) or a list of sentences; returns the mean loss of each batch.

        Each epoch subsamples frequent words (``subsample_t``; None to skip), makes
        the skip-gram pairs (sg=1) or the CBOW windows (sg=0) with dynamic windows,
        shuffles them, and for each batch draws ``negatives`` noise words per example
        from the unigram^0.75 distribution.

        optimizer "adam" (the default): dense table gradients from
        :func:`sgns_loss_and_grads` and :class:`minillm.optim.Adam` (default lr 0.01).
        "sgd": word2vec's own rule, each pair's gradient applied with rate lr
        (default 0.025, i.e. the batch-mean gradient times the batch size), decaying
        linearly to lr * min_lr_fraction; only the touched rows change, by scatter-add.
        Caveat: word2vec applies its pairs one after another, so a frequent word's
        row is corrected between its updates; a batch sums them all into one step,
        and with large batches on real text that step is too big for frequent
        words (the vectors collapse onto one direction). Use small batches with
        "sgd", or Adam, whose step size does not grow with the number of repeats.
        CBOW with "sgd" applies the exact gradient, d/dh / |C| to each context word
        (the C code and gensim give every context word the whole d/dh).
        """
        ids, segments = _id_stream(ids)
        lr0 = _check_train(ids, len(self.vocab), epochs, negatives, batch_size, optimizer, lr)
        noise = noise_distribution(self.vocab.counts)
        opt = Adam(self.params, lr=lr0) if optimizer == "adam" else None
        losses = []
        total_steps = None
        for _ in range(epochs):
            examples = self._epoch_examples(ids, segments, window, subsample_t)
            n = len(examples[0])
            if total_steps is None:  # examples are only known after subsampling: epoch 1 sets the lr decay's length
                total_steps = math.ceil(n / batch_size) * epochs
            for start in range(0, n, batch_size):
                batch = [a[start:start + batch_size] for a in examples]
                k = sample_negatives(noise, (len(batch[0]), negatives), self.rng)   # (batch, negatives)
                if opt is None:
                    frac = min(len(losses) / max(total_steps, 1), 1.0)          # share of training done
                    loss = self._sgd_step(batch, k, lr0 * max(1.0 - frac, min_lr_fraction))
                else:
                    loss, grads = self._loss_and_grads(batch, k)
                    opt.step(grads)
                losses.append(loss)
                if log_every and len(losses) % log_every == 0:
                    print(f"  step {len(losses):6d}  loss {np.mean(losses[-log_every:]):.4f}")
        return losses

    def _epoch_examples(self, ids, segments, window, subsample_t):
        """One epoch's examples, shuffled, after subsampling frequent words:
        skip-gram: (centres, contexts), every centre paired with each neighbour in its
        dynamic window; CBOW: (contexts (M, 2 window), mask, targets), one per centre."""
        seq, seg = ids, segments
        if subsample_t:
            keep = self.rng.random(ids.shape) < keep_probabilities(self.vocab.counts, subsample_t)[ids]
            seq, seg = ids[keep], (None if segments is None else segments[keep])
        if self.sg:
            examples = skipgram_pairs(seq, window, self.rng, segments=seg)
        else:
            targets, contexts, mask = cbow_windows(seq, window, self.rng, segments=seg)
            examples = (contexts, mask, targets)
        _check_has_pairs(examples[0], seq)
        order = self.rng.permutation(len(examples[0]))
        return tuple(a[order] for a in examples)

    def _loss_and_grads(self, batch, k):
        if self.sg:
            return sgns_loss_and_grads(self.params, *batch, k)
        return cbow_loss_and_grads(self.params, *batch, k)

    def _sgd_step(self, batch, k, rate):
        """word2vec's own update of one batch, in place: each example's gradient times ``rate``,
        scatter-added into the rows it touches. -> the batch's mean loss"""
        w_in, w_out = self.params["w_in"], self.params["w_out"]
        xp = array_module(w_in)
        batch, k = [xp.asarray(a) for a in batch], xp.asarray(k)
        step_size = w_in.dtype.type(-rate * len(k))  # per-example rate: undo the batch mean
        if self.sg:
            c, o = batch
            loss, cache = sgns_forward(w_in[c], w_out[o], w_out[k])
            d_in, d_o, d_k = sgns_backward(1.0, cache)
            rows_in, rows_o = c, o
        else:
            ctx, mask, t = batch
            loss, cache = cbow_forward(w_in[ctx], mask, w_out[t], w_out[k])
            d_ctx, d_o, d_k = cbow_backward(1.0, cache)
            rows_in, d_in, rows_o = ctx[mask], d_ctx[mask], t
        scatter_add(w_in, rows_in, step_size * d_in)
        scatter_add(w_out, rows_o, step_size * d_o)
        scatter_add(w_out, k.reshape(-1), step_size * d_k.reshape(-1, self.dim))
        return float(loss)

    # -- queries --------------------------------------------------------------

    def vector(self, word) -> np.ndarray:
        """The centre vector of ``word`` (a NumPy copy)."""
        return to_numpy(self.params["w_in"][self._id(word)]).copy()

    def _id(self, word) -> int:
        if word not in self.vocab.index:
            raise ValueError(f"word: {word!r} is not in the vocabulary ({len(self.vocab)} words; "
                             f"rare words are dropped by min_count)")
        return self.vocab.index[word]

    def _unit_vectors(self):
        return _unit_rows(self.params["w_in"])

    def similarity(self, a, b) -> float:
        """Cosine similarity of two words' centre vectors."""
        u = self._unit_vectors()
        return float(u[self._id(a)] @ u[self._id(b)])

    def most_similar(self, word, k=5) -> list:
        """The ``k`` words with the highest cosine similarity to ``word`` (itself excluded):
        [(word, cosine)], best first."""
        check_int_arg("k", k, lo=1)
        u = self._unit_vectors()
        i = self._id(word)
        sims = u @ u[i]
        sims[i] = -np.inf
        top = np.argsort(-sims, kind="stable")[: min(k, len(sims) - 1)]
        return [(self.vocab.words[j], float(sims[j])) for j in top]

    def analogy(self, a, b, c, k=1) -> list:
        """"a is to b as c is to ?" by 3CosAdd: the ``k`` words d (not a, b or c) with the
        highest cos(e_d, e_b - e_a + e_c), as [(word, cosine)], best first."""
        check_int_arg("k", k, lo=1)
        ids = [np.array([self._id(w)]) for w in (a, b, c)]
        scores = analogy_scores(self._unit_vectors(), *ids)[0]         # (V,)
        top = np.argsort(-scores, kind="stable")[: min(k, max(len(scores) - 3, 0))]
        return [(self.vocab.words[j], float(scores[j])) for j in top if np.isfinite(scores[j])]

    def evaluate_analogies(self, questions, lowercase=True) -> dict:
        """:func:`evaluate_analogies` of this model's centre vectors."""
        return evaluate_analogies(self.params["w_in"], self.vocab.words, questions, lowercase=lowercase)

    # -- the word2vec text format ----------------------------------------------

    def save_word2vec_format(self, path) -> None:
        """Write the centre vectors in the word2vec text format (gensim's
        ``KeyedVectors.load_word2vec_format(path)`` reads it), atomically."""
        _check_words_writable(self.vocab.words)
        vectors = to_numpy(self.params["w_in"])
        atomic_write(path, lambda f: _write_word2vec_text(f, self.vocab.words, vectors), mode="w")

    @classmethod
    def load_word2vec_format(cls, path, dtype=DEFAULT_DTYPE, device=None, sg=1) -> "Word2Vec":
        """A Word2Vec whose centre vectors are read from a word2vec text file (gensim's
        ``save_word2vec_format(path, binary=False)`` writes one). The file has no counts,
        so the vocabulary's counts are stand-ins in its order, V, V-1, ..., 1 (as gensim
        does); w_out is zero, as before training."""
        words, vectors = _read_word2vec_text(path, dtype)
        counts = np.arange(len(words), 0, -1, dtype=np.int64)
        model = cls(Vocab(words, counts, {w: i for i, w in enumerate(words)}), dim=vectors.shape[1], sg=sg,
                    dtype=dtype, device=device)
        model.params["w_in"] = to_device(vectors, device)
        return model


# ---------------------------------------------------------------------------
# Checks of analogies and the file format
# ---------------------------------------------------------------------------

def _analogy_lines(source):
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as f:
            return f.read().splitlines()
    return list(source)


def _check_analogy_line(source, n, line, words):
    if len(words) != 4:
        raise ValueError(f"analogies: expected 4 words per question line, got {len(words)} on line {n} "
                         f"of {source if isinstance(source, (str, os.PathLike)) else 'the input'}: {line!r}")


def _check_analogy_scores(unit, **ids):
    check_ndim("unit", unit, 2)
    n = None
    for name, x in ids.items():
        x = np.asarray(x)
        check_ids(name, x, unit.shape[0])
        check_ndim(name, x, 1)
        if n is not None and len(x) != n:
            raise ValueError(f"{name}: expected {n} ids, one per question, like a, got {len(x)}")
        n = len(x)


def _check_evaluate_analogies(vectors, words, questions):
    check_ndim("vectors", vectors, 2)
    if len(words) != vectors.shape[0]:
        raise ValueError(f"words: expected one word per row of vectors ({vectors.shape[0]}), got {len(words)}")
    for q in questions[:1]:
        if len(q) != 5:
            raise ValueError(f"questions: expected (section, a, b, c, d) tuples, got {q!r}")


def _check_words_writable(words):
    bad = [w for w in words if not w or any(ch.isspace() for ch in w)]
    if bad:
        raise ValueError(f"vocab: the word2vec text format cannot hold words that are empty or contain "
                         f"whitespace, got {bad[:3]!r}")


def _check_word2vec_header(path, header):
    if len(header) != 2 or not all(h.isdigit() for h in header) or int(header[1]) < 1:
        raise ValueError(f"{path}: expected a word2vec text header 'V D' on line 1, got {' '.join(header)!r}")


def _check_word2vec_row(path, n, parts, d):
    if len(parts) != d + 1:
        raise ValueError(f"{path}: expected a word and {d} numbers on line {n}, got {len(parts)} fields")


def _check_word2vec_count(path, words, v):
    if len(words) != v:
        raise ValueError(f"{path}: the header promises {v} words, the file has {len(words)}")
