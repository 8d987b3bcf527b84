"""Checkpoints: minillm's own (to resume training exactly) and Hugging Face's (to exchange weights).

**Native checkpoints.** ``run_dir/checkpoint.npz`` is one uncompressed NumPy
archive holding

    params:NAME              every parameter array (dtype kept)
    optimizer:BUFFER:NAME    every optimizer buffer (Adam's exp_avg, exp_avg_sq, ...)
    __meta__                 one JSON document as uint8 bytes: format, format_version,
                             step, param_names, optimizer (type, t, hparams, buffers),
                             config, model_config, tokenizer, rng, metrics

Being one file, it is replaced in one ``os.replace`` of a fully written and
fsynced temporary file (``backend.atomic_write``): a crash at any moment leaves
either the old checkpoint or the new one, never a mix or a torn file.
``checkpoint.json`` beside it is the same JSON for people to read; loading
ignores it. :func:`save_checkpoint`, :func:`load_checkpoint` and
:func:`latest_run` know nothing of the training loop (``train.py`` calls them).

**Hugging Face checkpoints.** A Hugging Face model directory holds ``config.json``
(the architecture) and ``model.safetensors`` (the weights). The safetensors format
is simple enough to read and write with NumPy alone, which keeps NumPy minillm's
only dependency:

    8 bytes      N, the header length, a little-endian unsigned 64-bit integer
    N bytes      a JSON object: {"name": {"dtype": "F32", "shape": [..],
                 "data_offsets": [begin, end]}, ..., "__metadata__": {...}}
    the rest     the raw tensors, little-endian, row-major, back to back;
                 data_offsets count from the start of this byte buffer

NumPy has no bfloat16, so bfloat16 tensors are widened to float32 on reading
(exact: a bfloat16 is the top half of a float32) and narrowed with
round-to-nearest-even on writing.

Each model family maps its own parameter names to Hugging Face's through an
:class:`HFMapping` registered in :data:`HF_MAPPINGS` under the config's
``model_type`` ("gpt2", "bert" and "t5" here; other model files add theirs with
:func:`register_hf_mapping`). :func:`load_hf`, :func:`save_hf` and
:func:`hf_state_dict` only dispatch.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from .backend import atomic_write, to_device, to_numpy

CHECKPOINT_FILE = "checkpoint.npz"
CHECKPOINT_JSON = "checkpoint.json"
FORMAT = "minillm-checkpoint"
FORMAT_VERSION = 1

# ---------------------------------------------------------------------------
# Native checkpoints: parameters, optimizer state, RNG states, step
# ---------------------------------------------------------------------------


def _library_version() -> str:
    try:
        from importlib.metadata import version
        return version("minillm")
    except Exception:  # running from a source tree that is not installed
        return "unknown"


def _write_arrays(fileobj, arrays: dict) -> None:
    """Write the arrays as an (uncompressed) .npz into an open binary file."""
    np.savez(fileobj, **arrays)


def _tokenizer_dict(tokenizer):
    if tokenizer is None or isinstance(tokenizer, dict):
        return tokenizer
    if not hasattr(tokenizer, "to_dict"):
        raise TypeError(f"tokenizer: expected an object with to_dict(), a dict or None, "
                        f"got {type(tokenizer).__name__}")
    return tokenizer.to_dict()


def _checkpoint_arrays(params: dict, optimizer) -> tuple[dict, dict | None]:
    """-> ({"params:NAME" / "optimizer:BUFFER:NAME": NumPy array}, the optimizer's JSON part or None)."""
    if not isinstance(params, dict) or not params:
        raise TypeError(f"params: expected a non-empty dict of arrays, got {type(params).__name__}")
    arrays = {f"params:{name}": to_numpy(p) for name, p in params.items()}
    if optimizer is None:
        return arrays, None
    state = optimizer.state_dict() if hasattr(optimizer, "state_dict") else optimizer
    optimizer_meta = {"type": state["type"], "t": int(state["t"]), "hparams": state["hparams"],
                      "buffers": sorted(state["buffers"])}
    for buffer, named in state["buffers"].items():
        for name, a in named.items():
            arrays[f"optimizer:{buffer}:{name}"] = to_numpy(a)
    return arrays, optimizer_meta


def save_checkpoint(out_dir, params: dict, optimizer=None, step: int = 0, config=None,
                    model_config=None, tokenizer=None, rng_state=None, metrics=None) -> Path:
    """Write ``out_dir/checkpoint.npz`` atomically and return its path.

    params: dict of arrays (NumPy or CuPy; stored as NumPy, dtypes kept).
    optimizer: an optim.Optimizer or its state_dict(), or None.
    config: a TrainConfig (anything with to_dict()) or a dict; model_config: a JSON-able
    dict; tokenizer: an object with to_dict(), a dict, or None; rng_state: JSON-able dict
    of generator states; metrics: JSON-able dict. Also writes ``checkpoint.json`` for reading.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays, optimizer_meta = _checkpoint_arrays(params, optimizer)
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "minillm_version": _library_version(),
            "step": int(step), "param_names": list(params), "optimizer": optimizer_meta,
            "config": config, "model_config": model_config, "tokenizer": _tokenizer_dict(tokenizer),
            "rng": rng_state, "metrics": metrics or {}}
    try:
        meta_json = json.dumps(meta, indent=1, sort_keys=False)
    except TypeError as e:
        raise TypeError(f"checkpoint: config, model_config, tokenizer, rng_state and metrics must be "
                        f"JSON-serialisable ({e})") from e
    arrays["__meta__"] = np.frombuffer(meta_json.encode("utf-8"), dtype=np.uint8)
    target = out / CHECKPOINT_FILE
    atomic_write(target, lambda f: _write_arrays(f, arrays))
    atomic_write(out / CHECKPOINT_JSON, lambda f: f.write(meta_json.encode("utf-8")))
    return target


def _read_checkpoint(npz) -> tuple[dict, dict, dict | None]:
    """-> (meta, params, optimizer state_dict or None) from an open checkpoint archive;
    ValueError or KeyError when it is not one this version reads."""
    if "__meta__" not in npz.files:
        raise ValueError("it has no __meta__ entry")
    meta = json.loads(bytes(npz["__meta__"]).decode("utf-8"))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"its format is {meta.get('format') if isinstance(meta, dict) else meta!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"format version {meta.get('format_version')!r}, this minillm reads "
                         f"{FORMAT_VERSION}")
    names = meta["param_names"]
    params = {name: npz[f"params:{name}"] for name in names}
    optimizer_meta = meta.get("optimizer")
    if optimizer_meta is None:
        return meta, params, None
    buffers = {b: {name: npz[f"optimizer:{b}:{name}"] for name in names} for b in optimizer_meta["buffers"]}
    optimizer = {"type": optimizer_meta["type"], "t": optimizer_meta["t"],
                 "hparams": optimizer_meta["hparams"], "buffers": buffers}
    return meta, params, optimizer


def load_checkpoint(out_dir) -> dict:
    """Read a checkpoint: ``out_dir`` is a run directory or the .npz file itself.

    -> {"path", "step", "params" (dict of NumPy arrays, saved order), "optimizer"
    (a state_dict for Optimizer.load_state_dict, or None), "config" (dict),
    "model_config", "tokenizer" (dict or None), "rng", "metrics"}.
    A missing file is FileNotFoundError; a truncated or foreign one ValueError.
    """
    p = Path(out_dir)
    f = p / CHECKPOINT_FILE if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"checkpoint: no {CHECKPOINT_FILE} in {str(p)!r}. Train a model first "
                                f"(python -m minillm train) or point at a run directory that has one.")
    try:
        with np.load(f, allow_pickle=False) as npz:
            meta, params, optimizer = _read_checkpoint(npz)
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint: {str(f)!r} is not a readable minillm checkpoint "
                         f"({type(e).__name__}: {e}); it may be truncated or from another program") from e
    return {"path": str(f), "step": int(meta["step"]), "params": params, "optimizer": optimizer,
            "config": meta.get("config"), "model_config": meta.get("model_config"),
            "tokenizer": meta.get("tokenizer"), "rng": meta.get("rng"), "metrics": meta.get("metrics") or {}}


def latest_run(root="runs") -> Path:
    """The run directory under ``root`` (or ``root`` itself) whose checkpoint was written last."""
    root = Path(root)
    candidates = []
    if (root / CHECKPOINT_FILE).is_file():
        candidates.append(root)
    if root.is_dir():
        candidates += [d for d in root.iterdir() if d.is_dir() and (d / CHECKPOINT_FILE).is_file()]
    if not candidates:
        raise FileNotFoundError(f"root: no run with a {CHECKPOINT_FILE} under {str(root)!r}. Train one "
                                f"first (python -m minillm train) or pass a run directory.")
    return max(candidates, key=lambda d: (d / CHECKPOINT_FILE).stat().st_mtime_ns)


# ---------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------

# safetensors dtype code -> NumPy dtype of the stored bytes ("BF16" is read as raw
# uint16 and widened by hand).
_ST_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NP_TO_ST = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
             np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
             np.dtype(np.int8): "I8", np.dtype(np.uint64): "U64", np.dtype(np.uint32): "U32",
             np.dtype(np.uint16): "U16", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit; guards against reading garbage as a length


def bfloat16_to_float32(bits):
    """Widen raw bfloat16 bit patterns (uint16) to float32: append 16 zero bits. Exact."""
    bits = np.asarray(bits, dtype=np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bfloat16(x):
    """Round float32 values to bfloat16 bit patterns (uint16), round-to-nearest-even.

    Adding 0x7FFF plus the lowest kept bit before dropping the low 16 bits rounds
    ties to the even neighbour, as hardware does. NaNs stay (quiet) NaNs.
    """
    x = np.array(x, dtype=np.float32, order="C")   # a copy: .view needs contiguous memory
    u = x.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded).astype(np.uint16)


def read_safetensors_header(path) -> tuple[dict, dict, int]:
    """-> (tensors' header entries by name, __metadata__, offset of the byte buffer)."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path}: not a safetensors file or truncated (header length {n}, "
                             f"file size {size})")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header: expected a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise ValueError(f"{path}: tensor {name!r}: expected dtype, shape and data_offsets, got {entry!r}")
        if entry["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r}: unsupported dtype {entry['dtype']!r} "
                             f"(expected one of {sorted(_ST_DTYPES)})")
        begin, end = entry["data_offsets"]
        count = int(np.prod(entry["shape"], dtype=np.int64))
        if end - begin != count * _ST_DTYPES[entry["dtype"]].itemsize or begin < 0:
            raise ValueError(f"{path}: tensor {name!r}: data_offsets {entry['data_offsets']} do not fit "
                             f"shape {entry['shape']} of dtype {entry['dtype']}")
        if base + end > size:
            raise ValueError(f"{path}: tensor {name!r}: data ends at byte {base + end} but the file has "
                             f"{size} bytes (truncated?)")
    return header, metadata, base


def load_safetensors(path, names=None) -> dict:
    """Read a .safetensors file -> {name: numpy array} (native byte order, writable).

    Float tensors keep their dtype (float64/32/16) except bfloat16, which NumPy
    lacks and which is widened exactly to float32. ``names`` reads only those.
    """
    header, _, base = read_safetensors_header(path)
    wanted = header if names is None else {k: header[k] for k in names if k in header}
    out = {}
    with open(os.fspath(path), "rb") as f:
        for name, entry in wanted.items():
            dt = _ST_DTYPES[entry["dtype"]]
            begin, end = entry["data_offsets"]
            f.seek(base + begin)
            raw = np.frombuffer(f.read(end - begin), dtype=dt)
            a = bfloat16_to_float32(raw) if entry["dtype"] == "BF16" else raw.astype(dt.newbyteorder("="))
            out[name] = a.reshape(tuple(entry["shape"]))   # a tuple: () is a scalar
    return out


def save_safetensors(path, tensors: dict, metadata: dict | None = None, dtype=None) -> None:
    """Write {name: array} to a .safetensors file, atomically (temporary file, then rename).

    ``dtype`` None keeps each array's dtype; "float32", "float16" or "bfloat16"
    stores every floating-point tensor in that dtype (an explicit, requested cast).
    ``metadata`` is a dict of strings (transformers wants {"format": "pt"}).
    """
    if dtype not in (None, "float32", "float16", "bfloat16"):
        raise ValueError(f"dtype: expected None, 'float32', 'float16' or 'bfloat16', got {dtype!r}")
    header, blobs, offset = {}, [], 0
    for name in tensors:  # keep the caller's order: readers do not care, humans do
        if not isinstance(name, str):
            raise TypeError(f"tensors: expected string names, got {name!r}")
        a = np.asarray(to_numpy(tensors[name]))    # (not ascontiguousarray: it turns a scalar into (1,))
        if a.dtype.kind == "f" and dtype is not None:
            if dtype == "bfloat16":
                code, data = "BF16", float32_to_bfloat16(a.astype(np.float32))
            else:
                data = a.astype(dtype)
                code = _NP_TO_ST[data.dtype]
        else:
            if a.dtype.newbyteorder("=") not in _NP_TO_ST:
                raise TypeError(f"tensors[{name!r}]: dtype {a.dtype} has no safetensors code")
            code, data = _NP_TO_ST[a.dtype.newbyteorder("=")], a
        data = data.astype(data.dtype.newbyteorder("<"))   # tobytes() below writes row-major order
        nbytes = data.nbytes
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + nbytes]}
        blobs.append(data)
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % 8)  # pad so the buffer starts 8-byte aligned
    chunks = [struct.pack("<Q", len(hbytes)), hbytes] + [b.tobytes() for b in blobs]
    atomic_write(path, lambda f: f.writelines(chunks))


def _write_json(path, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# ---------------------------------------------------------------------------
# Dispatch on model_type
# ---------------------------------------------------------------------------

class HFMapping(NamedTuple):
    """How one model family meets Hugging Face.

    config_class: our config type (save_hf picks the mapping by isinstance).
    config_from_hf(hf_config: dict) -> our config
    config_to_hf(config, params) -> dict for config.json (must include "model_type");
        params says which heads are saved, so "architectures" can name the right class
    to_hf(config, params) -> {hf_name: array}: a pure renaming/re-layout, which
        therefore also works on a grads dict
    from_hf(config, tensors) -> params: checks that every tensor is there with the
        right shape, naming the missing or misshapen one
    fill_for_save(config, params) -> params with anything HF needs but we lack
        (e.g. zero biases for a bias-free model); may be the identity
    """
    config_class: type
    config_from_hf: Callable
    config_to_hf: Callable
    to_hf: Callable
    from_hf: Callable
    fill_for_save: Callable


HF_MAPPINGS: dict[str, HFMapping] = {}
_LAZY = {"gpt2": "minillm.checkpoint:_gpt2_mapping"}  # built on first use: avoids importing models eagerly


def register_hf_mapping(model_type: str, mapping: HFMapping) -> None:
    """Add (or replace) the mapping used for Hugging Face ``model_type``."""
    if not isinstance(mapping, HFMapping):
        raise TypeError(f"mapping: expected an HFMapping, got {type(mapping).__name__}")
    HF_MAPPINGS[model_type] = mapping


def _mapping(model_type: str) -> HFMapping:
    if model_type not in HF_MAPPINGS and model_type in _LAZY:
        import importlib
        mod, fn = _LAZY[model_type].split(":")
        register_hf_mapping(model_type, getattr(importlib.import_module(mod), fn)())
    if model_type not in HF_MAPPINGS:
        raise ValueError(f"model_type: expected one of {sorted(set(HF_MAPPINGS) | set(_LAZY))}, "
                         f"got {model_type!r}")
    return HF_MAPPINGS[model_type]


def _mapping_for_config(config) -> tuple[str, HFMapping]:
    for mt in list(_LAZY):
        if mt not in HF_MAPPINGS:
            try:
                _mapping(mt)
            except ImportError:  # a model family that cannot load cannot be this config's either
                continue
    for mt, m in HF_MAPPINGS.items():
        if isinstance(config, m.config_class):
            return mt, m
    known = [m.config_class.__name__ for m in HF_MAPPINGS.values()]
    raise TypeError(f"config: expected a config of one of {known}, "
                    f"got {type(config).__name__}")


def read_hf_config(directory) -> dict:
    path = os.path.join(os.fspath(directory), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dir: expected a Hugging Face model directory with config.json, "
                                f"no such file: {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_hf(directory, dtype=np.float32, device=None):
    """Read a Hugging Face model directory -> (config, params).

    ``config.json``'s ``model_type`` picks the mapping. Weights come from
    ``model.safetensors`` (float32, float16 or bfloat16) and are converted to
    ``dtype`` (float32 by default: the training dtype; pass None to keep what was
    stored, bfloat16 becoming float32), then moved to ``device`` (default
    MINILLM_DEVICE). A missing tensor or a wrong shape is a ValueError naming it.
    """
    hf_config = read_hf_config(directory)
    model_type = hf_config.get("model_type")
    mapping = _mapping(model_type)
    config = mapping.config_from_hf(hf_config)
    st_path = os.path.join(os.fspath(directory), "model.safetensors")
    if not os.path.isfile(st_path):
        raise FileNotFoundError(f"dir: expected model.safetensors next to config.json (sharded or "
                                f"pytorch_model.bin checkpoints are not read), no such file: {st_path}")
    tensors = load_safetensors(st_path)
    params = mapping.from_hf(config, tensors)
    if dtype is not None:
        params = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in params.items()}
    return config, to_device(params, device)


def save_hf(directory, config, params, dtype=None) -> None:
    """Write ``config.json`` and ``model.safetensors`` that Hugging Face transformers loads.

    ``dtype`` None keeps the params' dtype; "float16"/"bfloat16"/"float32" casts on write.
    """
    model_type, mapping = _mapping_for_config(config)
    hf_cfg = mapping.config_to_hf(config, params)
    hf_cfg.setdefault("model_type", model_type)
    tensors = mapping.to_hf(config, mapping.fill_for_save(config, params))
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    save_safetensors(os.path.join(directory, "model.safetensors"),
                     {k: to_numpy(v) for k, v in tensors.items()}, metadata={"format": "pt"}, dtype=dtype)
    _write_json(os.path.join(directory, "config.json"), hf_cfg)


def hf_state_dict(config, params) -> dict:
    """{Hugging Face name: array} for a params-shaped dict (params or grads), same arrays re-laid out."""
    _, mapping = _mapping_for_config(config)
    return mapping.to_hf(config, params)


# ---------------------------------------------------------------------------
# GPT-2
# ---------------------------------------------------------------------------

_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all the tanh approximation


def _gpt2_config_from_hf(h: dict):
    from .gpt import GPTConfig
    act = h.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        raise ValueError(f"config.json activation_function: expected one of {_GPT2_ACTIVATIONS} "
                         f"(GPT-2's tanh GELU), got {act!r}")
    n_embd = int(h["n_embd"])
    n_inner = h.get("n_inner")
    eps = float(h.get("layer_norm_epsilon", 1e-5))   # None below: the config's own default (same value)
    for key, ok in (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False),
                    ("scale_attn_weights", True)):
        if key in h and bool(h[key]) != ok:
            raise ValueError(f"config.json {key}: expected {ok} (the only variant supported), got {h[key]!r}")
    return GPTConfig(vocab_size=int(h["vocab_size"]), block_size=int(h.get("n_positions", h.get("n_ctx", 1024))),
                     n_layer=int(h["n_layer"]), n_head=int(h["n_head"]), n_embd=n_embd,
                     dropout=0.0, bias=True, norm="layernorm", pos="learned", mlp="gelu",
                     tie_embeddings=bool(h.get("tie_word_embeddings", True)),
                     mlp_hidden=int(n_inner) if n_inner and int(n_inner) != 4 * n_embd else None,
                     norm_eps=None if eps == 1e-5 else eps)


def _gpt2_check(config):
    bad = [(k, getattr(config, k), want) for k, want in
           (("norm", "layernorm"), ("pos", "learned"), ("mlp", "gelu"))
           if getattr(config, k) != want]
    if config.n_kv_head not in (None, config.n_head):
        bad.append(("n_kv_head", config.n_kv_head, config.n_head))
    if bad:
        raise ValueError("config: Hugging Face GPT-2 needs " +
                         ", ".join(f"{k}={w!r} (got {g!r})" for k, g, w in bad))


def _gpt2_config_to_hf(config, params=None) -> dict:
    _gpt2_check(config)
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_ctx": config.block_size,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head,
        "n_inner": config.mlp_width, "activation_function": "gelu_new",
        "layer_norm_epsilon": config.eps, "tie_word_embeddings": bool(config.tie_embeddings),
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
        "bos_token_id": config.vocab_size - 1, "eos_token_id": config.vocab_size - 1,
    }


def _gpt2_names(config) -> dict:
    """our name -> (HF name, transpose?). GPT-2's Conv1D stores (in, out) like our x @ w, so no transposes."""
    m = {"wte": "transformer.wte.weight", "wpe": "transformer.wpe.weight",
         "ln_f.weight": "transformer.ln_f.weight", "ln_f.bias": "transformer.ln_f.bias"}
    for i in range(config.n_layer):
        p, q = f"h.{i}.", f"transformer.h.{i}."
        m.update({p + "ln_1.weight": q + "ln_1.weight", p + "ln_1.bias": q + "ln_1.bias",
                  p + "attn.w_qkv": q + "attn.c_attn.weight", p + "attn.b_qkv": q + "attn.c_attn.bias",
                  p + "attn.w_o": q + "attn.c_proj.weight", p + "attn.b_o": q + "attn.c_proj.bias",
                  p + "ln_2.weight": q + "ln_2.weight", p + "ln_2.bias": q + "ln_2.bias",
                  p + "mlp.w1": q + "mlp.c_fc.weight", p + "mlp.b1": q + "mlp.c_fc.bias",
                  p + "mlp.w2": q + "mlp.c_proj.weight", p + "mlp.b2": q + "mlp.c_proj.bias"})
    if not config.tie_embeddings:
        m["lm_head"] = "lm_head.weight"  # nn.Linear(C, V).weight is (V, C), the same layout as ours
    return m


def _gpt2_to_hf(config, params) -> dict:
    _gpt2_check(config)
    names = _gpt2_names(config)
    extra = sorted(set(params) - set(names))
    if extra:
        raise ValueError(f"params: unexpected entries for this GPT-2 config: {extra}")
    return {names[k]: v for k, v in params.items()}


def _gpt2_fill(config, params) -> dict:
    """GPT-2 always has biases: a bias-free model is the same model with zero biases."""
    from .gpt import param_shapes
    if config.bias:
        return params
    out = dict(params)
    full = param_shapes(config.replace(bias=True))
    for k, shape in full.items():
        if k not in out:
            out[k] = np.zeros(shape, dtype=params["wte"].dtype)
    return out


def _gpt2_from_hf(config, tensors) -> dict:
    from .gpt import param_shapes
    # Hub files name tensors without the "transformer." prefix; save_pretrained adds it.
    t = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v for k, v in tensors.items()}
    names = _gpt2_names(config)
    shapes = param_shapes(config)
    params = {}
    for ours, theirs in names.items():
        if theirs not in t:
            if ours == "lm_head" and "transformer.wte.weight" in t:
                raise ValueError(f"checkpoint: tensor {theirs!r} is missing (tie_word_embeddings is false)")
            raise ValueError(f"checkpoint: tensor {theirs!r} is missing (needed for {ours!r})")
        a = t[theirs]
        if tuple(a.shape) != tuple(shapes[ours]):
            raise ValueError(f"checkpoint: tensor {theirs!r}: expected shape {tuple(shapes[ours])} "
                             f"from config.json, got {tuple(a.shape)}")
        params[ours] = a
    return {k: params[k] for k in shapes}     # gpt's own order


def _gpt2_mapping() -> HFMapping:
    from .gpt import GPTConfig
    return HFMapping(GPTConfig, _gpt2_config_from_hf, _gpt2_config_to_hf, _gpt2_to_hf, _gpt2_from_hf,
                     _gpt2_fill)


# ---------------------------------------------------------------------------
# BERT (model_type "bert": BertModel, BertForMaskedLM, BertForSequenceClassification)
# ---------------------------------------------------------------------------
#
# Hugging Face's nn.Linear stores weight as (out, in) and computes x @ weight.T;
# minillm stores (in, out) and computes x @ w. So every dense weight is transposed
# on the way in and out, and BERT's three separate query/key/value layers become
# the columns [q | k | v] of one w_qkv. The MLM decoder is tied to the word
# embeddings, so its weight is not stored separately (as transformers does too).
# BertModel files name tensors "embeddings....", the models with a head put the
# same encoder under "bert."; both load. Old TensorFlow-converted checkpoints call
# LayerNorm's weight/bias gamma/beta; those load too.

def _bert_layer_names(i: int) -> list:
    """(our name, HF name without prefix, how): how is "copy", "T" (transpose), or
    ("qkv", part, "w"|"b") for one third of the fused attention projection."""
    p, q = f"h.{i}.", f"encoder.layer.{i}."
    rows = []
    for part, hf in enumerate(("query", "key", "value")):
        rows.append((p + "attn.w_qkv", q + f"attention.self.{hf}.weight", ("qkv", part, "w")))
        rows.append((p + "attn.b_qkv", q + f"attention.self.{hf}.bias", ("qkv", part, "b")))
    rows += [(p + "attn.w_o", q + "attention.output.dense.weight", "T"),
             (p + "attn.b_o", q + "attention.output.dense.bias", "copy"),
             (p + "ln_1.weight", q + "attention.output.LayerNorm.weight", "copy"),
             (p + "ln_1.bias", q + "attention.output.LayerNorm.bias", "copy"),
             (p + "mlp.w1", q + "intermediate.dense.weight", "T"),
             (p + "mlp.b1", q + "intermediate.dense.bias", "copy"),
             (p + "mlp.w2", q + "output.dense.weight", "T"),
             (p + "mlp.b2", q + "output.dense.bias", "copy"),
             (p + "ln_2.weight", q + "output.LayerNorm.weight", "copy"),
             (p + "ln_2.bias", q + "output.LayerNorm.bias", "copy")]
    return rows


# our name -> HF name (encoder names without the "bert." prefix), grouped by head.
_BERT_EMBEDDINGS = [("embeddings.word", "embeddings.word_embeddings.weight", "copy"),
                    ("embeddings.position", "embeddings.position_embeddings.weight", "copy"),
                    ("embeddings.token_type", "embeddings.token_type_embeddings.weight", "copy"),
                    ("embeddings.ln.weight", "embeddings.LayerNorm.weight", "copy"),
                    ("embeddings.ln.bias", "embeddings.LayerNorm.bias", "copy")]
_BERT_HEADS = {
    "pooler": [("pooler.w", "pooler.dense.weight", "T"), ("pooler.b", "pooler.dense.bias", "copy")],
    "mlm": [("mlm.dense.w", "cls.predictions.transform.dense.weight", "T"),
            ("mlm.dense.b", "cls.predictions.transform.dense.bias", "copy"),
            ("mlm.ln.weight", "cls.predictions.transform.LayerNorm.weight", "copy"),
            ("mlm.ln.bias", "cls.predictions.transform.LayerNorm.bias", "copy"),
            ("mlm.bias", "cls.predictions.bias", "copy")],
    "classifier": [("classifier.w", "classifier.weight", "T"), ("classifier.b", "classifier.bias", "copy")],
}
# Tensors a BERT file may hold that minillm has no use for (a buffer, the tied decoder
# copies, BertForPreTraining's next-sentence head).
_BERT_IGNORED = ("embeddings.position_ids", "cls.predictions.decoder.bias",
                 "cls.seq_relationship.weight", "cls.seq_relationship.bias")


def _bert_rows(config, heads):
    rows = list(_BERT_EMBEDDINGS)
    for i in range(config.num_layers):
        rows += _bert_layer_names(i)
    for h in heads:
        rows += _BERT_HEADS[h]
    return rows


def _bert_heads_in(params) -> tuple:
    return tuple(h for h, rows in _BERT_HEADS.items() if any(r[0] in params for r in rows))


def _bert_config_from_hf(h: dict):
    from .bert import BertConfig
    return BertConfig.from_hf(h)


def _bert_config_to_hf(config, params=None) -> dict:
    """config.json for the heads in params: a classifier makes it a BertForSequenceClassification,
    else an MLM head a BertForMaskedLM, else (encoder, maybe pooler) a BertModel."""
    h = config.to_hf()
    heads = _bert_heads_in(params) if params is not None else ("mlm",)
    h["architectures"] = ["BertForSequenceClassification" if "classifier" in heads
                          else "BertForMaskedLM" if "mlm" in heads else "BertModel"]
    return h


def _bert_hf_name(name: str, prefix: str) -> str:
    # The encoder and the pooler live inside "bert."; the heads sit beside it.
    return name if name.startswith(("cls.", "classifier.")) else prefix + name


def _bert_to_hf(config, params, prefix="bert.") -> dict:
    """minillm BERT params (or grads) -> {HF name: array}: pure re-layout, no arithmetic.
    prefix "bert." gives BertForMaskedLM / BertForSequenceClassification names, "" BertModel's."""
    heads = _bert_heads_in(params)
    rows = _bert_rows(config, heads)
    known = {r[0] for r in rows}
    extra = sorted(set(params) - known)
    if extra:
        raise ValueError(f"params: unexpected entries for this BERT config: {extra}")
    C = config.hidden_size
    out = {}
    for ours, theirs, how in rows:
        if ours not in params:
            raise ValueError(f"params: missing {ours!r} (needed for {theirs!r})")
        a = params[ours]
        if how == "T":
            a = a.T
        elif isinstance(how, tuple):
            _, part, kind = how
            a = a[:, part * C:(part + 1) * C].T if kind == "w" else a[part * C:(part + 1) * C]
        out[_bert_hf_name(theirs, prefix)] = a
    return out


def _bert_from_hf(config, tensors) -> dict:
    """{HF name: array} -> minillm BERT params. The encoder must be complete; the pooler,
    MLM head and classifier are loaded when the file has them (all of a head or none)."""
    from .bert import param_shapes
    t = {}
    for k, v in tensors.items():
        k2 = k[len("bert."):] if k.startswith("bert.") else k
        if k2.endswith(".gamma"):
            k2 = k2[:-len("gamma")] + "weight"
        elif k2.endswith(".beta"):
            k2 = k2[:-len("beta")] + "bias"
        t[k2] = v
    heads = [h for h, rows in _BERT_HEADS.items() if any(r[1] in t for r in rows)]
    rows = _bert_rows(config, heads)
    used = {r[1] for r in rows} | set(_BERT_IGNORED) | {"cls.predictions.decoder.weight"}
    unknown = sorted(k for k in t if k not in used)
    if unknown:
        raise ValueError(f"checkpoint: unexpected tensors for a BERT model: {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''}")
    shapes = param_shapes(config, heads)
    C = config.hidden_size
    params = {}
    for ours, theirs, how in rows:
        if theirs not in t:
            raise ValueError(f"checkpoint: tensor {theirs!r} is missing (needed for {ours!r})")
        a = np.asarray(t[theirs])
        if how == "T":
            a = a.T
        elif isinstance(how, tuple):
            _, part, kind = how
            want = (C, C) if kind == "w" else (C,)
            if tuple(a.shape) != want:
                raise ValueError(f"checkpoint: tensor {theirs!r}: expected shape {want} from config.json, "
                                 f"got {tuple(a.shape)}")
            if ours not in params:
                params[ours] = np.zeros(shapes[ours], dtype=a.dtype)
            if kind == "w":
                params[ours][:, part * C:(part + 1) * C] = a.T
            else:
                params[ours][part * C:(part + 1) * C] = a
            continue
        if tuple(a.shape) != tuple(shapes[ours]):
            raise ValueError(f"checkpoint: tensor {theirs!r}: expected shape {tuple(shapes[ours])} "
                             f"from config.json, got {tuple(a.shape)}")
        params[ours] = np.ascontiguousarray(a)
    dec = t.get("cls.predictions.decoder.weight")
    if dec is not None and not np.array_equal(np.asarray(dec), params["embeddings.word"]):
        raise ValueError("checkpoint: tensor 'cls.predictions.decoder.weight' differs from the word "
                         "embeddings; minillm's BERT ties the MLM decoder to them")
    return params


def _bert_fill(config, params) -> dict:
    return params


def _bert_mapping() -> HFMapping:
    from .bert import BertConfig
    return HFMapping(BertConfig, _bert_config_from_hf, _bert_config_to_hf, _bert_to_hf, _bert_from_hf,
                     _bert_fill)


_LAZY["bert"] = "minillm.checkpoint:_bert_mapping"


# ---------------------------------------------------------------------------
# T5 (model_type "t5": T5ForConditionalGeneration, v1.0 "relu" and v1.1/Flan "gated-gelu")
# ---------------------------------------------------------------------------
#
# Hugging Face keeps q, k, v and o as four bias-free nn.Linear (out, in); minillm fuses
# self-attention's into w_qkv (C, 3 H Dk) = [q | k | v] and cross-attention's k and v into
# w_kv (C, 2 H Dk), stored (in, out): each part is a transposed column block. The relative
# bias table lives in block 0 of each stack (layer.0.SelfAttention.relative_attention_bias).
# transformers 5 ties lm_head to shared whatever config.json says, and reads
# tie_word_embeddings only to decide whether the head's input is scaled; an untied
# (v1.1) file still carries its own lm_head.weight, which is what load_hf reads.

_T5_FF = {"relu": ("wi", "wo"), "gated-gelu": ("wi_0", "wi_1", "wo")}


def _t5_rows(config) -> list:
    """(our name, HF name, how): how is "copy", "T", or (part, n_parts) for a transposed
    column block of a fused projection."""
    rows = [("shared", "shared.weight", "copy")]
    for stack, n_layers in (("encoder", config.num_layers), ("decoder", config.n_decoder_layers)):
        rows.append((f"{stack}.rel_bias", f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                     "copy"))
        for i in range(n_layers):
            p, q = f"{stack}.{i}.", f"{stack}.block.{i}.layer."
            rows.append((p + "ln_attn.weight", q + "0.layer_norm.weight", "copy"))
            rows += [(p + "attn.w_qkv", q + f"0.SelfAttention.{x}.weight", (j, 3)) for j, x in enumerate("qkv")]
            rows.append((p + "attn.w_o", q + "0.SelfAttention.o.weight", "T"))
            ff = 1
            if stack == "decoder":
                ff = 2
                rows += [(p + "ln_cross.weight", q + "1.layer_norm.weight", "copy"),
                         (p + "cross.w_q", q + "1.EncDecAttention.q.weight", "T"),
                         (p + "cross.w_kv", q + "1.EncDecAttention.k.weight", (0, 2)),
                         (p + "cross.w_kv", q + "1.EncDecAttention.v.weight", (1, 2)),
                         (p + "cross.w_o", q + "1.EncDecAttention.o.weight", "T")]
            rows.append((p + "ln_ff.weight", q + f"{ff}.layer_norm.weight", "copy"))
            rows += [(p + f"ff.{w}", q + f"{ff}.DenseReluDense.{w}.weight", "T")
                     for w in _T5_FF[config.feed_forward_proj]]
        rows.append((f"{stack}.ln_f.weight", f"{stack}.final_layer_norm.weight", "copy"))
    if not config.tie_word_embeddings:
        rows.append(("lm_head", "lm_head.weight", "copy"))
    return rows


# Tensors a T5 file may hold that minillm does not read: the tied copies of shared.
_T5_IGNORED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
               "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")


def _t5_config_from_hf(h: dict):
    from .t5 import FEED_FORWARD_PROJ, T5Config
    ffp = h.get("feed_forward_proj", "relu")
    if ffp not in FEED_FORWARD_PROJ:
        raise ValueError(f"config.json feed_forward_proj: expected one of {FEED_FORWARD_PROJ}, got {ffp!r}")
    pad = h.get("pad_token_id", 0)
    pad = 0 if pad is None else int(pad)
    eos = h.get("eos_token_id", 1)
    eos = int(eos[0] if isinstance(eos, list) else (1 if eos is None else eos))
    start = h.get("decoder_start_token_id", pad)
    return T5Config(vocab_size=int(h["vocab_size"]), d_model=int(h["d_model"]), d_kv=int(h["d_kv"]),
                    d_ff=int(h["d_ff"]), num_layers=int(h["num_layers"]),
                    num_decoder_layers=h.get("num_decoder_layers"), num_heads=int(h["num_heads"]),
                    relative_attention_num_buckets=int(h.get("relative_attention_num_buckets", 32)),
                    relative_attention_max_distance=int(h.get("relative_attention_max_distance", 128)),
                    feed_forward_proj=ffp, tie_word_embeddings=bool(h.get("tie_word_embeddings", True)),
                    layer_norm_epsilon=float(h.get("layer_norm_epsilon", 1e-6)),
                    dropout_rate=float(h.get("dropout_rate", 0.1)), pad_token_id=pad, eos_token_id=eos,
                    decoder_start_token_id=pad if start is None else int(start))


def _t5_config_to_hf(config, params=None) -> dict:
    return {
        "model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True,
        "vocab_size": config.vocab_size, "d_model": config.d_model, "d_kv": config.d_kv, "d_ff": config.d_ff,
        "num_layers": config.num_layers, "num_decoder_layers": config.n_decoder_layers,
        "num_heads": config.num_heads, "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "feed_forward_proj": config.feed_forward_proj, "tie_word_embeddings": config.tie_word_embeddings,
        "layer_norm_epsilon": config.layer_norm_epsilon, "dropout_rate": config.dropout_rate,
        "initializer_factor": 1.0, "pad_token_id": config.pad_token_id, "eos_token_id": config.eos_token_id,
        "decoder_start_token_id": config.decoder_start_token_id, "use_cache": True,
    }


def _t5_to_hf(config, params) -> dict:
    """minillm T5 params (or grads) -> {HF name: array}: pure re-layout (transposes, slices)."""
    rows = _t5_rows(config)
    extra = sorted(set(params) - {r[0] for r in rows})
    if extra:
        raise ValueError(f"params: unexpected entries for this T5 config: {extra[:5]}")
    out = {}
    for ours, theirs, how in rows:
        if ours not in params:
            raise ValueError(f"params: missing {ours!r} (needed for {theirs!r})")
        a = params[ours]
        if how == "T":
            a = a.T
        elif isinstance(how, tuple):
            part, n = how
            w = a.shape[1] // n
            a = a[:, part * w:(part + 1) * w].T
        out[theirs] = a
    return out


def _t5_from_hf(config, tensors) -> dict:
    from .t5 import param_shapes
    rows = _t5_rows(config)
    known = {r[1] for r in rows} | set(_T5_IGNORED) | {"lm_head.weight"}
    unknown = sorted(k for k in tensors if k not in known)
    if unknown:
        raise ValueError(f"checkpoint: unexpected tensors for a T5 model with feed_forward_proj="
                         f"{config.feed_forward_proj!r}: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    shapes = param_shapes(config)
    params = {}
    for ours, theirs, how in rows:
        if theirs not in tensors:
            why = " (tie_word_embeddings is false)" if theirs == "lm_head.weight" else ""
            raise ValueError(f"checkpoint: tensor {theirs!r} is missing{why} (needed for {ours!r})")
        a = np.asarray(tensors[theirs])
        if isinstance(how, tuple):
            part, n = how
            C, W = shapes[ours]
            want = (W // n, C)
            if tuple(a.shape) != want:
                raise ValueError(f"checkpoint: tensor {theirs!r}: expected shape {want} from config.json, "
                                 f"got {tuple(a.shape)}")
            if ours not in params:
                params[ours] = np.zeros(shapes[ours], dtype=a.dtype)
            params[ours][:, part * (W // n):(part + 1) * (W // n)] = a.T
            continue
        a = a.T if how == "T" else a
        if tuple(a.shape) != tuple(shapes[ours]):
            raise ValueError(f"checkpoint: tensor {theirs!r}: expected shape {tuple(shapes[ours])} "
                             f"from config.json, got {tuple(a.shape)}")
        params[ours] = np.ascontiguousarray(a)
    return {k: params[k] for k in shapes}


def _t5_fill(config, params) -> dict:
    return params


def _t5_mapping() -> HFMapping:
    from .t5 import T5Config
    return HFMapping(T5Config, _t5_config_from_hf, _t5_config_to_hf, _t5_to_hf, _t5_from_hf, _t5_fill)


_LAZY["t5"] = "minillm.checkpoint:_t5_mapping"
