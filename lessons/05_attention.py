# %% [markdown]
# # 05 · Attention: how tokens read each other
#
# Attention is the only place where tokens exchange information. Each token asks a question (its
# **query** $q$), every earlier token offers a label (its **key** $k$) and a content (its
# **value** $v$); the answer is an average of the values, weighted by how well each key matches
# the query. Module: `minfer/stages/attention.py`.
#
# ## The math, for one head
#
# For a query at position $p$ and the keys and values of positions $0 \dots S-1$:
#
# $$ s_j = \frac{q \cdot k_j}{\sqrt{d}}, \qquad a_j = \frac{e^{s_j}}{\sum_{j' \le p} e^{s_{j'}}} \;\; (j \le p), \qquad \mathrm{out} = \sum_{j \le p} a_j\, v_j $$
#
# * Dividing by $\sqrt{d}$ keeps the scores' spread independent of the head size $d$ (64).
# * The **causal mask** ($j \le p$) hides the future: a token may only read tokens before it.
#   In code, masked scores are set to $-\infty$, whose exponential is exactly 0.
# * The softmax subtracts the largest score before exponentiating, so nothing overflows.
#
# ## Grouped-query attention (GQA)
#
# SmolLM2 has 9 query heads but only 3 key/value heads: query heads 0–2 share kv head 0, heads
# 3–5 share kv head 1, heads 6–8 kv head 2 (query head $h$ reads kv head $\lfloor h/3 \rfloor$). The
# model loses little, and the KV cache, which holds keys and values of every past token, is
# 3× smaller.
#
# ## Shape contract
#
# | | shape |
# |---|---|
# | `q` | `[T, Hq, hd]`: the new tokens of every sequence in the batch, flattened |
# | `k_cache`, `v_cache` | `[n_blocks, block_size, Hkv, hd]`: one layer of the paged cache |
# | `batch` | which rows belong to which sequence, their positions and block tables |
# | result | `[T, Hq, hd]` |
#
# minfer reads keys and values **from the KV cache**, always: the new tokens' keys were written
# there just before (lesson 06 explains the blocks). So prefill (many rows per sequence) and
# decode (one row) are the same code.

# %%
from types import SimpleNamespace

import numpy as np

import minfer
from minfer.batch import make_batch
from minfer.classroom import show
from minfer.stages.attention import paged_attention, softmax
from minfer.stages.kvcache import kv_write


# %% [markdown]
# ## The textbook version, and minfer's, agree
#
# One sequence of 5 tokens whose cache is a single block: the contiguous special case. The
# textbook version below loops over heads and builds the mask as a matrix.

# %%
rng = np.random.default_rng(0)
T, Hq, Hkv, hd, bs = 5, 4, 2, 8, 16
q = rng.standard_normal((T, Hq, hd)).astype(np.float32)
k = rng.standard_normal((T, Hkv, hd)).astype(np.float32)
v = rng.standard_normal((T, Hkv, hd)).astype(np.float32)

batch = make_batch([(np.zeros(T, dtype=np.int64), 0, [0])], block_size=bs)   # block 0 holds it all
k_cache = np.zeros((1, bs, Hkv, hd), np.float32)
v_cache = np.zeros((1, bs, Hkv, hd), np.float32)
kv_write(k_cache, v_cache, k, v, batch.slot_mapping)

mask = np.tril(np.ones((T, T), dtype=bool))                # row p sees columns 0..p
print(mask.astype(int))
textbook = np.empty_like(q)
for h in range(Hq):
    g = h // (Hq // Hkv)                                   # the kv head this query head reads
    s = q[:, h] @ k[:, g].T / np.sqrt(hd)                  # [T, T]
    s = np.where(mask, s, -np.inf)
    textbook[:, h] = softmax(s) @ v[:, g]
print("max |difference|:", np.abs(textbook - paged_attention(q, k_cache, v_cache, batch)).max())

# %% [markdown]
# ## Attention in the real model
#
# To see the attention weights of SmolLM2, replace the `attention` op with one that keeps its
# inputs, run one forward pass, and recompute the probabilities from the recorded queries and
# cache. The prompt repeats a sentence, which brings out a famous pattern.

# %%
llm = minfer.LLM(backend="numpy")
tok, cfg = llm.tokenizer, llm.config
text = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog."
ids = tok.encode(text)
labels = [tok.decode([i]) for i in ids]
recorded = []


def recording_attention(q, k_cache, v_cache, batch):
    recorded.append((q.copy(), k_cache.copy(), batch))
    return paged_attention(q, k_cache, v_cache, batch)


base = llm.model.ops
llm.model.ops = SimpleNamespace(**{**vars(base), "attention": recording_attention})
llm.logits(ids)
llm.model.ops = base


def attention_probs(layer):
    """[Hq, T, T] attention weights of one layer (one sequence, so rows = positions)."""
    q, k_cache, b = recorded[layer]
    S, group = len(ids), cfg.n_heads // cfg.n_kv_heads
    K = k_cache[b.block_tables[0, : -(-S // k_cache.shape[1])]].reshape(-1, cfg.n_kv_heads, cfg.head_dim)[:S]
    K = np.repeat(K, group, axis=1)                                        # [S, Hq, hd]
    s = np.einsum("thd,shd->hts", q, K) / np.sqrt(cfg.head_dim)
    s = np.where(np.tril(np.ones((S, S), bool))[None], s, -np.inf)
    return softmax(s)


P = np.array([attention_probs(l) for l in range(cfg.n_layers)])          # [layers, Hq, T, T]
print(len(ids), "tokens;", P.shape, "attention weights")

# %% [markdown]
# **Induction heads.** In the second copy of the sentence, a token can predict what comes next by
# finding its earlier occurrence and looking at the token *after* it. A head that does this puts
# its weight at distance $L - 1$ back, where $L$ is the length of the repeated part. Score every
# head by the weight it puts there, and pick the best one — and, for contrast, a head of the
# first layer.

# %%
L = len(ids) // 2
rows = np.arange(L + 1, len(ids))
induction = P[:, :, rows, rows - L + 1].mean(-1)                         # [layers, Hq]
best = np.unravel_index(np.argmax(induction), induction.shape)
print(f"best induction head: layer {best[0]}, head {best[1]} "
      f"(mean weight {induction[best]:.2f} on the token after the earlier occurrence)")
sink = P[:, :, 1:, 0].mean(axis=(1, 2))
print("average weight on position 0, per layer:", sink[::5].round(2), "(layers 0, 5, 10, ...)")

# %%
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 3, figsize=(16, 5.6), layout="constrained")
for ax, (l, h, title) in zip(axes, [(0, 0, "layer 0, head 0"),
                                     (best[0], best[1], f"layer {best[0]}, head {best[1]}: induction"),
                                     (cfg.n_layers // 2, 4, f"layer {cfg.n_layers // 2}, head 4")]):
    ax.imshow(P[l, h], cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(ids)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(ids)), labels, fontsize=7)
    ax.set_xlabel("key (read from)")
    ax.set_title(title, fontsize=10)
axes[0].set_ylabel("query (reading)")
show(fig, "05_attention_heatmaps")

# %% [markdown]
# Everything above the diagonal is white: the causal mask. The induction head lights up a
# diagonal stripe shifted back by one sentence. Many heads also park most of their weight on
# the first token (the *attention sink*): softmax weights must sum to 1, and a head with
# nothing to read needs somewhere harmless to put them.
#
# ## The cost of GQA, counted
#
# Every generated token stores its keys and values for every layer:

# %%
per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4            # bytes, float32
mha = 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 4
print(f"KV cache per token: {per_token / 1024:.0f} KiB with {cfg.n_kv_heads} kv heads "
      f"(it would be {mha / 1024:.0f} KiB with one per query head)")
print(f"a full context of {cfg.max_seq_len} tokens: {per_token * cfg.max_seq_len / 2**20:.0f} MiB")

# %% [markdown]
# ## Your turn — and chat on your own attention
#
# ```bash
# python -m minfer lesson start 5
# python -m minfer lesson check 5
# python -m minfer chat --use-mine        # once paged_attention passes
# ```
#
# Tasks: `softmax(s, axis=-1)` and `paged_attention(q, k_cache, v_cache, batch)`. Start from the
# textbook loop above and make it read keys through the block table; the check tries several
# sequences of different lengths at once, with GQA and with blocks scattered across the pool,
# and tells you if your output looks like a missing mask, a missing scale, or the wrong kv head.
#
# ??? note "Solution — minfer's reference (open it once yours passes, or once you are stuck)"
#     <!-- source minfer.stages.attention:softmax,paged_attention -->
#
#     Outside this site: `minfer/stages/attention.py`.
#
# **Next:** [06 · The KV cache](06_kvcache.md) — where those keys and values live.
