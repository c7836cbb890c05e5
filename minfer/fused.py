"""All the layers of a decode step in one compiled call — the numba backend's fast path.

model.forward is the spec: for each layer it calls ~15 stage functions from Python. In a decode
step of SmolLM2-135M each of those calls does a few microseconds of arithmetic, and the calls
themselves (the interpreter, argument unboxing, NumPy temporaries) cost a good share of the step,
as a model of the same 30 layers but width 64, whose arithmetic is next to nothing, shows.
`_loop` is the same loop body as model.run_layers, written inside one @njit function, so Python
runs once per step instead of ~450 times. The stage kernels are the very same functions
(their parallel loops still share the rows out to the threads); only the loop over layers moved.
The next step, region.py, keeps the threads in one parallel region for the whole loop.

It takes each kind of layer weight as one stack [L, ...] (weights/load.py keeps them that way)
in a block format with a kernel — Q4_0/Q4_1 or Q8_0 — and batches of fewer than
quant.REGION_MAX_ROWS tokens (quant.gemm_min_rows for this loop; a long prefill runs sgemm tiles
on Python threads, in model.run_layers), or any batch with int8 activations. Everything else goes
the ordinary way.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit

from .stages import quant, quant_i8, quant_panel
from .stages.quant_i8 import bits
from .stages.attention import _attention_rows
from .stages.kvcache import kv_write_numba
from .stages.rmsnorm import rmsnorm_numba
from .stages.rope import rope_numba


# ---------------------------------------------------------------------------------------------
# Which kernel: mm(x, (qs, d, m), l, kind, limbs) is x @ W[l]^T; gate_up(x, gate, up, l, kind,
# limbs) is the fused silu(x Wg^T) * (x Wu^T). m, the Q4 mins, is an empty 1-D array for Q8_0.
# limbs: 0, float kernels (quant.py); 1, x rounded to int8 (--activations int8); 3, float32 x
# split into three int8 parts (the default on a CPU with VNNI; quant_i8.py).
# `kind` and `limbs` are plain values (numba's on-disk cache does not keep a function compiled
# for function arguments), constants in each entry point below. The quants are viewed as the
# dtype each kernel is compiled for, so that no kernel is compiled twice.
# ---------------------------------------------------------------------------------------------
Q4, Q8, INT8, SPLIT = 0, 1, 2, 3


@njit(inline="always")
def _mm(x, w, l, kind, limbs):
    if limbs:                               # x as int8 parts (quant_i8.py): 1, or 3 (split)
        return quant_i8._matmul_i8(x, w[0][l].view(np.uint8), w[1][l], w[2][l],
                                   quant_i8.PREFETCH_ROWS, limbs)
    if kind == Q8:
        return quant._q8_0_matmul(x, w[0][l].view(np.int8), w[1][l])
    return quant._q4_matmul(x, w[0][l].view(np.uint8), w[1][l], w[2][l])


@njit(inline="always")
def _gate_up(x, g, u, l, kind, limbs):
    if limbs:
        return quant_i8._gate_up_i8(x, g[0][l].view(np.uint8), g[1][l], g[2][l],
                                    u[0][l].view(np.uint8), u[1][l], u[2][l],
                                    quant_i8.PREFETCH_ROWS, limbs)
    if kind == Q8:
        return quant._q8_0_gate_up(x, g[0][l].view(np.int8), g[1][l], u[0][l].view(np.int8), u[1][l])
    return quant._q4_gate_up(x, g[0][l].view(np.uint8), g[1][l], g[2][l],
                             u[0][l].view(np.uint8), u[1][l], u[2][l])


# ---------------------------------------------------------------------------------------------
# The layer loop: model.forward's, line for line. W: the stacked layer weights, (attn_norm,
# wqkv, wo, ffn_norm, w_gate, w_up, w_down), the matrices as (quants, scales, mins); kv: the
# cache (k, v) [L, ...]; B: the batch's (row_seq, positions, block_tables, slot_mapping).
# ---------------------------------------------------------------------------------------------
@njit(inline="always")
def _loop(x, cos, sin, W, kv, B, n_heads, n_kv_heads, eps, kind, limbs):
    attn_norm, wqkv, wo, ffn_norm, w_gate, w_up, w_down = W
    k_cache, v_cache = kv
    row_seq, positions, block_tables, slot_mapping = B
    T = x.shape[0]
    hd = k_cache.shape[-1]
    qd, kvd = n_heads * hd, n_kv_heads * hd
    for l in range(attn_norm.shape[0]):
        # --- attention block ---------------------------------------------------------------
        h = rmsnorm_numba(x, attn_norm[l], eps)                                 # [T, D]
        y = _mm(h, wqkv, l, kind, limbs)                                         # [T, qd + 2 kvd]
        q = np.ascontiguousarray(y[:, :qd]).reshape(T, n_heads, hd)             # [T, Hq, hd]
        k = np.ascontiguousarray(y[:, qd:qd + kvd]).reshape(T, n_kv_heads, hd)  # [T, Hkv, hd]
        v = np.ascontiguousarray(y[:, qd + kvd:]).reshape(T, n_kv_heads, hd)    # [T, Hkv, hd]
        q, k = rope_numba(q, cos, sin), rope_numba(k, cos, sin)
        kv_write_numba(k_cache[l], v_cache[l], k, v, slot_mapping)
        a = _attention_rows(q, k_cache[l], v_cache[l], row_seq, positions, block_tables)
        x = x + _mm(a.reshape(T, qd), wo, l, kind, limbs)                        # [T, D]
        # --- MLP block ---------------------------------------------------------------------
        h = rmsnorm_numba(x, ffn_norm[l], eps)                                  # [T, D]
        x = x + _mm(_gate_up(h, w_gate, w_up, l, kind, limbs), w_down, l, kind, limbs)  # [T, D]
    return x


# One compiled entry point per kind of kernel: `kind` and `limbs` are constants in each, so numba
# drops the branches not taken before compiling them (only the kernels a model uses compile).
@njit(cache=True)
def _layers_q4(x, cos, sin, W, kv, B, n_heads, n_kv_heads, eps):
    return _loop(x, cos, sin, W, kv, B, n_heads, n_kv_heads, eps, Q4, 0)        # quant.py


@njit(cache=True)
def _layers_q8(x, cos, sin, W, kv, B, n_heads, n_kv_heads, eps):
    return _loop(x, cos, sin, W, kv, B, n_heads, n_kv_heads, eps, Q8, 0)        # quant.py


@njit(cache=True)
def _layers_i8(x, cos, sin, W, kv, B, n_heads, n_kv_heads, eps):
    return _loop(x, cos, sin, W, kv, B, n_heads, n_kv_heads, eps, INT8, 1)      # quant_i8.py


@njit(cache=True)
def _layers_split(x, cos, sin, W, kv, B, n_heads, n_kv_heads, eps):
    return _loop(x, cos, sin, W, kv, B, n_heads, n_kv_heads, eps, SPLIT, 3)     # quant_i8.py


_ENTRY = {Q4: _layers_q4, Q8: _layers_q8, INT8: _layers_i8, SPLIT: _layers_split}

# The loop above opens a parallel region for every matmul and attention (~150 a decode step);
# region.py walks the same loop with the threads kept in one region, claiming the work of each
# stage and meeting at barriers: the default (faster; docs/benchmarks.md). False: this loop, the readable one, which the tests hold region.py to.
ONE_REGION = True


def kernels_for(stacks: dict, int8_act: bool):
    """The kernel kind (Q4, Q8, INT8 or SPLIT: float32 activations as three int8 parts, on a CPU
    with VNNI, quant.split_x) for these weight stacks, or None when the fused loop does not
    apply."""
    kinds = ("attn_norm", "wqkv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")
    if not all(k in stacks for k in kinds):
        return None
    if stacks["attn_norm"][0] != "F32" or stacks["ffn_norm"][0] != "F32":
        return None
    fmts = {stacks[k][0] for k in kinds[1:3] + kinds[4:]}
    family = {"Q4_0": Q4, "Q4_1": Q4, "Q8_0": Q8}.get(fmts.pop()) if len(fmts) == 1 else None
    if family is None:
        return None
    if int8_act:
        return INT8
    half = stacks["w_up"][2].dtype == np.float16          # only the int8-part kernels read those
    return SPLIT if half or quant.split_x() else family


def layer_args(stacks: dict, n_layers: int, kind: int | None = None) -> tuple:
    """The stacks as the compiled loop takes them: (attn_norm, wqkv, wo, ffn_norm, w_gate, w_up,
    w_down), each matrix as (quants, scales, mins) [L, ...], float16 scales as uint16 bits.
    kind: for region.py's walk, which takes each matrix in panels too (stages/quant_panel.py:
    its int8-part kernels) — (quants, scales, mins, panels, their scales, their mins); the
    panels are empty arrays where the kernels of `kind` do not read them."""
    no_m = np.zeros((n_layers, 0), dtype=np.float32)            # Q8_0 has no mins (1-D a layer)
    w = {k: (v[1], bits(v[2]), bits(v[3]) if v[3] is not None else no_m)
         for k, v in stacks.items() if v[0] != "F32"}
    if kind is not None:
        w = {k: v + _panels(stacks[k], kind) for k, v in w.items()}
    return (stacks["attn_norm"][1], w["wqkv"], w["wo"], stacks["ffn_norm"][1], w["w_gate"],
            w["w_up"], w["w_down"])


def _panels(stack: tuple, kind: int) -> tuple:
    """A stacked matrix (fmt, quants, scales, mins) in panels, if the kernels of `kind` read them."""
    fmt, qs, d, m = stack
    if kind in (INT8, SPLIT):
        return quant_panel.stacked(fmt, qs, d, m)
    L, dt = qs.shape[0], bits(d).dtype
    return (np.zeros((L, 0, 0, 0, 64), np.uint8), np.zeros((L, 0, 0, 16), dt),
            np.zeros((L, 0), np.float32) if m is None else np.zeros((L, 0, 0, 16), bits(m).dtype))


def head_args(weights, kind: int):
    """The final norm and the LM head as region.py's walk takes them — (norm, (quants, scales,
    mins, panels...) [1, ...]) — or None where its kernels cannot read this LM head: float32
    weights, or a format the float kernels of `kind` are not compiled for (the int8-part ones
    read all three)."""
    lm = weights.lm_head
    if not isinstance(lm, quant.QuantMatrix):
        return None
    if kind in (Q4, Q8) and ((lm.fmt == "Q8_0") != (kind == Q8) or lm.d.dtype != np.float32):
        return None
    m = np.zeros((1, 0), dtype=np.float32) if lm.m is None else bits(lm.m)[None]
    stack = (lm.fmt, lm.qs[None], lm.d[None], None if lm.m is None else lm.m[None])
    return weights.norm, (lm.qs[None], bits(lm.d)[None], m) + _panels(stack, kind)


def layers_numba(x, cos, sin, stacks, cache, batch, config, kind, workers=None, W=None, head=None):
    """x [T, D] after the embedding -> (x [T, D] after the last layer, logits [R, V] or None),
    the cache written on the way. W: layer_args(stacks), if already made. head: head_args(...),
    or None: the logits then come from model.forward's own final norm and LM head.
    workers: region.py's prange iterations (default: numba's threads, one each)."""
    W = layer_args(stacks, config.n_layers, kind if ONE_REGION else None) if W is None else W
    B = (batch.row_seq, batch.positions, batch.block_tables, batch.slot_mapping)
    args = (np.ascontiguousarray(x, dtype=np.float32), cos, sin, W, (cache.k, cache.v), B,
            config.n_heads, config.n_kv_heads, float(config.rms_eps))
    if ONE_REGION:
        from . import region
        if head is None:     # no logits rows: the walk's tail does nothing (one compiled walk)
            head, rows = (stacks["ffn_norm"][1][0], W[2]), batch.logits_rows[:0]
        else:
            rows = batch.logits_rows
        x, logits = region.ENTRY[kind](*args, head, rows, workers or numba.get_num_threads(),
                                       quant.MANY_ROWS[kind])
        return x, (logits if len(logits) else None)
    return _ENTRY[kind](*args), None


class FusedLayers:
    """The op-table entry (backends.numba_ops): layers(x, cos, sin, weights, cache, batch, config)
    -> (x after the last layer, the logits of batch.logits_rows or None), or None where the
    fused loop does not apply."""
    def __init__(self, int8_act: bool = False):
        self.int8_act = int8_act
        self._made = None     # (kind, weights' entries, W, head): made once, not each step

    def __call__(self, x, cos, sin, weights, cache, batch, config):
        kind = kernels_for(weights.stacks, self.int8_act)
        if kind is None:
            return None
        longest = (quant.REGION_MAX_ROWS if ONE_REGION
                   else quant.gemm_min_rows(weights.stacks["w_up"][0]))
        if kind != INT8 and len(x) >= longest:
            return None                          # long prefill: sgemm tiles, in model.forward
        # (rebuilt each step, the argument tuples cost Python time; remade when the
        # weights' arrays are others, e.g. after load.half_scales)
        entries = (*weights.stacks.values(), weights.lm_head, weights.norm)
        made = self._made
        if (made is None or made[0] != kind or len(made[1]) != len(entries)
                or any(a is not b for a, b in zip(made[1], entries))):
            made = self._made = (kind, entries, layer_args(weights.stacks, config.n_layers,
                                                           kind if ONE_REGION else None),
                                 head_args(weights, kind))
        _, _, W, head = made
        return layers_numba(x, cos, sin, weights.stacks, cache, batch, config, kind, W=W, head=head)
