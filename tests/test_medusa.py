"""Medusa (minillm.medusa): the heads and their backward, the frozen-base loss, Medusa's tree
buffers, tree attention in the GPT (gpt.forward's tree_mask, KVCache.keep), the acceptance
rules, and generation whose greedy output is the base's greedy output, token for token."""
import doctest
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from helpers import assert_close, assert_gradcheck
from minillm import gpt, medusa
from minillm.attention import KVCache
from minillm.backprop import check_dict_gradients, gradcheck
from minillm.optim import Adam
from strategies import randn, seeds


def test_doctests():
    result = doctest.testmod(medusa, verbose=False)
    assert result.attempted >= 5 and result.failed == 0


# ---------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------

def _random_heads(seed, K, C, V, tied=False, scale=0.5):
    """Heads with every parameter random (a zero W1 would leave SiLU's slope untested)."""
    rng = np.random.default_rng(seed)
    heads = {}
    for k in range(K):
        heads[f"medusa.{k}.w1"] = rng.standard_normal((C, C)) * scale
        heads[f"medusa.{k}.b1"] = rng.standard_normal(C) * scale
        if not tied:
            heads[f"medusa.{k}.lm_head"] = rng.standard_normal((V, C)) * scale
    return heads


@given(seed=seeds, B=st.integers(1, 2), T=st.integers(2, 3), C=st.integers(2, 5), V=st.integers(2, 6),
       K=st.integers(1, 3), tied=st.booleans())
@example(seed=0, B=2, T=3, C=4, V=5, K=3, tied=False)
@example(seed=1, B=1, T=2, C=3, V=4, K=2, tied=True)
def test_heads_backward_matches_finite_differences(seed, B, T, C, V, K, tied):
    heads = _random_heads(seed, K, C, V, tied)
    hidden = randn(seed + 1, B, T, C)
    lm_head = randn(seed + 2, V, C) * 0.5
    dlogits = randn(seed + 3, K, B, T, V)
    logits, cache = medusa.heads_forward(hidden, heads, lm_head)
    assert logits.shape == (K, B, T, V)
    grads, dhidden = medusa.heads_backward(dlogits, cache, return_dhidden=True)
    assert grads.keys() == heads.keys()

    def f(h):
        return (medusa.heads_forward(hidden, h, lm_head)[0] * dlogits).reshape(-1)

    assert_gradcheck(check_dict_gradients(f, heads, grads))
    report = gradcheck(lambda x: medusa.heads_forward(x, heads, lm_head),
                       lambda d, c: medusa.heads_backward(d, c, return_dhidden=True)[1], [hidden], seed=seed)
    assert_gradcheck(report)
    alone = medusa.heads_backward(dlogits, cache)             # the default return: the grads alone
    for name in grads:
        assert_close(alone[name], grads[name])


@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("tied", [False, True])
def test_a_new_head_predicts_what_the_base_lm_head_predicts(pos, tied):
    """W1 = 0 and b1 = 0 make r = h, and the projection is the base's LM head (copied or tied)."""
    cfg = gpt.GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, pos=pos,
                        tie_embeddings=not tied)
    params = gpt.init_params(cfg, seed=3, dtype=np.float64)
    head = medusa.base_lm_head(params, cfg)
    heads = medusa.init_heads(cfg, 3, tied=tied, lm_head=None if tied else head, dtype=np.float64)
    assert sorted(heads) == sorted(f"medusa.{k}.{n}" for k in range(3)
                                   for n in (("w1", "b1") if tied else ("w1", "b1", "lm_head")))
    idx = np.random.default_rng(0).integers(0, 11, (2, 6))
    logits, base = gpt.forward(params, cfg, idx)
    head_logits, _ = medusa.heads_forward(base.xf, heads, head)
    for k in range(3):
        assert_close(head_logits[k], logits, rtol=1e-12, atol=1e-12)
    if not tied:   # a copy, not a view: training a head leaves the base alone
        heads["medusa.0.lm_head"][0, 0] += 1.0
        assert params["wte" if cfg.tie_embeddings else "lm_head"][0, 0] != heads["medusa.0.lm_head"][0, 0]


def test_init_heads_without_a_base_head_draws_projections_from_the_seed():
    cfg = gpt.GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=1, n_embd=4)
    a, b, c = (medusa.init_heads(cfg, 2, seed=s) for s in (0, 0, 1))
    assert_close(a["medusa.1.lm_head"], b["medusa.1.lm_head"])
    assert not np.allclose(a["medusa.1.lm_head"], c["medusa.1.lm_head"])
    assert a["medusa.0.w1"].dtype == np.float32 and not a["medusa.0.w1"].any()
    assert medusa.n_heads(a) == 2


def test_head_targets_shift_each_head_one_further():
    t = np.array([[1, 2, 3, 4]])
    assert medusa.head_targets(t, 3).tolist() == [[[2, 3, 4, -100]], [[3, 4, -100, -100]],
                                                  [[4, -100, -100, -100]]]


@given(seed=seeds, K=st.integers(1, 3), weights=st.booleans())
@example(seed=0, K=3, weights=True)
def test_loss_and_grads_trains_the_heads_on_tokens_k_plus_2_ahead(seed, K, weights):
    cfg = gpt.GPTConfig(vocab_size=7, block_size=8, n_layer=1, n_head=2, n_embd=4)
    params = gpt.init_params(cfg, seed=seed % 100, dtype=np.float64)
    heads = _random_heads(seed, K, 4, 7)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 7, (2, 7))
    x, y = tokens[:, :-1], tokens[:, 1:]
    w = [float(v) for v in rng.uniform(0.2, 1.0, K)] if weights else None
    loss, grads, per_head = medusa.loss_and_grads(heads, params, cfg, x, y, w)
    w = w or [0.8 ** k for k in range(K)]
    assert np.isclose(loss, sum(a * b for a, b in zip(w, per_head)))
    # head k's loss by hand: cross-entropy against x[t + k + 2] where there is one
    _, base = gpt.forward(params, cfg, x)
    logits, _ = medusa.heads_forward(base.xf, heads)
    for k in range(K):
        lp = logits[k] - np.log(np.exp(logits[k]).sum(-1, keepdims=True))
        T = x.shape[1] - k - 1
        want = -np.mean([lp[b, t, tokens[b, t + k + 2]] for b in range(2) for t in range(T)])
        assert np.isclose(per_head[k], want, rtol=1e-12)
    report = check_dict_gradients(lambda h: medusa.loss_and_grads(h, params, cfg, x, y, w)[0], heads, grads,
                                  max_checks_per_param=8, seed=seed)
    assert_gradcheck(report)


def test_head_accuracy_counts_a_target_found_in_the_top_k():
    cfg = gpt.GPTConfig(vocab_size=9, block_size=8, n_layer=1, n_head=1, n_embd=4)
    params = gpt.init_params(cfg, seed=0, dtype=np.float64)
    heads = medusa.init_heads(cfg, 2, lm_head=params["wte"], dtype=np.float64)
    tokens = np.random.default_rng(1).integers(0, 9, (3, 8))
    x, y = tokens[:, :-1], tokens[:, 1:]
    base, per_head = medusa.head_accuracy(heads, params, cfg, x, y, ks=(1, 9))
    assert per_head.shape == (2, 2) and np.allclose(per_head[:, 1], 1.0) and base[1] == 1.0   # top-V: all
    logits, cache = gpt.forward(params, cfg, x)
    assert np.isclose(base[0], np.mean(np.argmax(logits, -1) == y))
    # head 0 (a copy of the base head) is scored against the token two ahead
    assert np.isclose(per_head[0, 0], np.mean(np.argmax(logits[:, :-1], -1) == y[:, 1:]))


# ---------------------------------------------------------------------------
# Tree buffers
# ---------------------------------------------------------------------------

def test_tree_buffers_of_a_hand_worked_tree():
    # nodes: 0 root, 1 [0], 2 [1], 3 [0, 0], 4 [0, 1], 5 [1, 0], 6 [0, 0, 0]  (sorted by length, values)
    b = medusa.tree_buffers([[0, 0, 0], [1], [0, 1], [0], [1, 0], [0, 0]], topk=3)
    m = np.zeros((7, 7), dtype=int)
    for node, path in enumerate([[0], [0, 1], [0, 2], [0, 1, 3], [0, 1, 4], [0, 2, 5], [0, 1, 3, 6]]):
        m[node, path] = 1
    assert b.attn_mask.dtype == bool and b.attn_mask.astype(int).tolist() == m.tolist()
    assert b.position_ids.tolist() == [0, 1, 1, 2, 2, 2, 3]
    # root 0; depth d, last index i -> 1 + topk (d - 1) + i
    assert b.tree_indices.tolist() == [0, 1, 2, 4, 5, 4, 7]
    # leaves, last-sorted first: [0, 0, 0], [1, 0], [0, 1]
    assert b.retrieve_indices.tolist() == [[0, 1, 3, 6], [0, 2, 5, -1], [0, 1, 4, -1]]


def test_tree_buffers_of_the_root_alone_and_of_a_chain():
    b = medusa.tree_buffers([])
    assert b.attn_mask.tolist() == [[True]] and b.position_ids.tolist() == [0]
    assert b.tree_indices.tolist() == [0] and b.retrieve_indices.tolist() == [[0]]
    c = medusa.tree_buffers([[0], [0, 0], [0, 0, 0]], topk=10)
    assert c.attn_mask.tolist() == np.tril(np.ones((4, 4), dtype=bool)).tolist()
    assert c.tree_indices.tolist() == [0, 1, 11, 21] and c.retrieve_indices.tolist() == [[0, 1, 2, 3]]


def test_choices_may_be_tuples_as_some_published_trees_are():
    """FasterDecoding's vicuna_*_stage* trees are lists of tuples; mc_sim_7b_63 a list of lists."""
    as_lists = medusa.tree_buffers(medusa.MC_SIM_7B_63)
    as_tuples = medusa.tree_buffers([tuple(c) for c in reversed(medusa.MC_SIM_7B_63)])   # any order
    for a, b in zip(as_lists, as_tuples):
        assert np.array_equal(a, b)


def test_mc_sim_7b_63_and_every_prefix_of_it_are_trees():
    b = medusa.tree_buffers(medusa.MC_SIM_7B_63)
    assert b.attn_mask.shape == (64, 64) and int(b.position_ids.max()) == 4
    assert b.retrieve_indices.shape[1] == 5
    for n in range(len(medusa.MC_SIM_7B_63) + 1):
        assert medusa.tree_buffers(medusa.MC_SIM_7B_63[:n]).attn_mask.shape == (n + 1, n + 1)


@st.composite
def trees(draw, max_nodes=12, max_depth=4, topk=4):
    """A random prefix-closed tree: each new path extends the root or an existing path by
    an index not used yet at that parent."""
    paths = []
    for _ in range(draw(st.integers(0, max_nodes))):
        parents = [()] + [p for p in paths if len(p) < max_depth]
        parent = draw(st.sampled_from(parents))
        used = {p[-1] for p in paths if len(p) == len(parent) + 1 and p[:-1] == parent}
        free = [i for i in range(topk) if i not in used]
        if free:
            paths.append(parent + (draw(st.sampled_from(free)),))
    return [list(p) for p in draw(st.permutations(paths))]


@given(choices=trees())
@example(choices=[list(c) for c in medusa.MC_SIM_7B_63])
def test_tree_buffer_properties(choices):
    topk = 10
    b = medusa.tree_buffers(choices, topk=topk)
    nodes = [()] + sorted((tuple(c) for c in choices), key=lambda p: (len(p), p))
    N = len(nodes)
    assert b.attn_mask.shape == (N, N) and b.position_ids.shape == b.tree_indices.shape == (N,)
    index = {p: n for n, p in enumerate(nodes)}
    for n, p in enumerate(nodes):
        # the mask row is exactly the root path: the root, every ancestor, itself
        assert set(np.flatnonzero(b.attn_mask[n])) == {index[p[:d]] for d in range(len(p) + 1)}
        assert b.position_ids[n] == len(p) == b.attn_mask[n].sum() - 1      # depth = path length
        if p:
            assert b.tree_indices[n] == 1 + topk * (len(p) - 1) + p[-1]
    leaves = {p for p in nodes if not any(q[:-1] == p for q in nodes[1:])}
    rows = []
    for row in b.retrieve_indices:
        path = [int(i) for i in row if i >= 0]
        assert (row[len(path):] == -1).all() and path[0] == 0
        for parent, child in zip(path, path[1:]):        # each step goes one level down the tree
            assert nodes[child][:-1] == nodes[parent]
        rows.append(nodes[path[-1]])
    assert sorted(rows) == sorted(leaves) and len(rows) == len(leaves)  # every leaf, once
    assert b.retrieve_indices.shape[1] == max(len(p) for p in nodes) + 1


@pytest.mark.parametrize("choices, message", [
    ([[0, 1]], "not a prefix-closed tree"),
    ([[0], [0, 1], [1, 1]], "not a prefix-closed tree"),
    ([[0], [10]], "outside"),
    ([[0], [0]], "more than once"),
    ([[0], []], "non-empty list of ints"),
    ([[0], [0.5]], "non-empty list of ints"),
    ([[True]], "non-empty list of ints"),
])
def test_tree_buffers_rejects_what_is_not_a_tree(choices, message):
    with pytest.raises(ValueError, match=message):
        medusa.tree_buffers(choices, topk=10)
    with pytest.raises(TypeError, match="choices"):
        medusa.tree_buffers("0,1")


# ---------------------------------------------------------------------------
# Tree attention in the GPT
# ---------------------------------------------------------------------------

def _config(pos="learned", n_kv_head=None, block_size=24, V=12):
    return gpt.GPTConfig(vocab_size=V, block_size=block_size, n_layer=2, n_head=4, n_embd=16,
                         n_kv_head=n_kv_head, pos=pos)


def _cache(cfg, max_len=64):
    return KVCache(cfg.n_layer, 1, cfg.kv_heads, max_len, cfg.head_dim, dtype=np.float64)


@given(choices=trees(max_nodes=10), pos=st.sampled_from(["learned", "rope"]), n_kv_head=st.sampled_from([None, 2, 1]),
       n_prefix=st.integers(0, 6), seed=seeds)
@example(choices=[list(c) for c in medusa.MC_SIM_7B_63[:20]], pos="rope", n_kv_head=2, n_prefix=5, seed=0)
@settings(max_examples=10)
def test_tree_attention_logits_at_a_node_are_a_plain_forward_of_its_path(choices, pos, n_kv_head, n_prefix, seed):
    cfg = _config(pos, n_kv_head)
    params = gpt.init_params(cfg, seed=seed % 1000, dtype=np.float64)
    rng = np.random.default_rng(seed)
    b = medusa.tree_buffers(choices, topk=10)
    N = b.attn_mask.shape[0]
    prefix = rng.integers(0, 12, n_prefix).tolist()
    tokens = rng.integers(0, 12, N)
    cache = _cache(cfg)
    if prefix:
        gpt.forward(params, cfg, np.array([prefix]), kv_cache=cache)
    logits, fc = gpt.forward(params, cfg, tokens[None], kv_cache=cache, tree_mask=b.attn_mask)
    assert cache.length(0) == n_prefix + N
    for n in range(N):
        path = np.flatnonzero(b.attn_mask[n])                 # the root path of node n, in order
        plain, pc = gpt.forward(params, cfg, np.array([prefix + tokens[path].tolist()]))
        assert_close(logits[0, n], plain[0, -1], rtol=1e-10, atol=1e-12, msg=f"node {n}")
        assert_close(fc.xf[0, n], pc.xf[0, -1], rtol=1e-10, atol=1e-12)
    # keep one root-to-leaf path: the cache then holds what a plain forward of it would
    row = b.retrieve_indices[-1]
    path = row[row >= 0]
    cache.keep(n_prefix, path)
    assert cache.length(0) == n_prefix + len(path)
    nxt, _ = gpt.forward(params, cfg, np.array([[3]]), kv_cache=cache)
    plain, _ = gpt.forward(params, cfg, np.array([prefix + tokens[path].tolist() + [3]]))
    assert_close(nxt[0, -1], plain[0, -1], rtol=1e-10, atol=1e-12)


def test_a_tree_mask_of_a_chain_is_the_causal_forward():
    cfg = _config()
    params = gpt.init_params(cfg, seed=0, dtype=np.float64)
    idx = np.random.default_rng(0).integers(0, 12, (2, 5))
    plain, _ = gpt.forward(params, cfg, idx)
    chain, _ = gpt.forward(params, cfg, idx, tree_mask=np.tril(np.ones((5, 5), dtype=bool)))
    assert_close(chain, plain, rtol=1e-12, atol=1e-14)


def test_a_tree_pass_needs_only_its_deepest_path_in_the_context():
    cfg = _config(block_size=6)
    params = gpt.init_params(cfg, seed=0, dtype=np.float64)
    b = medusa.tree_buffers(medusa.MC_SIM_7B_63[:30], topk=10)        # 31 nodes, 3 deep
    cache = _cache(cfg)
    gpt.forward(params, cfg, np.array([[1, 2]]), kv_cache=cache)      # positions 2 .. 5 for the tree
    gpt.forward(params, cfg, np.zeros((1, 31), dtype=np.int64), kv_cache=cache, tree_mask=b.attn_mask)
    cache.crop(3)
    with pytest.raises(ValueError, match="a tree 3 deep after 3 cached"):
        gpt.forward(params, cfg, np.zeros((1, 31), dtype=np.int64), kv_cache=cache, tree_mask=b.attn_mask)


@pytest.mark.parametrize("mask, message", [
    (np.ones((3, 3), dtype=np.int64), "bool array of shape"),
    (np.ones((3, 4), dtype=bool), "bool array of shape"),
    (np.eye(3, dtype=bool) & np.array([True, False, True]), "see itself"),
    (np.ones((3, 3), dtype=bool), "only earlier nodes"),
    (np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=bool), "row 2 is not a root path"),
    (np.array([[1, 0, 0], [0, 1, 0], [1, 1, 1]], dtype=bool), "row 2 is not a root path"),
])
def test_forward_rejects_a_tree_mask_that_is_not_a_tree(mask, message):
    cfg = _config()
    params = gpt.init_params(cfg, seed=0)
    with pytest.raises(ValueError, match=message):
        gpt.forward(params, cfg, np.zeros((1, 3), dtype=np.int64), tree_mask=mask)


def test_forward_rejects_a_tree_mask_with_padding():
    cfg = _config()
    params = gpt.init_params(cfg, seed=0)
    with pytest.raises(ValueError, match="cannot be combined with attention_mask"):
        gpt.forward(params, cfg, np.zeros((1, 2), dtype=np.int64), tree_mask=np.eye(2, dtype=bool),
                    attention_mask=np.ones((1, 2), dtype=bool))


def test_a_forest_is_a_tree_mask_too():
    """Two roots: each node's depth counts its own ancestors only."""
    cfg = _config(pos="rope")
    params = gpt.init_params(cfg, seed=0, dtype=np.float64)
    mask = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=bool)
    logits, _ = gpt.forward(params, cfg, np.array([[4, 5, 6]]), tree_mask=mask)
    alone, _ = gpt.forward(params, cfg, np.array([[6]]))
    assert_close(logits[0, 2], alone[0, 0], rtol=1e-12, atol=1e-14)


def test_kv_cache_keep_moves_the_kept_positions_down_in_order():
    c = KVCache(2, 1, 1, 8, 1, dtype=np.float64)
    for layer in range(2):
        c.append(layer, np.arange(7.0).reshape(1, 1, 7, 1), 10 + np.arange(7.0).reshape(1, 1, 7, 1))
    c.keep(4, np.array([0, 2]))
    assert c.length(0) == c.length(1) == 6
    assert c.k[1][0, 0, :6, 0].tolist() == [0, 1, 2, 3, 4, 6]
    assert c.v[0][0, 0, :6, 0].tolist() == [10, 11, 12, 13, 14, 16]
    c.keep(2, np.array([3, 1]))                    # any order, read before written
    assert c.k[0][0, 0, :4, 0].tolist() == [0, 1, 6, 3]
    with pytest.raises(ValueError, match="index: expected positions in"):
        c.keep(2, np.array([2]))
    with pytest.raises(ValueError, match="start"):
        c.keep(5, np.array([0]))
    with pytest.raises(TypeError, match="index"):
        c.keep(0, np.array([0.0]))


# ---------------------------------------------------------------------------
# Acceptance rules
# ---------------------------------------------------------------------------

def test_typical_threshold_is_min_of_the_threshold_and_alpha_exp_minus_entropy():
    p = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    H = np.array([np.log(2), 0.0, -(0.2 * np.log(0.2) + 0.3 * np.log(0.3) + 0.5 * np.log(0.5))])
    assert_close(medusa.typical_threshold(p, 0.09, 0.3), np.minimum(0.09, 0.3 * np.exp(-H)))
    assert_close(medusa.typical_threshold(p, 0.5, 0.3), 0.3 * np.exp(-H))


@given(seed=seeds, L=st.integers(1, 5), D=st.integers(0, 4), temperature=st.sampled_from([0.3, 0.7, 1.5]),
       threshold=st.sampled_from([0.0, 0.05, 0.09, 0.3]), alpha=st.sampled_from([0.1, 0.3, 1.0]))
def test_acceptance_rules_against_a_loop_by_hand(seed, L, D, temperature, threshold, alpha):
    rng = np.random.default_rng(seed)
    V = 5
    logits = rng.standard_normal((L, D + 1, V)) * 2
    cand = rng.integers(0, V, (L, D + 1))
    cand[:, 0] = 1
    for r in range(L):                                  # some paths padded
        cut = rng.integers(1, D + 2)
        cand[r, cut:] = -1
    best, n = medusa.greedy_accept(cand, logits)
    runs = []
    for r in range(L):
        j = 0
        while j < D and cand[r, j + 1] == np.argmax(logits[r, j]):
            j += 1
        runs.append(j)
    assert n == max(runs) and best == runs.index(max(runs))
    best, n = medusa.typical_accept(cand, logits, temperature, threshold, alpha)
    runs, liks = [], []
    for r in range(L):
        j, lik = 0, 0.0
        while j < D and cand[r, j + 1] >= 0:
            p = np.exp(logits[r, j] / temperature)
            p /= p.sum()
            H = -(p * np.log(p)).sum()
            if not p[cand[r, j + 1]] > min(threshold, alpha * np.exp(-H)):
                break
            lik += np.log(p[cand[r, j + 1]])
            j += 1
        runs.append(j)
        liks.append(lik)
    assert n == max(runs)
    if n:
        assert runs[best] == n and np.isclose(liks[best], max(li for li, ru in zip(liks, runs) if ru == n))
    else:
        assert best == 0


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------

_BASES = {}


def _base(pos, n_kv_head):
    """A small float64 GPT whose greedy text is not one repeated token (weights scaled up
    from GPT-2's init), and heads trained on its greedy continuations (a few Adam steps):
    they agree with the base often, so long candidate paths get accepted and kept."""
    key = (pos, n_kv_head)
    if key not in _BASES:
        cfg = gpt.GPTConfig(vocab_size=12, block_size=20, n_layer=2, n_head=2, n_embd=16,
                            n_kv_head=n_kv_head, pos=pos)
        params = gpt.init_params(cfg, seed=0, dtype=np.float64)
        params = {k: v * 6 if v.ndim == 2 else v for k, v in params.items()}
        prompts = [[a, b] for a in range(12) for b in (0, 5)]
        data = np.array(gpt.generate(params, cfg, prompts, 18, temperature=0))
        heads = medusa.init_heads(cfg, 4, lm_head=params["wte"], dtype=np.float64)
        opt = Adam(heads, lr=3e-2)
        for _ in range(40):
            _, grads, _ = medusa.loss_and_grads(heads, params, cfg, data[:, :-1], data[:, 1:])
            opt.step(grads)
        _BASES[key] = cfg, params, heads
    return _BASES[key]


@given(pos=st.sampled_from(["learned", "rope"]), n_kv_head=st.sampled_from([None, 1]),
       kind=st.sampled_from(["trained", "random", "new"]), choices=trees(max_nodes=14, topk=4),
       prompt=st.lists(st.integers(0, 11), min_size=1, max_size=8), n_new=st.integers(0, 30))
@example(pos="learned", n_kv_head=None, kind="trained", choices=[list(c) for c in medusa.MC_SIM_7B_63],
         prompt=[3, 5], n_new=30)
@example(pos="rope", n_kv_head=1, kind="trained", choices=[[0], [0, 0], [0, 0, 0], [0, 0, 0, 0], [1]],
         prompt=[7], n_new=12)
@example(pos="rope", n_kv_head=None, kind="random", choices=[list(c) for c in medusa.MC_SIM_7B_63[:9]],
         prompt=[1, 2, 3, 4, 5, 6, 7, 8], n_new=25)
@settings(max_examples=12)
def test_greedy_medusa_output_is_plain_greedy_output(pos, n_kv_head, kind, choices, prompt, n_new):
    cfg, params, heads = _base(pos, n_kv_head)
    if kind == "random":
        heads = _random_heads(len(prompt), 4, 16, 12)
    elif kind == "new":
        heads = medusa.init_heads(cfg, 4, lm_head=params["wte"], dtype=np.float64)
    ids, stats = medusa.generate(params, cfg, heads, prompt, n_new, choices=choices)
    assert ids == gpt.generate(params, cfg, prompt, n_new, temperature=0)
    # the accounting: every tree pass emitted 1 + accepted tokens; the rest are plain steps
    depth = max((len(c) for c in choices), default=0)
    assert stats.new_tokens == n_new and stats.tree_nodes == len(choices) + 1
    assert all(1 <= a <= depth + 1 for a in stats.accepted_lengths)
    assert sum(stats.accepted_lengths) <= n_new
    if n_new:
        plain_steps = max(n_new - sum(stats.accepted_lengths) - 1, 0)   # after the pending root
        assert stats.base_calls == 1 + len(stats.accepted_lengths) + plain_steps


def test_trained_heads_get_long_paths_accepted():
    """The identity above must not hold only because nothing was ever accepted."""
    for pos, kv in (("learned", None), ("rope", 1)):
        cfg, params, heads = _base(pos, kv)
        ids, stats = medusa.generate(params, cfg, heads, [3, 5], 16, choices=medusa.MC_SIM_7B_63)
        assert ids == gpt.generate(params, cfg, [3, 5], 16, temperature=0)
        assert stats.mean_accepted_length >= 2.5 and stats.base_calls < 10, stats


def test_past_the_context_decoding_slides_the_window_as_plain_greedy_does():
    cfg, params, heads = _base("learned", None)                        # block_size 20
    prompt = list(range(12)) + [0, 1, 2, 3, 4, 5, 6, 7]                # a full context
    for p in (prompt, prompt[:17]):
        ids, stats = medusa.generate(params, cfg, heads, p, 10, choices=medusa.MC_SIM_7B_63)
        assert ids == gpt.generate(params, cfg, p, 10, temperature=0)
    assert stats.accepted_lengths and max(stats.accepted_lengths) <= 3    # the tree cut to fit


def test_typical_acceptance_is_reproducible_and_tends_to_greedy_as_temperature_falls():
    cfg, params, heads = _base("rope", 1)
    a = medusa.generate(params, cfg, heads, [3, 5], 18, temperature=0.7, seed=4)
    b = medusa.generate(params, cfg, heads, [3, 5], 18, temperature=0.7, seed=4)
    assert a == b and len(a[0]) == 20
    cold, _ = medusa.generate(params, cfg, heads, [3, 5], 18, temperature=1e-6, seed=4)
    assert cold == gpt.generate(params, cfg, [3, 5], 18, temperature=0)


def test_with_a_zero_threshold_every_candidate_is_accepted():
    """p(x) > 0 for every token, so a zero threshold accepts whole paths: each step emits
    depth + 1 tokens, whatever the heads guessed."""
    cfg, params, _ = _base("learned", None)
    heads = _random_heads(0, 4, 16, 12)
    chain = [[0], [0, 0], [0, 0, 0]]
    ids, stats = medusa.generate(params, cfg, heads, [3], 16, choices=chain, temperature=1.0,
                                 posterior_threshold=0.0, seed=0)
    assert stats.accepted_lengths == (4, 4, 4, 4) and stats.base_calls == 5, stats


def test_generate_with_no_new_tokens_returns_the_prompt():
    cfg, params, heads = _base("learned", None)
    ids, stats = medusa.generate(params, cfg, heads, [1, 2], 0)
    assert ids == [1, 2] and stats.new_tokens == 0


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(choices=[[0, 1]]), ValueError, "not a prefix-closed tree"),
    (dict(choices=[[0], [10]]), ValueError, "outside"),
    (dict(choices=[[0], [0, 3]], topk=3), ValueError, "outside"),
    (dict(choices=[[0], [0, 0], [0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0]]), ValueError, "only 4 heads"),
    (dict(topk=13), ValueError, "topk"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(posterior_threshold=1.5), ValueError, "posterior_threshold"),
    (dict(prompt_ids=[]), ValueError, "prompt_ids"),
    (dict(prompt_ids=[[1, 2]]), ValueError, "prompt_ids"),
    (dict(prompt_ids=[12]), ValueError, "prompt_ids"),
    (dict(prompt_ids=list(range(12)) * 2), ValueError, "longer than the model's context"),
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    (dict(seed=-1), ValueError, "seed"),
])
def test_generate_rejects_bad_input(kwargs, error, message):
    cfg, params, heads = _base("learned", None)
    args = {"prompt_ids": [1, 2], "max_new_tokens": 4, **kwargs}
    with pytest.raises(error, match=message):
        medusa.generate(params, cfg, heads, **args)


def test_generate_rejects_a_tree_deeper_than_the_context_and_heads_of_another_model():
    cfg = gpt.GPTConfig(vocab_size=12, block_size=4, n_layer=1, n_head=2, n_embd=16)
    params = gpt.init_params(cfg, seed=0, dtype=np.float64)
    heads = medusa.init_heads(cfg, 4, lm_head=params["wte"], dtype=np.float64)
    with pytest.raises(ValueError, match="more than the context"):
        medusa.generate(params, cfg, heads, [1], 2, choices=[[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]])
    with pytest.raises(TypeError, match="dtype"):
        medusa.generate(params, cfg, medusa.init_heads(cfg, 4, lm_head=params["wte"]), [1], 2)
    other = medusa.init_heads(cfg.replace(vocab_size=13), 4, dtype=np.float64)
    with pytest.raises(ValueError, match="vocab_size"):
        medusa.generate(params, cfg, other, [1], 2, choices=[[0]])


def test_heads_forward_rejects_bad_input():
    heads = _random_heads(0, 2, 4, 5, tied=True)
    with pytest.raises(ValueError, match="lm_head: heads \\[0, 1\\] are tied"):
        medusa.heads_forward(np.zeros((1, 2, 4)), heads)
    with pytest.raises(ValueError, match="hidden: expected shape"):
        medusa.heads_forward(np.zeros((2, 4)), heads, np.zeros((5, 4)))
    with pytest.raises(ValueError, match="heads\\['medusa.0.w1'\\]: expected shape"):
        medusa.heads_forward(np.zeros((1, 2, 3)), heads, np.zeros((5, 3)))
    with pytest.raises(ValueError, match="missing"):
        medusa.heads_forward(np.zeros((1, 2, 4)), {"medusa.1.w1": heads["medusa.1.w1"]}, np.zeros((5, 4)))
    with pytest.raises(ValueError, match="weights"):
        cfg = gpt.GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4)
        p = gpt.init_params(cfg, dtype=np.float64)
        medusa.loss_and_grads(heads, p, cfg, np.zeros((1, 3), dtype=np.int64), np.zeros((1, 3), dtype=np.int64),
                              weights=[1.0])


# ---------------------------------------------------------------------------
# The command line: train medusa, then sample with the heads
# ---------------------------------------------------------------------------

def test_train_medusa_then_sample_with_the_heads(tmp_path):
    run = tmp_path / "base"
    env_cmd = [sys.executable, "-m", "minillm"]

    def cli(*argv):
        r = subprocess.run(env_cmd + list(argv), cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    cli("train", "--preset", "tiny", "--max-steps", "2", "--sample-tokens", "0", "--out", str(run))
    out = cli("train", "medusa", "--checkpoint", str(run), "--max-steps", "2", "--heads", "2",
              "--eval-interval", "1", "--sample-tokens", "8")
    assert "Medusa head 1 (token t+3): top-1" in out
    assert "the same tokens as plain greedy decoding: True" in out
    assert (run / "medusa" / "checkpoint.npz").is_file() and (run / "medusa" / "results.json").is_file()
    text = cli("sample", "--checkpoint", str(run), "--medusa", "--medusa-tree", "3", "--temperature", "0",
               "--max-new-tokens", "10", "--prompt", "ab")
    plain = cli("sample", "--checkpoint", str(run), "--temperature", "0", "--max-new-tokens", "10",
                "--prompt", "ab")
    assert "mean accepted length" in text
    sample = lambda s: s.split("-" * 60)[1]   # noqa: E731 (the text between the rules)
    assert sample(text) == sample(plain)
    r = subprocess.run(env_cmd + ["sample", "--checkpoint", str(run / "medusa"), "--medusa"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "error" in r.stderr


def test_gpt_backward_through_a_tree_mask_matches_finite_differences():
    """The tree path's forward (depth positions, the tree as an attention mask) trains too."""
    for pos in ("learned", "rope"):
        cfg = gpt.GPTConfig(vocab_size=7, block_size=8, n_layer=1, n_head=2, n_embd=8, n_kv_head=1, pos=pos)
        params = gpt.init_params(cfg, seed=1, dtype=np.float64)
        mask = medusa.tree_buffers([[0], [1], [0, 0], [1, 0]]).attn_mask
        idx = np.array([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]])
        dlogits = randn(2, 2, 5, 7)
        _, cache = gpt.forward(params, cfg, idx, tree_mask=mask)
        grads = gpt.backward(dlogits, cache)
        report = check_dict_gradients(
            lambda p: (gpt.forward(p, cfg, idx, tree_mask=mask)[0] * dlogits).reshape(-1), params, grads,
            max_checks_per_param=6)
        assert_gradcheck(report)
