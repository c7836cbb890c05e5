"""python -m minfer bench --workload serve | prefix — many requests through one engine.

serve: a seeded set of requests (prompt and output lengths drawn from fixed long-tailed
distributions, greedy, EOS ignored so lengths are as drawn) run three ways on the same engine:

  one-at-a-time   a request starts when the one before has finished
  static          batches of --max-seqs requests; a batch runs until its longest member is done
                  (how batching worked before the scheduler: later requests wait for all of it)
  continuous      every request goes to the scheduler as it arrives; finished ones leave at once

first with all requests arriving at once, then (--rate R) arriving as a Poisson process of R
requests a second. Reported per way: output tokens/s, requests/s, time to first token and
inter-token latency (p50 / p90 / p99; TTFT counted from the request's arrival, its waiting
included), the most KV blocks in use, preemptions and prompt tokens found in the prefix cache.

prefix: every request begins with the same 200-token system prompt; the same requests run with the
prefix cache and without it, and the table shows how many prompt tokens each had to compute.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


WAYS = ("one-at-a-time", "static", "continuous")
REQUESTS = 64


def check_flags(a) -> None:
    """The workload flags' values (bench.py checks that a workload is what reads them); fills in
    their defaults."""
    from .errors import InvalidArgumentError
    if a.workload == "speed" or a.quality:
        return
    a.requests = REQUESTS if a.requests is None else a.requests
    if a.requests < 1:
        raise InvalidArgumentError(f"--requests must be at least 1, got {a.requests}")
    if a.rate is not None and not (a.rate >= 0 and np.isfinite(a.rate)):      # (0: off)
        raise InvalidArgumentError(f"--rate is requests a second, a number >= 0 (0: off), got {a.rate:g}")
    ways = [w.strip() for w in (a.ways if a.ways is not None else ",".join(WAYS)).split(",") if w.strip()]
    bad = [w for w in ways if w not in WAYS]
    if bad or not ways:
        raise InvalidArgumentError(f"--ways takes {', '.join(WAYS)} (comma-separated), got {a.ways!r}")
    a.ways = ",".join(ways)


def make_requests(n: int, vocab: int, seed: int = 0, max_prompt: int = 1024):
    """n (prompt ids, new tokens) pairs: prompts 16..max_prompt and outputs 8..256 tokens, long-tailed
    (log-normal: most short, a few long)."""
    rng = np.random.default_rng(seed)
    plen = np.clip(rng.lognormal(np.log(120), 1.0, n), 16, max_prompt).astype(int)
    olen = np.clip(rng.lognormal(np.log(48), 0.9, n), 8, 256).astype(int)
    return [(rng.integers(3, vocab, p).tolist(), int(o)) for p, o in zip(plen, olen)]


def _pct(values, q):
    return float(np.percentile(values, q)) if len(values) else float("nan")


def run_way(llm, requests, way: str, arrivals: list[float], max_seqs: int) -> dict:
    """Run the requests through llm.engine one of three ways; arrivals: seconds after the start."""
    from .sampling import SamplingParams
    eng = llm.engine
    eng.blocks.reset_prefix_cache()                # each way starts cold: no hits from the last
    blocks0, pre0, cached0 = eng.blocks.n_used, eng.scheduler.n_preemptions, eng.scheduler.cached_tokens
    pending = list(range(len(requests)))           # not yet given to the engine, in arrival order
    seqs: dict[int, object] = {}                   # request index -> its sequence
    peak_blocks, t0 = 0, time.perf_counter()
    while pending or eng.has_unfinished():
        now = time.perf_counter() - t0
        arrived = [i for i in pending if arrivals[i] <= now]
        idle = not eng.has_unfinished()
        take = (arrived if way == "continuous" else
                arrived[:1] if way == "one-at-a-time" and idle else
                arrived[:max_seqs] if way == "static" and idle else [])
        for i in take:
            prompt, n_new = requests[i]
            seqs[i] = eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=n_new,
                                                             ignore_eos=True))
            pending.remove(i)
        if not eng.has_unfinished():
            time.sleep(min(0.005, max(0.0, arrivals[pending[0]] - now)))   # wait for the next one
            continue
        eng.step()
        peak_blocks = max(peak_blocks, eng.blocks.n_used)
    wall = time.perf_counter() - t0
    ttft = [s.metrics.first_token - (t0 + arrivals[i]) for i, s in seqs.items()]
    itl = [x for s in seqs.values() for x in s.metrics.inter_token_latencies]
    out_tokens = sum(len(s.output_ids) for s in seqs.values())
    return dict(way=way, requests=len(seqs), output_tokens=out_tokens, wall_s=wall,
                output_tok_s=out_tokens / wall, req_s=len(seqs) / wall,
                ttft_p50=_pct(ttft, 50), ttft_p90=_pct(ttft, 90), ttft_p99=_pct(ttft, 99),
                itl_p50=_pct(itl, 50), itl_p90=_pct(itl, 90), itl_p99=_pct(itl, 99),
                peak_blocks=peak_blocks - blocks0,
                preemptions=eng.scheduler.n_preemptions - pre0,
                cached_prompt_tokens=eng.scheduler.cached_tokens - cached0)


def _llm(a, prefix_caching=True):
    import minfer
    from .weights.fetch import ensure_default_model
    from .errors import InvalidArgumentError
    backend = a.backend                           # (one: bench.py's run_bench made sure)
    quant, act = a.quant.strip(), a.activations.strip()
    for flag, value in (("--quant", quant), ("--activations", act)):
        if "," in value:
            raise InvalidArgumentError(f"--workload runs one configuration: give one {flag}")
    return minfer.LLM(a.model or ensure_default_model(quiet=True), backend=backend, quant=quant,
                      activations=act, threads=a.threads, kv_cache_mb=a.kv_cache_mb,
                      max_seqs=a.max_seqs, max_batch_tokens=a.max_batch_tokens,
                      prefix_caching=prefix_caching)


MIN_CONTEXT = 16 + 256 + 1          # the shortest prompt and the longest answer of make_requests


def _warm_up(llm) -> None:
    """Compile every kernel the ways will use (prompt chunks, decode) before anything is timed."""
    from .errors import InvalidArgumentError
    from .sampling import SamplingParams
    n = llm.engine.max_context
    if n < MIN_CONTEXT:
        why = ("the model's" if n == llm.config.max_seq_len else
               "this KV cache's: give it more (--kv-cache-mb)")
        raise InvalidArgumentError(f"the workload's requests need a context of {MIN_CONTEXT} tokens "
                                   f"(prompts from 16, answers up to 256); it holds {n}, {why}")
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate([[5] * 300, [6] * 20, [7] * 3], p)


def run_serve(a, machine: dict | None = None) -> int:
    """machine: bench.py's description of this machine, for the JSON record."""
    llm = _llm(a)
    _warm_up(llm)
    reqs = make_requests(a.requests, llm.config.vocab_size, seed=a.seed,
                         max_prompt=max(16, min(1024, llm.engine.max_context - 257)))
    rng = np.random.default_rng(a.seed + 1)
    cases = [("all at once", [0.0] * len(reqs))]
    if a.rate:
        cases.append((f"Poisson {a.rate:g}/s", np.cumsum(rng.exponential(1 / a.rate, len(reqs))).tolist()))
    ways = [w.strip() for w in a.ways.split(",") if w.strip()]
    print(f"minfer bench --workload serve: {len(reqs)} requests, prompts "
          f"{min(len(p) for p, _ in reqs)}..{max(len(p) for p, _ in reqs)} tokens, outputs "
          f"{min(o for _, o in reqs)}..{max(o for _, o in reqs)}; max {a.max_seqs} sequences, "
          f"{a.max_batch_tokens} tokens a step", file=sys.stderr)
    rows = []
    for case, arrivals in cases:
        for way in ways:
            print(f"  {case}: {way} ...", file=sys.stderr, flush=True)
            r = run_way(llm, reqs, way, arrivals, a.max_seqs)
            rows.append(dict(case=case, **r))
    _print_rows(rows)
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine, "settings": vars(a), "results": rows},
                                           indent=1, default=str))
    return 0


def _print_rows(rows) -> None:
    head = (f"{'arrivals':<14} {'way':<14} {'out tok/s':>9} {'req/s':>6} {'TTFT p50/p90/p99 s':>20} "
            f"{'ITL p50/p90/p99 ms':>20} {'blocks':>6} {'preempt':>7} {'cached':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['case']:<14} {r['way']:<14} {r['output_tok_s']:>9.1f} {r['req_s']:>6.2f} "
              f"{r['ttft_p50']:>6.2f}/{r['ttft_p90']:.2f}/{r['ttft_p99']:<6.2f} "
              f"{r['itl_p50'] * 1e3:>6.0f}/{r['itl_p90'] * 1e3:.0f}/{r['itl_p99'] * 1e3:<6.0f} "
              f"{r['peak_blocks']:>6} {r['preemptions']:>7} {r['cached_prompt_tokens']:>7}")
    for case in dict.fromkeys(r["case"] for r in rows):
        by = {r["way"]: r for r in rows if r["case"] == case}
        if "continuous" in by and len(by) > 1:
            c = by["continuous"]["output_tok_s"]
            print(f"{case}: continuous = " + ", ".join(
                f"{c / by[w]['output_tok_s']:.2f}x {w}" for w in by if w != "continuous"))


def run_prefix(a) -> int:
    from .sampling import SamplingParams
    rng = np.random.default_rng(a.seed)
    rows = []
    for caching in (True, False):
        llm = _llm(a, prefix_caching=caching)
        _warm_up(llm)
        system = np.random.default_rng(a.seed).integers(3, llm.config.vocab_size, 200).tolist()
        rng = np.random.default_rng(a.seed + 1)
        prompts = [system + rng.integers(3, llm.config.vocab_size, int(rng.integers(16, 64))).tolist()
                   for _ in range(a.requests)]
        eng = llm.engine
        c0, t0 = eng.computed_tokens, time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
        wall = time.perf_counter() - t0
        prompt_total = sum(len(p) for p in prompts)
        computed = eng.computed_tokens - c0 - sum(len(o.token_ids) - 1 for o in outs)
        ttft = [o.metrics.ttft for o in outs]
        rows.append(dict(prefix_cache=caching, prompt_tokens=prompt_total, computed_prompt_tokens=computed,
                         cached=sum(o.cached_tokens for o in outs), wall_s=wall,
                         ttft_p50=_pct(ttft, 50), ttft_p99=_pct(ttft, 99)))
    print(f"{'prefix cache':<13} {'prompt tokens':>13} {'computed':>9} {'from cache':>10} {'wall s':>7} "
          f"{'TTFT p50/p99 s':>15}")
    for r in rows:
        print(f"{'on' if r['prefix_cache'] else 'off':<13} {r['prompt_tokens']:>13} "
              f"{r['computed_prompt_tokens']:>9} {r['cached']:>10} {r['wall_s']:>7.1f} "
              f"{r['ttft_p50']:>7.2f}/{r['ttft_p99']:.2f}")
    on, off = rows
    print(f"with the prefix cache: {1 - on['computed_prompt_tokens'] / off['computed_prompt_tokens']:.0%} "
          f"fewer prompt tokens computed, {off['wall_s'] / on['wall_s']:.2f}x faster end to end")
    if a.json:
        Path(a.json).write_text(json.dumps({"settings": vars(a), "results": rows}, indent=1, default=str))
    return 0


def add_arguments(p) -> None:
    from .engine.engine import DEFAULT_KV_CACHE_MB, DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_SEQS
    g = p.add_argument_group("serving workloads (--workload serve | prefix)")
    g.add_argument("--workload", default="speed", choices=["speed", "serve", "prefix"],
                   help="speed: one request's prefill/decode (default); serve: many requests, "
                        "one-at-a-time vs static vs continuous batching; prefix: a shared system "
                        "prompt with and without the prefix cache")
    g.add_argument("--requests", type=int, default=None,
                   help=f"requests in the workload (default: {REQUESTS})")
    g.add_argument("--rate", type=float, default=None, metavar="R",
                   help="serve: also run with Poisson arrivals of R requests/s (default: off)")
    g.add_argument("--ways", default=None,
                   help=f"serve: comma-separated ways to run the workload, of {', '.join(WAYS)} "
                        f"(default: all three)")
    g.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    g.add_argument("--kv-cache-mb", type=float, default=DEFAULT_KV_CACHE_MB, metavar="MB")
    g.add_argument("--max-seqs", type=int, default=DEFAULT_MAX_SEQS, metavar="N")
    g.add_argument("--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS, metavar="N")
