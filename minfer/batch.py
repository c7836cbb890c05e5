"""The batch context: everything `forward` needs to know about where each token belongs.

A batch is several sequences, each bringing some new tokens (a whole prompt when prefilling, one
token when decoding, a few when verifying a speculative draft). Their tokens are flattened into one
list of T rows; these arrays say which rows belong to which sequence, at what positions, and where
in the paged KV cache their keys and values go. There is no other hidden state: the same forward
serves one request, a batch of mixed lengths, continuous batching (engine/) and speculative
verification (spec/).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Batch:
    token_ids: np.ndarray     # [T]     new tokens of all sequences, one after another
    positions: np.ndarray     # [T]     position of each token within its own sequence
    seq_starts: np.ndarray    # [B+1]   rows of sequence b: seq_starts[b] : seq_starts[b+1]
    row_seq: np.ndarray       # [T]     the sequence each row belongs to
    context_lens: np.ndarray  # [B]     tokens of sequence b in the cache once this step is written
    block_tables: np.ndarray  # [B, M]  block ids of each sequence, padded with -1
    slot_mapping: np.ndarray  # [T]     cache slot each new token's K/V is written to
    logits_rows: np.ndarray   # [R]     rows whose logits are wanted (last of each sequence, or all)

    @property
    def n_seqs(self) -> int:
        return len(self.context_lens)


def make_batch(seqs: list[tuple[list[int] | np.ndarray, int, list[int]]], block_size: int,
               all_logits: bool = False, logits_for: list[int] | None = None) -> Batch:
    """seqs: for each sequence (new token ids, position of the first of them, block table).
    Logits rows: every row (all_logits), else the last row of each sequence — of those marked in
    `logits_for` if given (a chunk in the middle of a prompt samples nothing); a number n > 1
    there asks for the sequence's last n rows (speculative guesses, each verified). At least one
    row is always asked for, so that every forward has the same shape of output."""
    # Plain Python lists first, one array each at the end: a decode step builds this for one
    # token a sequence, and every NumPy call costs microseconds (tens on the caches a step's
    # weights have just flushed; docs/benchmarks.md).
    tokens, positions, slots, starts, row_seq, lens = [], [], [], [0], [], []
    for b, (ids, start, table) in enumerate(seqs):
        n = len(ids)
        pos = range(start, start + n)
        tokens.extend(ids)
        positions.extend(pos)
        slots.extend(table[p // block_size] * block_size + p % block_size for p in pos)
        starts.append(starts[-1] + n)
        row_seq.extend([b] * n)
        lens.append(start + n)
    width = max(len(t) for _, _, t in seqs)
    T = starts[-1]
    return Batch(
        token_ids=np.array(tokens, dtype=np.int64),
        positions=np.array(positions, dtype=np.int64),
        seq_starts=np.array(starts, dtype=np.int64),
        row_seq=np.array(row_seq, dtype=np.int64),
        context_lens=np.array(lens, dtype=np.int64),
        block_tables=np.array([list(t) + [-1] * (width - len(t)) for _, _, t in seqs], dtype=np.int32),
        slot_mapping=np.array(slots, dtype=np.int64),
        logits_rows=np.arange(T) if all_logits else _last_rows(starts, logits_for),
    )


def _last_rows(starts: list[int], logits_for: list[int] | None) -> np.ndarray:
    last = [s - 1 for s in starts[1:]]
    if logits_for is not None:
        last = [r for s, n in zip(starts[1:], logits_for) for r in range(s - int(n), s)] or last[-1:]
    return np.array(last, dtype=np.int64)
