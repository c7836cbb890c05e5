"""The draft-model proposer: a second, cheaper model guesses k tokens, one forward each.

Any model with the target's tokenizer can draft. The built-in pairing for a model is the model
itself in a cheaper form: the same file in its own 4-bit blocks (Q4_0 where it has none) with
int8 activations (on the numba backend with AVX-512 VNNI; float32 ones elsewhere) drafts for
the exact (float32 or Q8_0) model, so the exact model's text comes at closer to the cheap model's
speed; the numpy backend dequantizes every format, so there the built-in draft is no cheaper.
(The default model's file holds Q4_1 blocks: its float32 weights are those blocks dequantized,
and the draft differs only by the int8 rounding of its activations; re-quantized to Q4_0 it would
agree on the top token a third less often.)

The draft keeps its own KV cache (its own block pool, from its own engine) and, per sequence, how
many of the sequence's tokens have their K/V there (`computed`). Each step:

    prefill     while the target computes a prompt, the draft computes it too (`prefill`)
    catch up    feed the tokens the draft has not seen (the target's correction of last step and
                any accepted tokens the draft did not feed; the whole prompt if it missed it)
    draft       k - 1 more forwards of one token each; d_1..d_k, and the draft's distribution q
                at each (sampling) — all sequences of the step batched together
    rollback    after verification only the accepted prefix stays valid in the draft's cache:
                `computed` goes back, blocks past the end go back to the pool

Greedy requests draft greedily (a point mass: verify.py treats it as such); sampling requests
draw each d from q — q filtered exactly as the target's p (verify.row_probs).
"""
from __future__ import annotations

import numpy as np

from ..batch import make_batch
from ..sampling import draw
from .verify import row_logits, row_probs


class DraftProposer:
    name = "draft"

    def __init__(self, engine):
        """engine: the draft model's own Engine (its model, KV pool and block manager; its
        scheduler is not used)."""
        self.model, self.cache, self.blocks = engine.model, engine.cache, engine.blocks
        self.max_context = engine.max_context
        self.computed: dict[int, int] = {}         # seq id -> tokens with K/V in the draft cache

    # --- per sequence state ------------------------------------------------------------------------
    def _room(self, sid: int, n_tokens: int) -> bool:
        if n_tokens > self.max_context or not self.blocks.can_hold(sid, n_tokens):
            return False
        self.blocks.ensure(sid, n_tokens)
        return True

    def rollback(self, seq, n_valid: int) -> None:
        """Only the first n_valid tokens of seq (as it is now) match what the draft computed."""
        sid = seq.seq_id
        if sid in self.computed:
            self.computed[sid] = min(self.computed[sid], n_valid)
            self.blocks.trim(sid, self.computed[sid] + 1)

    def drop(self, seq_id: int) -> None:
        self.computed.pop(seq_id, None)
        self.blocks.release(seq_id)

    def held(self):
        """The sequences whose K/V the draft holds."""
        return self.computed.keys()

    def step_time(self, repeats: int = 3) -> float | None:
        """Seconds of one draft forward of one token (the cost of a guess)."""
        from .speculator import timed_forward
        return timed_forward(self.model, self.cache, self.blocks, 1, self.max_context, repeats)

    # --- prompts --------------------------------------------------------------------------------
    def prefill(self, chunks: list) -> None:
        """chunks: [(sequence, end)]: the target computes the sequence's prompt up to `end` this
        step; the draft computes its own K/V of the same tokens now (one forward for all), so
        that its first guesses wait for no prompt — the prompt's time is the prompt's, in both
        models."""
        entries = []
        for seq, end in chunks:
            sid = seq.seq_id
            done = self.computed.setdefault(sid, 0)
            if end <= done or not self._room(sid, end):
                continue
            entries.append((seq.tokens[done:end], done, self.blocks.tables[sid]))
            self.computed[sid] = end
        if entries:
            batch = make_batch(entries, self.cache.block_size, logits_for=[0] * len(entries))
            self.model.forward(batch, self.cache)

    # --- proposing -----------------------------------------------------------------------------
    def propose(self, wants: list) -> dict:
        """wants: [(sequence, k >= 1)] -> {sequence: (proposed ids [k], q [k, V] or None)}."""
        active = []                  # [seq, k, tokens seen, proposals, q rows, tokens computed]
        for seq, k in wants:
            sid = seq.seq_id
            tokens = seq.tokens
            done = self.computed.setdefault(sid, 0)
            if not self._room(sid, len(tokens) + k - 1):
                self.drop(sid)                       # no room in the draft's pool: no guesses now
                continue
            active.append([seq, k, tokens, [], [], done])
        out = {}
        step = 0
        while active:
            entries = []
            for a in active:
                seq, k, tokens, props, qs, done = a
                new = (tokens + props)[done:]        # catch up, then the last guess
                entries.append((new, done, self.blocks.tables[seq.seq_id]))
                a[5] = done + len(new)
            batch = make_batch(entries, self.cache.block_size)
            logits = self.model.forward(batch, self.cache)                   # [B, V]
            still = []
            for a, row in zip(active, logits):
                seq, k, tokens, props, qs, done = a
                p = seq.params
                seen = np.asarray(tokens + props, dtype=np.int64) if p.repetition_penalty != 1 else None
                if p.greedy:
                    props.append(int(np.argmax(row_logits(row, p, seen))))
                else:
                    q = row_probs(row, p, seen)                               # [V]
                    props.append(draw(q, seq.rng.random()))
                    qs.append(q)
                if len(props) < k:
                    still.append(a)
                else:
                    self.computed[seq.seq_id] = a[5]
                    out[seq] = (props, np.stack(qs) if qs else None)
            active = still
            step += 1
        return out
