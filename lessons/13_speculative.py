# %% [markdown]
# # 13 · Speculative decoding — guess, then check many tokens in one forward
#
# A decode step computes one token, and it reads every weight of the model to do it (lesson 09's
# roofline: a matrix–vector product does two flops per weight it reads, far too few to keep the
# arithmetic units busy). A forward of a few rows reads the same weights once and does a few
# times the arithmetic, which was idle anyway: **checking k guessed tokens can cost little more
# than computing one**. Speculative decoding turns that into speed: something cheap guesses the
# next k tokens, the model scores all of them in one forward, and the guesses it agrees with are
# kept — with *exactly* the model's output: the same text when greedy, the same distribution
# when sampling.
# Package: `minfer/spec/` — `verify.py` (the rules), `ngram.py` and `draft.py` (who guesses),
# `speculator.py` (the engine's two calls: propose before the batch, verify after the forward).
#
# !!! warning "These timings are live, and noisy"
#     They were measured when the page was built, on the machine that built it. Ratios hold
#     better than absolute times.

# %%
import time

import numpy as np

import minfer
from minfer.batch import make_batch
from minfer.classroom import show
from minfer.sampling import SamplingParams
from minfer.spec import verify
from minfer.spec.ngram import propose_ngram

# %% [markdown]
# ## 1 · What a forward of k + 1 rows costs
#
# Time the default model's forward for 1, 2, 4 and 8 new tokens after a 64-token context, on the
# numba backend (its weights in their file's 4-bit blocks), and the same model with float32
# weights (4x the bytes to read):

# %%
def forward_times(llm, rows=(1, 2, 4, 8), ctx=64, rounds=7):
    """The fastest of `rounds` forwards of each size, the sizes in turns: on a shared machine the
    slower ones were slowed by something else, and taking turns spreads a busy moment over all."""
    eng = llm.engine
    table = eng.blocks.ensure(-1, ctx + max(rows))
    ids = list(range(1000, 1000 + ctx + max(rows)))
    eng.model.forward(make_batch([(ids[:ctx], 0, table)], eng.cache.block_size), eng.cache)
    batches = {n: make_batch([(ids[ctx:ctx + n], ctx, table)], eng.cache.block_size, logits_for=[n])
               for n in rows}
    out = {n: float("inf") for n in rows}
    for r in range(rounds + 1):
        for n, batch in batches.items():
            t = time.perf_counter()
            eng.model.forward(batch, eng.cache)
            if r:                                   # round 0 warms up (and compiles)
                out[n] = min(out[n], time.perf_counter() - t)
    eng.blocks.release(-1)
    return out


q4 = minfer.LLM(quiet=True)
f32 = minfer.LLM(quant="f32", quiet=True)
times = {"Q4_1 blocks": forward_times(q4), "float32": forward_times(f32)}
for name, t in times.items():
    print(f"{name:12s}" + "  ".join(f"{n} rows {1e3 * s:6.1f} ms ({s / t[1]:.2f}x)" for n, s in t.items()))

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 3.2))
for name, t in times.items():
    ax.plot(list(t), [t[n] / t[1] for n in t], "o-", label=name)
ax.plot([1, 8], [1, 8], ":", color="grey", label="each row re-read (linear)")
ax.set_xlabel("rows in the forward (1 + guesses)")
ax.set_ylabel("time / time of 1 row")
ax.legend()
show(fig, "13_rows_cost")

# %% [markdown]
# The float32 forward streams 538 MB of weights, reading them once for all rows (4 rows of x
# against 4 weight rows at a time, in registers): more rows cost little next to the reading.
# The 4-bit forward reads ~8x fewer bytes, and its kernels read each loaded block for up to 4
# tokens too, but then the arithmetic on them is the larger part: every row adds its share.
# The curve is not a line either — tokens go 4 at a time, so the 4th row can cost more than
# the 3rd. The speculator measures this curve at its first step (`Speculator.calibrate`: the
# target's forward of 1, 2, ..., 1 + k_max rows), and how many guesses each sequence makes
# follows from it and from how often that sequence's guesses were right.
#
# ## 2 · The rules
#
# The target model scores the guesses $d_1 \dots d_k$ in one forward of $k + 1$ rows: the
# sequence's last token and the guesses. Row $i$ holds $p_i$, the distribution of the token after
# $d_1 \dots d_i$.
#
# **Greedy:** accept guesses while $d_{i+1} = \arg\max p_i$; then add $\arg\max p_m$ after the $m$
# accepted ones. Plain greedy decoding would have produced exactly these $m + 1$ tokens.
# Greedy rows need only each row's $\arg\max$, not $p_i$: on the numba backend the LM head then
# runs mostly on int8 activations, with a bound on how far those logits can be from the exact
# ones, and computes exactly only the few vocabulary rows that could be the largest
# (`minfer/cpu/greedy_head.py`) — the same $\arg\max$ for a third of the head's work.
#
# **Sampling** (Leviathan et al. 2023; Chen et al. 2023): the guess $d$ was drawn from the
# proposer's $q$. Accept it with probability $\min(1, p(d)/q(d))$; at the first rejection, draw
# from the residual $\max(0, p - q)$, normalised, and stop. The token that comes out is $x$ with
# probability
#
# $$ q(x) \min\left(1, \frac{p(x)}{q(x)}\right) + \Big(1 - \sum_y \min(p(y), q(y))\Big)
#    \frac{\max(0, p(x) - q(x))}{\sum_y \max(0, p(y) - q(y))} = \min(p, q)(x) + \max(0, p - q)(x) = p(x), $$
#
# because the rejection probability $1 - \sum_y \min(p, q)$ equals the residual's mass
# $\sum_y \max(0, p - q)$. A guess from text lookup has no $q$: it is a point mass, accepted with
# probability $p(d)$, and on rejection the token is drawn from $p$ without $d$. The engine draws
# that as plain sampling does (`verify.sample_as_plain`): at each place the token the plain
# sampler draws with the sequence's next random number, the guess accepted when it is that
# token — the same rule, and with a seed the very text of plain decoding.
#
# `p` and `q` are the distributions *after* the sampling filters (temperature, top-k, top-p,
# min-p, repetition penalty), each row with the tokens it has seen: `verify.row_probs` is
# `sampling.sample`'s own pipeline, so what is preserved is exactly what plain sampling draws from.

# %%
import inspect

# the rule's signature and contract; its body is this lesson's exercise (`lesson start 13`)
print(f"def verify_sample{inspect.signature(verify.verify_sample)}:")
print(f'    """{verify.verify_sample.__doc__}"""')

# %% [markdown]
# Checked empirically: a target $p$ over 6 tokens, a deliberately bad draft $q$, 20,000 draws
# of the first token that comes out — with the rule, and with a wrong rule that accepts every
# guess:

# %%
rng = np.random.default_rng(0)
p = np.array([[.30, .05, .25, .0, .30, .10], [.10, .40, .0, .20, .20, .10]])    # [k+1, V], k = 1
q = np.array([[.05, .50, .05, .20, .10, .10]])                                   # [k, V]
n = 20_000
guesses = np.minimum(np.searchsorted(np.cumsum(q[0]), rng.random(n), side="right"), 5)
us = rng.random((n, 2))


def first_tokens(rule):
    out = []
    for d, u in zip(guesses, us):
        m, tok = rule(p, q, np.array([d]), u)
        out.append(d if m else tok)
    return np.bincount(out, minlength=6) / n


freq = {"speculative (the rule)": first_tokens(verify.verify_sample_numba),
        "always accept (wrong)": first_tokens(verify.always_accept)}
fig, ax = plt.subplots(figsize=(7, 3))
w = 0.2
x = np.arange(6)
ax.bar(x - 1.5 * w, p[0], w, label="target p")
ax.bar(x - 0.5 * w, q[0], w, label="draft q")
for i, (name, f) in enumerate(freq.items()):
    ax.bar(x + (0.5 + i) * w, f, w, label=name)
ax.set_xlabel("token")
ax.set_ylabel("probability / frequency")
ax.legend(fontsize=8)
show(fig, "13_distribution")
for name, f in freq.items():
    print(f"{name:24s} total variation from p: {0.5 * np.abs(f - p[0]).sum():.4f}")

# %% [markdown]
# ## 3 · Who guesses
#
# **Prompt lookup** (`ngram.py`): find the latest earlier occurrence of the last few tokens, and
# guess that what followed it follows again. No second model; it shines when the answer repeats
# the prompt — code being edited, a quoted document.

# %%
tokens = np.array([7, 8, 9, 4, 7, 8, 9, 5, 6, 1, 8, 9])
print(propose_ngram(tokens, k=3))     # the last "8 9" came before "5 6 1" most recently

# %% [markdown]
# A match of one or two tokens is a weak witness: in real text short n-grams recur everywhere.
# The engine's proposer (`NgramProposer`) guesses only after a match of 3 or 4 tokens — on the
# benchmark's prompts, guesses after a 4-token match were right 7.3 times in 8, after a 1- or
# 2-token match almost never ([Benchmarks](../benchmarks.md#speculative-decoding)).

# %% [markdown]
# **A draft model** (`draft.py`): a smaller or cheaper model sharing the tokenizer guesses k
# tokens, one forward each, from its own KV cache. The built-in pairing is the model itself in a
# cheaper form drafting for the float32 model, `LLM(quant="f32", speculative="draft")`: the same
# file's 4-bit blocks (Q4_0 where the file has none) with int8 activations. The default model's
# file holds Q4_1 blocks — its float32 weights *are* those blocks, dequantized — so only the int8
# rounding of the activations makes the draft differ (`bench --quality`: the same top token 92 %
# of the time; re-quantized to Q4_0 it would be 67 %). The same file passed as `draft_model`
# drafts with float32 activations instead: a guess of one row costs about as much (one row reads
# the same weights either way), and it agrees with the float32 model but for rounding
# ([benchmarks](../benchmarks.md#speculative-decoding) compares the two).
#
# After a verification, only the accepted prefix stays valid in both KV caches. Rolling back is
# cheap: the rejected rows' keys and values lie past the sequence's new end, where attention does
# not look and the next tokens overwrite them; `n_computed` goes back, the blocks past the end go
# back to the pool, and only blocks whose every token was accepted are named in the prefix cache.
#
# ## 4 · Acceptance over a real answer
#
# The edit workload of `python -m minfer bench --speculative ngram`: rewrite a function with one name
# changed. Greedy, with prompt lookup; each bar is one verification step: the guesses made and
# the guesses accepted.

# %%
from minfer.bench import SPEC_WORKLOADS

spec = minfer.LLM(quiet=True, speculative="ngram")
prompt = spec.tokenizer.apply_chat_template([{"role": "user", "content": SPEC_WORKLOADS["edit"]}])
greedy = SamplingParams(temperature=0, max_tokens=120)
plain = q4.generate([prompt], greedy)[0]                # also warms the prefix cache of both
spec.generate([prompt], greedy)
sp = spec.engine.speculator
sp.reset_stats()
t0 = time.perf_counter()
out = spec.generate([prompt], greedy)[0]
t_spec = time.perf_counter() - t0
t0 = time.perf_counter()
q4.generate([prompt], greedy)
t_plain = time.perf_counter() - t0
print("same text as plain greedy decoding:", out.token_ids == plain.token_ids)
print(sp.stats())

fig, ax = plt.subplots(figsize=(8, 2.8))
ks, ms = zip(*sp.history) if sp.history else ((), ())
ax.bar(range(len(ks)), ks, color="lightgrey", label="guesses")
ax.bar(range(len(ms)), ms, label="accepted")
ax.set_xlabel("verification step")
ax.set_ylabel("tokens")
ax.legend()
show(fig, "13_acceptance")

# %% [markdown]
# The number of guesses changes from step to step: each sequence keeps a running estimate $a$
# of how often its guesses are accepted, and picks the $k$ that maximises the expected tokens
# per step, $(1 - a^{k+1}) / (1 - a)$, over what the step costs, $1 + c\,k$ (c: the measured cost
# of a guess). Where guessing does not pay, $k = 0$: a plain decode row, no slowdown.
#
# ## 5 · The speed-up, measured live

# %%
print(f"{len(out.token_ids)} tokens: plain {t_plain:.2f} s, with prompt lookup {t_spec:.2f} s "
      f"({t_plain / t_spec:.2f}x)")

# %% [markdown]
# How much faster depends on two things: how many guesses are accepted, and how much a row
# costs the forward. The second is where the kernels still have work to do for quantized
# weights; [Benchmarks](../benchmarks.md#speculative-decoding) has the figures of both
# workloads, and `python -m minfer bench --speculative ngram,draft,off` measures yours.
#
# ## Your turn
#
# ```bash
# python -m minfer lesson start 13
# python -m minfer lesson check 13
# ```
#
# Task: `verify_sample(p, q, proposals, u)`, the accept / resample rule. The check draws 20,000
# times with a bad draft and compares the tokens that come out with the target's distribution
# (a chi-square test): a rule that accepts every guess, or resamples from $p$ instead of the
# residual, fails it.
