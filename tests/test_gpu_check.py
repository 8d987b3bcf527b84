"""scripts/gpu_check.py: the check a lent GPU runs first must work the first time.

GPU minutes are scarce, so what can be proven on the CPU is proven here: every minillm
command the GPU steps run parses (their options exist, their values are accepted), and
the script records a passing, a failing and a timed-out step as such, with the logs.
"""

import importlib.util
import shlex
import sys
from pathlib import Path

import pytest

from minillm.__main__ import build_parser

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _minillm_argv(cmd):
    words = shlex.split(cmd.replace("{out}", "/tmp/x"))
    return words[words.index("minillm") + 1:] if "minillm" in words else None


@pytest.mark.parametrize("variant", [1, 2], ids=["gpu", "cpu"])
def test_every_minillm_command_of_the_check_parses(variant):
    mod = _load()
    commands = [_minillm_argv(step[variant]) for step in mod.STEPS.values()]
    commands = [c for c in commands if c]
    assert len(commands) >= 2                       # bench train and bench train-run at least
    for argv in commands:
        args = build_parser(argv[0]).parse_args(argv)
        assert args.command == argv[0]
        if variant == 1:
            assert "gpu" in argv                    # the GPU variant runs on the GPU
            assert getattr(args, "device", None) == "gpu"


def test_passing_failing_and_timed_out_steps_are_recorded(tmp_path, monkeypatch):
    mod = _load()
    monkeypatch.setattr(mod, "STEPS", {
        "good": (20, "", f"{sys.executable} -c 'print(41 + 1)'"),
        "bad": (20, "", f"{sys.executable} -c 'import sys; sys.exit(3)'"),
        "slow": (1, "", f"{sys.executable} -c 'import time; time.sleep(30)'"),
    })
    assert mod.main(["--cpu", "--out", str(tmp_path)]) == 1          # not all ok
    report = (tmp_path / "gpu-check.md").read_text()
    assert "| good | ok |" in report and "| bad | exit 3 |" in report
    assert "| slow | timed out after 1 s |" in report
    assert (tmp_path / "good.log").read_text().strip() == "42"
    assert mod.main(["--cpu", "--only", "good", "--out", str(tmp_path)]) == 0


def test_an_unknown_step_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _load().main(["--only", "pytest,nope", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "--only: unknown steps ['nope']" in capsys.readouterr().err
