"""Packaging: a non-editable install carries the built-in profiles and the one version string.

The project is built from a copy of the source tree (so no build/ or egg-info lands in the working
tree) and installed into a fresh venv that sees the system site-packages for the dependencies
(numpy, numba, ...; offline: --no-index, --no-deps). The check then runs from another directory
with ``python -I``, so the source tree cannot be on sys.path; it must find the installed package,
not this checkout (the main environment's editable install is untouched: pip never uninstalls
outside the venv it runs in, and the last test checks the checkout still imports from here).

Building must not import the package: an isolated build (``python -m build``, plain ``pip install .``)
has setuptools but none of the runtime dependencies. The builds here run with stand-in modules that
refuse to import for every runtime dependency, so a version read that fell back to importing
``thermo_device`` fails here as it would there.

No step talks to the network; each subprocess has a timeout (pytest-timeout is not a dependency).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import thermo_device
from thermo_device.profile import BUILTIN_PROFILES, CONFIG_DIR

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_DEPENDENCIES = ("numpy", "numba", "scipy", "zmq", "msgpack", "tqdm", "threadpoolctl")
PIP = ["-m", "pip", "--disable-pip-version-check", "--no-input"]
OFFLINE = ["--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir"]
BUILD_TIMEOUT_S = 240  # a build is ~2 s here; generous for a loaded 2-core machine


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = BUILD_TIMEOUT_S
         ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("packaging")


@pytest.fixture(scope="module")
def source(work: Path) -> Path:
    """The checkout as it stands (uncommitted edits included), without caches and build output."""
    src = work / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache", ".ruff_cache",
        ".benchmarks", "results"))
    return src


@pytest.fixture(scope="module")
def build_env(work: Path) -> dict[str, str]:
    """Environment for build steps: every runtime dependency replaced by a module that refuses import."""
    blockers = work / "no-runtime-deps"
    blockers.mkdir()
    for name in RUNTIME_DEPENDENCIES:
        (blockers / f"{name}.py").write_text(
            f"raise ImportError('{name} imported while building thermo-ngd; an isolated build has no {name}')\n")
    return dict(os.environ, PYTHONPATH=str(blockers), PIP_NO_INPUT="1")


@pytest.fixture(scope="module")
def venv(work: Path) -> Path:
    """A fresh venv on top of the system site-packages (dependencies, setuptools, pip)."""
    env_dir = work / "venv"
    # --without-pip: the system pip, run by the venv's python, installs into the venv; ensurepip
    # would also shadow the system setuptools with its bundled, older one.
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env_dir)], cwd=work)
    return env_dir


def _expected_profiles() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(CONFIG_DIR.glob("*.toml"))}


def test_source_tree_has_one_copy_of_the_profiles() -> None:
    """configs/ is the user-facing name of the package's profile folder, not a second copy."""
    configs = ROOT / "configs"
    assert configs.is_symlink(), "configs/ must be a symlink to thermo_device/profiles"
    # Relative, so the link survives the checkout moving; it must land on the folder profile.py reads.
    assert os.readlink(configs) == "thermo_device/profiles"
    assert configs.resolve() == CONFIG_DIR == ROOT / "thermo_device" / "profiles"
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.toml")) == sorted(BUILTIN_PROFILES)
    assert (configs / "noisy.toml").read_bytes() == (CONFIG_DIR / "noisy.toml").read_bytes()


def test_version_is_declared_once() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    module, _, name = attr.rpartition(".")
    assert module == "thermo_device._version" and name == "__version__"
    assert thermo_device.__version__ == thermo_device._version.__version__


def test_sdist_then_wheel_carry_the_profiles(work: Path, source: Path, build_env: dict[str, str]) -> None:
    """What ``python -m build`` does: sdist first, then the wheel from the unpacked sdist."""
    sdist_dir, wheel_dir, unpacked = work / "sdist", work / "wheel", work / "unpacked"
    _run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
          "print(b.build_sdist(sys.argv[1]))", str(sdist_dir)], cwd=source, env=build_env)
    (sdist,) = sdist_dir.glob("thermo_ngd-*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(unpacked, filter="data")
    (sdist_root,) = unpacked.iterdir()
    _run([sys.executable, *PIP, "wheel", *OFFLINE, "-w", str(wheel_dir), str(sdist_root)],
         cwd=work, env=build_env)
    (wheel,) = wheel_dir.glob("thermo_ngd-*.whl")
    assert wheel.name.startswith(f"thermo_ngd-{thermo_device.__version__}-")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        shipped = {n.rsplit("/", 1)[1]: zf.read(n) for n in names
                   if n.startswith("thermo_device/profiles/") and n.endswith(".toml")}
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        version = [ln for ln in zf.read(metadata).decode().splitlines() if ln.startswith("Version: ")]
    assert shipped == _expected_profiles()  # every built-in profile, byte for byte
    assert version == [f"Version: {thermo_device.__version__}"]
    assert "thermo_device/_version.py" in names
    assert not [n for n in names if n.startswith(("configs/", "tests/"))]


def test_pip_install_dot_loads_every_profile_from_elsewhere(work: Path, source: Path, venv: Path,
                                                            build_env: dict[str, str]) -> None:
    """The issue's check: ``pip install .`` (not editable), then ``load_profile`` from another directory."""
    python = venv / "bin" / "python"
    _run([str(python), *PIP, "install", *OFFLINE, str(source)], cwd=source, env=build_env)
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    probe = (
        "import json, sys, importlib.metadata as md\n"
        "import thermo_device as t\n"
        "t.load_profile('ideal')\n"
        "profiles = {n: t.load_profile(n).name for n in t.profile.BUILTIN_PROFILES}\n"
        "dist = md.distribution('thermo-ngd')\n"
        "print(json.dumps({'file': t.__file__, 'version': t.__version__, 'dist_version': dist.version,\n"
        "                  'dist_at': str(dist.locate_file('')), 'profiles': profiles,\n"
        "                  'config_dir': str(t.profile.CONFIG_DIR), 'path': sys.path}))\n"
    )
    # -I: no PYTHONPATH, no user site, no script/cwd entry; the cwd is not the checkout either.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    out = json.loads(_run([str(python), "-I", "-c", probe], cwd=elsewhere, env=env).stdout)
    site = venv.resolve()
    assert Path(out["file"]).resolve().is_relative_to(site), out
    assert Path(out["config_dir"]).resolve().is_relative_to(site), out
    assert not any(Path(p).resolve() == ROOT for p in out["path"] if p), out["path"]
    assert out["profiles"] == {n: n for n in BUILTIN_PROFILES}
    assert Path(out["dist_at"]).resolve().is_relative_to(site), out  # the venv's metadata, not the system's
    assert out["version"] == out["dist_version"] == thermo_device.__version__


def test_the_checkout_still_imports_from_here(work: Path) -> None:
    """The main environment's editable install survived the venv installs (run after them)."""
    out = _run([sys.executable, "-c", "import thermo_device as t; print(t.__file__); "
                "print(t.load_profile('ideal').name)"], cwd=work).stdout.split()
    assert Path(out[0]).resolve() == ROOT / "thermo_device" / "__init__.py" and out[1] == "ideal"
