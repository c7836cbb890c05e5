"""The command line, as a user meets it: help everywhere, and bad input -> one line, exit != 0."""
import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFWriter


def run(*args, env=None, input=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "minfer", *map(str, args)], capture_output=True,
                          text=True, env=e, input=input, timeout=120)


def assert_clean_error(r, *words):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


@pytest.mark.parametrize("cmd", [[], ["chat"], ["generate"], ["fetch"], ["info"]])
def test_help(cmd):
    r = run(*cmd, "--help")
    assert r.returncode == 0 and "usage" in r.stdout.lower()


def test_generate_prints_completion_on_stdout_and_stats_on_stderr(tiny_gguf):
    r = run("generate", "--model", tiny_gguf, "--raw", "--max-tokens", "5", "hello")
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stderr and "tok/s" not in r.stdout


def test_chat_session(tiny_gguf):
    r = run("chat", "--model", tiny_gguf, "--max-tokens", "4", "--seed", "1",
            input="hello\nand more\n/reset\nagain\n/exit\n")   # the 2nd turn reuses the 1st one's cache
    assert r.returncode == 0, r.stderr
    assert "conversation cleared" in r.stderr


def test_missing_model():
    assert_clean_error(run("generate", "--model", "/nonexistent/model.gguf", "hi"), "no model")


def test_corrupt_model(tmp_path):
    f = tmp_path / "junk.gguf"
    f.write_bytes(np.random.default_rng(0).bytes(5000))
    assert_clean_error(run("generate", "--model", f, "hi"), "not a GGUF")


def test_truncated_model(tiny_gguf, tmp_path):
    f = tmp_path / "cut.gguf"
    f.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    assert_clean_error(run("generate", "--model", f, "hi"), "truncated")


def test_unknown_architecture(tmp_path):
    f = tmp_path / "mamba.gguf"
    w = GGUFWriter(str(f), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert_clean_error(run("generate", "--model", f, "hi"), "unsupported architecture")


def test_prompt_over_context(tiny_gguf):
    assert_clean_error(run("generate", "--model", tiny_gguf, "--raw", "--max-context", "8",
                           "a long prompt that will not fit in eight tokens at all"), "context")


@pytest.mark.parametrize("flags,word", [(["--temperature", "-1"], "temperature"),
                                        (["--top-p", "2"], "top_p"),
                                        (["--max-tokens", "0"], "max_tokens"),
                                        (["--top-k", "many"], "invalid int"),
                                        (["--backend", "tpu"], "invalid choice")])
def test_bad_flags(tiny_gguf, flags, word):
    assert_clean_error(run("generate", "--model", tiny_gguf, *flags, "hi"), word)


@pytest.mark.parametrize("flags,words", [(["--speculative", "ngram"], ["--speculative", "serve"]),
                                         (["--backend", "numpy"], ["--backend", "serve"]),
                                         (["--kv-cache-mb", "64"], ["--kv-cache-mb"]),
                                         (["--model", "x.gguf"], ["--model"])])
def test_chat_with_a_server_refuses_the_flags_of_a_model_here(flags, words):
    """chat --server: the server's model answers, so a flag that sets up a model here would be
    ignored — it is an error instead (before any connection is tried)."""
    assert_clean_error(run("chat", "--server", "http://127.0.0.1:9", *flags, input="hi\n"), *words)


def test_generate_raw_with_a_system_prompt(tiny_gguf):
    assert_clean_error(run("generate", "--model", tiny_gguf, "--raw", "--system", "be brief", "hi"),
                       "--system", "--raw")


@pytest.mark.parametrize("flags", [["--quant", "q4_0"], ["--activations", "int8"]])
def test_chat_use_mine_takes_float32_weights(tiny_gguf, tmp_path, flags):
    assert_clean_error(run("chat", "--model", tiny_gguf, "--use-mine", tmp_path, *flags, input="hi\n"),
                       flags[0], "float32")


def test_chat_api_key_without_a_server():
    assert_clean_error(run("chat", "--api-key", "k", input="hi\n"), "--api-key", "--server")
    assert_clean_error(run("chat", "--anyway", input="hi\n"), "--anyway", "--use-mine")


def test_debug_shows_traceback():
    r = run("--debug", "generate", "--model", "/nonexistent/x.gguf", "hi")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_chat_turns_tool(tiny_gguf):
    """tools/chat_turns.py (the figures in docs/architecture.md): from the second turn on, the
    reusing chat prefills fewer tokens than the fresh one, and says how many it reused."""
    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "chat_turns.py")
    r = subprocess.run([sys.executable, tool, "--model", str(tiny_gguf), "--rounds", "1",
                        "--max-tokens", "3"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = {ln.split()[0]: ln.split("tokens:")[1].split() for ln in r.stdout.splitlines()}
    fresh, reuse = ([tuple(map(int, t.split("/"))) for t in rows[k]] for k in ("fresh", "reuse"))
    assert all(u == 0 for _, u in fresh) and fresh[0] == reuse[0]
    assert all(p < pf and u > 0 for (p, u), (pf, _) in zip(reuse[1:], fresh[1:]))


def test_decode_floor_tool(tiny_gguf):
    """tools/decode_floor.py (docs/benchmarks.md): a row per format, whose ideal is the bytes
    read at the measured bandwidth plus the regions, and minfer's share of it. (Not "below
    100%": this tiny model's weights sit in cache, and with the machine busy the bandwidth and
    region measures can drop ~10x while the model's decode does not, on a machine shared with
    other work.)"""
    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "decode_floor.py")
    r = subprocess.run([sys.executable, tool, "--model", str(tiny_gguf), "--quant", "auto,q8_0",
                        "--runs", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    bw = float(lines[0].split(":")[1].split()[0]) * 1e9                   # bytes / s
    regions_ms = float(lines[1].split("=")[1].split()[0])
    kv_mb = float(lines[2].split(":")[1].split()[0])
    rows = {ln.split()[0]: ln.split() for ln in lines[4:]}
    assert set(rows) == {"auto", "q8_0"} and rows["auto"][1] == "F32" and rows["q8_0"][1] == "Q8_0"
    for quant, fmt, mb, ideal_ms, ideal_tok_s, tok_s, share in rows.values():
        expect = (float(mb) + kv_mb) * 1e6 / bw * 1e3 + regions_ms
        assert abs(float(ideal_ms) - expect) < 0.011 + 0.01 * expect
        assert float(tok_s) > 0 and float(ideal_tok_s) > 0
        assert abs(int(share.rstrip("%")) - 100 * float(tok_s) / float(ideal_tok_s)) <= 1.5
    assert float(rows["q8_0"][2]) < float(rows["auto"][2]) / 2         # ~1 byte a weight vs 4
    bad = subprocess.run([sys.executable, tool, "--model", str(tiny_gguf), "--quant", "q3"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown quant 'q3'" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("tool, args, words", [
    ("rows_ab.py", ["--rounds", "0"], ["--rounds", "at least 1"]),
    ("serve_bench.py", ["--concurrency", "0"], ["--concurrency", ">= 1"]),
    ("serve_bench.py", ["--concurrency", "4,x"], ["--concurrency", "whole numbers"]),
    ("serve_bench.py", ["--requests", "0"], ["--requests", "at least 1"]),
    ("chat_turns.py", ["--max-tokens", "0"], ["--max-tokens", "at least 1"]),
    ("decode_floor.py", ["--runs", "0"], ["--runs", "at least 1"]),
    ("spec_replay.py", ["--context", "100000"], ["--context 100000", "does not fit"]),
])
def test_tools_refuse_bad_values(tool, args, words, tiny_gguf):
    """The measuring tools say what is wrong with a value, before any work (spec_replay once the
    model says how much context it has), instead of a traceback, silence or a shortened run."""
    path = os.path.join(os.path.dirname(__file__), "..", "tools", tool)
    model = ["--model", str(tiny_gguf)] if tool == "spec_replay.py" else []
    r = subprocess.run([sys.executable, path, *model, *args], capture_output=True, text=True,
                       timeout=300)
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert all(w in last for w in words), last


def test_compile_progress_shows_while_numba_compiles(tmp_path, monkeypatch):
    """The compile notice appears whenever numba compiles (not only on a first run), names what
    it compiles and counts it; the next time the same configuration compiles it has a total, a bar
    and an estimate; with everything compiled it says nothing."""
    import io
    import numba
    from minfer import jitcache
    monkeypatch.setenv("MINFER_HOME", str(tmp_path))

    @numba.njit
    def inner(x):
        return x + 1

    @numba.njit
    def outer(x):
        return inner(x) * 2

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    def run(arg):
        out = Terminal()
        with jitcache.compiling("test kernels", key="k", stream=out):
            outer(arg)
        return out.getvalue()

    first = run(1)
    assert first.startswith("minfer: compiling test kernels") and "about a minute" in first
    assert "outer" in first and "inner" in first and "compiled 2 functions" in first
    again = run(1.0)                                     # a new signature: compiles again
    assert "as last time" in again and "/2" in again and "[" in again and "s left" in again
    assert run(2) == ""                                  # all compiled: silent
    import types                                         # a student's exercise file's kernel:
    student = types.ModuleType("minfer_student_09_numba_1")   # compiled every run, no notice
    exec("import numba\n@numba.njit\ndef k(x):\n    return x - 1\n", student.__dict__)
    out = Terminal()
    with jitcache.compiling("test kernels", key="k2", stream=out):
        student.k(1)
    assert out.getvalue() == ""


def test_readable_model_name_and_recommended_sampling():
    from minfer.config import ModelConfig, readable_name, recommended_sampling
    meta = {"general.name": "Smollm2 135M 8k Lc100K Mix1 Ep2", "general.basename": "smollm2",
            "general.size_label": "135M", "general.finetune": "instruct"}
    assert readable_name(meta, "/x/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct"
    assert readable_name(meta, "/x/model.gguf") == "smollm2 135M instruct"
    assert readable_name({"general.name": "Tiny"}, "/x/model.gguf") == "Tiny"
    assert readable_name({}, "/x/my-model-Q8_0.gguf") == "my-model"
    cfg = ModelConfig(vocab_size=8, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4,
                      ffn_dim=8, name="SmolLM2-135M-Instruct")
    assert recommended_sampling(cfg) == {"temperature": 0.2, "top_p": 0.9}
    cfg.name = "other"
    assert recommended_sampling(cfg) == {"temperature": 0.7, "top_p": 1.0}


def test_chat_help_says_the_sampling_defaults():
    from minfer.cli import build_parser
    import argparse
    chat = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["chat"]
    text = " ".join(chat.format_help().split())
    assert "SmolLM2: 0.2" in text and "SmolLM2: 0.9" in text




def test_generate_dash_reads_the_prompt_from_stdin(tiny_gguf):
    args = ("generate", "--model", tiny_gguf, "--raw", "--max-tokens", "3", "--temperature", "0")
    piped = run(*args, "-", input="hello there")
    given = run(*args, "hello there")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == given.stdout
    assert piped.stderr.split("prompt tokens")[0] == given.stderr.split("prompt tokens")[0]
    assert_clean_error(run(*args, "-", input=""), "standard input is empty")


def _answers(stdout: str) -> list[str]:
    return [a.strip() for a in stdout.split("\n> ")[1:] if a.strip()]


def test_chat_seed_gives_each_turn_fresh_text_and_reset_the_same_again(tiny_gguf):
    """--seed makes the conversation reproducible: turn i samples with seed + i, so a follow-up
    is not the first answer again; after /clear (= /reset) the turns start over."""
    r = run("chat", "--model", tiny_gguf, "--max-tokens", "8", "--temperature", "1.0", "--seed", "3",
            input="hello\nhello\n/clear\nhello\n/exit\n")
    assert r.returncode == 0, r.stderr
    first, second, again = _answers(r.stdout)
    assert first != second and again == first
    assert "conversation cleared" in r.stderr


def test_chat_slash_commands(tiny_gguf):
    r = run("chat", "--model", tiny_gguf, "--max-tokens", "3", "--temperature", "0",
            input="/help\n//etc/hosts\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert "/reset (or /clear)" in r.stderr and "//" in r.stderr
    assert len(_answers(r.stdout)) == 1                       # "//..." is sent as "/etc/hosts"


def test_generate_empty_system_prompt_is_not_the_default(tiny_gguf):
    args = ("generate", "--model", tiny_gguf, "--max-tokens", "1", "hi")
    default, empty = run(*args), run(*args, "--system", "")
    assert default.returncode == 0 and empty.returncode == 0, empty.stderr
    count = lambda r: int(r.stderr.split("[")[1].split()[0])   # noqa: E731  "[N prompt tokens"
    assert count(empty) != count(default)
