"""Which numba kernel a matmul on quantized weights runs, by weight format, activations and rows.

Outside the one-region step (cpu/formats.py picks its kernels), model.py's loop on the numba
backend calls these: the matvec kernels on the quants for decode and short prompts (float ones,
or the three-int8-part ones of quant_i8.py on a CPU with VNNI, or int8 activations when asked),
dequantized tiles and sgemm from KernelConfig.sgemm_min_rows(fmt) tokens on.

KernelConfig holds those choices, and the one-region step's (cpu/model.py), as one explicit
value: the op table (backends.numba_ops) and the model (cpu/model.CpuModel) are built with one,
KernelConfig() being this CPU's. Tests and tools build others (the float kernels on a VNNI CPU,
tiles from fewer rows) rather than change anything shared.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import numpy as np

from .quant import QuantMatrix, _q4_gate_up, _q4_matmul, _q8_0_gate_up, _q8_0_matmul, _tiled_gemm
from .quant_i8 import quant_gate_up_i8, quant_linear_i8


def _panels_win() -> bool:
    """Do the three-part panels beat the float tiles at every row count of the one-region step?
    Where the tile unit does their byte products, or where the vector unit does a byte dot product
    as often as a float multiply-add (docs/benchmarks.md, "Many rows a step")."""
    from .simd import has_amx, vnni_at_fma_rate
    return has_amx() or vnni_at_fma_rate()


def _host_many_rows() -> tuple:
    return (2, 2, 1 << 30, 1 << 30 if _panels_win() else 96)


def _host_region_max_rows() -> int:
    return 2048 if _panels_win() else 384


def _host_tile_unit_rows() -> tuple:
    from .simd import has_amx
    never = 1 << 30
    return (never, never, 8, 4) if has_amx() else (never,) * 4


@cache
def _host_has_vnni() -> bool:
    from .simd import has_vnni
    return has_vnni()


@dataclass(frozen=True)
class KernelConfig:
    """Which numba kernels run where. The defaults are the measured choices for this CPU
    (docs/benchmarks.md has the figures); the VNNI check runs once, when the first is built."""

    # Fewer than sgemm_min_rows tokens, on a CPU with AVX-512 VNNI: x split into three int8 parts
    # per block (quant_i8.py, "Three parts") — as exact as float32 (~1e-6 relative error against
    # float64, like the float kernels), on the byte dot-product instruction, reading the file's
    # float16 scales (weights.load keeps them). The Q4 float kernels spend ~7 vector instructions
    # per 32 weights turning nibbles into floats, and the split is faster. For Q8_0 the float
    # kernel held its own at decode until the split kernels sent the rows they prefetch to L2
    # rather than L1 (quant_i8._prefetch_l2), and its weights are smaller with float16 scales.
    # Q8_0 prompts gained from the split too (4 rows x 2 tokens a step, quant_i8._rows_pair_q8),
    # and the LM head (one 49,152-row matrix). False: the float kernels everywhere.
    split_x: bool = field(default_factory=_host_has_vnni)

    # From how many tokens on model.run_layers' matmuls dequantize tiles of rows and hand them to
    # sgemm (quant._tiled_gemm): dequantizing costs the same for 16 tokens as for 256, the matvec
    # kernels the same per token at any T. With the float kernels from gemm_min_rows on; later
    # for the int8-part kernels (quant_i8.py), which take a prompt's tokens in pairs (one-process
    # A/B of whole prefills). These are the per-matmul routes of model.run_layers; the
    # one-region step has its own (many_rows, region_max_rows).
    gemm_min_rows: int = 48
    split_gemm_min_rows: int = 224
    q8_split_gemm_min_rows: int = 112
    tile_rows: int = 256                 # rows of weights dequantized at a time, one tile a thread
    # From how many tokens on a matmul on float32 weights (--quant f32) goes to sgemm on tiles of
    # rows (a thread each); below it, stages/linear._dense_tiles (4 rows x 4 tokens a tile), which
    # beat sgemm at every prompt length measured, up to 256 tokens (docs/benchmarks.md).
    dense_gemm_min_rows: int = 1 << 30

    # From how many rows of x on the one-region step (cpu/region.py) decodes each weight row once
    # for all of them into floats (cpu/quant_gemm.py), by kernel kind: cpu/formats.py's Q4, Q8
    # (float kernels), INT8 (int8 activations), SPLIT (float32 x in three int8 parts). Below it,
    # the float kinds run their matvec kernels and the int8-part kinds the panels
    # (cpu/quant_panel.py), whose byte dot products beat the float tiles up to about 96 rows on
    # Intel's vector unit — and at every row count of the region where the tile unit does them,
    # or where a byte dot product costs what a float multiply-add does (AMD Zen 4: never,
    # 1 << 30; _panels_win).
    # INT8 never: the tiles multiply exact floats, and int8 activations are a rounding of their
    # own that the step keeps at any batch size.
    many_rows: tuple = field(default_factory=_host_many_rows)
    # From how many rows on the panels' byte products go to the CPU's tile unit (AMX,
    # cpu/quant_amx.py), by kind as above; never where the CPU has none. The tile unit does a
    # block's products for up to 16 rows (token, part) in one instruction, but each block's sums
    # go through memory: it wins once a step has rows enough to fill its tiles (whole forwards,
    # both in turns: docs/benchmarks.md, "CPU kernel details").
    tile_unit_rows: tuple = field(default_factory=_host_tile_unit_rows)
    # And from how many rows on a step leaves the one-region step for model.run_layers, whose
    # matmuls go to the sgemm tiles (BLAS's kernels pull ahead on long prompts) — much later
    # where the panels win (level at 2,048 tokens on the tile unit; docs/benchmarks.md).
    region_max_rows: int = field(default_factory=_host_region_max_rows)
    # From how many rows of one sequence on (a tile: tokens to verify, a prompt's chunk) the
    # step's attention puts 16 query vectors side by side in a vector (stages/attention.py, "rows
    # in lanes"): whole forwards of 3 tokens were level or slower that way (9 of 16 lanes busy), of
    # 4 faster, of 9 ~1.1-1.2x faster (docs/benchmarks.md, "Attention, rows in lanes").
    attention_lane_rows: int = 4
    # From how many logits rows on a step whose rows are all greedy (tokens to verify, a batch)
    # finds each row's arg-max with most of the LM head on int8 x (cpu/greedy_head.py; x in three
    # int8 parts only): at 2 to 4 rows whole forwards were level or a little slower, from 9 on
    # faster (docs/benchmarks.md, "Greedy steps: the LM head's arg-max").
    argmax_head_rows: int = 8

    def sgemm_min_rows(self, fmt: str) -> int:
        """From how many tokens on a matmul of float32 x on weights of this block format goes to
        the sgemm tiles."""
        if not self.split_x:
            return self.gemm_min_rows
        return self.q8_split_gemm_min_rows if fmt == "Q8_0" else self.split_gemm_min_rows


def quant_gate_up_numba(x: np.ndarray, wg: QuantMatrix, wu: QuantMatrix, int8_act: bool = False,
                        kernels: KernelConfig | None = None) -> np.ndarray:
    """silu(x wg^T) * (x wu^T) for fewer than sgemm_min_rows tokens, in one fused kernel.
    [T, K] -> [T, F].
    int8_act: x rounded to int8 per block (quant_i8.py, the opt-in variant), any T.
    kernels: which kernels (KernelConfig; default: this CPU's)."""
    if int8_act or (kernels or KernelConfig()).split_x:
        return quant_gate_up_i8(x, wg, wu, limbs=1 if int8_act else 3)
    x = np.ascontiguousarray(x, dtype=np.float32)
    wg, wu = wg.float_scales(), wu.float_scales()
    if wg.fmt == "Q8_0":
        return _q8_0_gate_up(x, wg.qs, wg.d, wu.qs, wu.d)
    return _q4_gate_up(x, wg.qs, wg.d, wg.m, wu.qs, wu.d, wu.m)


def quant_linear_numba(x: np.ndarray, w: QuantMatrix, int8_act: bool = False,
                       kernels: KernelConfig | None = None) -> np.ndarray:
    """x [T, K] -> [T, O]: the matvec kernels on the quants for decode and short prompts, tiles +
    sgemm from kernels.sgemm_min_rows(w.fmt) tokens on.
    int8_act: x rounded to int8 per block (quant_i8.py, the opt-in variant), any T.
    kernels: which kernels (KernelConfig; default: this CPU's)."""
    if int8_act:
        return quant_linear_i8(x, w)
    kernels = kernels or KernelConfig()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[0] >= kernels.sgemm_min_rows(w.fmt):
        return _tiled_gemm(x, w, kernels.tile_rows)
    if kernels.split_x:
        return quant_linear_i8(x, w, limbs=3)
    w = w.float_scales()
    if w.fmt == "Q8_0":
        return _q8_0_matmul(x, w.qs, w.d)
    return _q4_matmul(x, w.qs, w.d, w.m)
