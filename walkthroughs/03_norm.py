"""03 - Normalisation: LayerNorm and RMSNorm.

Deep networks train well when the vectors flowing through them keep a steady
size. A normalisation layer rescales each token's feature vector (the last
axis) to a fixed size, then applies a learned per-feature gain (and, for
LayerNorm, a bias). GPT-2 and BERT use LayerNorm; LLaMA uses RMSNorm.
Run:  python walkthroughs/03_norm.py
"""
import numpy as np

from _narrate import check, expect_close, expect_gradcheck, step
from minillm import backend, norm
from minillm import backprop as bp

xp = backend.xp_default()
rng = backend.make_rng(0)
f64 = np.float64
np.set_printoptions(precision=4, suppress=True)


def show(a):
    return np.array2string(backend.to_numpy(a), prefix="    ")


def sci(a):
    return "[" + ", ".join(f"{v:.1e}" for v in backend.to_numpy(a).reshape(-1)) + "]"


print(__doc__.split("\n\n")[0])
print(f"device: {backend.device_name()} ({xp.__name__})")

# ---------------------------------------------------------------------------
step(1, "three token vectors of wildly different scale and offset")
C = 6
base = backend.randn(rng, (3, C), dtype=f64)
x = base * xp.asarray([[0.01], [1.0], [300.0]]) + xp.asarray([[5.0], [0.0], [-1000.0]])
print("x (rows: tiny, ordinary, huge and shifted):\n   ", show(x))
weight, bias = xp.ones(C), xp.zeros(C)

# ---------------------------------------------------------------------------
step(2, "LayerNorm: subtract the mean, divide by the standard deviation")
print("y = (x - mean) / sqrt(var + eps) * weight + bias   (per row; var is the 1/C variance)")
y, cache = norm.layernorm_forward(x, weight, bias, eps=1e-5)
yn = backend.to_numpy(y)
print("y:\n   ", show(y))
print("row means:    ", sci(y.mean(-1)))
v = x.var(-1)
print("row variances:", show(y.var(-1)), "  = var / (var + eps):", show(v / (v + 1e-5)))
expect_close("LayerNorm's row means", y.mean(-1), xp.zeros(3), 1e-10)
expect_close("LayerNorm's row variances vs var / (var + eps)", y.var(-1), v / (v + 1e-5), 1e-10)
print(f"The tiny row has var {float(v[0]):.1e}, comparable to eps = 1e-5, so it is NOT blown up")
print("to variance 1: eps is a floor that keeps near-constant rows from dividing by ~0.")
print(f"the cache keeps x (by reference), mean {tuple(cache.mean.shape)} and rstd {tuple(cache.rstd.shape)}:"
      " one number per row, not another full-size array")

# ---------------------------------------------------------------------------
step(3, "an invariant, checked live: LayerNorm forgets scale and offset")
a, c = 7.5, -42.0
y2, _ = norm.layernorm_forward(a * base + c, weight, bias, eps=1e-12)
y1, _ = norm.layernorm_forward(base, weight, bias, eps=1e-12)
d = expect_close(f"LN(x) vs LN({a} x + {c})", y1, y2, 1e-9)
print(f"on standard-normal rows x: max |LN(x) - LN({a} x + {c})| = {d:.1e}   (eps tiny, so exact up to rounding)")
print("RMSNorm only forgets scale:")
r1, _ = norm.rmsnorm_forward(base, weight, eps=1e-12)
r2, _ = norm.rmsnorm_forward(a * base, weight, eps=1e-12)
r3, _ = norm.rmsnorm_forward(base + c, weight, eps=1e-12)
print(f"  max |RMS(x) - RMS({a} x)| = {expect_close(f'RMS(x) vs RMS({a} x)', r1, r2, 1e-9):.1e}")
shift = float(xp.abs(r1 - r3).max())
print(f"  max |RMS(x) - RMS(x + {c})| = {shift:.2f}   (a shift changes it)")
check(shift > 0.1, f"RMSNorm should not forget a shift, but it moved by only {shift:.2e}")

# ---------------------------------------------------------------------------
step(4, "the backward pass")
print("With xhat = (x - mean) * rstd and g = dy * weight:")
print("  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))")
print("The two subtracted terms are the gradient flowing back through the mean and through")
print("the variance. Because LN ignores a shift of x, dx must sum to zero over every row:")
dy = backend.randn(rng, x.shape, dtype=f64)
_, cache = norm.layernorm_forward(x, weight, bias, eps=1e-12)   # eps << var: exact invariances
dx, dweight, dbias = norm.layernorm_backward(dy, cache)
print("  row sums of dx:", sci(dx.sum(-1)))
print("and because (weight 1, eps << var) it ignores scaling too, dx . x is ~0 per row:", sci((dx * x).sum(-1)))
# Both are sums of terms as large as |dx| * |x|: zero up to rounding of that size.
scale = xp.abs(dx).sum(-1) * (1 + xp.abs(x).max(-1))
expect_close("row sums of dx, in units of their terms", dx.sum(-1) / scale, xp.zeros(3), 1e-10)
expect_close("dx . x per row, in units of its terms", (dx * x).sum(-1) / scale, xp.zeros(3), 1e-10)

print("\nFinite-difference checks (random upstream gradients, float64):")
xs = backend.randn(rng, (2, 3, 5), dtype=f64) * 2 + 1
w, b = 1 + 0.3 * backend.randn(rng, (5,), dtype=f64), backend.randn(rng, (5,), dtype=f64)
print("  layernorm:", expect_gradcheck("layernorm", bp.gradcheck(norm.layernorm_forward, norm.layernorm_backward,
                                                                 [xs, w, b])))
print("  rmsnorm:  ", expect_gradcheck("rmsnorm", bp.gradcheck(norm.rmsnorm_forward, norm.rmsnorm_backward, [xs, w])))

# ---------------------------------------------------------------------------
step(5, "why two passes for the variance")
big = xp.asarray([[1e8 + 1.0, 1e8 + 2.0, 1e8 + 3.0, 1e8 + 4.0]])
one_pass = float((big * big).mean() - big.mean() ** 2)
two_pass = float(((big - big.mean()) ** 2).mean())
print(f"x = 1e8 + [1, 2, 3, 4]: E[x^2] - E[x]^2 = {one_pass:g}, E[(x - mean)^2] = {two_pass:g} (true: 1.25)")
check(two_pass == 1.25 and one_pass != 1.25, f"expected the one-pass variance to be wrong, the two-pass exact: "
      f"{one_pass:g}, {two_pass:g}")
print("norm.py computes the mean first and then the mean squared deviation.")
yb, _ = norm.layernorm_forward(big, xp.ones(4), xp.zeros(4), eps=1e-12)
print("LayerNorm of it:", show(yb), " = ([1, 2, 3, 4] - 2.5) / sqrt(1.25)")
expect_close("LayerNorm of 1e8 + [1, 2, 3, 4]", yb, (xp.asarray([[1.0, 2.0, 3.0, 4.0]]) - 2.5) / np.sqrt(1.25), 1e-8)

# ---------------------------------------------------------------------------
step(6, "float32 stays float32")
x32 = backend.randn(rng, (2, 8), dtype=np.float32)
y32, c32 = norm.rmsnorm_forward(x32, xp.ones(8, dtype=np.float32), eps=1e-6)
g32 = norm.rmsnorm_backward(x32, c32)
print(f"rmsnorm float32 in -> {y32.dtype} out, gradients {[g.dtype.name for g in g32]}")
check(all(a.dtype == np.float32 for a in (y32, *g32)), "rmsnorm should keep float32 in float32")
print("\nDone: both norms match finite differences and their invariants hold.")
