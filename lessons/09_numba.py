# %% [markdown]
# # 09 · Making a stage fast with Numba: the perf ladder
#
# Lessons 03–08 read the NumPy reference of every stage: short, vectorised, obviously right. This
# lesson makes the same stages fast on a CPU and measures every step on the way: the **perf
# ladder**. Each stage module of `minfer/stages/` has its `@njit` kernel right after the reference
# (`rmsnorm_numba`, `rope_numba`, `kv_write_numba`, `paged_attention_numba`, `linear_numba`,
# `swiglu_numba`, `embedding_numba`), and `LLM(backend="numba")` runs them.
#
# Before writing any kernel, ask what limits it: **reading memory** or **doing arithmetic**. The
# answer decides which tricks can help at all.
#
# !!! warning "These timings are live, and noisy"
#     Every number on this page was measured when the page was built, on the machine that built
#     it (often a small shared CI machine, running another lesson at the same time). They move
#     from run to run; the *ratios* hold better than the absolute times. To compare one core with
#     one core, the lesson runs NumPy's BLAS and Numba on **one thread** (the first cell pins
#     both); one section lets Numba use every core. Run the file on your own machine to get yours.

# %%
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")     # before numpy loads: BLAS on one thread
os.environ.setdefault("MKL_NUM_THREADS", "1")

import inspect
import time

import numba
import numpy as np
from numba import float32, njit, prange

import minfer
from minfer import backends
from minfer.batch import make_batch
from minfer.classroom import clock, show   # clock: (median s, first call s)
from minfer.stages import attention, embedding, kvcache, linear, mlp, rmsnorm, rope
from minfer.stages.rmsnorm import rmsnorm_numba

ALL_THREADS = numba.config.NUMBA_NUM_THREADS
numba.set_num_threads(1)
print(f"numba {numba.__version__}, numpy {np.__version__}; this machine has {os.cpu_count()} cores")
print(f"Numba may use {ALL_THREADS} threads; this lesson uses 1 unless it says otherwise")


# %% [markdown]
# ## 1 · Bytes per token, and what the machine can do
#
# Generating one token runs the whole forward pass for **one row**. Every linear layer is then a
# matrix–vector product: each weight is read from memory once, used for one multiply and one add
# (2 floating-point operations, *FLOPs*), and not needed again until the next token. Count the
# bytes:

# %%
llm = minfer.LLM(backend="numpy")              # float32 weights: the reference path
c, W = llm.config, llm.weights
bytes_f32 = W.nbytes()
n_weights = bytes_f32 // 4
print(f"{n_weights / 1e6:.0f} M weights x 4 bytes = {bytes_f32 / 1e6:.0f} MB read per generated token")
print(f"and {2 * n_weights / 1e6:.0f} M FLOPs per token: 2 FLOPs per weight, "
      f"so {2 * n_weights / bytes_f32:.1f} FLOP per byte read")

# %% [markdown]
# That ratio — FLOPs done per byte moved — is the **arithmetic intensity** $I$. A machine has two
# limits: how many bytes per second its memory delivers ($B$), and how many FLOPs per second its
# cores compute ($P$). A piece of work cannot go faster than either, so it reaches at best
#
# $$ \text{FLOP/s} \le \min(P,\; I \cdot B) $$
#
# — the **roofline** (Williams, Waterman & Patterson, 2009). Below the ridge point $I = P/B$ the
# work is **memory-bound**: faster arithmetic changes nothing, only reading fewer bytes helps.
# Above it the work is **compute-bound**.
#
# Prefill is different: a prompt of $T$ tokens is a matrix–matrix product, and each weight, once
# loaded, serves all $T$ rows: $I = T/2$ FLOP per byte. A batch of $n$ sequences decoding together
# (lesson 06) has $I = n/2$.
#
# Let us measure $B$ and $P$ for one core of this machine. For $B$, the simplest possible kernel:
# sum a 128 MB array (several times larger than the CPU's caches, so it really comes from
# memory). This is also the shape of every kernel in this lesson — one flat loop, float32
# throughout:

# %%
@njit(fastmath=True)
def total(a):
    s = float32(0.0)
    for i in range(a.size):
        s += a[i]
    return s


big = np.ones(32 * 2**20, dtype=np.float32)                     # 128 MB
t_sum, t_compile = clock(total, big, budget=0.2)
bandwidth = big.nbytes / t_sum                                   # bytes per second
print(f"summing 128 MB: {t_sum * 1e3:.1f} ms -> B = {bandwidth / 1e9:.1f} GB/s on one core "
      f"(the first call took {t_compile:.2f} s: it compiled `total`)")

x256 = np.random.default_rng(0).standard_normal((256, c.dim)).astype(np.float32)
w_up = W.layers[0].w_up                                          # [1536, 576] float32
t_mm, _ = clock(lambda: x256 @ w_up.T, budget=0.2)
peak = 2 * x256.shape[0] * w_up.size / t_mm
print(f"a [256, 576] x [576, 1536] matmul by BLAS: {t_mm * 1e3:.1f} ms -> P = {peak / 1e9:.0f} GFLOP/s "
      f"on one core")
print(f"ridge point P/B = {peak / bandwidth:.1f} FLOP per byte")
print(f"decode reads {bytes_f32 / 1e6:.0f} MB per token: at {bandwidth / 1e9:.1f} GB/s, at most "
      f"{bandwidth / bytes_f32:.0f} tokens/s on this core, whatever the code does")
del big

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(8, 4.2))
I = np.logspace(-1.5, 2.5, 200)
ax.plot(I, np.minimum(peak, I * bandwidth) / 1e9, color="#333", lw=2)
ax.axvline(peak / bandwidth, color="#999", ls=":", lw=1)
ax.text(peak / bandwidth * 1.1, peak / 1e9 * 0.05, "ridge\nP / B", color="#666", fontsize=8)
for name, intensity, color, offset in [("decode, 1 token (f32)", 0.5, "#3f6ec6", (8, -14)),
                                       ("8 sequences\ndecoding together", 4.0, "#7a5cc2", (8, -30)),
                                       ("prefill, 128 tokens", 64.0, "#e07b39", (-40, 10))]:
    y = min(peak, intensity * bandwidth) / 1e9
    ax.scatter([intensity], [y], s=60, color=color, zorder=3)
    ax.annotate(name, (intensity, y), textcoords="offset points", xytext=offset, fontsize=9,
                color=color)
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("arithmetic intensity I (FLOP per byte of weights)")
ax.set_ylabel("attainable GFLOP/s (one core)")
ax.set_ylim(top=peak / 1e9 * 2.5)
ax.set_title("The roofline of one core of this machine (measured above)")
show(fig, "09_roofline")

# %% [markdown]
# Decode sits far left of the ridge: memory-bound. So, for decoding:
#
# * a faster *multiply* is worth nothing once the kernel streams memory at full speed;
# * what counts is reading every weight **once**, **in order**, with no extra copies — and
#   reading **fewer bytes** (quantized weights, lesson 10), or sharing each read between several
#   sequences (batching).
#
# Prefill is far right: compute-bound, where the vector units and blocking matter: every weight
# loaded should serve many tokens while it sits in a register. minfer's `linear_numba` on float32
# weights keeps the sums of 4 weight rows x 4 tokens in 16 vector registers (`_dense_tiles`), so
# each vector of weights it loads serves 4 tokens and each vector of x 4 rows. A BLAS library's
# `sgemm` blocks for the caches more cleverly still; on one thread the two are close at prefill
# (the ladder below), and with both cores of the machine at work the tiles came out ahead at every
# prompt length measured (docs/benchmarks.md), so the Numba path keeps its own kernel for decode
# and prompts alike.
#
# ## 2 · The rules, one rung at a time: a matrix–vector product
#
# Decode's workhorse is $y = W x$ with $W$ stored `[out, in]` (here the MLP's up projection,
# 1536 × 576). Start from the textbook loops in plain Python, then climb. At each rung only one
# thing changes.

# %%
def matvec_python(x, w):                 # rung 0: plain Python
    O, K = w.shape
    out = np.zeros(O, dtype=np.float32)
    for o in range(O):
        acc = 0.0
        for k in range(K):
            acc += x[k] * w[o, k]
        out[o] = acc
    return out


matvec_jit = njit(matvec_python)         # rung 1: the same code, compiled by Numba


@njit(fastmath=True)                     # rung 2: + fastmath (the accumulator is still float64)
def matvec_fastmath(x, w):
    O, K = w.shape
    out = np.zeros(O, dtype=np.float32)
    for o in range(O):
        acc = 0.0
        for k in range(K):
            acc += x[k] * w[o, k]
        out[o] = acc
    return out


@njit(fastmath=True)                     # rung 3: + a float32 accumulator
def matvec_f32(x, w):
    O, K = w.shape
    out = np.empty(O, dtype=np.float32)
    for o in range(O):
        acc = float32(0.0)
        for k in range(K):
            acc += x[k] * w[o, k]
        out[o] = acc
    return out


@njit(fastmath=True)                     # a wrong turn: the same sums, loops swapped
def matvec_by_columns(x, w):
    O, K = w.shape
    out = np.zeros(O, dtype=np.float32)
    for k in range(K):
        for o in range(O):                # walks down a column: a stride of K floats
            out[o] += x[k] * w[o, k]
    return out


x = np.random.default_rng(1).standard_normal(c.dim).astype(np.float32)
few = 192                                 # plain Python is slow: time 1/8 of the rows, scale up
t0 = time.perf_counter()
matvec_python(x, w_up[:few])
t_python = (time.perf_counter() - t0) * w_up.shape[0] / few

rungs = {"0 · plain Python": (t_python, 0.0)}
for name, f in [("1 · @njit, as written", matvec_jit),
                ("2 · + fastmath", matvec_fastmath),
                ("3 · + float32 accumulator", matvec_f32),
                ("(loops swapped: column order)", matvec_by_columns)]:
    rungs[name] = clock(f, x, w_up)
rungs["NumPy: w @ x (BLAS sgemv)"] = clock(lambda x, w: w @ x, x, w_up)
rungs["minfer's linear_numba"] = clock(linear.linear_numba, x[None], w_up)
for name, (t, first) in rungs.items():
    note = f"   (first call {first:.2f} s: compiling)" if first > 0.05 else ""
    print(f"{name:32} {t * 1e6:10.1f} us   x{t_python / t:7.0f} vs Python{note}")

# %%
fig, ax = plt.subplots(figsize=(8, 3.6))
names = list(rungs)
times = np.array([rungs[n][0] for n in names]) * 1e6
colors = ["#999"] + ["#3f6ec6"] * 3 + ["#c94f4f", "#e07b39", "#3a9a5b"]
ax.barh(range(len(names))[::-1], times, color=colors)
for i, t in enumerate(times):
    ax.text(t * 1.1, len(names) - 1 - i, f"{t:,.0f} µs" if t >= 10 else f"{t:.1f} µs", va="center",
            fontsize=8)
ax.set_yticks(range(len(names))[::-1], names)
ax.set_xscale("log")
ax.set_xlim(right=times.max() * 8)
ax.set_xlabel("time for one y = W x, W [1536, 576] float32 (log scale, one thread)")
ax.set_title("The matvec ladder")
show(fig, "09_matvec_ladder")

# %% [markdown]
# What each rung teaches:
#
# 1. **Compiling** removes the interpreter: each `acc += x[k] * w[o, k]` becomes a handful of
#    machine instructions instead of a dozen interpreted bytecodes, each costing dozens. Numba compiles on the first call, for the
#    argument types it sees (that first call is slow; the later ones are not).
# 2. **`fastmath=True`** lets LLVM **reorder the sum**. Floating-point addition is not
#    associative, so without permission the compiler must add the products one after another,
#    in the order written, and each addition waits for the previous one. With it, the loop keeps
#    8 or 16 partial sums in one SIMD register and adds them at the end.
# 3. **Explicit float32.** `acc = 0.0` is a float64, so every float32 product is widened before it
#    is added: half as many lanes per vector instruction, plus the conversions. `float32(0.0)`
#    keeps the whole loop in float32. (Reading float64 *arrays* would double the bytes too.)
#
# The float64 trap is easy to fall into without noticing, because Numba follows NumPy's type
# rules: a float32 times a Python float or a 64-bit integer is a float64. Quantized kernels
# (lesson 10) multiply small integers by float32 scales all the time, so minfer writes the casts
# out. The signatures Numba infers say it:

# %%
@njit
def dequant_implicit(b, d):              # b: a uint8 of two 4-bit quants, d: a float32 scale
    return (b & 15) * d                  # b & 15 is an int64, and int64 * float32 -> float64


@njit
def dequant_explicit(b, d):
    return float32(b & 15) * d


for f in (dequant_implicit, dequant_explicit):
    f(np.uint8(0x5A), np.float32(0.25))
    print(f"{f.__name__:17} {f.nopython_signatures[0]}")

# %% [markdown]
# And the wrong turn: with the loops swapped, the inner loop jumps 576 floats ahead at every step.
# Each step touches a different cache line, so the CPU can neither load 16 neighbouring weights
# with one vector instruction nor keep the lines it needs in its fastest cache.
# **One flat loop over the contiguous axis** —
# here `k`, because each row of `W` is contiguous — is the first rule of every kernel in minfer.
#
# Here `W` is 3.5 MB, so it stays in the caches between calls and this ladder mostly measures
# arithmetic. In a real decode step it comes from memory, like every other weight, and the
# roofline above caps the whole step: past that point only more cores (next section) and fewer
# bytes (lesson 10) help.
#
# ### fastmath changes the last bits
#
# Reordering a float32 sum changes its rounding. The result is not worse — several short partial
# sums usually collect *less* rounding error than one long chain — but it is different:

# %%
exact = w_up.astype(np.float64) @ x.astype(np.float64)
results = {"float32, in order (no fastmath)": njit(matvec_f32.py_func)(x, w_up),
           "float32, reordered (fastmath)": matvec_f32(x, w_up),
           "NumPy / BLAS": w_up @ x}
base = results["float32, in order (no fastmath)"]
for name, y in results.items():
    rel = np.abs(y - exact).max() / np.abs(exact).max()
    print(f"{name:32} rel. error {rel:.1e}; {np.sum(y != base):4d}/{len(y)} outputs differ "
          f"from the in-order sum")

# %% [markdown]
# All three are within a few $10^{-7}$ of the exact answer — float32's own precision — and they
# disagree with each other in the last bits of most outputs. So a fast kernel is **tested with a
# tolerance against the reference**, never for bit equality (minfer's tests use about $10^{-5}$
# relative). `fastmath` also lets the compiler assume that no value is NaN or infinite, so a kernel
# built with it must not depend on how infinities behave. (minfer's attention kernel starts its
# running maximum at $-\infty$; that value is used once, in $e^{m - s}$ for the first key, where it
# multiplies sums that are still zero — a spot to remember if such a kernel ever misbehaves.)
#
# ## 3 · More cores: `prange`
#
# `@njit(parallel=True)` and `prange` in place of `range` split a loop's iterations across
# threads. The one rule: **each iteration writes only its own outputs**. In a matvec, iteration
# `o` writes `out[o]` and nothing else, so threads never touch the same memory. (Numba also
# recognises `acc += ...` on a scalar inside a `prange` as a reduction and combines the threads'
# partial sums for you.)

# %%
@njit(parallel=True, fastmath=True)
def matvec_prange(x, w):
    O, K = w.shape
    out = np.empty(O, dtype=np.float32)
    for o in prange(O):                  # threads take blocks of rows
        acc = float32(0.0)
        for k in range(K):
            acc += x[k] * w[o, k]
        out[o] = acc
    return out


head = W.lm_head                                      # [49152, 576]: the LM head, 113 MB
t1, _ = clock(matvec_prange, x, head, budget=0.15)
numba.set_num_threads(ALL_THREADS)
tn, _ = clock(matvec_prange, x, head, budget=0.15)
numba.set_num_threads(1)
load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
print(f"LM head matvec, {head.nbytes / 1e6:.0f} MB: 1 thread {t1 * 1e3:.1f} ms "
      f"({head.nbytes / t1 / 1e9:.1f} GB/s), {ALL_THREADS} threads {tn * 1e3:.1f} ms "
      f"({head.nbytes / tn / 1e9:.1f} GB/s): x{t1 / tn:.2f}")
print(f"load average while measuring: {load:.1f} on {os.cpu_count()} cores")
if t1 / tn < 1.3:
    print("-> little or no gain on this machine as it was measured (see below why that happens)")

# %% [markdown]
# On an idle machine, the LM head's matvec runs close to the memory bus's full speed with a few
# threads: one core alone rarely saturates it. But a parallel loop is only as fast as its slowest
# thread. When another program holds a core — a shared CI machine building two lessons at once,
# or a small virtual machine whose cores are shared with its neighbours — that thread waits for
# its turn and the whole loop with it. Parallel timings swing far more than single-thread ones,
# and a speed-up below 1 above means exactly that. minfer uses every core by default (`--threads` or `NUMBA_NUM_THREADS`
# to change it); `python -m minfer bench` measures it on your machine.
#
# ## 4 · Compiling once: `cache=True`
#
# Every kernel compiles on its first call — LLVM is thorough, not quick. minfer's kernels are
# declared `@njit(..., cache=True)`: the machine code goes to disk (`__pycache__/*.nbi` and
# `*.nbc` next to the module), and the next process loads it instead of compiling, unless the
# source file has changed since. numba checks only the kernel's own file, yet a kernel compiles in
# the helpers it calls from other files; `minfer/jitcache.py` widens the check to all of minfer's
# kernel files, so an edit to any of them recompiles every kernel once. This lesson has not called the attention kernel yet, so its
# first call here is a load from that cache (or a compile, if the cache is missing or stale).
# Against it, a fresh copy of the same function, compiled from scratch:

# %%
args = (np.ones((3, 9, 64), np.float32), np.ones((1, 16, 3, 64), np.float32))
tiny = (args[0], args[1], args[1], make_batch([(np.zeros(3, np.int64), 0, [0])], 16))
t0 = time.perf_counter()
attention.paged_attention_numba(*tiny)
t_first = time.perf_counter() - t0
stats = attention._attention_rows.stats
how = "loaded from the disk cache" if stats.cache_hits else "compiled (no usable cache yet)"
fresh = njit(parallel=True, fastmath=True)(attention._attention_rows.py_func)   # no cache
row_seq = np.zeros(3, np.int64)
t0 = time.perf_counter()
fresh(tiny[0], tiny[1], tiny[2], row_seq, tiny[3].positions, tiny[3].block_tables)
t_compile = time.perf_counter() - t0
print(f"first call of minfer's attention kernel: {t_first:.2f} s ({how})")
print(f"first call of a fresh, uncached copy:     {t_compile:.2f} s (compiling)")
folder = __import__("pathlib").Path(attention.__file__).parent / "__pycache__"
for p in sorted(folder.glob("attention._attention_rows*"))[:3]:
    print(f"  {p.stat().st_size:>9,} bytes  __pycache__/{p.name}")

# %% [markdown]
# `python -m minfer bench` measures the same for the whole engine: a cold start (empty cache,
# every kernel compiled) and a cached start, each to the first token.
#
# ## 5 · Attention in one pass: the online softmax
#
# The reference (lesson 05) builds the whole score matrix, `[Hq, t, S]`, after copying every key
# and value once per query head (`np.repeat`), then takes a softmax over it. A kernel can do
# better: walk the keys **once**, and keep the softmax *running* (Milakov & Gimelshein, 2018;
# the idea behind FlashAttention). For one query and keys $j = 1, 2, \dots$, keep the largest
# score so far $m$, the sum $\ell = \sum e^{s_j - m}$ and the unnormalised output
# $o = \sum e^{s_j - m} v_j$. When key $j$ arrives:
#
# $$ m' = \max(m, s_j), \qquad \ell \leftarrow \ell\, e^{m - m'} + e^{s_j - m'}, \qquad o \leftarrow o\, e^{m - m'} + e^{s_j - m'}\, v_j, \qquad m \leftarrow m' $$
#
# and at the end the answer is $o / \ell$. The factor $e^{m - m'}$ re-bases what was summed so far
# whenever a larger score shows up. In plain Python, against the two-pass softmax:

# %%
rng = np.random.default_rng(2)
s = rng.standard_normal(10) * 3                  # 10 scores
v = rng.standard_normal((10, 4))                 # 10 values of size 4
m, l, o = -np.inf, 0.0, np.zeros(4)
for j in range(len(s)):
    m_new = max(m, s[j])
    c_old, p = np.exp(m - m_new), np.exp(s[j] - m_new)
    l, o, m = l * c_old + p, o * c_old + p * v[j], m_new
    print(f"key {j}: score {s[j]:6.2f}   running max {m:5.2f}   running sum {l:6.3f}")
two_pass = attention.softmax(s) @ v
print("one pass:", (o / l).round(6))
print("two pass:", two_pass.round(6))

# %% [markdown]
# minfer's kernel does this for every token row and query head, reading keys and values straight
# from the paged cache through the block table. No score matrix, no copies of K and V. Each key
# row is read once for the 3 query heads that share it, and once for all the new rows of its
# sequence (a job is one sequence's rows: tokens to verify, a chunk of a prompt, each row
# seeing the keys up to its own position). A decode step has one row and two
# threads with nothing to do between them, so its keys are cut into slices (`SLICES`), each a
# job of its own with its own $m$, $\ell$ and $o$; at the end the slices merge with the same
# rescale, $M = \max_s m_s$, $o = \sum_s e^{m_s - M} o_s$, $\ell = \sum_s e^{m_s - M} \ell_s$
# ("flash-decoding"). It takes the keys a cache block at a time: the block's
# scores first, then one new max and one rescale for the whole block, then the block's exps in a
# loop of their own. That loop calls `exp32` (`stages/fastexp.py`), e^x written as plain
# arithmetic (a power of two times a polynomial), which the compiler turns into vector code;
# `np.exp` is a call into the C library per value, and perf showed it taking ~40% of the
# kernel's time. When head_dim is a multiple of 16 (SmolLM2: 64) each job runs the same steps in
# vector code, `attention._attention_job_vec` (its vector operations in `attention_simd.py`): a
# head's scores for 16 keys in one call, the block's softmax as one 16-lane vector, p.V 64 floats
# of the output at a time with each key's weight splat once, the next block prefetched while this
# one is scored (docs/benchmarks.md). A tile of several rows (4 or more: tokens to verify, a
# chunk of a prompt; head_dim 64) turns the vectors around, `attention._attention_job_rows`: 16
# query vectors, one in each lane, so that a key's element splat once serves 16 products and the
# softmax runs down the keys with no sum across lanes. Each query's sums are added in the same
# order in both forms (the few that fast-math could reorder are marked to stay as written), and
# each row's keys are cut into slices where they would be for that row alone — so a token's
# logits are the same bits whether it is decoded or verified with others (what speculative
# decoding, lesson 13, needs to give exactly the text of plain decoding), and a prompt's the same
# in one chunk or several, or after a cached prefix:

# %%
print(inspect.getsource(attention._attention_rows))

# %% [markdown]
# The reference's cost grows with the copies and the score matrix; the kernel's with the keys it
# reads. Decoding one token at growing context lengths (SmolLM2's heads: 9 query, 3 kv, 64 wide):

# %%
def attention_case(n_new, context, seed=0):
    """q for n_new tokens at the end of a `context`-token sequence, and a cache holding it."""
    r = np.random.default_rng(seed)
    bs = 16
    n_blocks = -(-context // bs)
    batch = make_batch([(np.zeros(n_new, np.int64), context - n_new, list(range(n_blocks)))], bs)
    k_cache = r.standard_normal((n_blocks, bs, c.n_kv_heads, c.head_dim)).astype(np.float32)
    v_cache = r.standard_normal((n_blocks, bs, c.n_kv_heads, c.head_dim)).astype(np.float32)
    q = r.standard_normal((n_new, c.n_heads, c.head_dim)).astype(np.float32)
    return q, k_cache, v_cache, batch


print(f"{'context':>8} {'reference':>12} {'kernel':>10} {'max |diff|':>11}")
for S in (128, 512, 2048):
    args = attention_case(1, S)
    t_ref, _ = clock(attention.paged_attention, *args)
    t_ker, _ = clock(attention.paged_attention_numba, *args)
    diff = np.abs(attention.paged_attention(*args) - attention.paged_attention_numba(*args)).max()
    print(f"{S:8} {t_ref * 1e6:9.0f} us {t_ker * 1e6:7.0f} us {diff:11.1e}")

# %% [markdown]
# ## 6 · The perf ladder, stage by stage
#
# Now every stage: the NumPy reference against its Numba kernel, at SmolLM2's real shapes
# (width 576, 9/3 heads of 64, MLP 1536, vocabulary 49 152, float32 weights of layer 0), with
# random inputs. Two situations: **decode** (one new token, 256 tokens of context) and
# **prefill** (a 128-token prompt). Each time is the median of several calls.

# %%
L0 = W.layers[0]


def stage_cases(T, context):
    r = np.random.default_rng(3)
    h = r.standard_normal((T, c.dim)).astype(np.float32)
    ids = r.integers(0, c.vocab_size, T)
    q, k_cache, v_cache, batch = attention_case(T, context)
    k = r.standard_normal((T, c.n_kv_heads, c.head_dim)).astype(np.float32)
    cos, sin = rope.rope_angles(batch.positions, c.head_dim, c.rope_theta)
    return {  # stage: (reference, kernel, arguments)
        "embedding": (embedding.embedding, embedding.embedding_numba, (ids, W.tok_embd)),
        "rmsnorm": (rmsnorm.rmsnorm, rmsnorm.rmsnorm_numba, (h, L0.attn_norm, c.rms_eps)),
        "rope": (rope.rope, lambda q, cos, sin: rope.rope_numba(q.copy(), cos, sin),  # in place
                 (q, cos, sin)),
        "kv_write": (kvcache.kv_write, kvcache.kv_write_numba, (k_cache, v_cache, k, k,
                                                                batch.slot_mapping)),
        "attention": (attention.paged_attention, attention.paged_attention_numba,
                      (q, k_cache, v_cache, batch)),
        "linear (W_o)": (linear.linear, linear.linear_numba, (h, L0.wo)),
        "swiglu (MLP)": (mlp.swiglu, mlp.swiglu_numba, (h, L0.w_gate, L0.w_up, L0.w_down)),
        "LM head": (linear.linear, linear.linear_numba, (h, W.lm_head)),
    }


ladder = {}
for label, T, context in [("decode", 1, 256), ("prefill", 128, 128)]:
    ladder[label] = {}
    for stage, (ref, kernel, args) in stage_cases(T, context).items():
        want, got = ref(*args), kernel(*args)
        if want is not None:             # kv_write returns nothing; the others must agree
            assert np.allclose(got, want, atol=1e-3, rtol=1e-3), stage
        ladder[label][stage] = (clock(ref, *args)[0], clock(kernel, *args)[0])
    print(f"{label}: {T} token(s), {context} in context")
    for stage, (a, b) in ladder[label].items():
        print(f"  {stage:14} numpy {a * 1e6:10.1f} us   numba {b * 1e6:10.1f} us   x{a / b:5.1f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True, layout="constrained")
for ax, (label, rows) in zip(axes, ladder.items()):
    stages = list(rows)
    y = np.arange(len(stages))[::-1]
    ref_t = np.array([rows[s][0] for s in stages]) * 1e6
    ker_t = np.array([rows[s][1] for s in stages]) * 1e6
    ax.barh(y + 0.2, ref_t, height=0.4, color="#999", label="NumPy reference")
    ax.barh(y - 0.2, ker_t, height=0.4, color="#3f6ec6", label="Numba kernel")
    for yi, a, b in zip(y, ref_t, ker_t):
        ax.text(max(a, b) * 1.15, yi, f"x{a / b:.1f}", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(right=max(ref_t.max(), ker_t.max()) * 12)
    ax.set_yticks(y, stages)
    ax.set_xlabel("µs per call (log scale, one thread); xN: NumPy time / Numba time")
    ax.set_title(f"{label}: {'1 token, 256 in context' if label == 'decode' else '128 tokens'}")
fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper center", ncol=2, fontsize=9)
show(fig, "09_stage_ladder")

# %% [markdown]
# How to read the ladder:
#
# * **Small stages** (rmsnorm, rope, kv_write at decode): NumPy pays a few microseconds for every
#   call and every temporary array; a kernel is one call and one loop. Large ratios — but on a
#   few microseconds, out of a step that takes tens of milliseconds.
# * **Attention** wins by skipping the copies and the score matrix (section 5), more so as the
#   context grows.
# * **Linear layers and the MLP** are where the time is, and there the reference *already* calls
#   compiled code: BLAS. One thread against one thread, the best a kernel can do is stream the
#   weights at the memory's full speed, and a good BLAS does that too — though not always for a
#   product with a single row (look at the LM head). At prefill, one thread each, BLAS's sgemm
#   and the Numba tiles are close. The big gains in a linear layer come from elsewhere: fewer
#   bytes per weight (lesson 10), more cores (`prange`), and each weight read once for many rows.
# * **Embedding and kv_write** are row copies either way. NumPy's fancy indexing does them as
#   well as anything, and for 128 rows better than a loop of small copies: not every stage
#   needs a kernel to be fast.
#
# ## 7 · The whole model
#
# The same weights, the same prompt, greedy decoding: through the NumPy op table, through the
# Numba one (the op table is swapped in place, as in lesson 03), and with `LLM(backend="numba")`
# on the file's own 4-bit blocks (lesson 10). The bound from section 1 is the memory bandwidth
# divided by the bytes per token.
#
# A fair race on a machine that other programs share: every run is warmed up first (compiling,
# caches, the allocator), all of them use **one thread** (BLAS's and Numba's, set at the top),
# and the three take turns for several rounds, so that a busy minute slows all of them alike.
# The bar is the median; the whisker spans the fastest and the slowest round.

# %%
prompt = "The three rules for a fast kernel are"
params = minfer.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
q4 = minfer.LLM(backend="numba")                       # quant="auto": the file's Q4_1 blocks
runs = [("NumPy reference, float32", llm, backends.numpy_ops(), bytes_f32),
        ("Numba kernels, float32", llm, backends.numba_ops(), bytes_f32),
        ("Numba kernels, Q4_1 blocks", q4, q4.model.ops, q4.weights.nbytes())]
for name, model, ops, nbytes in runs:                   # warm up each
    model.model.ops = ops
    model.generate(prompt, minfer.SamplingParams(temperature=0, max_tokens=2))
rounds = {name: [] for name, *_ in runs}
texts = {}
for _ in range(5):                                      # in turns: a noisy minute hits all three
    for name, model, ops, nbytes in runs:
        model.model.ops = ops
        texts[name] = model.generate(prompt, params)[0].text
        rounds[name].append(model.stats.decode_tok_s)
speeds = {}
for name, model, ops, nbytes in runs:
    r = np.array(rounds[name])
    speeds[name] = (np.median(r), bandwidth / nbytes, r.min(), r.max())
    print(f"{name:28} {speeds[name][0]:6.1f} tokens/s (rounds {r.min():.1f}–{r.max():.1f}; "
          f"memory bound {speeds[name][1]:5.0f})  {texts[name]!r}")
a, b = rounds["NumPy reference, float32"], rounds["Numba kernels, float32"]
if max(a) >= min(b) and max(b) >= min(a):
    print("(the two float32 runs' rounds overlap: here and now, their difference is within the noise)")
llm.model.ops = backends.numpy_ops()

# %%
fig, ax = plt.subplots(figsize=(8, 3))
names = list(speeds)
y = np.arange(len(names))[::-1]
tok_s = np.array([speeds[n][0] for n in names])
spread = np.array([[speeds[n][0] - speeds[n][2], speeds[n][3] - speeds[n][0]] for n in names]).T
ax.barh(y, tok_s, xerr=spread, capsize=4, color=["#999", "#3f6ec6", "#3a9a5b"], height=0.55)
for yi, v, hi in zip(y, tok_s, spread[1]):
    ax.text(v + hi + 2, yi, f"{v:.0f}", va="center", fontsize=8)
ax.scatter([speeds[n][1] for n in names], y, marker="|", s=500, color="#c94f4f", zorder=3,
           label="bound: memory bandwidth / bytes per token")
ax.set_yticks(y, names)
ax.set_xlabel("decode tokens/s, one thread (median of 5 rounds, whiskers: fastest and slowest)")
ax.set_xlim(0, max(max(tok_s + spread[1]), max(s[1] for s in speeds.values())) * 1.15)
ax.legend(loc="upper right", fontsize=8)
ax.set_title("SmolLM2-135M, whole model, greedy decode (measured live, this build)")
show(fig, "09_whole_model")

# %% [markdown]
# The three give the same text: they compute the same function (to float32 rounding). The
# float32 runs sit below the red bound of 538 MB per token; what separates the NumPy and Numba
# runs is everything that is *not* the big matrix reads — attention, the small stages, and the
# temporaries between them.
#
# The Q4_1 run reads five times fewer bytes, so its bound is five times higher — and yet on one
# core it stays far below that bound. Unpacking two 4-bit numbers from each byte costs
# arithmetic, and on one core that arithmetic, not memory, becomes the limit: the roofline has
# two roofs, and a kernel lives under the lower one. Lesson 10 measures exactly
# where.
#
# The figures above are measured live, on whatever machine built this page, and a machine that
# is busy with other work can blur them. For comparison, stored figures from `python -m minfer
# bench` ([Benchmarks](../benchmarks.md), a 2-core AMD EPYC VM, 128-token prompt, 128 new
# tokens, both cores, median of 3 runs; 2026-11-25/26, before the compiled step below):
#
# | | decode tok/s |
# |---|--:|
# | NumPy reference, float32 | 26.8 |
# | Numba kernels, float32 | 40.9 |
# | Numba kernels, Q4_1 blocks | 91.9 |
#
# and with everything this lesson and the next describe, 217.5 tok/s on the same kind of
# machine (2026-11-27). `python -m minfer bench --backend numpy,numba --quant f32,auto` measures
# them on yours.
#
# One cost is left that no kernel can remove: **Python between the kernels**. `model.forward`
# calls ~15 stage functions per layer, 450 per token, and each call — the interpreter, numba
# checking and unboxing its arguments, a NumPy temporary — takes a few microseconds. On a model
# of the same 30 layers but width 64, where the arithmetic is next to nothing, that alone was
# 1.5–2.1 ms a token: a fifth of a decode step of the real model once the kernels were fast. So
# the numba backend runs its steps in its own model, `minfer/cpu/model.py`: `model.py`'s forward,
# whose layers run in one compiled call, `minfer/cpu/region.py` — the very same layer loop, written
# inside `@njit` code that calls the very same kernels, so Python runs once per token. It also
# keeps the threads in one `prange` for the whole token: each stage's work is cut into items that
# the threads claim with an atomic counter, and before a stage reads what the previous one wrote,
# a thread waits until its items are all done — about 150 parallel-loop starts and joins a token
# become barriers (llama.cpp's thread pool works so). Its last stage is the final norm and the
# LM head: one compiled call from the layers to the logits.
# (It is what `LLM(backend="numba")` does for the Q4_1 run above; the float32 runs here go
# through the Python loop, which is what `op` tables are for.)
#
# ## Your turn
#
# ```bash
# python -m minfer lesson start 9
# python -m minfer lesson check 9
# python -m minfer chat --use-mine        # your kernels in the live engine
# ```
#
# Tasks: `rmsnorm_numba(x, w, eps)` and `matmul_numba(x, w)` (x `[T, K]`, w `[O, K]` → `[T, O]`),
# each an `@njit` function — the check makes sure it is compiled by Numba, then compares it with
# the reference on several shapes. Follow the rules: one flat loop over the contiguous axis,
# float32 accumulators, `fastmath=True`, and (for the matmul) `prange` over the output rows.
# With both, `chat --use-mine` runs the model's RMSNorms, its attention output projection and
# its LM head on your kernels.
#
# **Next:** [10 · Quantized matmul](10_quantized_matmul.md) — fewer bytes per weight.
