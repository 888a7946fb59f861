"""Backend plugins: the registry, and a plugin package (tests/plugin_pkg) installed into a temporary
directory, discovered through its entry point, served by name by a real daemon, and run through
the conformance suite with the one documented command. The environment itself is not changed."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import host
from protocol import Capabilities, Dense, Diagonal
from protocol.errors import InvalidInputError, UnsupportedError
from tests.test_wire_daemon import DaemonProcess
from thermo_device import Emulator, plugins

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_SRC = ROOT / "tests" / "plugin_pkg"


def test_builtins_are_registered_and_built() -> None:
    names = plugins.available()
    assert {"emulator", "register"} <= set(names)
    dev = plugins.create("emulator", 5, {"profile": "ideal", "device.cells": 16})
    assert isinstance(dev, Emulator) and dev.seed == 5 and dev.capabilities().cells == 16


def test_registry_errors_are_clear() -> None:
    with pytest.raises(InvalidInputError, match="available: .*emulator"):
        plugins.create("no-such-board")
    with pytest.raises(InvalidInputError, match="backend 'emulator'"):
        plugins.create("emulator", 0, {"not_an_option": 1, "profile": "ideal", "x": 2} | {"seed": 1})
    with pytest.raises(InvalidInputError, match="key=value"):
        plugins.parse_options(["novalue"])
    assert plugins.parse_options(["a=1", "b=0.5", "c=true", "d=127.0.0.1:7700", 'e="s"']) == \
        {"a": 1, "b": 0.5, "c": True, "d": "127.0.0.1:7700", "e": "s"}


def test_a_factory_must_return_a_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(plugins.BUILTINS, "not-a-backend", "builtins:dict")
    with pytest.raises(InvalidInputError, match="not a thermo_device.backend.Backend"):
        plugins.create("not-a-backend")


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install the test plugin into a temporary --target directory (no index, no deps); the
    source is copied first so the build leaves nothing behind in the tree."""
    tmp = tmp_path_factory.mktemp("plugin")
    src, target = tmp / "src", tmp / "site"
    shutil.copytree(PLUGIN_SRC, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--disable-pip-version-check", "--no-cache-dir", "--quiet", "--target", str(target), str(src)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert list(target.glob("toy_spu-*.dist-info"))
    return target


@pytest.fixture
def on_path(plugin_dir: Path):
    sys.path.insert(0, str(plugin_dir))
    importlib.invalidate_caches()
    try:
        yield plugin_dir
    finally:
        sys.path.remove(str(plugin_dir))
        sys.modules.pop("toy_spu", None)
        importlib.invalidate_caches()


def _env(plugin_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(plugin_dir), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_entry_point_is_discovered(on_path: Path) -> None:
    assert plugins.available()["toy"] == "toy_spu:make_backend"
    dev = plugins.create("toy", 2, {"cells": 4})
    caps = dev.capabilities()
    assert caps.backend == "toy" and caps.cells == 4 and caps.drift_forms == ("diagonal",)
    with pytest.raises(UnsupportedError):
        dev.program(Dense(np.eye(2)), None)


def test_plugin_is_served_by_name(plugin_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", _env(plugin_dir)["PYTHONPATH"])  # inherited by the daemon only
    daemon = DaemonProcess(tmp_path / "daemon.log", "--backend", "toy", "--backend-option", "cells=6")
    try:
        with host.connect(daemon.endpoint, seed=1, timeout=20.0) as dev:
            caps = Capabilities.from_info(dev.info())
            assert caps.backend == "toy" and caps.cells == 6
            d = np.arange(1.0, 7.0)
            dev.program(Diagonal(d), d)
            res = dev.run(300.0, burn_in=20.0)
            # kappa 1e-3: standard error of a window average sqrt(2 kappa / (d^2 T)) <= 2.6e-3
            assert np.max(np.abs(res.mean - 1.0)) < 5 * np.sqrt(2e-3 / 280.0)
            with pytest.raises(UnsupportedError):
                dev.program(Dense(np.eye(6)), None)
    finally:
        daemon.stop()


def test_conformance_suite_runs_against_the_plugin(plugin_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/conformance", "--backend", "toy",
                           "--backend-option", "cells=8", "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT, env=_env(plugin_dir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "8 passed" in proc.stdout, proc.stdout[-2000:]
