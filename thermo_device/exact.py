"""Exact-in-distribution propagation of linear, time-invariant dynamics at any step size.

Modal (symmetric A, see ``dynamics.ModalSystem``): each mode w_i with rate a_i is a scalar OU
process, and over a step h exactly::

    w_i <- w*_i + e^{-a_i h} (w_i - w*_i) + sqrt(kappa (1 - e^{-2 a_i h}) / a_i) xi_i

O(R) per readout sample. General (``dynamics.GeneralSystem``, any positive-stable F)::

    z <- z* + Phi (z - z*) + chol(Q) xi,     Phi = e^{-F h},  Q = int_0^h e^{-F s} D e^{-F^T s} ds

with Phi and Q from the matrix exponential of the Van Loan block matrix [[F, D], [0, -F^T]] h
(Van Loan 1978), taken at h / 2^k and squared up so that large steps keep their precision. This does not assume F is normal; thermox's diagonalisation shortcut does, and
gives wrong covariances for non-normal F. O(n^2) per sample after an O(n^3) set-up per step size.

Gaussian noise is drawn in blocks with NumPy's Generator (about twice numba's in-kernel rate) and
the whole time loop of a block runs inside a numba kernel. Both classes satisfy
``propagator.Propagator``.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from numba import njit

from .dynamics import GeneralSystem, ModalSystem
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
        g = k0 + j + 1
        if stride > 0 and g % stride == 0:
            out[g // stride - 1, :] = w
        if outer:
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
    """Exact propagation of a GeneralSystem (Van Loan); transitions cached per (h, r, kappa)."""

    def __init__(self, system: GeneralSystem) -> None:
        self.system = system
        self._cache: dict[tuple[float, float, float], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @property
    def width(self) -> int:
        return self.system.dim

    @property
    def counters(self) -> StepCounters | None:
        return None  # exact: no steps, no rails

    def coefficients(self, h: float, r: float = 1.0, kappa: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(Phi, shift, chol) for step h: z <- Phi z + shift + chol xi."""
        key = (h, r, kappa)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
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
        phi = np.ascontiguousarray(phi)
        q = 0.5 * (q + q.T)
        # Q is PSD but can be singular (the RLC currents get no direct noise): an eigen square
        # root with negative round-off clipped is robust where Cholesky would fail.
        evals, evecs = np.linalg.eigh(q)
        chol = np.ascontiguousarray(evecs * np.sqrt(np.clip(evals, 0.0, None)))
        shift = s.target - phi @ s.target
        if len(self._cache) >= 8:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = (phi, shift, chol)
        return phi, shift, chol

    def jump(self, z: np.ndarray, h: float, rng: np.random.Generator, r: float = 1.0,
             kappa: float = 0.0) -> np.ndarray:
        if h <= 0.0:
            return z
        phi, shift, chol = self.coefficients(h, r, kappa)
        z = phi @ z + shift
        if kappa > 0.0:
            z = z + chol @ rng.standard_normal(z.shape[0])
        return z

    def window(self, z: np.ndarray, h: float, n_steps: int, stride: int, rng: np.random.Generator,
               second_moment: bool, r: float = 1.0, kappa: float = 0.0) -> WindowResult:
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
