"""cpu/greedy_head.py: a greedy step's arg-max from the LM head on int8 x and a bound — always
np.argmax of the three-part logits (the step's own), ties included; the bound against the panels
themselves, and the rule against its NumPy reference."""
import numpy as np
import pytest

import minfer
from minfer.cpu import greedy_head, quant_panel
from minfer.stages import quant_i8
from minfer.stages.quant import QuantMatrix, unpack_nibbles
from minfer.stages.quant_dispatch import KernelConfig
from minfer.weights import synthetic

pytestmark = pytest.mark.skipif(not quant_i8.has_vnni(), reason="this CPU has no AVX-512 VNNI")


def _head(fmt, O, K, seed, half=True, ties=()):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((O, K)).astype(np.float32)
    for a, b in ties:                         # equal rows: equal logits, a tie at every x
        w[b] = w[a]
    q = QuantMatrix.from_float(w, fmt)
    q = q.half_scales() if half else q
    p = quant_panel.PanelMatrix(q)
    return q, p, greedy_head.Head(q, p.qp, p.d, p.m)


def _block_max(x):
    return np.abs(x).reshape(len(x), -1, 32).max(axis=2)                      # [R, nb]


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0"])
def test_the_bound_holds_and_is_the_worst_case(fmt):
    """Without its safety margin the bound holds for random x, and x whose every value sits just
    short of a rounding midpoint, on the side that adds up, reaches it: a bound any smaller
    would not hold."""
    q, p, _ = _head(fmt, 37, 96, seed=1)
    G = greedy_head.bound_coefficients(q, safety=1.0)                          # [O, nb]
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 96)).astype(np.float32)
    x[1] *= 1e3
    x[2, :32] = 0                                                              # a zero block
    # x at the worst for row 0: 127 x / max|x| = k + 0.5 -+ 0.0001, so that x's rounding error
    # takes the sign of d q (q: the integers the kernel multiplies: Q4's nibbles, Q8_0's bytes)
    # and every block's error adds up — and each block's largest value exact, 127 at 127
    if fmt == "Q8_0":
        ints = q.qs[0].astype(np.float32)                                      # [96]
    else:
        ints = unpack_nibbles(q.qs[0].reshape(3, 16)).reshape(96).astype(np.float32)
    s = np.sign(np.repeat(q.d[0].astype(np.float32), 32) * ints)               # [96]
    k = rng.integers(0, 126, size=96).astype(np.float32)
    worst = ((k + 0.5 + 0.0001 * s) / 127).reshape(3, 32)
    worst[:, 0] = 1.0                                                          # max|x| = 1
    x = np.concatenate([x, worst.reshape(1, 96)])
    L3 = quant_panel.quant_linear_panels(x, p, 3)
    L1 = quant_panel.quant_linear_panels(x, p, 1)
    E = _block_max(x) @ G.T                                                    # [R, O]
    assert (np.abs(L3 - L1) <= E).all()
    assert np.abs(L3 - L1)[-1, 0] >= 0.95 * E[-1, 0]     # (the 3 exact values: 1/32 each)


def test_the_rule_reference():
    """argmax_by_bound: np.argmax of the exact values with any valid bound (ties: the first);
    with a bound too small it can miss the arg-max."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        exact = np.round(rng.standard_normal(50), 1)                           # ties likely
        bound = np.abs(rng.standard_normal(50)) * 0.3
        approx = exact + rng.uniform(-1, 1, 50) * bound
        assert greedy_head.argmax_by_bound(approx, bound, lambda v: exact[v]) == np.argmax(exact)
    exact = np.array([1.0, 1.2])
    assert greedy_head.argmax_by_bound(np.array([1.1, 1.0]), np.zeros(2), lambda v: exact[v]) == 0


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("R", [1, 3, 9, 17])
@pytest.mark.parametrize("most", [greedy_head.MOST, 1], ids=["few", "whole-head"])
def test_head_argmax_is_np_argmax_of_the_three_part_logits(fmt, R, most):
    """Rows 5 and 4,001 equal (a tie in every row of x: the first wins), rows close to each
    other, 5,000 rows (the last panel and chunk padded); the logits of the ids found are the
    three-part head's own, bit for bit. most=1: rows with more candidates take the whole head."""
    O, K = 5000, 96
    q, p, head = _head(fmt, O, K, seed=R, ties=[(5, 4001)])
    rng = np.random.default_rng(R + 100)
    x = rng.standard_normal((R, K)).astype(np.float32)
    w = q.dequantize()
    x[0] = w[5] / np.linalg.norm(w[5]) * 4          # row 0's arg-max: the tie 5 / 4,001
    if R > 2:
        x[2] = (w[7] + w[8]) * 2                    # rows 7 and 8 close at the top
    want = quant_panel.quant_linear_panels(x, p, 3)                            # [R, O]
    ids, best, exact, flat = greedy_head.head_argmax(x, head, most=most)
    assert (ids == np.argmax(want, axis=1)).all()
    assert (best == want[np.arange(R), ids]).all()                             # the same bits
    assert ids[0] == 5
    if most == greedy_head.MOST:
        assert exact < R * O / 4 and flat == 0      # a few panels a row, not the head
    assert greedy_head.head_argmax(np.full((2, K), np.nan, np.float32), head) is None


@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0"])
def test_the_kernels_follow_the_reference_rule(fmt):
    """The numba path step by step against the NumPy reference: _approx's logits are the one-part
    panels' (bit for bit), each chunk's largest of them and a bound at least each of its rows'
    own (bound_coefficients . max|x| a block), and head_argmax answers what argmax_by_bound
    answers with those logits and bounds, the exact values being the three-part panels'."""
    O, K, R = 5000, 96, 6
    q, p, head = _head(fmt, O, K, seed=11)
    rng = np.random.default_rng(12)
    x = rng.standard_normal((R, K)).astype(np.float32)
    w = q.dequantize()
    x[1] = (w[300] + w[301]) * 2                    # two rows close at the top
    amax = greedy_head._block_absmax(x)                                        # [R, nb]
    assert np.array_equal(amax, _block_max(x))
    L1, top, E = greedy_head._approx(x, head.qp, head.d, head.m, head.G_chunk, amax, head.V)
    assert np.array_equal(L1[:, :O], quant_panel.quant_linear_panels(x, p, 1))
    bound = amax.astype(np.float64) @ greedy_head.bound_coefficients(q).T.astype(np.float64)  # [R, O]
    n = greedy_head.CHUNK * quant_panel.ROWS                                   # rows a chunk
    for i in range(top.shape[1]):
        assert np.array_equal(top[:, i], L1[:, i * n:min((i + 1) * n, O)].max(axis=1))
        assert (E[:, i] >= bound[:, i * n:(i + 1) * n].max(axis=1) * (1 - 1e-6)).all()
    three = quant_panel.quant_linear_panels(x, p, 3)                           # [R, O]
    ids = greedy_head.head_argmax(x, head)[0]
    for t in range(R):
        assert ids[t] == greedy_head.argmax_by_bound(L1[t, :O].astype(np.float64), bound[t],
                                                     lambda v: three[t, v])


def _tiny(tmp_path, dtype):
    return synthetic.tiny_checkpoint(tmp_path, fmt="gguf", dtype=dtype, seed=3)


# the byte products on the vector unit at every row count, as on a CPU without AMX (where the
# tile unit takes them, the arg-max head stays below its row count)
VECTOR = KernelConfig(tile_unit_rows=(1 << 30,) * 4)


@pytest.mark.parametrize("dtype", ["Q4_1", "Q8_0"])
def test_forward_argmax_equals_the_argmax_of_forward(tmp_path, dtype):
    """The numba model: a verification-sized step (one sequence's 9 rows, and 12 sequences'
    last rows) gives the arg-max of forward()'s logits; below kernels.argmax_head_rows it
    declines (None: forward runs)."""
    from minfer.batch import make_batch
    llm = minfer.LLM(_tiny(tmp_path, dtype), backend="numba", kernels=VECTOR)
    eng = llm.engine
    model, cache, blocks = eng.model, eng.cache, eng.blocks
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(0, model.config.vocab_size, 60)]
    table = blocks.ensure(-9, 60)
    model.forward(make_batch([(ids[:40], 0, table)], cache.block_size), cache)
    step = make_batch([(ids[40:49], 40, table)], cache.block_size, logits_for=[9])
    assert (model.forward_argmax(step, cache) == np.argmax(model.forward(step, cache), axis=1)).all()
    tables = [blocks.ensure(-20 - s, 8) for s in range(12)]
    many = make_batch([(ids[s:s + 8], 0, t) for s, t in enumerate(tables)], cache.block_size)
    got = model.forward_argmax(many, cache)
    assert got is not None and (got == np.argmax(model.forward(many, cache), axis=1)).all()
    small = make_batch([(ids[40:43], 40, table)], cache.block_size, logits_for=[3])
    assert model.forward_argmax(small, cache) is None


def test_greedy_batches_and_guesses_take_it_and_keep_the_text(tmp_path, monkeypatch):
    """Ten greedy prompts at once, and n-gram guesses, on the numba backend: the same tokens as
    the NumPy model's, with the arg-max head used on the way."""
    path = _tiny(tmp_path, "Q4_1")
    calls = []
    found = greedy_head.head_argmax
    monkeypatch.setattr(greedy_head, "head_argmax", lambda h, head: calls.append(len(h)) or found(h, head))
    prompts = [f"the cat sat on the mat {i} and the cat sat on the" for i in range(10)]
    p = minfer.SamplingParams(temperature=0, max_tokens=24)
    want = [c.token_ids for c in minfer.LLM(path, backend="numpy").generate(prompts, p)]
    assert [c.token_ids for c in minfer.LLM(path, backend="numba", kernels=VECTOR).generate(prompts, p)] == want
    assert calls and max(calls) == 10
    calls.clear()
    kernels = KernelConfig(argmax_head_rows=2, tile_unit_rows=VECTOR.tile_unit_rows)  # (a few a step)
    spec = minfer.LLM(path, backend="numba", speculative="ngram", kernels=kernels)
    assert [c.token_ids for c in spec.generate(prompts[:2], p)] == want[:2]
    assert calls


@pytest.mark.model
def test_the_default_model_verifies_with_the_arg_max_head(default_model, monkeypatch):
    """SmolLM2-135M on numba: steps of 9 and 17 tokens of the edit workload's answer give
    forward()'s arg-max with a few hundred of the head's 49,152 rows computed in three parts."""
    from minfer.batch import make_batch
    from minfer.bench import SPEC_WORKLOADS
    llm = minfer.LLM(default_model, backend="numba", kernels=VECTOR)
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": SPEC_WORKLOADS["edit"]}])
    c = llm.generate([prompt], minfer.SamplingParams(temperature=0, max_tokens=40))[0]
    ids = list(c.prompt_token_ids) + list(c.token_ids)
    eng = llm.engine
    model, cache, blocks = eng.model, eng.cache, eng.blocks
    n0 = len(c.prompt_token_ids)
    table = blocks.ensure(-9, len(ids))
    model.forward(make_batch([(ids[:n0], 0, table)], cache.block_size), cache)
    calls = []
    found = greedy_head.head_argmax
    monkeypatch.setattr(greedy_head, "head_argmax", lambda h, head: calls.append(found(h, head)) or calls[-1])
    for n in (9, 17):
        step = make_batch([(ids[n0:n0 + n], n0, table)], cache.block_size, logits_for=[n])
        got = model.forward_argmax(step, cache)
        assert (got == np.argmax(model.forward(step, cache), axis=1)).all()
        assert calls[-1][2] < n * 2000 and calls[-1][3] == 0, calls[-1][2:]
