"""python -m minillm scaling: an IsoFLOP sweep at toy scale (Chinchilla's second method).

For each compute budget C (FLOPs = 6 N D), a character-level GPT of each width is
trained on Shakespeare for D = C / 6N tokens, its cosine schedule stretched over
exactly its own run; the final validation loss against ln N is fitted with a
parabola per budget, whose bottom is that budget's N_opt; then N_opt ~ C^alpha.
Prints the fitted exponent and the tokens per parameter at each optimum, and writes
isoflop.svg (loss against N per budget), optimum.svg (N_opt against C) and
results.json. The defaults are 18 runs sized for a 2-core CPU (24 minutes on the project's
2 cores shared with other jobs, load ~15; see BENCHMARKS.md); --quick is a smaller sweep
(about a minute), and --budgets/--widths set any other.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from minillm.cli import common
from minillm.cli.common import UsageError

DEFAULT_BUDGETS = "1e10,3e10,1e11"
DEFAULT_WIDTHS = "8,16,24,32,48,64"
QUICK = dict(budgets="3e8,1e9,3e9", widths="8,16,24", block_size=16, batch_size=8, eval_iters=4)


def _floats(text):
    try:
        values = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"expected comma-separated numbers, got {text!r}") from None
    if any(not math.isfinite(v) or v <= 0 for v in values):
        raise UsageError(f"expected positive numbers, got {text!r}")
    return values


def add_arguments(parser):
    parser.description = __doc__.split("\n\n")[1]
    parser.add_argument("--budgets", default=None,
                        help=f"compute budgets C in FLOPs, comma-separated (default: {DEFAULT_BUDGETS})")
    parser.add_argument("--widths", default=None,
                        help=f"model widths n_embd to train at every budget, comma-separated, multiples of "
                             f"--head-dim (default: {DEFAULT_WIDTHS})")
    parser.add_argument("--layers", type=common.positive_int, default=2, help="blocks per model (default: 2)")
    parser.add_argument("--head-dim", type=common.positive_int, default=8,
                        help="size of an attention head; heads = width / head-dim (default: 8)")
    parser.add_argument("--block-size", type=common.positive_int, default=None,
                        help="context length (default: 32; --quick: 16)")
    parser.add_argument("--batch-size", type=common.positive_int, default=None,
                        help="sequences per step (default: 16; --quick: 8)")
    parser.add_argument("--lr", type=common.positive_number, default=3e-3,
                        help="peak learning rate of every run's warmup + cosine (default: 3e-3)")
    parser.add_argument("--eval-iters", type=common.positive_int, default=None,
                        help="validation batches for each run's final loss (default: 20; --quick: 4)")
    parser.add_argument("--data", default=None,
                        help="a UTF-8 text file instead of Shakespeare's works")
    parser.add_argument("--quick", action="store_true",
                        help=f"a small sweep (budgets {QUICK['budgets']}, widths {QUICK['widths']}, context 16, "
                             f"batch 8): seconds, for checking the plumbing")
    parser.add_argument("--out", default=None,
                        help="directory for isoflop.svg, optimum.svg and results.json "
                             "(default: runs/scaling-<date>-<time>)")
    parser.add_argument("--seed", type=common.seed, default=0, help="seed for every run (default: 0)")


def _settings(args):
    q = QUICK if args.quick else {}
    budgets = _floats(args.budgets or q.get("budgets", DEFAULT_BUDGETS))
    widths = [int(w) for w in _floats(args.widths or q.get("widths", DEFAULT_WIDTHS))]
    if len(budgets) < 2 or len(widths) < 3:
        raise UsageError(f"--budgets needs 2 or more values and --widths 3 or more (a power law and a "
                         f"parabola), got {len(budgets)} and {len(widths)}")
    bad = [w for w in widths if w % args.head_dim]
    if bad:
        raise UsageError(f"--widths {bad} are not multiples of --head-dim {args.head_dim}")
    T = args.block_size or q.get("block_size", 32)
    B = args.batch_size or q.get("batch_size", 16)
    return budgets, widths, T, B, args.eval_iters or q.get("eval_iters", 20)


def run(args, log=print):
    from minillm import data as corpus, gpt, scaling
    from minillm.cli.train import GPTTask
    from minillm.tokenizer import CharTokenizer
    from minillm.train import TrainConfig, train

    budgets, widths, T, B, eval_iters = _settings(args)
    out = Path(args.out or os.path.join("runs", f"scaling-{time.strftime('%Y%m%d-%H%M%S')}"))
    out.mkdir(parents=True, exist_ok=True)
    train_docs, val_docs = corpus.split_documents(corpus.load_documents(args.data), 0.1)
    tok = CharTokenizer.from_text(corpus.join_documents(train_docs), unk="\ufffd")
    train_tokens, val_tokens = corpus.tokenize_splits(train_docs, val_docs, tok, out)

    def config_of(width):
        return gpt.GPTConfig(vocab_size=tok.vocab_size, block_size=T, n_layer=args.layers,
                             n_head=width // args.head_dim, n_embd=width)

    def n_params_of(width):
        return sum(math.prod(s) for s in gpt.param_shapes(config_of(width)).values())

    def train_one(width, steps):
        config = config_of(width)
        params = gpt.init_params(config, seed=args.seed)
        task = GPTTask(config, params, tok, train_tokens, val_tokens, B, T, __import__("numpy"), seed=args.seed)
        cfg = TrainConfig(max_steps=steps, batch_size=B, block_size=T, lr=args.lr, min_lr=args.lr / 10,
                          warmup_steps=max(1, steps // 20), weight_decay=0.1, betas=(0.9, 0.99),
                          eval_interval=0, eval_iters=eval_iters, log_interval=max(steps, 1),
                          checkpoint_interval=0, seed=args.seed, out_dir=str(out / f"w{width}-{steps}"))
        return train(task, cfg, log=lambda line: None)["val_loss"]

    t0 = time.perf_counter()

    def on_point(p, i, total):
        el = time.perf_counter() - t0
        log(f"[{i}/{total}] C {p.budget:.0e}: width {p.size} ({p.n_params:,} params), {p.steps:,} steps = "
            f"{p.tokens:,} tokens -> val loss {p.loss:.4f} | {el:.0f} s, ETA {el / i * (total - i):.0f} s")

    log(f"IsoFLOP sweep: budgets {', '.join(f'{b:.0e}' for b in budgets)} FLOPs; widths {widths} "
        f"({args.layers} layers, head size {args.head_dim}); batch {B} x {T} tokens; vocab {tok.vocab_size}")
    points = scaling.isoflop_sweep(budgets, widths, n_params_of, train_one, B * T, on_point)
    return _report(points, budgets, out, log)


def _report(points, budgets, out, log):
    from minillm import scaling
    from minillm.plot import line_plot
    optima, inside_of = {}, {}
    for budget in budgets:
        pts = [p for p in points if p.budget == budget]
        coeffs = scaling.fit_parabola([math.log(p.n_params) for p in pts], [p.loss for p in pts])
        try:
            x, loss = scaling.parabola_minimum(coeffs)
        except ValueError:
            log(f"C {budget:.0e}: the losses do not curve upwards in ln N (a = {coeffs[0]:.3g}): no optimum "
                f"inside these widths; left out of the fit")
            continue
        n_opt = math.exp(x)
        optima[budget] = (n_opt, loss)
        inside = min(p.n_params for p in pts) <= n_opt <= max(p.n_params for p in pts)
        inside_of[budget] = inside
        log(f"C {budget:.0e}: N_opt {n_opt:,.0f} params, loss {loss:.4f} at the optimum, D_opt {budget / (6 * n_opt):,.0f} "
            f"tokens = {budget / (6 * n_opt * n_opt):.1f} tokens/param{'' if inside else ' (outside the widths tried: extrapolated)'}")
    alpha = alpha_all = None
    bracketed = [b for b in optima if inside_of[b]]
    if len(optima) >= 2:
        alpha_all, _ = scaling.fit_power_law(list(optima), [optima[b][0] for b in optima])
    if len(bracketed) >= 2:     # an optimum outside the widths tried is an extrapolation: fit without it
        alpha, _ = scaling.fit_power_law(bracketed, [optima[b][0] for b in bracketed])
        log(f"fit over the {len(bracketed)} budgets whose optimum lies inside the widths tried: N_opt ~ "
            f"C^{alpha:.3f} (Chinchilla: ~0.5); so D_opt ~ C^{1 - alpha:.3f}")
        if len(bracketed) < len(optima):
            log(f"(over every budget, extrapolated optima included: C^{alpha_all:.3f})")
    elif alpha_all is not None:
        alpha = alpha_all
        log(f"fit: N_opt ~ C^{alpha:.3f}, from optima extrapolated beyond the widths tried (Chinchilla: ~0.5)")
    else:
        log("fit: fewer than 2 budgets have an optimum; no exponent")
    series = {f"C = {b:.0e}": [(p.n_params, p.loss) for p in points if p.budget == b] for b in budgets}
    line_plot(out / "isoflop.svg", series, title="IsoFLOP: final val loss vs parameters", xlabel="parameters N",
              ylabel="val loss", log_x=True)
    line_plot(out / "optimum.svg", {"N_opt": [(b, v[0]) for b, v in optima.items()]},
              title="compute-optimal size", xlabel="FLOPs C", ylabel="N_opt", log_x=True, log_y=True)
    results = {"points": [p._asdict() for p in points], "alpha": alpha, "alpha_all_budgets": alpha_all,
               "optima": {f"{b:g}": {"n_opt": v[0], "loss": v[1], "tokens_per_param": b / (6 * v[0] ** 2)}
                          for b, v in optima.items()}}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    log(f"wrote {out / 'isoflop.svg'}, {out / 'optimum.svg'}, {out / 'results.json'}")
    return 0
