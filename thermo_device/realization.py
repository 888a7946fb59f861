"""The records of programming: what the stages of ``programming.py`` pass along and report.

``ProgramWork`` is the working record: it starts as the host's drift and bias and each stage (one
non-ideality model, in its own module) turns a part of it into what the chip really holds.
``ProgramReport`` is what the stages tell the run's diagnostics and the calibration controller;
``Realized`` is the finished, validated result. Plain data, no physics: every module may import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol.drift import Drift

from .profile import Profile


@dataclass
class ProgramReport:
    """What programming did, for diagnostics and for the calibration controller."""

    calibrated: bool = False  # a calibration's pre-distortion was applied
    couplings_written: np.ndarray | None = None  # codes of the main array (Dense A, Diagonal d, Factored J)
    bias_written: np.ndarray | None = None  # bias DAC values written (overdamped only)
    range_scale: float = 1.0  # host units per full-scale unit
    dac_clipped: int = 0  # bias entries beyond the DAC range
    # smallest real part of the realised drift's eigenvalues (with per-cell C^-1), 1/tau at
    # nominal temperature; <= 0 means the chip runs away into its rails (``unstable``)
    stability_margin: float = float("nan")
    unstable: bool = False


@dataclass
class ProgramWork:
    """The working record the programming stages transform, in order (``programming.STAGES``).

    ``drift``/``bias`` start as the host's and end as what the cells see, in full-scale units.
    """

    profile: Profile
    rng: np.random.Generator
    drift: Drift
    bias: np.ndarray
    host_bias: np.ndarray
    host_drift: Drift  # the host's drift, as handed over (decides whose error an instability is)
    calibration: Any  # calibration.Calibration or None; only when it applies to this drift
    unit_scale: bool  # calibration probes: scale 1 and nearest rounding (codes known in advance)
    j_out: np.ndarray | None = None  # Factored: the J^T array when mismatch makes it differ from J
    cap: np.ndarray | None = None  # per-cell relative capacitances
    system: Any = None  # dynamics.ModalSystem | GeneralSystem | SteppingOnlySystem | UnstableSystem
    scale: float = 1.0
    report: ProgramReport = field(default_factory=ProgramReport)

    @property
    def rounding_coupling(self) -> str:
        return "nearest" if self.unit_scale else self.profile.coupling.rounding

    @property
    def rounding_dac(self) -> str:
        return "nearest" if self.unit_scale else self.profile.dac.rounding

    @property
    def underdamped(self) -> bool:
        return self.profile.device.dynamics == "underdamped"


@dataclass(frozen=True, eq=False)
class Realized:
    """The drift and bias as realised on the chip, in physical (full-scale) units."""

    drift: Drift
    j_out: np.ndarray | None
    bias: np.ndarray
    cap: np.ndarray | None
    system: Any  # validated: positive-stable, or an UnstableSystem from a positive-stable host drift
    scale: float  # host units per full-scale unit
    report: ProgramReport

    @classmethod
    def from_work(cls, work: ProgramWork) -> Realized:
        return cls(work.drift, work.j_out, work.bias, work.cap, work.system, work.scale, work.report)
