"""The mutation fuzzer (tools/fuzz.py), a fast slice: a few hundred mutated GGUF files,
safetensors headers, config.json, tokenizer_config.json and chat templates, each loaded in a
forked child under a memory cap and a time limit. Every one must load or fail with a clean
MinferError: no traceback, no hang, no memory blow-up. The long run is
`python tools/fuzz.py --count 5000` (figures in docs/reliability.md)."""
import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "fuzz.py"


def _fuzz(*args, timeout=240):
    r = subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode in (0, 1), r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r


def test_the_classifier_sees_each_kind_of_bug():
    """A fuzzer that cannot tell a traceback, a hang or a blow-up from a clean error would pass
    everything: check it on targets whose outcome is known."""
    got, _ = _fuzz("--self-test", timeout=60)
    assert got == {"ok": "ok", "error": "error", "traceback": "traceback", "hang": "hang",
                   "blowup": "blowup", "signal": "traceback"}


def test_mutants_fail_cleanly():
    res, r = _fuzz("--count", "250", "--seed", "7", "--json")
    bugs = "\n\n".join(f"#{i} {kind} {outcome}: {what}\n{detail}"
                       for i, kind, outcome, what, detail in res["bugs"])
    assert not res["bugs"], f"{len(res['bugs'])} mutants ended badly:\n{bugs[:6000]}"
    counts = res["counts"]
    assert set(counts) == {"gguf", "safetensors", "config", "tokenizer_config", "template"}
    for kind, c in counts.items():
        assert sum(c.values()) == 50
        assert c.get("error", 0) >= 5, f"{kind}: too few mutants were refused ({c}): toothless mutations?"
    assert sum(c.get("ok", 0) for c in counts.values()) >= 10   # some mutations are harmless
