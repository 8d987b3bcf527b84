"""python -m minillm quantize [CHECKPOINT] --bits 8|4 --scheme ... --group-size N

Quantizes a trained GPT checkpoint, writes the quantized checkpoint, and prints one
table row per scheme: bytes, validation perplexity against float32, and speed.

What is quantized: every 2-D weight matrix (attention, MLP, and the embeddings);
norm gains and biases stay float32 (they are a fraction of a percent of the bytes
and sensitive to rounding). Weights are (in, out) with groups running down the
input dimension. The token embedding ``wte`` (V, C) is also the LM head (the
logits are x @ wte^T), so it is quantized as the head matrix wte^T (C, V):
"channel" then means one scale per vocabulary entry and groups run along C, the
dimension the head's matmul sums over. The position embedding is treated the same
way. ``--embeddings float`` keeps both in float32 instead (the table says which).

How it is measured:
  perplexity  exp(mean next-token cross-entropy) on the first ``--eval-windows``
              non-overlapping windows of block_size tokens of the validation
              text, the same windows for every row, with the weights dequantized
              into a float32 copy of the parameters.
  bytes       of the quantized matrices (codes + scales + zero points), and of the
              whole model (plus the float32 norms and biases).
  tokens/s    of one forward pass over a batch *including* dequantizing every
              weight first: the cost of keeping the weights quantized in memory and
              expanding them per batch. NumPy has no int4/int8 GEMM, so the matmuls
              themselves run in float32 for every row; a separate line times the
              LLM.int8() matmul against a float32 matmul on one of the model's layers.

The quantized checkpoint (default ``<run>/quantized-<bits>-<scheme>-<granularity>.npz``)
holds the codes, scales and zero points of each matrix, the float parameters,
and a JSON entry with the model config, the tokenizer and the settings; read it
back with :func:`load_quantized`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from minillm import gpt
from minillm.backend import array_module, device_name, synchronize, to_device, to_numpy, xp_for
from minillm.bench._util import print_table
from minillm.cli import common
from minillm.cli.common import UsageError
from minillm.data import join_documents, load_documents, load_tokens, split_documents
from minillm.quantization import (GRANULARITIES, SCHEMES, QuantizedTensor, bf16_round, fp16_round,
                                  llm_int8_matmul, quantize)
from minillm.tokenizer import tokenizer_from_dict
from minillm.train import latest_run, load_checkpoint

EMBEDDINGS = ("wte", "wpe", "lm_head")   # stored (rows, C) and used as x @ w^T: quantize w^T
QUANTIZED_FORMAT = "minillm-quantized"
QUANTIZED_FORMAT_VERSION = 1


def add_arguments(parser):
    parser.add_argument("checkpoint", nargs="?", default=None,
                        help="a run directory or checkpoint.npz (default: the latest run under runs/)")
    parser.add_argument("--bits", type=int, choices=[4, 8], default=8, help="bits per weight to write")
    parser.add_argument("--scheme", choices=SCHEMES, default="symmetric",
                        help="integer grid (symmetric/asymmetric) or NF4 (4-bit only)")
    parser.add_argument("--granularity", choices=GRANULARITIES, default=None,
                        help="one scale per tensor, per output channel, or per group "
                             "(default: channel for 8 bits, group for 4)")
    parser.add_argument("--group-size", type=common.positive_int, default=128,
                        help="rows per group (must divide every matrix's input dimension)")
    parser.add_argument("--embeddings", choices=["quantize", "float"], default="quantize",
                        help="quantize the (tied) embeddings as the LM head, or keep them float32")
    parser.add_argument("--out", default=None, help="where to write the quantized checkpoint "
                             "(default: <run>/quantized-int<bits>-<scheme>-<granularity>.npz)")
    parser.add_argument("--compare", choices=["all", "selected"], default="all",
                        help="table rows: the standard set of schemes, or only float32 and the selected one")
    parser.add_argument("--eval-windows", type=common.positive_int, default=256,
                        help="validation windows of block_size tokens for the perplexity")
    parser.add_argument("--batch-size", type=common.positive_int, default=32, help="windows per forward pass")
    parser.add_argument("--threshold", type=common.positive_number, default=6.0,
                        help="LLM.int8() outlier threshold for the matmul timing line")
    parser.add_argument("--data", default=None,
                        help="text file the model was trained on (default: what the checkpoint records, "
                             "else Shakespeare)")
    parser.add_argument("--val-fraction", type=common.fraction, default=None,
                        help="validation fraction of the train/val split (default: the checkpoint's, else 0.1)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default=None,
                        help="where to evaluate (default: MINILLM_DEVICE or cpu)")


# ---------------------------------------------------------------------------
# Quantizing a parameter dict
# ---------------------------------------------------------------------------

def _is_embedding(name):
    return name in EMBEDDINGS


def quantize_params(params, bits=8, scheme="symmetric", granularity="channel", group_size=128,
                    embeddings="quantize"):
    """-> (qparams {name: QuantizedTensor}, float_params {name: array}).

    Every 2-D array is quantized (embeddings as their transpose, see the module
    docstring; left in float when embeddings="float"); the rest is kept as is.
    A group size that does not divide a matrix's input dimension is a ValueError
    naming the matrix.
    """
    if embeddings not in ("quantize", "float"):
        raise ValueError(f"embeddings: expected 'quantize' or 'float', got {embeddings!r}")
    qparams, float_params = {}, {}
    for name, p in params.items():
        if p.ndim != 2 or (_is_embedding(name) and embeddings == "float"):
            float_params[name] = p
            continue
        w = p.T if _is_embedding(name) else p
        try:
            qparams[name] = quantize(w, bits=bits, scheme=scheme, granularity=granularity,
                                     group_size=group_size)
        except ValueError as e:
            raise ValueError(f"{e} (while quantizing {name!r} as a {tuple(w.shape)} matrix)") from e
    return qparams, float_params


def dequantize_params(qparams, float_params, order=None):
    """The float parameter dict a model can run with (embeddings transposed back)."""
    out = dict(float_params)
    for name, qt in qparams.items():
        w = qt.dequantize()
        out[name] = w.T.copy() if _is_embedding(name) else w
    if order is not None:
        out = {k: out[k] for k in order}
    return out


def _round16_params(params, fmt):
    rnd = bf16_round if fmt == "bf16" else fp16_round
    out = {}
    for name, p in params.items():
        if p.dtype != np.float32:
            raise TypeError(f"params[{name!r}]: expected float32 to round to {fmt}, got {p.dtype}")
        out[name] = rnd(p)
        xp = array_module(p)
        if not bool(xp.all(xp.isfinite(out[name]))):
            raise ValueError(f"params[{name!r}]: a value overflows {fmt}")
    return out


# ---------------------------------------------------------------------------
# The quantized checkpoint file
# ---------------------------------------------------------------------------

def save_quantized(path, qparams, float_params, meta) -> Path:
    """Write a quantized checkpoint atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays, info = {}, {}
    for name, qt in qparams.items():
        arrays[f"q:{name}:data"] = to_numpy(qt.data)
        arrays[f"q:{name}:scale"] = to_numpy(qt.scale)
        if qt.zero_point is not None:
            arrays[f"q:{name}:zero_point"] = to_numpy(qt.zero_point)
        info[name] = {"shape": list(qt.shape), "dtype": str(np.dtype(qt.dtype)), "bits": qt.bits,
                      "scheme": qt.scheme, "granularity": qt.granularity, "group_size": qt.group_size,
                      "transposed": _is_embedding(name)}
    for name, p in float_params.items():
        arrays[f"params:{name}"] = to_numpy(p)
    full_meta = dict(meta, format=QUANTIZED_FORMAT, format_version=QUANTIZED_FORMAT_VERSION,
                     quantized=info, float_params=list(float_params))
    arrays["__meta__"] = np.frombuffer(json.dumps(full_meta).encode("utf-8"), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def is_quantized_checkpoint(path) -> bool:
    """Whether ``path`` is a file written by :func:`save_quantized` (reads only its metadata)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            if "__meta__" not in z.files:
                return False
            return json.loads(bytes(z["__meta__"]).decode("utf-8")).get("format") == QUANTIZED_FORMAT
    except (ValueError, OSError, EOFError, AttributeError, UnicodeDecodeError):
        return False


def load_quantized(path):
    """-> {"qparams", "float_params", "params" (dequantized, ready to run), "meta"}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no quantized checkpoint at {str(path)!r}")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["__meta__"]).decode("utf-8"))
            if meta.get("format") != QUANTIZED_FORMAT or meta.get("format_version") != QUANTIZED_FORMAT_VERSION:
                raise ValueError(f"format {meta.get('format')!r} version {meta.get('format_version')!r}")
            qparams = {}
            for name, i in meta["quantized"].items():
                zp = z[f"q:{name}:zero_point"] if f"q:{name}:zero_point" in z.files else None
                qparams[name] = QuantizedTensor(z[f"q:{name}:data"], z[f"q:{name}:scale"], zp,
                                                tuple(i["shape"]), np.dtype(i["dtype"]), i["bits"],
                                                i["scheme"], i["granularity"], i["group_size"])
            float_params = {name: z[f"params:{name}"] for name in meta["float_params"]}
    except (KeyError, ValueError, OSError, EOFError) as e:
        raise ValueError(f"path: {str(path)!r} is not a readable minillm quantized checkpoint "
                         f"({type(e).__name__}: {e})") from e
    order = meta.get("param_names")
    return {"qparams": qparams, "float_params": float_params,
            "params": dequantize_params(qparams, float_params, order), "meta": meta}


# ---------------------------------------------------------------------------
# Evaluation data
# ---------------------------------------------------------------------------

def validation_text(ck, data=None, val_fraction=None):
    """The validation text the checkpoint's model was *not* trained on, and a note saying
    where it came from: the data file and val_fraction its TrainConfig records (the split
    is data.split_documents with seed 0, as training does), unless overridden."""
    cfg = ck.get("config") or {}
    data = data if data is not None else cfg.get("data")
    vf = val_fraction if val_fraction is not None else cfg.get("val_fraction", 0.1)
    vf = 0.1 if vf is None else float(vf)
    docs = load_documents(data)
    _, val = split_documents(docs, val_fraction=vf, seed=0)
    source = f"{data if data else 'Shakespeare'} (val_fraction={vf}; " \
             f"{len(val)} held-out document{'s' if len(val) != 1 else ''})"
    return join_documents(val), source


def eval_windows(tokenizer, text, n_windows, block_size):
    """(n_windows, block_size + 1) int64: consecutive non-overlapping windows from the start
    of ``text`` (each window's last token is the next window's first input's target)."""
    need = n_windows * block_size + 1
    chars = min(len(text), need * 4)
    while True:
        ids = np.asarray(tokenizer.encode(text[:chars]), dtype=np.int64)
        if len(ids) >= need or chars >= len(text):
            break
        chars = min(len(text), chars * 2)
    return token_windows(ids, n_windows, block_size)


def token_windows(ids, n_windows, block_size):
    """(n, block_size + 1) consecutive non-overlapping windows of ``ids``, n <= n_windows."""
    if len(ids) < block_size + 1:
        raise ValueError(f"data: the validation text has {len(ids)} tokens, fewer than one window of "
                         f"block_size + 1 = {block_size + 1}")
    n = min(n_windows, (len(ids) - 1) // block_size)
    starts = np.arange(n) * block_size
    return ids[starts[:, None] + np.arange(block_size + 1)[None, :]]


def checkpoint_windows(ck, tokenizer, block_size, n_windows, data=None, val_fraction=None):
    """-> (windows (n, block_size + 1) int64, a note on where they came from).

    The run's own val.npy when it has one and neither ``data`` nor ``val_fraction``
    overrides it: exactly the tokens its validation loss was measured on. Otherwise
    the held-out text of :func:`validation_text`, tokenized here."""
    val_file = Path(ck["path"]).parent / "val.npy"
    if data is None and val_fraction is None and val_file.is_file():
        ids = np.asarray(load_tokens(val_file)[: n_windows * block_size + 1], dtype=np.int64)
        return token_windows(ids, n_windows, block_size), f"{val_file} (the run's own validation tokens)"
    text, source = validation_text(ck, data, val_fraction)
    return eval_windows(tokenizer, text, n_windows, block_size), source


def mean_loss(params, config, windows, batch_size, xp):
    """Mean next-token cross-entropy over all windows (every token counts once)."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = xp.asarray(windows[i:i + batch_size])
        n = w.shape[0] * (w.shape[1] - 1)
        total += gpt.loss(params, config, w[:, :-1], w[:, 1:]) * n
        count += n
    return total / count


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------

def _variants(args, granularity):
    """[(label, kind, settings)]: the table's rows (kind "float" | "16" | "int")."""
    g = args.group_size
    selected = ("int", dict(bits=args.bits, scheme=args.scheme, granularity=granularity, group_size=g))
    rows = [("float32", "float", None)]
    if args.compare == "all":
        rows += [("bf16", "16", "bf16"), ("fp16", "16", "fp16")]
        for bits, scheme, gran in [(8, "symmetric", "tensor"), (8, "symmetric", "channel"),
                                   (8, "asymmetric", "channel"), (4, "symmetric", "channel"),
                                   (4, "symmetric", "group"), (4, "asymmetric", "group"), (4, "nf4", "group")]:
            rows.append(("int", dict(bits=bits, scheme=scheme, granularity=gran, group_size=g)))
    if selected not in rows:
        rows.append(selected)
    out = []
    for r in rows:
        if r[0] == "int":
            s = r[1]
            name = "nf4" if s["scheme"] == "nf4" else f"int{s['bits']} {s['scheme'][:3]}"
            gdesc = f"group {s['group_size']}" if s["granularity"] == "group" else s["granularity"]
            out.append((f"{name} {gdesc}", "int", s))
        else:
            out.append(r)
    return out


def _nbytes(a):
    return int(a.nbytes)


def _time_best(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        synchronize(out if hasattr(out, "shape") else None)
        best = min(best, time.perf_counter() - t0)
    return best


def run(args):
    """Quantize, compare every scheme's size, perplexity and speed in a table, and write the
    selected scheme's checkpoint."""
    granularity = args.granularity or ("channel" if args.bits == 8 else "group")
    if args.scheme == "nf4" and args.bits != 4:
        raise UsageError("--bits: the nf4 scheme is 4-bit, got --bits 8 (use --bits 4)")
    if args.out and Path(args.out).is_dir():
        raise UsageError(f"--out: {args.out!r} is a directory; give the path of the .npz file to write")
    ck, config, tokenizer = load_gpt_checkpoint(args.checkpoint)
    device = device_name(args.device)
    xp = xp_for(device)
    params = to_device({k: v for k, v in ck["params"].items()}, device)
    T = config.block_size
    windows, source = checkpoint_windows(ck, tokenizer, T, args.eval_windows, args.data, args.val_fraction)
    print(f"checkpoint  {ck['path']} (step {ck['step']}, {sum(int(p.size) for p in params.values()):,} "
          f"parameters, n_embd {config.n_embd}, vocab {config.vocab_size})")
    print(f"validation  {source}: {windows.shape[0]} windows x {T} tokens = {windows.shape[0] * T:,} tokens, "
          f"on {device}")
    print(f"embeddings  {'quantized as the LM head (wte^T), like every other matrix' if args.embeddings == 'quantize' else 'kept in float32'}")
    bench_batch = xp.asarray(windows[:min(args.batch_size, len(windows)), :-1])
    selected = dict(bits=args.bits, scheme=args.scheme, granularity=granularity, group_size=args.group_size)
    rows, selected_q = compare_schemes(args, params, config, windows, bench_batch, selected, xp)
    print()
    print_table(rows, ["scheme", "weights MiB", "smaller", "model MiB", "val loss", "ppl", "vs f32",
                       "tok/s", "quant s"])
    print("\nweights: the quantized matrices with their scales and zero points; model: plus the "
          "float32 norms and biases (16-bit rows: everything in 16 bits).")
    print("tok/s: one forward pass over a batch of "
          f"{bench_batch.shape[0]}x{bench_batch.shape[1]} tokens, including dequantizing every weight "
          "first; the matmuls run in float32 in every row.")
    _time_int8_matmul(params, _matrices(params, args.embeddings), bench_batch.size, args.threshold, xp, device)
    if selected_q is not None:
        out = Path(args.out) if args.out else Path(ck["path"]).parent / \
            f"quantized-int{args.bits}-{args.scheme}-{granularity}.npz"
        meta = {"source": ck["path"], "step": ck["step"], "model_config": ck["model_config"],
                "tokenizer": ck["tokenizer"], "param_names": list(params), "embeddings": args.embeddings,
                "settings": dict(selected), "validation": {"source": source, "tokens": windows.shape[0] * T}}
        save_quantized(out, selected_q[0], selected_q[1], meta)
        print(f"\nwrote {out} ({out.stat().st_size / 2**20:.3f} MiB on disk): the row marked *")
    return 0


def load_gpt_checkpoint(path=None):
    """(checkpoint dict, GPTConfig, tokenizer) of a GPT run (default: the latest under runs/)."""
    ck = load_checkpoint(Path(path) if path else latest_run())
    mc = ck.get("model_config")
    if not isinstance(mc, dict) or ck.get("tokenizer") is None:
        raise UsageError(f"checkpoint: {ck['path']!r} has no model config or tokenizer; quantize needs a GPT "
                         f"trained by python -m minillm train")
    try:
        config = gpt.GPTConfig.from_dict(mc)
    except (TypeError, ValueError) as e:
        raise UsageError(f"checkpoint: {ck['path']!r} does not hold a GPT ({e}); quantize needs a GPT "
                         f"trained by python -m minillm train") from e
    return ck, config, tokenizer_from_dict(ck["tokenizer"])


def _matrices(params, embeddings):
    """Names of the matrices a scheme quantizes (the embeddings too unless kept float)."""
    return [k for k, p in params.items() if p.ndim == 2 and (embeddings == "quantize" or not _is_embedding(k))]


def compare_schemes(args, params, config, windows, bench_batch, selected, xp):
    """The table's rows, one per scheme of _variants, and the selected scheme's
    (qparams, float_params) (None when it is not among them)."""
    mats = _matrices(params, args.embeddings)
    f32_mat_bytes = sum(_nbytes(params[k]) for k in mats)
    other_bytes = sum(_nbytes(p) for k, p in params.items() if k not in mats)
    rows, base_ppl, selected_q = [], None, None
    for label, kind, s in _variants(args, selected["granularity"]):
        t0 = time.perf_counter()
        run_params, wbytes, expand, q = _apply_scheme(kind, s, params, args.embeddings, f32_mat_bytes)
        if kind == "int" and s == selected:
            selected_q = q
        quant_s = time.perf_counter() - t0
        val_loss = mean_loss(run_params, config, windows, args.batch_size, xp)
        ppl = math.exp(val_loss)
        base_ppl = ppl if base_ppl is None else base_ppl
        fwd = _time_best(lambda: gpt.forward(expand(), config, bench_batch)[0])
        model_bytes = wbytes + other_bytes if kind != "16" else (wbytes + other_bytes // 2)
        rows.append([("* " if kind == "int" and s == selected else "  ") + label,
                     f"{wbytes / 2**20:.3f}", f"{f32_mat_bytes / wbytes:.2f}x", f"{model_bytes / 2**20:.3f}",
                     f"{val_loss:.4f}", f"{ppl:.3f}", f"{100 * (ppl / base_ppl - 1):+.2f}%",
                     f"{bench_batch.size / fwd:,.0f}", f"{quant_s:.2f}"])
    return rows, selected_q


def _apply_scheme(kind, setting, params, embeddings, f32_mat_bytes):
    """(the parameters to evaluate, the bytes of their matrices, a function that rebuilds them
    from what is stored (timed with each forward pass), (qparams, float_params) or None)."""
    if kind == "float":
        return params, f32_mat_bytes, lambda: params, None
    if kind == "16":
        return _round16_params(params, setting), f32_mat_bytes // 2, lambda: _round16_params(params, setting), None
    qparams, fparams = quantize_params(params, embeddings=embeddings, **setting)
    order = list(params)
    return (dequantize_params(qparams, fparams, order), sum(qt.nbytes for qt in qparams.values()),
            lambda: dequantize_params(qparams, fparams, order), (qparams, fparams))


def _time_int8_matmul(params, mats, n_rows, threshold, xp, device):
    """The LLM.int8() matmul on one of the model's layers, against float32, on random rows."""
    wname = next((k for k in ("h.0.mlp.w1", "h.0.mlp.w_up", "h.0.attn.w_qkv") if k in params), mats[0])
    W = params[wname] if not _is_embedding(wname) else params[wname].T
    rng = np.random.default_rng(0)
    X = xp.asarray(rng.standard_normal((n_rows, W.shape[0])).astype(np.float32))
    Wq = quantize(W, 8, "symmetric", "channel")
    t_f = _time_best(lambda: X @ W)
    t_q = _time_best(lambda: llm_int8_matmul(X, Wq, threshold=threshold))
    err = float(xp.linalg.norm(llm_int8_matmul(X, Wq, threshold=threshold) - X @ W) / xp.linalg.norm(X @ W))
    print(f"\nLLM.int8() matmul on {wname} {tuple(W.shape)} with {X.shape[0]} random N(0,1) rows: "
          f"{X.shape[0] / t_q:,.0f} rows/s vs float32 {X.shape[0] / t_f:,.0f} rows/s "
          f"(relative error {err:.2e}). On {device}, the int8 products are summed by a float GEMM "
          "(exact, see int8_matmul_exact) plus per-row quantization: it shows the arithmetic, "
          "not an int8 kernel's speed.")
