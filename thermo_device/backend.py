"""The Backend interface: what a device implementation (emulator, board driver, plugin) provides.

A ``Backend`` satisfies ``protocol.Device`` (so the daemon and an in-process host use it as is)
and adds the hardware-facing members: a declared ``capabilities()`` (immutable, see
``protocol.capabilities``), ``status()`` (time-varying health), and optional ``calibrate()``,
``snapshot()`` and ``restore()`` (the defaults raise ``UnsupportedError``).
The contract, call by call, with units, timing, errors and threading: docs/hardware-backend.md.

Rules every implementation follows (the conformance suite in tests/conformance checks them):

* invalid input raises a typed ``protocol.errors.DeviceError`` and changes nothing: not the state,
  not the programmed drift, not the noise stream;
* ``run`` before any ``program`` raises ``NotProgrammedError``;
* durations are in tau; ``run`` warm-starts from the current state unless ``reset=True``;
* one backend object serves one session; the daemon never calls it from two threads at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from protocol.capabilities import BACKEND_INTERFACE_VERSION, Capabilities
from protocol.device import DeviceSnapshot, RunResult
from protocol.drift import Drift, drift_form
from protocol.errors import UnsupportedError
from protocol.run_args import check_run_args

__all__ = ["Backend", "check_run_args"]  # check_run_args: re-exported, it lives in protocol.run_args


class Backend(ABC):
    """Abstract base of every device implementation. Subclasses implement the abstract members."""

    interface_version: int = BACKEND_INTERFACE_VERSION

    @abstractmethod
    def capabilities(self) -> Capabilities:
        """The immutable description (cells, forms, converters, tau, precision, ...)."""

    def info(self) -> dict[str, Any]:
        """Plain data for the host; must contain ``capabilities`` (``Capabilities.to_dict()``).

        The default gives the capabilities plus the top-level keys older hosts read.
        """
        caps = self.capabilities()
        return {"backend": caps.backend, "cells": caps.cells, "dynamics": caps.dynamics,
                "drift_forms": list(caps.drift_forms), "tau_s": caps.tau_s,
                "max_duration": caps.max_duration, "capabilities": caps.to_dict()}

    @abstractmethod
    def program(self, drift: Drift, bias: np.ndarray | None = None) -> None:
        """Load drift A and bias b (zeros when None). Invalid input raises and changes nothing."""

    @abstractmethod
    def run(self, duration: float, *, burn_in: float = 0.0, delay: float = 0.0, reset: bool = False,
            samples: int = 0, second_moment: bool = False) -> RunResult:
        """Evolve ``delay`` under the previous drift, then ``duration`` (tau) under the current one."""

    def step(self, drift: Drift, bias: np.ndarray | None, duration: float, **run_kwargs: Any) -> RunResult:
        """program + run. Override only to save a round trip; the semantics must stay the same."""
        self.program(drift, bias)
        return self.run(duration, **run_kwargs)

    @property
    @abstractmethod
    def state(self) -> np.ndarray:
        """The analog state in host units (a copy)."""

    @state.setter
    @abstractmethod
    def state(self, value: np.ndarray) -> None: ...

    def calibrate(self, **options: Any) -> dict[str, Any]:
        """Measure and correct static errors; returns a plain-data record. Optional."""
        raise UnsupportedError(f"backend {self.capabilities().backend!r} has no calibration")

    def status(self) -> dict[str, Any]:
        """Time-varying health as plain data (temperature, last error, link counters, ...)."""
        return {}

    def snapshot(self) -> DeviceSnapshot:
        """Optional: the complete dynamic state, for checkpoints and fail-over (``restore`` continues
        bit for bit). A board that cannot export it keeps this default."""
        raise UnsupportedError(f"backend {self.capabilities().backend!r} cannot snapshot its state")

    def restore(self, snapshot: DeviceSnapshot) -> None:
        """Optional: continue from a ``snapshot`` of this backend (invalid input changes nothing)."""
        raise UnsupportedError(f"backend {self.capabilities().backend!r} cannot restore a snapshot")

    def close(self) -> None:
        """Release the device (links, locks). Idempotent."""
        return None

    def check_form(self, drift: Drift) -> str:
        """The drift's form, or UnsupportedError when the capabilities do not declare it."""
        form = drift_form(drift)
        caps = self.capabilities()
        if not caps.accepts(form):
            raise UnsupportedError(f"backend {caps.backend!r} does not accept {form} drift "
                                   f"(accepted: {', '.join(caps.drift_forms)})")
        return form

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
