"""Embeddings: how integer ids become vectors.

- token embedding: row ``ids[i]`` of a learned (V, C) table. The forward is a
  gather; its backward is a scatter-add, because an id that appears several
  times in a batch receives the sum of the gradients of all its positions.
- learned positions (GPT-2's wpe, BERT's position_embeddings): the same lookup,
  with ``position_ids(T)`` = 0, 1, ..., T-1 as the ids. There is no separate
  function for it: ``embedding_forward(position_ids(T), wpe)``.
- sinusoidal positions ("Attention Is All You Need"): a fixed (T, C) table of
  sines and cosines of geometrically spaced frequencies, no parameters.
- segment (token-type) embeddings (BERT): the same lookup again, on a small
  table indexed by sentence A/B ids; thin wrappers keep the error messages
  naming ``token_type_ids``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .backend import (DEFAULT_DTYPE, array_module, check_float, check_ids, check_int_arg, check_ndim,
                      check_same_device, make_rng, randn, scatter_add, to_device, xp_for)

__all__ = ["embedding_forward", "embedding_backward", "position_ids", "sinusoidal_positions",
           "segment_embedding_forward", "segment_embedding_backward", "init_embedding"]


class EmbeddingCache(NamedTuple):
    ids: object         # (...) int, the looked-up rows
    table_shape: tuple  # (V, C)
    dtype: object       # the table's dtype, for the gradient


def _check_lookup(ids, table, ids_name, table_name):
    check_float(table_name, table)
    check_ndim(table_name, table, 2)
    check_ids(ids_name, ids, table.shape[0])
    check_same_device(ids_name, ids, table, table_name)


def _check_dy(dy, cache: EmbeddingCache, dy_name):
    want = (*cache.ids.shape, cache.table_shape[1])
    if tuple(dy.shape) != want:
        raise ValueError(f"{dy_name}: expected shape {want} (the forward output's), got {tuple(dy.shape)}")


def _embedding_forward(ids, table, ids_name, table_name):
    """The row lookup every public forward here shares; errors name ``ids_name`` and ``table_name``."""
    _check_lookup(ids, table, ids_name, table_name)
    xp = array_module(table)
    # take() along axis 0 is a plain row gather; same values as table[ids], a bit faster on NumPy.
    out = xp.take(table, ids, axis=0)                                   # (..., C)
    return out, EmbeddingCache(ids, tuple(table.shape), table.dtype)


def _embedding_backward(dy, cache: EmbeddingCache, dy_name):
    """The scatter-add every public backward here shares."""
    _check_dy(dy, cache, dy_name)
    ids, (V, C), dtype = cache
    xp = array_module(dy)
    dtable = xp.zeros((V, C), dtype=dtype)
    # Repeated ids must accumulate, which plain dtable[ids] += dy would not do.
    scatter_add(dtable, ids.reshape(-1), dy.reshape(-1, C))           # (V, C)
    return dtable


def embedding_forward(ids, table):
    """out[..., :] = table[ids[...], :], a row lookup.

    ids: (...) int in [0, V), table: (V, C) float -> out: (..., C)
    Example: table = [[0, 0], [1, 1], [2, 2]], ids = [2, 0, 2] -> out = [[2, 2], [0, 0], [2, 2]]
    """
    return _embedding_forward(ids, table, "ids", "table")


def embedding_backward(dy, cache: EmbeddingCache):
    """dtable[v] = sum of dy at every position where ids == v (zero for unused rows).

    Equivalent to one_hot(ids)^T @ dy, without building the one-hot matrix.
    dy: (..., C) -> dtable: (V, C)
    Example: ids = [2, 0, 2], dy = [[1, 1], [5, 5], [3, 3]] -> dtable = [[5, 5], [0, 0], [4, 4]]
    """
    return _embedding_backward(dy, cache, "dy")


def _check_sinusoidal(T, C, base):
    check_int_arg("T", T, lo=0)
    check_int_arg("C", C, lo=0)
    if not (isinstance(base, (int, float, np.integer, np.floating)) and math.isfinite(base) and base > 1):
        raise ValueError(f"base: expected a number > 1, got {base!r}")


def position_ids(T, offset=0, xp=None):
    """The positions offset, offset+1, ..., offset+T-1 as an int64 array (T,).

    Learned position embeddings are an ordinary lookup of these:
    ``pos, cache = embedding_forward(position_ids(T), wpe)``, and
    ``embedding_backward`` gives wpe's gradient. ``offset`` is the number of
    tokens already in a KV cache during generation. ``xp`` chooses the array
    module (default: MINILLM_DEVICE's), so the ids can sit next to the table.
    """
    T, offset = check_int_arg("T", T, lo=0), check_int_arg("offset", offset, lo=0)
    xp = xp if xp is not None else xp_for(None)
    return xp.arange(offset, offset + T, dtype=np.int64)                # (T,)


def sinusoidal_positions(T, C, base=10000.0, dtype=DEFAULT_DTYPE, device=None):
    """The fixed position encoding of "Attention Is All You Need":

        PE[p, 2i]   = sin(p / base^(2i / C))
        PE[p, 2i+1] = cos(p / base^(2i / C))

    Each pair of dimensions is a rotation at its own frequency, so PE[p + k] is a
    fixed linear function of PE[p] for every p: relative offsets are easy to
    read off. No parameters, hence no backward. Computed in float64 on the CPU,
    then cast to ``dtype`` and moved to ``device``. An odd C ends with a sine.
    -> (T, C)
    """
    _check_sinusoidal(T, C, base)
    pos = np.arange(T, dtype=np.float64)[:, None]                       # (T, 1)
    two_i = np.arange(0, C, 2, dtype=np.float64)                        # (ceil(C/2),) 0, 2, 4, ...: one frequency per pair
    angle = pos * np.exp(-two_i / C * math.log(base))                   # (T, ceil(C/2)) p / base^(2i/C)
    pe = np.empty((T, C), dtype=np.float64)
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle[:, : C // 2])
    return to_device(pe.astype(dtype), device)


def segment_embedding_forward(token_type_ids, table):
    """BERT's segment (token-type) embedding: out = table[token_type_ids].

    The same lookup as embedding_forward on a small table (V = 2 for sentence
    A/B), kept separate so that errors name ``token_type_ids``.
    token_type_ids: (...) int, table: (n_types, C) -> out: (..., C)
    """
    return _embedding_forward(token_type_ids, table, "token_type_ids", "table")


def segment_embedding_backward(dy, cache: EmbeddingCache):
    """-> dtable: (n_types, C), the scatter-add of dy by segment id."""
    return _embedding_backward(dy, cache, "dy")


def init_embedding(rng, V, C, std=0.02, dtype=DEFAULT_DTYPE, device=None):
    """A (V, C) table ~ Normal(0, std^2) (GPT-2 and BERT use 0.02; GPT-2's wpe 0.01),
    drawn on the CPU from a seeded generator, then moved to ``device``."""
    return randn(make_rng(rng), (V, C), std=std, dtype=dtype, device=device)
