"""Calibration: measure a chip's static errors and pre-distort later programs to cancel them.

The controller programs a reference coupling matrix A_ref = I + 0.5 * 1 1^T (every conductance
used, well conditioned) and solves N + 1 probes: b = 0 and b = c e_k (k = 1..N). With the
chip's effective matrix A_eff = G o Q(A_ref) (G: per-conductance gains, Q: the codes actually
written, known to the controller), input gains Gin = diag(1 + u) and offsets o::

    x_0 = A_eff^-1 o,     x_k = A_eff^-1 (Gin c_k e_k + o)     (c_k: the DAC value written)
    Y   = [x_k - x_0]  = A_eff^-1 Gin diag(c)
    M   = diag(c) Y^-1 = Gin^-1 A_eff,        G_hat = M / Q(A_ref),      o_hat = M x_0

A later Dense program A is written as A / G_hat, so the chip realises about Gin A, and b as
b - o_hat; then Gin A x = Gin (b - o_hat) + o = Gin b, i.e. x = A^-1 b: coupling mismatch, input
gains and offsets cancel to the precision of the probes (time averaging and ADC) and of the codes.
Uniform temperature coefficients scale A_eff as a whole and cancel in ratios. Capacitance mismatch
does not move the solution. Calibration covers Dense drifts of the calibrated size; Factored
arrays would need direct access to each array's products, which the dynamics do not give.
The offsets alone (``calibrate_offsets``: one Diagonal(1) run with b = 0) apply to every drift
form of the calibrated size, Factored included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from protocol.device import RunResult
from protocol.drift import Dense, Diagonal, Drift
from protocol.errors import CapacityError, InvalidInputError

from .realization import ProgramReport, ProgramWork


class ProbedDevice(Protocol):
    """What the calibration controller uses of a device: public members only."""

    @property
    def cells(self) -> int: ...

    @property
    def device_time(self) -> float: ...

    @property
    def temperature_K(self) -> float: ...  # noqa: N802 - a unit suffix

    def program_probe(self, drift: Drift, bias: np.ndarray) -> ProgramReport:
        """Program without calibration, at range scale 1 and nearest rounding (known codes)."""
        ...

    def run(self, duration: float, *, burn_in: float = 0.0, reset: bool = False) -> RunResult: ...


def reference_matrix(n: int) -> np.ndarray:
    return np.eye(n) + 0.5 * np.ones((n, n))


@dataclass(frozen=True, eq=False)
class Calibration:
    n: int
    gain: np.ndarray  # (N, N) G_hat
    offset: np.ndarray  # (N,) o_hat, full-scale units
    device_time: float
    temperature_K: float

    @property
    def offsets_only(self) -> bool:
        """An offsets-only calibration (``calibrate_offsets``) holds an empty gain."""
        return self.gain.size == 0

    def applies_to(self, drift: Drift) -> bool:
        if self.offsets_only:
            return drift.dim == self.n  # the cells' offsets do not depend on the drift's form
        return drift.form == "dense" and drift.dim == self.n

    def predistort(self, drift: Drift) -> Drift:
        if self.offsets_only:
            return drift
        return Dense.trusted(np.asarray(drift.matrix, dtype=np.float64) / self.gain)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n, "kind": "offsets" if self.offsets_only else "full"}
        if not self.offsets_only:
            out["gain_rel_std"] = float(np.std(self.gain - 1.0))
            out["gain_rel_max"] = float(np.max(np.abs(self.gain - 1.0)))
        out.update(offset_rms=float(np.sqrt(np.mean(self.offset**2))), device_time=self.device_time,
                   temperature_K=self.temperature_K)
        return out


def calibrate(device: ProbedDevice, n: int, *, duration: float, burn_in: float, probe: float) -> Calibration:
    """Probe the chip (see the module docstring). The caller restores its own state afterwards."""
    cells = device.cells
    if not 1 <= n <= cells:
        raise CapacityError(f"calibrate: n = {n} is out of range [1, {cells}]")
    if not 0.0 < probe <= 1.0:
        raise InvalidInputError(f"calibrate: probe = {probe} is out of range (0, 1]")
    a_ref = reference_matrix(n)
    xs, written = [], []
    for k in range(n + 1):
        b = np.zeros(n)
        if k:
            b[k - 1] = probe
        report = device.program_probe(Dense(a_ref), b)
        written.append(report.bias_written[k - 1] if k else 0.0)
        xs.append(device.run(duration, burn_in=burn_in, reset=True).mean)
        if k == 0:
            q_ref = report.couplings_written
    x0 = xs[0]
    y = np.stack(xs[1:], axis=1) - x0[:, None]
    m = np.diag(written[1:]) @ np.linalg.inv(y)
    return Calibration(n=n, gain=m / q_ref, offset=m @ x0, device_time=device.device_time,
                       temperature_K=device.temperature_K)


def calibrate_offsets(device: ProbedDevice, n: int, *, duration: float, burn_in: float) -> Calibration:
    """Measure the first n cells' offsets alone, with one run: Diagonal(1) and b = 0.

    x_0 = D_eff^-1 o with D_eff the realised unit diagonal (coupling mismatch d_i), so o_hat = x_0
    leaves a residual offset of about d_i o_i (plus the input gains' (1 - Gin) o): a percent of the
    offset on a chip with percent-level mismatch, against the full calibration's N + 1 probes of a
    Dense N x N. It applies to every drift form of size n (offsets belong to the cells).
    """
    cells = device.cells
    if not 1 <= n <= cells:
        raise CapacityError(f"calibrate: n = {n} is out of range [1, {cells}]")
    device.program_probe(Diagonal(np.ones(n)), np.zeros(n))
    x0 = device.run(duration, burn_in=burn_in, reset=True).mean
    return Calibration(n=n, gain=np.ones((0, 0)), offset=np.asarray(x0, dtype=np.float64),
                       device_time=device.device_time, temperature_K=device.temperature_K)


# -- programming stages (``programming.STAGES``) -------------------------------------------------


def predistort(work: ProgramWork) -> None:
    """Stage: a Dense program of a calibrated size is written as A / G_hat."""
    cal = work.calibration
    if cal is not None and cal.applies_to(work.drift):
        work.drift = cal.predistort(work.drift)
        work.report.calibrated = True
    else:
        work.calibration = None


def cancel_offset(work: ProgramWork) -> None:
    """Stage: b - o_hat, before the bias DAC, when the program was pre-distorted."""
    if work.calibration is not None:
        work.bias = work.bias - work.calibration.offset
