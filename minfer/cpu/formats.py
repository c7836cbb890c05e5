"""Which compiled kernels a model's weights take: the kernel kinds, and the weights as they take them.

The compiled step (region.py) has one entry point per kind of kernel; `kind` is a constant in
each, so numba compiles only the kernels a model uses:

    Q4     Q4_0 / Q4_1 blocks, float32 x                          (stages/quant.py)
    Q8     Q8_0 blocks, float32 x                                 (stages/quant.py)
    INT8   any of them, x rounded to int8 (--activations int8)    (stages/quant_i8.py)
    SPLIT  any of them, float32 x split into three int8 parts     (stages/quant_i8.py)
           (the default on a CPU with VNNI: quant_dispatch.KernelConfig.split_x)

The kinds are plain ints (numba's on-disk cache does not keep a function compiled for function
arguments; a constant branch it does). The quants are viewed as the dtype each kernel is compiled
for, so that no kernel is compiled twice.
"""
from __future__ import annotations

import numpy as np

from ..stages import quant
from ..stages.simd import bits
from . import quant_panel

Q4, Q8, INT8, SPLIT = 0, 1, 2, 3

LAYER_WEIGHTS = ("attn_norm", "wqkv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")


def kernels_for(stacks: dict, int8_act: bool, split_x: bool):
    """The kernel kind (Q4, Q8, INT8 or SPLIT) for these weight stacks (weights/load.py: each
    kind of layer weight as one [L, ...] stack), or None where the compiled step does not apply:
    float32 weights, mixed formats, a format without a kernel.
    split_x: float32 x in three int8 parts (quant_dispatch.KernelConfig.split_x)."""
    if not all(k in stacks for k in LAYER_WEIGHTS):
        return None
    if stacks["attn_norm"][0] != "F32" or stacks["ffn_norm"][0] != "F32":
        return None
    fmts = {stacks[k][0] for k in LAYER_WEIGHTS[1:3] + LAYER_WEIGHTS[4:]}
    family = {"Q4_0": Q4, "Q4_1": Q4, "Q8_0": Q8}.get(fmts.pop()) if len(fmts) == 1 else None
    if family is None:
        return None
    if int8_act:
        return INT8
    half = stacks["w_up"][2].dtype == np.float16          # only the int8-part kernels read those
    return SPLIT if half or split_x else family


def layer_args(stacks: dict, n_layers: int, kind: int | None = None) -> tuple:
    """The stacks as the compiled step takes them: (attn_norm, wqkv, wo, ffn_norm, w_gate, w_up,
    w_down), each matrix as (quants, scales, mins) [L, ...], float16 scales as uint16 bits.
    m, the Q4 mins, is an empty array for Q8_0.
    kind: for region.py's walk, which takes each matrix in panels too (cpu/quant_panel.py:
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
    """The final norm and the LM head as the compiled step takes them — (norm, (quants, scales,
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
