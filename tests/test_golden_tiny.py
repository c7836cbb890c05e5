"""Tiny random checkpoints vs HF transformers (golden logits made by tools/make_golden.py)."""
import numpy as np
import pytest

import minfer
from minfer.weights import synthetic

# (format, weight type, golden key suffix, tolerance). Quantized goldens come from transformers
# loading the same quantized GGUF (it dequantizes); F16 has no golden of its own, so it is held to
# the F32 golden at a tolerance that f16 rounding of the weights allows.
CASES = [("hf", "F32", "", 1e-4), ("gguf", "F32", "", 1e-4), ("gguf", "Q8_0", "_Q8_0", 1e-4),
         ("gguf", "Q4_1", "_Q4_1", 1e-4), ("gguf", "F16", "", 5e-3)]


@pytest.mark.parametrize("variant", ["gqa_untied", "mha_tied"])
@pytest.mark.parametrize("fmt,dtype,suffix,tol", CASES)
def test_logits_match_transformers(tiny_golden, tmp_path, variant, fmt, dtype, suffix, tol):
    z, meta = tiny_golden
    info = meta["variants"][variant]
    path = synthetic.tiny_checkpoint(tmp_path, fmt=fmt, seed=info["seed"], dtype=dtype, **info["overrides"])
    llm = minfer.LLM(path, backend="numpy")
    checked = 0
    for n in (1, 7, 19, 48):
        key = f"{variant}/logits_{n}{suffix}"
        if key not in z.files:
            continue
        got = llm.logits(z[f"{variant}/ids_{n}"])
        assert got.shape == z[key].shape and got.dtype == np.float32
        err = np.abs(got - z[key]).max()
        assert err <= tol, f"{variant} {fmt} {dtype} T={n}: max abs error {err}"
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize("variant", ["gqa_untied", "mha_tied"])
@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_greedy_continuation_matches_transformers(tiny_golden, tmp_path, variant, fmt):
    z, meta = tiny_golden
    info = meta["variants"][variant]
    path = synthetic.tiny_checkpoint(tmp_path, fmt=fmt, seed=info["seed"], **info["overrides"])
    llm = minfer.LLM(path, backend="numpy")
    want = z[f"{variant}/gen_ids"].tolist()
    params = minfer.SamplingParams(temperature=0, max_tokens=len(want), ignore_eos=True)
    out = llm.generate([z[f"{variant}/gen_prompt"].tolist()], params)[0]
    assert out.token_ids == want
