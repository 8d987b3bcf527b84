"""checkpoint.py: the safetensors reader/writer, GPT-2 names both ways, and parity with
Hugging Face transformers (tiny randomly initialised models, no network)."""
import json
import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import assert_close, np_, on
from minillm import checkpoint as ck
from minillm import gpt
from strategies import seeds, shapes


def scaled(n):
    """n examples under the default `ci` profile (12), proportionally more under `thorough`."""
    return max(1, n * settings.default.max_examples // 12)


def init_cpu(cfg, seed, dtype=np.float32):
    """Parameters on the CPU (tests move them with on(xp, ...) where the device matters)."""
    return gpt.init_params(cfg, seed, dtype=dtype, device="cpu")

FLOATS = ["float64", "float32", "float16"]
INTS = ["int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64"]


# --- safetensors --------------------------------------------------------------

@settings(max_examples=scaled(8))
@given(shape_list=st.lists(shapes(0, 3, 0, 4), min_size=1, max_size=4), seed=seeds,
       dtypes=st.lists(st.sampled_from(FLOATS + INTS + ["bool"]), min_size=4, max_size=4))
def test_safetensors_round_trip_is_bit_exact(tmp_path_factory, shape_list, seed, dtypes):
    rng = np.random.default_rng(seed)
    tensors = {}
    for i, shape in enumerate(shape_list):
        dt = np.dtype(dtypes[i])
        if dt.kind == "f":
            a = (rng.standard_normal(shape) * 10).astype(dt)
        elif dt.kind == "b":
            a = rng.random(shape) < 0.5
        else:
            info = np.iinfo(dt)
            a = rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
        tensors[f"t{i}.weight"] = a
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    ck.save_safetensors(path, tensors, metadata={"format": "pt"})
    back = ck.load_safetensors(path)
    assert list(back) == list(tensors)
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and back[k].shape == tensors[k].shape
        assert back[k].tobytes() == tensors[k].tobytes(), k
        assert back[k].flags.writeable
    header, meta, base = ck.read_safetensors_header(path)
    assert meta == {"format": "pt"} and base % 8 == 0       # the byte buffer starts 8-aligned


@settings(max_examples=scaled(10))
@given(seed=seeds)
def test_bfloat16_rounding_is_round_to_nearest_even(seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(200) * 10.0 ** rng.integers(-30, 30, 200)).astype(np.float32)
    x = np.concatenate([x, np.float32([0.0, -0.0, np.inf, -np.inf, 1.0, 3.4e38, 1e-40])])
    r = ck.bfloat16_to_float32(ck.float32_to_bfloat16(x))
    # the nearest bfloat16: compare with both neighbours (the value truncated, and one ulp up)
    u = x.view(np.uint32)
    down = (u & 0xFFFF0000).view(np.float32)
    up = ((u & 0xFFFF0000) + 0x10000).astype(np.uint32).view(np.float32)
    finite = np.isfinite(x) & np.isfinite(up)
    err = np.abs(r[finite].astype(np.float64) - x[finite])
    xf = x[finite].astype(np.float64)
    best = np.minimum(np.abs(down[finite] - xf), np.abs(up[finite] - xf))
    assert np.all(err <= best)
    # exactly halfway goes to the even neighbour: 1 + 2^-8 lies between 1 and 1 + 2^-7
    assert ck.bfloat16_to_float32(ck.float32_to_bfloat16(np.float32([1 + 2**-8, 1 + 3 * 2**-8]))).tolist() == \
        [1.0, 1 + 2 * 2**-7]
    assert np.isnan(ck.bfloat16_to_float32(ck.float32_to_bfloat16(np.float32([np.nan])))[0])


def test_safetensors_matches_the_reference_library(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    g = torch.Generator().manual_seed(0)
    ref = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
           "c": torch.randn(2, 2, generator=g).half(), "d": torch.arange(6).reshape(2, 3)}
    st_torch.save_file(ref, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    ours = ck.load_safetensors(tmp_path / "ref.safetensors")
    for k, v in ref.items():
        want = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
        assert ours[k].dtype == want.dtype and np.array_equal(ours[k], want), k
    # and the library reads what we write, bfloat16 included
    ck.save_safetensors(tmp_path / "ours.safetensors", {"x": ours["a"], "y": ours["d"]}, dtype="bfloat16",
                        metadata={"format": "pt"})
    back = st_torch.load_file(str(tmp_path / "ours.safetensors"))
    assert back["x"].dtype == torch.bfloat16 and torch.equal(back["x"], ref["a"].to(torch.bfloat16))
    assert torch.equal(back["y"], ref["d"])        # integers are never cast


def test_broken_safetensors_files_are_refused_clearly(tmp_path):
    p = tmp_path / "x.safetensors"
    ck.save_safetensors(p, {"w": np.ones((4, 4), np.float32)})
    raw = p.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[:-10])
    with pytest.raises(ValueError, match=r"tensor 'w': data ends at byte \d+ but the file has \d+ bytes "
                                         r"\(truncated"):
        ck.load_safetensors(tmp_path / "trunc.safetensors")
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match="not a safetensors file"):
        ck.load_safetensors(tmp_path / "short.safetensors")
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(ValueError, match="header length"):
        ck.load_safetensors(tmp_path / "huge.safetensors")
    hdr = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(hdr)) + hdr + bytes(64))
    with pytest.raises(ValueError, match=r"tensor 'w': data_offsets \[0, 60\] do not fit shape \[4, 4\]"):
        ck.load_safetensors(tmp_path / "bad.safetensors")
    hdr = json.dumps({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "dt.safetensors").write_bytes(struct.pack("<Q", len(hdr)) + hdr + bytes(8))
    with pytest.raises(ValueError, match="tensor 'w': unsupported dtype 'C64'"):
        ck.load_safetensors(tmp_path / "dt.safetensors")


# --- native checkpoints ------------------------------------------------------------

def test_a_checkpoint_laid_out_by_hand_in_format_1_loads(tmp_path):
    """The format is the contract with every run saved before: one .npz of params:NAME,
    optimizer:BUFFER:NAME and a __meta__ JSON document (format "minillm-checkpoint", version 1)."""
    w, m, v = np.arange(6, dtype=np.float32).reshape(2, 3), np.full((2, 3), 0.5), np.full((2, 3), 0.25)
    meta = {"format": "minillm-checkpoint", "format_version": 1, "minillm_version": "0.1", "step": 7,
            "param_names": ["w"], "optimizer": {"type": "adamw", "t": 7, "hparams": {"lr": 0.1},
                                                "buffers": ["exp_avg", "exp_avg_sq"]},
            "config": {"lr": 0.1}, "model_config": {"n": 1}, "tokenizer": None, "rng": {"data": 1},
            "metrics": {"val_loss": 2.0}}
    np.savez(tmp_path / "checkpoint.npz", **{"params:w": w, "optimizer:exp_avg:w": m, "optimizer:exp_avg_sq:w": v,
                                             "__meta__": np.frombuffer(json.dumps(meta).encode(), np.uint8)})
    got = ck.load_checkpoint(tmp_path)
    assert got["step"] == 7 and np.array_equal(got["params"]["w"], w) and got["params"]["w"].dtype == np.float32
    assert got["optimizer"]["t"] == 7 and np.array_equal(got["optimizer"]["buffers"]["exp_avg_sq"]["w"], v)
    assert (got["config"], got["model_config"], got["rng"], got["metrics"]) == (
        {"lr": 0.1}, {"n": 1}, {"data": 1}, {"val_loss": 2.0})
    meta["format_version"] = 2
    np.savez(tmp_path / "v2.npz", **{"params:w": w, "__meta__": np.frombuffer(json.dumps(meta).encode(), np.uint8)})
    with pytest.raises(ValueError, match="format version 2, this minillm reads 1"):
        ck.load_checkpoint(tmp_path / "v2.npz")


def test_save_checkpoint_stores_any_config_with_to_dict_and_writes_the_format(tmp_path):
    class Config:
        def to_dict(self):
            return {"lr": 0.3}

    path = ck.save_checkpoint(tmp_path, {"w": np.ones(2, np.float16)}, step=2, config=Config())
    with np.load(path) as z:
        assert sorted(z.files) == ["__meta__", "params:w"]
        meta = json.loads(bytes(z["__meta__"]).decode("utf-8"))
    assert (meta["format"], meta["format_version"], meta["config"]) == ("minillm-checkpoint", 1, {"lr": 0.3})
    assert json.loads((tmp_path / ck.CHECKPOINT_JSON).read_text()) == meta   # the human-readable copy
    with pytest.raises(TypeError, match="checkpoint: config, .* must be JSON-serialisable"):
        ck.save_checkpoint(tmp_path, {"w": np.ones(2)}, metrics={"x": object()})
    with pytest.raises(TypeError, match="params: expected a non-empty dict of arrays"):
        ck.save_checkpoint(tmp_path, {})


def test_files_are_written_whole_and_leave_no_temporary_files(tmp_path):
    ck.save_safetensors(tmp_path / "x.safetensors", {"a": np.ones(3, np.float32)})
    ck.save_safetensors(tmp_path / "x.safetensors", {"a": np.zeros(3, np.float32)})   # replaced whole
    cfg = gpt.GPTConfig(vocab_size=11, block_size=4, n_layer=1, n_head=1, n_embd=4)
    ck.save_hf(tmp_path / "hf", cfg, init_cpu(cfg, 0))
    assert sorted(os.listdir(tmp_path)) == ["hf", "x.safetensors"]
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    assert np.array_equal(ck.load_safetensors(tmp_path / "x.safetensors")["a"], np.zeros(3, np.float32))


# --- GPT-2 names, save_hf / load_hf ------------------------------------------------

def _tiny(**kw):
    return gpt.GPTConfig(**{**dict(vocab_size=23, block_size=12, n_layer=2, n_head=2, n_embd=8), **kw})


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=False), dict(norm_eps=1e-6)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_save_hf_then_load_hf_is_bit_exact(tmp_path, kw, dtype):
    cfg = _tiny(**kw)
    params = init_cpu(cfg, 4, dtype=dtype)
    ck.save_hf(tmp_path, cfg, params)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    cfg2, back = ck.load_hf(tmp_path, dtype=None, device="cpu")
    assert cfg2 == cfg
    assert list(back) == list(params)
    for k in params:
        assert back[k].dtype == params[k].dtype and np.array_equal(back[k], params[k]), k


def test_a_bias_free_model_saves_as_gpt2_with_zero_biases(tmp_path):
    cfg = _tiny(bias=False)
    params = init_cpu(cfg, 5)
    ck.save_hf(tmp_path, cfg, params)
    cfg2, back = ck.load_hf(tmp_path, device="cpu")
    assert cfg2 == cfg.replace(bias=True)
    idx = np.random.default_rng(0).integers(0, 23, (2, 7))
    assert np.array_equal(gpt.forward(params, cfg, idx)[0], gpt.forward(back, cfg2, idx)[0])


@pytest.mark.parametrize("dtype, tol", [("float16", 1e-3), ("bfloat16", 8e-3)])
def test_half_precision_files_load(tmp_path, dtype, tol):
    cfg = _tiny()
    params = init_cpu(cfg, 6)
    params = {k: v + np.float32(0.5) * np.random.default_rng(1).standard_normal(v.shape).astype(np.float32)
              for k, v in params.items()}
    ck.save_hf(tmp_path, cfg, params, dtype=dtype)
    header, _, _ = ck.read_safetensors_header(tmp_path / "model.safetensors")
    assert {e["dtype"] for e in header.values()} == {"F16" if dtype == "float16" else "BF16"}
    _, back = ck.load_hf(tmp_path, device="cpu")              # widened to float32 by default
    for k, v in params.items():
        assert back[k].dtype == np.float32
        if dtype == "float16":
            assert np.array_equal(back[k], v.astype(np.float16).astype(np.float32)), k
        else:
            assert np.array_equal(back[k], ck.bfloat16_to_float32(ck.float32_to_bfloat16(v))), k
        assert np.allclose(back[k], v, rtol=tol, atol=1e-6)
    _, kept = ck.load_hf(tmp_path, dtype=None, device="cpu")
    assert kept["wte"].dtype == (np.float16 if dtype == "float16" else np.float32)


def test_hf_state_dict_names_params_and_grads(xp):
    cfg = _tiny(tie_embeddings=False)
    params = {k: on(xp, v) for k, v in init_cpu(cfg, 0).items()}
    sd = ck.hf_state_dict(cfg, params)
    assert sd["transformer.h.1.attn.c_attn.weight"] is params["h.1.attn.w_qkv"]
    assert sd["lm_head.weight"] is params["lm_head"] and sd["transformer.wte.weight"] is params["wte"]
    assert len(sd) == len(params)
    idx = on(xp, np.zeros((1, 3), dtype=np.int64))
    _, grads = gpt.loss_and_grads(params, cfg, idx, idx)
    assert set(ck.hf_state_dict(cfg, grads)) == set(sd)


def test_checkpoint_problems_name_the_tensor(tmp_path):
    cfg = _tiny()
    params = init_cpu(cfg, 0)
    sd = {k: np_(v) for k, v in ck.hf_state_dict(cfg, params).items()}
    ck.save_hf(tmp_path, cfg, params)
    missing = dict(sd)
    del missing["transformer.h.1.mlp.c_fc.bias"]
    ck.save_safetensors(tmp_path / "model.safetensors", missing)
    with pytest.raises(ValueError, match=r"tensor 'transformer.h.1.mlp.c_fc.bias' is missing"):
        ck.load_hf(tmp_path)
    wrong = dict(sd, **{"transformer.h.0.attn.c_proj.weight": np.zeros((8, 9), np.float32)})
    ck.save_safetensors(tmp_path / "model.safetensors", wrong)
    with pytest.raises(ValueError, match=r"tensor 'transformer.h.0.attn.c_proj.weight': expected shape "
                                         r"\(8, 8\) from config.json, got \(8, 9\)"):
        ck.load_hf(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        ck.load_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        ck.load_hf(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bart"}))
    with pytest.raises(ValueError, match=r"model_type: expected one of .*'gpt2'.*got 'bart'"):
        ck.load_hf(tmp_path)


def test_hub_style_names_without_the_transformer_prefix_load(tmp_path):
    cfg = _tiny()
    params = init_cpu(cfg, 0)
    ck.save_hf(tmp_path, cfg, params)
    sd = {k.replace("transformer.", ""): np_(v) for k, v in ck.hf_state_dict(cfg, params).items()}
    sd["h.0.attn.bias"] = np.ones((1, 1, 12, 12), np.float32)     # old files carry the causal-mask buffer
    ck.save_safetensors(tmp_path / "model.safetensors", sd)
    _, back = ck.load_hf(tmp_path, device="cpu")
    assert all(np.array_equal(back[k], params[k]) for k in params)


def test_non_gpt2_variants_are_refused_by_save_hf(tmp_path):
    cfg = _tiny(pos="rope", norm="rmsnorm")
    with pytest.raises(ValueError, match=r"GPT-2 needs norm='layernorm' \(got 'rmsnorm'\), pos='learned'"):
        ck.save_hf(tmp_path, cfg, init_cpu(cfg, 0))
    with pytest.raises(TypeError, match="config: expected a config of one of"):
        ck.save_hf(tmp_path, {"n_layer": 1}, {})


# --- parity with Hugging Face transformers ---------------------------------------

def _hf_tiny(tmp_path, seed=0, **kw):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hc = transformers.GPT2Config(**{**dict(vocab_size=37, n_positions=16, n_embd=16, n_layer=2, n_head=4,
                                           layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0), **kw})
    model = transformers.GPT2LMHeadModel(hc).eval()
    with torch.no_grad():   # random LayerNorm gains and biases too, so no parameter is trivial
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape))
    model.save_pretrained(str(tmp_path))
    return torch, transformers, model


@pytest.mark.parametrize("kw", [dict(), dict(tie_word_embeddings=False, layer_norm_epsilon=1e-3)])
def test_logits_equal_transformers_gpt2(tmp_path, kw):
    torch, _, model = _hf_tiny(tmp_path, **kw)
    cfg, params = ck.load_hf(tmp_path, dtype=np.float64, device="cpu")
    idx = np.random.default_rng(0).integers(0, 37, (3, 16))
    ours, _ = gpt.forward(params, cfg, idx)
    with torch.no_grad():
        ref = model.double()(torch.from_numpy(idx)).logits.numpy()
    assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    # float32 as stored: tight too
    cfg32, p32 = ck.load_hf(tmp_path, device="cpu")
    assert_close(gpt.forward(p32, cfg32, idx)[0], ref, rtol=1e-4, atol=1e-5)


def test_gradients_equal_torch_autograd(tmp_path):
    torch, _, model = _hf_tiny(tmp_path, seed=1)
    cfg, params = ck.load_hf(tmp_path, dtype=np.float64, device="cpu")
    rng = np.random.default_rng(2)
    idx = rng.integers(0, 37, (2, 11))
    targets = rng.integers(0, 37, (2, 11))
    targets[0, 3] = -100
    loss, grads = gpt.loss_and_grads(params, cfg, idx, targets)
    model = model.double()
    out = model(torch.from_numpy(idx))
    ref_loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 37), torch.from_numpy(targets).reshape(-1),
                                                 ignore_index=-100)
    ref_loss.backward()
    assert loss == pytest.approx(ref_loss.item(), rel=1e-12)
    named = dict(model.named_parameters())
    for hf_name, g in ck.hf_state_dict(cfg, grads).items():
        assert_close(g, named[hf_name].grad.numpy(), rtol=1e-9, atol=1e-12, msg=hf_name)


def test_save_hf_output_loads_into_transformers_with_the_same_logits(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for kw in (dict(), dict(tie_embeddings=False, bias=False)):
        cfg = _tiny(**kw)
        rng = np.random.default_rng(3)
        params = {k: v + rng.standard_normal(v.shape).astype(np.float32) * 0.2
                  for k, v in init_cpu(cfg, 3).items()}
        d = tmp_path / str(len(kw))
        ck.save_hf(d, cfg, params)
        model = transformers.GPT2LMHeadModel.from_pretrained(str(d)).eval()
        idx = rng.integers(0, 23, (2, 12))
        with torch.no_grad():
            ref = model(torch.from_numpy(idx)).logits.numpy()
        assert_close(gpt.forward(params, cfg, idx)[0], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_checkpoints_saved_by_transformers_load(tmp_path, half):
    torch, _, model = _hf_tiny(tmp_path / "f32", seed=4)
    model = model.to(getattr(torch, half))
    model.save_pretrained(str(tmp_path / half))
    header, _, _ = ck.read_safetensors_header(tmp_path / half / "model.safetensors")
    assert {e["dtype"] for e in header.values()} == {"F16" if half == "float16" else "BF16"}
    cfg, params = ck.load_hf(tmp_path / half, device="cpu")
    named = dict(model.named_parameters())
    for hf_name, ours in ck.hf_state_dict(cfg, params).items():   # widened exactly to float32
        assert ours.dtype == np.float32
        assert np.array_equal(ours, named[hf_name].detach().float().numpy()), hf_name
    idx = np.random.default_rng(5).integers(0, 37, (2, 9))
    with torch.no_grad():
        ref = model.float()(torch.from_numpy(idx)).logits.numpy()
    assert_close(gpt.forward(params, cfg, idx)[0], ref, rtol=1e-4, atol=1e-5)
