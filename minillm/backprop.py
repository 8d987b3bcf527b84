"""The chain rule made concrete: softmax, cross-entropy, dropout, residuals, and
the finite-difference gradient checks that every test in minillm relies on.

Convention (used by every concept file):

    y, cache = op_forward(x, ...)      # cache holds exactly what backward needs
    dx = op_backward(dy, cache)        # one gradient per differentiable input,
                                       # a bare array when there is only one

A backward takes dL/dy (same shape as y) and returns dL/dx. Chaining them in the
reverse order of the forward is backpropagation; nothing more is needed.

How do we know a backward is right? Nudge an input and watch the output:

    dL/dx_i ~ (L(x + eps e_i) - L(x - eps e_i)) / (2 eps)

Reading order: the ops (softmax, cross-entropy, dropout, residual), then that
textbook central difference (``numerical_gradient``), then the careful checker the
tests use (``gradcheck`` / ``check_dict_gradients``: a five-point stencil and a
verdict that stays meaningful at every scale of gradient), then the argument checks.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from .backend import (array_module, check_float, check_int, check_like, check_number, check_positive,
                      check_probability, is_int, make_rng, to_numpy)


# ---------------------------------------------------------------------------
# Softmax
# ---------------------------------------------------------------------------

class SoftmaxCache(NamedTuple):
    y: object  # (..., V) the probabilities: all the backward needs


def softmax_forward(x):
    """y = exp(x - max(x)) / sum(exp(x - max(x))) over the last axis.

    Subtracting the row max changes nothing mathematically (softmax ignores a
    constant shift) and keeps exp() from overflowing. Rows of -inf (everything
    masked) are not allowed here: see attention for its documented handling.
    x: (..., V) -> y: (..., V)
    """
    check_float("x", x)
    xp = array_module(x)
    z = x - xp.max(x, axis=-1, keepdims=True)
    e = xp.exp(z)
    y = e / xp.sum(e, axis=-1, keepdims=True)
    return y, SoftmaxCache(y)


def softmax_backward(dy, cache: SoftmaxCache):
    """dx = y * (dy - sum(dy * y)) over the last axis.

    From dy_i/dx_j = y_i (delta_ij - y_j): the Jacobian-vector product never
    needs the V x V Jacobian. -> dx: (..., V)
    """
    y = cache.y
    xp = array_module(y)
    return y * (dy - xp.sum(dy * y, axis=-1, keepdims=True))


def log_softmax(x):
    """log(softmax(x)) = x - max - log(sum(exp(x - max))), computed stably. x: (..., V)."""
    check_float("x", x)
    xp = array_module(x)
    z = x - xp.max(x, axis=-1, keepdims=True)
    return z - xp.log(xp.sum(xp.exp(z), axis=-1, keepdims=True))


# ---------------------------------------------------------------------------
# Softmax cross-entropy (the language-model loss)
# ---------------------------------------------------------------------------

class CrossEntropyCache(NamedTuple):
    probs: object       # (N, V) softmax of the logits
    targets: object     # (N,) int, ignored rows already replaced by 0
    valid: object       # (N,) bool, False where the target was ignore_index
    n_valid: int        # number of targets that count (the mean's denominator)
    label_smoothing: float
    shape: tuple        # the logits' original shape (..., V)


def softmax_cross_entropy_forward(logits, targets, ignore_index=-100, label_smoothing=0.0):
    """Mean over non-ignored positions of -sum_v q_v log softmax(logits)_v.

    q is the target distribution: (1 - s) on the target plus s / V everywhere
    (PyTorch's label_smoothing=s), so loss = (1 - s) * nll + s * mean_v(-log p_v).
    If every target is ignored, the loss is 0 and the gradient is 0 (PyTorch
    would return NaN; a batch of pure padding should not poison training).
    logits: (..., V) float; targets: (...) int -> loss: 0-d array, cache
    """
    s = _check_cross_entropy(logits, targets, ignore_index, label_smoothing)
    xp = array_module(logits)
    V = logits.shape[-1]
    lg = logits.reshape(-1, V)                                     # (N, V)
    t = targets.reshape(-1)                                        # (N,)
    valid = t != ignore_index                                      # (N,)
    t_safe = xp.where(valid, t, 0)
    logp = log_softmax(lg)                                         # (N, V)
    n_valid = int(xp.sum(valid))
    nll = -xp.take_along_axis(logp, t_safe[:, None], axis=1)[:, 0]  # (N,)
    smooth = -xp.mean(logp, axis=1) if s else 0.0                  # (N,) cross-entropy with uniform q
    per_row = xp.where(valid, (1.0 - s) * nll + s * smooth, 0)     # (N,)
    loss = xp.sum(per_row) / max(n_valid, 1)
    probs = xp.exp(logp)
    return loss.astype(logits.dtype), CrossEntropyCache(probs, t_safe, valid, n_valid, s,
                                                        tuple(logits.shape))


def softmax_cross_entropy_backward(dloss, cache: CrossEntropyCache):
    """dlogits = dloss * (softmax(logits) - q) / n_valid on counted rows, 0 on ignored ones.
    -> dlogits: (..., V)"""
    probs, t, valid, n_valid, s, shape = cache
    xp = array_module(probs)
    N, V = probs.shape
    # p - q, a fresh array: q is s / V everywhere, plus 1 - s on the target.
    p_minus_q = probs - s / V                                      # (N, V) right off the target
    p_minus_q[xp.arange(N), t] -= 1.0 - s                          # and now on it too
    row_weight = (valid * (dloss / max(n_valid, 1))).astype(probs.dtype)  # (N,) 0 on ignored rows
    dlogits = p_minus_q * row_weight[:, None]                      # (N, V)
    return dlogits.reshape(shape)


# ---------------------------------------------------------------------------
# Dropout and residuals
# ---------------------------------------------------------------------------

class DropoutCache(NamedTuple):
    mask: object   # (...) the kept-and-rescaled multiplier, or None when p == 0


def dropout_forward(x, p, rng):
    """Inverted dropout: y = x * m / (1 - p), m ~ Bernoulli(1 - p) per element.

    Scaling by 1/(1-p) at training time keeps E[y] = x, so evaluation needs no
    change (just don't call dropout). p == 0 is the identity.
    x: (...), p in [0, 1), rng: numpy or cupy Generator -> y: (...)
    """
    _check_dropout(x, p, rng)
    if p == 0:
        return x, DropoutCache(None)
    xp = array_module(x)
    u = xp.asarray(rng.random(x.shape, dtype=np.float32))  # a CPU generator's draws move to x's device
    mask = (u >= p).astype(x.dtype) * x.dtype.type(1.0 / (1.0 - p))
    return x * mask, DropoutCache(mask)


def dropout_backward(dy, cache: DropoutCache):
    """dx = dy * m / (1 - p): the same mask that was applied forward."""
    if cache.mask is None:
        return dy
    return dy * cache.mask


def residual_forward(x, fx):
    """y = x + f(x): the skip connection. Its backward sends dy down both paths."""
    _check_residual(x, fx)
    return x + fx, None


def residual_backward(dy, cache=None):
    """-> (dx, dfx) = (dy, dy): addition copies the gradient to both inputs."""
    return dy, dy


# ---------------------------------------------------------------------------
# The textbook numerical gradient
# ---------------------------------------------------------------------------

def numerical_gradient(f: Callable, x, eps=1e-5):
    """df/dx by central differences, one entry at a time (cs231n's eval_numerical_gradient).

        df/dx_i ~ (f(x + eps e_i) - f(x - eps e_i)) / (2 eps)

    Its error is a truncation term ~ eps^2 f''' / 6 plus round-off ~ 1e-16 |f| / eps,
    so at eps = 1e-5 it agrees with a correct gradient to about 1e-10 absolute.
    ``f(x)`` returns a scalar; ``x`` (float64) is nudged in place and each entry put
    back, so it holds exactly its old values afterwards. Example, f = sum(x^2):

    >>> x = np.array([1.0, -2.0, 3.0])
    >>> numerical_gradient(lambda x: np.sum(x ** 2), x)   # 2x
    array([ 2., -4.,  6.])
    """
    _check_numerical_gradient(f, x, eps)
    grad = array_module(x).zeros_like(x)
    for i in np.ndindex(*x.shape):
        old = float(x[i])
        x[i] = old + eps
        f_plus = float(f(x))
        x[i] = old - eps
        f_minus = float(f(x))
        x[i] = old
        grad[i] = (f_plus - f_minus) / (2 * eps)
    return grad


# ---------------------------------------------------------------------------
# The careful checker: what the tests use
# ---------------------------------------------------------------------------

class GradCheckReport(NamedTuple):
    """The outcome of a gradient check.

    max_rel_error: the worst elementwise error |a - n| / max(|a|, |n|, floor). The floor
        of an entry is the largest of
          - 1e-5 * the largest |gradient| of that input (relative to the input's scale),
          - the round-off floor of the analytic side, ROUNDINGS machine epsilons of the
            largest |gradient| in the whole check, over RESOLUTION (see _analytic_floor),
          - its resolution floor: the smallest gradient a float64 five-point difference
            resolves to RESOLUTION (see _resolution_floor; relative to the objective's size),
          - ``atol``, only where a caller passes one (the default is 0).
        Below its floor an entry is judged on its absolute error, |a - n| / floor; no
        entry counts as right merely for being small. Every floor is relative, so scaling
        the objective (and with it every gradient) by any factor leaves the verdict as it
        was, and a backward that is 5x off, or returns 0, is caught at any scale. A NaN
        or infinite gradient is an infinite error.
    where: (input name, index tuple) of that worst element.
    analytic, numeric: the two gradients at that element.
    per_input: {name: worst error for that input}.
    """
    max_rel_error: float
    where: tuple
    analytic: float
    numeric: float
    per_input: dict

    def __str__(self):
        name, idx = self.where
        return (f"max relative error {self.max_rel_error:.3e} at {name}{list(idx)} "
                f"(analytic {self.analytic:.10g}, numeric {self.numeric:.10g})")


RESOLUTION = 1e-7   # the relative error the checks are held to (smooth functions, float64)
ROUNDINGS = 32      # rounding errors, in machine epsilons of a term's size, that each term carries


def _stencil(values, eps):
    """Five-point central difference from f(+2h), f(+h), f(-h), f(-2h).

    Truncation error is O(h^4), so h can be larger and round-off (~1e-16 |f| / h)
    stays small. When f returns an array, the stencil is applied elementwise
    *before* summing, so outputs that do not depend on the entry cancel exactly.
    """
    f2, f1, fm1, fm2 = values
    d = (8 * (f1 - fm1) - (f2 - fm2)) / (12 * eps)  # differences first: equal values cancel exactly
    return float(np.sum(d)) if hasattr(d, "shape") else float(d)


def _resolution_floor(values, eps):
    """The smallest gradient whose five-point difference from ``values`` is known to RESOLUTION.

    Each term f_i of the objective comes out of a chain of rounded operations
    (matmuls, exp, sums) whose intermediates can be several times the term itself
    (a per-token loss is a logsumexp minus a logit), so it carries an error of some
    tens of machine epsilons of its size; we take ROUNDINGS of them. (Measured: a
    whole-GPT check's per-token terms summing to 3.6 gave a numeric derivative off by
    1.5e-12 at eps 1e-4, twice 10 epsilons' worth.) The stencil divides differences of such values
    by eps, so the numeric derivative carries an absolute error of about
    ROUNDINGS * eps_mach * sum |f_i| / eps over the terms that moved, whatever the
    true gradient.
    A gradient smaller than that error / RESOLUTION cannot be checked to RESOLUTION
    relative by any float64 difference with this eps: it is judged on its absolute
    error instead. Terms that did not move cancel exactly and add nothing. The floor
    is proportional to the objective's size: it scales with the gradients it judges.
    """
    f2, f1, fm1, fm2 = (np.asarray(v, dtype=np.float64) for v in values)
    moved = (f2 != fm2) | (f1 != fm1)
    total = float(np.sum(np.abs(np.where(moved, f1, 0.0))))
    return ROUNDINGS * np.finfo(np.float64).eps * total / eps / RESOLUTION


def _analytic_floor(largest_gradient):
    """The smallest analytic gradient that is more than the backward's own round-off, over RESOLUTION.

    A backward's output is a sum of rounded products whose sizes are those of the
    gradients around it, so a gradient that is exactly 0 in the mathematics (the
    query's, when softmax runs over a single key) comes out as ~1e-17, not 0. We
    allow ROUNDINGS machine epsilons of the largest gradient in the check: entries
    below this floor are judged on their absolute error, which must stay under that
    round-off. (A layer whose gradients are all 1e-10, in a check whose largest is 1,
    is 1e-3 of this floor away from passing when it returns 0.)
    """
    return ROUNDINGS * np.finfo(np.float64).eps * largest_gradient / RESOLUTION


def _rel_errors(analytic, numeric, floor, atol=0.0):
    """|a - n| / max(|a|, |n|, floor) per entry, the floor raised to 1e-5 * the largest |a|, |n|
    of this input (and to ``atol`` where given). ``floor`` may be per entry (the resolution
    floor). 0 where both are exactly 0 with nothing to resolve; inf where either is not finite."""
    a = np.asarray(analytic, dtype=np.float64)
    n = np.asarray(numeric, dtype=np.float64)
    big = np.maximum(np.abs(a), np.abs(n))
    scale = float(np.max(big, initial=0.0, where=np.isfinite(big)))
    denominator = np.maximum(big, np.maximum(floor, max(1e-5 * scale, atol)))
    with np.errstate(invalid="ignore", divide="ignore"):
        errs = np.where(denominator == 0, 0.0, np.abs(a - n) / denominator)
    return np.where(np.isfinite(errs), errs, np.inf)


def _numeric_gradients(f, params, p, flat_idx, eps):
    """Five-point differences of f at the listed flat entries of ``p`` (one of params'
    arrays, nudged in place and restored), and each entry's resolution floor."""
    numeric = np.empty(len(flat_idx))
    floor = np.empty(len(flat_idx))
    for j, fi in enumerate(flat_idx):
        idx = np.unravel_index(int(fi), p.shape)
        old = float(p[idx])
        values = []
        for k in (2, 1, -1, -2):
            p[idx] = old + k * eps
            values.append(_host(f(params)))
        p[idx] = old
        numeric[j] = _stencil(values, eps)
        floor[j] = _resolution_floor(values, eps)
    return numeric, floor


def check_dict_gradients(f: Callable[[dict], float], params: dict, grads: dict, eps=1e-4,
                         max_checks_per_param=None, seed=0, atol=0.0) -> GradCheckReport:
    """Compare ``grads`` with central differences of ``f(params)``.

    ``f`` returns the scalar being differentiated, or an array whose sum is (which
    lets unaffected terms cancel exactly). Each checked entry p is perturbed to
    p +- eps and p +- 2 eps and the five-point difference compared with the
    analytic gradient, on the floors GradCheckReport describes; ``atol`` (default 0)
    adds an absolute floor: entries below it are held to an absolute error of
    RESOLUTION * atol. ``params`` is modified and restored in place; use float64 arrays.
    ``max_checks_per_param`` samples that many entries per array (None = all).
    """
    _check_dict_gradients(params, grads, eps, atol)
    rng = make_rng(seed)
    checked = {}  # name -> (flat indices, analytic, numeric, resolution floor)
    for name, p in params.items():
        flat_idx = np.arange(p.size)
        if max_checks_per_param is not None and p.size > max_checks_per_param:
            flat_idx = rng.choice(p.size, size=max_checks_per_param, replace=False)
        numeric, floor = _numeric_gradients(f, params, p, flat_idx, eps)
        analytic = _host(grads[name]).reshape(-1)[flat_idx].astype(np.float64)
        checked[name] = (flat_idx, analytic, numeric, floor)
    both = [np.abs(np.r_[a, n]) for _, a, n, _ in checked.values()]
    largest = max((float(np.max(v, initial=0.0, where=np.isfinite(v))) for v in both), default=0.0)
    worst = (-1.0, ("", ()), 0.0, 0.0)
    per_input = {}
    for name, (flat_idx, analytic, numeric, floor) in checked.items():
        if len(flat_idx) == 0:
            per_input[name] = 0.0
            continue
        errs = _rel_errors(analytic, numeric, np.maximum(floor, _analytic_floor(largest)), atol)
        k = int(np.argmax(errs))
        per_input[name] = float(errs[k])
        if errs[k] > worst[0]:
            where = (name, tuple(int(i) for i in np.unravel_index(int(flat_idx[k]), params[name].shape)))
            worst = (float(errs[k]), where, float(analytic[k]), float(numeric[k]))
    return GradCheckReport(max(worst[0], 0.0), worst[1], worst[2], worst[3], per_input)


def gradcheck(forward: Callable, backward: Callable, inputs, wrt=None, kwargs=None, eps=1e-4,
              seed=0, max_checks_per_input=None, atol=0.0) -> GradCheckReport:
    """Check ``backward`` against finite differences of ``forward``.

    forward(*inputs, **kwargs) -> (y, cache); backward(dy, cache) -> one gradient per
    differentiable input (a bare array when there is one). The scalar being
    differentiated is L = sum(dy * y) with a *random* dy (an all-ones dy
    hides errors that sum to zero). ``wrt`` lists the positions in ``inputs`` that
    backward returns gradients for, in order (default: every float array); backward
    must return exactly that many (a None, the convention's gradient of an absent
    optional input, is not counted), else ValueError.
    ``y`` may be a tuple of arrays; then dy is a tuple too.
    Inputs must be float64. Returns a GradCheckReport; tests assert
    ``report.max_rel_error <= 1e-7``.
    """
    inputs = list(inputs)
    wrt = _check_gradcheck(inputs, wrt)
    kwargs = kwargs or {}
    rng = make_rng(seed)
    y, cache = forward(*inputs, **kwargs)
    ys = y if isinstance(y, tuple) else (y,)
    xp = array_module(*ys)
    dys = tuple(xp.asarray(rng.standard_normal(o.shape)) for o in ys)
    returned = backward(dys if isinstance(y, tuple) else dys[0], cache)
    grads = [g for g in (returned if isinstance(returned, (tuple, list)) else (returned,)) if g is not None]
    _check_gradient_count(grads, wrt)

    def objective(_params):  # the inputs in _params are the very arrays being nudged
        y_now, _ = forward(*inputs, **kwargs)
        ys_now = y_now if isinstance(y_now, tuple) else (y_now,)
        return xp.concatenate([(a * d).reshape(-1) for a, d in zip(ys_now, dys)])

    params = {f"input{i}": inputs[i] for i in wrt}
    grad_dict = {f"input{i}": grads[j] for j, i in enumerate(wrt)}
    return check_dict_gradients(objective, params, grad_dict, eps=eps,
                                max_checks_per_param=max_checks_per_input, seed=seed, atol=atol)


def _host(x):
    return to_numpy(x) if hasattr(x, "shape") else x


# ---------------------------------------------------------------------------
# Argument checks (each public function calls one, at its top)
# ---------------------------------------------------------------------------

def _check_cross_entropy(logits, targets, ignore_index, label_smoothing) -> float:
    """Float logits (..., V), int targets (...) in [0, V) or ignore_index, s in [0, 1]; returns s."""
    check_float("logits", logits)
    check_int("targets", targets)
    if logits.ndim < 1 or tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets: expected shape {tuple(logits.shape[:-1])} (logits' shape "
                         f"without the class axis), got {tuple(targets.shape)}")
    s = check_probability("label_smoothing", label_smoothing, include_one=True)
    xp = array_module(logits)
    V = logits.shape[-1]
    t = targets.reshape(-1)
    bad = (t != ignore_index) & ((t < 0) | (t >= V))
    if bool(xp.any(bad)):
        raise ValueError(f"targets: expected class ids in [0, {V}) or ignore_index={ignore_index}, "
                         f"got {int(t[bad][0])}")
    return s


def _check_dropout(x, p, rng) -> None:
    check_float("x", x)
    check_probability("p", p)
    if p > 0 and rng is None:
        raise TypeError("rng: expected a random Generator when p > 0, got None")


def _check_residual(x, fx) -> None:
    if x.shape != fx.shape:
        raise ValueError(f"fx: expected shape {tuple(x.shape)} (the residual stream), got {tuple(fx.shape)}")


def _check_numerical_gradient(f, x, eps) -> None:
    if not callable(f):
        raise TypeError(f"f: expected a function x -> scalar, got {type(f).__name__}")
    check_float("x", x)
    if x.dtype != np.float64:
        raise TypeError(f"x: numerical gradients need float64 (float32 loses the difference), got {x.dtype}")
    check_positive("eps", eps)


def _check_dict_gradients(params, grads, eps, atol) -> None:
    check_like("grads", params, grads)
    for name, p in params.items():
        if p.dtype != np.float64:
            raise TypeError(f"params[{name!r}]: gradient checks need float64, got {p.dtype}")
    check_positive("eps", eps)
    check_number("atol", atol, 0.0)


def _check_gradcheck(inputs, wrt) -> list:
    """The positions to differentiate: ``wrt``, or every float array; each must be one."""
    floats = [i for i, a in enumerate(inputs) if hasattr(a, "dtype") and a.dtype.kind == "f"]
    if wrt is None:
        return floats
    wrt = list(wrt)
    if any(not is_int(i) or i not in floats for i in wrt):
        raise ValueError(f"wrt: expected positions of float arrays in inputs ({floats}), got {wrt}")
    return wrt


def _check_gradient_count(grads, wrt) -> None:
    if len(grads) != len(wrt):
        raise ValueError(f"backward: expected {len(wrt)} gradients (one per input in wrt={wrt}), "
                         f"got {len(grads)}")
