"""word2vec: CBOW vs skip-gram, ours and gensim's, on Shakespeare: analogy accuracy and words/second.

Four models trained on the same text with the same settings (dimension, window,
negatives, min_count, subsampling, epochs), one after another in one run:
minillm's Word2Vec with sg=1 (skip-gram) and sg=0 (CBOW), and gensim's Word2Vec
with sg=1 and sg=0 (one worker thread, as we use one core). The text: Shakespeare's
plays and poems (minillm.data), lower-cased words, speaker tags dropped, each
document a segment (no window crosses from one to the next; gensim gets the same
segments as sentences, cut at 10,000 words, its limit).

Reported for each model: words/second (in-vocabulary corpus words x epochs /
training wall seconds; CPU seconds beside it, since the machine may be shared),
and 3CosAdd analogy accuracy over the in-vocabulary questions of gensim's
questions-words.txt (with the coverage: most of its questions are about countries
and currencies Shakespeare never names) and of our Shakespeare set
(word2vec.shakespeare_analogies). Every model is scored by the same code,
word2vec.evaluate_analogies; gensim's own evaluate_word_analogies is printed beside
it for its models as a cross-check.

Ours trains by batches with Adam by default (see Word2Vec.train for why not plain
SGD on big batches); gensim runs word2vec's per-pair SGD in C. The seeds quote 61.2 %
(CBOW) vs 73.8 % (skip-gram) on Google News analogies, a corpus over 1,000 times
this one.
"""

from __future__ import annotations

import re
import time

import numpy as np

from minillm.bench._util import print_table

MODELS = ("ours-sg", "ours-cbow", "gensim-sg", "gensim-cbow")


def add_arguments(parser):
    parser.add_argument("--tokens", type=int, default=300_000,
                        help="use about N words of the corpus, the same leading share of every document (default "
                             "300,000 of ~874,000, to keep the run to a few CPU minutes; 0 = all)")
    parser.add_argument("--dim", type=int, default=100, help="vector size")
    parser.add_argument("--window", type=int, default=5, help="largest context distance (dynamic window 1..W)")
    parser.add_argument("--negatives", type=int, default=5, help="noise words per example")
    parser.add_argument("--min-count", type=int, default=5, help="drop words seen fewer times")
    parser.add_argument("--subsample", type=float, default=1e-3, help="subsampling threshold t")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the text")
    parser.add_argument("--batch-size", type=int, default=1024, help="our examples per batch")
    parser.add_argument("--lr", type=float, default=0.005, help="our Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of every model")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated subset of {', '.join(MODELS)}")


def corpus_segments(limit=None):
    """Shakespeare as word lists, one per document, lower case, speaker tags (all-capital
    words such as "HAMLET") dropped. With ``limit``, about that many words in all: the
    same leading share of every document, so that every play is represented."""
    from minillm import data
    docs = [[t.lower() for t in re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)?", text) if not (t.isupper() and len(t) > 1)]
            for _, text in data.shakespeare_documents()]
    total = sum(len(d) for d in docs)
    share = 1.0 if not limit else min(1.0, limit / max(total, 1))
    return [d[: int(round(share * len(d)))] for d in docs if d and share * len(d) >= 1]


def _train_ours(sg, segments, vocab, args):
    from minillm import word2vec as w2v
    ids = [w2v.encode(s, vocab) for s in segments]
    model = w2v.Word2Vec(vocab, dim=args.dim, seed=args.seed, sg=sg)
    w0, c0 = time.perf_counter(), time.process_time()
    losses = model.train(ids, epochs=args.epochs, window=args.window, negatives=args.negatives,
                         batch_size=args.batch_size, lr=args.lr, optimizer="adam", subsample_t=args.subsample,
                         log_every=max(1, 2000 // max(args.epochs, 1)))
    secs = (time.perf_counter() - w0, time.process_time() - c0)
    return model.params["w_in"], vocab.words, secs, f"loss {np.mean(losses[:50]):.3f} -> {np.mean(losses[-50:]):.3f}"


def _train_gensim(sg, segments, args):
    from gensim.models import Word2Vec as GensimW2V
    sentences = [s[i:i + 10_000] for s in segments for i in range(0, len(s), 10_000)]
    model = GensimW2V(vector_size=args.dim, window=args.window, negative=args.negatives, min_count=args.min_count,
                      sample=args.subsample, sg=sg, workers=1, seed=args.seed, hs=0)
    model.build_vocab(sentences)
    w0, c0 = time.perf_counter(), time.process_time()
    model.train(sentences, total_examples=len(sentences), epochs=args.epochs)
    secs = (time.perf_counter() - w0, time.process_time() - c0)
    return model.wv.vectors, list(model.wv.index_to_key), secs, model.wv


def _gensim_own_score(kv, path):
    """gensim's evaluate_word_analogies (case-insensitive, its default vocabulary cut) -> accuracy."""
    score, _ = kv.evaluate_word_analogies(path)
    return score


def run(args):
    from minillm import word2vec as w2v
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in chosen if m not in MODELS]
    if bad:
        raise ValueError(f"--models: expected names from {MODELS}, got {bad}")
    segments = corpus_segments(args.tokens or None)
    tokens = [t for s in segments for t in s]
    vocab = w2v.build_vocab(tokens, min_count=args.min_count)
    in_vocab = int(sum(vocab.counts))
    qw_path = w2v.questions_words_path()
    question_sets = {"ours": w2v.shakespeare_analogies()}
    if qw_path is not None:
        question_sets["questions-words"] = w2v.read_analogies(qw_path)
    print(f"corpus: {len(tokens):,} words of Shakespeare in {len(segments)} documents; vocabulary (min_count "
          f"{args.min_count}): {len(vocab):,} words covering {in_vocab:,} tokens")
    print(f"settings: dim {args.dim}, window {args.window}, {args.negatives} negatives, subsample {args.subsample}, "
          f"{args.epochs} epoch(s), seed {args.seed}; ours: Adam lr {args.lr}, batches of {args.batch_size}")
    if qw_path is None:
        print("gensim is not installed: no questions-words.txt and no gensim models")
    rows, gensim_check = [], []
    for name in chosen:
        if name.startswith("gensim") and qw_path is None:
            continue
        sg = 1 if name.endswith("-sg") else 0
        print(f"\n== {name} ==", flush=True)
        if name.startswith("ours"):
            vectors, words, (wall, cpu), note = _train_ours(sg, segments, vocab, args)
        else:
            vectors, words, (wall, cpu), kv = _train_gensim(sg, segments, args)
            note = f"vocabulary {len(words):,}"
            if qw_path is not None:
                gensim_check.append((name, _gensim_own_score(kv, qw_path)))
        wps = in_vocab * args.epochs / wall
        row = [name, f"{wps:,.0f}", f"{in_vocab * args.epochs / max(cpu, 1e-9):,.0f}", f"{wall:.1f}", f"{cpu:.1f}"]
        for qs_name in ("questions-words", "ours"):
            if qs_name in question_sets:
                r = w2v.evaluate_analogies(vectors, words, question_sets[qs_name])
                row += [f"{r['accuracy']:.3f}" if r["in_vocab"] else "-", f"{r['in_vocab']}/{r['total']}"]
        print(f"{name}: {note}; {wps:,.0f} words/s", flush=True)
        rows.append(row + [_example(vectors, words)])
    headers = ["model", "words/s", "words/CPU-s", "train s", "CPU s"]
    if "questions-words" in question_sets:
        headers += ["qw acc", "qw in-vocab"]
    headers += ["ours acc", "ours in-vocab", "man:king::woman:?"]
    print()
    print_table(rows, headers)
    for name, score in gensim_check:
        print(f"cross-check: gensim's own evaluate_word_analogies on {name}: {score:.3f}")
    return 0


def _example(vectors, words):
    from minillm import word2vec as w2v
    index = {w: i for i, w in enumerate(words)}
    if not all(w in index for w in ("man", "king", "woman")):
        return "-"
    scores = w2v.analogy_scores(w2v._unit_rows(vectors), *(np.array([index[w]]) for w in ("man", "king", "woman")))
    return ", ".join(words[j] for j in np.argsort(-scores[0])[:3])
