"""The Factored drift's eigenbasis: J^T H J on the row space of J, in O(N m^2), never N x N.

``factored_eigenbasis`` takes it from the m x m Gram matrix J J^T when J is well conditioned (one
SYRK and one GEMM over N, plus m x m work) and from a Householder QR of J^T otherwise; either way
the result is certified a posteriori, so the exact propagation built on it stays exact.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

# Gram path of ``factored_eigenbasis``: used when cond(J J^T) <= 1 / GRAM_RCOND (cond(J) <= 1e4),
# where the 1 / s_i scaling amplifies eigh's round-off by at most ~1e8 eps relative; the result is
# then checked against CERTIFY_TOL and replaced by the QR path if it misses.
GRAM_RCOND = 1e-8
CERTIFY_TOL = 1e-11  # relative residual of orthonormality and of the eigen-equation (probed)
CERTIFY_PROBES = 4  # random probe vectors for the a-posteriori check


def _certify(j: np.ndarray, h: np.ndarray, u: np.ndarray, mu: np.ndarray) -> float:
    """Largest relative residual of u^T u = I and of J^T H J u = u diag(mu), on random probes.

    Probing with Gaussian z estimates the Frobenius norms of both residual matrices (E[|E z|^2] =
    |E|_F^2) at O((m + r) N) cost, so the full r x r product u^T u (another O(N r^2)) is never
    formed. The probe seed is fixed: the check must not consume the emulator's noise stream.
    """
    r = u.shape[1]
    if r == 0:
        return 0.0
    z = np.random.default_rng(12345).standard_normal((r, CERTIFY_PROBES))
    uz = u @ z
    orth = np.linalg.norm(u.T @ uz - z) / np.linalg.norm(z)
    scale = max(float(np.abs(mu).max()), 1e-300)
    eig = np.linalg.norm(j.T @ (h @ (j @ uz)) - u @ (mu[:, None] * z)) / (scale * np.linalg.norm(z))
    return float(max(orth, eig))


def factored_eigenbasis(j: np.ndarray, h: np.ndarray, *, psd: bool = True) -> tuple[np.ndarray, np.ndarray, str]:
    """Orthonormal u (N x r) and mu (r,) >= 0 with J^T H J = u diag(mu) u^T, r = min(m, N).

    span(u) contains the row space of J; outside it J^T H J vanishes, so A = J^T H J + lambda I
    acts there as lambda I (as it does on the mu = 0 columns). ``h`` must be symmetric PSD
    (``dynamics._check_h``). Returns (u, mu, path), path "gram", "qr" or "empty" (m = 0).

    Gram path (the fast one, O(N m^2) in one SYRK and one GEMM): J J^T = U S^2 U^T by eigh, then
    J = U S V^T with V = J^T U S^-1, and J^T H J = V (S U^T H U S) V^T, so the m x m eigenproblem
    S U^T H U S = W M W^T gives u = J^T (U S^-1 W), mu = M. This squares J's condition number, so
    it is taken only when every s_i^2 >= GRAM_RCOND s_max^2 (J of full row rank and cond(J) <=
    1e4), and its result is certified (``_certify``) to CERTIFY_TOL; otherwise, and for m > N:
    QR path (backward stable at any rank, O(N m^2) with a larger constant): J^T = Q R by
    Householder, J^T H J = Q (R H R^T) Q^T, R H R^T = W M W^T, u = Q W. A rank-deficient J just
    yields mu = 0 columns (rate lambda, exactly as the complement), so no rank threshold enters.

    This replaced a thin SVD of J (gesdd), which took 3x the Gram path's time at m = 640, N = 4510
    (docs/benchmarks.md, "Exact Factored set-up").

    ``psd=False`` (a symmetric H that converter codes tipped slightly indefinite) returns mu as
    computed, negative values included, so the caller sees the drift's true smallest rate.
    """
    m, n = j.shape
    if m == 0:
        return np.zeros((n, 0)), np.zeros(0), "empty"
    u, mu, path = _gram_or_qr(j, h)
    if not psd:
        return u, mu, path
    # Curvature at round-off level of the largest one is zero (a rank-deficient J or H): a
    # deterministic 0 rather than +-1e-17, so damping 0 on a singular GGN is always refused.
    mu = np.where(mu > max(m, n) * np.finfo(np.float64).eps * max(float(mu.max()), 0.0), mu, 0.0)
    return u, mu, path


def _gram_or_qr(j: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    m, n = j.shape
    if m <= n:
        g = j @ j.T  # NumPy dispatches A A^T to SYRK: half a GEMM
        s2, us = np.linalg.eigh(g)
        if s2[0] >= GRAM_RCOND * s2[-1] > 0.0:
            s = np.sqrt(s2)
            k = (s[:, None] * (us.T @ h @ us)) * s[None, :]
            mu, w = np.linalg.eigh(0.5 * (k + k.T))
            u = j.T @ ((us / s) @ w)
            if _certify(j, h, u, mu) <= CERTIFY_TOL:
                return u, mu, "gram"
    q, rr = scipy.linalg.qr(j.T, mode="economic", check_finite=False)
    k = rr @ h @ rr.T
    mu, w = np.linalg.eigh(0.5 * (k + k.T))
    return q @ w, mu, "qr"
