"""Speculative decoding: the rules against their reference, the output distribution preserved,
greedy text identical with and without guesses, and no stale K/V after a rollback."""
import json
import math
import statistics
import subprocess
import sys

import numpy as np
import pytest

import minfer
from minfer.sampling import SamplingParams
from minfer.spec import verify
from minfer.spec.ngram import NgramIndex, NgramProposer, propose_ngram
from minfer.weights import synthetic

rng = np.random.default_rng(7)


# ---------------------------------------------------------------------------------------------
# The n-gram proposer
# ---------------------------------------------------------------------------------------------
def test_ngram_finds_latest_longest_match():
    t = np.array([1, 2, 3, 9, 1, 2, 3, 4, 5, 7, 2, 3], dtype=np.int64)
    # last 2 tokens "2 3": latest earlier occurrence at 5..6, followed by 4 5 7
    assert propose_ngram(t, 3).tolist() == [4, 5, 7]
    assert propose_ngram(np.array([5, 6, 7], dtype=np.int64), 3).tolist() == []   # nothing seen
    assert propose_ngram(np.array([4, 4, 4, 4], dtype=np.int64), 3).tolist() == [4]


@pytest.mark.parametrize("vocab", [2, 4, 50])
def test_ngram_index_equals_reference(vocab):
    """The incremental index proposes what the rescan proposes, after every growth of random
    token streams (chunks of 1..6 tokens, as accepted runs come), for several n ranges and k."""
    for max_n, min_n in ((4, 1), (3, 2), (1, 1), (5, 3)):
        for _ in range(5):
            idx, toks = NgramIndex(max_n, min_n), []
            assert idx.propose(3) == []
            while len(toks) < 150:
                new = rng.integers(0, vocab, int(rng.integers(1, 7))).tolist()
                idx.extend(new)
                toks += new
                t = np.array(toks, dtype=np.int64)
                for k in (1, 4):
                    assert idx.propose(k) == propose_ngram(t, k, max_n, min_n).tolist(), (toks, k)


def test_ngram_proposer_follows_each_sequence():
    """The proposer indexes each sequence's prompt, then only what it gained since; a finished
    sequence's index is dropped."""
    from minfer.engine.sequence import Sequence
    prop = NgramProposer(min_n=2)
    seqs = [Sequence(i, rng.integers(0, 6, 20).tolist(), SamplingParams(), None) for i in range(3)]
    for step in range(40):
        for s in seqs:
            s.output_ids += rng.integers(0, 6, int(rng.integers(1, 4))).tolist()
        got = prop.propose([(s, 1 + step % 5) for s in seqs])
        for s in seqs:
            want = propose_ngram(np.array(s.prompt_ids + s.output_ids), 1 + step % 5,
                                 prop.max_n, prop.min_n).tolist()
            assert (got[s][0] if s in got else []) == want
    assert all(prop.index[s.seq_id].tokens == s.prompt_ids + s.output_ids for s in seqs)
    prop.drop(1)
    assert sorted(prop.index) == [0, 2]


# ---------------------------------------------------------------------------------------------
# The rules: @njit against the reference
# ---------------------------------------------------------------------------------------------
def _dist(n, V, zeros=0):
    p = rng.random((n, V)) ** 3
    for row in p:
        row[rng.choice(V, zeros, replace=False)] = 0
    return p / p.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("k,V", [(1, 2), (3, 5), (6, 33)])
def test_verify_numba_equals_reference(k, V):
    for trial in range(200):
        p, q = _dist(k + 1, V, zeros=V // 3), _dist(k, V)
        d = np.array([rng.choice(V, p=row) if trial % 3 else rng.integers(V) for row in q])
        u = rng.random(k + 1)
        assert verify.verify_sample_numba(p, q, d, u) == verify.verify_sample(p, q, d, u)
        assert (verify.verify_sample_numba(p, np.zeros((0, V)), d, u)
                == verify.verify_sample(p, None, d, u))
        t = p.argmax(axis=1)
        d2 = np.where(rng.random(k) < 0.7, t[:k], d)
        assert verify.verify_greedy_numba(t, d2) == verify.verify_greedy(t, d2)


# ---------------------------------------------------------------------------------------------
# The distribution is preserved: a tiny "model" over 4 tokens, 20,000 draws of the next three
# tokens with a deliberately bad draft, against the exact joint distribution (chi-square)
# ---------------------------------------------------------------------------------------------
V, N_DRAWS, N_NEXT = 4, 20_000, 3


def _logits_fn(seed):
    table = np.random.default_rng(seed).normal(0, 1.5, (V + 1, V, V))
    return lambda ctx: table[len(ctx) % (V + 1), ctx[-1]]        # depends on length and last token


TARGET, BAD_DRAFT = _logits_fn(1), _logits_fn(2)


def _probs(fn, params, ctx, memo):
    if ctx not in memo:
        memo[ctx] = verify.row_probs(fn(ctx), params, np.array(ctx))   # the sampler's filters
    return memo[ctx]


def _exact_joint(params):
    memo, out = {}, np.zeros(V ** N_NEXT)
    for cell in range(V ** N_NEXT):
        toks = [(cell // V ** j) % V for j in reversed(range(N_NEXT))]
        pr, ctx = 1.0, (0,)
        for t in toks:
            pr *= _probs(TARGET, params, ctx, memo)[t]
            ctx += (t,)
        out[cell] = pr
    return out


def _speculative_draws(rule, params, k, point_mass, seed=0):
    """N_DRAWS runs of: guess k tokens (drafted from the bad draft's q, or a point mass), verify,
    repeat until N_NEXT tokens are out. -> counts over the V**N_NEXT cells."""
    g = np.random.default_rng(seed)
    pm, qm, cum, rows = {}, {}, {}, {}
    counts = np.zeros(V ** N_NEXT, dtype=np.int64)
    for _ in range(N_DRAWS):
        ctx = (0,)
        while len(ctx) < 1 + N_NEXT:
            guesses, c = (), ctx
            for _ in range(k):
                if c not in cum:
                    q = _probs(BAD_DRAFT, params, c, qm)
                    cum[c] = (int(np.argmax(q)), np.cumsum(q))
                top, cq = cum[c]
                x = top if point_mass else min(int(np.searchsorted(cq, g.random() * cq[-1], side="right")), V - 1)
                guesses += (x,)
                c += (x,)
            if (ctx, guesses) not in rows:
                p = np.stack([_probs(TARGET, params, ctx + guesses[:i], pm) for i in range(k + 1)])
                q = (np.zeros((0, V)) if point_mass else
                     np.stack([_probs(BAD_DRAFT, params, ctx + guesses[:i], qm) for i in range(k)]))
                rows[ctx, guesses] = (p, q, np.array(guesses))
            p, q, d = rows[ctx, guesses]
            m, nxt = rule(p, q, d, g.random(k + 1))
            ctx += guesses[:m] + (int(nxt),)
        cell = 0
        for t in ctx[1:1 + N_NEXT]:
            cell = cell * V + t
        counts[cell] += 1
    return counts


def _chi2_ok(counts, probs, z=4.75):
    """Pearson's chi-square over the cells expected >= 5 times (the rest pooled) against its
    critical value at ~1e-6 (Wilson-Hilferty); any draw in a cell of probability 0 fails."""
    n = counts.sum()
    if counts[probs == 0].sum() > 0:
        return False
    e = probs * n
    big = e >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(e[big], e[~big].sum())
    keep = exp > 0
    stat = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    df = keep.sum() - 1
    crit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat < crit


def _wrong_residual(p, q, d, u):
    """A subtler broken rule: the right acceptance test, but resampling from p, not p - q."""
    for i in range(len(d)):
        x = d[i]
        qx = 1.0 if q.shape[0] == 0 else q[i, x]
        if u[i] * qx >= p[i, x]:
            return i, verify.draw(p[i], 0.5 * u[i])
    return len(d), verify.draw(p[len(d)], u[len(d)])


@pytest.mark.parametrize("params,point_mass", [
    (SamplingParams(temperature=1.0), False),
    (SamplingParams(temperature=0.8, top_k=3, repetition_penalty=1.3, min_p=0.05), False),
    (SamplingParams(temperature=1.2, top_p=0.9), True),                   # n-gram-like guesses
])
def test_rejection_rule_preserves_the_distribution(params, point_mass):
    exact = _exact_joint(params)
    good = _speculative_draws(verify.verify_sample_numba, params, k=3, point_mass=point_mass)
    assert _chi2_ok(good, exact)
    # the test can tell: a rule that accepts every guess, or resamples wrongly, fails it
    bad = _speculative_draws(verify.always_accept, params, k=3, point_mass=point_mass)
    assert not _chi2_ok(bad, exact)
    if not point_mass:
        assert not _chi2_ok(_speculative_draws(_wrong_residual, params, k=3, point_mass=False), exact)


def test_reference_rule_preserves_the_distribution_too():
    params = SamplingParams(temperature=1.0, top_k=3)
    exact = _exact_joint(params)
    ref = lambda p, q, d, u: verify.verify_sample(p, q if len(q) else None, d, u)  # noqa: E731
    assert _chi2_ok(_speculative_draws(ref, params, k=2, point_mass=False, seed=1), exact)


# ---------------------------------------------------------------------------------------------
# In the engine: greedy text identical, stops inside an accepted run, no stale K/V
# ---------------------------------------------------------------------------------------------
PROMPTS = ["the cat sat on the mat and the cat sat on the mat and the",
           "hello hello hello", "abc", "system user assistant system user"]


@pytest.fixture(scope="module")
def other_gguf(tmp_path_factory):
    """A different random model with the same tokenizer: a draft that is mostly wrong."""
    return synthetic.tiny_checkpoint(tmp_path_factory.mktemp("draft"), fmt="gguf", seed=5)


@pytest.fixture(scope="module")
def plain(tiny_gguf):
    return {b: minfer.LLM(tiny_gguf, backend=b) for b in ("numpy", "numba")}


def _spec_llm(path, backend, mode, draft=None, k=4, **kw):
    return minfer.LLM(path, backend=backend, speculative=mode, num_speculative_tokens=k,
                      draft_model=draft, **kw)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_greedy_identical_with_and_without_speculation(tiny_gguf, other_gguf, plain, backend):
    G = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    ref = [c.token_ids for c in plain[backend].generate(PROMPTS, G)]
    rep = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, repetition_penalty=1.3)
    ref_rep = plain[backend].generate(PROMPTS[:1], rep)[0].token_ids
    for mode, draft in (("ngram", None), ("draft", other_gguf), ("draft", None)):
        llm = _spec_llm(tiny_gguf, backend, mode, draft)
        got = [c.token_ids for c in llm.generate(PROMPTS, G)]         # batched, mixed
        assert got == ref, (mode, draft)
        assert llm.generate(PROMPTS[:1], rep)[0].token_ids == ref_rep
        s = llm.engine.speculator.stats()
        assert s["verify_steps"] > 0 and s["proposed"] > s["accepted"], (mode, draft, s)
        assert s["accepted"] > 0 or draft is not None             # the other model: rarely right
        llm.engine.blocks.check()


def test_stops_inside_an_accepted_run(tiny_gguf, plain):
    """With the model drafting for itself every guess is accepted: EOS, a stop string and
    max_tokens all fall inside accepted runs, and nothing past them comes out."""
    base = plain["numpy"]
    G = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = base.generate([PROMPTS[2]], G)[0]
    llm = _spec_llm(tiny_gguf, "numpy", "draft", draft=tiny_gguf, k=5)
    llm.engine.speculator.adaptive = False
    # max_tokens
    for n in (1, 2, 7, 11):
        out = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]
        assert out.token_ids == full.token_ids[:n] and out.finish_reason == "length"
    # a stop string
    stop = full.text[9:12]
    want = base.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=30, stop=[stop]))[0]
    got = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=30, stop=[stop]))[0]
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, "stop")
    # EOS: make a greedy token that first comes late an end-of-text token for both engines
    j = next(i for i in range(3, 30) if full.token_ids[i] not in full.token_ids[:i])
    eos = full.token_ids[j]
    for e in (base.engine, llm.engine):
        e.stop_ids.add(eos)
    try:
        want = base.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=30))[0]
        got = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=30))[0]
    finally:
        for e in (base.engine, llm.engine):
            e.stop_ids.discard(eos)
    assert got.token_ids == want.token_ids == full.token_ids[:j] and got.finish_reason == "stop"
    s = llm.engine.speculator.stats()
    assert s["accepted"] == s["proposed"] > 0


def test_draft_blocks_go_back_when_a_request_ends(tiny_gguf, other_gguf):
    """A request that ends at its first token (max_tokens 1, an EOS, an abort) had its prompt in
    the draft's cache but never an estimate: its draft blocks went back to the pool never, until
    the pool was full and nothing was guessed any more."""
    llm = _spec_llm(tiny_gguf, "numpy", "draft", draft=other_gguf, k=3)
    draft_blocks = llm.draft.engine.blocks
    for i in range(6):
        llm.generate([PROMPTS[i % len(PROMPTS)] + " again" * i], SamplingParams(temperature=0, max_tokens=1))
        assert draft_blocks.n_used == 0, i
    it = llm.stream(PROMPTS[0], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    next(it)
    it.close()                                         # an abort, after the prompt
    assert draft_blocks.n_used == 0 and not llm.engine.speculator.proposer.computed


def test_guesses_never_take_more_blocks_than_are_free(tiny_gguf):
    """Several sequences guessing in one step on a nearly full pool: each one's guesses are
    cut to what its blocks and the blocks still free hold — counting what the sequences before
    it in the step were promised (two of them were once promised the same last block, and the
    pool's NoFreeBlocks came out of generate()). The answers are those of plain decoding on
    the same pool (preempted and resumed alike; the smallest pool ends two with "length")."""
    G = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [f"{w} " * 6 for w in ("cat", "dog", "sun", "sea", "red", "one")]
    probe = minfer.LLM(tiny_gguf, backend="numpy")
    per_block = probe.engine.cache.nbytes() / probe.engine.blocks.n_blocks / 2 ** 20   # MB, 16 tokens
    for n_blocks in (10, 12, 14, 16, 20):
        pool = dict(block_size=4, kv_cache_mb=(n_blocks + 0.5) * per_block / 4)
        want = [(c.token_ids, c.finish_reason) for c in
                minfer.LLM(tiny_gguf, backend="numpy", **pool).generate(prompts, G)]
        llm = _spec_llm(tiny_gguf, "numpy", "draft", draft=tiny_gguf, k=8, **pool)
        assert llm.engine.blocks.n_blocks == n_blocks
        llm.engine.speculator.adaptive = False             # 8 guesses whenever there is room
        got = [(c.token_ids, c.finish_reason) for c in llm.generate(prompts, G)]
        assert got == want, n_blocks
        assert llm.engine.speculator.stats()["accepted"] > 0
        llm.engine.blocks.check()


def test_computed_tokens_count_the_guesses_rows(tiny_gguf):
    """The engine's computed_tokens (the server's minfer_computed_tokens_total) counts every row
    the model ran — the guesses' too, accepted or not."""
    llm = _spec_llm(tiny_gguf, "numpy", "draft", draft=tiny_gguf, k=4)
    rows, forward = [], llm.engine.model.forward
    llm.engine.speculator.calibrate()                  # (its timed forwards are not the engine's)

    def counted(batch, cache):
        rows.append(len(batch.token_ids))
        return forward(batch, cache)
    llm.engine.model.forward = counted
    before = llm.engine.computed_tokens
    llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert llm.engine.speculator.stats()["proposed"] > 0
    assert llm.engine.computed_tokens - before == sum(rows)


def test_the_draft_pool_shows_in_the_engine_stats_and_metrics(tiny_gguf, other_gguf):
    """A draft model's own KV pool is in the engine's stats and the server's /metrics."""
    from prometheus_client import generate_latest

    from minfer.server.metrics import Metrics
    llm = _spec_llm(tiny_gguf, "numpy", "draft", draft=other_gguf, k=3)
    it = llm.stream(PROMPTS[0], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    next(it)
    assert llm.engine.stats()["draft_blocks_used"] > 0             # the open request's blocks
    it.close()
    st = llm.engine.stats()
    assert st["draft_blocks_used"] == 0 and st["draft_blocks_total"] == llm.draft.engine.blocks.n_blocks
    text = generate_latest(Metrics(llm.engine.stats).registry).decode()
    assert f"minfer_draft_kv_blocks_total {float(st['draft_blocks_total'])}" in text
    assert "minfer_draft_kv_blocks_used 0.0" in text


def test_draft_computes_the_prompt_with_the_target(tiny_gguf, other_gguf, plain):
    """In the step where the target prefills a prompt, the draft computes the same tokens: its
    first guesses (the next step) feed one token, not the prompt; the text is unchanged."""
    llm = _spec_llm(tiny_gguf, "numpy", "draft", draft=other_gguf, k=3)
    llm.engine.speculator.adaptive = False
    prop = llm.engine.speculator.proposer
    rows, orig = [], prop.model.forward

    def spy(batch, cache):
        rows.append(len(batch.token_ids))
        return orig(batch, cache)
    prop.model.forward = spy
    try:
        G = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        got = llm.generate([PROMPTS[0]], G)[0]
    finally:
        prop.model.forward = orig
    assert got.token_ids == plain["numpy"].generate([PROMPTS[0]], G)[0].token_ids
    assert rows[0] == len(got.prompt_token_ids)                  # the prompt, with the target's
    assert max(rows[1:]) <= 2                                    # then a guess (+ a correction)


def test_rollback_leaves_no_stale_kv(tiny_gguf, other_gguf, plain):
    """Every row of every verification forward (after earlier rejections rolled back) has the
    logits of a fresh forward of its text; the prefix cache holds only accepted tokens."""
    llm = _spec_llm(tiny_gguf, "numpy", "draft", draft=other_gguf, k=3, block_size=4)
    llm.engine.speculator.adaptive = False
    eng, seen = llm.engine, []
    orig = eng.model.forward

    def spy(batch, cache):
        out = orig(batch, cache)
        seen.append((batch.token_ids.copy(), batch.positions.copy(), batch.logits_rows.copy(), out))
        return out
    eng.model.forward = spy
    try:
        out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    finally:
        eng.model.forward = orig
    final = out.prompt_token_ids + out.token_ids
    s = eng.speculator.stats()
    assert s["proposed"] > s["accepted"]                       # there were rejections
    fresh = plain["numpy"]
    checked = 0
    for toks, pos, rows, logits in seen[1:]:                   # after the prefill
        start = int(pos[0])
        if len(toks) < 2:
            continue
        text = final[:start] + toks.tolist()                   # accepted so far + this step's rows
        want = fresh.logits(text)[start:]
        np.testing.assert_allclose(logits, want[rows], rtol=1e-4, atol=1e-4)
        checked += 1
    assert checked > 3
    eng.blocks.check()
    bs = eng.cache.block_size
    for b, (_, key) in eng.blocks.prefix.key_of.items():      # every cached block: accepted text
        assert any(tuple(final[i:i + bs]) == key for i in range(0, len(final) - bs + 1, bs)), key


class _Oracle:
    """A stub proposer that knows the greedy text: every guess right, or every guess wrong."""
    name = "stub"

    def __init__(self, text: list[int], right: bool, vocab: int):
        self.text, self.right, self.vocab, self.calls = text, right, vocab, 0

    def propose(self, wants: list) -> dict:
        self.calls += 1
        out = {}
        for seq, k in wants:
            ids = self.text[seq.n_tokens:seq.n_tokens + k]
            out[seq] = (ids if self.right else [(t + 1) % self.vocab for t in ids], None)
        return out

    def step_time(self, repeats=3):
        return 0.0

    def rollback(self, seq, n_valid):
        pass

    def drop(self, seq_id):
        pass

    def held(self):
        return ()


def test_guessing_stops_after_rejections(tiny_gguf, plain):
    """Where no guess is right, a sequence soon stops guessing: its steps become plain one-row
    decodes that do not even ask the proposer, but for a one-guess probe at growing intervals.
    Where every guess is right, it guesses k_max every step. A guess's cost is fixed (no timing),
    so each forward's rows are known exactly."""
    from minfer.spec import Speculator
    G = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)
    ref = plain["numpy"].generate([PROMPTS[0]], G)[0]
    text = ref.prompt_token_ids + ref.token_ids
    for right in (False, True):
        llm = minfer.LLM(tiny_gguf, backend="numpy")
        eng = llm.engine
        stub = _Oracle(text, right, llm.config.vocab_size)
        eng.speculator = Speculator(eng, stub, k_max=4, row_cost=0.3)
        rows, forward = [], eng.model.forward
        eng.model.forward = lambda batch, cache: rows.append(len(batch.token_ids)) or forward(batch, cache)
        assert llm.generate([PROMPTS[0]], G)[0].token_ids == ref.token_ids
        decode = rows[1:]                                   # after the prompt's forward
        guessed = [i for i, r in enumerate(decode) if r > 1]
        assert stub.calls == len(guessed)                   # no guess, no search
        if right:            # soon k_max a step (fewer at first, from the prior, and at the end)
            assert all(r == 5 for r in decode[1:-2]) and len(decode) <= 149 // 5 + 3, decode
            continue
        assert len(decode) == 149                           # one token a step
        first = [i for i in guessed if i < 5]               # guessing from the start ...
        assert first == list(range(len(first))) and 1 <= len(first) <= 4, guessed
        probes = guessed[len(first):]                       # ... soon stopped: one guess now and then
        assert probes[0] - first[-1] >= 8, guessed
        assert all(decode[i] == 2 for i in probes), decode
        gaps = [b - a for a, b in zip(probes, probes[1:])]
        assert len(probes) <= 5 and gaps == sorted(gaps) and gaps[0] >= 8 and gaps[-1] > gaps[0], probes
        assert sum(decode) <= 1.06 * len(decode)            # the steady state: plain decoding
        eng.blocks.check()


def test_k_follows_the_measured_cost_curve(tiny_gguf):
    """k maximises expected tokens per cost on the curve calibrate() measures, not on a line:
    where 3 guesses cost what 1 does and the 4th doubles the step, a sequence whose guesses are
    right stops at 3. calibrate() measures the target at 1 .. k_max + 1 rows."""
    from minfer.spec.speculator import _Adapt
    ad = _Adapt(k_max=5)
    ad.hits, ad.tries = 9.0, 9.5                          # nearly every guess right
    curve = (1.0, 1.05, 1.1, 1.15, 2.4, 2.5)
    line = tuple(1 + 0.3 * k for k in range(6))
    assert ad.best_k(curve) == 3 and ad.best_k(line) == 5
    ad.hits, ad.tries = 0.1, 5.0                          # nearly every guess wrong
    assert ad.best_k(curve) == 0
    llm = _spec_llm(tiny_gguf, "numba", "ngram", k=4)
    sp = llm.engine.speculator
    sp.calibrate(repeats=1)
    assert len(sp.forward_costs) == 5 and sp.forward_costs[0] == 1.0
    assert len(sp.costs) == 5 and sp.costs[0] == 1.0 and all(c >= 1.0 for c in sp.costs)
    llm.engine.blocks.check()
    assert not llm.engine.blocks.tables                     # the measurement's blocks given back


def test_sampling_with_speculation_runs_and_is_seeded(tiny_gguf):
    llm = _spec_llm(tiny_gguf, "numpy", "ngram")
    p = SamplingParams(temperature=0.8, top_k=20, max_tokens=25, seed=3, ignore_eos=True)
    a = llm.generate(PROMPTS[:2], p)
    b = llm.generate(PROMPTS[:2], p)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert all(len(c.token_ids) == 25 for c in a)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_ngram_sampling_gives_plain_decodings_seeded_text(tiny_gguf, plain, backend):
    """n-gram guesses are checked with the plain sampler's own draw at each place (one number
    each, from the sequence's generator): a seed gives the text of plain decoding, however many
    guesses a step sends — and whatever the engine's timings chose."""
    prompts = PROMPTS + ["a b c a b c a b c a b"]
    accepted = 0
    for seed, extra in ((1, {}), (2, dict(top_p=0.9)), (3, dict(repetition_penalty=1.2, top_k=8))):
        # (a low temperature: this random model's sampled text must repeat for guesses to land)
        p = SamplingParams(temperature=0.1, max_tokens=30, seed=seed, ignore_eos=True, **extra)
        want = [c.token_ids for c in plain[backend].generate(prompts, p)]
        for k, adaptive in ((2, True), (6, False)):
            llm = _spec_llm(tiny_gguf, backend, "ngram", k=k)
            llm.engine.speculator.adaptive = adaptive
            assert [c.token_ids for c in llm.generate(prompts, p)] == want, (seed, k)
            stats = llm.engine.speculator.stats()
            assert stats["proposed"] > 0
            accepted += stats["accepted"]
    assert accepted > 0


def test_bad_speculative_arguments(tiny_gguf):
    from minfer.errors import InvalidArgumentError
    with pytest.raises(InvalidArgumentError, match="speculative"):
        minfer.LLM(tiny_gguf, backend="numpy", speculative="magic")
    with pytest.raises(InvalidArgumentError, match="num_speculative_tokens"):
        minfer.LLM(tiny_gguf, backend="numpy", speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(InvalidArgumentError, match="num_speculative_tokens is for"):
        minfer.LLM(tiny_gguf, backend="numpy", num_speculative_tokens=4)     # (speculation off)


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------
def _cli(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "minfer", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_cli_generate_speculative_same_text(tiny_gguf):
    args = ("generate", "--model", tiny_gguf, "--backend", "numpy", "--raw", "--max-tokens", "12",
            "the cat sat on the mat and the cat sat on the")
    plain, spec = _cli(*args), _cli(*args, "--speculative", "ngram", "--num-speculative-tokens", "3")
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout and "accepted a step" in spec.stderr


def test_cli_chat_speculative_same_text(tiny_gguf):
    """chat --speculative: its banner says so, and every turn (the second on the first's cache,
    one after /reset) answers what plain chat answers, greedy."""
    args = ("chat", "--model", tiny_gguf, "--backend", "numpy", "--max-tokens", "12", "-t", "0")
    turns = "the cat sat on the mat and the cat sat on the\nand again the cat\n/reset\nthe cat\n/exit\n"
    plain = subprocess.run([sys.executable, "-m", "minfer", *map(str, args)], input=turns,
                           capture_output=True, text=True, timeout=300)
    spec = subprocess.run([sys.executable, "-m", "minfer", *map(str, args), "--speculative", "ngram",
                           "--num-speculative-tokens", "3"], input=turns, capture_output=True,
                          text=True, timeout=300)
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert "speculative ngram" in spec.stderr and "speculative" not in plain.stderr
    assert spec.stdout == plain.stdout and spec.stdout.count("> ") >= 3


def test_bench_speculative_pairs_each_mode_with_plain_decoding(tmp_path):
    """bench --speculative: each mode's process answers every workload twice with its guesses
    and twice without (with, without, without, with; then the other way round); the "off" rows
    are those plain answers (no process of their own), and the speed-up is the median of the
    runs' ratios."""
    out = tmp_path / "spec.json"
    model = synthetic.tiny_checkpoint(tmp_path, fmt="gguf", max_position_embeddings=2048)  # the prompts
    r = _cli("bench", "--model", model, "--backend", "numba", "--speculative", "ngram,off",
             "--runs", "2", "--new-tokens", "6", "--json", str(out))
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["speculative"]
    assert [row["mode"] for row in rows] == ["ngram"]              # plain decoding inside it
    for run in rows[0]["runs"]:
        for w in ("edit", "free"):
            plain = run[w]["plain"]
            assert plain["decode_tok_s"] > 0 and plain["text_hash"] == run[w]["text_hash"]
    lines = [ln.split() for ln in r.stdout.splitlines() if ln.startswith(("edit", "free"))]
    assert [(ln[0], ln[2], ln[3]) for ln in lines] == [
        ("edit", "f32", "off"), ("edit", "f32", "ngram"), ("free", "f32", "off"), ("free", "f32", "ngram")]
    want = statistics.median(x["edit"]["decode_tok_s"] / x["edit"]["plain"]["decode_tok_s"]
                             for x in rows[0]["runs"])
    assert lines[1][-2] == f"{want:.2f}x" and lines[0][-2] == "1.00x"


@pytest.mark.parametrize("args,says", [
    (["generate", "--speculative", "ngram", "--draft-model", "x.gguf", "hi"], "draft"),
    (["generate", "--speculative", "ngram", "--num-speculative-tokens", "0", "hi"], "num_speculative_tokens"),
    (["generate", "--speculative", "draft", "--draft-model", "/nonexistent/d.gguf", "hi"],
     "no draft model at /nonexistent/d.gguf (--draft-model)"),
    (["bench", "--speculative", "ngram,magic"], "unknown speculative mode"),
    (["bench", "--speculative", "ngram", "--activations", "int4"], "unknown activations"),
    (["bench", "--speculative", "draft", "--activations", "int8"], "add f32 to --activations")])
def test_cli_bad_speculative_flags_are_one_line_errors(tiny_gguf, args, says):
    r = _cli(*args[:1], *(["--model", tiny_gguf] if args[0] == "generate" else []), *args[1:])
    assert r.returncode == 1 and "Traceback" not in r.stderr and says in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# The real model
# ---------------------------------------------------------------------------------------------
@pytest.mark.model
def test_real_model_greedy_identical_on_numba(default_model):
    """The default model on numba: prompt lookup and the built-in draft (the same file as Q4_0
    with int8 activations, where the CPU has them) give plain greedy decoding's text, with
    guesses accepted."""
    from minfer.bench import SPEC_WORKLOADS
    G = SamplingParams(temperature=0, max_tokens=48)
    plain = minfer.LLM(default_model)
    prompt = plain.tokenizer.apply_chat_template([{"role": "user", "content": SPEC_WORKLOADS["edit"]}])
    want = plain.generate([prompt], G)[0].token_ids
    for mode in ("ngram", "draft"):
        llm = minfer.LLM(default_model, speculative=mode)
        llm.engine.speculator.adaptive = False           # guess every step: exercise the rules
        assert llm.generate([prompt], G)[0].token_ids == want, mode
        assert llm.engine.speculator.accepted > 0, mode


def test_the_built_in_draft_of_a_model_already_in_its_form_is_refused(tiny_gguf):
    """Its own 4-bit blocks with int8 activations: drafting with the same model only costs."""
    from minfer.stages.simd import has_vnni
    if not has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI (no int8 activations)")
    r = _cli("generate", "--model", tiny_gguf, "--quant", "q4_0", "--activations", "int8",
             "--speculative", "draft", "hi")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "built-in draft" in r.stderr, r.stderr
