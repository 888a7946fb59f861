"""Time-stepping integrators (numba kernels) for dynamics the exact path cannot do.

Overdamped, with h the step and xi ~ N(0, I) per step:

* ``euler_maruyama``: x <- x + h (b - A x) + sqrt(2 kappa h) xi. Its time average is unbiased
  for every stable h, but its stationary covariance is kappa A^-1 (I - h A / 2)^-1.
* ``heun`` (stochastic Heun, additive noise: weak order 2): predictor x~ = x + h f(x) + s xi,
  corrector x <- x + h/2 (f(x) + f(x~)) + s xi. The covariance bias falls to O(h^2).

Underdamped RLC array (z = [v, i], C the capacitance matrix, noise sqrt(2 kappa / R) C^-1 dW:
the resistors' Johnson currents, so that the stationary voltage covariance is kappa C^-1):

* ``euler_maruyama`` on the 2N-dimensional system: v += ... + sqrt(2 kappa h / R) C^-1 xi.
* ``baoab`` (Leimkuhler-Matthews splitting) with momentum p = C v: half kicks
  v -= h/2 C^-1 i, half drifts i += h/2 v / L, and an exact O-step for the friction
  v <- E v + chol(kappa (C^-1 - E C^-1 E^T)) xi with E = e^{-h C^-1 / R} (the exact transition
  of dv = -C^-1 R^-1 v dt + sqrt(2 kappa / R) C^-1 dW, whose stationary covariance is kappa C^-1).

Drift forms are evaluated without forming A: Dense by a matvec (BLAS above ``BLAS_MIN_DIM``),
Diagonal elementwise, Factored as b - lambda x - J^T (H (J x)) in O(mN + m^2).
The whole time loop of a noise block runs inside one kernel. Kernel arguments travel as a few
small records (tuples: drift, motion, flicker, readout) named in each kernel's docstring. Both
steppers satisfy ``propagator.Propagator``.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
from numba import njit

from protocol.drift import Drift

from .noise import FlickerState
from .propagator import StepCounters, WindowResult, run_blocks

FORM_DENSE, FORM_DIAGONAL, FORM_FACTORED = 0, 1, 2
_FORMS = {"dense": FORM_DENSE, "diagonal": FORM_DIAGONAL, "factored": FORM_FACTORED}
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
def _drift(drift, eta, x, f):
    """f = b + eta - A x for the drift record (eta: the summed 1/f noise, empty when off).

    drift = (form, a, d, j_in, j_out, hm, lam, b): the arrays of the unused forms are empty.
    """
    form, a, d, j_in, j_out, hm, lam, b = drift
    n = x.shape[0]
    if form == FORM_DENSE:
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
    elif form == FORM_DIAGONAL:
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
def _record(x, n_out, readout, g):
    """Readout bookkeeping after global step g: an ADC sample every ``sub`` steps.

    readout = (sub, k0, stride, total, out, total_outer); sub = 0 records nothing (jumps).
    """
    sub, _, stride, total, out, total_outer = readout
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
def _overdamped_steps(x, noise, drift, motion, flicker, readout):
    """dx = r C^-1 (b + eta - A x) dt + sqrt(2 kappa r) C^-1/2 dW, rails at +-rail (0: none).

    motion = (scheme, dt, mob, sig, sq_mob, rail, clipped): ``mob`` = r / c_i per cell (dt folded
    in through ``dt``), ``sq_mob`` = sqrt(1/c_i), ``sig`` = sqrt(2 kappa r dt), ``clipped`` a
    one-element counter of rail hits. flicker = (state P x N, decay, std): the 1/f poles advance
    exactly per step. readout: see ``_record``; noise holds one block of N(0, 1) draws.
    """
    scheme, dt, mob, sig, sq_mob, rail, clipped = motion
    fl_state, fl_decay, fl_std = flicker
    k0 = readout[1]
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
        _drift(drift, eta, x, f)
        if scheme == SCHEME_EM:
            for i in range(n):
                x[i] += dt * mob[i] * f[i] + kick[i]
        else:
            for i in range(n):
                xt[i] = x[i] + dt * mob[i] * f[i] + kick[i]
            _drift(drift, eta, xt, f2)
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
        _record(x, n, readout, k0 + s + 1)


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def _underdamped_steps(z, noise, circuit, motion, readout):
    """The RLC array, z = [v, i]. circuit = (C^-1, E, chol, L, R) with E and chol the BAOAB
    friction step's e^{-h C^-1 / R} and noise factor; motion = (scheme, dt, sig) with
    sig = sqrt(2 kappa dt / R) the Euler-Maruyama noise scale (before C^-1)."""
    cinv, e_fric, l_fric, inductance, resistance = circuit
    scheme, dt, sig = motion
    k0 = readout[1]
    n = cinv.shape[0]
    noisy = noise.shape[1] == n
    v = z[:n]
    i_l = z[n:]
    for s in range(noise.shape[0]):
        if scheme == SCHEME_EM:
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
        _record(z, n, readout, k0 + s + 1)


def _substeps(h: float, dt: float) -> int:
    return max(1, math.ceil(h / dt - 1e-9))


class OverdampedStepper:
    """Euler-Maruyama or Heun for the overdamped array, any drift form and non-ideality.

    Args:
        drift: the drift as realised on the chip (Factored uses ``j_out`` for its J^T array).
        b: realised bias. cap: per-cell relative capacitances (None: 1). dt: the step bound.
        rail: saturation voltage (0: none). flicker: the 1/f noise model's ``FlickerState`` (its
            poles and its P x N state, which the noise model keeps across reprogramming) or None.
    """

    def __init__(self, drift: Drift, b: np.ndarray, dt: float, method: str, *, j_out: np.ndarray | None = None,
                 cap: np.ndarray | None = None, rail: float = 0.0, flicker: FlickerState | None = None) -> None:
        self.dt, self.scheme, self.rail = dt, OVERDAMPED_SCHEMES[method], rail
        self.b = np.ascontiguousarray(b, dtype=np.float64)
        self.n = n = self.b.shape[0]
        empty2, empty1 = np.zeros((0, 0)), np.zeros(0)
        a, d, j_in, j_o, hm, lam = empty2, empty1, empty2, empty2, empty2, 0.0
        form = _FORMS[drift.form]
        if form == FORM_DENSE:
            a = np.ascontiguousarray(drift.matrix, dtype=np.float64)
        elif form == FORM_DIAGONAL:
            d = np.ascontiguousarray(drift.diag, dtype=np.float64)
        else:
            j_in = np.ascontiguousarray(drift.J, dtype=np.float64)
            j_o = j_in if j_out is None else np.ascontiguousarray(j_out, dtype=np.float64)
            hm = np.ascontiguousarray(drift.H, dtype=np.float64)
            lam = float(drift.damping)
        # the kernels' drift record (see ``_drift``)
        self.drift_record = (form, a, d, j_in, j_o, hm, lam, self.b)
        self.inv_cap = np.ones(n) if cap is None else 1.0 / np.asarray(cap, dtype=np.float64)
        self.sq_inv_cap = np.sqrt(self.inv_cap)
        self.flicker = flicker.poles if flicker is not None else None
        self.fl_state = flicker.state if flicker is not None else np.zeros((0, n))
        self._clipped = np.zeros(1, dtype=np.int64)
        self._steps = 0
        self._last_step: float | None = None

    @property
    def width(self) -> int:
        return self.n

    @property
    def counters(self) -> StepCounters:
        return StepCounters(self._steps, int(self._clipped[0]), self._last_step)

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
        motion = (self.scheme, step, mob, sig, self.sq_inv_cap, self.rail, self._clipped)
        flicker = (self.fl_state, fl_decay, fl_std)

        def advance(noise: np.ndarray, k0: int) -> None:
            _overdamped_steps(x, noise, self.drift_record, motion, flicker,
                              (sub if record else 0, k0, stride, total, out, outer))

        run_blocks(sub * n_adc, width, rng if noisy else None, advance)
        self._steps += sub * n_adc
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
        self._last_step = self._advance(x, h, n_steps, stride, rng, total, out, outer, r, kappa)
        return WindowResult(state=x, total=total, samples=out, total_outer=outer if second_moment else None)


class UnderdampedStepper:
    """Euler-Maruyama or BAOAB for the RLC array, state z = [v, i]."""

    def __init__(self, drift: Drift, dt: float, method: str, inductance: float, resistance: float) -> None:
        c = drift.dense()
        c = 0.5 * (c + c.T)
        self.cinv = np.ascontiguousarray(np.linalg.inv(c))
        self.dt, self.scheme = dt, UNDERDAMPED_SCHEMES[method]
        self.inductance, self.resistance = inductance, resistance
        self.n = c.shape[0]
        self._fric: dict[tuple[float, float], tuple[np.ndarray, np.ndarray]] = {}
        self._steps = 0
        self._last_step: float | None = None

    @property
    def width(self) -> int:
        return 2 * self.n

    @property
    def counters(self) -> StepCounters:
        return StepCounters(self._steps, 0, self._last_step)  # no rails on the RLC array

    def _friction(self, step: float, kappa: float) -> tuple[np.ndarray, np.ndarray]:
        key = (step, kappa)
        hit = self._fric.get(key)
        if hit is None:
            e = scipy.linalg.expm(-step * self.cinv / self.resistance)
            # fluctuation-dissipation: the O-step's stationary covariance is kappa C^-1 for any R
            q = kappa * (self.cinv - e @ self.cinv @ e.T)
            w, u = np.linalg.eigh(0.5 * (q + q.T))
            hit = (np.ascontiguousarray(e), np.ascontiguousarray(u * np.sqrt(np.clip(w, 0.0, None))))
            self._fric = {key: hit}
        return hit

    def _advance(self, z, h, n_adc, stride, rng, total, out, outer, r, kappa, record=True):
        # temperature acts as time dilation: r scales every rate, i.e. the step in device time
        sub = _substeps(h * r, self.dt)
        step = h * r / sub
        e_fric, l_fric = self._friction(step, kappa) if self.scheme == SCHEME_BAOAB else (self.cinv, self.cinv)
        sig = math.sqrt(2.0 * kappa * step / self.resistance)  # Johnson current noise, 2 kappa / R
        circuit = (self.cinv, e_fric, l_fric, self.inductance, self.resistance)
        motion = (self.scheme, step, sig)

        def advance(noise: np.ndarray, k0: int) -> None:
            _underdamped_steps(z, noise, circuit, motion, (sub if record else 0, k0, stride, total, out, outer))

        run_blocks(sub * n_adc, self.n, rng if kappa > 0.0 else None, advance)
        self._steps += sub * n_adc
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
        self._last_step = self._advance(z, h, n_steps, stride, rng, total, out, outer, r, kappa)
        return WindowResult(state=z, total=total, samples=out, total_outer=outer if second_moment else None)
