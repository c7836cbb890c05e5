import warnings

import numpy as np
import pytest

from minfer.errors import InvalidArgumentError
from minfer.sampling import SamplingParams, apply_repetition_penalty, filter_logits, sample

LOGITS = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03]))


def kept(p):
    return set(np.flatnonzero(np.isfinite(filter_logits(LOGITS.copy(), p))))


def test_top_k():
    assert kept(SamplingParams(top_k=2)) == {0, 1}


def test_top_p_keeps_smallest_set_reaching_p():
    assert kept(SamplingParams(top_p=0.5)) == {0}
    assert kept(SamplingParams(top_p=0.6)) == {0, 1}
    assert kept(SamplingParams(top_p=0.9)) == {0, 1, 2}


def test_min_p():
    assert kept(SamplingParams(min_p=0.2)) == {0, 1, 2}        # 0.15 >= 0.1, 0.07 < 0.1


def test_repetition_penalty_lowers_seen_tokens():
    logits = np.array([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, np.array([0, 1]), 2.0)
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0])


def test_greedy_and_distribution():
    rng = np.random.default_rng(0)
    assert sample(LOGITS, SamplingParams(temperature=0), rng) == 0
    draws = [sample(LOGITS, SamplingParams(temperature=1.0), rng) for _ in range(4000)]
    freq = np.bincount(draws, minlength=5) / 4000
    np.testing.assert_allclose(freq, np.exp(LOGITS), atol=0.03)


def test_a_huge_temperature_draws_every_token_alike_without_a_warning():
    """A temperature past float32's largest (1e300 from a JSON request) could not divide the
    float32 logits (numpy warned of an overflow); it counts as float32's largest, where every
    token is as likely as any other."""
    rng = np.random.default_rng(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = SamplingParams(temperature=1e300)
        draws = [sample(LOGITS.astype(np.float32), p, rng) for _ in range(4000)]
    np.testing.assert_allclose(np.bincount(draws, minlength=5) / 4000, 0.2, atol=0.03)


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                dict(min_p=1.0), dict(max_tokens=0), dict(repetition_penalty=0)])
def test_bad_values_raise(kw):
    with pytest.raises(InvalidArgumentError):
        SamplingParams(**kw)


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])
@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_matches_the_full_sort_definition(scale, top_p):
    """filter_logits sorts only a few candidates; the kept set must equal the textbook rule."""
    logits = (np.random.default_rng(int(scale * 10)).standard_normal(5000) * scale).astype(np.float64)
    order = np.argsort(-logits)
    probs = np.exp(logits[order] - logits.max())
    probs /= probs.sum()
    want = set(order[np.cumsum(probs) - probs < top_p])
    got = set(np.flatnonzero(np.isfinite(filter_logits(logits.copy(), SamplingParams(top_p=top_p)))))
    assert got == want


@pytest.mark.parametrize("V", [5, 256, 1000, 49152])
def test_draw_is_rng_choice(V):
    """sample() draws with draw(probs, rng.random()): the very token rng.choice(V, p=probs) picks
    from the same generator (the CUDA sampler and old seeds rely on it), zeros and all."""
    from minfer.sampling import draw
    r = np.random.default_rng(V)
    for case in range(40):
        probs = np.exp(r.standard_normal(V) * (1 + case % 5))
        probs[r.random(V) < 0.3] = 0.0                         # filtered-out tokens
        probs[0] = max(probs[0], 1e-3)
        probs /= probs.sum()
        for seed in range(10):
            assert draw(probs, np.random.default_rng(seed).random()) == \
                np.random.default_rng(seed).choice(V, p=probs)


@pytest.mark.parametrize("kw", [dict(temperature=0.2, top_p=0.9), dict(temperature=0.7, top_k=40),
                                dict(temperature=1.0, top_p=0.95, min_p=0.01), dict(temperature=0.8)])
def test_sample_is_rng_choice_over_the_filtered_distribution(kw):
    """sample() draws over the kept tokens alone when a filter ran: the token rng.choice picks
    from the whole filtered distribution (probability 0 for the dropped ones), same seed."""
    p = SamplingParams(**kw)
    r = np.random.default_rng(7)
    for case in range(20):
        logits = (r.standard_normal(3000) * (1 + case % 4)).astype(np.float32)
        x = filter_logits(logits / p.temperature, p)
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        for seed in range(5):
            assert sample(logits, p, np.random.default_rng(seed)) == \
                np.random.default_rng(seed).choice(len(probs), p=probs)


def test_draw_never_picks_a_filtered_token_at_the_edges():
    from minfer.sampling import draw
    probs = np.zeros(600)
    probs[[3, 300]] = 0.5                                       # the last block holds nothing
    assert [draw(probs, u) for u in (0.0, 0.49999, 0.5, 1 - 2 ** -53)] == [3, 3, 300, 300]
    assert draw(probs, 1.0) == 300          # u * total == total: what rounding can do near 1


def test_largest_finds_the_k_largest_values():
    from minfer.sampling import largest
    r = np.random.default_rng(1)
    for _ in range(300):
        V, k = int(r.integers(2, 4000)), int(r.integers(1, 80))
        v = np.round(r.standard_normal(V) * 3, int(r.integers(0, 3)))   # many ties when rounded
        k = min(k, V - 1)
        got = largest(v, k)
        assert len(set(got.tolist())) == k
        np.testing.assert_array_equal(np.sort(v[got]), np.sort(v)[-k:])
