"""Noise models: thermal (kT/C), injected, and 1/f (flicker).

Thermal noise of a cell voltage, in full-scale units (config [noise])::

    kappa_th(T) = k_B T / (C V_fs^2)        T = temperature_K (K), C = capacitance_F (F),
                                             V_fs = full_scale_V (V); noise.kappa overrides it

The device integrates dx = ... + sqrt(2 kappa) dW with kappa = kappa_th(T) + injected_kappa: the
8-cell board injects noise (from an FPGA) to raise its effective temperature, which does not
follow the cell temperature. The stationary variance of a mode with rate a is kappa / a.
On the RLC board both are current noise at the cells and enter as sqrt(2 kappa / R) C^-1 dW
(Johnson noise, fluctuation-dissipation): injected_kappa is an increment of effective kT, so the
stationary voltage covariance is kappa C^-1 whatever R is (``dynamics.underdamped_system``).

Flicker (1/f) noise (noise.flicker_corner f_c > 0, in 1/tau) enters like a fluctuating bias,
dx = -(A x - b - eta) dt + ..., with eta a sum of P = flicker_poles independent OU processes::

    d eta_p = -g_p eta_p dt + sqrt(2 g_p v) dW_p,     g_p log-spaced over [2 pi f_min, 2 pi f_c]

Equal variances v per pole give a PSD ~ 1/f across the band (each pole covers an equal slice of
log-frequency); v is set so that the flicker PSD equals the white PSD 2 kappa at the corner.
It makes the dynamics non-Markov in x alone, so it needs a stepping integrator. Its filter
state (P x N) is the model's own (``FlickerNoise``): it survives reprogramming and snapshots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .profile import NoiseSection

K_BOLTZMANN = 1.380649e-23  # J/K, exact (SI 2019)


def thermal_kappa(temperature_K: float, capacitance_F: float, full_scale_V: float) -> float:
    """k_B T / (C V_fs^2): the kT/C variance in full-scale units."""
    return K_BOLTZMANN * temperature_K / (capacitance_F * full_scale_V**2)


def cell_kappa(config: NoiseSection, temperature_K: float) -> float:
    """The thermal noise strength at temperature_K: ``noise.kappa`` scaled by T / T0 when set,
    else kT/C."""
    if config.kappa is not None:
        return float(config.kappa) * temperature_K / config.temperature_K
    return thermal_kappa(temperature_K, config.capacitance_F, config.full_scale_V)


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


@dataclass(frozen=True, eq=False)
class FlickerState:
    """What one stepping propagator needs of the 1/f model: its poles and the (P, N) filter
    state, which the propagator advances in place."""

    poles: FlickerPoles
    state: np.ndarray


class FlickerNoise:
    """The 1/f noise model's dynamic state, kept across reprogramming.

    The P x N filter state belongs to the chip, not to one program: a new program of the same
    size continues it (the noise is a property of the cells), another size starts a new one from
    zero. Snapshots carry it (``array``, ``load``).
    """

    def __init__(self, config: NoiseSection) -> None:
        self.config = config
        self.array = np.zeros((0, 0))

    def for_program(self, kappa: float, n: int) -> FlickerState | None:
        """The state a stepping program of n cells runs with at noise strength kappa; None when off."""
        c = self.config
        poles = flicker_poles(kappa, c.flicker_corner, c.flicker_min_freq, c.flicker_poles)
        if poles is None:
            return None
        if self.array.shape != (poles.count, n):
            self.array = np.zeros((poles.count, n))  # earlier programs keep the array they hold
        return FlickerState(poles, self.array)

    def load(self, array: np.ndarray, *, in_place: bool = False) -> None:
        """Take a snapshot's state. ``in_place`` writes into the current array when the shapes
        match, so that the installed programs' propagators (which hold it) continue from it."""
        if in_place and self.array.shape == array.shape:
            self.array[...] = array
        elif not in_place:
            self.array = np.array(array, dtype=np.float64)
