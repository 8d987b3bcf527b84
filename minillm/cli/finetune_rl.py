"""python -m minillm finetune reward|ppo|dpo --checkpoint RUN: learn from preferences (minillm.rlhf).

The rater is programmatic (rlhf.sentiment_score: positive minus negative Shakespearean
words, the DPO paper's IMDb sentiment setting), so every result can be checked. The
reference model pi_ref is RUN: an SFT run (finetune sft) or a plain trained GPT (train).
Prompts are PROMPT_LEN-token windows of RUN's training text; held-out prompts come from its
validation text. All three commands share one directory, OUT (--out, default RUN/rlhf):

    reward  pairs.npz: two samples of pi_ref per training prompt, ranked by the labeller (ties
            dropped), and the same for held-out prompts; then a reward model (RUN's GPT trunk
            + a scalar head) trained on the training pairs only, scored by its accuracy on the
            held-out pairs. By default the trunk is frozen and the head's scores are summed over
            the response (a linear probe of the reference's features: on 751 pairs it ranked
            0.60 of held-out pairs right, against 0.56 for InstructGPT's shape, the whole trunk
            trained and the score read at the last token: --rm-train all --rm-pool last).
            -> OUT/reward/checkpoint.npz, reward.json
    ppo     rollouts of the policy (initialised as pi_ref), per-token reward -beta_kl (log pi -
            log pi_ref) + the reward model's score at the last token, a value head on the
            policy's trunk, GAE, whitened advantages, the clipped surrogate and clipped value
            loss (--ptx-coef: InstructGPT's pretraining term). Needs `finetune reward` first.
            -> OUT/ppo/checkpoint.npz, ppo.json
    dpo     DPO on pairs.npz (made if missing): no reward model, no sampling during training.
            -> OUT/dpo/checkpoint.npz, dpo.json

ppo and dpo are judged on the held-out prompts by the labeller: its mean score of the
policy's samples, the win rate against pi_ref's samples of the same prompts (a tie counts
half), and KL(pi || pi_ref) per response (the mean of sum_t log pi - log pi_ref over the
policy's samples). These are logged along training and drawn as OUT/frontier.svg, labeller
score against KL, one line per method run into OUT (the DPO paper's reward-KL frontier).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from minillm import backend, gpt, rlhf
from minillm import data as corpus
from minillm.cli import common
from minillm.cli.common import UsageError
from minillm.optim import AdamW, clip_grad_norm
from minillm.plot import line_plot
from minillm.train import load_checkpoint, save_checkpoint

METHODS = ["reward", "ppo", "dpo"]
PAIRS_FILE, FRONTIER_SVG = "pairs.npz", "frontier.svg"
# method -> (steps, batch size, lr, eval interval): minutes on a 2-core CPU with the default run
DEFAULTS = {"reward": (150, 16, 3e-4, 50), "reward-head": (2000, 64, 1e-2, 500), "ppo": (30, 16, 1e-4, 10),
            "dpo": (60, 16, 1e-4, 20)}


def add_arguments(parser):
    """The RL options, on finetune's parser (which brings --checkpoint, --out, --steps,
    --batch-size, --lr, --eval-interval, --seed, --device)."""
    g = parser.add_argument_group("finetune reward | ppo | dpo")
    g.add_argument("--prompt-len", type=common.positive_int, default=16,
                   help="reward/ppo/dpo: tokens of corpus text in each prompt (default: 16)")
    g.add_argument("--response-len", type=common.positive_int, default=48,
                   help="reward/ppo/dpo: sampled tokens in each response; prompt + response must fit "
                        "the context (default: 48)")
    g.add_argument("--pairs", type=common.positive_int, default=2000,
                   help="reward/dpo: training prompts to sample pairs for (ties are dropped) (default: 2000)")
    g.add_argument("--eval-prompts", type=common.positive_int, default=256,
                   help="held-out prompts for pair accuracy and for judging ppo/dpo (default: 256)")
    g.add_argument("--beta", type=common.positive_number, default=0.1,
                   help="dpo: beta, the strength of the implicit KL constraint (default: 0.1)")
    g.add_argument("--beta-kl", type=common.nonnegative_number, default=0.2,
                   help="ppo: the per-token KL penalty coefficient (0.05 let the KL reach 12 nats for "
                        "nothing; see BENCHMARKS.md) (default: 0.2)")
    g.add_argument("--clip", type=common.fraction, default=0.2,
                   help="ppo: the ratio clip epsilon, in (0, 1) (default: 0.2)")
    g.add_argument("--vf-coef", type=common.nonnegative_number, default=0.1,
                   help="ppo: weight of the value loss (default: 0.1)")
    g.add_argument("--ppo-epochs", type=common.positive_int, default=2,
                   help="ppo: optimisation passes over each batch of rollouts (default: 2)")
    g.add_argument("--ptx-coef", type=common.nonnegative_number, default=0.0,
                   help="ppo: gamma of PPO-ptx, the weight of the pretraining LM loss (default: 0)")
    g.add_argument("--rm-pool", default="sum", choices=["sum", "last"],
                   help="reward: the score is the head summed over the response's tokens (sum) or read at "
                        "its last token (last, InstructGPT's) (default: sum)")
    g.add_argument("--rm-train", default="head", choices=["head", "all"],
                   help="reward: train the head on the reference's frozen trunk (head: its features are "
                        "computed once; 2000 steps of 64 pairs, a --batch-size above the pair count is the full batch) or the "
                        "trunk too (all: 150 steps of 16) "
                        "(default: head)")
    g.add_argument("--reward-model", default=None,
                   help="ppo: the reward model directory (default: OUT/reward)")


# ---------------------------------------------------------------------------
# Shared: the reference, prompts, pairs, judging, the frontier
# ---------------------------------------------------------------------------

class Setup:
    """The reference model, its tokenizer, prompts and the output directory."""

    def __init__(self, args, log):
        from minillm.cli.sample import load_run
        self.xp, self.device = backend.xp_for(args.device), backend.device_name(args.device)
        self.config, self.ref, self.tokenizer, ck = load_run(args.checkpoint, backend.device_name(args.device))
        self.run_dir = Path(ck["path"]).parent
        self.out = Path(args.out) if args.out else self.run_dir / "rlhf"
        self.P, self.n = args.prompt_len, args.response_len
        if self.P < 2 or self.P + self.n > self.config.block_size:
            raise UsageError(f"--prompt-len/--response-len: prompt ({self.P}, at least 2) + response "
                             f"({self.n}) must fit the context of {self.config.block_size} tokens")
        train_tokens, val_tokens = _token_splits(self.run_dir, self.tokenizer)
        self.train_prompts = _prompts(train_tokens, self.P, 4096, seed=args.seed)
        self.eval_prompts = _prompts(val_tokens, self.P, args.eval_prompts, seed=args.seed + 1)
        self.train_tokens = train_tokens
        log(f"reference: {ck['path']} (step {ck['step']}): GPT {self.config.n_layer} layers x "
            f"{self.config.n_embd}, context {self.config.block_size}; prompts of {self.P} tokens, responses "
            f"of {self.n}; run directory {self.out}")

    def decode(self, rows):
        return [self.tokenizer.decode([int(t) for t in r]) for r in rows]

    def scores(self, responses):
        return np.array([rlhf.sentiment_score(t) for t in self.decode(responses)])


def _token_splits(run_dir, tokenizer):
    """RUN's (or, for an SFT run inside a base run, the base's) train/val token files; else the
    corpus split again and encoded with RUN's tokenizer."""
    for d in (run_dir, run_dir.parent):
        if (d / "train.npy").is_file() and (d / "val.npy").is_file():
            return np.asarray(corpus.load_tokens(d / "train.npy")), np.asarray(corpus.load_tokens(d / "val.npy"))
    train_docs, val_docs = corpus.split_documents(corpus.shakespeare_documents(), 0.1)
    return (np.array(tokenizer.encode(corpus.join_documents(train_docs)), dtype=np.int64),
            np.array(tokenizer.encode(corpus.join_documents(val_docs)), dtype=np.int64))


def _prompts(tokens, P, n, seed):
    """n windows of P tokens at seeded random places. -> (n, P) int64"""
    if len(tokens) <= P:
        raise UsageError(f"the token file has {len(tokens)} tokens: too few for prompts of {P}")
    starts = np.random.default_rng(seed).integers(0, len(tokens) - P, n)
    return np.stack([np.asarray(tokens[s:s + P], dtype=np.int64) for s in starts])


def _sample_in_batches(params, config, prompts, n, seed, batch=64, log=None):
    """rlhf.rollout over ``prompts`` in batches (seeded per batch); ``log``: progress lines."""
    out, t0 = [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        out.append(rlhf.rollout(params, config, prompts[i:i + batch], n, seed=seed + i))
        if log is not None and len(prompts) > 4 * batch and (i // batch) % 4 == 3:
            log(f"  sampled {i + len(out[-1])}/{len(prompts)} responses ({time.perf_counter() - t0:.0f} s)")
    return np.concatenate(out)


def make_pairs(setup, prompts, seed, log, what):
    """Two samples of pi_ref per prompt, ranked by the labeller; ties dropped.
    -> {"chosen", "rejected": (N, P + n) full sequences, "score_chosen", "score_rejected"}"""
    t0 = time.perf_counter()
    a = _sample_in_batches(setup.ref, setup.config, prompts, setup.n, seed, log=log)
    b = _sample_in_batches(setup.ref, setup.config, prompts, setup.n, seed + 10 ** 6, log=log)
    sa, sb = setup.scores(a), setup.scores(b)
    keep = sa != sb
    first = (sa > sb)[keep, None]
    full_a = np.concatenate([prompts, a], 1)[keep]
    full_b = np.concatenate([prompts, b], 1)[keep]
    pairs = {"chosen": np.where(first, full_a, full_b), "rejected": np.where(first, full_b, full_a),
             "score_chosen": np.maximum(sa, sb)[keep], "score_rejected": np.minimum(sa, sb)[keep]}
    log(f"{what} pairs: {int(keep.sum())} of {len(prompts)} prompts (the rest tied) in "
        f"{time.perf_counter() - t0:.0f} s; mean labeller score chosen {pairs['score_chosen'].mean():+.2f}, "
        f"rejected {pairs['score_rejected'].mean():+.2f}")
    return pairs


def load_or_make_pairs(setup, args, log):
    """OUT/pairs.npz when it was made with these settings, else made now and saved."""
    path = setup.out / PAIRS_FILE
    settings = np.array([setup.P, setup.n, args.pairs, args.eval_prompts, args.seed])
    if path.is_file():
        with np.load(path) as z:
            if np.array_equal(z["settings"], settings):
                log(f"pairs: {path} ({len(z['train_chosen'])} train, {len(z['val_chosen'])} held out)")
                return {k: z[k] for k in z.files}
    train = make_pairs(setup, setup.train_prompts[:args.pairs], args.seed, log, "training")
    val = make_pairs(setup, setup.eval_prompts, args.seed + 7, log, "held-out")
    z = {**{f"train_{k}": v for k, v in train.items()}, **{f"val_{k}": v for k, v in val.items()},
         "settings": settings}
    setup.out.mkdir(parents=True, exist_ok=True)
    backend.atomic_write(path, lambda f: np.savez(f, **z))
    return z


class Judge:
    """The labeller on held-out prompts: score, win rate against pi_ref, KL to pi_ref."""

    def __init__(self, setup, seed):
        self.setup, self.seed = setup, seed
        self.ref_responses = _sample_in_batches(setup.ref, setup.config, setup.eval_prompts, setup.n, seed + 99)
        self.ref_scores = setup.scores(self.ref_responses)

    def __call__(self, params):
        s = self.setup
        responses = _sample_in_batches(params, s.config, s.eval_prompts, s.n, self.seed)
        scores = s.scores(responses)
        idx, targets = rlhf.sequences(s.eval_prompts, responses)
        kl = backend.to_numpy(rlhf.token_logprobs(params, s.config, idx, targets)
                              - rlhf.token_logprobs(s.ref, s.config, idx, targets)).sum(1)
        win = float(np.mean(scores > self.ref_scores) + 0.5 * np.mean(scores == self.ref_scores))
        return {"score": float(scores.mean()), "win_rate": win, "kl": float(kl.mean()),
                "example": s.decode(responses[:1])[0]}


def _judge_line(step, j):
    return (f"  step {step}: held-out labeller score {j['score']:+.3f} | win rate vs reference "
            f"{j['win_rate']:.3f} | KL {j['kl']:.3f} nats")


def draw_frontier(out):
    """OUT/frontier.svg: labeller score against KL for every method whose results are in OUT."""
    series = {}
    for method in ("ppo", "dpo"):
        f = out / method / f"{method}.json"
        if f.is_file():
            curve = json.loads(f.read_text())["curve"]
            series[method.upper()] = [(c["kl"], c["score"]) for c in curve]
    return line_plot(out / FRONTIER_SVG, series, title="held-out labeller score against KL to the reference",
                     xlabel="KL(pi || pi_ref) per response (nats)", ylabel="labeller score")


def _write_json(path, obj):
    text = json.dumps(obj, indent=1) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    backend.atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _settings(args, method):
    steps, batch, lr, every = DEFAULTS[method]
    return (args.steps or steps, args.batch_size or batch, args.lr or lr,
            every if args.eval_interval is None else args.eval_interval)


def _due(step, every, steps):
    return step == steps or (every > 0 and step % every == 0)


def _copy(params):
    return {k: v.copy() for k, v in params.items()}


# ---------------------------------------------------------------------------
# finetune reward
# ---------------------------------------------------------------------------

class RewardModel:
    """The reward model being trained: the reference's trunk + a scalar head, pooled over the
    response ("sum") or read at its last token ("last"). With ``train_trunk`` False the trunk
    is frozen, so its final hidden states are computed once per sequence (``features``) and
    only the head learns: a linear probe of the reference's features."""

    def __init__(self, setup, pool, train_trunk):
        self.setup, self.pool, self.train_trunk = setup, pool, train_trunk
        self.params = _copy(setup.ref) if train_trunk else setup.ref
        self.head = rlhf.init_head(setup.config, dtype=setup.ref["wte"].dtype,
                                   device=setup.device)
        self.trained = {**self.params, **self.head} if train_trunk else self.head

    def features(self, full, batch=64):
        """The trunk's final hidden states (N, L, C) of whole sequences, no gradient."""
        xp = self.setup.xp
        return xp.concatenate([gpt.forward(self.setup.ref, self.setup.config, xp.asarray(full[i:i + batch]))[1].xf
                               for i in range(0, len(full), batch)])

    def scores(self, data, batch=64):
        """Scores of sequences (trunk trained) or of their features (trunk frozen). -> NumPy (N,)"""
        xp, P = self.setup.xp, self.setup.P
        if self.train_trunk:
            return backend.to_numpy(rlhf.rewards_of(self.params, self.setup.config, self.head, data, P, self.pool))
        v, _ = rlhf.head_forward(data, self.head)
        return backend.to_numpy(rlhf.pool_forward(v, rlhf.response_mask(v.shape, P, xp), self.pool)[0])

    def step(self, chosen, rejected):
        """Loss, batch accuracy and gradient of the trained parameters on a batch of pairs."""
        xp, P = self.setup.xp, self.setup.P
        if self.train_trunk:
            return rlhf.reward_model_step(self.params, self.setup.config, self.head, chosen, rejected, P, self.pool)
        v, hc = rlhf.head_forward(xp.concatenate([chosen, rejected]), self.head)
        r, pc = rlhf.pool_forward(v, rlhf.response_mask(v.shape, P, xp), self.pool)
        B = chosen.shape[0]
        loss, lc = rlhf.reward_loss_forward(r[:B], r[B:])
        dr_c, dr_r = rlhf.reward_loss_backward(1.0, lc)
        _, grads = rlhf.head_backward(rlhf.pool_backward(xp.concatenate([dr_c, dr_r]), pc), hc)
        return float(loss), float((r[:B] > r[B:]).mean()), grads


def _accuracy(rm, chosen, rejected):
    """Share of pairs the reward model ranks like the labeller (a tie counts half)."""
    rc, rr = rm.scores(chosen), rm.scores(rejected)
    return float(np.mean(rc > rr) + 0.5 * np.mean(rc == rr))


def run_reward(args, log=print):
    setup = Setup(args, log)
    xp = setup.xp
    frozen = args.rm_train == "head"
    steps, batch, lr, every = _settings(args, "reward-head" if frozen else "reward")
    pairs = load_or_make_pairs(setup, args, log)
    if len(pairs["train_chosen"]) == 0 or len(pairs["val_chosen"]) == 0:
        raise UsageError("every pair tied: sample more prompts (--pairs, --eval-prompts) or longer responses")
    rm = RewardModel(setup, args.rm_pool, train_trunk=not frozen)
    data = {k: pairs[k] for k in ("train_chosen", "train_rejected", "val_chosen", "val_rejected")}
    t0 = time.perf_counter()
    if frozen:
        data = {k: rm.features(v) for k, v in data.items()}
        log(f"the reference's features of {sum(len(v) for v in data.values())} sequences in "
            f"{time.perf_counter() - t0:.0f} s (its trunk stays frozen)")
    tc, tr, vc, vr = data["train_chosen"], data["train_rejected"], data["val_chosen"], data["val_rejected"]
    opt = AdamW(rm.trained, lr=lr, weight_decay=0.0)
    log(f"reward model: the reference's trunk ({'frozen' if frozen else 'trained'}) + a scalar head "
        f"({'summed over the response' if args.rm_pool == 'sum' else 'at the last token'}); {steps} steps of "
        f"{batch} pairs, lr {lr:g}")
    rng = np.random.default_rng(args.seed)
    before, curve = _accuracy(rm, vc, vr), []
    for step in range(1, steps + 1):
        rows = np.arange(len(tc)) if batch >= len(tc) else rng.integers(0, len(tc), batch)   # all: full batch
        loss, acc, grads = rm.step(xp.asarray(tc[rows]), xp.asarray(tr[rows]))
        clip_grad_norm(grads, 1.0)
        opt.step(grads)
        if step % max(1, steps // 15) == 0 or step == steps:
            log(f"step {step}/{steps} | loss {loss:.4f} | batch accuracy {acc:.2f} | {time.perf_counter() - t0:.0f} s")
        if _due(step, every, steps):
            curve.append({"step": step, "loss": loss, "val_accuracy": _accuracy(rm, vc, vr)})
            log(f"  held-out pair accuracy {curve[-1]['val_accuracy']:.3f}")
    result = {"method": "reward", "checkpoint": str(args.checkpoint), "pool": args.rm_pool, "train": args.rm_train,
              "steps": steps, "batch_size": batch, "lr": lr, "train_pairs": int(len(tc)), "val_pairs": int(len(vc)),
              "val_accuracy_before": before, "val_accuracy": curve[-1]["val_accuracy"],
              "train_accuracy": _accuracy(rm, tc, tr), "curve": curve, "elapsed_s": time.perf_counter() - t0}
    out = setup.out / "reward"
    save_checkpoint(out, {**rm.params, **rm.head}, step=steps, tokenizer=setup.tokenizer,
                    model_config={"reward_model": setup.config.to_dict(), "pool": args.rm_pool,
                                  "prompt_len": setup.P}, metrics={"val_accuracy": result["val_accuracy"]})
    _write_json(out / "reward.json", result)
    log(f"held-out pair accuracy: {result['val_accuracy']:.3f} ({len(vc)} pairs; {before:.3f} before "
        f"training, 0.5 is chance); train {result['train_accuracy']:.3f}. Reward model: {out}")
    return 0


def load_reward_model(path, config):
    ck = load_checkpoint(path)
    mc = (ck.get("model_config") or {}).get("reward_model")
    if mc is None:
        raise UsageError(f"--reward-model: {ck['path']} is not a reward model (run finetune reward)")
    rm_config = gpt.GPTConfig.from_dict(mc)
    if rm_config.vocab_size != config.vocab_size:
        raise UsageError(f"--reward-model: its vocabulary ({rm_config.vocab_size}) is not the policy's "
                         f"({config.vocab_size})")
    p = ck["params"]
    return (rm_config, {k: v for k, v in p.items() if not k.startswith("head.")},
            {k: v for k, v in p.items() if k.startswith("head.")}, ck["model_config"].get("pool", "last"))


# ---------------------------------------------------------------------------
# finetune dpo
# ---------------------------------------------------------------------------

def run_dpo(args, log=print):
    setup = Setup(args, log)
    xp, config = setup.xp, setup.config
    steps, batch, lr, every = _settings(args, "dpo")
    pairs = load_or_make_pairs(setup, args, log)
    P = setup.P
    ic, tc = rlhf.sequences(pairs["train_chosen"][:, :P], pairs["train_chosen"][:, P:])
    ir, tr = rlhf.sequences(pairs["train_rejected"][:, :P], pairs["train_rejected"][:, P:])
    if len(ic) == 0:
        raise UsageError("every training pair tied: sample more prompts (--pairs) or longer responses")
    ref_c = backend.to_numpy(rlhf.token_logprobs(setup.ref, config, ic, tc).sum(1))
    ref_r = backend.to_numpy(rlhf.token_logprobs(setup.ref, config, ir, tr).sum(1))
    policy = _copy(setup.ref)
    opt = AdamW(policy, lr=lr, weight_decay=0.0)
    judge = Judge(setup, args.seed + 5)
    log(f"DPO: beta {args.beta:g}, {len(ic)} pairs, {steps} steps of {batch}, lr {lr:g}")
    curve = [{"step": 0, **judge(policy)}]
    log(_judge_line(0, curve[-1]))
    rng, t0 = np.random.default_rng(args.seed), time.perf_counter()
    for step in range(1, steps + 1):
        rows = rng.integers(0, len(ic), batch)
        loss, acc, grads = rlhf.dpo_step(policy, config, xp.asarray(ic[rows]), xp.asarray(tc[rows]),
                                         xp.asarray(ir[rows]), xp.asarray(tr[rows]), xp.asarray(ref_c[rows]),
                                         xp.asarray(ref_r[rows]), beta=args.beta)
        clip_grad_norm(grads, 1.0)
        opt.step(grads)
        if step % 5 == 0 or step == steps:
            log(f"step {step}/{steps} | DPO loss {loss:.4f} | implicit-reward accuracy {acc:.2f} | "
                f"{time.perf_counter() - t0:.0f} s")
        if _due(step, every, steps):
            curve.append({"step": step, "loss": loss, **judge(policy)})
            log(_judge_line(step, curve[-1]))
    return _finish(setup, args, "dpo", policy, curve, {"beta": args.beta, "train_pairs": int(len(ic))},
                   steps, batch, lr, t0, log)


def _finish(setup, args, method, policy, curve, extra, steps, batch, lr, t0, log):
    out = setup.out / method
    final = curve[-1]
    result = {"method": method, "checkpoint": str(args.checkpoint), "steps": steps, "batch_size": batch, "lr": lr,
              **extra, "eval_prompts": int(len(setup.eval_prompts)), "reference_score": curve[0]["score"],
              "score": final["score"], "win_rate": final["win_rate"], "kl": final["kl"], "curve": curve,
              "elapsed_s": time.perf_counter() - t0}
    save_checkpoint(out, policy, step=steps, model_config=setup.config.to_dict(), tokenizer=setup.tokenizer,
                    metrics={k: final[k] for k in ("score", "win_rate", "kl")})
    _write_json(out / f"{method}.json", result)
    svg = draw_frontier(setup.out)
    log(f"{method}: held-out labeller score {final['score']:+.3f} (reference {curve[0]['score']:+.3f}), "
        f"win rate {final['win_rate']:.3f}, KL {final['kl']:.3f} nats; policy {out}; frontier {svg}")
    log(f"  e.g. {final['example']!r}")
    return 0


# ---------------------------------------------------------------------------
# finetune ppo
# ---------------------------------------------------------------------------

def reward_normaliser(setup, rm, seed, n=128):
    """(mean, std) of the reward model's scores of the reference's samples on training prompts:
    PPO uses (r - mean) / std, so that the reference scores 0 on average (InstructGPT normalises
    its reward model the same way) and the scale of r is comparable with the KL penalty."""
    prompts = setup.train_prompts[-n:]
    responses = _sample_in_batches(setup.ref, setup.config, prompts, setup.n, seed)
    full = setup.xp.asarray(np.concatenate([prompts, responses], 1))
    r = backend.to_numpy(rlhf.rewards_of(rm[1], rm[0], rm[2], full, setup.P, rm[3]))
    return float(r.mean()), float(r.std() + 1e-8)


def _rollout_batch(setup, policy, vhead, rm, prompts, seed, beta_kl, norm):
    """Sample, score, and compute what PPO's epochs need (no gradient here)."""
    xp, config = setup.xp, setup.config
    rm_config, rm_params, rm_head, pool = rm
    responses = rlhf.rollout(policy, config, prompts, setup.n, seed=seed)
    idx, targets = (xp.asarray(a) for a in rlhf.sequences(prompts, responses))
    mask = (targets != rlhf.IGNORE).astype(policy["wte"].dtype)
    logits, values, _ = rlhf.value_forward(policy, config, vhead, idx)
    logp_old = rlhf.token_logprobs_forward(logits, targets)[0]
    logp_ref = rlhf.token_logprobs(setup.ref, config, idx, targets)
    full = xp.asarray(np.concatenate([prompts, responses], 1))
    scores = (rlhf.rewards_of(rm_params, rm_config, rm_head, full, setup.P, pool) - norm[0]) / norm[1]
    rewards = rlhf.kl_rewards(logp_old, logp_ref, mask, scores, beta_kl)
    adv, ret = rlhf.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    stats = {"rm_score": float(scores.mean()),   # normalised: the reference's samples average 0
             "kl": float(((logp_old - logp_ref) * mask).sum(1).mean()),
             "labeller": float(setup.scores(responses).mean())}
    return (idx, targets, mask, logp_old, values, rlhf.whiten(adv, mask), ret), stats


def run_ppo(args, log=print):
    setup = Setup(args, log)
    xp, config = setup.xp, setup.config
    steps, batch, lr, every = _settings(args, "ppo")
    rm_dir = Path(args.reward_model) if args.reward_model else setup.out / "reward"
    if not (rm_dir / "checkpoint.npz").is_file():
        raise UsageError(f"ppo needs a reward model: {rm_dir} has none (run python -m minillm finetune reward "
                         f"--checkpoint {args.checkpoint} first, or pass --reward-model)")
    rm = load_reward_model(rm_dir, config)
    rm = (rm[0], backend.to_device(rm[1], backend.device_name(args.device)),
          backend.to_device(rm[2], backend.device_name(args.device)), rm[3])
    policy = _copy(setup.ref)
    vhead = rlhf.init_head(config, dtype=policy["wte"].dtype, device=backend.device_name(args.device))
    model = {**policy, **vhead}
    opt = AdamW(model, lr=lr, weight_decay=0.0)
    judge = Judge(setup, args.seed + 5)
    norm = reward_normaliser(setup, rm, args.seed + 3)
    log(f"reward model scores normalised by the reference's: (r - {norm[0]:.4f}) / {norm[1]:.4f}")
    log(f"PPO: reward model {rm_dir}; beta_kl {args.beta_kl:g}, clip {args.clip:g}, value coef "
        f"{args.vf_coef:g}, {args.ppo_epochs} epochs per batch, ptx {args.ptx_coef:g}; {steps} iterations of "
        f"{batch} rollouts, lr {lr:g}")
    curve = [{"step": 0, **judge(policy)}]
    log(_judge_line(0, curve[-1]))
    rng, t0 = np.random.default_rng(args.seed), time.perf_counter()
    for step in range(1, steps + 1):
        prompts = setup.train_prompts[rng.integers(0, len(setup.train_prompts), batch)]
        rollout, stats = _rollout_batch(setup, policy, vhead, rm, prompts, args.seed + 1000 * step, args.beta_kl,
                                        norm)
        for _ in range(args.ppo_epochs):
            lp, lv, grads = rlhf.ppo_step(policy, config, vhead, rollout, clip=args.clip, vf_coef=args.vf_coef)
            if args.ptx_coef > 0:       # PPO-ptx: + gamma * the LM loss on pretraining text
                x, y = corpus.get_batch(setup.train_tokens, batch, config.block_size, rng, xp=xp)
                _, ptx = gpt.loss_and_grads(policy, config, x, y)
                grads = {k: g + args.ptx_coef * ptx[k] if k in ptx else g for k, g in grads.items()}
            clip_grad_norm(grads, 1.0)
            opt.step(grads)
        log(f"iteration {step}/{steps} | reward model {stats['rm_score']:+.3f} | labeller {stats['labeller']:+.2f} | "
            f"KL {stats['kl']:.3f} | policy loss {lp:+.4f} | value loss {lv:.4f} | {time.perf_counter() - t0:.0f} s")
        if _due(step, every, steps):
            curve.append({"step": step, **judge(policy)})
            log(_judge_line(step, curve[-1]))
    extra = {"beta_kl": args.beta_kl, "clip": args.clip, "vf_coef": args.vf_coef, "ppo_epochs": args.ppo_epochs,
             "ptx_coef": args.ptx_coef, "reward_model": str(rm_dir),
             "reward_normaliser": norm}
    return _finish(setup, args, "ppo", policy, curve, extra, steps, batch, lr, t0, log)


def run(args, log=print):
    if getattr(args, "lora", False):
        raise UsageError(f"--lora: LoRA applies to finetune sft; {args.method} trains every weight of its model")
    return {"reward": run_reward, "ppo": run_ppo, "dpo": run_dpo}[args.method](args, log)
