"""Programming the chip: from the host's (A, b) to the drift and bias the cells really see.

In order (each step is one model, documented in its own module and in docs/physics.md):

1. calibration pre-distortion (``calibration.py``), when a calibration of this size exists:
   A -> A / G_hat elementwise, and later b -> b - o_hat;
2. conductance programming (``converters.quantize_array``): each resistor array to its codes;
3. coupling mismatch (``mismatch.py``): every conductance times its static (1 + d);
4. range mapping (config [range]): host numbers are divided by a scale s so that max|b| and
   max|A^-1 b| sit at ``headroom`` of the DAC / rail / ADC range (auto), or s = 1; readouts are
   multiplied back by s. Noise is physical, so in host units it is s^2 kappa: the price of range;
5. the bias DAC (``converters.quantize``), then the input gains and op-amp offsets (mismatch).

The result carries the analysed system (validated: positive-stable, else NotStableError).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol.drift import Dense, Diagonal, Drift, Factored

from .calibration import Calibration
from .converters import quantize, quantize_array
from .dynamics import SteppingOnlySystem, System, overdamped_system, underdamped_system
from .mismatch import Chip
from .profile import Profile


@dataclass(frozen=True, eq=False)
class Realized:
    """The drift and bias as realised on the chip, in physical (full-scale) units."""

    drift: Drift
    j_out: np.ndarray | None  # Factored: the J^T array when mismatch makes it differ from J
    bias: np.ndarray
    cap: np.ndarray | None  # per-cell relative capacitances
    system: System | SteppingOnlySystem
    scale: float  # host units per full-scale unit
    report: dict[str, Any] = field(default_factory=dict)


def _couplings(profile: Profile, chip: Chip, drift: Drift, rng: np.random.Generator,
               underdamped: bool, rounding: str) -> tuple[Drift, np.ndarray | None, np.ndarray]:
    """(realised drift, J^T array or None, the codes written for the main array)."""
    cfg = profile.coupling

    def q(a: np.ndarray) -> np.ndarray:
        return quantize_array(np.asarray(a, dtype=np.float64), cfg.bits, rounding, rng)

    if isinstance(drift, Dense):
        a = q(drift.matrix)
        g = chip.conductance_gain("dense", a.shape, symmetric=underdamped)
        return Dense(a if g is None else a * g), None, a
    if isinstance(drift, Diagonal):
        d = q(drift.diag)
        g = chip.conductance_gain("diagonal", d.shape)
        return Diagonal(d if g is None else d * g), None, d
    j, h = q(drift.J), q(drift.H)
    g_in = chip.conductance_gain("J", j.shape)
    g_out = chip.conductance_gain("JT", j.shape)
    g_h = chip.conductance_gain("H", h.shape, symmetric=True)
    j_in = j if g_in is None else j * g_in
    j_out = None if g_out is None else j * g_out
    return Factored(j_in, h if g_h is None else h * g_h, drift.damping), j_out, j


def _range_scale(profile: Profile, b: np.ndarray, x_star: np.ndarray) -> float:
    rg = profile.range
    if not rg.auto:
        return 1.0
    limit = rg.rail if rg.rail > 0.0 else (profile.adc.full_scale if profile.adc.bits else 1.0)
    s = max(float(np.max(np.abs(b))) / (rg.headroom * profile.dac.full_scale),
            float(np.max(np.abs(x_star))) / (rg.headroom * limit))
    return s if s > 0.0 else 1.0


def realize(profile: Profile, chip: Chip, drift: Drift, b_host: np.ndarray, rng: np.random.Generator,
            calibration: Calibration | None, *, unit_scale: bool = False) -> Realized:
    """Program the chip; invalid or unstable input raises before anything is kept.

    ``unit_scale`` forces s = 1 and nearest rounding (the calibration probes work in physical
    units with codes the controller knows in advance).
    """
    dyn = profile.device.dynamics
    n = drift.dim
    cal = calibration if calibration is not None and calibration.applies_to(drift) else None
    if cal is not None:
        drift = cal.predistort(drift)
    phys, j_out, written = _couplings(profile, chip, drift, rng, dyn == "underdamped",
                                      "nearest" if unit_scale else profile.coupling.rounding)
    report: dict[str, Any] = {"calibrated": cal is not None, "couplings_written": written}
    if dyn == "underdamped":
        u = profile.underdamped
        system = underdamped_system(phys, b_host, u.inductance, u.resistance)
        return Realized(phys, None, b_host, None, system, 1.0, report)
    cap = chip.capacitance(n)
    system = overdamped_system(phys, np.zeros(n), cap, j_out)
    scale = 1.0
    if profile.range.auto and not unit_scale:
        scale = _range_scale(profile, b_host, system.with_bias(b_host).solution())
    b = b_host / scale
    if cal is not None:
        b = b - cal.offset
    b, clipped = quantize(b, profile.dac.bits, profile.dac.full_scale,
                          "nearest" if unit_scale else profile.dac.rounding, rng)
    report["bias_written"] = b
    gain, offset = chip.input_gain(n), chip.offset(n)
    if gain is not None:
        b = b * gain
    if offset is not None:
        b = b + offset
    report.update(range_scale=scale, dac_clipped=clipped)
    return Realized(phys, j_out, b, cap, system.with_bias(b), scale, report)
