"""The HTTP app: OpenAI's routes on FastAPI, served by uvicorn.

    GET  /v1/models              the one model this server holds (/v1/models/{name}: its card)
    POST /v1/completions         prompt -> text        (stream: server-sent events, then [DONE])
    POST /v1/chat/completions    messages -> message   (the model's chat template renders them)
    GET  /health                 200 while the engine thread lives (HEAD too: uptime checks)
    GET  /metrics                Prometheus text: queue, KV blocks, prefix cache, tokens, latencies,
                                 guesses (with --speculative)

Every error is OpenAI's error JSON with its status: 400 for bad input (malformed JSON, wrong
types, bad sampling values, a prompt longer than the context), 401 for a missing or wrong API key,
404 for an unknown model or route, 503 (with Retry-After) when too many sequences wait already,
503 while the server shuts down, 500 for a failure of its own. A stream has said 200 before its
first event: an error there is its last event, then [DONE]. A client that left gets no answer
(499 in the log).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import weakref
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import MinferError, PromptTooLongError
from ..llm import LLM
from ..tokenizer import StreamDecoder
from . import schema
from .bridge import Bridge, ServerBusy
from .metrics import Metrics

DISCONNECT_POLL_S = 0.5      # how often a non-streamed request checks that its client is there


def _type_tag(part) -> bool:
    """Is this part of a validation error's location a type's name, not a field's?"""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict", "list")
                                      or "[" in part)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers


def _error(status: int, message: str, type_: str = "invalid_request_error", code=None, param=None,
           headers=None) -> JSONResponse:
    return JSONResponse(schema.error_body(message, type_, param, code), status_code=status,
                        headers=headers)


class _Text:
    """One choice's text as it streams: never half a UTF-8 character, never the start of a stop
    string that may still complete (the same rule as LLM.stream)."""

    def __init__(self, tokenizer, params):
        self.dec, self.params, self.sent = StreamDecoder(tokenizer), params, 0
        self.hold = max((len(s) for s in params.stop), default=1) - 1

    def push(self, ids: list[int]) -> str:
        for t in ids:
            self.dec.push(t)
        text = LLM._cut_stop(self.dec.text, self.params)
        upto = len(text) if len(text) < len(self.dec.text) else max(self.sent, len(text) - self.hold)
        return self._take(text, upto)

    def finish(self) -> str:
        text = LLM._cut_stop(self.dec.text + self.dec.flush(), self.params)
        return self._take(text, len(text))

    def _take(self, text: str, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = text[self.sent:upto], upto
        return piece


def create_app(llm: LLM, model_name: str, api_key: str | None = None,
               max_waiting: int = 256) -> FastAPI:
    metrics = Metrics(lambda: bridge.stats)
    bridge = Bridge(llm, max_waiting=max_waiting, metrics=metrics)
    tok, engine = llm.tokenizer, llm.engine
    started = schema.now()                 # /v1/models' "created": when this server loaded it

    @asynccontextmanager
    async def lifespan(app):
        bridge.start()
        try:
            yield
        except asyncio.CancelledError:
            # a second Ctrl-C while shutting down: uvicorn stops waiting for this shutdown and
            # the loop cancels it; the engine still closes, with no traceback printed for it
            pass
        finally:
            bridge.close()

    app = FastAPI(title="minfer", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.bridge, app.state.metrics, app.state.llm = bridge, metrics, llm

    # --- errors: always OpenAI's shape ----------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        metrics.http_errors.labels(str(e.status)).inc()
        return _error(e.status, e.message, e.type, e.code, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        metrics.http_errors.labels("400").inc()
        errs = e.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON")
        # the field's path, without pydantic's names of the union members it tried ("str",
        # "list[int]"): prompt.str -> prompt
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _type_tag(p)]
        where = ".".join(loc)
        msg = first.get("msg", "invalid request")
        if not where:                          # the body as a whole: none, or not a JSON object
            kind = request.headers.get("content-type", "")
            if first.get("type") == "missing":
                msg = "the request has no body: send a JSON object"
            elif "json" not in kind.lower():
                msg = (f"the body must be a JSON object sent as Content-Type: application/json "
                       f"(this one came as {kind or 'no Content-Type'})")
            else:
                msg = "the body must be a JSON object"
        return _error(400, f"{where}: {msg}" if where else msg, param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        metrics.http_errors.labels(str(e.status_code)).inc()
        return _error(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404
                      else "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        metrics.http_errors.labels("500").inc()
        return _error(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "a valid API key is needed (Authorization: Bearer KEY)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server has "
                                f"{model_name!r}", code="model_not_found", param="model")

    def bad(e: MinferError) -> APIError:
        code = "context_length_exceeded" if isinstance(e, PromptTooLongError) else None
        return APIError(400, str(e), code=code, param=getattr(e, "param", None))

    # --- routes ---------------------------------------------------------------------------------
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if not bridge._thread.is_alive():
            return _error(503, "the engine thread has stopped", "server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": started, "owned_by": "minfer",
                "max_model_len": engine.max_context}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(check_key)])
    async def model(name: str):
        check_model(name)
        return model_card()

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: schema.CompletionRequest, request: Request):
        check_model(body.model)
        try:
            body.refuse_unsupported()
            prompts = [llm._ids(p) for p in body.prompts()]
            for ids in prompts:
                engine.check_prompt(ids)
        except MinferError as e:
            raise bad(e) from None
        return await _serve(request, body, prompts, body.max_tokens or 16, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: schema.ChatRequest, request: Request):
        check_model(body.model)
        try:
            body.refuse_unsupported()
            text = tok.apply_chat_template(body.rendered_messages(), add_generation_prompt=True)
            ids = llm._ids(text)
            engine.check_prompt(ids)
        except MinferError as e:
            raise bad(e) from None
        limit = body.max_completion_tokens or body.max_tokens or (engine.max_context - len(ids))
        return await _serve(request, body, [ids], limit, chat=True)

    async def _serve(request: Request, body, prompts: list[list[int]], max_tokens: int, chat: bool):
        items = []
        try:
            for ids in prompts:
                for j in range(body.n):
                    p = body.sampling(max_tokens, j)
                    items.append((ids, p, llm._stop_check(p)))
        except MinferError as e:
            raise bad(e) from None
        try:
            req = bridge.submit(items)
        except ServerBusy as e:
            raise APIError(503, str(e), "server_busy", headers={"Retry-After": "1"}) from None
        except MinferError as e:
            raise bad(e) from None
        rid = schema.new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            gen = _stream(req, body, prompts, rid, chat)
            weakref.finalize(gen, bridge.cancel, req)      # even if the stream never starts
            # no cache or proxy may hold the events back: each goes out as it comes
            return EventSourceResponse(gen, headers={"Cache-Control": "no-cache",
                                                     "X-Accel-Buffering": "no"})
        return await _complete(request, req, body, prompts, rid, chat)

    def _usage(req, prompts, n) -> dict:
        prompt = sum(len(p) for p in prompts)
        completion = sum(len(s.output_ids) for s in req.seqs)
        cached = sum(s.metrics.cached_prompt_tokens for s in req.seqs[::n])   # once per prompt
        return schema.usage(prompt, completion, cached).model_dump()

    async def _complete(request, req, body, prompts, rid, chat):
        n_items = len(req.items)
        done: dict[int, object] = {}
        clock = asyncio.get_running_loop().time
        poll = clock() + DISCONNECT_POLL_S
        try:
            while len(done) < n_items:
                try:
                    item = await asyncio.wait_for(req.queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    item = None
                # by the clock, not only when nothing came: a long answer's tokens come faster
                # than the poll, and a client that left must not hold the engine to the end
                if clock() >= poll:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    poll = clock() + DISCONNECT_POLL_S
                if item is None:
                    continue
                i, new, finished, seq = item
                if new is None:                 # (finished: the message)
                    raise APIError(503 if bridge.stopping else 500, finished, "server_error")
                if finished:
                    done[i] = seq
        finally:
            bridge.cancel(req)
        choices = []
        for i in range(n_items):
            seq = done[i]
            text = LLM._cut_stop(tok.decode(seq.output_ids), seq.params)
            reason = seq.finish_reason
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": reason})
            else:
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": reason})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": schema.now(), "model": model_name, "choices": choices,
                "usage": _usage(req, prompts, body.n)}

    async def _stream(req, body, prompts, rid, chat):
        kind = "chat.completion.chunk" if chat else "text_completion"
        created, usage_field = schema.now(), body.include_usage
        texts = [_Text(tok, p) for _, p, _ in req.items]

        def event(choices, usage=None) -> bytes:
            chunk = {"id": rid, "object": kind, "created": created, "model": model_name,
                     "choices": choices}
            if usage_field:
                chunk["usage"] = usage
            return format_sse_event(data_str=json.dumps(chunk, ensure_ascii=False))

        def choice(i, piece, reason=None, first=False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": piece} if first else (
                    {"content": piece} if piece else {})
                return {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {"index": i, "text": piece, "logprobs": None, "finish_reason": reason}

        try:
            if chat:
                yield event([choice(i, "", first=True) for i in range(len(req.items))])
            left = len(req.items)
            while left:
                i, new, finished, seq = await req.queue.get()
                if new is None:
                    err = schema.error_body(finished, "server_error")
                    yield format_sse_event(data_str=json.dumps(err))
                    break
                piece = texts[i].push(new)
                if finished:
                    piece += texts[i].finish()
                    left -= 1
                    yield event([choice(i, piece, seq.finish_reason)])
                elif piece:
                    yield event([choice(i, piece)])
            else:
                if usage_field:
                    yield event([], _usage(req, prompts, body.n))
            yield format_sse_event(data_str="[DONE]")
        finally:
            bridge.cancel(req)

    return app
