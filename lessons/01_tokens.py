# %% [markdown]
# # 01 · Tokens: from text to ids and back
#
# A language model never sees characters. It sees **token ids**: integers that index a vocabulary
# of 49 152 entries for SmolLM2. The tokenizer cuts text into vocabulary entries, and the chat
# template decides what text the model sees in the first place. Module: `minfer/tokenizer.py`.
#
# Shape contract: `encode(text: str) -> list[int]` and `decode(ids) -> str`, with
# `decode(encode(text)) == text` for any string at all.
#
# The tokenizer lives in the GGUF file's metadata (vocabulary, merges, token types, template), so
# this lesson reads only the metadata, not the 135 M weights.

# %%
import numpy as np

from minfer.classroom import show
from minfer.tokenizer import StreamDecoder, Tokenizer
from minfer.weights.fetch import ensure_default_model
from minfer.weights.gguf import read_gguf

meta, tensors = read_gguf(ensure_default_model())     # memory-mapped: the weights are not read
tok = Tokenizer.from_gguf_metadata(meta)
print("tokenizer model:", meta["tokenizer.ggml.model"], "| pre-tokenizer:", meta["tokenizer.ggml.pre"])
print("vocabulary:", tok.vocab_size, "entries,", len(meta["tokenizer.ggml.merges"]), "merges")

# %% [markdown]
# ## Encoding a sentence

# %%
text = "Hello world! Tokenizers cut text into pieces."
ids = tok.encode(text)
print(ids)
print([tok.id_to_token(i) for i in ids])
assert tok.decode(ids) == text

# %% [markdown]
# Most common words are one token, rarer ones are split (`Token` + `izers`). The odd `Ġ` is a
# **space**: the tokens are stored as printable strings, and the space byte is written as `Ġ`.
#
# ## Byte-level: every string can be encoded
#
# Byte-level BPE (used by GPT-2, Llama 3, SmolLM2) works on the UTF-8 **bytes** of the text, not
# its characters. Its base vocabulary is the 256 possible bytes, so no input is ever "unknown":
# an emoji or a Chinese character that the vocabulary never learned still encodes, as its bytes.
# To keep every token printable, each byte is mapped to one visible character: the 188 bytes that
# are printable already stand for themselves, the other 68 (space, newline, control bytes...)
# are shifted to the characters U+0100 onwards. Space (0x20) is the 33rd of those, `Ġ` (U+0120).

# %%
for s in ["🍵", "ü", "日本"]:
    b = s.encode("utf-8")
    t = tok.encode(s)
    print(f"{s!r}: {len(b)} UTF-8 bytes {b.hex(' ')} -> {len(t)} tokens {[tok.id_to_token(i) for i in t]}")

# %% [markdown]
# ## Byte-pair encoding, by hand
#
# Encoding runs in two steps:
#
# 1. **Pre-tokenization** splits the text with a regular expression into word-like pieces
#    (a word with its leading space, a run of punctuation, a run of spaces); SmolLM2 also puts
#    every digit on its own. Merges never cross these boundaries.
# 2. **BPE** starts each piece as a list of byte symbols and repeatedly joins the adjacent pair
#    whose merge was learned earliest (lowest *rank*), until no learned pair remains.
#
# The merges come from the metadata, best first. Twelve lines apply them to one piece:

# %%
ranks = {tuple(m.split(" ")): r for r, m in enumerate(meta["tokenizer.ggml.merges"])}
print("first merges:", meta["tokenizer.ggml.merges"][:8])


def bpe(piece: str) -> list[str]:
    symbols = list(piece)
    while len(symbols) > 1:
        pairs = [(ranks.get(p, np.inf), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == np.inf:                    # no learned merge left
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        print(f"   merge rank {rank:5d}: {symbols}")
    return symbols


piece = "Ġtokenizers"                          # " tokenizers": the space already written as Ġ
mine = bpe(piece)
theirs = [tok.id_to_token(i) for i in tok.encode(" tokenizers")]
print(mine, "==", theirs)
assert mine == theirs

# %% [markdown]
# Digits are split one by one before BPE (the `smollm` pre-tokenizer), which keeps arithmetic
# regular: every number is spelled digit by digit.

# %%
for s in ["In 2024 we had 12345 tokens", "x=3.14159"]:
    print([tok.id_to_token(i) for i in tok.encode(s)])

# %% [markdown]
# A picture of where the cuts fall, on a sentence with a bit of everything:

# %%
import matplotlib.pyplot as plt

sample = "minfer reads GGUF files: 4-bit weights, 135M params 🍵"
pieces = [tok.decode([i]) for i in tok.encode(sample)]
fig, ax = plt.subplots(figsize=(10, 1.3))
x = 0.0
colors = ["#cfe0fb", "#fde2c4", "#d5f0d2", "#f6d0e4"]
for k, p in enumerate(pieces):
    label = p.replace(" ", "␣") if p.strip() or p == " " else p
    w = 0.12 + 0.095 * len(label)
    ax.add_patch(plt.Rectangle((x, 0), w, 1, color=colors[k % 4], ec="#555", lw=0.6))
    ax.text(x + w / 2, 0.5, label, ha="center", va="center", fontsize=10, family="DejaVu Sans")
    x += w + 0.03
ax.set_xlim(0, x)
ax.set_ylim(0, 1)
ax.axis("off")
ax.set_title(f"{len(pieces)} tokens (␣ = space; the emoji is several byte tokens, shown as one "
             f"replacement mark each)", fontsize=9)
show(fig, "01_token_boundaries")

# %% [markdown]
# ## Special tokens and the chat template
#
# Some vocabulary entries are **control tokens** that no text produces by accident:
# `<|im_start|>` and `<|im_end|>` open and close one turn of a conversation (the *ChatML*
# format). The model's template, a small Jinja program stored in the file, renders a
# conversation into text; minfer runs it in Jinja's sandbox because it comes from a file.

# %%
print(tok.chat_template[:300], "...")
messages = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi!"}]
prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
print(repr(prompt))
ids = tok.encode(prompt)
print([tok.id_to_token(i) for i in ids])
print("stop ids:", sorted(tok.stop_ids), [tok.id_to_token(i) for i in sorted(tok.stop_ids)])

# %% [markdown]
# `add_generation_prompt=True` ends the text with `<|im_start|>assistant\n`: an open turn that the
# model completes. Generation stops when the model produces a **stop id** (`<|im_end|>` here), and
# that token is not part of the answer.
#
# ## Streaming without broken characters
#
# When text is printed token by token, one character may span several tokens: the emoji above
# took several byte tokens. Decoding half of its bytes gives the replacement character `�`.
# `StreamDecoder` holds text back while it ends in `�` and releases it whole.

# %%
ids = tok.encode("Tea 🍵!")
dec = StreamDecoder(tok)
for i in ids:
    piece = dec.push(i)
    print(f"token {i:5d} {tok.id_to_token(i)!r:10}  naive: {tok.decode([i])!r:8}  streamed: {piece!r}")
print("flush:", repr(dec.flush()), "| total:", repr(dec.text))

# %% [markdown]
# ## Your turn
#
# ```bash
# python -m minfer lesson start 1
# python -m minfer lesson check 1
# ```
#
# Task: `bpe_ids(piece, merges, vocab)` — the whole encoding of one piece, by hand: from the
# GGUF's list of merges (`"left right"` strings, best first, as `meta["tokenizer.ggml.merges"]`
# holds them) and its vocabulary (`meta["tokenizer.ggml.tokens"]`: a token's id is its index) to
# the ids. The check tries a toy merge list where the order of the merges matters, and the
# merges of a small real tokenizer.
#
# **Next:** [02 · Weights](02_weights.md) — what else is in that file.
