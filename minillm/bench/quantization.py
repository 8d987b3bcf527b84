"""int4 against NF4 at the same size: what each costs in perplexity, and how much of it is luck.

Both 4-bit schemes store 4 bits per weight plus one float32 scale per group, so at
one group size they are the same number of bytes. This benchmark quantizes every
matrix of a trained GPT both ways (as ``python -m minillm quantize`` does) for each
--group-sizes entry and reports, against float32 on the run's validation tokens:

  quantized MiB  bytes of the quantized matrices: codes and scales
  weight error   sum |w_q - w|^2 / sum |w|^2 over the quantized matrices
  quantized      the perplexity change of the quantized model (what you get)
  mirrored       the change when every error is flipped: w - (w_q - w)
  systematic     ((L_q + L_m) / 2 - L), in % of nats
  first order    ((L_q - L_m) / 2), in % of nats

Why the mirror: with d = w_q - w, L(w + d) - L(w) = g.d + d'Hd/2 + O(d^3) and
L(w - d) - L(w) = -g.d + d'Hd/2 + O(d^3). Half their sum is the curvature term,
which grows with the error's size and is what a better grid lowers; half their
difference is the first-order term g.d, whose sign depends on which way each
weight happened to round. On a small model one such term can be as large as the
difference between two schemes, so "which scheme won" is partly a coin toss;
the systematic column is the comparison that does not depend on it.
"""

from __future__ import annotations

import math
import time

import numpy as np

from minillm.bench._util import print_table

SCHEMES = (("int4", "symmetric"), ("nf4", "nf4"))


def add_arguments(parser):
    parser.add_argument("--checkpoint", default=None,
                        help="a run directory of python -m minillm train (default: the latest GPT run)")
    parser.add_argument("--group-sizes", default="32,64,128",
                        help="comma-separated rows per group; each must divide every matrix's input dimension")
    parser.add_argument("--eval-windows", type=int, default=512,
                        help="validation windows of block_size tokens for each perplexity")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per forward pass")
    parser.add_argument("--embeddings", choices=["quantize", "float"], default="quantize",
                        help="quantize the tied embeddings as the LM head, or keep them float32 "
                             "(as QLoRA and bitsandbytes do)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default=None,
                        help="where to evaluate (default: MINILLM_DEVICE, else cpu)")


def _group_sizes(text):
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--group-sizes: expected comma-separated positive integers, got {text!r}")
    return sizes


def run(args):
    from minillm import gpt
    from minillm.backend import device_name, to_device, xp_for
    from minillm.cli.quantize import checkpoint_windows, dequantize_params, mean_loss, quantize_params
    from minillm.cli.sample import latest_gpt_run
    from minillm.tokenizer import tokenizer_from_dict
    from minillm.train import load_checkpoint

    try:
        sizes = _group_sizes(args.group_sizes)
    except ValueError as e:
        print(f"error: {e}")
        return 2
    if args.eval_windows < 1 or args.batch_size < 1:
        print(f"error: --eval-windows and --batch-size: expected positive integers, got "
              f"{args.eval_windows} and {args.batch_size}")
        return 2
    ck = load_checkpoint(args.checkpoint if args.checkpoint else latest_gpt_run("runs"))
    if not isinstance(ck.get("model_config"), dict) or ck.get("tokenizer") is None:
        print(f"error: --checkpoint: {ck['path']!r} is not a GPT run of python -m minillm train")
        return 2
    config = gpt.GPTConfig.from_dict(ck["model_config"])
    device = device_name(args.device)
    xp = xp_for(device)
    params = to_device(dict(ck["params"]), device)
    order = list(params)
    windows, source = checkpoint_windows(ck, tokenizer_from_dict(ck["tokenizer"]), config.block_size,
                                         args.eval_windows)
    n_params = sum(int(p.size) for p in params.values())
    print(f"checkpoint  {ck['path']} (step {ck['step']}, {n_params:,} parameters, "
          f"{config.n_layer} layers x {config.n_embd})")
    print(f"validation  {source}: {windows.shape[0] * config.block_size:,} tokens, on {device}")
    print(f"embeddings  {'quantized as the LM head' if args.embeddings == 'quantize' else 'kept in float32'}")

    t0 = time.perf_counter()
    base = mean_loss(params, config, windows, args.batch_size, xp)
    print(f"float32     val loss {base:.4f}, perplexity {math.exp(base):.3f} "
          f"({time.perf_counter() - t0:.1f} s per evaluation)\n")

    rows = []
    for g in sizes:
        for label, scheme in SCHEMES:
            try:
                q, f = quantize_params(params, bits=4, scheme=scheme, granularity="group", group_size=g,
                                       embeddings=args.embeddings)
            except ValueError as e:
                print(f"error: {e}")
                return 2
            dq = dequantize_params(q, f, order)
            mirrored = {k: 2 * params[k] - dq[k] if k in q else params[k] for k in order}
            err = sum(float(((dq[k] - params[k]) ** 2).sum()) for k in q)
            ref = sum(float((params[k] ** 2).sum()) for k in q)
            lq = mean_loss(dq, config, windows, args.batch_size, xp)
            lm = mean_loss(mirrored, config, windows, args.batch_size, xp)
            nbytes = sum(qt.nbytes for qt in q.values())
            rows.append([f"{label} group {g}", f"{nbytes / 2**20:.3f}", f"{err / ref:.3e}",
                         f"{100 * (math.exp(lq - base) - 1):+.2f}%", f"{100 * (math.exp(lm - base) - 1):+.2f}%",
                         f"{100 * ((lq + lm) / 2 - base):.3f}%", f"{100 * (lq - lm) / 2:+.3f}%"])
            print(f"  {rows[-1][0]}: done", flush=True)
    print()
    print_table(rows, ["scheme", "quantized MiB", "weight error", "quantized", "mirrored", "systematic", "first order"])
    print("\nquantized/mirrored: perplexity change vs float32; systematic and first order: the loss "
          "change's curvature and gradient parts, in % of nats (see python -m minillm bench quantization -h)")
    return 0
