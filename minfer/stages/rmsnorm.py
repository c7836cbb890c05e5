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
