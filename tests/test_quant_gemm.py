"""cpu/quant_gemm.py: many rows of x against each weight row decoded once — the kernel against the
NumPy reference, and the one-region step on mixed batches against the numpy backend."""
import numpy as np
import pytest

import minfer
from minfer.cpu import formats
from minfer.batch import make_batch
from minfer.cpu import quant_gemm
from minfer.stages.quant import QuantMatrix, quant_linear
from minfer.stages.quant_dispatch import KernelConfig

rng = np.random.default_rng(7)
FORMATS = ["Q4_0", "Q4_1", "Q8_0"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [1, 2, 3, 7, 33])
@pytest.mark.parametrize("O,K", [(37, 96), (70, 160), (5, 32)])
@pytest.mark.parametrize("half", [False, True], ids=["f32-scales", "f16-scales"])
def test_rows_kernel_matches_reference(fmt, T, O, K, half):
    w = QuantMatrix.from_float(rng.standard_normal((O, K)).astype(np.float32), fmt)
    x = rng.standard_normal((T, K)).astype(np.float32)
    ref = quant_linear(x.astype(np.float64), w)                       # [T, O] in float64
    got = quant_gemm.quant_linear_rows(x, w.half_scales() if half else w)
    assert got.shape == (T, O) and got.dtype == np.float32
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_rows_kernel_dequantizes_bit_exact():
    """The vector block decoders give QuantMatrix.dequantize's floats exactly."""
    for fmt in FORMATS:
        w = QuantMatrix.from_float(rng.standard_normal((9, 96)).astype(np.float32), fmt).half_scales()
        buf = np.empty((9, 96), dtype=np.float32)
        m = quant_gemm._NO_M if w.m is None else quant_gemm.bits(w.m)
        quant_gemm._dequant_rows(w.qs.view(np.uint8), quant_gemm.bits(w.d), m, 0, 9, buf)
        np.testing.assert_array_equal(buf, w.dequantize())


def _mixed(model, all_logits=True):
    """A prefill of three prompts, then a step that mixes decode rows, k tokens to verify and a
    prefill chunk: sequences with 1, 5, 3 and 7 new rows (16 in all), at different positions."""
    bs = 4
    cache = model.new_cache(n_blocks=40, block_size=bs)
    tables = [list(range(i * 10, i * 10 + 10)) for i in range(4)]
    prompts = [list(range(10, 23)), list(range(40, 47)), list(range(60, 81))]
    prefill = make_batch([(p, 0, t) for p, t in zip(prompts, tables)], bs, all_logits=True)
    first = model.forward(prefill, cache)
    step = [([5], len(prompts[0]), tables[0]), ([6, 7, 8, 9, 10], len(prompts[1]), tables[1]),
            ([11, 12, 13], len(prompts[2]), tables[2]), (list(range(90, 97)), 0, tables[3])]
    second = model.forward(make_batch(step, bs, all_logits=all_logits), cache)
    return first, second, cache


@pytest.mark.parametrize("quant", ["q4_1", "q4_0", "q8_0"])
@pytest.mark.parametrize("many", [2, 4, 1 << 30], ids=["rows-from-2", "rows-from-4", "no-rows"])
def test_region_mixed_batch_equals_numpy(tiny_gguf, quant, many, monkeypatch):
    """The one-region step on batches of several sequences with different numbers of new rows,
    its matmuls on the many-row tiles (or not), against the numpy backend."""
    llm = minfer.LLM(tiny_gguf, quant=quant, kernels=KernelConfig(many_rows=(many,) * 4))
    ref = minfer.LLM(tiny_gguf, quant=quant, backend="numpy")
    calls, real = [], llm.model.run_region
    monkeypatch.setattr(llm.model, "run_region", lambda k, x, *a: calls.append(len(x)) or real(k, x, *a))
    got, want = _mixed(llm.model), _mixed(ref.model)
    assert calls == [41, 16]                                   # both steps in the region
    for g, w in zip(got[:2], want[:2]):
        assert g.shape == w.shape
        assert np.abs(g - w).max() <= 1e-5 * np.abs(w).max()
    np.testing.assert_allclose(got[2].k, want[2].k, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[2].v, want[2].v, rtol=1e-5, atol=1e-5)


def _greedy(model, prompts, n, batched):
    """n greedy tokens for each prompt: all sequences in one batch a step, or each alone."""
    bs = 4
    cache = model.new_cache(n_blocks=16 * len(prompts), block_size=bs)
    tables = [list(range(i * 16, i * 16 + 16)) for i in range(len(prompts))]   # 64 slots each
    groups = [list(range(len(prompts)))] if batched else [[i] for i in range(len(prompts))]
    out = [[] for _ in prompts]
    for g in groups:
        logits = model.forward(make_batch([(prompts[i], 0, tables[i]) for i in g], bs), cache)
        for _ in range(n):
            for j, i in enumerate(g):
                out[i].append(int(np.argmax(logits[j])))
            logits = model.forward(make_batch([([out[i][-1]], len(prompts[i]) + len(out[i]) - 1, tables[i])
                                               for i in g], bs), cache)
    return out


@pytest.mark.parametrize("quant", ["q4_1", "q8_0"])
def test_batched_greedy_equals_solo(tiny_gguf, quant):
    """Sixteen sequences decoded together (each step's matmuls on the many-row tiles) give the
    tokens each gives alone (one row a step: the matvec kernels, or the panels)."""
    llm = minfer.LLM(tiny_gguf, quant=quant, kernels=KernelConfig(many_rows=(2, 2, 1 << 30, 16)))
    prompts = [list(range(10 + 7 * i, 15 + 9 * i)) for i in range(16)]
    assert len(prompts) >= max(llm.kernels.many_rows[k] for k in (formats.Q4, formats.Q8, formats.SPLIT))
    assert _greedy(llm.model, prompts, 8, True) == _greedy(llm.model, prompts, 8, False)


@pytest.mark.parametrize("amx, zen4", [(False, False), (False, True), (True, False)])
def test_the_float_tiles_take_over_only_where_byte_products_cost_more(monkeypatch, amx, zen4):
    """The crossover from the three-part panels to these tiles (and to the sgemm tiles outside
    the one-region step): about 96 rows (384) where a byte dot product costs two float
    multiply-adds; never within the region (2,048) with the tile unit, or on Zen 4."""
    from minfer.stages import quant_dispatch, simd
    monkeypatch.setattr(simd, "has_amx", lambda: amx)
    monkeypatch.setattr(simd, "vnni_at_fma_rate", lambda: zen4)
    split, region = quant_dispatch._host_many_rows()[3], quant_dispatch._host_region_max_rows()
    assert (split, region) == ((1 << 30, 2048) if amx or zen4 else (96, 384))
