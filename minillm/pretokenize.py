"""The pre-split: the regular expression that cuts text into chunks before BPE.

Byte-level BPE never merges across a chunk boundary, so the pre-split decides
what a token can span. GPT-2 cuts text into contractions, optionally-space-led
runs of letters, of numbers and of other symbols, and whitespace; GPT-4
(cl100k_base) does the same with numbers in groups of at most three digits and
newlines kept apart from other whitespace:

>>> compile_pattern("gpt2").findall("Hello world's 2024!")
['Hello', ' world', "'s", ' 2024', '!']
>>> compile_pattern("gpt4").findall("Hello world's 2024!")
['Hello', ' world', "'s", ' ', '202', '4', '!']

Both patterns are written for a regex engine with Unicode properties (tiktoken's
Rust regex): ``\\p{L}`` letters, ``\\p{N}`` numbers. Python's ``re`` has no
``\\p{..}``, and its ``\\s`` is ``str.isspace`` (which, unlike Unicode's
White_Space property, includes the separators U+001C..U+001F). So
:func:`translate_pattern` rewrites a pattern for ``re``: ``\\p{L}`` and ``\\p{N}``
become explicit character ranges built from ``unicodedata`` (general categories
L* and N*), and ``\\s``/``\\S`` become Unicode White_Space and its complement.
The one remaining difference from tiktoken is the Unicode *version*: Python 3.11
ships Unicode 14, so characters assigned later (e.g. CJK Extension H) are
"unassigned" to us and may be split differently.

This module imports nothing from minillm: the tokenizer builds on it, never the
other way round.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from functools import lru_cache

import numpy as np

__all__ = ["PATTERNS", "GPT2_PATTERN", "GPT4_PATTERN", "translate_pattern", "compile_pattern",
           "compile_splitter", "gpt2_chunk_starts", "gpt4_chunk_starts", "ARRAY_SPLITTERS"]

# GPT-2: contractions, optional-space + letters, optional-space + numbers,
# optional-space + other symbols, whitespace (leaving the last space to the next word).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-4 (cl100k_base): case-insensitive contractions, numbers in groups of at most
# three digits, newlines kept apart from other whitespace.
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

# Unicode's White_Space property (what Rust's \s means); Python's \s would add U+001C..U+001F.
_WHITE_SPACE = r"\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@lru_cache(maxsize=16)
def compile_pattern(pattern, ascii_only=False):
    """A compiled ``re`` pattern for a pattern name ("gpt2", "gpt4") or a tiktoken-syntax string.

    ascii_only=True: the same pattern for text that is all ASCII (see translate_pattern).
    """
    return re.compile(translate_pattern(PATTERNS.get(pattern, pattern), ascii_only=ascii_only))


def compile_splitter(pattern):
    """text -> its chunks (a list of str), the findall of compile_pattern(pattern).

    The fast path: text that is all ASCII (``str.isascii``, one C pass) is split by
    the ASCII-only translation, whose classes are small bitmaps instead of the
    Unicode ranges (and their astral alternatives): the same chunks, ~1.7x faster
    on English text. Other text takes the full pattern. For GPT2_PATTERN and
    GPT4_PATTERN, text of _ARRAY_SPLIT characters or more is cut by gpt2_chunk_starts /
    gpt4_chunk_starts (array passes, no regex): the same chunks again, faster.
    """
    full = compile_pattern(pattern).findall
    regex = PATTERNS.get(pattern, pattern)
    if regex == GPT2_PATTERN and sys.version_info >= (3, 11):
        ascii_only = _ascii_gpt2().findall
    else:
        ascii_only = compile_pattern(pattern, ascii_only=True).findall
    chunk_starts = ARRAY_SPLITTERS.get(regex)
    if chunk_starts is None:
        return lambda text: ascii_only(text) if text.isascii() else full(text)

    def split(text):
        if len(text) < _ARRAY_SPLIT:
            return ascii_only(text) if text.isascii() else full(text)
        if text.isascii():
            codes = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
        else:  # (a lone surrogate raises UnicodeEncodeError here, as encoding it to UTF-8 would)
            codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        starts = chunk_starts(codes).tolist()
        return list(map(text.__getitem__, map(slice, starts, starts[1:] + [len(text)])))
    return split


@lru_cache(maxsize=None)
def _ascii_gpt2():
    """GPT2_PATTERN for ASCII text, rewritten so that ``re`` finds the same chunks ~8% faster.

    Each step keeps every match the same: `` ?\\pL+`` goes first (most chunks are
    words, and it cannot start where a contraction does, at "'"); the contractions
    share their "'"; a run that ends its alternative is possessive (nothing after
    it could fail and make ``re`` backtrack into it); and the last ``\\s+`` is ``\\s``
    (it is reached only where ``\\s+(?!\\S)`` failed: one whitespace character
    before a non-space). Needs Python >= 3.11 (possessive quantifiers).
    """
    letter, digit, space = "[A-Za-z]", "[0-9]", "[\\t-\\r ]"  # space: Unicode White_Space within ASCII
    other = "[\\x00-\\x08\\x0e-\\x1f!-/:-@\\[-`{-\\x7f]"          # neither of them
    non_space = "[\\x00-\\x08\\x0e-\\x1f!-\\x7f]"
    return re.compile(f" ?{letter}++|'(?:[stmd]|re|ve|ll)| ?{digit}++| ?{other}++|{space}+(?!{non_space})|{space}")


# -- GPT2_PATTERN and GPT4_PATTERN without a regex: a few passes over the characters --

_ARRAY_SPLIT = 512  # from this many characters on, compile_splitter uses the array version of its pattern
_LETTER, _DIGIT, _OTHER, _SPACE = 0, 1, 2, 3  # the classes of GPT2_PATTERN: \\p{L}, \\p{N}, the rest, \\s
_NEWLINE = 4                                  # GPT4_PATTERN also tells \\r and \\n from the rest of \\s


@lru_cache(maxsize=None)
def _ascii_classes(newlines=False):
    """(256,) uint8: the class of each byte value of ASCII text (only 0..127 are ever looked up)."""
    return _unicode_classes(newlines)[:256].copy()


@lru_cache(maxsize=None)
def _unicode_classes(newlines=False):
    """(0x110000,) uint8: the class of every code point, from its general category
    (L* letter, N* number) and Unicode's White_Space property (what \\s means to tiktoken);
    newlines=True: \\r and \\n get a class of their own."""
    if newlines:
        classes = _unicode_classes().copy()
        classes[[ord("\r"), ord("\n")]] = _NEWLINE
        return classes
    first_letter = _category_table()[:, 0]
    classes = np.full(first_letter.size, _OTHER, dtype=np.uint8)
    classes[first_letter == ord("L")] = _LETTER
    classes[first_letter == ord("N")] = _DIGIT
    space = re.compile(f"[{_WHITE_SPACE}]")
    classes[[c for c in range(0x3001) if space.match(chr(c))]] = _SPACE  # White_Space ends at U+3000
    return classes


def gpt2_chunk_starts(codes):
    """Where the chunks of GPT2_PATTERN start in a text, found by array passes instead of a regex.

    codes: the text as a 1-D array of its code points (uint32; for ASCII text its
    bytes as uint8 will do) -> int64 array of the offsets at which its chunks start
    (0 first; none for empty text). Chunk k is ``text[starts[k]:starts[k + 1]]``,
    exactly ``compile_pattern("gpt2").findall(text)``.

    The pattern's alternatives come down to three rules over the classes letter
    (\\p{L}), number (\\p{N}), whitespace (\\s) and other (the rest):

    1. A run of one class is a chunk (`` ?\\p{L}+``, `` ?\\p{N}+``, `` ?[^\\s\\p{L}\\p{N}]+``, ``\\s+``).
    2. Whitespace followed by a non-space gives up its last character (``\\s+(?!\\S)``
       backtracks by one): a space there is the `` ?`` of the next chunk, any other
       whitespace character is a chunk of its own.
    3. A ``'`` where a match begins (not inside a run of others, not led by a space)
       followed by s, t, m, d or re, ve, ll is a contraction: it takes those letters.
    """
    codes = _check_codes(codes)
    n = codes.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    classes = (_ascii_classes() if codes.dtype == np.uint8 else _unicode_classes())[codes]
    start = np.empty(n, dtype=bool)                     # start[i]: a chunk starts at i
    start[0] = True
    np.not_equal(classes[1:], classes[:-1], out=start[1:])                   # rule 1
    space = classes == _SPACE
    last = np.flatnonzero(space[:-1] & ~space[1:])      # the last whitespace before a non-space
    start[last] = True                                                       # rule 2
    start[last[codes[last] == ord(" ")] + 1] = False
    quote = np.flatnonzero(codes[:-1] == ord("'"))                           # rule 3
    begins = (quote == 0) | ((classes[quote - 1] != _OTHER) & (codes[quote - 1] != ord(" ")))  # (-1 wraps: masked)
    quote = quote[begins & (classes[quote + 1] == _LETTER)]
    quote, takes = _contractions(codes, quote, ignore_case=False)
    start[quote + 1] = False                            # the letters join the ' ...
    end = quote + 1 + takes
    start[end[end < n]] = True                          # ... and the rest of the word starts after them
    return np.flatnonzero(start)


def gpt4_chunk_starts(codes):
    """gpt2_chunk_starts for GPT4_PATTERN (cl100k_base): the offsets at which the chunks of
    ``compile_pattern("gpt4").findall(text)`` start, found by array passes.

    The classes are those of GPT-2 with \\r and \\n (newline) told from the other
    whitespace. The pattern's alternatives, read as rules over runs of one class:

    1. A run of numbers is cut into groups of three from its start (``\\p{N}{1,3}``).
    2. A run of whitespace: if it holds a newline, up to its last newline is a chunk
       (``\\s*[\\r\\n]``). What follows it is cut as in GPT-2: before a non-space the last
       character leaves; that character, any whitespace, leads a following word
       (``[^\\r\\n\\p{L}\\p{N}]?+\\p{L}+``), a space also a following run of others.
    3. A run of others takes the newlines right after it (``[^\\s\\p{L}\\p{N}]++[\\r\\n]*``).
       Where a match begins at it (not led by a space), a single other character before
       a word leads that word, and a single ``'`` before s, d, m, t, ll, ve or re, in
       any case, is a contraction.
    """
    codes = _check_codes(codes)
    n = codes.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    classes = _unicode_classes(newlines=True)[codes] if codes.dtype != np.uint8 else _ascii_classes(True)[codes]
    run_class = np.minimum(classes, _SPACE)             # whitespace and newlines: one class for runs
    start = np.empty(n, dtype=bool)
    start[0] = True
    np.not_equal(run_class[1:], run_class[:-1], out=start[1:])
    runs = np.flatnonzero(start)
    ends = np.append(runs[1:], n)
    digit = np.flatnonzero(classes == _DIGIT)                                                  # rule 1
    start[digit[(digit - runs[np.searchsorted(runs, digit, side="right") - 1]) % 3 == 0]] = True
    kind = run_class[runs]
    s, e = runs[kind == _SPACE], ends[kind == _SPACE]                                          # rule 2
    begin = s.copy()                                    # after others, its leading newlines went with them (rule 3)
    led = np.flatnonzero((s > 0) & (classes[s - 1] == _OTHER) & (classes[s] == _NEWLINE))
    while led.size:
        begin[led] += 1
        led = led[(begin[led] < e[led]) & (classes[np.minimum(begin[led], n - 1)] == _NEWLINE)]
    start[s[begin > s]] = False
    start[begin[(begin > s) & (begin < e)]] = True
    newline = np.flatnonzero(classes == _NEWLINE)
    last_newline = np.append(-1, newline)[np.searchsorted(newline, e)]  # the last one before e (-1: none)
    has_newline = last_newline >= begin
    start[last_newline[has_newline & (last_newline + 1 < e)] + 1] = True
    tail = e - np.where(has_newline, last_newline + 1, begin)          # whitespace after the last newline
    inside = e < n
    start[e[inside & (tail >= 2)] - 1] = True
    lead = e[inside & (tail >= 1)]                      # the run's last character leads what follows?
    follows = classes[lead]
    start[lead[(follows == _LETTER) | ((codes[lead - 1] == ord(" ")) & (follows == _OTHER))]] = False
    s, e = runs[kind == _OTHER], ends[kind == _OTHER]                                          # rule 3
    begins = (s == 0) | (codes[s - 1] != ord(" "))
    single = s[begins & (e - s == 1) & (e < n)]
    single = single[classes[single + 1] == _LETTER]
    start[single + 1] = False                           # it leads the word, or is a contraction ...
    quote, takes = _contractions(codes, single[codes[single] == ord("'")], ignore_case=True)
    end = quote + 1 + takes
    start[end[end < n]] = True                          # ... which ends inside the word
    return np.flatnonzero(start)


# The patterns that have an array version: pattern -> the function that finds its chunk starts.
ARRAY_SPLITTERS = {GPT2_PATTERN: gpt2_chunk_starts, GPT4_PATTERN: gpt4_chunk_starts}


def _contractions(codes, quote, ignore_case):
    """Of the ``'`` at ``quote`` (each followed by a letter), those that start a contraction
    (s, t, m, d, re, ve, ll), and the letters each takes (1 or 2)."""
    n = codes.size
    one, two = _contraction_letters(ignore_case)
    second = codes[quote + 1]                           # (each quote is followed by a letter)
    third = np.where(quote + 2 < n, codes[np.minimum(quote + 2, n - 1)], 0)
    takes = np.where(np.isin(second, one), 1, 0)
    for first_letters, second_letters in two:
        takes[np.isin(second, first_letters) & np.isin(third, second_letters)] = 2
    return quote[takes > 0], takes[takes > 0]


@lru_cache(maxsize=None)
def _contraction_letters(ignore_case):
    """The code points that ``'s|'t|'re|...`` accept after the ``'``: (for s/t/m/d, ((for r, for e),
    (for v, for e), (for l, for l))). Ignoring case, as ``(?i:...)`` in ``re`` and tiktoken's regex
    do, adds the upper case and U+017F (long s, which folds to s); found by asking ``re`` about
    every BMP character (no astral one folds to an ASCII letter)."""
    bmp = "".join(map(chr, range(0x10000)))
    def accepted(letters):
        if not ignore_case:
            return np.array([ord(c) for c in letters])
        return np.array(sorted(map(ord, re.findall(f"[{letters}]", bmp, re.IGNORECASE))))
    return accepted("stmd"), tuple((accepted(a), accepted(b)) for a, b in ("re", "ve", "ll"))


def _check_codes(codes):
    if not isinstance(codes, np.ndarray) or codes.dtype not in (np.uint8, np.uint32) or codes.ndim != 1:
        got = f"{codes.dtype} array of shape {codes.shape}" if isinstance(codes, np.ndarray) else type(codes).__name__
        raise TypeError(f"codes: expected a 1-D array of code points (uint32) or of ASCII bytes (uint8), got {got}")
    top = 127 if codes.dtype == np.uint8 else sys.maxunicode
    if codes.size and codes.max() > top:
        raise ValueError(f"codes: expected {'ASCII bytes' if top == 127 else 'code points'} (<= {top}), "
                         f"got {int(codes.max())} at index {int(codes.argmax())}")
    return codes


def translate_pattern(pattern, ascii_only=False):
    """Rewrite a pre-split pattern in tiktoken/Rust syntax for Python's ``re``.

    ``\\p{X}`` / ``\\pX`` (X a general category or its first letter, also inside
    classes) become explicit code-point ranges from ``unicodedata``; ``\\s`` /
    ``\\S`` become Unicode White_Space and its complement. On Python < 3.11
    possessive quantifiers (``?+``, ``++``, ``*+``) lose their ``+``, which is
    equivalent for GPT2_PATTERN and GPT4_PATTERN (their possessive parts cannot
    backtrack into a different match anyway).

    ascii_only=True: a pattern that splits text made only of ASCII characters exactly
    as the full one does: each class keeps just its ASCII members (on such text no
    other character can occur, so nothing else could match).
    """
    _check_pattern(pattern)
    klass = _ascii_class if ascii_only else (lambda fragment: fragment)
    out, i, n = [], 0, len(pattern)
    while i < n:
        char = pattern[i]
        if char == "[":
            negated, raw, ranges, i = _parse_class(pattern, i)
            out.append(klass(_class_regex(negated, raw, ranges)))
            continue
        if char == "\\" and i + 1 < n:
            escaped = pattern[i + 1]
            if escaped in "pP":
                ranges, i = _property_ranges(pattern, i)
                out.append(klass(_class_regex(escaped == "P", "", ranges)))
                continue
            if escaped in "sS":
                out.append(klass(_class_regex(escaped == "S", _WHITE_SPACE, [])))
            else:
                out.append(pattern[i:i + 2])
            i += 2
            continue
        if char in "?*+}" and pattern[i + 1:i + 2] == "+" and sys.version_info < (3, 11):
            out.append(char)  # a possessive quantifier: keep it greedy, drop the '+' re < 3.11 rejects
            i += 2
            continue
        out.append(char)
        i += 1
    return "".join(out)


# ---------------------------------------------------------------------------
# Parsing the pattern: \p{..} escapes and [...] classes
# ---------------------------------------------------------------------------

def _property_ranges(pattern, i):
    """Parse \\p{X} / \\pX at ``i`` -> (code-point ranges, index after it)."""
    escaped = pattern[i + 1]
    if pattern[i + 2:i + 3] == "{":
        close = pattern.find("}", i)
        if close < 0:
            raise ValueError(f"pattern: unterminated \\{escaped}{{ at position {i}")
        name, end = pattern[i + 3:close], close + 1
    else:
        name, end = pattern[i + 2:i + 3], i + 3
    if not re.fullmatch(r"[A-Z][a-z]?", name or ""):
        raise ValueError(f"pattern: unsupported Unicode class \\{escaped}{{{name}}} at position {i} "
                         "(only general categories such as L, N, Lu are supported)")
    return _category_ranges(name), end


def _parse_class(pattern, i):
    """Parse the class starting at ``pattern[i] == '['`` -> (negated, raw BMP text, ranges, end index)."""
    k, n = i + 1, len(pattern)
    negated = pattern[k:k + 1] == "^"
    k += negated
    raw, ranges = [], []
    if pattern[k:k + 1] == "]":  # a leading ']' is a literal
        raw.append("\\]")
        k += 1
    while k < n and pattern[k] != "]":
        char = pattern[k]
        if char == "\\" and k + 1 < n:
            escaped = pattern[k + 1]
            if escaped == "p":
                property_ranges, k = _property_ranges(pattern, k)
                ranges.extend(property_ranges)
                continue
            if escaped == "s":
                raw.append(_WHITE_SPACE)
            elif escaped in "PSdDwWU":
                raise ValueError(f"pattern: \\{escaped} inside a character class is not supported (position {k})")
            else:
                raw.append(pattern[k:k + 2])
            k += 2
            continue
        if char == "[":
            raise ValueError(f"pattern: nested character classes are not supported (position {k})")
        if ord(char) > 0xFFFF:
            raise ValueError(f"pattern: a literal beyond U+FFFF inside a character class is not supported "
                             f"(position {k})")
        raw.append(char)
        k += 1
    if k >= n:
        raise ValueError(f"pattern: unterminated character class at position {i}")
    return negated, "".join(raw), ranges, k + 1


# ---------------------------------------------------------------------------
# Unicode general categories as code-point ranges, and classes built from them
# ---------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _category_table():
    """(0x110000, 2) uint8: the two ASCII letters of every code point's general category."""
    categories = "".join(map(unicodedata.category, map(chr, range(sys.maxunicode + 1))))
    return np.frombuffer(categories.encode("ascii"), dtype=np.uint8).reshape(-1, 2)


@lru_cache(maxsize=None)
def _category_ranges(prefix):
    """Sorted (lo, hi) code-point ranges whose general category starts with ``prefix`` ("L", "N", "Lu", ...)."""
    table = _category_table()
    in_category = table[:, 0] == ord(prefix[0])
    if len(prefix) > 1:
        in_category &= table[:, 1] == ord(prefix[1])
    edges = np.flatnonzero(np.diff(np.concatenate(([0], in_category.view(np.int8), [0]))))
    return tuple((int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2]))


def _ranges_text(ranges):
    """Class text for code-point ranges: "\\U0000004a-\\U0000005a..."."""
    escape = "\\U{:08x}".format
    return "".join(escape(a) if a == b else f"{escape(a)}-{escape(b)}" for a, b in ranges)


def _class_regex(negated, raw, ranges):
    """A fast ``re`` fragment for the class [^? raw + ranges], raw being BMP-only class text.

    ``re`` turns the BMP part of a class into a bitmap (one lookup), but checks
    astral ranges one by one; a class holding \\p{L}'s ~200 astral ranges would
    do that at every failed position. So the BMP part and the astral part go into
    two alternatives, each of which rejects the other plane group in one lookup.
    """
    bmp, astral = [], []
    for a, b in ranges:
        if a <= 0xFFFF:
            bmp.append((a, min(b, 0xFFFF)))
        if b > 0xFFFF:
            astral.append((max(a, 0x10000), b))
    bmp_text = raw + _ranges_text(bmp)
    if not astral:
        if not bmp_text:
            return "[^\\x00-\\U0010ffff]" if not negated else "[\\x00-\\U0010ffff]"
        return f"[^{bmp_text}]" if negated else f"[{bmp_text}]"
    if negated:
        first = f"[^{bmp_text}\\U00010000-\\U0010ffff]"
        second = f"[^\\x00-\\uffff{_ranges_text(astral)}]"
    else:
        astral_complement, lo = [], 0x10000
        for a, b in sorted(astral):
            if a > lo:
                astral_complement.append((lo, a - 1))
            lo = max(lo, b + 1)
        if lo <= sys.maxunicode:
            astral_complement.append((lo, sys.maxunicode))
        first = f"[{bmp_text}]" if bmp_text else None
        second = f"[^\\x00-\\uffff{_ranges_text(astral_complement)}]"
        if first is None:
            return second
    return f"(?:{first}|{second})"


def _ascii_class(fragment):
    """The class ``fragment`` restricted to ASCII: a class of exactly the ASCII
    characters it matches (found by trying all 128), or one that matches nothing."""
    compiled = re.compile(fragment)
    members = np.array([compiled.fullmatch(chr(c)) is not None for c in range(128)])
    if not members.any():
        return "(?!)"
    edges = np.flatnonzero(np.diff(np.concatenate(([0], members.view(np.int8), [0]))))
    runs = ("\\x%02x" % a if a == b - 1 else "\\x%02x-\\x%02x" % (a, b - 1) for a, b in zip(edges[::2], edges[1::2]))
    return "[" + "".join(runs) + "]"


def _check_pattern(pattern):
    if not isinstance(pattern, str):
        raise TypeError(f"pattern: expected a str, got {type(pattern).__name__}")
