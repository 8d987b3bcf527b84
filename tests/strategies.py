"""Hypothesis strategies shared by the tests: small shapes, well-scaled float64 data."""
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays


def dims(lo=1, hi=5):
    return st.integers(lo, hi)


def shapes(min_dims=1, max_dims=3, lo=1, hi=5):
    return st.lists(dims(lo, hi), min_size=min_dims, max_size=max_dims).map(tuple)


def floats64(shape, lo=-3.0, hi=3.0):
    """float64 arrays of ``shape`` with values in [lo, hi] (no NaN/inf)."""
    return arrays(np.float64, shape, elements=st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=64))


seeds = st.integers(0, 2**31 - 1)


def randn(seed, *shape, scale=1.0):
    """A seeded standard-normal float64 array: cheaper for hypothesis than drawing every element."""
    return np.random.default_rng(seed).standard_normal(shape) * scale
