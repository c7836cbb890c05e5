"""The cuda backend's one prepared check on a real GPU: correctness and speed in a single run.

    python3 tools/gpu_check.py                 # on a machine with an NVIDIA GPU, from the repo root
    python3 tools/gpu_check.py --json FILE     # also write the figures as JSON
    NUMBA_ENABLE_CUDASIM=1 python tools/gpu_check.py --tiny    # the script itself, on the simulator

1. kernels    every cuda kernel against its NumPy reference at the real SmolLM2-135M shapes
              (random weights; Q4_1 layers, Q8_0 embedding/LM head, F32 too; 300-token contexts)
2. end-to-end random-weights model of the SmolLM2-135M shape: greedy tokens of the cuda backend
              (CUDA-graph decode, eager decode, sampling on the device, n-gram guesses verified
              on the device) == the numba backend's; sampling with guesses verified on the
              device == verified on the host
3. benchmark  prefill of one 128-token prompt; decode of 128 new tokens (first one excluded) at
              batch 1 (graphs and eager) and batch 32, against targets of 10x / 5x Hugging Face
              transformers on an H200 (docs/gpu.md)
4. many rows  GPU time of each fused matmul (layer 0, the LM head) at R = 1, 8, 32 and 128 rows,
              for tiles of 8 tokens per block (the weights read once per 8 rows), 64 (the
              default) and 128, with 8 and 32 lanes; and a k-token forward (k = 1, 4, 8, 16 new
              tokens after 128 cached ones, the logits of all k: a speculative verify; k = 64,
              128: a chunk of a prompt) for each tile: what reading the weights once per step gives
5. profile    GPU time of each kernel (layer 0) at T = 1, 32 and 128 tokens, measured as 30
              launches recorded in one CUDA graph (no Python in the timing), and the Python cost
              of one eager launch: where a step's time goes

Needs numba-cuda (the GPU image has it) and minfer's runtime dependencies, no model file
(`python -m minfer bench --random-weights` also needs the gguf package: it writes a GGUF).
Run time: under a minute on a recent data-centre GPU (docs/gpu.md).
Measured results, and what each fix gave: docs/gpu.md.
Ends with one summary block; exit status 0 only if every check passed.
"""
import numpy as np

# numba-cuda 0.30 still calls np.row_stack, which numpy 2.5 removed: shim it before any compile
if tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 5) and not hasattr(np, "row_stack"):
    np.row_stack = np.vstack

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from numba import cuda  # noqa: E402

from minfer.backends import numba_ops  # noqa: E402
from minfer.batch import make_batch  # noqa: E402
from minfer.config import ModelConfig  # noqa: E402
from minfer.gpu.model import CudaModel, Launch, check_available, simulated  # noqa: E402
from minfer.engine import Engine  # noqa: E402
from minfer.model import LayerWeights, Transformer, Weights  # noqa: E402
from minfer.sampling import SamplingParams, sample  # noqa: E402
from minfer.gpu.sampling import params_array, sample_cuda  # noqa: E402
from minfer.stages import attention, embedding, kvcache, linear, mlp, rmsnorm, rope  # noqa: E402
from minfer.engine.block_manager import BlockManager  # noqa: E402
from minfer.errors import MinferError  # noqa: E402
from minfer.stages.kvcache import KVCache  # noqa: E402
from minfer.gpu.linear import linear_cuda, qkv_cuda, swiglu_cuda  # noqa: E402
from minfer.stages.device import DeviceMatrix  # noqa: E402
from minfer.stages.quant import QuantMatrix  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
               ffn_dim=1536, rms_eps=1e-5, rope_theta=1e5, max_seq_len=8192)
TINY = dict(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
            rms_eps=1e-5, rope_theta=1e4, max_seq_len=128)
TARGETS = {"prefill_tok_s": 4600, "decode_b1_tok_s": 450, "decode_b32_tok_s": 5700}
results = {"checks": {}, "bench": {}}
rng = np.random.default_rng(0)


def dev(a):
    return cuda.to_device(np.ascontiguousarray(a))


def randn(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def mat(O, K, fmt):
    w = randn(O, K, scale=0.8 / np.sqrt(K))
    return w if fmt == "F32" else QuantMatrix.from_float(w, fmt)


def check(name, got, want, tol=1e-3):
    """Pass when max |got - want| <= tol * max |want| (+ a floor)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-6))
    ok = bool(np.isfinite(err) and err <= tol)
    results["checks"][name] = {"ok": ok, "rel_err": err}
    print(f"  {'ok ' if ok else 'BAD'} {name:<44} rel err {err:.1e}", flush=True)


def verdict(name, ok, detail=""):
    results["checks"][name] = {"ok": bool(ok), "detail": detail}
    print(f"  {'ok ' if ok else 'BAD'} {name:<44} {detail}", flush=True)


# ---------------------------------------------------------------------------------------------
def kernels(c: dict, L: Launch):
    D, Hq, Hkv, hd, F, V = (c[k] for k in ("dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size"))
    qd, kvd = Hq * hd, Hkv * hd
    mm = dict(lanes=L.lanes, groups=L.groups)
    for T in (1, 37):
        x, g = randn(T, D), 1 + randn(D, scale=0.1)
        arange = dev(np.arange(T, dtype=np.int32))
        for fmt in ("Q4_1", "Q4_0", "F32"):
            a, w, res = randn(T, qd), mat(D, qd, fmt), randn(T, D)
            out = dev(res)
            linear_cuda(dev(a), DeviceMatrix.upload(w), out, arange, accumulate=True, **mm)
            check(f"W_o + residual {fmt} T={T}", out.copy_to_host(), res + linear.linear(a, w))
        h = randn(T, F)
        wd = mat(D, F, "Q8_0")
        out = cuda.device_array((T, D), np.float32)
        linear_cuda(dev(h), DeviceMatrix.upload(wd), out, arange, **mm)
        check(f"W_down Q8_0 T={T}", out.copy_to_host(), linear.linear(h, wd))
        wg, wu = mat(F, D, "Q4_1"), mat(F, D, "Q4_1")
        hh = cuda.device_array((T, F), np.float32)
        swiglu_cuda(dev(x), dev(g), 1e-5, DeviceMatrix.upload([wg, wu]), hh, **mm)
        n = rmsnorm.rmsnorm(x, g, 1e-5)
        check(f"norm+gate/up+SiLU Q4_1 T={T}", hh.copy_to_host(), mlp.silu(linear.linear(n, wg)) * linear.linear(n, wu))
        # QKV + RoPE + cache write, positions up to 300
        wq, wk, wv = mat(qd, D, "Q4_1"), mat(kvd, D, "Q4_1"), mat(kvd, D, "Q4_1")
        pos = rng.integers(0, min(300, c["max_seq_len"]), T).astype(np.int32)
        slots = rng.permutation(64)[:T].astype(np.int32) if T <= 64 else np.arange(T, dtype=np.int32)
        cos, sin = rope.rope_angles(np.arange(c["max_seq_len"]), hd, c["rope_theta"])
        cache = np.zeros((2, 4, 16, Hkv, hd), np.float32)
        dk, dv, q = dev(cache), dev(cache), cuda.device_array((T, qd), np.float32)
        qkv_cuda(dev(x), dev(g), 1e-5, DeviceMatrix.upload([wq, wk, wv]), dev(pos), dev(slots),
                 dev(cos), dev(sin), q, dk, dv, 1, **mm)
        k = rope.rope(linear.linear(n, wk).reshape(T, Hkv, hd), cos[pos], sin[pos])
        want_k, want_v = cache.copy(), cache.copy()
        kvcache.kv_write(want_k[1], want_v[1], k, linear.linear(n, wv).reshape(T, Hkv, hd), slots)
        check(f"norm+QKV+RoPE (q) Q4_1 T={T}", q.copy_to_host(),
              rope.rope(linear.linear(n, wq).reshape(T, Hq, hd), cos[pos], sin[pos]).reshape(T, -1))
        check(f"norm+QKV+RoPE (k, v in cache) T={T}", np.concatenate([dk.copy_to_host(), dv.copy_to_host()]),
              np.concatenate([want_k, want_v]))
    # LM head: norm folded in, 3 rows of 5, Q8_0 [V, D]
    x, g, head = randn(5, D), 1 + randn(D, scale=0.1), mat(V, D, "Q8_0")
    rows = np.array([4, 0, 2], np.int32)
    out = cuda.device_array((3, V), np.float32)
    d_head = DeviceMatrix.upload(head)
    linear_cuda(dev(x), d_head, out, dev(rows), norm=dev(g), eps=1e-5, **mm)
    logits_ref = linear.linear(rmsnorm.rmsnorm(x[rows], g, 1e-5), head)
    check("LM head Q8_0 (norm, rows)", out.copy_to_host(), logits_ref)
    tok = rng.integers(0, V, 7).astype(np.int32)
    e = cuda.device_array((7, D), np.float32)
    embedding.embedding_cuda(dev(tok), d_head, e, threads=L.rows)
    check("embedding Q8_0", e.copy_to_host(), embedding.embedding(tok, head), tol=1e-6)
    # paged attention: 3 sequences (prefill 40, decode at 299, verify 4 at 150..153), GQA
    lens = [(40, 0), (1, min(299, c["max_seq_len"] - 2)), (4, 150 if c["max_seq_len"] > 160 else 20)]
    kc = KVCache(1, Hkv, hd, block_size=16, n_blocks=32)
    bm = BlockManager(kc)
    for s, (n_new, p) in enumerate(lens):
        bm.ensure(s, n_new + p)
        if p:
            kvcache.kv_write(kc.k[0], kc.v[0], randn(p, Hkv, hd), randn(p, Hkv, hd), bm.slots(s, 0, p))
    batch = make_batch([(list(range(n_new)), p, bm.tables[s]) for s, (n_new, p) in enumerate(lens)], 16)
    Tn = len(batch.token_ids)
    kvcache.kv_write(kc.k[0], kc.v[0], randn(Tn, Hkv, hd), randn(Tn, Hkv, hd), batch.slot_mapping)
    qa = randn(Tn, Hq, hd)
    out = cuda.device_array((Tn, qd), np.float32)
    row_seq = np.repeat(np.arange(3), np.diff(batch.seq_starts)).astype(np.int32)
    attention.paged_attention_cuda(dev(qa.reshape(Tn, -1)), dev(kc.k), dev(kc.v), 0, dev(row_seq),
                                   dev(batch.positions.astype(np.int32)), dev(batch.block_tables), out,
                                   threads=L.attn)
    check("paged attention (GQA, 3 seqs, ~300 keys)", out.copy_to_host(),
          attention.paged_attention(qa, kc.k[0], kc.v[0], batch).reshape(Tn, -1))
    # sampling on the real vocabulary: the same token as sampling.sample for the same seed
    kws = [dict(temperature=0), dict(temperature=0.8), dict(temperature=1.0, top_k=40),
           dict(temperature=0.7, top_p=0.9), dict(temperature=1.0, min_p=0.05),
           dict(temperature=0.9, top_k=50, top_p=0.95)] * 2
    params = [SamplingParams(**kw) for kw in kws]
    lg = np.repeat(logits_ref[:1], len(kws), axis=0) * np.float32(3)
    seeds = list(range(len(kws)))
    want = [sample(lg[b], p, np.random.default_rng(s)) for b, (p, s) in enumerate(zip(params, seeds))]
    ids = cuda.device_array(len(kws), np.int32)
    sample_cuda(dev(lg), dev(params_array(params, [np.random.default_rng(s) for s in seeds])), ids,
                threads=L.sample)
    got = ids.copy_to_host().tolist()
    same = sum(a == b for a, b in zip(got, want))
    verdict("sampling == sampling.sample (same seeds)", same >= len(kws) - 1, f"{same}/{len(kws)} same tokens")


# ---------------------------------------------------------------------------------------------
def random_model(c: dict):
    cfg = ModelConfig(**c)
    D, qd, kvd, F = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim
    layers = []
    for _ in range(cfg.n_layers):
        wq, wk, wv = mat(qd, D, "Q4_1"), mat(kvd, D, "Q4_1"), mat(kvd, D, "Q4_1")
        big, (wq, wk, wv) = linear.stack_rows([wq, wk, wv])
        layers.append(LayerWeights(1 + randn(D, scale=0.1), wq, wk, wv, mat(D, qd, "Q4_1"),
                                   1 + randn(D, scale=0.1), mat(F, D, "Q4_1"), mat(F, D, "Q4_1"),
                                   mat(D, F, "Q4_1"), big))
    emb = mat(cfg.vocab_size, D, "Q8_0")
    return cfg, Weights(emb, layers, 1 + randn(D, scale=0.1), emb)


def generate(model, prompts, n_new):
    p = SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True)
    eng = Engine(model, stop_ids=set())
    out = [[] for _ in prompts]
    for i, tok in eng.run(prompts, [p] * len(prompts)):
        out[i].append(tok)
    return out


class Loop:
    """A decode loop that samples on the device (what the engine does with the cuda backend)."""

    def __init__(self, model, n_blocks):
        self.model, self.cache = model, model.new_cache(n_blocks=n_blocks, block_size=16)
        self.bm = BlockManager(self.cache)

    def run(self, prompts, n_new, params=None):
        """-> tokens per prompt, seconds of the prefill, seconds of the decode steps."""
        m, bm = self.model, self.bm
        params = params or SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True)
        B, rngs = len(prompts), [np.random.default_rng(i) for i in range(len(prompts))]
        for s, ids in enumerate(prompts):
            bm.ensure(s, len(ids) + n_new)
        t0 = time.perf_counter()
        toks = [[t] for t in m.forward_sample(make_batch([(ids, 0, bm.tables[s]) for s, ids in enumerate(prompts)], 16),
                                              self.cache, [params] * B, rngs)]
        t1 = time.perf_counter()
        for step in range(n_new - 1):
            batch = make_batch([([toks[s][-1]], len(ids) + step, bm.tables[s]) for s, ids in enumerate(prompts)], 16)
            for s, t in enumerate(m.forward_sample(batch, self.cache, [params] * B, rngs)):
                toks[s].append(t)
        t2 = time.perf_counter()
        for s in range(B):
            bm.release(s)
        return toks, t1 - t0, t2 - t1


def end_to_end(cfg, W, n_new: int):
    prompts = [rng.integers(3, cfg.vocab_size, 20).tolist(), rng.integers(3, cfg.vocab_size, 9).tolist()]
    t = time.perf_counter()
    cpu = Transformer(cfg, W, numba_ops())
    want = generate(cpu, prompts, n_new)
    print(f"  numba backend: {n_new} greedy tokens x 2 in {time.perf_counter() - t:.0f} s (JIT included)", flush=True)
    gpu = CudaModel(cfg, W)
    got_graph = generate(gpu, prompts, n_new)                 # Engine, logits out, decode graphs
    agree = lambda a: sum(x == y for p, q in zip(a, want) for x, y in zip(p, q))  # noqa: E731
    total = 2 * n_new
    verdict("greedy == numba (engine, graph decode)", got_graph == want, f"{agree(got_graph)}/{total} tokens")
    gpu_eager = CudaModel(cfg, W, graphs=False)
    got_eager = generate(gpu_eager, prompts, n_new)
    verdict("greedy == numba (engine, eager decode)", got_eager == want, f"{agree(got_eager)}/{total} tokens")
    got_dev, _, _ = Loop(gpu, 64).run(prompts, n_new)
    verdict("greedy == numba (device sampling)", got_dev == want, f"{agree(got_dev)}/{total} tokens")
    # speculative decoding: n-gram guesses verified on the device (greedy, and sampling against
    # the host's rule on copied logits, from the same seeds)
    from minfer.spec import NgramProposer, Speculator

    def spec_run(params, on_device=True):
        model = CudaModel(cfg, W)
        model.verifies_on_device = on_device
        eng = Engine(model, stop_ids=set())
        eng.speculator = Speculator(eng, NgramProposer(min_n=1), k_max=4, adaptive=False)
        out = [[] for _ in prompts]
        for i, tok in eng.run(prompts, [params] * len(prompts)):
            out[i].append(tok)
        return out, eng.speculator.steps
    got_spec, steps = spec_run(SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True))
    verdict("greedy == numba (n-gram, verify on device)", got_spec == want,
            f"{agree(got_spec)}/{total} tokens, {steps} verify steps")
    sp = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, max_tokens=n_new, ignore_eos=True, seed=3)
    (dev_toks, steps), (host_toks, _) = spec_run(sp), spec_run(sp, on_device=False)
    verdict("sampling + n-gram: device rule == host", dev_toks == host_toks, f"{steps} verify steps")
    # the prefill logits themselves
    cache_c, cache_g = cpu.new_cache(8, 16), gpu.new_cache(8, 16)
    batch = make_batch([(prompts[0], 0, list(range(2)))], 16, all_logits=True)
    check("prefill logits cuda vs numba (20 rows)", gpu.forward(batch, cache_g), cpu.forward(batch, cache_c))
    results["graphs_used"] = bool(gpu.use_graphs and any(isinstance(v, tuple) for v in gpu._graphs.values()))
    if simulated():                                          # the simulator records no graphs
        verdict("decode steps ran eagerly (simulator)", not results["graphs_used"])
    else:
        verdict("decode steps ran as CUDA graphs", results["graphs_used"], "" if results["graphs_used"] else
                "(fell back to eager launches: see the message above)")


# ---------------------------------------------------------------------------------------------
def bench(cfg, W, prompt_len=128, n_new=128, runs=3):
    gpu, eager = CudaModel(cfg, W), CudaModel(cfg, W, graphs=False)
    B32 = 32
    loops = {"graph": Loop(gpu, B32 * 17 + 64), "eager": Loop(eager, 64)}
    one = [rng.integers(3, cfg.vocab_size, prompt_len).tolist()]
    many = [rng.integers(3, cfg.vocab_size, prompt_len).tolist() for _ in range(B32)]
    med = lambda xs: statistics.median(xs)  # noqa: E731
    for name, loop in loops.items():
        loop.run(one, 4)                                       # compile, record graphs
        pre, dec = [], []
        for _ in range(runs):
            _, tp, td = loop.run(one, n_new)
            pre.append(prompt_len / tp)
            dec.append((n_new - 1) / td)
        results["bench"][f"decode_b1_{name}_tok_s"] = med(dec)
        graphs = [v for k, v in loop.model._graphs.items() if isinstance(v, tuple) and k[0] == 1 and k[1]]
        if graphs:          # the same step as a bare graph replay: the rest is host work
            w, g = graphs[0]
            t = time.perf_counter()
            for _ in range(100):
                g.launch(loop.model._core_stream)
                loop.model.stream.synchronize()
            replay = (time.perf_counter() - t) / 100
            results["bench"]["decode_b1_replay_us"] = 1e6 * replay
            results["bench"]["decode_b1_host_us"] = 1e6 * (1 / med(dec) - replay)
            print(f"  batch 1: one decode step {1e6 / med(dec):.0f} us = graph replay {1e6 * replay:.0f} us "
                  f"+ host {1e6 * (1 / med(dec) - replay):.0f} us", flush=True)
        results["bench"][f"prefill_{name}_tok_s"] = med(pre)
        results["bench"][f"ttft_{name}_ms"] = 1e3 * prompt_len / med(pre)
        print(f"  batch 1 ({name}): prefill {med(pre):.0f} tok/s, decode {med(dec):.0f} tok/s", flush=True)
    loop = loops["graph"]
    loop.run(many, 4)
    dec, pre = [], []
    for _ in range(runs):
        _, tp, td = loop.run(many, n_new)
        pre.append(B32 * prompt_len / tp)
        dec.append(B32 * (n_new - 1) / td)
    results["bench"]["decode_b32_tok_s"] = med(dec)
    results["bench"]["prefill_b32_tok_s"] = med(pre)
    results["bench"]["prefill_tok_s"] = results["bench"]["prefill_graph_tok_s"]
    results["bench"]["decode_b1_tok_s"] = results["bench"]["decode_b1_graph_tok_s"]
    print(f"  batch 32: prefill {med(pre):.0f} tok/s, decode {med(dec):.0f} tok/s in total", flush=True)


# ---------------------------------------------------------------------------------------------
def graph_us(model, launch, n=30, reps=5):
    """GPU microseconds per launch: `launch(stream)` n times recorded as one CUDA graph, replayed
    reps times; None if this numba-cuda cannot record graphs."""
    try:
        from minfer.gpu.model import core_stream
        core = core_stream(model.stream)
        model.stream.synchronize()
        b = core.create_graph_builder().begin_building()
        for _ in range(n):
            launch(b)
        g = b.end_building().complete()
        g.upload(core)
        g.launch(core)
        model.stream.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            g.launch(core)
        model.stream.synchronize()
        return 1e6 * (time.perf_counter() - t) / (reps * n)
    except Exception as e:  # noqa: BLE001
        print(f"  (graph timing unavailable: {type(e).__name__}: {e})", flush=True)
        return None


def eager_us(model, launch, n=100):
    """Wall microseconds per launch from Python, n launches then one synchronize."""
    launch(model.stream)
    model.stream.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        launch(model.stream)
    model.stream.synchronize()
    return 1e6 * (time.perf_counter() - t) / n


def many_rows(cfg, W, Rs=(1, 8, 32, 128), tiles=(8, 64, 128), lanes=(8, 32), ks=(1, 4, 8, 16, 64, 128),
              context=128, n=30, repeats=5):
    """GPU microseconds of the fused matmuls at R rows for each tile and lane count, and the
    milliseconds of a k-token forward for each tile (eager launches, logits of the k rows)."""
    from dataclasses import replace
    gpu = CudaModel(cfg, W, graphs=False)
    c, L = cfg, gpu.layers[0]
    out = results["many_rows"] = {"matmul_us": {}, "k_forward_ms": {}}
    D, qd, F, V = c.dim, c.n_heads * c.head_dim, c.ffn_dim, c.vocab_size
    cache = gpu.new_cache(n_blocks=max(Rs) + 4, block_size=16)
    graphs = [True]                                  # until a recording fails
    print("  fused matmuls, GPU us per launch (graph; eager wall us where graphs are unavailable)",
          flush=True)
    for R in Rs:
        x, a, h = dev(randn(R, D)), dev(randn(R, qd)), dev(randn(R, F))
        q, hh = cuda.device_array((R, qd), np.float32), cuda.device_array((R, F), np.float32)
        res, logits = dev(randn(R, D)), cuda.device_array((R, V), np.float32)
        rows = dev(np.arange(R, dtype=np.int32))
        pos = dev(np.full(R, context, np.int32))
        slots = dev(np.arange(R, dtype=np.int32) * 16)           # one per block: no two alike
        for ln in lanes:
            for tile in tiles:
                mm = dict(lanes=ln, groups=gpu.launch.groups, tile=tile)
                kern = {
                    "qkv": lambda s: qkv_cuda(x, L.attn_norm, c.rms_eps, L.wqkv, pos, slots, gpu.cos, gpu.sin,
                                              q, cache.k, cache.v, 0, stream=s, **mm),
                    "W_o": lambda s: linear_cuda(a, L.wo, res, rows, accumulate=True, stream=s, **mm),
                    "gate/up": lambda s: swiglu_cuda(x, L.ffn_norm, c.rms_eps, L.w_gate_up, hh, stream=s, **mm),
                    "W_down": lambda s: linear_cuda(h, L.w_down, res, rows, accumulate=True, stream=s, **mm),
                    "LM head": lambda s: linear_cuda(x, gpu.lm_head, logits, rows, norm=gpu.norm, eps=c.rms_eps,
                                                     stream=s, **mm),
                }
                line = out["matmul_us"][f"R={R} lanes={ln} tile={tile}"] = {}
                for name, fn in kern.items():
                    try:
                        us = graph_us(gpu, fn, n=n, reps=5) if graphs[0] else None
                        if us is None:                  # no graphs here: eager wall time
                            graphs[0] = False
                            us = eager_us(gpu, fn, max(1, n // 10))
                    except Exception as ex:  # noqa: BLE001 — e.g. too many registers for a shape
                        print(f"    R={R} lanes={ln} tile={tile} {name} failed: {type(ex).__name__}: "
                              f"{str(ex)[:200]}", flush=True)
                        continue
                    line[name] = us
                layer = sum(line.get(k, float("nan")) for k in list(kern)[:4])
                line["layer"] = layer
                print(f"    R={R:<4} lanes {ln:>2} tile {tile:>3}: " + "  ".join(
                    f"{k} {v:7.1f}" for k, v in line.items()) + f"  | {layer / R:6.2f} us/row/layer",
                    flush=True)
    print(f"  k-token forward after {context} cached tokens (eager, logits of the k rows), ms per step",
          flush=True)
    bm = BlockManager(cache)
    ids = rng.integers(3, V, context + max(ks)).tolist()
    for tile in tiles:
        gpu.launch = replace(gpu.launch, tile=tile)
        for k in ks:
            table = bm.ensure(0, context + k)
            gpu.forward(make_batch([(ids[:context], 0, table)], 16), cache)
            batch = make_batch([(ids[context:context + k], context, table)], 16, logits_for=[k])
            gpu.forward(batch, cache)                          # untimed: compiles, warms
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                gpu.forward(batch, cache)
                times.append(time.perf_counter() - t)
            bm.release(0)
            ms = 1e3 * statistics.median(times)
            out["k_forward_ms"][f"k={k} tile={tile}"] = ms
            print(f"    tile {tile:>3}, k {k:>3}: {ms:8.2f} ms ({k / ms * 1e3:7.0f} tok/s)", flush=True)


def profile(cfg, W, sizes=(1, 32, 128), context=128, n=100):
    from minfer.stages.attention import paged_attention_cuda as attn
    from minfer.stages.embedding import embedding_cuda
    gpu = CudaModel(cfg, W, graphs=False)
    c, k = cfg, gpu.launch
    mm = dict(lanes=k.lanes, groups=k.groups)
    L = gpu.layers[0]
    cache = gpu.new_cache(n_blocks=max(sizes) * (context // 16 + 2) + 16, block_size=16)
    bm = BlockManager(cache)
    prof = results["profile"] = {}
    for T in sizes:
        if T == sizes[-1]:     # prefill: one T-token prompt, logits of its last row
            bm.ensure(0, context)
            batch = make_batch([(list(range(3, 3 + T)), 0, bm.tables[0])], 16)
        else:            # decode: T sequences, each bringing one token at position `context`
            for s in range(T):
                bm.ensure(s, context + 1)
            batch = make_batch([([5], context, bm.tables[s]) for s in range(T)], 16)
        R = len(batch.logits_rows)
        B, M = batch.block_tables.shape
        w = gpu._work_for(T, B, M, R)
        w.upload(batch, gpu.stream)
        w.params[:R].copy_to_device(params_array([SamplingParams(temperature=0.8, top_p=0.9)] * R,
                                                 [np.random.default_rng(0)] * R), stream=gpu.stream)
        x, q, a, h = w.x[:T], w.q[:T], w.a[:T], w.h[:T]
        greedy = cuda.to_device(np.zeros((R, 5), np.float32))
        kern = {
            "embedding": lambda s: embedding_cuda(w.tok, gpu.tok_embd, x, threads=k.rows, stream=s),
            "norm+QKV+RoPE+cache": lambda s: qkv_cuda(x, L.attn_norm, c.rms_eps, L.wqkv, w.pos, w.slot, gpu.cos,
                                                      gpu.sin, q, cache.k, cache.v, 0, stream=s, **mm),
            "attention": lambda s: attn(q, cache.k, cache.v, 0, w.seq, w.pos, w.tables, a, threads=k.attn, stream=s),
            "W_o + residual": lambda s: linear_cuda(a, L.wo, x, w.arange, accumulate=True, stream=s, **mm),
            "norm+gate/up+SiLU": lambda s: swiglu_cuda(x, L.ffn_norm, c.rms_eps, L.w_gate_up, h, stream=s, **mm),
            "W_down + residual": lambda s: linear_cuda(h, L.w_down, x, w.arange, accumulate=True, stream=s, **mm),
            "LM head (norm, R rows)": lambda s: linear_cuda(x, gpu.lm_head, w.logits[:R], w.rows, norm=gpu.norm,
                                                            eps=c.rms_eps, stream=s, **mm),
            "sampling (greedy)": lambda s: sample_cuda(w.logits[:R], greedy[:R], w.ids[:R], threads=k.sample, stream=s),
            "sampling (T 0.8, top-p 0.9)": lambda s: sample_cuda(w.logits[:R], w.params[:R], w.ids[:R],
                                                                 threads=k.sample, stream=s),
        }
        for lanes, groups in ((16, 4), (8, 4), (32, 2), (32, 1)):      # other launch shapes of the matmuls
            sh = dict(lanes=lanes, groups=groups)
            kern[f"  LM head, lanes {lanes} groups {groups}"] = (
                lambda s, sh=sh: linear_cuda(x, gpu.lm_head, w.logits[:R], w.rows, norm=gpu.norm, eps=c.rms_eps,
                                             stream=s, **sh))
            kern[f"  gate/up, lanes {lanes} groups {groups}"] = (
                lambda s, sh=sh: swiglu_cuda(x, L.ffn_norm, c.rms_eps, L.w_gate_up, h, stream=s, **sh))
        row = prof[f"T={T}"] = {}
        print(f"  T={T} (R={R} logits rows), context {context}: GPU us per launch (graph) | eager wall us",
              flush=True)
        for threads in (128, 512):
            kern[f"  attention, {threads} threads"] = (
                lambda s, th=threads: attn(q, cache.k, cache.v, 0, w.seq, w.pos, w.tables, a, threads=th, stream=s))
        kern["  sampling top-p, 512 threads"] = lambda s: sample_cuda(w.logits[:R], w.params[:R], w.ids[:R],
                                                                      threads=512, stream=s)
        for name, fn in kern.items():
            try:
                e = eager_us(gpu, fn, n)
                g = graph_us(gpu, fn, n=min(n, 30), reps=5)
            except Exception as ex:  # noqa: BLE001 — e.g. too many registers for a launch shape
                print(f"    {name:<30} failed: {type(ex).__name__}: {str(ex)[:200]}", flush=True)
                continue
            row[name] = {"graph_us": g, "eager_us": e}
            print(f"    {name:<30} {g if g is not None else float('nan'):9.1f} | {e:9.1f}", flush=True)
        if all(v["graph_us"] is not None for v in row.values()) and len(row) >= 9:
            per_layer = sum(row[n]["graph_us"] for n in list(kern)[1:6])
            step = row["embedding"]["graph_us"] + c.n_layers * per_layer + row["LM head (norm, R rows)"]["graph_us"] \
                + row["sampling (greedy)"]["graph_us"]
            row["step_us_sum"] = step
            print(f"    sum for one step ({c.n_layers} layers): {step:.0f} us = {T / step * 1e6:.0f} tok/s", flush=True)
        for s in range(B):
            bm.release(s)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (to try the script on the simulator)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    a = ap.parse_args()
    try:
        check_available()
    except MinferError as e:
        ap.exit(1, f"gpu_check: {e.args[0].split('; use --backend')[0]}; on a machine without "
                   f"one, NUMBA_ENABLE_CUDASIM=1 python tools/gpu_check.py --tiny runs it on the "
                   f"simulator (minutes)\n")
    c = TINY if a.tiny else SMOLLM2
    L = Launch.for_here()
    import numba
    name = "simulator" if numba.config.ENABLE_CUDASIM else cuda.get_current_device().name
    name = name.decode() if isinstance(name, bytes) else name
    try:
        import numba_cuda
        ncv = getattr(numba_cuda, "__version__", "?")
    except ImportError:
        ncv = "built-in"
    results["machine"] = {"gpu": str(name), "numba": numba.__version__, "numba_cuda": ncv,
                          "numpy": np.__version__, "python": sys.version.split()[0]}
    t0 = time.perf_counter()
    t = time.perf_counter()
    results["model"] = random_model(c)
    print(f"random weights of the model's shape built in {time.perf_counter() - t:.0f} s", flush=True)
    sections = [("kernels at the real shapes", lambda: kernels(c, L)),
                ("end-to-end vs the numba backend", lambda: end_to_end(*results["model"], 4 if a.tiny else 32))]
    if not a.tiny:
        sections.append(("benchmark (random weights, SmolLM2-135M shape)", lambda: bench(*results["model"])))
    tiny_rows = dict(Rs=(1, 3, 9), tiles=(8, 64), lanes=(L.lanes,), ks=(1, 3), context=16, n=1, repeats=1)
    sections.append(("many rows: the weights read once per step",
                     lambda: many_rows(*results["model"], **(tiny_rows if a.tiny else {}))))
    sections.append(("profile: GPU time per kernel", lambda: profile(*results["model"], **(dict(sizes=(1, 2, 8), context=16, n=2) if a.tiny else {}))))
    for title, fn in sections:
        print(f"== {title}", flush=True)
        try:
            fn()
        except Exception:  # noqa: BLE001 — report and go on with the other sections
            traceback.print_exc()
            results["checks"][title] = {"ok": False, "detail": "raised (traceback above)"}
        save(a.json)                          # after every section: a timeout keeps what ran
    results.pop("model", None)
    bad = [k for k, v in results["checks"].items() if not v["ok"]]
    m, b = results["machine"], results["bench"]
    print("\n" + "=" * 78)
    print(f"minfer gpu_check on {m['gpu']} — numba {m['numba']}, numba-cuda {m['numba_cuda']}, "
          f"numpy {m['numpy']}; {time.perf_counter() - t0:.0f} s")
    print(f"checks      {len(results['checks']) - len(bad)}/{len(results['checks'])} passed"
          + (f"; FAILED: {', '.join(bad)}" if bad else ""))
    if b:
        for key, label in (("prefill_tok_s", "prefill, one 128-token prompt"),
                           ("decode_b1_tok_s", "decode, batch 1 (graphs)"),
                           ("decode_b32_tok_s", "decode, batch 32 (total)")):
            v, target = b.get(key), TARGETS[key]
            if v is not None:
                print(f"{label:<34} {v:>9.0f} tok/s   target >= {target} ({'met' if v >= target else 'NOT met'})")
        if "decode_b1_eager_tok_s" in b:
            print(f"{'decode, batch 1 (eager launches)':<34} {b['decode_b1_eager_tok_s']:>9.0f} tok/s")
    print("=" * 78)
    save(a.json)
    return 1 if bad else 0


def save(path):
    if path or os.environ.get("OUT"):
        path = path or os.path.join(os.environ["OUT"], "gpu_check.json")
        Path(path).write_text(json.dumps({k: v for k, v in results.items() if k != "model"}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
