"""Static mismatch: per-chip component errors, drawn once from the chip id.

Config [mismatch]; every spread is a relative standard deviation (suffix ``_rel_std``) except
the offset, which is in volts::

    G_ij  -> G_ij (1 + d_ij),   d_ij ~ N(0, coupling_rel_std^2)   every programmed conductance
    C_i   -> C_i  (1 + e_i),    e_i  ~ N(0, capacitance_rel_std^2) per-cell capacitance (tau_i)
    b_i   -> b_i  (1 + u_i) + o_i,  u_i ~ N(0, gain_rel_std^2),  o_i ~ N(0, (offset_V_std / V_fs)^2)

The same chip id (``mismatch.seed``) gives the same errors in every run and every process;
another id gives independent ones. Draws are keyed by (chip id, array name, shape): each resistor
array of the device has its own errors, so the J and J^T arrays of a Factored drift differ and
mismatch makes the drift non-symmetric (a coupling conductance between two cells is two
resistors, one per direction). The capacitive coupling of the RLC board is one component per
pair, so its errors are symmetric. Relative errors are clipped at -0.9 to keep conductances
positive.
"""

from __future__ import annotations

import zlib

import numpy as np

from .profile import MismatchSection
from .realization import ProgramWork


class Chip:
    """The static errors of one chip."""

    def __init__(self, config: MismatchSection, full_scale_V: float) -> None:
        self.config = config
        self.full_scale_V = full_scale_V

    def _draw(self, name: str, shape: tuple[int, ...], std: float) -> np.ndarray:
        seq = np.random.SeedSequence([self.config.seed, zlib.crc32(name.encode()), *shape])
        return np.clip(std * np.random.Generator(np.random.PCG64(seq)).standard_normal(shape), -0.9, None)

    def conductance_gain(self, name: str, shape: tuple[int, ...], symmetric: bool = False) -> np.ndarray | None:
        """1 + d for every conductance of array ``name``; None when the spread is 0."""
        std = self.config.coupling_rel_std
        if std == 0.0:
            return None
        d = self._draw(f"coupling/{name}", shape, std)
        if symmetric:
            d = np.triu(d) + np.triu(d, 1).T
        return 1.0 + d

    def capacitance(self, n: int) -> np.ndarray | None:
        std = self.config.capacitance_rel_std
        return None if std == 0.0 else 1.0 + self._draw("capacitance", (n,), std)

    def input_gain(self, n: int) -> np.ndarray | None:
        std = self.config.gain_rel_std
        return None if std == 0.0 else 1.0 + self._draw("input_gain", (n,), std)

    def offset(self, n: int) -> np.ndarray | None:
        std = self.config.offset_V_std / self.full_scale_V
        return None if std == 0.0 else std * np.random.Generator(
            np.random.PCG64(np.random.SeedSequence([self.config.seed, zlib.crc32(b"offset"), n]))
        ).standard_normal(n)

    # -- programming stages (``programming.STAGES``) ---------------------------------------------

    def apply_coupling_mismatch(self, work: ProgramWork) -> None:
        """Stage: every written conductance times its static (1 + d).

        A Factored drift's J is used by two arrays (J and J^T) with errors of their own: the J^T
        array's realised values go to ``work.j_out`` (None while it equals J).
        """
        drift = work.drift
        if drift.form == "factored":
            j, h = drift.J, drift.H
            g_in = self.conductance_gain("J", j.shape)
            g_out = self.conductance_gain("JT", j.shape)
            g_h = self.conductance_gain("H", h.shape, symmetric=True)
            work.j_out = None if g_out is None else j * g_out
            work.drift = type(drift).trusted(j if g_in is None else j * g_in, h if g_h is None else h * g_h,
                                             drift.damping)
            return
        (name, a), = drift.arrays().items()
        g = self.conductance_gain(drift.form, a.shape, symmetric=drift.form == "dense" and work.underdamped)
        if g is not None:
            work.drift = type(drift).trusted(a * g)

    def apply_cell_capacitance(self, work: ProgramWork) -> None:
        """Stage: per-cell relative capacitances (per-cell tau)."""
        work.cap = self.capacitance(work.drift.dim)

    def apply_input_errors(self, work: ProgramWork) -> None:
        """Stage: the written bias through each cell's input gain and op-amp offset."""
        n = work.drift.dim
        gain, offset = self.input_gain(n), self.offset(n)
        if gain is not None:
            work.bias = work.bias * gain
        if offset is not None:
            work.bias = work.bias + offset
