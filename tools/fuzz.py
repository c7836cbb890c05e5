"""A seeded mutation fuzzer for everything minfer reads from a model: GGUF files, safetensors
headers, config.json, tokenizer_config.json and chat templates.

Each mutant starts from a tiny synthetic checkpoint (minfer.weights.synthetic), gets one to three
mutations (a header count or length set to 0 or 2^64-1, a tensor offset moved, a type relabelled,
a scale set to NaN, a JSON value replaced by null / NaN / a list / a deep nest, a hostile chat
template, ...), and is loaded in a forked child under a memory cap (RLIMIT_AS) and a time limit:
the child loads the model, renders a conversation with its chat template and tokenizes it.
Outcomes:

    ok         loaded (the mutation was harmless, or in bytes nothing reads)
    error      a clean MinferError: one line for the user
    traceback  any other exception, or the child died of a signal: a bug
    hang       the child ran past the time limit: a bug
    blowup     a MemoryError anywhere, or the child's peak memory grew past the limit: a bug

    python tools/fuzz.py --count 5000              # the long run (docs/reliability.md)
    python tools/fuzz.py --count 300 --seed 7      # what tests/test_fuzz.py runs
    python tools/fuzz.py --only 1234 --seed 7 -v   # replay one mutant, show its outcome
    python tools/fuzz.py --count 5000 --save DIR   # keep every buggy mutant (files + traceback)

Mutant i of seed s is the same on every run (its own random.Random((s, i))), so a failure is
replayed with --only.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")   # the children are forked
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OUTCOMES = ("ok", "error", "traceback", "hang", "blowup")
BUGS = ("traceback", "hang", "blowup")
KINDS = ("gguf", "safetensors", "config", "tokenizer_config", "template")

TIME_LIMIT = 10.0            # seconds per mutant (chat templates stop themselves after 2)
MEMORY_LIMIT = 512 << 20     # bytes a child may map beyond what it inherited
RSS_LIMIT = 256 << 20        # peak resident growth that counts as a blow-up

U64 = [0, 1, 2, 3, 7, 31, 32, 33, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62,
       2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]
U32 = [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 12, 13, 14, 30, 31, 255, 2**31, 2**32 - 1]
F32 = [float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e-45, 3.4e38, 1e30]

# --------------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------------


def make_seeds(folder: Path) -> dict:
    """The tiny checkpoints every mutant starts from: GGUF files of three tensor types and one
    HF folder, with their bytes and (for GGUF) the offsets of every header field."""
    from minfer.weights import synthetic
    seeds = {"gguf": []}
    for dtype, emb in (("F32", None), ("Q8_0", None), ("Q4_1", "Q8_0")):
        config = synthetic.hf_config(num_hidden_layers=1, hidden_size=64, intermediate_size=64)
        path = synthetic.write_gguf(folder / f"seed-{dtype}.gguf", config,
                                    synthetic.random_state(config, 0), dtype=dtype, embedding_dtype=emb)
        data = path.read_bytes()
        seeds["gguf"].append((data, gguf_fields(data)))
    hf = synthetic.tiny_checkpoint(folder / "hf", fmt="hf", seed=0, num_hidden_layers=1)
    seeds["hf"] = {p.name: p.read_bytes() for p in hf.iterdir()}
    return seeds


def gguf_fields(data: bytes) -> dict:
    """Walk a (valid) GGUF header and note where each field is: {"counts": [(offset, size)],
    "types": [...], "values": [(offset, struct format, key)], "tensors": [(name, type offset,
    data offset, ggml type)], "data_start": int}. Written separately from minfer's reader."""
    pos = 4 + 4
    f = {"counts": [(pos, 8), (pos + 8, 8)], "types": [], "values": [], "tensors": []}
    n_tensors, n_kv = struct.unpack_from("<QQ", data, pos)
    pos += 16
    scal = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}

    def string(pos):
        f["counts"].append((pos, 8))
        (n,) = struct.unpack_from("<Q", data, pos)
        return pos + 8 + n, data[pos + 8:pos + 8 + n].decode()

    align = 32
    for _ in range(n_kv):
        pos, key = string(pos)
        f["types"].append((pos, 4))
        (vt,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if vt in scal:
            f["values"].append((pos, scal[vt], key))
            if key == "general.alignment":
                (align,) = struct.unpack_from(scal[vt], data, pos)
            pos += struct.calcsize(scal[vt])
        elif vt == 8:
            pos, _ = string(pos)
        else:
            f["types"].append((pos, 4))
            it, count = struct.unpack_from("<IQ", data, pos)
            f["counts"].append((pos + 4, 8))
            pos += 12
            for _ in range(count):
                if it == 8:
                    if len(f["counts"]) < 2000:
                        pos, _ = string(pos)
                    else:
                        (n,) = struct.unpack_from("<Q", data, pos)
                        pos += 8 + n
                else:
                    pos += struct.calcsize(scal[it])
    for _ in range(n_tensors):
        pos, name = string(pos)
        f["counts"].append((pos, 4))                       # n_dims (u32)
        (nd,) = struct.unpack_from("<I", data, pos)
        pos += 4
        for _ in range(nd):
            f["counts"].append((pos, 8))
            pos += 8
        (tt,) = struct.unpack_from("<I", data, pos)
        (off,) = struct.unpack_from("<Q", data, pos + 4)
        f["tensors"].append((name, pos, pos + 4, tt, off))
        pos += 12
    f["header_end"] = pos
    f["data_start"] = (pos + align - 1) // align * align
    return f


# --------------------------------------------------------------------------------------------------
# Mutations
# --------------------------------------------------------------------------------------------------

def put(buf: bytearray, pos: int, fmt: str, v) -> None:
    if pos + struct.calcsize(fmt) <= len(buf):
        struct.pack_into(fmt, buf, pos, v)


def mutate_gguf(rng: random.Random, data: bytes, f: dict) -> tuple[bytes, str]:
    buf, did = bytearray(data), []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.choice(("count", "count", "type", "value", "value", "tensor_type", "tensor_offset",
                         "dims", "nonfinite", "flip", "truncate", "insert_kv", "insert_kv"))
        if op == "count":
            pos, size = rng.choice(f["counts"])
            v = rng.choice(U32 if size == 4 else U64)
            put(buf, pos, "<I" if size == 4 else "<Q", v % (1 << (8 * size)))
            did.append(f"count@{pos}={v}")
        elif op == "type":
            pos, _ = rng.choice(f["types"])
            v = rng.choice(U32)
            put(buf, pos, "<I", v)
            did.append(f"type@{pos}={v}")
        elif op == "value":
            pos, fmt, key = rng.choice(f["values"])
            if fmt in ("<f", "<d"):
                v = rng.choice(F32)
            elif fmt == "<?":
                v = rng.choice((True, False))
            else:
                lim = 1 << (8 * struct.calcsize(fmt))
                v = rng.choice([0, 1, 2, 3, 5, 64, 1000, lim - 1, lim // 2 - 1]) % lim
                if fmt[1].islower() and v >= lim // 2:
                    v -= lim
            put(buf, pos, fmt, v)
            did.append(f"{key}={v}")
        elif op == "tensor_type":
            name, tpos, _, _, _ = rng.choice(f["tensors"])
            v = rng.choice((0, 1, 2, 3, 8, 30, 6, 99))
            put(buf, tpos, "<I", v)
            did.append(f"{name}.type={v}")
        elif op == "tensor_offset":
            name, _, opos, _, off = rng.choice(f["tensors"])
            other = rng.choice(f["tensors"])[4]
            v = rng.choice((off + 1, off + 16, off - 32, other, 0, len(data), 2**63, 2**64 - 32,
                            off + rng.randrange(1, 4096)))
            put(buf, opos, "<Q", v % 2**64)
            did.append(f"{name}.offset={v}")
        elif op == "dims":
            name, tpos, _, _, _ = rng.choice(f["tensors"])
            # the dims sit just before the type: overwrite the last one
            v = rng.choice((0, 1, 33, 2**32, 2**62, 2**64 - 1))
            put(buf, tpos - 8, "<Q", v)
            did.append(f"{name}.dim={v}")
        elif op == "nonfinite":
            name, _, _, tt, off = rng.choice(f["tensors"])
            pos = f["data_start"] + off
            bad = rng.choice(("nan", "inf"))
            if tt == 0:     # F32: the first value
                put(buf, pos, "<f", float(bad))
            else:           # a block type: its first scale (float16 at the block's start)
                put(buf, pos, "<H", 0x7E00 if bad == "nan" else 0x7C00)
            did.append(f"{name}[0]={bad}")
        elif op == "flip":
            end = min(f["header_end"] if rng.random() < 0.8 else len(buf), len(buf))
            for _ in range(rng.randrange(1, 4) if end else 0):
                p = rng.randrange(0, end)
                buf[p] ^= 1 << rng.randrange(8)
            did.append("flip")
        elif op == "truncate":
            n = rng.randrange(0, max(len(buf), 1))
            del buf[n:]
            did.append(f"truncate={n}")
        elif op == "insert_kv":
            kv, what = hostile_kv(rng)
            p = 24
            (n_kv,) = struct.unpack_from("<Q", buf, 16) if len(buf) >= 24 else (0,)
            buf[p:p] = kv
            put(buf, 16, "<Q", (n_kv + 1) % 2**64)
            did.append(f"insert {what}")
    return bytes(buf), " ".join(did)


def gstr(s: bytes | str) -> bytes:
    s = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(s)) + s


def hostile_kv(rng: random.Random) -> tuple[bytes, str]:
    """One extra metadata entry (spliced in first, so later duplicates of real keys are refused
    or ignored by the reader)."""
    choice = rng.randrange(9)
    key = rng.choice(("x.fuzz", "general.alignment", "llama.attention.head_count",
                      "tokenizer.chat_template", "llama.rope.freq_base", "llama.block_count"))
    if choice == 0:                 # arrays nested 2,000 deep
        depth = rng.choice((5, 100, 2000))
        body = b"".join(struct.pack("<IQ", 9, 1) for _ in range(depth - 1)) + struct.pack("<IQ", 4, 0)
        return gstr(key) + struct.pack("<I", 9) + body, f"{key}=array nested {depth}"
    if choice == 1:                 # a string of 2^64-1 bytes
        return gstr(key) + struct.pack("<IQ", 8, 2**64 - 1), f"{key}=string len 2^64-1"
    if choice == 2:                 # an array of 2^40 numbers
        it = rng.choice((0, 4, 6, 7, 10))
        return gstr(key) + struct.pack("<IIQ", 9, it, 2**40), f"{key}=array[2^40] of type {it}"
    if choice == 3:                 # an array of 2^40 strings
        return gstr(key) + struct.pack("<IIQ", 9, 8, 2**40), f"{key}=2^40 strings"
    if choice == 4:                 # a key of 2^63 bytes
        return struct.pack("<Q", 2**63), "key len 2^63"
    if choice == 5:                 # alignment 0 / 3 / huge, or as a string
        v = rng.choice((0, 3, 48, 2**31))
        return gstr("general.alignment") + struct.pack("<II", 4, v), f"alignment={v}"
    if choice == 6:                 # a chat template stored as an int
        return gstr("tokenizer.chat_template") + struct.pack("<Ii", 5, 7), "chat_template=int"
    if choice == 7:                 # an unknown value type
        return gstr(key) + struct.pack("<I", rng.choice((13, 99, 2**32 - 1))), "unknown type"
    v = rng.choice(F32)
    return gstr(key) + struct.pack("<If", 6, v), f"{key}=f32 {v}"


JSON_VALUES = [None, True, False, 0, -1, 1, 3, 2**31, 2**64, -(2**63), 1e308, -1e308, 1e-320,
               float("nan"), float("inf"), "", "x", "llama3", [], {}, [1, 2], {"a": 1}, 1.5, "1e5",
               [None], [[["deep"]]]]

# settings that change the function: each must be refused (or implemented), never skipped
FUNCTION_KEYS = [
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    ("rope_scaling", {"type": "linear", "factor": 2.0}),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 100000.0}),
    ("rope_parameters", {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    ("sliding_window", 4096), ("attention_bias", True), ("mlp_bias", True),
    ("hidden_act", "gelu"), ("partial_rotary_factor", 0.5), ("layer_types", ["sliding_attention"]),
]


def mutate_json(rng: random.Random, doc, keys_to_add=()) -> tuple[str, str]:
    """A JSON text: doc with one value replaced, deleted, added or nested deep, or the whole
    document replaced."""
    r = rng.random()
    if r < 0.06:
        return rng.choice(("[]", "[1, 2]", "null", "3", '"text"', "{", "", "\ufeff{}",
                           "[" * 5000 + "]" * 5000)), "whole document"
    if r < 0.10:
        return json.dumps(doc)[: rng.randrange(1, 200)], "truncated"
    doc = json.loads(json.dumps(doc))
    if keys_to_add and r < 0.25:
        k, v = rng.choice(keys_to_add)
        doc[k] = v
        return json.dumps(doc), f"{k}={json.dumps(v)[:60]}"
    # pick a path: a top-level key, sometimes one level down
    parent = doc
    key = rng.choice(list(parent))
    if isinstance(parent[key], dict) and parent[key] and rng.random() < 0.4:
        parent = parent[key]
        key = rng.choice(list(parent))
    op = rng.random()
    if op < 0.15:
        del parent[key]
        what = f"del {key}"
    elif op < 0.25:
        nest = "[" * 3000 + "1" + "]" * 3000
        parent[key] = "@@NEST@@"
        return json.dumps(doc).replace('"@@NEST@@"', nest), f"{key}=nested 3000"
    else:
        v = rng.choice(JSON_VALUES)
        parent[key] = v
        what = f"{key}={json.dumps(v)[:40]}"
    return json.dumps(doc), what


HOSTILE_TEMPLATES = [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ range(10**9)|list }}",
    "{{ 'x' * 10**10 }}",
    "{{ 1/0 }}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% set ns = namespace(s=[1]) %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
    "{{ 'x'|center(10**9) }}",
    "{{ 'x'.ljust(10**9) }}",
    "{{ '%999999999d' % 1 }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ 10**10**7 }}",
    "{{ (('x'*1000000)|list)|join('yyyyyyyy') }}",
    "{% for i in 'x'*1000000 %}{% for j in 'x'*1000000 %}{% endfor %}{% endfor %}",
    "{{ messages.__class__.__mro__ }}",
    "{{ ''.__class__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ raise_exception('roles must alternate') }}",
    "{{ messages[0]['content'].foo.bar }}",
    "{% for m in messages %}{{ m.content + 1 }}{% endfor %}",
    "{{ messages|tojson(indent=10**9) }}",
    "{{ 'a'|indent(10**9) }}",
    "{{ 'a b'|wordwrap(1) * 999999 }}",
    "{% if %}",
    "{{ x(",
    "{% for m in messages %}{{ loop(messages) }}{% endfor %}",
    "{% for m in messages recursive %}{{ loop([m]) }}{% endfor %}",
    "{{ (1, 2) * 10**8 }}",
    "{{ [0] * 10**6 * 10**6 }}",
    "{{ lipsum(10**6) }}",
    "{{ range(99999)|map('string')|join * 99 }}",
]


def mutate_template(rng: random.Random, base: str) -> tuple[str, str]:
    if rng.random() < 0.6:
        t = rng.choice(HOSTILE_TEMPLATES)
        return t, t[:50]
    pieces = list(base)
    for _ in range(rng.randrange(1, 4)):
        p = rng.randrange(len(pieces) + 1)
        pieces.insert(p, rng.choice(["{%", "%}", "{{", "}}", "{#", " for ", " endfor ", "(", ")",
                                     "[", "]", "'", "|", "~", "**", "*99999", "range(", "loop",
                                     rng.choice(HOSTILE_TEMPLATES)]))
    return "".join(pieces), "edited ChatML"


def make_mutant(seeds: dict, kind: str, rng: random.Random, folder: Path) -> tuple[Path, str, str | None]:
    """Write mutant files into folder; return (model path, description, chat template or None)."""
    if kind == "gguf":
        data, fields = rng.choice(seeds["gguf"])
        mutated, what = mutate_gguf(rng, data, fields)
        path = folder / "m.gguf"
        path.write_bytes(mutated)
        return path, what, None
    files = dict(seeds["hf"])
    template = None
    if kind == "safetensors":
        raw = files["model.safetensors"]
        (n,) = struct.unpack_from("<Q", raw)
        header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
        r = rng.random()
        if r < 0.15:
            new = bytearray(raw)
            put(new, 0, "<Q", rng.choice(U64))
            files["model.safetensors"], what = bytes(new), "header length"
        elif r < 0.25:
            cut = rng.randrange(0, len(raw))
            files["model.safetensors"], what = raw[:cut], f"truncate={cut}"
        else:
            name = rng.choice([k for k in header if k != "__metadata__"])
            info = header[name]
            op = rng.randrange(8)
            if op == 0:
                info["data_offsets"] = info["data_offsets"][::-1]
                what = f"{name} offsets reversed"
            elif op == 1:
                del info[rng.choice(("dtype", "shape", "data_offsets"))]
                what = f"{name} lost a field"
            elif op == 2:
                info["dtype"] = rng.choice(("F64", "I8", "BF16", "F16", None, 3, "F32"))
                what = f"{name} dtype={info['dtype']}"
            elif op == 3:
                info["shape"] = rng.choice(([], [0], [-1, 64], [2**40, 2**40], [1] * 100, "64", [1.5]))
                what = f"{name} shape={info['shape']}"
            elif op == 4:
                b, e = info["data_offsets"]
                info["data_offsets"] = rng.choice(([b + 1, e + 1], [0, e - b], [b, 2**64], [-8, e],
                                                   [b, e + 4], [b + 2, e]))
                what = f"{name} offsets={info['data_offsets']}"
            elif op == 5:
                header = rng.choice(([1, 2], "x", None, {name: [1, 2]}))
                what = "header replaced"
            elif op == 6:
                text, what = mutate_json(rng, header)
                header = None
                hdr = text.encode()
                files["model.safetensors"] = struct.pack("<Q", len(hdr)) + hdr + body
            else:
                # a non-finite value in a tensor
                b, _ = info["data_offsets"]
                new = bytearray(raw)
                put(new, 8 + n + b, "<f", rng.choice((float("nan"), float("inf"))))
                files["model.safetensors"], what = bytes(new), f"{name}[0] non-finite"
                header = None
            if header is not None:
                hdr = json.dumps(header).encode()
                files["model.safetensors"] = struct.pack("<Q", len(hdr)) + hdr + body
    elif kind == "config":
        cfg = json.loads(files["config.json"])
        text, what = mutate_json(rng, cfg, FUNCTION_KEYS)
        files["config.json"] = text.encode()
    elif kind == "tokenizer_config":
        tc = json.loads(files["tokenizer_config.json"])
        if rng.random() < 0.3:
            tc["chat_template"] = rng.choice((7, None, [], [{"name": "default"}], {"x": 1},
                                              [{"name": "default", "template": 5}], True))
            text, what = json.dumps(tc), f"chat_template={tc['chat_template']!r}"
        else:
            text, what = mutate_json(rng, tc)
        files["tokenizer_config.json"] = text.encode()
    elif kind == "template":
        from minfer.weights import synthetic
        template, what = mutate_template(rng, synthetic.CHAT_TEMPLATE)
    else:
        raise ValueError(kind)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder, what, template


# --------------------------------------------------------------------------------------------------
# Running one mutant in a child
# --------------------------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "2 + 2?"}]


def _target(path: Path, template: str | None) -> None:
    """What a user's first call does with a model: load it, render a chat, tokenize it."""
    from minfer.weights.load import load
    config, weights, tok = load(path, "auto")
    if template is not None:
        tok.chat_template, tok._compiled = template, None
    text = tok.apply_chat_template(MESSAGES)
    ids = tok.encode(text)
    tok.decode(ids)


def _memory_error_in(e: BaseException) -> bool:
    seen = 0
    while e is not None and seen < 20:
        if isinstance(e, MemoryError):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def run_child(target, args, time_limit: float = TIME_LIMIT) -> tuple[str, str]:
    """Run target(*args) in a forked child with a memory cap and a time limit -> (outcome,
    detail)."""
    from minfer.errors import MinferError
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                                      # the child
        os.close(r)
        code, msg = 0, ""
        try:
            with open("/proc/self/statm") as f:
                vm = int(f.read().split()[0]) * resource.getpagesize()
            resource.setrlimit(resource.RLIMIT_AS, (vm + MEMORY_LIMIT, vm + MEMORY_LIMIT))
            target(*args)
        except MinferError as e:
            code, msg = (5, traceback.format_exc()) if _memory_error_in(e) else (3, str(e))
        except MemoryError:
            code, msg = 5, traceback.format_exc()
        except BaseException:                                         # noqa: BLE001
            code, msg = 4, traceback.format_exc()
        try:
            os.write(w, msg.encode("utf-8", "replace")[-8000:])
        finally:
            os._exit(code)
    os.close(w)
    deadline = time.monotonic() + time_limit
    chunks, status, usage = [], None, None
    os.set_blocking(r, False)
    while True:
        try:
            chunk = os.read(r, 65536)
            if chunk:
                chunks.append(chunk)
        except BlockingIOError:
            pass
        wpid, st, ru = os.wait4(pid, os.WNOHANG)
        if wpid:
            status, usage = st, ru
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            return "hang", f"still running after {time_limit:g} s"
        time.sleep(0.002)
    try:
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    os.close(r)
    detail = b"".join(chunks).decode("utf-8", "replace")
    if os.WIFSIGNALED(status):
        return "traceback", f"died of signal {os.WTERMSIG(status)}"
    code = os.WEXITSTATUS(status)
    if usage.ru_maxrss * 1024 > _baseline_rss() + RSS_LIMIT:
        return "blowup", f"peak memory {usage.ru_maxrss / 1024:.0f} MB; " + detail
    return {0: "ok", 3: "error", 4: "traceback", 5: "blowup"}.get(code, "traceback"), detail


_BASE = []


def _baseline_rss() -> int:
    """Peak resident bytes of a child that does nothing (what it shares with this process)."""
    if not _BASE:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        _, _, ru = os.wait4(pid, 0)
        _BASE.append(ru.ru_maxrss * 1024)
    return _BASE[0]


# --------------------------------------------------------------------------------------------------
# The campaign
# --------------------------------------------------------------------------------------------------

def fuzz(count: int, seed: int = 0, kinds=KINDS, only: int | None = None, save: Path | None = None,
         verbose: bool = False, time_limit: float = TIME_LIMIT) -> dict:
    """Run `count` mutants (or just mutant `only`) -> {"counts": {kind: {outcome: n}},
    "bugs": [(i, kind, outcome, what, detail)], "seconds": s}."""
    import minfer.weights.load  # noqa: F401  (imported once, before the forks)
    t0 = time.monotonic()
    counts = {k: Counter() for k in kinds}
    bugs = []
    with tempfile.TemporaryDirectory(prefix="minfer-fuzz-") as tmp:
        tmp = Path(tmp)
        seeds = make_seeds(tmp / "seeds")
        indices = [only] if only is not None else range(count)
        for i in indices:
            rng = random.Random(seed * 1_000_003 + i)
            kind = kinds[i % len(kinds)]
            folder = tmp / f"m{i}"
            folder.mkdir()
            path, what, template = make_mutant(seeds, kind, rng, folder)
            outcome, detail = run_child(_target, (path, template), time_limit)
            counts[kind][outcome] += 1
            if verbose:
                line = detail.strip().splitlines()[-1] if detail.strip() else ""
                print(f"#{i} {kind:<16} {outcome:<9} {what[:70]}  | {line[:150]}")
            if outcome in BUGS:
                bugs.append((i, kind, outcome, what, detail))
                if save is not None:
                    dest = save / f"{kind}-{i}-{outcome}"
                    shutil.copytree(folder, dest, dirs_exist_ok=True)
                    (dest / "outcome.txt").write_text(f"{what}\n{template or ''}\n\n{detail}\n")
            shutil.rmtree(folder, ignore_errors=True)
    return {"counts": {k: dict(v) for k, v in counts.items()}, "bugs": bugs,
            "seconds": time.monotonic() - t0}


def report(result: dict) -> str:
    lines = [f"{'kind':<18}" + "".join(f"{o:>11}" for o in OUTCOMES)]
    total = Counter()
    for kind, c in result["counts"].items():
        total.update(c)
        lines.append(f"{kind:<18}" + "".join(f"{c.get(o, 0):>11}" for o in OUTCOMES))
    lines.append(f"{'all':<18}" + "".join(f"{total.get(o, 0):>11}" for o in OUTCOMES))
    lines.append(f"{sum(total.values())} mutants in {result['seconds']:.1f} s")
    for i, kind, outcome, what, detail in result["bugs"][:20]:
        last = detail.strip().splitlines()[-1] if detail.strip() else ""
        lines.append(f"BUG #{i} {kind} {outcome}: {what[:80]} -> {last[:200]}")
    return "\n".join(lines)


def _raise_format_error():
    from minfer.errors import ModelFormatError
    raise ModelFormatError("a clean error")


def _allocate():
    return bytearray(4 * MEMORY_LIMIT)


def self_test() -> dict:
    """The classifier on known targets, so a fuzzer that cannot see a bug is noticed."""
    return {
        "ok": run_child(int, ())[0],
        "error": run_child(_raise_format_error, ())[0],
        "traceback": run_child(divmod, (1, 0))[0],
        "hang": run_child(time.sleep, (30,), time_limit=0.5)[0],
        "blowup": run_child(_allocate, ())[0],
        "signal": run_child(os.abort, ())[0],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=500, help="mutants to run (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated: {','.join(KINDS)}")
    ap.add_argument("--only", type=int, default=None, help="run mutant N alone")
    ap.add_argument("--save", type=Path, default=None, help="copy buggy mutants into this folder")
    ap.add_argument("--json", action="store_true", help="print the counts as JSON")
    ap.add_argument("--time-limit", type=float, default=TIME_LIMIT)
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--self-test", action="store_true",
                    help="classify six known targets (ok, error, traceback, hang, blowup, signal)")
    a = ap.parse_args(argv)
    if a.self_test:
        print(json.dumps(self_test()))
        return 0
    kinds = tuple(k for k in a.kinds.split(",") if k)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        ap.error(f"unknown kinds: {', '.join(sorted(unknown))}")
    if a.save:
        a.save.mkdir(parents=True, exist_ok=True)
    res = fuzz(a.count, a.seed, kinds, a.only, a.save, a.verbose, a.time_limit)
    if a.json:
        print(json.dumps({"counts": res["counts"], "seconds": round(res["seconds"], 1),
                          "bugs": [b[:4] + (b[4][-2000:],) for b in res["bugs"]]}))
    else:
        print(report(res))
    return 1 if res["bugs"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
