"""What every command shares: the help formatter.

Kept free of NumPy and of the library so that ``python -m minillm --help`` stays instant.
"""

from __future__ import annotations

import argparse


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
