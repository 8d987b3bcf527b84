"""A whole training run side by side with the same run in PyTorch: validation loss and tokens/s.

``bench train`` times one step on random ids; this trains a real model on the corpus,
the question a user asks ("does minillm get as far as PyTorch in the same time?").

Both sides start from the same weights (minillm's initialisation, copied into torch),
draw the same batches (the training loop's generator, seeded from --seed), follow the
same schedule (``optim.lr_schedule``: warmup, then cosine), clip the same global norm
and take AdamW steps with the same decay groups (``optim.default_no_decay``). minillm
steps through ``minillm.train.train_step``, the loop's own step; torch through a step of
the same shape written here. Steps alternate (one minillm step, one torch step, ...),
so both meet the same machine load, and only the steps are timed, not evaluation.

Dropout masks come from each side's own generator, so with dropout (the
shakespeare-char preset has 0.2) the two runs agree statistically, not step for step;
with dropout 0 they take the same steps to float32 round-off, which
``tests/test_bench_train_run.py`` checks over the first steps.

``--versus nanogpt-cpu`` asks the other question: does minillm's run of the preset (the
main job, by default) reach nanoGPT's validation loss in the same time? The torch side is
then nanoGPT's CPU configuration from its README (``NANOGPT_CPU``: 4 layers x 128, no
biases, batch 12 x 64, 2000 iters, lr 1e-3 -> 1e-4 cosine after 100 warmup, AdamW betas
0.9/0.99 with decay 0.1 on 2-D tensors, clip 1.0), its own model, initialisation, batches
and schedule, on the same corpus split as minillm. Steps alternate by time: whichever side
has spent less training time so far takes the next step, so the two clocks stay within one
step of each other and both meet the same load. Both are scored on the same validation
batches (--eval-seqs windows) every --eval-seconds of their training time; when the first
side finishes its schedule (or --seconds runs out) at W seconds, the other is scored at
once, and the report gives both val losses at W with standard errors (over the scoring
batches) and their paired difference (the same batches on both sides), then each side's
final loss. Seconds are those of the training steps (batch, forward, backward, update);
scoring is not timed; ``--clock cpu`` counts this process's CPU time instead of the wall's,
for a machine shared with other jobs. The full comparison of issue 16 is
``python -m minillm bench train-run --versus nanogpt-cpu`` (the default preset's 700 steps
against nanoGPT's 2000 iters; add ``--seconds 180`` to cap both at 180 s).

Writes ``val_loss.svg`` (validation loss against training seconds, both sides) and
``results.json`` into --out. On a GPU, ``--device gpu`` runs minillm on CuPy and torch
on CUDA; ``--torch-compile`` adds torch.compile to the torch side.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from minillm import backend, gpt
from minillm import data as corpus
from minillm.bench._util import print_table
from minillm.cli.common import UsageError
from minillm.optim import default_no_decay, make_optimizer
from minillm.plot import line_plot
from minillm.tokenizer import CharTokenizer
from minillm.train import TrainConfig, evaluate, train_step


def add_arguments(parser):
    parser.add_argument("--preset", default="default",
                        help="model and schedule from python -m minillm train's presets (default: default; "
                             "shakespeare-char is nanoGPT's, meant for a GPU)")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: the preset's)")
    parser.add_argument("--block-size", type=int, default=None, help="context length (default: the preset's)")
    parser.add_argument("--eval-interval", type=int, default=None,
                        help="evaluate validation loss every N steps (default: the preset's)")
    parser.add_argument("--eval-iters", type=int, default=None,
                        help="validation batches per evaluation (default: the preset's)")
    parser.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    parser.add_argument("--data", default=None, help="a text file to train on (default: Shakespeare)")
    parser.add_argument("--seed", type=int, default=1337, help="initialisation and batches (default: 1337)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default=None,
                        help="minillm's device (default: $MINILLM_DEVICE); torch runs on the CPU or CUDA to match")
    parser.add_argument("--skip-reference", action="store_true", help="train minillm only")
    parser.add_argument("--torch-compile", action="store_true", help="also wrap the torch model in torch.compile")
    parser.add_argument("--out", default="runs/bench-train-run", help="where the plot and results.json go")
    parser.add_argument("--versus", choices=["same-run", "nanogpt-cpu"], default="same-run",
                        help="same-run: the preset's run in minillm and the same run in torch (same weights, "
                             "batches, schedule), steps alternating; nanogpt-cpu: the preset's run against "
                             "nanoGPT's CPU configuration in torch (its own model, batch 12, schedule), at "
                             "equal training time, both scored on the same validation batches (default: same-run)")
    parser.add_argument("--nanogpt", action="append", default=None, metavar="KEY=VALUE",
                        help="with --versus nanogpt-cpu, change one of nanoGPT's CPU settings, named as in its "
                             "train.py: " + ", ".join(f"{k}={v}" for k, v in NANOGPT_CPU.items()) +
                             "; max_iters alone moves lr_decay_iters with it (repeatable) (default: none)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="with --versus nanogpt-cpu, stop each side after this many training seconds, "
                             "even mid-schedule (default: each runs its whole schedule)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="with --versus nanogpt-cpu, what a training second is: wall: the clock on the "
                             "wall (the question asked); cpu: this process's CPU time, all threads, which "
                             "other processes' load moves less (default: wall)")
    parser.add_argument("--eval-seconds", type=float, default=20.0,
                        help="with --versus nanogpt-cpu, score each side every N of its training seconds "
                             "(default: 20)")
    parser.add_argument("--eval-seqs", type=int, default=1024,
                        help="with --versus nanogpt-cpu, validation windows both sides are scored on, in "
                             "batches of the preset's batch size (default: 1024: 65,536 tokens at 64)")


# ---------------------------------------------------------------------------
# The same GPT in torch ops
# ---------------------------------------------------------------------------

def _torch_gpt(torch, config, params, device):
    """(parameters by minillm name, forward(idx, train) -> logits): the GPT of gpt.py in torch,
    holding copies of ``params``. The pre-norm block of gpt.py, step for step; dropout where
    gpt.py has it (embeddings, attention probabilities, both residual branches)."""
    F = torch.nn.functional
    P = {k: torch.nn.Parameter(torch.tensor(backend.to_numpy(v), device=device)) for k, v in params.items()}
    C, H, D, p_drop = config.n_embd, config.n_head, config.head_dim, config.dropout
    bias = lambda name: P.get(name)                                    # noqa: E731  None when bias=False

    def linear(x, w, b):
        return x @ P[w] if bias(b) is None else x @ P[w] + P[b]

    def forward(idx, train):
        drop = lambda x: F.dropout(x, p_drop, training=train) if p_drop else x   # noqa: E731
        B, T = idx.shape
        x = drop(P["wte"][idx] + P["wpe"][:T])                                   # (B, T, C)
        for i in range(config.n_layer):
            h = F.layer_norm(x, (C,), P[f"h.{i}.ln_1.weight"], bias(f"h.{i}.ln_1.bias"), config.eps)
            q, k, v = linear(h, f"h.{i}.attn.w_qkv", f"h.{i}.attn.b_qkv").view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p_drop if train else 0.0)
            x = x + drop(linear(a.transpose(1, 2).reshape(B, T, C), f"h.{i}.attn.w_o", f"h.{i}.attn.b_o"))
            h = F.layer_norm(x, (C,), P[f"h.{i}.ln_2.weight"], bias(f"h.{i}.ln_2.bias"), config.eps)
            m = F.gelu(linear(h, f"h.{i}.mlp.w1", f"h.{i}.mlp.b1"), approximate="tanh")
            x = x + drop(linear(m, f"h.{i}.mlp.w2", f"h.{i}.mlp.b2"))
        x = F.layer_norm(x, (C,), P["ln_f.weight"], bias("ln_f.bias"), config.eps)
        return x @ P["wte"].T                                                     # (B, T, V)

    return P, forward


class _TorchSide:
    """The torch run: its parameters, AdamW with minillm's decay groups, and one training step
    in the shape of ``train.train_step`` (schedule's lr, forward, backward, clip, step)."""

    def __init__(self, torch, config, params, tcfg, device, compile_model):
        self.torch, self.device, self.tcfg = torch, device, tcfg
        self.P, forward = _torch_gpt(torch, config, params, device)
        self.forward = torch.compile(forward) if compile_model else forward
        decay = [p for n, p in self.P.items() if not default_no_decay(n)]
        no_decay = [p for n, p in self.P.items() if default_no_decay(n)]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tcfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=tcfg.lr, betas=tcfg.betas, eps=tcfg.eps)
        self.params = None                # evaluate() passes task.params to eval_loss; unused here

    def _loss(self, batch, train):
        x, y = (self.torch.as_tensor(np.asarray(backend.to_numpy(a)), device=self.device) for a in batch)
        logits = self.forward(x, train)
        return self.torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def step(self, batch, lr) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(batch, train=True)
        loss.backward()
        if self.tcfg.grad_clip > 0:
            self.torch.nn.utils.clip_grad_norm_(list(self.P.values()), self.tcfg.grad_clip)
        self.optimizer.step()
        return float(loss.detach())

    def eval_loss(self, params, batch) -> float:
        with self.torch.no_grad():
            return float(self._loss(batch, train=False))

    def synchronize(self):
        if self.device != "cpu":
            self.torch.cuda.synchronize()


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------

def run(args):
    if getattr(args, "versus", "same-run") == "nanogpt-cpu":
        return run_versus_nanogpt_cpu(args)
    model_kw, tcfg = _settings(args)
    xp, device = backend.xp_for(args.device), backend.device_name(args.device)
    task = _minillm_task(model_kw, tcfg, xp, device)
    torch_side = None if args.skip_reference else _make_torch_side(task, tcfg, device, args)
    print(f"bench train-run: preset {args.preset}, {gpt.num_params(task.params):,} parameters, "
          f"{tcfg.max_steps} steps of {tcfg.batch_size} x {tcfg.block_size} tokens on {device}; "
          f"dropout {task.config.dropout}; steps alternate minillm / torch")
    history, _ = _train_side_by_side(task, torch_side, tcfg)
    _report(history, task.tokens_per_batch, tcfg, Path(args.out))
    return 0


def _settings(args):
    """(GPTConfig without its vocabulary yet, TrainConfig) from the preset and the overrides."""
    from minillm.cli.train import PRESETS       # the presets are the train command's
    if args.preset not in PRESETS:
        raise UsageError(f"--preset: expected one of {sorted(PRESETS)}, got {args.preset!r}")
    model_kw, train_kw = dict(PRESETS[args.preset][1]), dict(PRESETS[args.preset][2])
    if args.dropout is not None:
        model_kw["dropout"] = args.dropout
    for name in ("max_steps", "batch_size", "block_size", "eval_interval", "eval_iters"):
        if getattr(args, name) is not None:
            train_kw[name] = getattr(args, name)
    train_kw.update(seed=args.seed, data=args.data, checkpoint_interval=0)
    train_kw["warmup_steps"] = min(train_kw["warmup_steps"], train_kw["max_steps"])   # a short run warms up less
    return model_kw, TrainConfig(**train_kw)


def _minillm_task(model_kw, tcfg, xp, device):
    """The train command's GPT task on a character tokenizer of the training split."""
    from minillm.cli.train import GPTTask
    train_docs, val_docs = corpus.split_documents(corpus.load_documents(tcfg.data), tcfg.val_fraction)
    tokenizer = CharTokenizer.from_text(corpus.join_documents(train_docs), unk="\ufffd")
    tokens_dir = tempfile.mkdtemp(prefix="minillm-train-run-")
    train_tokens, val_tokens = corpus.tokenize_splits(train_docs, val_docs, tokenizer, tokens_dir)
    config = gpt.GPTConfig(vocab_size=tokenizer.vocab_size, block_size=tcfg.block_size, **model_kw)
    params = gpt.init_params(config, seed=tcfg.seed, device=device)
    return GPTTask(config, params, tokenizer, train_tokens, val_tokens, tcfg.batch_size, tcfg.block_size,
                   xp, seed=tcfg.seed)


def _make_torch_side(task, tcfg, device, args):
    try:
        import torch
    except ImportError:
        raise UsageError("PyTorch is not installed (pip install torch==2.13.0 for the CPU build), "
                         "or pass --skip-reference") from None
    _check_torch_supports(task.config)
    torch.manual_seed(tcfg.seed)
    torch.set_num_threads(_threads())
    return _TorchSide(torch, task.config, task.params, tcfg,
                      "cuda" if device == "gpu" else "cpu", args.torch_compile)


def _train_side_by_side(task, torch_side, tcfg) -> tuple:
    """Alternate one minillm step and one torch step; evaluate both every eval_interval.
    -> (history, train losses): [{"step", "minillm_val", "torch_val", "minillm_s", "torch_s"}]
    (seconds so far, steps only), and {"minillm": [loss per step], "torch": [...]}."""
    optimizer = make_optimizer(tcfg.optimizer, task.params, lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                               betas=tcfg.betas, eps=tcfg.eps, momentum=tcfg.momentum)
    data_rng = np.random.default_rng(tcfg.seed)            # the loop's own seeding of its data stream
    torch_rng = np.random.default_rng(tcfg.seed)           # the same stream, drawn again for torch
    seconds = {"minillm": 0.0, "torch": 0.0}
    losses = {"minillm": [], "torch": []}
    history = [_evaluate_both(task, torch_side, tcfg, 0, seconds)]
    for step in range(tcfg.max_steps):
        t0 = time.perf_counter()
        loss, _, lr = train_step(task, optimizer, data_rng, tcfg, step)
        backend.synchronize()
        seconds["minillm"] += time.perf_counter() - t0
        losses["minillm"].append(loss)
        if torch_side is not None:
            t0 = time.perf_counter()
            loss = torch_side.step(task.get_batch("train", torch_rng), lr)
            torch_side.synchronize()
            seconds["torch"] += time.perf_counter() - t0
            losses["torch"].append(loss)
        if (step + 1) % max(tcfg.eval_interval, 1) == 0 or step + 1 == tcfg.max_steps:
            history.append(_evaluate_both(task, torch_side, tcfg, step + 1, seconds))
    return history, losses


def _evaluate_both(task, torch_side, tcfg, step, seconds) -> dict:
    """Validation loss of both sides on the same batches: the ones train's own evaluation
    draws (both splits, so the val batches are the train command's, and its val loss too)."""
    row = {"step": step, "minillm_s": seconds["minillm"], "torch_s": seconds["torch"],
           "minillm_val": evaluate(task, tcfg.eval_iters, seed=tcfg.seed)["val"]}
    if torch_side is not None:
        torch_side.get_batch = task.get_batch                 # the same validation batches
        row["torch_val"] = evaluate(torch_side, tcfg.eval_iters, seed=tcfg.seed)["val"]
    last = f", torch {row['torch_val']:.4f} ({row['torch_s']:.1f} s)" if torch_side is not None else ""
    print(f"step {step:5d}: val loss minillm {row['minillm_val']:.4f} ({row['minillm_s']:.1f} s){last}",
          flush=True)
    return row


def _report(history, tokens_per_batch, tcfg, out: Path):
    has_torch = "torch_val" in history[-1]
    final = history[-1]
    tokens = tokens_per_batch * tcfg.max_steps
    rows = [["minillm", f"{final['minillm_val']:.4f}", f"{final['minillm_s']:.1f}",
             f"{tokens / max(final['minillm_s'], 1e-9):,.0f}"]]
    if has_torch:
        rows.append(["PyTorch", f"{final['torch_val']:.4f}", f"{final['torch_s']:.1f}",
                     f"{tokens / max(final['torch_s'], 1e-9):,.0f}"])
    print()
    print_table(rows, ["", "final val loss", "training s", "tokens/s"])
    if has_torch:
        print(f"\nminillm / PyTorch time for the same steps: {final['minillm_s'] / max(final['torch_s'], 1e-9):.2f}x"
              f"; val loss difference {final['minillm_val'] - final['torch_val']:+.4f}")
    out.mkdir(parents=True, exist_ok=True)
    series = {"minillm": [(r["minillm_s"], r["minillm_val"]) for r in history]}
    if has_torch:
        series["PyTorch"] = [(r["torch_s"], r["torch_val"]) for r in history]
    plot = line_plot(out / "val_loss.svg", series, title="validation loss against training time",
                     xlabel="training seconds (steps only)", ylabel="val loss", x_from_zero=True)
    backend.atomic_write(out / "results.json",
                         lambda f: f.write(json.dumps({"config": tcfg.to_dict(), "history": history}, indent=1)),
                         mode="w")
    print(f"wrote {plot} and {out / 'results.json'}")


def _threads() -> int:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(var):
            return int(os.environ[var])
    return os.cpu_count() or 1


def _check_torch_supports(config):
    """The torch side is GPT-2's block (what the presets default, shakespeare-char and tiny use)."""
    unsupported = {k: v for k, v in (("norm", config.norm), ("pos", config.pos), ("mlp", config.mlp))
                   if v != {"norm": "layernorm", "pos": "learned", "mlp": "gelu"}[k]}
    if unsupported or config.kv_heads != config.n_head or not config.tie_embeddings:
        raise UsageError(f"--preset: the PyTorch side is GPT-2's block only (layernorm, learned positions, "
                         f"GELU MLP, tied head, no GQA); this preset has {unsupported or 'GQA/untied head'} "
                         f"(pass --skip-reference to train minillm alone)")


# ---------------------------------------------------------------------------
# --versus nanogpt-cpu: the main job against nanoGPT's CPU run, at equal wall time
# ---------------------------------------------------------------------------

# nanoGPT's README command for a CPU (train.py config/train_shakespeare_char.py --device=cpu
# --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4
# --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0) over the
# config file's learning_rate, min_lr, warmup_iters, beta2; weight_decay, beta1, grad_clip and
# bias are train.py's defaults. Names are nanoGPT's, so --nanogpt KEY=VALUE reads like its own
# --KEY=VALUE overrides.
NANOGPT_CPU = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, bias=False, dropout=0.0,
                   learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, max_iters=2000, lr_decay_iters=2000,
                   beta1=0.9, beta2=0.99, weight_decay=0.1, grad_clip=1.0)


def nanogpt_settings(overrides=()) -> dict:
    """NANOGPT_CPU with ``KEY=VALUE`` overrides (a list of strings). Setting max_iters alone
    moves lr_decay_iters with it, as the README's command sets both."""
    cfg = dict(NANOGPT_CPU)
    given = {}
    for item in overrides or ():
        key, sep, value = str(item).partition("=")
        if not sep or key not in NANOGPT_CPU:
            raise UsageError(f"--nanogpt: expected KEY=VALUE with KEY one of {sorted(NANOGPT_CPU)}, got {item!r}")
        kind = type(NANOGPT_CPU[key])
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                given[key] = value.lower() in ("true", "1")
            else:
                given[key] = kind(float(value)) if kind is int and float(value).is_integer() else kind(value)
        except ValueError:
            raise UsageError(f"--nanogpt {key}: expected {kind.__name__}, got {value!r}") from None
    cfg.update(given)
    if "max_iters" in given and "lr_decay_iters" not in given:
        cfg["lr_decay_iters"] = cfg["max_iters"]
    for key in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters", "lr_decay_iters"):
        if cfg[key] < 1:
            raise UsageError(f"--nanogpt {key}: expected a positive integer, got {cfg[key]}")
    if cfg["n_embd"] % cfg["n_head"]:
        raise UsageError(f"--nanogpt n_embd: expected a multiple of n_head ({cfg['n_head']}), got {cfg['n_embd']}")
    for key in ("warmup_iters", "learning_rate", "min_lr", "weight_decay", "grad_clip", "dropout"):
        if cfg[key] < 0:
            raise UsageError(f"--nanogpt {key}: expected a non-negative number, got {cfg[key]}")
    return cfg


def nanogpt_lr(it: int, cfg: dict) -> float:
    """nanoGPT's get_lr: linear warmup to learning_rate over warmup_iters, cosine to min_lr at
    lr_decay_iters, then min_lr (the same curve as optim.lr_schedule; a test checks they agree)."""
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
    if it > cfg["lr_decay_iters"]:
        return cfg["min_lr"]
    ratio = (it - cfg["warmup_iters"]) / max(cfg["lr_decay_iters"] - cfg["warmup_iters"], 1)
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg["learning_rate"] - cfg["min_lr"])


class _NanoGPTSide:
    """nanoGPT's model.py and training step, written for this comparison in torch functions.

    The model: token + learned position embeddings, pre-norm blocks (LayerNorm with an optional
    bias, one c_attn projection split into q, k, v, causal SDPA, c_proj; c_fc, exact GELU,
    c_proj), a final LayerNorm and the head tied to wte. Weights are (out, in) as nn.Linear's,
    initialised as nanoGPT's: N(0, 0.02), the residual projections N(0, 0.02 / sqrt(2 n_layer)),
    biases 0, LayerNorm weights 1. AdamW decays every tensor of two or more dimensions
    (embeddings included) and no other. A step: get_lr(iter), a batch of random windows,
    forward, backward, clip the global norm at grad_clip, step, zero the gradients."""

    def __init__(self, torch, cfg, vocab_size, train_tokens, seed, device, compile_model):
        self.torch, self.cfg, self.device = torch, cfg, device
        C, L, V = cfg["n_embd"], cfg["n_layer"], vocab_size
        gen = torch.Generator().manual_seed(int(seed))
        normal = lambda *shape, std=0.02: torch.randn(*shape, generator=gen) * std      # noqa: E731
        shapes = {"wte": normal(V, C), "wpe": normal(cfg["block_size"], C)}
        for i in range(L):
            shapes.update({f"h.{i}.ln_1.weight": torch.ones(C), f"h.{i}.attn.c_attn.weight": normal(3 * C, C),
                           f"h.{i}.attn.c_proj.weight": normal(C, C, std=0.02 / math.sqrt(2 * L)),
                           f"h.{i}.ln_2.weight": torch.ones(C), f"h.{i}.mlp.c_fc.weight": normal(4 * C, C),
                           f"h.{i}.mlp.c_proj.weight": normal(C, 4 * C, std=0.02 / math.sqrt(2 * L))})
        shapes["ln_f.weight"] = torch.ones(C)
        if cfg["bias"]:
            for name, w in list(shapes.items()):
                if name not in ("wte", "wpe"):
                    shapes[name.replace(".weight", ".bias")] = torch.zeros(w.shape[0])
        self.P = {k: torch.nn.Parameter(v.to(device)) for k, v in shapes.items()}
        self.forward = torch.compile(self._forward) if compile_model else self._forward
        decay = [p for p in self.P.values() if p.dim() >= 2]
        no_decay = [p for p in self.P.values() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]))
        self.batches = corpus.TokenBatches(train_tokens, train_tokens, cfg["batch_size"], cfg["block_size"])
        self.rng = np.random.default_rng([int(seed), 2])        # its own stream of training windows
        self.iter_num, self.max_steps = 0, cfg["max_iters"]

    def _forward(self, idx, train):
        F, P, cfg = self.torch.nn.functional, self.P, self.cfg
        p = cfg["dropout"] if train else 0.0
        drop = (lambda x: F.dropout(x, p, training=True)) if p else (lambda x: x)     # noqa: E731
        B, T = idx.shape
        C, H = cfg["n_embd"], cfg["n_head"]
        ln = lambda x, name: F.layer_norm(x, (C,), P[f"{name}.weight"], P.get(f"{name}.bias"), 1e-5)  # noqa: E731
        lin = lambda x, name: F.linear(x, P[f"{name}.weight"], P.get(f"{name}.bias"))              # noqa: E731
        x = drop(P["wte"][idx] + P["wpe"][:T])
        for i in range(cfg["n_layer"]):
            q, k, v = lin(ln(x, f"h.{i}.ln_1"), f"h.{i}.attn.c_attn").split(C, dim=2)
            q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
            x = x + drop(lin(y.transpose(1, 2).contiguous().view(B, T, C), f"h.{i}.attn.c_proj"))
            x = x + drop(lin(F.gelu(lin(ln(x, f"h.{i}.ln_2"), f"h.{i}.mlp.c_fc")), f"h.{i}.mlp.c_proj"))
        return F.linear(ln(x, "ln_f"), P["wte"])                 # (B, T, V), the head tied to wte

    def _loss(self, x, y, train):
        logits = self.forward(self.torch.as_tensor(x, device=self.device), train)
        return self.torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                      self.torch.as_tensor(y, device=self.device).reshape(-1))

    def step(self) -> float:
        lr = nanogpt_lr(self.iter_num, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self.batches.get_batch("train", self.rng)
        loss = self._loss(x, y, train=True)
        loss.backward()
        if self.cfg["grad_clip"] != 0.0:
            self.torch.nn.utils.clip_grad_norm_(list(self.P.values()), self.cfg["grad_clip"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.iter_num += 1
        if self.device != "cpu":
            self.torch.cuda.synchronize()
        return float(loss.detach())

    def eval_chunk(self, x, y) -> float:
        with self.torch.no_grad():
            return float(self._loss(backend.to_numpy(x), backend.to_numpy(y), train=False))


class _MinillmSide:
    """The train command's run of a preset: its task, optimizer, data stream and train_step."""

    def __init__(self, task, tcfg):
        self.task, self.tcfg = task, tcfg
        self.optimizer = make_optimizer(tcfg.optimizer, task.params, lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                                        betas=tcfg.betas, eps=tcfg.eps, momentum=tcfg.momentum)
        self.data_rng = np.random.default_rng(tcfg.seed)      # the loop's own seeding of its data stream
        self.iter_num, self.max_steps = 0, tcfg.max_steps

    def step(self) -> float:
        loss, _, _ = train_step(self.task, self.optimizer, self.data_rng, self.tcfg, self.iter_num)
        backend.synchronize()
        self.iter_num += 1
        return loss

    def eval_chunk(self, x, y) -> float:
        return float(self.task.eval_loss(self.task.params, (x, y)))


def _shared_val_chunks(task, n_seqs, seed):
    """The validation set both sides are scored on: ceil(n_seqs / B) batches of B random windows
    of the val split (B: the preset's batch size), drawn once. The generator is the one
    train.evaluate seeds for "val", so the first eval_iters chunks are the train command's own
    validation batches."""
    B = task.batches.batch_size
    rng = np.random.default_rng([int(seed), 7919, 1])
    return [task.get_batch("val", rng) for _ in range(-(-n_seqs // B))]


def _score(side, chunks) -> list:
    return [side.eval_chunk(x, y) for x, y in chunks]


def _mean_se(values):
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def alternate_by_time(sides, chunks, eval_seconds, budget=None, clock=time.perf_counter, log=print):
    """Train ``sides`` ({name: side with .step(), .eval_chunk(x, y), .max_steps}) by time slices:
    the side with the fewest training seconds so far takes the next step, so the clocks stay
    within one step of each other and both sides meet the same machine load as they go. Only
    steps are timed. Each side is scored on ``chunks`` at 0 s, whenever its clock passes a
    multiple of eval_seconds, and when it stops (max_steps done, or ``budget`` seconds).
    The first side to stop sets W, its seconds then; every other side is scored as soon as
    its clock reaches W (or it stops): within one of its steps of W, the comparison at equal
    training time. (Not at the moment W is set: one step slowed by a burst of machine load
    can leave the other side seconds behind then.)
    -> {"history": {name: [row]}, "equal_time": {name: row}, "W": W, "step_ms": {name: [ms per
    step]}}; a row is {"step", "seconds", "val", "val_se", "chunk_losses"}."""
    state = {n: {"seconds": 0.0, "steps": 0, "done": False, "mark": eval_seconds} for n in sides}
    history = {n: [] for n in sides}
    step_ms = {n: [] for n in sides}
    equal_time, W = {}, None

    def score(name):
        last = history[name][-1] if history[name] else None
        if last is not None and last["step"] == state[name]["steps"]:
            return last                                           # already scored at this step
        losses = _score(sides[name], chunks)
        val, se = _mean_se(losses)
        row = {"step": state[name]["steps"], "seconds": state[name]["seconds"], "val": val, "val_se": se,
               "chunk_losses": losses}
        history[name].append(row)
        log(f"{name:>8s} step {row['step']:5d} at {row['seconds']:7.1f} s: val loss {val:.4f} +- {se:.4f}")
        return row

    for name in sides:
        score(name)
    while not all(s["done"] for s in state.values()):
        name = min((n for n in sides if not state[n]["done"]), key=lambda n: state[n]["seconds"])
        st = state[name]
        t0 = clock()
        sides[name].step()
        dt = clock() - t0
        st["seconds"] += dt
        st["steps"] += 1
        step_ms[name].append(1000.0 * dt)
        st["done"] = st["steps"] >= sides[name].max_steps or (budget is not None and st["seconds"] >= budget)
        if st["done"] or st["seconds"] >= st["mark"]:
            score(name)
            while st["mark"] <= st["seconds"]:
                st["mark"] += eval_seconds
        if st["done"] and W is None:
            W = st["seconds"]
        if W is not None:
            for other in sides:
                if other not in equal_time and (state[other]["seconds"] >= W or state[other]["done"]):
                    equal_time[other] = score(other)
    return {"history": history, "equal_time": equal_time, "W": W, "step_ms": step_ms}


def run_versus_nanogpt_cpu(args):
    model_kw, tcfg = _settings(args)
    ncfg = nanogpt_settings(args.nanogpt)
    if ncfg["block_size"] != tcfg.block_size:
        raise UsageError(f"--nanogpt block_size: both sides are scored on the same validation windows, so the "
                         f"context lengths must agree; minillm's is {tcfg.block_size}, nanoGPT's {ncfg['block_size']}")
    for name in ("eval_seconds", "eval_seqs", "seconds"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UsageError(f"--{name.replace('_', '-')}: expected a positive number, got {value}")
    xp, device = backend.xp_for(args.device), backend.device_name(args.device)
    task = _minillm_task(model_kw, tcfg, xp, device)
    sides = {"minillm": _MinillmSide(task, tcfg)}
    if not args.skip_reference:
        try:
            import torch
        except ImportError:
            raise UsageError("PyTorch is not installed (pip install torch==2.13.0 for the CPU build), "
                             "or pass --skip-reference to train minillm alone") from None
        torch.set_num_threads(_threads())
        sides["nanoGPT"] = _NanoGPTSide(torch, ncfg, task.config.vocab_size, task.batches.splits["train"],
                                        tcfg.seed, "cuda" if device == "gpu" else "cpu", args.torch_compile)
    chunks = _shared_val_chunks(task, args.eval_seqs, tcfg.seed)
    n_tokens = len(chunks) * task.batches.batch_size * tcfg.block_size
    n_torch = sum(p.numel() for p in sides["nanoGPT"].P.values()) if "nanoGPT" in sides else 0
    print(f"bench train-run --versus nanogpt-cpu on {device}: minillm preset {args.preset} "
          f"({model_kw['n_layer']} x {model_kw['n_embd']}, bias {model_kw.get('bias', True)}, "
          f"{gpt.num_params(task.params):,} parameters, {tcfg.batch_size} x {tcfg.block_size}, {tcfg.max_steps} steps, "
          f"lr {tcfg.lr:g} -> {tcfg.min_lr:g}, warmup {tcfg.warmup_steps})")
    if n_torch:
        print(f"  against nanoGPT's CPU run in PyTorch {torch.__version__} ({ncfg['n_layer']} x {ncfg['n_embd']}, "
              f"bias {ncfg['bias']}, {n_torch:,} parameters, {ncfg['batch_size']} x {ncfg['block_size']}, "
              f"{ncfg['max_iters']} iters, lr {ncfg['learning_rate']:g} -> {ncfg['min_lr']:g} over "
              f"{ncfg['lr_decay_iters']}, warmup {ncfg['warmup_iters']})")
    print(f"  scored on the same {len(chunks)} validation batches ({n_tokens:,} tokens); the side with less "
          f"training time ({getattr(args, 'clock', 'wall')} clock) takes the next step"
          + (f"; budget {args.seconds:g} s each" if args.seconds else ""),
          flush=True)
    clock = time.process_time if getattr(args, "clock", "wall") == "cpu" else time.perf_counter
    result = alternate_by_time(sides, chunks, args.eval_seconds, budget=args.seconds, clock=clock)
    _report_versus(result, sides, tcfg, ncfg, n_tokens, args)
    return 0


def _report_versus(result, sides, tcfg, ncfg, n_tokens, args):
    hist, eq, W, ms = result["history"], result["equal_time"], result["W"], result["step_ms"]
    tokens_per_step = {"minillm": tcfg.batch_size * tcfg.block_size,
                       "nanoGPT": ncfg["batch_size"] * ncfg["block_size"]}
    rows = []
    for name in sides:
        final = hist[name][-1]
        rows.append([name, f"{eq[name]['val']:.4f} +- {eq[name]['val_se']:.4f} ({eq[name]['seconds']:.1f} s, "
                           f"step {eq[name]['step']})",
                     f"{final['val']:.4f} +- {final['val_se']:.4f}", f"{final['step']}/{sides[name].max_steps}",
                     f"{final['seconds']:.1f}", f"{np.median(ms[name]) if ms[name] else 0:.0f} / "
                                                f"{max(ms[name], default=0):.0f}",
                     f"{tokens_per_step[name] * final['step'] / max(final['seconds'], 1e-9):,.0f}"])
    print()
    print_table(rows, ["", f"val loss at equal time W = {W:.1f} s", "final val loss", "steps", "training s",
                       "ms/step median / max", "tokens/s"])
    k = min(tcfg.eval_iters, len(hist["minillm"][-1]["chunk_losses"]))
    summary = {"minillm_train_command_val": float(np.mean(hist["minillm"][-1]["chunk_losses"][:k]))}
    print(f"\nminillm's final val loss on the train command's own {k} validation batches: "
          f"{summary['minillm_train_command_val']:.4f} (the val loss python -m minillm train reports after the same steps)")
    if "nanoGPT" in sides:
        d = np.subtract(eq["minillm"]["chunk_losses"], eq["nanoGPT"]["chunk_losses"])
        diff, se = _mean_se(d)
        summary.update(minillm_minus_nanogpt=diff, se=se)
        print(f"at equal training time minillm - nanoGPT = {diff:+.4f} +- {se:.4f} (paired over the same "
              f"{len(d)} batches, {n_tokens:,} tokens; +- is one standard error)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    label = {"minillm": f"minillm ({args.preset})", "nanoGPT": "nanoGPT CPU (PyTorch)"}
    plot = line_plot(out / "val_loss.svg", {label[n]: [(r["seconds"], r["val"]) for r in hist[n]] for n in sides},
                     title="validation loss against training time: minillm vs nanoGPT's CPU run",
                     xlabel="training seconds (steps only)", ylabel="val loss", x_from_zero=True)
    doc = {"versus": "nanogpt-cpu", "clock": getattr(args, "clock", "wall"), "W_seconds": W, "eval_tokens": n_tokens, "equal_time": eq, **summary,
           "minillm": {"preset": args.preset, "config": tcfg.to_dict(), "history": hist["minillm"],
                       "step_ms": ms["minillm"]}}
    if "nanoGPT" in sides:
        doc["nanogpt_cpu"] = {"config": ncfg, "history": hist["nanoGPT"], "step_ms": ms["nanoGPT"]}
    backend.atomic_write(out / "results.json", lambda f: f.write(json.dumps(doc, indent=1)), mode="w")
    print(f"wrote {plot} and {out / 'results.json'}")
