"""From a path to (config, weights, tokenizer): GGUF files and Hugging Face folders.

GGUF files keep llama.cpp's layout (Q/K rows already in interleaved-pair RoPE order); HF folders
are converted once at load: Q/K rows permuted (rope.hf_to_interleaved).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import ModelFormatError, ModelNotFoundError
from ..model import LayerWeights, Weights
from ..stages.rope import hf_to_interleaved
from ..tokenizer import Tokenizer
from .gguf import read_gguf
from .safetensors import read_hf_folder


def load(path: str | os.PathLike) -> tuple[ModelConfig, Weights, Tokenizer]:
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"no model at {path}; pass a .gguf file or a Hugging Face folder "
                                 f"(or leave --model out for the default model)")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if (path / "config.json").exists():
            return load_hf(path)
        if len(ggufs) == 1:
            return load_gguf(ggufs[0])
        raise ModelNotFoundError(f"{path} holds neither config.json nor exactly one .gguf file")
    return load_gguf(path)


def _check(name: str, arr, shape: tuple) -> np.ndarray:
    if tuple(arr.shape) != tuple(shape):
        raise ModelFormatError(f"tensor {name!r} has shape {tuple(arr.shape)}, expected {shape}")
    return arr


def load_gguf(path: Path) -> tuple[ModelConfig, Weights, Tokenizer]:
    meta, tensors = read_gguf(path)
    tokens = meta.get("tokenizer.ggml.tokens")
    config = ModelConfig.from_gguf(meta, n_vocab=len(tokens) if tokens else None)
    config.tie_embeddings = "output.weight" not in tensors
    c = config

    def f32(name, shape):
        if name not in tensors:
            raise ModelFormatError(f"{path.name} lacks tensor {name!r}; the file is incomplete")
        return _check(name, tensors[name].to_float32(), shape)

    D, qd, kvd = c.dim, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    layers = []
    for i in range(c.n_layers):
        p = f"blk.{i}."
        layers.append(LayerWeights(
            attn_norm=f32(p + "attn_norm.weight", (D,)),
            wq=f32(p + "attn_q.weight", (qd, D)),
            wk=f32(p + "attn_k.weight", (kvd, D)),
            wv=f32(p + "attn_v.weight", (kvd, D)),
            wo=f32(p + "attn_output.weight", (D, qd)),
            ffn_norm=f32(p + "ffn_norm.weight", (D,)),
            w_gate=f32(p + "ffn_gate.weight", (c.ffn_dim, D)),
            w_up=f32(p + "ffn_up.weight", (c.ffn_dim, D)),
            w_down=f32(p + "ffn_down.weight", (D, c.ffn_dim)),
        ))
    tok_embd = f32("token_embd.weight", (c.vocab_size, D))
    lm_head = tok_embd if c.tie_embeddings else f32("output.weight", (c.vocab_size, D))
    weights = Weights(tok_embd, layers, f32("output_norm.weight", (D,)), lm_head, raw=tensors)
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    return config, weights, tokenizer


def load_hf(folder: Path) -> tuple[ModelConfig, Weights, Tokenizer]:
    cfg, t = read_hf_folder(folder)
    c = ModelConfig.from_hf(cfg)

    def f32(name, shape):
        if name not in t:
            raise ModelFormatError(f"{folder.name}: the checkpoint lacks tensor {name!r}")
        return np.ascontiguousarray(_check(name, t[name], shape), dtype=np.float32)

    D, qd, kvd = c.dim, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    layers = []
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        layers.append(LayerWeights(
            attn_norm=f32(p + "input_layernorm.weight", (D,)),
            wq=hf_to_interleaved(f32(p + "self_attn.q_proj.weight", (qd, D)), c.n_heads),
            wk=hf_to_interleaved(f32(p + "self_attn.k_proj.weight", (kvd, D)), c.n_kv_heads),
            wv=f32(p + "self_attn.v_proj.weight", (kvd, D)),
            wo=f32(p + "self_attn.o_proj.weight", (D, qd)),
            ffn_norm=f32(p + "post_attention_layernorm.weight", (D,)),
            w_gate=f32(p + "mlp.gate_proj.weight", (c.ffn_dim, D)),
            w_up=f32(p + "mlp.up_proj.weight", (c.ffn_dim, D)),
            w_down=f32(p + "mlp.down_proj.weight", (D, c.ffn_dim)),
        ))
    tok_embd = f32("model.embed_tokens.weight", (c.vocab_size, D))
    if "lm_head.weight" in t and not c.tie_embeddings:
        lm_head = f32("lm_head.weight", (c.vocab_size, D))
    else:
        c.tie_embeddings, lm_head = True, tok_embd
    weights = Weights(tok_embd, layers, f32("model.norm.weight", (D,)), lm_head)
    return c, weights, Tokenizer.from_hf_folder(folder, c)
