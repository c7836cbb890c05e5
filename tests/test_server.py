"""The OpenAI-compatible server, end to end: a real uvicorn server on 127.0.0.1 and a free port,
talked to with the official openai client (and httpx for raw HTTP). The answers are checked
against LLM.generate on a separate LLM of the same model."""
import concurrent.futures as cf
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from unittest import mock

import httpx
import openai
import pytest
import uvicorn

import minfer
from minfer.server import create_app

KEY = "test-key"
MODEL = "tiny"
TIMEOUT = 30.0          # seconds any one request may take


@contextlib.contextmanager
def serving(llm, name=MODEL, api_key=KEY, **kwargs):
    """Run the app on a socket bound to a free loopback port; yield (base url, app)."""
    app = create_app(llm, name, api_key=api_key, **kwargs)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def server(tiny_gguf):
    llm = minfer.LLM(tiny_gguf, backend="numpy")        # its own: the reference LLM is another one
    with serving(llm) as (url, app):
        yield url, app


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)


def metrics(url) -> dict:
    text = httpx.get(url + "/metrics", timeout=TIMEOUT).text
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:]+(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def wait_idle(url, timeout=10.0) -> dict:
    """/metrics until nothing runs, waits or holds a block (cached free blocks don't count)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if m["minfer_requests_running"] == m["minfer_requests_waiting"] == m["minfer_kv_blocks_used"] == 0:
            return m
        assert time.monotonic() < deadline, f"the server stayed busy: {m}"
        time.sleep(0.05)


def greedy(max_tokens=12, **kw):
    return minfer.SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


# --- the happy paths ------------------------------------------------------------------------------
def test_models_health_metrics(server, client):
    url, _ = server
    assert [m.id for m in client.models.list().data] == [MODEL]
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and abs(card.created - time.time()) < 3600   # a Unix time, not 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert httpx.get(url + "/health", timeout=TIMEOUT).json() == {"status": "ok"}
    assert httpx.head(url + "/health", timeout=TIMEOUT).status_code == 200   # (was 405)
    m = metrics(url)
    for name in ("minfer_requests_running", "minfer_requests_waiting", "minfer_kv_blocks_used",
                 "minfer_kv_blocks_free", "minfer_prefix_cache_hit_rate", "minfer_prompt_tokens_total",
                 "minfer_generation_tokens_total", "minfer_time_to_first_token_seconds_count",
                 "minfer_inter_token_latency_seconds_count"):
        assert name in m, name


def test_completion_equals_generate(client, tiny_llm):
    prompt = "the cat sat on the"
    want = tiny_llm.generate(prompt, greedy(12, ignore_eos=True))[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == len(want.token_ids) == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    # token ids as the prompt give the same
    r2 = client.completions.create(model=MODEL, prompt=want.prompt_token_ids, max_tokens=12,
                                   temperature=0, extra_body={"ignore_eos": True})
    assert r2.choices[0].text == want.text


def test_streams_equal_non_streams_with_usage(server, client, tiny_llm):
    prompt = "a dog and a cat"
    want = tiny_llm.generate(prompt, greedy(20))[0]
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert all(c.usage is None for c in chunks[:-1])
    with httpx.stream("POST", server[0] + "/v1/completions", timeout=TIMEOUT,       # not held back
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "prompt": prompt, "max_tokens": 2, "stream": True}) as r:
        assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
        r.read()

    msgs = [{"role": "user", "content": "hello there"}]
    want = tiny_llm.chat(msgs, greedy(16))
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason
    # max_completion_tokens and content parts
    r = client.chat.completions.create(model=MODEL, max_completion_tokens=3, temperature=0,
                                       messages=[{"role": "user", "content": [
                                           {"type": "text", "text": "hello there"}]}])
    assert r.usage.completion_tokens <= 3
    assert r.choices[0].message.content == tiny_llm.chat(msgs, greedy(3)).text


def test_stop_strings(client, tiny_llm):
    prompt = "the cat sat on the"
    free = tiny_llm.generate(prompt, greedy(24, ignore_eos=True))[0].text
    words = [w for w in re.findall(r"[a-z]{2,}", free)]
    assert words, f"no word in {free!r} to stop at"
    for stop in (words[0], [words[-1], "\u2603"]):
        want = tiny_llm.generate(prompt, greedy(24, ignore_eos=True, stop=stop))[0]
        assert want.finish_reason == "stop" and want.text == free[:free.find(want_stop(free, stop))]
        kw = dict(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=stop,
                  extra_body={"ignore_eos": True})
        r = client.completions.create(**kw)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (want.text, "stop")
        chunks = list(client.completions.create(stream=True, **kw))
        assert "".join(c.choices[0].text for c in chunks) == want.text
        assert chunks[-1].choices[0].finish_reason == "stop"


def want_stop(text, stop):
    stops = [stop] if isinstance(stop, str) else stop
    return min((s for s in stops if s in text), key=text.find)


def test_seed_n_and_sampling_extras(client):
    kw = dict(model=MODEL, prompt="one two three", max_tokens=16, temperature=1.0,
              extra_body={"ignore_eos": True})
    a = client.completions.create(seed=7, **kw)
    b = client.completions.create(seed=7, **kw)
    assert a.choices[0].text == b.choices[0].text
    c = client.completions.create(seed=7, n=3, **kw)
    assert [ch.index for ch in c.choices] == [0, 1, 2]
    assert c.choices[0].text == a.choices[0].text            # choice i draws from seed + i
    assert len({ch.text for ch in c.choices}) > 1
    assert c.usage.completion_tokens == 3 * 16
    assert c.usage.prompt_tokens == a.usage.prompt_tokens     # the prompt counts once
    d = client.completions.create(seed=7, n=3, stream=True, **kw)
    texts = ["", "", ""]
    for chunk in d:
        for ch in chunk.choices:
            texts[ch.index] += ch.text
    assert texts == [ch.text for ch in c.choices]
    # minfer's own knobs are honoured: top_k=1 is greedy whatever the temperature
    g = client.completions.create(model=MODEL, prompt="one two three", max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True})
    k1 = client.completions.create(seed=3, **{**kw, "extra_body": {"ignore_eos": True, "top_k": 1,
                                                                  "min_p": 0.1,
                                                                  "repetition_penalty": 1.0}})
    assert k1.choices[0].text == g.choices[0].text


def test_cached_prompt_tokens_reported(client):
    prompt = " ".join(f"w{i}" for i in range(40))            # several 16-token blocks
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    n = first.usage.prompt_tokens
    assert n > 32
    assert again.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16
    assert again.choices[0].text == first.choices[0].text


# --- many clients at once ---------------------------------------------------------------------------
def test_32_concurrent_clients_each_get_their_own_answer(server, tiny_llm):
    url, _ = server
    prompts = [f"{i} the {'cat' if i % 2 else 'dog'} {'sat ' * (i % 5)}on {i * 7}" for i in range(32)]
    lengths = [4 + (i * 5) % 17 for i in range(32)]
    want = [tiny_llm.generate(p, greedy(n))[0] for p, n in zip(prompts, lengths)]   # each alone
    start = threading.Barrier(32, timeout=TIMEOUT)

    def ask(i):
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)
        start.wait()
        kw = dict(model=MODEL, prompt=prompts[i], max_tokens=lengths[i], temperature=0)
        if i % 2:
            chunks = list(c.completions.create(stream=True, **kw))
            return "".join(ch.choices[0].text for ch in chunks), chunks[-1].choices[0].finish_reason
        r = c.completions.create(**kw)
        return r.choices[0].text, r.choices[0].finish_reason

    with cf.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, range(32), timeout=2 * TIMEOUT))
    assert got == [(w.text, w.finish_reason) for w in want]
    m = wait_idle(url)
    assert m["minfer_kv_blocks_free"] == m["minfer_kv_blocks_total"]


def test_disconnect_mid_stream_frees_blocks(server):
    url, app = server
    engine = app.state.llm.engine
    step = engine.step

    def slow_step():              # a slower engine, so that the client surely leaves mid-answer
        time.sleep(0.01)
        return step()
    engine.step = slow_step
    try:
        before = metrics(url).get('minfer_requests_total{finish_reason="abort"}', 0)
        body = {"model": MODEL, "prompt": "the cat", "max_tokens": 200, "temperature": 0,
                "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: {") for line in got)
            assert metrics(url)["minfer_kv_blocks_used"] > 0
        m = wait_idle(url)
        assert m.get('minfer_requests_total{finish_reason="abort"}', 0) == before + 1
    finally:
        del engine.step


def test_disconnect_before_a_non_streamed_answer_aborts_it(server):
    """A client that gives up on a long non-streamed answer: the request is aborted even though
    tokens keep coming (faster than the server's disconnect poll), not run to its end."""
    url, app = server
    engine = app.state.llm.engine
    step = engine.step

    def slow_step():              # a token every ~20 ms: far more often than the 0.5 s poll
        time.sleep(0.02)
        return step()
    engine.step = slow_step
    try:
        before = metrics(url)
        body = {"model": MODEL, "prompt": "the cat", "max_tokens": 200, "temperature": 0,
                "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=body, timeout=1.0,
                       headers={"Authorization": f"Bearer {KEY}"})
        m = wait_idle(url)
        key = 'minfer_requests_total{finish_reason="abort"}'
        assert m.get(key, 0) == before.get(key, 0) + 1
        # it stopped soon after the client left, not at the end of the context
        made = m["minfer_generation_tokens_total"] - before["minfer_generation_tokens_total"]
        assert made < 150, made
    finally:
        del engine.step


# --- bad requests: the right status and OpenAI's error shape, then the server still serves -----
def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_bad_requests_get_their_status_then_service_goes_on(server, client):
    url, app = server
    auth = {"Authorization": f"Bearer {KEY}"}
    post = lambda path, **kw: httpx.post(url + path, timeout=TIMEOUT, **{"headers": auth, **kw})  # noqa: E731
    good = dict(model=MODEL, prompt="the cat", max_tokens=3, temperature=0)

    def still_serves():
        assert client.completions.create(**good).usage.completion_tokens >= 1

    error_of(post("/v1/completions", content=b'{"model": "tiny", "prompt": '), 400)   # malformed
    err = error_of(post("/v1/completions", content=json.dumps(good),                   # no JSON type
                        headers={**auth, "Content-Type": "text/plain"}), 400)
    assert "Content-Type: application/json" in err["message"] and "text/plain" in err["message"]
    assert "no body" in error_of(post("/v1/completions"), 400)["message"]
    assert "JSON object" in error_of(post("/v1/completions", json=[1, 2]), 400)["message"]
    still_serves()
    err = error_of(post("/v1/completions", json={**good, "max_tokens": "many"}), 400)     # wrong type
    assert err["param"] == "max_tokens"
    still_serves()
    error_of(post("/v1/chat/completions", json={"model": MODEL, "messages": "hi"}), 400)
    still_serves()
    for bad in ({"temperature": -1}, {"top_p": 0}, {"n": 0}, {"max_tokens": 0},
                {"top_k": -1}, {"min_p": 1.5}, {"repetition_penalty": 0}):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**{**good, **{k: v for k, v in bad.items() if k in good}},
                                      extra_body={k: v for k, v in bad.items() if k not in good})
        assert e.value.status_code == 400 and list(bad)[0] in e.value.body["message"]
        still_serves()
    for unsupported in ("presence_penalty", "frequency_penalty"):
        with pytest.raises(openai.BadRequestError, match=unsupported):
            client.completions.create(**good, **{unsupported: 0.5})
        still_serves()
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for path, field, value in [("/v1/completions", "logprobs", 0),      # 0 asks for them too
                               ("/v1/chat/completions", "logprobs", True),
                               ("/v1/chat/completions", "top_logprobs", 0),
                               ("/v1/chat/completions", "functions", [{"name": "f"}]),
                               ("/v1/chat/completions", "function_call", "auto"),
                               ("/v1/chat/completions", "tool_choice", "required"),
                               ("/v1/chat/completions", "modalities", ["text", "audio"]),
                               ("/v1/completions", "stream_options", {"include_usage": True})]:
        req = {**(good if path == "/v1/completions" else chat), field: value}
        if field == "function_call":
            req["functions"] = None
            req[field] = {"name": "f"}
        assert error_of(post(path, json=req), 400)["param"] == field, field
    for field, value in [("max_tokens", "5"), ("n", "2"), ("stream", "yes"), ("prompt", [True, False]),
                         ("temperature", "0.5"), ("prompt", 123)]:               # strict types
        err = error_of(post("/v1/completions", json={**good, field: value}), 400)
        assert err["param"] == field and err["message"].startswith(field + ":"), err
    still_serves()
    with pytest.raises(openai.NotFoundError) as e:                                       # model
        client.completions.create(**{**good, "model": "gpt-4"})
    assert e.value.body["code"] == "model_not_found"
    still_serves()
    with pytest.raises(openai.BadRequestError) as e:                                     # too long
        client.completions.create(**{**good, "prompt": "the cat " * 400})
    assert e.value.body["code"] == "context_length_exceeded"
    still_serves()
    r = httpx.post(url + "/v1/completions", json=good, timeout=TIMEOUT)                  # no key
    assert error_of(r, 401) and r.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):                                      # wrong key
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).completions.create(**good)
    still_serves()
    error_of(httpx.get(url + "/v1/nothing", headers=auth, timeout=TIMEOUT), 404)         # route
    js = {**auth, "Content-Type": "application/json"}
    lone = "the \ud800 cat"                                # a lone surrogate: valid JSON, not text
    raw = json.dumps({**good, "prompt": lone})
    assert "Unicode" in error_of(post("/v1/completions", content=raw, headers=js), 400)["message"]
    raw = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": lone}]})
    assert "Unicode" in error_of(post("/v1/chat/completions", content=raw, headers=js), 400)["message"]
    still_serves()
    bridge = app.state.bridge
    bridge.max_waiting, limit = 2, bridge.max_waiting
    try:
        r = post("/v1/completions", json={**good, "n": 3})                  # can never fit: 400
        assert "--max-waiting" in error_of(r, 400)["message"]
        with mock.patch.object(type(bridge), "n_waiting", property(lambda self: 2)):  # busy
            r = post("/v1/completions", json=good)
        assert error_of(r, 503) and r.headers["retry-after"] == "1"
    finally:
        bridge.max_waiting = limit
    still_serves()
    wait_idle(url)


# --- the command ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_command(model, *flags) -> tuple[subprocess.Popen, int]:
    """`python -m minfer serve` on a free port, in the background -> (process, port)."""
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(minfer.__file__))}
    port = _free_port()
    p = subprocess.Popen([sys.executable, "-m", "minfer", "serve", "--model", str(model),
                          "--backend", "numpy", "--port", str(port), "--log-level", "warning",
                          *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    return p, port


def _wait_up(p: subprocess.Popen, port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert p.poll() is None, p.communicate()[1]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.1)


def test_serve_command_stops_cleanly_on_sigint_and_sigterm(tiny_gguf):
    procs = [(*_serve_command(tiny_gguf), sig) for sig in (signal.SIGINT, signal.SIGTERM)]
    try:
        for p, port, sig in procs:
            _wait_up(p, port)
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=TIMEOUT,
                           json={"model": "tiny-llama-F32", "prompt": "the cat", "max_tokens": 2})
            assert r.status_code == 200, r.text
            p.send_signal(sig)
        for p, port, sig in procs:
            _, err = p.communicate(timeout=20)
            assert p.returncode == (130 if sig == signal.SIGINT else 0), err
            assert "Traceback" not in err
    finally:
        for p, _, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)


def test_serve_command_second_ctrl_c_while_stopping(tiny_gguf):
    """Ctrl-C pressed twice (or sent to the process group under a wrapper that passes it on,
    such as `timeout`): the second one cuts the shutdown short, and still no traceback."""
    p, port = _serve_command(tiny_gguf)
    try:
        _wait_up(p, port)
        p.send_signal(signal.SIGINT)
        time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=20)
        assert p.returncode in (130, -signal.SIGINT), err
        assert "Traceback" not in err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)


def test_serve_command_ctrl_c_ends_answers_in_flight(tiny_gguf):
    """Ctrl-C while answers are being written: a non-streamed one gets 503 "the server is
    shutting down" and a stream gets that error as its last event, at once — not a 500 with a
    traceback when uvicorn's wait for them runs out."""
    p, port = _serve_command(tiny_gguf, "--max-seqs", "1")    # the choices one after another
    url = f"http://127.0.0.1:{port}"
    body = {"model": "tiny-llama-F32", "prompt": "the cat", "max_tokens": 200, "n": 16,
            "ignore_eos": True}
    try:
        _wait_up(p, port)
        with cf.ThreadPoolExecutor(2) as pool:
            plain = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=TIMEOUT)
            streamed = pool.submit(lambda: httpx.post(url + "/v1/completions", timeout=TIMEOUT,
                                                      json={**body, "stream": True}).text)
            deadline = time.monotonic() + TIMEOUT
            while metrics(url).get("minfer_generation_tokens_total", 0) < 10:
                assert time.monotonic() < deadline and not plain.done()
                time.sleep(0.05)
            stopped = time.monotonic()
            p.send_signal(signal.SIGINT)
            r, events = plain.result(timeout=TIMEOUT), streamed.result(timeout=TIMEOUT)
        assert time.monotonic() - stopped < 2.5        # (uvicorn would wait 3 s for them)
        assert r.status_code == 503 and "shutting down" in error_of(r, 503)["message"]
        last = [e for e in events.splitlines() if e.startswith("data: {")][-1]
        assert "shutting down" in json.loads(last[len("data: "):])["error"]["message"]
        _, err = p.communicate(timeout=20)
        assert p.returncode == 130 and "Traceback" not in err, err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)


def test_serve_command_speculative_same_text(tiny_gguf, tiny_llm):
    """`serve --speculative ngram`: concurrent greedy requests get plain decoding's text (the
    repeated prompts make prompt lookup guess, and some guesses are accepted); afterwards nothing
    runs or holds a block."""
    prompts = [" ".join(["the cat sat on the mat"] * 3 + [f"and {i}"]) if i % 2 else
               " ".join([f"{i} dogs ran", "to the park"] * 4) for i in range(6)]
    lengths = [24 + 3 * i for i in range(6)]
    want = [tiny_llm.generate(p, greedy(n, ignore_eos=True))[0].text for p, n in zip(prompts, lengths)]
    p, port = _serve_command(tiny_gguf, "--speculative", "ngram", "--num-speculative-tokens", "4")
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_up(p, port)
        start = threading.Barrier(len(prompts), timeout=TIMEOUT)

        def ask(i):
            c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
            start.wait()
            kw = dict(model="tiny-llama-F32", prompt=prompts[i], max_tokens=lengths[i],
                      temperature=0, extra_body={"ignore_eos": True})
            if i % 3 == 0:
                return "".join(ch.choices[0].text for ch in c.completions.create(stream=True, **kw))
            return c.completions.create(**kw).choices[0].text

        with cf.ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(ask, range(len(prompts)), timeout=2 * TIMEOUT))
        assert got == want
        m = wait_idle(url)
        assert m["minfer_kv_blocks_free"] == m["minfer_kv_blocks_total"]
        assert m["minfer_generation_tokens_total"] == sum(lengths)
        assert m["minfer_spec_proposed_tokens_total"] > m["minfer_spec_accepted_tokens_total"] > 0
    finally:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=20)
    assert p.returncode == 0 and "Traceback" not in err, err
    assert "speculative ngram" in err


def test_chat_command_talks_to_the_server(server, tiny_llm):
    url, _ = server
    want = tiny_llm.chat([{"role": "user", "content": "hello there"}], greedy(6)).text
    r = subprocess.run([sys.executable, "-m", "minfer", "chat", "--server", url, "--api-key", KEY,
                        "-t", "0", "--max-tokens", "6"], input="hello there\n/exit\n",
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert want.strip() and want in r.stdout
    r = subprocess.run([sys.executable, "-m", "minfer", "chat", "--server", url, "--api-key", "nope"],
                       input="", capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "401" in r.stderr


def test_serve_command_bad_flags_are_one_line(tiny_gguf):
    r = subprocess.run([sys.executable, "-m", "minfer", "serve", "--model", str(tiny_gguf),
                        "--backend", "numpy", "--max-waiting", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "--max-waiting" in r.stderr


# --- the real model -------------------------------------------------------------------------------------
@pytest.mark.model
def test_default_model_answers(smollm):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    want = smollm.chat(msgs, greedy(12))
    with serving(smollm, name="smollm2", api_key=None) as (url, _):
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == want.text and "Paris" in want.text
        chunks = list(c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=12,
                                                temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
        # the second time the whole conversation but its last token comes from the prefix cache
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 16
        wait_idle(url)
