"""Thermodynamic linear algebra on any Device: solve A x = b and invert A by sampling.

* ``solve``: the stationary mean of dx = -(A x - b) dt + sqrt(2 kappa) dW is A^-1 b. The window
  average over T has covariance about 2 kappa A^-2 / T.
* ``inverse``: the stationary covariance is ``covariance_scale`` * A^-1 (kappa, on the overdamped
  array and on the RLC array alike: its resistors' noise obeys fluctuation-dissipation), estimated
  from the window's second moment.

Error bars come from batch means: the window is split into ``batches`` consecutive runs (warm
start), and the spread of the batch estimates gives a standard error that needs no knowledge of A.
It does not see a bias left by too short a burn-in; choose burn_in >> 1 / lambda_min(A).

``ensemble=True`` re-programs the device before every batch (each with its own burn-in): on a
device with stochastic rounding of its conductance and bias codes, every batch then sees an
independent rounding, the average cancels the rounding error to first order, and the standard
error includes it (ensemble averaging, Aifer et al., arXiv:2401.16231).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol.device import Device
from protocol.drift import Dense, Drift
from protocol.errors import InvalidInputError


@dataclass(frozen=True)
class LinalgResult:
    """An estimate with its batch-means standard error (same shape) and run diagnostics."""

    value: np.ndarray
    std_error: np.ndarray
    analog_time_s: float
    diagnostics: dict[str, Any] = field(default_factory=dict)

    @property
    def rel_error_estimate(self) -> float:
        """Estimated ||error|| / ||value|| (root of the summed variances over the norm)."""
        return float(np.sqrt(np.sum(self.std_error**2)) / max(np.linalg.norm(self.value), 1e-300))


def _device(device: Device | None, profile: str, overrides: dict[str, Any] | None, seed: int) -> Device:
    if device is not None:
        return device
    from .connect import connect

    return connect(f"embedded:{profile}", seed=seed, overrides=overrides)


def _as_drift(a: np.ndarray | Drift) -> Drift:
    return a if not isinstance(a, np.ndarray) else Dense(a)


def _batches(batches: int) -> int:
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 2:
        raise InvalidInputError(f"batches must be an integer >= 2, got {batches!r}")
    return batches


def solve(a: np.ndarray | Drift, b: np.ndarray, *, duration: float = 100.0, burn_in: float = 10.0,
          batches: int = 10, ensemble: bool = False, device: Device | None = None, profile: str = "ideal",
          overrides: dict[str, Any] | None = None, seed: int = 0) -> LinalgResult:
    """Estimate A^-1 b as the time-averaged state of the device.

    Args:
        a: the matrix (N x N array) or any drift description (Dense, Factored, Diagonal).
        b: right-hand side (N,).
        duration: total averaging time in tau, split into ``batches`` runs.
        burn_in: time in tau before averaging starts (from the zero state).
        ensemble: re-program before every batch (independent stochastic roundings).
        device: a Device to use; by default an Emulator(load_profile(profile, overrides), seed).
    """
    dev = _device(device, profile, overrides, seed)
    nb = _batches(batches)
    drift = _as_drift(a)
    seg = duration / nb
    means = []
    analog = 0.0
    for k in range(nb):
        if k == 0 or ensemble:
            dev.program(drift, b)
            r = dev.run(burn_in + seg, burn_in=burn_in, reset=True)
        else:
            r = dev.run(seg)
        analog += r.analog_time_s
        means.append(r.mean)
    m = np.stack(means)
    se = m.std(axis=0, ddof=1) / np.sqrt(nb)
    return LinalgResult(m.mean(axis=0), se, analog,
                        {"batches": nb, "duration": duration, "burn_in": burn_in, "ensemble": ensemble})


def inverse(a: np.ndarray | Drift, *, duration: float = 1000.0, burn_in: float = 10.0, batches: int = 10,
            device: Device | None = None, profile: str = "ideal", overrides: dict[str, Any] | None = None,
            seed: int = 0) -> LinalgResult:
    """Estimate A^-1 from the stationary covariance (b = 0), divided by the device's scale."""
    dev = _device(device, profile, overrides, seed)
    nb = _batches(batches)
    drift = _as_drift(a)
    n = drift.dim
    dev.program(drift, np.zeros(n))
    info = dev.info()
    scale = float(info["covariance_scale"])
    first = dev.run(burn_in, burn_in=burn_in, reset=True)
    seg = duration / nb
    ests = []
    for _ in range(nb):
        r = dev.run(seg, second_moment=True)
        cov = r.second_moment - np.outer(r.mean, r.mean)
        ests.append(cov / scale)
    est = np.stack(ests)
    value = est.mean(axis=0)
    se = est.std(axis=0, ddof=1) / np.sqrt(nb)
    analog = first.analog_time_s + nb * seg * info.get("tau_s", 0.0)
    return LinalgResult(0.5 * (value + value.T), se, analog,
                        {"batches": nb, "duration": duration, "burn_in": burn_in, "scale": scale})
