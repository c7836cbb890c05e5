"""cpu/quant_panel.py: int8 activations against weights in panels of 16 rows — the kernels against
quant_i8's NumPy reference (the same integer sums, so float32 rounding is the only difference)."""
import numpy as np
import pytest

from minfer.cpu import quant_panel
from minfer.stages import quant_i8
from minfer.stages.quant import QuantMatrix

pytestmark = pytest.mark.skipif(not quant_i8.has_vnni(), reason="this CPU has no AVX-512 VNNI")


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("half", [False, True], ids=["f32-scales", "f16-scales"])
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 33])
@pytest.mark.parametrize("limbs", [1, 3])
def test_panels_equal_the_int8_reference(fmt, half, T, limbs):
    rng = np.random.default_rng(T)
    O, K = 40, 96                        # 40 rows: the last of 3 panels is half padding
    w = QuantMatrix.from_float(rng.standard_normal((O, K)).astype(np.float32), fmt)
    w = w.half_scales() if half else w
    x = rng.standard_normal((T, K)).astype(np.float32)
    x[0, :32] = 0                         # an all-zero block: scale 0
    want = quant_i8.quant_linear_i8_reference(x, w.float_scales(), limbs)
    got = quant_panel.quant_linear_panels(x, quant_panel.PanelMatrix(w), limbs)
    assert got.shape == (T, O)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    if limbs == 3:                        # three parts: as exact as float32 arithmetic
        exact = x.astype(np.float64) @ w.dequantize().astype(np.float64).T
        assert np.abs(got - exact).max() <= 1e-5 * np.abs(exact).max()


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1"])
def test_three_parts_at_their_largest_sums(fmt):
    """Every nibble 15 and every value of x at its block's largest |x| (X = 127 128^2, the
    largest integer x becomes): a block's integer sum, 32 * 15 * X ~ 2^30, is the largest the three
    parts reach with 4-bit weights, and must come out as float32's rounding of it (an int32 that
    wrapped would flip its sign)."""
    O, K = 32, 96
    qs = np.full((O, K // 2), 0xFF, dtype=np.uint8)
    d = np.full((O, K // 32), 0.5, dtype=np.float32)
    m = np.full((O, K // 32), -0.25, dtype=np.float32) if fmt == "Q4_1" else np.float32(-8) * d
    w = QuantMatrix._from_parts(fmt, qs, d, m, K)
    x = np.full((3, K), 3.0, dtype=np.float32)
    x[1] = -3.0
    x[2, ::2] = -3.0                          # the signs alternate: the sums cancel to 0
    got = quant_panel.quant_linear_panels(x, quant_panel.PanelMatrix(w), 3)
    exact = x.astype(np.float64) @ w.dequantize().astype(np.float64).T
    assert np.abs(got - exact).max() <= 1e-6 * np.abs(exact).max()


def test_panel_layout_holds_each_row_once():
    """Every weight byte of the matrix is in the panels once, in the rows and lanes the kernels
    read it from: row 16 p + r, block b, bytes 4 c .. 4 c + 3 -> qp[p, b, c, 4 r .. 4 r + 3]."""
    rng = np.random.default_rng(0)
    w = QuantMatrix.from_float(rng.standard_normal((32, 64)).astype(np.float32), "Q4_1")
    p = quant_panel.PanelMatrix(w)
    assert p.qp.shape == (2, 2, 4, 64)
    for o, b, c in [(0, 0, 0), (17, 1, 3), (31, 0, 2)]:
        got = p.qp[o // 16, b, c, 4 * (o % 16):4 * (o % 16) + 4]
        np.testing.assert_array_equal(got, w.qs[o, 16 * b + 4 * c:16 * b + 4 * c + 4])
        assert p.d[o // 16, b, o % 16] == w.d[o, b]


@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("limbs", [1, 3])
def test_a_row_gives_the_same_bits_whatever_rows_come_with_it(fmt, limbs):
    """Token t of a call of T tokens (taken 8, 4, 3, 2 at a time) is bit for bit token t alone:
    verifying guesses gives what decoding them one by one would (greedy text kept exactly)."""
    rng = np.random.default_rng(3)
    w = QuantMatrix.from_float(rng.standard_normal((40, 96)).astype(np.float32), fmt)
    pm = quant_panel.PanelMatrix(w)
    x = rng.standard_normal((19, 96)).astype(np.float32)
    alone = np.concatenate([quant_panel.quant_linear_panels(x[t:t + 1], pm, limbs) for t in range(19)])
    for T in (2, 3, 4, 5, 7, 8, 9, 11, 16, 19):
        assert np.array_equal(quant_panel.quant_linear_panels(x[:T], pm, limbs), alone[:T])


@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0"])
def test_stacked_panels_start_on_a_cache_line(fmt):
    """The layers' panels, scales and mins (what the kernels load 64 bytes at a time) start on a
    64-byte line and hold what np.stack would."""
    rng = np.random.default_rng(3)
    ws = [QuantMatrix.from_float(rng.standard_normal((40, 96)).astype(np.float32), fmt) for _ in range(3)]
    qs, d = np.stack([w.qs for w in ws]), np.stack([w.d for w in ws])
    m = None if fmt == "Q8_0" else np.stack([w.m for w in ws])
    got = quant_panel.stacked(fmt, qs, d, m)
    mats = [quant_panel.PanelMatrix(w) for w in ws]
    want = (np.stack([a.qp for a in mats]), np.stack([a.d for a in mats]),
            np.zeros((3, 0), np.float32) if m is None else np.stack([a.m for a in mats]))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and np.array_equal(g, w)
        if g.size:
            assert g.ctypes.data % 64 == 0

