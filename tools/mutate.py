"""Mutation testing for minillm: plant one small bug at a time and see whether the tests notice.

A mutant is the source file with ONE small change of the kind a hand-written backward
pass or optimizer update really gets wrong:

    binop     a + b <-> a - b,  a * b <-> a / b        (also in +=, -=, *=, /=)
    compare   <  <-> <=,  >  <-> >=,  == <-> !=,  is <-> is not
    constant  0 -> 1, 1 -> 0, 2 -> 1, 0.5 -> 1.0, other ints n -> n + 1, True <-> False
    drop      a + b -> a,  a + b -> b,  a - b -> a     (a term of a sum left out)
    axis      axis=k -> another axis (-1 <-> -2, 0 <-> 1, ...);  keepdims=... removed
    transpose x.T -> x,  x.swapaxes(i, j) -> x
    negate    return e -> return -(e)
    offbyone  a[i:j] -> a[i + 1:j] / a[i:j - 1],  range(a, b) -> range(a + 1, b) / range(a, b - 1)

Only the functions named in TARGETS are mutated (backward passes, optimizer updates,
sampling processors, the BPE merge/encode path, quantize/dequantize). The source tree is
never edited: the package and its tests are copied into a temporary directory once, each
mutant is written into that copy's module file (restored afterwards), and the mapped test
files run there with ``pytest -x -q`` under a per-mutant timeout, without bytecode caches
(a same-size mutant written in the same second would otherwise reuse a stale .pyc). Hypothesis
draws the same examples as under the profile in use, but a failing example is not shrunk
(a profile appended to the sandbox's conftest.py). Each
run is a forked child of a process that imported numpy, hypothesis, pytest and torch once
(but never minillm), which saves seconds of imports per mutant on a loaded machine;
``--no-fork`` starts a fresh ``python -m pytest`` instead. A mutant is *killed* when the tests fail, *survived* when they pass,
*timeout* when they run past the limit (counted as killed: the bug was noticed).

Selection is deterministic: every candidate mutant of a file is enumerated in source
order, shuffled with ``random.Random(f"{seed}:{file}")`` and the first ``--max-per-file``
are run, so the same command on the same source picks the same mutants.

    python tools/mutate.py --max-per-file 15 --out /tmp/mutation.md
    python tools/mutate.py --files optim.py norm.py --max-per-file 15   # a re-run of two files
    python tools/mutate.py --list --files ffn.py                        # the mutants, not run
"""
import argparse
import ast
import copy
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# file -> (functions to mutate, test files, pytest -k expression or None).
# A name "Class.method" picks a method; a plain name picks a top-level function.
TARGETS = {
    "ffn.py": (["linear_backward", "relu_backward", "gelu_backward_plain", "gelu_backward",
                "_gelu_backward_tanh_fast", "_gelu_backward_exact_fast", "silu_backward",
                "mlp_backward", "swiglu_backward"],
               ["tests/test_ffn.py"], None),
    "norm.py": (["layernorm_backward", "rmsnorm_backward", "_sum_leading"],
                ["tests/test_norm.py"], None),
    "attention.py": (["sdpa_backward", "self_attention_backward", "_attend_backward", "rope_backward",
                      "_rotate", "cross_attention_backward", "flash_attention_backward",
                      "_flash_backward_rows", "_join_heads"],
                     ["tests/test_attention.py"], None),
    "embeddings.py": (["_embedding_backward", "embedding_backward", "segment_embedding_backward",
                       "position_ids", "sinusoidal_positions"],
                      ["tests/test_embeddings.py"], None),
    "gpt.py": (["backward", "_embed_backward", "_norm_backward", "_mlp_backward", "_block_backward",
                "_loss_and_grads_in_shards"],
               ["tests/test_gpt.py", "tests/test_threads.py"], "grad or backward or shards"),
    "backend.py": (["batch_shards", "shard_bounds", "run_in_shards", "blas_threads_held"], ["tests/test_threads.py"], None),
    "bert.py": (["backward", "_block_backward", "_full_grads", "_add", "pooler_backward",
                 "mlm_head_backward"],
                ["tests/test_bert.py"], "gradients"),
    "optim.py": (["SGD._update", "Adam._update", "Optimizer.step", "global_norm", "clip_grad_norm",
                  "lr_schedule", "accumulate"],
                 ["tests/test_optim.py"], None),
    "sampling.py": (["apply_temperature", "top_k_filter", "top_p_filter", "min_p_filter", "token_counts",
                     "repetition_penalty", "frequency_penalty", "presence_penalty", "_process",
                     "_repetition_from_counts", "_removed", "_softmax", "_inverse_cdf"],
                    ["tests/test_sampling.py"],
                    "top or min_p or temperature or processor or penalties or sample or distribution"),
    "tokenizer.py": (["get_pair_counts", "merge_pair", "BPETokenizer._bpe_parts",
                      "BPETokenizer._bpe_parts_long", "BPETokenizer._encode_chunk",
                      "BPETokenizer._encode_ordinary", "BPETokenizer._encode_at_once", "BPETokenizer._encode_distinct",
                      "_learn_merges",
                      "_linked_chunks", "_pairs_in_place", "_learn_merges_at_once", "_pop_most_frequent",
                      "_count_chunks_at_once", "_distinct_chunks",
                      "_runs_index"],
                     ["tests/test_tokenizer.py"], None),
    "pretokenize.py": (["gpt2_chunk_starts", "gpt4_chunk_starts", "_contractions"], ["tests/test_tokenizer.py"],
                       "chunk_starts or count_chunks or long_text"),
    "quantization.py": (["float32_to_bf16_bits", "bf16_bits_to_float32", "float32_to_fp16_bits",
                         "_round_shift", "fp16_bits_to_float32", "pack_int4", "unpack_int4",
                         "_quantize_symmetric", "_quantize_asymmetric", "_quantize_nf4",
                         "QuantizedTensor.dequantize", "dequantize", "fake_quant_forward",
                         "fake_quant_backward", "absmax_scale"],
                        ["tests/test_quantization.py"], None),
}


@dataclass
class Mutant:
    file: str        # path relative to the package, e.g. "ffn.py"
    function: str    # qualified name of the enclosing target function
    line: int        # 1-based line of the changed node in the original source
    kind: str
    before: str      # the original source text of the changed node
    after: str       # what replaces it
    start: int       # byte offsets of the replaced span in the original source
    end: int
    col: int = 0     # 0-based column of the changed node: two `1`s on one line differ here

    def describe(self):
        return f"{self.kind} at col {self.col}: `{self.before}` -> `{self.after}`"


# ---------------------------------------------------------------- enumerating mutants

_SWAP_BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}
_SWAP_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
             ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_AXIS_SWAP = {-1: -2, -2: -1, 0: 1, 1: 0, 2: 1, 3: 2}


def _const_replacements(value):
    """The constants a numeric literal is mutated to."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return {0: [1], 1: [0], 2: [1]}.get(value, [value + 1])
    if isinstance(value, float):
        if value == 0.5:
            return [1.0]
        if value == 0.0:
            return [1.0]
        if value == 1.0:
            return [0.0]
        if value == 2.0:
            return [1.0]
        return [value * 2.0]
    return []


def _is_docstring_or_message(node, parents):
    """Constants inside raise statements and f-strings are messages, not math."""
    return any(isinstance(p, (ast.Raise, ast.JoinedStr)) for p in parents)


class _Collector(ast.NodeVisitor):
    """Walks one target function and records (node, replacement-node, kind) candidates."""

    def __init__(self):
        self.found = []       # (original node, replacement node or text, kind)
        self.parents = []

    def generic_visit(self, node):
        self.parents.append(node)
        super().generic_visit(node)
        self.parents.pop()

    def add(self, node, new, kind):
        self.found.append((node, new, kind))

    def visit_BinOp(self, node):
        swap = _SWAP_BINOP.get(type(node.op))
        if swap is not None:
            self.add(node, ast.BinOp(node.left, swap(), node.right), "binop")
        if isinstance(node.op, ast.Add):
            self.add(node, node.left, "drop")
            self.add(node, node.right, "drop")
        elif isinstance(node.op, ast.Sub):
            self.add(node, node.left, "drop")
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        swap = _SWAP_BINOP.get(type(node.op))
        if swap is not None:
            self.add(node, ast.AugAssign(node.target, swap(), node.value), "binop")
        self.generic_visit(node)

    def visit_Compare(self, node):
        for i, op in enumerate(node.ops):
            swap = _SWAP_CMP.get(type(op))
            if swap is not None:
                ops = list(node.ops)
                ops[i] = swap()
                self.add(node, ast.Compare(node.left, ops, node.comparators), "compare")
        self.generic_visit(node)

    def visit_Constant(self, node):
        if isinstance(node.value, (bool, int, float)) and not _is_docstring_or_message(node, self.parents):
            parent = self.parents[-1] if self.parents else None
            if not (isinstance(parent, ast.keyword) and parent.arg == "axis"):  # axis handled below
                for v in _const_replacements(node.value):
                    self.add(node, ast.Constant(v), "constant")
        self.generic_visit(node)

    def visit_Call(self, node):
        for i, kw in enumerate(node.keywords):
            if kw.arg == "axis":
                axis = _int_value(kw.value)
                if axis is not None and axis in _AXIS_SWAP:
                    self.add(kw.value, ast.Constant(_AXIS_SWAP[axis]), "axis")
            if kw.arg == "keepdims":
                others = node.keywords[:i] + node.keywords[i + 1:]
                self.add(node, ast.Call(node.func, node.args, others), "axis")
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "swapaxes" and not node.keywords:
            self.add(node, func.value, "transpose")
        if isinstance(func, ast.Name) and func.id == "range" and node.args and not node.keywords:
            if len(node.args) >= 2:
                args = [_plus(node.args[0], 1)] + node.args[1:]
                self.add(node, ast.Call(func, args, []), "offbyone")
            stop = 1 if len(node.args) >= 2 else 0
            args = list(node.args)
            args[stop] = _plus(args[stop], -1)
            self.add(node, ast.Call(func, args, []), "offbyone")
        self.generic_visit(node)

    def visit_Attribute(self, node):
        if node.attr == "T" and isinstance(node.ctx, ast.Load):
            self.add(node, node.value, "transpose")
        self.generic_visit(node)

    def visit_Return(self, node):
        v = node.value
        # a tuple, dict or comprehension cannot be negated: that mutant would only prove Python raises
        containers = (ast.Tuple, ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp,
                      ast.GeneratorExp, ast.Constant, ast.JoinedStr, ast.Compare, ast.BoolOp)
        if v is not None and not isinstance(v, containers):
            self.add(v, ast.UnaryOp(ast.USub(), v), "negate")
        self.generic_visit(node)

    def visit_Slice(self, node):
        if node.lower is not None:
            self.add(node.lower, _plus(node.lower, 1), "offbyone")
        if node.upper is not None:
            self.add(node.upper, _plus(node.upper, -1), "offbyone")
        self.generic_visit(node)

    def visit_FunctionDef(self, node):
        # decorators and defaults are not the function's math; its body is
        self.parents.append(node)
        for stmt in node.body:
            if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)):  # docstring
                self.visit(stmt)
        self.parents.pop()

    def visit_Raise(self, node):
        return  # error paths are checked by the bad-input tests, not the math

    def visit_Assert(self, node):
        return


def _int_value(node):
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant) \
            and type(node.operand.value) is int:
        return -node.operand.value
    return None


def _plus(node, k):
    op = ast.Add() if k > 0 else ast.Sub()
    return ast.BinOp(node, op, ast.Constant(abs(k)))


def _target_functions(tree, names):
    """(qualified name, FunctionDef) for each name in `names` found at module or class level."""
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names:
            out.append((node.name, node))
        if isinstance(node, ast.ClassDef):
            for sub in node.body:
                q = f"{node.name}.{sub.name}" if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
                if q in names:
                    out.append((q, sub))
    return out


def _line_offsets(source_bytes):
    offsets = [0]
    for i, b in enumerate(source_bytes):
        if b == 0x0A:
            offsets.append(i + 1)
    return offsets


def _render(new):
    """Source text for a replacement node, parenthesized so it is safe in any expression slot."""
    text = ast.unparse(new)
    return text if isinstance(new, (ast.stmt, ast.Constant, ast.Name)) else f"({text})"


def enumerate_mutants(source, file, functions):
    """Every mutant of `source` inside `functions`, in source order, deduplicated."""
    tree = ast.parse(source)
    data = source.encode("utf-8")
    lines = _line_offsets(data)
    seen = set()
    mutants = []
    for qname, fn in _target_functions(tree, set(functions)):
        col = _Collector()
        col.visit(fn)
        for node, new, kind in col.found:
            start = lines[node.lineno - 1] + node.col_offset
            end = lines[node.end_lineno - 1] + node.end_col_offset
            before = data[start:end].decode("utf-8")
            after = _render(copy.deepcopy(new))
            if isinstance(node, ast.stmt) and "\n" in before:
                continue  # a multi-line statement rewritten on one line would lose its layout
            key = (start, end, after)
            if key in seen or after.strip("()") == before.strip("()"):
                continue
            seen.add(key)
            mutants.append(Mutant(file, qname, node.lineno, kind, " ".join(before.split()), after, start, end,
                                  node.col_offset))
    mutants.sort(key=lambda m: (m.start, m.end, m.kind, m.after))
    return mutants


def apply_mutant(source, m: Mutant):
    """The mutated source text; raises SyntaxError if the mutant does not compile."""
    data = source.encode("utf-8")
    new = data[:m.start] + m.after.encode("utf-8") + data[m.end:]
    text = new.decode("utf-8")
    compile(text, m.file, "exec")
    return text


def select(mutants, seed, file, cap):
    chosen = list(mutants)
    random.Random(f"{seed}:{file}").shuffle(chosen)
    if cap is not None:
        chosen = chosen[:cap]
    return sorted(chosen, key=lambda m: (m.start, m.after))


# ---------------------------------------------------------------- running them

def make_sandbox(root=ROOT):
    """A temporary copy of the package, its tests and the pytest configuration."""
    tmp = tempfile.mkdtemp(prefix="minillm-mutate-")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache")
    shutil.copytree(os.path.join(root, "minillm"), os.path.join(tmp, "minillm"), ignore=ignore)
    shutil.copytree(os.path.join(root, "tests"), os.path.join(tmp, "tests"), ignore=ignore)
    for name in ("pyproject.toml", "setup.cfg", "pytest.ini"):
        if os.path.exists(os.path.join(root, name)):
            shutil.copy(os.path.join(root, name), tmp)
    conftest = os.path.join(tmp, "tests", "conftest.py")
    if os.path.exists(conftest):
        with open(conftest, "a", encoding="utf-8") as f:
            f.write(_NO_SHRINK)
    return tmp


# Appended to the sandbox's conftest.py (never the project's): the same examples as the
# profile in use, but a failing example is not shrunk (a kill needs one failure, not the
# minimal one: shrinking a failed gradient check costs minutes), and no example database,
# so a failure found for one mutant is not replayed against the next.
_NO_SHRINK = """

# --- added by tools/mutate.py in its sandbox copy ---
import hypothesis as _mutate_h
_mutate_h.settings.register_profile(
    "_mutate", parent=_mutate_h.settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci")),
    phases=[_mutate_h.Phase.explicit, _mutate_h.Phase.generate], database=None)
_mutate_h.settings.load_profile("_mutate")
"""


def _pytest_args(tests, k):
    args = ["-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests]
    return args + ["-k", k] if k else args


def _sandbox_env(sandbox):
    return dict(os.environ, PYTHONPATH=sandbox, PYTHONDONTWRITEBYTECODE="1", OPENBLAS_NUM_THREADS="1",
                OMP_NUM_THREADS="1")


def preload():
    """Import the heavy libraries the tests use once, so each forked run does not pay for them.

    Nothing of minillm is imported here: each mutant must import its own copy.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import hypothesis  # noqa: F401
    import numpy  # noqa: F401
    import pytest  # noqa: F401
    try:
        import torch  # noqa: F401
    except ImportError:
        pass


def _forget_project_modules():
    """Drop minillm and the tests' helper modules a parent process may hold, so the child imports
    the sandbox's copies."""
    for name in list(sys.modules):
        mod = sys.modules[name]
        path = getattr(mod, "__file__", None) or ""
        if name == "minillm" or name.startswith("minillm.") or name in ("conftest", "helpers", "strategies") \
                or name.startswith("test_") or path.startswith(ROOT + os.sep + "tests"):
            del sys.modules[name]


def _run_forked(sandbox, args, timeout):
    """pytest.main(args) in a forked child of this (preloaded) process; its exit status or None on timeout."""
    pid = os.fork()
    if pid == 0:  # child: never returns
        rc = 3
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.chdir(sandbox)
            os.environ.clear()
            os.environ.update(_sandbox_env(sandbox))
            sys.dont_write_bytecode = True
            _forget_project_modules()
            sys.path.insert(0, sandbox)
            import pytest
            rc = int(pytest.main(args))
        finally:
            os._exit(rc)
    deadline = time.perf_counter() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.perf_counter() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.1)


def _run_subprocess(sandbox, args, timeout):
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=sandbox, env=_sandbox_env(sandbox),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return proc.returncode


def run_tests(sandbox, tests, k=None, timeout=120.0, fork=None):
    """('passed' | 'failed' | 'timeout', seconds) for the test files run inside the sandbox.

    fork: run pytest in a forked child of this process (fast once preload() ran) rather than
    in a fresh interpreter; default: fork where the platform has it.
    """
    fork = hasattr(os, "fork") if fork is None else fork
    t0 = time.perf_counter()
    rc = (_run_forked if fork else _run_subprocess)(sandbox, _pytest_args(tests, k), timeout)
    secs = time.perf_counter() - t0
    if rc is None:
        return "timeout", secs
    # any non-zero status (failures, a collection error, a crash) is the mutant's doing:
    # the unmutated run passed in the same sandbox
    return ("passed" if rc == 0 else "failed"), secs


def mutate_file(sandbox, file, mutants, tests, k, timeout, fork=None, log=print):
    """Runs each mutant of one file; returns [(mutant, outcome, seconds)]."""
    path = os.path.join(sandbox, "minillm", file)
    with open(path, encoding="utf-8") as f:
        original = f.read()
    results = []
    try:
        for i, m in enumerate(mutants):
            try:
                text = apply_mutant(original, m)
            except SyntaxError:
                results.append((m, "invalid", 0.0))
                continue
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            status, secs = run_tests(sandbox, tests, k, timeout, fork)
            outcome = {"passed": "survived", "failed": "killed", "timeout": "timeout"}[status]
            results.append((m, outcome, secs))
            log(f"  [{i + 1}/{len(mutants)}] {outcome:8s} {secs:5.1f}s {file}:{m.line} {m.describe()}")
    finally:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original)
    return results


def report(results_by_file, seconds, command):
    """Markdown: a per-file table and the survivors."""
    out = ["| file | mutants | killed | timeout | survived | kill rate |", "|---|---:|---:|---:|---:|---:|"]
    tot = [0, 0, 0, 0]
    survivors = []
    for file, results in results_by_file.items():
        ran = [r for r in results if r[1] != "invalid"]
        killed = sum(r[1] == "killed" for r in ran)
        timeout = sum(r[1] == "timeout" for r in ran)
        surv = [r[0] for r in ran if r[1] == "survived"]
        survivors += surv
        n = len(ran)
        rate = f"{100.0 * (killed + timeout) / n:.0f}%" if n else "-"
        out.append(f"| {file} | {n} | {killed} | {timeout} | {len(surv)} | {rate} |")
        tot = [tot[0] + n, tot[1] + killed, tot[2] + timeout, tot[3] + len(surv)]
    rate = f"{100.0 * (tot[1] + tot[2]) / tot[0]:.0f}%" if tot[0] else "-"
    out.append(f"| **all** | {tot[0]} | {tot[1]} | {tot[2]} | {tot[3]} | {rate} |")
    out.append("")
    out.append(f"Survivors ({len(survivors)}):" if survivors else "No survivors.")
    for m in survivors:
        out.append(f"- `minillm/{m.file}:{m.line}` ({m.function}) {m.describe()}")
    out.append("")
    out.append(f"Command: `{command}`; {seconds / 60:.1f} min.")
    return "\n".join(out)


def _parse_args(argv):
    p = argparse.ArgumentParser(description="Mutation testing: plant one bug at a time in minillm's "
                                            "backward passes, optimizers, samplers, tokenizer and "
                                            "quantizers, and count how many the tests kill.")
    p.add_argument("--files", nargs="+", default=list(TARGETS), choices=list(TARGETS),
                   help="package files to mutate (default: all targets)")
    p.add_argument("--max-per-file", type=int, default=15,
                   help="run at most this many mutants per file, chosen by --seed (default 15)")
    p.add_argument("--seed", type=int, default=0, help="seed of the deterministic selection (default 0)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per mutant, at least twice the unmutated run (default: 3x the unmutated run, at least 60)")
    p.add_argument("--out", default=None, help="also write the markdown report to this file")
    p.add_argument("--only", nargs="+", default=None, metavar="FILE:LINE",
                   help="of the selected mutants, run only those on these lines (e.g. the survivors "
                        "of an earlier run, after new tests: a killed mutant stays killed when tests are only added)")
    p.add_argument("--no-fork", action="store_true",
                   help="start a fresh interpreter per mutant instead of forking a preloaded one (slower)")
    p.add_argument("--list", action="store_true", help="list the selected mutants and exit, running nothing")
    return p.parse_args(argv)


def main(argv=None):
    args = _parse_args(argv)
    command = "python tools/mutate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    selected = {}
    for file in args.files:
        functions, _, _ = TARGETS[file]
        with open(os.path.join(ROOT, "minillm", file), encoding="utf-8") as f:
            source = f.read()
        allm = enumerate_mutants(source, file, functions)
        selected[file] = select(allm, args.seed, file, args.max_per_file)
        if args.only:
            selected[file] = [m for m in selected[file] if f"{file}:{m.line}" in args.only]
        print(f"{file}: {len(allm)} candidate mutants, {len(selected[file])} selected", flush=True)
    if args.list:
        for file, ms in selected.items():
            for m in ms:
                print(f"{file}:{m.line} ({m.function}) {m.describe()}")
        return 0
    t0 = time.perf_counter()
    if not args.no_fork:
        preload()
    sandbox = make_sandbox()
    results = {}
    try:
        for file, ms in selected.items():
            _, tests, k = TARGETS[file]
            status, base = run_tests(sandbox, tests, k, timeout=900, fork=not args.no_fork)
            if status != "passed":
                print(f"{file}: the unmutated tests do not pass ({status}); skipped", flush=True)
                continue
            # never below twice the unmutated run: a slow survivor must not pass for a kill
            timeout = max(args.timeout or 60.0, (1.0 if args.timeout else 1.5) * 2.0 * base)
            print(f"{file}: unmutated tests pass in {base:.1f}s; timeout {timeout:.0f}s", flush=True)
            results[file] = mutate_file(sandbox, file, ms, tests, k, timeout, fork=not args.no_fork,
                                        log=lambda s: print(s, flush=True))
    finally:
        shutil.rmtree(sandbox, ignore_errors=True)
    text = report(results, time.perf_counter() - t0, command)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
