"""The NumPy reference stages against first principles (formulas written out the slow way)."""
import numpy as np
import pytest

from minfer.batch import make_batch
from minfer.stages import attention, embedding, kvcache, mlp, rmsnorm, rope
from minfer.engine.block_manager import BlockManager
from minfer.stages.kvcache import KVCache

rng = np.random.default_rng(0)


def test_embedding_gathers_rows():
    table = rng.standard_normal((11, 5)).astype(np.float32)
    ids = np.array([3, 0, 3, 10])
    out = embedding.embedding(ids, table)
    assert out.shape == (4, 5) and np.array_equal(out[2], table[3])


def test_rmsnorm_formula():
    x = rng.standard_normal((3, 7)).astype(np.float32)
    w = rng.standard_normal(7).astype(np.float32)
    want = np.stack([row / np.sqrt((row ** 2).mean() + 1e-5) * w for row in x])
    np.testing.assert_allclose(rmsnorm.rmsnorm(x, w, 1e-5), want, rtol=1e-5, atol=1e-6)


def _rotate_half_rope(x, positions, base):
    """HF's convention, written independently: pairs (i, i + d/2)."""
    d = x.shape[-1]
    inv = base ** (-np.arange(0, d, 2) / d)
    ang = positions[:, None] * inv[None]                       # [T, d/2]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None]       # [T, 1, d]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None]
    rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + rot * sin


def test_rope_interleaved_equals_rotate_half_after_permutation():
    """The reason GGUF files permute Q/K rows: the two RoPE conventions agree after it."""
    T, H, hd, D = 5, 3, 8, 12
    w = rng.standard_normal((H * hd, D)).astype(np.float32)     # HF q_proj
    x = rng.standard_normal((T, D)).astype(np.float32)
    pos = np.array([0, 1, 2, 7, 30])
    hf = _rotate_half_rope((x @ w.T).reshape(T, H, hd), pos, 10000.0)
    cos, sin = rope.rope_angles(pos, hd, 10000.0)
    ours = rope.rope((x @ rope.hf_to_interleaved(w, H).T).reshape(T, H, hd), cos, sin)
    # same function, only the order of the dims within a head differs
    perm = rope.hf_to_interleaved(np.arange(H * hd)[:, None], H)[:, 0].reshape(H, hd)[0]
    np.testing.assert_allclose(ours, hf[..., perm], rtol=1e-4, atol=1e-5)


def test_rope_depends_only_on_distance():
    hd = 16
    q = rng.standard_normal((1, 1, hd)).astype(np.float32)
    k = rng.standard_normal((1, 1, hd)).astype(np.float32)

    def dot(pq, pk):
        cq, sq = rope.rope_angles(np.array([pq]), hd, 10000.0)
        ck, sk = rope.rope_angles(np.array([pk]), hd, 10000.0)
        return float((rope.rope(q, cq, sq) * rope.rope(k, ck, sk)).sum())

    assert dot(5, 2) == pytest.approx(dot(105, 102), rel=1e-4)
    assert dot(5, 2) != pytest.approx(dot(5, 4), rel=1e-3)


def test_silu_and_swiglu():
    z = np.array([-100.0, -1.0, 0.0, 2.0, 100.0], dtype=np.float32)
    np.testing.assert_allclose(mlp.silu(z), z / (1 + np.exp(-z.astype(np.float64))), rtol=1e-6, atol=1e-30)
    x = rng.standard_normal((2, 6)).astype(np.float32)
    g, u, d = (rng.standard_normal(s).astype(np.float32) for s in [(4, 6), (4, 6), (6, 4)])
    a = x @ g.T
    want = ((a / (1 + np.exp(-a))) * (x @ u.T)) @ d.T
    np.testing.assert_allclose(mlp.swiglu(x, g, u, d), want, rtol=1e-5, atol=1e-5)


def test_block_manager_slots():
    cache = KVCache(n_layers=1, n_kv_heads=1, head_dim=2, block_size=4, n_blocks=3)
    bm = BlockManager(cache)
    t0 = bm.ensure(0, 5)                       # two blocks
    assert len(t0) == 2
    t1 = bm.ensure(1, 3)                       # the last one
    assert len(set(t0) | set(t1)) == 3 and bm.n_free == 0 and not bm.can_hold(1, 5)
    assert list(bm.slots(0, 3, 6)) == [t0[0] * 4 + 3, t0[1] * 4 + 0, t0[1] * 4 + 1]
    bm.release(0)
    assert set(t0) <= set(bm.free)


def _dense_causal_attention(q, k, v, n_past):
    """Plain multi-head attention on contiguous K/V, GQA by repeating heads."""
    T, Hq, hd = q.shape
    S, Hkv, _ = k.shape
    out = np.zeros_like(q)
    for h in range(Hq):
        kh, vh = k[:, h // (Hq // Hkv)], v[:, h // (Hq // Hkv)]
        for t in range(T):
            s = kh[: n_past + t + 1] @ q[t, h] / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ vh[: n_past + t + 1]
    return out


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_attention_matches_dense(block_size):
    """Two sequences with scattered blocks, one prefilling (7 tokens), one decoding at position 9."""
    Hq, Hkv, hd = 6, 2, 8
    cache = KVCache(1, Hkv, hd, block_size=block_size, n_blocks=32)
    bm = BlockManager(cache)
    lens = {0: 7, 1: 10}
    kv = {s: (rng.standard_normal((n, Hkv, hd)).astype(np.float32),
              rng.standard_normal((n, Hkv, hd)).astype(np.float32)) for s, n in lens.items()}
    for s in (1, 0):                                  # interleave allocation to scatter blocks
        bm.ensure(s, lens[s])
    # sequence 1 already has 9 tokens cached; write them
    kvcache.kv_write(cache.k[0], cache.v[0], kv[1][0][:9], kv[1][1][:9], bm.slots(1, 0, 9))
    batch = make_batch([(list(range(7)), 0, bm.tables[0]), ([0], 9, bm.tables[1])], block_size)
    k_new = np.concatenate([kv[0][0], kv[1][0][9:]])
    v_new = np.concatenate([kv[0][1], kv[1][1][9:]])
    kvcache.kv_write(cache.k[0], cache.v[0], k_new, v_new, batch.slot_mapping)
    q = rng.standard_normal((8, Hq, hd)).astype(np.float32)
    out = attention.paged_attention(q, cache.k[0], cache.v[0], batch)
    np.testing.assert_allclose(out[:7], _dense_causal_attention(q[:7], *kv[0], 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[7:], _dense_causal_attention(q[7:], *kv[1], 9), rtol=1e-4, atol=1e-5)
