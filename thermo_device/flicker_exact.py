"""1/f noise on the exact modal path: each mode with its own flicker poles, propagated exactly.

The 1/f model (``noise.py``) drives every cell with eta = sum_p eta_p, P independent OU processes
per cell (rates g_p, stationary variance v each). For a symmetric drift without per-cell
capacitances the noise is isotropic, so in any orthonormal basis the projections of eta_p are
again independent OU processes with the same g_p and v: every mode w of the modal system
(``dynamics.ModalSystem``, including the carried complement) gets P private poles e_p, and

    du   = (-a u + sum_p e_p) dt + sqrt(2 kappa) dB          u = w - w*
    de_p = -g_p e_p dt + sqrt(2 g_p v) dB_p

is linear: over a step tau (time already multiplied by the temperature's rate factor r) exactly

    e_p' = rho_p e_p + sigma_p zeta_p,                       rho_p = e^{-g_p tau}, sigma_p^2 = v (1 - rho_p^2)
    u'   = alpha u + sum_p beta_p e_p + sum_p c_p zeta_p + s xi
    alpha = e^{-a tau},   beta_p = int_0^tau e^{-a (tau - t)} e^{-g_p t} dt

with the noise split so that (u', e_p') has the exact joint covariance:
    Cov(u', e_p') = 2 g_p v J1_p,  J1_p = int_0^tau beta_p(t) e^{-g_p t} dt = -I[a + g_p, 2 g_p]
    Var(u' | e)   = kappa (1 - alpha^2) / a + sum_p (2 g_p v J2_p - Cov_p^2 / sigma_p^2),
    J2_p = int_0^tau beta_p(t)^2 dt = 2 I[2 g_p, a + g_p, 2 a],   c_p = Cov_p / sigma_p,
where I(k) = int_0^tau e^{-k t} dt and I[.,.], I[.,.,.] are its divided differences in k, taken
from one matrix exponential per (a, g_p) (``_divided_differences``: Opitz's formula on the
bidiagonal matrix of the points; no cancellation when a is close to g_p). Exact in distribution;
the stationary variance of a mode is kappa / a + sum_p v / (a (a + g_p)) (tested).

The 1/f state is the chip's (``noise.FlickerNoise``: P x N in node coordinates, kept across
programs and in snapshots): each call maps it into the modes and back. Per readout sample the
cost is O(R (1 + P)) with R modes, against O(N m) per step of a time stepper. Applies when the
profile has no rails and no per-cell capacitance mismatch (``programming.program``); samples,
second moments and a non-ideal ADC are supported (every sample is drawn).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from numba import njit

from .dynamics import ModalSystem
from .exact import record_modes
from .noise import FlickerState
from .propagator import StepCounters, WindowResult, run_blocks


def _divided_differences(x0: np.ndarray, x1: np.ndarray, x2: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """(I[x0, x1], I[x0, x1, x2]) of I(k) = int_0^tau e^{-k t} dt, elementwise.

    Opitz: for the upper bidiagonal X with diagonal (x0, x1, x2) and ones above it, f(X) holds
    f[x0, x1] at (0, 1) and f[x0, x1, x2] at (0, 2). I(X) is the top-right block of
    exp([[-X, 1], [0, 0]] tau) (Van Loan), whose eigenvalues are -x tau <= 0 and 0: a
    well-conditioned exponential for any tau.
    """
    k = x0.shape[0]
    m = np.zeros((k, 6, 6))
    m[:, 0, 0], m[:, 1, 1], m[:, 2, 2] = -x0, -x1, -x2
    m[:, 0, 1] = m[:, 1, 2] = -1.0
    m[:, 0, 3] = m[:, 1, 4] = m[:, 2, 5] = 1.0
    e = scipy.linalg.expm(m * tau)
    return e[:, 0, 4], e[:, 0, 5]


def flicker_coefficients(rates: np.ndarray, poles: np.ndarray, variance: float, kappa: float,
                         tau: float) -> dict[str, np.ndarray]:
    """The exact one-step coefficients of the module docstring for every (mode rate, pole).

    Returns alpha, s (R,), beta, c (R, P), rho, sigma (P,).
    """
    r_n, p_n = rates.shape[0], poles.shape[0]
    a = np.repeat(rates, p_n)
    g = np.tile(poles, r_n)
    dd1, dd2 = _divided_differences(2.0 * g, a + g, 2.0 * a, tau)
    j1 = -dd1  # int beta e^{-g t} = (I(a + g) - I(2 g)) / (g - a)
    j2 = 2.0 * dd2  # equally spaced points 2g, a + g, 2a (spacing a - g)
    d = np.abs(a - g) * tau
    phi = np.where(d > 1e-12, -np.expm1(-d) / np.where(d > 1e-12, d, 1.0), 1.0)
    beta = np.exp(-np.minimum(a, g) * tau) * tau * phi
    rho = np.exp(-poles * tau)
    var_e = variance * -np.expm1(-2.0 * poles * tau)
    sigma = np.sqrt(var_e)
    cov = (2.0 * g * variance * j1).reshape(r_n, p_n)
    var_x = (2.0 * g * variance * j2).reshape(r_n, p_n)
    safe = np.where(var_e > 0.0, var_e, 1.0)
    c = np.where(var_e > 0.0, cov / np.sqrt(safe), 0.0)
    resid = np.clip(var_x - np.where(var_e > 0.0, cov**2 / safe, 0.0), 0.0, None)
    alpha = np.exp(-rates * tau)
    white = kappa * -np.expm1(-2.0 * rates * tau) / rates
    return {"alpha": alpha, "s": np.sqrt(white + resid.sum(axis=1)), "beta": beta.reshape(r_n, p_n),
            "c": c, "rho": rho, "sigma": sigma}


@njit(cache=True, nogil=True)
def _flicker_window(u, e, coef, noise, k0, stride, total, out, total_outer):
    """Advance every mode and its poles by noise.shape[0] exact steps (u = w - w*: deviations).

    coef = (alpha, s, beta, c, rho, sigma); noise rows hold R normals for the modes then R x P
    for the poles (mode-major). Sums of u over steps go to ``total``; every stride-th u to ``out``.
    """
    alpha, s, beta, c, rho, sigma = coef
    r_n, p_n = e.shape
    noisy = noise.shape[1] == r_n * (1 + p_n)
    outer = total_outer.shape[0] == r_n
    for j in range(noise.shape[0]):
        for i in range(r_n):
            v = alpha[i] * u[i]
            for p in range(p_n):
                v += beta[i, p] * e[i, p]
            if noisy:
                v += s[i] * noise[j, i]
                base = r_n + i * p_n
                for p in range(p_n):
                    z = noise[j, base + p]
                    v += c[i, p] * z
                    e[i, p] = rho[p] * e[i, p] + sigma[p] * z
            else:
                for p in range(p_n):
                    e[i, p] = rho[p] * e[i, p]
            u[i] = v
            total[i] += v
        record_modes(u, k0 + j + 1, stride, out, total_outer, outer)


class FlickerModalPropagator:
    """Exact propagation of a ModalSystem driven by white and 1/f noise (module docstring)."""

    def __init__(self, system: ModalSystem, flicker: FlickerState) -> None:
        if system.cell_scale is not None:
            raise ValueError("per-cell capacitances make the projected 1/f noise correlated across modes")
        self.system = system
        self.poles = flicker.poles
        self.state = flicker.state  # P x N, node coordinates: the noise model's, updated in place
        self.rates = np.ascontiguousarray(system.all_rates)
        self.target = np.ascontiguousarray(system.target)
        self._cache: dict[tuple[float, float], dict[str, np.ndarray]] = {}

    @property
    def width(self) -> int:
        return self.rates.shape[0] * (1 + self.poles.count)

    @property
    def counters(self) -> StepCounters | None:
        return None  # exact: no steps, no rails

    def _coef(self, tau: float, kappa: float) -> tuple[np.ndarray, ...]:
        key = (tau, kappa)
        hit = self._cache.get(key)
        if hit is None:
            # distinct rates only (a Factored complement repeats one rate N times)
            uniq, inverse = np.unique(self.rates, return_inverse=True)
            k = flicker_coefficients(uniq, self.poles.rates, self.poles.variance, kappa, tau)
            hit = {name: (np.ascontiguousarray(k[name][inverse]) if name in ("alpha", "s", "beta", "c")
                          else k[name]) for name in k}
            if len(self._cache) >= 8:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = hit
        return (hit["alpha"], hit["s"], hit["beta"], hit["c"], hit["rho"], hit["sigma"])

    def _poles_to_modes(self) -> np.ndarray:
        return np.ascontiguousarray(np.stack([self.system.to_modes(row) for row in self.state], axis=1))

    def _poles_back(self, e: np.ndarray) -> None:
        for p in range(e.shape[1]):
            self.state[p] = self.system.from_modes(np.ascontiguousarray(e[:, p]))

    def _advance(self, x: np.ndarray, tau: float, n_steps: int, stride: int, rng: np.random.Generator,
                 second_moment: bool, kappa: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        u = np.ascontiguousarray(self.system.to_modes(x) - self.target)
        e = self._poles_to_modes()
        coef = self._coef(tau, kappa)
        r_n = u.shape[0]
        total = np.zeros(r_n)
        out = np.empty((n_steps // stride if stride > 0 else 0, r_n))
        outer = np.zeros((r_n, r_n)) if second_moment else np.zeros((0, 0))
        noisy = kappa > 0.0 or self.poles.variance > 0.0

        def advance(noise: np.ndarray, k0: int) -> None:
            _flicker_window(u, e, coef, noise, k0, stride, total, out, outer)

        run_blocks(n_steps, self.width, rng if noisy else None, advance)
        self._poles_back(e)
        return u, total, out, outer

    def jump(self, x: np.ndarray, h: float, rng: np.random.Generator, r: float = 1.0,
             kappa: float = 0.0) -> np.ndarray:
        if h <= 0.0:
            return x
        u, _, _, _ = self._advance(x, h * r, 1, 0, rng, False, kappa)
        return self.system.from_modes(u + self.target)

    def window(self, x: np.ndarray, h: float, n_steps: int, stride: int, rng: np.random.Generator,
               second_moment: bool, r: float = 1.0, kappa: float = 0.0) -> WindowResult:
        u, total, out, outer = self._advance(x, h * r, n_steps, stride, rng, second_moment, kappa)
        s = self.system
        t = self.target
        mean_sum = total + n_steps * t
        if second_moment:
            # sum (u + t)(u + t)^T = sum u u^T + t (sum u)^T + (sum u) t^T + n t t^T
            outer = outer + np.outer(t, total) + np.outer(total, t) + n_steps * np.outer(t, t)
        return WindowResult(
            state=s.from_modes(u + t),
            total=s.from_modes(mean_sum),
            samples=s.from_modes(out + t) if out.shape[0] else np.empty((0, s.n)),
            total_outer=s.second_moment_from_modes(outer) if second_moment else None,
        )
