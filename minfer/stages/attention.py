"""Stage — causal self-attention with grouped-query heads, reading keys/values from the paged cache.

    attn(q, K, V) = softmax(q K^T / sqrt(hd) + causal mask) V

Grouped-query attention (GQA, Ainslie et al., 2023): n_heads query heads share n_kv_heads key/value
heads; query head h reads kv head h // (n_heads / n_kv_heads). SmolLM2-135M has 9 query heads and 3
kv heads, which makes the KV cache 3x smaller.

Each sequence of the batch has its own rows of q and its own block table; a query at position p
sees the keys at positions 0..p of its own sequence (the causal mask), all read from the cache —
the new tokens' keys were written there just before. Prefill, decode and verification are the same
code: they differ only in how many rows each sequence brings.
"""
import numpy as np

from ..batch import Batch


def softmax(s: np.ndarray, axis: int = -1) -> np.ndarray:
    s = s - np.max(s, axis=axis, keepdims=True)                     # subtract the max: no overflow
    e = np.exp(s)
    return e / np.sum(e, axis=axis, keepdims=True)


def paged_attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, batch: Batch) -> np.ndarray:
    """q [T, Hq, hd]; k_cache/v_cache [n_blocks, bs, Hkv, hd] (one layer) -> out [T, Hq, hd]."""
    T, Hq, hd = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    out = np.empty_like(q)
    for b in range(batch.n_seqs):
        rows = slice(batch.seq_starts[b], batch.seq_starts[b + 1])
        S = int(batch.context_lens[b])                              # keys this sequence can see
        blocks = batch.block_tables[b, : -(-S // bs)]
        K = k_cache[blocks].reshape(-1, Hkv, hd)[:S]                # [S, Hkv, hd]
        V = v_cache[blocks].reshape(-1, Hkv, hd)[:S]                # [S, Hkv, hd]
        K = np.repeat(K, group, axis=1)                             # [S, Hq, hd]
        V = np.repeat(V, group, axis=1)                             # [S, Hq, hd]
        scores = np.einsum("thd,shd->hts", q[rows], K) / np.float32(np.sqrt(hd))   # [Hq, t, S]
        visible = np.arange(S)[None, :] <= batch.positions[rows][:, None]            # [t, S]
        scores = np.where(visible[None], scores, -np.inf)                          # [Hq, t, S]
        out[rows] = np.einsum("hts,shd->thd", softmax(scores), V)                   # [t, Hq, hd]
    return out


# ---------------------------------------------------------------------------------------------
# Numba CPU path. Each (token row, query head) is one independent job: walk the sequence's keys
# through its block table and keep a running softmax ("online softmax", Milakov & Gimelshein
# 2018): when a larger score turns up, rescale what was accumulated so far. One pass over K and V,
# no score matrix in memory.
# ---------------------------------------------------------------------------------------------
from numba import njit, prange, float32  # noqa: E402


@njit(parallel=True, fastmath=True, cache=True)
def _attention_rows(q, k_cache, v_cache, row_seq, positions, block_tables):
    T, Hq, hd = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    scale = float32(1.0 / np.sqrt(hd))
    out = np.zeros_like(q)
    for job in prange(T * Hq):
        t, h = job // Hq, job % Hq
        b, kvh = row_seq[t], h // group
        m = float32(-np.inf)      # running max of the scores
        l = float32(0.0)          # running sum of exp(score - m)
        for j in range(positions[t] + 1):             # causal: keys 0..position
            blk, row = block_tables[b, j // bs], j % bs
            s = float32(0.0)
            for i in range(hd):
                s += q[t, h, i] * k_cache[blk, row, kvh, i]
            s *= scale
            if s > m:                                  # new max: rescale the past
                c = np.exp(m - s)
                l *= c
                for i in range(hd):
                    out[t, h, i] *= c
                m = s
            p = np.exp(s - m)
            l += p
            for i in range(hd):
                out[t, h, i] += p * v_cache[blk, row, kvh, i]
        for i in range(hd):
            out[t, h, i] /= l
    return out


def paged_attention_numba(q, k_cache, v_cache, batch: Batch):
    row_seq = np.repeat(np.arange(batch.n_seqs), np.diff(batch.seq_starts))   # [T] sequence of each row
    return _attention_rows(q, k_cache, v_cache, row_seq, batch.positions, batch.block_tables)
