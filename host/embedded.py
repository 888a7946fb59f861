"""Embedded mode: the emulator in-process. The one place the host imports thermo_device."""

from __future__ import annotations

from typing import Any

from protocol.device import Device


def embedded_device(profile: str = "ideal", seed: int | None = None,
                    overrides: dict[str, Any] | None = None) -> Device:
    """An in-process Emulator; ``seed=None`` means seed 0 (runs are reproducible by default)."""
    from thermo_device import Emulator, load_profile

    return Emulator(load_profile(profile, overrides), seed=0 if seed is None else seed)
