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
def rope_head(x, out, cos, sin):
    """One head of one token: out = x with pair (2i, 2i + 1) rotated by angle i (out may be x).
    cpu/region.py rotates q and k with it straight into their places."""
    for i in range(x.shape[0] // 2):
        x0 = x[2 * i]
        x1 = x[2 * i + 1]
        out[2 * i] = x0 * cos[i] - x1 * sin[i]
        out[2 * i + 1] = x0 * sin[i] + x1 * cos[i]


@njit(fastmath=True, cache=True)
def rope_numba(x, cos, sin):
    """Same contract as `rope`, but rotates x in place (and returns it)."""
    T, H, hd = x.shape
    for t in range(T):
        for h in range(H):
            rope_head(x[t, h], x[t, h], cos[t], sin[t])
    return x


def rope_angles_numba(positions: np.ndarray, head_dim: int, base: float):
    """rope_angles as rows of a table of rope_angles(arange(n)) itself (as the GPU path keeps
    one), gathered in one compiled call: the reference's eight NumPy calls are slow on the caches
    that a decode step's weights have just flushed. The table grows to a power of two when a
    position passes its end: a few times at most, up to a model's context."""
    key = (head_dim, base)
    table = _TABLES.get(key)
    if table is not None:
        cos, sin, ok = _gather_angles(positions, *table)
        if ok:
            return cos, sin
    if len(positions) == 0 or positions.min() < 0:                  # (not from the engine)
        return rope_angles(positions, head_dim, base)
    n = max(1024, 1 << int(positions.max()).bit_length())
    _TABLES[key] = rope_angles(np.arange(n), head_dim, base)
    return rope_angles_numba(positions, head_dim, base)


_TABLES = {}      # (head_dim, base) -> (cos, sin) [n, hd/2]: rope_angles(arange(n))


@njit(cache=True)
def _gather_angles(positions, cos_t, sin_t):
    """Rows `positions` of the tables; ok: all of them were in the tables."""
    T, n = positions.shape[0], cos_t.shape[0]
    cos = np.empty((T, cos_t.shape[1]), dtype=np.float32)
    sin = np.empty((T, cos_t.shape[1]), dtype=np.float32)
    for t in range(T):
        p = positions[t]
        if p < 0 or p >= n:
            return cos, sin, False
        cos[t], sin[t] = cos_t[p], sin_t[p]
    return cos, sin, True


# ---------------------------------------------------------------------------------------------
# numba.cuda GPU path. In the cuda backend the rotation happens inside the QKV matmul, right
# after a pair of rows (2i, 2i+1) is computed (gpu/linear.py); `rope_rotate_cuda` is that
# step. The cos/sin tables are rope_angles(arange(max_seq_len)), uploaded once.
#   rope_kernel: grid (T,)  block (threads,) — thread j of token t rotates pairs j, j + threads, ...
#   of all heads (H * hd/2 pairs per token), in place.
# ---------------------------------------------------------------------------------------------
from .lazy_cuda import cuda  # noqa: E402  (numba.cuda, imported when a kernel is first used)


@cuda.jit(device=True, inline=True)
def rope_rotate_cuda(x0, x1, c, s):
    """Turn the pair (x0, x1) by the angle whose cosine and sine are c and s."""
    return x0 * c - x1 * s, x0 * s + x1 * c


@cuda.jit
def rope_kernel(x, positions, cos_t, sin_t):
    t = cuda.blockIdx.x
    H, hd = x.shape[1], x.shape[2]
    half = hd // 2
    p = positions[t]
    for j in range(cuda.threadIdx.x, H * half, cuda.blockDim.x):
        h, i = j // half, j % half
        a, b = rope_rotate_cuda(x[t, h, 2 * i], x[t, h, 2 * i + 1], cos_t[p, i], sin_t[p, i])
        x[t, h, 2 * i] = a
        x[t, h, 2 * i + 1] = b


def rope_cuda(x, positions, cos_t, sin_t, threads=128, stream=0):
    """Device arrays: x [T, H, hd] rotated in place; positions [T]; cos_t/sin_t [max_pos, hd/2]."""
    rope_kernel[x.shape[0], threads, stream](x, positions, cos_t, sin_t)
