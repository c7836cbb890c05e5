"""How fast could decode be here? The ideal step, measured part by part, against minfer's own.

    python tools/decode_floor.py                  # default model: --quant auto,q8_0,q4_0
    python tools/decode_floor.py --quant q8_0 --runs 9

A decode step must read every weight it multiplies once from memory (the model is larger than
a typical CPU's L3 cache, or than its share of a shared one, and the next step needs them all
again), and the KV cache of every layer.
So no step can be shorter than

    (weight bytes + KV cache bytes) / the machine's read bandwidth

and in minfer's numba backend a step also opens a parallel region: one (cpu/region.py: the layers,
the final norm and the LM head in one call; where the LM head's format is one the layers'
kernels do not read — a CPU without VNNI — a second one for it). This script measures each of those here:

  bandwidth    the best rate at which the numba threads read a 256 MB buffer: 64-byte vector
               loads, software prefetch 4 or 16 KB ahead (docs/benchmarks.md has figures)
  regions      the cost of an empty numba parallel region, times the regions of a step
               (1; the barriers inside region.py's one region, 6 a layer, are not counted)
  attention    (shown, not counted) minfer's decode attention at 192 keys, its cache in L2

and prints, for each weight format, the ideal: the decode speed of a step that read its weights
and the KV cache at that bandwidth and opened its regions, and did nothing else — and minfer's
decode (bench's run: 128-token prompt, 128 new tokens) as a share of it. Real steps add the
arithmetic (the three-part kernels of minfer's default float32 activations are bound by it on
4-bit weights), attention, norms, RoPE, sampling and Python (~0.25 ms a step: it runs on caches
the weights have just flushed). The machine is shared: its bandwidth moves with its neighbours,
so run it twice and compare.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numba  # noqa: E402
from numba import njit, prange  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

import minfer  # noqa: E402
from minfer.stages.attention import _attention_rows  # noqa: E402
from minfer.stages.quant_i8 import I32, _load, _prefetch  # noqa: E402
from minfer.weights.load import QUANTS  # noqa: E402


@intrinsic
def _or64(typingctx, acc, a, off):
    """acc | (the OR of the 8 int64 words at a.flat[off:]): one 64-byte load, kept live."""
    def codegen(context, builder, sig, args):
        v = _load(context, builder, sig.args[1], args[1], args[2], ir.IntType(64), 8)
        r = args[0]
        for i in range(8):
            r = builder.or_(r, builder.extract_element(v, ir.Constant(I32, i)))
        return r
    return types.int64(acc, a, off), codegen


@njit(parallel=True)
def _read_all(a, ahead):
    """Read every byte of a (48 chunks shared out to the threads), prefetching `ahead` bytes on."""
    n, chunks = a.size, 48
    total = 0
    for c in prange(chunks):
        s = 0
        for k in range(c * (n // chunks), (c + 1) * (n // chunks), 64):
            _prefetch(a, min(n - 1, k + ahead))
            s = _or64(s, a, k)
        total += s
    return total


@njit(parallel=True)
def _empty_region(a):
    for i in prange(a.size):
        a[i] += 1.0


def median_time(f, runs):
    f()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def decode_bytes(llm) -> int:
    """Bytes a decode step reads: all the weights, less the embedding when it is not the LM head
    (a step reads one row of it)."""
    w = llm.weights
    return w.nbytes() - (0 if w.lm_head is w.tok_embd else w.tok_embd.nbytes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF path (default: the default model)")
    ap.add_argument("--quant", default="auto,q8_0,q4_0", help="weight formats, comma-separated")
    ap.add_argument("--runs", type=int, default=5, help="runs of each measurement (median)")
    a = ap.parse_args()
    if a.runs < 1:
        ap.error(f"--runs must be at least 1, got {a.runs}")
    quants = a.quant.split(",")
    bad = [q for q in quants if q not in QUANTS]
    if bad:
        raise minfer.errors.InvalidArgumentError(
            f"unknown quant {bad[0]!r}; choose from: {', '.join(QUANTS)}")
    prompt_tokens, new_tokens = 128, 128                   # as `python -m minfer bench` does
    context = prompt_tokens + new_tokens // 2              # keys a decode step sees, on average

    llm0 = minfer.LLM(a.model, quiet=True)                 # a bad --model fails here, first
    buf = np.ones(256 << 20, dtype=np.uint8)
    bw = max(buf.nbytes / median_time(lambda: _read_all(buf, ahead), a.runs) for ahead in (4096, 16384))
    region = median_time(lambda: _empty_region(np.zeros(2)), 200 * a.runs)

    c = llm0.config
    regions = 1
    kv_bytes = 2 * c.n_layers * context * c.n_kv_heads * c.head_dim * 4     # K and V, float32
    rng = np.random.default_rng(0)
    bs = 16
    nb = (context + bs - 1) // bs
    k = rng.standard_normal((nb, bs, c.n_kv_heads, c.head_dim)).astype(np.float32)
    v = rng.standard_normal((nb, bs, c.n_kv_heads, c.head_dim)).astype(np.float32)
    q = rng.standard_normal((1, c.n_heads, c.head_dim)).astype(np.float32)
    args = (q, k, v, np.zeros(1, np.int32), np.array([context - 1], np.int32),
            np.arange(nb, dtype=np.int32)[None])
    attn = median_time(lambda: _attention_rows(*args), 50 * a.runs)

    print(f"read bandwidth, {numba.get_num_threads()} threads: {bw / 1e9:.1f} GB/s")
    print(f"parallel regions: {regions} a step x {region * 1e6:.1f} us = {regions * region * 1e3:.2f} ms")
    print(f"KV cache at {context} keys: {kv_bytes / 1e6:.1f} MB a step; minfer's decode attention "
          f"with it in cache: {attn * 1e6:.1f} us a layer (not in the ideal)")
    print(f"{'quant':<6} {'format':<7} {'weights MB':>10} {'ideal ms':>9} {'ideal tok/s':>12} "
          f"{'minfer tok/s':>13} {'of ideal':>9}")
    for quant in quants:
        llm = llm0 if quant == "auto" else minfer.LLM(a.model, quant=quant, quiet=True)
        nbytes = decode_bytes(llm)
        ideal = (nbytes + kv_bytes) / bw + regions * region
        prompt = rng.integers(3, c.vocab_size, prompt_tokens).tolist()
        params = minfer.SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        speeds = []
        for _ in range(a.runs + 1):                        # the first compiles and warms up
            llm.generate([prompt], params)
            speeds.append(llm.stats.decode_tok_s)
        speed = statistics.median(speeds[1:])
        fmt = llm.weights.stacks.get("w_up", ("F32",))[0]
        print(f"{quant:<6} {fmt:<7} {nbytes / 1e6:10.2f} {ideal * 1e3:9.2f} {1 / ideal:12.0f} "
              f"{speed:13.1f} {speed * ideal:9.0%}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except minfer.MinferError as e:                        # a bad --model or --quant: one line
        print(f"decode_floor: {e}", file=sys.stderr)
        sys.exit(2)
