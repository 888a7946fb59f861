"""The Factored drift's eigenbasis: J^T H J on the row space of J, in O(N m^2), never N x N.

``factored_eigenbasis`` takes it from the m x m Gram matrix G = J J^T when J is well conditioned
(one SYRK over N, then m x m work: a Cholesky and one eigh) and from a Householder QR of J^T
otherwise; either way the result is certified a posteriori, so the exact propagation built on it
stays exact. The Gram path keeps the basis implicit (``FactorBasis``: u = J^T V, applied in
O(N m) and never formed as an N x r matrix).

``check_h`` validates H block by block: a GGN's H is block-diagonal per sample (softmax
cross-entropy: one k x k block per example), so its eigenvalues are those of the blocks.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from scipy.sparse.csgraph import connected_components

from protocol.drift import SYMMETRY_RTOL
from protocol.errors import NotStableError

# Gram path of ``factored_eigenbasis``: refused when the Cholesky factor of G = J J^T shows
# cond(G) >= 1 / GRAM_RCOND on its diagonal (a lower bound of the condition number), where the
# Gram route would square away more digits than the certificate tolerates; the result is then
# checked against CERTIFY_TOL and replaced by the QR path if it misses.
GRAM_RCOND = 1e-8
CERTIFY_TOL = 1e-11  # relative residual of orthonormality and of the eigen-equation (probed)
CERTIFY_PROBES = 4  # random probe vectors for the a-posteriori check
H_PSD_RTOL = 1e-10  # an eigenvalue of H below -H_PSD_RTOL * max|eig| makes H indefinite


class MatrixBasis:
    """An orthonormal N x r basis held as its matrix u."""

    def __init__(self, u: np.ndarray) -> None:
        self.u = np.ascontiguousarray(u)

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    # Two spellings of each product: BLAS rounds x @ u and u^T @ x differently, and the code
    # before the basis became an object used both (columns in with_bias and to_modes, rows in
    # from_modes); same seed = same bits holds across the change.
    def project(self, x: np.ndarray) -> np.ndarray:
        """u^T x for x of shape (N,)."""
        return self.u.T @ x

    def expand(self, y: np.ndarray) -> np.ndarray:
        """u y for y of shape (r,)."""
        return self.u @ y

    def project_rows(self, x: np.ndarray) -> np.ndarray:
        """x u for x of shape (N,) or (K, N)."""
        return x @ self.u

    def expand_rows(self, y: np.ndarray) -> np.ndarray:
        """y u^T for y of shape (r,) or (K, r)."""
        return y @ self.u.T

    def dense(self) -> np.ndarray:
        return self.u


class FactorBasis:
    """The orthonormal basis u = J^T V (N x r) kept as its factors J (m x N) and V (m x r).

    Applying it costs O(N m), as the formed matrix would (r = m), but forming it was an O(N m^2)
    GEMM per program: 30% of the exact set-up at the digits shape.
    """

    def __init__(self, j: np.ndarray, v: np.ndarray) -> None:
        self.j = j
        self.v = np.ascontiguousarray(v)

    @property
    def rank(self) -> int:
        return self.v.shape[1]

    def project(self, x: np.ndarray) -> np.ndarray:
        """u^T x for x of shape (N,) or (K, N) (rows)."""
        return (x @ self.j.T) @ self.v

    def expand(self, y: np.ndarray) -> np.ndarray:
        """u y for y of shape (r,) or (K, r) (rows)."""
        return (y @ self.v.T) @ self.j

    project_rows = project
    expand_rows = expand

    def dense(self) -> np.ndarray:
        return self.j.T @ self.v


Basis = MatrixBasis | FactorBasis


def _symmetric(a: np.ndarray) -> bool:
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    return bool(np.max(np.abs(a - a.T), initial=0.0) <= SYMMETRY_RTOL * max(scale, 1e-300))


def h_eigenvalues(h: np.ndarray) -> np.ndarray:
    """Eigenvalues of the symmetric H, block by block over its connected components.

    The blocks are the connected components of H's non-zero pattern (exact zeros only): a GGN's
    per-sample blocks at the MNIST shape take 0.6 ms instead of 12 for one dense eigvalsh.
    """
    m = h.shape[0]
    if m == 0:
        return np.zeros(0)
    k, labels = connected_components(h != 0.0, directed=False)
    if k <= 1:
        return np.linalg.eigvalsh(h)
    order = np.argsort(labels, kind="stable")
    sizes = np.bincount(labels, minlength=k)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    out = []
    # blocks of one size go to one batched eigvalsh (a GGN's blocks all have the output size)
    for size in np.unique(sizes):
        comps = np.flatnonzero(sizes == size)
        idx = order[starts[comps][:, None] + np.arange(size)[None, :]]  # (blocks, size)
        out.append(np.linalg.eigvalsh(h[idx[:, :, None], idx[:, None, :]]).ravel())
    return np.sort(np.concatenate(out))


def check_h(h: np.ndarray) -> np.ndarray:
    """H symmetrised after checking it is symmetric and positive semidefinite (NotStableError)."""
    if not _symmetric(h):
        raise NotStableError("Factored.H must be symmetric")
    h = 0.5 * (h + h.T)
    h_eigs = h_eigenvalues(h)
    h_scale = max(float(np.abs(h_eigs).max()), 1e-300) if h_eigs.size else 1e-300
    if h_eigs.size and h_eigs[0] < -H_PSD_RTOL * h_scale:
        raise NotStableError(f"Factored.H is not positive semidefinite: smallest eigenvalue {h_eigs[0]:.3g}")
    return h


def _certify(j: np.ndarray, h: np.ndarray, u: Basis, mu: np.ndarray) -> float:
    """Largest relative residual of u^T u = I and of J^T H J u = u diag(mu), on random probes.

    Probing with Gaussian z estimates the Frobenius norms of both residual matrices (E[|E z|^2] =
    |E|_F^2) at O((m + r) N) cost, so the full r x r product u^T u (another O(N r^2)) is never
    formed. The probe seed is fixed: the check must not consume the emulator's noise stream.
    """
    r = u.rank
    if r == 0:
        return 0.0
    z = np.random.default_rng(12345).standard_normal((CERTIFY_PROBES, r))  # rows are probes
    both = u.expand_rows(np.concatenate([z, z * mu]))  # one pass over J for u z and u diag(mu) z
    uz, umz = both[:CERTIFY_PROBES], both[CERTIFY_PROBES:]
    orth = np.linalg.norm(u.project_rows(uz) - z) / np.linalg.norm(z)
    scale = max(float(np.abs(mu).max()), 1e-300)
    eig = np.linalg.norm(((uz @ j.T) @ h) @ j - umz) / (scale * np.linalg.norm(z))
    return float(max(orth, eig))


def factored_eigenbasis(j: np.ndarray, h: np.ndarray, *, psd: bool = True) -> tuple[Basis, np.ndarray, str]:
    """Orthonormal basis u (N x r) and mu (r,) >= 0 with J^T H J = u diag(mu) u^T, r = min(m, N).

    span(u) contains the row space of J; outside it J^T H J vanishes, so A = J^T H J + lambda I
    acts there as lambda I (as it does on the mu = 0 columns). ``h`` must be symmetric
    (``check_h``). Returns (u, mu, path): u a ``FactorBasis`` (Gram path) or ``MatrixBasis``, path
    "gram", "qr" or "empty" (m = 0).

    Gram path (the fast one: one SYRK over N, then O(m^3)): G = J J^T = L L^T by Cholesky; with
    u = J^T L^-T Z, u^T u = Z^T Z and J^T H J u = J^T H L Z, so the symmetric m x m eigenproblem
    L^T H L = Z M Z^T gives u = J^T V with V = L^-T Z, mu = M: one Cholesky and one eigh, where the
    former route took an eigh of G and a second eigh. It squares J's condition number, so it is
    taken only when L's diagonal does not show cond(G) >= 1 / GRAM_RCOND, and its result is
    certified (``_certify``) to CERTIFY_TOL; otherwise, and for m > N: QR path (backward stable at
    any rank, O(N m^2) with a larger constant): J^T = Q R by Householder, J^T H J = Q (R H R^T) Q^T,
    R H R^T = W M W^T, u = Q W. A rank-deficient J just yields mu = 0 columns (rate lambda, exactly
    as the complement), so no rank threshold enters.

    ``psd=False`` (a symmetric H that converter codes tipped slightly indefinite) returns mu as
    computed, negative values included, so the caller sees the drift's true smallest rate.
    """
    m, n = j.shape
    if m == 0:
        return MatrixBasis(np.zeros((n, 0))), np.zeros(0), "empty"
    u, mu, path = _gram_or_qr(j, h)
    if not psd:
        return u, mu, path
    # Curvature at round-off level of the largest one is zero (a rank-deficient J or H): a
    # deterministic 0 rather than +-1e-17, so damping 0 on a singular GGN is always refused.
    mu = np.where(mu > max(m, n) * np.finfo(np.float64).eps * max(float(mu.max()), 0.0), mu, 0.0)
    return u, mu, path


def _gram_or_qr(j: np.ndarray, h: np.ndarray) -> tuple[Basis, np.ndarray, str]:
    m, n = j.shape
    if m <= n:
        g = j @ j.T  # NumPy dispatches A A^T to SYRK: half a GEMM
        try:
            low = np.linalg.cholesky(g)
        except np.linalg.LinAlgError:
            low = None
        if low is not None:
            d = np.diag(low)
            if d.min() ** 2 >= GRAM_RCOND * d.max() ** 2:
                hl = h @ low
                k = low.T @ hl
                mu, z = np.linalg.eigh(0.5 * (k + k.T))
                v = scipy.linalg.solve_triangular(low, z, lower=True, trans="T", check_finite=False)
                u = FactorBasis(j, v)
                if _certify(j, h, u, mu) <= CERTIFY_TOL:
                    return u, mu, "gram"
    q, rr = scipy.linalg.qr(j.T, mode="economic", check_finite=False)
    k = rr @ h @ rr.T
    mu, w = np.linalg.eigh(0.5 * (k + k.T))
    return MatrixBasis(q @ w), mu, "qr"
