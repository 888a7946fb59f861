"""1/f noise on the exact modal path (issue 15 item 3, ``thermo_device/flicker_exact.py``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg

from thermo_device import Diagonal, Emulator, Factored, load_profile
from thermo_device.flicker_exact import FlickerModalPropagator, flicker_coefficients
from thermo_device.noise import flicker_poles


def _van_loan(a: float, poles: np.ndarray, v: float, kappa: float, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """(Phi, Q) of z = [u, e_1..e_P] by the (2 + 2P)-dimensional Van Loan exponential: an
    independent reference (one dense expm of the whole augmented system)."""
    p = poles.shape[0]
    f = np.zeros((1 + p, 1 + p))
    f[0, 0] = a
    f[0, 1:] = -1.0  # du = (-a u + sum e) dt
    f[np.arange(1, 1 + p), np.arange(1, 1 + p)] = poles
    d = np.diag(np.concatenate([[2.0 * kappa], 2.0 * poles * v]))
    n = 1 + p
    block = np.zeros((2 * n, 2 * n))
    block[:n, :n] = -f
    block[:n, n:] = d
    block[n:, n:] = f.T
    e = scipy.linalg.expm(block * tau)
    phi = e[:n, :n]
    q = e[:n, n:] @ phi.T
    return phi, 0.5 * (q + q.T)


@pytest.mark.parametrize("tau", [0.01, 0.3, 4.0])
def test_coefficients_match_the_augmented_system(tau: float) -> None:
    poles = np.array([0.05, 0.4, 1.0, 3.0])
    rates = np.array([0.02, 0.4, 1.0, 1.0 + 1e-9, 7.0])  # equal to a pole, and nearly so
    v, kappa = 0.3, 0.7
    k = flicker_coefficients(rates, poles, v, kappa, tau)
    for i, a in enumerate(rates):
        phi, q = _van_loan(float(a), poles, v, kappa, tau)
        np.testing.assert_allclose(k["alpha"][i], phi[0, 0], rtol=1e-10)
        np.testing.assert_allclose(k["beta"][i], phi[0, 1:], rtol=1e-9)
        np.testing.assert_allclose(k["rho"], np.diag(phi)[1:], rtol=1e-12)
        # the noise the kernel draws: u gets s xi + sum c_p zeta_p, e_p gets sigma_p zeta_p
        np.testing.assert_allclose(k["sigma"] ** 2, np.diag(q)[1:], rtol=1e-9)
        np.testing.assert_allclose(k["c"][i] * k["sigma"], q[0, 1:], rtol=1e-7, atol=1e-14)
        np.testing.assert_allclose(k["s"][i] ** 2 + np.sum(k["c"][i] ** 2), q[0, 0], rtol=1e-7)


def test_the_stationary_variance_of_every_cell_matches_theory() -> None:
    """A Factored drift (row-space modes and the carried complement): after a burn-in of 60
    correlation times of the slowest pole, each cell's variance over K independent runs against
    diag(U diag(var_a) U^T + (I - U U^T) var_lambda), var_a = kappa / a + sum_p v / (a (a + g_p)).
    z-test per cell: se of a variance = var sqrt(2 / (K - 1))."""
    kappa, corner, fmin, n_poles, k = 0.01, 0.2, 0.01, 4, 1500
    profile = load_profile("ideal", {"noise.kappa": kappa, "noise.flicker_corner": corner,
                                     "noise.flicker_min_freq": fmin, "noise.flicker_poles": n_poles,
                                     "integrator.method": "auto"})
    rng = np.random.default_rng(2)
    j = rng.standard_normal((3, 10)) / 3.0
    lam = 0.5
    emu = Emulator(profile, seed=5)
    emu.program(Factored(j, np.eye(3), lam), np.zeros(10))
    assert isinstance(emu.propagator, FlickerModalPropagator)
    burn = 60.0 / (2.0 * math.pi * fmin)
    states = np.array([emu.run(burn + 1.0, burn_in=burn).state for _ in range(k)])
    poles = flicker_poles(kappa, corner, fmin, n_poles)

    def var(a: float) -> float:
        return kappa / a + float(np.sum(poles.variance / (a * (a + poles.rates))))

    mu, u = np.linalg.eigh(j.T @ j + lam * np.eye(10))
    cov = (u * np.array([var(float(m)) for m in mu])) @ u.T
    expected = np.diag(cov)
    z = (states.var(axis=0, ddof=1) / expected - 1.0) / math.sqrt(2.0 / (k - 1))
    assert np.all(np.abs(z) < 4.0), z
    # the flicker part is a real share of it
    assert var(lam) > 1.5 * kappa / lam


def test_exact_and_stepped_1f_agree_in_distribution() -> None:
    """Window means of the exact path and of Heun at a small step: same mean and spread (two-
    sample z-tests over K runs each, fixed start)."""
    base = {"noise.kappa": 0.02, "noise.flicker_corner": 0.5, "noise.flicker_min_freq": 0.05,
            "noise.flicker_poles": 3}
    d = np.array([0.3, 1.0, 2.5])
    b = np.array([0.2, -0.4, 0.6])
    k = 1500
    out = {}
    for method in ("exact", "heun"):
        emu = Emulator(load_profile("ideal", {**base, "integrator.method": method, "integrator.dt": 0.005}), seed=9)
        emu.program(Diagonal(d), b)
        emu.run(400.0, burn_in=399.0)  # stationary, 1/f poles included
        out[method] = np.array([emu.run(4.0).mean for _ in range(k)])
    ex, st = out["exact"], out["heun"]
    se_mean = np.sqrt(ex.var(0, ddof=1) / k + st.var(0, ddof=1) / k)
    assert np.all(np.abs(ex.mean(0) - st.mean(0)) < 4.0 * se_mean)
    ratio = ex.var(0, ddof=1) / st.var(0, ddof=1)
    assert np.all(np.abs(np.log(ratio)) < 4.0 * math.sqrt(4.0 / (k - 1)))  # se of a log variance ratio


def test_the_1f_state_survives_a_snapshot_bit_for_bit() -> None:
    profile = load_profile("ideal", {"noise.kappa": 1e-3, "noise.flicker_corner": 0.3, "integrator.method": "auto"})
    emu = Emulator(profile, seed=4)
    emu.program(Diagonal(np.linspace(0.5, 2.0, 5)), np.ones(5))
    emu.run(20.0)
    snap = emu.snapshot()
    a = [emu.run(5.0, samples=3).samples for _ in range(2)]
    other = Emulator(profile, seed=123)
    other.restore(snap)
    b = [other.run(5.0, samples=3).samples for _ in range(2)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_capacitance_mismatch_or_rails_keep_1f_stepping() -> None:
    for extra in ({"mismatch.capacitance_rel_std": 0.02}, {"range.rail": 5.0}):
        emu = Emulator(load_profile("ideal", {"noise.kappa": 1e-3, "noise.flicker_corner": 0.3,
                                              "integrator.method": "auto", **extra}), seed=0)
        emu.program(Diagonal(np.ones(3)), np.ones(3))
        assert emu.run(2.0).diagnostics["method"] == "heun"
