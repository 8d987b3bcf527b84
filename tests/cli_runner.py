"""Run many ``python -m minillm ...`` command lines quickly: python cli_runner.py CASES.json RESULTS.json

A fresh interpreter imports minillm's command line once, then forks one child per case;
each child runs ``minillm`` as ``__main__`` exactly as ``python -m minillm`` does
(runpy), with its own stdout/stderr files, working directory and environment, and ends
with the status the interpreter would give it: SystemExit's code, or 1 after the
traceback of an uncaught exception. A case then costs a fork, not the seconds of
importing NumPy and minillm again. Without os.fork, every case is a real subprocess.

CASES.json: [{"argv": [...], "cwd": str, "env": {name: value}}]; RESULTS.json gets
[{"returncode": int, "stdout": str, "stderr": str}] in the same order.
"""
import json
import os
import runpy
import subprocess
import sys
import tempfile
import traceback


def _exit_status(e: SystemExit) -> int:
    """What the interpreter makes of SystemExit(code) (Python's handle_system_exit)."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def _child(case, out_path, err_path):
    """In the forked child: become ``python -m minillm ARGV``; never returns."""
    status = 1
    try:
        os.chdir(case["cwd"])
        os.environ.update(case.get("env", {}))
        for fd, path in ((1, out_path), (2, err_path)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(f, fd)
            os.close(f)
        sys.argv = ["-m", *case["argv"]]
        try:
            runpy.run_module("minillm", run_name="__main__", alter_sys=True)
            status = 0
        except SystemExit as e:
            status = _exit_status(e)
        except BaseException:
            sys.excepthook(*sys.exc_info())
            status = 1
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(status)


def run_forked(case, scratch):
    out_path, err_path = (os.path.join(scratch, name) for name in ("out", "err"))
    pid = os.fork()
    if pid == 0:
        _child(case, out_path, err_path)
    _, wait_status = os.waitpid(pid, 0)
    with open(out_path, encoding="utf-8", errors="replace") as f_out, \
            open(err_path, encoding="utf-8", errors="replace") as f_err:
        return {"returncode": os.waitstatus_to_exitcode(wait_status), "stdout": f_out.read(),
                "stderr": f_err.read()}


def run_subprocess(case):
    r = subprocess.run([sys.executable, "-m", "minillm", *case["argv"]], cwd=case["cwd"],
                       env={**os.environ, **case.get("env", {})}, capture_output=True, text=True)
    return {"returncode": r.returncode, "stdout": r.stdout, "stderr": r.stderr}


def _import_the_command_line():
    """Every module under minillm/cli and minillm/bench, once, so that children start with them.
    Not minillm.__main__: each child runs it afresh as __main__, as ``python -m`` does."""
    import importlib
    import pkgutil

    import minillm.bench
    import minillm.cli
    for package in (minillm.cli, minillm.bench):
        for m in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{m.name}")


def main(cases_path, results_path):
    with open(cases_path, encoding="utf-8") as f:
        cases = json.load(f)
    if hasattr(os, "fork"):
        _import_the_command_line()
        with tempfile.TemporaryDirectory() as scratch:
            results = [run_forked(case, scratch) for case in cases]
    else:
        results = [run_subprocess(case) for case in cases]
    with open(results_path, "w", encoding="utf-8") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
