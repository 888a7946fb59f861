"""The exact Factored set-up (``factored.factored_eigenbasis``): both paths against a dense reference.

A = J^T H J + lambda I must be reproduced to round-off by u diag(mu) u^T + lambda I, whichever
path (Gram or Householder QR) the set-up takes: well conditioned, rank deficient, ill conditioned
and tall J. Small sizes, so the dense N x N reference is cheap.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from protocol.errors import NotStableError
from thermo_device.factored import check_h, factored_eigenbasis, h_eigenvalues


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
    basis, mu, path = factored_eigenbasis(j, h)
    assert path == expected_path
    u = basis.dense()
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


def test_gram_basis_is_implicit_and_applies_like_its_matrix() -> None:
    """The Gram path keeps u = J^T V as factors; its products agree with the formed matrix."""
    j, h, _ = _case("well")
    basis, _, path = factored_eigenbasis(j, h)
    assert path == "gram" and not hasattr(basis, "u")
    u = basis.dense()
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((3, j.shape[1])), rng.standard_normal((3, u.shape[1]))
    np.testing.assert_allclose(basis.project(x), x @ u, atol=1e-12)
    np.testing.assert_allclose(basis.expand(y), y @ u.T, atol=1e-12)


def _permuted_blocks(rng: np.random.Generator, sizes: list[int], negative: float = 0.0) -> np.ndarray:
    blocks = [(lambda b: b @ b.T)(rng.standard_normal((k, k))) for k in sizes]
    h = scipy.linalg.block_diag(*blocks)
    h[0, 0] -= negative  # the first block gets an eigenvalue below zero when negative is large
    p = rng.permutation(h.shape[0])
    return h[p][:, p]


def test_h_eigenvalues_blockwise_equal_the_dense_ones() -> None:
    """Equal and unequal block sizes, hidden by a permutation: the union of the blocks' spectra."""
    rng = np.random.default_rng(5)
    for sizes in ([10] * 12, [3, 1, 4, 4, 2, 10]):
        h = _permuted_blocks(rng, sizes)
        ref = np.linalg.eigvalsh(h)
        np.testing.assert_allclose(h_eigenvalues(h), ref, atol=1e-12 * np.abs(ref).max())


def test_check_h_refuses_an_indefinite_block_and_accepts_round_off() -> None:
    rng = np.random.default_rng(6)
    bad = _permuted_blocks(rng, [10] * 8, negative=50.0)
    with pytest.raises(NotStableError, match="not positive semidefinite"):
        check_h(bad)
    # a singular PSD block (a softmax GGN block has the all-ones null vector) passes
    p = np.full(5, 0.2)
    soft = np.diag(p) - np.outer(p, p)
    check_h(scipy.linalg.block_diag(soft, soft, soft))
