"""The vector operations of attention's job in vector code (stages/attention.py,
_attention_job_vec), written as LLVM operations: what numba would not make of plain loops.

    _scores16                a head's scores for 16 keys: 16 dot products side by side, then a
                             tree of shuffles that adds up each one's lanes
    _max16, _exp16           the online softmax of a head's 16 scores as one vector
    _pv64_start/_pv64x2/_pv64x1/_pv64_end
                             o += p v for 64 floats of o at a time, two keys a call, each key's
                             p splat once for its 64 floats, even and odd keys in separate chains
    _pv_start/_pv4/_pv1/_pv_end
                             the same 16 floats at a time (head_dim not a multiple of 64)

Offsets are flat indices into C-contiguous arrays; lanes are 16 float32 (AVX-512: one register).
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .fastexp import exp32_ir
from .simd import F32, F32x16, I32, _load, _splat, _vec

_I64 = ir.IntType(64)


def _tree16(builder, vs):
    """16 vectors -> one: lane r = the sum of vs[r]'s 16 lanes (pairwise shuffles and adds)."""
    even = ir.Constant(_vec(I32, 16), list(range(0, 32, 2)))
    odd = ir.Constant(_vec(I32, 16), list(range(1, 32, 2)))
    while len(vs) > 1:
        vs = [builder.fadd(builder.shuffle_vector(a, b, even), builder.shuffle_vector(a, b, odd),
                           flags=["fast"]) for a, b in zip(vs[0::2], vs[1::2])]
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
                builder.store(builder.fadd(builder.load(accs[r]), builder.fmul(qv, kv, flags=["fast"]),
                                           flags=["fast"]), accs[r])
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
            out.append(builder.fadd(builder.extract_value(acc_, j),
                                    builder.fmul(_splat(builder, pj), v, flags=["fast"]), flags=["fast"]))
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
        pv = builder.fmul(_splat(builder, pj), v, flags=["fast"])
        first = builder.fadd(builder.extract_value(acc_, 0), pv, flags=["fast"])
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
                              flags=["fast"]) for w in range(4)]
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
                    out[4 * j + w] = builder.fadd(out[4 * j + w], builder.fmul(pj, v, flags=["fast"]),
                                                  flags=["fast"])
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
                             flags=["fast"])
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


@intrinsic
def _exp16(typingctx, p, off, n, mx):
    """p.flat[off:off + 16] = e^(p - mx) in the first min(n, 16) lanes, 0 in the others (keys
    past the slice or the row's position); returns their sum."""
    def codegen(context, builder, sig, args):
        x = _load(context, builder, sig.args[0], args[0], args[1], F32, 16)
        e = exp32_ir(builder, builder.fsub(x, _splat(builder, args[3]), flags=["fast"]))
        e = builder.select(_lanes_below(builder, args[2]), e, ir.Constant(_vec(F32, 16), [0.0] * 16))
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        builder.store(e, builder.bitcast(builder.gep(data, [args[1]]), _vec(F32, 16).as_pointer()), align=4)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(F32, [F32, _vec(F32, 16)]),
                                            "llvm.vector.reduce.fadd.v16f32")
        return builder.call(fn, [ir.Constant(F32, -0.0), e], fastmath=("fast",))
    if p.layout == "C":
        return types.float32(p, types.int64, types.int64, types.float32), codegen
