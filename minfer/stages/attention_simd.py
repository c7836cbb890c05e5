"""The vector operations of attention's jobs in vector code (stages/attention.py,
_attention_job_vec and _attention_job_rows), written as LLVM operations: what numba would not
make of plain loops.

    _scores16                a head's scores for 16 keys: 16 dot products side by side, then a
                             tree of shuffles that adds up each one's lanes
    _max16, _exp16           the online softmax of a head's 16 scores as one vector
    _pv64_start/_pv64x2/_pv64x1/_pv64_end
                             o += p v for 64 floats of o at a time, two keys a call, each key's
                             p splat once for its 64 floats, even and odd keys in separate chains
    _pv_start/_pv4/_pv1/_pv_end
                             the same 16 floats at a time (head_dim not a multiple of 64)
    _scores_rows, _softmax_rows, _pv_rows
                             the same three steps with 16 queries in the lanes ("Rows in lanes")
    _fma1, _add1, _exp_diff1 the one-row job's scalars of the softmax, in the order the rows keep

Offsets are flat indices into C-contiguous arrays; lanes are 16 float32 (AVX-512: one register).
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .fastexp import exp32_ir
from .simd import F32, F32x16, I32, _fma, _load, _splat, _vec

_I64 = ir.IntType(64)
# The flag of the float operations whose order is part of the result (the sums of scores, exps,
# p.V): numba's fastmath pass gives every float operation without flags the "fast" ones, which
# let LLVM reorder and fuse — differently in code for one row and for 16 (attention.py's rows
# keep their bits). "arcp" (reciprocals may replace divisions) changes nothing here.
AS_WRITTEN = ["arcp"]


def _tree16(builder, vs):
    """16 vectors -> one: lane r = the sum of vs[r]'s 16 lanes (pairwise shuffles and adds)."""
    even = ir.Constant(_vec(I32, 16), list(range(0, 32, 2)))
    odd = ir.Constant(_vec(I32, 16), list(range(1, 32, 2)))
    while len(vs) > 1:
        vs = [builder.fadd(builder.shuffle_vector(a, b, even), builder.shuffle_vector(a, b, odd),
                           flags=AS_WRITTEN) for a, b in zip(vs[0::2], vs[1::2])]
    return vs[0]


@intrinsic
def _scores16(typingctx, qs, qoff, K, koff, kstride, nk, hd):
    """Lane r: qs.flat[qoff:qoff + hd] . K.flat[k:k + hd], k = koff + min(r, nk - 1) kstride:
    one head's scores for 16 keys (lanes past nk repeat the last key)."""
    def codegen(context, builder, sig, args):
        qs_, qoff_, K_, koff_, ks_, nk_, hd_ = args
        last = builder.sub(nk_, ir.Constant(_I64, 1))
        zero = ir.Constant(_vec(F32, 16), [0.0] * 16)
        k0 = []
        for r in range(16):
            rc = ir.Constant(_I64, r)
            k0.append(builder.add(koff_, builder.mul(builder.select(
                builder.icmp_signed("<", rc, last), rc, last), ks_)))
        accs = [cgutils.alloca_once_value(builder, zero) for r in range(16)]   # (registers)
        with cgutils.for_range_slice(builder, ir.Constant(_I64, 0), hd_, ir.Constant(_I64, 16)) as (c, _):
            qv = _load(context, builder, sig.args[0], qs_, builder.add(qoff_, c), F32, 16)
            for r in range(16):                        # 16 keys, 16 independent sums
                kv = _load(context, builder, sig.args[2], K_, builder.add(k0[r], c), F32, 16)
                builder.store(_fma(builder, qv, kv, builder.load(accs[r])), accs[r])
        return _tree16(builder, [builder.load(a) for a in accs])
    if qs.layout == "C" and K.layout == "C":
        return F32x16(qs, types.int64, K, types.int64, types.int64, types.int64, types.int64), codegen


@intrinsic
def _pv4(typingctx, acc, p, poff, V, voff, vstride):
    """acc[j] + p.flat[poff + j] * V.flat[voff + j vstride:+16], j = 0..3 (4 keys, 4 chains)."""
    def codegen(context, builder, sig, args):
        acc_, p_, poff_, V_, voff_, vs_ = args
        out = []
        for j in range(4):
            jc = ir.Constant(_I64, j)
            pj = builder.load(builder.gep(context.make_array(sig.args[1])(context, builder, p_).data,
                                          [builder.add(poff_, jc)]))
            v = _load(context, builder, sig.args[3], V_, builder.add(voff_, builder.mul(jc, vs_)), F32, 16)
            out.append(_fma(builder, _splat(builder, pj), v, builder.extract_value(acc_, j)))
        return context.make_tuple(builder, sig.return_type, out)
    if p.layout == "C" and V.layout == "C":
        return acc(acc, p, types.int64, V, types.int64, types.int64), codegen


@intrinsic
def _pv1(typingctx, acc, p, poff, V, voff):
    """_pv4 for one key, in the first chain."""
    def codegen(context, builder, sig, args):
        acc_, p_, poff_, V_, voff_ = args
        pj = builder.load(builder.gep(context.make_array(sig.args[1])(context, builder, p_).data, [poff_]))
        v = _load(context, builder, sig.args[3], V_, voff_, F32, 16)
        first = _fma(builder, _splat(builder, pj), v, builder.extract_value(acc_, 0))
        return builder.insert_value(acc_, first, 0)
    if p.layout == "C" and V.layout == "C":
        return acc(acc, p, types.int64, V, types.int64), codegen


@intrinsic
def _pv_start(typingctx, o, off, c):
    """(o.flat[off:+16] * c, 0, 0, 0): four accumulators, the first holding the rescaled past."""
    def codegen(context, builder, sig, args):
        first = builder.fmul(_load(context, builder, sig.args[0], args[0], args[1], F32, 16),
                             _splat(builder, args[2]), flags=["fast"])
        zero = ir.Constant(_vec(F32, 16), [0.0] * 16)
        return context.make_tuple(builder, sig.return_type, [first, zero, zero, zero])
    if o.layout == "C":
        return types.UniTuple(F32x16, 4)(o, types.int64, types.float32), codegen


@intrinsic
def _pv_end(typingctx, acc):
    """The four accumulators' sum."""
    def codegen(context, builder, sig, args):
        a = [builder.extract_value(args[0], j) for j in range(4)]
        add = (lambda x, y: builder.fadd(x, y, flags=["fast"]))
        return add(add(a[0], a[1]), add(a[2], a[3]))
    return F32x16(acc), codegen


@intrinsic
def _pv64_start(typingctx, o, off, c):
    """Eight accumulators for 64 floats of one head's output: (o.flat[off:+64] * c in the first
    four, zeros in the others — the even and the odd keys' chains)."""
    def codegen(context, builder, sig, args):
        cs = _splat(builder, args[2])
        zero = ir.Constant(_vec(F32, 16), [0.0] * 16)
        first = [builder.fmul(_load(context, builder, sig.args[0], args[0],
                                    builder.add(args[1], ir.Constant(_I64, 16 * w)), F32, 16), cs,
                              flags=AS_WRITTEN) for w in range(4)]
        return context.make_tuple(builder, sig.return_type, first + [zero] * 4)
    if o.layout == "C":
        return types.UniTuple(F32x16, 8)(o, types.int64, types.float32), codegen


def _make_pv64(keys):
    @intrinsic
    def pv(typingctx, acc, p, poff, V, voff, vstride):
        """acc + p.flat[poff + j] * V.flat[voff + j vstride:+64] for j < keys (1 or 2): key j into
        chains 4 j .. 4 j + 3, each key's weight splat once for its 64 floats."""
        def codegen(context, builder, sig, args):
            acc_, p_, poff_, V_, voff_, vs_ = args
            out = [builder.extract_value(acc_, i) for i in range(8)]
            pdata = context.make_array(sig.args[1])(context, builder, p_).data
            for j in range(keys):
                jc = ir.Constant(_I64, j)
                pj = _splat(builder, builder.load(builder.gep(pdata, [builder.add(poff_, jc)])))
                base = builder.add(voff_, builder.mul(jc, vs_))
                for w in range(4):
                    v = _load(context, builder, sig.args[3], V_, builder.add(base, ir.Constant(_I64, 16 * w)),
                              F32, 16)
                    out[4 * j + w] = _fma(builder, pj, v, out[4 * j + w])
            return context.make_tuple(builder, sig.return_type, out)
        if p.layout == "C" and V.layout == "C":
            return acc(acc, p, types.int64, V, types.int64, types.int64), codegen
    return pv


_pv64x2, _pv64x1 = _make_pv64(2), _make_pv64(1)


@intrinsic
def _pv64_end(typingctx, o, off, acc):
    """o.flat[off:+64] = the even and odd keys' chains added."""
    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        for w in range(4):
            v = builder.fadd(builder.extract_value(args[2], w), builder.extract_value(args[2], 4 + w),
                             flags=AS_WRITTEN)
            ptr = builder.bitcast(builder.gep(data, [builder.add(args[1], ir.Constant(_I64, 16 * w))]),
                                  _vec(F32, 16).as_pointer())
            builder.store(v, ptr, align=4)
        return context.get_dummy_value()
    if o.layout == "C":
        return types.none(o, types.int64, acc), codegen


def _lanes_below(builder, n):
    """<16 x i1>: lane r < n."""
    return builder.icmp_signed("<", ir.Constant(_vec(_I64, 16), list(range(16))), _splat(builder, n))


@intrinsic
def _max16(typingctx, p, off, n):
    """max(p.flat[off:off + min(n, 16)]): a head's largest score among 16 keys."""
    def codegen(context, builder, sig, args):
        x = _load(context, builder, sig.args[0], args[0], args[1], F32, 16)
        x = builder.select(_lanes_below(builder, args[2]), x, ir.Constant(_vec(F32, 16), [-3.0e38] * 16))
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(F32, [_vec(F32, 16)]),
                                            "llvm.vector.reduce.fmax.v16f32")
        return builder.call(fn, [x])
    if p.layout == "C":
        return types.float32(p, types.int64, types.int64), codegen


def _halves(builder, v):
    """The sum of v's 16 lanes in one fixed order: lanes 0-7 + 8-15, then 0-3 + 4-7, 0-1 + 2-3,
    0 + 1 (the order _sum_rows keeps across 16 vectors)."""
    n = 16
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(_vec(I32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(_vec(I32, n), list(range(n, 2 * n))))
        v = builder.fadd(lo, hi, flags=AS_WRITTEN)
    return builder.extract_element(v, ir.Constant(I32, 0))


@intrinsic
def _exp16(typingctx, p, off, n, mx):
    """p.flat[off:off + 16] = e^(p - mx) in the first min(n, 16) lanes, 0 in the others (keys
    past the slice or the row's position); returns their sum."""
    def codegen(context, builder, sig, args):
        x = _load(context, builder, sig.args[0], args[0], args[1], F32, 16)
        e = exp32_ir(builder, builder.fsub(x, _splat(builder, args[3]), flags=AS_WRITTEN))
        e = builder.select(_lanes_below(builder, args[2]), e, ir.Constant(_vec(F32, 16), [0.0] * 16))
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        builder.store(e, builder.bitcast(builder.gep(data, [args[1]]), _vec(F32, 16).as_pointer()), align=4)
        return _halves(builder, e)
    if p.layout == "C":
        return types.float32(p, types.int64, types.int64, types.float32), codegen


# --- scalars of the softmax, in the order the rows-in-lanes code below keeps -------------------
@intrinsic
def _fma1(typingctx, a, b, c):
    """a * b + c, rounded once (float32)."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(F32, [F32] * 3), "llvm.fma.f32")
        return builder.call(fn, args)
    return types.float32(types.float32, types.float32, types.float32), codegen


@intrinsic
def _add1(typingctx, a, b):
    """a + b, as written (no reordering with the sums around it)."""
    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1], flags=AS_WRITTEN)
    return types.float32(types.float32, types.float32), codegen


@intrinsic
def _exp_diff1(typingctx, a, b):
    """e^(a - b): fastexp's vector arithmetic, one lane of it."""
    def codegen(context, builder, sig, args):
        e = exp32_ir(builder, _splat(builder, builder.fsub(args[0], args[1], flags=AS_WRITTEN)))
        return builder.extract_element(e, ir.Constant(I32, 0))
    return types.float32(types.float32, types.float32), codegen


# ---------------------------------------------------------------------------------------------
# Rows in lanes: a tile of several rows (attention.py, _attention_job_rows) puts 16 of its query
# vectors — (row, query head) pairs of one kv head — side by side in the lanes of a vector, so that
# every operation serves 16 of them: a key's element is splat once for 16 products, a score
# vector holds one key's scores for 16 queries, the softmax runs down 16 vectors instead of
# across lanes, and no sum is ever taken across lanes. Each query's arithmetic is the one its
# row gets alone in the code above (the same products, the same fixed orders of the sums), so a
# row's result does not depend on which rows come with it.
#   QT [hd, 16]: the 16 queries transposed (lane u: query u); S, P [keys, 16]: scores, exps.
# ---------------------------------------------------------------------------------------------
def _sum_rows(builder, vs):
    """16 vectors -> lane by lane, their sum in _halves's order (vs[r] + vs[r + 8], ...)."""
    while len(vs) > 1:
        h = len(vs) // 2
        vs = [builder.fadd(vs[r], vs[r + h], flags=AS_WRITTEN) for r in range(h)]
    return vs[0]


def _flat_ptr(context, builder, arrty, arr, off, t=F32, n=16):
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [off]), _vec(t, n).as_pointer())


@intrinsic
def _scores_rows(typingctx, S, soff, QT, qoff, K, koff, kstride, nk, chunks):
    """S.flat[soff + 16 r:][:16] = the 16 queries of QT.flat[qoff:] (as [hd, 16]) . key r, for the
    16 keys at K.flat[koff + min(r, nk - 1) kstride:] (hd = 16 chunks). Key r's score for query u
    is _scores16's: the products of lanes l, l + 16, ... chained, then the 16 chains added in
    _tree16's order."""
    if not isinstance(chunks, types.IntegerLiteral):
        return None
    C = chunks.literal_value

    def codegen(context, builder, sig, args):
        S_, soff_, QT_, qoff_, K_, koff_, ks_, nk_ = args[:8]
        last = builder.sub(nk_, ir.Constant(_I64, 1))
        kdata = context.make_array(sig.args[4])(context, builder, K_).data
        zero = ir.Constant(_vec(F32, 16), [0.0] * 16)
        # 4 keys at a time (each QT row serves 4), a loop of 4: the body is one quarter of the code
        with cgutils.for_range(builder, ir.Constant(_I64, 4)) as loop:
            r4 = builder.mul(loop.index, ir.Constant(_I64, 4))
            kr = []
            for j in range(4):
                r = builder.add(r4, ir.Constant(_I64, j))
                kr.append(builder.add(koff_, builder.mul(builder.select(
                    builder.icmp_signed("<", r, last), r, last), ks_)))
            stacks = [[] for _ in range(4)]            # (level, partial sum) of each key's tree
            for lane in range(16):
                P = [zero] * 4
                for c in range(C):
                    i = 16 * c + lane
                    qt = builder.load(_flat_ptr(context, builder, sig.args[2], QT_,
                                                builder.add(qoff_, ir.Constant(_I64, 16 * i))), align=4)
                    for j in range(4):
                        kv = builder.load(builder.gep(kdata, [builder.add(kr[j], ir.Constant(_I64, i))]))
                        P[j] = _fma(builder, _splat(builder, kv), qt, P[j])
                for j in range(4):
                    st, v, lev = stacks[j], P[j], 0
                    while st and st[-1][0] == lev:
                        v = builder.fadd(st.pop()[1], v, flags=AS_WRITTEN)
                        lev += 1
                    st.append((lev, v))
            for j in range(4):
                at = builder.add(soff_, builder.mul(builder.add(r4, ir.Constant(_I64, j)), ir.Constant(_I64, 16)))
                builder.store(stacks[j][0][1], _flat_ptr(context, builder, sig.args[0], S_, at), align=4)
        return context.get_dummy_value()
    if S.layout == "C" and QT.layout == "C" and K.layout == "C":
        return types.none(S, types.int64, QT, types.int64, K, types.int64, types.int64, types.int64,
                          chunks), codegen


@intrinsic
def _softmax_rows(typingctx, S, P, n, NK, M, L, moff):
    """The online softmax of one block for 16 queries: the scores S [n, 16] (keys down, queries
    across; query u sees the first NK[u] keys, none when NK[u] <= 0) -> P = e^(S - m_new), 0 where
    unseen; M.flat[moff:], L.flat[moff:] (each query's running max and sum of exps) updated;
    returns c = e^(m_old - m_new), each query's rescale of its past (1 where the max held). The
    arithmetic of _attention_job_vec's softmax for one row, lane by lane."""
    def codegen(context, builder, sig, args):
        S_, P_, n_, NK_, M_, L_, moff_ = args
        vt = _vec(F32, 16)
        nk = builder.load(_flat_ptr(context, builder, sig.args[3], NK_, ir.Constant(_I64, 0), _I64), align=8)
        m_old = builder.load(_flat_ptr(context, builder, sig.args[4], M_, moff_), align=4)
        l_old = builder.load(_flat_ptr(context, builder, sig.args[5], L_, moff_), align=4)
        low = ir.Constant(vt, [-3.0e38] * 16)
        zero = ir.Constant(vt, [0.0] * 16)

        def seen(r):                                   # lanes whose query sees key r
            return builder.icmp_signed("<", _splat(builder, r), nk)

        mx = cgutils.alloca_once_value(builder, m_old)
        with cgutils.for_range(builder, n_) as loop:   # the max over the block's keys
            x = builder.load(_flat_ptr(context, builder, sig.args[0], S_, builder.mul(
                loop.index, ir.Constant(_I64, 16))), align=4)
            x = builder.select(seen(loop.index), x, low)
            cur = builder.load(mx)
            builder.store(builder.select(builder.fcmp_ordered(">", x, cur), x, cur), mx)
        some = builder.icmp_signed(">", nk, ir.Constant(_vec(_I64, 16), [0] * 16))
        m_new = builder.select(some, builder.load(mx), m_old)
        c = builder.select(builder.fcmp_ordered("==", m_new, m_old), ir.Constant(vt, [1.0] * 16),
                           exp32_ir(builder, builder.fsub(m_old, m_new, flags=AS_WRITTEN)))
        total = cgutils.alloca_once_value(builder, zero)
        with cgutils.for_range_slice(builder, ir.Constant(_I64, 0), n_, ir.Constant(_I64, 16)) as (r0, _):
            es = []
            for r in range(16):                        # 16 keys: their exps, then their sum
                ri = builder.add(r0, ir.Constant(_I64, r))
                off = builder.mul(ri, ir.Constant(_I64, 16))
                x = builder.load(_flat_ptr(context, builder, sig.args[0], S_, off), align=4)
                e = builder.select(seen(ri), exp32_ir(builder, builder.fsub(x, m_new, flags=AS_WRITTEN)), zero)
                builder.store(e, _flat_ptr(context, builder, sig.args[1], P_, off), align=4)
                es.append(e)
            builder.store(builder.fadd(builder.load(total), _sum_rows(builder, es), flags=AS_WRITTEN), total)
        builder.store(_fma(builder, l_old, c, builder.load(total)),
                      _flat_ptr(context, builder, sig.args[5], L_, moff_), align=4)
        builder.store(m_new, _flat_ptr(context, builder, sig.args[4], M_, moff_), align=4)
        return c
    if S.layout == "C" and P.layout == "C" and NK.layout == "C" and M.layout == "C" and L.layout == "C":
        return F32x16(S, P, types.int64, NK, M, L, types.int64), codegen


@intrinsic
def _pv_rows(typingctx, OT, ooff, P, c, V, voff, vstride, nk, hd):
    """OT.flat[ooff:] (as [hd, 16]: 16 queries' outputs, transposed) = c OT + sum over the keys
    r < nk of P[r] * V.flat[voff + r vstride + d]: _pv64's arithmetic lane by lane (the past times
    c and the even keys in one chain, the odd keys in another, the two added), 8 of the hd floats
    at a time."""
    def codegen(context, builder, sig, args):
        OT_, ooff_, P_, c_, V_, voff_, vs_, nk_, hd_ = args
        vt = _vec(F32, 16)
        zero = ir.Constant(vt, [0.0] * 16)
        vdata = context.make_array(sig.args[4])(context, builder, V_).data
        pairs = builder.sdiv(nk_, ir.Constant(_I64, 2))
        with cgutils.for_range_slice(builder, ir.Constant(_I64, 0), hd_, ir.Constant(_I64, 8)) as (d0, _):
            ptrs = [_flat_ptr(context, builder, sig.args[0], OT_, builder.add(
                ooff_, builder.mul(builder.add(d0, ir.Constant(_I64, j)), ir.Constant(_I64, 16))))
                for j in range(8)]
            even = [cgutils.alloca_once_value(builder, builder.fmul(builder.load(p, align=4), c_, flags=AS_WRITTEN))
                    for p in ptrs]
            odd = [cgutils.alloca_once_value(builder, zero) for _ in range(8)]

            def key(r, accs):
                pr = builder.load(_flat_ptr(context, builder, sig.args[2], P_, builder.mul(
                    r, ir.Constant(_I64, 16))), align=4)
                base = builder.add(builder.add(voff_, builder.mul(r, vs_)), d0)
                for j in range(8):
                    v = builder.load(builder.gep(vdata, [builder.add(base, ir.Constant(_I64, j))]))
                    builder.store(_fma(builder, pr, _splat(builder, v), builder.load(accs[j])), accs[j])
            with cgutils.for_range(builder, pairs) as loop:
                r = builder.mul(loop.index, ir.Constant(_I64, 2))
                key(r, even)
                key(builder.add(r, ir.Constant(_I64, 1)), odd)
            last = builder.sub(nk_, ir.Constant(_I64, 1))
            with builder.if_then(builder.icmp_signed("==", builder.srem(nk_, ir.Constant(_I64, 2)),
                                                     ir.Constant(_I64, 1))):
                key(last, even)
            for j in range(8):
                builder.store(builder.fadd(builder.load(even[j]), builder.load(odd[j]), flags=AS_WRITTEN),
                              ptrs[j], align=4)
        return context.get_dummy_value()
    if OT.layout == "C" and P.layout == "C" and V.layout == "C":
        return types.none(OT, types.int64, P, F32x16, V, types.int64, types.int64, types.int64,
                          types.int64), codegen
