"""The verify rules of verify.py as numba.cuda kernels: one thread per sequence, reading the
target's logits (greedy) or filtered distributions (sampling) where they already are, on the
device; only the accepted counts and the next ids come back. Simple on purpose: a sequence's
k + 1 rows are a few hundred thousand reads, far below a forward's cost.
"""
from __future__ import annotations

import numpy as np
from numba import cuda


@cuda.jit(device=True)
def _draw_cuda(w, b, total, u):
    target = u * total
    s = 0.0
    last = 0
    for j in range(w.shape[1]):
        if w[b, j] > 0:
            s += w[b, j]
            last = j
            if s > target:
                return j
    return last


@cuda.jit(device=True)
def _draw_row(p, r, work, b, u):
    """A token from row r of p (plain sampling's draw with u); work[b] holds the row's copy."""
    total = 0.0
    for j in range(p.shape[1]):
        work[b, j] = p[r, j]
        total += p[r, j]
    return _draw_cuda(work, b, total, u)


@cuda.jit
def greedy_kernel(logits, starts, proposals, n_prop, out):
    """logits [R, V]: sequence b's rows starts[b]..starts[b+1]-1 (its last token, then its
    proposals proposals[b, :n_prop[b]]) -> out[b] = (accepted m, next token)."""
    b = cuda.grid(1)
    if b >= out.shape[0]:
        return
    V = logits.shape[1]
    m = 0
    for i in range(starts[b + 1] - starts[b]):
        r = starts[b] + i
        best, arg = logits[r, 0], 0
        for j in range(1, V):                       # argmax, first index on ties
            if logits[r, j] > best:
                best, arg = logits[r, j], j
        if i < n_prop[b] and proposals[b, i] == arg:
            m += 1
            continue
        out[b, 0], out[b, 1] = m, arg
        return


@cuda.jit
def sample_kernel(p, q, point_mass, starts, proposals, n_prop, u, work, out):
    """p [R, V] filtered distributions (rows as in greedy_kernel), q [R, V] the proposer's
    on the same rows (a sequence's last row unused) or q [0, V] for point masses only,
    point_mass[b] != 0: sequence b's guesses are point masses (its q rows unused), u [B, K+1]
    uniforms, work [B, V] -> out[b] = (accepted m, next token). Point masses are drawn as plain
    sampling draws (verify.sample_as_plain): row i's token with u[b, i], the guess accepted when
    it is that token."""
    b = cuda.grid(1)
    if b >= out.shape[0]:
        return
    V = p.shape[1]
    point = q.shape[0] == 0 or point_mass[b] != 0
    k = n_prop[b]
    s0 = starts[b]
    if point:                        # row by row, plain sampling's token against the guess
        for i in range(k + 1):
            t = _draw_row(p, s0 + i, work, b, u[b, i])
            if i == k or t != proposals[b, i]:
                out[b, 0], out[b, 1] = i, t
                return
        return
    for i in range(k):               # a draft's guesses: the rejection rule against its q
        x = proposals[b, i]
        qx = q[s0 + i, x]
        if qx > 0 and u[b, i] * qx < p[s0 + i, x]:
            continue
        lo = p[s0 + i, x] / qx if qx > 0 else 0.0
        v = (u[b, i] - lo) / (1.0 - lo) if lo < 1.0 else 0.0
        v = min(max(v, 0.0), 0.999999999)
        total = 0.0
        for j in range(V):
            w = max(p[s0 + i, j] - q[s0 + i, j], 0.0)
            work[b, j] = w
            total += w
        if not total > 0:
            total = 0.0
            for j in range(V):
                work[b, j] = p[s0 + i, j]
                total += p[s0 + i, j]
        out[b, 0], out[b, 1] = i, _draw_cuda(work, b, total, v)
        return
    out[b, 0], out[b, 1] = k, _draw_row(p, s0 + k, work, b, u[b, k])


def verify_greedy_cuda(logits, starts: np.ndarray, proposals: np.ndarray, n_prop: np.ndarray):
    """logits [R, V] (a device array, or host: copied) -> [B, 2] (accepted m, next) on the host:
    only the accepted counts and ids leave the device."""
    B = len(n_prop)
    out = cuda.device_array((B, 2), dtype=np.int64)
    threads = 32
    greedy_kernel[(B + threads - 1) // threads, threads](
        cuda.to_device(logits) if isinstance(logits, np.ndarray) else logits,
        cuda.to_device(starts.astype(np.int64)), cuda.to_device(proposals.astype(np.int64)),
        cuda.to_device(n_prop.astype(np.int64)), out)
    return out.copy_to_host()


def verify_sample_cuda(p, q, starts: np.ndarray, proposals: np.ndarray, n_prop: np.ndarray,
                       u: np.ndarray, point_mass: np.ndarray | None = None):
    """The sampling rule on the device: p, q [R, V] (q [0, V]: point masses; point_mass [B]
    marks the sequences whose guesses are) -> [B, 2]."""
    B = len(n_prop)
    dev = (lambda a: cuda.to_device(a) if isinstance(a, np.ndarray) else a)
    out = cuda.device_array((B, 2), dtype=np.int64)
    work = cuda.device_array((B, p.shape[1]), dtype=np.float64)
    point = np.zeros(B, np.int64) if point_mass is None else np.asarray(point_mass, np.int64)
    threads = 32
    sample_kernel[(B + threads - 1) // threads, threads](
        dev(p), dev(q), cuda.to_device(point), cuda.to_device(starts.astype(np.int64)),
        cuda.to_device(proposals.astype(np.int64)), cuda.to_device(n_prop.astype(np.int64)),
        cuda.to_device(u.astype(np.float64)), work, out)
    return out.copy_to_host()
