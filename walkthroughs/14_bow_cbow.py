"""Walkthrough 14: bag of words, CBOW vs skip-gram, and an analogy.

The road to the Transformer starts with a document as a bag of words: the counts
of its words, order thrown away. That is enough to tell topics apart, and a
softmax regression on it is the baseline any sequence model must beat. word2vec
then learns a vector per word from which words appear together: skip-gram
predicts each context word from the centre, CBOW predicts the centre from the
mean of its context (a bag of words again, over a window). Trained vectors turn
relations into directions: king - man + woman lands near queen.

Everything here runs on small generated texts, so the script takes seconds and
needs no download (python -m minillm bench word2vec and bench bow-genre run the
same code on Shakespeare).

Run: python walkthroughs/14_bow_cbow.py
"""
import time

import numpy as np

from _narrate import FAST, check, expect_close, expect_gradcheck, step
from minillm import backprop as bp
from minillm import bow
from minillm import word2vec as w2v

# ---------------------------------------------------------------------------
step(1, "A bag of words forgets the order")
# ---------------------------------------------------------------------------
vocab = {w: i for i, w in enumerate("the dog bit man a cat sat".split())}
docs = ["the dog bit the man".split(), "the man bit the dog".split(), "a cat sat".split()]
X = bow.count_vectors(docs, vocab, dtype=np.float64)
print("vocabulary:", " ".join(vocab))
for d, row in zip(docs, X.to_dense()):
    print(f"  {' '.join(d):22s} -> {row.astype(int).tolist()}")
check(np.array_equal(X.to_dense()[0], X.to_dense()[1]),
      "the two dog/man sentences should have the same count vector")
print("""Who bit whom is gone: the two sentences are the same bag. Stored sparsely (CSR):
only the non-zero (column, value) pairs of each row are kept,""")
print(f"  indptr {X.indptr.tolist()}, indices {X.indices.tolist()}, values {X.values.astype(int).tolist()}")

df = bow.document_frequency(X)
idf = bow.idf_weights(df, X.n_rows)
print("\nidf = ln((1 + N) / (1 + df)) + 1:", ", ".join(f"{w} {idf[i]:.2f}" for w, i in vocab.items()))
print("'the' is in two of the three documents, so it scores low; 'cat' and 'sat', in one, score highest.")
docs3 = [d + ["the"] for d in docs]
X3 = bow.count_vectors(docs3, vocab, dtype=np.float64)
idf3 = bow.idf_weights(bow.document_frequency(X3), X3.n_rows)
print(f"with 'the' added to every document its idf is {idf3[vocab['the']]:.2f}, the floor (ln 1 + 1):"
      f" a word that is everywhere tells nothing, and its tf-idf is just its count")
expect_close("idf of a word in every document", idf3[vocab["the"]], 1.0, 1e-15)
check(np.all(idf3 >= 1.0), "no word may get an idf below the floor")


# ---------------------------------------------------------------------------
step(2, "A softmax-regression classifier on bags of words")
# ---------------------------------------------------------------------------
TOPICS = {
    "court": "king queen prince crown throne lord lady palace duke".split(),
    "sea": "ship sea waves sail storm captain sailor harbour tide".split(),
    "war": "soldier sword battle army general shield spear siege enemy".split(),
}
FILLER = "the a of and to in with was is his her their".split()
rng = np.random.default_rng(0)


def topic_doc(topic, n=12):
    words = TOPICS[list(TOPICS)[topic]]
    return [str(words[rng.integers(len(words))]) if rng.random() < 0.3 else str(FILLER[rng.integers(len(FILLER))])
            for _ in range(n)]


words = sorted({w for ws in TOPICS.values() for w in ws} | set(FILLER))
index = {w: i for i, w in enumerate(words)}
y_train, y_test = rng.integers(0, 3, size=150), rng.integers(0, 3, size=150)
X_train = bow.count_vectors([topic_doc(t) for t in y_train], index, dtype=np.float64)
X_test = bow.count_vectors([topic_doc(t) for t in y_test], index, dtype=np.float64)
idf = bow.idf_weights(bow.document_frequency(X_train), X_train.n_rows)   # from the training documents only
T_train, T_test = bow.tfidf(X_train, idf), bow.tfidf(X_test, idf)
print(f"{X_train.n_rows} training and {X_test.n_rows} test documents of 12 words over {len(words)} words; "
      f"{len(X_train.values)} stored entries instead of {X_train.n_rows * len(words)} dense ones")

small = bow.count_ids([np.array([0, 1, 1, 4]), np.array([2, 3, 3]), np.array([4, 0])], 5, dtype=np.float64)
args = [small, np.random.default_rng(1).standard_normal((5, 3)), np.random.default_rng(2).standard_normal(3),
        np.array([0, 2, 1])]
rep = expect_gradcheck("logreg", bp.gradcheck(bow.logreg_forward, bow.logreg_backward, args, wrt=[1, 2],
                                              kwargs={"weight_decay": 0.1}))
print(f"logreg_backward (dW = X^T G + lam W, db = sum G) vs finite differences: {rep}")
W, b, losses = bow.train_logreg(T_train, y_train, 3, steps=150, lr=0.1)
acc = float(np.mean(bow.predict(T_test, W, b) == y_test))
majority = float(np.mean(y_test == np.bincount(y_train).argmax()))
print(f"loss {losses[0]:.3f} (ln 3 = {np.log(3):.3f}) -> {losses[-1]:.3f}; held-out accuracy {acc:.2f} "
      f"vs majority class {majority:.2f}")
check(acc > majority + 0.3, f"the classifier ({acc:.2f}) should beat the majority class ({majority:.2f}) by 0.3")
top = np.argsort(-(W[:, 0] - W[:, 1:].max(axis=1)))[:4]
print("the words that most say 'court':", ", ".join(words[i] for i in top))
check(all(words[i] in TOPICS["court"] for i in top), "the court class should lean on court words")


# ---------------------------------------------------------------------------
step(3, "Skip-gram vs CBOW: one loss, two ways to cut the window")
# ---------------------------------------------------------------------------
print("""skip-gram: every (centre, context) pair is an example, -log s(u_o.v_c) - sum_k log s(-u_k.v_c).
CBOW:      one example per centre, h = mean of the context's v, -log s(u_t.h) - sum_k log s(-u_k.h).
With one context word h = v_c and the two losses are the same:""")
r = np.random.default_rng(3)
v, u, n = r.standard_normal((4, 6)), r.standard_normal((4, 6)), r.standard_normal((4, 5, 6))
ctx = r.standard_normal((4, 3, 6))
ctx[:, 1] = v
mask = np.zeros((4, 3), bool)
mask[:, 1] = True
loss_cbow = float(w2v.cbow_forward(ctx, mask, u, n)[0])
loss_sg = float(w2v.sgns_forward(v, u, n)[0])
print(f"  CBOW {loss_cbow:.12f}   skip-gram {loss_sg:.12f}")
expect_close("CBOW with one context word vs skip-gram", loss_cbow, loss_sg, 1e-12)
mask = r.random((4, 3)) < 0.6
mask[:, 0] = True
rep = expect_gradcheck("cbow", bp.gradcheck(w2v.cbow_forward, w2v.cbow_backward, [ctx, mask, u, n], wrt=[0, 2, 3]))
print(f"cbow_backward vs finite differences, partly masked windows: {rep}")
print("(each unmasked context word gets d/dh / |C|; a masked slot gets exactly 0)")

# A generated text in which relations are directions: each sentence has one person word,
# three words of its rank and three of its gender, shuffled.
PAIRS = {"royal": ("king", "queen"), "common": ("man", "woman"), "young": ("boy", "girl"),
         "noble": ("lord", "lady"), "heir": ("prince", "princess")}
RANK = {"royal": "crown throne reign palace", "common": "field market plough work",
        "young": "play school toy games", "noble": "manor estate hunt banquet",
        "heir": "succession tutor duty court"}
GENDER = ("he his beard sword".split(), "she her gown veil".split())
sentences = []
for _ in range(800 if FAST else 2000):
    rank, g = list(PAIRS)[rng.integers(5)], int(rng.integers(2))
    sent = [PAIRS[rank][g]] + [str(w) for w in rng.choice(RANK[rank].split(), 3)] + \
           [str(w) for w in rng.choice(GENDER[g], 3)]
    rng.shuffle(sent)
    sentences.append(sent)
wv = w2v.build_vocab([t for s in sentences for t in s])
ids = [w2v.encode(s, wv) for s in sentences]
pairs = sum(len(w2v.skipgram_pairs(s, 6)[0]) for s in ids)
windows = sum(len(w2v.cbow_windows(s, 6)[0]) for s in ids)
print(f"\n{len(sentences)} sentences of 7 words: {pairs:,} skip-gram pairs vs {windows:,} CBOW windows "
      f"(full window 6): CBOW has {pairs / windows:.0f}x fewer examples")
check(windows * 4 < pairs, "CBOW should have several times fewer examples than skip-gram")
print("""Fewer examples means fewer updates per pass: CBOW gets smaller batches and more
passes here, so that both models take a few hundred Adam steps.""")
models, secs = {}, {}
for sg, name, epochs, batch in ((1, "skip-gram", 3, 256), (0, "CBOW", 6, 64)):
    t0 = time.perf_counter()
    models[name] = w2v.Word2Vec(wv, dim=16, seed=0, sg=sg)
    losses = models[name].train(ids, epochs=epochs, window=6, negatives=5, batch_size=batch, lr=0.01,
                                subsample_t=None)
    secs[name] = time.perf_counter() - t0
    print(f"{name:9s}: {epochs} passes, {len(losses)} steps in {secs[name]:.1f} s, loss {losses[0]:.2f} -> "
          f"{np.mean(losses[-20:]):.2f}; nearest to 'king': "
          + ", ".join(f"{w} {s:.2f}" for w, s in models[name].most_similar("king", k=3)))


# ---------------------------------------------------------------------------
step(4, "An analogy: man is to king as woman is to ?")
# ---------------------------------------------------------------------------
print("3CosAdd: the word d (not man, king or woman) with the largest cos(e_d, e_king - e_man + e_woman)")
questions = [("persons", p[0], p[1], q[0], q[1]) for p in PAIRS.values() for q in PAIRS.values() if p != q]
questions += [("persons", p[0], q[0], p[1], q[1]) for p in PAIRS.values() for q in PAIRS.values() if p != q]
for name, m in models.items():
    answer = m.analogy("man", "king", "woman", k=3)
    score = m.evaluate_analogies(questions)
    print(f"{name:9s}: man:king::woman:? -> " + ", ".join(f"{w} {s:.2f}" for w, s in answer)
          + f";  {score['correct']}/{score['in_vocab']} of all the rank/gender analogies right")
    check(answer[0][0] == "queen", f"{name}: man:king::woman:? should be queen, got {answer[0][0]}")
    check(score["accuracy"] >= 0.9, f"{name}: expected >= 90% of the analogies right, got {score['accuracy']:.2f}")
print("""The rank and the gender are separate directions in the vectors, so the arithmetic
works. On real text it is much harder: Shakespeare is under a million words, and
bench word2vec measures how few of the standard analogies it gets right.""")
