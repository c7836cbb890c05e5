# %% [markdown]
# # 04 · RoPE: positions as rotations
#
# Attention compares a query with keys by dot products, and a dot product does not care where
# the tokens stand: without help, "dog bites man" and "man bites dog" look the same. **Rotary
# position embedding** (RoPE, Su et al., 2021) tells the model where each token is by *rotating*
# its query and key vectors by an angle proportional to the position. Module: `minfer/stages/rope.py`.
#
# ## The rotation
#
# A head vector of size $d$ (64 here) is seen as $d/2$ **pairs**. Pair $i$ of a token at position
# $p$ is turned by the angle $p\,\theta_i$, with one frequency per pair:
#
# $$ \theta_i = b^{-2i/d}, \qquad i = 0, \dots, d/2 - 1 $$
#
# $$ (a, b) \;\mapsto\; (a \cos p\theta_i - b \sin p\theta_i,\;\; a \sin p\theta_i + b \cos p\theta_i) $$
#
# SmolLM2 uses base $b = 100\,000$. Pair 0 turns by one radian per position; the last pair so
# slowly that it takes ~400 000 positions to go around once.
#
# Shape contract: `rope_angles(positions [T], head_dim, base) -> cos, sin [T, d/2]`, then
# `rope(x [T, H, d], cos, sin) -> [T, H, d]`, the same angles for every head.

# %%
import numpy as np

from minfer.classroom import show
from minfer.stages.rope import hf_to_interleaved, rope, rope_angles

hd, base = 64, 100000.0
wavelength = 2 * np.pi * base ** (np.arange(0, hd, 2) / hd)
print("positions per turn, pairs 0, 1, 8, 16, 24, 31:", [f"{w:,.1f}" for w in wavelength[[0, 1, 8, 16, 24, 31]]])

# %% [markdown]
# ## A picture of rotations
#
# Take the same vector at positions 0 to 40 and watch four of its 32 pairs. The fast pairs spin
# around the circle; the slow ones barely move. Together they act like the hands of a clock:
# fast hands resolve nearby positions, slow hands tell far-apart ones apart.

# %%
import matplotlib.pyplot as plt

positions = np.arange(41)
cos, sin = rope_angles(positions, hd, base)
x = np.zeros((len(positions), 1, hd), np.float32)
x[..., 0::2] = 1.0                                         # every pair starts at (1, 0)
rx = rope(x, cos, sin)                                     # [41, 1, 64]
fig, axes = plt.subplots(1, 5, figsize=(14, 3.3), layout="constrained",
                         gridspec_kw={"width_ratios": [1, 1, 1, 1, 1.6]})
fig.suptitle("one vector at positions 0 (dark) to 40 (yellow): four of its 32 pairs, and all pairs' "
             "cosines up to position 255", fontsize=10)
for ax, i in zip(axes, [0, 4, 10, 20]):
    a, b = rx[:, 0, 2 * i], rx[:, 0, 2 * i + 1]
    ax.add_patch(plt.Circle((0, 0), 1, fill=False, color="#bbb"))
    ax.scatter(a, b, c=positions, cmap="viridis", s=14)
    ax.set_aspect("equal")
    ax.set_xlim(-1.2, 1.2)
    ax.set_ylim(-1.2, 1.2)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"pair {i}: {wavelength[i]:.0f} pos/turn", fontsize=9)
im = axes[4].imshow(rope_angles(np.arange(256), hd, base)[0].T, aspect="auto", cmap="RdBu")
axes[4].set_xlabel("position")
axes[4].set_ylabel("pair i")
axes[4].set_title(r"cos(p $\theta_i$)", fontsize=9)
fig.colorbar(im, ax=axes[4], fraction=0.05)
show(fig, "04_rope_rotations")

# %% [markdown]
# ## Only the distance matters
#
# Rotations compose: rotating $q$ by $m\theta$ and $k$ by $n\theta$ and taking their dot product
# is the same as rotating $k$ by $(n - m)\theta$ against the original $q$. So the attention score
# depends on the positions only through $m - n$, and RoPE never changes a vector's length:

# %%
rng = np.random.default_rng(0)
q, k = rng.standard_normal((2, 1, 1, hd)).astype(np.float32)


def score(m, n):
    cq, sq = rope_angles(np.array([m]), hd, base)
    ck, sk = rope_angles(np.array([n]), hd, base)
    return float((rope(q, cq, sq) * rope(k, ck, sk)).sum())


for m, n in [(3, 1), (10, 8), (1000, 998), (5, 1), (1004, 1000)]:
    print(f"q at {m:4d}, k at {n:4d} (distance {m - n}): score {score(m, n):+.5f}")
c1, s1 = rope_angles(np.array([777]), hd, base)
print("|q| =", np.linalg.norm(q).round(5), " |rope(q)| =", np.linalg.norm(rope(q, c1, s1)).round(5))

# %% [markdown]
# ## Which elements make a pair?
#
# That is a convention, and the two big ones disagree:
#
# * **interleaved** (llama.cpp, GGUF, minfer): neighbours, $(x_0, x_1), (x_2, x_3), \dots$
# * **rotate-half** (Hugging Face): halves, $(x_i, x_{i + d/2})$
#
# They are the same function up to a fixed reordering of the vector's elements. And since $q$
# and $k$ come out of a linear layer, reordering the **rows of $W_q$ and $W_k$** reorders $q$ and $k$
# for free. That is what llama.cpp's converter does when it writes a GGUF, and what minfer does
# once when it loads a Hugging Face folder (`hf_to_interleaved`). Attention scores are dot
# products, which do not care about the order of elements as long as $q$ and $k$ agree.


# %%
def rope_rotate_half(x, cos, sin):                         # Hugging Face's convention
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([a * c - b * s, a * s + b * c], axis=-1)


T, H, D = 6, 2, 32
W_hf = rng.standard_normal((H * hd, D)).astype(np.float32)   # a q_proj as HF stores it
W_il = hf_to_interleaved(W_hf, H)                            # the same rows, reordered
h = rng.standard_normal((T, D)).astype(np.float32)           # T normalized tokens
cos, sin = rope_angles(np.arange(T), hd, base)
q_hf = rope_rotate_half((h @ W_hf.T).reshape(T, H, hd), cos, sin)
q_il = rope((h @ W_il.T).reshape(T, H, hd), cos, sin)
perm = np.arange(hd).reshape(2, hd // 2).T.reshape(-1)       # [0, 32, 1, 33, 2, 34, ...]
print("row order within a head:", perm[:8], "...")
print("interleaved result == rotate-half result, reordered:", np.allclose(q_il, q_hf[..., perm], atol=1e-5))
scores_hf = np.einsum("thd,shd->hts", q_hf, q_hf)
scores_il = np.einsum("thd,shd->hts", q_il, q_il)
print("and the attention scores are identical:", np.allclose(scores_hf, scores_il, atol=1e-4))

# %%
fig, ax = plt.subplots(figsize=(10, 2.2))
n = 8                                                       # a head of 8 for the picture
p = np.arange(n).reshape(2, n // 2).T.reshape(-1)
for new, old in enumerate(p):
    ax.annotate("", xy=(new, 0), xytext=(old, 1), arrowprops=dict(arrowstyle="->", color="#3f6ec6"))
for j in range(n):
    ax.text(j, 1.12, f"{j}", ha="center", fontsize=10)
    ax.text(j, -0.22, f"{j}", ha="center", fontsize=10)
ax.text(-0.9, 1.12, "HF row", ha="right", fontsize=9)
ax.text(-0.9, -0.22, "GGUF row", ha="right", fontsize=9)
ax.set_xlim(-3, n)
ax.set_ylim(-0.5, 1.4)
ax.axis("off")
ax.set_title("hf_to_interleaved on one head of 8: row i of each half lands next to its partner", fontsize=9)
show(fig, "04_qk_permutation")

# %% [markdown]
# ## Your turn
#
# ```bash
# python -m minfer lesson start 4
# python -m minfer lesson check 4
# ```
#
# Tasks: `rope_angles(positions, head_dim, base)` and `rope(x, cos, sin)`. The check knows the
# classic mistakes (pairing halves instead of neighbours, turning the wrong way) and names them.
#
# ??? note "Solution — minfer's reference (open it once yours passes, or once you are stuck)"
#     <!-- source minfer.stages.rope:rope_angles,rope -->
#
#     Outside this site: `minfer/stages/rope.py`.
#
# **Next:** [05 · Attention](05_attention.md) — where the rotated queries and keys meet.
