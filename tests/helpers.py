"""Small helpers shared by the tests."""
import numpy as np

from minillm.backend import to_numpy

GRAD_TOL = 1e-7  # the project's bar for smooth functions, float64


def on(xp, *arrays):
    """Move NumPy arrays to the module ``xp`` (identity for numpy)."""
    out = tuple(xp.asarray(a) for a in arrays)
    return out[0] if len(out) == 1 else out


def np_(x):
    return to_numpy(x)


def assert_close(a, b, rtol=1e-10, atol=1e-12, msg=""):
    np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=rtol, atol=atol, err_msg=msg)


def assert_gradcheck(report, tol=GRAD_TOL):
    assert report.max_rel_error <= tol, str(report)
