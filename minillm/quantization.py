"""Quantization: storing and computing with fewer bits per number.

Four ideas, each small:

1. **Float formats.** float32 has 1 sign, 8 exponent and 23 mantissa bits. bf16
   keeps the 8 exponent bits and 7 mantissa bits (the top half of a float32), so
   it has float32's range and ~3 significant digits; fp16 has 5 exponent and 10
   mantissa bits: more precision, far less range (max 65504). Rounding a float32
   to either is done here with integer bit operations, round to nearest, ties to
   even, exactly as hardware does it.

   Bit-level conversions (all work on NumPy and CuPy arrays):

   - ``float32_to_bf16_bits(x) -> uint16`` and ``bf16_bits_to_float32(b) -> float32``
   - ``float32_to_fp16_bits(x) -> uint16`` and ``fp16_bits_to_float32(h) -> float32``
   - ``bf16_round(x)``, ``fp16_round(x)``: float32 in, float32 out, holding the
     nearest value the smaller format can represent.

2. **Integer quantization.** ``quantize(w, bits, scheme, granularity, group_size)``
   maps floats to small integers with a scale (and, for the asymmetric scheme, a
   zero point): ``w ~ scale * (q - zero_point)``. One scale for the whole tensor
   is simplest; one per output column ("channel") or per group of ``group_size``
   consecutive input rows of each column ("group") follows the data more closely
   at the price of storing more scales. 4-bit codes are packed two per byte.
   The ``nf4`` scheme (QLoRA) replaces the evenly spaced grid with 16 levels placed
   at quantiles of a normal distribution, which is what trained weights look like.

3. **Outliers (LLM.int8()).** A few input features of a large transformer carry
   values far larger than the rest; one absmax scale per row would then crush
   every other feature to zero. ``llm_int8_matmul`` multiplies the outlier
   features in floating point and everything else in int8 with an exact int32
   accumulation.

4. **Fake quantization.** ``fake_quant_forward`` rounds to the grid during
   training (quantization-aware training); its backward is the straight-through
   estimator, which treats rounding as the identity and passes the gradient only
   where the value was not clipped.

Weights follow minillm's ``y = x @ W`` convention, so ``W`` is ``(in, out)``:
"channel" means one scale per column, and groups run down a column (along the
input dimension, the one a matmul sums over).
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

from .backend import array_module, check_array, check_choice, check_float, check_int, check_int_arg, check_shape

BITS = (4, 8)
SCHEMES = ("symmetric", "asymmetric", "nf4")
GRANULARITIES = ("tensor", "channel", "group")


# ---------------------------------------------------------------------------
# Float formats: bf16 and fp16, bit by bit
# ---------------------------------------------------------------------------

def _check_float32(name, x):
    check_array(name, x)
    if x.dtype != np.float32:
        raise TypeError(f"{name}: expected a float32 array (convert with .astype(np.float32) first: "
                        f"rounding float64 -> float32 -> 16 bits can differ from rounding once), "
                        f"got dtype {x.dtype}")


def _check_uint16(name, b):
    check_array(name, b)
    if b.dtype != np.uint16:
        raise TypeError(f"{name}: expected a uint16 array of 16-bit float patterns, got dtype {b.dtype}")


def float32_to_bf16_bits(x):
    """The bf16 bit pattern (uint16) nearest to each float32, ties to even.

    bf16 is the top 16 bits of a float32. Truncating would always round toward
    zero, so first add 0x7FFF plus the lowest kept bit: anything above half an
    ulp carries into the kept part, exactly half carries only when the kept part
    is odd (ties to even). A carry out of the mantissa bumps the exponent, which
    is the right answer, and the largest finite values correctly round to inf.
    NaN would be corrupted by the carry (its payload could round to inf), so it
    becomes a quiet NaN with its sign kept.
    x: (...) float32 -> (...) uint16
    """
    _check_float32("x", x)
    xp = array_module(x)
    u = x.view(xp.uint32)
    lsb = (u >> 16) & 1
    rounded = (u + xp.uint32(0x7FFF) + lsb) >> 16
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    quiet_nan = (u >> 16) | 0x0040
    return xp.where(is_nan, quiet_nan, rounded).astype(xp.uint16)


def bf16_bits_to_float32(b):
    """bf16 bit patterns -> the float32 values they hold (exact: append 16 zero bits).
    b: (...) uint16 -> (...) float32"""
    _check_uint16("b", b)
    xp = array_module(b)
    return (b.astype(xp.uint32) << 16).view(xp.float32)


def bf16_round(x):
    """The nearest bf16 value to each float32 (ties to even), returned as float32.
    x: (...) float32 -> (...) float32"""
    return bf16_bits_to_float32(float32_to_bf16_bits(x))


def float32_to_fp16_bits(x):
    """The IEEE fp16 bit pattern (uint16) nearest to each float32, ties to even.

    fp16: 1 sign bit, 5 exponent bits (bias 15), 10 mantissa bits. With the
    float32 exponent E (unbiased):
      E > 15            overflow: inf
      -14 <= E <= 15    normal: rebias the exponent, keep the top 10 of 23
                        mantissa bits, round on the 13 dropped bits
      -25 <= E < -14    subnormal: value = k * 2^-24, so shift the full 24-bit
                        significand (implicit 1 included) right by -E-1 and round
      E < -25           below half the smallest subnormal: +-0
    Rounding up may carry into the exponent (and from the largest finite into
    inf, or from the largest subnormal into the smallest normal); the bit layout
    makes each of those carries the right answer. NaN becomes a quiet NaN.
    x: (...) float32 -> (...) uint16
    """
    _check_float32("x", x)
    xp = array_module(x)
    u = x.view(xp.uint32)
    sign = (u >> 16) & 0x8000
    e32 = (u >> 23) & 0xFF
    mant = u & 0x7FFFFF
    E = e32.astype(xp.int32) - 127

    # normal fp16: the fp16 exponent E + 15 sits just above the 23 mantissa bits;
    # dropping the low 13 bits (rounded) leaves exponent << 10 | top 10 mantissa bits
    he = xp.clip(E + 15, 0, 31).astype(xp.uint32)
    normal = _round_shift(xp, (he << 23) | mant, xp.full(u.shape, 13, dtype=xp.uint32))
    # subnormal fp16: shift the 24-bit significand right by -E-1 (14..24 here)
    sig = mant | 0x800000
    sub_shift = xp.clip(-E - 1, 1, 31).astype(xp.uint32)
    subnormal = _round_shift(xp, sig, sub_shift)

    out = xp.where(E >= -14, normal, subnormal)
    out = xp.where(E < -25, 0, out)                       # includes float32 zeros and subnormals
    out = xp.where(E > 15, 0x7C00, out)                   # overflow (and inf) -> inf
    is_nan = (e32 == 0xFF) & (mant != 0)
    out = xp.where(is_nan, 0x7E00 | (mant >> 13), out)
    return (out | sign).astype(xp.uint16)


def _round_shift(xp, value, shift):
    """value >> shift, rounded to nearest with ties to even (uint32 arrays of one shape:
    array << array works alike on NumPy and CuPy). Example: 13 >> 2 = 3.25 -> 3; 14 >> 2 = 3.5 -> 4."""
    one = xp.ones_like(shift)
    kept = value >> shift                           # the bits that stay
    rem = value & ((one << shift) - one)            # the bits that fall off
    half = one << (shift - one)
    up = (rem > half) | ((rem == half) & ((kept & 1) == 1))
    return kept + up.astype(xp.uint32)


def fp16_bits_to_float32(h):
    """fp16 bit patterns -> the float32 values they hold (exact: float32 has room).
    h: (...) uint16 -> (...) float32"""
    _check_uint16("h", h)
    xp = array_module(h)
    h = h.astype(xp.uint32)
    sign = (h & 0x8000) << 16
    he = (h >> 10) & 0x1F
    hm = h & 0x3FF
    normal = ((he + 112) << 23) | (hm << 13)             # rebias: 127 - 15 = 112
    special = 0x7F800000 | (hm << 13)                     # inf or NaN (payload kept)
    # subnormal: hm * 2^-24, exact in float32 arithmetic
    sub = (hm.astype(xp.float32) * xp.float32(2.0 ** -24)).view(xp.uint32)
    bits = xp.where(he == 31, special, xp.where(he == 0, sub, normal))
    return (bits | sign).astype(xp.uint32).view(xp.float32)


def fp16_round(x):
    """The nearest fp16 value to each float32 (ties to even), returned as float32.
    Equal to x.astype(np.float16).astype(np.float32), computed with integer ops.
    x: (...) float32 -> (...) float32"""
    return fp16_bits_to_float32(float32_to_fp16_bits(x))


# ---------------------------------------------------------------------------
# int4 packing: two 4-bit codes per byte
# ---------------------------------------------------------------------------

def _check_pack_int4(q, signed):
    check_int("q", q)
    lo, hi = (-8, 7) if signed else (0, 15)
    if q.size and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"q: expected values in [{lo}, {hi}] (signed={signed}), "
                         f"got values in [{int(q.min())}, {int(q.max())}]")


def _check_unpack_int4(packed, size):
    check_array("packed", packed)
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise TypeError(f"packed: expected a 1-D uint8 array, got {packed.dtype} of shape {tuple(packed.shape)}")
    check_int_arg("size", size, lo=0, hi=2 * packed.size + 1)


def pack_int4(q, signed=True):
    """Pack 4-bit codes two per byte: element 2i in the low nibble, 2i+1 in the high.

    signed=True takes values in [-8, 7] (stored as 4-bit two's complement),
    signed=False values in [0, 15]. An odd count is padded with a zero nibble.
    q: (...) integer -> (ceil(q.size / 2),) uint8
    """
    _check_pack_int4(q, signed)
    xp = array_module(q)
    nib = (q.reshape(-1).astype(xp.int16) & 0xF).astype(xp.uint8)
    if nib.size % 2:
        nib = xp.concatenate([nib, xp.zeros(1, dtype=xp.uint8)])
    return nib[0::2] | (nib[1::2] << 4)


def unpack_int4(packed, size, signed=True):
    """Inverse of pack_int4: the first ``size`` 4-bit codes, as int8.
    packed: (n,) uint8 -> (size,) int8 (sign-extended when signed)"""
    _check_unpack_int4(packed, size)
    xp = array_module(packed)
    nib = xp.stack([packed & 0xF, packed >> 4], axis=1).reshape(-1)[:size].astype(xp.int8)
    if signed:
        nib = xp.where(nib >= 8, nib - 16, nib).astype(xp.int8)  # 4-bit two's complement
    return nib


# ---------------------------------------------------------------------------
# NF4: the QLoRA normal-float codebook
# ---------------------------------------------------------------------------

def nf4_codebook():
    """The 16 NF4 levels in [-1, 1], ascending (QLoRA, Dettmers et al. 2023).

    Built as the paper does: 8 positive levels at standard-normal quantiles of
    probabilities evenly spaced from 0.5 to ``offset``, 7 negative levels the
    same way, and an exact 0, all divided by the largest. ``offset`` = 0.9677083
    is the paper's choice, the midpoint of 1 - 0.5/32 and 1 - 0.5/30, which
    keeps the outermost quantile finite. An asymmetric split (8 + 7) is what
    lets 16 levels include 0 exactly. -> (16,) float64
    """
    nd = NormalDist()
    offset = 0.9677083
    pos = [nd.inv_cdf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    neg = [-nd.inv_cdf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    levels = np.sort(np.array(pos + [0.0] + neg))
    return levels / np.max(np.abs(levels))


_NF4 = nf4_codebook()


# ---------------------------------------------------------------------------
# quantize / dequantize
# ---------------------------------------------------------------------------

def _blocked_shape(shape, granularity, group_size):
    """The 3-D shape (groups, rows per group, columns) whose axis 1 shares a scale."""
    if granularity == "tensor":
        return (1, int(np.prod(shape, dtype=np.int64)), 1)
    if granularity == "channel":
        return (1, shape[0], shape[1])
    cols = shape[1] if len(shape) == 2 else 1
    return (shape[0] // group_size, group_size, cols)


def _blocked(w, granularity, group_size):
    """A 3-D view of w (groups, rows per group, columns) whose axis 1 shares a scale."""
    return w.reshape(_blocked_shape(tuple(w.shape), granularity, group_size))


def _scale_shape(shape, granularity, group_size):
    """The natural shape of the stored scales: () / (out,) / (in // g, out) or (n // g,)."""
    if granularity == "tensor":
        return ()
    if granularity == "channel":
        return (shape[1],)
    return (shape[0] // group_size,) + tuple(shape[1:])


def _qrange(bits, scheme):
    """(qmin, qmax) of the integer codes."""
    if scheme == "symmetric":
        # drop -2^(b-1) so the grid is symmetric and 0 maps to 0 exactly
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


@dataclass(frozen=True)
class QuantizedTensor:
    """Integer (or NF4) codes plus what is needed to turn them back into floats.

    data:       the codes: int8 (8-bit symmetric), uint8 (8-bit asymmetric), or for
                4 bits a 1-D uint8 array holding two codes per byte
    scale:      floats in the input's dtype, shape () / (out,) / (in // group_size, out)
    zero_point: uint8 codes of the same shape as scale (asymmetric), else None
    """
    data: object
    scale: object
    zero_point: object
    shape: tuple
    dtype: object
    bits: int
    scheme: str
    granularity: str
    group_size: int | None

    def codes(self):
        """The integer codes unpacked to int16 (or NF4 indices 0..15), shape ``shape``."""
        xp = array_module(self.data)
        if self.bits == 4:
            size = int(np.prod(self.shape, dtype=np.int64))
            q = unpack_int4(self.data, size, signed=(self.scheme == "symmetric"))
            return q.astype(xp.int16).reshape(self.shape)
        return self.data.astype(xp.int16)

    def dequantize(self):
        """scale * (q - zero_point), or scale * codebook[q] for NF4, in the original dtype."""
        xp = array_module(self.data)
        q = _blocked(self.codes(), self.granularity, self.group_size)
        s = self.scale.reshape(_blocked_scale_shape(q.shape))
        if self.scheme == "nf4":
            values = xp.asarray(_NF4, dtype=self.dtype)[q.astype(xp.intp)]
        elif self.scheme == "asymmetric":
            values = q.astype(self.dtype) - self.zero_point.reshape(s.shape).astype(self.dtype)
        else:
            values = q.astype(self.dtype)
        return (values * s).reshape(self.shape).astype(self.dtype, copy=False)

    @property
    def nbytes(self) -> int:
        """Bytes of storage: codes + scales (+ zero points)."""
        n = self.data.nbytes + self.scale.nbytes
        return int(n + (self.zero_point.nbytes if self.zero_point is not None else 0))


def _blocked_scale_shape(block_shape):
    return (block_shape[0], 1, block_shape[2])


def _check_bits(bits):
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits: expected 4 or 8, got {bits!r}")


def _check_blocks(w, granularity, group_size):
    """w's shape fits the granularity: 2-D for "channel", 1-D/2-D with group_size | in for "group"."""
    if granularity == "channel" and w.ndim != 2:
        raise ValueError(f"w: channel granularity needs a 2-D weight (in, out), got shape {tuple(w.shape)}")
    if granularity == "group":
        if w.ndim not in (1, 2):
            raise ValueError(f"w: group granularity needs a 1-D or 2-D weight, got shape {tuple(w.shape)}")
        check_int_arg("group_size", group_size, lo=1)
        if w.shape[0] % group_size:
            raise ValueError(f"group_size: expected a divisor of w.shape[0] = {w.shape[0]} "
                             f"(groups run along the input dimension), got {group_size}")


def _check_quantize(w, bits, scheme, granularity, group_size):
    check_float("w", w)
    _check_bits(bits)
    check_choice("scheme", scheme, SCHEMES)
    if scheme == "nf4" and bits != 4:
        raise ValueError(f"bits: the nf4 scheme has 16 levels, so bits must be 4, got {bits}")
    check_choice("granularity", granularity, GRANULARITIES)
    if w.size == 0:
        raise ValueError(f"w: expected a non-empty array, got shape {tuple(w.shape)}")
    _check_blocks(w, granularity, group_size)
    xp = array_module(w)
    if not bool(xp.all(xp.isfinite(w))):
        raise ValueError("w: expected finite values, got inf or nan")


# Each scheme maps blocks (groups, rows per group, columns), whose axis 1 shares a
# scale, to (codes of the blocks' shape, scale (groups, 1, columns), zero point or None).

def _quantize_symmetric(blocks, bits):
    xp = array_module(blocks)
    qmin, qmax = _qrange(bits, "symmetric")
    absmax = xp.abs(blocks).max(axis=1, keepdims=True)                     # (groups, 1, columns)
    scale = xp.where(absmax > 0, absmax / qmax, 1).astype(blocks.dtype)
    q = xp.clip(xp.rint(blocks / scale), qmin, qmax).astype(xp.int8)
    return q, scale, None


def _quantize_asymmetric(blocks, bits):
    xp = array_module(blocks)
    qmin, qmax = _qrange(bits, "asymmetric")
    lo = xp.minimum(blocks.min(axis=1, keepdims=True), 0)                  # (groups, 1, columns)
    hi = xp.maximum(blocks.max(axis=1, keepdims=True), 0)
    span = hi - lo
    scale = xp.where(span > 0, span / qmax, 1).astype(blocks.dtype)
    zp = xp.clip(xp.rint(-lo / scale), qmin, qmax)
    q = xp.clip(xp.rint(blocks / scale) + zp, qmin, qmax).astype(xp.uint8)
    return q, scale, zp.astype(xp.uint8)


def _quantize_nf4(blocks, bits):
    xp = array_module(blocks)
    absmax = xp.abs(blocks).max(axis=1, keepdims=True)                     # (groups, 1, columns)
    scale = xp.where(absmax > 0, absmax, 1).astype(blocks.dtype)
    # nearest level = how many midpoints between adjacent levels lie below w / scale
    mids = xp.asarray((_NF4[1:] + _NF4[:-1]) / 2, dtype=blocks.dtype)
    q = xp.searchsorted(mids, (blocks / scale).reshape(-1)).reshape(blocks.shape).astype(xp.uint8)
    return q, scale, None


_QUANTIZERS = {"symmetric": _quantize_symmetric, "asymmetric": _quantize_asymmetric, "nf4": _quantize_nf4}


def quantize(w, bits=8, scheme="symmetric", granularity="tensor", group_size=128) -> QuantizedTensor:
    """w ~ scale * (q - zero_point) with integer codes q of ``bits`` bits.

    symmetric:  scale = absmax / (2^(b-1) - 1), q = round(w / scale) in [-127, 127]
                (or [-7, 7]); 0 maps to 0 exactly and |error| <= scale / 2.
    asymmetric: the range [min(w, 0), max(w, 0)] is spread over [0, 2^b - 1]:
                scale = (max - min) / (2^b - 1), zero_point = round(-min / scale),
                q = clip(round(w / scale) + zero_point); 0 still maps to 0 exactly
                (the range always contains 0) and |error| <= scale / 2.
    nf4:        scale = absmax per block, q = index of the nearest NF4 level to w / scale.
    Rounding is to nearest, ties to even. One scale per ``granularity`` block:
    "tensor" (one), "channel" (one per column of a 2-D (in, out) weight), or
    "group" (``group_size`` consecutive rows of each column; must divide in).
    w: float (in, out), or any shape for "tensor", or 1-D for "group".
    """
    _check_quantize(w, bits, scheme, granularity, group_size)
    xp = array_module(w)
    gs = int(group_size) if granularity == "group" else None
    blocks = _blocked(w, granularity, gs)                   # (groups, rows per group, columns)
    q, scale, zero_point = _QUANTIZERS[scheme](blocks, bits)
    q = q.reshape(w.shape)
    if bits == 4:
        data = pack_int4(q.astype(xp.int8) if scheme == "symmetric" else q, signed=(scheme == "symmetric"))
    else:
        data = q
    scale_shape = _scale_shape(w.shape, granularity, gs)
    if zero_point is not None:
        zero_point = zero_point.reshape(scale_shape)
    return QuantizedTensor(data, scale.reshape(scale_shape), zero_point,
                           tuple(w.shape), w.dtype, int(bits), scheme, granularity, gs)


def _check_quantized_tensor(name, qt):
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"{name}: expected a QuantizedTensor, got {type(qt).__name__}")


def dequantize(qt: QuantizedTensor):
    """The floats a QuantizedTensor stands for (same as qt.dequantize())."""
    _check_quantized_tensor("qt", qt)
    return qt.dequantize()


def quantization_error_bound(qt: QuantizedTensor):
    """Largest |dequantize(quantize(w)) - w| allowed per element, shape qt.shape.

    scale / 2 for the integer schemes (inside the clipping range, which for these
    scales is all of w); for NF4 half the widest gap between adjacent levels, times
    the block's absmax.
    """
    xp = array_module(qt.data)
    block_shape = _blocked_shape(qt.shape, qt.granularity, qt.group_size)
    factor = float(np.max(np.diff(_NF4))) / 2 if qt.scheme == "nf4" else 0.5
    s = qt.scale.reshape(_blocked_scale_shape(block_shape)) * factor
    return xp.broadcast_to(s, block_shape).reshape(qt.shape)


# ---------------------------------------------------------------------------
# LLM.int8(): int8 matmul with outlier features in floating point
# ---------------------------------------------------------------------------

def _check_int8_matmul(a, b):
    check_int("a", a)
    check_int("b", b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"b: expected shape ({a.shape[1] if a.ndim == 2 else '*'}, *) to multiply a of "
                         f"shape {tuple(a.shape)}, got {tuple(b.shape)}")
    if a.shape[1] * 127 * 127 >= 2 ** 31:
        raise ValueError(f"a: K = {a.shape[1]} is too long for an int32 accumulator of int8 products")


def int8_matmul_exact(a, b):
    """Integer matmul of int8 codes with exact int32 accumulation. a: (N, K), b: (K, M) -> (N, M) int32.

    NumPy (and cuBLAS through CuPy's float paths) has fast float GEMMs but no
    int8 GEMM, so the integer products are summed by a float GEMM where that is
    exact: every partial sum is an integer of size <= K * 127^2, and float32
    represents all integers up to 2^24, float64 up to 2^53. The answer is then
    bit-for-bit the int32 accumulator's. (K * 127^2 must stay below 2^31 anyway.)
    """
    _check_int8_matmul(a, b)
    xp = array_module(a, b)
    K = a.shape[1]
    ftype = xp.float32 if K * 127 * 127 < 2 ** 24 else xp.float64
    return (a.astype(ftype) @ b.astype(ftype)).astype(xp.int32)


def outlier_features(x, threshold=6.0):
    """Boolean mask over the last axis: features where some |x| exceeds ``threshold``.
    x: (..., K) -> (K,) bool"""
    check_float("x", x)
    xp = array_module(x)
    return xp.abs(x.reshape(-1, x.shape[-1])).max(axis=0) > threshold


def _is_int8_channel(qt: QuantizedTensor) -> bool:
    """The LLM.int8() weight format: 8-bit symmetric codes, one scale per column."""
    return qt.bits == 8 and qt.scheme == "symmetric" and qt.granularity == "channel"


def _check_llm_int8_matmul(x, w, threshold):
    check_float("x", x)
    if x.ndim != 2:
        raise ValueError(f"x: expected 2-D (N, K), got shape {tuple(x.shape)}")
    if isinstance(w, QuantizedTensor):
        if not _is_int8_channel(w):
            raise ValueError("w: expected an 8-bit symmetric per-channel QuantizedTensor (LLM.int8() "
                             f"weights), got bits={w.bits}, scheme={w.scheme!r}, granularity={w.granularity!r}")
    else:
        check_float("w", w)
        if w.ndim != 2:
            raise ValueError(f"w: expected a 2-D weight (in, out), got shape {tuple(w.shape)}")
    if w.shape[0] != x.shape[1]:
        raise ValueError(f"w: expected shape ({x.shape[1]}, *) to match x's {x.shape[1]} features, "
                         f"got {tuple(w.shape)}")
    if not (isinstance(threshold, (int, float, np.floating)) and threshold > 0):
        raise ValueError(f"threshold: expected a positive number, got {threshold!r}")


def llm_int8_matmul(x, w, threshold=6.0):
    """x @ W the LLM.int8() way (Dettmers et al. 2022): a mixed-precision decomposition.

    Outlier features O = {k : max |x[:, k]| > threshold} are multiplied in floating
    point: x[:, O] @ W[O, :], with W's rows dequantized from int8. The rest is
    vector-wise int8: each row of x gets its own absmax scale sx (computed
    without the outliers, which is the point), each column of W its own sw,
    and y = sx * sw * (int8 x) @ (int8 W) accumulated exactly in int32.
    threshold=inf gives plain vector-wise int8.
    x: (N, K) float; w: (K, M) float or an 8-bit symmetric channel QuantizedTensor -> (N, M)
    """
    _check_llm_int8_matmul(x, w, threshold)
    xp = array_module(x)
    wq = w if isinstance(w, QuantizedTensor) else quantize(w, bits=8, scheme="symmetric", granularity="channel")
    out_mask = outlier_features(x, threshold)           # (K,) bool
    codes = wq.data                                      # (K, M) int8
    sw = wq.scale.astype(x.dtype)                        # (M,)
    x_in = xp.where(~out_mask[None, :], x, 0)            # (N, K), outlier features zeroed
    absmax = xp.abs(x_in).max(axis=1, keepdims=True)     # (N, 1), outliers excluded
    sx = xp.where(absmax > 0, absmax / 127, 1).astype(x.dtype)
    xq = xp.clip(xp.rint(x_in / sx), -127, 127).astype(xp.int8)
    acc = int8_matmul_exact(xq, codes)                   # int32, outlier columns of xq are 0
    y = acc.astype(x.dtype) * sx * sw[None, :]          # (N, M)
    if bool(xp.any(out_mask)):
        idx = xp.nonzero(out_mask)[0]
        w_out = codes[idx].astype(x.dtype) * sw[None, :]  # dequantized outlier rows of W
        y = y + x[:, idx] @ w_out
    return y


def _check_quantized_linear(x, qweight, bias):
    check_float("x", x)
    _check_quantized_tensor("qweight", qweight)
    if len(qweight.shape) != 2 or qweight.shape[0] != x.shape[-1]:
        raise ValueError(f"qweight: expected shape ({x.shape[-1]}, *), got {qweight.shape}")
    if bias is not None:
        check_float("bias", bias)
        check_shape("bias", bias, (qweight.shape[1],))


def quantized_linear(x, qweight: QuantizedTensor, bias=None, threshold=6.0):
    """y = x @ W + b with a quantized W, for inference (there is no backward).

    8-bit symmetric per-channel weights run through llm_int8_matmul (int8 compute,
    outliers in float); every other format is weight-only quantization: W is
    dequantized and multiplied in x's dtype (what 4-bit kernels do tile by tile).
    x: (..., in); qweight: (in, out); bias: (out,) or None -> (..., out)
    """
    _check_quantized_linear(x, qweight, bias)
    x2 = x.reshape(-1, x.shape[-1])                                 # (N, in)
    if _is_int8_channel(qweight):
        y = llm_int8_matmul(x2, qweight, threshold=threshold)       # (N, out)
    else:
        y = x2 @ qweight.dequantize().astype(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(x.shape[:-1] + (qweight.shape[1],))            # (..., out)


# ---------------------------------------------------------------------------
# Fake quantization with the straight-through estimator
# ---------------------------------------------------------------------------

class FakeQuantCache(NamedTuple):
    inside: object   # (...) bool: x was inside the clipping range [lo, hi]


def _check_scale_like(name, s, x):
    """A scale/zero point is a number, a 0-d array, or an array of x's ndim with sizes 1 or equal."""
    if isinstance(s, (int, float, np.integer, np.floating)):
        return
    check_array(name, s)
    if s.ndim == 0:
        return
    if s.ndim != x.ndim or any(a not in (1, b) for a, b in zip(s.shape, x.shape)):
        raise ValueError(f"{name}: expected a scalar or shape with x's {x.ndim} dims, each 1 or equal to "
                         f"x's {tuple(x.shape)} (keepdims style), got {tuple(s.shape)}")


def _check_fake_quant(x, scale, bits, zero_point):
    check_float("x", x)
    _check_bits(bits)
    _check_scale_like("scale", scale, x)
    xp = array_module(x)
    if not bool(xp.all(xp.asarray(scale) > 0)):
        raise ValueError("scale: expected positive values")
    if zero_point is not None:
        _check_scale_like("zero_point", zero_point, x)


def fake_quant_forward(x, scale, bits=8, zero_point=None):
    """y = scale * (clip(round(x / scale) + z, qmin, qmax) - z): quantize then dequantize.

    The output is a float on the quantization grid, so training sees the
    rounding error the quantized model will have. Symmetric (zero_point None):
    codes in [-(2^(b-1) - 1), 2^(b-1) - 1]; asymmetric: [0, 2^b - 1] with zero_point z.
    ``scale`` (and ``zero_point``) is a number or keepdims-shaped (one per channel
    or group). The clipping range is [lo, hi] = [scale (qmin - z), scale (qmax - z)].
    x: (...) float -> y: (...), cache
    """
    _check_fake_quant(x, scale, bits, zero_point)
    xp = array_module(x)
    qmin, qmax = _qrange(bits, "symmetric" if zero_point is None else "asymmetric")
    z = 0 if zero_point is None else xp.asarray(zero_point).astype(x.dtype)
    s = xp.asarray(scale).astype(x.dtype)
    q = xp.clip(xp.rint(x / s) + z, qmin, qmax)         # (...) the integer codes, as floats
    y = ((q - z) * s).astype(x.dtype)                   # (...) back on x's scale
    lo, hi = (qmin - z) * s, (qmax - z) * s
    return y, FakeQuantCache((x >= lo) & (x <= hi))


def fake_quant_backward(dy, cache: FakeQuantCache):
    """The straight-through estimator: dx = dy where x was inside [lo, hi], 0 outside.

    round() has derivative 0 almost everywhere, so the true gradient would stop
    all learning; the STE, by definition, is *not* that derivative. It pretends
    rounding is the identity, which makes the gradient exactly the derivative of
    the clipping function clip(x, lo, hi): 1 inside the range, 0 where clipped
    (the tests check that with finite differences of clip). -> dx: (...)
    """
    check_shape("dy", dy, cache.inside.shape)
    return dy * cache.inside.astype(dy.dtype)


def _check_absmax_scale(w, bits, granularity, group_size):
    check_float("w", w)
    if granularity == "group":
        _check_quantize(w, bits, "symmetric", granularity, group_size)
    check_choice("granularity", granularity, GRANULARITIES)
    _check_blocks(w, granularity, group_size)
    _check_bits(bits)


def absmax_scale(w, bits=8, granularity="tensor", group_size=128):
    """The symmetric scale absmax / (2^(b-1) - 1) per block, keepdims-shaped for w's blocks.

    Ready for fake_quant_forward: "tensor" -> 0-d, "channel" -> (1, out);
    for "group" reshape w to (in // g, g, out) first and pass that (the scale is (in // g, 1, out)).
    """
    _check_absmax_scale(w, bits, granularity, group_size)
    xp = array_module(w)
    if granularity == "group":
        w = w.reshape(w.shape[0] // group_size, group_size, -1)            # (in // g, g, out)
    axis = {"tensor": tuple(range(w.ndim)), "channel": (0,), "group": (1,)}[granularity]
    qmax = 2 ** (bits - 1) - 1
    absmax = xp.abs(w).max(axis=axis, keepdims=granularity != "tensor")
    return xp.where(absmax > 0, absmax / qmax, 1).astype(w.dtype)


__all__ = [
    "float32_to_bf16_bits", "bf16_bits_to_float32", "bf16_round",
    "float32_to_fp16_bits", "fp16_bits_to_float32", "fp16_round",
    "pack_int4", "unpack_int4", "nf4_codebook",
    "QuantizedTensor", "quantize", "dequantize", "quantization_error_bound",
    "int8_matmul_exact", "outlier_features", "llm_int8_matmul", "quantized_linear",
    "FakeQuantCache", "fake_quant_forward", "fake_quant_backward", "absmax_scale",
]
