"""Stage 3 — rotary position embedding, RoPE (Su et al., 2021).

Position enters attention by rotating query and key vectors: the head vector is split into
pairs, and pair i of a token at position p is turned by the angle p * theta_i, with
theta_i = base^(-2i / head_dim). The dot product of a rotated q and k then depends only on their
distance, not on where they stand.

Which elements form a pair is a convention. llama.cpp (and GGUF files) pair neighbours
(x0, x1), (x2, x3), ...; Hugging Face pairs halves (x_i, x_{i + d/2}) ("rotate_half"). The two
are the same function after permuting the rows of the Q and K projection weights, which is what
llama.cpp's converter does when it writes a GGUF. minfer computes with interleaved pairs, so GGUF
weights load as they are and HF weights go through `hf_to_interleaved` once, at load.
"""
import numpy as np


def rope_angles(positions: np.ndarray, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """positions [T] -> cos, sin [T, head_dim // 2] (float32; angles computed in float64)."""
    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)   # [hd/2]
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]            # [T, hd/2]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate neighbouring pairs. x [T, H, hd], cos/sin [T, hd/2] -> [T, H, hd]."""
    x0, x1 = x[..., 0::2], x[..., 1::2]                            # [T, H, hd/2] each
    c, s = cos[:, None, :], sin[:, None, :]                         # [T, 1, hd/2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out                                                      # [T, H, hd]


def hf_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Permute the rows of a HF q_proj/k_proj weight [n_heads*hd, in] from rotate-half order to
    interleaved-pair order: within each head, row i of the first half and row i of the second half
    become rows 2i and 2i+1."""
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return (w.reshape(n_heads, 2, hd // 2, in_dim)                 # [H, half, hd/2, in]
             .swapaxes(1, 2)                                        # [H, hd/2, 2, in]
             .reshape(out_dim, in_dim))                             # [H*hd, in]


# --- Numba CPU path: rotate the pairs in place -------------------------------------------------
from numba import njit  # noqa: E402


@njit(fastmath=True, cache=True)
def rope_numba(x, cos, sin):
    """Same contract as `rope`, but rotates x in place (and returns it)."""
    T, H, hd = x.shape
    for t in range(T):
        for h in range(H):
            for i in range(hd // 2):
                x0 = x[t, h, 2 * i]
                x1 = x[t, h, 2 * i + 1]
                x[t, h, 2 * i] = x0 * cos[t, i] - x1 * sin[t, i]
                x[t, h, 2 * i + 1] = x0 * sin[t, i] + x1 * cos[t, i]
    return x
