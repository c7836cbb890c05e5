"""Quantized blocks: bit-exact with the gguf package, kernels vs the dequantize-then-matmul reference."""
import gguf
import numpy as np
import pytest

import minfer
from minfer.errors import ModelFormatError
from minfer.stages import quant, quant_dispatch, quant_i8
from minfer.stages.quant_dispatch import KernelConfig

FORMATS = ["Q8_0", "Q4_0", "Q4_1"]
rng = np.random.default_rng(3)


def weights(O, K):
    w = (rng.standard_normal((O, K)) * rng.random((O, 1)) * 3).astype(np.float32)
    w[0, :32] = 0.0                                   # an all-zero block (scale 0)
    w[-1, :32] = 0.25                                 # a constant block
    if K >= 64:
        w[-1, 32:64] = np.linspace(-1, 1, 32)        # exact halves: rounding ties
    return w


def test_round_half_away_is_c_roundf():
    """Q8_0's rounding: halves away from zero, as C's roundf (gguf's numpy code does the same);
    against float64, where v + 0.5 is exact: ties of both signs, the floats next to a half."""
    v = np.concatenate([np.arange(-127, 127.5, 0.5), rng.uniform(-127, 127, 10000),
                        np.nextafter(np.float32([0.5, -0.5, 2.5, -2.5, 126.5]), np.float32(0)),
                        np.nextafter(np.float32([0.5, -0.5, 2.5, -2.5, 126.5]), np.float32(200)),
                        [0.0, -0.0]]).astype(np.float32)
    v64 = v.astype(np.float64)
    want = np.where(v64 >= 0, np.floor(v64 + 0.5), -np.floor(-v64 + 0.5))
    assert np.array_equal(quant._round_half_away(v), want)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(1, 32), (7, 64), (33, 96)])
def test_quantize_dequantize_bit_exact_with_gguf(fmt, shape):
    w = weights(*shape)
    qtype = getattr(gguf.GGMLQuantizationType, fmt)
    ours = quant.quantize(w, fmt)
    theirs = gguf.quants.quantize(w, qtype)
    assert np.array_equal(ours, theirs)
    assert np.array_equal(quant.dequantize(ours, fmt, w.shape), gguf.quants.dequantize(theirs, qtype))
    assert np.array_equal(quant.QuantMatrix(ours, fmt, w.shape).dequantize(),
                          gguf.quants.dequantize(theirs, qtype))


# split: decode on x as three int8 parts (a VNNI CPU's default for 4-bit weights) or on the float
# kernels (every other CPU); both are checked against the reference on this machine.
SPLIT = [False, True] if quant_i8.has_vnni() else [False]


def tiles_from(rows, **kw):
    """Kernels that send matmuls of `rows` tokens or more to the tile + sgemm path
    (KernelConfig.sgemm_min_rows); kw: the other choices."""
    return KernelConfig(gemm_min_rows=rows, split_gemm_min_rows=rows, q8_split_gemm_min_rows=rows, **kw)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T,tiles", [(1, False), (3, False), (20, False), (8, True), (17, True)])
@pytest.mark.parametrize("split", SPLIT)
def test_quant_linear_numba_matches_reference(fmt, T, tiles, split):
    kernels = tiles_from(8, split_x=split) if tiles else KernelConfig(split_x=split)
    assert (T >= kernels.sgemm_min_rows(fmt)) == tiles
    w = quant.QuantMatrix.from_float(weights(45, 160), fmt)
    x = rng.standard_normal((T, 160)).astype(np.float32)
    ref = quant.quant_linear(x, w)
    got = quant_dispatch.quant_linear_numba(x, w, kernels=kernels)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_tiles_cover_a_matrix_taller_than_one_tile(monkeypatch):
    kernels = tiles_from(8, tile_rows=16)
    w = quant.QuantMatrix.from_float(weights(50, 64), "Q4_1")
    x = rng.standard_normal((9, 64)).astype(np.float32)
    tiles, real = [], quant._dequant_tile_q4
    monkeypatch.setattr(quant, "_dequant_tile_q4", lambda qs, *a: tiles.append(len(qs)) or real(qs, *a))
    got = quant_dispatch.quant_linear_numba(x, w, kernels=kernels)
    np.testing.assert_allclose(got, quant.quant_linear(x, w), rtol=1e-4, atol=1e-4)
    assert sorted(tiles) == [2, 16, 16, 16]


@pytest.mark.parametrize("fmt", FORMATS)
def test_prefill_tiles_dequantize_bit_exact(fmt):
    """The tiles handed to sgemm are exactly the dequantized weights (rows 7..18 of 30)."""
    w = quant.QuantMatrix.from_float(weights(30, 96), fmt)
    tile = np.empty((12, 96), dtype=np.float32)
    if fmt == "Q8_0":
        quant._dequant_tile_q8(w.qs, w.d, 7, tile)
    else:
        quant._dequant_tile_q4(w.qs, w.d, w.m, 7, tile)
    assert np.array_equal(tile, w.dequantize()[7:19])


@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_embedding_rows(fmt):
    w = quant.QuantMatrix.from_float(weights(20, 64), fmt)
    ids = np.array([0, 19, 5, 5])
    assert np.array_equal(quant.quant_embedding(ids, w), w.dequantize()[ids])


def test_malformed_block_buffer_is_a_clear_error():
    good = quant.quantize(weights(4, 64), "Q4_1")
    with pytest.raises(ModelFormatError, match="bytes, expected"):
        quant.QuantMatrix(good.reshape(-1)[:-3], "Q4_1", (4, 64))
    with pytest.raises(ModelFormatError, match="blocks of 32"):
        quant.quantize(np.zeros((2, 40), np.float32), "Q8_0")


def test_quant_flag_formats_and_memory(tiny_gguf):
    sizes = {}
    base = minfer.LLM(tiny_gguf, backend="numba", quant="f32")
    ids = list(range(10, 40))
    ref = base.logits(ids)
    for q in ("q8_0", "q4_1", "q4_0"):
        llm = minfer.LLM(tiny_gguf, backend="numba", quant=q)
        assert isinstance(llm.weights.layers[0].wq, quant.QuantMatrix)
        assert llm.weights.layers[0].wq.fmt == q.upper()
        sizes[q] = llm.weights.nbytes()
        err = np.abs(llm.logits(ids) - ref).max()
        assert err < (0.1 if q == "q8_0" else 1.0)
        # the quantized kernels compute exactly what the dequantized weights describe
        numpy_same = minfer.LLM(tiny_gguf, backend="numpy", quant=q)
        assert np.abs(numpy_same.logits(ids) - llm.logits(ids)).max() <= 1e-4
    assert sizes["q4_1"] < sizes["q8_0"] < base.weights.nbytes()


def test_auto_keeps_the_files_blocks(tiny_dir):
    from minfer.weights import synthetic
    path = synthetic.tiny_checkpoint(tiny_dir / "q41", fmt="gguf", dtype="Q4_1")
    llm = minfer.LLM(path, backend="numba")            # quant="auto" is the default
    w = llm.weights.layers[0].w_up
    assert isinstance(w, quant.QuantMatrix) and w.fmt == "Q4_1"
    assert llm.weights.nbytes() <= 1.3 * path.stat().st_size


def test_unknown_quant_is_a_clear_error(tiny_gguf):
    from minfer.errors import InvalidArgumentError
    with pytest.raises(InvalidArgumentError, match="unknown quant"):
        minfer.LLM(tiny_gguf, quant="q3_k")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [1, 5, 9])               # 1 and 5: the fused gate/up kernel; 9: sgemm
@pytest.mark.parametrize("split", SPLIT)
def test_swiglu_numba_on_blocks_matches_reference(fmt, T, split):
    from minfer.stages import mlp
    kernels = tiles_from(8, split_x=split)
    g, u, d = (quant.QuantMatrix.from_float(weights(64, 64), fmt) for _ in range(3))
    x = rng.standard_normal((T, 64)).astype(np.float32)
    ref = mlp.swiglu(x, g, u, d)
    assert np.abs(mlp.swiglu_numba(x, g, u, d, kernels=kernels) - ref).max() <= 1e-4 * np.abs(ref).max()
    if T < 8:
        h = mlp.silu(quant.quant_linear(x, g)) * quant.quant_linear(x, u)
        got = quant_dispatch.quant_gate_up_numba(x, g, u, kernels=kernels)
        assert np.abs(got - h).max() <= 1e-4 * np.abs(h).max()


@pytest.mark.parametrize("T", [1, 3, 12])
def test_stacked_qkv_equals_three_matmuls(T):
    from minfer.stages.linear import qkv, qkv_numba, stack_rows
    for fmt in FORMATS + [None]:
        ws = [weights(o, 64) for o in (48, 16, 16)]
        if fmt:
            ws = [quant.QuantMatrix.from_float(w, fmt) for w in ws]
        big, views = stack_rows(ws)
        assert big is not None and views[1].shape == (16, 64)
        x = rng.standard_normal((T, 64)).astype(np.float32)
        for a, b in zip(qkv_numba(x, *views, big), qkv(x, *ws)):
            assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


def test_split_for_q4_numba_matches_numpy():
    x = rng.standard_normal((3, 96)).astype(np.float32)
    for a, b in zip(quant._split_q4(x), quant.split_for_q4(x)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)
