"""backend.py: device choice, seeding, scatter-add and the argument checks."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from minillm import backend


def test_array_module_follows_the_input(xp):
    assert backend.array_module(xp.zeros(2)) is xp
    assert backend.array_module(np.zeros(2), None, 3.0) is np


def test_unknown_device_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MINILLM_DEVICE", "tpu")
    with pytest.raises(ValueError, match="MINILLM_DEVICE"):
        backend.xp_default()


def test_gpu_without_gpu_is_an_error_not_a_fallback(monkeypatch):
    if backend.gpu_available():
        pytest.skip("a GPU is present")
    monkeypatch.setenv("MINILLM_DEVICE", "gpu")
    with pytest.raises(RuntimeError, match="gpu"):
        backend.xp_default()


def test_seeding_is_reproducible():
    a = backend.randn(backend.make_rng(3), (4, 5), device="cpu")
    b = backend.randn(backend.make_rng(3), (4, 5), device="cpu")
    assert a.dtype == np.float32 and np.array_equal(a, b)
    with pytest.raises(TypeError, match="seed"):
        backend.make_rng("3")


@given(n=st.integers(1, 300), rows=st.integers(1, 10), seed=st.integers(0, 1000))
def test_scatter_add_equals_one_hot_matmul(xp, n, rows, seed):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, rows, size=n)
    vals = rng.standard_normal((n, 3))
    target = xp.zeros((rows, 3))
    backend.scatter_add(target, xp.asarray(idx), xp.asarray(vals))
    onehot = np.eye(rows)[idx]
    np.testing.assert_allclose(backend.to_numpy(target), onehot.T @ vals, rtol=1e-12, atol=1e-12)


def test_checks_name_the_argument():
    with pytest.raises(TypeError, match="w: expected a numpy or cupy array, got list"):
        backend.check_float("w", [1.0])
    with pytest.raises(TypeError, match="ids: expected an integer array"):
        backend.check_int("ids", np.zeros(2))
    with pytest.raises(ValueError, match=r"x: expected shape \(2, \*\), got \(3, 4\)"):
        backend.check_shape("x", np.zeros((3, 4)), (2, None))
    with pytest.raises(ValueError, match=r"ids: expected ids in \[0, 5\), got 7"):
        backend.check_ids("ids", np.array([1, 7]), 5)
    with pytest.raises(ValueError, match="eps: expected a positive number"):
        backend.check_positive("eps", 0.0)
