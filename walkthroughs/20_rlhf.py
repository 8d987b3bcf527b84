"""Walkthrough 20: learning from preferences, a reward model, PPO with a KL penalty, and DPO.

After pretraining (and SFT: minillm/sft.py), InstructGPT's recipe asks raters
which of two responses is better, fits a reward model to those choices, and runs RL
(PPO) against it with a penalty for drifting from the SFT model. DPO reaches the same
objective with a classification loss on the pairs, no reward model and no sampling.

To see every idea exactly, the policy here is a "GPT of one position": one prompt, K
possible one-token responses, pi = softmax(theta). Its log-probabilities go through the
same rlhf.sequence_logprobs_forward a real GPT's would ((B, 1, K) logits), so everything
below is minillm.rlhf's code; only the model is small enough to solve in closed form.

1. sequence log-probabilities on a real (tiny) GPT, checked by finite differences
2. the reward model: Bradley-Terry on pairs; it can only learn differences
3. the KL-regularised optimum pi* ~ pi_ref exp(r / beta), and why the penalty matters
4. PPO: rollouts, the clipped surrogate, the KL in the reward
5. DPO: the same optimum from the pairs alone; its implicit reward beta log(pi / pi_ref)

Run: python walkthroughs/20_rlhf.py      (MINILLM_FAST=1 for fewer steps)
"""
import numpy as np

from _narrate import FAST, check, expect_close, expect_gradcheck, step
from minillm import gpt, rlhf
from minillm.backprop import check_dict_gradients, log_softmax

PPO_ITERS = 150 if FAST else 300
DPO_STEPS = 300 if FAST else 600


# ---------------------------------------------------------------------------
step(1, "log pi(y | x): a sum of next-token log-probabilities over the response")
# ---------------------------------------------------------------------------
cfg = gpt.GPTConfig(vocab_size=7, block_size=8, n_layer=1, n_head=2, n_embd=8)
params = gpt.init_params(cfg, seed=0, dtype=np.float64)
prompt, response = np.array([[1, 2, 3]]), np.array([[4, 5, 6]])
idx, targets = rlhf.sequences(prompt, response)
logits, trunk = gpt.forward(params, cfg, idx)
logp, cache = rlhf.sequence_logprobs_forward(logits, targets)
by_hand = sum(log_softmax(logits[0, t])[targets[0, t]] for t in range(2, 5))
print(f"""prompt {prompt[0].tolist()}, response {response[0].tolist()}: idx {idx[0].tolist()}, targets {targets[0].tolist()}
(-100: a prompt token, not counted). log pi(response | prompt) = {float(logp[0]):.6f}, by hand {by_hand:.6f}""")
expect_close("sequence log-probability vs the sum by hand", logp[0], by_hand, 1e-12)
grads = gpt.backward(rlhf.sequence_logprobs_backward(np.ones(1), cache), trunk)
rep = check_dict_gradients(lambda p: rlhf.sequence_logprobs_forward(gpt.forward(p, cfg, idx)[0], targets)[0],
                           params, grads, max_checks_per_param=4)
print(f"d log pi / d params through the GPT, by finite differences: {expect_gradcheck('sequence logp', rep)}")
print("Every method below pushes this one number up or down for chosen and rejected responses.")


# ---------------------------------------------------------------------------
step(2, "A reward model from pairs: loss = -log sigmoid(r_chosen - r_rejected)")
# ---------------------------------------------------------------------------
K = 6
true_reward = np.array([0.0, 1.0, 2.0, 0.5, 1.5, -1.0])          # what the rater likes
ref_logits = np.log(np.array([0.30, 0.25, 0.05, 0.20, 0.15, 0.05]))
pi_ref = np.exp(ref_logits)
rng = np.random.default_rng(0)


def sample_pairs(n):
    """Two samples of pi_ref per prompt (two equal ones dropped), the rater's choice first. The
    rater is noisy the Bradley-Terry way: it prefers a to b with probability sigmoid(r(a) - r(b))."""
    a, b = rng.choice(K, n, p=pi_ref), rng.choice(K, n, p=pi_ref)
    a, b = a[a != b], b[a != b]
    win = rng.random(len(a)) < 1 / (1 + np.exp(true_reward[b] - true_reward[a]))
    return np.where(win, a, b), np.where(win, b, a)


chosen, rejected = sample_pairs(4000)
r_hat = np.zeros(K)                                                 # a tabular reward model
for _ in range(1500):
    loss, c = rlhf.reward_loss_forward(r_hat[chosen], r_hat[rejected])
    dc, dr = rlhf.reward_loss_backward(1.0, c)
    g = np.bincount(chosen, dc, K) + np.bincount(rejected, dr, K)
    r_hat -= 5.0 * g
loss = float(rlhf.reward_loss_forward(r_hat[chosen], r_hat[rejected])[0])
acc = np.mean(r_hat[chosen] > r_hat[rejected])
shifted = float(rlhf.reward_loss_forward(r_hat[chosen] + 100, r_hat[rejected] + 100)[0])
print(f"""{len(chosen)} pairs from pi_ref = {np.round(pi_ref, 2).tolist()}, ranked by the true reward
{true_reward.tolist()} through a noisy rater. The fitted rewards, shifted to start at 0:
  r_hat - r_hat[0] = {np.round(r_hat - r_hat[0], 2).tolist()}
agreement with the rater's choices {acc:.3f} (it is noisy: no model gets 1); loss {loss:.4f},
and {shifted:.4f} with every reward + 100:
Bradley-Terry sees differences only, so a reward model is defined up to a constant.""")
check(abs(shifted - loss) < 1e-9, "the reward loss must not change when every reward moves by 100")
order = np.argsort(r_hat)
check(np.abs((r_hat - r_hat[0]) - true_reward).max() < 0.5, "the fitted rewards should recover the true ones "
      "up to a constant")


# ---------------------------------------------------------------------------
step(3, "What RL should find: max E[r] - beta KL(pi || pi_ref)")
# ---------------------------------------------------------------------------
beta = 0.5


def policy_stats(theta, reward):
    """(pi, its expected reward, KL(pi || pi_ref)) for logits theta."""
    logp = log_softmax(theta)
    p = np.exp(logp)
    return p, float(p @ reward), float(np.sum(p * (logp - np.log(pi_ref))))


optimum = pi_ref * np.exp(r_hat / beta)
optimum /= optimum.sum()
print(f"""The objective's maximiser is pi*(y) = pi_ref(y) exp(r(y) / beta) / Z (set the derivative
of sum_y pi(y) (r(y) - beta log(pi(y) / pi_ref(y))) to zero under sum pi = 1). At beta = {beta}:
  pi* = {np.round(optimum, 3).tolist()}""")
# Why the penalty: a reward model is trusted only where it saw data. Response 5 is rare under
# pi_ref; suppose the reward model overrates it (a blind spot: reward hacking waits there).
hacked = r_hat - r_hat[0]
hacked[5] = hacked.max() + 0.5
_, ref_true, _ = policy_stats(ref_logits, true_reward)
print(f"""A reward model with a blind spot: it scores the rare response 5 at {hacked[5]:.2f}, above all others
(its true reward is -1). The optimum for that flawed model, pi_ref exp(r / beta) / Z, for several beta:""")
sweep = {}
for b in (0.05, 0.25, 1.0, 2.0, 8.0):
    p, true_gain, kl = policy_stats(ref_logits + hacked / b, true_reward)
    sweep[b] = true_gain
    print(f"  beta = {b:>4}: pi(5) = {p[5]:.3f}, KL {kl:6.3f}, true reward {true_gain:+.3f}")
print(f"""  pi_ref     :                          true reward {ref_true:+.3f}
Without much penalty the policy goes all-in on the blind spot and the true reward collapses;
a moderate beta keeps pi where the reward model saw data and gains honestly; a huge beta
never leaves pi_ref. The KL penalty is what keeps a learned reward trustworthy.""")
check(sweep[0.05] < ref_true < max(sweep.values()), f"expected the barely-penalised policy ({sweep[0.05]:.3f}) below "
      f"pi_ref ({ref_true:.3f}) and some beta above it (best {max(sweep.values()):.3f})")
check(abs(sweep[8.0] - ref_true) < abs(sweep[0.05] - ref_true), "a large beta should stay closer to pi_ref")


# ---------------------------------------------------------------------------
step(4, "PPO: sample, score with the reward model minus beta (log pi - log pi_ref), clip")
# ---------------------------------------------------------------------------
theta = ref_logits.copy()
for it in range(PPO_ITERS):
    y = rng.choice(K, 64, p=np.exp(log_softmax(theta)))                     # rollouts
    lg = np.broadcast_to(theta, (64, 1, K)).copy()
    logp_old = rlhf.token_logprobs_forward(lg, y[:, None])[0]              # (64, 1)
    logp_ref = ref_logits[y][:, None] - np.log(pi_ref.sum())
    mask = np.ones((64, 1))
    rewards = rlhf.kl_rewards(logp_old, logp_ref, mask, r_hat[y], beta_kl=beta)
    adv, _ = rlhf.gae(rewards, np.zeros((64, 1)), mask)                    # no value head: V = 0
    adv = rlhf.whiten(adv, mask)
    for _ in range(2):                                                      # two epochs on the batch
        lg = np.broadcast_to(theta, (64, 1, K)).copy()
        logp, lc = rlhf.token_logprobs_forward(lg, y[:, None])
        loss, pc = rlhf.ppo_loss_forward(logp, logp_old, adv, mask, clip=0.2)
        dlg = rlhf.token_logprobs_backward(rlhf.ppo_loss_backward(1.0, pc), lc)
        theta -= 0.3 * dlg.sum(axis=(0, 1))
p_ppo, ppo_true, ppo_kl = policy_stats(theta, true_reward)
print(f"""after {PPO_ITERS} iterations of 64 rollouts: pi = {np.round(p_ppo, 3).tolist()}
true reward {ppo_true:+.3f} (pi_ref {ref_true:+.3f}), KL {ppo_kl:.3f}; the closed-form pi* above is the target.""")
check(ppo_true > ref_true + 0.2, f"PPO's true reward {ppo_true:.3f} should beat pi_ref's {ref_true:.3f}")
check(np.abs(p_ppo - optimum).max() < 0.1, f"PPO's policy {np.round(p_ppo, 3).tolist()} should be near pi*")


# ---------------------------------------------------------------------------
step(5, "DPO: the same optimum from the pairs, with the implicit reward beta log(pi / pi_ref)")
# ---------------------------------------------------------------------------
theta = ref_logits.copy()
ref_lp = ref_logits - np.log(pi_ref.sum())
lp = log_softmax(theta)
first, c = rlhf.dpo_loss_forward(lp[chosen], lp[rejected], ref_lp[chosen], ref_lp[rejected], beta=beta)
print(f"at pi = pi_ref the DPO loss is log 2 = {np.log(2):.6f}: got {float(first):.6f}")
expect_close("DPO loss at the reference", first, np.log(2), 1e-12)
for _ in range(DPO_STEPS):
    lg = np.broadcast_to(theta, (2 * len(chosen), 1, K)).copy()
    logp, lc = rlhf.sequence_logprobs_forward(lg, np.r_[chosen, rejected][:, None])
    loss, c = rlhf.dpo_loss_forward(logp[:len(chosen)], logp[len(chosen):], ref_lp[chosen], ref_lp[rejected], beta)
    dc, dr = rlhf.dpo_loss_backward(1.0, c)
    theta -= 20.0 * rlhf.sequence_logprobs_backward(np.r_[dc, dr], lc).sum(axis=(0, 1))
p_dpo, dpo_true, dpo_kl = policy_stats(theta, true_reward)
implicit = rlhf.dpo_implicit_reward(log_softmax(theta), ref_lp, beta)
print(f"""after {DPO_STEPS} full-batch steps: pi = {np.round(p_dpo, 3).tolist()}
true reward {dpo_true:+.3f}, KL {dpo_kl:.3f}. No reward model was trained and nothing was sampled,
yet the policy carries one: r_hat_DPO = beta log(pi / pi_ref) (up to the constant beta log Z):
  implicit - implicit[0] = {np.round(implicit - implicit[0], 2).tolist()}
  reward model - [0]     = {np.round(r_hat - r_hat[0], 2).tolist()}""")
check(dpo_true > ref_true + 0.2, f"DPO's true reward {dpo_true:.3f} should beat pi_ref's {ref_true:.3f}")
check(np.abs(p_dpo - optimum).max() < 0.01, f"DPO's policy {np.round(p_dpo, 3).tolist()} should be pi*")
check(np.array_equal(np.argsort(implicit), np.argsort(r_hat)),
      "DPO's implicit reward should rank the responses as the reward model does")
check(np.abs((implicit - implicit[0]) - (r_hat - r_hat[0])).max() < 0.05,
      "DPO's implicit reward should match the Bradley-Terry fit up to a constant")
print("""Both methods land near pi*: PPO by sampling and scoring with a reward model, DPO by a
logistic loss on the pairs whose margin is the difference of implicit rewards. On the real
model, python -m minillm finetune reward|ppo|dpo runs the same code on a GPT.""")
