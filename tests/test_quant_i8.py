"""int8 activations (stages/quant_i8.py): the VNNI kernels against their NumPy spec, their error
against the float32-activation function, and the option's plumbing and errors."""
import subprocess
import sys

import numpy as np
import pytest

import minfer
from minfer.errors import InvalidArgumentError
from minfer.cpu import formats
from minfer.stages import mlp, quant, quant_dispatch, quant_i8, simd
from minfer.stages.quant_dispatch import KernelConfig

FORMATS = ["Q8_0", "Q4_0", "Q4_1"]
rng = np.random.default_rng(11)
vnni = pytest.mark.skipif(not quant_i8.has_vnni(), reason="this CPU has no AVX-512 VNNI")


def mat(O, K, fmt):
    return quant.QuantMatrix.from_float(rng.standard_normal((O, K)).astype(np.float32), fmt)


@pytest.mark.parametrize("K", [32, 64, 96, 224, 576])  # 1, 2, 3, 7 (4 + 2 + 1), 18 blocks
@pytest.mark.parametrize("limbs", [1, 3])
def test_quantize_x_numba_matches_numpy(K, limbs):
    x = rng.standard_normal((3, K)).astype(np.float32)
    x[1, :32] = 0.0                                     # an all-zero block: scale 0, no NaN
    for q4 in (True, False):
        got, want = quant_i8._quantize_x(x, q4, limbs), quant_i8.quantize_x(x, q4, limbs)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[3], want[3])
        np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
        np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-5)
    if limbs == 3:                                      # the parts add up to x, to ~2^-21 of a block's max
        xq, dx = quant_i8.quantize_x(x, False, 3)[:2]
        nb, X = K // 32, np.zeros((3, K // 32, 32))
        for b, n in zip(np.cumsum([0] + quant_i8.chunks(nb, False))[:-1], quant_i8.chunks(nb, False)):
            c = xq[:, b * 96:(b + n) * 96].reshape(3, 3, n, 32).astype(np.float64)
            X[:, b:b + n] = c[:, 0] * 16384 + c[:, 1] * 128 + c[:, 2]
            assert (c[:, 1:] >= -64).all() and (c[:, 1:] <= 63).all()   # the lower digits
        back = (X * dx[:, :, None]).reshape(3, K)
        amax = np.abs(x.reshape(3, nb, 32)).max(axis=2).repeat(32, axis=1)
        assert (np.abs(back - x) <= 2.0 ** -21 * amax + 1e-30).all()
        return
    # q4 order: every chunk holds the values under low nibbles, then those under high ones
    xq = quant_i8.quantize_x(x, True)[0]
    plain = quant_i8.quantize_x(x, False)[0]
    assert np.array_equal(np.sort(xq, axis=1), np.sort(plain, axis=1))
    if K >= 128:                                        # first chunk: 4 blocks, lows then highs
        assert np.array_equal(xq[:, 16:32], plain[:, 32:48])      # block 1, elements 0..15
        assert np.array_equal(xq[:, 64:80], plain[:, 16:32])      # block 0, elements 16..31


@vnni
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("K", [32, 64, 96, 224, 576, 1120])   # 1120: Q8_0 rows 16 + 16 + 2 + 1
@pytest.mark.parametrize("T", [1, 3, 9])
def test_kernels_match_their_reference(fmt, K, T):
    w = mat(45, K, fmt)
    x = rng.standard_normal((T, K)).astype(np.float32)
    spec = quant_i8.quant_linear_i8_reference(x, w)
    got = quant_i8.quant_linear_i8(x, w)
    assert np.abs(got - spec).max() <= 1e-5 * np.abs(spec).max()
    # and the rounding of x costs what llama.cpp's scheme costs: about 1% of the output's scale
    exact = quant.quant_linear(x, w)
    assert np.abs(got - exact).max() <= 5e-2 * np.abs(exact).max()
    assert np.abs(got - exact).max() >= 1e-5 * np.abs(exact).max()   # it does round


@pytest.mark.parametrize("O", [1, 5, 23, 24, 576, 577, 960, 1536, 49152])
def test_tiles_share_the_rows_out_evenly(O):
    n = quant_i8._tiles(O)
    assert n % quant_i8.TILES == 0                      # as many for 1, 2, 3, 4, 6, 8, 12 threads
    edges = [i * O // n for i in range(n + 1)]
    assert edges[0] == 0 and edges[-1] == O and all(a <= b for a, b in zip(edges, edges[1:]))
    assert max(b - a for a, b in zip(edges, edges[1:])) <= max(1, 2 * quant_i8.ROWS)


@vnni
@pytest.mark.parametrize("O", [5, 577])                 # fewer rows than tiles; tiles of 24 and 25
@pytest.mark.parametrize("limbs", [1, 3])
def test_kernels_with_uneven_tiles(O, limbs):
    w = mat(O, 96, "Q4_1")
    x = rng.standard_normal((2, 96)).astype(np.float32)
    spec = quant_i8.quant_linear_i8_reference(x, w, limbs)
    assert np.abs(quant_i8.quant_linear_i8(x, w, limbs) - spec).max() <= 1e-5 * np.abs(spec).max()
    g = quant_i8.quant_gate_up_i8(x, w, w, limbs)
    assert np.abs(g - spec / (1 + np.exp(-spec)) * spec).max() <= 1e-4 * np.abs(g).max()


@vnni
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("K", [32, 64, 96, 224, 576, 1120])   # (blocks a row: 1 ... 35)
@pytest.mark.parametrize("T", [1, 3])
def test_split_float_x_is_as_exact_as_the_float_kernels(fmt, K, T):
    """x split into three int8 parts (the default decode path on VNNI CPUs): against float64,
    within a few times the float kernels' own error (x spread over e^+-6 within a block), and
    the kernels equal their NumPy spec."""
    w = mat(45, K, fmt)
    x = (rng.standard_normal((T, K)) * np.exp(2 * rng.standard_normal((T, K)))).astype(np.float32)
    exact = x.astype(np.float64) @ w.dequantize().astype(np.float64).T
    scale = np.abs(exact).max()
    got = quant_i8.quant_linear_i8(x, w, limbs=3)
    floats = quant._q8_0_matmul(x, w.qs, w.d) if fmt == "Q8_0" else quant._q4_matmul(x, w.qs, w.d, w.m)
    assert np.abs(got - exact).max() <= max(4 * np.abs(floats - exact).max(), 4e-6 * scale)
    spec = quant_i8.quant_linear_i8_reference(x, w, limbs=3)
    assert np.abs(got - spec).max() <= 1e-6 * scale
    g = quant_i8.quant_gate_up_i8(x, w, w, limbs=3)
    np.testing.assert_allclose(g, mlp.silu(got) * got, rtol=1e-5, atol=1e-6 * scale ** 2)


@vnni
@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1"])
def test_two_tokens_a_pass_equal_one_at_a_time(fmt):
    """The three-part kernels take a prompt's tokens in pairs (each 4-block chunk of weights
    loaded once for both): the same numbers as token by token — 4 and 5 tokens, rows of 7
    blocks (a chunk of 4, then 2 and 1, token by token), the matmul and the gate/up kernel."""
    w, u = mat(70, 224, fmt), mat(70, 224, fmt)
    x = rng.standard_normal((5, 224)).astype(np.float32)
    for T in (4, 5):
        one = np.concatenate([quant_i8.quant_linear_i8(x[t:t + 1], w, limbs=3) for t in range(T)])
        got = quant_i8.quant_linear_i8(x[:T], w, limbs=3)
        assert np.abs(got - one).max() <= 1e-6 * np.abs(one).max()
        one = np.concatenate([quant_i8.quant_gate_up_i8(x[t:t + 1], w, u, limbs=3) for t in range(T)])
        got = quant_i8.quant_gate_up_i8(x[:T], w, u, limbs=3)
        assert np.abs(got - one).max() <= 1e-6 * np.abs(one).max()


@vnni
@pytest.mark.parametrize("limbs", [1, 3])
@pytest.mark.parametrize("O", [127, 1536])
def test_q8_0_tiles_of_4_rows_by_2_tokens_equal_one_token_at_a_time(O, limbs):
    """Q8_0 rows 4 at a time against tokens 2 at a time (_rows_pair_q8): the same numbers as a
    token at a time and as the spec — 127 rows make tiles of 5 and 6 rows (a step of 4, then
    rows one by one), rows of 7 blocks end with a chunk of 1; 2, 3 and 5 tokens (the last one
    alone); the matmul and the gate/up kernel; float16 and float32 scales."""
    w, u = mat(O, 224, "Q8_0"), mat(O, 224, "Q8_0")
    x = rng.standard_normal((5, 224)).astype(np.float32)
    for T in (2, 3, 5):
        one = np.concatenate([quant_i8.quant_linear_i8(x[t:t + 1], w, limbs) for t in range(T)])
        got = quant_i8.quant_linear_i8(x[:T], w, limbs)
        assert np.abs(got - one).max() <= 1e-6 * np.abs(one).max()
        spec = quant_i8.quant_linear_i8_reference(x[:T], w, limbs)
        assert np.abs(got - spec).max() <= 1e-5 * np.abs(spec).max()
        half = quant_i8.quant_linear_i8(x[:T], w.half_scales(), limbs)
        assert np.abs(half - one).max() <= 1e-6 * np.abs(one).max()       # scales as in the file
        one = np.concatenate([quant_i8.quant_gate_up_i8(x[t:t + 1], w, u, limbs) for t in range(T)])
        got = quant_i8.quant_gate_up_i8(x[:T], w, u, limbs)
        assert np.abs(got - one).max() <= 1e-6 * np.abs(one).max()


def test_the_default_kernels_split_x_where_the_cpu_has_vnni(tiny_gguf):
    """KernelConfig() asks the CPU: the three-part kernels where it has VNNI, else the float
    ones; an LLM built without `kernels` runs on that default, its weights held to match."""
    assert KernelConfig().split_x == simd.has_vnni()
    llm = minfer.LLM(tiny_gguf, quant="q4_1")
    assert llm.kernels == llm.model.kernels == KernelConfig()
    assert llm.model.region_kind(1) == (formats.SPLIT if simd.has_vnni() else formats.Q4)
    assert (llm.weights.stacks["w_up"][2].dtype == np.float16) == simd.has_vnni()


@vnni
def test_default_decode_uses_the_split_and_can_be_turned_off():
    w = mat(64, 96, "Q4_1")
    x = rng.standard_normal((2, 96)).astype(np.float32)
    split = quant_dispatch.quant_linear_numba(x, w)                 # the default: this CPU's
    assert np.array_equal(split, quant_i8.quant_linear_i8(x, w, limbs=3))
    w8 = mat(64, 96, "Q8_0").half_scales()      # Q8_0 too, one token or more (as loaded:
    for xt in (x[:1], x):                       # float16 scales, weights.scales_for_kernels)
        assert np.array_equal(quant_dispatch.quant_linear_numba(xt, w8), quant_i8.quant_linear_i8(xt, w8, limbs=3))
        assert np.array_equal(quant_dispatch.quant_gate_up_numba(xt, w8, w8),
                              quant_i8.quant_gate_up_i8(xt, w8, w8, limbs=3))
    floats = quant_dispatch.quant_linear_numba(x, w, kernels=KernelConfig(split_x=False))
    assert np.array_equal(floats, quant._q4_matmul(x, w.qs, w.d, w.m))
    assert np.abs(split - floats).max() <= 1e-5 * np.abs(floats).max()


@vnni
@pytest.mark.parametrize("fmt", FORMATS)
def test_gate_up_and_swiglu(fmt):
    g, u, d = mat(64, 96, fmt), mat(64, 96, fmt), mat(96, 64, fmt)
    x = rng.standard_normal((2, 96)).astype(np.float32)
    spec = (mlp.silu(quant_i8.quant_linear_i8_reference(x, g))
            * quant_i8.quant_linear_i8_reference(x, u))
    got = quant_i8.quant_gate_up_i8(x, g, u)
    assert np.abs(got - spec).max() <= 1e-5 * np.abs(spec).max()
    y = mlp.swiglu_numba(x, g, u, d, int8_act=True)
    assert np.abs(y - quant_i8.quant_linear_i8(got, d)).max() <= 1e-5 * np.abs(y).max()


@vnni
def test_llm_with_int8_activations(tiny_gguf):
    ids = list(range(10, 30))
    for q in ("q4_1", "q8_0"):
        exact = minfer.LLM(tiny_gguf, quant=q).logits(ids)
        llm = minfer.LLM(tiny_gguf, quant=q, activations="int8")
        assert llm.model.ops.name == "numba+int8"
        got = llm.logits(ids)
        err = np.abs(got - exact).max() / np.abs(exact).max()
        assert 0 < err < 0.1, err
        out = llm.generate([ids], minfer.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        assert len(out[0].token_ids) == 4


def test_int8_activations_errors(tiny_gguf, monkeypatch):
    with pytest.raises(InvalidArgumentError, match="numba-backend"):
        minfer.LLM(tiny_gguf, backend="numpy", activations="int8")
    with pytest.raises(InvalidArgumentError, match="need quantized weights"):
        minfer.LLM(tiny_gguf, quant="f32", activations="int8")
    with pytest.raises(InvalidArgumentError, match="unknown activations"):
        minfer.LLM(tiny_gguf, activations="int4")
    monkeypatch.setattr(simd, "has_vnni", lambda: False)
    with pytest.raises(InvalidArgumentError, match="AVX-512 VNNI"):
        minfer.LLM(tiny_gguf, quant="q4_1", activations="int8")


def test_cli_activations_flag_error_is_one_line(tiny_gguf):
    r = subprocess.run([sys.executable, "-m", "minfer", "generate", "hi", "--model", str(tiny_gguf),
                        "--backend", "numpy", "--activations", "int8"], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "numba-backend" in r.stderr


@vnni
def test_quality_rows_for_int8_activations(tiny_gguf):
    from minfer import quality
    rows = quality.evaluate(tiny_gguf, quants=("f32", "q8_0", "auto"), activations=("f32", "int8"),
                            window=16, max_tokens=33)
    got = {(r["quant"], r["activations"]): r for r in rows}
    # no f32 + int8; nor auto + int8 on this F32 file (its auto is float32: it ended the run)
    assert set(got) == {("f32", "f32"), ("q8_0", "f32"), ("q8_0", "int8"), ("auto", "f32")}
    assert got["f32", "f32"]["kl_vs_f32"] == 0 and got["f32", "f32"]["top1_vs_f32"] == 1
    assert got["q8_0", "int8"]["kl_vs_f32"] > 0 and got["q8_0", "int8"]["tokens"] == 32


@vnni
@pytest.mark.parametrize("fmt", FORMATS)
def test_float16_scales_give_the_same_numbers(fmt):
    w = mat(40, 224, fmt)
    h = w.half_scales()
    assert h.d.dtype == np.float16 and np.array_equal(h.dequantize(), w.dequantize())
    x = rng.standard_normal((3, 224)).astype(np.float32)
    assert np.array_equal(quant_i8.quant_linear_i8(x, h), quant_i8.quant_linear_i8(x, w))
    u = mat(40, 224, fmt)
    assert np.array_equal(quant_i8.quant_gate_up_i8(x, h, u.half_scales()),
                          quant_i8.quant_gate_up_i8(x, w, u))


def test_scales_for_kernels_leaves_the_loaded_weights_as_they_were(tiny_gguf):
    """float16 scales come as new weights (new stacks, the layers' views of them, the LM head),
    the quants shared; the weights given are not changed."""
    from minfer.weights.load import load, scales_for_kernels
    W = load(tiny_gguf, "q4_1")[1]
    scales, up, head = {k: v[2] for k, v in W.stacks.items()}, W.layers[0].w_up, W.lm_head
    half = scales_for_kernels(W, "numba", "int8", KernelConfig(split_x=False))
    assert half is not W and half.stacks["w_up"][2].dtype == np.float16
    assert half.layers[0].w_up.d.dtype == half.lm_head.d.dtype == np.float16
    assert np.shares_memory(half.layers[1].wq.d, half.stacks["wqkv"][2])            # views
    assert np.shares_memory(half.stacks["w_up"][1], W.stacks["w_up"][1])           # the quants
    assert all(W.stacks[k][2] is d for k, d in scales.items())
    assert W.layers[0].w_up is up and up.d.dtype == np.float32 and W.lm_head is head
    assert head.d.dtype == np.float32
    assert scales_for_kernels(W, "numba", "f32", KernelConfig(split_x=True)).stacks["wo"][2].dtype == np.float16
    assert scales_for_kernels(W, "numba", "f32", KernelConfig(split_x=False)) is W
    assert scales_for_kernels(W, "numpy", "f32", KernelConfig(split_x=True)) is W


@vnni
def test_int8_model_holds_float16_scales(tiny_gguf):
    exact = minfer.LLM(tiny_gguf, quant="q4_1", kernels=KernelConfig(split_x=False))  # float32 scales
    llm = minfer.LLM(tiny_gguf, quant="q4_1", activations="int8")
    W = llm.weights
    assert W.layers[0].w_up.d.dtype == np.float16 and W.stacks["w_up"][2].dtype == np.float16
    assert np.shares_memory(W.layers[1].wq.d, W.stacks["wqkv"][2])          # still views
    assert W.lm_head is W.tok_embd or not exact.config.tie_embeddings
    assert W.nbytes() < exact.weights.nbytes()
    np.testing.assert_array_equal(W.layers[0].wo.dequantize(), exact.weights.layers[0].wo.dequantize())


@vnni
def test_default_model_keeps_float16_scales_for_its_4bit_layers(tiny_gguf):
    """On a VNNI CPU the default (float32 activations) runs the 4-bit layers on the int8-part
    kernels, which read float16 scales, and the embedding / LM head too (whatever its format).
    Prefill tiles widen the scales and give the same logits as with float32 scales."""
    # every matmul of 8 rows or more on the prefill tiles (not the one-region step)
    tiles = dict(gemm_min_rows=8, split_gemm_min_rows=8, q8_split_gemm_min_rows=8, region_max_rows=8)
    llm = minfer.LLM(tiny_gguf, quant="q4_1", kernels=KernelConfig(split_x=True, **tiles))
    assert llm.weights.stacks["w_up"][2].dtype == np.float16
    assert llm.weights.layers[0].wq.d.dtype == np.float16
    assert llm.weights.lm_head.d.dtype == np.float16
    floats = minfer.LLM(tiny_gguf, quant="q4_1", kernels=KernelConfig(split_x=False, **tiles))
    assert floats.weights.stacks["w_up"][2].dtype == np.float32
    assert llm.weights.nbytes() < floats.weights.nbytes()
    ids = list(range(10, 30))                                   # 20 tokens: the prefill tiles
    np.testing.assert_array_equal(llm.logits(ids), floats.logits(ids))
    w = mat(300, 96, "Q4_1")                                    # and a float kernel, if asked
    x = rng.standard_normal((2, 96)).astype(np.float32)
    k = floats.kernels

    def mm(x, w):
        return quant_dispatch.quant_linear_numba(x, w, kernels=k)
    assert np.array_equal(mm(x, w.half_scales()), mm(x, w))
    x9 = rng.standard_normal((9, 96)).astype(np.float32)
    assert np.array_equal(mm(x9, w.half_scales()), mm(x9, w))


@vnni
def test_q8_0_runs_on_the_split_kernel_unless_switched_off(monkeypatch):
    """quant_dispatch.quant_linear_numba on a VNNI CPU: a Q8_0 matrix goes to the three-part kernel with
    float16 scales (as weights.load keeps them there) or float32 ones; with the split switched
    off, to the float kernel (float16 scales widened for it). All give the reference's numbers."""
    calls, real = [], quant_i8.quant_linear_i8
    monkeypatch.setattr(quant_dispatch, "quant_linear_i8", lambda *a, **k: calls.append(k) or real(*a, **k))
    w = mat(300, 96, "Q8_0")
    x = rng.standard_normal((1, 96)).astype(np.float32)
    want = quant.quant_linear(x, w)
    split, floats = KernelConfig(split_x=True), KernelConfig(split_x=False)
    for h in (w.half_scales(), w):
        np.testing.assert_allclose(quant_dispatch.quant_linear_numba(x, h, kernels=split), want, rtol=1e-5, atol=1e-5)
    assert calls == [dict(limbs=3)] * 2
    np.testing.assert_allclose(quant_dispatch.quant_linear_numba(x, w.half_scales(), kernels=floats), want,
                               rtol=1e-5, atol=1e-5)
    assert len(calls) == 2
