"""Rails by detection: exact propagation wherever the Gaussian law says no node reaches a rail.

Node voltages saturate at +-rail (``range.rail``, full-scale units). Saturation is non-linear, so
an exact propagator is valid only while every node stays inside the rails; the stepping
integrators clip at every step instead. ``RailGuard`` wraps an exact ``ModalPropagator`` (a
symmetric drift, ``dynamics.ModalSystem``) and decides per call (one jump or one readout chunk,
at constant temperature) from the state it starts at:

For the linear dynamics started at x0, node i is Gaussian at every time t, with (y = x / c_i^-1/2
the symmetric coordinates, c the cell scale ``ModalSystem.cell_scale``, s_max its largest value)

    |E x_i(t) - x*_i| <= s_max ||y0 - y*||_2     every mode decays monotonically to its target
    Var x_i(t)        <= s_max^2 kappa / a_min     each mode's variance rises from 0 to kappa / a

with x* = A^-1 b the fixed point and a_min the smallest rate. If

    max_i |x*_i| + s_max ||y0 - y*||_2 + z s_max sqrt(kappa / a_min) < rail,

with z such that 2 Phi(-z) N K <= RAIL_MISS_PROB over the N nodes and the K = duration / dt
points a stepping integrator would have clipped at, no rail is reached at any of those points
except with probability at most RAIL_MISS_PROB = 1e-9 per call (union bound), and the exact
propagator runs. Otherwise the call is time-stepped (Heun, clipping at the rails) from the same
state, like a profile without an exact path. Residual error: the probability bound above; a
crossing strictly between two of the K points is not counted (the stepper does not see those
either). Non-symmetric drifts (``GeneralSystem``) are not guarded: their norms can grow
transiently, so with rails they keep time stepping.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy.special import ndtri

from .dynamics import ModalSystem
from .exact import ModalPropagator
from .propagator import Propagator, StepCounters, WindowResult

RAIL_MISS_PROB = 1e-9  # per call: the chance that a node the bound declared safe reaches a rail


class RailGuard:
    """An exact modal propagator that hands a call to a time stepper when rails are reachable.

    Args:
        exact: the exact propagator of the programmed (symmetric) system.
        rail: the saturation voltage, full-scale units (> 0).
        dt: the step the fallback stepper would take (sets the K points of the bound).
        make_stepper: builds the fallback stepper (once, on first need).
    """

    def __init__(self, exact: ModalPropagator, rail: float, dt: float,
                 make_stepper: Callable[[], Propagator]) -> None:
        self.exact = exact
        self.rail = rail
        self.dt = dt
        self._make_stepper = make_stepper
        self._stepper: Propagator | None = None
        system: ModalSystem = exact.system
        self.fixed_point = system.solution()
        self._scale = system.cell_scale
        self._s_max = 1.0 if system.cell_scale is None else float(system.cell_scale.max())
        self._a_min = system.margin
        self._peak = float(np.abs(self.fixed_point).max()) if self.fixed_point.size else 0.0
        self.exact_calls = 0
        self.stepped_calls = 0

    @property
    def width(self) -> int:
        return self.exact.width

    @property
    def counters(self) -> StepCounters:
        if self._stepper is None:
            return StepCounters(0, 0, None)
        return self._stepper.counters

    def reach(self, x: np.ndarray, duration: float, kappa: float) -> float:
        """The bound of the module docstring: no node exceeds this (except with RAIL_MISS_PROB).

        Temperature's rate multiplier r dilates time only: the variances do not depend on it.
        """
        d = x - self.fixed_point
        if self._scale is not None:
            d = d / self._scale
        n = self.fixed_point.shape[0]
        points = max(1.0, duration / self.dt)
        z = -float(ndtri(RAIL_MISS_PROB / (2.0 * n * points)))
        spread = math.sqrt(max(kappa, 0.0) / self._a_min)
        return self._peak + self._s_max * (float(np.linalg.norm(d)) + z * spread)

    def _pick(self, x: np.ndarray, duration: float, kappa: float) -> Propagator:
        if self.reach(x, duration, kappa) < self.rail:
            self.exact_calls += 1
            return self.exact
        if self._stepper is None:
            self._stepper = self._make_stepper()
        self.stepped_calls += 1
        return self._stepper

    def jump(self, x: np.ndarray, h: float, rng: np.random.Generator, r: float = 1.0,
             kappa: float = 0.0) -> np.ndarray:
        if h <= 0.0:
            return x
        return self._pick(x, h, kappa).jump(x, h, rng, r, kappa)

    def window(self, x: np.ndarray, h: float, n_steps: int, stride: int, rng: np.random.Generator,
               second_moment: bool, r: float = 1.0, kappa: float = 0.0) -> WindowResult:
        prop = self._pick(x, h * n_steps, kappa)
        return prop.window(x, h, n_steps, stride, rng, second_moment, r, kappa)
