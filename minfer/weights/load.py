"""From a path to (config, weights, tokenizer): GGUF files and Hugging Face folders.

GGUF files keep llama.cpp's layout (Q/K rows already in interleaved-pair RoPE order); HF folders
are converted once at load: Q/K rows permuted (rope.hf_to_interleaved).

`quant` says how the matmul weights (and the embedding table) are held in memory:
  "f32"   dequantized to float32 (the reference path)
  "auto"  as the file stores them: Q8_0/Q4_0/Q4_1 blocks stay quantized, F16/F32 become float32
  "q8_0", "q4_0", "q4_1"   re-quantized at load to that block format (kept as is if it already is);
          with a 4-bit format the embedding table / LM head get Q8_0, as in the shipped SmolLM2 file
          (4 bits there cost far more quality than anywhere else: bench --quality shows it)
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from ..config import ModelConfig, readable_name
from ..errors import MinferError, ModelFormatError, ModelNotFoundError, UnsupportedModelError
from ..model import LayerWeights, Weights
from ..stages.quant import BLOCK_DTYPES, QuantMatrix
from ..stages.linear import stack_rows
from ..stages.rope import hf_to_interleaved
from ..tokenizer import Tokenizer
from .gguf import read_gguf
from .safetensors import read_hf_folder


QUANTS = ("auto", "f32", "q8_0", "q4_0", "q4_1")


def _embedding_quant(quant: str) -> str:
    return "q8_0" if quant in ("q4_0", "q4_1") else quant


def _finite(arr, name: str, what: str = "values"):
    """arr unchanged, or ModelFormatError naming the tensor if it holds a NaN or an infinity:
    one bad scale or norm weight otherwise surfaces as NaN logits (or a division by zero in a
    kernel) far from its cause."""
    if arr.size and not np.isfinite(arr).all():
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise ModelFormatError(f"tensor {name!r} has {bad:,} NaN or infinite {what}; "
                               f"the file is corrupt")
    return arr


def _from_blocks(raw, fmt: str, name: str) -> QuantMatrix:
    with np.errstate(invalid="ignore", over="ignore"):   # a bad scale is reported just below
        q = QuantMatrix(raw.data, fmt, raw.shape)
    _finite(q.d, name, "scales")
    if raw.type == "Q4_1":
        _finite(q.m, name, "minimums")
    return q


def _hold(w_f32, quant: str, name: str, raw=None):
    """One matmul weight as `quant` asks: a float32 array or a QuantMatrix.
    raw: the file's tensor (GGUFTensor) when there is one, so its blocks are used as they are."""
    if raw is not None and quant == "auto" and raw.type in BLOCK_DTYPES:
        return _from_blocks(raw, raw.type, name)
    if quant in ("auto", "f32"):
        return w_f32()
    fmt = quant.upper()
    if raw is not None and raw.type == fmt:
        return _from_blocks(raw, fmt, name)
    w = w_f32()
    if w.shape[-1] % 32:
        raise ModelFormatError(f"{name} rows have {w.shape[-1]} weights; {fmt} needs a multiple of 32")
    return QuantMatrix.from_float(w, fmt)


def load(path: str | os.PathLike, quant: str = "f32") -> tuple[ModelConfig, Weights, Tokenizer]:
    if quant not in QUANTS:
        from ..errors import InvalidArgumentError
        raise InvalidArgumentError(f"unknown quant {quant!r}; choose one of: {', '.join(QUANTS)}")
    path = Path(path).expanduser()
    try:
        if not path.exists():
            raise ModelNotFoundError(f"no model at {path}; pass a .gguf file or a Hugging Face "
                                     f"folder (or leave --model out for the default model)")
        if path.is_dir():
            ggufs = sorted(path.glob("*.gguf"))
            if (path / "config.json").exists():
                return load_hf(path, quant)
            if len(ggufs) == 1:
                return load_gguf(ggufs[0], quant)
            raise ModelNotFoundError(f"{path} holds neither config.json nor exactly one .gguf file")
        if path.suffix in (".safetensors", ".json") and (path.parent / "config.json").exists():
            raise ModelNotFoundError(f"{path} is one file of a Hugging Face folder; pass the "
                                     f"folder: {path.parent}")
        return load_gguf(path, quant)
    except (ModelFormatError, UnsupportedModelError) as e:
        msg = str(e)      # say which file, when the message does not already
        if path.name in msg:
            raise
        raise type(e)(f"{path}: {msg}") from None
    except MinferError:
        raise
    except MemoryError:
        raise ModelFormatError(f"{path}: loading needs more memory than there is (a corrupt "
                               f"size in the file, or a model too large for this machine)") from None
    except PermissionError as e:
        raise ModelNotFoundError(f"{path} cannot be read ({e.strerror})") from None
    except IsADirectoryError as e:
        raise ModelNotFoundError(f"{e.filename} is a folder, not a file") from None
    except Exception as e:  # whatever else a malformed model trips is still a malformed model
        raise ModelFormatError(f"{path} could not be loaded ({type(e).__name__}: {e})") from None


STACKED = ("attn_norm", "wqkv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")


def _fuse(layers: list[LayerWeights]) -> dict:
    """Stack each layer's Q, K, V rows into one matrix (wq/wk/wv become views of it). Then hold
    each kind of layer weight for all layers in one array, [L, ...], each layer keeping a view:
    the numba decode step (cpu/model.py, cpu/region.py) takes a whole stack in one argument, and one
    large allocation can sit on huge pages (streaming the weights measured ~5-10% faster).
    -> {kind: (format, array or quants [L, ...], scales or None, mins or None)}."""
    for L in layers:
        L.wqkv, (L.wq, L.wk, L.wv) = stack_rows([L.wq, L.wk, L.wv])
    stacks = {}
    for kind in STACKED:
        ws = [getattr(L, kind) for L in layers]
        if all(isinstance(w, np.ndarray) and w.shape == ws[0].shape for w in ws):
            big = np.stack(ws)                                          # [L, ...]
            stacks[kind] = ("F32", big, None, None)
            for L, w in zip(layers, big):
                setattr(L, kind, w)
        elif all(isinstance(w, QuantMatrix) and (w.fmt, w.shape) == (ws[0].fmt, ws[0].shape)
                 for w in ws):
            qs, d = np.stack([w.qs for w in ws]), np.stack([w.d for w in ws])   # [L, O, ...]
            m = None if ws[0].m is None else np.stack([w.m for w in ws])
            stacks[kind] = (ws[0].fmt, qs, d, m)
            for i, L in enumerate(layers):
                setattr(L, kind, QuantMatrix._from_parts(ws[0].fmt, qs[i], d[i],
                                                         None if m is None else m[i], ws[0].shape[1]))
    _qkv_views(layers)
    return stacks


def _qkv_views(layers: list[LayerWeights]) -> None:
    """wq, wk, wv: views of the layer's (new) wqkv again."""
    for L in layers:
        if L.wqkv is not None:
            edges = np.cumsum([0, L.wq.shape[0], L.wk.shape[0], L.wv.shape[0]])
            view = L.wqkv.rows if isinstance(L.wqkv, QuantMatrix) else (lambda a, b: L.wqkv[a:b])
            L.wq, L.wk, L.wv = (view(edges[i], edges[i + 1]) for i in range(3))


def half_scales(weights: Weights, formats=("Q8_0", "Q4_0", "Q4_1")) -> Weights:
    """The same weights with the quantized matrices' scales (and Q4 mins) in float16, as the file
    stores them: what the int8-part kernels (quant_i8.py) want (QuantMatrix.half_scales). A new
    Weights: new stacks, and layers holding views of them; the quants are shared, and `weights`
    is left as it was. formats: the layer weights of these formats; the embedding / LM head,
    whatever its."""
    stacks, layers = dict(weights.stacks), [dataclasses.replace(L) for L in weights.layers]
    for kind, (fmt, qs, d, m) in weights.stacks.items():
        if fmt not in formats:
            continue
        d, m = d.astype(np.float16), None if m is None else m.astype(np.float16)
        stacks[kind] = (fmt, qs, d, m)
        for i, L in enumerate(layers):
            setattr(L, kind, QuantMatrix._from_parts(fmt, qs[i], d[i], None if m is None else m[i],
                                                     getattr(L, kind).shape[1]))
    _qkv_views(layers)

    def half(w):
        return w.half_scales() if isinstance(w, QuantMatrix) else w
    tok_embd = half(weights.tok_embd)
    lm_head = tok_embd if weights.lm_head is weights.tok_embd else half(weights.lm_head)
    return dataclasses.replace(weights, tok_embd=tok_embd, layers=layers, lm_head=lm_head,
                               stacks=stacks)


def scales_for_kernels(weights: Weights, backend: str, activations: str, kernels) -> Weights:
    """The weights with their quantized scales as the kernels that will run want them: float16
    (the file's own 2 bytes) for the int8-part kernels of quant_i8.py — every matrix with int8
    activations, and with float32 activations where `kernels` (stages.quant_dispatch.KernelConfig)
    split x into three int8 parts — else float32, for the float kernels: `weights` itself, as
    loaded. `weights` is not changed."""
    if backend != "numba" or not weights.has_quantized():
        return weights
    if activations == "int8" or kernels.split_x:
        return half_scales(weights)
    return weights


def _check(name: str, arr, shape: tuple) -> np.ndarray:
    if tuple(arr.shape) != tuple(shape):
        raise ModelFormatError(f"tensor {name!r} has shape {tuple(arr.shape)}, expected {shape}")
    return arr


def _unused(names, used: set, where: str) -> None:
    """A tensor the Llama block does not read (a bias, RoPE frequency factors, a layer beyond
    block_count, ...) means the file describes another function: running without it would give
    wrong numbers silently, so refuse."""
    extra = sorted(set(names) - used)
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise UnsupportedModelError(
            f"{where} holds tensor{'s' if len(extra) > 1 else ''} "
            f"{', '.join(repr(n) for n in extra[:3])}{more} that minfer's Llama block does not "
            f"use (biases, RoPE frequency factors, extra layers are not implemented); refusing "
            f"to run the model without them")


def load_gguf(path: Path, quant: str = "f32") -> tuple[ModelConfig, Weights, Tokenizer]:
    meta, tensors = read_gguf(path)
    used = set()
    tokens = meta.get("tokenizer.ggml.tokens")
    config = ModelConfig.from_gguf(meta, n_vocab=len(tokens) if isinstance(tokens, list) else None)
    config.tie_embeddings = "output.weight" not in tensors
    config.name = readable_name(meta, path)
    c = config

    def f32(name, shape):
        if name not in tensors:
            raise ModelFormatError(f"{path.name} lacks tensor {name!r}; the file is incomplete")
        used.add(name)
        _check(name, tensors[name], shape)
        return _finite(tensors[name].to_float32(), name)

    def mat(name, shape, q=quant):
        if name not in tensors:
            raise ModelFormatError(f"{path.name} lacks tensor {name!r}; the file is incomplete")
        used.add(name)
        _check(name, tensors[name], shape)
        return _hold(lambda: f32(name, shape), q, name, tensors[name])

    D, qd, kvd = c.dim, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    layers = []
    for i in range(c.n_layers):
        p = f"blk.{i}."
        layers.append(LayerWeights(
            attn_norm=f32(p + "attn_norm.weight", (D,)),
            wq=mat(p + "attn_q.weight", (qd, D)),
            wk=mat(p + "attn_k.weight", (kvd, D)),
            wv=mat(p + "attn_v.weight", (kvd, D)),
            wo=mat(p + "attn_output.weight", (D, qd)),
            ffn_norm=f32(p + "ffn_norm.weight", (D,)),
            w_gate=mat(p + "ffn_gate.weight", (c.ffn_dim, D)),
            w_up=mat(p + "ffn_up.weight", (c.ffn_dim, D)),
            w_down=mat(p + "ffn_down.weight", (D, c.ffn_dim)),
        ))
    tok_embd = mat("token_embd.weight", (c.vocab_size, D), _embedding_quant(quant))
    lm_head = tok_embd if c.tie_embeddings else mat("output.weight", (c.vocab_size, D), _embedding_quant(quant))
    out_norm = f32("output_norm.weight", (D,))
    _unused(tensors, used, path.name)
    stacks = _fuse(layers)
    weights = Weights(tok_embd, layers, out_norm, lm_head, raw=tensors, stacks=stacks)
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    return config, weights, tokenizer


def load_hf(folder: Path, quant: str = "f32") -> tuple[ModelConfig, Weights, Tokenizer]:
    cfg, t = read_hf_folder(folder)
    c = ModelConfig.from_hf(cfg)
    if c.name == "model":                    # no _name_or_path: the folder names the model (in a
        hub = folder.parent.name == "snapshots"   # hub cache, models--org--name/snapshots/<hash>)
        c.name = folder.parent.parent.name.split("--")[-1] if hub else folder.resolve().name
    # rotary inverse frequencies that older exports saved are recomputed, not read
    used = {n for n in t if n.endswith("rotary_emb.inv_freq")}

    def f32(name, shape):
        if name not in t:
            raise ModelFormatError(f"{folder.name}: the checkpoint lacks tensor {name!r}")
        used.add(name)
        return _finite(np.ascontiguousarray(_check(name, t[name], shape), dtype=np.float32), name)

    def mat(name, shape, permute_heads=None, q=quant):
        def w():
            a = f32(name, shape)
            return a if permute_heads is None else hf_to_interleaved(a, permute_heads)
        return _hold(w, q, name)

    D, qd, kvd = c.dim, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    layers = []
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        layers.append(LayerWeights(
            attn_norm=f32(p + "input_layernorm.weight", (D,)),
            wq=mat(p + "self_attn.q_proj.weight", (qd, D), permute_heads=c.n_heads),
            wk=mat(p + "self_attn.k_proj.weight", (kvd, D), permute_heads=c.n_kv_heads),
            wv=mat(p + "self_attn.v_proj.weight", (kvd, D)),
            wo=mat(p + "self_attn.o_proj.weight", (D, qd)),
            ffn_norm=f32(p + "post_attention_layernorm.weight", (D,)),
            w_gate=mat(p + "mlp.gate_proj.weight", (c.ffn_dim, D)),
            w_up=mat(p + "mlp.up_proj.weight", (c.ffn_dim, D)),
            w_down=mat(p + "mlp.down_proj.weight", (D, c.ffn_dim)),
        ))
    tokenizer = Tokenizer.from_hf_folder(folder, c)
    rows = c.vocab_size
    if tokenizer.vocab_size < rows:
        # embedding rows past the tokenizer's last id are padding (to a multiple of 64 or 128, for
        # the GPU): no text makes those ids, and the LM head's rows for them must never be sampled
        c = dataclasses.replace(c, vocab_size=tokenizer.vocab_size)
    elif tokenizer.vocab_size > rows:
        raise ModelFormatError(f"{folder.name}: the tokenizer has {tokenizer.vocab_size} tokens but "
                               f"the model only {rows} (config.json vocab_size)")

    def vocab_mat(name):                    # [rows, D] in the file, the tokenizer's [V, D] here
        return _hold(lambda: np.ascontiguousarray(f32(name, (rows, D))[:c.vocab_size]),
                     _embedding_quant(quant), name)
    tok_embd = vocab_mat("model.embed_tokens.weight")
    if "lm_head.weight" in t and not c.tie_embeddings:
        lm_head = vocab_mat("lm_head.weight")
    elif cfg.get("tie_word_embeddings") is False:
        raise ModelFormatError(f"{folder.name}: the checkpoint lacks tensor 'lm_head.weight' "
                               f"(config.json says tie_word_embeddings: false)")
    else:
        c.tie_embeddings, lm_head = True, tok_embd
        used.add("lm_head.weight")          # tied: the file's copy equals the embedding
    out_norm = f32("model.norm.weight", (D,))
    _unused(t, used, folder.name)
    stacks = _fuse(layers)
    weights = Weights(tok_embd, layers, out_norm, lm_head, stacks=stacks)
    return c, weights, tokenizer
