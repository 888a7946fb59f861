"""toy: a third-party backend with narrower capabilities than the emulator it is built on
(8 cells, diagonal drifts only, runs up to 1e4 tau)."""

from __future__ import annotations

from typing import Any

import numpy as np

from protocol import Capabilities, RunResult
from protocol.drift import Drift
from thermo_device import Backend, Emulator, load_profile


class ToyBackend(Backend):
    def __init__(self, seed: int = 0, cells: int = 8, kappa: float = 1e-3) -> None:
        self._emu = Emulator(load_profile("ideal", {"device.cells": int(cells), "noise.kappa": float(kappa),
                                                    "device.max_duration": 1e4}), seed=seed)

    def capabilities(self) -> Capabilities:
        p = self._emu.profile
        return Capabilities(backend="toy", cells=p.device.cells, dynamics="overdamped", drift_forms=("diagonal",),
                            tau_s=p.device.tau_s, max_duration=p.device.max_duration,
                            sample_interval=p.adc.sample_interval, deterministic=True)

    def program(self, drift: Drift, bias: np.ndarray | None = None) -> None:
        self.check_form(drift)
        self._emu.program(drift, bias)

    def run(self, duration: float, **kwargs: Any) -> RunResult:
        return self._emu.run(duration, **kwargs)

    @property
    def state(self) -> np.ndarray:
        return self._emu.state

    @state.setter
    def state(self, value: np.ndarray) -> None:
        self._emu.state = value


def make_backend(seed: int = 0, **options: Any) -> ToyBackend:
    return ToyBackend(seed, **options)
