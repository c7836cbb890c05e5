# %% [markdown]
# # 07 · The MLP: SwiGLU
#
# After attention has moved information between tokens, the **MLP** (the feed-forward block)
# transforms each token on its own: the same function applied to every row. It holds most of the
# model's parameters. Llama-family models use the **SwiGLU** variant (Shazeer, 2020).
# Modules: `minfer/stages/mlp.py`, `minfer/stages/linear.py`.
#
# ## The math
#
# $$ \mathrm{MLP}(x) = W_\text{down}\big(\,\mathrm{silu}(W_\text{gate}\, x) \odot (W_\text{up}\, x)\,\big), \qquad \mathrm{silu}(z) = z\,\sigma(z) = \frac{z}{1 + e^{-z}} $$
#
# Two projections go *up* from the model width $D$ = 576 to the hidden width $F$ = 1536; the gate
# branch passes through silu and multiplies the up branch elementwise, deciding per hidden unit
# how much gets through; one projection comes back *down*.
#
# | | shape |
# |---|---|
# | `x` | `[T, D]` |
# | `w_gate`, `w_up` | `[F, D]` — stored `[out, in]`, as in the file |
# | `w_down` | `[D, F]` |
# | result | `[T, D]` |
#
# A linear layer is `y = x Wᵀ` (no bias in Llama): with `W` stored `[out, in]`, each output is a
# dot product with one contiguous row of `W`.

# %%
from types import SimpleNamespace

import numpy as np

import minfer
from minfer.classroom import show
from minfer.stages.linear import linear
from minfer.stages.mlp import silu, swiglu


# %% [markdown]
# minfer writes silu with `tanh`, using $\sigma(z) = \tfrac12(1 + \tanh(z/2))$: the same function,
# but `exp(-z)` would overflow float32 for $z < -88$, and `tanh` never does.

# %%
z = np.array([-100, -5, -1, 0, 1, 5, 100], dtype=np.float32)
with np.errstate(over="raise"):
    try:
        z / (1 + np.exp(-z))
    except FloatingPointError as e:
        print("z / (1 + exp(-z)):", e)
    print("minfer's silu:    ", silu(z))

# %% [markdown]
# ## Where the parameters are
#
# Per layer, attention has $W_q, W_k, W_v, W_o$; the MLP has three matrices of $D \times F$:

# %%
llm = minfer.LLM(backend="numpy")
c = llm.config
attn = c.dim * c.n_heads * c.head_dim * 2 + c.dim * c.n_kv_heads * c.head_dim * 2
mlp = 3 * c.dim * c.ffn_dim
print(f"attention {attn:,} + MLP {mlp:,} parameters per layer: the MLP is {mlp / (attn + mlp):.0%}")

# %% [markdown]
# ## The gate at work
#
# silu is not ReLU: it is smooth, slightly negative for negative inputs, and lets small negative
# values through. Record what the gate does in the real model — replace the `swiglu` op with one
# that keeps `silu(x W_gateᵀ)` — and look at the distribution in an early and a late layer.

# %%
gates = []


def recording_swiglu(x, w_gate, w_up, w_down):
    gates.append(silu(linear(x, w_gate)))
    return swiglu(x, w_gate, w_up, w_down)


ids = llm.tokenizer.encode("The MLP transforms every token on its own, row by row.")
base = llm.model.ops
llm.model.ops = SimpleNamespace(**{**vars(base), "swiglu": recording_swiglu})
llm.logits(ids)
llm.model.ops = base
for l in (0, c.n_layers // 2, c.n_layers - 1):
    g = gates[l]
    print(f"layer {l:2d}: gate values in [{g.min():6.2f}, {g.max():6.2f}], "
          f"{np.mean(np.abs(g) < 0.05):.0%} nearly closed (|g| < 0.05)")

# %%
import matplotlib.pyplot as plt

fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.5), layout="constrained")
zz = np.linspace(-6, 4, 300, dtype=np.float32)
a1.plot(zz, np.maximum(zz, 0), label="ReLU", color="#aaa", ls="--")
a1.plot(zz, silu(zz), label="silu = z·σ(z)", color="#3f6ec6", lw=2)
a1.plot(zz, 1 / (1 + np.exp(-zz)), label="σ(z)", color="#e07b39", lw=1)
a1.axhline(0, color="#ddd", lw=0.8, zorder=0)
a1.set_xlabel("z")
a1.legend()
a1.set_title("the gate's non-linearity")
for l, color in [(0, "#4e9a52"), (c.n_layers // 2, "#3f6ec6"), (c.n_layers - 1, "#b04fa6")]:
    a2.hist(gates[l].ravel(), bins=np.linspace(-0.6, 3, 90), histtype="step", lw=1.5, color=color,
            density=True, label=f"layer {l}")
a2.set_yscale("log")
a2.set_xlabel("silu(x W_gateᵀ)")
a2.set_title(f"gate values on a real prompt ({len(ids)} tokens x {c.ffn_dim} units)")
a2.legend()
show(fig, "07_silu_gates")

# %% [markdown]
# The gate values pile up around zero, with a hard left edge at silu's minimum (−0.28, at
# $z \approx -1.28$): negative inputs are squashed, never amplified. To the right runs a long tail of
# wide-open units, longer in later layers. So for each token, most hidden units pass little of
# their up branch and a few pass a lot — and which few depends on the token. That selection is
# where much of what the model "knows" is thought to be stored.
#
# ## Your turn
#
# ```bash
# python -m minfer lesson start 7
# python -m minfer lesson check 7
# ```
#
# Tasks: `silu(z)` (without overflow warnings for very negative `z`) and
# `swiglu(x, w_gate, w_up, w_down)`.
#
# ??? note "Solution — minfer's reference (open it once yours passes, or once you are stuck)"
#     <!-- source minfer.stages.mlp:silu,swiglu -->
#
#     Outside this site: `minfer/stages/mlp.py`.
#
# **Next:** [08 · Sampling](08_sampling.md) — from logits to the next token.
