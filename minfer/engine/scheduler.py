"""The scheduler: which sequences run this step, and with how many tokens each.

Pure Python, no model. One rule for everything: each scheduled sequence brings tokens it has not
computed yet (`seq.n_pending`): a whole prompt, a chunk of one, or the one token it sampled last
step. A step carries at most `max_tokens` tokens (the token budget) of at most `max_seqs`
sequences:

  1. running sequences that need one token (decodes) go first, oldest first: a long prompt
     arriving must not stall everyone's next token;
  2. then running sequences still in their prompt, a chunk each (chunked prefill);
  3. then waiting sequences, first come first served, while the budget, `max_seqs` and free
     blocks allow. A newly admitted sequence first takes whatever the prefix cache holds of its
     tokens, then computes the rest in chunks;
  4. a waiting sequence whose next block (the first one its tokens could take from the prefix
     cache but the cache lacks) is a block a running sequence is computing now is not admitted
     yet: it waits until that block is computed and cached, then shares it. Many requests that
     arrive together with one system prompt compute it once, not once each. The ones queued
     behind it are still considered (see `schedule`). It never waits on itself or on a
     preempted sequence (neither is running), and it is admitted anyway when nothing else runs.

When a running sequence needs a block and none is free, the newest running sequence is
*preempted*: its blocks are freed (those that are full stay in the prefix cache) and it goes back
to the front of the queue; when admitted again it recomputes its tokens, mostly from the cache.
Because the engine refuses any request that could not fit the whole pool alone, a sequence left
alone in the pool always fits: preemption cannot go on forever.
"""
from __future__ import annotations

import time
from collections import deque

from .block_manager import BlockManager
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_seqs: int = 32, max_tokens: int = 256):
        if max_seqs < 1 or max_tokens < max_seqs:
            raise ValueError("need max_seqs >= 1 and max_tokens >= max_seqs")
        self.blocks, self.max_seqs, self.max_tokens = blocks, max_seqs, max_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []           # in order of admission
        self.n_preemptions = 0
        self.prompt_tokens = 0          # prompt tokens of admitted requests, and of those
        self.cached_tokens = 0          # how many the prefix cache held

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---------------------------------------------------------------------------------------------
    def schedule(self) -> list[tuple[Sequence, int]]:
        """-> [(sequence, number of its pending tokens to compute this step)]. The blocks for
        them are allocated; the caller computes them and then calls `computed`."""
        budget, out = self.max_tokens, []
        # 1 + 2: running sequences, decodes first, then prompt chunks
        order = ([s for s in self.running if s.n_pending == 1] +
                 [s for s in self.running if s.n_pending > 1])
        for seq in order:
            if seq.status is not Status.RUNNING or budget == 0:
                continue                               # preempted in this loop, or no budget left
            n = min(seq.n_pending, budget)
            if not self._make_room(seq, seq.n_computed + n, [s for s, _ in out]):
                continue                               # it was preempted itself
            out.append((seq, n))
            budget -= n
        # 3: admit waiting sequences, first come first served, except (rule 4) those about to
        # compute a block that a running sequence is computing. Those are skipped, not waited on:
        # they keep their place at the front and are admitted as soon as the block is cached (a
        # step or a few chunks later), while a request behind them that shares nothing with the
        # running ones should not sit idle for a block it does not need.
        computing: set[int] | None = None              # hashes of blocks being computed now
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_seqs:
                break
            tokens = seq.tokens
            if out and seq.n_computed == 0:            # (if nothing else runs, admit: no stall)
                if computing is None:
                    computing = {h for r in self.running
                                 for h in self.blocks.unnamed_blocks(r.seq_id, r.tokens)}
                if computing and self.blocks.first_missing_block(tokens) in computing:
                    continue                           # it shares that block once it is cached
            if seq.n_computed == 0 and not self.blocks.tables.get(seq.seq_id):
                seq.n_computed = self.blocks.share_prefix(seq.seq_id, tokens)
            n = min(seq.n_pending, budget)
            if not self.blocks.can_hold(seq.seq_id, seq.n_computed + n):
                # not now: give the shared blocks back so they can be evicted if need be
                self.blocks.release(seq.seq_id)
                seq.n_computed = 0
                break
            self.blocks.ensure(seq.seq_id, seq.n_computed + n)
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            if seq.metrics.first_scheduled is None:       # first admission: count cache hits
                seq.metrics.first_scheduled = time.perf_counter()
                seq.metrics.cached_prompt_tokens = seq.n_computed
                self.prompt_tokens += len(tokens)
                self.cached_tokens += seq.n_computed
            self.running.append(seq)
            if computing is not None:                  # its blocks are being computed now too
                computing.update(self.blocks.unnamed_blocks(seq.seq_id, tokens))
            out.append((seq, n))
            budget -= n
        return out

    def _make_room(self, seq: Sequence, n_tokens: int, scheduled: list[Sequence]) -> bool:
        """Allocate seq's blocks for n_tokens, preempting the newest running sequences (not those
        already scheduled this step) while the pool is short. False if seq itself had to go."""
        while not self.blocks.can_hold(seq.seq_id, n_tokens):
            victim = next(s for s in reversed(self.running) if s is seq or s not in scheduled)
            self.preempt(victim)
            if victim is seq:
                return False
        self.blocks.ensure(seq.seq_id, n_tokens)
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.seq_id)
        seq.n_computed = 0
        seq.status = Status.PREEMPTED
        seq.metrics.preemptions += 1
        self.n_preemptions += 1
        self.waiting.appendleft(seq)

    # ---------------------------------------------------------------------------------------------
    def computed(self, seq: Sequence, n: int) -> None:
        """n more of seq's tokens now have their K/V in the cache."""
        seq.n_computed += n
        if self.blocks.has_new_full_block(seq.seq_id, seq.n_computed):
            self.blocks.cache_blocks(seq.seq_id, seq.tokens, seq.n_computed)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take seq out (finished or aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:          # (both, had an exception cut a move between the two)
            self.waiting.remove(seq)
        self.blocks.release(seq.seq_id)
        seq.status, seq.finish_reason = Status.FINISHED, reason
        seq.metrics.finished = time.perf_counter()
