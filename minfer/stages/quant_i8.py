"""Quantized matmul with int8 activations — llama.cpp's trick, a separate variant of quant.py.

The kernels in quant.py keep x in float32 and turn every 4-bit weight into a float before a
multiply-add: exact (the same function as the dequantized model), but ~7 vector instructions per
32 weights. Here x is rounded too, per block of 32, to int8 with a float scale of its own

    x[k] ~ dx[b] * xq[k]          dx[b] = max |x| over block b / 127,   xq in -127..127

and a block's dot product becomes an integer one, done by the CPU's byte dot-product instruction
(AVX-512 VNNI `vpdpbusd`: 64 unsigned-byte x signed-byte products, summed by 4 into 16 int32
lanes, in one instruction):

    sum_k (d q_k + m) x_k  ~  d dx * sum_k q_k xq_k  +  m * sum_k x_k          (one block)

The cost is rounding error: ~1e-2 of the largest output on random data (llama.cpp's own CPU
kernels do the same), so this is opt-in — `LLM(activations="int8")`, `--activations int8` — and
`bench` and the quality report show it as its own row. Needs a CPU with AVX-512 VNNI.

Layouts. The weights are quant.QuantMatrix's, untouched (the file's bytes). Q4 rows are read 64
bytes (4 blocks) at a time: `b & 15` gives the 4 blocks' elements 0..15, `b >> 4` their 16..31.
So x is stored in that order — per chunk of 4 blocks, the 64 values that meet low nibbles, then
the 64 that meet high ones — and a chunk is two vpdpbusd on plain loads, no shuffles. The int32
lanes 4i..4i+3 then hold block i's sum; one multiply by [d dx] spread over the lanes and one add
finish the chunk. Rows whose block count is not a multiple of 4 end with a chunk of 2 and/or 1.
Q8_0 rows are read 2 blocks at a time in their own order; vpdpbusd wants one unsigned operand,
so the weight bytes get their top bit flipped (q + 128), and each int32 lane starts from -128
times the sum of the 4 values of x it meets, which takes that off again in integers (a float
term per block, like Q4's m, made the chunks 5-15% slower where they are bound by arithmetic).
A prompt's tokens go two at a time: a 4-bit row's chunk is loaded and split once for both
(_rows_pair), and Q8_0 goes 4 rows x 2 tokens a step (_rows_pair_q8), each load serving 2 or 4
dot products — the same sums, in the same order, as a token at a time.

Three parts: float32 x on the same instruction. With limbs=3, x is not rounded to int8 but to
1/128^2 of a step: per block, X = round(128^2 r) with r = x * 127 / max|x|, and X is written in
base 128 — X = q1 128^2 + q2 128 + q3, with q3, q2 in -64..63 and q1 in -127..127: three int8
numbers with x = dx X to within 2^-21 of the block's largest |x| (float32 keeps 2^-24 of each
value). Each part goes through vpdpbusd like x above, and the three int32 sums combine exactly,
(s1 * 128 + s2) * 128 + s3, before the one conversion to float (an int32 lane holds it: at most
4 * 255 * (127 * 128^2 + 1) < 2^31, Q8_0's shifted bytes being the largest weights). The
result is as exact as the float kernels' (~1e-6 of the output against float64; tested), and for
4-bit weights it is faster than turning every nibble into a float — for Q8_0 too, with the rows
ahead prefetched into L2 (_prefetch_l2): it is how the default float32 activations run on a CPU
with VNNI (quant_dispatch.KernelConfig.split_x), up to its sgemm_min_rows tokens.

LLVM does not find vpdpbusd in a plain loop (numba widens the byte products to int64), so the few
vector operations are written as numba intrinsics in LLVM IR, below; the loops around them are
ordinary @njit code.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import float32, int32, njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from .fastexp import exp32
from .quant import QK, QuantMatrix
from .simd import (F32, F32x16, I8, I32, _load, _load_scales, _prefetch, _prefetch_l2,  # noqa: F401
                   _splat, _sum16, _vec, _vpdpbusd, _zeros16, bits, check_available, has_vnni)


# ---------------------------------------------------------------------------------------------
# x -> int8, per token and block, in the order the kernels read it
# ---------------------------------------------------------------------------------------------
def chunks(nb: int, q4: bool = True) -> list[int]:
    """How a row of nb blocks is read: Q4, chunks of 4 blocks, then 2 and/or 1 for the rest;
    Q8_0, chunks of 2, then 1."""
    if not q4:
        return [2] * (nb // 2) + [1] * (nb % 2)
    return [4] * (nb // 4) + [2] * (nb % 4 // 2) + [1] * (nb % 2)


def quantize_x(x: np.ndarray, q4_order: bool, limbs: int = 1):
    """Reference: x [T, K] float32 -> xq int8 [T, limbs K] (in the kernels' order), dx [T, nb]
    scales, xsum [T, nb] (sum of x over each block, float), x4 [T, K/4] (sum of the integers
    over each 4 consecutive values: what one int32 lane meets in a Q8_0 row). limbs 3: each
    integer is X = q1 128^2 + q2 128 + q3, the three int8 parts stored one after the other in
    each chunk (see "Three parts" at the top)."""
    T, K = x.shape
    xb = x.reshape(T, K // QK, QK)                                     # [T, nb, 32]
    amax = np.abs(xb).max(axis=2)                                       # [T, nb]
    dx = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    r = xb * inv[:, :, None]                                            # [T, nb, 32] in -127..127
    X = np.rint(r * np.float32(128 ** (limbs - 1))).astype(np.int32)    # r to 1 / 128^(limbs-1)
    parts_q, top = [], X                # X's digits in base 128, the lowest first: -64..63
    for _ in range(limbs - 1):
        up = (top + 64) >> 7                                            # floor((top + 64) / 128)
        parts_q.insert(0, (top - (up << 7)).astype(np.int8))            # [T, nb, 32]
        top = up
    parts_q.insert(0, top.astype(np.int8))                              # the top one: -127..127
    pieces, b = [], 0
    for n in chunks(K // QK, q4_order):
        for q in parts_q:
            c = q[:, b:b + n]                                           # [T, n, 32]
            if q4_order:                                                # lows of a chunk, highs
                pieces += [c[:, :, :16].reshape(T, -1), c[:, :, 16:].reshape(T, -1)]
            else:
                pieces.append(c.reshape(T, -1))
        b += n
    xq = np.concatenate(pieces, axis=1)                                 # [T, limbs K]
    dx = (dx / np.float32(128 ** (limbs - 1))).astype(np.float32)      # the scale of X
    return xq, dx, xb.sum(axis=2, dtype=np.float32), X.reshape(T, K // 4, 4).sum(axis=2, dtype=np.int32)


def quant_linear_i8_reference(x: np.ndarray, w: QuantMatrix, limbs: int = 1) -> np.ndarray:
    """The spec, in NumPy: x [T, K] -> [T, O] as the kernels compute it. x is replaced by its
    rounded self dx * X; Q4's "+ m" part meets the exact block sums of x (as in the kernels)."""
    T, K = x.shape
    xq, dx, xsum, _ = quantize_x(x, q4_order=False, limbs=limbs)
    nb = K // QK
    X = np.zeros((T, nb, QK), dtype=np.float64)
    for b, n in zip(np.cumsum([0] + chunks(nb, False))[:-1], chunks(nb, False)):  # undo the layout
        c = xq[:, b * QK * limbs:(b + n) * QK * limbs].reshape(T, limbs, n, QK)
        for i in range(limbs):
            X[:, b:b + n] += c[:, i].astype(np.float64) * 128.0 ** (limbs - 1 - i)
    x_seen = (X * dx[:, :, None]).astype(np.float32).reshape(T, K)         # [T, K]
    if w.fmt == "Q8_0":
        return x_seen @ w.dequantize().T                                      # [T, O]
    m = w.m.astype(np.float32)                                                # [O, nb]
    dq = w.dequantize() - np.repeat(m, QK, axis=1)                            # [O, K]: d * q
    return x_seen @ dq.T + xsum @ m.T                                         # [T, O]


# ---------------------------------------------------------------------------------------------
# The vector steps, in LLVM IR: one chunk of n blocks of one row against the same blocks of x;
# one block of x rounded and cut into its parts (_quantize_x)
# ---------------------------------------------------------------------------------------------
def _finish(builder, acc16, isum, scale, offset):
    """acc16 + float(isum) * scale[block] (+ offset[block]), over the int32 lanes of isum (each
    block owns lanes // n consecutive lanes), widened to 16 lanes (the missing ones add 0)."""
    lanes, n = isum.type.count, scale.type.count
    spread = ir.Constant(_vec(I32, lanes), [l * n // lanes for l in range(lanes)])
    part = builder.fmul(builder.sitofp(isum, _vec(F32, lanes)),
                        builder.shuffle_vector(scale, scale, spread), flags=["fast"])
    if offset is not None:
        part = builder.fadd(part, builder.shuffle_vector(offset, offset, spread), flags=["fast"])
    if lanes < 16:                                                 # zeros in the upper lanes
        part = builder.shuffle_vector(part, ir.Constant(_vec(F32, lanes), [0.0] * lanes),
                                      ir.Constant(_vec(I32, 16), list(range(lanes)) +
                                                  [lanes] * (16 - lanes)))
    return builder.fadd(acc16, part, flags=["fast"])


def _scales(context, builder, sig, args, n):
    """A Q4 chunk's per-block float terms: d * dx (the integer sum's scale) and m * c (added per
    lane: c = sum(x) / 4); args end with (..., d, dx, m, c, row, tok)."""
    d, dx, row, tok = args[5], args[6], args[-2], args[-1]
    td, tdx = sig.args[5:7]

    def ld(t, a, i):
        return _load_scales(context, builder, t, a, i, n)
    scale = builder.fmul(ld(td, d, row), ld(tdx, dx, tok), flags=["fast"])
    return scale, builder.fmul(ld(sig.args[7], args[7], row), ld(sig.args[8], args[8], tok),
                               flags=["fast"])


def _parts(builder, one, limbs, start):
    """The integer sums of x's `limbs` parts, combined: (s1 * 128 + s2) * 128 + s3 (one(part, s)
    gives part's int32 lanes added to s, which vpdpbusd does for free: each part's products go
    onto the sum so far, shifted, rather than onto zeros and then an add); `start` is where the
    lowest part's lanes start."""
    if limbs == 1:
        return one(0, start)
    seven = ir.Constant(start.type, [7] * start.type.count)
    total = one(0, ir.Constant(start.type, [0] * start.type.count))
    for part in range(1, limbs):
        s = builder.shl(total, seven)
        total = one(part, builder.add(s, start) if part == limbs - 1 else s)
    return total


def _make_q4_chunk(n, limbs=1, tokens=1, chunks=1):
    @intrinsic
    def q4_chunk(typingctx, acc, qs, qoff, xq, xoff, d, dx, e, c, row, tok):
        """acc + the n blocks of a Q4 row at qs.flat[qoff:] . xq.flat[xoff:]; the blocks' scales
        are at d.flat[row:] (weights) and dx.flat[tok:] (x). tokens=2: acc, xoff and tok are
        pairs, two tokens against the same weights, which are loaded and split once (faster
        prefill; docs/benchmarks.md). chunks > 1 (one token): that many chunks
        of n blocks one after the other, their blocks' float terms widened and multiplied once
        for all of them, not chunk by chunk."""
        def codegen(context, builder, sig, args):
            W = 16 * n                                             # weight bytes in the chunk
            zero = ir.Constant(_vec(I32, 4 * n), [0] * (4 * n))

            def split(k):                                          # chunk k's low, high nibbles
                at = builder.add(args[2], ir.Constant(args[2].type, W * k))
                v = _load(context, builder, sig.args[1], args[1], at, I8, W)
                return (builder.and_(v, ir.Constant(_vec(I8, W), [15] * W)),
                        builder.lshr(v, ir.Constant(_vec(I8, W), [4] * W)))

            def dot(lo, hi, xoff):                                 # a chunk's integer sums
                def one(part, start):                              # this part: lows, then highs
                    at = builder.add(xoff, ir.Constant(xoff.type, 2 * W * part))
                    xl = _load(context, builder, sig.args[3], args[3], at, I8, W)
                    xh = _load(context, builder, sig.args[3], args[3],
                               builder.add(at, ir.Constant(xoff.type, W)), I8, W)
                    return _vpdpbusd(builder, _vpdpbusd(builder, start, lo, xl), hi, xh)
                return _parts(builder, one, limbs, zero)
            if tokens == 1:
                scale, offset = _scales(context, builder, sig, args, n * chunks)
                acc = args[0]
                for k in range(chunks):
                    lo, hi = split(k)
                    xoff = builder.add(args[4], ir.Constant(args[4].type, 2 * W * limbs * k))
                    mine = ir.Constant(_vec(I32, n), list(range(n * k, n * k + n)))   # its blocks
                    acc = _finish(builder, acc, dot(lo, hi, xoff), builder.shuffle_vector(
                        scale, scale, mine), builder.shuffle_vector(offset, offset, mine))
                return acc
            lo, hi = split(0)
            pick = (lambda a, i: builder.extract_value(a, i))
            out = []
            for i in range(tokens):
                xoff, tok = pick(args[4], i), pick(args[10], i)
                one_token = list(args[:4]) + [xoff] + list(args[5:10]) + [tok]
                out.append(_finish(builder, pick(args[0], i), dot(lo, hi, xoff),
                                   *_scales(context, builder, sig, one_token, n)))
            return context.make_tuple(builder, sig.return_type, out)
        return acc(acc, qs, qoff, xq, xoff, d, dx, e, c, row, tok), codegen
    return q4_chunk


def _make_q8_chunk(n, limbs=1, chunks=1):
    @intrinsic
    def q8_chunk(typingctx, acc, qs, qoff, xq, xoff, d, dx, start, row, tok):
        """acc + the n blocks of a Q8_0 row . x, computed as (q + 128) . xq, the lanes starting
        from start.flat[8 tok:] = -128 * (sum of the 4 values of x each lane meets), which takes
        the 128 off again (see the top). chunks > 1: that many chunks of n blocks one after the
        other, their blocks' scales (d * dx) widened and multiplied once for all of them, not
        chunk by chunk (fewer instructions a block; docs/benchmarks.md)."""
        def codegen(context, builder, sig, args):
            W, nbk = 32 * n, n * chunks
            scale = builder.fmul(_load_scales(context, builder, sig.args[5], args[5], args[8], nbk),
                                 _load_scales(context, builder, sig.args[6], args[6], args[9], nbk),
                                 flags=["fast"])                  # [nbk]: d * dx of each block
            acc = args[0]
            for c in range(chunks):
                at_q, at_x = (builder.add(a, ir.Constant(a.type, k * c))
                              for a, k in ((args[2], W), (args[4], W * limbs)))
                q = builder.xor(_load(context, builder, sig.args[1], args[1], at_q, I8, W),
                                ir.Constant(_vec(I8, W), [-128] * W))  # q + 128, as unsigned bytes

                def one(part, s, q=q, at_x=at_x):
                    at = builder.add(at_x, ir.Constant(at_x.type, W * part))
                    xs = _load(context, builder, sig.args[3], args[3], at, I8, W)
                    return _vpdpbusd(builder, s, q, xs)
                blk = builder.add(args[9], ir.Constant(args[9].type, n * c))  # its first block of x
                s0 = _load(context, builder, sig.args[7], args[7],           # (8 lanes a block)
                           builder.mul(blk, ir.Constant(blk.type, 8)), I32, 8 * n)
                mine = ir.Constant(_vec(I32, n), list(range(n * c, n * c + n)))   # its blocks
                acc = _finish(builder, acc, _parts(builder, one, limbs, s0),
                              builder.shuffle_vector(scale, scale, mine), None)
            return acc
        return acc(acc, qs, qoff, xq, xoff, d, dx, start, row, tok), codegen
    return q8_chunk


def _make_q8_tile(n, limbs, R=4, C=2):
    @intrinsic
    def q8_tile(typingctx, accs, qs, qoffs, xq, xoffs, d, dx, start, rows, toks):
        """_make_q8_chunk's step for R rows and C tokens at once (prefill, batches): accs[C r + t]
        + the n blocks of row r . those of token t. Each row's bytes are loaded and shifted once
        for the C tokens, each token's parts and start lanes once for the R rows: R x C dot
        products on the loads of R + C. qoffs, rows: the rows' offsets in qs and d; xoffs, toks: the
        tokens' in xq and dx (all flat)."""
        def codegen(context, builder, sig, args):
            W = 32 * n
            pick = (lambda a, i: builder.extract_value(a, i))
            q = [builder.xor(_load(context, builder, sig.args[1], args[1], pick(args[2], r), I8, W),
                             ir.Constant(_vec(I8, W), [-128] * W)) for r in range(R)]
            d = [_load_scales(context, builder, sig.args[5], args[5], pick(args[8], r), n)
                 for r in range(R)]
            out = [None] * (R * C)
            for t in range(C):
                xoff, tok = pick(args[4], t), pick(args[9], t)
                xs = [_load(context, builder, sig.args[3], args[3],
                            builder.add(xoff, ir.Constant(xoff.type, W * p)), I8, W) for p in range(limbs)]
                s0 = _load(context, builder, sig.args[7], args[7],
                           builder.mul(tok, ir.Constant(tok.type, 8)), I32, 8 * n)
                dx = _load_scales(context, builder, sig.args[6], args[6], tok, n)
                for r in range(R):
                    isum = _parts(builder, lambda p, s, r=r: _vpdpbusd(builder, s, q[r], xs[p]),
                                  limbs, s0)
                    out[C * r + t] = _finish(builder, pick(args[0], C * r + t), isum,
                                             builder.fmul(d[r], dx, flags=["fast"]), None)
            return context.make_tuple(builder, sig.return_type, out)
        return accs(accs, qs, qoffs, xq, xoffs, d, dx, start, rows, toks), codegen
    return q8_tile


def _reduce(builder, op, v, start=None):
    """One number from a vector: llvm.vector.reduce.<op> (fmax, fadd: in any order; add)."""
    t = v.type.element
    name = f"llvm.vector.reduce.{op}.v{v.type.count}{'f32' if t == F32 else 'i32'}"
    args = [v] if start is None else [start, v]
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(t, [a.type for a in args]), name)
    return builder.call(fn, args, fastmath=("fast",) if t == F32 else ())


@intrinsic
def _absmax_sum(typingctx, x, off):
    """(max |x|, sum of x) over the 32 values x.flat[off:off + 32]."""
    def codegen(context, builder, sig, args):
        v = _load(context, builder, sig.args[0], args[0], args[1], F32, QK)
        fabs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v.type, [v.type]),
                                              "llvm.fabs.v32f32")
        amax = _reduce(builder, "fmax", builder.call(fabs, [v]))
        total = _reduce(builder, "fadd", v, ir.Constant(F32, -0.0))
        return context.make_tuple(builder, sig.return_type, [amax, total])
    if x.layout == "C":                       # flat offsets: C-contiguous arrays only
        return types.UniTuple(types.float32, 2)(x, off), codegen


def _make_digits(limbs, sums=True):
    def codegen(context, builder, sig, args):
        v = _load(context, builder, sig.args[0], args[0], args[1], F32, QK)
        rint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v.type, [v.type]),
                                              "llvm.rint.v32f32")
        r = builder.fmul(v, _splat(builder, args[2], QK))
        X = builder.fptosi(builder.call(rint, [r]), _vec(I32, QK))
        if sums:
            by4 = [builder.shuffle_vector(X, X, ir.Constant(_vec(I32, QK // 4), list(range(j, QK, 4))))
                   for j in range(4)]                              # X[j::4]
            s4 = builder.add(builder.add(by4[0], by4[1]), builder.add(by4[2], by4[3]))
            ptr4 = context.make_array(sig.args[7])(context, builder, args[7]).data
            at4 = builder.bitcast(builder.gep(ptr4, [args[8]]), s4.type.as_pointer())
            builder.store(s4, at4, align=4)
        data = context.make_array(sig.args[3])(context, builder, args[3]).data
        ints = (lambda k: ir.Constant(_vec(I32, QK), [k] * QK))   # k in every lane

        def store(p, d):                                           # digit p: two halves of 16
            b8 = builder.trunc(d, _vec(I8, QK))
            at = builder.add(args[4], builder.mul(args[6], ir.Constant(args[6].type, p)))
            for half, off in ((0, at), (1, builder.add(at, args[5]))):
                pick = ir.Constant(_vec(I32, 16), list(range(16 * half, 16 * half + 16)))
                h = builder.shuffle_vector(b8, b8, pick)
                ptr = builder.bitcast(builder.gep(data, [off]), _vec(I8, 16).as_pointer())
                builder.store(h, ptr, align=1)
        for p in range(limbs - 1, 0, -1):                          # -64..63, the lowest first
            up = builder.ashr(builder.add(X, ints(64)), ints(7))           # floor((X + 64) / 128)
            store(p, builder.sub(X, builder.shl(up, ints(7))))
            X = up
        store(0, X)                                                # the top one: -127..127
        return context.get_dummy_value()

    if sums:
        @intrinsic
        def digits(typingctx, x, off, mul, xq, at, gap, stride, x4, at4):
            """Round the 32 values x.flat[off:] to X = rint(x mul), store X's `limbs` digits in
            base 128 (quantize_x) as int8 at xq.flat[at + p stride:] (digit p; the block's first
            16 values there, the other 16 `gap` bytes on) and the sums of X by 4 at
            x4.flat[at4:]."""
            if x.layout == "C" and xq.layout == "C" and x4.layout == "C":
                return types.none(x, off, mul, xq, at, gap, stride, x4, at4), codegen
        return digits

    @intrinsic
    def digits_bare(typingctx, x, off, mul, xq, at, gap, stride):
        """The same digits, without the sums by 4."""
        if x.layout == "C" and xq.layout == "C":
            return types.none(x, off, mul, xq, at, gap, stride), codegen
    return digits_bare


_digits1, _digits3 = _make_digits(1), _make_digits(3)
# without the sums by 4 (the panels of cpu/quant_panel.py do not read them)
_digits1_bare, _digits3_bare = _make_digits(1, sums=False), _make_digits(3, sums=False)


@intrinsic
def _zeros16x8(typingctx):
    """8 zero accumulators: a Q8_0 tile's (4 rows x 2 tokens)."""
    def codegen(context, builder, sig, args):
        zero = ir.Constant(_vec(F32, 16), [0.0] * 16)
        return context.make_tuple(builder, sig.return_type, [zero] * 8)
    return types.UniTuple(F32x16, 8)(), codegen



PREFETCH_ROWS = 8           # rows ahead: the hardware prefetcher alone left ~10% on the table


_q4_4, _q4_2, _q4_1 = _make_q4_chunk(4), _make_q4_chunk(2), _make_q4_chunk(1)
_q8_2, _q8_1 = _make_q8_chunk(2), _make_q8_chunk(1)
_q4_4x3, _q4_2x3, _q4_1x3 = _make_q4_chunk(4, 3), _make_q4_chunk(2, 3), _make_q4_chunk(1, 3)
_q4_4x3_2t = _make_q4_chunk(4, 3, tokens=2)
_q4_16, _q4_16x3 = _make_q4_chunk(4, chunks=4), _make_q4_chunk(4, 3, chunks=4)   # 16 blocks
_q8_2x3, _q8_1x3 = _make_q8_chunk(2, 3), _make_q8_chunk(1, 3)
_q8_16, _q8_16x3 = _make_q8_chunk(2, chunks=8), _make_q8_chunk(2, 3, chunks=8)   # 16 blocks
_q8_tile2, _q8_tile1 = _make_q8_tile(2, 1), _make_q8_tile(1, 1)
_q8_tile2x3, _q8_tile1x3 = _make_q8_tile(2, 3), _make_q8_tile(1, 3)


# ---------------------------------------------------------------------------------------------
# Rows of dot products and the matmul kernels. Threads take tiles of ~ROWS rows: each tile is one
# call of a row function (a call per row cost ~30 ns in reference counting of its array
# arguments, as much as the row's arithmetic). The tiles come in a multiple of TILES, so that 1,
# 2, 3, 4, 6, 8 or 12 threads each get as many rows: 576 rows in tiles of 64 made 9 tiles, 5 for
# one thread and 4 for the other, and the matmul took as long as 640 rows would. (The thread
# count itself is not read in here: numba cannot cache a kernel that asks for it.)
# ---------------------------------------------------------------------------------------------
ROWS, TILES = 64, 24


@njit(cache=True)
def _tiles(O):
    """How many tiles O rows make: the multiple of TILES whose tiles come nearest to ROWS rows
    (576 rows: 24 tiles of 24; 1536: 24 of 64). Tile i holds rows i O // n .. (i + 1) O // n - 1
    (none when O < TILES)."""
    return TILES * max(1, (O + ROWS * TILES // 2) // (ROWS * TILES))


@njit(fastmath=True, cache=True)
def _rows(xi, qs, d, m, t, o0, o1, out, pf, limbs):
    """out[o - o0] = row o of the matrix . token t of x, for o in o0..o1-1; xi = (xq, dx, c, s0)
    from _prepare_x. Q4 (m: its mins [O, nb]): c = sum(x) / 4 per block, so the lanes add up
    the m term, sum_b m_b sum(x over b). Q8_0 (m: an empty 1-D array): the lanes start from s0,
    which takes off the q + 128 shift. pf: prefetch the row that many rows ahead. limbs: x's
    int8 parts (1 or 3)."""
    xq, dx, c, s0 = xi
    q8 = m.ndim == 1        # a constant when numba compiles: only one format's code is compiled
    n, nb = qs.shape[1], d.shape[1]                     # bytes and blocks per row
    K = nb * QK * limbs                                 # x's bytes per token
    last = qs.shape[0] * n - 1
    for o in range(o0, o1):
        if pf > 0:
            if q8 or limbs == 1:                        # (see _prefetch_l2)
                for k in range(0, n, 64):
                    _prefetch_l2(qs, min(last, (o + pf) * n + k))
            else:
                for k in range(0, n, 64):
                    _prefetch(qs, min(last, (o + pf) * n + k))
        acc = _zeros16()
        b, row, tok = 0, o * nb, t * nb                 # block b's scales: d.flat[row + b], dx.flat[tok + b]
        x0 = t * K                                      # block b's parts of x: xq.flat[x0 + b QK limbs:]
        if q8:                                          # 16 blocks a step, then 2, then 1
            while b + 16 <= nb:
                if limbs == 3:
                    acc = _q8_16x3(acc, qs, o * n + b * QK, xq, x0 + b * QK * 3, d, dx, s0, row + b, tok + b)
                else:
                    acc = _q8_16(acc, qs, o * n + b * QK, xq, x0 + b * QK, d, dx, s0, row + b, tok + b)
                b += 16
            while b + 2 <= nb:
                if limbs == 3:
                    acc = _q8_2x3(acc, qs, o * n + b * QK, xq, x0 + b * QK * 3, d, dx, s0, row + b, tok + b)
                else:
                    acc = _q8_2(acc, qs, o * n + b * QK, xq, x0 + b * QK, d, dx, s0, row + b, tok + b)
                b += 2
            if b < nb:
                if limbs == 3:
                    acc = _q8_1x3(acc, qs, o * n + b * QK, xq, x0 + b * QK * 3, d, dx, s0, row + b, tok + b)
                else:
                    acc = _q8_1(acc, qs, o * n + b * QK, xq, x0 + b * QK, d, dx, s0, row + b, tok + b)
        else:                                           # 16 blocks a step, 4, then 2 and/or 1
            while b + 16 <= nb:
                if limbs == 3:
                    acc = _q4_16x3(acc, qs, o * n + b * 16, xq, x0 + b * QK * 3, d, dx, m, c, row + b, tok + b)
                else:
                    acc = _q4_16(acc, qs, o * n + b * 16, xq, x0 + b * QK, d, dx, m, c, row + b, tok + b)
                b += 16
            while b + 4 <= nb:
                if limbs == 3:
                    acc = _q4_4x3(acc, qs, o * n + b * 16, xq, x0 + b * QK * 3, d, dx, m, c, row + b, tok + b)
                else:
                    acc = _q4_4(acc, qs, o * n + b * 16, xq, x0 + b * QK, d, dx, m, c, row + b, tok + b)
                b += 4
            if b + 2 <= nb:
                if limbs == 3:
                    acc = _q4_2x3(acc, qs, o * n + b * 16, xq, x0 + b * QK * 3, d, dx, m, c, row + b, tok + b)
                else:
                    acc = _q4_2(acc, qs, o * n + b * 16, xq, x0 + b * QK, d, dx, m, c, row + b, tok + b)
                b += 2
            if b < nb:
                if limbs == 3:
                    acc = _q4_1x3(acc, qs, o * n + b * 16, xq, x0 + b * QK * 3, d, dx, m, c, row + b, tok + b)
                else:
                    acc = _q4_1(acc, qs, o * n + b * 16, xq, x0 + b * QK, d, dx, m, c, row + b, tok + b)
        out[o - o0] = _sum16(acc)


@njit(fastmath=True, cache=True)
def _rows_pair(xi, qs, d, m, t, o0, o1, out0, out1, pf):
    """_rows for tokens t and t + 1 at once, 4-bit weights and x in three parts: each 4-block
    chunk of a row is loaded once for both tokens (the arithmetic bounds these kernels, and the
    load and nibble split were ~1/5 of it); the rest of a row goes a token at a time."""
    xq, dx, c, _ = xi
    n, nb = qs.shape[1], d.shape[1]
    K = nb * QK * 3                                     # x's bytes per token
    last = qs.shape[0] * n - 1
    for o in range(o0, o1):
        if pf > 0:
            for k in range(0, n, 64):
                _prefetch(qs, min(last, (o + pf) * n + k))
        acc = (_zeros16(), _zeros16())
        b, row, tok = 0, o * nb, t * nb                 # token t + 1: x K bytes, dx nb blocks on
        x0 = t * K
        while b + 4 <= nb:
            acc = _q4_4x3_2t(acc, qs, o * n + b * 16, xq, (x0 + b * QK * 3, x0 + K + b * QK * 3),
                             d, dx, m, c, row + b, (tok + b, tok + nb + b))
            b += 4
        a0, a1 = acc
        if b + 2 <= nb:
            a0 = _q4_2x3(a0, qs, o * n + b * 16, xq, x0 + b * QK * 3, d, dx, m, c, row + b, tok + b)
            a1 = _q4_2x3(a1, qs, o * n + b * 16, xq, x0 + K + b * QK * 3, d, dx, m, c, row + b,
                         tok + nb + b)
            b += 2
        if b < nb:
            a0 = _q4_1x3(a0, qs, o * n + b * 16, xq, x0 + b * QK * 3, d, dx, m, c, row + b, tok + b)
            a1 = _q4_1x3(a1, qs, o * n + b * 16, xq, x0 + K + b * QK * 3, d, dx, m, c, row + b,
                         tok + nb + b)
        out0[o - o0] = _sum16(a0)
        out1[o - o0] = _sum16(a1)


@njit(fastmath=True, cache=True)
def _rows_pair_q8(xi, qs, d, m, t, o0, o1, out0, out1, pf, limbs):
    """_rows for tokens t and t + 1 of a Q8_0 matrix, 4 rows at a time (_make_q8_tile): each
    2-block chunk of 4 rows is loaded once for both tokens, and each token's x once for the 4
    rows (each load serves 8 dot products: faster prefill, docs/benchmarks.md). The last
    o1 - o0 mod 4 rows go a token at a time."""
    xq, dx, _, s0 = xi
    n, nb = qs.shape[1], d.shape[1]
    K = nb * QK * limbs                                 # x's bytes per token
    last = qs.shape[0] * n - 1
    o = o0
    while o + 4 <= o1:
        if pf > 0:
            for k in range(0, 4 * n, 64):
                _prefetch(qs, min(last, (o + pf) * n + k))
        acc = _zeros16x8()                              # acc[2 r + j]: row o + r, token t + j
        b, tok, x0 = 0, t * nb, t * K
        while b < nb:
            qoffs = (o * n + b * QK, (o + 1) * n + b * QK, (o + 2) * n + b * QK, (o + 3) * n + b * QK)
            rows = (o * nb + b, (o + 1) * nb + b, (o + 2) * nb + b, (o + 3) * nb + b)
            xoffs = (x0 + b * QK * limbs, x0 + K + b * QK * limbs)
            toks = (tok + b, tok + nb + b)
            if b + 2 <= nb:                             # 2 blocks a chunk, then 1
                if limbs == 3:
                    acc = _q8_tile2x3(acc, qs, qoffs, xq, xoffs, d, dx, s0, rows, toks)
                else:
                    acc = _q8_tile2(acc, qs, qoffs, xq, xoffs, d, dx, s0, rows, toks)
                b += 2
            else:
                if limbs == 3:
                    acc = _q8_tile1x3(acc, qs, qoffs, xq, xoffs, d, dx, s0, rows, toks)
                else:
                    acc = _q8_tile1(acc, qs, qoffs, xq, xoffs, d, dx, s0, rows, toks)
                b += 1
        for r in range(4):
            out0[o + r - o0] = _sum16(acc[2 * r])
            out1[o + r - o0] = _sum16(acc[2 * r + 1])
        o += 4
    if o < o1:
        _rows(xi, qs, d, m, t, o, o1, out0[o - o0:], pf, limbs)           # m: empty, Q8_0's
        _rows(xi, qs, d, m, t + 1, o, o1, out1[o - o0:], pf, limbs)


@njit(fastmath=True, cache=True)
def _quantize_x(x, q4_order, limbs):
    """quantize_x, a block at a time in vector code (_absmax_sum, _digits: plain loops over the
    values, with the parts and the layout's index arithmetic inside, were several times slower)."""
    T, K = x.shape
    nb = K // QK
    xq = np.empty((T, K * limbs), dtype=np.int8)
    dx = np.empty((T, nb), dtype=np.float32)
    xsum = np.empty((T, nb), dtype=np.float32)
    x4 = np.empty((T, K // 4), dtype=np.int32)
    step = float32(1 << (7 * (limbs - 1)))              # 128^(limbs - 1)
    for t in range(T):
        b = 0
        while b < nb:
            n = 4 if q4_order and nb - b >= 4 else (2 if nb - b >= 2 else 1)   # this chunk's blocks
            for i in range(b, b + n):
                amax, xsum[t, i] = _absmax_sum(x, t * K + i * QK)
                inv = float32(127.0) / amax if amax > float32(0.0) else float32(0.0)
                dx[t, i] = amax / float32(127.0)
                # Q4 order: block i's low half, then its high half 16 n further on
                at = t * K * limbs + b * QK * limbs + (i - b) * (QK // 2 if q4_order else QK)
                gap = 16 * n if q4_order else QK // 2
                o = t * K + i * QK
                if limbs == 3:
                    _digits3(x, o, inv * step, xq, at, gap, QK * n, x4, o // 4)
                else:
                    _digits1(x, o, inv * step, xq, at, gap, QK * n, x4, o // 4)
            b += n
    if limbs > 1:       # the scale of X, not of q1: exact (a power of two), and apart, so that
        dx *= float32(2.0 ** (-7 * (limbs - 1)))    # dx for one part is computed the same way
    return xq, dx, xsum, x4


@njit(fastmath=True, cache=True)
def _prepare_x(x, q8, limbs):
    """x -> (xq, dx, c, s0): c, Q4's per-block term each int32 lane adds; s0, Q8_0's start values
    of the lanes (see _rows)."""
    xq, dx, xsum, x4 = _quantize_x(x, not q8, limbs)
    if q8:
        x4 *= int32(-128)           # sum of (q + 128) X over a lane's 4 values, from here: q . X
    return xq, dx, float32(0.25) * xsum, x4


@njit(fastmath=True, cache=True)
def _tokens(xi, qs, d, m, t, o0, o1, out, pf, limbs):
    """Rows o0..o1-1 against token t of x into out[t, o0:o1] — and token t + 1 with it, for
    Q8_0 (_rows_pair_q8), and for 4-bit weights with x in three parts (_rows_pair). Returns how
    many tokens it did."""
    if t + 2 <= out.shape[0]:
        if m.ndim == 1:                                 # Q8_0 (known when numba compiles this)
            _rows_pair_q8(xi, qs, d, m, t, o0, o1, out[t, o0:o1], out[t + 1, o0:o1], pf, limbs)
            return 2
        if limbs == 3:
            _rows_pair(xi, qs, d, m, t, o0, o1, out[t, o0:o1], out[t + 1, o0:o1], pf)
            return 2
    _rows(xi, qs, d, m, t, o0, o1, out[t, o0:o1], pf, limbs)
    return 1


@njit(inline="always")
def _tile(xi, qs, d, m, o0, o1, out, pf, limbs):
    """Rows o0..o1-1 against every token of x: out[:, o0:o1]."""
    t = 0
    while t < out.shape[0]:
        t += _tokens(xi, qs, d, m, t, o0, o1, out, pf, limbs)


@njit(inline="always", fastmath=True)
def _gate_up_tile(xi, qg, dg, mg, qu, du, mu, o0, o1, out, up, pf, limbs):
    """out[:, o0:o1] = silu(gate rows) * (up rows), up[:, o0:o1] the scratch for the latter."""
    t = 0
    while t < out.shape[0]:
        step = _tokens(xi, qg, dg, mg, t, o0, o1, out, pf, limbs)
        _tokens(xi, qu, du, mu, t, o0, o1, up, pf, limbs)             # the same step: same format
        for tt in range(t, t + step):
            for o in range(o0, o1):
                g = out[tt, o]
                out[tt, o] = g / (float32(1.0) + exp32(-g)) * up[tt, o]
        t += step


@njit(parallel=True, fastmath=True, cache=True)
def _matmul_i8(x, qs, d, m, pf, limbs):
    """x [T, K] -> [T, O]. m: Q4's [O, nb] mins, or an empty 1-D array for Q8_0 (_NO_M: numba
    compiles a kernel for each, each without the other format's code)."""
    xi = _prepare_x(x, m.ndim == 1, limbs)
    T, O = x.shape[0], qs.shape[0]
    out = np.empty((T, O), dtype=np.float32)
    n = _tiles(O)
    for tile in prange(n):
        _tile(xi, qs, d, m, tile * O // n, (tile + 1) * O // n, out, pf, limbs)
    return out


@njit(parallel=True, fastmath=True, cache=True)
def _gate_up_i8(x, qg, dg, mg, qu, du, mu, pf, limbs):
    """silu(x wg^T) * (x wu^T) in one pass over the rows. [T, K] -> [T, F]."""
    xi = _prepare_x(x, mg.ndim == 1, limbs)
    T, F = x.shape[0], qg.shape[0]
    out = np.empty((T, F), dtype=np.float32)
    up = np.empty((T, F), dtype=np.float32)
    n = _tiles(F)
    for tile in prange(n):
        _gate_up_tile(xi, qg, dg, mg, qu, du, mu, tile * F // n, (tile + 1) * F // n, out, up, pf, limbs)
    return out


_NO_M = np.zeros(0, dtype=np.float32)    # Q8_0 has no mins: 1-D, where Q4's are [O, nb]


# ---------------------------------------------------------------------------------------------
# Entry points (any T: with int8 activations the prefill runs these kernels too)
# ---------------------------------------------------------------------------------------------
def quant_linear_i8(x: np.ndarray, w: QuantMatrix, limbs: int = 1) -> np.ndarray:
    """x [T, K] -> [T, O] with x rounded to int8 per block (limbs 3: split into three int8 parts,
    as exact as float32)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return _matmul_i8(x, w.qs, bits(w.d), _NO_M if w.fmt == "Q8_0" else bits(w.m), PREFETCH_ROWS,
                      limbs)


def quant_gate_up_i8(x: np.ndarray, wg: QuantMatrix, wu: QuantMatrix, limbs: int = 1) -> np.ndarray:
    """silu(x wg^T) * (x wu^T), x rounded to int8 per block (or split in three). [T, K] -> [T, F]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if wg.fmt == "Q8_0":
        return _gate_up_i8(x, wg.qs, bits(wg.d), _NO_M, wu.qs, bits(wu.d), _NO_M, PREFETCH_ROWS, limbs)
    return _gate_up_i8(x, wg.qs, bits(wg.d), bits(wg.m), wu.qs, bits(wu.d), bits(wu.m),
                       PREFETCH_ROWS, limbs)
