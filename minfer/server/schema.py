"""The OpenAI request and response shapes (pydantic), and their translation to SamplingParams.

Only what the server honours is declared; fields OpenAI defines that minfer cannot honour
(logprobs, presence/frequency penalties, logit_bias, tools, ...) are declared too, so that a
request using them is refused with a clear message instead of silently getting something else.
Unknown extra fields are ignored, as OpenAI's own server does. minfer's own sampling knobs
(top_k, min_p, repetition_penalty, ignore_eos) travel as extra fields, e.g. with the openai
client: `extra_body={"top_k": 40}`.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from ..errors import InvalidArgumentError
from ..sampling import SamplingParams


class Refused(InvalidArgumentError):
    """A field minfer cannot honour: the error names it (OpenAI's `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class _Sampling(BaseModel):
    """The fields completions and chat completions share. Strict: "5" is not a number, nor
    "yes" a boolean, nor true a token id (a client that sends them has a bug worth hearing of)."""
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    user: str | None = None
    # minfer's own (vLLM's names)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False

    def refuse_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise Refused(name, f"{name} is not supported; use repetition_penalty (> 1 "
                                    f"discourages repeats) or leave {name} at 0")
        if self.logit_bias:
            raise Refused("logit_bias", "logit_bias is not supported")
        if self.logprobs is not None and self.logprobs is not False:    # (0 asks for them too)
            raise Refused("logprobs", "logprobs are not supported")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise Refused("stop", "stop takes at most 4 non-empty strings")
        if self.stream_options is not None and not self.stream:
            raise Refused("stream_options", "stream_options goes with stream: true")

    def sampling(self, max_tokens: int, choice: int) -> SamplingParams:
        """The engine's parameters for choice number `choice` of n. With a seed, choice i draws
        from seed + i: the n answers differ from each other, and the same request gives them all
        again."""
        seed = None if self.seed is None else self.seed + choice
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,   # OpenAI's defaults
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0, min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            max_tokens=max_tokens, stop=self.stop or [], seed=seed, ignore_eos=self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    # a string, a list of strings, token ids, or a list of token id lists
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(16, ge=1)          # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise Refused("echo", "echo is not supported")
        if self.suffix:
            raise Refused("suffix", "suffix is not supported")
        if self.best_of not in (None, 1, self.n):
            raise Refused("best_of", "best_of is not supported")

    def prompts(self) -> list:
        """-> a list of prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise InvalidArgumentError("the prompt is empty")
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # a string, or OpenAI's content parts [{"type": "text", "text": ...}]
    content: Union[str, list[dict[str, Any]], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidArgumentError("only text content parts are supported "
                                           '({"type": "text", "text": "..."})')
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)      # None: up to the end of the context
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None          # tools' older form
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    top_logprobs: int | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise Refused(name, f"{name} are not supported")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none", "auto"):
                raise Refused(name, f"{name} is not supported (no tools)")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise Refused("response_format", "response_format other than text is not supported")
        if self.top_logprobs is not None:
            raise Refused("top_logprobs", "logprobs are not supported")
        if self.audio is not None or (self.modalities and self.modalities != ["text"]):
            raise Refused("modalities", "only text comes out of this model (modalities: [\"text\"])")

    def rendered_messages(self) -> list[dict]:
        # "developer" is OpenAI's newer name for the system role; templates know "system"
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


# --- responses ----------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


def usage(prompt: int, completion: int, cached: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
