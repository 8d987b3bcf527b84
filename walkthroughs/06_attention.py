"""06 - Attention: the one operation that lets tokens talk to each other.

Everything else in a transformer works on each token alone; attention is where a
token looks at the others. We build it up from one query by hand, then add the
1/sqrt(D) scale, the causal mask, several heads, grouped K/V heads (GQA/MQA),
rotary positions (RoPE), the KV cache used when generating, and the online
softmax that lets FlashAttention skip the T x T matrix. Every backward is checked
against finite differences at the end. Run:  python walkthroughs/06_attention.py
"""
import time
import tracemalloc

import numpy as np

from _narrate import FAST, check, expect_close, expect_gradcheck, step
from minillm import attention as A
from minillm import backend
from minillm.backprop import gradcheck

xp = backend.xp_default()          # numpy, or cupy under MINILLM_DEVICE=gpu
np.set_printoptions(precision=3, suppress=True, linewidth=110)
rng = backend.make_rng(0)
f64 = np.float64


def host(a):
    return backend.to_numpy(a)


print(__doc__.split("\n\n")[0])
print(f"arrays live on: {backend.device_name()} ({xp.__name__})")

# ---------------------------------------------------------------------------
step(1, "one query, by hand: compare, weigh, average")
print("A query q asks a question; every earlier token offers a key k_j (what it is\n"
      "about) and a value v_j (what it would say). The answer is the average of the\n"
      "values, weighted by softmax(q . k_j): similar keys get most of the weight.")
D = 4
keys = rng.standard_normal((5, D))
values = np.arange(5 * D, dtype=f64).reshape(5, D)
q = keys[3] * 2.0                     # a query that resembles key 3
scores = keys @ q / np.sqrt(D)
w = np.exp(scores - scores.max())
w /= w.sum()
by_hand = w @ values
print("scores q.k_j / sqrt(D):", scores)
print("softmax weights:       ", w, " (sum", round(float(w.sum()), 12), ")")
print("output = weights @ values:", by_hand)
out, _ = A.sdpa_forward(*(xp.asarray(a[None, None]) for a in (q[None], keys, values)))
print("minillm.attention.sdpa_forward gives the same:", host(out)[0, 0, 0],
      " max diff", expect_close("sdpa_forward vs the weighted average by hand", out[0, 0, 0], by_hand, 1e-12))
print("Subtracting the max score before exp() changes nothing (softmax ignores a shift)\n"
      "and keeps exp() from overflowing; sdpa_forward does the same per row.")

# ---------------------------------------------------------------------------
step(2, "why divide by sqrt(D)")
print("For random q, k with unit-variance entries, q . k is a sum of D terms, so its\n"
      "standard deviation grows like sqrt(D). Unscaled, large D pushes softmax to a\n"
      "near one-hot choice whose gradient vanishes; dividing by sqrt(D) keeps the\n"
      "scores at unit scale whatever the head size.")
for d in (4, 64, 256):
    qq, kk = rng.standard_normal((2000, d)), rng.standard_normal((2000, 16, d))
    s = np.einsum("nd,nkd->nk", qq, kk)
    for name, sc in (("unscaled", s), ("scaled  ", s / np.sqrt(d))):
        p = np.exp(sc - sc.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        print(f"  D={d:3d} {name}: std of scores {sc.std():6.2f}, mean largest weight among 16 keys "
              f"{p.max(1).mean():.2f}")
        if name.startswith("scaled"):
            check(abs(sc.std() - 1) < 0.1, f"scaled scores at D={d} should have std ~1, got {sc.std():.2f}")
        elif d >= 64:
            check(p.max(1).mean() > 0.75, f"unscaled D={d} should be near one-hot, got {p.max(1).mean():.2f}")

# ---------------------------------------------------------------------------
step(3, "the causal mask: a language model may not read ahead")
T = 5
print("When predicting token t+1 from tokens <= t, position t must not see later\n"
      "positions. Masked scores become -inf before the softmax, so their weight is\n"
      "exactly 0. True = may attend:")
print(A.causal_mask(T).astype(int))
qkv = [backend.randn(rng, (1, 1, T, D), dtype=f64) for _ in range(3)]
out, cache = A.sdpa_forward(*qkv, causal=True)
print("attention probabilities (row = query, column = key); the upper triangle is 0:")
print(host(cache.p)[0, 0])
check(not np.any(np.triu(host(cache.p)[0, 0], 1)), "causal attention put weight on a later position")
expect_close("rows of the attention probabilities sum to 1", cache.p.sum(-1), xp.ones((1, 1, T)), 1e-12)
changed = [a.copy() for a in qkv]
changed[1][..., 3:, :] += 5.0          # change keys and values after position 2
changed[2][..., 3:, :] -= 5.0
out2, _ = A.sdpa_forward(*changed, causal=True)
moved_past = float(np.abs(host(out2 - out)[0, 0, :3]).max())
moved_future = float(np.abs(host(out2 - out)[0, 0, 3:]).max())
print("change keys/values at positions 3..4: outputs at 0..2 move by", moved_past, "and at 3..4 by",
      round(moved_future, 3))
check(moved_past <= 1e-12 and moved_future > 0.1, "changing later tokens must not move earlier outputs (and should "
      f"move the later ones): {moved_past}, {moved_future}")
print("With a KV cache the queries are the last Tq of Tk positions, so the diagonal\n"
      "shifts right: causal_mask(2, 5) =")
print(A.causal_mask(2, 5).astype(int))
check(np.array_equal(host(A.causal_mask(2, 5)), np.tril(np.ones((2, 5), bool), 3)),
      "causal_mask(2, 5) should be the last two rows of the 5 x 5 causal mask")
pad = xp.asarray(np.array([[[[True, True, False, False, False]]]]))
m = xp.asarray(np.zeros((1, 1, T, T), dtype=bool))
out3, _ = A.sdpa_forward(*qkv, mask=m)
print("Padding masks (B, 1, 1, Tk) hide padded keys; a row that may see nothing at\n"
      "all (here every row, mask all False) is defined as output 0 with gradient 0,\n"
      "never NaN:", host(out3)[0, 0, 0], "; padding mask", host(pad).astype(int).ravel())
check(not np.any(host(out3)), "a fully masked row should give output 0 (and never NaN)")
out_pad, _ = A.sdpa_forward(*qkv, mask=pad)
p_pad = host(out_pad)
q_, k_, v_ = (host(a)[0, 0] for a in qkv)
sc = q_ @ k_[:2].T / np.sqrt(D)
w_pad = np.exp(sc - sc.max(1, keepdims=True))
expect_close("padded keys hidden, vs softmax over the two real keys by hand", p_pad[0, 0],
             (w_pad / w_pad.sum(1, keepdims=True)) @ v_[:2], 1e-12)

# ---------------------------------------------------------------------------
step(4, "multi-head attention: several questions at once")
B, T, C, H = 2, 6, 8, 2
Dh = C // H
print(f"x: (B, T, C) = ({B}, {T}, {C}). One matrix w_qkv (C, 3C) makes q, k and v for\n"
      f"all heads in one GEMM; reshaping to (B, H, T, D) with D = C/H = {Dh} gives each\n"
      "head its own small subspace, and all heads run in one batched matmul.")
x = backend.randn(rng, (B, T, C), dtype=f64)
w_qkv = backend.randn(rng, (C, 3 * C), std=C ** -0.5, dtype=f64)
b_qkv = backend.randn(rng, (3 * C,), std=0.1, dtype=f64)
w_o = backend.randn(rng, (C, C), std=C ** -0.5, dtype=f64)
b_o = xp.zeros(C, dtype=f64)
y, cache = A.self_attention_forward(x, w_qkv, b_qkv, w_o, b_o, H, causal=True)
p = host(cache.attn.p).reshape(B, H, T, T)
print("head 0 attention of the last query:", p[0, 0, -1])
print("head 1 attention of the last query:", p[0, 1, -1], "(different heads, different patterns)")
qkv_np = host(x) @ host(w_qkv) + host(b_qkv)
heads = []
for h in range(H):
    qh, kh, vh = (qkv_np[..., i * C + h * Dh: i * C + (h + 1) * Dh][:, None] for i in range(3))
    oh, _ = A.sdpa_forward(qh, kh, vh, causal=True)
    heads.append(oh[:, 0])
loop = np.concatenate(heads, -1) @ host(w_o) + host(b_o)
print("the same as a Python loop over heads, concatenated, then w_o: max diff",
      expect_close("self_attention_forward vs a loop over heads", loop, y, 1e-12))

# ---------------------------------------------------------------------------
step(5, "GQA and MQA: fewer key/value heads")
print("Query heads are cheap; key/value heads are what a KV cache must store for\n"
      "every past token. Grouped-query attention lets G = H/Hkv query heads share one\n"
      "K/V head (Hkv = 1 is multi-query attention). sdpa_forward never copies K/V per\n"
      "head: q (B, H, T, D) is reshaped to (B, Hkv, G*T, D), so each K/V head meets its\n"
      "group in one matmul.")
Hq, Dd, T_ctx = 32, 128, 4096
for hkv in (32, 8, 1):
    c = A.KVCache(n_layer=1, batch_size=1, n_kv_head=hkv, max_len=T_ctx, head_dim=Dd, dtype=np.float16, xp=np)
    print(f"  H={Hq}, Hkv={hkv:2d}: K/V cache per layer for {T_ctx} tokens in float16: "
          f"{c.nbytes / 2**20:6.1f} MiB (KVCache.nbytes)")
    check(c.nbytes == 2 * hkv * T_ctx * Dd * 2, f"KVCache.nbytes should be K and V, 2 bytes each: {c.nbytes}")
    del c
qg = backend.randn(rng, (1, 4, 3, 2), dtype=f64)
kg, vg = (backend.randn(rng, (1, 2, 3, 2), dtype=f64) for _ in range(2))
og, _ = A.sdpa_forward(qg, kg, vg, causal=True)
orep, _ = A.sdpa_forward(qg, xp.repeat(kg, 2, axis=1), xp.repeat(vg, 2, axis=1), causal=True)
print("GQA (H=4, Hkv=2) equals MHA with each K/V head repeated twice: max diff",
      expect_close("GQA vs MHA with repeated K/V heads", og, orep, 1e-12))

# ---------------------------------------------------------------------------
step(6, "RoPE: positions as rotations")
print("Attention itself ignores order (permute the tokens and the outputs permute\n"
      "along). RoPE rotates each pair of coordinates of q and k by an angle\n"
      "position * theta_i, theta_i = 10000^(-2i/D). Rotations keep lengths, and the dot\n"
      "product of a rotated q at m with a rotated k at n depends only on m - n.")
Dr = 8
qr, kr = backend.randn(rng, (1, 1, 1, Dr), dtype=f64), backend.randn(rng, (1, 1, 1, Dr), dtype=f64)


def rot(a, pos, inter=False):
    return A.rope_forward(a, xp.asarray(np.array([pos])), interleaved=inter)[0]


print(f"  |q| = {float(np.linalg.norm(host(qr))):.6f}, |RoPE(q, 37)| = "
      f"{float(np.linalg.norm(host(rot(qr, 37)))):.6f}")
check(abs(np.linalg.norm(host(qr)) - np.linalg.norm(host(rot(qr, 37)))) < 1e-12, "RoPE should keep lengths")
dots = []
for m_, n_ in ((3, 1), (10, 8), (102, 100)):
    d = float((host(rot(qr, m_)) * host(rot(kr, n_))).sum())
    dots.append(d)
    print(f"  q at {m_:3d} . k at {n_:3d} = {d:+.10f}   (m - n = {m_ - n_})")
check(max(dots) - min(dots) < 1e-12, f"the rotated dot product should depend only on m - n: {dots}")
unrotated = float((host(qr) * host(kr)).sum())
check(abs(dots[0] - unrotated) > 1e-3, "RoPE at m - n = 2 should change the dot product")
print("Pairs are (i, i + D/2) by default (Hugging Face LLaMA, 'rotate half'); RoFormer\n"
      "and Meta's original code pair (2i, 2i+1): interleaved=True. Same idea, different\n"
      "memory layout, so checkpoints must use the convention they were trained with.")

# ---------------------------------------------------------------------------
step(7, "the KV cache: generate without recomputing the past")
print("When generating, token t's keys and values never change once computed. The\n"
      "cache stores them in preallocated buffers (n_layer x B x Hkv x max_len x D) and\n"
      "each step only computes q, k, v for the new token; cache.length(layer) before a\n"
      "step is the position of the new token (what RoPE needs).")
B, T, C, H, Hkv = 1, 12, 16, 4, 2
Dh = C // H
x = backend.randn(rng, (B, T, C), dtype=f64)
w_qkv = backend.randn(rng, (C, (H + 2 * Hkv) * Dh), std=C ** -0.5, dtype=f64)
w_o = backend.randn(rng, (H * Dh, C), std=C ** -0.5, dtype=f64)
full, _ = A.self_attention_forward(x, w_qkv, None, w_o, None, H, n_kv_head=Hkv, causal=True,
                                   rope_base=10000.0)
kv = A.KVCache(n_layer=1, batch_size=B, n_kv_head=Hkv, max_len=T, head_dim=Dh, dtype=f64)
steps = [A.self_attention_forward(x[:, :4], w_qkv, None, w_o, None, H, n_kv_head=Hkv, causal=True,
                                  rope_base=10000.0, kv_cache=kv)[0]]     # a 4-token prompt at once
for t in range(4, T):                                                     # then one token at a time
    steps.append(A.self_attention_forward(x[:, t:t + 1], w_qkv, None, w_o, None, H, n_kv_head=Hkv,
                                          causal=True, rope_base=10000.0, kv_cache=kv)[0])
inc = xp.concatenate(steps, axis=1)
print(f"prompt of 4 + {T - 4} single steps == one causal forward over {T} tokens: max diff",
      expect_close("incremental decoding with the KV cache vs one forward", inc, full, 1e-12))
print(f"cache: {kv!r}")
check(kv.length(0) == T, f"after {T} tokens the cache should hold {T}, holds {kv.length(0)}")

# ---------------------------------------------------------------------------
step(8, "online softmax: attention without the T x T matrix")
print("softmax needs the row max and the row sum, which seem to require all scores at\n"
      "once. Not so: keep a running max m, sum l and output acc; when a new block of\n"
      "keys raises the max to m', rescale the old sums by exp(m - m'). Watch one row:")
s_row = rng.standard_normal(10) * 3
v_row = rng.standard_normal(10)
mx, l, acc = -np.inf, 0.0, 0.0
for j0 in range(0, 10, 4):
    blk = s_row[j0:j0 + 4]
    m_new = max(mx, blk.max())
    alpha = np.exp(mx - m_new)
    pb = np.exp(blk - m_new)
    l, acc = l * alpha + pb.sum(), acc * alpha + pb @ v_row[j0:j0 + 4]
    mx = m_new
    print(f"  keys {j0}..{min(j0 + 4, 10) - 1}: running max {mx:+.3f}, sum {l:.4f}, output {acc / l:+.6f}")
pfull = np.exp(s_row - s_row.max())
print(f"  softmax over all 10 at once gives {pfull @ v_row / pfull.sum():+.6f}")
check(abs(acc / l - pfull @ v_row / pfull.sum()) < 1e-12, "the online softmax should equal the full one")
print("flash_attention_forward does this per (query block, key block) tile and saves\n"
      "only the per-row logsumexp m + log l; the backward recomputes each tile's\n"
      "probabilities exp(s - lse) exactly. Same numbers, different memory:")
T = 512 if FAST else 1024
Bm, Hm, Dm = 1, 4, 32
q, k, v, do = (backend.randn(rng, (Bm, Hm, T, Dm)) for _ in range(4))   # float32, like training
outs = {}
for name, fwd, bwd in (("plain", A.sdpa_forward, A.sdpa_backward),
                       ("tiled", lambda *a, **kw: A.flash_attention_forward(*a, block_size=64, **kw),
                        A.flash_attention_backward)):
    t0 = time.perf_counter()
    o, c = fwd(q, k, v, causal=True)
    g = bwd(do, c)
    backend.synchronize(o)
    dt = time.perf_counter() - t0
    outs[name] = (host(o), host(g[0]))
    msg = ""
    if xp is np:                        # NumPy reports its allocations to tracemalloc
        tracemalloc.start()
        o, c = fwd(q, k, v, causal=True)
        g = bwd(do, c)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        msg = f", peak extra memory {peak / 2**20:6.1f} MiB"
    del o, c, g
    print(f"  {name}: T={T}, forward+backward {dt * 1e3:7.1f} ms{msg}")
d_out = expect_close("tiled vs plain attention output (float32)", outs["plain"][0], outs["tiled"][0], 1e-5)
d_dq = expect_close("tiled vs plain dq (float32)", outs["plain"][1], outs["tiled"][1], 1e-5)
print(f"  max |out_plain - out_tiled| = {d_out:.1e}, max |dq_plain - dq_tiled| = {d_dq:.1e}  (float32 rounding)")
print(f"  one (B, H, T, T) float32 probability matrix alone is {Bm * Hm * T * T * 4 / 2**20:.1f} MiB;"
      " `python -m minillm bench attention` shows how the gap grows with T.")

# ---------------------------------------------------------------------------
step(9, "every backward, checked against finite differences (float64)")
print("Each report is the worst relative error between the hand-written gradient and\n"
      "a five-point finite difference, with a random upstream gradient.")
qs = [backend.randn(rng, s, dtype=f64) for s in ((1, 4, 3, 4), (1, 2, 5, 4), (1, 2, 5, 4))]
mask = xp.asarray(np.array([True, True, True, False, True])[None, None, None])
print("  sdpa (GQA, causal, padding):", expect_gradcheck("sdpa", gradcheck(
    A.sdpa_forward, A.sdpa_backward, qs, kwargs=dict(causal=True, mask=mask))))
print("  tiled (block 2):            ", expect_gradcheck("flash attention", gradcheck(
    A.flash_attention_forward, A.flash_attention_backward, qs, kwargs=dict(causal=True, mask=mask, block_size=2))))
print("  RoPE:                       ", expect_gradcheck("RoPE", gradcheck(
    A.rope_forward, A.rope_backward, [qs[0], xp.arange(3)], wrt=[0])))
C, H, Hkv = 8, 4, 2
x = backend.randn(rng, (2, 3, C), dtype=f64)
wq = backend.randn(rng, (C, (H + 2 * Hkv) * 2), std=C ** -0.5, dtype=f64)
wo = backend.randn(rng, (C, C), std=C ** -0.5, dtype=f64)
bo = backend.randn(rng, (C,), std=0.1, dtype=f64)


def sa_bwd(dy, cache):
    dx, dw, _, dwo, dbo = A.self_attention_backward(dy, cache)
    return dx, dw, dwo, dbo


print("  self-attention (GQA + RoPE):", expect_gradcheck("self-attention", gradcheck(
    A.self_attention_forward, sa_bwd, [x, wq, None, wo, bo, H], wrt=[0, 1, 3, 4],
    kwargs=dict(n_kv_head=Hkv, causal=True, rope_base=100.0))))
print("\nThat is attention: compare, mask, weigh, average, once per head; the rest is\n"
      "bookkeeping for memory (GQA, KV cache, tiles) and for order (masks, RoPE).")
