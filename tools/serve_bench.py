"""Load an OpenAI-compatible server with a fixed, seeded workload; print throughput and latencies.

    python tools/serve_bench.py --serve-url http://127.0.0.1:8000          # a running server
    python tools/serve_bench.py --model PATH --backend numba               # starts minfer serve
    python tools/serve_bench.py --llama-server ~/llama.cpp/build/bin/llama-server  # both, side by side

The workload: `--requests` streamed completion requests (default 64), each a slice of Alice in
Wonderland of 20..900 words and 8..256 new tokens (ignore_eos, so each generates exactly that many),
temperature 0, the same every run (`--seed`). For each concurrency C (default 1, 4, 16) C clients
take the requests in order, each sending its next as soon as its last ended. Reported per C:

  out tok/s   generated tokens / wall time of the whole run
  req/s       requests / wall time
  TTFT        time to first token (request sent -> first text chunk), p50/p90/p99
  ITL         inter-token latency (between consecutive tokens of one stream), p50/p90/p99
  errors      requests that failed (HTTP error, broken stream, wrong token count)
  preempted   sequences the server preempted for lack of KV blocks (minfer's /metrics)

A server started here (minfer's, or llama-server with `--llama-server`) gets the same GGUF file
and threads; llama-server runs with `-np 16 -cb` (16 slots, continuous batching).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ALICE = Path(__file__).resolve().parent.parent / "minfer" / "data" / "alice_ch1.txt"


def workload(n: int, seed: int, min_words=20, max_words=900, min_new=8, max_new=256):
    """-> [(prompt text, new tokens)], the same for the same arguments."""
    words = ALICE.read_text().split()[30:]           # past the header
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(min_words, max_words)
        start = rng.randrange(len(words))
        piece = (words[start:] + words)[:k]
        out.append((" ".join(piece), rng.randint(min_new, max_new)))
    return out


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    start: float = 0.0
    first: float | None = None
    times: list[float] = field(default_factory=list)     # arrival of each token's chunk
    tokens: int = 0


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, n_new: int,
              headers: dict) -> Result:
    r = Result(start=time.perf_counter())
    body = {"model": model, "prompt": prompt, "max_tokens": n_new, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    usage = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for ch in chunk.get("choices") or []:
                    if ch.get("text"):
                        now = time.perf_counter()
                        r.first = r.first or now
                        r.times.append(now)
    except (httpx.HTTPError, ValueError) as e:
        r.error = f"{type(e).__name__}: {e}"
        return r
    r.tokens = usage["completion_tokens"] if usage else len(r.times)
    r.ok = r.first is not None and r.tokens == n_new
    if not r.ok:
        r.error = f"{r.tokens} tokens instead of {n_new}"
    return r


async def run_level(url: str, model: str, jobs, concurrency: int, headers: dict) -> dict:
    queue = list(enumerate(jobs))
    results: list[Result | None] = [None] * len(jobs)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
        async def worker():
            while queue:
                i, (prompt, n_new) = queue.pop(0)
                results[i] = await one(client, url, model, prompt, n_new, headers)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    ttft = [r.first - r.start for r in ok]
    itl = [b - a for r in ok for a, b in zip(r.times, r.times[1:])]
    errors = [r.error for r in results if not r.ok]
    return {"concurrency": concurrency, "requests": len(jobs), "wall_s": wall,
            "out_tok_s": sum(r.tokens for r in ok) / wall, "req_s": len(ok) / wall,
            "ttft": _pcts(ttft), "itl": _pcts(itl), "errors": len(errors),
            "first_error": errors[0] if errors else None}


def _pcts(xs):
    if not xs:
        return {"p50": None, "p90": None, "p99": None}
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=100, method="inclusive") if len(xs) > 1 else xs * 99
    return {"p50": q[49], "p90": q[89], "p99": q[98]}


# --- servers started here ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve_bench: the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("serve_bench: the server did not come up")


def start_minfer(a) -> tuple[str, subprocess.Popen]:
    port = _free_port()
    cmd = [sys.executable, "-m", "minfer", "serve", "--port", str(port), "--backend", a.backend,
           "--log-level", "warning"] + (["--model", a.model] if a.model else [])
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    cmd += a.serve_args.split() if a.serve_args else []
    return f"http://127.0.0.1:{port}", subprocess.Popen(cmd)


def start_llama(a, model: str) -> tuple[str, subprocess.Popen]:
    port = _free_port()
    cmd = [a.llama_server, "-m", model, "-t", str(a.threads or os.cpu_count()), "-np", "16", "-cb",
           "-c", str(16 * 2048), "--host", "127.0.0.1", "--port", str(port)]
    return f"http://127.0.0.1:{port}", subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                                        stderr=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen) -> None:
    """Stop a server started here; killed if it has not exited 30 s after SIGTERM."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def model_name(url: str, headers: dict) -> str:
    return httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]


def bench(url: str, label: str, jobs, levels, headers) -> list[dict]:
    model = model_name(url, headers)
    # warm-up (kernels loaded, caches touched): not measured; its prompt shares no block with the jobs
    asyncio.run(run_level(url, model, [("Once upon a time " * 60, 8)], 1, headers))
    rows = []
    for c in levels:
        # a tag first in every prompt: a level must not find the earlier levels' prompts in a
        # prefix cache (the servers keep them), or its prefills would be nearly free
        tagged = [(f"[run {c}, request {i}] {prompt}", n) for i, (prompt, n) in enumerate(jobs)]
        before = _preemptions(url)
        row = asyncio.run(run_level(url, model, tagged, c, headers))
        row["server"] = label
        after = _preemptions(url)
        row["preemptions"] = after - before if None not in (before, after) else None
        rows.append(row)
        print(_fmt(row), flush=True)
    return rows


def _preemptions(url: str) -> int | None:
    """minfer's count of preempted sequences (None from a server without it)."""
    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    m = re.search(r"^minfer_preemptions_total (\S+)$", text, re.M)
    return int(float(m.group(1))) if m else None


HEADER = (f"{'server':<14}{'conc':>5}{'out tok/s':>11}{'req/s':>7}{'TTFT p50':>10}{'p90':>8}{'p99':>8}"
          f"{'ITL p50':>9}{'p90':>8}{'p99':>8}{'errors':>8}{'preempted':>11}")


def _fmt(r: dict) -> str:
    def s(v):
        return f"{v:.2f}" if v is not None else "-"

    def ms(v):
        return f"{v * 1000:.0f}" if v is not None else "-"
    return (f"{r['server']:<14}{r['concurrency']:>5}{r['out_tok_s']:>11.1f}{r['req_s']:>7.2f}"
            f"{s(r['ttft']['p50']):>9}s{s(r['ttft']['p90']):>7}s{s(r['ttft']['p99']):>7}s"
            f"{ms(r['itl']['p50']):>7}ms{ms(r['itl']['p90']):>6}ms{ms(r['itl']['p99']):>6}ms"
            f"{r['errors']:>8}{r['preemptions'] if r['preemptions'] is not None else '-':>11}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve-url", default=None, help="a running server (else one is started here)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="GGUF for the servers started here (default model)")
    p.add_argument("--backend", default="numba")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--serve-args", default="", help="more flags for minfer serve, one string")
    p.add_argument("--llama-server", metavar="PATH", default=None,
                   help="also run the workload on llama.cpp's llama-server (same GGUF, threads)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated (default: %(default)s)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", default=None, help="also write the rows as JSON")
    a = p.parse_args(argv)
    try:
        levels = [int(c) for c in a.concurrency.split(",") if c.strip()]
    except ValueError:
        p.error(f"--concurrency takes whole numbers separated by commas, got {a.concurrency!r}")
    if not levels or min(levels) < 1:
        p.error(f"--concurrency takes numbers >= 1, got {a.concurrency!r}")
    if a.requests < 1:
        p.error(f"--requests must be at least 1, got {a.requests}")
    if a.threads is not None and a.threads < 1:
        p.error(f"--threads must be at least 1, got {a.threads}")
    jobs = workload(a.requests, a.seed)
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    print(f"{a.requests} streamed completions, prompts {min(len(j[0].split()) for j in jobs)}.."
          f"{max(len(j[0].split()) for j in jobs)} words, {sum(j[1] for j in jobs)} new tokens "
          f"in all, temperature 0, seed {a.seed}", flush=True)
    print(HEADER, flush=True)
    rows, procs = [], []
    try:
        if a.serve_url:
            rows += bench(a.serve_url.rstrip("/"), "minfer", jobs, levels, headers)
        else:
            url, proc = start_minfer(a)
            procs.append(proc)
            _wait_up(url, proc)
            rows += bench(url, "minfer", jobs, levels, headers)
            _stop(proc)                                # before the next server: one at a time
        if a.llama_server:
            from minfer.weights.fetch import ensure_default_model
            model = a.model or str(ensure_default_model(quiet=True))
            url, proc = start_llama(a, model)
            procs.append(proc)
            _wait_up(url, proc)
            rows += bench(url, "llama-server", jobs, levels, {})
    finally:
        for proc in procs:
            _stop(proc)
    errs = [r["first_error"] for r in rows if r["first_error"]]
    if errs:
        print(f"first error: {errs[0]}", file=sys.stderr)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 1 if errs else 0


if __name__ == "__main__":
    raise SystemExit(main())
