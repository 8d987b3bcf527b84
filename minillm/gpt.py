"""A decoder-only transformer (GPT), composed from the concept files, with its whole
backward pass written out by hand.

The forward pass, for token ids idx of shape (B, T):

    x = wte[idx] + wpe[0..T-1]                 token + learned position embeddings
    x = dropout(x)                             (training only)
    for each of n_layer blocks (pre-norm):
        x = x + dropout(attn(norm_1(x)))       causal self-attention, residual
        x = x + dropout(mlp(norm_2(x)))        feed-forward (GELU MLP or SwiGLU), residual
    x = norm_f(x)
    logits = x @ wte^T                         the LM head, tied to the token embedding

Variants chosen by :class:`GPTConfig`: LayerNorm or RMSNorm, learned positions or
RoPE (rotary, inside attention), a GELU MLP or SwiGLU, multi-head or grouped-query
attention (n_kv_head < n_head), biases or none, a tied or separate LM head. With
the defaults this is GPT-2, and :mod:`minillm.checkpoint` loads GPT-2 weights.

The backward pass (:func:`backward`) is the forward read from the bottom up: every
``*_forward`` above has its ``*_backward`` below, called in reverse order, and each
residual ``x = x + f(x)`` sends its gradient down both paths (the ``+=``).

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

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .attention import KVCache, self_attention_backward, self_attention_forward
from .backend import DEFAULT_DTYPE, array_module, check_array, check_int, make_rng, randn, to_device
from .backprop import (dropout_backward, dropout_forward, softmax_cross_entropy_backward,
                       softmax_cross_entropy_forward)
from .embeddings import embedding_backward, embedding_forward
from .ffn import mlp_backward, mlp_forward, swiglu_backward, swiglu_forward
from .norm import layernorm_backward, layernorm_forward, rmsnorm_backward, rmsnorm_forward
from .sampling import generate as _sampling_generate

__all__ = ["GPTConfig", "param_shapes", "init_params", "num_params", "forward", "backward",
           "loss_and_grads", "loss", "GPTDecoder", "generate"]


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

_CHOICES = {"norm": ("layernorm", "rmsnorm"), "pos": ("learned", "rope"), "mlp": ("gelu", "swiglu")}


def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT.

    vocab_size V, block_size (the longest context), n_layer, n_head H, n_embd C
    (a multiple of H; head size D = C / H), n_kv_head Hkv (None = H: multi-head;
    1 = multi-query; else grouped-query, a divisor of H), dropout (embeddings,
    attention probabilities and both residual branches, training only), bias (in
    the linear layers and LayerNorms), norm "layernorm" | "rmsnorm", pos "learned" |
    "rope", mlp "gelu" (tanh GELU, 4C wide) | "swiglu", tie_embeddings (the LM head
    reuses wte).
    Extras: norm_eps (None: 1e-5 for LayerNorm, 1e-6 for RMSNorm), mlp_hidden (None:
    4C for GELU, 8C/3 rounded up to a multiple of 8 for SwiGLU, which keeps the
    parameter count of a 4C GELU MLP), rope_base.
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
            _positive_int(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head: expected a divisor of n_embd={self.n_embd}, got {self.n_head}")
        if self.n_kv_head is not None:
            _positive_int("n_kv_head", self.n_kv_head)
            if self.n_head % self.n_kv_head:
                raise ValueError(f"n_kv_head: expected a divisor of n_head={self.n_head}, got {self.n_kv_head}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout!r}")
        for name, options in _CHOICES.items():
            if getattr(self, name) not in options:
                raise ValueError(f"{name}: expected one of {options}, got {getattr(self, name)!r}")
        if self.norm_eps is not None and not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise ValueError(f"norm_eps: expected a positive number or None, got {self.norm_eps!r}")
        if self.mlp_hidden is not None:
            _positive_int("mlp_hidden", self.mlp_hidden)
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"n_embd: RoPE rotates pairs of features, so the head size n_embd / n_head "
                             f"must be even, got {self.head_dim}")
        if not (isinstance(self.rope_base, (int, float)) and self.rope_base > 1):
            raise ValueError(f"rope_base: expected a number > 1, got {self.rope_base!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def hidden_size(self) -> int:
        """Width of the MLP's hidden layer."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return 8 * ((8 * self.n_embd // 3 + 7) // 8)

    @property
    def eps(self) -> float:
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
    C, V, H, Hkv, D, F = (config.n_embd, config.vocab_size, config.n_head, config.kv_heads,
                          config.head_dim, config.hidden_size)
    s = {"wte": (V, C)}
    if config.pos == "learned":
        s["wpe"] = (config.block_size, C)
    ln_bias = config.bias and config.norm == "layernorm"
    for i in range(config.n_layer):
        p = f"h.{i}."
        s[p + "ln_1.weight"] = (C,)
        if ln_bias:
            s[p + "ln_1.bias"] = (C,)
        s[p + "attn.w_qkv"] = (C, (H + 2 * Hkv) * D)
        if config.bias:
            s[p + "attn.b_qkv"] = ((H + 2 * Hkv) * D,)
        s[p + "attn.w_o"] = (H * D, C)
        if config.bias:
            s[p + "attn.b_o"] = (C,)
        s[p + "ln_2.weight"] = (C,)
        if ln_bias:
            s[p + "ln_2.bias"] = (C,)
        if config.mlp == "gelu":
            s[p + "mlp.w1"] = (C, F)
            if config.bias:
                s[p + "mlp.b1"] = (F,)
            s[p + "mlp.w2"] = (F, C)
            if config.bias:
                s[p + "mlp.b2"] = (C,)
        else:
            s[p + "mlp.w_gate"] = (C, F)
            s[p + "mlp.w_up"] = (C, F)
            s[p + "mlp.w_down"] = (F, C)
    s["ln_f.weight"] = (C,)
    if ln_bias:
        s["ln_f.bias"] = (C,)
    if not config.tie_embeddings:
        s["lm_head"] = (V, C)
    return s


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
            a = np.ones(shape, dtype=dtype)
        elif len(shape) == 1:                                     # biases
            a = np.zeros(shape, dtype=dtype)
        else:
            std = std_resid if name.endswith(_RESIDUAL_PROJECTIONS) else 0.02
            a = randn(rng, shape, std=std, dtype=dtype, device="cpu")
        params[name] = a
    return to_device(params, device)


def num_params(params: dict) -> int:
    """Total number of parameters (a tied head counts once: it is one array)."""
    return int(sum(int(np.prod(p.shape)) for p in params.values()))


def _check_params(params, config):
    if not isinstance(params, dict):
        raise TypeError(f"params: expected a dict of arrays, got {type(params).__name__}")
    shapes = param_shapes(config)
    missing = [k for k in shapes if k not in params]
    extra = [k for k in params if k not in shapes]
    if missing or extra:
        raise ValueError(f"params: do not match the config: missing {missing[:6]}"
                         f"{' ...' if len(missing) > 6 else ''}, unexpected {extra[:6]}"
                         f"{' ...' if len(extra) > 6 else ''}")
    dtype = params["wte"].dtype if hasattr(params["wte"], "dtype") else None
    for k, shape in shapes.items():
        a = params[k]
        check_array(f"params[{k!r}]", a)
        if tuple(a.shape) != shape:
            raise ValueError(f"params[{k!r}]: expected shape {shape}, got {tuple(a.shape)}")
        if a.dtype != dtype or a.dtype.kind != "f":
            raise TypeError(f"params[{k!r}]: expected dtype {dtype} (that of wte, floating point), got {a.dtype}")


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------

class BlockCache(NamedTuple):
    ln_1: object     # norm cache (holds the block's input x)
    attn: object     # SelfAttentionCache
    drop_1: object   # DropoutCache of the attention branch
    ln_2: object     # norm cache (holds x after the attention residual)
    mlp: object      # MlpCache or SwigluCache
    drop_2: object   # DropoutCache of the MLP branch


class GPTCache(NamedTuple):
    config: GPTConfig
    tok: object          # EmbeddingCache of wte
    pos: object          # EmbeddingCache of wpe, or None (RoPE)
    pos_batched: bool    # position ids were (B, T) (left padding) rather than (T,)
    drop_emb: object     # DropoutCache of the embeddings
    blocks: list         # [BlockCache] per layer
    ln_f: object         # norm cache of the final norm
    xf: object           # (B, T, C) the final norm's output: the LM head's input
    head: object         # (V, C) the LM head's weight (wte when tied)


def _norm_forward(config, params, prefix, x):
    if config.norm == "layernorm":
        return layernorm_forward(x, params[prefix + ".weight"], params.get(prefix + ".bias"), config.eps)
    return rmsnorm_forward(x, params[prefix + ".weight"], config.eps)


def _norm_backward(config, grads, prefix, dy, cache):
    if config.norm == "layernorm":
        dx, dw, db = layernorm_backward(dy, cache)
        if db is not None:
            grads[prefix + ".bias"] = db
    else:
        dx, dw = rmsnorm_backward(dy, cache)
    grads[prefix + ".weight"] = dw
    return dx


def _dropout(x, p, train, rng):
    if train and p > 0:
        return dropout_forward(x, p, rng)
    return x, None


def _undropout(dy, cache):
    return dy if cache is None else dropout_backward(dy, cache)


def _check_idx(config, idx, name="idx", offset=0):
    check_int(name, idx)
    if idx.ndim != 2:
        raise ValueError(f"{name}: expected shape (B, T) of token ids, got {tuple(idx.shape)}")
    B, T = idx.shape
    if T < 1:
        raise ValueError(f"{name}: expected at least one token, got shape {tuple(idx.shape)}")
    if offset + T > config.block_size:
        where = f" after {offset} cached" if offset else ""
        raise ValueError(f"{name}: expected at most block_size={config.block_size} positions, got "
                         f"{T}{where} (shape {tuple(idx.shape)}); crop the context to the last "
                         f"{config.block_size} tokens")
    xp = array_module(idx)
    lo, hi = int(xp.min(idx)), int(xp.max(idx))
    if lo < 0 or hi >= config.vocab_size:
        raise ValueError(f"{name}: expected ids in [0, {config.vocab_size}) (vocab_size), "
                         f"got {lo if lo < 0 else hi}")


def forward(params, config: GPTConfig, idx, train=False, rng=None, kv_cache=None, attention_mask=None):
    """logits = GPT(idx): the next-token logits at every position.

    idx: (B, T) int ids in [0, V), T <= block_size. train: apply dropout (needs
    ``rng``, a Generator, when config.dropout > 0). kv_cache (inference): an
    attention.KVCache; this block's keys/values are appended and the queries attend
    over everything cached (positions continue from the cache's length).
    attention_mask (inference): (B, T_cached + T) bool, False at left padding; pad
    keys get no attention and positions are cumsum(mask) - 1.
    -> logits: (B, T, V) in the params' dtype, cache (for :func:`backward`)
    """
    _check_config(config)
    _check_params(params, config)
    offset = kv_cache.length(0) if kv_cache is not None else 0
    _check_idx(config, idx, offset=offset)
    xp = array_module(params["wte"])
    if array_module(idx) is not xp:
        raise TypeError(f"idx: expected an array on the same device as the params ({xp.__name__}), "
                        f"got {type(idx).__module__}.{type(idx).__name__}")
    B, T = idx.shape
    C = config.n_embd
    p_drop = float(config.dropout)

    # Positions of this block's tokens: offset.. without padding; from the mask with it.
    positions, attn_mask = None, None
    if attention_mask is not None:
        check_array("attention_mask", attention_mask)
        if attention_mask.dtype != bool or tuple(attention_mask.shape) != (B, offset + T):
            raise ValueError(f"attention_mask: expected a bool array of shape (B, T_cached + T) = "
                             f"{(B, offset + T)}, got {attention_mask.dtype} {tuple(attention_mask.shape)}")
        pos_all = xp.cumsum(attention_mask.astype(np.int64), axis=1) - 1
        positions = xp.maximum(pos_all[:, offset:], 0)       # pads (position -1) read row 0: never attended
        attn_mask = attention_mask[:, None, None, :]           # (B, 1, 1, Tk): pad keys get no attention

    # Embeddings.
    x, tok_cache = embedding_forward(idx, params["wte"])
    pos_cache = None
    if config.pos == "learned":
        pos_ids = positions if positions is not None else xp.arange(offset, offset + T)
        pe, pos_cache = embedding_forward(pos_ids, params["wpe"])   # (T, C) or (B, T, C)
        x = x + pe
    x, drop_emb = _dropout(x, p_drop, train, rng)

    rope_base = config.rope_base if config.pos == "rope" else None
    rope_positions = positions if rope_base is not None else None
    blocks = []
    for i in range(config.n_layer):
        p = f"h.{i}."
        h, ln_1 = _norm_forward(config, params, p + "ln_1", x)
        a, attn = self_attention_forward(
            h, params[p + "attn.w_qkv"], params.get(p + "attn.b_qkv"), params[p + "attn.w_o"],
            params.get(p + "attn.b_o"), config.n_head, config.n_kv_head, causal=True, mask=attn_mask,
            positions=rope_positions, rope_base=rope_base, kv_cache=kv_cache, layer=i,
            dropout_p=p_drop if train else 0.0, rng=rng)
        a, drop_1 = _dropout(a, p_drop, train, rng)
        x = x + a
        h, ln_2 = _norm_forward(config, params, p + "ln_2", x)
        if config.mlp == "gelu":
            m, mlp = mlp_forward(h, params[p + "mlp.w1"], params.get(p + "mlp.b1"), params[p + "mlp.w2"],
                                 params.get(p + "mlp.b2"), activation="gelu")
        else:
            m, mlp = swiglu_forward(h, params[p + "mlp.w_gate"], params[p + "mlp.w_up"],
                                    params[p + "mlp.w_down"])
        m, drop_2 = _dropout(m, p_drop, train, rng)
        x = x + m
        blocks.append(BlockCache(ln_1, attn, drop_1, ln_2, mlp, drop_2))

    xf, ln_f = _norm_forward(config, params, "ln_f", x)
    head = params["wte"] if config.tie_embeddings else params["lm_head"]
    logits = (xf.reshape(B * T, C) @ head.T).reshape(B, T, config.vocab_size)
    cache = GPTCache(config, tok_cache, pos_cache, positions is not None, drop_emb, blocks, ln_f, xf, head)
    return logits, cache


# ---------------------------------------------------------------------------
# Backward: the forward, read from the bottom up
# ---------------------------------------------------------------------------

def backward(dlogits, cache: GPTCache) -> dict:
    """dL/dparams from dL/dlogits. -> grads: {name: array}, the keys and shapes of params."""
    config = cache.config
    xf, head = cache.xf, cache.head
    B, T, C = xf.shape
    V = config.vocab_size
    if tuple(dlogits.shape) != (B, T, V):
        raise ValueError(f"dlogits: expected shape {(B, T, V)} (the logits'), got {tuple(dlogits.shape)}")
    grads = {}

    # LM head: logits = xf @ head^T  ->  dxf = dlogits @ head, dhead = dlogits^T @ xf.
    dl2 = dlogits.reshape(B * T, V)
    dhead = dl2.T @ xf.reshape(B * T, C)
    dx = (dl2 @ head).reshape(B, T, C)

    dx = _norm_backward(config, grads, "ln_f", dx, cache.ln_f)

    for i in reversed(range(config.n_layer)):
        p = f"h.{i}."
        bc = cache.blocks[i]
        # x = x + dropout(mlp(norm_2(x))): the residual passes dx through unchanged, and
        # the branch adds its own contribution.
        dm = _undropout(dx, bc.drop_2)
        if config.mlp == "gelu":
            dh, dw1, db1, dw2, db2 = mlp_backward(dm, bc.mlp)
            grads[p + "mlp.w1"], grads[p + "mlp.w2"] = dw1, dw2
            if config.bias:
                grads[p + "mlp.b1"], grads[p + "mlp.b2"] = db1, db2
        else:
            dh, dwg, dwu, dwd = swiglu_backward(dm, bc.mlp)
            grads[p + "mlp.w_gate"], grads[p + "mlp.w_up"], grads[p + "mlp.w_down"] = dwg, dwu, dwd
        dx += _norm_backward(config, grads, p + "ln_2", dh, bc.ln_2)
        # x = x + dropout(attn(norm_1(x))): the same pattern.
        da = _undropout(dx, bc.drop_1)
        dh, dwqkv, dbqkv, dwo, dbo = self_attention_backward(da, bc.attn)
        grads[p + "attn.w_qkv"], grads[p + "attn.w_o"] = dwqkv, dwo
        if config.bias:
            grads[p + "attn.b_qkv"], grads[p + "attn.b_o"] = dbqkv, dbo
        dx += _norm_backward(config, grads, p + "ln_1", dh, bc.ln_1)

    dx = _undropout(dx, cache.drop_emb)
    if cache.pos is not None:
        # x = tok + pe: both get dx; pe (T, C) was broadcast over the batch, so sum it out.
        grads["wpe"] = embedding_backward(dx if cache.pos_batched else dx.sum(axis=0), cache.pos)
    dwte = embedding_backward(dx, cache.tok)
    if config.tie_embeddings:
        dwte += dhead          # the tied head is the same array: its two gradients add
    else:
        grads["lm_head"] = dhead
    grads["wte"] = dwte
    return {k: grads[k] for k in param_shapes(config)}


def loss_and_grads(params, config: GPTConfig, idx, targets, train=False, rng=None):
    """Mean next-token cross-entropy and its gradient.

    targets: (B, T) int, the token after each position (targets[:, t] = idx[:, t+1] for a
    window of text), -100 where a position should not count.
    -> (loss: float, grads: {name: array} with the keys and shapes of params)
    """
    logits, cache = forward(params, config, idx, train=train, rng=rng)
    check_int("targets", targets)
    if tuple(targets.shape) != tuple(idx.shape):
        raise ValueError(f"targets: expected shape {tuple(idx.shape)} (that of idx), got {tuple(targets.shape)}")
    loss_value, ce = softmax_cross_entropy_forward(logits, targets)
    dlogits = softmax_cross_entropy_backward(logits.dtype.type(1.0), ce)
    return float(loss_value), backward(dlogits, cache)


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
