"""The docs check (issue 18): the Python examples in README.md and docs/*.md that are meant to run
do run, so an example that breaks is a failing test.

Convention (README.md, "Examples in the docs"): a fenced block whose info string is exactly
``python`` runs, in a fresh interpreter, in an empty directory, with BLAS single-threaded; it must
be self-contained and small. A block that cannot run on its own (it needs a daemon, a board, keys)
is marked by the line ``<!-- no-run: why -->`` directly above its opening fence. Blocks in other
languages (``py``, ``text``, ``toml``, ``sh``) and indented blocks are never run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\S*)\s*$")
NO_RUN = re.compile(r"^<!--\s*no-run\b.*-->\s*$")


def runnable_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of every block the convention says runs."""
    out = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        lang, start = m.group(1), i
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        marked = start > 0 and NO_RUN.match(lines[start - 1].strip()) is not None
        if lang == "python" and not marked:
            out.append((start + 1, "\n".join(lines[start + 1:j]) + "\n"))
        i = j + 1
    return out


def _cases() -> list[object]:
    cases = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        rel = path.relative_to(ROOT).as_posix()
        for line, code in runnable_blocks(path.read_text()):
            cases.append(pytest.param(rel, line, code, id=f"{rel}:{line}"))
    return cases


def test_the_convention_is_parsed_as_documented() -> None:
    text = "a\n```python\nx = 1\n```\n<!-- no-run: needs a board -->\n```python\ny\n```\n```py\nz\n```\n"
    assert runnable_blocks(text) == [(2, "x = 1\n")]


def test_there_are_examples_to_run() -> None:
    files = {c.values[0] for c in _cases()}  # type: ignore[attr-defined]
    assert {"README.md", "docs/tasks.md"} <= files


@pytest.mark.parametrize(("doc", "line", "code"), _cases())
def test_doc_example_runs(doc: str, line: int, code: str, tmp_path: Path) -> None:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, f"{doc}:{line} failed:\n{proc.stderr[-3000:]}"
