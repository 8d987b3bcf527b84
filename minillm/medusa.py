"""Medusa: extra decoding heads that guess several tokens ahead, a tree of their guesses
that the base model checks in one forward pass, and the rules that accept a prefix of it
(Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with Multiple
Decoding Heads"; the layout of the tree buffers is FasterDecoding/Medusa's).

Heads. A GPT's final hidden state h_t (gpt's ``cache.xf``, (B, T, C): the final norm's
output) feeds the LM head, which predicts token t+1. Medusa puts K more heads on the same
h_t; head k (k = 0 .. K-1) predicts token t+k+2:

    r_k = h + SiLU(h W1_k + b1_k)             a residual block, W1_k (C, C), b1_k (C,)
    logits_k = r_k W_k^T                      its own vocabulary projection W_k (V, C)

W1_k and b1_k start at zero, so r_k = h, and W_k starts as a copy of the base's LM head (or
is tied to it): a new head guesses what the base guesses for t+1, a fair first guess for
t+k+2 and a starting point that training moves from. Backward, with s = sigmoid(z),
z = h W1_k + b1_k and dlogits_k the upstream gradient:

    dr = dlogits_k W_k,  dW_k = dlogits_k^T r_k,  dz = dr * s (1 + z (1 - s)),
    dW1_k = h^T dz,  db1_k = sum(dz),  dh = sum_k (dr + dz W1_k^T)

Training with the base frozen (Medusa-1): the base runs forward only, and

    loss = sum_k w_k CE(logits_k[:, t], x[t + k + 2])      w_k = 0.8^k (the paper's choice)

Decoding, one step (the base model has the prefix in its KV cache, and its own next token,
the root, is known from the previous step):

    1. candidates: the top-``topk`` tokens of each head at the last position. A tree of
       ``choices`` says which combinations to try: the choice [0, 1] is "head 0's best, then
       head 1's second best". With the root there are N = len(choices) + 1 nodes.
    2. verify: ONE forward pass of the N tree tokens after the cached prefix, with a tree
       attention mask (each node sees the cache, itself and its ancestors) and positions
       prefix + depth. The logits at node n are then exactly the base's prediction after
       n's root path, as if that path alone had been decoded.
    3. accept: greedy (temperature 0): a node's token is accepted if it is the base's
       argmax at its parent; the longest accepted root path wins, so the output is the
       base's greedy output, token for token. Typical acceptance (temperature T > 0): a
       token x is accepted if p(x) > min(posterior_threshold, posterior_alpha exp(-H(p))),
       with p the base's distribution at the parent (at temperature T) and H its entropy:
       a confident base (low H) demands a likely token, an unsure one accepts more.
    4. keep the accepted path's keys and values in the cache (attention.KVCache.keep),
       emit the root and the accepted tokens; the base's logits at the path's last node
       give the next root, and the heads there the next candidates.

Each step costs one base forward pass of N tokens and emits 1 + (accepted) tokens; on
hardware where a pass of N tokens costs about as much as one of 1 token, that is the speedup.

Reading order: the heads (forward, backward, the frozen-base loss, per-head accuracy),
the tree buffers, the acceptance rules, generation, and last the argument checks.

This file builds on the GPT (its forward with a tree mask), so it imports minillm.gpt;
gpt.py never imports it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from . import gpt
from .attention import KVCache
from .backend import (DEFAULT_DTYPE, array_module, check_float, check_int, check_int_arg, check_number,
                      check_shape, is_int, make_rng, to_device, to_numpy)
from .backprop import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from .ffn import linear_backward, linear_forward, silu_backward, silu_forward

__all__ = ["init_heads", "n_heads", "base_lm_head", "heads_forward", "heads_backward", "head_targets",
           "loss_and_grads", "head_accuracy", "MedusaBuffers", "tree_buffers", "MC_SIM_7B_63", "mc_sim_tree",
           "greedy_accept", "typical_accept", "typical_threshold", "MedusaStats", "generate"]

IGNORE = -100     # a target that does not count (past the end of the window)


# ---------------------------------------------------------------------------
# 1. The heads
# ---------------------------------------------------------------------------

def init_heads(config, n_heads=4, seed=0, lm_head=None, tied=False, dtype=DEFAULT_DTYPE, device=None):
    """K = n_heads Medusa heads for a GPT of ``config``, as a flat dict:

        medusa.{k}.w1 (C, C) = 0,  medusa.{k}.b1 (C,) = 0,  medusa.{k}.lm_head (V, C)

    lm_head (V, C): the base's LM head, copied into every head's projection (then each new
    head predicts what the base predicts); without it the projections are drawn
    N(0, 0.02^2) from ``seed``. tied=True: no projections of their own; the heads use the
    base's LM head, passed to heads_forward (and they get no gradient for it).
    """
    V, C = _check_init_heads(config, n_heads, lm_head, tied)
    rng = make_rng(seed)
    heads = {}
    for k in range(n_heads):
        heads[f"medusa.{k}.w1"] = np.zeros((C, C), dtype=dtype)
        heads[f"medusa.{k}.b1"] = np.zeros((C,), dtype=dtype)
        if tied:
            continue
        if lm_head is not None:
            heads[f"medusa.{k}.lm_head"] = to_numpy(lm_head).astype(dtype)      # a copy
        else:
            heads[f"medusa.{k}.lm_head"] = (rng.standard_normal((V, C)) * 0.02).astype(dtype)
    return to_device(heads, device)


def n_heads(heads) -> int:
    """K, the number of heads in a heads dict."""
    return sum(1 for name in heads if name.endswith(".w1"))


class HeadsCache(NamedTuple):
    hidden: object       # (B, T, C) the heads' input
    lin: list            # [LinearCache of z_k = h W1_k + b1_k] per head
    act: list            # [SiluCache of SiLU(z_k)] per head
    r: list              # [(B T, C) r_k = h + SiLU(z_k)] per head
    w_out: list          # [(V, C) the projection head k used]
    tied: list           # [bool: head k used the base's LM head]


def heads_forward(hidden, heads, lm_head=None):
    """logits_k = (h + SiLU(h W1_k + b1_k)) W_k^T for every head k.

    hidden: (B, T, C), the base's final hidden state; heads: init_heads' dict; lm_head
    (V, C): the projection of tied heads (those without medusa.{k}.lm_head).
    -> logits (K, B, T, V), cache

    Example: zero W1 and b1 make r_k = h, so every head returns the base's logits h W^T.
    """
    K, V = _check_heads_forward(hidden, heads, lm_head)
    B, T, C = hidden.shape
    xp = array_module(hidden)
    h = hidden.reshape(B * T, C)                                           # (B T, C)
    logits, lin, act, rs, w_outs, tied = [], [], [], [], [], []
    for k in range(K):
        z, lin_k = linear_forward(h, heads[f"medusa.{k}.w1"], heads[f"medusa.{k}.b1"])   # 1. z = h W1 + b1
        s, act_k = silu_forward(z)                                         # 2. s = SiLU(z)
        r = h + s                                                          # 3. r = h + s  (B T, C)
        w_out = heads.get(f"medusa.{k}.lm_head", lm_head)
        logits.append(r @ w_out.T)                                         # 4. logits_k = r W^T  (B T, V)
        lin.append(lin_k), act.append(act_k), rs.append(r), w_outs.append(w_out)
        tied.append(f"medusa.{k}.lm_head" not in heads)
    logits = xp.stack(logits).reshape(K, B, T, V)                          # (K, B, T, V)
    return logits, HeadsCache(hidden, lin, act, rs, w_outs, tied)


def heads_backward(dlogits, cache: HeadsCache, return_dhidden=False):
    """dL/dheads from dL/dlogits (K, B, T, V). -> grads, a dict keyed like the heads
    (a tied head has no projection of its own, so no gradient for it here);
    with return_dhidden=True -> (grads, dhidden (B, T, C)), the gradient into the base's
    hidden state (gpt.backward's dhidden, for training the base too: Medusa-2)."""
    _check_heads_backward(dlogits, cache)
    B, T, C = cache.hidden.shape
    K, V = dlogits.shape[0], dlogits.shape[-1]
    grads = {}
    dh = array_module(dlogits).zeros((B * T, C), dtype=dlogits.dtype)
    for k in range(K):
        dlogits_k = dlogits[k].reshape(B * T, V)                           # (B T, V)
        # forward step 4: logits_k = r W^T. So dr = dlogits W, dW = dlogits^T r
        dr = dlogits_k @ cache.w_out[k]                                    # (B T, C)
        if not cache.tied[k]:
            grads[f"medusa.{k}.lm_head"] = dlogits_k.T @ cache.r[k]        # (V, C)
        # forward step 3: r = h + s. A sum passes dr to both terms
        dh_residual, ds = dr, dr
        # forward step 2: s = SiLU(z)
        dz = silu_backward(ds, cache.act[k])
        # forward step 1: z = h W1 + b1
        dh_block, grads[f"medusa.{k}.w1"], grads[f"medusa.{k}.b1"] = linear_backward(dz, cache.lin[k])
        dh = dh + dh_residual + dh_block            # h fed every head: the gradients add
    grads = {name: grads[name] for name in _head_names(K, cache.tied)}
    return (grads, dh.reshape(B, T, C)) if return_dhidden else grads


def _head_names(K, tied):
    names = []
    for k in range(K):
        names += [f"medusa.{k}.w1", f"medusa.{k}.b1"] + ([] if tied[k] else [f"medusa.{k}.lm_head"])
    return names


def base_lm_head(params, config):
    """The base's LM head (V, C): wte when tied, else lm_head."""
    return params["wte"] if config.tie_embeddings else params["lm_head"]


def head_targets(targets, n_heads):
    """Each head's targets from the next-token targets of a window.

    targets: (B, T) int, targets[:, t] = x[t + 1]. Head k at position t predicts
    x[t + k + 2] = targets[:, t + k + 1]; the last k + 1 positions have none (IGNORE).
    -> (K, B, T) int
    Example: targets [[1, 2, 3, 4]], 2 heads -> [[[2, 3, 4, -100]], [[3, 4, -100, -100]]]
    """
    _check_head_targets(targets, n_heads)
    xp = array_module(targets)
    B, T = targets.shape
    out = xp.full((n_heads, B, T), IGNORE, dtype=targets.dtype)
    for k in range(n_heads):
        out[k, :, :max(T - k - 1, 0)] = targets[:, k + 1:]
    return out


def loss_and_grads(heads, params, config, idx, targets, weights=None):
    """Medusa-1's loss and its gradient for the heads, the base frozen.

    The base runs forward only (its hidden state, never its backward); head k's
    cross-entropy against x[t + k + 2] is weighted by w_k (default 0.8^k, the paper's).
    idx, targets: (B, T) int, a window and its next tokens (as for gpt.loss_and_grads).
    -> (loss: float, grads keyed like heads, per-head losses: list of K floats)
    """
    K, weights = _check_loss_and_grads(heads, params, config, idx, targets, weights)
    _, base = gpt.forward(params, config, idx)
    logits, cache = heads_forward(base.xf, heads, base_lm_head(params, config))   # (K, B, T, V)
    per_target = head_targets(targets, K)                                  # (K, B, T)
    xp = array_module(logits)
    dlogits, losses = [], []
    for k in range(K):
        loss_k, ce = softmax_cross_entropy_forward(logits[k], per_target[k])
        dlogits.append(softmax_cross_entropy_backward(logits.dtype.type(weights[k]), ce))   # (B, T, V)
        losses.append(float(loss_k))
    total = sum(w * loss_k for w, loss_k in zip(weights, losses))          # sum_k w_k CE_k
    return total, heads_backward(xp.stack(dlogits), cache), losses


def head_accuracy(heads, params, config, idx, targets, ks=(1, 5)):
    """Top-k accuracy of the base's LM head (next token) and of each Medusa head (token
    t + k + 2) on one batch: a target counts as found if fewer than k logits beat it.
    -> (base (len(ks),), heads (K, len(ks))) as NumPy float arrays
    """
    K, ks = _check_head_accuracy(heads, params, config, idx, targets, ks)
    base_logits, base = gpt.forward(params, config, idx)
    logits, _ = heads_forward(base.xf, heads, base_lm_head(params, config))
    per_target = head_targets(targets, K)
    base_acc = _topk_hits(to_numpy(base_logits), to_numpy(targets), ks)
    head_acc = np.stack([_topk_hits(to_numpy(logits[k]), to_numpy(per_target[k]), ks) for k in range(K)])
    return base_acc, head_acc


def _topk_hits(logits, targets, ks):
    """Share of counted targets within the top k of their logits, for each k."""
    counted = targets != IGNORE
    lg, t = logits[counted], targets[counted]                              # (n, V), (n,)
    rank = (lg > lg[np.arange(t.shape[0]), t][:, None]).sum(axis=1)      # logits above the target's
    return np.array([float(np.mean(rank < k)) if t.size else float("nan") for k in ks])


# ---------------------------------------------------------------------------
# 2. The tree of candidates, in Medusa's layout
# ---------------------------------------------------------------------------

class MedusaBuffers(NamedTuple):
    attn_mask: object          # (N, N) bool: node i may see node j (itself, the root, its ancestors)
    position_ids: object       # (N,) int: each node's depth (root 0)
    tree_indices: object       # (N,) int: index into [root, head 0's top-k, head 1's top-k, ...]
    retrieve_indices: object   # (L, max depth + 1) int: root-to-leaf paths as node indices, -1 padded


def tree_buffers(choices, topk=10):
    """Medusa's tree buffers for ``choices``, a list of paths of top-k indices.

    A path [i_0, .., i_{d-1}] is the node "head 0's i_0-th best, then .., head d-1's
    i_{d-1}-th best"; choices must be prefix-closed (every path's parents are in it). The
    nodes are the root (node 0) then the choices sorted by (length, values), so N =
    len(choices) + 1 and every node comes after its ancestors. A node at depth d whose
    last index is i reads candidate 1 + topk (d - 1) + i of the flat array
    [root, head 0's top-k, head 1's top-k, ...]. retrieve_indices has one row per leaf
    (a node that is no path's parent), deepest last-sorted first as Medusa orders them.

    Worked example, topk=10: choices [[1], [0], [0, 0]] sort to [0], [1], [0, 0]:

    >>> b = tree_buffers([[1], [0], [0, 0]])
    >>> b.attn_mask.astype(int).tolist()      # node 3 = [0, 0] sees the root, node 1 and itself
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]
    >>> b.position_ids.tolist(), b.tree_indices.tolist()
    ([0, 1, 1, 2], [0, 1, 2, 11])
    >>> b.retrieve_indices.tolist()           # the leaves [0, 0] and [1]
    [[0, 1, 3], [0, 2, -1]]
    """
    paths = _check_tree_buffers(choices, topk)
    nodes = [()] + sorted(paths, key=lambda p: (len(p), p))               # node 0: the root
    index = {p: n for n, p in enumerate(nodes)}
    N = len(nodes)
    attn_mask = np.zeros((N, N), dtype=bool)
    for n, p in enumerate(nodes):
        for d in range(len(p) + 1):
            attn_mask[n, index[p[:d]]] = True                             # the root, each ancestor, itself
    position_ids = np.array([len(p) for p in nodes], dtype=np.int64)
    tree_indices = np.array([0] + [1 + topk * (len(p) - 1) + p[-1] for p in nodes[1:]], dtype=np.int64)
    parents = {p[:-1] for p in nodes[1:]}
    leaves = [p for p in reversed(nodes) if p not in parents]             # deepest, last-sorted first
    width = max(len(p) for p in nodes) + 1
    retrieve = np.full((len(leaves), width), -1, dtype=np.int64)
    for row, leaf in enumerate(leaves):
        retrieve[row, :len(leaf) + 1] = [index[leaf[:d]] for d in range(len(leaf) + 1)]
    return MedusaBuffers(attn_mask, position_ids, tree_indices, retrieve)


# The sparse tree FasterDecoding/Medusa ships for Vicuna-7B (medusa_choices.py): 63 choices,
# 64 nodes, 4 deep, built greedily from measured head accuracies, so every prefix of the list
# is a tree too (MC_SIM_7B_63[:9] is a 10-node tree).
MC_SIM_7B_63 = [[0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0],
                [0, 5], [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0],
                [0, 9], [8], [9], [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5],
                [0, 0, 0, 0], [0, 1, 1], [0, 0, 6], [0, 3, 0], [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9],
                [6, 0], [0, 4, 0], [1, 4], [7, 0], [0, 1, 2], [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0],
                [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0], [0, 0, 0, 1], [1, 6], [0, 7, 0]]


def mc_sim_tree(n_nodes=64, n_heads=4):
    """The first ``n_nodes`` nodes (the root included) of MC_SIM_7B_63 among those no
    deeper than ``n_heads``: a tree, since the list was built node by node, parents first.
    -> choices (a list of paths)"""
    check_int_arg("n_nodes", n_nodes, lo=1)
    check_int_arg("n_heads", n_heads, lo=1)
    return [list(c) for c in MC_SIM_7B_63 if len(c) <= n_heads][:n_nodes - 1]


def _tree_tokens(root, head_logits, buffers: MedusaBuffers, topk):
    """The tree's tokens and its root-to-leaf candidate sequences.

    root: the base's token; head_logits (K, V) at the last position (host).
    -> tree tokens (N,), candidates (L, max depth + 1) (-1 where a path is padded)"""
    top = np.argsort(-head_logits, axis=-1, kind="stable")[:, :topk]    # (K, topk), best first
    flat = np.concatenate([[root], top.reshape(-1)])                      # (1 + K topk,)
    tokens = flat[buffers.tree_indices]                                   # (N,)
    ret = buffers.retrieve_indices
    return tokens, np.where(ret >= 0, tokens[np.maximum(ret, 0)], -1)     # (L, D + 1)


# ---------------------------------------------------------------------------
# 3. Acceptance: which candidate's prefix the base agrees with
# ---------------------------------------------------------------------------

def greedy_accept(candidates, logits):
    """The longest candidate prefix the base would have decoded greedily.

    candidates: (L, D + 1) int root-to-leaf token paths (-1 padding); logits: (L, D + 1, V),
    the base's logits at each path node (row j predicts the token at j + 1).
    Token j + 1 of a path is accepted if it is the argmax at node j and every earlier one was.
    -> (best row, accepted candidates beyond the root); ties go to the first row.

    Two paths from root token 0; the base's argmax after the root is 3, after [0, 3] it is 1:

    >>> logits = np.eye(4)[[[3, 0, 0], [3, 1, 0]]]      # (L=2, D+1=3, V=4): one-hot argmaxes
    >>> greedy_accept(np.array([[0, 1, 2], [0, 3, 1]]), logits)
    (1, 2)
    """
    _check_accept(candidates, logits)
    ok = candidates[:, 1:] == np.argmax(logits[:, :-1], axis=-1)         # (L, D)
    accepted = np.cumprod(ok, axis=1).sum(axis=1)                         # leading run per path
    best = int(np.argmax(accepted))
    return best, int(accepted[best])


def typical_threshold(probs, posterior_threshold=0.09, posterior_alpha=0.3):
    """min(posterior_threshold, posterior_alpha * exp(-H(p))) per row of probs (..., V),
    H the entropy in nats (0 log 0 = 0). -> (...)"""
    plogp = np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0)
    entropy = -plogp.sum(axis=-1)
    return np.minimum(posterior_threshold, posterior_alpha * np.exp(-entropy))


def typical_accept(candidates, logits, temperature, posterior_threshold=0.09, posterior_alpha=0.3):
    """Typical acceptance: token j + 1 of a path is accepted if its probability under
    p = softmax(logits at node j / temperature) exceeds typical_threshold(p), and every
    earlier one was. Of the longest accepted prefixes the likeliest (sum of log p) wins.
    candidates, logits: as greedy_accept. -> (best row, accepted candidates beyond the root)
    """
    _check_accept(candidates, logits)
    _check_sampling(temperature, posterior_threshold, posterior_alpha)
    p = _softmax(logits[:, :-1] / temperature)                           # (L, D, V)
    tok = np.maximum(candidates[:, 1:], 0)                               # (L, D); padding read as 0
    p_tok = np.take_along_axis(p, tok[..., None], axis=-1)[..., 0]      # (L, D)
    ok = (p_tok > typical_threshold(p, posterior_threshold, posterior_alpha)) & (candidates[:, 1:] >= 0)
    accepted = np.cumprod(ok, axis=1).sum(axis=1)                        # (L,)
    n = int(accepted.max())
    if n == 0:
        return 0, 0
    rows = np.flatnonzero(accepted == n)
    loglik = np.log(p_tok[rows, :n]).sum(axis=1)
    return int(rows[np.argmax(loglik)]), n


def _softmax(logits):
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _next_root(logits, temperature, posterior_threshold, posterior_alpha, rng):
    """The base's own next token at a node, from its logits (V,): the argmax at
    temperature 0, else a draw from p = softmax(logits / T) restricted to the typical set
    p >= typical_threshold(p) (which always holds the most likely token), as Medusa's
    typical sampling draws it; every emitted token then passed the same test."""
    if temperature == 0:
        return int(np.argmax(logits))
    p = _softmax(logits / temperature)
    p = np.where(p >= typical_threshold(p, posterior_threshold, posterior_alpha), p, 0.0)
    cdf = np.cumsum(p)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), np.flatnonzero(p)[-1]))


# ---------------------------------------------------------------------------
# 4. Generation
# ---------------------------------------------------------------------------

class MedusaStats(NamedTuple):
    new_tokens: int                # tokens generated
    accepted_lengths: tuple        # tokens emitted by each tree pass: the root + the accepted candidates
    base_calls: int                # base forward passes: the prompt, the tree passes, plain steps past the context
    tree_nodes: int                # N, the nodes of the full tree
    mean_accepted_length: float    # mean of accepted_lengths (1.0: no candidate ever accepted)
    tokens_per_call: float         # new_tokens / base_calls


def generate(params, config, heads, prompt_ids, max_new_tokens, choices=None, temperature=0.0,
             posterior_threshold=0.09, posterior_alpha=0.3, seed=None, topk=10):
    """Medusa decoding of one prompt: the heads propose a tree of continuations, the base
    verifies all of it in one forward pass and keeps the longest prefix it accepts.

    choices: the tree (tree_buffers' format; default MC_SIM_7B_63, which needs 4 heads);
    [] is a tree of the root alone (plain decoding through the tree path). temperature 0:
    greedy acceptance, and the ids equal gpt.generate(..., temperature=0)'s; T > 0:
    typical acceptance (posterior_threshold, posterior_alpha) with draws from ``seed``.
    Only the tree's deepest path must fit the context; near the end of block_size the
    tree is cut to the depth that fits, and past it decoding goes on one plain step at a
    time over the last block_size tokens, as gpt.generate's sliding window does (greedy, or
    plain sampling at temperature T).
    -> (ids: the prompt then max_new_tokens new tokens, MedusaStats)
    """
    prompt, paths, rng = _check_generate(params, config, heads, prompt_ids, max_new_tokens, choices,
                                         temperature, posterior_threshold, posterior_alpha, seed, topk)
    rule = (float(temperature), float(posterior_threshold), float(posterior_alpha), rng)
    full = _cut_tree(paths, None, topk)
    seq, new, lengths = list(prompt), [], []
    cache = KVCache(config.n_layer, 1, config.kv_heads, min(config.block_size, len(prompt) + max_new_tokens)
                    + full.attn_mask.shape[0], config.head_dim, dtype=params["wte"].dtype,
                    xp=array_module(params["wte"]))
    # 1. The prompt: its keys and values go to the cache; the base's token is the first root.
    root, head_logits = _prefill(params, config, heads, prompt, cache, rule)
    calls = 1
    while len(new) < max_new_tokens:
        depth = min(max_new_tokens - len(new), config.block_size - len(seq)) - 1   # what fits and is needed
        if depth < 1:
            break
        # 2.-4. One tree pass: candidates, verification, acceptance, the cache kept.
        emitted, root, head_logits = _tree_step(params, config, heads, cache, root, head_logits,
                                                _cut_tree(paths, depth, topk), topk, rule)
        seq += emitted
        new += emitted
        lengths.append(len(emitted))
        calls += 1
    new, calls = _finish(params, config, seq, new, root, max_new_tokens, rng, temperature, calls)
    n_new = len(new)
    return list(prompt) + new, MedusaStats(n_new, tuple(lengths), calls, int(full.attn_mask.shape[0]),
                                           float(np.mean(lengths)) if lengths else float("nan"),
                                           n_new / calls)


@functools.lru_cache(maxsize=64)
def _cut_tree(paths, depth, topk):
    """tree_buffers of the paths (a tuple of tuples) no deeper than depth (None: all), made
    once per tree: generation asks for the same few at every step. Callers must not
    change the arrays."""
    return tree_buffers([p for p in paths if depth is None or len(p) <= depth], topk)


def _prefill(params, config, heads, prompt, cache, rule):
    """Run the prompt into the cache. -> (the first root token, the heads' logits (K, V))"""
    xp = array_module(params["wte"])
    logits, base = gpt.forward(params, config, xp.asarray([prompt], dtype=np.int64), kv_cache=cache)
    return _next_root(to_numpy(logits[0, -1]), *rule), _head_logits(heads, params, config, base.xf[:, -1:])


def _tree_step(params, config, heads, cache, root, head_logits, buffers, topk, rule):
    """One Medusa step: build the tree, verify it in one pass, accept, keep the path.
    -> (emitted tokens: the root and the accepted candidates, the next root, its heads' logits)"""
    temperature, threshold, alpha, rng = rule
    xp = array_module(params["wte"])
    offset = cache.length(0)
    tokens, candidates = _tree_tokens(root, head_logits, buffers, topk)   # (N,), (L, D + 1)
    N = tokens.shape[0]                          # the root alone needs no tree mask (nor heads)
    tree_mask = xp.asarray(buffers.attn_mask) if N > 1 else None
    logits, base = gpt.forward(params, config, xp.asarray(tokens[None]), kv_cache=cache,
                               tree_mask=tree_mask)                        # (1, N, V): one pass
    node_logits = to_numpy(logits[0])                                     # (N, V)
    ret = buffers.retrieve_indices
    path_logits = node_logits[np.maximum(ret, 0)]                         # (L, D + 1, V)
    if temperature == 0:
        best, n = greedy_accept(candidates, path_logits)
    else:
        best, n = typical_accept(candidates, path_logits, temperature, threshold, alpha)
    path = ret[best, :n + 1]                                              # node indices, root first
    cache.keep(offset, path)                     # the accepted path's keys and values stay, in order
    last = int(path[-1])
    next_root = _next_root(node_logits[last], temperature, threshold, alpha, rng)
    next_head = _head_logits(heads, params, config, base.xf[:, last:last + 1]) if N > 1 else head_logits
    return [int(t) for t in candidates[best, :n + 1]], next_root, next_head


def _head_logits(heads, params, config, hidden):
    """The heads' logits at one position: hidden (1, 1, C) -> (K, V) on the host."""
    logits, _ = heads_forward(hidden, heads, base_lm_head(params, config))    # (K, 1, 1, V)
    return to_numpy(logits[:, 0, 0])


def _finish(params, config, seq, new, root, max_new_tokens, rng, temperature, calls):
    """The tokens the tree passes left: the pending root (known, no pass needed), then, past
    the context, plain steps over the last block_size tokens. -> (new tokens, base calls)"""
    if len(new) >= max_new_tokens:
        return new[:max_new_tokens], calls
    new = new + [root]
    rest = max_new_tokens - len(new)
    if rest > 0:
        window = (seq + [root])[-config.block_size:]
        more = gpt.generate(params, config, window, rest, temperature=temperature, rng=rng)[len(window):]
        new, calls = new + more, calls + rest
    return new, calls


# ---------------------------------------------------------------------------
# 5. Argument checks (one _check_<op> per public function)
# ---------------------------------------------------------------------------

def _check_gpt_config(config):
    if not isinstance(config, gpt.GPTConfig):
        raise TypeError(f"config: expected a gpt.GPTConfig, got {type(config).__name__}")


def _check_init_heads(config, n, lm_head, tied):
    _check_gpt_config(config)
    check_int_arg("n_heads", n, lo=1)
    V, C = config.vocab_size, config.n_embd
    if lm_head is not None:
        check_float("lm_head", lm_head)
        check_shape("lm_head", lm_head, (V, C))
        if tied:
            raise ValueError("lm_head: tied heads use the base's LM head at heads_forward time; "
                             "pass lm_head (to copy) or tied=True, not both")
    return V, C


def _check_heads(heads, C, dtype):
    """-> K, V (None when every head is tied)."""
    if not isinstance(heads, dict) or not heads:
        raise TypeError(f"heads: expected init_heads' dict of arrays, got {type(heads).__name__}")
    K = n_heads(heads)
    expected = set()
    for k in range(K):
        expected |= {f"medusa.{k}.w1", f"medusa.{k}.b1"}
    extra = sorted(set(heads) - expected - {f"medusa.{k}.lm_head" for k in range(K)})
    missing = sorted(expected - set(heads))
    if K == 0 or extra or missing:
        raise ValueError(f"heads: expected medusa.{{k}}.w1/.b1[/.lm_head] for k = 0 .. K-1, "
                         f"missing {missing[:4]}, unexpected {extra[:4]}")
    V = None
    for name, a in heads.items():
        check_float(f"heads[{name!r}]", a)
        if a.dtype != dtype:
            raise TypeError(f"heads[{name!r}]: expected dtype {dtype} (that of the hidden state), got {a.dtype}")
        shape = {"w1": (C, C), "b1": (C,), "lm_head": (V, C)}[name.rsplit(".", 1)[1]]
        check_shape(f"heads[{name!r}]", a, shape)
        if name.endswith(".lm_head"):
            V = a.shape[0]
    return K, V


def _check_heads_forward(hidden, heads, lm_head):
    check_float("hidden", hidden)
    if hidden.ndim != 3:
        raise ValueError(f"hidden: expected shape (B, T, C), got {tuple(hidden.shape)}")
    C = hidden.shape[2]
    K, V = _check_heads(heads, C, hidden.dtype)
    tied = [k for k in range(K) if f"medusa.{k}.lm_head" not in heads]
    if tied and lm_head is None:
        raise ValueError(f"lm_head: heads {tied} are tied to the base's LM head; pass it (V, C)")
    if lm_head is not None:
        check_float("lm_head", lm_head)
        check_shape("lm_head", lm_head, (lm_head.shape[0] if V is None else V, C))
        V = lm_head.shape[0]
    return K, V


def _check_heads_backward(dlogits, cache):
    B, T, C = cache.hidden.shape
    check_float("dlogits", dlogits)
    check_shape("dlogits", dlogits, (len(cache.lin), B, T, cache.w_out[0].shape[0]))


def _check_head_targets(targets, n):
    check_int("targets", targets)
    if targets.ndim != 2:
        raise ValueError(f"targets: expected shape (B, T), got {tuple(targets.shape)}")
    check_int_arg("n_heads", n, lo=1)


def _check_loss_and_grads(heads, params, config, idx, targets, weights):
    """-> K, the weights as a list of K floats"""
    _check_gpt_config(config)
    gpt._check_inputs(params, config, idx)
    K, _ = _check_heads(heads, config.n_embd, params["wte"].dtype)
    _check_head_targets(targets, K)
    if tuple(targets.shape) != tuple(idx.shape):
        raise ValueError(f"targets: expected shape {tuple(idx.shape)} (that of idx), got {tuple(targets.shape)}")
    if weights is None:
        return K, [0.8 ** k for k in range(K)]
    if not isinstance(weights, (list, tuple)) or len(weights) != K:
        raise ValueError(f"weights: expected {K} numbers (one per head), got {weights!r}")
    return K, [check_number(f"weights[{k}]", w, lo=0) for k, w in enumerate(weights)]


def _check_head_accuracy(heads, params, config, idx, targets, ks):
    K, _ = _check_loss_and_grads(heads, params, config, idx, targets, None)
    if not isinstance(ks, (list, tuple)) or not ks:
        raise ValueError(f"ks: expected a list of positive ints, got {ks!r}")
    return K, [check_int_arg(f"ks[{i}]", k, lo=1) for i, k in enumerate(ks)]


def _check_tree_buffers(choices, topk):
    """-> the choices as a list of tuples; every one a path of ints in [0, topk), no
    duplicates, and prefix-closed."""
    check_int_arg("topk", topk, lo=1)
    if not isinstance(choices, (list, tuple)):
        raise TypeError(f"choices: expected a list of paths (lists of top-k indices), got "
                        f"{type(choices).__name__}")
    paths = []
    for c in choices:
        if not isinstance(c, (list, tuple)) or not c or not all(is_int(i) for i in c):
            raise ValueError(f"choices: expected each path to be a non-empty list of ints, got {c!r}")
        if any(not 0 <= i < topk for i in c):
            raise ValueError(f"choices: path {list(c)} has an index outside [0, topk={topk}): a head "
                             f"offers only its top {topk} tokens")
        paths.append(tuple(int(i) for i in c))
    seen = set(paths)
    if len(seen) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise ValueError(f"choices: path {list(dup)} appears more than once")
    for p in paths:
        if len(p) > 1 and p[:-1] not in seen:
            raise ValueError(f"choices: not a prefix-closed tree: {list(p)} is there but its parent "
                             f"{list(p[:-1])} is not")
    return paths


def _check_accept(candidates, logits):
    check_int("candidates", candidates)
    check_float("logits", logits)
    if candidates.ndim != 2 or candidates.shape[1] < 1:
        raise ValueError(f"candidates: expected shape (L, D + 1), got {tuple(candidates.shape)}")
    if logits.ndim != 3 or tuple(logits.shape[:2]) != tuple(candidates.shape):
        raise ValueError(f"logits: expected shape (L, D + 1, V) = {tuple(candidates.shape) + ('V',)}, "
                         f"got {tuple(logits.shape)}")


def _check_sampling(temperature, posterior_threshold, posterior_alpha, allow_zero=False):
    check_number("temperature", temperature, lo=0, lo_open=not allow_zero)
    check_number("posterior_threshold", posterior_threshold, lo=0, hi=1)
    check_number("posterior_alpha", posterior_alpha, lo=0, hi=1)


def _check_generate(params, config, heads, prompt_ids, max_new_tokens, choices, temperature,
                    posterior_threshold, posterior_alpha, seed, topk):
    """-> (the prompt as a list of ints, the tree's paths, the Generator)"""
    _check_gpt_config(config)
    gpt._check_params(params, config)
    K, V = _check_heads(heads, config.n_embd, params["wte"].dtype)
    if V is not None and V != config.vocab_size:
        raise ValueError(f"heads: their projections have {V} rows, the base's vocab_size is {config.vocab_size}")
    prompt = _check_prompt(prompt_ids, config)
    check_int_arg("max_new_tokens", max_new_tokens, lo=0)
    _check_sampling(temperature, posterior_threshold, posterior_alpha, allow_zero=True)
    check_int_arg("topk", topk, lo=1, hi=config.vocab_size + 1)
    paths = _check_tree_buffers(MC_SIM_7B_63 if choices is None else choices, topk)
    depth = max((len(p) for p in paths), default=0)
    if depth > K:
        raise ValueError(f"choices: the tree is {depth} deep but there are only {K} heads (a node at depth "
                         f"d uses head d - 1's guesses); use a shallower tree or more heads")
    if depth + 1 > config.block_size:
        raise ValueError(f"choices: the tree's deepest path needs {depth + 1} positions (the root and "
                         f"{depth} guesses), more than the context (block_size={config.block_size})")
    if seed is not None:
        check_int_arg("seed", seed, lo=0)
    return prompt, tuple(paths), make_rng(seed)


def _check_prompt(prompt_ids, config):
    if hasattr(prompt_ids, "tolist") and not isinstance(prompt_ids, list):
        prompt_ids = to_numpy(prompt_ids).tolist()
    if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids or isinstance(prompt_ids[0], (list, tuple)):
        raise ValueError(f"prompt_ids: expected one non-empty list of token ids, got {prompt_ids!r}")
    for t in prompt_ids:
        if not is_int(t) or not 0 <= t < config.vocab_size:
            raise ValueError(f"prompt_ids: expected ids in [0, {config.vocab_size}), got {t!r}")
    if len(prompt_ids) > config.block_size:
        raise ValueError(f"prompt_ids: {len(prompt_ids)} tokens, longer than the model's context "
                         f"(block_size={config.block_size}); keep the last {config.block_size}")
    return [int(t) for t in prompt_ids]
