"""The arguments of ``run`` (and ``step``): checked in one place, for every boundary.

Two boundaries take run arguments, and both check them here:

* a device (``Device.run``: the emulator, a board driver, a plugin) calls ``check_run_args``;
* the daemon reads them off the wire with ``run_args_from_wire``, which adds what only a wire
  needs (msgpack types, a missing duration) before any backend sees them.

The returned-samples cap is a limit of the protocol, not of one backend: the daemon learns it here
rather than from the emulator, and a backend may cap lower (``CapacityError``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .drift import as_finite_scalar
from .errors import CapacityError, InvalidInputError

# The most readouts one run may return (samples=K gives K x N numbers).
MAX_RETURNED_SAMPLES = 1_000_000


def check_run_args(duration: float, burn_in: float, delay: float, samples: int,
                   max_duration: float) -> tuple[float, float, float, int]:
    """``run``'s arguments checked the same way by every backend: (duration, burn_in, delay, samples)."""
    duration = as_finite_scalar(duration, "duration", minimum=0.0)
    burn_in = as_finite_scalar(burn_in, "burn_in", minimum=0.0)
    delay = as_finite_scalar(delay, "delay", minimum=0.0)
    if burn_in > duration:
        raise InvalidInputError(f"burn_in ({burn_in}) must not exceed duration ({duration})")
    if duration + delay > max_duration:
        raise InvalidInputError(f"delay + duration = {duration + delay} tau exceeds the device's "
                                f"max_duration {max_duration}")
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)):
        raise InvalidInputError(f"samples must be an integer, got {samples!r}")
    samples = int(samples)
    if samples < 0 or samples > MAX_RETURNED_SAMPLES:
        raise CapacityError(f"samples = {samples} is out of range [0, {MAX_RETURNED_SAMPLES}]")
    return duration, burn_in, delay, samples


def _wire_time(value: Any, name: str) -> float:
    if type(value) is float and 0.0 <= value < math.inf:  # the common case, without NumPy
        return value
    if type(value) is not int and type(value) is not float:  # not "5", not true: msgpack numbers only
        raise InvalidInputError(f"{name} must be a number (msgpack int or float), got {value!r}"[:200])
    return as_finite_scalar(value, name, minimum=0.0)  # the checks and error messages


def run_args_from_wire(args: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``Device.run`` from a request's ``args``, checked so that a backend
    never sees a NaN duration, a string for a flag or a sample count above the wire's cap.

    The cap is ``invalid_input`` on the wire (docs/protocol.md); the device's own checks
    (``check_run_args``: burn_in <= duration, max_duration) stay with the device.
    """
    if "duration" not in args:
        raise InvalidInputError("run needs a duration (in tau)")
    out: dict[str, Any] = {"duration": _wire_time(args["duration"], "duration"),
                           "burn_in": _wire_time(args.get("burn_in", 0.0), "burn_in"),
                           "delay": _wire_time(args.get("delay", 0.0), "delay")}
    for flag in ("reset", "second_moment"):
        value = args.get(flag, False)
        if not isinstance(value, bool):
            raise InvalidInputError(f"{flag} must be true or false, got {value!r}")
        out[flag] = value
    samples = args.get("samples", 0)
    if isinstance(samples, bool) or not isinstance(samples, int) or not 0 <= samples <= MAX_RETURNED_SAMPLES:
        raise InvalidInputError(f"samples must be an integer in [0, {MAX_RETURNED_SAMPLES}], got {samples!r}")
    out["samples"] = samples
    return out


__all__ = ["MAX_RETURNED_SAMPLES", "check_run_args", "run_args_from_wire"]
