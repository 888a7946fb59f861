"""The Device interface: the one seam between a training host and any device.

The in-process emulator, the socket client to a daemon and a real-hardware backend all satisfy
``Device``. A host that only uses these members runs unchanged on each of them.

Every member is declared, the optional ones too (``calibrate``, ``snapshot``, ``restore``): a
device that lacks the feature still has the method, and it raises ``UnsupportedError``. So a host
or the daemon calls them and catches that error; nobody looks for a member with ``getattr``.

Units: durations are in device time constants tau (RC). ``RunResult.analog_time_s`` converts
the analog time a run took into seconds on the device's declared tau.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .capabilities import Capabilities
from .drift import Drift
from .errors import UnsupportedError


def pcg64_to_plain(state: dict[str, Any]) -> dict[str, Any]:
    """A PCG64 bit-generator state (``Generator.bit_generator.state``) as plain data, its 128-bit
    words as decimal strings: msgpack integers and torch's weights-only loader stop at 64 bits.
    Snapshots (``DeviceSnapshot.meta``) and training checkpoints carry generators this way."""
    inner = state["state"]
    return {"bit_generator": state["bit_generator"], "state": str(inner["state"]), "inc": str(inner["inc"]),
            "has_uint32": int(state["has_uint32"]), "uinteger": int(state["uinteger"])}


def pcg64_from_plain(d: Any, where: str) -> dict[str, Any]:
    """The PCG64 state ``pcg64_to_plain`` wrote, checked (InvalidInputError naming ``where``)."""
    from .errors import InvalidInputError

    try:
        if d["bit_generator"] != "PCG64":
            raise ValueError(f"generator {d['bit_generator']!r} is not PCG64")
        state, inc = int(str(d["state"])), int(str(d["inc"]))
        if not (0 <= state < 1 << 128 and 0 <= inc < 1 << 128):
            raise ValueError("words out of range")
        return {"bit_generator": "PCG64", "state": {"state": state, "inc": inc},
                "has_uint32": int(d["has_uint32"]) & 1, "uinteger": int(d["uinteger"]) & 0xFFFFFFFF}
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"{where} is not a PCG64 state ({exc})") from None


@dataclass(frozen=True, eq=False)
class RunResult:
    """What a run returns.

    Attributes:
        mean: time average of the ADC readout over the window [burn_in, duration], shape (N,).
        state: the analog state at the end of the run (shape of ``Device.state``).
        samples: with ``samples=K``, K readouts evenly spaced over the window, shape (K, N).
        second_moment: with ``second_moment=True``, the window average of x x^T, shape (N, N).
        analog_time_s: analog time spent by the run (delay + duration), in seconds.
        diagnostics: free-form numbers about the run (sample count, step size, method, ...).
    """

    mean: np.ndarray
    state: np.ndarray
    samples: np.ndarray | None = None
    second_moment: np.ndarray | None = None
    analog_time_s: float = 0.0
    diagnostics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class DeviceSnapshot:
    """A device's complete dynamic state, for checkpoints and fail-over (``snapshot``/``restore``).

    Attributes:
        meta: msgpack-native data (backend name, profile, generator states, program forms, ...).
        arrays: named arrays (analog state, the programs' drift arrays and biases, ...).

    The content is the backend's business; a host stores it and hands it back unchanged.
    """

    meta: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@runtime_checkable
class Device(Protocol):
    """A stochastic processing unit, as a host sees it.

    A class may subclass ``Device`` to declare that it implements it (``host.DeviceClient`` does);
    it then inherits the optional members' defaults, which raise ``UnsupportedError``.
    """

    def info(self) -> dict[str, Any]:
        """Capabilities: cells, dynamics, drift forms, limits, tau, versions."""
        ...

    def capabilities(self) -> Capabilities:
        """The immutable description (``info()["capabilities"]`` as a ``Capabilities``)."""
        ...

    def status(self) -> dict[str, Any]:
        """Time-varying health as plain data (temperature, counters, ...); may be empty."""
        ...

    def program(self, drift: Drift, bias: np.ndarray | None = None) -> None:
        """Load a drift and the bias b (zeros when None). Invalid input raises and changes nothing."""
        ...

    def run(
        self,
        duration: float,
        *,
        burn_in: float = 0.0,
        delay: float = 0.0,
        reset: bool = False,
        samples: int = 0,
        second_moment: bool = False,
    ) -> RunResult:
        """Evolve for ``delay`` under the previous drift, then ``duration`` under the current one.

        The readout window is [burn_in, duration] of the second phase. Warm start is the default:
        the run continues from the current state; ``reset=True`` starts from zero.
        """
        ...

    def step(
        self,
        drift: Drift,
        bias: np.ndarray | None,
        duration: float,
        *,
        burn_in: float = 0.0,
        delay: float = 0.0,
        reset: bool = False,
        samples: int = 0,
        second_moment: bool = False,
    ) -> RunResult:
        """program + run in one call (one round trip on the wire): the TNGD hot path."""
        ...

    @property
    def state(self) -> np.ndarray:
        """The analog state (a copy)."""
        ...

    @state.setter
    def state(self, value: np.ndarray) -> None: ...

    def close(self) -> None:
        """Release the device (a no-op in-process; ends the session on a daemon)."""
        ...

    # -- optional: raise UnsupportedError when the device does not support them ------------------

    def calibrate(self, **options: Any) -> dict[str, Any]:
        """Measure and correct static errors; a plain-data record. Raises UnsupportedError when the
        device does not support it (``Capabilities.supports_calibration`` says which)."""
        raise UnsupportedError("this device has no calibration")

    def snapshot(self) -> DeviceSnapshot:
        """The complete dynamic state (checkpoints, fail-over). Raises UnsupportedError when the
        device does not support it."""
        raise UnsupportedError("this device cannot snapshot its state")

    def restore(self, snapshot: DeviceSnapshot) -> None:
        """Continue from a ``snapshot`` of this device. Raises UnsupportedError when the device does
        not support it; invalid input raises and changes nothing."""
        raise UnsupportedError("this device cannot restore a snapshot")
