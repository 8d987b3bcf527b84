"""The command line: ``python -m minillm COMMAND [options]``.

Each command lives in its own module under ``minillm/cli/`` with two functions,
``add_arguments(parser)`` and ``run(args) -> int``, so that adding a command never
touches another command's code. Modules are imported only when their command
runs, so ``--help`` is instant and a missing optional piece breaks only itself.

A user's mistake (a run that is not there, a file too short to train on, an option
the library rejects) is answered with one line on stderr, ``minillm COMMAND: error:
...``, and exit status 2. What counts as a mistake: a :class:`~minillm.cli.common.UsageError`,
an OSError (the system refused: no such file, no permission), a MemoryError, and an
exception that minillm raises *on purpose* (a ``raise`` statement in the package, of
the kinds it uses to reject input: ValueError and TypeError naming the argument,
FileNotFoundError, RuntimeError for a missing GPU or corpus, FloatingPointError for a
diverged run). Anything else is a bug: it propagates with its traceback (exit 1), as
does any exception under ``--debug`` or ``MINILLM_DEBUG=1`` (which print the
traceback before the line).
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import os
import sys
import traceback

import minillm
from minillm.cli.common import HelpFormatter, UsageError

DEBUG_FLAG, DEBUG_ENV = "--debug", "MINILLM_DEBUG"

# name -> (module, one-line help). The order is the order --help lists them.
COMMANDS = {
    "train": ("minillm.cli.train", "train a model (default: a char-level GPT on Shakespeare), then sample"),
    "sample": ("minillm.cli.sample", "generate text from a trained checkpoint (default: the latest run)"),
    "bench": ("minillm.cli.bench", "measure speed and memory, side by side with reference libraries"),
    "quantize": ("minillm.cli.quantize", "quantize a trained checkpoint and compare perplexity, size and speed"),
    "embed": ("minillm.cli.embed", "sentence embeddings and cosine similarities from a BERT checkpoint"),
    "memory": ("minillm.cli.memory", "bytes per rank of a training step under DDP and ZeRO 1-3, beside a measured step"),
    "scaling": ("minillm.cli.scaling", "an IsoFLOP sweep at toy scale: the compute-optimal model size per budget"),
    "finetune": ("minillm.cli.finetune", "post-training: SFT on instructions, a reward model, PPO and DPO from preferences"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, except that a mistake on the command line is one line on stderr
    (what was wrong, and where the options are listed) instead of the usage block."""

    def error(self, message):
        name = self.prog.removeprefix("python -m ")
        self.exit(2, f"{name}: error: {message} (see {self.prog} --help)\n")


def build_parser(command=None) -> argparse.ArgumentParser:
    """The parser of every command; only ``command``'s module is imported, to add its options."""
    parser = ArgumentParser(
        prog="python -m minillm",
        description="minillm: LLM building blocks in NumPy/CuPy with hand-written backward passes.",
        epilog="Run 'python -m minillm COMMAND --help' for a command's options. "
               "Set MINILLM_DEVICE=gpu (or pass --device gpu where offered) to run on CuPy.")
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help=f"on an error, show the Python traceback (also {DEBUG_ENV}=1); "
                             "may also follow the command")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=HelpFormatter)
        p.set_defaults(_module=module, _parser=p)   # _parser: whose options a mistake refers to
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, argv = _take_debug_flag(argv)
    debug = debug or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args, unknown = parser.parse_known_args(argv)
    if unknown:   # said by the command's own parser, which names the command and its --help
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not is_user_error(e):
            raise                        # a bug: its traceback, exit status 1
        if debug:
            traceback.print_exc()
        print(f"{command_name(args)}: error: {one_line(e)}", file=sys.stderr)
        return 2


def _take_debug_flag(argv):
    """(whether --debug was given, argv without it). It may stand before or after the
    command; after a bare ``--`` every word is an argument."""
    end = argv.index("--") if "--" in argv else len(argv)
    rest = [a for a in argv[:end] if a != DEBUG_FLAG]
    return len(rest) < end, rest + argv[end:]


def command_name(args) -> str:
    """How an error line names the command: "minillm sample", "minillm train bert", "minillm bench train"."""
    words = ["minillm", args.command]
    if args.command == "train" and getattr(args, "model", "gpt") != "gpt":
        words.append(args.model)
    if args.command == "bench" and getattr(args, "target", None):
        words.append(args.target)
    return " ".join(words)


# The kinds of exception minillm raises to reject what it was given (see the module docstring).
_REJECTIONS = (ValueError, TypeError, RuntimeError, ArithmeticError)


def is_user_error(exc) -> bool:
    """Whether ``exc`` reports the user's mistake (one line, exit 2) rather than a bug."""
    if isinstance(exc, (UsageError, OSError, MemoryError)):
        return True
    return isinstance(exc, _REJECTIONS) and raised_on_purpose(exc)


def raised_on_purpose(exc) -> bool:
    """Whether ``exc`` came from a ``raise`` of its own class in minillm's source, rather than
    from NumPy, Python, or a line of minillm that failed (``x @ w`` with the wrong shapes)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = os.path.abspath(tb.tb_frame.f_code.co_filename)
    if not path.startswith(_PACKAGE_DIR + os.sep):
        return False
    names = {cls.__name__ for cls in type(exc).__mro__}
    return any(first <= tb.tb_lineno <= last and raised in names
               for first, last, raised in _raise_statements(path))


_PACKAGE_DIR = os.path.dirname(os.path.abspath(minillm.__file__))


@functools.lru_cache(maxsize=None)
def _raise_statements(path):
    """(first line, last line, class name) of each ``raise Name(...)`` in a source file."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return ()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            name = getattr(target, "id", None) or getattr(target, "attr", None)
            if name:
                out.append((node.lineno, node.end_lineno, name))
    return tuple(out)


def one_line(exc) -> str:
    """The message of ``exc`` on one line; an OSError as "path: what the system said"."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror}"
    elif isinstance(exc, MemoryError):
        text = f"out of memory: {exc}" if str(exc) else "out of memory"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
