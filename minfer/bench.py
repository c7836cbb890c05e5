"""python -m minfer bench — the one benchmark harness of the project.

For each configuration (backend x quant) it measures, in a fresh subprocess of its own so that
memory and JIT state do not leak between configurations:

  prefill tok/s   a fixed 128-token prompt in one forward
  decode tok/s    128 new tokens, greedy, the first one (which comes from the prefill) excluded
  TTFT            time to first token: tokens in -> first sampled token out
  weights MB      bytes of weights resident as the engine holds them
  peak RSS MB     the subprocess's peak resident memory

plus, per backend, the start-up cost: a cold start (empty Numba cache: includes compiling every
kernel) and a cached start (the compiled kernels loaded from disk), both to the second token:
the first comes from the prefill, the second from the first decode step, whose kernels differ.
Several runs per configuration; the table shows the median and the spread (min..max).
Machines are noisy: compare configurations within one run, and quote ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {"smollm2-135m": "SMOLLM2_135M", "tiny": None}


# --------------------------------------------------------------------------------------------
# The worker: runs inside the subprocess, prints one JSON line.
# --------------------------------------------------------------------------------------------
def _random_model(shape: str, quant: str, folder: Path) -> Path:
    """A random-weights GGUF of a named shape, stored the way the real file is (Q4_1 matmuls and
    Q8_0 embedding for quant auto), built once and reused from `folder`."""
    from .weights import synthetic
    dtype, emb = {"auto": ("Q4_1", "Q8_0"), "f32": ("F32", "F32")}.get(quant, (quant.upper(),) * 2)
    path = folder / f"random-{shape}-{dtype}-{emb}.gguf"
    if not path.exists():
        overrides = getattr(synthetic, SHAPES[shape]) if SHAPES[shape] else {}
        config = synthetic.hf_config(**overrides)
        tmp = path.with_suffix(".part")
        synthetic.write_gguf(tmp, config, synthetic.random_state(config, seed=0), dtype=dtype,
                             embedding_dtype=emb)
        os.replace(tmp, path)
    return path


def worker(spec: dict) -> dict:
    import resource

    import numpy as np

    t_start = time.perf_counter()
    import minfer
    model = spec["model"]
    quant = spec["quant"]
    if spec.get("random"):
        model = _random_model(spec["random"], quant, Path(spec["cache"]))
        quant = "auto" if quant in ("auto", "f32") else quant
    llm = minfer.LLM(model, backend=spec["backend"], quant=quant, threads=spec.get("threads"), quiet=True,
                     activations=spec.get("activations", "f32"))
    load_s = time.perf_counter() - t_start
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, llm.config.vocab_size, spec["prompt_tokens"]).tolist()
    params = minfer.SamplingParams(temperature=0, max_tokens=spec["new_tokens"], ignore_eos=True)
    runs = []
    first = True
    for _ in range(spec["runs"] + 1):          # run 0 warms up (and, cold, compiles)
        t0, t0_wall = time.perf_counter(), time.time()
        llm.generate([prompt], params)
        s = llm.stats
        if first:   # process spawn -> first token: interpreter, imports, load, (compile,) prefill
            startup = t0_wall + s.prefill_s - spec["spawn_time"]
            # the second token is the first decode step's: on the numba backend its layer loop
            # (fused.py) is compiled then, not at the prefill
            startup2 = startup + s.decode_s if s.generated_tokens > 1 else None
            first = False
            continue
        runs.append({"prefill_tok_s": s.prefill_tok_s, "decode_tok_s": s.decode_tok_s,
                     "ttft_ms": s.prefill_s * 1e3})
    return {
        "runs": runs,
        "start_to_first_token_s": startup,
        "start_to_second_token_s": startup2,
        "load_s": load_s,
        "weights_mb": llm.weights.nbytes() / 1e6,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": _threads(spec["backend"]),
    }


def _threads(backend: str):
    if backend != "numba":
        return None
    import numba
    return numba.get_num_threads()


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------
def _run_worker(spec: dict, env: dict | None = None) -> dict:
    spec = dict(spec, spawn_time=time.time())
    cmd = [sys.executable, "-m", "minfer.bench", "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        # the last line that says something (numba ends its errors with bare colour codes)
        lines = [ln for ln in re.sub(r"\x1b\[[0-9;]*m", "", proc.stderr).splitlines() if ln.strip()]
        errs = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln)]
        last = (errs or lines or ["no output"])[-1].strip()
        from .errors import MinferError
        raise MinferError(f"benchmark worker for {_label(spec)} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _label(r: dict) -> str:
    return f"{r['backend']}/{r['quant']}" + ("/int8" if r.get("activations") == "int8" else "")


def _machine() -> dict:
    import numpy
    import numba
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import minfer
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": numpy.__version__, "numba": numba.__version__, "minfer": minfer.__version__,
            "platform": platform.platform()}


def _med(values):
    return statistics.median(values), min(values), max(values)


def run_quality(a) -> int:
    from . import quality
    from .weights.fetch import ensure_default_model
    model = str(a.model or ensure_default_model())
    quants = [q.strip() for q in a.quant.split(",") if q.strip()]
    if quants == ["auto"]:
        quants = ["f32", "q8_0", "q4_1", "q4_0", "auto"]
    print(f"minfer bench --quality: {quality.TEXT.name}, windows of {a.window} tokens", file=sys.stderr)
    acts = [x.strip() for x in a.activations.split(",") if x.strip()]
    rows = quality.evaluate(model, quants, window=a.window, max_tokens=a.max_eval_tokens,
                            activations=acts)
    quality.print_table(rows)
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": _machine(), "quality": rows}, indent=1))
    return 0


def run_bench(a) -> int:
    if a.quality:
        return run_quality(a)
    from .weights.fetch import ensure_default_model
    backends = [b.strip() for b in a.backend.split(",") if b.strip()]
    quants = [q.strip() for q in a.quant.split(",") if q.strip()]
    acts = [x.strip() for x in a.activations.split(",") if x.strip()]
    from .backends import ACTIVATIONS, BACKENDS
    from .weights.load import QUANTS
    from .errors import InvalidArgumentError
    for b in backends:
        if b not in BACKENDS:
            raise InvalidArgumentError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    for q in quants:
        if q not in QUANTS:
            raise InvalidArgumentError(f"unknown quant {q!r}; choose from {', '.join(QUANTS)}")
    for x in acts:
        if x not in ACTIVATIONS:
            raise InvalidArgumentError(f"unknown activations {x!r}; choose from {', '.join(ACTIVATIONS)}")
    if a.random_weights and a.random_weights not in SHAPES:
        raise InvalidArgumentError(f"unknown shape {a.random_weights!r}; choose from {', '.join(SHAPES)}")
    if a.runs < 1:
        raise InvalidArgumentError("--runs must be at least 1")
    model = None if a.random_weights else str(a.model or ensure_default_model())
    cache = Path(tempfile.gettempdir()) / "minfer-bench"
    cache.mkdir(exist_ok=True)
    machine = _machine()
    results = []
    print(f"minfer bench: {a.prompt_tokens}-token prompt, {a.new_tokens} new tokens, {a.runs} runs "
          f"each ({a.numpy_runs} for numpy); {machine['cpu']}, {machine['cores']} cores", file=sys.stderr)
    configs = [(b, q, x) for b in backends for q in quants for x in acts
               if x == "f32" or (b == "numba" and q != "f32")]   # int8: numba, quantized weights
    for backend, quant, act in configs:
        spec = {"model": model, "random": a.random_weights, "cache": str(cache), "backend": backend,
                "quant": quant, "activations": act, "threads": a.threads,
                "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
                "runs": a.runs if not (backend == "numpy" and a.numpy_runs) else a.numpy_runs}
        print(f"  running {_label(spec)} ...", file=sys.stderr, flush=True)
        r = _run_worker(spec)
        row = {"backend": backend, "quant": quant, "activations": act, **r}
        if backend == "numba" and not a.skip_startup:
            with tempfile.TemporaryDirectory() as nb_cache:
                one = dict(spec, runs=1, new_tokens=2)
                cold = _run_worker(one, {"NUMBA_CACHE_DIR": nb_cache})
                cached = _run_worker(one, {"NUMBA_CACHE_DIR": nb_cache})
                row["cold_start_s"], row["cached_start_s"] = (cold["start_to_second_token_s"],
                                                              cached["start_to_second_token_s"])
        results.append(row)
    _print_table(results)
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine, "settings": vars(a) | {"model": model},
                                            "results": results}, indent=1, default=str))
        print(f"wrote {a.json}", file=sys.stderr)
    return 0


def _print_table(results):
    head = (f"{'backend':<8} {'quant':<6} {'act':<4} {'prefill tok/s':>22} {'decode tok/s':>22} {'TTFT ms':>8} "
            f"{'weights MB':>10} {'RSS MB':>7} {'threads':>7} {'cold s':>7} {'cached s':>8}")
    print(head)
    print("-" * len(head))
    base = None
    for r in results:
        p = _med([x["prefill_tok_s"] for x in r["runs"]])
        d = _med([x["decode_tok_s"] for x in r["runs"]])
        t = _med([x["ttft_ms"] for x in r["runs"]])
        base = base or d[0]
        cold = f"{r['cold_start_s']:.1f}" if "cold_start_s" in r else "-"
        cached = f"{r['cached_start_s']:.1f}" if "cached_start_s" in r else "-"
        print(f"{r['backend']:<8} {r['quant']:<6} {r.get('activations', 'f32'):<4} {p[0]:>8.1f} ({p[1]:.0f}..{p[2]:.0f}){'':>3} "
              f"{d[0]:>8.1f} ({d[1]:.1f}..{d[2]:.1f}) {t[0]:>8.0f} {r['weights_mb']:>10.1f} "
              f"{r['peak_rss_mb']:>7.0f} {str(r['threads'] or '-'):>7} {cold:>7} {cached:>8}")
    if len(results) > 1:
        print("decode speed relative to the first row: " + ", ".join(
            f"{_label(r)} {statistics.median(x['decode_tok_s'] for x in r['runs']) / base:.2f}x"
            for r in results))


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure prefill/decode speed, start-up time and memory",
                       description=__doc__.split("\n\n")[0] + " Configurations run side by side; "
                       "the table gives medians with (min..max).")
    p.add_argument("--model", metavar="PATH", default=None, help="model to measure (default model)")
    p.add_argument("--backend", default="numpy,numba", help="comma-separated (default: %(default)s)")
    p.add_argument("--quant", default="auto", help="comma-separated: auto,f32,q8_0,q4_0,q4_1 "
                                                   "(default: %(default)s)")
    p.add_argument("--activations", default="f32",
                   help="comma-separated: f32,int8 (int8: numba backend, quantized weights only; "
                        "default: %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="measured runs per configuration (default: 3)")
    p.add_argument("--numpy-runs", type=int, default=1, help="runs for the slow numpy backend (default: 1)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="numba threads")
    p.add_argument("--random-weights", metavar="SHAPE", default=None,
                   help=f"random weights of a named shape instead of a model file ({', '.join(SHAPES)})")
    p.add_argument("--skip-startup", action="store_true", help="skip the cold/cached start measurement")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")
    q = p.add_argument_group("quality (instead of speed)")
    q.add_argument("--quality", action="store_true",
                   help="perplexity, KL divergence and top-1 agreement vs float32 for each --quant "
                        "(default: f32,q8_0,q4_1,q4_0,auto) on a held-out English text")
    q.add_argument("--window", type=int, default=512, help="tokens per evaluation window")
    q.add_argument("--max-eval-tokens", type=int, default=None, help="evaluate only this many tokens")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True)
    print(json.dumps(worker(json.loads(ap.parse_args().worker))))
