"""Walkthrough 08: a GPT, assembled from the concept files, trained, and sampled.

A GPT is a stack of identical blocks between an embedding and an LM head. Each
block is two residual branches, attention then an MLP, each after a norm. We
build a tiny one, run one block by hand and check it against minillm.gpt, write
the backward pass of that block in reverse order and check it against gpt.backward,
verify the whole gradient by finite differences, train on a sonnet, and sample.

  1. the parameters             5. the backward, in reverse order
  2. embeddings                 6. a finite-difference check of every parameter
  3. one block, by hand         7. training steps on a small text
  4. the LM head and the loss   8. sampling, with and without the KV cache

Run: python walkthroughs/08_gpt.py   (MINILLM_FAST=1 for fewer training steps)
"""
import os
import time

# The matrices here are tiny: one BLAS thread beats two that wait for each other (much more
# so on a busy machine). Must be set before NumPy loads its BLAS; an explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from _narrate import FAST, check, expect_below, expect_close, expect_gradcheck, max_abs_diff, step  # noqa: E402
from minillm import backend, gpt  # noqa: E402
from minillm.attention import self_attention_backward, self_attention_forward  # noqa: E402
from minillm.backprop import (check_dict_gradients, log_softmax, softmax_cross_entropy_backward,  # noqa: E402
                              softmax_cross_entropy_forward)
from minillm.embeddings import embedding_backward, embedding_forward  # noqa: E402
from minillm.ffn import mlp_backward, mlp_forward  # noqa: E402
from minillm.norm import layernorm_backward, layernorm_forward  # noqa: E402
from minillm.optim import AdamW  # noqa: E402
from minillm.tokenizer import CharTokenizer  # noqa: E402

xp = backend.xp_default()
np.set_printoptions(precision=4, suppress=True)


TEXT = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
"""

print(__doc__.split("\n\n")[0])
print(f"device: {backend.device_name()} ({xp.__name__})")

# ---------------------------------------------------------------------------
step(1, "The parameters: a flat dict with GPT-2's names")
# ---------------------------------------------------------------------------
tok = CharTokenizer.from_text(TEXT)
cfg = gpt.GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=32)
params = gpt.init_params(cfg, seed=0)
print(cfg)
for name, p in list(params.items())[:14]:
    print(f"  {name:18s} {str(tuple(p.shape)):12s} std {float(p.std()):.4f}")
print(f"  ... {len(params)} arrays, {gpt.num_params(params):,} numbers in all")
print("Weights start N(0, 0.02^2); the two projections that write into the residual stream")
print(f"(attn.w_o, mlp.w2) start 1/sqrt(2 n_layer) = {1 / np.sqrt(2 * cfg.n_layer):.2f} times smaller, so the")
print("stream's variance does not grow with depth. Norm gains start at 1, biases at 0.")
std = {k: float(backend.to_numpy(v).std()) for k, v in params.items()}
check(abs(std["wte"] - 0.02) < 0.003 and abs(std["h.0.attn.w_qkv"] - 0.02) < 0.003,
      f"weights should start with std 0.02: wte {std['wte']:.4f}, w_qkv {std['h.0.attn.w_qkv']:.4f}")
check(abs(std["h.0.attn.w_o"] / 0.02 * np.sqrt(2 * cfg.n_layer) - 1) < 0.15,
      f"attn.w_o should start 1/sqrt(2 n_layer) smaller: std {std['h.0.attn.w_o']:.4f}")
gains = [k for k in params if k.endswith(".weight")]                       # ln_1, ln_2 per block, ln_f
biases = [k for k in params if k.rsplit(".", 1)[-1].startswith("b")]      # .bias, b_qkv, b_o, b1, b2
check(len(gains) == 2 * cfg.n_layer + 1 and all(bool(xp.all(params[k] == 1)) for k in gains)
      and all(not bool(xp.any(params[k])) for k in biases), "norm gains should start at 1 and biases at 0")

# ---------------------------------------------------------------------------
step(2, "Embeddings: a row per token plus a row per position")
# ---------------------------------------------------------------------------
one = cfg.replace(n_layer=1)                                    # one block is enough to see everything
p1 = gpt.init_params(one, seed=1)
ids = tok.encode(TEXT)
idx = xp.asarray([ids[:16], ids[40:56]])                      # a batch of two windows, B=2, T=16
B, T = idx.shape
te, te_cache = embedding_forward(idx, p1["wte"])                # (B, T, C)
pe, pe_cache = embedding_forward(xp.arange(T), p1["wpe"])       # (T, C), broadcast over the batch
x0 = te + pe
print(f"idx {tuple(idx.shape)} -> wte[idx] {tuple(te.shape)} + wpe[0..{T - 1}] {tuple(pe.shape)} "
      f"= x {tuple(x0.shape)}")
print("Attention by itself ignores order; the position rows are what tell 'ab' from 'ba'.")

# ---------------------------------------------------------------------------
step(3, "One block, by hand: x + attn(ln_1(x)), then + mlp(ln_2(x))")
# ---------------------------------------------------------------------------
h1, ln1_c = layernorm_forward(x0, p1["h.0.ln_1.weight"], p1["h.0.ln_1.bias"])
a, attn_c = self_attention_forward(h1, p1["h.0.attn.w_qkv"], p1["h.0.attn.b_qkv"], p1["h.0.attn.w_o"],
                                   p1["h.0.attn.b_o"], one.n_head, causal=True)
x1 = x0 + a                                                     # residual 1
h2, ln2_c = layernorm_forward(x1, p1["h.0.ln_2.weight"], p1["h.0.ln_2.bias"])
m, mlp_c = mlp_forward(h2, p1["h.0.mlp.w1"], p1["h.0.mlp.b1"], p1["h.0.mlp.w2"], p1["h.0.mlp.b2"])
x2 = x1 + m                                                     # residual 2
xf, lnf_c = layernorm_forward(x2, p1["ln_f.weight"], p1["ln_f.bias"])
print("pre-norm: each branch reads a normalised copy, but adds to the raw stream, so the")
print("stream is an identity path from the embedding to the head (gradients flow straight down).")
print(f"|attention branch| / |stream| = {float(xp.linalg.norm(a) / xp.linalg.norm(x0)):.3f}, "
      f"|MLP branch| / |stream| = {float(xp.linalg.norm(m) / xp.linalg.norm(x1)):.3f} (small at init)")

# ---------------------------------------------------------------------------
step(4, "The LM head (tied to wte) and the loss")
# ---------------------------------------------------------------------------
targets = xp.asarray([ids[1:17], ids[41:57]])                  # the next character at every position
logits = xf @ p1["wte"].T                                       # (B, T, V): one score per vocabulary entry
loss, ce_c = softmax_cross_entropy_forward(logits, targets)
ref, _ = gpt.forward(p1, one, idx)
d = expect_close("the by-hand forward vs gpt.forward (float32)", logits, ref, 1e-5)
print(f"logits {tuple(logits.shape)}; max |by hand - gpt.forward| = {d:.1e}  (float32 rounding; checked <= 1e-5)")
print(f"loss {float(loss):.4f} vs ln(V) = ln({cfg.vocab_size}) = {np.log(cfg.vocab_size):.4f}: at init the model")
print("is close to uniform, as it should be (a much larger loss would mean a bad initialisation).")
check(abs(float(loss) - np.log(cfg.vocab_size)) < 0.2, f"the loss at init should be near ln(V): {float(loss):.4f}")

# ---------------------------------------------------------------------------
step(5, "The backward pass: the forward, read from the bottom up")
# ---------------------------------------------------------------------------
g = {}
dlogits = softmax_cross_entropy_backward(1.0, ce_c)            # (softmax - onehot) / N
g["wte"] = dlogits.reshape(-1, cfg.vocab_size).T @ xf.reshape(-1, cfg.n_embd)   # the head's weight
dxf = dlogits @ p1["wte"]
dx2, g["ln_f.weight"], g["ln_f.bias"] = layernorm_backward(dxf, lnf_c)
# x2 = x1 + m: the residual hands dx2 to both x1 and the MLP branch.
dh2, g["h.0.mlp.w1"], g["h.0.mlp.b1"], g["h.0.mlp.w2"], g["h.0.mlp.b2"] = mlp_backward(dx2, mlp_c)
dx1_branch, g["h.0.ln_2.weight"], g["h.0.ln_2.bias"] = layernorm_backward(dh2, ln2_c)
dx1 = dx2 + dx1_branch
# x1 = x0 + a: the same again for the attention branch.
dh1, g["h.0.attn.w_qkv"], g["h.0.attn.b_qkv"], g["h.0.attn.w_o"], g["h.0.attn.b_o"] = \
    self_attention_backward(dx1, attn_c)
dx0_branch, g["h.0.ln_1.weight"], g["h.0.ln_1.bias"] = layernorm_backward(dh1, ln1_c)
dx0 = dx1 + dx0_branch
# x0 = wte[idx] + wpe[pos]: scatter-adds; wte also gets the head's gradient (it is tied).
g["wpe"] = embedding_backward(dx0.sum(axis=0), pe_cache)
g["wte"] = g["wte"] + embedding_backward(dx0, te_cache)
_, grads = gpt.loss_and_grads(p1, one, idx, targets)
check(set(g) == set(grads), f"by hand we made {sorted(g)}, gpt.backward {sorted(grads)}")
worst = max(expect_close(f"d{k} by hand vs gpt.backward (float32)", g[k], grads[k], 1e-5) for k in grads)
print("dlogits -> head -> ln_f -> [MLP branch + residual] -> ln_2 -> [attention branch + residual]")
print(f"-> ln_1 -> embeddings. {len(g)} gradients by hand; max |by hand - gpt.backward| = {worst:.1e}")
print("Every residual is a '+' in the backward too: the gradient reaching x1 is dx2 (the identity")
print("path) plus what came back through the MLP branch.")

# ---------------------------------------------------------------------------
step(6, "A finite-difference check of every parameter (float64)")
# ---------------------------------------------------------------------------
# Weights moved well away from their initial values, so that no gradient is trivially small.
noise = np.random.default_rng(2)
p64 = {k: v + xp.asarray(0.3 * noise.standard_normal(v.shape))
       for k, v in gpt.init_params(cfg, seed=2, dtype=np.float64).items()}
small_idx, small_t = idx[:, :8], targets[:, :8]                # B = 2, T = 8: every gradient alive
_, g64 = gpt.loss_and_grads(p64, cfg, small_idx, small_t)


def per_token_loss(p):
    """-log p(target) / N for every position: the terms whose sum is the mean loss."""
    logp = log_softmax(gpt.forward(p, cfg, small_idx)[0])       # (B, T, V)
    return -xp.take_along_axis(logp, small_t[..., None], axis=-1)[..., 0] / small_t.size


t0 = time.perf_counter()
rep = check_dict_gradients(per_token_loss, p64, g64, max_checks_per_param=3 if FAST else 8)
print(f"{len(p64)} parameter arrays, a few entries each nudged by +-eps, +-2 eps "
      f"({time.perf_counter() - t0:.1f} s):")
print(f"  {expect_gradcheck('the whole GPT', rep)}")
print("The bar is 1e-7 on |analytic - numeric| / max(|analytic|, |numeric|, floor). The floor")
print("scales with the gradients being compared, and is never below the smallest gradient a")
print("float64 difference can resolve (the round-off of the loss terms that moved, over eps):")
print("below it an entry is judged on its absolute error. That is how the key bias passes: its")
print("gradient is exactly 0, since softmax ignores a shift of a query's scores, so its numeric")
print("side is pure round-off, and dividing by it would mean nothing.")
C = cfg.n_embd
d_bk = float(xp.max(xp.abs(g64["h.0.attn.b_qkv"][C:2 * C])))
print(f"  max |d b_k| = {d_bk:.1e}")
check(d_bk <= 1e-12, f"the key bias's gradient should be exactly 0 up to rounding, got {d_bk:.1e}")
print("The checker is handed the loss per token (their sum is the mean loss): it differences each")
print("term before summing, so the round-off scales with the terms that move, not with the whole")
print("loss, and eps can stay at 1e-4, where the stencil's own error (~eps^4) is negligible.")
changed = small_idx.copy()
changed[:, 5:] = (changed[:, 5:] + 1) % cfg.vocab_size
l1, _ = gpt.forward(p64, cfg, small_idx)
l2, _ = gpt.forward(p64, cfg, changed)
print(f"causality: changing tokens 5.. moves logits 0..4 by {max_abs_diff(l1[:, :5], l2[:, :5]):.1e} "
      f"and logits 5.. by {max_abs_diff(l1[:, 5:], l2[:, 5:]):.2f}")
check(max_abs_diff(l1[:, :5], l2[:, :5]) <= 1e-12 < 0.1 < max_abs_diff(l1[:, 5:], l2[:, 5:]),
      "later tokens must not move earlier logits (and should move their own)")

# ---------------------------------------------------------------------------
step(7, "Training: AdamW on random windows of the sonnet")
# ---------------------------------------------------------------------------
data = np.asarray(ids)
rng = np.random.default_rng(0)
opt = AdamW(params, lr=5e-3, weight_decay=0.0)
steps = 200 if FAST else 600
t0 = time.perf_counter()
for i in range(steps + 1):
    starts = rng.integers(0, len(data) - cfg.block_size - 1, 8)
    xb = xp.asarray(np.stack([data[s:s + cfg.block_size] for s in starts]))
    yb = xp.asarray(np.stack([data[s + 1:s + cfg.block_size + 1] for s in starts]))
    loss_value, grads = gpt.loss_and_grads(params, cfg, xb, yb)
    if i % (steps // 5) == 0:
        print(f"  step {i:4d}  loss {loss_value:.3f}")
    if i < steps:
        opt.step(grads)
print(f"{steps} steps in {time.perf_counter() - t0:.1f} s. The loss falls from ln(V) as the model learns")
print("which characters follow which; a sonnet is small enough to be memorised outright.")
starts = np.arange(0, len(data) - cfg.block_size - 1, cfg.block_size)
sonnet_loss = gpt.loss(params, cfg, xp.asarray(np.stack([data[s:s + cfg.block_size] for s in starts])),
                       xp.asarray(np.stack([data[s + 1:s + cfg.block_size + 1] for s in starts])))
freq = np.bincount(data, minlength=cfg.vocab_size) / len(data)
unigram = float(-(freq[freq > 0] * np.log(freq[freq > 0])).sum())
print(f"Loss over {len(starts)} windows covering the sonnet: {sonnet_loss:.3f}. A model that knew only how often")
print(f"each character occurs (no context) could do no better than about their entropy, {unigram:.3f};")
print(f"one that knew nothing, ln(V) = {np.log(cfg.vocab_size):.3f}. Beating the first means it reads its context.")
expect_below("the trained GPT's loss on the sonnet", sonnet_loss, unigram, "the unigram entropy")

# ---------------------------------------------------------------------------
step(8, "Sampling, with and without the KV cache")
# ---------------------------------------------------------------------------
prompt = tok.encode("Shall I ")
t0 = time.perf_counter()
greedy = gpt.generate(params, cfg, prompt, 60, temperature=0)
t_cache = time.perf_counter() - t0
t0 = time.perf_counter()
greedy_nc = gpt.generate(params, cfg, prompt, 60, temperature=0, use_cache=False)
t_nocache = time.perf_counter() - t0
print(f"greedy:  {tok.decode(greedy)!r}")
print(f"identical without the cache: {greedy == greedy_nc} ({t_cache:.2f} s with, {t_nocache:.2f} s without)")
check(greedy == greedy_nc, "greedy generation with and without the KV cache should agree token for token")
check(greedy[:len(prompt)] == prompt and len(greedy) == len(prompt) + 60, "generate returns the prompt + 60 tokens")
print("The cache keeps every layer's keys and values, so each new token runs the model on one")
print("position instead of the whole context; past block_size the window slides and both agree.")
print("(At this size both are instant; python -m minillm bench generate measures the gap at scale.)")
for temp in (0.5, 1.0):
    s = gpt.generate(params, cfg, prompt, 60, temperature=temp, seed=1)
    print(f"T={temp}:   {tok.decode(s)!r}")
print("Higher temperature flattens the distribution: more variety, more mistakes.")
