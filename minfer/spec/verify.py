"""Verification: which proposed tokens the target model accepts, and the token that follows them.

A proposer (ngram.py, draft.py) guesses k tokens d_1..d_k after a sequence; the target scores
all of them in one forward (k + 1 rows: the sequence's last token and the k guesses), so row i
holds the target's distribution p_i of the token after d_1..d_i. Then:

  greedy    accept the longest prefix with d_{i+1} == argmax p_i, and add the target's own
            next token argmax p_m after the m accepted ones: exactly the tokens plain greedy
            decoding would have produced, m + 1 of them for one forward.
  sampling  (Leviathan et al. 2023; Chen et al. 2023) d_{i+1} was drawn from the proposer's q_i:
            accept it with probability min(1, p_i(d) / q_i(d)); at the first rejection draw the
            next token from max(0, p_i - q_i), normalised, and stop; if all k are accepted, draw
            one more from p_k. Each emitted token is then distributed exactly as p: it is d with
            probability q(d) min(1, p(d)/q(d)) = min(q(d), p(d)), and otherwise comes from the
            residual, whose mass 1 - sum min(p, q) is exactly the rejection probability.
            A proposer with no distribution (n-gram lookup, a greedy draft) is a point mass
            q = [d]: accept d with probability p(d), on rejection draw from p with d removed.
            The engine draws that rule as plain sampling draws (sample_as_plain; the kernel's
            point-mass branch likewise): row by row, the plain sampler's token with the
            sequence's next number, d accepted when that token is d — the same distribution,
            and a seed's text that of plain decoding.

p and q are distributions *after* the sampling filters (repetition penalty, temperature, top-k,
top-p, min-p) — sampling.py's own functions, applied to every row with the tokens seen up to
that row — so what is preserved is the distribution plain sampling draws from.

Three paths, as everywhere: the NumPy reference (the spec), the @njit rule (same inputs, same
outputs) and a numba.cuda kernel, one thread per sequence, for logits that live on the GPU.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..sampling import (SamplingParams, apply_repetition_penalty, draw, filter_logits, kept_softmax,
                        sample)


# ---------------------------------------------------------------------------------------------
# The target's (or a draft's) rows as the plain sampler would see them
# ---------------------------------------------------------------------------------------------
def _seen(context: np.ndarray | None, proposals, i: int) -> np.ndarray | None:
    """Tokens a repetition penalty sees at row i: the context, then the first i proposals."""
    if context is None:
        return None
    return np.concatenate([context, np.asarray(proposals[:i], dtype=np.int64)])


def row_logits(logits: np.ndarray, params: SamplingParams, seen: np.ndarray | None) -> np.ndarray:
    """One row's logits [V] after the repetition penalty (the first step of sampling.sample)."""
    if seen is not None and params.repetition_penalty != 1:
        return apply_repetition_penalty(logits, seen, params.repetition_penalty)
    return logits


def row_probs(logits: np.ndarray, params: SamplingParams, seen: np.ndarray | None) -> np.ndarray:
    """One row's logits [V] -> the filtered distribution sampling.sample draws from, float64 [V]
    (the softmax over the kept tokens, as sample takes it; 0 for the dropped ones)."""
    x = filter_logits(row_logits(logits, params, seen) / params.temperature, params)
    kept, probs = kept_softmax(x, params)
    if kept is None:
        return probs
    row = np.zeros(len(x))
    row[kept] = probs
    return row


def greedy_ids(logits: np.ndarray, params: SamplingParams, context, proposals) -> np.ndarray:
    """logits [n, V] of rows 0..n-1 -> the target's greedy token at each row [n]."""
    if context is None or params.repetition_penalty == 1:       # every row as it is: one argmax
        return np.argmax(logits, axis=1).astype(np.int64)
    return np.array([int(np.argmax(row_logits(row, params, _seen(context, proposals, i))))
                     for i, row in enumerate(logits)], dtype=np.int64)


def probs_rows(logits: np.ndarray, params: SamplingParams, context, proposals) -> np.ndarray:
    """logits [n, V] -> filtered distributions [n, V] float64, row i seeing proposals[:i]."""
    return np.stack([row_probs(row, params, _seen(context, proposals, i))
                     for i, row in enumerate(logits)])


# ---------------------------------------------------------------------------------------------
# The rules: NumPy reference
# ---------------------------------------------------------------------------------------------
def verify_greedy(target_ids: np.ndarray, proposals: np.ndarray) -> tuple[int, int]:
    """target_ids [k+1]: argmax of each row; proposals [k] -> (accepted m, the next token)."""
    k = len(proposals)
    m = 0
    while m < k and proposals[m] == target_ids[m]:
        m += 1
    return m, int(target_ids[m])


def residual(p: np.ndarray, q: np.ndarray | None, x: int) -> np.ndarray:
    """What to draw from after rejecting x: max(0, p - q) (unnormalised), q None = point mass."""
    if q is None:
        r = p.copy()
        r[x] = 0.0
    else:
        r = np.maximum(p - q, 0.0)
    return r if r.sum() > 0 else p          # only rounding gets here: p and q equal


def verify_sample(p: np.ndarray, q: np.ndarray | None, proposals: np.ndarray,
                  u: np.ndarray) -> tuple[int, int]:
    """p [k+1, V] the target's filtered distributions, q [k, V] the proposer's (None: point
    masses at the proposals), proposals [k], u [k+1] uniforms in [0, 1) -> (accepted m, next)."""
    k = len(proposals)
    for i in range(k):
        x = int(proposals[i])
        qx = 1.0 if q is None else q[i, x]
        if qx > 0 and u[i] * qx < p[i, x]:              # u < p/q, without dividing by zero
            continue
        # rejected: draw the replacement with u[i] rescaled (it is uniform in [p/q, 1) here)
        lo = p[i, x] / qx if qx > 0 else 0.0
        v = (u[i] - lo) / (1.0 - lo) if lo < 1.0 else 0.0
        return i, draw(residual(p[i], None if q is None else q[i], x), min(max(v, 0.0), 0.999999999))
    return k, draw(p[k], u[k])


def sample_as_plain(logits: np.ndarray, params: SamplingParams, context, proposals,
                    rng: np.random.Generator) -> tuple[int, int]:
    """The point-mass rule drawn as plain sampling draws: logits [k+1, V] -> (accepted m, next).
    Row i's token is sampling.sample's, with the sequence's next number and the tokens seen up
    to that row; the guess is accepted when it is that token. So the guess d is accepted with
    probability p(d), and otherwise the token comes from p without d — verify_sample's rule for
    a point mass — and each emitted token is the very draw plain decoding makes at its place,
    one number each: with the same seed, the same text as without guesses."""
    k = len(proposals)
    for i in range(k):
        tok = sample(logits[i], params, rng, _seen(context, proposals, i))
        if tok != proposals[i]:
            return i, tok
    return k, sample(logits[k], params, rng, _seen(context, proposals, k))


def always_accept(p, q, proposals, u) -> tuple[int, int]:
    """A deliberately wrong rule (for tests: the distribution test must catch it)."""
    k = len(proposals)
    return k, draw(p[k], u[k])


# ---------------------------------------------------------------------------------------------
# The rules: @njit (q with no rows = point masses)
# ---------------------------------------------------------------------------------------------
@njit(cache=True)
def verify_greedy_numba(target_ids, proposals):
    k = proposals.shape[0]
    m = 0
    while m < k and proposals[m] == target_ids[m]:
        m += 1
    return m, target_ids[m]


@njit(cache=True)
def _draw_numba(w, u):
    """Inverse transform sampling from unnormalised weights w (the last positive one if rounding
    carries u past the end)."""
    total = 0.0
    for j in range(w.shape[0]):
        total += w[j]
    target = u * total
    s = 0.0
    last = 0
    for j in range(w.shape[0]):
        if w[j] > 0:
            s += w[j]
            last = j
            if s > target:
                return j
    return last


@njit(cache=True)
def verify_sample_numba(p, q, proposals, u):
    """verify_sample with q [k, V] or q [0, V] for point masses."""
    k = proposals.shape[0]
    point = q.shape[0] == 0
    V = p.shape[1]
    for i in range(k):
        x = proposals[i]
        qx = 1.0 if point else q[i, x]
        if qx > 0 and u[i] * qx < p[i, x]:
            continue
        lo = p[i, x] / qx if qx > 0 else 0.0
        v = (u[i] - lo) / (1.0 - lo) if lo < 1.0 else 0.0
        v = min(max(v, 0.0), 0.999999999)
        r = np.empty(V)
        total = 0.0
        for j in range(V):
            r[j] = p[i, j] if point else max(p[i, j] - q[i, j], 0.0)
            total += r[j]
        if point:
            total -= r[x]
            r[x] = 0.0
        if not total > 0:
            r[:] = p[i]
        return i, _draw_numba(r, v)
    return k, _draw_numba(p[k], u[k])


# ---------------------------------------------------------------------------------------------
# The rules: numba.cuda (verify_cuda.py: imported only where numba-cuda is wanted)
# ---------------------------------------------------------------------------------------------
def verify_greedy_cuda(logits, starts, proposals, n_prop):
    """The greedy rule on the device, one thread per sequence -> [B, 2] (accepted m, next)."""
    from .verify_cuda import verify_greedy_cuda as run
    return run(logits, starts, proposals, n_prop)


def verify_sample_cuda(p, q, starts, proposals, n_prop, u, point_mass=None):
    """The rejection rule on the device, one thread per sequence -> [B, 2] (accepted m, next)."""
    from .verify_cuda import verify_sample_cuda as run
    return run(p, q, starts, proposals, n_prop, u, point_mass)
