"""Every CUDA kernel compiles for a real GPU with the argument types the cuda backend gives it.

The simulator runs a kernel as Python, one thread at a time: it never type-checks a branch that a
run does not reach (a real compile types the whole kernel). So this test

1. runs a tiny random model through CudaModel under NUMBA_ENABLE_CUDASIM=1 (prefill, decode with
   logits out, decode with sampling on the device), recording each launch's kernel and argument
   types (the simulator's arrays carry their numba type);
2. compiles each (kernel, types) to PTX for sm_90 in a subprocess with the simulator off, with
   numba-cuda's own NVVM compiler: no GPU needed.

Without the simulator in this process (a plain `pytest`), step 1 runs in a subprocess that has it.
"""
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numba
import numpy as np

from minfer.batch import make_batch
from minfer.gpu.model import CudaModel
from minfer.sampling import SamplingParams
from minfer.engine.block_manager import BlockManager

from cuda_cases import tiny_model

COMPILE = textwrap.dedent("""
    import importlib, pickle, sys, types
    from numba import cuda
    from numba.cuda import dispatcher
    # device functions ask the current device for its compute capability: there is none here
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
    launches = pickle.load(open(sys.argv[1], "rb"))
    bad = 0
    for (module, name), sigs in sorted(launches.items()):
        fn = getattr(importlib.import_module(module), name).py_func
        for sig in sorted(sigs, key=str):
            try:
                cuda.compile_ptx(fn, sig, cc=(9, 0))
                print("ok ", module, name, sig)
            except Exception as e:
                bad += 1
                print("BAD", module, name, sig, type(e).__name__, str(e).splitlines()[0:12])
    sys.exit(1 if bad else 0)
""")


def record_launches(run):
    """Run `run()` in the simulator; -> {(module, kernel name): {argument type tuples}}."""
    from numba.cuda.simulator.kernel import FakeCUDAKernel
    seen, call = {}, FakeCUDAKernel.__call__

    def recording(self, *args):
        if not self._device:                   # a launch (device functions are typed inside it)
            key = (self.fn.__module__, self.fn.__name__)
            seen.setdefault(key, set()).add(tuple(numba.typeof(a) for a in args))
        return call(self, *args)

    FakeCUDAKernel.__call__ = recording
    try:
        run()
    finally:
        FakeCUDAKernel.__call__ = call
    return seen


def run_model():
    cfg, W = tiny_model("Q4_1", "Q8_0", "F32")
    gpu = CudaModel(cfg, W)
    cache = gpu.new_cache(n_blocks=8, block_size=16)
    bm = BlockManager(cache)
    bm.ensure(0, 8)
    bm.ensure(1, 8)
    prompts = [[3, 4, 5], [6, 7]]
    gpu.forward(make_batch([(p, 0, bm.tables[s]) for s, p in enumerate(prompts)], 16, all_logits=True), cache)
    step = make_batch([([8], len(p), bm.tables[s]) for s, p in enumerate(prompts)], 16)
    gpu.forward(step, cache)
    params = [SamplingParams(temperature=0.8, top_k=5, top_p=0.9), SamplingParams(temperature=0)]
    gpu.forward_sample(step, cache, params, [np.random.default_rng(0), np.random.default_rng(1)])


def dump_launches(path):
    Path(path).write_bytes(pickle.dumps(record_launches(run_model)))


def test_every_kernel_compiles_for_sm90(tmp_path):
    path = tmp_path / "launches.pkl"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if numba.config.ENABLE_CUDASIM:
        dump_launches(path)
    else:
        here = Path(__file__).parent
        code = f"import sys; sys.path.insert(0, {str(here)!r}); import test_cuda_compile as t; t.dump_launches({str(path)!r})"
        r = subprocess.run([sys.executable, "-c", code], env={**env, "NUMBA_ENABLE_CUDASIM": "1"},
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    launches = pickle.loads(path.read_bytes())
    names = {name for _, name in launches}
    assert {"embedding_kernel", "qkv_kernel", "linear_kernel", "swiglu_kernel"} <= names, names
    assert any("attention" in n for n in names) and any("sample" in n for n in names), names
    r = subprocess.run([sys.executable, "-c", COMPILE, str(path)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert r.stdout.count("ok ") == sum(len(s) for s in launches.values())
