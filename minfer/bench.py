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
The runs take turns: every configuration's worker stays up, and round r runs each configuration
once before round r + 1 starts, so a noisy minute on a shared machine lands on all of them
rather than on one. Still: compare configurations within one run, and quote ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {"smollm2-135m": "SMOLLM2_135M", "tiny": None}
DEFAULT_BACKENDS = "numpy,numba"     # the speed table's; a measurement of one backend: numba


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


TAG = "@minfer-bench "      # the worker's protocol lines on stdout start with this


def _say(obj) -> None:
    print(TAG + json.dumps(obj), flush=True)


def worker(spec: dict) -> None:
    """Load the model, generate once to warm up (that run measures the start-up), say so; then
    one measured generate per "run" line on stdin, a line of figures each; "done" -> a summary."""
    import resource

    import numpy as np

    t_start = time.perf_counter()
    import minfer
    model = spec["model"]
    quant = spec["quant"]
    if spec.get("random"):
        model = _random_model(spec["random"], quant, Path(spec["cache"]))
        quant = "auto" if quant in ("auto", "f32") else quant
    # no prefix cache: every run prefills the whole prompt (the same prompt each run would
    # otherwise be found in the cache but for its last, partial block)
    llm = minfer.LLM(model, backend=spec["backend"], quant=quant, threads=spec.get("threads"), quiet=True,
                     activations=spec.get("activations", "f32"), prefix_caching=False)
    load_s = time.perf_counter() - t_start
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, llm.config.vocab_size, spec["prompt_tokens"]).tolist()
    params = minfer.SamplingParams(temperature=0, max_tokens=spec["new_tokens"], ignore_eos=True)
    # warm-up (and, cold, compile): process spawn -> first token: interpreter, imports, load,
    # (compile,) prefill. The second token is the first decode step's: on the numba backend its
    # compiled step (cpu/region.py) is compiled then, not at the prefill.
    t0_wall = time.time()
    llm.generate([prompt], params)
    s = llm.stats
    startup = t0_wall + s.prefill_s - spec["spawn_time"]
    _say({"ready": True, "start_to_first_token_s": startup,
          "start_to_second_token_s": startup + s.decode_s if s.generated_tokens > 1 else None})
    for line in sys.stdin:
        if line.strip() == "rows":
            _say(rows_run(llm, spec))
            continue
        if line.strip() != "run":
            break
        llm.generate([prompt], params)
        s = llm.stats
        _say({"prefill_tok_s": s.prefill_tok_s, "decode_tok_s": s.decode_tok_s,
              "ttft_ms": s.prefill_s * 1e3, "prefilled_tokens": s.prompt_tokens})
    stack = llm.weights.stacks.get("w_up")
    _say({"load_s": load_s, "weights_mb": llm.weights.nbytes() / 1e6,
          "weight_format": stack[0] if stack else None,        # of the layers' matmuls
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "threads": _threads(spec["backend"])})


def _threads(backend: str):
    if backend != "numba":
        return None
    import numba
    return numba.get_num_threads()


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------
class _Worker:
    """One configuration's worker process (see worker()), driven a line at a time."""

    def __init__(self, spec: dict, env: dict | None = None):
        self.spec = dict(spec, spawn_time=time.time())
        self.err = tempfile.TemporaryFile(mode="w+")            # its stderr, read if it fails
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "minfer.bench", "--worker", json.dumps(self.spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
            env={**os.environ, **(env or {})})
        self.ready = self._read()                                 # start-up figures

    def run(self) -> dict:
        return self._ask("run")

    def rows(self) -> dict:
        return self._ask("rows")

    def close(self) -> dict:
        summary = self._ask("done")
        self.proc.wait()
        self.err.close()
        return summary

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _ask(self, line: str) -> dict:
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass                                                  # it died: _read says why
        return self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])
        self.proc.wait()
        self.err.seek(0)
        # the last line that says something (numba ends its errors with bare colour codes)
        lines = [ln for ln in re.sub(r"\x1b\[[0-9;]*m", "", self.err.read()).splitlines() if ln.strip()]
        errs = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln)]
        last = (errs or lines or ["no output"])[-1].strip()
        last = re.sub(r"^minfer\.errors\.\w+: ", "", last)      # (minfer's own: the message says it)
        from .errors import MinferError
        raise MinferError(f"benchmark worker for {_label(self.spec)} failed: {last}")


def _start_up(spec: dict) -> tuple:
    """Seconds from process start to the second token, with an empty Numba cache, then with the
    cache that run filled."""
    with tempfile.TemporaryDirectory() as nb_cache:
        times = []
        for _ in range(2):
            w = _Worker(dict(spec, new_tokens=2), {"NUMBA_CACHE_DIR": nb_cache})
            times.append(w.ready["start_to_second_token_s"])
            w.close()
    return tuple(times)


def _llama_run(binary: str, model: str, a) -> dict:
    """One run of llama.cpp's own benchmark on a GGUF file: the same prompt and generation
    lengths, the same threads, prefill and decode tok/s. Its decode runs where minfer's does:
    after the prompt's tokens in the KV cache (`-d`; llama-bench's own default is an empty
    cache, which is faster the longer the prompt)."""
    threads = a.threads or os.cpu_count()
    base = [binary, "-m", model, "-t", str(threads), "-r", "1", "-o", "json"]
    tests = []
    for args in (["-p", str(a.prompt_tokens), "-n", "0"],
                 ["-p", "0", "-n", str(a.new_tokens), "-d", str(a.prompt_tokens)]):
        proc = subprocess.run(base + args, capture_output=True, text=True)
        try:
            tests += json.loads(proc.stdout)
        except ValueError:
            _llama_failed("llama-bench", proc, model)
    try:
        pp = next(t for t in tests if t["n_prompt"] and not t["n_gen"])
        tg = next(t for t in tests if t["n_gen"] and not t["n_prompt"]
                  and t.get("n_depth", 0) == a.prompt_tokens)
    except (StopIteration, KeyError, TypeError):
        _llama_failed("llama-bench", proc, model)
    return {"prefill_tok_s": pp["avg_ts"], "decode_tok_s": tg["avg_ts"], "ttft_ms": None,
            "format": tg.get("model_type", "").split()[-1], "threads": threads}


LLAMA_BATCHED_TOKENS = 32       # decode steps llama-batched-bench times per B (after ROWS_PREFIX)


def _llama_batched_run(binary: str, model: str, batch_sizes: list[int], a) -> dict:
    """One run of llama.cpp's llama-batched-bench: B sequences of a ROWS_PREFIX-token prompt each
    (not shared), then LLAMA_BATCHED_TOKENS decode steps of one token per sequence, for every B of
    --batch -> {"batch": {B: seconds per step}, "verify": {}, "format": ...}, the shape of
    rows_run()'s answer."""
    threads = a.threads or os.cpu_count()
    per_seq = 128                                  # KV cells a sequence gets: >= prefix + steps
    cmd = [binary, "-m", model, "-t", str(threads), "-c", str(max(4096, per_seq * max(batch_sizes))),
           "-b", "2048", "-ub", "512", "-npp", str(ROWS_PREFIX), "-ntg", str(LLAMA_BATCHED_TOKENS),
           "-npl", ",".join(map(str, batch_sizes)), "--output-format", "jsonl"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    steps = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{") and '"speed_tg"' in line:
            row = json.loads(line)
            steps[row["pl"]] = row["t_tg"] / row["tg"]             # all B sequences, one token each
    if proc.returncode != 0 or not steps:
        _llama_failed("llama-batched-bench", proc, model)
    missing = [B for B in batch_sizes if B not in steps]
    if missing:
        from .errors import MinferError
        raise MinferError(f"llama-batched-bench gave no figures for B={','.join(map(str, missing))} "
                          f"on {model}")
    return {"batch": steps, "verify": {}, "format": _gguf_format(model)}


def _gguf_format(model: str) -> str | None:
    """The format of a GGUF file's layer matmul weights (minfer's weight_format), None if unread.
    (llama-batched-bench does not print it.)"""
    from .errors import MinferError
    from .weights.gguf import read_gguf
    try:
        up = read_gguf(model)[1].get("blk.0.ffn_up.weight")
    except MinferError:
        return None
    return up.type if up else None


def _llama_failed(name: str, proc, model: str):
    """Raise a one-line error for a llama.cpp tool that failed or gave no figures."""
    from .errors import MinferError
    if proc.returncode < 0:                        # killed by a signal: say which
        sig = signal.Signals(-proc.returncode).name
        hint = (" (an instruction this CPU does not have: a build for another machine? "
                "GGML_NATIVE=ON can pick up features a VM does not allow; rebuild with "
                "GGML_NATIVE=OFF)" if sig == "SIGILL" else "")
        raise MinferError(f"{name} was killed by {sig} on {model}{hint}")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or ["no output"]
    raise MinferError(f"{name} failed on {model}: {lines[-1].strip()}")


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


def one_backend(a, what: str) -> str:
    """The one backend a measurement of its own runs (`what`: its flag): bench's default list,
    numpy and numba, means numba there; a list of several is an error, not all but one dropped."""
    from .backends import BACKENDS
    from .errors import InvalidArgumentError
    if a.backend == DEFAULT_BACKENDS:
        return "numba"
    names = [b.strip() for b in a.backend.split(",") if b.strip()]
    if len(names) != 1:
        raise InvalidArgumentError(f"{what} runs one backend: give one --backend (numba, numpy or cuda)")
    if names[0] not in BACKENDS:
        raise InvalidArgumentError(f"unknown backend {names[0]!r}; choose from {', '.join(BACKENDS)}")
    return names[0]


def _med(values):
    return statistics.median(values), min(values), max(values)


def run_quality(a) -> int:
    from . import quality
    from .errors import InvalidArgumentError
    from .weights.fetch import ensure_default_model
    backend = one_backend(a, "--quality")
    if a.window < 2:
        raise InvalidArgumentError(f"--window must be at least 2 tokens, got {a.window}")
    if a.max_eval_tokens is not None and a.max_eval_tokens < 2:
        raise InvalidArgumentError(f"--max-eval-tokens must be at least 2 (a token and the one it "
                                   f"predicts), got {a.max_eval_tokens}")
    model = str(a.model or ensure_default_model())
    quants = [q.strip() for q in a.quant.split(",") if q.strip()]
    if quants == ["auto"]:
        quants = ["f32", "q8_0", "q4_1", "q4_0", "auto"]
    print(f"minfer bench --quality: {quality.TEXT.name}, windows of {a.window} tokens", file=sys.stderr)
    acts = [x.strip() for x in a.activations.split(",") if x.strip()]
    rows = quality.evaluate(model, quants, window=a.window, max_tokens=a.max_eval_tokens,
                            backend=backend, activations=acts)
    quality.print_table(rows)
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": _machine(), "quality": rows}, indent=1))
    return 0


# Which measurements read each flag that not all of them read (the others: --model, --backend,
# --quant, --activations, --threads, --json).
_READ_BY = {
    **dict.fromkeys(("runs", "new_tokens"), ("speed", "speculative")),
    **dict.fromkeys(("numpy_runs", "prompt_tokens", "random_weights", "skip_startup", "batch",
                     "verify_tokens", "llama_bench", "llama_batched_bench", "llama_models"), ("speed",)),
    **dict.fromkeys(("draft_model", "num_speculative_tokens"), ("speculative",)),
    **dict.fromkeys(("requests", "seed", "kv_cache_mb", "max_seqs", "max_batch_tokens"),
                    ("serve", "prefix")),
    **dict.fromkeys(("rate", "ways"), ("serve",)),
    **dict.fromkeys(("window", "max_eval_tokens"), ("quality",)),
}
_MODE_NAMES = {"speed": "the speed measurement", "speculative": "--speculative",
               "serve": "--workload serve", "prefix": "--workload prefix", "quality": "--quality"}


def _check_mode_flags(a) -> None:
    """bench has five measurements (speed, --speculative, --workload serve | prefix, --quality),
    one a run: a flag that only another one reads would be ignored without a word, so it is an
    error instead."""
    from .errors import InvalidArgumentError
    mode = ("quality" if a.quality else a.workload if a.workload != "speed"
            else "speculative" if a.speculative else "speed")
    if a.speculative and mode != "speculative":
        raise InvalidArgumentError(f"--speculative times its own workloads (edit, free): use it "
                                   f"without {_MODE_NAMES[mode]}")
    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    for act in sub.choices["bench"]._actions:
        readers = _READ_BY.get(act.dest)
        if readers and mode not in readers and getattr(a, act.dest) != act.default:
            raise InvalidArgumentError(
                f"{act.option_strings[0]} is part of {' and '.join(_MODE_NAMES[r] for r in readers)}: "
                f"{_MODE_NAMES[mode]} does not read it")


def _check_json(a) -> None:
    """--json's file must be writable before the measurement, not after it (the results would be
    lost with the error)."""
    from .errors import InvalidArgumentError
    if a.json:
        path = Path(a.json)
        if path.is_dir() or not path.parent.is_dir() or not os.access(path.parent, os.W_OK) or (
                path.exists() and not os.access(path, os.W_OK)):
            raise InvalidArgumentError(f"--json {a.json}: cannot write a file there (is the folder "
                                       f"there, and writable?)")


def run_bench(a) -> int:
    _check_mode_flags(a)
    _check_json(a)
    from .backends import check_threads
    check_threads(a.threads)                    # here, not in the first worker to start
    from . import bench_serve
    bench_serve.check_flags(a)
    if a.quality:
        return run_quality(a)
    if a.workload != "speed":                   # many requests through one engine: bench_serve.py
        a.backend = one_backend(a, "--workload")
        if a.workload == "serve":
            return bench_serve.run_serve(a, _machine())
        return bench_serve.run_prefix(a)
    if a.speculative:
        return run_spec_bench(a)
    from .weights.fetch import ensure_default_model
    backends = [b.strip() for b in a.backend.split(",") if b.strip()]
    quants = [q.strip() for q in a.quant.split(",") if q.strip()]
    acts = [x.strip() for x in a.activations.split(",") if x.strip()]
    from .backends import ACTIVATIONS, BACKENDS
    from .weights.load import QUANTS
    from .errors import InvalidArgumentError
    batch_sizes, verify_tokens = rows_options(a)
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
    if a.prompt_tokens < 1 or a.new_tokens < 2:
        raise InvalidArgumentError("--prompt-tokens must be at least 1 and --new-tokens at least 2 "
                                   "(decode speed leaves out the first new token)")
    if a.random_weights and a.model:
        raise InvalidArgumentError("--random-weights makes its own model: leave out --model")
    if a.llama_models and not (a.llama_bench or a.llama_batched_bench):
        raise InvalidArgumentError("--llama-models are run by --llama-bench or --llama-batched-bench: "
                                   "give one of them")
    model = None if a.random_weights else str(a.model or ensure_default_model())
    llama_models = []
    for flag, binary in (("--llama-bench", a.llama_bench), ("--llama-batched-bench", a.llama_batched_bench)):
        if binary and not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
            raise InvalidArgumentError(f"{flag} {binary}: not an executable file "
                                       f"(llama.cpp's {flag[2:]})")
    if a.llama_batched_bench and not batch_sizes:
        raise InvalidArgumentError("--llama-batched-bench runs the B values of --batch: give --batch")
    if a.llama_bench or a.llama_batched_bench:
        flag = "--llama-bench" if a.llama_bench else "--llama-batched-bench"
        llama_models = [m.strip() for m in (a.llama_models or "").split(",") if m.strip()]
        if not llama_models:
            if model is None or not model.endswith(".gguf"):
                raise InvalidArgumentError(f"{flag} needs a GGUF file: give --llama-models")
            llama_models = [model]
        for m in llama_models:
            if not os.path.isfile(m):
                raise InvalidArgumentError(f"--llama-models: no file {m}")
    configs = [(b, q, x) for b in backends for q in quants for x in acts
               if x == "f32" or (b == "numba" and q != "f32")]   # int8: numba, quantized weights
    if not configs:
        raise InvalidArgumentError("nothing to measure: int8 activations run on the numba backend "
                                   "with quantized weights (--backend numba, --quant other than f32)")
    cache = Path(tempfile.gettempdir()) / "minfer-bench"
    cache.mkdir(exist_ok=True)
    machine = _machine()
    print(f"minfer bench: {a.prompt_tokens}-token prompt, {a.new_tokens} new tokens, {a.runs} runs "
          f"each ({a.numpy_runs} for numpy); {machine['cpu']}, {machine['cores']} cores", file=sys.stderr)
    specs = [{"model": model, "random": a.random_weights, "cache": str(cache), "backend": backend,
              "quant": quant, "activations": act, "threads": a.threads,
              "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
              "batch": batch_sizes, "verify_tokens": verify_tokens,
              "runs": a.runs if not (backend == "numpy" and a.numpy_runs) else a.numpy_runs}
             for backend, quant, act in configs]
    results = [{"backend": sp["backend"], "quant": sp["quant"], "activations": sp["activations"],
                "runs": []} for sp in specs]
    llama_rows = [{"backend": "llama.cpp", "quant": "", "activations": "", "model": m, "runs": [],
                   "weights_mb": None, "peak_rss_mb": None} for m in llama_models]
    workers = []
    try:
        for sp in specs:                          # one at a time: start-ups must not overlap
            print(f"  starting {_label(sp)} ...", file=sys.stderr, flush=True)
            workers.append(_Worker(sp))
        rounds = max([sp["runs"] for sp in specs] + [a.runs if llama_models else 0])
        for r in range(rounds):
            print(f"  round {r + 1}/{rounds}: " + ", ".join(
                [_label(sp) for sp in specs if r < sp["runs"]] +
                [f"llama.cpp {os.path.basename(m)}" for m in llama_models if r < a.runs]),
                file=sys.stderr, flush=True)
            for sp, w, row in zip(specs, workers, results):
                if r < sp["runs"]:
                    row["runs"].append(w.run())
                    if batch_sizes or verify_tokens:
                        row.setdefault("rows_runs", []).append(w.rows())
            for m, row in zip(llama_models, llama_rows):
                if r < a.runs and a.llama_bench:
                    run = _llama_run(a.llama_bench, m, a)
                    row["quant"], row["threads"] = run.pop("format") or "gguf", run.pop("threads")
                    row["runs"].append(run)
                if r < a.runs and a.llama_batched_bench:
                    run = _llama_batched_run(a.llama_batched_bench, m, batch_sizes, a)
                    fmt = run.pop("format")
                    row["quant"] = row["quant"] or fmt or "gguf"
                    row.setdefault("rows_runs", []).append(run)
        for w, row in zip(workers, results):
            row.update(w.close())
    finally:
        for w in workers:
            w.kill()
    results += llama_rows
    if not a.skip_startup:
        for sp, row in zip(specs, results):
            if sp["backend"] == "numba":
                print(f"  start-up of {_label(sp)}, cold and cached ...", file=sys.stderr, flush=True)
                row["cold_start_s"], row["cached_start_s"] = _start_up(sp)
    _print_table(results)
    if batch_sizes or verify_tokens:
        rows_summary(results)
        print_rows_table(results)
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine, "settings": vars(a) | {"model": model},
                                            "results": results}, indent=1, default=str))
        print(f"wrote {a.json}", file=sys.stderr)
    return 0


def _print_table(results):
    results = [r for r in results if r["runs"]]    # a llama-batched-bench-only row: rows table only
    head = (f"{'backend':<9} {'quant':<6} {'act':<4} {'prefill tok/s':>22} {'decode tok/s':>22} {'TTFT ms':>8} "
            f"{'weights MB':>10} {'RSS MB':>7} {'threads':>7} {'cold s':>7} {'cached s':>8}")
    print(head)
    print("-" * len(head))

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)
    for r in results:
        p = _med([x["prefill_tok_s"] for x in r["runs"]])
        d = _med([x["decode_tok_s"] for x in r["runs"]])
        ttft = [x["ttft_ms"] for x in r["runs"] if x["ttft_ms"] is not None]
        cold = f"{r['cold_start_s']:.1f}" if "cold_start_s" in r else "-"
        cached = f"{r['cached_start_s']:.1f}" if "cached_start_s" in r else "-"
        print(f"{r['backend']:<9} {r['quant']:<6} {r.get('activations', 'f32'):<4} {p[0]:>8.1f} ({p[1]:.0f}..{p[2]:.0f}){'':>3} "
              f"{d[0]:>8.1f} ({d[1]:.1f}..{d[2]:.1f}) {num(ttft and _med(ttft)[0] or None, '.0f'):>8} "
              f"{num(r['weights_mb'], '.1f'):>10} {num(r['peak_rss_mb'], '.0f'):>7} "
              f"{str(r['threads'] or '-'):>7} {cold:>7} {cached:>8}")
    med = lambda r, k: statistics.median(x[k] for x in r["runs"])   # noqa: E731
    llama = {r["quant"]: r for r in results if r["backend"] == "llama.cpp"}
    pairs = [(r, llama[r["weight_format"]]) for r in results
             if r["backend"] != "llama.cpp" and r.get("weight_format") in llama]
    if pairs:
        print("against llama.cpp on the same weight format: " + ", ".join(
            f"{_row_name(r)} ({r['weight_format']}) decode {med(r, 'decode_tok_s') / med(b, 'decode_tok_s'):.2f}x "
            f"prefill {med(r, 'prefill_tok_s') / med(b, 'prefill_tok_s'):.2f}x" for r, b in pairs))
    elif len(results) > 1:
        b = results[0]
        print("decode speed relative to the first row: " + ", ".join(
            f"{_row_name(r)} {med(r, 'decode_tok_s') / med(b, 'decode_tok_s'):.2f}x" for r in results))


def _row_name(r: dict) -> str:
    return f"llama.cpp/{r['quant']}" if r["backend"] == "llama.cpp" else _label(r)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure prefill/decode speed, start-up time and memory",
                       description=__doc__.split("\n\n")[0] + " Configurations run side by side; "
                       "the table gives medians with (min..max).")
    p.add_argument("--model", metavar="PATH", default=None, help="model to measure (default model)")
    p.add_argument("--backend", default=DEFAULT_BACKENDS, help="comma-separated (default: %(default)s)")
    p.add_argument("--quant", default="auto", help="comma-separated: auto,f32,q8_0,q4_0,q4_1 "
                                                   "(default: %(default)s)")
    p.add_argument("--activations", default="f32",
                   help="comma-separated: f32,int8 (int8: numba backend, quantized weights only; "
                        "default: %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="measured runs per configuration (default: 3)")
    p.add_argument("--numpy-runs", type=int, default=1, help="runs for the slow numpy backend (default: 1)")
    p.add_argument("--prompt-tokens", type=int, default=128,
                   help="length of the (random) prompt whose prefill is timed (default: 128)")
    p.add_argument("--new-tokens", type=int, default=128,
                   help="tokens generated after it, the first one not counted (default: 128)")
    p.add_argument("--threads", type=int, default=None, help="numba threads")
    p.add_argument("--random-weights", metavar="SHAPE", default=None,
                   help=f"random weights of a named shape instead of a model file ({', '.join(SHAPES)})")
    p.add_argument("--skip-startup", action="store_true", help="skip the cold/cached start measurement")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")
    p.add_argument("--llama-bench", metavar="BIN", default=None,
                   help="also run llama.cpp's llama-bench (this path) in every round, side by side "
                        "(its decode after the prompt's tokens, -d, as minfer's)")
    p.add_argument("--llama-batched-bench", metavar="BIN", default=None,
                   help="with --batch: also run llama.cpp's llama-batched-bench (this path) in every "
                        f"round, B sequences of an {ROWS_PREFIX}-token prompt, then "
                        f"{LLAMA_BATCHED_TOKENS} decode steps")
    p.add_argument("--llama-models", metavar="FILES", default=None,
                   help="comma-separated GGUF files for --llama-bench and --llama-batched-bench "
                        "(default: the model measured)")
    from .bench_serve import add_arguments
    add_arguments(p)
    add_rows_options(p)
    q = p.add_argument_group("quality (instead of speed)")
    q.add_argument("--quality", action="store_true",
                   help="perplexity, KL divergence and top-1 agreement vs float32 for each --quant "
                        "(default: f32,q8_0,q4_1,q4_0,auto) on a held-out English text")
    q.add_argument("--window", type=int, default=512, help="tokens per evaluation window")
    q.add_argument("--max-eval-tokens", type=int, default=None, help="evaluate only this many tokens")
    _add_spec_flags(p)


# --------------------------------------------------------------------------------------------
# Speculative decoding: two chat workloads, each mode against plain decoding in the same run
# --------------------------------------------------------------------------------------------
_EDIT_CODE = """def summarize_orders(orders, tax_rate, discounts):
    \"\"\"Return totals per customer for a list of orders.\"\"\"
    totals = {}
    counts = {}
    for order in orders:
        customer = order["customer"]
        amount = order["amount"]
        if amount <= 0:
            continue
        code = order.get("code")
        if code in discounts:
            amount = amount * (1 - discounts[code])
        amount = amount * (1 + tax_rate)
        if customer not in totals:
            totals[customer] = 0.0
            counts[customer] = 0
        totals[customer] += amount
        counts[customer] += 1
    result = []
    for customer in sorted(totals):
        average = totals[customer] / counts[customer]
        result.append({
            "customer": customer,
            "total": round(totals[customer], 2),
            "orders": counts[customer],
            "average": round(average, 2),
        })
    best = None
    for row in result:
        if best is None or row["total"] > best["total"]:
            best = row
    if best is not None:
        best["best"] = True
    for row in result:
        row.setdefault("best", False)
    return result
"""
SPEC_WORKLOADS = {
    # the answer repeats the prompt: what prompt lookup is for
    "edit": "Rewrite this Python function with the variable `amount` renamed to `value`. Answer "
            "with the whole function, nothing else.\n\n```python\n" + _EDIT_CODE + "```",
    # an open answer: few guesses should be right (the adaptive k must not slow it down)
    "free": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}
SPEC_MODES = ("off", "ngram", "draft")


def _add_spec_flags(p) -> None:
    g = p.add_argument_group("speculative decoding (instead of speed)")
    g.add_argument("--speculative", default=None, metavar="MODES",
                   help="comma-separated: ngram,draft,off — greedy chat answers on two workloads "
                        f"({', '.join(SPEC_WORKLOADS)}): tok/s, guesses accepted per step, speed-up "
                        "against off (plain decoding of the same --quant, answered in turns in "
                        "the same process); with --quant left at auto, draft runs on the float32 "
                        "model (its built-in draft's pairing)")
    g.add_argument("--draft-model", metavar="PATH", default=None,
                   help="draft model (default: the model's file in 4-bit blocks, int8 activations)")
    g.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="most guesses per step (default: the engine's)")


def spec_worker(spec: dict) -> None:
    """One (quant, mode): load, answer each workload once (warm-up, compile), then per "run" line
    answer each workload again and say its figures. A speculative mode answers each workload four
    times, twice with its guesses and twice without (the engine's speculator set aside), in the
    order with, without, without, with (the next run: the other way round): the speed-up is a
    ratio within one process, a few seconds apart — on a shared machine two processes can differ
    by more than the gain — and a drift of the host's speed over the four weighs on both alike."""
    import minfer
    llm = minfer.LLM(spec["model"], backend=spec["backend"], quant=spec["quant"],
                     threads=spec.get("threads"), quiet=True,
                     activations=spec.get("activations", "f32"),
                     speculative=spec["mode"], num_speculative_tokens=spec.get("k"),
                     draft_model=spec.get("draft_model"))
    params = minfer.SamplingParams(temperature=0, max_tokens=spec["new_tokens"])
    prompts = {w: llm.tokenizer.apply_chat_template([{"role": "user", "content": text}])
               for w, text in SPEC_WORKLOADS.items()}
    speculator = llm.engine.speculator

    def answer(prompt, guess: bool) -> dict:
        llm.engine.speculator = speculator if guess else None
        if guess:
            speculator.reset_stats()
        c = llm.generate([prompt], params)[0]
        st = speculator.stats() if guess else {}
        return {"decode_tok_s": llm.stats.decode_tok_s, "tokens": len(c.token_ids),
                "text_hash": hash(tuple(c.token_ids)) & 0xFFFFFFFF,
                "mean_accepted": st.get("mean_accepted"), "acceptance": st.get("acceptance"),
                "verify_steps": st.get("verify_steps")}

    def pooled(two: list) -> dict:
        """Two answers of a kind as one: their tokens over their summed decode time; accepted
        guesses and steps, the means; the text's hash if both said the same, else None (which
        matches no other answer's)."""
        a, b = two
        secs = [x["tokens"] / x["decode_tok_s"] if x["decode_tok_s"] else float("inf") for x in two]
        mean = (lambda k: None if a[k] is None or b[k] is None else (a[k] + b[k]) / 2)
        return dict(a, decode_tok_s=(a["tokens"] + b["tokens"]) / sum(secs),
                    text_hash=a["text_hash"] if a["text_hash"] == b["text_hash"] else None,
                    mean_accepted=mean("mean_accepted"), acceptance=mean("acceptance"),
                    verify_steps=mean("verify_steps"))

    def once(r: int) -> dict:
        out = {}
        for w, prompt in prompts.items():
            if speculator is None:
                out[w] = answer(prompt, False)
                continue
            first = r % 2 == 0                         # which goes first, in turns
            got = {True: [], False: []}
            for guess in (first, not first, not first, first):
                got[guess].append(answer(prompt, guess))
            out[w] = dict(pooled(got[True]), plain=pooled(got[False]))
        llm.engine.speculator = speculator
        return out
    once(0)
    _say({"ready": True})
    r = 0
    for line in sys.stdin:
        if line.strip() != "run":
            break
        r += 1
        _say(once(r))
    _say({"threads": _threads(spec["backend"])})


def run_spec_bench(a) -> int:
    from .errors import InvalidArgumentError
    from .weights.fetch import ensure_default_model
    from .weights.load import QUANTS
    modes = [m.strip() for m in a.speculative.split(",") if m.strip()]
    for m in modes:
        if m not in SPEC_MODES:
            raise InvalidArgumentError(f"unknown speculative mode {m!r}; choose from {', '.join(SPEC_MODES)}")
    if "off" not in modes:
        modes.insert(0, "off")                  # the speed-up needs plain decoding alongside
    quants = [q.strip() for q in a.quant.split(",") if q.strip()]
    for q in quants:
        if q not in QUANTS:
            raise InvalidArgumentError(f"unknown quant {q!r}; choose from {', '.join(QUANTS)}")
    from .backends import ACTIVATIONS, BACKENDS
    acts = [x.strip() for x in a.activations.split(",") if x.strip()]
    for x in acts:
        if x not in ACTIVATIONS:
            raise InvalidArgumentError(f"unknown activations {x!r}; choose from {', '.join(ACTIVATIONS)}")
    backend = one_backend(a, "--speculative")
    if a.runs < 1 or a.new_tokens < 2:
        raise InvalidArgumentError("--runs must be at least 1 and --new-tokens at least 2")
    pairs = [(q, x, m) for q in quants for x in acts for m in modes]
    if quants == ["auto"] and "draft" in modes and a.draft_model is None:
        # the built-in draft is for the exact model: draft it for float32 weights and
        # activations, against their plain decoding (with int8 activations the model already
        # runs in the draft's form: no draft rows, and with only those, nothing to draft)
        if "f32" not in acts:
            raise InvalidArgumentError(
                "--speculative draft: the built-in draft is this model in its cheapest form, "
                "which it already runs in with int8 activations: add f32 to --activations, or "
                "give --draft-model PATH")
        pairs = [p for p in pairs if p[2] != "draft"] + [("f32", "f32", "off"), ("f32", "f32", "draft")]
    model = str(a.model or ensure_default_model())
    machine = _machine()
    print(f"minfer bench --speculative: {', '.join(SPEC_WORKLOADS)} workloads, up to {a.new_tokens} "
          f"new tokens, greedy, {a.runs} runs; {backend}; {machine['cpu']}, {machine['cores']} cores",
          file=sys.stderr)
    # plain decoding runs inside each speculative mode's process (its "off" row: the first such
    # process of that quant and activations); a process of its own only for one without
    guessing = {(q, x) for q, x, m in pairs if m != "off"}
    pairs = [(q, x, m) for q, x, m in pairs if m != "off" or (q, x) not in guessing]
    specs = [{"model": model, "backend": backend, "quant": q, "activations": x, "mode": m,
              "threads": a.threads, "k": a.num_speculative_tokens if m != "off" else None,
              "draft_model": a.draft_model if m == "draft" else None,
              "new_tokens": a.new_tokens} for q, x, m in pairs]
    rows = [dict(sp, runs=[]) for sp in specs]
    workers = []
    try:
        for sp in specs:
            print(f"  starting {_spec_name(sp)} ...", file=sys.stderr, flush=True)
            workers.append(_Worker(dict(sp, spec_bench=True)))
        for r in range(a.runs):
            print(f"  round {r + 1}/{a.runs}", file=sys.stderr, flush=True)
            for w, row in zip(workers, rows):
                row["runs"].append(w.run())
        for w, row in zip(workers, rows):
            row.update(w.close())
    finally:
        for w in workers:
            w.kill()
    _print_spec_table(rows)
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine, "settings": vars(a) | {"model": model},
                                            "speculative": rows}, indent=1, default=str))
        print(f"wrote {a.json}", file=sys.stderr)
    return 0


def _spec_name(sp) -> str:
    return f"{sp['quant']}/{sp.get('activations', 'f32')}/{sp['mode']}"


def _plain_rows(rows) -> list:
    """The table's rows: each speculative mode's, and per (quant, activations) an "off" row —
    its own process's, or the plain answers made in the first speculative process of that pair."""
    same = (lambda r, row: r["quant"] == row["quant"]
            and r.get("activations", "f32") == row.get("activations", "f32"))
    out = []
    for row in rows:
        if row["mode"] == "off":
            out.append(row)
        elif not any(same(r, row) and r["mode"] == "off" for r in out):
            out.append(dict(row, mode="off", runs=[{w: x[w]["plain"] for w in x} for x in row["runs"]]))
        if row["mode"] != "off":
            out.append(row)
    return out


def _print_spec_table(rows) -> None:
    """speed-up: a speculative mode's tok/s over plain decoding's in the same process and run
    (the median of those ratios); "off" rows: 1.00x."""
    head = (f"{'workload':<9} {'quant':<6} {'act':<4} {'mode':<6} {'tokens':>6} {'decode tok/s':>22} "
            f"{'accepted/step':>13} {'speed-up':>8} {'same text':>9}")
    print(head)
    print("-" * len(head))
    for w in SPEC_WORKLOADS:
        for row in _plain_rows(rows):
            runs = [x[w] for x in row["runs"]]
            d = _med([x["decode_tok_s"] for x in runs])
            acc = [x["mean_accepted"] for x in runs if x["mean_accepted"] is not None]
            if row["mode"] == "off":
                ratio, same = 1.0, True
            else:
                ratio = statistics.median(x["decode_tok_s"] / x["plain"]["decode_tok_s"]
                                          if x["plain"]["decode_tok_s"] else 0.0 for x in runs)
                same = all(x["text_hash"] is not None and x["text_hash"] == x["plain"]["text_hash"]
                           for x in runs)
            print(f"{w:<9} {row['quant']:<6} {row.get('activations', 'f32'):<4} {row['mode']:<6} "
                  f"{runs[0]['tokens']:>6} "
                  f"{d[0]:>8.1f} ({d[1]:.1f}..{d[2]:.1f}) "
                  f"{(format(statistics.median(acc), '.2f') if acc else '-'):>13} "
                  f"{ratio:>7.2f}x {'yes' if same else 'NO':>9}")


# --------------------------------------------------------------------------------------------
# Many rows a step: B sequences decoding together (one new token each), and k new tokens of one
# sequence after a cached prefix (what speculative verification runs), each a model.forward on a
# batch made directly (batch.make_batch), in the same worker as the rows above.
# --------------------------------------------------------------------------------------------
ROWS_PREFIX = 80        # tokens already in each sequence's cache
ROWS_STEPS = 8          # decode steps timed per batch size and run (their median counts)
ROWS_REPEATS = 10       # forwards timed per k in a row (after 2 untimed), the ks in turns,
ROWS_ROUNDS = 2         # this many times a run (the median of the 20 counts)


def add_rows_options(p) -> None:
    g = p.add_argument_group("many rows a step")
    g.add_argument("--batch", metavar="B,...", default=None,
                   help="also time decode steps of B sequences at once, one new token each "
                        f"(after an {ROWS_PREFIX}-token prefix): step time and total tok/s")
    g.add_argument("--verify-tokens", metavar="K,...", default=None,
                   help=f"also time the forward of k new tokens of one sequence after a cached "
                        f"{ROWS_PREFIX}-token prefix, logits for all k (speculative verification)")


def rows_options(a) -> tuple[list[int], list[int]]:
    from .errors import InvalidArgumentError

    def ints(text, flag):
        if not text:
            return []
        try:
            vals = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            vals = []
        if not vals or min(vals) < 1:
            raise InvalidArgumentError(f"{flag} takes positive whole numbers separated by commas, "
                                       f"e.g. {flag} 1,4,16")
        return vals
    return ints(a.batch, "--batch"), ints(a.verify_tokens, "--verify-tokens")


def rows_run(llm, spec: dict) -> dict:
    """One run: {"batch": {B: step seconds}, "verify": {k: seconds}}, medians of this run."""
    import numpy as np

    from .batch import make_batch
    model, bs = llm.model, 16
    batches, verify = spec.get("batch") or [], spec.get("verify_tokens") or []
    longest = max([ROWS_STEPS] + verify)
    per_seq = -(-(ROWS_PREFIX + longest) // bs)                     # blocks a sequence needs
    n_seqs = max(batches + [1])
    cache = model.new_cache(n_blocks=per_seq * n_seqs, block_size=bs)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(n_seqs)]
    rng = np.random.default_rng(0)
    V = llm.config.vocab_size
    model.forward(make_batch([(rng.integers(3, V, ROWS_PREFIX).tolist(), 0, tables[0])], bs), cache)
    for t in tables[1:]:                      # the same prefix in every sequence's blocks
        cache.k[:, t], cache.v[:, t] = cache.k[:, tables[0]], cache.v[:, tables[0]]

    def timed(batch):
        t0 = time.perf_counter()
        model.forward(batch, cache)
        return time.perf_counter() - t0
    out = {"batch": {}, "verify": {}}
    for B in batches:
        toks = rng.integers(3, V, (ROWS_STEPS, B))
        steps = [make_batch([([int(toks[s, i])], ROWS_PREFIX + s, tables[i]) for i in range(B)], bs)
                 for s in range(ROWS_STEPS)]
        timed(steps[0])                                           # first touch of these shapes
        out["batch"][B] = statistics.median(timed(b) for b in steps)
    # each k's forwards in a row, the sizes in turns, so that a noisy moment lands on all of
    # them; the first two untimed: on a shared host the forwards right after another size's
    # are slower for a few (docs/benchmarks.md, "Speculative decoding")
    fwd = {k: make_batch([(rng.integers(3, V, k).tolist(), ROWS_PREFIX, tables[0])], bs, all_logits=True)
           for k in verify}
    times = {k: [] for k in verify}
    for _ in range(ROWS_ROUNDS):
        for k in verify:
            timed(fwd[k])
            timed(fwd[k])
            times[k] += [timed(fwd[k]) for _ in range(ROWS_REPEATS)]
    out["verify"] = {k: statistics.median(t) for k, t in times.items()}
    return out


def rows_summary(results) -> None:
    """Each row's medians over its runs: batch_decode {B: {step_ms, tok_s}}, verify_ms {k: ms}."""
    for r in results:
        runs = r.get("rows_runs")
        if not runs:
            continue
        r["batch_decode"] = {}
        for B in runs[0]["batch"]:
            step = statistics.median(x["batch"][B] for x in runs)
            r["batch_decode"][int(B)] = {"step_ms": step * 1e3, "tok_s": int(B) / step}
        r["verify_ms"] = {int(k): statistics.median(x["verify"][k] for x in runs) * 1e3
                          for k in runs[0]["verify"]}


def print_rows_table(results) -> None:
    rows = [r for r in results if r.get("rows_runs")]
    if not rows:
        return
    r0 = rows[0]
    bs, ks = list(r0["batch_decode"]), list(r0["verify_ms"])
    cols = [f"B={B} tok/s (ms)" for B in bs] + [f"k={k} ms" for k in ks]
    head = f"{'backend':<9} {'quant':<6} {'act':<4} " + " ".join(f"{c:>17}" for c in cols)
    print()
    print(f"many rows a step: decode of B sequences at once (total tok/s, step ms); forward of k new "
          f"tokens after an {ROWS_PREFIX}-token prefix (ms)")
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = [f"{r['batch_decode'][B]['tok_s']:.0f} ({r['batch_decode'][B]['step_ms']:.1f})"
                 for B in bs] + [f"{r['verify_ms'][k]:.1f}" if k in r["verify_ms"] else "-" for k in ks]
        print(f"{r['backend']:<9} {r['quant']:<6} {r.get('activations', 'f32'):<4} "
              + " ".join(f"{c:>17}" for c in cells))
    llama = {r["quant"]: r for r in rows if r["backend"] == "llama.cpp"}
    pairs = [(r, llama[r["weight_format"]]) for r in rows
             if r["backend"] != "llama.cpp" and r.get("weight_format") in llama]
    if pairs:
        print("decode tok/s against llama-batched-bench on the same weight format: " + ", ".join(
            f"{_row_name(r)} ({r['weight_format']}) " + " ".join(
                f"B={B} {r['batch_decode'][B]['tok_s'] / b['batch_decode'][B]['tok_s']:.2f}x" for B in bs)
            for r, b in pairs))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True)
    _spec = json.loads(ap.parse_args().worker)
    (spec_worker if _spec.get("spec_bench") else worker)(_spec)
