"""From a language model to one that prefers what a rater prefers: sequence log-probabilities,
a reward model, PPO with a KL penalty (InstructGPT, Ouyang et al. 2022) and DPO (Rafailov et
al. 2023), each loss with its hand-written backward.

Notation. A prompt x, a response y = (y_1 .. y_n), a policy pi (the GPT being tuned) and a
frozen reference pi_ref (the SFT model, or the base). Tensors are laid out like a GPT's
input: ids (B, T) are prompt + response without its last token, targets (B, T) the next
tokens, -100 where the target is a prompt token (it does not count).

1. Sequence log-probability, the shared piece. With l = logits (B, T, V), m_t = [target_t
   counted] and p = softmax(l):

       log pi(y | x) = sum_t m_t log p_t[y_t]
       d/dl_tv       = m_t (onehot(y_t)_v - p_tv)          times the upstream dlogp (B,)

   The per-token version (B, T) is the same without the sum (PPO needs it per token).

2. Reward model (InstructGPT section 3.5). The GPT trunk and a scalar head read at the
   last counted token: r(x, y) = h_last . w + b, h the final hidden state (gpt's cache.xf).
   On pairs where the labeller preferred y_c to y_r (Bradley-Terry):

       loss = mean_b -log sigmoid(r_c - r_r)
       dr_c = -sigmoid(-(r_c - r_r)) / B,   dr_r = -dr_c

   It sees only the difference r_c - r_r: adding a constant to every reward changes nothing.
   (pool="sum" instead sums the head's scores over the response, r = sum_t m_t (h_t . w + b):
   a reward that adds up token by token, as the word-counting rater below does.)

3. PPO. Rollouts y ~ pi(. | x); per-token reward (Ziegler et al. 2019, InstructGPT):

       R_t = -beta_kl (log pi(y_t) - log pi_ref(y_t))   (+ r(x, y) at the last token)

   A value head V_t (the same scalar head, at every position, on the policy's trunk), and
   generalised advantage estimation (Schulman et al. 2016), with V = 0 after the last token:

       delta_t = R_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   G_t = A_t + V_t

   The advantages are whitened (zero mean, unit variance over the counted tokens). With
   rho_t = exp(log pi(y_t) - log pi_old(y_t)) (pi_old: the policy that sampled), the clipped
   surrogate and its gradient:

       L_clip = -sum_t m_t min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t) / sum_t m_t
       dL/dlogp_t = -m_t rho_t A_t [rho_t A_t <= clip(rho_t) A_t] / sum m

   so a token whose ratio has already moved past 1 + eps with A > 0 (or below 1 - eps with
   A < 0) gets no gradient: the step that improves it further is cut off. The value loss is
   clipped the same way around the old values (OpenAI's lm-human-preferences / PPO2):

       L_V = 1/2 sum_t m_t max((V_t - G_t)^2, (V_old + clip(V_t - V_old, -eps_v, eps_v) - G_t)^2) / sum m

   InstructGPT's objective adds a pretraining term (PPO-ptx): maximise
   E[r - beta_kl log(pi / pi_ref)] + gamma_ptx E_pretrain[log pi(x)], i.e. add gamma_ptx
   times the language-model loss on pretraining text to the loss.

   Why the KL penalty: the reward model is only right near the data it was trained on.
   Without the penalty the policy drifts to whatever text the reward model overrates
   (reward hacking); beta_kl KL(pi || pi_ref) keeps it close to where the reward is trusted.

4. DPO. The KL-penalised objective max E[r] - beta KL(pi || pi_ref) has the closed-form
   optimum pi*(y|x) = pi_ref(y|x) exp(r(x,y) / beta) / Z(x), so r = beta log(pi*/pi_ref) +
   beta log Z(x): the policy defines an implicit reward r_hat = beta (log pi - log pi_ref),
   and Z cancels in a Bradley-Terry comparison. With u = beta ((log pi_c - log pi_ref_c) -
   (log pi_r - log pi_ref_r)):

       loss = mean_b -log sigmoid(u),    d/dlog pi_c = -beta sigmoid(-u) / B = -d/dlog pi_r

   At policy == reference, u = 0: the loss is log 2 and the gradients are -+beta / (2 B).
   No reward model and no sampling: a classification loss on the preference pairs.

Numerics: -log sigmoid(u) = logaddexp(0, -u) and sigmoid(-u) = exp(-logaddexp(0, u)), so a
margin of +-1000 gives a finite loss and gradient (no exp overflow).

5. The rater. Human labellers are replaced by a program whose verdict can be checked:
   :func:`sentiment_score`, positive minus negative Shakespearean words (the DPO paper's
   IMDb setting, a word list instead of a sentiment classifier). Preference pairs are two
   samples of pi_ref for one prompt, the higher-scoring one chosen (ties dropped).

Reading order: the sequence log-probabilities, the reward and value heads on the GPT, the
losses (reward model, DPO, KL rewards, GAE, whitening, PPO, value), then the labeller,
rollouts and one training step of each method (reward_model_step, dpo_step, ppo_step), and
last the argument checks. The loops around those steps (pairs, judging, the frontier plot)
are the command ``python -m minillm finetune reward|ppo|dpo`` (minillm/cli/finetune_rl.py).

This file builds on the GPT (its trunk's hidden state, gpt.backward's dhidden), so it
imports minillm.gpt; gpt.py never imports it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import gpt
from .backend import (array_module, check_choice, check_float, check_int, check_number, check_same_device)
from .backprop import log_softmax

__all__ = ["token_logprobs_forward", "token_logprobs_backward", "sequence_logprobs_forward",
           "sequence_logprobs_backward", "init_head", "head_forward", "head_backward", "last_index",
           "pool_forward", "pool_backward", "response_mask",
           "reward_forward", "reward_backward", "value_forward", "value_backward",
           "reward_loss_forward", "reward_loss_backward", "kl_rewards", "gae", "whiten",
           "ppo_loss_forward", "ppo_loss_backward", "value_loss_forward", "value_loss_backward",
           "dpo_loss_forward", "dpo_loss_backward", "dpo_implicit_reward", "log_sigmoid",
           "POSITIVE", "NEGATIVE", "sentiment_score", "sequences", "rollout", "token_logprobs", "rewards_of",
           "reward_model_step", "dpo_step", "ppo_step"]

IGNORE = -100


# ---------------------------------------------------------------------------
# 1. Sequence log-probabilities
# ---------------------------------------------------------------------------

class LogprobCache(NamedTuple):
    probs: object        # (B, T, V) softmax of the logits
    targets: object      # (B, T) int, ignored positions replaced by 0
    counted: object      # (B, T) bool, False where the target was ignore_index


def token_logprobs_forward(logits, targets, ignore_index=IGNORE):
    """logp_t = log softmax(logits_t)[targets_t] where the target counts, 0 elsewhere.
    logits (B, T, V) float, targets (B, T) int -> logp (B, T), cache"""
    _check_logprobs(logits, targets, ignore_index)
    xp = array_module(logits)
    counted = targets != ignore_index                                          # (B, T)
    t = xp.where(counted, targets, 0)                                          # (B, T)
    logp_all = log_softmax(logits)                                             # (B, T, V)
    picked = xp.take_along_axis(logp_all, t[..., None], axis=-1)[..., 0]       # (B, T)
    logp = xp.where(counted, picked, 0.0).astype(logits.dtype)                 # (B, T)
    return logp, LogprobCache(xp.exp(logp_all), t, counted)


def token_logprobs_backward(dlogp, cache: LogprobCache):
    """dlogits_tv = dlogp_t m_t (onehot(y_t)_v - p_tv). dlogp (B, T) -> dlogits (B, T, V)"""
    probs, t, counted = cache
    xp = array_module(probs)
    g = xp.where(counted, dlogp, 0.0)[..., None]                               # (B, T, 1)
    onehot = xp.arange(probs.shape[-1]) == t[..., None]                       # (B, T, V) bool
    return (g * (onehot - probs)).astype(probs.dtype)                          # (B, T, V)


def sequence_logprobs_forward(logits, targets, ignore_index=IGNORE):
    """log pi(y | x) = sum over counted positions of log p(target).
    logits (B, T, V), targets (B, T) -> logp (B,), cache"""
    token_logp, cache = token_logprobs_forward(logits, targets, ignore_index)  # (B, T)
    return token_logp.sum(axis=1), cache                                       # (B,)


def sequence_logprobs_backward(dlogp, cache: LogprobCache):
    """The sum over T sends dlogp_b to every position of row b. dlogp (B,) -> dlogits (B, T, V)"""
    _check_dvector("dlogp", dlogp, cache.targets.shape[0])
    return token_logprobs_backward(dlogp[:, None], cache)


# ---------------------------------------------------------------------------
# 2. A scalar head on the GPT: the reward model and the value head
# ---------------------------------------------------------------------------

def init_head(config, dtype=np.float32, device=None):
    """{"head.w": (C,) zeros, "head.b": (1,) zeros}: a new head scores everything 0, so a
    value head starts neutral and a reward model starts with no preference."""
    from .backend import to_device
    return to_device({"head.w": np.zeros(config.n_embd, dtype=dtype),
                      "head.b": np.zeros(1, dtype=dtype)}, device)


class HeadCache(NamedTuple):
    hidden: object       # (B, T, C)
    w: object            # (C,)


def head_forward(hidden, head):
    """v_t = h_t . w + b at every position. hidden (B, T, C) -> v (B, T), cache"""
    _check_head(hidden, head)
    v = hidden @ head["head.w"] + head["head.b"][0]                            # (B, T)
    return v, HeadCache(hidden, head["head.w"])


def head_backward(dv, cache: HeadCache):
    """dh = dv w, dw = sum_bt dv h, db = sum dv. dv (B, T) -> dhidden (B, T, C), {head grads}"""
    hidden, w = cache
    dhidden = dv[..., None] * w                                                # (B, T, C)
    dw = (dv[..., None] * hidden).sum(axis=(0, 1))                             # (C,)
    return dhidden, {"head.w": dw, "head.b": dv.sum().reshape(1)}


def last_index(counted):
    """The index of the last True in each row of (B, T) bool (the last counted token)."""
    xp = array_module(counted)
    T = counted.shape[1]
    return T - 1 - xp.argmax(counted[:, ::-1], axis=1)                         # (B,)


class PoolCache(NamedTuple):
    counted: object      # (B, T) bool
    last: object         # (B,) int, the read position ("last"), or None ("sum")


def pool_forward(v, counted, pool="last"):
    """One score per row from per-position scores v (B, T): "last", v at the last counted
    position (InstructGPT's reward model); "sum", the sum over counted positions (a reward
    that adds up token by token, as a word-count rater does). -> r (B,), cache"""
    _check_pool(v, counted, pool)
    xp = array_module(v)
    if pool == "sum":
        return (v * counted).sum(axis=1), PoolCache(counted, None)
    last = last_index(counted)                                                 # (B,)
    return v[xp.arange(v.shape[0]), last], PoolCache(counted, last)


def pool_backward(dr, cache: PoolCache):
    """"last": dr goes to the read position only; "sum": to every counted one. -> dv (B, T)"""
    counted, last = cache
    xp = array_module(dr)
    if last is None:
        return dr[:, None] * counted
    return (xp.arange(counted.shape[1]) == last[:, None]) * dr[:, None]


class ScoreCache(NamedTuple):
    gpt: object          # GPTCache of the trunk
    head: object         # HeadCache
    pool: object         # PoolCache (reward) or None (value)


def reward_forward(params, config, head, idx, counted, pool="last"):
    """r(x, y) = the scalar head at the last counted position of each row (pool="sum": summed
    over the counted positions). idx (B, T) int, counted (B, T) bool -> r (B,), cache"""
    _check_counted(counted, idx)
    _, trunk = gpt.forward(params, config, idx)
    v, hc = head_forward(trunk.xf, head)                                       # (B, T)
    r, pc = pool_forward(v, counted, pool)                                     # (B,)
    return r, ScoreCache(trunk, hc, pc)


def reward_backward(dr, cache: ScoreCache):
    """dr (B,) -> (grads of the GPT params, grads of the head)"""
    trunk, hc, pc = cache
    dv = pool_backward(dr, pc).astype(hc.hidden.dtype)                         # (B, T)
    dhidden, head_grads = head_backward(dv, hc)
    return gpt.backward(None, trunk, dhidden=dhidden), head_grads


def value_forward(params, config, head, idx):
    """The policy's logits and its value head at every position, one trunk pass.
    -> logits (B, T, V), values (B, T), cache"""
    logits, trunk = gpt.forward(params, config, idx)
    v, hc = head_forward(trunk.xf, head)
    return logits, v, ScoreCache(trunk, hc, None)


def value_backward(dlogits, dvalues, cache: ScoreCache):
    """Both heads' gradients meet in the trunk's hidden state: gpt.backward(dlogits, dhidden).
    -> (grads of the GPT params, grads of the value head)"""
    dhidden, head_grads = head_backward(dvalues, cache.head)
    return gpt.backward(dlogits, cache.gpt, dhidden=dhidden), head_grads


# ---------------------------------------------------------------------------
# 3. The losses
# ---------------------------------------------------------------------------

def log_sigmoid(u):
    """log sigmoid(u) = -logaddexp(0, -u), finite for any finite u."""
    return -array_module(u).logaddexp(0.0, -u)


def _sigmoid_neg(u):
    """sigmoid(-u) = exp(-logaddexp(0, u)), no overflow at large |u|."""
    xp = array_module(u)
    return xp.exp(-xp.logaddexp(0.0, u))


class PairCache(NamedTuple):
    margin: object       # (B,) the difference the loss sees
    scale: float         # d margin / d chosen (1 for the reward model, beta for DPO)


def reward_loss_forward(r_chosen, r_rejected):
    """loss = mean(-log sigmoid(r_chosen - r_rejected)). r_* (B,) -> loss (0-d), cache"""
    _check_pair(r_chosen=r_chosen, r_rejected=r_rejected)
    margin = r_chosen - r_rejected                                             # (B,)
    return -log_sigmoid(margin).mean(), PairCache(margin, 1.0)


def reward_loss_backward(dloss, cache: PairCache):
    """d/dr_c = -dloss sigmoid(-margin) / B = -d/dr_r. -> (dr_chosen, dr_rejected), each (B,)"""
    margin, scale = cache
    dmargin = -dloss * _sigmoid_neg(margin) / margin.shape[0]                  # (B,)
    return scale * dmargin, -scale * dmargin


def dpo_loss_forward(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1):
    """loss = mean(-log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r)))), inputs (B,) sequence
    log-probabilities. -> loss (0-d), cache"""
    beta = _check_dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))   # (B,)
    return -log_sigmoid(margin).mean(), PairCache(margin, beta)


def dpo_loss_backward(dloss, cache: PairCache):
    """d/dpi_c = -dloss beta sigmoid(-u) / B = -d/dpi_r. -> (d_policy_chosen, d_policy_rejected)"""
    return reward_loss_backward(dloss, cache)   # the same Bradley-Terry loss, scaled by beta


def dpo_implicit_reward(policy_logp, ref_logp, beta=0.1):
    """r_hat(x, y) = beta (log pi(y|x) - log pi_ref(y|x)): the reward DPO's policy implies."""
    beta = check_number("beta", beta, lo=0.0, lo_open=True)
    return beta * (policy_logp - ref_logp)


def kl_rewards(logp, logp_ref, mask, scores, beta_kl=0.1):
    """R_t = -beta_kl (logp_t - logp_ref_t) on counted tokens, plus scores (B,) at each row's
    last counted token (the reward model's verdict on the whole response). -> (B, T)"""
    _check_kl_rewards(logp, logp_ref, mask, scores, beta_kl)
    xp = array_module(logp)
    m = mask.astype(logp.dtype)
    penalty = -beta_kl * (logp - logp_ref) * m                                 # (B, T)
    at_last = xp.arange(logp.shape[1]) == last_index(mask.astype(bool))[:, None]   # (B, T) bool
    return penalty + at_last * scores[:, None]                                 # (B, T)


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation, from the last token back.

    delta_t = r_t + gamma V_{t+1} - V_t with V = 0 after the last counted token,
    A_t = delta_t + gamma lam A_{t+1}, returns = A + V. Positions with mask 0 get A = 0 and
    are passed over (the next counted position follows the previous one).
    rewards, values, mask (B, T) -> advantages (B, T), returns (B, T)
    """
    _check_gae(rewards, values, mask, gamma, lam)
    xp = array_module(rewards)
    B, T = rewards.shape
    m = mask.astype(bool)
    advantages = xp.zeros_like(rewards)
    next_value = xp.zeros(B, dtype=rewards.dtype)     # V_{t+1}: 0 after the last token
    next_adv = xp.zeros(B, dtype=rewards.dtype)       # A_{t+1}
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        advantages[:, t] = xp.where(m[:, t], a, 0.0)
        next_value = xp.where(m[:, t], values[:, t], next_value)
        next_adv = xp.where(m[:, t], a, next_adv)
    returns = xp.where(m, advantages + values, 0.0)
    return advantages, returns


def whiten(x, mask, eps=1e-8):
    """(x - mean) / sqrt(var + eps) over the counted entries, 0 elsewhere (no gradient flows
    through advantages: they are targets)."""
    xp = array_module(x)
    m = mask.astype(bool)
    mean = x[m].mean()
    var = ((x[m] - mean) ** 2).mean()
    return xp.where(m, (x - mean) / xp.sqrt(var + eps), 0.0)


class PPOCache(NamedTuple):
    ratio: object        # (B, T) exp(logp - logp_old)
    advantages: object   # (B, T)
    unclipped: object    # (B, T) bool: the min picked rho A (the gradient flows)
    mask: object         # (B, T) float
    n: float             # sum(mask)


def ppo_loss_forward(logp, logp_old, advantages, mask, clip=0.2):
    """The clipped surrogate: -sum(mask min(rho A, clip(rho, 1-clip, 1+clip) A)) / sum(mask),
    rho = exp(logp - logp_old). All (B, T). -> loss (0-d), cache"""
    _check_ppo(logp, logp_old, advantages, mask, clip)
    xp = array_module(logp)
    m = mask.astype(logp.dtype)
    ratio = xp.exp(logp - logp_old)                                            # (B, T)
    plain = ratio * advantages
    clipped = xp.clip(ratio, 1.0 - clip, 1.0 + clip) * advantages
    unclipped = plain <= clipped
    n = float(m.sum())
    loss = -(m * xp.minimum(plain, clipped)).sum() / n
    return loss, PPOCache(ratio, advantages, unclipped, m, n)


def ppo_loss_backward(dloss, cache: PPOCache):
    """dlogp_t = -dloss m_t rho_t A_t [unclipped] / sum(mask) (d rho / d logp = rho; the clipped
    branch is constant in logp). -> dlogp (B, T)"""
    ratio, adv, unclipped, m, n = cache
    return -dloss * m * (unclipped * ratio * adv) / n


class ValueCache(NamedTuple):
    err: object          # (B, T) V - G
    err_clipped: object  # (B, T) V_clipped - G
    inside: object       # (B, T) bool: |V - V_old| < clip (V_clipped moves with V)
    use_plain: object    # (B, T) bool: the max picked the unclipped error
    mask: object
    n: float


def value_loss_forward(values, values_old, returns, mask, clip=0.2):
    """1/2 sum(mask max((V - G)^2, (V_old + clip(V - V_old, -clip, clip) - G)^2)) / sum(mask).
    All (B, T). -> loss (0-d), cache"""
    _check_value_loss(values, values_old, returns, mask, clip)
    xp = array_module(values)
    m = mask.astype(values.dtype)
    step = values - values_old
    v_clipped = values_old + xp.clip(step, -clip, clip)
    err, err_clipped = values - returns, v_clipped - returns
    use_plain = err ** 2 >= err_clipped ** 2
    n = float(m.sum())
    loss = 0.5 * (m * xp.maximum(err ** 2, err_clipped ** 2)).sum() / n
    return loss, ValueCache(err, err_clipped, xp.abs(step) < clip, use_plain, m, n)


def value_loss_backward(dloss, cache: ValueCache):
    """dV = dloss m (V - G) where the plain error won the max, else m (V_clip - G) [inside],
    over sum(mask). -> dvalues (B, T)"""
    err, err_clipped, inside, use_plain, m, n = cache
    g = array_module(err).where(use_plain, err, err_clipped * inside)
    return dloss * m * g / n


# ---------------------------------------------------------------------------
# 4. A rater that can be checked, rollouts, and one step of each method
# ---------------------------------------------------------------------------

# The labeller: a stand-in for the human raters, the DPO paper's IMDb sentiment setting
# with a word list instead of a classifier. A stem counts wherever it occurs, also inside a
# longer word ("lovely", "beloved"): a small character-level model spells roughly, and the
# rater should still see "dear" in "deary".
POSITIVE = ("love", "good", "sweet", "fair", "joy", "happ", "gentle", "noble", "kind", "bless", "dear",
            "merry", "grace", "honour", "peace", "hope", "glad", "smil", "friend", "true", "heaven",
            "beaut", "brave", "rich", "comfort", "mercy", "pleas", "best", "well", "fine", "thank", "sing")
NEGATIVE = ("death", "dead", "die", "kill", "hate", "blood", "curse", "foul", "vile", "grief", "woe",
            "villain", "false", "poison", "fear", "sorrow", "tear", "weep", "hell", "wretch", "murder",
            "sick", "plague", "shame", "traitor", "fool", "devil", "poor", "mad", "cruel", "ill", "bad",
            "not", "never")


def sentiment_score(text: str) -> float:
    """(occurrences of positive stems - occurrences of negative stems) in ``text``, lower-cased:
    the labeller's score.

    >>> sentiment_score("Sweet love and joy")
    3.0
    >>> sentiment_score("Not death, my lord!")
    -2.0
    """
    t = str(text).lower()
    return float(sum(t.count(w) for w in POSITIVE) - sum(t.count(w) for w in NEGATIVE))


def sequences(prompts, responses):
    """A GPT's (idx, targets) for prompt + response: idx (N, P + n - 1) the sequence without its
    last token, targets the next tokens with -100 on the prompt (only the response counts)."""
    _check_sequences(prompts, responses)
    xp = array_module(prompts)
    full = xp.concatenate([prompts, responses], axis=1)                       # (N, P + n)
    targets = full[:, 1:].copy()
    targets[:, :prompts.shape[1] - 1] = IGNORE                                 # predicting prompt tokens
    return full[:, :-1], targets


def rollout(params, config, prompts, n_new, seed, temperature=1.0):
    """n_new sampled tokens after each prompt (all prompts of one length). -> (N, n_new) int"""
    out = gpt.generate(params, config, [list(map(int, p)) for p in prompts], n_new,
                       temperature=temperature, seed=seed)
    return np.array([row[prompts.shape[1]:] for row in out], dtype=np.int64)


def token_logprobs(params, config, idx, targets, batch_size=64):
    """log pi(target_t) per token, no gradient, in chunks. -> (N, T)"""
    xp = array_module(params["wte"])
    rows = [token_logprobs_forward(gpt.forward(params, config, xp.asarray(idx[i:i + batch_size]))[0],
                                   xp.asarray(targets[i:i + batch_size]))[0]
            for i in range(0, idx.shape[0], batch_size)]
    return xp.concatenate(rows)


def response_mask(shape, prompt_len, xp=np):
    """(N, L) bool: True on the response of whole sequences prompt + response."""
    return xp.broadcast_to(xp.arange(shape[1]) >= prompt_len, tuple(shape))


def rewards_of(params, config, head, full, prompt_len, pool="last", batch_size=64):
    """The reward model's score of each whole sequence (N, P + n). -> (N,)"""
    xp = array_module(params["wte"])
    out = []
    for i in range(0, full.shape[0], batch_size):
        chunk = xp.asarray(full[i:i + batch_size])
        out.append(reward_forward(params, config, head, chunk, response_mask(chunk.shape, prompt_len, xp), pool)[0])
    return xp.concatenate(out)


def reward_model_step(params, config, head, chosen, rejected, prompt_len=1, pool="last"):
    """The reward model's loss and gradient on a batch of pairs of whole sequences (B, L), the
    response after prompt_len tokens. -> (loss, accuracy on the batch, {GPT grads, head grads})"""
    xp = array_module(chosen)
    both = xp.concatenate([chosen, rejected])                                  # (2B, L)
    r, cache = reward_forward(params, config, head, both, response_mask(both.shape, prompt_len, xp), pool)
    B = chosen.shape[0]
    loss, lcache = reward_loss_forward(r[:B], r[B:])
    dr_c, dr_r = reward_loss_backward(1.0, lcache)
    grads, head_grads = reward_backward(xp.concatenate([dr_c, dr_r]), cache)
    return float(loss), float((r[:B] > r[B:]).mean()), {**grads, **head_grads}


def dpo_step(params, config, idx_c, tgt_c, idx_r, tgt_r, ref_c, ref_r, beta=0.1):
    """DPO's loss and gradient on a batch of pairs: one GPT pass over chosen and rejected
    together. -> (loss, implicit-reward accuracy, grads)"""
    xp = array_module(idx_c)
    B = idx_c.shape[0]
    logits, trunk = gpt.forward(params, config, xp.concatenate([idx_c, idx_r]))
    logp, lcache = sequence_logprobs_forward(logits, xp.concatenate([tgt_c, tgt_r]))   # (2B,)
    loss, dcache = dpo_loss_forward(logp[:B], logp[B:], ref_c, ref_r, beta=beta)
    d_c, d_r = dpo_loss_backward(1.0, dcache)
    grads = gpt.backward(sequence_logprobs_backward(xp.concatenate([d_c, d_r]), lcache), trunk)
    return float(loss), float((dcache.margin > 0).mean()), grads


def ppo_step(params, config, head, batch, clip=0.2, vf_coef=0.1, vf_clip=0.2):
    """PPO's loss on a minibatch of rollouts and the gradient of policy and value head.
    batch: idx, targets, mask, logp_old, values_old, advantages (whitened), returns.
    -> (policy loss, value loss, {GPT grads, head grads})"""
    idx, targets, mask, logp_old, v_old, adv, ret = batch
    logits, values, cache = value_forward(params, config, head, idx)
    logp, lcache = token_logprobs_forward(logits, targets)                     # (B, T)
    lp, pcache = ppo_loss_forward(logp, logp_old, adv, mask, clip=clip)
    lv, vcache = value_loss_forward(values, v_old, ret, mask, clip=vf_clip)
    dlogits = token_logprobs_backward(ppo_loss_backward(1.0, pcache), lcache)
    grads, head_grads = value_backward(dlogits, value_loss_backward(vf_coef, vcache), cache)
    return float(lp), float(lv), {**grads, **head_grads}


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------

def _check_logprobs(logits, targets, ignore_index):
    check_float("logits", logits)
    check_int("targets", targets)
    if logits.ndim != 3:
        raise ValueError(f"logits: expected shape (B, T, V), got {tuple(logits.shape)}")
    if tuple(targets.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"targets: expected shape {tuple(logits.shape[:2])} (logits' (B, T)), "
                         f"got {tuple(targets.shape)}")
    check_same_device("targets", targets, logits, "logits")
    xp = array_module(logits)
    V = logits.shape[-1]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(xp.any(bad)):
        raise ValueError(f"targets: expected ids in [0, {V}) or ignore_index={ignore_index}, "
                         f"got {int(targets[bad][0])}")


def _check_dvector(name, x, B):
    check_float(name, x)
    if tuple(x.shape) != (B,):
        raise ValueError(f"{name}: expected shape ({B},), one per sequence, got {tuple(x.shape)}")


def _check_head(hidden, head):
    check_float("hidden", hidden)
    if hidden.ndim != 3:
        raise ValueError(f"hidden: expected shape (B, T, C), got {tuple(hidden.shape)}")
    if not isinstance(head, dict) or set(head) != {"head.w", "head.b"}:
        raise ValueError(f"head: expected a dict with 'head.w' and 'head.b' (init_head), got "
                         f"{sorted(head) if isinstance(head, dict) else type(head).__name__}")
    C = hidden.shape[-1]
    if tuple(head["head.w"].shape) != (C,) or tuple(head["head.b"].shape) != (1,):
        raise ValueError(f"head: expected head.w ({C},) and head.b (1,), got "
                         f"{tuple(head['head.w'].shape)} and {tuple(head['head.b'].shape)}")


def _check_counted(counted, idx):
    if not hasattr(counted, "dtype") or counted.dtype != bool or tuple(counted.shape) != tuple(idx.shape):
        raise ValueError(f"counted: expected a bool array of shape {tuple(idx.shape)} (that of idx), got "
                         f"{getattr(counted, 'dtype', type(counted).__name__)} "
                         f"{tuple(getattr(counted, 'shape', ()))}")
    if not bool(counted.any(axis=1).all()):
        raise ValueError("counted: every row needs at least one counted token to read the reward at")


def _check_same_shape(**arrays):
    (name0, a0), *rest = arrays.items()
    for name, a in rest:
        check_float(name, a)
        if tuple(a.shape) != tuple(a0.shape):
            raise ValueError(f"{name}: expected shape {tuple(a0.shape)} (that of {name0}), got {tuple(a.shape)}")


def _check_pair(**arrays):
    (name0, a0), *_ = arrays.items()
    check_float(name0, a0)
    if a0.ndim != 1 or a0.shape[0] < 1:
        raise ValueError(f"{name0}: expected shape (B,) with B >= 1, got {tuple(a0.shape)}")
    _check_same_shape(**arrays)


def _check_dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    _check_pair(policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen,
                ref_rejected=ref_rejected)
    return check_number("beta", beta, lo=0.0, lo_open=True)


def _check_mask(mask, like):
    if not hasattr(mask, "shape") or tuple(mask.shape) != tuple(like.shape):
        raise ValueError(f"mask: expected shape {tuple(like.shape)}, got "
                         f"{tuple(getattr(mask, 'shape', ())) if hasattr(mask, 'shape') else type(mask).__name__}")
    if not bool((mask != 0).any()):
        raise ValueError("mask: expected at least one counted position, got none")


def _check_kl_rewards(logp, logp_ref, mask, scores, beta_kl):
    check_float("logp", logp)
    if logp.ndim != 2:
        raise ValueError(f"logp: expected shape (B, T), got {tuple(logp.shape)}")
    _check_same_shape(logp=logp, logp_ref=logp_ref)
    _check_mask(mask, logp)
    _check_dvector("scores", scores, logp.shape[0])
    check_number("beta_kl", beta_kl, lo=0.0)
    if not bool((mask != 0).any(axis=1).all()):
        raise ValueError("mask: every row needs at least one counted token (where its score goes)")


def _check_gae(rewards, values, mask, gamma, lam):
    check_float("rewards", rewards)
    if rewards.ndim != 2:
        raise ValueError(f"rewards: expected shape (B, T), got {tuple(rewards.shape)}")
    _check_same_shape(rewards=rewards, values=values)
    _check_mask(mask, rewards)
    check_number("gamma", gamma, lo=0.0, hi=1.0)
    check_number("lam", lam, lo=0.0, hi=1.0)


def _check_ppo(logp, logp_old, advantages, mask, clip):
    check_float("logp", logp)
    _check_same_shape(logp=logp, logp_old=logp_old, advantages=advantages)
    _check_mask(mask, logp)
    check_number("clip", clip, lo=0.0, hi=1.0, lo_open=True, hi_open=True)


def _check_value_loss(values, values_old, returns, mask, clip):
    check_float("values", values)
    _check_same_shape(values=values, values_old=values_old, returns=returns)
    _check_mask(mask, values)
    check_number("clip", clip, lo=0.0, lo_open=True)


def _check_sequences(prompts, responses):
    check_int("prompts", prompts)
    check_int("responses", responses)
    if prompts.ndim != 2 or prompts.shape[1] < 1:
        raise ValueError(f"prompts: expected shape (N, P) with P >= 1, got {tuple(prompts.shape)}")
    if responses.ndim != 2 or responses.shape[0] != prompts.shape[0] or responses.shape[1] < 1:
        raise ValueError(f"responses: expected shape ({prompts.shape[0]}, n) with n >= 1 (one row per "
                         f"prompt), got {tuple(responses.shape)}")


def _check_pool(v, counted, pool):
    check_choice("pool", pool, ("last", "sum"))
    if not hasattr(counted, "dtype") or counted.dtype != bool or tuple(counted.shape) != tuple(v.shape):
        raise ValueError(f"counted: expected a bool array of shape {tuple(v.shape)}, got "
                         f"{getattr(counted, 'dtype', type(counted).__name__)} {tuple(getattr(counted, 'shape', ()))}")
    if not bool(counted.any(axis=1).all()):
        raise ValueError("counted: every row needs at least one counted token to read the reward at")
