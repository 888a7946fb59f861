"""Factored drift at scale (N = 2000, m = 64, never N x N) and the underdamped RLC array."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import scipy.linalg

from protocol.drift import Dense, Diagonal, Factored
from protocol.errors import InvalidInputError, UnsupportedError
from tests.conftest import emulator, spd_matrix

N, M, DAMPING, KAPPA = 2000, 64, 0.5, 0.01


def _factored_problem():
    rng = np.random.default_rng(21)
    j = 3.0 * rng.standard_normal((M, N)) / np.sqrt(N)
    h = np.diag(rng.uniform(0.5, 2.0, M))
    g = rng.standard_normal(N)
    # Independent references (no N x N): the non-zero spectrum of J^T H J is that of the m x m
    # H^1/2 J J^T H^1/2; A^-1 g by Woodbury.
    hs = np.sqrt(np.diag(h))
    mu = np.linalg.eigvalsh(hs[:, None] * (j @ j.T) * hs[None, :])
    inner = np.diag(DAMPING / np.diag(h)) + j @ j.T
    x_star = (g - j.T @ np.linalg.solve(inner, j @ g)) / DAMPING
    tr_inv2 = np.sum((mu + DAMPING) ** -2.0) + (N - M) / DAMPING**2
    return j, h, g, x_star, tr_inv2, mu


def test_factored_mean_error_matches_theory_without_n_by_n() -> None:
    j, h, g, x_star, tr_inv2, _ = _factored_problem()
    window, burn = 200.0, 40.0  # burn-in bias e^{-0.5 * 40} = 2e-9
    sq = []
    warm = emulator(0, noise__kappa=KAPPA)  # compile the kernels outside the traced region
    warm.program(Factored(j, h, DAMPING), g)
    warm.run(1.0)
    tracemalloc.start()
    for seed in range(8):
        emu = emulator(seed, noise__kappa=KAPPA)
        emu.program(Factored(j, h, DAMPING), g)
        r = emu.run(burn + window, burn_in=burn, reset=True)
        sq.append(np.sum((r.mean - x_star) ** 2))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # An N x N float64 matrix is 32 MB; everything we allocate is O(N m) plus one 8 MB noise block.
    assert peak < N * N * 8 / 3, f"peak {peak / 1e6:.1f} MB suggests an N x N allocation"
    theory = np.sqrt(2 * KAPPA / window * tr_inv2)
    rms = np.sqrt(np.mean(sq))
    # ~2000 nearly equal weights: the RMS over 8 runs has relative sd ~ 0.5 * sqrt(2 / 2000 / 8)
    # = 0.4 %; 25 % is the bound, 5 % still > 10 sd.
    assert abs(rms / theory - 1.0) < 0.05, (rms, theory)


def test_factored_equilibrium_covariance_along_directions() -> None:
    """Var(u^T x) = kappa u^T A^-1 u for a few directions u (A^-1 u by Woodbury)."""
    j, h, g, x_star, _, _ = _factored_problem()
    rng = np.random.default_rng(5)
    u = rng.standard_normal((3, N))
    u[0] = j[0] / np.linalg.norm(j[0])  # one direction inside the row space of J
    u[1:] /= np.linalg.norm(u[1:], axis=1, keepdims=True)
    inner = np.diag(DAMPING / np.diag(h)) + j @ j.T
    a_inv_u = (u - (j.T @ np.linalg.solve(inner, j @ u.T)).T) / DAMPING
    var_theory = KAPPA * np.sum(u * a_inv_u, axis=1)
    k = 4000
    emu = emulator(9, noise__kappa=KAPPA, adc__sample_interval=8.0)  # 8 tau = 4 / lambda_min
    emu.program(Factored(j, h, DAMPING), g)
    emu.run(40.0, burn_in=40.0, reset=True)
    r = emu.run(8.0 * k, samples=k)
    proj = r.samples @ u.T
    var_hat = proj.var(axis=0, ddof=1)
    # sample variance of n Gaussian draws: sd = var sqrt(2 / (n - 1))
    z = np.abs(var_hat / var_theory - 1.0) / np.sqrt(2 / (k - 1))
    assert z.max() < 4.5, (var_hat, var_theory)
    mean_z = np.abs(proj.mean(0) - u @ x_star) / np.sqrt(var_theory / k)
    assert mean_z.max() < 4.5


def test_factored_matches_dense_in_distribution_small() -> None:
    """Same A as Factored and as Dense, kappa = 0: identical transients (exact propagation)."""
    rng = np.random.default_rng(3)
    j, h = rng.standard_normal((4, 30)), np.eye(4)
    g = rng.standard_normal(30)
    a = j.T @ j + 0.2 * np.eye(30)
    states = []
    for drift in (Factored(j, h, 0.2), Dense(a)):
        emu = emulator(0, noise__kappa=0.0)
        emu.program(drift, g)
        emu.state = np.linspace(-1, 1, 30)
        states.append(emu.run(2.5).state)
    np.testing.assert_allclose(states[0], states[1], rtol=1e-9, atol=1e-11)


def _rlc(n: int = 4):
    c, _ = spd_matrix(n, 3.0, seed=31, lo=0.5)
    return c


@pytest.mark.parametrize("method", ["exact", "baoab", "euler_maruyama"])
def test_underdamped_stationary_covariance(method: str) -> None:
    """v ~ N(0, kappa C^-1): sampling the board inverts C (fluctuation-dissipation, issue 13: the
    law is independent of R; the old test asserted kappa R C^-1 at R = 1, where both agree, and
    now runs at R = 2, where they differ by 2x)."""
    c = _rlc()
    kappa, r_ohm, l_h = 0.2, 2.0, 1.0
    emu = emulator(3, device__dynamics="underdamped", noise__kappa=kappa, integrator__method=method,
                   integrator__dt=0.01, underdamped__resistance=r_ohm, underdamped__inductance=l_h,
                   adc__sample_interval=12.0)
    emu.program(Dense(c), None)
    n_samples = 6000 if method == "exact" else 2500
    emu.run(60.0, burn_in=60.0)
    res = emu.run(12.0 * n_samples, samples=n_samples)
    s = np.cov(res.samples, rowvar=False)
    sigma = kappa * np.linalg.inv(c)
    if method == "euler_maruyama":
        # EM is biased at any fixed dt; its own stationary covariance is the discrete Lyapunov
        # solution for z' = (I - h F) z + sqrt(h) G xi.
        from thermo_device.dynamics import underdamped_system

        sysm = underdamped_system(Dense(c), np.zeros(4), l_h, r_ohm)  # D is for kappa = 1
        h = res.diagnostics["dt"]
        sigma = scipy.linalg.solve_discrete_lyapunov(np.eye(8) - h * sysm.F, kappa * h * sysm.D)[:4, :4]
    d = np.diag(sigma)
    se = np.sqrt((np.outer(d, d) + sigma**2) / n_samples)
    z = np.abs(s - sigma) / se
    assert z.max() < 4.5, z.max()
    assert res.state.shape == (8,)  # [v, i]


def test_underdamped_current_covariance_exact_lyapunov() -> None:
    """The model's full 2N stationary covariance (F S + S F^T = kappa D) is kappa diag(C^-1, L^-1)
    for R = 0.5 (equipartition; the old, wrong law was kappa R C^-1 and kappa R / L)."""
    from thermo_device.dynamics import underdamped_system

    c = _rlc(3)
    sysm = underdamped_system(Dense(c), np.zeros(3), 2.0, 0.5)
    s = scipy.linalg.solve_continuous_lyapunov(sysm.F, 0.3 * sysm.D)
    np.testing.assert_allclose(s[:3, :3], 0.3 * np.linalg.inv(c), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(s[3:, 3:], 0.3 / 2.0 * np.eye(3), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(s[:3, 3:], 0.0, atol=1e-12)  # v and i uncorrelated at equilibrium


def test_underdamped_refuses_bias_and_factored() -> None:
    emu = emulator(0, device__dynamics="underdamped")
    with pytest.raises(InvalidInputError, match="bias must be zero"):
        emu.program(Dense(_rlc()), np.ones(4))
    with pytest.raises(UnsupportedError):
        emu.program(Factored(np.ones((2, 4)), np.eye(2), 1.0), None)
    emu.program(Diagonal(np.array([1.0, 2.0])), None)  # diagonal capacitances are fine
    assert emu.run(1.0).mean.shape == (2,)
