"""Continuous batching end to end: every request in a busy engine gets exactly what it would get
alone — with chunked prefill, preemption forced by a tiny pool, prefix-cache hits, requests arriving
while others decode, aborts, several threads — on every backend."""
import threading

import numpy as np
import pytest

import minfer
from minfer.errors import InvalidArgumentError, PromptTooLongError
from minfer.weights import synthetic

GREEDY = minfer.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def block_mb(n_blocks, block_size=4, layers=2, kv_heads=2, head_dim=16):
    """The --kv-cache-mb that buys n_blocks blocks of the tiny model."""
    return n_blocks * 2 * layers * block_size * kv_heads * head_dim * 4 / 2**20


def workload(seed=0, n=9):
    """Prompts of mixed lengths, several sharing a 12-token "system prompt"."""
    rng = np.random.default_rng(seed)
    system = rng.integers(3, 250, 12).tolist()
    prompts = []
    for i in range(n):
        body = rng.integers(3, 250, int(rng.integers(1, 30))).tolist()
        prompts.append(system + body if i % 2 else body)
    params = [minfer.SamplingParams(temperature=0, max_tokens=int(rng.integers(1, 14)), ignore_eos=True)
              for _ in range(n)]
    return prompts, params


def solo(llm, prompts, params):
    return [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory):
    """Q4_1 matmuls, so that the numba backend runs its compiled one-region step."""
    return synthetic.tiny_checkpoint(tmp_path_factory.mktemp("q4"), fmt="gguf", seed=3, dtype="Q4_1")


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_busy_engine_equals_each_request_alone(tiny_q4, backend):
    prompts, params = workload()
    alone = solo(minfer.LLM(tiny_q4, backend=backend, block_size=4, prefix_caching=False),
                 prompts, params)
    # 14 blocks of 4 tokens, 5 tokens a step: chunked prompts, preemptions, prefix hits
    llm = minfer.LLM(tiny_q4, backend=backend, block_size=4, kv_cache_mb=block_mb(14),
                     max_seqs=4, max_batch_tokens=5)
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == alone
    stats = llm.engine.stats()
    assert stats["preemptions"] > 0 and stats["cached_prompt_tokens"] > 0
    assert stats["running"] == stats["waiting"] == 0 and stats["blocks_used"] == 0
    llm.engine.blocks.check()


@pytest.mark.parametrize("pool_blocks, batch_tokens", [(None, 256), (9, 8)])
def test_requests_with_one_system_prompt_compute_it_once(tiny_q4, pool_blocks, batch_tokens):
    """Requests that arrive together with a 24-token system prompt: the first computes it, the
    others wait for its blocks and share them — and each gets what it gets alone (also with a
    pool so small that sequences are preempted, and prompts chunked)."""
    rng = np.random.default_rng(4)
    system = rng.integers(3, 250, 24).tolist()                # 6 blocks of 4
    prompts = [system + rng.integers(3, 250, int(rng.integers(1, 7))).tolist() for _ in range(5)]
    params = [minfer.SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)] * 5
    alone = solo(minfer.LLM(tiny_q4, backend="numpy", block_size=4, prefix_caching=False),
                 prompts, params)
    kw = {} if pool_blocks is None else dict(kv_cache_mb=block_mb(pool_blocks))
    llm = minfer.LLM(tiny_q4, backend="numpy", block_size=4, max_seqs=4,
                     max_batch_tokens=batch_tokens, **kw)
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == alone
    stats = llm.engine.stats()
    prompt_computed = stats["computed_tokens"] - (stats["generated_tokens"] - len(prompts))
    if pool_blocks is None:                                   # the system prompt, once
        assert prompt_computed == len(prompts[0]) + sum(len(p) - 24 for p in prompts[1:])
        assert [o.cached_tokens for o in outs] == [0] + [24] * 4
    else:
        assert stats["preemptions"] > 0
    assert stats["blocks_used"] == 0
    llm.engine.blocks.check()


def test_requests_arriving_while_others_decode(tiny_q4):
    """Requests added between steps join the running batch at once and still get their own
    answers; an abort in the middle disturbs nobody."""
    prompts, params = workload(seed=1, n=6)
    llm = minfer.LLM(tiny_q4, backend="numpy", block_size=4, max_seqs=3, max_batch_tokens=8)
    alone = solo(llm, prompts, params)
    eng = llm.engine
    seqs, victim, got = [], None, {}
    for step in range(400):
        if step % 3 == 0 and len(seqs) < len(prompts):
            seqs.append(eng.add_request(prompts[len(seqs)], params[len(seqs)]))
            if len(seqs) == 2:
                victim = eng.add_request(prompts[0], minfer.SamplingParams(temperature=0, max_tokens=50))
        if step == 5:
            eng.abort(victim.seq_id)
        for seq, new in eng.step():
            got.setdefault(seq.seq_id, []).extend(new)
        if len(seqs) == len(prompts) and not eng.has_unfinished():
            break
    assert [got[s.seq_id] for s in seqs] == alone
    assert victim.finish_reason == "abort" and eng.blocks.n_used == 0
    with pytest.raises(InvalidArgumentError, match="no unfinished request"):
        eng.abort(victim.seq_id)


def test_many_threads_share_one_llm(tiny_q4):
    """Any number of threads may call generate / stream on one LLM: each gets its own answer."""
    prompts, params = workload(seed=2, n=12)
    llm = minfer.LLM(tiny_q4, backend="numpy", block_size=4, max_seqs=4, max_batch_tokens=16)
    alone = solo(llm, prompts, params)
    got = [None] * len(prompts)

    def ask(i):
        if i % 3:
            got[i] = llm.generate([prompts[i]], params[i])[0].token_ids
        else:
            text = "".join(llm.stream(prompts[i], params[i]))
            got[i] = text == llm.tokenizer.decode(alone[i]) and alone[i]
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert got == alone
    assert llm.engine.blocks.n_used == 0


def test_generate_takes_one_sampling_params_per_prompt(tiny_llm):
    outs = tiny_llm.generate([[5, 6], [7, 8, 9]], [minfer.SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                                                   minfer.SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)])
    assert [len(o.token_ids) for o in outs] == [2, 5]
    with pytest.raises(InvalidArgumentError, match="sampling params"):
        tiny_llm.generate([[5, 6], [7]], [GREEDY])
    assert tiny_llm.generate([], GREEDY) == []
    with pytest.raises(InvalidArgumentError, match="bytes"):
        tiny_llm.generate(b"hello", GREEDY)
    with pytest.raises(InvalidArgumentError, match="prompts: a string, a list of token ids"):
        tiny_llm.generate(None, GREEDY)
    with pytest.raises(InvalidArgumentError, match="messages is empty"):
        tiny_llm.chat([], GREEDY)
    with pytest.raises(InvalidArgumentError, match="must be minfer.SamplingParams.*got dict"):
        tiny_llm.generate([5, 6], {"max_tokens": 2})
    with pytest.raises(InvalidArgumentError, match="must be minfer.SamplingParams"):
        list(tiny_llm.stream([5, 6], {"max_tokens": 2}))
    # a 1-D array of ids is one prompt, a 2-D one a prompt a row
    one = tiny_llm.generate(np.array([5, 6, 7]), GREEDY)
    assert len(one) == 1 and one[0].token_ids == tiny_llm.generate([5, 6, 7], GREEDY)[0].token_ids
    assert len(tiny_llm.generate(np.array([[5, 6], [7, 8]]), GREEDY)) == 2
    assert tiny_llm.engine.blocks.n_used == 0


def test_metrics_of_each_request(tiny_llm):
    out = tiny_llm.generate([[5, 6, 7, 8]], minfer.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    m = out.metrics
    assert m.ttft > 0 and len(m.inter_token_latencies) == 5 and all(x >= 0 for x in m.inter_token_latencies)
    assert m.e2e >= m.ttft and m.preemptions == 0


def test_pool_bounds_the_context_and_bad_settings_are_refused(tiny_q4):
    llm = minfer.LLM(tiny_q4, backend="numpy", block_size=4, kv_cache_mb=block_mb(5))
    assert llm.engine.max_context == 20                      # a request must fit the pool alone
    with pytest.raises(PromptTooLongError, match=r"at most 19 fit: the KV cache of .* MB holds 20 "
                                                 r"tokens \(kv_cache_mb / --kv-cache-mb\), one of them"):
        llm.generate([[5] * 20], GREEDY)              # (the pool, not the model, is the limit: said)
    short = minfer.LLM(tiny_q4, backend="numpy", max_context=12)
    with pytest.raises(PromptTooLongError, match=r"at most 11 fit: the context is set to 12 tokens "
                                                 r"\(max_context / --max-context\), one of them"):
        short.generate([[5] * 12], GREEDY)
    with pytest.raises(InvalidArgumentError, match=r"max_seqs \(8\) is more than max_batch_tokens \(4\)"):
        minfer.LLM(tiny_q4, backend="numpy", max_seqs=8, max_batch_tokens=4)
    out = llm.generate([[5] * 15], minfer.SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    for bad in (dict(kv_cache_mb=0), dict(kv_cache_mb=block_mb(1)), dict(block_size=0),
                dict(max_seqs=0), dict(max_seqs=8, max_batch_tokens=4), dict(max_context=0)):
        with pytest.raises(InvalidArgumentError):
            minfer.LLM(tiny_q4, backend="numpy", **bad)


def test_two_hundred_prompts_in_a_small_pool(tiny_q4):
    """Far more requests than the pool holds at once: they queue, and all finish."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 250, int(rng.integers(1, 40))).tolist() for _ in range(200)]
    llm = minfer.LLM(tiny_q4, backend="numba", block_size=4, kv_cache_mb=block_mb(40),
                     max_seqs=16, max_batch_tokens=64)
    outs = llm.generate(prompts, minfer.SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert all(len(o.token_ids) == 3 for o in outs)
    assert llm.engine.blocks.n_used == 0 and llm.engine.cache.n_blocks == 40


def test_serve_workload_ways_give_the_same_tokens(tiny_q4):
    """bench --workload serve's three ways run every request to its end, each request getting the
    same greedy tokens whichever way the engine was fed; continuous never waits longer for its
    first token at the median than one-at-a-time does."""
    from minfer.bench_serve import make_requests, run_way
    llm = minfer.LLM(tiny_q4, backend="numpy", block_size=4, max_seqs=4, max_batch_tokens=32)
    reqs = [(p[:40], min(n, 12)) for p, n in make_requests(10, llm.config.vocab_size, seed=3, max_prompt=40)]
    seen = {}
    orig = llm.engine.add_request

    def spy(ids, params, stop_check=None):
        seq = orig(ids, params, stop_check)
        seen.setdefault(way, []).append(seq)
        return seq
    llm.engine.add_request = spy
    rows = {}
    for way in ("one-at-a-time", "static", "continuous"):
        rows[way] = run_way(llm, reqs, way, [0.0] * len(reqs), max_seqs=4)
        assert rows[way]["requests"] == len(reqs) and rows[way]["output_tokens"] == sum(n for _, n in reqs)
    tokens = {w: sorted((tuple(s.prompt_ids), tuple(s.output_ids)) for s in seqs) for w, seqs in seen.items()}
    assert tokens["one-at-a-time"] == tokens["static"] == tokens["continuous"]
    assert rows["continuous"]["ttft_p50"] <= rows["one-at-a-time"]["ttft_p50"]


@pytest.mark.model
def test_real_model_batch_equals_alone(default_model):
    """The default model on the numba backend: a continuous batch with chunked prompts and a
    shared system prompt gives every request the tokens it gets alone."""
    llm = minfer.LLM(default_model, max_seqs=4, max_batch_tokens=48)
    system = [{"role": "system", "content": "You are a concise assistant who answers in one sentence."}]
    questions = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?",
                 "Why is the sky blue?", "Say hello in Spanish."]
    prompts = [llm.tokenizer.apply_chat_template(system + [{"role": "user", "content": q}]) for q in questions]
    p = minfer.SamplingParams(temperature=0, max_tokens=12)
    together = llm.generate(prompts, p)
    assert sum(o.cached_tokens for o in together) > 0           # the system prompt was shared
    for prompt, t in zip(prompts, together):
        assert t.token_ids == llm.generate([prompt], p)[0].token_ids
