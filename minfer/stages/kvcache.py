"""Stage — the KV cache: a pool of fixed-size blocks (PagedAttention, Kwon et al., 2023).

During decoding every new token attends to the keys and values of all earlier tokens. Recomputing
them each step would cost a whole prefill per token, so they are kept. Where to keep them:

    k, v : [n_layers, n_blocks, block_size, n_kv_heads, head_dim]

The pool is cut into blocks of `block_size` token slots. A sequence owns a *block table*, the list
of block ids that hold its tokens in order: token at position p lives in block
table[p // block_size], row p % block_size. Its *slot* is block * block_size + row, one integer
that says where to write. Sequences grow one block at a time and give blocks back when they
finish, so many sequences of different lengths share one pool without fragmentation. A contiguous
cache is the special case of a single block as long as the context.
"""
from __future__ import annotations

import numpy as np


class KVCache:
    """The block pool. Grows (doubles) when the block manager runs out of free blocks."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, block_size: int = 16,
                 n_blocks: int = 32, dtype=np.float32):
        self.block_size = block_size
        shape = (n_layers, n_blocks, block_size, n_kv_heads, head_dim)
        self.k = np.zeros(shape, dtype=dtype)
        self.v = np.zeros(shape, dtype=dtype)

    @property
    def n_blocks(self) -> int:
        return self.k.shape[1]

    def grow(self, n_blocks: int) -> None:
        extra = [(0, 0), (0, n_blocks - self.n_blocks), (0, 0), (0, 0), (0, 0)]
        self.k = np.pad(self.k, extra)
        self.v = np.pad(self.v, extra)

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def kv_write(k_cache: np.ndarray, v_cache: np.ndarray, k: np.ndarray, v: np.ndarray,
             slot_mapping: np.ndarray) -> None:
    """Store the new tokens' keys and values in their slots (one layer).
    k_cache/v_cache [n_blocks, bs, Hkv, hd], k/v [T, Hkv, hd], slot_mapping [T]."""
    n_blocks, bs = k_cache.shape[:2]
    k_cache.reshape(n_blocks * bs, *k_cache.shape[2:])[slot_mapping] = k   # slots are rows of the flat pool
    v_cache.reshape(n_blocks * bs, *v_cache.shape[2:])[slot_mapping] = v


class BlockManager:
    """Hands out blocks of the pool to sequences and takes them back."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.free: list[int] = list(range(cache.n_blocks - 1, -1, -1))  # a stack: pop() gives 0 first
        self.tables: dict[int, list[int]] = {}

    def ensure(self, seq_id: int, n_tokens: int) -> list[int]:
        """Make sure sequence `seq_id` owns enough blocks for `n_tokens` tokens; return its table."""
        table = self.tables.setdefault(seq_id, [])
        need = -(-n_tokens // self.cache.block_size) - len(table)
        if need > len(self.free):
            old = self.cache.n_blocks
            new = max(2 * old, old + need - len(self.free))
            self.cache.grow(new)
            self.free = list(range(new - 1, old - 1, -1)) + self.free
        for _ in range(max(need, 0)):
            table.append(self.free.pop())
        return table

    def slots(self, seq_id: int, start: int, stop: int) -> np.ndarray:
        """Slots of positions start..stop-1 of a sequence."""
        table = np.asarray(self.tables[seq_id], dtype=np.int64)
        pos = np.arange(start, stop)
        bs = self.cache.block_size
        return table[pos // bs] * bs + pos % bs

    def release(self, seq_id: int) -> None:
        self.free.extend(reversed(self.tables.pop(seq_id, [])))


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
# manager above hands out its blocks exactly as for the host pool. The cuda backend writes k and
# v into it straight from the QKV matmul (stages/linear_cuda.py); kv_write_kernel is the
# standalone copy.  grid (T,)  block (threads,) — thread j of token t copies elements j,
# j + threads, ... of the token's [Hkv, hd] keys and values into its slot.
# ---------------------------------------------------------------------------------------------
from numba import cuda  # noqa: E402


class DeviceKVCache:
    """The block pool on the device: k, v [n_layers, n_blocks, block_size, n_kv_heads, head_dim]
    float32 device arrays. Same interface as KVCache for the BlockManager. `generation` counts
    the reallocations (grow): whatever holds the old arrays (a captured CUDA graph) must be redone."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, block_size: int = 16,
                 n_blocks: int = 32):
        self.block_size = block_size
        self.shape = (n_layers, n_blocks, block_size, n_kv_heads, head_dim)
        self.k = cuda.device_array(self.shape, dtype=np.float32)
        self.v = cuda.device_array(self.shape, dtype=np.float32)
        self.generation = 0

    @property
    def n_blocks(self) -> int:
        return self.shape[1]

    def grow(self, n_blocks: int) -> None:
        old = self.n_blocks
        k, v = self.k, self.v
        self.shape = self.shape[:1] + (n_blocks,) + self.shape[2:]
        self.k = cuda.device_array(self.shape, dtype=np.float32)
        self.v = cuda.device_array(self.shape, dtype=np.float32)
        for layer in range(self.shape[0]):           # device-to-device copies of the used blocks
            self.k[layer, :old].copy_to_device(k[layer])
            self.v[layer, :old].copy_to_device(v[layer])
        self.generation += 1

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
