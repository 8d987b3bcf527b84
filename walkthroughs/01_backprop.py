"""01 - Backpropagation by hand.

A two-layer network, written out one line per operation:

    h      = x @ W1 + b1          (N, D) @ (D, H) -> (N, H)
    a      = tanh(h)              (N, H)
    logits = a @ W2 + b2          (N, H) @ (H, V) -> (N, V)
    loss   = mean_n -log softmax(logits)[n, target_n]

We run it forward, then walk the chain rule backwards by hand, one local
derivative per line, and check every gradient against finite differences with
minillm.backprop's checker. Run:  python walkthroughs/01_backprop.py
"""
import numpy as np

from _narrate import FAST, check, expect_below, expect_close, expect_gradcheck, step
from minillm import backend
from minillm import backprop as bp

xp = backend.xp_default()          # numpy, or cupy under MINILLM_DEVICE=gpu


def shape(a):
    return "x".join(str(s) for s in a.shape) or "scalar"


print(__doc__.split("\n\n")[0])
print(f"arrays live on: {backend.device_name()} ({xp.__name__}); float64 throughout, "
      "because finite differences need the precision")

# ---------------------------------------------------------------------------
step(1, "a tiny problem and a tiny network")
N, D, H, V = 6, 4, 5, 3            # examples, input features, hidden units, classes
rng = backend.make_rng(0)
f64 = np.float64
x = backend.randn(rng, (N, D), dtype=f64)
targets = xp.asarray(rng.integers(0, V, size=N))
params = {
    "W1": backend.randn(rng, (D, H), std=0.5, dtype=f64),
    "b1": backend.randn(rng, (H,), std=0.1, dtype=f64),
    "W2": backend.randn(rng, (H, V), std=0.5, dtype=f64),
    "b2": backend.randn(rng, (V,), std=0.1, dtype=f64),
}
print(f"x: {shape(x)}   targets: {backend.to_numpy(targets).tolist()}")
for k, v in params.items():
    print(f"  {k}: {shape(v)}")

# ---------------------------------------------------------------------------
step(2, "the forward pass, keeping what the backward will need")


def forward(p):
    h = x @ p["W1"] + p["b1"]
    a = xp.tanh(h)
    logits = a @ p["W2"] + p["b2"]
    loss, ce_cache = bp.softmax_cross_entropy_forward(logits, targets)
    return loss, (a, ce_cache)


loss, (a, ce_cache) = forward(params)
print(f"h = x @ W1 + b1      -> {N}x{H}")
print(f"a = tanh(h)          -> {shape(a)}   (we keep a: tanh'(h) = 1 - a^2)")
print(f"logits = a @ W2 + b2 -> {N}x{V}")
print(f"loss = cross-entropy -> {float(loss):.6f}   (log V = {np.log(V):.6f} would be a uniform guess)")

# ---------------------------------------------------------------------------
step(3, "the backward pass: the chain rule, one local derivative per line")
print("Start from dL/dL = 1 and multiply by each local derivative, in reverse order.")
dlogits = bp.softmax_cross_entropy_backward(1.0, ce_cache)
print(f"dlogits = (softmax(logits) - onehot(target)) / N       {shape(dlogits)}")
grads = {}
grads["W2"] = a.T @ dlogits
grads["b2"] = dlogits.sum(axis=0)
print(f"dW2 = a^T @ dlogits            {shape(grads['W2'])}   (each weight sums over the examples it touched)")
print(f"db2 = sum_n dlogits            {shape(grads['b2'])}")
da = dlogits @ params["W2"].T
print(f"da  = dlogits @ W2^T           {shape(da)}   (the gradient flows back through the same weights)")
dh = da * (1 - a * a)
print(f"dh  = da * (1 - a^2)           {shape(dh)}   (tanh' = 1 - tanh^2: elementwise)")
grads["W1"] = x.T @ dh
grads["b1"] = dh.sum(axis=0)
print(f"dW1 = x^T @ dh                 {shape(grads['W1'])}")
print(f"db1 = sum_n dh                 {shape(grads['b1'])}")

# Check by hand that the cross-entropy gradient is what we said it is.
probs = ce_cache.probs             # the cache kept softmax(logits)
onehot = xp.eye(V)[targets]
d = expect_close("dlogits vs (probs - onehot) / N", dlogits, (probs - onehot) / N, 1e-14)
print(f"check: dlogits == (probs - onehot) / N, up to rounding: max |difference| {d:.1e}")

# ---------------------------------------------------------------------------
step(4, "trust, but verify: finite differences")
print("For each parameter entry p: (8 (L(p+e) - L(p-e)) - (L(p+2e) - L(p-2e))) / 12e,")
print("a five-point central difference whose error is O(e^4), compared with our gradient.")
report = expect_gradcheck("the by-hand backward", bp.check_dict_gradients(lambda p: forward(p)[0], params, grads))
print("whole network:", report)
for name, err in report.per_input.items():
    print(f"  {name}: worst relative error {err:.2e}")
print("Every entry agrees to better than 1e-7 relative: the bar every backward in minillm meets.")

# ---------------------------------------------------------------------------
step(5, "a checker that cannot fail proves nothing")
print("Here is a plausible but wrong softmax backward: dx = y * (dy - mean(dy)). (The right")
print("one subtracts sum(dy * y), the mean weighted by the probabilities.)")
print("Check it the naive way, with an all-ones upstream gradient, i.e. differentiate")
print("L = sum of all softmax outputs. Each row sums to 1, so L is a constant, the true")
print("gradient is 0, and the wrong backward *also* returns 0 for dy = 1:")
z = backend.randn(rng, (3, 5), dtype=f64)


def wrong_backward(dy, cache):
    return cache.y * (dy - xp.mean(dy, axis=-1, keepdims=True))


_, cache = bp.softmax_forward(z)
naive = bp.check_dict_gradients(lambda p: bp.softmax_forward(p["z"])[0], {"z": z},
                                {"z": wrong_backward(xp.ones_like(z), cache)})
wrong_ones = wrong_backward(xp.ones_like(z), cache)
print(f"  wrong backward, all-ones dy:    largest |analytic| {float(xp.abs(wrong_ones).max()):.1e},"
      f" numeric at the worst entry {abs(naive.numeric):.1e}")
print("  -> both are zero up to rounding: the check passes and proves nothing.")
print("bp.gradcheck draws a *random* upstream gradient dy and differentiates sum(dy * y):")
good = bp.gradcheck(bp.softmax_forward, bp.softmax_backward, [z])
bad = bp.gradcheck(bp.softmax_forward, wrong_backward, [z])
print(f"  correct backward, random dy:    {good.max_rel_error:.2e}")
print(f"  wrong backward, random dy:      {bad.max_rel_error:.2e}   <- caught")
check(float(xp.abs(wrong_ones).max()) < 1e-12 and abs(naive.numeric) < 1e-9,
      "with an all-ones dy both the wrong backward and the numeric gradient should be ~0")
expect_gradcheck("the correct softmax backward", good)
check(bad.max_rel_error > 1e-2, f"the random dy should expose the wrong backward, but: {bad}")

# ---------------------------------------------------------------------------
step(6, "use the gradients: a few steps of gradient descent")
lr, steps = 0.5, (30 if FAST else 200)
first = None
for i in range(steps + 1):
    loss, (a, ce_cache) = forward(params)
    first = float(loss) if first is None else first
    if i % (steps // 5) == 0:
        print(f"  step {i:4d}   loss {float(loss):.5f}")
    dlogits = bp.softmax_cross_entropy_backward(1.0, ce_cache)
    dh = (dlogits @ params["W2"].T) * (1 - a * a)
    g = {"W2": a.T @ dlogits, "b2": dlogits.sum(0), "W1": x.T @ dh, "b1": dh.sum(0)}
    for k in params:
        params[k] -= lr * g[k]
expect_below("the loss after training", float(loss), first / 4, "a quarter of the starting loss")
expect_below("the loss after training", float(loss), np.log(V), "log V, a uniform guess")
print("The loss falls: six examples are easy to memorise. Every model in minillm is")
print("trained exactly like this, with longer chains of the same forward/backward pairs.")
