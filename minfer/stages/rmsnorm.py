"""Stage 2 — RMSNorm (Zhang & Sennrich, 2019).

    y = x / sqrt(mean(x^2) + eps) * w

Each token's vector is rescaled to unit root-mean-square, then multiplied by a learned gain w.
Unlike LayerNorm there is no mean subtraction and no bias. Llama applies it before attention,
before the MLP, and once more before the LM head.
"""
import numpy as np


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x [T, D], w [D] -> [T, D]."""
    ms = np.mean(x * x, axis=-1, keepdims=True)                    # [T, 1]
    return (x / np.sqrt(ms + np.float32(eps))) * w                  # [T, D]


# --- Numba CPU path: one pass for the sum of squares, one to scale ----------------------------
from numba import njit, float32  # noqa: E402


@njit(fastmath=True, cache=True)
def rmsnorm_numba(x, w, eps):
    T, D = x.shape
    out = np.empty_like(x)
    for t in range(T):
        ss = float32(0.0)
        for i in range(D):
            ss += x[t, i] * x[t, i]
        r = float32(1.0) / np.sqrt(ss / float32(D) + float32(eps))
        for i in range(D):
            out[t, i] = x[t, i] * r * w[i]
    return out


# ---------------------------------------------------------------------------------------------
# numba.cuda GPU path. In the cuda backend RMSNorm is folded into the matmul that follows it
# (gpu/linear.py); this standalone kernel is the plain version of the same arithmetic.
#   grid (T,)   block (threads,) — one block per token row, threads <= 1024, a power of two.
#   Each thread sums the squares of columns tid, tid + threads, ...; a tree in shared memory adds
#   the partial sums; then each thread scales its own columns.
# ---------------------------------------------------------------------------------------------
import math  # noqa: E402

from .lazy_cuda import cuda  # noqa: E402  (numba.cuda, imported when a kernel is first used)


@cuda.jit
def rmsnorm_kernel(x, w, eps, out):
    part = cuda.shared.array(1024, float32)
    t, tid, n = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    D = x.shape[1]
    ss = float32(0.0)
    for i in range(tid, D, n):
        ss += x[t, i] * x[t, i]
    part[tid] = ss
    cuda.syncthreads()
    s = n // 2
    while s > 0:                       # tree: threads 0..s-1 add the partial sums s..2s-1
        if tid < s:
            part[tid] += part[tid + s]
        cuda.syncthreads()
        s //= 2
    r = float32(1.0) / float32(math.sqrt(part[0] / float32(D) + eps))
    for i in range(tid, D, n):
        out[t, i] = x[t, i] * r * w[i]


def rmsnorm_cuda(x, w, eps, out, threads=256, stream=0):
    """Device arrays: x [T, D], w [D] -> out [T, D]."""
    rmsnorm_kernel[x.shape[0], threads, stream](x, w, float32(eps), out)
