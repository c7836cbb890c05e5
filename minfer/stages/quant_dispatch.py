"""Which numba kernel a matmul on quantized weights runs, by weight format, activations and rows.

Outside the one-region step (cpu/formats.py picks its kernels), model.py's loop on the numba
backend calls these: the matvec kernels on the quants for decode and short prompts (float ones,
or the three-int8-part ones of quant_i8.py on a CPU with VNNI, or int8 activations when asked),
dequantized tiles and sgemm from quant.gemm_min_rows tokens on.
"""
from __future__ import annotations

import numpy as np

from .quant import (QuantMatrix, _q4_gate_up, _q4_matmul, _q8_0_gate_up, _q8_0_matmul, _tiled_gemm,
                    gemm_min_rows, split_x)
from .quant_i8 import quant_gate_up_i8, quant_linear_i8


def quant_gate_up_numba(x: np.ndarray, wg: QuantMatrix, wu: QuantMatrix,
                        int8_act: bool = False) -> np.ndarray:
    """silu(x wg^T) * (x wu^T) for fewer than gemm_min_rows tokens, in one fused kernel.
    [T, K] -> [T, F].
    int8_act: x rounded to int8 per block (quant_i8.py, the opt-in variant), any T."""
    if int8_act or split_x():
        return quant_gate_up_i8(x, wg, wu, limbs=1 if int8_act else 3)
    x = np.ascontiguousarray(x, dtype=np.float32)
    wg, wu = wg.float_scales(), wu.float_scales()
    if wg.fmt == "Q8_0":
        return _q8_0_gate_up(x, wg.qs, wg.d, wu.qs, wu.d)
    return _q4_gate_up(x, wg.qs, wg.d, wg.m, wu.qs, wu.d, wu.m)


def quant_linear_numba(x: np.ndarray, w: QuantMatrix, int8_act: bool = False) -> np.ndarray:
    """x [T, K] -> [T, O]: the matvec kernels on the quants for decode and short prompts, tiles +
    sgemm from gemm_min_rows(w.fmt) tokens on.
    int8_act: x rounded to int8 per block (quant_i8.py, the opt-in variant), any T."""
    if int8_act:
        return quant_linear_i8(x, w)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[0] >= gemm_min_rows(w.fmt):
        return _tiled_gemm(x, w)
    if split_x():
        return quant_linear_i8(x, w, limbs=3)
    w = w.float_scales()
    if w.fmt == "Q8_0":
        return _q8_0_matmul(x, w.qs, w.d)
    return _q4_matmul(x, w.qs, w.d, w.m)
