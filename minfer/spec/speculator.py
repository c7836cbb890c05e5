"""Speculative decoding inside the engine: propose before the batch, verify after the forward.

The engine calls it at two points of a step (engine.py), three on a device that verifies:

    drafts = speculator.propose(scheduled)   for each sequence that decodes this step, k guesses;
                                             its batch rows become its last token + the guesses,
                                             and all of them ask for logits (batch.py); a
                                             draft model computes the step's prompt chunks too
    (forward: the target scores every guess in the same forward as everyone else's tokens —
     on the cuda backend speculator.forward_verify runs it and the rule on the device:
     greedy or sampling, without a repetition penalty; on the numba backend, when every row is
     greedy, the model gives each row's arg-max and not its logits)
    speculator.verify(live, logits, drafts)  -> [(sequence, ids to emit)]: the accepted guesses
                                             and one token more; the K/V of rejected guesses
                                             rolled back

Rollback costs nothing: the rejected rows' keys and values sit past the sequence's new end,
where attention never looks (it reads positions < the sequence's length) and the next tokens
overwrite them; n_computed advances by the accepted guesses only (the rejected ones were never
counted), the blocks past the new end return to the pool, and only blocks whose every token is
accepted are named in the prefix cache.

How many guesses: each sequence keeps a running estimate a of how often a guess is accepted.
With k guesses a step emits (1 - a^(k+1)) / (1 - a) tokens on average and costs costs[k]
plain steps (the target's forward of 1 + k rows, plus what drafting k guesses costs); k is the
one that maximises tokens per cost, 0 when guessing does not pay (a plain decode row: no
slowdown on text where nothing is accepted). A sequence at k = 0 tries one guess now and then
(every 8 steps, then 16, ... while the guesses keep failing), to notice when the text turns
repetitive.

The costs are measured, not assumed, at the first step (`calibrate`): forwards of 1, 2, ...,
1 + k_max rows against one of 1 row give what k guesses cost the target — a curve, not a line:
the CPU kernels take tokens 4 at a time (3 guesses cost little more than 2, the 4th more), and
a float32 target reads its weights once for all rows (guesses nearly free) — and a draft
forward against a target one what drafting a guess costs. When many-row forwards get cheaper,
the measured costs drop and k grows by itself.
"""
from __future__ import annotations

import time
from collections import deque

import numpy as np

from ..sampling import sample
from .verify import greedy_ids, probs_rows, sample_as_plain, verify_greedy_numba, verify_sample_numba

DEFAULT_K = 8            # most guesses per step (docs/benchmarks.md, "Speculative decoding")
ROW_COST = 0.3           # one more row in the target's forward, in decode steps (until measured)
DRAFT_COST = 0.5         # one draft forward, in target decode steps (until measured)
HISTORY = 4096           # verifications remembered for figures


class _Adapt:
    """One sequence's acceptance estimate and its choice of k."""

    def __init__(self, k_max: int, probe_every: int = 8, decay: float = 0.7):
        self.k_max, self.probe_first, self.decay = k_max, probe_every, decay
        self.probe_every = probe_every
        self.hits, self.tries = 2.0, 2.5            # a prior: a = 0.8, forgotten in a few steps
        self.idle = 0
        self.probing = False
        self._best = None                           # (costs, k): the choice until the next update

    @property
    def rate(self) -> float:
        return self.hits / self.tries

    def best_k(self, costs: tuple) -> int:
        """The k that gives the most tokens per cost at the current rate (0: guessing does not
        pay). costs[k]: a step with k guesses, in plain steps (costs[0] = 1)."""
        if self._best is None or self._best[0] is not costs:
            a = min(self.rate, 0.999)
            best, best_gain = 0, 1.0
            for k in range(1, min(self.k_max, len(costs) - 1) + 1):
                gain = (1 - a ** (k + 1)) / (1 - a) / costs[k]
                if gain > best_gain * 1.02:              # a clear gain only
                    best, best_gain = k, gain
            self._best = (costs, best)
        return self._best[1]

    def choose(self, costs: tuple) -> int:
        best = self.best_k(costs)
        if best == 0:               # a plain decode step, no search; now and then one guess
            self.idle += 1
            if self.idle >= self.probe_every:
                self.idle, self.probing = 0, True
                return 1
        return best

    def update(self, k: int, m: int) -> None:
        """m of k guesses accepted (a rejection ends the run: one miss)."""
        if self.probing:             # a failed probe waits twice as long for the next one
            self.probe_every = self.probe_first if m else min(8 * self.probe_first, 2 * self.probe_every)
            self.probing = False
        d = self.decay
        self.hits = d * self.hits + m
        self.tries = d * self.tries + m + (1 if m < k else 0)
        self._best = None


class Speculator:
    def __init__(self, engine, proposer, k_max: int = DEFAULT_K, row_cost: float | None = None,
                 draft_cost: float | None = None, adaptive: bool = True):
        """proposer: ngram.NgramProposer or draft.DraftProposer. row_cost, draft_cost: what a
        guess costs, in target decode steps (None: measured at the first step — the target's
        as a curve over 1 .. k_max guesses). adaptive False: always k_max guesses (when the
        proposer has them)."""
        self.engine, self.proposer, self.k_max = engine, proposer, k_max
        self.row_cost, self.draft_cost = row_cost, draft_cost
        self.forward_costs = None          # [k]: the target's forward of 1 + k rows, in plain steps
        self._costs = None                 # [k]: a step with k guesses, drafting included
        if proposer.name != "draft":
            self.draft_cost = 0.0
        self.adaptive = adaptive
        self.adapt: dict[int, _Adapt] = {}
        self.steps = self.proposed = self.accepted = self.emitted = 0   # totals, for figures
        # (guesses, accepted) of the latest verifications (bounded: a server runs for days)
        self.history: deque[tuple[int, int]] = deque(maxlen=HISTORY)

    # --- before the batch ----------------------------------------------------------------------
    def propose(self, scheduled) -> dict:
        """scheduled: [(sequence, n tokens)] from the scheduler -> {sequence: (guesses, q or
        None)} for the decoding sequences that guess this step; their blocks are allocated."""
        eng = self.engine
        # ended while the speculator was not the engine's (bench swaps it out): forgotten now
        for sid in [s for s in {*self.adapt, *self.proposer.held()} if s not in eng.seqs]:
            self.forget(sid)
        budget = eng.scheduler.max_tokens - sum(n for _, n in scheduled)
        blocks = eng.blocks
        spare = blocks.n_free                              # free blocks not yet promised this step
        wants, chunks = [], []
        for seq, n in scheduled:
            if seq.n_pending > 1:                          # a prompt chunk: the draft's too
                chunks.append((seq, seq.n_computed + n))
                continue
            if n != 1 or budget <= 0:
                continue                                   # no budget left
            if self.adaptive and (self.row_cost is None or self.draft_cost is None):
                self.calibrate()
            ad = self.adapt.get(seq.seq_id)
            if ad is None:
                ad = self.adapt[seq.seq_id] = _Adapt(self.k_max)
            k = ad.choose(self.costs) if self.adaptive else self.k_max
            if k == 0:
                continue                                   # a plain decode row this step
            k = min(k, budget, seq.params.max_tokens - len(seq.output_ids) - 1,
                    eng.max_context - seq.n_tokens)
            have = len(blocks.tables.get(seq.seq_id, ()))
            if blocks.blocks_for(seq.n_tokens + k) - have > spare:   # what its blocks and the
                k = (have + spare) * blocks.block_size - seq.n_tokens  # spare ones hold
            if k > 0:
                wants.append((seq, k))
                budget -= k
                spare -= max(0, blocks.blocks_for(seq.n_tokens + k) - have)
        if chunks and hasattr(self.proposer, "prefill"):   # (a proposer with a model of its own)
            self.proposer.prefill(chunks)
        drafts = self.proposer.propose(wants) if wants else {}
        for seq, (ids, _) in drafts.items():
            blocks.ensure(seq.seq_id, seq.n_tokens + len(ids))
        return drafts

    def forget(self, seq_id: int) -> None:
        """A sequence ended (finished, aborted): its estimate and the proposer's state go — the
        draft's K/V blocks too, also of one that ended in its prompt or at its first token."""
        self.adapt.pop(seq_id, None)
        self.proposer.drop(seq_id)

    # --- the forward, where the model can verify on its device ----------------------------------
    def forward_verify(self, live, batch, drafts: dict) -> dict | None:
        """On a model that verifies where its logits are (the cuda backend): the forward and the
        rule there -> {sequence: (accepted, next token)}; only those come back. (On one that
        finds greedy rows' arg-max itself, when every row is greedy: the same, from those ids.)
        Each sampling sequence draws its uniforms here, as many as the host's rule would: a
        draft's guesses one a guess and one more, a plain row one, n-gram guesses one for each
        token emitted (k + 1 drawn, the generator then set back to m + 1). None: the host
        verifies (a repetition penalty, or a model without it)."""
        model = self.engine.model
        if (not getattr(model, "verifies_on_device", False) and hasattr(model, "forward_argmax")
                and all(s.params.plain_argmax for s in live)):
            return self._forward_argmax(live, batch, drafts)
        if not getattr(model, "verifies_on_device", False) or any(
                s.params.repetition_penalty != 1 for s in live):
            return None
        n = np.array([len(drafts[s][0]) if s in drafts else 0 for s in live], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(n + 1)])                # [B + 1] rows a sequence
        props = np.zeros((len(live), max(1, int(n.max(initial=0)))), dtype=np.int64)
        for i, s in enumerate(live):
            props[i, :n[i]] = drafts[s][0] if s in drafts else []
        sampling = None
        if any(not s.params.greedy for s in live):
            R, V = int(starts[-1]), model.config.vocab_size
            row_params = np.zeros((R, 5), dtype=np.float32)      # as gpu/sampling.params_array
            rewind = {}
            u = np.zeros((len(live), props.shape[1] + 1))
            point_mass = np.ones(len(live), dtype=np.int64)
            q_rows = None
            for i, s in enumerate(live):
                p = s.params
                if p.greedy:
                    continue                                       # temperature 0: the arg-max
                row_params[starts[i]:starts[i + 1], :4] = (p.temperature, p.top_k, p.top_p, p.min_p)
                q = drafts[s][1] if s in drafts else None
                if q is None and n[i]:     # drawn as plain sampling: m + 1 numbers used, below
                    rewind[i] = s.rng.bit_generator.state
                u[i, :n[i] + 1] = s.rng.random(n[i] + 1)
                if q is not None:
                    if q_rows is None:
                        q_rows = np.zeros((R, V), dtype=np.float32)
                    q_rows[starts[i]:starts[i] + n[i]] = q
                    point_mass[i] = 0
            sampling = (row_params, u, q_rows, point_mass)
        out = model.forward_verify(batch, self.engine.cache, starts, props, n, sampling)   # [B, 2]
        for i, state in (rewind if sampling else {}).items():   # as many numbers as the host's
            live[i].rng.bit_generator.state = state                  # sample_as_plain draws
            live[i].rng.random(int(out[i][0]) + 1)
        return {s: (int(m), int(nxt)) for s, (m, nxt) in zip(live, out)}

    def _forward_argmax(self, live, batch, drafts: dict) -> dict | None:
        """Every row greedy: the model's arg-max of each row (forward_argmax: the numba backend
        finds it with most of the LM head on int8 x, the same ids) and the greedy rule on them
        -> {sequence: (accepted, next token)}; None where the model would rather give logits."""
        ids = self.engine.model.forward_argmax(batch, self.engine.cache)          # [R]
        if ids is None:
            return None
        out, r = {}, 0
        for s in live:
            props = drafts[s][0] if s in drafts else []
            rows = ids[r:r + len(props) + 1]                                       # [k + 1]
            r += len(props) + 1
            m, nxt = verify_greedy_numba(rows, np.asarray(props, dtype=np.int64))
            out[s] = (int(m), int(nxt))
        return out

    # --- after the forward -------------------------------------------------------------------------
    def verify(self, live, logits: np.ndarray | None, drafts: dict, decided: dict | None = None) -> list:
        """live: the sequences that sample this step, in batch order; logits [R, V]: 1 row each,
        1 + its guesses for those in drafts -> [(sequence, token ids to emit)]. The engine has
        counted the last token as computed; the accepted guesses are counted here.
        decided: forward_verify's (accepted, next) per sequence, instead of logits."""
        out, r = [], 0
        blocks = self.engine.blocks
        for seq in live:
            if seq not in drafts:
                p = seq.params
                seen = np.asarray(seq.tokens) if p.repetition_penalty != 1 else None
                out.append((seq, [decided[seq][1] if decided else sample(logits[r], p, seq.rng, seen)]))
                r += 1
                continue
            props, q = drafts[seq]
            k = len(props)
            rows = None if decided else logits[r:r + k + 1]              # [k+1, V]
            r += k + 1
            m, nxt = decided[seq] if decided else self.accept(seq, rows, props, q)
            # the accepted guesses' K/V stay; the rest is past the new end
            old_n = seq.n_tokens
            seq.n_computed += m
            if blocks.has_new_full_block(seq.seq_id, seq.n_computed):     # name the full ones
                blocks.cache_blocks(seq.seq_id, seq.tokens + props[:m], seq.n_computed)
            blocks.trim(seq.seq_id, seq.n_computed + 1)
            self.proposer.rollback(seq, old_n + m)
            if seq.seq_id in self.adapt:
                self.adapt[seq.seq_id].update(k, m)
            self.steps += 1
            self.proposed += k
            self.accepted += m
            self.emitted += m + 1
            self.history.append((k, m))
            out.append((seq, props[:m] + [nxt]))
        return out

    @staticmethod
    def accept(seq, rows: np.ndarray, props: list[int], q) -> tuple[int, int]:
        """rows [k+1, V] the target's logits -> (accepted m, the next token): verify.py's rules,
        with the sequence's sampling filters on every row."""
        p = seq.params
        context = np.asarray(seq.tokens, dtype=np.int64) if p.repetition_penalty != 1 else None
        d = np.asarray(props, dtype=np.int64)
        if p.greedy:
            m, nxt = verify_greedy_numba(greedy_ids(rows, p, context, props), d)
        elif q is None:                # a point mass: drawn as plain decoding draws (its text)
            m, nxt = sample_as_plain(rows, p, context, props, seq.rng)
        else:
            probs = probs_rows(rows, p, context, props)                # [k+1, V]
            m, nxt = verify_sample_numba(probs, np.asarray(q, dtype=np.float64), d,
                                         seq.rng.random(len(props) + 1))
        return int(m), int(nxt)

    # --- what a guess costs -------------------------------------------------------------------------
    def calibrate(self, repeats: int = 3) -> None:
        """Measure the costs (the fastest of a few forwards on free blocks of each pool, the row
        counts in turns); where a pool has no room, the defaults."""
        eng = self.engine
        sizes = range(1, self.k_max + 2) if self.row_cost is None else [1]
        t = timed_forwards(eng.model, eng.cache, eng.blocks, sizes, eng.max_context, repeats)
        if self.row_cost is None:
            if t:
                self.forward_costs = [t[n] / t[1] for n in sizes]
                self.row_cost = max(0.0, (self.forward_costs[-1] - 1) / self.k_max)   # (a figure)
            else:
                self.row_cost = ROW_COST
        if self.draft_cost is None:
            td = self.proposer.step_time(repeats)
            self.draft_cost = td / t[1] if td and t else DRAFT_COST
        self._costs = None

    @property
    def costs(self) -> tuple:
        """[k]: what a step with k = 0 .. k_max guesses costs, in plain steps: the target's
        forward of 1 + k rows (the measured curve, else 1 + row_cost k) and k draft forwards."""
        if self._costs is None:
            fwd = self.forward_costs or [1 + (self.row_cost or 0.0) * k for k in range(self.k_max + 1)]
            self._costs = tuple(max(1.0, f) + (self.draft_cost or 0.0) * k for k, f in enumerate(fwd))
        return self._costs

    # --- figures -----------------------------------------------------------------------------------
    def stats(self) -> dict:
        return dict(verify_steps=self.steps, proposed=self.proposed, accepted=self.accepted,
                    emitted=self.emitted,
                    mean_accepted=self.accepted / self.steps if self.steps else 0.0,
                    acceptance=self.accepted / self.proposed if self.proposed else 0.0)

    def reset_stats(self) -> None:
        self.steps = self.proposed = self.accepted = self.emitted = 0
        self.history.clear()


def timed_forward(model, cache, blocks, n: int, max_context: int, repeats: int = 3,
                  context: int = 64) -> float | None:
    """Seconds of a forward of n new tokens after (up to) `context` cached ones, on free blocks of
    the pool (given back after), one untimed forward first; None if there is no room now. The
    fastest of the repeats: on a shared machine the others were slowed by someone else."""
    t = timed_forwards(model, cache, blocks, [n], max_context, repeats, context)
    return t[n] if t else None


def timed_forwards(model, cache, blocks, ns, max_context: int, repeats: int = 3,
                   context: int = 64) -> dict | None:
    """{n: seconds} for forwards of each n new tokens after (up to) `context` cached ones: one
    context, then the sizes in turns, `repeats` rounds, the fastest of each (after one untimed
    round). None if the pool has no room now."""
    from ..batch import make_batch
    ns = list(ns)
    top = max(ns)
    sid, ctx = -(1 << 40), min(context, max_context - top - 1)   # an id no request has
    ids = [i % model.config.vocab_size for i in range(ctx + top)]
    if ctx < 1 or not blocks.can_hold(sid, ctx + top):
        return None
    try:
        table = blocks.ensure(sid, ctx + top)
        model.forward(make_batch([(ids[:ctx], 0, table)], cache.block_size), cache)
        best = {n: float("inf") for n in ns}
        for r in range(repeats + 1):
            for n in ns:
                batch = make_batch([(ids[ctx:ctx + n], ctx, table)], cache.block_size, logits_for=[n])
                t = time.perf_counter()
                model.forward(batch, cache)
                if r:
                    best[n] = min(best[n], time.perf_counter() - t)
        return best
    finally:
        blocks.release(sid)
