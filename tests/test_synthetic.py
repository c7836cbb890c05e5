"""minfer.weights.synthetic: the tiny random checkpoints every other test builds on."""
import json

import gguf
import jinja2
import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from minfer.weights import synthetic


def field(reader, key):
    return reader.fields[key].contents()


# --------------------------------------------------------------------------------------------------
# config and weights
# --------------------------------------------------------------------------------------------------

def test_default_config_is_tiny_gqa_and_quantizable():
    c = synthetic.hf_config()
    assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
    assert c["num_attention_heads"] > c["num_key_value_heads"]  # GQA
    assert c["head_dim"] * c["num_attention_heads"] == c["hidden_size"]
    assert c["hidden_size"] % 32 == 0 and c["intermediate_size"] % 32 == 0  # GGUF quant blocks
    assert c["vocab_size"] == synthetic.TINY_VOCAB_SIZE == len(synthetic.tiny_vocab())
    assert c["tie_word_embeddings"] is False


def test_config_overrides_and_errors():
    c = synthetic.hf_config(hidden_size=96, num_attention_heads=6, num_key_value_heads=6)
    assert c["head_dim"] == 16  # follows the width unless given
    with pytest.raises(ValueError):
        synthetic.hf_config(hiden_size=3)  # typo: unknown key
    with pytest.raises(ValueError):
        synthetic.hf_config(vocab_size=10)  # smaller than the tokenizer


def test_smollm2_shape_has_the_real_parameter_count():
    c = synthetic.hf_config(**synthetic.SMOLLM2_135M)
    shapes = synthetic.weight_shapes(c)
    assert "lm_head.weight" not in shapes  # tied
    # the real GGUF holds 134,515,008 parameters (see shared/reference/smollm2-gguf.md)
    assert sum(int(np.prod(s)) for s in shapes.values()) == 134_515_008
    assert len(synthetic.tiny_vocab(c["vocab_size"])) == 49152


def test_random_state_names_shapes_and_determinism():
    c = synthetic.hf_config()
    a, b = synthetic.random_state(c, seed=0), synthetic.random_state(c, seed=0)
    assert list(a) == list(synthetic.weight_shapes(c))
    assert "lm_head.weight" in a
    for name, w in a.items():
        assert w.dtype == np.float32 and w.flags.c_contiguous
        assert w.shape == synthetic.weight_shapes(c)[name]
        np.testing.assert_array_equal(w, b[name])
    assert a["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    assert a["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)  # 2 KV heads x 16
    assert a["model.layers.1.mlp.down_proj.weight"].shape == (64, 96)  # [out, in]
    norm = a["model.layers.1.input_layernorm.weight"]
    assert 0.5 < norm.mean() < 1.5 and norm.std() > 0.03  # near 1, but every weight different
    other = synthetic.random_state(c, seed=1)
    assert not np.array_equal(a["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
    tied = synthetic.random_state(synthetic.hf_config(tie_word_embeddings=True))
    assert "lm_head.weight" not in tied


# --------------------------------------------------------------------------------------------------
# tokenizer and chat template
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_str(synthetic.tiny_tokenizer_json())


TEXTS = [
    "Hello the cat sat on the mat.",
    "héllo wörld 日本 🙂👍🏽",
    "def f(x):\n        return x\n\n\n\tpass  ",
    "<|im_start|>user\nhi<|im_end|>\n",
    "price 100 and 2000",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_ids_specials_merges_and_digits(tok):
    vocab = synthetic.tiny_vocab()
    assert vocab[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert vocab[3 + ord("A")] == "A" and vocab[3 + ord(" ")] == "Ġ" and vocab[3 + ord("\n")] == "Ċ"
    assert len(set(vocab)) == len(vocab)
    # specials are single tokens; merges really run
    assert tok.encode("<|im_start|>user\n").tokens == ["<|im_start|>", "user", "Ċ"]
    assert tok.encode("Hello the cat").tokens == ["H", "e", "llo", "Ġthe", "Ġcat"]
    assert tok.encode("        x").tokens == ["ĠĠĠĠ", "ĠĠ", "Ġ", "Ġ", "x"]
    # digits are split one by one (SmolLM2's pre-tokenizer), so the "0 0" merge never applies
    assert tok.encode("100").tokens == ["1", "0", "0"]
    assert tok.encode("00a").tokens == ["0", "0", "a"]


def test_padded_vocab_for_the_real_shape():
    vocab = synthetic.tiny_vocab(1000)
    assert len(vocab) == 1000 and vocab[-1] == "<unused_681>"
    types = synthetic.tiny_token_types(1000)
    assert types[:3] == [3, 3, 3] and types[3] == 1 and types[-1] == 5
    big = Tokenizer.from_str(synthetic.tiny_tokenizer_json(1000))
    assert big.get_vocab_size() == 1000
    assert big.encode("the cat").ids == Tokenizer.from_str(synthetic.tiny_tokenizer_json()).encode("the cat").ids


def test_chat_template_renders_chatml():
    env = jinja2.Environment()
    text = env.from_string(synthetic.CHAT_TEMPLATE).render(
        messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


# --------------------------------------------------------------------------------------------------
# HF folder
# --------------------------------------------------------------------------------------------------

def test_hf_folder(tmp_path):
    folder = synthetic.tiny_checkpoint(tmp_path / "m", fmt="hf", seed=3)
    assert folder == tmp_path / "m"
    config = json.loads((folder / "config.json").read_text())
    assert config == synthetic.hf_config()
    state = synthetic.random_state(config, seed=3)
    loaded = load_file(str(folder / "model.safetensors"))
    assert set(loaded) == set(state)
    for name in state:
        assert loaded[name].dtype == np.float32
        np.testing.assert_array_equal(loaded[name], state[name])
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == synthetic.CHAT_TEMPLATE
    assert tc["bos_token"] == "<|im_start|>" and tc["eos_token"] == "<|im_end|>"
    gc = json.loads((folder / "generation_config.json").read_text())
    assert gc["eos_token_id"] == 2
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.get_vocab_size() == config["vocab_size"]


def test_hf_folder_f16(tmp_path):
    folder = synthetic.tiny_checkpoint(tmp_path, fmt="hf", dtype="F16")
    loaded = load_file(str(folder / "model.safetensors"))
    assert all(w.dtype == np.float16 for w in loaded.values())
    with pytest.raises(ValueError):
        synthetic.tiny_checkpoint(tmp_path, fmt="hf", dtype="Q8_0")


# --------------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------------

def test_gguf_metadata(tmp_path):
    path = synthetic.tiny_checkpoint(tmp_path, fmt="gguf")
    assert path.name == "tiny-llama-F32.gguf" and path.is_file()
    r = gguf.GGUFReader(str(path))
    c = synthetic.hf_config()
    assert field(r, "general.architecture") == "llama"
    expect = {
        "llama.block_count": 2, "llama.context_length": 256, "llama.embedding_length": 64,
        "llama.feed_forward_length": 96, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
        "llama.vocab_size": c["vocab_size"], "general.file_type": 0,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": synthetic.CHAT_TEMPLATE,
    }
    for key, value in expect.items():
        assert field(r, key) == value, key
    assert field(r, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert field(r, "tokenizer.ggml.tokens") == synthetic.tiny_vocab()
    assert field(r, "tokenizer.ggml.merges") == synthetic.tiny_merges()
    assert field(r, "tokenizer.ggml.token_type") == synthetic.tiny_token_types()


def test_gguf_f32_tensors_names_shapes_and_permutation(tmp_path):
    c = synthetic.hf_config()
    state = synthetic.random_state(c, seed=0)
    r = gguf.GGUFReader(str(synthetic.write_gguf(tmp_path / "m.gguf", c, state)))
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == len(state)
    assert set(tensors) >= {"token_embd.weight", "output_norm.weight", "output.weight",
                            "blk.1.attn_q.weight", "blk.1.ffn_down.weight", "blk.0.ffn_norm.weight"}
    for hf_name, w in state.items():
        t = tensors[synthetic.gguf_tensor_name(hf_name)]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == list(w.shape[::-1])  # ggml order: ne0 = in features first
        data = np.asarray(t.data).reshape(w.shape)
        if "q_proj" in hf_name:
            np.testing.assert_array_equal(data, synthetic.permute_for_interleaved_rope(w, 4))
        elif "k_proj" in hf_name:
            np.testing.assert_array_equal(data, synthetic.permute_for_interleaved_rope(w, 2))
        else:
            np.testing.assert_array_equal(data, w)


def test_tied_gguf_has_no_output_tensor(tmp_path):
    r = gguf.GGUFReader(str(synthetic.tiny_checkpoint(tmp_path, fmt="gguf", tie_word_embeddings=True)))
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names


@pytest.mark.parametrize("dtype,tol", [("F16", 1e-3), ("Q8_0", 0.01), ("Q4_0", 0.1), ("Q4_1", 0.1)])
def test_gguf_quantized(tmp_path, dtype, tol):
    c = synthetic.hf_config()
    state = synthetic.random_state(c)
    path = synthetic.tiny_checkpoint(tmp_path, fmt="gguf", dtype=dtype)
    r = gguf.GGUFReader(str(path))
    assert field(r, "general.file_type") == synthetic.GGUF_FILE_TYPES[dtype]
    tensors = {t.name: t for t in r.tensors}
    for hf_name, w in state.items():
        t = tensors[synthetic.gguf_tensor_name(hf_name)]
        if w.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32  # norms stay F32
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType[dtype]
        assert list(t.shape) == list(w.shape[::-1])
        back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        if "q_proj" in hf_name or "k_proj" in hf_name:
            heads = 4 if "q_proj" in hf_name else 2
            w = synthetic.permute_for_interleaved_rope(w, heads)
        assert np.abs(back - w).max() <= tol * np.abs(w).max()


def test_gguf_embedding_dtype_like_the_real_model(tmp_path):
    c = synthetic.hf_config(tie_word_embeddings=True)
    path = synthetic.write_gguf(tmp_path / "m.gguf", c, synthetic.random_state(c), dtype="Q4_1",
                                embedding_dtype="Q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q4_1"
    assert types["blk.0.attn_norm.weight"] == "F32"


def test_bad_dtype_is_refused(tmp_path):
    with pytest.raises(ValueError):
        synthetic.tiny_checkpoint(tmp_path, fmt="gguf", dtype="Q5_K")
    with pytest.raises(ValueError):
        synthetic.tiny_checkpoint(tmp_path, fmt="onnx")


# --------------------------------------------------------------------------------------------------
# Why the Q/K permutation: interleaved-pair RoPE on the permuted weights == HF's rotate-half RoPE
# on the original ones.
# --------------------------------------------------------------------------------------------------

def rope_rotate_half(x, pos, theta):  # x [heads, hd]; HF: pairs (j, j + hd/2)
    hd = x.shape[-1]
    freqs = theta ** (-np.arange(0, hd, 2) / hd) * pos  # [hd/2]
    cos, sin = np.cos(np.concatenate([freqs, freqs])), np.sin(np.concatenate([freqs, freqs]))
    rotated = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], axis=-1)
    return x * cos + rotated * sin


def rope_interleaved(x, pos, theta):  # x [heads, hd]; llama.cpp: pairs (2j, 2j + 1)
    hd = x.shape[-1]
    freqs = theta ** (-np.arange(0, hd, 2) / hd) * pos
    cos, sin = np.cos(freqs), np.sin(freqs)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


@pytest.mark.parametrize("n_heads,head_dim", [(4, 16), (3, 64), (2, 8)])
def test_permutation_turns_interleaved_rope_into_rotate_half(n_heads, head_dim):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n_heads * head_dim, 32))
    x = rng.standard_normal(32)
    pos, theta = 7, 10000.0
    hf = rope_rotate_half((w @ x).reshape(n_heads, head_dim), pos, theta)
    wp = synthetic.permute_for_interleaved_rope(w, n_heads)
    cpp = rope_interleaved((wp @ x).reshape(n_heads, head_dim), pos, theta)
    # same per-head values, the permuted order: undo it on the output rows to compare
    np.testing.assert_allclose(
        synthetic.permute_for_interleaved_rope(hf.reshape(-1, 1), n_heads).reshape(n_heads, head_dim),
        cpp, rtol=1e-12, atol=1e-12)
    # and attention scores (q . k), which is all RoPE feeds, agree without undoing anything
    k_w = rng.standard_normal((n_heads * head_dim, 32))
    k_hf = rope_rotate_half((k_w @ x).reshape(n_heads, head_dim), 3, theta)
    k_cpp = rope_interleaved((synthetic.permute_for_interleaved_rope(k_w, n_heads) @ x)
                             .reshape(n_heads, head_dim), 3, theta)
    np.testing.assert_allclose((hf * k_hf).sum(-1), (cpp * k_cpp).sum(-1), rtol=1e-10)
