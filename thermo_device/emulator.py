"""The Emulator: a software stochastic processing unit that satisfies ``protocol.Device``.

A thin composer of the chip's models, each in its own module:

* ``programming.py``: the programming stages (calibration, conductance codes, mismatch, range
  mapping, bias DAC, input errors) and the choice of propagator (``propagator.py``: exact in
  ``exact.py``, time stepping in ``stepping.py``);
* ``run_loop.py``: one run = delay, burn-in and readout window, in chunks of constant temperature
  (``temperature.py``), through the ADC (``converters.py``);
* ``noise.py`` (kappa, the 1/f state), ``mismatch.py`` (the chip's static errors),
  ``calibration.py``, ``snapshot.py``, ``description.py`` (info and capabilities).

Warm start is the default: the state carries over from run to run. Same profile + seed + calls
give the same numbers bit for bit (one NumPy Generator per emulator, drawn in call order; static
chip errors come from the chip id).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from protocol.capabilities import Capabilities
from protocol.device import DeviceSnapshot, RunResult
from protocol.drift import Drift, as_float_array, drift_form
from protocol.errors import InvalidInputError, NotProgrammedError, ShapeError, UnsupportedError

from . import description
from .backend import Backend, check_run_args
from .calibration import Calibration, calibrate, calibrate_offsets
from .converters import AdcChain
from .dynamics import check_dimension
from .mismatch import Chip
from .noise import FlickerNoise
from .profile import Profile, check_profile, load_profile
from .programming import Programmed, program, stages
from .propagator import Propagator
from .realization import ProgramReport
from .run_loop import RunLoop, RunRequest
from .snapshot import ProgramSource, pack_snapshot, unpack_snapshot
from .temperature import Conditions, Thermostat


@dataclass(frozen=True, eq=False)
class _Live:
    """What ``program`` and ``run`` change: the current and previous programs and the analog
    state (physical units). Calibration probes run on it and put it back, with the 1/f state."""

    current: Programmed | None = None
    previous: Programmed | None = None
    state: np.ndarray | None = None


class Emulator(Backend):
    """An emulated SPU built from a profile (a ``Backend``, hence a ``protocol.Device``).

    Args:
        profile: a Profile, or a built-in name / TOML path for ``load_profile``.
        seed: seeds the dynamic noise; the chip's static errors use ``mismatch.seed``.
    """

    def __init__(self, profile: Profile | str = "ideal", seed: int = 0) -> None:
        if not isinstance(profile, Profile):
            profile = load_profile(profile)
        check_profile(profile)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise InvalidInputError(f"seed must be a non-negative integer, got {seed!r}")
        self.profile = profile
        self.seed = int(seed)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._stages = stages(profile, Chip(profile.mismatch, profile.noise.full_scale_V))
        self._thermostat = Thermostat(profile, self._rng)
        self._flicker = FlickerNoise(profile.noise)
        self._loop = RunLoop(profile, self._thermostat,
                             AdcChain(profile.adc.bits, profile.adc.full_scale, profile.adc.read_noise_std),
                             self._rng)
        self._calibrations: dict[int, Calibration] = {}
        self._live = _Live()

    # -- conditions now -------------------------------------------------------------------------

    def _conditions(self) -> Conditions:
        return self._loop.conditions()

    @property
    def kappa(self) -> float:
        """Noise strength (thermal + injected) now, in full-scale units."""
        return self._conditions().kappa

    @property
    def cells(self) -> int:
        return self.profile.device.cells

    @property
    def device_time(self) -> float:
        """Device time since start, tau (it keeps running across runs)."""
        return self._thermostat.time

    @property
    def temperature_K(self) -> float:  # noqa: N802 - a unit suffix
        return self._thermostat.temperature_K

    @property
    def propagator(self) -> Propagator | None:
        """The current program's propagator (for benchmarks of the kernels themselves)."""
        return self._live.current.propagator if self._live.current is not None else None

    # -- Device interface -----------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return description.info(self.profile, kappa=self.kappa, temperature_K=self._thermostat.temperature_K,
                                calibrated_sizes=sorted(self._calibrations), seed=self.seed)

    def capabilities(self) -> Capabilities:
        return description.capabilities(self.profile)

    def status(self) -> dict[str, Any]:
        cur = self._live.current
        return {"programmed": cur is not None, "dim": cur.realized.drift.dim if cur is not None else 0,
                "method": cur.method if cur is not None else None,
                "temperature_K": self._thermostat.temperature_K,
                "calibrated_sizes": sorted(self._calibrations)}

    def program(self, drift: Drift, bias: np.ndarray | None = None) -> None:
        """Load a drift and bias. Invalid input raises a typed error and changes nothing."""
        drift_form(drift)  # a typed error for anything that is not a drift description
        self._install(self._build(drift, bias, self._calibrations.get(drift.dim)))

    def program_probe(self, drift: Drift, bias: np.ndarray) -> ProgramReport:
        """Program without calibration, at range scale 1 and with nearest rounding: the codes a
        calibration controller knows in advance (``calibration.calibrate``). Returns the report."""
        prog = self._build(drift, bias, None, unit_scale=True)
        self._install(prog)
        return prog.realized.report

    def run(self, duration: float, *, burn_in: float = 0.0, delay: float = 0.0, reset: bool = False,
            samples: int = 0, second_moment: bool = False) -> RunResult:
        """See ``protocol.Device.run``. Raises NotProgrammedError before the first program."""
        live = self._live
        if live.current is None:
            raise NotProgrammedError("run before program: program a drift first")
        duration, burn_in, delay, samples = check_run_args(duration, burn_in, delay, samples,
                                                           self.profile.device.max_duration)
        req = RunRequest(duration, burn_in, delay, bool(reset), samples, bool(second_moment))
        x, result = self._loop.run(live.current, live.previous, live.state, req)
        # once a run has gone by, the new drift is the one acting
        self._live = replace(live, previous=live.current, state=x)
        return result

    def step(self, drift: Drift, bias: np.ndarray | None, duration: float, **run_kwargs: Any) -> RunResult:
        """program + run; a failed program leaves the device as it was."""
        self.program(drift, bias)
        return self.run(duration, **run_kwargs)

    @property
    def state(self) -> np.ndarray:
        """The analog state in host units: x (N) overdamped, [v, i] (2N) underdamped."""
        live = self._live
        if live.state is None:
            return np.zeros(0)
        return live.state * self._scale()

    @state.setter
    def state(self, value: np.ndarray) -> None:
        arr = np.array(as_float_array(value, "state", 1), dtype=np.float64)
        cur = self._live.current
        if cur is not None and arr.shape[0] != cur.state_dim:
            raise ShapeError(f"state: expected length {cur.state_dim}, got {arr.shape[0]}")
        self._live = replace(self._live, state=arr / self._scale())

    def calibrate(self, n: int | None = None, *, duration: float = 3000.0, burn_in: float = 20.0,
                  probe: float = 0.5, what: str = "full") -> dict[str, Any]:
        """Measure this chip's coupling gains, input gains and offsets for Dense drifts of size n
        (``what="full"``), or the offsets of n cells alone for every drift form (``"offsets"``:
        one run, ``calibration.calibrate_offsets``).

        Later programs of that size are pre-distorted to cancel them (``calibration.py``).
        The analog state, the programs and the 1/f state are put back afterwards; the noise
        stream and device time have moved on, as on a real chip.
        """
        if what not in ("full", "offsets"):
            raise InvalidInputError(f"calibrate: what must be 'full' or 'offsets', got {what!r}")
        if self.profile.device.dynamics != "overdamped":
            raise UnsupportedError("calibration is implemented for the overdamped array")
        if n is None:
            if self._live.current is None:
                raise InvalidInputError("calibrate: give n, or program a drift first")
            n = self._live.current.realized.drift.dim
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):  # int(nan) would raise ValueError
            raise InvalidInputError(f"calibrate: n must be an integer, got {n!r}")
        saved = self._saved_live()
        try:
            cal = (calibrate(self, int(n), duration=duration, burn_in=burn_in, probe=probe) if what == "full"
                   else calibrate_offsets(self, int(n), duration=duration, burn_in=burn_in))
        finally:
            self._put_back(saved)
        self._calibrations[cal.n] = cal
        return cal.summary()

    def clear_calibration(self) -> None:
        self._calibrations.clear()

    def snapshot(self) -> DeviceSnapshot:
        """Everything that determines this device's future numbers, as plain data and arrays.

        ``restore`` on an emulator of the same profile continues bit for bit: analog state, noise
        generator, thermostat, 1/f state, calibrations and the current and previous programs
        (rebuilt from their inputs with the generator state they were realised with).
        """
        live = self._live
        progs = [None if q is None else q.source for q in (live.previous, live.current)]
        return pack_snapshot(self.profile, self.seed, self._rng.bit_generator.state, self._thermostat.state(),
                             live.state, self._flicker.array, progs, self._calibrations)

    def restore(self, snapshot: DeviceSnapshot) -> None:
        """Continue from ``snapshot`` (see ``snapshot``). Invalid input raises and changes nothing."""
        snap = unpack_snapshot(snapshot, self.profile)
        saved = (self.seed, self._rng.bit_generator.state, self._thermostat.state(), self._saved_live(),
                 dict(self._calibrations))
        try:
            self._live = _Live()
            self._calibrations = dict(snap.calibrations)
            self._flicker.load(snap.flicker)  # one array, shared by the programs' steppers
            for src in snap.programs:
                if src is None:
                    continue
                self._rng.bit_generator.state = src.rng_state
                self._thermostat.restore(src.thermostat)
                self._install(self._build(src.drift, src.bias, src.calibration, src.unit_scale))
            cur = self._live.current
            if snap.state is not None and cur is not None and snap.state.shape != (cur.state_dim,):
                raise ShapeError(f"snapshot: state of shape {snap.state.shape} does not fit the program "
                                 f"(state dimension {cur.state_dim})")
            self.seed = snap.seed
            self._rng.bit_generator.state = snap.rng_state
            self._thermostat.restore(snap.thermostat)
            self._live = replace(self._live, state=None if snap.state is None else snap.state.copy())
            self._flicker.load(snap.flicker, in_place=True)  # the steppers hold this array
        except BaseException:
            self.seed, rng_state, thermo, live, self._calibrations = saved
            self._rng.bit_generator.state = rng_state
            self._thermostat.restore(thermo)
            self._put_back(live)
            raise

    def close(self) -> None:
        """Nothing to release in-process; kept for the Device interface."""

    # -- internals ------------------------------------------------------------------------------

    def _scale(self) -> float:
        cur = self._live.current
        return cur.realized.scale if cur is not None else 1.0

    def _saved_live(self) -> tuple[_Live, np.ndarray]:
        # the 1/f array itself, not a copy: the saved programs' steppers hold it
        return self._live, self._flicker.array

    def _put_back(self, saved: tuple[_Live, np.ndarray]) -> None:
        self._live, self._flicker.array = saved

    def _install(self, prog: Programmed) -> None:
        live = self._live
        state = live.state
        if state is None or state.shape[0] != prog.state_dim:
            state = np.zeros(prog.state_dim)
        self._live = replace(live, previous=live.current, current=prog, state=state)

    def _build(self, drift: Drift, bias: np.ndarray | None, cal: Calibration | None,
               unit_scale: bool = False) -> Programmed:
        """Validate against the device and realise; raises before anything is kept."""
        form = drift_form(drift)
        accepted = description.DRIFT_FORMS_BY_DYNAMICS[self.profile.device.dynamics]
        if form not in accepted:
            raise UnsupportedError(f"{self.profile.device.dynamics} device does not accept {form} drift "
                                   f"(accepted: {', '.join(accepted)})")
        b = check_dimension(drift, bias, self.profile.device.cells)
        source = ProgramSource(drift, b, cal, unit_scale, self._rng.bit_generator.state, self._thermostat.state())
        return program(self.profile, self._stages, source, self._rng, self._flicker, lambda: self.kappa)


__all__ = ["Emulator"]
