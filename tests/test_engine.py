"""System invariants of the generation engine, on a tiny random model."""
import numpy as np
import pytest

import minfer
from minfer.batch import make_batch
from minfer.errors import InvalidArgumentError, PromptTooLongError

GREEDY = minfer.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_cached_decode_equals_full_recompute(tiny_llm):
    """The logits of each decode step (one token, KV cache) == a fresh forward of the whole text."""
    eng = tiny_llm.engine
    prompt = [5, 80, 81, 40, 100, 7]
    seen = []
    orig = eng.model.forward

    def spy(batch, cache):
        out = orig(batch, cache)
        seen.append((batch.token_ids.copy(), out.copy()))
        return out
    eng.model.forward = spy
    try:
        out = tiny_llm.generate([prompt], GREEDY)[0]
    finally:
        eng.model.forward = orig
    full = tiny_llm.logits(prompt + out.token_ids)             # [T, V], no cache reuse
    assert len(seen) == len(out.token_ids)                     # prefill + (n - 1) decode steps
    for step, (_, logits) in enumerate(seen):
        np.testing.assert_allclose(logits[0], full[len(prompt) - 1 + step], rtol=1e-4, atol=1e-4)


def test_batch_of_different_lengths_equals_each_alone(tiny_llm):
    prompts = [[5, 6, 7], list(range(10, 31)), [200], [42] * 9]
    together = tiny_llm.generate(prompts, GREEDY)
    for p, t in zip(prompts, together):
        alone = tiny_llm.generate([p], GREEDY)[0]
        assert t.token_ids == alone.token_ids
        assert t.prompt_token_ids == p


def test_batched_forward_logits_equal_single(tiny_llm):
    eng, model = tiny_llm.engine, tiny_llm.model
    a, b = [3, 4, 5, 6, 7], [9, 8]
    la, lb = tiny_llm.logits(a), tiny_llm.logits(b)
    eng.blocks.ensure(1000, len(a))
    eng.blocks.ensure(1001, len(b))
    try:
        batch = make_batch([(a, 0, eng.blocks.tables[1000]), (b, 0, eng.blocks.tables[1001])],
                           eng.cache.block_size, all_logits=True)
        both = model.forward(batch, eng.cache)
    finally:
        eng.blocks.release(1000), eng.blocks.release(1001)
    np.testing.assert_allclose(both[:5], la, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(both[5:], lb, rtol=1e-5, atol=1e-5)


def test_same_seed_same_sample(tiny_llm):
    p = minfer.SamplingParams(temperature=1.0, top_k=50, max_tokens=16, seed=123, ignore_eos=True)
    a = tiny_llm.generate(["hello there"], p)[0]
    b = tiny_llm.generate(["hello there"], p)[0]
    c = tiny_llm.generate(["hello there"], minfer.SamplingParams(
        temperature=1.0, top_k=50, max_tokens=16, seed=124, ignore_eos=True))[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_max_tokens_and_finish_reason(tiny_llm):
    out = tiny_llm.generate(["abc"], minfer.SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_stop_string_cuts_text(tiny_llm):
    full = tiny_llm.generate(["abc"], GREEDY)[0].text
    assert len(full) > 4
    stop = full[2:4]
    out = tiny_llm.generate(["abc"], minfer.SamplingParams(temperature=0, max_tokens=12, stop=[stop],
                                                           ignore_eos=True))[0]
    assert out.text == full[:full.find(stop)] and out.finish_reason == "stop"
    streamed = "".join(tiny_llm.stream("abc", minfer.SamplingParams(
        temperature=0, max_tokens=12, stop=[stop], ignore_eos=True)))
    assert streamed == out.text


def test_a_stop_string_of_many_tokens_ends_generation(tiny_llm):
    """A stop string longer than a few tokens ends the answer where it appears, not at max_tokens."""
    full = tiny_llm.generate(["abc"], minfer.SamplingParams(temperature=0, max_tokens=40,
                                                            ignore_eos=True))[0]
    stop = tiny_llm.tokenizer.decode(full.token_ids[2:18])       # 16 tokens of text
    assert len(full.token_ids) == 40 and stop in full.text
    out = tiny_llm.generate(["abc"], minfer.SamplingParams(temperature=0, max_tokens=40, stop=[stop],
                                                           ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.text == full.text[:full.text.find(stop)]
    assert len(out.token_ids) <= 20


def test_stream_equals_generate(tiny_llm):
    p = minfer.SamplingParams(temperature=0.8, max_tokens=20, seed=7, ignore_eos=True)
    assert "".join(tiny_llm.stream("the cat", p)) == tiny_llm.generate(["the cat"], p)[0].text


def test_blocks_are_returned_after_generation_and_interruption(tiny_llm):
    bm = tiny_llm.engine.blocks
    free_before = len(bm.free) + sum(len(t) for t in bm.tables.values())
    tiny_llm.generate(["some text " * 5], GREEDY)
    it = tiny_llm.stream("interrupted", GREEDY)
    next(it)
    it.close()                                                 # what Ctrl-C does to the stream
    assert bm.tables == {}
    assert len(bm.free) >= free_before


def test_prompt_too_long_is_a_clear_error(tiny_llm):
    n = tiny_llm.engine.max_context
    with pytest.raises(PromptTooLongError, match="context"):
        tiny_llm.generate([[5] * n], GREEDY)
    assert tiny_llm.logits([5] * n).shape[0] == n        # logits need no room after the last token
    with pytest.raises(PromptTooLongError, match="context"):
        tiny_llm.logits([5] * (n + 1))


def test_generation_stops_at_context_end(tiny_gguf):
    llm = minfer.LLM(tiny_gguf, max_context=20)
    out = llm.generate([[5] * 15], minfer.SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_bad_prompts(tiny_llm):
    with pytest.raises(InvalidArgumentError):
        tiny_llm.generate([[]], GREEDY)
    with pytest.raises(InvalidArgumentError):
        tiny_llm.generate([[10 ** 6]], GREEDY)


def test_chat_uses_template_and_stops_at_end_of_turn(tiny_llm):
    msgs = [{"role": "user", "content": "hi"}]
    prompt = tiny_llm.tokenizer.apply_chat_template(msgs)
    assert prompt.endswith("<|im_start|>assistant\n")
    out = tiny_llm.chat(msgs, minfer.SamplingParams(temperature=0, max_tokens=8))
    assert out.prompt_token_ids == tiny_llm.tokenizer.encode(prompt)
    assert 2 not in out.token_ids                              # <|im_end|> ends the turn, not text


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_prefix_cache_hit_equals_miss(tiny_gguf, backend):
    """A chat's next turn finds its earlier turns' full blocks in the prefix cache and computes
    only the rest, at the right positions: its logits and tokens equal a fresh run's."""
    llm = minfer.LLM(tiny_gguf, backend=backend, block_size=4)
    eng, bm = llm.engine, llm.engine.blocks
    turn1 = [5, 80, 81, 40, 100, 7, 9, 33, 12, 60, 61, 62, 63, 70, 71, 72, 73, 74]
    out1 = llm.generate([turn1], GREEDY)[0].token_ids
    assert bm.tables == {} and bm.n_free == bm.n_blocks        # freed, but still findable
    turn2 = turn1 + out1 + [90, 91, 92]
    seen = []
    orig = eng.model.forward

    def spy(batch, cache):
        out = orig(batch, cache)
        seen.append((batch.positions.copy(), np.asarray(out, dtype=np.float32).copy()))
        return out
    eng.model.forward = spy
    try:
        out2 = llm.generate([turn2], GREEDY)[0]
    finally:
        eng.model.forward = orig
    n = (len(turn1) + len(out1) - 1) // 4 * 4                  # full blocks that were computed
    assert out2.cached_tokens == n and llm.stats.prompt_tokens == len(turn2) - n
    assert list(seen[0][0]) == list(range(n, len(turn2)))      # only the new tokens, at their places
    np.testing.assert_allclose(seen[0][1][0], llm.logits(turn2)[-1], rtol=1e-4, atol=1e-4)
    fresh = minfer.LLM(tiny_gguf, backend=backend, block_size=4, prefix_caching=False)
    miss = fresh.generate([turn2], GREEDY)[0]
    assert miss.cached_tokens == 0 and out2.token_ids == miss.token_ids
    # nothing in common: nothing found, the whole prompt computed
    assert llm.generate([[3, 4, 5, 6, 7, 8]], GREEDY)[0].cached_tokens == 0
    assert bm.tables == {}
    bm.check()
    # through the API: a conversation's second turn, as llm.chat gives it
    p = minfer.SamplingParams(temperature=0, max_tokens=6)
    msgs = [{"role": "user", "content": "hi"}]
    msgs += [{"role": "assistant", "content": llm.chat(msgs, p).text},
             {"role": "user", "content": "and then?"}]
    again = llm.chat(msgs, p)
    assert again.cached_tokens > 0 and again.token_ids == fresh.chat(msgs, p).token_ids


def test_text_that_is_not_unicode_is_a_clear_error(tiny_llm):
    with pytest.raises(InvalidArgumentError, match="lone surrogate"):
        tiny_llm.generate(["the \ud800 cat"], GREEDY)
    with pytest.raises(InvalidArgumentError, match="lone surrogate"):
        tiny_llm.chat([{"role": "user", "content": "the \udcff cat"}], GREEDY)


def test_a_text_far_past_the_context_is_refused_from_its_start(tiny_llm):
    """Only the start of a huge prompt is tokenized: enough to know it cannot fit."""
    with pytest.raises(PromptTooLongError, match="more than"):
        tiny_llm.generate(["the cat sat " * 200_000], GREEDY)
    short = "the cat sat " * 3                                   # and short ones as before
    assert tiny_llm.generate([short], GREEDY)[0].prompt_token_ids == tiny_llm.tokenizer.encode(short)


def test_a_capped_context_sizes_the_pool(tiny_gguf):
    """max_seqs contexts of max_context tokens at most, not of the model's whole context."""
    full = minfer.LLM(tiny_gguf, backend="numpy", max_seqs=4)
    capped = minfer.LLM(tiny_gguf, backend="numpy", max_seqs=4, max_context=32)
    bs = capped.engine.cache.block_size
    assert capped.engine.cache.k.shape[1] == 4 * -(-32 // bs) < full.engine.cache.k.shape[1]   # [L, blocks, ...]
    assert capped.generate(["abc"], GREEDY)[0].token_ids == full.generate(["abc"], GREEDY)[0].token_ids
