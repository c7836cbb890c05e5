"""The batch context: everything `forward` needs to know about where each token belongs.

A batch is several sequences, each bringing some new tokens (a whole prompt when prefilling, one
token when decoding, a few when verifying a speculative draft). Their tokens are flattened into one
list of T rows; these arrays say which rows belong to which sequence, at what positions, and where
in the paged KV cache their keys and values go. There is no other hidden state: the same forward
serves one request, a batch of mixed lengths, and (later) continuous batching.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass
class Batch:
    token_ids: np.ndarray     # [T]     new tokens of all sequences, one after another
    positions: np.ndarray     # [T]     position of each token within its own sequence
    seq_starts: np.ndarray    # [B+1]   rows of sequence b: seq_starts[b] : seq_starts[b+1]
    context_lens: np.ndarray  # [B]     tokens of sequence b in the cache once this step is written
    block_tables: np.ndarray  # [B, M]  block ids of each sequence, padded with -1
    slot_mapping: np.ndarray  # [T]     cache slot each new token's K/V is written to
    logits_rows: np.ndarray   # [R]     rows whose logits are wanted (last of each sequence, or all)

    @property
    def n_seqs(self) -> int:
        return len(self.context_lens)

    @cached_property
    def row_seq(self) -> np.ndarray:
        """[T] the sequence each row belongs to."""
        return np.repeat(np.arange(self.n_seqs), np.diff(self.seq_starts))


def make_batch(seqs: list[tuple[list[int] | np.ndarray, int, list[int]]], block_size: int,
               all_logits: bool = False) -> Batch:
    """seqs: for each sequence (new token ids, position of the first of them, block table)."""
    tokens, positions, slots, starts, lens, last_rows = [], [], [], [0], [], []
    for ids, start, table in seqs:
        n = len(ids)
        pos = np.arange(start, start + n, dtype=np.int64)
        tbl = np.asarray(table, dtype=np.int64)
        tokens.append(np.asarray(ids, dtype=np.int64))
        positions.append(pos)
        slots.append(tbl[pos // block_size] * block_size + pos % block_size)
        starts.append(starts[-1] + n)
        lens.append(start + n)
        last_rows.append(starts[-1] - 1)
    width = max(len(t) for _, _, t in seqs)
    tables = np.full((len(seqs), width), -1, dtype=np.int32)
    for b, (_, _, table) in enumerate(seqs):
        tables[b, :len(table)] = table
    T = starts[-1]
    return Batch(
        token_ids=np.concatenate(tokens),
        positions=np.concatenate(positions),
        seq_starts=np.asarray(starts, dtype=np.int64),
        context_lens=np.asarray(lens, dtype=np.int64),
        block_tables=tables,
        slot_mapping=np.concatenate(slots),
        logits_rows=np.arange(T) if all_logits else np.asarray(last_rows, dtype=np.int64),
    )
