# %% [markdown]
# # 11 · GPU kernels with numba.cuda
#
# Every stage module in `minfer/stages/` ends with a third chapter: after the NumPy reference and
# the Numba CPU kernel comes a **numba.cuda** kernel, written in the same Python. This lesson
# reads them: how a GPU runs a kernel (grid, blocks, threads), how two of minfer's kernels divide
# the work among their threads, why at this model size the number of *launches* matters more
# than the arithmetic, what crosses the bus in a step, and how sampling runs on the device
# without sorting. Modules: the end of `minfer/stages/rmsnorm.py` (and of each stage module),
# `minfer/gpu/linear.py` (the fused matmuls), `minfer/gpu/model.py` (the whole step),
# `minfer/gpu/sampling.py`.
#
# !!! warning "This page ran on numba's CUDA simulator"
#     The machine that built this site has no GPU. So the first cell sets
#     `NUMBA_ENABLE_CUDASIM=1` *before numba is imported* (numba picks the simulator or the real
#     GPU at its first import). The simulator runs every GPU thread as a Python thread: the
#     kernels compute exactly what they compute on a GPU, indexing, barriers and shared memory
#     included, but a thousand times slower — so the shapes here are tiny, and no timing on this
#     page says anything about a GPU. On a machine with an NVIDIA GPU,
#     `NUMBA_ENABLE_CUDASIM=0 python lessons/11_gpu.py` runs the same cells on the GPU.

# %%
import os

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")    # before numba is imported (see above)

import collections
import contextlib
import inspect
import textwrap
import time

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import FancyArrowPatch, Rectangle
from numba import config, cuda

import minfer
from minfer.backends import numpy_ops
from minfer.batch import make_batch
from minfer.classroom import show
from minfer.config import ModelConfig
from minfer.gpu import linear as gpu_linear, sampling as gpu_sampling
from minfer.gpu.model import CudaModel, Launch
from minfer.model import LayerWeights, Transformer, Weights
from minfer.sampling import SamplingParams, sample
from minfer.stages import attention, embedding, kvcache, linear, mlp, rmsnorm, rope
from minfer.engine.block_manager import BlockManager
from minfer.gpu.linear import linear_cuda as linear_gpu, qkv_cuda, swiglu_cuda
from minfer.stages.device import DeviceMatrix
from minfer.stages.quant import QuantMatrix, quant_linear

SIM = bool(config.ENABLE_CUDASIM)
L = Launch.for_here()          # block shapes: full warps on a GPU, a few threads on the simulator
print("running on:", "numba's CUDA simulator (threads are Python threads)" if SIM
      else cuda.get_current_device().name)
print(L)
rng = np.random.default_rng(0)


def randn(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# %% [markdown]
# ## 1 · Grid, block, thread
#
# A CUDA kernel is one function that *every thread of a launch* runs. A launch names its shape:
#
#     kernel[grid, block](arguments)         # grid: how many blocks; block: threads per block
#
# Inside, each thread finds out who it is from `cuda.blockIdx.x` (which block), `cuda.threadIdx.x`
# (which thread of its block) and `cuda.blockDim.x` (how many threads a block has), and from that,
# which data is its own. The blocks of a launch are independent: the GPU runs them in any order,
# many at a time, one block on one of its ~100 streaming multiprocessors. The threads of *one*
# block can cooperate: they share a small, fast **shared memory** (`cuda.shared.array`, tens of
# KB), and `cuda.syncthreads()` is a barrier that no thread of the block passes before all have
# reached it. Threads run in groups of 32, *warps*, that execute each instruction together.
#
# minfer's kernels mostly follow one pattern: **one block per output row** (a token for RMSNorm
# and the embedding, a (token, head) pair for attention, a sequence for sampling), and the block's
# threads **stride over the row**: thread `tid` takes columns `tid, tid + n, tid + 2n, ...`. Here
# is the pattern on a small job — each row's **sum of squares**, the first half of RMSNorm:
#
#     grid (T,)   block (n,)   one block per row; n a power of two, at most 1024
#     x [T, D] -> out [T]      out[t] = sum over i of x[t, i]²

# %%
@cuda.jit
def sum_of_squares_kernel(x, out):
    part = cuda.shared.array(1024, np.float32)       # one partial sum per thread of the block
    t, tid, n = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    ss = np.float32(0.0)
    for i in range(tid, x.shape[1], n):              # this thread's columns of row t
        ss += x[t, i] * x[t, i]
    part[tid] = ss
    cuda.syncthreads()                               # every partial sum is written
    s = n // 2
    while s > 0:                                     # tree: threads 0..s-1 add s..2s-1
        if tid < s:
            part[tid] += part[tid + s]
        cuda.syncthreads()
        s //= 2
    if tid == 0:
        out[t] = part[0]

# %% [markdown]
# Three things that a NumPy programmer has to unlearn:
#
# * **No return value.** A kernel writes into an output array it is given (`out`), and
#   allocates nothing but per-thread locals and per-block shared memory, of sizes fixed when it
#   is compiled (`cuda.shared.array(1024, float32)` is the largest block a GPU allows).
# * **Every thread runs every line.** `ss` is a different variable in each thread; `part` is one
#   array shared by the block. The reduction is a **tree**: with 8 threads, threads 0–3 add
#   `part[4..7]` into `part[0..3]`, threads 0–1 add `part[2..3]`, thread 0 adds `part[1]`: three
#   steps instead of seven additions one after another.
# * **Barriers belong to the block.** The `cuda.syncthreads()` inside the loop is reached by all
#   threads (it is *outside* the `if tid < s`): a barrier that some threads skip hangs the block.
#
# Launch it on three token rows of 40 columns, with 8 threads per block, and compare with NumPy.
# Device arrays first: `cuda.to_device` copies to the GPU (on the simulator: to another NumPy
# array), `copy_to_host` copies back.

# %%
x, w = randn(3, 40), randn(40) + 1
dx = cuda.to_device(x)
dout = cuda.device_array(3, np.float32)
t0 = time.perf_counter()
sum_of_squares_kernel[3, 8](dx, dout)                            # grid (3,), block (8,)
cuda.synchronize()
t_launch = time.perf_counter() - t0
diff = np.abs(dout.copy_to_host() - (x.astype(np.float64) ** 2).sum(axis=1)).max()
print(f"kernel vs NumPy: max |difference| {diff:.1e}")
print(f"one launch, 3 blocks x 8 threads: {t_launch * 1e3:.0f} ms"
      + (" on the simulator (a GPU: a few microseconds)" if SIM else ""))

# %%
fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 3.6), gridspec_kw=dict(width_ratios=[2.2, 1]))
T_, D_, n_ = 3, 40, 8
colors = plt.cm.tab10(np.arange(n_))
for t in range(T_):
    for i in range(D_):
        a1.add_patch(Rectangle((i, T_ - 1 - t), 1, 1, facecolor=colors[i % n_], edgecolor="white"))
        if t == 0:
            a1.text(i + 0.5, T_ + 0.15, str(i % n_), ha="center", fontsize=7, color="#444")
    a1.text(-0.4, T_ - 0.5 - t, f"block {t} → row {t}", ha="right", va="center", fontsize=9)
a1.text(D_ / 2, T_ + 0.75, "thread that reads (and writes) each column: tid = column mod 8",
        ha="center", fontsize=9)
a1.set_xlim(-7, D_ + 0.2)
a1.set_ylim(-0.9, T_ + 1.2)
a1.text(D_ / 2, -0.55, "columns 0 … 39 of x: thread 3 takes 3, 11, 19, 27, 35", ha="center",
        fontsize=8.5, color="#444")
a1.axis("off")
a1.set_title("grid (3,) × block (8,): one block per token row")
for level, s in enumerate([8, 4, 2, 1]):                 # the tree: 8 partial sums -> 1
    y = 3 - level
    for j in range(s):
        a2.add_patch(Rectangle((j, y), 0.8, 0.6, facecolor=colors[j], edgecolor="white"))
        a2.text(j + 0.4, y + 0.3, f"p{j}", ha="center", va="center", fontsize=8, color="white")
    if s > 1:
        for j in range(s // 2):
            for src_j in (j, j + s // 2):
                a2.add_patch(FancyArrowPatch((src_j + 0.4, y), (j + 0.4, y - 0.4),
                                             arrowstyle="-|>", mutation_scale=8, color="#666", lw=0.8))
        who = "thread 0 adds" if s == 2 else f"threads 0–{s // 2 - 1} add"
        a2.text(8.2, y - 0.2, f"{who}, then syncthreads", fontsize=8, va="center", color="#444")
a2.set_xlim(-0.2, 13)
a2.set_ylim(-0.2, 3.8)
a2.axis("off")
a2.set_title("shared-memory tree: log2(8) = 3 steps")
show(fig, "11_rmsnorm_threads")

# %% [markdown]
# RMSNorm is this kernel and one step more: once `part[0]` holds the row's sum of squares, every
# thread (not only thread 0) can compute $1/\sqrt{\text{mean} + \varepsilon}$ from it and scale
# its own columns, times the gain $w$. `minfer/stages/rmsnorm.py` has that kernel — writing it is
# this lesson's exercise (the end of the page). In the cuda backend it is never launched: RMSNorm
# is folded into the matmul that follows it (section 3 says why); it stays as the plain version of
# the same arithmetic, tested like the others.
#
# ## 2 · The fused quantized matvec: who reads which bytes
#
# The matmuls are where the bytes are: the weights, in their file's blocks (lesson 10), read once
# per step. `gpu/linear.py` has one inner loop for all of them, `_pair_dots`; its docstring and
# the comment blocks above the kernels say how the threads share the work:

# %%
head = inspect.getsource(gpu_linear).split('"""')[1]
print(head[head.index("All three kernels"):head.index("Weights stay")].strip())
print()
print(head[head.index("Weights stay"):].strip())
print()
block = inspect.getsource(gpu_linear)
print(block[block.index("# linear_kernel: out[t]"):block.index("@cuda.jit\ndef linear_kernel")].strip())

# %% [markdown]
# So for a decode matvec (one token): a **group** of `lanes` threads — on a GPU, one warp of
# 32 — owns a pair of output rows. The row's quants are read as 32-bit words; in Q4, **word
# `u` is a unit of 8 weights** (4 bytes, two nibbles each), and lane `l` takes words
# `l, l + lanes, l + 2·lanes, ...`. Consecutive lanes read consecutive words: a warp's 32 reads
# land in one 128-byte stretch of memory, which the GPU serves in one transaction (reads are
# *coalesced*). Each lane dequantizes its word into 8 registers, multiplies them with the 8
# matching elements of `x` for every token of the tile, and keeps running sums; at the end a
# reduction in shared memory adds up the lanes.
#
# Which columns does word `u` hold? Block `b = u // 4` (16 bytes of quants = 4 words), bytes
# `i = 4u .. 4u+3` of the row; lesson 10's nibble order puts the low nibble of byte `i` at
# column `32b + i mod 16` and the high nibble 16 columns further. The kernel's `_unpack8`, redone
# in NumPy for every word of a Q4_1 matrix, against the reference dequantization:

# %%
Wq = QuantMatrix.from_float(randn(6, 128, scale=0.1), "Q4_1")
words = Wq.qs.view(np.uint32)                        # [O, K/8]: what DeviceMatrix uploads
W_ref = Wq.dequantize()                              # [O, K] float32
W_mine = np.zeros_like(W_ref)
for r in range(Wq.shape[0]):
    for u in range(Wq.shape[1] // 8):
        blk = u >> 2
        k0 = 32 * blk + 4 * (u & 3)                  # the column of the word's first low nibble
        for j in range(4):
            byte = (int(words[r, u]) >> (8 * j)) & 255
            W_mine[r, k0 + j] = Wq.d[r, blk] * (byte & 15) + Wq.m[r, blk]
            W_mine[r, k0 + j + 16] = Wq.d[r, blk] * (byte >> 4) + Wq.m[r, blk]
print("words:", words.shape, words.dtype, "  unpacked by hand == dequantize:",
      np.array_equal(W_mine, W_ref))

# %%
lanes_fig, K_fig = 4, 128
fig, ax = plt.subplots(figsize=(13, 3.9))
lc = plt.cm.Set2(np.arange(lanes_fig))
for u in range(K_fig // 8):                          # the row's 16 words (64 bytes of quants)
    lane = u % lanes_fig
    ax.add_patch(Rectangle((u * 8, 3), 8, 1, facecolor=lc[lane], edgecolor="white", lw=2))
    ax.text(u * 8 + 4, 3.5, f"word {u}\nlane {lane}", ha="center", va="center", fontsize=7.5)
    blk, k0 = u >> 2, 32 * (u >> 2) + 4 * (u & 3)
    for k in list(range(k0, k0 + 4)) + list(range(k0 + 16, k0 + 20)):
        ax.add_patch(Rectangle((k, 0), 1, 1, facecolor=lc[lane], edgecolor="white", lw=0.5))
    if lane == 1 and u < 8:
        for kk in (k0 + 2, k0 + 18):
            ax.add_patch(FancyArrowPatch((u * 8 + 4, 2.95), (kk, 1.05), arrowstyle="-|>",
                                         mutation_scale=9, color="#555", lw=0.9))
for b in range(K_fig // 32):
    ax.plot([32 * b, 32 * b], [-0.1, 4.1], color="black", lw=1.2)
    ax.text(32 * b + 16, 4.25, f"block {b}: 4 words", ha="center", fontsize=8.5)
    ax.text(32 * b + 8, -0.45, "low nibbles", ha="center", fontsize=8, color="#555")
    ax.text(32 * b + 24, -0.45, "high nibbles", ha="center", fontsize=8, color="#555")
ax.text(-1, 3.5, "quants of row r\n(uint32 words)", ha="right", va="center", fontsize=9)
ax.text(-1, 0.5, "columns 0 … 127\n(weights)", ha="right", va="center", fontsize=9)
ax.set_xlim(-16, K_fig + 1)
ax.axis("off")
ax.text(K_fig / 2, -1.0, "(each block's d and m are float32, in arrays of their own: "
        "d[r, b], m[r, b])", ha="center", fontsize=8.5, color="#555")
ax.set_ylim(-1.3, 4.7)
ax.set_title(f"One Q4_1 row (K = {K_fig}) read by a group of {lanes_fig} lanes (a GPU uses 32): "
             "lane l takes words l, l + 4, …;\neach word holds 8 weights: 4 low-nibble columns "
             "and the 4 high-nibble columns 16 further on")
show(fig, "11_q4_lanes")

# %% [markdown]
# Now the real kernel, in its fused form: the LM head's `logits = W · rmsnorm(x, g)` with the
# norm folded in — three token rows, and a prefill of nine (two tiles of `TB = 8` tokens) — on
# Q4_1 blocks, against the NumPy reference (`rmsnorm`, then lesson 10's `quant_linear`):

# %%
Wd = DeviceMatrix.upload(Wq)                          # once: the blocks stay on the device
g = randn(128) + 1
for T in (3, 9):
    xt = randn(T, 128)
    out = cuda.device_array((T, 6), np.float32)
    linear_gpu(cuda.to_device(xt), Wd, out, cuda.to_device(np.arange(T, dtype=np.int32)),
               norm=cuda.to_device(g), eps=1e-5, lanes=L.lanes, groups=L.groups)
    want = quant_linear(rmsnorm.rmsnorm(xt, g, 1e-5), Wq)
    print(f"T={T}: fused norm + Q4_1 matmul vs reference, max |difference| "
          f"{np.abs(out.copy_to_host() - want).max():.1e}")

# %% [markdown]
# Why does the norm fold in? RMSNorm multiplies each token by one number, $1/\mathrm{rms}(x)$,
# and by the gain $g$ elementwise; a matrix product is linear, so
#
# $$ W\,\Big(g \odot \frac{x}{\mathrm{rms}(x)}\Big) \;=\; \frac{W\,(g \odot x)}{\mathrm{rms}(x)}, \qquad \mathrm{rms}(x) = \sqrt{\tfrac{1}{K}\textstyle\sum_k x_k^2 + \epsilon} $$
#
# The lanes already read every $x_k$ for their dot products; adding $x_k^2$ to one more
# accumulator costs nothing, and the division happens once per output at the end. The same
# trick, with a different ending (the *epilogue*), gives the other fused kernels: `qkv_kernel`
# rotates each pair of rows with RoPE and writes k and v straight into the cache; `swiglu_kernel`
# computes a gate row and its up row together and writes `silu(gate) * up`; with
# `accumulate=True`, `linear_kernel` adds $W_o a$ and $W_{down} h$ into the residual stream.
#
# ## 3 · Why fuse: the launches are the bottleneck
#
# A GPU does one of SmolLM2's small matmuls (576 × 576 weights, ~250 KB of Q4_1 blocks on the
# device) in a few microseconds. Launching it *from Python* costs more: numba-cuda checks the arguments' types,
# packs them, and calls the driver — **about 40 µs per launch** (on an H200, minfer's kernels
# launched one by one took 40-90 µs each; a simulator cannot measure it). The unfused step is one kernel per
# operation. Let us count, with a small wrapper that counts every `kernel[grid, block]` of
# minfer's modules:

# %%
KERNEL_MODULES = [embedding, rmsnorm, rope, kvcache, attention, mlp, gpu_linear, gpu_sampling]


@contextlib.contextmanager
def count_launches():
    """Count the launches of minfer's kernels (module attributes named *_kernel) in the block."""
    counts, saved = collections.Counter(), []

    class Counted:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, launch_config):         # kernel[grid, block, stream] is one launch
            counts[self.name] += 1
            return self.kernel[launch_config]

    for mod in KERNEL_MODULES:
        for name, obj in list(vars(mod).items()):
            if name.endswith("_kernel") and hasattr(obj, "__getitem__"):
                saved.append((mod, name, obj))
                setattr(mod, name, Counted(name, obj))
    try:
        yield counts
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


# %% [markdown]
# One transformer layer for a prefill of 4 tokens, twice: first **unfused**, each operation its
# own launch, with the standalone kernels of each stage module (`rmsnorm_kernel`, a plain
# `linear_kernel` per projection, `rope_kernel`, `kv_write_kernel`, `attention_kernel`,
# `silu_mul_kernel`); then **fused**, as the cuda backend runs it. A tiny layer (d = 32, two
# query heads sharing one kv head of 16, Q4_1 weights):

# %%
D, Hq, Hkv, hd, F, T, bs = 32, 2, 1, 16, 32, 4, 4
eps = 1e-5
lw = {k: QuantMatrix.from_float(randn(o, i, scale=1 / np.sqrt(i)), "Q4_1") for k, (o, i) in dict(
    wq=(Hq * hd, D), wk=(Hkv * hd, D), wv=(Hkv * hd, D), wo=(D, Hq * hd),
    wg=(F, D), wu=(F, D), wd=(D, F)).items()}
gains = {k: randn(D, scale=0.1) + 1 for k in ("attn", "ffn")}
x0 = randn(T, D)
pos = np.arange(T, dtype=np.int32)
slots = pos.copy()                                    # block 0 of the pool: slots 0..3
row_seq = np.zeros(T, np.int32)
tables = np.zeros((1, 1), np.int32)
cos, sin = rope.rope_angles(np.arange(16), hd, 1e4)
d = {k: cuda.to_device(v) for k, v in dict(pos=pos, slots=slots, row_seq=row_seq, tables=tables,
                                          cos=cos, sin=sin, ar=np.arange(T, dtype=np.int32),
                                          **{f"g_{k}": v for k, v in gains.items()}).items()}
W = {k: DeviceMatrix.upload(v) for k, v in lw.items()}
W["qkv"], W["gu"] = DeviceMatrix.upload([lw["wq"], lw["wk"], lw["wv"]]), DeviceMatrix.upload([lw["wg"], lw["wu"]])
mm = dict(lanes=L.lanes, groups=L.groups)


def layer_unfused():
    x = cuda.to_device(x0)
    cache_k = cuda.to_device(np.zeros((1, 1, bs, Hkv, hd), np.float32))   # [layers, blocks, bs, Hkv, hd]
    cache_v = cuda.to_device(np.zeros((1, 1, bs, Hkv, hd), np.float32))
    n, q, k, v = (cuda.device_array(s, np.float32) for s in ((T, D), (T, Hq * hd), (T, Hkv * hd), (T, Hkv * hd)))
    a, gt, up, h = (cuda.device_array(s, np.float32) for s in ((T, Hq * hd), (T, F), (T, F), (T, F)))
    rmsnorm.rmsnorm_cuda(x, d["g_attn"], eps, n, threads=L.rows)
    for Wm, o in ((W["wq"], q), (W["wk"], k), (W["wv"], v)):
        linear_gpu(n, Wm, o, d["ar"], **mm)
    rope.rope_cuda(q.reshape(T, Hq, hd), d["pos"], d["cos"], d["sin"], threads=L.rows)
    rope.rope_cuda(k.reshape(T, Hkv, hd), d["pos"], d["cos"], d["sin"], threads=L.rows)
    kvcache.kv_write_cuda(cache_k[0], cache_v[0], k.reshape(T, Hkv, hd), v.reshape(T, Hkv, hd),
                          d["slots"], threads=L.rows)
    attention.paged_attention_cuda(q, cache_k, cache_v, 0, d["row_seq"], d["pos"], d["tables"], a,
                                   threads=L.attn)
    linear_gpu(a, W["wo"], x, d["ar"], accumulate=True, **mm)          # x += W_o a
    rmsnorm.rmsnorm_cuda(x, d["g_ffn"], eps, n, threads=L.rows)
    linear_gpu(n, W["wg"], gt, d["ar"], **mm)
    linear_gpu(n, W["wu"], up, d["ar"], **mm)
    mlp.silu_mul_cuda(gt, up, h, threads=L.rows)
    linear_gpu(h, W["wd"], x, d["ar"], accumulate=True, **mm)          # x += W_down h
    return x.copy_to_host()


def layer_fused():
    x = cuda.to_device(x0)
    cache_k = cuda.to_device(np.zeros((1, 1, bs, Hkv, hd), np.float32))
    cache_v = cuda.to_device(np.zeros((1, 1, bs, Hkv, hd), np.float32))
    q, a, h = (cuda.device_array(s, np.float32) for s in ((T, Hq * hd), (T, Hq * hd), (T, F)))
    qkv_cuda(x, d["g_attn"], eps, W["qkv"], d["pos"], d["slots"], d["cos"], d["sin"], q,
             cache_k, cache_v, 0, **mm)
    attention.paged_attention_cuda(q, cache_k, cache_v, 0, d["row_seq"], d["pos"], d["tables"], a,
                                   threads=L.attn)
    linear_gpu(a, W["wo"], x, d["ar"], accumulate=True, **mm)
    swiglu_cuda(x, d["g_ffn"], eps, W["gu"], h, **mm)
    linear_gpu(h, W["wd"], x, d["ar"], accumulate=True, **mm)
    return x.copy_to_host()


def layer_reference():                                # the NumPy stages, as model.py wires them
    kc, vc = np.zeros((1, bs, Hkv, hd), np.float32), np.zeros((1, bs, Hkv, hd), np.float32)
    batch = make_batch([(list(range(T)), 0, [0])], bs)
    n = rmsnorm.rmsnorm(x0, gains["attn"], eps)
    c, s = cos[pos], sin[pos]
    q = rope.rope(linear.linear(n, lw["wq"]).reshape(T, Hq, hd), c, s)
    k = rope.rope(linear.linear(n, lw["wk"]).reshape(T, Hkv, hd), c, s)
    kvcache.kv_write(kc, vc, k, linear.linear(n, lw["wv"]).reshape(T, Hkv, hd), batch.slot_mapping)
    x = x0 + linear.linear(attention.paged_attention(q, kc, vc, batch).reshape(T, -1), lw["wo"])
    n = rmsnorm.rmsnorm(x, gains["ffn"], eps)
    return x + linear.linear(mlp.silu(linear.linear(n, lw["wg"])) * linear.linear(n, lw["wu"]), lw["wd"])


want = layer_reference()
for name, run in (("unfused", layer_unfused), ("fused", layer_fused)):
    with count_launches() as counts:
        got = run()
    print(f"{name}: {sum(counts.values())} launches, vs the NumPy layer: max |difference| "
          f"{np.abs(got - want).max():.1e}")
    print("   ", ", ".join(f"{k} x{v}" for k, v in counts.items()))
    if name == "unfused":
        per_layer_unfused = sum(counts.values())
    else:
        per_layer_fused = sum(counts.values())

# %% [markdown]
# The same layer, the same numbers, 14 launches or 5. (The residual adds are already folded into
# `W_o` and `W_down` in both; separate add kernels would make the unfused layer 16.) A whole
# decode step adds the embedding, the LM head and sampling. The cuda backend's `CudaModel` runs
# here on a tiny two-layer model with random weights — a prefill, then one decode step whose
# launches we count — and its logits are checked against the NumPy model:

# %%
c = ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                ffn_dim=32, rms_eps=1e-5, rope_theta=1e4, max_seq_len=64)
c.tie_embeddings = True


def q41(o, i):
    return QuantMatrix.from_float(randn(o, i, scale=1 / np.sqrt(i)), "Q4_1")


layers = [LayerWeights(randn(32, scale=0.1) + 1, q41(32, 32), q41(16, 32), q41(16, 32), q41(32, 32),
                       randn(32, scale=0.1) + 1, q41(32, 32), q41(32, 32), q41(32, 32))
          for _ in range(c.n_layers)]
emb = QuantMatrix.from_float(randn(40, 32), "Q8_0")
tiny = Weights(emb, layers, randn(32, scale=0.1) + 1, emb)
ref, gpu = Transformer(c, tiny, numpy_ops()), CudaModel(c, tiny)
caches = [ref.new_cache(n_blocks=4, block_size=4), gpu.new_cache(n_blocks=4, block_size=4)]
bms = [BlockManager(cache) for cache in caches]
prompt = [5, 9, 33, 7, 12]
for bm in bms:
    bm.ensure(0, len(prompt) + 1)
prefill = make_batch([(prompt, 0, bms[0].tables[0])], 4)
step = make_batch([([11], len(prompt), bms[0].tables[0])], 4)
logits_ref = ref.forward(prefill, caches[0])                     # [1, V]: the prompt's last row
logits_gpu = gpu.forward(prefill, caches[1])                     # copied back to the host
print(f"prefill logits, CudaModel vs the NumPy model: max |difference| "
      f"{np.abs(logits_gpu - logits_ref).max():.1e}")
greedy = SamplingParams(temperature=0)
with count_launches() as counts:
    ids = gpu.forward_sample(step, caches[1], [greedy], [None])   # sampled on the device
logits_ref = ref.forward(step, caches[0])
launches_tiny = sum(counts.values())
print(f"decode step of a {c.n_layers}-layer model: {launches_tiny} launches")
print("   ", ", ".join(f"{k} x{v}" for k, v in counts.items()))
print(f"token sampled on the device: {ids[0]}, arg-max of the NumPy model's logits: "
      f"{int(np.argmax(logits_ref[0]))}")

# %% [markdown]
# 5 per layer, plus embedding, LM head and sampling. For SmolLM2-135M's 30 layers, at ~40 µs a
# launch, that sets a ceiling on one stream's decode speed whatever the GPU — before a single
# weight is read:

# %%
from minfer.weights.synthetic import SMOLLM2_135M, hf_config   # noqa: E402

big = ModelConfig.from_hf(hf_config(**SMOLLM2_135M))
US = 40e-6                                          # seconds per launch from Python (measured on an H200)
rows = {"unfused\n(one op, one kernel)": big.n_layers * per_layer_unfused + 3,
        "fused\n(minfer's kernels)": big.n_layers * per_layer_fused + 3,
        "fused + CUDA graph\n(decode)": 1}
print(f"SmolLM2-135M: {big.n_layers} layers")
for name, n in rows.items():
    print(f"  {name.splitlines()[0]:20} {n:4d} launch{'es' if n > 1 else '  '} per token = "
          f"{n * US * 1e3:5.2f} ms -> at most {1 / (n * US):6.0f} tok/s from launching alone")

# %%
fig, ax = plt.subplots(figsize=(9, 3.3))
names = list(rows)
yy = np.arange(len(names))[::-1]
ax.barh(yy, [rows[n] for n in names], color=["#c94f4f", "#e07b39", "#3f6ec6"], height=0.55)
for y_, n in zip(yy, names):
    ax.text(rows[n] + 8, y_, f"{rows[n]} launch{'es' if rows[n] > 1 else ''} · "
            f"{rows[n] * US * 1e3:.2f} ms per token", va="center", fontsize=9)
ax.set_yticks(yy, names)
ax.set_xlim(0, max(rows.values()) * 1.75)
ax.set_xlabel("kernel launches per decode step, SmolLM2-135M (30 layers); 40 µs each")
ax.set_title("Launches per token: the cost before any arithmetic")
show(fig, "11_launches")

# %% [markdown]
# ## 4 · Arrays stay where they compute
#
# A GPU reads its own memory at terabytes per second; the bus from the host (PCIe) carries some
# tens of GB/s. So the cuda backend moves data across once: at load, every weight goes to the
# device in its file's own blocks (`DeviceMatrix.upload`), and the KV-cache pool is allocated
# there (`DeviceKVCache`). Per step, only the batch's integers go in — token ids, positions,
# cache slots, which sequence each row belongs to, which rows want logits, and the block tables,
# packed into one buffer and copied in one go (`_Work.upload` in `gpu/model.py`) — and the
# sampled ids come back. For the real model, one decode step of one sequence:

# %%
llm = minfer.LLM(backend="numba", quiet=True)       # only to weigh the real model's blocks
cfg = llm.config
width = -(-cfg.max_seq_len // 16)                   # block-table width: 16 tokens per block
B = 1
per_step_in = (5 * B + B * width) * 4 + B * gpu_sampling.N_PARAMS * 4
per_step_out = B * 4
kv_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4
weights_b = llm.weights.nbytes()
print(f"once, at load:    weights {weights_b / 1e6:7.1f} MB (the file's Q4_1 / Q8_0 blocks, "
      f"scales as float32)")
print(f"                  KV cache {kv_per_token / 1e3:6.1f} KB per token of context, "
      f"allocated on the device")
print(f"every step, in:   {per_step_in:7,d} bytes (5 ints per token, a block table of "
      f"{width} blocks, 5 sampling parameters)")
print(f"every step, out:  {per_step_out:7,d} bytes (the sampled id)")
print(f"  logits instead: {cfg.vocab_size * 4:7,d} bytes (only when asked for, e.g. LLM.logits)")
print(f"  weights again:  {weights_b:,d} bytes: at ~25 GB/s over PCIe "
      f"{weights_b / 25e9 * 1e3:.1f} ms, every token")

# %% [markdown]
# ## 5 · CUDA graphs: one launch per decode step
#
# Fusion brings SmolLM2 from ~420 launches to 153 per step; a **CUDA graph** brings it to one.
# The backend *records* a decode step once — the 153 launches with their arguments go into a
# graph instead of running — and then *replays* the whole graph with one call per token. The
# GPU still runs 153 kernels, back to back, but Python pays for one launch.
#
# A recording fixes every argument, device addresses included. So a graph's inputs must always
# be in the same place: the batch goes into fixed device buffers (`_Work`), and each step only
# overwrites their contents. That works for decode because its shapes never change from step to
# step — every sequence brings one token, and the attention kernel reads each sequence's length
# from the `positions` buffer rather than from the launch. Prefill and mixed batches (other
# shapes every time) launch the kernels one by one. From `CudaModel._step`:

# %%
print(textwrap.dedent(inspect.getsource(CudaModel._step)))

# %% [markdown]
# The first decode step of each batch size runs eagerly (it compiles the kernels); the second
# records the graph; every later one replays it. The simulator has no graphs, so here the
# backend always launches eagerly (`use_graphs` is off): graph recording is one of the things
# only a real GPU can check (section 7).
#
# ## 6 · Sampling without sorting
#
# Lesson 08's top-k and top-p sort the 49,152 logits. A sort inside one thread block is slow and
# awkward; `gpu/sampling.py` avoids it with one observation: every filter keeps *all tokens
# whose logit is at least some threshold*, and the threshold is one of the logits. So find the
# threshold, not the order.
#
# What to search over? The bits of a float32, read as an integer, are in the same order as the
# floats for positive numbers and in reverse for negative ones; flipping the 31 low bits of the
# negative ones makes the order right everywhere. Then the threshold's 32-bit key can be found
# **one byte at a time, from the top** (a *radix select*): a histogram of the keys' first byte
# says which byte the threshold has — walk the 256 bins down from the top, adding up counts (for
# top-k) or probabilities (for top-p), until the goal is reached. The next pass looks only at
# the tokens whose first byte is that one, and makes a histogram of their second byte; four
# passes give the exact key. On the GPU each pass is every thread on its share of the
# vocabulary, adding into a 256-bin histogram in shared memory (atomic adds). A binary search
# over the keys, minfer's first version, took 32 passes: 0.66 ms a token on an H200; the radix
# select 0.43 ms at first — most logits share their first byte, so the atomic adds of pass one
# all hit one or two bins and wait for each other — and 0.20 ms once each thread adds up runs
# of one bin in a register and the warps spread over 8 copies of the histogram.

# %%
logits = randn(49152, scale=2.0)
bits = logits.view(np.int32).astype(np.int64)
keys = np.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)        # gpu/sampling.py's _key, vectorised
print("keys sort like the logits:", np.array_equal(np.argsort(keys, kind="stable"),
                                                   np.argsort(logits, kind="stable")))
u = keys + 2 ** 31                                          # unsigned, 0 .. 2^32 - 1, same order
top_k = 50
prefix, above, looked_at = 0, 0, []
for byte in range(4):                                       # the kernel's _radix_select
    shift = 24 - 8 * byte
    match = (u >> (shift + 8)) == prefix                    # the higher bytes found so far
    looked_at.append(int(match.sum()))
    hist = np.bincount((u[match] >> shift) & 255, minlength=256)   # GPU: shared-memory atomics
    d = 255
    while d > 0 and above + hist[d] < top_k:                # walk the bins down from the top
        above += hist[d]
        d -= 1
    prefix = prefix * 256 + d
tau = prefix - 2 ** 31
print(f"top-{top_k} threshold after 4 passes: logit "
      f"{logits[keys == tau][0]:.4f}; by sorting: {np.sort(logits)[-top_k]:.4f}; "
      f"tokens kept: {int((keys >= tau).sum())}")

# %%
fig, ax = plt.subplots(figsize=(8, 3.2))
ax.bar(range(1, 5), looked_at, color="#3f6ec6")
for i, v in enumerate(looked_at):
    ax.text(i + 1, v * 1.15, f"{v:,}", ha="center", fontsize=9)
ax.set_yscale("log")
ax.set_xticks(range(1, 5), [f"byte {i + 1}" for i in range(4)])
ax.set_xlabel("pass (one byte of the 32-bit key, from the top)")
ax.set_ylabel("tokens whose higher bytes match")
ax.set_title(f"Finding the top-{top_k} threshold among 49,152 logits without sorting")
show(fig, "11_topk_search")

# %% [markdown]
# The draw itself needs no sort either: one uniform number $u$, drawn on the host from the
# sequence's own generator, and the first token (in vocabulary order) whose running sum of kept
# probabilities passes $u$ times the total — a prefix sum across the block's threads. That is
# exactly how `rng.choice(V, p=probs)` picks, so the same seed gives the same token as lesson
# 08's reference. The real kernel on the simulator, one sequence per block, several settings:

# %%
settings = [dict(temperature=0), dict(temperature=0.8), dict(temperature=1.0, top_k=5),
            dict(temperature=0.7, top_p=0.6), dict(temperature=1.3, min_p=0.2)]
params = [SamplingParams(**kw) for kw in settings]
small = randn(len(settings), 48, scale=2.0)
seeds = [100 + i for i in range(len(settings))]
out_ids = cuda.device_array(len(settings), np.int32)
gpu_sampling.sample_cuda(cuda.to_device(small),
                         cuda.to_device(gpu_sampling.params_array(
                             params, [np.random.default_rng(s) for s in seeds])),
                         out_ids, threads=L.sample)
device_ids = out_ids.copy_to_host().tolist()
host_ids = [sample(small[i], p, np.random.default_rng(s)) for i, (p, s) in enumerate(zip(params, seeds))]
for kw, a_, b_ in zip(settings, device_ids, host_ids):
    print(f"{str(kw):40} device {a_:3d}   reference {b_:3d}")

# %% [markdown]
# ## 7 · What the simulator cannot tell you
#
# Everything on this page ran the real kernels, and `tests/test_cuda_kernels.py` runs each of
# them against its NumPy reference the same way, in CI. The simulator proves indexing,
# quant decoding, fusion, reductions and barriers. It cannot prove **speed**, **CUDA-graph
# recording**, or what the real compiler does with floats (it contracts `a * b + c` into one
# fused multiply-add, which rounds differently in the last bit). Nor does it say anything about
# the faster tricks a GPU offers, such as warp shuffles (`cuda.shfl_down_sync`: the 32 threads
# of a warp add up their values through registers, without shared memory). minfer's kernels
# keep to shared memory and barriers, which the simulator runs exactly as a GPU does, so that
# every kernel it ships is tested in CI.
#
# On a machine with a GPU, one prepared script checks every kernel at SmolLM2's real shapes,
# compares greedy generation with the numba backend, and measures prefill and decode at batch 1
# and 32: `python tools/gpu_check.py` (see [The GPU backend](../gpu.md)).
#
# What it found on an NVIDIA H200, the first time these kernels met a GPU:
#
# * **A kernel that passed every simulator test did not compile.** The simulator runs a kernel as
#   Python, so a branch no test reaches is never typed; the real compiler types all of it (the
#   linear kernel multiplied by a 2-D array in its "no norm" branch). `tests/test_cuda_compile.py`
#   now compiles every kernel for sm_90 with the argument types the simulator saw — no GPU needed.
# * **Graphs are the speed.** The same 153 kernels decode 71 tok/s launched one by one from
#   Python, and 468 tok/s replayed as one CUDA graph.
# * **Integer division is slow.** numba's integers are 64-bit, and a 64-bit `//` or `%` is a
#   call to a division routine on a GPU, not one instruction. Attention's first version divided
#   to find each key's block and row inside its p·V loop, and one chain of loads walked all the
#   keys. Four changes
#   took decode attention from 61 µs to 13 µs a layer — groups of threads share p·V; each key's
#   place is computed once, by the thread that scores it; a flat view of the cache instead of
#   5-D indexing; tree reductions instead of every thread reading every score — and one-stream
#   decode from 180 to 506 tok/s (`python -m minfer bench --backend cuda`).
#
# ## Your turn
#
# ```bash
# python -m minfer lesson start 11
# python -m minfer lesson check 11
# ```
#
# One task: **`rmsnorm_kernel(x, w, eps, out)`**, section 1's sum of squares grown into RMSNorm — one
# block per row, the threads striding over the columns, their partial sums added by a tree in
# shared memory (no warp shuffles). The check launches it with 4 to 16 threads per block on rows
# shorter than, as long as and longer than the block, and compares with the NumPy reference.
# Without a GPU, `check 11` runs itself under the simulator. It names the classic mistakes: a
# mean over the threads instead of the columns, columns no thread writes, a tree that loses
# partial sums.
#
# ??? note "Solution — minfer's kernel (open it once yours passes, or once you are stuck)"
#     <!-- source minfer.stages.rmsnorm:rmsnorm_kernel -->
#
#     Outside this site: the end of `minfer/stages/rmsnorm.py`.
#
# **Next:** [12 · Continuous batching](12_batching.md) — many requests in one step.
