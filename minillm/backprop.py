"""The chain rule made concrete: softmax, cross-entropy, dropout, residuals, and
the finite-difference gradient checker that every test in minillm uses.

Convention (used by every concept file):

    y, cache = op_forward(x, ...)      # cache holds exactly what backward needs
    dx = op_backward(dy, cache)        # one gradient per differentiable input,
                                       # a bare array when there is only one

A backward takes dL/dy (same shape as y) and returns dL/dx. Chaining them in the
reverse order of the forward is backpropagation; nothing more is needed.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from .backend import array_module, check_float, check_int, check_like, make_rng


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
    check_float("logits", logits)
    check_int("targets", targets)
    if logits.ndim < 1 or tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets: expected shape {tuple(logits.shape[:-1])} (logits' shape "
                         f"without the class axis), got {tuple(targets.shape)}")
    if not (0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing: expected a number in [0, 1], got {label_smoothing!r}")
    xp = array_module(logits)
    V = logits.shape[-1]
    lg = logits.reshape(-1, V)
    t = targets.reshape(-1)
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= V))
    if bool(xp.any(bad)):
        raise ValueError(f"targets: expected class ids in [0, {V}) or ignore_index={ignore_index}, "
                         f"got {int(t[bad][0])}")
    t_safe = xp.where(valid, t, 0)
    logp = log_softmax(lg)
    n_valid = int(xp.sum(valid))
    nll = -xp.take_along_axis(logp, t_safe[:, None], axis=1)[:, 0]
    per_row = (1.0 - label_smoothing) * nll
    if label_smoothing:
        per_row = per_row + label_smoothing * (-xp.mean(logp, axis=1))
    per_row = xp.where(valid, per_row, 0)
    loss = xp.sum(per_row) / max(n_valid, 1)
    probs = xp.exp(logp)
    return loss.astype(logits.dtype), CrossEntropyCache(probs, t_safe, valid, n_valid,
                                                        float(label_smoothing), tuple(logits.shape))


def softmax_cross_entropy_backward(dloss, cache: CrossEntropyCache):
    """dlogits = dloss * (softmax(logits) - q) / n_valid on counted rows, 0 on ignored ones.
    -> dlogits: (..., V)"""
    probs, t, valid, n_valid, s, shape = cache
    xp = array_module(probs)
    N, V = probs.shape
    d = probs.copy()
    d[xp.arange(N), t] -= (1.0 - s)
    if s:
        d -= s / V
    d *= (valid[:, None] * (dloss / max(n_valid, 1))).astype(d.dtype)
    return d.reshape(shape)


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
    check_float("x", x)
    if not (isinstance(p, (int, float, np.floating)) and 0.0 <= p < 1.0):
        raise ValueError(f"p: expected a probability in [0, 1), got {p!r}")
    if p == 0:
        return x, DropoutCache(None)
    xp = array_module(x)
    u = rng.random(x.shape, dtype=np.float32) if rng is not None else None
    if u is None:
        raise TypeError("rng: expected a random Generator when p > 0, got None")
    if array_module(u) is not xp:  # a CPU generator used for GPU data: move the mask
        u = xp.asarray(u)
    mask = (u >= p).astype(x.dtype) * x.dtype.type(1.0 / (1.0 - p))
    return x * mask, DropoutCache(mask)


def dropout_backward(dy, cache: DropoutCache):
    """dx = dy * m / (1 - p): the same mask that was applied forward."""
    if cache.mask is None:
        return dy
    return dy * cache.mask


def residual_forward(x, fx):
    """y = x + f(x): the skip connection. Its backward sends dy down both paths."""
    if x.shape != fx.shape:
        raise ValueError(f"fx: expected shape {tuple(x.shape)} (the residual stream), got {tuple(fx.shape)}")
    return x + fx, None


def residual_backward(dy, cache=None):
    """-> (dx, dfx) = (dy, dy): addition copies the gradient to both inputs."""
    return dy, dy


# ---------------------------------------------------------------------------
# The finite-difference gradient checker
# ---------------------------------------------------------------------------

class GradCheckReport(NamedTuple):
    """The outcome of a gradient check.

    max_rel_error: the worst elementwise relative error |a - n| / max(|a|, |n|, floor).
        The floor is the larger of 1e-5 * (largest |gradient| of that input) and the
        smallest gradient a float64 finite difference can resolve to 1e-7 (see
        _resolution_floor); below it an entry is judged on its absolute error, so that
        entries that are (nearly) zero in both cannot blow the ratio up. Entries below
        ``atol`` in both count as agreeing.
    where: (input name, index tuple) of that worst element.
    analytic, numeric: the two gradients at that element.
    per_input: {name: worst relative error for that input}.
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
    error instead. Terms that did not move cancel exactly and add nothing.
    """
    f2, f1, fm1, fm2 = (np.asarray(v, dtype=np.float64) for v in values)
    moved = (f2 != fm2) | (f1 != fm1)
    total = float(np.sum(np.abs(np.where(moved, f1, 0.0))))
    return ROUNDINGS * np.finfo(np.float64).eps * total / eps / RESOLUTION


def _rel_errors(a, n, atol, floor=0.0):
    """|a - n| / max(|a|, |n|, floor), floor at least 1e-5 * the largest |a|, |n| and atol;
    0 where both are below atol. ``floor`` may be per entry (the resolution floor)."""
    a = np.asarray(a, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    scale = max(np.max(np.abs(a), initial=0.0), np.max(np.abs(n), initial=0.0))
    floor = np.maximum(max(1e-5 * scale, atol), floor)
    big = np.maximum(np.abs(a), np.abs(n))
    errs = np.abs(a - n) / np.maximum(big, floor)
    return np.where(big < atol, 0.0, errs)


def _stencil(values, eps):
    """Five-point central difference from f(+2h), f(+h), f(-h), f(-2h).

    Truncation error is O(h^4), so h can be larger and round-off (~1e-16 |f| / h)
    stays small. When f returns an array, the stencil is applied elementwise
    *before* summing, so outputs that do not depend on the entry cancel exactly.
    """
    f2, f1, fm1, fm2 = values
    d = (8 * (f1 - fm1) - (f2 - fm2)) / (12 * eps)  # differences first: equal values cancel exactly
    return float(np.sum(d)) if hasattr(d, "shape") else float(d)


def check_dict_gradients(f: Callable[[dict], float], params: dict, grads: dict, eps=1e-4,
                         max_checks_per_param=None, seed=0, atol=1e-9) -> GradCheckReport:
    """Compare ``grads`` with central differences of ``f(params)``.

    ``f`` returns the scalar being differentiated, or an array whose sum is (which
    lets unaffected terms cancel exactly). Each checked entry p is perturbed to
    p +- eps and p +- 2 eps and the five-point difference compared with the
    analytic gradient. Entries where both gradients are below ``atol`` count as
    zero. ``params`` is modified and restored in place; use float64 arrays.
    ``max_checks_per_param`` samples that many entries per array (None = all).
    """
    rng = make_rng(seed)
    worst = (-1.0, ("", ()), 0.0, 0.0)
    per_input = {}
    check_like("grads", params, grads)
    for name, p in params.items():
        g = grads[name]
        if p.dtype != np.float64:
            raise TypeError(f"params[{name!r}]: gradient checks need float64, got {p.dtype}")
        g = _host(g)
        flat_idx = np.arange(p.size)
        if max_checks_per_param is not None and p.size > max_checks_per_param:
            flat_idx = rng.choice(p.size, size=max_checks_per_param, replace=False)
        if len(flat_idx) == 0:
            per_input[name] = 0.0
            continue
        num = np.empty(len(flat_idx))
        floor = np.empty(len(flat_idx))
        for j, fi in enumerate(flat_idx):
            idx = np.unravel_index(int(fi), p.shape)
            old = float(p[idx])
            vals = []
            for k in (2, 1, -1, -2):
                p[idx] = old + k * eps
                vals.append(_host(f(params)))
            p[idx] = old
            num[j] = _stencil(vals, eps)
            floor[j] = _resolution_floor(vals, eps)
        ana = g.reshape(-1)[flat_idx].astype(np.float64)
        errs = _rel_errors(ana, num, atol, floor)
        k = int(np.argmax(errs))
        per_input[name] = float(errs[k])
        if errs[k] > worst[0]:
            worst = (float(errs[k]), (name, tuple(int(i) for i in np.unravel_index(int(flat_idx[k]), p.shape))),
                     float(ana[k]), float(num[k]))
    return GradCheckReport(max(worst[0], 0.0), worst[1], worst[2], worst[3], per_input)


def gradcheck(forward: Callable, backward: Callable, inputs, wrt=None, kwargs=None, eps=1e-4,
              seed=0, max_checks_per_input=None, atol=1e-9) -> GradCheckReport:
    """Check ``backward`` against finite differences of ``forward``.

    forward(*inputs, **kwargs) -> (out, cache); backward(dout, cache) -> one gradient per
    differentiable input (a bare array when there is one). The scalar being
    differentiated is L = sum(dout * out) with a *random* dout (an all-ones dout
    hides errors that sum to zero). ``wrt`` lists the positions in ``inputs`` that
    backward returns gradients for, in order (default: every float array).
    ``out`` may be a tuple of arrays; then dout is a tuple too.
    Inputs must be float64. Returns a GradCheckReport; tests assert
    ``report.max_rel_error <= 1e-7``.
    """
    kwargs = kwargs or {}
    inputs = list(inputs)
    if wrt is None:
        wrt = [i for i, a in enumerate(inputs) if hasattr(a, "dtype") and a.dtype.kind == "f"]
    rng = make_rng(seed)
    out, cache = forward(*inputs, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    xp = array_module(*outs)
    douts = tuple(xp.asarray(rng.standard_normal(o.shape)) for o in outs)
    grads = backward(douts if isinstance(out, tuple) else douts[0], cache)
    if not isinstance(grads, tuple):
        grads = (grads,)
    if len(grads) < len(wrt):
        raise ValueError(f"backward returned {len(grads)} gradients, expected {len(wrt)} (wrt={wrt})")

    def objective(_params):
        o, _ = forward(*inputs, **kwargs)
        os_ = o if isinstance(o, tuple) else (o,)
        return xp.concatenate([(a * d).reshape(-1) for a, d in zip(os_, douts)])

    params = {f"input{i}": inputs[i] for i in wrt}
    gdict = {f"input{i}": grads[j] for j, i in enumerate(wrt)}
    return check_dict_gradients(objective, params, gdict, eps=eps,
                                max_checks_per_param=max_checks_per_input, seed=seed, atol=atol)


def _host(x):
    from .backend import to_numpy
    return to_numpy(x) if hasattr(x, "shape") else x
