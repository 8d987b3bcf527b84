"""minillm.rlhf: sequence log-probabilities, the reward and value heads on the GPT, the reward
model's loss, GAE, the PPO surrogate and value loss, DPO; each backward by finite differences,
and the properties the losses must have."""
import math

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from helpers import assert_alive, assert_close, assert_gradcheck, scaled
from minillm import gpt, rlhf
from minillm.backprop import check_dict_gradients, gradcheck
from strategies import randn, seeds


def test_doctests():
    import doctest
    result = doctest.testmod(rlhf, verbose=False)
    assert result.attempted >= 2 and result.failed == 0


def _targets(seed, B, T, V, prompt_len=None):
    """Random targets, -100 on a random prompt prefix of each row (at least one counted)."""
    rng = np.random.default_rng(seed)
    t = rng.integers(0, V, (B, T))
    cut = rng.integers(0, T, B) if prompt_len is None else np.full(B, prompt_len)
    t[np.arange(T)[None, :] < cut[:, None]] = -100
    return t


# ---------------------------------------------------------------------------
# Sequence log-probabilities
# ---------------------------------------------------------------------------

@given(seed=seeds, B=st.integers(1, 3), T=st.integers(2, 5), V=st.integers(2, 6))
@example(seed=0, B=2, T=3, V=4)
def test_sequence_logprobs_backward_matches_finite_differences(seed, B, T, V):
    logits = randn(seed, B, T, V)
    targets = _targets(seed + 1, B, T, V)
    logp, cache = rlhf.sequence_logprobs_forward(logits, targets)
    assert logp.shape == (B,) and np.all(logp <= 0)
    assert_alive([rlhf.sequence_logprobs_backward(np.ones(B), cache)], counted=(targets != -100).sum())
    report = gradcheck(lambda x: rlhf.sequence_logprobs_forward(x, targets), rlhf.sequence_logprobs_backward,
                       [logits], seed=seed)
    assert_gradcheck(report)
    report = gradcheck(lambda x: rlhf.token_logprobs_forward(x, targets), rlhf.token_logprobs_backward,
                       [logits], seed=seed)
    assert_gradcheck(report)


@given(seed=seeds, B=st.integers(1, 3), T=st.integers(2, 5), V=st.integers(2, 6))
def test_sequence_logprobs_match_torch_log_softmax_gather(seed, B, T, V):
    torch = pytest.importorskip("torch")
    logits = randn(seed, B, T, V) * 3
    targets = _targets(seed + 1, B, T, V)
    counted = targets != -100
    lt = torch.tensor(logits, requires_grad=True)
    picked = torch.log_softmax(lt, -1).gather(-1, torch.tensor(np.where(counted, targets, 0))[..., None])[..., 0]
    ref = (picked * torch.tensor(counted, dtype=torch.float64)).sum(-1)
    dlogp = randn(seed + 2, B)
    ref.backward(torch.tensor(dlogp))
    logp, cache = rlhf.sequence_logprobs_forward(logits, targets)
    assert_close(logp, ref.detach().numpy(), rtol=1e-12, atol=1e-12)
    assert_close(rlhf.sequence_logprobs_backward(dlogp, cache), lt.grad.numpy(), rtol=1e-10, atol=1e-12)


@given(seed=seeds, B=st.integers(1, 5), beta=st.floats(0.05, 2.0))
def test_dpo_loss_matches_torch_logsigmoid_autograd(seed, B, beta):
    torch = pytest.importorskip("torch")
    pc, pr, rc, rr = (randn(seed + k, B) * 3 for k in range(4))
    tc, tr = torch.tensor(pc, requires_grad=True), torch.tensor(pr, requires_grad=True)
    ref = -torch.nn.functional.logsigmoid(beta * ((tc - torch.tensor(rc)) - (tr - torch.tensor(rr)))).mean()
    ref.backward()
    loss, cache = rlhf.dpo_loss_forward(pc, pr, rc, rr, beta=beta)
    dc, dr = rlhf.dpo_loss_backward(1.0, cache)
    assert math.isclose(float(loss), ref.item(), rel_tol=1e-12, abs_tol=1e-15)
    assert_close(dc, tc.grad.numpy(), rtol=1e-10, atol=1e-15)
    assert_close(dr, tr.grad.numpy(), rtol=1e-10, atol=1e-15)


def _tiny_gpt(seed, pos="learned"):
    cfg = gpt.GPTConfig(vocab_size=7, block_size=8, n_layer=1, n_head=2, n_embd=4, pos=pos)
    params = gpt.init_params(cfg, seed=seed % 1000, dtype=np.float64)
    rng = np.random.default_rng(seed)
    for k in params:                      # larger weights than GPT-2's init: every path carries signal
        params[k] = params[k] + rng.standard_normal(params[k].shape) * 0.3
    return cfg, params


def _head(seed, C):
    rng = np.random.default_rng(seed)
    return {"head.w": rng.standard_normal(C), "head.b": rng.standard_normal(1)}


@settings(max_examples=scaled(4))
@given(seed=seeds, B=st.integers(1, 2), T=st.integers(2, 5), pos=st.sampled_from(["learned", "rope"]))
@example(seed=0, B=2, T=4, pos="learned")
def test_sequence_logprob_gradient_through_the_gpt(seed, B, T, pos):
    cfg, params = _tiny_gpt(seed, pos)
    idx = np.random.default_rng(seed).integers(0, 7, (B, T))
    targets = _targets(seed + 1, B, T, 7)
    dlogp = randn(seed + 2, B)
    logits, trunk = gpt.forward(params, cfg, idx)
    _, cache = rlhf.sequence_logprobs_forward(logits, targets)
    grads = gpt.backward(rlhf.sequence_logprobs_backward(dlogp, cache), trunk)

    def f(p):
        return rlhf.sequence_logprobs_forward(gpt.forward(p, cfg, idx)[0], targets)[0] * dlogp

    assert_gradcheck(check_dict_gradients(f, params, grads, max_checks_per_param=4, seed=seed))


@settings(max_examples=scaled(4))
@given(seed=seeds, B=st.integers(1, 3), T=st.integers(2, 5), pool=st.sampled_from(["last", "sum"]))
@example(seed=0, B=2, T=4, pool="last")
@example(seed=0, B=2, T=4, pool="sum")
def test_reward_model_gradient_through_the_head_and_the_gpt(seed, B, T, pool):
    cfg, params = _tiny_gpt(seed)
    head = _head(seed + 1, cfg.n_embd)
    idx = np.random.default_rng(seed).integers(0, 7, (B, T))
    counted = _targets(seed + 2, B, T, 7) != -100
    counted[np.arange(B), np.random.default_rng(seed).integers(0, T, B)] = False   # ragged: right padding
    counted[:, 0] = True
    r, cache = rlhf.reward_forward(params, cfg, head, idx, counted, pool=pool)
    last = rlhf.last_index(counted)
    assert all(counted[b, last[b]] and not counted[b, last[b] + 1:].any() for b in range(B))
    _, trunk = gpt.forward(params, cfg, idx)
    v = trunk.xf @ head["head.w"] + head["head.b"][0]                       # (B, T) per-position scores
    assert_close(r, v[np.arange(B), last] if pool == "last" else (v * counted).sum(1))
    dr = randn(seed + 3, B)
    grads, head_grads = rlhf.reward_backward(dr, cache)
    both = {**params, **head}

    def f(p):
        trunk_p = {k: p[k] for k in params}
        return rlhf.reward_forward(trunk_p, cfg, {k: p[k] for k in head}, idx, counted, pool=pool)[0] * dr

    assert_gradcheck(check_dict_gradients(f, both, {**grads, **head_grads}, max_checks_per_param=4, seed=seed))


@settings(max_examples=scaled(4))
@given(seed=seeds, B=st.integers(1, 2), T=st.integers(2, 5))
@example(seed=0, B=2, T=4)
def test_ppo_and_value_losses_through_the_shared_trunk(seed, B, T):
    """The policy's token log-probabilities and its value head share one trunk: the PPO
    surrogate plus the value loss, back through gpt.backward(dlogits, dhidden)."""
    cfg, params = _tiny_gpt(seed)
    head = _head(seed + 1, cfg.n_embd)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, 7, (B, T))
    targets = _targets(seed + 2, B, T, 7)
    mask = (targets != -100).astype(np.float64)
    logp_old = rng.uniform(-3, -1, (B, T))        # far from logp: some ratios clip, some not
    adv, returns, v_old = (randn(seed + k, B, T) for k in (3, 4, 5))

    def loss(p, with_grads=False):
        trunk_p, head_p = {k: p[k] for k in params}, {k: p[k] for k in head}
        logits, values, cache = rlhf.value_forward(trunk_p, cfg, head_p, idx)
        logp, lcache = rlhf.token_logprobs_forward(logits, targets)
        lp, pcache = rlhf.ppo_loss_forward(logp, logp_old, adv, mask, clip=0.2)
        lv, vcache = rlhf.value_loss_forward(values, v_old, returns, mask, clip=10.0)
        if not with_grads:   # the loss's terms, one per token (unaffected ones cancel exactly)
            rho = np.exp(logp - logp_old)
            ppo = -mask * np.minimum(rho * adv, np.clip(rho, 0.8, 1.2) * adv) / mask.sum()
            vc = v_old + np.clip(values - v_old, -10.0, 10.0)
            val = 0.25 * mask * np.maximum((values - returns) ** 2, (vc - returns) ** 2) / mask.sum()
            assert math.isclose(ppo.sum() + val.sum(), lp + 0.5 * lv, rel_tol=1e-12)
            return np.concatenate([ppo.ravel(), val.ravel()])
        dlogits = rlhf.token_logprobs_backward(rlhf.ppo_loss_backward(1.0, pcache), lcache)
        return rlhf.value_backward(dlogits, rlhf.value_loss_backward(0.5, vcache), cache)

    grads, head_grads = loss({**params, **head}, with_grads=True)
    assert_alive(head_grads)
    assert_gradcheck(check_dict_gradients(loss, {**params, **head}, {**grads, **head_grads},
                                          max_checks_per_param=4, seed=seed))


@settings(max_examples=scaled(3))
@given(seed=seeds, B=st.integers(1, 2), beta=st.floats(0.05, 1.0))
@example(seed=0, B=2, beta=0.1)
def test_dpo_and_reward_model_steps_match_finite_differences(seed, B, beta):
    """The training steps: DPO through one GPT pass over chosen and rejected, and the reward
    model's Bradley-Terry loss through head and trunk."""
    cfg, params = _tiny_gpt(seed)
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, 7, (B, 2))
    ic, tc = rlhf.sequences(prompts, rng.integers(0, 7, (B, 3)))
    ir, tr = rlhf.sequences(prompts, rng.integers(0, 7, (B, 3)))
    ref_c, ref_r = randn(seed + 1, B) - 5, randn(seed + 2, B) - 5
    loss, _, grads = rlhf.dpo_step(params, cfg, ic, tc, ir, tr, ref_c, ref_r, beta=beta)

    def dpo_terms(p):       # the loss pair by pair (terms that do not move cancel exactly)
        lp = rlhf.sequence_logprobs_forward(gpt.forward(p, cfg, np.r_[ic, ir])[0], np.r_[tc, tr])[0]
        return -rlhf.log_sigmoid(beta * ((lp[:B] - ref_c) - (lp[B:] - ref_r))) / B

    assert math.isclose(dpo_terms(params).sum(), loss, rel_tol=1e-12)
    assert_gradcheck(check_dict_gradients(dpo_terms, params, grads, max_checks_per_param=3, seed=seed))
    head = _head(seed + 3, cfg.n_embd)
    full_c, full_r = np.c_[ic, tc[:, -1]], np.c_[ir, tr[:, -1]]
    pool = "sum" if seed % 2 else "last"
    loss, _, g = rlhf.reward_model_step(params, cfg, head, full_c, full_r, prompt_len=2, pool=pool)

    def rm_terms(p):
        counted = np.arange(full_c.shape[1])[None, :].repeat(2 * B, 0) >= 2      # the response
        r = rlhf.reward_forward({k: p[k] for k in params}, cfg, {k: p[k] for k in head}, np.r_[full_c, full_r],
                                counted, pool=pool)[0]
        return -rlhf.log_sigmoid(r[:B] - r[B:]) / B

    assert math.isclose(rm_terms({**params, **head}).sum(), loss, rel_tol=1e-12)
    assert_gradcheck(check_dict_gradients(rm_terms, {**params, **head}, g, max_checks_per_param=3, seed=seed))


@given(seed=seeds, B=st.integers(1, 3), T=st.integers(2, 5), pool=st.sampled_from(["last", "sum"]))
def test_pool_backward_matches_finite_differences(seed, B, T, pool):
    counted = _targets(seed, B, T, 3) != -100
    rep = gradcheck(lambda v: rlhf.pool_forward(v, counted, pool), rlhf.pool_backward, [randn(seed, B, T)], seed=seed)
    assert_gradcheck(rep)
    with pytest.raises(ValueError, match="pool"):
        rlhf.pool_forward(randn(seed, B, T), counted, "mean")


def test_head_backward_matches_finite_differences():
    hidden = randn(0, 2, 3, 4)
    head = _head(1, 4)
    dv = randn(2, 2, 3)
    v, cache = rlhf.head_forward(hidden, head)
    dhidden, grads = rlhf.head_backward(dv, cache)
    assert_gradcheck(check_dict_gradients(lambda h: rlhf.head_forward(hidden, h)[0] * dv, head, grads))
    assert_gradcheck(gradcheck(lambda x: rlhf.head_forward(x, head), lambda d, c: rlhf.head_backward(d, c)[0],
                               [hidden]))


# ---------------------------------------------------------------------------
# The pair losses: reward model and DPO
# ---------------------------------------------------------------------------

@given(seed=seeds, B=st.integers(1, 6), beta=st.floats(0.01, 2.0))
@example(seed=0, B=3, beta=0.1)
def test_pair_losses_backward_match_finite_differences(seed, B, beta):
    rc, rr, refc, refr = (randn(seed + k, B) * 2 for k in range(4))
    assert_gradcheck(gradcheck(rlhf.reward_loss_forward, rlhf.reward_loss_backward, [rc, rr], seed=seed))
    assert_gradcheck(gradcheck(lambda a, b, c, d: rlhf.dpo_loss_forward(a, b, c, d, beta=beta),
                               rlhf.dpo_loss_backward, [rc, rr, refc, refr], wrt=[0, 1], seed=seed))


@given(seed=seeds, B=st.integers(1, 6), beta=st.floats(0.01, 2.0))
def test_dpo_at_the_reference_is_log2_with_gradients_beta_over_2B(seed, B, beta):
    """policy == reference: u = 0, loss = log 2; d/dpi_c = -beta sigmoid(0) / B = -beta / (2B)
    (the per-example +-beta/2 of the issue, over B for the batch mean), and +beta / (2B) for pi_r."""
    pc, pr = randn(seed, B) - 5, randn(seed + 1, B) - 5
    loss, cache = rlhf.dpo_loss_forward(pc, pr, pc.copy(), pr.copy(), beta=beta)
    assert math.isclose(float(loss), math.log(2), rel_tol=1e-12)
    dc, dr = rlhf.dpo_loss_backward(1.0, cache)
    assert_close(dc, np.full(B, -beta / (2 * B)), rtol=1e-12)
    assert_close(dr, np.full(B, beta / (2 * B)), rtol=1e-12)


@given(seed=seeds, B=st.integers(1, 5), shift=st.floats(-50, 50), beta=st.floats(0.05, 1.0))
def test_pair_losses_depend_only_on_differences(seed, B, shift, beta):
    rc, rr, refc, refr = (randn(seed + k, B) for k in range(4))
    base = float(rlhf.reward_loss_forward(rc, rr)[0])
    assert math.isclose(float(rlhf.reward_loss_forward(rc + shift, rr + shift)[0]), base, rel_tol=1e-9, abs_tol=1e-12)
    per_pair = randn(seed + 5, B) * 10            # a different shift for each pair: still the same loss
    assert math.isclose(float(rlhf.reward_loss_forward(rc + per_pair, rr + per_pair)[0]), base, rel_tol=1e-9)
    dpo = float(rlhf.dpo_loss_forward(rc, rr, refc, refr, beta)[0])
    # shifting a policy log-prob and its reference together, or both of a pair's, changes nothing
    assert math.isclose(float(rlhf.dpo_loss_forward(rc + per_pair, rr, refc + per_pair, refr, beta)[0]), dpo,
                        rel_tol=1e-9)
    assert math.isclose(float(rlhf.dpo_loss_forward(rc + shift, rr + shift, refc, refr, beta)[0]), dpo, rel_tol=1e-9)
    # and the DPO loss is the reward-model loss of the implicit rewards beta (log pi - log pi_ref)
    implied = rlhf.reward_loss_forward(rlhf.dpo_implicit_reward(rc, refc, beta),
                                       rlhf.dpo_implicit_reward(rr, refr, beta))[0]
    assert math.isclose(float(implied), dpo, rel_tol=1e-12)


@pytest.mark.parametrize("margin", [1000.0, -1000.0, 1e6, -1e6])
def test_pair_losses_are_stable_at_huge_margins(margin):
    with np.errstate(over="raise", invalid="raise", divide="raise"):   # underflow to 0 is right
        z = np.zeros(2)
        loss, cache = rlhf.dpo_loss_forward(np.full(2, margin / 0.1), z, z, z, beta=0.1)
        dc, dr = rlhf.dpo_loss_backward(1.0, cache)
        rl, rcache = rlhf.reward_loss_forward(np.full(2, margin), z)
        drc, _ = rlhf.reward_loss_backward(1.0, rcache)
    for value, want in ((float(loss), max(-margin, 0.0)), (float(rl), max(-margin, 0.0))):
        assert math.isfinite(value) and math.isclose(value, want, rel_tol=1e-9, abs_tol=1e-12)
    # a pair already far right gets no push; one far wrong gets the full beta / B
    want = 0.0 if margin > 0 else -0.1 / 2
    assert np.all(np.isfinite(dc)) and np.allclose(dc, want, atol=1e-300) and np.allclose(dr, -dc)
    assert np.allclose(drc, 0.0 if margin > 0 else -0.5, atol=1e-300)


# ---------------------------------------------------------------------------
# PPO: rewards, GAE, whitening, the surrogate, the value loss
# ---------------------------------------------------------------------------

def _response_mask(seed, B, T):
    """1 on each row's response: a prompt prefix of random length, then at least one token."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, T, B)
    return (np.arange(T)[None, :] >= start[:, None]).astype(np.float64)


def _gae_by_the_definition(rewards, values, mask, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l} over the row's counted positions, written out."""
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        pos = np.flatnonzero(mask[b])
        v = np.r_[values[b, pos], 0.0]                     # V = 0 after the last token
        delta = rewards[b, pos] + gamma * v[1:] - v[:-1]
        for i, t in enumerate(pos):
            adv[b, t] = sum((gamma * lam) ** l * delta[i + l] for l in range(len(pos) - i))
    return adv, np.where(mask > 0, adv + values, 0.0)


@given(seed=seeds, B=st.integers(1, 3), T=st.integers(2, 6), gamma=st.floats(0.5, 1.0), lam=st.floats(0.0, 1.0),
       holes=st.booleans())
@example(seed=0, B=2, T=5, gamma=1.0, lam=0.95, holes=False)
def test_gae_is_the_discounted_sum_of_td_errors(seed, B, T, gamma, lam, holes):
    rewards, values = randn(seed, B, T), randn(seed + 1, B, T)
    mask = _response_mask(seed, B, T)
    if holes:                                    # padding inside a row is passed over
        mask[:, -1] = 1.0
        mask[np.random.default_rng(seed).random((B, T)) < 0.3] = 0.0
        mask[:, -1] = 1.0
    adv, ret = rlhf.gae(rewards, values, mask, gamma=gamma, lam=lam)
    want_adv, want_ret = _gae_by_the_definition(rewards, values, mask, gamma, lam)
    assert_close(adv, want_adv, rtol=1e-10, atol=1e-12)
    assert_close(ret, want_ret, rtol=1e-10, atol=1e-12)


@given(seed=seeds, B=st.integers(1, 3), T=st.integers(2, 6))
def test_gae_with_lam_1_gamma_1_returns_the_sum_of_future_rewards(seed, B, T):
    rewards, values = randn(seed, B, T), randn(seed + 1, B, T)
    mask = _response_mask(seed, B, T)
    _, ret = rlhf.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    future = np.cumsum((rewards * mask)[:, ::-1], axis=1)[:, ::-1]        # sum_{k >= t} r_k
    assert_close(ret, future * mask, rtol=1e-10, atol=1e-12)


def test_kl_rewards_put_the_score_on_the_last_token():
    logp, logp_ref = randn(0, 2, 5), randn(1, 2, 5)
    mask = np.array([[0, 1, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=float)   # row 0 ends early (right padding)
    scores = np.array([3.0, -2.0])
    r = rlhf.kl_rewards(logp, logp_ref, mask, scores, beta_kl=0.2)
    assert_close(r.sum(1), scores - 0.2 * ((logp - logp_ref) * mask).sum(1))
    assert r[0, -1] == 0.0 and math.isclose(r[0, -2], scores[0] - 0.2 * (logp[0, -2] - logp_ref[0, -2]))


def test_whiten_gives_zero_mean_unit_variance_on_the_counted_entries():
    x, mask = randn(0, 3, 6) * 5 + 2, _response_mask(1, 3, 6)
    w = rlhf.whiten(x, mask)
    m = mask > 0
    assert abs(w[m].mean()) < 1e-12 and abs(w[m].std() - 1) < 1e-6 and not w[~m].any()


def _away_from(x, points, gap=1e-3):
    """x nudged so that no entry sits within gap of a point where the loss has a kink."""
    for p in points:
        x = np.where(np.abs(x - p) < gap, p + 2 * gap, x)
    return x


@given(seed=seeds, B=st.integers(1, 3), T=st.integers(2, 5), clip=st.floats(0.05, 0.5))
@example(seed=0, B=2, T=4, clip=0.2)
def test_ppo_and_value_loss_backward_match_finite_differences(seed, B, T, clip):
    logp_old = randn(seed, B, T)
    logp = logp_old + _away_from(randn(seed + 1, B, T) * 0.4, [np.log1p(clip), np.log1p(-clip)])
    adv = randn(seed + 2, B, T)
    mask = _response_mask(seed, B, T)
    assert_gradcheck(gradcheck(lambda lp: rlhf.ppo_loss_forward(lp, logp_old, adv, mask, clip=clip),
                               rlhf.ppo_loss_backward, [logp], seed=seed))
    v_old, ret = randn(seed + 3, B, T), randn(seed + 4, B, T)
    values = v_old + _away_from(randn(seed + 5, B, T), [clip, -clip])
    values = np.where(np.abs(np.abs(values - ret) - np.abs(v_old + np.clip(values - v_old, -clip, clip) - ret))
                      < 1e-3, values + 1e-2, values)                       # off the max's kink too
    assert_gradcheck(gradcheck(lambda v: rlhf.value_loss_forward(v, v_old, ret, mask, clip=clip),
                               rlhf.value_loss_backward, [values], seed=seed))


@given(seed=seeds, clip=st.floats(0.05, 0.5))
def test_ppo_gradient_is_zero_where_the_ratio_is_clipped_in_the_advantages_direction(seed, clip):
    """rho > 1 + eps with A > 0, or rho < 1 - eps with A < 0: the step already went far enough,
    no gradient. rho past the other side of the interval keeps its gradient (the min picks rho A)."""
    rng = np.random.default_rng(seed)
    logp_old = rng.standard_normal((1, 4))
    up, down = np.log1p(clip) + 0.1, np.log1p(-clip) - 0.1
    logp = logp_old + np.array([[up, down, up, down]])
    adv = np.array([[1.0, -1.0, -1.0, 1.0]]) * rng.uniform(0.5, 2.0, (1, 4))
    _, cache = rlhf.ppo_loss_forward(logp, logp_old, adv, np.ones((1, 4)), clip=clip)
    d = rlhf.ppo_loss_backward(1.0, cache)
    assert d[0, 0] == 0.0 and d[0, 1] == 0.0
    ratio = np.exp(logp - logp_old)
    assert_close(d[0, 2:], -(ratio * adv)[0, 2:] / 4)


def test_ppo_loss_at_the_sampling_policy_is_minus_the_mean_advantage():
    adv, mask = randn(0, 2, 4), _response_mask(1, 2, 4)
    lp = randn(2, 2, 4)
    loss, _ = rlhf.ppo_loss_forward(lp, lp.copy(), adv, mask)
    assert math.isclose(float(loss), -float((adv * mask).sum() / mask.sum()), rel_tol=1e-12)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

def test_bad_input_names_the_argument():
    a, b = np.zeros(3), np.zeros(4)
    with pytest.raises(ValueError, match="r_rejected"):
        rlhf.reward_loss_forward(a, b)
    with pytest.raises(ValueError, match="ref_rejected"):
        rlhf.dpo_loss_forward(a, a, a, b)
    for beta in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            rlhf.dpo_loss_forward(a, a, a, a, beta=beta)
    x, m = np.zeros((2, 3)), np.ones((2, 3))
    for clip in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match="clip"):
            rlhf.ppo_loss_forward(x, x, x, m, clip=clip)
    with pytest.raises(ValueError, match="advantages"):
        rlhf.ppo_loss_forward(x, x, np.zeros((2, 4)), m)
    with pytest.raises(ValueError, match="mask"):
        rlhf.ppo_loss_forward(x, x, x, np.ones((3, 2)))
    with pytest.raises(ValueError, match="values"):
        rlhf.gae(x, np.zeros((2, 2)), m)
    with pytest.raises(ValueError, match="lam"):
        rlhf.gae(x, x, m, lam=1.5)
    with pytest.raises(ValueError, match="targets"):
        rlhf.sequence_logprobs_forward(np.zeros((2, 3, 5)), np.zeros((2, 4), dtype=int))
    with pytest.raises(ValueError, match="targets"):
        rlhf.sequence_logprobs_forward(np.zeros((2, 3, 5)), np.full((2, 3), 5))
    with pytest.raises(ValueError, match="dlogp"):
        rlhf.sequence_logprobs_backward(np.zeros(3), rlhf.sequence_logprobs_forward(
            np.zeros((2, 3, 5)), np.zeros((2, 3), dtype=int))[1])
    with pytest.raises(TypeError, match="logits"):
        rlhf.sequence_logprobs_forward(np.zeros((2, 3, 5), dtype=int), np.zeros((2, 3), dtype=int))
    cfg, params = _tiny_gpt(0)
    with pytest.raises(ValueError, match="counted"):
        rlhf.reward_forward(params, cfg, _head(0, 4), np.zeros((1, 3), dtype=int), np.zeros((1, 3), dtype=bool))
    with pytest.raises(ValueError, match="head"):
        rlhf.head_forward(np.zeros((1, 2, 4)), {"head.w": np.zeros(3), "head.b": np.zeros(1)})


# ---------------------------------------------------------------------------
# The labeller, rollouts and the command line, at a tiny size
# ---------------------------------------------------------------------------

def test_sentiment_score_counts_stems_anywhere():
    assert rlhf.sentiment_score("My beloved, DEAR friend") == 3.0          # love inside beloved, any case
    assert rlhf.sentiment_score("the villain will die") == -4.0     # villain, ill in villain and in will, die
    assert rlhf.sentiment_score("") == 0.0


def test_sequences_count_only_the_response():
    prompts, responses = np.array([[1, 2, 3]]), np.array([[4, 5]])
    idx, targets = rlhf.sequences(prompts, responses)
    assert idx.tolist() == [[1, 2, 3, 4]] and targets.tolist() == [[-100, -100, 4, 5]]
    with pytest.raises(ValueError, match="responses"):
        rlhf.sequences(prompts, np.array([[4, 5], [6, 7]]))


def test_finetune_reward_dpo_ppo_at_a_tiny_size(tmp_path):
    import json
    import subprocess
    import sys
    from minillm import checkpoint, data
    from minillm.tokenizer import CharTokenizer
    text = "love die ill vile " * 200
    tok = CharTokenizer.from_text(text)
    cfg = gpt.GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=1, n_head=2, n_embd=16)
    base = tmp_path / "base"
    checkpoint.save_checkpoint(base, gpt.init_params(cfg, seed=1), model_config=cfg.to_dict(), tokenizer=tok)
    ids = np.random.default_rng(0).integers(0, tok.vocab_size, 2000)       # prompts: random characters
    data.write_tokens(ids, base / "train.npy", tok.vocab_size)
    data.write_tokens(ids[:500], base / "val.npy", tok.vocab_size)

    def cli(*argv, code=0):
        r = subprocess.run([sys.executable, "-m", "minillm", "finetune", *argv, "--checkpoint", str(base),
                            "--prompt-len", "4", "--response-len", "40", "--pairs", "48", "--eval-prompts", "16",
                            "--steps", "2", "--batch-size", "4", "--eval-interval", "1"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode == code, r.stderr[-3000:]
        return r

    r = cli("ppo", code=2)                          # no reward model yet: one line, exit 2
    assert "ppo needs a reward model" in r.stderr and "Traceback" not in r.stderr
    assert "--lora: LoRA applies to finetune sft" in cli("dpo", "--lora", code=2).stderr
    out = base / "rlhf"
    for extra, train in ((("--rm-train", "all", "--rm-pool", "last"), "all"), ((), "head")):
        assert "held-out pair accuracy" in cli("reward", *extra).stdout
        rm = json.loads((out / "reward" / "reward.json").read_text())
        assert rm["train"] == train and rm["train_pairs"] > 0 and 0.0 <= rm["val_accuracy"] <= 1.0
    for method, extra in (("dpo", ()), ("ppo", ("--ptx-coef", "0.5"))):   # PPO-ptx: the pretraining term too
        cli(method, *extra)
        res = json.loads((out / method / f"{method}.json").read_text())
        assert [c["step"] for c in res["curve"]] == [0, 1, 2]
        assert res["curve"][0]["kl"] == 0.0 and 0.0 <= res["win_rate"] <= 1.0
        assert method == "dpo" or res["ptx_coef"] == 0.5
        assert checkpoint.load_checkpoint(out / method)["model_config"] == cfg.to_dict()
    svg = (out / "frontier.svg").read_text()
    assert "PPO" in svg and "DPO" in svg
