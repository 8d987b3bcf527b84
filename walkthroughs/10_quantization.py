"""Walkthrough 10: quantization, from float bits to int4 weights and quantization-aware training.

Run: python walkthroughs/10_quantization.py   (MINILLM_FAST=1 for the quick version)

A trained model is a few big matrices of float32 numbers. Storing them in fewer
bits makes the model smaller (and, on hardware with small-integer arithmetic,
faster); the question is always how much accuracy the rounding costs. We go
step by step: smaller float formats, integer codes with a scale, where to put the
scales, 4 bits and NF4, the outlier problem that LLM.int8() solves, and finally
training *through* the rounding with the straight-through estimator.
"""
import numpy as np

from _narrate import FAST, check, expect_close, step
from minillm import quantization as Q

np.set_printoptions(precision=4, suppress=True, linewidth=100)


def bits32(x):
    b = f"{int(np.float32(x).view(np.uint32)):032b}"
    return f"{b[0]} {b[1:9]} {b[9:]}"


def bits16(u, exp_bits):
    b = f"{int(u):016b}"
    return f"{b[0]} {b[1:1 + exp_bits]} {b[1 + exp_bits:]}"


# ---------------------------------------------------------------------------
step(1, "float32, bf16 and fp16, bit by bit")
print("A float is sign | exponent | mantissa: value = (-1)^s * 1.mantissa * 2^(exponent - bias).")
print("float32: 1 | 8 | 23.  bf16: 1 | 8 | 7 (the top half of a float32).  fp16: 1 | 5 | 10.")
x = np.array([1 / 3], dtype=np.float32)
print(f"\n1/3 as float32      {bits32(x[0])}   = {x[0]:.10f}")
b = Q.float32_to_bf16_bits(x)
print(f"1/3 as bf16         {bits16(b[0], 8)}            = {Q.bf16_bits_to_float32(b)[0]:.10f}"
      "   (same exponent field: just the top 16 bits, rounded)")
h = Q.float32_to_fp16_bits(x)
print(f"1/3 as fp16         {bits16(h[0], 5)}            = {Q.fp16_bits_to_float32(h)[0]:.10f}"
      "   (exponent rebiased from 127 to 15, 10 mantissa bits)")
u = int(x.view(np.uint32)[0])
check(int(b[0]) == (u + 0x7FFF + ((u >> 16) & 1)) >> 16, "bf16 bits should be float32's top 16, rounded to even")
check(int(h[0]) == int(x.astype(np.float16).view(np.uint16)[0]), "fp16 bits should match NumPy's float16")

print("\nRange versus precision (float32 in, nearest value of each format out):")
probe = np.array([70000.0, 1e-8, 1 + 2 ** -9, 3.0e38], dtype=np.float32)
print(f"  {'x':>14} {'bf16':>14} {'fp16':>14}")
with np.errstate(over="ignore"):
    for v, bv, hv in zip(probe, Q.bf16_round(probe), Q.fp16_round(probe)):
        print(f"  {v:>14.8g} {bv:>14.8g} {hv:>14.8g}")
    check(np.array_equal(Q.fp16_round(probe), probe.astype(np.float16).astype(np.float32)),
          "fp16_round should agree with NumPy's own float16 rounding")
check(Q.bf16_round(probe)[2] == 1 and np.isfinite(Q.bf16_round(probe)).all(),
      "bf16 should round 1 + 2^-9 to 1 and keep float32's range")
print("fp16 overflows above 65504 and flushes 1e-8 to 0 (its smallest subnormal is 2^-24 ~ 6e-8);")
print("bf16 keeps float32's range but only ~3 significant digits: 1 + 2^-9 rounds back to 1.")
print("That range is why bf16 trains without loss scaling and fp16 needs it.")

tie = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8], dtype=np.float32)
print("\nTies go to the even neighbour: bf16 steps near 1 are 2^-7, so 1 + 2^-8 and 1 + 3*2^-8")
print(f"are exactly halfway, and round to {Q.bf16_round(tie)[0]} and {Q.bf16_round(tie)[1]} "
      "(last mantissa bits 0 and 0: the even neighbours).")
print("The trick in float32_to_bf16_bits: add 0x7FFF + (lowest kept bit), then drop 16 bits.")
check(Q.bf16_round(tie).tolist() == [1.0, 1.015625], f"ties should go to even: {Q.bf16_round(tie)}")

# ---------------------------------------------------------------------------
step(2, "absmax int8: a scale and 255 levels")
w = np.array([0.823, -0.3141, 0.0527, -1.27, 0.0, 0.6049], dtype=np.float32)
qt = Q.quantize(w, bits=8, scheme="symmetric", granularity="tensor")
print(f"w         = {w}")
print(f"scale     = absmax / 127 = {abs(w).max():.2f} / 127 = {float(qt.scale):.6f}")
print(f"q         = round(w / scale) = {qt.codes()}")
print(f"dequant   = q * scale = {qt.dequantize()}")
err = np.abs(qt.dequantize() - w)
print(f"|error|   = {err}  <= scale/2 = {float(qt.scale) / 2:.6f}: rounding is off by at most half a step")
check(np.isclose(float(qt.scale), np.abs(w).max() / 127, rtol=1e-6), "the scale should be absmax / 127")
check(np.array_equal(qt.codes(), np.round(w / qt.scale)), "the codes should be round(w / scale)")
check(bool(np.all(err <= float(qt.scale) / 2 * (1 + 1e-6))), "rounding should be off by at most half a step")
print("We use [-127, 127], not [-128, 127]: a symmetric grid maps 0 to exactly 0, which matters")
print("for padding, ReLU zeros and sparse weights.")

# ---------------------------------------------------------------------------
step(3, "per-tensor versus per-channel scales")
rng = np.random.default_rng(0)
n_in, n_out = (64, 6) if FAST else (256, 6)
col_sizes = np.array([0.01, 0.05, 0.1, 0.5, 1.0, 3.0], dtype=np.float32)
W = (rng.standard_normal((n_in, n_out)) * col_sizes).astype(np.float32)
print(f"A weight W ({n_in}, {n_out}) whose columns (output channels) have std {col_sizes}.")
rel_err = {}
for gran in ("tensor", "channel"):
    d = Q.quantize(W, 8, "symmetric", gran).dequantize()
    rel = rel_err[gran] = np.sqrt(((d - W) ** 2).mean(0)) / W.std(0)
    print(f"  int8 per-{gran:<8} relative RMS error per column: {rel}")
check(rel_err["channel"].max() < 0.02 < rel_err["tensor"][0],
      "per-channel scales should give every column ~1% error, where one scale drowns the smallest")
print("With one scale the biggest column sets the step, and the small columns drown in it;")
print("one scale per output column (4 extra bytes per column) fixes that.")

# ---------------------------------------------------------------------------
step(4, "group-wise int4, two codes per byte")
g = 32
W4 = rng.standard_normal((128, 4)).astype(np.float32)
qt4 = Q.quantize(W4, bits=4, scheme="symmetric", granularity="group", group_size=g)
print(f"int4 codes live in [-7, 7]; one scale per {g} consecutive rows of each column "
      f"(scale shape {qt4.scale.shape}).")
codes = qt4.codes().reshape(-1)[:6]
print(f"first codes {codes} -> 4-bit two's complement nibbles "
      f"{[format(int(c) & 0xF, '04b') for c in codes]}")
print(f"packed (low nibble first): {[format(int(v), '02x') for v in qt4.data[:3]]}")
check(np.array_equal(Q.unpack_int4(qt4.data, W4.size).reshape(W4.shape), qt4.codes()),
      "unpacking the int4 bytes should give back the codes")
nib = [int(c) & 0xF for c in qt4.codes().reshape(-1)[:6]]
check([int(v) for v in qt4.data[:3]] == [nib[0] | nib[1] << 4, nib[2] | nib[3] << 4, nib[4] | nib[5] << 4],
      "two codes per byte, the first in the low nibble")
print(f"bytes: float32 {W4.nbytes}, int4 {qt4.data.nbytes} + scales {qt4.scale.nbytes} = {qt4.nbytes} "
      f"({W4.nbytes / qt4.nbytes:.1f}x smaller)")
check(qt4.data.nbytes == W4.size // 2 and qt4.nbytes == qt4.data.nbytes + qt4.scale.nbytes,
      "int4 should take half a byte per weight, plus the scales")
group_err = []
for gs in (128, 32, 8):
    d = Q.quantize(W4, 4, "symmetric", "group", group_size=gs)
    group_err.append(np.sqrt(((d.dequantize() - W4) ** 2).mean()))
    print(f"  group_size {gs:>3}: RMS error {group_err[-1]:.4f}, {d.nbytes} bytes")
check(group_err == sorted(group_err, reverse=True), f"smaller groups should give less error: {group_err}")
print("Smaller groups: less error, more scales. 128 is the usual compromise.")

# ---------------------------------------------------------------------------
step(5, "NF4: 16 levels where normal weights actually are")
print("Trained weights are roughly normal, so evenly spaced levels waste codes on the rare tails.")
print(f"NF4 levels (normal quantiles, scaled to [-1, 1], 0 exact):\n  {Q.nf4_codebook()}")
print("int4 levels (/7):\n  ", np.arange(-7, 8) / 7)
Wn = rng.standard_normal((512 if not FAST else 256, 8)).astype(np.float32)
four_bit = {}
for scheme in ("symmetric", "asymmetric", "nf4"):
    d = Q.quantize(Wn, 4, scheme, "group", group_size=64)
    four_bit[scheme] = (np.sqrt(((d.dequantize() - Wn) ** 2).mean()), d.nbytes)
    print(f"  4-bit {scheme:<10}: RMS error {four_bit[scheme][0]:.4f}, {d.nbytes} bytes")
check(four_bit["nf4"][1] == four_bit["symmetric"][1] and four_bit["nf4"][0] < four_bit["symmetric"][0],
      f"NF4 should take the bytes of symmetric int4 with less error: {four_bit}")
print("Same bytes as symmetric int4, less error: that is QLoRA's NF4.")
print("Less weight error is not automatically less perplexity. With d = w_q - w the loss moves by")
print("g.d + d'Hd/2: the curvature part grows with the error, but the gradient part g.d has a sign")
print("set by which way each weight happened to round. On a tiny model that luck can outweigh")
print("NF4's edge; on a 10.7M-parameter one NF4 wins (BENCHMARKS.md). `python -m minillm bench")
print("quantization` measures both parts by also running the mirrored error w - d.")

# ---------------------------------------------------------------------------
step(6, "outliers and LLM.int8()")
X = rng.standard_normal((8, 64)).astype(np.float32)
X[:, 5] *= 40.0   # large transformers grow a few such features (Dettmers et al. 2022)
Wl = (rng.standard_normal((64, 16)) * 0.1).astype(np.float32)
exact = X @ Wl
print(f"Activations X (8, 64) with feature 5 about 40x larger: max |x| = {np.abs(X).max():.1f}.")
print(f"outlier features (|x| > 6): {np.flatnonzero(Q.outlier_features(X, 6.0))}")
check(np.flatnonzero(Q.outlier_features(X, 6.0)).tolist() == [5], "feature 5, and only it, should be an outlier")
plain = Q.llm_int8_matmul(X, Wl, threshold=np.inf)
mixed = Q.llm_int8_matmul(X, Wl, threshold=6.0)
rel = lambda y: np.linalg.norm(y - exact) / np.linalg.norm(exact)  # noqa: E731
print(f"  int8 for every feature:               relative error {rel(plain):.4f}")
print(f"  outlier feature in float, rest int8:  relative error {rel(mixed):.4f}")
check(rel(mixed) < rel(plain) / 2, "taking the outlier out should at least halve the error")
print("One row scale per token means the outlier sets every row's step; taking its column out")
print("(a few % of features, multiplied in float) gives the other 63 features back their precision.")
a = rng.integers(-127, 128, (3, 64)).astype(np.int8)
bq = rng.integers(-127, 128, (64, 2)).astype(np.int8)
exact_int = np.array_equal(Q.int8_matmul_exact(a, bq), a.astype(np.int64) @ bq)
print(f"The int8 part accumulates in int32 exactly: {exact_int}"
      " (a float GEMM is exact while partial sums stay below 2^24).")
check(exact_int, "int8_matmul_exact should equal the int64 matmul")

# ---------------------------------------------------------------------------
step(7, "fake quantization and the straight-through estimator")
print("Quantization-aware training: the forward pass uses the rounded weights, so the loss sees")
print("the rounding; the backward pretends round() is the identity (its true derivative is 0")
print("almost everywhere, which would stop learning), passing gradients where w was not clipped.")
xs = np.linspace(-2, 2, 9)
y, cache = Q.fake_quant_forward(xs, 0.25, bits=4)   # range [-7 * 0.25, 7 * 0.25] = [-1.75, 1.75]
ste = Q.fake_quant_backward(np.ones_like(xs), cache)
print(f"  x            {xs}\n  fake_quant   {y}\n  STE grad     {ste}")
expect_close("fake_quant vs clip(round(x / s), -7, 7) s", y, np.clip(np.round(xs / 0.25), -7, 7) * 0.25, 1e-12)
check(np.array_equal(ste, (np.abs(xs) <= 1.75).astype(ste.dtype)), "the STE should pass 1 inside the range, 0 out")

# A tiny regression with correlated inputs: there, one weight's rounding error can be
# partly cancelled by its neighbours, which rounding each weight on its own cannot do.
n, d_in, d_out = 256, 16, 4
Xr = rng.standard_normal((n, d_in))
Xr = Xr + 2.0 * Xr[:, :1]                            # every feature shares a common component
w_true = rng.standard_normal((d_in, d_out))
Yr = Xr @ w_true + 0.01 * rng.standard_normal((n, d_out))
w_float = np.linalg.lstsq(Xr, Yr, rcond=None)[0]
mse = lambda w: float(np.mean((Xr @ w - Yr) ** 2))  # noqa: E731
bits = 4
ptq = Q.quantize(w_float, bits, "symmetric", "channel").dequantize()
print(f"\nLinear regression ({n} x {d_in} -> {d_out}, correlated inputs), int{bits} per-channel weights:")
print(f"  float weights                  MSE {mse(w_float):.5f}")
print(f"  quantized after training       MSE {mse(ptq):.5f}")
w = w_float.copy()                                   # fine-tune from the float solution
lr, steps = 0.02, (150 if FAST else 300)
for t in range(steps):
    s = Q.absmax_scale(w, bits, "channel")           # the scale follows the weights; no gradient
    wq, c = Q.fake_quant_forward(w, s, bits)         # forward on the grid
    dpred = 2 * (Xr @ wq - Yr) / Yr.size
    lr_t = lr * 0.5 * (1 + np.cos(np.pi * t / steps))  # cosine decay lets the rounding settle
    w -= lr_t * Q.fake_quant_backward(Xr.T @ dpred, c)  # STE: the gradient wrt wq, masked
qat = Q.quantize(w, bits, "symmetric", "channel").dequantize()
print(f"  quantization-aware, {steps} steps MSE {mse(qat):.5f}")
check(mse(qat) < mse(ptq) / 2, f"QAT should beat rounding after training: {mse(qat):.5f} vs {mse(ptq):.5f}")
print("Training through the rounding lets the weights settle where the grid serves the loss.")
print("(The tests check the STE against finite differences of clip(x, lo, hi): inside the")
print(" range it is the identity, outside it is 0, which is exactly what the STE claims to be.)")
