"""Thermodynamic linear algebra: solve and inverse, with their batch-means error estimates."""

from __future__ import annotations

import numpy as np

import host
from protocol.drift import Factored
from tests.conftest import spd_matrix


def test_solve_error_is_within_its_estimate() -> None:
    a, _ = spd_matrix(16, 10.0, seed=2)
    b = np.random.default_rng(0).standard_normal(16)
    x = np.linalg.solve(a, b)
    res = host.solve(a, b, duration=400.0, burn_in=20.0, batches=20, overrides={"noise.kappa": 0.01}, seed=1)
    # per-coordinate z-scores against the reported standard errors (t with 19 dof; 5 is > 99.9 %)
    z = np.abs(res.value - x) / res.std_error
    assert z.max() < 5.0
    # and the estimate is of the size the OU theory predicts: sqrt(2 kappa tr(A^-2) / T)
    theory = np.sqrt(2 * 0.01 * np.trace(np.linalg.matrix_power(np.linalg.inv(a), 2)) / 400.0)
    est = np.sqrt(np.sum(res.std_error**2))
    assert 0.5 < est / theory < 2.0  # 20 batches: the estimate's own relative sd is ~ 1/sqrt(2*19)


def test_solve_accepts_factored() -> None:
    rng = np.random.default_rng(1)
    j = rng.standard_normal((3, 40))
    g = rng.standard_normal(40)
    res = host.solve(Factored(j, np.eye(3), 1.0), g, duration=200.0, overrides={"noise.kappa": 1e-6})
    x = np.linalg.solve(j.T @ j + np.eye(40), g)
    assert np.linalg.norm(res.value - x) / np.linalg.norm(x) < 1e-3


def test_inverse_from_equilibrium_covariance() -> None:
    a, _ = spd_matrix(5, 4.0, seed=6)
    res = host.inverse(a, duration=4000.0, batches=10, overrides={"noise.kappa": 0.1, "adc.sample_interval": 0.5})
    a_inv = np.linalg.inv(a)
    z = np.abs(res.value - a_inv) / res.std_error
    assert z.max() < 6.0  # t with 9 dof, 25 entries: 6 sd is a > 99.9 % bound
    assert np.linalg.norm(res.value - a_inv) / np.linalg.norm(a_inv) < 0.1
