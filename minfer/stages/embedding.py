"""Stage 1 — token embedding: token ids -> vectors of the residual stream.

The embedding table E has one row per vocabulary entry; embedding a token is reading its row.
SmolLM2 ties E to the LM head, so the same matrix is read again at the end to score every token.
"""
import numpy as np

from .quant import QuantMatrix, quant_embedding


def embedding(token_ids: np.ndarray, table) -> np.ndarray:
    """token_ids [T] int, table [V, D] -> x [T, D] float32."""
    if isinstance(table, QuantMatrix):                             # e.g. SmolLM2's Q8_0 table
        return quant_embedding(token_ids, table)
    return np.asarray(table[token_ids], dtype=np.float32)          # [T, D]


# --- Numba CPU path: a row copy per token -----------------------------------------------------
from numba import njit  # noqa: E402


def embedding_numba(token_ids, table):
    if isinstance(table, QuantMatrix):   # a few rows: the reference gather is as fast
        return quant_embedding(token_ids, table)
    return _gather_rows(token_ids, table)


@njit(cache=True)
def _gather_rows(token_ids, table):
    T, D = len(token_ids), table.shape[1]
    out = np.empty((T, D), dtype=np.float32)
    for t in range(T):
        out[t, :] = table[token_ids[t]]
    return out


# ---------------------------------------------------------------------------------------------
# numba.cuda GPU path: the table stays on the device in its own format (a DeviceMatrix, see
# stages/linear_cuda.py: the tied LM head reads the very same arrays) and rows are dequantized
# as they are copied.
#   grid (T,)  block (threads,) — block t copies the row of token t; thread j does columns
#   j, j + threads, ...  Q8_0: column k is byte k % 4 of word k // 4. Q4: column k is byte
#   i = 16 (k // 32) + k % 16 (low nibble for k % 32 < 16, else high) of the row's bytes.
# ---------------------------------------------------------------------------------------------
from numba import cuda, float32, int32, uint32  # noqa: E402

from .linear_cuda import F32, Q8_0, DeviceMatrix  # noqa: E402


@cuda.jit
def embedding_kernel(token_ids, fmt, w, qs, d, m, out):
    t = cuda.blockIdx.x
    row = token_ids[t]
    for k in range(cuda.threadIdx.x, out.shape[1], cuda.blockDim.x):
        if fmt == F32:
            out[t, k] = w[row, k]
        elif fmt == Q8_0:
            b = int32((qs[row, k >> 2] >> uint32(8 * (k & 3))) & uint32(255))
            if b > 127:
                b -= 256
            out[t, k] = d[row, k >> 5] * float32(b)
        else:
            i = 16 * (k >> 5) + (k & 15)
            byte = (qs[row, i >> 2] >> uint32(8 * (i & 3))) & uint32(255)
            q = byte & uint32(15) if (k & 31) < 16 else byte >> uint32(4)
            out[t, k] = d[row, k >> 5] * float32(int32(q)) + m[row, k >> 5]


def embedding_cuda(token_ids, table: DeviceMatrix, out, threads=128, stream=0):
    """token_ids: device int32 [>= T]; out: device float32 [T, D] (T = out.shape[0])."""
    embedding_kernel[out.shape[0], threads, stream](token_ids, *table.arrays, out)
