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
frequency, a merge updates only the counts of the pairs beside it, and a heap
finds the next most frequent pair.

Encoding replays the merges on each chunk's bytes: merge the adjacent pair whose
joined bytes have the lowest rank (rank = id, so earlier merges come first;
leftmost on ties) until no adjacent pair is a token. This is tiktoken's
algorithm, so our ranks give exactly tiktoken's ids.

Every tokenizer has ``vocab_size``, ``encode(text) -> list[int]``,
``decode(ids) -> str``, ``to_dict()`` (JSON-serialisable) and ``from_dict(d)``;
``tokenizer_from_dict(d)`` rebuilds any of them from its dict (checkpoints store
tokenizers this way).
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
from itertools import chain

import numpy as np

from minillm.backend import check_int_arg, is_int, to_numpy
# The pre-split patterns and their translation for `re` live in their own module; they stay importable here.
from minillm.pretokenize import GPT2_PATTERN, GPT4_PATTERN, PATTERNS, compile_pattern, translate_pattern

__all__ = [
    "CharTokenizer", "BPETokenizer", "WordPieceTokenizer", "tokenizer_from_dict",
    "get_pair_counts", "merge_pair", "train_bpe_naive",
    "PATTERNS", "GPT2_PATTERN", "GPT4_PATTERN", "translate_pattern", "compile_pattern",
]


# ---------------------------------------------------------------------------
# Shared argument checks
# ---------------------------------------------------------------------------

def _check_text(name, text):
    if not isinstance(text, str):
        raise TypeError(f"{name}: expected a str, got {type(text).__name__}")


def _ids_to_list(name, ids, vocab_size):
    """A list of Python ints from a list/tuple/1-D integer array, each in [0, vocab_size)."""
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"{name}: expected a sequence of integer ids, got {type(ids).__name__}")
    arr = to_numpy(ids) if hasattr(ids, "shape") else np.asarray(list(ids))
    if arr.size == 0:
        return []
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer ids, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of ids, got shape {tuple(arr.shape)}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{name}: expected ids in [0, {vocab_size}), got {lo if lo < 0 else hi}")
    return arr.tolist()


def _check_dict_type(d, want):
    if not isinstance(d, dict):
        raise TypeError(f"d: expected a dict (from to_dict()), got {type(d).__name__}")
    if d.get("type") != want:
        raise ValueError(f"d['type']: expected {want!r}, got {d.get('type')!r}")


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


# ---------------------------------------------------------------------------
# Char-level
# ---------------------------------------------------------------------------

class CharTokenizer:
    """One id per character: id = index of the character in ``vocab``.

    ``unk``: None (an unknown character is an error) or the token that unknown
    characters map to (added to the vocabulary if absent).
    """

    def __init__(self, vocab, unk=None):
        if isinstance(vocab, str):
            raise TypeError("vocab: expected a list of tokens, got a str (use CharTokenizer.from_text(text))")
        vocab = list(vocab)
        for i, t in enumerate(vocab):
            if not isinstance(t, str) or not t:
                raise TypeError(f"vocab[{i}]: expected a non-empty str, got {t!r}")
        if unk is not None:
            if not isinstance(unk, str) or not unk:
                raise TypeError(f"unk: expected None or a non-empty str, got {unk!r}")
            if unk not in vocab:
                vocab.append(unk)
        if not vocab:
            raise ValueError("vocab: expected at least one token, got an empty vocabulary")
        if len(set(vocab)) != len(vocab):
            dup = next(t for t, c in Counter(vocab).items() if c > 1)
            raise ValueError(f"vocab: expected unique tokens, got {dup!r} more than once")
        self.vocab = vocab
        self.unk = unk
        self._stoi = {t: i for i, t in enumerate(vocab)}
        self.unk_id = None if unk is None else self._stoi[unk]

    @classmethod
    def from_text(cls, text, unk=None):
        """The sorted unique characters of ``text`` (plus ``unk`` if given) as the vocabulary."""
        _check_text("text", text)
        if not text:
            raise ValueError("text: expected a non-empty str to build a vocabulary from, got ''")
        chars = set(text)
        if unk is not None:
            if not isinstance(unk, str) or not unk:
                raise TypeError(f"unk: expected None or a non-empty str, got {unk!r}")
            chars.add(unk)
        return cls(sorted(chars), unk=unk)

    @property
    def vocab_size(self):
        return len(self.vocab)

    def encode(self, text):
        """text (str) -> list of ids, one per character."""
        _check_text("text", text)
        try:
            return list(map(self._stoi.__getitem__, text))
        except KeyError:
            pass
        if self.unk_id is None:
            i, c = next((i, c) for i, c in enumerate(text) if c not in self._stoi)
            raise ValueError(f"text: character {c!r} (U+{ord(c):04X}) at index {i} is not in the "
                             f"vocabulary of {len(self.vocab)} characters; build the tokenizer with "
                             "unk=... to map unknown characters to one token")
        get, u = self._stoi.get, self.unk_id
        return [get(c, u) for c in text]

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


def _merge_word(word, a, b, new, f, delta, where, wi):
    """Replace every non-overlapping (a, b) in ``word``, left to right, by ``new``.

    Only the pairs next to a merge change, so only they are counted: ``delta[pair]``
    gets -f for each pair that disappears and +f for each that appears (f = the
    chunk's frequency), and chunk ``wi`` is indexed under each new pair.
    """
    out, i, n = [], 0, len(word)
    prev_merged = False
    while i < n:
        if word[i] == a and i + 1 < n and word[i + 1] == b:
            delta[(a, b)] -= f
            if out:
                if prev_merged:  # ... new a b: the (b, a) between was counted off by the previous merge
                    p = (new, new)
                else:
                    delta[(word[i - 1], a)] -= f
                    p = (word[i - 1], new)
                delta[p] += f
                where[p].add(wi)
            if i + 2 < n:
                c = word[i + 2]
                delta[(b, c)] -= f
                if not (c == a and i + 3 < n and word[i + 3] == b):  # else the next merge adds (new, new)
                    delta[(new, c)] += f
                    where[(new, c)].add(wi)
            out.append(new)
            i += 2
            prev_merged = True
        else:
            out.append(word[i])
            i += 1
            prev_merged = False
    return out


class BPETokenizer:
    """Byte-level BPE with tiktoken-compatible ranks.

    ranks: dict token bytes -> rank (= id); must contain all 256 single bytes.
    pattern: "gpt2", "gpt4", a tiktoken-syntax regex string, or None (no pre-split:
        the whole text is one chunk, which suits small examples; training and
        encoding then work on one long sequence, so megabytes take long).
    special_tokens: dict str -> id, ids distinct from the ranks.
    """

    def __init__(self, ranks, pattern="gpt2", special_tokens=None, merges=None):
        if not isinstance(ranks, dict):
            raise TypeError(f"ranks: expected a dict of bytes -> int, got {type(ranks).__name__}")
        for tok, r in ranks.items():
            if not isinstance(tok, bytes) or not tok:
                raise TypeError(f"ranks: expected non-empty bytes keys, got {tok!r}")
            if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0:
                raise TypeError(f"ranks[{tok!r}]: expected a non-negative int, got {r!r}")
        missing = [b for b in _BYTES if b not in ranks]
        if missing:
            raise ValueError(f"ranks: expected all 256 single bytes (byte-level BPE must encode any text), "
                             f"missing {len(missing)}, e.g. {missing[0]!r}")
        if len(set(ranks.values())) != len(ranks):
            dup = next(r for r, c in Counter(ranks.values()).items() if c > 1)
            raise ValueError(f"ranks: expected distinct ranks, got rank {dup} more than once")
        special_tokens = dict(special_tokens or {})
        for s, i in special_tokens.items():
            if not isinstance(s, str) or not s:
                raise TypeError(f"special_tokens: expected non-empty str keys, got {s!r}")
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
                raise TypeError(f"special_tokens[{s!r}]: expected a non-negative int id, got {i!r}")
        taken = set(ranks.values())
        for s, i in special_tokens.items():
            if i in taken:
                raise ValueError(f"special_tokens[{s!r}]: id {i} is already used by another token")
            taken.add(i)
        if pattern is not None and not isinstance(pattern, str):
            raise TypeError(f"pattern: expected 'gpt2', 'gpt4', a regex str or None, got {type(pattern).__name__}")
        self.ranks = {bytes(k): int(v) for k, v in ranks.items()}
        self.special_tokens = {s: int(i) for s, i in special_tokens.items()}
        self.pattern = pattern
        self._split = None if pattern is None else compile_pattern(pattern).findall
        self.vocab_size = max(taken) + 1
        decoder = [None] * self.vocab_size
        for tok, r in self.ranks.items():
            decoder[r] = tok
        for s, i in self.special_tokens.items():
            decoder[i] = s.encode("utf-8")
        self._decoder = decoder
        self._merges = None if merges is None else {(int(a), int(b)): int(c) for (a, b), c in merges.items()}
        self._cache = {}
        self._special_re_cache = {}

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
            for tok, r in sorted(self.ranks.items(), key=lambda kv: kv[1]):
                if len(tok) < 2:
                    continue
                parts = self._bpe_parts(tok, max_rank=r)
                if len(parts) == 2:
                    merges[(self.ranks[parts[0]], self.ranks[parts[1]])] = r
            self._merges = merges
        return self._merges

    def token_bytes(self, i):
        """The bytes of token id ``i``."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.vocab_size \
                or self._decoder[i] is None:
            raise ValueError(f"i: expected a token id of this tokenizer, got {i!r}")
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
        the merged pair. Special tokens are cut out of the text first
        (they never merge) and get the ids after the merges, in the order given.
        Training stops early, with a smaller vocabulary, when no pairs are left.
        """
        _check_text("text", text)
        special_tokens = list(special_tokens or [])
        for s in special_tokens:
            if not isinstance(s, str) or not s:
                raise TypeError(f"special_tokens: expected non-empty strings, got {s!r}")
        if len(set(special_tokens)) != len(special_tokens):
            raise ValueError(f"special_tokens: expected distinct tokens, got {special_tokens!r}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
            raise TypeError(f"vocab_size: expected an int, got {type(vocab_size).__name__}")
        if vocab_size < 256 + len(special_tokens):
            raise ValueError(f"vocab_size: expected at least 256 (the bytes) + {len(special_tokens)} "
                             f"(special tokens) = {256 + len(special_tokens)}, got {vocab_size}")
        split = (lambda s: [s] if s else []) if pattern is None else compile_pattern(pattern).findall

        # 1. Pre-split and count identical chunks once.
        counts = Counter()
        pieces = [text]
        if special_tokens:
            pieces = re.split("|".join(map(re.escape, sorted(special_tokens, key=len, reverse=True))), text)
        for piece in pieces:
            counts.update(split(piece))
        words = [list(w.encode("utf-8")) for w in counts]
        freqs = list(counts.values())

        # 2. Initial pair counts, and for each pair the chunks it occurs in.
        pair_counts = defaultdict(int)
        where = defaultdict(set)
        for wi, w in enumerate(words):
            f = freqs[wi]
            for p in zip(w, w[1:]):
                pair_counts[p] += f
                where[p].add(wi)
        # Max-heap of (count, pair) by pushing (-count, a, b); stale entries are skipped on pop.
        heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
        heapq.heapify(heap)

        token = list(_BYTES)
        merges = {}
        n_merges = vocab_size - 256 - len(special_tokens)
        for new in range(256, 256 + n_merges):
            while heap:
                negc, a, b = heapq.heappop(heap)
                if pair_counts.get((a, b)) == -negc:
                    break
            else:
                break  # no pairs left: every chunk is a single token
            merges[(a, b)] = new
            token.append(token[a] + token[b])
            # 3. Re-count only the chunks that contain (a, b).
            delta = defaultdict(int)
            for wi in where.pop((a, b)):
                # Chunks listed under (a, b) may no longer contain it (an earlier merge took
                # those bytes); merging them then changes nothing and counts nothing.
                words[wi] = _merge_word(words[wi], a, b, new, freqs[wi], delta, where, wi)
            for p, d in delta.items():
                if d:
                    c = pair_counts[p] + d
                    if c > 0:
                        pair_counts[p] = c
                        heapq.heappush(heap, (-c, p[0], p[1]))
                    else:
                        del pair_counts[p]
        ranks = {t: i for i, t in enumerate(token)}
        specials = {s: len(token) + k for k, s in enumerate(special_tokens)}
        return cls(ranks, pattern=pattern, special_tokens=specials, merges=merges)

    # -- encoding -------------------------------------------------------------

    def _bpe_parts(self, piece, max_rank=None):
        """The BPE pieces (bytes) of ``piece``: merge the lowest-rank adjacent pair (leftmost on ties) until none."""
        get = self.ranks.get
        if max_rank is not None:  # pretend only the tokens ranked below max_rank exist
            def get(key, default=None, _get=self.ranks.get):
                r = _get(key)
                return default if r is None or r >= max_rank else r
        parts = list(map(_BYTES.__getitem__, piece))
        if len(parts) > _LONG_PIECE:
            return self._bpe_parts_long(piece, get)
        pr = [get(x + y, _INF) for x, y in zip(parts, parts[1:])]
        while pr:
            m = min(pr)
            if m == _INF:
                break
            i = pr.index(m)  # leftmost lowest rank, as tiktoken
            parts[i] += parts[i + 1]
            del parts[i + 1]
            del pr[i]
            if i:
                pr[i - 1] = get(parts[i - 1] + parts[i], _INF)
            if i < len(pr):
                pr[i] = get(parts[i] + parts[i + 1], _INF)
        return parts

    @staticmethod
    def _bpe_parts_long(piece, get):
        """Same result as the list version, O(n log n): a heap of candidate pairs over a linked list."""
        n = len(piece)
        nxt = list(range(1, n + 1))          # nxt[s]: start of the part after the part starting at s
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap = []
        for s in range(n - 1):
            r = get(piece[s:s + 2])
            if r is not None:
                heap.append((r, s, s + 1, s + 2))
        heapq.heapify(heap)
        while heap:
            r, s, m, e = heapq.heappop(heap)
            if not (alive[s] and alive[m] and nxt[s] == m and nxt[m] == e):
                continue  # the pair changed since this entry was pushed
            alive[m] = False
            nxt[s] = e
            if e < n:
                prv[e] = s
                r2 = get(piece[s:nxt[e]])
                if r2 is not None:
                    heapq.heappush(heap, (r2, s, e, nxt[e]))
            p = prv[s]
            if p >= 0:
                r2 = get(piece[p:e])
                if r2 is not None:
                    heapq.heappush(heap, (r2, p, s, e))
        parts, s = [], 0
        while s < n:
            parts.append(piece[s:nxt[s]])
            s = nxt[s]
        return parts

    def _encode_chunk(self, chunk):
        piece = chunk.encode("utf-8")
        r = self.ranks.get(piece)
        if r is not None:  # a whole chunk that is one token (tiktoken's shortcut)
            return (r,)
        return tuple(map(self.ranks.__getitem__, self._bpe_parts(piece)))

    def encode_ordinary(self, text):
        """text -> ids, treating special-token strings as plain text."""
        _check_text("text", text)
        if not text:
            return []
        try:
            if self._split is None:
                return list(self._encode_chunk(text))
            chunks = self._split(text)
            cache = self._cache
            try:  # the common case once warm: every chunk already known, all in C loops
                return list(chain.from_iterable(map(cache.__getitem__, chunks)))
            except KeyError:
                pass
            if len(cache) > _CACHE_LIMIT:
                cache.clear()
            for ch in set(chunks).difference(cache):
                cache[ch] = self._encode_chunk(ch)
            return list(chain.from_iterable(map(cache.__getitem__, chunks)))
        except UnicodeEncodeError as err:
            raise ValueError(f"text: expected encodable Unicode text, got a lone surrogate "
                             f"{text[err.start]!r} at index {err.start}") from None

    def _special_regex(self, tokens):
        key = frozenset(tokens)
        rx = self._special_re_cache.get(key)
        if rx is None:
            alts = "|".join(map(re.escape, sorted(tokens, key=lambda s: (-len(s), s))))
            rx = self._special_re_cache[key] = re.compile(f"({alts})")
        return rx

    def encode(self, text, allowed_special=(), disallowed_special="all"):
        """text -> ids. Special tokens are recognised only where allowed (tiktoken's rules).

        allowed_special: "all" or a collection of special-token strings encoded as
        their special ids. disallowed_special: "all" (every special token not
        allowed) or a collection; finding one in ``text`` is a ValueError, so text
        from users cannot smuggle in control tokens. Pass ``disallowed_special=()``
        to encode them as plain text instead.
        """
        _check_text("text", text)
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(f"allowed_special: expected special tokens of this tokenizer "
                             f"{sorted(self.special_tokens)}, got unknown {sorted(unknown)}")
        disallowed = (set(self.special_tokens) - allowed if disallowed_special == "all"
                      else set(disallowed_special))
        if disallowed:
            m = self._special_regex(disallowed).search(text)
            if m:
                raise ValueError(f"text: contains the special token {m.group()!r} at index {m.start()}; "
                                 f"pass allowed_special={{{m.group()!r}}} (or 'all') to encode it as a "
                                 "special token, or disallowed_special=() to encode it as plain text")
        if not allowed:
            return self.encode_ordinary(text)
        out = []
        parts = self._special_regex(allowed).split(text)
        for k, part in enumerate(parts):
            if k % 2:
                out.append(self.special_tokens[part])
            elif part:
                out.extend(self.encode_ordinary(part))
        return out

    def decode_bytes(self, ids):
        """ids -> the concatenated token bytes."""
        dec = self._decoder
        ids = _ids_to_list("ids", ids, self.vocab_size)
        try:
            return b"".join(map(dec.__getitem__, ids))
        except TypeError:
            bad = next(i for i in ids if dec[i] is None)
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
        lines = "".join(f"{base64.b64encode(t).decode('ascii')} {r}\n"
                        for t, r in sorted(self.ranks.items(), key=lambda kv: kv[1]))
        meta = {"type": "bpe", "pattern": self.pattern, "special_tokens": self.special_tokens}
        _atomic_write(path, lines)
        _atomic_write(path + ".json", json.dumps(meta, indent=1, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path, pattern=_UNSET, special_tokens=_UNSET):
        """Read a tiktoken ranks file (ours or another tool's).

        The pattern and special tokens come from the arguments if given, else from
        ``path + '.json'`` if it exists, else pattern "gpt2" and no special tokens.
        """
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as err:
            raise ValueError(f"path: cannot read ranks file {path!r}: {err.strerror}") from None
        ranks = _parse_ranks(raw, path)
        meta = {}
        if os.path.exists(path + ".json"):
            try:
                with open(path + ".json", encoding="utf-8") as f:
                    meta = json.load(f)
                if not isinstance(meta, dict):
                    raise ValueError("expected a JSON object")
            except (ValueError, UnicodeDecodeError) as err:
                raise ValueError(f"path: corrupt metadata file {path + '.json'!r}: {err}") from None
        if pattern is _UNSET:
            pattern = meta.get("pattern", "gpt2")
        if special_tokens is _UNSET:
            special_tokens = meta.get("special_tokens", {})
        return cls(ranks, pattern=pattern, special_tokens=special_tokens)

    def to_dict(self):
        return {"type": "bpe", "pattern": self.pattern,
                "ranks": {base64.b64encode(t).decode("ascii"): r for t, r in self.ranks.items()},
                "special_tokens": dict(self.special_tokens),
                "merges": None if self._merges is None else [[a, b, c] for (a, b), c in self._merges.items()]}

    @classmethod
    def from_dict(cls, d):
        _check_dict_type(d, "bpe")
        try:
            ranks = {base64.b64decode(k, validate=True): int(v) for k, v in d["ranks"].items()}
        except (binascii.Error, ValueError, TypeError, AttributeError, KeyError) as err:
            raise ValueError(f"d['ranks']: expected a dict of base64 token -> rank, got a corrupt entry ({err})") \
                from None
        merges = d.get("merges")
        merges = None if merges is None else {(a, b): c for a, b, c in merges}
        return cls(ranks, pattern=d.get("pattern", "gpt2"), special_tokens=d.get("special_tokens") or {},
                   merges=merges)

    def __repr__(self):
        return (f"BPETokenizer(vocab_size={self.vocab_size}, pattern={self.pattern!r}, "
                f"special_tokens={self.special_tokens!r})")


def _parse_ranks(raw, path):
    ranks, seen = {}, {}
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
            tok = base64.b64decode(fields[0], validate=True)
            rank = int(fields[1])
        except (binascii.Error, ValueError):
            raise ValueError(f"{path}: line {lineno}: expected 'base64_token rank', got {line[:60]!r}") from None
        if not tok or rank < 0:
            raise ValueError(f"{path}: line {lineno}: expected a non-empty token and a rank >= 0, got {line[:60]!r}")
        if tok in ranks:
            raise ValueError(f"{path}: line {lineno}: token {tok!r} already has rank {ranks[tok]}")
        if rank in seen:
            raise ValueError(f"{path}: line {lineno}: rank {rank} already used on line {seen[rank]}")
        ranks[tok] = rank
        seen[rank] = lineno
    if not ranks:
        raise ValueError(f"{path}: empty ranks file")
    return ranks


def _atomic_write(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# WordPiece (BERT)
# ---------------------------------------------------------------------------

def _is_punctuation(ch):
    # BERT counts every non-alphanumeric ASCII symbol as punctuation ($, ^, `, ...), plus Unicode P*.
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


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
        if isinstance(vocab, str):
            raise TypeError("vocab: expected a list of tokens, got a str (use WordPieceTokenizer.from_vocab(path))")
        vocab = list(vocab)
        for i, t in enumerate(vocab):
            if not isinstance(t, str) or not t:
                raise TypeError(f"vocab[{i}]: expected a non-empty str, got {t!r}")
        index = {}
        for i, t in enumerate(vocab):
            if t in index:
                raise ValueError(f"vocab[{i}]: token {t!r} already has id {index[t]}")
            index[t] = i
        self.vocab = vocab
        self.token_to_id = index
        self.lowercase = bool(lowercase)
        self.strip_accents = self.lowercase if strip_accents is None else bool(strip_accents)
        self.tokenize_cjk = bool(tokenize_cjk)
        self.max_chars_per_word = int(max_chars_per_word)
        self.unk_token, self.cls_token, self.sep_token = unk_token, cls_token, sep_token
        self.pad_token, self.mask_token = pad_token, mask_token
        for name in ("unk_token", "cls_token", "sep_token", "pad_token"):
            tok = getattr(self, name)
            if tok not in index:
                raise ValueError(f"{name}: expected {tok!r} in the vocabulary, but it is not there")
        self.unk_id, self.cls_id = index[unk_token], index[cls_token]
        self.sep_id, self.pad_id = index[sep_token], index[pad_token]
        self.mask_id = index.get(mask_token)
        # Special tokens written in the text stay whole (as in Hugging Face's BertTokenizer).
        self.special_tokens = [t for t in (unk_token, sep_token, pad_token, cls_token, mask_token) if t in index]
        self._special_re = re.compile("(" + "|".join(
            map(re.escape, sorted(self.special_tokens, key=lambda s: (-len(s), s)))) + ")")

    @classmethod
    def from_vocab(cls, path, lowercase=True, **kwargs):
        """Read a BERT vocab.txt: one token per line, id = line number - 1."""
        path = os.fspath(path)
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
            lines.pop()
        lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
        if not lines:
            raise ValueError(f"{path}: empty vocabulary file")
        for i, t in enumerate(lines):
            if not t:
                raise ValueError(f"{path}: line {i + 1}: empty token")
        try:
            return cls(lines, lowercase=lowercase, **kwargs)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    @property
    def vocab_size(self):
        return len(self.vocab)

    # -- basic tokenization -----------------------------------------------------

    def _clean(self, text):
        # Drop NUL, U+FFFD and control characters; every whitespace character becomes a space.
        out = []
        for ch in text:
            if ch in " \t\n\r":
                out.append(" ")
                continue
            cat = unicodedata.category(ch)
            if ch == "\x00" or ch == "\ufffd" or cat[0] == "C":
                continue
            out.append(" " if cat == "Zs" else ch)
        return "".join(out)

    def _split_punct(self, word):
        out, new_word = [], True
        for ch in word:
            if _is_punctuation(ch):
                out.append(ch)
                new_word = True
            else:
                if new_word:
                    out.append("")
                    new_word = False
                out[-1] += ch
        return out

    def _strip_accents(self, word):
        return "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")

    def basic_tokenize(self, text):
        """Clean, space out CJK ideographs, NFC-normalise, split on whitespace, lower-case/strip accents,
        split off punctuation -> list of words."""
        _check_text("text", text)
        text = self._clean(text)
        if self.tokenize_cjk:
            text = "".join(f" {c} " if _is_cjk(ord(c)) else c for c in text)
        text = unicodedata.normalize("NFC", text)
        words = []
        for w in text.split():
            if self.lowercase:
                w = w.lower()
            if self.strip_accents:
                w = self._strip_accents(w)
            words.extend(self._split_punct(w))
        return " ".join(words).split()

    def wordpiece(self, word):
        """Greedy longest-match-first: the longest vocabulary prefix, then '##' + the longest next piece..."""
        if len(word) > self.max_chars_per_word:
            return [self.unk_token]
        index, pieces, start, n = self.token_to_id, [], 0, len(word)
        while start < n:
            end = n
            while end > start:
                sub = word[start:end] if start == 0 else "##" + word[start:end]
                if sub in index:
                    break
                end -= 1
            else:
                return [self.unk_token]  # some position has no piece at all: the whole word is unknown
            pieces.append(sub)
            start = end
        return pieces

    def tokenize(self, text):
        """text -> list of WordPiece tokens (strings), without [CLS]/[SEP]."""
        _check_text("text", text)
        out = []
        for k, part in enumerate(self._special_re.split(text) if self.special_tokens else [text]):
            if k % 2:
                out.append(part)
                continue
            for word in self.basic_tokenize(part):
                out.extend(self.wordpiece(word))
        return out

    # -- ids --------------------------------------------------------------------

    def _ids(self, text):
        return [self.token_to_id[t] for t in self.tokenize(text)]

    def encode(self, text, pair=None):
        """[CLS] text [SEP] (pair [SEP]) -> ids."""
        ids = [self.cls_id] + self._ids(text) + [self.sep_id]
        if pair is not None:
            _check_text("pair", pair)
            ids += self._ids(pair) + [self.sep_id]
        return ids

    def batch_encode(self, texts, max_length=None, padding=True, truncation=True):
        """Encode a batch: texts are strings or (text, pair) tuples.

        padding: True pads to the longest row, "max_length" to ``max_length``,
        False requires equal lengths. truncation: cut the longer of the two
        segments one token at a time until a row fits ``max_length`` (specials kept).
        Returns {"input_ids", "token_type_ids", "attention_mask"}: int64 arrays (B, T).
        """
        if isinstance(texts, str) or not hasattr(texts, "__iter__"):
            raise TypeError(f"texts: expected a list of str or (str, str) pairs, got {type(texts).__name__}")
        texts = list(texts)
        if not texts:
            raise ValueError("texts: expected at least one text, got an empty list")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 3):
            raise ValueError(f"max_length: expected None or an int >= 3, got {max_length!r}")
        if padding not in (True, False, "longest", "max_length"):
            raise ValueError(f"padding: expected True, False, 'longest' or 'max_length', got {padding!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("max_length: padding='max_length' needs a max_length, got None")
        rows, types = [], []
        for i, t in enumerate(texts):
            a, b = (t, None) if isinstance(t, str) else (tuple(t) + (None,))[:2] if isinstance(t, (tuple, list)) \
                else (None, None)
            if not isinstance(a, str) or (b is not None and not isinstance(b, str)) \
                    or (isinstance(t, (tuple, list)) and len(t) != 2):
                raise TypeError(f"texts[{i}]: expected a str or a (str, str) pair, got {t!r}"[:200])
            ia, ib = self._ids(a), None if b is None else self._ids(b)
            n_special = 2 if ib is None else 3
            if max_length is not None and truncation:
                budget = max_length - n_special
                if ib is None:
                    ia = ia[:budget]
                else:
                    while len(ia) + len(ib) > budget:
                        if len(ia) > len(ib):
                            ia = ia[:-1]
                        else:
                            ib = ib[:-1]
            ids = [self.cls_id] + ia + [self.sep_id]
            tt = [0] * len(ids)
            if ib is not None:
                ids += ib + [self.sep_id]
                tt += [1] * (len(ib) + 1)
            rows.append(ids)
            types.append(tt)
        longest = max(map(len, rows))
        if padding == "max_length":
            width = max(max_length, longest)
        elif padding:
            width = longest
        else:
            if any(len(r) != longest for r in rows):
                raise ValueError("padding: rows have different lengths "
                                 f"({sorted(set(map(len, rows)))}); pass padding=True")
            width = longest
        B = len(rows)
        input_ids = np.full((B, width), self.pad_id, dtype=np.int64)
        token_type_ids = np.zeros((B, width), dtype=np.int64)
        attention_mask = np.zeros((B, width), dtype=np.int64)
        for i, (r, t) in enumerate(zip(rows, types)):
            input_ids[i, :len(r)] = r
            token_type_ids[i, :len(t)] = t
            attention_mask[i, :len(r)] = 1
        return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}

    def decode(self, ids, skip_special_tokens=False, clean_up_spaces=False):
        """ids -> text: tokens joined by spaces, '##' continuations glued to the piece before.

        clean_up_spaces: also remove the space before . , ! ? and English contractions
        ("do n't" -> "don't"), as Hugging Face does by default. Either way the text is
        the normalised one (lower-cased, accents stripped), not the original.
        """
        toks = map(self.vocab.__getitem__, _ids_to_list("ids", ids, len(self.vocab)))
        if skip_special_tokens:
            special = set(self.special_tokens)
            toks = (t for t in toks if t not in special)
        text = " ".join(toks).replace(" ##", "").strip()
        if clean_up_spaces:
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
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


# ---------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------

_TYPES = {"char": CharTokenizer, "bpe": BPETokenizer, "wordpiece": WordPieceTokenizer}


def tokenizer_from_dict(d):
    """Rebuild a tokenizer from ``to_dict()``, dispatching on d["type"] ("char", "bpe", "wordpiece")."""
    if not isinstance(d, dict):
        raise TypeError(f"d: expected a dict (from to_dict()), got {type(d).__name__}")
    cls = _TYPES.get(d.get("type"))
    if cls is None:
        raise ValueError(f"d['type']: expected one of {sorted(_TYPES)}, got {d.get('type')!r}")
    return cls.from_dict(d)
