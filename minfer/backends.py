"""Which implementation of each stage runs.

A backend is an op table (the stage functions model.forward calls) and the model that runs the
steps on it (make_model):

    numpy   model.Transformer (model.py, the specification) on the NumPy references
    numba   cpu.model.CpuModel: model.py's forward, its layers in one compiled region (cpu/region.py),
            on the `@njit` kernels that sit right after the reference in each stage module
    cuda    gpu.model.CudaModel: the whole step on the device (gpu/)
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np

from .errors import BackendUnavailableError, InvalidArgumentError

BACKENDS = ("numpy", "numba", "cuda")
DEFAULT_BACKEND = "numba"
ACTIVATIONS = ("f32", "int8")   # what the matmuls on quantized weights multiply the weights with


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
        qkv=linear.qkv,
        swiglu=mlp.swiglu,
    )


def numba_ops(int8_act: bool = False, kernels=None) -> SimpleNamespace:
    """int8_act: the matmuls on quantized weights round x to int8 per block (stages/quant_i8.py).
    kernels: which kernels the matmuls run (stages.quant_dispatch.KernelConfig; default: this
    CPU's), bound into the table's linear, qkv and swiglu."""
    from functools import partial

    from .stages import attention, embedding, kvcache, linear, mlp, rmsnorm, rope
    from .stages.quant_dispatch import KernelConfig
    if int8_act:
        from .stages import simd
        simd.check_available()
    kernels = kernels or KernelConfig()
    mm = {name: partial(f, int8_act=int8_act, kernels=kernels)
          for name, f in (("linear", linear.linear_numba), ("qkv", linear.qkv_numba),
                          ("swiglu", mlp.swiglu_numba))}
    return SimpleNamespace(
        name="numba+int8" if int8_act else "numba",
        embedding=embedding.embedding_numba,
        rmsnorm=rmsnorm.rmsnorm_numba,
        rope_angles=rope.rope_angles_numba,
        rope=rope.rope_numba,
        kv_write=kvcache.kv_write_numba,
        attention=attention.paged_attention_numba,
        **mm,
    )


def limit_blas_threads(n: int) -> bool:
    """Tell the OpenBLAS inside numpy to use n threads (best effort; False if none was found).
    The numba backend runs its sgemm tiles on its own threads, one BLAS thread each."""
    import ctypes
    try:
        maps = open("/proc/self/maps").read().split()
    except OSError:
        return False
    done = False
    for path in sorted({p for p in maps if "openblas" in p.rsplit("/", 1)[-1].lower() and ".so" in p}):
        lib = ctypes.CDLL(path)
        for sym in ("openblas_set_num_threads", "openblas_set_num_threads64_",
                    "scipy_openblas_set_num_threads", "scipy_openblas_set_num_threads64_"):
            f = getattr(lib, sym, None)
            if f is not None:
                f(int(n))
                done = True
                break
    return done


def check_threads(n: int | None) -> None:
    """A thread count numba can run (None: its default), or a one-line error."""
    if n is not None:
        import numba
        most = numba.config.NUMBA_NUM_THREADS
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 1 <= n <= most:
            raise InvalidArgumentError(
                f"threads (--threads) must be a whole number from 1 to {most}, got {n!r}")


def set_threads(n: int | None) -> int:
    """Threads for the numba kernels: `n`, else $NUMBA_NUM_THREADS, else all cores."""
    import numba
    check_threads(n)
    limit_blas_threads(1)
    # OpenMP threads spin-wait after each parallel kernel: good for decode's back-to-back launches,
    # bad when the sgemm threads of a prefill want the cores. 30k spins (~tens of us) measured best
    # for both here; read by libgomp when numba first starts its pool, so set before any kernel runs.
    os.environ.setdefault("GOMP_SPINCOUNT", "30000")
    if n is not None:
        numba.set_num_threads(n)
    return numba.get_num_threads()


def get_ops(name: str, threads: int | None = None, activations: str = "f32",
            kernels=None) -> SimpleNamespace:
    """The op table of backend `name`. kernels: the numba backend's choice of kernels
    (stages.quant_dispatch.KernelConfig; default: this CPU's)."""
    if activations not in ACTIVATIONS:
        raise InvalidArgumentError(f"unknown activations {activations!r}; choose one of: "
                                   f"{', '.join(ACTIVATIONS)}")
    if activations == "int8" and name != "numba":
        raise InvalidArgumentError("int8 activations are a numba-backend variant; "
                                   "use --backend numba (or float32 activations)")
    if name == "numpy":
        return numpy_ops()
    if name == "numba":
        set_threads(threads)
        return numba_ops(activations == "int8", kernels)
    if name == "cuda":
        from .gpu.model import cuda_ops
        return cuda_ops()  # BackendUnavailableError, one sentence, without numba-cuda or a GPU
    raise InvalidArgumentError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")


def make_model(name: str, config, weights, ops, activations: str = "f32", kernels=None,
               threads: int | None = None):
    """The model that runs backend `name`'s steps on its op table `ops` (get_ops; the numba
    backend's with the same `kernels`). threads: the numba model's own (None: numba's count
    now), kept whatever another model in the process sets later."""
    if name == "numba":
        import numba
        from .cpu.model import CpuModel
        return CpuModel(config, weights, ops, int8_act=activations == "int8", kernels=kernels,
                        threads=threads or numba.get_num_threads())
    if name == "cuda":
        from .gpu.model import CudaModel
        return CudaModel(config, weights)
    from .model import Transformer
    return Transformer(config, weights, ops)
