"""The prefix cache: full KV blocks found again by the tokens that filled them.

The keys and values of a token depend on that token and on every token before it. So a full
block of the pool is named by a hash chained over the blocks before it:

    h_0 = hash((None, tokens[0:bs]))
    h_i = hash((h_{i-1}, tokens[i*bs:(i+1)*bs]))

Two sequences whose first i blocks of tokens are equal get the same h_i, and the second can use
the first one's block instead of computing it again: a chat's next turn (its prompt is the last
turn's prompt and answer, plus a new message), many requests with one system prompt. vLLM and
nano-vllm name blocks the same way.

This module only maps hashes to block ids. The block manager (block_manager.py) owns the blocks:
it asks here before it computes, tells here when a block becomes full, and tells here when a block
is given to other tokens (then its hash is forgotten). A freed block keeps its hash until then, so
a request that comes back later still finds it (least recently freed blocks are reused first).
"""
from __future__ import annotations


def block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """The chained hash of one full block. The same within one process, which is all the cache
    needs (before Python 3.12 hash(None), and so every chain, differs between runs)."""
    return hash((parent, tokens))


def block_hashes(tokens: list[int], block_size: int) -> list[int]:
    """The chained hash of each full block of `tokens` (a last, partial block has none yet: its
    tokens are still coming)."""
    hashes, h = [], None
    for i in range(len(tokens) // block_size):
        h = block_hash(h, tuple(tokens[i * block_size:(i + 1) * block_size]))
        hashes.append(h)
    return hashes


class PrefixCache:
    def __init__(self):
        self.block_of: dict[int, int] = {}                       # hash -> block id
        self.key_of: dict[int, tuple[int, tuple]] = {}           # block id -> (hash, its tokens)

    def lookup(self, h: int, tokens: tuple) -> int | None:
        """The block holding these tokens after this parent chain, or None. The tokens are compared
        too: two different blocks with one hash (a collision) must never be mixed up."""
        b = self.block_of.get(h)
        if b is None or self.key_of[b][1] != tokens:
            return None
        return b

    def insert(self, h: int, tokens: tuple, block: int) -> None:
        if h in self.block_of:       # another sequence filled the same tokens first: keep that one
            return
        self.forget(block)
        self.block_of[h] = block
        self.key_of[block] = (h, tokens)

    def forget(self, block: int) -> None:
        """The block is about to hold other tokens."""
        key = self.key_of.pop(block, None)
        if key is not None and self.block_of.get(key[0]) == block:
            del self.block_of[key[0]]

    def __contains__(self, block: int) -> bool:
        return block in self.key_of

    def __len__(self) -> int:
        return len(self.block_of)
