"""Bag-of-words baseline for train bert's genre task: held-out accuracy on the very same passages.

``python -m minillm train bert`` fine-tunes a small BERT to tell comedy, history and
tragedy apart on passages of plays it never saw (minillm/cli/train_bert.py). This
benchmark builds that task exactly as train bert does (the same held-out plays,
genre_split seed 0; the same WordPiece tokenizer; the same passages of
--block-size - 2 tokens, at most 400 per held-out play, evenly spaced) and trains
softmax regression (minillm/bow.py) on bag-of-words vectors of the passages'
token ids instead: counts, and TF-IDF with unit rows (idf from the training
passages only). Reported: accuracy on the held-out passages against the
majority-class baseline, per genre and per play (majority vote), with the time it
took; and, when scikit-learn is installed, its LogisticRegression on the same
vectors as a cross-check (never installed for this).
"""

from __future__ import annotations

import os
import time

import numpy as np

from minillm.bench._util import print_table

BERT_RESULT = ("0.499 vs majority 0.333 (6 of 9 plays by vote; an untrained encoder fine-tuned: 0.544): train bert's "
               "default preset as BENCHMARKS.md's 'BERT (2026-11-23)' records it (not rerun here)")


def add_arguments(parser):
    parser.add_argument("--block-size", type=int, default=64,
                        help="tokens per passage with [CLS] and [SEP], as train bert's --block-size (default 64, "
                             "its default preset)")
    parser.add_argument("--steps", type=int, default=300, help="full-batch Adam steps of the classifier")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam's learning rate")
    parser.add_argument("--weight-decay", type=float, default=1e-4,
                        help="L2 penalty (lam / 2) |W|^2 (fixed in advance; not tuned on the held-out plays)")
    parser.add_argument("--cache", default=os.path.join("runs", "bow-genre", "tokens.npz"),
                        help="where the tokenized plays are cached (keyed by the vocabulary)")
    parser.add_argument("--skip-reference", action="store_true", help="do not run scikit-learn even if installed")


def _genre_data(block_size, cache, log):
    """train bert's genre passages: {"train"|"val": (ids (N, L), labels (N,), titles)}, the tokenizer, corpus."""
    from minillm.cli import train_bert as tb
    corpus = tb.load_corpus(None, log)
    tok = tb.build_tokenizer([x for _, x in corpus.pre_docs], log=log)
    ids = tb.encode_documents(tok, corpus.pre_docs + corpus.val_docs, cache, log=log)
    split = tb.genre_passages(ids, corpus.train_titles, corpus.test_titles, block_size - 2, tok)
    # drop the [CLS] and [SEP] columns: they are in every passage and carry nothing
    return {k: (x[:, 1:-1], y, owners) for k, (x, y, owners) in split.items()}, tok, corpus


def _features(split, vocab_size):
    from minillm import bow
    Xtr = bow.count_ids(split["train"][0], vocab_size, dtype=np.float64)
    Xte = bow.count_ids(split["val"][0], vocab_size, dtype=np.float64)
    idf = bow.idf_weights(bow.document_frequency(Xtr), Xtr.n_rows)
    return {"counts": (Xtr, Xte), "tf-idf": (bow.tfidf(Xtr, idf), bow.tfidf(Xte, idf))}


def _per_play(pred, y, owners, titles, genres):
    owners = np.asarray(owners)
    right, rows = 0, []
    for t in titles:
        sel = owners == t
        vote = int(np.argmax(np.bincount(pred[sel], minlength=len(genres))))
        right += vote == y[sel][0]
        rows.append((t, genres[y[sel][0]], genres[vote], f"{np.mean(pred[sel] == y[sel]):.2f}"))
    return right, rows


def _sklearn_accuracy(Xtr, ytr, Xte, yte, weight_decay):
    """scikit-learn's LogisticRegression on the same sparse vectors, C = 1 / (N lam) to match our
    mean loss + (lam / 2)|W|^2. -> accuracy, or None when it is not installed"""
    try:
        from scipy.sparse import csr_matrix
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        return None
    def csr(X):
        return csr_matrix((X.values, X.indices, X.indptr), shape=X.shape)
    clf = LogisticRegression(C=1.0 / (len(ytr) * weight_decay), max_iter=1000)
    clf.fit(csr(Xtr), ytr)
    return float(np.mean(clf.predict(csr(Xte)) == yte))


def run(args):
    from minillm import bow
    from minillm.cli import train_bert as tb
    t0 = time.perf_counter()
    split, tok, corpus = _genre_data(args.block_size, args.cache, print)
    ytr, yte = split["train"][1], split["val"][1]
    majority = int(np.argmax(np.bincount(ytr, minlength=len(tb.GENRES))))
    base = float(np.mean(yte == majority))
    print(f"genre task as train bert builds it: {len(ytr):,} training passages from {len(corpus.train_titles)} "
          f"plays, {len(yte):,} test passages from {len(corpus.test_titles)} held-out plays, "
          f"{args.block_size - 2} tokens each, vocabulary {tok.vocab_size:,} ({time.perf_counter() - t0:.1f} s)")
    rows, plays = [], {}
    for name, (Xtr, Xte) in _features(split, tok.vocab_size).items():
        t1, c1 = time.perf_counter(), time.process_time()
        W, b, losses = bow.train_logreg(Xtr, ytr, len(tb.GENRES), steps=args.steps, lr=args.lr,
                                        weight_decay=args.weight_decay, dtype=np.float64)
        secs, cpu = time.perf_counter() - t1, time.process_time() - c1
        pred = bow.predict(Xte, W, b)
        acc = float(np.mean(pred == yte))
        per_genre = [f"{np.mean(pred[yte == g] == g):.2f}" for g in range(len(tb.GENRES))]
        right, plays[name] = _per_play(pred, yte, split["val"][2], corpus.test_titles, tb.GENRES)
        sk = None if args.skip_reference else _sklearn_accuracy(Xtr, ytr, Xte, yte, args.weight_decay)
        rows.append([name, f"{acc:.3f}", f"{base:.3f}", *per_genre, f"{right}/{len(corpus.test_titles)}",
                     f"{losses[-1]:.3f}", f"{secs:.1f}", f"{cpu:.1f}", "-" if sk is None else f"{sk:.3f}"])
    print(f"\nsoftmax regression on bags of words, {args.steps} full-batch Adam steps, lr {args.lr}, "
          f"weight decay {args.weight_decay}; majority class = always '{tb.GENRES[majority]}'")
    print_table(rows, ["features", "accuracy", "majority", *tb.GENRES, "plays right", "train loss", "fit s",
                       "fit CPU s", "sklearn acc"])
    print("\nper held-out play (tf-idf, majority vote of its passages):")
    print_table([list(r) for r in plays["tf-idf"]], ["play", "genre", "voted", "passages right"])
    print(f"\ntrain bert on the same passages: {BERT_RESULT}")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0
