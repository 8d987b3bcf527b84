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


# ---------------------------------------------------------------------------
# The shared argument checks and the atomic write
# ---------------------------------------------------------------------------

def test_check_int_arg_names_the_argument_and_the_expectation():
    assert backend.check_int_arg("n", np.int64(3), lo=1) == 3 and backend.check_int_arg("n", None, optional=True) is None
    for bad, lo, hi, want in [(0, 1, None, "n: expected a positive int, got 0"),
                              (-1, 0, None, "n: expected a non-negative int, got -1"),
                              (True, 1, None, "n: expected a positive int, got True"),
                              (2.0, 1, None, "n: expected a positive int, got 2.0"),
                              (1, 2, None, r"n: expected an int >= 2, got 1"),
                              (5, 0, 5, r"n: expected an int in \[0, 5\), got 5")]:
        with pytest.raises(ValueError, match=want):
            backend.check_int_arg("n", bad, lo=lo, hi=hi)
    with pytest.raises(ValueError, match="n: expected None or a positive int, got 0"):
        backend.check_int_arg("n", 0, lo=1, optional=True)


def test_check_number_probability_choice():
    assert backend.check_number("lr", 1, 0.0) == 1.0
    with pytest.raises(TypeError, match="lr: expected a number, got str"):
        backend.check_number("lr", "1")
    with pytest.raises(ValueError, match=r"lr: expected a finite number in \(0, 1\], got 0"):
        backend.check_number("lr", 0, 0.0, 1.0, lo_open=True)
    with pytest.raises(ValueError, match=r"lr: expected a finite number in \[0, inf\], got nan"):
        backend.check_number("lr", float("nan"), 0.0)
    assert backend.check_probability("p", 0.5) == 0.5 and backend.check_probability("p", 1, include_one=True) == 1.0
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match=r"p: expected a probability in \[0, 1\)"):
            backend.check_probability("p", bad)
    with pytest.raises(ValueError, match=r"norm: expected one of \('a', 'b'\), got 'c'"):
        backend.check_choice("norm", "c", ("a", "b"))


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    backend.atomic_write(path, lambda f: f.write(b"old"))
    assert path.read_bytes() == b"old"

    def broken(f):
        f.write(b"half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        backend.atomic_write(path, broken)
    assert path.read_bytes() == b"old" and sorted(p.name for p in path.parent.iterdir()) == ["f.bin"]
    backend.atomic_write(path, lambda f: f.write("new"), mode="w")
    assert path.read_text() == "new"
