"""Walkthrough 18: Medusa, decoding several tokens per forward pass without a draft model.

A GPT decodes one token per forward pass, and on a GPU a pass over one token costs
about as much as a pass over dozens: the weights have to be read either way. Medusa
(Cai et al. 2024) puts K small extra heads on the model's last hidden state; head k
guesses the token k + 2 ahead. The guesses form a tree of candidate continuations,
the base model checks the whole tree in ONE forward pass under a tree attention mask,
and the longest candidate it agrees with is kept. Greedy output stays exactly the
base's greedy output; only the number of passes drops.

  1. a tiny base model (trained here on a nursery rhyme)
  2. the heads: a residual SiLU block and an LM head each; their backward, checked
  3. training the heads with the base frozen (Medusa-1)
  4. the tree of candidates in Medusa's layout
  5. tree attention: every candidate path verified in one pass
  6. the acceptance rules: greedy and typical
  7. generation: the same text in fewer passes

Run: python walkthroughs/18_medusa.py      (MINILLM_FAST=1 for fewer training steps)
"""
import numpy as np

from _narrate import FAST, check, expect_below, expect_close, expect_gradcheck, step
from minillm import gpt, medusa, optim
from minillm.attention import KVCache
from minillm.backprop import check_dict_gradients

np.set_printoptions(precision=3, suppress=True)
BASE_STEPS = 120 if FAST else 400
HEAD_STEPS = 100 if FAST else 300

# ---------------------------------------------------------------------------
step(1, "A tiny base model")
# ---------------------------------------------------------------------------
TEXT = ("hickory dickory dock, the mouse ran up the clock. the clock struck one, the mouse ran down. "
        "hickory dickory dock. tick tock, tick tock, the mouse ran up the clock again. ") * 4
chars = sorted(set(TEXT))
stoi = {c: i for i, c in enumerate(chars)}
data = np.array([stoi[c] for c in TEXT])
V = len(chars)
config = gpt.GPTConfig(vocab_size=V, block_size=48, n_layer=2, n_head=2, n_embd=32, pos="rope")
params = gpt.init_params(config, seed=0, dtype=np.float64)
rng = np.random.default_rng(0)


def batch(n=16, T=32):
    starts = rng.integers(0, len(data) - T - 1, n)
    return (np.stack([data[s:s + T] for s in starts]), np.stack([data[s + 1:s + T + 1] for s in starts]))


opt = optim.AdamW(params, lr=1e-2, weight_decay=0.0)
for _ in range(BASE_STEPS):
    loss, grads = gpt.loss_and_grads(params, config, *batch())
    opt.step(grads)
x_all, y_all = batch(64)
base_loss = gpt.loss(params, config, x_all, y_all)
print(f"{len(TEXT)} characters, V = {V}; a {config.n_layer}-layer GPT with RoPE, {BASE_STEPS} AdamW steps:")
print(f"   next-character loss {base_loss:.3f} nats (a uniform guess: ln V = {np.log(V):.3f})")
expect_below("the base's loss", base_loss, np.log(V), "the uniform guess ln V")


def decode(ids):
    return "".join(chars[i] for i in ids)


# ---------------------------------------------------------------------------
step(2, "The heads: h + SiLU(h W1 + b1), then a vocabulary projection")
# ---------------------------------------------------------------------------
print("""Head k reads the final hidden state h_t (gpt's cache.xf) and guesses token t + k + 2:
    r_k = h + SiLU(h W1_k + b1_k),   logits_k = r_k W_k^T
W1 and b1 start at zero and W_k is a copy of the base's LM head, so a new head is the
LM head itself: it guesses for t + k + 2 what the base guesses for t + 1.""")
lm_head = medusa.base_lm_head(params, config)
heads = medusa.init_heads(config, n_heads=3, lm_head=lm_head, dtype=np.float64)
base_logits, base_cache = gpt.forward(params, config, x_all[:4])
head_logits, _ = medusa.heads_forward(base_cache.xf, heads, lm_head)
print(f"   head logits: {head_logits.shape} (K, B, T, V); base logits: {base_logits.shape}")
for k in range(3):
    expect_close(f"new head {k} vs the base's logits", head_logits[k], base_logits, 1e-12)
print("   every new head returns the base's own logits (checked to 1e-12)")
print("\nThe backward, written out (heads_backward), against finite differences, with random")
print("weights (a zero W1 would leave SiLU's slope unchecked) and a random upstream gradient:")
g_rng = np.random.default_rng(1)
small = {k: (g_rng.standard_normal((8,)) if k.endswith("b1") else g_rng.standard_normal((8, 8))
             if k.endswith("w1") else g_rng.standard_normal((5, 8))) * 0.5 for k in heads}
hidden = g_rng.standard_normal((2, 3, 8))
dlogits = g_rng.standard_normal((3, 2, 3, 5))
_, cache = medusa.heads_forward(hidden, small)
grads = medusa.heads_backward(dlogits, cache)
report = check_dict_gradients(lambda h: (medusa.heads_forward(hidden, h)[0] * dlogits).reshape(-1), small, grads)
print(f"   {expect_gradcheck('heads_backward', report)}")

# ---------------------------------------------------------------------------
step(3, "Training the heads, the base frozen (Medusa-1)")
# ---------------------------------------------------------------------------
print("""The base runs forward only; head k is trained by cross-entropy against the token
k + 2 ahead, weighted 0.8^k (the paper's choice: far guesses are harder, and matter less,
since a path is cut at its first miss). Top-1 accuracy on batches of the text:""")


def accuracies(h):
    base, per_head = medusa.head_accuracy(h, params, config, x_all, y_all, ks=(1,))
    return base[0], per_head[:, 0]


base_acc, before = accuracies(heads)
opt_h = optim.Adam(heads, lr=1e-2)
for _ in range(HEAD_STEPS):
    _, g, per_head_loss = medusa.loss_and_grads(heads, params, config, *batch())
    opt_h.step(g)
_, after = accuracies(heads)
print(f"   the base's own next token (t+1): {base_acc:.3f}")
for k in range(3):
    print(f"   head {k} (token t+{k + 2}): {before[k]:.3f} as a copy of the LM head -> {after[k]:.3f} trained")
    check(after[k] > before[k], f"training should improve head {k}: {before[k]:.3f} -> {after[k]:.3f}")
print(f"   per-head losses after training: {np.round(per_head_loss, 3)} nats")

# ---------------------------------------------------------------------------
step(4, "The tree of candidates")
# ---------------------------------------------------------------------------
print("""Each head offers its top-k tokens. A choice [i0, i1, ...] is one candidate path:
head 0's i0-th best, then head 1's i1-th best, ... A set of choices closed under
prefixes is a tree; with the root (the base's own next token) there are len + 1 nodes,
sorted by (length, values), each after its ancestors. Medusa's buffers:""")
choices = [[0], [1], [0, 0], [0, 1], [0, 0, 0]]
b = medusa.tree_buffers(choices, topk=3)
names = ["root"] + [str(c) for c in sorted(choices, key=lambda c: (len(c), c))]
print("   attn_mask (row: a node; 1 where it may look):")
for name, row in zip(names, b.attn_mask.astype(int)):
    print(f"      {name:>10s}  {row}")
print(f"   position_ids (depth):   {b.position_ids}")
print(f"   tree_indices:           {b.tree_indices}   into [root, head 0's top 3, head 1's top 3, head 2's top 3]")
print(f"   retrieve_indices (one row per leaf, -1 padding):\n{b.retrieve_indices}")
check(b.attn_mask.astype(int)[4].tolist() == [1, 1, 0, 0, 1, 0], "node [0, 1] sees the root, [0] and itself")
check(b.tree_indices.tolist() == [0, 1, 2, 4, 5, 7], "depth d, index i -> 1 + 3 (d - 1) + i")
check(b.retrieve_indices.tolist() == [[0, 1, 3, 5], [0, 1, 4, -1], [0, 2, -1, -1]], "the three leaves' paths")
big = medusa.tree_buffers(medusa.MC_SIM_7B_63)
print(f"""   Medusa's published tree for Vicuna-7B, mc_sim_7b_63, works as it is: {big.attn_mask.shape[0]} nodes,
   {big.position_ids.max()} deep, {big.retrieve_indices.shape[0]} leaves; it spends most nodes on head 0's top
   guesses, fewer deeper down, because deeper guesses are right less often.""")

# ---------------------------------------------------------------------------
step(5, "Tree attention: every candidate verified in one forward pass")
# ---------------------------------------------------------------------------
print("""After the prompt's keys and values are cached, the tree's N tokens go through the base
in one pass. Each node sees the whole cache, itself and its ancestors (tree_mask), and
sits at position (cached length + depth), so the logits at node n are exactly what a
plain forward of (prompt + n's root path) gives at its last token:""")
prompt = [stoi[c] for c in "the mouse ran "]
kv = KVCache(config.n_layer, 1, config.kv_heads, 64, config.head_dim, dtype=np.float64)
p_logits, p_cache = gpt.forward(params, config, np.array([prompt]), kv_cache=kv)
root = int(np.argmax(p_logits[0, -1]))
hl, _ = medusa.heads_forward(p_cache.xf[:, -1:], heads, lm_head)
top = np.argsort(-hl[:, 0, 0], axis=-1)[:, :3]                 # (K, 3): each head's best three
flat = np.concatenate([[root], top.reshape(-1)])
tokens = flat[b.tree_indices]
print(f"   root (the base's next token): {chars[root]!r}; heads' top 3: "
      f"{[[chars[t] for t in row] for row in top]}")
print(f"   tree tokens: {[chars[t] for t in tokens]}")
t_logits, _ = gpt.forward(params, config, tokens[None], kv_cache=kv, tree_mask=b.attn_mask)
worst = 0.0
for n in range(len(tokens)):
    path = np.flatnonzero(b.attn_mask[n])
    plain, _ = gpt.forward(params, config, np.array([prompt + tokens[path].tolist()]))
    worst = max(worst, expect_close(f"node {n}'s tree logits vs a plain forward of its path",
                                    t_logits[0, n], plain[0, -1], 1e-10))
n_path_tokens = int((b.retrieve_indices >= 0).sum())
print(f"   all {len(tokens)} nodes agree with plain forwards of their paths (max |diff| {worst:.1e}).")
print(f"   One pass of {len(tokens)} tokens instead of {b.retrieve_indices.shape[0]} passes over the leaves' "
      f"paths ({n_path_tokens} tokens): shared prefixes are computed once.")

# ---------------------------------------------------------------------------
step(6, "Acceptance: how much of a candidate the base agrees with")
# ---------------------------------------------------------------------------
ret = b.retrieve_indices
candidates = np.where(ret >= 0, tokens[np.maximum(ret, 0)], -1)
path_logits = t_logits[0][np.maximum(ret, 0)]
best, n_acc = medusa.greedy_accept(candidates, path_logits)
print(f"""Greedy: a node's token is accepted if it is the base's argmax at its parent (and so
were its ancestors); the longest accepted path wins. Here: path {best}
({[chars[t] for t in candidates[best] if t >= 0]}) with {n_acc} candidate(s) accepted, so this
step emits {n_acc + 1} tokens: the root and the accepted ones. The base's argmax at the last
accepted node is the next root, already known for free.""")
by_hand = 0
while by_hand < ret.shape[1] - 1 and candidates[best, by_hand + 1] == np.argmax(path_logits[best, by_hand]):
    by_hand += 1
check(by_hand == n_acc, f"greedy acceptance by hand: {by_hand} vs {n_acc}")
print("""
Sampling (temperature T > 0) needs a rule that does not demand the exact argmax. Typical
acceptance takes x if p(x) > min(posterior_threshold, posterior_alpha * exp(-H(p))):""")
for name, p in (("confident", np.array([0.90, 0.05, 0.03, 0.02])), ("unsure", np.array([0.3, 0.3, 0.2, 0.2]))):
    H = -(p * np.log(p)).sum()
    th = medusa.typical_threshold(p[None], 0.09, 0.3)[0]
    print(f"   {name:>9s} p = {p}: H = {H:.2f} nats, threshold min(0.09, 0.3 e^-H) = {th:.3f}; accepted: "
          f"{[i for i in range(4) if p[i] > th]}")
    expect_close(f"the {name} threshold by hand", th, min(0.09, 0.3 * np.exp(-H)), 1e-15)
print("""   A confident base accepts only its favourite; an unsure one accepts anything plausible.
   It is not exact sampling (unlike speculative decoding's rule): it trades a little of the
   distribution's tail for longer accepted runs.""")

# ---------------------------------------------------------------------------
step(7, "Generation: the same text in fewer passes")
# ---------------------------------------------------------------------------
n_new = 30
plain_ids = gpt.generate(params, config, prompt, n_new, temperature=0)
print(f"   plain greedy, {n_new} passes: {decode(plain_ids)!r}")
print("   (trees: the first N nodes of mc_sim_7b_63 no deeper than our 3 heads: 62 of its 64)")
for n_nodes in (1, 10, 64):
    tree = medusa.mc_sim_tree(n_nodes, medusa.n_heads(heads))
    ids, stats = medusa.generate(params, config, heads, prompt, n_new, choices=tree)
    print(f"   Medusa, {stats.tree_nodes:2d}-node tree: {stats.base_calls:2d} passes, mean accepted length "
          f"{stats.mean_accepted_length:.2f}, same text: {ids == plain_ids}")
    check(ids == plain_ids, f"greedy Medusa with a {n_nodes}-node tree must reproduce plain greedy decoding")
check(stats.base_calls < n_new, "the largest tree should save passes")


def loglik(ids):
    lg, _ = gpt.forward(params, config, np.array([ids[:-1]]))
    lp = lg[0] - np.log(np.exp(lg[0]).sum(-1, keepdims=True))
    return float(np.mean([lp[t, ids[t + 1]] for t in range(len(prompt) - 1, len(ids) - 1)]))


seeds = range(4 if FAST else 16)
plain_ll = [loglik(gpt.generate(params, config, prompt, n_new, temperature=0.7, seed=s)) for s in seeds]
runs = [medusa.generate(params, config, heads, prompt, n_new, choices=tree, temperature=0.7, seed=s)
        for s in seeds]
print(f"""   At temperature 0.7 over {len(seeds)} seeds, the base's mean log-likelihood per new token:
      plain sampling:      {np.mean(plain_ll):.3f}
      typical acceptance:  {np.mean([loglik(ids) for ids, _ in runs]):.3f}, mean accepted length """
      f"""{np.mean([s.mean_accepted_length for _, s in runs]):.2f}
   (typical acceptance keeps only tokens the base finds likely enough, so its text tends to
   score higher under the base: it is a different sampler, not the same one made faster.)""")
print("""
The speedup in wall-clock time is (tokens per pass) x (time of a 1-token pass) / (time of
an N-token pass). On a GPU the last two are close (the paper reports 2.2-3.6x); on a CPU an
N-token pass costs more, so a small tree is the sweet spot (python -m minillm bench
generate measures it).""")
