"""The engine: requests in, tokens out, one step at a time (continuous batching).

    add_request(prompt ids, sampling params)      -> a Sequence, waiting
    step():  scheduler.schedule()                 which sequences, how many tokens each
             make_batch(...)                      their tokens, positions, block tables, slots
             model.forward(batch, cache)          K/V written to the pool, logits of last rows
             sample, update, finish               -> [(sequence, its new token ids)]
    abort(seq_id)                                 frees its blocks at once

A request that arrives while others are decoding joins the very next step; one that finishes
leaves at once and its blocks go to whoever needs them. Single-request generation is the same
loop with one sequence. The KV pool is allocated once, here, from a memory budget; prefix caching
(prefix_cache.py) shares full blocks between requests that begin with the same tokens.

The engine is not thread-safe by itself; callers that step it from several threads hold
`engine.lock` (llm.py does).
"""
from __future__ import annotations

import itertools
import threading
import time

import numpy as np

from ..batch import make_batch
from ..errors import InvalidArgumentError, PromptTooLongError, check_finite
from ..interrupt import deferred_sigint, own_exception
from ..sampling import SamplingParams, sample
from .block_manager import BlockManager
from .scheduler import Scheduler
from .sequence import Sequence

DEFAULT_KV_CACHE_MB = 512
DEFAULT_MAX_SEQS = 32
DEFAULT_MAX_BATCH_TOKENS = 256


class Engine:
    def __init__(self, model, stop_ids, max_context: int | None = None, block_size: int = 16,
                 kv_cache_mb: float = DEFAULT_KV_CACHE_MB, max_seqs: int = DEFAULT_MAX_SEQS,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, prefix_caching: bool = True):
        c = model.config
        for name, v in (("block_size", block_size), ("max_seqs", max_seqs),
                        ("max_batch_tokens", max_batch_tokens)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise InvalidArgumentError(f"{name} must be an integer >= 1, got {v!r}")
        if max_batch_tokens < max_seqs:
            raise InvalidArgumentError(f"max_seqs ({max_seqs}) is more than max_batch_tokens "
                                       f"({max_batch_tokens}), and a step holds a token of each "
                                       f"sequence: lower max_seqs or raise max_batch_tokens")
        if max_context is not None and (not isinstance(max_context, (int, np.integer)) or max_context < 2):
            raise InvalidArgumentError(f"max_context must be an integer >= 2, got {max_context!r}")
        number = (isinstance(kv_cache_mb, (int, float, np.integer, np.floating))
                  and not isinstance(kv_cache_mb, bool))
        if not number or not 0 < kv_cache_mb < float("inf"):
            raise InvalidArgumentError(f"the KV cache budget must be a finite number of MB > 0, "
                                       f"got {kv_cache_mb!r}")
        self.model = model
        self.stop_ids = set(stop_ids)
        # --- the pool: as many blocks as the budget pays for, no more than max_seqs full contexts --
        # (a context capped by max_context needs no more than the cap)
        block_bytes = 2 * c.n_layers * block_size * c.n_kv_heads * c.head_dim * 4   # K and V, float32
        per_seq = -(-min(max_context or c.max_seq_len, c.max_seq_len) // block_size)
        n_blocks = min(int(kv_cache_mb * 2**20) // block_bytes, max(2, max_seqs * per_seq))
        if n_blocks < 2:
            raise InvalidArgumentError(
                f"a KV cache of {kv_cache_mb} MB holds fewer than 2 blocks of {block_size} tokens "
                f"({block_bytes / 2**20:.2f} MB each); give it more (--kv-cache-mb)")
        self.cache = model.new_cache(n_blocks=n_blocks, block_size=block_size)
        self.blocks = BlockManager(self.cache, prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_seqs, max_batch_tokens)
        # a sequence must fit the whole pool alone: the context is capped to it
        self.max_context = min(max_context or c.max_seq_len, c.max_seq_len, n_blocks * block_size)
        # what sets it, for the message of a prompt too long (what to change for a longer one)
        wanted = min(max_context or c.max_seq_len, c.max_seq_len)
        if self.max_context < wanted:
            self._context_set_by = (f"the KV cache of {kv_cache_mb:g} MB holds {self.max_context} "
                                    f"tokens (kv_cache_mb / --kv-cache-mb)")
        elif wanted < c.max_seq_len:
            self._context_set_by = (f"the context is set to {self.max_context} tokens (max_context / "
                                    f"--max-context)")
        else:
            self._context_set_by = f"the model's context is {self.max_context} tokens"
        self.seqs: dict[int, Sequence] = {}          # unfinished requests by id
        self._ids = itertools.count()
        self.lock = threading.RLock()
        self.generated_tokens = 0                    # totals since start, for metrics
        self.computed_tokens = 0
        self.steps = 0
        self.speculator = None                       # spec.Speculator: guesses verified each step

    # --- requests ----------------------------------------------------------------------------------
    def check_prompt(self, ids: list[int], room: int = 1) -> None:
        """A prompt that fits with `room` tokens to generate after it (logits: none), or an error."""
        if len(ids) == 0:
            raise InvalidArgumentError("the prompt is empty")
        if len(ids) > self.max_context - room:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens but at most {self.max_context - room} fit: "
                f"{self._context_set_by}{', one of them for the answer' if room else ''}; "
                f"shorten it")
        vocab = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidArgumentError(f"token ids must be in 0..{vocab - 1}")

    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    stop_check=None, into: list | None = None) -> Sequence:
        """Queue a request; it joins the next step that has room. stop_check(seq) -> bool may end
        it early (stop strings). `into`, a caller's list, gets the sequence before it is queued:
        an exception (a program's own signal handler) between the queueing and the return still
        leaves the caller holding it, to abort."""
        ids = [int(i) for i in prompt_ids]
        self.check_prompt(ids)
        with self.lock:
            seq = Sequence(next(self._ids), ids, params, np.random.default_rng(params.seed), stop_check)
            if into is not None:
                into.append(seq)
            self.seqs[seq.seq_id] = seq
            self.scheduler.add(seq)
        return seq

    def abort(self, seq_id: int) -> None:
        """Stop a request now and free its blocks (nothing else running is disturbed)."""
        with self.lock:
            seq = self.seqs.pop(seq_id, None)
            if seq is None:
                raise InvalidArgumentError(f"no unfinished request has id {seq_id}")
            self.scheduler.finish(seq, "abort")
            if self.speculator is not None:
                self.speculator.forget(seq_id)

    def repair(self) -> None:
        """After an exception from outside (a program's own signal handler) and the aborts that
        follow it: give back any block the interrupted bookkeeping left out of every table, in
        the pool and in a draft model's own."""
        with self.lock:
            self.blocks.reconcile()
            draft = getattr(self.speculator, "proposer", None)
            if getattr(draft, "blocks", self.blocks) is not self.blocks:
                draft.blocks.reconcile()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- one step --------------------------------------------------------------------------------------
    def step(self) -> list[tuple[Sequence, list[int]]]:
        """Run one forward over the scheduled sequences; -> each sequence that sampled, with its
        new token ids ([] when it ended on EOS). A finished sequence has .finished set."""
        with self.lock, own_exception():
            scheduled = self.scheduler.schedule()
            if not scheduled:
                return []
            # speculative decoding: some decoding sequences bring guesses too (spec/)
            drafts = self.speculator.propose(scheduled) if self.speculator else {}
            entries, sampling = [], []
            for seq, n in scheduled:
                guesses = drafts[seq][0] if seq in drafts else []
                if seq.n_pending == 1:          # a decode: the token it sampled last step
                    new = [seq.output_ids[-1] if seq.output_ids else seq.prompt_ids[-1]] + guesses
                else:
                    new = seq.tokens[seq.n_computed:seq.n_computed + n]
                entries.append((new, seq.n_computed, self.blocks.tables[seq.seq_id]))
                # caught up: sample next (from the last row, or from each row when guessing)
                sampling.append((seq.n_computed + n == seq.n_tokens) * (1 + len(guesses)))
            batch = make_batch(entries, self.cache.block_size, logits_for=sampling)
            live = [seq for (seq, _), s in zip(scheduled, sampling) if s]
            decided = None
            if drafts:
                with deferred_sigint():   # (cuda: verified on the device; numba: greedy rows' arg-max)
                    decided = self.speculator.forward_verify(live, batch, drafts)
                    logits = None if decided else self.model.forward(batch, self.cache)  # [R, V]
                if logits is not None:
                    check_finite(logits, "forward pass (the logits)")
            else:
                toks = self._next_tokens(live, batch)
            for seq, n in scheduled:
                self.scheduler.computed(seq, n)
                self.computed_tokens += n
            self.computed_tokens += sum(len(ids) for ids, _ in drafts.values())   # the guesses' rows
            self.steps += 1
            if drafts:          # the accepted guesses and one more token each; the rest rolled back
                return [self._extend(seq, ids)
                        for seq, ids in self.speculator.verify(live, logits, drafts, decided)]
            return [self._append(seq, tok) for seq, tok in zip(live, toks)]

    def _next_tokens(self, live: list[Sequence], batch) -> list[int]:
        """One forward; the next token of each sequence in `live`. A model that samples on its
        device (the cuda backend) returns only the ids, and so does one that finds the arg-max
        rows of greedy steps itself (the numba backend's forward_argmax); otherwise the logits
        come back and are sampled here."""
        with deferred_sigint():
            if (live and getattr(self.model, "samples_on_device", False)
                    and all(s.params.repetition_penalty == 1 for s in live)):
                return self.model.forward_sample(batch, self.cache, [s.params for s in live],
                                                 [s.rng for s in live])
            if (live and hasattr(self.model, "forward_argmax")
                    and all(s.params.plain_argmax for s in live)):
                ids = self.model.forward_argmax(batch, self.cache)   # (numba: most of the LM
                if ids is not None:                                  # head on int8 x, exact)
                    return [int(i) for i in ids]
            logits = self.model.forward(batch, self.cache)                      # [R, V]
        check_finite(logits, "forward pass (the logits)")
        return [sample(row, s.params, s.rng,
                       np.asarray(s.tokens) if s.params.repetition_penalty != 1 else None)
                for s, row in zip(live, logits)]

    def _append(self, seq: Sequence, tok: int) -> tuple[Sequence, list[int]]:
        now = time.perf_counter()
        m = seq.metrics
        if m.first_token is None:
            m.first_token = now
        m.token_times.append(now)
        self.generated_tokens += 1
        eos = tok in self.stop_ids and not seq.params.ignore_eos
        if not eos:                          # EOS / end-of-turn ends the answer; it is not text
            seq.output_ids.append(tok)
        if eos or (seq.stop_check is not None and seq.stop_check(seq)):
            reason = "stop"
        elif len(seq.output_ids) >= seq.params.max_tokens or seq.n_tokens >= self.max_context:
            reason = "length"
        else:
            reason = None
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self.seqs.pop(seq.seq_id, None)
            if self.speculator is not None:
                self.speculator.forget(seq.seq_id)
        return seq, ([] if eos else [tok])

    def _extend(self, seq: Sequence, ids: list[int]) -> tuple[Sequence, list[int]]:
        """_append several tokens; none after one that ends the sequence."""
        out = []
        for tok in ids:
            out += self._append(seq, tok)[1]
            if seq.finished:
                break
        return seq, out

    def run(self, prompts: list[list[int]], params: list[SamplingParams]):
        """Add the prompts, then step until all are done: yields (prompt index, new token id) as
        tokens come — a batch job in a few lines. Leaving the loop early aborts the rest."""
        seqs: list[Sequence] = []
        try:
            for p, sp in zip(prompts, params):
                self.add_request(p, sp, into=seqs)
            index = {s.seq_id: i for i, s in enumerate(seqs)}
            while any(not s.finished for s in seqs):
                for seq, new in self.step():
                    for tok in new:
                        yield index[seq.seq_id], tok
        except GeneratorExit:                   # closed at a yield: nothing was half-done
            raise
        except BaseException:
            self._abort_all(seqs)
            self.repair()
            raise
        finally:
            self._abort_all(seqs)

    def _abort_all(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            if s.seq_id in self.seqs:
                self.abort(s.seq_id)

    # --- serving figures -------------------------------------------------------------------------
    def stats(self) -> dict:
        s = self.scheduler
        out = dict(running=len(s.running), waiting=len(s.waiting),
                    blocks_used=self.blocks.n_used, blocks_free=self.blocks.n_free,
                    blocks_total=self.blocks.n_blocks,
                    cached_blocks=len(self.blocks.prefix) if self.blocks.prefix is not None else 0,
                    prompt_tokens=s.prompt_tokens, cached_prompt_tokens=s.cached_tokens,
                    computed_tokens=self.computed_tokens, generated_tokens=self.generated_tokens,
                    preemptions=s.n_preemptions, steps=self.steps)
        sp = self.speculator
        if sp is not None:                 # totals of the guessing (spec/speculator.py)
            out.update(spec_verify_steps=sp.steps, spec_proposed=sp.proposed, spec_accepted=sp.accepted)
            draft = getattr(sp.proposer, "blocks", None)     # a draft model's own KV pool
            if draft is not None:
                out.update(draft_blocks_used=draft.n_used, draft_blocks_total=draft.n_blocks)
        return out

    # --- raw logits ------------------------------------------------------------------------------------
    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of one sequence, in one forward: [T, V] float32. Uses free
        blocks of the pool for the moment (the prefix cache is not consulted, but the free blocks
        it takes lose any cached prefix they held)."""
        ids = [int(i) for i in ids]
        self.check_prompt(ids, room=0)
        with self.lock:
            seq_id = -1 - next(self._ids)          # an id no request has
            if not self.blocks.can_hold(seq_id, len(ids)):
                raise InvalidArgumentError("the KV cache has no room for these logits now; "
                                           "try again when fewer requests run")
            try:
                table = self.blocks.ensure(seq_id, len(ids))
                batch = make_batch([(ids, 0, table)], self.cache.block_size, all_logits=True)
                with deferred_sigint():
                    out = self.model.forward(batch, self.cache)
                check_finite(out, "forward pass (the logits)")
                return np.asarray(out, dtype=np.float32)
            finally:
                self.blocks.release(seq_id)
