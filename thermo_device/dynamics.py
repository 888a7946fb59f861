"""Cell dynamics: turn a programmed drift into a linear SDE the integrators can run.

Overdamped RC array (the TNGD device), state x in R^N (node voltages, full-scale units)::

    dx = -(A x - b) dt + sqrt(2 kappa) dW          stationary law N(A^-1 b, kappa A^-1)

Underdamped RLC array (the 8-cell SPU board), voltages v and inductor currents i, C the
programmed (Maxwell) capacitance matrix, L and R per cell::

    di = L^-1 v dt
    dv = -C^-1 R^-1 v dt - C^-1 i dt + sqrt(2 kappa) C^-1 dW     stationary v ~ N(0, kappa R C^-1)

Inductors short any DC voltage, so the RLC board's only operating point is v = 0: it samples and
inverts (through the covariance), it does not solve A x = b in the mean; a non-zero bias is refused.

Time is in units of tau. Two representations come out of a programmed drift:

* ``ModalSystem``: symmetric A (Dense symmetric, Diagonal, Factored). In the eigenbasis every
  mode is an independent scalar OU process, so exact propagation costs O(N) per readout sample.
  For Factored A = J^T H J + lambda I the basis is the row space of J (r <= m modes, from a thin
  SVD, O(N m^2)) plus the orthogonal complement, where A acts as lambda I: N x N is never formed.
* ``GeneralSystem``: dz = -(F z - c) dt + G dW with D = G G^T, any positive-stable F (a
  non-symmetric Dense A, or the underdamped 2N-dimensional system). Propagated with e^{-F h} and
  the Van Loan transition covariance; no normality assumption.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protocol.drift import Dense, Diagonal, Drift, Factored, drift_form
from protocol.errors import CapacityError, InvalidInputError, NotStableError, ShapeError, UnsupportedError

# Relative tolerance below which a dense matrix counts as symmetric (host round-off is ~1e-16).
SYMMETRY_RTOL = 1e-10


@dataclass(frozen=True, eq=False)
class ModalSystem:
    """Symmetric overdamped drift in its eigenbasis, plus the isotropic complement (Factored).

    Mode vector w = [y (r modes on ``basis``), z (N coordinates on the complement)] where z is
    present only when ``complement_rate`` is not None.
    """

    basis: np.ndarray | None  # (N, r) orthonormal columns; None means the identity (Diagonal)
    rates: np.ndarray  # (r,) eigenvalues of A on the basis, all > 0
    complement_rate: float | None  # rate of the complement (damping of Factored), > 0
    target: np.ndarray  # stationary mean of w, shape (R,)
    n: int  # N

    @property
    def n_modes(self) -> int:
        return self.rates.shape[0] + (self.n if self.complement_rate is not None else 0)

    @property
    def all_rates(self) -> np.ndarray:
        if self.complement_rate is None:
            return self.rates
        return np.concatenate([self.rates, np.full(self.n, self.complement_rate)])

    def to_modes(self, x: np.ndarray) -> np.ndarray:
        if self.basis is None:
            return x.copy()
        y = self.basis.T @ x
        if self.complement_rate is None:
            return y
        return np.concatenate([y, x - self.basis @ y])

    def from_modes(self, w: np.ndarray) -> np.ndarray:
        """Map mode vectors back to node voltages; ``w`` is (R,) or (K, R)."""
        if self.basis is None:
            return w.copy()
        r = self.rates.shape[0]
        y = w[..., :r]
        x = y @ self.basis.T
        if self.complement_rate is not None:
            z = w[..., r:]
            # Only the complement part of z is physical: the rest is independent noise that the
            # isotropic complement dynamics let us carry along and discard here.
            x = x + z - (z @ self.basis) @ self.basis.T
        return x

    def second_moment_from_modes(self, s: np.ndarray) -> np.ndarray:
        """B S B^T for the linear map B of ``from_modes`` (S is R x R)."""
        if self.basis is None:
            return s.copy()
        r = self.rates.shape[0]
        if self.complement_rate is None:
            return self.basis @ s @ self.basis.T
        n = self.n
        u = self.basis
        b = np.empty((n, r + n))
        b[:, :r] = u
        b[:, r:] = np.eye(n) - u @ u.T
        return b @ s @ b.T


@dataclass(frozen=True, eq=False)
class GeneralSystem:
    """dz = -(F z - c) dt + G dW with D = G G^T; readout is z[:n_out]."""

    F: np.ndarray
    c: np.ndarray
    D: np.ndarray
    n_out: int
    target: np.ndarray  # F^-1 c, the stationary mean

    @property
    def dim(self) -> int:
        return self.F.shape[0]


System = ModalSystem | GeneralSystem


def check_dimension(drift: Drift, bias: np.ndarray | None, cells: int) -> np.ndarray:
    """Validate the drift's size against the device and return b as float64 (zeros if None)."""
    form = drift_form(drift)
    n = drift.dim
    if n > cells:
        raise CapacityError(f"{form} drift has dimension {n}, the device has {cells} cells")
    if bias is None:
        return np.zeros(n)
    from protocol.drift import as_float_array

    b = as_float_array(bias, "bias", 1)
    if b.shape[0] != n:
        raise ShapeError(f"bias: expected length {n} to match the drift, got {b.shape[0]}")
    return np.ascontiguousarray(b, dtype=np.float64)


def _symmetric(a: np.ndarray) -> bool:
    scale = float(np.max(np.abs(a)))
    return bool(np.max(np.abs(a - a.T)) <= SYMMETRY_RTOL * max(scale, 1e-300))


def is_symmetric_drift(drift: Drift) -> bool:
    return not isinstance(drift, Dense) or _symmetric(drift.matrix)


def overdamped_system(drift: Drift, b: np.ndarray, kappa: float) -> System:
    """Analyse an overdamped drift: validate positive stability, return its exact representation.

    Costs O(N^3) for Dense (eigh or eig), O(N) for Diagonal, O(N m^2) for Factored.
    """
    n = drift.dim
    if isinstance(drift, Diagonal):
        d = np.ascontiguousarray(drift.diag, dtype=np.float64)
        if d.min() <= 0.0:
            raise NotStableError(f"Diagonal drift is not positive: smallest entry {d.min():.3g}")
        return ModalSystem(basis=None, rates=d, complement_rate=None, target=b / d, n=n)
    if isinstance(drift, Dense):
        a = np.asarray(drift.matrix, dtype=np.float64)
        if _symmetric(a):
            lam, u = np.linalg.eigh(0.5 * (a + a.T))
            if lam[0] <= 0.0:
                raise NotStableError(f"Dense drift is not positive definite: smallest eigenvalue {lam[0]:.3g}")
            u = np.ascontiguousarray(u)
            return ModalSystem(basis=u, rates=lam, complement_rate=None, target=(u.T @ b) / lam, n=n)
        ev = np.linalg.eigvals(a)
        if ev.real.min() <= 0.0:
            raise NotStableError("Dense drift is not positive-stable: an eigenvalue has real part "
                                 f"{ev.real.min():.3g} <= 0")
        a = np.ascontiguousarray(a)
        return GeneralSystem(F=a, c=b.copy(), D=2.0 * kappa * np.eye(n), n_out=n,
                             target=np.linalg.solve(a, b))
    if isinstance(drift, Factored):
        return _factored_system(drift, b)
    raise InvalidInputError(f"not a drift description: {type(drift).__name__}")


def _factored_system(drift: Factored, b: np.ndarray) -> ModalSystem:
    j = np.asarray(drift.J, dtype=np.float64)
    h = np.asarray(drift.H, dtype=np.float64)
    lam_d = float(drift.damping)
    m, n = j.shape
    if not _symmetric(h):
        raise NotStableError("Factored.H must be symmetric")
    h = 0.5 * (h + h.T)
    h_eigs = np.linalg.eigvalsh(h)
    h_scale = max(float(np.abs(h_eigs).max()), 1e-300)
    if h_eigs[0] < -1e-10 * h_scale:
        raise NotStableError(f"Factored.H is not positive semidefinite: smallest eigenvalue {h_eigs[0]:.3g}")
    # Thin SVD of J: O(N m^2), the row space of J is where A differs from lambda I.
    us, s, vt = np.linalg.svd(j, full_matrices=False)
    tol = max(m, n) * np.finfo(np.float64).eps * (s[0] if s.size else 0.0)
    keep = s > tol
    us, s, vt = us[:, keep], s[keep], vt[keep]
    r = s.shape[0]
    k = (s[:, None] * (us.T @ h @ us)) * s[None, :]
    mu, w = np.linalg.eigh(0.5 * (k + k.T))
    rates = np.maximum(mu, 0.0) + lam_d  # mu < 0 only by round-off once H is PSD
    complement = r < n
    if (rates.size and rates.min() <= 0.0) or (complement and lam_d <= 0.0):
        raise NotStableError("Factored drift is singular: J^T H J has a null space and damping is 0 "
                             "(set damping > 0)")
    u = np.ascontiguousarray(vt.T @ w)  # (N, r)
    y_target = (u.T @ b) / rates
    if complement:
        z_target = (b - u @ (u.T @ b)) / lam_d
        target = np.concatenate([y_target, z_target])
        return ModalSystem(basis=u, rates=rates, complement_rate=lam_d, target=target, n=n)
    return ModalSystem(basis=u, rates=rates, complement_rate=None, target=y_target, n=n)


def underdamped_system(drift: Drift, b: np.ndarray, kappa: float, inductance: float,
                       resistance: float) -> GeneralSystem:
    """The RLC array as a 2N-dimensional linear SDE in z = [v, i] (see the module docstring)."""
    if isinstance(drift, Factored):
        raise UnsupportedError("the underdamped RLC array is programmed with a Dense or Diagonal "
                               "capacitance matrix, not a Factored one")
    c_mat = np.diag(drift.diag) if isinstance(drift, Diagonal) else np.asarray(drift.matrix, dtype=np.float64)
    if not _symmetric(c_mat):
        raise NotStableError("the capacitance matrix of the RLC array must be symmetric")
    c_mat = 0.5 * (c_mat + c_mat.T)
    lam = np.linalg.eigvalsh(c_mat)
    if lam[0] <= 0.0:
        raise NotStableError(f"the capacitance matrix is not positive definite: smallest eigenvalue {lam[0]:.3g}")
    if np.any(b != 0.0):
        raise InvalidInputError("bias must be zero on the underdamped RLC array: inductors short DC, "
                                "so its only operating point is v = 0")
    n = c_mat.shape[0]
    c_inv = np.linalg.inv(c_mat)
    f = np.zeros((2 * n, 2 * n))
    f[:n, :n] = c_inv / resistance
    f[:n, n:] = c_inv
    f[n:, :n] = -np.eye(n) / inductance
    d = np.zeros((2 * n, 2 * n))
    d[:n, :n] = 2.0 * kappa * (c_inv @ c_inv)
    return GeneralSystem(F=f, c=np.zeros(2 * n), D=d, n_out=n, target=np.zeros(2 * n))


def stable_step(system: System, method: str, inductance: float = 1.0) -> float:
    """Largest step for which a stepping scheme stays stable on this system (inf if unbounded).

    Euler-Maruyama and Heun on dx = -F x dt are stable for h < 2 Re(l) / |l|^2 over the
    eigenvalues l of F (Heun's real-axis limit is also 2 / l). BAOAB on the RLC array is the
    velocity-Verlet limit h < 2 / omega_max, omega^2 the eigenvalues of C^-1 / L.
    """
    if isinstance(system, ModalSystem):
        return 2.0 / float(system.all_rates.max())
    if method == "baoab":
        n = system.n_out
        c_inv = system.F[:n, n:]  # the C^-1 block
        omega2 = float(np.linalg.eigvalsh(0.5 * (c_inv + c_inv.T)).max()) / inductance
        return 2.0 / np.sqrt(omega2)
    ev = np.linalg.eigvals(system.F)
    return float(np.min(2.0 * ev.real / np.abs(ev) ** 2))
