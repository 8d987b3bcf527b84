"""sft.py: chat tokens that leave a trained tokenizer's ids alone, response-only labels, padding,
the response loss through a GPT checked by finite differences, greedy exact match, the
instruction data's split, the LoRA path, and finetune sft on the command line."""
import json
import os
import subprocess
from pathlib import Path
import sys
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from helpers import assert_alive, assert_close, assert_gradcheck, scaled
from minillm import backprop as bp
from minillm import checkpoint, data, gpt, lora, sft
from minillm.cli.finetune import SFTTask
from minillm.tokenizer import BPETokenizer, CharTokenizer, tokenizer_from_dict
from strategies import seeds

ALPHABET = "abcde ?!"
CHAR = CharTokenizer.from_text(ALPHABET + "<|>nusr", unk="~")   # spells the chat tokens too


@lru_cache(maxsize=1)
def bpe():
    return BPETokenizer.train("abc abd abe ab cd? de! " * 20, 270, special_tokens=["<|endoftext|>"])


TOKENIZERS = {"char": lambda: CHAR, "bpe": bpe}

texts = st.lists(st.sampled_from(list(ALPHABET) + ["<|end|>", "<|user|>"]), max_size=6).map("".join)


@st.composite
def chats(draw):
    """A conversation: an optional system turn, then user/assistant turns with at least one
    assistant turn; contents may contain the chat tokens' strings (plain text, not tokens)."""
    turns = [{"role": "system", "content": draw(texts)}] if draw(st.booleans()) else []
    roles = draw(st.lists(st.sampled_from(["user", "assistant"]), min_size=1, max_size=4))
    if "assistant" not in roles:
        roles[draw(st.integers(0, len(roles) - 1))] = "assistant"
    return turns + [{"role": r, "content": draw(texts)} for r in roles]


def encode_plain(tok, text):
    return tok.encode_ordinary(text) if isinstance(tok, BPETokenizer) else tok.encode(text)


# ---------------------------------------------------------------------------
# Chat tokens
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", TOKENIZERS)
@given(text=st.text(alphabet=ALPHABET, max_size=20))
def test_chat_tokens_get_new_ids_and_leave_every_existing_id_alone(kind, text):
    tok = TOKENIZERS[kind]()
    chat = sft.add_chat_tokens(tok)
    assert chat.vocab_size == tok.vocab_size + len(sft.CHAT_TOKENS)
    assert sorted(sft.chat_token_ids(chat).values()) == list(range(tok.vocab_size, chat.vocab_size))
    assert chat.encode(text) == tok.encode(text)
    assert chat.decode(list(range(tok.vocab_size))) == tok.decode(list(range(tok.vocab_size)))
    if kind == "bpe":
        assert chat.special_tokens["<|endoftext|>"] == tok.special_tokens["<|endoftext|>"]
    again = sft.add_chat_tokens(chat)            # adding twice changes nothing
    assert again.to_dict() == chat.to_dict()
    assert sft.chat_token_ids(tokenizer_from_dict(json.loads(json.dumps(chat.to_dict())))) == \
        sft.chat_token_ids(chat)                 # as a checkpoint stores it


# ---------------------------------------------------------------------------
# The template and its labels
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", TOKENIZERS)
@given(messages=chats())
def test_labels_are_minus_100_exactly_off_the_responses(kind, messages):
    tok = sft.add_chat_tokens(TOKENIZERS[kind]())
    ids_of = sft.chat_token_ids(tok)
    ids, labels = sft.build_example(tok, messages)
    # the expected mask, built turn by turn from the template: role token, text, <|end|>
    expected_ids, response = [], []
    for m in messages:
        text = encode_plain(tok, m["content"])
        expected_ids += [ids_of[m["role"]]] + text + [ids_of["end"]]
        response += [False] + [m["role"] == "assistant"] * (len(text) + 1)
    assert ids == expected_ids and len(labels) == len(ids)
    for t in range(len(ids)):
        counted = t + 1 < len(ids) and response[t + 1]
        assert labels[t] == (ids[t + 1] if counted else sft.IGNORE_INDEX), t
    n_response = sum(len(encode_plain(tok, m["content"])) + 1 for m in messages if m["role"] == "assistant")
    assert sum(y != sft.IGNORE_INDEX for y in labels) == n_response
    # round trip: the ids decode to the template written out, chat-token strings in the text included
    assert sft.render(tok, ids) == "".join(sft.CHAT_TOKENS[m["role"]] + m["content"] + "<|end|>"
                                           for m in messages)
    prompt = sft.build_prompt(tok, messages[:1]) if messages[0]["role"] != "assistant" else None
    if prompt is not None:
        assert prompt[-1] == ids_of["assistant"] and ids[:len(prompt) - 1] == prompt[:-1]


def test_labels_follow_the_gpt_loss_convention():
    """labels[t] is the target of the prediction at t: the loss gpt.loss_and_grads gives with
    them is the mean -log p(response token | everything before it)."""
    tok = sft.add_chat_tokens(CHAR)
    cfg = gpt.GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=8)
    params = gpt.init_params(cfg, seed=1, dtype=np.float64)
    ids, labels = sft.build_example(tok, [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}])
    x = np.array([ids])
    logits, _ = gpt.forward(params, cfg, x)
    logp = bp.log_softmax(logits[0])
    answer_start = len(ids) - 3                       # c, d, <|end|>: the last three tokens
    by_hand = -np.mean([logp[t - 1, ids[t]] for t in range(answer_start, len(ids))])
    assert gpt.loss(params, cfg, x, np.array([labels])) == pytest.approx(by_hand, rel=1e-12)


# ---------------------------------------------------------------------------
# Padding
# ---------------------------------------------------------------------------

TINY_CHAT = sft.add_chat_tokens(CHAR)
TINY = gpt.GPTConfig(vocab_size=TINY_CHAT.vocab_size, block_size=24, n_layer=1, n_head=2, n_embd=8)


@given(batch=st.lists(chats(), min_size=1, max_size=3), extra=st.integers(0, 3))
def test_right_padding_changes_no_real_position(batch, extra):
    examples = [sft.build_example(TINY_CHAT, m) for m in batch]
    examples = [(i[:TINY.block_size - 3], y[:TINY.block_size - 3]) for i, y in examples]
    pad = sft.chat_token_ids(TINY_CHAT)["pad"]
    width = max(len(i) for i, _ in examples) + extra
    ids, labels = sft.pad_batch(examples, pad, width=width)
    assert ids.shape == labels.shape == (len(examples), width) and ids.dtype == labels.dtype == np.int64
    params = gpt.init_params(TINY, seed=2, dtype=np.float64)
    logits, _ = gpt.forward(params, TINY, ids)
    for b, (row_ids, row_labels) in enumerate(examples):
        n = len(row_ids)
        assert list(ids[b, :n]) == row_ids and list(labels[b, :n]) == row_labels
        assert np.all(ids[b, n:] == pad) and np.all(labels[b, n:] == sft.IGNORE_INDEX)
        alone, _ = gpt.forward(params, TINY, np.array([row_ids]))
        assert_close(logits[b, :n], alone[0], rtol=1e-12, atol=1e-13)   # causal: pads on the right are invisible


# ---------------------------------------------------------------------------
# The response-only loss and its gradient through the GPT
# ---------------------------------------------------------------------------

@settings(max_examples=scaled(4))
@given(batch=st.lists(chats(), min_size=1, max_size=3), seed=seeds,
       config=st.sampled_from([TINY, gpt.GPTConfig(vocab_size=TINY_CHAT.vocab_size, block_size=24, n_layer=1,
                                                    n_head=2, n_embd=8, tie_embeddings=False, norm="rmsnorm")]))
def test_response_loss_gradient_matches_finite_differences_through_the_gpt(batch, seed, config):
    examples = [sft.build_example(TINY_CHAT, m) for m in batch]
    examples = [(i[:config.block_size], y[:min(len(i), config.block_size) - 1] + [sft.IGNORE_INDEX])
                for i, y in examples]
    ids, labels = sft.pad_batch(examples, sft.chat_token_ids(TINY_CHAT)["pad"])
    counted = labels != sft.IGNORE_INDEX
    if not counted.any() or ids.shape[1] < 2:
        labels[0, 0] = ids[0, 1] if ids.shape[1] > 1 else 0   # keep a counted target: the gradient must be alive
        counted = labels != sft.IGNORE_INDEX
    params = gpt.init_params(config, seed=seed % 1000, dtype=np.float64)
    loss, grads = sft.response_loss_and_grads(params, config, ids, labels)
    ref_loss, ref_grads = gpt.loss_and_grads(params, config, ids, labels)
    logits, _ = gpt.forward(params, config, ids)
    assert loss == pytest.approx(ref_loss, rel=1e-12) == pytest.approx(sft.response_loss_naive(logits, labels))
    for k in params:
        assert_close(grads[k], ref_grads[k], rtol=1e-12, atol=1e-15)
    assert_alive({k: g for k, g in grads.items() if k != "wpe"}, loss=loss, counted=counted.sum())
    n = counted.sum()
    y_safe = np.where(counted, labels, 0)

    def per_position_losses(p):      # the loss as an array whose sum it is: round-off cancels
        lg, _ = gpt.forward(p, config, ids)
        lp = bp.log_softmax(lg)
        return -np.take_along_axis(lp, y_safe[..., None], axis=-1)[..., 0] * counted / n

    rep = bp.check_dict_gradients(per_position_losses, params, grads, max_checks_per_param=4, seed=seed % 97)
    assert_gradcheck(rep)


def test_prompt_tokens_get_no_gradient_as_targets():
    """Changing what the user says after the last response changes neither the loss nor the
    gradient's source: only response positions are targets."""
    tok = TINY_CHAT
    params = gpt.init_params(TINY, seed=3, dtype=np.float64)
    a = sft.build_example(tok, [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"},
                                {"role": "user", "content": "dd"}])
    b = sft.build_example(tok, [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"},
                                {"role": "user", "content": "ee"}])
    la = sft.response_loss_and_grads(params, TINY, np.array([a[0]]), np.array([a[1]]))[0]
    lb = sft.response_loss_and_grads(params, TINY, np.array([b[0]]), np.array([b[1]]))[0]
    assert la == lb


# ---------------------------------------------------------------------------
# The grown model
# ---------------------------------------------------------------------------

@given(seed=seeds, tied=st.booleans(), noise=st.sampled_from([0.0, 0.1]))
def test_grow_vocab_keeps_old_rows_and_old_logits(seed, tied, noise):
    config = gpt.GPTConfig(vocab_size=CHAR.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8,
                           tie_embeddings=tied)
    params = gpt.init_params(config, seed=seed % 1000, dtype=np.float64)
    before = {k: v.copy() for k, v in params.items()}
    grown, cfg = sft.grow_vocab(params, config, config.vocab_size + 5, noise=noise, seed=seed % 7)
    assert cfg.vocab_size == config.vocab_size + 5 and cfg.n_embd == config.n_embd
    for name in ("wte",) if tied else ("wte", "lm_head"):
        old, new = params[name], grown[name][config.vocab_size:]
        assert np.array_equal(grown[name][:config.vocab_size], old)
        if noise == 0:
            assert_close(new, np.broadcast_to(old.mean(axis=0), new.shape))
        else:
            assert np.all(np.abs(new - old.mean(axis=0)) <= 6 * noise * old.std(axis=0) + 1e-12)
            assert len({tuple(r) for r in new}) == 5   # the new tokens stay apart
    ids = np.array([[0, 1, 2, 3]])
    old_logits, _ = gpt.forward(params, config, ids)
    new_logits, _ = gpt.forward(grown, cfg, ids)
    assert_close(new_logits[..., :config.vocab_size], old_logits, rtol=1e-12, atol=1e-14)
    grown["wte"][0, 0] += 1.0                   # a copy: training the grown model leaves the base alone
    assert all(np.array_equal(params[k], before[k]) for k in params)


# ---------------------------------------------------------------------------
# Accuracy: greedy exact match in one pass
# ---------------------------------------------------------------------------

TAUGHT = [("ab", "cd"), ("ba", "e"), ("dd", "a b")]


@lru_cache(maxsize=1)
def taught_model():
    """The tiny GPT after a few hundred Adam steps on the TAUGHT chats: it answers them, and
    (mostly) not others, so both outcomes of the exact match occur."""
    from minillm.optim import make_optimizer
    params = gpt.init_params(TINY, seed=5, dtype=np.float64)
    rows = [sft.build_example(TINY_CHAT, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
            for q, a in TAUGHT]
    ids, labels = sft.pad_batch(rows, sft.chat_token_ids(TINY_CHAT)["pad"])
    opt = make_optimizer("adam", params, lr=3e-2)
    for _ in range(150):
        opt.step(sft.response_loss_and_grads(params, TINY, ids, labels)[1])
    return params


@given(pick=st.integers(0, len(TAUGHT) - 1), question=st.text(alphabet="abcde", min_size=1, max_size=4),
       answer=st.text(alphabet="abcde ", min_size=1, max_size=3), taught=st.booleans())
def test_greedy_correct_is_what_greedy_decoding_writes(pick, question, answer, taught):
    params = taught_model()
    if taught:
        question, answer = TAUGHT[pick]
    ask = [{"role": "user", "content": question}]
    ids, labels = sft.build_example(TINY_CHAT, ask + [{"role": "assistant", "content": answer}])
    prompt = sft.build_prompt(TINY_CHAT, ask)
    want = TINY_CHAT.encode(answer) + [sft.chat_token_ids(TINY_CHAT)["end"]]
    wrote = gpt.generate(params, TINY, prompt, len(want), temperature=0.0)[len(prompt):]
    correct = sft.greedy_correct(params, TINY, np.array([ids]), np.array([labels]))
    assert bool(correct[0]) == (wrote == want)
    if taught:
        assert correct[0] and sft.greedy_answer(params, TINY, TINY_CHAT, ask) == answer   # alive: it learned them


# ---------------------------------------------------------------------------
# Instructions from the corpus
# ---------------------------------------------------------------------------

@lru_cache(maxsize=1)
def dataset():
    return sft.instruction_dataset(data.shakespeare_documents())


def test_instruction_plays_are_the_ones_pretraining_holds_out():
    _, val = data.split_documents(data.shakespeare_documents(), 0.1, seed=0)
    assert set(sft.PLAYS) <= {title for title, _ in val}


def test_no_evaluation_example_is_trained_on():
    ds = dataset()
    train, held = ds["train"], ds["eval"]
    assert {x.kind for x in held} == set(sft.QUESTIONS) and len(held) >= 400
    assert not {(x.kind, x.text) for x in train} & {(x.kind, x.text) for x in held}
    assert not {(x.play, x.speech) for x in train} & {(x.play, x.speech) for x in held}   # split by speech
    tok = sft.add_chat_tokens(CharTokenizer.from_text(data.shakespeare_text(), unk="\ufffd"))
    enc = {split: sft.encode_instructions(tok, rows, 64)[0] for split, rows in ds.items()}
    assert enc["train"].shape[1] <= 64 and enc["eval"].shape[1] <= 64
    assert not {r.tobytes() for r in enc["train"]} & {r.tobytes() for r in enc["eval"]}
    speakers = {x.answer for x in train if x.kind == "speaker"}
    assert len(speakers) == 8 and {x.answer for x in held if x.kind == "speaker"} <= speakers
    assert {x.answer for x in train if x.kind == "play"} == set(sft.PLAYS)
    base = sft.majority_baseline(train, held)
    assert base["play"]["answer"] == "Coriolanus" and 0 < base["speaker"]["accuracy"] < 0.5


def test_speeches_read_the_headings():
    play = "Persons.\n\nROMEO, a lover.\n\nACT I.\n\nSCENE I. A street.\n\nROMEO.\nO, she doth [Aside.] teach\n" \
           "the torches.\n\nLADY CAPULET. \nWhat, ho!\n\n"
    assert sft.speeches(play) == [("Romeo", "O, she doth teach the torches."), ("Lady Capulet", "What, ho!")]


# ---------------------------------------------------------------------------
# LoRA: only the adapters train
# ---------------------------------------------------------------------------

def test_lora_task_trains_only_the_adapters_and_the_new_rows():
    from minillm.cli.finetune import NEW_ROWS
    from minillm.optim import make_optimizer
    from minillm.train import TrainConfig, train_step
    params = gpt.init_params(TINY, seed=4)
    base = {k: v.copy() for k, v in params.items()}
    chats_ = [[{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}]] * 4
    ids, labels = sft.pad_batch([sft.build_example(TINY_CHAT, m) for m in chats_], 0)
    task = SFTTask(TINY, params, TINY_CHAT, {"train": (ids, labels), "val": (ids, labels)}, 2, np,
                   lora_settings=(2, 4.0), seed=1, n_new=len(sft.CHAT_TOKENS))
    trained = {k: v.copy() for k, v in task.params.items()}
    assert set(trained) == set(lora.init_lora(params, task_targets(), 2, 4.0)) | {"wte" + NEW_ROWS}
    assert trained["wte" + NEW_ROWS].shape == (5, TINY.n_embd)
    cfg = TrainConfig(max_steps=3, batch_size=2, block_size=TINY.block_size, lr=1e-2, warmup_steps=0)
    opt = make_optimizer("adamw", task.params, lr=1e-2)
    rng = np.random.default_rng(0)
    for step in range(3):
        train_step(task, opt, rng, cfg, step)
    assert all(np.array_equal(params[k], base[k]) for k in params)           # the base never moves
    assert all(not np.array_equal(task.params[k], trained[k]) for k in task.params)
    merged = task.model_params()
    assert not np.array_equal(merged["h.0.attn.w_qkv"], base["h.0.attn.w_qkv"])
    old = TINY.vocab_size - 5
    assert np.array_equal(merged["wte"][:old], base["wte"][:old])             # trained tokens' rows: frozen
    assert np.array_equal(merged["wte"][old:], task.params["wte" + NEW_ROWS])


def task_targets():
    from minillm.cli.finetune import LORA_TARGETS
    return LORA_TARGETS


def test_lora_task_gradient_matches_finite_differences():
    """dL/d(adapters, new rows) through the merged GPT, in float64."""
    params = gpt.init_params(TINY, seed=6, dtype=np.float64)
    chats_ = [[{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c<|end|>"}]]
    ids, labels = sft.pad_batch([sft.build_example(TINY_CHAT, m) for m in chats_], 0)
    task = SFTTask(TINY, params, TINY_CHAT, {"train": (ids, labels), "val": (ids, labels)}, 1, np,
                   lora_settings=(2, 4.0), seed=1, n_new=5)
    for i, k in enumerate(sorted(task.params)):      # B != 0, else dA = s dW B^T is trivially 0
        if k.endswith(lora.SUFFIX_B):
            task.params[k] = np.random.default_rng(i).standard_normal(task.params[k].shape) * 0.5
    loss, grads = task.loss_and_grads(task.params, (ids, labels))
    assert_alive(grads, loss=loss)
    counted = labels != sft.IGNORE_INDEX
    y_safe = np.where(counted, labels, 0)

    def per_position(p):
        lp = bp.log_softmax(gpt.forward(task.model_params(p), TINY, ids)[0])
        return -np.take_along_axis(lp, y_safe[..., None], axis=-1)[..., 0] * counted / counted.sum()

    assert_gradcheck(bp.check_dict_gradients(per_position, task.params, grads, max_checks_per_param=6))


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

def test_bad_input_is_a_clear_error():
    tok = TINY_CHAT
    with pytest.raises(ValueError, match="tokenizer: lacks the chat tokens"):
        sft.build_example(CHAR, [{"role": "assistant", "content": "a"}])
    with pytest.raises(ValueError, match="messages: expected at least one assistant turn"):
        sft.build_example(tok, [{"role": "user", "content": "a"}])
    with pytest.raises(ValueError, match=r"messages\[1\]\['role'\]: expected one of"):
        sft.build_example(tok, [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}])
    with pytest.raises(ValueError, match="a system turn may only come first"):
        sft.build_example(tok, [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                                {"role": "assistant", "content": "c"}])
    with pytest.raises(TypeError, match=r"messages\[0\]: expected a dict"):
        sft.build_example(tok, [("user", "a")])
    with pytest.raises(TypeError, match="messages: expected a non-empty list"):
        sft.build_example(tok, [])
    with pytest.raises(ValueError, match="the last turn is the assistant's"):
        sft.build_prompt(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(TypeError, match="tokenizer: expected a CharTokenizer or BPETokenizer"):
        sft.add_chat_tokens("abc")
    with pytest.raises(ValueError, match="width: expected at least the longest"):
        sft.pad_batch([([1, 2, 3], [1, 2, 3])], 0, width=2)
    with pytest.raises(ValueError, match=r"examples\[0\]: expected an \(ids, labels\) pair of equal lengths"):
        sft.pad_batch([([1, 2, 3], [1, 2])], 0)
    with pytest.raises(ValueError, match="vocab_size: expected an int >= 8"):
        sft.grow_vocab(gpt.init_params(gpt.GPTConfig(8, 4, 1, 1, 4)), gpt.GPTConfig(8, 4, 1, 1, 4), 7)
    with pytest.raises(ValueError, match="labels: expected the shape of ids"):
        sft.response_loss_and_grads(gpt.init_params(TINY), TINY, np.zeros((1, 3), dtype=np.int64),
                                    np.zeros((1, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="plays: not in docs"):
        sft.instruction_dataset([("Hamlet", "x")])


# ---------------------------------------------------------------------------
# The command line, at a tiny size
# ---------------------------------------------------------------------------

def test_finetune_sft_writes_a_run_that_sample_loads(tmp_path, capsys, monkeypatch):
    from minillm.__main__ import main
    monkeypatch.setenv("MINILLM_DEVICE", "cpu")
    tok = CharTokenizer.from_text(data.shakespeare_text(), unk="\ufffd")
    cfg = gpt.GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)
    checkpoint.save_checkpoint(tmp_path / "base", gpt.init_params(cfg), model_config=cfg.to_dict(), tokenizer=tok)
    assert main(["finetune", "sft", "--checkpoint", str(tmp_path / "base"), "--steps", "2", "--batch-size", "4",
                 "--lora", "--lora-rank", "2", "--eval-interval", "0"]) == 0
    out = capsys.readouterr().out
    assert "majority baseline (held out): speaker" in out and "held-out accuracy after: speaker" in out
    run = tmp_path / "base" / "sft-lora"
    results = json.loads((run / "sft.json").read_text())
    assert set(results["accuracy_after"]) == {"speaker", "play"} and results["steps"] == 2
    ck = checkpoint.load_checkpoint(run)
    chat = tokenizer_from_dict(ck["tokenizer"])
    assert ck["model_config"]["vocab_size"] == chat.vocab_size == tok.vocab_size + 5
    assert sft.has_chat_tokens(chat)
    assert main(["sample", "--checkpoint", str(run), "--max-new-tokens", "4", "--prompt", "Who"]) == 0
    assert "4 tokens" in capsys.readouterr().out


def test_finetune_sft_mistakes_are_one_line_and_status_2(tmp_path):
    """As a user meets them: a fresh ``python -m minillm`` per case (tests/cli_runner.py forks them)."""
    tok = CharTokenizer.from_text(data.shakespeare_text(), unk="\ufffd")
    cfg = gpt.GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    checkpoint.save_checkpoint(tmp_path / "short", gpt.init_params(cfg), model_config=cfg.to_dict(), tokenizer=tok)
    (tmp_path / "empty").mkdir()
    cases = [(["--checkpoint", "short"], "block_size: the instructions need a context of at least 48 tokens"),
             (["--checkpoint", "empty"], "no checkpoint.npz in 'empty'"),
             (["--checkpoint", "short", "--steps", "0"], "argument --steps: expected an integer >= 1")]
    cases_file, results_file = tmp_path / "cases.json", tmp_path / "results.json"
    cases_file.write_text(json.dumps([{"argv": ["finetune", "sft", *argv], "cwd": str(tmp_path), "env": {}}
                                      for argv, _ in cases] +
                                     [{"argv": ["finetune", "distill"], "cwd": str(tmp_path), "env": {}}]))
    runner = Path(__file__).parent / "cli_runner.py"
    env = dict(os.environ, PYTHONPATH=str(runner.parents[1]), MINILLM_DEVICE="cpu", OPENBLAS_NUM_THREADS="1")
    env.pop("MINILLM_DEBUG", None)
    subprocess.run([sys.executable, str(runner), str(cases_file), str(results_file)], check=True, timeout=300, env=env)
    results = json.loads(results_file.read_text())
    for (argv, words), r in zip(cases + [(["distill"], "invalid choice: 'distill'")], results):
        assert r["returncode"] == 2 and words in r["stderr"], (argv, r)
        assert len(r["stderr"].strip().splitlines()) == 1, r["stderr"]


def test_a_chat_too_long_in_bpe_tokens_loses_the_end_of_its_speech():
    tok = sft.add_chat_tokens(BPETokenizer.train("plain ascii", 256))   # the bytes alone: "é" is 2 ids
    x = sft.Instruction("play", "é" * 30, "Pericles", "Pericles", 0)
    ids, labels = sft.encode_instructions(tok, [x], 40)
    assert ids.shape[1] <= 40
    kept = tok.decode(ids[0]).split("Which play? ")[1].split("<|end|>")[0]
    assert kept and set(kept) == {"é"} and len(kept) < 30
    assert tok.decode([y for y in labels[0] if y != sft.IGNORE_INDEX]) == "Pericles<|end|>"


@given(batch=st.lists(chats(), min_size=1, max_size=3), seed=seeds)
def test_response_loss_is_hugging_faces_shifted_loss(batch, seed):
    """Hugging Face's causal-LM convention: labels aligned with the ids (-100 off the response)
    and the model shifts them, loss = CE(logits[:, :-1], labels_hf[:, 1:]) (PyTorch computes it).
    Ours are already shifted: labels[t] = labels_hf[t + 1]. Same loss."""
    torch = pytest.importorskip("torch")
    examples = [sft.build_example(TINY_CHAT, m) for m in batch]
    examples = [(i[:TINY.block_size], y[:min(len(i), TINY.block_size) - 1] + [sft.IGNORE_INDEX])
                for i, y in examples]
    ids, labels = sft.pad_batch(examples, sft.chat_token_ids(TINY_CHAT)["pad"])
    labels_hf = np.full_like(ids, sft.IGNORE_INDEX)
    labels_hf[:, 1:] = labels[:, :-1]                # the response tokens themselves, in place
    counted = labels_hf != sft.IGNORE_INDEX
    assume(counted.any())                            # PyTorch's mean over nothing is NaN, ours 0
    assert np.array_equal(labels_hf[counted], ids[counted])
    params = gpt.init_params(TINY, seed=seed % 1000, dtype=np.float64)
    ours, _ = sft.response_loss_and_grads(params, TINY, ids, labels)
    logits, _ = gpt.forward(params, TINY, ids)
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(logits[:, :-1]).reshape(-1, TINY.vocab_size),
                                            torch.from_numpy(labels_hf[:, 1:]).reshape(-1), ignore_index=-100)
    assert ours == pytest.approx(float(ref), rel=1e-12)
