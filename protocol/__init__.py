"""The wire and the seam: drift descriptions, error codes, and the Device interface.

This package imports nothing of ``thermo_device`` or ``host``; both depend on it.
"""

from .device import Device, RunResult
from .drift import DRIFT_FORMS, Dense, Diagonal, Drift, Factored, drift_form, drift_matvec
from .errors import (
    CapacityError,
    DeviceError,
    ErrorCode,
    InvalidInputError,
    NonFiniteError,
    NotProgrammedError,
    NotStableError,
    ProfileError,
    ShapeError,
    UnsupportedError,
)

__all__ = [
    "DRIFT_FORMS", "CapacityError", "Dense", "Device", "DeviceError", "Diagonal", "Drift",
    "ErrorCode", "Factored", "InvalidInputError", "NonFiniteError", "NotProgrammedError",
    "NotStableError", "ProfileError", "RunResult", "ShapeError", "UnsupportedError",
    "drift_form", "drift_matvec",
]
