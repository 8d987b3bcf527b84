"""python -m minillm bench TARGET: speed and memory, side by side with reference libraries.

Each target is a module in ``minillm/bench/`` defining ``add_arguments(parser)`` and
``run(args)``; they are found by name, so adding a benchmark touches no other file.
Benchmarks are not tests: they measure and report, they do not assert.
"""

import importlib
import pkgutil

import minillm.bench as _bench_pkg
from minillm.cli.common import HelpFormatter, UsageError


def targets():
    return sorted(m.name for m in pkgutil.iter_modules(_bench_pkg.__path__) if not m.name.startswith("_"))


def add_arguments(parser):
    sub = parser.add_subparsers(dest="target", metavar="TARGET")
    for name in targets():
        mod = importlib.import_module(f"minillm.bench.{name}")
        aliases = [name.replace("_", "-")] if "_" in name else []    # sequence_models: also sequence-models
        p = sub.add_parser(name, aliases=aliases, help=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else name,
                           description=mod.__doc__,
                           formatter_class=HelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_bench=mod, _parser=p)


def run(args):
    if not getattr(args, "target", None):
        raise UsageError(f"expected a TARGET, one of: {', '.join(targets()) or '(none yet)'} "
                         f"(python -m minillm bench TARGET --help for its options)")
    return args._bench.run(args)
