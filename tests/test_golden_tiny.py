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


def _hf5_folder(tmp_path, config):
    """The tiny checkpoint that tools/make_golden.py tiny-hf5 saved with transformers 5: the same
    weights (rebuilt from the seed) under a config.json in the given layout."""
    import json
    from pathlib import Path
    z = np.load(Path(__file__).parent / "golden" / "tiny_hf5.npz")
    meta = json.loads(str(z["meta_json"]))
    state = synthetic.random_state(synthetic.hf_config(**meta["overrides"]), meta["seed"])
    return synthetic.write_hf_folder(tmp_path / "hf5", config, state), z


def test_transformers5_folder_matches_transformers(tmp_path):
    """config.json as transformers 5 writes it keeps rope_theta (100,000 here) inside
    rope_parameters; read at the top level only, it would fall back to 10,000."""
    import json
    from pathlib import Path
    config = json.loads((Path(__file__).parent / "golden" / "tiny_hf5_config.json").read_text())
    assert "rope_theta" not in config and config["rope_parameters"]["rope_theta"] == 100000.0
    folder, z = _hf5_folder(tmp_path, config)
    llm = minfer.LLM(folder, backend="numpy")
    assert llm.config.rope_theta == 100000.0
    for n in (7, 48):
        err = np.abs(llm.logits(z[f"ids_{n}"]) - z[f"logits_{n}"]).max()
        assert err <= 1e-4, f"T={n}: max abs error {err}"
    want = z["gen_ids"].tolist()
    params = minfer.SamplingParams(temperature=0, max_tokens=len(want), ignore_eos=True)
    assert llm.generate([z["ids_7"].tolist()], params)[0].token_ids == want

    # the transformers 4 layout of the same model gives the same logits; theta 10,000 does not
    # (so this test would catch a reader that misses rope_parameters)
    old = {k: v for k, v in config.items() if k != "rope_parameters"}
    for theta, same in ((100000.0, True), (10000.0, False)):
        folder, _ = _hf5_folder(tmp_path / str(theta), dict(old, rope_theta=theta))
        err = np.abs(minfer.LLM(folder, backend="numpy").logits(z["ids_48"]) - z["logits_48"]).max()
        assert (err <= 1e-4) == same, (theta, err)
