"""Training past one process: data parallelism (DDP) and ZeRO stages 1 and 2 on MPI.

Data parallelism. N processes (ranks) hold the same parameters. Each step the
global batch of B sequences is cut into N x K micro-batches of B / (N K) rows;
rank r computes the gradients of micro-batches r K .. r K + K - 1 and the ranks
sum them (an all-reduce), so every rank ends with the gradient of the mean loss
over the whole batch,

    g = (1 / (N K)) sum_{m=0}^{N K - 1} g_m          g_m: micro-batch m's mean-loss gradient

and takes the same optimizer step. Nothing but the gradients (and two scalars:
the loss and a stop flag) crosses between ranks; the initial parameters are
broadcast from rank 0 once so every rank starts from the same point.

Memory per rank, for a model of P parameters trained with AdamW in float32
(4 bytes a number): parameters 4P, gradients 4P, the two moments 8P. ZeRO
(Rajbhandari et al., 2020) removes the redundant copies of the state that only
the update reads:

    stage 0 (DDP)  every rank: params, grads, moments           16 P
    stage 1        moments sharded: rank r keeps 1/N of them     8 P + 8 P / N
    stage 2        grads sharded too                             4 P + 12 P / N
    stage 3        params sharded too (not implemented here)     16 P / N

Stage 1's step: reduce-scatter the gradients (rank r receives the sum over ranks
of its shard only), update the shard's parameters with the shard's moments, then
all-gather the parameters. Stage 2 reduce-scatters after every micro-batch, so a
rank never holds more than one micro-batch's full gradient plus its shard's sum.
A shard here is a set of whole parameter arrays (assigned largest first to the
least-loaded rank): the optimizer's arithmetic per array is then the unsharded
one, so ZeRO gives DDP's parameters bit for bit.

Exactness. Gradients travel and are summed in ONE flat float64 buffer (one call
per step, not one per array). Summing in float64 makes the result independent of
the order of the sum in practice (each partial sum of float32 numbers is exact,
or nearly, in float64), and with two ranks it is exact outright: a + b == b + a,
so ``mpiexec -n 2 ... --ddp`` and one process with ``--grad-accum 2`` (sum
g_0 + g_1 in the same float64 buffer) give the same parameters bit for bit.
Global-norm clipping under sharding sums the per-array squared norms across
ranks: each array's sum of squares is computed by its owner, the vector of them
is all-reduced (x + 0 + ... = x, exact) and summed in the parameters' order, which
is exactly what :func:`minillm.optim.global_norm` does on one process.

The world: :func:`world_of_one` (rank 0 of 1, needs no MPI at all) and
:func:`mpi_world` (mpi4py's COMM_WORLD; launch with ``mpiexec -n N``). On a GPU the
MPI backend stages buffers through host memory; NCCL (cupyx.distributed) is not
wired here.
"""

from __future__ import annotations

import math
import sys
import time
from typing import NamedTuple

import numpy as np

from .backend import array_module, check_choice, check_int_arg, to_numpy
from .optim import make_optimizer

__all__ = ["World", "world_of_one", "mpi_world", "get_world", "ShardLayout", "shard_layout",
           "flatten", "unflatten_into", "allreduce_grads", "broadcast_params", "GradReducer",
           "ZeroOptimizer", "clip_grad_norm_sharded", "sharded_global_norm", "ZERO_STAGES",
           "MPI_MISSING", "zero_model_states", "block_activation_elements", "activation_bytes",
           "memory_per_rank", "measure_step_peak", "check_zero"]

ZERO_STAGES = (0, 1, 2)
MPI_MISSING = ("needs mpi4py and an MPI library (pip install 'minillm[distributed]', which "
               "installs the mpi4py and mpich wheels), and mpi4py is not installed")


# ---------------------------------------------------------------------------
# The world: who am I, how many are we, how do we talk
# ---------------------------------------------------------------------------

class World:
    """rank, size and backend ("single" or "mpi") and the collectives on NumPy buffers.

    Every collective is in place on a contiguous float buffer. A world of one
    (``comm=None``) answers every collective with its input: the sum over one rank
    is itself, so the same training code runs with and without MPI.
    """

    def __init__(self, comm=None):
        self.comm = comm
        self.rank = 0 if comm is None else int(comm.Get_rank())
        self.size = 1 if comm is None else int(comm.Get_size())
        self.backend = "single" if comm is None else "mpi"
        self.comm_s = 0.0        # seconds spent inside collectives (waiting for slower ranks included)

    def __repr__(self):
        return f"World(rank={self.rank}, size={self.size}, backend={self.backend!r})"

    def allreduce_(self, buf):
        """buf <- the elementwise sum of every rank's buf."""
        if self.size > 1:
            from mpi4py import MPI
            t0 = time.perf_counter()
            self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            self.comm_s += time.perf_counter() - t0
        return buf

    def bcast_(self, buf, root=0):
        """buf <- root's buf."""
        if self.size > 1:
            t0 = time.perf_counter()
            self.comm.Bcast(buf, root=root)
            self.comm_s += time.perf_counter() - t0
        return buf

    def reduce_scatter(self, buf, counts):
        """-> this rank's piece (counts[rank] numbers) of the elementwise sum of every rank's buf."""
        out = np.empty(counts[self.rank], dtype=buf.dtype)
        if self.size == 1:
            out[...] = buf
        else:
            from mpi4py import MPI
            t0 = time.perf_counter()
            self.comm.Reduce_scatter(buf, out, recvcounts=list(counts), op=MPI.SUM)
            self.comm_s += time.perf_counter() - t0
        return out

    def reduce_(self, buf, root):
        """-> on ``root``, the elementwise sum of every rank's buf (a new array); None elsewhere."""
        if self.size == 1:
            return buf.copy()
        from mpi4py import MPI
        out = np.empty_like(buf) if self.rank == root else None
        t0 = time.perf_counter()
        self.comm.Reduce(buf, out, op=MPI.SUM, root=root)
        self.comm_s += time.perf_counter() - t0
        return out

    def allgather_(self, piece, full, counts):
        """full <- the concatenation of every rank's piece (rank r's has counts[r] numbers)."""
        if self.size == 1:
            full[...] = piece
        else:
            displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
            t0 = time.perf_counter()
            self.comm.Allgatherv(piece, [full, list(counts), displs, _mpi_type(full)])
            self.comm_s += time.perf_counter() - t0
        return full

    def bcast_obj(self, obj, root=0):
        """root's ``obj`` (any picklable value) on every rank."""
        return obj if self.size == 1 else self.comm.bcast(obj, root=root)

    def barrier(self):
        """Wait until every rank is here."""
        if self.size > 1:
            self.comm.Barrier()

    def abort(self, code=1):
        """End every rank now (MPI_Abort); a world of one exits."""
        if self.size > 1:
            self.comm.Abort(code)
        sys.exit(code)


def _mpi_type(a):
    from mpi4py import MPI
    return MPI._typedict[a.dtype.char]


def world_of_one() -> World:
    """Rank 0 of a world of size 1: no MPI imported."""
    return World(None)


def mpi_world() -> World:
    """The MPI world this process was launched in (``mpiexec -n N``; without mpiexec, a world
    of one that still uses MPI). ValueError when mpi4py is not installed."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise ValueError(f"--ddp: {MPI_MISSING}") from None
    return World(MPI.COMM_WORLD)


def get_world(ddp: bool) -> World:
    """mpi_world() under ``ddp``, else world_of_one()."""
    return mpi_world() if ddp else world_of_one()


# ---------------------------------------------------------------------------
# One flat buffer for a dict of arrays, laid out by owner
# ---------------------------------------------------------------------------

class ShardLayout(NamedTuple):
    names: tuple          # every parameter, rank 0's first, then rank 1's, ...
    order: tuple          # the parameters in their dict's order (how global_norm sums)
    owner: dict           # name -> the rank that owns it (its moments, its gradient shard)
    offset: dict          # name -> where it starts in the flat buffer
    size: dict            # name -> number of elements
    counts: tuple         # elements each rank owns (the reduce-scatter / all-gather counts)
    total: int            # elements in all

    def owned(self, rank) -> list:
        return [n for n in self.names if self.owner[n] == rank]

    def shard_slice(self, rank) -> slice:
        lo = int(sum(self.counts[:rank]))
        return slice(lo, lo + self.counts[rank])


def shard_layout(params: dict, size: int) -> ShardLayout:
    """Whole arrays to ranks, largest first to the least-loaded rank (ties: the lower rank),
    and the flat buffer laid out rank by rank. Deterministic: every rank computes the same."""
    _check_shard_layout(params, size)
    sizes = {n: int(np.prod(p.shape)) for n, p in params.items()}
    load, owner = [0] * size, {}
    for n in sorted(sizes, key=lambda n: (-sizes[n], list(params).index(n))):
        r = min(range(size), key=lambda r: (load[r], r))
        owner[n] = r
        load[r] += sizes[n]
    names = tuple(n for r in range(size) for n in params if owner[n] == r)
    offset, at = {}, 0
    for n in names:
        offset[n] = at
        at += sizes[n]
    return ShardLayout(names, tuple(params), owner, offset, sizes, tuple(load), at)


def flatten(arrays: dict, layout: ShardLayout, dtype=np.float64, names=None, out=None):
    """The arrays ``names`` (default all) copied into one NumPy buffer, in layout order."""
    names = layout.names if names is None else names
    n = sum(layout.size[k] for k in names)
    buf = np.empty(n, dtype=dtype) if out is None else out
    at = 0
    for k in names:
        buf[at:at + layout.size[k]] = to_numpy(arrays[k]).reshape(-1)
        at += layout.size[k]
    return buf                                                    # (n,)


def unflatten_into(buf, arrays: dict, layout: ShardLayout, names=None) -> dict:
    """Copy ``buf`` (layout order over ``names``) back into the arrays, in their dtype."""
    names = layout.names if names is None else names
    at = 0
    for k in names:
        a = arrays[k]
        piece = buf[at:at + layout.size[k]].reshape(a.shape)
        a[...] = array_module(a).asarray(piece.astype(a.dtype, copy=False))
        at += layout.size[k]
    return arrays


def allreduce_grads(grads: dict, world: World, mean=True) -> dict:
    """The gradients summed (mean=True: averaged) over every rank, through one float64 buffer.
    -> a new dict in the gradients' dtypes."""
    layout = shard_layout(grads, 1)
    buf = world.allreduce_(flatten(grads, layout))
    if mean:
        buf /= world.size
    return unflatten_into(buf, {k: array_module(g).empty_like(g) for k, g in grads.items()}, layout)


def broadcast_params(params: dict, world: World, root=0) -> dict:
    """Every rank's params <- root's, in place (one buffer in the params' own dtype)."""
    if world.size > 1:
        layout = shard_layout(params, 1)
        dtype = np.result_type(*[p.dtype for p in params.values()])
        unflatten_into(world.bcast_(flatten(params, layout, dtype=dtype), root), params, layout)
    return params


# ---------------------------------------------------------------------------
# The gradient side of a step: accumulate micro-batches, reduce across ranks
# ---------------------------------------------------------------------------

class GradReducer:
    """Sums micro-batch gradients over the micro-batches and the ranks, in float64.

    stage 0 and 1: every micro-batch is added into one full float64 buffer; at the
    end stage 0 all-reduces it (every rank gets the whole sum), stage 1
    reduce-scatters it (rank r gets its shard). stage 2: each micro-batch is
    reduced at once, shard by shard, to the shard's owner (a reduce-scatter done
    as N reduces, so that no full float64 copy is ever made), and only the
    shard's sum is kept. The micro-batch's float32 gradients themselves are whole
    on every rank in every stage here (gpt.backward returns them all at once;
    DeepSpeed frees buckets during the backward).
    """

    def __init__(self, params: dict, world: World, zero: int = 0):
        self.params, self.world, self.zero = params, world, zero
        self.layout = shard_layout(params, world.size)
        self.mine = self.layout.owned(world.rank) if zero else list(self.layout.names)
        self.acc = None

    def begin(self):
        self.acc = None

    def add(self, grads: dict) -> None:
        """One micro-batch's gradients (a full dict keyed like params)."""
        lay = self.layout
        if self.zero == 2:
            for r in range(self.world.size):
                piece = self.world.reduce_(flatten(grads, lay, names=lay.owned(r)), root=r)
                if r == self.world.rank:                                  # (counts[rank],) float64
                    self.acc = piece if self.acc is None else self.acc + piece
            return
        if self.acc is None:
            self.acc = np.zeros(lay.total)                                # (total,) float64
        for k in lay.names:                    # in place, array by array: no second full buffer
            self.acc[lay.offset[k]:lay.offset[k] + lay.size[k]] += to_numpy(grads[k]).reshape(-1)

    def finish(self, n_micro_total: int) -> dict:
        """-> the mean gradient over all n_micro_total micro-batches, as arrays in the params'
        dtypes: every parameter (stage 0) or this rank's shard only (stages 1, 2)."""
        if self.zero == 0:
            total = self.world.allreduce_(self.acc)
        elif self.zero == 1:
            total = self.world.reduce_scatter(self.acc, self.layout.counts)
        else:
            total = self.acc
        total = total / n_micro_total
        self.acc = None
        out = {k: array_module(self.params[k]).empty_like(self.params[k]) for k in self.mine}
        return unflatten_into(total, out, self.layout, names=self.mine)


def sharded_global_norm(grads: dict, world: World, layout: ShardLayout) -> float:
    """The global norm of the full gradient when each rank holds only its own arrays.

    Each owner computes its arrays' sums of squares (float64) into a vector in the
    parameters' dict order, zeros elsewhere; the all-reduce assembles the vector
    and its sum is taken in that order, as optim.global_norm does unsharded.
    """
    sq = np.zeros(len(layout.order))                                      # (n_arrays,)
    for i, name in enumerate(layout.order):
        if name in grads:
            g = grads[name]
            sq[i] = float(array_module(g).sum(array_module(g).square(g), dtype=np.float64))
    world.allreduce_(sq)
    return float(math.sqrt(float(np.sum(sq))))


def clip_grad_norm_sharded(grads: dict, max_norm: float, world: World, layout: ShardLayout) -> float:
    """optim.clip_grad_norm for sharded gradients: the same global norm and the same scale."""
    total = sharded_global_norm(grads, world, layout)
    if math.isfinite(total) and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in grads.values():
            g *= scale
    return total


# ---------------------------------------------------------------------------
# ZeRO: the optimizer of a shard, then the all-gather of the parameters
# ---------------------------------------------------------------------------

class ZeroOptimizer:
    """An optimizer whose state lives only for this rank's shard of the parameters.

    step(grads) takes the shard's gradients (GradReducer.finish under zero 1 or 2),
    updates the shard's parameters with the inner optimizer, then all-gathers every
    parameter. state_dict() is collective (every rank must call it): it gathers the
    full state, so a checkpoint is the same as an unsharded run's and resumes under
    any number of ranks; load_state_dict(full) keeps this rank's part.
    """

    def __init__(self, name, params: dict, world: World, **kw):
        self.params, self.world = params, world
        self.layout = shard_layout(params, world.size)
        self.mine = self.layout.owned(world.rank)
        self.inner = make_optimizer(name, {k: params[k] for k in self.mine}, **kw) if self.mine else None
        self._kind = make_optimizer(name, {"probe": np.zeros(1, np.float32)}, **kw) if not self.mine else None
        self._lr = kw.get("lr", 0.0)

    @property
    def lr(self):
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = value
        if self.inner is not None:
            self.inner.lr = value

    @property
    def t(self):
        return (self.inner or self._kind).t

    def step(self, grads: dict) -> None:
        if self.inner is not None:
            self.inner.step(grads)
        else:
            self._kind.t += 1
        self._gather_params()

    def _gather_params(self):
        lay, r = self.layout, self.world.rank
        dtype = np.result_type(*[p.dtype for p in self.params.values()])
        piece = flatten(self.params, lay, dtype=dtype, names=self.mine)
        full = self.world.allgather_(piece, np.empty(lay.total, dtype=dtype), lay.counts)
        others = [n for n in lay.names if lay.owner[n] != r]
        sl = {n: full[lay.offset[n]:lay.offset[n] + lay.size[n]] for n in others}
        for n in others:
            p = self.params[n]
            p[...] = array_module(p).asarray(sl[n].reshape(p.shape).astype(p.dtype, copy=False))

    def state_dict(self) -> dict:
        """The full optimizer state (collective)."""
        base = (self.inner or self._kind).state_dict()
        lay = self.layout
        buffers = {}
        for b in base["buffers"]:
            local = base["buffers"][b] if self.inner is not None else {}
            dtype = np.result_type(*[p.dtype for p in self.params.values()])
            piece = flatten(local, lay, dtype=dtype, names=self.mine) if self.mine else np.empty(0, dtype)
            full = self.world.allgather_(piece, np.empty(lay.total, dtype=dtype), lay.counts)
            buffers[b] = {n: full[lay.offset[n]:lay.offset[n] + lay.size[n]].reshape(self.params[n].shape)
                          .astype(self.params[n].dtype).copy() for n in lay.order}
        return {**base, "buffers": buffers}

    def load_state_dict(self, sd: dict) -> None:
        """Restore from a full state_dict (any number of ranks wrote it): this rank's part."""
        part = {**sd, "buffers": {b: {n: a for n, a in named.items() if n in self.mine}
                                  for b, named in sd["buffers"].items()}}
        if self.inner is not None:
            self.inner.load_state_dict(part)
        else:
            self._kind.t = int(sd["t"])


# ---------------------------------------------------------------------------
# Memory accounting: where the bytes of a training step go
# ---------------------------------------------------------------------------

GB = 1e9


def zero_model_states(n_params, n_ranks, stage, k=12, bytes_param=2, bytes_grad=2) -> dict:
    """The ZeRO paper's model-state memory per rank (its section 5, "mixed precision").

    Psi parameters kept in fp16 (2 Psi bytes) with fp16 gradients (2 Psi) and K Psi
    bytes of optimizer state (Adam in mixed precision: fp32 master weights, momentum
    and variance, K = 12); N ranks:

        stage 0   (2 + 2 + K) Psi            stage 2   2 Psi + (2 + K) Psi / N
        stage 1   4 Psi + K Psi / N          stage 3   (2 + 2 + K) Psi / N

    -> {"params", "grads", "optimizer", "total"} in bytes.
    """
    _check_zero_model_states(n_params, n_ranks, stage, k)
    n = n_ranks
    params = bytes_param * n_params / (n if stage >= 3 else 1)
    grads = bytes_grad * n_params / (n if stage >= 2 else 1)
    optimizer = k * n_params / (n if stage >= 1 else 1)
    return {"params": params, "grads": grads, "optimizer": optimizer, "total": params + grads + optimizer}


def _norm_stats(config) -> int:
    return 2 if config.norm == "layernorm" else 1                 # mean and 1/std, or 1/rms alone


def block_activation_elements(config, T: int, train_dropout: bool = False) -> float:
    """Numbers one block's backward cache keeps, per token (gpt._block_forward's caches):

        norms        2 (C + s)          the input and s statistics (LayerNorm 2, RMSNorm 1)
        attention    4 C + W + H T      its input, the scaled queries, the per-head output and
                     (+ Hkv D with RoPE) the heads side by side (C each), the q/k/v buffer of
                                        width W = (H + 2 Hkv) D, the probabilities (H T)
        MLP          C + 3 F  (GELU)    its input, the pre-activation, Phi and the activation
                     C + 4 F  (SwiGLU)  (F = the hidden width), or the up, gate, sigmoid, product
        dropout      2 C + H T          the masks of the two residual branches and attention's
    """
    C, H, Hkv, D, F = config.n_embd, config.n_head, config.kv_heads, config.head_dim, config.mlp_width
    norms = 2 * (C + _norm_stats(config))
    attn = 4 * C + (H + 2 * Hkv) * D + H * T + (Hkv * D if config.pos == "rope" else 0)
    mlp = C + (3 * F if config.mlp == "gelu" else 4 * F)
    drop = (2 * C + H * T) if train_dropout else 0
    return norms + attn + mlp + drop


def activation_bytes(config, batch: int, T: int, activation_checkpointing=False, train_dropout=None,
                     bytes_per=4) -> float:
    """Bytes of the activations a step's backward needs for a micro-batch of ``batch`` x T.

    n_layer blocks' caches (activation checkpointing: n_layer block inputs, C each, plus one
    block's cache, rebuilt in the backward), the final norm and its output (2 C + s), the
    embedding-dropout mask (C), the ids (int64: 2 float32 slots), and the head's three
    B T V arrays at the loss: logits, softmax probabilities and dlogits.
    """
    train_dropout = config.dropout > 0 if train_dropout is None else train_dropout
    C = config.n_embd
    block = block_activation_elements(config, T, train_dropout)
    blocks = config.n_layer * C + block if activation_checkpointing else config.n_layer * block
    rest = 2 * C + _norm_stats(config) + (C if train_dropout else 0) + 2
    return float(bytes_per * batch * T * (blocks + rest + 3 * config.vocab_size))


def memory_per_rank(config, n_params, micro_batch, T, n_ranks=1, stage=0, grad_accum=1,
                    activation_checkpointing=False) -> dict:
    """What a rank of a minillm run holds at the peak of a step, in bytes (float32, AdamW):

        params        4 P                    every stage here (stage 3 would be 4 P / N)
        grads         4 P                    one micro-batch's gradients, as gpt.backward returns them
        grad_sum      8 P    stages 0, 1     the float64 sum over micro-batches and ranks (only
                      8 P/N  stage 2         when there is more than one micro-batch)
        optimizer     8 P    stage 0         AdamW's two moments
                      8 P/N  stages 1, 2
        activations   activation_bytes(...)  of one micro-batch
        workspace     one block's cache      the temporaries of one block's backward (its
                                             gradients with respect to what it cached)
    -> those keys and "total". Stage 3 is the formula alone (parameters sharded too).
    """
    _check_memory_per_rank(n_ranks, stage, grad_accum)
    P, N = float(n_params), n_ranks
    parts = n_ranks * grad_accum
    out = {"params": 4 * P / (N if stage >= 3 else 1),
           "grads": 4 * P,
           "grad_sum": 0.0 if parts == 1 else 8 * P / (N if stage >= 2 else 1),
           "optimizer": 8 * P / (N if stage >= 1 else 1),
           "activations": activation_bytes(config, micro_batch, T, activation_checkpointing),
           "workspace": 4.0 * micro_batch * T * block_activation_elements(config, T, config.dropout > 0)}
    out["total"] = sum(out.values())
    return out


def measure_step_peak(config, micro_batch, T, activation_checkpointing=False, seed=0) -> dict:
    """The peak of NumPy's allocations (tracemalloc) while building the parameters and AdamW
    and taking one training step on a random micro-batch -> {"peak", "params", "optimizer"}.

    The step takes the micro-batch whole, the step memory_per_rank accounts for. On several
    threads gpt.loss_and_grads would cut it into shards (gpt.loss_and_grads_in_shards): the
    activations add up to the same, but each shard holds a gradient set of its own until
    the sum, and the shards' peaks need not coincide, so the peak varies from run to run."""
    import tracemalloc

    from . import gpt
    from .optim import AdamW
    r = np.random.default_rng(seed)
    x = r.integers(0, config.vocab_size, (micro_batch, T))
    y = r.integers(0, config.vocab_size, (micro_batch, T))
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        params = gpt.init_params(config, seed=seed)
        after_params = tracemalloc.get_traced_memory()[0]
        opt = AdamW(params, lr=1e-3)
        after_opt = tracemalloc.get_traced_memory()[0]
        base = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        _, grads = gpt.loss_and_grads_in_shards(params, config, x, y, 1, train=True, rng=np.random.default_rng(seed),
                                                activation_checkpointing=activation_checkpointing)
        opt.step(grads)
        peak = max(base, tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()
    return {"peak": float(peak), "params": float(after_params), "optimizer": float(after_opt - after_params)}


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------

def _check_zero_model_states(n_params, n_ranks, stage, k):
    check_int_arg("n_params", n_params, lo=1)
    check_int_arg("n_ranks", n_ranks, lo=1)
    check_choice("stage", stage, (0, 1, 2, 3))
    check_int_arg("k", k, lo=0)


def _check_memory_per_rank(n_ranks, stage, grad_accum):
    check_int_arg("n_ranks", n_ranks, lo=1)
    check_choice("stage", stage, (0, 1, 2, 3))
    check_int_arg("grad_accum", grad_accum, lo=1)

def _check_shard_layout(params, size):
    if not isinstance(params, dict) or not params:
        raise TypeError(f"params: expected a non-empty dict of arrays, got {type(params).__name__}")
    check_int_arg("size", size, lo=1)


def check_zero(zero) -> int:
    """zero in (0, 1, 2), else ValueError (stage 3, sharding the parameters, is not implemented)."""
    if zero == 3:
        raise ValueError("zero: stage 3 (sharding the parameters themselves) is not implemented; "
                         "expected 0 (plain DDP), 1 (moments sharded) or 2 (gradients too), got 3")
    check_choice("zero", zero, ZERO_STAGES)
    return int(zero)
