"""A user's mistake at the command line gets one clear line on stderr and exit status 2.

Every case runs ``python -m minillm ...`` in a process of its own, the way a user meets it:
the line must name the command and what was wrong, stderr must hold nothing else (no
traceback), and the status must be 2. ``--debug`` / ``MINILLM_DEBUG=1`` bring the traceback
back, and an exception that minillm did not raise on purpose (a bug) still propagates with
its traceback and status 1.

To stay fast, the cases run through tests/cli_runner.py: one interpreter imports the
command line once and forks a child per case that runs ``minillm`` as ``__main__``, as
``python -m`` does. One case per command also runs as a plain ``python -m minillm``
subprocess (a fresh interpreter, its own import order), and must answer the same.
The files the cases name are made once for the module: tiny runs and checkpoints written
in-process, no training, no corpus.
"""
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from minillm import backend, bert, checkpoint, data, gpt, train
from minillm.__main__ import is_user_error, main, one_line
from minillm.cli.common import UsageError
from minillm.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parents[1]
HAS_GPU = backend.gpu_available()
TINY = ["--preset", "tiny", "--max-steps", "1", "--sample-tokens", "0"]

# (id, argv, words the error line must contain). Files named here are made by `world`.
CASES = [
    # train
    ("train-data-missing", ["train", *TINY, "--data", "missing.txt"], "data: no such file 'missing.txt'"),
    ("train-data-2-chars", ["train", *TINY, "--data", "two.txt"], "has 2 characters, too few"),
    ("train-data-empty", ["train", *TINY, "--data", "empty.txt"], "is empty"),
    ("train-max-steps-0", ["train", "--preset", "tiny", "--max-steps", "0"],
     "argument --max-steps: expected an integer >= 1, got 0"),
    ("train-max-steps-word", ["train", "--max-steps", "many"], "argument --max-steps: expected an integer, got 'many'"),
    ("train-lr-negative", ["train", *TINY, "--lr", "-1"], "argument --lr: expected a number >= 0, got -1"),
    ("train-seed-negative", ["train", *TINY, "--seed", "-1"], "argument --seed: expected an integer >= 0"),
    ("train-block-size-too-long", ["train", *TINY, "--data", "small.txt", "--block-size", "100000"],
     "at least block_size + 1 = 100001 tokens"),
    ("train-unknown-preset", ["train", "--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    ("train-bpe-vocab-too-small", ["train", *TINY, "--tokenizer", "bpe", "--bpe-vocab", "10"],
     "argument --bpe-vocab: expected an integer >= 256, got 10"),
    ("train-unknown-option", ["train", "--learning-rate=1"], "unrecognized arguments: --learning-rate"),
    ("train-gpu-without-gpu", ["train", *TINY, "--data", "small.txt", "--device", "gpu"], "device 'gpu' was asked for"),
    ("train-resume-no-runs", ["train", "--resume"], "no run with a checkpoint.npz under 'runs'"),
    ("train-resume-not-a-run", ["train", "--resume", "--out", "emptydir"], "no checkpoint.npz in 'emptydir'"),
    ("train-resume-changes-lr", ["train", "--resume", "--out", "run", "--batch-size", "4", "--lr", "0.1"],
     "--batch-size, --lr cannot change"),
    # train bert
    ("bert-data-2-chars", ["train", "bert", *TINY, "--data", "two.txt"], "has 2 characters, too few"),
    ("bert-block-size", ["train", "bert", *TINY, "--data", "small.txt", "--block-size", "4"],
     "--block-size: expected 8..32 for preset 'tiny', got 4"),
    ("bert-tokenizer", ["train", "bert", *TINY, "--data", "small.txt", "--tokenizer", "bpe"], "WordPiece"),
    ("bert-resume-no-runs", ["train", "bert", "--resume"], "--resume found no runs/bert-* directory"),
    ("bert-resume-not-a-run", ["train", "bert", *TINY, "--resume", "--out", "emptydir"],
     "'emptydir' holds no BERT run to resume"),
    ("bert-gpu-without-gpu", ["train", "bert", *TINY, "--data", "small.txt", "--device", "gpu"],
     "device 'gpu' was asked for"),
    # sample
    ("sample-no-runs", ["sample"], "no run with a checkpoint.npz under 'runs'. Train one first"),
    ("sample-not-a-run", ["sample", "--checkpoint", "emptydir"], "no checkpoint.npz in 'emptydir'"),
    ("sample-truncated", ["sample", "--checkpoint", "truncated"], "is not a readable minillm checkpoint"),
    ("sample-foreign-npz", ["sample", "--checkpoint", "plain.npz"], "is not a readable minillm checkpoint"),
    ("sample-bert-checkpoint", ["sample", "--checkpoint", "bertrun"], "does not hold a GPT"),
    ("sample-empty-prompt", ["sample", "--checkpoint", "run", "--prompt", ""], "got an empty prompt"),
    ("sample-unknown-characters", ["sample", "--checkpoint", "run", "--prompt", "\u65e5\u672c"], "'\u65e5'"),
    ("sample-temperature", ["sample", "--checkpoint", "run", "--temperature", "-1"],
     "argument --temperature: expected a number >= 0"),
    ("sample-top-p", ["sample", "--checkpoint", "run", "--top-p", "2"], "argument --top-p: expected a number in (0, 1]"),
    ("sample-num-samples", ["sample", "--checkpoint", "run", "--num-samples", "0"], "argument --num-samples"),
    ("sample-gpu-without-gpu", ["sample", "--checkpoint", "run", "--device", "gpu"], "device 'gpu' was asked for"),
    # quantize
    ("quantize-not-a-run", ["quantize", "emptydir"], "no checkpoint.npz in 'emptydir'"),
    ("quantize-bert-checkpoint", ["quantize", "bertrun"], "does not hold a GPT"),
    ("quantize-nf4-8-bit", ["quantize", "run", "--scheme", "nf4", "--bits", "8"], "the nf4 scheme is 4-bit"),
    ("quantize-group-size-0", ["quantize", "run", "--group-size", "0"], "argument --group-size: expected an integer >= 1"),
    ("quantize-group-size-not-a-divisor", ["quantize", "run", "--bits", "4", "--group-size", "24", "--compare",
                                           "selected", "--eval-windows", "1"], "group_size: expected a divisor"),
    ("quantize-data-missing", ["quantize", "run", "--data", "missing.txt", "--eval-windows", "1"],
     "data: no such file 'missing.txt'"),
    ("quantize-out-is-a-directory", ["quantize", "run", "--out", "emptydir"], "--out: 'emptydir' is a directory"),
    ("quantize-gpu-without-gpu", ["quantize", "run", "--device", "gpu"], "device 'gpu' was asked for"),
    # embed
    ("embed-no-text", ["embed", "--model", "hf"], "give at least one TEXT"),
    ("embed-no-such-model", ["embed", "hello", "--model", "nowhere"], "expected a Hugging Face model directory"),
    ("embed-gpt-model", ["embed", "hello", "--model", "gpt-hf"], "--model: expected a BERT checkpoint"),
    ("embed-bad-json", ["embed", "hello", "--model", "badjson"], "config.json is not valid JSON"),
    ("embed-max-length-0", ["embed", "hello", "--model", "hf", "--max-length", "0"], "max_length: expected"),
    ("embed-gpu-without-gpu", ["embed", "hello", "--model", "hf", "--device", "gpu"], "device 'gpu' was asked for"),
    # bench, and the command line itself
    ("bench-unknown-target", ["bench", "speed"], "argument TARGET: invalid choice: 'speed'"),
    ("bench-no-target", ["bench"], "expected a TARGET, one of: attention"),
    ("bench-quantization-not-a-run", ["bench", "quantization", "--checkpoint", "emptydir"],
     "no checkpoint.npz in 'emptydir'"),
    ("bench-generate-heads", ["bench", "generate", "--n-layer", "1", "--n-embd", "32", "--n-head", "3",
                              "--skip-reference", "--skip-speculative"], "n_head: expected a divisor of n_embd=32"),
    ("bench-train-gpu-without-gpu", ["bench", "train", "--device", "gpu", "--skip-reference"],
     "device 'gpu' was asked for"),
    ("unknown-command", ["serve"], "argument COMMAND: invalid choice: 'serve'"),
]
NEEDS_NO_GPU = {c[0] for c in CASES if "gpu-without-gpu" in c[0]}


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), MINILLM_DEVICE="cpu", OPENBLAS_NUM_THREADS="1")
    env.pop("MINILLM_DEBUG", None)
    env.update(extra)
    return env


def _run(argv, cwd, **env):
    return subprocess.run([sys.executable, "-m", "minillm", *argv], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A directory with the files the cases name (and no runs/ directory)."""
    d = tmp_path_factory.mktemp("cli-errors")
    (d / "two.txt").write_text("ab")
    (d / "empty.txt").write_text("")
    (d / "small.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 40)
    (d / "emptydir").mkdir()
    text = "".join(f"line {i}: to be or not to be\n" for i in range(60))
    tok = CharTokenizer.from_text(text)          # no unk: a character it never saw is an error
    cfg = gpt.GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    params = gpt.init_params(cfg, seed=0, device="cpu")
    train.save_checkpoint(d / "run", params, step=1, model_config=dataclasses.asdict(cfg), tokenizer=tok,
                          config=train.TrainConfig(max_steps=1, out_dir=str(d / "run")))
    data.write_tokens(tok.encode(text), d / "run" / "val.npy", vocab_size=tok.vocab_size)  # quantize reads it
    (d / "truncated").mkdir()
    (d / "truncated" / "checkpoint.npz").write_bytes((d / "run" / "checkpoint.npz").read_bytes()[:500])
    np.savez(d / "plain.npz", w=np.zeros(3))
    bcfg = bert.BertConfig(vocab_size=tok.vocab_size, hidden_size=8, num_layers=1, num_heads=2,
                           intermediate_size=8, max_position=8)
    bparams = bert.init_params(bcfg, seed=0, device="cpu", heads=())
    train.save_checkpoint(d / "bertrun", bparams, model_config=dataclasses.asdict(bcfg), tokenizer=tok)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]
    hcfg = dataclasses.replace(bcfg, vocab_size=len(vocab))
    checkpoint.save_hf(d / "hf", hcfg, bert.init_params(hcfg, seed=0, device="cpu", heads=()))
    (d / "hf" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    checkpoint.save_hf(d / "gpt-hf", cfg, params)
    (d / "badjson").mkdir()
    (d / "badjson" / "config.json").write_text("{")
    return d


def _run_many(cases, cwd):
    """[CompletedProcess-like dict] of [(argv, extra env)], through tests/cli_runner.py."""
    with tempfile.TemporaryDirectory() as d:
        spec, out = Path(d) / "cases.json", Path(d) / "results.json"
        spec.write_text(json.dumps([{"argv": argv, "cwd": str(cwd), "env": env} for argv, env in cases]))
        r = subprocess.run([sys.executable, str(ROOT / "tests" / "cli_runner.py"), str(spec), str(out)],
                           env=_env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        return json.loads(out.read_text())


DEBUG_CASES = {"debug-before": (["--debug", "sample"], {}), "debug-after": (["sample", "--debug"], {}),
               "debug-env": (["sample"], {"MINILLM_DEBUG": "1"}), "debug-env-off": (["sample"], {"MINILLM_DEBUG": "0"})}


@pytest.fixture(scope="module")
def results(world):
    """Every case's {"returncode", "stdout", "stderr"}, by id: CASES and DEBUG_CASES, in one runner."""
    cases = {cid: (argv, {}) for cid, argv, _ in CASES if not (HAS_GPU and cid in NEEDS_NO_GPU)}
    cases.update(DEBUG_CASES)
    return dict(zip(cases, _run_many(list(cases.values()), world)))


def _command_of(argv):
    words = ["minillm", argv[0]]
    if argv[:2] in (["train", "bert"], ["bench", "quantization"], ["bench", "generate"], ["bench", "train"]):
        words.append(argv[1])
    return " ".join(words)


@pytest.mark.parametrize("cid, argv, words", CASES, ids=[c[0] for c in CASES])
def test_a_mistake_is_one_line_on_stderr_and_status_2(results, cid, argv, words):
    if cid in NEEDS_NO_GPU and HAS_GPU:
        pytest.skip("a GPU is usable here, so --device gpu is no mistake")
    r = results[cid]
    assert r["returncode"] == 2, (r["returncode"], r["stderr"][-2000:])
    assert "Traceback" not in r["stderr"] and "Traceback" not in r["stdout"], r["stderr"]
    lines = r["stderr"].splitlines()
    assert len(lines) == 1, r["stderr"]
    prefix = "minillm" if cid == "unknown-command" else _command_of(argv)
    assert lines[0].startswith(f"{prefix}: error: "), lines[0]
    assert words in lines[0], lines[0]


# A fresh interpreter for the commands whose modules import others (train: train_bert, sample,
# quantize; bench: its targets) and for the two that start from their own.
FRESH = ["train-data-2-chars", "sample-no-runs", "embed-no-such-model", "bench-quantization-not-a-run"]


@pytest.mark.parametrize("cid", FRESH)
def test_a_fresh_python_m_minillm_answers_the_same(world, results, cid):
    argv = next(argv for c, argv, _ in CASES if c == cid)
    r = _run(argv, world)
    assert (r.returncode, r.stderr, r.stdout) == (results[cid]["returncode"], results[cid]["stderr"],
                                                   results[cid]["stdout"])


@pytest.mark.parametrize("cid", ["debug-before", "debug-after", "debug-env"])
def test_debug_shows_the_traceback_before_the_line(results, cid):
    r = results[cid]
    assert r["returncode"] == 2
    assert r["stderr"].startswith("Traceback (most recent call last):"), r["stderr"]
    assert "FileNotFoundError" in r["stderr"]
    assert r["stderr"].splitlines()[-1].startswith("minillm sample: error: root: no run with a checkpoint.npz")


def test_debug_off_in_the_environment_is_off(results):
    r = results["debug-env-off"]
    assert r["returncode"] == 2 and "Traceback" not in r["stderr"] and len(r["stderr"].splitlines()) == 1


def test_a_bug_keeps_its_traceback_and_status_1(world):
    # A command whose code fails on a line that is not a `raise` (NumPy refusing to broadcast):
    # not the user's mistake, so Python's own report, status 1.
    code = ("import sys, numpy as np; import minillm.cli.sample as s; "
            "s.run = lambda args: np.ones(2) + np.ones(3); "
            "from minillm.__main__ import main; sys.exit(main(['sample']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=world, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    assert "Traceback (most recent call last):" in r.stderr
    assert "operands could not be broadcast" in r.stderr and ": error:" not in r.stderr


# --- which exceptions count as the user's mistake (in-process, no subprocess) -------------

def _caught(fn):
    try:
        fn()
    except Exception as e:   # noqa: BLE001 - the point is to look at whatever it was
        return e
    raise AssertionError("expected an exception")


def test_only_exceptions_minillm_raises_on_purpose_are_mistakes():
    on_purpose = [_caught(lambda: data.load_text("/no/such/file.txt")),               # FileNotFoundError
                  _caught(lambda: gpt.GPTConfig(vocab_size=4, block_size=4, n_layer=1, n_head=3, n_embd=8)),
                  _caught(lambda: train.TrainConfig(max_steps=0)),
                  _caught(lambda: data.split_documents([("t", "ab")], 0.1)),
                  _caught(lambda: backend.xp_for("tpu")),
                  UsageError("--x: wrong")]
    for e in on_purpose:
        assert is_user_error(e), repr(e)
    bugs = [_caught(lambda: np.ones(2) + np.ones(3)),        # ValueError from NumPy's C code
            _caught(lambda: np.random.default_rng(-1)),     # ValueError raised inside NumPy
            _caught(lambda: {}["missing"]),                 # KeyError
            _caught(lambda: 1 // 0),                        # ZeroDivisionError (an ArithmeticError)
            _caught(lambda: int("x")),                      # ValueError, but not minillm's
            _caught(lambda: data.join_documents(5))]        # TypeError in minillm, on a line that is no raise
    for e in bugs:
        assert not is_user_error(e), repr(e)


def test_an_os_error_is_a_mistake_said_as_path_and_reason(tmp_path):
    e = _caught(lambda: open(tmp_path / "no" / "such.txt"))
    assert is_user_error(e)
    assert one_line(e) == f"{tmp_path / 'no' / 'such.txt'}: No such file or directory"
    assert one_line(ValueError("two\nlines")) == "two lines"


def test_main_lets_a_bug_propagate_and_reports_a_mistake(monkeypatch, tmp_path, capsys):
    import minillm.cli.sample as sample
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sample, "run", lambda args: {}["missing"])
    with pytest.raises(KeyError):
        main(["sample"])
    monkeypatch.setattr(sample, "run", lambda args: train.TrainConfig(lr=-1.0))
    assert main(["sample"]) == 2
    assert capsys.readouterr().err == "minillm sample: error: lr: expected a finite number >= 0, got -1.0\n"


def test_option_types_name_the_bound_and_refuse_what_is_not_finite():
    from argparse import ArgumentTypeError
    from minillm.cli import common
    assert common.positive_int("3") == 3 and common.count("0") == 0 and common.seed("0") == 0
    assert common.fraction("0.5") == 0.5 and common.number_in(0.0, 1.0, lo_open=True)("1") == 1.0
    assert common.nonnegative_number("0") == 0.0
    for parse, bad, says in [(common.positive_int, "0", ">= 1, got 0"), (common.positive_int, "1.5", "an integer"),
                             (common.seed, "-1", ">= 0"), (common.nonnegative_number, "-0.1", ">= 0"),
                             (common.nonnegative_number, "nan", ">= 0, got nan"),
                             (common.nonnegative_number, "inf", "got inf"), (common.positive_number, "0", "> 0"),
                             (common.fraction, "1", "in (0, 1)"), (common.fraction, "0", "in (0, 1)"),
                             (common.number_in(0.0, 1.0, lo_open=True), "1.01", "in (0, 1]")]:
        with pytest.raises(ArgumentTypeError, match=re.escape(says)):
            parse(bad)
