"""The cuda backend's model: model.py's forward, the whole step on an NVIDIA GPU (numba.cuda).

Arrays stay where they compute. At load, every weight goes to the device once, in its file's own
block format (stages/device.py: DeviceMatrix), and the KV-cache pool is allocated there
(stages/kvcache.py: DeviceKVCache). Per step only the batch's integers go in (token ids,
positions, slots, block tables: one copy) and the sampled ids come out — or the logits, when the
caller asks for them.

One step is model.py's forward, the same stages in the same order, fused into few kernels (each
tested against its stages' NumPy references, see tests/cuda_cases.py):

    embedding_kernel                          x = E[tokens]               (stages/embedding.py)
    per layer:
      qkv_kernel     rmsnorm + W_qkv + RoPE + k/v into the cache          (gpu/linear.py)
      attention_kernel   paged, causal, grouped-query, online softmax     (stages/attention.py)
      linear_kernel  x += W_o a                                           (gpu/linear.py)
      swiglu_kernel  rmsnorm + W_gate, W_up + silu(g) * u                 (gpu/linear.py)
      linear_kernel  x += W_down h                                        (gpu/linear.py)
    linear_kernel    logits = W_head rmsnorm(x[last rows])                (gpu/linear.py)
    sample_kernel    next ids (greedy, temperature, top-k, top-p, min-p)  (gpu/sampling.py)

(The RoPE angles of every position are computed once, at load, into a device table.)

That is 5 launches per layer, 153 for SmolLM2-135M. Launching from Python costs tens of
microseconds each (docs/gpu.md), so decode steps (every sequence brings one token: the same shapes
step after step) are recorded once as a CUDA graph and replayed with a single launch; the batch
goes in through fixed device buffers. Prefill and mixed batches run the kernels one by one.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from .. import numpy_compat  # noqa: F401  (before numba.cuda)
from ..batch import Batch
from ..config import ModelConfig
from ..errors import BackendUnavailableError

# (numba.cuda and the kernels are imported inside the functions below: without numba-cuda this
# module still loads, and check_available says what to install.)


def check_available():
    """Raise BackendUnavailableError (one sentence) unless numba.cuda can run kernels here.
    Under NUMBA_ENABLE_CUDASIM=1 the simulator counts (slow: for tests on tiny models)."""
    try:
        from numba import cuda
    except ImportError:
        raise BackendUnavailableError(
            "the cuda backend needs numba-cuda: pip install 'minfer[cuda]' (or use --backend numba)"
        ) from None
    if not cuda.is_available():
        raise BackendUnavailableError(
            "no CUDA GPU is available to numba.cuda on this machine; use --backend numba")
    return cuda


def simulated() -> bool:
    from numba import config
    return bool(config.ENABLE_CUDASIM)


def cuda_ops():
    """The op table for backends.get_ops("cuda"): empty — the GPU runs whole steps, in CudaModel
    (backends.make_model)."""
    check_available()
    from types import SimpleNamespace
    return SimpleNamespace(name="cuda")


def core_stream(stream):
    """numba's stream as a cuda.core Stream (the same CUDA stream): cuda.core records graphs."""
    from cuda.core import Stream as CoreStream
    return CoreStream.from_handle(int(stream))


@dataclass
class Launch:
    """Block shapes. The GPU wants full warps; the simulator runs each thread as a Python thread,
    so it gets the smallest shapes that still exercise every reduction."""
    lanes: int | None = None # threads splitting one row pair (matmuls); None: per launch
    groups: int = 4          # row pairs per block (matmuls)
    tile: int = 64           # tokens per block at most (matmuls): a step of up to this many rows
                             # reads each weight once (gpu/linear.py, TILE)
    attn: int = 256          # threads per (row, head) of attention (>= head_dim)
    rows: int = 128          # threads per row (embedding)
    sample: int = 1024       # threads per sequence (sampling)

    @classmethod
    def for_here(cls) -> "Launch":
        return cls(lanes=4, groups=2, attn=8, rows=8, sample=8) if simulated() else cls()


@dataclass
class DeviceLayer:
    attn_norm: object        # [D]
    wqkv: object             # DeviceMatrix [Hq*hd + 2*Hkv*hd, D]: wq, wk, wv stacked
    wo: object               # DeviceMatrix [D, Hq*hd]
    ffn_norm: object         # [D]
    w_gate_up: object        # DeviceMatrix [2F, D]: w_gate, w_up stacked
    w_down: object           # DeviceMatrix [D, F]


def _stacked_qkv(L):
    """W_q, W_k, W_v stacked: the loader's own stack when it made one (wq/wk/wv are views)."""
    wqkv = getattr(L, "wqkv", None)
    return wqkv if wqkv is not None else [L.wq, L.wk, L.wv]


class _Work:
    """Device buffers for up to T tokens (activations) and their batch integers."""

    def __init__(self, cuda, c: ModelConfig, T: int, max_seqs: int, width: int, R: int):
        qd = c.n_heads * c.head_dim
        self.T, self.max_seqs, self.width, self.R = T, max_seqs, width, R
        self.x = cuda.device_array((T, c.dim), np.float32)           # the residual stream
        self.q = cuda.device_array((T, qd), np.float32)
        self.a = cuda.device_array((T, qd), np.float32)              # attention output
        self.h = cuda.device_array((T, c.ffn_dim), np.float32)       # SwiGLU hidden
        self.logits = cuda.device_array((R, c.vocab_size), np.float32)   # R rows want logits
        self.ids = cuda.device_array(R, np.int32)                    # sampled ids
        self.host_ids = cuda.pinned_array(R, np.int32)
        self.arange = cuda.to_device(np.arange(T, dtype=np.int32))
        # What changes every step goes in with one copy from a pinned host twin (a copy from
        # pageable memory, and every slice of a device array, costs tens of us in numba-cuda):
        # 5 int32 arrays of T, the block tables [max_seqs, width], then the R x 5 float32
        # sampling parameters. The views below are made once.
        n_int = 5 * T + max_seqs * width
        self.meta = cuda.device_array(n_int + 5 * R, np.int32)
        self.host = cuda.pinned_array(n_int + 5 * R, np.int32)
        self.tok, self.pos, self.slot, self.seq, self.rows = (self.meta[i * T:(i + 1) * T]
                                                              for i in range(5))
        self.tables = self.meta[5 * T:n_int].reshape(max_seqs, width)
        self.params = self.meta[n_int:].view(np.float32).reshape(R, 5)
        self.host_tables = self.host[5 * T:n_int].reshape(max_seqs, width)
        self.host_params = self.host[n_int:].view(np.float32).reshape(R, 5)

    def fits(self, T: int, B: int, width: int, R: int) -> bool:
        return T <= self.T and B <= self.max_seqs and width <= self.width and R <= self.R

    def upload(self, batch: Batch, stream, params: np.ndarray | None = None) -> None:
        """The batch's integers (and the sampling parameters) to the device: one copy. Entries
        past the batch keep old values: no kernel reads past T tokens, B sequences, R rows, or a
        sequence's keys."""
        B, M = batch.block_tables.shape
        h, T = self.host, self.T
        row_seq = np.repeat(np.arange(B, dtype=np.int32), np.diff(batch.seq_starts))
        for i, a in enumerate((batch.token_ids, batch.positions, batch.slot_mapping, row_seq,
                               batch.logits_rows)):
            h[i * T: i * T + len(a)] = a
        self.host_tables[:B, :M] = batch.block_tables
        if params is not None:
            self.host_params[:len(params)] = params
        self.meta.copy_to_device(h, stream=stream)


class CudaModel:
    """Same interface as model.Transformer (config, weights, new_cache, forward), on the device;
    plus forward_sample, which samples on the device and returns only the token ids."""

    samples_on_device = True

    def __init__(self, config: ModelConfig, weights, launch: Launch | None = None,
                 graphs: bool | None = None):
        cuda = check_available()
        from ..stages.device import DeviceMatrix
        from ..stages.rope import rope_angles
        self.cuda, self.config, self.weights = cuda, config, weights
        self.launch = launch or Launch.for_here()
        self.stream = cuda.stream()
        c, up, dev = config, DeviceMatrix.upload, cuda.to_device
        self.tok_embd = up(weights.tok_embd)
        self.lm_head = self.tok_embd if weights.lm_head is weights.tok_embd else up(weights.lm_head)
        self.layers = [DeviceLayer(dev(L.attn_norm), up(_stacked_qkv(L)), up(L.wo),
                                   dev(L.ffn_norm), up([L.w_gate, L.w_up]), up(L.w_down))
                       for L in weights.layers]
        self.norm = dev(weights.norm)
        cos, sin = rope_angles(np.arange(c.max_seq_len), c.head_dim, c.rope_theta)
        self.cos, self.sin = dev(cos), dev(sin)
        self._work = None
        self._probs = None                  # [R, V] filtered distributions (verification)
        self._graphs: dict = {}
        self.use_graphs = (not simulated()) if graphs is None else graphs
        self.block_size = 16

    # --- the pool --------------------------------------------------------------------------------
    def new_cache(self, n_blocks: int = 32, block_size: int = 16):
        from ..stages.kvcache import DeviceKVCache
        c = self.config
        self.block_size = block_size
        return DeviceKVCache(c.n_layers, c.n_kv_heads, c.head_dim, block_size, n_blocks)

    # --- one step ----------------------------------------------------------------------------------
    def _table_width(self) -> int:
        return -(-self.config.max_seq_len // self.block_size)

    def _work_for(self, T: int, B: int, width: int, R: int) -> _Work:
        if self._work is None or not self._work.fits(T, B, width, R):
            old = self._work
            grow = lambda need, have: max(need, 2 * have) if need > have else have  # noqa: E731
            T2, B2, R2 = ((grow(T, old.T), grow(B, old.max_seqs), grow(R, old.R)) if old
                          else (max(T, 64), max(B, 64), max(R, 64)))
            self._work = _Work(self.cuda, self.config, T2, B2, max(width, self._table_width()), R2)
        return self._work

    def _layers(self, w: _Work, T: int, R: int, cache, stream):
        """Launch the whole step on `stream` (a stream, or a graph being recorded): logits of the
        R rows w.rows[:R] into w.logits[:R]."""
        from ..stages import attention, embedding
        from . import linear
        c, k = self.config, self.launch
        mm = dict(lanes=k.lanes, groups=k.groups, tile=k.tile, stream=stream)
        x, q, a, h = w.x[:T], w.q[:T], w.a[:T], w.h[:T]                   # [T, D], [T, qd] x2, [T, F]
        embedding.embedding_cuda(w.tok, self.tok_embd, x, threads=k.rows, stream=stream)
        for l, L in enumerate(self.layers):
            # --- attention block -------------------------------------------------------------
            # h = rmsnorm(x); q, k, v = W_qkv h; RoPE on q and k; k and v into the cache: one kernel
            linear.qkv_cuda(x, L.attn_norm, c.rms_eps, L.wqkv, w.pos, w.slot, self.cos, self.sin, q,
                            cache.k, cache.v, l, **mm)
            attention.paged_attention_cuda(q, cache.k, cache.v, l, w.seq, w.pos, w.tables, a,
                                           threads=k.attn, stream=stream)
            linear.linear_cuda(a, L.wo, x, w.arange, accumulate=True, **mm)   # x += W_o a
            # --- MLP block -------------------------------------------------------------------
            linear.swiglu_cuda(x, L.ffn_norm, c.rms_eps, L.w_gate_up, h, **mm)  # h = silu(g) * u of rmsnorm(x)
            linear.linear_cuda(h, L.w_down, x, w.arange, accumulate=True, **mm)  # x += W_down h
        # --- final norm and LM head (the norm folded into the matmul) --------------------------
        linear.linear_cuda(x, self.lm_head, w.logits[:R], w.rows, norm=self.norm, eps=c.rms_eps,
                           **mm)

    def _sample(self, w: _Work, R: int, stream):
        from .sampling import sample_cuda
        sample_cuda(w.logits[:R], w.params[:R], w.ids[:R], threads=self.launch.sample, stream=stream)

    def _step(self, batch: Batch, cache, params: np.ndarray | None):
        """Run one step; the device then holds the logits (and the sampled ids if params)."""
        T, R = len(batch.token_ids), len(batch.logits_rows)
        B, M = batch.block_tables.shape
        decode = T == B and self.use_graphs
        if decode:
            graph = self._graph(batch, cache, params is not None)
            if graph is not None:
                w, g = graph
                w.upload(batch, self.stream, params)
                g.launch(self._core_stream)
                return w
        w = self._work_for(T, B, M, R)
        w.upload(batch, self.stream, params)
        self._layers(w, T, R, cache, self.stream)
        if params is not None:
            self._sample(w, R, self.stream)
        return w

    def forward(self, batch: Batch, cache) -> np.ndarray:
        """-> logits [len(batch.logits_rows), V] float32, copied to the host."""
        w = self._step(batch, cache, None)
        out = w.logits[:len(batch.logits_rows)].copy_to_host(stream=self.stream)
        self.stream.synchronize()
        return out

    def forward_sample(self, batch: Batch, cache, params, rngs) -> list[int]:
        """Sample the next token of each sequence on the device (params: SamplingParams per
        sequence; rngs: their generators, which draw the uniforms). Only the ids come back."""
        from .sampling import params_array
        w = self._step(batch, cache, params_array(params, rngs))
        w.ids.copy_to_host(w.host_ids, stream=self.stream)
        self.stream.synchronize()
        return w.host_ids[:len(batch.logits_rows)].tolist()

    verifies_on_device = True

    def forward_verify(self, batch: Batch, cache, starts: np.ndarray, proposals: np.ndarray,
                       n_prop: np.ndarray, sampling: tuple | None = None) -> np.ndarray:
        """Speculative verification where the logits are: one step, then spec/verify.py's rule
        on the device — sequence b's rows starts[b]..starts[b+1]-1, its guesses
        proposals[b, :n_prop[b]]. sampling None: every sequence greedy, the greedy rule on the
        logits. Else (row_params [R, 5]: each row's sampling parameters laid out as
        sampling.params_array does, temperature 0 for a greedy sequence; u [B, K + 1] each
        sequence's uniforms; q [R, V] the proposer's distributions or None; point_mass [B]):
        each row's filtered distribution made on the device (gpu/sampling.probs_kernel), then
        the rejection rule. -> [B, 2] (accepted guesses, next token) on the host: all that
        leaves the device."""
        from ..spec.verify import verify_greedy_cuda, verify_sample_cuda
        R = len(batch.logits_rows)
        w = self._step(batch, cache, None)
        if sampling is None:
            self.stream.synchronize()           # (the rule runs on the default stream)
            return verify_greedy_cuda(w.logits[:R], starts, proposals, n_prop)
        from .sampling import probs_cuda
        row_params, u, q, point_mass = sampling
        V = self.config.vocab_size
        if self._probs is None or self._probs.shape[0] < R:
            self._probs = self.cuda.device_array((max(R, 64), V), np.float32)
        probs = self._probs[:R]
        rows = self.cuda.to_device(np.asarray(row_params, np.float32), stream=self.stream)   # [R, 5]
        probs_cuda(w.logits[:R], rows, probs, threads=self.launch.sample, stream=self.stream)
        self.stream.synchronize()
        q = np.zeros((0, V), np.float32) if q is None else np.asarray(q, np.float32)
        return verify_sample_cuda(probs, q, starts, proposals, n_prop, u, point_mass)

    # --- CUDA graphs for decode steps ---------------------------------------------------------
    def _graph(self, batch: Batch, cache, sample: bool):
        """A recorded decode step for this batch size (and this cache pool), or None when
        recording is not possible here (then the kernels are launched one by one)."""
        B = len(batch.token_ids)
        key = (B, sample, id(cache))
        if key in self._graphs:
            return self._graphs[key]
        if batch.block_tables.shape[1] > self._table_width():
            return None
        seen = ("seen",) + key
        if seen not in self._graphs:          # the first step of a size runs eagerly (compiles)
            self._graphs[seen] = True
            return None
        builder = None
        try:
            self._core_stream = core_stream(self.stream)
            w = _Work(self.cuda, self.config, B, B, self._table_width(), B)
            self.stream.synchronize()
            builder = self._core_stream.create_graph_builder().begin_building()
            self._layers(w, B, B, cache, builder)
            if sample:
                self._sample(w, B, builder)
            graph = builder.end_building().complete()
            builder = None
            graph.upload(self._core_stream)
        except Exception as e:  # noqa: BLE001 — any failure: fall back to eager launches
            if builder is not None and builder.is_building:
                try:
                    builder.end_building()
                except Exception:  # noqa: BLE001
                    pass
            print(f"minfer: CUDA graph capture failed ({type(e).__name__}: {e}); "
                  f"decoding without graphs", file=sys.stderr)
            self.use_graphs = False
            return None
        # keep only graphs of the live cache pool
        self._graphs = {k: v for k, v in self._graphs.items() if k[-1] == key[-1]}
        self._graphs[key] = (w, graph)
        return self._graphs[key]
