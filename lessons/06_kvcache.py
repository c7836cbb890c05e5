# %% [markdown]
# # 06 · The KV cache: blocks, block tables, slots
#
# Generating token $n+1$ needs the keys and values of tokens $0 \dots n$ in every layer. They do not
# change once computed (a token never sees what comes after it), so they are computed once and
# **kept**: that is the KV cache. Without it every new token would cost a whole prefill.
# Modules: `minfer/stages/kvcache.py`, `minfer/batch.py`.
#
# ## A pool of blocks (PagedAttention)
#
# Where to keep them? One array per sequence, as long as the longest possible context, wastes
# memory on every short sequence. minfer does what vLLM does (Kwon et al., 2023): one **pool**
# shared by all sequences, cut into fixed-size **blocks** of `block_size` token slots:
#
# ```text
# k, v : [n_layers, n_blocks, block_size, n_kv_heads, head_dim]
# ```
#
# * a sequence owns a **block table**: the ids of its blocks, in order;
# * the token at position $p$ lives in block `table[p // block_size]`, row `p % block_size`;
# * its **slot**, one integer, is `block * block_size + row`: its row in the pool seen as a flat
#   list of `n_blocks * block_size` token slots.
#
# Sequences take blocks one at a time as they grow and give them back when they finish, so
# sequences of any lengths share the pool with at most one partly-filled block each. A contiguous
# cache is the special case of one block as long as the context.

# %%
import tempfile

import numpy as np

import minfer
from minfer.batch import make_batch
from minfer.classroom import show
from minfer.engine.block_manager import BlockManager
from minfer.stages.kvcache import KVCache, kv_write
from minfer.weights.synthetic import tiny_checkpoint


# %% [markdown]
# ## Three sequences share a pool
#
# A pool of 12 blocks of 4 slots; three prompts of 5, 9 and 3 tokens. `BlockManager.ensure`
# hands out blocks (the pool never grows: when it runs out, the scheduler makes a request wait —
# lesson 12), `make_batch` flattens the three prompts into
# one batch and computes every token's slot.

# %%
cache = KVCache(n_layers=1, n_kv_heads=1, head_dim=2, block_size=4, n_blocks=12)
blocks = BlockManager(cache)
lengths = {0: 5, 1: 9, 2: 3}
for seq, n in lengths.items():
    blocks.ensure(seq, n)
    print(f"sequence {seq}: {n} tokens -> block table {blocks.tables[seq]}")

batch = make_batch([(np.arange(n), 0, blocks.tables[s]) for s, n in lengths.items()], block_size=4)
for name in ["token_ids", "positions", "seq_starts", "context_lens", "block_tables", "slot_mapping",
             "logits_rows"]:
    print(f"{name:13} {getattr(batch, name).tolist()}")


# %% [markdown]
# Read the slot mapping against the tables: sequence 1's position 6 is in its second block
# (`table[6 // 4]`), row `6 % 4 = 2`. `logits_rows` are the last row of each sequence: only those
# need a next-token distribution.
#
# Now sequence 0 finishes and gives its blocks back; sequence 2 grows by 4 tokens, and a new
# sequence of 6 tokens arrives. The freed blocks are reused at once, so a table need not be
# contiguous — it never has to be:

# %%
def block_map():
    """owner[block] (-1 free) and fill[block] (slots used)."""
    owner = np.full(cache.n_blocks, -1)
    fill = np.zeros(cache.n_blocks, int)
    for s, table in blocks.tables.items():
        for j, b in enumerate(table):
            owner[b] = s
            fill[b] = min(cache.block_size, lengths[s] - j * cache.block_size)
    return owner, fill


before = block_map()
blocks.release(0)
del lengths[0]
lengths[2] += 4
blocks.ensure(2, lengths[2])
lengths[3] = 6
blocks.ensure(3, 6)
after = block_map()
for seq in blocks.tables:
    print(f"sequence {seq}: {lengths[seq]} tokens -> block table {blocks.tables[seq]}")

# %% [markdown]
# A picture of the pool before and after: each row is one block, each cell one token slot,
# coloured by the sequence that owns it.

# %%
import matplotlib.pyplot as plt
from matplotlib.colors import ListedColormap

colors = ["#3f6ec6", "#e07b39", "#4e9a52", "#b04fa6"]
fig, axes = plt.subplots(1, 2, figsize=(9, 4.6), layout="constrained")
for ax, (owner, fill), title in zip(axes, [before, after], ["three prompts", "seq 0 done, seq 2 grew, seq 3 came"]):
    grid = np.full((cache.n_blocks, cache.block_size), np.nan)
    for b in range(cache.n_blocks):
        if owner[b] >= 0:
            grid[b, : fill[b]] = owner[b]
    ax.imshow(grid, cmap=ListedColormap(colors), vmin=-0.5, vmax=3.5, aspect="auto")
    for b in range(cache.n_blocks):
        for r in range(cache.block_size):
            label = f"{b * cache.block_size + r}"
            ax.text(r, b, label, ha="center", va="center", fontsize=7,
                    color="white" if not np.isnan(grid[b, r]) else "#999")
    ax.set_xticks(range(cache.block_size), [f"row {r}" for r in range(cache.block_size)], fontsize=8)
    ax.set_yticks(range(cache.n_blocks), [f"block {b}" for b in range(cache.n_blocks)], fontsize=8)
    ax.set_xticks(np.arange(-0.5, cache.block_size), minor=True)
    ax.set_yticks(np.arange(-0.5, cache.n_blocks), minor=True)
    ax.grid(which="minor", color="white", lw=2)
    ax.tick_params(which="minor", length=0)
    ax.set_title(title, fontsize=10)
handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors]
fig.legend(handles, [f"sequence {s}" for s in range(4)], loc="outside lower center", ncol=4, fontsize=8)
show(fig, "06_kv_block_map")

# %% [markdown]
# The numbers are slot ids: what `slot_mapping` holds, and what `kv_write` writes to.
#
# ## Cached equals uncached
#
# The cache must change nothing but the cost. A tiny random model checks it: the logits of the
# last token computed in one go over the whole text, and computed by a prefill of the first
# tokens followed by one-token decode steps that read the earlier tokens from the cache.

# %%
llm = minfer.LLM(tiny_checkpoint(tempfile.mkdtemp(), fmt="gguf"), backend="numpy", block_size=4)
model = llm.model
ids = llm.tokenizer.encode("the cat sat on the mat and the dog sat on the cat")
full = llm.logits(ids)                                       # [T, V], no reuse between positions

kv = model.new_cache(n_blocks=8, block_size=4)
table = BlockManager(kv).ensure(0, len(ids))                 # one sequence, blocks for all tokens
n0 = 6
steps = [model.forward(make_batch([(ids[:n0], 0, table)], 4), kv)]           # prefill 6 tokens
for p in range(n0, len(ids)):                                                 # then one at a time
    steps.append(model.forward(make_batch([(ids[p:p + 1], p, table)], 4), kv))
cached = np.concatenate(steps)                               # logits of positions n0-1 .. T-1
print("positions compared:", len(cached), "| max |difference|:", np.abs(cached - full[n0 - 1:]).max())

# %% [markdown]
# ## A chat's next turn: the prefix cache
#
# The same fact pays off across requests. A chat sends the whole conversation every turn, and
# all of it but the newest message was the previous turn's prompt and answer, whose keys and
# values were in the cache. So the engine does not forget a finished request's blocks at once:
# each *full* block is named by a hash of its tokens chained with the hash of the block before it
# (`minfer/engine/prefix_cache.py`), and a new request whose prompt begins with the same tokens
# takes those blocks and computes only the rest, starting at that position —
# `make_batch([(new_ids, n_shared, table)])`, like a decode step with more than one token. Many
# requests with one system prompt share it the same way. Lesson 12 shows the whole engine.

# %%
greedy = minfer.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
turn1 = ids[:8]
answer = llm.generate([turn1], greedy)[0].token_ids
turn2 = turn1 + answer + ids[8:]                             # the conversation so far, and more
again = llm.generate([turn2], greedy)[0]
print(f"turn 2: {len(turn2)} prompt tokens, {again.cached_tokens} found in the prefix cache, "
      f"{llm.stats.prompt_tokens} computed")
fresh = minfer.LLM(llm.path, backend="numpy", block_size=4, prefix_caching=False)
print("same tokens as a fresh prefill:", again.token_ids == fresh.generate([turn2], greedy)[0].token_ids)

# %% [markdown]
# ## Your turn
#
# ```bash
# python -m minfer lesson start 6
# python -m minfer lesson check 6
# ```
#
# Tasks: `slot_mapping(block_table, start, stop, block_size)` (the slots of positions
# `start..stop-1`, as `make_batch` computes them) and `kv_write(k_cache, v_cache, k, v, slot_mapping)`.
#
# ??? note "Solution — minfer's reference (open it once yours passes, or once you are stuck)"
#     <!-- source minfer.stages.kvcache:kv_write -->
#
#     Outside this site: `minfer/stages/kvcache.py`.
#
# **Next:** [07 · The MLP](07_mlp.md) — the other half of every layer.
