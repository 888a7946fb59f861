"""Device snapshots: restore continues bit for bit, on any profile; bad snapshots change nothing."""

from __future__ import annotations

import numpy as np
import pytest

from protocol import Dense, DeviceSnapshot, Diagonal, Factored
from protocol.errors import DeviceError
from thermo_device import Emulator, load_profile

CASES = [
    ("ideal", {"noise.kappa": 0.01}, "dense"),
    ("ideal", {"noise.kappa": 0.01}, "factored"),
    ("noisy", {}, "dense"),  # calibrated, stochastic rounding, ADC noise
    ("noisy", {"noise.flicker_corner": 0.5, "integrator.method": "auto"}, "dense"),  # stepping + 1/f state
    ("spu-8cell", {}, "dense"),  # underdamped RLC
]


def _drive(dev: Emulator, form: str, n: int, rng: np.random.Generator) -> None:
    m = rng.standard_normal((n, n))
    a = m @ m.T / n + np.eye(n)
    bias = np.zeros(n) if dev.profile.device.dynamics == "underdamped" else rng.standard_normal(n)
    if form == "factored":
        j = rng.standard_normal((3, n))
        dev.program(Factored(j, np.eye(3), 0.5), bias)
    else:
        dev.program(Dense(a), bias)
    dev.run(5.0)
    dev.program(Dense(a * 1.1) if form == "dense" else Diagonal(np.linspace(1, 2, n)), bias * 0.5)
    dev.run(3.0, delay=0.5)


@pytest.mark.parametrize("profile,overrides,form", CASES)
def test_restore_continues_bit_for_bit(profile, overrides, form):
    rng = np.random.default_rng(1)
    a = Emulator(load_profile(profile, overrides), seed=3)
    if profile == "noisy":
        a.calibrate(6, duration=200.0)
    _drive(a, form, 6, rng)
    snap = a.snapshot()
    expected = a.run(4.0, delay=1.0, samples=3)
    b = Emulator(load_profile(profile, overrides), seed=99)  # another seed: the snapshot decides
    b.restore(snap)
    got = b.run(4.0, delay=1.0, samples=3)
    assert np.array_equal(expected.samples, got.samples)
    assert np.array_equal(expected.state, got.state)
    assert np.array_equal(a.run(2.0).mean, b.run(2.0).mean)
    assert b.info()["seed"] == 3


def test_a_fresh_device_snapshot_restores_to_nothing_programmed():
    a = Emulator("ideal", seed=5)
    b = Emulator("ideal", seed=6)
    b.program(Diagonal(np.ones(3)))
    b.restore(a.snapshot())
    with pytest.raises(DeviceError, match="program"):
        b.run(1.0)


def _tampered(snap: DeviceSnapshot, **meta) -> DeviceSnapshot:
    return DeviceSnapshot({**snap.meta, **meta}, dict(snap.arrays))


def test_bad_snapshots_raise_typed_errors_and_change_nothing():
    rng = np.random.default_rng(2)
    a = Emulator(load_profile("ideal", {"noise.kappa": 0.01}), seed=1)
    _drive(a, "dense", 4, rng)
    good = a.snapshot()
    other = Emulator(load_profile("ideal", {"noise.kappa": 0.02}), seed=1)
    with pytest.raises(DeviceError, match="profile"):
        other.restore(good)
    arrays = dict(good.arrays)
    arrays["state"] = np.ones(7)
    bad = [
        _tampered(good, format=99),
        _tampered(good, rng={"bit_generator": "MT19937"}),
        _tampered(good, seed=-1),
        _tampered(good, thermostat=[0.0, float("nan")]),
        _tampered(good, programs=[None]),
        DeviceSnapshot(good.meta, {k: v for k, v in good.arrays.items() if k != "current.bias"}),
        DeviceSnapshot(good.meta, {**good.arrays, "current.matrix": np.full((4, 4), np.nan)}),
        DeviceSnapshot(good.meta, arrays),
        "not a snapshot",
    ]
    c = Emulator(load_profile("ideal", {"noise.kappa": 0.01}), seed=1)
    _drive(c, "dense", 4, np.random.default_rng(2))
    before = c.snapshot()
    for snap in bad:
        with pytest.raises(DeviceError):
            c.restore(snap)  # type: ignore[arg-type]
    # nothing changed: the same complete state as before the bad snapshots, and c continues
    # exactly like a, which never saw them
    after = c.snapshot()
    assert after.meta == before.meta
    assert all(np.array_equal(after.arrays[k], v) for k, v in before.arrays.items())
    assert np.array_equal(c.run(2.0, samples=2).samples, a.run(2.0, samples=2).samples)


def test_restore_after_calibrating_another_size_keeps_the_1f_state():
    # calibrate(4) on a device programmed at 6 swaps in a 1/f filter of size 4 while it probes;
    # the size-6 program's filter state must come back, or the snapshot carries the wrong one.
    prof = load_profile("noisy", {"noise.flicker_corner": 0.5, "integrator.method": "auto"})
    a = Emulator(prof, seed=5)
    rng = np.random.default_rng(2)
    m = rng.standard_normal((6, 6))
    a.program(Dense(m @ m.T / 6 + np.eye(6)), rng.standard_normal(6))
    a.run(3.0)
    a.calibrate(4, duration=50.0)
    b = Emulator(prof, seed=99)
    b.restore(a.snapshot())
    ra, rb = a.run(2.0, samples=3), b.run(2.0, samples=3)
    assert np.array_equal(ra.state, rb.state) and np.array_equal(ra.samples, rb.samples)
