"""python -m minillm finetune sft|reward|ppo|dpo --checkpoint RUN [--steps N] [--out DIR]: post-training.

reward, ppo, dpo: learning from preferences (minillm.rlhf); see minillm/cli/finetune_rl.py.

sft: supervised fine-tuning of a trained GPT on instructions made from Shakespeare's plays
(minillm.sft): "Who speaks? <a speech>" -> the speaker, "Which play? <a speech>" -> the
title. The chat tokens are added to the run's tokenizer (existing ids unchanged) and the
model's vocabulary grown to match; the loss counts the assistant's answers only. Full
fine-tuning by default; --lora trains low-rank adapters (minillm.lora) on the attention
and MLP weights, and the new tokens' embedding rows, the base frozen. Held-out accuracy
(exact match of the greedy answer) is printed per instruction kind before and after,
with the majority-class baseline. Measured numbers: BENCHMARKS.md, "Supervised fine-tuning".

The output run directory (--out, default RUN/sft or RUN/sft-lora) is a normal GPT run:

    checkpoint.npz / .json   the fine-tuned GPT (vocabulary grown by the five chat tokens)
                             in minillm's native format, its model_config and a tokenizer
                             holding the chat tokens: `python -m minillm sample --checkpoint
                             DIR` and sft.prepare_model / the rlhf methods load it as it is
    sft.json                 what was measured: accuracy per kind before and after, the
                             majority baseline, the dataset's sizes, the settings
    metrics.jsonl, loss.svg  the training loop's log (response-only loss, train and held out)
    lora/                    --lora only: the training loop's run (checkpoint.npz of the adapters,
                             the new token rows ("wte.new_rows") and their optimizer state,
                             metrics.jsonl, loss.svg); checkpoint.npz above is the base with the
                             rows in place and the adapters merged

Dropout is off during fine-tuning (the default base has none). `sample --prompt` encodes
its prompt as plain text, so the chat tokens cannot be typed there: to ask the model a
question, build the prompt with sft.build_prompt (sft.greedy_answer does).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from minillm import backend, gpt, lora, sft
from minillm import data as corpus
from minillm.cli import common
from minillm.cli.sample import load_run
from minillm.train import TrainConfig, save_checkpoint, train

METHODS = ["sft", "reward", "ppo", "dpo"]   # reward, ppo, dpo: minillm.rlhf, in minillm.cli.finetune_rl
SFT_DEFAULTS = {"steps": 300, "batch_size": 32, "eval_interval": 100}
LORA_TARGETS = r"attn\.w_(qkv|o)$|mlp\.(w1|w2|w_gate|w_up|w_down)$"
RESULTS_FILE = "sft.json"
NEW_ROWS = ".new_rows"      # --lora: the trained rows of the chat tokens, e.g. "wte.new_rows"


def add_arguments(parser):
    parser.description = "\n\n".join(__doc__.split("\n\n")[1:3])
    parser.add_argument("method", choices=METHODS,
                        help="sft: supervised fine-tuning on instructions, response-only loss; reward: a "
                             "reward model on preference pairs; ppo: RL from it with a KL penalty; dpo: "
                             "direct preference optimisation (see minillm.cli.finetune_rl)")
    parser.add_argument("--checkpoint", default=None,
                        help="the GPT run to fine-tune (a directory with checkpoint.npz; default: the "
                             "latest GPT run under runs/)")
    parser.add_argument("--out", default=None,
                        help="run directory for the fine-tuned model (default: CHECKPOINT/sft, or "
                             "CHECKPOINT/sft-lora with --lora)")
    parser.add_argument("--lora", action="store_true",
                        help="train LoRA adapters on the attention and MLP weights and the new chat "
                             "tokens' embedding rows instead of every parameter (the base stays frozen)")
    parser.add_argument("--lora-rank", type=common.positive_int, default=8, help="LoRA rank r (default: 8)")
    parser.add_argument("--lora-alpha", type=common.positive_number, default=16.0,
                        help="LoRA alpha: the update is scaled by alpha / r (default: 16)")
    parser.add_argument("--steps", type=common.positive_int, default=None,
                        help="optimizer steps (PPO: iterations) (default: sft 300, reward 150, ppo 30, dpo 60; "
                             "a few minutes each on a 2-core CPU)")
    parser.add_argument("--batch-size", type=common.positive_int, default=None,
                        help="conversations (sft), pairs (reward, dpo) or rollouts (ppo) per step "
                             "(default: sft 32, others 16)")
    parser.add_argument("--lr", type=common.positive_number, default=None,
                        help="peak learning rate; sft: cosine-decayed to a tenth (default: sft 1e-3 full, "
                             "3e-3 with --lora; reward 3e-4; ppo, dpo 1e-4, constant)")
    parser.add_argument("--eval-interval", type=common.count, default=None,
                        help="evaluate on held-out data every N steps (0: at the end only) (default: sft 100, "
                             "reward 50, ppo 10, dpo 20)")
    parser.add_argument("--n-speakers", type=common.positive_int, default=8,
                        help="'who speaks?' answers: the N commonest speakers (default: 8)")
    parser.add_argument("--seed", type=common.seed, default=1337,
                        help="seed for the new token rows, the adapters and the batches (default: 1337)")
    parser.add_argument("--device", default=None, choices=["cpu", "gpu"],
                        help="NumPy on the CPU or CuPy on a GPU (default: $MINILLM_DEVICE, else cpu)")
    from minillm.cli import finetune_rl
    finetune_rl.add_arguments(parser)


def run(args):
    if args.method != "sft":
        from minillm.cli import finetune_rl
        return finetune_rl.run(args)
    for name, value in SFT_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return run_sft(args)


# ---------------------------------------------------------------------------
# The task the training loop drives
# ---------------------------------------------------------------------------

class SFTTask:
    """Conversations (padded ids and response-only labels) in the shape minillm.train.train
    expects. Without ``lora_settings`` every parameter trains. With ``lora_settings`` =
    (rank, alpha) the trained params are adapters over ``params``, plus the embedding (and
    untied head) rows of the ``n_new`` chat tokens, under names ending in NEW_ROWS; every
    base weight, the trained tokens' rows included, stays frozen. (Without their rows the
    adapters cannot make the model say <|end|>: its row is a frozen average, see BENCHMARKS.)"""

    def __init__(self, config, params, tokenizer, data, batch_size, xp, lora_settings=None, seed=0, n_new=0):
        self.config, self.tokenizer, self.xp = config, tokenizer, xp
        self.data = data                                  # {"train" | "val": (ids (N, T), labels (N, T))}
        self.batch_size = batch_size
        self.tokens_per_batch = batch_size * data["train"][0].shape[1]
        self.lora_settings = lora_settings
        if lora_settings is None:
            self.base, self.params = None, params
            self.model_config = config.to_dict()
            return
        rank, alpha = lora_settings
        self.base, self.n_old = params, config.vocab_size - n_new
        self.params = lora.init_lora(params, LORA_TARGETS, rank=rank, alpha=alpha, seed=seed)
        for name in _head_names(config) if n_new else ():
            self.params[name + NEW_ROWS] = params[name][self.n_old:].copy()       # (n_new, C)
        self.model_config = {"lora": {"rank": rank, "alpha": alpha, "targets": LORA_TARGETS, "new_rows": n_new},
                             "gpt": config.to_dict()}

    def get_batch(self, split, rng):
        ids, labels = self.data[split]
        rows = rng.integers(0, ids.shape[0], size=self.batch_size)
        return self.xp.asarray(ids[rows]), self.xp.asarray(labels[rows])

    def loss_and_grads(self, params, batch):
        x, y = batch
        if self.lora_settings is None:
            return sft.response_loss_and_grads(params, self.config, x, y)
        rank, alpha = self.lora_settings
        adapters, rows = self._split(params)
        loss, grads = sft.response_loss_and_grads(self.model_params(params), self.config, x, y)
        out = lora.lora_grads_from_full(grads, adapters, lora.lora_scale(alpha, rank))   # dA, dB
        out.update({key: grads[key[:-len(NEW_ROWS)]][self.n_old:] for key in rows})       # the new rows' part
        return loss, {key: out[key] for key in params}

    def eval_loss(self, params, batch):
        x, y = batch
        return gpt.loss(self.model_params(params), self.config, x, y)

    def _split(self, params):
        """(adapters, new rows) of the trained params."""
        rows = {k: v for k, v in params.items() if k.endswith(NEW_ROWS)}
        return {k: v for k, v in params.items() if k not in rows}, rows

    def model_params(self, params=None):
        """The GPT's parameters now: the trained ones, or the base with the new rows in place
        and the adapters merged (copies: the base is never written)."""
        params = self.params if params is None else params
        if self.lora_settings is None:
            return params
        rank, alpha = self.lora_settings
        adapters, rows = self._split(params)
        base = dict(self.base)
        for key, r in rows.items():
            name = key[:-len(NEW_ROWS)]
            base[name] = self.xp.concatenate([self.base[name][:self.n_old], r], axis=0)
        return lora.merge_lora(base, adapters, alpha, rank)


def _head_names(config):
    return ("wte",) if config.tie_embeddings else ("wte", "lm_head")


# ---------------------------------------------------------------------------
# finetune sft
# ---------------------------------------------------------------------------

def _load_base(args, log):
    config, params, tokenizer, ck = load_run(args.checkpoint, backend.device_name(args.device))
    base_dir = Path(ck["path"]).parent
    n_before = config.vocab_size
    params, config, tokenizer = sft.prepare_model(params, config, tokenizer, seed=args.seed)
    args.n_new = config.vocab_size - n_before
    log(f"base: {ck['path']} (step {ck['step']}): GPT {config.n_layer} layers x {config.n_embd}, context "
        f"{config.block_size}; {type(tokenizer).__name__} with the chat tokens, {config.vocab_size} ids")
    return config, params, tokenizer, base_dir


def _instructions(tokenizer, config, n_speakers, log):
    ds = sft.instruction_dataset(corpus.shakespeare_documents(), n_speakers=n_speakers,
                                 block_size=config.block_size)
    counts = {split: {k: sum(x.kind == k for x in rows) for k in sft.QUESTIONS} for split, rows in ds.items()}
    log(f"instructions from {', '.join(sft.PLAYS)} (plays held out of pretraining): train {counts['train']}, "
        f"held out {counts['eval']} (passages of {sft.SPEECHES_PER_PASSAGE} speeches never trained on)")
    arrays = {"train": sft.encode_instructions(tokenizer, ds["train"], config.block_size),
              "val": sft.encode_instructions(tokenizer, ds["eval"], config.block_size)}
    return ds, arrays, counts


def _show_accuracy(label, acc, log):
    log(f"{label}: " + " | ".join(f"{k} {v['accuracy']:.3f}" for k, v in acc.items()))


def run_sft(args, log=print):
    """Load, prepare, measure, fine-tune, measure again, save (the module docstring)."""
    xp = backend.xp_for(args.device)
    config, params, tokenizer, base_dir = _load_base(args, log)
    out = Path(args.out) if args.out else base_dir / ("sft-lora" if args.lora else "sft")
    ds, arrays, counts = _instructions(tokenizer, config, args.n_speakers, log)
    baseline = sft.majority_baseline(ds["train"], ds["eval"])
    log("majority baseline (held out): " + " | ".join(f"{k} {v['accuracy']:.3f} (always {v['answer']!r})"
                                                      for k, v in baseline.items()))
    t0 = time.perf_counter()
    before = sft.accuracy(params, config, tokenizer, ds["eval"])
    _show_accuracy(f"held-out accuracy before ({time.perf_counter() - t0:.1f} s)", before, log)
    lr = args.lr or (3e-3 if args.lora else 1e-3)
    task = SFTTask(config, params, tokenizer, arrays, args.batch_size, xp,
                   (args.lora_rank, args.lora_alpha) if args.lora else None, seed=args.seed, n_new=args.n_new)
    if args.lora:
        log(f"LoRA: rank {args.lora_rank}, alpha {args.lora_alpha:g}, {gpt.num_params(task.params):,} "
            f"trainable (the adapters and the {args.n_new} new token rows) of {gpt.num_params(params):,} parameters")
    tcfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, block_size=config.block_size, lr=lr,
                       min_lr=lr / 10, warmup_steps=min(20, args.steps), weight_decay=0.0,
                       eval_interval=args.eval_interval, eval_iters=5, log_interval=10, checkpoint_interval=0,
                       seed=args.seed, out_dir=str(out / "lora" if args.lora else out))
    result = train(task, tcfg, log=log)
    tuned = task.model_params()
    after = sft.accuracy(tuned, config, tokenizer, ds["eval"])
    _show_accuracy("held-out accuracy after", after, log)
    _show_examples(tuned, config, tokenizer, ds["eval"], log)
    if args.lora:
        save_checkpoint(out, tuned, step=result["step"], config=tcfg, model_config=config.to_dict(),
                        tokenizer=tokenizer, metrics={k: result[k] for k in ("train_loss", "val_loss")})
    _write_results(out, args, lr, counts, baseline, before, after, result)
    log(f"fine-tuned model: {out / 'checkpoint.npz'} (python -m minillm sample --checkpoint {out})")
    return 0


def _show_examples(params, config, tokenizer, held, log, n=4):
    """A few held-out questions with the model's greedy answers."""
    step = max(1, len(held) // n)
    for x in held[::step][:n]:
        answer = sft.greedy_answer(params, config, tokenizer, sft.to_messages(x, with_answer=False))
        log(f"  {sft.QUESTIONS[x.kind]} {x.text!r} -> {answer!r} (right: {x.answer!r})")


def _write_results(out, args, lr, counts, baseline, before, after, result):
    results = {"method": "sft-lora" if args.lora else "sft", "checkpoint": str(args.checkpoint),
               "steps": result["step"], "lr": lr, "batch_size": args.batch_size, "seed": args.seed,
               "lora": {"rank": args.lora_rank, "alpha": args.lora_alpha} if args.lora else None,
               "examples": counts, "majority_baseline": baseline, "accuracy_before": before,
               "accuracy_after": after, "train_loss": result["train_loss"], "val_loss": result["val_loss"],
               "elapsed_s": result["elapsed_s"]}
    text = json.dumps(results, indent=1) + "\n"
    backend.atomic_write(out / RESULTS_FILE, lambda f: f.write(text.encode("utf-8")))

