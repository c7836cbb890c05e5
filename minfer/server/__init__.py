"""The OpenAI-compatible HTTP server: `python -m minfer serve` (needs `pip install -e ".[serve]"`).

    app.py      the routes (FastAPI), errors in OpenAI's shape, streaming as server-sent events
    schema.py   the request and response shapes (pydantic), and their SamplingParams
    bridge.py   one engine thread that steps the engine; each request's tokens come back on its
                own asyncio queue; a bounded waiting queue (503 past it)
    metrics.py  GET /metrics with prometheus-client
"""
from __future__ import annotations

from ..errors import MinferError


def _need_extras():
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise MinferError(f"serving needs FastAPI, uvicorn and prometheus-client ({e.name} is "
                          f"missing): pip install -e \".[serve]\"") from None


def create_app(*args, **kwargs):
    """create_app(llm, model_name, api_key=None, max_waiting=256) -> the FastAPI app."""
    _need_extras()
    from .app import create_app as make
    return make(*args, **kwargs)
