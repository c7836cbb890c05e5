"""Quantized weight blocks, as GGUF stores them.

A quantized matrix is stored row by row ([out, in], row-major); each row is cut into blocks of 32
consecutive weights along `in`, and each block carries its own float16 scale:

    Q8_0  34 bytes: d (f16), q[32] (int8)              w = d * q
    Q4_0  18 bytes: d (f16), 16 bytes of nibbles        w = d * (q - 8),  q in 0..15
    Q4_1  20 bytes: d (f16), m (f16), 16 bytes nibbles  w = d * q + m,    q in 0..15

In the 4-bit formats byte j holds element j in its low nibble and element j + 16 in its high one.
This module is the NumPy reference: it turns blocks into float32. The kernels that compute on the
blocks directly come with the quantized-matmul stage.
"""
from __future__ import annotations

import numpy as np

from ..errors import ModelFormatError

QK = 32  # weights per block

# numpy views of one block: reading a buffer of blocks as a structured array costs nothing.
BLOCK_DTYPES = {
    "Q8_0": np.dtype([("d", "<f2"), ("qs", "i1", (QK,))]),
    "Q4_0": np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))]),
    "Q4_1": np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (QK // 2,))]),
}


def block_bytes(fmt: str) -> int:
    return BLOCK_DTYPES[fmt].itemsize


def _blocks(raw: np.ndarray, fmt: str, n_elements: int) -> np.ndarray:
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if n_elements % QK:
        raise ModelFormatError(f"{fmt} tensor has {n_elements} elements, not a multiple of {QK}")
    want = n_elements // QK * block_bytes(fmt)
    if raw.size != want:
        raise ModelFormatError(
            f"{fmt} buffer holds {raw.size} bytes, expected {want} for {n_elements} weights")
    return raw.view(BLOCK_DTYPES[fmt])                             # [n_blocks]


def unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """[n_blocks, 16] bytes -> [n_blocks, 32] values 0..15 (low nibbles first, then high)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)          # [n_blocks, 32]


def dequantize(raw: np.ndarray, fmt: str, shape: tuple[int, ...]) -> np.ndarray:
    """Blocks of format `fmt` -> float32 array of `shape` (row-major, blocks along the last axis)."""
    n = int(np.prod(shape))
    b = _blocks(raw, fmt, n)
    d = b["d"].astype(np.float32)[:, None]                        # [n_blocks, 1]
    if fmt == "Q8_0":
        w = d * b["qs"].astype(np.float32)                        # [n_blocks, 32]
    elif fmt == "Q4_0":
        w = d * (unpack_nibbles(b["qs"]).astype(np.float32) - 8.0)
    elif fmt == "Q4_1":
        m = b["m"].astype(np.float32)[:, None]
        w = d * unpack_nibbles(b["qs"]).astype(np.float32) + m
    else:
        raise ModelFormatError(f"unknown block format {fmt!r}")
    return w.reshape(shape)
