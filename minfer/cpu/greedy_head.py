"""The LM head's arg-max with a third of its byte products: greedy decoding and greedy verification.

A greedy step needs each row's largest logit, not the logits. With float32 x in three int8 parts
(quant_panel.py: as exact as float32) the LM head is the biggest matrix of SmolLM2-135M — 49,152
rows, a fifth of the multiply-adds of a whole forward — and where byte products are what a step
of several rows waits for, it costs that share of the step. With x rounded to one int8 part it
costs a third as much, but each logit is off by a little, enough to swap two close candidates
now and then. Greedy text must not depend on that. So, for each row of x:

    L1[v]  = row v of the head . x rounded to int8 per block            (1 byte product a MAC)
    E[v]   = a bound on |L3[v] - L1[v]|, L3 the three-part logit        (18 multiply-adds)
    lo     = L1[v] - E[v] at the largest L1                              (<= max_v L3[v])
    keep v where L1[v] + E[v] >= lo                                     (the arg-max is among them)
    answer = the first v of the largest L3[v] among those kept          (3 byte products a MAC)

Nothing outside the kept rows can be the arg-max, every tie is kept, and the kept rows' L3 come
from the same kernel as the step's own LM head (their whole panels of 16 rows), bit for bit: the
answer is np.argmax of the logits the step would have returned. The head's rows go in chunks of
256: one bound for a whole chunk (its rows' largest coefficients) skips most chunks at once, and
only the rest get each row's own. Where x leaves many logits close together (random text), too
many rows are kept: such a row takes the whole three-part head instead.

The bound. Per block b of 32 values, x is rounded to dx_b X_j, X_j integers (|X_j| <= 127),
dx_b = max|x over b| / 127, so |x_j - dx_b X_j| <= dx_b / 2 (and a few float32 roundings). The
kernel sums d_b dx_b sum_j q_j X_j (+ m_b sum(x over b), the same in both, Q4's mins), so

    |L1[v] - L3[v]| <= sum_b |d_vb| sum_j |q_vbj| (dx_b / 2 + its three-part twin, 2^14 smaller)
                       + the float32 roundings of both sums (~nb 2^-24 of their terms' size)

which the coefficients G[v, b] (bound_coefficients, computed once a model) carry, each rounded up
and the whole doubled: E[v] = sum_b G[v, b] max|x over b|.
"""
from __future__ import annotations

import numpy as np
from numba import float32, njit, prange

from ..stages.quant import QK, QuantMatrix, unpack_nibbles
from ..stages.quant_i8 import _absmax_sum
from . import quant_panel
from .quant_panel import ROWS

CHUNK = 16                # panels a parallel item (256 rows of the head), and the unit of the search


# ---------------------------------------------------------------------------------------------
# NumPy reference: the bound's coefficients, and the rule
# ---------------------------------------------------------------------------------------------
def bound_coefficients(w: QuantMatrix, safety: float = 2.0) -> np.ndarray:
    """G [O, nb] float32: |L3[v] - L1[v]| <= sum_b G[v, b] max|x over block b|, for any x (the
    worst case times `safety`: a margin for the roundings counted loosely)."""
    O, K = w.shape
    nb = K // QK
    d = np.abs(w.d.astype(np.float64))                                      # [O, nb]
    if w.fmt == "Q8_0":
        q = np.abs(w.qs.reshape(O, nb, QK).astype(np.float64))               # [O, nb, 32]
        m = np.zeros((O, nb))
    else:                                                 # the nibbles as the kernels take them
        q = unpack_nibbles(w.qs.reshape(O * nb, QK // 2)).reshape(O, nb, QK).astype(np.float64)
        m = np.abs(w.m.astype(np.float64))                                   # [O, nb]
    A = d * q.sum(axis=2)                        # [O, nb] sum_j |d q_j|: what x's rounding scales
    rounding = 2 * (nb + 8) * 2.0 ** -24         # both sums' float32 roundings, generously
    G = A * (0.5001 / 127 * (1 + 2.0 ** -14) + rounding) + QK * m * rounding   # [O, nb]
    return (safety * G * (1 + 2.0 ** -20)).astype(np.float32)   # (rounded up from float64)


def argmax_by_bound(approx: np.ndarray, bound: np.ndarray, exact) -> int:
    """approx [V], bound [V] with |exact(v) - approx[v]| <= bound[v] -> the first v of the largest
    exact(v), calling exact only where it could be that."""
    lo = np.max(approx - bound)                       # the arg-max's exact value is at least this
    kept = np.flatnonzero(approx + bound >= lo)                                  # [n], ascending
    values = np.array([exact(v) for v in kept])                                  # [n]
    return int(kept[np.argmax(values)])


# ---------------------------------------------------------------------------------------------
# Numba: the head with int8 x (all threads), then the search (a row a thread)
# ---------------------------------------------------------------------------------------------
@njit(cache=True)
def _block_absmax(h):
    """h [R, K] -> max |h| over each block of 32 [R, nb] (as prepare_x finds it)."""
    R, K = h.shape
    out = np.empty((R, K // QK), dtype=np.float32)
    for t in range(R):
        for b in range(K // QK):
            out[t, b] = _absmax_sum(h, t * K + b * QK)[0]
    return out


@njit(inline="always")
def _bounds(Gt, amax, t, v0, v1, e):
    """e[:v1 - v0] = E[v] for the head's rows v0..v1-1 and row t of x: sum_b G[v, b] amax[t, b],
    rounded up a little (the float32 roundings of this sum, and of L1 +- E)."""
    n = v1 - v0
    out = e[:n]
    out[:] = float32(0.0)
    for b in range(amax.shape[1]):
        a = amax[t, b] * float32(1.0001)
        g = Gt[b, v0:v1]                     # (slices: loops the compiler turns into vectors)
        for j in range(n):
            out[j] += g[j] * a


SLACK = 2.0 ** -20          # of |L1|: the roundings of L1 +- E
MOST = 256                  # panels computed exactly for a row, at most (more: its whole head)
PAUSE = 16                  # greedy steps on the plain head after many rows needed their whole head


@njit(parallel=True, fastmath=True, cache=True)
def _approx(h, qp, d, m, G_chunk, amax, V):
    """-> L1 [R, P 16], and per chunk of CHUNK panels and row [R, chunks]: the largest L1, and a
    bound for all the chunk's rows, sum_b max_v G[v, b] amax[t, b] >= E[v]. x finite (fastmath:
    no NaN here)."""
    R, P = h.shape[0], qp.shape[0]
    xi = quant_panel.prepare_x(h, m.ndim == 1, 1)
    n = (P + CHUNK - 1) // CHUNK
    L1 = np.empty((R, P * ROWS), dtype=np.float32)
    top = np.empty((R, n), dtype=np.float32)
    E = np.empty((R, n), dtype=np.float32)
    for i in prange(n):
        p0, p1 = i * CHUNK, min(P, (i + 1) * CHUNK)
        v0, v1 = p0 * ROWS, min(p1 * ROWS, V)         # (the last panel's padding: not rows)
        quant_panel.tile(xi, qp, d, m, p0, p1, L1, v0)
        for t in range(R):
            row = L1[t, v0:v1]
            best = row[0]
            for j in range(v1 - v0):
                best = max(best, row[j])
            e = float32(0.0)
            for b in range(amax.shape[1]):
                e += G_chunk[i, b] * amax[t, b]
            top[t, i], E[t, i] = best, e * float32(1.0001)
    return L1, top, E


@njit(parallel=True, cache=True)
def _search(h, qp, d, m, L1, top, E, Gt, amax, V, most):
    """-> (ids [R], their three-part logits [R], rows computed exactly [R]), a row a thread; -1
    for a row with more than `most` panels to compute (a flat distribution: its whole head is
    cheaper)."""
    R, n = top.shape
    ids = np.full(R, -1, dtype=np.int64)
    best = np.full(R, -np.inf, dtype=np.float32)
    exact = np.zeros(R, dtype=np.int64)
    slack = float32(SLACK)
    for t in prange(R):
        y = np.empty((1, ROWS), dtype=np.float32)
        e = np.empty(CHUNK * ROWS, dtype=np.float32)
        panels = np.empty(most + 1, dtype=np.int64)
        # lo: L1 - E at the largest L1, a value the arg-max's logit is at least
        i = np.argmax(top[t])
        v = i * CHUNK * ROWS
        while L1[t, v] != top[t, i] and v + 1 < min((i + 1) * CHUNK * ROWS, V):
            v += 1
        _bounds(Gt, amax, t, v, v + 1, e)
        lo = L1[t, v] - e[0] - abs(L1[t, v]) * slack
        # the panels holding a row that could reach lo
        k = 0
        for i in range(n):
            if k > most:
                break
            if top[t, i] + E[t, i] + abs(top[t, i]) * slack < lo:
                continue                              # no row of this chunk can reach lo
            v0, v1 = i * CHUNK * ROWS, min((i + 1) * CHUNK * ROWS, V)
            _bounds(Gt, amax, t, v0, v1, e)
            for v in range(v0, v1):
                l1 = L1[t, v]
                if l1 + e[v - v0] + abs(l1) * slack >= lo and (k == 0 or panels[k - 1] != v // ROWS):
                    panels[k] = v // ROWS
                    k += 1
                    if k > most:
                        break
        if k > most:
            continue                                  # (ids[t] = -1: the whole head)
        # their three-part logits, as the step's head computes them, and the largest
        xi = quant_panel.prepare_x(h[t:t + 1], m.ndim == 1, 3)
        for j in range(k):
            p = panels[j]
            quant_panel.tile(xi, qp, d, m, p, p + 1, y, 0)
            exact[t] += ROWS
            for r in range(min(ROWS, V - p * ROWS)):
                if ids[t] < 0 or y[0, r] > best[t]:   # (a tie keeps the first)
                    ids[t], best[t] = p * ROWS + r, y[0, r]
    return ids, best, exact


class Head:
    """An LM head w in panels (quant_panel.PanelMatrix's arrays qp, d, m) with its bound's
    coefficients, for head_argmax."""

    def __init__(self, w: QuantMatrix, qp, d, m):
        self.w, self.V, self.qp, self.d, self.m = w, w.shape[0], qp, d, m
        G = bound_coefficients(w)                                              # [V, nb]
        P, nb = qp.shape[0], G.shape[1]
        n = -(-P // CHUNK)                                      # (chunks: the last one padded)
        self.Gt = np.zeros((nb, n * CHUNK * ROWS), dtype=np.float32)         # [nb, V padded]
        self.Gt[:, :len(G)] = G.T                               # (zero past V: E = 0 there)
        # a chunk's own coefficients, the largest of its rows': one bound for all of them
        self.G_chunk = np.ascontiguousarray(self.Gt.reshape(nb, n, CHUNK * ROWS).max(axis=2).T)

        self.flat, self.pause = 0.0, 0      # the recent share of flat rows; steps to sit out

    def observe(self, flat: int, rows: int) -> None:
        """A step had `flat` rows of `rows` whose candidates were too many (each cost its whole
        head, on top of the int8 pass): where that is common (random text), the next PAUSE
        greedy steps take the plain head, then this one is tried again."""
        self.flat = 0.5 * self.flat + 0.5 * flat / rows
        if self.flat > 0.25:
            self.flat, self.pause = 0.0, PAUSE

    def logits(self, h: np.ndarray) -> np.ndarray:
        """The whole three-part head: h [R, K] -> [R, V] (what the step's own head gives)."""
        return quant_panel._matmul(np.ascontiguousarray(h, dtype=np.float32), self.qp, self.d,
                                   self.m, 3)[:, :self.V]


HUGE = 1e25        # |x| below it: no L1 can overflow float32 (|q| <= 127, |d| <= 65504, K ~ 1e4)


def head_argmax(h: np.ndarray, head: Head, most: int = MOST):
    """h [R, K] (after the final norm) -> (ids [R] int64: np.argmax of each row of the
    three-part logits of the head; those logits [R]; rows computed exactly; rows that took the
    whole head), or None where x is not finite (or so large that L1 could overflow: the whole
    head then says what it gives)."""
    h = np.ascontiguousarray(h, dtype=np.float32)
    if not np.isfinite(h).all():                  # (the kernels below assume no NaN)
        return None
    amax = _block_absmax(h)                                                    # [R, nb]
    if not amax.max() < HUGE:
        return None
    L1, top, E = _approx(h, head.qp, head.d, head.m, head.G_chunk, amax, head.V)
    ids, best, rows = _search(h, head.qp, head.d, head.m, L1, top, E, head.Gt, amax, head.V, most)
    exact = int(rows.sum())
    flat = np.flatnonzero(ids < 0)
    if len(flat):                                 # rows whose logits are too close: all of them
        logits = head.logits(h[flat])                                         # [f, V]
        ids[flat] = np.argmax(logits, axis=1)
        best[flat] = logits[np.arange(len(flat)), ids[flat]]
        exact += len(flat) * head.V
    return ids, best, exact, len(flat)
