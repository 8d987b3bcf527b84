"""python -m minillm train rnn|lstm|gru: a recurrent character-level language model, trained
like the GPT: the same corpus and validation split, tokenizer, training loop (minillm.train:
AdamW, warmup + cosine, evaluation, checkpoints, --resume), and a sample at the end.

The model (minillm.rnn): an embedding, --layers recurrent layers (a plain tanh RNN, an LSTM
or a GRU) and a linear LM head. Each training window of --block-size characters starts
from a zero state, exactly as the GPT's context does, and is backpropagated through all of
its steps; generation carries the state from character to character, so it has no context
limit. ``python -m minillm sample --checkpoint RUN`` samples from a run too.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from minillm import backend, rnn
from minillm import data as corpus
from minillm.cli import common
from minillm.cli.common import UsageError
from minillm.data import TokenBatches
from minillm.tokenizer import tokenizer_from_dict
from minillm.train import CHECKPOINT_FILE, TrainConfig, load_checkpoint, train

# name -> (what it is for, model settings, training settings). Only these two: the GPT's
# other presets (llama, shakespeare-char) describe transformers.
PRESETS = {
    "default": (
        "a CPU run of a few minutes: 1 layer of 256 units, 64-wide embeddings, windows of 64 characters",
        dict(n_embd=64, n_hidden=256, n_layer=1),
        dict(block_size=64, batch_size=32, max_steps=600, lr=3e-3, min_lr=3e-4, warmup_steps=50,
             eval_interval=100, eval_iters=10, betas=(0.9, 0.99), weight_decay=0.0, checkpoint_interval=200)),
    "tiny": (
        "a smoke test: 1 layer of 32 units, a few steps (checks the plumbing, learns little)",
        dict(n_embd=16, n_hidden=32, n_layer=1),
        dict(block_size=16, batch_size=8, max_steps=20, lr=3e-3, min_lr=3e-4, warmup_steps=5,
             eval_interval=10, eval_iters=4, betas=(0.9, 0.99), weight_decay=0.0, checkpoint_interval=0)),
}


class RNNTask:
    """A recurrent LM on two token streams, in the shape minillm.train.train expects."""

    def __init__(self, config, params, tokenizer, train_tokens, val_tokens, batch_size, block_size, xp):
        self.config, self.params, self.tokenizer = config, params, tokenizer
        self.batches = TokenBatches(train_tokens, val_tokens, batch_size, block_size, xp=xp)
        self.tokens_per_batch = self.batches.tokens_per_batch
        self.model_config = config.to_dict()

    def get_batch(self, split, rng):
        return self.batches.get_batch(split, rng)

    def loss_and_grads(self, params, batch):
        x, y = batch
        return rnn.lm_loss_and_grads(params, self.config, x, y)

    def eval_loss(self, params, batch):
        x, y = batch
        return rnn.lm_loss(params, self.config, x, y)


def is_rnn_checkpoint(ck) -> bool:
    mc = ck.get("model_config") if isinstance(ck, dict) else None
    return isinstance(mc, dict) and mc.get("model") == rnn.MODEL_NAME


def latest_rnn_run(root="runs", cell=None):
    """The most recently written run under ``root`` holding a recurrent LM (of ``cell``)."""
    root = Path(root)
    runs = [d for d in (root.iterdir() if root.is_dir() else []) if (d / CHECKPOINT_FILE).is_file()]
    for d in sorted(runs, key=lambda d: (d / CHECKPOINT_FILE).stat().st_mtime_ns, reverse=True):
        try:
            with open(d / "checkpoint.json", encoding="utf-8") as f:
                mc = json.load(f)["model_config"]
        except (OSError, ValueError, KeyError):
            continue
        if isinstance(mc, dict) and mc.get("model") == rnn.MODEL_NAME and cell in (None, mc.get("cell")):
            return d
    raise UsageError(f"--resume: no {cell or 'recurrent'} run under {root}/ (give its directory with --out)")


def run(args, log=print):
    """Train a recurrent LM: settings, corpus and tokens, model, the loop, a report, a sample."""
    from minillm.cli import train as train_cli     # its corpus, tokenizer and report helpers
    if args.preset not in PRESETS:
        raise UsageError(f"--preset: train {args.model} takes one of {', '.join(sorted(PRESETS))}, "
                         f"got {args.preset!r} (a GPT preset)")
    xp, device = backend.xp_for(args.device), backend.device_name(args.device)
    if args.resume:
        ck, tcfg, out = _resumed_settings(args, log)
        config, tokenizer = rnn.RNNLMConfig.from_dict(ck["model_config"]), tokenizer_from_dict(ck["tokenizer"])
    else:
        ck, (tcfg, out) = None, _new_settings(args, log)
    train_docs, val_docs = train_cli._load_corpus(tcfg, log)
    if ck is None:
        tokenizer = train_cli._build_tokenizer(args.tokenizer, corpus.join_documents(train_docs),
                                               args.bpe_vocab, log)
        config = rnn.RNNLMConfig(cell=args.model, vocab_size=tokenizer.vocab_size, block_size=tcfg.block_size,
                                 **PRESETS[args.preset][1])
    train_tokens, val_tokens = corpus.tokenize_splits(train_docs, val_docs, tokenizer, out)
    log(f"tokenizer: {type(tokenizer).__name__}, {tokenizer.vocab_size} tokens; {len(train_tokens):,} "
        f"training and {len(val_tokens):,} validation tokens")
    params = rnn.init_lm_params(config, seed=tcfg.seed, device=device)
    n = sum(int(np.prod(p.shape)) for p in params.values())
    log(f"model: {config.cell.upper()} LM, {config.n_layer} layer(s) x {config.n_hidden} units, embeddings "
        f"{config.n_embd}, windows of {config.block_size} tokens: {n:,} parameters")
    log(f"device: {device} ({xp.__name__}); batch {tcfg.batch_size} x {tcfg.block_size} tokens, "
        f"{tcfg.max_steps} steps, lr {tcfg.lr:g} -> {tcfg.min_lr:g}; run directory {out}")
    task = RNNTask(config, params, tokenizer, train_tokens, val_tokens, tcfg.batch_size, tcfg.block_size, xp)
    result = train(task, tcfg, resume=ck is not None, log=log)
    train_cli._report(result, out, log)
    if args.sample_tokens > 0:
        prompt = tokenizer.encode("\n")
        ids = rnn.lm_generate(params, config, prompt, args.sample_tokens, temperature=0.8, seed=tcfg.seed)
        log(f"sample ({args.sample_tokens} tokens, temperature 0.8; python -m minillm sample "
            f"--checkpoint {out} for more):")
        log("-" * 60)
        log(tokenizer.decode(ids[len(prompt):]))
        log("-" * 60)
    return 0


def _new_settings(args, log):
    what, _, train_kw = PRESETS[args.preset]
    tk = common.preset_train_settings(args, train_kw)
    out = Path(args.out or Path("runs") / f"{args.model}-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    log(f"preset {args.preset!r}: {what}")
    return TrainConfig(**tk, seed=args.seed, out_dir=str(out), data=args.data, val_fraction=0.1), out


def _resumed_settings(args, log):
    fixed = [f"--{name.replace('_', '-')}" for name in ("data", "batch_size", "block_size", "lr", "eval_interval")
             if getattr(args, name) is not None]
    if fixed:
        raise UsageError(f"--resume continues a run with the settings it was started with; {', '.join(fixed)} "
                         f"cannot change (leave them out, or start a new run)")
    out = Path(args.out) if args.out else latest_rnn_run("runs", args.model)
    ck = load_checkpoint(out)
    if not is_rnn_checkpoint(ck) or ck["model_config"].get("cell") != args.model:
        raise UsageError(f"--resume: {out} does not hold a {args.model} run (train {args.model} resumes its own)")
    tcfg = TrainConfig.from_dict({**ck["config"], "out_dir": str(out),
                                  **({"max_steps": args.max_steps} if args.max_steps else {})})
    log(f"resuming {out} at step {ck['step']} (its own model, tokenizer and training config)")
    return ck, tcfg, out


def sample_checkpoint(args, ck):
    """python -m minillm sample on a recurrent run: the state carried token by token (the
    KV-cache and Medusa options do not apply)."""
    given = [flag for flag, on in (("--medusa", args.medusa is not None), ("--no-cache", args.no_cache)) if on]
    if given:
        raise UsageError(f"--checkpoint: {ck['path']} is a recurrent ({ck['model_config']['cell']}) run; "
                         f"{', '.join(given)} applies to GPTs only")
    config = rnn.RNNLMConfig.from_dict(ck["model_config"])
    tokenizer = tokenizer_from_dict(ck["tokenizer"])
    params = backend.to_device(ck["params"], args.device)
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise ValueError("prompt: expected text that encodes to at least one token, got an empty prompt")
    n = sum(int(np.prod(p.shape)) for p in params.values())
    print(f"{ck['path']} (step {ck['step']}, {config.cell.upper()}, {n:,} parameters); temperature "
          f"{args.temperature}, top_k {args.top_k}, top_p {args.top_p}, state carried token by token")
    for i in range(args.num_samples):
        t0 = time.perf_counter()
        seed = None if args.seed is None else args.seed + i
        ids = rnn.lm_generate(params, config, prompt, args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=seed)
        dt = time.perf_counter() - t0
        print("-" * 60)
        print(tokenizer.decode(ids))
        print("-" * 60)
        print(f"{args.max_new_tokens} tokens in {dt:.2f} s ({args.max_new_tokens / max(dt, 1e-9):,.0f} tokens/s)")
    return 0
