"""Ctrl-C at any moment — while the model loads, while the kernels compile, while it decodes —
stops `generate` with exit code 130 and `chat`'s answer with the conversation kept: never a
traceback, never a crash. Each run is a real process on the numba backend (the compiled one-region
step on Q4_1 blocks), sent SIGINT after a random delay."""
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from minfer.weights import synthetic

RUNS = 20


@pytest.fixture(scope="module")
def long_tiny(tmp_path_factory):
    """A tiny Q4_1 model with a long context, so that decoding lasts a few seconds."""
    path = synthetic.tiny_checkpoint(tmp_path_factory.mktemp("sigint"), fmt="gguf", seed=1,
                                     dtype="Q4_1", max_position_embeddings=4096)
    # compile the kernels first (cached on disk): a Ctrl-C while they compile is held until the
    # step ends, which can take a minute on a cold cache — longer than these runs wait
    subprocess.run([sys.executable, "-m", "minfer", "generate", "--raw", "--model", str(path),
                    "--max-tokens", "3", "hello"], capture_output=True, timeout=600, env=_env())
    # the chat runs need an answer that goes on (this model's greedy one does not end early)
    import minfer
    answer = minfer.LLM(path, backend="numpy").chat(
        [{"role": "user", "content": "tell me a long story"}],
        minfer.SamplingParams(temperature=0, max_tokens=200))
    assert answer.finish_reason == "length", "pick another seed: this model's answer ends early"
    return path


def _env():
    return dict(os.environ, PYTHONUNBUFFERED="1")


def _wait_for_minfer(p, limit=60.0):
    """Wait until the process runs minfer's own code (it has loaded numpy's C core, which only
    minfer's command line imports). Ctrl-C while the interpreter itself starts (site-packages'
    .pth files, before any of minfer's code) is Python's to handle, not minfer's."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit and p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/maps") as f:
                if "_multiarray_umath" in f.read():
                    return
        except OSError:
            pass
        time.sleep(0.01)


def _clean(proc_err: str) -> bool:
    return not any(bad in proc_err for bad in ("Traceback", "SystemError", "Segmentation", "Fatal"))


def _generate_once(model, delay):
    p = subprocess.Popen([sys.executable, "-m", "minfer", "generate", "--model", str(model),
                          "--max-tokens", "4000", "-t", "0", "tell me a long story"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for_minfer(p)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    return p.returncode, err


def _chat_once(model, delay, during_answer):
    """A chat asked for a long answer; SIGINT `delay` s after minfer starts (during_answer False)
    or after the answer has begun to stream (True). Then /exit."""
    p = subprocess.Popen([sys.executable, "-m", "minfer", "chat", "--model", str(model),
                          "--max-tokens", "4000", "-t", "0"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=_env())
    out, err = [], []
    readers = [threading.Thread(target=lambda f, buf: buf.extend(iter(lambda: f.read(1), "")),
                                args=(f, buf), daemon=True) for f, buf in ((p.stdout, out), (p.stderr, err))]
    for r in readers:
        r.start()
    p.stdin.write("tell me a long story\n")
    p.stdin.flush()
    _wait_for_minfer(p)
    t0 = time.monotonic()
    while during_answer and not out and p.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.01)                   # the answer has not begun yet
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    time.sleep(0.3)
    try:
        p.stdin.write("/exit\n")          # then quit
        p.stdin.close()
    except (BrokenPipeError, OSError):
        pass
    p.wait(timeout=120)
    for r in readers:
        r.join(timeout=10)
    return p.returncode, "".join(out), "".join(err)


def test_sigint_during_generate_always_exits_cleanly(long_tiny):
    delays = np.random.default_rng(0).uniform(0.0, 4.0, RUNS)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda d: _generate_once(long_tiny, d), delays))
    stopped = 0
    for d, (code, err) in zip(delays, results):
        # 130, or killed by SIGINT itself (-2: what a shell also shows as 130; Python does this
        # for a Ctrl-C that lands while the interpreter shuts down); 0 if it had finished
        assert code in (130, -2, 0) and _clean(err), f"SIGINT after {d:.2f} s: exit {code}\n{err[-2000:]}"
        stopped += code != 0
    assert stopped >= RUNS // 2, f"only {stopped} of {RUNS} runs were still going when interrupted"


def test_sigint_during_chat_stops_the_answer_and_keeps_the_repl(long_tiny):
    rng = np.random.default_rng(1)
    cases = [(float(d), i % 2 == 1) for i, d in enumerate(rng.uniform(0.0, 2.0, RUNS))]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda c: _chat_once(long_tiny, *c), cases))
    stopped = 0
    for (d, answering), (code, out, err) in zip(cases, results):
        what = f"SIGINT {d:.2f} s after {'the answer began' if answering else 'the start'}"
        assert _clean(err), f"{what}:\n{err[-2000:]}"
        if "[stopped]" in out:             # it was answering: the answer stops, /exit quits
            stopped += 1
            assert code == 0, f"{what}: exit {code}\n{err[-2000:]}"
        else:                              # still loading, or at the prompt: a clean exit
            assert code in (0, 130, -2), f"{what}: exit {code}\n{err[-2000:]}"
    assert stopped >= RUNS // 3, f"only {stopped} of {RUNS} runs were interrupted mid-answer"


def test_ctrl_c_during_an_import_waits_for_the_import(tmp_path):
    """Ctrl-C while a module is being imported comes once the import is done: numba's C
    extensions import numpy from their own initialisation and print an error there as a
    traceback, so an import must not be cut half-way. (Here a module sends itself SIGINT from
    its top level; it still finishes, and the KeyboardInterrupt comes after.)"""
    (tmp_path / "slow_module.py").write_text(
        "import os, signal, time\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "for _ in range(20):\n"
        "    time.sleep(0.005)\n"
        "done = True\n")
    script = (
        "import sys, time\n"
        "from minfer import interrupt\n"
        "interrupt.install()\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "try:\n"
        "    import slow_module\n"
        "    t0 = time.monotonic()\n"
        "    while time.monotonic() - t0 < 5:\n"
        "        time.sleep(0.001)\n"
        "    print('never interrupted')\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted after the import:', sys.modules['slow_module'].done)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "interrupted after the import: True", (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr


def test_a_programs_own_signal_handler_gets_its_own_exception(long_tiny):
    """A timeout by SIGALRM whose handler raises while a compiled kernel runs: numba's call
    returns with that exception set, which Python reports as a SystemError; the program gets
    its own exception back, and the engine is whole after it."""
    import minfer
    llm = minfer.LLM(long_tiny)                            # the numba backend
    # numba imports parts of itself at the first call: an exception raised inside an import
    # leaves it half-done (the program's handler, not minfer's, is to blame) — first one call
    llm.generate(["tell me a long story"] * 3, minfer.SamplingParams(temperature=0, max_tokens=2))

    class Timeout(Exception):
        pass

    def handler(signum, frame):
        raise Timeout()
    old = signal.signal(signal.SIGALRM, handler)
    rng = np.random.default_rng(0)
    timeouts = 0
    try:
        for _ in range(RUNS * 2):
            signal.setitimer(signal.ITIMER_REAL, float(rng.uniform(0.0005, 0.03)))
            try:
                llm.generate(["tell me a long story"] * 3,       # (longer than any delay here)
                             minfer.SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True))
            except Timeout:                                # (anything else fails the test)
                timeouts += 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, old)
    st = llm.engine.stats()
    # (a handler that runs inside a __del__ has its exception dropped by Python: not every time)
    assert timeouts >= RUNS and st["running"] == st["waiting"] == st["blocks_used"] == 0, (timeouts, st)


@pytest.mark.parametrize("where", ["take", "release"])
def test_an_exception_inside_the_block_bookkeeping_loses_no_block(tmp_path, monkeypatch, where):
    """Such a handler can raise between any two steps of the engine's bookkeeping: here just
    after a block left the free list and before a table holds it, or after a finished
    sequence's table was dropped and before its blocks went back. The blocks still all come
    back, and the next answer is the same."""
    import minfer
    from minfer.engine.block_manager import BlockManager
    llm = minfer.LLM(synthetic.tiny_checkpoint(tmp_path), backend="numpy")
    prompts = ["once upon a time", "hello there"]
    params = [minfer.SamplingParams(temperature=0, max_tokens=n) for n in (40, 20)]
    before = [c.token_ids for c in llm.generate(prompts, params)]

    class Timeout(Exception):
        pass
    take, release = BlockManager._take, BlockManager.release
    calls = {"n": 0}

    def take_then_raise(self):
        b = take(self)
        calls["n"] += 1
        if calls["n"] == 3:              # (the 3rd block taken: a sequence growing mid-answer)
            raise Timeout()
        return b

    def release_then_raise(self, seq_id):
        calls["n"] += 1
        if calls["n"] > 1:
            return release(self, seq_id)
        self.hashes.pop(seq_id, None)
        self.tables.pop(seq_id, [])      # (the table gone, its blocks not yet given back)
        raise Timeout()

    monkeypatch.setattr(BlockManager, *(("_take", take_then_raise) if where == "take"
                                         else ("release", release_then_raise)))
    with pytest.raises(Timeout):
        llm.generate(prompts, params)
    assert calls["n"] >= (3 if where == "take" else 1)
    st = llm.engine.stats()
    assert st["running"] == st["waiting"] == st["blocks_used"] == 0, st
    monkeypatch.undo()
    assert [c.token_ids for c in llm.generate(prompts, params)] == before


@pytest.mark.parametrize("where, api", [("queued", "generate"), ("queued", "stream"),
                                        ("queued", "engine.run"),    # (the engine keeps no
                                        ("outbox", "generate"), ("outbox", "stream")])  # outboxes)
def test_an_exception_just_after_a_request_is_queued_leaves_nothing_running(tmp_path, monkeypatch,
                                                                          api, where):
    """The same handler can raise just after the engine queued a request and before the caller
    has it in hand (the request's place in the queue taken, its answer's outbox not yet made):
    the request is aborted all the same — none is left running in later calls' steps."""
    import minfer
    from minfer.engine.scheduler import Scheduler
    llm = minfer.LLM(synthetic.tiny_checkpoint(tmp_path), backend="numpy")
    prompts = ["once upon a time", "hello there"]
    params = minfer.SamplingParams(temperature=0, max_tokens=8)
    before = [c.token_ids for c in llm.generate(prompts, params)]

    class Timeout(Exception):
        pass
    add, calls = Scheduler.add, {"n": 0}
    last = 1 if api == "stream" else 2

    def add_then_raise(self, seq):
        add(self, seq)
        calls["n"] += 1
        if calls["n"] == last:           # the last prompt queued (any before it already in hand)
            raise Timeout()

    class Outboxes(dict):
        def __setitem__(self, key, value):
            calls["n"] += 1
            raise Timeout()

    if where == "queued":
        monkeypatch.setattr(Scheduler, "add", add_then_raise)
    else:
        monkeypatch.setattr(llm, "_outbox", Outboxes())
    with pytest.raises(Timeout):
        if api == "generate":
            llm.generate(prompts, params)
        elif api == "stream":
            "".join(llm.stream(prompts[0], params))
        else:
            ids = [llm.tokenizer.encode(p) for p in prompts]
            list(llm.engine.run(ids, [params] * 2))
    assert calls["n"] >= 1
    st = llm.engine.stats()
    assert st["running"] == st["waiting"] == st["blocks_used"] == 0 and not llm.engine.seqs, st
    monkeypatch.undo()
    assert [c.token_ids for c in llm.generate(prompts, params)] == before
