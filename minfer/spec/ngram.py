"""The n-gram proposer (prompt lookup): guess that the text goes on as it did before.

When an answer repeats its prompt — code being edited, a document being quoted, a list being
reformatted — the tokens after the last few generated ones have very likely been seen already.
Find the latest earlier occurrence of the sequence's last n tokens (n from `max_n` down to
`min_n`: a longer match is a better witness) and propose the k tokens that followed it. No second
model, no distribution: the proposal is a point mass, and verify.py's point-mass rule keeps
sampling exact.

    tokens  ... a b c d ... x a b c   (last 3: a b c, seen before followed by d ...)
    propose d ...

The NumPy reference first. The engine's path is not a faster scan but no scan at all: each
sequence keeps an index (NgramIndex) from every n-gram it holds to where it last occurred, updated
with the few tokens each step adds, so a lookup costs the same at token 10 and at token 2000 —
where a scan, and above all turning the sequence into an array every step, grows with the text.
"""
from __future__ import annotations

import numpy as np


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


class NgramIndex:
    """One sequence's n-grams (min_n..max_n tokens) -> the start of their latest occurrence that
    some token follows; propose(k) gives what propose_ngram gives for the tokens seen so far."""

    def __init__(self, max_n: int = 4, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n
        self.tokens: list[int] = []
        self.last: dict[tuple, int] = {}              # n-gram (n = its length) -> start

    def extend(self, new) -> None:
        """Append tokens; each one makes the n-grams that end just before it followed."""
        toks, last = self.tokens, self.last
        for t in new:
            i = len(toks)                              # t's position
            for n in range(self.min_n, min(self.max_n, i) + 1):
                last[tuple(toks[i - n:i])] = i - n     # later occurrences overwrite earlier ones
            toks.append(int(t))

    def propose(self, k: int) -> list[int]:
        """Up to k tokens after the latest earlier occurrence of the longest tail that has one."""
        toks, T = self.tokens, len(self.tokens)
        for n in range(min(self.max_n, T - 1), self.min_n - 1, -1):
            s = self.last.get(tuple(toks[T - n:]))
            if s is not None:
                return toks[s + n:s + n + k]
        return []


class NgramProposer:
    """The proposer as the speculator uses it: a point mass (no q) per proposed token.

    It guesses only on a match of at least min_n = 3 tokens: after a match of 1 or 2 the guesses
    are almost never right (docs/benchmarks.md, "Speculative decoding", has the counts on the
    bench's prompts). A wrong guess is a row of the verification forward for nothing, and the
    acceptance rate that sets k (spec/speculator.py) stays that of the guesses worth making."""
    name = "ngram"

    def __init__(self, max_n: int = 4, min_n: int = 3):
        self.max_n, self.min_n = max_n, min_n
        self.index: dict[int, NgramIndex] = {}         # seq id -> its n-grams so far

    def _index(self, seq) -> NgramIndex:
        """The sequence's index, given the tokens it gained since the last call."""
        idx = self.index.get(seq.seq_id)
        if idx is None or len(idx.tokens) > seq.n_tokens:   # first call (or tokens lost: anew)
            idx = self.index[seq.seq_id] = NgramIndex(self.max_n, self.min_n)
        n, P = len(idx.tokens), len(seq.prompt_ids)
        if n < P:
            idx.extend(seq.prompt_ids[n:])
            n = P
        idx.extend(seq.output_ids[n - P:])
        return idx

    def propose(self, wants: list) -> dict:
        """wants: [(sequence, k)] -> {sequence: (proposed ids, None)} (sequences with a match)."""
        out = {}
        for seq, k in wants:
            ids = self._index(seq).propose(k)
            if ids:
                out[seq] = (ids, None)
        return out

    def step_time(self, repeats: int = 3) -> float:
        return 0.0                                   # a lookup: next to nothing
    def rollback(self, seq, n_valid: int) -> None:
        """Nothing to undo: the index holds only the sequence's own (accepted) tokens."""

    def drop(self, seq_id: int) -> None:
        self.index.pop(seq_id, None)

    def held(self):
        """The sequences with an index."""
        return self.index.keys()
