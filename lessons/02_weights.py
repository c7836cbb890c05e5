# %% [markdown]
# # 02 · Weights: what is in a model file
#
# A model is a few hundred named arrays plus the facts needed to use them (sizes, the tokenizer,
# the chat template). minfer reads two formats:
#
# * **GGUF** — llama.cpp's single-file format: metadata and tensors together, tensors often
#   *quantized* into small blocks. The default model is a GGUF file. Reader: `minfer/weights/gguf.py`.
# * **safetensors** — Hugging Face's format: a folder with `config.json`, `tokenizer.json` and
#   `*.safetensors` files of plain float arrays. Reader: `minfer/weights/safetensors.py`.
#
# Both readers parse a small header and **memory-map** the rest: opening a file reads almost
# nothing, and a tensor's bytes are read from disk when they are first touched.

# %%
import json
import struct
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from minfer.classroom import show
from minfer.stages import quant
from minfer.weights.fetch import ensure_default_model
from minfer.weights.gguf import read_gguf
from minfer.weights.load import load_gguf, load_hf
from minfer.weights.safetensors import read_safetensors
from minfer.weights.synthetic import tiny_checkpoint

path = ensure_default_model()
print(path.name, f"{path.stat().st_size:,} bytes")

# %% [markdown]
# ## The GGUF layout
#
# ```text
# "GGUF" | version u32 | n_tensors u64 | n_kv u64          fixed header, little-endian
# n_kv      x  key string | value type u32 | value         metadata
# n_tensors x  name string | n_dims u32 | dims u64... | type u32 | offset u64
# padding to a multiple of 32 bytes, then the tensor data
# ```
#
# The first 24 bytes, decoded by hand:

# %%
with open(path, "rb") as f:
    head = f.read(24)
magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", head)
print(head.hex(" "))
print(f"magic {magic!r}, version {version}, {n_tensors} tensors, {n_kv} metadata entries")

# %% [markdown]
# `read_gguf` does the rest and returns the metadata as a dict and the tensors by name. The
# `llama.*` keys are what `ModelConfig.from_gguf` turns into the model's hyper-parameters:

# %%
meta, tensors = read_gguf(path)
for k, v in meta.items():
    if k.startswith("llama."):
        print(f"  {k:42} {v}")
print(f"  ... and {sum(k.startswith('tokenizer.') for k in meta)} tokenizer.* keys (lesson 01)")

# %% [markdown]
# Tensor names follow llama.cpp's convention (`blk.N.attn_q.weight`, `token_embd.weight`...).
# Shapes are shown in NumPy order: a matrix weight is `[out, in]`, stored row by row. Three
# storage types appear in this file:

# %%
by_type = Counter()
for t in tensors.values():
    by_type[t.type] += t.data.nbytes
for name in ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_up.weight", "blk.0.attn_norm.weight"]:
    t = tensors[name]
    n = int(np.prod(t.shape))
    print(f"{name:24} {t.type:5} shape {str(t.shape):14} {t.data.nbytes:>10,} bytes "
          f"= {8 * t.data.nbytes / n:.2f} bits per weight")
print({k: f"{v / 1e6:.1f} MB" for k, v in by_type.items()})

# %% [markdown]
# ## Block quantization
#
# A 4-bit weight cannot hold a float. Instead each row is cut into **blocks of 32** consecutive
# weights, and each block stores its own scale. In `Q4_1`, a block is 20 bytes:
#
# $$ w_j = d \cdot q_j + m, \qquad q_j \in \{0, \dots, 15\}, \quad j = 0, \dots, 31 $$
#
# with `d` and `m` as float16 (2 bytes each) and the 32 four-bit `q_j` packed two per byte
# (16 bytes): byte `j` holds $q_j$ in its low nibble and $q_{j+16}$ in its high nibble.
# That is $20 \cdot 8 / 32 = 5$ bits per weight. `Q8_0` (34 bytes: a scale and 32 int8) stores the
# embedding table; norms stay `F32`.
#
# NumPy can view the raw bytes as an array of such blocks at no cost, with a structured dtype:

# %%
t = tensors["blk.0.attn_q.weight"]
blocks = t.data.view(quant.BLOCK_DTYPES["Q4_1"])             # [n_blocks] of (d, m, qs[16])
print(quant.BLOCK_DTYPES["Q4_1"], "->", blocks.shape[0], "blocks =", t.shape[0], "rows x",
      t.shape[1] // 32, "blocks per row")

b = blocks[0]                                                # row 0, weights 0..31
q = np.concatenate([b["qs"] & 0x0F, b["qs"] >> 4])           # 32 values in 0..15
w_by_hand = np.float32(b["d"]) * q + np.float32(b["m"])
w_reader = t.to_float32()[0, :32]                            # quant.dequantize, the reference
print("d =", b["d"], " m =", b["m"])
print("q =", q)
print("max |difference| to the reader:", np.abs(w_by_hand - w_reader).max())

# %% [markdown]
# Each block can only take 16 values, evenly spaced between `m` and `m + 15 d`. The picture shows
# one block's weights on its 16 levels, and how the scales spread over the whole matrix:

# %%
import matplotlib.pyplot as plt

fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.4))
levels = np.float32(b["d"]) * np.arange(16) + np.float32(b["m"])
for lv in levels:
    a1.axhline(lv, color="#ccc", lw=0.7, zorder=0)
a1.scatter(np.arange(32), w_reader, color="#3f6ec6", zorder=1)
a1.set_xlabel("index j in the block")
a1.set_ylabel("weight")
a1.set_title("one Q4_1 block of blk.0.attn_q: 32 weights, 16 levels")
a2.hist(blocks["d"].astype(np.float32), bins=60, color="#e07b39")
a2.set_xlabel("scale d of each block")
a2.set_title(f"all {blocks.shape[0]:,} blocks of the same matrix")
show(fig, "02_q4_1_block")

# %% [markdown]
# The NumPy reference path (`LLM(backend="numpy")`, what the lessons use) dequantizes every
# matrix to float32 once, at load (`GGUFTensor.to_float32`): the model then takes ~540 MB in memory
# though the file is 98 MB. The fast paths keep the file's blocks in memory and compute on them
# directly (lesson 10).
#
# ## safetensors: a JSON header and raw arrays
#
# A `.safetensors` file is an 8-byte little-endian length `N`, then `N` bytes of JSON that give,
# for each tensor, its dtype, shape and byte range; then the bytes. A tiny random model from
# `minfer.weights.synthetic` shows it all:

# %%
tmp = Path(tempfile.mkdtemp())
folder = tiny_checkpoint(tmp / "hf", fmt="hf", seed=0)
print(sorted(p.name for p in folder.iterdir()))
st = next(folder.glob("*.safetensors"))
raw = st.read_bytes()
(n,) = struct.unpack("<Q", raw[:8])
header = json.loads(raw[8:8 + n])
for name in list(header)[:4]:
    print(f"  {name:40} {header[name]}")
arrays = read_safetensors(st)
name = "model.layers.0.self_attn.q_proj.weight"
begin, end = header[name]["data_offsets"]
by_hand = np.frombuffer(raw[8 + n + begin: 8 + n + end], dtype=np.float32).reshape(header[name]["shape"])
print(name, arrays[name].shape, "equal to the bytes read by hand:", np.array_equal(by_hand, arrays[name]))

# %% [markdown]
# Hugging Face checkpoints are often `BF16`: the top 16 bits of a float32. NumPy has no bfloat16,
# but widening is a shift: put the 16 bits in the high half of a 32-bit word.

# %%
x = np.array([3.14159265, -0.001, 1e30], dtype=np.float32)
bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)           # what a BF16 file stores
back = (bf16.astype(np.uint32) << 16).view(np.float32)       # what the reader does
print(x, "->", bf16, "->", back)

# %% [markdown]
# ## One model, two files, the same weights
#
# The same random model written both ways loads to the same arrays, with one surprise: the GGUF
# writer (like llama.cpp's converter) **permutes the rows** of the Q and K projections, and the HF
# loader applies the same permutation at load (`rope.hf_to_interleaved`). Lesson 04 explains why.

# %%
gguf_file = tiny_checkpoint(tmp / "gguf", fmt="gguf", seed=0)
cfg_h, w_h, _ = load_hf(folder)
cfg_g, w_g, _ = load_gguf(gguf_file)
hf_q = read_safetensors(st)["model.layers.0.self_attn.q_proj.weight"]
print("file rows differ:     ", not np.allclose(hf_q, read_gguf(gguf_file)[1]["blk.0.attn_q.weight"].to_float32()))
print("loaded weights equal: ", all(np.allclose(getattr(w_h.layers[0], k), getattr(w_g.layers[0], k))
                                   for k in ["wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"]))

# %% [markdown]
# ## Your turn
#
# ```bash
# python -m minfer lesson start 2
# python -m minfer lesson check 2
# ```
#
# Tasks: `align_up(pos, alignment)` — where the data section begins after a header that ends at
# byte `pos` — and `read_f32_tensor(path, data_start, offset, dims)`: one float32 tensor out of a
# GGUF file with `open`, `seek` and `read`, given its offset and its dimensions as the header
# lists them. Mind the order of the dimensions: the header gives the fastest-moving one first.
#
# **Next:** [03 · Embeddings and RMSNorm](03_embedding_rmsnorm.md) — the first stage of the forward pass.
