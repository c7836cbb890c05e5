"""Quantized matmul with int8 activations on weights repacked in panels of 16 rows.

quant_i8.py multiplies one weight row at a time: the integer sums of a row's blocks land in the
lanes of one vector register, and every row ends with a sum across those lanes. Here the weights
are repacked once, at load, so that one 64-byte vector holds 4 consecutive weights of each of 16
rows; the CPU's byte dot-product instruction (AVX-512 VNNI `vpdpbusd`) then multiplies it by 4
values of x broadcast to every lane, and lane r of the result is row r's partial sum:

    panel p = rows 16p .. 16p+15;   for each block b of 32 weights and each token t:
        s[r]    = sum_k q[16p + r, 32b + k] xq[t, 32b + k]            (8 vpdpbusd, 16 rows at once)
        y[t, r] += s[r] * (d[16p + r, b] dx[t, b])  (+ m[16p + r, b] sum(x[t, block b]), Q4)

No sum across lanes, one float multiply-add per block for 16 rows, and each loaded vector of
weights serves every token of the tile (8 at a time with int8 x, 4 with three parts): prefill,
a batch of sequences and tokens to verify read the weights once for all rows. The result is the
same function as quant_i8.py's (quant_i8.quant_linear_i8_reference): the same integer sums,
scaled and added in another order.

Layouts (panels()): a Q4 block row is 16 bytes, element k in the low nibble of byte k and element
16 + k in the high one; a panel's block is 4 vectors, vector c holding bytes 4c..4c+3 of the 16
rows, so its low nibbles meet x[4c .. 4c+3] and its high ones x[16+4c .. 16+4c+3]. A Q8_0 block
is 8 vectors of 4 signed bytes a row, stored plus 128 (vpdpbusd wants one unsigned operand); each
token's sum then starts from -128 sum(xq over the block), which takes the 128 off in integers.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import float32, int32, njit, prange, types
from numba.extending import intrinsic

from ..stages.quant import QK, QuantMatrix
from ..stages.quant_i8 import _absmax_sum, _digits1_bare, _digits3_bare, _reduce
from ..stages.simd import (F32, I8, I32, _fma, _load, _load_scales, _prefetch_l2, _splat, _store16, _vec, _vpdpbusd,
                           _zeros, bits)
from . import quant_gemm

ROWS = 16                                           # rows in a panel: one int32 lane each
PREFETCH_BYTES = 4096       # how far ahead the first pass over a panel asks for the weights (into L2)


# ---------------------------------------------------------------------------------------------
# Repacking, at load (NumPy)
# ---------------------------------------------------------------------------------------------
class PanelMatrix:
    """A QuantMatrix's weights in panels: qp [P, nb, vectors, 64] bytes, d and m [P, nb, 16]
    (the scales as the kernels take them: float32, or float16 bits)."""
    def __init__(self, w: QuantMatrix):
        O, K = w.shape
        P, nb = -(-O // ROWS), K // QK                # the last panel padded with zero rows
        self.fmt, self.shape = w.fmt, w.shape
        if w.fmt == "Q8_0":
            q = _pad(w.qs.view(np.uint8) ^ np.uint8(128), P).reshape(P, ROWS, nb, 8, 4)  # q + 128
            self.qp = np.ascontiguousarray(q.transpose(0, 2, 3, 1, 4)).reshape(P, nb, 8, 64)
        else:
            q = _pad(w.qs, P).reshape(P, ROWS, nb, 4, 4)             # [P, r, b, c, j]
            self.qp = np.ascontiguousarray(q.transpose(0, 2, 3, 1, 4)).reshape(P, nb, 4, 64)
        self.d = _panel_scales(w.d, P, nb)                           # (zero scales: zero rows)
        self.m = np.zeros(0, np.float32) if w.m is None else _panel_scales(w.m, P, nb)


def _pad(a, P):
    return np.concatenate([a, np.zeros((P * ROWS - len(a),) + a.shape[1:], a.dtype)])


def _panel_scales(a, P, nb):
    return bits(np.ascontiguousarray(_pad(a, P).reshape(P, ROWS, nb).transpose(0, 2, 1)))  # [P, nb, 16]


def stacked(fmt: str, qs: np.ndarray, d: np.ndarray, m) -> tuple:
    """Layers' matrices stacked [L, O, ...] (as weights.stacks holds them) -> (qp, d, m) stacked
    [L, P, ...]; Q8_0's m: an empty [L, 0] (1-D a layer, as the kernels tell the formats apart)."""
    L, O = qs.shape[:2]
    K = d.shape[2] * QK
    mats = [PanelMatrix(QuantMatrix._from_parts(fmt, qs[l], d[l], None if m is None else m[l], K))
            for l in range(L)]
    no_m = np.zeros((L, 0), dtype=np.float32)
    return (_stack([a.qp for a in mats]), _stack([a.d for a in mats]),
            no_m if m is None else _stack([a.m for a in mats]))


def _stack(arrays: list) -> np.ndarray:
    """np.stack into memory that starts on a cache line (quant_gemm.aligned's float32 words, as
    bytes): the kernels load 64 bytes at a time (a vector, a tile row), and on NumPy's 16-byte
    alignment each such load straddled two lines (docs/benchmarks.md, "CPU kernel details")."""
    shape, n = (len(arrays),) + arrays[0].shape, len(arrays) * arrays[0].nbytes
    raw = quant_gemm.aligned(1, -(-n // 4)).reshape(-1).view(np.uint8)[:n]
    return np.stack(arrays, out=raw.view(arrays[0].dtype).reshape(shape))


# ---------------------------------------------------------------------------------------------
# One block of one panel against C tokens, in LLVM IR
# ---------------------------------------------------------------------------------------------
def _scalar(context, builder, arrty, arr, offset, elt):
    data = context.make_array(arrty)(context, builder, arr).data
    ptr = builder.bitcast(builder.gep(data, [offset]), elt.as_pointer())
    return builder.load(ptr, align=1)


def _x4(context, builder, arrty, arr, offset):
    """4 bytes of x at arr.flat[offset:], in every 32-bit lane of a 64-byte vector."""
    four = _scalar(context, builder, arrty, arr, offset, I32)
    return builder.bitcast(_splat(builder, four, 16), _vec(I8, 64))


def _nibbles(builder, v):
    """A Q4 panel block's 4 vectors -> 8: the low nibbles of each (elements 4c + j of the rows),
    then the high ones (16 + 4c + j), one byte each."""
    return ([builder.and_(a, ir.Constant(_vec(I8, 64), [15] * 64)) for a in v]
            + [builder.lshr(a, ir.Constant(_vec(I8, 64), [4] * 64)) for a in v])


def _scale_add(builder, acc, isum, scale, m, xs):
    """acc + isum scale (+ m xs, Q4's m term): explicit fused multiply-adds, no multiply left that
    the compiler could fuse with an add in one place and not in another."""
    acc = _fma(builder, isum, scale, acc)
    return acc if m is None else _fma(builder, m, xs, acc)


def _make_panel(q8, C, limbs=1):
    vectors = 8 if q8 else 4

    @intrinsic
    def panel(typingctx, accs, qp, qoff, xq, xoffs, d, m, soff, dx, xsum, start, toks, kx):
        """accs[t] + block b of a panel (qp.flat[qoff:], scales at d.flat[soff:]) against token t
        of x (its parts at xq.flat[xoffs[t] + p kx:], 32 bytes each; its scale, the sum of x over the
        block (Q4's m term) and Q8_0's start values at dx, xsum .flat[toks[t]], start.flat[toks[t]
        limbs:])."""
        def codegen(context, builder, sig, args):
            pick = (lambda a, i: builder.extract_value(a, i))
            at = (lambda base, k: builder.add(base, ir.Constant(base.type, k)))
            v = [_load(context, builder, sig.args[1], args[1], at(args[2], 64 * c), I8, 64)
                 for c in range(vectors)]
            if not q8:
                v = _nibbles(builder, v)
            d = _load_scales(context, builder, sig.args[5], args[5], args[7], 16)
            mv = None if q8 else _load_scales(context, builder, sig.args[6], args[6], args[7], 16)
            zero = ir.Constant(_vec(I32, 16), [0] * 16)
            # Each (token, part) sums in its own chains of vpdpbusd, and the chains advance
            # together, one weight vector at a time: each vpdpbusd waits for its chain's previous
            # one, so many chains must be in flight. Two a (token, part) when there are few of
            # them (one token of three parts, or one part a token), one from 3 tokens of 3 parts
            # or 8 of one on (fewer adds at the end; docs/benchmarks.md, "CPU kernel details").
            chains = 1 if (limbs == 3 and C >= 3) or C >= 8 else 2
            s = []                                                 # s[t][p][chain]
            for t in range(C):
                tok = pick(args[11], t)
                s.append([])
                for p in range(limbs):
                    ch = [zero] * chains
                    if q8:             # -128 sum(x): takes off the + 128 of the weights
                        first = builder.add(builder.mul(tok, ir.Constant(tok.type, limbs)),
                                            ir.Constant(tok.type, p))
                        ch[0] = _splat(builder, _scalar(context, builder, sig.args[10], args[10],
                                                        first, I32), 16)
                    s[t].append(ch)
            for c in range(8):
                for t in range(C):
                    xo = pick(args[4], t)
                    for p in range(limbs):
                        xoff = 4 * c if q8 else 4 * (c % 4) + (16 if c >= 4 else 0)
                        xp = builder.add(xo, builder.mul(args[12], ir.Constant(xo.type, p))) if p else xo
                        s[t][p][c % chains] = _vpdpbusd(builder, s[t][p][c % chains], v[c], _x4(
                            context, builder, sig.args[3], args[3], at(xp, xoff)))

            def ipart(t, p):               # part p of token t: its chains' int32 sums added
                total = s[t][p][0]
                for other in s[t][p][1:]:
                    total = builder.add(total, other)
                return total

            def part(t, p):                # ... as floats
                return builder.sitofp(ipart(t, p), _vec(F32, 16))
            out = []
            for t in range(C):
                tok = pick(args[11], t)
                if limbs == 3 and not q8:
                    # X = (q1 128 + q2) 128 + q3 in integers: 4-bit weights keep the sum in an
                    # int32 lane (|sum| <= 32 * 15 * (127 * 128^2 + 64 * 129) < 2^31), and one
                    # conversion rounds it as the float steps below do (exact up to their last
                    # add, which rounds once) — two float operations fewer a block and token
                    k7 = ir.Constant(_vec(I32, 16), [7] * 16)
                    isum = ipart(t, 0)
                    for p in range(1, limbs):
                        isum = builder.add(builder.shl(isum, k7), ipart(t, p))
                    isum = builder.sitofp(isum, _vec(F32, 16))
                else:
                    isum = part(t, 0)
                    k128 = ir.Constant(_vec(F32, 16), [128.0] * 16)
                    for p in range(1, limbs):                      # X = (q1 128 + q2) 128 + q3
                        isum = builder.fadd(builder.fmul(isum, k128), part(t, p))
                dxt = _splat(builder, _scalar(context, builder, sig.args[8], args[8], tok, F32), 16)
                # the same steps whether the row comes with 0 or 3 other tokens (or from
                # quant_amx.py), so batches and verifications give what one row alone gives
                xs = None if q8 else _splat(builder, _scalar(context, builder, sig.args[9], args[9], tok, F32), 16)
                out.append(_scale_add(builder, pick(args[0], t), isum, builder.fmul(d, dxt), mv, xs))
            return context.make_tuple(builder, sig.return_type, out)
        return accs(accs, qp, qoff, xq, xoffs, d, m, soff, dx, xsum, start, toks, kx), codegen
    return panel


_q4x4, _q4x1, _q8x4, _q8x1 = (_make_panel(q8, C) for q8 in (False, True) for C in (4, 1))
_q4x4_3, _q4x1_3, _q8x4_3, _q8x1_3 = (_make_panel(q8, C, 3) for q8 in (False, True) for C in (4, 1))
# the last 2 or 3 tokens of a step (T = 5, 6, 7: tokens to verify) together, not one by one
_q4x2, _q4x3, _q8x2, _q8x3 = (_make_panel(q8, C) for q8 in (False, True) for C in (2, 3))
# int8 x: 8 tokens a pass — a block's weights loaded and unpacked once for twice the tokens
_q4x8, _q8x8 = (_make_panel(q8, 8) for q8 in (False, True))
_q4x2_3, _q4x3_3, _q8x2_3, _q8x3_3 = (_make_panel(q8, C, 3) for q8 in (False, True) for C in (2, 3))


# ---------------------------------------------------------------------------------------------
# x, and a range of panels against every token
# ---------------------------------------------------------------------------------------------
@intrinsic
def _sum32(typingctx, a, off):
    """The sum of the 32 signed bytes a.flat[off:off + 32], as an int32."""
    def codegen(context, builder, sig, args):
        v = builder.sext(_load(context, builder, sig.args[0], args[0], args[1], I8, QK), _vec(I32, QK))
        return _reduce(builder, "add", v)
    if a.layout == "C":
        return types.int32(a, off), codegen


@njit(fastmath=True, cache=True)
def prepare_x(x, q8, limbs):
    """x [T, K] -> (xq, dx [T, nb], xsum [T, nb], start): per block of 32, x ~ dx X with X an
    integer rounded as in quant_i8.quantize_x, in `limbs` int8 parts (1, or 3: float32's
    precision), stored part after part: xq[t, p K + 32 b + k], so that the rows (token t, part p)
    of xq.reshape(T limbs, K) are K bytes apart (cpu/quant_amx.py loads them so); xsum = sum(x)
    over the block (Q4's m term);
    Q8_0: start[t, b limbs + p] = -128 sum(part p over the block) (else an empty array)."""
    T, K = x.shape
    nb = K // QK
    xq = np.empty((T, nb * limbs * QK), dtype=np.int8)
    dx = np.empty((T, nb), dtype=np.float32)
    xsum = np.empty((T, nb), dtype=np.float32)
    start = np.zeros((T if q8 else 0, nb * limbs if q8 else 0), dtype=np.int32)
    step = float32(1 << (7 * (limbs - 1)))                       # 128^(limbs - 1)
    for t in range(T):
        for b in range(nb):
            o = t * K + b * QK
            amax, xsum[t, b] = _absmax_sum(x, o)
            inv = float32(127.0) / amax if amax > float32(0.0) else float32(0.0)
            dx[t, b] = amax / float32(127.0) / step             # the scale of X (exact: / 2^14)
            at = t * limbs * K + b * QK
            if limbs == 3:
                _digits3_bare(x, o, inv * step, xq, at, 16, K)
            else:
                _digits1_bare(x, o, inv * step, xq, at, 16, K)
    # Q8_0's start values in a loop of their own: inside the one above, their index arithmetic
    # (hoisted by the compiler, spilled to the stack) slowed every block, Q4's too
    # (docs/benchmarks.md, "CPU kernel details")
    if q8:
        for t in range(T):
            for b in range(nb):
                for p in range(limbs):
                    start[t, b * limbs + p] = int32(-128) * _sum32(xq, t * limbs * K + p * K + b * QK)
    return xq, dx, xsum, start


@njit(inline="always")
def _ask_ahead(qp, at, vb, last):
    """Ask for the panel's bytes PREFETCH_BYTES past the block at qp.flat[at:] (vb bytes), into
    L2."""
    for c in range(0, vb, 64):
        _prefetch_l2(qp, min(last, at + c + PREFETCH_BYTES))


@njit(fastmath=True, cache=True)
def tile(xi, qp, d, m, p0, p1, out, c0):
    """out[t, c0 + 16 (p - p0) + r] = row 16 p + r . token t of x, for the panels p0..p1-1 and
    every token; xi = prepare_x(x, Q8_0?, limbs). out: C-contiguous [T, >= c0 + 16 (p1 - p0)]."""
    xq, dx, xsum, start = xi
    q8 = m.ndim == 1                                   # Q8_0 (a constant when numba compiles)
    T, nb = dx.shape
    limbs = xq.shape[1] // (nb * QK)
    X, N = xq.shape[1], out.shape[1]                   # x's bytes a token; out's row
    kx = nb * QK                                       # bytes between a token's parts
    vb = qp.shape[2] * 64                              # bytes of a panel's block
    last = qp.size - 1
    for p in range(p0, p1):
        col = c0 + ROWS * (p - p0)
        t = 0
        while limbs == 1 and t + 8 <= T:               # int8 x: 8 tokens a step
            acc8 = _zeros(8)
            for b in range(nb):
                blk, xb = p * nb + b, b * QK
                if t == 0:                             # the panel's first pass streams it
                    _ask_ahead(qp, blk * vb, vb, last)
                xo8 = (t * X + xb, (t + 1) * X + xb, (t + 2) * X + xb, (t + 3) * X + xb,
                       (t + 4) * X + xb, (t + 5) * X + xb, (t + 6) * X + xb, (t + 7) * X + xb)
                tk8 = (t * nb + b, (t + 1) * nb + b, (t + 2) * nb + b, (t + 3) * nb + b,
                       (t + 4) * nb + b, (t + 5) * nb + b, (t + 6) * nb + b, (t + 7) * nb + b)
                if q8:
                    acc8 = _q8x8(acc8, qp, blk * vb, xq, xo8, d, m, blk * ROWS, dx, xsum, start, tk8, kx)
                else:
                    acc8 = _q4x8(acc8, qp, blk * vb, xq, xo8, d, m, blk * ROWS, dx, xsum, start, tk8, kx)
            for i in range(8):
                _store16(out, (t + i) * N + col, acc8[i])
            t += 8
        while t + 4 <= T:                              # 4 tokens a step
            acc = _zeros(4)
            for b in range(nb):
                blk, xb = p * nb + b, b * QK
                if t == 0:                             # the panel's first pass streams it
                    _ask_ahead(qp, blk * vb, vb, last)
                xo = (t * X + xb, (t + 1) * X + xb, (t + 2) * X + xb, (t + 3) * X + xb)
                tk = (t * nb + b, (t + 1) * nb + b, (t + 2) * nb + b, (t + 3) * nb + b)
                if q8 and limbs == 3:
                    acc = _q8x4_3(acc, qp, blk * vb, xq, xo, d, m, blk * ROWS, dx, xsum, start, tk, kx)
                elif q8:
                    acc = _q8x4(acc, qp, blk * vb, xq, xo, d, m, blk * ROWS, dx, xsum, start, tk, kx)
                elif limbs == 3:
                    acc = _q4x4_3(acc, qp, blk * vb, xq, xo, d, m, blk * ROWS, dx, xsum, start, tk, kx)
                else:
                    acc = _q4x4(acc, qp, blk * vb, xq, xo, d, m, blk * ROWS, dx, xsum, start, tk, kx)
            for i in range(4):
                _store16(out, (t + i) * N + col, acc[i])
            t += 4
        if T - t >= 2:                                 # the last 2 or 3 tokens together
            R = T - t
            acc3 = _zeros(3)
            acc2 = _zeros(2)
            for b in range(nb):
                blk, xb = p * nb + b, b * QK
                if t == 0:                             # the panel's first pass streams it
                    _ask_ahead(qp, blk * vb, vb, last)
                xo3 = (t * X + xb, (t + 1) * X + xb, (t + 2) * X + xb)
                tk3 = (t * nb + b, (t + 1) * nb + b, (t + 2) * nb + b)
                if R == 3:
                    if q8 and limbs == 3:
                        acc3 = _q8x3_3(acc3, qp, blk * vb, xq, xo3, d, m, blk * ROWS, dx, xsum, start, tk3, kx)
                    elif q8:
                        acc3 = _q8x3(acc3, qp, blk * vb, xq, xo3, d, m, blk * ROWS, dx, xsum, start, tk3, kx)
                    elif limbs == 3:
                        acc3 = _q4x3_3(acc3, qp, blk * vb, xq, xo3, d, m, blk * ROWS, dx, xsum, start, tk3, kx)
                    else:
                        acc3 = _q4x3(acc3, qp, blk * vb, xq, xo3, d, m, blk * ROWS, dx, xsum, start, tk3, kx)
                else:
                    xo2, tk2 = (xo3[0], xo3[1]), (tk3[0], tk3[1])
                    if q8 and limbs == 3:
                        acc2 = _q8x2_3(acc2, qp, blk * vb, xq, xo2, d, m, blk * ROWS, dx, xsum, start, tk2, kx)
                    elif q8:
                        acc2 = _q8x2(acc2, qp, blk * vb, xq, xo2, d, m, blk * ROWS, dx, xsum, start, tk2, kx)
                    elif limbs == 3:
                        acc2 = _q4x2_3(acc2, qp, blk * vb, xq, xo2, d, m, blk * ROWS, dx, xsum, start, tk2, kx)
                    else:
                        acc2 = _q4x2(acc2, qp, blk * vb, xq, xo2, d, m, blk * ROWS, dx, xsum, start, tk2, kx)
            for i in range(R):
                _store16(out, (t + i) * N + col, acc3[i] if R == 3 else acc2[i])
            t += R
        while t < T:                                   # then one at a time
            acc1 = _zeros(1)
            for b in range(nb):
                blk = p * nb + b
                if t == 0:                             # the panel's first pass streams it
                    _ask_ahead(qp, blk * vb, vb, last)
                xo1, tk1 = (t * X + b * QK,), (t * nb + b,)
                if q8 and limbs == 3:
                    acc1 = _q8x1_3(acc1, qp, blk * vb, xq, xo1, d, m, blk * ROWS, dx, xsum, start, tk1, kx)
                elif q8:
                    acc1 = _q8x1(acc1, qp, blk * vb, xq, xo1, d, m, blk * ROWS, dx, xsum, start, tk1, kx)
                elif limbs == 3:
                    acc1 = _q4x1_3(acc1, qp, blk * vb, xq, xo1, d, m, blk * ROWS, dx, xsum, start, tk1, kx)
                else:
                    acc1 = _q4x1(acc1, qp, blk * vb, xq, xo1, d, m, blk * ROWS, dx, xsum, start, tk1, kx)
            _store16(out, t * N + col, acc1[0])
            t += 1


@njit(parallel=True, fastmath=True, cache=True)
def _matmul(x, qp, d, m, limbs):
    xi = prepare_x(x, m.ndim == 1, limbs)
    T, P = x.shape[0], qp.shape[0]
    out = np.empty((T, P * ROWS), dtype=np.float32)
    n = (P + 3) // 4                                   # tiles of 4 panels
    for i in prange(n):
        p0, p1 = i * P // n, (i + 1) * P // n
        y = np.empty((T, ROWS * (p1 - p0)), dtype=np.float32)
        tile(xi, qp, d, m, p0, p1, y, 0)
        out[:, ROWS * p0:ROWS * p1] = y
    return out


def quant_linear_panels(x: np.ndarray, w: PanelMatrix, limbs: int = 1) -> np.ndarray:
    """x [T, K] -> [T, O] with x rounded to int8 per block — or, limbs=3, split into three int8
    parts, as exact as float32: quant_i8.quant_linear_i8's function."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return _matmul(x, w.qp, w.d, w.m, limbs)[:, :w.shape[0]]
