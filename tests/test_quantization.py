"""quantization.py: float formats, int8/int4/NF4 quantization, LLM.int8(), fake quant (STE)."""
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, strategies as st

from helpers import assert_close, assert_gradcheck, np_, on
from minillm import backprop as bp
from minillm.backend import array_module
from minillm import quantization as Q
from strategies import randn, seeds

# QLoRA's published NF4 levels (bitsandbytes, float32): a fact to compare with, not code.
NF4_PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]

SPECIALS = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 65504.0, 65519.996, 65520.0, -65520.0,
                     2.0 ** -24, 2.0 ** -25, 2.0 ** -25 * 1.0000001, 3 * 2.0 ** -26, 2.0 ** -14,
                     2.0 ** -14 - 2.0 ** -25, 1e-40, -1e-45, 3.4e38, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11,
                     1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 3.3895314e38],
                    dtype=np.float32)


def random_float32(seed, n=4000):
    """Every kind of float32: random bit patterns (all exponents, subnormals, NaNs), a band
    around fp16's subnormal/normal boundary, ordinary values, and the special cases."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2 ** 32, size=n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    small = (rng.standard_normal(n // 4) * 2.0 ** rng.integers(-27, -12, n // 4)).astype(np.float32)
    ordinary = (rng.standard_normal(n // 4) * 100).astype(np.float32)
    return np.concatenate([bits, small, ordinary, SPECIALS])


def host(x):
    return np.asarray(np_(x))


# --- float formats -------------------------------------------------------------

@given(seed=seeds)
def test_fp16_round_equals_numpy_cast_and_bits_match(xp, seed):
    x = random_float32(seed)
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16)
    got_bits = host(Q.float32_to_fp16_bits(on(xp, x)))
    nan = np.isnan(x)
    assert np.array_equal(got_bits[~nan], ref.view(np.uint16)[~nan])
    assert np.all(np.isnan(ref[nan].astype(np.float32))) and np.all((got_bits[nan] & 0x7C00) == 0x7C00)
    got = host(Q.fp16_round(on(xp, x)))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, ref.astype(np.float32))  # NaN == NaN here; +-0 compared by value
    assert np.array_equal(np.signbit(got[~nan]), np.signbit(x[~nan]))


def test_fp16_and_bf16_decode_every_bit_pattern(xp):
    allh = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16)
    got = host(Q.fp16_bits_to_float32(on(xp, allh)))
    ref = allh.view(np.float16).astype(np.float32)
    ok = ~np.isnan(ref)
    assert np.array_equal(got.view(np.uint32)[ok], ref.view(np.uint32)[ok]) and np.all(np.isnan(got[~ok]))
    # bf16 is the top half of a float32: decoding appends 16 zero bits
    got = host(Q.bf16_bits_to_float32(on(xp, allh)))
    assert np.array_equal(got.view(np.uint32), allh.astype(np.uint32) << 16)


@given(seed=seeds)
def test_bf16_round_is_nearest_with_ties_to_even(xp, seed):
    """An independent check without torch: the answer is the nearer of the two bf16 values
    around x (truncation and truncation + 1 ulp), the even one on a tie."""
    x = random_float32(seed)
    x = x[np.isfinite(x) & (np.abs(x) < 3.3e38)]  # beyond this the upper neighbour is inf
    got = host(Q.bf16_round(on(xp, x))).astype(np.float64)
    u = x.view(np.uint32)
    down = ((u >> 16) << 16).view(np.float32).astype(np.float64)     # toward zero
    up = (((u >> 16) + 1) << 16).astype(np.uint32).view(np.float32).astype(np.float64)
    xd = x.astype(np.float64)
    d_down, d_up = np.abs(xd - down), np.abs(up - xd)
    even_is_down = ((u >> 16) & 1) == 0
    want = np.where(d_down < d_up, down, np.where(d_up < d_down, up, np.where(even_is_down, down, up)))
    np.testing.assert_array_equal(got, want)


@given(seed=seeds)
def test_bf16_bits_match_torch_bit_for_bit(xp, seed):
    torch = pytest.importorskip("torch")
    x = random_float32(seed)
    ref = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = host(Q.float32_to_bf16_bits(on(xp, x)))
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], ref[~nan])
    assert np.all(np.isnan(host(Q.bf16_bits_to_float32(on(xp, got[nan])))))


@given(seed=seeds, fmt=st.sampled_from(["fp16", "bf16"]))
def test_float_rounding_is_monotone_and_exact_on_representable_values(xp, seed, fmt):
    rnd = Q.fp16_round if fmt == "fp16" else Q.bf16_round
    x = random_float32(seed)
    x = np.sort(x[~np.isnan(x)])
    r = host(rnd(on(xp, x)))
    assert np.all(r[1:] >= r[:-1])                                      # monotone
    assert np.array_equal(host(rnd(on(xp, r))), r)                      # idempotent
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 2 ** 16, size=2000).astype(np.uint16)
    decode = Q.fp16_bits_to_float32 if fmt == "fp16" else Q.bf16_bits_to_float32
    v = host(decode(on(xp, b)))
    v = v[~np.isnan(v)]
    assert np.array_equal(host(rnd(on(xp, v))).view(np.uint32), v.view(np.uint32))  # exact, sign of 0 too


def test_float_format_errors_name_the_argument(xp):
    with pytest.raises(TypeError, match="x: expected a float32"):
        Q.bf16_round(on(xp, np.zeros(3)))
    with pytest.raises(TypeError, match="x: expected a float32"):
        Q.float32_to_fp16_bits(on(xp, np.zeros(3, dtype=np.float16)))
    with pytest.raises(TypeError, match="h: expected a uint16"):
        Q.fp16_bits_to_float32(on(xp, np.zeros(3, dtype=np.int32)))
    with pytest.raises(TypeError, match="x: expected a numpy or cupy array"):
        Q.fp16_round([1.0, 2.0])


# --- quantize / dequantize -------------------------------------------------------

@st.composite
def quant_case(draw):
    scheme = draw(st.sampled_from(Q.SCHEMES))
    bits = 4 if scheme == "nf4" else draw(st.sampled_from(Q.BITS))
    granularity = draw(st.sampled_from(Q.GRANULARITIES))
    group_size = draw(st.sampled_from([1, 2, 3, 4]))
    n_in = group_size * draw(st.integers(1, 4))
    n_out = draw(st.integers(1, 5))
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    # columns of very different sizes make the granularities differ
    w = rng.standard_normal((n_in, n_out)) * np.exp(rng.uniform(-3, 3, size=n_out))
    w[rng.random(w.shape) < 0.1] = 0.0
    return w, bits, scheme, granularity, group_size


@given(case=quant_case())
def test_dequantize_error_is_at_most_half_a_step(xp, case):
    w, bits, scheme, granularity, g = case
    qt = Q.quantize(on(xp, w), bits, scheme, granularity, group_size=g)
    d = host(qt.dequantize())
    assert d.dtype == w.dtype and d.shape == w.shape
    bound = host(Q.quantization_error_bound(qt))
    assert np.all(np.abs(d - w) <= bound * (1 + 1e-12) + 1e-300), np.max(np.abs(d - w) - bound)
    if scheme != "nf4":  # the integer bound is scale / 2, written out
        scale = host(qt.scale)
        if granularity == "tensor":
            per_elem = np.full(w.shape, scale)
        elif granularity == "channel":
            per_elem = np.broadcast_to(scale[None, :], w.shape)
        else:
            per_elem = np.repeat(scale, g, axis=0)
        np.testing.assert_allclose(bound, per_elem / 2, rtol=0, atol=0)


@pytest.mark.parametrize("scheme,bits", [("symmetric", 8), ("symmetric", 4), ("asymmetric", 8), ("nf4", 4)])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_an_all_zero_block_gets_a_positive_scale_and_the_code_of_zero(xp, scheme, bits, granularity):
    # a zero scale would store 0/0 codes (NaN, then an arbitrary level) that decode to 0 only
    # because they are multiplied by 0: the code itself must mean 0, the scale stay usable
    w = np.zeros((4, 3))
    if granularity != "tensor":
        w[:, 1] = [0.5, -1.0, 2.0, 0.25]   # column 0 and 2 (and their groups) stay all zero
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # no 0/0 along the way either
        qt = Q.quantize(on(xp, w), bits, scheme, granularity, group_size=2)
        d = host(qt.dequantize())
    scale = host(qt.scale)
    assert np.all(np.isfinite(scale)) and np.all(scale > 0)
    codes = host(qt.codes()).astype(np.int64)
    zero = w == 0
    if scheme == "nf4":
        level = Q.nf4_codebook()[codes]
    elif scheme == "asymmetric":
        zp = host(qt.zero_point).astype(np.int64)
        zp = np.repeat(zp, 2, axis=0) if granularity == "group" else np.broadcast_to(zp, w.shape)
        level = codes - zp
    else:
        level = codes
    assert np.all(level[zero] == 0) and np.all(d[zero] == 0.0)


@given(case=quant_case())
def test_zero_maps_to_zero_and_the_grid_is_a_fixed_point(xp, case):
    w, bits, scheme, granularity, g = case
    w = w.copy()
    w.flat[0] = 0.0
    qt = Q.quantize(on(xp, w), bits, scheme, granularity, group_size=g)
    d = host(qt.dequantize())
    assert np.all(d[w == 0] == 0.0)          # every scheme here keeps 0 exactly representable
    qt2 = Q.quantize(on(xp, d), bits, scheme, granularity, group_size=g)
    assert np.array_equal(host(qt2.codes()), host(qt.codes()))
    assert_close(qt2.dequantize(), d, rtol=1e-12, atol=0)


@given(seed=seeds, n=st.integers(1, 41), signed=st.booleans())
def test_int4_pack_unpack_round_trip(xp, seed, n, signed):
    rng = np.random.default_rng(seed)
    lo, hi = (-8, 7) if signed else (0, 15)
    q = rng.integers(lo, hi + 1, size=n).astype(np.int8 if signed else np.uint8)
    packed = Q.pack_int4(on(xp, q), signed=signed)
    assert packed.dtype == np.uint8 and packed.shape == ((n + 1) // 2,)
    assert np.array_equal(host(Q.unpack_int4(packed, n, signed=signed)), q.astype(np.int8))
    # the layout: element 2i is the low nibble of byte i
    p = host(packed)
    assert (p[0] & 0xF) == (int(q[0]) & 0xF)


def test_int4_pack_rejects_out_of_range_codes(xp):
    with pytest.raises(ValueError, match=r"q: expected values in \[-8, 7\]"):
        Q.pack_int4(on(xp, np.array([0, 8], dtype=np.int8)))
    with pytest.raises(ValueError, match="size"):
        Q.unpack_int4(on(xp, np.zeros(2, dtype=np.uint8)), 5)


def test_nf4_codebook_is_qlora_s():
    c = Q.nf4_codebook()
    assert c.shape == (16,) and np.all(np.diff(c) > 0) and c[0] == -1 and c[-1] == 1 and 0.0 in c
    np.testing.assert_allclose(c, NF4_PUBLISHED, atol=2e-7)


def test_nbytes_and_compression_ratios(xp):
    w = on(xp, randn(0, 256, 64).astype(np.float32))
    f32 = 256 * 64 * 4
    q8 = Q.quantize(w, 8, "symmetric", "channel")
    assert q8.nbytes == 256 * 64 + 64 * 4 and q8.data.dtype == np.int8
    q4 = Q.quantize(w, 4, "symmetric", "group", group_size=128)
    assert q4.nbytes == 256 * 64 // 2 + 2 * 64 * 4 and q4.data.shape == (256 * 64 // 2,)
    nf4 = Q.quantize(w, 4, "nf4", "group", group_size=128)
    assert nf4.nbytes == q4.nbytes
    qa = Q.quantize(w, 4, "asymmetric", "group", group_size=128)
    assert qa.nbytes == q4.nbytes + 2 * 64          # one uint8 zero point per group
    assert 3.8 < f32 / q8.nbytes <= 4 and 7 < f32 / q4.nbytes <= 8


def test_finer_granularity_and_nf4_reduce_error_on_gaussian_weights(xp):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((256, 32)) * np.exp(rng.uniform(-2, 2, 32))  # columns of different sizes
    err = {}
    for bits, scheme, gran in [(8, "symmetric", "tensor"), (8, "symmetric", "channel"),
                               (4, "symmetric", "group"), (4, "nf4", "group")]:
        d = host(Q.quantize(on(xp, w), bits, scheme, gran, group_size=64).dequantize())
        err[(bits, scheme, gran)] = np.mean((d - w) ** 2)
    assert err[(8, "symmetric", "channel")] < err[(8, "symmetric", "tensor")]
    assert err[(4, "nf4", "group")] < err[(4, "symmetric", "group")]  # same bytes, better levels


def test_float32_stays_float32(xp):
    w = on(xp, randn(2, 8, 4).astype(np.float32))
    for scheme in Q.SCHEMES:
        qt = Q.quantize(w, 4, scheme, "group", group_size=4)
        assert qt.dequantize().dtype == np.float32 and qt.scale.dtype == np.float32


def test_quantize_errors_name_the_argument(xp):
    w = on(xp, randn(0, 6, 4))
    with pytest.raises(ValueError, match="bits: expected 4 or 8, got 3"):
        Q.quantize(w, bits=3)
    with pytest.raises(ValueError, match="group_size: expected a divisor of w.shape"):
        Q.quantize(w, 4, granularity="group", group_size=4)
    with pytest.raises(ValueError, match="group_size: expected a positive int"):
        Q.quantize(w, 4, granularity="group", group_size=0)
    with pytest.raises(TypeError, match="w: expected a floating-point array"):
        Q.quantize(on(xp, np.ones((4, 4), dtype=np.int32)))
    with pytest.raises(ValueError, match="bits: the nf4 scheme"):
        Q.quantize(w, 8, scheme="nf4")
    with pytest.raises(ValueError, match="scheme"):
        Q.quantize(w, 8, scheme="log")
    with pytest.raises(ValueError, match="granularity"):
        Q.quantize(w, 8, granularity="row")
    with pytest.raises(ValueError, match="w: channel granularity needs a 2-D"):
        Q.quantize(on(xp, np.ones(4)), 8, granularity="channel")
    with pytest.raises(ValueError, match="w: expected finite"):
        Q.quantize(on(xp, np.array([1.0, np.nan])))
    with pytest.raises(TypeError, match="qt"):
        Q.dequantize(w)


# --- LLM.int8() --------------------------------------------------------------------

@given(seed=seeds, n=st.integers(1, 4), k=st.sampled_from([1, 7, 1100]), m=st.integers(1, 4))
def test_int8_matmul_is_exact_int32_accumulation(xp, seed, n, k, m):
    rng = np.random.default_rng(seed)
    a = rng.integers(-127, 128, size=(n, k)).astype(np.int8)
    b = rng.integers(-127, 128, size=(k, m)).astype(np.int8)
    a[0, :] = 127
    b[:, 0] = 127                                   # the largest possible sum: k * 127^2
    got = Q.int8_matmul_exact(on(xp, a), on(xp, b))
    assert got.dtype == np.int32
    assert np.array_equal(host(got), a.astype(np.int64) @ b.astype(np.int64))


@given(seed=seeds, n=st.integers(1, 5), k=st.integers(2, 12), m=st.integers(1, 5))
def test_llm_int8_matmul_error_is_bounded_and_outliers_are_kept(xp, seed, n, k, m):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k))
    # one outlier feature, as in large transformers: beyond the threshold 6 in every row
    # (x 100 alone is not: a draw under 0.06 stays under it)
    x[:, 0] = np.where(x[:, 0] < 0, -1.0, 1.0) * (7.0 + 100.0 * np.abs(x[:, 0]))
    w = rng.standard_normal((k, m))
    wq = Q.quantize(on(xp, w), 8, "symmetric", "channel")
    wd = host(wq.dequantize())
    y = host(Q.llm_int8_matmul(on(xp, x), wq, threshold=6.0))
    assert host(Q.outlier_features(on(xp, x), 6.0))[0]
    # inlier features are rounded to sx / 2 per element, so |y - x @ Wd| <= sx / 2 * sum |Wd|
    inl = ~host(Q.outlier_features(on(xp, x), 6.0))
    sx = np.abs(np.where(inl, x, 0)).max(axis=1, keepdims=True) / 127
    bound = sx / 2 * np.abs(wd[inl]).sum(axis=0)[None, :]
    assert np.all(np.abs(y - x @ wd) <= bound * (1 + 1e-9) + 1e-12)
    # without the decomposition the outlier sets every row's scale: the same bound then
    # holds with the row's absmax (>= 7, against the inliers' few units), which is what
    # makes the decomposition pay. (Any one row may still round luckily, so the errors
    # themselves are not compared.)
    y_plain = host(Q.llm_int8_matmul(on(xp, x), wq, threshold=np.inf))
    s_plain = np.abs(x).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(y_plain - x @ wd) <= s_plain / 2 * np.abs(wd).sum(axis=0)[None, :] * (1 + 1e-9) + 1e-12)


def test_quantized_linear_paths(xp):
    x = on(xp, randn(3, 2, 3, 16))
    w = randn(4, 16, 8)
    b = on(xp, randn(5, 8))
    q4 = Q.quantize(on(xp, w), 4, "nf4", "group", group_size=8)
    y = Q.quantized_linear(x, q4, b)
    assert y.shape == (2, 3, 8)
    assert_close(y, host(x) @ host(q4.dequantize()) + host(b), rtol=1e-12, atol=1e-12)
    q8 = Q.quantize(on(xp, w), 8, "symmetric", "channel")
    y8 = Q.quantized_linear(x, q8, b)
    assert_close(y8, host(x) @ w + host(b), rtol=0, atol=0.1)
    with pytest.raises(ValueError, match="qweight: expected shape"):
        Q.quantized_linear(on(xp, randn(0, 2, 5)), q8)
    with pytest.raises(ValueError, match="bias: expected shape"):
        Q.quantized_linear(x, q8, on(xp, randn(0, 7)))
    with pytest.raises(ValueError, match="w: expected an 8-bit symmetric per-channel"):
        Q.llm_int8_matmul(on(xp, randn(0, 2, 16)), q4)


# --- fake quantization and the straight-through estimator -----------------------

@given(seed=seeds, bits=st.sampled_from(Q.BITS), gran=st.sampled_from(["tensor", "channel"]))
def test_fake_quant_equals_quantize_then_dequantize(xp, seed, bits, gran):
    w = on(xp, randn(seed, 6, 3))
    s = Q.absmax_scale(w, bits, gran)
    y, _ = Q.fake_quant_forward(w, s, bits)
    assert_close(y, Q.quantize(w, bits, "symmetric", gran).dequantize(), rtol=0, atol=0)


def _away_from_boundaries(x, lo, hi, scale, margin=1e-3):
    """Nudge values that sit near a clipping edge or a rounding midpoint, where neither the
    clip nor the rounding is differentiable, to a safe place."""
    x = x.copy()
    for edge in (lo, hi):
        near = np.abs(x - edge) < margin
        x[near] = edge + 2 * margin * np.sign(x[near] - edge + 1e-300)
    frac = x / scale - np.floor(x / scale)
    near_mid = np.abs(frac - 0.5) < margin
    x[near_mid] += 0.1 * scale
    return x


@given(seed=seeds, bits=st.sampled_from(Q.BITS), asym=st.booleans())
def test_ste_backward_is_the_derivative_of_clip(xp, seed, bits, asym):
    """The STE is, by definition, not the derivative of round (which is 0 almost everywhere).
    What it is: the derivative of clip(x, lo, hi). So check fake_quant_backward against
    finite differences of clip, on inputs away from the edges, some inside, some clipped."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, 3)) * 2
    scale = 1.5 / (2 ** (bits - 1) - 1)               # range about [-1.5, 1.5]: some entries clip
    z = rng.integers(0, 2 ** bits) if asym else None
    qmin, qmax = (0, 2 ** bits - 1) if asym else (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    zz = z or 0
    lo, hi = (qmin - zz) * scale, (qmax - zz) * scale
    x = _away_from_boundaries(x, lo, hi, scale)
    x = on(xp, x)

    def clip_with_fake_quant_cache(x):
        _, cache = Q.fake_quant_forward(x, scale, bits, zero_point=z)
        return array_module(x).clip(x, lo, hi), cache

    assert_gradcheck(bp.gradcheck(clip_with_fake_quant_cache, Q.fake_quant_backward, [x]))
    # and explicitly: 1 inside, 0 where clipped; the forward is on the grid
    dy = on(xp, rng.standard_normal((4, 3)))
    y, cache = Q.fake_quant_forward(x, scale, bits, zero_point=z)
    dx = host(Q.fake_quant_backward(dy, cache))
    inside = (host(x) >= lo) & (host(x) <= hi)
    assert np.array_equal(dx, np.where(inside, host(dy), 0.0))
    codes = host(y) / scale + zz
    assert_close(codes, np.rint(codes), rtol=0, atol=1e-9)
    assert np.all((codes > qmin - 1e-9) & (codes < qmax + 1e-9))


def test_fake_quant_errors_name_the_argument(xp):
    x = on(xp, randn(0, 4, 3))
    with pytest.raises(ValueError, match="scale: expected a scalar or shape"):
        Q.fake_quant_forward(x, on(xp, np.ones(3)), 8)      # (3,) would broadcast silently
    with pytest.raises(ValueError, match="bits: expected 4 or 8"):
        Q.fake_quant_forward(x, 0.1, 2)
    with pytest.raises(ValueError, match="scale: expected positive"):
        Q.fake_quant_forward(x, 0.0, 8)
    y, _ = Q.fake_quant_forward(x, on(xp, np.full((1, 3), 0.1)), 8)   # keepdims per-channel is fine
    assert y.shape == (4, 3)


# --- the quantize command -------------------------------------------------------

def _tiny_run(tmp_path):
    import dataclasses
    from minillm import gpt, train
    from minillm.tokenizer import CharTokenizer
    text = "".join(f"line {i}: to be or not to be, that is the question.\n" for i in range(200))
    (tmp_path / "data.txt").write_text(text)
    tok = CharTokenizer.from_text(text)
    cfg = gpt.GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32)
    params = gpt.init_params(cfg, seed=0, device="cpu")  # compared with NumPy below, on any device
    train.save_checkpoint(tmp_path / "run", params, step=0, model_config=dataclasses.asdict(cfg), tokenizer=tok)
    return cfg, params


@pytest.mark.parametrize("bits,scheme,emb", [(8, "symmetric", "quantize"), (4, "nf4", "float")])
def test_quantize_command_writes_a_checkpoint_that_loads_back(tmp_path, capsys, bits, scheme, emb):
    from minillm.__main__ import main
    from minillm.cli.quantize import load_quantized
    _, params = _tiny_run(tmp_path)
    out = tmp_path / "q.npz"
    rc = main(["quantize", str(tmp_path / "run"), "--bits", str(bits), "--scheme", scheme,
               "--group-size", "16", "--compare", "selected", "--eval-windows", "4", "--batch-size", "2",
               "--data", str(tmp_path / "data.txt"), "--embeddings", emb, "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "float32" in text and "ppl" in text and f"wrote {out}" in text
    q = load_quantized(out)
    assert list(q["params"]) == list(params)
    gran = "channel" if bits == 8 else "group"
    for name, p in params.items():
        got = q["params"][name]
        assert got.shape == p.shape and got.dtype == p.dtype
        if p.ndim == 2 and not (emb == "float" and name in ("wte", "wpe")):
            w = p.T if name in ("wte", "wpe") else p
            want = Q.quantize(w, bits, scheme, gran, group_size=16).dequantize()
            np.testing.assert_array_equal(got, want.T if name in ("wte", "wpe") else want)
        else:
            np.testing.assert_array_equal(got, p)


def test_quantize_command_reports_a_bad_group_size(tmp_path, capsys):
    from minillm.__main__ import main
    _tiny_run(tmp_path)
    rc = main(["quantize", str(tmp_path / "run"), "--bits", "4", "--group-size", "24", "--compare", "selected",
               "--eval-windows", "2", "--data", str(tmp_path / "data.txt")])
    text = capsys.readouterr().err    # a user's mistake is reported on stderr (issue 17, item 6)
    assert rc == 2 and "group_size: expected a divisor" in text and "while quantizing" in text


def test_quantize_command_uses_the_runs_own_validation_tokens(tmp_path, capsys):
    from minillm.__main__ import main
    from minillm.data import write_tokens
    cfg, _ = _tiny_run(tmp_path)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=200)
    write_tokens(ids, tmp_path / "run" / "val.npy", vocab_size=cfg.vocab_size)
    rc = main(["quantize", str(tmp_path / "run"), "--compare", "selected", "--eval-windows", "3",
               "--out", str(tmp_path / "q.npz")])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "the run's own validation tokens" in text and "3 windows x 16 tokens" in text


def test_sample_reads_a_quantized_checkpoint(tmp_path, capsys):
    # Sampling from the quantized file runs the dequantized weights: greedy text equals
    # generate() on load_quantized's params, and differs from nothing we could silently fall
    # back to (the float run is a different file, recognised as not quantized).
    from minillm import gpt
    from minillm.__main__ import main
    from minillm.cli.quantize import is_quantized_checkpoint, load_quantized
    from minillm.tokenizer import CharTokenizer
    cfg, _ = _tiny_run(tmp_path)
    out = tmp_path / "q.npz"
    assert main(["quantize", str(tmp_path / "run"), "--bits", "4", "--scheme", "nf4", "--group-size", "16",
                 "--compare", "selected", "--eval-windows", "2", "--data", str(tmp_path / "data.txt"),
                 "--out", str(out)]) == 0
    assert is_quantized_checkpoint(out)
    assert not is_quantized_checkpoint(tmp_path / "run" / "checkpoint.npz")
    assert not is_quantized_checkpoint(tmp_path / "data.txt")
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(out), "--prompt", "line", "--max-new-tokens", "12",
                 "--temperature", "0", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    q = load_quantized(out)
    tok = CharTokenizer.from_dict(q["meta"]["tokenizer"])
    want = gpt.generate(q["params"], cfg, tok.encode("line"), 12, temperature=0.0)
    assert "nf4 4-bit, group" in text
    assert tok.decode(want) in text


def test_bench_quantization_splits_the_cost_into_systematic_and_first_order(tmp_path, capsys):
    # The two columns are half the sum and half the difference of the quantized and the
    # mirrored loss changes, so they must add back up to the quantized row's log change.
    from minillm.__main__ import main
    from minillm.data import write_tokens
    cfg, _ = _tiny_run(tmp_path)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=300)
    write_tokens(ids, tmp_path / "run" / "val.npy", vocab_size=cfg.vocab_size)
    assert main(["bench", "quantization", "--checkpoint", str(tmp_path / "run"), "--group-sizes", "16,32",
                 "--eval-windows", "4", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines() if line.startswith(("int4 group", "nf4 group"))]
    assert [r[0] + r[2] for r in rows] == ["int416", "nf416", "int432", "nf432"]
    for r in rows:
        quantized, systematic, first = (float(r[i].rstrip("%")) for i in (5, 7, 8))
        assert math.isclose(math.log1p(quantized / 100), (systematic + first) / 100, abs_tol=2e-4)
    assert main(["bench", "quantization", "--checkpoint", str(tmp_path / "run"), "--group-sizes", "12"]) == 2
    assert "group_size: expected a divisor" in capsys.readouterr().out
