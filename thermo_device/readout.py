"""The readout grid: where in a run the ADC samples the cells.

A run's window [burn_in, duration] (in tau) is split into n equal intervals of length close to the
ADC interval ``adc.sample_interval``; the ADC samples at the end of each interval and the device
averages those samples (only N numbers leave the device). With ``samples=K`` the grid is refined
so that n is a multiple of K and every (n/K)-th sample is also returned, giving K readouts evenly
spaced over the window. An empty window (duration == burn_in) reads one snapshot of the state.

The time average of n samples spaced h apart of a mode with rate a has variance
kappa / a * (1 + e^{-ah}) / (1 - e^{-ah}) / n, which tends to the continuous-time 2 kappa / (a^2 T)
as a h -> 0 (T = n h). ``time_average_variance`` gives the exact discrete value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from protocol.errors import InvalidInputError


@dataclass(frozen=True)
class ReadoutGrid:
    n_adc: int  # ADC samples in the window (0: empty window, one snapshot)
    h: float  # spacing of the ADC samples, tau
    stride: int  # every stride-th ADC sample is returned (0: none)

    @property
    def n_returned(self) -> int:
        return self.n_adc // self.stride if self.stride else 0


def plan_grid(window: float, sample_interval: float, samples: int) -> ReadoutGrid:
    # ``samples`` has passed protocol.run_args.check_run_args (0 <= samples <= the wire's cap)
    if window <= 0.0:
        if samples:
            raise InvalidInputError("samples need a readout window: duration must exceed burn_in")
        return ReadoutGrid(0, 0.0, 0)
    n = max(1, round(window / sample_interval))
    if samples:
        n = math.ceil(n / samples) * samples
        return ReadoutGrid(n, window / n, n // samples)
    return ReadoutGrid(n, window / n, 0)


def time_average_variance(rates: np.ndarray, kappa: float, h: float, n: int) -> np.ndarray:
    """Exact stationary variance of the mean of n samples spaced h of OU modes with ``rates``."""
    rho = np.exp(-rates * h)
    s2 = kappa / rates
    # sum_{k=1}^{n-1} (n-k) rho^k in closed form
    series = rho * (n * (1.0 - rho) - (1.0 - rho**n)) / (1.0 - rho) ** 2
    return s2 * (n + 2.0 * series) / n**2
