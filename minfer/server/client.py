"""A small client for `python -m minfer chat --server URL`: stream a chat answer from any
OpenAI-compatible server (minfer's own, vLLM, llama.cpp's llama-server, ...)."""
from __future__ import annotations

import json
from typing import Iterator

from ..errors import InvalidArgumentError, MinferError, PromptTooLongError
from ..sampling import SamplingParams


class RemoteChat:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0):
        try:
            import httpx
        except ImportError:
            raise MinferError('talking to a server needs httpx: pip install -e ".[serve]"') from None
        self.httpx = httpx
        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout)
        data = self._json(self._call("GET", "/models"))
        try:
            self.model = data["data"][0]["id"]
        except (KeyError, IndexError, TypeError):
            raise MinferError(f"{self.url}/models lists no model") from None

    def _call(self, method, path, **kw):
        try:
            r = self.client.request(method, self.url + path, **kw)
        except self.httpx.HTTPError as e:
            raise MinferError(f"cannot reach the server at {self.url}: {e}") from None
        if r.status_code != 200:
            self._fail(r)
        return r

    @staticmethod
    def _json(r):
        try:
            return r.json()
        except ValueError:
            raise MinferError(f"the server's answer is not JSON: {r.text[:100]!r}") from None

    @staticmethod
    def _fail(r) -> None:
        try:
            err = r.json().get("error") or {}
        except ValueError:
            err = {}
        msg = err.get("message") or f"HTTP {r.status_code}"
        if err.get("code") == "context_length_exceeded":
            raise PromptTooLongError(msg)
        if r.status_code == 400:
            raise InvalidArgumentError(f"the server refused the request: {msg}")
        raise MinferError(f"the server answered {r.status_code}: {msg}")

    def stream(self, messages: list[dict], p: SamplingParams) -> Iterator[str]:
        body = {"model": self.model, "messages": messages, "stream": True,
                "temperature": p.temperature, "top_p": p.top_p, "max_tokens": p.max_tokens,
                "seed": p.seed, "stop": p.stop or None}
        # minfer's own knobs, only when set (other servers may not know them)
        for k, off in (("top_k", 0), ("min_p", 0.0), ("repetition_penalty", 1.0)):
            if getattr(p, k) != off:
                body[k] = getattr(p, k)
        try:
            with self.client.stream("POST", self.url + "/chat/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    self._fail(r)
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise MinferError(f"the server failed: {chunk['error'].get('message')}")
                    for ch in chunk.get("choices") or []:
                        piece = (ch.get("delta") or {}).get("content")
                        if piece:
                            yield piece
        except self.httpx.HTTPError as e:
            raise MinferError(f"the connection to {self.url} broke: {e}") from None
