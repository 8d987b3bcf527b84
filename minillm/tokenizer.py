"""Tokenizers: how text becomes the integer ids a model reads, and back.

Three tokenizers, from the simplest to the ones real models use:

``CharTokenizer``
    One id per character of a fixed alphabet (the sorted characters of a corpus).
    Tiny vocabulary, long sequences: the classic first language model.

``BPETokenizer``
    Byte-level byte-pair encoding as in GPT-2 / tiktoken. Text is first cut into
    chunks by a regular expression (the "pre-split": words, numbers, punctuation
    runs, whitespace; see :mod:`minillm.pretokenize`), each chunk becomes its
    UTF-8 bytes (so *every* string is encodable: the base vocabulary is the 256
    bytes), and then learned merges glue frequent adjacent pieces into bigger
    tokens.

``WordPieceTokenizer``
    BERT's tokenizer: clean and lower-case the text, split on whitespace and
    punctuation, then cut each word greedily into the longest pieces found in a
    fixed vocabulary, continuation pieces spelled with a ``##`` prefix.

Byte-pair encoding
------------------
Training starts from every chunk written as byte ids 0..255 and learns one merge
per new id 256, 257, ...::

    counts   = sum over the chunks of get_pair_counts(chunk)   # {(a, b): occurrences}
    (a, b)   = the most frequent pair; ties go to the smallest (a, b)
    chunks   = [merge_pair(chunk, (a, b), new_id) for chunk in chunks]
    token[new_id] = token[a] + token[b]                          # its bytes

:func:`train_bpe_naive` is that loop, word for word. :meth:`BPETokenizer.train`
learns the same merges faster: identical chunks are counted once with their
frequency, each pair remembers the positions where it occurs (the chunks are
linked lists over one flat array of ids), a merge visits only those and updates
only the counts of the pairs beside it, and a heap finds the next most frequent
pair.

Encoding replays the merges on each chunk's bytes: merge the adjacent pair whose
joined bytes have the lowest rank (rank = id, so earlier merges come first;
leftmost on ties) until no adjacent pair is a token. This is tiktoken's
algorithm, so our ranks give exactly tiktoken's ids. Encoded chunks are cached;
when many new chunks come at once (a cold cache), :func:`_bpe_at_once` runs the
same rule on all of them together in NumPy, one merge per chunk per round. Long
text under GPT-2's or GPT-4's pattern skips the cache: :func:`gpt2_chunk_starts` /
:func:`gpt4_chunk_starts` cut it without a regex, :func:`_distinct_chunks` finds the distinct chunks (hashed,
then checked byte for byte), each is encoded once, and the ids are gathered in
order. Training counts its chunks the same way.

Every tokenizer has ``vocab_size``, ``encode(text) -> list[int]``,
``decode(ids) -> str``, ``to_dict()`` (JSON-serialisable) and ``from_dict(d)``;
``tokenizer_from_dict(d)`` rebuilds any of them from its dict (checkpoints store
tokenizers this way). The argument checks live at the end of the file.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import json
import os
import re
import unicodedata
from collections import Counter, defaultdict
from itertools import chain, repeat

import numpy as np

from minillm.backend import atomic_write, check_choice, check_int_arg, is_int, to_numpy
# The pre-split patterns and their translation for `re` live in their own module; they stay importable here.
from minillm.pretokenize import (ARRAY_SPLITTERS, GPT2_PATTERN, GPT4_PATTERN, PATTERNS, compile_pattern,
                                 compile_splitter, gpt2_chunk_starts, gpt4_chunk_starts, translate_pattern)

__all__ = [
    "CharTokenizer", "BPETokenizer", "WordPieceTokenizer", "tokenizer_from_dict",
    "get_pair_counts", "merge_pair", "train_bpe_naive",
    "PATTERNS", "GPT2_PATTERN", "GPT4_PATTERN", "translate_pattern", "compile_pattern", "compile_splitter",
    "gpt2_chunk_starts", "gpt4_chunk_starts", "ARRAY_SPLITTERS",
]


# ---------------------------------------------------------------------------
# Char-level
# ---------------------------------------------------------------------------

class CharTokenizer:
    """One id per character: id = index of the character in ``vocab``.

    ``unk``: None (an unknown character is an error) or the token that unknown
    characters map to (added to the vocabulary if absent).
    """

    def __init__(self, vocab, unk=None):
        vocab = _check_char_vocab(vocab, unk)  # list(vocab), plus unk if it was absent
        self.vocab = vocab
        self.unk = unk
        self._id_of = {token: i for i, token in enumerate(vocab)}
        self.unk_id = None if unk is None else self._id_of[unk]

    @classmethod
    def from_text(cls, text, unk=None):
        """The sorted unique characters of ``text`` (plus ``unk`` if given) as the vocabulary."""
        _check_char_from_text(text, unk)
        chars = set(text) if unk is None else set(text) | {unk}
        return cls(sorted(chars), unk=unk)

    @property
    def vocab_size(self):
        return len(self.vocab)

    def encode(self, text):
        """text (str) -> list of ids, one per character."""
        _check_text("text", text)
        try:
            return list(map(self._id_of.__getitem__, text))  # every character known: one C loop
        except KeyError:
            self._check_known_characters(text)  # an unknown character is an error unless unk is set
        return [self._id_of.get(char, self.unk_id) for char in text]

    def decode(self, ids):
        """list/array of ids -> str."""
        return "".join(map(self.vocab.__getitem__, _ids_to_list("ids", ids, len(self.vocab))))

    def to_dict(self):
        return {"type": "char", "vocab": list(self.vocab), "unk": self.unk}

    @classmethod
    def from_dict(cls, d):
        _check_dict_type(d, "char")
        return cls(d["vocab"], unk=d.get("unk"))

    def __repr__(self):
        return f"CharTokenizer(vocab_size={self.vocab_size}, unk={self.unk!r})"

    def _check_known_characters(self, text):
        if self.unk_id is None:
            i, char = next((i, char) for i, char in enumerate(text) if char not in self._id_of)
            raise ValueError(f"text: character {char!r} (U+{ord(char):04X}) at index {i} is not in the "
                             f"vocabulary of {len(self.vocab)} characters; build the tokenizer with "
                             "unk=... to map unknown characters to one token")


# ---------------------------------------------------------------------------
# Byte-level BPE, the textbook version: count pairs, merge the most frequent, repeat
# ---------------------------------------------------------------------------

def get_pair_counts(ids):
    """How often each adjacent pair occurs in ``ids``: a dict {(a, b): n}, in order of first occurrence.

    >>> get_pair_counts([1, 2, 2, 1, 2])
    {(1, 2): 2, (2, 2): 1, (2, 1): 1}

    Overlapping pairs all count: ``[5, 5, 5]`` holds (5, 5) twice, although
    :func:`merge_pair` can replace only one of them.
    """
    _check_id_list("ids", ids)
    counts = {}
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def merge_pair(ids, pair, new_id):
    """A new list: ``ids`` with every occurrence of ``pair`` replaced by ``new_id``.

    The scan goes left to right and a replaced pair's ids are used up, so the
    occurrences replaced never overlap: in a run ``a a a`` of the pair (a, a) the
    left two merge and the third ``a`` stays.

    >>> merge_pair([1, 2, 2, 1, 2], (1, 2), 256)
    [256, 2, 256]
    >>> merge_pair([5, 5, 5], (5, 5), 256)
    [256, 5]
    >>> merge_pair([5, 5, 5, 5], (5, 5), 256)
    [256, 256]
    """
    _check_merge_pair(ids, pair, new_id)
    merged, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


def train_bpe_naive(text, vocab_size, pattern="gpt2"):
    """Learn ``vocab_size - 256`` merges from ``text``, recounting every pair before each merge.

    The pre-split (``pattern``: "gpt2", "gpt4", a tiktoken-syntax regex, or None
    for one chunk) cuts ``text`` into chunks, each written as its UTF-8 bytes.
    Each new id (256, 257, ...) then goes to the most frequent adjacent pair over
    all chunks, a tie going to the smallest (left id, right id), and that pair is
    merged in every chunk. Training stops early when no pair is left (every chunk
    is one token). Returns {(left id, right id): new id} in the order learned:
    the same as ``BPETokenizer.train(text, vocab_size, pattern).merges``.

    Wikipedia's example, one chunk (pattern=None), with a = 97, b = 98:

    >>> train_bpe_naive("aaabdaaabac", 259, pattern=None)
    {(97, 97): 256, (97, 98): 257, (256, 257): 258}

    ``aa`` occurs 4 times and becomes 256 (Z): ``ZabdZabac``. Now ``ab`` and
    ``Za`` both occur twice; (97, 98) < (256, 97), so ``ab`` becomes 257 (Y):
    ``ZYdZYac``. Last, ``ZY`` (twice) becomes 258: ``XdXac``.
    """
    _check_train(text, vocab_size, [])
    chunks = [text] if pattern is None else compile_pattern(pattern).findall(text)
    chunk_ids = [list(chunk.encode("utf-8")) for chunk in chunks if chunk]
    merges = {}
    for new_id in range(256, vocab_size):
        counts = Counter()
        for ids in chunk_ids:
            counts.update(get_pair_counts(ids))  # Counter.update adds the counts
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))  # the most frequent; ties: the smallest (a, b)
        merges[pair] = new_id
        chunk_ids = [merge_pair(ids, pair, new_id) for ids in chunk_ids]
    return merges


# ---------------------------------------------------------------------------
# Byte-level BPE, the tokenizer: fast training, tiktoken's encoding, files
# ---------------------------------------------------------------------------

_BYTES = [bytes([b]) for b in range(256)]
_INF = float("inf")
_UNSET = object()
_LONG_PIECE = 128       # above this many bytes, the heap version of the merge loop
_CACHE_LIMIT = 1 << 18  # chunk encodings remembered before the cache starts over
_MANY_CHUNKS = 64       # from this many new chunks on, encode them all at once in NumPy
_DENSE_PAIRS = 4096     # vocabularies up to this size get the dense pair table of the NumPy path
_ARRAY_TEXT = 1 << 16   # text this long (GPT-2's or GPT-4's pattern) is encoded all at once in NumPy, no cache
_FEW_POSITIONS = 16     # training: array passes while the last _RECENT merges averaged this many positions
_RECENT = 16
_NO_RANK = np.iinfo(np.int16).max  # above every rank of a table (vocab <= _DENSE_PAIRS)


class BPETokenizer:
    """Byte-level BPE with tiktoken-compatible ranks.

    ranks: dict token bytes -> rank (= id); must contain all 256 single bytes.
    pattern: "gpt2", "gpt4", a tiktoken-syntax regex string, or None (no pre-split:
        the whole text is one chunk, which suits small examples; training and
        encoding then work on one long sequence, so megabytes take long).
    special_tokens: dict str -> id, ids distinct from the ranks.
    """

    def __init__(self, ranks, pattern="gpt2", special_tokens=None, merges=None):
        special_tokens = _check_bpe_init(ranks, pattern, special_tokens)  # as a dict
        self.ranks = {bytes(token): int(rank) for token, rank in ranks.items()}
        self.special_tokens = {token: int(i) for token, i in special_tokens.items()}
        self.pattern = pattern
        self._split = None if pattern is None else compile_splitter(pattern)
        self._chunk_starts = ARRAY_SPLITTERS.get(PATTERNS.get(pattern, pattern))  # its array pre-split, or None
        self.vocab_size = max(chain(self.ranks.values(), self.special_tokens.values())) + 1
        self._decoder = self._id_to_bytes()  # list: id -> bytes, None for an id no token has
        self._merges = None if merges is None else {(int(a), int(b)): int(c) for (a, b), c in merges.items()}
        self._cache = {}             # chunk str -> tuple of ids
        self._special_re_cache = {}  # frozenset of special tokens -> compiled alternation
        self._pair_table = None      # (V, V) pair ranks of the NumPy merge loop, built on first use

    def _id_to_bytes(self):
        decoder = [None] * self.vocab_size
        for token, rank in self.ranks.items():
            decoder[rank] = token
        for token, i in self.special_tokens.items():
            decoder[i] = token.encode("utf-8")
        return decoder

    # -- properties -----------------------------------------------------------

    @property
    def pattern_str(self):
        """The pre-split regex in tiktoken syntax (what tiktoken.Encoding(pat_str=...) takes), or None."""
        return None if self.pattern is None else PATTERNS.get(self.pattern, self.pattern)

    @property
    def merges(self):
        """dict (left id, right id) -> merged id, one per multi-byte token in rank order.

        Known exactly after training; for loaded ranks it is recovered by running
        BPE on each token's bytes with only the lower ranks (tokens that BPE cannot
        reach from two lower-ranked parts are left out).
        """
        if self._merges is None:
            merges = {}
            for token, rank in sorted(self.ranks.items(), key=lambda kv: kv[1]):
                if len(token) < 2:
                    continue
                parts = self._bpe_parts(token, max_rank=rank)
                if len(parts) == 2:
                    merges[(self.ranks[parts[0]], self.ranks[parts[1]])] = rank
            self._merges = merges
        return self._merges

    def token_bytes(self, i):
        """The bytes of token id ``i``."""
        self._check_token_id("i", i)
        return self._decoder[i]

    # -- training -------------------------------------------------------------

    @classmethod
    def train(cls, text, vocab_size, pattern="gpt2", special_tokens=None):
        """Learn ``vocab_size - 256 - len(special_tokens)`` merges from ``text``.

        The merges of :func:`train_bpe_naive`: each step merges the most frequent
        adjacent pair, a tie going to the smallest (left id, right id). The heap
        holds (-count, left id, right id), so its smallest entry is exactly that
        pair. Pair counts are kept incrementally: identical chunks are counted once
        with their frequency, and a merge only revisits the chunks that contain
        the merged pair. Special tokens are cut out of the text first (they never
        merge) and get the ids after the merges, in the order given. Training stops
        early, with a smaller vocabulary, when no pairs are left.
        """
        special_tokens = _check_train(text, vocab_size, special_tokens)  # as a list
        try:
            codes, lens, freqs = _count_chunks(text, pattern, special_tokens)  # the distinct chunks, counted
        except UnicodeEncodeError:  # found while counting, so that valid text pays nothing for it
            at = re.search("[\ud800-\udfff]", text).start()
            raise ValueError(f"text: expected encodable Unicode text, got a lone surrogate {text[at]!r} "
                             f"at index {at}") from None
        merges = _learn_merges(codes, lens, freqs, n_merges=vocab_size - 256 - len(special_tokens))
        tokens = list(_BYTES)
        for a, b in merges:  # in id order: 256, 257, ...
            tokens.append(tokens[a] + tokens[b])
        ranks = {token: rank for rank, token in enumerate(tokens)}
        special_ids = {token: len(tokens) + k for k, token in enumerate(special_tokens)}
        return cls(ranks, pattern=pattern, special_tokens=special_ids, merges=merges)

    # -- encoding -------------------------------------------------------------

    def _bpe_parts(self, piece, max_rank=None):
        """The BPE pieces (bytes) of ``piece``: merge the lowest-rank adjacent pair (leftmost on ties) until none."""
        if max_rank is None:
            rank_of = self.ranks.get
        else:  # pretend only the tokens ranked below max_rank exist
            def rank_of(key, default=None, _get=self.ranks.get):
                rank = _get(key)
                return default if rank is None or rank >= max_rank else rank
        parts = list(map(_BYTES.__getitem__, piece))
        if len(parts) > _LONG_PIECE:
            return self._bpe_parts_long(piece, rank_of)
        pair_ranks = [rank_of(x + y, _INF) for x, y in zip(parts, parts[1:])]  # pair_ranks[i]: parts i, i + 1
        while pair_ranks:
            lowest = min(pair_ranks)
            if lowest == _INF:
                break
            i = pair_ranks.index(lowest)  # leftmost lowest rank, as tiktoken
            parts[i] += parts[i + 1]
            del parts[i + 1]
            del pair_ranks[i]
            if i:
                pair_ranks[i - 1] = rank_of(parts[i - 1] + parts[i], _INF)
            if i < len(pair_ranks):
                pair_ranks[i] = rank_of(parts[i] + parts[i + 1], _INF)
        return parts

    @staticmethod
    def _bpe_parts_long(piece, rank_of):
        """Same result as the list version, O(n log n): a heap of candidate pairs over a linked list."""
        n = len(piece)
        next_start = list(range(1, n + 1))  # next_start[s]: start of the part after the part starting at s
        prev_start = list(range(-1, n - 1))
        alive = [True] * n                  # alive[s]: a part starts at s
        heap = []                           # (rank, left start, right start, end of right)
        for s in range(n - 1):
            rank = rank_of(piece[s:s + 2])
            if rank is not None:
                heap.append((rank, s, s + 1, s + 2))
        heapq.heapify(heap)
        while heap:
            rank, start, mid, end = heapq.heappop(heap)
            if not (alive[start] and alive[mid] and next_start[start] == mid and next_start[mid] == end):
                continue  # the pair changed since this entry was pushed
            alive[mid] = False
            next_start[start] = end
            if end < n:
                prev_start[end] = start
                right_rank = rank_of(piece[start:next_start[end]])
                if right_rank is not None:
                    heapq.heappush(heap, (right_rank, start, end, next_start[end]))
            before = prev_start[start]
            if before >= 0:
                left_rank = rank_of(piece[before:end])
                if left_rank is not None:
                    heapq.heappush(heap, (left_rank, before, start, end))
        parts, start = [], 0
        while start < n:
            parts.append(piece[start:next_start[start]])
            start = next_start[start]
        return parts

    def _encode_chunk(self, chunk):
        return self._encode_piece(chunk.encode("utf-8"))

    def _encode_piece(self, piece):
        """The ids (a tuple) of one chunk's UTF-8 bytes."""
        rank = self.ranks.get(piece)
        if rank is not None:  # a whole chunk that is one token (tiktoken's shortcut)
            return (rank,)
        return tuple(map(self.ranks.__getitem__, self._bpe_parts(piece)))

    def encode_ordinary(self, text):
        """text -> ids, treating special-token strings as plain text."""
        _check_text("text", text)
        try:
            return self._encode_ordinary(text)
        except UnicodeEncodeError as err:  # found while encoding, so that valid text pays nothing for it
            raise ValueError(f"text: expected encodable Unicode text, got a lone surrogate "
                             f"{text[err.start]!r} at index {err.start}") from None

    def _encode_ordinary(self, text):
        if not text:
            return []
        if self._split is None:
            return list(self._encode_chunk(text))
        if len(text) >= _ARRAY_TEXT and self._chunk_starts is not None and self._pair_ranks() is not None:
            ids = self._encode_at_once(text)
            if ids is not None:  # (None: a hash collision in _distinct_chunks, never seen; the cache path instead)
                return ids
        chunks = self._split(text)
        cache = self._cache
        try:  # the common case once warm: every chunk already known, all in C loops
            return list(chain.from_iterable(map(cache.__getitem__, chunks)))
        except KeyError:
            pass
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        new_chunks = set(chunks).difference(cache) if cache else set(chunks)
        if len(new_chunks) >= _MANY_CHUNKS and self._pair_ranks() is not None:
            cache.update(self._encode_chunks_at_once(list(new_chunks)))
        else:
            for chunk in new_chunks:
                cache[chunk] = self._encode_chunk(chunk)
        return list(chain.from_iterable(map(cache.__getitem__, chunks)))

    # -- encoding, the fast path: the merge loop of many chunks at once, in NumPy --

    def _pair_ranks(self):
        """The (V, V) int16 table of pair ranks: [a, b] = rank of token a's bytes + token b's bytes,
        _NO_RANK where that is no token; None when V (= vocab_size) is above _DENSE_PAIRS (too big).

        Built once from the ranks alone: bytes(a) + bytes(b) == t exactly when a and b are
        the two sides of some cut of t, so each token t contributes its cuts.
        """
        if self._pair_table is None and self.vocab_size <= _DENSE_PAIRS:
            table = np.full((self.vocab_size, self.vocab_size), _NO_RANK, dtype=np.int16)
            get = self.ranks.get
            for token, rank in self.ranks.items():
                for k in range(1, len(token)):
                    left, right = get(token[:k]), get(token[k:])
                    if left is not None and right is not None:
                        table[left, right] = rank
            self._pair_table = table
        return self._pair_table

    def _encode_chunks_at_once(self, chunks):
        """{chunk: tuple of ids} for many distinct chunks: _encode_chunk's ids, through _encode_distinct."""
        text = "".join(chunks)
        if text.isascii():  # one byte per character: no chunk needs encoding on its own
            data, lens = text.encode("ascii"), np.fromiter(map(len, chunks), dtype=np.int64, count=len(chunks))
        else:
            pieces = list(map(str.encode, chunks))
            data, lens = b"".join(pieces), np.fromiter(map(len, pieces), dtype=np.int64, count=len(chunks))
        flat, count, offset = self._encode_distinct(data, np.cumsum(lens) - lens, lens)
        flat = tuple(flat.tolist())
        return dict(zip(chunks, map(flat.__getitem__, map(slice, offset.tolist(), (offset + count).tolist()))))

    def _encode_at_once(self, text):
        """encode_ordinary of long text (a pattern with an array pre-split, a dense pair table) in
        NumPy, no cache; None if _distinct_chunks reports a hash collision.

        The chunks come from gpt2_chunk_starts / gpt4_chunk_starts, the distinct ones from
        _distinct_chunks; _encode_distinct encodes each of those once, and every chunk's
        ids are gathered, in order, from its distinct chunk's.
        """
        data, codes, starts = _chunks_utf8(text, self._chunk_starts)
        distinct = _distinct_chunks(codes, starts)
        if distinct is None:
            return None
        first, inverse, _ = distinct
        lens = np.diff(np.append(starts, codes.size))[first]            # per distinct chunk
        flat, count, offset = self._encode_distinct(data, starts[first], lens)
        return flat[_runs_index(offset[inverse], count[inverse])].tolist()

    def _encode_distinct(self, data, starts, lens):
        """The ids of the chunks ``data[starts[u]:starts[u] + lens[u]]`` (UTF-8 bytes), each as
        _encode_piece gives them, as (flat, count, offset): chunk u's ids are the ``count[u]``
        of ``flat`` from ``offset[u]`` on. Needs the dense pair table (_pair_ranks).

        A chunk that is one token is looked up whole (tiktoken's shortcut), a chunk over
        _LONG_PIECE bytes goes through _encode_piece, the rest are merged together by
        _bpe_at_once; an empty chunk (a pattern that can match nothing) has no ids.
        """
        codes = np.frombuffer(data, dtype=np.uint8)
        ends = starts + lens
        pieces = map(data.__getitem__, map(slice, starts.tolist(), ends.tolist()))
        whole = np.fromiter(map(self.ranks.get, pieces, repeat(-1)), dtype=np.int64, count=lens.size)
        merge = np.flatnonzero((whole < 0) & (lens > 0) & (lens <= _LONG_PIECE))
        long = np.flatnonzero((whole < 0) & (lens > _LONG_PIECE))
        merged, n_ids = _bpe_at_once(codes[_runs_index(starts[merge], lens[merge])], lens[merge],
                                     self._pair_ranks())
        long_ids = [self._encode_piece(data[a:b]) for a, b in zip(starts[long].tolist(), ends[long].tolist())]
        # One flat array of every chunk's ids: the whole-chunk ranks, the merged, the long.
        is_whole = np.flatnonzero(whole >= 0)
        flat = np.concatenate((whole[is_whole], merged, np.fromiter(chain.from_iterable(long_ids), dtype=np.int64)))
        count = (whole >= 0).astype(np.int64)
        count[merge] = n_ids
        count[long] = list(map(len, long_ids))
        offset = np.zeros(lens.size, dtype=np.int64)
        offset[is_whole] = np.arange(is_whole.size)
        offset[merge] = is_whole.size + np.cumsum(n_ids) - n_ids
        offset[long] = is_whole.size + merged.size + np.cumsum(count[long]) - count[long]
        return flat, count, offset

    def _special_regex(self, tokens):
        key = frozenset(tokens)
        regex = self._special_re_cache.get(key)
        if regex is None:
            alternatives = "|".join(map(re.escape, sorted(tokens, key=lambda s: (-len(s), s))))
            regex = self._special_re_cache[key] = re.compile(f"({alternatives})")
        return regex

    def encode(self, text, allowed_special=(), disallowed_special="all"):
        """text -> ids. Special tokens are recognised only where allowed (tiktoken's rules).

        allowed_special: "all" or a collection of special-token strings encoded as
        their special ids. disallowed_special: "all" (every special token not
        allowed) or a collection; finding one in ``text`` is a ValueError, so text
        from users cannot smuggle in control tokens. Pass ``disallowed_special=()``
        to encode them as plain text instead.
        """
        allowed = self._check_encode(text, allowed_special, disallowed_special)  # the allowed set
        if not allowed:
            return self.encode_ordinary(text)
        ids = []
        parts = self._special_regex(allowed).split(text)  # text, special, text, special, ..., text
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def decode_bytes(self, ids):
        """ids -> the concatenated token bytes."""
        ids = _ids_to_list("ids", ids, self.vocab_size)
        try:
            return b"".join(map(self._decoder.__getitem__, ids))
        except TypeError:  # a None joined: an id in a gap of the ranks (found only then, at no cost)
            bad = next(i for i in ids if self._decoder[i] is None)
            raise ValueError(f"ids: id {bad} is not assigned to any token (a gap in the ranks)") from None

    def decode(self, ids, errors="replace"):
        """ids -> str. Invalid UTF-8 (a multi-byte character cut between ids) becomes U+FFFD, as in tiktoken."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def clear_cache(self):
        """Forget the cached chunk encodings (results never depend on it)."""
        self._cache.clear()

    # -- persistence ----------------------------------------------------------

    def save(self, path):
        """Write ``path`` in tiktoken's ranks format and ``path + '.json'`` with the pattern and special tokens."""
        path = os.fspath(path)
        ranks_text = "".join(f"{base64.b64encode(token).decode('ascii')} {rank}\n"
                             for token, rank in sorted(self.ranks.items(), key=lambda kv: kv[1]))
        meta = {"type": "bpe", "pattern": self.pattern, "special_tokens": self.special_tokens}
        meta_text = json.dumps(meta, indent=1, ensure_ascii=False) + "\n"
        atomic_write(path, lambda f: f.write(ranks_text.encode("utf-8")))
        atomic_write(path + ".json", lambda f: f.write(meta_text.encode("utf-8")))

    @classmethod
    def load(cls, path, pattern=_UNSET, special_tokens=_UNSET):
        """Read a tiktoken ranks file (ours or another tool's).

        The pattern and special tokens come from the arguments if given, else from
        ``path + '.json'`` if it exists, else pattern "gpt2" and no special tokens.
        """
        path = os.fspath(path)
        ranks = _parse_ranks(_read_ranks_file(path), path)
        meta = _read_meta_file(path + ".json")
        if pattern is _UNSET:
            pattern = meta.get("pattern", "gpt2")
        if special_tokens is _UNSET:
            special_tokens = meta.get("special_tokens", {})
        return cls(ranks, pattern=pattern, special_tokens=special_tokens)

    def to_dict(self):
        return {"type": "bpe", "pattern": self.pattern,
                "ranks": {base64.b64encode(token).decode("ascii"): rank for token, rank in self.ranks.items()},
                "special_tokens": dict(self.special_tokens),
                "merges": None if self._merges is None else [[a, b, c] for (a, b), c in self._merges.items()]}

    @classmethod
    def from_dict(cls, d):
        _check_dict_type(d, "bpe")
        ranks = _decode_dict_ranks(d)
        merges = d.get("merges")
        merges = None if merges is None else {(a, b): c for a, b, c in merges}
        return cls(ranks, pattern=d.get("pattern", "gpt2"), special_tokens=d.get("special_tokens") or {},
                   merges=merges)

    def __repr__(self):
        return (f"BPETokenizer(vocab_size={self.vocab_size}, pattern={self.pattern!r}, "
                f"special_tokens={self.special_tokens!r})")

    # -- checks that need the tokenizer ----------------------------------------

    def _check_token_id(self, name, i):
        if not (is_int(i) and 0 <= i < self.vocab_size) or self._decoder[i] is None:
            raise ValueError(f"{name}: expected a token id of this tokenizer, got {i!r}")

    def _check_encode(self, text, allowed_special, disallowed_special):
        """The set of allowed special tokens, once no disallowed one is in ``text``."""
        _check_text("text", text)
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(f"allowed_special: expected special tokens of this tokenizer "
                             f"{sorted(self.special_tokens)}, got unknown {sorted(unknown)}")
        disallowed = (set(self.special_tokens) - allowed if disallowed_special == "all"
                      else set(disallowed_special))
        found = self._special_regex(disallowed).search(text) if disallowed else None
        if found:
            raise ValueError(f"text: contains the special token {found.group()!r} at index {found.start()}; "
                             f"pass allowed_special={{{found.group()!r}}} (or 'all') to encode it as a "
                             "special token, or disallowed_special=() to encode it as plain text")
        return allowed


def _bpe_at_once(data, lens, pair_ranks):
    """The BPE ids of each of the byte strings that ``data`` holds one after another,
    ``lens[k]`` bytes the k-th, all merged together: (ids, n_ids), piece k's ids being
    the n_ids[k] after the first n_ids[:k].sum() of ``ids``.

    The rule of _bpe_parts, one merge per piece per round: every piece merges its
    lowest-rank adjacent pair (leftmost on ties), and a piece with no mergeable
    pair left is put aside. All pieces live in one flat array of ids, piece after
    piece, with ``ranks[i]`` the rank of the pair (i, i + 1) kept up to date (a
    merge changes only the two pairs beside it), so a round is a few NumPy passes
    over the ids still being merged; rounds = the most merges any one piece needs.
    """
    width = pair_ranks.shape[1]
    table = pair_ranks.ravel()
    n_pieces = len(lens)
    if n_pieces == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    lens = lens.astype(np.int64)                        # ids per active piece
    ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    ends = np.cumsum(lens)
    ranks = np.empty(ids.size, dtype=np.int64)          # ranks[i]: of the pair (i, i + 1)
    ranks[:-1] = table[ids[:-1] * width + ids[1:]]
    ranks[ends - 1] = _NO_RANK                          # no pair across two pieces
    positions = np.arange(ids.size)
    piece_of = np.arange(n_pieces)                      # active piece -> its index
    finished = []                                       # (piece indices, their lengths, their ids) per round
    while piece_of.size:
        # Per piece the lowest rank and the leftmost pair of that rank: one reduceat over rank:position.
        best = np.minimum.reduceat((ranks << 32) | positions[:ids.size], ends - lens)
        lowest, first = best >> 32, best & 0xFFFFFFFF
        keep = np.ones(ids.size, dtype=bool)
        done = lowest == _NO_RANK
        removed_before = 0                              # per piece: ids removed before it this round
        if done.any():                                  # put the finished pieces aside
            at_done = np.repeat(done, lens)
            finished.append((piece_of[done], lens[done], ids.compress(at_done)))
            keep[at_done] = False
            active = ~done
            removed_before = np.cumsum(np.where(done, lens, 0))[active]
            lens, lowest, first, piece_of = lens[active], lowest[active], first[active], piece_of[active]
        ids[first] = lowest                             # the pair merges into its token, whose id is its rank
        keep[first + 1] = False
        ids, ranks = ids.compress(keep), ranks.compress(keep)
        lens -= 1
        ends = np.cumsum(lens)
        at = first - removed_before - np.arange(first.size)  # where the merged ids are now
        right = np.minimum(at + 1, ids.size - 1)
        ranks[at] = np.where(at + 1 == ends, _NO_RANK, table[ids[at] * width + ids[right]])
        left = at[at > ends - lens] - 1
        ranks[left] = table[ids[left] * width + ids[left + 1]]
    # Back in piece order: piece k's ids are the run of n_ids[k] ids at offset[k] of the finished ones.
    order = np.concatenate([indices for indices, _, _ in finished])
    got = np.concatenate([lengths for _, lengths, _ in finished])
    n_ids, offset = np.empty(n_pieces, dtype=np.int64), np.empty(n_pieces, dtype=np.int64)
    n_ids[order], offset[order] = got, np.cumsum(got) - got
    done = np.concatenate([ids_done for _, _, ids_done in finished])
    return done[_runs_index(offset, n_ids)], n_ids


def _runs_index(run_starts, lens):
    """The indices run_starts[0], run_starts[0] + 1, ... (lens[0] of them), then those of run 1, ...:
    gathering with them lays the runs end to end."""
    shift = np.repeat(run_starts - (np.cumsum(lens) - lens), lens)
    return shift + np.arange(shift.size, dtype=np.int64)


# A 64-bit polynomial hash of each chunk's bytes (odd base, arithmetic mod 2**64; the
# inverse base undoes the chunk's offset in the text), then an odd multiplier that carries
# every bit up into the high bits _distinct_chunks sorts by.
_HASH_BASE = 0x9E3779B97F4A7C15
_HASH_BASE_INVERSE = pow(_HASH_BASE, -1, 1 << 64)
_HASH_MIX = 0xBF58476D1CE4E5B9


def _distinct_chunks(codes, starts):
    """The distinct chunks among ``codes[starts[k]:starts[k + 1]]`` (the last running to the end):
    (first, inverse, counts) with ``first[u]`` the first chunk equal to distinct chunk u,
    ``inverse[k]`` the distinct chunk of chunk k and ``counts[u]`` its occurrences (u in
    the order of the chunks' hashes); None if two different chunks hashed alike.

    Every chunk is hashed (a polynomial in its bytes, mod 2**64), the hashes sorted,
    and equal hashes grouped. A hash can collide, so the answer is then checked
    byte for byte: each chunk must equal its group's first chunk. If one does not, the
    caller takes its plain path; the result is exact either way.
    """
    n, m = codes.size, starts.size
    if m == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    ends = np.append(starts[1:], n)
    lens = ends - starts
    power = np.full(n + 1, _HASH_BASE, dtype=np.uint64)
    power[0] = 1
    np.cumprod(power, out=power)                        # power[i] = base ** i (mod 2**64, wrapping)
    prefix = np.zeros(n + 1, dtype=np.uint64)
    np.cumsum(codes * power[:n], out=prefix[1:])        # prefix[i] = sum of codes[j] * base ** j, j < i
    power.fill(_HASH_BASE_INVERSE)
    power[0] = 1
    np.cumprod(power, out=power)                        # now base ** -i
    key = ((prefix[ends] - prefix[starts]) * power[starts] + lens.astype(np.uint64)) * np.uint64(_HASH_MIX)
    # Sort the hashes with each chunk's index in the low bits (one plain sort, no argsort).
    bits = max(1, (m - 1).bit_length())
    low = np.uint64((1 << bits) - 1)
    packed = np.sort((key & ~low) | np.arange(m, dtype=np.uint64))
    order = (packed & low).astype(np.int64)
    new = np.empty(m, dtype=bool)
    new[:1] = True
    np.not_equal(packed[1:] & ~low, packed[:-1] & ~low, out=new[1:])
    inverse = np.empty(m, dtype=np.int64)
    inverse[order] = np.cumsum(new) - 1
    first = order[new]                                  # smallest index in each group: the first occurrence
    counts = np.diff(np.append(np.flatnonzero(new), m))
    like = first[inverse]                               # the chunk each chunk must equal
    if not np.array_equal(lens[like], lens):
        return None
    if not np.array_equal(codes[_runs_index(starts[like], lens)], codes):
        return None
    return first, inverse, counts


# -- the steps of BPETokenizer.train ------------------------------------------

def _count_chunks(text, pattern, special_tokens):
    """The distinct chunks of the pre-split of ``text`` (special tokens cut out first) and their counts:
    (codes, lens, freqs): chunk k is the ``lens[k]`` UTF-8 bytes of ``codes`` (a uint8 array)
    after the ``lens[:k].sum()`` of the chunks before it, and occurs ``freqs[k]`` times.

    GPT2_PATTERN and GPT4_PATTERN take the array path (_count_chunks_at_once): the same
    chunks and counts, possibly in another order (which no merge depends on).
    """
    pieces = [text]
    if special_tokens:
        pieces = re.split("|".join(map(re.escape, sorted(special_tokens, key=len, reverse=True))), text)
    pieces = [piece for piece in pieces if piece]
    chunk_starts = None if pattern is None else ARRAY_SPLITTERS.get(PATTERNS.get(pattern, pattern))
    if chunk_starts is not None and pieces:
        found = _count_chunks_at_once(pieces, chunk_starts)
        if found is not None:
            return found
    split = (lambda piece: [piece]) if pattern is None else compile_splitter(pattern)
    chunk_counts = Counter()
    for piece in pieces:
        chunk_counts.update(split(piece))
    chunk_counts.pop("", None)  # a pattern that can match nothing: the empty chunk has no pairs
    encoded = [chunk.encode("utf-8") for chunk in chunk_counts]
    return (np.frombuffer(b"".join(encoded), dtype=np.uint8), np.array(list(map(len, encoded)), dtype=np.int64),
            np.array(list(chunk_counts.values()), dtype=np.int64))


def _count_chunks_at_once(pieces, chunk_starts):
    """_count_chunks in NumPy, for a pattern whose array pre-split is ``chunk_starts``; None in
    the (never seen) case that _distinct_chunks reports a hash collision.

    _chunks_utf8 cuts each piece; the pieces' bytes and chunk starts are laid end
    to end (a chunk never spans two pieces), and _distinct_chunks finds the distinct ones.
    """
    cut = [_chunks_utf8(piece, chunk_starts) for piece in pieces]
    offsets = np.cumsum([0] + [len(data) for data, _, _ in cut[:-1]]).tolist()
    codes = np.frombuffer(b"".join(data for data, _, _ in cut), dtype=np.uint8)
    starts = np.concatenate([piece_starts + at for (_, _, piece_starts), at in zip(cut, offsets)])
    distinct = _distinct_chunks(codes, starts)
    if distinct is None:
        return None
    first, _, freqs = distinct
    lens = np.diff(np.append(starts, codes.size))[first]
    return codes[_runs_index(starts[first], lens)], lens, freqs


def _chunks_utf8(text, chunk_starts):
    """(data, codes, starts): the UTF-8 bytes of ``text`` (bytes, and a uint8 array) and the byte
    offsets at which its chunks start. ``chunk_starts`` (gpt2_chunk_starts, gpt4_chunk_starts)
    works on characters, so text that is not ASCII goes in as code points, and each chunk's
    start is moved to its byte."""
    data = text.encode("utf-8")
    codes = np.frombuffer(data, dtype=np.uint8)
    if len(data) == len(text):  # ASCII: one byte per character
        return data, codes, chunk_starts(codes)
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    width = 1 + (points >= 0x80).astype(np.int64) + (points >= 0x800) + (points >= 0x10000)  # UTF-8 bytes each
    return data, codes, np.concatenate(([0], np.cumsum(width)))[chunk_starts(points)]


def _learn_merges(codes, lens, freqs, n_merges):
    """The merge loop: {(a, b): new id} for up to ``n_merges`` new ids, from the distinct
    chunks of _count_chunks (chunk k: ``lens[k]`` bytes of ``codes``, ``freqs[k]`` occurrences).

    The merges of train_bpe_naive, without recounting. All chunks lie in one flat
    list of ids, each chunk a linked list: ``nxt[p]`` / ``prv[p]`` is the position of
    the next / previous live id of the same chunk (-1 at its ends), so merging the
    pair at p writes the new id at p and unlinks its right partner q = nxt[p].

    - ``counts[key]``, key = a * V + b: the pair's occurrences in the text (each
      position weighs its chunk's frequency). A merge changes only the pairs beside
      it: (x, a) and (b, y) lose, (x, new) and (new, y) gain.
    - ``where[key]``: the positions at which the pair was ever created. Merging a
      pair visits only those, skipping a position whose ids have changed since.
    - a heap of the entries key - count * V**2 (one int each: the smallest is the
      highest count, then the smallest key). A count only grows in the merge that
      creates its pair (which pushes it); later it only falls, so a stale entry
      overstates its count and is pushed again, corrected, when it reaches the top.
      The first entry found current is the answer.

    The first merges are the big ones: the most frequent pairs sit at thousands of
    positions. While they last, _learn_merges_at_once does them with array passes
    over all positions at once (vocabularies up to _DENSE_PAIRS); this loop, one
    position at a time, takes over from it.
    """
    V = 256 + n_merges
    ids, nxt, prv, freq = _linked_chunks(codes, lens, freqs)
    merges = _learn_merges_at_once(ids, nxt, prv, freq, V) if V <= _DENSE_PAIRS else {}
    counts, where = _pairs_in_place(ids, nxt, freq, V)
    ids, nxt, prv, freq = ids.tolist(), nxt.tolist(), prv.tolist(), freq.tolist()
    heap = [key - count * V * V for key, count in counts.items()]
    heapq.heapify(heap)
    for new_id in range(256 + len(merges), V):
        key = _pop_most_frequent(heap, counts, V * V)
        if key is None:
            break  # no pairs left: every chunk is a single token
        a, b = divmod(key, V)
        merges[(a, b)] = new_id
        created = defaultdict(list)  # new pair key -> the positions where it starts
        for p in sorted(where.pop(key)):
            q = nxt[p]
            if ids[p] != a or q < 0 or ids[q] != b:
                continue  # not (or no longer) the pair: an earlier merge took one of its ids
            f, left, right = freq[p], prv[p], nxt[q]
            if left >= 0:
                lost = ids[left] * V + a                # (x, a) ...
                counts[lost] -= f
                gained = lost - a + new_id              # ... becomes (x, new)
                counts[gained] += f
                created[gained].append(left)
            if right >= 0:
                y = ids[right]
                counts[b * V + y] -= f                  # (b, y) ...
                gained = new_id * V + y                 # ... becomes (new, y)
                counts[gained] += f
                created[gained].append(p)
                prv[right] = p
            ids[p], ids[q], nxt[p] = new_id, -1, right
        del counts[key]  # every occurrence merged (a run a a a leaves no (a, a) behind)
        where.update(created)
        for gained in created:
            if counts[gained] > 0:
                heapq.heappush(heap, gained - counts[gained] * V * V)
    return merges


def _linked_chunks(codes, lens, freqs):
    """The flat positions of _learn_merges: ids, nxt, prv and freq (int64 arrays, one entry per byte)."""
    ids = codes.astype(np.int64)
    ends = np.cumsum(lens)
    nxt = np.arange(1, ids.size + 1)
    nxt[ends[lens > 0] - 1] = -1
    prv = np.arange(-1, ids.size - 1)
    prv[(ends - lens)[lens > 0]] = -1
    return ids, nxt, prv, np.repeat(np.asarray(freqs, dtype=np.int64), lens)


def _pairs_in_place(ids, nxt, freq, V):
    """The pair counts and positions of _learn_merges (dicts by key = a * V + b), counted in NumPy
    over the linked positions (arrays; a position with nxt -1 starts no pair).

    Every adjacent pair becomes its key; sorting the keys groups the positions (in order),
    and summing the positions' frequencies per group gives the counts.
    """
    at = np.flatnonzero(nxt >= 0)
    keys = ids[at] * V + ids[nxt[at]]
    counts = defaultdict(int)
    if keys.size == 0:
        return counts, {}
    order = np.argsort(keys, kind="stable")             # positions stay in order within a key
    keys = keys[order]
    firsts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    distinct = keys[firsts].tolist()
    counts.update(zip(distinct, np.add.reduceat(freq[at][order], firsts).tolist()))
    positions = at[order].tolist()
    bounds = np.append(firsts, keys.size).tolist()
    return counts, dict(zip(distinct, map(positions.__getitem__, map(slice, bounds[:-1], bounds[1:]))))


def _pop_most_frequent(heap, counts, scale):
    """The key of the most frequent pair (smallest key on ties); None when no pair is left.
    Heap entries are key - count * scale."""
    while heap:
        entry = heapq.heappop(heap)
        key = entry % scale
        count = counts.get(key, 0)
        if key - count * scale == entry:
            return key
        if count > 0:  # stale: its count fell since the push; back in, corrected
            heapq.heappush(heap, key - count * scale)
    return None


def _learn_merges_at_once(ids, nxt, prv, freq, V):
    """The first merges of _learn_merges, each as array passes over all positions at once:
    {(a, b): new id}, the arrays updated in place; it returns when no pair is left, or when
    the last _RECENT merges touched fewer than _FEW_POSITIONS positions on average (from
    then on the loop over positions is faster).

    The same merges, found another way. The counts are a dense (V, V) table with
    each row's maximum kept beside it, so the most frequent pair is two argmaxes
    (first maximum: the smallest (a, b) on ties). A merge finds its positions by
    comparing every position's pair key, keeps the leftmost of overlapping ones (a
    run a a a merges its first two), and updates at once the neighbours' ids, links,
    keys and counts: as the loop over positions would, but where two merges sit side
    by side (a b a b), the pair between them, (b, a), becomes (new, new) directly.
    """
    has_next = nxt >= 0
    keys = np.where(has_next, ids * V + ids[nxt], -1)  # keys[p]: the pair starting at p (-1: none)
    total = int(freq[has_next].sum())
    table = np.zeros(V * V, dtype=np.int32 if total < 2**31 else np.int64)
    np.add.at(table, keys[has_next], freq[has_next].astype(table.dtype))
    rows = table.reshape(V, V)
    row_max = rows.max(axis=1)
    touched = np.zeros(V, dtype=bool)
    recent = [2 * _FEW_POSITIONS] * _RECENT             # positions merged by the last merges
    merges = {}
    for new_id in range(256, V):
        a = int(row_max[:new_id].argmax())
        if row_max[a] <= 0:
            break  # no pairs left
        b = int(rows[a, :new_id].argmax())
        merges[(a, b)] = new_id
        key = a * V + b
        at = np.flatnonzero(keys == key)
        if a == b and at.size > 1:  # a run a a a: of overlapping pairs only the 1st, 3rd, ... merge
            follows = np.zeros(at.size, dtype=bool)
            follows[1:] = prv[at[1:]] == at[:-1]
            k = np.arange(at.size)
            at = at[(k - np.maximum.accumulate(np.where(follows, 0, k))) % 2 == 0]
        q, left, f = nxt[at], prv[at], freq[at]
        right = nxt[q]
        x, y = ids[left], ids[right]                    # (garbage where left / right is -1: masked)
        has_left, has_right = left >= 0, right >= 0
        y_after = y.copy()
        if at.size > 1:  # side by side: the left partner is the previous merge's q, the right one merges too
            has_left[1:] &= left[1:] != q[:-1]
            y_after[:-1][right[:-1] == at[1:]] = new_id
        after = np.where(has_right, new_id * V + y_after, -1)  # the new pair starting at each merge
        x, fl = x[has_left], f[has_left]
        y, y_after, fr = y[has_right], y_after[has_right], f[has_right]
        table[key] -= f.sum()
        np.add.at(table, np.concatenate((x * V + a, b * V + y, x * V + new_id, new_id * V + y_after)),
                  np.concatenate((-fl, -fr, fl, fr)).astype(table.dtype))
        ids[at], ids[q], nxt[q], prv[q], keys[q] = new_id, -1, -1, -1, -1
        keys[at] = after
        keys[left[has_left]] = x * V + new_id
        nxt[at] = right
        prv[right[has_right]] = at[has_right]
        touched[x] = True                               # the rows whose counts changed
        touched[[a, b, new_id]] = True
        changed = np.flatnonzero(touched[:new_id + 1])
        touched[changed] = False
        row_max[changed] = rows[changed, :new_id + 1].max(axis=1)
        recent[new_id % _RECENT] = at.size
        if sum(recent) < _RECENT * _FEW_POSITIONS:
            break
    return merges


# -- the files of BPETokenizer.save / load ------------------------------------

def _read_ranks_file(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise ValueError(f"path: cannot read ranks file {path!r}: {err.strerror}") from None


def _read_meta_file(path):
    """The JSON object in ``path`` (pattern, special tokens), or {} if there is no such file."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError("expected a JSON object")
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"path: corrupt metadata file {path!r}: {err}") from None
    return meta


def _parse_ranks(raw, path):
    """{token bytes: rank} from a ranks file's bytes: ASCII lines 'base64_token rank', any order."""
    ranks, line_of_rank = {}, {}
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a ranks file: expected ASCII lines 'base64 rank'") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{path}: line {lineno}: expected 'base64_token rank', got {line[:60]!r}")
        try:
            token = base64.b64decode(fields[0], validate=True)
            rank = int(fields[1])
        except (binascii.Error, ValueError):
            raise ValueError(f"{path}: line {lineno}: expected 'base64_token rank', got {line[:60]!r}") from None
        if not token or rank < 0:
            raise ValueError(f"{path}: line {lineno}: expected a non-empty token and a rank >= 0, got {line[:60]!r}")
        if token in ranks:
            raise ValueError(f"{path}: line {lineno}: token {token!r} already has rank {ranks[token]}")
        if rank in line_of_rank:
            raise ValueError(f"{path}: line {lineno}: rank {rank} already used on line {line_of_rank[rank]}")
        ranks[token] = rank
        line_of_rank[rank] = lineno
    if not ranks:
        raise ValueError(f"{path}: empty ranks file")
    return ranks


def _decode_dict_ranks(d):
    """{token bytes: rank} from to_dict()'s d["ranks"], {base64 token: rank}."""
    try:
        return {base64.b64decode(token, validate=True): int(rank) for token, rank in d["ranks"].items()}
    except (binascii.Error, ValueError, TypeError, AttributeError, KeyError) as err:
        raise ValueError(f"d['ranks']: expected a dict of base64 token -> rank, got a corrupt entry ({err})") \
            from None


# ---------------------------------------------------------------------------
# WordPiece (BERT)
# ---------------------------------------------------------------------------

def _is_punctuation(char):
    # BERT counts every non-alphanumeric ASCII symbol as punctuation ($, ^, `, ...), plus Unicode P*.
    cp = ord(char)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(cp):
    # The CJK Unified Ideographs blocks (not Hangul, Hiragana or Katakana, which use spaces).
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class WordPieceTokenizer:
    """BERT's WordPiece: basic tokenization, then greedy longest-match-first sub-words.

    vocab: list of tokens in id order (a BERT vocab.txt, one token per line).
    lowercase: lower-case and strip accents (the "uncased" models).
    """

    SPECIAL_NAMES = ("unk_token", "cls_token", "sep_token", "pad_token", "mask_token")

    def __init__(self, vocab, lowercase=True, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                 pad_token="[PAD]", mask_token="[MASK]", max_chars_per_word=100, tokenize_cjk=True,
                 strip_accents=None):
        vocab = _check_wordpiece_vocab(vocab, unk_token=unk_token, cls_token=cls_token, sep_token=sep_token,
                                       pad_token=pad_token)  # as a list
        self.vocab = vocab
        self.token_to_id = {token: i for i, token in enumerate(vocab)}
        self.lowercase = bool(lowercase)
        self.strip_accents = self.lowercase if strip_accents is None else bool(strip_accents)
        self.tokenize_cjk = bool(tokenize_cjk)
        self.max_chars_per_word = int(max_chars_per_word)
        self.unk_token, self.cls_token, self.sep_token = unk_token, cls_token, sep_token
        self.pad_token, self.mask_token = pad_token, mask_token
        self.unk_id, self.cls_id = self.token_to_id[unk_token], self.token_to_id[cls_token]
        self.sep_id, self.pad_id = self.token_to_id[sep_token], self.token_to_id[pad_token]
        self.mask_id = self.token_to_id.get(mask_token)
        # Special tokens written in the text stay whole (as in Hugging Face's BertTokenizer).
        self.special_tokens = [token for token in (unk_token, sep_token, pad_token, cls_token, mask_token)
                               if token in self.token_to_id]
        self._special_re = re.compile("(" + "|".join(
            map(re.escape, sorted(self.special_tokens, key=lambda s: (-len(s), s)))) + ")")

    @classmethod
    def from_vocab(cls, path, lowercase=True, **kwargs):
        """Read a BERT vocab.txt: one token per line, id = line number - 1."""
        path = os.fspath(path)
        tokens = _read_vocab_file(path)
        try:
            return cls(tokens, lowercase=lowercase, **kwargs)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    @property
    def vocab_size(self):
        return len(self.vocab)

    # -- basic tokenization -----------------------------------------------------

    def _clean(self, text):
        # Drop NUL, U+FFFD and control characters; every whitespace character becomes a space.
        out = []
        for char in text:
            if char in " \t\n\r":
                out.append(" ")
                continue
            category = unicodedata.category(char)
            if char == "\x00" or char == "\ufffd" or category[0] == "C":
                continue
            out.append(" " if category == "Zs" else char)
        return "".join(out)

    def _split_punct(self, word):
        out, new_word = [], True
        for char in word:
            if _is_punctuation(char):
                out.append(char)
                new_word = True
            else:
                if new_word:
                    out.append("")
                    new_word = False
                out[-1] += char
        return out

    def _strip_accents(self, word):
        return "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")

    def basic_tokenize(self, text):
        """Clean, space out CJK ideographs, NFC-normalise, split on whitespace, lower-case/strip accents,
        split off punctuation -> list of words."""
        _check_text("text", text)
        cleaned = self._clean(text)
        if self.tokenize_cjk:
            cleaned = "".join(f" {c} " if _is_cjk(ord(c)) else c for c in cleaned)
        normalised = unicodedata.normalize("NFC", cleaned)
        words = []
        for word in normalised.split():
            if self.lowercase:
                word = word.lower()
            if self.strip_accents:
                word = self._strip_accents(word)
            words.extend(self._split_punct(word))
        return " ".join(words).split()

    def wordpiece(self, word):
        """Greedy longest-match-first: the longest vocabulary prefix, then '##' + the longest next piece..."""
        if len(word) > self.max_chars_per_word:
            return [self.unk_token]
        index, pieces, start, n = self.token_to_id, [], 0, len(word)
        while start < n:
            end = n
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in index:
                    break
                end -= 1
            else:
                return [self.unk_token]  # some position has no piece at all: the whole word is unknown
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text):
        """text -> list of WordPiece tokens (strings), without [CLS]/[SEP]."""
        _check_text("text", text)
        tokens = []
        for k, part in enumerate(self._special_re.split(text) if self.special_tokens else [text]):
            if k % 2:
                tokens.append(part)  # a special token written in the text
                continue
            for word in self.basic_tokenize(part):
                tokens.extend(self.wordpiece(word))
        return tokens

    # -- ids --------------------------------------------------------------------

    def _ids(self, text):
        return [self.token_to_id[t] for t in self.tokenize(text)]

    def encode(self, text, pair=None):
        """[CLS] text [SEP] (pair [SEP]) -> ids."""
        _check_wordpiece_encode(text, pair)
        ids, _ = self._encode_row(text, pair, max_length=None)
        return ids

    def batch_encode(self, texts, max_length=None, padding=True, truncation=True):
        """Encode a batch: texts are strings or (text, pair) tuples.

        padding: True pads to the longest row, "max_length" to ``max_length``,
        False requires equal lengths. truncation: cut the longer of the two
        segments one token at a time until a row fits ``max_length`` (specials kept).
        Returns {"input_ids", "token_type_ids", "attention_mask"}: int64 arrays (B, T).
        """
        text_pairs, max_length = _check_batch_encode(texts, max_length, padding)  # [(text, pair or None)]
        rows = [self._encode_row(text, pair, max_length if truncation else None) for text, pair in text_pairs]
        width = _padded_width([len(ids) for ids, _ in rows], padding, max_length)
        return self._pad(rows, width)

    def _encode_row(self, text, pair, max_length):
        """([CLS] text [SEP] (pair [SEP]) ids, their token type ids 0... (1...)), cut to ``max_length`` if given."""
        ids_a = self._ids(text)
        ids_b = None if pair is None else self._ids(pair)
        if max_length is not None:
            ids_a, ids_b = _truncate_longest_first(ids_a, ids_b, max_length - (2 if ids_b is None else 3))
        segment_a = [self.cls_id] + ids_a + [self.sep_id]
        segment_b = [] if ids_b is None else ids_b + [self.sep_id]
        return segment_a + segment_b, [0] * len(segment_a) + [1] * len(segment_b)

    def _pad(self, rows, width):
        """The (ids, token types) rows padded to ``width`` -> the three (B, T) int64 arrays."""
        batch = len(rows)
        input_ids = np.full((batch, width), self.pad_id, dtype=np.int64)  # (B, T)
        token_type_ids = np.zeros((batch, width), dtype=np.int64)         # (B, T)
        attention_mask = np.zeros((batch, width), dtype=np.int64)         # (B, T)
        for i, (ids, type_ids) in enumerate(rows):
            input_ids[i, :len(ids)] = ids
            token_type_ids[i, :len(type_ids)] = type_ids
            attention_mask[i, :len(ids)] = 1
        return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}

    def decode(self, ids, skip_special_tokens=False, clean_up_spaces=False):
        """ids -> text: tokens joined by spaces, '##' continuations glued to the piece before.

        clean_up_spaces: also remove the space before . , ! ? and English contractions
        ("do n't" -> "don't"), as Hugging Face does by default. Either way the text is
        the normalised one (lower-cased, accents stripped), not the original.
        """
        tokens = map(self.vocab.__getitem__, _ids_to_list("ids", ids, len(self.vocab)))
        if skip_special_tokens:
            special = set(self.special_tokens)
            tokens = (t for t in tokens if t not in special)
        text = " ".join(tokens).replace(" ##", "").strip()
        if not clean_up_spaces:
            return text
        for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                               (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
            text = text.replace(spaced, joined)
        return text

    def to_dict(self):
        d = {"type": "wordpiece", "vocab": list(self.vocab), "lowercase": self.lowercase,
             "strip_accents": self.strip_accents, "tokenize_cjk": self.tokenize_cjk,
             "max_chars_per_word": self.max_chars_per_word}
        d.update({name: getattr(self, name) for name in self.SPECIAL_NAMES})
        return d

    @classmethod
    def from_dict(cls, d):
        _check_dict_type(d, "wordpiece")
        kwargs = {k: d[k] for k in ("strip_accents", "tokenize_cjk", "max_chars_per_word") + cls.SPECIAL_NAMES
                  if k in d}
        return cls(d["vocab"], lowercase=d.get("lowercase", True), **kwargs)

    def __repr__(self):
        return f"WordPieceTokenizer(vocab_size={self.vocab_size}, lowercase={self.lowercase})"


def _truncate_longest_first(ids_a, ids_b, budget):
    """Cut to ``budget`` ids in all: one segment at its end; a pair one id at a time from the longer
    segment (the second on ties), as the original BERT does."""
    if ids_b is None:
        return ids_a[:budget], None
    len_a, len_b = len(ids_a), len(ids_b)
    while len_a + len_b > budget:
        if len_a > len_b:
            len_a -= 1
        else:
            len_b -= 1
    return ids_a[:len_a], ids_b[:len_b]


def _padded_width(lengths, padding, max_length):
    """The width T that rows of these lengths are padded to."""
    longest = max(lengths)
    if padding == "max_length":
        return max(max_length, longest)
    if not padding:
        _check_equal_lengths(lengths)
    return longest


def _read_vocab_file(path):
    """The tokens of a BERT vocab.txt, one per line (LF or CRLF), the last line's newline optional."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise ValueError(f"path: cannot read vocabulary file {path!r}: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a vocab.txt: invalid UTF-8 at byte {err.start}") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    tokens = [line[:-1] if line.endswith("\r") else line for line in lines]
    if not tokens:
        raise ValueError(f"{path}: empty vocabulary file")
    for i, token in enumerate(tokens):
        if not token:
            raise ValueError(f"{path}: line {i + 1}: empty token")
    return tokens


# ---------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------

_TYPES = {"char": CharTokenizer, "bpe": BPETokenizer, "wordpiece": WordPieceTokenizer}


def tokenizer_from_dict(d):
    """Rebuild a tokenizer from ``to_dict()``, dispatching on d["type"] ("char", "bpe", "wordpiece")."""
    _check_dict_type(d, tuple(_TYPES))
    return _TYPES[d["type"]].from_dict(d)


# ---------------------------------------------------------------------------
# Argument checks (kept out of the algorithms above)
# ---------------------------------------------------------------------------

def _check_text(name, text):
    if not isinstance(text, str):
        raise TypeError(f"{name}: expected a str, got {type(text).__name__}")


def _ids_to_list(name, ids, vocab_size):
    """A list of Python ints from a list/tuple/1-D integer array, each in [0, vocab_size)."""
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"{name}: expected a sequence of integer ids, got {type(ids).__name__}")
    # Not backend.check_ids: its device-generic min/max took about twice as long as these (17 vs 9 us a
    # call, measured on a busy machine), a cost that every decode of a short id list would pay.
    array = to_numpy(ids) if hasattr(ids, "shape") else np.asarray(list(ids))
    if array.size == 0:
        return []
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer ids, got dtype {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of ids, got shape {tuple(array.shape)}")
    lo, hi = int(array.min()), int(array.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{name}: expected ids in [0, {vocab_size}), got {lo if lo < 0 else hi}")
    return array.tolist()


def _check_dict_type(d, want):
    """``d`` is a dict whose "type" is ``want`` (a str) or one of ``want`` (a tuple)."""
    if not isinstance(d, dict):
        raise TypeError(f"d: expected a dict (from to_dict()), got {type(d).__name__}")
    if isinstance(want, tuple) and d.get("type") not in want:
        raise ValueError(f"d['type']: expected one of {sorted(want)}, got {d.get('type')!r}")
    if isinstance(want, str) and d.get("type") != want:
        raise ValueError(f"d['type']: expected {want!r}, got {d.get('type')!r}")


def _check_token_list(vocab, hint):
    """list(vocab) if it is a sequence of non-empty strings, without repeats."""
    if isinstance(vocab, str):
        raise TypeError(f"vocab: expected a list of tokens, got a str (use {hint})")
    tokens = list(vocab)
    for i, token in enumerate(tokens):
        if not isinstance(token, str) or not token:
            raise TypeError(f"vocab[{i}]: expected a non-empty str, got {token!r}")
    return tokens


def _check_unique_tokens(tokens):
    first_id = {}
    for i, token in enumerate(tokens):
        if token in first_id:
            raise ValueError(f"vocab[{i}]: token {token!r} already has id {first_id[token]}")
        first_id[token] = i


def _check_unk(unk):
    if unk is not None and (not isinstance(unk, str) or not unk):
        raise TypeError(f"unk: expected None or a non-empty str, got {unk!r}")


def _check_char_vocab(vocab, unk):
    """The vocabulary as a list, ``unk`` appended if it is not in it."""
    tokens = _check_token_list(vocab, "CharTokenizer.from_text(text)")
    _check_unk(unk)
    if unk is not None and unk not in tokens:
        tokens = tokens + [unk]
    if not tokens:
        raise ValueError("vocab: expected at least one token, got an empty vocabulary")
    _check_unique_tokens(tokens)
    return tokens


def _check_char_from_text(text, unk):
    _check_text("text", text)
    if not text:
        raise ValueError("text: expected a non-empty str to build a vocabulary from, got ''")
    _check_unk(unk)


def _check_wordpiece_vocab(vocab, **required_tokens):
    """The vocabulary as a list, once its tokens are unique and hold every required special token."""
    tokens = _check_token_list(vocab, "WordPieceTokenizer.from_vocab(path)")
    _check_unique_tokens(tokens)
    present = set(tokens)
    for name, token in required_tokens.items():
        if token not in present:
            raise ValueError(f"{name}: expected {token!r} in the vocabulary, but it is not there")
    return tokens


def _check_wordpiece_encode(text, pair):
    _check_text("text", text)
    if pair is not None:
        _check_text("pair", pair)


def _check_batch_encode(texts, max_length, padding):
    """([(text, pair or None)], max_length as an int or None) from batch_encode's arguments."""
    if isinstance(texts, str) or not hasattr(texts, "__iter__"):
        raise TypeError(f"texts: expected a list of str or (str, str) pairs, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError("texts: expected at least one text, got an empty list")
    max_length = check_int_arg("max_length", max_length, lo=3, optional=True)
    check_choice("padding", padding, (True, False, "longest", "max_length"))
    if padding == "max_length" and max_length is None:
        raise ValueError("max_length: padding='max_length' needs a max_length, got None")
    return [_check_text_pair(f"texts[{i}]", item) for i, item in enumerate(texts)], max_length


def _check_text_pair(name, item):
    """(text, pair or None) from a str or a 2-sequence (str, str or None)."""
    if isinstance(item, str):
        return item, None
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str) \
            and (item[1] is None or isinstance(item[1], str)):
        return item[0], item[1]
    raise TypeError(f"{name}: expected a str or a (str, str) pair, got {item!r}"[:200])


def _check_equal_lengths(lengths):
    if any(length != lengths[0] for length in lengths):
        raise ValueError(f"padding: rows have different lengths ({sorted(set(lengths))}); pass padding=True")


def _check_id_list(name, ids):
    if not isinstance(ids, (list, tuple)):
        raise TypeError(f"{name}: expected a list of int ids, got {type(ids).__name__}")
    if not set(map(type, ids)) <= {int} and not all(map(is_int, ids)):  # the set: a quick pass in C
        i, bad = next((i, v) for i, v in enumerate(ids) if not is_int(v))
        raise TypeError(f"{name}[{i}]: expected an int id, got {bad!r}")


def _check_merge_pair(ids, pair, new_id):
    _check_id_list("ids", ids)
    if not (isinstance(pair, tuple) and len(pair) == 2 and is_int(pair[0]) and is_int(pair[1])):
        raise TypeError(f"pair: expected a tuple of two int ids, got {pair!r}")
    check_int_arg("new_id", new_id, lo=0)


def _check_train(text, vocab_size, special_tokens):
    """The special tokens as a list, once text, vocab_size and they are well-formed."""
    _check_text("text", text)
    special_tokens = list(special_tokens or [])
    for token in special_tokens:
        if not isinstance(token, str) or not token:
            raise TypeError(f"special_tokens: expected non-empty strings, got {token!r}")
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special_tokens: expected distinct tokens, got {special_tokens!r}")
    if not is_int(vocab_size):
        raise TypeError(f"vocab_size: expected an int, got {type(vocab_size).__name__}")
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size: expected at least 256 (the bytes) + {len(special_tokens)} "
                         f"(special tokens) = {256 + len(special_tokens)}, got {vocab_size}")
    return special_tokens


def _check_bpe_init(ranks, pattern, special_tokens):
    """``special_tokens`` as a dict, once the ranks, the special ids and the pattern are well-formed."""
    _check_ranks(ranks)
    special_tokens = dict(special_tokens or {})
    for token, i in special_tokens.items():
        if not isinstance(token, str) or not token:
            raise TypeError(f"special_tokens: expected non-empty str keys, got {token!r}")
        if not (is_int(i) and i >= 0):
            raise TypeError(f"special_tokens[{token!r}]: expected a non-negative int id, got {i!r}")
    used_ids = set(ranks.values())
    for token, i in special_tokens.items():
        if i in used_ids:
            raise ValueError(f"special_tokens[{token!r}]: id {i} is already used by another token")
        used_ids.add(i)
    if pattern is not None and not isinstance(pattern, str):
        raise TypeError(f"pattern: expected 'gpt2', 'gpt4', a regex str or None, got {type(pattern).__name__}")
    return special_tokens


def _check_ranks(ranks):
    if not isinstance(ranks, dict):
        raise TypeError(f"ranks: expected a dict of bytes -> int, got {type(ranks).__name__}")
    for token, rank in ranks.items():
        if not isinstance(token, bytes) or not token:
            raise TypeError(f"ranks: expected non-empty bytes keys, got {token!r}")
        if not (is_int(rank) and rank >= 0):
            raise TypeError(f"ranks[{token!r}]: expected a non-negative int, got {rank!r}")
    missing = [b for b in _BYTES if b not in ranks]
    if missing:
        raise ValueError(f"ranks: expected all 256 single bytes (byte-level BPE must encode any text), "
                         f"missing {len(missing)}, e.g. {missing[0]!r}")
    if len(set(ranks.values())) != len(ranks):
        duplicate = next(rank for rank, n in Counter(ranks.values()).items() if n > 1)
        raise ValueError(f"ranks: expected distinct ranks, got rank {duplicate} more than once")
