"""The propagator contract: what every integrator offers the run loop.

A propagator advances one programmed system (node state x, or [v, i] on the RLC array) in device
time. The run loop (``run_loop.py``) needs two things of it, and nothing else:

* ``jump(x, h, rng, r, kappa)``: advance h tau unobserved (the delay and burn-in phases);
* ``window(x, h, n_steps, stride, rng, second_moment, r, kappa)``: advance n_steps ADC intervals
  of h tau, summing the readout (and its outer products when asked), keeping every stride-th one.

``r`` multiplies every rate (temperature's time dilation) and ``kappa`` is the noise strength of
that chunk; both are constant within one call. ``counters`` is None for exact propagation and a
``StepCounters`` for time stepping (the run loop turns its increments into diagnostics).

Implementations: ``exact.ModalPropagator`` and ``exact.GeneralPropagator`` (exact in
distribution), ``stepping.OverdampedStepper`` and ``stepping.UnderdampedStepper`` (numba kernels).
Gaussian noise is drawn in bounded blocks with NumPy's Generator (``run_blocks``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

NOISE_BLOCK_FLOATS = 1 << 20  # normals drawn per block (8 MiB of float64)


@dataclass
class WindowResult:
    """Raw accumulations of a readout window, in node coordinates of the readout (n_out wide)."""

    state: np.ndarray
    total: np.ndarray  # sum of the n_adc readout vectors
    samples: np.ndarray  # (K, n_out), every stride-th readout
    total_outer: np.ndarray | None  # sum of outer products, when asked


@dataclass(frozen=True)
class StepCounters:
    """A time-stepping propagator's running totals (they only grow)."""

    steps_taken: int  # integration steps over its lifetime
    rail_clipped: int  # node-steps that hit a rail
    last_step: float | None  # the step of the last readout window, tau (None before any window)


class Propagator(Protocol):
    """Advances one programmed system; see the module docstring."""

    @property
    def width(self) -> int:
        """Length of the state vector it propagates."""
        ...

    @property
    def counters(self) -> StepCounters | None:
        """None for exact propagation; the stepping totals otherwise."""
        ...

    def jump(self, x: np.ndarray, h: float, rng: np.random.Generator, r: float = 1.0,
             kappa: float = 0.0) -> np.ndarray: ...

    def window(self, x: np.ndarray, h: float, n_steps: int, stride: int, rng: np.random.Generator,
               second_moment: bool, r: float = 1.0, kappa: float = 0.0) -> WindowResult: ...


def run_blocks(n_steps: int, width: int, rng: np.random.Generator | None,
               advance: Callable[[np.ndarray, int], None]) -> None:
    """Call ``advance(noise_block, first_step)`` over ``n_steps`` in bounded-memory blocks.

    ``rng=None`` means a noiseless run: the kernels get an empty (0, width) block and skip noise.
    """
    per_block = max(1, NOISE_BLOCK_FLOATS // max(width, 1))
    buf = np.empty((min(per_block, n_steps), width if rng is not None else 0))
    done = 0
    while done < n_steps:
        k = min(per_block, n_steps - done)
        noise = buf[:k]
        if rng is not None:
            rng.standard_normal(out=noise)  # refills one buffer: a single block of memory
        advance(noise, done)
        done += k
