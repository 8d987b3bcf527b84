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

Reading order: the plain greedy loop (``generate_greedy``, no cache), the logits
processors, picking a token, the full loop (``generate``: batches, the KV cache,
processors, sampling, stop conditions; at temperature 0 it gives generate_greedy's
ids), beam search, speculative decoding, and last the argument checks.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .backend import (array_module, check_array, check_float, check_ids, check_int_arg, check_number,
                      check_probability, is_int, make_rng, to_numpy, xp_default)

__all__ = [
    "generate_greedy",
    "apply_temperature", "top_k_filter", "top_p_filter", "min_p_filter",
    "repetition_penalty", "frequency_penalty", "presence_penalty", "token_counts",
    "process_logits", "greedy", "sample", "generate", "beam_search",
    "speculative_generate", "SpeculativeStats",
]


# ---------------------------------------------------------------------------
# 1. The plain greedy loop
# ---------------------------------------------------------------------------

def generate_greedy(decoder, prompt_ids, max_new_tokens):
    """Greedy decoding, the plain loop: run the model on the sequence so far, append
    its most likely next token, repeat max_new_tokens times.

    No KV cache: every step re-runs the whole sequence (its last block_size tokens
    once it outgrows the model's context). ``generate(temperature=0)`` gives the same
    ids faster, with a cache, and adds batches, processors and stop conditions.
    decoder: the decoder protocol above; prompt_ids: one prompt, a list of ints
    -> a list of ints: the prompt followed by max_new_tokens new ids

    A toy decoder whose logits always favour "the last token + 1":

    >>> class Counter:
    ...     vocab_size, block_size, xp = 10, 4, np
    ...     def new_cache(self, batch_size, max_len):
    ...         return None
    ...     def logits(self, ids, cache=None, attention_mask=None):
    ...         return np.eye(10)[(ids + 1) % 10]          # (B, T, V): one-hot on id + 1
    >>> generate_greedy(Counter(), [3, 4], 3)
    [3, 4, 5, 6, 7]
    """
    ids = _check_generate_greedy(decoder, prompt_ids, max_new_tokens)   # the prompt, a list of ints
    xp = _decoder_xp(decoder)
    for _ in range(max_new_tokens):
        context = ids[-decoder.block_size:]                  # the model sees at most block_size tokens
        logits = decoder.logits(xp.asarray([context]))       # (1, T, V)
        ids.append(int(xp.argmax(logits[0, -1])))            # the most likely next token
    return ids


# ---------------------------------------------------------------------------
# 2. Logits processors: (..., V) logits in, same shape and dtype out
# ---------------------------------------------------------------------------

def apply_temperature(logits, temperature):
    """logits / temperature. T < 1 sharpens the distribution, T > 1 flattens it;
    as T -> 0 softmax(logits / T) tends to a one-hot on the argmax (greedy).
    logits: (..., V); temperature > 0 -> (..., V)
    """
    _check_apply_temperature(logits, temperature)
    return logits / logits.dtype.type(temperature)


def top_k_filter(logits, k):
    """Keep the k largest logits per row, set the rest to -inf.

    Tokens tied with the k-th largest value are all kept (as Hugging Face's
    TopKLogitsWarper does), so a row may keep more than k on exact ties.
    k >= V keeps everything. logits: (..., V); k >= 1 -> (..., V)
    """
    _check_top_k_filter(logits, k)
    V = logits.shape[-1]
    if k >= V:
        return logits.copy()
    xp = array_module(logits)
    # partition puts the k-th largest at index V - k without a full sort.
    kth = xp.partition(logits, V - k, axis=-1)[..., V - k:V - k + 1]    # (..., 1)
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
    _check_top_p_filter(logits, p)
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
    _check_min_p_filter(logits, min_p)
    probs = _softmax(logits)
    xp = array_module(logits)
    return _removed(logits, probs < min_p * xp.max(probs, axis=-1, keepdims=True))


def token_counts(prev_ids, vocab_size, mask=None, xp=None):
    """How often each token occurs in each row of prev_ids.

    prev_ids: (..., T) int ids in [0, vocab_size); mask: (..., T) bool or None
    (False entries, e.g. left padding, are not counted) -> (..., V) float counts
    """
    _check_token_counts(prev_ids, vocab_size, mask)
    xp = xp or array_module(prev_ids)
    lead, T = tuple(prev_ids.shape[:-1]), prev_ids.shape[-1]
    n = int(np.prod(lead)) if lead else 1
    ids = prev_ids.reshape(n, T)                                      # (n, T)
    weights = mask.reshape(n, T).astype(np.float64) if mask is not None else xp.ones((n, T), dtype=np.float64)
    # One bincount over row * V + id counts every row at once.
    flat = (xp.arange(n)[:, None] * vocab_size + ids).reshape(-1)     # (n * T,)
    counts = xp.bincount(flat, weights=weights.reshape(-1), minlength=n * vocab_size)
    return counts.reshape(lead + (vocab_size,))


def repetition_penalty(logits, prev_ids, penalty, mask=None):
    """CTRL's repetition penalty: for every token already in prev_ids, a positive
    logit is divided by ``penalty`` and a negative one multiplied by it (once per
    token, however often it occurred). penalty > 1 discourages repeats, 1 is the
    identity, < 1 encourages them.
    logits: (..., V); prev_ids: (..., T) int; mask: (..., T) bool or None -> (..., V)
    """
    _check_penalty_processor(logits, prev_ids, penalty, positive=True)
    counts = token_counts(prev_ids, logits.shape[-1], mask, xp=array_module(logits))   # (..., V)
    return _repetition_from_counts(logits, counts, penalty)


def frequency_penalty(logits, prev_ids, penalty, mask=None):
    """OpenAI's frequency penalty: logit[v] -= penalty * count(v in prev_ids).
    The more often a token was used, the stronger the push away from it.
    logits: (..., V); prev_ids: (..., T) int -> (..., V)
    """
    _check_penalty_processor(logits, prev_ids, penalty, positive=False)
    counts = token_counts(prev_ids, logits.shape[-1], mask, xp=array_module(logits))   # (..., V)
    return logits - (penalty * counts).astype(logits.dtype)


def presence_penalty(logits, prev_ids, penalty, mask=None):
    """OpenAI's presence penalty: logit[v] -= penalty if v occurs in prev_ids at all.
    A flat nudge towards new tokens, whatever their count.
    logits: (..., V); prev_ids: (..., T) int -> (..., V)
    """
    _check_penalty_processor(logits, prev_ids, penalty, positive=False)
    counts = token_counts(prev_ids, logits.shape[-1], mask, xp=array_module(logits))   # (..., V)
    return logits - (penalty * (counts > 0)).astype(logits.dtype)


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
    settings = _check_process_logits(logits, prev_ids, temperature, top_k, top_p, min_p,
                                     repetition_penalty, frequency_penalty, presence_penalty)
    counts = None
    if prev_ids is not None:
        counts = token_counts(prev_ids, logits.shape[-1], prev_mask, xp=array_module(logits))   # (..., V)
    return _process(logits, settings, counts, counts)


class _Settings(NamedTuple):
    """The processing options of one generation call, checked once."""
    temperature: float
    top_k: object
    top_p: object
    min_p: object
    repetition_penalty: object
    frequency_penalty: float
    presence_penalty: float


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


def _repetition_from_counts(logits, counts, penalty):
    # CTRL (Keskar et al. 2019): dividing a positive logit and multiplying a negative
    # one both lower the token's probability when penalty > 1.
    seen = counts > 0
    xp = array_module(logits)
    pen = logits.dtype.type(penalty)
    return xp.where(seen, xp.where(logits > 0, logits / pen, logits * pen), logits)


def _removed(logits, remove):
    """A copy of logits with the entries where ``remove`` is True set to -inf."""
    kept = logits.copy()
    kept[remove] = -np.inf
    return kept


def _softmax(logits):
    """Probabilities over the last axis; -inf entries get exactly 0."""
    xp = array_module(logits)
    z = logits - xp.max(logits, axis=-1, keepdims=True)
    e = xp.exp(z)
    return e / xp.sum(e, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------
# 3. Picking a token
# ---------------------------------------------------------------------------

def greedy(logits):
    """The most likely token: argmax over the last axis. logits: (..., V) -> (...) int64"""
    _check_pick(logits)
    xp = array_module(logits)
    return xp.argmax(logits, axis=-1).astype(np.int64)


def sample(logits, rng=None):
    """One random token per row from softmax(logits).

    The uniforms come from ``rng`` (a NumPy Generator or an int seed) on the CPU
    and are moved to the logits' device, so a seed gives the same tokens on NumPy
    and CuPy (up to floating-point ties). Removed (-inf) tokens are never drawn.
    logits: (..., V) -> (...) int64 on the logits' device
    """
    _check_pick(logits)
    rng = make_rng(rng)
    xp = array_module(logits)
    lead, V = tuple(logits.shape[:-1]), logits.shape[-1]
    flat = logits.reshape(-1, V)                                      # (N, V)
    u = xp.asarray(rng.random(flat.shape[0]))                         # (N,)
    return _inverse_cdf(_softmax(flat), u).reshape(lead)


def _inverse_cdf(probs, u):
    """Index i with cdf[i-1] <= u * total < cdf[i]: a draw from probs (rows).

    probs: (N, V) >= 0 on any device; u: (N,) uniforms in [0, 1) on the same
    device. A zero-probability token is never picked: its cdf step is empty.
    """
    xp = array_module(probs)
    cdf = xp.cumsum(probs.astype(np.float64), axis=-1)                # (N, V)
    target = u[:, None] * cdf[:, -1:]                                 # (N, 1)
    idx = xp.sum(cdf <= target, axis=-1)
    # Guard against rounding (u * total landing on total): fall back to the last
    # token with non-zero probability, never to a removed one.
    V = probs.shape[-1]
    last_alive = V - 1 - xp.argmax(probs[:, ::-1] > 0, axis=-1)
    return xp.minimum(idx, last_alive).astype(np.int64)


# ---------------------------------------------------------------------------
# 4. The full generation loop: batches, the KV cache, processors, stopping
# ---------------------------------------------------------------------------

def generate(decoder, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             min_p=None, repetition_penalty=None, frequency_penalty=0.0, presence_penalty=0.0,
             eos_id=None, stop=None, use_cache=True, seed=None, rng=None):
    """Autoregressive generation: prefill the prompt, then one token at a time.

    prompt_ids: a list of ints (one prompt) or a list of lists (a batch of any
    lengths, left-padded internally with an attention mask). temperature 0 is
    greedy decoding (the ids of ``generate_greedy``, faster); otherwise tokens are
    drawn from the processed distribution with ``rng`` (or a Generator made from
    ``seed``): the same seed, prompts and settings give the same output. A row
    stops after ``eos_id`` or after any of the ``stop`` sequences (lists of ids;
    both included in the output), or after max_new_tokens new tokens; the loop
    ends when every row has stopped.
    With use_cache=False every step re-runs the whole (cropped) sequence: the same
    tokens, much slower, which is the point of the KV cache.
    -> list of lists of ids: each prompt followed by its new tokens
    """
    rows, settings, stops, rng = _check_generate(decoder, prompt_ids, max_new_tokens, temperature, top_k,
                                                 top_p, min_p, repetition_penalty, frequency_penalty,
                                                 presence_penalty, eos_id, stop, seed, rng)
    out = [list(r) for r in rows]                    # each prompt, then its new tokens
    if max_new_tokens == 0:
        return out
    ctx = _Context(decoder, rows, max_new_tokens, use_cache)
    tallies = _TokenTallies(ctx, settings, int(decoder.vocab_size))
    done = np.zeros(len(rows), dtype=bool)           # rows that have stopped
    for step in range(max_new_tokens):
        logits = _process(ctx.next_logits(), settings, tallies.seen, tallies.generated)   # (B, V)
        next_ids = greedy(logits) if settings.temperature == 0 else sample(logits, rng)   # (B,)
        next_host = to_numpy(next_ids)
        _extend_rows(out, done, next_host, eos_id, stops)
        if done.all() or step == max_new_tokens - 1:
            break
        # Finished rows keep running (a batch moves in lockstep); their tokens are discarded.
        tallies.add(next_ids)
        ctx.append(next_host)
    return out


class _TokenTallies:
    """Per-row token counts for the penalties, (B, V) each, or None when unused:
    ``seen`` (prompt and generated tokens: the repetition penalty) and ``generated``
    (new tokens only: frequency and presence penalties, as OpenAI and vLLM count)."""

    def __init__(self, ctx, s: _Settings, vocab_size):
        xp = ctx.xp
        B = len(ctx.ids)
        self.seen = None
        if s.repetition_penalty is not None and s.repetition_penalty != 1.0:
            self.seen = token_counts(xp.asarray(ctx.ids), vocab_size, xp.asarray(ctx.mask), xp=xp)
        self.generated = None
        if s.frequency_penalty or s.presence_penalty:
            self.generated = xp.zeros((B, vocab_size), dtype=np.float64)
        self.rows = xp.arange(B)

    def add(self, tokens):
        """Count one new token per row (tokens: (B,) on the decoder's device)."""
        for counts in (self.seen, self.generated):
            if counts is not None:
                counts[self.rows, tokens] += 1


def _extend_rows(out, done, tokens, eos_id, stops):
    """Append tokens[i] to each row i still running; a row that now ends in eos_id or
    in a stop sequence is done."""
    for i, row in enumerate(out):
        if not done[i]:
            row.append(int(tokens[i]))
            done[i] = (eos_id is not None and row[-1] == eos_id) or \
                any(len(row) >= len(seq) and tuple(row[-len(seq):]) == seq for seq in stops)


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
        self.ids = np.zeros((len(rows), L), dtype=np.int64)           # (B, L)
        self.mask = np.zeros((len(rows), L), dtype=bool)              # (B, L)
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
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)    # (B, 1)
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


# ---------------------------------------------------------------------------
# 5. Beam search
# ---------------------------------------------------------------------------

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
    rows = _check_beam_search(decoder, prompt_ids, max_new_tokens, num_beams, length_penalty, eos_id)
    results, scores = [], []
    for prompt in rows:
        ids, score = _beam_one(decoder, prompt, max_new_tokens, int(num_beams), float(length_penalty),
                               eos_id, use_cache)
        results.append(ids)
        scores.append(score)
    return (results, scores) if return_scores else results


def _beam_one(decoder, prompt, max_new_tokens, num_beams, length_penalty, eos_id, use_cache):
    """Beam search for one prompt. -> (prompt + the best continuation, its score)"""
    if max_new_tokens == 0:
        return list(prompt), 0.0
    ctx = _Context(decoder, [prompt] * num_beams, max_new_tokens, use_cache, need_reorder=True)
    # Only beam 0 is live at the start: identical beams would otherwise fill the
    # first step with num_beams copies of the same candidate.
    beam_scores = np.full(num_beams, -np.inf)        # (num_beams,) total log-probability of each beam
    beam_scores[0] = 0.0
    finished = []                                    # (normalised score, new tokens), best first
    for step in range(max_new_tokens):
        norm = (step + 1) ** length_penalty          # n_new ** length_penalty
        log_probs = _log_softmax_host(ctx.next_logits())               # (num_beams, V)
        cand_scores = (beam_scores[:, None] + log_probs).reshape(-1)   # (num_beams * V,)
        running, ending = _best_candidates(cand_scores, num_beams, eos_id)
        for beam, token, score in ending:
            _keep_best(finished, (score / norm, ctx.ids[beam, len(prompt):].tolist() + [token]), num_beams)
        if not running:
            beam_scores[:] = -np.inf
            break
        running += [(running[0][0], running[0][1], -np.inf)] * (num_beams - len(running))   # dead beams
        beam_scores = np.array([score for _, _, score in running])
        ctx.reorder([beam for beam, _, _ in running])
        ctx.append([token for _, token, _ in running])
        if len(finished) >= num_beams and beam_scores.max() / norm <= min(f[0] for f in finished):
            break                                    # no running beam can beat a finished one
    return _best_hypothesis(ctx, prompt, beam_scores, finished, length_penalty)


def _best_candidates(cand_scores, num_beams, eos_id):
    """Walk the best 2 * num_beams candidates, best first. -> running: up to num_beams
    (beam, token, score) that continue; ending: the eos_id candidates among the best
    num_beams (an eos candidate ranked lower would not have survived as a beam)."""
    V = cand_scores.size // num_beams
    n_cand = min(2 * num_beams, cand_scores.size)
    top = np.argpartition(-cand_scores, n_cand - 1)[:n_cand]
    top = top[np.argsort(-cand_scores[top], kind="stable")]
    running, ending = [], []
    for rank, flat in enumerate(top):
        score = cand_scores[flat]
        if score == -np.inf:
            break
        beam, token = divmod(int(flat), V)
        if eos_id is not None and token == eos_id:
            if rank < num_beams:
                ending.append((beam, token, score))
            continue
        running.append((beam, token, score))
        if len(running) == num_beams:
            break
    return running, ending


def _keep_best(finished, hypothesis, n):
    """Add (score, tokens) to ``finished`` and keep its n best, best first."""
    finished.append(hypothesis)
    finished.sort(key=lambda f: -f[0])
    del finished[n:]


def _best_hypothesis(ctx, prompt, beam_scores, finished, length_penalty):
    """The beams still running join the finished ones, scored the same way.
    -> (prompt + the best one's tokens, its score)"""
    n_new = ctx.length - len(prompt)
    for beam, score in enumerate(beam_scores):
        if score > -np.inf:
            finished.append((score / n_new ** length_penalty, ctx.ids[beam].tolist()[len(prompt):]))
    score, new_tokens = max(finished, key=lambda f: f[0])
    return list(prompt) + [int(t) for t in new_tokens], float(score)


def _log_softmax_host(logits):
    x = to_numpy(logits).astype(np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


# ---------------------------------------------------------------------------
# 6. Speculative decoding
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
    prompt, settings, rng = _check_speculative_generate(target, draft, prompt_ids, max_new_tokens, k,
                                                        temperature, seed, top_k, top_p, min_p, eos_id, rng)
    total = len(prompt) + max_new_tokens
    seq = list(prompt)
    tgt, drf = _Runner(target, total, use_cache), _Runner(draft, total, use_cache)
    proposed = accepted = 0
    while len(seq) < total and not (eos_id is not None and len(seq) > len(prompt) and seq[-1] == eos_id):
        n_draft = min(k, total - len(seq) - 1)            # the round also emits one target token
        # 1. The draft proposes n_draft tokens, one forward each (its own cache makes that cheap).
        drafts, q = _propose(drf, seq, n_draft, settings, rng)                  # q: n_draft rows (V,)
        # 2. The target scores seq + drafts in ONE forward: rows p_1 .. p_{n_draft + 1}.
        p = _probs_host(tgt.logits(seq + drafts)[-(n_draft + 1):], settings)    # (n_draft + 1, V)
        # 3. Accept the drafts in order until one fails; 4. the target adds one token.
        n_ok = _n_accepted(drafts, p, q, settings, rng)
        new = drafts[:n_ok] + [_target_token(p, q, n_ok, n_draft, settings, rng)]
        if eos_id is not None and eos_id in new:
            new = new[:new.index(eos_id) + 1]
        seq.extend(new)
        # 5. Cached entries past the accepted prefix belong to rejected tokens.
        tgt.rollback(len(seq) - 1)
        drf.rollback(len(seq) - 1)
        proposed += n_draft
        accepted += n_ok
    return seq, _speculative_stats(len(seq) - len(prompt), proposed, accepted, tgt, drf)


def _propose(draft, seq, n_draft, s: _Settings, rng):
    """n_draft draft tokens after seq, each from the draft's distribution q_i.
    -> (tokens, their distributions q_i: (V,) host arrays)"""
    tokens, q = [], []
    for _ in range(n_draft):
        q_i = _probs_host(draft.logits(seq + tokens)[-1:], s)[0]               # (V,)
        tokens.append(int(np.argmax(q_i)) if s.temperature == 0 else _draw(q_i, rng))
        q.append(q_i)
    return tokens, q


def _n_accepted(drafts, p, q, s: _Settings, rng):
    """How many drafts pass in order: d_i with probability min(1, p_i(d_i) / q_i(d_i))
    (greedy: iff d_i is the target's argmax)."""
    for i, d in enumerate(drafts):
        if s.temperature == 0:
            ok = d == int(np.argmax(p[i]))
        else:
            ok = rng.random() < min(1.0, p[i][d] / q[i][d])
        if not ok:
            return i
    return len(drafts)


def _target_token(p, q, n_ok, n_draft, s: _Settings, rng):
    """The token the target adds after n_ok accepted drafts: at a rejection a draw
    from norm(max(0, p - q)), after all n_draft a bonus draw from p (greedy: argmax p)."""
    if s.temperature == 0:
        return int(np.argmax(p[n_ok]))
    if n_ok == n_draft:
        return _draw(p[n_ok], rng)
    residual = np.maximum(p[n_ok] - q[n_ok], 0.0)                              # (V,)
    # residual sums to 0 only if p == q, where nothing is ever rejected.
    return _draw(residual if residual.sum() > 0 else p[n_ok], rng)


def _speculative_stats(n_new, proposed, accepted, tgt, drf):
    return SpeculativeStats(
        new_tokens=n_new, proposed=proposed, accepted=accepted,
        acceptance_rate=accepted / proposed if proposed else float("nan"),
        target_calls=tgt.calls, draft_calls=drf.calls,
        tokens_per_target_call=n_new / tgt.calls if tgt.calls else float("nan"),
        used_cache=(tgt.cache is not None, drf.cache is not None))


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
    x = to_numpy(_process(logits, s)).astype(np.float64)                       # (T, V)
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


# ---------------------------------------------------------------------------
# 7. Argument checks (one _check_<op> per public function)
# ---------------------------------------------------------------------------

def _check_logits(logits) -> None:
    check_float("logits", logits)
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits: expected shape (..., V) with V >= 1, got {tuple(logits.shape)}")


def _check_temperature(temperature, allow_zero: bool) -> None:
    check_number("temperature", temperature, lo=0, lo_open=not allow_zero)   # 0 means greedy


def _check_top_k(k) -> None:
    check_int_arg("top_k", k, lo=1)


def _check_top_p(p) -> None:
    check_number("top_p", p, lo=0, hi=1, lo_open=True)


def _check_min_p(p) -> None:
    check_probability("min_p", p, include_one=True)


def _check_penalty(name, value, positive: bool) -> None:
    check_number(name, value, lo=0 if positive else None, lo_open=positive)


def _check_max_new_tokens(n) -> None:
    check_int_arg("max_new_tokens", n, lo=0)


def _check_eos_id(eos_id, vocab_size) -> None:
    check_int_arg("eos_id", eos_id, lo=0, hi=vocab_size, optional=True)


def _check_apply_temperature(logits, temperature):
    _check_logits(logits)
    _check_temperature(temperature, allow_zero=False)


def _check_top_k_filter(logits, k):
    _check_logits(logits)
    _check_top_k(k)


def _check_top_p_filter(logits, p):
    _check_logits(logits)
    _check_top_p(p)


def _check_min_p_filter(logits, min_p):
    _check_logits(logits)
    _check_min_p(min_p)


def _check_penalty_processor(logits, prev_ids, penalty, positive):
    _check_logits(logits)
    _check_penalty("penalty", penalty, positive=positive)
    _check_prev_ids(logits, prev_ids)


def _check_prev_ids(logits, prev_ids):
    """prev_ids: an array with logits' leading axes, then T (its ids are checked by token_counts)."""
    check_array("prev_ids", prev_ids)
    if prev_ids.shape[:-1] != logits.shape[:-1]:
        raise ValueError(f"prev_ids: expected shape {tuple(logits.shape[:-1]) + ('T',)} "
                         f"(logits' leading axes, then T), got {tuple(prev_ids.shape)}")


def _check_token_counts(prev_ids, vocab_size, mask):
    check_ids("prev_ids", prev_ids, vocab_size)
    if prev_ids.ndim < 1:
        raise ValueError(f"prev_ids: expected shape (..., T), got {tuple(prev_ids.shape)}")
    if mask is not None:
        check_array("mask", mask)
        if tuple(mask.shape) != tuple(prev_ids.shape):
            raise ValueError(f"mask: expected shape {tuple(prev_ids.shape)} (prev_ids' shape), "
                             f"got {tuple(mask.shape)}")


def _check_settings(temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty,
                    presence_penalty) -> _Settings:
    """Check the processing options once; -> _Settings."""
    _check_temperature(temperature, allow_zero=True)
    if top_k is not None:
        _check_top_k(top_k)
    if top_p is not None:
        _check_top_p(top_p)
    if min_p is not None:
        _check_min_p(min_p)
    if repetition_penalty is not None:
        _check_penalty("repetition_penalty", repetition_penalty, positive=True)
    _check_penalty("frequency_penalty", frequency_penalty, positive=False)
    _check_penalty("presence_penalty", presence_penalty, positive=False)
    return _Settings(float(temperature), top_k, top_p, min_p, repetition_penalty,
                     float(frequency_penalty), float(presence_penalty))


def _check_process_logits(logits, prev_ids, temperature, top_k, top_p, min_p, repetition_penalty,
                          frequency_penalty, presence_penalty) -> _Settings:
    _check_logits(logits)
    settings = _check_settings(temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty,
                               presence_penalty)
    if prev_ids is not None:
        _check_prev_ids(logits, prev_ids)
    return settings


def _check_pick(logits) -> None:
    """Float logits (..., V) with at least one token left (not -inf) in every row."""
    _check_logits(logits)
    xp = array_module(logits)
    alive = xp.any(logits > -np.inf, axis=-1)
    if not bool(xp.all(alive)):
        row = int(np.argmin(to_numpy(alive).reshape(-1)))
        raise ValueError(f"logits: row {row} has every token removed (all -inf or NaN)")


def _check_decoder(decoder, name="decoder") -> None:
    for attr in ("vocab_size", "block_size", "new_cache", "logits"):
        if not hasattr(decoder, attr):
            raise TypeError(f"{name}: expected an object with vocab_size, block_size, new_cache() "
                            f"and logits() (see minillm.sampling), got {type(decoder).__name__} "
                            f"without {attr!r}")


def _check_rng_or_seed(rng, seed) -> np.random.Generator:
    """At most one of rng and seed; -> the Generator to draw from."""
    if rng is not None and seed is not None:
        raise ValueError("seed: give either seed or rng, not both")
    return make_rng(rng if rng is not None else seed)


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
            if not is_int(t):
                raise TypeError(f"{name}: expected integer token ids, got {t!r} in prompt {i}")
            if not 0 <= t < vocab_size:
                raise ValueError(f"{name}: expected ids in [0, {vocab_size}), got {t} in prompt {i}")
        if len(r) > block_size:
            raise ValueError(f"{name}: prompt {i} has {len(r)} tokens, longer than the model's "
                             f"context (block_size={block_size})")
    return [[int(t) for t in r] for r in rows]


def _as_stop(stop, vocab_size):
    """Stop sequences as a list of non-empty tuples of ints (a flat list is one sequence)."""
    if stop is None:
        return []
    if not isinstance(stop, (list, tuple)) or len(stop) == 0:
        raise ValueError(f"stop: expected a list of token-id sequences (or one sequence), got {stop!r}")
    seqs = [stop] if not isinstance(stop[0], (list, tuple)) else list(stop)
    for seq in seqs:
        if len(seq) == 0 or not all(is_int(t) and 0 <= t < vocab_size for t in seq):
            raise ValueError(f"stop: expected non-empty sequences of ids in [0, {vocab_size}), got {seq!r}")
    return [tuple(int(t) for t in seq) for seq in seqs]


def _check_generate_greedy(decoder, prompt_ids, max_new_tokens):
    """-> the one prompt, as a new list of ints."""
    _check_decoder(decoder)
    rows = _as_prompts(prompt_ids, int(decoder.vocab_size), int(decoder.block_size))
    if len(rows) != 1:
        raise ValueError(f"prompt_ids: generate_greedy takes one prompt (a list of ints), "
                         f"got a batch of {len(rows)}; use generate for batches")
    _check_max_new_tokens(max_new_tokens)
    return rows[0]


def _check_generate(decoder, prompt_ids, max_new_tokens, temperature, top_k, top_p, min_p,
                    repetition_penalty, frequency_penalty, presence_penalty, eos_id, stop, seed, rng):
    """-> (prompts as lists of ints, _Settings, stop sequences as tuples, the Generator)"""
    _check_decoder(decoder)
    V = int(decoder.vocab_size)
    rows = _as_prompts(prompt_ids, V, int(decoder.block_size))
    _check_max_new_tokens(max_new_tokens)
    settings = _check_settings(temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty,
                               presence_penalty)
    _check_eos_id(eos_id, V)
    stops = _as_stop(stop, V)
    return rows, settings, stops, _check_rng_or_seed(rng, seed)


def _check_beam_search(decoder, prompt_ids, max_new_tokens, num_beams, length_penalty, eos_id):
    """-> the prompts as lists of ints"""
    _check_decoder(decoder)
    V = int(decoder.vocab_size)
    rows = _as_prompts(prompt_ids, V, int(decoder.block_size))
    _check_max_new_tokens(max_new_tokens)
    check_int_arg("num_beams", num_beams, lo=1)
    _check_penalty("length_penalty", length_penalty, positive=False)
    _check_eos_id(eos_id, V)
    return rows


def _check_speculative_generate(target, draft, prompt_ids, max_new_tokens, k, temperature, seed,
                                top_k, top_p, min_p, eos_id, rng):
    """-> (the one prompt as a list of ints, _Settings, the Generator)"""
    _check_decoder(target, "target")
    _check_decoder(draft, "draft")
    V = int(target.vocab_size)
    if int(draft.vocab_size) != V:
        raise ValueError(f"draft: expected vocab_size {V} (the target's), got {draft.vocab_size}")
    context = min(int(target.block_size), int(draft.block_size))
    rows = _as_prompts(prompt_ids, V, context)
    if len(rows) != 1:
        raise ValueError(f"prompt_ids: speculative decoding takes one prompt, got a batch of {len(rows)}")
    _check_max_new_tokens(max_new_tokens)
    if len(rows[0]) + max_new_tokens > context:
        raise ValueError(f"max_new_tokens: prompt ({len(rows[0])}) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the context ({context}); speculative decoding does not slide the window")
    check_int_arg("k", k, lo=1)                      # draft tokens per round
    settings = _check_settings(temperature, top_k, top_p, min_p, None, 0.0, 0.0)
    _check_eos_id(eos_id, V)
    return rows[0], settings, _check_rng_or_seed(rng, seed)
