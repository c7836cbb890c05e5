"""One-process A/B of steps with many rows: the many-row tiles (quant_gemm.py) against the matvec
kernels, on the same model, the same batches, turn by turn.

    python tools/rows_ab.py --batch 1,4,16,32 --verify-tokens 1,2,4,8,16 --prefill 128

"tiles" is the default route (KernelConfig.many_rows, or tiles from --from-rows rows on); "matvec"
sends every step to the matvec kernels (many_rows never), as before the tiles; with --against
sgemm, "sgemm" sends every step to model.run_layers (region_max_rows = 1: the sgemm tiles from
KernelConfig.sgemm_min_rows rows on); with --against vector, "vector" keeps the panels' byte products
off the CPU's tile unit (tile_unit_rows never: the vector panels at every row count, as on a CPU
without AMX); with --against per-row, "per-row" runs attention's jobs a row at a time
(attention_lane_rows never: no rows in lanes). --float-kernels: as on a CPU without VNNI. Each route is a
model of its own (stages/quant_dispatch.KernelConfig), on the same weights. Every measurement
alternates the two (in swapped order each round), so that a noisy minute on a shared machine
lands on both; medians and their ratio.
--cpu-time times with the process's CPU clock (use it with NUMBA_NUM_THREADS=1: other people's
jobs on the machine then cost no time of ours, which a wall clock and two threads meeting at
barriers do not give).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np

import minfer
from minfer.batch import make_batch
from minfer.cpu.model import CpuModel
from minfer.stages.quant_dispatch import KernelConfig

PREFIX = 80


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", default="1,4,16,32", help="decode steps of B sequences")
    ap.add_argument("--verify-tokens", default="1,2,4,8,16", help="k new tokens after a prefix")
    ap.add_argument("--prefill", default="128", help="prompt lengths (0: none)")
    ap.add_argument("--quant", default="auto")
    ap.add_argument("--activations", default="f32")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--cpu-time", action="store_true")
    ap.add_argument("--from-rows", type=int, default=None, help="tiles from this many rows on")
    ap.add_argument("--against", choices=("matvec", "sgemm", "vector", "per-row"), default="matvec")
    ap.add_argument("--float-kernels", action="store_true")
    ap.add_argument("--prefix", type=int, default=PREFIX,
                    help=f"cached tokens before the decode and verify steps (default {PREFIX})")
    ap.add_argument("--region-max", type=int, default=None,
                    help="tiles: the one-region step up to this many rows (region_max_rows)")
    a = ap.parse_args()
    for flag, value, least in (("--rounds", a.rounds, 1), ("--prefix", a.prefix, 1),
                               ("--from-rows", a.from_rows, 1), ("--region-max", a.region_max, 1)):
        if value is not None and value < least:
            ap.error(f"{flag} must be at least {least}, got {value}")
    kernels = KernelConfig(split_x=False) if a.float_kernels else KernelConfig()
    clock = time.process_time if a.cpu_time else time.perf_counter
    def ints(text, flag):                             # 0: none
        try:
            vals = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            ap.error(f"{flag} takes whole numbers separated by commas, got {text!r}")
        if any(v < 0 for v in vals):
            ap.error(f"{flag} takes numbers >= 0 (0: none), got {text!r}")
        return [v for v in vals if v > 0]
    batches, ks, prompts = (ints(a.batch, "--batch"), ints(a.verify_tokens, "--verify-tokens"),
                            ints(a.prefill, "--prefill"))
    llm = minfer.LLM(backend="numba", quant=a.quant, activations=a.activations, quiet=True,
                     kernels=kernels)
    model, bs, V = llm.model, 16, llm.config.vocab_size
    n = max(batches + [1])
    prefix = a.prefix
    per = -(-(prefix + max(ks + [1]) + 1) // bs)
    cache = model.new_cache(n_blocks=per * n, block_size=bs)
    tables = [list(range(i * per, (i + 1) * per)) for i in range(n)]
    rng = np.random.default_rng(0)
    model.forward(make_batch([(rng.integers(3, V, prefix).tolist(), 0, tables[0])], bs), cache)
    for t in tables[1:]:
        cache.k[:, t], cache.v[:, t] = cache.k[:, tables[0]], cache.v[:, tables[0]]
    pcache = model.new_cache(n_blocks=-(-max(prompts + [1]) // bs), block_size=bs)

    def cases():
        for B in batches:
            yield f"decode B={B}", B, make_batch(
                [([int(rng.integers(3, V))], prefix, tables[i]) for i in range(B)], bs), cache
        for k in ks:
            yield f"verify k={k}", None, make_batch(
                [(rng.integers(3, V, k).tolist(), prefix, tables[0])], bs, all_logits=True), cache
        for P in prompts:
            yield f"prefill {P}", P, make_batch(
                [(rng.integers(3, V, P).tolist(), 0, list(range(-(-P // bs))))], bs), pcache
    tiles = kernels.many_rows if a.from_rows is None else (a.from_rows,) * 4
    longest = kernels.region_max_rows if a.region_max is None else a.region_max
    never = (1 << 30,) * 4
    other = {"matvec": {"many_rows": never}, "sgemm": {"region_max_rows": 1},
             "vector": {"tile_unit_rows": never}, "per-row": {"attention_lane_rows": 1 << 30}}[a.against]
    modes = {"tiles": {}, a.against: other}
    models = {mode: CpuModel(llm.config, llm.weights, model.ops, model.int8_act,
                             kernels=dataclasses.replace(kernels, **dict(
                                 {"many_rows": tiles, "region_max_rows": longest}, **change)))
              for mode, change in modes.items()}
    res: dict = {}
    for r in range(a.rounds + 1):                         # round 0: warm-up, not counted
        for name, per_s, b, c in cases():
            for mode in (list(modes) if r % 2 else list(modes)[::-1]):
                t0 = clock()
                models[mode].forward(b, c)
                if r:
                    res.setdefault((name, per_s), {}).setdefault(mode, []).append(clock() - t0)
    other = a.against
    for (name, per_s), m in res.items():
        t, v = statistics.median(m["tiles"]), statistics.median(m[other])
        rate = (lambda s: f" {per_s / s:7.0f} tok/s") if per_s else (lambda s: "")
        print(f"{name:<14} tiles {t * 1e3:8.1f} ms{rate(t)} | {other} {v * 1e3:8.1f} ms{rate(v)}"
              f" | tiles/{other} {t / v:.2f}")


if __name__ == "__main__":
    main()
