"""mkdocs hooks for the minfer site.

1. Lessons: every lessons/NN_*.py (jupytext percent format) is executed cell by cell, in its own
   process, and rendered as the page lessons/NN_*.md: markdown cells as text, code cells as code
   followed by what they printed and the figures they saved. Nothing is written into docs/; the
   pages are generated files. A lesson that raises fails the build. Results are cached by the hash
   of the lesson and of minfer's sources ($MINFER_LESSON_CACHE, default $MINFER_HOME/lesson-cache
   or ~/.cache/minfer/lesson-cache); set MINFER_LESSON_CACHE=off to always execute.
2. Math: pymdownx.arithmatex marks $...$ and $$...$$; here they become MathML, which browsers
   render natively. No JavaScript and no CDN, so the site works offline.
3. The CLI reference: `<!-- cli-help -->` in a page becomes the --help of every command.
4. Code from the package: `<!-- source minfer.stages.rmsnorm:rmsnorm,rmsnorm_numba -->` becomes
   those functions' source (read with `ast`, decorators included), so pages quote the code as it is.
   A name that is not found fails a strict build.

The execution half also runs on its own (what the build calls, once per lesson):

    python docs/hooks/lessons.py lessons/05_attention.py OUT_DIR     # -> OUT_DIR/cells.json, figures
"""
from __future__ import annotations

import contextlib
import hashlib
import html
import io
import json
import os
import re
import subprocess
import sys
import textwrap
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CELL = re.compile(r"^# %%(.*)$")


# ---------------------------------------------------------------------------------------------
# Reading a percent-format file
# ---------------------------------------------------------------------------------------------

def parse_cells(text: str) -> list[dict]:
    """-> [{"kind": "markdown" | "code", "source": str, "line": first line number}]"""
    cells, kind, lines, start = [], None, [], 1
    for i, line in enumerate(text.splitlines(), 1):
        m = CELL.match(line)
        if m:
            if kind is not None:
                cells.append({"kind": kind, "source": "\n".join(lines), "line": start})
            kind = "markdown" if "[markdown]" in m.group(1) else "code"
            lines, start = [], i + 1
            continue
        if kind is None:                                   # a header before the first cell
            if line.strip():
                kind, start = "code", i
            else:
                continue
        lines.append(line)
    if kind is not None:
        cells.append({"kind": kind, "source": "\n".join(lines), "line": start})
    for c in cells:
        if c["kind"] == "markdown":
            c["source"] = "\n".join(re.sub(r"^# ?", "", ln) if ln.startswith("#") else ln
                                    for ln in c["source"].splitlines())
        c["source"] = c["source"].strip("\n")
    return [c for c in cells if c["source"].strip()]


# ---------------------------------------------------------------------------------------------
# Executing a lesson (in a child process)
# ---------------------------------------------------------------------------------------------

def execute(path: Path, out_dir: Path) -> list[dict]:
    """Run the lesson's code cells in one namespace, recording each cell's printed output and the
    figures it saved into $MINFER_FIGURES (= out_dir/figures)."""
    figs = out_dir / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    os.environ["MINFER_FIGURES"] = str(figs)
    os.environ.setdefault("MPLBACKEND", "Agg")
    cells = parse_cells(path.read_text())
    ns = {"__name__": "__main__", "__file__": str(path.resolve())}
    sys.path.insert(0, str(path.parent.resolve()))
    for cell in cells:
        if cell["kind"] != "code":
            continue
        before = set(figs.iterdir())
        buf = io.StringIO()
        t0 = time.perf_counter()
        code = compile("\n" * (cell["line"] - 1) + cell["source"], str(path), "exec")
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                exec(code, ns)
            except BaseException:
                sys.__stderr__.write(buf.getvalue())
                traceback.print_exc(file=sys.__stderr__)
                raise SystemExit(1)
        cell["seconds"] = round(time.perf_counter() - t0, 2)
        cell["output"] = buf.getvalue()
        cell["figures"] = sorted(p.name for p in set(figs.iterdir()) - before)
    (out_dir / "cells.json").write_text(json.dumps(cells, indent=1))
    return cells


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

FIGURE_LINE = re.compile(r"^\[figure saved: .*\]\n?", re.M)


def _fence(text: str, lang: str) -> str:
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}{lang}\n{text}\n{ticks}"


def render(stem: str, cells: list[dict]) -> str:
    out = []
    for i, c in enumerate(cells):
        if c["kind"] == "markdown":
            text = c["source"]
            if i == 0:                                      # after the title: where this page comes from
                title, _, rest = text.partition("\n") if text.startswith("# ") else ("", "", text)
                note = (f'!!! info "Run it yourself"\n'
                        f"    This page is `lessons/{stem}.py`, executed. Run it with "
                        f"`python lessons/{stem}.py`, or open it as a notebook "
                        f"(`jupytext --to notebook lessons/{stem}.py`).")
                text = "\n\n".join(t for t in (title, note, rest.strip("\n")) if t)
            out.append(text)
            continue
        out.append(_fence(c["source"], "python"))
        text = FIGURE_LINE.sub("", c.get("output", "")).rstrip()
        if text:
            out.append('<div class="lesson-output" markdown>\n\n' + _fence(text, "text") + "\n\n</div>")
        for f in c.get("figures", []):
            src = f"figures/{stem}/{f}"                     # a link to itself: tap for full size
            out.append(f'<figure class="lesson-figure" markdown>\n[![{f}]({src})]({src})\n</figure>')
    return "\n\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# The build: execute (cached, two at a time), then hand the pages to mkdocs
# ---------------------------------------------------------------------------------------------

def _cache_dir() -> Path | None:
    v = os.environ.get("MINFER_LESSON_CACHE")
    if v == "off":
        return None
    if v:
        return Path(v)
    home = os.environ.get("MINFER_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "minfer") / "lesson-cache"


def _key(lesson: Path, root: Path) -> str:
    h = hashlib.sha256(lesson.read_bytes())
    h.update(Path(__file__).read_bytes())
    for p in sorted((root / "minfer").rglob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:20]


def run_lesson(lesson: Path, root: Path) -> tuple[list[dict], Path, float]:
    cache = _cache_dir()
    out = (cache / f"{lesson.stem}-{_key(lesson, root)}") if cache else None
    if out is not None and (out / "cells.json").exists():
        return json.loads((out / "cells.json").read_text()), out / "figures", 0.0
    if out is None:
        import tempfile
        out = Path(tempfile.mkdtemp(prefix=f"lesson-{lesson.stem}-"))
    tmp = out.with_name(out.name + ".part")
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, str(lesson), str(tmp)], cwd=tmp, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        from mkdocs.exceptions import PluginError
        raise PluginError(f"lesson {lesson.name} failed:\n{proc.stderr[-4000:]}")
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)
    return json.loads((out / "cells.json").read_text()), out / "figures", time.perf_counter() - t0


def on_files(files, config):
    from mkdocs.structure.files import File
    root = Path(config.config_file_path).parent
    lessons = sorted((root / "lessons").glob("[0-9][0-9]_*.py"))
    log = __import__("logging").getLogger("mkdocs.hooks.lessons")
    t0 = time.perf_counter()
    # A lesson that times something (time.perf_counter) runs alone, after the others: two lessons
    # at once on a small machine would time each other, and the page would print that.
    timed = [p for p in lessons if "perf_counter" in p.read_text()]
    rest = [p for p in lessons if p not in timed]
    with ThreadPoolExecutor(max_workers=max(1, min(len(rest), os.cpu_count() or 1, 4))) as pool:
        done = dict(zip(rest, pool.map(lambda p: run_lesson(p, root), rest)))
    done.update((p, run_lesson(p, root)) for p in timed)
    results = [done[p] for p in lessons]
    for lesson, (cells, figs, secs) in zip(lessons, results):
        stem = lesson.stem
        log.info(f"lesson {stem}: " + (f"executed in {secs:.1f} s" if secs else "from the cache"))
        files.append(File.generated(config, f"lessons/{stem}.md", content=render(stem, cells)))
        for fig in sorted(figs.glob("*.png")):
            files.append(File.generated(config, f"lessons/figures/{stem}/{fig.name}",
                                        content=fig.read_bytes()))
    log.info(f"lessons ready in {time.perf_counter() - t0:.1f} s")
    return files


# ---------------------------------------------------------------------------------------------
# Math -> MathML, and the CLI help
# ---------------------------------------------------------------------------------------------

MATH = re.compile(r'<(span|div) class="arithmatex">(.*?)</\1>', re.S)


def _mathml(m: re.Match) -> str:
    from latex2mathml.converter import convert
    tag, tex = m.group(1), html.unescape(m.group(2)).strip()
    block = tag == "div"
    tex = tex[2:-2] if tex[:2] in ("\\(", "\\[") else tex
    try:
        math = convert(tex.strip(), display="block" if block else "inline")
    except Exception as e:                                  # show the TeX, and say so in the log
        __import__("logging").getLogger("mkdocs.hooks.lessons").warning(f"math not converted: {tex!r} ({e})")
        return f"<code>{html.escape(tex)}</code>"
    return f'<div class="math-block">{math}</div>' if block else math


def on_page_content(content, page, config, files):
    return MATH.sub(_mathml, content)


def _cli_help() -> str:
    import argparse
    from minfer.cli import build_parser

    def subparsers(p):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                yield from a.choices.items()

    parser = build_parser()
    parser.prog = "python -m minfer"
    os.environ["COLUMNS"] = "100"
    parts = [("python -m minfer", parser)]
    for name, p in subparsers(parser):
        parts.append((f"python -m minfer {name}", p))
        parts += [(f"python -m minfer {name} {n}", q) for n, q in subparsers(p)]
    return "\n\n".join(f"### `{title}`\n\n" + _fence(p.format_help().rstrip(), "text")
                       for title, p in parts)


SOURCE = re.compile(r"^( *)<!-- source ([\w.]+):([\w.,]+) -->$", re.M)


def _source(root: Path, module: str, names: str) -> str:
    import ast
    path = root / (module.replace(".", "/") + ".py")
    text = path.read_text()
    tree = ast.parse(text)
    lines = text.splitlines()
    parts = []
    for name in names.split(","):
        node, scope = None, tree.body
        for part in name.split("."):                      # Class.method
            node = next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                         and n.name == part), None)
            if node is None:
                break
            scope = node.body
        if node is None:
            __import__("logging").getLogger("mkdocs.hooks.lessons").warning(
                f"source marker: {module}:{name} not found in {path}")
            parts.append(f"# {module}:{name} is not written yet")
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        parts.append(textwrap.dedent("\n".join(lines[start:node.end_lineno])))
    return f"# {module.replace('.', '/')}.py\n" + "\n\n\n".join(parts)


def on_page_markdown(markdown, page, config, files):
    if "<!-- cli-help -->" in markdown:
        markdown = markdown.replace("<!-- cli-help -->", _cli_help())
    root = Path(config.config_file_path).parent

    def repl(m):
        block = _fence(_source(root, m.group(2), m.group(3)), "python")
        return textwrap.indent(block, m.group(1))

    return SOURCE.sub(repl, markdown)


if __name__ == "__main__":
    execute(Path(sys.argv[1]), Path(sys.argv[2]))
