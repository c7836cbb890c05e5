"""Stage — linear layers (no bias in Llama): y = x W^T.

Weights are stored as in the file: W is [out, in], row-major, so each output is a dot product
with one contiguous row. The reference simply calls BLAS. W may also be a quantized matrix
(quant.QuantMatrix); then the quantized stage does the work.
"""
import numpy as np

from .quant import QuantMatrix, quant_linear, run_tiles
from .quant_dispatch import KernelConfig, quant_linear_numba


def linear(x: np.ndarray, w) -> np.ndarray:
    """x [T, in], w [out, in] -> [T, out]."""
    if isinstance(w, QuantMatrix):
        return quant_linear(x, w)
    return x @ w.T                                                  # [T, out]


def qkv(x: np.ndarray, wq, wk, wv, wqkv=None):
    """The query, key and value projections of the same input: three linear layers.
    (wqkv, the three stacked, is what the fast paths use; the reference ignores it.)"""
    return linear(x, wq), linear(x, wk), linear(x, wv)             # [T, Hq*hd], [T, Hkv*hd] x 2


def stack_rows(ws: list):
    """Stack matrices of one kind along their output rows, and return (stacked, row views of it):
    the fast paths then run one matmul instead of three, the reference keeps its three names."""
    if isinstance(ws[0], QuantMatrix):
        if not all(isinstance(w, QuantMatrix) and w.fmt == ws[0].fmt for w in ws):
            return None, ws
        big = QuantMatrix.stack(ws)
        view = big.rows
    else:
        if not all(isinstance(w, np.ndarray) for w in ws):
            return None, ws
        big = np.concatenate(ws)
        view = lambda a, b: big[a:b]                                # noqa: E731
    edges = np.cumsum([0] + [w.shape[0] for w in ws])
    return big, [view(edges[i], edges[i + 1]) for i in range(len(ws))]


# ---------------------------------------------------------------------------------------------
# Numba CPU path. Decoding reads every weight once per token, so a matvec is bound by memory
# bandwidth: the only thing that matters is streaming W's rows once, in order, on all cores.
# Each output row is one flat dot product over K (contiguous: LLVM vectorises it). For several
# tokens (prefill, batches) the same row is reused for every token while it sits in L1.
# ---------------------------------------------------------------------------------------------
from numba import njit, prange, float32  # noqa: E402

from .simd import _mac4, _prefetch_l2, _put_sums, _zeros  # noqa: E402


def linear_numba(x: np.ndarray, w, int8_act: bool = False,
                 kernels: KernelConfig | None = None) -> np.ndarray:
    """int8_act: on quantized weights, round x to int8 per block (quant_i8.py; opt-in).
    kernels: which kernels (quant_dispatch.KernelConfig; default: this CPU's)."""
    if isinstance(w, QuantMatrix):
        return quant_linear_numba(x, w, int8_act, kernels)
    kernels = kernels or KernelConfig()
    if x.shape[0] >= kernels.dense_gemm_min_rows:
        # many tokens: compute-bound, and BLAS's sgemm pulls ahead; row tiles go to threads, as
        # for quantized weights (quant.run_tiles)
        out = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)

        def job(r0, r1):
            out[:, r0:r1] = x @ w[r0:r1].T
        run_tiles(w.shape[0], job, kernels.tile_rows)
        return out
    return dense_matmul_numba(np.ascontiguousarray(x, dtype=np.float32), w)


def dense_matmul_numba(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [T, K] float32 (C-contiguous), w [O, K] float32 -> [T, O]: _dense_tiles where the rows
    split into 16-float vectors, else the plain loop."""
    if x.shape[1] % 16 or not w.flags.c_contiguous:
        return _dense_matmul(x, w)
    return _dense_tiles(x, w)


def qkv_numba(x: np.ndarray, wq, wk, wv, wqkv=None, int8_act: bool = False,
              kernels: KernelConfig | None = None):
    if wqkv is None:
        return (linear_numba(x, wq, int8_act, kernels), linear_numba(x, wk, int8_act, kernels),
                linear_numba(x, wv, int8_act, kernels))
    y = linear_numba(x, wqkv, int8_act, kernels)                            # [T, (Hq + 2 Hkv) hd]
    a, b = wq.shape[0], wq.shape[0] + wk.shape[0]
    # contiguous pieces: a kernel given a strided view compiles to slower code (measured 4x in attention)
    return np.ascontiguousarray(y[:, :a]), np.ascontiguousarray(y[:, a:b]), np.ascontiguousarray(y[:, b:])


@njit(parallel=True, fastmath=True, cache=True)
def _dense_matmul(x, w):
    """x [T, K] float32, w [O, K] float32 -> [T, O]. Threads split the output rows."""
    T, K = x.shape
    O = w.shape[0]
    out = np.empty((T, O), dtype=np.float32)
    T4 = T - T % 4
    for o in prange(O):
        # four tokens at a time: each weight loaded once feeds four accumulators
        for t in range(0, T4, 4):
            a0 = float32(0.0)
            a1 = float32(0.0)
            a2 = float32(0.0)
            a3 = float32(0.0)
            for k in range(K):
                wk = w[o, k]
                a0 += x[t, k] * wk
                a1 += x[t + 1, k] * wk
                a2 += x[t + 2, k] * wk
                a3 += x[t + 3, k] * wk
            out[t, o] = a0
            out[t + 1, o] = a1
            out[t + 2, o] = a2
            out[t + 3, o] = a3
        for t in range(T4, T):  # the rest, and the whole of a decode step (T = 1)
            acc = float32(0.0)
            for k in range(K):
                acc += x[t, k] * w[o, k]
            out[t, o] = acc
    return out


@njit(inline="always")
def _tile(acc, xt, w, at, K, R, nxt, lo, hi):
    """acc (4 R sums) + R tokens of xt (from at[1], R vectors of 16 a k) x the 4 weight rows from
    at[2], over K; and meanwhile, for k in [lo, hi), asks for the rows of an item to come (from
    nxt)."""
    for k in range(0, K, 16):
        if lo <= k < hi:
            for c in range(4):
                _prefetch_l2(w, nxt + c * K + k)
        acc = _mac4(acc, xt, at[1] + R * k, 16, w, at[2] + k, K)
    return acc


@njit(inline="always")
def _tile_tokens(T, c, nt, five):
    """Tokens in tile c of nt: 4 (fewer in the last), or 5 in the last when `five`."""
    return 5 if five and c == nt - 1 else min(4, T - 4 * c)


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def _dense_tiles(x, w):
    """_dense_matmul's function, for K a multiple of 16, in tiles that keep the sums in registers.
    An item is 4 weight rows: each 16-float vector of them feeds a tile's tokens' sums at once (16
    sums a tile of 4 tokens x 4 rows). Tiles take 4 tokens each, the last fewer — or 5 where one
    would be left over: a tile of 1 token loads a vector of weights for each multiply-add, and
    took nearly the time of a tile of 4 (20 sums and the vectors they need still fit the 32
    registers). Each token's sums are the same additions in the same order whatever its tile:
    the same bits at any number of tokens. x is first laid out tile after tile so that a tile's
    token vectors at one k sit side by side (xt[4 c K + (k // 16) R 16 + r 16 + k % 16], token r
    of tile c of R tokens): one pointer for all of them, which keeps the loop's addresses in
    registers. While an item runs, the next item's rows are asked for (without that, each item
    waited for its rows from memory and then computed, one after the other), a share in each of
    its tiles: asked for all in the first tile, they arrived while it ran, and from 5 tokens on
    the later tiles computed with nothing coming from memory."""
    T, K = x.shape
    O = w.shape[0]
    out = np.empty((T, O), dtype=np.float32)
    five = T % 4 == 1 and T > 1                                    # the last tile takes 5 tokens
    nt = T // 4 if five else (T + 3) // 4                          # tiles
    xt = np.empty(T * K, dtype=np.float32)                         # x, tile c from 4 c K on
    for t in range(T):
        c = min(t // 4, nt - 1)
        R, r = _tile_tokens(T, c, nt, five), t - 4 * c
        for k in range(K):
            xt[4 * c * K + (k // 16) * R * 16 + r * 16 + k % 16] = x[t, k]
    share = (K // 16 + nt - 1) // nt * 16                          # of the rows asked for, a tile's
    for i in prange((O + 3) // 4):
        o = 4 * i
        if o + 4 > O:                                   # the last rows, fewer than 4
            for r in range(o, O):
                for t in range(T):
                    a = float32(0.0)
                    for k in range(K):
                        a += x[t, k] * w[r, k]
                    out[t, r] = a
            continue
        nxt = min(o + 4, O - 4) * K                     # the next item's rows
        for c in range(nt):
            R, lo = _tile_tokens(T, c, nt, five), c * share
            at = (4 * c * O + o, 4 * c * K, o * K)      # out[4 c, o], xt's tile c, w[o]
            if R == 4:                                  # (each tuple size compiles its own loop)
                _put_sums(_tile(_zeros(16), xt, w, at, K, 4, nxt, lo, lo + share), out, at[0], O, 4)
            elif R == 5:
                _put_sums(_tile(_zeros(20), xt, w, at, K, 5, nxt, lo, lo + share), out, at[0], O, 4)
            elif R == 3:
                _put_sums(_tile(_zeros(12), xt, w, at, K, 3, nxt, lo, lo + share), out, at[0], O, 4)
            elif R == 2:
                _put_sums(_tile(_zeros(8), xt, w, at, K, 2, nxt, lo, lo + share), out, at[0], O, 4)
            else:
                _put_sums(_tile(_zeros(4), xt, w, at, K, 1, nxt, lo, lo + share), out, at[0], O, 4)
    return out


# ---------------------------------------------------------------------------------------------
# numba.cuda GPU path: gpu/linear.py. On the GPU the linear layers are where the fusion
# happens (norm + QKV + RoPE + cache write, residual epilogues, gate/up + SiLU), and those kernels
# are long enough to deserve their own page.
# ---------------------------------------------------------------------------------------------
