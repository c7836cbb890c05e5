"""cpu/contention.py: fewer threads while other programs keep the cores busy, all of them again
when the cores are free — and the same bits on any number of workers."""
import numpy as np
import pytest

import minfer
from minfer.batch import make_batch
from minfer.cpu import contention
from minfer.cpu.contention import CROWDED, FIRST_WAIT, LONGEST_WAIT, WINDOW, ThreadGovernor


class Host:
    """A clock and a runqueue that the test moves: `crowd` threads waiting for a core."""

    def __init__(self):
        self.now, self.waiting, self.crowd = 0.0, 0.0, 0.0

    def clock(self):
        return self.now

    def waited(self):
        return self.waiting

    def steps(self, gov, seconds, step=0.004):
        """Steps of `step` seconds for `seconds`; -> the worker counts they ran on."""
        used = []
        for _ in range(round(seconds / step)):
            n = gov.workers()
            self.now += step
            self.waiting += self.crowd * step
            gov.observe(n)
            used.append(n)
        return used


def test_free_cores_keep_every_thread():
    host = Host()
    gov = ThreadGovernor(4, host.clock, host.waited)
    host.crowd = CROWDED / 2
    assert set(host.steps(gov, 5.0)) == {4}


def test_a_busy_core_means_fewer_threads_until_it_is_free_again():
    host = Host()
    gov = ThreadGovernor(2, host.clock, host.waited)
    host.crowd = 0.8                                  # one busy program beside 2 threads
    used = host.steps(gov, 3 * WINDOW)
    assert used[0] == 2 and used[-1] == 1
    # the tries with all threads come, each after a longer wait, and fail while it is busy
    used = host.steps(gov, 20.0)
    tries = sum(1 for a, b in zip(used, used[1:]) if a == 1 and b == 2)
    assert 2 <= tries <= 20.0 / FIRST_WAIT / 2 and used.count(1) > 0.9 * len(used)
    assert gov.wait == LONGEST_WAIT
    host.crowd = 0.0                                  # the program ends
    used = host.steps(gov, LONGEST_WAIT + 3 * WINDOW)
    assert used[-1] == 2 and gov.wait == FIRST_WAIT


def test_more_threads_give_up_as_many_as_wait():
    host = Host()
    gov = ThreadGovernor(8, host.clock, host.waited)
    host.crowd = 1.0                                  # one core taken: one thread's worth waits
    assert host.steps(gov, 3 * WINDOW)[-1] == 7


def test_no_runqueue_count_means_every_thread():
    gov = ThreadGovernor(4, waited=lambda: None)
    assert not gov.enabled
    gov.observe(4)
    assert gov.workers() == 4


def test_this_system_is_read_or_said_unreadable():
    w = contention.runqueue_wait()
    assert w is None or w >= 0.0


@pytest.mark.parametrize("quant", ["q4_1", "q8_0"])
def test_a_step_on_fewer_workers_gives_the_same_bits(tiny_gguf, monkeypatch, quant):
    """The governor's choice changes who computes each item, never what: logits and cache the
    same to the bit on one worker as on the model's three (attention's slices stay three)."""
    llm = minfer.LLM(tiny_gguf, quant=quant)
    model = llm.model
    model.workers = 3
    rng = np.random.default_rng(0)
    table = list(range(8))

    def run(workers):
        monkeypatch.setattr(ThreadGovernor, "workers", lambda self: workers)
        cache = model.new_cache(n_blocks=8, block_size=4)
        a = model.forward(make_batch([(rng.integers(3, 64, 13).tolist(), 0, table)], 4, all_logits=True), cache)
        b = model.forward(make_batch([(rng.integers(3, 64, 5).tolist(), 13, table)], 4, all_logits=True), cache)
        return a, b, cache.k.copy()
    state = rng.bit_generator.state
    want = run(3)
    rng.bit_generator.state = state
    got = run(1)
    for g, w in zip(got, want):
        assert np.array_equal(g, w)


def test_the_environment_can_keep_every_thread(tiny_gguf, monkeypatch):
    monkeypatch.setenv("MINFER_ADAPT_THREADS", "0")
    assert not minfer.LLM(tiny_gguf, quant="q4_1").model.adapt_threads
    monkeypatch.delenv("MINFER_ADAPT_THREADS")
    assert minfer.LLM(tiny_gguf, quant="q4_1").model.adapt_threads
