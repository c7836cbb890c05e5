"""The numba backend's model: model.py's forward, with the layers in one compiled call.

model.Transformer.forward (the specification) calls ~15 stage functions per layer from Python.
In a decode step of SmolLM2-135M each call does a few microseconds of arithmetic, and the calls
themselves (the interpreter, argument unboxing, NumPy temporaries) cost a good share of the step.
So here the layers, the final norm and the LM head run in one compiled call, region.py's step:
the same stages in the same order, each on the same @njit kernels as the stage modules', with
the threads kept in one parallel region for the whole step. A step is then three compiled
calls — the embedding, the RoPE angles, the region — and little Python.

The region takes block-quantized weights (cpu/formats.py: which kernels) and steps of fewer than
kernels.region_max_rows tokens (stages/quant_dispatch.KernelConfig: the model's choice of kernels,
the op table's too). Anything else — float32 weights, a long prefill, whose matmuls go to sgemm
tiles on Python threads — runs model.py's own loop on the numba stage kernels.
"""
from __future__ import annotations

import contextlib
import os

import numba
import numpy as np

from ..batch import Batch
from ..model import Transformer
from ..errors import check_finite
from ..stages.kvcache import KVCache
from ..stages.quant_dispatch import KernelConfig
from ..stages.rmsnorm import rmsnorm_numba
from . import formats, greedy_head, region
from .contention import ThreadGovernor


class CpuModel(Transformer):
    """model.Transformer on the numba op table (backends.numba_ops), its steps in region.py.
    int8_act: the op table's matmuls round x to int8 (--activations int8), the region's too.
    threads: the model's own numba thread count (default: numba's at each step), set around
    each forward: numba's count is one for the calling thread, and another model made with
    another count would otherwise change this one's — and, through attention's key slices, its
    last bits. workers: the region's parallel iterations (default: those threads, one each),
    fewer for a while where other programs keep cores busy (contention.py; adapt_threads=False,
    or MINFER_ADAPT_THREADS=0 in the environment: never).
    kernels: which kernels run where (quant_dispatch.KernelConfig; default: this CPU's) — the
    op table's own, numba_ops(kernels=...)."""

    def __init__(self, config, weights, ops, int8_act: bool = False, workers: int | None = None,
                 kernels: KernelConfig | None = None, adapt_threads: bool | None = None,
                 threads: int | None = None):
        super().__init__(config, weights, ops)
        self.int8_act, self.workers, self.threads = int8_act, workers, threads
        self.kernels = kernels or KernelConfig()
        if adapt_threads is None:
            adapt_threads = os.environ.get("MINFER_ADAPT_THREADS", "1") != "0"
        self.adapt_threads = adapt_threads
        self._governor = None  # contention.ThreadGovernor, for the thread count it was made with
        self._args = None     # (kind, weights' arrays, layer args, head args): made once, not each step
        self._head = None     # greedy_head.Head, at the first greedy step that takes it

    def forward(self, batch: Batch, cache: KVCache) -> np.ndarray:
        """-> logits [len(batch.logits_rows), V] float32."""
        with self._own_threads():
            return self._forward(batch, cache)

    @contextlib.contextmanager
    def _own_threads(self):
        """numba's thread count set to the model's own for the block."""
        was = numba.get_num_threads()
        own = self.threads or was
        if own != was:
            numba.set_num_threads(own)
        try:
            yield
        finally:
            if own != was:
                numba.set_num_threads(was)

    def _forward(self, batch: Batch, cache: KVCache) -> np.ndarray:
        c, W, op = self.config, self.weights, self.ops
        x = op.embedding(batch.token_ids, W.tok_embd)                       # [T, D]
        cos, sin = op.rope_angles(batch.positions, c.head_dim, c.rope_theta)  # [T, hd/2] each
        kind = self.region_kind(len(x))
        if kind is None:               # float32 weights, or a long prefill: model.py's loop
            x = self.run_layers(x, cos, sin, batch, cache)                   # [T, D]
        else:                          # the layers (and the final norm and LM head): region.py
            x, logits = self.run_region(kind, x, cos, sin, batch, cache)     # [T, D], [R, V]
            if logits is not None:
                return logits
        # --- final norm and LM head (where the region's kernels cannot read the head) ----------
        x = op.rmsnorm(x[batch.logits_rows], W.norm, c.rms_eps)               # [R, D]
        return op.linear(x, W.lm_head)                                         # [R, V]

    def forward_argmax(self, batch: Batch, cache: KVCache) -> np.ndarray | None:
        """-> np.argmax of each row of forward()'s logits [R] int64, the LM head mostly on int8 x
        (greedy_head.py: a third of its byte products, the same answer), or None where that is
        not the faster way (nothing computed then: call forward): fewer logits rows than
        kernels.argmax_head_rows, x not in three int8 parts, an LM head the panels do not read,
        rows enough for the float tiles or the tile unit — or a while after steps whose logits
        were too close together for the bound to leave few candidates (random text)."""
        R, T = len(batch.logits_rows), len(batch.token_ids)
        kind = self.region_kind(T)
        k = self.kernels
        if (kind != formats.SPLIT or R < k.argmax_head_rows
                or R >= min(k.many_rows[kind], k.tile_unit_rows[kind])
                or self._weights_as_args(kind)[1] is None):
            return None
        head = self._greedy_head(kind)
        if head.pause > 0:
            head.pause -= 1
            return None
        with self._own_threads():
            c, W, op = self.config, self.weights, self.ops
            x = op.embedding(batch.token_ids, W.tok_embd)                       # [T, D]
            cos, sin = op.rope_angles(batch.positions, c.head_dim, c.rope_theta)
            x, _ = self.run_region(kind, x, cos, sin, batch, cache, logits=False)  # [T, D]
            h = rmsnorm_numba(np.ascontiguousarray(x[batch.logits_rows]), W.norm,
                              float(c.rms_eps))                                 # [R, D] as the region's
            found = greedy_head.head_argmax(h, head)
            if found is None:            # x not finite (or huge): the whole head says where
                logits = head.logits(h)                                         # [R, V]
                check_finite(logits, "forward pass (the logits)")
                return np.argmax(logits, axis=1)
            head.observe(found[3], R)
            return found[0]

    def _greedy_head(self, kind: int) -> greedy_head.Head:
        """The region's LM head panels with their bound (greedy_head.Head), made at the first
        greedy step."""
        lm = self.weights.lm_head
        if self._head is None or self._head.w is not lm:
            panels = self._weights_as_args(kind)[1][1][3:]          # (qp, d, m) [1, ...]
            self._head = greedy_head.Head(lm, *(a[0] for a in panels))
        return self._head

    def region_kind(self, T: int):
        """The kernel kind (cpu/formats.py) of the region for a step of T tokens, or None: float32
        weights, or T rows enough for the sgemm tiles (int8 activations have no tiles)."""
        kind = formats.kernels_for(self.weights.stacks, self.int8_act, self.kernels.split_x)
        if kind is None or (kind != formats.INT8 and T >= self.kernels.region_max_rows):
            return None
        return kind

    def run_region(self, kind: int, x, cos, sin, batch: Batch, cache: KVCache, logits: bool = True):
        """x [T, D] after the embedding -> (x [T, D] after the last layer, the logits of
        batch.logits_rows [R, V] or None where the region's kernels cannot read the LM head, or
        logits=False), the cache written on the way."""
        W, head = self._weights_as_args(kind)
        B = (batch.row_seq, batch.positions, batch.block_tables, batch.slot_mapping)
        args = (np.ascontiguousarray(x, dtype=np.float32), cos, sin, W, (cache.k, cache.v), B,
                self.config.n_heads, self.config.n_kv_heads, float(self.config.rms_eps))
        if head is None or not logits:    # no logits rows: the region's tail does nothing
            head, rows = (self.weights.stacks["ffn_norm"][1][0], W[2]), batch.logits_rows[:0]
        else:
            rows = batch.logits_rows
        threads = self.workers or numba.get_num_threads()     # (forward set the model's own)
        many = (self.kernels.many_rows[kind], self.kernels.tile_unit_rows[kind],
                self.kernels.attention_lane_rows)
        gov = self._governor
        if gov is None or gov.threads != threads:
            gov = self._governor = ThreadGovernor(threads)
        nw = gov.workers() if self.adapt_threads else threads
        was = numba.get_num_threads()
        if nw < was:
            numba.set_num_threads(nw)      # the region's launch on nw threads, not just nw iterations
        try:
            x, logits = region.ENTRY[kind](*args, head, rows, nw, threads, many)
            gov.observe(nw)
        finally:
            if nw < was:
                numba.set_num_threads(was)
        return x, (logits if len(logits) else None)

    def _weights_as_args(self, kind: int):
        """formats.layer_args and head_args, remade only when the weights' arrays are others
        (another Weights given to the model): rebuilt each step, the argument tuples cost Python
        time."""
        W = self.weights
        arrays = (*W.stacks.values(), W.lm_head, W.norm)
        made = self._args
        if (made is None or made[0] != kind or len(made[1]) != len(arrays)
                or any(a is not b for a, b in zip(made[1], arrays))):
            made = self._args = (kind, arrays, formats.layer_args(W.stacks, self.config.n_layers, kind),
                                 formats.head_args(W, kind))
        return made[2], made[3]
