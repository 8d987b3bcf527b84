"""BERT: an encoder-only transformer, its masked-language-model and classification
heads, every backward written out by hand.

Where GPT reads left to right (a causal mask), BERT reads the whole sequence at
once: every token attends to every other real token, and only padding is hidden
(a key padding mask). It is pretrained by masked language modelling (MLM): hide
15% of the tokens and predict them from both sides. A fine-tuned classifier reads
the hidden state of the first token, [CLS], through a small "pooler".

The forward pass, for input_ids (B, T):

    x = LayerNorm(word[ids] + position[0..T-1] + token_type[types])      embeddings
    for each layer (post-LN, as in the original BERT):
        x = LayerNorm(x + Dropout(SelfAttention(x, key padding mask)))
        x = LayerNorm(x + Dropout(W2 GELU(W1 x + b1) + b2))
    hidden = x                                                              (B, T, C)

    MLM head:            logits = LayerNorm(GELU(hidden W + b)) word^T + bias   (decoder tied to the embeddings)
    pooler + classifier: logits = Dropout(tanh(hidden[:, 0] Wp + bp)) Wc + bc

"Post-LN" means the LayerNorm comes after the residual addition (GPT-2 and most
modern models put it before: pre-LN). Hugging Face checkpoints of BERT load with
``minillm.checkpoint.load_hf`` (see the BERT section of checkpoint.py).

Parameters are one flat dict (names below); ``backward`` and the ``*_loss_and_grads``
functions return gradients with the same keys.

    embeddings.word (V, C)  embeddings.position (block_size, C)  embeddings.token_type (S, C)
    embeddings.ln.weight/bias (C,)
    h.{i}.attn.w_qkv (C, 3C) [q | k | v]   h.{i}.attn.b_qkv (3C,)   h.{i}.attn.w_o (C, C)   h.{i}.attn.b_o (C,)
    h.{i}.ln_1.weight/bias (C,)            (after attention)
    h.{i}.mlp.w1 (C, I)  h.{i}.mlp.b1 (I,)  h.{i}.mlp.w2 (I, C)  h.{i}.mlp.b2 (C,)
    h.{i}.ln_2.weight/bias (C,)            (after the MLP)
    pooler.w (C, C)  pooler.b (C,)                                   (optional head)
    mlm.dense.w (C, C)  mlm.dense.b (C,)  mlm.ln.weight/bias (C,)  mlm.bias (V,)   (optional head)
    classifier.w (C, L)  classifier.b (L,)                           (optional head)
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .attention import self_attention_backward, self_attention_forward
from .backend import (DEFAULT_DTYPE, array_module, check_array, check_choice, check_float, check_ids,
                      check_int, check_int_arg, check_ndim, check_positive, check_probability, check_shape,
                      make_rng, randn, scatter_add, to_device, to_numpy)
from .backprop import (dropout_backward, dropout_forward, softmax_cross_entropy_backward,
                       softmax_cross_entropy_forward)
from .embeddings import (embedding_backward, embedding_forward, segment_embedding_backward,
                         segment_embedding_forward)
from .ffn import ACTIVATIONS, linear_backward, linear_forward, mlp_backward, mlp_forward
from .norm import layernorm_backward, layernorm_forward

IGNORE_INDEX = -100  # label value that the MLM loss skips (PyTorch's and Hugging Face's convention)

# Hugging Face's names for the activation -> the names minillm.ffn uses.
# BERT's "gelu" is the exact one, x * Phi(x) with the error function; ffn's "gelu"
# is GPT-2's tanh approximation.
_ACTIVATIONS = {
    "gelu": "gelu_exact",
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
    "relu": "relu",
}

HEADS = ("pooler", "mlm", "classifier")


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

# BertConfig's field names before it took GPTConfig's spelling of the ideas the two share
# (they were close to Hugging Face's). Callers, walkthroughs and saved runs (the
# model_config of a checkpoint) written before still use them: the constructor,
# replace and from_dict accept them, and reading one gives the field it became.
OLD_FIELD_NAMES = {"hidden_size": "n_embd", "num_layers": "n_layer", "num_heads": "n_head",
                   "intermediate_size": "mlp_hidden", "max_position": "block_size",
                   "layer_norm_eps": "norm_eps", "hidden_dropout": "dropout"}
_OLD_ATTRIBUTE_NAMES = {**OLD_FIELD_NAMES, "head_size": "head_dim"}
_FORMERLY = {new: f"{new}/{old}" for old, new in OLD_FIELD_NAMES.items()}   # how errors name a field


def _respell(fields: dict) -> dict:
    """``fields`` with each old name replaced by its new one; TypeError if both are given."""
    out = {}
    for name, value in fields.items():
        new = OLD_FIELD_NAMES.get(name, name)
        if new != name and new in fields:
            raise TypeError(f"{name}: the old name of {new}, and both were given; give one "
                            f"(dataclasses.replace passes every field: use config.replace)")
        out[new] = value
    return out


def _accepts_old_field_names(cls):
    """Class decorator: cls(...) takes the old field names too (see OLD_FIELD_NAMES)."""
    dataclass_init = cls.__init__

    @functools.wraps(dataclass_init)
    def __init__(self, *args, **kwargs):
        dataclass_init(self, *args, **_respell(kwargs))
    cls.__init__ = __init__
    return cls


@_accepts_old_field_names
@dataclass(frozen=True)
class BertConfig:
    """The shape of a BERT model: GPTConfig's names for what the two share, Hugging Face's in
    parentheses (OLD_FIELD_NAMES lists the names these fields had, still accepted).

    vocab_size          number of WordPiece tokens (vocab_size)
    n_embd              C, the width of the residual stream (hidden_size)
    n_layer             encoder blocks (num_hidden_layers)
    n_head              attention heads; n_embd must divide by it (num_attention_heads)
    mlp_hidden          the MLP's inner width, usually 4C (intermediate_size)
    block_size          longest sequence: rows of the learned position table (max_position_embeddings)
    type_vocab_size     segment ids: 2 for sentence A / sentence B (type_vocab_size)
    norm_eps            the LayerNorms' epsilon; BERT uses 1e-12 (layer_norm_eps)
    dropout             on the embeddings, each sublayer's output and the pooled [CLS] (hidden_dropout_prob)
    attention_dropout   on the attention probabilities (attention_probs_dropout_prob); GPTConfig's
                        one dropout covers both
    initializer_range   std of the normal initialisation (initializer_range)
    hidden_act          "gelu" (exact, erf), "gelu_new" (tanh approximation) or "relu" (hidden_act)
    pad_token_id        the [PAD] id; its word-embedding row starts at zero (pad_token_id)
    num_labels          classes of the classification head (num_labels)
    """
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    mlp_hidden: int
    block_size: int
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    num_labels: int = 2

    def __post_init__(self):
        for name in ("vocab_size", "n_embd", "n_layer", "n_head", "mlp_hidden", "block_size",
                     "type_vocab_size", "num_labels"):
            check_int_arg(_FORMERLY.get(name, name), getattr(self, name), lo=1)
        if self.n_embd % self.n_head:
            raise ValueError(f"{_FORMERLY['n_head']}: expected a divisor of n_embd={self.n_embd}, "
                             f"got {self.n_head}")
        check_choice("hidden_act", self.hidden_act, sorted(_ACTIVATIONS))
        check_probability(_FORMERLY["dropout"], self.dropout)
        check_probability("attention_dropout", self.attention_dropout)
        check_positive(_FORMERLY["norm_eps"], self.norm_eps)
        check_int_arg("pad_token_id", self.pad_token_id, 0, self.vocab_size)

    def __getattr__(self, name):
        # Only reached when ordinary lookup fails: an old field name reads the new field.
        if name in _OLD_ATTRIBUTE_NAMES:
            return getattr(self, _OLD_ATTRIBUTE_NAMES[name])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def replace(self, **changes) -> "BertConfig":
        return dataclasses.replace(self, **_respell(changes))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        """From to_dict()'s dict, or the dict of a run saved under the old field names."""
        d = _respell(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown BertConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_hf(self) -> dict:
        """A Hugging Face config.json dict (model_type "bert")."""
        return {
            "model_type": "bert", "architectures": ["BertForMaskedLM"],
            "vocab_size": self.vocab_size, "hidden_size": self.n_embd,
            "num_hidden_layers": self.n_layer, "num_attention_heads": self.n_head,
            "intermediate_size": self.mlp_hidden, "max_position_embeddings": self.block_size,
            "type_vocab_size": self.type_vocab_size, "layer_norm_eps": self.norm_eps,
            "hidden_dropout_prob": self.dropout, "attention_probs_dropout_prob": self.attention_dropout,
            "initializer_range": self.initializer_range, "hidden_act": self.hidden_act,
            "pad_token_id": self.pad_token_id, "num_labels": self.num_labels,
            "position_embedding_type": "absolute",
        }

    @classmethod
    def from_hf(cls, d: dict) -> "BertConfig":
        """From a Hugging Face config.json dict. Only absolute position embeddings exist here."""
        if d.get("model_type", "bert") != "bert":
            raise ValueError(f"config: expected model_type 'bert', got {d.get('model_type')!r}")
        pet = d.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise ValueError(f"config: expected position_embedding_type 'absolute', got {pet!r}")
        num_labels = d.get("num_labels", len(d.get("id2label", {}) or {}) or 2)
        return cls(vocab_size=d["vocab_size"], n_embd=d["hidden_size"],
                   n_layer=d["num_hidden_layers"], n_head=d["num_attention_heads"],
                   mlp_hidden=d["intermediate_size"], block_size=d["max_position_embeddings"],
                   type_vocab_size=d.get("type_vocab_size", 2), norm_eps=d.get("layer_norm_eps", 1e-12),
                   dropout=d.get("hidden_dropout_prob", 0.1),
                   attention_dropout=d.get("attention_probs_dropout_prob", 0.1),
                   initializer_range=d.get("initializer_range", 0.02), hidden_act=d.get("hidden_act", "gelu"),
                   pad_token_id=d.get("pad_token_id", 0) or 0, num_labels=num_labels)


# ---------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------

def param_shapes(config: BertConfig, heads=HEADS) -> dict:
    """{name: shape} for the encoder plus the chosen heads (a subset of HEADS)."""
    heads = tuple(heads)
    unknown = set(heads) - set(HEADS)
    if unknown:
        raise ValueError(f"heads: expected a subset of {HEADS}, got unknown {sorted(unknown)}")
    return dict(_param_shapes(config, heads))


@functools.lru_cache(maxsize=64)
def _param_shapes(config: BertConfig, heads: tuple) -> dict:
    # Cached per (config, heads): forward checks the params against it on every call.
    # Callers must not change the dict; param_shapes hands out copies.
    C, F, V = config.n_embd, config.mlp_hidden, config.vocab_size
    shapes = {"embeddings.word": (V, C), "embeddings.position": (config.block_size, C),
              "embeddings.token_type": (config.type_vocab_size, C),
              "embeddings.ln.weight": (C,), "embeddings.ln.bias": (C,)}
    for layer in range(config.n_layer):
        prefix = f"h.{layer}."
        shapes.update({prefix + "attn.w_qkv": (C, 3 * C), prefix + "attn.b_qkv": (3 * C,),
                       prefix + "attn.w_o": (C, C), prefix + "attn.b_o": (C,),
                       prefix + "ln_1.weight": (C,), prefix + "ln_1.bias": (C,),
                       prefix + "mlp.w1": (C, F), prefix + "mlp.b1": (F,),
                       prefix + "mlp.w2": (F, C), prefix + "mlp.b2": (C,),
                       prefix + "ln_2.weight": (C,), prefix + "ln_2.bias": (C,)})
    if "pooler" in heads:
        shapes.update({"pooler.w": (C, C), "pooler.b": (C,)})
    if "mlm" in heads:
        shapes.update({"mlm.dense.w": (C, C), "mlm.dense.b": (C,), "mlm.ln.weight": (C,),
                       "mlm.ln.bias": (C,), "mlm.bias": (V,)})
    if "classifier" in heads:
        shapes.update({"classifier.w": (C, config.num_labels), "classifier.b": (config.num_labels,)})
    return shapes


def init_params(config: BertConfig, seed=0, dtype=DEFAULT_DTYPE, device=None, heads=HEADS) -> dict:
    """BERT's initialisation: weights ~ N(0, initializer_range^2), biases 0, LayerNorm 1 and 0,
    the [PAD] row of the word embeddings 0. Drawn on the CPU from ``seed``, then moved to
    ``device`` (default MINILLM_DEVICE), so a seed gives the same model everywhere."""
    rng = make_rng(seed)
    std = config.initializer_range
    params = {}
    for name, shape in param_shapes(config, heads).items():
        if name.endswith(".weight") and ".ln" in name:
            a = np.ones(shape, dtype=dtype)
        elif len(shape) == 1:  # biases, LayerNorm shifts, the MLM output bias
            a = np.zeros(shape, dtype=dtype)
        else:
            a = to_numpy(randn(rng, shape, std=std, dtype=dtype, device="cpu"))
            if name == "embeddings.word":
                a[config.pad_token_id] = 0
        params[name] = to_device(a, device)
    return params


def num_params(params: dict) -> int:
    return int(sum(int(np.prod(p.shape)) for p in params.values()))


def _check_params(params, config, heads=()):
    """params holds the encoder's and the heads' parameters (other entries may sit beside
    them), each an array of its shape, all of embeddings.word's floating dtype. A few
    attribute reads per parameter, no pass over the values."""
    if not isinstance(params, dict):
        raise TypeError(f"params: expected a dict of arrays, got {type(params).__name__}")
    shapes = _param_shapes(config, tuple(heads))
    for name, shape in shapes.items():
        if name not in params:
            raise ValueError(f"params: missing {name!r} (expected shape {shape})")
    check_float("params['embeddings.word']", params["embeddings.word"])
    dtype = params["embeddings.word"].dtype
    for name, shape in shapes.items():
        a = params[name]
        if not (isinstance(a, np.ndarray) and a.shape == shape and a.dtype == dtype):
            _check_param(name, a, shape, dtype)     # the slow path names what is wrong (and passes CuPy)


def _check_param(name, a, shape, dtype):
    check_float(f"params[{name!r}]", a)
    if tuple(a.shape) != shape:
        raise ValueError(f"params[{name!r}]: expected shape {shape}, got {tuple(a.shape)}")
    if a.dtype != dtype:
        raise TypeError(f"params[{name!r}]: expected dtype {dtype} (the dtype of embeddings.word), got {a.dtype}")


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------

def _check_inputs(params, config, input_ids, token_type_ids, attention_mask, train, rng):
    """All of forward's checks, before any math: the parameters (shapes and dtypes), the
    three (B, T) inputs, and a generator for dropout. The passes over values are the ones
    the math needs: ids in range (numpy would wrap a negative id around silently), a mask
    of 0s and 1s, and at least one real token per sequence (else softmax over no keys)."""
    _check_params(params, config)
    check_int("input_ids", input_ids)
    check_ndim("input_ids", input_ids, 2)
    B, T = input_ids.shape
    if B < 1 or T < 1:
        raise ValueError(f"input_ids: expected at least one sequence of at least one token, got shape {(B, T)}")
    if T > config.block_size:
        raise ValueError(f"input_ids: sequence length {T} exceeds max_position={config.block_size} "
                         "(the config's block_size: the rows of the learned position table); truncate the input")
    check_ids("input_ids", input_ids, config.vocab_size)
    if token_type_ids is not None:
        _check_token_types(token_type_ids, (B, T), config.type_vocab_size)
    if attention_mask is not None:
        _check_attention_mask(attention_mask, (B, T))
    if train and rng is None and (config.dropout > 0 or config.attention_dropout > 0):
        raise TypeError("rng: expected a numpy Generator when train=True and dropout > 0, got None")


def _check_token_types(token_type_ids, shape, type_vocab_size):
    check_int("token_type_ids", token_type_ids)
    if tuple(token_type_ids.shape) != shape:
        raise ValueError(f"token_type_ids: expected shape {shape} (the shape of input_ids), "
                         f"got {tuple(token_type_ids.shape)}")
    xp = array_module(token_type_ids)
    lo, hi = int(xp.min(token_type_ids)), int(xp.max(token_type_ids))
    if lo < 0 or hi >= type_vocab_size:
        raise ValueError(f"token_type_ids: expected ids in [0, {type_vocab_size}) "
                         f"(type_vocab_size), got {lo if lo < 0 else hi}")


def _check_attention_mask(attention_mask, shape):
    check_array("attention_mask", attention_mask)
    if tuple(attention_mask.shape) != shape:
        raise ValueError(f"attention_mask: expected shape {shape} (the shape of input_ids), "
                         f"got {tuple(attention_mask.shape)}")
    xp = array_module(attention_mask)
    if attention_mask.dtype != bool and not bool(xp.all((attention_mask == 0) | (attention_mask == 1))):
        raise ValueError("attention_mask: expected 1 (a real token) or 0 (padding) everywhere, got other values")
    empty = ~xp.any(attention_mask, axis=1)                    # (B,): a sequence of nothing but padding
    if bool(xp.any(empty)):
        raise ValueError(f"attention_mask: sequence {int(xp.argmax(empty))} has no token with mask 1; "
                         "every sequence needs at least one real token")


def _as_generator(rng):
    """An int seed becomes a numpy Generator; a Generator (NumPy's or CuPy's) or None stays."""
    return make_rng(rng) if rng is not None and not hasattr(rng, "random") else rng


# ---------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------

class BlockCache(NamedTuple):
    attn: object     # SelfAttentionCache of step 1
    drop_1: object   # DropoutCache of step 2 (mask None: no dropout)
    ln_1: object     # LayerNorm cache of step 3 (holds x + a_drop)
    mlp: object      # MlpCache of step 4
    drop_2: object   # DropoutCache of step 5
    ln_2: object     # LayerNorm cache of step 6 (holds x1 + m_drop)


class BertCache(NamedTuple):
    word: object          # EmbeddingCache of input_ids (step 1)
    token_type: object    # EmbeddingCache of token_type_ids (step 1)
    T: int                # sequence length: rows 0..T-1 of the position table were used (step 1)
    position_shape: tuple # (block_size, C), the position table's shape
    ln: object            # the embeddings' LayerNorm cache (step 2)
    drop: object          # the embeddings' DropoutCache (step 3)
    blocks: tuple         # one BlockCache per layer (step 4)
    param_names: tuple    # the encoder's parameter names: the keys of backward's gradients


def _activation(config):
    return _ACTIVATIONS[config.hidden_act]


def _block_forward(params, config, layer, x, key_mask, p_hidden, p_attn, rng):
    """One post-LN encoder block, in the steps that _block_backward undoes in reverse.
    x: (B, T, C); key_mask: (B, 1, 1, T) -> y: (B, T, C), BlockCache"""
    prefix, eps = f"h.{layer}.", config.norm_eps
    a, attn = self_attention_forward(                                              # 1. a = attn(x)
        x, params[prefix + "attn.w_qkv"], params[prefix + "attn.b_qkv"], params[prefix + "attn.w_o"],
        params[prefix + "attn.b_o"], config.n_head, causal=False, mask=key_mask,
        dropout_p=p_attn, rng=rng if p_attn else None)
    a_drop, drop_1 = dropout_forward(a, p_hidden, rng)                             # 2. a_drop = dropout(a)
    x1, ln_1 = layernorm_forward(x + a_drop, params[prefix + "ln_1.weight"],      # 3. x1 = norm_1(x + a_drop)
                                 params[prefix + "ln_1.bias"], eps)
    m, mlp = mlp_forward(x1, params[prefix + "mlp.w1"], params[prefix + "mlp.b1"],  # 4. m = mlp(x1)
                         params[prefix + "mlp.w2"], params[prefix + "mlp.b2"], activation=_activation(config))
    m_drop, drop_2 = dropout_forward(m, p_hidden, rng)                             # 5. m_drop = dropout(m)
    y, ln_2 = layernorm_forward(x1 + m_drop, params[prefix + "ln_2.weight"],      # 6. y = norm_2(x1 + m_drop)
                                params[prefix + "ln_2.bias"], eps)
    return y, BlockCache(attn, drop_1, ln_1, mlp, drop_2, ln_2)


def _block_backward(dy, cache: BlockCache):
    """The block's steps undone from the last to the first. dy: (B, T, C)
    -> dx (B, T, C), {name inside the block ("ln_1.weight", ...): gradient}"""
    grads = {}
    # forward step 6: y = norm_2(x1 + m_drop). dsum2 is the gradient of that sum, which
    # passes it to both terms.
    dsum2, grads["ln_2.weight"], grads["ln_2.bias"] = layernorm_backward(dy, cache.ln_2)
    # forward step 5: m_drop = dropout(m)
    dm = dropout_backward(dsum2, cache.drop_2)
    # forward step 4: m = mlp(x1). x1 gets this path's gradient plus the residual's (step 6)
    dx1_mlp, grads["mlp.w1"], grads["mlp.b1"], grads["mlp.w2"], grads["mlp.b2"] = mlp_backward(dm, cache.mlp)
    dx1 = dx1_mlp + dsum2
    # forward step 3: x1 = norm_1(x + a_drop). The same pattern.
    dsum1, grads["ln_1.weight"], grads["ln_1.bias"] = layernorm_backward(dx1, cache.ln_1)
    # forward step 2: a_drop = dropout(a)
    da = dropout_backward(dsum1, cache.drop_1)
    # forward step 1: a = attn(x). x gets this path's gradient plus the residual's (step 3)
    dx_attn, grads["attn.w_qkv"], grads["attn.b_qkv"], grads["attn.w_o"], grads["attn.b_o"] = \
        self_attention_backward(da, cache.attn)
    return dx_attn + dsum1, grads


def forward(params, config: BertConfig, input_ids, token_type_ids=None, attention_mask=None,
            train=False, rng=None):
    """The encoder: hidden states of every token.

    input_ids, token_type_ids: (B, T) ints; attention_mask: (B, T) 1 = real token, 0 = padding
    (default: all 1). train=True applies dropout with ``rng`` (a numpy Generator or a seed).
    -> hidden (B, T, C), cache for ``backward``.
    Padding tokens still get hidden states (they attend to the real tokens), but no real
    token ever attends to them, so appending padding changes nothing for the real tokens.
    """
    _check_inputs(params, config, input_ids, token_type_ids, attention_mask, train, rng)
    xp = array_module(input_ids)
    B, T = input_ids.shape
    if token_type_ids is None:
        token_type_ids = xp.zeros((B, T), dtype=input_ids.dtype)                   # all sentence A
    real = xp.ones((B, T), dtype=bool) if attention_mask is None else attention_mask != 0   # (B, T)
    key_mask = real[:, None, None, :]          # (B, 1, 1, T): query i may attend to key j iff j is real
    rng = _as_generator(rng) if train else rng
    p_hidden = config.dropout if train else 0.0
    p_attn = config.attention_dropout if train else 0.0

    # 1. e = word[ids] + token_type[types] + position[0..T-1], the positions shared by the batch
    e_word, word = embedding_forward(input_ids, params["embeddings.word"])                     # (B, T, C)
    e_type, token_type = segment_embedding_forward(token_type_ids, params["embeddings.token_type"])
    e = e_word + e_type + params["embeddings.position"][:T]                                    # (B, T, C)
    x, ln = layernorm_forward(e, params["embeddings.ln.weight"], params["embeddings.ln.bias"],
                              config.norm_eps)                   # 2. x = norm(e)
    x, drop = dropout_forward(x, p_hidden, rng)                 # 3. x = dropout(x)
    blocks = []
    for layer in range(config.n_layer):                         # 4. x = block(x), n_layer times
        x, block = _block_forward(params, config, layer, x, key_mask, p_hidden, p_attn, rng)
        blocks.append(block)
    position_shape = tuple(params["embeddings.position"].shape)
    return x, BertCache(word, token_type, T, position_shape, ln, drop, tuple(blocks),
                        tuple(_param_shapes(config, ())))


def backward(dhidden, cache: BertCache) -> dict:
    """dL/d(encoder parameters) from dL/dhidden (B, T, C): the forward's steps, from the last
    to the first. -> {name: grad} for every encoder parameter (the heads add their own)."""
    grads = {}
    dx = dhidden
    # forward step 4: x = block(x) for layer 0, 1, ...: now from the last layer down
    for layer in reversed(range(len(cache.blocks))):
        dx, block_grads = _block_backward(dx, cache.blocks[layer])
        grads.update({f"h.{layer}.{name}": g for name, g in block_grads.items()})
    # forward step 3: x = dropout(x)
    dx = dropout_backward(dx, cache.drop)
    # forward step 2: x = norm(e)
    de, grads["embeddings.ln.weight"], grads["embeddings.ln.bias"] = layernorm_backward(dx, cache.ln)
    # forward step 1: e = word[ids] + token_type[types] + position[0..T-1]. Each table gets de;
    # the position rows were shared by every sequence, so theirs is summed over the batch.
    grads["embeddings.word"] = embedding_backward(de, cache.word)
    grads["embeddings.token_type"] = segment_embedding_backward(de, cache.token_type)
    xp = array_module(de)
    dposition = xp.zeros(cache.position_shape, dtype=de.dtype)                 # (block_size, C)
    dposition[:cache.T] = de.sum(axis=0)                                       # rows 0..T-1
    grads["embeddings.position"] = dposition
    return {name: grads[name] for name in cache.param_names}


def _full_grads(params, grads):
    """Gradients for every key of ``params``: zeros for parameters the loss does not reach
    (e.g. the classifier during MLM), so the dict always matches the parameter dict."""
    xp = array_module(next(iter(params.values())))
    return {name: grads[name] if name in grads else xp.zeros_like(p) for name, p in params.items()}


def _add(grads, name, value):
    grads[name] = grads[name] + value if name in grads else value


# ---------------------------------------------------------------------------
# Pooler: [CLS] -> dense -> tanh
# ---------------------------------------------------------------------------

class PoolerCache(NamedTuple):
    dense: object         # LinearCache of hidden[:, 0] w + b
    y: object             # (B, C) tanh output: tanh' = 1 - y^2
    hidden_shape: tuple   # (B, T, C)


def pooler_forward(hidden, w, b):
    """pooled = tanh(hidden[:, 0] w + b): the [CLS] token's state, squashed.
    hidden: (B, T, C); w: (C, C); b: (C,) -> pooled (B, C)"""
    check_float("hidden", hidden)
    check_ndim("hidden", hidden, 3)
    xp = array_module(hidden)
    z, dense = linear_forward(hidden[:, 0], w, b)               # (B, C)
    y = xp.tanh(z)
    return y, PoolerCache(dense, y, tuple(hidden.shape))


def pooler_backward(dy, cache: PoolerCache):
    """-> dhidden (B, T, C) (nonzero only at position 0), dw, db"""
    xp = array_module(dy)
    dz = dy * (1 - cache.y * cache.y)
    dcls, dw, db = linear_backward(dz, cache.dense)             # (B, C)
    dhidden = xp.zeros(cache.hidden_shape, dtype=dcls.dtype)    # (B, T, C)
    dhidden[:, 0] = dcls
    return dhidden, dw, db


# ---------------------------------------------------------------------------
# The MLM head: dense -> GELU -> LayerNorm -> decoder tied to the word embeddings
# ---------------------------------------------------------------------------

class MLMHeadCache(NamedTuple):
    dense: object     # LinearCache of the transform
    act: object       # the activation's cache
    act_name: str     # which activation (minillm.ffn's name)
    ln: object        # LayerNorm cache
    dec: object       # LinearCache of the tied decoder


def mlm_head_forward(h, params, config: BertConfig):
    """logits = LayerNorm(GELU(h W + b)) word^T + bias.
    The decoder reuses the word-embedding table (weight tying): the same vector that
    represents token v going in scores token v coming out. h: (N, C) -> logits (N, V)"""
    act_name = _activation(config)
    z, dense = linear_forward(h, params["mlm.dense.w"], params["mlm.dense.b"])        # (N, C)
    a, act = ACTIVATIONS[act_name][0](z)
    n, ln = layernorm_forward(a, params["mlm.ln.weight"], params["mlm.ln.bias"], config.norm_eps)
    logits, dec = linear_forward(n, params["embeddings.word"].T, params["mlm.bias"])   # (N, V)
    return logits, MLMHeadCache(dense, act, act_name, ln, dec)


def mlm_head_backward(dlogits, cache: MLMHeadCache):
    """-> dh (N, C), {name: grad} for the head (the decoder's part goes to embeddings.word)."""
    grads = {}
    dn, dword_t, grads["mlm.bias"] = linear_backward(dlogits, cache.dec)
    grads["embeddings.word"] = dword_t.T  # the decoder used word^T
    da, grads["mlm.ln.weight"], grads["mlm.ln.bias"] = layernorm_backward(dn, cache.ln)
    dz = ACTIVATIONS[cache.act_name][1](da, cache.act)
    dh, grads["mlm.dense.w"], grads["mlm.dense.b"] = linear_backward(dz, cache.dense)
    return dh, grads


def _check_labels(name, labels, shape, n_classes, ignore=True):
    check_int(name, labels)
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(labels.shape)}")
    xp = array_module(labels)
    bad = (labels < 0) | (labels >= n_classes)
    if ignore:
        bad &= labels != IGNORE_INDEX
    if bool(xp.any(bad)):
        extra = f" or {IGNORE_INDEX} (ignored)" if ignore else ""
        raise ValueError(f"{name}: expected ids in [0, {n_classes}){extra}, got {int(labels[bad][0])}")


def mlm_logits(params, config, input_ids, token_type_ids=None, attention_mask=None):
    """Scores over the vocabulary at every position (inference: fill in [MASK]). -> (B, T, V)"""
    _check_params(params, config, heads=("mlm",))
    hidden, _ = forward(params, config, input_ids, token_type_ids, attention_mask)
    B, T, C = hidden.shape
    logits, _ = mlm_head_forward(hidden.reshape(B * T, C), params, config)
    return logits.reshape(B, T, -1)


def _mlm(params, config, input_ids, labels, token_type_ids, attention_mask, train, rng, need_grads):
    _check_params(params, config, heads=("mlm",))
    check_int("input_ids", input_ids)
    _check_labels("labels", labels, input_ids.shape, config.vocab_size)
    hidden, cache = forward(params, config, input_ids, token_type_ids, attention_mask, train, rng)
    xp = array_module(hidden)
    B, T, C = hidden.shape
    # Only the masked positions are scored: the (N, V) logits are the costly part, and
    # the other 85% of positions would contribute nothing to the loss anyway.
    flat_labels = labels.reshape(-1)                                  # (B T,)
    rows = xp.nonzero(flat_labels != IGNORE_INDEX)[0]                 # (N,)
    h = hidden.reshape(B * T, C)[rows]                                # (N, C)
    logits, head = mlm_head_forward(h, params, config)                # (N, V)
    loss, ce = softmax_cross_entropy_forward(logits, flat_labels[rows])
    if not need_grads:
        return float(loss), None
    dlogits = softmax_cross_entropy_backward(xp.asarray(1.0, dtype=logits.dtype), ce)
    dh, head_grads = mlm_head_backward(dlogits, head)
    dhidden = xp.zeros((B * T, C), dtype=dh.dtype)
    scatter_add(dhidden, rows, dh)  # rows are distinct; scatter_add keeps the device code uniform
    grads = backward(dhidden.reshape(B, T, C), cache)
    for name, g in head_grads.items():
        _add(grads, name, g)
    return float(loss), _full_grads(params, grads)


def mlm_loss(params, config, input_ids, labels, token_type_ids=None, attention_mask=None):
    """The MLM loss alone (evaluation): mean cross-entropy over positions whose label is not -100."""
    return _mlm(params, config, input_ids, labels, token_type_ids, attention_mask, False, None, False)[0]


def mlm_loss_and_grads(params, config, input_ids, labels, token_type_ids=None, attention_mask=None,
                       train=False, rng=None):
    """Masked-language-model loss and its gradients.

    labels (B, T): the original token where the input was masked (see ``mask_tokens``),
    -100 elsewhere (ignored). loss = mean over labelled positions of -log p(label).
    -> (loss as a float, grads with the keys of ``params``; zeros for parameters the
    MLM loss does not use, such as the pooler)."""
    return _mlm(params, config, input_ids, labels, token_type_ids, attention_mask, train, rng, True)


# ---------------------------------------------------------------------------
# Sequence classification: pooler -> dropout -> linear
# ---------------------------------------------------------------------------

def _classify(params, config, input_ids, labels, token_type_ids, attention_mask, train, rng, need_grads):
    _check_params(params, config, heads=("pooler", "classifier"))
    rng = _as_generator(rng) if train else rng        # one generator for the encoder and the pooled dropout
    hidden, cache = forward(params, config, input_ids, token_type_ids, attention_mask, train, rng)
    pooled, pool = pooler_forward(hidden, params["pooler.w"], params["pooler.b"])     # (B, C)
    pooled_drop, drop = dropout_forward(pooled, config.dropout if train else 0.0, rng)
    logits, classifier = linear_forward(pooled_drop, params["classifier.w"], params["classifier.b"])  # (B, L)
    if labels is None:
        return logits, None, None
    _check_labels("labels", labels, (input_ids.shape[0],), config.num_labels, ignore=False)
    loss, ce = softmax_cross_entropy_forward(logits, labels)
    if not need_grads:
        return logits, float(loss), None
    xp = array_module(logits)
    grads = {}
    dlogits = softmax_cross_entropy_backward(xp.asarray(1.0, dtype=logits.dtype), ce)
    dpooled_drop, grads["classifier.w"], grads["classifier.b"] = linear_backward(dlogits, classifier)
    dpooled = dropout_backward(dpooled_drop, drop)
    dhidden, grads["pooler.w"], grads["pooler.b"] = pooler_backward(dpooled, pool)
    grads.update(backward(dhidden, cache))
    return logits, float(loss), _full_grads(params, grads)


def classify_logits(params, config, input_ids, token_type_ids=None, attention_mask=None):
    """Class scores from the pooled [CLS] state. -> (B, num_labels)"""
    return _classify(params, config, input_ids, None, token_type_ids, attention_mask, False, None, False)[0]


def classification_loss(params, config, input_ids, labels, token_type_ids=None, attention_mask=None):
    """The classifier's cross-entropy alone (evaluation: no dropout, no gradients). -> float"""
    return _classify(params, config, input_ids, labels, token_type_ids, attention_mask, False, None, False)[1]


def classification_loss_and_grads(params, config, input_ids, labels, token_type_ids=None,
                                  attention_mask=None, train=False, rng=None):
    """Cross-entropy of the classifier on labels (B,) in [0, num_labels), and its gradients.
    -> (loss as a float, grads with the keys of ``params``; zeros for unused ones, e.g. the MLM head)."""
    _, loss, grads = _classify(params, config, input_ids, labels, token_type_ids, attention_mask, train, rng, True)
    return loss, grads


# ---------------------------------------------------------------------------
# BERT's masking recipe
# ---------------------------------------------------------------------------

def _check_mask_tokens(input_ids, vocab_size, mask_token_id, special, attention_mask, mlm_probability):
    check_int("input_ids", input_ids)
    if not 0.0 <= mlm_probability <= 1.0:
        raise ValueError(f"mlm_probability: expected a number in [0, 1], got {mlm_probability!r}")
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_token_id: expected an id in [0, {vocab_size}), got {mask_token_id}")
    if attention_mask is not None:
        check_array("attention_mask", attention_mask)
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)} (the shape of input_ids), "
                             f"got {tuple(attention_mask.shape)}")
    if sum(1 for i in special if 0 <= i < vocab_size) == vocab_size:
        raise ValueError("special_ids: every id is special; no ordinary token to draw at random")


def mask_tokens(input_ids, rng, *, vocab_size, mask_token_id, special_ids=(), attention_mask=None,
                mlm_probability=0.15):
    """Make an MLM training example, as in the BERT paper.

    Each token that is neither special ([CLS], [SEP], [PAD], ...) nor padding is chosen
    with probability ``mlm_probability`` (15%). A chosen token becomes [MASK] 80% of the
    time, a random ordinary token 10% of the time, and stays itself 10% of the time; the
    model must predict the original at every chosen position. (Keeping and randomising a
    few stops the model from learning that only [MASK] positions matter, since at
    fine-tuning time there is no [MASK].) Random replacements are drawn from the
    non-special ids.

    input_ids: (B, T) ints; rng: a numpy Generator (or seed) -> (masked_ids, labels) where
    labels hold the original id at chosen positions and -100 elsewhere. The draws happen
    on the CPU; the results come back on the device of ``input_ids``.
    """
    special_set = {int(s) for s in special_ids}
    _check_mask_tokens(input_ids, vocab_size, mask_token_id, special_set, attention_mask, mlm_probability)
    xp = array_module(input_ids)
    rng = make_rng(rng)
    ids = to_numpy(input_ids)                                                  # (B, T)
    special = np.asarray(sorted(special_set), dtype=np.int64)
    eligible = ~np.isin(ids, special)
    if attention_mask is not None:
        eligible &= to_numpy(attention_mask) != 0
    chosen = eligible & (rng.random(ids.shape) < mlm_probability)
    labels = np.where(chosen, ids, IGNORE_INDEX).astype(ids.dtype)
    u = rng.random(ids.shape)
    to_mask = chosen & (u < 0.8)
    to_random = chosen & (u >= 0.8) & (u < 0.9)
    ordinary = np.setdiff1d(np.arange(vocab_size), special)
    random_ids = ordinary[rng.integers(0, len(ordinary), size=ids.shape)]
    out = np.where(to_mask, mask_token_id, np.where(to_random, random_ids, ids)).astype(ids.dtype)
    return xp.asarray(out), xp.asarray(labels)


# ---------------------------------------------------------------------------
# Sentence embeddings
# ---------------------------------------------------------------------------

def mean_pool(hidden, attention_mask, normalize=False):
    """Mean of the real tokens' hidden states (sentence-transformers' mean pooling), optionally
    scaled to unit length. hidden: (B, T, C); attention_mask: (B, T) -> (B, C)"""
    check_float("hidden", hidden)
    check_ndim("hidden", hidden, 3)
    check_shape("attention_mask", attention_mask, hidden.shape[:2])
    xp = array_module(hidden)
    real = (attention_mask != 0).astype(hidden.dtype)[:, :, None]               # (B, T, 1)
    # sentence-transformers clamps the count at 1e-9; with at least one real token it is >= 1.
    emb = (hidden * real).sum(axis=1) / xp.maximum(real.sum(axis=1), 1e-9)      # (B, C)
    if normalize:
        emb = emb / xp.maximum(xp.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb


def cosine_similarity(a, b=None):
    """Cosine similarity matrix between the rows of a (N, C) and b (M, C) (default: a). -> (N, M)"""
    xp = array_module(a)
    b = a if b is None else b
    an = a / xp.maximum(xp.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    bn = b / xp.maximum(xp.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return an @ bn.T
