"""Exact-in-distribution propagation of linear, time-invariant dynamics at any step size.

Modal (symmetric A, see ``dynamics.ModalSystem``): each mode w_i with rate a_i is a scalar OU
process, and over a step h exactly::

    w_i <- w*_i + e^{-a_i h} (w_i - w*_i) + sqrt(kappa (1 - e^{-2 a_i h}) / a_i) xi_i

O(R) per readout sample. General (``dynamics.GeneralSystem``, any positive-stable F)::

    z <- z* + Phi (z - z*) + chol(Q) xi,     Phi = e^{-F h},  Q = int_0^h e^{-F s} D e^{-F^T s} ds

with Q = kappa (S - Phi S Phi^T), S the stationary covariance (``general_basis``): sampled in the
real eigenbasis of F when it is well conditioned (O(n) per step plus one GEMM per noise block and
one per block of stored readouts, after one ``eig``), otherwise in z with S from a blocked
Bartels-Stewart solve (two gemv per step), and from the Van Loan block exponential [[F, D], [0,
-F^T]] h (Van Loan 1978, at h / 2^k, squared up) when S - Phi S Phi^T cancels too much. None of
this assumes F is normal; thermox's diagonalisation shortcut does, and gives wrong covariances
for non-normal F.

Gaussian noise is drawn in blocks with NumPy's Generator (about twice numba's in-kernel rate) and
the whole time loop of a block runs inside a numba kernel. Both classes satisfy
``propagator.Propagator``.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from numba import njit

from . import general_basis
from .dynamics import GeneralSystem, ModalSystem
from .general_basis import (
    LYAPUNOV_REL_MAX,
    BasisStep,
    EigenBasis,
    basis_step,
    basis_window,
    eigen_basis,
    lyapunov_transition,
    psd_factor,
    stationary_covariance,
)
from .propagator import StepCounters, WindowResult, run_blocks
from .window_closed_form import draw_window


@njit(cache=True, nogil=True)
def _modal_window(w, decay, std, target, noise, k0, stride, total, out, total_outer):
    """Advance every mode by noise.shape[0] exact steps, accumulating the readout sums.

    Step g (global, 1-based) contributes to ``total``; with stride > 0, every stride-th step is
    stored in ``out``. ``total_outer`` is accumulated when it is not 0 x 0.
    """
    r = w.shape[0]
    noisy = noise.shape[1] == r
    outer = total_outer.shape[0] == r
    for j in range(noise.shape[0]):
        for i in range(r):
            v = target[i] + decay[i] * (w[i] - target[i])
            if noisy:
                v += std[i] * noise[j, i]
            w[i] = v
            total[i] += v
        record_modes(w, k0 + j + 1, stride, out, total_outer, outer)


@njit(cache=True, nogil=True)
def record_modes(w, g, stride, out, total_outer, outer):
    """A modal window's bookkeeping after global step g: every stride-th state into ``out``, and
    the outer product into ``total_outer`` when ``outer`` (shared with ``flicker_exact``)."""
    if stride > 0 and g % stride == 0:
        out[g // stride - 1, :] = w
    if outer:
        r = w.shape[0]
        for a in range(r):
            wa = w[a]
            for b in range(r):
                total_outer[a, b] += wa * w[b]


@njit(cache=True, nogil=True)
def _general_window(z, phi, shift, chol, noise, k0, stride, total, out, total_outer, n_out):
    """z <- Phi z + shift + chol xi per step; sums over the first n_out coordinates."""
    n = z.shape[0]
    noisy = noise.shape[1] == n
    outer = total_outer.shape[0] == n_out
    for j in range(noise.shape[0]):
        znew = np.dot(phi, z)
        if noisy:
            znew += np.dot(chol, noise[j])
        for i in range(n):
            z[i] = znew[i] + shift[i]
        for i in range(n_out):
            total[i] += z[i]
        g = k0 + j + 1
        if stride > 0 and g % stride == 0:
            out[g // stride - 1, :] = z[:n_out]
        if outer:
            for a in range(n_out):
                za = z[a]
                for b in range(n_out):
                    total_outer[a, b] += za * z[b]


class ModalPropagator:
    """Exact propagation of a ModalSystem; each call takes the rate multiplier r and kappa."""

    def __init__(self, system: ModalSystem, closed_form: bool = False) -> None:
        self.system = system
        self.closed_form = closed_form
        self.rates = np.ascontiguousarray(system.all_rates)
        self.target = np.ascontiguousarray(system.target)

    @property
    def width(self) -> int:
        return self.rates.shape[0]

    @property
    def counters(self) -> StepCounters | None:
        return None  # exact: no steps, no rails

    def _coefficients(self, h: float, r: float, kappa: float) -> tuple[np.ndarray, np.ndarray]:
        decay = np.exp(-self.rates * (r * h))
        std = np.sqrt(kappa * -np.expm1(-2.0 * self.rates * (r * h)) / self.rates)
        return decay, std

    def jump(self, x: np.ndarray, h: float, rng: np.random.Generator, r: float = 1.0,
             kappa: float = 0.0) -> np.ndarray:
        """One exact step of length h from node state x; returns the new node state."""
        if h <= 0.0:
            return x
        w = self.system.to_modes(x)
        decay, std = self._coefficients(h, r, kappa)
        w = self.target + decay * (w - self.target)
        if kappa > 0.0:
            w += std * rng.standard_normal(w.shape[0])
        return self.system.from_modes(w)

    def window(self, x: np.ndarray, h: float, n_steps: int, stride: int, rng: np.random.Generator,
               second_moment: bool, r: float = 1.0, kappa: float = 0.0) -> WindowResult:
        w = np.ascontiguousarray(self.system.to_modes(x))
        s = self.system
        if self.closed_form and stride == 0 and not second_moment:
            # only the mean and the final state are asked for: draw them in closed form
            last, total = draw_window(w, self.target, self.rates * r, kappa, h, n_steps,
                                      rng if kappa > 0.0 else None)
            return WindowResult(state=s.from_modes(last), total=s.from_modes(total),
                                samples=np.empty((0, s.n)), total_outer=None)
        width = self.width
        decay, std = self._coefficients(h, r, kappa)
        total = np.zeros(width)
        n_samples = n_steps // stride if stride > 0 else 0
        out = np.empty((n_samples, width))
        outer = np.zeros((width, width)) if second_moment else np.zeros((0, 0))

        def advance(noise: np.ndarray, k0: int) -> None:
            _modal_window(w, decay, std, self.target, noise, k0, stride, total, out, outer)

        run_blocks(n_steps, width, rng if kappa > 0.0 else None, advance)
        return WindowResult(
            state=s.from_modes(w),
            total=s.from_modes(total),
            samples=s.from_modes(out) if n_samples else np.empty((0, s.n)),
            total_outer=s.second_moment_from_modes(outer) if second_moment else None,
        )


class GeneralPropagator:
    """Exact propagation of a GeneralSystem; transitions cached per (h, r, kappa).

    ``method``: "auto" samples in the real eigenbasis of F when it is well conditioned (O(n) per
    step plus GEMMs, ``general_basis``) and otherwise uses the dense Lyapunov set-up with the
    per-step gemv kernel, Van Loan being the last resort; "dense" skips the eigenbasis; "van_loan"
    is the original set-up (kept as the reference the others are tested and timed against).
    ``path`` names what served the last window or jump.
    """

    def __init__(self, system: GeneralSystem, method: str = "auto") -> None:
        if method not in ("auto", "dense", "van_loan"):
            raise ValueError(f"method must be 'auto', 'dense' or 'van_loan', got {method!r}")
        if method == "auto" and system.dim <= general_basis.VAN_LOAN_MAX_DIM:
            method = "van_loan"  # see VAN_LOAN_MAX_DIM: small systems may keep the recorded stream
        self.system = system
        self.method = method
        self.path: str | None = None
        self._cache: dict[tuple[float, float, float], tuple[np.ndarray, np.ndarray, np.ndarray, str]] = {}
        self._step_cache: dict[tuple[float, float, float], BasisStep | None] = {}
        self._basis: EigenBasis | None = None
        self._basis_done = method != "auto"
        self._target_y: np.ndarray | None = None
        self._stationary: tuple[np.ndarray, float] | None = None

    @property
    def width(self) -> int:
        return self.system.dim

    @property
    def counters(self) -> StepCounters | None:
        return None  # exact: no steps, no rails

    @property
    def basis(self) -> EigenBasis | None:
        """The real block eigenbasis (built once, on first use), or None if F has no good one."""
        if not self._basis_done:
            s = self.system
            self._basis = eigen_basis(s.F, s.D, s.n_out)
            if self._basis is not None:
                self._target_y = self._basis.to_basis(s.target)
            self._basis_done = True
        return self._basis

    def prepare(self, h: float, r: float = 1.0, kappa: float = 0.0) -> str:
        """Build (and cache) the transition of step h; returns the path that will serve it:
        "eigenbasis", "lyapunov" or "van_loan". Windows and jumps do this on first use; the
        benchmark calls it to time set-up apart from sampling."""
        if self._basis_step(h, r, kappa) is not None:
            self.path = "eigenbasis"
        else:
            self.coefficients(h, r, kappa)
        return self.path

    def _basis_step(self, h: float, r: float, kappa: float) -> BasisStep | None:
        key = (h, r, kappa)
        if key not in self._step_cache:
            basis = self.basis
            step = None if basis is None else basis_step(basis, self._target_y, h, r, kappa)
            if len(self._step_cache) >= 8:
                self._step_cache.pop(next(iter(self._step_cache)))
            self._step_cache[key] = step
        return self._step_cache[key]

    def _van_loan(self, h: float, r: float, kappa: float) -> tuple[np.ndarray, np.ndarray]:
        """(Phi, Q) from the 2n x 2n Van Loan block exponential (Van Loan 1978)."""
        s = self.system
        n = s.dim
        f = s.F * r
        d = s.D * (kappa * r)
        # The block exponential holds e^{+F^T h}, which swamps Q by cancellation once ||F|| h is
        # large: evaluate it at h / 2^k with ||F|| h / 2^k <= 1/2 and square up exactly with
        # Phi(2h) = Phi(h)^2, Q(2h) = Phi(h) Q(h) Phi(h)^T + Q(h).
        k = max(0, int(np.ceil(np.log2(max(np.linalg.norm(f, 1) * h, 1e-300) / 0.5))))
        h0 = h / 2**k
        block = np.zeros((2 * n, 2 * n))
        block[:n, :n] = f
        block[:n, n:] = d
        block[n:, n:] = -f.T
        e = scipy.linalg.expm(block * h0)
        phi = e[n:, n:].T
        q = phi @ e[:n, n:]
        for _ in range(k):
            q = phi @ q @ phi.T + q
            phi = phi @ phi
        return phi, 0.5 * (q + q.T)

    def coefficients(self, h: float, r: float = 1.0, kappa: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(Phi, shift, chol) for step h in z coordinates: z <- Phi z + shift + chol xi.

        Dense set-up: Phi = e^{-r F h}, Q = kappa (S - Phi S Phi^T) with S solved once per program;
        Van Loan when the cancellation estimate or Q's spectrum rejects that (``general_basis``).
        """
        key = (h, r, kappa)
        hit = self._cache.get(key)
        if hit is not None:
            self.path = hit[3]
            return hit[:3]
        s = self.system
        n = s.dim
        path = "van_loan"
        chol = None
        if self.method != "van_loan":
            path = "lyapunov"
            if kappa > 0.0:
                if self._stationary is None:
                    self._stationary = stationary_covariance(s.F, s.D)
                phi, q, err = lyapunov_transition(s.F, *self._stationary, h, r, kappa)
                if err <= LYAPUNOV_REL_MAX:
                    # an eigenvalue below the error estimate means the estimate is wrong
                    chol = psd_factor(q, max(10.0 * err, 1e-12))
            else:
                phi = scipy.linalg.expm(s.F * (-r * h))
                chol = np.zeros((n, n))
            if chol is None:
                path = "van_loan"
        if path == "van_loan":
            phi, q = self._van_loan(h, r, kappa)
            # Q is PSD but can be singular (the RLC currents get no direct noise): an eigen square
            # root with negative round-off clipped is robust where Cholesky would fail.
            chol = psd_factor(q, np.inf)
        phi = np.ascontiguousarray(phi)
        shift = s.target - phi @ s.target
        if len(self._cache) >= 8:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = (phi, shift, chol, path)
        self.path = path
        return phi, shift, chol

    def jump(self, z: np.ndarray, h: float, rng: np.random.Generator, r: float = 1.0,
             kappa: float = 0.0) -> np.ndarray:
        if h <= 0.0:
            return z
        step = self._basis_step(h, r, kappa)
        if step is not None:
            basis = self._basis
            self.path = "eigenbasis"
            y = basis.to_basis(z)
            u = y - step.target
            y = step.target + step.pdiag * u + step.poff * u[basis.partner]
            if kappa > 0.0:
                y = y + step.lt.T @ rng.standard_normal(y.shape[0])
            return basis.x @ y
        phi, shift, chol = self.coefficients(h, r, kappa)
        z = phi @ z + shift
        if kappa > 0.0:
            z = z + chol @ rng.standard_normal(z.shape[0])
        return z

    def window(self, z: np.ndarray, h: float, n_steps: int, stride: int, rng: np.random.Generator,
               second_moment: bool, r: float = 1.0, kappa: float = 0.0) -> WindowResult:
        if n_steps <= 0:  # nothing to propagate: no set-up, and z keeps its bits
            n_out = self.system.n_out
            return WindowResult(state=np.array(z, dtype=np.float64), total=np.zeros(n_out),
                                samples=np.empty((0, n_out)),
                                total_outer=np.zeros((n_out, n_out)) if second_moment else None)
        step = self._basis_step(h, r, kappa)
        if step is not None:
            return self._basis_window(step, z, h, n_steps, stride, rng, second_moment, kappa)
        phi, shift, chol = self.coefficients(h, r, kappa)
        z = np.ascontiguousarray(z, dtype=np.float64).copy()
        n_out = self.system.n_out
        total = np.zeros(n_out)
        n_samples = n_steps // stride if stride > 0 else 0
        out = np.empty((n_samples, n_out))
        outer = np.zeros((n_out, n_out)) if second_moment else np.zeros((0, 0))

        def advance(noise: np.ndarray, k0: int) -> None:
            _general_window(z, phi, shift, chol, noise, k0, stride, total, out, outer, n_out)

        run_blocks(n_steps, self.width, rng if kappa > 0.0 else None, advance)
        return WindowResult(state=z, total=total, samples=out, total_outer=outer if second_moment else None)

    def _basis_window(self, step: BasisStep, z: np.ndarray, h: float, n_steps: int, stride: int,
                      rng: np.random.Generator, second_moment: bool, kappa: float) -> WindowResult:
        """The window in the block eigenbasis: sums in y, mapped to the readout once at the end."""
        basis = self._basis
        self.path = "eigenbasis"
        n = self.width
        y = np.ascontiguousarray(basis.to_basis(np.asarray(z, dtype=np.float64)))
        total = np.zeros(n)
        n_samples = n_steps // stride if stride > 0 else 0
        out = np.empty((n_samples, self.system.n_out))
        outer = np.zeros((n, n)) if second_moment else np.zeros((0, 0))
        x_out_t = np.ascontiguousarray(basis.x_out.T)
        bufs: list[np.ndarray] = []  # the kernel's state rows for one noise block, made once

        def advance(noise: np.ndarray, k0: int) -> None:
            if not bufs or bufs[0].shape[0] < noise.shape[0]:
                bufs[:] = [np.empty((noise.shape[0], n))]
            basis_window(y, step.pdiag, step.poff, basis.partner, step.target, step.lt, x_out_t, noise,
                         bufs[0], k0, stride, total, out, outer)

        run_blocks(n_steps, n, rng if kappa > 0.0 else None, advance)
        x_out = basis.x_out
        return WindowResult(state=basis.x @ y, total=x_out @ total, samples=out,
                            total_outer=x_out @ outer @ x_out.T if second_moment else None)
