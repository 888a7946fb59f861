"""Temperature: set point, drift over device time, and temperature coefficients.

Config [temperature] (and noise.temperature_K, the temperature when the device starts)::

    T(t)   = T0 + ramp * t + walk(t)            walk: Brownian, std walk_K_per_sqrt_tau * sqrt(t)
    g(T)   = 1 + conductance_tempco_per_K * (T - reference_K)     every conductance scales by g
    c(T)   = 1 + capacitance_tempco_per_K * (T - reference_K)     every capacitance scales by c
    kappa  = kappa_th(T) / c(T) + injected                         (kT/C with C scaled by c)

so the effective drift is (g / c) A, the bias is b / c and tau is c tau_nominal. t is device time
(it keeps running across runs). The temperature is held constant over ``update_interval`` tau and
updated between such chunks (it drifts over seconds, the dynamics settle in microseconds).
Run diagnostics report the temperature at the start and end of the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .profile import Profile


@dataclass(frozen=True)
class Conditions:
    """Scalar factors acting on the whole array at one temperature."""

    temperature_K: float
    conductance: float  # g
    capacitance: float  # c
    kappa: float  # thermal + injected noise strength in full-scale units

    @property
    def rate(self) -> float:
        """Multiplier of every drift rate: g / c."""
        return self.conductance / self.capacitance


class Thermostat:
    """The device's temperature history: deterministic ramp plus a seeded random walk."""

    def __init__(self, profile: Profile, rng: np.random.Generator) -> None:
        t = profile.temperature
        self._t = t
        self._noise = profile.noise
        self._rng = rng
        self.temperature_K = profile.noise.temperature_K
        self.time = 0.0

    @property
    def drifts(self) -> bool:
        return self._t.ramp_K_per_tau != 0.0 or self._t.walk_K_per_sqrt_tau != 0.0

    @property
    def update_interval(self) -> float:
        return self._t.update_interval

    def conditions(self, kappa_thermal: callable, injected: float) -> Conditions:
        dt_k = self.temperature_K - self._t.reference_K
        g = 1.0 + self._t.conductance_tempco_per_K * dt_k
        c = 1.0 + self._t.capacitance_tempco_per_K * dt_k
        if g <= 0.0 or c <= 0.0:
            raise ValueError(f"temperature {self.temperature_K:.1f} K is outside the tempco model's range")
        return Conditions(self.temperature_K, g, c, kappa_thermal(self.temperature_K) / c + injected)

    def advance(self, dt: float) -> None:
        """Move device time (and the temperature) forward by dt tau."""
        if dt <= 0.0:
            return
        self.time += dt
        self.temperature_K += self._t.ramp_K_per_tau * dt
        if self._t.walk_K_per_sqrt_tau:
            self.temperature_K += self._t.walk_K_per_sqrt_tau * np.sqrt(dt) * self._rng.standard_normal()

    def state(self) -> tuple[float, float]:
        return self.time, self.temperature_K

    def restore(self, state: tuple[float, float]) -> None:
        self.time, self.temperature_K = state
