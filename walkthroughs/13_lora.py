"""Walkthrough 13: LoRA, fine-tuning a frozen model through small low-rank adapters.

Full fine-tuning updates every weight, and Adam keeps two more numbers for each
one. LoRA (Hu et al. 2021) freezes the pretrained W and learns a low-rank change
s A B beside it, with A: (in, r), B: (r, out) and r tiny, so the trainable part,
its optimizer state and the file you ship shrink by orders of magnitude.

We count parameters, run one adapted linear layer and check its backward, derive
(and check) how the gradient of A and B follows from the model's ordinary weight
gradient, then "pretrain" a tiny GPT to count 0 1 2 3 ..., adapt it with LoRA to
count in threes, and merge the adapters in for inference.

Run: python walkthroughs/13_lora.py      (MINILLM_FAST=1 for fewer steps)
"""
import numpy as np

from _narrate import FAST, check, expect_below, expect_close, expect_gradcheck, step
from minillm import backprop as bp
from minillm import gpt, lora, optim

PRETRAIN_STEPS = 120 if FAST else 300
LORA_STEPS = 80 if FAST else 200


# ---------------------------------------------------------------------------
step(1, "How many numbers does an adapter train?")
# ---------------------------------------------------------------------------
print("""A weight W of shape (in, out) has in * out entries. Its adapter has A (in, r) and
B (r, out): r (in + out) entries. For GPT-2 small (C = 768):""")
print(f"\n{'weight':>22s} {'shape':>14s} {'full':>11s} {'r=4':>8s} {'r=8':>8s} {'r=8 share':>10s}")
for name, shape in (("attn.w_qkv", (768, 2304)), ("attn.w_o", (768, 768)),
                    ("mlp.w1", (768, 3072)), ("mlp.w2", (3072, 768))):
    full = shape[0] * shape[1]
    r4, r8 = 4 * sum(shape), 8 * sum(shape)
    print(f"{name:>22s} {str(shape):>14s} {full:11,d} {r4:8,d} {r8:8,d} {r8 / full:10.2%}")
attention_r8 = 12 * 8 * (sum((768, 2304)) + sum((768, 768)))
check(0.35e6 < attention_r8 < 0.45e6, f"r = 8 on attention in 12 layers trains {attention_r8:,} numbers")
print("""
Adapting the attention matrices of all 12 layers at r = 8 trains about 0.4 M numbers
instead of 124 M. Adam's state (two numbers per trained weight) shrinks by the
same factor, and so does a saved fine-tune: the base is shared, the adapters
are a few hundred kilobytes.""")


# ---------------------------------------------------------------------------
step(2, "One adapted linear layer: y = x W + b + s (x A) B")
# ---------------------------------------------------------------------------
rng = np.random.default_rng(0)
n_in, n_out, r, alpha = 6, 5, 2, 4.0
x = rng.standard_normal((3, n_in))
w, b = rng.standard_normal((n_in, n_out)), rng.standard_normal(n_out)
a_init = lora.init_lora({"w": w}, ["w"], rank=r, alpha=alpha, seed=0)
a, b_lora = a_init["w.lora_a"], a_init["w.lora_b"]
y, _ = lora.lora_linear_forward(x, w, b, a, b_lora, alpha)
s = lora.lora_scale(alpha, r)
print(f"""init: A ~ Uniform(+-1/sqrt(in)) {a.shape}, B = 0 {b_lora.shape}, s = alpha / r = {alpha} / {r} = {s}
with B = 0 the layer is exactly the base layer: max |y - (x W + b)| = {np.abs(y - (x @ w + b)).max():.1e}
A is random so that B's gradient s (xA)^T dy is not zero: training can start.
(If both were zero, both gradients would be zero and nothing would ever move.)""")
check(s == alpha / r and not np.any(b_lora) and np.any(a), "init: s = alpha / r, B = 0, A random")
expect_close("the adapted layer at init vs the base layer", y, x @ w + b, 1e-12)
b_lora = rng.standard_normal((r, n_out))
rep = bp.gradcheck(lora.lora_linear_forward, lora.lora_linear_backward, [x, w, b, a, b_lora],
                   wrt=[0, 3, 4], kwargs=dict(alpha=alpha))
print(f"\nlora_linear_backward -> (dx, dA, dB), checked by finite differences: {expect_gradcheck('lora_linear', rep)}")
print("""No dW and no db: they are frozen, so the backward skips those two matmuls. Why
s = alpha / r: with Adam every entry of A and B moves by about lr per step,
whatever r is, so the product A B (a sum of r terms) grows with r; dividing by r
keeps the update's size roughly fixed, and alpha can stay put while you try ranks.""")


# ---------------------------------------------------------------------------
step(3, "Adapting a whole model without touching its code")
# ---------------------------------------------------------------------------
print("""A model only ever sees W_eff = W + s A B. So its own backward, run on the merged
weights, already returns dW = dL/dW_eff, and the chain rule gives
    dL/dA = s dW B^T      dL/dB = s A^T dW.
That is lora_grads_from_full. Checked here through a whole (tiny, float64) GPT:""")
tiny = gpt.GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=2, n_embd=4)
p64 = gpt.init_params(tiny, seed=0, dtype=np.float64)
ad64 = lora.init_lora(p64, r"attn\.w_(qkv|o)$", rank=2, alpha=3.0, seed=1)
for k in ad64:
    if k.endswith(".lora_b"):
        ad64[k] = rng.standard_normal(ad64[k].shape) * 0.5   # nonzero B, or dA would be 0 and prove nothing
idx = rng.integers(0, 7, size=(2, 4))
tgt = rng.integers(0, 7, size=(2, 4))
_, g64 = lora.lora_loss_and_grads(lambda p: gpt.loss_and_grads(p, tiny, idx, tgt), p64, ad64, 3.0, 2)


def per_token(adapters):
    logits, _ = gpt.forward(lora.merge_lora(p64, adapters, 3.0, 2), tiny, idx)
    return -np.take_along_axis(bp.log_softmax(logits), tgt[..., None], axis=-1) / tgt.size


print(f"   {expect_gradcheck('LoRA through a GPT', bp.check_dict_gradients(per_token, ad64, g64))}")
print("""The cost: the model still computes the full dW (one matmul per weight, as in full
fine-tuning). What LoRA saves is what comes after: optimizer state, update and
storage for r (in + out) numbers instead of in * out.""")


# ---------------------------------------------------------------------------
step(4, "A base model: a tiny GPT that counts 0 1 2 3 ...")
# ---------------------------------------------------------------------------
V = 16
config = gpt.GPTConfig(vocab_size=V, block_size=8, n_layer=2, n_head=2, n_embd=16)


def counting(step):
    """Every start 0..V-1, then 8 more tokens, each (previous + step) mod V."""
    seq = (np.arange(V)[:, None] + step * np.arange(9)[None, :]) % V
    return seq[:, :-1], seq[:, 1:]


params = gpt.init_params(config, seed=0)
x1, y1 = counting(1)
opt = optim.AdamW(params, lr=1e-2, weight_decay=0.0)
for i in range(PRETRAIN_STEPS):
    loss, grads = gpt.loss_and_grads(params, config, x1, y1)
    opt.step(grads)
print(f"full training for {PRETRAIN_STEPS} steps on 'count by 1' (mod {V}): loss {loss:.4f}"
      f" (a uniform guess: ln {V} = {np.log(V):.3f})")
expect_below("the base model's loss on 'count by 1'", gpt.loss(params, config, x1, y1), np.log(V) / 10,
             f"a tenth of ln {V}")
print("base model, greedy from [0]:", gpt.generate(params, config, [0], 7, temperature=0))
check(list(gpt.generate(params, config, [0], 7, temperature=0)) == list(range(8)), "the base model should count 0..7")
x3, y3 = counting(3)
print(f"its loss on 'count by 3': {gpt.loss(params, config, x3, y3):.3f} (it has never seen that)")
check(gpt.loss(params, config, x3, y3) > np.log(V), "the base model should do worse than a guess at counting by 3")


# ---------------------------------------------------------------------------
step(5, "LoRA fine-tuning to count in threes")
# ---------------------------------------------------------------------------
RANK, ALPHA = 2, 4
TARGETS = r"attn\.w_(qkv|o)$|mlp\.w[12]$"
adapters = lora.init_lora(params, TARGETS, rank=RANK, alpha=ALPHA, seed=0)
total, trained = gpt.num_params(params), lora.lora_param_count(adapters)
print(f"adapters on {len(lora.lora_targets(adapters))} weights (attention and MLP of both layers), r = {RANK}, "
      f"alpha = {ALPHA}")
print(f"trainable: {trained:,} adapter numbers ({trained / total:.1%} of the base's {total:,}, which stay frozen)")
check(trained == sum(RANK * sum(params[k].shape) for k in lora.lora_targets(adapters)),
      "each adapter should hold r (in + out) numbers")
base_copy = {k: v.copy() for k, v in params.items()}
opt = optim.AdamW(adapters, lr=1e-2, weight_decay=0.0)   # the optimizer sees only A and B
shown = sorted({0, LORA_STEPS // 8, LORA_STEPS // 4, LORA_STEPS // 2, LORA_STEPS - 1})
losses = []
for i in range(LORA_STEPS):
    loss, grads = lora.lora_loss_and_grads(lambda p: gpt.loss_and_grads(p, config, x3, y3),
                                           params, adapters, ALPHA, RANK)
    opt.step(grads)
    if i in shown:
        print(f"   step {i:4d}  loss {loss:.4f}")
    losses.append(loss)
print(f"Adam state: {2 * trained:,} numbers instead of {2 * total:,} for full fine-tuning")
same = all(np.array_equal(params[k], base_copy[k]) for k in params)
print(f"base weights bit-identical after fine-tuning: {same}")
check(same, "LoRA fine-tuning must not touch the base weights")
expect_below("the LoRA fine-tune's loss on 'count by 3'", losses[-1], losses[0] / 10, "a tenth of its starting loss")
expect_below("the LoRA fine-tune's loss on 'count by 3'", losses[-1], np.log(V), f"ln {V}, a uniform guess")


# ---------------------------------------------------------------------------
step(6, "Merge for inference, and take the adapter off again")
# ---------------------------------------------------------------------------
merged = lora.merge_lora(params, adapters, ALPHA, RANK)
print("adapted model (merged), greedy from [0]:", gpt.generate(merged, config, [0], 7, temperature=0))
print("base model, still intact,  greedy from [0]:", gpt.generate(params, config, [0], 7, temperature=0))
check(list(gpt.generate(merged, config, [0], 7, temperature=0)) == [3 * k % V for k in range(8)],
      "the merged model should count in threes")
check(list(gpt.generate(params, config, [0], 7, temperature=0)) == list(range(8)), "the base should still count by 1")
merged_loss = gpt.loss(merged, config, x3, y3)
expect_below("the merged model's loss on 'count by 3'", merged_loss, np.log(V) / 10, f"a tenth of ln {V}")
print(f"""merge_lora writes W + s A B into a copy of each adapted weight: inference then
costs exactly what the base costs, with no extra matmuls. Loss of the merged model
on 'count by 3': {merged_loss:.4f}.""")
back = lora.unmerge_lora(merged, adapters, ALPHA, RANK)
err = max(expect_close(f"unmerge(merge({k})) vs {k} (float32)", back[k], params[k], 1e-6) for k in params)
print(f"""unmerge_lora subtracts it again: max |unmerge(merge(W)) - W| = {err:.1e} (float32 rounding,
not zero: keep the base weights if you need them bit for bit). One base model can
serve many tasks by swapping small adapter dicts in and out.""")
