"""python -m minillm sample: generate text from a trained GPT (default: the latest run under runs/).
A recurrent run of ``python -m minillm train rnn|lstm|gru`` samples too: give it with --checkpoint.

Loads a run directory written by ``python -m minillm train`` (its checkpoint.npz
holds the weights, the model config and the tokenizer) and continues a prompt,
token by token, with the KV cache. A quantized checkpoint written by
``python -m minillm quantize`` works too: its weights are dequantized on load, so
the text shows what the quantization kept.

With ``--medusa`` the run's Medusa heads (``python -m minillm train medusa``) propose a
tree of continuations that the model verifies in one forward pass per step: at
temperature 0 the same text as plain greedy decoding, in fewer forward passes; above it,
Medusa's typical acceptance.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from minillm import backend, gpt
from minillm.cli import common
from minillm.cli.quantize import is_quantized_checkpoint, load_quantized
from minillm.tokenizer import tokenizer_from_dict
from minillm.train import CHECKPOINT_FILE, latest_run, load_checkpoint


def add_arguments(parser):
    parser.description = __doc__
    parser.add_argument("--checkpoint", default=None,
                        help="a run directory (or its checkpoint.npz) from python -m minillm train, "
                             "or a quantized .npz from python -m minillm quantize "
                             "(default: the most recent run under runs/)")
    parser.add_argument("--prompt", default="\n",
                        help="text to continue (default: a newline, i.e. start a fresh line)")
    parser.add_argument("--max-new-tokens", type=common.count, default=500, help="tokens to generate (default: 500)")
    parser.add_argument("--temperature", type=common.nonnegative_number, default=0.8,
                        help="divide the logits by this; 0 means greedy (always the likeliest token) "
                             "(default: 0.8)")
    parser.add_argument("--top-k", type=common.positive_int, default=None,
                        help="sample only among the k likeliest tokens (default: all)")
    parser.add_argument("--top-p", type=common.number_in(0.0, 1.0, lo_open=True), default=None,
                        help="sample only among the likeliest tokens whose probabilities sum to p "
                             "(nucleus sampling) (default: off)")
    parser.add_argument("--num-samples", type=common.positive_int, default=1, help="independent samples to draw (default: 1)")
    parser.add_argument("--seed", type=common.seed, default=None,
                        help="seed for the draws; the same seed gives the same text (default: random)")
    parser.add_argument("--no-cache", action="store_true",
                        help="re-run the whole context at every step instead of using the KV cache "
                             "(same output, slower: for comparison)")
    parser.add_argument("--device", default=None, choices=["cpu", "gpu"],
                        help="where to run (default: $MINILLM_DEVICE, else cpu)")
    group = parser.add_argument_group("Medusa decoding (minillm.medusa)")
    group.add_argument("--medusa", nargs="?", const="", default=None, metavar="HEADS",
                       help="decode with Medusa heads: a directory from python -m minillm train medusa "
                            "(given alone: the run's own, RUN/medusa)")
    group.add_argument("--medusa-tree", type=common.int_at_least(1), default=64, metavar="N",
                       help="nodes of the candidate tree, the root included: the first N of Medusa's "
                            "published 64-node tree mc_sim_7b_63, no deeper than the heads (default: 64)")
    group.add_argument("--posterior-threshold", type=common.number_in(0.0, 1.0), default=0.09,
                       help="typical acceptance (temperature > 0): accept a guessed token x if p(x) > "
                            "min(this, alpha * exp(-entropy)) (default: 0.09)")
    group.add_argument("--posterior-alpha", type=common.number_in(0.0, 1.0), default=0.3,
                       help="typical acceptance's alpha (default: 0.3)")


def latest_gpt_run(root="runs"):
    """The most recently written run under ``root`` that holds a GPT (BERT runs live there too)."""
    root = Path(root)
    runs = [d for d in (root.iterdir() if root.is_dir() else []) if (d / CHECKPOINT_FILE).is_file()]
    for d in sorted(runs, key=lambda d: (d / CHECKPOINT_FILE).stat().st_mtime_ns, reverse=True):
        try:   # checkpoint.json is the checkpoint's metadata in readable form: no need to load weights
            with open(d / "checkpoint.json", encoding="utf-8") as f:
                gpt.GPTConfig.from_dict(json.load(f)["model_config"])
            return d
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return latest_run(root)    # none recognisable: let the loader explain what it finds


def load_run(path=None, device=None, loaded=None):
    """(config, params, tokenizer, checkpoint dict) of a GPT run directory (default: the latest),
    or of a quantized checkpoint (params dequantized to float32). ``loaded``: the checkpoint
    dict of ``path``, when the caller has read it already."""
    if loaded is not None:
        ck = loaded
    elif path is not None and is_quantized_checkpoint(path):
        q = load_quantized(path)
        s = q["meta"]["settings"]
        ck = {"path": f"{path} ({s['scheme']} {s['bits']}-bit, {s['granularity']})", "step": q["meta"]["step"],
              "params": q["params"], "model_config": q["meta"]["model_config"],
              "tokenizer": q["meta"]["tokenizer"]}
    else:
        ck = load_checkpoint(path if path is not None else latest_gpt_run("runs"))
    mc, td = ck.get("model_config"), ck.get("tokenizer")
    if not mc or not td:
        raise ValueError(f"checkpoint: {ck['path']!r} has no model_config or tokenizer; expected a run "
                         f"written by python -m minillm train")
    try:
        config = gpt.GPTConfig.from_dict(mc)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint: {ck['path']!r} does not hold a GPT ({e})") from None
    params = backend.to_device(ck["params"], device)
    return config, params, tokenizer_from_dict(td), ck


def run(args):
    loaded = None
    if args.checkpoint is not None and not is_quantized_checkpoint(args.checkpoint):
        from minillm.cli import train_rnn
        loaded = load_checkpoint(args.checkpoint)
        if train_rnn.is_rnn_checkpoint(loaded):     # python -m minillm train rnn|lstm|gru
            return train_rnn.sample_checkpoint(args, loaded)
    config, params, tokenizer, ck = load_run(args.checkpoint, args.device, loaded)
    heads = _medusa_heads(args, config, ck) if args.medusa is not None else None
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise ValueError("prompt: expected text that encodes to at least one token, got an empty prompt")
    if len(prompt) > config.block_size:
        print(f"note: the prompt has {len(prompt)} tokens; keeping its last {config.block_size} "
              f"(the model's context)")
        prompt = prompt[-config.block_size:]
    print(f"{ck['path']} (step {ck['step']}, {gpt.num_params(params):,} parameters); "
          f"temperature {args.temperature}, top_k {args.top_k}, top_p {args.top_p}, "
          f"{'no ' if args.no_cache else ''}KV cache")
    if heads is not None:
        return _sample_medusa(args, params, config, heads, tokenizer, prompt)
    for i in range(args.num_samples):
        t0 = time.perf_counter()
        seed = None if args.seed is None else args.seed + i
        ids = gpt.generate(params, config, prompt, args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, use_cache=not args.no_cache, seed=seed)
        dt = time.perf_counter() - t0
        print("-" * 60)
        print(tokenizer.decode(ids))
        print("-" * 60)
        print(f"{args.max_new_tokens} tokens in {dt:.2f} s ({args.max_new_tokens / max(dt, 1e-9):,.0f} tokens/s)")
    return 0


def _medusa_heads(args, config, ck):
    """The heads of --medusa (alone: RUN/medusa), on the model's device; options Medusa does
    not take are refused."""
    from minillm.cli.train_medusa import load_heads
    given = [flag for flag, on in (("--top-k", args.top_k is not None), ("--top-p", args.top_p is not None),
                                   ("--no-cache", args.no_cache)) if on]
    if given:
        raise common.UsageError(f"--medusa: decodes greedily or by typical acceptance with its own "
                                f"KV cache; {', '.join(given)} does not apply")
    heads, meta = load_heads(args.medusa or Path(ck["path"]).parent, config)
    print(f"Medusa: {meta['n_heads']} heads from {meta['path']}")
    return backend.to_device(heads, args.device)


def _sample_medusa(args, params, config, heads, tokenizer, prompt):
    from minillm import medusa
    choices = medusa.mc_sim_tree(args.medusa_tree, medusa.n_heads(heads))
    for i in range(args.num_samples):
        t0 = time.perf_counter()
        seed = None if args.seed is None else args.seed + i
        ids, stats = medusa.generate(params, config, heads, prompt, args.max_new_tokens, choices=choices,
                                     temperature=args.temperature, posterior_threshold=args.posterior_threshold,
                                     posterior_alpha=args.posterior_alpha, seed=seed)
        dt = time.perf_counter() - t0
        print("-" * 60)
        print(tokenizer.decode(ids))
        print("-" * 60)
        print(f"{args.max_new_tokens} tokens in {dt:.2f} s ({args.max_new_tokens / max(dt, 1e-9):,.0f} tokens/s); "
              f"Medusa, {stats.tree_nodes}-node tree: {stats.base_calls} base forward passes, mean accepted "
              f"length {stats.mean_accepted_length:.2f}")
    return 0
