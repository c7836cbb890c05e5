"""Tiny random Llama checkpoints, for tests and lessons.

A real model is 100 MB and takes a download; a test wants something that is built in a blink, is
exactly reproducible, and still exercises every part of the engine. This module makes such models:

* ``hf_config(**overrides)`` -- a Hugging Face ``config.json`` dict for a ``LlamaForCausalLM``.
  The default shape is tiny (hidden 64, 4 heads, 2 KV heads, 2 layers); ``SMOLLM2_135M`` holds the
  overrides that give the real SmolLM2-135M shape (for benchmarks with random weights).
* ``random_state(config, seed)`` -- random float32 weights under the HF tensor names, PyTorch
  ``[out, in]`` layout.
* a tiny byte-level BPE tokenizer (3 special tokens, the 256 byte symbols, a few dozen merges),
  as a ``tokenizers`` ``tokenizer.json`` string and as the vocab/merges lists a GGUF stores.
* ``write_hf_folder(...)`` and ``write_gguf(...)`` -- the same model in the two file formats that
  minfer reads; ``tiny_checkpoint(...)`` does it all in one call.

Only minfer's own runtime dependencies are used (numpy, safetensors, gguf, tokenizers): no torch.

The GGUF writer does what llama.cpp's ``convert_hf_to_gguf.py`` does for the ``llama``
architecture, including the one surprising step: the rows of ``attn_q`` / ``attn_k`` are permuted
so that llama.cpp's interleaved-pair RoPE on the stored weights equals HF's "rotate half" RoPE on
the original ones (see ``permute_for_interleaved_rope``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------------------------------
# The chat template: ChatML, exactly as SmolLM2-135M-Instruct ships it.
# --------------------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# --------------------------------------------------------------------------------------------------
# The tiny byte-level BPE tokenizer.
#
# Ids: 0..2 are the special tokens, 3..258 the 256 byte symbols (id = 3 + byte value), then one id
# per merge, in merge order. Byte-level BPE writes every byte as one printable character (GPT-2's
# trick, so a token is always a printable string): a space becomes "Ġ", a newline "Ċ", a tab "ĉ".
# --------------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 2  # as in SmolLM2-135M-Instruct

# Each merge joins two existing tokens (a byte symbol or an earlier merge's result) into a new one.
# Chosen so that ordinary English text, the chat template's words and indented code all merge.
MERGES = [
    "Ġ t", "h e", "i n", "e r", "a n", "o n", "r e", "Ġ a", "Ġt he", "in g",
    "Ġ s", "Ġ w", "o u", "e n", "Ġ o", "Ġ c", "a t", "Ġ i", "e s", "o r",
    "Ġ b", "Ġ f", "i s", "Ġa n", "Ġan d", "Ġ p", "Ġ m", "l l", "Ġ h", "e d",
    "Ġi s", "Ġo f", "Ġt o", "Ġi n", "Ġw h", "l e", "Ġc at", "Ġs at", "u s", "us er",
    "s t", "a s", "as s", "i st", "an t", "ist ant", "ass istant", "s y", "e m", "st em",
    "sy stem", "ll o", "he llo", "Ġ on", "Ġm at", "Ġ Ġ", "ĠĠ ĠĠ", "Ċ Ċ", "0 0",
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table.

    The 188 bytes that are already printable (and not a space) stand for themselves; the other 68
    (control bytes, space, DEL, NBSP, soft hyphen...) are moved up to U+0100, U+0101, ... in order.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def tiny_vocab(vocab_size: int | None = None) -> list[str]:
    """The tokens in id order. With ``vocab_size`` larger than the tiny vocabulary, the list is
    padded with placeholder tokens ``<unused_N>`` that BPE can never produce."""
    byte_symbols = [bytes_to_unicode()[b] for b in range(256)]
    tokens = SPECIAL_TOKENS + byte_symbols
    known = set(tokens)
    for merge in MERGES:
        left, right = merge.split(" ")
        assert left in known and right in known, f"merge {merge!r} uses a token not yet in the vocab"
        tokens.append(left + right)
        known.add(left + right)
    if vocab_size is not None:
        if vocab_size < len(tokens):
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tiny tokenizer's {len(tokens)}")
        tokens += [f"<unused_{n}>" for n in range(vocab_size - len(tokens))]
    return tokens


TINY_VOCAB_SIZE = len(tiny_vocab())  # 3 specials + 256 bytes + len(MERGES)


def tiny_merges() -> list[str]:
    """The merges as GGUF stores them: "left right", best (earliest) first."""
    return list(MERGES)


def tiny_token_types(vocab_size: int | None = None) -> list[int]:
    """GGUF token types (gguf.TokenType): 3 CONTROL for specials, 1 NORMAL, 5 UNUSED for padding."""
    types = []
    for token in tiny_vocab(vocab_size):
        if token in SPECIAL_TOKENS:
            types.append(3)
        elif token.startswith("<unused_"):
            types.append(5)
        else:
            types.append(1)
    return types


def tiny_tokenizer_json(vocab_size: int | None = None) -> str:
    """A ``tokenizers`` tokenizer.json for the tiny tokenizer.

    The pre-tokenizer is SmolLM2's: first every digit on its own (``Digits(individual_digits)``),
    then GPT-2's byte-level split (no prefix space). The merge "0 0" makes the digit rule visible:
    "100" is "1","0","0" here, where the byte-level split alone would give "1","00".
    """
    tokens = tiny_vocab(vocab_size)
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True,
            }
            for i, tok in enumerate(SPECIAL_TOKENS)
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": tiny_merges(),
        },
    }
    return json.dumps(tokenizer, ensure_ascii=False, indent=1)


# --------------------------------------------------------------------------------------------------
# The model: config and random weights.
# --------------------------------------------------------------------------------------------------

def hf_config(**overrides) -> dict:
    """A complete HF ``config.json`` dict for a tiny ``LlamaForCausalLM``; keyword args override."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 96,  # multiple of 32 (GGUF quant blocks), not a power of two
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # grouped-query attention: 2 query heads share each KV head
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "max_position_embeddings": 256,
        "vocab_size": TINY_VOCAB_SIZE,
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    config.update(overrides)
    if "head_dim" not in overrides:  # keep head_dim consistent when only the width changes
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    if config["vocab_size"] < TINY_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least the tiny tokenizer's {TINY_VOCAB_SIZE}")
    if config["num_attention_heads"] % config["num_key_value_heads"]:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    return config


# The real SmolLM2-135M shape, for `bench --random-weights`: hf_config(**SMOLLM2_135M).
SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    vocab_size=49152,
    tie_word_embeddings=True,
)


def weight_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> PyTorch shape ([out, in] for matrices), in file order."""
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config["head_dim"]
    q_rows = config["num_attention_heads"] * hd
    kv_rows = config["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (q_rows, d)
        shapes[p + "self_attn.k_proj.weight"] = (kv_rows, d)
        shapes[p + "self_attn.v_proj.weight"] = (kv_rows, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, q_rows)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (f, d)
        shapes[p + "mlp.up_proj.weight"] = (f, d)
        shapes[p + "mlp.down_proj.weight"] = (d, f)
    shapes["model.norm.weight"] = (d,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def random_state(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under HF names, from ``np.random.default_rng(seed)``.

    Matrices are normal with std 0.8 / sqrt(in_features) (0.1 for the tiny width 64): each output
    of a matmul then has a spread near 1, so attention is neither uniform nor one-hot and the
    logits are far from flat. Norm weights are 1 + 0.1 * normal, all different, so a norm weight
    that is skipped, transposed or read from the wrong layer changes the logits visibly.
    """
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in weight_shapes(config).items():
        if len(shape) == 1:  # an RMSNorm weight
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        else:  # a matrix, [out, in]; the embedding counts as [vocab, hidden]
            w = rng.standard_normal(shape) * (0.8 / np.sqrt(shape[1]))
        state[name] = np.ascontiguousarray(w, dtype=np.float32)
    return state


# --------------------------------------------------------------------------------------------------
# Writing a Hugging Face folder.
# --------------------------------------------------------------------------------------------------

def write_hf_folder(path, config: dict, state: dict[str, np.ndarray]) -> Path:
    """Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
    generation_config.json into folder ``path`` (created if needed); return the folder."""
    from safetensors.numpy import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "tokenizer.json").write_text(tiny_tokenizer_json(config["vocab_size"]), encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # i.e. "use tokenizer.json as it is"
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[PAD_ID],
        "unk_token": SPECIAL_TOKENS[UNK_ID],
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, tok in enumerate(SPECIAL_TOKENS)
        },
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    generation_config = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
    }
    (folder / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    return folder


# --------------------------------------------------------------------------------------------------
# Writing a GGUF file, as llama.cpp's convert_hf_to_gguf.py would.
# --------------------------------------------------------------------------------------------------

GGUF_DTYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")
# general.file_type values (gguf.LlamaFileType) for a file whose matmul weights are of that type.
GGUF_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}


def permute_for_interleaved_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of a Q or K projection ([n_heads * head_dim, in]) inside each head.

    HF's RoPE ("rotate half") pairs dimension j with j + head_dim/2; llama.cpp's RoPE for the llama
    architecture pairs neighbours 2j and 2j+1. Within each head this moves row j of the first half
    to row 2j and row j of the second half to row 2j+1, so both RoPEs compute the same thing.
    """
    rows, cols = w.shape
    half = rows // n_heads // 2
    return (w.reshape(n_heads, 2, half, cols)  # [head, which half, j, in]
             .swapaxes(1, 2)                   # [head, j, which half, in]
             .reshape(rows, cols))             # rows: h0j0 first-half, h0j0 second-half, h0j1 ...


def gguf_tensor_name(hf_name: str) -> str:
    """HF tensor name -> llama.cpp tensor name."""
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    per_layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    _, _, layer, rest = hf_name.split(".", 3)  # "model", "layers", "3", "self_attn.q_proj.weight"
    return f"blk.{layer}.{per_layer[rest.removesuffix('.weight')]}.weight"


def _encode_tensor(w: np.ndarray, dtype: str):
    """(data, raw_dtype) for GGUFWriter.add_tensor: float arrays as they are, quantized types as
    the bytes of ``gguf.quants.quantize`` (each row cut into 32-wide blocks)."""
    import gguf

    if dtype == "F32":
        return w.astype(np.float32), None
    if dtype == "F16":
        return w.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType[dtype]
    if w.shape[-1] % 32:
        raise ValueError(f"{dtype} needs rows whose length is a multiple of 32, got shape {w.shape}")
    return gguf.quants.quantize(w.astype(np.float32), qtype), qtype


def write_gguf(path, config: dict, state: dict[str, np.ndarray], dtype: str = "F32",
               embedding_dtype: str | None = None) -> Path:
    """Write the model as a llama-architecture GGUF file at ``path``; return the path.

    ``dtype`` (F32, F16, Q8_0, Q4_0, Q4_1) is used for the 2-D matmul weights; norms stay F32.
    ``embedding_dtype`` (default: ``dtype``) is used for token_embd (and output), e.g. "Q8_0" with
    dtype "Q4_1" to mimic the real SmolLM2 GGUF.
    """
    import gguf

    embedding_dtype = embedding_dtype or dtype
    for dt in (dtype, embedding_dtype):
        if dt not in GGUF_DTYPES:
            raise ValueError(f"dtype must be one of {GGUF_DTYPES}, got {dt!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["head_dim"]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("minfer tiny random llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    if head_dim != config["hidden_size"] // n_head:  # llama.cpp derives it otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(GGUF_FILE_TYPES[dtype])
    if dtype not in ("F32", "F16") or embedding_dtype not in ("F32", "F16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tiny_vocab(config["vocab_size"]))
    writer.add_token_types(tiny_token_types(config["vocab_size"]))
    writer.add_token_merges(tiny_merges())
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_unk_token_id(UNK_ID)
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    for hf_name, w in state.items():
        if hf_name.endswith("self_attn.q_proj.weight"):
            w = permute_for_interleaved_rope(w, n_head)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            w = permute_for_interleaved_rope(w, n_kv)
        if w.ndim == 1:
            data, raw = w.astype(np.float32), None
        elif hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
            data, raw = _encode_tensor(w, embedding_dtype)
        else:
            data, raw = _encode_tensor(w, dtype)
        writer.add_tensor(gguf_tensor_name(hf_name), data, raw_dtype=raw)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --------------------------------------------------------------------------------------------------
# All in one call.
# --------------------------------------------------------------------------------------------------

def tiny_checkpoint(directory, fmt: str = "hf", seed: int = 0, dtype: str = "F32", **overrides) -> Path:
    """Build a random model (``hf_config(**overrides)``, ``random_state(config, seed)``) in
    ``directory``. fmt "hf": write an HF folder there and return it (dtype F32 or F16 for the
    safetensors). fmt "gguf": write ``tiny-llama-<dtype>.gguf`` there and return the file's path."""
    config = hf_config(**overrides)
    state = random_state(config, seed)
    directory = Path(directory)
    if fmt == "hf":
        if dtype not in ("F32", "F16"):
            raise ValueError(f"an HF folder holds F32 or F16 weights, not {dtype!r}")
        if dtype == "F16":
            state = {k: v.astype(np.float16) for k, v in state.items()}
            config = dict(config, torch_dtype="float16")
        return write_hf_folder(directory, config, state)
    if fmt == "gguf":
        return write_gguf(directory / f"tiny-llama-{dtype}.gguf", config, state, dtype=dtype)
    raise ValueError(f"fmt must be 'hf' or 'gguf', got {fmt!r}")
