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


# --- Numba CPU path: a row copy per token; quantized rows dequantized as they are copied --------
from llvmlite import ir  # noqa: E402
from numba import float32, int32, njit, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from .simd import bits  # noqa: E402  (float16 scales as uint16 bits: no float16 in numba)

_NO_M = np.zeros((1, 0), dtype=np.float32)       # Q8_0: no mins


def embedding_numba(token_ids, table):
    if isinstance(table, QuantMatrix):
        # one compiled call: the reference's gather is eight NumPy calls, each slow on the caches
        # the step's weights have just flushed
        d, m = bits(table.d), _NO_M if table.m is None else bits(table.m)
        if table.fmt == "Q8_0":
            return _gather_q8_0(token_ids, table.qs, d)
        return _gather_q4(token_ids, table.qs, d, m)
    return _gather_rows(token_ids, table)


@intrinsic
def _widen(typingctx, v):
    """A scale as float32: float16 bits (uint16) widened exactly, a float32 as it is."""
    def codegen(context, builder, sig, args):
        if sig.args[0] == types.uint16:
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return args[0]
    return types.float32(v), codegen


@njit(cache=True)
def _gather_rows(token_ids, table):
    T, D = len(token_ids), table.shape[1]
    out = np.empty((T, D), dtype=np.float32)
    for t in range(T):
        out[t, :] = table[token_ids[t]]
    return out


@njit(cache=True)
def _gather_q8_0(token_ids, qs, d):
    """Q8_0 rows: element k is d[k // 32] * qs[k]."""
    T, D = len(token_ids), qs.shape[1]
    out = np.empty((T, D), dtype=np.float32)
    for t in range(T):
        r = token_ids[t]
        for k in range(D):
            out[t, k] = _widen(d[r, k >> 5]) * float32(qs[r, k])
    return out


@njit(cache=True)
def _gather_q4(token_ids, qs, d, m):
    """Q4_0 / Q4_1 rows: element k of a block is d q + m, q the low nibble of byte k (k < 16) or
    the high nibble of byte k - 16 of the block's 16 bytes."""
    T, D = len(token_ids), 2 * qs.shape[1]
    out = np.empty((T, D), dtype=np.float32)
    for t in range(T):
        r = token_ids[t]
        for k in range(D):
            b = qs[r, 16 * (k >> 5) + (k & 15)]
            q = int32(b & 15) if (k & 31) < 16 else int32(b >> 4)
            out[t, k] = _widen(d[r, k >> 5]) * float32(q) + _widen(m[r, k >> 5])
    return out


# ---------------------------------------------------------------------------------------------
# numba.cuda GPU path: the table stays on the device in its own format (a DeviceMatrix, see
# gpu/linear.py: the tied LM head reads the very same arrays) and rows are dequantized
# as they are copied.
#   grid (T,)  block (threads,) — block t copies the row of token t; thread j does columns
#   j, j + threads, ...  Q8_0: column k is byte k % 4 of word k // 4. Q4: column k is byte
#   i = 16 (k // 32) + k % 16 (low nibble for k % 32 < 16, else high) of the row's bytes.
# ---------------------------------------------------------------------------------------------
from numba import float32, int32, uint32  # noqa: E402

from .device import F32, Q8_0, DeviceMatrix  # noqa: E402
from .lazy_cuda import cuda  # noqa: E402  (numba.cuda, imported when a kernel is first used)


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
