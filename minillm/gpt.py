"""A decoder-only transformer (GPT), composed from the concept files, with its whole
backward pass written out by hand.

The forward pass, for token ids idx of shape (B, T), in the numbered steps of
:func:`forward`:

    1. x = wte[idx] + wpe[0..T-1]          token + learned position embeddings   (B, T, C)
    2. x = dropout(x)                      (training only)
    3. n_layer times, x = block(x):        pre-norm, the steps of _block_forward
           1. h1 = norm_1(x)   2. a = attn(h1)  3. a_drop = dropout(a)   4. x1 = x + a_drop
           5. h2 = norm_2(x1)  6. m = mlp(h2)   7. m_drop = dropout(m)   8. y = x1 + m_drop
       attn is causal self-attention, mlp a GELU MLP or SwiGLU
    4. xf = norm_f(x)
    5. logits = xf @ wte^T                 the LM head, tied to the token embedding   (B, T, V)

With ``tree_mask`` (tree attention: Medusa's verification pass, minillm.medusa) the T
tokens are a tree of candidates after the cached prefix: step 1's positions are the
prefix length + each token's depth, and attention lets a token see the cache, itself
and its ancestors, so each token's logits are those of its own root path.

Variants chosen by :class:`GPTConfig`: LayerNorm or RMSNorm, learned positions or
RoPE (rotary, inside attention), a GELU MLP or SwiGLU, multi-head or grouped-query
attention (n_kv_head < n_head), biases or none, a tied or separate LM head. With
the defaults this is GPT-2, and :mod:`minillm.checkpoint` loads GPT-2 weights.

The backward pass (:func:`backward`, :func:`_block_backward`) is the forward read from
the bottom up, as in llm.c's gpt2_backward: each step is labelled with the forward step it
undoes ("forward step 4: x1 = x + a_drop"), every ``*_forward`` has its ``*_backward``, each
returning its gradients, and each residual sum sends its gradient down both paths.

Activation checkpointing (``activation_checkpointing=True`` in :func:`forward` and
:func:`loss_and_grads`): the forward keeps only each block's input x (B, T, C) and a copy
of the dropout generator as the block found it, and drops the block's cache; the
backward, reaching block i, runs block i's forward again from that input (the same
dropout masks, redrawn from the copy) and then its backward. Memory for activations
falls from n_layer blocks' caches to n_layer inputs plus one block's cache, for one more
forward pass of the blocks; the gradients are the same numbers, bit for bit.

Shards (:func:`loss_and_grads_in_shards`, which :func:`loss_and_grads` takes on a CPU
with several threads): rows of a batch meet only in the loss's mean, so the batch is cut
into one shard of rows per thread, each thread runs the forward and backward above on
its shard with its matmuls on one BLAS thread, and the shards' gradients, weighted by
their shares of the counted targets, add up to the batch's. No thread waits for another
until the sum, where splitting every matmul and every pass across the threads makes them
meet hundreds of times a step (measured side by side on 2 cores, a 4 x 192 GPT's step on
16 x 128 tokens: 333-377 ms with the batch whole, 296-320 ms in two shards).

Parameters are a flat dict with dotted names (GPT-2's, shortened)::

    wte (V, C)  wpe (block_size, C)  [lm_head (V, C) when untied]
    h.{i}.ln_1.weight/.bias  h.{i}.attn.w_qkv (C, (H + 2 Hkv) D)  h.{i}.attn.b_qkv
    h.{i}.attn.w_o (H D, C)  h.{i}.attn.b_o  h.{i}.ln_2.weight/.bias
    h.{i}.mlp.w1 (C, 4C) .b1 .w2 (4C, C) .b2     or  h.{i}.mlp.w_gate/.w_up/.w_down (SwiGLU)
    ln_f.weight/.bias

Weights are stored (in, out) so a linear layer is ``x @ w``: the layout of GPT-2's
Conv1D, so GPT-2 checkpoints load without transposes.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .attention import KVCache, self_attention_backward, self_attention_forward
from .backend import (DEFAULT_DTYPE, array_module, batch_shards, check_array, check_choice, check_float,
                      check_int, check_int_arg, check_ndim, check_number, check_positive, check_probability,
                      check_same_device, check_shape, make_rng, randn, run_in_shards, shard_bounds,
                      to_device, to_numpy)
from .backprop import (dropout_backward, dropout_forward, softmax_cross_entropy_backward,
                       softmax_cross_entropy_forward)
from .embeddings import embedding_backward, embedding_forward
from .ffn import mlp_backward, mlp_forward, swiglu_backward, swiglu_forward
from .norm import layernorm_backward_fast, layernorm_forward_fast, rmsnorm_backward, rmsnorm_forward
from .sampling import generate as _sampling_generate

__all__ = ["GPTConfig", "param_shapes", "init_params", "num_params", "forward", "backward",
           "loss_and_grads", "loss", "GPTDecoder", "generate"]


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

_CHOICES = {"norm": ("layernorm", "rmsnorm"), "pos": ("learned", "rope"), "mlp": ("gelu", "swiglu")}


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT.

    vocab_size V, block_size (the longest context: rows of wpe), n_layer, n_head H,
    n_embd C (a multiple of H; head size head_dim D = C / H), n_kv_head Hkv (None = H:
    multi-head; 1 = multi-query; else grouped-query, a divisor of H), dropout
    (embeddings, attention probabilities and both residual branches, training only),
    bias (in the linear layers and LayerNorms), norm "layernorm" | "rmsnorm", pos
    "learned" | "rope", mlp "gelu" (tanh GELU, 4C wide) | "swiglu", tie_embeddings (the
    LM head reuses wte).
    Extras: norm_eps (None: 1e-5 for LayerNorm, 1e-6 for RMSNorm; resolved in ``eps``),
    mlp_hidden (None: 4C for GELU, 8C/3 rounded up to a multiple of 8 for SwiGLU, which
    keeps the parameter count of a 4C GELU MLP; resolved in ``mlp_width``), rope_base.
    BertConfig spells the ideas it shares with this one the same way.
    """
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    n_kv_head: int | None = None
    dropout: float = 0.0
    bias: bool = True
    norm: str = "layernorm"
    pos: str = "learned"
    mlp: str = "gelu"
    tie_embeddings: bool = True
    norm_eps: float | None = None
    mlp_hidden: int | None = None
    rope_base: float = 10000.0

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            check_int_arg(name, getattr(self, name), lo=1)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head: expected a divisor of n_embd={self.n_embd}, got {self.n_head}")
        check_int_arg("n_kv_head", self.n_kv_head, lo=1, optional=True)
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head: expected a divisor of n_head={self.n_head}, got {self.n_kv_head}")
        check_probability("dropout", self.dropout)
        for name, options in _CHOICES.items():
            check_choice(name, getattr(self, name), options)
        if self.norm_eps is not None:
            check_positive("norm_eps", self.norm_eps)
        check_int_arg("mlp_hidden", self.mlp_hidden, lo=1, optional=True)
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"n_embd: RoPE rotates pairs of features, so the head size n_embd / n_head "
                             f"must be even, got {self.head_dim}")
        check_number("rope_base", self.rope_base, lo=1, lo_open=True)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def mlp_width(self) -> int:
        """Width of the MLP's hidden layer: mlp_hidden, or the default for the MLP kind."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return 8 * ((8 * self.n_embd // 3 + 7) // 8)

    @property
    def eps(self) -> float:
        """The norms' epsilon: norm_eps, or the default for the norm kind."""
        if self.norm_eps is not None:
            return float(self.norm_eps)
        return 1e-5 if self.norm == "layernorm" else 1e-6

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown GPTConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)


def _check_config(config):
    if not isinstance(config, GPTConfig):
        raise TypeError(f"config: expected a GPTConfig, got {type(config).__name__}")


# ---------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------

def param_shapes(config: GPTConfig) -> dict:
    """{name: shape} for every parameter, in a fixed order (the order init draws them)."""
    _check_config(config)
    return dict(_param_shapes(config))


@functools.lru_cache(maxsize=32)
def _param_shapes(config: GPTConfig) -> dict:
    # Cached per config (frozen, so hashable): forward checks the params against it on
    # every call. Callers must not change the dict; param_shapes hands out copies.
    C, V, H, Hkv, D, F = (config.n_embd, config.vocab_size, config.n_head, config.kv_heads,
                          config.head_dim, config.mlp_width)
    shapes = {"wte": (V, C)}
    if config.pos == "learned":
        shapes["wpe"] = (config.block_size, C)
    ln_bias = config.bias and config.norm == "layernorm"
    for layer in range(config.n_layer):
        prefix = f"h.{layer}."
        block = {"ln_1.weight": (C,), "ln_1.bias": (C,) if ln_bias else None,
                 "attn.w_qkv": (C, (H + 2 * Hkv) * D), "attn.b_qkv": ((H + 2 * Hkv) * D,) if config.bias else None,
                 "attn.w_o": (H * D, C), "attn.b_o": (C,) if config.bias else None,
                 "ln_2.weight": (C,), "ln_2.bias": (C,) if ln_bias else None}
        if config.mlp == "gelu":
            block.update({"mlp.w1": (C, F), "mlp.b1": (F,) if config.bias else None,
                          "mlp.w2": (F, C), "mlp.b2": (C,) if config.bias else None})
        else:
            block.update({"mlp.w_gate": (C, F), "mlp.w_up": (C, F), "mlp.w_down": (F, C)})
        shapes.update({prefix + name: shape for name, shape in block.items() if shape is not None})
    shapes["ln_f.weight"] = (C,)
    if ln_bias:
        shapes["ln_f.bias"] = (C,)
    if not config.tie_embeddings:
        shapes["lm_head"] = (V, C)
    return shapes


_RESIDUAL_PROJECTIONS = ("attn.w_o", "mlp.w2", "mlp.w_down")


def init_params(config: GPTConfig, seed=0, dtype=DEFAULT_DTYPE, device=None) -> dict:
    """GPT-2's initialisation: weights and embeddings ~ N(0, 0.02^2), biases 0, norm gains 1,
    and the projections that write into the residual stream (attn.w_o, mlp.w2 / w_down)
    ~ N(0, (0.02 / sqrt(2 n_layer))^2), so the stream's variance does not grow with depth
    (each block adds two such terms).

    Drawn on the CPU from ``seed`` (same numbers on any device), then moved to ``device``.
    """
    rng = make_rng(seed)
    std_resid = 0.02 / math.sqrt(2 * config.n_layer)
    params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith(".weight") and len(shape) == 1:          # norm gains
            params[name] = np.ones(shape, dtype=dtype)
        elif len(shape) == 1:                                     # biases
            params[name] = np.zeros(shape, dtype=dtype)
        else:
            std = std_resid if name.endswith(_RESIDUAL_PROJECTIONS) else 0.02
            params[name] = randn(rng, shape, std=std, dtype=dtype, device="cpu")
    return to_device(params, device)


def num_params(params: dict) -> int:
    """Total number of parameters (a tied head counts once: it is one array)."""
    return int(sum(int(np.prod(p.shape)) for p in params.values()))


def _check_params(params, config):
    """params has exactly the names of param_shapes(config), each an array of that shape,
    all of wte's floating dtype. A few attribute reads per parameter, no pass over values."""
    if not isinstance(params, dict):
        raise TypeError(f"params: expected a dict of arrays, got {type(params).__name__}")
    shapes = _param_shapes(config)
    if params.keys() != shapes.keys():
        missing = [k for k in shapes if k not in params]
        extra = [k for k in params if k not in shapes]
        raise ValueError(f"params: do not match the config: missing {missing[:6]}"
                         f"{' ...' if len(missing) > 6 else ''}, unexpected {extra[:6]}"
                         f"{' ...' if len(extra) > 6 else ''}")
    check_float("params['wte']", params["wte"])
    dtype = params["wte"].dtype
    for name, shape in shapes.items():
        a = params[name]
        if not (isinstance(a, np.ndarray) and a.shape == shape and a.dtype == dtype):
            _check_param(name, a, shape, dtype)     # the slow path names what is wrong (and passes CuPy)


def _check_param(name, a, shape, dtype):
    check_array(f"params[{name!r}]", a)
    if tuple(a.shape) != shape:
        raise ValueError(f"params[{name!r}]: expected shape {shape}, got {tuple(a.shape)}")
    if a.dtype != dtype:
        raise TypeError(f"params[{name!r}]: expected dtype {dtype} (that of wte, floating point), got {a.dtype}")


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------

def _check_inputs(params, config, idx, train=False, rng=None, kv_cache=None, attention_mask=None,
                  tree_mask=None, activation_checkpointing=False):
    """All of forward's checks, before any math: the config, every parameter's name, shape
    and dtype, idx's shape, length and device, the ids' range (one min/max pass over idx,
    which the math needs: a negative id would wrap around to the last rows of wte without
    an error), a generator for dropout, and the masks' shapes and dtypes (a tree mask must
    be a tree: see _check_tree_mask)."""
    _check_config(config)
    _check_params(params, config)
    offset = kv_cache.length(0) if kv_cache is not None else 0
    span = _check_tree_mask(tree_mask, idx, attention_mask) if tree_mask is not None else None
    _check_idx(config, idx, offset=offset, span=span)
    check_same_device("idx", idx, params["wte"], "the params")
    B, T = idx.shape
    if attention_mask is not None:
        check_array("attention_mask", attention_mask)
        if attention_mask.dtype != bool or tuple(attention_mask.shape) != (B, offset + T):
            raise ValueError(f"attention_mask: expected a bool array of shape (B, T_cached + T) = "
                             f"{(B, offset + T)}, got {attention_mask.dtype} {tuple(attention_mask.shape)}")
    if train and config.dropout > 0 and rng is None:
        raise TypeError("rng: expected a random Generator when train=True and dropout > 0, got None")
    if not isinstance(activation_checkpointing, bool):
        raise TypeError(f"activation_checkpointing: expected a bool, got {type(activation_checkpointing).__name__}")
    if activation_checkpointing and kv_cache is not None:
        raise ValueError("activation_checkpointing: expected no kv_cache (checkpointing saves memory for a "
                         "backward pass; a KV cache is for inference), got one")


def _check_idx(config, idx, name="idx", offset=0, span=None):
    """span: how many positions idx's tokens occupy (None: T; a tree of depth d: d + 1)."""
    check_int(name, idx)
    if idx.ndim != 2:
        raise ValueError(f"{name}: expected shape (B, T) of token ids, got {tuple(idx.shape)}")
    T = idx.shape[1]
    if T < 1:
        raise ValueError(f"{name}: expected at least one token, got shape {tuple(idx.shape)}")
    span = T if span is None else span
    if offset + span > config.block_size:
        where = f" after {offset} cached" if offset else ""
        what = f"{span}" if span == T else f"a tree {span - 1} deep"
        raise ValueError(f"{name}: expected at most block_size={config.block_size} positions, got "
                         f"{what}{where} (shape {tuple(idx.shape)}); crop the context to the last "
                         f"{config.block_size} tokens")
    xp = array_module(idx)
    lo, hi = int(xp.min(idx)), int(xp.max(idx))
    if lo < 0 or hi >= config.vocab_size:
        raise ValueError(f"{name}: expected ids in [0, {config.vocab_size}) (vocab_size), "
                         f"got {lo if lo < 0 else hi}")


def _check_tree_mask(tree_mask, idx, attention_mask):
    """tree_mask: (T, T) bool, a forest in topological order: node i sees itself
    (diagonal True), no later node (nothing above the diagonal), and exactly its parent's
    row besides, the parent being the last earlier node it sees. Then row i is node i's
    root path and its depth is the row's count - 1. Host work on T x T booleans.
    -> the positions the tree spans: max depth + 1"""
    check_int("idx", idx)
    check_ndim("idx", idx, 2)
    check_array("tree_mask", tree_mask)
    T = idx.shape[1]
    if tree_mask.dtype != bool or tuple(tree_mask.shape) != (T, T):
        raise ValueError(f"tree_mask: expected a bool array of shape (T, T) = {(T, T)} (one row per "
                         f"token of idx), got {tree_mask.dtype} {tuple(tree_mask.shape)}")
    if attention_mask is not None:
        raise ValueError("tree_mask: cannot be combined with attention_mask (left padding); pass one of them")
    m = to_numpy(tree_mask)
    if T == 0:
        return 0                          # _check_idx says what is wrong: no tokens
    if not m.diagonal().all():
        raise ValueError(f"tree_mask: every node must see itself (a True diagonal); node "
                         f"{int(np.flatnonzero(~m.diagonal())[0])} does not")
    if np.triu(m, 1).any():
        i, j = np.argwhere(np.triu(m, 1))[0]
        raise ValueError(f"tree_mask: a node may see only earlier nodes (its ancestors come first); "
                         f"node {i} sees node {j}")
    before = np.tril(m, -1)
    has_parent = before.any(axis=1)
    parent = T - 1 - np.argmax(before[:, ::-1], axis=1)                 # the last earlier node seen
    path = np.eye(T, dtype=bool)
    path[has_parent] |= m[parent[has_parent]]                          # itself + its parent's row
    bad = np.flatnonzero((path != m).any(axis=1))
    if bad.size:
        raise ValueError(f"tree_mask: row {int(bad[0])} is not a root path (itself and its parent "
                         f"node {int(parent[bad[0]])}'s row); got {m[bad[0]].astype(int).tolist()}")
    return int(m.sum(axis=1).max())


def _check_backward(dlogits, cache, dhidden):
    B, T, C = cache.xf.shape
    if dlogits is None and dhidden is None:
        raise ValueError("dlogits: expected an array of shape (B, T, V) (or dhidden), got None for both")
    if dlogits is not None:
        check_shape("dlogits", dlogits, (B, T, cache.config.vocab_size))
    if dhidden is not None:
        check_shape("dhidden", dhidden, (B, T, C))


def _padding_positions(attention_mask, offset):
    """Left padding (a batch of prompts of different lengths): a token's position counts
    the real tokens before it, and pad keys get no attention.
    attention_mask: (B, T_cached + T) bool or None; offset = T_cached
    -> positions (B, T) int and key_mask (B, 1, 1, T_cached + T), or (None, None) without a mask
    Example: mask [F, F, T, T] -> positions [0, 0, 0, 1] (the pads read row 0 and are never attended)."""
    if attention_mask is None:
        return None, None
    xp = array_module(attention_mask)
    count = xp.cumsum(attention_mask.astype(np.int64), axis=1) - 1       # (B, T_cached + T): -1 at leading pads
    positions = xp.maximum(count[:, offset:], 0)                          # (B, T)
    return positions, attention_mask[:, None, None, :]                    # (B, 1, 1, T_cached + T)


def _tree_positions(tree_mask, offset):
    """Tree attention (Medusa's verification pass): T candidate tokens after the offset
    cached ones, each seeing every cached key, itself and its ancestors (tree_mask).
    -> positions (T,) = offset + depth, depth = ancestors seen; key_mask (1, 1, T, T_cached + T)
    Example: a root and two children, mask [[T, F, F], [T, T, F], [T, F, T]] after 5 cached
    tokens -> positions [5, 6, 6]: both children sit where the token after the root would."""
    xp = array_module(tree_mask)
    depth = tree_mask.sum(axis=1) - 1                                     # (T,)
    T = tree_mask.shape[0]
    prefix = xp.ones((T, offset), dtype=bool)                            # every node sees the cache
    return offset + depth, xp.concatenate([prefix, tree_mask], axis=1)[None, None]


# ---------------------------------------------------------------------------
# The pieces: embeddings, norms, MLPs, one block
# ---------------------------------------------------------------------------

def _embed_forward(params, config, idx, positions, offset):
    """x = wte[idx] + wpe[positions] (RoPE models: x = wte[idx]; the positions act in attention).
    positions: (B, T) from the padding mask, or None: offset, offset + 1, ...
    -> x (B, T, C), token cache, position cache (None with RoPE)"""
    x, tok = embedding_forward(idx, params["wte"])                         # (B, T, C)
    if config.pos != "learned":
        return x, tok, None
    if positions is None:
        T = idx.shape[1]
        positions = array_module(idx).arange(offset, offset + T)           # (T,)
    pe, pos = embedding_forward(positions, params["wpe"])                  # (T, C) or (B, T, C)
    return x + pe, tok, pos


def _embed_backward(dx, tok, pos):
    """-> dwte (V, C), dwpe (block_size, C) or None (RoPE). Both tables got dx; a (T,) row
    of positions was broadcast over the batch, so its gradient is summed over it."""
    dwte = embedding_backward(dx, tok)
    if pos is None:
        return dwte, None
    dpe = dx if pos.ids.ndim == 2 else dx.sum(axis=0)                      # (B, T, C) or (T, C)
    return dwte, embedding_backward(dpe, pos)


def _norm_forward(config, params, prefix, x):
    """norm(x) with the params prefix + ".weight" / ".bias": LayerNorm (its fast form, tested
    equal to norm.layernorm_forward) or RMSNorm."""
    if config.norm == "layernorm":
        return layernorm_forward_fast(x, params[prefix + ".weight"], params.get(prefix + ".bias"), config.eps)
    return rmsnorm_forward(x, params[prefix + ".weight"], config.eps)


def _norm_backward(config, dy, cache):
    """-> dx, dweight, dbias (None for RMSNorm or a LayerNorm without bias)."""
    if config.norm == "layernorm":
        return layernorm_backward_fast(dy, cache)
    dx, dweight = rmsnorm_backward(dy, cache)
    return dx, dweight, None


def _mlp_forward(config, params, prefix, h):
    """The block's feed-forward, with the params prefix + "mlp.*": a GELU MLP or SwiGLU."""
    if config.mlp == "gelu":
        return mlp_forward(h, params[prefix + "mlp.w1"], params.get(prefix + "mlp.b1"),
                           params[prefix + "mlp.w2"], params.get(prefix + "mlp.b2"), activation="gelu")
    return swiglu_forward(h, params[prefix + "mlp.w_gate"], params[prefix + "mlp.w_up"],
                          params[prefix + "mlp.w_down"])


def _mlp_backward(config, dm, cache):
    """-> dh, {"mlp.*": gradient} (None for an absent bias)."""
    if config.mlp == "gelu":
        dh, dw1, db1, dw2, db2 = mlp_backward(dm, cache)
        return dh, {"mlp.w1": dw1, "mlp.b1": db1, "mlp.w2": dw2, "mlp.b2": db2}
    dh, dw_gate, dw_up, dw_down = swiglu_backward(dm, cache)
    return dh, {"mlp.w_gate": dw_gate, "mlp.w_up": dw_up, "mlp.w_down": dw_down}


class BlockCache(NamedTuple):
    ln_1: object     # norm cache of step 1 (holds the block's input x)
    attn: object     # SelfAttentionCache of step 2
    drop_1: object   # DropoutCache of step 3 (mask None: no dropout)
    ln_2: object     # norm cache of step 5 (holds x1, the stream after the attention residual)
    mlp: object      # MlpCache or SwigluCache of step 6
    drop_2: object   # DropoutCache of step 7


def _block_forward(params, config, layer, x, p_drop, rng, key_mask, positions, kv_cache):
    """One pre-norm block, in the steps that _block_backward undoes in reverse.
    x: (B, T, C) -> y: (B, T, C), BlockCache"""
    prefix = f"h.{layer}."
    rope = config.pos == "rope"
    h1, ln_1 = _norm_forward(config, params, prefix + "ln_1", x)            # 1. h1 = norm_1(x)
    a, attn = self_attention_forward(                                        # 2. a = attn(h1)
        h1, params[prefix + "attn.w_qkv"], params.get(prefix + "attn.b_qkv"), params[prefix + "attn.w_o"],
        params.get(prefix + "attn.b_o"), config.n_head, config.n_kv_head, causal=True, mask=key_mask,
        positions=positions if rope else None, rope_base=config.rope_base if rope else None,
        kv_cache=kv_cache, layer=layer, dropout_p=p_drop, rng=rng, impl="fused")
    a_drop, drop_1 = dropout_forward(a, p_drop, rng)                         # 3. a_drop = dropout(a)
    x1 = x + a_drop                                                          # 4. x1 = x + a_drop
    h2, ln_2 = _norm_forward(config, params, prefix + "ln_2", x1)           # 5. h2 = norm_2(x1)
    m, mlp = _mlp_forward(config, params, prefix, h2)                        # 6. m = mlp(h2)
    m_drop, drop_2 = dropout_forward(m, p_drop, rng)                         # 7. m_drop = dropout(m)
    y = x1 + m_drop                                                          # 8. y = x1 + m_drop
    return y, BlockCache(ln_1, attn, drop_1, ln_2, mlp, drop_2)


def _block_backward(config, dy, cache: BlockCache):
    """The block's steps undone from the last to the first. dy: (B, T, C)
    -> dx (B, T, C), {name inside the block ("ln_1.weight", ...): gradient}, None for an absent bias"""
    grads = {}
    # forward step 8: y = x1 + m_drop. A sum passes dy to both terms.
    dx1_residual, dm_drop = dy, dy
    # forward step 7: m_drop = dropout(m)
    dm = dropout_backward(dm_drop, cache.drop_2)
    # forward step 6: m = mlp(h2)
    dh2, mlp_grads = _mlp_backward(config, dm, cache.mlp)
    grads.update(mlp_grads)
    # forward step 5: h2 = norm_2(x1). x1 gets this path's gradient plus the residual's (step 8)
    dx1_norm, grads["ln_2.weight"], grads["ln_2.bias"] = _norm_backward(config, dh2, cache.ln_2)
    dx1 = dx1_residual + dx1_norm
    # forward step 4: x1 = x + a_drop. A sum again
    dx_residual, da_drop = dx1, dx1
    # forward step 3: a_drop = dropout(a)
    da = dropout_backward(da_drop, cache.drop_1)
    # forward step 2: a = attn(h1)
    dh1, grads["attn.w_qkv"], grads["attn.b_qkv"], grads["attn.w_o"], grads["attn.b_o"] = \
        self_attention_backward(da, cache.attn)
    # forward step 1: h1 = norm_1(x). x gets this path's gradient plus the residual's (step 4)
    dx_norm, grads["ln_1.weight"], grads["ln_1.bias"] = _norm_backward(config, dh1, cache.ln_1)
    return dx_residual + dx_norm, grads


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------

class BlockCheckpoint(NamedTuple):
    """What activation checkpointing keeps of a block: its input, and how to redraw its dropout."""
    x: object        # (B, T, C) the block's input
    rng: object      # a copy of the generator as the block found it (None: no dropout)


class Recompute(NamedTuple):
    """What the backward needs to run a block's forward again."""
    params: dict
    p_drop: float
    key_mask: object
    positions: object


class GPTCache(NamedTuple):
    config: GPTConfig
    tok: object          # EmbeddingCache of wte (step 1)
    pos: object          # EmbeddingCache of wpe (step 1), or None (RoPE)
    drop_emb: object     # DropoutCache of the embeddings (step 2)
    blocks: list         # [BlockCache] per layer (step 3)
    ln_f: object         # norm cache of the final norm (step 4)
    xf: object           # (B, T, C) the final norm's output: the LM head's input
    head: object         # (V, C) the LM head's weight (wte when tied) (step 5)
    recompute: object = None   # Recompute under activation checkpointing (blocks: [BlockCheckpoint])


def forward(params, config: GPTConfig, idx, train=False, rng=None, kv_cache=None, attention_mask=None,
            tree_mask=None, activation_checkpointing=False):
    """logits = GPT(idx): the next-token logits at every position.

    idx: (B, T) int ids in [0, V), T <= block_size. train: apply dropout (needs
    ``rng``, a Generator, when config.dropout > 0). kv_cache (inference): an
    attention.KVCache; this block's keys/values are appended and the queries attend
    over everything cached (positions continue from the cache's length).
    attention_mask (inference): (B, T_cached + T) bool, False at left padding; pad
    keys get no attention and positions are cumsum(mask) - 1.
    tree_mask (tree attention, Medusa): (T, T) bool, True where token i may see token j
    of idx: itself and its ancestors in a tree of candidates (medusa.tree_buffers'
    attn_mask). Each token also sees everything cached and sits at position
    T_cached + its depth, so the logits at a node are those of a plain forward of the
    cached tokens followed by that node's root path. Only the deepest path needs to fit
    in block_size; the cache keeps all T (KVCache.keep then keeps the accepted path).
    activation_checkpointing: keep only each block's input; backward recomputes the rest.
    -> logits: (B, T, V) in the params' dtype, cache (for :func:`backward`)
    """
    _check_inputs(params, config, idx, train, rng, kv_cache, attention_mask, tree_mask,
                  activation_checkpointing)
    B, T = idx.shape
    offset = kv_cache.length(0) if kv_cache is not None else 0            # tokens already cached
    if tree_mask is None:
        positions, key_mask = _padding_positions(attention_mask, offset)  # (None, None): no padding
    else:
        positions, key_mask = _tree_positions(tree_mask, offset)          # (T,), (1, 1, T, T_cached + T)
    p_drop = float(config.dropout) if train else 0.0

    x, tok, pos = _embed_forward(params, config, idx, positions, offset)  # 1. x = wte[idx] + wpe[pos]
    x, drop_emb = dropout_forward(x, p_drop, rng)                         # 2. x = dropout(x)
    blocks = []
    for layer in range(config.n_layer):                                   # 3. x = block(x), n_layer times
        if activation_checkpointing:       # keep the input (and the dropout generator), drop the cache
            blocks.append(BlockCheckpoint(x, copy.deepcopy(rng) if p_drop > 0 else None))
            x, _ = _block_forward(params, config, layer, x, p_drop, rng, key_mask, positions, None)
            continue
        x, block = _block_forward(params, config, layer, x, p_drop, rng, key_mask, positions, kv_cache)
        blocks.append(block)
    xf, ln_f = _norm_forward(config, params, "ln_f", x)                  # 4. xf = norm_f(x)
    head = params["wte"] if config.tie_embeddings else params["lm_head"]
    logits = xf.reshape(B * T, config.n_embd) @ head.T                    # 5. logits = xf @ head^T
    logits = logits.reshape(B, T, config.vocab_size)                      # (B, T, V)
    recompute = Recompute(params, p_drop, key_mask, positions) if activation_checkpointing else None
    return logits, GPTCache(config, tok, pos, drop_emb, blocks, ln_f, xf, head, recompute)


# ---------------------------------------------------------------------------
# Backward: the forward's steps, from the last to the first
# ---------------------------------------------------------------------------

def backward(dlogits, cache: GPTCache, dhidden=None) -> dict:
    """dL/dparams from dL/dlogits (B, T, V). -> grads: {name: array}, the keys and shapes of params.

    dhidden (optional, (B, T, C)): a gradient that reaches the final hidden state
    ``cache.xf`` (the LM head's input) by another road: a reward or value head, Medusa's
    heads. It adds to what comes back through the LM head. ``dlogits=None`` means
    only dhidden flows (the LM head then gets a zero gradient).
    """
    _check_backward(dlogits, cache, dhidden)
    config, xf, head = cache.config, cache.xf, cache.head
    B, T, C = xf.shape
    xp = array_module(xf)
    grads = {}      # an absent bias gets None here, and is dropped at the end
    # forward step 5: logits = xf @ head^T. So dxf = dlogits @ head, dhead = dlogits^T @ xf
    if dlogits is not None:
        dlogits_2d = dlogits.reshape(B * T, config.vocab_size)              # (B T, V)
        dhead = dlogits_2d.T @ xf.reshape(B * T, C)                         # (V, C)
        dxf = (dlogits_2d @ head).reshape(B, T, C)                          # (B, T, C)
    else:
        dhead, dxf = xp.zeros_like(head), xp.zeros_like(xf)
    if dhidden is not None:
        dxf = dxf + dhidden              # xf also fed another head: the gradients add
    # forward step 4: xf = norm_f(x)
    dx, grads["ln_f.weight"], grads["ln_f.bias"] = _norm_backward(config, dxf, cache.ln_f)
    # forward step 3: x = block(x) for layer 0, 1, ..., n_layer - 1. Now from the last layer down
    for layer in reversed(range(config.n_layer)):
        block = cache.blocks[layer] if cache.recompute is None else _recompute_block(cache, layer)
        dx, block_grads = _block_backward(config, dx, block)
        grads.update({f"h.{layer}.{name}": g for name, g in block_grads.items()})
    # forward step 2: x = dropout(x)
    dx = dropout_backward(dx, cache.drop_emb)
    # forward step 1: x = wte[idx] + wpe[positions]
    dwte, grads["wpe"] = _embed_backward(dx, cache.tok, cache.pos)
    if config.tie_embeddings:
        grads["wte"] = dwte + dhead      # the tied head is wte itself: its two gradients add
    else:
        grads["wte"], grads["lm_head"] = dwte, dhead
    return {name: grads[name] for name in _param_shapes(config)}


def _recompute_block(cache: GPTCache, layer: int) -> BlockCache:
    """Activation checkpointing: block ``layer``'s forward again, from its saved input, with a
    copy of its saved generator (the same dropout masks; backward may run twice) -> its cache."""
    r, saved = cache.recompute, cache.blocks[layer]
    rng = copy.deepcopy(saved.rng)
    _, block = _block_forward(r.params, cache.config, layer, saved.x, r.p_drop, rng, r.key_mask, r.positions, None)
    return block


def _check_targets(targets, idx):
    check_int("targets", targets)
    if tuple(targets.shape) != tuple(idx.shape):
        raise ValueError(f"targets: expected shape {tuple(idx.shape)} (that of idx), got {tuple(targets.shape)}")


def loss_and_grads(params, config: GPTConfig, idx, targets, train=False, rng=None,
                   activation_checkpointing=False):
    """Mean next-token cross-entropy and its gradient.

    targets: (B, T) int, the token after each position (targets[:, t] = idx[:, t+1] for a
    window of text), -100 where a position should not count. activation_checkpointing:
    recompute each block's forward during the backward (less memory, the same gradients).
    -> (loss: float, grads: {name: array} with the keys and shapes of params)

    On a CPU with several threads (backend.batch_shards) the rows are cut into shards,
    one per thread, each running this same forward and backward on its own rows
    (:func:`loss_and_grads_in_shards`): the same loss and gradient up to round-off.
    """
    _check_loss_inputs(params, config, idx, targets, train, rng, activation_checkpointing)
    shards = batch_shards(idx.shape[0], array_module(idx))
    if shards > 1:
        return _loss_and_grads_in_shards(params, config, idx, targets, shards, train, rng,
                                         activation_checkpointing)
    logits, cache = forward(params, config, idx, train=train, rng=rng,
                            activation_checkpointing=activation_checkpointing)
    loss_value, ce = softmax_cross_entropy_forward(logits, targets)
    dlogits = softmax_cross_entropy_backward(logits.dtype.type(1.0), ce)
    return float(loss_value), backward(dlogits, cache)


def loss_and_grads_in_shards(params, config: GPTConfig, idx, targets, shards: int, train=False, rng=None,
                             activation_checkpointing=False):
    """loss_and_grads with the batch's rows cut into ``shards`` consecutive shards that run at
    the same time, one per thread (backend.run_in_shards, BLAS on one thread each).

    The batch's loss is the mean over its n counted targets, so it is the shards' means
    weighted by their shares: loss = sum_s (n_s / n) loss_s. Its gradient is the same
    sum, which is what each shard computes when its backward starts from dloss_s = n_s / n
    instead of 1; the shards' gradients then add. Under dropout, shard s draws its masks
    from a generator seeded by the s-th of ``shards`` seeds drawn from ``rng``.
    -> (loss, grads) as loss_and_grads
    """
    _check_loss_inputs(params, config, idx, targets, train, rng, activation_checkpointing, shards)
    return _loss_and_grads_in_shards(params, config, idx, targets, shards, train, rng, activation_checkpointing)


def _loss_and_grads_in_shards(params, config, idx, targets, shards, train, rng, activation_checkpointing):
    """loss_and_grads_in_shards after its checks (loss_and_grads has made them already)."""
    B = idx.shape[0]
    n = int((targets != -100).sum())                                      # counted targets in the batch
    dropout = train and config.dropout > 0
    seeds = rng.integers(2**63, size=shards) if dropout else [None] * shards
    rngs = {lo: (np.random.default_rng(int(seed)) if dropout else None)
            for (lo, _), seed in zip(shard_bounds(B, shards), seeds)}

    def shard(lo, hi):
        logits, cache = forward(params, config, idx[lo:hi], train=train, rng=rngs[lo],
                                activation_checkpointing=activation_checkpointing)
        loss_s, ce = softmax_cross_entropy_forward(logits, targets[lo:hi])
        share = ce.n_valid / max(n, 1)                                    # n_s / n
        dlogits = softmax_cross_entropy_backward(logits.dtype.type(share), ce)
        return share * float(loss_s), backward(dlogits, cache)
    results = run_in_shards(shard, B, shards)
    grads = results[0][1]
    for _, more in results[1:]:
        for name, g in more.items():
            grads[name] += g
    return sum(loss_s for loss_s, _ in results), grads


def _check_loss_inputs(params, config, idx, targets, train, rng, activation_checkpointing, shards=1):
    _check_inputs(params, config, idx, train, rng, activation_checkpointing=activation_checkpointing)
    _check_targets(targets, idx)
    check_int_arg("shards", shards, lo=1, hi=idx.shape[0] + 1)          # at most one per row


def loss(params, config: GPTConfig, idx, targets) -> float:
    """The mean next-token cross-entropy, no dropout, no gradient (evaluation)."""
    logits, _ = forward(params, config, idx)
    value, _ = softmax_cross_entropy_forward(logits, targets)
    return float(value)


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------

class GPTDecoder:
    """A GPT behind minillm.sampling's decoder protocol (vocab_size, block_size,
    new_cache, logits): what :func:`sampling.generate`, beam search and speculative
    decoding drive."""

    def __init__(self, params, config: GPTConfig):
        _check_config(config)
        _check_params(params, config)
        self.params, self.config = params, config
        self.vocab_size, self.block_size = config.vocab_size, config.block_size
        self.xp = array_module(params["wte"])

    def new_cache(self, batch_size, max_len):
        c = self.config
        return KVCache(c.n_layer, batch_size, c.kv_heads, min(int(max_len), c.block_size), c.head_dim,
                       dtype=self.params["wte"].dtype, xp=self.xp)

    def logits(self, ids, cache=None, attention_mask=None):
        ids = self.xp.asarray(ids)
        if attention_mask is not None:
            attention_mask = self.xp.asarray(attention_mask)
            if bool(attention_mask.all()):
                attention_mask = None        # no padding: skip the mask (same result, less work)
        out, _ = forward(self.params, self.config, ids, kv_cache=cache, attention_mask=attention_mask)
        return out


def generate(params, config: GPTConfig, prompt_ids, max_new_tokens, temperature=1.0, top_k=None,
             top_p=None, use_cache=True, seed=None, **kwargs):
    """Sample ``max_new_tokens`` after ``prompt_ids`` (temperature 0: greedy), with the KV cache.

    A thin wrapper over :func:`minillm.sampling.generate` (see it for the other
    processors: min_p, repetition/frequency/presence penalties, eos_id, stop, rng).
    prompt_ids: a list of ints (or 1-D array) -> a list of ints, the prompt then the new
    tokens; a list of lists (a batch) -> a list of lists.
    """
    flat = (hasattr(prompt_ids, "ndim") and prompt_ids.ndim == 1) or (
        isinstance(prompt_ids, (list, tuple)) and len(prompt_ids) > 0
        and not isinstance(prompt_ids[0], (list, tuple)))
    out = _sampling_generate(GPTDecoder(params, config), prompt_ids, max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p, use_cache=use_cache,
                             seed=seed, **kwargs)
    return out[0] if flat else out
