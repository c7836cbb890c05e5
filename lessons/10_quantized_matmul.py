# %% [markdown]
# # 10 · Quantized matmul: computing on 4-bit blocks
#
# Lesson 09 ended on one fact: decoding a token reads every weight once, and float32 weights make
# that 538 MB per token. The shipped SmolLM2 file is 98 MB because it stores most weights in
# **4-bit blocks** (lesson 02 decoded one). This lesson takes the block formats apart byte by
# byte, measures what rounding to them costs, and follows minfer's kernels that compute directly
# on the blocks, without ever expanding the weights to float32 in memory.
# Module: `minfer/stages/quant.py`.
#
# !!! warning "Live timings"
#     As in lesson 09, the timings were measured on the machine that built this page, at build
#     time, on one thread (the first cell pins NumPy's BLAS and Numba to one); they are noisy, and
#     ratios hold better than absolute numbers.

# %%
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")     # before numpy loads: BLAS on one thread
os.environ.setdefault("MKL_NUM_THREADS", "1")

import inspect
import time

import numba
import numpy as np

import minfer
from minfer import quality
from minfer.classroom import clock, show   # clock: (median s, first call s)
from minfer.stages import quant
from minfer.stages.linear import linear_numba
from minfer.stages.quant import (BLOCK_DTYPES, QK, QuantMatrix, dequantize, quant_linear, quantize,
                                 split_for_q4)
from minfer.stages.quant_dispatch import KernelConfig, quant_linear_numba

numba.set_num_threads(1)
llm = minfer.LLM(backend="numba")          # quant="auto": the file's own blocks, as they are
print(f"{llm.path.name}: {llm.weights.nbytes() / 1e6:.1f} MB of weights in memory")


# %% [markdown]
# ## 1 · Three block formats
#
# A quantized matrix is stored row by row (`[out, in]`, as always), and each row is cut into
# **blocks of 32** consecutive weights. Each block keeps a float16 **scale** $d$ of its own, so a
# block of tiny weights and a block of large ones both use their few levels well:
#
# | format | a block of 32 weights | weight $j$ | bytes | bits per weight |
# |---|---|---|---|---|
# | `Q8_0` | $d$ (f16), 32 × int8 $q_j$ | $d\,q_j$ | 34 | 8.5 |
# | `Q4_0` | $d$ (f16), 16 bytes of 4-bit $q_j \in 0..15$ | $d\,(q_j - 8)$ | 18 | 4.5 |
# | `Q4_1` | $d$ (f16), $m$ (f16), 16 bytes of 4-bit $q_j$ | $d\,q_j + m$ | 20 | 5.0 |
#
# The "bits per weight" include the scales: 16 bits of $d$ shared by 32 weights add half a bit
# each. `Q4_0` is symmetric around zero; `Q4_1` also stores the block's minimum $m$, so its 16
# levels can sit anywhere. NumPy reads a buffer of blocks as a structured array at no cost:

# %%
for fmt, dt in BLOCK_DTYPES.items():
    print(f"{fmt}: {dt.itemsize} bytes = {dt.itemsize * 8 / QK:.2f} bits per weight   {dt.descr}")

# %% [markdown]
# ## 2 · One Q4_1 block, byte by byte
#
# The first 20 bytes of the MLP's up projection in layer 0 — row 0, weights 0 to 31 — exactly
# as they are in the file:

# %%
raw = llm.weights.raw["blk.0.ffn_up.weight"]
block = np.asarray(raw.data[:20])
print(raw.type, raw.shape, "->", " ".join(f"{b:02x}" for b in block))

d = block[0:2].view("<f2")[0]                      # bytes 0-1: the scale, float16, little-endian
m = block[2:4].view("<f2")[0]                      # bytes 2-3: the minimum
qs = block[4:20]                                   # 16 bytes, two 4-bit quants in each
q = np.concatenate([qs & 0x0F, qs >> 4])           # low nibbles: weights 0-15; high: 16-31
w = np.float32(d) * q + np.float32(m)
print(f"d = {d}   m = {m}")
print("q =", q)
print("w[:8] =", w[:8].round(4))
print("equal to quant.dequantize:", np.array_equal(w, dequantize(block, "Q4_1", (32,))))

# %% [markdown]
# The order of the nibbles is the detail everyone gets wrong once: byte $j$ holds weight $j$ in
# its **low** 4 bits and weight $j + 16$ in its **high** 4 bits — not two neighbours. Drawn:

# %%
import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

fig, ax = plt.subplots(figsize=(13, 4.2))
LOW, HIGH = "#3f6ec6", "#e07b39"
for i, (label, color) in enumerate([("d", "#8c8c8c"), ("d", "#8c8c8c"), ("m", "#5aa469"),
                                    ("m", "#5aa469")]):
    ax.add_patch(Rectangle((i, 3), 1, 1, facecolor=color, edgecolor="white", lw=2))
    ax.text(i + 0.5, 3.5, f"{block[i]:02x}", ha="center", va="center", color="white",
            family="monospace", fontsize=10)
ax.text(1, 4.25, f"d = {d:.3g}\n(float16)", ha="center", fontsize=9)
ax.text(3, 4.25, f"m = {m:.3g}\n(float16)", ha="center", fontsize=9)
for j in range(16):                                # the 16 bytes of quants: high | low nibble
    x0 = 4 + j
    ax.add_patch(Rectangle((x0, 3), 0.5, 1, facecolor=HIGH, edgecolor="white", lw=1))
    ax.add_patch(Rectangle((x0 + 0.5, 3), 0.5, 1, facecolor=LOW, edgecolor="white", lw=1))
    ax.add_patch(Rectangle((x0, 3), 1, 1, fill=False, edgecolor="white", lw=2.5))
    ax.text(x0 + 0.25, 3.5, f"{qs[j] >> 4:x}", ha="center", va="center", color="white",
            family="monospace", fontsize=10)
    ax.text(x0 + 0.75, 3.5, f"{qs[j] & 15:x}", ha="center", va="center", color="white",
            family="monospace", fontsize=10)
    ax.text(x0 + 0.5, 2.75, f"byte {4 + j}", ha="center", fontsize=6.5, color="#555")
    for k, color, xs in [(j, LOW, x0 + 0.75), (j + 16, HIGH, x0 + 0.25)]:
        xe = 4 + k * 0.5 + 0.25                       # weight k's cell in the row below
        ax.plot([xs, xe], [2.6, 1.05], color=color, lw=0.8, alpha=0.8)
for k in range(32):                                # the 32 weights they become
    color = LOW if k < 16 else HIGH
    ax.add_patch(Rectangle((4 + k * 0.5, 0), 0.5, 1, facecolor=color, edgecolor="white", lw=1,
                           alpha=0.85))
    ax.text(4 + k * 0.5 + 0.25, 0.5, f"{q[k]}", ha="center", va="center", color="white", fontsize=8)
    if k % 4 == 0:
        ax.text(4 + k * 0.5 + 0.25, -0.3, f"w{k}", ha="center", fontsize=7, color="#555")
ax.text(12, 4.25, "16 bytes of quants: high nibble | low nibble", ha="center", fontsize=9)
ax.text(3.8, 0.5, "q of weights 0 .. 31\nw = d·q + m", ha="right", va="center", fontsize=9)
ax.text(8, -0.75, "low nibbles → weights 0–15", ha="center", color=LOW, fontsize=9)
ax.text(16, -0.75, "high nibbles → weights 16–31", ha="center", color=HIGH, fontsize=9)
ax.set_xlim(-0.2, 20.2)
ax.set_ylim(-1.0, 4.9)
ax.axis("off")
ax.set_title("One Q4_1 block: 20 bytes, 32 weights (blk.0.ffn_up.weight, row 0)")
show(fig, "10_q4_1_block")

# %% [markdown]
# ## 3 · Quantizing: rounding onto a grid
#
# Going from float32 to blocks, each format picks its scale from the block, then rounds every
# weight onto the grid. Following llama.cpp's reference code, which the `gguf` package
# reproduces and minfer matches bit for bit (a test checks it):
#
# * **Q8_0**: $d = \max_j |w_j| / 127$, and $q_j = \mathrm{round}(w_j / d)$ with ties rounded
#   **away from zero** (C's `roundf`). NumPy's `np.round` rounds ties to the *even* neighbour:
#   a different byte, now and then.
# * **Q4_0**: the weight of largest magnitude $w_\ast$ (sign included) sets $d = w_\ast / -8$, so
#   it lands exactly on level $q = 0$; $q_j = \lfloor w_j/d + 8.5 \rfloor$, clipped to 0..15.
# * **Q4_1**: $m = \min_j w_j$, $d = (\max_j w_j - m)/15$, $q_j = \lfloor (w_j - m)/d + 0.5 \rfloor$.
#
# Q8_0 by hand, for one block with an exact tie in it:

# %%
wb = np.linspace(-0.5, 0.5, QK).astype(np.float32)
wb[0], wb[1] = 127 / 16, 2.5 / 16                # so d = 1/16 exactly, and w_1 / d = 2.5 exactly
d8 = np.abs(wb).max() / np.float32(127)          # float32, as in llama.cpp
z = wb * (np.float32(1) / d8)                    # times the inverse of the unrounded scale
mine = np.sign(z) * np.floor(np.abs(z) + 0.5)    # ties away from zero
print(f"d = {d8}; w_1 / d = {z[1]} -> away from zero: {mine[1]:.0f}, np.round: {np.round(z[1]):.0f}")
by_hand = np.zeros(1, BLOCK_DTYPES["Q8_0"])
by_hand["d"], by_hand["qs"] = d8, mine.astype(np.int8)       # d stored as float16
print("by hand == quant.quantize:", by_hand.tobytes() == quantize(wb, "Q8_0").tobytes())

# %% [markdown]
# How much does the rounding cost? Real weights of the model cannot tell us: they are *already*
# on a Q4_1 grid (the file), so re-quantizing them would measure two grids against each other.
# Instead, a matrix of the same shape with a weight-like distribution (heavy tails: a few large
# weights in many blocks), through each format and back:

# %%
rng = np.random.default_rng(0)
w_test = (rng.standard_t(5, size=(1536, 576)) * 0.02).astype(np.float32)
errors = {}
for fmt in ("Q8_0", "Q4_1", "Q4_0"):
    back = dequantize(quantize(w_test, fmt), fmt, w_test.shape)
    errors[fmt] = (back - w_test).ravel()
    rel = np.sqrt(np.mean(errors[fmt] ** 2) / np.mean(w_test ** 2))
    print(f"{fmt}: {BLOCK_DTYPES[fmt].itemsize * 8 / QK:.1f} bits per weight, RMS error "
          f"{rel:6.2%} of the weights' RMS, largest error {np.abs(errors[fmt]).max():.4f}")

# %%
fig, ax = plt.subplots(figsize=(8, 3.6))
sigma = w_test.std()
bins = np.linspace(-0.6, 0.6, 241)
for fmt, color in [("Q4_0", "#c94f4f"), ("Q4_1", "#e07b39"), ("Q8_0", "#3f6ec6")]:
    ax.hist(errors[fmt] / sigma, bins=bins, histtype="step", lw=1.6, color=color, label=fmt)
ax.set_yscale("log")
ax.set_xlabel("quantization error / standard deviation of the weights")
ax.set_ylabel("weights")
ax.set_title("Round trip float32 → blocks → float32, 885k weights")
ax.legend()
show(fig, "10_quantization_error")

# %% [markdown]
# Rounding to the nearest level costs each weight at most half a step of its block's grid, $d/2$
# (Q4_0 can lose up to a whole step: its levels run from $-8d$ to $7d$, so one end is clipped).
# Q8_0 has 255 levels and its errors are a thin spike; the 4-bit formats have 16 levels. Q4_1 spreads its 16 levels
# from the block's minimum to its maximum; Q4_0 centres them on zero, so in a block whose weights
# lean to one side, some levels go unused and the step is wider. Note the flat shoulders: each
# block has its own $d$, so the error histogram is a mixture of uniform distributions, one per
# block width. A block with one large outlier has a coarse grid for all 31 others — the reason
# for small blocks.
#
# ## 4 · Why computing on the blocks is faster
#
# The reference for a quantized linear layer is the specification, and it is short: dequantize,
# then multiply.

# %%
print(inspect.getsource(quant_linear))

# %% [markdown]
# For decode that is the worst of both worlds: it reads the blocks, *writes* a float32 copy of the
# whole matrix (4 bytes per weight), then reads that copy again. minfer's kernels instead walk the
# bytes of each row once and multiply as they go. Two tricks keep the loop flat and short.
#
# **The nibble split.** Byte $i$ of a block meets activation $x_i$ (low nibble) and $x_{i+16}$
# (high nibble). Rearranging $x$ once per call into `xl` (the elements under low nibbles) and `xh`
# (under high ones) lines them up with the bytes: one flat loop over the $K/2$ bytes of a row.
#
# **The `+ m` term factors out.** For one row, with blocks $b$ and weights $w_k = d_b q_k + m_b$:
#
# $$ \sum_k w_k x_k \;=\; \sum_b d_b \sum_{k \in b} q_k x_k \;+\; \sum_b m_b\, \mathrm{xsum}_b, \qquad \mathrm{xsum}_b = \sum_{k \in b} x_k $$
#
# The block sums of $x$ do not depend on the row: computed once per call, they serve every one of
# the $O$ rows. The minimum costs one multiply-add per block instead of one per weight. (Q4_0 is
# the case $m_b = -8 d_b$, so the same kernel serves it.) In NumPy, for one row:

# %%
# a QuantMatrix: qs, d, m as the float kernels want them (float32 scales; the faster kernels of
# the "Advanced" section keep the file's float16 ones)
Q = llm.weights.layers[0].w_up.float_scales()
print(type(Q).__name__, Q.fmt, Q.shape, "qs", Q.qs.shape, Q.qs.dtype, "d", Q.d.shape, Q.d.dtype)
xq = rng.standard_normal((1, Q.shape[1])).astype(np.float32)
xb = xq[0].reshape(-1, 2, 16)                      # [blocks, low half / high half, 16]
xl, xh = xb[:, 0].ravel(), xb[:, 1].ravel()        # [K/2] each: lined up with the bytes
xsum = xb.sum(axis=(1, 2))                         # [K/32]: one sum per block
row = 7
b = Q.qs[row]                                       # the K/2 = 288 bytes of row 7
dd = np.repeat(Q.d[row], 16)                        # each block's d, once per byte
scaled = (dd * ((b & 15) * xl + (b >> 4) * xh)).sum()
with_min = scaled + (Q.m[row] * xsum).sum()
direct = Q.dequantize()[row] @ xq[0]
print(f"factored: {with_min:.6f}   dequantize then dot: {direct:.6f}")

# %% [markdown]
# The Numba kernel does this for every row, in parallel over rows with `prange`. Read its inner
# loop with lesson 09's float64 trap in mind: `b & 15` on a byte is a 64-bit integer, and a loop
# full of 64-bit lanes holds half as many values per vector instruction. So minfer's kernel
# unpacks with float32 arithmetic instead — its docstring gives the algebra, and `split_for_q4`
# prepares the activations to match:

# %%
print(inspect.getsource(split_for_q4))
print(inspect.getsource(quant._q4_dot))

# %% [markdown]
# Like every kernel, it is checked against the reference — every format, a row count that is not
# a multiple of anything, the decode path (1 and 3 tokens, and a short prompt's 20) and the path
# of long prompts (a few tokens past `llm.kernels.sgemm_min_rows(fmt)`, which this CPU sets for
# each format: from there on minfer dequantizes tiles
# of rows into float32 and calls BLAS's sgemm — many tokens make the work compute-bound, and the
# dequantization is shared by all of them; below that the kernels, which cost the same per token
# at any count, are faster):

# %%
w_odd = (rng.standard_normal((999, 576)) * 0.05).astype(np.float32)
for fmt in ("Q8_0", "Q4_0", "Q4_1"):
    M = QuantMatrix.from_float(w_odd, fmt)
    worst = 0.0
    for T in (1, 3, 20, llm.kernels.sgemm_min_rows(fmt) + 7):
        xt = rng.standard_normal((T, 576)).astype(np.float32)
        want = quant_linear(xt, M)
        worst = max(worst, np.abs(quant_linear_numba(xt, M) - want).max() / np.abs(want).max())
    print(f"{fmt}: kernel vs reference, max relative difference {worst:.1e}")

# %% [markdown]
# Now the speed, on the largest matrix of the model: the LM head, 49 152 × 576 (the Q8_0
# embedding table, tied). The same matrix in each format, one decode step's matvec:

# %%
E = llm.weights.lm_head.float_scales()              # QuantMatrix, Q8_0, from the file
E32 = E.dequantize()                                # the same weights as float32
mats = {"f32": E32, "Q8_0": E, "Q4_1": QuantMatrix.from_float(E32, "Q4_1")}   # (Q4_0: same kernel)
x1 = rng.standard_normal((1, E.shape[1])).astype(np.float32)
speed = {}
floats = KernelConfig(split_x=False)   # the float kernels, as without VNNI (see "Advanced")
for fmt, M in mats.items():
    t, _ = clock(linear_numba, x1, M, False, floats, budget=0.15, most=50)
    speed[fmt] = (t, M.nbytes)
t0 = time.perf_counter()
quant_linear(x1, mats["Q4_1"])                       # the reference: slow, so timed once
t_ref = time.perf_counter() - t0
n_w = E.shape[0] * E.shape[1]
stream = speed["f32"][1] / speed["f32"][0]          # the f32 kernel streams memory: our B
print(f"{'':18} {'MB':>6} {'ms':>7} {'GB/s':>6} {'G weights/s':>12} {'bound by B, ms':>15}")
for fmt, (t, nb) in speed.items():
    print(f"{fmt + ' kernel':18} {nb / 1e6:6.1f} {t * 1e3:7.2f} {nb / t / 1e9:6.1f} "
          f"{n_w / t / 1e9:12.1f} {nb / stream * 1e3:15.2f}")
print(f"{'Q4_1 reference':18} {mats['Q4_1'].nbytes / 1e6:6.1f} {t_ref * 1e3:7.2f}   "
      "(dequantize the whole matrix, then BLAS)")
for fmt in ("Q8_0", "Q4_1"):
    print(f"{fmt} in memory: {8 * speed[fmt][1] / n_w:.2f} bits per weight "
          f"({speed['f32'][1] / speed[fmt][1]:.1f}x fewer bytes than f32)")

# %%
fig, ax = plt.subplots(figsize=(8, 3.2))
names = list(speed)
y = np.arange(len(names))[::-1]
ax.barh(y, [speed[n][0] * 1e3 for n in names], color=["#999", "#3f6ec6", "#e07b39"],
        height=0.55, label="measured")
ax.scatter([speed[n][1] / stream * 1e3 for n in names], y, marker="|", s=500, color="black",
           zorder=3, label="bytes / bandwidth (the memory roof)")
ax.set_yticks(y, [f"{n}  ({speed[n][1] / 1e6:.0f} MB)" for n in names])
ax.set_xlabel("ms for one decode matvec with the LM head (one thread)")
ax.set_xlim(0, max(t for t, _ in speed.values()) * 1e3 * 1.5)
ax.legend(loc="center right", fontsize=8)
ax.set_title("Fewer bytes, and the arithmetic to unpack them")
show(fig, "10_lm_head_speed")

# %% [markdown]
# Read the table with lesson 09's roofline in mind; a kernel lives under the *lower* of two roofs.
#
# * The **memory roof** (black marks): bytes divided by the bandwidth the float32 kernel reaches
#   (so float32 sits on its mark by definition). In memory the blocks are a little larger than
#   in the file: `QuantMatrix` widens the scales to float32, because the CPU kernels have no
#   float16 arithmetic, and gives Q4_0 blocks an $m = -8d$ as well, so one kernel serves both
#   4-bit formats (which is why Q4_0 is left out here: it runs as Q4_1 does). That makes 9 and 6
#   bits per weight instead of 8.5 and 5 (4.5 for Q4_0).
# * The **compute roof**: what one core can do per weight. The float32 kernel does one
#   multiply-add per weight and nothing else, so on its own it stays on the memory roof. The
#   quantized kernels do more per weight: convert a quant to float, multiply by the scale, and
#   for Q4 get two quants out of each byte. When that work takes longer than reading the
#   bytes, the kernel is compute-bound and its bar ends right of its black mark; the
#   `G weights/s` column is then the speed of its arithmetic. Whether a quantized kernel beats
#   float32 on one core depends on how cheap that arithmetic is — the reason minfer's kernels
#   are written with so much care about types.
#
# The memory roof is shared by all the cores; the compute roof grows with each core. So the
# 4-bit kernels gain the most from `prange` on a machine with cores to spare, and
# `python -m minfer bench --quant f32,q8_0,auto` measures the whole model per format, with all
# threads; `python tools/decode_floor.py` sets a whole decode step beside its memory roof here
# (every weight and the KV cache read once at the machine's best read rate) and says what share
# of it minfer reaches — on the 2-core machine in docs/benchmarks.md, 47-83%, depending on how
# busy the neighbours keep the memory.

# %% [markdown]
# ## 5 · What it costs: quality, and memory
#
# `minfer.quality.evaluate` runs the model over a held-out English text (Alice in Wonderland,
# chapter I, shipped in `minfer/data/`) in each weight format and compares its next-token
# predictions with the float32 model's: **perplexity** (lower is better), the **KL divergence**
# of the next-token distributions from float32's (0 is identical), and **top-1 agreement** (how
# often both pick the same most likely token). Its `weights_mb` column is
# `LLM(model, quant=...).weights.nbytes()`: the bytes each format keeps in memory. Here on the
# first 128 tokens only, to keep this page quick; `python -m minfer bench --quality` runs the
# whole chapter.

# %%
rows = quality.evaluate(llm.path, quants=("f32", "q8_0", "q4_1", "q4_0"), max_tokens=128)
quality.print_table(rows)

# %%
fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.4), layout="constrained")
names = [r["quant"] for r in rows]
colors = ["#999", "#3f6ec6", "#e07b39", "#c94f4f"]
a1.bar(names, [r["weights_mb"] for r in rows], color=colors)
for i, r in enumerate(rows):
    a1.text(i, r["weights_mb"] + 8, f"{r['weights_mb']:.0f} MB", ha="center", fontsize=9)
a1.set_ylabel("weights in memory (MB)")
a1.set_ylim(0, max(r["weights_mb"] for r in rows) * 1.15)
a1.set_title("resident weights per format")
a2.bar(names, [r["kl_vs_f32"] for r in rows], color=colors)
for i, r in enumerate(rows):
    a2.text(i, r["kl_vs_f32"], f"perplexity {r['perplexity']:.1f}\ntop-1 {r['top1_vs_f32']:.0%}",
            ha="center", va="bottom", fontsize=8.5)
a2.set_ylabel("KL divergence from f32 (nats/token)")
a2.set_ylim(0, max(r["kl_vs_f32"] for r in rows) * 1.3 + 1e-3)
a2.set_title("how far the predictions move")
show(fig, "10_quality")

# %% [markdown]
# Three things to see:
#
# * **Q4_1 is identical to float32 here.** This model's "float32" weights *are* the file's Q4_1
#   blocks, dequantized: the file was quantized before we got it, and `--quant q4_1` keeps its
#   blocks as they are. To measure what a format costs in general, start from the original
#   float weights (a Hugging Face checkpoint: `LLM("path/to/folder", quant="q4_1")`).
# * **Q8_0 costs almost nothing**: 255 levels per block can represent a 16-level grid nearly
#   exactly.
# * **Q4_0 costs the most**: its grid is centred on zero and does not line up with the Q4_1 grid
#   the weights already sit on, so every weight is rounded a second time — *double
#   quantization*. Converting between 4-bit formats is a bad idea; quantize once, from floats.
#
# The memory column also shows that the 4-bit formats keep the embedding table (the LM head) in
# Q8_0, as the shipped file does: 4 bits there cost more quality than anywhere else in the model.
# And Q4_0 takes as much memory as Q4_1, for the reason of section 4 (its blocks get an $m$ too).
#
# ## Your turn
#
# ```bash
# python -m minfer lesson start 10
# python -m minfer lesson check 10
# ```
#
# Tasks, each checked **bit for bit** against minfer's reference (which matches llama.cpp's):
#
# * `quantize_q8_0(w)` — float32 `[..., K]` → the raw GGUF bytes, `uint8 [..., K/32 * 34]`;
# * `dequantize_q8_0(raw, shape)` — bytes → float32 array of `shape`;
# * `dequantize_q4_1(raw, shape)` — the same for Q4_1.
#
# Mind the nibble order (low nibbles are weights 0–15 of the block, high nibbles 16–31), round
# halves away from zero, and compute the scale's inverse in float32 from the *unrounded* scale
# ($1/d$ with $d = \max|w| / 127$); only the stored $d$ is rounded to float16.
#

# %% [markdown]
# ## Advanced: byte arithmetic, prefetching, and many tokens at once
#
# Everything above is what a quantized matmul *is*. This section is about how minfer's kernels
# get close to the machine on a recent x86 CPU — AVX-512's byte dot-product instruction (VNNI),
# splitting float32 activations into int8 parts, prefetching — and when a prompt's many tokens are
# better served by dequantizing tiles for BLAS. None of it changes the function computed; skip it
# on a first reading.
#
# ### Rounding the activations too (opt-in)
#
# llama.cpp goes further: it also rounds the *activations* x to 8-bit integers, per block of 32
# with a float scale of their own ($x \approx d_x \cdot x_q$), so that a block's dot product is
# an integer one, $d\,d_x \sum_k q_k x_{q,k}$ — and a CPU with AVX-512 VNNI does 64 such byte
# products in one instruction (`vpdpbusd`). minfer has that kernel too, in
# `minfer/stages/quant_i8.py` (the few vector operations written as numba intrinsics in LLVM IR,
# with a NumPy spec beside them), behind `--activations int8`. It is not the default, because it
# is no longer the function the weights describe: rounding x costs about 1% of each output's
# scale. On a 2-core machine it decoded 10-23% faster than the float kernels end to end
# (`python -m minfer bench --activations f32,int8`; docs/benchmarks.md has the figures, and the
# quality it costs, measured).

# %%
from minfer.stages import quant_i8

if quant_i8.has_vnni():
    exact = quant.quant_linear(xq, Q)                       # float32 activations: the reference
    rounded = quant_i8.quant_linear_i8(xq, Q)               # int8 activations, VNNI kernel
    spec = quant_i8.quant_linear_i8_reference(xq, Q)        # ... and its NumPy spec
    print(f"int8 kernel vs its spec:       {np.abs(rounded - spec).max() / np.abs(spec).max():.1e}")
    print(f"int8 activations vs float32:   {np.abs(rounded - exact).max() / np.abs(exact).max():.1e}"
          " (of the largest output)")
else:
    print("this CPU has no AVX-512 VNNI: the int8-activation kernels cannot run here")

# %% [markdown]
# ### The same instruction, without the rounding: three parts
#
# One int8 number per value keeps ~7 bits of x. Three keep ~21: per block, round
# $r = 127\,x / \max|x|$ to $1/128^2$ of a step, $X = \mathrm{round}(128^2 r)$, and write $X$ in
# base 128: $X = 128^2 q_1 + 128 q_2 + q_3$ with $q_2, q_3$ in −64..63 and $q_1$ in −127..127.
# $x = d_x X$ to within $2^{-21}$ of the block's largest value — float32 itself keeps $2^{-24}$
# of each value. Each part goes through `vpdpbusd`, and the three integer sums combine
# exactly, $(s_1 \cdot 128 + s_2) \cdot 128 + s_3$, before the one conversion to float — the
# instruction adds its products onto whatever its register holds, so each part's go onto the
# sum so far, shifted left by 7 bits, with no separate add. Three byte dot products per 64 weight bytes still cost fewer instructions than turning
# 128 nibbles into floats, so on a CPU with VNNI this is how minfer's **default** (float32
# activations) decodes quantized weights — 8-bit ones too, since their kernels began sending
# the rows they prefetch to L2 rather than L1 (a Q8_0 decode step 0.87x the float kernel's
# time), and Q8_0 prompts take 4 rows x 2 tokens a step so that every load serves 8 dot
# products: the same function as the float kernels, to the same ~1e-6 — measured below against
# float64, and in the tests against Hugging Face transformers.

# %%
if quant_i8.has_vnni():
    exact64 = xq.astype(np.float64) @ Q.dequantize().astype(np.float64).T
    scale = np.abs(exact64).max()
    three = quant_i8.quant_linear_i8(xq, Q, limbs=3)          # x split into three int8 parts
    floats = quant._q4_matmul(xq, Q.qs, Q.d, Q.m)              # the float kernel
    print(f"three int8 parts vs float64: {np.abs(three - exact64).max() / scale:.1e}")
    print(f"float kernel vs float64:     {np.abs(floats - exact64).max() / scale:.1e}")
    print(f"one int8 part vs float64:    {np.abs(rounded - exact64).max() / scale:.1e}")

# %% [markdown]
# ### Sixteen rows in one instruction: panels
#
# The kernels above give one output at a time: a row's integer sums land in the 16 lanes of a
# register (4 blocks, 4 lanes each), and every row ends with a sum across those lanes. Repack
# the weights once, at load, so that one 64-byte vector holds 4 consecutive weights of each of
# **16 rows** (a *panel*), and `vpdpbusd` against 4 values of x copied into every lane gives
# lane $r$ row $r$'s partial sum: 16 outputs accumulate side by side, no sum across lanes, one
# float multiply-add per block for all 16 — and each loaded vector of weights serves several
# tokens (`minfer/cpu/quant_panel.py`). The same integer sums, so the same function as the
# kernels above; with many rows — a batch of sequences, tokens to verify, a prompt — the
# weights are read once for all of them. The one-region step runs the panels with int8
# activations at any batch size, and with three parts up to about a hundred rows
# (`KernelConfig.many_rows`; at every row count on a CPU with the tile unit below, or on AMD's
# Zen 4, whose byte products go as fast as its float ones). Two details carry much of the speed
# at several rows: each
# `vpdpbusd` waits ~2 ns for its chain's previous result while the CPU can start two a cycle,
# so the kernel keeps a chain per (token, part) — 12 for 4 tokens of three parts — and advances
# them all together, one weight vector at a time; and it asks for the weights ahead (prefetch)
# on a panel's first pass, whatever the number of rows (docs/benchmarks.md, "CPU kernel details").

# %%
from minfer.cpu import quant_panel

if quant_i8.has_vnni():
    P = quant_panel.PanelMatrix(Q)                            # repacked once: 16 rows a vector
    for limbs in (1, 3):
        panels = quant_panel.quant_linear_panels(xq, P, limbs)
        spec = quant_i8.quant_linear_i8_reference(xq, Q, limbs)
        print(f"panels, {limbs} part(s), vs the spec: {np.abs(panels - spec).max() / np.abs(spec).max():.1e}")

# %% [markdown]
# ### A block of 16 rows x 16 rows in one instruction: the tile unit
#
# Xeons from Sapphire Rapids on have a matrix unit beside the vector one (AMX): eight *tile*
# registers of up to 16 rows x 64 bytes, and `tdpbsud`, which multiplies 16 rows of signed bytes
# by a tile of unsigned ones laid out 4 bytes a lane — exactly a panel's block. With x's rows
# (token, part) side by side, one instruction does what 128 `vpdpbusd` do
# (`minfer/cpu/quant_amx.py`). The catch is the scales: each block of 32 has its own, so the
# sums cannot stay in the tile across blocks; every block's 16 x 16 sums go out to memory and back
# to the vector unit, which scales and adds them. Both trips wait if done at once — a store right
# after its products waits for the tile unit to finish them, loads right after a store wait for
# it — so the loop keeps three blocks in flight: block b's products, block b - 1's sums stored,
# block b - 3's scaled. A store costs about as much for 2 rows as for 16, so the tile unit pays
# from a few rows on
# (`KernelConfig.tile_unit_rows`: a verification of several tokens, a batch, a prompt). The
# integer sums and the float steps after them are the panels' own: the numbers below agree to the
# bit.

# %%
from minfer.cpu import quant_amx

if quant_i8.has_vnni() and quant_amx.available():
    x8 = rng.standard_normal((8, Q.shape[1])).astype(np.float32)     # 8 tokens, 24 rows of parts
    xi = quant_panel.prepare_x(x8, Q.fmt == "Q8_0", 3)
    tiles = np.zeros((8, 16 * P.qp.shape[0]), dtype=np.float32)      # [8, O rounded up to 16]
    quant_amx.tile(xi, P.qp, P.d, P.m, 0, P.qp.shape[0], tiles, 0, quant_amx.workspace())
    vector = quant_panel.quant_linear_panels(x8, P, 3)
    print(f"tile unit vs vector panels: {np.abs(tiles[:, :Q.shape[0]] - vector).max() / np.abs(vector).max():.1e}")
else:
    print("this CPU has no AMX tile unit: the vector panels run every step")

# %% [markdown]
# ### Many tokens at once: the kernels, or dequantize + sgemm?
#
# A prompt's tokens all meet the same weights. The matvec kernels take them one after another
# while a tile of rows sits in cache: their cost grows with the token count T, at the same price
# per token. The other way — turn a tile of rows into float32 once and hand it to BLAS's sgemm —
# pays for that dequantization per call, whatever T is, and then very little per token. So each
# wins on its own side of a crossover. One of the model's matrices, per token, on one thread:

# %%
W = llm.weights.layers[0].w_up                              # Q4_1, 1536 x 576
Wf = W.float_scales()


def kernels(x):                                             # the kernel the engine would run
    if llm.kernels.split_x:
        return quant_i8.quant_linear_i8(x, W, limbs=3)      # three int8 parts (VNNI)
    return quant._q4_matmul(x, Wf.qs, Wf.d, Wf.m)           # float kernel


print(f"{'tokens':>6} {'kernels, us/token':>18} {'tiles + sgemm, us/token':>24}")
for T in (1, 16, 64, 256):
    xt = rng.standard_normal((T, W.shape[1])).astype(np.float32)
    tk, _ = clock(kernels, xt, budget=0.1, most=20)
    tt, _ = clock(quant._tiled_gemm, xt, W, llm.kernels.tile_rows, budget=0.1, most=20)
    print(f"{T:6d} {tk / T * 1e6:18.1f} {tt / T * 1e6:24.1f}")
print(f"minfer hands {W.fmt} matmuls to the tiles from {llm.kernels.sgemm_min_rows(W.fmt)} tokens on")

# %% [markdown]
# For one matrix the tiles catch up somewhere between 16 and 256 tokens. minfer's switch,
# `KernelConfig.sgemm_min_rows(fmt)`, was measured on the whole model instead (prefill tokens/s on two
# threads, docs/benchmarks.md): there the kernels run inside the one compiled layer loop
# (`cpu/model.py` calls `cpu/region.py`, which keeps its threads in one parallel region), while the tiles' path goes
# through the layers in Python, a call per stage, and hands its tiles to Python threads — so
# the kernels win for longer, up to ~224 tokens with the three int8 parts (~112 for Q8_0 there,
# ~48 with the float kernels, which are slower per token).

# %% [markdown]
# **Next:** [11 · GPU kernels](11_gpu.md) — the same stages on an NVIDIA GPU.
