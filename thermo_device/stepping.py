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
from .noise import FlickerPoles

FORM_DENSE, FORM_DIAGONAL, FORM_FACTORED = 0, 1, 2
SCHEME_EM, SCHEME_HEUN, SCHEME_BAOAB = 0, 1, 2
OVERDAMPED_SCHEMES = {"euler_maruyama": SCHEME_EM, "heun": SCHEME_HEUN}
UNDERDAMPED_SCHEMES = {"euler_maruyama": SCHEME_EM, "baoab": SCHEME_BAOAB}
# Below this size a hand loop beats the BLAS call overhead (measured: benchmarks/bench_kernels.py).
BLAS_MIN_DIM = 128
# Reassociation (vectorised reductions) and fused multiply-add, not the full "fast" set: with all
# of LLVM's fast-math flags, a kernel compiled in process and the same kernel loaded from numba's
# cache rounded differently (1 ulp in the Factored Heun state), so a daemon with a warm cache and
# a host compiling afresh disagreed; with these two they agree bit for bit, at the same speed
# (tests/test_determinism.py, benchmarks/bench_kernels.py).
FASTMATH = {"reassoc", "contract"}  # numba wants a set


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def _drift(form, a, d, j_in, j_out, hm, lam, b, eta, x, f):
    """f = b + eta - A x for the drift form (eta: the summed 1/f noise, empty when off)."""
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
        u = np.dot(j_in, x)
        v = np.dot(hm, u)
        jt = np.dot(v, j_out)
        for i in range(n):
            f[i] = b[i] - lam * x[i] - jt[i]
    if eta.shape[0] == n:
        for i in range(n):
            f[i] += eta[i]


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def _overdamped_steps(form, a, d, j_in, j_out, hm, lam, b, mob, sq_mob, x, dt, sig, noise, scheme,
                      rail, fl_state, fl_decay, fl_std, sub, k0, stride, total, out, total_outer, clipped):
    """dx = r C^-1 (b + eta - A x) dt + sqrt(2 kappa r) C^-1/2 dW, rails at +-rail (0: none).

    ``mob`` = r / c_i per cell (dt folded in by the caller through ``dt``), ``sq_mob`` = sqrt(1/c_i);
    ``sig`` = sqrt(2 kappa r dt). Flicker poles (P x N state) advance exactly per step.
    """
    n = x.shape[0]
    n_poles = fl_decay.shape[0]
    f = np.empty(n)
    f2 = np.empty(n)
    xt = np.empty(n)
    kick = np.zeros(n)
    eta = np.zeros(n if n_poles > 0 else 0)
    noisy = noise.shape[1] >= n
    for s in range(noise.shape[0]):
        if noisy:
            for i in range(n):
                kick[i] = sig * sq_mob[i] * noise[s, i]
        if n_poles > 0:
            for i in range(n):
                eta[i] = 0.0
            for p in range(n_poles):
                for i in range(n):
                    v = fl_decay[p] * fl_state[p, i] + fl_std[p] * noise[s, n + p * n + i]
                    fl_state[p, i] = v
                    eta[i] += v
        _drift(form, a, d, j_in, j_out, hm, lam, b, eta, x, f)
        if scheme == 0:
            for i in range(n):
                x[i] += dt * mob[i] * f[i] + kick[i]
        else:
            for i in range(n):
                xt[i] = x[i] + dt * mob[i] * f[i] + kick[i]
            _drift(form, a, d, j_in, j_out, hm, lam, b, eta, xt, f2)
            for i in range(n):
                x[i] += 0.5 * dt * mob[i] * (f[i] + f2[i]) + kick[i]
        if rail > 0.0:
            for i in range(n):
                if x[i] > rail:
                    x[i] = rail
                    clipped[0] += 1
                elif x[i] < -rail:
                    x[i] = -rail
                    clipped[0] += 1
        _record(x, n, sub, k0 + s + 1, stride, total, out, total_outer)


@njit(cache=True, nogil=True, fastmath=FASTMATH)
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
    """Euler-Maruyama or Heun for the overdamped array, any drift form and non-ideality.

    Args:
        drift: the drift as realised on the chip (Factored uses ``j_out`` for its J^T array).
        b: realised bias. cap: per-cell relative capacitances (None: 1). dt: the step bound.
        rail: saturation voltage (0: none). flicker: FlickerPoles or None; ``flicker_state``
            (P x N) is the 1/f noise state, owned by the caller so it survives reprogramming.
    """

    def __init__(self, drift: Drift, b: np.ndarray, dt: float, method: str, *, j_out: np.ndarray | None = None,
                 cap: np.ndarray | None = None, rail: float = 0.0, flicker: FlickerPoles | None = None,
                 flicker_state: np.ndarray | None = None) -> None:
        self.dt, self.scheme, self.rail = dt, OVERDAMPED_SCHEMES[method], rail
        self.b = np.ascontiguousarray(b, dtype=np.float64)
        self.n = n = self.b.shape[0]
        empty2, empty1 = np.zeros((0, 0)), np.zeros(0)
        self.a, self.d, self.j_in, self.j_out, self.hm, self.lam = empty2, empty1, empty2, empty2, empty2, 0.0
        if isinstance(drift, Dense):
            self.form, self.a = FORM_DENSE, np.ascontiguousarray(drift.matrix, dtype=np.float64)
        elif isinstance(drift, Diagonal):
            self.form, self.d = FORM_DIAGONAL, np.ascontiguousarray(drift.diag, dtype=np.float64)
        elif isinstance(drift, Factored):
            self.form = FORM_FACTORED
            self.j_in = np.ascontiguousarray(drift.J, dtype=np.float64)
            self.j_out = self.j_in if j_out is None else np.ascontiguousarray(j_out, dtype=np.float64)
            self.hm = np.ascontiguousarray(drift.H, dtype=np.float64)
            self.lam = float(drift.damping)
        self.inv_cap = np.ones(n) if cap is None else 1.0 / np.asarray(cap, dtype=np.float64)
        self.sq_inv_cap = np.sqrt(self.inv_cap)
        self.flicker = flicker
        self.fl_state = flicker_state if flicker is not None else np.zeros((0, n))
        self.clipped = np.zeros(1, dtype=np.int64)
        self.steps_taken = 0

    @property
    def width(self) -> int:
        return self.n

    def _advance(self, x, h, n_adc, stride, rng, total, out, outer, r, kappa, record=True):
        sub = _substeps(h, self.dt)
        step = h / sub
        sig = math.sqrt(2.0 * kappa * r * step)
        mob = r * self.inv_cap
        if self.flicker is not None:
            fl_decay = np.exp(-self.flicker.rates * r * step)
            fl_std = np.sqrt(self.flicker.variance * -np.expm1(-2.0 * self.flicker.rates * r * step))
        else:
            fl_decay = fl_std = np.zeros(0)
        width = self.n * (1 + (self.flicker.count if self.flicker is not None else 0))
        noisy = kappa > 0.0

        def advance(noise: np.ndarray, k0: int) -> None:
            _overdamped_steps(self.form, self.a, self.d, self.j_in, self.j_out, self.hm, self.lam, self.b,
                              mob, self.sq_inv_cap, x, step, sig, noise, self.scheme, self.rail,
                              self.fl_state, fl_decay, fl_std, sub if record else 0, k0, stride,
                              total, out, outer, self.clipped)

        run_blocks(sub * n_adc, width, rng if noisy else None, advance)
        self.steps_taken += sub * n_adc
        return step

    def jump(self, x: np.ndarray, h: float, rng: np.random.Generator, r: float = 1.0,
             kappa: float = 0.0) -> np.ndarray:
        if h <= 0.0:
            return x
        x = np.ascontiguousarray(x, dtype=np.float64).copy()
        e1, e2 = np.zeros(0), np.zeros((0, 0))
        self._advance(x, h, 1, 0, rng, e1, e2, e2, r, kappa, record=False)
        return x

    def window(self, x: np.ndarray, h: float, n_steps: int, stride: int, rng: np.random.Generator,
               second_moment: bool, r: float = 1.0, kappa: float = 0.0) -> WindowResult:
        x = np.ascontiguousarray(x, dtype=np.float64).copy()
        total = np.zeros(self.n)
        out = np.empty((n_steps // stride if stride > 0 else 0, self.n))
        outer = np.zeros((self.n, self.n)) if second_moment else np.zeros((0, 0))
        self.last_step = self._advance(x, h, n_steps, stride, rng, total, out, outer, r, kappa)
        return WindowResult(state=x, total=total, samples=out, total_outer=outer if second_moment else None)


class UnderdampedStepper:
    """Euler-Maruyama or BAOAB for the RLC array, state z = [v, i]."""

    def __init__(self, drift: Drift, dt: float, method: str, inductance: float, resistance: float) -> None:
        c = np.diag(drift.diag) if isinstance(drift, Diagonal) else np.asarray(drift.matrix, dtype=np.float64)
        c = 0.5 * (c + c.T)
        self.cinv = np.ascontiguousarray(np.linalg.inv(c))
        self.dt, self.scheme = dt, UNDERDAMPED_SCHEMES[method]
        self.inductance, self.resistance = inductance, resistance
        self.n = c.shape[0]
        self._fric: dict[tuple[float, float], tuple[np.ndarray, np.ndarray]] = {}
        self.clipped = np.zeros(1, dtype=np.int64)
        self.steps_taken = 0

    @property
    def width(self) -> int:
        return 2 * self.n

    def _friction(self, step: float, kappa: float) -> tuple[np.ndarray, np.ndarray]:
        key = (step, kappa)
        hit = self._fric.get(key)
        if hit is None:
            e = scipy.linalg.expm(-step * self.cinv / self.resistance)
            q = kappa * self.resistance * (self.cinv - e @ self.cinv @ e.T)
            w, u = np.linalg.eigh(0.5 * (q + q.T))
            hit = (np.ascontiguousarray(e), np.ascontiguousarray(u * np.sqrt(np.clip(w, 0.0, None))))
            self._fric = {key: hit}
        return hit

    def _advance(self, z, h, n_adc, stride, rng, total, out, outer, r, kappa, record=True):
        # temperature acts as time dilation: r scales every rate, i.e. the step in device time
        sub = _substeps(h * r, self.dt)
        step = h * r / sub
        e_fric, l_fric = self._friction(step, kappa) if self.scheme == SCHEME_BAOAB else (self.cinv, self.cinv)
        sig = math.sqrt(2.0 * kappa * step)

        def advance(noise: np.ndarray, k0: int) -> None:
            _underdamped_steps(z, self.cinv, e_fric, l_fric, self.inductance, self.resistance, step, sig,
                               noise, self.scheme, sub if record else 0, k0, stride, total, out, outer)

        run_blocks(sub * n_adc, self.n, rng if kappa > 0.0 else None, advance)
        self.steps_taken += sub * n_adc
        return step / r

    def jump(self, z: np.ndarray, h: float, rng: np.random.Generator, r: float = 1.0,
             kappa: float = 0.0) -> np.ndarray:
        if h <= 0.0:
            return z
        z = np.ascontiguousarray(z, dtype=np.float64).copy()
        e1, e2 = np.zeros(0), np.zeros((0, 0))
        self._advance(z, h, 1, 0, rng, e1, e2, e2, r, kappa, record=False)
        return z

    def window(self, z: np.ndarray, h: float, n_steps: int, stride: int, rng: np.random.Generator,
               second_moment: bool, r: float = 1.0, kappa: float = 0.0) -> WindowResult:
        z = np.ascontiguousarray(z, dtype=np.float64).copy()
        total = np.zeros(self.n)
        out = np.empty((n_steps // stride if stride > 0 else 0, self.n))
        outer = np.zeros((self.n, self.n)) if second_moment else np.zeros((0, 0))
        self.last_step = self._advance(z, h, n_steps, stride, rng, total, out, outer, r, kappa)
        return WindowResult(state=z, total=total, samples=out, total_outer=outer if second_moment else None)
