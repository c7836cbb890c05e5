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
