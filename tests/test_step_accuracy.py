"""The stepping integrators' accuracy bound (``integrator.variance_tol``, programming.step_bound)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from thermo_device import Diagonal, Emulator, load_profile
from thermo_device.dynamics import overdamped_system
from thermo_device.programming import step_bound


def heun_variance_ratio(z: float) -> float:
    """Heun's stationary variance over the exact kappa / a, from its one-step recursion on one OU
    mode: x' = R x + (1 - z/2) s dW with R = 1 - z + z^2/2 (additive noise)."""
    r = 1.0 - z + 0.5 * z * z
    return 2.0 * z * (1.0 - 0.5 * z) ** 2 / (1.0 - r * r)


def em_variance_ratio(z: float) -> float:
    return 2.0 / (2.0 - z)


@pytest.mark.parametrize("scheme,ratio", [("heun", heun_variance_ratio), ("euler_maruyama", em_variance_ratio)])
@pytest.mark.parametrize("tol", [1e-3, 5e-3, 2e-2])
def test_the_bound_keeps_the_fastest_mode_within_tolerance(scheme, ratio, tol) -> None:
    rates = np.array([0.01, 0.3, 7.0])
    profile = load_profile("ideal", {"integrator.method": scheme, "integrator.dt": 1.0,
                                     "integrator.variance_tol": tol})
    dt = step_bound(profile, overdamped_system(Diagonal(rates), np.zeros(3)), scheme)
    z = rates.max() * dt
    assert abs(ratio(z) - 1.0) <= tol * (1.0 + 1e-9)
    # and it is not needlessly short: the error at the bound is the tolerance to leading order
    assert abs(ratio(z) - 1.0) >= 0.8 * tol


def test_off_by_default_and_the_profile_step_still_caps() -> None:
    rates = np.array([0.01, 7.0])
    system = overdamped_system(Diagonal(rates), np.zeros(2))
    free = load_profile("ideal", {"integrator.method": "heun", "integrator.dt": 0.05})
    assert step_bound(free, system, "heun") == 0.05
    loose = load_profile("ideal", {"integrator.method": "heun", "integrator.dt": 0.01, "integrator.variance_tol": 0.1})
    assert step_bound(loose, system, "heun") == 0.01


def test_the_emulator_steps_at_the_bound_and_its_variance_follows_heun() -> None:
    """A fast mode (a = 4) under the bound: the run's step is the bound cut to the ADC grid, and
    the sampled stationary variance matches Heun's discrete law (z-test on a variance from K
    independent runs: se = var sqrt(2 / (K - 1)))."""
    a, kappa, k = 4.0, 0.01, 2000
    profile = load_profile("ideal", {"integrator.method": "heun", "integrator.dt": 1.0,
                                     "integrator.variance_tol": 5e-3, "noise.kappa": kappa})
    emu = Emulator(profile, seed=11)
    emu.program(Diagonal(np.array([a])), np.zeros(1))
    finals = []
    for _ in range(k):
        emu.state = np.zeros(1)
        r = emu.run(3.0)  # 12 relaxation times: stationary
        finals.append(r.state[0])
    dt = r.diagnostics["dt"]
    bound = 2.0 * math.sqrt(5e-3) / a
    assert dt <= bound and dt > 0.5 * bound
    expected = kappa / a * heun_variance_ratio(a * dt)
    got = float(np.var(finals, ddof=1))
    assert abs(got / expected - 1.0) < 4.0 * math.sqrt(2.0 / (k - 1))
