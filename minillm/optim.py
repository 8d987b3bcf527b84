"""Optimizers, gradient clipping, the learning-rate schedule and gradient accumulation.

An optimizer turns gradients into parameter updates. All of them here work on
the project's flat parameter dicts (``{"h.0.attn.w_qkv": array, ...}``) and
update those arrays *in place*, so every reference to a parameter array (the
model, a LoRA wrapper, the training loop) sees the new values.

    opt = AdamW(params, lr=3e-4, weight_decay=0.1)
    loss, grads = loss_and_grads(params, batch)   # grads: same keys and shapes
    clip_grad_norm(grads, 1.0)
    opt.lr = lr_schedule(step, 3e-4, 100, 2000, 3e-5)
    opt.step(grads)

The three update rules, for one parameter p with gradient g at step t (t = 1, 2, ...):

SGD      g' = g + wd p                      (L2 penalty folded into the gradient)
         b  = mu b + g'                     (momentum buffer, b = 0 before step 1)
         p -= lr (g' + mu b)  if nesterov else  lr b

Adam     g' = g + wd p                      (L2: the decay is then rescaled by 1/sqrt(v))
         m = b1 m + (1 - b1) g'             v = b2 v + (1 - b2) g'^2
         p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

AdamW    p *= 1 - lr wd                     (decoupled decay: the same for every weight)
         then Adam's update with g' = g

These are the same updates as ``torch.optim.SGD`` (dampening 0), ``Adam`` and
``AdamW`` (tests compare them in float64). ``eps`` sits outside the square root
and after the bias correction, as in PyTorch.

Parameter groups: weight decay pulls weights towards zero, which makes sense for
matrices but not for biases, normalisation gains (whose natural value is 1) or
embeddings. Every optimizer takes ``no_decay``, a predicate on the parameter's
name: names for which it is True get no weight decay. The default is
:func:`default_no_decay`; ``no_decay=None`` decays every parameter (PyTorch's
default); a string is a regular expression searched in the name.
"""

from __future__ import annotations

import math
import re
from typing import Callable

import numpy as np

from .backend import array_module, check_float, check_like, check_number, is_int, parallel_for

__all__ = ["default_no_decay", "Optimizer", "SGD", "Adam", "AdamW", "make_optimizer",
           "global_norm", "clip_grad_norm", "lr_schedule", "accumulate"]

_NO_DECAY_WORDS = ("bias", "ln", "norm", "wte", "wpe", "embeddings")
# minillm's models name biases by their weight: "b_qkv" beside "w_qkv", "b1" beside "w1", "b".
_SHORT_BIAS = re.compile(r"^b(\d*|_\w*)$")


def default_no_decay(name: str) -> bool:
    """True for parameters that should not be weight-decayed: biases, norm weights, embeddings.

    A name qualifies when it contains one of "bias", "ln", "norm", "wte", "wpe",
    "embeddings" (case-insensitive), e.g. "h.0.ln_1.weight", "wte", "mlm.bias", or
    when its last dotted part is a short bias name: "b", "b1", "b_qkv" (the models'
    own spelling, next to "w", "w1", "w_qkv").
    """
    low = str(name).lower()
    return any(w in low for w in _NO_DECAY_WORDS) or _SHORT_BIAS.match(low.rsplit(".", 1)[-1]) is not None


def _decay_predicate(no_decay) -> Callable[[str], bool]:
    if no_decay is None:
        return lambda name: False
    if isinstance(no_decay, str):
        pattern = re.compile(no_decay)
        return lambda name: pattern.search(name) is not None
    if callable(no_decay):
        return no_decay
    raise TypeError(f"no_decay: expected a function name -> bool, a regex string or None, "
                    f"got {type(no_decay).__name__}")


def _check_betas(betas):
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas: expected a pair (beta1, beta2) in [0, 1), got {betas!r}")
    b1 = check_number("betas[0]", betas[0], 0.0, 1.0, hi_open=True)
    b2 = check_number("betas[1]", betas[1], 0.0, 1.0, hi_open=True)
    return (b1, b2)


def _check_params(params):
    if not isinstance(params, dict) or not params:
        raise TypeError(f"params: expected a non-empty dict of float arrays, got "
                        f"{type(params).__name__}{' (empty)' if isinstance(params, dict) else ''}")
    for name, p in params.items():
        check_float(f"params[{name!r}]", p)


def _check_grad_dict(grads):
    """A non-empty dict of float arrays (a fresh gradient sum, or what global_norm measures)."""
    if not isinstance(grads, dict) or not grads:
        raise TypeError(f"grads: expected a non-empty dict of arrays, got {type(grads).__name__}")
    for name, g in grads.items():
        check_float(f"grads[{name!r}]", g)


def _check_grads(params: dict, grads, what="grads"):
    """Same keys, shapes, dtypes and array module as params, else a clear error."""
    check_like(what, params, grads)
    for name, p in params.items():
        g = grads[name]
        if g.dtype != p.dtype:
            raise TypeError(f"{what}[{name!r}]: expected dtype {p.dtype} (the parameter's), got {g.dtype}")
        if array_module(g) is not array_module(p):
            raise TypeError(f"{what}[{name!r}]: expected an array on the parameter's device "
                            f"({array_module(p).__name__}), got {array_module(g).__name__}")


class Optimizer:
    """Shared machinery: the params dict, ``lr``, decay groups, step count, state (de)serialisation.

    Subclasses define ``_buffers`` (names of per-parameter state arrays) and
    ``_update(name, p, g, decay)``, which changes ``p`` in place.
    """

    _buffers: tuple = ()
    _hparam_names: tuple = ()

    def __init__(self, params: dict, lr: float, weight_decay: float, no_decay=default_no_decay):
        if not hasattr(self, "_update"):
            raise TypeError("Optimizer is the shared base class: use SGD, Adam or AdamW")
        _check_params(params)
        self.params = params
        self.lr = lr
        self.weight_decay = check_number("weight_decay", weight_decay, 0.0)
        self._no_decay = _decay_predicate(no_decay)
        self.decayed = {name: (self.weight_decay > 0 and not self._no_decay(name)) for name in params}
        self.t = 0  # number of steps taken: Adam's bias correction needs it
        # Buffers start at zero: the first step of every rule below then equals PyTorch's.
        self.state = {b: {name: array_module(p).zeros_like(p) for name, p in params.items()}
                      for b in self._buffers}

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = check_number("lr", value, 0.0)

    def step(self, grads: dict) -> None:
        """Update every parameter in place from ``grads`` (a dict with params' keys and shapes)."""
        _check_grads(self.params, grads)
        self.t += 1
        update = self._update_fast if getattr(self, "fast", False) else self._update
        for name, p in self.params.items():
            update(name, p, grads[name], self.decayed[name])

    def hparams(self) -> dict:
        return {"lr": self.lr, "weight_decay": self.weight_decay,
                **{k: getattr(self, k) for k in self._hparam_names}}

    def state_dict(self) -> dict:
        """A snapshot: {"type", "t", "hparams" (JSON-able), "buffers": {buffer: {name: array copy}}}.

        Copies, so that later steps do not change a snapshot already taken.
        """
        hp = self.hparams()
        if "betas" in hp:
            hp["betas"] = list(hp["betas"])
        return {"type": type(self).__name__, "t": self.t, "hparams": hp,
                "buffers": {b: {n: a.copy() for n, a in bufs.items()} for b, bufs in self.state.items()}}

    def load_state_dict(self, sd: dict) -> None:
        """Restore step count, hyperparameters and buffers from :meth:`state_dict`'s output.

        Buffers are copied into this optimizer's arrays (so they land on the
        parameters' device); names, shapes and the optimizer type must match.
        """
        _check_state_dict(self, sd)
        hp = dict(sd["hparams"])
        self.lr = hp.pop("lr")
        self.weight_decay = check_number("weight_decay", hp.pop("weight_decay"), 0.0)
        for k in self._hparam_names:
            v = hp[k]
            setattr(self, k, tuple(v) if k == "betas" else v)
        self.decayed = {name: (self.weight_decay > 0 and not self._no_decay(name)) for name in self.params}
        self.t = int(sd["t"])
        for b in self._buffers:
            for name, dst in self.state[b].items():
                dst[...] = array_module(dst).asarray(sd["buffers"][b][name])


def _check_state_dict(opt: Optimizer, sd):
    if not isinstance(sd, dict) or not {"type", "t", "hparams", "buffers"} <= set(sd):
        raise ValueError("state_dict: expected a dict with keys type, t, hparams, buffers "
                         f"(from Optimizer.state_dict()), got {sorted(sd) if isinstance(sd, dict) else type(sd).__name__}")
    if sd["type"] != type(opt).__name__:
        raise ValueError(f"state_dict: expected the state of a {type(opt).__name__}, got {sd['type']}")
    if set(sd["buffers"]) != set(opt._buffers):
        raise ValueError(f"state_dict: expected buffers {sorted(opt._buffers)}, got {sorted(sd['buffers'])}")
    for b in opt._buffers:
        _check_loaded(opt.params, sd["buffers"][b], f"state_dict['buffers'][{b!r}]")


def _check_loaded(params, arrays, what):
    if set(arrays) != set(params):
        missing = sorted(set(params) - set(arrays))
        extra = sorted(set(arrays) - set(params))
        raise ValueError(f"{what}: expected the parameters' names, missing {missing}, extra {extra}")
    for name, p in params.items():
        a = arrays[name]
        if tuple(a.shape) != tuple(p.shape):
            raise ValueError(f"{what}[{name!r}]: expected shape {tuple(p.shape)}, got {tuple(a.shape)}")
        if a.dtype != p.dtype:
            raise TypeError(f"{what}[{name!r}]: expected dtype {p.dtype}, got {a.dtype}")


def _check_fast(fast) -> bool:
    if not isinstance(fast, bool):
        raise TypeError(f"fast: expected a bool, got {type(fast).__name__}")
    return fast


def _check_sgd(momentum, nesterov) -> float:
    momentum = check_number("momentum", momentum, 0.0)
    if not isinstance(nesterov, bool):
        raise TypeError(f"nesterov: expected a bool, got {type(nesterov).__name__}")
    if nesterov and momentum == 0:
        raise ValueError("nesterov: Nesterov momentum needs momentum > 0, got momentum=0")
    return momentum


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.

    p -= lr * b with b = momentum * b + g (heavy ball), or p -= lr * (g + momentum * b)
    (Nesterov: look ahead along the momentum). momentum=0 is plain p -= lr * g.
    """

    _hparam_names = ("momentum", "nesterov")

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0,
                 no_decay=default_no_decay):
        self.momentum = _check_sgd(momentum, nesterov)
        self.nesterov = nesterov
        self._buffers = ("momentum_buffer",) if self.momentum > 0 else ()
        super().__init__(params, lr, weight_decay, no_decay)

    def _update(self, name, p, g, decay):
        if decay:
            g = g + self.weight_decay * p  # L2 penalty wd/2 |p|^2 has gradient wd p
        if self.momentum > 0:
            buf = self.state["momentum_buffer"][name]
            buf *= self.momentum
            buf += g
            g = g + self.momentum * buf if self.nesterov else buf
        p -= self.lr * g


class Adam(Optimizer):
    """Adam: per-weight step sizes from running averages of g and g^2, with bias correction.

    weight_decay here is an L2 penalty added to the gradient (PyTorch's Adam); it is
    divided by sqrt(v) like the rest of the gradient, so weights with large gradients
    are barely decayed. AdamW fixes that.
    """

    _buffers = ("exp_avg", "exp_avg_sq")
    _hparam_names = ("betas", "eps")
    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 no_decay=default_no_decay, fast=True):
        self.betas = _check_betas(betas)
        self.eps = check_number("eps", eps, 0.0)
        self.fast = _check_fast(fast)   # step with _update_fast: the same numbers, no fresh temporaries
        self._scratch = {}
        super().__init__(params, lr, weight_decay, no_decay)

    def _update(self, name, p, g, decay):
        xp = array_module(p)
        b1, b2 = self.betas
        if decay:
            if self._decoupled:
                p *= 1.0 - self.lr * self.weight_decay  # shrink towards 0, independent of g
            else:
                g = g + self.weight_decay * p
        m = self.state["exp_avg"][name]
        v = self.state["exp_avg_sq"][name]
        m *= b1
        m += (1.0 - b1) * g
        v *= b2
        v += (1.0 - b2) * (g * g)
        # m and v start at 0, so early on they are biased towards 0 by factors
        # (1 - b^t); dividing those out gives unbiased estimates of E[g] and E[g^2].
        step_size = self.lr / (1.0 - b1 ** self.t)
        denom = xp.sqrt(v) / math.sqrt(1.0 - b2 ** self.t)
        denom += self.eps  # outside the sqrt: a floor on the denominator, not on v
        p -= step_size * (m / denom)

    def _update_fast(self, name, p, g, decay):
        """_update's operations in the same order, so the same numbers bit for bit, but
        every full-size intermediate is written into one scratch buffer per parameter
        that lives across steps: no fresh array (and its page faults) per step."""
        xp = array_module(p)
        self._adam_arrays(xp, p, g, self.state["exp_avg"][name], self.state["exp_avg_sq"][name],
                          self._scratch_for(name, p), decay)

    def _scratch_for(self, name, p):
        s = self._scratch.get(name)
        if s is None:
            s = self._scratch[name] = array_module(p).empty_like(p)
        return s

    def step(self, grads: dict) -> None:
        """Optimizer.step. The fast form on the CPU: every operation of the update is
        elementwise, so all parameters are cut into flat pieces of _ADAM_PIECE elements
        and one backend.parallel_for shares the pieces out among the threads (the same
        numbers as updating each parameter whole)."""
        params = self.params.values()
        if not self.fast or not all(array_module(p) is np and p.flags.c_contiguous for p in params):
            return super().step(grads)
        _check_grads(self.params, grads)
        self.t += 1
        flat, pieces = {}, []
        for name, p in self.params.items():
            arrays = (p, np.ascontiguousarray(grads[name]), self.state["exp_avg"][name],
                      self.state["exp_avg_sq"][name], self._scratch_for(name, p))
            flat[name] = [a.reshape(-1) for a in arrays]                      # views: p is contiguous
            pieces += [(name, slice(i, i + _ADAM_PIECE)) for i in range(0, p.size, _ADAM_PIECE)]

        def run(lo, hi):
            for name, piece in pieces[lo:hi]:
                self._adam_arrays(np, *(a[piece] for a in flat[name]), self.decayed[name])
        parallel_for(run, len(pieces))

    def _adam_arrays(self, xp, p, g, m, v, s, decay):
        """The update of _update_fast on arrays (or matching slices) p, g, m, v and scratch s."""
        b1, b2 = self.betas
        if decay:
            if self._decoupled:
                p *= 1.0 - self.lr * self.weight_decay
            else:
                g = g + self.weight_decay * p
        m *= b1
        xp.multiply(g, 1.0 - b1, out=s)
        m += s                                   # m = b1 m + (1 - b1) g
        v *= b2
        xp.multiply(g, g, out=s)
        s *= 1.0 - b2
        v += s                                   # v = b2 v + (1 - b2) g^2
        step_size = self.lr / (1.0 - b1 ** self.t)
        xp.sqrt(v, out=s)
        s /= math.sqrt(1.0 - b2 ** self.t)
        s += self.eps                            # s = denom
        xp.divide(m, s, out=s)
        s *= step_size
        p -= s


_ADAM_PIECE = 1 << 20     # elements per piece of the threaded update (4 MB of float32: most parameters whole)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p *= 1 - lr * wd, then Adam's step.

    Every decayed weight shrinks by the same factor whatever its gradient history,
    which is what 'weight decay' was meant to do. Default wd = 0.01 as in PyTorch.
    """

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 no_decay=default_no_decay, fast=True):
        super().__init__(params, lr, betas, eps, weight_decay, no_decay, fast)


_OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def _check_optimizer_name(name):
    if str(name).lower() not in _OPTIMIZERS:
        raise ValueError(f"name: expected one of {sorted(_OPTIMIZERS)}, got {name!r}")


def make_optimizer(name: str, params: dict, lr: float, weight_decay: float = 0.0,
                   betas=(0.9, 0.999), eps=1e-8, momentum=0.0, nesterov=False,
                   no_decay=default_no_decay) -> Optimizer:
    """Build an optimizer by name ("sgd", "adam", "adamw"); arguments that do not apply are ignored."""
    _check_optimizer_name(name)
    key = str(name).lower()
    if key == "sgd":
        return SGD(params, lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                   no_decay=no_decay)
    return _OPTIMIZERS[key](params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                            no_decay=no_decay)


# ---------------------------------------------------------------------------
# Gradient clipping
# ---------------------------------------------------------------------------

def global_norm(grads: dict) -> float:
    """sqrt(sum over every array of sum(g^2)): the length of all gradients as one vector."""
    _check_grad_dict(grads)
    xp = array_module(*grads.values())
    # Accumulate in float64 so a float32 model's norm does not lose digits (without
    # a float64 copy of each array), and sum on the device first: one transfer
    # instead of one per array.
    sq = xp.stack([xp.sum(xp.square(g), dtype=xp.float64) for g in grads.values()])
    return float(math.sqrt(float(xp.sum(sq))))


def clip_grad_norm(grads: dict, max_norm: float) -> float:
    """Scale all gradients in place by min(1, max_norm / total_norm); return total_norm (before).

    One global factor keeps the update's direction and only shortens it, so a rare
    huge gradient (a loss spike) cannot throw the weights far. Like PyTorch we
    divide by total_norm + 1e-6, so the clipped norm ends just below max_norm. A
    non-finite norm is returned as is and the gradients are left alone (the
    training loop refuses non-finite losses before this matters).
    """
    max_norm = check_number("max_norm", max_norm, 0.0, lo_open=True)
    total = global_norm(grads)
    if math.isfinite(total) and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in grads.values():
            g *= scale
    return total


# ---------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------

def _check_lr_schedule(step, max_lr, warmup_steps, max_steps, min_lr):
    """-> (step, max_lr, min_lr) as floats, after checking every argument."""
    step = check_number("step", step, 0.0)
    max_lr = check_number("max_lr", max_lr, 0.0)
    min_lr = check_number("min_lr", min_lr, 0.0, max_lr)
    if not is_int(warmup_steps) or warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected an int >= 0, got {warmup_steps!r}")
    if not is_int(max_steps) or max_steps < warmup_steps:
        raise ValueError(f"max_steps: expected an int >= warmup_steps ({warmup_steps}), got {max_steps!r}")
    return step, max_lr, min_lr


def lr_schedule(step, max_lr, warmup_steps, max_steps, min_lr=0.0) -> float:
    """Linear warmup to max_lr, then cosine decay to min_lr at max_steps, then min_lr.

    warmup (step < warmup_steps):  max_lr * (step + 1) / (warmup_steps + 1)
    decay  (up to max_steps):      min_lr + (max_lr - min_lr) * (1 + cos(pi * r)) / 2,
                                   r = (step - warmup_steps) / (max_steps - warmup_steps)
    The warmup ends exactly at max_lr when step reaches warmup_steps, so the
    schedule is continuous, and step 0 already gets a small non-zero rate (a
    zero first step would waste a batch). Warmup matters for Adam: its first
    steps move every weight by about lr, whatever the gradient's size.
    ``step`` may be fractional; the result is a Python float. Example, with
    max_lr 1e-3, warmup_steps 9, max_steps 100, min_lr 0: step 0 -> 1e-4 (the
    first of ten warmup steps), step 9 -> 1e-3, step 54.5 -> 5e-4, step 100 -> 0.
    """
    step, max_lr, min_lr = _check_lr_schedule(step, max_lr, warmup_steps, max_steps, min_lr)
    if step < warmup_steps:
        return max_lr * (step + 1.0) / (warmup_steps + 1.0)
    if step >= max_steps:
        return min_lr
    r = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * r))


# ---------------------------------------------------------------------------
# Gradient accumulation
# ---------------------------------------------------------------------------

def _check_accumulate(acc, grads, scale) -> float:
    scale = check_number("scale", scale)
    if acc is None:
        _check_grad_dict(grads)
    else:
        _check_grads(acc, grads)
    return scale


def accumulate(acc, grads: dict, scale: float = 1.0) -> dict:
    """acc += scale * grads, key by key; ``acc=None`` starts a new sum (a copy).

    Gradient accumulation: a batch too big for memory is split into k
    micro-batches; summing each micro-batch's gradient times 1/k gives the
    gradient of the mean loss over the whole batch, the same update a single big
    batch would give. Returns ``acc``.
    """
    scale = _check_accumulate(acc, grads, scale)
    if acc is None:
        return {name: g * g.dtype.type(scale) if scale != 1.0 else g.copy() for name, g in grads.items()}
    for name, g in grads.items():
        if scale == 1.0:
            acc[name] += g
        else:
            acc[name] += g * g.dtype.type(scale)
    return acc
