"""python -m minillm train medusa --checkpoint RUN: train Medusa heads on a trained GPT (its
weights frozen: Medusa-1), then measure how far ahead they guess.

1. The base: RUN, a GPT run of ``python -m minillm train``, and its token files
   (RUN/train.npy, RUN/val.npy: the split the base was trained and validated on).
2. The heads (minillm.medusa): --heads K of them, head k guessing the token k + 2 ahead;
   each a residual SiLU block (zero at the start) and a vocabulary projection copied from
   the base's LM head (--tied-heads: the base's own). The loss is sum_k w_k CE_k with
   w_k = --head-decay ** k (the paper's 0.8); the base runs forward only. minillm.train's
   loop drives it (AdamW, warmup + cosine, evaluation, checkpoints, --resume).
3. The report: each head's top-1 and top-5 accuracy on held-out windows (beside the
   base's own next-token accuracy), then greedy Medusa decoding of a held-out prompt
   against plain greedy decoding: the same tokens, and how many each step accepted.

Outputs under RUN/medusa (or --out): checkpoint.npz (the heads), metrics.jsonl, loss.svg
and results.json. ``python -m minillm sample --checkpoint RUN --medusa`` decodes with them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from minillm import backend, gpt, medusa
from minillm import data as corpus
from minillm.cli import common
from minillm.cli.common import UsageError
from minillm.data import TokenBatches
from minillm.train import CHECKPOINT_FILE, TrainConfig, load_checkpoint, train

HEADS_DIR = "medusa"          # where the heads of RUN live by default: RUN/medusa
DEFAULTS = dict(max_steps=600, batch_size=32, lr=3e-3, eval_interval=100)
ACCURACY_WINDOWS = 512        # held-out windows the accuracies are measured on


def add_arguments(parser):
    """Medusa's own options on the shared ``train`` parser (an option another model added
    already, such as --checkpoint, is shared rather than added twice)."""
    group = parser.add_argument_group("train medusa")
    _add_once(group, "--checkpoint", default=None,
              help="train medusa: the GPT run directory whose model the heads are trained on (required)")
    _add_once(group, "--heads", type=common.positive_int, default=4,
              help="train medusa: number of Medusa heads; head k guesses the token k + 2 ahead (default: 4)")
    _add_once(group, "--head-decay", type=common.nonnegative_number, default=0.8,
              help="train medusa: head k's loss weight is this ** k (the paper's 0.8; 1: all equal) "
                   "(default: 0.8)")
    _add_once(group, "--tied-heads", action="store_true",
              help="train medusa: the heads share the base's LM head instead of a copy each")


def _add_once(group, flag, **kwargs):
    try:
        group.add_argument(flag, **kwargs)
    except argparse.ArgumentError:        # another model's options brought it already
        pass


class MedusaTask:
    """Medusa heads on a frozen GPT, in the shape minillm.train.train expects."""

    def __init__(self, heads, base_params, config, tokenizer, train_tokens, val_tokens, batch_size,
                 block_size, weights, model_config, xp):
        self.params = heads
        self.base_params, self.config, self.weights = base_params, config, weights
        self.tokenizer = tokenizer
        self.batches = TokenBatches(train_tokens, val_tokens, batch_size, block_size, xp=xp)
        self.tokens_per_batch = self.batches.tokens_per_batch
        self.model_config = model_config

    def get_batch(self, split, rng):
        return self.batches.get_batch(split, rng)

    def loss_and_grads(self, params, batch):
        x, y = batch
        loss, grads, _ = medusa.loss_and_grads(params, self.base_params, self.config, x, y, self.weights)
        return loss, grads

    def eval_loss(self, params, batch):
        return self.loss_and_grads(params, batch)[0]


def run(args, log=print):
    """Train heads on the base of --checkpoint, then report their accuracy and a decoding."""
    from minillm.cli.sample import load_run
    if not args.checkpoint:
        raise UsageError("train medusa needs --checkpoint RUN: the trained GPT run the heads build on")
    if args.data is not None:
        raise UsageError("train medusa trains on the base run's own token files; --data does not apply")
    base_dir = Path(args.checkpoint)
    config, base_params, tokenizer, ck = load_run(str(base_dir), args.device)
    base_dir = Path(ck["path"]).parent
    out = Path(args.out) if args.out else base_dir / HEADS_DIR
    train_tokens, val_tokens = _token_splits(base_dir, ck, tokenizer, out, log)
    K, decay = args.heads, args.head_decay
    model_config = {"medusa": {"n_heads": K, "tied": bool(args.tied_heads), "head_decay": decay},
                    "base": config.to_dict(), "base_checkpoint": str(ck["path"]), "base_step": ck["step"]}
    tcfg = _train_config(args, config, out)
    heads = medusa.init_heads(config, K, seed=tcfg.seed, tied=args.tied_heads, device=backend.device_name(args.device),
                              lm_head=None if args.tied_heads else medusa.base_lm_head(base_params, config),
                              dtype=base_params["wte"].dtype)
    log(f"base: {ck['path']} (step {ck['step']}): {config.n_layer} layers x {config.n_embd}, context "
        f"{config.block_size}, vocabulary {config.vocab_size}; its weights stay frozen")
    log(f"heads: {K}, {'tied to' if args.tied_heads else 'each with a copy of'} the base's LM head, "
        f"{sum(int(np.prod(a.shape)) for a in heads.values()):,} parameters; loss weights "
        f"{[round(decay ** k, 3) for k in range(K)]}; run directory {out}")
    task = MedusaTask(heads, base_params, config, tokenizer, train_tokens, val_tokens, tcfg.batch_size,
                      tcfg.block_size, [decay ** k for k in range(K)], model_config, backend.xp_for(args.device))
    result = train(task, tcfg, resume=args.resume, log=log)
    log(f"final: train loss {result['train_loss']:.4f} | val loss {result['val_loss']:.4f} after "
        f"{result['step']} steps in {result['elapsed_s']:.0f} s; checkpoint {result['checkpoint']}")
    summary = {"train_loss": result["train_loss"], "val_loss": result["val_loss"], "steps": result["step"],
               **report_accuracy(heads, base_params, config, val_tokens, log),
               **show_decoding(heads, base_params, config, tokenizer, val_tokens, args.sample_tokens, log)}
    with open(out / "results.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    log(f"results: {out / 'results.json'}")
    return 130 if result.get("interrupted") else 0


def _train_config(args, config, out):
    tk = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in DEFAULTS.items()}
    block = args.block_size if args.block_size is not None else config.block_size
    if block > config.block_size:
        raise UsageError(f"--block-size: the base's context is {config.block_size} tokens, got {block}")
    return TrainConfig(**tk, block_size=block, min_lr=tk["lr"] / 10, warmup_steps=min(50, tk["max_steps"]),
                       weight_decay=0.0, betas=(0.9, 0.99), eval_iters=10, checkpoint_interval=200,
                       seed=args.seed, out_dir=str(out))


def _token_splits(base_dir, ck, tokenizer, out, log):
    """The base run's train/val token files; if they are gone, its corpus split again."""
    try:
        return corpus.load_tokens(base_dir / "train.npy"), corpus.load_tokens(base_dir / "val.npy")
    except (OSError, ValueError):
        cfg = ck.get("config") or {}
        docs = corpus.load_documents(cfg.get("data"))
        train_docs, val_docs = corpus.split_documents(docs, cfg.get("val_fraction", 0.1))
        log(f"note: {base_dir} has no token files; tokenizing its corpus again into {out}")
        out.mkdir(parents=True, exist_ok=True)
        return corpus.tokenize_splits(train_docs, val_docs, tokenizer, out)


def held_out_windows(tokens, block_size, n_windows=ACCURACY_WINDOWS):
    """(x, y): up to n_windows windows of block_size tokens spread evenly over ``tokens``
    and their next tokens, the same every time (int64 NumPy)."""
    n = int(tokens.shape[0]) - block_size - 1
    starts = np.unique(np.linspace(0, n, num=min(n_windows, n + 1)).astype(np.int64))
    x = np.stack([np.asarray(tokens[s:s + block_size], dtype=np.int64) for s in starts])
    y = np.stack([np.asarray(tokens[s + 1:s + block_size + 1], dtype=np.int64) for s in starts])
    return x, y


def heads_accuracy(heads, params, config, tokens, batch_size=32):
    """Mean top-1 / top-5 accuracy on held-out windows: (base (2,), heads (K, 2)) NumPy."""
    x, y = held_out_windows(tokens, config.block_size)
    xp = backend.array_module(params["wte"])
    base, per_head, n = 0.0, 0.0, 0
    for i in range(0, x.shape[0], batch_size):
        xb, yb = xp.asarray(x[i:i + batch_size]), xp.asarray(y[i:i + batch_size])
        b, h = medusa.head_accuracy(heads, params, config, xb, yb, ks=(1, 5))
        w = xb.shape[0]                  # every window has the same length: weight by windows
        base, per_head, n = base + w * b, per_head + w * h, n + w
    return base / n, per_head / n


def report_accuracy(heads, params, config, val_tokens, log):
    base, per_head = heads_accuracy(heads, params, config, val_tokens)
    log(f"held-out accuracy ({min(ACCURACY_WINDOWS, len(val_tokens))} windows of {config.block_size} tokens):")
    log(f"  base LM head (token t+1):  top-1 {base[0]:.3f}  top-5 {base[1]:.3f}")
    for k, (a1, a5) in enumerate(per_head):
        log(f"  Medusa head {k} (token t+{k + 2}): top-1 {a1:.3f}  top-5 {a5:.3f}")
    return {"base_top1": float(base[0]), "base_top5": float(base[1]),
            "head_top1": [float(a) for a in per_head[:, 0]], "head_top5": [float(a) for a in per_head[:, 1]]}


def show_decoding(heads, params, config, tokenizer, val_tokens, n_tokens, log, prompt_len=16):
    """Greedy Medusa decoding of a held-out prompt beside plain greedy decoding."""
    n = min(int(n_tokens), config.block_size - prompt_len)
    if n <= 0:
        return {}
    start = len(val_tokens) // 2
    prompt = [int(t) for t in val_tokens[start:start + prompt_len]]
    choices = medusa.mc_sim_tree(64, medusa.n_heads(heads))
    t0 = time.perf_counter()
    ids, stats = medusa.generate(params, config, heads, prompt, n, choices=choices)
    t1 = time.perf_counter()
    plain = gpt.generate(params, config, prompt, n, temperature=0)
    t2 = time.perf_counter()
    log(f"greedy Medusa decoding ({stats.tree_nodes}-node tree from mc_sim_7b_63) of {n} tokens after a "
        f"held-out prompt: {stats.base_calls} base forward passes for {stats.new_tokens} tokens, mean "
        f"accepted length {stats.mean_accepted_length:.2f}; {t1 - t0:.2f} s against {t2 - t1:.2f} s plain")
    log(f"  the same tokens as plain greedy decoding: {ids == plain}")
    log("-" * 60)
    log(tokenizer.decode(ids))
    log("-" * 60)
    return {"decode_same_as_greedy": ids == plain, "decode_mean_accepted_length": stats.mean_accepted_length,
            "decode_base_calls": stats.base_calls, "decode_new_tokens": stats.new_tokens}


def load_heads(path, config):
    """The heads trained for a GPT of ``config``: ``path`` is a heads directory (or its
    checkpoint.npz), or a GPT run directory holding one in medusa/. -> (heads, settings dict)"""
    p = Path(path)
    if (p / HEADS_DIR / CHECKPOINT_FILE).is_file():
        p = p / HEADS_DIR                          # a GPT run with its heads inside
    ck = load_checkpoint(p)
    mc = ck.get("model_config") or {}
    if "medusa" not in mc or "base" not in mc:
        raise UsageError(f"--medusa: {ck['path']} holds no Medusa heads (train them with "
                         f"python -m minillm train medusa --checkpoint RUN)")
    if gpt.GPTConfig.from_dict(mc["base"]) != config:
        raise UsageError(f"--medusa: the heads in {ck['path']} were trained on another model "
                         f"({mc.get('base_checkpoint')})")
    return ck["params"], {**mc["medusa"], "path": ck["path"]}
