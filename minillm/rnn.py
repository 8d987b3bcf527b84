"""Recurrent networks: the plain RNN, the LSTM and the GRU, with backpropagation through time.

Before attention, a sequence model read its input one step at a time and carried what it
had seen in a hidden state h (and, for the LSTM, a cell c). Every function here takes a
batch of sequences x (B, T, I) and returns y (B, T, H), the hidden state after every step.
The weights are laid out as PyTorch lays them, transposed for ``x @ w``: our w_ih (I, kH)
is torch's ``weight_ih_l0.T`` and our w_hh (H, kH) its ``weight_hh_l0.T``, the k gate
blocks stacked in torch's order. Both biases are kept, as torch keeps them.

    RNN   (k = 1)   h_t = f(x_t W_ih + b_ih + h_{t-1} W_hh + b_hh),   f = tanh or relu

    LSTM  (k = 4, gates i, f, g, o)
          [a_i a_f a_g a_o] = x_t W_ih + b_ih + h_{t-1} W_hh + b_hh
          i = sigmoid(a_i)  f = sigmoid(a_f)  g = tanh(a_g)  o = sigmoid(a_o)
          c_t = f * c_{t-1} + i * g          the cell: an additive path through time
          h_t = o * tanh(c_t)

    GRU   (k = 3, gates r, z, n)
          [i_r i_z i_n] = x_t W_ih + b_ih,   [h_r h_z h_n] = h_{t-1} W_hh + b_hh
          r = sigmoid(i_r + h_r)   z = sigmoid(i_z + h_z)
          n = tanh(i_n + r * h_n)            (r gates h W_hn + b_hn, as torch does)
          h_t = (1 - z) * n + z * h_{t-1}

Backpropagation through time (BPTT): y_t depends on h_{t-1}, which depends on h_{t-2}, ...
so the gradient reaching h_{t-1} is the gradient of the loss at step t-1 *plus* what flows
back from step t. The backward walks the steps in reverse, carrying that gradient:

    dh = dy_t + dh_carry                     everything the loss says about h_t
    da = dh * f'(a_t)                        (RNN; the LSTM and GRU have their gates)
    dW_hh += h_{t-1}^T da,   dh_carry = da W_hh^T      -> on to step t-1

Each step multiplies the carried gradient by W_hh^T diag(f'(a_t)): over many steps the
product shrinks (or grows) geometrically. That is the vanishing gradient. The LSTM's cell
is carried by c_t = f * c_{t-1} + ...: its gradient is multiplied by the forget gate only,
elementwise, which stays near 1 when the network wants to remember.

Truncated BPTT: a long text is cut into chunks of T steps; the final states of one chunk
are the initial states of the next, and the gradient stops at the chunk boundary. The
final state is ``y[:, -1]`` (h_T) and, for the LSTM, ``cache.c_last`` (c_T); see
:func:`final_state`. When the final states feed something further (the next chunk's
states, when gradients are carried across, or a loss on the last state), their gradients
are passed to the backward as ``dh_last`` (and ``dc_last``) and added to what flows in at
step T; they default to zero. The backward returns dh0 (and dc0), the gradients at the
initial states, which an earlier chunk would receive as its dh_last / dc_last.

Only the time loop is sequential: the input projection x_t W_ih + b_ih of every step is
one matmul over all B*T positions before the loop, and its gradients (dx, dW_ih, db_ih) one
matmul after the backward loop. What cannot be batched is h_{t-1} W_hh: step t needs step
t-1's result. A Transformer has no such chain.

Reading order: rnn_forward / rnn_backward, lstm_*, gru_*, final_state, then a
character-level language model built from them (RNNLMConfig, lm_forward, lm_backward,
RNNDecoder for minillm.sampling), then the checks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .backend import (DEFAULT_DTYPE, array_module, check_choice, check_float, check_int_arg, check_ndim,
                      check_same_device, check_shape, make_rng, to_device)
from .backprop import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from .embeddings import embedding_backward, embedding_forward
from .ffn import linear_backward, linear_forward, sigmoid
from .sampling import generate as _sampling_generate

__all__ = ["rnn_forward", "rnn_backward", "lstm_forward", "lstm_backward", "gru_forward", "gru_backward",
           "final_state", "NONLINEARITIES",
           "CELLS", "RNNLMConfig", "lm_param_shapes", "init_lm_params", "lm_zero_state", "lm_forward",
           "lm_final_state", "lm_backward", "lm_loss_and_grads", "lm_loss", "RNNDecoder", "lm_generate"]

NONLINEARITIES = ("tanh", "relu")


def _input_projection(x, w_ih, b_ih):
    """x_t W_ih + b_ih for every step at once: one (B*T, I) @ (I, kH) matmul. -> (B, T, kH)"""
    B, T, I = x.shape
    return (x.reshape(B * T, I) @ w_ih + b_ih).reshape(B, T, w_ih.shape[1])


def _input_projection_backward(dxp, x, w_ih):
    """Gradients of _input_projection, each one matmul over all B*T positions.
    dxp: (B, T, kH) -> dx (B, T, I), dw_ih (I, kH), db_ih (kH,)"""
    B, T, I = x.shape
    d2 = dxp.reshape(B * T, -1)
    dx = (d2 @ w_ih.T).reshape(B, T, I)
    dw_ih = x.reshape(B * T, I).T @ d2
    return dx, dw_ih, d2.sum(axis=0)


def _start(dy, dh_last, cache_h0):
    xp = array_module(dy)
    return xp.zeros_like(cache_h0) if dh_last is None else dh_last.copy()


# ---------------------------------------------------------------------------
# The plain (Elman) RNN
# ---------------------------------------------------------------------------

class RNNCache(NamedTuple):
    x: object          # (B, T, I)
    h0: object         # (B, H)
    w_ih: object       # (I, H)
    w_hh: object       # (H, H)
    y: object          # (B, T, H) h_1..h_T; f'(a_t) is read from h_t (tanh: 1 - h^2, relu: h > 0)
    nonlinearity: str


def rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity="tanh"):
    """h_t = f(x_t W_ih + b_ih + h_{t-1} W_hh + b_hh), f = tanh or relu, for t = 1..T.

    x (B, T, I), h0 (B, H), w_ih (I, H), w_hh (H, H), b_ih, b_hh (H,) -> y (B, T, H), cache.
    y[:, t] is h_{t+1}; the final state y[:, -1] starts the next chunk (truncated BPTT).
    """
    _check_rnn("RNN", 1, x, h0, None, w_ih, w_hh, b_ih, b_hh, nonlinearity)
    xp = array_module(x)
    B, T, _ = x.shape
    xproj = _input_projection(x, w_ih, b_ih)                  # (B, T, H) all steps at once
    y = xp.empty((B, T, w_hh.shape[0]), dtype=x.dtype)
    h = h0
    for t in range(T):                                        # the sequential part
        a = xproj[:, t] + h @ w_hh + b_hh                     # (B, H)
        h = xp.tanh(a) if nonlinearity == "tanh" else xp.maximum(a, 0)
        y[:, t] = h
    return y, RNNCache(x, h0, w_ih, w_hh, y, nonlinearity)


def rnn_backward(dy, cache: RNNCache, dh_last=None):
    """BPTT through rnn_forward. dy (B, T, H); dh_last (B, H) or None: the gradient at the
    final state h_T from beyond this chunk (added to dy[:, -1]'s).
    -> dx (B, T, I), dh0 (B, H), dw_ih (I, H), dw_hh (H, H), db_ih (H,), db_hh (H,)"""
    x, h0, w_ih, w_hh, y, nonlinearity = cache
    _check_backward(dy, y.shape, dh_last, h0.shape, "dh_last")
    xp = array_module(dy)
    B, T, H = y.shape
    dh_carry = _start(dy, dh_last, h0)                        # dL/dh_T from beyond the chunk
    da_all = xp.empty_like(y)                                 # (B, T, H) dL/da_t
    dw_hh = xp.zeros_like(w_hh)
    for t in reversed(range(T)):                              # steps in reverse
        h_prev = y[:, t - 1] if t > 0 else h0
        dh = dy[:, t] + dh_carry                              # 3. h_t feeds y_t and step t+1
        h = y[:, t]
        da = dh * (1 - h * h) if nonlinearity == "tanh" else dh * (h > 0)   # 2. through f
        dw_hh += h_prev.T @ da                                # 1. a_t = ... + h_{t-1} W_hh
        dh_carry = da @ w_hh.T                                #    -> dL/dh_{t-1}
        da_all[:, t] = da
    dx, dw_ih, db_ih = _input_projection_backward(da_all, x, w_ih)
    return dx, dh_carry, dw_ih, dw_hh, db_ih, da_all.sum(axis=(0, 1))


# ---------------------------------------------------------------------------
# LSTM
# ---------------------------------------------------------------------------

class LSTMCache(NamedTuple):
    x: object          # (B, T, I)
    h0: object         # (B, H)
    c0: object         # (B, H)
    w_ih: object       # (I, 4H)
    w_hh: object       # (H, 4H)
    gates: object      # (B, T, 4H) i, f, g, o after their sigmoid / tanh
    c: object          # (B, T, H) c_1..c_T
    y: object          # (B, T, H) h_1..h_T
    c_last: object     # (B, H) c_T: with y[:, -1], the state the next chunk starts from


def lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh):
    """The LSTM of the module docstring, gates i, f, g, o stacked in w_ih (I, 4H), w_hh (H, 4H).

    x (B, T, I), h0, c0 (B, H), b_ih, b_hh (4H,) -> y (B, T, H) (h_1..h_T), cache.
    The final states are y[:, -1] and cache.c_last (see final_state).
    """
    _check_rnn("LSTM", 4, x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    xp = array_module(x)
    B, T, _ = x.shape
    H = w_hh.shape[0]
    xproj = _input_projection(x, w_ih, b_ih)                  # (B, T, 4H)
    gates = xp.empty((B, T, 4 * H), dtype=x.dtype)
    c_all = xp.empty((B, T, H), dtype=x.dtype)
    y = xp.empty((B, T, H), dtype=x.dtype)
    h, c = h0, c0
    for t in range(T):
        a = xproj[:, t] + h @ w_hh + b_hh                     # (B, 4H) pre-activations
        i = sigmoid(a[:, :H])                                 # input gate
        f = sigmoid(a[:, H:2 * H])                            # forget gate
        g = xp.tanh(a[:, 2 * H:3 * H])                        # candidate
        o = sigmoid(a[:, 3 * H:])                             # output gate
        c = f * c + i * g                                     # (B, H)
        h = o * xp.tanh(c)                                    # (B, H)
        gates[:, t, :H], gates[:, t, H:2 * H], gates[:, t, 2 * H:3 * H], gates[:, t, 3 * H:] = i, f, g, o
        c_all[:, t], y[:, t] = c, h
    return y, LSTMCache(x, h0, c0, w_ih, w_hh, gates, c_all, y, c)


def lstm_backward(dy, cache: LSTMCache, dh_last=None, dc_last=None):
    """BPTT through lstm_forward. dy (B, T, H); dh_last, dc_last (B, H) or None: gradients at
    the final states h_T and c_T from beyond this chunk.
    -> dx (B, T, I), dh0, dc0 (B, H), dw_ih (I, 4H), dw_hh (H, 4H), db_ih, db_hh (4H,)"""
    x, h0, c0, w_ih, w_hh, gates, c_all, y, _ = cache
    _check_backward(dy, y.shape, dh_last, h0.shape, "dh_last")
    _check_backward(None, None, dc_last, c0.shape, "dc_last")
    xp = array_module(dy)
    B, T, H = y.shape
    dh_carry = _start(dy, dh_last, h0)
    dc_carry = _start(dy, dc_last, c0)
    da_all = xp.empty_like(gates)                             # (B, T, 4H) dL/d(pre-activations)
    dw_hh = xp.zeros_like(w_hh)
    for t in reversed(range(T)):
        i, f, g, o = (gates[:, t, k * H:(k + 1) * H] for k in range(4))
        c_prev = c_all[:, t - 1] if t > 0 else c0
        h_prev = y[:, t - 1] if t > 0 else h0
        dh = dy[:, t] + dh_carry                              # 4. h_t feeds y_t and step t+1
        tc = xp.tanh(c_all[:, t])
        do = dh * tc                                          # 3. h_t = o * tanh(c_t)
        dc = dc_carry + dh * o * (1 - tc * tc)                #    c_t feeds h_t and c_{t+1}
        di, dg, df = dc * g, dc * i, dc * c_prev              # 2. c_t = f * c_{t-1} + i * g
        dc_carry = dc * f                                     #    -> dL/dc_{t-1}: times f only
        da = da_all[:, t]                                     # 1. through the gate nonlinearities
        da[:, :H] = di * i * (1 - i)
        da[:, H:2 * H] = df * f * (1 - f)
        da[:, 2 * H:3 * H] = dg * (1 - g * g)
        da[:, 3 * H:] = do * o * (1 - o)
        dw_hh += h_prev.T @ da                                # 0. a_t = ... + h_{t-1} W_hh
        dh_carry = da @ w_hh.T                                #    -> dL/dh_{t-1}
    dx, dw_ih, db_ih = _input_projection_backward(da_all, x, w_ih)
    return dx, dh_carry, dc_carry, dw_ih, dw_hh, db_ih, da_all.sum(axis=(0, 1))


# ---------------------------------------------------------------------------
# GRU
# ---------------------------------------------------------------------------

class GRUCache(NamedTuple):
    x: object          # (B, T, I)
    h0: object         # (B, H)
    w_ih: object       # (I, 3H)
    w_hh: object       # (H, 3H)
    gates: object      # (B, T, 3H) r, z, n after their sigmoid / tanh
    hn: object         # (B, T, H) h_{t-1} W_hn + b_hn, the part r gates
    y: object          # (B, T, H) h_1..h_T


def gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh):
    """The GRU of the module docstring (PyTorch's), gates r, z, n stacked in w_ih (I, 3H),
    w_hh (H, 3H). x (B, T, I), h0 (B, H), b_ih, b_hh (3H,) -> y (B, T, H), cache."""
    _check_rnn("GRU", 3, x, h0, None, w_ih, w_hh, b_ih, b_hh)
    xp = array_module(x)
    B, T, _ = x.shape
    H = w_hh.shape[0]
    xproj = _input_projection(x, w_ih, b_ih)                  # (B, T, 3H): [i_r i_z i_n]
    gates = xp.empty((B, T, 3 * H), dtype=x.dtype)
    hn_all = xp.empty((B, T, H), dtype=x.dtype)
    y = xp.empty((B, T, H), dtype=x.dtype)
    h = h0
    for t in range(T):
        gi = xproj[:, t]
        gh = h @ w_hh + b_hh                                  # (B, 3H): [h_r h_z h_n]
        r = sigmoid(gi[:, :H] + gh[:, :H])                    # reset gate
        z = sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])          # update gate
        hn = gh[:, 2 * H:]
        n = xp.tanh(gi[:, 2 * H:] + r * hn)                   # candidate
        h = (1 - z) * n + z * h                               # (B, H)
        gates[:, t, :H], gates[:, t, H:2 * H], gates[:, t, 2 * H:] = r, z, n
        hn_all[:, t], y[:, t] = hn, h
    return y, GRUCache(x, h0, w_ih, w_hh, gates, hn_all, y)


def gru_backward(dy, cache: GRUCache, dh_last=None):
    """BPTT through gru_forward. dy (B, T, H); dh_last (B, H) or None: the gradient at h_T
    from beyond this chunk.
    -> dx (B, T, I), dh0 (B, H), dw_ih (I, 3H), dw_hh (H, 3H), db_ih, db_hh (3H,)"""
    x, h0, w_ih, w_hh, gates, hn_all, y = cache
    _check_backward(dy, y.shape, dh_last, h0.shape, "dh_last")
    xp = array_module(dy)
    B, T, H = y.shape
    dh_carry = _start(dy, dh_last, h0)
    dgi_all = xp.empty_like(gates)                            # (B, T, 3H) dL/d(x W_ih + b_ih)
    dgh = xp.empty((B, 3 * H), dtype=dy.dtype)                # dL/d(h W_hh + b_hh), one step
    dw_hh = xp.zeros_like(w_hh)
    db_hh = xp.zeros(3 * H, dtype=dy.dtype)
    for t in reversed(range(T)):
        r, z, n = (gates[:, t, k * H:(k + 1) * H] for k in range(3))
        h_prev = y[:, t - 1] if t > 0 else h0
        dh = dy[:, t] + dh_carry                              # 4. h_t feeds y_t and step t+1
        dn = dh * (1 - z)                                     # 3. h_t = (1 - z) n + z h_{t-1}
        dz = dh * (h_prev - n)
        dh_direct = dh * z                                    #    the path that skips the gates
        dan = dn * (1 - n * n)                                # 2. n = tanh(i_n + r * h_n)
        dr = dan * hn_all[:, t]
        dgi = dgi_all[:, t]                                   # 1. through r's and z's sigmoids
        dgi[:, :H] = dr * r * (1 - r)
        dgi[:, H:2 * H] = dz * z * (1 - z)
        dgi[:, 2 * H:] = dan
        dgh[:, :2 * H] = dgi[:, :2 * H]                       #    r and z see i + h alike
        dgh[:, 2 * H:] = dan * r                              #    h_n enters through r * h_n
        dw_hh += h_prev.T @ dgh                               # 0. gh = h_{t-1} W_hh + b_hh
        db_hh += dgh.sum(axis=0)
        dh_carry = dh_direct + dgh @ w_hh.T                   #    -> dL/dh_{t-1}
    dx, dw_ih, db_ih = _input_projection_backward(dgi_all, x, w_ih)
    return dx, dh_carry, dw_ih, dw_hh, db_ih, db_hh


def final_state(cache):
    """The states a next chunk starts from (truncated BPTT): h_T for an RNN or GRU cache,
    (h_T, c_T) for an LSTM cache. Views into the cache: copy them before editing."""
    if isinstance(cache, LSTMCache):
        return cache.y[:, -1], cache.c_last
    if isinstance(cache, (RNNCache, GRUCache)):
        return cache.y[:, -1]
    raise TypeError(f"cache: expected an RNN, LSTM or GRU cache, got {type(cache).__name__}")


# ---------------------------------------------------------------------------
# A character-level language model: embedding -> recurrent layers -> LM head
# ---------------------------------------------------------------------------

CELLS = ("rnn", "lstm", "gru")
_GATES = {"rnn": 1, "lstm": 4, "gru": 3}
MODEL_NAME = "rnn-lm"          # model_config["model"] in a checkpoint: tells an RNN run from a GPT's


@dataclass(frozen=True)
class RNNLMConfig:
    """logits = (layers of cell over wte[ids]) W_head + b_head.

    cell: "rnn", "lstm" or "gru"; n_layer recurrent layers of n_hidden units, the first
    reading n_embd-wide embeddings; block_size is the training window (the BPTT length):
    a recurrent model runs on sequences of any length, so sampling has no context limit.
    """
    cell: str = "lstm"
    vocab_size: int = 65
    n_embd: int = 64
    n_hidden: int = 256
    n_layer: int = 1
    block_size: int = 64
    nonlinearity: str = "tanh"     # the plain RNN's f

    def __post_init__(self):
        _check_lm_config(self)

    def to_dict(self) -> dict:
        return {"model": MODEL_NAME, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "RNNLMConfig":
        if not isinstance(d, dict) or d.get("model") != MODEL_NAME:
            raise ValueError(f"config: expected a dict with model={MODEL_NAME!r}, got "
                             f"{d.get('model') if isinstance(d, dict) else type(d).__name__!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - {"model"})
        if unknown:
            raise ValueError(f"config: unknown RNNLMConfig fields {unknown}; known: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k != "model"})


def lm_param_shapes(config: RNNLMConfig) -> dict:
    k, H = _GATES[config.cell], config.n_hidden
    shapes = {"wte": (config.vocab_size, config.n_embd)}
    for layer in range(config.n_layer):
        n_in = config.n_embd if layer == 0 else H
        shapes.update({f"rnn.{layer}.w_ih": (n_in, k * H), f"rnn.{layer}.w_hh": (H, k * H),
                       f"rnn.{layer}.b_ih": (k * H,), f"rnn.{layer}.b_hh": (k * H,)})
    shapes.update({"lm_head.w": (H, config.vocab_size), "lm_head.b": (config.vocab_size,)})
    return shapes


def init_lm_params(config: RNNLMConfig, seed=0, dtype=DEFAULT_DTYPE, device=None) -> dict:
    """PyTorch's initialisation: embeddings ~ N(0, 1), the recurrent weights, biases and the
    head ~ U(-1/sqrt(H), 1/sqrt(H)); an LSTM's forget-gate bias b_hh[H:2H] starts at 1 (so
    the cell remembers from the start, Jozefowicz et al. 2015). Drawn on the CPU from
    ``seed``, then moved to ``device``."""
    rng = make_rng(seed)
    bound = 1.0 / np.sqrt(config.n_hidden)
    params = {}
    for name, shape in lm_param_shapes(config).items():
        if name == "wte":
            params[name] = rng.standard_normal(shape).astype(dtype)
        else:
            params[name] = rng.uniform(-bound, bound, shape).astype(dtype)
    if config.cell == "lstm":
        H = config.n_hidden
        for layer in range(config.n_layer):
            params[f"rnn.{layer}.b_hh"][H:2 * H] = 1.0
    return to_device(params, device)


class LMCache(NamedTuple):
    emb: object        # the embedding's cache
    layers: list       # one RNN/LSTM/GRU cache per layer
    head: object       # the head's linear cache


def _layer_forward(config, params, layer, x, state):
    p = [params[f"rnn.{layer}.{n}"] for n in ("w_ih", "w_hh", "b_ih", "b_hh")]
    if config.cell == "lstm":
        return lstm_forward(x, state[0], state[1], *p)
    if config.cell == "gru":
        return gru_forward(x, state, *p)
    return rnn_forward(x, state, *p, nonlinearity=config.nonlinearity)


def lm_zero_state(config: RNNLMConfig, batch_size, like):
    """The state a sequence starts from: per layer h0 = 0 (and c0 = 0), shaped (B, H) like ``like``."""
    xp = array_module(like)
    z = lambda: xp.zeros((batch_size, config.n_hidden), dtype=like.dtype)   # noqa: E731
    return [(z(), z()) if config.cell == "lstm" else z() for _ in range(config.n_layer)]


def lm_forward(params, config: RNNLMConfig, ids, state=None):
    """ids (B, T) int -> logits (B, T, V), cache. ``state``: per layer h (LSTM: (h, c)), each
    (B, H), where the previous chunk stopped (default: zeros); lm_final_state(cache) gives
    the state after this chunk."""
    _check_lm_forward(params, config, ids, state)
    x, emb = embedding_forward(ids, params["wte"])                  # (B, T, E)
    if state is None:
        state = lm_zero_state(config, ids.shape[0], params["wte"])
    layers = []
    for layer in range(config.n_layer):
        x, cache = _layer_forward(config, params, layer, x, state[layer])   # (B, T, H)
        layers.append(cache)
    logits, head = linear_forward(x, params["lm_head.w"], params["lm_head.b"])   # (B, T, V)
    return logits, LMCache(emb, layers, head)


def lm_final_state(cache: LMCache) -> list:
    """The state after the chunk, per layer (copies): what lm_forward's ``state`` takes next."""
    out = []
    for c in cache.layers:
        s = final_state(c)
        out.append(tuple(a.copy() for a in s) if isinstance(s, tuple) else s.copy())
    return out


def lm_backward(dlogits, cache: LMCache, config: RNNLMConfig) -> dict:
    """Backward of lm_forward, in reverse: head, layers from the top, embedding.
    dlogits (B, T, V) -> grads keyed like params (the gradient stops at the initial state)."""
    grads = {}
    dx, grads["lm_head.w"], grads["lm_head.b"] = linear_backward(dlogits, cache.head)
    for layer in reversed(range(config.n_layer)):
        c = cache.layers[layer]
        if config.cell == "lstm":
            dx, _, _, *dw = lstm_backward(dx, c)
        else:
            dx, _, *dw = (gru_backward if config.cell == "gru" else rnn_backward)(dx, c)
        for n, g in zip(("w_ih", "w_hh", "b_ih", "b_hh"), dw):
            grads[f"rnn.{layer}.{n}"] = g
    grads["wte"] = embedding_backward(dx, cache.emb)
    return grads


def lm_loss_and_grads(params, config: RNNLMConfig, x, y, state=None):
    """Mean next-token cross-entropy of lm_forward(x) against y (B, T), and its gradients."""
    logits, cache = lm_forward(params, config, x, state)
    loss, ce = softmax_cross_entropy_forward(logits, y)
    return float(loss), lm_backward(softmax_cross_entropy_backward(1.0, ce), cache, config)


def lm_loss(params, config: RNNLMConfig, x, y, state=None) -> float:
    return float(softmax_cross_entropy_forward(lm_forward(params, config, x, state)[0], y)[0])


class RNNDecoder:
    """An RNN LM behind minillm.sampling's decoder protocol. Its "cache" is the recurrent
    state: feeding a block continues from it, so generation costs one step per token, with
    no context limit (block_size is unbounded). Left padding would feed pad tokens into the
    state, so a decoder samples unpadded rows only (one prompt, or prompts of one length)."""

    def __init__(self, params, config: RNNLMConfig):
        _check_lm_forward(params, config, None, None)
        self.params, self.config = params, config
        self.vocab_size, self.block_size = config.vocab_size, 2 ** 62
        self.xp = array_module(params["wte"])

    def new_cache(self, batch_size, max_len):
        return {"state": None}

    def logits(self, ids, cache=None, attention_mask=None):
        if attention_mask is not None and not bool(self.xp.asarray(attention_mask).all()):
            raise ValueError("prompt_ids: a recurrent model samples prompts of one length only "
                             "(left padding would run through its state)")
        ids = self.xp.asarray(ids)
        out, c = lm_forward(self.params, self.config, ids, None if cache is None else cache["state"])
        if cache is not None:
            cache["state"] = lm_final_state(c)
        return out


def lm_generate(params, config: RNNLMConfig, prompt_ids, max_new_tokens, temperature=1.0, top_k=None,
                top_p=None, seed=None, **kwargs):
    """Sample after ``prompt_ids`` (a list of ints) with minillm.sampling.generate, the state
    carried from token to token. -> the prompt then the new tokens, a list of ints."""
    return _sampling_generate(RNNDecoder(params, config), list(prompt_ids), max_new_tokens,
                              temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, **kwargs)[0]


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------

_GATE_NAMES = {1: "", 4: " (gates i, f, g, o stacked)", 3: " (gates r, z, n stacked)"}


def _check_rnn(kind, k, x, h0, c0, w_ih, w_hh, b_ih, b_hh, nonlinearity="tanh"):
    """x (B, T >= 1, I); w_hh (H, kH) fixes H; w_ih (I, kH); b_* (kH,); h0 (and c0) (B, H);
    one dtype and one device throughout."""
    check_choice("nonlinearity", nonlinearity, NONLINEARITIES)
    arrays = {"x": x, "h0": h0, "c0": c0, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh}
    for name, a in arrays.items():
        if a is not None or name != "c0":
            check_float(name, a)
    check_ndim("x", x, 3)
    B, T, I = x.shape
    if T < 1:
        raise ValueError(f"x: expected at least one time step (shape (B, T >= 1, I)), got {tuple(x.shape)}")
    check_ndim("w_hh", w_hh, 2)
    H = w_hh.shape[0]
    gates = _GATE_NAMES[k]
    if w_hh.shape[1] != k * H:
        raise ValueError(f"w_hh: expected shape (H, {k}H) = ({H}, {k * H}) for the {kind}{gates}, "
                         f"got {tuple(w_hh.shape)}")
    if tuple(w_ih.shape) != (I, k * H):
        raise ValueError(f"w_ih: expected shape (I, {k}H) = ({I}, {k * H}) for the {kind}{gates} "
                         f"(I from x, H from w_hh), got {tuple(w_ih.shape)}")
    for name in ("b_ih", "b_hh"):
        check_shape(name, arrays[name], (k * H,))
    for name in ("h0", "c0"):
        a = arrays[name]
        if a is not None and tuple(a.shape) != (B, H):
            raise ValueError(f"{name}: expected shape (B, H) = ({B}, {H}) (B from x, H from w_hh), "
                             f"got {tuple(a.shape)}")
    for name, a in arrays.items():
        if a is not None and name != "x":
            check_same_device(name, a, x, "x")
            if a.dtype != x.dtype:
                raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {a.dtype}")


def _check_backward(dy, y_shape, d_last, state_shape, name):
    if dy is not None and tuple(dy.shape) != tuple(y_shape):
        raise ValueError(f"dy: expected shape {tuple(y_shape)} (the forward output's), got {tuple(dy.shape)}")
    if d_last is not None:
        check_float(name, d_last)
        if tuple(d_last.shape) != tuple(state_shape):
            raise ValueError(f"{name}: expected shape {tuple(state_shape)} (the final state's), "
                             f"got {tuple(d_last.shape)}")


def _check_lm_config(config):
    check_choice("cell", config.cell, CELLS)
    check_choice("nonlinearity", config.nonlinearity, NONLINEARITIES)
    for name in ("vocab_size", "n_embd", "n_hidden", "n_layer", "block_size"):
        check_int_arg(name, getattr(config, name), lo=1)


def _check_lm_forward(params, config, ids, state):
    if not isinstance(config, RNNLMConfig):
        raise TypeError(f"config: expected an RNNLMConfig, got {type(config).__name__}")
    if not isinstance(params, dict):
        raise TypeError(f"params: expected a dict of arrays, got {type(params).__name__}")
    shapes = lm_param_shapes(config)
    if params.keys() != shapes.keys():
        raise ValueError(f"params: expected the names {sorted(shapes)}, missing "
                         f"{sorted(set(shapes) - set(params))}, extra {sorted(set(params) - set(shapes))}")
    for name, shape in shapes.items():
        check_shape(f"params[{name!r}]", params[name], shape)
    if ids is not None:
        check_ndim("ids", ids, 2)
    if state is not None and (not isinstance(state, (list, tuple)) or len(state) != config.n_layer):
        raise ValueError(f"state: expected a list of {config.n_layer} per-layer states, got "
                         f"{type(state).__name__} of length {len(state) if hasattr(state, '__len__') else '?'}")
