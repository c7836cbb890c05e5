# %% [markdown]
# # 14 · Capstone: the whole model, your own
#
# Lessons 03 to 08 built every stage of a transformer, one function at a time. This lesson puts
# them together: the **layer loop** that runs the 30 layers on a batch, and the **generation
# loop** around it — one prefill of the prompt, then one decode step per new token, each reading
# the keys and values of the tokens before it from the KV cache. Module: `minfer/model.py`.
#
# ## One layer, in order
#
# Each layer reads the residual stream `x [T, D]` twice and adds to it twice (lesson 03):
#
# | step | computes | shape |
# |---|---|---|
# | 1 | `h = rmsnorm(x, attn_norm)` | `[T, D]` |
# | 2 | `q, k, v = h W_qᵀ, h W_kᵀ, h W_vᵀ`, split into heads | `[T, Hq, hd]`, `[T, Hkv, hd]`, `[T, Hkv, hd]` |
# | 3 | `q, k = rope(q), rope(k)` (lesson 04) | same |
# | 4 | write `k`, `v` into the cache at the batch's slots (lesson 06) | — |
# | 5 | `a = attention(q, cache)` (lesson 05) | `[T, Hq, hd]` |
# | 6 | `x = x + a W_oᵀ` | `[T, D]` |
# | 7 | `x = x + swiglu(rmsnorm(x, ffn_norm))` (lesson 07) | `[T, D]` |
#
# Step 4 comes before step 5 because attention reads **all** keys from the cache, the new
# tokens' included: so prefill and decode run the same code. And the keys go into the cache
# *after* RoPE: a key is rotated once, by its own position, and later tokens read it as it is.
#
# Around the layers, `Transformer.forward` embeds the tokens, computes the RoPE angles of their
# positions once for all layers, and after the last layer normalizes the rows it needs logits for
# and multiplies them by the LM head. Here is one forward pass of the real model, stage by stage,
# with the shapes — the op table records each call:

# %%
from types import SimpleNamespace

import numpy as np

import minfer
from minfer.batch import make_batch

llm = minfer.LLM(backend="numpy")
model, c = llm.model, llm.config
calls = []


def recording(name, f):
    def op(*args):
        out = f(*args)
        if len(calls) < 11:                  # the embedding, the angles and the first layer
            shape = ([tuple(np.shape(o)) for o in out] if isinstance(out, tuple) else
                     "(writes into the cache)" if out is None else np.shape(out))
            calls.append(f"{name:12} -> {shape}")
        return out
    return op


base = model.ops
model.ops = SimpleNamespace(**{k: recording(k, v) if callable(v) else v
                               for k, v in vars(base).items()})
ids = llm.tokenizer.encode("The capital of France is")
cache = model.new_cache(n_blocks=4, block_size=16)
logits = model.forward(make_batch([(ids, 0, [0, 1, 2, 3])], 16), cache)
model.ops = base
print(f"{len(ids)} prompt tokens -> logits {logits.shape}; the first calls:")
print("\n".join(calls))

# %% [markdown]
# (`qkv` is the three projections of step 2 in one call; with separate weights it is three
# `linear`s.)
#
# ## Prefill once, then one token a step
#
# Generating n tokens greedily takes n forward passes, not n passes over a growing sequence:
#
# 1. **prefill**: the whole prompt as one batch at positions `0 .. P-1`; every layer writes the
#    prompt's keys and values into the cache; the last row's logits give the first new token;
# 2. **decode**: the token just chosen, alone, at position `P`, then `P + 1`, ...: its own key
#    and value join the cache, and attention reads all the others from there.
#
# A batch names each sequence's **block table** (lesson 06): which blocks of the pool hold its
# positions. The cache must have room for prompt + new tokens. Counting the tokens each forward
# pass receives shows the shape of the loop — here, the engine's own `generate`:

# %%
seen = []
forward = model.forward


def counting(batch, cache):
    seen.append(len(batch.token_ids))
    return forward(batch, cache)


model.forward = counting
out = llm.generate("The capital of France is", minfer.SamplingParams(temperature=0, max_tokens=6))
del model.forward
print("tokens per forward call:", seen)
print(repr(out[0].text))

# %% [markdown]
# One call with the prompt's tokens, then one token per call: the cache makes each decode step
# cost one token's work, whatever the length of the text so far.
#
# ## Your turn
#
# ```bash
# python -m minfer lesson start 14
# python -m minfer lesson check 14
# python -m minfer chat --use-mine        # the model's layers in your loop, on your stages
# ```
#
# Tasks:
#
# * `run_layers(x, cos, sin, batch, cache, weights, config, ops)` — the seven steps above for
#   every layer, calling only the stage functions of `ops` (`ops.rmsnorm`, `ops.linear`,
#   `ops.rope`, `ops.kv_write`, `ops.attention`, `ops.swiglu`). With `--use-mine`, the model's
#   layers run in your loop — and `ops` holds whichever of lessons 03–07's stages you wrote, so
#   the whole forward pass can be yours.
# * `greedy_generate(model, prompt_ids, n_new)` — prefill, then decode, as above, with
#   `model.new_cache`, `make_batch` and `model.forward`; the arg-max of the last row of logits
#   each time.
#
# The check compares your layers' output *and* the keys and values they leave in the cache with
# the reference's, and names the classic mistakes (a residual replaced instead of added to, keys
# cached before RoPE, the wrong norm before the MLP); and it counts the tokens of each of your
# forward calls: a decode step that re-runs the whole sequence gets the right tokens, slowly, and
# is named too.
#
# ??? note "Solution — minfer's reference (open it once yours passes, or once you are stuck)"
#     <!-- source minfer.model:Transformer.forward,Transformer.run_layers -->
#
#     The generation loop lives in `minfer/engine/` (it batches many sequences); the check's
#     one-sequence version is `_ref_greedy_generate` in `minfer/classroom/tasks.py`.
#     Outside this site: `minfer/model.py`.
#
# **Next:** [Where to go next](../next.md) — minfer's modules beside vLLM's and llama.cpp's.
