"""A short, bounded run of the coverage-guided fuzzer (tests/fuzz_atheris.py) in a subprocess."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNS = 50_000


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                    reason="atheris is not installed (pip install atheris); hypothesis remains the CI fuzzer")
def test_atheris_finds_no_crash_in_the_request_path(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "fuzz_atheris.py"), f"-atheris_runs={RUNS}",
                           "-seed=1", "-max_total_time=30", "-rss_limit_mb=2048", f"-artifact_prefix={tmp_path}/"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    tail = done.stderr[-3000:]
    assert done.returncode == 0, f"atheris found a crash:\n{tail}"
    assert "Done" in done.stderr and not list(tmp_path.glob("crash-*")), tail
