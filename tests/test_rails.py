"""Rails by detection (issue 15 item 4, ``thermo_device/rails.py``)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import spd_matrix
from thermo_device import Dense, Diagonal, Emulator, Factored, load_profile
from thermo_device.rails import RailGuard


def _pair(overrides: dict, drift, b, seed: int = 3):
    out = []
    for rail in (0.0, 1.0):
        emu = Emulator(load_profile("ideal", {**overrides, "range.rail": rail}), seed=seed)
        emu.program(drift, b)
        out.append([emu.run(20.0, burn_in=5.0, samples=4), emu.run(10.0)])
    return out


@pytest.mark.parametrize("form", ["dense", "factored"])
def test_far_from_the_rails_the_run_is_the_exact_one_bit_for_bit(form: str) -> None:
    """With the rails out of reach the guard changes nothing: the same seed gives the same bits
    as the profile without rails, and nothing is stepped."""
    rng = np.random.default_rng(0)
    if form == "dense":
        a, _ = spd_matrix(8, 10.0, seed=1)
        drift = Dense(a)
    else:
        drift = Factored(rng.standard_normal((3, 8)), np.eye(3), damping=0.5)
    b = 0.1 * rng.standard_normal(8)
    free, railed = _pair({"noise.kappa": 1e-4}, drift, b)
    for f, r in zip(free, railed, strict=True):
        assert np.array_equal(f.mean, r.mean) and np.array_equal(f.state, r.state)
        assert r.diagnostics["method"] == "exact" and r.diagnostics["stepped_for_rails"] is False


def test_within_reach_the_run_is_stepped_and_clipped() -> None:
    emu = Emulator(load_profile("ideal", {"noise.kappa": 1e-4, "range.rail": 1.0}), seed=0)
    emu.program(Diagonal(np.ones(2)), np.array([0.5, 1.2]))  # the second fixed point is past the rail
    r = emu.run(20.0, burn_in=5.0, samples=20)
    assert r.diagnostics["stepped_for_rails"] is True
    assert np.abs(r.samples).max() <= 1.0 and r.mean[1] == pytest.approx(1.0, abs=1e-3)


def test_noise_alone_can_bring_the_rails_within_reach() -> None:
    """A fixed point at 0.5 with sd sqrt(kappa / a) = 0.05: safe for the mean, but z (about 7)
    standard deviations of noise reach 0.85 and a rail at 0.8 makes the guard step."""
    for rail, stepped in ((1.0, False), (0.8, True)):
        emu = Emulator(load_profile("ideal", {"noise.kappa": 2.5e-3, "range.rail": rail}), seed=0)
        emu.program(Diagonal(np.ones(2)), np.array([0.5, 0.0]))
        emu.state = np.array([0.5, 0.0])
        assert emu.run(5.0).diagnostics["stepped_for_rails"] is stepped


def test_the_bound_holds_on_exact_samples() -> None:
    """The guard's reach bounds every sample of many exact runs (the law it is derived from)."""
    a, _ = spd_matrix(6, 20.0, seed=2)
    b = 0.2 * np.random.default_rng(4).standard_normal(6)
    emu = Emulator(load_profile("ideal", {"noise.kappa": 1e-3, "range.rail": 10.0}), seed=1)
    emu.program(Dense(a), b)
    guard = emu.propagator
    assert isinstance(guard, RailGuard)
    start = np.full(6, 0.5)
    reach = guard.reach(start, 30.0, 1e-3)
    peak = 0.0
    for _ in range(200):
        emu.state = start
        peak = max(peak, float(np.abs(emu.run(30.0, samples=300).samples).max()))
    assert peak < reach
    # and it is not vacuous: the fixed point and the start distance dominate it
    assert reach < 3.0 * (np.abs(guard.fixed_point).max() + np.linalg.norm(start - guard.fixed_point) + 0.5)
