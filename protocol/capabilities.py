"""What a backend declares about itself: the immutable description a host adapts to.

A backend's ``info()`` carries ``info["capabilities"]``, the plain-data form of ``Capabilities``
(msgpack-native: it crosses the wire unchanged). The host reads it with
``Capabilities.from_info(device.info())`` without importing the device side. Older devices that
predate the field are read from the top-level ``info`` keys (cells, dynamics, drift_forms, ...).

Precision: ``precision`` is the backend's declared bound on the systematic error of a solve, the
part that averaging does not remove (converter rounding, programming error, mismatch left after
calibration):

    max_i |E[x_bar]_i - (A^-1 b)_i| <= precision * max_i |(A^-1 b)_i|

for symmetric A with condition number at most ``PRECISION_COND`` (the problems of the
conformance suite). The statistical part (thermal noise, ADC read noise) comes on top and is
checked against standard errors derived from the reported noise strength.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from .drift import DRIFT_FORMS
from .errors import InvalidInputError

# The interface version of the Backend contract (docs/hardware-backend.md); bump on incompatible change.
BACKEND_INTERFACE_VERSION = 1
# The condition number up to which ``precision`` is declared (see the module docstring).
PRECISION_COND = 10.0
DYNAMICS = ("overdamped", "underdamped")


@dataclass(frozen=True)
class Capabilities:
    """A backend's immutable description.

    Attributes:
        backend: the backend's registry name ("emulator", "register", a plugin's name).
        cells: the largest N a drift may have.
        dynamics: "overdamped" (solves A x = b in the mean) or "underdamped" (samples only).
        drift_forms: the drift descriptions it accepts ("dense", "factored", "diagonal").
        tau_s: the time constant tau in seconds (all durations are in tau).
        max_duration: the longest delay + duration of one run, in tau.
        sample_interval: ADC sample spacing in tau (the readout grid).
        dac_bits, adc_bits, coupling_bits: converter resolutions (0 = ideal).
        precision: declared systematic solve error (module docstring); 0 for an ideal device.
        supports_calibration: ``calibrate()`` does something (else it raises UnsupportedError).
        deterministic: the same seed and calls give the same numbers (emulators, simulated boards).
        max_rank: for factored drifts, the largest m (rows of J); None = no limit below cells.
        interface_version: BACKEND_INTERFACE_VERSION the backend was written against.
        coupling_rel_error: standard deviation of the error of one realised conductance, relative
            to the largest conductance of its array: sqrt(mismatch_rel_std^2 + (LSB / sqrt(12))^2),
            LSB the coupling code step relative to that largest entry (1 / (2^(bits-1) - 1);
            LSB^2 / 6 in place of LSB^2 / 12 with stochastic rounding). It
            bounds every entry (mismatch is relative to each entry, at most the largest), so a
            host can predict how far the realised drift strays from its own, e.g. the shift of
            the smallest eigenvalue, and size the damping that keeps it positive-stable. Errors
            of distinct conductances are independent (a Factored drift's J and J^T arrays too).
            0 for a device that realises its couplings exactly; absent (0) on older devices.
    """

    backend: str
    cells: int
    dynamics: str
    drift_forms: tuple[str, ...]
    tau_s: float
    max_duration: float
    sample_interval: float
    dac_bits: int = 0
    adc_bits: int = 0
    coupling_bits: int = 0
    precision: float = 0.0
    supports_calibration: bool = False
    deterministic: bool = False
    max_rank: int | None = None
    interface_version: int = BACKEND_INTERFACE_VERSION
    coupling_rel_error: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "drift_forms", tuple(self.drift_forms))
        if not isinstance(self.cells, int) or self.cells < 1:
            raise InvalidInputError(f"capabilities.cells must be a positive integer, got {self.cells!r}")
        if self.dynamics not in DYNAMICS:
            raise InvalidInputError(f"capabilities.dynamics must be one of {DYNAMICS}, got {self.dynamics!r}")
        unknown = [f for f in self.drift_forms if f not in DRIFT_FORMS]
        if unknown or not self.drift_forms:
            raise InvalidInputError(f"capabilities.drift_forms must be a non-empty subset of {DRIFT_FORMS}, "
                                    f"got {list(self.drift_forms)}")
        for name in ("tau_s", "max_duration", "sample_interval"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise InvalidInputError(f"capabilities.{name} must be a positive number, got {v!r}")
        if not (math.isfinite(self.precision) and self.precision >= 0.0):
            raise InvalidInputError(f"capabilities.precision must be >= 0, got {self.precision!r}")
        if not (isinstance(self.coupling_rel_error, (int, float)) and math.isfinite(self.coupling_rel_error)
                and self.coupling_rel_error >= 0.0):
            raise InvalidInputError(f"capabilities.coupling_rel_error must be >= 0, got {self.coupling_rel_error!r}")

    def accepts(self, form: str) -> bool:
        return form in self.drift_forms

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples) for ``info()["capabilities"]``."""
        out = asdict(self)
        out["drift_forms"] = list(self.drift_forms)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Capabilities:
        """Read a capabilities map; unknown keys are ignored (forward compatible)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> Capabilities:
        """The capabilities in a device's ``info()``, or a reading of its top-level keys."""
        caps = info.get("capabilities")
        if isinstance(caps, Mapping):
            return cls.from_dict(caps)
        # A device from before the capabilities field: what its info() said at top level.
        adc, dac, coupling = (info.get(k) if isinstance(info.get(k), Mapping) else {}
                              for k in ("adc", "dac", "coupling"))
        try:
            return cls(backend=str(info.get("backend", "unknown")), cells=int(info["cells"]),
                       dynamics=str(info.get("dynamics", "overdamped")),
                       drift_forms=tuple(info.get("drift_forms", DRIFT_FORMS)),
                       tau_s=float(info.get("tau_s", 1e-6)), max_duration=float(info.get("max_duration", 1e7)),
                       sample_interval=float(adc.get("sample_interval", 0.1)),
                       dac_bits=int(dac.get("bits", 0)), adc_bits=int(adc.get("bits", 0)),
                       coupling_bits=int(coupling.get("bits", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"info() carries no readable capabilities: {exc}") from exc
