"""The Emulator: a software stochastic processing unit that satisfies ``protocol.Device``.

Programming realises the host's drift on the chip (``programming.py``: calibration, conductance
codes, mismatch, range mapping, bias DAC, input gains and offsets) and analyses it once
(validation and the exact representation). A run then advances the analog state in three phases:

1. ``delay`` tau under the previously programmed drift (the device keeps evolving while the host
   computes; skipped, and reported, when there is no earlier drift of the same size);
2. ``burn_in`` tau under the new drift, unobserved;
3. the readout window, ``duration - burn_in`` tau, sampled on the ADC grid (``readout.py``) and
   passed through the ADC (``converters.py``).

Temperature (``temperature.py``) is held for ``temperature.update_interval`` tau at a time; each
chunk runs with its own rate multiplier and noise strength. Warm start is the default: the state
carries over from run to run. Same profile + seed + calls give the same numbers bit for bit (one
NumPy Generator per emulator, drawn in call order; static chip errors come from the chip id).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.capabilities import PRECISION_COND, Capabilities
from protocol.device import DeviceSnapshot, RunResult
from protocol.drift import (
    DRIFT_FORMS,
    Dense,
    Diagonal,
    Drift,
    Factored,
    as_float_array,
    drift_form,
)
from protocol.errors import (
    InvalidInputError,
    NotProgrammedError,
    ProfileError,
    ShapeError,
    UnsupportedError,
)

from . import __version__
from .backend import Backend, check_run_args
from .calibration import Calibration, calibrate
from .converters import AdcChain, converter_precision, lsb
from .dynamics import ModalSystem, SteppingOnlySystem, check_dimension, stable_step
from .exact import GeneralPropagator, ModalPropagator
from .mismatch import Chip
from .noise import flicker_poles, thermal_kappa
from .profile import Profile, load_profile
from .programming import Realized, realize
from .readout import ReadoutGrid, plan_grid
from .snapshot import ProgramSource, pack_snapshot, unpack_snapshot
from .stepping import OVERDAMPED_SCHEMES, UNDERDAMPED_SCHEMES, OverdampedStepper, UnderdampedStepper
from .temperature import Conditions, Thermostat

# Stepping integrators run at most at this fraction of their stability limit: the profile's dt is
# an upper bound, and a stiff drift shrinks it (reported as diagnostics["dt"]).
STABILITY_MARGIN = 0.9
METHODS = {"overdamped": ("exact", "auto", *OVERDAMPED_SCHEMES),
           "underdamped": ("exact", "auto", *UNDERDAMPED_SCHEMES)}
DRIFT_FORMS_BY_DYNAMICS = {"overdamped": DRIFT_FORMS, "underdamped": ("dense", "diagonal")}
# Readout blocks when every ADC sample has to be seen (non-ideal ADC): bounded memory.
ADC_BLOCK_FLOATS = 1 << 20


@dataclass(frozen=True, eq=False)
class _Programmed:
    realized: Realized
    propagator: Any  # ModalPropagator | GeneralPropagator | OverdampedStepper | UnderdampedStepper
    state_dim: int
    method: str
    # What rebuilds this program bit for bit (``snapshot``): the inputs, the calibration used, and
    # the noise generator's and thermostat's state just before realisation drew from them.
    source: ProgramSource | None = None


class Emulator(Backend):
    """An emulated SPU built from a profile (a ``Backend``, hence a ``protocol.Device``).

    Args:
        profile: a Profile, or a built-in name / TOML path for ``load_profile``.
        seed: seeds the dynamic noise; the chip's static errors use ``mismatch.seed``.
    """

    def __init__(self, profile: Profile | str = "ideal", seed: int = 0) -> None:
        if not isinstance(profile, Profile):
            profile = load_profile(profile)
        _check_profile(profile)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise InvalidInputError(f"seed must be a non-negative integer, got {seed!r}")
        self.profile = profile
        self.seed = int(seed)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._chip = Chip(profile.mismatch, profile.noise.full_scale_V)
        self._thermostat = Thermostat(profile, self._rng)
        self._adc = AdcChain(profile.adc.bits, profile.adc.full_scale, profile.adc.read_noise_std)
        self._calibrations: dict[int, Calibration] = {}
        self._current: _Programmed | None = None
        self._previous: _Programmed | None = None
        self._state: np.ndarray | None = None  # physical (full-scale) units
        self._flicker_state = np.zeros((0, 0))

    # -- physics helpers --------------------------------------------------------------------------

    def _kappa_thermal(self, temperature_K: float) -> float:
        n = self.profile.noise
        if n.kappa is not None:
            return float(n.kappa) * temperature_K / n.temperature_K
        return thermal_kappa(temperature_K, n.capacitance_F, n.full_scale_V)

    def _conditions(self) -> Conditions:
        try:
            return self._thermostat.conditions(self._kappa_thermal, self.profile.noise.injected_kappa)
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from exc

    @property
    def kappa(self) -> float:
        """Noise strength (thermal + injected) now, in full-scale units."""
        return self._conditions().kappa

    # -- Device interface -------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        import numba

        p = self.profile
        kappa = self.kappa
        return {
            "backend": "emulator",
            "profile": p.name,
            "cells": p.device.cells,
            "dynamics": p.device.dynamics,
            "drift_forms": list(DRIFT_FORMS_BY_DYNAMICS[p.device.dynamics]),
            "integrator": p.integrator.method,
            "methods": list(METHODS[p.device.dynamics]),
            "tau_s": p.device.tau_s,
            "kappa": kappa,
            # stationary covariance = covariance_scale * A^-1 (kappa R C^-1 for the RLC array)
            "covariance_scale": kappa * (p.underdamped.resistance if p.device.dynamics == "underdamped" else 1.0),
            "max_duration": p.device.max_duration,
            "adc": {"bits": p.adc.bits, "full_scale": p.adc.full_scale, "sample_interval": p.adc.sample_interval,
                    "read_noise_std": p.adc.read_noise_std},
            "dac": {"bits": p.dac.bits, "full_scale": p.dac.full_scale, "rounding": p.dac.rounding},
            "coupling": {"bits": p.coupling.bits, "rounding": p.coupling.rounding},
            "range": {"auto": p.range.auto, "rail": p.range.rail},
            "chip_id": p.mismatch.seed,
            "temperature_K": self._thermostat.temperature_K,
            "calibrated_sizes": sorted(self._calibrations),
            "seed": self.seed,
            "versions": {"thermo_ngd": __version__, "numpy": np.__version__, "numba": numba.__version__},
            "capabilities": self.capabilities().to_dict(),
        }

    def capabilities(self) -> Capabilities:
        p = self.profile
        return Capabilities(
            backend="emulator", cells=p.device.cells, dynamics=p.device.dynamics,
            drift_forms=DRIFT_FORMS_BY_DYNAMICS[p.device.dynamics], tau_s=p.device.tau_s,
            max_duration=p.device.max_duration, sample_interval=p.adc.sample_interval,
            dac_bits=p.dac.bits, adc_bits=p.adc.bits, coupling_bits=p.coupling.bits,
            precision=_declared_precision(p), supports_calibration=p.device.dynamics == "overdamped",
            deterministic=True)

    def status(self) -> dict[str, Any]:
        cur = self._current
        return {"programmed": cur is not None, "dim": cur.realized.drift.dim if cur is not None else 0,
                "method": cur.method if cur is not None else None,
                "temperature_K": self._thermostat.temperature_K,
                "calibrated_sizes": sorted(self._calibrations)}

    def program(self, drift: Drift, bias: np.ndarray | None = None) -> None:
        """Load a drift and bias. Invalid input raises a typed error and changes nothing."""
        self._install(self._analyse(drift, bias, self._calibrations.get(getattr(drift, "dim", -1))))

    def run(self, duration: float, *, burn_in: float = 0.0, delay: float = 0.0, reset: bool = False,
            samples: int = 0, second_moment: bool = False) -> RunResult:
        """See ``protocol.Device.run``. Raises NotProgrammedError before the first program."""
        if self._current is None:
            raise NotProgrammedError("run before program: program a drift first")
        duration, burn_in, delay, samples = check_run_args(duration, burn_in, delay, samples,
                                                           self.profile.device.max_duration)
        grid = plan_grid(duration - burn_in, self.profile.adc.sample_interval, samples)

        t0 = time.perf_counter()
        temp_start = self._thermostat.temperature_K
        cur = self._current
        prop = cur.propagator
        adc_before = (self._adc.clipped, self._adc.count)
        rail_before = getattr(prop, "clipped", np.zeros(1))[0]
        steps_before = getattr(prop, "steps_taken", 0)
        x = np.zeros(cur.state_dim) if reset else self._state.copy()
        delay_applied = 0.0
        prev = self._previous
        if delay > 0.0 and prev is not None and prev.state_dim == cur.state_dim:
            x = self._jump(prev.propagator, x, delay)
            delay_applied = delay
        x = self._jump(prop, x, burn_in)
        n_out = cur.state_dim // 2 if self.profile.device.dynamics == "underdamped" else cur.state_dim
        x, mean, moment, out_samples = self._window(prop, x, grid, n_out, second_moment)
        self._state = x
        self._previous = cur  # once a run has gone by, the new drift is the one acting
        scale = cur.realized.scale
        wall = time.perf_counter() - t0
        diag = self._diagnostics(cur, grid, delay_applied, temp_start, adc_before, rail_before, steps_before)
        diag["wall_s"] = wall
        return RunResult(
            mean=mean * scale,
            state=x.copy() * scale,
            samples=out_samples * scale if samples else None,
            second_moment=moment * scale**2 if moment is not None else None,
            analog_time_s=(delay + duration) * self.profile.device.tau_s,
            diagnostics=diag,
        )

    def step(self, drift: Drift, bias: np.ndarray | None, duration: float, **run_kwargs: Any) -> RunResult:
        """program + run; a failed program leaves the device as it was."""
        self.program(drift, bias)
        return self.run(duration, **run_kwargs)

    @property
    def state(self) -> np.ndarray:
        """The analog state in host units: x (N) overdamped, [v, i] (2N) underdamped."""
        if self._state is None:
            return np.zeros(0)
        scale = self._current.realized.scale if self._current is not None else 1.0
        return self._state * scale

    @state.setter
    def state(self, value: np.ndarray) -> None:
        arr = np.array(as_float_array(value, "state", 1), dtype=np.float64)
        if self._current is not None and arr.shape[0] != self._current.state_dim:
            raise ShapeError(f"state: expected length {self._current.state_dim}, got {arr.shape[0]}")
        scale = self._current.realized.scale if self._current is not None else 1.0
        self._state = arr / scale

    def calibrate(self, n: int | None = None, *, duration: float = 3000.0, burn_in: float = 20.0,
                  probe: float = 0.5) -> dict[str, Any]:
        """Measure this chip's coupling gains, input gains and offsets for Dense drifts of size n.

        Later Dense programs of that size are pre-distorted to cancel them (``calibration.py``).
        The analog state and the programmed drift are restored afterwards.
        """
        if self.profile.device.dynamics != "overdamped":
            raise UnsupportedError("calibration is implemented for the overdamped array")
        if n is None:
            if self._current is None:
                raise InvalidInputError("calibrate: give n, or program a drift first")
            n = self._current.realized.drift.dim
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):  # int(nan) would raise ValueError
            raise InvalidInputError(f"calibrate: n must be an integer, got {n!r}")
        # The 1/f state too: probing another size swaps in a filter array of that size, while the
        # restored program's stepper (and a later snapshot) must keep the one it was built with.
        saved = (self._current, self._previous, self._state, self._flicker_state)
        try:
            cal = calibrate(self, int(n), duration=duration, burn_in=burn_in, probe=probe)
        finally:
            self._current, self._previous, self._state, self._flicker_state = saved
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
        progs = [None if q is None else q.source for q in (self._previous, self._current)]
        return pack_snapshot(self.profile, self.seed, self._rng.bit_generator.state, self._thermostat.state(),
                             self._state, self._flicker_state, progs, self._calibrations)

    def restore(self, snapshot: DeviceSnapshot) -> None:
        """Continue from ``snapshot`` (see ``snapshot``). Invalid input raises and changes nothing."""
        snap = unpack_snapshot(snapshot, self.profile)
        saved = (self.seed, self._rng.bit_generator.state, self._thermostat.state(), self._state,
                 self._flicker_state, self._current, self._previous, dict(self._calibrations))
        try:
            self._current = self._previous = None
            self._calibrations = dict(snap.calibrations)
            self._flicker_state = snap.flicker.copy()  # one array, shared by the programs' steppers
            for src in snap.programs:
                if src is None:
                    continue
                self._rng.bit_generator.state = src.rng_state
                self._thermostat.restore(src.thermostat)
                self._install(self._analyse(src.drift, src.bias, src.calibration, src.unit_scale))
            if snap.state is not None and self._current is not None \
                    and snap.state.shape != (self._current.state_dim,):
                raise ShapeError(f"snapshot: state of shape {snap.state.shape} does not fit the program "
                                 f"(state dimension {self._current.state_dim})")
            self.seed = snap.seed
            self._rng.bit_generator.state = snap.rng_state
            self._thermostat.restore(snap.thermostat)
            self._state = None if snap.state is None else snap.state.copy()
            if self._flicker_state.shape == snap.flicker.shape:
                self._flicker_state[...] = snap.flicker  # in place: the stepper holds this array
        except BaseException:
            (self.seed, rng_state, thermo, self._state, self._flicker_state, self._current, self._previous,
             self._calibrations) = saved
            self._rng.bit_generator.state = rng_state
            self._thermostat.restore(thermo)
            raise

    def close(self) -> None:
        """Nothing to release in-process; kept for the Device interface."""

    # -- internals --------------------------------------------------------------------------------

    def _install(self, prog: _Programmed) -> None:
        self._previous, self._current = self._current, prog
        if self._state is None or self._state.shape[0] != prog.state_dim:
            self._state = np.zeros(prog.state_dim)

    def _program_physical(self, drift: Drift, bias: np.ndarray) -> Realized:
        """Program without calibration and with unit range scale (the calibration probes)."""
        prog = self._analyse(drift, bias, None, unit_scale=True)
        self._install(prog)
        return prog.realized

    def _analyse(self, drift: Drift, bias: np.ndarray | None, cal: Calibration | None,
                 unit_scale: bool = False) -> _Programmed:
        p = self.profile
        form = drift_form(drift)
        dynamics = p.device.dynamics
        if form not in DRIFT_FORMS_BY_DYNAMICS[dynamics]:
            raise UnsupportedError(f"{dynamics} device does not accept {form} drift "
                                   f"(accepted: {', '.join(DRIFT_FORMS_BY_DYNAMICS[dynamics])})")
        b = check_dimension(drift, bias, p.device.cells)
        source = ProgramSource(drift, b, cal, unit_scale, self._rng.bit_generator.state,
                               self._thermostat.state())
        real = realize(p, self._chip, drift, b, self._rng, cal, unit_scale=unit_scale)
        system = real.system
        method = p.integrator.method
        needs_stepping = isinstance(system, SteppingOnlySystem) or p.range.rail > 0.0 \
            or p.noise.flicker_corner > 0.0
        if method == "exact" and needs_stepping:
            why = system.reason if isinstance(system, SteppingOnlySystem) else "rails or 1/f noise"
            raise UnsupportedError(f"exact integration cannot propagate this drift ({why}); "
                                   "use integrator.method = 'auto' or a stepping method")
        if method == "auto":
            method = "exact" if not needs_stepping else ("heun" if dynamics == "overdamped" else "baoab")
        n = drift.dim
        if method == "exact":
            prop = ModalPropagator(system) if isinstance(system, ModalSystem) else GeneralPropagator(system)
        elif dynamics == "overdamped":
            dt = min(p.integrator.dt, STABILITY_MARGIN * stable_step(system, method))
            poles = flicker_poles(self.kappa, p.noise.flicker_corner, p.noise.flicker_min_freq,
                                  p.noise.flicker_poles)
            if poles is not None and self._flicker_state.shape != (poles.count, n):
                self._flicker_state = np.zeros((poles.count, n))
            prop = OverdampedStepper(real.drift, real.bias, dt, method, j_out=real.j_out, cap=real.cap,
                                     rail=p.range.rail, flicker=poles, flicker_state=self._flicker_state)
        else:
            u = p.underdamped
            dt = min(p.integrator.dt, STABILITY_MARGIN * stable_step(system, method, u.inductance))
            prop = UnderdampedStepper(real.drift, dt, method, u.inductance, u.resistance)
        state_dim = n if dynamics == "overdamped" else 2 * n
        return _Programmed(real, prop, state_dim, method, source)

    def _chunks(self, total: float) -> list[float]:
        """Split device time into pieces of constant temperature."""
        if total <= 0.0:
            return []
        if not self._thermostat.drifts:
            return [total]
        k = max(1, math.ceil(total / self._thermostat.update_interval - 1e-9))
        return [total / k] * k

    def _jump(self, prop: Any, x: np.ndarray, total: float) -> np.ndarray:
        for h in self._chunks(total):
            c = self._conditions()
            x = prop.jump(x, h, self._rng, c.rate, c.kappa)
            self._thermostat.advance(h)
        return x

    def _window(self, prop: Any, x: np.ndarray, grid: ReadoutGrid, n_out: int,
                second_moment: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        if grid.n_adc == 0:
            snap = self._adc(x[:n_out][None, :], self._rng)[0] if not self._adc.ideal else x[:n_out].copy()
            return x, snap, (np.outer(snap, snap) if second_moment else None), np.empty((0, n_out))
        # Chunk the window on ADC samples: temperature updates, and bounded memory when every
        # sample must pass through a non-ideal ADC. Chunks are multiples of the sample stride.
        per_chunk = grid.n_adc
        if self._thermostat.drifts:
            per_chunk = max(1, int(self._thermostat.update_interval / grid.h))
        if not self._adc.ideal:
            per_chunk = min(per_chunk, max(1, ADC_BLOCK_FLOATS // n_out))
        if grid.stride:
            per_chunk = max(grid.stride, per_chunk // grid.stride * grid.stride)
        total = np.zeros(n_out)
        outer = np.zeros((n_out, n_out)) if second_moment else None
        kept: list[np.ndarray] = []
        done = 0
        while done < grid.n_adc:
            k = min(per_chunk, grid.n_adc - done)
            c = self._conditions()
            if self._adc.ideal:
                win = prop.window(x, grid.h, k, grid.stride, self._rng, second_moment, c.rate, c.kappa)
                total += win.total
                if second_moment:
                    outer += win.total_outer
                if grid.stride:
                    kept.append(win.samples)
            else:
                win = prop.window(x, grid.h, k, 1, self._rng, False, c.rate, c.kappa)
                q = self._adc(win.samples[:, :n_out], self._rng)
                total += q.sum(axis=0)
                if second_moment:
                    outer += q.T @ q
                if grid.stride:
                    kept.append(q[grid.stride - 1::grid.stride])
            x = win.state
            self._thermostat.advance(k * grid.h)
            done += k
        samples = np.concatenate(kept) if kept else np.empty((0, n_out))
        return x, total / grid.n_adc, (outer / grid.n_adc if second_moment else None), samples

    def _diagnostics(self, cur: _Programmed, grid: ReadoutGrid, delay_applied: float, temp_start: float,
                     adc_before: tuple[int, int], rail_before: int, steps_before: int) -> dict[str, Any]:
        p = self.profile
        prop = cur.propagator
        scale = cur.realized.scale
        diag: dict[str, Any] = {
            "method": cur.method,
            "adc_samples": grid.n_adc,
            "adc_interval": grid.h,
            "delay_applied": delay_applied,
            "kappa": self.kappa * scale**2,  # in host units
            "range_scale": scale,
            "temperature_K_start": temp_start,
            "temperature_K_end": self._thermostat.temperature_K,
            "dac_clipped": cur.realized.report.get("dac_clipped", 0),
            "calibrated": cur.realized.report.get("calibrated", False),
        }
        step = getattr(prop, "last_step", None)
        if step is not None and grid.n_adc:
            diag["dt"] = step
        if hasattr(prop, "clipped"):
            steps = prop.steps_taken - steps_before
            n = cur.state_dim
            diag["rail_clipped_fraction"] = (prop.clipped[0] - rail_before) / max(steps * n, 1)
        if not self._adc.ideal:
            clipped = self._adc.clipped - adc_before[0]
            count = self._adc.count - adc_before[1]
            diag["adc_clipped_fraction"] = clipped / max(count, 1)
            # effective number of bits of one sample: quantization (LSB^2 / 12) plus read noise
            q_var = (lsb(p.adc.bits, p.adc.full_scale) ** 2 / 12.0 if p.adc.bits else 0.0) + p.adc.read_noise_std**2
            diag["adc_effective_bits"] = math.log2(2.0 * p.adc.full_scale / math.sqrt(12.0 * q_var))
        return diag


def _declared_precision(p: Profile) -> float:
    """``Capabilities.precision`` of a profile: converters, plus uncalibrated static errors at 3 sigma
    carried through A^-1 (condition PRECISION_COND), relative to the range-mapped solution."""
    headroom = p.range.headroom if p.range.auto else 0.5
    conv = converter_precision(cells=p.device.cells, dac_bits=p.dac.bits, adc_bits=p.adc.bits,
                               coupling_bits=p.coupling.bits, headroom=headroom)
    m = p.mismatch
    static = 3.0 * PRECISION_COND * (2.0 * math.sqrt(p.device.cells) * m.coupling_rel_std + m.gain_rel_std
                                     + m.offset_V_std / p.noise.full_scale_V / headroom)
    return conv + static


def _check_profile(profile: Profile) -> None:
    method, dynamics = profile.integrator.method, profile.device.dynamics
    if method not in METHODS[dynamics]:
        raise ProfileError(f"integrator.method = {method!r} does not apply to {dynamics} dynamics "
                           f"(allowed: {', '.join(METHODS[dynamics])})")
    if dynamics == "underdamped":
        bad = [k for k, v in (("range.rail", profile.range.rail), ("noise.flicker_corner", profile.noise.flicker_corner),
                              ("mismatch.capacitance_rel_std", profile.mismatch.capacitance_rel_std))
               if v != 0.0]
        if bad:
            raise ProfileError(f"{', '.join(bad)}: not modelled for the underdamped RLC array (set to 0)")


__all__ = ["Dense", "Diagonal", "Emulator", "Factored"]
