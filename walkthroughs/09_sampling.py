"""Walkthrough 09: from logits to text.

A language model hands us, at each step, V logits: one unnormalised
log-probability per token. Everything that makes generation good or bad
(repetitive, random, bland, fast) happens after the model, in a few lines of
array code. This walkthrough builds a tiny character model from counts and uses
it to show, step by step:

  1. temperature                 5. greedy decoding vs sampling, and seeds
  2. top-k, top-p, min-p          6. the KV cache: why generation is not quadratic
  3. repetition, frequency and    7. beam search and its length penalty
     presence penalties           8. speculative decoding's accept/reject rule

Run: python walkthroughs/09_sampling.py   (MINILLM_FAST=1 makes the simulations smaller)
"""
import numpy as np

from _narrate import FAST, check, expect_close, step
from minillm import sampling as S

np.set_printoptions(precision=3, suppress=True)


def probs(logits):
    z = np.exp(logits - np.max(logits[np.isfinite(logits)]))
    return z / z.sum()


# ---------------------------------------------------------------------------
step(0, "A tiny model: character bigrams counted from a text")
# ---------------------------------------------------------------------------
TEXT = ("the cat sat on the mat. the dog sat on the log. a cat and a dog met on a mat "
        "and then the cat ran to the den and the dog ran to the log. ")
chars = sorted(set(TEXT))
stoi = {c: i for i, c in enumerate(chars)}
V = len(chars)
counts = np.ones((V, V))                      # add-one smoothing: nothing is impossible
for a, b in zip(TEXT, TEXT[1:]):
    counts[stoi[a], stoi[b]] += 1
table = np.log(counts / counts.sum(1, keepdims=True))    # logits = log P(next | current)


def encode(s):
    return [stoi[c] for c in s]


def decode(ids):
    return "".join(chars[i] for i in ids)


class CountingCache:
    """All a bigram needs to remember is how many positions it has seen."""
    def __init__(self):
        self.length = 0


class BigramDecoder:
    """The decoder protocol of minillm.sampling, for a bigram table.

    A real transformer would look back over the whole context; this one only
    looks at the last token, but it counts every position it is asked to process
    so that we can see what the KV cache saves.
    """
    def __init__(self, table, block_size=256):
        self.table, self.vocab_size, self.block_size, self.xp = table, table.shape[0], block_size, np
        self.positions_processed = 0

    def new_cache(self, batch_size, max_len):
        return CountingCache()

    def logits(self, ids, cache=None, attention_mask=None):
        self.positions_processed += ids.size
        if cache is not None:
            cache.length += ids.shape[1]
        return self.table[ids]

    def crop_cache(self, cache, length):
        cache.length = min(cache.length, length)


model = BigramDecoder(table)
print(f"{len(TEXT)} characters of text, a vocabulary of V = {V} characters.")
print("The model's logits after 't' are log P(next char | 't'); the five most likely:")
after_t = table[stoi["t"]]
for i in np.argsort(-after_t)[:5]:
    print(f"   {chars[i]!r}: p = {np.exp(after_t[i]):.3f}")
expect_close("each row of exp(table) sums to 1", np.exp(table).sum(1), np.ones(V), 1e-12)

# ---------------------------------------------------------------------------
step(1, "Temperature: divide the logits by T before the softmax")
# ---------------------------------------------------------------------------
print("T < 1 sharpens the distribution (towards the argmax), T > 1 flattens it (towards")
print("uniform). As T -> 0 sampling becomes greedy decoding. Next char after 't':")
p_h, entropies = [], []
for T in (0.25, 0.5, 1.0, 2.0):
    p = probs(S.apply_temperature(after_t, T))
    entropy = -(p * np.log(p)).sum()
    print(f"   T = {T:<4}  P('h') = {p[stoi['h']]:.3f}   entropy = {entropy:.2f} nats")
    by_hand = np.exp(after_t / T) / np.exp(after_t / T).sum()
    expect_close(f"softmax(apply_temperature(logits, {T})) vs softmax(logits / {T})", p, by_hand, 1e-12)
    p_h.append(p[stoi["h"]])
    entropies.append(entropy)
check(p_h == sorted(p_h, reverse=True) and entropies == sorted(entropies),
      f"raising T should lower P('h') and raise the entropy: {p_h}, {entropies}")

# ---------------------------------------------------------------------------
step(2, "Truncation: top-k, top-p (nucleus), min-p")
# ---------------------------------------------------------------------------
print("Sampling from the full distribution occasionally picks a token from the long,")
print("unreliable tail. Truncation sets the tail's logits to -inf (probability 0).")
demo = np.log(np.array([0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.02]))
print(f"   probabilities:          {np.exp(demo)}")
for name, out, kept in [("top_k(k=3)", S.top_k_filter(demo, 3), 3),
                        ("top_p(p=0.60)", S.top_p_filter(demo, 0.60), 2),
                        ("top_p(p=0.85)", S.top_p_filter(demo, 0.85), 4),
                        ("min_p(min_p=0.2)", S.min_p_filter(demo, 0.2), 4)]:
    print(f"   {name:<18} keeps {np.isfinite(out).sum()}: renormalised {probs(out)}")
    check(np.array_equal(np.isfinite(out), np.arange(7) < kept), f"{name} should keep the {kept} most likely")
    expect_close(f"{name} renormalised", probs(out)[:kept], np.exp(demo[:kept]) / np.exp(demo[:kept]).sum(), 1e-12)
print("top-k keeps a fixed number, whatever the shape of the distribution. top-p keeps the")
print("smallest set of most likely tokens whose mass reaches p (0.40 + 0.25 = 0.65 >= 0.60;")
print("0.40 + 0.25 + 0.15 + 0.10 = 0.90 >= 0.85). min-p keeps tokens at least min_p times as")
print("likely as the best one (0.2 * 0.40 = 0.08): a cut that adapts to the model's confidence.")
print("No filter ever removes the most likely token, so something is always left to pick.")

# ---------------------------------------------------------------------------
step(3, "Penalties against repetition")
# ---------------------------------------------------------------------------
logits = np.array([2.0, -1.0, 0.5, 1.0])
prev = np.array([0, 1, 1])                    # token 0 seen once, token 1 twice
print(f"   logits {logits}, already generated ids {prev.tolist()}")
print(f"   repetition_penalty 2.0 (CTRL): {S.repetition_penalty(logits, prev, 2.0)}")
expect_close("repetition_penalty 2.0", S.repetition_penalty(logits, prev, 2.0), [1.0, -2.0, 0.5, 1.0], 1e-12)
print("      positive logits of seen tokens are divided by 2, negative ones multiplied by 2:")
print("      both make the token less likely (dividing a negative logit would raise it).")
print(f"   frequency_penalty 0.5:         {S.frequency_penalty(logits, prev, 0.5)}  (minus 0.5 x count)")
print(f"   presence_penalty 0.5:          {S.presence_penalty(logits, prev, 0.5)}  (minus 0.5 if seen at all)")
expect_close("frequency_penalty 0.5", S.frequency_penalty(logits, prev, 0.5), [1.5, -2.0, 0.5, 1.0], 1e-12)
expect_close("presence_penalty 0.5", S.presence_penalty(logits, prev, 0.5), [1.5, -1.5, 0.5, 1.0], 1e-12)
print("generate() composes the processors in Hugging Face's order: repetition penalty,")
print("frequency/presence penalties, temperature, top-k, top-p, min-p.")

# ---------------------------------------------------------------------------
step("4-5", "Greedy decoding vs sampling")
# ---------------------------------------------------------------------------
prompt = encode("the ")
greedy_out = S.generate(model, prompt, 40, temperature=0)[0]
print(f"   greedy:            {decode(greedy_out)!r}")
print("   Greedy always takes the argmax, so a bigram model falls into a loop at once.")
by_hand = list(prompt)
for _ in range(40):
    by_hand.append(int(np.argmax(table[by_hand[-1]])))
check(list(greedy_out) == by_hand, f"greedy generate should follow the argmax by hand: {decode(by_hand)!r}")
samples = {}
for seed in (0, 1):
    samples[seed] = S.generate(model, prompt, 40, temperature=0.8, top_p=0.9, seed=seed)[0]
    print(f"   sample, seed {seed}:    {decode(samples[seed])!r}")
again = S.generate(model, prompt, 40, temperature=0.8, top_p=0.9, seed=0)[0]
print(f"   seed 0 again gives the same text: {again == samples[0]} (the draws come from a seeded")
check(again == samples[0] and samples[0] != samples[1], "one seed should repeat its text, another seed differ")
print("   NumPy Generator on the CPU, so this holds on the GPU too)")
pen = S.generate(model, prompt, 40, temperature=0, repetition_penalty=3.0)[0]
print(f"   greedy + repetition_penalty 3:   {decode(pen)!r}")
pen = S.generate(model, prompt, 40, temperature=0, frequency_penalty=0.6)[0]
print(f"   greedy + frequency_penalty 0.6:  {decode(pen)!r}")
print("   CTRL's penalty hits every seen token alike, so once all the common characters have")
print("   been seen it stops steering; the frequency penalty keeps growing with each repeat.")
print("   A batch of prompts of different lengths is left-padded, with a mask, in one call:")
for start, row in zip(("a ", "the dog "), S.generate(model, [encode("a "), encode("the dog ")], 20,
                                                    temperature=0.7, seed=3, stop=[encode(".")])):
    print(f"      {decode(row)!r}")
    check(decode(row).startswith(start) and (decode(row).endswith(".") or len(row) == len(start) + 20),
          f"each row should be its prompt, then up to a '.' or 20 new tokens: {decode(row)!r}")
print("   (a row stops after the stop sequence '.', or after 20 new tokens)")

# ---------------------------------------------------------------------------
step(6, "The KV cache")
# ---------------------------------------------------------------------------
print("Without a cache, every step re-runs the model over the whole sequence: n steps")
print("cost about n^2 / 2 token-positions. With a cache, the prompt is processed once")
print("(the 'prefill'), then each step feeds just the new token and attends over the")
print("cached keys and values of all earlier positions.")
n_new = 40 if FAST else 200
outs = []
for use_cache in (False, True):
    model.positions_processed = 0
    outs.append(S.generate(model, prompt, n_new, temperature=0.8, seed=5, use_cache=use_cache)[0])
    print(f"   use_cache={use_cache!s:<5}: {model.positions_processed:6d} positions processed for "
          f"{n_new} new tokens")
    if use_cache:
        check(model.positions_processed <= len(prompt) + n_new, "with a cache each position should be fed once")
    else:
        check(model.positions_processed >= n_new ** 2 / 2, "without a cache every step re-reads the sequence")
print(f"   same output both ways: {outs[0] == outs[1]}")
check(outs[0] == outs[1], "generation with and without the cache should give the same tokens")
print("The outputs are identical; only the work differs. (python -m minillm bench generate")
print("measures the wall-clock speedup on a real GPT.)")

# ---------------------------------------------------------------------------
step(7, "Beam search")
# ---------------------------------------------------------------------------
print("Greedy decoding commits to the best token now, even when it leads nowhere good.")
print("Beam search keeps the num_beams most likely partial sequences at every step.")
toy = np.full((4, 4), -30.0)
toy[0, 1], toy[0, 2] = np.log(0.6), np.log(0.4)
toy[1, 3], toy[1, 0] = np.log(0.6), np.log(0.4)       # 3 is the end-of-sequence token
toy[2, 2] = 0.0
toy_model = BigramDecoder(toy)
g = S.generate(toy_model, [0], 3, temperature=0, eos_id=3)[0]
print(f"   greedy from 0: {g}   probability 0.6 * 0.6 = 0.36")
b, score = S.beam_search(toy_model, [0], 3, num_beams=2, eos_id=3, return_scores=True)
print(f"   beam search:   {b[0]}   probability 0.4 * 1 * 1 = 0.40 (score log(0.4)/3 = {score[0]:.3f})")
check(list(g) == [0, 1, 3] and list(b[0]) == [0, 2, 2, 2], f"greedy should end early, beam search find 0 2 2 2: "
      f"{g}, {b[0]}")
check(abs(score[0] - np.log(0.4) / 3) < 1e-9, f"the beam's score should be log(0.4) / 3, got {score[0]}")
print("A hypothesis is scored sum(log p) / n_new ** length_penalty. Log-probabilities are")
print("negative, so without the division short outputs always win; length_penalty > 0")
print("favours longer outputs, < 0 shorter ones:")
b2 = S.beam_search(toy_model, [0], 3, num_beams=2, eos_id=3, length_penalty=-3.0)[0]
print(f"   length_penalty=-3: {b2}")
check(list(b2) == [0, 1, 3], f"a negative length_penalty should prefer the short [0, 1, 3], got {b2}")

# ---------------------------------------------------------------------------
step(8, "Speculative decoding: a worked example of the accept/reject rule")
# ---------------------------------------------------------------------------
print("A cheap draft model proposes tokens; the big target model checks several of them")
print("in one forward pass. Take one position with 3 tokens:")
p = np.array([0.5, 0.3, 0.2])     # the target
q = np.array([0.2, 0.6, 0.2])     # the draft
print(f"   target p = {p},  draft q = {q}")
accept = np.minimum(1.0, p / q)
print(f"   the draft samples x ~ q; x is accepted with probability min(1, p(x)/q(x)) = {accept}")
residual = np.maximum(p - q, 0.0)
print(f"   on rejection, draw from norm(max(0, p - q)) = {residual / residual.sum()}")
p_reject = (q * (1 - accept)).sum()
out = q * accept + p_reject * residual / residual.sum()
print(f"   P(output) = q * accept + P(reject) * residual = {q * accept} + {p_reject:.2f} * "
      f"{residual / residual.sum()} = {out}")
expect_close("the speculative output distribution vs the target p", out, p, 1e-12)
print("   ... which is exactly p: the output is distributed as the target's own sampling,")
print("   whatever the draft. A better draft only means fewer rejections.")

print()
print("Now whole runs: the target is our bigram model; the draft is a weaker copy of it")
print("(its logits divided by 2.5), which often proposes what the target would pick.")
draft = BigramDecoder(table / 2.5)
n_runs = 300 if FAST else 3000
rng = np.random.default_rng(0)
first = np.zeros(V)
acc = []
calls = []
for _ in range(n_runs):
    ids, stats = S.speculative_generate(model, draft, encode("the c"), 8, k=4, rng=rng)
    first[ids[len("the c")]] += 1
    acc.append(stats.acceptance_rate)
    calls.append(stats.target_calls)
target_p = probs(table[stoi["c"]])
top = np.argsort(-target_p)[:4]
print(f"   {n_runs} runs of 8 new tokens with k = 4 draft tokens per round:")
print(f"   mean acceptance rate {np.mean(acc):.2f}; target forward calls per run {np.mean(calls):.2f} "
      f"instead of 8")
print("   first new token, empirical frequency vs the target's probability:")
for i in top:
    print(f"      {chars[i]!r}: {first[i] / n_runs:.3f} vs {target_p[i]:.3f}")
    # A frequency from n draws has standard error sqrt(p (1 - p) / n): 4 of them is a loose, safe bar.
    se = np.sqrt(target_p[i] * (1 - target_p[i]) / n_runs)
    check(abs(first[i] / n_runs - target_p[i]) <= 4 * se,
          f"{chars[i]!r} was drawn with frequency {first[i] / n_runs:.3f}, the target says {target_p[i]:.3f}")
check(0 < np.mean(acc) <= 1 and np.mean(calls) < 8, "the draft should save target calls")
ids_greedy, st_greedy = S.speculative_generate(model, draft, encode("the c"), 20, k=4, temperature=0)
same_greedy = ids_greedy == S.generate(model, encode("the c"), 20, temperature=0)[0]
print(f"   at temperature 0 (greedy) the output equals the target's greedy output: {same_greedy}")
check(same_greedy, "greedy speculative decoding should reproduce the target's greedy output")
print()
print("The speedup in wall-clock time is (tokens per target call) x (target call time) /")
print("(target call + k draft calls): large when the draft is much cheaper and agrees often.")
print("python -m minillm bench generate measures it on a real GPT with a small draft.")
