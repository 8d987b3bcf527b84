"""02 - The feed-forward block: linear layers, activations, MLP and SwiGLU.

Half of every transformer block is a position-wise MLP: the same two (or three)
matrices applied to every token vector independently. This walkthrough builds
it from minillm.ffn's forward/backward pairs, looks at the activations, and
checks every backward against finite differences.
Run:  python walkthroughs/02_ffn.py
"""
import math
import time

import numpy as np

from _narrate import FAST, check, expect_close, expect_gradcheck, step
from minillm import backend, ffn
from minillm import backprop as bp

xp = backend.xp_default()
rng = backend.make_rng(0)
f64 = np.float64


def shp(a):
    return tuple(int(s) for s in a.shape)


print(__doc__.split("\n\n")[0])
print(f"device: {backend.device_name()} ({xp.__name__})")

# ---------------------------------------------------------------------------
step(1, "a linear layer on a batch of sequences is ONE matrix multiply")
B, T, C, H = 2, 3, 4, 16          # batch, sequence length, model width, hidden width (4C)
x = backend.randn(rng, (B, T, C), dtype=f64)
w, b = backend.randn(rng, (C, H), std=0.5, dtype=f64), backend.randn(rng, (H,), std=0.1, dtype=f64)
y, cache = ffn.linear_forward(x, w, b)
print(f"x {shp(x)} @ w {shp(w)} + b {shp(b)} -> y {shp(y)}")
print(f"inside: x is viewed as a ({B * T}, {C}) matrix, so forward is one GEMM, and backward is two:")
print("  dx = dy @ w^T   and   dw = x^T @ dy  (the sum over all B*T positions happens inside the matmul)")
dy = backend.randn(rng, y.shape, dtype=f64)
dx, dw, db = ffn.linear_backward(dy, cache)
loop_dw = sum(xp.outer(x[i, t], dy[i, t]) for i in range(B) for t in range(T))
d = expect_close("linear_backward's dw vs the sum of outer products", dw, loop_dw, 1e-12)
print(f"dw equals the sum over positions of outer(x_t, dy_t): max difference {d:.1e}")
print("gradcheck:", expect_gradcheck("linear", bp.gradcheck(ffn.linear_forward, ffn.linear_backward, [x, w, b])))

# ---------------------------------------------------------------------------
step(2, "activations: the only non-linearity in the block")
pts = np.array([-3.0, -1.0, -0.1, 0.0, 0.1, 1.0, 3.0])
xs = xp.asarray(pts)
rows = {
    "relu": ffn.relu_forward(xs)[0],
    "gelu (tanh, GPT-2)": ffn.gelu_forward(xs, "tanh")[0],
    "gelu (exact, BERT)": ffn.gelu_forward(xs, "none")[0],
    "silu (LLaMA)": ffn.silu_forward(xs)[0],
}
print(f"{'x':>20} " + " ".join(f"{v:8.2f}" for v in pts))
for name, vals in rows.items():
    print(f"{name:>20} " + " ".join(f"{v:8.4f}" for v in backend.to_numpy(vals)))
print("GELU(x) = x * Phi(x): the input, scaled by the probability that a standard normal")
print("is below it. Unlike ReLU it is smooth and lets small negative values through.")

print("minillm evaluates the tanh form as x * sigmoid(2u), u = sqrt(2/pi)(x + 0.044715 x^3): the")
print("same function, since 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u)), but with no cancellation:")
u10 = math.sqrt(2 / math.pi) * (-10 + 0.044715 * (-10) ** 3)
cancelled = 0.5 * -10 * (1 + math.tanh(u10))
ours10 = float(backend.to_numpy(ffn.gelu_forward(xp.asarray([-10.0]), 'tanh')[0])[0])
print(f"  at x = -10: 0.5 x (1 + tanh(u)) = {cancelled:.3e},  x * sigmoid(2u) = {ours10:.3e}")
exact10 = -10 / (1 + math.exp(-2 * u10))        # math.exp: the same formula, evaluated by hand
check(cancelled == 0 and abs(ours10 - exact10) <= 1e-12 * abs(exact10) and ours10 < 0,
      f"gelu_forward(-10, 'tanh') = {ours10:.6e}, expected x * sigmoid(2u) = {exact10:.6e}")
dense = xp.linspace(-10, 10, 20001)
gap = float(xp.abs(ffn.gelu_forward(dense, "tanh")[0] - ffn.gelu_forward(dense, "none")[0]).max())
print(f"max |gelu_tanh - gelu_exact| on [-10, 10]: {gap:.2e}  (the tanh form is an approximation)")
check(1e-4 < gap < 1e-3, f"the two GELUs should differ by a few 1e-4 at most, got {gap:.2e}")

# ---------------------------------------------------------------------------
step(3, "erf, which NumPy does not have")
print("Exact GELU needs erf. minillm sums the positive series")
print("  erf(z) = 2/sqrt(pi) e^(-z^2) sum_n 2^n z^(2n+1) / (1*3*...*(2n+1))   for |z| < 2,")
print("and a continued fraction for erfc(z) beyond, which keeps the far tail accurate.")
print("In float32 a degree-10 polynomial in z^2 replaces the series (fitted at import by")
print("Chebyshev interpolation of the float64 series): a third of the work, ~4e-7 relative.")
zs = np.concatenate([np.linspace(-6, 6, 1201), [1e-20, 2.0, 25.0]])
ours = backend.to_numpy(ffn.erf(xp.asarray(zs)))
ref = np.array([math.erf(z) for z in zs])
rel = np.abs(ours - ref) / np.maximum(np.abs(ref), np.finfo(float).tiny)
print(f"worst relative error vs math.erf on {zs.size} points: {rel.max():.1e}")
check(rel.max() <= 1e-14, f"erf vs math.erf: worst relative error {rel.max():.1e}, expected at most 1e-14")
z32 = zs.astype(np.float32)
ref32 = np.array([math.erf(float(z)) for z in z32])
rel32 = np.abs(backend.to_numpy(ffn.erf(xp.asarray(z32))) - ref32) / np.maximum(np.abs(ref32), np.finfo(float).tiny)
print(f"the float32 polynomial on the same points: {rel32.max():.1e}")
check(rel32.max() <= 1e-6, f"float32 erf vs math.erf: worst relative error {rel32.max():.1e}, expected at most 1e-6")
tail = float(backend.to_numpy(ffn.gelu_forward(xp.asarray([-10.0]), "none")[0])[0])
print(f"gelu_exact(-10) = {tail:.6e}   (1 + erf(-10/sqrt 2) would round to 0: we use erfc)")
true_tail = -10 * 0.5 * math.erfc(10 / math.sqrt(2))
check(abs(tail - true_tail) <= 1e-12 * abs(true_tail),
      f"gelu_exact(-10) = {tail:.6e}, expected x Phi(x) = {true_tail:.6e}")

# ---------------------------------------------------------------------------
step(4, "the MLP: y = act(x W1 + b1) W2 + b2, and its backward in reverse order")
w1, b1 = backend.randn(rng, (C, H), std=0.5, dtype=f64), backend.randn(rng, (H,), std=0.1, dtype=f64)
w2, b2 = backend.randn(rng, (H, C), std=0.5, dtype=f64), backend.randn(rng, (C,), std=0.1, dtype=f64)
y, cache = ffn.mlp_forward(x, w1, b1, w2, b2, activation="gelu")
print(f"x {shp(x)} -> h = x W1 + b1 {(B, T, H)} -> a = gelu(h) -> y = a W2 + b2 {shp(y)}")
print("backward: (da, dW2, db2) from the second linear, dh = da * gelu'(h), then (dx, dW1, db1).")
for act in ("gelu", "gelu_exact", "relu", "silu"):
    rep = bp.gradcheck(lambda *a: ffn.mlp_forward(*a, activation=act), ffn.mlp_backward, [x, w1, b1, w2, b2])
    print(f"  gradcheck mlp[{act:10}]: {expect_gradcheck(f'mlp[{act}]', rep).max_rel_error:.2e}")

# ---------------------------------------------------------------------------
step(5, "SwiGLU: a gated MLP with three matrices and no biases")
Hs = 8 * C // 3 + 1   # LLaMA shrinks the hidden width to ~8C/3 so the parameter count matches 4C
wg, wu = backend.randn(rng, (C, Hs), std=0.5, dtype=f64), backend.randn(rng, (C, Hs), std=0.5, dtype=f64)
wd = backend.randn(rng, (Hs, C), std=0.5, dtype=f64)
y, cache = ffn.swiglu_forward(x, wg, wu, wd)
print(f"y = (silu(x Wg) * (x Wu)) Wd: Wg, Wu {shp(wg)}, Wd {shp(wd)} -> y {shp(y)}")
print(f"parameters: MLP(4C) {2 * C * H + H + C}, SwiGLU(8C/3) {3 * C * Hs}")
print("backward: the product rule at the gate (ds = dm * u, du = dm * s), and x, which feeds")
print("both branches, receives the sum of their gradients.")
rep = bp.gradcheck(ffn.swiglu_forward, ffn.swiglu_backward, [x, wg, wu, wd])
print("  gradcheck swiglu:", expect_gradcheck("swiglu", rep))

# ---------------------------------------------------------------------------
step(6, "an invariant, live: feeding the identity matrix through a linear layer")
wt = backend.randn(rng, (5, 3), dtype=f64)
eye_out, _ = ffn.linear_forward(xp.eye(5), wt)
print(f"linear(I, w) == w exactly: {bool(xp.all(eye_out == wt))}")
check(bool(xp.all(eye_out == wt)), "linear(I, w) should return w exactly")
_, c2 = ffn.linear_forward(backend.randn(rng, (3, 5), dtype=f64), wt)
dx_eye = ffn.linear_backward(xp.eye(3), c2)[0]
print(f"linear_backward(dy = I) gives dx == w^T exactly: {bool(xp.all(dx_eye == wt.T))}")
check(bool(xp.all(dx_eye == wt.T)), "linear_backward(dy = I) should return dx = w^T exactly")

# ---------------------------------------------------------------------------
step(7, "float32 speed of the two GELUs (a measurement, not a test)")
n = 50_000 if FAST else 1_000_000
a32 = backend.randn(rng, (n,), dtype=np.float32)
for approx in ("tanh", "none"):
    ffn.gelu_forward(a32, approx)
    backend.synchronize(a32)
    t0 = time.perf_counter()
    for _ in range(3):
        out, _ = ffn.gelu_forward(a32, approx)
    backend.synchronize(a32)
    print(f"  gelu_forward({approx!r:6}) on {n:,} float32 values: "
          f"{(time.perf_counter() - t0) / 3 * 1e3:7.2f} ms, dtype stays {out.dtype}")
    check(out.dtype == np.float32, f"gelu_forward({approx!r}) turned float32 into {out.dtype}")
print("\nEvery backward above matched finite differences to better than 1e-7.")
