"""The layers of a step in ONE parallel region, the threads kept together: the numba backend's step.

model.py's loop, run on the numba kernels stage by stage, would open a parallel loop for each
matmul and each attention — ~150 a decode step of SmolLM2-135M — and each start, ramp-up and join
costs the threads a few microseconds. llama.cpp keeps its threads for the whole graph and meets
them at barriers; so does this module (faster decode end to end; docs/benchmarks.md). The final
norm and the LM head are its last stage, so a decode step is three compiled calls — the
embedding, the RoPE angles, then this region through to the logits — and little Python
(cpu/model.py makes them, cpu/formats.py picks the kernels):

    for each thread, in one prange:                  work of a stage = items (tiles of rows,
        for each layer:                              attention jobs), which the threads claim
            h = rmsnorm(x)          (every thread)   from a shared counter: fetch-and-add
            claim QKV tiles      -> y                gives each item to exactly one thread
            claim the RoPE items -> q, cache         and counts the items done in another;
            claim attention jobs -> slices           before reading what a stage wrote, a
            a = merge(slices)       (every thread)   thread waits until its done count is full
            claim wo tiles       -> x +=
            h = rmsnorm(x)          (every thread)
            claim gate/up tiles  -> g
            claim down tiles     -> x +=
        h = rmsnorm(x[rows])        (every thread)   rows: the batch's logits rows
        claim LM head tiles  -> logits               (none: model.forward does the two)

The barrier waits for *work*, not for threads: a thread never waits for one that has not started.
Had the runtime run the prange's iterations one after another, the first would do every item
and the others would find none left, instead of spinning forever.

What each thread computes for itself (a norm of x, x cut into int8 parts, the attention slices
merged) is a few thousand flops, cheaper than another wait; a thread that finds a stage's items
all taken skips it. It is safe because a thread reads only what finished stages wrote, and
writes shared arrays only inside an item it claimed: if a slow thread's own copy was computed
while a later stage was already overwriting its inputs, then every item of its stage had been
claimed before, and the copy goes unused.

The matmuls, by kernel kind and rows: the float kernels of quant.py (a CPU without VNNI) for a
few rows; the panels of quant_panel.py (int8 x, or x in three int8 parts) below
KernelConfig.many_rows — their byte products on the CPU's tile unit (quant_amx.py) from
KernelConfig.tile_unit_rows on, where it has one; from many_rows on (a batch of sequences, tokens
to verify, a prompt) tiles of weight rows that quant_gemm.py decodes once for all the rows. Each is the same function of the weights
as model.py's loop (tests/test_fused.py, tests/test_quant_gemm.py, tests/test_quant_panel.py).
Attention's jobs put a tile's query vectors in the lanes of a vector from
KernelConfig.attention_lane_rows rows on. `many`: (many_rows, tile_unit_rows, attention_lane_rows)
of the step's kind.
"""
from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..stages import attention, quant, quant_i8
from ..stages.fastexp import exp32
from ..stages.rmsnorm import rmsnorm_numba
from ..stages.rope import rope_head
from ..stages.simd import _add16, _silu_mul16
from . import quant_amx, quant_gemm, quant_panel
from .formats import Q8


# ---------------------------------------------------------------------------------------------
# Atomics: numba has none on the CPU, so two LLVM instructions of our own. ctr is an int64
# array; counters sit 64 bytes apart (STRIDE) so that two of them never share a cache line.
# ---------------------------------------------------------------------------------------------
STRIDE = 8
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _ptr(context, builder, arrty, arr, i):
    return builder.gep(context.make_array(arrty)(context, builder, arr).data, [i])


@intrinsic
def _fetch_add(typingctx, ctr, i, k):
    """ctr[i] += k, atomically; -> the value before."""
    def codegen(context, builder, sig, args):
        ptr = _ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.atomic_rmw("add", ptr, args[2], "acq_rel")
    return types.int64(ctr, i, types.int64), codegen


@intrinsic
def _load(typingctx, ctr, i):
    """ctr[i], with everything written before the add that stored it visible after."""
    def codegen(context, builder, sig, args):
        return builder.load_atomic(_ptr(context, builder, sig.args[0], args[0], args[1]), "acquire", 8)
    return types.int64(ctr, i), codegen


@intrinsic
def _pause(typingctx):
    """x86's spin-wait hint: the waiting loop yields the core's pipeline to its sibling."""
    def codegen(context, builder, sig, args):
        if _X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()
    return types.none(), codegen


# ---------------------------------------------------------------------------------------------
# Claiming. Stage s has n items; thread w of nw owns the share w n / nw .. (w + 1) n / nw - 1 and
# takes its items in order, so each thread streams through its own contiguous rows of a matrix
# (and the kernels' prefetch, a few rows ahead, fetches rows it will use). Interleaved items
# broke those streams (slower). A thread whose share is done takes from the others' — a thread
# that lags, or one that never came. Counters per stage: nw + 1 (claimed of each share, done),
# each on a cache line of its own.
# ---------------------------------------------------------------------------------------------
@njit(inline="always")
def _counter(s, v, nw):
    return (s * (nw + 1) + v) * STRIDE


@njit(inline="always")
def _next(ctr, s, w, nw, n):
    """The next items of stage s for thread w: (i0, i1), or (-1, -1) when all n are taken. Half
    of what is left of a share at a time: fewer, longer kernel calls (each call has a fixed cost), and
    still single items at the end, where the threads meet."""
    for k in range(nw):
        v = (w + k) % nw
        first, end = v * n // nw, (v + 1) * n // nw
        c = _counter(s, v, nw)
        left = end - first - _load(ctr, c)    # a plain read first: no write to a line for nothing
        if left > 0:
            take = max(1, left // 2) if v == w else 1
            i = first + _fetch_add(ctr, c, take)
            if i < end:
                return i, min(i + take, end)
    return -1, -1


@njit(inline="always")
def _left(ctr, s, nw, n):
    """Are items of stage s still unclaimed?"""
    for v in range(nw):
        if v * n // nw + _load(ctr, _counter(s, v, nw)) < (v + 1) * n // nw:
            return True
    return False


@njit(inline="always")
def _finish(ctr, s, nw, n, k):
    """This thread did k items of stage s: count them, and wait until all n are done."""
    c = _counter(s, nw, nw)
    if k:
        _fetch_add(ctr, c, k)
    while _load(ctr, c) < n:
        _pause()


# ---------------------------------------------------------------------------------------------
# The stages. A matmul: out = res + x @ W[l]^T, [T, K] -> [T, O], where res is x itself (the
# residual add, in place) or all zeros (0 + v is v exactly: one code path, one compiled kernel
# for both). An item is a tile of rows (quant_i8._tiles), computed by the float kernels of
# quant.py, or a tile of panels (below), a stage function for each. C = (ctr, s, wi, nw): the counters,
# this stage, this thread, the threads. (Each stage is a function of its own, not inlined: numba
# copies a function's IR at every inlined call, and the step inlined whole took far longer to compile.)
# ---------------------------------------------------------------------------------------------
@njit(inline="always")
def _add(out, res, y, o0, o1, c):
    """out[:, o0:o1] = res + y's columns o0 - c .. o1 - c (c: where y's tile starts). 16 columns
    an instruction: written as a plain loop, numba's checks on each index (a negative one counts
    from the end) kept it scalar (docs/benchmarks.md, "CPU kernel details")."""
    N, Nr, Y = out.shape[1], res.shape[1], y.shape[1]
    for t in range(y.shape[0]):
        o = o0
        while o + 16 <= o1:
            _add16(out, t * N + o, res, t * Nr + o, y, t * Y + o - c)
            o += 16
        for j in range(o, o1):
            out[t, j] = res[t, j] + y[t, j - c]


@njit(inline="always")
def _silu_mul(out, yg, yu, o0, o1, c):
    """out[:, o0:o1] = silu(gate) * up, from yg's and yu's columns o0 - c .. o1 - c, 16 columns
    an instruction (simd._silu_mul16). (The stages that call it compile with error_model="numpy":
    under Python's rules each float division checks its divisor for zero, to raise, and that
    branch keeps the tail's loop from vector code.)"""
    N, Y = out.shape[1], yg.shape[1]
    for t in range(yg.shape[0]):
        o = o0
        while o + 16 <= o1:
            _silu_mul16(out, t * N + o, yg, t * Y + o - c, yu, t * Y + o - c)
            o += 16
        for j in range(o, o1):
            v = yg[t, j - c]
            out[t, j] = v / (np.float32(1.0) + exp32(-v)) * yu[t, j - c]


@njit(fastmath=True, cache=True)
def _matmul_q8(x, w, l, out, res, C):
    ctr, s, wi, nw = C
    qs, d = w[0][l].view(np.int8), w[1][l]
    T, O = x.shape[0], qs.shape[0]
    n, k = quant_i8._tiles(O), 0
    y = np.empty((T, O), dtype=np.float32)
    i0, i1 = _next(ctr, s, wi, nw, n)
    while i0 >= 0:
        o0, o1 = i0 * O // n, i1 * O // n
        quant._q8_0_rows(x, qs, d, o0, o1, y)
        _add(out, res, y, o0, o1, 0)
        k += i1 - i0
        i0, i1 = _next(ctr, s, wi, nw, n)
    _finish(ctr, s, nw, n, k)


@njit(fastmath=True, cache=True)
def _matmul_q4(x, w, l, out, res, C):
    ctr, s, wi, nw = C
    qs, d, m = w[0][l].view(np.uint8), w[1][l], w[2][l]
    T, O = x.shape[0], qs.shape[0]
    n, k = quant_i8._tiles(O), 0
    if _left(ctr, s, nw, n):
        xl, xh2, xsum = quant._split_q4(x)
        y = np.empty((T, O), dtype=np.float32)
        i0, i1 = _next(ctr, s, wi, nw, n)
        while i0 >= 0:
            o0, o1 = i0 * O // n, i1 * O // n
            quant._q4_rows(xl, xh2, xsum, qs, d, m, o0, o1, y)
            _add(out, res, y, o0, o1, 0)
            k += i1 - i0
            i0, i1 = _next(ctr, s, wi, nw, n)
    _finish(ctr, s, nw, n, k)


# silu(x Wg^T) * (x Wu^T) -> out [T, F]; an item is a tile of rows of both.
@njit(fastmath=True, cache=True, error_model="numpy")
def _gate_up_q8(x, g, u, l, out, C):
    ctr, s, wi, nw = C
    F = g[0].shape[1]
    n, k = quant_i8._tiles(F), 0
    i0, i1 = _next(ctr, s, wi, nw, n)
    while i0 >= 0:
        quant._q8_0_gate_up_rows(x, g[0][l].view(np.int8), g[1][l], u[0][l].view(np.int8), u[1][l],
                                 i0 * F // n, i1 * F // n, out)
        k += i1 - i0
        i0, i1 = _next(ctr, s, wi, nw, n)
    _finish(ctr, s, nw, n, k)


@njit(fastmath=True, cache=True, error_model="numpy")
def _gate_up_q4(x, g, u, l, out, C):
    ctr, s, wi, nw = C
    F = g[0].shape[1]
    n, k = quant_i8._tiles(F), 0
    if _left(ctr, s, nw, n):
        xl, xh2, xsum = quant._split_q4(x)
        i0, i1 = _next(ctr, s, wi, nw, n)
        while i0 >= 0:
            quant._q4_gate_up_rows(xl, xh2, xsum, g[0][l].view(np.uint8), g[1][l], g[2][l],
                                   u[0][l].view(np.uint8), u[1][l], u[2][l], i0 * F // n,
                                   i1 * F // n, out)
            k += i1 - i0
            i0, i1 = _next(ctr, s, wi, nw, n)
    _finish(ctr, s, nw, n, k)


# Many rows (a batch of sequences, tokens to verify, a chunk of a prompt): quant_gemm's tiles,
# each weight row dequantized once for all the rows of x. An item is a tile of weight rows, as
# above; the thread decodes it STRIP rows at a time into its own buffer.
@njit(cache=True, error_model="numpy")
def _matmul_rows(x, w, l, out, res, C):
    ctr, s, wi, nw = C
    qs, d, m = w[0][l].view(np.uint8), w[1][l], w[2][l]
    T, O = x.shape[0], qs.shape[0]
    n, k = quant_i8._tiles(O), 0
    if _left(ctr, s, nw, n):
        xa = quant_gemm.aligned(T, x.shape[1])                 # x on cache lines (quant_gemm)
        xa[:] = x
        buf = quant_gemm.aligned(quant_gemm.STRIP, x.shape[1])
        y = np.empty((T, (O + n - 1) // n + 1), dtype=np.float32)       # one tile's columns
        i0, i1 = _next(ctr, s, wi, nw, n)
        while i0 >= 0:
            for i in range(i0, i1):
                o0, o1 = i * O // n, (i + 1) * O // n
                quant_gemm.tile(xa, qs, d, m, o0, o1, buf, y, 0)
                _add(out, res, y, o0, o1, o0)
            k += i1 - i0
            i0, i1 = _next(ctr, s, wi, nw, n)
    _finish(ctr, s, nw, n, k)


@njit(cache=True, error_model="numpy")
def _gate_up_rows(x, g, u, l, out, C):
    ctr, s, wi, nw = C
    T, F = x.shape[0], g[0].shape[1]
    n, k = quant_i8._tiles(F), 0
    if _left(ctr, s, nw, n):
        xa = quant_gemm.aligned(T, x.shape[1])
        xa[:] = x
        buf = quant_gemm.aligned(quant_gemm.STRIP, x.shape[1])
        cols = (F + n - 1) // n + 1
        yg = np.empty((T, cols), dtype=np.float32)
        yu = np.empty((T, cols), dtype=np.float32)
        i0, i1 = _next(ctr, s, wi, nw, n)
        while i0 >= 0:
            for i in range(i0, i1):
                o0, o1 = i * F // n, (i + 1) * F // n
                quant_gemm.tile(xa, g[0][l].view(np.uint8), g[1][l], g[2][l], o0, o1, buf, yg, 0)
                quant_gemm.tile(xa, u[0][l].view(np.uint8), u[1][l], u[2][l], o0, o1, buf, yu, 0)
                _silu_mul(out, yg, yu, o0, o1, o0)
            k += i1 - i0
            i0, i1 = _next(ctr, s, wi, nw, n)
    _finish(ctr, s, nw, n, k)


# int8 activations: the weights in panels of 16 rows (quant_panel.py), at any number of rows.
# An item is a tile of panels. A kernel call takes a claimed range's items up to SPAN panels:
# each call has a fixed cost — on the tile unit (quant_amx.py) its pipeline to fill, and on
# either its arguments' reference counts, which numba changes atomically: views of the weights
# that both threads read share one count, whose cache line then moves between the cores.
SPAN = 16


@njit(inline="always")
def _span(i, i1, P, n):
    """Where the call that starts at item i of a claimed range i..i1-1 ends."""
    j = i + 1
    while j < i1 and (j + 1) * P // n - i * P // n <= SPAN:
        j += 1
    return j


@njit(cache=True, error_model="numpy")
def _matmul_panels(x, w, l, limbs, out, res, C, amx, work):
    ctr, s, wi, nw = C
    qp, d, m = w[3][l], w[4][l], w[5][l]
    T, P = x.shape[0], qp.shape[0]
    n, k, tu = quant_i8._tiles(P), 0, T >= amx
    if _left(ctr, s, nw, n):
        xi = quant_panel.prepare_x(x, m.ndim == 1, limbs)
        y = np.empty((T, quant_panel.ROWS * (max((P + n - 1) // n, SPAN) + 1)), dtype=np.float32)
        i0, i1 = _next(ctr, s, wi, nw, n)
        while i0 >= 0:
            i = i0
            while i < i1:
                j = _span(i, i1, P, n)
                p0, p1 = i * P // n, j * P // n
                if tu:                         # the byte products on the tile unit
                    quant_amx.tile(xi, qp, d, m, p0, p1, y, 0, work)
                else:
                    quant_panel.tile(xi, qp, d, m, p0, p1, y, 0)
                o0, o1 = quant_panel.ROWS * p0, min(quant_panel.ROWS * p1, out.shape[1])
                _add(out, res, y, o0, o1, o0)
                i = j
            k += i1 - i0
            i0, i1 = _next(ctr, s, wi, nw, n)
    _finish(ctr, s, nw, n, k)


@njit(cache=True, error_model="numpy")
def _gate_up_panels(x, g, u, l, limbs, out, C, amx, work):
    ctr, s, wi, nw = C
    gq, gd, gm, uq, ud, um = g[3][l], g[4][l], g[5][l], u[3][l], u[4][l], u[5][l]
    T, P = x.shape[0], gq.shape[0]
    n, k, tu = quant_i8._tiles(P), 0, T >= amx
    if _left(ctr, s, nw, n):
        xi = quant_panel.prepare_x(x, gm.ndim == 1, limbs)
        cols = quant_panel.ROWS * (max((P + n - 1) // n, SPAN) + 1)
        yg = np.empty((T, cols), dtype=np.float32)
        yu = np.empty((T, cols), dtype=np.float32)
        i0, i1 = _next(ctr, s, wi, nw, n)
        while i0 >= 0:
            i = i0
            while i < i1:
                j = _span(i, i1, P, n)
                p0, p1 = i * P // n, j * P // n
                if tu:
                    quant_amx.tile(xi, gq, gd, gm, p0, p1, yg, 0, work)
                    quant_amx.tile(xi, uq, ud, um, p0, p1, yu, 0, work)
                else:
                    quant_panel.tile(xi, gq, gd, gm, p0, p1, yg, 0)
                    quant_panel.tile(xi, uq, ud, um, p0, p1, yu, 0)
                o0, o1 = quant_panel.ROWS * p0, min(quant_panel.ROWS * p1, out.shape[1])
                _silu_mul(out, yg, yu, o0, o1, o0)
                i = j
            k += i1 - i0
            i0, i1 = _next(ctr, s, wi, nw, n)
    _finish(ctr, s, nw, n, k)


@njit(inline="always")
def _panels(T, limbs, many):
    """Does a matmul of T rows read the panels? With int8 x, always; with x in three int8
    parts, below the crossover to the float tiles. many: (that crossover, the tile unit's, the
    thread's quant_amx.workspace())."""
    return limbs == 1 or (limbs == 3 and T < many[0])


@njit(inline="always")
def _items(w, T, limbs, many):
    """How many items a matmul stage of w has (tiles of panels, or of rows)."""
    return quant_i8._tiles(w[3].shape[1] if _panels(T, limbs, many) else w[0].shape[1])


@njit(inline="always")
def _matmul(x, w, l, kind, limbs, out, res, C, many):
    if limbs:                                 # kind and limbs are constants: few branches compile
        if _panels(x.shape[0], limbs, many):
            _matmul_panels(x, w, l, limbs, out, res, C, many[1], many[2])
        else:                                 # many rows: the weights decoded once for all
            _matmul_rows(x, w, l, out, res, C)
    elif x.shape[0] >= many[0]:
        _matmul_rows(x, w, l, out, res, C)
    elif kind == Q8:
        _matmul_q8(x, w, l, out, res, C)
    else:
        _matmul_q4(x, w, l, out, res, C)


@njit(inline="always")
def _gate_up(x, g, u, l, kind, limbs, out, C, many):
    if limbs:
        if _panels(x.shape[0], limbs, many):
            _gate_up_panels(x, g, u, l, limbs, out, C, many[1], many[2])
        else:
            _gate_up_rows(x, g, u, l, out, C)
    elif x.shape[0] >= many[0]:
        _gate_up_rows(x, g, u, l, out, C)
    elif kind == Q8:
        _gate_up_q8(x, g, u, l, out, C)
    else:
        _gate_up_q4(x, g, u, l, out, C)


@njit(cache=True)
def _rope_cache(y, q, cos, sin, k_cache, v_cache, slot_mapping, C):
    """Two items, one a thread: RoPE on q (kept for attention); RoPE on k, and k and v written to
    their slots in the cache. (As one item the other thread waited for all of it, every layer.)
    Each head rotated straight from y to where it goes (rope.rope_head): no copies between."""
    ctr, s, wi, nw = C
    T, n_heads, hd = q.shape
    qd, kvd, bs = n_heads * hd, (y.shape[1] - n_heads * hd) // 2, k_cache.shape[1]
    k = 0
    i0, i1 = _next(ctr, s, wi, nw, 2)
    while i0 >= 0:
        for item in range(i0, i1):
            for t in range(T):
                if item == 0:
                    for h in range(n_heads):
                        rope_head(y[t, h * hd:(h + 1) * hd], q[t, h], cos[t], sin[t])
                else:
                    blk, row = slot_mapping[t] // bs, slot_mapping[t] % bs
                    for h in range(kvd // hd):
                        rope_head(y[t, qd + h * hd:qd + (h + 1) * hd], k_cache[blk, row, h], cos[t], sin[t])
                        v_cache[blk, row, h] = y[t, qd + kvd + h * hd:qd + kvd + (h + 1) * hd]
        k += i1 - i0
        i0, i1 = _next(ctr, s, wi, nw, 2)
    _finish(ctr, s, nw, 2, k)


@njit(cache=True)
def _attention(q, k_cache, v_cache, row_seq, positions, block_tables, parts, C, lane_rows):
    """The (tile of rows, slice of keys) jobs of attention._attention_job, an item each."""
    ctr, s, wi, nw = C
    S = parts[0].shape[1]
    n, k = attention._n_tiles(row_seq, positions, S, k_cache.shape[1]) * S, 0     # tiles x S
    j0, j1 = _next(ctr, s, wi, nw, n)
    while j0 >= 0:
        for j in range(j0, j1):
            attention._attention_job(q, k_cache, v_cache, row_seq, positions, block_tables, j, parts,
                                     lane_rows)
        k += j1 - j0
        j0, j1 = _next(ctr, s, wi, nw, n)
    _finish(ctr, s, nw, n, k)


# ---------------------------------------------------------------------------------------------
# The step, as one thread walks it: cpu/formats.py's arguments, and the shared arrays (QKV, q after
# RoPE, the attention jobs' parts, silu(gate) * up, the counters); wi: this thread, of nw.
# Six stages a layer, s = 6 l + 0..5, then the LM head.
# ---------------------------------------------------------------------------------------------
@njit(inline="always")
def _walk(x, cos, sin, f, n_heads, n_kv_heads, eps, kind, limbs, wi, nw, many):
    W, kv, B, shared, head = _nest(f)
    attn_norm, wqkv, wo, ffn_norm, w_gate, w_up, w_down = W
    k_cache, v_cache = kv
    row_seq, positions, block_tables, slot_mapping = B
    y, q, parts, g, ctr, zeros = shared
    T, qd = x.shape[0], q.shape[1] * q.shape[2]
    mw = (many[0], many[1], quant_amx.workspace())   # this thread's buffers for the tile unit
    for l in range(attn_norm.shape[0]):
        s = 6 * l
        # --- attention block ---------------------------------------------------------------
        h = rmsnorm_numba(x, attn_norm[l], eps)                                   # [T, D]
        _matmul(h, wqkv, l, kind, limbs, y, zeros, (ctr, s, wi, nw), mw)         # [T, qd + 2 kvd]
        _rope_cache(y, q, cos, sin, k_cache[l], v_cache[l], slot_mapping, (ctr, s + 1, wi, nw))
        _attention(q, k_cache[l], v_cache[l], row_seq, positions, block_tables, parts,
                   (ctr, s + 2, wi, nw), many[2])
        a = q.reshape(T, qd)                   # (a placeholder for a thread with nothing left)
        if _left(ctr, s + 3, nw, _items(wo, T, limbs, mw)):
            a = attention._merge_slices(q, parts).reshape(T, qd)                 # [T, qd]
        _matmul(a, wo, l, kind, limbs, x, x, (ctr, s + 3, wi, nw), mw)            # x += [T, D]
        # --- MLP block ---------------------------------------------------------------------
        h = rmsnorm_numba(x, ffn_norm[l], eps)                                    # [T, D]
        _gate_up(h, w_gate, w_up, l, kind, limbs, g, (ctr, s + 4, wi, nw), mw)    # [T, F]
        _matmul(g, w_down, l, kind, limbs, x, x, (ctr, s + 5, wi, nw), mw)        # x += [T, D]
    # --- final norm and LM head, for the logits rows (none: model.forward does them) ---------
    norm, lm, rows, logits = head
    if rows.shape[0] > 0:
        h = rmsnorm_numba(x[rows], norm, eps)                                    # [R, D]
        _matmul(h, lm, 0, kind, limbs, logits, logits, (ctr, 6 * attn_norm.shape[0], wi, nw),
                mw)                                                    # [R, V]
    quant_amx.done(mw[2])


# One compiled walk per kind of kernel (cpu/formats.py): `kind` and `limbs` are constants in each,
# and only the kernels of that kind compile.
@njit(cache=True)
def _walk_q4(x, cos, sin, f, n_heads, n_kv_heads, eps, wi, nw, many):
    _walk(x, cos, sin, f, n_heads, n_kv_heads, eps, 0, 0, wi, nw, many)


@njit(cache=True)
def _walk_q8(x, cos, sin, f, n_heads, n_kv_heads, eps, wi, nw, many):
    _walk(x, cos, sin, f, n_heads, n_kv_heads, eps, 1, 0, wi, nw, many)


@njit(cache=True)
def _walk_i8(x, cos, sin, f, n_heads, n_kv_heads, eps, wi, nw, many):
    _walk(x, cos, sin, f, n_heads, n_kv_heads, eps, 2, 1, wi, nw, many)


@njit(cache=True)
def _walk_split(x, cos, sin, f, n_heads, n_kv_heads, eps, wi, nw, many):
    _walk(x, cos, sin, f, n_heads, n_kv_heads, eps, 3, 3, wi, nw, many)


# The region: the shared arrays, then one prange iteration a thread, each walking the whole step.
# (The walk is a function of its own: a parallel function's body goes through numba's parfor
# passes, which were slow on the walk inlined there. And a parallel loop cannot take nested
# tuples of arrays in: all the arrays go in as one flat tuple, nested again inside the walk.)
@njit(inline="always")
def _flat(x, W, kv, B, head, rows, n_heads, n_kv_heads, nw, slices):
    attn_norm, wqkv, wo, ffn_norm, w_gate, w_up, w_down = W
    norm, lm = head
    T, hd, F = x.shape[0], kv[0].shape[-1], w_up[0].shape[1]
    # attention's key slices a tile: the model's thread count, so that each thread's share of the
    # jobs holds a slice of every tile, the same work (rows of unequal contexts side by side:
    # tokens to verify next to decode rows, a prompt's triangle) — and the same number whatever
    # the step and however many workers run it (fewer where other programs take cores:
    # cpu/contention.py), so that a row's slices (attention._cut) do not depend on either
    S = slices
    m_part, l_part, o_part = attention._slices(T, S, n_heads, hd)
    shared = (np.empty((T, (n_heads + 2 * n_kv_heads) * hd), dtype=np.float32),  # QKV
              np.empty((T, n_heads, hd), dtype=np.float32),    # [T, Hq, hd]  q after RoPE
              m_part, l_part, o_part,                          # each attention job's result
              np.empty((T, F), dtype=np.float32),              # [T, F]  silu(gate) * up
              np.zeros(_counter(6 * attn_norm.shape[0] + 1, 0, nw), dtype=np.int64),  # counters
              np.zeros((T, (n_heads + 2 * n_kv_heads) * hd), dtype=np.float32))   # QKV's "residual"
    logits = np.zeros((rows.shape[0], lm[0].shape[1]), dtype=np.float32)   # [R, V] (0 + v is v)
    # 3 norms, 6 matrices of 6 arrays, the cache's 2, the batch's 4, 8 shared ones, rows, logits
    return ((attn_norm, ffn_norm, norm) + wqkv + wo + w_gate + w_up + w_down + lm + kv + B
            + shared + (rows, logits))


@njit(inline="always")
def _nest(f):
    W = (f[0], f[3:9], f[9:15], f[1], f[15:21], f[21:27], f[27:33])
    shared = (f[45], f[46], f[47:50], f[50], f[51], f[52])
    head = (f[2], f[33:39], f[53], f[54])
    return W, f[39:41], f[41:45], shared, head


@njit(parallel=True, cache=True)
def _region_q4(x, cos, sin, W, kv, B, n_heads, n_kv_heads, eps, head, rows, nw, slices, many):
    x = x.copy()                                               # [T, D]  the residual stream
    f = _flat(x, W, kv, B, head, rows, n_heads, n_kv_heads, nw, slices)
    for wi in prange(nw):
        _walk_q4(x, cos, sin, f, n_heads, n_kv_heads, eps, np.int64(wi), nw, many)   # (wi: uint64)
    return x, f[54]                                            # [T, D], logits [R, V]


@njit(parallel=True, cache=True)
def _region_q8(x, cos, sin, W, kv, B, n_heads, n_kv_heads, eps, head, rows, nw, slices, many):
    x = x.copy()                                               # [T, D]  the residual stream
    f = _flat(x, W, kv, B, head, rows, n_heads, n_kv_heads, nw, slices)
    for wi in prange(nw):
        _walk_q8(x, cos, sin, f, n_heads, n_kv_heads, eps, np.int64(wi), nw, many)   # (wi: uint64)
    return x, f[54]                                            # [T, D], logits [R, V]


@njit(parallel=True, cache=True)
def _region_i8(x, cos, sin, W, kv, B, n_heads, n_kv_heads, eps, head, rows, nw, slices, many):
    x = x.copy()                                               # [T, D]  the residual stream
    f = _flat(x, W, kv, B, head, rows, n_heads, n_kv_heads, nw, slices)
    for wi in prange(nw):
        _walk_i8(x, cos, sin, f, n_heads, n_kv_heads, eps, np.int64(wi), nw, many)   # (wi: uint64)
    return x, f[54]                                            # [T, D], logits [R, V]


@njit(parallel=True, cache=True)
def _region_split(x, cos, sin, W, kv, B, n_heads, n_kv_heads, eps, head, rows, nw, slices, many):
    x = x.copy()                                               # [T, D]  the residual stream
    f = _flat(x, W, kv, B, head, rows, n_heads, n_kv_heads, nw, slices)
    for wi in prange(nw):
        _walk_split(x, cos, sin, f, n_heads, n_kv_heads, eps, np.int64(wi), nw, many)   # (wi: uint64)
    return x, f[54]                                            # [T, D], logits [R, V]


ENTRY = (_region_q4, _region_q8, _region_i8, _region_split)     # by formats' Q4, Q8, INT8, SPLIT
