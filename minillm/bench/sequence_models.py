"""GPT vs LSTM vs GRU vs plain RNN on char-level Shakespeare: the measured case for attention.

Four character-level language models of (about) one parameter count, --params: a GPT
(minillm.gpt, --gpt-layers blocks, width solved for the count) and the recurrent LMs of
minillm.rnn (one layer, 64-wide embeddings, the hidden size solved for the count). All see
the same corpus and held-out works as ``python -m minillm train``, one character tokenizer,
batches of --batch-size random windows of --block-size characters, AdamW at one learning
rate (warmup, then constant: no schedule, so a step means the same at any point of a run),
gradients clipped to norm 1.

1. Equal time (and equal steps): each model trains for --seconds of its own training time
   (evaluations are not counted), and on to --steps steps if it has not reached them. The
   clock (--clock) is the process's CPU time by default: on a shared, loaded machine the
   wall clock mostly measures waiting for a core, and unevenly between models; --clock
   wall uses the wall clock. Reported: the validation loss (nats per character, the same
   --eval-batches fixed held-out windows for every model) at the end of the time budget
   and at step --steps, steps done, tokens per second of the clock, wall and CPU seconds.
   ``--models`` can add ``min-char-rnn``: Karpathy's min-char-rnn
   configuration (100 tanh units on one-hot characters, Adagrad at lr 0.1, elementwise
   clipping to [-5, 5], windows of 25 walked through the text in order with the hidden
   state carried from window to window: truncated BPTT), on the same time budget.
2. CPU time per training step against the sequence length T, at batch 8: a recurrent layer
   runs T dependent steps one after another; the GPT runs every position of a layer in
   one matmul (its attention adds T^2 work).
3. The vanishing gradient: with a loss on the last position only, the norm of dL/dh_t
   (the hidden state at t, averaged over sequences) against the distance T-1-t, for the
   RNN, the LSTM (h_t and the cell c_t) and the GPT (its residual stream at the input of
   block 0), at initialisation and after part 1's training. Drawn as an SVG.

Writes OUT/results.json and three plots (OUT/val_loss.svg, OUT/step_time.svg,
OUT/gradient_norms.svg). Benchmarks measure; they do not assert.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np

from minillm import data as corpus
from minillm import gpt, rnn
from minillm.backend import atomic_write
from minillm.backprop import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from minillm.bench._util import print_table
from minillm.cli import common
from minillm.data import TokenBatches
from minillm.optim import clip_grad_norm, make_optimizer
from minillm.plot import line_plot
from minillm.tokenizer import CharTokenizer

MODELS = ("gpt", "lstm", "gru", "rnn", "min-char-rnn")
EMBD = 64                       # the recurrent LMs' embedding width


def add_arguments(parser):
    parser.add_argument("--models", default="gpt,lstm,gru,rnn",
                        help=f"comma-separated, from {', '.join(MODELS)} (default: gpt,lstm,gru,rnn)")
    parser.add_argument("--params", type=common.positive_int, default=200_000,
                        help="the parameter count every model is sized to (default: 200000)")
    parser.add_argument("--gpt-layers", type=common.positive_int, default=4, help="GPT blocks (default: 4)")
    parser.add_argument("--seconds", type=common.nonnegative_number, default=30.0,
                        help="training time per model in part 1, on --clock (default: 30)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="part 1's budget is CPU seconds of this process (fair on a loaded machine) "
                             "or wall seconds (default: cpu)")
    parser.add_argument("--steps", type=common.positive_int, default=100,
                        help="part 1 also reports the validation loss at this step, training on "
                             "until every model reaches it (default: 100)")
    parser.add_argument("--batch-size", type=common.positive_int, default=32, help="(default: 32)")
    parser.add_argument("--block-size", type=common.positive_int, default=64, help="(default: 64)")
    parser.add_argument("--lr", type=common.number_in(0.0, lo_open=True), default=3e-3,
                        help="AdamW's learning rate after 20 warmup steps (default: 0.003)")
    parser.add_argument("--eval-batches", type=common.positive_int, default=8,
                        help="held-out batches of the validation loss (default: 8)")
    parser.add_argument("--lengths", default="16,32,64,128,256",
                        help="part 2's sequence lengths (default: 16,32,64,128,256)")
    parser.add_argument("--grad-length", type=common.int_at_least(2), default=64,
                        help="part 3's sequence length (default: 64)")
    parser.add_argument("--parts", default="1,2,3", help="which parts to run (default: 1,2,3)")
    parser.add_argument("--seed", type=common.seed, default=0, help="(default: 0)")
    parser.add_argument("--out", default="runs/bench-sequence-models",
                        help="where results.json and the plots go (default: runs/bench-sequence-models)")


# ---------------------------------------------------------------------------
# The models, sized to one parameter count
# ---------------------------------------------------------------------------

def _count(params):
    return int(sum(int(np.prod(p.shape)) for p in params.values()))


def _rnn_config(cell, n_params, V, T):
    """The recurrent LM whose parameter count is closest to n_params (hidden size searched)."""
    def size(H):
        cfg = rnn.RNNLMConfig(cell=cell, vocab_size=V, n_embd=EMBD, n_hidden=H, block_size=T)
        return sum(int(np.prod(s)) for s in rnn.lm_param_shapes(cfg).values()), cfg
    return min((size(H) for H in range(8, 2049, 4)), key=lambda sc: abs(sc[0] - n_params))[1]


def _gpt_config(n_params, V, T, n_layer):
    """The GPT (heads of 16) whose parameter count is closest to n_params (width searched)."""
    def size(C):
        cfg = gpt.GPTConfig(vocab_size=V, block_size=T, n_layer=n_layer, n_head=C // 16, n_embd=C,
                            dropout=0.0, bias=True)
        return sum(int(np.prod(s)) for s in gpt.param_shapes(cfg).values()), cfg
    return min((size(C) for C in range(16, 1025, 16)), key=lambda sc: abs(sc[0] - n_params))[1]


class _Model:
    """One model behind one interface: init, loss_and_grads, loss (x, y: (B, T) ids)."""

    def __init__(self, name, config, seed):
        self.name, self.config = name, config
        if name == "gpt":
            self.params = gpt.init_params(config, seed=seed)
        else:
            self.params = rnn.init_lm_params(config, seed=seed)
        self.n_params = _count(self.params)

    def describe(self):
        c = self.config
        if self.name == "gpt":
            return f"GPT {c.n_layer} x {c.n_embd}, {c.n_head} heads"
        return f"{c.cell.upper()} 1 x {c.n_hidden}, embeddings {c.n_embd}"

    def loss_and_grads(self, x, y):
        if self.name == "gpt":
            return gpt.loss_and_grads(self.params, self.config, x, y)
        return rnn.lm_loss_and_grads(self.params, self.config, x, y)

    def loss(self, x, y):
        if self.name == "gpt":
            return gpt.loss(self.params, self.config, x, y)
        return rnn.lm_loss(self.params, self.config, x, y)


def _build(name, n_params, V, T, n_layer, seed):
    if name == "gpt":
        return _Model(name, _gpt_config(n_params, V, T, n_layer), seed)
    return _Model(name, _rnn_config(name, n_params, V, T), seed)


# ---------------------------------------------------------------------------
# Part 1: equal time, equal steps
# ---------------------------------------------------------------------------

def _val_loss(loss_fn, val_batches):
    return float(np.mean([loss_fn(x, y) for x, y in val_batches]))


def _train_timed(model, batches, val_batches, args, log):
    """Train until --seconds of training time (on --clock) and --steps steps have both passed;
    evaluate at step --steps, at the time budget and at five points of it on the way."""
    opt = make_optimizer("adamw", model.params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    rng = np.random.default_rng([args.seed, 1])
    rec = {"model": model.name, "what": model.describe(), "params": model.n_params, "curve": []}
    wall = cpu = 0.0
    step, marks = 0, [args.seconds * k / 5 for k in range(1, 6)]
    clock = (lambda: cpu) if args.clock == "cpu" else (lambda: wall)    # noqa: E731
    while clock() < args.seconds or step < args.steps:
        x, y = batches.get_batch("train", rng)
        t0, c0 = time.perf_counter(), time.process_time()
        loss, grads = model.loss_and_grads(x, y)
        clip_grad_norm(grads, 1.0)
        opt.lr = args.lr * min(1.0, (step + 1) / 20)
        opt.step(grads)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        step += 1
        if not math.isfinite(loss):
            log(f"  {model.name}: the loss is {loss} at step {step}: stopped")
            break
        if step == args.steps:
            rec["val_at_steps"], rec["time_at_steps"] = _val_loss(model.loss, val_batches), clock()
            log(f"    {model.name} step {step}: {clock():.0f} {args.clock} s, val loss {rec['val_at_steps']:.4f}")
        while marks and clock() >= marks[0]:
            marks.pop(0)
            v = _val_loss(model.loss, val_batches)
            rec["curve"].append((clock(), v))
            log(f"    {model.name} step {step}: {clock():.0f} {args.clock} s, val loss {v:.4f}")
            if not marks:
                rec.update(val_at_time=v, steps_in_time=step, wall_s=wall, cpu_s=cpu, train_loss=float(loss),
                           tokens_per_s=step * batches.tokens_per_batch / max(clock(), 1e-9))
                log(f"  {model.name}: {step} steps in {wall:.0f} wall s, {cpu:.0f} CPU s; val loss {v:.4f}")
    rec.setdefault("val_at_time", _val_loss(model.loss, val_batches))
    return rec


def _min_char_rnn(V, train_tokens, val_batches, args, log):
    """Karpathy's min-char-rnn (2015): 100 tanh units on one-hot characters, Adagrad lr 0.1,
    gradients clipped elementwise to [-5, 5], windows of 25 walked through the text in order,
    the hidden state carried across windows (truncated BPTT), weights ~ N(0, 0.01^2)."""
    H, seq, lr = 100, 25, 0.1
    rng = np.random.default_rng(args.seed)
    p = {"w_ih": rng.standard_normal((V, H)) * 0.01, "w_hh": rng.standard_normal((H, H)) * 0.01,
         "b_ih": np.zeros(H), "b_hh": np.zeros(H), "w_out": rng.standard_normal((H, V)) * 0.01,
         "b_out": np.zeros(V)}
    p = {k: v.astype(np.float32) for k, v in p.items()}
    mem = {k: np.zeros_like(v) for k, v in p.items()}
    eye = np.eye(V, dtype=np.float32)

    def forward(ids, h0):
        y, cache = rnn.rnn_forward(eye[ids], h0, p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"])
        return y, cache, y @ p["w_out"] + p["b_out"]

    def loss(x, t):
        return float(softmax_cross_entropy_forward(forward(x, np.zeros((x.shape[0], H), np.float32))[2], t)[0])

    rec = {"model": "min-char-rnn", "what": "RNN 1 x 100 on one-hot chars, Adagrad 0.1, seq 25, state carried",
           "params": _count(p), "curve": []}
    h, pos, step, wall, cpu = np.zeros((1, H), np.float32), 0, 0, 0.0, 0.0
    marks = [args.seconds * k / 5 for k in range(1, 6)]
    clock = (lambda: cpu) if args.clock == "cpu" else (lambda: wall)    # noqa: E731
    while clock() < args.seconds:
        t0, c0 = time.perf_counter(), time.process_time()
        if pos + seq + 1 > len(train_tokens):
            pos, h = 0, np.zeros((1, H), np.float32)
        chunk = np.asarray(train_tokens[pos:pos + seq + 1], dtype=np.int64)
        y, cache, logits = forward(chunk[None, :-1], h)
        _, ce = softmax_cross_entropy_forward(logits, chunk[None, 1:])
        dlogits = softmax_cross_entropy_backward(1.0, ce) * seq      # Karpathy sums over the window
        g = {"w_out": y[0].T @ dlogits[0], "b_out": dlogits[0].sum(axis=0)}
        _, _, g["w_ih"], g["w_hh"], g["b_ih"], g["b_hh"] = rnn.rnn_backward(dlogits @ p["w_out"].T, cache)
        for k in p:
            gk = np.clip(g[k], -5, 5)
            mem[k] += gk * gk
            p[k] -= lr * gk / np.sqrt(mem[k] + 1e-8)
        h = rnn.final_state(cache).copy()                            # the next window starts here
        pos, step = pos + seq, step + 1
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        while marks and clock() >= marks[0]:
            marks.pop(0)
            rec["curve"].append((clock(), _val_loss(loss, val_batches)))
            log(f"    min-char-rnn window {step}: {clock():.0f} {args.clock} s, val loss {rec['curve'][-1][1]:.4f}")
    v = rec["curve"][-1][1] if rec["curve"] else _val_loss(loss, val_batches)
    rec.update(val_at_time=v, steps_in_time=step, wall_s=wall, cpu_s=cpu,
               tokens_per_s=step * seq / max(clock(), 1e-9))
    log(f"  min-char-rnn: {step} windows in {wall:.0f} wall s, {cpu:.0f} CPU s; val loss {v:.4f}")
    return rec


def _data(args, log):
    train_docs, val_docs = corpus.split_documents(corpus.load_documents(None), 0.1)
    train_text = corpus.join_documents(train_docs)
    tok = CharTokenizer.from_text(train_text, unk="\ufffd")
    train_tokens = np.asarray(tok.encode(train_text), dtype=np.int64)
    val_tokens = np.asarray(tok.encode(corpus.join_documents(val_docs)), dtype=np.int64)
    log(f"corpus: Shakespeare, {len(train_tokens):,} training and {len(val_tokens):,} held-out characters, "
        f"{tok.vocab_size} symbols")
    batches = TokenBatches(train_tokens, val_tokens, args.batch_size, args.block_size)
    vr = np.random.default_rng([args.seed, 2])
    val_batches = [batches.get_batch("val", vr) for _ in range(args.eval_batches)]
    return tok.vocab_size, train_tokens, batches, val_batches


def part1(args, models, V, train_tokens, batches, val_batches, log):
    log(f"\n1. equal time ({args.seconds:g} {args.clock} s of training each) and equal steps ({args.steps})")
    recs = []
    for m in models:
        recs.append(_train_timed(m, batches, val_batches, args, log))
    if "min-char-rnn" in args.model_list:
        recs.append(_min_char_rnn(V, train_tokens, val_batches, args, log))
    rows = [[r["model"], r["what"], f"{r['params']:,}", f"{r['val_at_time']:.4f}", r.get("steps_in_time", "-"),
             f"{r['val_at_steps']:.4f}" if "val_at_steps" in r else "-",
             f"{r.get('tokens_per_s', 0):,.0f}", f"{r.get('wall_s', 0):.0f}", f"{r.get('cpu_s', 0):.0f}"]
            for r in recs]
    print_table(rows, ["model", "", "params", f"val @ {args.seconds:g} {args.clock} s", "steps",
                       f"val @ step {args.steps}", f"tokens/{args.clock} s", "wall s", "CPU s"])
    return recs


# ---------------------------------------------------------------------------
# Part 2: time per step against the sequence length
# ---------------------------------------------------------------------------

def part2(args, names, V, log):
    lengths = [int(t) for t in args.lengths.split(",")]
    log("\n2. CPU ms per training step (forward + backward) at batch 8, best of 3, against T")
    rng = np.random.default_rng(args.seed)
    table, series = {}, {}
    for name in names:
        m = _build(name, args.params, V, max(lengths), args.gpt_layers, args.seed)
        for T in lengths:
            x, y = rng.integers(0, V, (8, T)), rng.integers(0, V, (8, T))
            m.loss_and_grads(x, y)
            best = math.inf
            for _ in range(3):
                t0 = time.process_time()
                m.loss_and_grads(x, y)
                best = min(best, time.process_time() - t0)
            table[(name, T)] = best * 1e3
        series[name] = [(T, table[(name, T)]) for T in lengths]
    rows = [[n] + [f"{table[(n, T)]:.1f}" for T in lengths]
            + [f"{table[(n, lengths[-1])] / table[(n, lengths[0])]:.1f}x"] for n in names]
    print_table(rows, ["model"] + [f"T={T}" for T in lengths] + [f"T={lengths[-1]} / T={lengths[0]}"])
    path = line_plot(Path(args.out) / "step_time.svg", series, title="CPU time per training step (batch 8)",
                     xlabel="sequence length T", ylabel="CPU ms per step", log_x=True, log_y=True)
    log(f"plot: {path}")
    return {f"{n}@{T}": v for (n, T), v in table.items()}


# ---------------------------------------------------------------------------
# Part 3: the vanishing gradient
# ---------------------------------------------------------------------------

def rnn_state_gradients(params, config, ids, targets):
    """Norms of dL/dh_t (and, for an LSTM, dL/dc_t) of a 1-layer recurrent LM, where L is the
    mean cross-entropy of the last position only, averaged over the batch's sequences.

    dL/dh_t is what the backward carries into step t; it is read off here with truncated
    BPTT itself: rerun steps t+1..T-1 from the state at t and take the backward's dh0 (dc0,
    plus dh0's share through h_t = o_t tanh(c_t): c_t reaches the loss both ways).
    -> (h norms, c norms or None), each indexed by t."""
    logits, cache = rnn.lm_forward(params, config, ids)
    B, T = ids.shape
    last = np.full_like(targets, -100)
    last[:, -1] = targets[:, -1]
    _, ce = softmax_cross_entropy_forward(logits, last)
    dlast = softmax_cross_entropy_backward(1.0, ce)[:, -1] @ params["lm_head.w"].T     # dL/dh_{T-1}
    layer = cache.layers[0]
    x = params["wte"][ids]                                                             # (B, T, E)
    w = [params[f"rnn.0.{n}"] for n in ("w_ih", "w_hh", "b_ih", "b_hh")]
    hn, cn = np.zeros(T), np.zeros(T)
    hn[T - 1] = np.linalg.norm(dlast, axis=1).mean()
    for t in range(T - 1):
        dy = np.zeros((B, T - 1 - t, config.n_hidden), dtype=logits.dtype)
        dy[:, -1] = dlast
        if config.cell == "lstm":
            _, c = rnn.lstm_forward(x[:, t + 1:], layer.y[:, t], layer.c[:, t], *w)
            _, dh, dc, *_ = rnn.lstm_backward(dy, c)
            H = config.n_hidden        # c_t also reaches the loss through h_t = o_t tanh(c_t)
            o, tc = layer.gates[:, t, 3 * H:], np.tanh(layer.c[:, t])
            cn[t] = np.linalg.norm(dc + dh * o * (1 - tc * tc), axis=1).mean()
        elif config.cell == "gru":
            _, c = rnn.gru_forward(x[:, t + 1:], layer.y[:, t], *w)
            dh = rnn.gru_backward(dy, c)[1]
        else:
            _, c = rnn.rnn_forward(x[:, t + 1:], layer.y[:, t], *w, nonlinearity=config.nonlinearity)
            dh = rnn.rnn_backward(dy, c)[1]
        hn[t] = np.linalg.norm(dh, axis=1).mean()
    if config.cell == "lstm":     # dL/dc_{T-1} = dL/dh_{T-1} * o * (1 - tanh(c)^2)
        H = config.n_hidden
        o, tc = layer.gates[:, -1, 3 * H:], np.tanh(layer.c[:, -1])
        cn[T - 1] = np.linalg.norm(dlast * o * (1 - tc * tc), axis=1).mean()
    return hn, (cn if config.cell == "lstm" else None)


def gpt_stream_gradients(params, config, ids, targets):
    """Norms of dL/dx_t, x the GPT's residual stream at the input of block 0, L the
    last position's cross-entropy, averaged over sequences: with learned positions
    x_t = wte[id_t] + wpe[t], so dL/dx_t is exactly the gradient of wpe's row t (one
    sequence at a time)."""
    B, T = ids.shape
    norms = np.zeros(T)
    for b in range(B):
        last = np.full((1, T), -100)
        last[0, -1] = targets[b, -1]
        _, grads = gpt.loss_and_grads(params, config, ids[b:b + 1], last)
        norms += np.linalg.norm(grads["wpe"][:T], axis=1) / B
    return norms


def part3(args, trained, V, val_tokens, log):
    T = args.grad_length
    log(f"\n3. the vanishing gradient: ||dL/dh_t|| against the distance T-1-t from the loss (T={T})")
    x, y = TokenBatches(val_tokens, val_tokens, 8, T).get_batch("val", np.random.default_rng([args.seed, 3]))
    series, out = {}, {}
    for when, models in (("init", {n: _build(n, args.params, V, T, args.gpt_layers, args.seed)
                                   for n in ("rnn", "lstm", "gpt")}), ("trained", trained)):
        for name in ("rnn", "lstm", "gpt"):
            m = models.get(name)
            if m is None:
                continue
            if name == "gpt":
                cfg = m.config if m.config.block_size >= T else None
                if cfg is None:
                    continue
                out[f"gpt residual stream ({when})"] = gpt_stream_gradients(m.params, cfg, x, y)
            else:
                cfg = m.config
                hn, cn = rnn_state_gradients(m.params, cfg, x, y)
                out[f"{name} h_t ({when})"] = hn
                if cn is not None:
                    out[f"lstm c_t ({when})"] = cn
    dists = [d for d in (0, 1, 2, 4, 8, 16, 32, 63, 127) if d < T]
    rows = [[k] + [f"{v[T - 1 - d]:.2e}" for d in dists] for k, v in out.items()]
    print_table(rows, ["||dL/d state_t||"] + [f"d={d}" for d in dists])
    for k, v in out.items():
        series[k] = [(T - 1 - t, float(v[t])) for t in range(T)]
    path = line_plot(Path(args.out) / "gradient_norms.svg", series,
                     title="gradient reaching the state t steps before the loss",
                     xlabel="distance from the loss (steps)", ylabel="mean ||dL/d state||", log_y=True,
                     x_from_zero=True)
    log(f"plot: {path}")
    return {k: [float(a) for a in v] for k, v in out.items()}


def run(args):
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.model_list if m not in MODELS]
    if bad or not args.model_list:
        raise common.UsageError(f"--models: expected names from {', '.join(MODELS)}, got {args.models!r}")
    parts = {p.strip() for p in args.parts.split(",")}
    if not parts <= {"1", "2", "3"}:
        raise common.UsageError(f"--parts: expected some of 1,2,3, got {args.parts!r}")
    os.makedirs(args.out, exist_ok=True)
    log = lambda s: print(s, flush=True)   # noqa: E731
    V, train_tokens, batches, val_batches = _data(args, log)
    names = [n for n in args.model_list if n != "min-char-rnn"]
    models = {n: _build(n, args.params, V, args.block_size, args.gpt_layers, args.seed) for n in names}
    for m in models.values():
        log(f"  {m.name}: {m.describe()}, {m.n_params:,} parameters")
    results = {"settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
               "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if "1" in parts:
        results["part1"] = part1(args, list(models.values()), V, train_tokens, batches, val_batches, log)
        curves = {r["model"]: r["curve"] for r in results["part1"]}
        path = line_plot(Path(args.out) / "val_loss.svg", curves, title="validation loss",
                         xlabel=f"training time ({args.clock} s)", ylabel="nats per character", x_from_zero=True)
        log(f"plot: {path}")
    if "2" in parts and names:
        results["part2_ms_per_step"] = part2(args, names, V, log)
    if "3" in parts:
        results["part3_grad_norms"] = part3(args, models if "1" in parts else {}, V, batches.splits["val"], log)
    results["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    path = Path(args.out) / "results.json"
    atomic_write(path, lambda f: f.write(json.dumps(results, indent=1, default=str).encode()))
    log(f"results: {path}")
    return 0
