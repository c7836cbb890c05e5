# %% [markdown]
# # 08 · Sampling: from logits to the next token
#
# The forward pass ends with **logits**: one score per vocabulary entry for the token that comes
# next. Turning them into one token is a choice, and the choice shapes the text: always the most
# likely token (greedy) is repeatable but dull and prone to loops; drawing at random from the
# whole distribution is lively but sometimes picks nonsense from the long tail.
# Module: `minfer/sampling.py`.
#
# ## The pipeline
#
# ```text
# logits --repetition penalty--> --/ temperature--> --top-k--> --top-p--> --min-p--> softmax -> draw
# ```
#
# $$ p_i = \frac{e^{z_i / \tau}}{\sum_j e^{z_j / \tau}} $$
#
# * **temperature** $\tau$ divides the logits: below 1 sharpens the distribution, above 1 flattens it;
#   $\tau = 0$ means greedy (arg-max).
# * **top-k** keeps the $k$ largest logits;
# * **top-p** (nucleus) keeps the most likely tokens until their total probability reaches $p$;
# * **min-p** drops tokens less likely than `min_p` × the most likely one;
# * every filter sets dropped logits to $-\infty$, so softmax gives them probability 0.
#
# Shape contract: `sample(logits [V], params, rng, seen=None) -> int`, one sequence at a time.

# %%
import numpy as np

import minfer
from minfer.classroom import show
from minfer.sampling import SamplingParams, apply_repetition_penalty, filter_logits, sample


# %% [markdown]
# ## A real distribution
#
# The model's next-token logits after the start of a story (raw text, no chat template):

# %%
llm = minfer.LLM(backend="numpy")
tok = llm.tokenizer
prompt = "Once upon a time, in a small village, there lived a"
logits = llm.logits(tok.encode(prompt))[-1].astype(np.float64)     # [V]


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


p = softmax(logits)
order = np.argsort(-p)
for i in order[:8]:
    print(f"  {p[i]:6.1%}  {tok.decode([i])!r}")
print(f"top 8 hold {p[order[:8]].sum():.0%} of the probability; "
      f"{np.sum(p > 1e-4)} tokens have more than 0.01%")

# %% [markdown]
# ## Temperature

# %%
import matplotlib.pyplot as plt

top = order[:15]
fig, ax = plt.subplots(figsize=(11, 3.6))
width = 0.2
for j, t in enumerate([0.3, 0.7, 1.0, 1.5]):
    ax.bar(np.arange(15) + (j - 1.5) * width, softmax(logits / t)[top], width, label=f"T = {t}")
ax.set_xticks(range(15), [repr(tok.decode([i])) for i in top], rotation=45, ha="right", fontsize=8)
ax.set_ylabel("probability")
ax.set_title(f"next token after {prompt!r}")
ax.legend()
show(fig, "08_temperature")

# %% [markdown]
# ## How many tokens survive each filter

# %%
for kw in [dict(), dict(top_k=40), dict(top_p=0.9), dict(top_p=0.5), dict(min_p=0.05),
           dict(min_p=0.2), dict(top_k=40, top_p=0.9, min_p=0.05)]:
    params = SamplingParams(temperature=1.0, **kw)
    kept = np.isfinite(filter_logits(logits, params)).sum()
    print(f"  {str(kw) or 'no filter':45} keeps {kept:6d} tokens")

# %% [markdown]
# top-k keeps a fixed number whatever the shape of the distribution; top-p and min-p adapt: when
# the model is sure, few tokens survive; when it hesitates, many do.
#
# ## Repetition penalty
#
# Small models fall into loops. The CTRL-style penalty (Keskar et al., 2019) makes every token
# already in the text less likely: a positive logit is divided by the penalty, a negative one
# multiplied (dividing a negative logit would *raise* it).

# %%
seen = np.array(tok.encode(prompt))
pen = apply_repetition_penalty(logits, seen, 1.3)
for word in [" little", " village", " time"]:
    i = tok.encode(word)[0]
    print(f"{word!r:11} seen: {i in seen!s:5}  p before {p[i]:.4f}  after {softmax(pen)[i]:.4f}")

# %% [markdown]
# ## Drawing
#
# The draw uses a NumPy random generator, created from the request's `seed`: the same seed gives
# the same text. Drawing many times from this one distribution shows the sampler matches the
# probabilities it was given:

# %%
params = SamplingParams(temperature=0.8, top_k=10)
rng = np.random.default_rng(0)
draws = np.array([sample(logits, params, rng) for _ in range(2000)])
expected = softmax(filter_logits(logits / 0.8, params))
for i in order[:5]:
    print(f"  {tok.decode([i])!r:10} drawn {np.mean(draws == i):6.1%}   expected {expected[i]:6.1%}")
print("same seed, same draws:",
      [sample(logits, params, np.random.default_rng(42)) for _ in range(3)] ==
      [sample(logits, params, np.random.default_rng(42)) for _ in range(3)])

# %% [markdown]
# The draw itself is inverse transform sampling: take $u$ uniform in $[0, 1)$ and return the
# first token where the running sum of the probabilities passes $u$. `rng.choice(V, p=probs)`
# does exactly that, and so does `draw(probs, rng.random())` — the same token from the same
# generator — but `rng.choice` first checks the whole vector and sums all 49 152 entries one by
# one: ~350 us a token, 7 % of a decode step. `draw` sums blocks of 256 first and only then the
# 256 entries of the block that holds $u$ (~20 us); likewise `largest` finds top-k's and top-p's
# candidates without partitioning the whole vocabulary. Whatever sampling costs is paid once per
# token, on top of the forward pass, so in a chat (which samples) it showed: 1.15x decode.

# %%
from minfer.sampling import draw

probs = expected
u = np.random.default_rng(7).random()
print("draw:", draw(probs, u), " rng.choice:", np.random.default_rng(7).choice(len(probs), p=probs))

# %% [markdown]
# ## Your turn
#
# ```bash
# python -m minfer lesson start 8
# python -m minfer lesson check 8
# ```
#
# Tasks: `apply_repetition_penalty(logits, seen, penalty)`, `filter_logits(logits, p)` and
# `sample(logits, p, rng, seen=None)`. The check runs each filter alone and then together, and
# draws 4 000 samples from your sampler to compare the frequencies with the probabilities.
#
# ??? note "Solution — minfer's reference (open it once yours passes, or once you are stuck)"
#     <!-- source minfer.sampling:apply_repetition_penalty,filter_logits,kept_softmax,sample -->
#
#     Outside this site: `minfer/sampling.py`.
#
# This is the last lesson of the reference path. Next come the fast paths: Numba kernels, quantized
# matmul and GPU kernels. **Next:** [09 · Numba](09_numba.md)
