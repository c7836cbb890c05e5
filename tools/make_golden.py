"""Golden numbers for minfer's tests, from an independent implementation: HF transformers.

minfer's tests compare its logits, greedy continuations and token ids against the files this script
writes under tests/golden/. The numbers come from transformers (PyTorch on the CPU, float32, eager
attention), which shares no code with minfer, so agreement means both are right.

Run it in its own virtual environment (CI and minfer itself never need torch):

    python -m venv /tmp/venv-golden
    /tmp/venv-golden/bin/pip install torch==2.13.0 transformers accelerate gguf safetensors tokenizers numpy
    /tmp/venv-golden/bin/python tools/make_golden.py tiny
    /tmp/venv-golden/bin/python tools/make_golden.py tiny-hf5
    /tmp/venv-golden/bin/python tools/make_golden.py real --gguf PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf

(torch is installed from the CPU wheel index if you like: --index-url https://download.pytorch.org/whl/cpu.)

Subcommands
-----------
tiny
    Builds tiny random checkpoints with ``minfer.weights.synthetic`` (fixed seeds; each variant's
    config overrides and seed are stored), runs transformers on the HF folder, and writes
    tests/golden/tiny_llama.npz: the input ids and full float32 logits [T, vocab] for several
    sequence lengths per variant, a greedy 16-token continuation, and the logits of the Q8_0 and
    Q4_1 GGUF versions (transformers dequantizes them). It also loads the F32 GGUF with
    transformers and checks its logits equal the HF folder's: transformers un-permutes attn_q/attn_k
    on load, so this proves ``write_gguf`` permutes exactly as llama.cpp's converter does.

tiny-hf5
    A tiny random checkpoint saved by transformers itself (``save_pretrained``), so config.json has
    the layout transformers 5 writes: ``rope_theta`` inside ``rope_parameters`` with its
    ``rope_type``. The theta is 100,000 (as SmolLM2's), so a reader that misses it and falls back
    to 10,000 gets different logits. Writes tests/golden/tiny_hf5_config.json (config.json exactly
    as transformers wrote it) and tests/golden/tiny_hf5.npz (input ids, logits, a greedy
    continuation). The weights are ``synthetic.random_state(config, seed)``; the script checks
    that the safetensors transformers wrote hold exactly those, so the test rebuilds the folder
    from the seed and the stored config.json (no weights are committed).

real --gguf PATH
    Runs the real default model, SmolLM2-135M-Instruct (Q4_1 GGUF; transformers dequantizes it to
    float32), and writes tests/golden/smollm2_135m.npz (logits) and tests/golden/smollm2_135m.json
    (texts, token ids, greedy continuations, tokenizer cases). See ``real()`` for the keys.

Both files are small (np.savez_compressed); the whole golden folder stays under ~1.5 MB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

try:
    import torch
except ImportError:                   # (minfer's own venv: this script runs in another one)
    sys.exit("make_golden.py runs HF transformers on PyTorch, in a virtual environment of its own: "
             "see the top of this file for the two commands that make one")

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden"


def _load_synthetic():
    """minfer.weights.synthetic, loaded from its file: importing the `minfer` package would pull
    in the whole engine (numba...), which this venv does not need. synthetic.py itself needs only
    numpy, safetensors, gguf and tokenizers."""
    import importlib.util

    path = REPO / "minfer" / "weights" / "synthetic.py"
    spec = importlib.util.spec_from_file_location("minfer_synthetic", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


synthetic = _load_synthetic()

torch.manual_seed(0)
torch.set_grad_enabled(False)


def load_model(folder, gguf_file=None):
    """A float32, eager-attention transformers model, with every GGUF weight dequantized."""
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="eager", **kwargs
    )
    model.eval()
    # transformers >= 5 can keep GGUF blocks packed (GgufLinear) when it has a kernel for them. We
    # want plain float32 matmuls with the dequantized weights, so insist on ordinary modules.
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind.startswith("Gguf"):
            raise RuntimeError(f"{name} stayed packed as {kind}; expected dequantized float32 weights")
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, (name, p.dtype)
    return model


def logits_of(model, ids) -> np.ndarray:
    """Full float32 logits [T, vocab] for one sequence of ids."""
    out = model(torch.tensor([list(ids)], dtype=torch.long)).logits
    return out[0].float().numpy()


def greedy(model, prompt_ids, n_new: int):
    """Greedy continuation with transformers' ``generate`` (KV cache), EOS ignored, cross-checked
    against a plain argmax loop that recomputes the whole sequence each step (no cache).

    Returns (new ids, margins): margin[i] = top-1 minus top-2 logit at step i, so a test can tell a
    real mismatch from a near-tie that float rounding may flip."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False, max_new_tokens=n_new, min_new_tokens=0,
        eos_token_id=None, pad_token_id=synthetic.PAD_ID, bos_token_id=None,
    )
    x = torch.tensor([list(prompt_ids)], dtype=torch.long)
    # generate() falls back on the model's own EOS when ours is None; switch that off meanwhile.
    saved_eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None
    try:
        out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
    finally:
        model.generation_config.eos_token_id = saved_eos
    new = out[0, len(prompt_ids):].tolist()
    assert len(new) == n_new, f"generate stopped after {len(new)} tokens"

    seq, margins = list(prompt_ids), []
    for step in range(n_new):
        last = logits_of(model, seq)[-1]
        top2 = np.argsort(last)[::-1][:2]
        margins.append(float(last[top2[0]] - last[top2[1]]))
        seq.append(int(top2[0]))
    loop = seq[len(prompt_ids):]
    if loop != new:
        # Only acceptable at a near-tie; say so loudly.
        first = next(i for i, (a, b) in enumerate(zip(loop, new)) if a != b)
        print(f"  WARNING: generate and the no-cache loop differ at step {first} "
              f"(margin {margins[first]:.2e}); keeping the no-cache loop's ids")
    return loop, np.array(margins, dtype=np.float32)


# ==================================================================================================
# tiny
# ==================================================================================================

TINY_VARIANTS = {
    # name: (seed, hf_config overrides)
    "gqa_untied": (0, {}),  # the default: 4 heads sharing 2 KV heads, separate lm_head
    "mha_tied": (1, {"num_key_value_heads": 4, "tie_word_embeddings": True}),
}
TINY_LENGTHS = (1, 7, 19, 48)
TINY_QUANT_LENGTH = 19
TINY_QUANT_DTYPES = ("Q8_0", "Q4_1")
TINY_GEN_LENGTH = 7  # the prompt for the greedy continuation is the 7-token sequence
TINY_GEN_NEW = 16


def tiny_input_ids(vocab_size: int) -> dict[int, np.ndarray]:
    """Fixed input sequences: random ids over the whole vocabulary (specials included)."""
    rng = np.random.default_rng(1234)
    return {n: rng.integers(0, vocab_size, size=n).astype(np.int64) for n in TINY_LENGTHS}


def tiny(args) -> None:
    import transformers

    arrays: dict[str, np.ndarray] = {}
    meta = {
        "what": "tiny random llama checkpoints (minfer.weights.synthetic) run by HF transformers",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "variants": {},
        "lengths": list(TINY_LENGTHS),
        "keys": {
            "<v>/ids_<T>": "int64 [T] input ids",
            "<v>/logits_<T>": "float32 [T, vocab] logits at every position (HF folder, F32)",
            "<v>/logits_<T>_<Q>": f"float32 [T, vocab] for T={TINY_QUANT_LENGTH}, the <Q> GGUF "
                                  "(matmul weights and embedding quantized, transformers dequantizes)",
            "<v>/gen_prompt": f"int64 the prompt (= <v>/ids_{TINY_GEN_LENGTH})",
            "<v>/gen_ids": f"int64 [{TINY_GEN_NEW}] greedy new ids, EOS ignored",
            "<v>/gen_margin": "float32 top-1 minus top-2 logit at each greedy step",
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, (seed, overrides) in TINY_VARIANTS.items():
            print(f"variant {name}: seed {seed}, overrides {overrides}")
            folder = synthetic.tiny_checkpoint(Path(tmp) / name, fmt="hf", seed=seed, **overrides)
            config = synthetic.hf_config(**overrides)
            meta["variants"][name] = {"seed": seed, "overrides": overrides, "config": config}
            model = load_model(folder)

            gguf_f32 = synthetic.tiny_checkpoint(folder, fmt="gguf", seed=seed, dtype="F32", **overrides)
            model_gguf = load_model(folder, gguf_file=gguf_f32.name)

            for n, ids in tiny_input_ids(config["vocab_size"]).items():
                logits = logits_of(model, ids)
                from_gguf = logits_of(model_gguf, ids)
                err = float(np.abs(logits - from_gguf).max())
                print(f"  T={n:3d}: logits std {logits.std():.3f}, |HF folder - F32 GGUF| max {err:.2e}")
                assert err < 1e-5, "write_gguf's Q/K permutation does not match llama.cpp's convention"
                arrays[f"{name}/ids_{n}"] = ids
                arrays[f"{name}/logits_{n}"] = logits

                if n == TINY_QUANT_LENGTH:
                    for q in TINY_QUANT_DTYPES:
                        path = synthetic.tiny_checkpoint(folder, fmt="gguf", seed=seed, dtype=q, **overrides)
                        q_logits = logits_of(load_model(folder, gguf_file=path.name), ids)
                        print(f"    {q}: |F32 - {q}| max {np.abs(q_logits - logits).max():.3f}")
                        arrays[f"{name}/logits_{n}_{q}"] = q_logits

            prompt = arrays[f"{name}/ids_{TINY_GEN_LENGTH}"]
            new, margins = greedy(model, prompt, TINY_GEN_NEW)
            print(f"  greedy: {new} (smallest margin {margins.min():.3g})")
            arrays[f"{name}/gen_prompt"] = prompt
            arrays[f"{name}/gen_ids"] = np.array(new, dtype=np.int64)
            arrays[f"{name}/gen_margin"] = margins

    arrays["meta_json"] = np.array(json.dumps(meta))
    out = GOLDEN / "tiny_llama.npz"
    save(out, arrays)


# ==================================================================================================
# tiny-hf5
# ==================================================================================================

HF5_SEED = 5
HF5_OVERRIDES = {"rope_theta": 100000.0, "tie_word_embeddings": True, "num_hidden_layers": 2}
HF5_LENGTHS = (7, 48)


def tiny_hf5(args) -> None:
    import transformers
    from safetensors.numpy import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = synthetic.hf_config(**HF5_OVERRIDES)
    state = synthetic.random_state(config, HF5_SEED)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hf5"
        cfg = LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
        model = LlamaForCausalLM(cfg).eval()
        missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()},
                                                    strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        model.tie_weights()
        model.save_pretrained(folder)
        written = json.loads((folder / "config.json").read_text())
        print(f"  transformers {transformers.__version__} wrote config.json keys: {sorted(written)}")
        assert "rope_parameters" in written and "rope_theta" not in written, \
            "expected transformers 5's layout: rope_theta inside rope_parameters"
        saved = load_file(str(folder / "model.safetensors"))
        for name, w in saved.items():
            assert np.array_equal(w, state[name]), f"{name}: saved weights differ from random_state"
        assert set(state) - set(saved) <= {"lm_head.weight"}
        model = load_model(folder)                      # what a user of that folder gets
        ids_all = tiny_input_ids(config["vocab_size"])
        arrays = {}
        for n in HF5_LENGTHS:
            arrays[f"ids_{n}"] = ids_all[n] if n in ids_all else \
                np.random.default_rng(n).integers(0, config["vocab_size"], size=n)
            arrays[f"logits_{n}"] = logits_of(model, arrays[f"ids_{n}"])
        new, margins = greedy(model, arrays["ids_7"], TINY_GEN_NEW)
        arrays["gen_ids"], arrays["gen_margin"] = np.array(new, dtype=np.int64), margins
        # the same weights under theta 10,000: how far a reader that misses rope_parameters is off
        wrong = LlamaForCausalLM(LlamaConfig(**dict(
            {k: v for k, v in config.items() if k not in ("architectures", "model_type")},
            rope_theta=10000.0))).eval()
        wrong.load_state_dict(model.state_dict())
        off = float(np.abs(logits_of(wrong, arrays["ids_48"]) - arrays["logits_48"]).max())
        print(f"  theta 10,000 instead of 100,000: logits off by up to {off:.3f}")
    meta = {"what": "a tiny random llama saved by transformers' save_pretrained, run by transformers",
            "transformers": transformers.__version__, "torch": torch.__version__,
            "seed": HF5_SEED, "overrides": HF5_OVERRIDES, "theta_10000_max_abs_error": off}
    arrays["meta_json"] = np.array(json.dumps(meta))
    out = GOLDEN / "tiny_hf5_config.json"
    out.write_text(json.dumps(written, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")
    save(GOLDEN / "tiny_hf5.npz", arrays)


# ==================================================================================================
# real
# ==================================================================================================

PROMPTS = {
    # name: raw text, or a conversation rendered with the model's chat template
    # (chosen so that no greedy step of the 32 is a near-tie: smallest top-1/top-2 gap 0.07)
    "english": "Photosynthesis is the process by which plants",
    "chat_capital": [{"role": "user", "content": "What is the capital of France?"}],
    "code": (
        "def greet(name):\n"
        "    \"\"\"Say hello to someone.\"\"\"\n"
        "    message = f\"Hello, {name}!\"\n"
        "    print(message)\n"
        "    return message\n"
        "\n"
        "def main():\n"
    ),
    "chat_system": [
        {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
}
GENERATE = ("english", "chat_capital", "code")
GEN_NEW = 32
N_SUBSET = 256
TOP_K = 5

TOKENIZER_TEXTS = [
    "Héllo wörld, ça va? Ñandú, naïve café, résumé, Ærøskøbing.",
    "日本語のテキストと中文字符，한국어도 조금.",
    "Emoji: 🙂👍🏽🚀 and ❤️ and 👨‍👩‍👧",
    "def f(x):\n    if x:\n        return x * x\n\tpass\n",
    "  two leading spaces,   runs   of    spaces\n\n\nthree newlines\t\ttabs \t \n end ",
    "<|im_start|>user",
    "<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\n",
    "Don't you'll we've I'm they'd it's JOHN'S",
    "HTML <div class=\"x\">&amp;</div> ~!@#$%^&*()_+{}|:\"<>?",
    "mixed CASE Words AND sHoUtInG",
    "\u00a0non\u2011breaking\u2009thin space and ﬁ ligature",
    " ",
    "\n",
    "a",
]
DIGIT_TEXTS = [
    "1234567890",
    "In 2024, 3.14159 is about pi and 1,000,000 users came.",
    "x = 42\nfor i in range(100):\n    y = i ** 2",
    "phone: +1 (555) 010-9999, version v1.2.3",
    "Arabic ١٢٣, Devanagari ४५६, Roman Ⅻ, fraction ½, superscript ²",
]


def real(args) -> None:
    import transformers
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    gguf_path = Path(args.gguf).resolve()
    folder, name = gguf_path.parent, gguf_path.name
    sha = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    print(f"loading {gguf_path} (sha256 {sha[:16]}...)")
    model = load_model(folder, gguf_file=name)
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    vocab = model.config.vocab_size
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    print(f"  vocab {vocab}, tie_word_embeddings {model.config.tie_word_embeddings}, lm_head shares "
          f"the embedding's storage: {tied}")

    # --- transformers dequantizes with its own torch code; check it against the gguf package's
    # numpy dequantization (and un-permutes attn_q/attn_k: permuting back must give the file's rows).
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    stored = {t.name: t for t in reader.tensors}
    n_head, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    for gguf_name, w, heads in [
        ("token_embd.weight", model.model.embed_tokens.weight, None),
        ("blk.0.attn_q.weight", model.model.layers[0].self_attn.q_proj.weight, n_head),
        ("blk.0.attn_k.weight", model.model.layers[0].self_attn.k_proj.weight, n_kv),
        ("blk.29.ffn_down.weight", model.model.layers[29].mlp.down_proj.weight, None),
    ]:
        t = stored[gguf_name]
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        mine = w.detach().numpy()
        if heads is not None:
            mine = synthetic.permute_for_interleaved_rope(mine, heads)
        err = float(np.abs(mine - ref).max())
        print(f"  {gguf_name} ({t.tensor_type.name}): |transformers - gguf.quants.dequantize| max {err:.1e}")
        assert err == 0.0, "transformers and the gguf package disagree on dequantization"

    # --- which pre-tokenizer did transformers build? llama.cpp's "smollm" splits every digit off
    # first (\p{N}), then applies the GPT-2 regex; SmolLM2's own tokenizer.json does the same with
    # Digits(individual_digits=True) + ByteLevel. Build that one too, from the same vocab/merges.
    pre_gguf = str(tok.backend_tokenizer.pre_tokenizer)
    smollm_tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    smollm_tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    pieces = [piece for piece, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("in 2024")]
    splits_digits = "2" in pieces and "4" in pieces  # GPT-2's regex alone gives ["in", "Ġ2024"]
    print(f"  transformers' GGUF pre-tokenizer: {pre_gguf}; splits digits like llama.cpp's smollm: {splits_digits}")

    def encode(t, text):
        return t(text, add_special_tokens=False).input_ids

    # --- prompts: ids, logits
    texts, ids_of = {}, {}
    for key, prompt in PROMPTS.items():
        text = prompt if isinstance(prompt, str) else tok.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True)
        ids = encode(tok, text)
        assert ids == encode(smollm_tok, text), f"prompt {key} must tokenize the same with and without digit splitting"
        texts[key], ids_of[key] = text, ids
    logits_of_prompt = {key: logits_of(model, ids) for key, ids in ids_of.items()}

    # A fixed subset of vocab ids, for logits at every position: every id that is top-5 anywhere
    # (so the interesting, large logits are in it) plus random others, N_SUBSET in all.
    top_anywhere = set()
    for lg in logits_of_prompt.values():
        top_anywhere.update(np.argsort(lg, axis=1)[:, ::-1][:, :TOP_K].ravel().tolist())
    rng = np.random.default_rng(0)
    subset = sorted(top_anywhere)[:N_SUBSET]
    rest = np.setdiff1d(np.arange(vocab), subset)
    subset = np.sort(np.concatenate([subset, rng.choice(rest, N_SUBSET - len(subset), replace=False)]))
    subset = subset.astype(np.int64)

    arrays = {"subset_ids": subset}
    for key, lg in logits_of_prompt.items():
        order = np.argsort(lg, axis=1)[:, ::-1][:, :TOP_K]
        arrays[f"{key}/ids"] = np.array(ids_of[key], dtype=np.int64)
        arrays[f"{key}/logits_last"] = lg[-1].astype(np.float32)
        arrays[f"{key}/logits_subset"] = lg[:, subset].astype(np.float32)
        arrays[f"{key}/top5_ids"] = order.astype(np.int64)
        arrays[f"{key}/top5_logits"] = np.take_along_axis(lg, order, axis=1).astype(np.float32)
        print(f"  {key}: {len(ids_of[key])} tokens, next token {tok.decode([int(order[-1, 0])])!r}")

    # --- greedy continuations
    generations = {}
    for key in GENERATE:
        new, margins = greedy(model, ids_of[key], GEN_NEW)
        arrays[f"{key}/gen_ids"] = np.array(new, dtype=np.int64)
        arrays[f"{key}/gen_margin"] = margins
        eos = model.config.eos_token_id
        stop = new.index(eos) + 1 if eos in new else len(new)
        generations[key] = {
            "new_ids": new,
            "first_eos_index": new.index(eos) if eos in new else None,
            "text_until_eos": tok.decode(new[:stop], skip_special_tokens=False),
            "min_margin": float(margins.min()),
        }
        print(f"  greedy {key}: {generations[key]['text_until_eos']!r} (min margin {margins.min():.3f})")

    # --- tokenizer cases
    tokenizer_cases = []
    for text in TOKENIZER_TEXTS:
        ids = encode(tok, text)
        assert ids == encode(smollm_tok, text), f"no digits, yet the two pre-tokenizers differ on {text!r}"
        assert tok.decode(ids, skip_special_tokens=False) == text, f"decode does not round-trip {text!r}"
        tokenizer_cases.append({"text": text, "ids": ids})
    digit_cases = []
    for text in DIGIT_TEXTS:
        a, b = encode(smollm_tok, text), encode(tok, text)
        digit_cases.append({"text": text, "ids": a, "ids_transformers_gguf": b, "differ": a != b})

    meta = {
        "what": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32) run by HF transformers",
        "gguf": name,
        "gguf_sha256": sha,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": "float32",
        "attn_implementation": "eager",
        "lm_head": "tied to token_embd (Q8_0), dequantized by transformers" if tied else "separate",
        "prompts": texts,
        "prompt_ids": ids_of,
        "generate": {"max_new_tokens": GEN_NEW, "eos": "ignored (tests may cut at first_eos_index)",
                     "results": generations},
        "tokenizer": {
            "add_special_tokens": False,
            "cases": tokenizer_cases,
            "digit_cases_note": (
                "llama.cpp's 'smollm' pre-tokenizer (and SmolLM2's tokenizer.json) split every digit "
                "off before the GPT-2 regex. 'ids' are from transformers' GGUF tokenizer with its "
                "pre-tokenizer set to Digits(individual_digits=True) + ByteLevel, i.e. the model's real "
                "tokenization. 'ids_transformers_gguf' are from transformers' GGUF tokenizer as "
                f"loaded (pre-tokenizer {pre_gguf}), which does NOT split digits: not a reference."
            ),
            "transformers_gguf_pre_tokenizer": pre_gguf,
            "transformers_gguf_splits_digits": splits_digits,
            "digit_cases": digit_cases,
        },
        "npz_keys": {
            "subset_ids": f"int64 [{N_SUBSET}] vocab ids of the logits_subset columns",
            "<prompt>/ids": "int64 [T] input ids",
            "<prompt>/logits_last": "float32 [vocab] logits at the last position",
            "<prompt>/logits_subset": f"float32 [T, {N_SUBSET}] logits at every position for subset_ids",
            "<prompt>/top5_ids": "int64 [T, 5] the 5 largest logits' ids at every position, best first",
            "<prompt>/top5_logits": "float32 [T, 5] their logits",
            "<prompt>/gen_ids": f"int64 [{GEN_NEW}] greedy continuation (only for {list(GENERATE)})",
            "<prompt>/gen_margin": "float32 top-1 minus top-2 logit at each greedy step",
        },
    }
    arrays["meta_json"] = np.array(json.dumps(meta, ensure_ascii=False))
    save(GOLDEN / "smollm2_135m.npz", arrays)
    out = GOLDEN / "smollm2_135m.json"
    out.write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out.relative_to(REPO)} ({out.stat().st_size:,} bytes)")


def save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    total = sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())
    print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size:,} bytes; golden folder {total:,} bytes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("tiny", help="golden logits of tiny random checkpoints")
    sub.add_parser("tiny-hf5", help="a tiny checkpoint saved by transformers 5 (rope_parameters)")
    p = sub.add_parser("real", help="golden logits/ids of the real SmolLM2-135M-Instruct GGUF")
    p.add_argument("--gguf", required=True, help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    args = parser.parse_args()
    {"tiny": tiny, "tiny-hf5": tiny_hf5, "real": real}[args.command](args)


if __name__ == "__main__":
    main()
