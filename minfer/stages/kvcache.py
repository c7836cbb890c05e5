"""Stage — the KV cache: a pool of fixed-size blocks (PagedAttention, Kwon et al., 2023).

During decoding every new token attends to the keys and values of all earlier tokens. Recomputing
them each step would cost a whole prefill per token, so they are kept. Where to keep them:

    k, v : [n_layers, n_blocks, block_size, n_kv_heads, head_dim]

The pool is cut into blocks of `block_size` token slots. A sequence owns a *block table*, the list
of block ids that hold its tokens in order: token at position p lives in block
table[p // block_size], row p % block_size. Its *slot* is block * block_size + row, one integer
that says where to write. Sequences grow one block at a time and give blocks back when they
finish, so many sequences of different lengths share one pool without fragmentation
(engine/block_manager.py hands them out). A contiguous cache is the special case of a single
block as long as the context.
"""
from __future__ import annotations

import numpy as np


class KVCache:
    """The block pool, allocated once (the engine sizes it from a memory budget; it never grows).
    engine/block_manager.py decides which sequence owns which block."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, block_size: int = 16,
                 n_blocks: int = 32, dtype=np.float32):
        self.block_size = block_size
        shape = (n_layers, n_blocks, block_size, n_kv_heads, head_dim)
        self.k = np.zeros(shape, dtype=dtype)
        self.v = np.zeros(shape, dtype=dtype)

    @property
    def n_blocks(self) -> int:
        return self.k.shape[1]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def kv_write(k_cache: np.ndarray, v_cache: np.ndarray, k: np.ndarray, v: np.ndarray,
             slot_mapping: np.ndarray) -> None:
    """Store the new tokens' keys and values in their slots (one layer).
    k_cache/v_cache [n_blocks, bs, Hkv, hd], k/v [T, Hkv, hd], slot_mapping [T]."""
    n_blocks, bs = k_cache.shape[:2]
    k_cache.reshape(n_blocks * bs, *k_cache.shape[2:])[slot_mapping] = k   # slots are rows of the flat pool
    v_cache.reshape(n_blocks * bs, *v_cache.shape[2:])[slot_mapping] = v


# --- Numba CPU path ---------------------------------------------------------------------------
from numba import njit  # noqa: E402


@njit(cache=True)
def kv_write_numba(k_cache, v_cache, k, v, slot_mapping):
    bs = k_cache.shape[1]
    for t in range(k.shape[0]):
        blk, row = slot_mapping[t] // bs, slot_mapping[t] % bs
        k_cache[blk, row] = k[t]
        v_cache[blk, row] = v[t]


# ---------------------------------------------------------------------------------------------
# numba.cuda GPU path. On the GPU the pool lives in device memory from load to exit; the block
# manager (engine/block_manager.py) hands out its blocks exactly as for the host pool. The cuda backend writes k and
# v into it straight from the QKV matmul (gpu/linear.py); kv_write_kernel is the
# standalone copy.  grid (T,)  block (threads,) — thread j of token t copies elements j,
# j + threads, ... of the token's [Hkv, hd] keys and values into its slot.
# ---------------------------------------------------------------------------------------------
from .lazy_cuda import cuda  # noqa: E402  (numba.cuda, imported when a kernel is first used)


class DeviceKVCache:
    """The block pool on the device: k, v [n_layers, n_blocks, block_size, n_kv_heads, head_dim]
    float32 device arrays, allocated once. Same interface as KVCache for the block manager."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, block_size: int = 16,
                 n_blocks: int = 32):
        self.block_size = block_size
        self.shape = (n_layers, n_blocks, block_size, n_kv_heads, head_dim)
        self.k = cuda.device_array(self.shape, dtype=np.float32)
        self.v = cuda.device_array(self.shape, dtype=np.float32)

    @property
    def n_blocks(self) -> int:
        return self.shape[1]

    def nbytes(self) -> int:
        return 2 * int(np.prod(self.shape)) * 4


@cuda.jit
def kv_write_kernel(k_cache, v_cache, k, v, slot_mapping):
    t = cuda.blockIdx.x
    bs, n_kv, hd = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    blk, row = slot_mapping[t] // bs, slot_mapping[t] % bs
    for j in range(cuda.threadIdx.x, n_kv * hd, cuda.blockDim.x):
        h, i = j // hd, j % hd
        k_cache[blk, row, h, i] = k[t, h, i]
        v_cache[blk, row, h, i] = v[t, h, i]


def kv_write_cuda(k_cache, v_cache, k, v, slot_mapping, threads=128, stream=0):
    """Device arrays, one layer: k_cache/v_cache [n_blocks, bs, Hkv, hd], k/v [T, Hkv, hd]."""
    kv_write_kernel[k.shape[0], threads, stream](k_cache, v_cache, k, v, slot_mapping)
