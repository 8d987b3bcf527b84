"""The command line's help: every option says what it does by default, once."""
import argparse
import importlib
import re

import pytest

from minillm.__main__ import COMMANDS, HelpFormatter


def _parsers():
    for name, (module, help_text) in COMMANDS.items():
        p = argparse.ArgumentParser(prog=f"python -m minillm {name}", formatter_class=HelpFormatter)
        importlib.import_module(module).add_arguments(p)
        yield name, p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub, sp in a.choices.items():
                    yield f"{name} {sub}", sp


@pytest.mark.parametrize("name, parser", list(_parsers()), ids=lambda v: v if isinstance(v, str) else "")
def test_help_states_each_default_once_and_never_as_none(name, parser):
    text = parser.format_help()
    assert "(default: None)" not in text, name
    for a in parser._actions:
        if not a.option_strings or a.dest == "help" or a.help == argparse.SUPPRESS:
            continue
        assert issubclass(parser.formatter_class, HelpFormatter), name
        formatter = parser.formatter_class(parser.prog)
        shown = (formatter._get_help_string(a) or "").replace("%(default)s", "X")
        assert shown.count("(default") <= 1, f"{name} {a.option_strings}: {shown!r}"
        if a.default not in (None, False) and not isinstance(a, argparse._StoreConstAction):
            assert re.search(r"\(default", shown), f"{name} {a.option_strings} hides its default: {shown!r}"
