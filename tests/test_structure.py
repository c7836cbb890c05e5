"""The layout holds: the CPU step runs model.py's stages in model.py's order; no import cycles
under minfer/; the CPU backends never import numba.cuda. (The GPU step's stage order:
cuda_cases.py, test_gpu_step_runs_the_stages_of_model_py_in_order.)"""
import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minfer
from minfer.backends import numba_ops, numpy_ops
from minfer.batch import make_batch
from minfer.cpu.model import CpuModel
from minfer.model import Transformer
from minfer.stages.quant_dispatch import KernelConfig
from stage_order import expected, recording_ops, squeeze

PACKAGE = Path(minfer.__file__).parent


# --- stage order ---------------------------------------------------------------------------------
def _trace(model, ops, weights, T: int) -> list[str]:
    """The stages one step of T tokens (one sequence, every row's logits) runs, in order."""
    trace = []
    model.ops = recording_ops(ops, weights, trace)
    cache = model.new_cache(n_blocks=4, block_size=16)
    model.forward(make_batch([(list(range(3, 3 + T)), 0, [0, 1, 2, 3])], 16, all_logits=True), cache)
    return squeeze(trace)


def _region_stages(model, trace):
    """Record the stages the region stands for: it runs region.py's walk — model.py's layer loop,
    then the final norm and LM head where it returns logits. (Inside that one compiled call no
    recorder reaches; test_fused.py holds the walk to model.py's loop, number for number.)"""
    real = model.run_region

    def run_region(kind, x, *args):
        x, logits = real(kind, x, *args)
        trace.extend(expected(model.config.n_layers, head=logits is not None)[1:])
        return x, logits
    return run_region


@pytest.mark.parametrize("quant_fmt", ["q4_1", "q8_0", "f32"])
@pytest.mark.parametrize("T", [1, 5])
def test_cpu_step_runs_the_stages_of_model_py_in_order(tiny_gguf, quant_fmt, T, monkeypatch):
    """model.py's order is the expected one; the CPU step's (the region, or — long prefill,
    float32 weights — model.py's loop on the numba kernels) is model.py's."""
    llm = minfer.LLM(tiny_gguf, quant=quant_fmt)
    c, W = llm.config, llm.weights
    assert isinstance(llm.model, CpuModel)
    spec = _trace(Transformer(c, W, numpy_ops()), numpy_ops(), W, T)
    assert spec == expected(c.n_layers)
    cpu = CpuModel(c, W, numba_ops())
    trace = []
    cpu.ops = recording_ops(numba_ops(), W, trace)
    monkeypatch.setattr(cpu, "run_region", _region_stages(cpu, trace))
    cache = cpu.new_cache(n_blocks=4, block_size=16)
    cpu.forward(make_batch([(list(range(3, 3 + T)), 0, [0, 1, 2, 3])], 16, all_logits=True), cache)
    assert squeeze(trace) == spec
    assert (cpu.region_kind(T) is None) == (quant_fmt == "f32")
    kernels = KernelConfig(region_max_rows=T)                  # a "long" prefill: model.py's loop
    cpu = CpuModel(c, W, numba_ops(kernels=kernels), kernels=kernels)
    assert cpu.region_kind(T) is None or cpu.int8_act
    assert _trace(cpu, numba_ops(kernels=kernels), W, T) == spec


# --- imports -------------------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the minfer modules it imports, at its top or inside a function (a lazy import is
    a dependency all the same)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import name`: the submodule pkg.name where there is one, else pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                           for a in node.names]
            else:
                continue
            graph[mod] |= {t for t in targets if t in files and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The groups of modules that import each other, round about (Tarjan's strongly connected
    components of more than one module)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(group)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_sees_imports():
    """The parser finds what is there: plain, relative, lazy and `from pkg import module`."""
    g = import_graph()
    assert "minfer.cpu.region" in g["minfer.cpu.model"]                 # from . import region
    assert "minfer.cpu.formats" in g["minfer.cpu.region"]               # from .formats import Q8
    assert "minfer.gpu.model" in g["minfer.backends"]                   # inside a function
    assert "minfer.stages.simd" in g["minfer.stages.quant_dispatch"]    # idem
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_cycles_under_minfer():
    found = [sorted(c) for c in cycles(import_graph())]
    assert not found, f"modules that import each other: {found}"


def test_cpu_backends_do_not_import_numba_cuda(tiny_gguf):
    """numba.cuda is for the cuda backend and the GPU lessons: `import minfer` and a step on the
    numba and numpy backends never load it (the stage modules make their kernels on first use)."""
    code = ("import sys\n"
            "import minfer, minfer.llm\n"
            "assert 'numba.cuda' not in sys.modules, 'import'\n"
            f"for backend, q in (('numba', 'q4_1'), ('numba', 'f32'), ('numpy', 'auto')):\n"
            f"    llm = minfer.LLM({str(tiny_gguf)!r}, backend=backend, quant=q)\n"
            "    llm.generate([3, 4, 5], minfer.SamplingParams(temperature=0, max_tokens=2))\n"
            "    assert 'numba.cuda' not in sys.modules, backend\n"
            "from minfer.stages import rmsnorm\n"
            "rmsnorm.rmsnorm_kernel.py_func\n"
            "print('numba.cuda' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "True"            # ... and a kernel asked for does load it
