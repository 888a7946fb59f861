"""The Emulator: a software stochastic processing unit that satisfies ``protocol.Device``.

Programming analyses the drift once (validation and the exact representation: eigh, thin SVD or
Van Loan set-up); a run then advances the analog state in three phases:

1. ``delay`` tau under the previously programmed drift (the device keeps evolving while the host
   computes; skipped, and reported, when there is no earlier drift of the same size);
2. ``burn_in`` tau under the new drift, unobserved;
3. the readout window, ``duration - burn_in`` tau, sampled on the ADC grid (``readout.py``).

Warm start is the default: the state carries over from run to run. Same profile + seed + calls
give the same numbers bit for bit (one NumPy Generator per emulator, drawn in call order).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.device import RunResult
from protocol.drift import DRIFT_FORMS, Dense, Diagonal, Drift, Factored, as_finite_scalar, drift_form
from protocol.errors import (
    InvalidInputError,
    NotProgrammedError,
    ProfileError,
    ShapeError,
    UnsupportedError,
)

from . import __version__
from .dynamics import (
    GeneralSystem,
    ModalSystem,
    check_dimension,
    overdamped_system,
    stable_step,
    underdamped_system,
)
from .exact import GeneralPropagator, ModalPropagator
from .profile import Profile, load_profile
from .readout import plan_grid
from .stepping import OVERDAMPED_SCHEMES, UNDERDAMPED_SCHEMES, OverdampedStepper, UnderdampedStepper

# Stepping integrators run at most at this fraction of their stability limit: the profile's dt is
# an upper bound, and a stiff drift shrinks it (reported as diagnostics["dt"]).
STABILITY_MARGIN = 0.9
METHODS = {"overdamped": ("exact", *OVERDAMPED_SCHEMES), "underdamped": ("exact", *UNDERDAMPED_SCHEMES)}
DRIFT_FORMS_BY_DYNAMICS = {"overdamped": DRIFT_FORMS, "underdamped": ("dense", "diagonal")}


@dataclass(frozen=True, eq=False)
class _Programmed:
    drift: Drift
    bias: np.ndarray
    system: ModalSystem | GeneralSystem
    propagator: Any  # ModalPropagator | GeneralPropagator | OverdampedStepper | UnderdampedStepper
    state_dim: int


class Emulator:
    """An emulated SPU built from a profile.

    Args:
        profile: a Profile, or a built-in name / TOML path for ``load_profile``.
        seed: seeds the dynamic noise (the chip's static errors use ``mismatch.seed``).
    """

    def __init__(self, profile: Profile | str = "ideal", seed: int = 0) -> None:
        if not isinstance(profile, Profile):
            profile = load_profile(profile)
        method, dynamics = profile.integrator.method, profile.device.dynamics
        if method not in METHODS[dynamics]:
            raise ProfileError(f"integrator.method = {method!r} does not apply to {dynamics} dynamics "
                               f"(allowed: {', '.join(METHODS[dynamics])})")
        unsupported = profile.nonideal_keys()
        if unsupported:
            raise UnsupportedError(f"profile {profile.name!r} sets {', '.join(unsupported)}, which this "
                                   "emulator does not model yet; set them to their ideal values")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise InvalidInputError(f"seed must be a non-negative integer, got {seed!r}")
        self.profile = profile
        self.seed = int(seed)
        self.kappa = profile.kappa
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._current: _Programmed | None = None
        self._previous: _Programmed | None = None
        self._state: np.ndarray | None = None

    # -- Device interface -------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        p = self.profile
        import numba

        return {
            "backend": "emulator",
            "profile": p.name,
            "cells": p.device.cells,
            "dynamics": p.device.dynamics,
            "drift_forms": list(DRIFT_FORMS_BY_DYNAMICS[p.device.dynamics]),
            "integrator": p.integrator.method,
            "methods": list(METHODS[p.device.dynamics]),
            "tau_s": p.device.tau_s,
            "kappa": self.kappa,
            # stationary covariance = covariance_scale * A^-1 (kappa R C^-1 for the RLC array)
            "covariance_scale": self.kappa * (p.underdamped.resistance if p.device.dynamics == "underdamped" else 1.0),
            "max_duration": p.device.max_duration,
            "adc": {"bits": p.adc.bits, "sample_interval": p.adc.sample_interval},
            "seed": self.seed,
            "versions": {"thermo_ngd": __version__, "numpy": np.__version__, "numba": numba.__version__},
        }

    def program(self, drift: Drift, bias: np.ndarray | None = None) -> None:
        """Load a drift and bias. Invalid input raises a typed error and changes nothing."""
        prog = self._analyse(drift, bias)
        self._previous, self._current = self._current, prog
        if self._state is None or self._state.shape[0] != prog.state_dim:
            self._state = np.zeros(prog.state_dim)

    def run(self, duration: float, *, burn_in: float = 0.0, delay: float = 0.0, reset: bool = False,
            samples: int = 0, second_moment: bool = False) -> RunResult:
        """See ``protocol.Device.run``. Raises NotProgrammedError before the first program."""
        if self._current is None:
            raise NotProgrammedError("run before program: program a drift first")
        duration = as_finite_scalar(duration, "duration", minimum=0.0)
        burn_in = as_finite_scalar(burn_in, "burn_in", minimum=0.0)
        delay = as_finite_scalar(delay, "delay", minimum=0.0)
        if burn_in > duration:
            raise InvalidInputError(f"burn_in ({burn_in}) must not exceed duration ({duration})")
        max_d = self.profile.device.max_duration
        if duration + delay > max_d:
            raise InvalidInputError(f"delay + duration = {duration + delay} tau exceeds the device's "
                                    f"max_duration {max_d}")
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)):
            raise InvalidInputError(f"samples must be an integer, got {samples!r}")
        grid = plan_grid(duration - burn_in, self.profile.adc.sample_interval, int(samples))

        t0 = time.perf_counter()
        cur = self._current
        x = np.zeros(cur.state_dim) if reset else self._state.copy()
        delay_applied = 0.0
        prev = self._previous
        if delay > 0.0 and prev is not None and prev.state_dim == cur.state_dim:
            x = prev.propagator.jump(x, delay, self._rng)
            delay_applied = delay
        x = cur.propagator.jump(x, burn_in, self._rng)
        n_out = cur.system.n_out if isinstance(cur.system, GeneralSystem) else cur.state_dim
        if grid.n_adc:
            win = cur.propagator.window(x, grid.h, grid.n_adc, grid.stride, self._rng, second_moment)
            x = win.state
            mean = win.total / grid.n_adc
            moment = win.total_outer / grid.n_adc if second_moment else None
            out_samples = win.samples if samples else None
        else:
            mean = x[:n_out].copy()
            moment = np.outer(mean, mean) if second_moment else None
            out_samples = None
        self._state = x
        self._previous = cur  # once a run has gone by, the new drift is the one acting
        wall = time.perf_counter() - t0
        diag: dict[str, Any] = {
            "method": self.profile.integrator.method,
            "adc_samples": grid.n_adc,
            "adc_interval": grid.h,
            "delay_applied": delay_applied,
            "kappa": self.kappa,
            "wall_s": wall,
        }
        step = getattr(cur.propagator, "last_step", None)
        if step is not None and grid.n_adc:
            diag["dt"] = step
        return RunResult(mean=mean, state=x.copy(), samples=out_samples, second_moment=moment,
                         analog_time_s=(delay + duration) * self.profile.device.tau_s, diagnostics=diag)

    def step(self, drift: Drift, bias: np.ndarray | None, duration: float, **run_kwargs: Any) -> RunResult:
        """program + run; a failed program leaves the device as it was."""
        self.program(drift, bias)
        return self.run(duration, **run_kwargs)

    @property
    def state(self) -> np.ndarray:
        """The analog state: x (N) overdamped, [v, i] (2N) underdamped; empty before any program."""
        return np.zeros(0) if self._state is None else self._state.copy()

    @state.setter
    def state(self, value: np.ndarray) -> None:
        from protocol.drift import as_float_array

        arr = np.array(as_float_array(value, "state", 1), dtype=np.float64)
        if self._current is not None and arr.shape[0] != self._current.state_dim:
            raise ShapeError(f"state: expected length {self._current.state_dim}, got {arr.shape[0]}")
        self._state = arr

    def close(self) -> None:
        """Nothing to release in-process; kept for the Device interface."""

    # -- internals --------------------------------------------------------------------------------

    def _analyse(self, drift: Drift, bias: np.ndarray | None) -> _Programmed:
        p = self.profile
        form = drift_form(drift)
        dynamics = p.device.dynamics
        if form not in DRIFT_FORMS_BY_DYNAMICS[dynamics]:
            raise UnsupportedError(f"{dynamics} device does not accept {form} drift "
                                   f"(accepted: {', '.join(DRIFT_FORMS_BY_DYNAMICS[dynamics])})")
        b = check_dimension(drift, bias, p.device.cells)
        method = p.integrator.method
        if dynamics == "overdamped":
            system = overdamped_system(drift, b, self.kappa)
            if method == "exact":
                prop = (ModalPropagator(system, self.kappa) if isinstance(system, ModalSystem)
                        else GeneralPropagator(system))
            else:
                dt = min(p.integrator.dt, STABILITY_MARGIN * stable_step(system, method))
                prop = OverdampedStepper(drift, b, self.kappa, dt, method)
            return _Programmed(drift, b, system, prop, drift.dim)
        u = p.underdamped
        system = underdamped_system(drift, b, self.kappa, u.inductance, u.resistance)
        if method == "exact":
            prop = GeneralPropagator(system)
        else:
            dt = min(p.integrator.dt, STABILITY_MARGIN * stable_step(system, method, u.inductance))
            prop = UnderdampedStepper(drift, self.kappa, dt, method, u.inductance, u.resistance)
        return _Programmed(drift, b, system, prop, 2 * drift.dim)


__all__ = ["Emulator", "Dense", "Diagonal", "Factored"]
