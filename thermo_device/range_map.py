"""Range mapping: host numbers into the chip's physical range (config [range]).

With ``range.auto = true`` the host's problem is divided by a scale s so that the largest bias
entry and the largest entry of the solution sit at ``headroom`` of their ranges::

    s = max( max|b| / (headroom * dac.full_scale),  max|A^-1 b| / (headroom * limit) )

limit = ``saturation_rail``: ``range.rail`` when rails are modelled, else the ADC full scale (or 1
with an ideal ADC).
The cells see b / s; readouts are multiplied back by s. Noise is physical, so in host units its
strength is s^2 kappa: the price of range. With ``auto = false`` (or for calibration probes) s = 1
and host units are full-scale units. ``range.rail`` itself (saturation) acts in the stepping
kernels (``stepping.py``).
"""

from __future__ import annotations

import numpy as np

from .profile import Profile
from .realization import ProgramWork


def saturation_rail(profile: Profile) -> float:
    """Where the node voltages saturate (full-scale units): ``range.rail`` when modelled, else the
    ADC full scale (or 1 with an ideal ADC). A chip whose realised drift is unstable runs away to
    this limit even when the profile models no rails: its op-amp outputs cannot leave the supply,
    and the supply is sized to the converters' range."""
    rg = profile.range
    return rg.rail if rg.rail > 0.0 else (profile.adc.full_scale if profile.adc.bits else 1.0)


def range_scale(profile: Profile, b: np.ndarray, x_star: np.ndarray) -> float:
    """s for a bias b whose solution is x_star (1 when auto ranging is off or b = 0)."""
    rg = profile.range
    if not rg.auto:
        return 1.0
    limit = saturation_rail(profile)
    s = max(float(np.max(np.abs(b))) / (rg.headroom * profile.dac.full_scale),
            float(np.max(np.abs(x_star))) / (rg.headroom * limit))
    return s if s > 0.0 else 1.0


def map_range(work: ProgramWork) -> None:
    """Stage: choose s from the analysed system's solution and divide the bias by it."""
    if work.profile.range.auto and not work.unit_scale:
        work.scale = range_scale(work.profile, work.host_bias, work.system.with_bias(work.host_bias).solution())
    work.bias = work.host_bias / work.scale
    work.report.range_scale = work.scale
