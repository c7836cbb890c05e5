"""The CPU's vector instructions, as numba sees them: a few LLVM operations of our own.

numba compiles plain loops well, but some instructions it does not reach on its own: the byte
dot product of AVX-512 VNNI (`vpdpbusd`; numba widens byte products to 64-bit integers), a
16-float register kept as one value across calls (and tiles of them, multiplied and added), a
prefetch hint; and whether the CPU's tile unit (AMX) can be used here. The kernels that need them
(stages/quant_i8.py, attention.py, linear.py, cpu/quant_gemm.py, cpu/quant_panel.py,
cpu/quant_amx.py) take them from here; this module imports nothing else of minfer's but its
errors, so every stage can stand on it.
"""
from __future__ import annotations

import ctypes
import platform
import sys
from functools import cache

import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, models, register_model

from ..errors import InvalidArgumentError
from .fastexp import exp32_ir

I8, I32, F32 = ir.IntType(8), ir.IntType(32), ir.FloatType()


def has_vnni() -> bool:
    """Does the CPU numba compiles for have AVX-512 VNNI (and the byte ops it needs)?"""
    from numba.core import config
    if config.CPU_NAME or config.CPU_FEATURES:             # numba was told to target another CPU
        return "+avx512vnni" in (config.CPU_FEATURES or "")
    import llvmlite.binding as ll
    f = ll.get_host_cpu_features()
    return bool(f.get("avx512vnni") and f.get("avx512bw") and f.get("avx512vl"))


@cache
def vnni_at_fma_rate() -> bool:
    """Does the CPU numba compiles for run a 64-byte `vpdpbusd` as often as a 16-float multiply-add
    (AMD's Zen 4: both one a cycle, on the same pipes)? Then float32 x in three int8 parts (3 byte
    dot products per 64 multiply-adds) costs less than float multiply-adds (4), at any row count
    — Intel's server cores do two float multiply-adds a cycle and one byte product."""
    from numba.core import config
    import llvmlite.binding as ll
    name = config.CPU_NAME if config.CPU_NAME not in (None, "", "host") else ll.get_host_cpu_name()
    return has_vnni() and name.startswith("znver")


@cache
def has_amx() -> bool:
    """Can this process use the CPU's tile unit (AMX-INT8, cpu/quant_amx.py)? Does numba compile
    for a CPU with it, and did Linux give the process the tile registers? (Asks, once: without,
    a process's first tile instruction is a fault.)"""
    from numba.core import config
    if config.CPU_NAME or config.CPU_FEATURES:             # numba was told to target another CPU
        f = config.CPU_FEATURES or ""
        if "+amx-int8" not in f or "+amx-tile" not in f:
            return False
    else:
        import llvmlite.binding as ll
        f = ll.get_host_cpu_features()
        if not (f.get("amx-int8") and f.get("amx-tile")):
            return False
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        return False
    SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1023, 18
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def check_available() -> None:
    if not has_vnni():
        raise InvalidArgumentError(
            "int8 activations need a CPU with AVX-512 VNNI (this one has none); "
            "use the default float32 activations")


def _vec(t, n):
    return ir.VectorType(t, n)


def _splat(builder, v, n=16):
    """The scalar v (any LLVM type) in all n lanes of a vector."""
    one = builder.insert_element(ir.Constant(ir.VectorType(v.type, 1), None), v, ir.Constant(I32, 0))
    return builder.shuffle_vector(one, one, ir.Constant(_vec(I32, n), [0] * n))


def _load(context, builder, arrty, arr, offset, elt, n):
    """n elements of a C-contiguous array, from flat index `offset`, as one vector."""
    data = context.make_array(arrty)(context, builder, arr).data
    ptr = builder.bitcast(builder.gep(data, [offset]), _vec(elt, n).as_pointer())
    return builder.load(ptr, align=1)


def _vpdpbusd(builder, acc, u8, s8):
    """acc[l] += sum of the 4 products u8[4l + j] * s8[4l + j] (unsigned x signed bytes)."""
    lanes = acc.type.count
    name = f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
        _vec(I32, lanes), [_vec(I32, lanes), _vec(I8, 4 * lanes), _vec(I8, 4 * lanes)]), name)
    return builder.call(fn, [acc, u8, s8])


def _fma(builder, a, b, c):
    """a * b + c lane by lane, rounded once (16 floats): one fixed order of operations, so that a
    kernel's result for a row is the same whatever else its call computes."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
        _vec(F32, 16), [_vec(F32, 16)] * 3), "llvm.fma.v16f32")
    return builder.call(fn, [a, b, c])


def _load_scales(context, builder, t, a, i, n):
    """n scales from a.flat[i:] as float32 lanes (float16 bits are widened in registers)."""
    if t.dtype == types.uint16:
        h = _load(context, builder, t, a, i, ir.IntType(16), n)
        return builder.fpext(builder.bitcast(h, _vec(ir.HalfType(), n)), _vec(F32, n))
    return _load(context, builder, t, a, i, F32, n)


class _F32x16(types.Type):
    """An LLVM <16 x float> as a numba value: the accumulator stays in one vector register."""
    def __init__(self):
        super().__init__(name="f32x16")


F32x16 = _F32x16()


@register_model(_F32x16)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _vec(F32, 16))


@intrinsic
def _zeros16(typingctx):
    return F32x16(), lambda context, builder, sig, args: ir.Constant(_vec(F32, 16), [0.0] * 16)


@intrinsic
def _zeros(typingctx, n):
    """n zero 16-float accumulators, as a tuple (n: a literal)."""
    if not isinstance(n, types.IntegerLiteral):
        return None
    count = n.literal_value

    def codegen(context, builder, sig, args):
        return context.make_tuple(builder, sig.return_type,
                                  [ir.Constant(_vec(F32, 16), [0.0] * 16)] * count)
    return types.UniTuple(F32x16, count)(n), codegen


@intrinsic
def _store16(typingctx, a, off, v):
    """a.flat[off:off + 16] = v (a: C-contiguous float32)."""
    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        ptr = builder.bitcast(builder.gep(data, [args[1]]), _vec(F32, 16).as_pointer())
        builder.store(args[2], ptr, align=4)
        return context.get_dummy_value()
    if a.layout == "C":
        return types.none(a, types.int64, F32x16), codegen


def _lanes16(op):
    """An intrinsic f(out, oo, a, ao, b, bo): out.flat[oo:oo + 16] = op(a.flat[ao:ao + 16],
    b.flat[bo:bo + 16]), op on 16-float vectors as LLVM operations (C-contiguous float32)."""
    @intrinsic
    def f(typingctx, out, oo, a, ao, b, bo):
        def codegen(context, builder, sig, args):
            s = op(builder, _load(context, builder, sig.args[2], args[2], args[3], F32, 16),
                   _load(context, builder, sig.args[4], args[4], args[5], F32, 16))
            data = context.make_array(sig.args[0])(context, builder, args[0]).data
            builder.store(s, builder.bitcast(builder.gep(data, [args[1]]), _vec(F32, 16).as_pointer()),
                          align=4)
            return context.get_dummy_value()
        if all(t.layout == "C" for t in (out, a, b)):
            return types.none(out, types.int64, a, types.int64, b, types.int64), codegen
    return f


def _silu_times(builder, g, u):
    """silu(g) u = g / (1 + e^-g) u (e^ as fastexp's)."""
    one = ir.Constant(_vec(F32, 16), [1.0] * 16)
    return builder.fmul(builder.fdiv(g, builder.fadd(one, exp32_ir(builder, builder.fneg(g)))), u)


# a + b (one rounded add a lane: the bits of the scalar a + b), and silu(a) b — loops that numba
# left scalar (its negative-index checks) or LLVM made 8 lanes wide (docs/benchmarks.md)
_add16 = _lanes16(lambda builder, a, b: builder.fadd(a, b))
_silu_mul16 = _lanes16(_silu_times)


@intrinsic
def _sum16(typingctx, a):
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            F32, [F32, _vec(F32, 16)]), "llvm.vector.reduce.fadd.v16f32")
        return builder.call(fn, [ir.Constant(F32, -0.0), args[0]], fastmath=("fast",))
    return types.float32(a), codegen


def _make_prefetch(locality):
    @intrinsic
    def prefetch(typingctx, arr, offset):
        """Ask for the cache line holding arr.flat[offset] now: it is needed a few rows later."""
        def codegen(context, builder, sig, args):
            data = context.make_array(sig.args[0])(context, builder, args[0]).data
            ptr = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
                ir.VoidType(), [ptr.type, I32, I32, I32]), "llvm.prefetch.p0")
            builder.call(fn, [ptr, ir.Constant(I32, 0), ir.Constant(I32, locality), ir.Constant(I32, 1)])
            return context.get_dummy_value()
        return types.none(arr, offset), codegen
    return prefetch

# Into L1 (x86 prefetcht0), or into L2 only (prefetcht1). The kernels stream Q8_0 rows (34 bytes
# a block) faster with the rows ahead sent to L2 — L1 is where they keep x and do their loads;
# so do 4-bit rows against int8 x. The three-part kernels on 4-bit rows, bound by their
# arithmetic, did not gain and keep L1 (docs/benchmarks.md).
_prefetch, _prefetch_l2, _prefetch_nta = _make_prefetch(3), _make_prefetch(2), _make_prefetch(0)


def bits(a):
    """Scales for the kernels: float16 ones as their uint16 bits (numba's CPU target has no
    float16 type; the kernels widen them), float32 ones as they are."""
    return a.view(np.uint16) if a.dtype == np.float16 else a


@intrinsic
def _mac4(typingctx, acc, x, xo, xs, w, wo, ws):
    """acc[4 r + c] += x.flat[xo + r xs:][:16] * w.flat[wo + c ws:][:16], lane by lane: R rows of
    x against 4 rows of w, 16 floats of each (float32, C-contiguous), R = len(acc) / 4 (up to 16
    sums in registers: each loaded vector of w serves R of them, each of x 4)."""
    if not (isinstance(acc, types.UniTuple) and acc.count % 4 == 0):
        return None
    R = acc.count // 4

    def codegen(context, builder, sig, args):
        def at(base, i, stride):
            return builder.add(base, builder.mul(ir.Constant(base.type, i), stride))
        xv = [_load(context, builder, sig.args[1], args[1], at(args[2], r, args[3]), F32, 16)
              for r in range(R)]
        wv = [_load(context, builder, sig.args[4], args[4], at(args[5], c, args[6]), F32, 16)
              for c in range(4)]
        out = [_fma(builder, xv[r], wv[c], builder.extract_value(args[0], 4 * r + c))
               for r in range(R) for c in range(4)]
        return context.make_tuple(builder, sig.return_type, out)
    return acc(acc, x, xo, xs, w, wo, ws), codegen


@intrinsic
def _put_sums(typingctx, acc, out, off, row, C):
    """out.flat[off + r row + c] = the sum of acc[C r + c]'s 16 lanes (C: a literal)."""
    if not isinstance(C, types.IntegerLiteral):
        return None
    n, cols = acc.count, C.literal_value

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[1])(context, builder, args[1]).data
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            F32, [F32, _vec(F32, 16)]), "llvm.vector.reduce.fadd.v16f32")
        for i in range(n):
            r, c = divmod(i, cols)
            s = builder.call(fn, [ir.Constant(F32, -0.0), builder.extract_value(args[0], i)],
                             fastmath=("fast",))
            at = builder.add(args[2], builder.add(builder.mul(ir.Constant(args[2].type, r), args[3]),
                                                  ir.Constant(args[2].type, c)))
            builder.store(s, builder.gep(data, [at]))
        return context.get_dummy_value()
    return types.none(acc, out, off, row, C), codegen
