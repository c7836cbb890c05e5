"""The classroom: exercises for the lessons, checked against minfer's own reference.

Each lesson from 00 to 14 comes with tasks: functions whose bodies are left for the student, with
the same names and signatures as minfer's reference (lessons 00-02: small ones, the model's size,
BPE by hand, a tensor out of a GGUF; lesson 09: a Numba kernel; lesson 10: one block format at a
time; lesson 11: a numba.cuda kernel; lesson 12: the prefix cache's block names; lesson 13: the speculative sampling rule; lesson 14, the capstone: the layer loop and the
prefill/decode loop, on the student's own stages). The command line
drives it:

    python -m minfer lesson list                    # lessons and their tasks
    python -m minfer lesson start 5 [--dir DIR]     # copy lesson05_attention.py into DIR
    python -m minfer lesson check 5 [--dir DIR]     # run the lesson's tests on DIR's code

(DIR defaults to ./minfer-exercises. Lesson 11's check launches GPU kernels: without a GPU,
`check 11` runs itself again under numba's CUDA simulator, NUMBA_ENABLE_CUDASIM=1.) A check (tasks.py) compares the student's function with the reference
on random inputs of several shapes, odd sizes included, and on a failure says what differs and
gives a hint. `student_ops` then plugs the finished functions into a backend's op table, so that
`python -m minfer chat --use-mine` runs the real model on the student's own attention.

The lessons also use two small helpers from here: `show` saves a matplotlib figure (and displays
it in a notebook) and `figures_dir` says where figures go.

    __init__.py   running checks, student_ops, the `lesson` command, lesson helpers
    tasks.py      each lesson's tasks and their checks against the reference
    stubs.py      the exercise files that `start` writes
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np

from .tasks import (CheckFailed, ExerciseError, Lesson, Task, _attention_case, _randn, _rng,
                    cuda_ready, expect_close, get_lesson, lessons, reference_functions)

DEFAULT_DIR = "minfer-exercises"


# =============================================================================================
# Helpers for the lesson scripts
# =============================================================================================

def figures_dir() -> Path:
    """Where lessons save their figures: $MINFER_FIGURES, else ./figures."""
    d = Path(os.environ.get("MINFER_FIGURES") or "figures")
    d.mkdir(parents=True, exist_ok=True)
    return d


def clock(f, *args, budget=0.05, most=200):
    """(median seconds of f(*args), seconds of the first call), for the lessons' timings. The first
    call is kept apart: for a Numba kernel it includes compiling it. Then as many calls as fit in
    `budget` (3 to `most`)."""
    import time
    t0 = time.perf_counter()
    f(*args)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    f(*args)
    n = int(min(most, max(3, budget / max(time.perf_counter() - t0, 1e-7))))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f(*args)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), first


def show(fig, name: str) -> Path:
    """Save a matplotlib figure as figures/<name>.png; in a notebook, also display it."""
    path = figures_dir() / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    if "ipykernel" in sys.modules:                       # running as a notebook: show it inline
        from IPython.display import display
        display(fig)
    import matplotlib.pyplot as plt
    plt.close(fig)
    print(f"[figure saved: {path}]")
    return path


# =============================================================================================
# Running the checks
# =============================================================================================

@dataclass
class Result:
    task: str
    status: str          # "pass" | "fail" | "todo"
    message: str = ""
    hint: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "pass"


def check_functions(lesson: Lesson | int, functions) -> list[Result]:
    """Run a lesson's tasks on `functions` (a module, namespace or dict: task name -> function)."""
    lesson = lesson if isinstance(lesson, Lesson) else get_lesson(lesson)
    get = functions.get if isinstance(functions, dict) else (lambda k: getattr(functions, k, None))
    results = []
    for task in lesson.tasks:
        f = get(task.name)
        if not callable(f):
            results.append(Result(task.name, "fail", f"no function named {task.name} in your file", task.hint))
            continue
        try:
            with np.errstate(all="ignore"):
                task.check(f)
            results.append(Result(task.name, "pass"))
        except NotImplementedError:
            results.append(Result(task.name, "todo", "not done yet (it still raises NotImplementedError)"))
        except CheckFailed as e:
            results.append(Result(task.name, "fail", str(e), task.hint))
        except Exception as e:                                    # the student's code crashed
            tb = traceback.extract_tb(e.__traceback__)
            skip = (str(Path(__file__).parent), str(Path(np.__file__).parent))   # ours and numpy's
            theirs = [fr for fr in tb if not fr.filename.startswith(skip)]
            where = f" (line {theirs[-1].lineno}: {theirs[-1].line})" if theirs else ""
            results.append(Result(task.name, "fail", f"it raised {type(e).__name__}: {e}{where}", task.hint))
    return results


def load_student_module(path: Path) -> ModuleType:
    """Import a student's exercise file by path (a fresh module each time)."""
    name = f"minfer_student_{path.stem}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        line = f" at line {e.lineno}" if isinstance(e, SyntaxError) else ""
        raise ExerciseError(f"{path} cannot be imported{line}: {type(e).__name__}: {e}") from None
    return module


def exercise_path(lesson: Lesson, folder) -> Path:
    return Path(folder or DEFAULT_DIR) / lesson.filename


def format_results(lesson: Lesson, results: list[Result], source: str) -> str:
    lines = [f"lesson {lesson.number:02d} — {lesson.title} ({source})"]
    for r in results:
        tag = {"pass": "PASS", "fail": "FAIL", "todo": "TODO"}[r.status]
        lines.append(f"  {tag}  {r.task}" + (f": {r.message}" if r.message else ""))
        if r.status == "fail" and r.hint:
            lines.append(textwrap.fill(r.hint, 96, initial_indent="        hint: ",
                                       subsequent_indent="              "))
    n_pass = sum(r.passed for r in results)
    lines.append(f"{n_pass} of {len(results)} tasks pass." +
                 (" Well done!" if n_pass == len(results) else ""))
    return "\n".join(lines)


# =============================================================================================
# Plugging the student's functions into the engine
# =============================================================================================

def _probe_args(name: str):
    """Small valid inputs for one op (fresh arrays each call)."""
    rng = _rng(99)
    if name == "embedding":
        return (np.array([1, 2]), _randn(rng, 5, 8))
    if name == "rmsnorm":
        return (_randn(rng, 2, 8), _randn(rng, 8), 1e-5)
    if name == "rope_angles":
        return (np.array([0, 1]), 8, 10000.0)
    if name == "rope":
        return (_randn(rng, 2, 2, 8), np.ones((2, 4), np.float32), np.zeros((2, 4), np.float32))
    if name == "attention":
        q, kc, vc, batch = _attention_case(rng, 2, 1, 8, 4, [(2, 0)], 2)
        return (q, kc, vc, batch)
    if name == "kv_write":
        return (np.zeros((2, 4, 1, 8), np.float32), np.zeros((2, 4, 1, 8), np.float32),
                _randn(rng, 2, 1, 8), _randn(rng, 2, 1, 8), np.array([0, 5]))
    if name == "linear":
        return (_randn(rng, 2, 8), _randn(rng, 12, 8))
    if name == "swiglu":
        return (_randn(rng, 2, 8), _randn(rng, 12, 8), _randn(rng, 12, 8), _randn(rng, 8, 12))
    raise KeyError(name)


STAGES = ("embedding", "rmsnorm", "rope_angles", "rope", "attention", "linear", "swiglu")


def _check_command(n: int | None, folder: Path) -> str:
    """The command that checks lesson n's file in `folder` (any lesson's, n None), as one types it."""
    where = "" if folder == Path(DEFAULT_DIR) else f" --dir {shlex.quote(str(folder))}"
    return f"`python -m minfer lesson check {'N' if n is None else n}{where}`"


def _finite_or_say(op: str, f, whose: str, state: dict, check: str):
    """`f` with its outputs checked: NaN or Inf stops the model at the stage that made it, with a
    sentence that names it (instead of a crash somewhere later, in sampling or in softmax).
    check: the command that checks the function (the last one of the student's to run, for
    minfer's own stages)."""
    def stage(*args):
        with np.errstate(all="ignore"):              # said below, in a sentence, if it matters
            out = f(*args)
        for a in (out if isinstance(out, tuple) else (out,)):
            if isinstance(a, np.ndarray) and a.dtype.kind == "f" and not np.isfinite(a).all():
                bad = "NaN" if np.isnan(a).any() else "Inf"
                n = int((~np.isfinite(a)).sum())
                if whose == "minfer's":
                    by, by_check = state.get("last", (None, None))
                    raise ExerciseError(
                        f"minfer's {op} gave {bad} ({n} of {a.size} values) in the live model, from "
                        f"what your functions gave it ({by or 'none of yours had run yet'} ran last)"
                        + (f"; {by_check} checks it" if by else ""))
                inputs_ok = all(np.isfinite(x).all() for x in args
                                if isinstance(x, np.ndarray) and x.dtype.kind == "f")
                raise ExerciseError(
                    f"{whose} ({op} in the model) returned {bad} in the live model ({n} of "
                    f"{a.size} values of a {list(a.shape)} output, "
                    f"{'from finite inputs' if inputs_ok else 'its inputs held NaN/Inf already'}); "
                    f"{check} shows what differs")
        if whose != "minfer's":
            state["last"] = (whose.removeprefix("your "), check)
        return out
    stage.__wrapped__ = f
    return stage


def _first_failure(task: Task, f) -> Result | None:
    """The lesson's own check of one function (what `lesson check` runs): None if it passes."""
    import dataclasses
    lesson = next(L for L in lessons().values() if task in L.tasks)
    r = check_functions(dataclasses.replace(lesson, tasks=[task]), {task.name: f})[0]
    return None if r.passed else r


def student_ops(base_ops: SimpleNamespace, folder=None, log=None, anyway: bool = False) -> SimpleNamespace:
    """A copy of the op table `base_ops` (backends.get_ops) with the student's functions from
    `folder` (default ./minfer-exercises) swapped in — those that no longer raise
    NotImplementedError on a small probe. Each is first checked as `lesson check` checks it: one
    that differs from the reference stops here with what differs (ExerciseError), unless
    `anyway`. With any of the student's functions in, every stage's output is checked for NaN
    and Inf as the model runs. The result's `.mine` lists the swapped ops; with lesson 14 done,
    `.run_layers` is the student's layer loop (student_model runs it).
    Messages go to `log` (default: stderr)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    folder = Path(folder or DEFAULT_DIR)
    if not folder.is_dir():
        raise ExerciseError(f"no exercise folder at {folder}; start one with "
                            f"`python -m minfer lesson start 3` (or pass the folder you used)")
    ops = SimpleNamespace(**vars(base_ops))
    mine, mine_names, mine_lessons, wrong, layer_loop = [], {}, {}, [], None
    for lesson in lessons().values():
        path = exercise_path(lesson, folder)
        if not path.exists():
            continue
        module = load_student_module(path)
        for task in lesson.tasks:
            f = getattr(module, task.name, None)
            if task.op is None or not callable(f):
                continue
            if task.op != "run_layers":              # (the capstone's loop: its check alone)
                try:
                    with np.errstate(all="ignore"):
                        got = f(*_probe_args(task.op))
                except NotImplementedError:
                    continue
                except Exception as e:
                    raise ExerciseError(f"your {task.name} ({path}) raised {type(e).__name__}: {e} "
                                        f"on a small input; run {_check_command(lesson.number, folder)}")
                want = getattr(base_ops, task.op)(*_probe_args(task.op))
                if np.shape(got) != np.shape(want):
                    raise ExerciseError(f"your {task.name} ({path}) returned shape {np.shape(got)} "
                                        f"where {np.shape(want)} was expected; run "
                                        f"{_check_command(lesson.number, folder)}")
            failed = _first_failure(task, f)
            if failed is not None and failed.status == "todo":
                continue
            if failed is not None:
                wrong.append((lesson, task, failed))
                log(f"minfer: your {task.name} ({path}) differs from the reference: {failed.message}")
                if failed.hint:
                    log(textwrap.fill(failed.hint, 96, initial_indent="        hint: ",
                                      subsequent_indent="              "))
            if task.op == "run_layers":
                layer_loop = f
            else:
                setattr(ops, task.op, f)
            if task.op in mine:                      # (lesson 09's rmsnorm_numba after 03's rmsnorm:
                mine.remove(task.op)                 # the later lesson's runs)
            mine.append(task.op)
            mine_names[task.op] = task.name
            mine_lessons[task.op] = lesson.number
    if wrong and not anyway:
        names = ", ".join(t.name for _, t, _ in wrong)
        checks = " and ".join(_check_command(n, folder) for n in sorted({L.number for L, _, _ in wrong}))
        raise ExerciseError(f"your {names} {'does' if len(wrong) == 1 else 'do'} not match the "
                            f"reference (above): fix {'it' if len(wrong) == 1 else 'them'} with "
                            f"{checks}, or add --anyway to see what the model does with "
                            f"{'it' if len(wrong) == 1 else 'them'}")
    if wrong:
        log(f"minfer: --anyway: running on {', '.join(t.name for _, t, _ in wrong)} as it is")
    ops.mine = mine
    if mine:
        state = {}
        for op in STAGES:
            f = getattr(ops, op, None)
            if callable(f):
                whose = f"your {mine_names[op]}" if op in mine_names else "minfer's"
                setattr(ops, op, _finite_or_say(op, f, whose, state,
                                                _check_command(mine_lessons.get(op), folder)))
        if layer_loop is not None:    # the capstone: the model's layers run in the student's loop
            ops.run_layers = layer_loop
    ops.name = f"{getattr(base_ops, 'name', 'ops')}+mine" if mine else getattr(base_ops, "name", "ops")
    if mine:
        named = [op if mine_names[op] == op else f"{op} ({mine_names[op]})" for op in mine]
        log(f"minfer: running on your own {', '.join(named)} (from {folder}/); "
            f"everything else is minfer's {getattr(base_ops, 'name', '')} path")
    else:
        log(f"minfer: no finished exercises in {folder}/ yet; running minfer's own code")
    return ops


def student_model(ops: SimpleNamespace):
    """For LLM(make_model=...): (config, weights) -> model.py's Transformer on `ops` (student_ops),
    the specification's loop running the student's functions — in the student's own layer loop
    when lesson 14 is done."""
    from ..model import Transformer

    class StudentLayers(Transformer):
        def run_layers(self, x, cos, sin, batch, cache):
            return ops.run_layers(x, cos, sin, batch, cache, self.weights, self.config, self.ops)

    model_class = StudentLayers if callable(getattr(ops, "run_layers", None)) else Transformer
    return lambda config, weights: model_class(config, weights, ops)


# =============================================================================================
# Command line: python -m minfer lesson list | start N | check N
# =============================================================================================

def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `lesson` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "lesson", help="exercises: list | start N | check N",
        description="Exercises for lessons 00-14: `start N` copies the lesson's stub functions into "
                    "your folder, `check N` tests your functions against minfer's reference.")
    sub = p.add_subparsers(dest="lesson_command", metavar="ACTION")
    sub.add_parser("list", help="the lessons with exercises and their tasks")
    for name, help_ in [("start", "copy lesson N's exercise file into your folder"),
                        ("check", "run lesson N's tests on your functions")]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("n", metavar="N", help="the lesson number, e.g. 5")
        s.add_argument("--dir", default=DEFAULT_DIR, metavar="DIR",
                       help="your exercise folder (default: %(default)s)")
        if name == "start":
            s.add_argument("--force", action="store_true", help="overwrite an existing file")
    return p


def _check_under_simulator(lesson: Lesson, folder) -> int:
    """Run `lesson check N` again in a child process with numba's CUDA simulator switched on (it
    is chosen when numba.cuda is first imported, so this process cannot switch it on)."""
    print(f"minfer: no CUDA GPU here; checking lesson {lesson.number:02d} under numba's CUDA "
          f"simulator (NUMBA_ENABLE_CUDASIM=1): slow, but exact", file=sys.stderr, flush=True)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    return subprocess.call([sys.executable, "-m", "minfer", "lesson", "check", str(lesson.number),
                            "--dir", str(folder)], env=env)


def run(args) -> int:
    """Carry out `lesson ...`; return the exit code (non-zero when a check fails)."""
    cmd = getattr(args, "lesson_command", None)
    if cmd in (None, "list"):
        folder = Path(getattr(args, "dir", None) or DEFAULT_DIR)
        w = max(len(L.title) for L in lessons().values()) + 1     # the titles' column
        print(f"lesson  {'title':<{w}} tasks")
        for L in lessons().values():
            started = " (started)" if exercise_path(L, folder).exists() else ""
            print(f"  {L.number:02d}    {L.title:<{w}} {', '.join(t.name for t in L.tasks)}{started}")
        print(f"\nStart one with `python -m minfer lesson start N`; your files go to ./{DEFAULT_DIR}/.")
        return 0
    lesson = get_lesson(args.n)
    path = exercise_path(lesson, args.dir)
    if cmd == "start":
        if path.exists() and not args.force:
            raise ExerciseError(f"{path} already exists (your work!); check it with `python -m minfer "
                                f"lesson check {lesson.number}`, or add --force to start over")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(lesson.stub)
        n = len(lesson.tasks)
        print(f"wrote {path} with {n} task{'s' if n != 1 else ''}: "
              f"{', '.join(t.name for t in lesson.tasks)}")
        print(f"fill in the bodies, then run: python -m minfer lesson check {lesson.number}"
              + (f" --dir {args.dir}" if args.dir != DEFAULT_DIR else ""))
        return 0
    if cmd == "check":
        if not path.exists():
            raise ExerciseError(f"{path} does not exist; create it with `python -m minfer lesson start "
                                f"{lesson.number}`" + (f" --dir {args.dir}" if args.dir != DEFAULT_DIR else ""))
        if lesson.needs_cuda and not cuda_ready():
            return _check_under_simulator(lesson, args.dir)
        results = check_functions(lesson, load_student_module(path))
        print(format_results(lesson, results, str(path)))
        return 0 if all(r.passed for r in results) else 1
    raise ExerciseError(f"unknown lesson action {cmd!r}; use list, start or check")


__all__ = ["add_parser", "run", "student_ops", "check_functions", "lessons", "get_lesson",
           "reference_functions", "exercise_path", "load_student_module", "show", "figures_dir",
           "expect_close", "cuda_ready", "ExerciseError", "CheckFailed", "Lesson", "Task"]
