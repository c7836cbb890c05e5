"""The classroom: the checks pass on minfer's reference and on independent correct solutions, fail
on the untouched stubs, name the classic mistakes; the CLI flow works; student_ops plugs finished
functions into the live engine."""
import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import minfer
from minfer import classroom
from minfer.classroom import ExerciseError, check_functions, lessons, reference_functions, student_ops, tasks

LESSON_NUMBERS = sorted(lessons())
ROOT = Path(__file__).resolve().parents[1]


def _on_gpu_or_simulator(request) -> bool:
    """Lesson 11's checks launch numba.cuda kernels: they need a GPU or the CUDA simulator, which
    numba picks at its first import (CI sets NUMBA_ENABLE_CUDASIM=1 for the whole run). Without
    either, run this one test again in a child pytest under the simulator, and return False (the
    caller stops: the child's result is the test's result). Never a skip."""
    if tasks.cuda_ready():
        return True
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           request.node.nodeid], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
    assert proc.returncode == 0 and " passed" in tail, f"under the CUDA simulator:\n{tail}"
    return False

# Correct solutions written independently of minfer's reference (loops, other formulas): the checks
# must accept any correct answer, not only the reference's own arithmetic.
SOLUTIONS = {
    0: '''
def count_parameters(config):
    c = config
    attention = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    mlp = 3 * c.dim * c.ffn_dim
    per_layer = attention + mlp + 2 * c.dim
    heads = 1 if c.tie_embeddings else 2
    return heads * c.vocab_size * c.dim + c.n_layers * per_layer + c.dim
''',
    1: '''
def bpe_ids(piece, merges, vocab):
    rank = {}
    for r, m in enumerate(merges):
        rank.setdefault(tuple(m.split(" ")), r)
    parts = list(piece)
    while True:
        best = None
        for i in range(len(parts) - 1):
            r = rank.get((parts[i], parts[i + 1]))
            if r is not None and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return [vocab.index(p) for p in parts]
''',
    2: '''
import numpy as np

def align_up(pos, alignment):
    return -(-pos // alignment) * alignment

def read_f32_tensor(path, data_start, offset, dims):
    shape = tuple(dims[::-1])
    return np.fromfile(path, dtype="<f4", count=int(np.prod(dims)), offset=data_start + offset).reshape(shape)
''',
    3: '''
import numpy as np

def embedding(token_ids, table):
    return np.stack([np.asarray(table[i], dtype=np.float32) for i in token_ids])

def rmsnorm(x, w, eps):
    out = np.empty_like(x)
    for t in range(x.shape[0]):
        out[t] = x[t] / np.sqrt(np.dot(x[t], x[t]) / x.shape[1] + eps) * w
    return out
''',
    4: '''
import numpy as np

def rope_angles(positions, head_dim, base):
    i = np.arange(head_dim // 2)
    ang = np.outer(positions.astype(np.float64), 1.0 / base ** (2 * i / head_dim))
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)

def rope(x, cos, sin):
    z = x[..., 0::2] + 1j * x[..., 1::2]                 # a pair as a complex number
    r = z * (cos + 1j * sin)[:, None, :]                 # rotating = multiplying by e^(i angle)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = r.real, r.imag
    return out
''',
    5: '''
import numpy as np

def softmax(s, axis=-1):
    e = np.exp(s - np.max(s, axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)

def paged_attention(q, k_cache, v_cache, batch):
    T, Hq, hd = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = np.zeros_like(q)
    for b in range(batch.n_seqs):
        for t in range(batch.seq_starts[b], batch.seq_starts[b + 1]):
            p = batch.positions[t]
            blocks = batch.block_tables[b]
            K = np.stack([k_cache[blocks[j // bs], j % bs] for j in range(p + 1)])   # [p+1, Hkv, hd]
            V = np.stack([v_cache[blocks[j // bs], j % bs] for j in range(p + 1)])
            for h in range(Hq):
                g = h // (Hq // Hkv)
                a = softmax(K[:, g] @ q[t, h] / np.sqrt(hd))
                out[t, h] = a @ V[:, g]
    return out
''',
    6: '''
import numpy as np

def slot_mapping(block_table, start, stop, block_size):
    return np.array([block_table[p // block_size] * block_size + p % block_size for p in range(start, stop)])

def kv_write(k_cache, v_cache, k, v, slot_mapping):
    bs = k_cache.shape[1]
    for t, s in enumerate(slot_mapping):
        k_cache[s // bs, s % bs] = k[t]
        v_cache[s // bs, s % bs] = v[t]
''',
    7: '''
import numpy as np

def silu(z):
    return z * np.exp(-np.logaddexp(0, -z.astype(np.float64))).astype(z.dtype)

def swiglu(x, w_gate, w_up, w_down):
    return (silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T
''',
    8: '''
import numpy as np

def apply_repetition_penalty(logits, seen, penalty):
    out = np.array(logits, copy=True)
    for i in set(int(s) for s in seen):
        out[i] = out[i] / penalty if out[i] > 0 else out[i] * penalty
    return out

def filter_logits(logits, p):
    z = np.array(logits, dtype=np.float64)
    if 0 < p.top_k < len(z):
        z[z < np.sort(z)[-p.top_k]] = -np.inf
    if p.top_p < 1:
        order = np.argsort(-z, kind="stable")
        probs = np.exp(z[order] - z[order[0]]); probs /= probs.sum()
        before = 0.0
        for i, pr in zip(order, probs):
            if before >= p.top_p:
                z[i] = -np.inf
            before += pr
    if p.min_p > 0:
        probs = np.exp(z - z.max()); probs /= probs.sum()
        z[probs < p.min_p * probs.max()] = -np.inf
    return z

def sample(logits, p, rng, seen=None):
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
    if p.temperature == 0:
        return int(np.argmax(logits))
    z = filter_logits(np.asarray(logits) / p.temperature, p)
    probs = np.exp(z - z.max()); probs /= probs.sum()
    return int(np.searchsorted(np.cumsum(probs), rng.random() * probs.sum()))
''',
    9: '''
import numpy as np
from numba import njit, prange

@njit
def rmsnorm_numba(x, w, eps):
    out = np.empty_like(x)
    for t in range(x.shape[0]):
        r = 1.0 / np.sqrt(np.mean(x[t] * x[t]) + eps)
        out[t] = x[t] * np.float32(r) * w
    return out

@njit(parallel=True)
def matmul_numba(x, w):
    out = np.zeros((x.shape[0], w.shape[0]), dtype=np.float32)
    for o in prange(w.shape[0]):
        for t in range(x.shape[0]):
            out[t, o] = (x[t] * w[o]).sum()
    return out
''',
    11: '''
import math
from numba import cuda, float32

@cuda.jit
def rmsnorm_kernel(x, w, eps, out):
    part = cuda.shared.array(1024, float32)
    scale = cuda.shared.array(1, float32)
    t, tid, n = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    D = x.shape[1]
    acc = float32(0.0)
    i = tid
    while i < D:
        acc += x[t, i] * x[t, i]
        i += n
    part[tid] = acc
    cuda.syncthreads()
    if tid == 0:                       # no tree: one thread adds the partial sums in order
        total = float32(0.0)
        for j in range(n):
            total += part[j]
        scale[0] = float32(1.0) / float32(math.sqrt(total / float32(D) + eps))
    cuda.syncthreads()
    i = tid
    while i < D:
        out[t, i] = x[t, i] * scale[0] * w[i]
        i += n
''',
    10: '''
import math
import numpy as np

def quantize_q8_0(w):
    w = np.asarray(w, dtype=np.float32)
    out = bytearray()
    for blk in w.reshape(-1, 32):
        d = np.float32(np.max(np.abs(blk)) / np.float32(127))
        inv = np.float32(1) / d if d != 0 else np.float32(0)
        q = [int(math.copysign(math.floor(abs(float(v)) + 0.5), v)) for v in blk * inv]
        out += np.float16(d).tobytes() + np.array(q, dtype=np.int8).tobytes()
    return np.frombuffer(bytes(out), dtype=np.uint8).reshape(*w.shape[:-1], -1)

def dequantize_q8_0(raw, shape):
    raw = np.asarray(raw, dtype=np.uint8).tobytes()
    parts = []
    for i in range(0, len(raw), 34):
        d = np.float32(np.frombuffer(raw[i:i + 2], dtype="<f2")[0])
        parts.append(d * np.frombuffer(raw[i + 2:i + 34], dtype=np.int8).astype(np.float32))
    return np.concatenate(parts).reshape(shape)

def dequantize_q4_1(raw, shape):
    raw = np.asarray(raw, dtype=np.uint8).tobytes()
    parts = []
    for i in range(0, len(raw), 20):
        d, m = (np.float32(v) for v in np.frombuffer(raw[i:i + 4], dtype="<f2"))
        qs = raw[i + 4:i + 20]
        q = np.array([b & 15 for b in qs] + [b >> 4 for b in qs], dtype=np.float32)
        parts.append(d * q + m)
    return np.concatenate(parts).reshape(shape)
''',
    12: '''
def block_hashes(tokens, block_size):
    names, parent = [], 0
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent,) + tuple(tokens[start:start + block_size]))   # another chaining
        names.append(parent)
    return names
''',
    13: '''
import numpy as np


def verify_sample(p, q, proposals, u):
    k = len(proposals)
    for i in range(k):
        x = proposals[i]
        ratio = p[i, x] if q is None else (p[i, x] / q[i, x] if q[i, x] > 0 else 0.0)
        if u[i] < ratio:
            continue
        w = p[i].copy() if q is None else np.clip(p[i] - q[i], 0, None)
        if q is None:
            w[x] = 0
        c = np.cumsum(w)
        return i, int(min(np.searchsorted(c, u[k] * c[-1], side="right"), len(c) - 1))
    c = np.cumsum(p[k])
    return k, int(min(np.searchsorted(c, u[k] * c[-1], side="right"), len(c) - 1))
''',
    14: '''
import numpy as np
from minfer.batch import make_batch

def run_layers(x, cos, sin, batch, cache, weights, config, ops):
    c, T = config, x.shape[0]
    for l, L in enumerate(weights.layers):
        h = ops.rmsnorm(x, L.attn_norm, c.rms_eps)
        q = ops.rope(ops.linear(h, L.wq).reshape(T, c.n_heads, c.head_dim), cos, sin)
        k = ops.rope(ops.linear(h, L.wk).reshape(T, c.n_kv_heads, c.head_dim), cos, sin)
        v = ops.linear(h, L.wv).reshape(T, c.n_kv_heads, c.head_dim)
        ops.kv_write(cache.k[l], cache.v[l], k, v, batch.slot_mapping)
        a = ops.attention(q, cache.k[l], cache.v[l], batch)
        x = x + ops.linear(a.reshape(T, c.n_heads * c.head_dim), L.wo)
        x = x + ops.swiglu(ops.rmsnorm(x, L.ffn_norm, c.rms_eps), L.w_gate, L.w_up, L.w_down)
    return x

def greedy_generate(model, prompt_ids, n_new):
    bs = 8
    n_blocks = (len(prompt_ids) + n_new + bs - 1) // bs + 1
    table = list(range(n_blocks))[::-1]
    cache = model.new_cache(n_blocks=n_blocks, block_size=bs)
    tokens = []
    logits = model.forward(make_batch([(prompt_ids, 0, table)], bs), cache)
    for step in range(n_new):
        tokens.append(int(np.argmax(logits[-1])))
        if len(tokens) < n_new:
            pos = len(prompt_ids) + step
            logits = model.forward(make_batch([([tokens[-1]], pos, table)], bs), cache)
    return tokens
''',
}


def _ns(source: str) -> dict:
    ns: dict = {}
    exec(textwrap.dedent(source), ns)
    return ns


def _write(folder, n, source):
    path = folder / classroom.get_lesson(n).filename
    path.write_text(source)
    return path


def _cli(*argv):
    parser = argparse.ArgumentParser()
    classroom.add_parser(parser.add_subparsers(dest="command"))
    return classroom.run(parser.parse_args(["lesson", *argv]))


# --- the checks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n", LESSON_NUMBERS)
def test_reference_passes_every_task(n, request):
    if classroom.get_lesson(n).needs_cuda and not _on_gpu_or_simulator(request):
        return
    results = check_functions(n, reference_functions(n))
    assert [r.status for r in results] == ["pass"] * len(results), [(r.task, r.message) for r in results]


@pytest.mark.parametrize("n", LESSON_NUMBERS)
def test_independent_solutions_pass(n, request):
    if classroom.get_lesson(n).needs_cuda and not _on_gpu_or_simulator(request):
        return
    results = check_functions(n, _ns(SOLUTIONS[n]))
    assert all(r.passed for r in results), [(r.task, r.message) for r in results]


@pytest.mark.parametrize("n", LESSON_NUMBERS)
def test_untouched_stubs_fail_every_task(n):
    lesson = classroom.get_lesson(n)
    results = check_functions(lesson, _ns(lesson.stub))
    assert [r.status for r in results] == ["todo"] * len(lesson.tasks)
    # every task of the lesson has a stub with the reference's name and parameters
    import inspect
    stubs = _ns(lesson.stub)
    for task in lesson.tasks:
        ref = lesson.references[task.name]
        ref = getattr(ref, "py_func", ref)                 # a kernel: the function it compiles
        assert list(inspect.signature(stubs[task.name]).parameters) == list(inspect.signature(ref).parameters)


def _message(n, **overrides):
    fns = dict(reference_functions(n), **overrides)
    (bad,) = [r for r in check_functions(n, fns) if not r.passed]
    return bad.message


def test_classic_mistakes_are_named():
    def layernorm(x, w, eps):
        return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w
    assert "LayerNorm" in _message(3, rmsnorm=layernorm)
    assert "rotate_half" in _message(4, rope=tasks._rotate_half_rope)

    def no_mask(q, k, v, b):
        return tasks._attention_variant(q, k, v, b, causal=False)

    def modulo_heads(q, k, v, b):
        return tasks._attention_variant(q, k, v, b, group_of=lambda h: h % k.shape[2])
    assert "causal mask" in _message(5, paged_attention=no_mask)
    assert "h % Hkv" in _message(5, paged_attention=modulo_heads)

    def swapped(x, wg, wu, wd):
        from minfer.stages.mlp import silu
        return (silu(x @ wu.T) * (x @ wg.T)) @ wd.T
    assert "gate branch" in _message(7, swiglu=swapped)

    def top_p_off_by_one(logits, p):
        from minfer.sampling import filter_logits
        z = filter_logits(logits, minfer.SamplingParams(temperature=1, top_k=p.top_k, min_p=p.min_p))
        if p.top_p < 1:
            order = np.argsort(-z)
            probs = np.exp(z[order] - z[order].max())
            probs /= probs.sum()
            z[order[np.cumsum(probs) > p.top_p]] = -np.inf
        return z
    assert "mass *before* it" in _message(8, filter_logits=top_p_off_by_one)


def test_classic_mistakes_are_named_for_kernels_and_blocks():
    from numba import njit
    from minfer.stages.rmsnorm import rmsnorm

    def plain(x, w, eps):                                  # right numbers, not compiled
        return rmsnorm(x, w, eps)
    assert "plain Python function" in _message(9, rmsnorm_numba=plain)

    @njit
    def float64_out(x, w):
        out = np.zeros((x.shape[0], w.shape[0]))           # float64 by default
        for o in range(w.shape[0]):
            for t in range(x.shape[0]):
                out[t, o] = (x[t] * w[o]).sum()
        return out
    assert "float64" in _message(9, matmul_numba=float64_out)

    @njit
    def not_transposed(x, w):          # loops, not `@`: numba's matmul would need scipy
        T, K = x.shape
        O = w.shape[0]
        out = np.zeros((T, O), np.float32)
        for t in range(T):
            for o in range(O):
                for k in range(K):
                    out[t, o] += x[t, k] * (w[k, o] if K == O else w[o, k])
        return out
    assert "x @ w.T" in _message(9, matmul_numba=not_transposed)

    def half_even(w):
        x = np.asarray(w, np.float32).reshape(-1, 32)
        d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
        out = np.zeros(len(x), [("d", "<f2"), ("qs", "i1", (32,))])
        out["d"], out["qs"] = d[:, 0], np.round(x * inv)
        return out.view(np.uint8).reshape(*np.shape(w)[:-1], -1)
    assert "away from zero" in _message(10, quantize_q8_0=half_even)

    def interleaved(raw, shape):
        b = np.asarray(raw).reshape(-1).view([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))])
        q = np.stack([b["qs"] & 15, b["qs"] >> 4], axis=-1).reshape(len(b), 32).astype(np.float32)
        return (b["d"].astype(np.float32)[:, None] * q + b["m"].astype(np.float32)[:, None]).reshape(shape)
    assert "nibble order" in _message(10, dequantize_q4_1=interleaved)

    def unsigned(raw, shape):
        b = np.asarray(raw).reshape(-1).view([("d", "<f2"), ("qs", "u1", (32,))])
        return (b["d"].astype(np.float32)[:, None] * b["qs"].astype(np.float32)).reshape(shape)
    assert "signed int8" in _message(10, dequantize_q8_0=unsigned)


def test_classic_mistakes_are_named_for_gpu_kernels(request):
    if not _on_gpu_or_simulator(request):
        return
    def variant(old, new):                                 # the solution with one mistake in it
        assert old in SOLUTIONS[11]
        return _ns(SOLUTIONS[11].replace(old, new))["rmsnorm_kernel"]
    assert "not by the number of threads" in _message(
        11, rmsnorm_kernel=variant("total / float32(D)", "total / float32(n)"))
    assert "never written" in _message(11, rmsnorm_kernel=variant("        i += n\n", "        i += D\n"))
    assert "only thread 0" in _message(11, rmsnorm_kernel=variant("range(n)", "range(1)"))

    def plain(x, w, eps, out):
        return None
    assert "@cuda.jit" in _message(11, rmsnorm_kernel=plain)


def test_a_numba_compile_error_is_short():
    from numba import njit

    @njit
    def broken(x, w, eps):
        return x.no_such_attribute
    msg = _message(9, rmsnorm_numba=broken)
    assert msg.startswith("Numba could not compile") and msg.count("\n") <= 6


def test_a_crash_is_reported_with_the_line():
    def broken(x, w, eps):
        return x @ np.ones((3, 3))          # wrong shapes
    msg = _message(3, rmsnorm=broken)
    assert "raised ValueError" in msg and "line" in msg


# --- the command line ---------------------------------------------------------------------------

def test_list(capsys):
    assert _cli("list") == 0
    out = capsys.readouterr().out
    assert "paged_attention" in out and "05" in out


def test_start_check_flow(tmp_path, capsys):
    d = str(tmp_path / "ex")
    assert _cli("start", "5", "--dir", d) == 0
    path = tmp_path / "ex" / "lesson05_attention.py"
    assert "raise NotImplementedError" in path.read_text()
    with pytest.raises(ExerciseError, match="already exists"):
        _cli("start", "5", "--dir", d)
    capsys.readouterr()
    assert _cli("check", "05", "--dir", d) == 1                       # untouched stubs fail
    assert "TODO  paged_attention" in capsys.readouterr().out
    path.write_text(SOLUTIONS[5])
    assert _cli("check", "5", "--dir", d) == 0
    out = capsys.readouterr().out
    assert "PASS  softmax" in out and "PASS  paged_attention" in out and "2 of 2" in out
    assert _cli("start", "5", "--dir", d, "--force") == 0            # start over
    assert _cli("check", "5", "--dir", d) == 1


def test_check_of_the_gpu_lesson_needs_no_gpu(tmp_path):
    """`lesson check 11` launches kernels: on a machine without a GPU (and without the simulator
    switched on) it runs itself again under NUMBA_ENABLE_CUDASIM=1; the exit code says pass/fail."""
    d = str(tmp_path)
    assert _cli("start", "11", "--dir", d) == 0
    assert _cli("check", "11", "--dir", d) == 1                      # the untouched stub
    _write(tmp_path, 11, SOLUTIONS[11])
    assert _cli("check", "11", "--dir", d) == 0


def test_check_reports_a_wrong_function_with_a_hint(tmp_path, capsys):
    _write(tmp_path, 3, SOLUTIONS[3].replace("np.sqrt(np.dot(x[t], x[t]) / x.shape[1] + eps)",
                                             "(np.sqrt(np.dot(x[t], x[t]) / x.shape[1]) + eps)"))
    assert _cli("check", "3", "--dir", str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "PASS  embedding" in out and "FAIL  rmsnorm" in out
    assert "eps belongs inside the square root" in out and "hint:" in out


def test_bad_input_is_a_clean_error(tmp_path):
    with pytest.raises(ExerciseError, match="no exercises"):
        _cli("start", "15", "--dir", str(tmp_path))
    for bad in ("abc", "-1", "3.5"):
        with pytest.raises(ExerciseError, match=f"a lesson is a number, such as 5 or 05, not '{bad}'"):
            _cli("start", bad, "--dir", str(tmp_path))
    assert not any(tmp_path.iterdir())
    with pytest.raises(ExerciseError, match="lesson start 6"):
        _cli("check", "6", "--dir", str(tmp_path))
    _write(tmp_path, 7, "def silu(z):\n    return z *\n")
    with pytest.raises(ExerciseError, match="line 2"):
        _cli("check", "7", "--dir", str(tmp_path))


# --- the engine on the student's code -------------------------------------------------------------

def test_student_ops_swaps_only_finished_functions(tmp_path, tiny_gguf):
    lesson3 = classroom.get_lesson(3).stub.replace(                   # rmsnorm done, embedding not
        '    raise NotImplementedError("lesson 03: rmsnorm")',
        "    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w")
    _write(tmp_path, 3, lesson3)
    _write(tmp_path, 5, SOLUTIONS[5])
    _write(tmp_path, 4, classroom.get_lesson(4).stub)                 # started, nothing done
    llm = minfer.LLM(tiny_gguf, backend="numpy")
    ids = llm.tokenizer.encode("the cat sat on the mat")
    want = llm.logits(ids)
    base = llm.model.ops
    messages = []
    ops = student_ops(base, tmp_path, log=messages.append)
    assert ops.mine == ["rmsnorm", "attention"]
    assert ops.embedding.__wrapped__ is base.embedding and ops.rope.__wrapped__ is base.rope   # NaN-checked
    assert ops.rmsnorm.__wrapped__ is not base.rmsnorm and ops.attention.__wrapped__ is not base.attention
    assert "rmsnorm, attention" in messages[0]
    llm.model.ops = ops
    np.testing.assert_allclose(llm.logits(ids), want, atol=1e-4, rtol=1e-4)
    out = llm.generate("the cat", minfer.SamplingParams(temperature=0, max_tokens=4))
    assert len(out[0].token_ids) >= 1


def test_student_kernels_run_in_the_engine(tmp_path, tiny_gguf):
    """Lesson 09's kernels plug in as ops.rmsnorm and ops.linear (lesson 10's are checked only)."""
    _write(tmp_path, 3, SOLUTIONS[3])                  # its rmsnorm: replaced by lesson 09's
    _write(tmp_path, 9, SOLUTIONS[9])
    _write(tmp_path, 10, SOLUTIONS[10])
    llm = minfer.LLM(tiny_gguf, backend="numpy")
    ids = llm.tokenizer.encode("the cat sat on the mat")
    want = llm.logits(ids)
    said = []
    ops = student_ops(llm.model.ops, tmp_path, log=said.append)
    assert ops.mine == ["embedding", "rmsnorm", "linear"]      # each op once
    assert "your own embedding, rmsnorm (rmsnorm_numba), linear (matmul_numba)" in said[-1], said
    llm.model.ops = ops
    np.testing.assert_allclose(llm.logits(ids), want, atol=1e-4, rtol=1e-4)


def test_student_ops_errors(tmp_path):
    with pytest.raises(ExerciseError, match="lesson start"):
        student_ops(minfer.backends.numpy_ops(), tmp_path / "missing")
    _write(tmp_path, 3, classroom.get_lesson(3).stub.replace(
        '    raise NotImplementedError("lesson 03: rmsnorm")', "    return x @ w"))
    with pytest.raises(ExerciseError, match="lesson check 3"):
        student_ops(minfer.backends.numpy_ops(), tmp_path, log=lambda m: None)
    empty = tmp_path / "empty"
    empty.mkdir()
    ops = student_ops(minfer.backends.numpy_ops(), empty, log=lambda m: None)
    assert ops.mine == []


def test_subtle_mistakes_are_named():
    """Bugs that used to pass, or got only a number: float32 angles, a float64 result, a mask of
    j <= p + 1 or j < p, the block table ignored."""
    from minfer.stages.rope import rope_angles

    def angles_in_float32(positions, head_dim, base):
        inv = (base ** (-np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
        ang = positions.astype(np.float32)[:, None] * inv[None]
        return np.cos(ang), np.sin(ang)
    assert "in float32" in _message(4, rope_angles=angles_in_float32)

    def angles_in_float64(positions, head_dim, base):
        cos, sin = rope_angles(positions, head_dim, base)
        return cos.astype(np.float64), sin.astype(np.float64)
    assert "float64, expected float32" in _message(4, rope_angles=angles_in_float64)

    def rmsnorm64(x, w, eps):
        return (x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + eps) * w)
    assert "expected float32" in _message(3, rmsnorm=rmsnorm64)

    def sees_next(q, k, v, b):
        return tasks._attention_variant(q, k, v, b, offset=1)

    def hides_itself(q, k, v, b):
        return tasks._attention_variant(q, k, v, b, offset=-1)

    def contiguous(q, k, v, b):
        return tasks._attention_variant(q, k, v, b, contiguous=True)
    assert "off by one" in _message(5, paged_attention=sees_next)
    assert "hides the token itself" in _message(5, paged_attention=hides_itself)
    assert "block table is ignored" in _message(5, paged_attention=contiguous)


def test_in_place_overflow_and_weak_hashes_are_named():
    """An in-place rmsnorm / rope (the reference then read the changed x: a number, not the
    mistake), exp overflowing in silu (the task says no warnings), block names blind to order or
    to everything but the sum (they would share the wrong cached blocks)."""
    from minfer.stages.rmsnorm import rmsnorm
    from minfer.stages.rope import rope

    def rmsnorm_in_place(x, w, eps):
        x[:] = rmsnorm(x, w, eps)
        return x

    def rope_in_place(x, cos, sin):
        x[:] = rope(x, cos, sin)
        return x
    assert "in place" in _message(3, rmsnorm=rmsnorm_in_place)
    assert "in place" in _message(4, rope=rope_in_place)
    assert "overflowed" in _message(7, silu=lambda z: z / (1 + np.exp(-z)))

    def chained(name_of_block):
        def block_hashes(tokens, bs):
            out, prev = [], 0
            for i in range(len(tokens) // bs):
                prev = hash((prev, name_of_block(tokens[i * bs:(i + 1) * bs])))
                out.append(prev)
            return out
        return block_hashes
    assert "reverse order" in _message(12, block_hashes=chained(frozenset))
    assert "same sum" in _message(12, block_hashes=chained(lambda b: (sum(b), b[-1])))
    assert all(r.passed for r in check_functions(12, dict(reference_functions(12),
                                                           block_hashes=chained(tuple))))


ROPE_PAIRING_BUG = '''
import numpy as np

def rope_angles(positions, head_dim, base):
    inv = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    ang = positions.astype(np.float64)[:, None] * inv[None]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)

def rope(x, cos, sin):                       # halves paired, not neighbours
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([a * c - b * s, a * s + b * c], axis=-1)
'''


def test_use_mine_says_which_function_is_wrong(tmp_path, tiny_gguf):
    """A function that runs but differs from the reference stops --use-mine before the chat, named,
    with what differs; --anyway runs it all the same."""
    _write(tmp_path, 4, ROPE_PAIRING_BUG)
    messages = []
    with pytest.raises(ExerciseError, match=r"your rope does not match.*lesson check 4 --dir .*--anyway"):
        student_ops(minfer.backends.numpy_ops(), tmp_path, log=messages.append)
    assert any("your rope" in m and "rotate_half" in m for m in messages), messages
    ops = student_ops(minfer.backends.numpy_ops(), tmp_path, log=messages.append, anyway=True)
    assert ops.mine == ["rope_angles", "rope"] and "--anyway" in messages[-2]
    llm = minfer.LLM(tiny_gguf, backend="numpy")
    llm.model.ops = ops
    assert llm.generate("the cat", minfer.SamplingParams(temperature=0, max_tokens=3))[0].token_ids


MASK_HIDES_ITSELF = '''
import numpy as np

def softmax(s, axis=-1):
    e = np.exp(s - np.max(s, axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)

def paged_attention(q, k_cache, v_cache, batch):
    T, Hq, hd = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = np.zeros_like(q)
    for b in range(batch.n_seqs):
        S = int(batch.context_lens[b])
        blocks = batch.block_tables[b, : -(-S // bs)]
        K = k_cache[blocks].reshape(-1, Hkv, hd)[:S]
        V = v_cache[blocks].reshape(-1, Hkv, hd)[:S]
        for t in range(batch.seq_starts[b], batch.seq_starts[b + 1]):
            for h in range(Hq):
                g = h // (Hq // Hkv)
                s = K[:, g] @ q[t, h] / np.sqrt(hd)
                s = np.where(np.arange(S) < batch.positions[t], s, -np.inf)   # hides itself
                out[t, h] = softmax(s) @ V[:, g]
    return out
'''


def test_nan_from_a_stage_is_named_at_that_stage(tmp_path, tiny_gguf):
    """A mask that hides the token itself makes attention NaN at position 0: the error names the
    student's attention, where the NaN was made, not a crash in sampling."""
    _write(tmp_path, 5, MASK_HIDES_ITSELF)
    with pytest.raises(ExerciseError, match="paged_attention"):
        student_ops(minfer.backends.numpy_ops(), tmp_path, log=lambda m: None)
    ops = student_ops(minfer.backends.numpy_ops(), tmp_path, log=lambda m: None, anyway=True)
    llm = minfer.LLM(tiny_gguf, backend="numpy")
    llm.model.ops = ops
    with pytest.raises(ExerciseError, match=r"your paged_attention \(attention in the model\) returned "
                                            r"NaN.*`python -m minfer lesson check 5 --dir \S+` shows"):
        llm.generate("the cat sat", minfer.SamplingParams(temperature=0.7, max_tokens=3))


def test_speculative_check_fails_on_wrong_rules():
    """Lesson 13's check tells a correct rule from always-accept and from a wrong residual."""
    from minfer.spec import verify

    def wrong_residual(p, q, d, u):
        for i, x in enumerate(d):
            if u[i] * (1.0 if q is None else q[i, x]) >= p[i, x]:
                return i, verify.draw(p[i], u[len(d)])
        return len(d), verify.draw(p[len(d)], u[len(d)])
    for bad in (verify.always_accept, wrong_residual):
        (r,) = check_functions(13, {"verify_sample": bad})
        assert r.status == "fail", bad
