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
    order; in a step of up to ROWS rows the same key slices too (more rows: a prompt, whose
    slices share the tile's work, one slice here)."""
    q, kc, vc, batch = case([(n_new, prefix)], hd, bs, seed=n_new)
    for S in ((1, 2, 3) if n_new <= attention.ROWS else (1,)):
        lanes, per_row = jobs(q, kc, vc, batch, S, 2), jobs(q, kc, vc, batch, S, NEVER)
        assert np.array_equal(lanes, per_row)
        for t in range(n_new):
            alone = make_batch([([0], prefix + t, list(batch.block_tables[0]))], bs)
            assert np.array_equal(jobs(q[t:t + 1], kc, vc, alone, S)[0], lanes[t]), (S, t)


@pytest.mark.parametrize("p0,R", [(0, 128), (80, 8), (1000, 16), (5, 33), (0, 2), (40, 1)])
def test_slices_cover_the_keys_with_equal_work(p0, R):
    """The cuts cover keys 0..p0 + R - 1 once, in order, on block boundaries; the slices'
    (row, key) pairs (a key j <= p0 seen by R rows, p0 + u by R - u) are each an equal share
    give or take a block's worth."""
    bs, n = 16, p0 + R
    for S in (1, 2, 3, 8):
        cuts = [attention._cut(p0, R, S, s, bs) for s in range(S + 1)]
        assert cuts[0] == 0 and cuts[-1] == n and cuts == sorted(cuts)
        assert all(c % bs == 0 for c in cuts[:-1])
        seen = (np.arange(n)[None, :] <= (p0 + np.arange(R))[:, None]).sum(0)     # [n] rows a key
        work = [int(seen[a:b].sum()) for a, b in zip(cuts, cuts[1:])]
        assert max(abs(w - sum(work) / S) for w in work) <= R * bs, (S, cuts, work)


@pytest.mark.parametrize("S", [2, 3])
def test_a_short_step_cuts_each_rows_keys_as_alone(S):
    """Up to ROWS rows a step: a tile's rows share the slices each of them gets alone (tiles end
    where those move); a longer step cuts by the tile's work."""
    bs = 16
    batch = make_batch([(list(range(20)), 40, list(range(9))), (list(range(3)), 0, list(range(9, 12)))], bs)
    n = attention._n_tiles(batch.row_seq, batch.positions, S, bs)
    tiles = [attention._tile_rows(batch.row_seq, batch.positions, S, bs, i) for i in range(n)]
    assert [t for t0, t1 in tiles for t in range(t0, t1)] == list(range(23))
    cuts = [[attention._cut(int(p), 1, S, s, bs) for s in range(1, S)] for p in batch.positions]
    for t0, t1 in tiles:
        assert all(cuts[t] == cuts[t0] for t in range(t0, t1))
    for t0, t1 in zip([a for a, _ in tiles], [a for a, _ in tiles][1:]):   # no needless cut
        assert batch.row_seq[t1] != batch.row_seq[t0] or cuts[t1] != cuts[t1 - 1]
    assert n > 2                                      # positions 40..59 cross a moving cut
    long = make_batch([(list(range(40)), 23, list(range(9)))], bs)
    assert attention._n_tiles(long.row_seq, long.positions, S, bs) == 2   # 32 + 8 rows


def test_a_sequence_keeps_its_own_slices_beside_a_prompt():
    """Tokens to verify in a step with a prompt's long chunk: the prompt's tiles cut by their work,
    the short sequence's rows still get, to the bit, what each gets alone."""
    bs = 16
    q, kc, vc, batch = case([(40, 0), (9, 70), (1, 33)], 64, bs, seed=3)
    for S in (2, 3):
        got = jobs(q, kc, vc, batch, S)
        for b, t0, n, prefix in ((1, 40, 9, 70), (2, 49, 1, 33)):
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
