"""embeddings.py: token, learned-position, sinusoidal and segment embeddings."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from helpers import assert_close, assert_gradcheck, np_, on
from minillm import backprop as bp
from minillm import embeddings as E
from strategies import randn, seeds, shapes


@st.composite
def lookup_case(draw, max_v=6):
    ids_shape = draw(shapes(0, 3, 1, 4))
    V = draw(st.integers(1, max_v))
    C = draw(st.integers(1, 4))
    seed = draw(seeds)
    ids = np.random.default_rng(seed).integers(0, V, size=ids_shape)
    return ids, V, C, seed


# --- finite-difference checks -----------------------------------------------------

@given(case=lookup_case())
def test_embedding_backward_matches_finite_differences(xp, case):
    ids, V, C, seed = case   # small V and several ids: repeats are the rule, not the exception
    table = randn(seed, V, C)
    rep = bp.gradcheck(E.embedding_forward, E.embedding_backward, list(on(xp, ids, table)), wrt=[1])
    assert_gradcheck(rep)


@given(case=lookup_case(max_v=3))
def test_segment_embedding_backward_matches_finite_differences(xp, case):
    ids, V, C, seed = case
    table = randn(seed, V, C)
    rep = bp.gradcheck(E.segment_embedding_forward, E.segment_embedding_backward,
                       list(on(xp, ids, table)), wrt=[1])
    assert_gradcheck(rep)


@given(T=st.integers(1, 5), offset=st.integers(0, 3), C=st.integers(1, 4), seed=seeds)
def test_learned_position_embedding_backward_matches_finite_differences(xp, T, offset, C, seed):
    # wpe lookup = embedding_forward(position_ids(T, offset), wpe)
    wpe = on(xp, randn(seed, T + offset + 1, C))
    pos = E.position_ids(T, offset, xp=xp)
    assert_gradcheck(bp.gradcheck(E.embedding_forward, E.embedding_backward, [pos, wpe], wrt=[1]))


# --- properties -------------------------------------------------------------------

@given(case=lookup_case(max_v=8))
def test_embedding_is_a_one_hot_matmul_both_ways(xp, case):
    ids, V, C, seed = case
    table, dout = randn(seed, V, C), randn(seed + 1, *ids.shape, C)
    one_hot = np.eye(V)[ids.reshape(-1)]                     # (N, V)
    out, cache = E.embedding_forward(*on(xp, ids, table))
    assert_close(out, (one_hot @ table).reshape(*ids.shape, C), rtol=0, atol=0)
    dtable = E.embedding_backward(on(xp, dout), cache)
    assert_close(dtable, one_hot.T @ dout.reshape(-1, C), rtol=1e-13, atol=1e-13)


def test_repeated_ids_accumulate_and_unused_rows_get_zero(xp):
    ids = np.array([[3, 3, 3], [0, 3, 0]])
    table = np.arange(5 * 2, dtype=np.float64).reshape(5, 2)
    _, cache = E.embedding_forward(*on(xp, ids, table))
    dtable = np_(E.embedding_backward(on(xp, np.ones((2, 3, 2))), cache))
    assert dtable.tolist() == [[2, 2], [0, 0], [0, 0], [4, 4], [0, 0]]


def test_large_batch_scatter_add_path_matches_a_loop(xp):
    # > 64 rows takes backend.scatter_add's sort-and-reduce path on NumPy
    rng = np.random.default_rng(5)
    ids, dout = rng.integers(0, 7, size=(10, 30)), rng.standard_normal((10, 30, 3))
    _, cache = E.embedding_forward(on(xp, ids), on(xp, np.zeros((7, 3))))
    ref = np.zeros((7, 3))
    for i, row in zip(ids.reshape(-1), dout.reshape(-1, 3)):
        ref[i] += row
    assert_close(E.embedding_backward(on(xp, dout), cache), ref, rtol=1e-12, atol=1e-12)


def test_float32_table_gives_float32_output_and_gradient(xp):
    table = on(xp, np.ones((4, 3), dtype=np.float32))
    ids = on(xp, np.array([[0, 1], [3, 3]], dtype=np.int32))
    out, cache = E.embedding_forward(ids, table)
    assert out.dtype == np.float32
    assert E.embedding_backward(on(xp, np.ones((2, 2, 3), np.float32)), cache).dtype == np.float32


@given(T=st.integers(0, 20), offset=st.integers(0, 100))
def test_position_ids(xp, T, offset):
    p = E.position_ids(T, offset, xp=xp)
    assert p.dtype == np.int64 and np_(p).tolist() == list(range(offset, offset + T))


@given(T=st.integers(1, 12), C=st.integers(1, 9), base=st.sampled_from([10000.0, 100.0]))
def test_sinusoidal_positions_match_the_formula(T, C, base):
    pe = E.sinusoidal_positions(T, C, base=base, dtype=np.float64, device="cpu")
    assert pe.shape == (T, C) and pe.dtype == np.float64
    for p in range(T):
        for j in range(C):
            angle = p / base ** (2 * (j // 2) / C)
            ref = math.sin(angle) if j % 2 == 0 else math.cos(angle)
            assert abs(pe[p, j] - ref) < 1e-12


@given(T=st.integers(2, 30), k=st.integers(1, 5), half_c=st.integers(1, 6))
def test_sinusoidal_offsets_are_a_fixed_rotation(T, k, half_c):
    # PE[p + k] = R_k PE[p] with R_k block-diagonal 2x2 rotations that do not depend on p:
    # the property that lets attention read relative positions off absolute ones.
    C = 2 * half_c
    pe = E.sinusoidal_positions(T + k, C, dtype=np.float64, device="cpu")
    freqs = 1.0 / 10000.0 ** (np.arange(0, C, 2) / C)
    c, s = np.cos(k * freqs), np.sin(k * freqs)
    sin_p, cos_p = pe[:T, 0::2], pe[:T, 1::2]
    assert_close(pe[k:, 0::2], sin_p * c + cos_p * s, rtol=1e-9, atol=1e-10)   # sin(a + b)
    assert_close(pe[k:, 1::2], cos_p * c - sin_p * s, rtol=1e-9, atol=1e-10)   # cos(a + b)
    assert np.all(np.abs(pe) <= 1.0)
    assert_close(pe[0], np.tile([0.0, 1.0], half_c), rtol=0, atol=0)


def test_sinusoidal_positions_default_dtype_and_device(xp):
    pe = E.sinusoidal_positions(4, 6)
    assert pe.dtype == np.float32 and type(pe) is xp.ndarray


def test_init_embedding():
    a = E.init_embedding(1, 50, 8, device="cpu")
    b = E.init_embedding(np.random.default_rng(1), 50, 8, device="cpu")
    assert a.shape == (50, 8) and a.dtype == np.float32 and np.array_equal(a, b)
    assert 0.015 < float(a.std()) < 0.025


# --- an independent implementation: PyTorch in float64 -------------------------------------

@given(case=lookup_case())
def test_embedding_agrees_with_torch(xp, case):
    torch = pytest.importorskip("torch")
    ids, V, C, seed = case
    table, dout = randn(seed, V, C), randn(seed + 1, *ids.shape, C)
    out, cache = E.embedding_forward(*on(xp, ids, table))
    dtable = E.embedding_backward(on(xp, dout), cache)
    t = torch.tensor(table, requires_grad=True)
    ref = torch.nn.functional.embedding(torch.tensor(ids), t)
    ref.backward(torch.tensor(dout))
    assert_close(out, ref.detach().numpy(), rtol=0, atol=0)
    assert_close(dtable, t.grad.numpy(), rtol=1e-13, atol=1e-13)


# --- bad input --------------------------------------------------------------------------

def test_bad_input(xp):
    table = on(xp, np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"ids: expected ids in \[0, 5\), got 7"):
        E.embedding_forward(on(xp, np.array([[0, 7, 1]])), table)
    with pytest.raises(ValueError, match=r"ids: expected ids in \[0, 5\), got -1"):
        E.embedding_forward(on(xp, np.array([-1, 2])), table)
    with pytest.raises(TypeError, match="ids: expected an integer array"):
        E.embedding_forward(on(xp, np.array([0.0, 1.0])), table)
    with pytest.raises(TypeError, match="table: expected a floating-point array"):
        E.embedding_forward(on(xp, np.array([0, 1])), on(xp, np.zeros((5, 3), dtype=np.int64)))
    with pytest.raises(ValueError, match="table: expected 2 dimensions"):
        E.embedding_forward(on(xp, np.array([0, 1])), on(xp, np.zeros(5)))
    with pytest.raises(ValueError, match=r"token_type_ids: expected ids in \[0, 2\), got 2"):
        E.segment_embedding_forward(on(xp, np.array([0, 1, 2])), on(xp, np.zeros((2, 3))))
    with pytest.raises(TypeError, match="token_type_ids: expected an integer array"):
        E.segment_embedding_forward(on(xp, np.array([0.0])), on(xp, np.zeros((2, 3))))
    _, cache = E.embedding_forward(on(xp, np.array([0, 1])), table)
    with pytest.raises(ValueError, match=r"dy: expected shape \(2, 3\)"):
        E.embedding_backward(on(xp, np.zeros((2, 4))), cache)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="T: expected a non-negative int"):
            E.position_ids(bad)
        with pytest.raises(ValueError, match="C: expected a non-negative int"):
            E.sinusoidal_positions(3, bad)
    with pytest.raises(ValueError, match="offset: expected a non-negative int"):
        E.position_ids(3, offset=-2)
    with pytest.raises(ValueError, match="base: expected a number > 1"):
        E.sinusoidal_positions(3, 4, base=0.5)
