"""T5: an encoder-decoder transformer (sequence to sequence), composed from the concept
files, with its whole backward written out by hand; span corruption, T5's pretraining
objective; and generation with the encoder run once and both decoder caches.

The third way to model language. GPT predicts the next token of one stream (causal LM),
BERT fills in hidden tokens of one stream (masked LM); an encoder-decoder reads a source
sequence with a bidirectional encoder and writes a target sequence with a causal decoder
that looks at the encoder's output through cross-attention (Vaswani et al. 2017; T5:
Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer").

The forward pass (:func:`forward`), for source ids (B, S) and decoder ids (B, T):

    1. e = encoder(input_ids)                        a stack of bidirectional blocks     (B, S, C)
    2. h = decoder(decoder_input_ids, e)             causal blocks, each also reading e  (B, T, C)
    3. hs = h * d_model^-0.5                         only with the tied head
    4. logits = hs @ head^T                          head = shared (tied) or lm_head     (B, T, V)

Each stack (:func:`_stack_forward`) is, with ``shared`` the one embedding table of both:

    1. x = shared[ids]        2. x = dropout(x)
    3. bias = rel_bias[bucket(j - i)]     (1, H, Tq, Tk): the first layer's table, shared by all
    4. n times, x = block(x), pre-norm (:func:`_block_forward`):
           1. h1 = norm_attn(x)    2. a = self_attn(h1, bias)         3. x1 = x + dropout(a)
          (decoder only)
           4. h2 = norm_cross(x1)  5. c = cross_attn(h2, e)           6. x2 = x1 + dropout(c)
           7. h3 = norm_ff(x2)     8. m = ff(h3)                      9. y = x2 + dropout(m)
    5. xf = norm_f(x)         6. xf = dropout(xf)

    attention(q, k, v) = softmax(q k^T + bias + mask) v              (no 1/sqrt(d_kv))
    ff(h) = relu(h Wi) Wo                           feed_forward_proj "relu" (T5 v1.0)
    ff(h) = (gelu(h Wi_0) * (h Wi_1)) Wo            "gated-gelu" (T5 v1.1, Flan-T5; tanh GELU)
    norm(x) = x / sqrt(mean(x^2) + eps) * weight    RMSNorm (minillm.norm)

The relative position bucket of a key at j for a query at i (:func:`relative_position_bucket`,
n = relative_attention_num_buckets, m = relative_attention_max_distance): in the encoder
(bidirectional) half the buckets are for keys after the query, r = |j - i| and n' = n / 2;
in the decoder (causal) r = max(i - j, 0) and n' = n. Then r < n'/2 is its own bucket
(exact small distances) and larger r share logarithmically wider buckets,
n'/2 + floor(log(r / (n'/2)) / log(m / (n'/2)) * n'/2), capped at n' - 1: every distance
>= m lands in the last one.

The backward (:func:`backward`) undoes the steps in reverse: the head, the decoder from its
last block down (each block's cross-attention also returns a gradient for e), then the
encoder, fed the sum of those cross-attention gradients. The shared embedding gets three
gradients that add (encoder input, decoder input, tied head), and each stack's relative
bias table the gradient of every layer's scores.

Where T5 differs from the GPT (minillm.gpt), and why
----------------------------------------------------
* Two stacks and cross-attention: the task is to map a source to a target, so the source
  is read once, in full (no causal mask), and every decoder block asks it questions:
  queries from the decoder, keys and values from the encoder output (a soft lookup).
* No position embedding table: positions enter only as a learned scalar per head and
  per relative-distance bucket, added to the attention scores. Only distances matter,
  they saturate at max_distance, so there is no block_size and no position limit.
* The bias is computed once per stack (HF: in the first layer) and shared by every
  layer: one (num_buckets, H) table per stack, cheap, and the same for all depths.
* No 1/sqrt(d_kv) scaling of the scores: T5 folds it into the initialisation (q is drawn
  with std (d_model d_kv)^-1/2 instead of d_model^-1/2), so the scores start at the
  same scale and the learned bias is compared against unscaled dot products.
* RMSNorm without a bias, and no biases anywhere (linear layers, norms): Mesh
  TensorFlow's choice, simpler and no worse.
* Dropout in T5's places: on the embeddings, each sublayer's output, the feed-forward's
  hidden layer, the attention probabilities and the final norm's output.
* The tied head's input is scaled by d_model^-0.5: the shared table is initialised with
  std 1 (the embeddings feed the residual stream unscaled), so the tied output projection
  would give logits with std sqrt(d_model) without it. The untied head (v1.1) does not scale.
* The target is fed shifted right: decoder input t is the label at t - 1, the first is
  decoder_start_token_id (the pad id in T5), so the output at t predicts label t seeing
  only labels before it (teacher forcing). :func:`loss_and_grads` builds it.
* The feed-forward is ReLU (v1.0) or a gated GELU (v1.1), without biases, d_ff wide.
* Heads have their own size d_kv: the attention width H d_kv need not equal d_model.

Parameters are one flat dict (names below, weights stored (in, out): a layer is x @ w)::

    shared (V, C)                                     [lm_head (V, C) when untied]
    encoder.rel_bias (n, H)  encoder.ln_f.weight (C,)  decoder.rel_bias (n, H)  decoder.ln_f.weight
    {stack}.{i}.ln_attn.weight (C,)  {stack}.{i}.attn.w_qkv (C, 3 H Dk) [q | k | v]  .attn.w_o (H Dk, C)
    decoder.{i}.ln_cross.weight  decoder.{i}.cross.w_q (C, H Dk)  .cross.w_kv (C, 2 H Dk) [k | v]  .cross.w_o
    {stack}.{i}.ln_ff.weight  {stack}.{i}.ff.wi (C, F)  .ff.wo (F, C)     or .ff.wi_0, .ff.wi_1 (gated)

Hugging Face's T5ForConditionalGeneration checkpoints load with ``minillm.checkpoint.load_hf``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .attention import KVCache, _join_heads, _split_heads, sdpa_backward, sdpa_forward
from .backend import (DEFAULT_DTYPE, array_module, check_array, check_choice, check_float, check_ids,
                      check_int, check_int_arg, check_number, check_positive, check_probability,
                      check_same_device, is_int, make_rng, randn, to_device, to_numpy)
from .backprop import (dropout_backward, dropout_forward, softmax_cross_entropy_backward,
                       softmax_cross_entropy_forward)
from .embeddings import embedding_backward, embedding_forward
from .ffn import gelu_backward, gelu_forward, linear_backward, linear_forward, relu_backward, relu_forward
from .norm import rmsnorm_backward, rmsnorm_forward
from .sampling import generate as _sampling_generate

__all__ = ["T5Config", "param_shapes", "init_params", "num_params", "relative_position_bucket",
           "forward", "backward", "shift_right", "loss_and_grads", "loss", "T5Decoder", "generate",
           "span_corruption", "span_corruption_reconstruct", "IGNORE_INDEX"]

IGNORE_INDEX = -100
FEED_FORWARD_PROJ = ("relu", "gated-gelu")


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class T5Config:
    """The shape of a T5, in Hugging Face's T5Config names.

    vocab_size V; d_model C (the residual stream); d_kv Dk (one head's size; H Dk need not
    be C); d_ff F (the feed-forward's width); num_layers (encoder blocks);
    num_decoder_layers (None: as many as the encoder); num_heads H;
    relative_attention_num_buckets n, relative_attention_max_distance m (the bucket
    function); feed_forward_proj "relu" | "gated-gelu"; tie_word_embeddings (the LM head
    is ``shared``, its input scaled by C^-0.5); layer_norm_epsilon; dropout_rate (training
    only); pad_token_id, eos_token_id, decoder_start_token_id (T5: the pad id).
    """
    vocab_size: int
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    layer_norm_epsilon: float = 1e-6
    dropout_rate: float = 0.1
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            check_int_arg(name, getattr(self, name), lo=1)
        check_int_arg("num_decoder_layers", self.num_decoder_layers, lo=1, optional=True)
        if self.relative_attention_num_buckets < 4:
            raise ValueError(f"relative_attention_num_buckets: expected an int >= 4 (half for each "
                             f"direction, half of those exact), got {self.relative_attention_num_buckets}")
        check_choice("feed_forward_proj", self.feed_forward_proj, FEED_FORWARD_PROJ)
        if not isinstance(self.tie_word_embeddings, bool):
            raise TypeError(f"tie_word_embeddings: expected a bool, got {self.tie_word_embeddings!r}")
        check_positive("layer_norm_epsilon", self.layer_norm_epsilon)
        check_probability("dropout_rate", self.dropout_rate)
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            check_int_arg(name, getattr(self, name), 0, self.vocab_size)

    @property
    def n_decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @property
    def inner_dim(self) -> int:
        """H Dk: the width of the heads side by side."""
        return self.num_heads * self.d_kv

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj == "gated-gelu"

    def replace(self, **changes) -> "T5Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "T5Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown T5Config fields {unknown}; known: {sorted(known)}")
        return cls(**d)


def _check_config(config):
    if not isinstance(config, T5Config):
        raise TypeError(f"config: expected a T5Config, got {type(config).__name__}")


# ---------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------

def param_shapes(config: T5Config) -> dict:
    """{name: shape} of every parameter, in a fixed order (the order init draws them)."""
    _check_config(config)
    return dict(_param_shapes(config))


def _ff_shapes(config):
    C, F = config.d_model, config.d_ff
    if config.gated:
        return {"ff.wi_0": (C, F), "ff.wi_1": (C, F), "ff.wo": (F, C)}
    return {"ff.wi": (C, F), "ff.wo": (F, C)}


@functools.lru_cache(maxsize=32)
def _param_shapes(config: T5Config) -> dict:
    # Cached per (frozen) config; callers must not change it (param_shapes hands out copies).
    C, V, I, n, H = (config.d_model, config.vocab_size, config.inner_dim,
                     config.relative_attention_num_buckets, config.num_heads)
    shapes = {"shared": (V, C)}
    for stack, n_layers in (("encoder", config.num_layers), ("decoder", config.n_decoder_layers)):
        shapes[f"{stack}.rel_bias"] = (n, H)
        for i in range(n_layers):
            p = f"{stack}.{i}."
            block = {"ln_attn.weight": (C,), "attn.w_qkv": (C, 3 * I), "attn.w_o": (I, C)}
            if stack == "decoder":
                block.update({"ln_cross.weight": (C,), "cross.w_q": (C, I), "cross.w_kv": (C, 2 * I),
                              "cross.w_o": (I, C)})
            block["ln_ff.weight"] = (C,)
            block.update(_ff_shapes(config))
            shapes.update({p + k: s for k, s in block.items()})
        shapes[f"{stack}.ln_f.weight"] = (C,)
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (V, C)
    return shapes


def _init_std(config, name):
    """Hugging Face's T5 initialisation (initializer_factor 1): the std of each weight."""
    C, Dk, I, F = config.d_model, config.d_kv, config.inner_dim, config.d_ff
    if name in ("shared", "lm_head"):
        return 1.0
    if name.endswith((".w_o", "ff.wo")):
        return (I if name.endswith(".w_o") else F) ** -0.5
    return C ** -0.5           # wi, k, v, the relative bias; q is handled by _init_qkv


def init_params(config: T5Config, seed=0, dtype=DEFAULT_DTYPE, device=None) -> dict:
    """T5's initialisation: shared (and lm_head) ~ N(0, 1), norm gains 1, the relative bias
    and every input projection ~ N(0, 1/C), output projections ~ N(0, 1/fan_in), and the
    query ~ N(0, 1/(C Dk)): the 1/sqrt(Dk) that T5 leaves out of the scores, folded in here.
    Drawn on the CPU from ``seed`` (same numbers on any device), then moved to ``device``."""
    _check_config(config)
    rng = make_rng(seed)
    C, I = config.d_model, config.inner_dim
    params = {}
    for name, shape in _param_shapes(config).items():
        if len(shape) == 1:                                        # norm gains
            params[name] = np.ones(shape, dtype=dtype)
        elif name.endswith(("attn.w_qkv", "cross.w_q")):
            w = randn(rng, shape, std=C ** -0.5, dtype=np.float64, device="cpu")
            w[:, :I] *= config.d_kv ** -0.5                        # the query columns
            params[name] = w.astype(dtype)
        else:
            params[name] = randn(rng, shape, std=_init_std(config, name), dtype=dtype, device="cpu")
    return to_device(params, device)


def num_params(params: dict) -> int:
    """Total number of parameters (a tied head counts once)."""
    return int(sum(int(np.prod(p.shape)) for p in params.values()))


def _check_params(params, config):
    """params has exactly the names of param_shapes(config), each of its shape, all of
    shared's floating dtype."""
    if not isinstance(params, dict):
        raise TypeError(f"params: expected a dict of arrays, got {type(params).__name__}")
    shapes = _param_shapes(config)
    if params.keys() != shapes.keys():
        missing = [k for k in shapes if k not in params]
        extra = [k for k in params if k not in shapes]
        raise ValueError(f"params: do not match the config: missing {missing[:6]}"
                         f"{' ...' if len(missing) > 6 else ''}, unexpected {extra[:6]}"
                         f"{' ...' if len(extra) > 6 else ''}")
    check_float("params['shared']", params["shared"])
    dtype = params["shared"].dtype
    for name, shape in shapes.items():
        a = params[name]
        check_array(f"params[{name!r}]", a)
        if tuple(a.shape) != shape:
            raise ValueError(f"params[{name!r}]: expected shape {shape}, got {tuple(a.shape)}")
        if a.dtype != dtype:
            raise TypeError(f"params[{name!r}]: expected dtype {dtype} (that of shared), got {a.dtype}")


# ---------------------------------------------------------------------------
# Relative position buckets
# ---------------------------------------------------------------------------

def relative_position_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """T5's bucket of each relative position j - i (key minus query), an int array in [0, n).

    Bidirectional (encoder): buckets [0, n/2) for keys at or before the query, [n/2, n)
    for keys after it, each half by |j - i|. Causal (decoder): a key after the query
    cannot be seen, so it shares bucket 0 with distance 0, and all n buckets go to i - j.
    Within a half of n' buckets: distances below n'/2 are exact, the rest logarithmic up
    to max_distance, then saturated. The logarithm is taken in float32, as Mesh
    TensorFlow and Hugging Face do, so the boundaries fall on the same distances.

    >>> relative_position_bucket(np.array([-3, -1, 0, 1, 3, 200]), True, 8, 16).tolist()
    [2, 1, 0, 5, 6, 7]
    >>> relative_position_bucket(np.array([-200, -3, 0, 3]), False, 8, 16).tolist()
    [7, 3, 0, 0]
    """
    _check_relative_position_bucket(relative_position, num_buckets, max_distance)
    rp = np.asarray(to_numpy(relative_position), dtype=np.int64)
    n = int(num_buckets)
    offset = np.zeros_like(rp)
    if bidirectional:
        n //= 2
        offset = np.where(rp > 0, n, 0)                             # keys after the query
        distance = np.abs(rp)
    else:
        distance = -np.minimum(rp, 0)                               # i - j, 0 for the future
    max_exact = n // 2
    is_small = distance < max_exact
    if max_distance <= max_exact:        # no logarithmic range left: past the exact ones, saturate
        return offset + np.where(is_small, distance, n - 1)      # (HF's formula divides by log(1) = 0)
    ratio = np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact)
    log_scaled = np.log(ratio) / np.float32(math.log(max_distance / max_exact)) * np.float32(n - max_exact)
    large = np.minimum(max_exact + log_scaled.astype(np.int64), n - 1)
    return offset + np.where(is_small, distance, large)


def _position_buckets(config, Tq, Tk, bidirectional, offset=0):
    """(Tq, Tk) buckets for queries at offset..offset+Tq-1 and keys at 0..Tk-1 (host array)."""
    rel = np.arange(Tk)[None, :] - (np.arange(Tq)[:, None] + offset)      # (Tq, Tk) j - i
    return relative_position_bucket(rel, bidirectional, config.relative_attention_num_buckets,
                                    config.relative_attention_max_distance)


def _position_bias_forward(table, buckets):
    """bias[0, h, i, j] = table[buckets[i, j], h]. table (n, H), buckets (Tq, Tk) -> (1, H, Tq, Tk)"""
    values, lookup = embedding_forward(buckets, table)                      # (Tq, Tk, H)
    return values.transpose(2, 0, 1)[None], lookup


def _position_bias_backward(dbias, lookup):
    """dbias (1, H, Tq, Tk), the sum over every layer that used it -> dtable (n, H)"""
    return embedding_backward(dbias[0].transpose(1, 2, 0), lookup)


# ---------------------------------------------------------------------------
# T5's attention and feed-forward: minillm.attention's sdpa with scale 1 and a bias
# ---------------------------------------------------------------------------

class AttentionCache(NamedTuple):
    q_proj: object     # LinearCache of the query (or fused q/k/v) projection
    kv_proj: object    # LinearCache of the key/value projection (cross), None for self or cached K/V
    out_proj: object   # LinearCache of the output projection
    attn: object       # SDPACache
    dims: tuple        # (B, Tq, H, Dk)


def _self_attention_forward(x, w_qkv, w_o, H, bias, key_mask, causal, p_attn, rng, kv_cache=None, layer=0):
    """T5 self-attention: q, k, v = x w_qkv; softmax(q k^T + bias + mask) v; then w_o.
    x: (B, T, C), bias (1, H, T, Tk), key_mask (B, 1, 1, Tk) or None -> y: (B, T, C), AttentionCache"""
    B, T, C = x.shape
    Dk = w_qkv.shape[1] // (3 * H)
    qkv, q_proj = linear_forward(x, w_qkv)                                   # (B, T, 3 H Dk)
    heads = _split_heads(qkv.reshape(B * T, 3 * H * Dk), B, T, 3 * H, Dk)     # (B, 3H, T, Dk)
    q, k, v = heads[:, :H], heads[:, H:2 * H], heads[:, 2 * H:]
    if kv_cache is not None:
        k, v = kv_cache.append(layer, k, v)                                  # (B, H, Tk, Dk)
    heads_y, attn = sdpa_forward(q, k, v, mask=key_mask, causal=causal, scale=1.0, bias=bias,
                                 dropout_p=p_attn, rng=rng if p_attn else None)   # (B, H, T, Dk)
    y, out_proj = linear_forward(_join_heads(heads_y), w_o)                  # (B T, C)
    return y.reshape(B, T, C), AttentionCache(q_proj, None, out_proj, attn, (B, T, H, Dk))


def _self_attention_backward(dy, cache: AttentionCache):
    """-> dx (B, T, C), dw_qkv, dw_o, dbias (1, H, T, T)"""
    B, T, H, Dk = cache.dims
    dheads2d, dw_o, _ = linear_backward(dy.reshape(B * T, -1), cache.out_proj)
    dq, dk, dv, dbias = sdpa_backward(_split_heads(dheads2d, B, T, H, Dk), cache.attn)
    dqkv = _join_heads(dq, dk, dv).reshape(B, T, 3 * H * Dk)
    dx, dw_qkv, _ = linear_backward(dqkv, cache.q_proj)
    return dx, dw_qkv, dw_o, dbias


def _cross_kv(context, w_kv, H):
    """Keys and values of the encoder output, once: context (B, S, C) -> k, v (B, H, S, Dk), cache"""
    B, S, C = context.shape
    Dk = w_kv.shape[1] // (2 * H)
    kv, kv_proj = linear_forward(context, w_kv)                              # (B, S, 2 H Dk)
    heads = _split_heads(kv.reshape(B * S, 2 * H * Dk), B, S, 2 * H, Dk)      # (B, 2H, S, Dk)
    return heads[:, :H], heads[:, H:], kv_proj


def _cross_attention_forward(x, context, w_q, w_kv, w_o, H, mask, p_attn, rng, kv=None):
    """Queries from the decoder, keys and values from the encoder output, no causal mask and
    no position bias (T5's cross-attention bias is zero). kv: the (k, v) of _cross_kv,
    already computed (generation); else they are made from ``context`` here.
    x: (B, T, C), context (B, S, C) -> y (B, T, C), AttentionCache"""
    B, T, C = x.shape
    Dk = w_q.shape[1] // H
    q2d, q_proj = linear_forward(x, w_q)                                     # (B, T, H Dk)
    q = _split_heads(q2d.reshape(B * T, H * Dk), B, T, H, Dk)                # (B, H, T, Dk)
    kv_proj = None
    if kv is None:
        k, v, kv_proj = _cross_kv(context, w_kv, H)
    else:
        k, v = kv
    heads_y, attn = sdpa_forward(q, k, v, mask=mask, scale=1.0, dropout_p=p_attn,
                                 rng=rng if p_attn else None)                # (B, H, T, Dk)
    y, out_proj = linear_forward(_join_heads(heads_y), w_o)                  # (B T, C)
    return y.reshape(B, T, C), AttentionCache(q_proj, kv_proj, out_proj, attn, (B, T, H, Dk))


def _cross_attention_backward(dy, cache: AttentionCache):
    """-> dx (B, T, C), dcontext (B, S, C), dw_q, dw_kv, dw_o"""
    B, T, H, Dk = cache.dims
    dheads2d, dw_o, _ = linear_backward(dy.reshape(B * T, -1), cache.out_proj)
    dq, dk, dv = sdpa_backward(_split_heads(dheads2d, B, T, H, Dk), cache.attn)
    dx, dw_q, _ = linear_backward(_join_heads(dq).reshape(B, T, H * Dk), cache.q_proj)
    S = dk.shape[2]
    dkv = _join_heads(dk, dv).reshape(B, S, 2 * H * Dk)
    dcontext, dw_kv, _ = linear_backward(dkv, cache.kv_proj)
    return dx, dcontext, dw_q, dw_kv, dw_o


class FFCache(NamedTuple):
    wi: object        # LinearCache of h Wi (or h Wi_0, gated)
    act: object       # ReluCache or GeluCache
    wi_1: object      # LinearCache of h Wi_1 (gated), else None
    gate: tuple       # (g, u): act(h Wi_0) and h Wi_1, for the product's backward; None ungated
    drop: object      # DropoutCache of the hidden layer
    wo: object        # LinearCache of the output projection


def _ff_forward(config, params, prefix, h, p_drop, rng):
    """relu(h Wi) Wo, or (gelu(h Wi_0) * h Wi_1) Wo; dropout on the hidden layer. (B, T, C) -> (B, T, C)"""
    if config.gated:
        z, wi = linear_forward(h, params[prefix + "ff.wi_0"])               # (B, T, F)
        g, act = gelu_forward(z, "tanh")
        u, wi_1 = linear_forward(h, params[prefix + "ff.wi_1"])             # (B, T, F)
        a, gate = g * u, (g, u)
    else:
        z, wi = linear_forward(h, params[prefix + "ff.wi"])
        a, act = relu_forward(z)
        wi_1 = gate = None
    a_drop, drop = dropout_forward(a, p_drop, rng)
    m, wo = linear_forward(a_drop, params[prefix + "ff.wo"])                 # (B, T, C)
    return m, FFCache(wi, act, wi_1, gate, drop, wo)


def _ff_backward(config, dm, cache: FFCache):
    """-> dh, {"ff.*": gradient}"""
    da_drop, dwo, _ = linear_backward(dm, cache.wo)
    da = dropout_backward(da_drop, cache.drop)
    if not config.gated:
        dz = relu_backward(da, cache.act)
        dh, dwi, _ = linear_backward(dz, cache.wi)
        return dh, {"ff.wi": dwi, "ff.wo": dwo}
    g, u = cache.gate
    dg, du = da * u, da * g                                                  # a = g * u
    dh_1, dwi_1, _ = linear_backward(du, cache.wi_1)
    dh_0, dwi_0, _ = linear_backward(gelu_backward(dg, cache.act), cache.wi)
    return dh_0 + dh_1, {"ff.wi_0": dwi_0, "ff.wi_1": dwi_1, "ff.wo": dwo}


# ---------------------------------------------------------------------------
# Blocks and stacks
# ---------------------------------------------------------------------------

class BlockCache(NamedTuple):
    ln_attn: object
    attn: object
    drop_attn: object
    ln_cross: object      # decoder only, else None (and the next two)
    cross: object
    drop_cross: object
    ln_ff: object
    ff: object
    drop_ff: object


def _block_forward(params, config, prefix, x, bias, key_mask, ctx, p, rng, kv_cache, layer):
    """One pre-norm T5 block: the encoder's (ctx None: bidirectional, no cross-attention) or
    the decoder's (ctx = (e, enc_mask, this layer's cross K/V or None): causal).
    x: (B, T, C) -> y: (B, T, C), BlockCache"""
    H, eps = config.num_heads, config.layer_norm_epsilon
    h1, ln_attn = rmsnorm_forward(x, params[prefix + "ln_attn.weight"], eps)   # 1. h1 = norm_attn(x)
    a, attn = _self_attention_forward(h1, params[prefix + "attn.w_qkv"],       # 2. a = self_attn(h1)
                                      params[prefix + "attn.w_o"], H, bias, key_mask, ctx is not None,
                                      p, rng, kv_cache, layer)
    a_drop, drop_attn = dropout_forward(a, p, rng)
    x1 = x + a_drop                                                           # 3. x1 = x + dropout(a)
    ln_cross = cross = drop_cross = None
    if ctx is not None:
        e, enc_mask, kv = ctx
        h2, ln_cross = rmsnorm_forward(x1, params[prefix + "ln_cross.weight"], eps)   # 4. h2 = norm_cross(x1)
        c, cross = _cross_attention_forward(h2, e, params[prefix + "cross.w_q"],       # 5. c = cross(h2, e)
                                            params[prefix + "cross.w_kv"], params[prefix + "cross.w_o"],
                                            H, enc_mask, p, rng, kv)
        c_drop, drop_cross = dropout_forward(c, p, rng)
        x2 = x1 + c_drop                                                      # 6. x2 = x1 + dropout(c)
    else:
        x2 = x1
    h3, ln_ff = rmsnorm_forward(x2, params[prefix + "ln_ff.weight"], eps)      # 7. h3 = norm_ff(x2)
    m, ff = _ff_forward(config, params, prefix, h3, p, rng)                   # 8. m = ff(h3)
    m_drop, drop_ff = dropout_forward(m, p, rng)
    y = x2 + m_drop                                                           # 9. y = x2 + dropout(m)
    return y, BlockCache(ln_attn, attn, drop_attn, ln_cross, cross, drop_cross, ln_ff, ff, drop_ff)


def _block_backward(config, dy, cache: BlockCache):
    """-> dx, dcontext (None in the encoder), dbias, {name inside the block: gradient}"""
    grads = {}
    # forward step 9: y = x2 + dropout(m). A sum passes dy to both terms.
    dm = dropout_backward(dy, cache.drop_ff)
    # forward step 8: m = ff(h3)
    dh3, ff_grads = _ff_backward(config, dm, cache.ff)
    grads.update(ff_grads)
    # forward step 7: h3 = norm_ff(x2). x2 gets this path's gradient plus the residual's
    dx2_norm, grads["ln_ff.weight"] = rmsnorm_backward(dh3, cache.ln_ff)
    dx2 = dy + dx2_norm
    dcontext = None
    if cache.cross is not None:
        # forward step 6: x2 = x1 + dropout(c)
        dc = dropout_backward(dx2, cache.drop_cross)
        # forward step 5: c = cross(h2, e): a gradient for the encoder output too
        dh2, dcontext, grads["cross.w_q"], grads["cross.w_kv"], grads["cross.w_o"] = \
            _cross_attention_backward(dc, cache.cross)
        # forward step 4: h2 = norm_cross(x1)
        dx1_norm, grads["ln_cross.weight"] = rmsnorm_backward(dh2, cache.ln_cross)
        dx1 = dx2 + dx1_norm
    else:
        dx1 = dx2
    # forward step 3: x1 = x + dropout(a)
    da = dropout_backward(dx1, cache.drop_attn)
    # forward step 2: a = self_attn(h1, bias)
    dh1, grads["attn.w_qkv"], grads["attn.w_o"], dbias = _self_attention_backward(da, cache.attn)
    # forward step 1: h1 = norm_attn(x)
    dx_norm, grads["ln_attn.weight"] = rmsnorm_backward(dh1, cache.ln_attn)
    return dx1 + dx_norm, dcontext, dbias, grads


class StackCache(NamedTuple):
    stack: str            # "encoder" or "decoder"
    tok: object           # EmbeddingCache of shared (step 1)
    drop_emb: object      # step 2
    bias: object          # EmbeddingCache of the relative bias lookup (step 3)
    blocks: list          # step 4
    ln_f: object          # step 5
    drop_f: object        # step 6


def _stack_forward(params, config, stack, ids, key_mask, ctx, p, rng, kv_cache=None):
    """The encoder (ctx None) or the decoder (ctx = (e, enc_mask, cross K/V per layer or None)).
    ids (B, T), key_mask (B, 1, 1, Tk) or None -> xf (B, T, C), StackCache"""
    causal = stack == "decoder"
    n_layers = config.n_decoder_layers if causal else config.num_layers
    offset = kv_cache.length(0) if kv_cache is not None else 0
    T = ids.shape[1]
    x, tok = embedding_forward(ids, params["shared"])                         # 1. x = shared[ids]
    x, drop_emb = dropout_forward(x, p, rng)                                  # 2. x = dropout(x)
    buckets = array_module(ids).asarray(_position_buckets(config, T, offset + T, not causal, offset))
    bias, bias_lookup = _position_bias_forward(params[f"{stack}.rel_bias"], buckets)   # 3. (1, H, T, Tk)
    blocks = []
    for i in range(n_layers):                                                 # 4. x = block(x)
        kv_i = None if ctx is None or ctx[2] is None else ctx[2][i]
        ctx_i = None if ctx is None else (ctx[0], ctx[1], kv_i)
        x, block = _block_forward(params, config, f"{stack}.{i}.", x, bias, key_mask, ctx_i, p, rng,
                                  kv_cache, i)
        blocks.append(block)
    xf, ln_f = rmsnorm_forward(x, params[f"{stack}.ln_f.weight"], config.layer_norm_epsilon)   # 5.
    xf, drop_f = dropout_forward(xf, p, rng)                                  # 6. xf = dropout(xf)
    return xf, StackCache(stack, tok, drop_emb, bias_lookup, blocks, ln_f, drop_f)


def _stack_backward(config, dxf, cache: StackCache):
    """-> dshared (from this stack's input), dcontext (decoder: the sum over its blocks'
    cross-attention; encoder: None), {name: gradient}"""
    stack, grads = cache.stack, {}
    # forward step 6: xf = dropout(xf)
    dxf = dropout_backward(dxf, cache.drop_f)
    # forward step 5: xf = norm_f(x)
    dx, grads[f"{stack}.ln_f.weight"] = rmsnorm_backward(dxf, cache.ln_f)
    # forward step 4: the blocks, from the last down. The bias and the context were shared
    dbias_total, dcontext = None, None
    for i in reversed(range(len(cache.blocks))):
        dx, dctx, dbias, block_grads = _block_backward(config, dx, cache.blocks[i])
        grads.update({f"{stack}.{i}.{k}": g for k, g in block_grads.items()})
        dbias_total = dbias if dbias_total is None else dbias_total + dbias
        if dctx is not None:
            dcontext = dctx if dcontext is None else dcontext + dctx
    # forward step 3: bias = rel_bias[buckets]
    grads[f"{stack}.rel_bias"] = _position_bias_backward(dbias_total, cache.bias)
    # forward step 2: x = dropout(x)
    dx = dropout_backward(dx, cache.drop_emb)
    # forward step 1: x = shared[ids]
    return embedding_backward(dx, cache.tok), dcontext, grads


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------

class T5Cache(NamedTuple):
    config: T5Config
    encoder: StackCache     # step 1
    decoder: StackCache     # step 2
    h: object               # (B, T, C) the decoder's output
    scale: float            # step 3: C^-0.5 with the tied head, else 1
    hs: object              # (B, T, C) the head's input
    head: object            # (V, C) shared or lm_head (step 4)


def _key_mask(mask):
    """(B, T) 0/1 or bool -> (B, 1, 1, T) bool, or None when absent."""
    return None if mask is None else (mask != 0)[:, None, None, :]


def forward(params, config: T5Config, input_ids, decoder_input_ids, attention_mask=None,
            decoder_attention_mask=None, train=False, rng=None):
    """logits = T5(input_ids, decoder_input_ids): at decoder position t, the scores of the
    token after decoder_input_ids[:, :t+1], given the whole source.

    input_ids (B, S), decoder_input_ids (B, T): ids in [0, V). attention_mask (B, S) and
    decoder_attention_mask (B, T): 1/True for real tokens, 0/False for padding (default:
    all real); a padded key gets no attention, so padding never changes a real token's
    output. train: dropout at rate dropout_rate (needs ``rng``).
    -> logits (B, T, V) in the params' dtype, cache (for :func:`backward`)
    """
    _check_inputs(params, config, input_ids, decoder_input_ids, attention_mask, decoder_attention_mask,
                  train, rng)
    p = float(config.dropout_rate) if train else 0.0
    enc_mask = _key_mask(attention_mask)
    e, enc = _stack_forward(params, config, "encoder", input_ids, enc_mask,   # 1. e = encoder(input_ids)
                            None, p, rng)
    h, dec = _stack_forward(params, config, "decoder", decoder_input_ids,     # 2. h = decoder(ids, e)
                            _key_mask(decoder_attention_mask), (e, enc_mask, None), p, rng)
    scale = config.d_model ** -0.5 if config.tie_word_embeddings else 1.0
    hs = h * h.dtype.type(scale) if config.tie_word_embeddings else h         # 3. hs = h * C^-0.5
    head = params["shared"] if config.tie_word_embeddings else params["lm_head"]
    B, T, C = h.shape
    logits = (hs.reshape(B * T, C) @ head.T).reshape(B, T, config.vocab_size)   # 4. logits = hs head^T
    return logits, T5Cache(config, enc, dec, h, scale, hs, head)


# ---------------------------------------------------------------------------
# Backward: the forward's steps, from the last to the first
# ---------------------------------------------------------------------------

def backward(dlogits, cache: T5Cache) -> dict:
    """dL/dparams from dL/dlogits (B, T, V) -> grads with the keys and shapes of params.
    The decoder first, then cross-attention's gradient into the encoder output, then the
    encoder."""
    _check_backward(dlogits, cache)
    config, hs, head = cache.config, cache.hs, cache.head
    B, T, C = hs.shape
    # forward step 4: logits = hs @ head^T. So dhs = dlogits @ head, dhead = dlogits^T hs
    dlogits_2d = dlogits.reshape(B * T, config.vocab_size)                   # (B T, V)
    dhead = dlogits_2d.T @ hs.reshape(B * T, C)                              # (V, C)
    dhs = (dlogits_2d @ head).reshape(B, T, C)                               # (B, T, C)
    # forward step 3: hs = h * scale
    dh = dhs * dhs.dtype.type(cache.scale) if config.tie_word_embeddings else dhs
    # forward step 2: h = decoder(decoder_input_ids, e): also dL/de, summed over its blocks
    dshared_dec, de, grads = _stack_backward(config, dh, cache.decoder)
    # forward step 1: e = encoder(input_ids), fed the cross-attention gradient
    dshared_enc, _, enc_grads = _stack_backward(config, de, cache.encoder)
    grads.update(enc_grads)
    # the shared table fed the encoder, the decoder and (tied) the head: its gradients add
    if config.tie_word_embeddings:
        grads["shared"] = dshared_enc + dshared_dec + dhead
    else:
        grads["shared"], grads["lm_head"] = dshared_enc + dshared_dec, dhead
    return {name: grads[name] for name in _param_shapes(config)}


def shift_right(labels, decoder_start_token_id, pad_token_id):
    """The decoder's input for a target: [start, labels[0], ..., labels[T-2]], -100 -> pad.

    >>> shift_right(np.array([[5, 6, 1, -100]]), 0, 0).tolist()
    [[0, 5, 6, 1]]
    """
    check_int("labels", labels)
    xp = array_module(labels)
    shifted = xp.concatenate([xp.full_like(labels[:, :1], decoder_start_token_id), labels[:, :-1]], axis=1)
    return xp.where(shifted == IGNORE_INDEX, pad_token_id, shifted)


def loss_and_grads(params, config: T5Config, input_ids, labels, attention_mask=None, train=False, rng=None):
    """Mean cross-entropy of the labels under teacher forcing, and its gradient.

    labels (B, T): the target ids, -100 where a position should not count. The decoder
    reads them shifted right (:func:`shift_right`), as Hugging Face's T5 does with ``labels``.
    -> (loss: float, grads: {name: array} keyed like params)
    """
    _check_labels(labels, config)
    decoder_input_ids = shift_right(labels, config.decoder_start_token_id, config.pad_token_id)
    logits, cache = forward(params, config, input_ids, decoder_input_ids, attention_mask, train=train, rng=rng)
    loss_value, ce = softmax_cross_entropy_forward(logits, labels, ignore_index=IGNORE_INDEX)
    dlogits = softmax_cross_entropy_backward(logits.dtype.type(1.0), ce)
    return float(loss_value), backward(dlogits, cache)


def loss(params, config: T5Config, input_ids, labels, attention_mask=None) -> float:
    """The mean cross-entropy of the labels, no dropout, no gradient (evaluation)."""
    _check_labels(labels, config)
    decoder_input_ids = shift_right(labels, config.decoder_start_token_id, config.pad_token_id)
    logits, _ = forward(params, config, input_ids, decoder_input_ids, attention_mask)
    value, _ = softmax_cross_entropy_forward(logits, labels, ignore_index=IGNORE_INDEX)
    return float(value)


# ---------------------------------------------------------------------------
# Generation: the encoder once, the cross K/V once, the self-attention KV cache
# ---------------------------------------------------------------------------

class T5Decoder:
    """A T5 with its source already read, behind minillm.sampling's decoder protocol
    (vocab_size, block_size, new_cache, logits), so sampling.generate's loop, processors
    and stop rules drive it. The "prompt" is the decoder's start token.

    On construction the encoder runs once, and (use_cache) each decoder layer's
    cross-attention keys and values of its output are computed once. ``logits`` with a
    KVCache feeds only the new decoder tokens; without one it re-runs the decoder over the
    whole prefix and, when the cross K/V are not cached, recomputes them too. Its batch
    rows are the sources' (fixed): sampling.generate drives it, beam search (which reorders
    cache rows) does not.
    """

    block_size = 2 ** 31 - 1       # relative positions: no longest context

    def __init__(self, params, config: T5Config, input_ids, attention_mask=None, cache_cross=True):
        _check_inputs(params, config, input_ids, input_ids[:, :1], attention_mask, None, False, None)
        self.params, self.config = params, config
        self.vocab_size = config.vocab_size
        self.xp = array_module(params["shared"])
        self.enc_mask = _key_mask(attention_mask)
        self.e, _ = _stack_forward(params, config, "encoder", input_ids, self.enc_mask, None, 0.0, None)
        self.cross_kv = None
        if cache_cross:
            self.cross_kv = [_cross_kv(self.e, params[f"decoder.{i}.cross.w_kv"], config.num_heads)[:2]
                             for i in range(config.n_decoder_layers)]

    def new_cache(self, batch_size, max_len):
        c = self.config
        return KVCache(c.n_decoder_layers, batch_size, c.num_heads, int(max_len), c.d_kv,
                       dtype=self.params["shared"].dtype, xp=self.xp)

    def logits(self, ids, cache=None, attention_mask=None):
        ids = self.xp.asarray(ids)
        _check_ids_in_range("decoder_input_ids", ids, self.config.vocab_size)
        ctx = (self.e, self.enc_mask, self.cross_kv)
        h, _ = _stack_forward(self.params, self.config, "decoder", ids, None, ctx, 0.0, None, cache)
        c = self.config
        hs = h * h.dtype.type(c.d_model ** -0.5) if c.tie_word_embeddings else h
        head = self.params["shared"] if c.tie_word_embeddings else self.params["lm_head"]
        return hs @ head.T                                                    # (B, T, V)


def generate(params, config: T5Config, input_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
             attention_mask=None, use_cache=True, eos_id="config", seed=None, **kwargs):
    """Decode a target for each source: greedy at temperature 0, else sampled.

    input_ids: (B, S) int array (with attention_mask for padded sources), a list of
    lists of equal length, or one list. The encoder runs once; with use_cache, each
    decoder layer's cross-attention K/V are made once and the self-attention keys and
    values go into a KVCache, so each step feeds one token; use_cache=False re-runs the
    decoder and its cross K/V over the whole prefix every step (the same tokens, slower).
    The loop is :func:`minillm.sampling.generate` (its processors apply: min_p,
    repetition/frequency/presence penalties, stop, rng); eos_id defaults to the config's.
    -> per source, the list of generated ids (decoder start left out, eos kept when
    reached); one list for a 1-D input.
    """
    ids, flat = _as_source(input_ids, params)
    if eos_id == "config":
        eos_id = config.eos_token_id
    decoder = T5Decoder(params, config, ids, attention_mask, cache_cross=use_cache)
    prompts = [[config.decoder_start_token_id] for _ in range(ids.shape[0])]
    out = _sampling_generate(decoder, prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, use_cache=use_cache, eos_id=eos_id, seed=seed, **kwargs)
    out = [row[1:] for row in out]
    return out[0] if flat else out


def _as_source(input_ids, params):
    xp = array_module(params["shared"])
    _check_source(input_ids)
    flat = isinstance(input_ids, (list, tuple)) and len(input_ids) > 0 and is_int(input_ids[0])
    flat = flat or (hasattr(input_ids, "ndim") and input_ids.ndim == 1)
    ids = xp.asarray(input_ids)
    if flat:
        ids = ids[None]
    return ids, flat


# ---------------------------------------------------------------------------
# Span corruption: T5's pretraining objective
# ---------------------------------------------------------------------------

def _random_segmentation(n_items, n_segments, rng):
    """Lengths of n_segments non-empty pieces that add up to n_items, uniformly at random."""
    cuts = np.sort(rng.choice(np.arange(1, n_items), size=n_segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [n_items]]))


def span_corruption(ids, noise_density=0.15, mean_span_length=3.0, sentinel_start=None, rng=None):
    """T5's objective: drop random spans of ``ids``, put a sentinel where each span was, and
    ask for the spans back.

    About noise_density of the tokens are dropped, in round(n_noise / mean_span_length)
    spans; the sequence alternates kept and dropped pieces, starting with a kept one (the
    piece lengths are random partitions, as in T5's random_spans_noise_mask). Sentinel k
    (k = 0, 1, ...) has id sentinel_start - k, counting down like T5's <extra_id_k>
    (vocab_size - 1 - k). ids: 1-D ints (a list or array), at least 2 of them.
    -> (inputs, targets), int64 arrays:
        inputs  = kept_0 s_0 kept_1 s_1 ... kept_{n-1} s_{n-1}
        targets = s_0 dropped_0 s_1 dropped_1 ... s_{n-1} dropped_{n-1}

    >>> span_corruption([10, 11, 12, 13, 14, 15, 16, 17], 0.25, 2.0, sentinel_start=99, rng=0)[0].size < 8
    True
    """
    ids, rng = _check_span_corruption(ids, noise_density, mean_span_length, sentinel_start, rng)
    L = ids.size
    n_noise = min(max(int(round(L * noise_density)), 1), L - 1)
    n_spans = min(max(int(round(n_noise / mean_span_length)), 1), n_noise, L - n_noise)
    noise_lengths = _random_segmentation(n_noise, n_spans, rng)              # (n_spans,)
    kept_lengths = _random_segmentation(L - n_noise, n_spans, rng)           # (n_spans,)
    inputs, targets, start = [], [], 0
    for k in range(n_spans):
        sentinel = sentinel_start - k
        kept = ids[start:start + kept_lengths[k]]
        dropped = ids[start + kept_lengths[k]:start + kept_lengths[k] + noise_lengths[k]]
        start += kept_lengths[k] + noise_lengths[k]
        inputs += [kept, [sentinel]]
        targets += [[sentinel], dropped]
    return (np.concatenate(inputs).astype(np.int64), np.concatenate(targets).astype(np.int64))


def span_corruption_reconstruct(inputs, targets, sentinel_start):
    """The sequence that span_corruption's (inputs, targets) came from: the k-th sentinel
    (id sentinel_start - k) in the inputs replaced by what follows it in the targets.
    Sentinels are read in order, so only ids reserved for them must never be ordinary ids."""
    inputs, targets = [int(t) for t in inputs], [int(t) for t in targets]
    spans, k = [], 0
    for t in targets:
        if t == sentinel_start - k:                 # the next sentinel opens the next span
            spans.append([])
            k += 1
        elif spans:
            spans[-1].append(t)
    out, k = [], 0
    for t in inputs:
        if k < len(spans) and t == sentinel_start - k:
            out += spans[k]
            k += 1
        else:
            out.append(t)
    return out


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------

def _check_ids_in_range(name, ids, vocab_size):
    check_int(name, ids)
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"{name}: expected shape (B, T) with B, T >= 1, got {tuple(ids.shape)}")
    check_ids(name, ids, vocab_size)


def _check_mask(name, mask, ids, ids_name):
    check_array(name, mask)
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"{name}: expected shape {tuple(ids.shape)} (that of {ids_name}), "
                         f"got {tuple(mask.shape)}")
    xp = array_module(mask)
    if mask.dtype != bool and not bool(xp.all((mask == 0) | (mask == 1))):
        raise ValueError(f"{name}: expected 1 (a real token) or 0 (padding) everywhere, got other values")
    if name == "attention_mask" and bool(xp.any(~xp.any(mask != 0, axis=1))):
        raise ValueError(f"{name}: a source of nothing but padding; every source needs a real token")


def _check_inputs(params, config, input_ids, decoder_input_ids, attention_mask, decoder_attention_mask,
                  train, rng):
    """All of forward's checks, before any math: config, params, both id arrays (shape,
    range: a negative id would wrap around), device, the masks' shapes and values, and a
    generator for dropout."""
    _check_config(config)
    _check_params(params, config)
    _check_ids_in_range("input_ids", input_ids, config.vocab_size)
    _check_ids_in_range("decoder_input_ids", decoder_input_ids, config.vocab_size)
    check_same_device("input_ids", input_ids, params["shared"], "the params")
    check_same_device("decoder_input_ids", decoder_input_ids, params["shared"], "the params")
    if decoder_input_ids.shape[0] != input_ids.shape[0]:
        raise ValueError(f"decoder_input_ids: expected batch size {input_ids.shape[0]} (that of "
                         f"input_ids), got shape {tuple(decoder_input_ids.shape)}")
    if attention_mask is not None:
        _check_mask("attention_mask", attention_mask, input_ids, "input_ids")
    if decoder_attention_mask is not None:
        _check_mask("decoder_attention_mask", decoder_attention_mask, decoder_input_ids, "decoder_input_ids")
    if train and config.dropout_rate > 0 and rng is None:
        raise TypeError("rng: expected a random Generator when train=True and dropout_rate > 0, got None")


def _check_source(input_ids):
    if isinstance(input_ids, (list, tuple)):
        if len(input_ids) == 0:
            raise ValueError("input_ids: expected at least one source, got an empty list")
        if isinstance(input_ids[0], (list, tuple)) and len({len(r) for r in input_ids}) > 1:
            raise ValueError(f"input_ids: sources of different lengths {sorted({len(r) for r in input_ids})}; "
                             f"pad them to one length and pass attention_mask (0 at the padding)")


def _check_labels(labels, config):
    check_int("labels", labels)
    if labels.ndim != 2 or labels.shape[1] < 1:
        raise ValueError(f"labels: expected shape (B, T) with T >= 1, got {tuple(labels.shape)}")
    xp = array_module(labels)
    ok = (labels == IGNORE_INDEX) | ((labels >= 0) & (labels < config.vocab_size))
    if not bool(xp.all(ok)):
        bad = int(to_numpy(labels)[~to_numpy(ok)][0])
        raise ValueError(f"labels: expected ids in [0, {config.vocab_size}) or -100 (ignored), got {bad}")


def _check_backward(dlogits, cache):
    if not isinstance(cache, T5Cache):
        raise TypeError(f"cache: expected the T5Cache that forward returned, got {type(cache).__name__}")
    check_float("dlogits", dlogits)
    B, T, _ = cache.hs.shape
    want = (B, T, cache.config.vocab_size)
    if tuple(dlogits.shape) != want:
        raise ValueError(f"dlogits: expected shape {want} (the logits'), got {tuple(dlogits.shape)}")


def _check_relative_position_bucket(relative_position, num_buckets, max_distance):
    check_int("relative_position", np.asarray(to_numpy(relative_position)))
    check_int_arg("num_buckets", num_buckets, lo=4)
    check_int_arg("max_distance", max_distance, lo=1)
    if max_distance <= num_buckets // 4:
        raise ValueError(f"max_distance: expected more than num_buckets // 4 = {num_buckets // 4} (the "
                         f"exact buckets), got {max_distance}")


def _check_span_corruption(ids, noise_density, mean_span_length, sentinel_start, rng):
    arr = np.asarray(to_numpy(ids) if hasattr(ids, "dtype") else ids)
    if arr.ndim != 1 or arr.size < 2 or arr.dtype.kind not in "iu":
        raise ValueError(f"ids: expected a 1-D sequence of at least 2 integer ids, got "
                         f"{arr.dtype} of shape {arr.shape}")
    check_number("noise_density", noise_density, lo=0, hi=1, lo_open=True, hi_open=True)
    check_number("mean_span_length", mean_span_length, lo=1)
    if sentinel_start is None:
        raise TypeError("sentinel_start: expected the id of the first sentinel (T5: vocab_size - 1), got None")
    check_int_arg("sentinel_start", sentinel_start, lo=0)
    if rng is None or is_int(rng):
        rng = make_rng(0 if rng is None else rng)
    elif not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected a numpy Generator or an int seed, got {type(rng).__name__}")
    return arr, rng
