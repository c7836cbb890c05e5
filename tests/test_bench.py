"""The benchmark harness runs end to end (tiny random weights: this checks the plumbing, not speed)."""
import json
import subprocess
import sys


def test_bench_random_weights_json(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "minfer", "bench", "--random-weights", "tiny",
                        "--backend", "numpy,numba", "--quant", "auto", "--runs", "2",
                        "--prompt-tokens", "16", "--new-tokens", "5", "--json", str(out)],
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
    assert rows[("numba", "auto")]["cold_start_s"] >= rows[("numba", "auto")]["cached_start_s"] > 0


def test_bench_bad_flags_are_one_line_errors():
    r = subprocess.run([sys.executable, "-m", "minfer", "bench", "--backend", "tpu"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "unknown backend" in r.stderr
