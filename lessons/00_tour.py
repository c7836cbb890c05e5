# %% [markdown]
# # 00 · A tour of minfer
#
# This lesson runs the whole engine end to end with a few calls of the public API, then opens the
# hood just far enough to see every stage that the next lessons take apart one by one.
#
# **Set-up** (once). From a clone of the repository:
#
# ```bash
# python3 -m venv .venv && . .venv/bin/activate
# pip install -e ".[docs]"        # minfer, plus matplotlib and jupytext for the lessons
# python -m minfer fetch          # SmolLM2-135M-Instruct, ~93 MB, into ~/.cache/minfer
# python lessons/00_tour.py       # this file; or open it as a notebook with jupytext
# ```
#
# The model is **SmolLM2-135M-Instruct**: a Llama-architecture transformer with 135 million
# parameters, small enough to run on any laptop in plain NumPy, large enough to answer simple
# questions. minfer reads it from a GGUF file (lesson 02).

# %%
import inspect

import numpy as np

import minfer
from minfer.classroom import show
from minfer.model import Transformer

llm = minfer.LLM(backend="numpy")        # "numpy": the reference path, the one the lessons read
c = llm.config
print(f"{c.name}: {c.n_layers} layers, width {c.dim}, {c.n_heads} query heads / "
      f"{c.n_kv_heads} key-value heads of {c.head_dim}, MLP {c.ffn_dim}, vocabulary {c.vocab_size}")

# %% [markdown]
# ## One question, one answer
#
# `LLM.chat` takes OpenAI-style messages and returns a `Completion`. Temperature 0 means greedy
# decoding: the most likely token every time, so the answer is the same on every run.

# %%
params = minfer.SamplingParams(temperature=0, max_tokens=12)
out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], params)
print(repr(out.text))
print(f"{len(out.prompt_token_ids)} prompt tokens -> {len(out.token_ids)} new tokens "
      f"(finish reason: {out.finish_reason})")

# %% [markdown]
# ## Underneath: text → ids → logits → id → text
#
# What `chat` did, step by step:
#
# 1. **Chat template** (lesson 01): the messages become one string with special tokens that mark
#    who speaks.
# 2. **Tokenizer** (lesson 01): the string becomes a list of integer ids.
# 3. **Forward pass** (lessons 03–07): the ids go through the transformer, which returns one
#    vector of *logits* per position: a score for each of the 49 152 vocabulary entries, for the
#    token that comes next.
# 4. **Sampling** (lesson 08): a token is chosen from the last position's logits; it is appended
#    and the loop goes on until the model emits its end-of-turn token.
#
# Let us do steps 1–4 by hand for the first answer token and check that we get the same one.

# %%
messages = [{"role": "user", "content": "What is the capital of France?"}]
prompt = llm.tokenizer.apply_chat_template(messages)
ids = llm.tokenizer.encode(prompt)
print(prompt)
print(f"{len(ids)} ids:", ids[:12], "...")

logits = llm.logits(ids)                 # one forward pass: [T, V]
print("logits:", logits.shape, logits.dtype)

last = logits[-1]                        # the scores for what follows the prompt
probs = np.exp(last - last.max())
probs /= probs.sum()
top = np.argsort(-probs)[:10]
for i in top[:5]:
    print(f"  {probs[i]:6.1%}  {i:6d}  {llm.tokenizer.decode([i])!r}")
assert top[0] == out.token_ids[0], "greedy decoding picks the arg-max"

# %% [markdown]
# A distribution, not one answer: a few first words share most of the probability, and greedy
# decoding takes the top one (sampling, lesson 08, would sometimes take another). A picture of
# the same numbers:

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(7, 3))
labels = [repr(llm.tokenizer.decode([i])) for i in top]
ax.barh(range(len(top))[::-1], probs[top], color="#3f6ec6")
ax.set_yticks(range(len(top))[::-1], labels)
ax.set_xlabel("probability of the next token")
ax.set_title("After the chat prompt: the 10 most likely first tokens")
show(fig, "00_next_token")

# %% [markdown]
# ## The forward pass, as the code says it
#
# `Transformer.forward` wires the stages together. It takes a *batch* (lesson 06) and the KV cache,
# and each stage function comes from an **op table**, `model.ops`: a namespace of functions. The
# lessons read the NumPy reference of each op; later lessons swap in faster paths, and the
# exercises swap in *your* functions. This loop is the specification: the numba and cuda backends
# run their steps in models of their own (`minfer/cpu/model.py`, `minfer/gpu/model.py`) with the
# same stages in the same order, compiled or fused (lessons 09 and 11).

# %%
print(inspect.getsource(Transformer.forward))
print("ops:", ", ".join(k for k in vars(llm.model.ops) if k != "name"))

# %% [markdown]
# | stage | module | lesson |
# |---|---|---|
# | text ↔ ids, chat template | `minfer/tokenizer.py` | 01 |
# | reading GGUF / safetensors | `minfer/weights/` | 02 |
# | embedding, RMSNorm | `minfer/stages/embedding.py`, `rmsnorm.py` | 03 |
# | rotary position embedding | `minfer/stages/rope.py` | 04 |
# | attention (GQA, causal) | `minfer/stages/attention.py` | 05 |
# | the paged KV cache | `minfer/stages/kvcache.py`, `minfer/batch.py` | 06 |
# | SwiGLU MLP, linear layers | `minfer/stages/mlp.py`, `linear.py` | 07 |
# | choosing the next token | `minfer/sampling.py` | 08 |
#
# ## Where the time goes
#
# Every new token costs one forward pass, and every forward pass reads every weight once. Count
# them:

# %%
W = llm.weights
per_layer = sum(a.size for a in W.layers[0].storage())   # its distinct arrays
total = W.tok_embd.size + per_layer * c.n_layers + W.norm.size
print(f"{per_layer:,} parameters per layer x {c.n_layers} layers + embedding "
      f"{W.tok_embd.size:,} = {total:,} parameters")
print(f"as float32 that is {total * 4 / 1e6:.0f} MB read per generated token")
print(f"the GGUF file stores them in {llm.path.stat().st_size / 1e6:.0f} MB (4-bit blocks, lesson 02)")

# %% [markdown]
# Decoding is therefore limited by memory bandwidth rather than arithmetic: this is why the
# faster paths keep the weights quantized (lesson 10) and why a batch of sequences shares one
# read of the weights (lesson 06).
#
# ## Your turn
#
# Every lesson ends with a small exercise that `python -m minfer lesson` writes out and checks:
#
# ```bash
# python -m minfer lesson start 0      # writes minfer-exercises/lesson00_tour.py
# python -m minfer lesson check 0
# ```
#
# Task: `count_parameters(config)` — the number of weights of a model, from its configuration
# alone (`llm.config` above: `vocab_size`, `dim`, `n_layers`, `n_heads`, `n_kv_heads`,
# `head_dim`, `ffn_dim`, `tie_embeddings`), without looking at the arrays. The count above is
# your target for SmolLM2; the check also tries a model whose LM head is not tied to its
# embedding and one without grouped-query attention, and names what you left out.
#
# **Next:** [01 · Tokens](01_tokens.md) — how text becomes ids.
