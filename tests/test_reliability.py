"""Bad models and bad input: each one a clean MinferError that says what and where, at a cost
proportional to what was read; never a traceback, a hang or silently wrong numbers."""
import importlib.util
import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import minfer
from minfer.errors import (FetchError, InvalidArgumentError, MinferError, ModelFormatError,
                           ModelNotFoundError, NonFiniteError, UnsupportedModelError, check_finite)
from minfer.sampling import SamplingParams
from minfer.tokenizer import Tokenizer
from minfer.weights import fetch, synthetic
from minfer.weights.load import load

_spec = importlib.util.spec_from_file_location("fuzz", Path(__file__).parent.parent / "tools" / "fuzz.py")
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)


# --- GGUF -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def q8(tmp_path_factory):
    """A tiny Q8_0 GGUF (norms F32), its bytes and where each header field sits."""
    d = tmp_path_factory.mktemp("q8")
    path = synthetic.tiny_checkpoint(d, fmt="gguf", seed=0, dtype="Q8_0", num_hidden_layers=1)
    data = path.read_bytes()
    return data, fuzz.gguf_fields(data)


def patched(tmp_path, data, edits=(), insert=None) -> Path:
    """A copy of data with (offset, struct format, value) edits, and optionally one metadata
    entry spliced in first (n_kv + 1)."""
    buf = bytearray(data)
    for pos, fmt, v in edits:
        struct.pack_into(fmt, buf, pos, v)
    if insert is not None:
        buf[24:24] = insert
        struct.pack_into("<Q", buf, 16, struct.unpack_from("<Q", buf, 16)[0] + 1)
    p = tmp_path / "bad.gguf"
    p.write_bytes(bytes(buf))
    return p


def value_at(f, key):
    return next((pos, fmt) for pos, fmt, k in f["values"] if k == key)


def tensor(f, name):
    return next(t for t in f["tensors"] if t[0] == name)


def refused(path, *words, error=ModelFormatError, seconds=10.0):
    t = time.perf_counter()
    with pytest.raises(error) as e:
        load(path, "auto")
    assert time.perf_counter() - t < seconds, "rejecting took too long"
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w.lower() in msg.lower(), msg
    return msg


def test_the_good_file_loads(q8, tmp_path):
    load(patched(tmp_path, q8[0]), "auto")


@pytest.mark.parametrize("kv,words", [
    (fuzz.gstr("x.a") + struct.pack("<IQ", 8, 2**64 - 1), ["string", "remain"]),
    (fuzz.gstr("x.a") + struct.pack("<IIQ", 9, 4, 2**40), ["array", "remain"]),
    (fuzz.gstr("x.a") + struct.pack("<IIQ", 9, 8, 2**40), ["strings", "remain"]),
    (fuzz.gstr("x.a") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 1999 + struct.pack("<IQ", 4, 0),
     ["nested"]),
    (fuzz.gstr("x.a") + struct.pack("<I", 77), ["unknown", "type"]),
    (fuzz.gstr("general.alignment") + struct.pack("<II", 4, 0), ["alignment", "power of two"]),
    (fuzz.gstr("general.alignment") + struct.pack("<II", 4, 48), ["alignment", "power of two"]),
    (fuzz.gstr("tokenizer.chat_template") + struct.pack("<Ii", 5, 7), ["appears twice"]),
])
def test_header_counts_are_checked_before_allocating(q8, tmp_path, kv, words):
    """A count of 2^40 or a length of 2^64-1 fails at once, without asking for the memory."""
    msg = refused(patched(tmp_path, q8[0], insert=kv), *words, seconds=5.0)   # not 20 s, not 1 GB
    assert "bad.gguf" in msg


def test_n_dims_and_dims(q8, tmp_path):
    data, f = q8
    name, type_pos, _, _, _ = tensor(f, "blk.0.attn_q.weight")
    # n_dims sits before the 2 dims: 4 + 8 + 8 bytes before the type
    refused(patched(tmp_path, data, [(type_pos - 20, "<I", 2**32 - 1)]), "dimensions")
    refused(patched(tmp_path, data, [(type_pos - 8, "<Q", 2**62)]), "attn_q", "truncated or corrupt")
    refused(patched(tmp_path, data, [(type_pos - 16, "<Q", 33)]), "attn_q", "multiple")


def test_offsets_misaligned_overlapping_or_outside(q8, tmp_path):
    data, f = q8
    name, _, off_pos, _, off = tensor(f, "blk.0.attn_k.weight")
    refused(patched(tmp_path, data, [(off_pos, "<Q", off + 1)]), "attn_k", "alignment")
    other = tensor(f, "blk.0.attn_q.weight")[4]
    refused(patched(tmp_path, data, [(off_pos, "<Q", other)]), "overlap")
    refused(patched(tmp_path, data, [(off_pos, "<Q", 2**63)]), "attn_k", "truncated or corrupt")


def test_type_relabelled(q8, tmp_path):
    data, f = q8
    name, type_pos, _, _, _ = tensor(f, "blk.0.attn_q.weight")
    refused(patched(tmp_path, data, [(type_pos, "<I", 77)]), "attn_q", "ggml type 77",
            error=UnsupportedModelError)
    refused(patched(tmp_path, data, [(type_pos, "<I", 12)]), "attn_q", "ggml type Q4_K",
            error=UnsupportedModelError)                   # a K-quant: named, not numbered
    # Q8_0 relabelled F32: its bytes now span 4x as far, into the next tensor
    refused(patched(tmp_path, data, [(type_pos, "<I", 0)]), "overlap")


@pytest.mark.parametrize("key,value,words", [
    ("llama.attention.head_count", 0, ["head_count", ">= 1"]),
    ("llama.attention.head_count_kv", 0, ["n_kv_heads", ">= 1"]),
    ("llama.attention.head_count_kv", 3, ["multiple"]),
    ("llama.block_count", 0, ["n_layers", ">= 1"]),
    ("llama.attention.layer_norm_rms_epsilon", float("nan"), ["layer_norm_rms_epsilon", "finite"]),
    ("llama.rope.freq_base", float("inf"), ["freq_base", "finite"]),
    ("llama.rope.freq_base", -1.0, ["freq_base", "> 0"]),
    ("llama.feed_forward_length", 2**32 - 1, ["shape"]),
    ("tokenizer.ggml.eos_token_id", 10**6, ["eos", "token id"]),
])
def test_hyperparameters_are_checked(q8, tmp_path, key, value, words):
    data, f = q8
    pos, fmt = value_at(f, key)
    error = UnsupportedModelError if "multiple" in words else ModelFormatError
    msg = refused(patched(tmp_path, data, [(pos, fmt, value)]), *words, error=error)
    assert "bad.gguf" in msg


def test_hyperparameters_of_the_wrong_type(q8, tmp_path):
    data, f = q8
    pos, fmt = value_at(f, "llama.block_count")        # u32: its type field is 4 bytes before
    refused(patched(tmp_path, data, [(pos - 4, "<I", 6)]), "block_count", "whole number")  # as f32


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scale_or_norm(q8, tmp_path, bad):
    data, f = q8
    _, _, _, _, off = tensor(f, "blk.0.attn_q.weight")
    half = 0x7E00 if math.isnan(bad) else 0x7C00          # float16 NaN / inf: the block's scale
    refused(patched(tmp_path, data, [(f["data_start"] + off, "<H", half)]), "blk.0.attn_q.weight",
            "scales")
    _, _, _, _, off = tensor(f, "blk.0.ffn_norm.weight")
    refused(patched(tmp_path, data, [(f["data_start"] + off + 8, "<f", bad)]), "blk.0.ffn_norm.weight")


def test_tokenizer_metadata(q8, tmp_path):
    data, f = q8
    # a token string with one byte changed so that it equals another token
    needle = fuzz.gstr("Ġt")
    i = data.index(needle) + 8
    buf = bytearray(data)
    buf[i:i + len("Ġt".encode())] = "ĠĠ".encode()[:len("Ġt".encode())]
    p = tmp_path / "tok.gguf"
    p.write_bytes(bytes(buf))
    with pytest.raises(ModelFormatError, match="twice|tokenizer"):
        load(p, "auto")


# --- Hugging Face folders -------------------------------------------------------------------------

@pytest.fixture()
def hf(tmp_path):
    return synthetic.tiny_checkpoint(tmp_path / "hf", fmt="hf", seed=0, num_hidden_layers=1)


def edit_json(path, fn):
    doc = json.loads(path.read_text())
    path.write_text(json.dumps(fn(doc)))


@pytest.mark.parametrize("fn,words,error", [
    (lambda c: [c], ["config.json", "list"], ModelFormatError),
    (lambda c: dict(c, hidden_size=None), ["hidden_size"], ModelFormatError),
    (lambda c: dict(c, hidden_size="64"), ["hidden_size", "whole number"], ModelFormatError),
    (lambda c: dict(c, rms_norm_eps=float("nan")), ["rms_norm_eps", "finite"], ModelFormatError),
    (lambda c: dict(c, rms_norm_eps=[1e-5]), ["rms_norm_eps"], ModelFormatError),
    (lambda c: dict(c, num_attention_heads=0), ["num_attention_heads", ">= 1"], ModelFormatError),
    (lambda c: dict(c, num_key_value_heads=3), ["multiple"], UnsupportedModelError),
    (lambda c: dict(c, num_hidden_layers=0), ["n_layers"], ModelFormatError),
    (lambda c: dict(c, rope_theta=float("inf")), ["rope_theta", "finite"], ModelFormatError),
    (lambda c: dict(c, rope_scaling={"rope_type": "llama3", "factor": 8.0}), ["llama3"],
     UnsupportedModelError),
    (lambda c: dict(c, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     ["yarn"], UnsupportedModelError),
    (lambda c: dict(c, sliding_window=4096), ["sliding_window"], UnsupportedModelError),
    (lambda c: dict(c, attention_bias=True), ["attention_bias"], UnsupportedModelError),
    (lambda c: dict(c, mlp_bias=True), ["mlp_bias"], UnsupportedModelError),
    (lambda c: dict(c, hidden_act="gelu"), ["hidden_act"], UnsupportedModelError),
    (lambda c: dict(c, rope_theta=1e4, rope_parameters={"rope_type": "default", "rope_theta": 1e5}),
     ["unclear"], ModelFormatError),
])
def test_config_json(hf, fn, words, error):
    edit_json(hf / "config.json", fn)
    msg = refused(hf, *words, error=error)
    assert "config.json" in msg or str(hf) in msg


def test_transformers5_rope_parameters_are_read(hf):
    edit_json(hf / "config.json", lambda c: dict(
        {k: v for k, v in c.items() if k not in ("rope_theta", "rope_scaling")},
        rope_parameters={"rope_type": "default", "rope_theta": 123456.0}))
    config, _, _ = load(hf, "auto")
    assert config.rope_theta == 123456.0


def _rewrite_header(path, fn):
    raw = path.read_bytes()
    (n,) = struct.unpack_from("<Q", raw)
    header = fn(json.loads(raw[8:8 + n]))
    hdr = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hdr)) + hdr + raw[8 + n:])


def _first(h):
    return next(k for k in h if k != "__metadata__")


@pytest.mark.parametrize("fn,words", [
    (lambda h: [h], ["not an object"]),
    (lambda h: {**h, _first(h): {k: v for k, v in h[_first(h)].items() if k != "dtype"}}, ["lacks dtype"]),
    (lambda h: {**h, _first(h): dict(h[_first(h)], data_offsets=h[_first(h)]["data_offsets"][::-1])},
     ["data_offsets"]),
    (lambda h: {**h, _first(h): dict(h[_first(h)], shape=[2**40, 2**40])}, ["needs"]),
    (lambda h: {**h, _first(h): dict(h[_first(h)], shape=[1.5])}, ["shape"]),
])
def test_safetensors_header(hf, fn, words):
    _rewrite_header(hf / "model.safetensors", fn)
    msg = refused(hf, *words)
    assert "model.safetensors" in msg


def test_safetensors_non_finite(hf):
    raw = bytearray((hf / "model.safetensors").read_bytes())
    (n,) = struct.unpack_from("<Q", raw)
    header = json.loads(raw[8:8 + n])
    begin = header["model.norm.weight"]["data_offsets"][0]
    struct.pack_into("<f", raw, 8 + n + begin, float("nan"))
    (hf / "model.safetensors").write_bytes(bytes(raw))
    refused(hf, "model.norm.weight", "NaN")


@pytest.mark.parametrize("doc,words", [
    ([1, 2], ["tokenizer_config.json", "list"]),
    ({"chat_template": 7}, ["chat_template"]),
    ("[" * 5000 + "]" * 5000, ["tokenizer_config.json"]),
])
def test_tokenizer_config(hf, doc, words):
    (hf / "tokenizer_config.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    refused(hf, *words)


# --- chat templates -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_hf_folder(synthetic.tiny_checkpoint(tmp_path_factory.mktemp("t"), fmt="hf"))


def render(tok, template, messages=None):
    tok.chat_template, tok._compiled = template, None
    try:
        return tok.apply_chat_template(messages or [{"role": "user", "content": "hi"}])
    finally:
        tok.chat_template, tok._compiled = synthetic.CHAT_TEMPLATE, None


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ range(10**9)|list }}",
    "{{ 'x' * 10**10 }}",
    "{{ 1/0 }}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{{ 'x'|center(10**9) }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ '%999999999d' % 1 }}",
    "{{ ''.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}",
    "{% for %}",
])
def test_hostile_templates_fail_cleanly_and_quickly(tok, template):
    t = time.perf_counter()
    try:
        out = render(tok, template)
        assert len(out) < 1 << 20
    except ModelFormatError as e:
        assert "\n" not in str(e)
    assert time.perf_counter() - t < 5.0            # the render budget is 2 s


def test_template_refusing_the_conversation_is_the_callers_error(tok):
    with pytest.raises(InvalidArgumentError, match="roles must alternate"):
        render(tok, "{{ raise_exception('roles must alternate') }}")


def test_chatml_renders_as_before(tok):
    out = render(tok, synthetic.CHAT_TEMPLATE, [{"role": "user", "content": "x" * 100000}])
    assert out.endswith("<|im_start|>assistant\n") and "x" * 100000 in out


@pytest.mark.parametrize("content", [None, 3, ["a"], {"text": "a"}])
def test_message_content_must_be_text(tok, content):
    with pytest.raises(InvalidArgumentError, match="content"):
        render(tok, synthetic.CHAT_TEMPLATE, [{"role": "user", "content": content}])


def test_message_content_text_parts_are_joined(tok):
    out = render(tok, synthetic.CHAT_TEMPLATE,
                 [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert "user\nab<|im_end|>" in out


# --- sampling parameters --------------------------------------------------------------------------

@pytest.mark.parametrize("kw,word", [
    (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"), (dict(stop=[""]), "stop"), (dict(stop=""), "stop"),
    (dict(stop=[3]), "stop"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(repetition_penalty=1e-300), "repetition_penalty"),
    (dict(repetition_penalty=1e300), "repetition_penalty"), (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=1.5), "top_k"), (dict(max_tokens=0), "max_tokens"), (dict(temperature="1"), "temperature"),
    (dict(ignore_eos="False"), "ignore_eos"), (dict(ignore_eos=None), "ignore_eos"),
])
def test_sampling_params_are_checked(kw, word):
    with pytest.raises(InvalidArgumentError, match=word):
        SamplingParams(**kw)


def test_sampling_params_stop_none_is_no_stop_strings():
    assert SamplingParams(stop=None).stop == []          # as vLLM and OpenAI's clients send it


@pytest.mark.parametrize("kw,word", [
    (dict(threads="2"), "threads"), (dict(threads=1.5), "threads"), (dict(threads=True), "threads"),
    (dict(kv_cache_mb="64"), "KV cache"), (dict(kv_cache_mb=None), "KV cache"),
    (dict(kv_cache_mb=float("inf")), "KV cache"), (dict(model=123), "model"), (dict(model=["a"]), "model"),
    (dict(kernels="x"), "kernels"), (dict(prefix_caching="no"), "prefix_caching"), (dict(model=""), "model path is empty"),
    (dict(max_seqs=True), "max_seqs"), (dict(max_batch_tokens=1), "a step holds a token of each"),
    (dict(speculative="ngram", num_speculative_tokens=True), "num_speculative_tokens"),
])
def test_llm_arguments_are_checked(tiny_gguf, kw, word):
    """A wrong type is minfer's one-sentence error, not a TypeError from deep inside."""
    kw = {"model": tiny_gguf, "backend": "numpy", **kw}
    with pytest.raises(InvalidArgumentError, match=word):
        minfer.LLM(**kw)


@pytest.mark.parametrize("prompt", [[[1.7, 2.2]], [["1", "2"]], [[True, False]], {"a": 1},
                                    np.array([1.0, 2.0])])
def test_prompts_are_strings_or_whole_token_ids(tiny_llm, prompt):
    with pytest.raises(InvalidArgumentError, match="prompt"):
        tiny_llm.generate(prompt, SamplingParams(max_tokens=2))


def test_stream_checks_at_the_call_and_stream_chat_as_chat(tiny_llm):
    with pytest.raises(InvalidArgumentError, match="empty"):
        tiny_llm.stream("")                       # not at the first piece
    with pytest.raises(InvalidArgumentError, match="messages is empty"):
        tiny_llm.stream_chat([])
    for bad in ([-1], ["a"], None, [10 ** 6], [1.0], [True]):
        with pytest.raises(InvalidArgumentError, match="token ids"):
            tiny_llm.tokenizer.decode(bad)


def test_tiny_temperature_is_greedy(tiny_llm):
    """1e-40 would overflow float32 logits into inf - inf = NaN; it is greedy instead."""
    p = SamplingParams(temperature=1e-40, max_tokens=8, seed=3)
    assert p.temperature == 0 and p.greedy
    greedy = tiny_llm.generate(["the cat"], SamplingParams(temperature=0, max_tokens=8))[0]
    assert tiny_llm.generate(["the cat"], p)[0].token_ids == greedy.token_ids


# --- non-finite values during a forward ------------------------------------------------------------

def test_check_finite():
    check_finite(np.zeros((2, 5), np.float32), "logits")
    check_finite(np.full(3, 1e300), "logits")                  # a sum that overflows is not NaN
    a = np.zeros((2, 5), np.float32)
    a[1, 3] = np.nan
    with pytest.raises(NonFiniteError, match="the logits produced 1 non-finite value"):
        check_finite(a, "logits")
    a[0, 0] = -np.inf
    with pytest.raises(MinferError, match="2 non-finite values"):
        check_finite(a, "logits")


# --- the cached default model ---------------------------------------------------------------------

@pytest.fixture()
def small_default(tmp_path, monkeypatch):
    """A stand-in default model (a few bytes) with its own size and sha256."""
    import hashlib
    body = b"pretend GGUF " * 100
    monkeypatch.setenv("MINFER_HOME", str(tmp_path))
    monkeypatch.setattr(fetch, "GGUF_SIZE", len(body))
    monkeypatch.setattr(fetch, "GGUF_SHA256", hashlib.sha256(body).hexdigest())
    dest = fetch.default_model_path()
    dest.parent.mkdir(parents=True)
    dest.write_bytes(body)
    fetched = []
    monkeypatch.setattr(fetch, "_fetch", lambda d, q, s: fetched.append(d) or d)
    return dest, body, fetched


def test_sha256_checked_once_then_on_change(small_default, monkeypatch):
    dest, body, fetched = small_default
    hashed = []
    real = fetch._sha256
    monkeypatch.setattr(fetch, "_sha256", lambda p: hashed.append(p) or real(p))
    assert fetch.ensure_default_model(quiet=True) == dest and len(hashed) == 1
    assert fetch.ensure_default_model(quiet=True) == dest and len(hashed) == 1   # the stamp holds
    # same size, one byte changed, new mtime: hashed again, found corrupt, fetched again
    dest.write_bytes(b"X" + body[1:])
    os.utime(dest, ns=(time.time_ns(), time.time_ns() + 10**9))
    fetch.ensure_default_model(quiet=True)
    assert len(hashed) == 2 and fetched == [dest]


def test_fetch_hashes_the_cached_copy_whatever_its_stamp(small_default):
    """A change that kept the size and the time (a disk error, a careful rewrite) passes the stamp;
    `python -m minfer fetch`, asked for by hand, hashes the file and fetches it again."""
    dest, body, fetched = small_default
    assert fetch.ensure_default_model(quiet=True) == dest            # checked and stamped
    st = dest.stat()
    dest.write_bytes(b"X" + body[1:])
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fetch.ensure_default_model(quiet=True) == dest and fetched == []   # the stamp believed
    fetch.ensure_default_model(quiet=True, check=True)
    assert fetched == [dest]


def test_fetch_into_odd_caches(tmp_path, monkeypatch):
    """A folder where the model's file belongs is named; a killed download's temporary folder is
    swept by the next download, once it is old (a young one may be another process's)."""
    monkeypatch.setenv("MINFER_HOME", str(tmp_path))
    dest = fetch.default_model_path()
    dest.mkdir(parents=True)
    with pytest.raises(FetchError, match="is a folder, where the default model's file belongs"):
        fetch.ensure_default_model(quiet=True)
    dest.rmdir()
    old, young = dest.parent / ".fetch-old", dest.parent / ".fetch-young"
    for d in (old, young):
        d.mkdir()
        (d / "x.part").write_bytes(b"0" * 10)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    fetch._sweep(dest.parent)
    assert not old.exists() and young.exists()


def test_model_cache_not_writable(tmp_path, monkeypatch):
    f = tmp_path / "a-file"
    f.write_text("")
    monkeypatch.setenv("MINFER_HOME", str(f))
    with pytest.raises(FetchError, match="MINFER_HOME"):
        fetch.ensure_default_model(quiet=True)
    monkeypatch.setenv("MINFER_HOME", str(tmp_path / "ro"))

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro"))
    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(FetchError, match="Permission denied"):
        fetch.ensure_default_model(quiet=True)


# --- the command line -----------------------------------------------------------------------------

def cli(*args, env=None, input=None):
    e = dict(os.environ, **(env or {}))
    r = subprocess.run([sys.executable, "-m", "minfer", *args], capture_output=True, env=e,
                       input=input, timeout=120)
    return r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")


def one_line_error(rc, err, *words):
    assert rc == 1 and "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("args,words", [
    (["--seed", "-1", "hi"], ["seed"]),
    (["--stop", "", "hi"], ["stop string"]),
    (["--system", b"\xff\xfe x", "hi"], ["--system", "UTF-8"]),
    ([b"caf\xe9"], ["prompt", "UTF-8", "0xe9"]),
])
def test_cli_bad_input(tiny_gguf, args, words):
    rc, _, err = cli("generate", "--model", str(tiny_gguf), "--backend", "numpy", "-n", "2", *args)
    one_line_error(rc, err, *words)


def test_cli_info_takes_model_flag(tiny_gguf):
    rc, out, err = cli("info", "--model", str(tiny_gguf))
    assert rc == 0 and "vocab_size" in out, err
    for args in (("",), ("--model", "")):          # not the default model in its place
        rc, _, err = cli("info", *args)
        one_line_error(rc, err, "model path is empty")


def test_cli_minfer_home_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    rc, _, err = cli("info", env={"MINFER_HOME": str(f)})
    one_line_error(rc, err, "MINFER_HOME")


def test_repl_rejects_an_overlong_message_and_keeps_the_conversation(tiny_gguf):
    """An over-long message is refused before anything else happens: the earlier turns stay
    (the next prompt still holds them), nothing is dropped."""
    long = " ".join(["word"] * 400)
    stdin = f"hello\n{long}\n/exit\n".encode()
    rc, out, err = cli("chat", "--model", str(tiny_gguf), "--backend", "numpy", "--max-context", "96",
                       "-n", "3", "--seed", "1", input=stdin)
    assert rc == 0, err
    assert "not sent (the conversation is kept)" in err
    assert "oldest turn dropped" not in err and "Traceback" not in err


def test_repl_non_utf8_line(tiny_gguf):
    rc, out, err = cli("chat", "--model", str(tiny_gguf), "--backend", "numpy", "-n", "2",
                       input=b"caf\xe9\nhello\n/exit\n", env={"PYTHONIOENCODING": "utf-8"})
    assert rc == 0 and "Traceback" not in err, err
    assert "not valid UTF-8" in err


# --- tensors the Llama block does not use -----------------------------------------------------------

def test_unused_tensors_are_refused(tmp_path):
    """A bias or a layer beyond the config's count describes another function: refused, not skipped."""
    config = synthetic.hf_config(num_hidden_layers=1)
    state = synthetic.random_state(config, 0)
    state["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    synthetic.write_hf_folder(tmp_path / "hf", config, state)
    refused(tmp_path / "hf", "q_proj.bias", error=UnsupportedModelError)
    two = synthetic.random_state(synthetic.hf_config(num_hidden_layers=2), 0)
    path = synthetic.write_gguf(tmp_path / "extra.gguf", config, two)
    refused(path, "blk.1.", error=UnsupportedModelError)


def test_hf_vocab_padded_past_the_tokenizer(tmp_path):
    """Checkpoints often pad the embedding past the tokenizer (to a multiple of 64): no text makes
    those ids, so the LM head's rows for them are dropped at load — never sampled (they were, and
    decoding the id then failed mid-answer)."""
    from safetensors.numpy import save_file  # noqa: F401 (the writer's dependency)
    config = synthetic.hf_config()
    state = synthetic.random_state(config, seed=3)
    plain = synthetic.write_hf_folder(tmp_path / "plain", config, state)
    V, D = state["model.embed_tokens.weight"].shape
    padded = dict(state)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):    # rows the head would pick
        padded[name] = np.concatenate([state[name], np.full((64, D), 5.0, np.float32)])
    folder = synthetic.write_hf_folder(tmp_path / "padded", dict(config, vocab_size=V + 64), padded)
    (folder / "tokenizer.json").write_text((plain / "tokenizer.json").read_text(encoding="utf-8"),
                                           encoding="utf-8")
    a, b = minfer.LLM(plain, backend="numpy"), minfer.LLM(folder, backend="numpy")
    assert b.config.vocab_size == V
    ids = a.tokenizer.encode("the cat sat")
    np.testing.assert_array_equal(b.logits(ids), a.logits(ids))
    out = b.generate("the cat", SamplingParams(temperature=1.5, seed=0, max_tokens=20, ignore_eos=True))[0]
    assert len(out.token_ids) == 20 and max(out.token_ids) < V
    small = synthetic.write_hf_folder(tmp_path / "small", dict(config, vocab_size=V + 64), padded)
    (small / "config.json").write_text(json.dumps(dict(config, vocab_size=V - 1)))
    with pytest.raises(ModelFormatError, match=f"tokenizer has {V + 64} tokens but the model only {V - 1}"):
        load(small)


def test_hf_untied_without_lm_head_is_refused(tmp_path):
    """tie_word_embeddings: false and no lm_head.weight: the head is missing (transformers fills it
    with random numbers), not the embedding."""
    config = synthetic.hf_config()
    state = {k: v for k, v in synthetic.random_state(config).items() if k != "lm_head.weight"}
    folder = synthetic.write_hf_folder(tmp_path / "nohead", config, state)
    with pytest.raises(ModelFormatError, match="lacks tensor 'lm_head.weight'.*tie_word_embeddings: false"):
        load(folder)
    del config["tie_word_embeddings"]                  # not said: tied, as the file has no head
    folder = synthetic.write_hf_folder(tmp_path / "unsaid", config, state)
    assert load(folder)[0].tie_embeddings


def test_unreadable_weights_are_not_called_corrupt(tiny_gguf, tmp_path, monkeypatch):
    """Permission denied on the weights file: "cannot be read (Permission denied)", not "corrupt"
    (root reads any file, so the open is made to fail)."""
    import builtins
    real_open = builtins.open

    def denied(f, *a, **k):
        if str(f).endswith((".gguf", ".safetensors")):
            raise PermissionError(13, "Permission denied", str(f))
        return real_open(f, *a, **k)
    hf = synthetic.tiny_checkpoint(tmp_path / "hf")
    monkeypatch.setattr(builtins, "open", denied)
    for path in (tiny_gguf, hf):
        with pytest.raises(MinferError, match="cannot be read \\(Permission denied\\)"):
            load(path)


def test_cli_environment_and_output_failures_are_one_line(tiny_gguf):
    """NUMBA_NUM_THREADS=0 (numba's own ValueError traceback) and a full disk under stdout
    (an OSError traceback) are one line each, exit 1."""
    rc, _, err = cli("info", "--model", str(tiny_gguf), env={"NUMBA_NUM_THREADS": "0"})
    one_line_error(rc, err, "NUMBA_NUM_THREADS is '0'")
    if os.path.exists("/dev/full"):
        r = subprocess.run([sys.executable, "-m", "minfer", "info", "--model", str(tiny_gguf)],
                           stdout=open("/dev/full", "w"), stderr=subprocess.PIPE, text=True, timeout=120)
        one_line_error(r.returncode, r.stderr, "No space left")


def test_cli_generate_says_when_the_context_filled(tiny_gguf):
    """An answer cut by the context (not by --max-tokens) says so; a UTF-8 BOM on standard input
    is no part of the prompt (3 extra tokens); one token has no decode speed."""
    rc, _, err = cli("generate", "--model", str(tiny_gguf), "--backend", "numpy", "--raw",
                     "--max-context", "16", "-n", "100", "--temperature", "1", "--seed", "1", "the cat")
    assert rc == 0 and "the context is full" in err.splitlines()[-1], err
    plain = cli("generate", "--model", str(tiny_gguf), "--backend", "numpy", "--raw", "-n", "1", "-",
                input="the cat".encode())
    bom = cli("generate", "--model", str(tiny_gguf), "--backend", "numpy", "--raw", "-n", "1", "-",
              input=b"\xef\xbb\xbfthe cat")
    assert plain[2].splitlines()[-1].split(",")[0] == bom[2].splitlines()[-1].split(",")[0], (plain, bom)
    assert "decode" not in bom[2].splitlines()[-1] and "context is full" not in bom[2]


def test_a_file_of_an_hf_folder_names_the_folder(tmp_path):
    hf = synthetic.tiny_checkpoint(tmp_path / "hf")
    for f in ("model.safetensors", "config.json"):
        with pytest.raises(ModelNotFoundError, match=f"one file of a Hugging Face folder; pass the folder: {hf}"):
            load(hf / f)


def test_a_missing_shard_is_named(tmp_path):
    """A sharded folder whose index lists a file that is not there: the file is named (it was
    "the checkpoint lacks tensor ...")."""
    hf = synthetic.tiny_checkpoint(tmp_path / "hf")
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.norm.weight": "model.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelNotFoundError, match="lacks model-00002-of-00002.safetensors"):
        load(hf)


def test_an_hf_folder_without_name_is_named_by_its_folder(tmp_path):
    """The name picks chat's recommended sampling: "model" (no _name_or_path) matched nothing."""
    hf = synthetic.tiny_checkpoint(tmp_path / "SmolLM2-135M-Instruct")
    cfg = json.loads((hf / "config.json").read_text())
    cfg.pop("_name_or_path", None)
    (hf / "config.json").write_text(json.dumps(cfg))
    assert load(hf)[0].name == "SmolLM2-135M-Instruct"
    snap = tmp_path / "models--HuggingFaceTB--SmolLM2-360M-Instruct" / "snapshots" / "0123abc"
    snap.parent.mkdir(parents=True)
    hf.rename(snap)
    assert load(snap)[0].name == "SmolLM2-360M-Instruct"


def test_a_model_without_chat_template_is_said(tmp_path):
    """Without a template of its own the messages are laid out as ChatML, which the model may not
    know: chat and generate say so (generate --raw uses no template: nothing to say)."""
    hf = synthetic.tiny_checkpoint(tmp_path / "hf")
    tc = json.loads((hf / "tokenizer_config.json").read_text())
    del tc["chat_template"]
    (hf / "tokenizer_config.json").write_text(json.dumps(tc))
    args = ("generate", "--model", str(hf), "--backend", "numpy", "-n", "1")
    rc, _, err = cli(*args, "hi")
    assert rc == 0 and "no chat template" in err, err
    rc, _, err = cli(*args, "--raw", "hi")
    assert rc == 0 and "chat template" not in err, err
    rc, _, err = cli("generate", "--model", str(synthetic.tiny_checkpoint(tmp_path / "own")),
                     "--backend", "numpy", "-n", "1", "hi")
    assert rc == 0 and "chat template" not in err, err
