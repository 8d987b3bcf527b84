"""BLEU: how much of a reference translation a system's output contains, in n-grams
(Papineni et al. 2002), at the corpus level, with the brevity penalty and the smoothing
methods of Chen & Cherry (2014), as sacrebleu computes it.

For a corpus of hypotheses h_i, each with one or more references, and n = 1..N (N = 4):

    correct_n = sum_i sum_{g in ngrams_n(h_i)} min(count_{h_i}(g), max_r count_{r}(g))   clipped matches
    total_n   = sum_i (len(h_i) - n + 1)^+                                             n-grams proposed
    p_n       = correct_n / total_n
    c = sum_i len(h_i),  r = sum_i len(the reference closest in length to h_i; ties: the shorter)
    BP = 1 if c >= r else exp(1 - r / c)                                   the brevity penalty
    BLEU = 100 * BP * exp((1/N) sum_n log p_n)

Counts are summed over the corpus before dividing: corpus BLEU is not the mean of
sentence BLEUs. A p_n of 0 makes BLEU 0, so a short corpus often gets smoothing:
    "none"    p_n as is
    "floor"   a zero correct_n becomes smooth_value (default 0.1)
    "add-k"   correct_n + k and total_n + k for n >= 2 (default k = 1)
    "exp"     the k-th zero precision becomes 1 / (2^k total_n) (NIST's mteval; sacrebleu's default)
And if nothing matches at all, BLEU is 0 whatever the smoothing.

Tokenisation decides what a word is: "none" splits on whitespace; "13a" is mteval-v13a's
(WMT's standard, sacrebleu's default): punctuation and symbols become their own tokens,
except a period or comma between digits.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import NamedTuple

from .backend import check_choice, check_int_arg, check_number

__all__ = ["BLEUScore", "corpus_bleu", "sentence_ngrams", "tokenize_13a", "SMOOTH_METHODS"]

SMOOTH_METHODS = {"none": None, "floor": 0.1, "add-k": 1.0, "exp": None}
TOKENIZERS = ("none", "13a")


class BLEUScore(NamedTuple):
    score: float            # 0..100
    counts: list            # correct_n, n = 1..N
    totals: list            # total_n
    precisions: list        # p_n in percent, after smoothing
    bp: float               # the brevity penalty
    sys_len: int            # c
    ref_len: int            # r


def sentence_ngrams(tokens, max_order=4) -> Counter:
    """Counter of every n-gram (a tuple) of ``tokens``, n = 1..max_order.

    >>> sorted(sentence_ngrams(["a", "b", "a"], 2).items())
    [(('a',), 2), (('a', 'b'), 1), (('b',), 1), (('b', 'a'), 1)]
    """
    counts = Counter()
    for n in range(1, max_order + 1):
        for i in range(len(tokens) - n + 1):
            counts[tuple(tokens[i:i + n])] += 1
    return counts


_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),   # symbols and most punctuation
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),                 # a period or comma after a non-digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),                 # ... or before one
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),                      # a dash after a digit
]


def tokenize_13a(line: str) -> list:
    """mteval-v13a's tokenisation: unescape a few entities, then pad punctuation with spaces.

    >>> tokenize_13a("Hello, world! It costs 3.50.")
    ['Hello', ',', 'world', '!', 'It', 'costs', '3.50', '.']
    """
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = (line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                .replace("&gt;", ">"))
    line = f" {line} "
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    return line.split()


def _tokens(line, tokenize):
    return tokenize_13a(line) if tokenize == "13a" else line.split()


def _closest_ref_len(hyp_len, ref_lens):
    """The reference length nearest hyp_len; the shorter one on a tie."""
    return min(ref_lens, key=lambda r: (abs(r - hyp_len), r))


def _statistics(hypotheses, references, tokenize, max_order):
    """Corpus sums: correct_n, total_n (n = 1..N), c and r."""
    correct, total = [0] * max_order, [0] * max_order
    sys_len = ref_len = 0
    for i, hyp in enumerate(hypotheses):
        h = _tokens(hyp, tokenize)
        refs = [_tokens(stream[i], tokenize) for stream in references]
        sys_len += len(h)
        ref_len += _closest_ref_len(len(h), [len(r) for r in refs])
        h_counts = sentence_ngrams(h, max_order)
        max_ref = Counter()
        for r in refs:
            max_ref |= sentence_ngrams(r, max_order)             # per n-gram, the max over references
        for gram, count in h_counts.items():
            correct[len(gram) - 1] += min(count, max_ref[gram])
        for n in range(1, max_order + 1):
            total[n - 1] += max(len(h) - n + 1, 0)
    return correct, total, sys_len, ref_len


def _precisions(correct, total, smooth, smooth_value):
    """p_n in percent after smoothing; stops at the first order with no n-grams (left 0)."""
    precisions = [0.0] * len(correct)
    correct, total = list(correct), list(total)
    zeros_seen = 0
    for n in range(1, len(correct) + 1):
        if smooth == "add-k" and n > 1:
            correct[n - 1] += smooth_value
            total[n - 1] += smooth_value
        if total[n - 1] == 0:
            break
        if correct[n - 1] > 0:
            precisions[n - 1] = 100.0 * correct[n - 1] / total[n - 1]
        elif smooth == "exp":
            zeros_seen += 1
            precisions[n - 1] = 100.0 / (2 ** zeros_seen * total[n - 1])
        elif smooth == "floor":
            precisions[n - 1] = 100.0 * smooth_value / total[n - 1]
    return precisions


def corpus_bleu(hypotheses, references, smooth="exp", smooth_value=None, tokenize="13a",
                max_order=4) -> BLEUScore:
    """Corpus BLEU of ``hypotheses`` (a list of strings) against ``references``, a list of
    reference streams as sacrebleu takes them: references[k][i] is the k-th reference of
    hypothesis i. smooth: "exp" (default), "none", "floor", "add-k"; smooth_value: the
    floor or k (None: 0.1 / 1). tokenize: "13a" (default) or "none" (whitespace).
    -> BLEUScore(score in 0..100, counts, totals, precisions, bp, sys_len, ref_len)

    >>> round(corpus_bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]).score, 6)
    100.0
    """
    _check_corpus_bleu(hypotheses, references, smooth, smooth_value, tokenize, max_order)
    if smooth_value is None:
        smooth_value = SMOOTH_METHODS[smooth]
    correct, total, c, r = _statistics(hypotheses, references, tokenize, max_order)
    bp = 1.0 if c >= r else (math.exp(1 - r / c) if c > 0 else 0.0)
    if not any(correct):
        return BLEUScore(0.0, correct, total, [0.0] * max_order, bp, c, r)
    precisions = _precisions(correct, total, smooth, smooth_value)
    log_mean = sum(math.log(p) if p > 0 else -9999999999.0 for p in precisions) / max_order
    return BLEUScore(bp * math.exp(log_mean), correct, total, precisions, bp, c, r)


def _check_corpus_bleu(hypotheses, references, smooth, smooth_value, tokenize, max_order):
    if not isinstance(hypotheses, (list, tuple)) or not all(isinstance(h, str) for h in hypotheses):
        raise TypeError(f"hypotheses: expected a list of strings, got {type(hypotheses).__name__}")
    if not isinstance(references, (list, tuple)) or len(references) == 0:
        raise TypeError("references: expected a non-empty list of reference streams (lists of strings)")
    for k, stream in enumerate(references):
        if not isinstance(stream, (list, tuple)) or not all(isinstance(r, str) for r in stream):
            raise TypeError(f"references[{k}]: expected a list of strings (one per hypothesis), "
                            f"got {type(stream).__name__}")
        if len(stream) != len(hypotheses):
            raise ValueError(f"references[{k}]: expected {len(hypotheses)} references (one per "
                             f"hypothesis), got {len(stream)}")
    check_choice("smooth", smooth, tuple(SMOOTH_METHODS))
    if smooth_value is not None:
        check_number("smooth_value", smooth_value, lo=0, lo_open=True)
    check_choice("tokenize", tokenize, TOKENIZERS)
    check_int_arg("max_order", max_order, lo=1)
