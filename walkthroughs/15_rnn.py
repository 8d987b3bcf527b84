"""Walkthrough 15: recurrent networks, why their gradients vanish, and why attention parallelises.

Before the Transformer, a language model read text one token at a time and carried a
hidden state h from step to step: h_t = tanh(x_t W_ih + b_ih + h_{t-1} W_hh + b_hh). We
compute one step by hand, check backpropagation through time against finite differences,
then measure the two weaknesses attention removes:

  * the gradient reaching a token t steps back is a product of t Jacobians, and for a
    plain RNN it shrinks geometrically: the vanishing gradient;
  * step t cannot start before step t-1 has finished: the loop over time is sequential.

The LSTM's cell c_t = f * c_{t-1} + i * g is the fix for the first (its gradient is
multiplied by the forget gate only); attention is the fix for both.

Run: python walkthroughs/15_rnn.py      (about a second; MINILLM_FAST=1 changes nothing)
"""
import time

import numpy as np

from _narrate import check, expect_close, expect_gradcheck, step
from minillm import attention, rnn
from minillm import backprop as bp

rng = np.random.default_rng(0)
B, T, I, H = 4, 40, 8, 32
bound = 1 / np.sqrt(H)


def uniform(*shape):
    """PyTorch's initialisation of recurrent weights: U(-1/sqrt(H), 1/sqrt(H))."""
    return rng.uniform(-bound, bound, shape)


# ---------------------------------------------------------------------------
step(1, "One step of a plain RNN, by hand")
# ---------------------------------------------------------------------------
x = rng.standard_normal((B, T, I))
h0 = np.zeros((B, H))
w_rnn = [uniform(I, H), uniform(H, H), uniform(H), uniform(H)]
w_ih, w_hh, b_ih, b_hh = w_rnn
y, cache = rnn.rnn_forward(x, h0, *w_rnn)
h1 = np.tanh(x[:, 0] @ w_ih + b_ih + h0 @ w_hh + b_hh)
h2 = np.tanh(x[:, 1] @ w_ih + b_ih + h1 @ w_hh + b_hh)
print("h_1 = tanh(x_1 W_ih + b_ih + h_0 W_hh + b_hh), h_2 the same with h_1: each step needs the last.")
print(f"y = rnn_forward(x, h0, ...): {y.shape} = (B, T, H), the state after every step")
expect_close("rnn_forward's first two states vs the formula", y[:, :2], np.stack([h1, h2], axis=1), 1e-14)


# ---------------------------------------------------------------------------
step(2, "Backpropagation through time, checked by finite differences")
# ---------------------------------------------------------------------------
print("""The backward walks the steps in reverse: the gradient at h_t is what the loss says
about y_t plus what flows back from step t+1, then goes through tanh and W_hh to h_{t-1}.""")
xs, hs = rng.standard_normal((2, 3, 3)), rng.standard_normal((2, 4))
for kind, k in (("RNN", 1), ("LSTM", 4), ("GRU", 3)):
    ws = [rng.standard_normal(s) * 0.5 for s in ((3, k * 4), (4, k * 4), (k * 4,), (k * 4,))]
    if kind == "LSTM":
        rep = bp.gradcheck(rnn.lstm_forward, rnn.lstm_backward, [xs, hs, hs.copy(), *ws])
    elif kind == "GRU":
        rep = bp.gradcheck(rnn.gru_forward, rnn.gru_backward, [xs, hs, *ws])
    else:
        rep = bp.gradcheck(rnn.rnn_forward, rnn.rnn_backward, [xs, hs, *ws])
    expect_gradcheck(f"{kind} backward", rep)
    print(f"  {kind:4s}: worst relative error {rep.max_rel_error:.1e} over x, the states and every weight")


# ---------------------------------------------------------------------------
step(3, "Why the gradient vanishes")
# ---------------------------------------------------------------------------
print("""Put a loss on the last step only and look at the gradient reaching the input d steps
back, ||dL/dx_{T-1-d}||. Between two steps it is multiplied by diag(1 - h_t^2) W_hh^T:
with weights of the usual scale that product shrinks by a roughly constant factor a step.""")
dy = np.zeros_like(y)
dy[:, -1] = rng.standard_normal((B, H))
dx_rnn = rnn.rnn_backward(dy, cache)[0]
g_rnn = np.linalg.norm(dx_rnn, axis=2).mean(axis=0)[::-1]        # index d = distance from the loss
g_rnn = g_rnn / g_rnn[0]

w_lstm = [uniform(I, 4 * H), uniform(H, 4 * H), uniform(4 * H), uniform(4 * H)]
w_lstm[3][H:2 * H] += 3.0       # forget-gate bias 3: f = sigmoid(~3) ~ 0.95, the cell remembers
y_l, cache_l = rnn.lstm_forward(x, h0, h0, *w_lstm)
dx_lstm = rnn.lstm_backward(dy, cache_l)[0]
g_lstm = np.linalg.norm(dx_lstm, axis=2).mean(axis=0)[::-1]
g_lstm = g_lstm / g_lstm[0]
print(f"\n{'distance d':>10s} {'RNN':>10s} {'LSTM':>10s}   (||dL/dx|| relative to d = 0)")
for d in (0, 1, 5, 10, 20, 30, 39):
    print(f"{d:10d} {g_rnn[d]:10.1e} {g_lstm[d]:10.1e}")
rate = (g_rnn[30] / g_rnn[10]) ** (1 / 20)
print(f"\nthe RNN loses a factor {1 / rate:.1f} a step: after 30 steps the input is {g_rnn[30]:.0e} as loud;")
print(f"the LSTM still hears it at {g_lstm[30]:.2f}.")
check(g_rnn[30] < 1e-6, f"the RNN's gradient 30 steps back should have vanished (< 1e-6), got {g_rnn[30]:.1e}")
check(g_lstm[30] > 1e-2, f"the LSTM's gradient 30 steps back should survive (> 1e-2), got {g_lstm[30]:.1e}")
check(np.all(np.diff(np.log(g_rnn[1:35])) < 0), "the RNN's gradient should shrink at every step")


# ---------------------------------------------------------------------------
step(4, "What the LSTM's cell changes: dc_{t-1} = dc_t * f_t")
# ---------------------------------------------------------------------------
print("""c_t = f_t * c_{t-1} + i_t * g_t is a sum, not a squashed matrix product: the gradient
flows back along c multiplied by the forget gate only, elementwise. Shut the output gate
(o = 0, so h carries nothing and W_hh plays no part) and the gradient at c_0 is exactly the
gradient at c_T times the product of the forget gates.""")
w_shut = [w.copy() for w in w_lstm]
w_shut[3][3 * H:] = -60.0                                        # o = sigmoid(-60) ~ 1e-26
c0 = rng.standard_normal((B, H))
_, cache_s = rnn.lstm_forward(x, h0, c0, *w_shut)
dc_last = rng.standard_normal((B, H))
dc0 = rnn.lstm_backward(np.zeros((B, T, H)), cache_s, dc_last=dc_last)[2]
f = cache_s.gates[:, :, H:2 * H]                                 # (B, T, H) the forget gates
print(f"mean forget gate {f.mean():.3f}; product over {T} steps: mean {np.prod(f, axis=1).mean():.3f}")
expect_close("dc_0 vs dc_T * prod_t f_t", dc0, dc_last * np.prod(f, axis=1), 1e-13)
print("""With f near 1 the cell is a highway for the gradient; the network learns when to
close it. A plain RNN has no such path: every step multiplies by W_hh and tanh's slope.""")


# ---------------------------------------------------------------------------
step(5, "Why attention parallelises")
# ---------------------------------------------------------------------------
print("""An RNN's state at t needs the state at t-1, so its T steps run one after another.
Causal self-attention computes position t from the inputs x_1..x_t alone, so every position
can be computed at once, or in any order, or on different processors.""")
Bq, Tq, C = 2, 16, 8
xa = rng.standard_normal((Bq, Tq, C))
q, k, v = xa @ rng.standard_normal((C, C)), xa @ rng.standard_normal((C, C)), xa @ rng.standard_normal((C, C))
all_at_once, _ = attention.sdpa_forward(q[:, None], k[:, None], v[:, None], causal=True)
one_by_one = np.stack([attention.sdpa_forward(q[:, None, t:t + 1], k[:, None, :t + 1], v[:, None, :t + 1])[0][:, 0, 0]
                       for t in reversed(range(Tq))][::-1], axis=1)   # computed last position first
expect_close("attention: all positions in one call vs each alone, in reverse order", all_at_once[:, 0],
             one_by_one, 1e-12)
# The RNN in "any order" is wrong: starting each step from h0 instead of h_{t-1} is another function.
independent = np.tanh(x @ w_ih + b_ih + h0[:, None] @ w_hh + b_hh)
check(np.max(np.abs(independent[:, 1:] - y[:, 1:])) > 1e-2,
      "an RNN's steps should depend on each other (computing them from h0 alone gives other states)")
print("the same shortcut for the RNN (every step from h_0) gives different states: it cannot be split.")

# What that costs: the recurrent matmuls h_{t-1} W_hh of T steps against one matmul over all
# B*T positions (the same multiply-adds, which is what attention's projections do).
Bt, Tt, Ht = 8, 256, 128
hseq, W = rng.standard_normal((Bt, Tt, Ht)), rng.standard_normal((Ht, Ht))


def best_cpu(fn, repeat=5):
    best = np.inf
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


t_seq = best_cpu(lambda: [hseq[:, t] @ W for t in range(Tt)])
t_par = best_cpu(lambda: hseq.reshape(-1, Ht) @ W)
print(f"""T = {Tt} dependent (B, H) @ (H, H) matmuls: {t_seq * 1e3:.2f} CPU ms; the same work as one
(B*T, H) @ (H, H) matmul: {t_par * 1e3:.2f} CPU ms (measured, not checked: on one core the
arithmetic is the same and only the per-call overhead differs; with many cores or a GPU the
one big matmul spreads over all of them and the loop cannot).
python -m minillm bench sequence-models measures whole models (BENCHMARKS.md, issue 15).""")
