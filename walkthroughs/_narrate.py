"""What every walkthrough shares: a heading per step, and checks that stop the script.

A walkthrough shows a number and then checks it: a by-hand result against the
library's (to a stated tolerance), a gradient check against the 1e-7 bar, a trained
model against the baseline it has to beat (a uniform guess, the majority class).
A failed check raises CheckFailed with a message saying what was expected and what
came, so the script exits non-zero and tests/test_walkthroughs.py fails: what a
walkthrough prints is what it has checked.

Importing this module also puts the checkout on sys.path, so that
`python walkthroughs/NN_name.py` runs from a clone without installing minillm.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from minillm import backend  # noqa: E402

FAST = os.environ.get("MINILLM_FAST") == "1"   # tiny sizes and fewer steps (the tests set it)
GRADCHECK_BAR = 1e-7                           # the worst relative error a gradient check may show


class CheckFailed(AssertionError):
    """A walkthrough's claim did not hold."""


def step(n, title):
    """Print the heading of step ``n``."""
    print(f"\n=== Step {n}: {title} ===")


def check(condition, message):
    """Stop the walkthrough with ``message`` unless ``condition`` holds."""
    if not condition:
        raise CheckFailed(message)


def max_abs_diff(a, b):
    """max |a - b| over all entries of two arrays of one shape (NumPy or CuPy), as a float."""
    a, b = backend.to_numpy(a), backend.to_numpy(b)
    check(np.shape(a) == np.shape(b), f"comparing shapes {np.shape(a)} and {np.shape(b)}")
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)),
                        initial=0.0))


def expect_close(what, a, b, tol):
    """Check max |a - b| <= tol (a NaN anywhere fails) and return that difference."""
    d = max_abs_diff(a, b)
    check(d <= tol, f"{what}: max |difference| {d:.3e}, expected at most {tol:g}")
    return d


def expect_gradcheck(what, report):
    """Check a GradCheckReport against the 1e-7 bar and return it (its str is the summary)."""
    check(report.max_rel_error <= GRADCHECK_BAR,
          f"gradient check of {what}: {report}; the bar is {GRADCHECK_BAR:g}")
    return report


def expect_below(what, value, bound, bound_name):
    """Check value < bound: a trained model's loss under its baseline, say. Returns value."""
    check(float(value) < float(bound),
          f"{what} is {float(value):.4g}, expected below {bound_name} = {float(bound):.4g}")
    return value
