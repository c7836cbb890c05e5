# %% [markdown]
# # 03 · Embeddings, the residual stream, and RMSNorm
#
# The forward pass starts by turning each token id into a vector, and then passes that vector
# through 30 layers that each **add** something to it. This running vector is the *residual
# stream*; RMSNorm keeps what each layer reads from it at a steady scale.
# Modules: `minfer/stages/embedding.py`, `minfer/stages/rmsnorm.py`.
#
# ## Embedding: a table lookup
#
# The embedding table $E$ has one row per vocabulary entry, $V \times D$ = 49 152 × 576. Embedding
# token $t$ is reading row $E_t$:
#
# | | shape | dtype |
# |---|---|---|
# | `token_ids` | `[T]` | int |
# | `table` | `[V, D]` | any float |
# | result `x` | `[T, D]` | float32 |

# %%
from types import SimpleNamespace

import numpy as np

import minfer
from minfer.classroom import show
from minfer.stages.embedding import embedding
from minfer.stages.rmsnorm import rmsnorm

llm = minfer.LLM(backend="numpy")
tok, W = llm.tokenizer, llm.weights
ids = tok.encode("The cat sat on the mat.")
x = embedding(np.array(ids), W.tok_embd)
print([tok.id_to_token(i) for i in ids], "->", x.shape, x.dtype)

# %% [markdown]
# SmolLM2 **ties** the embedding to the LM head: the same matrix that turns ids into vectors at the
# start scores every vocabulary entry at the end (`logits = x Eᵀ`), which saves 28 M parameters.
# Rows of $E$ that point the same way belong to tokens the model treats alike:

# %%
print("tied:", llm.config.tie_embeddings, "| same array:", W.lm_head is W.tok_embd)
E = W.tok_embd / np.linalg.norm(W.tok_embd, axis=1, keepdims=True)
for word in [" cat", " Paris", " seven"]:
    t = tok.encode(word)[0]
    near = np.argsort(-(E @ E[t]))[1:7]
    print(f"{word!r:10} nearest rows: {[tok.decode([int(i)]) for i in near]}")

# %% [markdown]
# ## The residual stream
#
# Each layer reads the stream, computes an update, and adds it back:
#
# $$ x \leftarrow x + \mathrm{Attention}(\mathrm{norm}(x)), \qquad x \leftarrow x + \mathrm{MLP}(\mathrm{norm}(x)) $$
#
# Nothing is ever overwritten, so information from the embedding can flow to the top untouched,
# and each layer only has to learn a correction. The stream's scale is free to grow, layer after
# layer — which is why each block first **normalizes** what it reads.
#
# ## RMSNorm
#
# $$ \mathrm{RMSNorm}(x) = \frac{x}{\sqrt{\frac{1}{D}\sum_{i} x_i^2 + \varepsilon}} \odot w $$
#
# Each token's vector is divided by its root-mean-square, then multiplied elementwise by a learned
# gain $w$. Unlike LayerNorm there is no mean subtraction and no bias: one reduction per token,
# not two. Shape contract: `x [T, D]`, `w [D]`, `eps` → `[T, D]`.

# %%
y = rmsnorm(x, np.ones(x.shape[1], np.float32), llm.config.rms_eps)
print("RMS of each token before:", np.sqrt((x ** 2).mean(-1)).round(4))
print("RMS of each token after: ", np.sqrt((y ** 2).mean(-1)).round(4))

# %% [markdown]
# ## Watching the stream grow
#
# Every RMSNorm in the model reads the residual stream, so the stream can be observed by
# replacing the `rmsnorm` op with one that records its input before calling the real one. (The op
# table, `model.ops`, is how minfer swaps implementations — and how your own code will run in
# the exercises.)

# %%
seen = []


def recording_rmsnorm(x, w, eps):
    seen.append(np.sqrt((x.astype(np.float64) ** 2).mean(-1)))   # the RMS of each row
    return rmsnorm(x, w, eps)


base = llm.model.ops
llm.model.ops = SimpleNamespace(**{**vars(base), "rmsnorm": recording_rmsnorm})
logits = llm.logits(ids)
llm.model.ops = base                                             # put the reference back
rms = np.array(seen[:-1])               # 2 per layer: before attention, before the MLP
print(rms.shape, "= (2 x", llm.config.n_layers, "norms, tokens)")
at = [0, 20, 40, 58]                    # before the attention of layers 0, 10, 20 and 29
for j in (0, 3):
    print(f"token {j} ({tok.decode([ids[j]])!r}) RMS at layers 0, 10, 20, 29:",
          "  ".join(f"{v:8.2f}" for v in rms[at, j]))

# %%
import matplotlib.pyplot as plt

fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
steps = np.arange(rms.shape[0]) / 2
for j, t in enumerate(ids):
    a1.plot(steps, rms[:, j], label=repr(tok.decode([t])), lw=1.4 if j else 2.4)
a1.set_yscale("log")
a1.set_xlabel("layer")
a1.set_ylabel("RMS of the residual stream")
a1.set_title("what each RMSNorm receives")
a1.legend(fontsize=7, ncol=2)
gains = np.array([L.attn_norm for L in W.layers])
a2.imshow(np.abs(gains), aspect="auto", cmap="magma", vmax=np.percentile(np.abs(gains), 99))
a2.set_xlabel("channel of the stream (0..575)")
a2.set_ylabel("layer")
a2.set_title("|w| of each attention RMSNorm")
show(fig, "03_residual_stream")

# %% [markdown]
# Two things stand out. The first token's stream grows far larger than the others: models use
# the first position as a resting place for attention (an *attention sink*, lesson 05), and its
# vector is unusual. And a few channels of the gains stand out in every layer: the stream has
# a handful of "massive" dimensions that the norms treat specially. RMSNorm makes all of that
# harmless to what comes next: whatever the scale of the stream, each block reads a vector of
# RMS about 1, times its gain.
#
# ## Your turn
#
# ```bash
# python -m minfer lesson start 3      # writes minfer-exercises/lesson03_embedding_rmsnorm.py
# python -m minfer lesson check 3
# ```
#
# Tasks: `embedding(token_ids, table)` and `rmsnorm(x, w, eps)`, with the shapes in the tables above. When
# both pass, `python -m minfer chat --use-mine` runs the model with your two functions in it.
#
# ??? note "Solution — minfer's reference (open it once yours passes, or once you are stuck)"
#     <!-- source minfer.stages.embedding:embedding -->
#     <!-- source minfer.stages.rmsnorm:rmsnorm -->
#
#     Outside this site: `minfer/stages/embedding.py`, `minfer/stages/rmsnorm.py`.
#
# **Next:** [04 · RoPE](04_rope.md) — how the model knows where each token is.
