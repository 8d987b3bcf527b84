"""rnn.py: RNN (tanh, relu), LSTM and GRU forward and backpropagation through time, the
carried final states of truncated BPTT, PyTorch's modules as the reference, and bad input."""
import numpy as np
import pytest
from hypothesis import assume, example, given, strategies as st

from helpers import assert_alive, assert_close, assert_gradcheck, np_, on
from minillm import backprop as bp
from minillm import rnn
from strategies import randn, seeds

# kind -> (gate blocks k, forward, backward)
KINDS = {"rnn": 1, "relu": 1, "lstm": 4, "gru": 3}


def _weights(seed, I, H, k, scale=0.6):
    return (randn(seed, I, k * H, scale=scale), randn(seed + 1, H, k * H, scale=scale),
            randn(seed + 2, k * H, scale=0.3), randn(seed + 3, k * H, scale=0.3))


def _forward(kind, x, h0, c0, w):
    if kind == "lstm":
        return rnn.lstm_forward(x, h0, c0, *w)
    if kind == "gru":
        return rnn.gru_forward(x, h0, *w)
    return rnn.rnn_forward(x, h0, *w, nonlinearity="relu" if kind == "relu" else "tanh")


def _relu_preactivations(x, h0, w_ih, w_hh, b_ih, b_hh):
    """a_t of a relu RNN, recomputed step by step (to keep draws away from the kink)."""
    h, out = h0, []
    for t in range(x.shape[1]):
        a = x[:, t] @ w_ih + b_ih + h @ w_hh + b_hh
        h = np.maximum(a, 0)
        out.append(a)
    return np.stack(out, axis=1)


cases = st.tuples(st.sampled_from(sorted(KINDS)), seeds, st.integers(1, 3), st.integers(2, 4),
                  st.integers(1, 3), st.integers(1, 3))


# --- finite differences of every backward, with the carried states' gradients -----------

@given(case=cases)
@example(case=("lstm", 0, 2, 3, 2, 2))
@example(case=("gru", 1, 2, 3, 2, 2))
@example(case=("relu", 2, 2, 3, 2, 3))
def test_backward_matches_finite_differences(xp, case):
    kind, seed, B, T, I, H = case
    k = KINDS[kind]
    x, h0, c0 = randn(seed + 10, B, T, I), randn(seed + 11, B, H), randn(seed + 12, B, H)
    w = _weights(seed, I, H, k)
    if kind == "relu":    # the stencil reaches 2e-4: keep every pre-activation 1e-2 from 0
        assume(np.min(np.abs(_relu_preactivations(x, h0, *w))) >= 1e-2)
    inputs = [x, h0, c0, *w] if kind == "lstm" else [x, h0, *w]
    inputs = [on(xp, a) for a in inputs]

    # The forward returns (y, the final states as copies); the random dy of each part checks
    # dh_last (and dc_last) too: L = sum(dy * y) + sum(dh_last * h_T) (+ sum(dc_last * c_T)).
    def forward(*args):
        if kind == "lstm":
            y, cache = rnn.lstm_forward(*args)
            h_T, c_T = rnn.final_state(cache)
            return (y, h_T.copy(), c_T.copy()), cache
        y, cache = _forward(kind, args[0], args[1], None, args[2:])
        return (y, rnn.final_state(cache).copy()), cache

    def backward(dys, cache):
        if kind == "lstm":
            return rnn.lstm_backward(dys[0], cache, dh_last=dys[1], dc_last=dys[2])
        back = rnn.gru_backward if kind == "gru" else rnn.rnn_backward
        return back(dys[0], cache, dh_last=dys[1])

    rep = bp.gradcheck(forward, backward, inputs, seed=seed)
    assert_gradcheck(rep)
    (y, *_), cache = forward(*inputs)
    grads = backward(tuple(on(xp, randn(seed + 5, *a.shape)) for a in (y, y[:, -1])) + (
        (on(xp, randn(seed + 6, B, H)),) if kind == "lstm" else ()), cache)
    if kind != "relu":    # a relu draw may switch a unit off for good: its gradients are then 0
        assert_alive(grads)


@given(kind=st.sampled_from(sorted(KINDS)), seed=seeds)
def test_default_final_state_gradients_are_zero(xp, kind, seed):
    # dh_last=None (and dc_last=None) mean zero, not "ignore": the same gradients as zeros
    B, T, I, H = 2, 3, 2, 3
    k = KINDS[kind]
    x, h0, c0 = (on(xp, randn(seed + i, *s)) for i, s in enumerate([(B, T, I), (B, H), (B, H)]))
    w = [on(xp, a) for a in _weights(seed + 5, I, H, k)]
    y, cache = _forward(kind, x, h0, c0, w)
    dy = on(xp, randn(seed + 9, B, T, H))
    zero = on(xp, np.zeros((B, H)))
    if kind == "lstm":
        a, b = rnn.lstm_backward(dy, cache), rnn.lstm_backward(dy, cache, dh_last=zero, dc_last=zero)
    else:
        back = rnn.gru_backward if kind == "gru" else rnn.rnn_backward
        a, b = back(dy, cache), back(dy, cache, dh_last=zero)
    for ga, gb in zip(a, b):
        assert_close(ga, gb, rtol=0, atol=0)


# --- PyTorch as the reference -------------------------------------------------------------

def _torch_module(torch, kind, I, H, w):
    if kind == "lstm":
        mod = torch.nn.LSTM(I, H, batch_first=True)
    elif kind == "gru":
        mod = torch.nn.GRU(I, H, batch_first=True)
    else:
        mod = torch.nn.RNN(I, H, batch_first=True, nonlinearity="relu" if kind == "relu" else "tanh")
    mod = mod.double()
    with torch.no_grad():   # ours are torch's transposed, the gate blocks in the same order
        for name, a in zip(("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"), w):
            getattr(mod, name).copy_(torch.from_numpy(a.T.copy() if a.ndim == 2 else a))
    return mod


@given(case=cases)
def test_matches_torch_outputs_and_gradients(case):
    torch = pytest.importorskip("torch")
    kind, seed, B, T, I, H = case
    k = KINDS[kind]
    x, h0, c0 = randn(seed + 10, B, T, I), randn(seed + 11, B, H), randn(seed + 12, B, H)
    w = _weights(seed, I, H, k)
    dy, dh_last, dc_last = randn(seed + 20, B, T, H), randn(seed + 21, B, H), randn(seed + 22, B, H)
    mod = _torch_module(torch, kind, I, H, w)
    xt, ht, ct = (torch.tensor(a, requires_grad=True) for a in (x, h0[None], c0[None]))
    y, cache = _forward(kind, x, h0, c0, w)
    if kind == "lstm":
        yt, (hT, cT) = mod(xt, (ht, ct))
        loss = (yt * torch.from_numpy(dy)).sum() + (hT[0] * torch.from_numpy(dh_last)).sum() \
            + (cT[0] * torch.from_numpy(dc_last)).sum()
        ours = rnn.lstm_backward(dy, cache, dh_last=dh_last, dc_last=dc_last)
        assert_close(rnn.final_state(cache)[1], cT[0].detach().numpy(), rtol=1e-12, atol=1e-14)
    else:
        yt, hT = mod(xt, ht)
        loss = (yt * torch.from_numpy(dy)).sum() + (hT[0] * torch.from_numpy(dh_last)).sum()
        ours = (rnn.gru_backward if kind == "gru" else rnn.rnn_backward)(dy, cache, dh_last=dh_last)
    loss.backward()
    assert_close(y, yt.detach().numpy(), rtol=1e-12, atol=1e-14)
    assert_close(rnn.final_state(cache)[0] if kind == "lstm" else rnn.final_state(cache),
                 hT[0].detach().numpy(), rtol=1e-12, atol=1e-14)
    theirs = [xt.grad.numpy(), ht.grad[0].numpy()] + ([ct.grad[0].numpy()] if kind == "lstm" else []) + [
        mod.weight_ih_l0.grad.numpy().T, mod.weight_hh_l0.grad.numpy().T,
        mod.bias_ih_l0.grad.numpy(), mod.bias_hh_l0.grad.numpy()]
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert_close(a, b, rtol=1e-10, atol=1e-12)


# --- properties ---------------------------------------------------------------------------

@given(case=cases, cut=st.integers(1, 3))
def test_outputs_at_t_ignore_inputs_after_t(xp, case, cut):
    kind, seed, B, T, I, H = case
    assume(cut < T)
    x, h0, c0 = randn(seed + 10, B, T, I), randn(seed + 11, B, H), randn(seed + 12, B, H)
    w = [on(xp, a) for a in _weights(seed, I, H, KINDS[kind])]
    x2 = x.copy()
    x2[:, cut:] = randn(seed + 99, B, T - cut, I) * 5     # change only the future
    y1, _ = _forward(kind, on(xp, x), on(xp, h0), on(xp, c0), w)
    y2, _ = _forward(kind, on(xp, x2), on(xp, h0), on(xp, c0), w)
    assert_close(np_(y1)[:, :cut], np_(y2)[:, :cut], rtol=0, atol=0)
    assert not np.allclose(np_(y1)[:, cut:], np_(y2)[:, cut:])


@given(seed=seeds, B=st.integers(1, 3), T=st.integers(2, 6), I=st.integers(1, 3), H=st.integers(1, 3))
def test_lstm_with_forget_gate_open_and_input_gate_closed_carries_c_unchanged(xp, seed, B, T, I, H):
    w_ih, w_hh, b_ih, b_hh = _weights(seed, I, H, 4)
    b_hh = b_hh.copy()
    b_hh[:H] = -60.0         # input gate i = sigmoid(~-60) ~ 1e-26: nothing written
    b_hh[H:2 * H] = 60.0     # forget gate f = sigmoid(~60) = 1 to float64: nothing forgotten
    x, h0, c0 = randn(seed + 1, B, T, I), randn(seed + 2, B, H), randn(seed + 3, B, H)
    y, cache = rnn.lstm_forward(*on(xp, x, h0, c0, w_ih, w_hh, b_ih, b_hh))
    for t in range(T):
        assert_close(np_(cache.c)[:, t], c0, rtol=0, atol=1e-20)
    # and the cell's gradient passes back unchanged: dc0 = dc_last when nothing else reads c
    o_closed = b_hh.copy()
    o_closed[3 * H:] = -60.0  # output gate shut too: h carries nothing of c
    _, cache = rnn.lstm_forward(*on(xp, x, h0, c0, w_ih, w_hh, b_ih, o_closed))
    dc_last = randn(seed + 4, B, H)
    dc0 = rnn.lstm_backward(on(xp, np.zeros((B, T, H))), cache, dc_last=on(xp, dc_last))[2]
    assert_close(dc0, dc_last, rtol=1e-15, atol=0)


@given(seed=seeds, B=st.integers(1, 3), T=st.integers(2, 6), I=st.integers(1, 3), H=st.integers(1, 3))
def test_gru_with_update_gate_one_keeps_h(xp, seed, B, T, I, H):
    w_ih, w_hh, b_ih, b_hh = _weights(seed, I, H, 3)
    b_hh = b_hh.copy()
    b_hh[H:2 * H] = 60.0     # z = 1: h_t = z h_{t-1} + (1 - z) n = h_{t-1}
    x, h0 = randn(seed + 1, B, T, I), randn(seed + 2, B, H)
    y, _ = rnn.gru_forward(*on(xp, x, h0, w_ih, w_hh, b_ih, b_hh))
    for t in range(T):
        assert_close(np_(y)[:, t], h0, rtol=0, atol=1e-20)


@given(kind=st.sampled_from(sorted(KINDS)), seed=seeds, T=st.integers(2, 5), cut=st.integers(1, 4))
def test_truncated_bptt_chunks_chain_to_the_whole_sequence(xp, kind, seed, T, cut):
    # Forward in two chunks, the first's final states starting the second, equals one pass;
    # and the second chunk's dh0 (dc0) fed as the first's dh_last (dc_last) gives the
    # whole sequence's gradients: truncated BPTT without the truncation.
    assume(cut < T)
    B, I, H = 2, 2, 3
    k = KINDS[kind]
    x, h0, c0, dy = randn(seed, B, T, I), randn(seed + 1, B, H), randn(seed + 2, B, H), randn(seed + 3, B, T, H)
    w = [on(xp, a) for a in _weights(seed + 4, I, H, k)]
    y, cache = _forward(kind, on(xp, x), on(xp, h0), on(xp, c0), w)
    y1, c1 = _forward(kind, on(xp, x[:, :cut]), on(xp, h0), on(xp, c0), w)
    s = rnn.final_state(c1)
    h1, cc1 = (s if kind == "lstm" else (s, None))
    y2, c2 = _forward(kind, on(xp, x[:, cut:]), h1, cc1, w)
    assert_close(np.concatenate([np_(y1), np_(y2)], axis=1), y, rtol=0, atol=0)
    if kind == "lstm":
        g = rnn.lstm_backward(on(xp, dy), cache)
        g2 = rnn.lstm_backward(on(xp, dy[:, cut:]), c2)
        g1 = rnn.lstm_backward(on(xp, dy[:, :cut]), c1, dh_last=g2[1], dc_last=g2[2])
        n_state = 3
    else:
        back = rnn.gru_backward if kind == "gru" else rnn.rnn_backward
        g, g2 = back(on(xp, dy), cache), back(on(xp, dy[:, cut:]), c2)
        g1 = back(on(xp, dy[:, :cut]), c1, dh_last=g2[1])
        n_state = 2
    assert_close(np.concatenate([np_(g1[0]), np_(g2[0])], axis=1), g[0], rtol=1e-12, atol=1e-13)
    for i in range(1, n_state):                       # dh0 (dc0)
        assert_close(g1[i], g[i], rtol=1e-12, atol=1e-13)
    for i in range(n_state, len(g)):                  # weights: the two chunks' sums
        assert_close(np_(g1[i]) + np_(g2[i]), g[i], rtol=1e-12, atol=1e-13)


# --- bad input ----------------------------------------------------------------------------

def _good(k, B=2, T=3, I=2, H=3):
    return (randn(0, B, T, I), randn(1, B, H), randn(2, B, H), *_weights(3, I, H, k))


def test_gate_stacked_shapes_are_checked():
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = _good(3)          # GRU-shaped (3H) weights
    with pytest.raises(ValueError, match=r"w_hh: expected shape \(H, 4H\) = \(3, 12\) for the LSTM "
                                         r"\(gates i, f, g, o stacked\), got \(3, 9\)"):
        rnn.lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = _good(4)
    with pytest.raises(ValueError, match=r"w_hh: expected shape \(H, 3H\) = \(3, 9\) for the GRU"):
        rnn.gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh)
    with pytest.raises(ValueError, match=r"w_ih: expected shape \(I, 4H\) = \(2, 12\)"):
        rnn.lstm_forward(x, h0, c0, w_ih[:, :9], w_hh, b_ih, b_hh)
    with pytest.raises(ValueError, match=r"b_hh: expected shape \(12,\), got \(9,\)"):
        rnn.lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh[:9])
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = _good(1)
    with pytest.raises(ValueError, match=r"w_ih: expected shape \(I, 1H\) = \(2, 3\)"):
        rnn.rnn_forward(x, h0, w_ih[:1], w_hh, b_ih, b_hh)


def test_empty_sequence_mismatched_states_and_unknown_nonlinearity_are_rejected():
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = _good(4)
    with pytest.raises(ValueError, match=r"x: expected at least one time step .* got \(2, 0, 2\)"):
        rnn.lstm_forward(x[:, :0], h0, c0, w_ih, w_hh, b_ih, b_hh)
    with pytest.raises(ValueError, match=r"h0: expected shape \(B, H\) = \(2, 3\) .* got \(1, 3\)"):
        rnn.lstm_forward(x, h0[:1], c0, w_ih, w_hh, b_ih, b_hh)
    with pytest.raises(ValueError, match=r"c0: expected shape \(B, H\) = \(2, 3\) .* got \(3, 3\)"):
        rnn.lstm_forward(x, h0, np.zeros((3, 3)), w_ih, w_hh, b_ih, b_hh)
    with pytest.raises(ValueError, match="x: expected 3 dimensions"):
        rnn.lstm_forward(x[0], h0, c0, w_ih, w_hh, b_ih, b_hh)
    with pytest.raises(TypeError, match="h0: expected dtype float64"):
        rnn.lstm_forward(x, h0.astype(np.float32), c0, w_ih, w_hh, b_ih, b_hh)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = _good(1)
    with pytest.raises(ValueError, match=r"nonlinearity: expected one of \('tanh', 'relu'\), got 'sigmoid'"):
        rnn.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match=r"x: expected at least one time step"):
        rnn.rnn_forward(x[:, :0], h0, w_ih, w_hh, b_ih, b_hh)
    y, cache = rnn.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh)
    with pytest.raises(ValueError, match=r"dy: expected shape \(2, 3, 3\)"):
        rnn.rnn_backward(y[:, :2], cache)
    with pytest.raises(ValueError, match=r"dh_last: expected shape \(2, 3\) \(the final state's\)"):
        rnn.rnn_backward(y, cache, dh_last=np.zeros((2, 4)))
    with pytest.raises(TypeError, match="cache: expected an RNN, LSTM or GRU cache"):
        rnn.final_state((y,))


# --- the character-level language model ---------------------------------------------------

@given(cell=st.sampled_from(rnn.CELLS), seed=seeds, n_layer=st.integers(1, 2), T=st.integers(2, 4))
def test_language_model_gradients_match_finite_differences(xp, cell, seed, n_layer, T):
    from minillm.backprop import check_dict_gradients
    cfg = rnn.RNNLMConfig(cell=cell, vocab_size=5, n_embd=3, n_hidden=3, n_layer=n_layer, block_size=T)
    params = {k: on(xp, np_(v).astype(np.float64)) for k, v in rnn.init_lm_params(cfg, seed=seed).items()}
    rng = np.random.default_rng(seed)
    x, y = on(xp, rng.integers(0, 5, (2, T)), rng.integers(0, 5, (2, T)))
    loss, grads = rnn.lm_loss_and_grads(params, cfg, x, y)
    assert grads.keys() == params.keys()
    assert_alive({k: g for k, g in grads.items() if k != "wte"}, loss=loss)

    def f(p):   # the per-position losses, summed by the checker: cancellation-free
        logits = rnn.lm_forward(p, cfg, x)[0]
        return -bp.log_softmax(logits).reshape(-1, 5)[np.arange(2 * T), np_(y).reshape(-1)] / (2 * T)

    assert_gradcheck(check_dict_gradients(f, params, grads))


def test_language_model_carries_state_and_samples_the_same_with_or_without_it():
    cfg = rnn.RNNLMConfig(cell="lstm", vocab_size=7, n_embd=4, n_hidden=5, n_layer=2, block_size=6)
    params = rnn.init_lm_params(cfg, seed=3, dtype=np.float64)
    ids = np.random.default_rng(0).integers(0, 7, (2, 6))
    whole, _ = rnn.lm_forward(params, cfg, ids)
    first, cache = rnn.lm_forward(params, cfg, ids[:, :4])
    second, _ = rnn.lm_forward(params, cfg, ids[:, 4:], state=rnn.lm_final_state(cache))
    assert_close(np.concatenate([first, second], axis=1), whole, rtol=1e-13, atol=1e-14)
    # the decoder's cache is the state: sampling with it = re-running the whole sequence
    a = rnn.lm_generate(params, cfg, [1, 2, 3], 12, temperature=0.9, seed=5)
    b = rnn.lm_generate(params, cfg, [1, 2, 3], 12, temperature=0.9, seed=5, use_cache=False)
    assert a == b and a[:3] == [1, 2, 3] and len(a) == 15
    assert rnn.RNNLMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="config: expected a dict with model='rnn-lm'"):
        rnn.RNNLMConfig.from_dict({"n_layer": 1})
    with pytest.raises(ValueError, match=r"cell: expected one of \('rnn', 'lstm', 'gru'\), got 'transformer'"):
        rnn.RNNLMConfig(cell="transformer")
    with pytest.raises(ValueError, match=r"state: expected a list of 2 per-layer states"):
        rnn.lm_forward(params, cfg, ids, state=[np.zeros((2, 5))])


# --- the command line: train rnn|lstm|gru, resume, sample ---------------------------------

@pytest.mark.parametrize("cell", rnn.CELLS)
def test_train_resume_and_sample_from_the_command_line(tmp_path, capsys, monkeypatch, cell):
    from minillm.__main__ import main
    from minillm.train import load_checkpoint
    monkeypatch.setenv("MINILLM_DEVICE", "cpu")
    text = tmp_path / "poem.txt"
    text.write_text("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n" * 20)
    out = tmp_path / "run"
    assert main(["train", cell, "--preset", "tiny", "--data", str(text), "--out", str(out), "--max-steps", "3",
                 "--eval-interval", "2", "--sample-tokens", "20"]) == 0
    said = capsys.readouterr().out
    for words in ("corpus:", "tokenizer: CharTokenizer", f"model: {cell.upper()} LM", "final:", "checkpoint:",
                  "sample (20 tokens"):
        assert words in said, words
    ck = load_checkpoint(out)
    assert ck["step"] == 3 and ck["model_config"]["cell"] == cell and (out / "loss.svg").is_file()
    assert main(["train", cell, "--resume", "--out", str(out), "--max-steps", "4", "--sample-tokens", "0"]) == 0
    assert "resuming" in capsys.readouterr().out and load_checkpoint(out)["step"] == 4
    args = ["sample", "--checkpoint", str(out), "--prompt", "Thou", "--max-new-tokens", "12", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[:3] == first.splitlines()[:3]   # same seed, same text
    assert "Thou" in first and f"{cell.upper()}" in first
    # a GPT preset, a GPT-only sampling option, another cell's run: one line, exit 2
    assert main(["train", cell, "--preset", "llama", "--data", str(text)]) == 2
    assert "--preset: train" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(out), "--no-cache"]) == 2
    assert "applies to GPTs only" in capsys.readouterr().err
    other = "gru" if cell != "gru" else "lstm"
    assert main(["train", other, "--resume", "--out", str(out)]) == 2
    assert f"does not hold a {other} run" in capsys.readouterr().err


# --- bench sequence-models: the gradient it plots, and a run at toy size ------------------

@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_bench_state_gradients_match_torch_autograd(cell):
    # bench part 3 reads dL/dh_t (dL/dc_t) off truncated BPTT; torch's cells, unrolled by
    # hand with retain_grad on every state, give the same numbers
    torch = pytest.importorskip("torch")
    from minillm.bench.sequence_models import rnn_state_gradients
    cfg = rnn.RNNLMConfig(cell=cell, vocab_size=6, n_embd=3, n_hidden=4, block_size=5)
    p = rnn.init_lm_params(cfg, seed=2, dtype=np.float64)
    ids = np.random.default_rng(1).integers(0, 6, (3, 6))
    x, y = ids[:, :5], ids[:, 1:]
    hn, cn = rnn_state_gradients(p, cfg, x, y)
    tp = {k: torch.tensor(v) for k, v in p.items()}
    cellmod = (torch.nn.LSTMCell(3, 4) if cell == "lstm" else torch.nn.RNNCell(3, 4)).double()
    with torch.no_grad():
        for name in ("w_ih", "w_hh"):
            getattr(cellmod, name.replace("w_", "weight_")).copy_(tp[f"rnn.0.{name}"].T)
        for name in ("b_ih", "b_hh"):
            getattr(cellmod, name.replace("b_", "bias_")).copy_(tp[f"rnn.0.{name}"])
    emb = tp["wte"][torch.from_numpy(x)]
    h, c = torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64)
    hs, cs = [], []
    for t in range(5):
        if cell == "lstm":
            h, c = cellmod(emb[:, t], (h, c))
            c.retain_grad()
            cs.append(c)
        else:
            h = cellmod(emb[:, t], h)
        h.retain_grad()
        hs.append(h)
    logits = hs[-1] @ tp["lm_head.w"] + tp["lm_head.b"]
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(y[:, -1])).backward()
    assert_close(hn, [float(v.grad.norm(dim=1).mean()) for v in hs], rtol=1e-10, atol=1e-14)
    if cell == "lstm":
        assert_close(cn, [float(v.grad.norm(dim=1).mean()) for v in cs], rtol=1e-10, atol=1e-14)


def test_bench_sequence_models_runs_at_toy_size(tmp_path):
    import json
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "minillm", "bench", "sequence-models", "--seconds", "0",
                        "--steps", "2", "--params", "3000", "--models", "gpt,lstm,min-char-rnn",
                        "--lengths", "4,8", "--grad-length", "4", "--eval-batches", "1", "--batch-size", "2",
                        "--block-size", "8", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert [m["model"] for m in res["part1"]] == ["gpt", "lstm", "min-char-rnn"]
    assert all(np.isfinite(m["val_at_time"]) for m in res["part1"])
    assert {"rnn h_t (init)", "lstm c_t (trained)", "gpt residual stream (trained)"} <= set(res["part3_grad_norms"])
    for name in ("val_loss.svg", "step_time.svg", "gradient_norms.svg"):
        assert (tmp_path / name).read_text().startswith("<svg")
