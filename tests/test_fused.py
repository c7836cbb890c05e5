"""cpu/model.py: the numba backend's step, its layers in one compiled region (cpu/region.py), computes
what model.py's loop computes on the same kernels."""
import numpy as np
import numba
import pytest

import minfer
from minfer.cpu import formats
from minfer.batch import make_batch
from minfer.stages import quant_i8
from minfer.stages.quant_dispatch import KernelConfig
from minfer.stages.simd import has_amx
from minfer.model import Transformer


def steps(model, tables):
    """Prefill two prompts together (every row's logits), then decode one token for each."""
    prompts = [list(range(10, 23)), list(range(40, 47))]
    cache = model.new_cache(n_blocks=12, block_size=4)
    out = [model.forward(make_batch([(p, 0, t) for p, t in zip(prompts, tables)], 4, all_logits=True), cache)]
    out.append(model.forward(make_batch([([5], len(p), t) for p, t in zip(prompts, tables)], 4), cache))
    out.append(model.forward(make_batch([([7, 8, 9], len(p) + 1, t) for p, t in zip(prompts, tables)], 4), cache))
    return out, cache


@pytest.mark.parametrize("quant", ["q4_1", "q4_0", "q8_0"])
@pytest.mark.parametrize("act", ["f32", "f32-float-kernels", "int8", "f32-tile-unit", "int8-tile-unit"])
def test_fused_layers_equal_the_python_loop(tiny_gguf, quant, act, monkeypatch):
    """f32: float32 x split into three int8 parts where the CPU has VNNI (the default);
    f32-float-kernels: the float kernels, as on a CPU without it; -tile-unit: the panels' byte
    products on the tile unit (AMX) from 2 rows on."""
    if act != "f32-float-kernels" and not quant_i8.has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI")
    if act.endswith("tile-unit") and not has_amx():
        pytest.skip("this CPU has no AMX tile unit")
    kernels = KernelConfig(split_x=act != "f32-float-kernels",
                           **({"tile_unit_rows": (2,) * 4} if act.endswith("tile-unit") else {}))
    act = act[:3] if act.startswith("f32") else act[:4]
    llm = minfer.LLM(tiny_gguf, quant=quant, activations=act, kernels=kernels)
    family = formats.Q8 if quant == "q8_0" else formats.Q4
    want_kind = {"int8": formats.INT8}.get(act, formats.SPLIT if kernels.split_x else family)
    assert formats.kernels_for(llm.weights.stacks, act == "int8", kernels.split_x) == want_kind
    plain = Transformer(llm.config, llm.weights, llm.model.ops)     # model.py's loop, same kernels
    calls, heads = [], []
    real = llm.model.run_region

    def spy(kind, x, *a):
        calls.append(len(x))
        x, logits = real(kind, x, *a)
        heads.append(logits is not None)
        return x, logits
    tables = [[0, 1, 2, 3, 4, 5], [11, 10, 9, 8, 7, 6]]
    monkeypatch.setattr(llm.model, "run_region", spy)
    got, cache_got = steps(llm.model, tables)
    want, cache_want = steps(plain, tables)
    # the region ran for every step: the 20-token prefill is short of KernelConfig.region_max_rows
    assert calls == [20, 2, 6]
    # the region ran the final norm and the (Q8_0) LM head too where its kernels read that
    # format: the int8-part ones read all three; the float Q4 kernels not Q8_0
    fused_head = formats.head_args(llm.weights, want_kind) is not None
    assert fused_head == (want_kind != formats.Q4)
    assert heads == [fused_head] * 3
    # int8: x is rounded to int8 in every matmul, so a last-bit difference between two compiled
    # copies of a kernel (the loop's own and the standalone one; numba's cached and fresh code
    # were seen to differ so) can flip a rounding (1/127 of a block's largest value) and grow
    # through the layers: an int8-level bound. Seen: up to 2.6e-2 (region, q4_1, after a change
    # that moved no arithmetic, only the code around it); a wrong kernel is off by ~1. The
    # region's int8 matmuls (quant_panel.py: the same function, its float sums in another order)
    # and the loop's each come within ~5e-2 of the float32 model on this tiny random one, so
    # their difference is bounded by the sum of the two.
    tol = 1e-1 if act == "int8" else 1e-5
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert np.abs(g - w).max() <= tol * np.abs(w).max()
    np.testing.assert_allclose(cache_got.k, cache_want.k, rtol=tol, atol=tol)
    np.testing.assert_allclose(cache_got.v, cache_want.v, rtol=tol, atol=tol)


def test_fused_loop_is_skipped_where_it_does_not_apply(tiny_gguf, monkeypatch):
    f32 = minfer.LLM(tiny_gguf, quant="f32")
    split = KernelConfig().split_x
    assert formats.kernels_for(f32.weights.stacks, False, split) is None  # float32 weights: no kernel
    q = minfer.LLM(tiny_gguf, quant="q4_1")
    assert formats.kernels_for({k: v for k, v in q.weights.stacks.items() if k != "wo"}, False, split) is None
    # the layers hold views of the stacks: one copy of the weights in memory
    L = q.weights.layers[1]
    assert np.shares_memory(L.w_up.qs, q.weights.stacks["w_up"][1])
    assert np.shares_memory(L.wq.qs, q.weights.stacks["wqkv"][1])
    # a prompt of region_max_rows tokens or more goes to the sgemm tiles, in model.py's loop
    ids = list(range(10, 30))
    short = q.logits(ids)
    q = minfer.LLM(tiny_gguf, quant="q4_1",
                   kernels=KernelConfig(gemm_min_rows=20, split_gemm_min_rows=20, region_max_rows=20))
    calls, real = [], q.model.run_region
    monkeypatch.setattr(q.model, "run_region", lambda k, x, *a: calls.append(len(x)) or real(k, x, *a))
    assert np.abs(q.logits(ids) - short).max() <= 1e-4 * np.abs(short).max() and calls == []
    assert q.logits(ids[:19]).shape[0] == 19 and calls == [19]


def test_float16_scales_pick_the_kernels_that_read_them(tiny_gguf):
    """The stacks' scales decide: float16 ones go to the int8-part kernels even where the
    kernels asked for are the float ones (which would read their bits as numbers)."""
    if not quant_i8.has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI")
    q = minfer.LLM(tiny_gguf, quant="q4_1", kernels=KernelConfig(split_x=True))
    assert formats.kernels_for(q.weights.stacks, False, split_x=False) == formats.SPLIT
    floats = minfer.LLM(tiny_gguf, quant="q4_1", kernels=KernelConfig(split_x=False))
    assert formats.kernels_for(floats.weights.stacks, False, split_x=False) == formats.Q4
    assert floats.model.region_kind(1) == formats.Q4
    ids = list(range(10, 15))
    np.testing.assert_allclose(q.logits(ids), floats.logits(ids), rtol=1e-4, atol=1e-4)


def test_the_layer_loop_is_loaded_from_the_disk_cache(tiny_gguf):
    """A second process must not compile the loop again (functions passed as arguments once made
    numba recompile it in every process, ~15 s on the first decode step)."""
    import os
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "minfer", "generate", "hi", "--model", str(tiny_gguf),
           "--quant", "q4_1", "-n", "3"]
    assert subprocess.run(cmd, capture_output=True).returncode == 0       # compiled and saved
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "NUMBA_DEBUG_CACHE": "1"})
    log = (r.stdout + r.stderr).splitlines()
    assert any("region._region" in line and "loaded" in line for line in log)
    assert not [line for line in log if "region." in line and "saved" in line]


def test_an_edit_to_a_helper_in_another_file_recompiles_the_cached_kernel(tmp_path):
    """numba stamps a cached kernel with its own file only; attention.py's kernel compiles in
    fastexp.py's exp32. In a copy of the package: run the kernel (cached), edit exp32, run again
    in a new process: the result must change (jitcache.py widens the stamp to all kernel files)."""
    import os
    import shutil
    import subprocess
    import sys
    import minfer
    shutil.copytree(os.path.dirname(minfer.__file__), tmp_path / "minfer",
                    ignore=shutil.ignore_patterns("__pycache__"))
    run = ("import numpy as np\n"
           "from minfer.stages.attention import _attention_rows\n"
           "r = np.random.default_rng(0)\n"
           "q = r.standard_normal((1, 2, 8)).astype(np.float32)\n"
           "k, v = (r.standard_normal((2, 4, 1, 8)).astype(np.float32) for _ in '01')\n"
           "o = _attention_rows(q, k, v, np.zeros(1, np.int64), np.array([6]), np.array([[1, 0]], np.int32))\n"
           "print(repr(float(o.sum())))\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "NUMBA_CACHE_DIR": str(tmp_path / "nbcache")}

    def result():
        r = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, env=env,
                           cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        return float(r.stdout)
    before = result()
    assert result() == before                                    # from the cache: the same
    exp = tmp_path / "minfer" / "stages" / "fastexp.py"
    exp.write_text(exp.read_text().replace("    t = min(", "    x = x * float32(0.0)\n    t = min(", 1))
    after = result()                  # every exp is now 1: uniform attention weights
    assert after != before


@pytest.mark.parametrize("act", ["f32", "int8"])
def test_a_prompt_gets_the_same_bits_in_one_chunk_or_several(tiny_gguf, act):
    """A prompt's rows are cut into the threads' key slices where each row alone would be (and
    the matmuls give a row the same bits whatever rows come with it): the logits and the cache
    are the same to the bit whether the prompt comes in one chunk or in several — so a prompt
    after a cached prefix, or split by max_batch_tokens, goes on exactly as it would have; with
    int8 activations a last-bit difference had changed the greedy text."""
    if act == "int8" and not quant_i8.has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI")
    llm = minfer.LLM(tiny_gguf, quant="q4_1", activations=act, threads=2)
    model, table = llm.model, list(range(30))
    prompt = np.random.default_rng(5).integers(3, 64, 90).tolist()

    def run(sizes):
        cache = model.new_cache(n_blocks=30, block_size=4)
        out, pos = [], 0
        for n in sizes:
            out.append(model.forward(make_batch([(prompt[pos:pos + n], pos, table)], 4,
                                                all_logits=True), cache))
            pos += n
        return np.concatenate(out), cache.k[:, :23].copy()
    want = run([90])
    for sizes in ([40, 50], [33, 33, 24], [7, 83]):
        got = run(sizes)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), sizes
    G = minfer.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    first = llm.generate([prompt], G)[0]
    again = llm.generate([prompt], G)[0]                   # the prompt's blocks from the cache
    assert again.token_ids == first.token_ids


def test_a_model_keeps_its_thread_count_when_another_sets_one(tiny_gguf):
    """numba's thread count is one for the calling thread: a model made with threads=1 after
    another one set it to 1 for the other too, and with it the other's attention slices (its
    last bits; with int8 activations its greedy text). Each model now runs on its own count,
    and leaves the caller's as it found it."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one thread here")
    a = minfer.LLM(tiny_gguf, quant="q4_1", threads=2)
    rng = np.random.default_rng(3)
    prompt, table = rng.integers(3, 64, 70).tolist(), list(range(20))

    def logits(model):
        cache = model.new_cache(n_blocks=20, block_size=4)
        return model.forward(make_batch([(prompt, 0, table)], 4, all_logits=True), cache)
    want = logits(a.model)
    one = logits(minfer.LLM(tiny_gguf, quant="q4_1", threads=1).model)
    assert not np.array_equal(one, want)        # (one slice instead of two: the test can tell)
    assert numba.get_num_threads() == 1         # what the second model set, for this thread
    assert np.array_equal(logits(a.model), want)
    assert numba.get_num_threads() == 1


@pytest.mark.parametrize("workers", [1, 3])
def test_the_region_needs_no_thread_for_each_worker(tiny_gguf, workers):
    """region.py's barriers wait for work, not for threads: with one prange iteration, or more
    iterations than numba has threads (some run only after others finished the whole step), the
    step neither hangs nor changes."""
    llm = minfer.LLM(tiny_gguf, quant="q4_1")
    tables = [[0, 1, 2, 3, 4, 5], [11, 10, 9, 8, 7, 6]]
    want, cache_want = steps(llm.model, tables)
    llm.model.workers = workers
    got, cache_got = steps(llm.model, tables)
    # the same items; only attention's slices of the keys (one a worker, for the decode rows and
    # the prompts' rows alike) add up in another order, and the layers after carry that on
    for g, w in zip(got + [cache_got.k], want + [cache_want.k]):
        assert np.abs(g - w).max() <= 1e-5 * np.abs(w).max()


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("quant", ["q4_1", "q8_0"])
@pytest.mark.parametrize("act", ["f32", "int8", "f32-tile-unit", "int8-tile-unit"])
def test_a_verification_gives_each_row_the_bits_of_a_decode_step(tiny_gguf, quant, act, workers):
    """k new tokens of one sequence in one forward have, row for row, the logits (to the bit) of
    k one-token forwards — the matmuls give a row the same bits whatever rows come with it (the
    vector panels 1, 2, 3 or 4 tokens at a time, the tile unit), and attention cuts a row's keys
    into the threads' slices where it would alone (attention._alone); a decode step of several
    sequences gives each the bits of its own step. With int8 activations a last-bit difference
    could flip a rounding of x and, at a near tie, a greedy choice: speculation's text would then
    part from plain decoding's."""
    if not quant_i8.has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI")
    if act.endswith("tile-unit") and not has_amx():
        pytest.skip("this CPU has no AMX tile unit")
    kernels = KernelConfig(**({"tile_unit_rows": (2,) * 4} if act.endswith("tile-unit") else {}))
    llm = minfer.LLM(tiny_gguf, quant=quant, activations=act[:4].rstrip("-"), kernels=kernels)
    model, table = llm.model, list(range(8))
    model.workers = workers
    rng = np.random.default_rng(0)
    prefix, new = rng.integers(3, 64, 19).tolist(), rng.integers(3, 64, 9).tolist()

    def run(chunks):
        cache = model.new_cache(n_blocks=8, block_size=4)
        model.forward(make_batch([(prefix, 0, table)], 4), cache)
        out, pos = [], len(prefix)
        for c in chunks:
            out.append(model.forward(make_batch([(c, pos, table)], 4, all_logits=True), cache))
            pos += len(c)
        return np.concatenate(out)
    assert np.array_equal(run([new]), run([[t] for t in new]))
    # three sequences' decode steps in one forward, and each alone
    cache, tables = model.new_cache(n_blocks=24, block_size=4), [list(range(8 * i, 8 * i + 8)) for i in range(3)]
    lens = (19, 11, 26)
    model.forward(make_batch([(rng.integers(3, 64, n).tolist(), 0, t) for n, t in zip(lens, tables)], 4), cache)
    step = [([int(new[i])], n, t) for i, (n, t) in enumerate(zip(lens, tables))]
    together = model.forward(make_batch(step, 4), cache)
    for i in range(3):
        assert np.array_equal(model.forward(make_batch([step[i]], 4), cache)[0], together[i]), i
