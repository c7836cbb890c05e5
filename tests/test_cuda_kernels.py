"""The numba.cuda kernels (cases in cuda_cases.py), on a GPU when there is one, else under the
CUDA simulator — never skipped.

numba.cuda picks the simulator when it is first imported (NUMBA_ENABLE_CUDASIM=1, as CI sets for
the whole run). If this process has neither the simulator nor a GPU, the cases run again in a
subprocess with NUMBA_ENABLE_CUDASIM=1, and that run's result is this test's result."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from numba import config


def _numba_cuda_installed() -> bool:
    from numba import cuda
    return getattr(cuda, "implementation", "") == "NVIDIA"   # numba-cuda, not numba's old built-in


def test_numba_cuda_is_installed():
    assert _numba_cuda_installed(), (
        "numba-cuda is not installed: pip install 'minfer[cuda]' (the GPU kernels and their "
        "simulator tests need it)")


def _ready() -> bool:
    from numba import cuda
    return bool(config.ENABLE_CUDASIM) or cuda.is_available()


if _numba_cuda_installed() and _ready():
    from cuda_cases import *  # noqa: F401,F403  (collected here)
else:
    def test_cuda_kernels_under_simulator():
        assert _numba_cuda_installed(), "numba-cuda is not installed: pip install 'minfer[cuda]'"
        env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
        tests = Path(__file__).parent
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               str(Path(__file__))], cwd=tests.parent, env=env,
                              capture_output=True, text=True, timeout=600)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
        assert proc.returncode == 0, f"CUDA kernels under the simulator failed:\n{tail}"
        assert " passed" in tail and "no tests ran" not in tail, tail


def test_cuda_backend_without_gpu_says_so_in_one_line():
    """Outside the simulator and without a GPU, asking for the cuda backend is one clear error."""
    code = ("from minfer.gpu.model import cuda_ops\n"
            "from minfer.errors import BackendUnavailableError\n"
            "from numba import cuda\n"
            "if cuda.is_available(): print('GPU'); raise SystemExit\n"
            "try: cuda_ops()\n"
            "except BackendUnavailableError as e: print('ERR', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120).stdout.strip()
    assert out == "GPU" or (out.startswith("ERR ") and "\n" not in out and "--backend numba" in out), out
