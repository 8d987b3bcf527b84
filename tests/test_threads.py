"""backend.parallel_for and the fast paths that share CPU work among threads.

What must always hold: parallel_for calls its part on disjoint ranges that cover
range(n) exactly once; with any number of threads every threaded fast path gives
what it gives on one thread (bit for bit where each element is computed by one
thread, to round-off where per-thread partial sums are added), and what its plain
version gives.
"""
import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import assert_close, assert_gradcheck
from minillm import attention, backend, ffn, norm, optim
from minillm import backprop as bp
from strategies import randn, seeds


@pytest.fixture
def threads():
    """Set backend's thread count inside a test, restored afterwards."""
    before = backend.num_threads()
    yield backend.set_num_threads
    backend.set_num_threads(before)


# --- parallel_for itself ------------------------------------------------------------

@settings(deadline=None)
@given(n=st.integers(0, 200), n_threads=st.integers(1, 5), min_per=st.integers(1, 40))
def test_parallel_for_covers_every_index_exactly_once(n, n_threads, min_per):
    before = backend.num_threads()
    backend.set_num_threads(n_threads)
    try:
        hits = np.zeros(n, dtype=int)
        ranges, lock = [], threading.Lock()

        def part(lo, hi):
            with lock:
                ranges.append((lo, hi))
            hits[lo:hi] += 1
        backend.parallel_for(part, n, min_per_thread=min_per)
        assert (hits == 1).all()
        assert len(ranges) <= max(1, min(n_threads, n // min_per))     # never more parts than threads
        assert all(hi - lo >= min(min_per, n) for lo, hi in ranges)     # no part below the minimum
    finally:
        backend.set_num_threads(before)


def test_parallel_for_uses_other_threads_and_runs_nested_calls_inline(threads):
    threads(3)
    seen, lock = [], threading.Lock()
    together = threading.Barrier(3, timeout=10)    # passes only if the three parts run at once

    def inner(lo, hi):
        with lock:
            seen.append(("inner", threading.get_ident(), lo, hi))

    def outer(lo, hi):
        with lock:
            seen.append(("outer", threading.get_ident(), lo, hi))
        together.wait()
        backend.parallel_for(inner, 10)          # inside a part: one inline call over all of it
    backend.parallel_for(outer, 30)
    outers = [s for s in seen if s[0] == "outer"]
    inners = [s for s in seen if s[0] == "inner"]
    assert sorted((lo, hi) for _, _, lo, hi in outers) == [(0, 10), (10, 20), (20, 30)]
    assert len({ident for _, ident, _, _ in outers}) == 3                  # three threads did the work
    assert len(inners) == 3 and all((lo, hi) == (0, 10) for _, _, lo, hi in inners)


def test_parallel_for_runs_inline_on_one_thread_or_for_another_array_module(threads):
    calls = []
    threads(1)
    backend.parallel_for(lambda lo, hi: calls.append((threading.get_ident(), lo, hi)), 100)
    threads(4)
    backend.parallel_for(lambda lo, hi: calls.append((threading.get_ident(), lo, hi)), 100, xp=object())
    me = threading.get_ident()
    assert calls == [(me, 0, 100), (me, 0, 100)]


def test_parallel_for_raises_what_a_part_raised(threads):
    threads(2)

    def part(lo, hi):
        if lo > 0:
            raise ArithmeticError(f"part {lo}")
    with pytest.raises(ArithmeticError, match="part 5"):
        backend.parallel_for(part, 10)
    backend.parallel_for(lambda lo, hi: None, 10)     # the pool still works afterwards


def test_thread_count_settings_reject_bad_values(monkeypatch, threads):
    with pytest.raises(ValueError, match="n"):
        backend.set_num_threads(0)
    with pytest.raises(ValueError, match="n: expected a positive int, got 1.5"):
        backend.set_num_threads(1.5)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MINILLM_NUM_THREADS", "two")
    with pytest.raises(ValueError, match="MINILLM_NUM_THREADS.*positive integer.*'two'"):
        backend._default_threads()
    monkeypatch.setenv("MINILLM_NUM_THREADS", "0")
    with pytest.raises(ValueError, match="MINILLM_NUM_THREADS"):
        backend._default_threads()
    monkeypatch.setenv("MINILLM_NUM_THREADS", "3")
    assert backend._default_threads() == 3
    monkeypatch.delenv("MINILLM_NUM_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert backend._default_threads() == 1


def test_keep_freed_memory_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("MINILLM_KEEP_FREED_MEMORY", "0")
    assert backend.keep_freed_memory() is False
    monkeypatch.delenv("MINILLM_KEEP_FREED_MEMORY")
    assert isinstance(backend.keep_freed_memory(), bool)


# --- the threaded fast paths: the same answer on any number of threads ---------------------

def _on_threads(fn, counts=(1, 2, 3)):
    """[fn() with backend.set_num_threads(n)] for each n."""
    before = backend.num_threads()
    try:
        out = []
        for n in counts:
            backend.set_num_threads(n)
            out.append(fn())
        return out
    finally:
        backend.set_num_threads(before)


@settings(deadline=None, max_examples=25)
@given(B=st.integers(1, 5), Hkv=st.integers(1, 2), G=st.integers(1, 2), Tq=st.integers(2, 40),
       extra=st.integers(0, 9), D=st.integers(1, 6), block=st.integers(1, 16), seed=seeds)
def test_fused_causal_attention_is_the_same_on_any_number_of_threads(B, Hkv, G, Tq, extra, D, block, seed):
    q = randn(seed, B, Hkv * G, Tq, D).astype(np.float32)
    k, v = (randn(seed + i, B, Hkv, Tq + extra, D).astype(np.float32) for i in (1, 2))
    dy = randn(seed + 3, B, Hkv * G, Tq, D).astype(np.float32)

    def run():
        y, cache = attention.causal_attention_forward(q, k, v, block_size=block)
        return (y, *attention.causal_attention_backward(dy, cache))
    first, *others = _on_threads(run)
    for other in others:
        for a, b in zip(first, other):
            np.testing.assert_array_equal(a, b)      # each sequence is one thread's: bit for bit


@settings(deadline=None, max_examples=20)
@given(n=st.integers(1, 5 * 256), seed=seeds)
def test_fast_gelu_is_the_same_on_any_number_of_threads(n, seed):
    x = (3 * randn(seed, n)).astype(np.float32)
    dy = randn(seed + 1, n).astype(np.float32)

    def run():
        y, cache = ffn.gelu_forward(x, approximate="tanh")
        return y, ffn.gelu_backward(dy, cache)
    whole, ffn._CHUNK = ffn._CHUNK, 256          # small pieces: several per thread
    try:
        first, *others = _on_threads(run)
    finally:
        ffn._CHUNK = whole
    for other in others:
        for a, b in zip(first, other):
            np.testing.assert_array_equal(a, b)


@settings(deadline=None, max_examples=25)
@given(rows=st.integers(1, 400), C=st.integers(2, 40), bias=st.booleans(), seed=seeds)
def test_fast_layernorm_equals_the_plain_one_on_any_number_of_threads(rows, C, bias, seed):
    x = 3 * randn(seed, rows, C) + 2
    w, b, dy = 1 + 0.5 * randn(seed + 1, C), randn(seed + 2, C), randn(seed + 3, rows, C)
    b = b if bias else None
    y0, c0 = norm.layernorm_forward(x, w, b)
    dx0, dw0, db0 = norm.layernorm_backward(dy, c0)

    def run():
        y, cache = norm.layernorm_forward_fast(x, w, b)
        return (y, cache.mean, cache.rstd, *norm.layernorm_backward_fast(dy, cache))
    results = _on_threads(run)
    for y, mean, rstd, dx, dw, db in results:
        assert_close(y, y0)
        assert_close(mean, c0.mean)
        assert_close(rstd, c0.rstd)
        assert_close(dx, dx0)
        assert_close(dw, dw0)
        assert (db is None) == (db0 is None)
        if db is not None:
            assert_close(db, db0)
    for y, mean, rstd, dx, *_ in results[1:]:        # rows are computed by one thread each
        np.testing.assert_array_equal(y, results[0][0])
        np.testing.assert_array_equal(dx, results[0][3])


@settings(deadline=None, max_examples=15)
@given(lead=st.sampled_from([(2,), (3, 2), (2, 2, 2), (130,)]), C=st.integers(3, 6), bias=st.booleans(), seed=seeds)
def test_fast_layernorm_backward_matches_finite_differences(lead, C, bias, seed):
    x = randn(seed, *lead, C) + 1
    w, b = 1 + 0.5 * randn(seed + 1, C), randn(seed + 2, C)
    h = 1e-3 * float(np.min(x.std(axis=-1)))
    before = backend.num_threads()
    backend.set_num_threads(2)
    try:
        if bias:
            rep = bp.gradcheck(norm.layernorm_forward_fast, norm.layernorm_backward_fast, [x, w, b], eps=h)
        else:
            rep = bp.gradcheck(norm.layernorm_forward_fast, norm.layernorm_backward_fast, [x, w, None],
                               wrt=[0, 1], eps=h)
    finally:
        backend.set_num_threads(before)
    assert_gradcheck(rep)


def test_fast_layernorm_rejects_what_the_plain_one_rejects():
    x = np.zeros((4, 3))
    with pytest.raises(ValueError, match="weight"):
        norm.layernorm_forward_fast(x, np.ones(4), None)
    _, cache = norm.layernorm_forward_fast(x + np.arange(3), np.ones(3), None)
    with pytest.raises(ValueError, match="dy"):
        norm.layernorm_backward_fast(np.zeros((4, 2)), cache)


@pytest.mark.parametrize("decoupled", [True, False])
def test_threaded_adam_steps_are_bit_identical_to_the_plain_update(decoupled, threads, monkeypatch):
    monkeypatch.setattr(optim, "_ADAM_PIECE", 4096)     # small pieces: several per parameter
    rng = np.random.default_rng(0)
    shapes = {"big.weight": (300, 700), "mid": (5 * optim._ADAM_PIECE + 3,), "small.bias": (7,)}
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    plain = {k: v.copy() for k, v in params.items()}
    cls = optim.AdamW if decoupled else optim.Adam
    fast_opt = cls(params, lr=1e-2, weight_decay=0.1, fast=True)
    plain_opt = cls(plain, lr=1e-2, weight_decay=0.1, fast=False)
    for n in (2, 3, 1, 2):
        threads(n)
        grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        grads["big.weight"] = np.asfortranarray(grads["big.weight"])   # a non-contiguous gradient too
        fast_opt.step(grads)
        plain_opt.step(grads)
        for k in shapes:
            np.testing.assert_array_equal(params[k], plain[k])


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_parallel_for_works_in_a_forked_child(threads):
    import os
    threads(2)
    backend.parallel_for(lambda lo, hi: None, 10)          # the parent's pool exists now
    pid = os.fork()
    if pid == 0:                                           # the child: its own pool, or it would hang
        hits = np.zeros(10, dtype=int)

        def part(lo, hi):
            hits[lo:hi] += 1
        backend.parallel_for(part, 10)
        os._exit(0 if (hits == 1).all() else 1)
    import signal
    import time
    deadline = time.monotonic() + 30
    while True:                                            # a child that hangs is killed, and fails
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("parallel_for hung in a forked child")
        time.sleep(0.05)
    assert os.WEXITSTATUS(status) == 0


# --- BLAS's thread count, and a batch cut into shards that run at once ----------------------

def _numpy_has_openblas():
    return "openblas" in str(np.__config__.CONFIG["Build Dependencies"]["blas"].get("name", "")).lower()


@pytest.fixture
def blas():
    """NumPy's OpenBLAS thread count, restored after the test (skips without an OpenBLAS)."""
    before = backend.blas_threads()
    if before is None:
        assert not _numpy_has_openblas(), "NumPy is built with OpenBLAS, but backend could not find it"
        pytest.skip("NumPy's BLAS is not OpenBLAS: its thread count cannot be set")
    yield before
    backend.set_blas_threads(before)


def test_blas_thread_count_can_be_read_and_set_and_threadpoolctl_agrees(blas):
    for n in (1, 2, 1):
        assert backend.set_blas_threads(n) is True
        assert backend.blas_threads() == n
        try:
            import threadpoolctl
        except ImportError:
            continue
        ours = [i for i in threadpoolctl.threadpool_info()
                if i["internal_api"] == "openblas" and "numpy" in i["filepath"]]
        assert ours and all(i["num_threads"] == n for i in ours), ours
    with pytest.raises(ValueError, match="n: expected a positive int, got 0"):
        backend.set_blas_threads(0)


def test_batch_shards_one_per_thread_only_where_they_can_run_at_once(threads, blas, monkeypatch):
    threads(3)
    assert [backend.batch_shards(rows) for rows in (1, 2, 3, 64)] == [1, 2, 3, 3]    # at most one per row
    assert backend.batch_shards(64, xp=object()) == 1                             # a GPU: the batch whole
    inside = []
    backend.parallel_for(lambda lo, hi: inside.append(backend.batch_shards(64)), 3)
    assert inside == [1, 1, 1]                                                    # threads already busy
    from_a_new_thread = []                                     # a thread of the caller's own shards too
    worker = threading.Thread(target=lambda: from_a_new_thread.append(backend.batch_shards(64)))
    worker.start()
    worker.join()
    assert from_a_new_thread == [3]
    threads(1)
    assert backend.batch_shards(64) == 1
    threads(2)
    assert backend.batch_shards(64) == 2
    monkeypatch.setattr(backend, "_blas", False)                                  # a BLAS we cannot hold
    assert backend.batch_shards(64) == 1


@given(rows=st.integers(1, 300), shards=st.integers(1, 8))
def test_shard_bounds_cover_the_rows_once_in_near_equal_consecutive_ranges(rows, shards):
    bounds = backend.shard_bounds(rows, shards)
    assert len(bounds) == shards and bounds[0][0] == 0 and bounds[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_run_in_shards_runs_them_at_once_on_one_blas_thread_each_and_restores_blas(threads, blas):
    threads(3)
    backend.set_blas_threads(2)
    together = threading.Barrier(3, timeout=10)    # passes only if the three shards run at once

    def shard(lo, hi):
        together.wait()
        return lo, hi, threading.get_ident(), backend.blas_threads()
    out = backend.run_in_shards(shard, 10, 3)
    assert [(lo, hi) for lo, hi, _, _ in out] == [(0, 3), (3, 6), (6, 10)]     # in order
    assert len({ident for _, _, ident, _ in out}) == 3
    assert all(n == 1 for *_, n in out)
    assert backend.blas_threads() == 2

    def failing(lo, hi):
        if lo:
            raise ArithmeticError(f"shard at {lo}")
    with pytest.raises(ArithmeticError, match="shard at 3"):
        backend.run_in_shards(failing, 10, 3)
    assert backend.blas_threads() == 2                                           # restored after an error too
    assert backend.run_in_shards(lambda lo, hi: (lo, hi, backend.blas_threads()), 5, 1) == [(0, 5, 2)]


def _gpt_case(seed, B, variant_kw, ignore):
    from minillm import gpt
    cfg = gpt.GPTConfig(vocab_size=7, block_size=6, n_layer=2, n_head=2, n_embd=8, mlp_hidden=8, **variant_kw)
    rng = np.random.default_rng(seed)
    params = {k: v + 0.3 * rng.standard_normal(v.shape)
              for k, v in gpt.init_params(cfg, seed, dtype=np.float64).items()}
    idx, targets = rng.integers(0, 7, (B, 5)), rng.integers(0, 7, (B, 5))
    if ignore == "some":
        targets[rng.random((B, 5)) < 0.4] = -100
        targets[0] = -100                                  # a shard may hold no counted target at all
    elif ignore == "all":
        targets[:] = -100
    return gpt, cfg, params, idx, targets


GPT_VARIANTS = [dict(), dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, bias=False,
                             tie_embeddings=False)]


@settings(deadline=None, max_examples=15)
@given(seed=seeds, B=st.integers(1, 5), variant=st.sampled_from(GPT_VARIANTS),
       ignore=st.sampled_from(["none", "some", "all"]), checkpointing=st.booleans())
def test_gpt_loss_and_grads_are_the_same_in_any_number_of_shards(seed, B, variant, ignore, checkpointing):
    """The batch mean is the shards' means weighted by their counted targets: 1, 2, 3 threads
    (the batch whole, or 2 or 3 shards at once) give the same loss and gradient to round-off."""
    gpt, cfg, params, idx, targets = _gpt_case(seed, B, variant, ignore)
    whole = gpt.loss_and_grads_in_shards(params, cfg, idx, targets, 1, activation_checkpointing=checkpointing)
    runs = _on_threads(lambda: gpt.loss_and_grads(params, cfg, idx, targets,
                                                  activation_checkpointing=checkpointing))
    runs += [gpt.loss_and_grads_in_shards(params, cfg, idx, targets, k) for k in range(2, B + 1)]
    for loss, grads in runs:
        assert abs(loss - whole[0]) <= 1e-12 * max(1.0, abs(whole[0]))
        assert set(grads) == set(whole[1])
        for name, g in grads.items():
            np.testing.assert_allclose(g, whole[1][name], rtol=1e-10, atol=1e-13, err_msg=name)
    if ignore == "all":
        assert whole[0] == 0 and all(not g.any() for g in whole[1].values())


@settings(deadline=None, max_examples=10)
@given(seed=seeds, B=st.integers(2, 5), shards=st.integers(2, 5))
def test_gpt_shards_under_dropout_draw_their_masks_from_seeds_drawn_from_rng(seed, B, shards):
    """Under dropout shard s runs on np.random.default_rng(seeds[s]), seeds = rng.integers(2**63,
    size=shards): the result is the shards' own loss_and_grads (one thread each), weighted."""
    shards = min(shards, B)
    gpt, cfg, params, idx, targets = _gpt_case(seed, B, dict(dropout=0.3), "some")
    loss, grads = gpt.loss_and_grads_in_shards(params, cfg, idx, targets, shards, train=True,
                                               rng=np.random.default_rng(seed))
    seeds_ = np.random.default_rng(seed).integers(2**63, size=shards)
    n = int((targets != -100).sum())
    want_loss, want = 0.0, {k: np.zeros_like(v) for k, v in params.items()}
    for (lo, hi), s in zip(backend.shard_bounds(B, shards), seeds_):
        n_s = int((targets[lo:hi] != -100).sum())
        loss_s, g_s = _on_threads(lambda: gpt.loss_and_grads(params, cfg, idx[lo:hi], targets[lo:hi], train=True,
                                                             rng=np.random.default_rng(int(s))), (1,))[0]
        want_loss += n_s / max(n, 1) * loss_s
        for k in want:
            want[k] += n_s / max(n, 1) * g_s[k]
    assert abs(loss - want_loss) <= 1e-12 * max(1.0, abs(want_loss))
    for k in want:
        np.testing.assert_allclose(grads[k], want[k], rtol=1e-10, atol=1e-13, err_msg=k)


def test_gpt_shards_reject_a_shard_count_that_is_not_one_to_the_rows():
    gpt, cfg, params, idx, targets = _gpt_case(0, 3, dict(), "none")
    for bad in (0, 4):
        with pytest.raises(ValueError, match=rf"shards: expected an int in \[1, 4\), got {bad}"):
            gpt.loss_and_grads_in_shards(params, cfg, idx, targets, bad)
    with pytest.raises(ValueError, match="targets"):
        gpt.loss_and_grads(params, cfg, idx, targets[:, :2])


def test_gpt_shards_without_dropout_need_no_generator_and_leave_one_untouched():
    """As the plain path: train=True with dropout 0 draws nothing, so rng may be None."""
    gpt, cfg, params, idx, targets = _gpt_case(0, 4, dict(), "none")
    loss, _ = gpt.loss_and_grads_in_shards(params, cfg, idx, targets, 2, train=True, rng=None)
    rng = np.random.default_rng(1)
    state = rng.bit_generator.state
    assert gpt.loss_and_grads_in_shards(params, cfg, idx, targets, 2, train=True, rng=rng)[0] == loss
    assert rng.bit_generator.state == state
