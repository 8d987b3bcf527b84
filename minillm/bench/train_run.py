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

Writes ``val_loss.svg`` (validation loss against training seconds, both sides) and
``results.json`` into --out. On a GPU, ``--device gpu`` runs minillm on CuPy and torch
on CUDA; ``--torch-compile`` adds torch.compile to the torch side.
"""

from __future__ import annotations

import json
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
