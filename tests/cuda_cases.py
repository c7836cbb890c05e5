"""Every numba.cuda kernel against its NumPy reference (collected through test_cuda_kernels.py,
which runs them on the GPU when there is one, else under NUMBA_ENABLE_CUDASIM=1).

The simulator runs each GPU thread as a Python thread: shapes and blocks are tiny (blocks of
8-16 threads, a few blocks), but odd sizes, several token tiles, GQA and block boundaries are all
in. Launch shapes come from gpu.model.Launch.for_here() (small under the simulator)."""
import numpy as np
import pytest
from numba import cuda

from minfer.backends import numba_ops, numpy_ops
from minfer.batch import make_batch
from minfer.config import ModelConfig
from minfer.gpu.model import CudaModel, Launch
from minfer.engine import Engine
from minfer.model import LayerWeights, Transformer, Weights
from minfer.sampling import SamplingParams, sample
from minfer.gpu.sampling import params_array, probs_cuda, sample_cuda
from minfer.stages import attention, embedding, kvcache, linear, mlp, rmsnorm, rope
from minfer.engine.block_manager import BlockManager, NoFreeBlocks
from minfer.stages.kvcache import DeviceKVCache, KVCache
from minfer.gpu.linear import linear_cuda, qkv_cuda, swiglu_cuda
from minfer.stages.device import DeviceMatrix
from minfer.stages.quant import QuantMatrix

rng = np.random.default_rng(3)
L = Launch.for_here()
MM = dict(lanes=L.lanes, groups=L.groups)
FORMATS = ["F32", "Q8_0", "Q4_0", "Q4_1"]


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def weight(O, K, fmt):
    w = randn(O, K) / np.float32(np.sqrt(K))
    return w if fmt == "F32" else QuantMatrix.from_float(w, fmt)


def dev(a):
    return cuda.to_device(np.ascontiguousarray(a))


def ids(n):
    return dev(np.arange(n, dtype=np.int32))


# --- linear layers ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T,K,O", [(1, 64, 7), (9, 32, 6)])
def test_linear(fmt, T, K, O):
    x, w = randn(T, K), weight(O, K, fmt)
    out = cuda.device_array((T, O), np.float32)
    linear_cuda(dev(x), DeviceMatrix.upload(w), out, ids(T), **MM)
    np.testing.assert_allclose(out.copy_to_host(), linear.linear(x, w), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["F32", "Q4_1"])
def test_linear_norm_rows_residual(fmt):
    """The LM-head form (norm folded in, only some rows) and the residual form (out +=)."""
    x, g, w = randn(5, 64), randn(64), weight(9, 64, fmt)
    rows = np.array([4, 1, 2], np.int32)
    out = cuda.device_array((3, 9), np.float32)
    linear_cuda(dev(x), DeviceMatrix.upload(w), out, dev(rows), norm=dev(g), eps=1e-5, **MM)
    want = linear.linear(rmsnorm.rmsnorm(x[rows], g, 1e-5), w)
    np.testing.assert_allclose(out.copy_to_host(), want, rtol=1e-4, atol=1e-4)
    res = randn(5, 9)
    d_res = dev(res)
    linear_cuda(dev(x), DeviceMatrix.upload(w), d_res, ids(5), accumulate=True, **MM)
    np.testing.assert_allclose(d_res.copy_to_host(), res + linear.linear(x, w), rtol=1e-4, atol=1e-4)


def test_stacked_mixed_formats_become_f32():
    a, b = weight(4, 32, "Q8_0"), weight(2, 32, "Q4_1")
    W = DeviceMatrix.upload([a, b])
    assert W.shape == (6, 32) and W.fmt == 0
    x, out = randn(2, 32), cuda.device_array((2, 6), np.float32)
    linear_cuda(dev(x), W, out, ids(2), **MM)
    want = np.concatenate([linear.linear(x, a), linear.linear(x, b)], axis=1)
    np.testing.assert_allclose(out.copy_to_host(), want, rtol=1e-4, atol=1e-4)


def _check_swiglu(fmt, T, D, F):
    """swiglu_cuda (RMSNorm folded in, gate/up fused, silu the epilogue) against the reference."""
    x, g = randn(T, D), randn(D)
    wg, wu = weight(F, D, fmt), weight(F, D, fmt)
    h = cuda.device_array((T, F), np.float32)
    swiglu_cuda(dev(x), dev(g), 1e-5, DeviceMatrix.upload([wg, wu]), h, **MM)
    n = rmsnorm.rmsnorm(x, g, 1e-5)
    want = mlp.silu(linear.linear(n, wg)) * linear.linear(n, wu)
    np.testing.assert_allclose(h.copy_to_host(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["F32", "Q4_0"])
def test_swiglu_fused(fmt):
    _check_swiglu(fmt, T=3, D=32, F=5)


@pytest.mark.parametrize("fmt", ["F32", "Q8_0"])
def test_qkv_rope_kv_fused(fmt):
    """rmsnorm -> W_q, W_k, W_v -> RoPE on q, k -> k, v into the cache (layer 1 of 2)."""
    T, D, Hq, Hkv, hd, bs = 3, 32, 4, 2, 8, 2
    x, g = randn(T, D), randn(D)
    wq, wk, wv = weight(Hq * hd, D, fmt), weight(Hkv * hd, D, fmt), weight(Hkv * hd, D, fmt)
    positions = np.array([0, 5, 2], np.int32)
    slots = np.array([3, 0, 6], np.int32)
    cos, sin = rope.rope_angles(np.arange(8), hd, 1e4)
    cache = np.zeros((2, 4, bs, Hkv, hd), np.float32)
    dk, dv = dev(cache), dev(cache)
    q = cuda.device_array((T, Hq * hd), np.float32)
    qkv_cuda(dev(x), dev(g), 1e-5, DeviceMatrix.upload([wq, wk, wv]), dev(positions), dev(slots),
             dev(cos), dev(sin), q, dk, dv, 1, **MM)
    n = rmsnorm.rmsnorm(x, g, 1e-5)
    c, s = cos[positions], sin[positions]
    want_q = rope.rope(linear.linear(n, wq).reshape(T, Hq, hd), c, s)
    k = rope.rope(linear.linear(n, wk).reshape(T, Hkv, hd), c, s)
    v = linear.linear(n, wv).reshape(T, Hkv, hd)
    want_k, want_v = cache.copy(), cache.copy()
    kvcache.kv_write(want_k[1], want_v[1], k, v, slots)
    np.testing.assert_allclose(q.copy_to_host(), want_q.reshape(T, -1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dk.copy_to_host(), want_k, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dv.copy_to_host(), want_v, rtol=1e-4, atol=1e-4)


# --- many rows: a tile of tokens reads each weight once -----------------------------------------
# The simulator's 4 lanes split into K-lanes x token-lanes: 1-8 tokens 4 x 1, 9-16 2 x 2, 17-32
# 1 x 4 (each lane walks the whole row); 33 tokens are two tiles (blocks along y).
MANY = [1, 2, 3, 7, 12, 33]


def test_a_tile_holds_the_step_up_to_its_size():
    """Up to `tile` tokens (and lanes * TB) one block along y: each weight is read once."""
    from minfer.gpu.linear import TB, TILE, _grid
    for lanes in (4, 8, 32):
        for T in (1, 7, 8, 9, 31, 32, 33, 64, 65, 128, 300):
            grid, block, ts = _grid(10, T, lanes, 2, TILE)
            assert lanes % ts == 0 and block == (lanes, 2)
            assert grid[1] == -(-T // (ts * TB))
            assert (grid[1] == 1) == (T <= min(TILE, lanes * TB)), (lanes, T, grid, ts)
            assert ts == 1 or (ts // 2) * TB < min(T, TILE)     # no more token-lanes than needed
    assert _grid(10, 33, 32, 2, 8)[0][1] == 5                    # tile 8: a block per 8 tokens


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", MANY)
def test_linear_many_rows(fmt, T):
    """The LM-head form (norm, some rows of x in any order) and the residual form, T rows, odd O."""
    K, O = 64, 7
    x, g, w = randn(T + 2, K), randn(K), weight(O, K, fmt)
    W = DeviceMatrix.upload(w)
    rows = rng.permutation(T + 2)[:T].astype(np.int32)
    out = cuda.device_array((T, O), np.float32)
    linear_cuda(dev(x), W, out, dev(rows), norm=dev(g), eps=1e-5, **MM)
    want = linear.linear(rmsnorm.rmsnorm(x[rows], g, 1e-5), w)
    np.testing.assert_allclose(out.copy_to_host(), want, rtol=1e-4, atol=1e-4)
    res = randn(T, O)
    d_res = dev(res)
    linear_cuda(dev(x[:T]), W, d_res, ids(T), accumulate=True, **MM)
    np.testing.assert_allclose(d_res.copy_to_host(), res + linear.linear(x[:T], w), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", MANY)
def test_swiglu_many_rows(fmt, T):
    _check_swiglu(fmt, T, D=32, F=3)


def _qkv_case(fmt, T, **launch):
    """rmsnorm -> W_q, W_k, W_v -> RoPE on q, k -> k, v into the cache (layer 1 of 2), T tokens at
    random positions and distinct slots; the device's q, k cache, v cache and the reference's."""
    D, Hq, Hkv, hd, bs = 32, 2, 1, 8, 4
    x, g = randn(T, D), randn(D)
    wq, wk, wv = weight(Hq * hd, D, fmt), weight(Hkv * hd, D, fmt), weight(Hkv * hd, D, fmt)
    positions = rng.integers(0, 40, T).astype(np.int32)
    slots = rng.permutation(9 * bs)[:T].astype(np.int32)
    cos, sin = rope.rope_angles(np.arange(40), hd, 1e4)
    cache = randn(2, 9, bs, Hkv, hd)
    dk, dv = dev(cache), dev(cache)
    q = cuda.device_array((T, Hq * hd), np.float32)
    qkv_cuda(dev(x), dev(g), 1e-5, DeviceMatrix.upload([wq, wk, wv]), dev(positions), dev(slots),
             dev(cos), dev(sin), q, dk, dv, 1, **launch)
    n = rmsnorm.rmsnorm(x, g, 1e-5)
    c, s = cos[positions], sin[positions]
    want_q = rope.rope(linear.linear(n, wq).reshape(T, Hq, hd), c, s).reshape(T, -1)
    k = rope.rope(linear.linear(n, wk).reshape(T, Hkv, hd), c, s)
    v = linear.linear(n, wv).reshape(T, Hkv, hd)
    want_k, want_v = cache.copy(), cache.copy()
    kvcache.kv_write(want_k[1], want_v[1], k, v, slots)
    return (q.copy_to_host(), dk.copy_to_host(), dv.copy_to_host()), (want_q, want_k, want_v)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", MANY)
def test_qkv_many_rows(fmt, T):
    got, want = _qkv_case(fmt, T, **MM)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tile", [8, 16])
def test_rows_past_the_tile(tile):
    """A smaller tile than the lanes allow: 17 tokens are 3 tiles of 8 (the 1 x TB tiles before
    the token-lanes) or 2 tiles of 16 (the second holding one token)."""
    T, K, O = 17, 32, 5
    x, w = randn(T, K), weight(O, K, "Q4_1")
    out = cuda.device_array((T, O), np.float32)
    linear_cuda(dev(x), DeviceMatrix.upload(w), out, ids(T), tile=tile, **MM)
    np.testing.assert_allclose(out.copy_to_host(), linear.linear(x, w), rtol=1e-4, atol=1e-4)
    got, want = _qkv_case("Q8_0", T, tile=tile, **MM)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


# --- the small stages ------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding(fmt):
    table = randn(20, 64) if fmt == "F32" else QuantMatrix.from_float(randn(20, 64), fmt)
    tok = np.array([3, 19, 0, 3], np.int32)
    out = cuda.device_array((4, 64), np.float32)
    embedding.embedding_cuda(dev(tok), DeviceMatrix.upload(table), out, threads=L.rows)
    np.testing.assert_allclose(out.copy_to_host(), embedding.embedding(tok, table), rtol=1e-6, atol=1e-6)


def test_rmsnorm():
    x, w = randn(3, 33), randn(33)
    out = cuda.device_array((3, 33), np.float32)
    rmsnorm.rmsnorm_cuda(dev(x), dev(w), 1e-5, out, threads=8)
    np.testing.assert_allclose(out.copy_to_host(), rmsnorm.rmsnorm(x, w, 1e-5), rtol=1e-5, atol=1e-5)


def test_rope():
    x, pos = randn(3, 3, 8), np.array([0, 7, 30], np.int32)
    cos, sin = rope.rope_angles(np.arange(32), 8, 1e5)
    d = dev(x)
    rope.rope_cuda(d, dev(pos), dev(cos), dev(sin), threads=8)
    np.testing.assert_allclose(d.copy_to_host(), rope.rope(x, cos[pos], sin[pos]), rtol=1e-5, atol=1e-6)


def test_kv_write():
    kc, vc = np.zeros((3, 2, 2, 4), np.float32), np.zeros((3, 2, 2, 4), np.float32)
    k, v, slots = randn(3, 2, 4), randn(3, 2, 4), np.array([5, 0, 2], np.int32)
    dk, dv = dev(kc), dev(vc)
    kvcache.kv_write_cuda(dk, dv, dev(k), dev(v), dev(slots), threads=4)
    kvcache.kv_write(kc, vc, k, v, slots)
    np.testing.assert_array_equal(dk.copy_to_host(), kc)
    np.testing.assert_array_equal(dv.copy_to_host(), vc)


def test_device_cache_is_a_fixed_pool():
    c = DeviceKVCache(2, 1, 4, block_size=2, n_blocks=2)
    bm = BlockManager(c)
    bm.ensure(0, 4)                               # both blocks
    assert c.n_blocks == 2 and c.k.shape == (2, 2, 2, 1, 4) and bm.n_free == 0
    assert not bm.can_hold(1, 1)
    with pytest.raises(NoFreeBlocks):             # the pool never grows: the scheduler waits
        bm.ensure(1, 1)


def test_silu_mul():
    g, u = randn(2, 5) * 8, randn(2, 5)
    out = cuda.device_array((2, 5), np.float32)
    mlp.silu_mul_cuda(dev(g), dev(u), out, threads=4)
    np.testing.assert_allclose(out.copy_to_host(), mlp.silu(g) * u, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threads", [L.attn, 16])
@pytest.mark.parametrize("block_size,Hq,Hkv,hd", [(5, 4, 2, 8), (16, 2, 2, 8), (5, 2, 1, 12)])
def test_paged_attention(block_size, Hq, Hkv, hd, threads):
    """A mixed batch: one sequence prefilling 7 tokens, one decoding at position 20 (several
    chunks of keys), one verifying 3 tokens at positions 6..8. 16 threads for head_dim 8: two
    groups share the p . V sum. head_dim 12: the scores' loop has a tail after its steps of 8."""
    lens = [(7, 0), (1, 20), (3, 6)]
    cache = KVCache(1, Hkv, hd, block_size=block_size, n_blocks=32)
    bm = BlockManager(cache)
    for s in (2, 0, 1):
        bm.ensure(s, sum(lens[s]))
    for s, (n, p) in enumerate(lens):
        if p:
            kvcache.kv_write(cache.k[0], cache.v[0], randn(p, Hkv, hd), randn(p, Hkv, hd), bm.slots(s, 0, p))
    batch = make_batch([(list(range(n)), p, bm.tables[s]) for s, (n, p) in enumerate(lens)], block_size)
    kvcache.kv_write(cache.k[0], cache.v[0], randn(11, Hkv, hd), randn(11, Hkv, hd), batch.slot_mapping)
    q = randn(11, Hq, hd)
    want = attention.paged_attention(q, cache.k[0], cache.v[0], batch)
    row_seq = np.repeat(np.arange(3), np.diff(batch.seq_starts)).astype(np.int32)
    out = cuda.device_array((11, Hq * hd), np.float32)
    attention.paged_attention_cuda(dev(q.reshape(11, -1)), dev(cache.k), dev(cache.v), 0, dev(row_seq),
                                   dev(batch.positions.astype(np.int32)), dev(batch.block_tables), out,
                                   threads=threads)
    np.testing.assert_allclose(out.copy_to_host(), want.reshape(11, -1), rtol=1e-4, atol=1e-5)


# --- sampling --------------------------------------------------------------------------------
def _device_samples(logits, params, seeds):
    rngs = [np.random.default_rng(s) for s in seeds]
    out = cuda.device_array(len(params), np.int32)
    sample_cuda(dev(logits), dev(params_array(params, rngs)), out, threads=L.sample)
    return out.copy_to_host().tolist()


def test_sampling_greedy_first_max():
    logits = randn(3, 40)
    logits[1, [7, 30]] = 9.0                      # a tie: the first index wins, as np.argmax
    got = _device_samples(logits, [SamplingParams(temperature=0)] * 3, [0, 0, 0])
    assert got == np.argmax(logits, axis=1).tolist()


def test_sampling_matches_reference(seed=7):
    """Same seed, same token as sampling.sample (which draws u with rng.random() in rng.choice):
    one sequence per block, each with other filters."""
    kws = [dict(temperature=0.8), dict(temperature=1.0, top_k=5), dict(temperature=0.7, top_p=0.6),
           dict(temperature=1.3, min_p=0.2), dict(temperature=1.0, top_k=8, top_p=0.9)]
    params = [SamplingParams(**kw) for kw in kws]
    logits = randn(len(kws), 37) * 2
    seeds = [seed * 100 + b for b in range(len(kws))]
    want = [sample(logits[b], p, np.random.default_rng(s)) for b, (p, s) in enumerate(zip(params, seeds))]
    assert _device_samples(logits, params, seeds) == want


def test_sampling_thresholds_many_seeds():
    """4 seeds per setting, the same tokens as the reference. Top-k on logits with many ties (a
    coarse grid: ties with the k-th are kept, as the reference keeps them); top-p on distinct
    logits (the reference orders equal logits arbitrarily, a threshold keeps them all)."""
    ties = np.round(randn(1, 45) * 2) / 2                        # -4.0, -3.5, ..., 4.0
    distinct = randn(1, 45) * 2
    cases = [(ties, dict(temperature=1.0, top_k=4)), (ties, dict(temperature=0.8, top_k=9)),
             (distinct, dict(temperature=0.9, top_p=0.5)),
             (distinct, dict(temperature=1.2, top_k=10, top_p=0.8))]
    rows, params, seeds = [], [], []
    for logits, kw in cases:
        for seed in range(4):
            rows.append(logits[0])
            params.append(SamplingParams(**kw))
            seeds.append(1000 + 10 * len(seeds) + seed)
    lg = np.stack(rows)
    want = [sample(lg[b], p, np.random.default_rng(s)) for b, (p, s) in enumerate(zip(params, seeds))]
    assert _device_samples(lg, params, seeds) == want


@pytest.mark.parametrize("kw", [dict(top_k=3), dict(top_p=0.3), dict(top_k=6, top_p=0.5)])
def test_sampling_kept_set_is_exact(kw):
    """A hot temperature makes every kept token likely: 24 draws must all fall in the reference's
    kept set and be the reference's draws; a threshold one token too low or high shows up."""
    from minfer.sampling import filter_logits
    p = SamplingParams(temperature=4.0, **kw)
    logits = randn(1, 33) * 3
    kept = set(np.flatnonzero(np.isfinite(filter_logits(logits[0] / 4.0, p))).tolist())
    lg = np.repeat(logits, 24, axis=0)
    seeds = list(range(500, 524))
    got = _device_samples(lg, [p] * 24, seeds)
    assert set(got) <= kept and len(set(got)) == len(kept)
    assert got == [sample(lg[b], p, np.random.default_rng(s)) for b, s in enumerate(seeds)]


def test_sampling_top_k_keeps_only_top():
    logits = randn(1, 30)
    p = SamplingParams(temperature=5.0, top_k=3)
    got = _device_samples(np.repeat(logits, 2, axis=0), [p] * 2, [10, 11])
    assert set(got) <= set(np.argsort(-logits[0])[:3].tolist())


# --- the whole model -------------------------------------------------------------------------
def tiny_model(layer_fmt, embd_fmt, head_fmt=None, seed=0):
    """A model small enough for the simulator: 1 layer, d 32, 2 query heads sharing 1 kv head.
    head_fmt None: the LM head is the embedding table (tied)."""
    c = ModelConfig(vocab_size=40, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                    ffn_dim=32, rms_eps=1e-5, rope_theta=1e4, max_seq_len=64)
    r = np.random.default_rng(seed)

    def mat(O, K, fmt):
        w = (r.standard_normal((O, K)) / np.sqrt(K)).astype(np.float32)
        return w if fmt == "F32" else QuantMatrix.from_float(w, fmt)

    def gain(n):
        return (1 + 0.1 * r.standard_normal(n)).astype(np.float32)

    D, qd, kvd, F = c.dim, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.ffn_dim
    layers = [LayerWeights(gain(D), mat(qd, D, layer_fmt), mat(kvd, D, layer_fmt), mat(kvd, D, layer_fmt),
                           mat(D, qd, layer_fmt), gain(D), mat(F, D, layer_fmt), mat(F, D, layer_fmt),
                           mat(D, F, layer_fmt)) for _ in range(c.n_layers)]
    emb = mat(c.vocab_size, D, embd_fmt)
    c.tie_embeddings = head_fmt is None
    return c, Weights(emb, layers, gain(D), emb if head_fmt is None else mat(c.vocab_size, D, head_fmt))


def test_model_logits_match_reference():
    """Q4_1 layers, a Q8_0 embedding, an untied F32 head: a prefill of 2 sequences (logits of
    every row), a decode step, then 3 more tokens each from there (a chat's next turn, whose
    prompt starts where the cache ends), through the Engine's block manager, as model.py
    computes them."""
    c, W = tiny_model("Q4_1", "Q8_0", "F32")
    ref, gpu = Transformer(c, W, numpy_ops()), CudaModel(c, W)
    caches = [m.new_cache(n_blocks=8, block_size=4) for m in (ref, gpu)]
    managers = [BlockManager(cache) for cache in caches]
    prompts = [[5, 9, 33, 7, 12], [1, 2, 3]]
    for bm in managers:
        for s, p in enumerate(prompts):
            bm.ensure(s, len(p) + 4)
    steps = [make_batch([(p, 0, managers[0].tables[s]) for s, p in enumerate(prompts)], 4, all_logits=True),
             make_batch([([11], len(p), managers[0].tables[s]) for s, p in enumerate(prompts)], 4),
             make_batch([([13, 4, 8], len(p) + 1, managers[0].tables[s]) for s, p in enumerate(prompts)],
                        4, all_logits=True)]
    for batch in steps:
        np.testing.assert_allclose(gpu.forward(batch, caches[1]), ref.forward(batch, caches[0]),
                                   rtol=0, atol=2e-4)


def test_model_greedy_on_device_matches_numba():
    """Batched greedy generation with the ids sampled on the device (prefill, then a decode step)
    equals the numba backend's Engine (Q4_0 layers, tied Q8_0 embedding)."""
    c, W = tiny_model("Q4_0", "Q8_0", seed=1)
    p = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    prompts = [[5, 6, 7], [30, 31, 32, 33, 34]]
    eng = Engine(Transformer(c, W, numba_ops()), stop_ids=set(), block_size=4)
    want = [[] for _ in prompts]
    for i, tok in eng.run(prompts, [p, p]):
        want[i].append(tok)
    gpu = CudaModel(c, W)
    cache = gpu.new_cache(n_blocks=8, block_size=4)
    bm = BlockManager(cache)
    for s, ids in enumerate(prompts):
        bm.ensure(s, len(ids) + 1)
    first = gpu.forward_sample(make_batch([(ids, 0, bm.tables[s]) for s, ids in enumerate(prompts)], 4),
                               cache, [p, p], [None, None])
    second = gpu.forward_sample(make_batch([([first[s]], len(ids), bm.tables[s])
                                            for s, ids in enumerate(prompts)], 4), cache, [p, p], [None, None])
    assert [[a, b] for a, b in zip(first, second)] == want


def test_continuous_batching_on_the_device_equals_each_request_alone():
    """The engine on the cuda backend — mixed steps (prompt chunks beside decodes) launched
    kernel by kernel, a pool of 6 blocks that forces a preemption, a shared prefix — gives each
    request the greedy tokens the numpy reference gives it alone."""
    c, W = tiny_model("Q4_0", "Q8_0", seed=2)
    shared = [7, 8, 9, 10, 11, 12, 13, 14]
    prompts = [shared + [3, 4], [20, 21, 22], shared + [30]]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (6, 4, 5)]
    ref = Engine(Transformer(c, W, numpy_ops()), stop_ids=set(), block_size=4)
    want = []
    for p, sp in zip(prompts, params):
        want.append([tok for _, tok in ref.run([p], [sp])])
    block_mb = 6 * 2 * c.n_layers * 4 * c.n_kv_heads * c.head_dim * 4 / 2**20
    eng = Engine(CudaModel(c, W), stop_ids=set(), block_size=4, kv_cache_mb=block_mb,
                 max_seqs=3, max_batch_tokens=6)
    got = [[] for _ in prompts]
    for i, tok in eng.run(prompts, params):
        got[i].append(tok)
    assert got == want
    s = eng.stats()
    assert s["preemptions"] > 0 and s["cached_prompt_tokens"] > 0 and s["blocks_used"] == 0, s


# --- speculative decoding: the verify rules on the device ----------------------------------
def test_spec_verify_kernels_match_numba():
    """Both rules, one thread per sequence, against spec/verify.py's @njit rules: 4 sequences of
    0-3 guesses over 7 tokens (q given; point masses drawn as plain sampling draws, row by row
    with u[b, i], as verify.sample_as_plain draws them on the host)."""
    from minfer.sampling import draw
    from minfer.spec import verify

    def as_plain(p_rows, proposals, uu):
        for i in range(len(proposals) + 1):
            t = draw(p_rows[i], uu[i])
            if i == len(proposals) or t != proposals[i]:
                return i, t
    r = np.random.default_rng(11)
    V, ks = 7, [2, 0, 3, 1]
    starts = np.concatenate([[0], np.cumsum([k + 1 for k in ks])])
    R = int(starts[-1])
    logits = r.standard_normal((R, V)).astype(np.float32)
    p = r.random((R, V)) ** 2
    p /= p.sum(axis=1, keepdims=True)
    q = r.random((R, V))
    q /= q.sum(axis=1, keepdims=True)
    props = np.zeros((len(ks), 3), np.int64)
    for b, k in enumerate(ks):
        top = logits[starts[b]:starts[b] + k].argmax(axis=1)
        props[b, :k] = np.where(r.random(k) < 0.6, top, r.integers(V, size=k))
    u = r.random((len(ks), 4))
    n_prop = np.array(ks)
    got = verify.verify_greedy_cuda(logits, starts, props, n_prop)
    got_s = verify.verify_sample_cuda(p, q, starts, props, n_prop, u)
    got_pm = verify.verify_sample_cuda(p, np.zeros((0, V)), starts, props, n_prop, u)
    for b, k in enumerate(ks):
        rows = slice(starts[b], starts[b + 1])
        assert tuple(got[b]) == verify.verify_greedy_numba(logits[rows].argmax(axis=1), props[b, :k])
        assert tuple(got_s[b]) == verify.verify_sample_numba(p[rows], q[rows][:k], props[b, :k], u[b, :k + 1])
        assert tuple(got_pm[b]) == as_plain(p[rows], props[b, :k], u[b, :k + 1])


def _count_calls(model) -> dict:
    """Wrap the model's forward and forward_verify to count their calls: {name: count}."""
    calls = {"forward_verify": 0, "forward": 0}
    for name in calls:
        real = getattr(model, name)

        def counted(*a, _real=real, _name=name):
            calls[_name] += 1
            return _real(*a)
        setattr(model, name, counted)
    return calls


def test_spec_engine_on_cuda_model_greedy_identical():
    """An Engine on the cuda model with n-gram guesses gives plain greedy decoding's tokens (the
    numba backend's, as above), verifying them on the device: no logits come to the host."""
    from minfer.spec import NgramProposer, Speculator
    c, W = tiny_model("Q4_0", "Q8_0", seed=1)
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompt = [5, 6, 7, 5, 6]
    plain = Engine(Transformer(c, W, numba_ops()), stop_ids=set(), block_size=4, kv_cache_mb=1)
    model = CudaModel(c, W)
    spec = Engine(model, stop_ids=set(), block_size=4, kv_cache_mb=1)
    spec.speculator = Speculator(spec, NgramProposer(min_n=1), k_max=2, adaptive=False)
    calls = _count_calls(model)
    outs = [[tok for _, tok in eng.run([prompt], [p])] for eng in (plain, spec)]
    assert outs[0] == outs[1]
    assert spec.speculator.steps > 0
    assert calls["forward_verify"] == spec.speculator.steps and calls["forward"] == 0


def test_probs_kernel_matches_reference():
    """Each row's filtered distribution, written out on the device, against spec/verify.py's
    row_probs (sampling.py's filters and softmax, float64): temperature 0 is the arg-max alone."""
    from minfer.spec.verify import row_probs
    kws = [dict(temperature=0), dict(temperature=0.8), dict(temperature=1.0, top_k=5),
           dict(temperature=0.7, top_p=0.6), dict(temperature=1.3, min_p=0.2),
           dict(temperature=1.0, top_k=8, top_p=0.9)]
    params = [SamplingParams(**kw) for kw in kws]
    logits = randn(len(kws), 37) * 2
    rows = params_array(params, [np.random.default_rng(0)] * len(kws))
    rows[0, 0] = 0.0                                  # (greedy: params_array leaves it zero)
    probs = cuda.device_array(logits.shape, np.float32)
    probs_cuda(dev(logits), dev(rows), probs, threads=L.sample)
    got = probs.copy_to_host()
    for b, p in enumerate(params):
        want = np.eye(37)[np.argmax(logits[b])] if p.greedy else row_probs(logits[b], p, None)
        np.testing.assert_allclose(got[b], want, atol=2e-6, err_msg=str(kws[b]))


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_spec_engine_on_cuda_model_sampling_verifies_on_device(proposer):
    """Sampling requests with guesses verify on the device too (filtered rows made there, then
    the rejection rule): the same tokens as the host's rule from the same seeds — the uniforms
    are drawn as the host draws them — and no logits come to the host."""
    from minfer.spec import DraftProposer, NgramProposer, Speculator
    c, W = tiny_model("Q4_0", "Q8_0", seed=1)
    params = [SamplingParams(temperature=0.9, top_k=12, top_p=0.95, max_tokens=6, ignore_eos=True,
                             seed=5),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)]
    prompts = [[5, 6, 7, 5, 6], [9, 3, 9, 3, 9]]
    outs, calls = [], {}
    for on_device in (True, False):
        model = CudaModel(c, W)
        eng = Engine(model, stop_ids=set(), block_size=4, kv_cache_mb=1)
        if proposer == "ngram":
            guess = NgramProposer(min_n=1)
        else:
            guess = DraftProposer(Engine(Transformer(c, W, numba_ops()), stop_ids=set(), block_size=4,
                                         kv_cache_mb=1))
        eng.speculator = Speculator(eng, guess, k_max=2, adaptive=False)
        if not on_device:
            model.verifies_on_device = False              # the host's rule, on copied logits
        else:
            calls = _count_calls(model)
        got = [[] for _ in prompts]
        for i, tok in eng.run(prompts, params):
            got[i].append(tok)
        outs.append(got)
        if on_device:
            steps = eng.speculator.steps
    assert outs[0] == outs[1]
    assert steps > 0 and calls["forward_verify"] > 0 and calls["forward"] == 0, (steps, calls)


# --- the GPU step's stage order ----------------------------------------------------------------
def test_gpu_step_runs_the_stages_of_model_py_in_order(monkeypatch):
    """gpu/model.py's step launches model.py's stages in model.py's order (stage_order.py): a
    prefill and a decode step, each launcher recorded with the stages its kernel does."""
    from minfer.gpu import linear as gpu_linear
    from stage_order import expected, recording_ops, squeeze
    c, W = tiny_model("Q4_1", "Q8_0", "F32")
    c.n_layers, W.layers = 2, W.layers * 2                 # two layers: the loop, in order
    gpu = CudaModel(c, W)
    names = {id(gpu.norm): "norm", id(gpu.lm_head): "lm_head"}
    for L in gpu.layers:
        names.update({id(L.wo): "wo", id(L.w_down): "down"})
    trace = []

    def record(module, name, stages):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: trace.extend(stages(*a, **k)) or real(*a, **k))
    record(embedding, "embedding_cuda", lambda *a, **k: ["embedding"])
    record(gpu_linear, "qkv_cuda", lambda *a, **k: ["attn_norm", "qkv", "rope", "kv_write"])
    record(attention, "paged_attention_cuda", lambda *a, **k: ["attention"])
    record(gpu_linear, "swiglu_cuda", lambda *a, **k: ["ffn_norm", "gate_up"])
    record(gpu_linear, "linear_cuda", lambda x, w, *a, norm=None, **k:
           (["norm"] if norm is not None else []) + [names[id(w)]])
    ref_trace = []
    ref = Transformer(c, W, numpy_ops())
    ref.ops = recording_ops(numpy_ops(), W, ref_trace)
    caches = [m.new_cache(n_blocks=4, block_size=4) for m in (ref, gpu)]
    for batch in (make_batch([([5, 9, 33], 0, [0, 1])], 4), make_batch([([11], 3, [0, 1])], 4)):
        trace.clear()
        ref_trace.clear()
        gpu.forward(batch, caches[1])
        ref.forward(batch, caches[0])
        assert squeeze(ref_trace) == expected(c.n_layers), ref_trace
        assert trace == squeeze(ref_trace), f"the GPU step: {trace}\nmodel.py: {squeeze(ref_trace)}"
