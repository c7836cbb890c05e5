# %% [markdown]
# # 12 · Continuous batching, paged KV blocks and the prefix cache
#
# Up to now one request ran at a time. A server has many: people type at different moments, ask
# for answers of very different lengths, and often send the same system prompt. Lesson 09
# showed that a decode step reads every weight of the model to produce one token per sequence —
# so the more sequences share a step, the more tokens each read of the weights buys. The
# question is *which* sequences share a step, and that is the scheduler's job.
#
# **Static batching** takes B requests, prefills them together, and decodes until the *longest*
# is done: a request asking for 8 tokens waits for its neighbour's 200, and a request that
# arrives meanwhile waits for the whole batch. **Continuous batching** (Orca, Yu et al., 2022;
# vLLM) decides again at every step: a finished sequence leaves at once, a new one joins the very
# next step. minfer's engine works this way, in four short modules:
#
# | module | what it decides |
# |---|---|
# | `minfer/engine/sequence.py` | a request's state: its tokens, and `n_computed`, how many have K/V in the cache |
# | `minfer/engine/scheduler.py` | which sequences run this step, with how many tokens each (pure Python, no model) |
# | `minfer/engine/block_manager.py` | which blocks of the fixed KV pool each sequence owns (lesson 06), with reference counts |
# | `minfer/engine/prefix_cache.py` | which full blocks can be found again by their tokens |
#
# One rule drives the scheduler: each sequence catches `n_computed` up to its number of tokens.
# A new request has its whole prompt to catch up (a *prefill*); a running one has the single
# token it sampled last step (a *decode*). There are no phases — a step can carry both, as long
# as its **token budget** allows. A long prompt is cut into budget-sized **chunks**, so it never
# stalls everyone else's next token.

# %%
import tempfile
import time

import numpy as np

import minfer
from minfer.classroom import show
from minfer.engine.prefix_cache import block_hashes
from minfer.engine.sequence import Status
from minfer.weights.synthetic import tiny_checkpoint

# %% [markdown]
# ## A trace of the scheduler
#
# A tiny random model, a pool of only 10 blocks of 4 token slots, at most 3 sequences and 8
# tokens a step. Six requests arrive over the first steps; we record what each one does at each
# step: a chunk of its prompt, a decode, waiting in the queue, or being *preempted* — when a
# running sequence needs a new block and none is free, the newest running sequence gives all of
# its blocks back and returns to the queue, to recompute its tokens later.

# %%
tiny = tiny_checkpoint(tempfile.mkdtemp(), fmt="gguf", seed=0)
block_mb = 10 * 2 * 2 * 4 * 2 * 16 * 4 / 2**20     # 10 blocks x (K and V, 2 layers, 4 slots, 2 heads x 16)
llm = minfer.LLM(tiny, backend="numpy", block_size=4, kv_cache_mb=block_mb, max_seqs=3,
                 max_batch_tokens=8)
eng = llm.engine
rng = np.random.default_rng(0)
arrive = {0: [(11, 6)], 1: [(3, 9)], 2: [(19, 3)], 4: [(5, 12), (7, 4)], 7: [(14, 5)]}  # step: (prompt, new)
seqs, trace = [], []
for step in range(60):
    for n_prompt, n_new in arrive.get(step, []):
        p = minfer.SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True)
        seqs.append(eng.add_request(rng.integers(3, 250, n_prompt).tolist(), p))
    before = {s.seq_id: (s.n_computed, s.n_pending, s.finished) for s in seqs}
    eng.step()
    row = []
    for s in seqs:                          # what did the step do for each request?
        n0, pending, done = before[s.seq_id]
        did = s.n_computed - n0
        row.append(" " if done else "D" if did == 1 and pending == 1 else str(did) if did > 0 else
                   "x" if s.status is Status.PREEMPTED else ".")
    trace.append(row)
    if not eng.has_unfinished() and step > max(arrive):
        break

for i, s in enumerate(seqs):
    print(f"request {i}: {len(s.prompt_ids):>2} prompt tokens, {len(s.output_ids):>2} new | "
          + " ".join(row[i] if i < len(row) else " " for row in trace))
print("preemptions:", eng.scheduler.n_preemptions, "| blocks in use at the end:", eng.blocks.n_used)

# %% [markdown]
# Each column is a step; a number is a prompt chunk of that many tokens, `D` a decode, `.`
# waiting, `x` waiting after a preemption. Notice: decodes come first in every step, chunks
# fill the rest of the budget; a request that finishes frees its place at once for the next in
# the queue. A preempted request can come back with a number larger than the budget (request
# 2's 19 against 8): its full blocks were still in the prefix cache (below), so most of what it
# had is found, not computed again. Request 3's block had been taken for others meanwhile: it
# computes its 6 tokens again. The same picture as a figure:

# %%
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

colour = {" ": 0, ".": 1, "x": 2, "D": 4}                 # anything else: a chunk's size -> 3
grid = np.array([[colour.get(row[i], 3) if i < len(row) else 0 for row in trace]
                 for i in range(len(seqs))])
fig, ax = plt.subplots(figsize=(9, 2.6))
ax.imshow(grid, cmap=ListedColormap(["white", "#dddddd", "#e07070", "#6a8fd8", "#5cb85c"]),
          vmin=0, vmax=4, aspect="auto", interpolation="nearest")
ax.set_yticks(range(len(seqs)), [f"request {i}" for i in range(len(seqs))])
ax.set_xlabel("step")
ax.set_title("grey: waiting · red: preempted · blue: prompt chunk · green: decode")
show(fig, "12_schedule")

# %% [markdown]
# ## Static against continuous, measured
#
# Now the real model, ten requests of mixed lengths, at most four sequences a step. The
# same engine runs them three ways: one at a time; in static batches of four, each running
# until its longest member is done; and continuously, each request joining as soon as there is
# room. (`python -m minfer bench --workload serve` does this with 64 requests.)

# %%
from minfer.bench_serve import make_requests, run_way  # noqa: E402

real = minfer.LLM(max_seqs=4, max_batch_tokens=128)
real.generate([[5] * 40, [6] * 3], minfer.SamplingParams(temperature=0, max_tokens=3))   # compile first
requests = make_requests(10, real.config.vocab_size, seed=1, max_prompt=64)
# answers of very different lengths, as a server's are: one long one in every four
requests = [(p, 40 if i % 4 == 0 else 6) for i, (p, n) in enumerate(requests)]
for way in ("one-at-a-time", "static", "continuous"):
    r = run_way(real, requests, way, [0.0] * len(requests), max_seqs=4)
    print(f"{way:>14}: {r['output_tok_s']:6.1f} output tokens/s, time to first token "
          f"p50 {r['ttft_p50']:.2f} s, p99 {r['ttft_p99']:.2f} s")

# %% [markdown]
# Continuous batching wins twice: more tokens a second than one at a time (each step's read of
# the weights serves several sequences), and shorter waits than static batches (nobody waits
# for a stranger's long answer: here each static batch of four holds one 40-token answer, and
# its three 6-token neighbours' places stay empty until it ends). With answers all of one length
# the two batchings would tie. How much more depends on how cheap a step of several rows is
# compared with a step of one — the kernels' side of the story.
#
# ## The prefix cache: naming blocks by their tokens
#
# The keys and values of a token depend on that token *and every token before it*. So a full
# block of the pool can be named by a hash of its tokens **chained** with the name of the
# block before it:
#
# $$ h_0 = \mathrm{hash}(\varnothing, t_{0..b}) \qquad h_i = \mathrm{hash}(h_{i-1}, t_{ib..(i+1)b}) $$
#
# Two prompts that begin with the same $i$ blocks of tokens get the same $h_0 \dots h_{i-1}$,
# and the second one can *share* the first one's blocks instead of computing them (its block
# table points at the same blocks; each block counts its users). Freed blocks keep their names
# until the pool needs them for something else, least recently freed first — so a chat's next
# turn, or the thousandth request with the same system prompt, finds them.

# %%
system = list(range(100, 110))                         # a 10-token "system prompt"
a = system + [1, 2, 3, 4, 5, 6]
b = system + [7, 8, 9]
c = [100] + system[1:] + [1, 2, 3, 4, 5, 6]            # the same tokens as a
d = [999] + system[1:] + [1, 2, 3, 4, 5, 6]            # one token differs, in block 0
for name, toks in zip("abcd", (a, b, c, d)):
    print(name, [f"{h & 0xffff:04x}" for h in block_hashes(toks, 4)])

# %% [markdown]
# `a` and `b` share their first two blocks (the system prompt's eight first tokens) and differ
# after; `c` is `a` again; in `d` a single token of block 0 differs, and because the hashes are
# chained, *every* block's name changes — its keys and values would differ too.
#
# In the engine: a second request with the same system prompt computes only its own tokens.

# %%
p = minfer.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
llm = minfer.LLM(tiny, backend="numpy", block_size=4)
first = llm.generate([a], p)[0]
second = llm.generate([b], p)[0]
print(f"first: {first.cached_tokens} of {len(a)} prompt tokens from the cache; "
      f"second: {second.cached_tokens} of {len(b)}")

# %% [markdown]
# A block enters the cache only once it is computed. Requests that *arrive together* with the
# same system prompt would each compute it, had the scheduler admitted them all in the first
# step. It does not: a waiting request whose next missing block is the very block a running one
# is computing waits for it (a step or a few), then shares it; requests behind it that share
# nothing are admitted meanwhile (rule 4 in `engine/scheduler.py`).

# %%
llm = minfer.LLM(tiny, backend="numpy", block_size=4)
together = llm.generate([system + [20 + i, 30 + i, 40 + i] for i in range(4)], p)
print("from the cache, each:", [o.cached_tokens for o in together],
      "| prompt tokens computed:", llm.stats.prompt_tokens, "of", 4 * (len(system) + 3))

# %% [markdown]
# ## Watch a real server's scheduler
#
# `python -m minfer serve` (the [Serving](../serving.md) page) puts this engine behind an
# OpenAI-compatible HTTP API. Start it, point a few clients at it, and watch the scheduler:
#
# ```bash
# pip install -e ".[serve]" && python -m minfer serve          # terminal 1
# watch -n 0.5 'curl -s localhost:8000/metrics | grep -E "^minfer_(requests|kv_blocks|prefix)"'
# python tools/serve_bench.py --serve-url http://127.0.0.1:8000 --concurrency 16   # terminal 3
# ```
#
# `minfer_requests_running` climbs to the batch size and `minfer_requests_waiting` holds the rest;
# `minfer_kv_blocks_used` rises and falls as answers finish; the prefix cache's hit rate grows
# with requests that share a system prompt.
#
# ## Your turn
#
# ```bash
# python -m minfer lesson start 12     # writes minfer-exercises/lesson12_batching.py
# python -m minfer lesson check 12
# ```
#
# Write `block_hashes(tokens, block_size)`: one name per **full** block, each depending on its
# own tokens and on every block before it. The check tries prompts that share a prefix, prompts
# that differ in one token, and the same tokens at two places in one prompt.
