"""04 - Embeddings: from token ids to vectors.

A language model reads integers. Its first layer turns each id into a learned
vector (a row of a table), adds a vector that says *where* the token is, and
for BERT one that says *which sentence* it belongs to. This walkthrough builds
the GPT-2 and BERT input layers from minillm.embeddings and checks their
gradients.
Run:  python walkthroughs/04_embeddings.py
"""
import numpy as np

from _narrate import check, expect_close, expect_gradcheck, step
from minillm import backend
from minillm import backprop as bp
from minillm import embeddings as E

xp = backend.xp_default()
rng = backend.make_rng(0)
f64 = np.float64
np.set_printoptions(precision=3, suppress=True)


def show(a):
    return np.array2string(backend.to_numpy(a), prefix="    ")


print(__doc__.split("\n\n")[0])
print(f"device: {backend.device_name()} ({xp.__name__})")

# ---------------------------------------------------------------------------
step(1, "a token embedding is a row lookup")
V, C = 6, 4
wte = backend.randn(rng, (V, C), dtype=f64)
ids = xp.asarray([[2, 5, 2], [0, 2, 1]])            # (B, T) = (2, 3): id 2 appears three times
out, cache = E.embedding_forward(ids, wte)
print(f"ids {tuple(ids.shape)}:\n   ", show(ids))
print(f"table wte {tuple(wte.shape)} -> out {tuple(out.shape)}: out[b, t] = wte[ids[b, t]]")
one_hot = xp.eye(V)[ids.reshape(-1)]
same = bool(xp.all(out.reshape(-1, C) == one_hot @ wte))
check(same, "embedding_forward should equal one_hot @ wte exactly")
print(f"the same thing as a one-hot matrix times the table: {same} (but the lookup never builds the"
      f" {ids.size}x{V} one-hot matrix, which for GPT-2 would be {ids.size}x50257)")

# ---------------------------------------------------------------------------
step(2, "its backward is a scatter-add: repeated ids accumulate")
dout = xp.ones_like(out)
dwte = E.embedding_backward(dout, cache)
print("with every upstream gradient = 1, row v of dwte counts how often id v appears:")
print("   ", show(dwte[:, 0]), "  <- id 2 appears 3 times, ids 3 and 4 never")
counts = xp.asarray(np.bincount(backend.to_numpy(ids).reshape(-1), minlength=V), dtype=f64)
expect_close("dwte with all-ones dout vs the id counts", dwte, xp.repeat(counts[:, None], C, axis=1), 0)
print("Writing dwte[ids] += dout would be wrong: repeated indices keep only one write.")
naive = xp.zeros_like(wte)
naive[ids.reshape(-1)] += dout.reshape(-1, C)
print("   naive fancy-index add gives:", show(naive[:, 0]))
check(float(naive[2, 0]) == 1.0, "the naive fancy-index add should have kept only one of id 2's three writes")
dout = backend.randn(rng, out.shape, dtype=f64)
dwte = E.embedding_backward(dout, cache)
d = expect_close("embedding_backward vs one_hot^T @ dout", dwte, one_hot.T @ dout.reshape(-1, C), 1e-12)
print(f"the backward equals one_hot^T @ dout: max difference {d:.1e}")
rep = bp.gradcheck(E.embedding_forward, E.embedding_backward, [ids, wte], wrt=[1])
print("gradcheck (wrt the table; ids are integers, not differentiable):", expect_gradcheck("embedding", rep))

# ---------------------------------------------------------------------------
step(3, "learned positions (GPT-2's wpe, BERT's position_embeddings)")
T, n_pos = ids.shape[1], 8
wpe = backend.randn(rng, (n_pos, C), std=0.1, dtype=f64)
pos = E.position_ids(T, xp=xp)
pe, pcache = E.embedding_forward(pos, wpe)
print(f"position_ids({T}) = {backend.to_numpy(pos).tolist()}; the lookup is the same embedding_forward:"
      f" wpe {tuple(wpe.shape)} -> {tuple(pe.shape)}")
x = out + pe                                        # (B, T, C) + (T, C): the same positions for every row
print(f"GPT-2's input: x = wte[ids] + wpe[positions] -> {tuple(x.shape)}")
print("its gradient reaches wpe through the sum over the batch:")
dx = backend.randn(rng, x.shape, dtype=f64)
dwpe = E.embedding_backward(dx.sum(axis=0), pcache)
print(f"   dwpe rows used: {int((xp.abs(dwpe).sum(1) > 0).sum())} of {n_pos} (only the first {T} positions)")
expect_close("dwpe's first rows vs dx summed over the batch", dwpe[:T], dx.sum(axis=0), 1e-12)
check(not bool(xp.any(dwpe[T:])), "positions past T were never used, so their gradient should be 0")
next_pos = backend.to_numpy(E.position_ids(1, offset=T, xp=xp)).tolist()
print(f"generating token {T} with a KV cache holding {T} tokens: position_ids(1, offset={T}) = {next_pos}")
check(next_pos == [T], f"position_ids(1, offset={T}) should be [{T}], got {next_pos}")

# ---------------------------------------------------------------------------
step(4, "sinusoidal positions: no parameters at all")
print("PE[p, 2i] = sin(p / 10000^(2i/C)),  PE[p, 2i+1] = cos(p / 10000^(2i/C))")
pe_s = E.sinusoidal_positions(6, 8, dtype=f64)
print("first 6 positions, C = 8 (columns come in sin/cos pairs, fast to slow):\n   ", show(pe_s))
angle = np.arange(6)[:, None] / 10000 ** (np.arange(0, 8, 2)[None, :] / 8)     # p / 10000^(2i/C)
expect_close("sinusoidal_positions' sin columns vs the formula", pe_s[:, 0::2], xp.asarray(np.sin(angle)), 1e-12)
expect_close("sinusoidal_positions' cos columns vs the formula", pe_s[:, 1::2], xp.asarray(np.cos(angle)), 1e-12)
print("Each sin/cos pair rotates at its own frequency, so PE[p + k] is a fixed rotation of")
print("PE[p], the same for every p. Checked live for k = 3:")
Cs, k = 16, 3
P = backend.to_numpy(E.sinusoidal_positions(40 + k, Cs, dtype=f64))
freqs = 1.0 / 10000.0 ** (np.arange(0, Cs, 2) / Cs)
cos_k, sin_k = np.cos(k * freqs), np.sin(k * freqs)
s_, c_ = P[:40, 0::2], P[:40, 1::2]
err = max(np.abs(P[k:, 0::2] - (s_ * cos_k + c_ * sin_k)).max(), np.abs(P[k:, 1::2] - (c_ * cos_k - s_ * sin_k)).max())
print(f"   max |PE[p + 3] - R_3 PE[p]| over 40 positions: {err:.1e}")
check(err <= 1e-12, f"PE[p + 3] should be a fixed rotation of PE[p]: off by {err:.1e}")
sims = P[:40] @ P[0]
print("and similarity to position 0 falls off with distance: PE[p] . PE[0] for p = 0, 1, 2, 4, 8, 16, 32:")
falloff = np.array([sims[p] for p in (0, 1, 2, 4, 8, 16, 32)])
print("   ", falloff)
check(bool(np.all(np.diff(falloff) < 0)), f"similarity to position 0 should fall with distance: {falloff}")

# ---------------------------------------------------------------------------
step(5, "BERT's input: token + position + segment")
n_types = 2
wtt = backend.randn(rng, (n_types, C), std=0.1, dtype=f64)
token_type_ids = xp.asarray([[0, 0, 1], [0, 1, 1]])  # sentence A, then sentence B
seg, scache = E.segment_embedding_forward(token_type_ids, wtt)
x_bert = out + pe + seg
print(f"token_type_ids:\n    {show(token_type_ids)}\n-> x = wte[ids] + wpe[pos] + wtt[types]: {tuple(x_bert.shape)}")
expect_close("segment embedding vs wtt[types]", seg, wtt[token_type_ids], 0)
rep = bp.gradcheck(E.segment_embedding_forward, E.segment_embedding_backward, [token_type_ids, wtt], wrt=[1])
print("gradcheck of the segment embedding:", expect_gradcheck("segment embedding", rep))

# ---------------------------------------------------------------------------
step(6, "bad ids fail loudly")
for bad, what in ((xp.asarray([[1, 9]]), "an id past the vocabulary"), (xp.asarray([0.0, 1.0]), "float ids")):
    try:
        E.embedding_forward(bad, wte)
    except (ValueError, TypeError) as e:
        print(f"   {what}: {type(e).__name__}: {e}")
    else:
        check(False, f"embedding_forward accepted {what}")
print("\nDone: lookups are gathers, their gradients scatter-adds, and both were checked.")
