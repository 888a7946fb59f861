"""One BLAS thread on every path (issue 15 item 6): importing either side caps the pools.

Each case runs in a fresh interpreter, since the cap is process-wide and set on import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_PROBE = """
import json, sys
import numpy, scipy.linalg
from threadpoolctl import threadpool_info
before = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
import {module}
after = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
print(json.dumps({{"before": before, "after": after}}))
"""


def _probe(module: str, env_value: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("THERMO_NGD_BLAS_THREADS", None)
    if env_value is not None:
        env["THERMO_NGD_BLAS_THREADS"] = env_value
    return subprocess.run([sys.executable, "-c", _PROBE.format(module=module)], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize("module", ["thermo_device", "host"])
def test_import_caps_blas_to_one_thread(module: str) -> None:
    out = _probe(module, None)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["after"] and set(got["after"]) == {1}


@pytest.mark.parametrize("module", ["thermo_device", "host"])
def test_zero_leaves_the_library_default(module: str) -> None:
    got = json.loads(_probe(module, "0").stdout)
    assert got["after"] == got["before"]


@pytest.mark.parametrize("module", ["thermo_device", "host"])
def test_a_bad_value_names_the_variable(module: str) -> None:
    out = _probe(module, "two")
    assert out.returncode != 0 and "THERMO_NGD_BLAS_THREADS" in out.stderr


def test_set_blas_threads_restores_the_default() -> None:
    code = ("import json\nfrom thermo_device.blas import _DEFAULT, blas_threads, set_blas_threads\n"
            "set_blas_threads(0)\nprint(json.dumps([blas_threads(), sorted(_DEFAULT.values())]))")
    env = {k: v for k, v in os.environ.items() if k != "THERMO_NGD_BLAS_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    now, default = json.loads(out.stdout)
    assert sorted(now) == default
