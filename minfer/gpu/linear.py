"""The GPU step's matmuls (numba.cuda), each fused with its neighbours: y = x W^T for dense, Q8_0,
Q4_0 and Q4_1 weights.

The NumPy references are stages/linear.py's and stages/quant.py's (with rmsnorm.py, rope.py and
mlp.py for what is fused in); tests/cuda_cases.py holds each kernel to them.

A decode step of SmolLM2-135M is ~150 small matmuls. On a GPU each one takes a few microseconds,
but launching a kernel from Python costs ~40 us, so the launches, not the arithmetic, set the speed.
The cure is fusion: one kernel does a matmul *and* what comes right before and after it.

    linear_kernel   out (+)= W · rmsnorm?(x[rows])    the LM head (norm folded in, last rows only),
                                                      W_o and W_down (the residual add folded in)
    qkv_kernel      [q|k|v] = W_qkv · rmsnorm(x), RoPE on q and k, k and v written to the cache
    swiglu_kernel   h = silu(W_gate · rmsnorm(x)) * (W_up · rmsnorm(x))

RMSNorm folds into a matmul because its scale is one number per token:
    W · (g * x / rms(x)) = (W · (g * x)) / rms(x),
and the sum of squares behind rms(x) is accumulated in the same pass over x as the dot products.

All three kernels share one inner loop, `_pair_dots`: a group of `lanes` threads (one warp on a
GPU) computes two output rows for a tile of up to `ts * TB` tokens. The lanes are `ks` K-lanes
times `ts` token-lanes (ks * ts = lanes): the K-lanes split the row into units of 8 weights, the
token-lanes split the tile's tokens, TB each. Each lane dequantizes a unit once into registers and
multiplies it with the x values of its TB tokens; the `ts` lanes that share a unit read its words
at the same moment, which the GPU serves as one load (each dequantizes it itself: no barrier, and
that work is spread over its TB tokens). So a tile of up to `ts * TB` tokens (a
decode batch, k tokens to verify, a chunk of a prompt) reads each weight once:
    ts = 1     ks = lanes   up to TB tokens (a decode step of one sequence: all lanes on K)
    ts = 4     ks = lanes/4 up to 4 TB tokens
    ts = lanes ks = 1       up to lanes * TB tokens (each lane walks the whole row)
Each lane ends with partial sums; one thread per token adds up its K-lanes' from shared memory.
Why two rows? RoPE rotates pairs of rows (2i, 2i+1) and SwiGLU multiplies row i of the gate with
row i of up: computing both members of a pair in the same place lets the epilogue finish the job.

Weights stay in their file's blocks on the device (stages/device.py: DeviceMatrix). The quants are uploaded as
32-bit words (the same bytes, read four at a time); the scales d (and m) as float32 [O, K/32]:
    Q8_0  qs uint32 [O, K/4]   unit u (8 weights) = words 2u, 2u+1, one signed byte per weight
    Q4_*  qs uint32 [O, K/8]   unit u = word u: bytes i = 4u..4u+3 of the row; in block b = u // 4,
                               the low nibbles are columns 32b + i%16, the high ones 16 further on
    F32   w float32 [O, K]     unit u = columns 8u..8u+7
"""
from __future__ import annotations

import math

from .. import numpy_compat  # noqa: F401  (before numba.cuda)
from numba import cuda, float32, int32, uint32

from ..stages import mlp, rope
from ..stages.device import F32, Q4, Q8_0, DeviceMatrix
from ..stages.lazy_cuda import compiled

silu_cuda = compiled(mlp).silu_cuda                   # device functions of the stage modules
rope_rotate_cuda = compiled(rope).rope_rotate_cuda

TB = 8                       # tokens per lane: each weight a lane dequantizes serves up to TB tokens
MAX_LANES = 32               # threads per row pair (blockDim.x, a power of two <= 32)
MAX_GROUPS = 4               # row pairs per block (blockDim.y)
TILE = 64                    # tokens per block at most: a step of up to TILE rows reads each weight
                             # once; past it, more blocks along y (each reading the weights again,
                             # from L2) keep the GPU busy on a long prompt
RED = 2 * TB * MAX_LANES     # shared partial sums per (group, value): tile tokens x (K-lanes + 1)
GROUPS = 4                   # what the GPU launches use; the simulator tests use fewer


# ---------------------------------------------------------------------------------------------
# The shared inner loop
# ---------------------------------------------------------------------------------------------
@cuda.jit(device=True, inline=True)
def _unpack8(fmt, w, qs, d, m, r, u, w8):
    """Dequantize the 8 weights of unit u of row r into w8 (registers); return the column of
    w8[0]. Columns: w8[j] sits at k0 + j, except in Q4 where w8[4..7] sit 12 further (k0+16..19)."""
    if fmt == F32:
        k0 = u * 8
        for j in range(8):
            w8[j] = w[r, k0 + j]
        return k0
    blk = u >> 2                                    # 4 units per 32-weight block
    scale = d[r, blk]
    if fmt == Q8_0:
        for h in range(2):
            word = qs[r, 2 * u + h]
            for j in range(4):
                b = int32((word >> uint32(8 * j)) & uint32(255))
                if b > 127:                          # the byte is a signed int8
                    b -= 256
                w8[4 * h + j] = scale * float32(b)
        return u * 8
    word = qs[r, u]                                 # Q4: w = d * q + m
    mn = m[r, blk]
    for j in range(4):
        byte = (word >> uint32(8 * j)) & uint32(255)
        w8[j] = scale * float32(int32(byte & uint32(15))) + mn
        w8[4 + j] = scale * float32(int32(byte >> uint32(4))) + mn
    return 32 * blk + 4 * (u & 3)


@cuda.jit(device=True, inline=True)
def _tile(T, ts, xr):
    """This block's tile of tokens and this lane's share of it: -> (t0, nt, tl). The tile is
    tokens t0 .. t0+nt-1 (block y holds the y-th ts*TB of them); lane (kl, tl) takes the tile's
    tokens tl, tl + ts, ..., and xr[j] gets the position of its j-th (t0 + tl + j*ts), which a
    kernel may map to another x row (linear_kernel: rows[...])."""
    t0 = cuda.blockIdx.y * ts * TB
    nt = min(ts * TB, T - t0)
    tl = cuda.threadIdx.x // (cuda.blockDim.x // ts)
    for j in range(TB):
        xr[j] = t0 + tl + j * ts
    return t0, nt, tl


@cuda.jit(device=True, inline=True)
def _total(tt, ts):
    """Where token tt's sums sit in red after _pair_dots: behind its ks partial sums."""
    ks = cuda.blockDim.x // ts
    return tt * (ks + 1) + ks


@cuda.jit(device=True)
def _pair_dots(x, xr, nt, ts, g, has_norm, fmt, w, qs, d, m, r0, r1, red):
    """Thread group threadIdx.y computes, for the nt tokens of its tile, the dot products of rows
    r0 and r1 of W (a row >= O is skipped) with g * x (g only if has_norm), and the sum of squares
    of x. The lanes are ks = lanes // ts K-lanes times ts token-lanes: lane = tl * ks + kl (the
    lanes side by side read side by side units). Lane (kl, tl) takes units kl, kl + ks, ... and
    the tile's tokens tl, tl + ts, ... (x rows xr[0..TB)); token tt's partial sums go to
    red[ty, v, tt * (ks+1) + kl], and after one barrier lane tt adds them up: on return (for the
    lane that will write token tt) red[ty, 0|1|2, _total(tt, ts)] holds row r0 | row r1 | sum(x^2).
    The stride ks + 1 keeps the lanes that add up apart in shared memory's banks.
    Every thread of the block must call it (it synchronises)."""
    lane, ty, lanes = cuda.threadIdx.x, cuda.threadIdx.y, cuda.blockDim.x
    ks = lanes // ts
    kl, tl = lane % ks, lane // ks
    O, K = qs.shape[0] if fmt != F32 else w.shape[0], x.shape[1]
    acc0 = cuda.local.array(TB, float32)            # [TB] this lane's tokens, row r0
    acc1 = cuda.local.array(TB, float32)            # [TB] row r1
    ss = cuda.local.array(TB, float32)              # [TB] sum of x^2
    w8a = cuda.local.array(8, float32)
    w8b = cuda.local.array(8, float32)
    for j in range(TB):
        acc0[j] = float32(0.0)
        acc1[j] = float32(0.0)
        ss[j] = float32(0.0)
    hop = 12 if fmt == Q4 else 0                     # Q4: the high nibbles are 16 columns on
    for u in range(kl, K // 8, ks):
        k0 = 0
        for j in range(8):
            w8a[j] = float32(0.0)
            w8b[j] = float32(0.0)
        if r0 < O:
            k0 = _unpack8(fmt, w, qs, d, m, r0, u, w8a)
        if r1 < O:
            k0 = _unpack8(fmt, w, qs, d, m, r1, u, w8b)
        for j in range(8):
            if has_norm:
                gk = g[k0 + j + hop * (j >> 2)]
                w8a[j] *= gk
                w8b[j] *= gk
        for jt in range(TB):                        # the unit, once in registers, for each token
            if tl + jt * ts < nt:
                t = xr[jt]
                for j in range(8):
                    xv = x[t, k0 + j + hop * (j >> 2)]
                    acc0[jt] += w8a[j] * xv
                    acc1[jt] += w8b[j] * xv
                    ss[jt] += xv * xv
    for jt in range(TB):
        tt = tl + jt * ts
        if tt < nt:
            red[ty, 0, tt * (ks + 1) + kl] = acc0[jt]
            red[ty, 1, tt * (ks + 1) + kl] = acc1[jt]
            red[ty, 2, tt * (ks + 1) + kl] = ss[jt]
    cuda.syncthreads()
    for tt in range(lane, nt, lanes):               # lane tt adds up token tt's K-lanes
        a0, a1, a2 = float32(0.0), float32(0.0), float32(0.0)
        for i in range(ks):
            a0 += red[ty, 0, tt * (ks + 1) + i]
            a1 += red[ty, 1, tt * (ks + 1) + i]
            a2 += red[ty, 2, tt * (ks + 1) + i]
        red[ty, 0, tt * (ks + 1) + ks] = a0
        red[ty, 1, tt * (ks + 1) + ks] = a1
        red[ty, 2, tt * (ks + 1) + ks] = a2


@cuda.jit(device=True, inline=True)
def _norm_scale(red, ty, at, K, has_norm, eps):
    """1 / rms(x) of the token whose sums sit at red[ty, :, at] (1 when the kernel has no norm)."""
    if not has_norm:
        return float32(1.0)
    return float32(1.0) / float32(math.sqrt(red[ty, 2, at] / float32(K) + eps))


def pick_lanes(n_pairs: int, T: int) -> int:
    """Threads per row pair, from the work a launch has: row pairs x groups of TB tokens. With
    little work a whole warp per pair keeps enough threads busy; with much (the 49,152-row LM
    head; gate/up at many tokens) 8 lanes win: each lane has more units to add up, and the sum
    of the lanes' partials (one lane per token) is 4x shorter (docs/benchmarks.md, "GPU kernel
    shapes")."""
    return 32 if n_pairs * -(-T // TB) < 4096 else 8


def token_lanes(T: int, lanes: int, tile: int = TILE) -> int:
    """ts, the lanes that split a block's tokens: the fewest (a power of two) whose tile of
    ts * TB tokens holds the step's T rows — all lanes stay on K while there are few — up to
    `tile` tokens (and all the lanes)."""
    ts = 1
    while ts * TB < min(T, tile) and ts < lanes:
        ts *= 2
    return ts


def _grid(n_pairs: int, T: int, lanes: int | None, groups: int, tile: int):
    """-> grid, block, ts: blocks (row pairs / groups, tiles of ts * TB tokens)."""
    lanes = lanes or pick_lanes(n_pairs, T)
    ts = token_lanes(T, lanes, tile)
    return (-(-n_pairs // groups), -(-T // (ts * TB))), (lanes, groups), ts


# ---------------------------------------------------------------------------------------------
# linear_kernel: out[t] (+)= W · norm?(x[rows[t]]).  Plain matmul, LM head, W_o / W_down + residual.
#   grid  (ceil(ceil(O/2) / groups), ceil(T / (ts*TB)))   block (lanes, groups)
#   thread group y of block (bx, by) computes rows 2p, 2p+1 (p = bx*groups + y) for the tokens
#   by*ts*TB .. (by+1)*ts*TB - 1; after the reduction, lane j writes the outputs of tokens
#   j, j+lanes, ... of that tile.
# ---------------------------------------------------------------------------------------------
@cuda.jit
def linear_kernel(x, rows, g, eps, has_norm, fmt, w, qs, d, m, out, accumulate, ts):
    red = cuda.shared.array((MAX_GROUPS, 3, RED), float32)
    xr = cuda.local.array(TB, int32)
    T, O = out.shape
    ty, lane = cuda.threadIdx.y, cuda.threadIdx.x
    r0 = 2 * (cuda.blockIdx.x * cuda.blockDim.y + ty)
    t0, nt, tl = _tile(T, ts, xr)
    for j in range(TB):                             # the x row of each of this lane's tokens
        if tl + j * ts < nt:
            xr[j] = rows[xr[j]]
    _pair_dots(x, xr, nt, ts, g, has_norm, fmt, w, qs, d, m, r0, r0 + 1, red)
    for tt in range(lane, nt, cuda.blockDim.x):     # lane tt writes token tt's two outputs
        at = _total(tt, ts)
        scale = _norm_scale(red, ty, at, x.shape[1], has_norm, eps)
        for h in range(2):
            if r0 + h < O:
                v = red[ty, h, at] * scale
                if accumulate:
                    v += out[t0 + tt, r0 + h]
                out[t0 + tt, r0 + h] = v


def linear_cuda(x, W: DeviceMatrix, out, rows, norm=None, eps=0.0, accumulate=False,
                lanes=None, groups=GROUPS, tile=TILE, stream=0):
    """out [T, O] (+)= W · rmsnorm(x[rows[t]], norm, eps), all device arrays: x [*, K], rows int32
    [>= T] (an arange for a plain matmul), norm float32 [K] or None (no norm). tile: the most
    tokens a block takes (a step of up to `tile` rows reads each weight once)."""
    T, O = out.shape
    grid, block, ts = _grid(-(-O // 2), T, lanes, groups, tile)
    g = norm if norm is not None else W.d.reshape(W.d.size)   # unused without a norm, but typed: 1-D f32
    linear_kernel[grid, block, stream](x, rows, g, float32(eps), norm is not None, *W.arrays, out,
                                       accumulate, ts)


# ---------------------------------------------------------------------------------------------
# swiglu_kernel: h[t, i] = silu(gate_i · n(x_t)) * (up_i · n(x_t)), n = RMSNorm; W = [W_gate; W_up]
#   grid  (ceil(F / groups), ceil(T / (ts*TB)))   block (lanes, groups)
#   thread group y computes the pair (gate row i, up row F + i), i = bx*groups + y.
# ---------------------------------------------------------------------------------------------
@cuda.jit
def swiglu_kernel(x, g, eps, fmt, w, qs, d, m, h, ts):
    red = cuda.shared.array((MAX_GROUPS, 3, RED), float32)
    xr = cuda.local.array(TB, int32)
    T, F = h.shape
    ty, lane = cuda.threadIdx.y, cuda.threadIdx.x
    i = cuda.blockIdx.x * cuda.blockDim.y + ty
    t0, nt, tl = _tile(T, ts, xr)
    r0, r1 = (i, F + i) if i < F else (2 * F, 2 * F)   # an out-of-range group computes nothing
    _pair_dots(x, xr, nt, ts, g, True, fmt, w, qs, d, m, r0, r1, red)
    for tt in range(lane, nt if i < F else 0, cuda.blockDim.x):
        at = _total(tt, ts)
        scale = _norm_scale(red, ty, at, x.shape[1], True, eps)
        gate, up = red[ty, 0, at] * scale, red[ty, 1, at] * scale
        h[t0 + tt, i] = silu_cuda(gate) * up


def swiglu_cuda(x, norm, eps, W_gate_up: DeviceMatrix, h, lanes=None, groups=GROUPS, tile=TILE,
                stream=0):
    """h [T, F] = silu(W_gate n(x)) * (W_up n(x)); W_gate_up: the two stacked [2F, D]."""
    T, F = h.shape
    grid, block, ts = _grid(F, T, lanes, groups, tile)
    swiglu_kernel[grid, block, stream](x, norm, float32(eps), *W_gate_up.arrays, h, ts)


# ---------------------------------------------------------------------------------------------
# qkv_kernel: [q | k | v] = W_qkv · n(x_t); RoPE on q and k; k, v stored in the cache at slot[t].
#   grid  (ceil((qd + 2 kvd)/2 / groups), ceil(T / (ts*TB)))   block (lanes, groups)
#   thread group y computes output rows 2p, 2p+1: a RoPE pair (heads never split a pair).
#   Rows [0, qd) are q, [qd, qd+kvd) k, the rest v. cos/sin: tables [max_pos, hd/2].
# ---------------------------------------------------------------------------------------------
@cuda.jit
def qkv_kernel(x, g, eps, fmt, w, qs, d, m, positions, slots, cos_t, sin_t, q, k_cache, v_cache,
               layer, ts):
    red = cuda.shared.array((MAX_GROUPS, 3, RED), float32)
    xr = cuda.local.array(TB, int32)
    T, qd = q.shape
    bs, n_kv, hd = k_cache.shape[2], k_cache.shape[3], k_cache.shape[4]
    kvd = n_kv * hd
    ty, lane = cuda.threadIdx.y, cuda.threadIdx.x
    r0 = 2 * (cuda.blockIdx.x * cuda.blockDim.y + ty)
    t0, nt, tl = _tile(T, ts, xr)
    _pair_dots(x, xr, nt, ts, g, True, fmt, w, qs, d, m, r0, r0 + 1, red)
    for tt in range(lane, nt if r0 < qd + 2 * kvd else 0, cuda.blockDim.x):
        t = t0 + tt
        at = _total(tt, ts)
        scale = _norm_scale(red, ty, at, x.shape[1], True, eps)
        a, b = red[ty, 0, at] * scale, red[ty, 1, at] * scale
        if r0 < qd + kvd:                            # q or k: rotate the pair by its angle
            pair = (r0 % hd) // 2
            a, b = rope_rotate_cuda(a, b, cos_t[positions[t], pair], sin_t[positions[t], pair])
        if r0 < qd:
            q[t, r0] = a
            q[t, r0 + 1] = b
        else:
            blk, row = slots[t] // bs, slots[t] % bs
            rr = (r0 - qd) % kvd                     # row within k (or within v)
            head, i = rr // hd, rr % hd
            cache = k_cache if r0 < qd + kvd else v_cache
            cache[layer, blk, row, head, i] = a
            cache[layer, blk, row, head, i + 1] = b


def qkv_cuda(x, norm, eps, W_qkv: DeviceMatrix, positions, slots, cos_t, sin_t, q, k_cache, v_cache,
             layer, lanes=None, groups=GROUPS, tile=TILE, stream=0):
    """q [T, Hq*hd] (roped) and, in the cache [L, n_blocks, bs, Hkv, hd], layer `layer`'s k
    (roped) and v at each token's slot; W_qkv: wq, wk, wv stacked [Hq*hd + 2*Hkv*hd, D]."""
    T = q.shape[0]
    grid, block, ts = _grid(W_qkv.shape[0] // 2, T, lanes, groups, tile)
    qkv_kernel[grid, block, stream](x, norm, float32(eps), *W_qkv.arrays, positions, slots, cos_t,
                                    sin_t, q, k_cache, v_cache, layer, ts)
