"""Supervised fine-tuning (SFT): a base GPT taught to answer in turns, from a chat template,
instruction data made from the corpus, and a loss counted on the responses only.

A base model continues text. An assistant answers: it reads a conversation and writes the
next turn. SFT (the first step of InstructGPT's recipe) teaches that by plain next-token
training on conversations written in a *chat template*, with the loss kept to what the
assistant says.

The chat template. Every turn is its role's token, the turn's text, and an end-of-turn token:

    <|system|>You are terse.<|end|><|user|>Who speaks? O Romeo, Romeo!<|end|><|assistant|>Juliet<|end|>

The five chat tokens (:data:`CHAT_TOKENS`: system, user, assistant, end, pad) are new ids
appended after the trained tokenizer's last id (:func:`add_chat_tokens`), so every existing
id keeps its meaning and the base model reads old text exactly as before. They are never
produced by encoding text: a user who types "<|end|>" gets its characters, not the
control token. The model's embedding (and an untied LM head) gains one row per new id
(:func:`grow_vocab`); a new row starts at the mean of the trained rows plus a little noise
(Hewitt 2021: at the mean, a new token's logit is the average logit, so the grown model's
predictions barely move, where a fresh N(0, 0.02^2) row could be far off; the noise keeps
the five new tokens apart).

Labels, the response-only loss. :func:`build_example` renders a conversation to ids
x_0 .. x_{L-1} and labels y_0 .. y_{L-1} in minillm's next-token convention, the one
``gpt.loss_and_grads`` and the training batches use: position t's label is the target of
the model's prediction *at* t, so

    y_t = x_{t+1}   if token t+1 is in an assistant turn's text or is that turn's <|end|>
    y_t = -100      otherwise (system and user turns, every role token, the last position)

and the loss is the mean cross-entropy over the counted positions of a batch,

    L = (1 / N) sum_{(b, t): y_bt != -100} -log softmax(logits_bt)[y_bt],   N = #counted.

The prompt is context, not something to imitate: training on it would spend the model's
capacity on predicting questions (the user's words, which at inference are given) and,
for short answers after long prompts, let the prompt's many tokens drown the few that
matter. Counting the <|end|> after a response teaches the model to stop. (N counts tokens
over the whole batch, so a long answer weighs more than a short one.)

Batching. :func:`pad_batch` right-pads every example to the batch's longest with the pad
id and labels -100. The GPT is causal: position t attends to positions <= t only, so pads
to the right of a row's last real token change nothing at any real position, and their
labels are ignored, so they add nothing to the loss or its gradient. No attention mask is
needed (left padding would need one: the real tokens would see the pads).

Instructions from the corpus (:func:`instruction_dataset`). Two kinds whose answers can be
checked, made from the plays' speaker headings ("\\n\\nROMEO.\\n" before each speech):

    speaker   "Who speaks? <the start of a speech>"   -> the speaker's name (one of the
              ``n_speakers`` who speak most often in the training speeches)
    play      "Which play? <the start of a speech>"   -> the play's title (one of :data:`PLAYS`)

The plays are the four that the default pretraining run holds out for validation
(``data.split_documents(docs, 0.1, seed=0)``), so the base model has never read a line
of them. The split is by passage, as the BERT genre task (cli/train_bert.py) holds whole
plays out: each play's speeches are cut into runs of :data:`SPEECHES_PER_PASSAGE`
consecutive speeches, and a seeded draw sends ~``eval_fraction`` of the runs to
evaluation. Both kinds made from one speech go to the same side, and an evaluation
example whose text also occurs in training (a common "Ay, my lord.") is dropped, so no
evaluation example is ever trained on. The questions are short because the default GPT
reads 64 characters; the speech is cut so that question, speech and the longest answer of
its kind fit ``block_size``.

Accuracy (:func:`greedy_correct`): the exact match of the greedy answer. Greedy decoding
writes response + <|end|> exactly iff at every response position the argmax of the
logits, given the right answer so far, is the right next token (by induction over the
answer's tokens), so one teacher-forced forward pass over prompt + answer decides it.
The baseline is the majority class of the training answers, per kind.

Reading order: the chat tokens and the grown model, the template (build_example,
build_prompt), batching, the loss (the plain loop first, then the batched one through the
GPT), accuracy, the instruction data, and last the argument checks.

This file builds on the GPT (its forward and backward), so it imports minillm.gpt; gpt.py
never imports it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from typing import NamedTuple

import numpy as np

from . import gpt
from .backend import array_module, check_array, check_int, check_int_arg, check_number, make_rng, to_numpy
from .backprop import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from .tokenizer import BPETokenizer, CharTokenizer, tokenizer_from_dict

__all__ = ["CHAT_TOKENS", "ROLES", "IGNORE_INDEX", "PLAYS", "QUESTIONS", "SPEECHES_PER_PASSAGE",
           "add_chat_tokens", "chat_token_ids", "has_chat_tokens", "grow_vocab", "prepare_model",
           "build_example", "build_prompt", "render", "pad_batch",
           "response_loss_naive", "response_loss_and_grads", "greedy_correct", "greedy_answer",
           "Instruction", "speeches", "instruction_dataset", "to_messages", "encode_instructions",
           "accuracy", "majority_baseline"]

CHAT_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>",
               "end": "<|end|>", "pad": "<|pad|>"}
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------
# The chat tokens: new ids after the trained ones, and the rows the model grows for them
# ---------------------------------------------------------------------------

def has_chat_tokens(tokenizer) -> bool:
    """Whether every chat token is a token of ``tokenizer`` (a vocabulary entry of a
    CharTokenizer, a special token of a BPETokenizer)."""
    _check_tokenizer_type(tokenizer)
    return all(token in _chat_vocabulary(tokenizer) for token in CHAT_TOKENS.values())


def _chat_vocabulary(tokenizer) -> dict:
    """{token string: id} of the tokens a chat token can be: the vocabulary (char) or the specials (BPE)."""
    if isinstance(tokenizer, CharTokenizer):
        return {token: i for i, token in enumerate(tokenizer.vocab)}
    return dict(tokenizer.special_tokens)


def add_chat_tokens(tokenizer):
    """A new tokenizer: ``tokenizer`` plus the chat tokens it lacks, at ids vocab_size, vocab_size + 1, ...

    Every existing id keeps its token, so ``encode`` gives the same ids as before on any
    text. A chat token already present keeps its id (so adding twice changes nothing).
    CharTokenizer: appended to the vocabulary (encode still works character by character,
    so text never turns into a chat token). BPETokenizer: added as special tokens.
    """
    _check_tokenizer_type(tokenizer)
    present = _chat_vocabulary(tokenizer)
    missing = [token for token in CHAT_TOKENS.values() if token not in present]
    d = tokenizer.to_dict()
    if isinstance(tokenizer, CharTokenizer):
        d["vocab"] = list(d["vocab"]) + missing
    else:
        d["special_tokens"] = {**d["special_tokens"],
                               **{token: tokenizer.vocab_size + k for k, token in enumerate(missing)}}
    return tokenizer_from_dict(d)


def chat_token_ids(tokenizer) -> dict:
    """{"system", "user", "assistant", "end", "pad": id} of a tokenizer that has the chat tokens."""
    _check_has_chat_tokens(tokenizer)
    ids = _chat_vocabulary(tokenizer)
    return {name: ids[token] for name, token in CHAT_TOKENS.items()}


def grow_vocab(params, config, vocab_size, noise=0.1, seed=0):
    """(params, config) of the same GPT with ``vocab_size`` rows in its embedding (and untied head).

    Old rows are unchanged; each new row is mean + noise * std * z, z ~ N(0, 1) per
    coordinate, with the mean and std of the existing rows, coordinate by coordinate
    (noise=0: exactly the mean). Every array is copied, so training the result never
    writes into ``params``. The new config differs only in vocab_size.
    """
    vocab_size = _check_grow_vocab(params, config, vocab_size, noise)
    rng = make_rng(seed)
    grown = {name: p.copy() for name, p in params.items()}
    n_new = vocab_size - config.vocab_size
    for name in ("wte",) if config.tie_embeddings else ("wte", "lm_head"):
        w = params[name]                                                    # (V, C)
        xp = array_module(w)
        mean, std = w.mean(axis=0), w.std(axis=0)                           # (C,), (C,)
        z = xp.asarray(rng.standard_normal((n_new, w.shape[1]))).astype(w.dtype)   # (V_new - V, C)
        new_rows = mean[None, :] + w.dtype.type(noise) * std[None, :] * z   # (V_new - V, C)
        grown[name] = xp.concatenate([w, new_rows.astype(w.dtype)], axis=0)  # (V_new, C)
    return grown, dataclasses.replace(config, vocab_size=vocab_size)


def prepare_model(params, config, tokenizer, noise=0.1, seed=0):
    """(params, config, tokenizer) ready for chats: the chat tokens added and the vocabulary
    grown to match. A model already prepared comes back as it is (arrays not copied)."""
    chat_tokenizer = add_chat_tokens(tokenizer)
    if chat_tokenizer.vocab_size == config.vocab_size:
        return params, config, chat_tokenizer
    params, config = grow_vocab(params, config, chat_tokenizer.vocab_size, noise=noise, seed=seed)
    return params, config, chat_tokenizer


# ---------------------------------------------------------------------------
# The template
# ---------------------------------------------------------------------------

def _encode_text(tokenizer, text):
    """Text as ordinary tokens: chat-token strings inside it stay plain characters."""
    return tokenizer.encode_ordinary(text) if isinstance(tokenizer, BPETokenizer) else tokenizer.encode(text)


def _turn(tokenizer, ids_of, message):
    """[role token] + the text's ids + [<|end|>]."""
    return [ids_of[message["role"]]] + _encode_text(tokenizer, message["content"]) + [ids_of["end"]]


def build_example(tokenizer, messages):
    """A conversation -> (ids, labels), two lists of L ints (see the module docstring).

    messages: [{"role": "system" | "user" | "assistant", "content": str}, ...] with at
    least one assistant turn; a system turn only first. labels[t] = ids[t + 1] where token
    t + 1 is an assistant turn's text or its closing <|end|>, else -100 (so labels[-1] is
    -100): ``gpt.loss_and_grads(params, config, ids[None], labels[None])`` is the
    response-only loss.
    """
    ids_of = _check_build_example(tokenizer, messages)
    ids, in_response = [], []        # in_response[i]: token i is what the assistant says
    for message in messages:
        turn = _turn(tokenizer, ids_of, message)
        ids += turn
        said = message["role"] == "assistant"
        in_response += [False] + [said] * (len(turn) - 1)   # the role token is the template's
    labels = [ids[t + 1] if in_response[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)]
    return ids, labels + [IGNORE_INDEX]


def build_prompt(tokenizer, messages):
    """The ids a model continues to answer: the turns, then <|assistant|> (what it then writes
    up to its <|end|> is the answer). messages: the conversation so far, its last turn the user's."""
    ids_of = _check_build_prompt(tokenizer, messages)
    ids = []
    for message in messages:
        ids += _turn(tokenizer, ids_of, message)
    return ids + [ids_of["assistant"]]


def render(tokenizer, ids) -> str:
    """ids -> text with the chat tokens written out (the tokenizer's decode does that already:
    a chat token decodes to its own string)."""
    return tokenizer.decode(list(ids))


# ---------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------

def pad_batch(examples, pad_id, width=None):
    """[(ids, labels), ...] -> (ids, labels), int64 arrays (B, T), right-padded.

    T = ``width`` or the longest example. Pads: ids ``pad_id``, labels -100. Right padding
    needs no attention mask in a causal model (module docstring).
    """
    width = _check_pad_batch(examples, pad_id, width)
    ids = np.full((len(examples), width), pad_id, dtype=np.int64)           # (B, T)
    labels = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)  # (B, T)
    for b, (row_ids, row_labels) in enumerate(examples):
        ids[b, :len(row_ids)] = row_ids
        labels[b, :len(row_labels)] = row_labels
    return ids, labels


# ---------------------------------------------------------------------------
# The response-only loss
# ---------------------------------------------------------------------------

def response_loss_naive(logits, labels):
    """The loss of the module docstring, one counted position at a time (the plain version):
    mean over (b, t) with labels[b, t] != -100 of -log softmax(logits[b, t])[labels[b, t]].
    logits: (B, T, V) NumPy; labels: (B, T) -> float (0.0 when nothing counts)."""
    total, n = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            y = int(labels[b, t])
            if y == IGNORE_INDEX:
                continue
            row = logits[b, t].astype(np.float64)
            log_z = row.max() + math.log(np.exp(row - row.max()).sum())   # log sum_v exp(row_v)
            total += log_z - row[y]
            n += 1
    return total / n if n else 0.0


def response_loss_and_grads(params, config, ids, labels, train=False, rng=None):
    """The response-only loss through the GPT and its gradient, batched.

        1. logits = GPT(ids)                         (B, T, V)
        2. loss = CE(logits, labels), -100 ignored   the mean over counted positions
    backward, step 2 then step 1: dlogits = (softmax - onehot) / N on counted rows, 0 on
    the others; grads = gpt.backward(dlogits). -> (loss: float, grads like params)
    """
    _check_response_loss(ids, labels)
    logits, cache = gpt.forward(params, config, ids, train=train, rng=rng)   # 1.
    loss, ce = softmax_cross_entropy_forward(logits, labels)                  # 2.
    # backward of step 2, then of step 1
    dlogits = softmax_cross_entropy_backward(logits.dtype.type(1.0), ce)      # (B, T, V)
    return float(loss), gpt.backward(dlogits, cache)


# ---------------------------------------------------------------------------
# Accuracy: the exact match of the greedy answer
# ---------------------------------------------------------------------------

def greedy_correct(params, config, ids, labels, batch_size=64):
    """(B,) bool: does greedy decoding after each row's prompt write exactly its labelled
    response (and <|end|>)? True iff argmax(logits[b, t]) == labels[b, t] at every counted t
    (module docstring). Rows with no counted position are False."""
    _check_response_loss(ids, labels)
    xp = array_module(params["wte"])
    out = []
    for start in range(0, ids.shape[0], batch_size):
        x, y = xp.asarray(ids[start:start + batch_size]), xp.asarray(labels[start:start + batch_size])
        logits, _ = gpt.forward(params, config, x)                 # (b, T, V)
        counted = y != IGNORE_INDEX                                # (b, T)
        hit = (xp.argmax(logits, axis=-1) == y) | ~counted          # (b, T)
        out.append(to_numpy(xp.all(hit, axis=1) & xp.any(counted, axis=1)).astype(bool))
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


def greedy_answer(params, config, tokenizer, messages, max_new_tokens=32):
    """The model's greedy answer to ``messages`` (ending with a user turn): generated after
    build_prompt's ids up to <|end|> (not included) or ``max_new_tokens``, decoded."""
    prompt = build_prompt(tokenizer, messages)
    end = chat_token_ids(tokenizer)["end"]
    room = max(1, min(max_new_tokens, config.block_size - len(prompt)))
    ids = gpt.generate(params, config, prompt, room, temperature=0.0, eos_id=end)[len(prompt):]
    return tokenizer.decode(ids[:ids.index(end)] if end in ids else ids)


# ---------------------------------------------------------------------------
# Instructions from the corpus
# ---------------------------------------------------------------------------

PLAYS = ("Coriolanus", "Love's Labour's Lost", "Pericles", "Romeo and Juliet")
QUESTIONS = {"speaker": "Who speaks?", "play": "Which play?"}
SPEECHES_PER_PASSAGE = 10     # consecutive speeches that go to the same side of the split
_MIN_CHARS = 12               # shorter speeches ("Ay.") say too little to answer from
_HEADING = re.compile(r"\n\n[ \t]*([A-Z][A-Za-z' ]{0,30}?)\.[ \t]*\n")
_NOT_A_SPEAKER = re.compile(r"^(ACT|Act|SCENE|Scene)\b")
_ACT_ONE = re.compile(r"^[ \t]*(ACT|Act)\s+(I|1|FIRST)\b|^[ \t]*(SCENE|Scene)\b", re.M)  # cli/train_bert's


class Instruction(NamedTuple):
    kind: str      # "speaker" or "play"
    text: str      # the start of a speech, whitespace collapsed, cut to fit
    answer: str    # the speaker's name or the play's title
    play: str
    speech: int    # the speech's index in its play


def speeches(text):
    """[(speaker, speech text)] of a play in order: each heading line ("ROMEO." alone on a
    line after a blank one) and the speech after it up to the next blank line, stage
    directions in [brackets] removed, whitespace collapsed. Speaker names are title-cased
    ("LADY CAPULET" -> "Lady Capulet"), as plays spell them either way. The title page and
    list of persons (before the first ACT/SCENE heading) are skipped, and so are the
    "ACT II." / "SCENE I." headings that look like a speaker's."""
    first_act = _ACT_ONE.search(text)
    text = text[first_act.start():] if first_act else text
    out = []
    for m in _HEADING.finditer(text):
        if _NOT_A_SPEAKER.match(m.group(1)):
            continue
        body = text[m.end():].split("\n\n", 1)[0]
        body = " ".join(re.sub(r"\[[^\]]*\]", " ", body).split())
        out.append((m.group(1).strip().title(), body))
    return out


def _passage_split(n_speeches, eval_fraction, rng):
    """(n,) bool, True for the speeches held out: whole runs of SPEECHES_PER_PASSAGE."""
    n_runs = -(-n_speeches // SPEECHES_PER_PASSAGE)
    held_run = rng.random(n_runs) < eval_fraction                         # (runs,)
    return np.repeat(held_run, SPEECHES_PER_PASSAGE)[:n_speeches]         # (n,)


def _fit(kind, text, longest_answer, block_size):
    """``text`` cut so that the chat (4 template tokens, question, space, text, answer) fits
    block_size at one token per character (the char tokenizer's count; BPE's is fewer)."""
    room = block_size - 4 - len(QUESTIONS[kind]) - 1 - longest_answer
    return text[:max(room, 0)].rstrip()


def instruction_dataset(docs, plays=PLAYS, n_speakers=8, eval_fraction=0.2, block_size=64,
                        max_eval_per_kind=300, seed=0):
    """{"train": [Instruction], "eval": [Instruction]} from ``docs`` [(title, text)] (module docstring).

    Speaker answers are the ``n_speakers`` commonest speakers of the training speeches (over
    all ``plays``); every kept speech gives a "play" instruction, and a "speaker" one when
    its speaker is among them. At most ``max_eval_per_kind`` evaluation examples per kind,
    evenly spaced through the held-out ones.
    """
    texts = _check_instruction_dataset(docs, plays, n_speakers, eval_fraction, block_size,
                                       max_eval_per_kind, seed)
    rng = np.random.default_rng(seed)
    rows = {"train": [], "eval": []}                    # (play, index, speaker, text)
    for play in plays:
        spoken = [(i, s, t) for i, (s, t) in enumerate(speeches(texts[play])) if len(t) >= _MIN_CHARS]
        held = _passage_split(len(spoken), eval_fraction, rng)
        for (i, speaker, text), h in zip(spoken, held):
            rows["eval" if h else "train"].append((play, i, speaker, text))
    top = [s for s, _ in Counter(s for _, _, s, _ in rows["train"]).most_common(n_speakers)]
    longest = {"speaker": max(map(len, top)), "play": max(map(len, plays))}
    _check_room(longest, block_size)
    out = {}
    for split, split_rows in rows.items():
        made = []
        for play, i, speaker, text in split_rows:
            made.append(Instruction("play", _fit("play", text, longest["play"], block_size), play, play, i))
            if speaker in top:
                made.append(Instruction("speaker", _fit("speaker", text, longest["speaker"], block_size),
                                        speaker, play, i))
        out[split] = made
    out["eval"] = _unseen_and_capped(out["train"], out["eval"], max_eval_per_kind)
    return out


def _unseen_and_capped(train, held, cap):
    """The held-out instructions whose (kind, text) no training one has, at most ``cap`` per
    kind, evenly spaced."""
    seen = {(x.kind, x.text) for x in train}
    kept = []
    for kind in QUESTIONS:
        fresh = [x for x in held if x.kind == kind and (x.kind, x.text) not in seen]
        if len(fresh) > cap:
            fresh = [fresh[i] for i in np.linspace(0, len(fresh) - 1, cap).round().astype(int)]
        kept += fresh
    return kept


def to_messages(instruction, with_answer=True):
    """An Instruction as a chat: the user asks, the assistant answers (left out when
    ``with_answer`` is False: a prompt for generation)."""
    ask = {"role": "user", "content": f"{QUESTIONS[instruction.kind]} {instruction.text}"}
    return [ask, {"role": "assistant", "content": instruction.answer}] if with_answer else [ask]


def encode_instructions(tokenizer, instructions, block_size):
    """(ids, labels) int64 arrays (N, T), right-padded, T <= block_size. A chat that comes out
    longer than block_size tokens (a character that takes several BPE bytes) keeps the
    longest start of its speech text that fits."""
    pad = chat_token_ids(tokenizer)["pad"]
    examples = []
    for x in instructions:
        ids, labels = build_example(tokenizer, to_messages(x))
        if len(ids) > block_size:
            ids, labels = _longest_fitting(tokenizer, x, block_size)
        examples.append((ids, labels))
    return pad_batch(examples, pad)


def _longest_fitting(tokenizer, x, block_size):
    """build_example of ``x`` with its text cut to the longest prefix that fits (bisection)."""
    fits, too_long = 0, len(x.text)             # text[:fits] fits, text[:too_long] does not
    while too_long - fits > 1:
        mid = (fits + too_long) // 2
        n_ids = len(build_example(tokenizer, to_messages(x._replace(text=x.text[:mid])))[0])
        fits, too_long = (mid, too_long) if n_ids <= block_size else (fits, mid)
    ids, labels = build_example(tokenizer, to_messages(x._replace(text=x.text[:fits].rstrip())))
    _check_fits(ids, block_size, x)
    return ids, labels


def accuracy(params, config, tokenizer, instructions, block_size=None):
    """{kind: {"accuracy", "n"}} of the greedy answers to ``instructions`` (exact match)."""
    ids, labels = encode_instructions(tokenizer, instructions, block_size or config.block_size)
    correct = greedy_correct(params, config, ids, labels)
    kinds = np.array([x.kind for x in instructions])
    return {kind: {"accuracy": float(correct[kinds == kind].mean()), "n": int((kinds == kind).sum())}
            for kind in QUESTIONS if (kinds == kind).any()}


def majority_baseline(train, held):
    """{kind: {"answer", "accuracy"}}: always give the commonest training answer of the kind."""
    out = {}
    for kind in QUESTIONS:
        answers = [x.answer for x in train if x.kind == kind]
        held_answers = [x.answer for x in held if x.kind == kind]
        if answers and held_answers:
            best = Counter(answers).most_common(1)[0][0]
            out[kind] = {"answer": best, "accuracy": sum(a == best for a in held_answers) / len(held_answers)}
    return out


# ---------------------------------------------------------------------------
# Argument checks (kept out of the code above)
# ---------------------------------------------------------------------------

def _check_tokenizer_type(tokenizer):
    if not isinstance(tokenizer, (CharTokenizer, BPETokenizer)):
        raise TypeError(f"tokenizer: expected a CharTokenizer or BPETokenizer (what a GPT run has), "
                        f"got {type(tokenizer).__name__}")


def _check_has_chat_tokens(tokenizer):
    _check_tokenizer_type(tokenizer)
    vocab = _chat_vocabulary(tokenizer)
    missing = [token for token in CHAT_TOKENS.values() if token not in vocab]
    if missing:
        raise ValueError(f"tokenizer: lacks the chat tokens {missing}; add them with "
                         f"sft.add_chat_tokens(tokenizer) and grow the model with sft.grow_vocab "
                         f"(sft.prepare_model does both)")


def _check_messages(messages, need_assistant):
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TypeError(f"messages: expected a non-empty list of {{'role', 'content'}} dicts, "
                        f"got {messages!r}"[:200])
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise TypeError(f"messages[{i}]: expected a dict with keys 'role' and 'content', got {m!r}"[:200])
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}]['role']: expected one of {list(ROLES)}, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise TypeError(f"messages[{i}]['content']: expected a str, got {type(m['content']).__name__}")
        if m["role"] == "system" and i:
            raise ValueError(f"messages[{i}]['role']: a system turn may only come first, got one at {i}")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise ValueError("messages: expected at least one assistant turn (the response the loss "
                         "counts), got roles " + str([m["role"] for m in messages]))


def _check_build_example(tokenizer, messages):
    ids_of = chat_token_ids(tokenizer)
    _check_messages(messages, need_assistant=True)
    return ids_of


def _check_build_prompt(tokenizer, messages):
    ids_of = chat_token_ids(tokenizer)
    _check_messages(messages, need_assistant=False)
    if messages[-1]["role"] == "assistant":
        raise ValueError("messages: the last turn is the assistant's; a prompt ends with the user's "
                         "(or system's) turn, for the model to answer")
    return ids_of


def _check_grow_vocab(params, config, vocab_size, noise):
    if not isinstance(config, gpt.GPTConfig):
        raise TypeError(f"config: expected a GPTConfig, got {type(config).__name__}")
    if not isinstance(params, dict) or "wte" not in params:
        raise TypeError("params: expected a GPT's parameter dict (with 'wte')")
    check_array("params['wte']", params["wte"])
    if tuple(params["wte"].shape) != (config.vocab_size, config.n_embd):
        raise ValueError(f"params['wte']: expected shape {(config.vocab_size, config.n_embd)} (the config's), "
                         f"got {tuple(params['wte'].shape)}")
    check_number("noise", noise, lo=0.0)
    return check_int_arg("vocab_size", vocab_size, lo=config.vocab_size)


def _check_pad_batch(examples, pad_id, width):
    if not isinstance(examples, (list, tuple)) or not examples:
        raise TypeError("examples: expected a non-empty list of (ids, labels) pairs")
    for i, ex in enumerate(examples):
        if not (isinstance(ex, (list, tuple)) and len(ex) == 2 and len(ex[0]) == len(ex[1])):
            raise ValueError(f"examples[{i}]: expected an (ids, labels) pair of equal lengths")
    check_int_arg("pad_id", pad_id, lo=0)
    longest = max(len(ids) for ids, _ in examples)
    width = check_int_arg("width", width, lo=1, optional=True)
    if width is not None and width < longest:
        raise ValueError(f"width: expected at least the longest example's length {longest}, got {width}")
    return longest if width is None else width


def _check_response_loss(ids, labels):
    check_int("ids", ids)
    check_int("labels", labels)
    if ids.ndim != 2 or tuple(labels.shape) != tuple(ids.shape):
        raise ValueError(f"labels: expected the shape of ids (B, T) = {tuple(ids.shape)}, got "
                         f"{tuple(labels.shape)}")


def _check_instruction_dataset(docs, plays, n_speakers, eval_fraction, block_size, max_eval, seed):
    """{title: text} of the plays, once the arguments are well-formed."""
    texts = dict(docs)
    missing = [p for p in plays if p not in texts]
    if missing:
        raise ValueError(f"plays: not in docs: {missing} (docs has {sorted(texts)[:6]}...)")
    check_int_arg("n_speakers", n_speakers, lo=1)
    check_number("eval_fraction", eval_fraction, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    check_int_arg("block_size", block_size, lo=16)
    check_int_arg("max_eval_per_kind", max_eval, lo=1)
    check_int_arg("seed", seed, lo=0)
    return texts


def _check_room(longest, block_size):
    need = max(4 + len(QUESTIONS[kind]) + 1 + n + _MIN_CHARS for kind, n in longest.items())
    if need > block_size:
        raise ValueError(f"block_size: the instructions need a context of at least {need} tokens (template, "
                         f"question, {_MIN_CHARS} characters of speech, the longest answer), got {block_size}")


def _check_fits(ids, block_size, instruction):
    if len(ids) > block_size:
        raise ValueError(f"block_size: the chat for {instruction.kind} -> {instruction.answer!r} takes "
                         f"{len(ids)} tokens even with no speech text, more than {block_size}")
