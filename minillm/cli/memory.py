"""python -m minillm memory: where a training step's memory goes, per rank, for DDP and ZeRO.

For a preset of ``train`` (or a GPT given by its sizes): the bytes of parameters,
gradients, the float64 gradient sum, AdamW's moments, the activations of a micro-batch
and one block's backward workspace, per rank under DDP and ZeRO stages 1, 2 and 3 (3 is
the formula only: minillm does not shard parameters), beside the peak that tracemalloc
measures on a real step of one process. Then the ZeRO paper's model-state formulas in
mixed precision (2 + 2 + K bytes a parameter) for the same size; ``--params 7.5e9
--ranks 64`` is the paper's example (120 GB -> 31.4 / 16.6 / 1.9 GB).
"""

from __future__ import annotations

import time

from minillm.cli import common
from minillm.cli.common import UsageError


def add_arguments(parser):
    from minillm.cli.train import PRESETS
    parser.description = __doc__.split("\n\n")[1]
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS),
                        help="the model and batch of a train preset (default: default)")
    parser.add_argument("--params", type=float, default=None,
                        help="only the ZeRO paper's model-state table, for this many parameters "
                             "(e.g. 7.5e9); no model is built")
    parser.add_argument("--ranks", type=common.positive_int, default=2,
                        help="data-parallel ranks N to divide the sharded state by (default: 2)")
    parser.add_argument("--batch-size", type=common.positive_int, default=None,
                        help="global batch in sequences (default: the preset's)")
    parser.add_argument("--block-size", type=common.positive_int, default=None,
                        help="context length (default: the preset's)")
    parser.add_argument("--grad-accum", type=common.positive_int, default=1,
                        help="micro-batches per rank per step (default: 1)")
    parser.add_argument("--vocab-size", type=common.positive_int, default=83,
                        help="vocabulary size (default: 83, the character set of Shakespeare's "
                             "training split with U+FFFD)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="account (and measure) with activation checkpointing")
    parser.add_argument("--k", type=common.count, default=12,
                        help="optimizer bytes per parameter in the paper's table (Adam in mixed "
                             "precision: 12) (default: 12)")
    parser.add_argument("--no-measure", action="store_true",
                        help="skip the measured step (the accounting alone)")


def _mb(x):
    return f"{x / 1e6:10.2f}"


def _unit(largest):
    """(name, divisor): GB for a table whose largest entry reaches 1 GB, else MB."""
    return ("GB", 1e9) if largest >= 1e9 else ("MB", 1e6)


def paper_table(n_params, n_ranks, k, log):
    from minillm import distributed as dist
    rows = {name: dist.zero_model_states(int(n_params), n_ranks, stage, k=k)
            for stage, name in enumerate(("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3"))}
    unit, div = _unit(rows["DDP"]["total"])
    log(f"ZeRO paper, mixed precision (fp16 params and grads, K = {k} bytes of optimizer state a "
        f"parameter), {n_params:.3g} parameters, N = {n_ranks}, {unit} per rank:")
    log(f"  {'':17s}" + "".join(f"{c:>10s}" for c in ("params", "grads", "optim", "total")))
    for name, m in rows.items():
        log(f"  {name:17s}" + "".join(f"{m[c] / div:10.1f}" for c in ("params", "grads", "optimizer", "total")))
    return rows


def model_table(config, n_params, micro, T, args, log):
    from minillm import distributed as dist
    keys = ("params", "grads", "grad_sum", "optimizer", "activations", "workspace", "total")
    log(f"minillm per rank (float32, AdamW, float64 gradient sum), micro-batch {micro} x {T}, "
        f"N = {args.ranks}, K = {args.grad_accum} micro-batch(es) per rank"
        f"{', activation checkpointing' if args.activation_checkpointing else ''}, MB:")
    log(f"  {'':17s}" + "".join(f"{k:>12s}" for k in keys))
    out = {}
    for stage, name in enumerate(("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3 (formula)")):
        m = dist.memory_per_rank(config, n_params, micro, T, args.ranks, stage, args.grad_accum,
                                 args.activation_checkpointing)
        out[stage] = m
        log(f"  {name:17s}" + "".join(f"  {_mb(m[k])}" for k in keys))
    return out


def run(args, log=print):
    if args.params is not None:
        if args.params < 1:
            raise UsageError(f"--params: expected a number of parameters >= 1, got {args.params:g}")
        paper_table(args.params, args.ranks, args.k, log)
        return 0
    from minillm import distributed as dist
    from minillm import gpt
    from minillm.cli.train import PRESETS
    what, model_kw, train_kw = PRESETS[args.preset]
    B = args.batch_size or train_kw["batch_size"]
    T = args.block_size or train_kw["block_size"]
    parts = args.ranks * args.grad_accum
    if B % parts:
        raise UsageError(f"--batch-size {B} (the global batch) must divide into {args.ranks} rank(s) x "
                         f"{args.grad_accum} micro-batch(es) = {parts} equal parts")
    config = gpt.GPTConfig(vocab_size=args.vocab_size, block_size=T, **model_kw)
    n_params = sum(_numel(s) for s in gpt.param_shapes(config).values())
    micro = B // parts
    log(f"preset {args.preset!r}: {what}; {n_params:,} parameters, vocab {args.vocab_size}")
    model_table(config, n_params, micro, T, args, log)
    if not args.no_measure:
        one = dist.memory_per_rank(config, n_params, micro, T, 1, 0, 1, args.activation_checkpointing)
        t0 = time.perf_counter()
        m = dist.measure_step_peak(config, micro, T, args.activation_checkpointing)
        log(f"measured (tracemalloc, one process, one step on {micro} x {T}, {time.perf_counter() - t0:.1f} s): "
            f"peak {m['peak'] / 1e6:.2f} MB; accounted for one process {one['total'] / 1e6:.2f} MB "
            f"(measured / accounted = {m['peak'] / one['total']:.3f})")
    paper_table(n_params, args.ranks, args.k, log)
    return 0


def _numel(shape):
    n = 1
    for d in shape:
        n *= int(d)
    return n
