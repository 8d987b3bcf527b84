"""Walkthrough 07: optimizers, the learning-rate schedule, clipping, accumulation, and the loop.

Gradients say which way is downhill; an optimizer decides how far to go. We watch
plain SGD, SGD with momentum, Adam and AdamW on the same problems, see why
AdamW's decay differs from Adam's L2 penalty, draw the warmup + cosine schedule,
clip a gradient spike, split a batch into micro-batches, and finally let the
training loop crash and resume without changing a single loss value.

Run: python walkthroughs/07_optim.py      (MINILLM_FAST=1 for fewer steps)
"""
import math
import os
import tempfile

import numpy as np

from _narrate import FAST, check, expect_below, expect_close, step
from minillm import backprop as bp
from minillm import optim
from minillm import train as tr

STEPS = 60 if FAST else 200


# ---------------------------------------------------------------------------
step(1, "A ravine: f(w) = (w0^2 + 100 w1^2) / 2, starting at (1, 1)")
# ---------------------------------------------------------------------------
print("""The gradient is (w0, 100 w1): steep across the ravine (w1), shallow along it
(w0). Gradient descent must keep lr below 2/100 or it overshoots in w1, and then
it crawls along w0, shrinking it by only (1 - lr) per step. (Nesterov momentum
tolerates less: about lr < 0.0136 here, so all three SGD variants use lr = 0.01.) Momentum remembers
past steps, so the consistent w0 direction builds up speed while the w1
zig-zags cancel. Adam divides each coordinate's step by the running RMS of its
own gradient, so both coordinates move at about lr per step whatever their
curvature.""")


def ravine(opt_factory, steps):
    w = {"w": np.array([1.0, 1.0])}
    opt = opt_factory(w)
    dist = []
    for _ in range(steps):
        g = {"w": np.array([1.0, 100.0]) * w["w"]}
        opt.step(g)
        dist.append(float(np.linalg.norm(w["w"])))
    return dist


runs = {
    "SGD lr=0.01": lambda p: optim.SGD(p, lr=0.01),
    "SGD+momentum 0.9": lambda p: optim.SGD(p, lr=0.01, momentum=0.9),
    "SGD+Nesterov 0.9": lambda p: optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True),
    "Adam lr=0.05": lambda p: optim.Adam(p, lr=0.05),
}
checkpoints = [1, 10, 30, STEPS]
print("\ndistance to the minimum |w| after k steps:")
print(f"{'':20s}" + "".join(f"{'k=' + str(k):>12s}" for k in checkpoints))
final = {}
for name, make in runs.items():
    d = ravine(make, STEPS)
    final[name] = d[-1]
    print(f"{name:20s}" + "".join(f"{d[k - 1]:12.2e}" for k in checkpoints))
check(abs(final["SGD lr=0.01"] - (1 - 0.01) ** STEPS) < 1e-3,
      f"plain SGD should shrink w0 by (1 - lr) per step: {final['SGD lr=0.01']:.3e} vs {(1 - 0.01) ** STEPS:.3e}")
for name in ("SGD+momentum 0.9", "SGD+Nesterov 0.9", "Adam lr=0.05"):
    expect_below(f"{name}'s distance after {STEPS} steps", final[name], final["SGD lr=0.01"] / 10,
                 "a tenth of plain SGD's")
print("""
Plain SGD is held to the pace of the flattest direction. With the same lr,
momentum and Nesterov get orders of magnitude closer in the same number of
steps. Adam rescales each coordinate by the RMS of its own gradient, so it needs
no lr tuned to the curvature; its steps are measured in units of lr rather than
of the gradient, which is one reason its lr is decayed by a schedule (step 4).""")


# ---------------------------------------------------------------------------
step(2, "Softmax regression with badly scaled features")
# ---------------------------------------------------------------------------
print("""A realistic small problem: 3 classes, 8 features, feature j scaled by 10^(j/2 - 2)
(from 0.01 to 30). Each optimizer gets the same data and the same number of steps,
with a learning rate chosen from a small grid (the best one is shown).""")

rng = np.random.default_rng(0)
N, D, C = 256, 8, 3
scales = 10.0 ** (np.arange(D) / 2 - 2)
X = rng.standard_normal((N, D)) * scales
W_true = rng.standard_normal((D, C)) / scales[:, None]
Y = np.argmax(X @ W_true, axis=1)


def softmax_regression_loss(params):
    loss, cache = bp.softmax_cross_entropy_forward(X @ params["w"] + params["bias"], Y)
    d = bp.softmax_cross_entropy_backward(1.0, cache)
    return float(loss), {"w": X.T @ d, "bias": d.sum(0)}


def fit(make, lr, steps):
    params = {"w": np.zeros((D, C)), "bias": np.zeros(C)}
    opt = make(params, lr)
    for _ in range(steps):
        loss, grads = softmax_regression_loss(params)
        if not math.isfinite(loss):
            return float("inf")
        opt.step(grads)
    return softmax_regression_loss(params)[0]


makers = {
    "SGD": lambda p, lr: optim.SGD(p, lr=lr),
    "SGD+momentum": lambda p, lr: optim.SGD(p, lr=lr, momentum=0.9),
    "Adam": lambda p, lr: optim.Adam(p, lr=lr),
    "AdamW wd=0.01": lambda p, lr: optim.AdamW(p, lr=lr, weight_decay=0.01),
}
with np.errstate(over="ignore", invalid="ignore"):
    print(f"\nloss after {STEPS} full-batch steps (start: {math.log(C):.4f} = log 3):")
    best_loss = {}
    for name, make in makers.items():
        best = min((fit(make, lr, STEPS), lr) for lr in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1))
        best_loss[name] = best[0]
        print(f"  {name:15s} loss {best[0]:.4f}  (best lr {best[1]:g})")
        expect_below(f"{name}'s best loss", best[0], math.log(C), "the starting loss log 3")
for name in ("Adam", "AdamW wd=0.01"):
    expect_below(f"{name}'s best loss", best_loss[name], best_loss["SGD"], "plain SGD's")
print("""
SGD's one learning rate must suit the steepest feature, so the small-scale
features barely learn. Adam's per-weight normalisation lets every feature learn
at a similar pace, which is why it (or AdamW) trains nearly every transformer.""")


# ---------------------------------------------------------------------------
step(3, "Adam's L2 penalty versus AdamW's decoupled decay")
# ---------------------------------------------------------------------------
print("""Weight decay should shrink weights in proportion to their size. Adam with L2
adds wd * p to the gradient, and then divides it by sqrt(v) like the rest of
the gradient: a weight whose only gradient is the penalty moves by about lr per
step whatever its size. AdamW instead multiplies p by (1 - lr * wd) outside the
adaptive update. Two weights (1.0 and 0.001) with zero loss gradient, lr 0.01,
wd 0.1, ten steps:""")
zero = {"big": np.zeros(1), "tiny": np.zeros(1)}
for cls in (optim.Adam, optim.AdamW):
    p = {"big": np.array([1.0]), "tiny": np.array([0.001])}
    opt = cls(p, lr=0.01, weight_decay=0.1, no_decay=None)
    for _ in range(10):
        opt.step(zero)
    print(f"  {cls.__name__:6s} big {p['big'][0]: .6f}   tiny {p['tiny'][0]: .6f}")
    if cls is optim.AdamW:
        expect_close("AdamW's weights vs (1 - lr*wd)^10 times their start", np.array([p["big"][0], p["tiny"][0]]),
                     np.array([1.0, 0.001]) * (1 - 0.01 * 0.1) ** 10, 1e-12)
    else:
        check(abs(1.0 - p["big"][0] - 0.1) < 0.01 and p["tiny"][0] < 0,
              f"Adam-L2 should move the big weight by ~lr per step and fling the tiny one past 0: {p}")
print(f"  (1 - lr*wd)^10 = {(1 - 0.01 * 0.1) ** 10:.6f}: AdamW shrinks both by exactly this factor.")
print("""Adam-L2 moved the big weight by ~lr per step (0.1 in ten steps) and flung the tiny
one past zero, as the sign of the penalty is all that survives normalisation.
AdamW shrank both by the same small factor. Biases, norm gains and embeddings
usually get no decay at all: optim.default_no_decay picks them out by name.""")
for name in ("h.0.attn.w_qkv", "h.0.ln_1.weight", "h.0.mlp.bias", "wte"):
    print(f"  default_no_decay({name!r:20s}) = {optim.default_no_decay(name)}")
    check(optim.default_no_decay(name) == (name != "h.0.attn.w_qkv"), f"default_no_decay({name!r})")


# ---------------------------------------------------------------------------
step(4, "Learning-rate schedule: linear warmup, then cosine decay to a floor")
# ---------------------------------------------------------------------------
print("""Adam's first steps move every weight by about lr whatever the gradient (m/sqrt(v)
is about +-1 while the averages are young), so we start small and ramp up over
warmup_steps. Then a cosine brings lr down to min_lr, letting the weights settle
instead of hovering (step 1). max_lr=1e-3, warmup 10, max_steps 100, min_lr 1e-4:""")
max_steps, warm = 100, 10
values = [optim.lr_schedule(s, 1e-3, warm, max_steps, 1e-4) for s in range(max_steps + 1)]
for s in list(range(0, 12, 2)) + list(range(20, max_steps + 1, 10)):
    bar = "#" * int(round(values[s] / 1e-3 * 50))
    print(f"  step {s:3d}  lr {values[s]:.2e}  {bar}")
print("The warmup ends exactly at max_lr, so the curve has no jump where the two pieces meet.")
check(math.isclose(values[warm], 1e-3, rel_tol=1e-12) and math.isclose(values[max_steps], 1e-4, rel_tol=1e-12),
      f"the schedule should reach max_lr at step {warm} and min_lr at step {max_steps}: "
      f"{values[warm]:.3e}, {values[max_steps]:.3e}")
check(all(a < b for a, b in zip(values[:warm], values[1:warm + 1]))
      and all(a >= b for a, b in zip(values[warm:], values[warm + 1:])),
      "the schedule should rise through the warmup and never rise after it")


# ---------------------------------------------------------------------------
step(5, "Clipping the global gradient norm")
# ---------------------------------------------------------------------------
print("""One bad batch can give a gradient a thousand times larger than usual. Clipping
rescales *all* gradients by one factor so that their combined length is at most
max_norm: the direction of the update is kept, only its length is capped.""")
g = {"w": np.array([[0.3, -0.4], [0.1, 0.2]]), "bias": np.array([250.0, -80.0])}
before = {k: v.copy() for k, v in g.items()}
total = optim.clip_grad_norm(g, max_norm=1.0)
flat0 = np.concatenate([v.ravel() for v in before.values()])
flat1 = np.concatenate([v.ravel() for v in g.values()])
cos = flat0 @ flat1 / (np.linalg.norm(flat0) * np.linalg.norm(flat1))
print(f"  norm before {total:.3f}, after {optim.global_norm(g):.6f}, cosine(before, after) = {cos:.12f}")
check(math.isclose(total, np.linalg.norm(flat0), rel_tol=1e-12), "clip_grad_norm should return the norm before")
# Like PyTorch, the factor is max_norm / (norm + 1e-6): the clipped norm ends just below max_norm.
check(1 - 1e-6 < optim.global_norm(g) <= 1.0 and abs(cos - 1.0) < 1e-12,
      f"clipping should leave norm ~1 (just below) and keep the direction: {optim.global_norm(g)!r}, {cos!r}")
small = {"w": np.array([0.3, 0.4])}
print(f"  a gradient of norm {optim.clip_grad_norm(small, 1.0):.1f} is left as it is: {small['w']}")
check(np.array_equal(small["w"], [0.3, 0.4]), "a gradient already below max_norm should not change")


# ---------------------------------------------------------------------------
step(6, "Gradient accumulation: a big batch in small pieces")
# ---------------------------------------------------------------------------
print("""When a batch does not fit in memory, split it into k micro-batches and add up
their gradients times 1/k: the gradient of the mean loss over the whole batch.""")
params = {"w": rng.standard_normal((D, C)) * 0.1, "bias": np.zeros(C)}
_, full = softmax_regression_loss(params)
acc = None
k = 4
for part in np.array_split(np.arange(N), k):
    loss, cache = bp.softmax_cross_entropy_forward(X[part] @ params["w"] + params["bias"], Y[part])
    d = bp.softmax_cross_entropy_backward(1.0, cache)
    acc = optim.accumulate(acc, {"w": X[part].T @ d, "bias": d.sum(0)}, 1.0 / k)
diff = max(expect_close(f"accumulated vs full-batch d{n}", acc[n], full[n], 1e-12) for n in full)
print(f"  {k} micro-batches of {N // k}: max |accumulated - full-batch gradient| = {diff:.1e}")


# ---------------------------------------------------------------------------
step(7, "The training loop: crash, resume, and the same losses")
# ---------------------------------------------------------------------------
print("""minillm.train.train drives any task (params, loss_and_grads, eval_loss,
get_batch, ...) with AdamW, the schedule, clipping and accumulation. Its
checkpoint holds the parameters, the optimizer's buffers and step count, and the
state of the random generator that draws batches, written to a temporary file
and renamed into place. We train 24 steps in one go, then again but 'crash' at
step 15 (last checkpoint: step 12) and resume.""")


class Task:
    def __init__(self, crash_at=None):
        self.params = {"w": np.zeros((D, C), np.float32), "bias": np.zeros(C, np.float32)}
        self.X, self.Y = X.astype(np.float32), Y
        self.tokens_per_batch, self.model_config, self.tokenizer = 32, {"D": D, "C": C}, None
        self.crash_at, self.calls = crash_at, 0

    def get_batch(self, split, rng):
        i = rng.integers(0, N // 2, size=32) + (0 if split == "train" else N // 2)
        return self.X[i], self.Y[i]

    def loss_and_grads(self, params, batch):
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt("the power went out")
        x, y = batch
        loss, cache = bp.softmax_cross_entropy_forward(x @ params["w"] + params["bias"], y)
        d = bp.softmax_cross_entropy_backward(1.0, cache)
        return loss, {"w": x.T @ d, "bias": d.sum(0)}

    def eval_loss(self, params, batch):
        x, y = batch
        return bp.softmax_cross_entropy_forward(x @ params["w"] + params["bias"], y)[0]


with tempfile.TemporaryDirectory() as root:
    def cfg(name):
        return tr.TrainConfig(max_steps=24, lr=0.05, min_lr=0.005, warmup_steps=4, eval_interval=12,
                              eval_iters=4, log_interval=6, checkpoint_interval=6, seed=0,
                              out_dir=os.path.join(root, name))

    print("\nuninterrupted run:")
    tr.train(Task(), cfg("a"), log=lambda s: print("   ", s))
    print("\ninterrupted run:")
    try:
        tr.train(Task(crash_at=15), cfg("b"), log=lambda s: print("   ", s))
    except KeyboardInterrupt as e:
        print(f"    ... crashed: {e}")
    print("resumed:")
    tr.train(Task(), cfg("b"), resume=True, log=lambda s: print("   ", s))
    la = [r["loss"] for r in tr.read_metrics(cfg("a").out_dir) if r["kind"] == "train"]
    lb = [r["loss"] for r in tr.read_metrics(cfg("b").out_dir) if r["kind"] == "train"]
    print(f"\nlogged train losses equal, bit for bit: {la == lb}  ({len(la)} values)")
    check(la == lb and len(la) == 4, f"the resumed run should log the same 4 losses: {la} vs {lb}")
    last_eval = [r for r in tr.read_metrics(cfg("b").out_dir) if r["kind"] == "eval"][-1]
    print(f"validation loss at step {last_eval['step']}: {last_eval['val_loss']:.4f}, below the uniform guess's "
          f"log 3 = {math.log(C):.4f}: the resumed run trained")
    expect_below("the resumed run's final validation loss", last_eval["val_loss"], math.log(C),
                 "log 3, a uniform guess")
    print(f"the run directory holds: {sorted(os.listdir(cfg('b').out_dir))}")
    print("(loss.svg is the loss curve, drawn as plain SVG text; metrics.jsonl has one JSON line per log.)")
