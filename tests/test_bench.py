"""The benchmark harness runs end to end (tiny random weights: this checks the plumbing, not speed)."""
import json
import subprocess
import sys

import pytest


def test_bench_random_weights_json(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "minfer", "bench", "--random-weights", "tiny",
                        "--backend", "numpy,numba", "--quant", "auto", "--runs", "2",
                        "--prompt-tokens", "16", "--new-tokens", "5", "--batch", "1,3",
                        "--verify-tokens", "2", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "decode tok/s" in r.stdout and "numba" in r.stdout
    data = json.loads(out.read_text())
    assert {"cpu", "numpy", "numba", "python"} <= set(data["machine"])
    rows = {(x["backend"], x["quant"]): x for x in data["results"]}
    assert set(rows) == {("numpy", "auto"), ("numba", "auto")}
    for row in rows.values():
        assert row["weights_mb"] > 0 and row["peak_rss_mb"] > 0
        for run in row["runs"]:
            assert run["decode_tok_s"] > 0 and run["prefill_tok_s"] > 0
            assert run["prefilled_tokens"] == 16         # the whole prompt, every run: no cache hits
    assert rows[("numba", "auto")]["cold_start_s"] >= rows[("numba", "auto")]["cached_start_s"] > 0
    # many rows a step: each configuration's decode of 1 and 3 sequences at once, a 2-token forward
    assert "many rows a step" in r.stdout
    for row in rows.values():
        assert set(row["batch_decode"]) == {"1", "3"} and set(row["verify_ms"]) == {"2"}
        assert all(v["tok_s"] > 0 and v["step_ms"] > 0 for v in row["batch_decode"].values())
        assert row["verify_ms"]["2"] > 0 and len(row["rows_runs"]) == len(row["runs"])


@pytest.mark.parametrize("flags,says", [(["--backend", "tpu"], "unknown backend"),
                                        (["--new-tokens", "1"], "--new-tokens at least 2"),
                                        (["--prompt-tokens", "0"], "--prompt-tokens must be"),
                                        (["--batch", "0,4"], "--batch takes positive"),
                                        (["--verify-tokens", "x"], "--verify-tokens takes positive"),
                                        (["--llama-batched-bench", sys.executable], "give --batch"),
                                        (["--llama-batched-bench", "/nonexistent", "--batch", "1"],
                                         "not an executable file"),
                                        (["--backend", "numpy", "--activations", "int8"],
                                         "nothing to measure"),
                                        (["--backend", "numba", "--quant", "f32", "--activations",
                                          "int8"], "nothing to measure"),
                                        (["--workload", "serve", "--speculative", "ngram"],
                                         "use it without --workload serve"),
                                        (["--quality", "--speculative", "ngram"],
                                         "use it without --quality"),
                                        (["--speculative", "ngram", "--batch", "4"],
                                         "--batch is part of the speed measurement: --speculative does not read it"),
                                        (["--workload", "prefix", "--verify-tokens", "8"],
                                         "--verify-tokens is part of the speed measurement"),
                                        (["--workload", "serve", "--requests", "0"],
                                         "--requests must be at least 1"),
                                        (["--workload", "serve", "--rate", "-1"],
                                         "--rate is requests a second"),
                                        (["--workload", "serve", "--ways", "static,nope"],
                                         "--ways takes one-at-a-time, static, continuous"),
                                        (["--workload", "prefix", "--rate", "5"],
                                         "--rate is part of --workload serve: --workload prefix"),
                                        (["--requests", "4"], "--requests is part of --workload serve and --workload prefix"),
                                        (["--speculative", "ngram", "--ways", "static"],
                                         "--ways is part of --workload serve"),
                                        (["--workload", "serve", "--runs", "5"],
                                         "--runs is part of the speed measurement and --speculative"),
                                        (["--quality", "--new-tokens", "64"], "--new-tokens is part of"),
                                        (["--speculative", "ngram", "--prompt-tokens", "64"],
                                         "--prompt-tokens is part of the speed measurement"),
                                        (["--window", "256"], "--window is part of --quality"),
                                        (["--max-seqs", "4"], "--max-seqs is part of --workload serve"),
                                        (["--num-speculative-tokens", "4"], "--num-speculative-tokens is part of --speculative"),
                                        (["--json", "/nonexistent/folder/out.json"],
                                         "cannot write a file there"),
                                        (["--threads", "999"], "threads (--threads) must be a whole number from 1 to"),
                                        (["--workload", "serve", "--backend", "numpy,numba,cuda"],
                                         "--workload runs one backend"),
                                        (["--speculative", "ngram", "--backend", "numba,numpy"],
                                         "--speculative runs one backend"),
                                        (["--quality", "--backend", "numpy,numba,cuda"],
                                         "--quality runs one backend"),
                                        (["--workload", "prefix", "--quant", "auto,q8_0"],
                                         "--workload runs one configuration: give one --quant"),
                                        (["--quality", "--window", "0"], "--window must be at least 2"),
                                        (["--quality", "--max-eval-tokens", "1"],
                                         "--max-eval-tokens must be at least 2"),
                                        (["--random-weights", "tiny", "--model", "x.gguf"],
                                         "--random-weights makes its own model"),
                                        (["--llama-models", "x.gguf"],
                                         "--llama-models are run by --llama-bench")])
def test_bench_bad_flags_are_one_line_errors(flags, says):
    r = subprocess.run([sys.executable, "-m", "minfer", "bench", *flags],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and says in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("workload", ["serve", "prefix"])
def test_bench_workload_too_short_a_context_is_one_line(tiny_gguf, workload):
    """The tiny model's 256-token context cannot hold the workload's longest request: said in one
    line (before: the warm-up's own prompt was reported too long)."""
    r = subprocess.run([sys.executable, "-m", "minfer", "bench", "--workload", workload, "--model",
                        str(tiny_gguf), "--backend", "numpy", "--requests", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "need a context of 273 tokens" in r.stderr and "it holds 256, the model's" in r.stderr


def test_bench_runs_llama_bench_side_by_side(tmp_path):
    """--llama-bench: a stand-in for llama.cpp's llama-bench (its JSON output: a test for -p
    tokens of prompt, one for -n of decode after -d cached ones) runs once a round for the prompt
    and once for the decode, that after the prompt's length (where minfer's decode runs: faster
    in an empty cache, here 70 against 50 tok/s), and its row is paired with minfer's row of the
    same weight format."""
    fake = tmp_path / "llama-bench"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        "a = sys.argv\n"
        "assert a[a.index('-r') + 1] == '1' and a[a.index('-t') + 1] == '2'\n"
        "open(__file__ + '.calls', 'a').write('x')\n"
        "t = 'llama 256M Q4_1'\n"
        "p, n = int(a[a.index('-p') + 1]), int(a[a.index('-n') + 1])\n"
        "d = int(a[a.index('-d') + 1]) if '-d' in a else 0\n"
        "tests = [{'n_prompt': p, 'n_gen': 0, 'n_depth': d, 'avg_ts': 100.0, 'model_type': t}] if p else []\n"
        "tests += [{'n_prompt': 0, 'n_gen': n, 'n_depth': d, 'avg_ts': 70.0 if d == 0 else 50.0,\n"
        "           'model_type': t}] if n else []\n"
        "print(json.dumps(tests))\n")
    fake.chmod(0o755)
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "minfer", "bench", "--random-weights", "tiny",
                        "--backend", "numba", "--quant", "auto", "--runs", "2", "--skip-startup",
                        "--prompt-tokens", "8", "--new-tokens", "4", "--threads", "2",
                        "--llama-bench", str(fake), "--llama-models", str(fake), "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["results"]
    llama = [x for x in rows if x["backend"] == "llama.cpp"]
    assert len(llama) == 1 and llama[0]["quant"] == "Q4_1" and len(llama[0]["runs"]) == 2
    assert [x["decode_tok_s"] for x in llama[0]["runs"]] == [50.0, 50.0]  # after the 8 tokens
    assert [x["prefill_tok_s"] for x in llama[0]["runs"]] == [100.0, 100.0]
    assert (tmp_path / "llama-bench.calls").read_text() == "xxxx"         # twice a round
    assert "against llama.cpp on the same weight format: numba/auto (Q4_1)" in r.stdout


def test_bench_says_how_llama_bench_died(tmp_path):
    """A llama-bench killed by a signal (SIGILL: built for another CPU's instructions) is named in
    a one-line error, with the hint to rebuild, not "no output"."""
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/bin/sh\nkill -ILL $$\n")
    fake.chmod(0o755)
    r = subprocess.run([sys.executable, "-m", "minfer", "bench", "--random-weights", "tiny",
                        "--backend", "numba", "--quant", "auto", "--runs", "1", "--skip-startup",
                        "--prompt-tokens", "8", "--new-tokens", "4",
                        "--llama-bench", str(fake), "--llama-models", str(fake)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]              # (the lines before: bench's progress)
    assert last.startswith("minfer: error: llama-bench was killed by SIGILL")
    assert "GGML_NATIVE=OFF" in last


# llama-batched-bench's --output-format jsonl: one line per B on stdout (this one from a real run:
# SmolLM2-135M Q4_1, B=4, one thread)
BATCHED_LINE = ('{"n_kv_max": 4096, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, '
                '"n_gpu_layers": -1, "n_threads": 1, "n_threads_batch": 1, "pp": 80, "tg": 32, "pl": 4, '
                '"n_kv": 448, "t_pp": 3.826285, "speed_pp": 83.632034, "t_tg": 2.519711, '
                '"speed_tg": 50.799477, "t": 6.345996, "speed": 70.595695}')


def _fake_batched_bench(tmp_path, lost_b=None):
    """A stand-in for llama-batched-bench: BATCHED_LINE for every B of -npl, 10 ms a step each."""
    fake = tmp_path / "llama-batched-bench"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        "a = sys.argv\n"
        "assert a[a.index('-t') + 1] == '2' and a[a.index('-npp') + 1] == '80'\n"
        "open(__file__ + '.calls', 'a').write('x')\n"
        f"line = json.loads({BATCHED_LINE!r})\n"
        "for B in map(int, a[a.index('-npl') + 1].split(',')):\n"
        f"    if B != {lost_b!r}:\n"
        "        line.update(pl=B, t_tg=0.01 * line['tg'], speed_tg=100.0 * B)\n"
        "        print(json.dumps(line))\n")
    fake.chmod(0o755)
    return fake


def _bench_with_batched(tmp_path, fake, *more):
    from minfer.bench import _random_model
    gguf = _random_model("tiny", "auto", tmp_path)          # Q4_1 layers: paired with numba/auto
    return subprocess.run([sys.executable, "-m", "minfer", "bench", "--random-weights", "tiny",
                           "--backend", "numba", "--quant", "auto", "--runs", "2", "--skip-startup",
                           "--prompt-tokens", "8", "--new-tokens", "4", "--threads", "2", "--batch", "1,3",
                           "--llama-batched-bench", str(fake), "--llama-models", str(gguf), *more],
                          capture_output=True, text=True, timeout=600)


def test_bench_runs_llama_batched_bench_side_by_side(tmp_path):
    """--llama-batched-bench: once a round, its decode tok/s per B of --batch in the rows table
    beside minfer's, paired by weight format, and in the JSON."""
    fake = _fake_batched_bench(tmp_path)
    out = tmp_path / "bench.json"
    r = _bench_with_batched(tmp_path, fake, "--json", str(out))
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["results"]
    llama = [x for x in rows if x["backend"] == "llama.cpp"]
    assert len(llama) == 1 and llama[0]["quant"] == "Q4_1" and len(llama[0]["rows_runs"]) == 2
    assert {B: v["tok_s"] for B, v in llama[0]["batch_decode"].items()} == {"1": 100.0, "3": 300.0}
    assert (tmp_path / "llama-batched-bench.calls").read_text() == "xx"   # once per round
    table = r.stdout[r.stdout.index("many rows a step"):]
    assert "llama.cpp Q4_1" in table and "300 (10.0)" in table
    assert "against llama-batched-bench on the same weight format: numba/auto (Q4_1) B=1" in table


def test_bench_says_when_llama_batched_bench_lacks_a_b(tmp_path):
    r = _bench_with_batched(tmp_path, _fake_batched_bench(tmp_path, lost_b=3))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("minfer: error: llama-batched-bench gave no "
                                                        "figures for B=3")



def test_bench_on_a_backend_this_machine_lacks_is_one_plain_line(tiny_gguf):
    """A worker's error is minfer's own message, without the exception's class path (the cuda
    backend, the simulator switched off: on a machine without a GPU it is unavailable)."""
    import os
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    r = subprocess.run([sys.executable, "-m", "minfer", "bench", "--model", str(tiny_gguf), "--backend",
                        "cuda", "--runs", "1", "--prompt-tokens", "4", "--new-tokens", "3",
                        "--skip-startup"], capture_output=True, text=True, timeout=300, env=env)
    if r.returncode == 0:
        return                                            # a GPU is here: nothing to say
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("minfer: error: benchmark worker for cuda/auto failed: no CUDA GPU"), last
