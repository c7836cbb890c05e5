"""Quantized matmul for many rows of x at once: each weight row is decoded once for all of them.

The matvec kernels (quant.py, quant_i8.py) are built for one token: every weight is turned into
something to multiply by and used once. With R rows of x — a batch of sequences decoding, k
tokens to verify, a chunk of a prompt — the same work would be done R times over. Here a tile
of weight rows is dequantized once into a small float32 buffer that stays in cache, and then
every row of x is multiplied against it by a register-blocked kernel: 4 rows of x x 4 weight
rows, 16 vector accumulators, each 16-float load serving 4 multiply-adds (the shape of an sgemm
micro-kernel). Decoding costs the same for 4 rows as for 64; the multiply-adds cost R times as
much, so from a few rows on the step is bound by the float multiply-add rate, not by the decode.

    y[t, o] = sum_k x[t, k] w[o, k]          w[o] = dequantize(row o)   (quant.QuantMatrix)

The spec is quant.quant_linear (x @ w.dequantize().T): float32 products of the exact weights,
summed in float32 — as exact as the float kernels. (With int8 activations a step keeps the int8
kernels: x rounded to int8 is a function of its own, which a batch must not change.)

Where the crossover from the matvec kernels lies is measured per kernel kind
(KernelConfig.many_rows, stages/quant_dispatch.py).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

from ..stages.quant import QK, QuantMatrix
from ..stages.simd import F32, I8, I32, _fma, _load, _load_scales, _splat, _sum16, _vec, _zeros, bits


# ---------------------------------------------------------------------------------------------
# Dequantizing one block of 32 weights into floats, in vector code (the scalar loop the sgemm
# tiles use, quant._dequant_tile_q4, cost as much as the multiply-adds of a few rows).
# ---------------------------------------------------------------------------------------------
def _store(context, builder, arrty, arr, offset, v):
    data = context.make_array(arrty)(context, builder, arr).data
    ptr = builder.bitcast(builder.gep(data, [offset]), v.type.as_pointer())
    builder.store(v, ptr, align=4)


@intrinsic
def _deq_q4(typingctx, qs, qoff, d, m, bi, out, ooff):
    """out.flat[ooff:ooff + 32] = d q + m for the Q4 block at qs.flat[qoff:] (16 bytes: the low
    nibbles are elements 0..15, the high ones 16..31), its scale and min at d.flat[bi], m.flat[bi]
    (float32, or float16 bits)."""
    def codegen(context, builder, sig, args):
        b = _load(context, builder, sig.args[0], args[0], args[1], I8, 16)
        lo = builder.and_(b, ir.Constant(_vec(I8, 16), [15] * 16))
        hi = builder.lshr(b, ir.Constant(_vec(I8, 16), [4] * 16))
        q = builder.shuffle_vector(lo, hi, ir.Constant(_vec(I32, 32), list(range(32))))
        qf = builder.uitofp(q, _vec(F32, 32))
        dd = _load_scales(context, builder, sig.args[2], args[2], args[4], 1)
        mm = _load_scales(context, builder, sig.args[3], args[3], args[4], 1)
        dv = _splat(builder, builder.extract_element(dd, ir.Constant(I32, 0)), 32)
        mv = _splat(builder, builder.extract_element(mm, ir.Constant(I32, 0)), 32)
        _store(context, builder, sig.args[5], args[5], args[6],
               builder.fadd(builder.fmul(qf, dv), mv))        # (no fma: the float kernels' rounding)
        return context.get_dummy_value()
    return types.none(qs, qoff, d, m, bi, out, ooff), codegen


@intrinsic
def _deq_q8(typingctx, qs, qoff, d, bi, out, ooff):
    """out.flat[ooff:ooff + 32] = d q for the Q8_0 block at qs.flat[qoff:] (32 signed bytes)."""
    def codegen(context, builder, sig, args):
        q = _load(context, builder, sig.args[0], args[0], args[1], I8, 32)
        qf = builder.sitofp(q, _vec(F32, 32))
        dd = _load_scales(context, builder, sig.args[2], args[2], args[3], 1)
        dv = _splat(builder, builder.extract_element(dd, ir.Constant(I32, 0)), 32)
        _store(context, builder, sig.args[4], args[4], args[5], builder.fmul(qf, dv))
        return context.get_dummy_value()
    return types.none(qs, qoff, d, bi, out, ooff), codegen


@njit(fastmath=True, cache=True)
def _dequant_rows(qs, d, m, o0, o1, buf):
    """buf[o - o0] = row o of the matrix as float32, o in o0..o1-1. m: Q4's mins [O, nb], or an
    empty 1-D array for Q8_0 (qs viewed as uint8 either way; the Q8_0 bytes are read signed)."""
    nb = d.shape[1]
    K = nb * QK
    n = qs.shape[1]                                     # bytes a row
    for o in range(o0, o1):
        for b in range(nb):
            if m.ndim == 1:
                _deq_q8(qs, o * n + b * QK, d, o * nb + b, buf, (o - o0) * K + b * QK)
            else:
                _deq_q4(qs, o * n + b * 16, d, m, o * nb + b, buf, (o - o0) * K + b * QK)


# ---------------------------------------------------------------------------------------------
# The micro-kernel: RT rows of x against RO rows of the float tile, 16 values of k a step.
# accs[RO t + r] += x[t, k:k+16] * w[r, k:k+16], lane by lane; summed over its lanes at the end.
# ---------------------------------------------------------------------------------------------
def _make_fma(RT, RO):
    @intrinsic
    def fma(typingctx, accs, x, xoffs, w, woffs):
        def codegen(context, builder, sig, args):
            pick = (lambda a, i: builder.extract_value(a, i))
            ws = [_load(context, builder, sig.args[3], args[3], pick(args[4], r), F32, 16)
                  for r in range(RO)]
            out = [None] * (RT * RO)
            for t in range(RT):
                xv = _load(context, builder, sig.args[1], args[1], pick(args[2], t), F32, 16)
                for r in range(RO):
                    out[RO * t + r] = _fma(builder, xv, ws[r], pick(args[0], RO * t + r))
            return context.make_tuple(builder, sig.return_type, out)
        if x.layout == "C" and w.layout == "C":
            return accs(accs, x, xoffs, w, woffs), codegen
    return fma


_fma44, _fma41, _fma14, _fma11 = _make_fma(4, 4), _make_fma(4, 1), _make_fma(1, 4), _make_fma(1, 1)


@intrinsic
def _store_sums(typingctx, accs, out, offs):
    """The 16 accumulators of a 4 x 4 tile summed over their lanes, all at once (a tree of
    shuffles and adds: ~45 vector instructions where 16 separate reductions take ~130):
    out.flat[offs[a] + r] = sum of accs[4 a + r]."""
    def codegen(context, builder, sig, args):
        vs = [builder.extract_value(args[0], i) for i in range(16)]
        half = 16
        while half > 1:                     # pairs (a, b) -> a's and b's partial sums, halved
            h = half // 2
            lo = [i for i in range(16) if (i // h) % 2 == 0]      # lanes of each group's 1st half
            hi = [i for i in range(16) if (i // h) % 2 == 1]
            # a result's lanes: a's groups then b's, each group h partial sums wide
            pick_lo = [l if j < 8 else 16 + l for j, l in enumerate(lo[:8] + lo[:8])]
            pick_hi = [l if j < 8 else 16 + l for j, l in enumerate(hi[:8] + hi[:8])]
            vs = [builder.fadd(
                builder.shuffle_vector(vs[2 * i], vs[2 * i + 1], ir.Constant(_vec(I32, 16), pick_lo)),
                builder.shuffle_vector(vs[2 * i], vs[2 * i + 1], ir.Constant(_vec(I32, 16), pick_hi)),
                flags=["fast"]) for i in range(len(vs) // 2)]
            half = h
        total = vs[0]
        for a in range(4):
            lanes = ir.Constant(_vec(I32, 4), list(range(4 * a, 4 * a + 4)))     # token a's 4
            four = builder.shuffle_vector(total, total, lanes)
            _store(context, builder, sig.args[1], args[1], builder.extract_value(args[2], a), four)
        return context.get_dummy_value()
    if out.layout == "C":
        return types.none(accs, out, offs), codegen


@njit(fastmath=True, cache=True)
def _gemm_rows(x, buf, n, out, c0):
    """out[t, c0 + j] = x[t] . buf[j] for j < n and every row t of x. x [T, K], buf [>= n, K],
    out C-contiguous. Four rows of x at a time (in L1) against the whole strip of buf."""
    T, K = x.shape
    N = out.shape[1]
    n4 = n - n % 4
    t = 0
    while t + 4 <= T:
        x0, x1, x2, x3 = t * K, (t + 1) * K, (t + 2) * K, (t + 3) * K
        for j in range(0, n4, 4):
            w0, w1, w2, w3 = j * K, (j + 1) * K, (j + 2) * K, (j + 3) * K
            acc = _zeros(16)
            for k in range(0, K, 16):
                acc = _fma44(acc, x, (x0 + k, x1 + k, x2 + k, x3 + k), buf,
                             (w0 + k, w1 + k, w2 + k, w3 + k))
            c = c0 + j
            _store_sums(acc, out, (t * N + c, (t + 1) * N + c, (t + 2) * N + c, (t + 3) * N + c))
        for j in range(n4, n):                          # the strip's last rows, one at a time
            w0 = j * K
            acc4 = _zeros(4)
            for k in range(0, K, 16):
                acc4 = _fma41(acc4, x, (x0 + k, x1 + k, x2 + k, x3 + k), buf, (w0 + k,))
            for a in range(4):
                out[t + a, c0 + j] = _sum16(acc4[a])
        t += 4
    while t < T:                                        # the last rows of x, one at a time
        x0 = t * K
        for j in range(0, n4, 4):
            w0, w1, w2, w3 = j * K, (j + 1) * K, (j + 2) * K, (j + 3) * K
            acc4 = _zeros(4)
            for k in range(0, K, 16):
                acc4 = _fma14(acc4, x, (x0 + k,), buf, (w0 + k, w1 + k, w2 + k, w3 + k))
            for r in range(4):
                out[t, c0 + j + r] = _sum16(acc4[r])
        for j in range(n4, n):
            acc1 = _zeros(1)
            for k in range(0, K, 16):
                acc1 = _fma11(acc1, x, (x0 + k,), buf, (j * K + k,))
            out[t, c0 + j] = _sum16(acc1[0])
        t += 1


@njit(cache=True)
def aligned(r, c):
    """An uninitialised float32 [r, c] array whose data starts on a 64-byte cache line. A 16-float
    load that straddles two lines costs two; with rows of a multiple of 16 floats (K = 576, 1536)
    every load of x and of the buffer below then sits on one line."""
    raw = np.empty(r * c + 16, dtype=np.float32)
    off = (64 - raw.ctypes.data % 64) % 64 // 4
    return raw[off:off + r * c].reshape(r, c)


# Weight rows a tile decodes at a time: 16 rows of K = 576 (37 KB of floats) stay in L1 with 4
# rows of x beside them; of K = 1536, in L2.
STRIP = 16


@njit(fastmath=True, cache=True)
def tile(x, qs, d, m, o0, o1, buf, out, c0):
    """out[:, c0 + o - o0] = x . row o, for o in o0..o1-1; buf: a buffer [>= STRIP, K]."""
    o = o0
    while o < o1:
        e = min(o + STRIP, o1)
        _dequant_rows(qs, d, m, o, e, buf)
        _gemm_rows(x, buf, e - o, out, c0 + o - o0)
        o = e


@njit(parallel=True, fastmath=True, cache=True)
def _matmul(x, qs, d, m):
    T, K = x.shape
    O = qs.shape[0]
    out = np.empty((T, O), dtype=np.float32)
    n = (O + 63) // 64                                  # tiles of 64 weight rows
    xa = aligned(T, K)
    xa[:] = x
    for i in prange(n):
        buf = aligned(STRIP, K)
        o0, o1 = i * O // n, (i + 1) * O // n
        y = np.empty((T, o1 - o0), dtype=np.float32)
        tile(xa, qs, d, m, o0, o1, buf, y, 0)
        out[:, o0:o1] = y
    return out


_NO_M = np.zeros(0, dtype=np.float32)


def quant_linear_rows(x: np.ndarray, w: QuantMatrix) -> np.ndarray:
    """x [T, K] -> [T, O] = x @ dequantize(w)^T, each weight row decoded once for all T rows."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    qs = w.qs.view(np.uint8)
    return _matmul(x, qs, bits(w.d), _NO_M if w.fmt == "Q8_0" else bits(w.m))
