"""Time-stepping integrators (numba kernels) for dynamics the exact path cannot do.

Overdamped, with h the step and xi ~ N(0, I) per step:

* ``euler_maruyama``: x <- x + h (b - A x) + sqrt(2 kappa h) xi. Its time average is unbiased
  for every stable h, but its stationary covariance is kappa A^-1 (I - h A / 2)^-1.
* ``heun`` (stochastic Heun, additive noise: weak order 2): predictor x~ = x + h f(x) + s xi,
  corrector x <- x + h/2 (f(x) + f(x~)) + s xi. The covariance bias falls to O(h^2).

Underdamped RLC array (z = [v, i], C the capacitance matrix):

* ``euler_maruyama`` on the 2N-dimensional system.
* ``baoab`` (Leimkuhler-Matthews splitting) with momentum p = C v: half kicks
  v -= h/2 C^-1 i, half drifts i += h/2 v / L, and an exact O-step for the friction
  v <- E v + chol(kappa R (C^-1 - E C^-1 E^T)) xi with E = e^{-h C^-1 / R}.

Drift forms are evaluated without forming A: Dense by a matvec (BLAS above ``BLAS_MIN_DIM``),
Diagonal elementwise, Factored as b - lambda x - J^T (H (J x)) in O(mN + m^2).
The whole time loop of a noise block runs inside one kernel.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
from numba import njit

from protocol.drift import Dense, Diagonal, Drift, Factored

from .exact import WindowResult, run_blocks

FORM_DENSE, FORM_DIAGONAL, FORM_FACTORED = 0, 1, 2
SCHEME_EM, SCHEME_HEUN, SCHEME_BAOAB = 0, 1, 2
OVERDAMPED_SCHEMES = {"euler_maruyama": SCHEME_EM, "heun": SCHEME_HEUN}
UNDERDAMPED_SCHEMES = {"euler_maruyama": SCHEME_EM, "baoab": SCHEME_BAOAB}
# Below this size a hand loop beats the BLAS call overhead (measured: benchmarks/bench_kernels.py).
BLAS_MIN_DIM = 128


@njit(cache=True, fastmath=True)
def _drift(form, a, d, j, hm, lam, b, x, f):
    """f = b - A x for the drift form."""
    n = x.shape[0]
    if form == 0:
        if n >= BLAS_MIN_DIM:
            ax = np.dot(a, x)
            for i in range(n):
                f[i] = b[i] - ax[i]
        else:
            for i in range(n):
                s = 0.0
                for k in range(n):
                    s += a[i, k] * x[k]
                f[i] = b[i] - s
    elif form == 1:
        for i in range(n):
            f[i] = b[i] - d[i] * x[i]
    else:
        u = np.dot(j, x)
        v = np.dot(hm, u)
        jt = np.dot(v, j)
        for i in range(n):
            f[i] = b[i] - lam * x[i] - jt[i]


@njit(cache=True)
def _record(x, n_out, sub, g, stride, total, out, total_outer):
    """Readout bookkeeping after global step g: an ADC sample every ``sub`` steps."""
    if sub <= 0 or g % sub != 0:
        return
    k = g // sub
    for i in range(n_out):
        total[i] += x[i]
    if stride > 0 and k % stride == 0:
        out[k // stride - 1, :] = x[:n_out]
    if total_outer.shape[0] == n_out:
        for p in range(n_out):
            xp = x[p]
            for q in range(n_out):
                total_outer[p, q] += xp * x[q]


@njit(cache=True, fastmath=True)
def _overdamped_steps(form, a, d, j, hm, lam, b, x, dt, sig, noise, scheme, sub, k0, stride,
                      total, out, total_outer):
    n = x.shape[0]
    f = np.empty(n)
    f2 = np.empty(n)
    xt = np.empty(n)
    kick = np.zeros(n)
    noisy = noise.shape[1] == n
    for s in range(noise.shape[0]):
        if noisy:
            for i in range(n):
                kick[i] = sig * noise[s, i]
        _drift(form, a, d, j, hm, lam, b, x, f)
        if scheme == 0:
            for i in range(n):
                x[i] += dt * f[i] + kick[i]
        else:
            for i in range(n):
                xt[i] = x[i] + dt * f[i] + kick[i]
            _drift(form, a, d, j, hm, lam, b, xt, f2)
            for i in range(n):
                x[i] += 0.5 * dt * (f[i] + f2[i]) + kick[i]
        _record(x, n, sub, k0 + s + 1, stride, total, out, total_outer)


@njit(cache=True, fastmath=True)
def _underdamped_steps(z, cinv, e_fric, l_fric, inductance, resistance, dt, sig, noise, scheme,
                       sub, k0, stride, total, out, total_outer):
    n = cinv.shape[0]
    noisy = noise.shape[1] == n
    v = z[:n]
    i_l = z[n:]
    for s in range(noise.shape[0]):
        if scheme == 0:
            rhs = np.empty(n)
            for k in range(n):
                rhs[k] = v[k] / resistance + i_l[k]
            dv = np.dot(cinv, rhs)
            kick = np.dot(cinv, noise[s]) if noisy else np.zeros(n)
            for k in range(n):
                i_l[k] += dt * v[k] / inductance
                v[k] += -dt * dv[k] + sig * kick[k]
        else:
            half = 0.5 * dt
            kick = np.dot(cinv, i_l)
            for k in range(n):
                v[k] -= half * kick[k]
                i_l[k] += half * v[k] / inductance
            vn = np.dot(e_fric, v)
            if noisy:
                vn += np.dot(l_fric, noise[s])
            for k in range(n):
                v[k] = vn[k]
                i_l[k] += half * v[k] / inductance
            kick = np.dot(cinv, i_l)
            for k in range(n):
                v[k] -= half * kick[k]
        _record(z, n, sub, k0 + s + 1, stride, total, out, total_outer)


def _substeps(h: float, dt: float) -> int:
    return max(1, math.ceil(h / dt - 1e-9))


class OverdampedStepper:
    """Euler-Maruyama or Heun for dx = (b - A x) dt + sqrt(2 kappa) dW, any drift form."""

    def __init__(self, drift: Drift, b: np.ndarray, kappa: float, dt: float, method: str) -> None:
        self.kappa, self.dt, self.scheme = kappa, dt, OVERDAMPED_SCHEMES[method]
        self.b = np.ascontiguousarray(b, dtype=np.float64)
        empty2, empty1 = np.zeros((0, 0)), np.zeros(0)
        self.a, self.d, self.j, self.hm, self.lam = empty2, empty1, empty2, empty2, 0.0
        if isinstance(drift, Dense):
            self.form, self.a = FORM_DENSE, np.ascontiguousarray(drift.matrix, dtype=np.float64)
        elif isinstance(drift, Diagonal):
            self.form, self.d = FORM_DIAGONAL, np.ascontiguousarray(drift.diag, dtype=np.float64)
        elif isinstance(drift, Factored):
            self.form = FORM_FACTORED
            self.j = np.ascontiguousarray(drift.J, dtype=np.float64)
            self.hm = np.ascontiguousarray(drift.H, dtype=np.float64)
            self.lam = float(drift.damping)
        self.n = self.b.shape[0]

    @property
    def width(self) -> int:
        return self.n

    def _advance(self, x, h, n_adc, stride, rng, total, out, outer, sub_override=None):
        sub = _substeps(h, self.dt)
        step = h / sub
        sig = math.sqrt(2.0 * self.kappa * step)
        n_steps = sub * n_adc

        def advance(noise: np.ndarray, k0: int) -> None:
            _overdamped_steps(self.form, self.a, self.d, self.j, self.hm, self.lam, self.b, x, step, sig,
                              noise, self.scheme, sub if sub_override is None else sub_override, k0,
                              stride, total, out, outer)

        run_blocks(n_steps, self.n, rng if self.kappa > 0.0 else None, advance)
        return step

    def jump(self, x: np.ndarray, h: float, rng: np.random.Generator) -> np.ndarray:
        if h <= 0.0:
            return x
        x = np.ascontiguousarray(x, dtype=np.float64).copy()
        e1, e2 = np.zeros(0), np.zeros((0, 0))
        self._advance(x, h, 1, 0, rng, e1, e2, e2, sub_override=0)
        return x

    def window(self, x: np.ndarray, h: float, n_steps: int, stride: int, rng: np.random.Generator,
               second_moment: bool) -> WindowResult:
        x = np.ascontiguousarray(x, dtype=np.float64).copy()
        total = np.zeros(self.n)
        out = np.empty((n_steps // stride if stride > 0 else 0, self.n))
        outer = np.zeros((self.n, self.n)) if second_moment else np.zeros((0, 0))
        self.last_step = self._advance(x, h, n_steps, stride, rng, total, out, outer)
        return WindowResult(state=x, total=total, samples=out, total_outer=outer if second_moment else None)


class UnderdampedStepper:
    """Euler-Maruyama or BAOAB for the RLC array, state z = [v, i]."""

    def __init__(self, drift: Drift, kappa: float, dt: float, method: str, inductance: float,
                 resistance: float) -> None:
        c = np.diag(drift.diag) if isinstance(drift, Diagonal) else np.asarray(drift.matrix, dtype=np.float64)
        c = 0.5 * (c + c.T)
        self.cinv = np.ascontiguousarray(np.linalg.inv(c))
        self.kappa, self.dt, self.scheme = kappa, dt, UNDERDAMPED_SCHEMES[method]
        self.inductance, self.resistance = inductance, resistance
        self.n = c.shape[0]
        self._fric: dict[float, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def width(self) -> int:
        return 2 * self.n

    def _friction(self, step: float) -> tuple[np.ndarray, np.ndarray]:
        hit = self._fric.get(step)
        if hit is None:
            e = scipy.linalg.expm(-step * self.cinv / self.resistance)
            q = self.kappa * self.resistance * (self.cinv - e @ self.cinv @ e.T)
            w, u = np.linalg.eigh(0.5 * (q + q.T))
            hit = (np.ascontiguousarray(e), np.ascontiguousarray(u * np.sqrt(np.clip(w, 0.0, None))))
            self._fric = {step: hit}
        return hit

    def _advance(self, z, h, n_adc, stride, rng, total, out, outer, record=True):
        sub = _substeps(h, self.dt)
        step = h / sub
        e_fric, l_fric = self._friction(step) if self.scheme == SCHEME_BAOAB else (self.cinv, self.cinv)
        sig = math.sqrt(2.0 * self.kappa * step)

        def advance(noise: np.ndarray, k0: int) -> None:
            _underdamped_steps(z, self.cinv, e_fric, l_fric, self.inductance, self.resistance, step, sig,
                               noise, self.scheme, sub if record else 0, k0, stride, total, out, outer)

        run_blocks(sub * n_adc, self.n, rng if self.kappa > 0.0 else None, advance)
        return step

    def jump(self, z: np.ndarray, h: float, rng: np.random.Generator) -> np.ndarray:
        if h <= 0.0:
            return z
        z = np.ascontiguousarray(z, dtype=np.float64).copy()
        e1, e2 = np.zeros(0), np.zeros((0, 0))
        self._advance(z, h, 1, 0, rng, e1, e2, e2, record=False)
        return z

    def window(self, z: np.ndarray, h: float, n_steps: int, stride: int, rng: np.random.Generator,
               second_moment: bool) -> WindowResult:
        z = np.ascontiguousarray(z, dtype=np.float64).copy()
        total = np.zeros(self.n)
        out = np.empty((n_steps // stride if stride > 0 else 0, self.n))
        outer = np.zeros((self.n, self.n)) if second_moment else np.zeros((0, 0))
        self.last_step = self._advance(z, h, n_steps, stride, rng, total, out, outer)
        return WindowResult(state=z, total=total, samples=out, total_outer=outer if second_moment else None)
