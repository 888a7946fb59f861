"""Conformance suite fixtures: which backend(s) to test, and how to build one per seed.

    python3 -m pytest tests/conformance                       # the emulator and the reference driver
    python3 -m pytest tests/conformance --backend NAME --backend-option key=value ...

``NAME`` is any registered backend (built-in or a ``thermo_device.backends`` plugin). For
``--backend register`` without an ``address`` option, a board simulator is started for the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from thermo_device.backend import Backend
from thermo_device.hardware.board_sim import BoardProcess
from thermo_device.plugins import create, parse_options

ROOT = Path(__file__).resolve().parents[2]
# The default matrix: the emulator (ideal components, noise raised so statistics are visible) and
# the reference register driver over its simulated board (16 cells, 12/14/12-bit converters).
DEFAULT_SPECS: list[tuple[str, dict[str, Any]]] = [
    ("emulator", {"profile": "ideal", "noise.kappa": 1e-3, "device.cells": 64}),
    ("register", {}),
]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("conformance", "backend conformance suite")
    group.addoption("--backend", default=None, help="registered backend name to test (default: emulator "
                    "and the register driver over a simulated board)")
    group.addoption("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                    help="option for the backend factory (repeatable)")


def pytest_configure(config: pytest.Config) -> None:
    # a misspelled --backend is one usage error before collection, not one failure per test
    name = config.getoption("backend", default=None)
    if name:
        from thermo_device.plugins import available

        known = available()
        if name not in known:
            raise pytest.UsageError(f"unknown backend {name!r} for --backend (known: {', '.join(sorted(known))}; "
                                    "plugins register under the entry-point group 'thermo_device.backends')")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend_spec" not in metafunc.fixturenames:
        return
    # getoption with a default: when this conftest is not an initial one (a bare `pytest` from the
    # root), its options are not registered and the default matrix applies.
    name = metafunc.config.getoption("backend", default=None)
    specs = [(name, parse_options(metafunc.config.getoption("backend_option", default=[])))] if name \
        else DEFAULT_SPECS
    metafunc.parametrize("backend_spec", specs, ids=[s[0] for s in specs], scope="session")


@pytest.fixture(scope="session")
def board_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = open(tmp_path_factory.mktemp("board") / "board.log", "ab")
    board = BoardProcess(log=log, cwd=str(ROOT))
    try:
        yield board.address
    finally:
        board.stop()
        log.close()


@pytest.fixture(scope="session")
def make(backend_spec: tuple[str, dict[str, Any]], request: pytest.FixtureRequest) -> Iterator[Callable[[int], Backend]]:
    """make(seed) -> a fresh backend; every backend made is closed at the end (boards: one at a time,
    so tests close what they are done with before making the next)."""
    name, options = backend_spec
    options = dict(options)
    if name == "register" and "address" not in options:
        options["address"] = request.getfixturevalue("board_address")
    made: list[Backend] = []

    def factory(seed: int = 0) -> Backend:
        for old in made:
            old.close()
        made.clear()
        dev = create(name, seed, options)
        made.append(dev)
        return dev

    yield factory
    for dev in made:
        dev.close()
