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
# Numba CPU path. Walk a sequence's keys through its block table and keep a running softmax
# ("online softmax", Milakov & Gimelshein 2018): when a larger score turns up, rescale what was
# accumulated so far. One pass over K and V, no score matrix in memory. The walk goes a cache
# block (bs keys) at a time: the block's scores first, then one rescale for the block, then its
# exps in one loop — exp32 is plain arithmetic, so that loop becomes vector code (np.exp, one C
# call per key, was ~40% of the kernel's time).
#
# The jobs: (token row, slice of its keys), every query head in each. A decode step has one row:
# its keys are cut into S = SLICES slices, each thread walks its own slices, and the partial
# results (m, l, o of each slice) are merged at the end ("flash-decoding", Dao et al. 2023) —
# the softmax rescale once more: o = sum_s e^(m_s - M) o_s, l = sum_s e^(m_s - M) l_s. A job
# reads each key and value row once for the G query heads that share it, and walks the cache's
# memory in order, whole blocks [bs, Hkv, hd] at a time: inside a decode step, where the cache
# comes from memory each layer, that was 1.3-2x faster than a job per (row, query head).
# With T rows, S = SLICES // T (at least 1): a prefill of 8 rows or more is a job per row, the
# rows taken in zigzag order (0, T-1, 1, T-2, ...), so that each thread's share of them holds
# short and long causal contexts alike.
# ---------------------------------------------------------------------------------------------
from numba import njit, prange, float32  # noqa: E402

from .fastexp import exp32  # noqa: E402

SLICES = 8                                             # jobs for a decode step (T x S jobs)


@njit(parallel=True, fastmath=True, cache=True)
def _attention_rows(q, k_cache, v_cache, row_seq, positions, block_tables):
    T, Hq, hd = q.shape
    S = max(1, SLICES // T)                            # key slices per row
    parts = _slices(T, S, Hq, hd)
    for job in prange(T * S):
        _attention_job(q, k_cache, v_cache, row_seq, positions, block_tables, job, parts)
    return _merge_slices(q, parts)


@njit(inline="always")
def _slices(T, S, Hq, hd):
    """Each (row, slice) job's partial result: its running max, sum of exps, unnormalised output."""
    return (np.empty((T, S, Hq), dtype=np.float32), np.empty((T, S, Hq), dtype=np.float32),
            np.empty((T, S, Hq, hd), dtype=np.float32))


@njit(fastmath=True, cache=True)
def _attention_job(q, k_cache, v_cache, row_seq, positions, block_tables, job, parts):
    """Job `job` of T x S: one row's one slice of keys, all query heads, into parts[..][t, s]."""
    m_part, l_part, o_part = parts
    T, S, Hq = m_part.shape
    hd = q.shape[2]
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv                                      # query heads per kv head
    scale = float32(1.0 / np.sqrt(hd))
    j, s = job // S, job % S
    t = j // 2 if j % 2 == 0 else T - 1 - j // 2       # zigzag over the rows
    b = row_seq[t]
    n = positions[t] + 1                               # causal: keys 0..position
    n_blk = (n + bs - 1) // bs
    qs = np.empty((Hq, hd), dtype=np.float32)          # q, scaled once, not every score
    for h in range(Hq):
        for i in range(hd):
            qs[h, i] = q[t, h, i] * scale
    o = np.zeros((Hq, hd), dtype=np.float32)
    m = np.full(Hq, -np.inf, dtype=np.float32)
    l = np.zeros(Hq, dtype=np.float32)
    p = np.empty((Hq, bs), dtype=np.float32)           # one block's scores, then their exps
    for jb in range(s * n_blk // S, (s + 1) * n_blk // S):   # this slice's blocks
        blk = block_tables[b, jb]
        nk = min(bs, n - jb * bs)                      # keys of this block that are visible
        for r in range(nk):
            for kvh in range(Hkv):
                kr = k_cache[blk, r, kvh]              # [hd]: one key, for its G query heads
                for h in range(kvh * G, kvh * G + G):
                    acc = float32(0.0)
                    for i in range(hd):
                        acc += qs[h, i] * kr[i]
                    p[h, r] = acc
        for h in range(Hq):
            m_new = m[h]
            for r in range(nk):
                m_new = max(m_new, p[h, r])
            c = exp32(m[h] - m_new)                    # rescale the past (1 if the max held)
            l[h] *= c
            for i in range(hd):
                o[h, i] *= c
            for r in range(nk):
                p[h, r] = exp32(p[h, r] - m_new)
                l[h] += p[h, r]
            m[h] = m_new
        for r in range(nk):
            for kvh in range(Hkv):
                vr = v_cache[blk, r, kvh]              # [hd]
                for h in range(kvh * G, kvh * G + G):
                    pr = p[h, r]
                    for i in range(hd):
                        o[h, i] += pr * vr[i]
    for h in range(Hq):
        m_part[t, s, h], l_part[t, s, h] = m[h], l[h]
        for i in range(hd):
            o_part[t, s, h, i] = o[h, i]


@njit(fastmath=True, cache=True)
def _merge_slices(q, parts):
    """The slices' partial results -> out [T, Hq, hd]: the same rescale, now between slices (an
    empty slice has l = 0)."""
    m_part, l_part, o_part = parts
    T, S, Hq = m_part.shape
    hd = q.shape[2]
    out = np.empty_like(q)                 # (np.zeros_like would be a parallel loop of its own)
    for t in range(T):
        for h in range(Hq):
            out[t, h] = float32(0.0)
            M = m_part[t, 0, h]
            for s in range(1, S):
                M = max(M, m_part[t, s, h])
            L = float32(0.0)
            for s in range(S):
                if l_part[t, s, h] > 0:
                    c = exp32(m_part[t, s, h] - M)
                    L += c * l_part[t, s, h]
                    for i in range(hd):
                        out[t, h, i] += c * o_part[t, s, h, i]
            for i in range(hd):
                out[t, h, i] /= L
    return out


def paged_attention_numba(q, k_cache, v_cache, batch: Batch):
    return _attention_rows(q, k_cache, v_cache, batch.row_seq, batch.positions, batch.block_tables)


# ---------------------------------------------------------------------------------------------
# numba.cuda GPU path: the same online softmax, with a thread block per (token row, query head)
# walking the keys a chunk at a time.
#   grid (T, Hq)   block (threads,) — threads >= head_dim, a power of two <= 512.
#   Per chunk of `threads` keys: thread j scores key c0 + j (q . k over head_dim) into shared
#   memory, and notes where the key's row starts in the (flattened) cache: the loops below then
#   index with one addition — no 5-D index arithmetic and no division in them (a 64-bit `//` or
#   `%` is not one GPU instruction but a call to a division routine); a tree over the block
#   gives the new running max m; thread j turns its score into p_j = exp(s_j - m); another tree
#   adds the p_j to the running sum l. Then sum_j p_j v_j: the threads form G = threads // head_dim groups, thread
#   (g, i) adds up output element i over the keys j = g, g + G, ... — G chains of loads instead
#   of one: with 256 threads and head_dim 64, a 256-key chunk is 64 steps, not 256. The G
#   partial outputs are added at the end (m and l are the same in every thread, so partials add
#   up plainly). Decode attention a layer on an H200: one chain, with the divisions in it, ~60
#   us; groups, ~26; no division or 5-D indexing in the loops, ~18; trees for max and sum, ~13.
# q and out are [T, Hq*hd] (heads side by side); the cache is the whole [L, n_blocks, bs, Hkv, hd]
# pool and `layer` picks the layer.
# ---------------------------------------------------------------------------------------------
import math  # noqa: E402

from numba import cuda, int64  # noqa: E402

MAX_THREADS, MAX_HEAD_DIM = 512, 256


@cuda.jit(device=True)
def block_reduce(red, v, is_max):
    """max (or sum) of v over the thread block (a power of two), in every thread: a tree in
    shared memory, log2(threads) steps (each thread reading all n values was slower on an H200:
    attention 18 -> 13 us a layer). sampling_cuda uses it too."""
    tid = cuda.threadIdx.x
    red[tid] = v
    cuda.syncthreads()
    half = cuda.blockDim.x // 2
    while half > 0:
        if tid < half:
            red[tid] = max(red[tid], red[tid + half]) if is_max else red[tid] + red[tid + half]
        cuda.syncthreads()
        half //= 2
    r = red[0]
    cuda.syncthreads()
    return r


@cuda.jit
def attention_kernel(q, kf, vf, shape, layer, row_seq, positions, block_tables, out):
    qv = cuda.shared.array(MAX_HEAD_DIM, float32)      # this row's query head
    sc = cuda.shared.array(MAX_THREADS, float32)       # the chunk's scores, then p_j
    where = cuda.shared.array(MAX_THREADS, int64)      # the chunk's keys: where their rows start
    red = cuda.shared.array(MAX_THREADS, float32)      # block reductions
    t, h, tid, n = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x, cuda.blockDim.x
    n_blocks, bs, n_kv, hd = shape[1], shape[2], shape[3], shape[4]   # of the caches kf, vf flatten
    kvh = h // (q.shape[1] // hd // n_kv)             # GQA: the kv head this query head reads
    b = row_seq[t]
    n_keys = positions[t] + 1                          # causal: keys 0..position
    sqrt_hd = float32(math.sqrt(float32(hd)))
    G = n // hd                                        # key groups in the p . V sum
    g, i = tid // hd, tid % hd                         # this thread: group g, output element i
    if tid < hd:
        qv[tid] = q[t, h * hd + tid]
    m = float32(-math.inf)                             # running max (the same in every thread)
    l = float32(0.0)                                   # running sum of exp(score - m)
    acc = float32(0.0)                                 # output element i, keys of group g
    cuda.syncthreads()
    for c0 in range(0, n_keys, n):
        nc = min(n, n_keys - c0)                       # keys in this chunk
        s = float32(-math.inf)
        if tid < nc:
            j = c0 + tid
            blk = int64(block_tables[b, j // bs])
            row0 = (((layer * n_blocks + blk) * bs + j % bs) * n_kv + kvh) * hd
            where[tid] = row0
            s = float32(0.0)
            for d in range(hd):
                s += qv[d] * kf[row0 + d]
            s = s / sqrt_hd
            sc[tid] = s
        m_new = max(m, block_reduce(red, s, True))   # the chunk's max, in every thread
        p = float32(math.exp(s - m_new))               # p_j (0 for a thread without a key)
        sc[tid] = p
        c = float32(math.exp(m - m_new))              # rescale what came before the new max
        l = l * c + block_reduce(red, p, False)       # (its barriers also publish sc)
        acc *= c
        if g < G:
            for jj in range(g, nc, G):
                acc += sc[jj] * vf[where[jj] + i]
        m = m_new
        cuda.syncthreads()                             # sc, where: rewritten by the next chunk
    sc[tid] = acc                                      # the groups' partial outputs
    cuda.syncthreads()
    if tid < hd:
        total = float32(0.0)
        for gg in range(G):
            total += sc[gg * hd + tid]
        out[t, h * hd + tid] = total / l


def _flat(a):
    """A 1-D view of a device array, made once per array (making a view costs ~20 us in Python)."""
    f = getattr(a, "_minfer_flat", None)
    if f is None:
        f = a._minfer_flat = a.reshape(a.size)
    return f


def paged_attention_cuda(q, k_cache, v_cache, layer, row_seq, positions, block_tables, out,
                         threads=256, stream=0):
    """Device arrays: q/out [T, Hq*hd], caches [L, n_blocks, bs, Hkv, hd], row_seq/positions [T]
    int32, block_tables [B, M] int32."""
    hd = k_cache.shape[4]
    n_heads = q.shape[1] // hd
    threads = min(MAX_THREADS, max(threads, 1 << (hd - 1).bit_length()))  # one thread per output element, within the shared arrays
    attention_kernel[(q.shape[0], n_heads), threads, stream](
        q, _flat(k_cache), _flat(v_cache), tuple(k_cache.shape), layer, row_seq, positions, block_tables, out)
