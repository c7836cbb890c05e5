"""Stage — the feed-forward block: SwiGLU (Shazeer, 2020).

    mlp(x) = W_down ( silu(W_gate x) * (W_up x) ),     silu(z) = z * sigmoid(z)

The gate branch decides, per hidden unit, how much of the up branch passes. The hidden width
(ffn_dim, 1536 for SmolLM2-135M) is ~2.7x the model width.
"""
import numpy as np

from .linear import linear


def silu(z: np.ndarray) -> np.ndarray:
    # sigmoid(z) = (1 + tanh(z/2)) / 2: the same function, without exp overflowing for z << 0
    return z * (np.float32(0.5) + np.float32(0.5) * np.tanh(np.float32(0.5) * z))


def swiglu(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray) -> np.ndarray:
    """x [T, D], w_gate/w_up [F, D], w_down [D, F] -> [T, D]."""
    h = silu(linear(x, w_gate)) * linear(x, w_up)                  # [T, F]
    return linear(h, w_down)                                        # [T, D]


# --- Numba CPU path ---------------------------------------------------------------------------
# For a few tokens (decode, short prompts) gate and up are computed in one fused kernel with the
# SiLU applied on the spot; for many (quant_dispatch.KernelConfig.sgemm_min_rows; 8 for float32
# weights) the matmuls go to sgemm and the activation is one pass.
from numba import njit, prange, float32  # noqa: E402

from .fastexp import exp32  # noqa: E402  (e^x in plain arithmetic: the silu loops vectorize)
from .linear import dense_matmul_numba, linear_numba  # noqa: E402
from .quant import QuantMatrix  # noqa: E402
from .quant_dispatch import KernelConfig, quant_gate_up_numba  # noqa: E402


# error_model="numpy": under Python's rules each float division checks its divisor for zero, to
# raise, and that branch keeps the loop from becoming vector code.
@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def silu_mul_numba(g, u):
    """silu(g) * u, elementwise, in place in g. g/u [T, F]."""
    T, F = g.shape
    for t in prange(T):
        for i in range(F):
            z = g[t, i]
            g[t, i] = z / (float32(1.0) + exp32(-z)) * u[t, i]
    return g


def swiglu_numba(x, w_gate, w_up, w_down, int8_act: bool = False,
                 kernels: KernelConfig | None = None):
    """int8_act: on quantized weights, x rounded to int8 per block (quant_i8.py; opt-in).
    kernels: which kernels (quant_dispatch.KernelConfig; default: this CPU's)."""
    T = x.shape[0]
    kernels = kernels or KernelConfig()
    if isinstance(w_gate, QuantMatrix) and isinstance(w_up, QuantMatrix) and w_gate.fmt == w_up.fmt:
        if T < kernels.sgemm_min_rows(w_gate.fmt) or int8_act:
            h = quant_gate_up_numba(x, w_gate, w_up, int8_act, kernels)                 # [T, F]
            return linear_numba(h, w_down, int8_act, kernels)
    elif isinstance(w_gate, np.ndarray) and isinstance(w_up, np.ndarray) and T < kernels.dense_gemm_min_rows:
        x = np.ascontiguousarray(x, dtype=np.float32)
        h = silu_mul_numba(dense_matmul_numba(x, w_gate), dense_matmul_numba(x, w_up))    # [T, F]
        return linear_numba(h, w_down, kernels=kernels)
    h = silu_mul_numba(linear_numba(x, w_gate, int8_act, kernels), linear_numba(x, w_up, int8_act, kernels))
    return linear_numba(h, w_down, int8_act, kernels)


# ---------------------------------------------------------------------------------------------
# numba.cuda GPU path. In the cuda backend silu(gate) * up is the epilogue of the fused gate/up
# matmul (gpu/linear.py, swiglu_kernel); `silu_cuda` is that step, and silu_mul_kernel is
# the standalone version.  grid (T,)  block (threads,) — thread j of row t does columns j, j+threads...
# ---------------------------------------------------------------------------------------------
import math  # noqa: E402

from .lazy_cuda import cuda  # noqa: E402  (numba.cuda, imported when a kernel is first used)


@cuda.jit(device=True, inline=True)
def silu_cuda(z):
    # exp(-z) overflows to inf for z << 0, and z / inf = -0: the right limit, no NaN
    return z / (float32(1.0) + float32(math.exp(-z)))


@cuda.jit
def silu_mul_kernel(g, u, out):
    t = cuda.blockIdx.x
    for i in range(cuda.threadIdx.x, g.shape[1], cuda.blockDim.x):
        out[t, i] = silu_cuda(g[t, i]) * u[t, i]


def silu_mul_cuda(g, u, out, threads=256, stream=0):
    """Device arrays g, u, out [T, F]: out = silu(g) * u."""
    silu_mul_kernel[g.shape[0], threads, stream](g, u, out)
