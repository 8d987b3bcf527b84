"""Walkthrough 16: T5, an encoder-decoder: read a source, then write a target about it.

GPT continues one stream of text; BERT describes one stream. An encoder-decoder maps
one sequence to another (translate, summarise, correct): a bidirectional encoder
reads the source once, and a causal decoder writes the target, asking the source
questions through cross-attention at every layer.

  1. cross-attention is a soft lookup into the source
  2. the decoder reads the target shifted right (teacher forcing)
  3. relative position buckets instead of a position table
  4. span corruption: what T5's pretraining asks the model to learn
  5. the whole backward, checked by finite differences
  6. a tiny T5 learns to fill in spans; generation with the caches

Run: python walkthroughs/16_t5.py   (MINILLM_FAST=1 for fewer training steps)
"""
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from _narrate import FAST, check, expect_below, expect_close, expect_gradcheck, step  # noqa: E402
from minillm import backend, t5  # noqa: E402
from minillm.attention import sdpa_forward  # noqa: E402
from minillm.backprop import check_dict_gradients  # noqa: E402
from minillm.optim import AdamW  # noqa: E402

np.set_printoptions(precision=3, suppress=True, linewidth=100)
print(__doc__.split("\n\n")[0])

# ---------------------------------------------------------------------------
step(1, "cross-attention is a soft lookup into the source")
print("The encoder turns each source token into a key (what it is) and a value (what it says).")
print("A decoder query scores every key, softmax turns the scores into weights, and the")
print("output is the weighted mean of the values: a dictionary lookup that returns a blend.")
keys = np.eye(4)[None, None] * 4.0                     # (1, 1, S=4, D=4): four distinct keys
values = np.array([[1.0, 2, 0, 0], [0, 0, 3, 0], [-1, 0, 0, 1], [0, -2, 0, 0]])[None, None]   # (1, 1, 4, 4)
query = keys[:, :, 2:3]                                # the query looks like key 2
y, cache = sdpa_forward(query, keys, values, scale=1.0)   # T5 does not scale by 1/sqrt(d)
print(f"  weights over the 4 source tokens: {cache.p.ravel()}")
print(f"  output {y.ravel()}  ~ value 2 = {values[0, 0, 2]}")
expect_close("a query equal to key 2 returns value 2", y.ravel(), values[0, 0, 2], 1e-5)
blend = (keys[:, :, 1:2] + keys[:, :, 3:4]) / 2
y2, cache2 = sdpa_forward(blend, keys, values, scale=1.0)
print(f"  a query between keys 1 and 3: weights {cache2.p.ravel()}, output {y2.ravel()} (their mean)")
expect_close("between two keys: the mean of their values", y2.ravel(), values[0, 0, [1, 3]].mean(0), 0.02)

# ---------------------------------------------------------------------------
step(2, "the decoder reads the target shifted right (teacher forcing)")
config = t5.T5Config(vocab_size=20, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16,
                     feed_forward_proj="gated-gelu", dropout_rate=0.0)
params = t5.init_params(config, seed=0, dtype=np.float64)
labels = np.array([[5, 6, 7, 1]])                      # the target ends with eos (id 1)
dec_in = t5.shift_right(labels, config.decoder_start_token_id, config.pad_token_id)
print(f"  labels            {labels[0]}")
print(f"  decoder_input_ids {dec_in[0]}   (start token 0 first, the last label dropped)")
print("At position t the decoder has read labels[:t] and is scored on labels[t]: one forward")
print("pass trains every position at once, and no position can peek at its own answer.")
src = np.array([[3, 4, 8, 9, 10]])
logits, _ = t5.forward(params, config, src, dec_in)
later = dec_in.copy()
later[0, 2:] = [11, 12]
logits_later, _ = t5.forward(params, config, src, later)
expect_close("decoder positions 0, 1 after changing inputs 2, 3", logits[0, :2], logits_later[0, :2], 1e-12)
other_src = src.copy()
other_src[0, 4] = 13
logits_src, _ = t5.forward(params, config, other_src, dec_in)
moved = float(np.abs(logits_src[0, 0] - logits[0, 0]).max())
print(f"  change decoder inputs 2..3: positions 0..1 unchanged; change the LAST source token: "
      f"position 0 moves by {moved:.3f}")
check(moved > 1e-3, "cross-attention should let the first decoder position see the whole source")

# ---------------------------------------------------------------------------
step(3, "relative position buckets instead of a position table")
rel = np.arange(-20, 21)
enc_b = t5.relative_position_bucket(rel, True, 8, 16)
dec_b = t5.relative_position_bucket(rel, False, 8, 16)
print("  key - query:  ", rel[::4])
print("  encoder bucket", enc_b[::4], " (half the buckets for each side)")
print("  decoder bucket", dec_b[::4], " (the future is never seen: bucket 0)")
print("Small distances get a bucket each, larger ones share logarithmic buckets, and past")
print("max_distance all is one bucket. Each head learns one scalar per bucket, added to its")
print("scores; the first layer's table serves every layer of the stack.")
check(np.all(dec_b[rel > 0] == 0) and np.all(np.diff(enc_b[rel >= 0]) >= 0), "bucket shape")

# ---------------------------------------------------------------------------
step(4, "span corruption: what T5's pretraining asks the model to learn")
text = "to be or not to be that is the question"
chars = sorted(set(text))
V_CHARS = 3 + len(chars)
SENTINEL = V_CHARS + 7                                 # 8 sentinels above the characters
enc = {c: i + 3 for i, c in enumerate(chars)}
dec = {i: c for c, i in enc.items()}
show = lambda ids: "".join(dec.get(int(t), f"<{SENTINEL - int(t)}>") for t in ids)   # noqa: E731
ids = np.array([enc[c] for c in text])
inputs, targets = t5.span_corruption(ids, 0.15, 3.0, sentinel_start=SENTINEL, rng=3)
print(f"  original: {text!r}")
print(f"  inputs:   {show(inputs)!r}")
print(f"  targets:  {show(targets)!r}")
print("Random spans (15% of the tokens, 3 on average) are cut out and each replaced by its own")
print("sentinel; the target lists each sentinel followed by what it replaced. The model must")
print("read the context on both sides of a gap and write back only the missing pieces.")
check(t5.span_corruption_reconstruct(inputs, targets, SENTINEL) == ids.tolist(),
      "the inputs and targets together reconstruct the sequence")
print("  inputs + targets reconstruct the original: True")

# ---------------------------------------------------------------------------
step(5, "the whole backward, checked by finite differences")
small = t5.T5Config(vocab_size=9, d_model=4, d_kv=2, d_ff=6, num_layers=1, num_decoder_layers=2,
                    num_heads=2, relative_attention_num_buckets=6, relative_attention_max_distance=6,
                    dropout_rate=0.0)
p_small = t5.init_params(small, seed=1, dtype=np.float64)
x = np.array([[3, 4, 5, 6], [7, 8, 2, 0]])
mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])
y_small = np.array([[4, 5, 1], [6, -100, -100]])
loss, grads = t5.loss_and_grads(p_small, small, x, y_small, mask)
rep = check_dict_gradients(lambda p: t5.loss(p, small, x, y_small, mask), p_small, grads,
                           max_checks_per_param=3)
print("backward: the head, the decoder from its last block down (each block's cross-attention")
print("also returns dL/d(encoder output)), then the encoder fed the sum of those; the shared")
print(f"embedding adds three gradients. Finite differences of all {len(grads)} arrays: {rep}")
expect_gradcheck("T5's whole backward", rep)

# ---------------------------------------------------------------------------
step(6, "a tiny T5 learns to fill in spans; generation with the caches")
lines = ["to be or not to be that is the question", "all the world is a stage",
         "the course of true love never did run smooth", "brevity is the soul of wit"]
chars = sorted(set("".join(lines)))
enc = {c: i + 3 for i, c in enumerate(chars)}
dec = {i: c for c, i in enc.items()}
V = 3 + len(chars) + 8
SENTINEL = V - 1
cfg = t5.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                  relative_attention_num_buckets=16, relative_attention_max_distance=32, dropout_rate=0.0)
p = t5.init_params(cfg, seed=0)
opt = AdamW(p, lr=3e-3, weight_decay=0.0)
rng = np.random.default_rng(0)
steps = 120 if FAST else 300
for i in range(steps):
    pairs = [t5.span_corruption(np.array([enc[c] for c in lines[j]]), 0.15, 3.0, sentinel_start=SENTINEL,
                                rng=rng) for j in rng.integers(0, len(lines), 8)]
    S, T = max(len(a) for a, _ in pairs), max(len(b) for _, b in pairs) + 1
    src = np.zeros((8, S), np.int64)
    m = np.zeros((8, S), bool)
    lab = np.full((8, T), -100, np.int64)
    for k, (a, b) in enumerate(pairs):
        src[k, :len(a)], m[k, :len(a)], lab[k, :len(b) + 1] = a, True, list(b) + [1]
    loss, g = t5.loss_and_grads(p, cfg, src, lab, m)
    opt.step(g)
    if i % (steps // 4) == 0 or i == steps - 1:
        print(f"  step {i:3d}: loss {loss:.3f}")
uniform = float(np.log(V))
expect_below("span-corruption loss after training", loss, uniform / 2, "half the uniform guess ln V / 2")
inputs, targets = t5.span_corruption(np.array([enc[c] for c in lines[0]]), 0.15, 3.0, sentinel_start=SENTINEL,
                                     rng=5)
show = lambda ids: "".join(dec.get(int(t), f"<{SENTINEL - int(t)}>") for t in ids)   # noqa: E731
out_cached = t5.generate(p, cfg, inputs.tolist(), 16, use_cache=True)
out_plain = t5.generate(p, cfg, inputs.tolist(), 16, use_cache=False)
print(f"  inputs {show(inputs)!r}")
print(f"  wanted {show(targets)!r}, generated {show([t for t in out_cached if t != 1])!r}  (eos left out)")
print("generate runs the encoder once, computes each decoder layer's cross-attention keys and")
print("values once, and keeps the decoder's own keys/values in a KV cache: one token per step.")
check(out_cached == out_plain, "cached and uncached generation must give the same tokens")
print("  the same tokens without any cache (re-running the decoder every step): True")
