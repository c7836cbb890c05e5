"""Sampling on the GPU: logits -> next token, with the logits never leaving the device.

The NumPy reference is sampling.py's `sample` (tests/cuda_cases.py holds this kernel to it). Same rules as the reference: temperature 0 is greedy (arg-max, first index on ties);
otherwise logits / temperature, then top-k, top-p and min-p, then one draw.

A GPU has no cheap sort of 49,152 logits in one thread block, so the filters are thresholds found
by a radix select instead of sorting:
  * every kept set is "all tokens whose logit is >= some threshold", and the threshold is one of
    the logits;
  * floats compare like integers once their bits are mapped to an ordered key (negative floats
    have their 31 low bits flipped), so the threshold's key can be found one byte at a time, from
    the top: a histogram of the first byte over the vocabulary says which byte the threshold
    has (walk the 256 bins down, adding up counts or probability mass, until the goal is
    reached); the next pass looks only at the tokens with that first byte, and so on — 4 passes;
  * top-k: the k-th largest key (ties with the k-th are kept, as in the reference); top-p: the
    key where the mass counted from the top first reaches top_p (a token is kept when the
    tokens more likely than it hold less than top_p).
The draw is the reference's `rng.choice(V, p=probs)`: u = rng.random() drawn on the host from the
sequence's own generator, and the first token whose running sum (in token order) exceeds
u * total — a prefix sum across the block. The same seed gives the same text as the numba
backend, up to float32 rounding.

    grid (B,)   block (threads,) — one block per sequence, threads a power of two <= 1024.
Greedy sequences stop after the arg-max pass: one read of the logits. probs_kernel writes
the distribution sample_kernel draws from (for verifying guesses on the device, spec/verify_cuda.py).
"""
from __future__ import annotations

import math

import numpy as np

from .. import numpy_compat  # noqa: F401  (before numba.cuda)
from numba import cuda, float32, int32, int64

from ..stages import attention
from ..stages.lazy_cuda import compiled

block_reduce = compiled(attention).block_reduce   # the tree sum over a thread block

MAX_THREADS = 1024
THREADS = 1024              # per sequence on the GPU: 48 logits per thread for SmolLM2
N_PARAMS = 5                 # per sequence: temperature, top_k, top_p, min_p, u
HIST_COPIES = 8              # radix-select histograms per block, one per group of warps
HIST_SIZE = 256 * HIST_COPIES   # (a shared array's shape must be a plain constant)


@cuda.jit(device=True, inline=True)
def _key(bits):
    """Order-preserving integer key of a float32 given by its bits (int32)."""
    b = int64(bits)
    return b if b >= 0 else b ^ int64(0x7FFFFFFF)


@cuda.jit(device=True, inline=True)
def _weight(x, top, temp, key, tau, min_p):
    """exp((x - top) / T) for a kept token, 0 for a dropped one."""
    if key < tau:
        return float32(0.0)
    e = float32(math.exp(float32(x / temp) - float32(top / temp)))
    return e if e >= min_p else float32(0.0)


@cuda.jit(device=True)
def _radix_select(logits, bits, b, goal, by_mass, top, temp, tau_min, hist, pick):
    """The key tau where a walk over the tokens from the largest key down first reaches `goal`:
    count (or mass, by_mass) of {key > tau} < goal <= count (or mass) of {key >= tau}. Mass counts
    the weights of tokens with key >= tau_min. Four passes over the vocabulary, one per byte of
    the 32-bit key from the top: each makes a histogram of that byte among the tokens whose
    higher bytes are the ones found so far, and one thread walks it down to the byte where the
    goal is reached. (A binary search over the keys would take 32 passes.)

    Most logits share their first byte (sign and exponent), so adding straight into one
    histogram sends ~49k atomics at one or two bins, one after another. Each thread therefore sums runs of the same bin in a register and adds a run when the
    bin changes, into one of HIST_COPIES histograms (by warp); the copies are summed before
    the walk."""
    tid, n = cuda.threadIdx.x, cuda.blockDim.x
    V = logits.shape[1]
    prefix = int64(0)                                 # the bytes found so far, unsigned key
    above = float32(0.0)                              # count/mass of keys above the prefix's range
    for byte in range(4):
        shift = 24 - 8 * byte
        for i in range(tid, HIST_SIZE, n):
            hist[i] = float32(0.0)
        cuda.syncthreads()
        base = (tid // 32) % HIST_COPIES * 256        # this warp's copy
        run_bin, run = int32(-1), float32(0.0)
        for k in range(tid, V, n):
            kk = _key(bits[b, k])
            u = kk + int64(2147483648)                # 0 .. 2^32 - 1, in the same order
            if (u >> (shift + 8)) == prefix:
                w = float32(1.0)
                if by_mass:
                    w = _weight(logits[b, k], top, temp, kk, tau_min, float32(0.0))
                if w > float32(0.0):
                    d = int32((u >> shift) & 255)
                    if d != run_bin:
                        if run_bin >= 0:
                            cuda.atomic.add(hist, base + run_bin, run)
                        run_bin, run = d, float32(0.0)
                    run += w
        if run_bin >= 0:
            cuda.atomic.add(hist, base + run_bin, run)
        cuda.syncthreads()
        for i in range(tid, 256, n):                  # sum the copies into copy 0
            t = hist[i]
            for c in range(1, HIST_COPIES):
                t += hist[c * 256 + i]
            hist[i] = t
        cuda.syncthreads()
        if tid == 0:                                  # walk the bytes down from 255
            d, cum = 255, above
            while d > 0 and cum + hist[d] < goal:
                cum += hist[d]
                d -= 1
            pick[0], pick[1] = float32(d), cum
        cuda.syncthreads()
        prefix = prefix * 256 + int64(pick[0])
        above = pick[1]
        cuda.syncthreads()                            # pick and hist are reused next pass
    return prefix - int64(2147483648)


@cuda.jit(device=True)
def _filters(logits, bits, b, temp, top_k, top_p, red, idx, hist, pick):
    """Row b's largest logit, its index, and the key threshold tau of top-k and top-p (every
    key when neither filters): (top, arg, tau). Called by every thread of the block (barriers);
    the thresholds only when temp > 0."""
    tid, n = cuda.threadIdx.x, cuda.blockDim.x
    V = logits.shape[1]
    # --- arg-max: each thread its strided share, then a tree (larger value, else smaller index)
    best, bi = float32(-math.inf), int32(V)
    for k in range(tid, V, n):
        if logits[b, k] > best:
            best, bi = logits[b, k], int32(k)
    red[tid], idx[tid] = best, bi
    cuda.syncthreads()
    s = n // 2
    while s > 0:
        if tid < s:
            if red[tid + s] > red[tid] or (red[tid + s] == red[tid] and idx[tid + s] < idx[tid]):
                red[tid], idx[tid] = red[tid + s], idx[tid + s]
        cuda.syncthreads()
        s //= 2
    top, arg = red[0], idx[0]
    cuda.syncthreads()
    tau = int64(-2147483648)
    if temp <= float32(0.0):
        return top, arg, tau
    # --- top-k: the k-th largest key (count(key > tau) < k <= count(key >= tau): ties kept)
    if 0 < top_k < V:
        tau = _radix_select(logits, bits, b, float32(top_k), False, top, temp, tau, hist, pick)
    # --- top-p: the key where the mass from the top first reaches top_p * total
    if top_p < float32(1.0):
        z = float32(0.0)
        for k in range(tid, V, n):
            z += _weight(logits[b, k], top, temp, _key(bits[b, k]), tau, float32(0.0))
        goal = top_p * block_reduce(red, z, False)
        tau = _radix_select(logits, bits, b, goal, True, top, temp, tau, hist, pick)
    return top, arg, tau


@cuda.jit
def sample_kernel(logits, bits, params, out):
    red = cuda.shared.array(MAX_THREADS, float32)
    idx = cuda.shared.array(MAX_THREADS, int32)
    hist = cuda.shared.array(HIST_SIZE, float32)   # radix select: a byte's histograms
    pick = cuda.shared.array(2, float32)
    b, tid, n = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    V = logits.shape[1]
    temp, top_k, top_p, min_p, u = (params[b, 0], int32(params[b, 1]), params[b, 2], params[b, 3],
                                    params[b, 4])
    top, arg, tau = _filters(logits, bits, b, temp, top_k, top_p, red, idx, hist, pick)
    if tid == 0:
        out[b] = arg                                  # greedy; also the fallback of the draw
    if temp <= float32(0.0):
        return                                        # the whole block leaves together
    # --- the draw: thread tid owns tokens [tid*C, tid*C + C); a prefix sum over the threads says
    # whose stretch holds u * total, and that thread walks it
    C = (V + n - 1) // n
    k0, k1 = tid * C, min(V, tid * C + C)
    part = float32(0.0)
    for k in range(k0, k1):
        part += _weight(logits[b, k], top, temp, _key(bits[b, k]), tau, min_p)
    red[tid] = part
    cuda.syncthreads()
    off = 1
    while off < n:                                    # inclusive scan (Hillis-Steele)
        v = red[tid - off] if tid >= off else float32(0.0)
        cuda.syncthreads()
        red[tid] += v
        cuda.syncthreads()
        off *= 2
    incl, total = red[tid], red[n - 1]
    target = u * total
    if incl - part <= target < incl:
        run, last = incl - part, int32(-1)
        for k in range(k0, k1):
            wk = _weight(logits[b, k], top, temp, _key(bits[b, k]), tau, min_p)
            if wk > float32(0.0):
                last = int32(k)
                run += wk
                if run > target:
                    break
        if last >= 0:
            out[b] = last


@cuda.jit
def probs_kernel(logits, bits, params, probs):
    """Row b's filtered distribution, what sample_kernel draws from: probs[b] = the kept tokens'
    exp((x - top) / T), normalised (sampling.py: softmax(filter_logits(x / T))); temperature 0:
    all the mass on the arg-max. For verifying guesses on the device (spec/verify_cuda.py)."""
    red = cuda.shared.array(MAX_THREADS, float32)
    idx = cuda.shared.array(MAX_THREADS, int32)
    hist = cuda.shared.array(HIST_SIZE, float32)
    pick = cuda.shared.array(2, float32)
    b, tid, n = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    V = logits.shape[1]
    temp, top_k, top_p, min_p = params[b, 0], int32(params[b, 1]), params[b, 2], params[b, 3]
    top, arg, tau = _filters(logits, bits, b, temp, top_k, top_p, red, idx, hist, pick)
    if temp <= float32(0.0):
        for k in range(tid, V, n):
            probs[b, k] = float32(1.0) if k == arg else float32(0.0)
        return
    z = float32(0.0)
    for k in range(tid, V, n):
        w = _weight(logits[b, k], top, temp, _key(bits[b, k]), tau, min_p)
        probs[b, k] = w
        z += w
    inv = float32(1.0) / block_reduce(red, z, False)  # (its barriers: every weight is written)
    for k in range(tid, V, n):
        probs[b, k] *= inv


def params_array(params, rngs) -> np.ndarray:
    """Per sequence [temperature, top_k, top_p, min_p, u] float32 [B, 5]; u is drawn from the
    sequence's generator (as `sampling.sample` would draw it) unless the sequence is greedy."""
    a = np.zeros((len(params), N_PARAMS), dtype=np.float32)
    for i, (p, rng) in enumerate(zip(params, rngs)):
        if p.greedy:
            continue
        a[i] = (p.temperature, p.top_k, p.top_p, p.min_p, rng.random())
    return a


def sample_cuda(logits, params, out, threads=THREADS, stream=0):
    """Device arrays: logits float32 [B, V], params float32 [B, 5] -> out int32 [B]."""
    sample_kernel[logits.shape[0], threads, stream](logits, logits.view(np.int32), params, out)


def probs_cuda(logits, params, probs, threads=THREADS, stream=0):
    """Device arrays: logits float32 [R, V], params float32 [R, 5] (u unused) -> probs float32
    [R, V], each row's filtered distribution."""
    probs_kernel[logits.shape[0], threads, stream](logits, logits.view(np.int32), params, probs)
