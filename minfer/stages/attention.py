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
