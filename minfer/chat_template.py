"""Chat templates, rendered from untrusted model files within bounds.

A model's chat template (Jinja) turns a conversation into the prompt text it was trained on. It
comes from the model file, so it is rendered in jinja2's sandbox, which keeps it away from
Python's internals; this module adds what the sandbox leaves out: bounds on time and size, and
one clean error for whatever goes wrong while rendering.
"""
from __future__ import annotations

import functools
import re
import time

from jinja2 import nodes
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from .errors import InvalidArgumentError


def raise_exception(msg):
    raise Refused(str(msg)[:500])


class Refused(TemplateError):
    """raise_exception() called by the template itself."""


def check_messages(messages) -> list[dict]:
    """A conversation as templates expect it: a list of dicts whose role and content are text.
    OpenAI-style content parts ([{"type": "text", "text": ...}]) are joined into one text."""
    if not isinstance(messages, (list, tuple)):
        raise InvalidArgumentError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InvalidArgumentError("each chat message must be a dict with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if not isinstance(role, str):
            raise InvalidArgumentError(f"message {i}: 'role' must be a string, got {type(role).__name__}")
        if isinstance(content, list) and all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise InvalidArgumentError(
                f"message {i}: 'content' must be a string (or a list of text parts), got "
                f"{type(content).__name__}")
        out.append(dict(m, role=role, content=content))
    return out


# --- rendering untrusted templates within bounds ---------------------------------------------------
#
# jinja2's sandbox stops a template from reaching Python's internals, but not from running for
# ever or asking for gigabytes: two nested `range(100000)` loops, `'x' * 10**10`, a string doubled
# in a loop. A chat template renders a few messages, so generous bounds cost nothing: every loop
# iteration and every call counts against a step budget (and a clock), and every string or list
# the template builds (by *, +, ~, % or a call) and the output are held to a size that grows
# with the conversation.

MAX_STEPS = 200_000          # loop iterations + calls in one render
MAX_SECONDS = 2.0
MIN_SIZE = 1 << 20           # characters (or items) a render may build, at least ...
SIZE_PER_INPUT = 8           # ... or this many times the conversation's own length


class TemplateLimitError(TemplateError):
    pass


class _Bound(NodeTransformer):
    """Routes every for-loop's iterable and every `~` concatenation through the environment's
    counting helpers (the sandbox already routes calls and the arithmetic operators)."""

    def visit_For(self, node):
        self.generic_visit(node)
        node.iter = nodes.Call(nodes.EnvironmentAttribute("bounded_iter"), [node.iter], [], None, None)
        return node

    def visit_Concat(self, node):
        self.generic_visit(node)
        return nodes.Call(nodes.EnvironmentAttribute("bounded_concat"), list(node.nodes), [], None, None)


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**", "+", "%", "//"])

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps, self.deadline, self.max_size = 0, float("inf"), MIN_SIZE
        self.filters = {k: _bounded_filter(self, f) for k, f in self.filters.items()}
        self.globals["raise_exception"] = raise_exception
        self.globals.pop("lipsum", None)         # lorem ipsum: no use in a chat, slow at will

    def budget(self, input_size: int):
        env = self

        class _Budget:
            def __enter__(self):
                env.steps, env.deadline = 0, time.monotonic() + MAX_SECONDS
                env.max_size = max(MIN_SIZE, SIZE_PER_INPUT * input_size)

            def __exit__(self, *exc):
                env.deadline = float("inf")
        return _Budget()

    def _parse(self, source, name, filename):
        return _Bound().visit(super()._parse(source, name, filename))

    # -- the counters
    def step(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > MAX_STEPS:
            raise TemplateLimitError(f"took more than {MAX_STEPS:,} steps")
        if self.steps & 1023 == 0 and time.monotonic() > self.deadline:
            raise TemplateLimitError(f"ran longer than {MAX_SECONDS:g} s")

    def room(self, n: int) -> None:
        if n > self.max_size:
            raise TemplateLimitError(f"built a value of {n:,} items (at most "
                                     f"{self.max_size:,} are allowed)")

    def sized(self, v):
        if isinstance(v, (str, list, tuple, dict, bytes)):
            self.room(len(v))
        return v

    def bounded_iter(self, iterable):
        for x in iterable:
            self.step()
            yield x

    def bounded_concat(self, *parts):
        parts = [p if isinstance(p, str) else str(p) for p in parts]
        self.room(sum(len(p) for p in parts))
        return "".join(parts)

    # -- the sandbox's hooks
    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
        __self.step()
        _small_ints(__self, args, kwargs)
        return __self.sized(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, op, left, right):
        self.step()
        if op == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                self.room(len(seq) * max(n, 0))
        elif op == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                if right * abs(left).bit_length() > 64 * 1024:
                    raise TemplateLimitError("computed a number of more than 65,536 bits")
        elif op == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                self.room(len(left) + len(right))
        elif op == "%" and isinstance(left, str):
            if "*" in left or any(int(w) > self.max_size for w in _FORMAT_WIDTH.findall(left)):
                raise TemplateLimitError("formatted a field wider than the size limit")
        return self.sized(self.binop_table[op](left, right))

    def wrap_str_format(self, value):
        fmt = getattr(value, "__self__", None)
        if isinstance(fmt, str) and _FORMAT_WIDTH.search(fmt):
            if any(int(w) > self.max_size for w in _FORMAT_WIDTH.findall(fmt)):
                raise TemplateLimitError("formatted a field wider than the size limit")
        return super().wrap_str_format(value)

    def render_bounded(self, template, variables: dict) -> str:
        out, n = [], 0
        for piece in template.generate(**variables):
            n += len(piece)
            if n > self.max_size:
                raise TemplateLimitError(f"wrote more than {self.max_size:,} characters")
            out.append(piece)
        return "".join(out)


_FORMAT_WIDTH = re.compile(r"\d{7,}")      # a width or precision in a %-format big enough to matter


def _small_ints(env, args, kwargs) -> None:
    """Width- and count-like arguments (center(10**9), indent(...), wordwrap(...)) are refused
    above the size limit before the call allocates anything."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > env.max_size:
            raise TemplateLimitError(f"passed {a:,} where at most {env.max_size:,} is allowed")


def _bounded_filter(env, f):
    skip = 2 if getattr(f, "jinja_pass_arg", None) else 1     # (context,) value: not a width

    @functools.wraps(f)
    def bounded(*args, **kwargs):
        env.step()
        _small_ints(env, args[skip:], kwargs)
        return env.sized(f(*args, **kwargs))
    return bounded
