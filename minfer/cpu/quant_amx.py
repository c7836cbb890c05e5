"""The panels' byte dot products on the CPU's tile unit (Intel AMX), for steps of several rows.

quant_panel.py multiplies a panel's block (16 weight rows x 32 weights) by one token with 8
`vpdpbusd`, each 16 x 4 byte products, per part of x. AMX (Xeons from Sapphire Rapids on) has
eight tile registers of up to 16 rows x 64 bytes and one instruction, `tdpbsud`, that multiplies
two of them into a third:

    C[i, r] += sum_k A[i, k] B[k // 4, 4 r + k % 4]      A: rows i of x, 32 bytes (signed)
                                                          B: 8 rows of 16 weights x 4 (unsigned)

A panel's block as quant_panel.PanelMatrix lays it out *is* B: vector c holds bytes 4c..4c+3 of
the 16 rows (a Q4 block unpacked into its low and high nibbles first, Q8_0's as stored). And
quant_panel.prepare_x stores a token's parts one after the other, so the rows i = (token t, part
p) of x are K bytes apart and one tile load takes 16 of them. One instruction then does what 128
`vpdpbusd` do.

A block's sums cannot be added up in the tile across blocks: each block has its own scales. So
for each block the tile of sums goes to memory (`tilestored`) and the vector unit scales and adds
them as quant_panel does — the same integers, the same float work:

    for each panel p, block b:   C = A(b) B(p, b)  ->  sums  (tile unit)
                                 y[t, r] += X[t, r] d[r, b] dx[t, b] (+ m[r, b] sum(x[t, b]))
                                 X[t, r] = the parts' sums, (s0 128 + s1) 128 + s2

What the loop below does for speed: nothing waits for a result just asked for. The sums of block
b are stored while the tile unit does block b + 1 (two sets of tiles, taken in turns: a store
right after its products waits for the tile unit's latency), and scaled while it does block b + 3
(loads right after a tile store wait for the store); Q4 blocks are unpacked 4 blocks ahead (a
tile load right after the stores that wrote its bytes waits for them too), and Q8_0 blocks
copied 4 ahead the same way (a tile load straight from the weights streaming in waited for
memory; the copy's vector loads run ahead of it); and a pass takes up to
30 rows (10 tokens of three parts, or 16 of one), whose sums stay in 16 registers. Even so the
tile unit pays from a few rows on, not from one (docs/benchmarks.md, "CPU kernel details").

A process asks Linux for the tile registers once (simd.has_amx(), called when this module is
imported). A thread loads the tiles' shapes (`ldtilecfg`) when they change, and lets the tiles
go (`tilerelease`, done()) at the end of its walk of a step, so that no tile state outlives it.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..stages.quant import QK
from ..stages.simd import (F32, I8, I32, F32x16, _load, _load_scales, _prefetch_l2, _splat, _store16,
                           _vec, _zeros, has_amx)
from . import quant_gemm
from .quant_panel import PREFETCH_BYTES, ROWS, _nibbles, _scalar, _scale_add

TOKENS = 16                        # accumulators a pass: 16 tokens of one part, 10 of three
AHEAD = 4                          # blocks unpacked (Q4) or copied (Q8_0) ahead of the tile loads
LAG = 3                            # a block's sums are scaled this many blocks after its products

available = has_amx
available()                        # the process asks for the tile registers, once


# ---------------------------------------------------------------------------------------------
# The tile instructions, as LLVM's intrinsics (tile numbers are literals: they are registers)
# ---------------------------------------------------------------------------------------------
def _call(builder, name, args):
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [a.type for a in args]), name)
    builder.call(fn, args)


def _address(context, builder, arrty, arr, offset):
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [offset]), I8.as_pointer())


@intrinsic
def _configure(typingctx, cfg):
    """Load the tile configuration in cfg (64 bytes: the palette, then each tile's shape)."""
    def codegen(context, builder, sig, args):
        _call(builder, "llvm.x86.ldtilecfg",
              [_address(context, builder, sig.args[0], args[0], ir.Constant(ir.IntType(64), 0))])
        return context.get_dummy_value()
    return types.none(cfg), codegen


@intrinsic
def _release(typingctx):
    def codegen(context, builder, sig, args):
        _call(builder, "llvm.x86.tilerelease", [])
        return context.get_dummy_value()
    return types.none(), codegen


@intrinsic
def _products(typingctx, s, wts, woff, xq, xoff, K, two):
    """One block's products on the tile unit, with set s (0 or 1, a literal) of tiles: B (tile
    6 + s) = the block's weights at wts.flat[woff:]; sums C (tile 2 s) = A (tile 4: x's first 16
    rows at xq.flat[xoff:], K bytes apart) . B; and, if two, C (tile 2 s + 1) = A (tile 5: the
    rows from 16 on) . B."""
    if not isinstance(s, types.IntegerLiteral):
        return None
    c, b = 2 * s.literal_value, 6 + s.literal_value

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        reg = (lambda t: ir.Constant(I8, t))
        _call(builder, "llvm.x86.tileloadd64",
              [reg(b), _address(context, builder, sig.args[1], args[1], args[2]), ir.Constant(i64, 64)])
        K = builder.sext(args[5], i64)
        second = builder.add(args[4], builder.mul(args[5], ir.Constant(args[5].type, 16)))
        for j, a, x in ((0, 4, args[4]), (1, 5, second)):
            def products():
                _call(builder, "llvm.x86.tilezero", [reg(c + j)])
                _call(builder, "llvm.x86.tileloadd64",
                      [reg(a), _address(context, builder, sig.args[3], args[3], x), K])
                _call(builder, "llvm.x86.tdpbsud", [reg(c + j), reg(a), reg(b)])
            if j == 0:
                products()
            else:
                with builder.if_then(args[6]):
                    products()
        return context.get_dummy_value()
    return types.none(s, wts, woff, xq, xoff, K, two), codegen


@intrinsic
def _store_sums(typingctx, s, sums, soff, two):
    """Set s's sums (tile 2 s, and 2 s + 1 if two) to sums.flat[soff:] (16 int32 a row; the
    second tile's rows from soff + 16 16 on)."""
    if not isinstance(s, types.IntegerLiteral):
        return None
    c = 2 * s.literal_value

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        at = (lambda off: _address(context, builder, sig.args[1], args[1], off))
        _call(builder, "llvm.x86.tilestored64", [ir.Constant(I8, c), at(args[2]), ir.Constant(i64, 64)])
        with builder.if_then(args[3]):
            _call(builder, "llvm.x86.tilestored64",
                  [ir.Constant(I8, c + 1), at(builder.add(args[2], ir.Constant(args[2].type, 16 * ROWS))),
                   ir.Constant(i64, 64)])
        return context.get_dummy_value()
    return types.none(s, sums, soff, two), codegen


@intrinsic
def _unpack_q4(typingctx, qp, offset, out, at):
    """A Q4 panel block (4 vectors at qp.flat[offset:]) as B's 8 rows: the low nibbles of each
    vector (elements 4c + j), then the high ones (16 + 4c + j), one byte each, at out.flat[at:]."""
    def codegen(context, builder, sig, args):
        v = [_load(context, builder, sig.args[0], args[0],
                   builder.add(args[1], ir.Constant(args[1].type, 64 * c)), I8, 64) for c in range(4)]
        rows = _nibbles(builder, v)                              # as the panels read them
        data = context.make_array(sig.args[2])(context, builder, args[2]).data
        for i, r in enumerate(rows):
            at = builder.add(args[3], ir.Constant(args[3].type, 64 * i))
            builder.store(r, builder.bitcast(builder.gep(data, [at]), _vec(I8, 64).as_pointer()),
                          align=1)
        return context.get_dummy_value()
    return types.none(qp, offset, out, at), codegen


@intrinsic
def _copy_q8(typingctx, qp, offset, out, at):
    """A Q8_0 panel block (8 vectors at qp.flat[offset:], already B's 8 rows) to out.flat[at:]."""
    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[2])(context, builder, args[2]).data
        for c in range(8):
            v = _load(context, builder, sig.args[0], args[0],
                      builder.add(args[1], ir.Constant(args[1].type, 64 * c)), I8, 64)
            to = builder.add(args[3], ir.Constant(args[3].type, 64 * c))
            builder.store(v, builder.bitcast(builder.gep(data, [to]), _vec(I8, 64).as_pointer()),
                          align=1)
        return context.get_dummy_value()
    return types.none(qp, offset, out, at), codegen


# ---------------------------------------------------------------------------------------------
# A block's sums, scaled and added: quant_panel's float work on the tile unit's integers
# ---------------------------------------------------------------------------------------------
def _make_scale(q8, limbs):
    @intrinsic
    def scale(typingctx, accs, sums, soff, n, d, m, doff, dx, xsum, start, tok, nb):
        """accs[t] += the block's sums for token t < n (part p's 16 int32 at sums.flat[soff +
        16 (t limbs + p):]), scaled by d.flat[doff:] and dx.flat[tok + t nb] (+ Q4's m term;
        Q8_0's start values at start.flat[(tok + t nb) limbs:]); accs[t] for t >= n unchanged."""
        def codegen(context, builder, sig, args):
            accs, sums, soff, n = args[0], args[1], args[2], args[3]
            tok0, nbv = args[10], args[11]
            dv = _load_scales(context, builder, sig.args[4], args[4], args[6], 16)
            mv = None if q8 else _load_scales(context, builder, sig.args[5], args[5], args[6], 16)
            k128 = ir.Constant(_vec(F32, 16), [128.0] * 16)
            out = []
            for t in range(sig.args[0].count):
                old = builder.extract_value(accs, t)
                tok = builder.add(tok0, builder.mul(nbv, ir.Constant(nbv.type, t)))
                inside = builder.icmp_signed("<", ir.Constant(n.type, t), n)
                before = builder.block
                with builder.if_then(inside, likely=True):
                    parts = []
                    for p in range(limbs):
                        at = builder.add(soff, ir.Constant(soff.type, 16 * (t * limbs + p)))
                        s = _load(context, builder, sig.args[1], sums, at, I32, 16)
                        if q8:         # -128 sum(x): takes off the + 128 of the weights
                            first = builder.add(builder.mul(tok, ir.Constant(tok.type, limbs)),
                                                ir.Constant(tok.type, p))
                            s = builder.add(s, _splat(builder, _scalar(
                                context, builder, sig.args[9], args[9], first, I32), 16))
                        parts.append(builder.sitofp(s, _vec(F32, 16)))
                    isum = parts[0]
                    for part in parts[1:]:                         # X = (s0 128 + s1) 128 + s2
                        isum = builder.fadd(builder.fmul(isum, k128), part)
                    dxt = _splat(builder, _scalar(context, builder, sig.args[7], args[7], tok, F32), 16)
                    xs = None if q8 else _splat(builder, _scalar(context, builder, sig.args[8], args[8],
                                                                 tok, F32), 16)
                    acc = _scale_add(builder, old, isum, builder.fmul(dv, dxt), mv, xs)  # as quant_panel
                    done = builder.block
                phi = builder.phi(old.type)
                phi.add_incoming(old, before)
                phi.add_incoming(acc, done)
                out.append(phi)
            return context.make_tuple(builder, sig.return_type, out)
        if isinstance(accs, types.UniTuple) and accs.dtype == F32x16:
            return accs(accs, sums, soff, n, d, m, doff, dx, xsum, start, tok, nb), codegen
    return scale


_q4_1, _q4_3, _q8_1, _q8_3 = (_make_scale(q8, limbs) for q8 in (False, True) for limbs in (1, 3))


# ---------------------------------------------------------------------------------------------
# A range of panels against every token: quant_panel.tile's contract
# ---------------------------------------------------------------------------------------------
@njit(cache=True)
def _shapes(cfg, R):
    """Tiles 0, 1 and 2, 3: two sets of sums for R (token, part) rows (16 int32 a row; rows
    16.. in the second tile of a set); 4, 5: those rows of x, 32 bytes each; 6, 7: two blocks of
    weights, 8 rows x 64 bytes. Loaded only when the shapes change (cfg: what was loaded)."""
    r0, r1 = min(16, R), max(0, R - 16)
    if cfg[0] == 1 and cfg[48] == r0 and cfg[49] == r1:
        return
    cfg[:] = 0
    cfg[0] = 1                                         # palette 1
    for t, rows, width in ((0, r0, 64), (1, r1, 64), (2, r0, 64), (3, r1, 64),
                           (4, r0, QK), (5, r1, QK), (6, 8, 64), (7, 8, 64)):
        cfg[48 + t] = rows
        cfg[16 + 2 * t] = width if rows else 0         # (bytes a row, little-endian uint16)
    _configure(cfg)


@njit(cache=True)
def workspace():
    """A thread's buffers for tile(): the tile shapes loaded (none yet), a ring of blocks ready
    for the tile loads (Q4 unpacked, Q8_0 copied), LAG blocks' sums. Its calls run on that
    thread with no other use of the tile registers between them (the shapes are loaded again
    only when they change); done() after the last."""
    # on cache lines (quant_gemm.aligned's float32 words, as bytes and int32): a tile row or a
    # vector store that straddles two lines costs two
    ring = quant_gemm.aligned(1, AHEAD * 128).reshape(AHEAD * 128).view(np.uint8)
    sums = quant_gemm.aligned(1, LAG * 32 * ROWS).reshape(LAG * 32 * ROWS).view(np.int32)
    return np.zeros(64, dtype=np.uint8), ring, sums


@njit(cache=True)
def done(work):
    """Let the tile registers go (the thread's tile state back to nothing)."""
    if work[0][0]:
        work[0][0] = 0
        _release()


@njit(fastmath=True, cache=True, error_model="numpy")
def tile(xi, qp, d, m, p0, p1, out, c0, work):
    """out[t, c0 + 16 (p - p0) + r] = row 16 p + r . token t of x, for the panels p0..p1-1 and
    every token; xi = quant_panel.prepare_x(x, Q8_0?, limbs), work = workspace(). out:
    C-contiguous [T, >= c0 + 16 (p1 - p0)]. quant_panel.tile's numbers; needs available()."""
    xq, dx, xsum, start = xi
    cfg, w, sums = work
    q8 = m.ndim == 1                                   # Q8_0 (a constant when numba compiles)
    T, nb = dx.shape
    K = nb * QK
    limbs = xq.shape[1] // K
    N = out.shape[1]
    vb = qp.shape[2] * 64                              # bytes of a panel's block
    last = qp.size - 1
    most = TOKENS if limbs == 1 else 30 // limbs       # tokens a pass: up to 30 rows
    passes = (T + most - 1) // most
    G = (p1 - p0) * nb                                 # blocks a pass streams, panel after panel
    for i in range(passes):
        t0, t1 = i * T // passes, (i + 1) * T // passes
        n = t1 - t0
        R = n * limbs                                  # rows (token, part): xq's from t0 limbs on
        _shapes(cfg, R)
        xo, two = t0 * limbs * K, R > 16               # two tiles of rows from 17 on
        for g in range(min(AHEAD, G)):                 # the ring's first blocks
            if q8:
                _copy_q8(qp, (p0 * nb + g) * vb, w, (g % AHEAD) * 512)
            else:
                _unpack_q4(qp, (p0 * nb + g) * vb, w, (g % AHEAD) * 512)
        acc = _zeros(16)
        # Three blocks in flight: block g's products on the tile unit, block g - 1's sums (done
        # by now) stored, block g - 3's sums (stored two turns ago) scaled and added. A store
        # right after its products waits for them, and loads right after a store wait for it:
        # each costs most of a block's time if nothing else runs meanwhile. Where a block sits
        # (b, blk; be, col for block g - 3) is counted, not divided out of g: two divisions by
        # nb a block were a measurable share of it (docs/benchmarks.md, "CPU kernel details").
        b, blk = 0, p0 * nb                            # block g: its place in the panel, overall
        be, col = 0, c0                                # block g - 3's place, its panel's columns
        for g in range(G + LAG):
            if g < G:
                if i == 0:                             # the first pass streams the weights
                    for c in range(0, vb, 64):
                        _prefetch_l2(qp, min(last, blk * vb + c + PREFETCH_BYTES))
                wo, xb = (g % AHEAD) * 512, xo + b * QK
                if g % 2 == 0:                         # the two sets of tiles in turns
                    _products(0, w, wo, xq, xb, K, two)
                else:
                    _products(1, w, wo, xq, xb, K, two)
                if g + AHEAD < G:                      # the ring's slot is free again
                    if q8:
                        _copy_q8(qp, (blk + AHEAD) * vb, w, wo)
                    else:
                        _unpack_q4(qp, (blk + AHEAD) * vb, w, wo)
                blk += 1
                b += 1
                if b == nb:
                    b = 0
            if 0 < g <= G:                             # block g - 1's sums to slot (g - 1) % LAG
                so = ((g - 1) % LAG) * 32 * ROWS
                if (g - 1) % 2 == 0:
                    _store_sums(0, sums, so, two)
                else:
                    _store_sums(1, sums, so, two)
            if g >= LAG:
                e = g - LAG
                so, ds, tk = (e % LAG) * 32 * ROWS, (p0 * nb + e) * ROWS, t0 * nb + be
                if q8 and limbs == 3:
                    acc = _q8_3(acc, sums, so, n, d, m, ds, dx, xsum, start, tk, nb)
                elif q8:
                    acc = _q8_1(acc, sums, so, n, d, m, ds, dx, xsum, start, tk, nb)
                elif limbs == 3:
                    acc = _q4_3(acc, sums, so, n, d, m, ds, dx, xsum, start, tk, nb)
                else:
                    acc = _q4_1(acc, sums, so, n, d, m, ds, dx, xsum, start, tk, nb)
                be += 1
                if be == nb:                           # the panel's last block: its outputs
                    be = 0
                    for t in range(n):
                        _store16(out, (t0 + t) * N + col, acc[t])
                    acc = _zeros(16)
                    col += ROWS


if not available():
    # No tile unit here: a stand-in that no step reaches (KernelConfig.tile_unit_rows keeps every
    # step below it), so that region.py compiles with no tile instruction in it.
    @njit(cache=True)
    def tile(xi, qp, d, m, p0, p1, out, c0, work):   # noqa: F811
        raise RuntimeError("this CPU has no AMX tile unit")

    @njit(cache=True)
    def done(work):   # noqa: F811
        pass
