"""What every command shares: the help formatter, the user-mistake exception, and option
types that reject an impossible number when the command line is parsed.

Kept free of NumPy and of the library so that ``python -m minillm --help`` stays instant.
"""

from __future__ import annotations

import argparse
import math


class UsageError(ValueError):
    """The user asked for something the command cannot do (a missing run, an option that
    contradicts another). ``python -m minillm`` prints its message as one line, exit status 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps a description's own line breaks (module docstrings hold tables), and appends
    "(default: X)" to an option's help unless the help already states its default in
    words, the default is None (which would only say "None"), or the option is an on/off
    flag (off unless given)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default is None or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def int_at_least(lo: int):
    """An argparse ``type``: an integer >= lo, else the option's error names the bound."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {value}")
        return value
    parse.__name__ = f"integer >= {lo}"
    return parse


def number_in(lo: float, hi: float = math.inf, *, lo_open=False, hi_open=False):
    """An argparse ``type``: a finite float in the interval from lo to hi (each end closed
    unless said open); infinity and NaN are never accepted."""
    left, right = "(" if lo_open else "[", ")" if hi_open or hi == math.inf else "]"
    want = f"a number in {left}{lo:g}, {hi:g}{right}" if hi != math.inf else \
        f"a number {'>' if lo_open else '>='} {lo:g}"

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        below = value <= lo if lo_open else value < lo
        above = value >= hi if hi_open else value > hi
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text}")
        return value
    parse.__name__ = want
    return parse


positive_int = int_at_least(1)
count = int_at_least(0)            # a number of things where none is allowed (0: none)
seed = int_at_least(0)             # NumPy's generators take seeds >= 0
positive_number = number_in(0.0, lo_open=True)
nonnegative_number = number_in(0.0)
fraction = number_in(0.0, 1.0, lo_open=True, hi_open=True)


def preset_train_settings(args, train_kw: dict) -> dict:
    """A preset's TrainConfig fields with the command line's --max-steps, --batch-size,
    --block-size, --lr and --eval-interval put over them. A lower --lr than the preset's
    min_lr brings min_lr down to lr / 10 (the cosine must decay, not rise), and a run
    shorter than its warmup warms up for all of it."""
    over = {k: v for k, v in (("max_steps", args.max_steps), ("batch_size", args.batch_size),
                              ("block_size", args.block_size), ("lr", args.lr),
                              ("eval_interval", args.eval_interval)) if v is not None}
    tk = {**train_kw, **over}
    if "lr" in over and tk["min_lr"] > tk["lr"]:
        tk["min_lr"] = tk["lr"] / 10
    tk["warmup_steps"] = min(tk["warmup_steps"], tk["max_steps"])
    return tk
