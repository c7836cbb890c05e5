"""Every @njit kernel against its NumPy reference, on random inputs of several (odd) shapes."""
import numpy as np
import pytest

import minfer
from minfer.batch import make_batch
from minfer.stages import attention, embedding, kvcache, linear, mlp, rmsnorm, rope
from minfer.engine.block_manager import BlockManager
from minfer.stages.kvcache import KVCache

rng = np.random.default_rng(1)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("T,K,O", [(1, 32, 7), (3, 64, 33), (4, 96, 5), (9, 160, 64), (130, 64, 3)])
def test_linear(T, K, O):
    x, w = randn(T, K), randn(O, K)
    np.testing.assert_allclose(linear.linear_numba(x, w), linear.linear(x, w), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 33])
@pytest.mark.parametrize("K,O", [(32, 7), (96, 33), (576, 64), (48, 3)])
def test_dense_tiles_against_float64(T, K, O):
    """The float32-weight kernel of decode, verification and prompts (4 rows x 4 tokens a tile,
    the last tile 1-3 or 5 tokens, the last rows alone): every tile shape and remainder against
    float64."""
    x, w = randn(T, K), randn(O, K)
    want = x.astype(np.float64) @ w.astype(np.float64).T
    got = linear._dense_tiles(x, w)
    assert got.shape == (T, O)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    np.testing.assert_allclose(linear.dense_matmul_numba(x, w), got, rtol=0, atol=0)


@pytest.mark.parametrize("K,O", [(576, 64), (48, 7)])
def test_dense_tiles_give_each_token_the_same_bits_at_any_token_count(K, O):
    """Decode (1 token), verification (1 + k) and a prompt's chunks put a token in tiles of
    4, 5 (one left over), 3, 2 or 1 tokens: its sums must not depend on which, or speculative
    decoding and batching would change a greedy answer."""
    x, w = randn(21, K), randn(O, K)
    alone = np.concatenate([linear._dense_tiles(x[t:t + 1], w) for t in range(21)])    # [21, O]
    for T in range(2, 22):
        np.testing.assert_array_equal(linear._dense_tiles(x[:T], w), alone[:T], err_msg=f"T={T}")


def test_dense_matmul_takes_the_loop_where_k_is_not_whole_vectors():
    x, w = randn(3, 40), randn(5, 40)
    np.testing.assert_allclose(linear.dense_matmul_numba(x, w), x @ w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,D", [(1, 8), (5, 33), (17, 576)])
def test_rmsnorm(T, D):
    x, w = randn(T, D), randn(D)
    np.testing.assert_allclose(rmsnorm.rmsnorm_numba(x, w, 1e-5), rmsnorm.rmsnorm(x, w, 1e-5),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,H,hd", [(1, 1, 2), (7, 3, 16), (4, 9, 64)])
def test_rope(T, H, hd):
    x = randn(T, H, hd)
    cos, sin = rope.rope_angles(rng.integers(0, 5000, T), hd, 1e5)
    want = rope.rope(x, cos, sin)
    np.testing.assert_allclose(rope.rope_numba(x.copy(), cos, sin), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,hd,base", [(1, 64, 1e5), (9, 16, 1e4), (300, 128, 5e5)])
def test_rope_angles(T, hd, base):
    """Rows of a table of the reference's own angles: the same bits, also after the table grew
    (positions past its end) and for positions it does not hold (negative: the reference)."""
    for pos in (rng.integers(0, 900, T), rng.integers(0, 20000, T), np.array([-3, 5])):
        for got, want in zip(rope.rope_angles_numba(pos, hd, base), rope.rope_angles(pos, hd, base)):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fmt,half", [("F32", False)] + [(f, h) for f in ("Q8_0", "Q4_0", "Q4_1")
                                                          for h in (False, True)])
def test_embedding(fmt, half):
    """float32 rows; quantized rows with float32 scales, or float16 ones (as the int8 kernels
    keep them): the compiled gathers widen them exactly."""
    table, ids = randn(50, 96), rng.integers(0, 50, 9)
    if fmt != "F32":
        table = minfer.stages.quant.QuantMatrix.from_float(table, fmt)
        table = table.half_scales() if half else table
    np.testing.assert_array_equal(embedding.embedding_numba(ids, table), embedding.embedding(ids, table))


@pytest.mark.parametrize("T,D,F", [(1, 32, 96), (6, 64, 33), (9, 48, 20)])
def test_swiglu(T, D, F):
    x, g, u, d = randn(T, D), randn(F, D), randn(F, D), randn(D, F)
    np.testing.assert_allclose(mlp.swiglu_numba(x, g, u, d), mlp.swiglu(x, g, u, d), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hd", [8, 16])          # the scalar job, the vector one (hd % 16 == 0)
@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (9, 3), (6, 1)])
def test_kv_write_and_paged_attention(block_size, Hq, Hkv, hd):
    """A mixed batch: one sequence prefilling 11 tokens, one decoding at position 20, one verifying
    3 tokens at positions 6..8; block counts not a multiple of anything in particular."""
    lens = [(11, 0), (1, 20), (3, 6)]           # (new tokens, tokens already cached)
    caches = []
    for write in (kvcache.kv_write, kvcache.kv_write_numba):
        cache = KVCache(1, Hkv, hd, block_size=block_size, n_blocks=64)
        caches.append((cache, BlockManager(cache), write))
    local = np.random.default_rng(7)
    past = [(local.standard_normal((p, Hkv, hd)).astype(np.float32),) * 2 for _, p in lens]
    new_k = local.standard_normal((15, Hkv, hd)).astype(np.float32)
    new_v = local.standard_normal((15, Hkv, hd)).astype(np.float32)
    q = local.standard_normal((15, Hq, hd)).astype(np.float32)
    outs = []
    for (cache, bm, write), attn in zip(caches, (attention.paged_attention, attention.paged_attention_numba)):
        for s in (2, 0, 1):
            bm.ensure(s, sum(lens[s]))
        for s, (n, p) in enumerate(lens):
            if p:
                write(cache.k[0], cache.v[0], past[s][0], past[s][1], bm.slots(s, 0, p))
        batch = make_batch([(list(range(n)), p, bm.tables[s]) for s, (n, p) in enumerate(lens)], block_size)
        write(cache.k[0], cache.v[0], new_k, new_v, batch.slot_mapping)
        outs.append(attn(q, cache.k[0], cache.v[0], batch))
    np.testing.assert_array_equal(caches[0][0].k, caches[1][0].k)
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-5)


def test_tiny_model_numba_equals_numpy(tiny_gguf):
    a, b = minfer.LLM(tiny_gguf, backend="numpy"), minfer.LLM(tiny_gguf, backend="numba")
    ids = list(range(20, 60))
    np.testing.assert_allclose(b.logits(ids), a.logits(ids), rtol=0, atol=1e-4)
    p = minfer.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [[5, 6, 7], list(range(30, 52))]
    assert [o.token_ids for o in a.generate(prompts, p)] == [o.token_ids for o in b.generate(prompts, p)]
    assert [o.token_ids for o in b.generate(prompts, p)] == [b.generate([x], p)[0].token_ids for x in prompts]


def test_exp32_matches_np_exp():
    """The vectorizable exp of the softmax and silu kernels: relative error <= 1.5e-7 per unit of
    |x| (the float32 product x log2(e) rounds), over the whole float32 range of e^x."""
    from numba import njit
    from minfer.stages.fastexp import exp32

    @njit(fastmath=True)
    def all_exp(a):
        out = np.empty_like(a)
        for i in range(a.size):
            out[i] = exp32(a[i])
        return out
    x = np.linspace(-87, 87, 400_001, dtype=np.float32)
    want = np.exp(x.astype(np.float64))
    rel = np.abs(all_exp(x) / want - 1)
    assert (rel <= 1.5e-7 * np.maximum(1, np.abs(x))).all(), rel.max()
    edge = all_exp(np.array([0, -np.inf, -1e30, 1e30], dtype=np.float32))
    assert edge[0] == 1 and 0 <= edge[1] < 1e-37 and 0 <= edge[2] < 1e-37 and edge[3] > 1e37


def test_exp32_ir_matches_np_exp():
    """exp32_ir, the same arithmetic on 16 lanes for kernels written as LLVM operations (the
    attention job's softmax): the same bound, 16 values a call."""
    from numba import njit, types
    from numba.extending import intrinsic
    from minfer.stages.fastexp import exp32_ir
    from minfer.stages.simd import F32, _load, _vec

    @intrinsic
    def exp16(typingctx, a, off):
        def codegen(context, builder, sig, args):
            e = exp32_ir(builder, _load(context, builder, sig.args[0], args[0], args[1], F32, 16))
            data = context.make_array(sig.args[0])(context, builder, args[0]).data
            builder.store(e, builder.bitcast(builder.gep(data, [args[1]]), _vec(F32, 16).as_pointer()), align=4)
            return context.get_dummy_value()
        return types.none(a, types.int64), codegen

    @njit
    def all_exp(a):
        for i in range(0, a.size, 16):
            exp16(a, i)
    x = np.linspace(-87, 87, 400_000, dtype=np.float32)
    out = x.copy()
    all_exp(out)
    rel = np.abs(out / np.exp(x.astype(np.float64)) - 1)
    assert (rel <= 1.5e-7 * np.maximum(1, np.abs(x))).all(), rel.max()


@pytest.mark.parametrize("block_size", [3, 16])
@pytest.mark.parametrize("n_new,n", [(2, 40), (1, 40), (1, 3), (5, 61)])
def test_paged_attention_with_peaked_scores(block_size, n_new, n):
    """Scores spread over ~+-60: the running max keeps rising from block to block and most
    exps underflow. The numba kernel's per-block rescale, and the merge of its key slices (a
    decode row's keys are cut into attention.SLICES slices; with 3 keys most slices are empty),
    must still agree with the reference."""
    Hq, Hkv, hd = 6, 2, 16
    r = np.random.default_rng(3)
    cache = KVCache(1, Hkv, hd, block_size=block_size, n_blocks=-(-n // block_size))
    bm = BlockManager(cache)
    bm.ensure(0, n)
    k = (r.standard_normal((n, Hkv, hd)) * np.linspace(0.1, 3, n)[:, None, None]).astype(np.float32)
    kvcache.kv_write(cache.k[0], cache.v[0], k, r.standard_normal((n, Hkv, hd)).astype(np.float32),
                     bm.slots(0, 0, n))
    batch = make_batch([(list(range(n_new)), n - n_new, bm.tables[0])], block_size)
    q = (r.standard_normal((n_new, Hq, hd)) * 5).astype(np.float32)
    want = attention.paged_attention(q, cache.k[0], cache.v[0], batch)
    got = attention.paged_attention_numba(q, cache.k[0], cache.v[0], batch)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block_size", [5, 16, 32])
@pytest.mark.parametrize("n_new,n", [(1, 1), (1, 19), (1, 200), (3, 70)])
def test_paged_attention_vector_path_at_model_shapes(block_size, n_new, n):
    """head_dim 64, 9 query heads on 3 kv heads (SmolLM2-135M): the vector job (head_dim a
    multiple of 16; attention_simd.py's _scores16, vector softmax and _pv64x2, the next block
    prefetched) against the reference, with keys
    that fill no whole 16-key vector, one, and many blocks."""
    Hq, Hkv, hd = 9, 3, 64
    r = np.random.default_rng(5)
    cache = KVCache(1, Hkv, hd, block_size=block_size, n_blocks=-(-n // block_size) + 2)
    bm = BlockManager(cache)
    bm.ensure(0, n)
    kvcache.kv_write(cache.k[0], cache.v[0], r.standard_normal((n, Hkv, hd)).astype(np.float32),
                     r.standard_normal((n, Hkv, hd)).astype(np.float32), bm.slots(0, 0, n))
    batch = make_batch([(list(range(n_new)), n - n_new, bm.tables[0])], block_size)
    q = (r.standard_normal((n_new, Hq, hd)) * 2).astype(np.float32)
    want = attention.paged_attention(q, cache.k[0], cache.v[0], batch)
    got = attention.paged_attention_numba(q, cache.k[0], cache.v[0], batch)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
