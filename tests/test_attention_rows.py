"""The numba attention job takes all the new rows of one sequence against one slice of its keys
(each cache block loaded once for all of them, causal within the new rows): against the NumPy
reference, at odd row counts and prefixes, several sequences of different row counts in one batch,
the vector path (head_dim 64 and 128: p.V 64 floats at a time; 32: 16 at a time), its rows-in-lanes
form (tiles of LANE_ROWS rows or more, head_dim 64, blocks of 16 or 32 keys) and the plain
one (head_dim 24), block sizes 16, 32 and 5; and a row's result is the same bits in a tile of any
size."""
import numpy as np
import pytest

from minfer.batch import make_batch
from minfer.stages import attention

HEADS = {64: (9, 3), 128: (4, 2), 32: (4, 1), 24: (6, 2)}   # head_dim -> (query heads, kv heads)


def case(seqs, hd, bs, seed=0):
    """seqs: (new rows, cached prefix) per sequence -> q, k_cache, v_cache, batch; the blocks of
    the sequences interleaved in the pool, the cache random (the new rows' keys included)."""
    Hq, Hkv = HEADS[hd]
    r = np.random.default_rng(seed)
    need = [-(-(n + p) // bs) for n, p in seqs]
    order = r.permutation(sum(need) + 3)          # scattered blocks, a few unused
    tables, at = [], 0
    for k in need:
        tables.append([int(i) for i in order[at:at + k]])
        at += k
    batch = make_batch([(list(range(n)), p, t) for (n, p), t in zip(seqs, tables)], bs)
    shape = (len(order), bs, Hkv, hd)
    k_cache = (r.standard_normal(shape) * 1.5).astype(np.float32)
    v_cache = r.standard_normal(shape).astype(np.float32)
    q = (r.standard_normal((len(batch.token_ids), Hq, hd)) * 1.5).astype(np.float32)
    return q, k_cache, v_cache, batch


NEVER = 1 << 30


def jobs(q, k_cache, v_cache, batch, S, lane_rows=attention.LANE_ROWS):
    """Every (tile, slice) job of a split into S slices a tile, one after another, merged; rows in
    lanes from lane_rows rows a tile on."""
    parts = attention._slices(q.shape[0], S, q.shape[1], q.shape[2])
    for job in range(attention._n_tiles(batch.row_seq, batch.positions, S, k_cache.shape[1]) * S):
        attention._attention_job(q, k_cache, v_cache, batch.row_seq, batch.positions,
                                 batch.block_tables, job, parts, lane_rows)
    return attention._merge_slices(q, parts)


@pytest.mark.parametrize("bs", [16, 32, 5])
@pytest.mark.parametrize("hd", [64, 128, 32, 24])
@pytest.mark.parametrize("prefix", [0, 5, 40])
@pytest.mark.parametrize("n_new", [1, 2, 3, 7, 33, 70])
def test_one_sequence_rows_against_reference(n_new, prefix, hd, bs):
    q, kc, vc, batch = case([(n_new, prefix)], hd, bs, seed=n_new + prefix)
    want = attention.paged_attention(q, kc, vc, batch)
    np.testing.assert_allclose(attention.paged_attention_numba(q, kc, vc, batch), want,
                               rtol=1e-4, atol=1e-5)
    for S in (1, 2, 3):
        for lane_rows in (2, NEVER):                # rows in lanes from 2 rows on, and never
            np.testing.assert_allclose(jobs(q, kc, vc, batch, S, lane_rows), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bs", [16, 5])
@pytest.mark.parametrize("hd", [64, 128, 32, 24])
def test_mixed_sequences_in_one_batch(hd, bs):
    """Decode rows, tokens to verify and prompt chunks side by side, each sequence its own rows."""
    seqs = [(1, 40), (33, 0), (7, 5), (1, 0), (2, 40), (3, 5), (1, 17)]
    q, kc, vc, batch = case(seqs, hd, bs, seed=hd + bs)
    want = attention.paged_attention(q, kc, vc, batch)
    np.testing.assert_allclose(attention.paged_attention_numba(q, kc, vc, batch), want,
                               rtol=1e-4, atol=1e-5)
    for S in (1, 2, 5):
        for lane_rows in (2, NEVER):
            np.testing.assert_allclose(jobs(q, kc, vc, batch, S, lane_rows), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("hd", [64, 128])
@pytest.mark.parametrize("n_new,prefix", [(2, 0), (3, 0), (9, 40), (33, 5), (17, 100)])
def test_a_row_gets_the_same_bits_in_a_tile_of_any_size(n_new, prefix, hd, bs):
    """Rows in lanes (a tile of several rows) give each row exactly the numbers the one-row job
    gives it, and the per-row vector job in a tile too: the same products, sums in the same
    order, and the same key slices, however many rows come (a prompt's too: its rows the same
    bits in one chunk or in several)."""
    q, kc, vc, batch = case([(n_new, prefix)], hd, bs, seed=n_new)
    for S in (1, 2, 3):
        lanes, per_row = jobs(q, kc, vc, batch, S, 2), jobs(q, kc, vc, batch, S, NEVER)
        assert np.array_equal(lanes, per_row)
        for t in range(n_new):
            alone = make_batch([([0], prefix + t, list(batch.block_tables[0]))], bs)
            assert np.array_equal(jobs(q[t:t + 1], kc, vc, alone, S)[0], lanes[t]), (S, t)


@pytest.mark.parametrize("p", [0, 3, 15, 16, 40, 80, 1000])
def test_a_rows_slices_cover_its_keys_in_equal_shares(p):
    """A row's cuts cover its keys 0..p once, in order, on block boundaries, each slice a share
    of them give or take a block."""
    bs = 16
    for S in (1, 2, 3, 8):
        cuts = [attention._cut(p, S, s, bs) for s in range(S + 1)]
        assert cuts[0] == 0 and cuts[-1] == p + 1 and cuts == sorted(cuts)
        assert all(c % bs == 0 for c in cuts[:-1])
        assert all(abs((b - a) - (p + 1) / S) <= bs for a, b in zip(cuts, cuts[1:])), (S, cuts)


@pytest.mark.parametrize("S", [2, 3])
def test_a_tiles_rows_share_the_cuts_each_gets_alone(S):
    """A tile's rows share the slices each of them gets alone; tiles end only where a sequence
    starts, after ROWS rows, or where those cuts move. A long prompt's rows too: the slices of
    its tiles hold equal work give or take the triangle of the tiles' own rows."""
    bs = 16
    batch = make_batch([(list(range(20)), 40, list(range(9))), (list(range(3)), 0, list(range(9, 12))),
                        (list(range(200)), 0, list(range(12, 25)))], bs)
    T = len(batch.positions)
    n = attention._n_tiles(batch.row_seq, batch.positions, S, bs)
    tiles = [attention._tile_rows(batch.row_seq, batch.positions, S, bs, i) for i in range(n)]
    assert [t for t0, t1 in tiles for t in range(t0, t1)] == list(range(T))
    cuts = [[attention._cut(int(p), S, s, bs) for s in range(1, S)] for p in batch.positions]
    for t0, t1 in tiles:
        assert t1 - t0 <= attention.ROWS and all(cuts[t] == cuts[t0] for t in range(t0, t1))
    for (t0, _), (t1, _) in zip(tiles, tiles[1:]):   # no needless cut
        assert (batch.row_seq[t1] != batch.row_seq[t0] or cuts[t1] != cuts[t1 - 1]
                or t1 - t0 == attention.ROWS)
    assert n > 2                                      # positions 40..59 cross a moving cut
    work = np.zeros(S)                                # the prompt's (row, key) pairs a slice
    for job in range(n * S):
        b, s, t0, t1, k0, k1 = attention._job_keys(batch.row_seq, batch.positions, S, bs, job)
        if b == 2:
            work[s] += sum(max(0, min(k1, int(batch.positions[t]) + 1) - k0) for t in range(t0, t1))
    assert work.sum() == 200 * 201 // 2
    assert work.max() - work.min() <= 200 * bs + n * attention.ROWS ** 2 / 2, work


def test_a_sequence_keeps_its_own_slices_beside_a_prompt():
    """Tokens to verify in a step with a prompt's long chunk: every row, the prompt's too, gets
    to the bit what it gets alone."""
    bs = 16
    q, kc, vc, batch = case([(40, 0), (9, 70), (1, 33)], 64, bs, seed=3)
    for S in (2, 3):
        got = jobs(q, kc, vc, batch, S)
        for b, t0, n, prefix in ((0, 0, 40, 0), (1, 40, 9, 70), (2, 49, 1, 33)):
            for t in range(n):
                alone = make_batch([([0], prefix + t, list(batch.block_tables[b]))], bs)
                assert np.array_equal(jobs(q[t0 + t:t0 + t + 1], kc, vc, alone, S)[0], got[t0 + t]), (S, b, t)


def test_tiles_hold_rows_of_one_sequence():
    """Tiles: every row in exactly one, each tile's rows of one sequence, at most ROWS of them."""
    seqs = [(1, 0), (70, 3), (2, 5), (32, 0), (1, 9), (33, 1)]
    batch = make_batch([(list(range(n)), p, list(range(20))) for n, p in seqs], 16)
    n = attention._n_tiles(batch.row_seq, batch.positions, 1, 16)
    tiles = [attention._tile_rows(batch.row_seq, batch.positions, 1, 16, i) for i in range(n)]
    assert n == 1 + 3 + 1 + 1 + 1 + 2
    assert [t for t0, t1 in tiles for t in range(t0, t1)] == list(range(len(batch.row_seq)))
    for t0, t1 in tiles:
        assert 0 < t1 - t0 <= attention.ROWS and len(set(batch.row_seq[t0:t1])) == 1
