"""The command line: ``python -m minillm COMMAND [options]``.

Each command lives in its own module under ``minillm/cli/`` with two functions,
``add_arguments(parser)`` and ``run(args) -> int``, so that adding a command never
touches another command's code. Modules are imported only when their command
runs, so ``--help`` is instant and a missing optional piece breaks only itself.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from minillm.cli.common import HelpFormatter

# name -> (module, one-line help). The order is the order --help lists them.
COMMANDS = {
    "train": ("minillm.cli.train", "train a model (default: a char-level GPT on Shakespeare), then sample"),
    "sample": ("minillm.cli.sample", "generate text from a trained checkpoint (default: the latest run)"),
    "bench": ("minillm.cli.bench", "measure speed and memory, side by side with reference libraries"),
    "quantize": ("minillm.cli.quantize", "quantize a trained checkpoint and compare perplexity, size and speed"),
    "embed": ("minillm.cli.embed", "sentence embeddings and cosine similarities from a BERT checkpoint"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m minillm",
        description="minillm: LLM building blocks in NumPy/CuPy with hand-written backward passes.",
        epilog="Run 'python -m minillm COMMAND --help' for a command's options. "
               "Set MINILLM_DEVICE=gpu (or pass --device gpu where offered) to run on CuPy.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=HelpFormatter)
        p.set_defaults(_module=module)
        # Only the chosen command's module is imported (argv decides which).
        if name in sys.argv[1:2]:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = [saved[0]] + argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    finally:
        sys.argv = saved
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
