"""Activation checkpointing in gpt.py: the block recomputed in the backward gives the plain
backward's gradients bit for bit (dropout included), agrees with finite differences, leaves
the dropout generator where the plain pass leaves it, and needs less memory."""
import tracemalloc

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from helpers import assert_alive, assert_gradcheck, on
from minillm import gpt
from minillm.backprop import check_dict_gradients
from strategies import seeds
from test_gpt import TWO_LAYERS, VARIANTS, per_token_loss, shapes, tiny_case


@settings(max_examples=6)
@example(shape=TWO_LAYERS, variant="llama", seed=3, p=0.5)
@given(shape=shapes, variant=st.sampled_from(sorted(VARIANTS)), seed=seeds, p=st.sampled_from([0.0, 0.2]))
def test_checkpointed_gradients_are_the_plain_ones_bit_for_bit(xp, shape, variant, seed, p):
    cfg, params, idx, targets = tiny_case(variant, shape, dropout=p)
    params, idx, targets = {k: on(xp, v) for k, v in params.items()}, *on(xp, idx, targets)
    r1, r2 = np.random.default_rng(seed), np.random.default_rng(seed)
    l1, g1 = gpt.loss_and_grads(params, cfg, idx, targets, train=True, rng=r1)
    l2, g2 = gpt.loss_and_grads(params, cfg, idx, targets, train=True, rng=r2, activation_checkpointing=True)
    assert_alive(g1, loss=l1)
    assert l1 == l2 and set(g1) == set(g2)
    for k in g1:
        assert np.array_equal(np.asarray(g1[k]), np.asarray(g2[k])), k
    assert r1.bit_generator.state == r2.bit_generator.state     # the recompute drew from copies


@settings(max_examples=1)
@example(shape=TWO_LAYERS, variant="gpt2")       # two recomputed blocks: the gradient crosses between them
@given(shape=shapes, variant=st.sampled_from(sorted(VARIANTS)))
def test_checkpointed_backward_matches_finite_differences(shape, variant):
    cfg, params, idx, targets = tiny_case(variant, shape)
    _, grads = gpt.loss_and_grads(params, cfg, idx, targets, activation_checkpointing=True)
    assert_alive(grads)

    def f(p):
        return per_token_loss(gpt.forward(p, cfg, idx, activation_checkpointing=True)[0], targets)
    # 6 entries of each array (every array checked; the plain backward's test checks them all)
    assert_gradcheck(check_dict_gradients(f, params, grads, max_checks_per_param=6))


def _peak_bytes(fn):
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_checkpointing_lowers_the_peak_memory_of_a_step():
    cfg = gpt.GPTConfig(vocab_size=32, block_size=32, n_layer=6, n_head=2, n_embd=32)
    params = gpt.init_params(cfg, seed=0)
    r = np.random.default_rng(0)
    x, y = r.integers(0, 32, (8, 32)), r.integers(0, 32, (8, 32))
    plain = _peak_bytes(lambda: gpt.loss_and_grads(params, cfg, x, y))
    ckpt = _peak_bytes(lambda: gpt.loss_and_grads(params, cfg, x, y, activation_checkpointing=True))
    assert ckpt < 0.6 * plain, (ckpt, plain)


def test_checkpointing_with_a_kv_cache_is_an_error():
    cfg = gpt.GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=2, n_embd=8)
    params = gpt.init_params(cfg, seed=0)
    with pytest.raises(ValueError, match="activation_checkpointing: expected no kv_cache"):
        gpt.forward(params, cfg, np.zeros((1, 2), np.int64), kv_cache=gpt.GPTDecoder(params, cfg).new_cache(1, 8),
                    activation_checkpointing=True)
    with pytest.raises(TypeError, match="activation_checkpointing: expected a bool, got str"):
        gpt.forward(params, cfg, np.zeros((1, 2), np.int64), activation_checkpointing="yes")


def test_training_with_checkpointing_follows_the_same_trajectory(tmp_path):
    """The training loop (dropout on, 2 micro-batches, clipping) with --activation-checkpointing
    ends on the same parameters, bit for bit."""
    import ddp_worker
    from minillm.train import load_checkpoint
    ddp_worker.main([str(tmp_path / "a"), "--accum", "2", "--steps", "3"])
    ddp_worker.main([str(tmp_path / "b"), "--accum", "2", "--steps", "3", "--activation-checkpointing"])
    a, b = load_checkpoint(tmp_path / "a")["params"], load_checkpoint(tmp_path / "b")["params"]
    assert all(np.array_equal(a[k], b[k]) for k in a)
