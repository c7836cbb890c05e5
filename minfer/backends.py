"""Which implementation of each stage runs.

A backend is an op table: the functions model.forward calls. "numpy" is the reference — the
executable specification every fast path is tested against.
"""
from __future__ import annotations

from types import SimpleNamespace

from .errors import BackendUnavailableError, InvalidArgumentError

BACKENDS = ("numpy", "numba", "cuda")


def numpy_ops() -> SimpleNamespace:
    from .stages import attention, embedding, kvcache, linear, mlp, rmsnorm, rope
    return SimpleNamespace(
        name="numpy",
        embedding=embedding.embedding,
        rmsnorm=rmsnorm.rmsnorm,
        rope_angles=rope.rope_angles,
        rope=rope.rope,
        kv_write=kvcache.kv_write,
        attention=attention.paged_attention,
        linear=linear.linear,
        swiglu=mlp.swiglu,
    )


def get_ops(name: str) -> SimpleNamespace:
    if name == "numpy":
        return numpy_ops()
    if name in ("numba", "cuda"):
        raise BackendUnavailableError(
            f"the {name} backend is not built yet; use --backend numpy")
    raise InvalidArgumentError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
