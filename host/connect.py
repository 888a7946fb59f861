"""host.connect: one call that returns a Device, wherever the device is."""

from __future__ import annotations

import re
from typing import Any

from protocol.device import Device
from protocol.errors import InvalidInputError


def connect(address: str = "embedded", seed: int | None = None, *,
            overrides: dict[str, Any] | None = None, **options: Any) -> Device:
    """Return a Device for ``address``.

    Args:
        address: "embedded" or "embedded:<profile>" runs the emulator in-process;
            "tcp://host:port" or "ipc://path" reaches a ``thermo-device serve`` daemon.
        seed: noise seed; the same seed gives bit for bit the numbers of Emulator(profile, seed).
        overrides: profile overrides {"section.key": value} (embedded mode).
        options: DeviceClient options for a daemon (timeout, retries, restore, ...), and
            ``curve={"server_key": ..., "secret_key_file": ...}`` for a CURVE daemon
            (docs/security.md).

    The device is a context manager: ``with connect(...) as dev:`` closes it on exit, normal or
    not (for a daemon, its session: left open, a session holds the daemon's slot and, on a board
    backend, the board itself until the daemon reclaims it as idle).
    """
    if not isinstance(address, str):
        raise InvalidInputError(f"address must be a string, got {type(address).__name__}")
    if address == "embedded" or address.startswith("embedded:"):
        profile = address.partition(":")[2] or "ideal"
        if options:
            raise InvalidInputError(f"unknown options for an embedded device: {', '.join(options)}")
        from .embedded import embedded_device

        return embedded_device(profile, seed, overrides)
    if address.startswith("tcp://") and not re.fullmatch(r"tcp://[^:/\s]+:\d{1,5}", address) \
            and not re.fullmatch(r"tcp://\[[0-9a-fA-F:.]+\]:\d{1,5}", address):
        raise InvalidInputError(f"device address {address!r} needs a host and a port, e.g. tcp://127.0.0.1:5555")
    if address.startswith(("tcp://", "ipc://")):
        try:
            from .client import DeviceClient
        except ImportError as exc:  # the wire arrives with the protocol issue
            raise InvalidInputError(f"remote devices are not available in this build: {exc}") from exc
        if "curve" in options:
            from .security import curve_options

            options.update(curve_options(options.pop("curve")))
        return DeviceClient(address, seed=seed, **options)
    raise InvalidInputError(f"unknown device address {address!r}: use 'embedded[:profile]', "
                            "'tcp://host:port' or 'ipc://path'")
