"""python -m minillm train t5: a small T5 (minillm.t5) learns to restore a line's
capitalisation and punctuation, after (optional) span-corruption pretraining, and is
scored on works it never saw.

1. The task, with answers that can be checked. Each line of verse or prose (16 to 40
   characters) is the target; its source is the same line lower-cased with everything but
   letters, digits and spaces removed ("O Romeo, Romeo! wherefore art thou Romeo?" <-
   "o romeo romeo wherefore art thou romeo"). The model must put back capitals, commas,
   stops, apostrophes and the rest.
2. Split by work: whole works are held out (minillm.data.split_documents, seed 0, the
   split every minillm model uses), so a test line's play was never seen.
3. Characters: one token per character of the training lines, plus pad (0, also the
   decoder's start), eos (1), unk and 16 sentinels for span corruption (the top ids).
4. Pretraining (--pretrain-steps, 0 to skip): span corruption (t5.span_corruption, 15%
   noise, mean span 3) of the training lines' original text: the model learns to fill in
   dropped pieces of Shakespeare, the objective T5 was pretrained with.
5. Fine-tuning (--max-steps): source -> target with teacher forcing (labels shifted right).
   Both phases run minillm.train's loop (AdamW, warmup + cosine, clipping, checkpoints).
6. Report, on --eval-lines held-out lines decoded greedily (the encoder once, cached
   cross K/V, the self-attention KV cache): exact match, character error rate (edit
   distance / reference length, over the corpus) and corpus BLEU (minillm.bleu, 13a
   tokens: punctuation counts as words), beside the "copy the source" baseline.

What to expect from the defaults (300 + 1500 steps, about 3.5 CPU-minutes; measured on
the shared 2-core machine, one seed, BENCHMARKS.md): exact match 0.19, CER 0.111 and
BLEU 59.7 on the held-out lines, against 0.00, 0.112 and 41.9 for copying the
lower-cased source. The model learns to copy the words first (the loss drops from
about 1.5 to 0.5 nats per character between steps 400 and 650) and then to punctuate.
Span-corruption pretraining did not help at this size: without it (--pretrain-steps 0)
the same 1500 steps gave 0.20, 0.092 and 61.3. After only 600 steps neither run had
learned to copy yet (CER 0.76 and 0.78).

Outputs under --out: pretrain/ and finetune/ (checkpoints, metrics.jsonl, loss.svg),
hf-t5/ (a Hugging Face T5ForConditionalGeneration directory) and results.json.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np

from minillm import backend, bleu, checkpoint, t5
from minillm import data as corpus
from minillm.cli import common
from minillm.cli.common import UsageError
from minillm.train import TrainConfig, train

MIN_LEN, MAX_LEN = 16, 40          # characters of a target line
N_SENTINELS = 16
PAD, EOS, UNK = 0, 1, 2
MODEL = dict(d_model=64, d_kv=16, d_ff=192, num_layers=2, num_decoder_layers=2, num_heads=4,
             feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False)
DEFAULTS = dict(max_steps=1500, batch_size=32, lr=3e-3, eval_interval=250)


def add_arguments(parser):
    group = parser.add_argument_group("train t5")
    group.add_argument("--pretrain-steps", type=common.count, default=300,
                       help="train t5: span-corruption pretraining steps before fine-tuning (0: none) "
                            "(default: 300)")
    group.add_argument("--eval-lines", type=common.positive_int, default=300,
                       help="train t5: held-out lines decoded for exact match, CER and BLEU (default: 300)")


def source_of(line: str) -> str:
    """The task's input: lower case, only letters, digits and single spaces."""
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", line.lower().replace("'", "")).split())


def task_lines(docs):
    """docs: (title, text) pairs (minillm.data.load_documents). Lines of MIN_LEN..MAX_LEN characters (whitespace collapsed) with at least 3 words."""
    out = []
    for _, text in docs:                                    # (title, text) per work
        for raw in text.splitlines():
            line = " ".join(raw.split())
            if MIN_LEN <= len(line) <= MAX_LEN and len(source_of(line).split()) >= 3:
                out.append(line)
    return out


class CharVocab:
    """pad 0, eos 1, unk 2, the characters, then N_SENTINELS sentinels (the top ids)."""

    def __init__(self, chars):
        self.chars = sorted(set(chars))
        self.index = {c: i + 3 for i, c in enumerate(self.chars)}
        self.vocab_size = 3 + len(self.chars) + N_SENTINELS
        self.sentinel_start = self.vocab_size - 1

    def encode(self, text):
        return [self.index.get(c, UNK) for c in text]

    def decode(self, ids):
        inv = {i: c for c, i in self.index.items()}
        out = []
        for t in ids:
            if t == EOS:
                break
            out.append(inv.get(int(t), ""))
        return "".join(out)

    def to_dict(self):
        return {"type": "t5-chars", "chars": "".join(self.chars), "n_sentinels": N_SENTINELS}


def _pad(rows, value, length=None):
    L = length or max(len(r) for r in rows)
    out = np.full((len(rows), L), value, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def make_batch(pairs, xp):
    """[(source ids, target ids)] -> (input_ids, attention_mask, labels): sources padded with
    pad (mask 0), targets + eos padded with -100."""
    src = _pad([s for s, _ in pairs], PAD)
    mask = (_pad([[1] * len(s) for s, _ in pairs], 0)).astype(bool)
    labels = _pad([list(t) + [EOS] for _, t in pairs], t5.IGNORE_INDEX)
    return xp.asarray(src), xp.asarray(mask), xp.asarray(labels)


class T5Task:
    """Pairs (or span-corrupted lines) in the shape minillm.train.train expects."""

    def __init__(self, config, params, vocab, train_items, val_items, batch_size, corrupt, xp, model_config):
        self.config, self.params, self.tokenizer = config, params, vocab
        self.train_items, self.val_items = train_items, val_items
        self.batch_size, self.corrupt, self.xp = batch_size, corrupt, xp
        self.tokens_per_batch = int(round(batch_size * np.mean([_tokens(x, corrupt) for x in train_items])))
        self.model_config = model_config

    def get_batch(self, split, rng):
        items = self.train_items if split == "train" else self.val_items
        picks = rng.integers(0, len(items), size=self.batch_size)
        if self.corrupt:
            pairs = [t5.span_corruption(items[i], 0.15, 3.0, sentinel_start=self.tokenizer.sentinel_start, rng=rng)
                     for i in picks]
        else:
            pairs = [items[i] for i in picks]
        return make_batch(pairs, self.xp)

    def loss_and_grads(self, params, batch):
        src, mask, labels = batch
        return t5.loss_and_grads(params, self.config, src, labels, mask)

    def eval_loss(self, params, batch):
        src, mask, labels = batch
        return t5.loss(params, self.config, src, labels, mask)


def _tokens(item, corrupt):
    """Real (unpadded) source + target tokens of one example, on average for a corrupted line
    (its length, plus a sentinel in each of input and target per span, plus eos)."""
    if corrupt:
        L = len(item)
        return L + 2 * max(1, round(max(1, round(0.15 * L)) / 3.0)) + 1
    return len(item[0]) + len(item[1]) + 1


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions), one row at a time."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def scores(hypotheses, references):
    """Exact match, corpus CER and corpus BLEU (13a) of hypotheses against references."""
    em = float(np.mean([h == r for h, r in zip(hypotheses, references)]))
    cer = sum(edit_distance(h, r) for h, r in zip(hypotheses, references)) / sum(len(r) for r in references)
    return {"exact_match": em, "cer": cer, "bleu": bleu.corpus_bleu(list(hypotheses), [list(references)]).score}


def evaluate(params, config, vocab, lines, xp, batch_size=64):
    """Greedy decoding of each held-out line's source -> (scores, hypotheses, seconds)."""
    hyps = []
    t0 = time.perf_counter()
    for i in range(0, len(lines), batch_size):
        chunk = lines[i:i + batch_size]
        src, mask, _ = make_batch([(vocab.encode(source_of(l)), []) for l in chunk], xp)
        out = t5.generate(params, config, src, MAX_LEN + 8, attention_mask=mask)
        hyps += [vocab.decode(row) for row in out]
    return scores(hyps, lines), hyps, time.perf_counter() - t0


def _phase(name, task, args, out, steps, log):
    tk = {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in DEFAULTS.items()}
    tk["max_steps"] = steps
    cfg = TrainConfig(**tk, block_size=2 * MAX_LEN + 1, min_lr=tk["lr"] / 10, warmup_steps=min(50, steps),
                      weight_decay=0.01, betas=(0.9, 0.99), eval_iters=5, checkpoint_interval=0,
                      seed=args.seed, out_dir=str(out / name))
    log(f"{name}: {steps} steps of batch {cfg.batch_size}, lr {cfg.lr:g}")
    return train(task, cfg, log=log)


def run(args, log=print):
    """Build the task from the corpus, pretrain, fine-tune, decode the held-out lines."""
    if args.resume:
        raise UsageError("train t5 runs its two phases afresh; --resume does not apply")
    out = Path(args.out) if args.out else Path("runs") / f"t5-{time.strftime('%Y%m%d-%H%M%S')}"
    xp = backend.xp_for(args.device)
    docs = corpus.load_documents(args.data)
    train_docs, val_docs = corpus.split_documents(docs, 0.1)
    train_lines, test_lines = task_lines(train_docs), task_lines(val_docs)
    if len(train_lines) < 10 or len(test_lines) < 1:
        raise UsageError(f"--data: too few lines of {MIN_LEN}..{MAX_LEN} characters to train on "
                         f"({len(train_lines)} train, {len(test_lines)} held out)")
    test_lines = [test_lines[i] for i in np.linspace(0, len(test_lines) - 1,
                                                      min(args.eval_lines, len(test_lines))).astype(int)]
    vocab = CharVocab("".join(train_lines))
    config = t5.T5Config(vocab_size=vocab.vocab_size, pad_token_id=PAD, eos_token_id=EOS,
                         decoder_start_token_id=PAD, **MODEL)
    params = t5.init_params(config, seed=args.seed, device=backend.device_name(args.device))
    log(f"task: restore capitals and punctuation; {len(train_lines):,} training lines, {len(test_lines)} "
        f"held-out lines scored (from {len(val_docs)} unseen works); vocabulary {vocab.vocab_size}")
    log(f"model: T5 {config.num_layers}+{config.n_decoder_layers} layers x {config.d_model}, "
        f"{config.num_heads} heads of {config.d_kv}, {config.feed_forward_proj}, {t5.num_params(params):,} "
        f"parameters; run directory {out}")
    pairs = [(vocab.encode(source_of(l)), vocab.encode(l)) for l in train_lines]
    n_val = max(1, len(pairs) // 50)
    model_config = {"t5": config.to_dict()}
    B = args.batch_size or DEFAULTS["batch_size"]
    result = {}
    if args.pretrain_steps:
        lines_ids = [np.array(vocab.encode(l)) for l in train_lines]
        task = T5Task(config, params, vocab, lines_ids[n_val:], lines_ids[:n_val], B, True, xp, model_config)
        result["pretrain"] = _phase("pretrain", task, args, out, args.pretrain_steps, log)
    task = T5Task(config, params, vocab, pairs[n_val:], pairs[:n_val], B, False, xp, model_config)
    result["finetune"] = _phase("finetune", task, args, out, args.max_steps or DEFAULTS["max_steps"], log)
    return _report(params, config, vocab, test_lines, result, out, xp, args, log)


def _report(params, config, vocab, test_lines, result, out, xp, args, log):
    s, hyps, seconds = evaluate(params, config, vocab, test_lines, xp)
    copy = scores([source_of(l) for l in test_lines], test_lines)
    log(f"held-out lines ({len(test_lines)}), greedy decoding in {seconds:.1f} s:")
    log(f"  T5:               exact match {s['exact_match']:.3f}  CER {s['cer']:.3f}  BLEU {s['bleu']:.1f}")
    log(f"  copy the source:  exact match {copy['exact_match']:.3f}  CER {copy['cer']:.3f}  BLEU {copy['bleu']:.1f}")
    for line, hyp in list(zip(test_lines, hyps))[:5]:
        log(f"  {source_of(line)!r} -> {hyp!r}  (reference {line!r})")
    checkpoint.save_hf(out / "hf-t5", config, params)
    summary = {**{f"t5_{k}": v for k, v in s.items()}, **{f"copy_{k}": v for k, v in copy.items()},
               "pretrain_steps": args.pretrain_steps, "decode_s": seconds,
               **{f"{ph}_{k}": r[k] for ph, r in result.items() for k in ("train_loss", "val_loss", "tokens_per_s",
                                                                         "elapsed_s")}}
    with open(out / "results.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    log(f"results: {out / 'results.json'}; Hugging Face directory {out / 'hf-t5'}")
    return 0
