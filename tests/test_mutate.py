"""tools/mutate.py: the mutants it claims, a planted bug a test catches, an untouched source tree."""
import hashlib
import os
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import mutate  # noqa: E402

SOURCE = textwrap.dedent('''
    def target(x, w, n):
        """docstring: 1 + 2 is not mutated"""
        if n < 2:
            raise ValueError(f"n must be >= 2, got {n + 0}")
        y = x @ w.T + 0.5 * x.sum(axis=-1, keepdims=True)
        y -= 1
        for i in range(1, n):
            y = y[i:n]
        return y * 2

    def other(a, b):
        return a + b
''')


def _mutants():
    return mutate.enumerate_mutants(SOURCE, "m.py", ["target"])


def test_enumerates_each_kind_it_claims_inside_the_target_only():
    found = {(m.kind, m.before, m.after) for m in _mutants()}
    expected = {
        ("binop", "x @ w.T + 0.5 * x.sum(axis=-1, keepdims=True)", "(x @ w.T - 0.5 * x.sum(axis=-1, keepdims=True))"),
        ("binop", "0.5 * x.sum(axis=-1, keepdims=True)", "(0.5 / x.sum(axis=-1, keepdims=True))"),
        ("binop", "y -= 1", "y += 1"),
        ("binop", "y * 2", "(y / 2)"),
        ("drop", "x @ w.T + 0.5 * x.sum(axis=-1, keepdims=True)", "(x @ w.T)"),
        ("drop", "x @ w.T + 0.5 * x.sum(axis=-1, keepdims=True)", "(0.5 * x.sum(axis=-1, keepdims=True))"),
        ("compare", "n < 2", "(n <= 2)"),
        ("constant", "2", "1"),        # n < 2 and y * 2
        ("constant", "0.5", "1.0"),
        ("constant", "True", "False"),
        ("axis", "-1", "-2"),
        ("axis", "x.sum(axis=-1, keepdims=True)", "(x.sum(axis=-1))"),
        ("transpose", "w.T", "w"),
        ("offbyone", "i", "(i + 1)"),
        ("offbyone", "n", "(n - 1)"),
        ("offbyone", "range(1, n)", "(range(1 + 1, n))"),
        ("offbyone", "range(1, n)", "(range(1, n - 1))"),
        ("negate", "y * 2", "(-(y * 2))"),
    }
    assert expected <= found, expected - found
    assert all(m.function == "target" for m in _mutants())
    # the docstring, the raise and its message, and the untargeted function are left alone
    assert not any(m.line in (3, 5) or "a + b" in m.before for m in _mutants())


def test_every_mutant_compiles_and_changes_exactly_its_span():
    for m in _mutants():
        text = mutate.apply_mutant(SOURCE, m)
        data, new = SOURCE.encode(), text.encode()
        assert new[:m.start] == data[:m.start] and new[m.start + len(m.after.encode()):] == data[m.end:]
        assert text != SOURCE


def test_selection_is_deterministic_and_capped():
    ms = _mutants()
    a = mutate.select(ms, 0, "m.py", 5)
    assert [(m.start, m.after) for m in a] == [(m.start, m.after) for m in mutate.select(ms, 0, "m.py", 5)]
    assert len(a) == 5 and len(mutate.select(ms, 0, "m.py", None)) == len(ms)


def _tiny_project(tmp_path):
    """A package with one function and a test that checks it, and one behaviour no test checks."""
    (tmp_path / "minillm").mkdir(parents=True)
    (tmp_path / "minillm" / "__init__.py").write_text("")
    (tmp_path / "minillm" / "tiny.py").write_text(textwrap.dedent('''
        def add(a, b):
            return a + b

        def untested(a):
            return a * 3
    '''))
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_tiny.py").write_text(textwrap.dedent('''
        import os
        import minillm
        from minillm import tiny

        def test_runs_the_sandbox_copy():
            assert os.path.dirname(minillm.__file__).startswith(os.getcwd())

        def test_add():
            assert tiny.add(2, 5) == 7
    '''))
    return tmp_path


def _digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                h.update(path.encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def test_a_planted_bug_is_killed_an_unchecked_one_survives_and_the_source_is_untouched(tmp_path):
    project = _tiny_project(tmp_path / "project")
    before = _digest(project)
    source = (project / "minillm" / "tiny.py").read_text()
    ms = mutate.enumerate_mutants(source, "tiny.py", ["add", "untested"])
    plus = next(m for m in ms if m.kind == "binop" and m.function == "add")
    times = next(m for m in ms if m.kind == "binop" and m.function == "untested")
    sandbox = mutate.make_sandbox(root=str(project))
    try:
        results = mutate.mutate_file(sandbox, "tiny.py", [plus, times], ["tests/test_tiny.py"], None, 60,
                                     log=lambda s: None)
        assert [outcome for _, outcome, _ in results] == ["killed", "survived"]
        with open(os.path.join(sandbox, "minillm", "tiny.py")) as f:
            assert f.read() == source               # the sandbox copy is restored after each file
    finally:
        import shutil
        shutil.rmtree(sandbox)
    assert _digest(project) == before               # the project itself was never written


def test_listing_the_real_targets_writes_nothing(capsys):
    before = _digest(os.path.join(ROOT, "minillm"))
    assert mutate.main(["--list", "--files", "optim.py", "norm.py", "--max-per-file", "3"]) == 0
    out = capsys.readouterr().out
    assert "optim.py:" in out and "norm.py:" in out
    assert _digest(os.path.join(ROOT, "minillm")) == before


def test_every_target_function_exists():
    for file, (functions, tests, _) in mutate.TARGETS.items():
        with open(os.path.join(ROOT, "minillm", file)) as f:
            tree = mutate.ast.parse(f.read())
        assert sorted(q for q, _ in mutate._target_functions(tree, set(functions))) == sorted(functions), file
        assert all(os.path.exists(os.path.join(ROOT, t)) for t in tests)
