"""Overdamped physics: time-averaged means, equilibrium covariances and transients vs OU theory.

Bounds come from the theory's own standard errors (stated next to each assertion), with fixed
seeds. The issue's headline check: ideal device, dense SPD A (N = 64, condition 50), kappa = 0.01,
the averaged relative error of the time-averaged mean matches sqrt((2 kappa / T) tr(A^-2)) / ||x*||
within 25 % for T in {50, 500}.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from protocol.drift import Dense, Diagonal, Factored
from tests.conftest import emulator, spd_matrix
from thermo_device.readout import time_average_variance

KAPPA = 0.01


@pytest.mark.parametrize("window", [50.0, 500.0])
@pytest.mark.parametrize("method", ["exact", "euler_maruyama"])
def test_time_average_error_matches_ou_theory(window: float, method: str) -> None:
    a, lam = spd_matrix(64, 50.0, seed=0)
    rng = np.random.default_rng(1)
    b = rng.standard_normal(64)
    x_star = np.linalg.solve(a, b)
    burn = 25.0  # start-up bias e^{-lam_min t} ||x*|| = e^-25: negligible
    seeds = 24 if method == "exact" else 8
    sq = []
    for seed in range(seeds):
        emu = emulator(seed, noise__kappa=KAPPA, integrator__method=method, integrator__dt=0.05)
        emu.program(Dense(a), b)
        r = emu.run(burn + window, burn_in=burn, reset=True)
        sq.append(np.sum((r.mean - x_star) ** 2))
    sq = np.array(sq)
    rms_rel = np.sqrt(sq.mean()) / np.linalg.norm(x_star)
    theory = np.sqrt(2 * KAPPA / window * np.sum(lam**-2.0)) / np.linalg.norm(x_star)
    # The bound. Statistical spread of the RMS over `seeds` runs: ||e||^2 is a weighted sum
    # of chi^2_1 with weights w = 1/lam^2, relative sd sqrt(2 sum w^2) / sum w per run.
    w = lam**-2.0
    rel_sd_rms = 0.5 * np.sqrt(2 * np.sum(w**2)) / np.sum(w) / np.sqrt(seeds)
    assert 0.25 > 4 * rel_sd_rms, "the 25% bound must exceed 4 standard errors to be meaningful"
    assert abs(rms_rel / theory - 1.0) < 0.25, (rms_rel, theory)
    if method == "exact":
        # Sharper: the exact variance of the discrete ADC average (spacing h), within 4 sd.
        n = round(window / 0.1)
        exact_ms = np.sum(time_average_variance(lam, KAPPA, window / n, n))
        assert abs(sq.mean() / exact_ms - 1.0) < 4 * 2 * rel_sd_rms, (sq.mean(), exact_ms)


def _cov_check(samples: np.ndarray, sigma: np.ndarray, z_max: float = 4.5) -> None:
    """Entrywise z-test of a sample covariance of independent Gaussian draws.

    Var(S_ij) = (Sigma_ii Sigma_jj + Sigma_ij^2) / n; with up to ~40 entries a 4.5-sigma bound
    has a false-alarm rate below 1e-3 (and the seeds are fixed).
    """
    n = samples.shape[0]
    s = np.cov(samples, rowvar=False)
    d = np.diag(sigma)
    se = np.sqrt((np.outer(d, d) + sigma**2) / n)
    z = np.abs(s - sigma) / se
    assert z.max() < z_max, (z.max(), s, sigma)


def test_equilibrium_covariance_symmetric_exact() -> None:
    a, _ = spd_matrix(6, 5.0, seed=3)
    b = np.arange(6.0)
    # samples spaced 3 / lam_min apart: correlation of products e^{-6} < 0.3%: independent enough
    emu = emulator(5, noise__kappa=0.5, adc__sample_interval=3.0)
    emu.program(Dense(a), b)
    emu.run(20.0, burn_in=20.0, reset=True)
    r = emu.run(3.0 * 20000, samples=20000)
    _cov_check(r.samples, 0.5 * np.linalg.inv(a))
    # the mean of the samples: sd of each coordinate sqrt(Sigma_ii / n)
    se = np.sqrt(np.diag(0.5 * np.linalg.inv(a)) / 20000)
    assert np.max(np.abs(r.samples.mean(0) - np.linalg.solve(a, b)) / se) < 4.5


def _non_normal(n: int, seed: int) -> np.ndarray:
    """Strongly non-normal, positive-stable: Q T Q^T with T upper triangular, big off-diagonal."""
    rng = np.random.default_rng(seed)
    t = np.triu(rng.uniform(1.0, 3.0, (n, n)), 1) + np.diag(np.linspace(1.0, 3.0, n))
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q @ t @ q.T


def test_equilibrium_covariance_nonsymmetric_matches_lyapunov() -> None:
    a = _non_normal(4, 7)
    assert np.linalg.norm(a @ a.T - a.T @ a) > 1.0  # really non-normal
    sigma = scipy.linalg.solve_continuous_lyapunov(a, 2 * 0.3 * np.eye(4))
    # a normal-drift shortcut (thermox) would give 0.3 * inv((A + A^T) / 2): make sure it differs
    shortcut = 0.3 * np.linalg.inv(0.5 * (a + a.T))
    assert np.max(np.abs(shortcut - sigma)) > 0.05 * np.max(np.abs(sigma))
    b = np.array([1.0, -2.0, 0.5, 3.0])
    emu = emulator(2, noise__kappa=0.3, adc__sample_interval=4.0)
    emu.program(Dense(a), b)
    emu.run(30.0, burn_in=30.0, reset=True)
    r = emu.run(4.0 * 20000, samples=20000)
    _cov_check(r.samples, sigma)
    se = np.sqrt(np.diag(sigma) / 20000)
    assert np.max(np.abs(r.samples.mean(0) - np.linalg.solve(a, b)) / se) < 4.5


@pytest.mark.parametrize("form", ["dense", "diagonal", "factored", "nonsymmetric"])
def test_transient_mean_is_exact(form: str) -> None:
    """kappa = 0: the exact integrator reproduces e^{-At}(x0 - x*) + x* to round-off."""
    rng = np.random.default_rng(11)
    n = 12
    if form == "dense":
        a, _ = spd_matrix(n, 20.0, seed=4)
        drift = Dense(a)
    elif form == "diagonal":
        d = rng.uniform(0.5, 3.0, n)
        a, drift = np.diag(d), Diagonal(d)
    elif form == "factored":
        j, h = rng.standard_normal((5, n)), np.diag(rng.uniform(0.5, 2.0, 5))
        a, drift = j.T @ h @ j + 0.3 * np.eye(n), Factored(j, h, 0.3)
    else:
        a = _non_normal(n, 5)
        drift = Dense(a)
    b = rng.standard_normal(n)
    x0 = rng.standard_normal(n)
    x_star = np.linalg.solve(a, b)
    emu = emulator(0, noise__kappa=0.0)
    emu.program(drift, b)
    emu.state = x0
    t = 0.7
    r = emu.run(t)
    expected = scipy.linalg.expm(-a * t) @ (x0 - x_star) + x_star
    np.testing.assert_allclose(r.state, expected, rtol=1e-9, atol=1e-10 * np.abs(expected).max())
    # the window mean is the average of the ADC samples at t_j = j t / n_adc, j = 1..n_adc
    n_adc = r.diagnostics["adc_samples"]
    ts = t * np.arange(1, n_adc + 1) / n_adc
    traj = [scipy.linalg.expm(-a * s) @ (x0 - x_star) + x_star for s in ts]
    np.testing.assert_allclose(r.mean, np.mean(traj, axis=0), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("method,order", [("euler_maruyama", 1), ("heun", 2)])
def test_stepping_transient_is_its_recursion(method: str, order: int) -> None:
    """kappa = 0: EM is x <- (I - hA) x + h b exactly; Heun is the 2nd-order Taylor recursion."""
    a, _ = spd_matrix(10, 10.0, seed=8)
    rng = np.random.default_rng(2)
    b, x0 = rng.standard_normal(10), rng.standard_normal(10)
    dt = 0.02
    emu = emulator(0, noise__kappa=0.0, integrator__method=method, integrator__dt=dt)
    emu.program(Dense(a), b)
    emu.state = x0
    r = emu.run(1.0)  # 50 steps (ADC every 5 steps)
    assert r.diagnostics["dt"] == pytest.approx(dt)
    m = np.eye(10) - dt * a + (0.5 * (dt * a) @ (dt * a) if order == 2 else 0.0)
    x_star = np.linalg.solve(a, b)
    x = x0.copy()
    for _ in range(50):
        x = m @ (x - x_star) + x_star
    np.testing.assert_allclose(r.state, x, rtol=1e-10, atol=1e-12)
    # and it converges to the exact transient at the scheme's order: error ratio for dt/2
    exact = scipy.linalg.expm(-a * 1.0) @ (x0 - x_star) + x_star
    emu2 = emulator(0, noise__kappa=0.0, integrator__method=method, integrator__dt=dt / 2)
    emu2.program(Dense(a), b)
    emu2.state = x0
    e1 = np.linalg.norm(r.state - exact)
    e2 = np.linalg.norm(emu2.run(1.0).state - exact)
    assert 2**order * 0.8 < e1 / e2 < 2**order * 1.25


@pytest.mark.parametrize("method", ["euler_maruyama", "heun"])
def test_stepping_stationary_covariance(method: str) -> None:
    """Each scheme's stationary covariance equals its discrete Lyapunov solution.

    EM: x' = (I - hA) x + sqrt(2 kappa h) xi. Heun (additive noise): x' = M x + sqrt(2 kappa h)
    (I - hA/2) xi with M = I - hA + (hA)^2 / 2. As h -> 0 both tend to kappa A^-1; EM's bias is
    kappa A^-1 (I - hA/2)^-1 (first order), Heun's is second order.
    """
    a, _ = spd_matrix(5, 4.0, seed=9)
    h, kappa = 0.1, 0.2
    eye = np.eye(5)
    if method == "euler_maruyama":
        m, g = eye - h * a, np.sqrt(2 * kappa * h) * eye
    else:
        m, g = eye - h * a + 0.5 * (h * a) @ (h * a), np.sqrt(2 * kappa * h) * (eye - 0.5 * h * a)
    sigma = scipy.linalg.solve_discrete_lyapunov(m, g @ g.T)
    emu = emulator(4, noise__kappa=kappa, integrator__method=method, integrator__dt=h,
                   adc__sample_interval=3.0)
    emu.program(Dense(a), np.zeros(5))
    emu.run(20.0, burn_in=20.0)
    r = emu.run(3.0 * 20000, samples=20000)
    _cov_check(r.samples, sigma)
    exact = kappa * np.linalg.inv(a)
    gap = np.max(np.abs(sigma - exact)) / np.max(np.abs(exact))
    assert gap < (0.2 if method == "euler_maruyama" else 0.02)


def test_exact_and_stepping_agree_in_distribution() -> None:
    """Small dt: EM/Heun window means agree with exact ones within their standard errors."""
    a, lam = spd_matrix(8, 10.0, seed=12)
    b = np.linspace(-1, 1, 8)
    window, burn = 200.0, 20.0
    per_coord_var = 2 * KAPPA / window * np.diag(np.linalg.inv(a) @ np.linalg.inv(a))
    means = {}
    for method in ["exact", "heun"]:
        ms = []
        for seed in range(12):
            emu = emulator(100 + seed, noise__kappa=KAPPA, integrator__method=method, integrator__dt=0.02)
            emu.program(Dense(a), b)
            ms.append(emu.run(burn + window, burn_in=burn, reset=True).mean)
        means[method] = np.array(ms)
    # difference of two means of 12 runs each: sd sqrt(2 var / 12); bound 4.5 sd per coordinate
    diff = means["exact"].mean(0) - means["heun"].mean(0)
    assert np.max(np.abs(diff) / np.sqrt(2 * per_coord_var / 12)) < 4.5
    # and the run-to-run spread itself agrees: the ratio of the summed variances is F-distributed
    # with about 11 * d_eff degrees of freedom each (d_eff: effective number of independent
    # coordinates, from the eigenvalues of the covariance); two-sided 99.9 % bounds.
    cov_mean = 2 * KAPPA / window * np.linalg.inv(a) @ np.linalg.inv(a)
    ev = np.linalg.eigvalsh(cov_mean)
    df = 11 * ev.sum() ** 2 / np.sum(ev**2)
    v_exact = means["exact"].var(0, ddof=1).sum()
    v_heun = means["heun"].var(0, ddof=1).sum()
    lo, hi = scipy.stats.f.ppf([0.0005, 0.9995], df, df)
    assert lo < v_exact / v_heun < hi
    del lam
