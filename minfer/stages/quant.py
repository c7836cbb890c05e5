"""Quantized weight blocks, as GGUF stores them.

A quantized matrix is stored row by row ([out, in], row-major); each row is cut into blocks of 32
consecutive weights along `in`, and each block carries its own float16 scale:

    Q8_0  34 bytes: d (f16), q[32] (int8)              w = d * q
    Q4_0  18 bytes: d (f16), 16 bytes of nibbles        w = d * (q - 8),  q in 0..15
    Q4_1  20 bytes: d (f16), m (f16), 16 bytes nibbles  w = d * q + m,    q in 0..15

In the 4-bit formats byte j holds element j in its low nibble and element j + 16 in its high one.

This page has four parts: the block formats (quantize / dequantize, bit-exact with llama.cpp's
reference), `QuantMatrix` (a quantized weight as the kernels want it: quants in one plain array,
scales widened to float32 in another), the NumPy reference of the quantized linear layer
(dequantize, then matmul) and the Numba kernels that compute on the quants directly.
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


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C's roundf: halves go away from zero. np.rint rounds to the nearest with halves to even,
    so only exact halves (v - rint(v) = +-0.5, exact in float32 for |v| < 2^22; here |v| <= 127)
    need moving. (floor-based formulas were much slower, at every load of --quant q8_0.)"""
    r = np.rint(v)
    half = np.abs(v - r) == np.float32(0.5)
    r[half] = v[half] + np.copysign(np.float32(0.5), v[half])
    return r


def quantize(w: np.ndarray, fmt: str) -> np.ndarray:
    """float32 [..., K] -> the raw GGUF block bytes (uint8 [..., K // 32 * block_bytes])."""
    w = np.asarray(w, dtype=np.float32)
    if w.shape[-1] % QK:
        raise ModelFormatError(f"cannot quantize rows of {w.shape[-1]} weights into blocks of {QK}")
    x = w.reshape(-1, QK)                                          # [n_blocks, 32]
    out = np.zeros(len(x), dtype=BLOCK_DTYPES[fmt])
    with np.errstate(divide="ignore", invalid="ignore"):
        if fmt == "Q8_0":
            d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)        # [n_blocks, 1]
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            out["qs"] = _round_half_away(x * inv).astype(np.int8)
        elif fmt == "Q4_0":
            # the scale carries the sign of the largest-magnitude weight, which maps to q = 0
            big = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
            d = big / np.float32(-8)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            q = np.trunc(x * inv + np.float32(8.5)).astype(np.uint8).clip(0, 15)
            out["qs"] = q[:, :16] | (q[:, 16:] << np.uint8(4))
        elif fmt == "Q4_1":
            lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
            d = (hi - lo) / np.float32(15)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            q = np.trunc((x - lo) * inv + np.float32(0.5)).astype(np.uint8).clip(0, 15)
            out["qs"] = q[:, :16] | (q[:, 16:] << np.uint8(4))
            out["m"] = lo[:, 0].astype(np.float16)
        else:
            raise ModelFormatError(f"unknown block format {fmt!r}")
    out["d"] = d[:, 0].astype(np.float16)
    return out.view(np.uint8).reshape(*w.shape[:-1], -1)


# ---------------------------------------------------------------------------------------------
# QuantMatrix: a quantized [O, K] weight, repacked once at load for the kernels.
#   Q8_0: qs int8 [O, K]            w[o, k] = d[o, k // 32] * qs[o, k]
#   Q4_*: qs uint8 [O, K // 2]      byte i of a row: low nibble -> element 32*(i//16) + i%16,
#                                   high nibble -> the element 16 further on (GGUF's own order)
#         w = d * q + m             (Q4_0 is the case m = -8 d)
# Scales are widened to float32 (numba's CPU target has no float16 type); half_scales() keeps
# them in float16 for the int8-part kernels (quant_i8.py), which widen them in registers, and
# float_scales() widens them back where a float kernel or a prefill tile needs them.
# The quants are the file's own bytes, so the kernels compute exactly the function the file
# describes.
# ---------------------------------------------------------------------------------------------
class QuantMatrix:
    def __init__(self, raw: np.ndarray, fmt: str, shape: tuple[int, int]):
        O, K = shape
        b = _blocks(raw, fmt, O * K).reshape(O, K // QK)             # [O, nb] block records
        self.fmt, self.shape = fmt, (O, K)
        self.d = b["d"].astype(np.float32)                          # [O, nb]
        if fmt == "Q8_0":
            self.qs = np.ascontiguousarray(b["qs"]).reshape(O, K)    # [O, K] int8
            self.m = None
        else:
            self.qs = np.ascontiguousarray(b["qs"]).reshape(O, K // 2)  # [O, K/2] uint8
            self.m = b["m"].astype(np.float32) if fmt == "Q4_1" else np.float32(-8) * self.d

    @classmethod
    def from_float(cls, w: np.ndarray, fmt: str) -> "QuantMatrix":
        return cls(quantize(w, fmt), fmt, w.shape)

    @classmethod
    def _from_parts(cls, fmt, qs, d, m, K) -> "QuantMatrix":
        self = cls.__new__(cls)
        self.fmt, self.qs, self.d, self.m, self.shape = fmt, qs, d, m, (qs.shape[0], K)
        return self

    @classmethod
    def stack(cls, mats: list["QuantMatrix"]) -> "QuantMatrix":
        """Rows of several matrices (same format and K) one after another: [sum O_i, K]."""
        a = mats[0]
        m = None if a.m is None else np.concatenate([x.m for x in mats])
        return cls._from_parts(a.fmt, np.concatenate([x.qs for x in mats]),
                               np.concatenate([x.d for x in mats]), m, a.shape[1])

    def rows(self, r0: int, r1: int) -> "QuantMatrix":
        """A view of rows r0..r1-1 (no copy)."""
        return QuantMatrix._from_parts(self.fmt, self.qs[r0:r1], self.d[r0:r1],
                                       None if self.m is None else self.m[r0:r1], self.shape[1])

    @property
    def nbytes(self) -> int:
        return self.qs.nbytes + self.d.nbytes + (self.m.nbytes if self.m is not None else 0)

    def dequantize(self) -> np.ndarray:
        O, K = self.shape
        nb = K // QK
        d = self.d.astype(np.float32)[:, :, None]          # [O, nb, 1] (float16 with int8 activations)
        if self.fmt == "Q8_0":
            q = self.qs.reshape(O, nb, QK).astype(np.float32)                  # [O, nb, 32]
            return (q * d).reshape(O, K)
        q = unpack_nibbles(self.qs.reshape(O * nb, QK // 2)).reshape(O, nb, QK)  # [O, nb, 32]
        return (q.astype(np.float32) * d + self.m.astype(np.float32)[:, :, None]).reshape(O, K)

    def float_scales(self) -> "QuantMatrix":
        """self, or (with float16 scales) a copy of its scales widened for the float kernels."""
        if self.d.dtype == np.float32:
            return self
        return QuantMatrix._from_parts(self.fmt, self.qs, self.d.astype(np.float32),
                                       None if self.m is None else self.m.astype(np.float32),
                                       self.shape[1])

    def half_scales(self) -> "QuantMatrix":
        """The same matrix with its scales (and Q4 mins) in float16, as the file stores them
        (exact: they came from float16). For the int8-activation kernels, which widen them in
        registers: 2 bytes a block instead of 4, and decode streams every byte each token."""
        return QuantMatrix._from_parts(self.fmt, self.qs, self.d.astype(np.float16),
                                       None if self.m is None else self.m.astype(np.float16),
                                       self.shape[1])


def quant_linear(x: np.ndarray, w: QuantMatrix) -> np.ndarray:
    """Reference: x [T, K] @ dequantize(w)^T -> [T, O]."""
    return x @ w.dequantize().T


def quant_embedding(token_ids: np.ndarray, w: QuantMatrix) -> np.ndarray:
    """Rows of a quantized embedding table, dequantized: [T] -> [T, D]."""
    O, K = w.shape
    nb = K // QK
    d = w.d[token_ids].astype(np.float32)[:, :, None]                           # [T, nb, 1]
    if w.fmt == "Q8_0":
        q = w.qs[token_ids].reshape(-1, nb, QK).astype(np.float32)
        return (q * d).reshape(-1, K)
    q = unpack_nibbles(w.qs[token_ids].reshape(-1, QK // 2)).reshape(-1, nb, QK)
    return (q.astype(np.float32) * d + w.m[token_ids].astype(np.float32)[:, :, None]).reshape(-1, K)


# ---------------------------------------------------------------------------------------------
# Numba kernels on the quants. One flat loop over each row (the nibble order is untouched), with
# the block scale looked up per element: the weights are never expanded to float in memory.
# For Q4, x is split once per call into the elements that meet low nibbles (xl) and high ones
# (xh, folded into xh2 below), and the "+ m" term is factored out of the dot product:
#     sum_k (d q_k + m) x_k  =  sum_k d q_k x_k  +  sum_blocks m_b * (sum of x over block b)
# ---------------------------------------------------------------------------------------------
from numba import njit, prange, float32  # noqa: E402

from .fastexp import exp32  # noqa: E402  (silu's exp, in plain arithmetic)


def split_for_q4(x: np.ndarray):
    """x [T, K] -> xl [T, K/2] (the elements under low nibbles), xh2 = xh - 16 xl [T, K/2]
    (xh: those under high nibbles; see _q4_dot), xsum [T, K/32] (sum of x over each block)."""
    T, K = x.shape
    xb = x.reshape(T, K // QK, 2, QK // 2)                              # [T, nb, 2, 16]
    xl = np.ascontiguousarray(xb[:, :, 0, :]).reshape(T, K // 2)
    xh = xb[:, :, 1, :].reshape(T, K // 2)
    return xl, xh - np.float32(16) * xl, xb.sum(axis=(2, 3), dtype=np.float32)


@njit(fastmath=True, cache=True)
def _split_q4(x):
    """split_for_q4 as loops, so that the kernels do it themselves (no NumPy calls per matvec)."""
    T, K = x.shape
    xl = np.empty((T, K // 2), dtype=np.float32)
    xh2 = np.empty((T, K // 2), dtype=np.float32)
    xsum = np.zeros((T, K // QK), dtype=np.float32)
    for t in range(T):
        for i in range(K // 2):
            lo, hi = x[t, (i >> 4) * QK + (i & 15)], x[t, (i >> 4) * QK + (i & 15) + 16]
            xl[t, i] = lo
            xh2[t, i] = hi - float32(16) * lo
            xsum[t, i >> 4] += lo + hi
    return xl, xh2, xsum



@njit(inline="always", fastmath=True)
def _q8_0_dot(x, qs, d, o, t):
    """Row o of a Q8_0 matrix . token t of x."""
    acc = float32(0.0)
    for k in range(qs.shape[1]):
        acc += d[o, k >> 5] * float32(qs[o, k]) * x[t, k]
    return acc


@njit(inline="always", fastmath=True)
def _q4_dot(xl, xh2, xsum, qs, d, m, o, t):
    """Row o of a Q4 matrix . token t of x (split by split_for_q4).

    A byte b holds lo = b mod 16 and hi = b // 16, so lo*xl + hi*xh = b*xl + hi*(xh - 16 xl) = b*xl + hi*xh2.
    Unpacking with float arithmetic (floor(b / 16)) keeps every lane 32 bits wide: integer nibble
    masks make LLVM widen to 64-bit lanes, half as many per vector (measured: slower)."""
    acc = float32(0.0)
    for i in range(qs.shape[1]):
        b = float32(qs[o, i])
        hi = np.floor(b * float32(0.0625))
        acc += d[o, i >> 4] * (b * xl[t, i] + hi * xh2[t, i])
    for j in range(d.shape[1]):
        acc += m[o, j] * xsum[t, j]
    return acc


@njit(parallel=True, fastmath=True, cache=True)
def _q8_0_matmul(x, qs, d):
    T, O = x.shape[0], qs.shape[0]
    out = np.empty((T, O), dtype=np.float32)
    for o in prange(O):                       # threads split the rows: each streams its own
        for t in range(T):
            out[t, o] = _q8_0_dot(x, qs, d, o, t)
    return out


@njit(parallel=True, fastmath=True, cache=True)
def _q4_matmul(x, qs, d, m):
    xl, xh2, xsum = _split_q4(x)              # in here, not in NumPy: fewer temporaries a call
    T, O = xl.shape[0], qs.shape[0]
    out = np.empty((T, O), dtype=np.float32)
    for o in prange(O):
        for t in range(T):
            out[t, o] = _q4_dot(xl, xh2, xsum, qs, d, m, o, t)
    return out


# The MLP's gate and up projections read the same input: one pass computes both rows and applies
# silu(gate) * up on the spot (one parallel region instead of three, no [T, F] temporaries).
@njit(parallel=True, fastmath=True, cache=True)
def _q8_0_gate_up(x, qg, dg, qu, du):
    T, F = x.shape[0], qg.shape[0]
    out = np.empty((T, F), dtype=np.float32)
    for o in prange(F):
        for t in range(T):
            out[t, o] = _q8_0_gate_up_dot(x, qg, dg, qu, du, o, t)
    return out


@njit(parallel=True, fastmath=True, cache=True)
def _q4_gate_up(x, qg, dg, mg, qu, du, mu):
    xl, xh2, xsum = _split_q4(x)
    T, F = xl.shape[0], qg.shape[0]
    out = np.empty((T, F), dtype=np.float32)
    for o in prange(F):
        for t in range(T):
            out[t, o] = _q4_gate_up_dot(xl, xh2, xsum, qg, dg, mg, qu, du, mu, o, t)
    return out


@njit(inline="always", fastmath=True)
def _q8_0_gate_up_dot(x, qg, dg, qu, du, o, t):
    """silu(row o of gate . token t) * (row o of up . token t)."""
    g = _q8_0_dot(x, qg, dg, o, t)
    return g / (float32(1.0) + exp32(-g)) * _q8_0_dot(x, qu, du, o, t)


@njit(inline="always", fastmath=True)
def _q4_gate_up_dot(xl, xh2, xsum, qg, dg, mg, qu, du, mu, o, t):
    g = _q4_dot(xl, xh2, xsum, qg, dg, mg, o, t)
    return g / (float32(1.0) + exp32(-g)) * _q4_dot(xl, xh2, xsum, qu, du, mu, o, t)


# The same rows a thread's share at a time, for cpu/region.py (a whole step in one parallel region):
# out[:, o0:o1] = rows o0..o1-1 of W . every token of x.
@njit(inline="always", fastmath=True)
def _q8_0_rows(x, qs, d, o0, o1, out):
    for o in range(o0, o1):
        for t in range(x.shape[0]):
            out[t, o] = _q8_0_dot(x, qs, d, o, t)


@njit(inline="always", fastmath=True)
def _q4_rows(xl, xh2, xsum, qs, d, m, o0, o1, out):
    for o in range(o0, o1):
        for t in range(xl.shape[0]):
            out[t, o] = _q4_dot(xl, xh2, xsum, qs, d, m, o, t)


@njit(inline="always", fastmath=True)
def _q8_0_gate_up_rows(x, qg, dg, qu, du, o0, o1, out):
    for o in range(o0, o1):
        for t in range(x.shape[0]):
            out[t, o] = _q8_0_gate_up_dot(x, qg, dg, qu, du, o, t)


@njit(inline="always", fastmath=True)
def _q4_gate_up_rows(xl, xh2, xsum, qg, dg, mg, qu, du, mu, o0, o1, out):
    for o in range(o0, o1):
        for t in range(xl.shape[0]):
            out[t, o] = _q4_gate_up_dot(xl, xh2, xsum, qg, dg, mg, qu, du, mu, o, t)


# Prefill and big batches: many tokens share every weight, so the work is compute-bound, not
# memory-bound. There it pays to dequantize a tile of rows once into float32 and hand the tile to
# BLAS's sgemm, whose register-blocked kernels beat a straightforward @njit loop by far. The tiles
# are shared out to Python threads (sgemm and the nogil dequantizer release the GIL), each with a
# single-threaded BLAS: two thread pools spinning on the same cores (numba's and OpenBLAS's) were
# measured much slower.
#
# But dequantizing every weight costs the same for 16 tokens as for 256, while the matvec kernels
# cost the same per token at any T (the tokens share each row while it is in cache): from how many
# tokens on the tiles take over is a measured crossover (quant_dispatch.KernelConfig).
_pool = None


def run_tiles(n_rows: int, job, tile_rows: int) -> None:
    """Call job(r0, r1) for consecutive row ranges of at most tile_rows, on as many threads as
    numba uses."""
    global _pool
    import numba
    from concurrent.futures import ThreadPoolExecutor
    n = numba.get_num_threads()
    ranges = [(r0, min(r0 + tile_rows, n_rows)) for r0 in range(0, n_rows, tile_rows)]
    if n == 1 or len(ranges) == 1:
        for r in ranges:
            job(*r)
        return
    if _pool is None or _pool._max_workers != n:
        _pool = ThreadPoolExecutor(n, thread_name_prefix="minfer-gemm")
    for f in [_pool.submit(job, *r) for r in ranges]:
        f.result()


@njit(nogil=True, cache=True)
def _dequant_tile_q4(qs, d, m, r0, out):
    R, H = out.shape[0], qs.shape[1]
    for r in range(R):
        o = r0 + r
        for i in range(H):
            b, blk = qs[o, i], i >> 4
            k = (blk << 5) + (i & 15)
            out[r, k] = d[o, blk] * float32(b & 15) + m[o, blk]
            out[r, k + 16] = d[o, blk] * float32(b >> 4) + m[o, blk]


@njit(nogil=True, cache=True)
def _dequant_tile_q8(qs, d, r0, out):
    R, K = out.shape
    for r in range(R):
        o = r0 + r
        for k in range(K):
            out[r, k] = d[o, k >> 5] * float32(qs[o, k])


def _tiled_gemm(x: np.ndarray, w: QuantMatrix, tile_rows: int) -> np.ndarray:
    O, K = w.shape
    out = np.empty((x.shape[0], O), dtype=np.float32)

    def job(r0, r1):
        tile = np.empty((r1 - r0, K), dtype=np.float32)
        d = w.d[r0:r1].astype(np.float32, copy=False)                   # float16 scales: widened
        if w.fmt == "Q8_0":
            _dequant_tile_q8(w.qs[r0:r1], d, 0, tile)
        else:
            _dequant_tile_q4(w.qs[r0:r1], d, w.m[r0:r1].astype(np.float32, copy=False), 0, tile)
        out[:, r0:r1] = x @ tile.T                                      # [T, tile] by sgemm
    run_tiles(O, job, tile_rows)
    return out


# ---------------------------------------------------------------------------------------------
# numba.cuda GPU path: gpu/linear.py reads these same blocks (Q8_0/Q4_0/Q4_1 quants and
# float32 scales) and dequantizes them in registers inside its fused matmul kernels.
# ---------------------------------------------------------------------------------------------
