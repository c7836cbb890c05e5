"""cpu/quant_amx.py: the panels' byte products on the CPU's tile unit (AMX) — against the vector
panels (quant_panel.py, the same integer sums) and quant_i8's NumPy reference, at row counts
that fill a tile, leave it part empty, take two tiles and several passes."""
import numpy as np
import pytest

from minfer.cpu import quant_amx, quant_panel
from minfer.stages import quant_i8
from minfer.stages.quant import QuantMatrix

pytestmark = pytest.mark.skipif(not quant_amx.available(), reason="this CPU has no AMX tile unit")


def _amx(x, pm, limbs, p0=0, p1=None, work=None):
    """x . panels p0..p1-1 through quant_amx.tile: [T, 16 (p1 - p0)]."""
    p1 = pm.qp.shape[0] if p1 is None else p1
    xi = quant_panel.prepare_x(np.ascontiguousarray(x, dtype=np.float32), pm.fmt == "Q8_0", limbs)
    out = np.full((len(x), 16 * (p1 - p0) + 5), np.nan, dtype=np.float32)
    quant_amx.tile(xi, pm.qp, pm.d, pm.m, p0, p1, out, 5, work or quant_amx.workspace())
    return out[:, 5:]


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("half", [False, True], ids=["f32-scales", "f16-scales"])
@pytest.mark.parametrize("T", [1, 2, 3, 5, 6, 7, 10, 11, 16, 17, 33])
@pytest.mark.parametrize("limbs", [1, 3])
def test_tile_unit_equals_the_int8_reference(fmt, half, T, limbs):
    rng = np.random.default_rng(T)
    O, K = 40, 160                        # 3 panels, the last half padding; 5 blocks (odd)
    w = QuantMatrix.from_float(rng.standard_normal((O, K)).astype(np.float32), fmt)
    w = w.half_scales() if half else w
    x = rng.standard_normal((T, K)).astype(np.float32)
    x[0, :32] = 0                         # an all-zero block: scale 0
    pm = quant_panel.PanelMatrix(w)
    got = _amx(x, pm, limbs)[:, :O]
    want = quant_i8.quant_linear_i8_reference(x, w.float_scales(), limbs)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    vector = quant_panel.quant_linear_panels(x, pm, limbs)        # the same integer sums
    assert np.abs(got - vector).max() <= 1e-6 * np.abs(vector).max()
    if limbs == 3:                        # three parts: as exact as float32 arithmetic
        exact = x.astype(np.float64) @ w.dequantize().astype(np.float64).T
        assert np.abs(got - exact).max() <= 1e-5 * np.abs(exact).max()


@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("O, K", [(16, 32), (8, 64), (20, 32)])
@pytest.mark.parametrize("T, limbs", [(1, 3), (9, 3), (17, 1)])
def test_fewer_blocks_than_the_loop_keeps_in_flight(fmt, O, K, T, limbs):
    """One, two or three blocks in all (the loop has a block's products, another's stores and a
    third's scaling under way at once): every block still lands, none twice."""
    rng = np.random.default_rng(O + K + T)
    w = QuantMatrix.from_float(rng.standard_normal((O, K)).astype(np.float32), fmt)
    x = rng.standard_normal((T, K)).astype(np.float32)
    pm = quant_panel.PanelMatrix(w)
    want = quant_panel.quant_linear_panels(x, pm, limbs)
    assert np.abs(_amx(x, pm, limbs)[:, :O] - want).max() <= 1e-6 * np.abs(want).max()


def test_a_range_of_panels_and_one_workspace_for_many_shapes():
    """Panels p0..p1-1 land at out's columns c0 on; one workspace serves calls of other row
    counts (the tile shapes reloaded when they change), before and after done()."""
    rng = np.random.default_rng(1)
    w = QuantMatrix.from_float(rng.standard_normal((100, 96)).astype(np.float32), "Q4_1")
    pm = quant_panel.PanelMatrix(w)
    work = quant_amx.workspace()
    for T, limbs in [(9, 3), (4, 3), (20, 1), (9, 3)]:
        x = rng.standard_normal((T, 96)).astype(np.float32)
        want = quant_panel.quant_linear_panels(x, pm, limbs)
        got = _amx(x, pm, limbs, 2, 5, work)
        assert np.abs(got - want[:, 32:80]).max() <= 1e-6 * np.abs(want).max()
        quant_amx.done(work)


def test_a_wrong_part_order_is_caught():
    """The check above can fail: x's parts read as if stored block after block (the layout
    before prepare_x stored them part after part) give other numbers."""
    rng = np.random.default_rng(2)
    w = QuantMatrix.from_float(rng.standard_normal((16, 64)).astype(np.float32), "Q4_1")
    pm = quant_panel.PanelMatrix(w)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    xq, dx, xsum, start = quant_panel.prepare_x(x, False, 3)
    shuffled = np.ascontiguousarray(xq.reshape(3, 3, 2, 32).transpose(0, 2, 1, 3).reshape(3, -1))
    out = np.zeros((3, 16), dtype=np.float32)
    quant_amx.tile((shuffled, dx, xsum, start), pm.qp, pm.d, pm.m, 0, 1, out, 0, quant_amx.workspace())
    want = quant_panel.quant_linear_panels(x, pm, 3)
    assert np.abs(out - want).max() > 1e-3 * np.abs(want).max()


@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("limbs", [1, 3])
def test_the_tile_unit_gives_the_vector_panels_bits_for_one_row(fmt, limbs):
    """Each row as the vector panels give it for that row alone, bit for bit (the same integer
    sums, the same float steps): a step on the tile unit is a step on the panels."""
    rng = np.random.default_rng(4)
    w = QuantMatrix.from_float(rng.standard_normal((40, 96)).astype(np.float32), fmt)
    pm = quant_panel.PanelMatrix(w)
    x = rng.standard_normal((12, 96)).astype(np.float32)
    alone = np.concatenate([quant_panel.quant_linear_panels(x[t:t + 1], pm, limbs) for t in range(12)])
    for T in (4, 9, 12):
        assert np.array_equal(_amx(x[:T], pm, limbs)[:, :40], alone[:T])


def test_the_workspace_starts_on_cache_lines():
    """The ring of unpacked blocks (tile loads, 64-byte vector stores) and the sums (tile stores,
    vector loads): a row that straddles two lines costs two."""
    for _ in range(5):
        cfg, ring, sums = quant_amx.workspace()
        assert ring.ctypes.data % 64 == 0 and sums.ctypes.data % 64 == 0
        assert ring.dtype == np.uint8 and sums.dtype == np.int32
        assert ring.size == quant_amx.AHEAD * 512 and sums.size == quant_amx.LAG * 32 * 16
