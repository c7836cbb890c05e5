"""The generation loop: prefill every prompt in one forward, then decode all of them together.

    prefill : batch = all prompt tokens of all sequences   -> logits of each last token -> sample
    decode  : batch = the one new token of each live seq   -> logits                    -> sample
              ... until each sequence meets EOS, a stop string, max_tokens or the context end.

Each sequence owns blocks of the KV-cache pool (kvcache.BlockManager) from its first token until
it finishes. Single-request generation is a batch of one.

A chat sends the whole conversation each turn, and all but the newest message was in the previous
turn's prompt or answer. run(..., reuse_prefix=True) keeps that one sequence's blocks when it ends
(`Engine.kept`), and the next such run starts from them: the tokens its prompt shares with the kept
ones are already in the cache, so only the rest is prefilled (prefix caching, as vLLM and
llama.cpp's server do it; here for one conversation).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from ..batch import make_batch
from ..errors import PromptTooLongError, InvalidArgumentError
from ..model import Transformer
from ..sampling import SamplingParams, sample
from ..stages.kvcache import BlockManager


@dataclass
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    rng: np.random.Generator
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None   # "stop" (EOS or stop string), "length"
    n_reused: int = 0                  # prompt tokens whose K/V were kept from the run before
    n_cached: int = 0                  # positions 0..n_cached-1 have their K/V in the cache

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass
class Stats:
    prompt_tokens: int = 0             # prefilled (a reused prefix not counted)
    reused_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first token comes from the prefill; decode speed counts the tokens after it
        n = self.generated_tokens - 1
        return n / self.decode_s if self.decode_s > 0 and n > 0 else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0


class Engine:
    def __init__(self, model: Transformer, stop_ids: set[int], max_context: int | None = None,
                 block_size: int = 16):
        self.model = model
        self.stop_ids = set(stop_ids)
        self.max_context = min(max_context or model.config.max_seq_len, model.config.max_seq_len)
        self.cache = model.new_cache(n_blocks=32, block_size=block_size)
        self.blocks = BlockManager(self.cache)
        self._next_id = 0
        self.stats = Stats()
        self.kept: tuple[int, list[int]] | None = None   # (seq id, the tokens its blocks hold)

    # ------------------------------------------------------------------------------------------
    def check_prompt(self, ids: list[int]) -> None:
        if len(ids) == 0:
            raise InvalidArgumentError("the prompt is empty")
        if len(ids) >= self.max_context:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens but the context holds {self.max_context}; "
                f"shorten it (or truncate it explicitly)")
        vocab = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidArgumentError(f"token ids must be in 0..{vocab - 1}")

    def _new_seq(self, ids: list[int], params: SamplingParams) -> Sequence:
        self.check_prompt(ids)
        seq = Sequence(self._next_id, list(ids), params, np.random.default_rng(params.seed))
        self._next_id += 1
        return seq

    # ------------------------------------------------------------------------------------------
    def run(self, prompts: list[list[int]], params: list[SamplingParams],
            stop_check: Callable[[Sequence], bool] | None = None,
            reuse_prefix: bool = False) -> Iterator[tuple[int, int]]:
        """Generate for all prompts together; yield (prompt index, new token id) as tokens come.
        `stop_check(seq)` may end a sequence early (stop strings). Blocks are freed at the end,
        also when the caller stops iterating (Ctrl-C) — unless reuse_prefix (one prompt): then
        the sequence's blocks are kept for the next such run (see the top)."""
        seqs = [self._new_seq(p, sp) for p, sp in zip(prompts, params)]
        keep = reuse_prefix and len(seqs) == 1
        if keep:
            self._take_kept(seqs[0])
        else:
            self.drop_kept()
        self.stats = Stats(prompt_tokens=sum(len(s.prompt_ids) - s.n_reused for s in seqs),
                           reused_tokens=sum(s.n_reused for s in seqs))
        bs = self.cache.block_size
        try:
            # --- prefill: every prompt in one forward (from its first token not in the cache) -----
            t0 = time.perf_counter()
            for s in seqs:
                self.blocks.ensure(s.seq_id, len(s.prompt_ids))
            batch = make_batch([(s.prompt_ids[s.n_reused:], s.n_reused, self.blocks.tables[s.seq_id])
                                for s in seqs], bs)
            toks = self._next_tokens(seqs, batch)
            for s in seqs:
                s.n_cached = len(s.prompt_ids)
            yield from self._sample_all(seqs, seqs, toks, stop_check)
            self.stats.prefill_s = time.perf_counter() - t0
            # --- decode: one token per live sequence per step ---------------------------------
            t0 = time.perf_counter()
            while live := [s for s in seqs if s.finish_reason is None]:
                for s in live:
                    self.blocks.ensure(s.seq_id, s.n_tokens)
                batch = make_batch([([s.output_ids[-1]], s.n_tokens - 1, self.blocks.tables[s.seq_id])
                                    for s in live], bs)
                toks = self._next_tokens(live, batch)
                for s in live:
                    s.n_cached = s.n_tokens
                yield from self._sample_all(seqs, live, toks, stop_check)
            self.stats.decode_s = time.perf_counter() - t0
        finally:
            for s in seqs:
                if keep:
                    self.kept = (s.seq_id, (s.prompt_ids + s.output_ids)[:s.n_cached])
                else:
                    self.blocks.release(s.seq_id)
            self.last_seqs = seqs

    def _take_kept(self, seq: Sequence) -> None:
        """Hand the kept sequence's blocks to `seq`, for the tokens its prompt begins with (at
        least its last token is left to prefill: its logits give the first new token)."""
        if self.kept is None:
            return
        old_id, old_ids = self.kept
        self.kept = None
        limit = min(len(old_ids), len(seq.prompt_ids) - 1)
        n = 0
        while n < limit and old_ids[n] == seq.prompt_ids[n]:
            n += 1
        if n == 0:
            self.blocks.release(old_id)
            return
        self.blocks.tables[seq.seq_id] = self.blocks.tables.pop(old_id)  # positions >= n: rewritten
        seq.n_reused = n

    def drop_kept(self) -> None:
        """Free the kept sequence's blocks (if any)."""
        if self.kept is not None:
            self.blocks.release(self.kept[0])
            self.kept = None

    def _next_tokens(self, live, batch) -> list[int]:
        """One forward; the next token of each live sequence. A model that samples on its device
        (the cuda backend) returns only the ids; otherwise the logits come back and are sampled here."""
        if getattr(self.model, "samples_on_device", False) and all(
                s.params.repetition_penalty == 1 for s in live):
            return self.model.forward_sample(batch, self.cache, [s.params for s in live],
                                             [s.rng for s in live])
        logits = self.model.forward(batch, self.cache)                      # [B, V]
        return [sample(row, s.params, s.rng,
                       np.asarray(s.prompt_ids + s.output_ids) if s.params.repetition_penalty != 1 else None)
                for s, row in zip(live, logits)]

    def _sample_all(self, seqs, live, toks, stop_check):
        for s, tok in zip(live, toks):
            s.output_ids.append(tok)
            self.stats.generated_tokens += 1
            if tok in self.stop_ids and not s.params.ignore_eos:
                s.output_ids.pop()          # EOS / end-of-turn ends the answer; it is not text
                s.finish_reason = "stop"
                continue
            if stop_check is not None and stop_check(s):
                s.finish_reason = "stop"
            elif len(s.output_ids) >= s.params.max_tokens:
                s.finish_reason = "length"
            elif s.n_tokens >= self.max_context:
                s.finish_reason = "length"
            yield seqs.index(s), tok

    # ------------------------------------------------------------------------------------------
    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of one sequence, in one forward: [T, V] float32."""
        seq = self._new_seq(ids, SamplingParams())
        try:
            table = self.blocks.ensure(seq.seq_id, len(ids))
            batch = make_batch([(ids, 0, table)], self.cache.block_size, all_logits=True)
            return np.asarray(self.model.forward(batch, self.cache), dtype=np.float32)
        finally:
            self.blocks.release(seq.seq_id)
