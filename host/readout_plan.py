"""Noise-aware readout: how long to average for a target relative error of x_bar.

A mode of the drift with rate a, started at a known point and averaged over a window of T tau,
gives a time average whose noise variance is (Ornstein-Uhlenbeck, noise strength kappa)::

    v(a, T) = 2 kappa / (a^2 T^2) [ T - 2 (1 - e^{-aT}) / a + (1 - e^{-2aT}) / (2a) ]

which is 2 kappa / (a^2 T) for aT >> 1 (the law 2 kappa A^-2 / T) and 2 kappa T / 3 for aT << 1
(the window is too short to average: the noise just integrates). v falls with a, so the N modes of
A = G + lambda I together give at most N v(lambda, T): the slowest rate, lambda, is that of the
whole complement of the curvature's row space (N - m directions of N), which is why damping sets a
noise floor kappa / lambda (docs/results.md). The ADC adds (read_noise^2 + LSB^2 / 12) / n per
cell for n samples, in full-scale units, times the range scale squared in host units.

``estimated_rel_error`` divides the root of that total by |x_bar|. ``plan_readout`` picks, for a
target relative error eps of x_bar against the solution (G + lambda I)^-1 g, a burn-in that lets
the slowest mode forget the warm start (e^{-lambda b} <= eps / 2) and the shortest window after it
whose noise error is <= eps / 2, on the branch T >= 1 / lambda where averaging helps.
"""

from __future__ import annotations

import math

import numpy as np


def window_noise_variance(rate: float | np.ndarray, kappa: float, window: float) -> float | np.ndarray:
    """v(a, T) of the module docstring (per mode, in the units of kappa)."""
    a = np.asarray(rate, dtype=np.float64)
    t = float(window)
    if t <= 0.0:
        return kappa / a  # one snapshot: the stationary variance
    at = a * t
    with np.errstate(over="ignore", invalid="ignore"):
        small = at < 1e-4
        bracket = t - 2.0 * -np.expm1(-at) / a + -np.expm1(-2.0 * at) / (2.0 * a)
        v = np.where(small, 2.0 * kappa * t / 3.0, 2.0 * kappa * bracket / (a * a * t * t))
    return v if v.ndim else float(v)


def noise_sq(n: int, damping: float, kappa: float, window: float, *, adc_var: float = 0.0,
             sample_interval: float = 0.1) -> float:
    """E|noise of x_bar|^2 (host units): N modes at the slowest rate plus the ADC's averaged noise."""
    total = n * float(window_noise_variance(damping, kappa, window))
    if adc_var > 0.0:
        samples = max(1, round(window / sample_interval)) if window > 0.0 else 1
        total += n * adc_var / samples
    return total


def estimated_rel_error(x_norm: float, n: int, damping: float, kappa: float, window: float, *,
                        adc_var: float = 0.0, sample_interval: float = 0.1) -> float:
    """sqrt(E|noise|^2) / |x_bar|; inf when x_bar is 0."""
    if x_norm <= 0.0:
        return math.inf
    return math.sqrt(noise_sq(n, damping, kappa, window, adc_var=adc_var, sample_interval=sample_interval)) / x_norm


def choose_window(target: float, x_norm: float, n: int, damping: float, kappa: float, *, minimum: float,
                  maximum: float, adc_var: float = 0.0, sample_interval: float = 0.1) -> float:
    """The shortest window in [max(minimum, 1 / damping), maximum] whose estimated relative error
    is <= target (maximum when none is). On that branch the error falls monotonically with T."""
    def err(t: float) -> float:
        return estimated_rel_error(x_norm, n, damping, kappa, t, adc_var=adc_var, sample_interval=sample_interval)

    low = min(max(minimum, 1.0 / damping), maximum)
    if err(low) <= target:
        return low
    if err(maximum) > target:
        return maximum
    lo, hi = math.log(low), math.log(maximum)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if err(math.exp(mid)) <= target:
            hi = mid
        else:
            lo = mid
    return math.exp(hi)


def plan_readout(target: float, x_norm: float, n: int, damping: float, kappa: float, *, max_time: float,
                 adc_var: float = 0.0, sample_interval: float = 0.1) -> tuple[float, float, float]:
    """(analog_time, burn_in, estimated relative error) for a target relative error of x_bar
    (module docstring). Half the target goes to the warm start's transient, half to noise."""
    burn = min(math.log(2.0 / target) / damping, 0.5 * max_time)
    window = choose_window(0.5 * target, x_norm, n, damping, kappa, minimum=1.0, maximum=max_time - burn,
                           adc_var=adc_var, sample_interval=sample_interval)
    est = estimated_rel_error(x_norm, n, damping, kappa, window, adc_var=adc_var, sample_interval=sample_interval)
    return burn + window, burn, est
