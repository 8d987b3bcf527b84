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


def scaled(n):
    """n examples under the default `ci` profile (12 examples), proportionally more under
    `thorough`: for tests too costly to run the profile's full count."""
    from hypothesis import settings
    return max(1, n * settings.default.max_examples // 12)


def assert_alive(grads, loss=None, counted=None, zero=()):
    """Prove that a drawn case reaches what its gradient check checks, so that a degenerate
    draw (every target ignored, one key, T = 1) fails loudly instead of passing trivially.

    grads: {name: array} or a sequence of arrays (None entries skipped). Every gradient
    must have a non-zero entry, except the names (or positions) in ``zero``, which must be
    exactly 0 everywhere (a gradient known to vanish, such as the key bias's). loss, when
    given, must be finite and not exactly 0; counted (the number of targets that count),
    when given, must be >= 1.
    """
    if counted is not None:
        assert int(counted) >= 1, "no target counted: the loss and every gradient are 0"
    if loss is not None:
        loss = float(to_numpy(loss))
        assert np.isfinite(loss) and loss != 0.0, f"the loss is {loss}: nothing to differentiate"
    items = grads.items() if isinstance(grads, dict) else enumerate(grads)
    for name, g in items:
        if g is None:
            continue
        g = to_numpy(g)
        assert np.all(np.isfinite(g)), f"gradient {name!r} is not finite"
        if name in zero:
            assert not np.any(g), f"gradient {name!r} should be exactly 0, max |g| = {np.max(np.abs(g))}"
        else:
            assert np.any(g), f"gradient {name!r} is exactly 0: this draw checks nothing there"
