"""Noise models: thermal (kT/C), injected, and 1/f (flicker).

Thermal noise of a cell voltage, in full-scale units (config [noise])::

    kappa_th(T) = k_B T / (C V_fs^2)        T = temperature_K (K), C = capacitance_F (F),
                                             V_fs = full_scale_V (V); noise.kappa overrides it

The device integrates dx = ... + sqrt(2 kappa) dW with kappa = kappa_th(T) + injected_kappa: the
8-cell board injects noise (from an FPGA) to raise its effective temperature, which does not
follow the cell temperature. The stationary variance of a mode with rate a is kappa / a.

Flicker (1/f) noise (noise.flicker_corner f_c > 0, in 1/tau) enters like a fluctuating bias,
dx = -(A x - b - eta) dt + ..., with eta a sum of P = flicker_poles independent OU processes::

    d eta_p = -g_p eta_p dt + sqrt(2 g_p v) dW_p,     g_p log-spaced over [2 pi f_min, 2 pi f_c]

Equal variances v per pole give a PSD ~ 1/f across the band (each pole covers an equal slice of
log-frequency); v is set so that the flicker PSD equals the white PSD 2 kappa at the corner.
It makes the dynamics non-Markov in x alone, so it needs a stepping integrator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

K_BOLTZMANN = 1.380649e-23  # J/K, exact (SI 2019)


def thermal_kappa(temperature_K: float, capacitance_F: float, full_scale_V: float) -> float:
    """k_B T / (C V_fs^2): the kT/C variance in full-scale units."""
    return K_BOLTZMANN * temperature_K / (capacitance_F * full_scale_V**2)


@dataclass(frozen=True)
class FlickerPoles:
    rates: np.ndarray  # (P,) g_p, 1/tau
    variance: float  # v, per pole, in (x / tau)^2

    @property
    def count(self) -> int:
        return self.rates.shape[0]


def flicker_poles(kappa: float, corner: float, min_freq: float, poles: int) -> FlickerPoles | None:
    """The OU superposition for 1/f noise with corner ``corner``; None when off."""
    if corner <= 0.0 or kappa <= 0.0:
        return None
    w_c = 2.0 * np.pi * corner
    rates = np.geomspace(2.0 * np.pi * min(min_freq, corner), w_c, poles)
    # PSD of the sum at w: sum_p 2 v g_p / (g_p^2 + w^2); match 2 kappa at w = w_c.
    v = kappa / float(np.sum(rates / (rates**2 + w_c**2)))
    return FlickerPoles(rates=rates, variance=v)
