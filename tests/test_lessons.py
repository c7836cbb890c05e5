"""Every lesson runs as a plain script, as a student runs it: `python lessons/NN_name.py`.

Each runs in a fresh temporary folder with matplotlib's Agg backend, and must exit 0 and save the
figures it announces. Lessons on the real model use the `default_model` fixture first, so a model
that cannot be fetched fails these tests loudly (they never skip).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "lessons").glob("[0-9][0-9]_*.py"))


def _site_hook():
    """docs/hooks/lessons.py, the site's reader of the percent format (imported by path)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("minfer_docs_hook", ROOT / "docs" / "hooks" / "lessons.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_lessons_00_to_11():
    numbers = [int(p.name[:2]) for p in LESSONS]
    assert numbers[:12] == list(range(12)), [p.name for p in LESSONS]


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.parametrize("lesson", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs_as_a_script(lesson, tmp_path, default_model):
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    env.pop("MINFER_FIGURES", None)
    r = subprocess.run([sys.executable, str(lesson)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"{lesson.name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    saved = re.findall(r"^\[figure saved: (.*)\]$", r.stdout, re.M)
    for path in saved:
        assert (tmp_path / path).stat().st_size > 1000, path
    if "show(fig" in lesson.read_text():
        assert saved, f"{lesson.name} draws a figure but none was saved"


@pytest.mark.parametrize("lesson", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_is_a_notebook(lesson):
    """jupytext reads the same cells as the site does, and the lesson opens with its title."""
    import jupytext
    nb = jupytext.read(lesson)
    ours = _site_hook().parse_cells(lesson.read_text())
    theirs = [c for c in nb.cells if c.source.strip()]
    assert [c["kind"] for c in ours] == [c.cell_type for c in theirs]
    assert ours[0]["kind"] == "markdown" and ours[0]["source"].startswith(f"# {lesson.name[:2]} ·")


def test_every_lesson_with_exercises_has_a_page_that_names_them():
    """`lesson start N` exists exactly for the lessons whose page ends with `lesson start N`."""
    from minfer.classroom import lessons
    for lesson in LESSONS:
        n = int(lesson.name[:2])
        named = re.search(rf"lesson start {n}\b", lesson.read_text()) is not None
        assert named == (n in lessons()), lesson.name


def test_lessons_reference_real_modules():
    """Each stage lesson imports the module it teaches (the lessons follow the code)."""
    expect = {"03": "minfer.stages.rmsnorm", "04": "minfer.stages.rope", "05": "minfer.stages.attention",
              "06": "minfer.stages.kvcache", "07": "minfer.stages.mlp", "08": "minfer.sampling",
              "09": "minfer.stages.rmsnorm", "10": "minfer.stages.quant",
              "11": "minfer.gpu.linear", "12": "minfer.engine.prefix_cache"}
    for lesson in LESSONS:
        if lesson.name[:2] in expect:
            assert f"from {expect[lesson.name[:2]]} import" in lesson.read_text(), lesson.name


def test_the_gpu_lesson_runs_its_kernels_on_the_simulator_without_a_gpu():
    """Lesson 11 picks numba's CUDA simulator itself, before numba is first imported (numba
    chooses at import): a machine without a GPU runs it as is. Its first code cell says so."""
    text = (ROOT / "lessons" / "11_gpu.py").read_text()
    cells = _site_hook().parse_cells(text)
    first_code = next(c["source"] for c in cells if c["kind"] == "code")
    setting = first_code.index('os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")')
    assert "numba" not in first_code[:setting] and "minfer" not in first_code[:setting]
