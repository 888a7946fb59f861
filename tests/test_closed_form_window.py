"""The closed-form readout window of the exact modal propagator (thermo_device/window_closed_form.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from thermo_device import Diagonal, Emulator, load_profile
from thermo_device.window_closed_form import window_transition


def _brute(rate: float, kappa: float, h: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """F^n and Q_n by summing the recursion's terms one by one (independent of the doubling)."""
    rho = math.exp(-rate * h)
    s2 = kappa * -math.expm1(-2.0 * rate * h) / rate  # 1 - rho^2 without cancellation
    f = np.array([[rho**n, 0.0], [sum(rho**k for k in range(1, n + 1)), 1.0]])
    q = np.zeros((2, 2))
    for j in range(1, n + 1):  # xi_j enters w_k (k >= j) with weight s rho^(k-j)
        v = np.array([rho ** (n - j), sum(rho ** (k - j) for k in range(j, n + 1))])
        q += s2 * np.outer(v, v)
    return f, q


@pytest.mark.parametrize("n", [1, 2, 7, 200])
def test_transition_matches_the_recursion_term_by_term(n: int) -> None:
    rates = np.array([1e-6, 1e-3, 0.3, 2.0, 40.0])
    f, q = window_transition(rates, 0.7, 0.05, n)
    for i, a in enumerate(rates):
        fb, qb = _brute(float(a), 0.7, 0.05, n)
        np.testing.assert_allclose(f[i], fb, rtol=1e-11, atol=1e-300)
        np.testing.assert_allclose(q[i], qb, rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize("window", ["closed_form", "sampled"])
def test_window_mean_and_state_have_the_exact_law(window: str) -> None:
    """K runs from a fixed start: the window average's and final state's sample means and
    variances against the exact law (z-tests: se of a mean sqrt(var / K), of a variance
    var sqrt(2 / (K - 1)))."""
    rates = np.array([0.02, 0.3, 3.0])
    kappa, duration, h, k = 0.05, 6.0, 0.1, 3000
    b = np.array([0.5, -1.0, 2.0])
    start = np.array([1.0, 0.0, -1.0])
    emu = Emulator(load_profile("ideal", {"noise.kappa": kappa, "integrator.window": window}), seed=7)
    emu.program(Diagonal(rates), b)
    means, states = [], []
    for _ in range(k):
        emu.state = start
        r = emu.run(duration)
        means.append(r.mean)
        states.append(r.state)
    means, states = np.array(means), np.array(states)
    n = round(duration / h)
    f, q = window_transition(rates, kappa, h, n)
    target = b / rates
    d = start - target
    exp_state, exp_mean = target + f[:, 0, 0] * d, target + f[:, 1, 0] * d / n
    var_state, var_mean = q[:, 0, 0], q[:, 1, 1] / n**2
    for got, mu, var in ((states, exp_state, var_state), (means, exp_mean, var_mean)):
        z_mean = (got.mean(0) - mu) / np.sqrt(var / k)
        z_var = (got.var(0, ddof=1) / var - 1.0) / math.sqrt(2.0 / (k - 1))
        assert np.all(np.abs(z_mean) < 4.0), z_mean
        assert np.all(np.abs(z_var) < 4.0), z_var


def test_closed_form_is_used_only_where_it_is_exact() -> None:
    """Returned samples and second moments keep the sampled path; a noiseless run is the same
    number either way (up to round-off)."""
    out = {}
    for window in ("closed_form", "sampled"):
        emu = Emulator(load_profile("ideal", {"noise.kappa": 0.0, "integrator.window": window}), seed=0)
        emu.program(Diagonal(np.array([0.5, 2.0])), np.array([1.0, 1.0]))
        r = emu.run(10.0, burn_in=1.0)
        s = emu.run(10.0, samples=5, second_moment=True)
        out[window] = (r.mean, s.samples)
    np.testing.assert_allclose(out["closed_form"][0], out["sampled"][0], rtol=1e-12)
    assert np.array_equal(out["closed_form"][1], out["sampled"][1])
