"""What the emulator declares about itself: ``Capabilities``, ``info()`` and its precision.

The declared precision (``Capabilities.precision``, defined in ``protocol.capabilities``) of a
profile is the converters' bound (``converters.converter_precision``) plus the uncalibrated static
errors (mismatch) at 3 sigma carried through A^-1 at condition number PRECISION_COND::

    precision = conv + 3 cond (2 sqrt(N) coupling_rel_std + gain_rel_std + offset_V_std / V_fs / headroom)

relative to the range-mapped solution (headroom = range.headroom with auto ranging, else 0.5).

``Capabilities.coupling_rel_error`` is what a host needs to predict the realised drift: the
standard deviation of one realised conductance's error relative to its array's largest entry,
sqrt(coupling_rel_std^2 + (LSB_c / sqrt(12))^2), LSB_c = 1 / (2^(coupling.bits - 1) - 1) (the
code step relative to that entry, ``converters.quantize_array``; 0 bits = exact; stochastic
rounding has LSB_c^2 / 6 in place of LSB_c^2 / 12).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from protocol.capabilities import PRECISION_COND, Capabilities
from protocol.drift import DRIFT_FORMS

from ._version import __version__
from .converters import converter_precision
from .profile import METHODS, Profile

DRIFT_FORMS_BY_DYNAMICS = {"overdamped": DRIFT_FORMS, "underdamped": ("dense", "diagonal")}


def declared_precision(p: Profile) -> float:
    """``Capabilities.precision`` of a profile (see the module docstring)."""
    headroom = p.range.headroom if p.range.auto else 0.5
    conv = converter_precision(cells=p.device.cells, dac_bits=p.dac.bits, adc_bits=p.adc.bits,
                               coupling_bits=p.coupling.bits, headroom=headroom)
    m = p.mismatch
    static = 3.0 * PRECISION_COND * (2.0 * math.sqrt(p.device.cells) * m.coupling_rel_std + m.gain_rel_std
                                     + m.offset_V_std / p.noise.full_scale_V / headroom)
    return conv + static


def coupling_rel_error(p: Profile) -> float:
    """``Capabilities.coupling_rel_error`` of a profile (see the module docstring)."""
    bits = p.coupling.bits
    lsb_rel = 0.0 if bits == 0 else 1.0 / max(2 ** (bits - 1) - 1, 1)
    # rounding to nearest: uniform error, LSB^2 / 12; stochastic: p (1 - p) LSB^2 averaged over a
    # uniform fractional part p, LSB^2 / 6 (unbiased, but twice the variance)
    per = 6.0 if p.coupling.rounding == "stochastic" else 12.0
    return math.sqrt(p.mismatch.coupling_rel_std**2 + lsb_rel**2 / per)


def capabilities(p: Profile) -> Capabilities:
    return Capabilities(
        backend="emulator", cells=p.device.cells, dynamics=p.device.dynamics,
        drift_forms=DRIFT_FORMS_BY_DYNAMICS[p.device.dynamics], tau_s=p.device.tau_s,
        max_duration=p.device.max_duration, sample_interval=p.adc.sample_interval,
        dac_bits=p.dac.bits, adc_bits=p.adc.bits, coupling_bits=p.coupling.bits,
        precision=declared_precision(p), supports_calibration=p.device.dynamics == "overdamped",
        deterministic=True, coupling_rel_error=coupling_rel_error(p))


def info(p: Profile, *, kappa: float, temperature_K: float, calibrated_sizes: list[int], seed: int) -> dict[str, Any]:
    """The emulator's ``info()``: the capabilities plus the profile's converter and range settings
    and the conditions now (noise strength, temperature, calibrations)."""
    import numba

    return {
        "backend": "emulator",
        "profile": p.name,
        "cells": p.device.cells,
        "dynamics": p.device.dynamics,
        "drift_forms": list(DRIFT_FORMS_BY_DYNAMICS[p.device.dynamics]),
        "integrator": p.integrator.method,
        "methods": list(METHODS[p.device.dynamics]),
        "tau_s": p.device.tau_s,
        "kappa": kappa,
        # stationary covariance = covariance_scale * A^-1 for both dynamics: kappa A^-1 overdamped,
        # kappa C^-1 on the RLC array (fluctuation-dissipation: independent of R, issue 13)
        "covariance_scale": kappa,
        "max_duration": p.device.max_duration,
        "adc": {"bits": p.adc.bits, "full_scale": p.adc.full_scale, "sample_interval": p.adc.sample_interval,
                "read_noise_std": p.adc.read_noise_std},
        "dac": {"bits": p.dac.bits, "full_scale": p.dac.full_scale, "rounding": p.dac.rounding},
        "coupling": {"bits": p.coupling.bits, "rounding": p.coupling.rounding},
        "range": {"auto": p.range.auto, "rail": p.range.rail},
        "chip_id": p.mismatch.seed,
        "temperature_K": temperature_K,
        "calibrated_sizes": calibrated_sizes,
        "seed": seed,
        "versions": {"thermo_ngd": __version__, "numpy": np.__version__, "numba": numba.__version__},
        "capabilities": capabilities(p).to_dict(),
    }
