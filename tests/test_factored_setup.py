"""The exact Factored set-up (``factored.factored_eigenbasis``): both paths against a dense reference.

A = J^T H J + lambda I must be reproduced to round-off by u diag(mu) u^T + lambda I, whichever
path (Gram or Householder QR) the set-up takes: well conditioned, rank deficient, ill conditioned
and tall J. Small sizes, so the dense N x N reference is cheap.
"""

from __future__ import annotations

import numpy as np
import pytest

from thermo_device.factored import factored_eigenbasis


def _h(rng: np.random.Generator, m: int, rank: int) -> np.ndarray:
    b = rng.standard_normal((m, rank))
    return b @ b.T / m


def _case(kind: str) -> tuple[np.ndarray, np.ndarray, str]:
    rng = np.random.default_rng(7)
    if kind == "well":
        return rng.standard_normal((40, 200)), _h(rng, 40, 30), "gram"
    if kind == "rank-deficient":
        j = rng.standard_normal((40, 200))
        j[20:] = rng.standard_normal((20, 20)) @ j[:20] * 1e-3  # rows in the span of the first 20
        j[30:] = j[:10]
        return j, _h(rng, 40, 40), "qr"
    if kind == "ill":
        return rng.standard_normal((40, 200)) * np.logspace(0, -7, 40)[:, None], _h(rng, 40, 40), "qr"
    return rng.standard_normal((60, 25)), _h(rng, 60, 60), "qr"  # tall: m > N


@pytest.mark.parametrize("kind", ["well", "rank-deficient", "ill", "tall"])
def test_eigenbasis_reproduces_the_dense_drift(kind: str) -> None:
    j, h, expected_path = _case(kind)
    u, mu, path = factored_eigenbasis(j, h)
    assert path == expected_path
    n = j.shape[1]
    np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-12)
    dense = j.T @ h @ j
    scale = np.abs(np.linalg.eigvalsh(dense)).max()
    assert np.abs(u @ (mu[:, None] * u.T) - dense).max() <= 1e-12 * scale
    assert mu.min() >= 0.0
    lam = 1e-2 * scale
    b = np.random.default_rng(1).standard_normal(n)
    y = u.T @ b
    x = u @ (y / (mu + lam)) + (b - u @ y) / lam
    x_ref = np.linalg.solve(dense + lam * np.eye(n), b)
    assert np.linalg.norm(x - x_ref) <= 1e-10 * np.linalg.norm(x_ref)
