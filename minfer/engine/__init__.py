"""Serving many requests at once (continuous batching), each part its own short module:

    sequence.py       a request's state: tokens, how many are computed, status, metrics
    block_manager.py  the fixed KV block pool: block tables, reference counts
    prefix_cache.py   full blocks named by a hash chain, shared between requests
    scheduler.py      who runs this step and with how many tokens (pure Python, no model)
    engine.py         add_request / abort / step: schedule -> batch -> forward -> sample
"""
from .engine import Engine
from .sequence import Metrics, Sequence, Status

__all__ = ["Engine", "Metrics", "Sequence", "Status"]
