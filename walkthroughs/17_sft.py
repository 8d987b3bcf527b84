"""Walkthrough 17: supervised fine-tuning, a base model taught to answer in turns.

A base GPT continues text. To make it answer, InstructGPT's first step (SFT) trains it
on conversations written in a chat template, with the loss counted on the assistant's
words only. We add the template's tokens to a trained tokenizer without moving any
existing id, grow the model to match, look at the labels of one conversation, check the
response-only loss's gradient through a GPT, see why right padding needs no mask, and
then train a tiny GPT both ways, response-only and on every token, on a task whose
prompts are random letters, to see what the prompt's tokens cost.

Run: python walkthroughs/17_sft.py      (MINILLM_FAST=1 for fewer steps)
"""
import numpy as np

from _narrate import FAST, check, expect_close, expect_gradcheck, step
from minillm import backprop as bp
from minillm import gpt, optim, sft
from minillm.tokenizer import CharTokenizer

STEPS = 150 if FAST else 300
LETTERS = "abcdef"


# ---------------------------------------------------------------------------
step(1, "The chat template: new tokens after the trained ones")
# ---------------------------------------------------------------------------
base_tok = CharTokenizer.from_text("reverse: " + LETTERS + " who speaks? Romeo, Juliet.")
tok = sft.add_chat_tokens(base_tok)
ids_of = sft.chat_token_ids(tok)
print(f"trained tokenizer: {base_tok.vocab_size} ids; with the chat tokens: {tok.vocab_size}")
print("new ids:", ids_of)
text = "who speaks? Romeo"
check(tok.encode(text) == base_tok.encode(text), "existing ids unchanged")
check(sorted(ids_of.values()) == list(range(base_tok.vocab_size, tok.vocab_size)), "new ids appended")
chat = [{"role": "user", "content": "reverse: abc"}, {"role": "assistant", "content": "cba"}]
ids, labels = sft.build_example(tok, chat)
print(f"\nrendered: {sft.render(tok, ids)}")
print("\n  t  token            label (the target of the prediction AT t)")
for t, (i, y) in enumerate(zip(ids, labels)):
    print(f"{t:3d}  {tok.decode([i])!r:16s} {'-100' if y == sft.IGNORE_INDEX else repr(tok.decode([y]))}")
counted = [t for t, y in enumerate(labels) if y != sft.IGNORE_INDEX]
check([tok.decode([labels[t]]) for t in counted] == ["c", "b", "a", "<|end|>"],
      "the counted targets are the response and its <|end|>")
print("""
Only 4 of the positions count: the ones whose NEXT token is the assistant's text or its
closing <|end|> (so the model learns to stop). The <|assistant|> token itself is given
by the template (a prompt ends with it), the user's words are context. labels[t] =
ids[t + 1] there: minillm's next-token convention, so gpt.loss_and_grads(ids, labels)
is already the response-only loss.""")


# ---------------------------------------------------------------------------
step(2, "Growing the model: new rows at the mean of the old ones")
# ---------------------------------------------------------------------------
cfg0 = gpt.GPTConfig(vocab_size=base_tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32)
p0 = gpt.init_params(cfg0, seed=0)
params, cfg = sft.grow_vocab(p0, cfg0, tok.vocab_size, noise=0.1, seed=0)
x_old = np.array([base_tok.encode(text)])
old_logits, _ = gpt.forward(p0, cfg0, x_old)
new_logits, _ = gpt.forward(params, cfg, x_old)
d = expect_close("old tokens' logits after growing", new_logits[..., :cfg0.vocab_size], old_logits, 1e-5)
p_new = np.exp(bp.log_softmax(new_logits.astype(np.float64)))[..., cfg0.vocab_size:].sum(-1).mean()
print(f"""wte {p0['wte'].shape} -> {params['wte'].shape}. On old text the old logits move by at most {d:.1e}
(the old rows are untouched), and the five new tokens together get probability {p_new:.3f}
(about 5 / {tok.vocab_size} = {5 / tok.vocab_size:.3f}: a row near the mean gives about the average logit, where a
random row could give any). The small noise keeps the five rows apart.""")
check(abs(p_new - 5 / tok.vocab_size) < 0.05, "new tokens start near an average share of probability")


# ---------------------------------------------------------------------------
step(3, "The response-only loss through the GPT, checked by finite differences")
# ---------------------------------------------------------------------------
p64 = {k: v.astype(np.float64) for k, v in params.items()}
rows = [sft.build_example(tok, chat),
        sft.build_example(tok, [{"role": "user", "content": "reverse: fe"}, {"role": "assistant", "content": "ef"}])]
X, Y = sft.pad_batch(rows, ids_of["pad"])
loss, grads = sft.response_loss_and_grads(p64, cfg, X, Y)
logits, _ = gpt.forward(p64, cfg, X)
expect_close("batched loss vs the plain loop over counted positions", loss, sft.response_loss_naive(logits, Y), 1e-12)
mask, y_safe = Y != sft.IGNORE_INDEX, np.where(Y != sft.IGNORE_INDEX, Y, 0)


def per_position(p):
    lp = bp.log_softmax(gpt.forward(p, cfg, X)[0])
    return -np.take_along_axis(lp, y_safe[..., None], axis=-1)[..., 0] * mask / mask.sum()


rep = bp.check_dict_gradients(per_position, p64, grads, max_checks_per_param=4)
print(f"loss {loss:.4f} over {mask.sum()} counted positions; gradient check: {expect_gradcheck('sft loss', rep)}")


# ---------------------------------------------------------------------------
step(4, "Right padding needs no attention mask")
# ---------------------------------------------------------------------------
alone, _ = gpt.forward(p64, cfg, np.array([rows[1][0]]))
n = len(rows[1][0])
d = expect_close("a padded row's logits vs the row alone", logits[1, :n], alone[0], 1e-12)
print(f"""Row 2 is {n} tokens, padded to {X.shape[1]} with <|pad|> (labels -100). Its logits at the real
positions equal those of the row alone (max |diff| {d:.1e}): the GPT is causal, so a
position never sees the pads to its right, and their labels are ignored.""")


# ---------------------------------------------------------------------------
step(5, "Why response-only: prompts are not worth imitating")
# ---------------------------------------------------------------------------
rng = np.random.default_rng(0)


def reverse_chat(r):
    word = "".join(r.choice(list(LETTERS), size=3))
    return [{"role": "user", "content": "reverse: " + word}, {"role": "assistant", "content": word[::-1]}]


train_rows = [sft.build_example(tok, reverse_chat(rng)) for _ in range(512)]
held_rows = [sft.build_example(tok, reverse_chat(rng)) for _ in range(200)]
Xh, Yh = sft.pad_batch(held_rows, ids_of["pad"])
Xt, Yt = sft.pad_batch(train_rows, ids_of["pad"])
every_token = np.where(Xt[:, 1:] != ids_of["pad"], Xt[:, 1:], sft.IGNORE_INDEX)
Yt_all = np.concatenate([every_token, np.full((len(Xt), 1), sft.IGNORE_INDEX)], axis=1)
print(f"""Task: "reverse: xyz" -> "zyx", letters drawn at random: the prompt's three letters
cannot be predicted (at best log 6 = {np.log(6):.2f} nats each), the answer is determined.
Same model, same {STEPS} Adam steps, two label sets: the responses only, or every token.""")


def train_and_score(labels, seed=0):
    p = {k: v.copy() for k, v in params.items()}
    opt = optim.AdamW(p, lr=3e-3, weight_decay=0.0)
    r = np.random.default_rng(seed)
    for s in range(STEPS):
        rows_ = r.integers(0, len(Xt), size=32)
        opt.step(sft.response_loss_and_grads(p, cfg, Xt[rows_], labels[rows_])[1])
    return sft.greedy_correct(p, cfg, Xh, Yh).mean(), gpt.loss(p, cfg, Xh, Yh)


acc_resp, loss_resp = train_and_score(Yt)
acc_all, loss_all = train_and_score(Yt_all)
print(f"""
                      held-out exact match   held-out response loss
  response-only loss        {acc_resp:6.3f}                 {loss_resp:6.3f}
  every-token loss          {acc_all:6.3f}                 {loss_all:6.3f}""")
check(acc_resp > acc_all and loss_resp < loss_all,
      f"response-only should answer better in the same steps: {acc_resp:.3f} vs {acc_all:.3f}")
print("""
With every token counted, the answer's 4 targets are a quarter of the ~16 per
conversation, so they get a quarter of the gradient's weight, and much of the rest
pulls toward guessing the prompt's random letters (a target that can never be met):
the same steps teach the answer far less. Counting the response alone spends them all on what the assistant must
do. (On real instructions the prompt is not random, but the point stands: at inference
it is given, so predicting it is not the job.)""")


# ---------------------------------------------------------------------------
step(6, "Accuracy in one pass: the exact match of the greedy answer")
# ---------------------------------------------------------------------------
p = {k: v.copy() for k, v in params.items()}
opt = optim.AdamW(p, lr=3e-3, weight_decay=0.0)
for s in range(64):                # a model part-way there: some answers right, some wrong
    opt.step(sft.response_loss_and_grads(p, cfg, Xt[(np.arange(32) + 32 * s) % len(Xt)],
                                         Yt[(np.arange(32) + 32 * s) % len(Xt)])[1])
one_pass = sft.greedy_correct(p, cfg, Xh[:20], Yh[:20])
decoded = []
for row in held_rows[:20]:
    question = sft.render(tok, row[0]).split("<|user|>")[1].split("<|end|>")[0]
    answer = sft.greedy_answer(p, cfg, tok, [{"role": "user", "content": question}])
    decoded.append(answer == question[-3:][::-1])
print(f"""Greedy decoding writes response + <|end|> exactly iff, at every response position,
the argmax given the right answer so far is the right next token. So one teacher-forced
pass decides it: {one_pass.sum()}/20 held-out questions right in one pass, {sum(decoded)}/20 by
decoding each answer token by token.""")
check(0 < one_pass.sum() < 20, "a model part-way there: both outcomes occur, so the agreement means something")
check(list(one_pass) == decoded, "the one-pass exact match agrees with greedy decoding")
