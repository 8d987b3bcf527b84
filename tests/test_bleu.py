"""bleu.py: corpus BLEU-4, brevity penalty, smoothing, and the 13a tokeniser, equal to
sacrebleu's corpus_bleu on the same tokenisation."""
import math

import pytest
from hypothesis import given, settings, strategies as st

from minillm import bleu

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", ",", ".", "3.5", "it's", "(x)", "--"]
sentences = st.lists(st.sampled_from(WORDS), min_size=0, max_size=9).map(" ".join)


@settings(max_examples=40)
@given(data=st.data(), n=st.integers(1, 5), n_refs=st.integers(1, 2),
       smooth=st.sampled_from(list(bleu.SMOOTH_METHODS)), tokenize=st.sampled_from(bleu.TOKENIZERS))
def test_equals_sacrebleu(data, n, n_refs, smooth, tokenize):
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps = data.draw(st.lists(sentences, min_size=n, max_size=n))
    refs = [data.draw(st.lists(sentences, min_size=n, max_size=n)) for _ in range(n_refs)]
    ours = bleu.corpus_bleu(hyps, refs, smooth=smooth, tokenize=tokenize)
    theirs = sacrebleu.corpus_bleu(hyps, refs, smooth_method=smooth, tokenize=tokenize)
    assert math.isclose(ours.score, theirs.score, rel_tol=1e-12, abs_tol=1e-12)
    assert ours.sys_len == theirs.sys_len and ours.ref_len == theirs.ref_len
    assert math.isclose(ours.bp, theirs.bp, rel_tol=1e-12)


@settings(max_examples=30)
@given(line=st.text(alphabet="ab1.,-&;()'\" Zq9$", max_size=30))
def test_13a_tokens_equal_sacrebleu(line):
    pytest.importorskip("sacrebleu")
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    assert bleu.tokenize_13a(line) == Tokenizer13a()(line).split()


@settings(max_examples=20)
@given(hyps=st.lists(sentences.filter(lambda s: len(s.split()) >= 4), min_size=1, max_size=4))
def test_identity_is_100_and_shortening_is_penalised(hyps):
    assert math.isclose(bleu.corpus_bleu(hyps, [hyps], tokenize="none").score, 100.0)
    short = [" ".join(h.split()[:-1]) for h in hyps]
    s = bleu.corpus_bleu(short, [hyps], tokenize="none")
    assert s.bp < 1.0 and s.score < 100.0


def test_bad_input():
    with pytest.raises(ValueError, match=r"references\[0\]: expected 2 references"):
        bleu.corpus_bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="smooth: expected one of"):
        bleu.corpus_bleu(["a"], [["a"]], smooth="laplace")
    with pytest.raises(ValueError, match="tokenize: expected one of"):
        bleu.corpus_bleu(["a"], [["a"]], tokenize="intl")
    with pytest.raises(TypeError, match="hypotheses: expected a list of strings"):
        bleu.corpus_bleu("a", [["a"]])
