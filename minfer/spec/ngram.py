"""The n-gram proposer (prompt lookup): guess that the text goes on as it did before.

When an answer repeats its prompt — code being edited, a document being quoted, a list being
reformatted — the tokens after the last few generated ones have very likely been seen already.
Find the latest earlier occurrence of the sequence's last n tokens (n from `max_n` down to
`min_n`: a longer match is a better witness) and propose the k tokens that followed it. No second
model, no distribution: the proposal is a point mass, and verify.py's point-mass rule keeps
sampling exact.

    tokens  ... a b c d ... x a b c   (last 3: a b c, seen before followed by d ...)
    propose d ...

The NumPy reference first; the @njit path is the same search as two loops.
"""
from __future__ import annotations

import numpy as np
from numba import njit


def propose_ngram(tokens: np.ndarray, k: int, max_n: int = 4, min_n: int = 1) -> np.ndarray:
    """tokens [T] -> up to k proposed next tokens (possibly none) [<=k]."""
    T = len(tokens)
    for n in range(min(max_n, T - 1), min_n - 1, -1):
        tail = tokens[T - n:]                                          # [n]
        # windows[i] = tokens[i:i+n], for starts i whose match is followed by a token
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:T - 1], n)   # [T-n, n]
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if len(hits):
            start = hits[-1] + n                                       # latest occurrence
            return tokens[start:start + k].copy()
    return tokens[:0].copy()


@njit(cache=True)
def propose_ngram_numba(tokens, k, max_n, min_n):
    T = tokens.shape[0]
    for n in range(min(max_n, T - 1), min_n - 1, -1):
        for s in range(T - n - 1, -1, -1):                            # latest first
            ok = True
            for j in range(n):
                if tokens[s + j] != tokens[T - n + j]:
                    ok = False
                    break
            if ok:
                start = s + n
                return tokens[start:min(start + k, T)].copy()
    return tokens[:0].copy()


class NgramProposer:
    """The proposer as the speculator uses it: a point mass (no q) per proposed token."""
    name = "ngram"

    def __init__(self, max_n: int = 4, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n

    def propose(self, wants: list) -> dict:
        """wants: [(sequence, k)] -> {sequence: (proposed ids, None)} (sequences with a match)."""
        out = {}
        for seq, k in wants:
            ids = propose_ngram_numba(np.asarray(seq.tokens, dtype=np.int64), k, self.max_n, self.min_n)
            if len(ids):
                out[seq] = ([int(t) for t in ids], None)
        return out

    def step_time(self, repeats: int = 3) -> float:
        return 0.0                                   # a lookup: next to nothing

    def rollback(self, seq, n_valid: int) -> None:
        """Nothing is kept per sequence."""

    def drop(self, seq_id: int) -> None:
        pass
