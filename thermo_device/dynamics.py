"""Cell dynamics: turn a programmed drift into a linear SDE the integrators can run.

Overdamped RC array (the TNGD device), state x in R^N (node voltages, full-scale units)::

    dx = -(A x - b) dt + sqrt(2 kappa) dW          stationary law N(A^-1 b, kappa A^-1)

Underdamped RLC array (the 8-cell SPU board), voltages v and inductor currents i, C the
programmed (Maxwell) capacitance matrix, L and R per cell::

    di = L^-1 v dt
    dv = -C^-1 R^-1 v dt - C^-1 i dt + sqrt(2 kappa / R) C^-1 dW     stationary v ~ N(0, kappa C^-1),
                                                                        i ~ N(0, kappa L^-1)

The noise is each resistor's Johnson current (density 2 kT / R, fluctuation-dissipation), so
equipartition holds for any R: <v^T C v> / N = <i^T L i> / N = kappa (issue 13; the noise was
sqrt(2 kappa) C^-1 dW before, which gave R times too much).

Inductors short any DC voltage, so the RLC board's only operating point is v = 0: it samples and
inverts (through the covariance), it does not solve A x = b in the mean; a non-zero bias is refused.

Non-idealities enter as (see docs/physics.md): per-cell relative capacitances c_i (mismatch) give
dx = -C^-1 (A x - b) dt + sqrt(2 kappa) C^-1/2 dW, which keeps the stationary law of a symmetric A
(fluctuation-dissipation: the mobility C^-1 scales drift and diffusion alike) and changes only the
per-cell time constants; temperature multiplies every rate by r = g / c (time dilation) and sets
kappa. Systems here are built for r = 1, kappa = 1; propagators apply (r, kappa) per step.

Every analysed system carries its stability margin ``margin``: the smallest real part of the
eigenvalues of the drift the cells actually see (C^-1 A with per-cell capacitances; the 2N RLC
matrix F), in 1/tau at nominal temperature. A realised overdamped drift that is not
positive-stable (``margin <= 0``) becomes an ``UnstableSystem`` when the caller allows it: the chip
then runs away into its rails (``programming.analyse`` decides, from the host's drift, whether
that is the chip's doing or the host's error).

Time is in units of tau. Two representations come out of a programmed drift:

* ``ModalSystem``: symmetric A (Dense symmetric, Diagonal, Factored), in the coordinates
  y = C^1/2 x where the drift C^-1/2 A C^-1/2 is symmetric. In the eigenbasis every
  mode is an independent scalar OU process, so exact propagation costs O(N) per readout sample.
  For Factored A = J^T H J + lambda I the basis is the row space of J (r <= m modes, O(N m^2),
  ``factored.factored_eigenbasis``) plus the orthogonal complement, where A acts as lambda I: N x N
  is never formed.
* ``GeneralSystem``: dz = -(F z - c) dt + G dW with D = G G^T, any positive-stable F (a
  non-symmetric Dense A, or the underdamped 2N-dimensional system). Propagated with e^{-F h} and
  the Van Loan transition covariance; no normality assumption.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from protocol.drift import SYMMETRY_RTOL, Drift, as_float_array, drift_form
from protocol.errors import CapacityError, InvalidInputError, NotStableError, ShapeError, UnsupportedError

from .factored import Basis, MatrixBasis, check_h, factored_eigenbasis


@dataclass(frozen=True, eq=False)
class ModalSystem:
    """Symmetric overdamped drift in its eigenbasis, plus the isotropic complement (Factored).

    Mode vector w = [y (r modes on ``basis``), z (N coordinates on the complement)] where z is
    present only when ``complement_rate`` is not None.
    """

    basis: Basis | None  # orthonormal N x r (factored.MatrixBasis / FactorBasis); None: identity
    rates: np.ndarray  # (r,) eigenvalues of A on the basis, all > 0
    complement_rate: float | None  # rate of the complement (damping of Factored), > 0
    target: np.ndarray  # stationary mean of w, shape (R,)
    n: int  # N
    cell_scale: np.ndarray | None = None  # c^-1/2 per cell (capacitance mismatch); None = 1

    @property
    def n_modes(self) -> int:
        return self.rates.shape[0] + (self.n if self.complement_rate is not None else 0)

    @property
    def margin(self) -> float:
        """Smallest rate (1/tau): the stability margin of a symmetric drift."""
        low = float(self.rates.min()) if self.rates.size else math.inf
        return low if self.complement_rate is None else min(low, self.complement_rate)

    @property
    def all_rates(self) -> np.ndarray:
        if self.complement_rate is None:
            return self.rates
        return np.concatenate([self.rates, np.full(self.n, self.complement_rate)])

    def to_modes(self, x: np.ndarray) -> np.ndarray:
        if self.basis is not None and not x.any():
            return np.zeros(self.n_modes)  # a reset state: no pass over the basis
        if self.cell_scale is not None:
            x = x / self.cell_scale
        if self.basis is None:
            return x.copy()
        y = self.basis.project(x)
        if self.complement_rate is None:
            return y
        return np.concatenate([y, x - self.basis.expand(y)])

    def from_modes(self, w: np.ndarray) -> np.ndarray:
        """Map mode vectors back to node voltages; ``w`` is (R,) or (K, R)."""
        if self.basis is None:
            x = w.copy()
        else:
            r = self.rates.shape[0]
            x = self.basis.expand_rows(w[..., :r])
            if self.complement_rate is not None:
                z = w[..., r:]
                # Only the complement part of z is physical: the rest is independent noise that the
                # isotropic complement dynamics let us carry along and discard here.
                x = x + z - self.basis.expand_rows(self.basis.project_rows(z))
        return x if self.cell_scale is None else x * self.cell_scale

    def second_moment_from_modes(self, s: np.ndarray) -> np.ndarray:
        """B S B^T for the linear map B of ``from_modes`` (S is R x R)."""
        if self.basis is None:
            out = s.copy()
        elif self.complement_rate is None:
            u = self.basis.dense()
            out = u @ s @ u.T
        else:
            n, r, u = self.n, self.rates.shape[0], self.basis.dense()
            b = np.empty((n, r + n))
            b[:, :r] = u
            b[:, r:] = np.eye(n) - u @ u.T
            out = b @ s @ b.T
        if self.cell_scale is not None:
            out = out * np.outer(self.cell_scale, self.cell_scale)
        return out

    def with_bias(self, b: np.ndarray) -> ModalSystem:
        """The same drift with another bias (O(N r)): only the target moves."""
        if self.cell_scale is not None:
            b = b * self.cell_scale
        if self.basis is None:
            target = b / self.rates
        else:
            pb = self.basis.project(b)
            y = pb / self.rates
            if self.complement_rate is None:
                target = y
            else:
                target = np.concatenate([y, (b - self.basis.expand(pb)) / self.complement_rate])
        return ModalSystem(self.basis, self.rates, self.complement_rate, target, self.n, self.cell_scale)

    def solution(self) -> np.ndarray:
        """The stationary mean in node coordinates, A^-1 b."""
        return self.from_modes(self.target)


@dataclass(frozen=True, eq=False)
class GeneralSystem:
    """dz = -(F z - c) dt + G dW with D = G G^T (for kappa = 1); readout is z[:n_out]."""

    F: np.ndarray
    c: np.ndarray
    D: np.ndarray
    n_out: int
    target: np.ndarray  # F^-1 c, the stationary mean
    input_map: np.ndarray | None = None  # c = input_map * b (per-cell 1/c_i); None = identity
    margin: float = math.nan  # min Re eig(F), 1/tau

    @property
    def dim(self) -> int:
        return self.F.shape[0]

    def with_bias(self, b: np.ndarray) -> GeneralSystem:
        c = b if self.input_map is None else self.input_map * b
        return GeneralSystem(self.F, c, self.D, self.n_out, np.linalg.solve(self.F, c), self.input_map,
                             self.margin)

    def solution(self) -> np.ndarray:
        return self.target[: self.n_out]


System = ModalSystem | GeneralSystem


def check_dimension(drift: Drift, bias: np.ndarray | None, cells: int) -> np.ndarray:
    """Validate the drift's size against the device and return b as float64 (zeros if None)."""
    form = drift_form(drift)
    n = drift.dim
    if n > cells:
        raise CapacityError(f"{form} drift has dimension {n}, the device has {cells} cells")
    if bias is None:
        return np.zeros(n)
    b = as_float_array(bias, "bias", 1)
    if b.shape[0] != n:
        raise ShapeError(f"bias: expected length {n} to match the drift, got {b.shape[0]}")
    return np.ascontiguousarray(b, dtype=np.float64)


def _symmetric(a: np.ndarray) -> bool:
    scale = float(np.max(np.abs(a)))
    return bool(np.max(np.abs(a - a.T)) <= SYMMETRY_RTOL * max(scale, 1e-300))


def is_symmetric_drift(drift: Drift) -> bool:
    return drift.form != "dense" or _symmetric(drift.matrix)


@dataclass(frozen=True, eq=False)
class SteppingOnlySystem:
    """A Factored drift with no cheap exact representation (non-symmetric J arrays or per-cell
    capacitances): validated, its solution known by Woodbury, propagated only by time stepping.

    A = U V + damping I with U = J_out^T (N x m) and V = H J_in (m x N).
    """

    u: np.ndarray
    v: np.ndarray
    damping: float
    b: np.ndarray
    reason: str
    cap: np.ndarray | None = None
    margin: float = math.nan  # see ``_factored_margin``, 1/tau

    @property
    def n_out(self) -> int:
        return self.u.shape[0]

    def with_bias(self, b: np.ndarray) -> SteppingOnlySystem:
        return SteppingOnlySystem(self.u, self.v, self.damping, b, self.reason, self.cap, self.margin)

    def solution(self) -> np.ndarray:
        """A^-1 b = (b - U (lambda I + V U)^-1 V b) / lambda, O(N m + m^3)."""
        m = self.v.shape[0]
        inner = self.damping * np.eye(m) + self.v @ self.u
        return (self.b - self.u @ np.linalg.solve(inner, self.v @ self.b)) / self.damping


@dataclass(frozen=True, eq=False)
class UnstableSystem:
    """A realised overdamped drift that is not positive-stable: it can only be time-stepped, and
    a real chip runs away until its node voltages sit at the supply rails.

    ``host`` is the host's drift, analysed (it was positive-stable, else programming raised): its
    solution sizes the range mapping, since the realised drift's fixed point is not an attractor.
    """

    drift: Drift  # as realised (the stepper evaluates its arrays)
    j_out: np.ndarray | None
    cap: np.ndarray | None
    b: np.ndarray
    margin: float  # <= 0, 1/tau
    step_limit: float  # stepping stability limit over the decaying modes, tau
    reason: str
    host: System | SteppingOnlySystem | None = None

    @property
    def n_out(self) -> int:
        return self.drift.dim

    def with_bias(self, b: np.ndarray) -> UnstableSystem:
        return replace(self, b=b)

    def solution(self) -> np.ndarray:
        """The host drift's A^-1 b: what the chip was asked to settle at."""
        if self.host is None:
            raise NotStableError(self.reason)
        return self.host.with_bias(self.b).solution()


def _euler_step_limit(ev: np.ndarray) -> float:
    """2 Re(l) / |l|^2 over the eigenvalues that decay (the growing ones grow at any step)."""
    ok = ev[ev.real > 0.0]
    return float(np.min(2.0 * ok.real / np.abs(ok) ** 2)) if ok.size else math.inf


def overdamped_system(drift: Drift, b: np.ndarray, cap: np.ndarray | None = None,
                      j_out: np.ndarray | None = None, *,
                      unstable_ok: bool = False) -> System | SteppingOnlySystem | UnstableSystem:
    """Analyse an overdamped drift: its stability margin and its exact representation.

    Args:
        drift: the drift as realised on the chip.
        b: the bias as realised on the chip.
        cap: per-cell relative capacitances (mismatch); None means all 1.
        j_out: for Factored, the J^T array when it differs from J (mismatch); None means J.
        unstable_ok: return an ``UnstableSystem`` (host None) for a drift that is not
            positive-stable instead of raising NotStableError. Input errors (a non-symmetric or,
            without mismatch, non-PSD Factored H; mismatched arrays without damping) still raise.

    Costs O(N^3) for Dense (eigh or eig), O(N) for Diagonal, O(N m^2) for Factored.
    """
    n = drift.dim
    scale = None if cap is None else 1.0 / np.sqrt(cap)
    form = drift_form(drift)

    def unstable(margin: float, step_limit: float, message: str) -> UnstableSystem:
        if not unstable_ok:
            raise NotStableError(message)
        return UnstableSystem(drift, j_out, cap, b, margin, step_limit, message)

    if form == "diagonal":
        d = np.ascontiguousarray(drift.diag, dtype=np.float64)
        rates = d if cap is None else d / cap
        if d.min() <= 0.0:
            top = float(rates.max())
            return unstable(float(rates.min()), 2.0 / top if top > 0.0 else math.inf,
                            f"Diagonal drift is not positive: smallest entry {d.min():.3g}")
        return ModalSystem(None, rates, None, np.zeros(n), n, scale).with_bias(b)
    if form == "dense":
        a = np.asarray(drift.matrix, dtype=np.float64)
        if _symmetric(a):
            lam0 = np.linalg.eigvalsh(0.5 * (a + a.T)) if cap is not None else None
            sa = a if scale is None else (scale[:, None] * a) * scale[None, :]
            lam, u = np.linalg.eigh(0.5 * (sa + sa.T))
            # C^-1/2 A C^-1/2 has the inertia of A (Sylvester): the sign test uses A itself
            low = lam[0] if lam0 is None else lam0[0]
            if low <= 0.0:
                return unstable(float(lam[0]), 2.0 / lam[-1] if lam[-1] > 0.0 else math.inf,
                                f"Dense drift is not positive definite: smallest eigenvalue {low:.3g}")
            return ModalSystem(MatrixBasis(u), lam, None, np.zeros(n), n, scale).with_bias(b)
        inv_c = None if cap is None else 1.0 / cap
        f = np.ascontiguousarray(a if inv_c is None else inv_c[:, None] * a)
        # the rates the cells see are those of C^-1 A: per-cell capacitances can destabilise a
        # non-symmetric A that is stable on its own
        ev = np.linalg.eigvals(f)
        margin = float(ev.real.min())
        if margin <= 0.0:
            return unstable(margin, _euler_step_limit(ev), "Dense drift is not positive-stable: an eigenvalue "
                            f"has real part {margin:.3g} <= 0")
        d = 2.0 * (np.eye(n) if inv_c is None else np.diag(inv_c))
        return GeneralSystem(f, b, d, n, np.zeros(n), inv_c, margin).with_bias(b)
    if j_out is None and cap is None:
        return _factored_system(drift, b, unstable, indefinite_h_ok=unstable_ok)
    return _factored_stepping_only(drift, b, j_out, cap, unstable)


def _factored_margin(ev: np.ndarray, damping: float, n: int, cap: np.ndarray | None) -> float:
    """Stability margin of C^-1 (U V + damping I) from the m eigenvalues ``ev`` of V U.

    U V + damping I has the eigenvalues ev + damping and, when N > m, damping on the rest: exact
    without capacitances, O(m^3). With per-cell capacitances c the N x N problem is not formed:
    for symmetric A the eigenvalues of C^-1 A are theta_k lambda_k(A) with theta_k in
    [min 1/c, max 1/c] (Ostrowski), so the margin is bounded below by lambda_min(A) min(1/c) (or
    max(1/c) when negative), with the sign of lambda_min(A) exact (Sylvester); the mismatch that
    makes A non-symmetric moves this by its first order only.
    """
    low = float((ev.real + damping).min()) if ev.size else math.inf
    if n > ev.size:
        low = min(low, damping)
    if cap is not None:
        inv = 1.0 / cap
        low *= float(inv.min()) if low > 0.0 else float(inv.max())
    return low


def _factored_stepping_only(drift: Drift, b: np.ndarray, j_out: np.ndarray | None,
                            cap: np.ndarray | None,
                            unstable: Callable[[float, float, str], UnstableSystem]) -> SteppingOnlySystem | UnstableSystem:
    j_in = np.asarray(drift.J, dtype=np.float64)
    j_o = j_in if j_out is None else np.asarray(j_out, dtype=np.float64)
    h = np.asarray(drift.H, dtype=np.float64)
    lam_d = float(drift.damping)
    if lam_d <= 0.0:
        raise NotStableError("a Factored drift with mismatched arrays needs damping > 0")
    u, v = j_o.T, h @ j_in
    # The non-zero eigenvalues of U V are those of V U (m x m): stability without N x N.
    ev = np.linalg.eigvals(v @ u)
    margin = _factored_margin(ev, lam_d, u.shape[0], cap)
    if margin <= 0.0:
        return unstable(margin, _spectral_step_limit(ev, lam_d, cap), "Factored drift is not positive-stable: "
                        f"an eigenvalue has real part {margin:.3g} <= 0")
    reason = "non-symmetric J arrays (coupling mismatch)" if j_out is not None else "per-cell capacitances"
    return SteppingOnlySystem(u, v, lam_d, b, reason, cap, margin)


def _spectral_step_limit(ev: np.ndarray, damping: float, cap: np.ndarray | None) -> float:
    """2 / rho with rho >= the spectral radius of C^-1 (U V + damping I): max(1/c) (max|eig(V U)| + damping)."""
    rho = (float(np.abs(ev).max()) if ev.size else 0.0) + damping
    if cap is not None:
        rho /= float(cap.min())
    return 2.0 / rho


def _factored_system(drift: Drift, b: np.ndarray, unstable: Callable[[float, float, str], UnstableSystem],
                     indefinite_h_ok: bool) -> ModalSystem | UnstableSystem:
    j = np.asarray(drift.J, dtype=np.float64)
    lam_d = float(drift.damping)
    m, n = j.shape
    h_raw = np.asarray(drift.H, dtype=np.float64)
    try:
        h = check_h(h_raw)
        psd = True
    except NotStableError:
        # Converter codes can tip a PSD but singular H (a softmax GGN block) slightly indefinite;
        # then the drift's own spectrum decides. Without that allowance it is the host's error.
        if not _symmetric(h_raw) or not indefinite_h_ok:
            raise
        h, psd = 0.5 * (h_raw + h_raw.T), False
    # The row space of J is where A differs from lambda I: its eigenbasis in O(N m^2) (Gram + eigh
    # when J is well conditioned, Householder QR otherwise; factored.py).
    if psd:
        u, mu, _ = factored_eigenbasis(j, h)
        rates = np.maximum(mu, 0.0) + lam_d  # mu < 0 only by round-off once H is PSD
    else:
        u, mu, _ = factored_eigenbasis(j, h, psd=False)
        rates = mu + lam_d
    r = mu.shape[0]
    complement = r < n
    if (rates.size and rates.min() <= 0.0) or (complement and lam_d <= 0.0):
        margin = min(float(rates.min()) if rates.size else math.inf, lam_d if complement else math.inf)
        top = max(float(rates.max()) if rates.size else lam_d, lam_d)
        message = ("Factored drift is singular: J^T H J has a null space and damping is 0 (set damping > 0)"
                   if psd else f"Factored drift is not positive definite: smallest rate {margin:.3g}")
        return unstable(margin, 2.0 / top if top > 0.0 else math.inf, message)
    system = ModalSystem(basis=u, rates=rates, complement_rate=lam_d if complement else None,
                         target=np.zeros(r + n if complement else r), n=n)
    # programming analyses with b = 0 and sets the bias afterwards: skip two passes over J
    return system.with_bias(b) if b.any() else system


def underdamped_system(drift: Drift, b: np.ndarray, inductance: float, resistance: float) -> GeneralSystem:
    """The RLC array as a 2N-dimensional linear SDE in z = [v, i] (see the module docstring).

    D (for kappa = 1) is (2 / R) C^-1 C^-1 on the voltages: the Johnson current noise of the cell
    resistors, density 2 kappa / R, enters through C^-1. The stationary covariance is then
    kappa diag(C^-1, L^-1) for every R. The margin is min Re eig(F), positive for C > 0 and R > 0.
    """
    if drift.form == "factored":
        raise UnsupportedError("the underdamped RLC array is programmed with a Dense or Diagonal "
                               "capacitance matrix, not a Factored one")
    c_mat = drift.dense()
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
    d[:n, :n] = (2.0 / resistance) * (c_inv @ c_inv)
    margin = float(np.linalg.eigvals(f).real.min())
    return GeneralSystem(F=f, c=np.zeros(2 * n), D=d, n_out=n, target=np.zeros(2 * n), margin=margin)


def stable_step(system: System | SteppingOnlySystem | UnstableSystem, method: str, inductance: float = 1.0) -> float:
    """Largest step for which a stepping scheme stays stable on this system (r = 1).

    Euler-Maruyama and Heun on dx = -F x dt are stable for h < 2 Re(l) / |l|^2 over the
    eigenvalues l of F (Heun's real-axis limit is also 2 / l). BAOAB on the RLC array is the
    velocity-Verlet limit h < 2 / omega_max, omega^2 the eigenvalues of C^-1 / L.
    """
    if isinstance(system, UnstableSystem):
        return system.step_limit  # over the modes that decay: the growing one grows at any step
    if isinstance(system, ModalSystem):
        return 2.0 / float(system.all_rates.max())
    if isinstance(system, SteppingOnlySystem):
        # spectral radius of C^-1 (U V + lambda I) <= max(1/c) (max|eig(V U)| + lambda)
        return _spectral_step_limit(np.linalg.eigvals(system.v @ system.u), system.damping, system.cap)
    if method == "baoab":
        n = system.n_out
        c_inv = system.F[:n, n:]  # the C^-1 block
        omega2 = float(np.linalg.eigvalsh(0.5 * (c_inv + c_inv.T)).max()) / inductance
        return 2.0 / np.sqrt(omega2)
    ev = np.linalg.eigvals(system.F)
    return float(np.min(2.0 * ev.real / np.abs(ev) ** 2))
