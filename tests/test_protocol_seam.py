"""Issue 12 (items 5-7) on the wire side: one Device seam with every member declared, run arguments
checked in protocol, drifts validated once per process, and the drift methods giving the numbers
the hand-written code gave before (compared bit for bit with that code, kept here)."""

from __future__ import annotations

import ast
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import protocol.drift as pdrift
from host.adapt import DriftAdapter
from host.baselines import NGDCG, damped, natural_direction
from host.client import DeviceClient
from host.curvature import Curvature
from protocol import Capabilities, Dense, Device, Diagonal, Factored
from protocol.codec import drift_from_wire, drift_to_wire
from protocol.errors import (
    CapacityError,
    InvalidInputError,
    NonFiniteError,
    ShapeError,
    UnsupportedError,
)
from protocol.messages import Limits
from protocol.run_args import MAX_RETURNED_SAMPLES, check_run_args, run_args_from_wire
from thermo_device import Backend, Emulator, load_profile
from thermo_device.daemon import Daemon

ROOT = Path(__file__).resolve().parent.parent
DEVICE_MEMBERS = ("info", "capabilities", "status", "program", "run", "step", "state", "close",
                  "calibrate", "snapshot", "restore")


def _rng_problem(n: int = 12, m: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    j = rng.standard_normal((m, n))
    r = rng.standard_normal((m, m))
    return j, r @ r.T / m


class _Count:
    """Counts NaN/Inf scans (protocol.drift.all_finite calls): shape and the functions calling."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.callers: list[set[str]] = []

    def __call__(self, arr: np.ndarray) -> bool:
        self.shapes.append(arr.shape)
        self.callers.append({f.name for f in traceback.extract_stack(limit=12)})
        return _ORIGINAL(arr)

    def clear(self) -> None:
        del self.shapes[:], self.callers[:]


_ORIGINAL = pdrift.all_finite


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> _Count:
    count = _Count()
    monkeypatch.setattr(pdrift, "all_finite", count)
    return count


# -- one seam ------------------------------------------------------------------------------------------


def test_device_declares_every_member_the_host_and_daemon_use() -> None:
    declared = {name for name in vars(Device) if not name.startswith("_")}
    assert set(DEVICE_MEMBERS) <= declared
    assert Device in DeviceClient.__mro__  # the client declares the interface it implements
    for cls in (DeviceClient, Backend, Emulator):
        missing = [m for m in DEVICE_MEMBERS if not hasattr(cls, m)]
        assert not missing, f"{cls.__name__} lacks {missing}"


def test_optional_members_default_to_unsupported() -> None:
    class Minimal(Backend):  # implements only the abstract members
        def capabilities(self) -> Capabilities:
            return Capabilities(backend="minimal", cells=4, dynamics="overdamped", drift_forms=("diagonal",),
                                tau_s=1e-6, max_duration=10.0, sample_interval=0.1)

        def program(self, drift: Any, bias: Any = None) -> None: ...

        def run(self, duration: float, **kw: Any) -> Any: ...

        @property
        def state(self) -> np.ndarray:
            return np.zeros(0)

        @state.setter
        def state(self, value: np.ndarray) -> None: ...

    dev = Minimal()
    assert isinstance(dev, Device)
    assert dev.status() == {}
    for call in (dev.calibrate, dev.snapshot, lambda: dev.restore(None)):  # type: ignore[arg-type]
        with pytest.raises(UnsupportedError):
            call()


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            out.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_no_device_member_is_probed_with_getattr() -> None:
    for rel in ("thermo_device/daemon.py", "thermo_device/session.py", "host/adapt.py", "host/client.py",
                "host/baselines.py", "host/curvature.py", "host/connect.py", "host/embedded.py"):
        for node in ast.walk(ast.parse((ROOT / rel).read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr"):
                name = node.args[1].value if isinstance(node.args[1], ast.Constant) else None
                assert name not in DEVICE_MEMBERS, f"{rel}:{node.lineno} probes {name!r}"


def test_the_daemon_learns_wire_limits_from_protocol_only() -> None:
    local = {m for m in _imports(ROOT / "thermo_device/daemon.py") if m.startswith(".")}
    assert local <= {".security", ".session"}, local


# -- run arguments ---------------------------------------------------------------------------------------


def test_check_run_args_caps_samples_as_the_emulator_did() -> None:
    import thermo_device.backend

    assert thermo_device.backend.check_run_args is check_run_args  # re-exported, not a copy
    assert check_run_args(2, 1.0, 0, np.int64(MAX_RETURNED_SAMPLES), 10.0) == (2.0, 1.0, 0.0, MAX_RETURNED_SAMPLES)
    for bad in (-1, MAX_RETURNED_SAMPLES + 1):
        with pytest.raises(CapacityError, match=rf"^samples = {bad} is out of range \[0, {MAX_RETURNED_SAMPLES}\]$"):
            check_run_args(1.0, 0.0, 0.0, bad, 10.0)
    with pytest.raises(InvalidInputError, match="samples must be an integer"):
        check_run_args(1.0, 0.0, 0.0, 1.5, 10.0)  # type: ignore[arg-type]
    emu = Emulator(load_profile("ideal", {"device.cells": 4}))
    emu.program(Diagonal(np.ones(4)))
    with pytest.raises(CapacityError, match="out of range"):
        emu.run(1.0, samples=MAX_RETURNED_SAMPLES + 1)


def test_wire_run_args_keep_the_wire_error() -> None:
    assert run_args_from_wire({"duration": 1}) == {"duration": 1.0, "burn_in": 0.0, "delay": 0.0, "reset": False,
                                                   "second_moment": False, "samples": 0}
    with pytest.raises(InvalidInputError, match=r"samples must be an integer in \[0, 1000000\]") as err:
        run_args_from_wire({"duration": 1.0, "samples": MAX_RETURNED_SAMPLES + 1})
    assert not isinstance(err.value, CapacityError)  # invalid_input on the wire (docs/protocol.md)
    for args in ({}, {"duration": "5"}, {"duration": True}, {"duration": 1.0, "reset": 1}):
        with pytest.raises(InvalidInputError):
            run_args_from_wire(args)


# -- drift forms: same numbers as the code they replace -------------------------------------------------


def _old_damped(c: Any, lam: float) -> Any:
    if isinstance(c, Factored):
        return Factored(c.J, c.H, c.damping + lam)
    if isinstance(c, Dense):
        return Dense(c.matrix + lam * np.eye(c.dim))
    return Diagonal(c.diag + lam)


def _drifts() -> list[Any]:
    j, h = _rng_problem()
    a = j.T @ h @ j + np.eye(12)
    return [Factored(j, h, 0.25), Dense(a), Dense(a.astype(np.float32)), Diagonal(np.linspace(1, 2, 12)),
            Diagonal(np.linspace(1, 2, 12, dtype=np.float32))]


@pytest.mark.parametrize("drift", _drifts(), ids=lambda d: f"{d.form}-{d.arrays()[d.array_names[0]].dtype}")
def test_damped_and_wire_match_the_isinstance_code(drift: Any) -> None:
    new, old = damped(drift, 0.3), _old_damped(drift, 0.3)
    assert type(new) is type(old) and new.params() == old.params()
    for name, arr in old.arrays().items():
        assert new.arrays()[name].dtype == arr.dtype and np.array_equal(new.arrays()[name], arr)
    spec, arrays = drift_to_wire(drift)
    assert list(spec) == (["form", "damping"] if drift.form == "factored" else ["form"])
    back = drift_from_wire(spec, arrays)
    assert back.form == drift.form and back.params() == drift.params()
    assert all(np.array_equal(back.arrays()[k], v) for k, v in drift.arrays().items())


def test_damped_refuses_bad_damping() -> None:
    d = Diagonal(np.ones(3))
    with pytest.raises(InvalidInputError, match="damping must be >= 0"):
        damped(d, -1.0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteError):
            damped(d, bad)
    with pytest.raises(InvalidInputError, match="not a drift description"):
        damped(np.eye(3), 0.1)  # type: ignore[arg-type]


def test_drift_from_wire_errors_are_typed() -> None:
    j, h = _rng_problem()
    for spec, arrays, exc in [([], {}, InvalidInputError),
                              ({"form": "sparse"}, {}, InvalidInputError),
                              ({"form": ["dense"]}, {}, InvalidInputError),
                              ({"form": "factored"}, {"J": j}, InvalidInputError),
                              ({"form": "factored", "damping": "1"}, {"J": j, "H": h}, InvalidInputError),
                              ({"form": "factored", "damping": True}, {"J": j, "H": h}, InvalidInputError),
                              ({"form": "factored", "damping": -1.0}, {"J": j, "H": h}, InvalidInputError),
                              ({"form": "factored"}, {"J": j, "H": h[:2]}, ShapeError),
                              ({"form": "diagonal"}, {"diag": np.array([1.0, np.nan])}, NonFiniteError)]:
        with pytest.raises(exc):
            drift_from_wire(spec, arrays)
    # a key another form takes is ignored, as before
    assert drift_from_wire({"form": "diagonal", "damping": "x"}, {"diag": np.ones(2)}).dim == 2


def test_adapter_conversions_match_the_hand_formed_products() -> None:
    j, h = _rng_problem()
    caps = Capabilities(backend="board", cells=64, dynamics="overdamped", drift_forms=("dense",),
                        tau_s=1e-6, max_duration=10.0, sample_interval=0.1)
    a = j.T @ (h @ j)
    a = 0.5 * (a + a.T)
    a[np.diag_indices_from(a)] += 0.25
    out = DriftAdapter(caps)(Factored(j, h, 0.25))
    assert out.form == "dense" and np.array_equal(out.matrix, a)
    d = np.linspace(1, 2, 12)
    assert np.array_equal(DriftAdapter(caps)(Diagonal(d)).matrix, np.diag(d))
    fac = DriftAdapter(Capabilities(**{**caps.to_dict(), "drift_forms": ("factored",)}))(Diagonal(d))
    assert fac.form == "factored" and np.array_equal(fac.J, np.eye(12)) and np.array_equal(fac.H, np.diag(d))


def test_baselines_agree_with_the_direct_products() -> None:
    j, h = _rng_problem(n=30, m=6, seed=3)
    g = np.random.default_rng(4).standard_normal(30)
    drift = Factored(j, h, 0.1)
    a = j.T @ h @ j + 0.1 * np.eye(30)
    want = np.linalg.solve(a, g)
    for method in ("auto", "woodbury", "cholesky"):
        np.testing.assert_allclose(natural_direction(g, drift, method), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(natural_direction(g, Dense(a)), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(NGDCG(1.0, 0.1, maxiter=200, rtol=1e-13).direction(g, Factored(j, h)), want,
                               rtol=1e-8, atol=1e-10)


# -- validation once ---------------------------------------------------------------------------------------


def test_curvature_is_scanned_once_per_object(scans: _Count) -> None:
    j, h = _rng_problem(n=40, m=8)
    curv = Curvature(j, h, np.zeros(40), 0.0, np.zeros((8, 1)))
    first = curv.drift(0.0)
    later = [curv.drift(lam) for lam in (0.0, 0.5, 2.0)]
    damped(later[0], 0.1)
    assert sorted(scans.shapes) == [(8, 8), (8, 40)]
    assert all(d.J is first.J and d.H is first.H for d in later) and later[1].damping == 0.5
    with pytest.raises(InvalidInputError, match="Factored.damping"):
        curv.drift(-1.0)
    bad = Curvature(np.full((8, 40), np.nan), h, np.zeros(40), 0.0, np.zeros((8, 1)))
    for _ in range(2):  # checked at every call while bad: a diverged model raises each time
        with pytest.raises(NonFiniteError):
            bad.drift(0.1)


@pytest.fixture
def daemon() -> Iterator[str]:
    d = Daemon(lambda seed: Emulator(load_profile("ideal", {"device.cells": 64}), seed=seed), "tcp://127.0.0.1:*",
               limits=Limits())
    endpoint = d.start()
    t = threading.Thread(target=d.serve, daemon=True)
    t.start()
    yield endpoint
    d.stop()
    t.join(timeout=10)


def test_daemon_scans_a_received_drift_and_bias_once(daemon: str, scans: _Count) -> None:
    j, h = _rng_problem(n=40, m=8)
    drift, bias = Factored(j, h, 0.5), np.ones(40)
    with DeviceClient(daemon, seed=1, timeout=30.0) as client:
        scans.clear()
        client.step(drift, bias, 1.0)
        client.program(drift, bias)
    calls = list(zip(scans.shapes, scans.callers, strict=True))
    # the client scans nothing (the drift was checked when it was built), the daemon's decode scans
    # J and H once per request, and the bias is left to the device (Device.program checks it)
    assert not [c for _, c in calls if {"step", "program"} & c and "_compute" not in c]
    decoded = [shape for shape, c in calls if "drift_from_wire" in c]
    assert sorted(decoded) == [(8, 8), (8, 8), (8, 40), (8, 40)]
    assert not [c for shape, c in calls if shape == (40,) and "_bias" in c]
    assert [shape for shape, _ in calls].count((40,)) <= 2  # at most the device's own check, per request


def test_optional_members_over_the_wire(daemon: str) -> None:
    with DeviceClient(daemon, seed=2, timeout=30.0) as client:
        assert isinstance(client, Device)
        assert client.capabilities() == Capabilities.from_info(client.info())
        assert client.capabilities().backend == "emulator"
        client.program(Diagonal(np.linspace(1.0, 2.0, 4)), np.ones(4))
        snap = client.snapshot()
        assert snap.meta and "state" in snap.arrays
        client.restore(snap)
        backend = client.status()["session_status"]["backend"]
        assert backend["programmed"] is True and backend["dim"] == 4
        with pytest.raises(NonFiniteError):  # set_state checked by the device, typed on the wire
            client.state = np.array([np.nan, 0.0, 0.0, 0.0])
        with pytest.raises(ShapeError):
            client.state = np.ones(5)
