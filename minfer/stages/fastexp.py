"""e^x in float32 that the compiler can vectorize — for the numba kernels' softmax and silu.

numba's np.exp calls the C library's expf once per value: ~2-6 ns a call, and a loop around it
cannot become vector code. In decode attention that was ~40% of the kernel's time (one exp per key
and head; measured with perf). This is the textbook way instead, in plain arithmetic:

    e^x = 2^t,  t = x log2(e) = n + f,  n = floor(t),  f in [0, 1)
    2^f ~ a polynomial of degree 6;   2^n: the float whose exponent field is n (a bit pattern)

Relative error <= 1e-7 (float32 has 6e-8 per rounding); t is clamped to [-126, 126], so very
negative x give ~1e-38 instead of 0 (harmless in a sum of exps) and large x give ~1e38 * 2^f.
The coefficients are a weighted least-squares fit of 2^f on [0, 1] at Chebyshev nodes:
    np.polynomial.polynomial.polyfit(f, 2.0**f, 6, w=1 / 2.0**f)
exp32_ir is the same arithmetic on a vector of floats, for kernels written as LLVM operations.
"""
import numpy as np
from llvmlite import ir
from numba import float32, int32, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

LOG2E = 1.4426950408889634
C = (1.0, 0.6931470036506653, 0.2402298003435135, 0.05548352375626564, 0.009678472764790058,
     0.0012443081941455603, 0.00021690608991775662)


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float32 whose 32 bits are those of the int32 `bits` (no conversion of the value)."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@njit(inline="always", fastmath=True)
def exp32(x):
    t = min(max(x * float32(LOG2E), float32(-126.0)), float32(126.0))
    n = np.floor(t)
    f = t - n                                                      # [0, 1)
    p = float32(C[6])
    p = p * f + float32(C[5])                                      # Horner: 2^f
    p = p * f + float32(C[4])
    p = p * f + float32(C[3])
    p = p * f + float32(C[2])
    p = p * f + float32(C[1])
    p = p * f + float32(C[0])
    return p * _float_from_bits((int32(n) + int32(127)) << int32(23))   # 2^f * 2^n


def exp32_ir(builder, x):
    """The same arithmetic on a vector of floats, as LLVM operations — for kernels written as
    intrinsics (attention's softmax over a block of keys), where no loop is left to vectorize."""
    vt = x.type
    n = vt.count
    const = (lambda c: ir.Constant(vt, [c] * n))
    fast = ["fast"]
    t = builder.fmul(x, const(LOG2E), flags=fast)
    t = builder.select(builder.fcmp_ordered(">", t, const(126.0)), const(126.0), t)
    t = builder.select(builder.fcmp_ordered("<", t, const(-126.0)), const(-126.0), t)
    floor = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt]), f"llvm.floor.v{n}f32")
    k = builder.call(floor, [t])
    f = builder.fsub(t, k, flags=fast)                             # [0, 1)
    p = const(C[6])
    for c in C[5::-1]:                                             # Horner: 2^f
        p = builder.fadd(builder.fmul(p, f, flags=fast), const(c), flags=fast)
    it = ir.VectorType(ir.IntType(32), n)
    bits = builder.shl(builder.add(builder.fptosi(k, it), ir.Constant(it, [127] * n)),
                       ir.Constant(it, [23] * n))                  # 2^k
    return builder.fmul(p, builder.bitcast(bits, vt), flags=fast)
