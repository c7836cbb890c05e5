"""The Llama transformer: the stages wired together, reading like the paper.

    x = embed(tokens)
    for each layer:
        x = x + W_o · attention(rope(W_q · norm(x)), rope(W_k · norm(x)), W_v · norm(x))
        x = x + mlp(norm(x))
    logits = W_head · norm(x)

`forward` takes a Batch (several sequences, flattened; see batch.py) and the KV-cache pool, and
returns the logits of the rows the batch asks for. The stage functions come from an op table
(backends.py): the NumPy reference's, the numba kernels', or a student's own (the exercises).

This loop is the specification. The numba backend runs its steps in cpu/model.py (the layers in
one compiled parallel region, cpu/region.py) and the cuda backend in gpu/model.py (fused kernels on
the device): the same stages in the same order, under the same stage comments (tests/test_structure.py
and tests/cuda_cases.py record each step's stages and compare them with this loop's).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .batch import Batch
from .config import ModelConfig
from .stages.kvcache import KVCache


@dataclass
class LayerWeights:
    attn_norm: np.ndarray   # [D]
    wq: np.ndarray          # [Hq*hd, D]   rows in interleaved-pair RoPE order
    wk: np.ndarray          # [Hkv*hd, D]  idem
    wv: np.ndarray          # [Hkv*hd, D]
    wo: np.ndarray          # [D, Hq*hd]
    ffn_norm: np.ndarray    # [D]
    w_gate: np.ndarray      # [F, D]
    w_up: np.ndarray        # [F, D]
    w_down: np.ndarray      # [D, F]
    wqkv: object = None     # [(Hq + 2 Hkv) hd, D]: wq, wk, wv stacked (they are views of it)

    def storage(self) -> list:
        """The distinct arrays that hold this layer (views of wqkv are not counted twice)."""
        parts = [self.attn_norm, self.wo, self.ffn_norm, self.w_gate, self.w_up, self.w_down]
        return parts + ([self.wqkv] if self.wqkv is not None else [self.wq, self.wk, self.wv])


@dataclass
class Weights:
    tok_embd: np.ndarray              # [V, D]
    layers: list[LayerWeights]
    norm: np.ndarray                  # [D]
    lm_head: np.ndarray               # [V, D] (the same array as tok_embd when tied)
    raw: dict = field(default_factory=dict, repr=False)  # the file's own tensors (GGUF blocks)
    stacks: dict = field(default_factory=dict, repr=False)  # kind -> all layers' in one array (load.py)

    def has_quantized(self) -> bool:
        return any(not isinstance(a, np.ndarray) for L in self.layers for a in L.storage())

    def nbytes(self) -> int:
        arrays = {id(a): a for a in [self.tok_embd, self.norm, self.lm_head]}
        for L in self.layers:
            arrays.update({id(a): a for a in L.storage()})
        return sum(getattr(a, "nbytes", 0) for a in arrays.values())  # QuantMatrix has .nbytes too


class Transformer:
    def __init__(self, config: ModelConfig, weights: Weights, ops):
        self.config, self.weights, self.ops = config, weights, ops

    def new_cache(self, n_blocks: int = 32, block_size: int = 16) -> KVCache:
        c = self.config
        return KVCache(c.n_layers, c.n_kv_heads, c.head_dim, block_size, n_blocks)

    def forward(self, batch: Batch, cache: KVCache) -> np.ndarray:
        """-> logits [len(batch.logits_rows), V] float32."""
        c, W, op = self.config, self.weights, self.ops
        x = op.embedding(batch.token_ids, W.tok_embd)                       # [T, D]
        cos, sin = op.rope_angles(batch.positions, c.head_dim, c.rope_theta)  # [T, hd/2] each
        x = self.run_layers(x, cos, sin, batch, cache)                         # [T, D]
        # --- final norm and LM head ------------------------------------------------------------
        x = op.rmsnorm(x[batch.logits_rows], W.norm, c.rms_eps)               # [R, D]
        return op.linear(x, W.lm_head)                                         # [R, V]

    def run_layers(self, x: np.ndarray, cos, sin, batch: Batch, cache: KVCache) -> np.ndarray:
        """The transformer layers: x [T, D] -> [T, D], each layer's K and V written to the cache."""
        c, W, op = self.config, self.weights, self.ops
        T = len(x)
        for l, L in enumerate(W.layers):
            # --- attention block -------------------------------------------------------------
            h = op.rmsnorm(x, L.attn_norm, c.rms_eps)                          # [T, D]
            q, k, v = op.qkv(h, L.wq, L.wk, L.wv, L.wqkv)                      # three projections of h
            q = q.reshape(T, c.n_heads, c.head_dim)                            # [T, Hq, hd]
            k = k.reshape(T, c.n_kv_heads, c.head_dim)                         # [T, Hkv, hd]
            v = v.reshape(T, c.n_kv_heads, c.head_dim)                         # [T, Hkv, hd]
            q, k = op.rope(q, cos, sin), op.rope(k, cos, sin)
            op.kv_write(cache.k[l], cache.v[l], k, v, batch.slot_mapping)
            a = op.attention(q, cache.k[l], cache.v[l], batch)                 # [T, Hq, hd]
            x = x + op.linear(a.reshape(T, c.n_heads * c.head_dim), L.wo)      # [T, D]
            # --- MLP block -------------------------------------------------------------------
            h = op.rmsnorm(x, L.ffn_norm, c.rms_eps)                           # [T, D]
            x = x + op.swiglu(h, L.w_gate, L.w_up, L.w_down)                   # [T, D]
        return x
