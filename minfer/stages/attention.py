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
# The jobs: (tile of rows, slice of keys). A tile is up to ROWS new rows of one sequence (a
# sequence's rows are contiguous in a batch and at consecutive positions: batch.make_batch); a job
# loads a cache block [bs, Hkv, hd] once and uses it for every row of its tile that sees it
# (causal: row t sees the keys 0..positions[t]) and for the G query heads that share each kv
# head: k new rows (tokens to verify, a chunk of a prompt) read their sequence's keys and values
# once, not k times; the block stays in L1 while the rows go through it, and a tile's queries
# and partial outputs stay in L2. A decode step is the case of one-row tiles. The slices: a
# tile's keys are cut into S of them, each a job with its own partial results (m, l, o of each
# row and head), merged at the end ("flash-decoding", Dao et al. 2023) — the softmax rescale once
# more: o = sum_s e^(m_s - M) o_s, l = sum_s e^(m_s - M) l_s. The cuts fall on block boundaries,
# and each row's keys are cut where they would be if the row came alone (_cut: about a share
# s / S of its own keys), a tile ending where those cuts move: a row's result, to the last bit,
# does not depend on the rows beside it — a verified token gets the numbers its decode step
# would have, and a prompt's rows the same whether it comes in one chunk or several, or after a
# cached prefix. Equal shares of each row's keys are also equal shares of the work (the causal
# triangle's extra keys, up to a tile's rows, go to the last slice). Here S = SLICES // n_tiles
# (at least 1; cpu/region.py picks its own). The jobs go slice by slice (job j: slice
# j // n_tiles), so that a thread's share of them can hold whole slices of every tile; the tiles
# in zigzag order (0, n - 1, 1, n - 2, ...), so that a share of them holds short and long causal
# contexts alike.
# ---------------------------------------------------------------------------------------------
from numba import njit, prange, float32  # noqa: E402

from .fastexp import exp32  # noqa: E402

SLICES = 8                                             # jobs for a decode step (tiles x S)
ROWS = 32                                              # rows of a tile, at most
LANE_ROWS = 4             # rows in lanes from this many rows a tile (cpu/region.py: KernelConfig's)


@njit(parallel=True, fastmath=True, cache=True)
def _attention_rows(q, k_cache, v_cache, row_seq, positions, block_tables):
    T, Hq, hd = q.shape
    S = max(1, SLICES // _n_tiles(row_seq, positions, 1, 1))    # key slices a tile
    n = _n_tiles(row_seq, positions, S, k_cache.shape[1])
    parts = _slices(T, S, Hq, hd)
    for job in prange(n * S):
        _attention_job(q, k_cache, v_cache, row_seq, positions, block_tables, job, parts, LANE_ROWS)
    return _merge_slices(q, parts)


@njit(inline="always")
def _slices(T, S, Hq, hd):
    """Each (row, slice) partial result: its running max, sum of exps, unnormalised output."""
    return (np.empty((T, S, Hq), dtype=np.float32), np.empty((T, S, Hq), dtype=np.float32),
            np.empty((T, S, Hq, hd), dtype=np.float32))


@njit(cache=True)
def _tile_rows(row_seq, positions, S, bs, i):
    """Tiles of the batch's rows: a new one where a sequence starts, every ROWS rows of it, and
    where a row's slices of S would be cut elsewhere than the row before's. -> (t0, t1) of tile
    i (i = -1: (number of tiles, T))."""
    T = row_seq.shape[0]
    n, start, t0 = 0, 0, T
    for t in range(T):
        new = t == 0 or row_seq[t] != row_seq[t - 1]
        for s in range(1, S):
            if not new and _cut(positions[t], S, s, bs) != _cut(positions[t - 1], S, s, bs):
                new = True
        if new or (t - start) % ROWS == 0:
            start = t
            if n == i + 1 and i >= 0:
                return t0, t
            t0 = t
            n += 1
    return (t0, T) if i >= 0 else (n, T)


@njit(cache=True)
def _n_tiles(row_seq, positions, S, bs):
    return _tile_rows(row_seq, positions, S, bs, -1)[0]


@njit(cache=True)
def _cut(p, S, s, bs):
    """Where slice s of S starts among the keys 0..p of a row at position p, as if the row came
    alone: the block boundary nearest a share s / S of them (S at the end: p + 1)."""
    if s >= S:
        return p + 1
    k = s * (p + 1) // S
    return min(p + 1, (k + bs // 2) // bs * bs)        # whole blocks: a block cut in two is
                                                       # scored 16 keys at a time by both jobs


@njit(cache=True)
def _job_tile(row_seq, positions, S, bs, job):
    """Job `job` of n_tiles x S -> (its slice s, its tile's rows (t0, t1)): slice by slice, the
    tiles in zigzag order."""
    n = _n_tiles(row_seq, positions, S, bs)
    s, i = job // n, job % n
    return s, _tile_rows(row_seq, positions, S, bs, i // 2 if i % 2 == 0 else n - 1 - i // 2)


@njit(cache=True)
def _job_keys(row_seq, positions, S, bs, job):
    """Job `job` of n_tiles x S: its tile's rows t0..t1 - 1 (zigzag over the tiles), their
    sequence b, slice s of their keys, k0..k1 - 1 (each row's own cuts, which the tile's rows
    share; the last slice up to the last row) -> (b, s, t0, t1, k0, k1)."""
    s, (t0, t1) = _job_tile(row_seq, positions, S, bs, job)
    k0 = _cut(positions[t0], S, s, bs)
    k1 = _cut(positions[t0], S, s + 1, bs) if s + 1 < S else positions[t1 - 1] + 1
    return row_seq[t0], s, t0, t1, k0, k1


@njit(inline="always")
def _job_start(q, parts, row_seq, positions, job, bs):
    """_job_keys, and the rows' q scaled once (not every score) into qs [R, Hq, hd]; m, l
    [R, Hq] started, the rows' o zeroed."""
    S, Hq, hd = parts[0].shape[1], parts[0].shape[2], parts[2].shape[3]
    b, s, t0, t1, k0, k1 = _job_keys(row_seq, positions, S, bs, job)
    R = t1 - t0
    scale = float32(1.0 / np.sqrt(hd))
    qs = np.empty((R, Hq, hd), dtype=np.float32)
    o = parts[2]
    for t in range(t0, t1):
        o[t, s] = float32(0.0)
        for h in range(Hq):
            for i in range(hd):
                qs[t - t0, h, i] = q[t, h, i] * scale
    return (b, s, t0, t1, k0, k1, qs, np.full((R, Hq), -np.inf, dtype=np.float32),
            np.zeros((R, Hq), dtype=np.float32))


@njit(inline="always")
def _job_end(parts, t0, t1, s, m, l):
    m_part, l_part = parts[0], parts[1]
    for t in range(t0, t1):
        for h in range(m.shape[1]):
            m_part[t, s, h], l_part[t, s, h] = m[t - t0, h], l[t - t0, h]


@njit(fastmath=True, cache=True)
def _attention_job(q, k_cache, v_cache, row_seq, positions, block_tables, job, parts, lane_rows):
    """Job `job` of n_tiles x S: a tile of one sequence's rows against one slice of its keys,
    all query heads, into parts[..][t, s] for each of its rows t. From lane_rows rows a tile on
    (and head_dim 64, blocks of a multiple of 16 keys), rows in lanes (below)."""
    if q.shape[2] % 16 == 0:                           # (see "Vector code", below)
        t0, t1 = _job_tile(row_seq, positions, parts[0].shape[1], k_cache.shape[1], job)[1]
        if t1 - t0 >= lane_rows and q.shape[2] == 64 and k_cache.shape[1] % 16 == 0:
            _attention_job_rows(q, k_cache, v_cache, row_seq, positions, block_tables, job, parts)
        else:
            _attention_job_vec(q, k_cache, v_cache, row_seq, positions, block_tables, job, parts)
        return
    Hq, hd = q.shape[1], q.shape[2]
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv                                      # query heads per kv head
    b, s, t0, t1, k0, k1, qs, m, l = _job_start(q, parts, row_seq, positions, job, bs)
    o = parts[2]                                       # [T, S, Hq, hd]
    p = np.empty((Hq, bs), dtype=np.float32)           # one row's scores of a block, then exps
    for jb in range(k0 // bs, (k1 + bs - 1) // bs):    # this slice's blocks
        blk = block_tables[b, jb]
        ra, rb = max(k0 - jb * bs, 0), min(k1 - jb * bs, bs)   # the block's keys in the slice
        for t in range(t0, t1):
            re = min(rb, positions[t] + 1 - jb * bs)   # row t sees keys ra..re - 1 of them
            if re <= ra:
                continue
            j = t - t0
            for r in range(ra, re):
                for kvh in range(Hkv):
                    kr = k_cache[blk, r, kvh]          # [hd]: one key, for its G query heads
                    for h in range(kvh * G, kvh * G + G):
                        acc = float32(0.0)
                        for i in range(hd):
                            acc += qs[j, h, i] * kr[i]
                        p[h, r] = acc
            for h in range(Hq):
                m_new = m[j, h]
                for r in range(ra, re):
                    m_new = max(m_new, p[h, r])
                c = exp32(m[j, h] - m_new)             # rescale the past (1 if the max held)
                l[j, h] *= c
                for i in range(hd):
                    o[t, s, h, i] *= c
                for r in range(ra, re):
                    p[h, r] = exp32(p[h, r] - m_new)
                    l[j, h] += p[h, r]
                m[j, h] = m_new
            for r in range(ra, re):
                for kvh in range(Hkv):
                    vr = v_cache[blk, r, kvh]          # [hd]
                    for h in range(kvh * G, kvh * G + G):
                        pr = p[h, r]
                        for i in range(hd):
                            o[t, s, h, i] += pr * vr[i]
    _job_end(parts, t0, t1, s, m, l)


# ---------------------------------------------------------------------------------------------
# Vector code, for head_dim a multiple of 16 (SmolLM2: 64): the same job, written with 16-float
# vectors (their operations: attention_simd.py). The job above is bound by its arithmetic (a
# score is a dot product summed across its vector lanes, one at a time; p.V one chain of adds per
# head) and by waiting on memory (each block's keys read when first needed); this one is faster
# with the cache in memory or in cache, and more so on long contexts (docs/benchmarks.md,
# "Attention in vector code"). Here:
#   scores: 16 keys of a head at once (_scores16): 16 vector dot products advancing together
#           (16 independent sums, not one key's chain after another), then one tree of
#           shuffles adds up each one's lanes: ~3 vector operations a sum;
#   softmax: a head's 16 scores of a block as one vector (_max16, _exp16: fastexp's arithmetic
#           on 16 lanes);
#   p.V:    o[h] += p[h, r] v_r; for head_dim a multiple of 64, 64 floats of o at a time with
#           each key's p splat once for them, even and odd keys in separate chains (_pv64x2);
#           else 16 floats at a time, four keys in four independent chains (_pv4);
#   memory: while it scores a block, the job asks for the next block's keys and values into L2
#           (prefetch), a few lines per head, so their loads do not wait on memory.
# A tile of LANE_ROWS rows or more (tokens to verify, a prompt's chunk) turns this around: its
# query vectors, (row, head) pairs of a kv head, go 16 to a vector, one in each lane
# (_attention_job_rows; attention_simd.py, "Rows in lanes"), so that a key's element, splat once,
# serves 16 products, the softmax runs down the keys for 16 queries at once, and no sum crosses
# lanes (docs/benchmarks.md, "Attention, rows in lanes"). Both forms do each query's arithmetic in
# the same order — the sums that fast-math could reorder are marked to stay as written — so a
# row's result is the same bits whether it comes alone (a decode step) or in a tile (its
# verification): speculative decoding's greedy text does not depend on how it was checked.
# ---------------------------------------------------------------------------------------------
from .attention_simd import (_add1, _exp16, _exp_diff1, _fma1, _max16, _pv1, _pv4,  # noqa: E402
                             _pv64_end, _pv64_start, _pv64x1, _pv64x2, _pv_end, _pv_start,
                             _pv_rows, _scores16, _scores_rows, _softmax_rows)
from .simd import _prefetch_l2, _store16  # noqa: E402


@njit(fastmath=True, cache=True)
def _attention_job_vec(q, k_cache, v_cache, row_seq, positions, block_tables, job, parts):
    """_attention_job in vector code (head_dim % 16 == 0)."""
    S = parts[0].shape[1]
    Hq, hd = q.shape[1], q.shape[2]
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv                                      # query heads per kv head
    row, blk_len = Hkv * hd, bs * Hkv * hd             # floats a key (all kv heads), a block
    bs16 = (bs + 15) // 16 * 16                        # a head's scores, in whole vectors
    b, s, t0, t1, k0, k1, qs, m, l = _job_start(q, parts, row_seq, positions, job, bs)
    o = parts[2]                                       # [T, S, Hq, hd]: flat offsets below
    c = np.empty(Hq, dtype=np.float32)                 # each head's rescale of the past
    p = np.empty(Hq * bs16, dtype=np.float32)          # [Hq, bs16]: a row's scores, then exps
    j0, j1 = k0 // bs, (k1 + bs - 1) // bs             # this slice's blocks
    lines = blk_len // 16                              # 64-byte lines in a block's K (and V)
    for jb in range(j0, j1):
        K = k_cache[block_tables[b, jb]].reshape(blk_len)    # [bs * Hkv * hd]: key r, kv head
        V = v_cache[block_tables[b, jb]].reshape(blk_len)    # kvh at (r * Hkv + kvh) * hd
        ra, rb = max(k0 - jb * bs, 0), min(k1 - jb * bs, bs)  # the block's keys in the slice
        # the next block's lines, a share with each head's scores of the first row
        nxt = block_tables[b, jb + 1] if jb + 1 < j1 else -1
        share = (lines + Hq - 1) // Hq if nxt >= 0 else 0
        K1, V1 = k_cache[max(nxt, 0)].reshape(blk_len), v_cache[max(nxt, 0)].reshape(blk_len)
        for t in range(t0, t1):
            nk = min(rb, positions[t] + 1 - jb * bs) - ra     # keys ra..ra + nk - 1 seen by row t
            if nk <= 0:
                continue
            j, ot = t - t0, (t * S + s) * Hq * hd
            ln = 0
            for kvh in range(Hkv):
                for h in range(kvh * G, kvh * G + G):
                    for i in range(ln, min(lines, ln + share)):
                        _prefetch_l2(K1, i * 16)
                        _prefetch_l2(V1, i * 16)
                    ln += share
                    for r0 in range(0, nk, 16):        # p[h, r] = q_h . k_(ra + r)
                        _store16(p, h * bs16 + r0, _scores16(qs, j * Hq * hd + h * hd, K, (ra + r0) * row
                                                             + kvh * hd, row, nk - r0, hd))
            share = 0                                  # (asked for once)
            for h in range(Hq):                        # the online softmax, 16 keys a vector
                m_new = m[j, h]
                for r0 in range(0, nk, 16):
                    m_new = max(m_new, _max16(p, h * bs16 + r0, nk - r0))
                # (the past's rescale: 1 unless the max moved, as it rarely does after a few blocks)
                c[h] = float32(1.0) if m_new == m[j, h] else _exp_diff1(m[j, h], m_new)
                total = float32(0.0)
                for r0 in range(0, nk, 16):
                    total = _add1(total, _exp16(p, h * bs16 + r0, nk - r0, m_new))
                l[j, h] = _fma1(l[j, h], c[h], total)
                m[j, h] = m_new
            for kvh in range(Hkv):                     # o[h] = c[h] o[h] + sum_r p[h, r] v_r
                for h in range(kvh * G, kvh * G + G):
                    if hd % 64 == 0:
                        for i in range(0, hd, 64):
                            acc8 = _pv64_start(o, ot + h * hd + i, c[h])
                            r = 0
                            while r + 2 <= nk:
                                acc8 = _pv64x2(acc8, p, h * bs16 + r, V, (ra + r) * row + kvh * hd + i, row)
                                r += 2
                            if r < nk:
                                acc8 = _pv64x1(acc8, p, h * bs16 + r, V, (ra + r) * row + kvh * hd + i, row)
                            _pv64_end(o, ot + h * hd + i, acc8)
                        continue
                    for i in range(0, hd, 16):
                        acc = _pv_start(o, ot + h * hd + i, c[h])
                        r = 0
                        while r + 4 <= nk:
                            acc = _pv4(acc, p, h * bs16 + r, V, (ra + r) * row + kvh * hd + i, row)
                            r += 4
                        while r < nk:                  # the last 1-3 keys: the first chain
                            acc = _pv1(acc, p, h * bs16 + r, V, (ra + r) * row + kvh * hd + i)
                            r += 1
                        _store16(o, ot + h * hd + i, _pv_end(acc))
    _job_end(parts, t0, t1, s, m, l)


@njit(fastmath=True, cache=True)
def _attention_job_rows(q, k_cache, v_cache, row_seq, positions, block_tables, job, parts):
    """_attention_job for a tile of several rows, 16 query vectors a vector (attention_simd.py,
    "Rows in lanes"): head_dim 64 (SmolLM2's), block size a multiple of 16. Each query's arithmetic is
    _attention_job_vec's, so a row gets the same bits in a tile of any size."""
    S = parts[0].shape[1]
    Hq, hd = q.shape[1], q.shape[2]
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv                                      # query heads per kv head
    row, blk_len = Hkv * hd, bs * Hkv * hd             # floats a key (all kv heads), a block
    b, s, t0, t1, k0, k1 = _job_keys(row_seq, positions, S, bs, job)
    R = t1 - t0
    nq = R * G                                         # queries of one kv head: (row, head) pairs
    ng = (nq + 15) // 16                               # ... 16 to a vector: groups
    QT = np.empty((Hkv, ng, hd, 16), dtype=np.float32)     # the queries, lane u of group g:
    OT = np.zeros((Hkv, ng, hd, 16), dtype=np.float32)     # row t0 + (16 g + u) // G,
    M = np.full((Hkv, ng, 16), -np.inf, dtype=np.float32)  # head kvh G + (16 g + u) % G
    L = np.zeros((Hkv, ng, 16), dtype=np.float32)
    pos = np.full((ng, 16), -1, dtype=np.int64)        # each lane's position (-1: no query)
    scale = float32(1.0 / np.sqrt(hd))                 # (as _job_start scales q: the same bits)
    QT[:, ng - 1] = float32(0.0)                       # (lanes with no query)
    for kvh in range(Hkv):
        for w in range(nq):
            t, h, g, u = t0 + w // G, kvh * G + w % G, w // 16, w % 16
            pos[g, u] = positions[t]
            for i in range(hd):
                QT[kvh, g, i, u] = q[t, h, i] * scale
    bs16 = (bs + 15) // 16 * 16
    Sc = np.empty(bs16 * 16, dtype=np.float32)         # [keys, 16]: scores, then
    P = np.empty(bs16 * 16, dtype=np.float32)          # their exps
    NK = np.empty(16, dtype=np.int64)                  # keys of the block each lane sees
    j0, j1 = k0 // bs, (k1 + bs - 1) // bs             # this slice's blocks
    for jb in range(j0, j1):
        K = k_cache[block_tables[b, jb]].reshape(blk_len)    # [bs * Hkv * hd]: key r, kv head
        V = v_cache[block_tables[b, jb]].reshape(blk_len)    # kvh at (r * Hkv + kvh) * hd
        ra, rb = max(k0 - jb * bs, 0), min(k1 - jb * bs, bs)  # the block's keys in the slice
        if jb + 1 < j1:                                # the next block into L2 meanwhile
            K1, V1 = k_cache[block_tables[b, jb + 1]].reshape(blk_len), v_cache[block_tables[b, jb + 1]].reshape(blk_len)
            for i in range(0, blk_len, 16):
                _prefetch_l2(K1, i)
                _prefetch_l2(V1, i)
        for g in range(ng):
            n = 0
            for u in range(16):
                NK[u] = min(rb, pos[g, u] + 1 - jb * bs) - ra
                n = max(n, NK[u])
            if n <= 0:
                continue
            for kvh in range(Hkv):
                qoff = (kvh * ng + g) * hd * 16
                for r0 in range(0, n, 16):
                    _scores_rows(Sc, r0 * 16, QT, qoff, K, (ra + r0) * row + kvh * hd, row, n - r0, 4)
                c = _softmax_rows(Sc, P, n, NK, M, L, (kvh * ng + g) * 16)
                _pv_rows(OT, qoff, P, c, V, ra * row + kvh * hd, row, n, hd)
    m_part, l_part, o = parts                          # [T, S, Hq], [T, S, Hq], [T, S, Hq, hd]
    for kvh in range(Hkv):
        for w in range(nq):
            t, h, g, u = t0 + w // G, kvh * G + w % G, w // 16, w % 16
            m_part[t, s, h], l_part[t, s, h] = M[kvh, g, u], L[kvh, g, u]
            for i in range(hd):
                o[t, s, h, i] = OT[kvh, g, i, u]


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
#   up plainly). Each of these steps made decode attention faster (docs/benchmarks.md, "GPU
#   kernel shapes").
# q and out are [T, Hq*hd] (heads side by side); the cache is the whole [L, n_blocks, bs, Hkv, hd]
# pool and `layer` picks the layer.
# ---------------------------------------------------------------------------------------------
import math  # noqa: E402

from numba import int64  # noqa: E402

from .lazy_cuda import cuda  # noqa: E402  (numba.cuda, imported when a kernel is first used)

MAX_THREADS, MAX_HEAD_DIM = 512, 256


@cuda.jit(device=True)
def block_reduce(red, v, is_max):
    """max (or sum) of v over the thread block (a power of two), in every thread: a tree in
    shared memory, log2(threads) steps (faster than each thread reading all n values). gpu/sampling.py
    uses it too."""
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
    """A 1-D view of a device array, made once per array (making a view costs Python time each step)."""
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
