"""distributed.py and the loop under it: DDP and ZeRO 1/2 on MPI, gradient accumulation.

What must hold:
- one process, no MPI: a world of one runs everything (mpi4py never imported); the flat
  buffer round-trips exactly; ZeRO's optimizer and the sharded clipping are the unsharded
  ones bit for bit; accumulating micro-batch gradients gives the full batch's gradient to
  float32 round-off;
- ``mpiexec -n 2 ... --ddp`` gives the parameters of one process with ``--grad-accum 2``
  bit for bit (dropout and clipping on), ZeRO-1 and ZeRO-2 those of DDP, a plain run of the
  same global batch to round-off; a rank that dies ends the run with a clear error and the
  last checkpoint intact, from which a resume under 2 ranks, or under 1 with 2 micro-batches,
  ends exactly where the uninterrupted run did;
- mistakes (--zero 3, a batch that does not divide, --ddp without mpi4py) are clear errors.

The MPI cases launch ``mpiexec -n 2 python tests/ddp_worker.py`` (a tiny GPT on synthetic
tokens) once per configuration for the module; they need the ``distributed`` extra.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st

import ddp_worker
from minillm import backend
from minillm import distributed as dist
from minillm import gpt
from minillm.optim import AdamW, clip_grad_norm
from minillm.train import TrainConfig, load_checkpoint, read_metrics, split_batch, train

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "ddp_worker.py")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}


@st.composite
def param_dicts(draw):
    shapes = draw(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 5)), min_size=1, max_size=6))
    seed = draw(st.integers(0, 2**16))
    r = np.random.default_rng(seed)
    return {f"p{i}": (r.standard_normal(s) * 10.0 ** r.integers(-3, 2)).astype(np.float32)
            for i, s in enumerate(shapes)}


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


# --- one process, no MPI ---------------------------------------------------------------

@given(param_dicts(), st.integers(1, 5))
def test_the_layout_gives_every_array_to_one_rank_and_the_buffer_round_trips(params, size):
    lay = dist.shard_layout(params, size)
    assert sorted(lay.names) == sorted(params) and lay.order == tuple(params)
    assert sum(lay.counts) == lay.total == sum(p.size for p in params.values())
    for r in range(size):               # rank r's arrays are contiguous: its slice of the buffer
        sl = lay.shard_slice(r)
        assert [lay.offset[n] for n in lay.owned(r)] == list(np.cumsum([0] + [lay.size[n] for n in lay.owned(r)])[:-1] + sl.start)
    # greedy, largest first: no rank carries more than the mean plus the largest array
    assert max(lay.counts) <= lay.total / size + max(lay.size.values())
    buf = dist.flatten(params, lay)
    assert buf.dtype == np.float64
    back = dist.unflatten_into(buf, {k: np.empty_like(p) for k, p in params.items()}, lay)
    assert same(back, params)


def test_a_world_of_one_needs_no_mpi_and_its_collectives_are_the_identity(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)     # as if not installed
    w = dist.get_world(False)
    assert (w.rank, w.size, w.backend) == (0, 1, "single")
    g = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}
    assert same(dist.allreduce_grads(g, w), g)
    assert same(dist.broadcast_params({k: v.copy() for k, v in g.items()}, w), g)
    with pytest.raises(ValueError, match=r"--ddp: needs mpi4py .*pip install 'minillm\[distributed\]'"):
        dist.get_world(True)


@given(param_dicts(), st.floats(0.01, 100.0))
def test_sharded_clipping_is_unsharded_clipping_bit_for_bit(grads, max_norm):
    w = dist.world_of_one()
    lay = dist.shard_layout(grads, 1)
    a = {k: g.copy() for k, g in grads.items()}
    b = {k: g.copy() for k, g in grads.items()}
    assert dist.clip_grad_norm_sharded(a, max_norm, w, lay) == clip_grad_norm(b, max_norm)
    assert same(a, b)


def test_the_sharded_norm_sums_each_rank_s_arrays_in_the_unsharded_order():
    """Simulate 3 ranks in one process: each owner's vector of squared norms, summed, is
    the vector one process builds; the norm is optim.global_norm's exactly."""
    r = np.random.default_rng(0)
    grads = {f"g{i}": r.standard_normal((i + 1, 3)).astype(np.float32) for i in range(5)}
    lay = dist.shard_layout(grads, 3)
    vectors = []

    class Recorder(dist.World):
        def allreduce_(self, buf):
            vectors.append(buf.copy())
            return buf
    for rank in range(3):
        dist.sharded_global_norm({n: grads[n] for n in lay.owned(rank)}, Recorder(), lay)
    assembled = vectors[0] + vectors[1] + vectors[2]
    assert np.count_nonzero(np.stack(vectors), axis=0).tolist() == [1] * 5   # each array on one rank
    from minillm.optim import global_norm
    assert float(np.sqrt(np.sum(assembled))) == global_norm(grads)


def test_zero_optimizer_in_a_world_of_one_is_adamw_bit_for_bit_and_saves_the_same_state():
    r = np.random.default_rng(1)
    p1 = {"w": r.standard_normal((4, 3)).astype(np.float32), "b": r.standard_normal(3).astype(np.float32)}
    p2 = {k: v.copy() for k, v in p1.items()}
    plain = AdamW(p1, lr=0.1, weight_decay=0.1, betas=(0.9, 0.95))
    zero = dist.ZeroOptimizer("adamw", p2, dist.world_of_one(), lr=0.1, weight_decay=0.1, betas=(0.9, 0.95))
    for _ in range(3):
        g = {k: r.standard_normal(v.shape).astype(np.float32) for k, v in p1.items()}
        plain.step(g)
        zero.step({k: v.copy() for k, v in g.items()})
    assert same(p1, p2) and zero.t == plain.t == 3
    sa, sb = plain.state_dict(), zero.state_dict()
    assert all(same(sa["buffers"][b], sb["buffers"][b]) for b in sa["buffers"])
    other = dist.ZeroOptimizer("adamw", {k: v.copy() for k, v in p1.items()}, dist.world_of_one(), lr=0.1)
    other.load_state_dict(sa)
    assert same(other.state_dict()["buffers"]["exp_avg"], sa["buffers"]["exp_avg"])


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_accumulated_micro_batches_give_the_full_batch_gradient_to_round_off(zero):
    config = gpt.GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=16)
    params = gpt.init_params(config, seed=0)
    r = np.random.default_rng(0)
    x, y = r.integers(0, 13, (8, 8)), r.integers(0, 13, (8, 8))
    _, full = gpt.loss_and_grads(params, config, x, y)
    red = dist.GradReducer(params, dist.world_of_one(), zero)
    red.begin()
    for mx, my in split_batch((x, y), 4):
        red.add(gpt.loss_and_grads(params, config, mx, my)[1])
    acc = red.finish(4)
    assert set(acc) == set(full)
    for k in full:
        np.testing.assert_allclose(acc[k], full[k], rtol=2e-5, atol=2e-7)


def test_bad_input_is_a_clear_error(tmp_path):
    task = ddp_worker.CrashingTask(gpt.GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=16),
                                   gpt.init_params(gpt.GPTConfig(vocab_size=13, block_size=8, n_layer=1,
                                                                 n_head=2, n_embd=16)),
                                   None, ddp_worker.tokens(500, 13, 0), ddp_worker.tokens(100, 13, 1), 6, 8, np,
                                   world=dist.world_of_one())
    cfg = TrainConfig(max_steps=2, batch_size=6, block_size=8, warmup_steps=0, grad_accum_steps=4,
                      out_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"batch_size: expected a global batch divisible by ranks x "
                                         r"grad_accum_steps = 1 x 4 = 4, got 6"):
        train(task, cfg, log=lambda s: None)
    with pytest.raises(ValueError, match=r"zero: stage 3 .* is not implemented"):
        train(task, TrainConfig(max_steps=2, batch_size=6, out_dir=str(tmp_path)), zero=3)
    with pytest.raises(ValueError, match=r"zero: expected one of \(0, 1, 2\), got 5"):
        dist.check_zero(5)
    with pytest.raises(ValueError, match="batch_size: expected a batch whose 6 rows divide into 4"):
        split_batch((np.zeros((6, 2)), np.zeros((6, 2))), 4)


def _cli(args, block_mpi=False, cwd=None):
    pre = "import sys; sys.modules['mpi4py'] = None; " if block_mpi else ""
    code = pre + "from minillm.__main__ import main; sys.exit(main(sys.argv[1:]))"
    if not block_mpi:
        code = "import sys; " + code
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=120)


def test_command_line_mistakes_exit_2_with_one_line(tmp_path):
    tiny = ["train", "--preset", "tiny", "--max-steps", "1", "--sample-tokens", "0", "--out", str(tmp_path / "r")]
    cases = [(tiny + ["--ddp", "--zero", "3"], False, "--zero 3 (sharding the parameters too) is not implemented"),
             (tiny + ["--zero", "1"], False, "--zero 1 shards state across the ranks of a --ddp run; add --ddp"),
             (tiny + ["--ddp"], True, "--ddp: needs mpi4py and an MPI library (pip install 'minillm[distributed]'"),
             (tiny + ["--batch-size", "6", "--grad-accum", "4"], False,
              "--batch-size 6 (the global batch) must divide into 1 rank(s) x 4 micro-batch(es) = 4 equal parts")]
    for argv, block, words in cases:
        res = _cli(argv, block_mpi=block, cwd=tmp_path)
        assert res.returncode == 2, (argv, res.stderr)
        assert words in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_one_process_trains_with_accumulation_without_mpi4py(tmp_path):
    code = ("import sys; sys.modules['mpi4py'] = None; sys.path.insert(0, 'tests'); import ddp_worker; "
            f"ddp_worker.main([{str(tmp_path / 'a')!r}, '--accum', '2', '--steps', '3']); "
            "assert 'mpi4py.MPI' not in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert load_checkpoint(tmp_path / "a")["step"] == 3


# --- two ranks under mpiexec ----------------------------------------------------------

def _mpiexec():
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'minillm[distributed]')")
    exe = shutil.which("mpiexec")
    if exe is None:
        pytest.fail("mpi4py is installed but mpiexec is not on PATH (the mpich wheel provides it)")
    return exe


def _launch(exe, out, *args, n=2):
    return subprocess.run([exe, "-n", str(n), sys.executable, WORKER, str(out), "--ddp", *args],
                          capture_output=True, text=True, env=ENV, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every configuration trained once: {name: run directory} (and the crashed run's result)."""
    exe = _mpiexec()
    d = tmp_path_factory.mktemp("ddp")
    out = {}
    for name, args in [("ddp", ()), ("zero1", ("--zero", "1")), ("zero2", ("--zero", "2")),
                       ("ddp_nodrop", ("--dropout", "0"))]:
        res = _launch(exe, d / name, *args)
        assert res.returncode == 0, res.stderr
        out[name] = d / name
    # The ranks run on one thread each (OPENBLAS_NUM_THREADS=1 in ENV), so the runs in this
    # process do too: on several threads gpt.loss_and_grads cuts each micro-batch into
    # shards, which changes the round-off and, under dropout, which masks are drawn.
    before = backend.num_threads()
    backend.set_num_threads(1)
    try:
        for name, args in [("accum2", ["--accum", "2"]), ("plain_nodrop", ["--dropout", "0"])]:
            ddp_worker.main([str(d / name), *args])
            out[name] = d / name
        out["crash"] = _launch(exe, d / "crash", "--crash-rank", "1", "--crash-step", "5")
        out["crash_step"] = load_checkpoint(d / "crash")["step"]
        shutil.copytree(d / "crash", d / "resume1")
        out["resumed2"] = _launch(exe, d / "crash", "--resume")
        ddp_worker.main([str(d / "resume1"), "--accum", "2", "--resume"])
    finally:
        backend.set_num_threads(before)
    out["dirs"] = d
    return out


def params_of(run_dir):
    return load_checkpoint(run_dir)["params"]


def test_two_ranks_equal_one_process_accumulating_two_micro_batches_bit_for_bit(runs):
    assert same(params_of(runs["ddp"]), params_of(runs["accum2"]))
    losses = [r["loss"] for r in read_metrics(runs["ddp"]) if r["kind"] == "train"]
    assert losses == [r["loss"] for r in read_metrics(runs["accum2"]) if r["kind"] == "train"]
    # clipping was at work (the worker clips at 0.05), so it is exact too
    assert min(r["grad_norm"] for r in read_metrics(runs["ddp"]) if r["kind"] == "train") > 0.05


def test_zero_1_and_2_equal_ddp_bit_for_bit(runs):
    ref = load_checkpoint(runs["ddp"])
    for name in ("zero1", "zero2"):
        ck = load_checkpoint(runs[name])
        assert same(ck["params"], ref["params"]), name
        for b in ref["optimizer"]["buffers"]:       # the gathered moments are DDP's too
            assert same(ck["optimizer"]["buffers"][b], ref["optimizer"]["buffers"][b]), (name, b)


def test_ddp_agrees_with_a_plain_run_of_the_same_global_batch_to_round_off(runs):
    a, b = params_of(runs["ddp_nodrop"]), params_of(runs["plain_nodrop"])
    assert not same(a, b)                         # different sums: not bit for bit ...
    for k in a:                                   # ... but to float32 round-off, through 6 Adam steps
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=2e-5, err_msg=k)


def test_a_dying_rank_ends_the_run_clearly_and_resume_continues_exactly(runs):
    crash = runs["crash"]
    assert crash.returncode != 0
    assert "rank 1 of 2 failed: RuntimeError: simulated failure of rank 1" in crash.stderr
    assert "last complete checkpoint" in crash.stderr
    assert runs["crash_step"] == 4               # written (and waited for) before step 5
    assert runs["resumed2"].returncode == 0, runs["resumed2"].stderr
    ref = params_of(runs["ddp"])
    assert same(params_of(runs["dirs"] / "crash"), ref)             # resumed under 2 ranks
    assert same(params_of(runs["dirs"] / "resume1"), ref)           # resumed under 1 rank x 2 micro-batches


def test_the_command_line_under_mpiexec_equals_grad_accum(tmp_path):
    exe = _mpiexec()
    text = "".join(f"ACT {i}. Enter the {i % 7}th player, and speaks.\n" for i in range(400))
    (tmp_path / "t.txt").write_text(text)
    common = ["train", "--preset", "tiny", "--data", "t.txt", "--max-steps", "3", "--batch-size", "8",
              "--sample-tokens", "0"]
    res = subprocess.run([exe, "-n", "2", sys.executable, "-m", "minillm", *common, "--ddp", "--zero", "1",
                          "--out", "ddp"], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("final: train loss") == 1            # only rank 0 reports
    assert "data parallel: 2 ranks (mpi), ZeRO stage 1" in res.stdout
    one = _cli([*common, "--grad-accum", "2", "--out", "one"], cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    assert same(params_of(tmp_path / "ddp"), params_of(tmp_path / "one"))


# --- memory accounting ----------------------------------------------------------------

def test_the_zero_paper_example_7_5b_parameters_on_64_gpus():
    """ZeRO (Rajbhandari et al. 2020), figure 1: Psi = 7.5B, N = 64, K = 12, mixed precision."""
    got = [round(dist.zero_model_states(7_500_000_000, 64, s)["total"] / 1e9, 1) for s in range(4)]
    assert got == [120.0, 31.4, 16.6, 1.9]
    import argparse

    import minillm.cli.memory as mem
    from minillm.__main__ import main
    lines = []
    p = argparse.ArgumentParser()
    mem.add_arguments(p)
    assert mem.run(p.parse_args(["--params", "7.5e9", "--ranks", "64"]), log=lines.append) == 0
    totals = [ln.split()[-1] for ln in lines[2:]]
    assert totals == ["120.0", "31.4", "16.6", "1.9"] and "GB per rank" in lines[0]
    assert main(["memory", "--params", "0.5"]) == 2          # a mistake: one line, exit 2


@given(st.integers(1, 10**9), st.integers(1, 256))
def test_each_zero_stage_removes_what_it_says(n_params, n):
    s = [dist.zero_model_states(n_params, n, stage) for stage in range(4)]
    assert s[0]["total"] == 16 * n_params
    assert s[1]["optimizer"] == pytest.approx(s[0]["optimizer"] / n) and s[1]["grads"] == s[0]["grads"]
    assert s[2]["grads"] == pytest.approx(s[0]["grads"] / n) and s[2]["params"] == s[0]["params"]
    assert s[3]["total"] == pytest.approx(s[0]["total"] / n)
    assert s[0]["total"] >= s[1]["total"] >= s[2]["total"] >= s[3]["total"]


SIZES = [gpt.GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=16),
         gpt.GPTConfig(vocab_size=65, block_size=64, n_layer=3, n_head=4, n_embd=64, dropout=0.1)]
MARGIN = 0.2      # the accounting is within 20% of tracemalloc's peak


@pytest.mark.parametrize("config,batch", [(SIZES[0], 4), (SIZES[1], 8)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_accounting_agrees_with_the_measured_peak(config, batch, checkpointing):
    n_params = sum(int(np.prod(s)) for s in gpt.param_shapes(config).values())
    acc = dist.memory_per_rank(config, n_params, batch, config.block_size, 1, 0, 1, checkpointing)
    m = dist.measure_step_peak(config, batch, config.block_size, checkpointing)
    # the arrays themselves, to within Python's own objects (a dict, array headers: a few KB)
    assert m["params"] == pytest.approx(acc["params"], rel=0.01, abs=16e3)
    assert m["optimizer"] == pytest.approx(acc["optimizer"], rel=0.01, abs=16e3)
    assert abs(m["peak"] / acc["total"] - 1) <= MARGIN, (m, acc)


def test_activation_accounting_counts_what_the_caches_hold():
    """The formula per block against the bytes of the arrays a real forward's cache keeps."""
    for config in [SIZES[0], gpt.GPTConfig(vocab_size=9, block_size=8, n_layer=1, n_head=4, n_embd=16,
                                           n_kv_head=2, norm="rmsnorm", pos="rope", mlp="swiglu", bias=False)]:
        B, T = 3, config.block_size
        params = gpt.init_params(config, seed=0)
        _, cache = gpt.forward(params, config, np.zeros((B, T), np.int64))
        seen, total = {id(p) for p in params.values()}, 0
        stack = [cache.blocks[0]]
        while stack:
            o = stack.pop()
            if isinstance(o, np.ndarray):
                base = o
                while base.base is not None:
                    base = base.base
                if id(base) not in seen and base.dtype == np.float32:
                    seen.add(id(base))
                    total += base.nbytes
            elif isinstance(o, (tuple, list)):
                stack.extend(o)
        rope_tables = 4 * (T * config.head_dim // 2) * 4 if config.pos == "rope" else 0   # cos/sin, q and k
        assert total - rope_tables == 4 * B * T * dist.block_activation_elements(config, T)


def test_bench_distributed_prints_a_row_per_rank_count_and_stage():
    _mpiexec()
    import argparse

    from minillm.bench import distributed as bench
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    lines = []
    args = p.parse_args(["--preset", "tiny", "--batch-size", "4", "--block-size", "8", "--steps", "1",
                         "--ranks", "2,3", "--zero", "1"])
    assert bench.run(args, log=lines.append) == 0
    row = lines[2].split()
    assert row[:2] == ["2", "1"] and float(row[2]) > 0 and float(row[4]) > 0   # comm time measured
    assert "skipped: batch 4 does not divide into 3 ranks" in lines[3]
