"""Turning logits into text: logits processors, sampling, generation with a KV
cache, beam search, and speculative decoding.

A language model gives, for every position, a vector of V logits: unnormalised
log-probabilities of the next token. Generation is a loop: run the model, shape
the last position's logits (the *processors* below), pick a token (greedy argmax
or a random draw), append it, repeat. Everything here is plain functions over
arrays plus that loop; nothing is learned and there is no backward pass.

The decoder protocol
--------------------
The loops never import a model (concepts never import models). They drive any
object with these members (``gpt.GPTDecoder`` is one; the tests use toy ones)::

    vocab_size: int                        # V
    block_size: int                        # the longest context the model accepts
    new_cache(batch_size, max_len)         # -> a fresh KV cache object, or None if
                                           #    the model keeps no cache
    logits(ids, cache=None, attention_mask=None) -> (B, T, V) float array
        ids: (B, T) int block of tokens. Without a cache, ids is the whole
        sequence. With a cache, the model attends over everything already
        cached plus this block, then appends this block's keys/values to it.
        attention_mask: (B, T_cached + T) bool, False at left padding: pad keys
        must get no attention, and a row's position ids are
        cumsum(attention_mask) - 1 (so a left-padded row starts at position 0).

    Optional members, used when present:
    xp                                     # array module for ids (default:
                                           #    backend.xp_default(), MINILLM_DEVICE)
    crop_cache(cache, length)              # keep only the first `length` cached
                                           #    positions (speculative decoding
                                           #    rolls back rejected draft tokens)
    reorder_cache(cache, index)            # cache rows <- rows[index] (beam search
                                           #    keeps the surviving beams)

Without those two methods, a cache object's own ``crop(length)`` and
``reorder(index)`` are used (``attention.KVCache`` has both). If neither
exists, speculative decoding (beam search) still works: it then re-runs the
whole sequence at every step instead of using a cache.

Output convention: every loop returns Python lists of token ids holding the
prompt followed by the new tokens (as Hugging Face's generate does). A stopping
token (``eos_id``) or stop sequence is included at the end.

Processor order (Hugging Face's ``generate`` order): repetition penalty, then
frequency/presence penalties (OpenAI's; not in Hugging Face), then temperature,
top-k, top-p, min-p. A removed token gets logit -inf; no processor ever removes
every token (the most likely token always survives).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .backend import array_module, check_array, check_float, make_rng, to_numpy, xp_default

__all__ = [
    "apply_temperature", "top_k_filter", "top_p_filter", "min_p_filter",
    "repetition_penalty", "frequency_penalty", "presence_penalty", "token_counts",
    "process_logits", "greedy", "sample", "generate", "beam_search",
    "speculative_generate", "SpeculativeStats",
]


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------

def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _check_logits(logits) -> None:
    check_float("logits", logits)
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits: expected shape (..., V) with V >= 1, got {tuple(logits.shape)}")


def _check_temperature(temperature, allow_zero: bool) -> None:
    if not _is_number(temperature) or not np.isfinite(temperature) or temperature < 0 \
            or (temperature == 0 and not allow_zero):
        want = "a number >= 0 (0 means greedy)" if allow_zero else "a number > 0"
        raise ValueError(f"temperature: expected {want}, got {temperature!r}")


def _check_top_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"top_k: expected an integer >= 1, got {k!r}")


def _check_top_p(p) -> None:
    if not _is_number(p) or not (0.0 < p <= 1.0):
        raise ValueError(f"top_p: expected a number in (0, 1], got {p!r}")


def _check_min_p(p) -> None:
    if not _is_number(p) or not (0.0 <= p <= 1.0):
        raise ValueError(f"min_p: expected a number in [0, 1], got {p!r}")


def _check_penalty(name, value, positive: bool) -> None:
    ok = _is_number(value) and np.isfinite(value) and (value > 0 if positive else True)
    if not ok:
        want = "a positive number" if positive else "a finite number"
        raise ValueError(f"{name}: expected {want}, got {value!r}")


def _removed(logits, remove):
    """A copy of logits with the entries where ``remove`` is True set to -inf."""
    out = logits.copy()
    out[remove] = -np.inf
    return out


def _softmax(logits):
    """Probabilities over the last axis; -inf entries get exactly 0."""
    xp = array_module(logits)
    z = logits - xp.max(logits, axis=-1, keepdims=True)
    e = xp.exp(z)
    return e / xp.sum(e, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------
# Logits processors: (..., V) logits in, same shape and dtype out
# ---------------------------------------------------------------------------

def apply_temperature(logits, temperature):
    """logits / temperature. T < 1 sharpens the distribution, T > 1 flattens it;
    as T -> 0 softmax(logits / T) tends to a one-hot on the argmax (greedy).
    logits: (..., V); temperature > 0 -> (..., V)
    """
    _check_logits(logits)
    _check_temperature(temperature, allow_zero=False)
    return logits / logits.dtype.type(temperature)


def top_k_filter(logits, k):
    """Keep the k largest logits per row, set the rest to -inf.

    Tokens tied with the k-th largest value are all kept (as Hugging Face's
    TopKLogitsWarper does), so a row may keep more than k on exact ties.
    k >= V keeps everything. logits: (..., V); k >= 1 -> (..., V)
    """
    _check_logits(logits)
    _check_top_k(k)
    V = logits.shape[-1]
    if k >= V:
        return logits.copy()
    xp = array_module(logits)
    # partition puts the k-th largest at index V - k without a full sort.
    kth = xp.partition(logits, V - k, axis=-1)[..., V - k:V - k + 1]
    return _removed(logits, logits < kth)


def top_p_filter(logits, p):
    """Nucleus filtering: keep the smallest set of most likely tokens whose
    total probability reaches p; remove the rest.

    Sorting probabilities in decreasing order, token i (in that order) is kept
    iff the mass of the tokens before it is < p, so the most likely token is
    always kept and p = 1 keeps every token.
    Exact ties are broken by sort order (the kept count is always minimal).
    logits: (..., V); p in (0, 1] -> (..., V)
    """
    _check_logits(logits)
    _check_top_p(p)
    if p >= 1.0:
        return logits.copy()          # all the mass: keep every token (no rounding at the tail)
    xp = array_module(logits)
    order = xp.argsort(-logits, axis=-1, kind="stable") if xp is np else xp.argsort(-logits, axis=-1)
    sorted_logits = xp.take_along_axis(logits, order, axis=-1)
    probs = _softmax(sorted_logits.astype(np.float64))   # float64: a long cumsum stays accurate
    mass_before = xp.cumsum(probs, axis=-1) - probs
    n_keep = xp.sum(mass_before < p, axis=-1, keepdims=True)        # >= 1: mass_before[0] = 0 < p
    rank = xp.argsort(order, axis=-1)                                # where each token sits in `order`
    return _removed(logits, rank >= n_keep)


def min_p_filter(logits, min_p):
    """Keep tokens whose probability is at least min_p times the top token's.

    The cut-off scales with the model's confidence: a peaked distribution keeps
    few tokens, a flat one many. The top token always survives; min_p = 0 keeps
    everything. logits: (..., V); min_p in [0, 1] -> (..., V)
    """
    _check_logits(logits)
    _check_min_p(min_p)
    probs = _softmax(logits)
    xp = array_module(logits)
    return _removed(logits, probs < min_p * xp.max(probs, axis=-1, keepdims=True))


def token_counts(prev_ids, vocab_size, mask=None, xp=None):
    """How often each token occurs in each row of prev_ids.

    prev_ids: (..., T) int ids in [0, vocab_size); mask: (..., T) bool or None
    (False entries, e.g. left padding, are not counted) -> (..., V) float counts
    """
    check_array("prev_ids", prev_ids)
    if prev_ids.dtype.kind not in "iu":
        raise TypeError(f"prev_ids: expected an integer array, got dtype {prev_ids.dtype}")
    if prev_ids.ndim < 1:
        raise ValueError(f"prev_ids: expected shape (..., T), got {tuple(prev_ids.shape)}")
    xp = xp or array_module(prev_ids)
    lead, T = tuple(prev_ids.shape[:-1]), prev_ids.shape[-1]
    n = int(np.prod(lead)) if lead else 1
    ids = prev_ids.reshape(n, T)
    if mask is not None:
        check_array("mask", mask)
        if tuple(mask.shape) != tuple(prev_ids.shape):
            raise ValueError(f"mask: expected shape {tuple(prev_ids.shape)} (prev_ids' shape), "
                             f"got {tuple(mask.shape)}")
        weights = mask.reshape(n, T).astype(np.float64)
    else:
        weights = xp.ones((n, T), dtype=np.float64)
    if ids.size:
        lo, hi = int(xp.min(ids)), int(xp.max(ids))
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"prev_ids: expected ids in [0, {vocab_size}), got {lo if lo < 0 else hi}")
    # One bincount over row * V + id counts every row at once.
    flat = (xp.arange(n)[:, None] * vocab_size + ids).reshape(-1)
    counts = xp.bincount(flat, weights=weights.reshape(-1), minlength=n * vocab_size)
    return counts.reshape(lead + (vocab_size,))


def _counts_for(logits, prev_ids, mask):
    if prev_ids.shape[:-1] != logits.shape[:-1]:
        raise ValueError(f"prev_ids: expected shape {tuple(logits.shape[:-1]) + ('T',)} "
                         f"(logits' leading axes, then T), got {tuple(prev_ids.shape)}")
    return token_counts(prev_ids, logits.shape[-1], mask, xp=array_module(logits))


def _repetition_from_counts(logits, counts, penalty):
    # CTRL (Keskar et al. 2019): dividing a positive logit and multiplying a negative
    # one both lower the token's probability when penalty > 1.
    seen = counts > 0
    xp = array_module(logits)
    pen = logits.dtype.type(penalty)
    return xp.where(seen, xp.where(logits > 0, logits / pen, logits * pen), logits)


def repetition_penalty(logits, prev_ids, penalty, mask=None):
    """CTRL's repetition penalty: for every token already in prev_ids, a positive
    logit is divided by ``penalty`` and a negative one multiplied by it (once per
    token, however often it occurred). penalty > 1 discourages repeats, 1 is the
    identity, < 1 encourages them.
    logits: (..., V); prev_ids: (..., T) int; mask: (..., T) bool or None -> (..., V)
    """
    _check_logits(logits)
    _check_penalty("penalty", penalty, positive=True)
    return _repetition_from_counts(logits, _counts_for(logits, prev_ids, mask), penalty)


def frequency_penalty(logits, prev_ids, penalty, mask=None):
    """OpenAI's frequency penalty: logit[v] -= penalty * count(v in prev_ids).
    The more often a token was used, the stronger the push away from it.
    logits: (..., V); prev_ids: (..., T) int -> (..., V)
    """
    _check_logits(logits)
    _check_penalty("penalty", penalty, positive=False)
    counts = _counts_for(logits, prev_ids, mask)
    return logits - (penalty * counts).astype(logits.dtype)


def presence_penalty(logits, prev_ids, penalty, mask=None):
    """OpenAI's presence penalty: logit[v] -= penalty if v occurs in prev_ids at all.
    A flat nudge towards new tokens, whatever their count.
    logits: (..., V); prev_ids: (..., T) int -> (..., V)
    """
    _check_logits(logits)
    _check_penalty("penalty", penalty, positive=False)
    counts = _counts_for(logits, prev_ids, mask)
    return logits - (penalty * (counts > 0)).astype(logits.dtype)


class _Settings(NamedTuple):
    """The processing options of one generation call, checked once."""
    temperature: float
    top_k: object
    top_p: object
    min_p: object
    repetition_penalty: object
    frequency_penalty: float
    presence_penalty: float


def _settings(temperature, top_k, top_p, min_p, repetition_penalty_, frequency_penalty_,
              presence_penalty_) -> _Settings:
    _check_temperature(temperature, allow_zero=True)
    if top_k is not None:
        _check_top_k(top_k)
    if top_p is not None:
        _check_top_p(top_p)
    if min_p is not None:
        _check_min_p(min_p)
    if repetition_penalty_ is not None:
        _check_penalty("repetition_penalty", repetition_penalty_, positive=True)
    _check_penalty("frequency_penalty", frequency_penalty_, positive=False)
    _check_penalty("presence_penalty", presence_penalty_, positive=False)
    return _Settings(float(temperature), top_k, top_p, min_p, repetition_penalty_,
                     float(frequency_penalty_), float(presence_penalty_))


def _process(logits, s: _Settings, counts_seen=None, counts_generated=None):
    """Apply the processors in Hugging Face's order. counts_seen (prompt and
    generated tokens) drives the repetition penalty; counts_generated (new tokens
    only, as OpenAI and vLLM do) drives the frequency and presence penalties."""
    if s.repetition_penalty is not None and s.repetition_penalty != 1.0 and counts_seen is not None:
        logits = _repetition_from_counts(logits, counts_seen, s.repetition_penalty)
    if counts_generated is not None and (s.frequency_penalty or s.presence_penalty):
        pen = s.frequency_penalty * counts_generated + s.presence_penalty * (counts_generated > 0)
        logits = logits - pen.astype(logits.dtype)
    if s.temperature > 0 and s.temperature != 1.0:
        logits = apply_temperature(logits, s.temperature)
    if s.top_k is not None:
        logits = top_k_filter(logits, s.top_k)
    if s.top_p is not None and s.top_p < 1.0:
        logits = top_p_filter(logits, s.top_p)
    if s.min_p is not None and s.min_p > 0:
        logits = min_p_filter(logits, s.min_p)
    return logits


def process_logits(logits, prev_ids=None, *, temperature=1.0, top_k=None, top_p=None, min_p=None,
                   repetition_penalty=None, frequency_penalty=0.0, presence_penalty=0.0,
                   prev_mask=None):
    """All the processors composed in Hugging Face's order: repetition penalty,
    frequency and presence penalties, temperature, top-k, top-p, min-p.

    Here every penalty looks at all of prev_ids; ``generate`` applies the
    repetition penalty to prompt + generated tokens and the frequency/presence
    penalties to the generated tokens only. temperature 0 skips the temperature
    step (greedy decoding takes the argmax afterwards).
    logits: (..., V); prev_ids: (..., T) int or None -> (..., V)
    """
    _check_logits(logits)
    s = _settings(temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty,
                  presence_penalty)
    counts = None
    if prev_ids is not None:
        counts = _counts_for(logits, prev_ids, prev_mask)
    return _process(logits, s, counts, counts)


# ---------------------------------------------------------------------------
# Picking a token
# ---------------------------------------------------------------------------

def _check_some_token_left(logits) -> None:
    xp = array_module(logits)
    alive = xp.any(logits > -np.inf, axis=-1)
    if not bool(xp.all(alive)):
        row = int(np.argmin(to_numpy(alive).reshape(-1)))
        raise ValueError(f"logits: row {row} has every token removed (all -inf or NaN)")


def greedy(logits):
    """The most likely token: argmax over the last axis. logits: (..., V) -> (...) int64"""
    _check_logits(logits)
    _check_some_token_left(logits)
    xp = array_module(logits)
    return xp.argmax(logits, axis=-1).astype(np.int64)


def _inverse_cdf(probs, u):
    """Index i with cdf[i-1] <= u * total < cdf[i]: a draw from probs (rows).

    probs: (N, V) >= 0 on any device; u: (N,) uniforms in [0, 1) on the same
    device. A zero-probability token is never picked: its cdf step is empty.
    """
    xp = array_module(probs)
    cdf = xp.cumsum(probs.astype(np.float64), axis=-1)
    target = u[:, None] * cdf[:, -1:]
    idx = xp.sum(cdf <= target, axis=-1)
    # Guard against rounding (u * total landing on total): fall back to the last
    # token with non-zero probability, never to a removed one.
    V = probs.shape[-1]
    last_alive = V - 1 - xp.argmax(probs[:, ::-1] > 0, axis=-1)
    return xp.minimum(idx, last_alive).astype(np.int64)


def sample(logits, rng=None):
    """One random token per row from softmax(logits).

    The uniforms come from ``rng`` (a NumPy Generator or an int seed) on the CPU
    and are moved to the logits' device, so a seed gives the same tokens on NumPy
    and CuPy (up to floating-point ties). Removed (-inf) tokens are never drawn.
    logits: (..., V) -> (...) int64 on the logits' device
    """
    _check_logits(logits)
    _check_some_token_left(logits)
    rng = make_rng(rng)
    xp = array_module(logits)
    lead, V = tuple(logits.shape[:-1]), logits.shape[-1]
    flat = logits.reshape(-1, V)
    u = xp.asarray(rng.random(flat.shape[0]))
    return _inverse_cdf(_softmax(flat), u).reshape(lead)


# ---------------------------------------------------------------------------
# Driving a decoder: prompts, padding, the cache
# ---------------------------------------------------------------------------

def _check_decoder(decoder, name="decoder") -> None:
    for attr in ("vocab_size", "block_size", "new_cache", "logits"):
        if not hasattr(decoder, attr):
            raise TypeError(f"{name}: expected an object with vocab_size, block_size, new_cache() "
                            f"and logits() (see minillm.sampling), got {type(decoder).__name__} "
                            f"without {attr!r}")


def _can(decoder, cache, method, cache_method):
    return cache is not None and (hasattr(decoder, method) or hasattr(cache, cache_method))


def _reorder_cache(decoder, cache, index):
    if hasattr(decoder, "reorder_cache"):
        decoder.reorder_cache(cache, index)
    else:
        cache.reorder(index)


def _crop_cache(decoder, cache, length):
    if hasattr(decoder, "crop_cache"):
        decoder.crop_cache(cache, length)
    else:
        cache.crop(length)


def _decoder_xp(decoder):
    xp = getattr(decoder, "xp", None)
    return xp if xp is not None else xp_default()


def _as_prompts(prompt_ids, vocab_size, block_size, name="prompt_ids"):
    """A list of non-empty lists of ints, checked against the vocabulary and the context."""
    if hasattr(prompt_ids, "tolist") and not isinstance(prompt_ids, list):
        prompt_ids = to_numpy(prompt_ids).tolist()
    if not isinstance(prompt_ids, (list, tuple)) or len(prompt_ids) == 0:
        raise ValueError(f"{name}: expected a non-empty list of token ids or a list of such lists, "
                         f"got {prompt_ids!r}")
    nested = [isinstance(r, (list, tuple)) for r in prompt_ids]
    if any(nested) and not all(nested):
        raise TypeError(f"{name}: expected a list of ints or a list of lists of ints, got a mix")
    rows = [list(r) for r in prompt_ids] if nested[0] else [list(prompt_ids)]
    for i, r in enumerate(rows):
        if len(r) == 0:
            raise ValueError(f"{name}: prompt {i} is empty; a prompt needs at least one token")
        for t in r:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise TypeError(f"{name}: expected integer token ids, got {t!r} in prompt {i}")
            if not 0 <= t < vocab_size:
                raise ValueError(f"{name}: expected ids in [0, {vocab_size}), got {t} in prompt {i}")
        if len(r) > block_size:
            raise ValueError(f"{name}: prompt {i} has {len(r)} tokens, longer than the model's "
                             f"context (block_size={block_size})")
    return [[int(t) for t in r] for r in rows]


def _check_max_new_tokens(n) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"max_new_tokens: expected an integer >= 0, got {n!r}")


def _as_stop(stop, vocab_size):
    """Stop sequences as a list of non-empty tuples of ints (a flat list is one sequence)."""
    if stop is None:
        return []
    if not isinstance(stop, (list, tuple)) or len(stop) == 0:
        raise ValueError(f"stop: expected a list of token-id sequences (or one sequence), got {stop!r}")
    seqs = [stop] if not isinstance(stop[0], (list, tuple)) else list(stop)
    out = []
    for s in seqs:
        if len(s) == 0 or any(isinstance(t, bool) or not isinstance(t, (int, np.integer))
                              or not 0 <= t < vocab_size for t in s):
            raise ValueError(f"stop: expected non-empty sequences of ids in [0, {vocab_size}), got {s!r}")
        out.append(tuple(int(t) for t in s))
    return out


class _Context:
    """The growing, left-padded batch of sequences and the model calls on it.

    Keeps ids and mask on the host (tiny), ships the block the model needs to the
    device at each call. With a cache, only the tokens not yet cached are fed;
    when the sequence would outgrow the model's context, the cache is dropped and
    every later step re-runs the last block_size tokens (a sliding window), which
    is exactly what the cache-free path does, so both give the same output.
    """

    def __init__(self, decoder, rows, extra_tokens, use_cache, need_reorder=False):
        self.decoder = decoder
        self.xp = _decoder_xp(decoder)
        self.block = int(decoder.block_size)
        L = max(len(r) for r in rows)
        self.ids = np.zeros((len(rows), L), dtype=np.int64)
        self.mask = np.zeros((len(rows), L), dtype=bool)
        for i, r in enumerate(rows):      # left padding: real tokens end at the right edge
            self.ids[i, L - len(r):] = r
            self.mask[i, L - len(r):] = True
        self.cache = None
        self.cached = 0                   # columns of ids already in the cache
        if use_cache:
            # The last token is never fed, so L + extra - 1 positions are ever needed.
            max_len = min(self.block, L + max(extra_tokens, 1) - 1)
            self.cache = decoder.new_cache(len(rows), max(max_len, L))
            if need_reorder and not _can(decoder, self.cache, "reorder_cache", "reorder"):
                self.cache = None         # cannot follow the beams: re-run sequences instead
        self.model_calls = 0

    @property
    def length(self):
        return self.ids.shape[1]

    def append(self, tokens):
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        self.ids = np.concatenate([self.ids, tokens], axis=1)
        self.mask = np.concatenate([self.mask, np.ones_like(tokens, dtype=bool)], axis=1)

    def reorder(self, index):
        index = np.asarray(index, dtype=np.int64)
        self.ids, self.mask = self.ids[index], self.mask[index]
        if self.cache is not None:
            _reorder_cache(self.decoder, self.cache, self.xp.asarray(index))

    def _call(self, ids, mask, cache):
        xp = self.xp
        out = self.decoder.logits(xp.asarray(ids), cache=cache, attention_mask=xp.asarray(mask))
        self.model_calls += 1
        B, T = ids.shape
        if getattr(out, "ndim", None) != 3 or tuple(out.shape[:2]) != (B, T):
            raise ValueError(f"decoder.logits: expected shape ({B}, {T}, V), "
                             f"got {tuple(getattr(out, 'shape', ()))}")
        return out

    def next_logits(self):
        """(B, V) logits for the token after the current sequences."""
        if self.cache is not None and self.length > self.block:
            self.cache = None             # out of context: slide the window from now on
        if self.cache is not None:
            out = self._call(self.ids[:, self.cached:], self.mask, self.cache)
            self.cached = self.length
        else:
            lo = max(0, self.length - self.block)
            out = self._call(self.ids[:, lo:], self.mask[:, lo:], None)
        return out[:, -1, :]


def generate(decoder, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             min_p=None, repetition_penalty=None, frequency_penalty=0.0, presence_penalty=0.0,
             eos_id=None, stop=None, use_cache=True, seed=None, rng=None):
    """Autoregressive generation: prefill the prompt, then one token at a time.

    prompt_ids: a list of ints (one prompt) or a list of lists (a batch of any
    lengths, left-padded internally with an attention mask). temperature 0 is
    greedy decoding; otherwise tokens are drawn from the processed distribution
    with ``rng`` (or a Generator made from ``seed``): the same seed, prompts and
    settings give the same output. A row stops after ``eos_id`` or after any of
    the ``stop`` sequences (lists of ids; both included in the output), or after
    max_new_tokens new tokens; the loop ends when every row has stopped.
    With use_cache=False every step re-runs the whole (cropped) sequence: the same
    tokens, much slower, which is the point of the KV cache.
    -> list of lists of ids: each prompt followed by its new tokens
    """
    _check_decoder(decoder)
    V = int(decoder.vocab_size)
    rows = _as_prompts(prompt_ids, V, int(decoder.block_size))
    _check_max_new_tokens(max_new_tokens)
    s = _settings(temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty,
                  presence_penalty)
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, (int, np.integer))
                               or not 0 <= eos_id < V):
        raise ValueError(f"eos_id: expected None or an id in [0, {V}), got {eos_id!r}")
    stops = _as_stop(stop, V)
    if rng is not None and seed is not None:
        raise ValueError("seed: give either seed or rng, not both")
    rng = make_rng(rng if rng is not None else seed)
    out = [list(r) for r in rows]
    if max_new_tokens == 0:
        return out

    ctx = _Context(decoder, rows, max_new_tokens, use_cache)
    xp = ctx.xp
    B = len(rows)
    want_rep = s.repetition_penalty is not None and s.repetition_penalty != 1.0
    want_freq = bool(s.frequency_penalty or s.presence_penalty)
    seen = token_counts(xp.asarray(ctx.ids), V, xp.asarray(ctx.mask), xp=xp) if want_rep else None
    made = xp.zeros((B, V), dtype=np.float64) if want_freq else None
    done = np.zeros(B, dtype=bool)
    rows_idx = xp.arange(B)
    for step in range(max_new_tokens):
        logits = _process(ctx.next_logits(), s, seen, made)
        tok = greedy(logits) if s.temperature == 0 else sample(logits, rng)
        tok_host = to_numpy(tok)
        for i in range(B):
            if done[i]:
                continue
            t = int(tok_host[i])
            out[i].append(t)
            if (eos_id is not None and t == eos_id) or \
                    any(len(out[i]) >= len(q) and tuple(out[i][-len(q):]) == q for q in stops):
                done[i] = True
        if done.all() or step == max_new_tokens - 1:
            break
        # Finished rows keep running (a batch moves in lockstep); their tokens are discarded.
        if seen is not None:
            seen[rows_idx, tok] += 1
        if made is not None:
            made[rows_idx, tok] += 1
        ctx.append(tok_host)
    return out


# ---------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------

def _log_softmax_host(logits):
    x = to_numpy(logits).astype(np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def beam_search(decoder, prompt_ids, max_new_tokens, num_beams=4, length_penalty=1.0, eos_id=None,
                use_cache=True, return_scores=False):
    """Keep the ``num_beams`` most likely partial continuations at every step.

    Each step extends every beam by every token, scores candidates by their total
    log-probability and keeps the best num_beams that do not end in eos_id; a
    candidate ending in eos_id becomes a finished hypothesis scored
    sum_logprob / n_new ** length_penalty (Hugging Face's rule: length_penalty > 0
    favours longer outputs, < 0 shorter ones). The search stops at
    max_new_tokens, or once num_beams hypotheses are finished and no running beam
    can beat the worst of them (Hugging Face's default heuristic). Beams still
    running at the end are scored the same way. Prompts of a batch are searched
    one after another. num_beams=1 is greedy decoding.
    -> list of lists of ids (each prompt + its best continuation);
       with return_scores, also the list of their scores
    """
    _check_decoder(decoder)
    V = int(decoder.vocab_size)
    rows = _as_prompts(prompt_ids, V, int(decoder.block_size))
    _check_max_new_tokens(max_new_tokens)
    if isinstance(num_beams, bool) or not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
        raise ValueError(f"num_beams: expected an integer >= 1, got {num_beams!r}")
    _check_penalty("length_penalty", length_penalty, positive=False)
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, (int, np.integer))
                               or not 0 <= eos_id < V):
        raise ValueError(f"eos_id: expected None or an id in [0, {V}), got {eos_id!r}")
    results, scores = [], []
    for prompt in rows:
        seq, score = _beam_one(decoder, prompt, max_new_tokens, int(num_beams), float(length_penalty),
                               eos_id, use_cache)
        results.append(seq)
        scores.append(score)
    return (results, scores) if return_scores else results


def _beam_one(decoder, prompt, max_new_tokens, nb, lp, eos_id, use_cache):
    if max_new_tokens == 0:
        return list(prompt), 0.0
    ctx = _Context(decoder, [prompt] * nb, max_new_tokens, use_cache, need_reorder=True)
    # Only beam 0 is live at the start: identical beams would otherwise fill the
    # first step with nb copies of the same candidate.
    beam_scores = np.full(nb, -np.inf)
    beam_scores[0] = 0.0
    finished = []   # (normalised score, token list)

    def worst_finished():
        return min(f[0] for f in finished)

    for step in range(max_new_tokens):
        n_new = step + 1
        cand = (beam_scores[:, None] + _log_softmax_host(ctx.next_logits())).reshape(-1)
        n_cand = min(2 * nb, cand.size)
        top = np.argpartition(-cand, n_cand - 1)[:n_cand]
        top = top[np.argsort(-cand[top], kind="stable")]
        keep_beam, keep_tok, keep_score = [], [], []
        for rank, flat in enumerate(top):
            sc = cand[flat]
            if sc == -np.inf:
                break
            b, t = divmod(int(flat), cand.size // nb)
            if eos_id is not None and t == eos_id:
                # An eos candidate outside the best nb would not have survived as a beam.
                if rank < nb:
                    hyp = ctx.ids[b, len(prompt):].tolist() + [t]
                    finished.append((sc / n_new ** lp, hyp))
                    finished.sort(key=lambda f: -f[0])
                    del finished[nb:]
                continue
            keep_beam.append(b)
            keep_tok.append(t)
            keep_score.append(sc)
            if len(keep_beam) == nb:
                break
        if not keep_beam:
            beam_scores[:] = -np.inf
            break
        while len(keep_beam) < nb:          # too few live candidates: pad with dead beams
            keep_beam.append(keep_beam[0])
            keep_tok.append(keep_tok[0])
            keep_score.append(-np.inf)
        beam_scores = np.asarray(keep_score)
        ctx.reorder(keep_beam)
        ctx.append(keep_tok)
        if len(finished) >= nb and beam_scores.max() / n_new ** lp <= worst_finished():
            break
        if step == max_new_tokens - 1:
            break
    n_new = ctx.length - len(prompt)
    for b in range(nb):
        if beam_scores[b] > -np.inf:
            finished.append((beam_scores[b] / n_new ** lp, ctx.ids[b].tolist()[len(prompt):]))
    best = max(finished, key=lambda f: f[0])
    return list(prompt) + [int(t) for t in best[1]], float(best[0])


# ---------------------------------------------------------------------------
# Speculative decoding
# ---------------------------------------------------------------------------

class SpeculativeStats(NamedTuple):
    new_tokens: int          # tokens produced
    proposed: int            # draft tokens proposed
    accepted: int            # draft tokens accepted
    acceptance_rate: float   # accepted / proposed
    target_calls: int        # forward calls of the target (the expensive model)
    draft_calls: int         # forward calls of the draft
    tokens_per_target_call: float
    used_cache: tuple        # (target, draft): whether each ran with a KV cache


class _Runner:
    """One model's view of a single growing sequence, with an optional cache that
    can be rolled back (crop_cache) after rejected draft tokens."""

    def __init__(self, decoder, max_len, use_cache):
        self.decoder = decoder
        self.xp = _decoder_xp(decoder)
        self.cache = None
        if use_cache:
            self.cache = decoder.new_cache(1, max_len)
            if not _can(decoder, self.cache, "crop_cache", "crop"):
                self.cache = None         # cannot roll back: re-run the sequence instead
        self.fed = 0        # tokens of the sequence already in the cache
        self.calls = 0

    def logits(self, seq):
        """(T, V) logits for the positions of seq[fed:] (or all of seq without a cache)."""
        xp = self.xp
        start = self.fed if self.cache is not None else 0
        ids = np.asarray(seq[start:], dtype=np.int64)[None, :]
        mask = np.ones((1, len(seq)), dtype=bool)
        out = self.decoder.logits(xp.asarray(ids), cache=self.cache,
                                  attention_mask=xp.asarray(mask if self.cache is not None
                                                            else mask[:, start:]))
        self.calls += 1
        if self.cache is not None:
            self.fed = len(seq)
        return out[0]

    def rollback(self, length):
        """Forget cached positions >= length (they held rejected draft tokens)."""
        if self.cache is not None and self.fed > length:
            _crop_cache(self.decoder, self.cache, length)
            self.fed = length


def _probs_host(logits, s: _Settings):
    """Processed (T, V) logits -> float64 host probabilities (one-hot argmax when greedy)."""
    x = _process(logits, s)
    x = to_numpy(x).astype(np.float64)
    if s.temperature == 0:
        p = np.zeros_like(x)
        p[np.arange(x.shape[0]), np.argmax(x, axis=-1)] = 1.0
        return p
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=-1, keepdims=True)


def _draw(p, rng):
    """One token from a 1-D host probability vector (need not be normalised):
    the same inverse-CDF rule as _inverse_cdf, for one row on the host."""
    cdf = np.cumsum(p)
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return min(i, int(np.flatnonzero(p > 0)[-1]))


def speculative_generate(target, draft, prompt_ids, max_new_tokens, k=4, temperature=1.0, seed=None,
                         top_k=None, top_p=None, min_p=None, eos_id=None, use_cache=True, rng=None):
    """Speculative decoding (Leviathan et al. 2023; Chen et al. 2023).

    Each round the cheap ``draft`` proposes k tokens d_1..d_k, sampling d_i from
    its distribution q_i; the ``target`` scores all of them in ONE forward pass,
    giving p_1..p_{k+1}. Draft token d_i is accepted with probability
    min(1, p_i(d_i) / q_i(d_i)); at the first rejection one token is drawn from
    norm(max(0, p_i - q_i)) and the round ends; if all k pass, a bonus token is
    drawn from p_{k+1}. Every emitted token is then distributed exactly as if the
    target had sampled it itself (the same processors apply to both models), but
    the target runs about once per accepted run of tokens instead of once per
    token. temperature 0 is greedy: a draft token is accepted iff it is the
    target's argmax, and the output equals the target's greedy output.
    One prompt (a list of ints); len(prompt) + max_new_tokens must fit in both
    models' contexts. Caches are used where they can be cropped (see the protocol).
    -> (ids: prompt + new tokens, stats: SpeculativeStats)
    """
    _check_decoder(target, "target")
    _check_decoder(draft, "draft")
    V = int(target.vocab_size)
    if int(draft.vocab_size) != V:
        raise ValueError(f"draft: expected vocab_size {V} (the target's), got {draft.vocab_size}")
    rows = _as_prompts(prompt_ids, V, min(int(target.block_size), int(draft.block_size)))
    if len(rows) != 1:
        raise ValueError(f"prompt_ids: speculative decoding takes one prompt, got a batch of {len(rows)}")
    prompt = rows[0]
    _check_max_new_tokens(max_new_tokens)
    context = min(int(target.block_size), int(draft.block_size))
    if len(prompt) + max_new_tokens > context:
        raise ValueError(f"max_new_tokens: prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the context ({context}); speculative decoding does not slide the window")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k: expected an integer >= 1 (draft tokens per round), got {k!r}")
    s = _settings(temperature, top_k, top_p, min_p, None, 0.0, 0.0)
    if rng is not None and seed is not None:
        raise ValueError("seed: give either seed or rng, not both")
    rng = make_rng(rng if rng is not None else seed)

    seq = list(prompt)
    total = len(prompt) + max_new_tokens
    tgt = _Runner(target, total, use_cache)
    drf = _Runner(draft, total, use_cache)
    proposed = accepted = 0
    while len(seq) < total and not (eos_id is not None and len(seq) > len(prompt) and seq[-1] == eos_id):
        n = len(seq)
        kk = min(k, total - n - 1)          # the round also emits one target token
        # 1. The draft proposes kk tokens, one forward each (its own cache makes that cheap).
        drafts, q = [], []
        for _ in range(kk):
            qi = _probs_host(drf.logits(seq + drafts)[-1:], s)[0]
            d = int(np.argmax(qi)) if s.temperature == 0 else _draw(qi, rng)
            drafts.append(d)
            q.append(qi)
        # 2. The target scores prompt + drafts once: rows are p_1 .. p_{kk+1}.
        p = _probs_host(tgt.logits(seq + drafts)[-(kk + 1):], s)
        # 3. Accept or reject each draft token in order.
        n_ok = 0
        for i, d in enumerate(drafts):
            if s.temperature == 0:
                ok = d == int(np.argmax(p[i]))
            else:
                ok = rng.random() < min(1.0, p[i][d] / q[i][d])
            if not ok:
                break
            n_ok += 1
        proposed += kk
        accepted += n_ok
        if n_ok < kk:
            if s.temperature == 0:
                extra = int(np.argmax(p[n_ok]))
            else:
                residual = np.maximum(p[n_ok] - q[n_ok], 0.0)
                # residual sums to 0 only if p == q, where nothing is ever rejected.
                extra = _draw(residual if residual.sum() > 0 else p[n_ok], rng)
        else:
            extra = int(np.argmax(p[kk])) if s.temperature == 0 else _draw(p[kk], rng)
        new = drafts[:n_ok] + [extra]
        if eos_id is not None and eos_id in new:
            new = new[:new.index(eos_id) + 1]
        seq.extend(new)
        # Cached entries past the accepted prefix belong to rejected tokens.
        tgt.rollback(len(seq) - 1)
        drf.rollback(len(seq) - 1)
    n_new = len(seq) - len(prompt)
    stats = SpeculativeStats(
        new_tokens=n_new, proposed=proposed, accepted=accepted,
        acceptance_rate=accepted / proposed if proposed else float("nan"),
        target_calls=tgt.calls, draft_calls=drf.calls,
        tokens_per_target_call=n_new / tgt.calls if tgt.calls else float("nan"),
        used_cache=(tgt.cache is not None, drf.cache is not None))
    return seq, stats
