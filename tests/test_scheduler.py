"""The scheduler, block manager and prefix cache on their own: no model, only bookkeeping."""
from types import SimpleNamespace

import numpy as np
import pytest

from minfer.engine.block_manager import BlockManager, NoFreeBlocks
from minfer.engine.prefix_cache import block_hashes
from minfer.engine.scheduler import Scheduler
from minfer.engine.sequence import Sequence, Status
from minfer.sampling import SamplingParams

P = SamplingParams(temperature=0, max_tokens=4)


def pool(n_blocks, block_size=4, prefix=True):
    return BlockManager(SimpleNamespace(n_blocks=n_blocks, block_size=block_size), prefix)


def seq(i, n_prompt, first=0):
    return Sequence(i, list(range(first, first + n_prompt)), P, np.random.default_rng(0))


def run_step(s: Scheduler, sampled=7):
    """What the engine does after a forward: mark tokens computed, give a token to each sequence
    that caught up."""
    plan = s.schedule()
    for q, n in plan:
        s.computed(q, n)
        if q.n_pending == 0:
            q.output_ids.append(sampled)
    return [(q.seq_id, n) for q, n in plan]


# --- budgets and chunked prefill --------------------------------------------------------------------
def test_long_prompt_is_chunked_and_decodes_go_first():
    s = Scheduler(pool(64), max_seqs=4, max_tokens=8)
    a = seq(0, 3)
    s.add(a)
    assert run_step(s) == [(0, 3)]                 # the whole short prompt
    s.add(seq(1, 20, first=100))
    assert run_step(s) == [(0, 1), (1, 7)]         # a's decode first, then a chunk of b
    assert run_step(s) == [(0, 1), (1, 7)]
    assert run_step(s) == [(0, 1), (1, 6)]         # b's last chunk: it samples
    assert run_step(s) == [(0, 1), (1, 1)]         # both decode
    assert s.running[1].n_computed == 21 and len(s.running[1].output_ids) == 2


def test_max_seqs_limits_admission():
    s = Scheduler(pool(64), max_seqs=2, max_tokens=32)
    for i in range(3):
        s.add(seq(i, 2, first=10 * i))
    assert [i for i, _ in run_step(s)] == [0, 1]
    assert [q.seq_id for q in s.waiting] == [2]
    s.finish(s.running[0], "stop")
    assert [i for i, _ in run_step(s)] == [1, 2]


def test_admission_waits_for_blocks_first_come_first_served():
    s = Scheduler(pool(4, block_size=4), max_seqs=8, max_tokens=64)
    s.add(seq(0, 12))                               # 3 blocks
    s.add(seq(1, 8, first=50))                      # needs 2 more: only 1 free
    s.add(seq(2, 2, first=90))                      # would fit, but must not jump the queue
    assert run_step(s) == [(0, 12)]
    assert [q.seq_id for q in s.waiting] == [1, 2]
    s.finish(s.running[0], "stop")
    assert run_step(s) == [(1, 8), (2, 2)]


# --- preemption ---------------------------------------------------------------------------------------
def test_newest_sequence_is_preempted_when_a_decode_needs_a_block():
    bm = pool(4, block_size=4, prefix=False)
    s = Scheduler(bm, max_seqs=4, max_tokens=64)
    a, b = seq(0, 4), seq(1, 7, first=50)
    s.add(a), s.add(b)
    run_step(s)                                     # a: 4 tokens (1 block) + 1 sampled; b: 2 blocks
    assert bm.n_free == 1
    run_step(s)                                     # a's 5th token takes the last free block
    b_tokens = b.n_tokens
    run_step(s)                                     # b's 9th token needs a block: none free
    assert b.status is Status.PREEMPTED and b.metrics.preemptions == 1 and s.n_preemptions == 1
    assert s.waiting[0] is b and b.n_computed == 0 and b.n_tokens == b_tokens
    bm.check()
    s.finish(a, "stop")
    assert run_step(s) == [(1, b_tokens)]           # b recomputes everything it had
    bm.check()


def test_a_sequence_alone_preempts_itself_only_when_nothing_else_is_left():
    bm = pool(2, block_size=4, prefix=False)
    s = Scheduler(bm, max_seqs=4, max_tokens=64)
    a = seq(0, 8)
    s.add(a)
    run_step(s)
    assert a.n_computed == 8 and bm.n_free == 0
    run_step(s)                                     # a's 9th token: no block, nobody else to evict
    assert a.status is Status.PREEMPTED
    bm.check()


# --- the prefix cache --------------------------------------------------------------------------------
def test_shared_prefix_blocks_are_reused_and_counted():
    bm = pool(16, block_size=4)
    s = Scheduler(bm, max_seqs=4, max_tokens=64)
    system = list(range(100, 110))                  # 10 tokens: 2 full blocks
    a = Sequence(0, system + [1, 2], P, np.random.default_rng(0))
    s.add(a)
    run_step(s)
    b = Sequence(1, system + [3, 4, 5], P, np.random.default_rng(0))
    s.add(b)
    plan = run_step(s)
    assert (1, 5) in plan and b.metrics.cached_prompt_tokens == 8     # 2 blocks shared
    assert bm.tables[0][:2] == bm.tables[1][:2] and bm.ref[bm.tables[0][0]] == 2
    assert s.prompt_tokens == 25 and s.cached_tokens == 8
    bm.check()


def test_a_prompt_made_only_of_cached_blocks_still_computes_its_last_token():
    bm = pool(8, block_size=4)
    s = Scheduler(bm, max_seqs=4, max_tokens=64)
    a = seq(0, 8)
    s.add(a)
    run_step(s)
    s.finish(a, "stop")
    b = seq(1, 8)                                   # the same 8 tokens
    s.add(b)
    assert run_step(s) == [(1, 4)]                  # block 0 cached; block 1 holds the last token
    assert b.metrics.cached_prompt_tokens == 4


def test_freed_cached_blocks_are_evicted_last_and_forgotten_when_reused():
    bm = pool(4, block_size=2)
    bm.ensure(0, 4)
    bm.cache_blocks(0, [1, 2, 3, 4], 4)             # two named blocks
    cached = list(bm.tables[0])
    bm.release(0)
    assert len(bm.prefix) == 2 and bm.n_free == 4
    bm.ensure(1, 4)                                 # the two unnamed blocks go first
    assert not set(bm.tables[1]) & set(cached) and len(bm.prefix) == 2
    bm.ensure(1, 6)                                 # then the least recently freed named one:
    assert len(bm.prefix) == 1                      # the tail (a table is freed last block first)
    assert bm.share_prefix(2, [1, 2, 3, 4, 9]) == 2  # the head block is still found
    assert bm.ref[cached[0]] == 1 and cached[0] not in bm.free
    bm.release(2), bm.release(1)
    bm.check()


def test_hash_chain_depends_on_everything_before():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7], 2)
    b = block_hashes([9, 2, 3, 4, 5, 6, 7], 2)
    assert len(a) == 3 and all(x != y for x, y in zip(a, b))   # every later block differs too
    assert block_hashes([1, 2, 3, 4], 2) == a[:2]
    c = block_hashes([1, 2, 1, 2], 2)
    assert c[0] != c[1]                             # the same tokens at another place: another name


def test_block_manager_never_grows():
    bm = pool(2, block_size=4)
    bm.ensure(0, 8)
    with pytest.raises(NoFreeBlocks):
        bm.ensure(1, 1)
    assert bm.n_blocks == 2


# --- a long random run: the bookkeeping always adds up ---------------------------------------------
def test_random_requests_aborts_and_steps_leave_no_leaks():
    rng = np.random.default_rng(1)
    bm = pool(24, block_size=4)
    s = Scheduler(bm, max_seqs=6, max_tokens=24)
    live, next_id, vocab = [], 0, [0, 1, 2]         # a 3-token vocabulary: many shared prefixes
    for it in range(1000):
        r = rng.random()
        if r < 0.3:
            n = int(rng.integers(1, 40))
            q = Sequence(next_id, rng.choice(vocab, n).tolist(),
                         SamplingParams(temperature=0, max_tokens=int(rng.integers(1, 12))),
                         np.random.default_rng(0))
            next_id += 1
            s.add(q)
            live.append(q)
        elif r < 0.4 and live:
            q = live.pop(int(rng.integers(len(live))))
            s.finish(q, "abort")
        else:
            for q, n in s.schedule():
                s.computed(q, n)
                if q.n_pending == 0:
                    q.output_ids.append(int(rng.choice(vocab)))
                    if len(q.output_ids) >= q.params.max_tokens:
                        s.finish(q, "length")
                        live.remove(q)
        bm.check()
        for q in s.running:                         # running sequences own blocks for what they hold
            assert len(bm.tables[q.seq_id]) * 4 >= q.n_computed
    for q in live:
        s.finish(q, "abort")
    bm.check()
    assert bm.tables == {} and all(r == 0 for r in bm.ref) and bm.n_free == 24
    assert s.n_preemptions > 0 and s.cached_tokens > 0     # the run did exercise both


# --- requests that arrive together with one prefix compute it once --------------------------------
def run_all(s: Scheduler, seqs, max_new=3, steps=500):
    """Step until every sequence has max_new tokens; -> (plans, prompt tokens computed)."""
    plans, prompt_computed = [], 0
    for _ in range(steps):
        if not s.has_unfinished():
            break
        plan = s.schedule()
        for q, n in plan:
            if not q.output_ids:                    # still in its prompt
                prompt_computed += n
            s.computed(q, n)
            if q.n_pending == 0:
                q.output_ids.append(7)
                if len(q.output_ids) >= max_new:
                    s.finish(q, "length")
        s.blocks.check()
        plans.append([(q.seq_id, n) for q, n in plan])
    assert all(q.finished for q in seqs), "a request never finished"
    return plans, prompt_computed


def with_system(i, system, n_own=3):
    return Sequence(i, system + [1000 + 10 * i + j for j in range(n_own)], P, np.random.default_rng(0))


def test_requests_with_one_system_prompt_added_together_compute_it_once():
    system = list(range(100, 120))                  # 20 tokens: 5 full blocks of 4
    s = Scheduler(pool(64), max_seqs=8, max_tokens=64)
    seqs = [with_system(i, system) for i in range(4)]
    for q in seqs:
        s.add(q)
    plans, computed = run_all(s, seqs)
    assert plans[0] == [(0, 23)]                    # the others wait for the system prompt...
    assert plans[1] == [(0, 1), (1, 3), (2, 3), (3, 3)]     # ...then share its 5 blocks
    assert computed == 23 + 3 * 3 and s.cached_tokens == 3 * 20
    assert s.blocks.n_used == 0


def test_waiting_for_a_prefix_that_is_still_being_chunked():
    system = list(range(100, 140))                  # 40 tokens: 10 blocks, 3 chunks of 16
    s = Scheduler(pool(64), max_seqs=8, max_tokens=16)
    seqs = [with_system(i, system) for i in range(3)]
    for q in seqs:
        s.add(q)
    plans, computed = run_all(s, seqs)
    assert plans[:3] == [[(0, 16)], [(0, 16)], [(0, 11)]]   # not a token of the prefix twice
    assert plans[3] == [(0, 1), (1, 3), (2, 3)]
    assert computed == 43 + 2 * 3


def test_a_request_sharing_nothing_is_not_held_back_by_one_that_waits():
    system = list(range(100, 120))
    s = Scheduler(pool(64), max_seqs=8, max_tokens=64)
    a, b, c = with_system(0, system), with_system(1, system), seq(2, 5, first=500)
    for q in (a, b, c):
        s.add(q)
    assert run_step(s) == [(0, 23), (2, 5)]         # b waits for a's blocks, c does not wait
    assert list(s.waiting) == [b]
    assert run_step(s) == [(0, 1), (2, 1), (1, 3)]


def test_requests_with_nothing_in_common_are_scheduled_as_without_the_cache():
    def plans(prefix):
        rng = np.random.default_rng(5)
        s = Scheduler(pool(40, prefix=prefix), max_seqs=4, max_tokens=12)
        seqs = [seq(i, int(rng.integers(1, 30)), first=100 * i) for i in range(10)]
        for q in seqs:
            s.add(q)
        return run_all(s, seqs)
    assert plans(True) == plans(False)


@pytest.mark.parametrize("seed", range(4))
def test_waiting_for_a_prefix_never_deadlocks_in_a_tiny_pool(seed):
    """Sequences that wait on a prefix, the one computing it preempted, sequences coming back:
    everyone finishes and the bookkeeping adds up every step."""
    rng = np.random.default_rng(seed)
    systems = [list(range(100, 112)), list(range(200, 220))]    # 3 and 5 blocks of 4
    s = Scheduler(pool(10), max_seqs=4, max_tokens=6)
    seqs = [with_system(i, systems[int(rng.integers(2))], n_own=int(rng.integers(1, 6)))
            for i in range(10)]
    for q in seqs:
        s.add(q)
    waits, schedule = [0], s.schedule

    def counting():            # a waiting sequence's next block is being computed by a running one
        computing = {h for r in s.running for h in s.blocks.unnamed_blocks(r.seq_id, r.tokens)}
        waits[0] += any(s.blocks.first_missing_block(q.tokens) in computing for q in s.waiting)
        return schedule()
    s.schedule = counting
    run_all(s, seqs, max_new=int(rng.integers(4, 10)))
    assert waits[0] > 0 and s.n_preemptions > 0 and s.cached_tokens > 0
    assert s.blocks.n_used == 0
