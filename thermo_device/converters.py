"""Converters: the bias DAC, conductance programming, and the ADC readout.

A b-bit converter over [-FS, FS) has 2^b two's-complement codes k LSB, k = -2^(b-1) .. 2^(b-1) - 1,
with LSB = 2 FS / 2^b (zero is a code; the top code is FS - LSB); values beyond the range clip.

* DAC for b (config [dac]): bits, full_scale, rounding = nearest | stochastic. Stochastic
  rounding rounds up with probability equal to the fractional part, so its error has mean zero:
  averaging runs over independent roundings cancels the first-order error (ensemble averaging,
  the error-mitigation idea of Aifer et al., arXiv:2401.16231).
* Conductance programming (config [coupling]): each resistor array is quantized relative to its
  own largest |entry| (the array's full scale), bits and rounding as above.
* ADC (config [adc]): every sample gets read noise N(0, read_noise_std^2), is clipped to
  [-full_scale, full_scale] and rounded to the nearest code; the device averages the codes. An
  n-bit ADC therefore yields at most 2^n distinct sample values.

bits = 0 means an ideal converter (no rounding, no clipping).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from protocol.capabilities import PRECISION_COND

from .realization import ProgramWork


def lsb(bits: int, full_scale: float) -> float:
    return 2.0 * full_scale / 2**bits


def quantize(x: np.ndarray, bits: int, full_scale: float, rounding: str = "nearest",
             rng: np.random.Generator | None = None, *, pairs: bool = False) -> tuple[np.ndarray, int]:
    """Round x to the converter's codes; returns (values, number of clipped entries).

    ``pairs`` (a square array whose (i, j) and (j, i) entries are one component): stochastic
    rounding uses one draw per pair (the upper triangle's), so a symmetric array stays symmetric.
    The full array is still drawn, so the noise stream advances as without it.
    """
    if bits == 0:
        return x, 0
    step = lsb(bits, full_scale)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    u = x / step
    clipped = int(np.count_nonzero((u < lo - 0.5) | (u > hi + 0.5)))
    if rounding == "stochastic":
        if rng is None:
            raise ValueError("stochastic rounding needs a generator")
        k = np.floor(u)
        draw = rng.random(u.shape)
        if pairs:
            draw = np.triu(draw) + np.triu(draw, 1).T
        k += draw < (u - k)
    else:
        k = np.rint(u)
    return np.clip(k, lo, hi) * step, clipped


def quantize_array(a: np.ndarray, bits: int, rounding: str, rng: np.random.Generator | None, *,
                   pairs: bool = False) -> np.ndarray:
    """Conductance programming: quantize relative to the array's largest |entry| (``pairs``: see
    ``quantize``)."""
    if bits == 0:
        return a
    scale = float(np.max(np.abs(a)))
    if scale == 0.0:
        return a
    # the largest entry maps to the top code, so the array's full scale is max|a| (1 + LSB)
    fs = scale * 2 ** (bits - 1) / (2 ** (bits - 1) - 1) if bits > 1 else scale
    q, _ = quantize(a, bits, fs, rounding, rng, pairs=pairs)
    return q


@dataclass
class AdcChain:
    """Read noise, clipping and rounding of ADC samples (physical units in, physical units out)."""

    bits: int
    full_scale: float
    read_noise_std: float
    clipped: int = 0
    count: int = 0

    @property
    def ideal(self) -> bool:
        return self.bits == 0 and self.read_noise_std == 0.0

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.read_noise_std:
            x = x + self.read_noise_std * rng.standard_normal(x.shape)
        q, c = quantize(x, self.bits, self.full_scale)
        self.clipped += c
        self.count += x.size
        return q


def converter_precision(*, cells: int, dac_bits: int, adc_bits: int, coupling_bits: int,
                        headroom: float = 0.5, cond: float = PRECISION_COND) -> float:
    """A declared ``precision`` for a device limited only by its converters (no mismatch).

    Terms, each relative to max|A^-1 b| (which the range mapping puts at ``headroom`` of full scale):
    * coupling codes: entries rounded to LSB_c = max|A| / (2^(bits-1) - 1); the error matrix has
      spectral norm about 2 sqrt(N) LSB_c / sqrt(12) (random-matrix estimate), and
      ||dx|| / ||x|| <= cond * ||dA|| / ||A||, with ||A|| >= max|A|; taken at 3 sigma;
    * bias DAC: half an LSB (2^-bits of full scale) through A^-1 (factor cond);
    * ADC: half an LSB (an upper bound: noise dithers the average towards zero error).
    """
    def half_lsb(bits: int) -> float:
        return 0.0 if bits == 0 else lsb(bits, 1.0) / 2

    coupling = 0.0
    if coupling_bits:
        lsb_rel = 1.0 / max(2 ** (coupling_bits - 1) - 1, 1)
        coupling = 3.0 * cond * 2.0 * math.sqrt(cells) * lsb_rel / math.sqrt(12.0)
    return coupling + (cond * half_lsb(dac_bits) + half_lsb(adc_bits)) / headroom


# -- programming stages (``programming.STAGES``) -------------------------------------------------


def write_couplings(work: ProgramWork) -> None:
    """Stage: every resistor array of the drift to its conductance codes (config [coupling]).

    Arrays are written in the drift's own order (Factored: J, then H), which fixes the draws of
    stochastic rounding. The damping of a Factored drift is a separate, unquantised conductance.
    Arrays with one component per pair of cells (a Factored H, whose mismatch is symmetric too,
    and the RLC board's capacitance matrix) get one stochastic rounding per pair: independent
    roundings would make a symmetric PSD H non-symmetric and refuse a drift the host got right.
    """
    cfg = work.profile.coupling
    rounding = work.rounding_coupling
    drift = work.drift
    paired = {"H"} if drift.form == "factored" else ({"matrix"} if drift.form == "dense" and work.underdamped else set())
    codes = {name: quantize_array(np.asarray(a, dtype=np.float64), cfg.bits, rounding, work.rng,
                                  pairs=name in paired)
             for name, a in drift.arrays().items()}
    work.report.couplings_written = codes[work.drift.array_names[0]]
    work.drift = type(work.drift).trusted(**codes, **work.drift.params())


def write_bias(work: ProgramWork) -> None:
    """Stage: the bias DAC (config [dac]): codes, clipping, and what was written."""
    work.bias, clipped = quantize(work.bias, work.profile.dac.bits, work.profile.dac.full_scale,
                                  work.rounding_dac, work.rng)
    work.report.bias_written = work.bias
    work.report.dac_clipped = clipped
