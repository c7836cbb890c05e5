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


# --- Numba CPU path: the matmuls are linear_numba; gate and activation fuse into one pass -----
from numba import njit, prange, float32  # noqa: E402

from .linear import linear_numba  # noqa: E402


@njit(parallel=True, fastmath=True, cache=True)
def silu_mul_numba(g, u):
    """silu(g) * u, elementwise, in place in g. g/u [T, F]."""
    T, F = g.shape
    for t in prange(T):
        for i in range(F):
            z = g[t, i]
            g[t, i] = z / (float32(1.0) + np.exp(-z)) * u[t, i]
    return g


def swiglu_numba(x, w_gate, w_up, w_down):
    return linear_numba(silu_mul_numba(linear_numba(x, w_gate), linear_numba(x, w_up)), w_down)
