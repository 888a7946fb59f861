"""Host-side adaptation to what a device declares (``protocol.Capabilities``).

A board may accept fewer drift forms than the host produces (the reference board: dense coupling
of a few cells only). ``DriftAdapter`` converts a drift into a form the device accepts when that
is exact and affordable, and otherwise fails early with an error that says what to change:

* Factored(J, H, damping) -> Dense(J^T H J + damping I): exact; O(m N^2) work and N^2 memory,
  fine for the cell counts of dense-only boards (the N x N matrix is what those boards hold);
* Diagonal(d) -> Dense(diag(d)), or -> Factored(I, diag(d), 0): exact;
* N above the device's cell count -> CapacityError before anything is sent.
"""

from __future__ import annotations

import numpy as np

from protocol.capabilities import Capabilities
from protocol.device import Device
from protocol.drift import Dense, Drift, Factored, drift_form
from protocol.errors import CapacityError, InvalidInputError, UnsupportedError


def device_capabilities(device: Device) -> Capabilities | None:
    """The device's declared capabilities, or None when it declares none readable (then every
    drift passes through unchanged)."""
    try:
        return device.capabilities()
    except InvalidInputError:
        return None


class DriftAdapter:
    """Converts drifts for one device. ``capabilities=None`` passes every drift through."""

    def __init__(self, capabilities: Capabilities | None) -> None:
        self.capabilities = capabilities
        self.converted = 0  # drifts converted so far (a cost worth seeing in a profile)

    def __call__(self, drift: Drift) -> Drift:
        caps = self.capabilities
        if caps is None:
            return drift
        form = drift_form(drift)
        n = drift.dim
        if n > caps.cells:
            raise CapacityError(f"the problem has N = {n} parameters but backend {caps.backend!r} has "
                                f"{caps.cells} cells: use a smaller model (or a parameter subset) or a "
                                "device with more cells")
        if caps.accepts(form):
            return drift
        out = self._convert(drift, caps)
        self.converted += 1
        return out

    @staticmethod
    def _convert(drift: Drift, caps: Capabilities) -> Drift:
        # The arrays below derive from a validated drift: built trusted, not scanned again.
        if drift.form in ("factored", "diagonal") and caps.accepts("dense"):
            return Dense.trusted(drift.dense())  # Factored.dense() is exactly symmetric
        if drift.form == "diagonal" and caps.accepts("factored"):
            return Factored.trusted(np.eye(drift.dim), np.diag(drift.diag), 0.0)
        raise UnsupportedError(f"backend {caps.backend!r} accepts {', '.join(caps.drift_forms)} drifts; "
                               f"a {drift_form(drift)} drift has no exact conversion to those")
