"""optim.py: the update rules against their defining properties and against torch.optim."""
import math

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from helpers import assert_close, np_, on
from minillm import optim
from strategies import randn, seeds, shapes


def make_params(xp, seed, dtype=np.float64):
    """A small model-shaped dict: a matrix that is decayed, a bias and a norm weight that are not."""
    r = np.random.default_rng(seed)
    return {"h.0.w": on(xp, r.standard_normal((3, 4)).astype(dtype)),
            "h.0.bias": on(xp, r.standard_normal(4).astype(dtype)),
            "ln_f.weight": on(xp, r.standard_normal(4).astype(dtype))}


def grads_like(xp, params, seed, scale=1.0, floor=0.0):
    r = np.random.default_rng(seed)
    out = {}
    for k, p in params.items():
        g = r.standard_normal(p.shape)
        g = np.sign(g) * (np.abs(g) + floor) * scale
        out[k] = on(xp, g.astype(np_(p).dtype))
    return out


def copy_params(params):
    return {k: v.copy() for k, v in params.items()}


# --- defining properties -----------------------------------------------------

def test_default_no_decay_names():
    for name in ["h.0.ln_1.weight", "ln_f.bias", "wte", "wpe", "h.1.attn.c_proj.bias",
                 "embeddings.word_embeddings.weight", "encoder.layer.0.output.LayerNorm.weight", "h.0.rms_norm.w",
                 "h.0.attn.b_qkv", "h.0.attn.b_o", "h.0.mlp.b1", "h.0.mlp.b2", "pooler.b", "mlm.bias"]:
        assert optim.default_no_decay(name), name
    for name in ["h.0.attn.w_qkv", "h.0.attn.w_o", "h.0.mlp.w1", "h.0.mlp.c_fc.weight", "lm_head.weight",
                 "pooler.w", "h.0.mlp.b1.lora_a", "classifier.w", "h.0.blocks"]:
        assert not optim.default_no_decay(name), name


@given(seed=seeds, lr=st.floats(1e-4, 1e-1), wd=st.floats(0.0, 0.5))
def test_adamw_first_step_is_lr_times_sign_plus_decay(xp, seed, lr, wd):
    params = make_params(xp, seed)
    p0 = copy_params(params)
    g = grads_like(xp, params, seed + 1, floor=0.1)  # |g| >= 0.1, so eps/|g| <= 1e-7
    opt = optim.AdamW(params, lr=lr, weight_decay=wd)
    opt.step(g)
    for k in params:
        decay = wd if opt.decayed[k] else 0.0
        expect = np_(p0[k]) * (1 - lr * decay) - lr * np.sign(np_(g[k]))
        # |mhat / (sqrt(vhat) + eps)| = |g| / (|g| + eps): within 1e-7 of 1
        assert_close(params[k], expect, rtol=0, atol=lr * 1e-6)
    assert opt.decayed == {"h.0.w": wd > 0, "h.0.bias": False, "ln_f.weight": False}


@given(seed=seeds, c=st.floats(1e-3, 1e3), wd=st.sampled_from([0.0, 0.1]))
def test_adam_update_is_invariant_to_scaling_the_loss(xp, seed, c, wd):
    # Scaling the loss by c scales g by c, m by c and sqrt(v) by c: the ratio is unchanged
    # as long as eps is negligible (here eps = 0; L2 decay off, because wd*p does not scale).
    pa, pb = make_params(xp, seed), make_params(xp, seed)
    oa = optim.Adam(pa, lr=0.01, eps=0.0, weight_decay=0.0)
    ob = optim.Adam(pb, lr=0.01, eps=0.0, weight_decay=0.0)
    oa2 = optim.AdamW(make_params(xp, seed), lr=0.01, eps=0.0, weight_decay=wd)
    ob2 = optim.AdamW(make_params(xp, seed), lr=0.01, eps=0.0, weight_decay=wd)
    for t in range(4):
        g = grads_like(xp, pa, seed + 10 + t, floor=1e-3)
        gc = {k: v * c for k, v in g.items()}
        oa.step(g); ob.step(gc)
        oa2.step(g); ob2.step({k: v * c for k, v in g.items()})
    for k in pa:
        assert_close(pa[k], pb[k], rtol=1e-12, atol=1e-14)
        assert_close(oa2.params[k], ob2.params[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(seed=seeds, lr=st.floats(1e-4, 1.0), wd=st.floats(0.0, 0.9))
def test_adamw_with_zero_gradients_shrinks_by_exactly_one_minus_lr_wd(xp, dtype, seed, lr, wd):
    params = make_params(xp, seed, dtype)
    p0 = copy_params(params)
    opt = optim.AdamW(params, lr=lr, weight_decay=wd)
    zeros = {k: xp.zeros_like(v) for k, v in params.items()}
    for _ in range(3):
        opt.step(zeros)
        for k in params:
            f = dtype(1 - lr * wd) if opt.decayed[k] else dtype(1)
            p0[k] = p0[k] * f
            assert params[k].dtype == dtype
            assert np.array_equal(np_(params[k]), np_(p0[k])), k  # exactly, not approximately


@given(seed=seeds, shape=shapes(1, 2), max_norm=st.floats(1e-3, 10.0), scale=st.floats(1e-3, 1e3))
def test_clipping_bounds_the_global_norm_and_never_raises_it(xp, seed, shape, max_norm, scale):
    grads = {"a": on(xp, randn(seed, *shape, scale=scale)), "b.bias": on(xp, randn(seed + 1, 3, scale=scale))}
    before = {k: np_(v).copy() for k, v in grads.items()}
    norm0 = math.sqrt(sum(float((v ** 2).sum()) for v in before.values()))
    total = optim.clip_grad_norm(grads, max_norm)
    assert total == pytest.approx(norm0, rel=1e-12)
    norm1 = optim.global_norm(grads)
    assert norm1 <= max_norm * (1 + 1e-12)
    assert norm1 <= norm0 * (1 + 1e-12)
    if norm0 <= max_norm:
        for k in grads:
            assert np.array_equal(np_(grads[k]), before[k])  # untouched when already short enough
    else:
        ratio = np_(grads["a"]) / before["a"]  # one common factor: the direction is kept
        assert_close(ratio, np.full(ratio.shape, ratio.flat[0]), rtol=1e-12)


def test_clipping_leaves_float32_gradients_float32(xp):
    g = {"w": on(xp, np.full((4,), 10.0, np.float32))}
    optim.clip_grad_norm(g, 1.0)
    assert g["w"].dtype == np.float32
    assert optim.global_norm(g) <= 1.0 + 1e-6


@given(max_lr=st.floats(1e-5, 1.0), frac=st.floats(0.0, 1.0), warmup=st.integers(0, 50),
       extra=st.integers(1, 200), s=st.floats(0.0, 400.0))
def test_schedule_is_continuous_monotone_and_hits_its_ends(max_lr, frac, warmup, extra, s):
    min_lr = max_lr * frac
    max_steps = warmup + extra

    def f(x):
        return optim.lr_schedule(x, max_lr, warmup, max_steps, min_lr)

    ws = [f(i) for i in range(warmup + 1)]
    assert all(a <= b for a, b in zip(ws, ws[1:]))          # warmup only rises
    assert f(0) > 0
    assert f(warmup) == pytest.approx(max_lr, rel=1e-12)
    ds = [f(i) for i in range(warmup, max_steps + 5)]
    assert all(a >= b - 1e-15 for a, b in zip(ds, ds[1:]))  # decay only falls
    assert f(max_steps) == pytest.approx(min_lr, rel=1e-12, abs=1e-15)
    assert f(max_steps + 100) == min_lr
    # continuous: a tiny step in the argument moves the value by a tiny amount, everywhere,
    # including the two joins (end of warmup, end of decay)
    h = 1e-7
    slope = max_lr * (1.0 / max(warmup, 1) + math.pi / (2 * extra)) + 1e-12
    for x in (s, float(warmup), float(max_steps)):
        for a in (max(x - h, 0.0), x):
            assert abs(f(a + h) - f(a)) <= 2 * slope * h + 1e-15, (a, f(a), f(a + h))
    assert 0 <= f(s) <= max_lr * (1 + 1e-12)
    assert f(s) >= min_lr if s >= warmup else f(s) > 0


@given(seed=seeds, k=st.integers(1, 4))
def test_accumulating_micro_batch_gradients_gives_the_mean(xp, seed, k):
    parts = [{"w": on(xp, randn(seed + i, 3, 2))} for i in range(k)]
    acc = None
    for g in parts:
        acc = optim.accumulate(acc, g, 1.0 / k)
    assert_close(acc["w"], sum(np_(g["w"]) for g in parts) / k, rtol=1e-12)
    assert acc["w"] is not parts[0]["w"]  # a new sum, never an alias of the first micro-batch


@given(seed=seeds, scales=st.lists(st.sampled_from([1.0, 0.5, -2.0, 0.25]), min_size=2, max_size=4))
@example(seed=0, scales=[0.5, 1.0, 1.0])
def test_accumulate_is_the_scaled_sum_whatever_the_scales(xp, seed, scales):
    # the plain sum (scale 1.0, the default) has its own fast path: it must add too
    parts = [{"w": on(xp, randn(seed + i, 3, 2)), "b": on(xp, randn(seed + 10 + i, 2))}
             for i in range(len(scales))]
    acc = None
    for g, c in zip(parts, scales):
        acc = optim.accumulate(acc, g) if c == 1.0 else optim.accumulate(acc, g, c)
    for name in ("w", "b"):
        want = sum(c * np_(g[name]) for g, c in zip(parts, scales))
        assert_close(acc[name], want, rtol=1e-12, atol=1e-15)


def test_sgd_without_momentum_is_plain_gradient_descent(xp):
    params = make_params(xp, 0)
    p0 = copy_params(params)
    g = grads_like(xp, params, 1)
    optim.SGD(params, lr=0.1).step(g)
    for k in params:
        assert_close(params[k], np_(p0[k]) - 0.1 * np_(g[k]), rtol=1e-14)


@pytest.mark.parametrize("make", [
    lambda p: optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
    lambda p: optim.Adam(p, lr=0.01, weight_decay=0.1),
    lambda p: optim.AdamW(p, lr=0.01, weight_decay=0.1)], ids=["sgd", "adam", "adamw"])
def test_state_dict_round_trip_continues_identically(xp, make):
    pa, pb = make_params(xp, 3), make_params(xp, 3)
    oa = make(pa)
    for t in range(3):
        oa.step(grads_like(xp, pa, 100 + t))
    sd = oa.state_dict()
    snap = {b: {k: np_(v).copy() for k, v in d.items()} for b, d in sd["buffers"].items()}
    for k in pb:
        pb[k][...] = pa[k]
    ob = make(pb)
    ob.lr = 123.0  # overwritten by load_state_dict
    ob.load_state_dict(sd)
    assert ob.lr == oa.lr and ob.t == oa.t == 3
    for t in range(3):
        g = grads_like(xp, pa, 200 + t)
        oa.step(g)
        ob.step({k: v.copy() for k, v in g.items()})
    for k in pa:
        assert np.array_equal(np_(pa[k]), np_(pb[k]))
    for b, d in sd["buffers"].items():  # the snapshot did not move with later steps
        for k, v in d.items():
            assert np.array_equal(np_(v), snap[b][k])


@given(seed=seeds, kind=st.sampled_from(["adam", "adamw"]), dtype=st.sampled_from([np.float32, np.float64]),
       wd=st.sampled_from([0.0, 0.1]))
def test_fast_adam_step_equals_the_plain_one_bit_for_bit(xp, seed, kind, dtype, wd):
    # _update_fast does _update's operations in the same order into a reused buffer.
    cls = optim.Adam if kind == "adam" else optim.AdamW
    pa, pb = make_params(xp, seed, dtype), make_params(xp, seed, dtype)
    plain, fast = cls(pa, lr=0.01, weight_decay=wd, fast=False), cls(pb, lr=0.01, weight_decay=wd)
    assert fast.fast and not plain.fast
    for t in range(4):
        g = grads_like(xp, pa, seed + 10 + t, floor=0.1 * t)
        plain.step(g)
        fast.step({k: v.copy() for k, v in g.items()})
        for k in pa:
            assert np.array_equal(np_(pa[k]), np_(pb[k])), (t, k)
    with pytest.raises(TypeError, match="fast"):
        cls(pa, fast=1)


# --- references without torch: the papers' update rules, one float at a time ------------
#
# Each reference below is a plain Python loop over scalars, written from the published rule
# (not from optim.py), and keeps its own state. The tests run it beside minillm.optim for
# 5-8 steps on drawn hyperparameters, parameters and gradients, with a changing learning
# rate (the schedule) and global-norm clipping in the loop, and compare every step.

NAMES = ("h.0.w", "h.0.bias", "ln_f.weight", "wte")
# Which of NAMES each no_decay setting decays, written out by hand (not asked of the optimizer).
DECAYED = {"default": {"h.0.w"}, "none": set(NAMES), r"\.w$": set(NAMES) - {"h.0.w"}}
NO_DECAY = {"default": optim.default_no_decay, "none": None, r"\.w$": r"\.w$"}


def model_params(xp, seed, scale=1.0):
    r = np.random.default_rng(seed)
    shapes_ = {"h.0.w": (3, 4), "h.0.bias": (4,), "ln_f.weight": (4,), "wte": (2, 3)}
    return {k: on(xp, r.standard_normal(shapes_[k]) * scale) for k in NAMES}


def as_floats(arrays):
    """{name: array} -> {name: list of Python floats}, row-major."""
    return {k: [float(v) for v in np_(a).reshape(-1)] for k, a in arrays.items()}


def schedule_reference(step, max_lr, warmup, max_steps, min_lr):
    """Linear warmup from max_lr / (warmup + 1) at step 0 to max_lr at step `warmup`, then
    half a cosine period from max_lr down to min_lr at max_steps (cos^2 form), then min_lr."""
    if step < warmup:
        return max_lr * (step + 1) / (warmup + 1)
    if step >= max_steps:
        return min_lr
    progress = (step - warmup) / (max_steps - warmup)
    return min_lr + (max_lr - min_lr) * math.cos(math.pi * progress / 2) ** 2


def clip_reference(grads, max_norm):
    """Global-norm clipping (Pascanu et al.; PyTorch's clip_grad_norm_): one factor for all."""
    total = math.sqrt(math.fsum(g * g for gs in grads.values() for g in gs))
    if max_norm is None or total <= max_norm:
        return total, grads
    factor = max_norm / (total + 1e-6)
    return total, {k: [g * factor for g in gs] for k, gs in grads.items()}


def sgd_reference(p, g, state, t, lr, momentum, dampening, nesterov, wd, decayed):
    """One step of torch.optim.SGD's documented algorithm, for one scalar; state: {"b": buffer}.

    g <- g + wd p;  b <- g at t = 1, else mu b + (1 - dampening) g;
    g <- g + mu b (Nesterov) or b;  p <- p - lr g
    """
    if decayed:
        g = g + wd * p
    if momentum != 0:
        state["b"] = g if t == 1 else momentum * state["b"] + (1 - dampening) * g
        g = g + momentum * state["b"] if nesterov else state["b"]
    return p - lr * g


def adam_reference(p, g, state, t, lr, b1, b2, eps, wd, decayed, decoupled):
    """One step of Adam (Kingma & Ba 2015, Algorithm 1) for one scalar; state: {"m", "v"}.

    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  mhat = m / (1 - b1^t);
    vhat = v / (1 - b2^t);  p <- p - lr mhat / (sqrt(vhat) + eps).
    Adam's weight decay is L2 (g <- g + wd p). AdamW (Loshchilov & Hutter 2019) decouples it:
    p <- p - lr (mhat / (sqrt(vhat) + eps) + wd p), the decay on the old p, scaled by lr as
    in PyTorch.
    """
    if decayed and not decoupled:
        g = g + wd * p
    state["m"] = b1 * state.get("m", 0.0) + (1 - b1) * g
    state["v"] = b2 * state.get("v", 0.0) + (1 - b2) * g * g
    m_hat = state["m"] / (1 - b1 ** t)
    v_hat = state["v"] / (1 - b2 ** t)
    update = m_hat / (math.sqrt(v_hat) + eps)
    if decayed and decoupled:
        update = update + wd * p
    return p - lr * update


def run_reference(rule, p, grads_per_step, lrs, max_norm, decayed, **hp):
    """The whole loop in scalars: clip the step's gradients, then update every entry."""
    p = {k: list(v) for k, v in p.items()}
    state = {(k, i): {} for k, v in p.items() for i in range(len(v))}
    history = []
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        total, grads = clip_reference(grads, max_norm)
        for k in p:
            p[k] = [rule(x, g, state[(k, i)], t, lr, decayed=k in decayed, **hp)
                    for i, (x, g) in enumerate(zip(p[k], grads[k]))]
        history.append((total, {k: list(v) for k, v in p.items()}))
    return history


def run_minillm(xp, opt, params, grads_per_step, lrs, max_norm):
    history = []
    for grads, lr in zip(grads_per_step, lrs):
        grads = {k: on(xp, np.array(v).reshape(params[k].shape)) for k, v in grads.items()}
        total = optim.global_norm(grads) if max_norm is None else optim.clip_grad_norm(grads, max_norm)
        opt.lr = lr
        opt.step(grads)
        history.append((total, as_floats(params)))
    return history


def assert_same_history(ours, ref, what):
    for t, ((total, p), (ref_total, ref_p)) in enumerate(zip(ours, ref), start=1):
        assert total == pytest.approx(ref_total, rel=1e-12), f"{what}: gradient norm at step {t}"
        for k in ref_p:
            assert_close(p[k], ref_p[k], rtol=1e-10, atol=1e-13, msg=f"{what}: {k} after step {t}")


log_uniform = lambda lo, hi: st.floats(math.log10(lo), math.log10(hi)).map(lambda e: 10.0 ** e)  # noqa: E731


@st.composite
def training_run(draw):
    """5-8 steps: parameters, gradients of a drawn scale, a warmup + cosine lr, maybe clipping."""
    seed = draw(seeds)
    n_steps = draw(st.integers(5, 8))
    g_scale = draw(log_uniform(1e-4, 1e2))
    r = np.random.default_rng(seed)
    sizes = {"h.0.w": 12, "h.0.bias": 4, "ln_f.weight": 4, "wte": 6}
    grads = [{k: list(r.standard_normal(n) * g_scale) for k, n in sizes.items()} for _ in range(n_steps)]
    warmup = draw(st.integers(0, 3))
    max_lr = draw(log_uniform(1e-3, 1e-1))
    sched = (max_lr, warmup, warmup + draw(st.integers(1, n_steps)), max_lr * draw(st.floats(0.0, 0.5)))
    # a clip threshold between 0.3x and 3x the typical norm: some steps clipped, some not
    max_norm = draw(st.one_of(st.none(), st.floats(0.3, 3.0).map(lambda c: c * g_scale * math.sqrt(26))))
    groups = draw(st.sampled_from(sorted(DECAYED)))
    return seed, grads, sched, max_norm, groups


@given(run=training_run(), momentum=st.floats(0.1, 0.99), nesterov=st.booleans(), wd=st.floats(0.0, 0.3))
def test_sgd_matches_the_momentum_rule_written_out_for_scalars(xp, run, momentum, nesterov, wd):
    seed, grads, sched, max_norm, groups = run
    lrs = [optim.lr_schedule(t, *sched) for t in range(len(grads))]
    ref_lrs = [schedule_reference(t, *sched) for t in range(len(grads))]
    params = model_params(xp, seed + 1)
    ref = run_reference(sgd_reference, as_floats(params), grads, ref_lrs, max_norm, DECAYED[groups] if wd else set(),
                        momentum=momentum, dampening=0.0, nesterov=nesterov, wd=wd)
    opt = optim.SGD(params, lr=lrs[0], momentum=momentum, nesterov=nesterov, weight_decay=wd,
                    no_decay=NO_DECAY[groups])
    assert_same_history(run_minillm(xp, opt, params, grads, lrs, max_norm), ref, f"SGD nesterov={nesterov}")


@given(run=training_run(), b1=st.floats(0.5, 0.99), b2=st.floats(0.9, 0.9999), eps=log_uniform(1e-8, 1e-3),
       wd=st.floats(0.0, 0.3), decoupled=st.booleans())
def test_adam_and_adamw_match_the_papers_rules_written_out_for_scalars(xp, run, b1, b2, eps, wd, decoupled):
    seed, grads, sched, max_norm, groups = run
    lrs = [optim.lr_schedule(t, *sched) for t in range(len(grads))]
    ref_lrs = [schedule_reference(t, *sched) for t in range(len(grads))]
    params = model_params(xp, seed + 1)
    ref = run_reference(adam_reference, as_floats(params), grads, ref_lrs, max_norm, DECAYED[groups] if wd else set(),
                        b1=b1, b2=b2, eps=eps, wd=wd, decoupled=decoupled)
    cls = optim.AdamW if decoupled else optim.Adam
    opt = cls(params, lr=lrs[0], betas=(b1, b2), eps=eps, weight_decay=wd, no_decay=NO_DECAY[groups])
    assert opt.decayed == {k: wd > 0 and k in DECAYED[groups] for k in NAMES}
    assert_same_history(run_minillm(xp, opt, params, grads, lrs, max_norm), ref, cls.__name__)


@given(max_lr=log_uniform(1e-5, 1.0), frac=st.floats(0.0, 1.0), warmup=st.integers(0, 20),
       extra=st.integers(1, 60), fractions=st.lists(st.floats(0.0, 100.0), max_size=5))
def test_schedule_matches_warmup_and_cosine_written_out(max_lr, frac, warmup, extra, fractions):
    args = (max_lr, warmup, warmup + extra, max_lr * frac)
    for step in [*range(warmup + extra + 3), *fractions]:
        assert optim.lr_schedule(step, *args) == pytest.approx(schedule_reference(step, *args),
                                                               rel=1e-12, abs=1e-18), step


@given(seed=seeds, scale=log_uniform(1e-3, 1e3), c=st.floats(0.1, 3.0))
def test_clipping_matches_the_global_norm_rule_written_out(xp, seed, scale, c):
    grads = {k: (np_(v) * scale) for k, v in model_params(np, seed).items()}
    floats = as_floats(grads)
    max_norm = c * scale * math.sqrt(26)  # about c times the typical global norm
    ref_total, ref = clip_reference(floats, max_norm)
    ours = {k: on(xp, v.copy()) for k, v in grads.items()}
    assert optim.clip_grad_norm(ours, max_norm) == pytest.approx(ref_total, rel=1e-12)
    assert optim.global_norm({k: on(xp, v) for k, v in grads.items()}) == pytest.approx(ref_total, rel=1e-12)
    for k in ref:
        assert_close(np_(ours[k]).reshape(-1), ref[k], rtol=1e-12, atol=0)


# --- against PyTorch ------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sgd", "sgd_nesterov", "adam", "adamw"])
@given(seed=seeds)
def test_updates_match_torch_optim_over_several_steps(xp, kind, seed):
    torch = pytest.importorskip("torch")
    params = make_params(xp, seed)
    tparams = {k: torch.tensor(np_(v).copy(), dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    decayed = [tparams["h.0.w"]]
    plain = [tparams["h.0.bias"], tparams["ln_f.weight"]]  # names default_no_decay exempts
    wd = 0.05
    if kind.startswith("sgd"):
        nest = kind == "sgd_nesterov"
        ours = optim.SGD(params, lr=0.05, momentum=0.9, nesterov=nest, weight_decay=wd)
        theirs = torch.optim.SGD([{"params": decayed, "weight_decay": wd},
                                  {"params": plain, "weight_decay": 0.0}], lr=0.05, momentum=0.9, nesterov=nest)
    else:
        cls_ours = optim.Adam if kind == "adam" else optim.AdamW
        cls_theirs = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
        ours = cls_ours(params, lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd)
        theirs = cls_theirs([{"params": decayed, "weight_decay": wd}, {"params": plain, "weight_decay": 0.0}],
                            lr=0.02, betas=(0.8, 0.95), eps=1e-6)
    for t in range(6):
        g = grads_like(xp, params, seed + 1000 + t)
        lr = 0.02 * (1 + t) / 6 if not kind.startswith("sgd") else 0.05
        ours.lr = lr  # a changing lr, as under a schedule
        for group in theirs.param_groups:
            group["lr"] = lr
        ours.step(g)
        for k, tp in tparams.items():
            tp.grad = torch.tensor(np_(g[k]))
        theirs.step()
        for k in params:
            assert_close(params[k], tparams[k].detach().numpy(), rtol=1e-11, atol=1e-13, msg=f"{kind} {k} step {t}")


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
@given(seed=seeds, momentum=st.floats(0.1, 0.99), dampening=st.sampled_from([0.0, 0.1, 0.5]),
       nesterov=st.booleans(), wd=st.floats(0.0, 0.3))
def test_the_scalar_references_match_torch_optim(kind, seed, momentum, dampening, nesterov, wd):
    # The references above are checked against PyTorch too, SGD's dampening included (which
    # minillm's SGD does not offer), so that a reference and optim.py cannot share a mistake.
    torch = pytest.importorskip("torch")
    if nesterov:
        dampening = 0.0  # PyTorch: Nesterov needs zero dampening
    p0 = as_floats(model_params(np, seed))
    r = np.random.default_rng(seed + 1)
    grads = [{k: list(r.standard_normal(len(v))) for k, v in p0.items()} for _ in range(6)]
    lrs = [0.01 * (1 + t) for t in range(6)]
    decayed = {"h.0.w"}
    tp = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in p0.items()}
    groups = [{"params": [tp[k] for k in NAMES if k in decayed], "weight_decay": wd},
              {"params": [tp[k] for k in NAMES if k not in decayed], "weight_decay": 0.0}]
    if kind == "sgd":
        theirs = torch.optim.SGD(groups, lr=lrs[0], momentum=momentum, dampening=dampening, nesterov=nesterov)
        ref = run_reference(sgd_reference, p0, grads, lrs, None, decayed, momentum=momentum,
                            dampening=dampening, nesterov=nesterov, wd=wd)
    else:
        cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
        theirs = cls(groups, lr=lrs[0], betas=(0.8, 0.95), eps=1e-6)
        ref = run_reference(adam_reference, p0, grads, lrs, None, decayed, b1=0.8, b2=0.95, eps=1e-6, wd=wd,
                            decoupled=kind == "adamw")
    for t, (g, lr) in enumerate(zip(grads, lrs)):
        for group in theirs.param_groups:
            group["lr"] = lr
        for k in NAMES:
            tp[k].grad = torch.tensor(g[k], dtype=torch.float64)
        theirs.step()
        for k in NAMES:
            assert_close(tp[k].detach().numpy(), ref[t][1][k], rtol=1e-11, atol=1e-13, msg=f"{kind} {k} step {t}")


# --- bad input ----------------------------------------------------------------------

def test_bad_input_gets_clear_errors(xp):
    params = make_params(xp, 0)
    opt = optim.AdamW(params)
    g = grads_like(xp, params, 1)
    with pytest.raises(ValueError, match=r"grads: expected the same keys as params, missing \['ln_f.weight'\]"):
        opt.step({k: v for k, v in g.items() if k != "ln_f.weight"})
    with pytest.raises(ValueError, match=r"extra \['typo'\]"):
        opt.step({**g, "typo": g["h.0.w"]})
    with pytest.raises(ValueError, match=r"grads\['h.0.w'\]: expected shape \(3, 4\).*got \(4, 3\)"):
        opt.step({**g, "h.0.w": g["h.0.w"].T.copy()})
    with pytest.raises(TypeError, match=r"grads\['h.0.bias'\]: expected dtype float64.*got float32"):
        opt.step({**g, "h.0.bias": g["h.0.bias"].astype(np.float32)})
    assert opt.t == 0  # a rejected step changes nothing
    with pytest.raises(ValueError, match=r"lr: expected a finite number in \[0, inf\], got -0.1"):
        optim.SGD(params, lr=-0.1)
    with pytest.raises(ValueError, match="lr: .*got nan"):
        opt.lr = float("nan")
    for betas, which in [((1.0, 0.999), r"betas\[0\]"), ((0.9, -0.1), r"betas\[1\]"), ((0.9,), "betas")]:
        with pytest.raises(ValueError, match=which + r": expected .*\[0, 1\)"):
            optim.Adam(params, betas=betas)
    with pytest.raises(ValueError, match="weight_decay"):
        optim.AdamW(params, weight_decay=-1.0)
    with pytest.raises(ValueError, match="nesterov: .*momentum > 0"):
        optim.SGD(params, lr=0.1, nesterov=True)
    with pytest.raises(TypeError, match=r"params\['x'\]: expected a floating-point array"):
        optim.SGD({"x": on(xp, np.arange(3))}, lr=0.1)
    with pytest.raises(ValueError, match=r"max_norm: expected a finite number in \(0, inf\]"):
        optim.clip_grad_norm(g, 0.0)
    with pytest.raises(ValueError, match="max_steps: expected an int >= warmup_steps"):
        optim.lr_schedule(0, 1.0, 10, 5, 0.0)
    with pytest.raises(ValueError, match=r"min_lr: .*\[0, 1\]"):
        optim.lr_schedule(0, 1.0, 1, 5, 2.0)
    with pytest.raises(ValueError, match="name: expected one of"):
        optim.make_optimizer("lion", params, lr=0.1)
    other = optim.Adam(make_params(xp, 0))
    with pytest.raises(ValueError, match="state_dict: expected the state of a AdamW, got Adam"):
        opt.load_state_dict(other.state_dict())


def test_no_decay_can_be_a_regex_or_none(xp):
    params = make_params(xp, 0)
    assert optim.AdamW(params, no_decay=None).decayed == {k: True for k in params}
    assert optim.AdamW(params, no_decay=r"\.w$").decayed == {"h.0.w": False, "h.0.bias": True,
                                                             "ln_f.weight": True}
    assert optim.AdamW(params, weight_decay=0.0).decayed == {k: False for k in params}
