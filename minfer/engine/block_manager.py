"""The block manager: who owns which blocks of the fixed KV-cache pool.

The pool (stages/kvcache.py) has a fixed number of blocks of `block_size` token slots, sized once
at start from a memory budget. A sequence owns a *block table*: token p of the sequence lives in
block table[p // block_size], row p % block_size. This module hands out blocks and takes them
back; it never grows the pool. When no block is free the caller (the scheduler) decides what to
do: wait, or preempt a sequence.

Blocks are shared through the prefix cache (prefix_cache.py): a block can be in several tables at
once, so each block has a reference count, and it returns to the free list when the count drops to
zero. The free list is kept in the order blocks were freed: new blocks are taken from its front,
so a freed block that still holds cached tokens survives as long as possible (least recently
used first out); a freed block that holds nothing worth keeping goes to the very front.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .prefix_cache import PrefixCache, block_hash


class NoFreeBlocks(Exception):
    """Internal: the pool has too few free blocks; the scheduler checks before it asks."""


class BlockManager:
    def __init__(self, cache, prefix_caching: bool = True):
        """cache: the pool (anything with n_blocks and block_size)."""
        self.n_blocks, self.block_size = cache.n_blocks, cache.block_size
        self.ref = [0] * self.n_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(self.n_blocks))
        self.tables: dict[int, list[int]] = {}       # seq id -> its block ids, in order
        self.hashes: dict[int, list[int]] = {}       # seq id -> hashes of its full, computed blocks
        self.prefix = PrefixCache() if prefix_caching else None

    # --- counting ---------------------------------------------------------------------------------
    @property
    def n_free(self) -> int:
        return len(self.free)

    @property
    def n_used(self) -> int:
        return self.n_blocks - len(self.free)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def can_hold(self, seq_id: int, n_tokens: int) -> bool:
        """Are there free blocks enough for sequence seq_id to hold n_tokens tokens?"""
        need = self.blocks_for(n_tokens) - len(self.tables.get(seq_id, ()))
        return need <= len(self.free)

    # --- giving and taking back --------------------------------------------------------------------
    def _take(self) -> int:
        b, _ = self.free.popitem(last=False)          # least recently freed
        if self.prefix is not None:
            self.prefix.forget(b)                     # it will hold other tokens now
        self.ref[b] = 1
        return b

    def ensure(self, seq_id: int, n_tokens: int) -> list[int]:
        """Make sequence seq_id own blocks for n_tokens tokens; return its table."""
        table = self.tables.setdefault(seq_id, [])
        need = self.blocks_for(n_tokens) - len(table)
        if need > len(self.free):
            raise NoFreeBlocks(f"{need} blocks needed, {len(self.free)} free")
        for _ in range(need):
            table.append(self._take())
        return table

    def slots(self, seq_id: int, start: int, stop: int) -> np.ndarray:
        """Cache slots of positions start..stop-1 of a sequence (block * block_size + row)."""
        table, bs = np.asarray(self.tables[seq_id], dtype=np.int64), self.block_size
        pos = np.arange(start, stop)
        return table[pos // bs] * bs + pos % bs

    def release(self, seq_id: int) -> None:
        """Give back a sequence's blocks (its last ones first: they are the least likely to be
        shared, so they should be the first to be reused)."""
        self.hashes.pop(seq_id, None)
        for b in reversed(self.tables.pop(seq_id, [])):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
                if self.prefix is None or b not in self.prefix:
                    self.free.move_to_end(b, last=False)   # nothing to keep: reuse it first

    def reconcile(self) -> int:
        """Make the reference counts and the free list agree with the tables again; -> how many
        blocks came back. A program's own signal handler (a timeout's SIGALRM) can raise between
        any two steps of the bookkeeping above — a block taken from the free list and not yet in
        a table, a table dropped before its counts — and such a block would be lost for good."""
        ref = [0] * self.n_blocks
        for table in self.tables.values():
            for b in table:
                ref[b] += 1
        back = 0
        for b in range(self.n_blocks):
            if ref[b] == 0 and b not in self.free:
                if self.prefix is not None:
                    self.prefix.forget(b)             # what it holds is not known
                self.free[b] = None
                self.free.move_to_end(b, last=False)
                back += 1
            elif ref[b] > 0 and b in self.free:
                del self.free[b]
        self.ref = ref
        return back

    def trim(self, seq_id: int, n_tokens: int) -> None:
        """Give back the sequence's blocks past the first n_tokens tokens (speculative tokens
        that were rejected: those blocks were never named in the prefix cache)."""
        table = self.tables.get(seq_id)
        keep = self.blocks_for(n_tokens)
        while table is not None and len(table) > keep:
            b = table.pop()
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
                if self.prefix is None or b not in self.prefix:
                    self.free.move_to_end(b, last=False)

    # --- the prefix cache ----------------------------------------------------------------------
    def share_prefix(self, seq_id: int, tokens: list[int]) -> int:
        """For a sequence with no blocks yet: take the cached blocks its tokens begin with, and
        return how many tokens they hold. The last token is never taken from the cache: its
        logits are what the sequence computes next."""
        if self.prefix is None:
            return 0
        assert not self.tables.get(seq_id), "share_prefix is for a sequence without blocks"
        bs = self.block_size
        table, hashes, h = self.tables.setdefault(seq_id, []), self.hashes.setdefault(seq_id, []), None
        for i in range((len(tokens) - 1) // bs):
            key = tuple(tokens[i * bs:(i + 1) * bs])
            h = block_hash(h, key)
            b = self.prefix.lookup(h, key)
            if b is None:
                break
            if self.ref[b] == 0:
                del self.free[b]                   # a freed block comes back into use
            self.ref[b] += 1
            table.append(b)
            hashes.append(h)
        return len(table) * bs

    def first_missing_block(self, tokens: list[int]) -> int | None:
        """The chained hash of the first block `share_prefix` would want but the cache lacks, or
        None when the cache holds all it could share (or there is no cache). Allocates nothing:
        the scheduler asks before it admits."""
        if self.prefix is None:
            return None
        bs, h = self.block_size, None
        for i in range((len(tokens) - 1) // bs):      # the blocks share_prefix may take
            key = tuple(tokens[i * bs:(i + 1) * bs])
            h = block_hash(h, key)
            if self.prefix.lookup(h, key) is None:
                return h
        return None

    def unnamed_blocks(self, seq_id: int, tokens: list[int]) -> list[int]:
        """The chained hashes of the sequence's full blocks of `tokens` that it has not named in
        the cache yet: the blocks it is still computing, that it will name when done."""
        if self.prefix is None:
            return []
        bs, hashes = self.block_size, self.hashes.get(seq_id, [])
        h, out = (hashes[-1] if hashes else None), []
        for i in range(len(hashes), len(tokens) // bs):
            h = block_hash(h, tuple(tokens[i * bs:(i + 1) * bs]))
            out.append(h)
        return out

    def has_new_full_block(self, seq_id: int, n_computed: int) -> bool:
        """Has the sequence filled a block since it last named its blocks?"""
        return self.prefix is not None and n_computed // self.block_size > len(self.hashes.get(seq_id, ()))

    def cache_blocks(self, seq_id: int, tokens: list[int], n_computed: int) -> None:
        """Name the sequence's blocks that are now full and computed, so later requests find them."""
        if self.prefix is None:
            return
        bs, table = self.block_size, self.tables[seq_id]
        hashes = self.hashes.setdefault(seq_id, [])
        for i in range(len(hashes), n_computed // bs):
            key = tuple(tokens[i * bs:(i + 1) * bs])
            h = block_hash(hashes[-1] if hashes else None, key)
            self.prefix.insert(h, key, table[i])
            hashes.append(h)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (for measurements that must start cold). Only when idle."""
        assert not self.tables, "reset the prefix cache only when no sequence holds blocks"
        if self.prefix is not None:
            self.prefix = PrefixCache()
        self.hashes.clear()

    # --- for tests: the bookkeeping adds up ----------------------------------------------------------
    def check(self) -> None:
        refs = [0] * self.n_blocks
        for table in self.tables.values():
            for b in table:
                refs[b] += 1
        assert refs == self.ref, "reference counts differ from the tables"
        assert all((r == 0) == (b in self.free) for b, r in enumerate(refs)), "free list is off"
        if self.prefix is not None:
            for h, b in self.prefix.block_of.items():
                assert self.prefix.key_of[b][0] == h, "hash table and block keys disagree"
