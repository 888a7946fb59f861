"""The emulator's snapshot format: its complete dynamic state as plain data plus named arrays.

A snapshot is what a checkpoint or a fail-over needs to continue *bit for bit*: the analog state,
the noise generator (PCG64, whose 128-bit words travel as decimal strings because msgpack integers
stop at 64 bits), the thermostat (device time, temperature), the 1/f filter state, the
calibrations, and the current and previous programs. A program is stored as its inputs (drift,
bias, the calibration it used) together with the generator and thermostat state right before it
was realised, so replaying ``program`` with them reproduces the same conductance codes, stochastic
rounding included. Everything travels as ``DeviceSnapshot(meta, arrays)``, which the wire codec
carries without pickle; restoring validates every field and array like any other input.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.device import DeviceSnapshot, pcg64_from_plain, pcg64_to_plain
from protocol.drift import DRIFT_CLASSES, Drift, as_float_array, drift_form, drift_from_arrays
from protocol.errors import InvalidInputError

from .calibration import Calibration
from .profile import Profile

FORMAT = 1


@dataclass(frozen=True, eq=False)
class ProgramSource:
    """The inputs of one ``program`` and the random state it was realised with."""

    drift: Drift
    bias: np.ndarray
    calibration: Calibration | None
    unit_scale: bool
    rng_state: dict[str, Any]
    thermostat: tuple[float, float]


@dataclass(frozen=True, eq=False)
class Unpacked:
    seed: int
    rng_state: dict[str, Any]
    thermostat: tuple[float, float]
    state: np.ndarray | None
    flicker: np.ndarray
    programs: list[ProgramSource | None]  # [previous, current]
    calibrations: dict[int, Calibration]


def profile_digest(profile: Profile) -> str:
    """A fingerprint of every profile value: a snapshot only fits the chip model it came from."""
    return hashlib.sha256(repr(profile).encode()).hexdigest()[:16]


def _thermo(d: Any, where: str) -> tuple[float, float]:
    try:
        t, temp = (float(v) for v in d)
    except (TypeError, ValueError):
        raise InvalidInputError(f"snapshot: {where} must be [time, temperature_K]") from None
    if not (np.isfinite(t) and t >= 0 and np.isfinite(temp) and temp > 0):
        raise InvalidInputError(f"snapshot: {where} out of range: {d!r}")
    return t, temp


def pack_snapshot(profile: Profile, seed: int, rng_state: dict[str, Any], thermostat: tuple[float, float],
                  state: np.ndarray | None, flicker: np.ndarray, programs: list[ProgramSource | None],
                  calibrations: dict[int, Calibration]) -> DeviceSnapshot:
    arrays: dict[str, np.ndarray] = {"flicker": np.array(flicker, dtype=np.float64)}
    if state is not None:
        arrays["state"] = np.array(state, dtype=np.float64)
    meta: dict[str, Any] = {
        "format": FORMAT, "backend": "emulator", "profile": profile.name, "profile_digest": profile_digest(profile),
        "seed": seed, "rng": pcg64_to_plain(rng_state), "thermostat": list(thermostat),
        "calibrations": sorted(calibrations), "programs": [],
    }
    for n, cal in calibrations.items():
        arrays[f"cal{n}.gain"], arrays[f"cal{n}.offset"] = cal.gain.copy(), cal.offset.copy()
        meta[f"cal{n}"] = [cal.device_time, cal.temperature_K]
    for slot, src in zip(("previous", "current"), programs, strict=True):
        if src is None:
            meta["programs"].append(None)
            continue
        d = src.drift
        entry: dict[str, Any] = {"slot": slot, "form": drift_form(d), "unit_scale": src.unit_scale,
                                 "rng": pcg64_to_plain(src.rng_state), "thermostat": list(src.thermostat),
                                 "calibrated": src.calibration is not None}
        for name, a in d.arrays().items():
            arrays[f"{slot}.{name}"] = np.array(a)
        entry.update(d.params())
        arrays[f"{slot}.bias"] = np.array(src.bias, dtype=np.float64)
        if src.calibration is not None:  # the calibration it used, which a later one may have replaced
            arrays[f"{slot}.cal_gain"] = src.calibration.gain.copy()
            arrays[f"{slot}.cal_offset"] = src.calibration.offset.copy()
            entry["cal"] = [src.calibration.n, src.calibration.device_time, src.calibration.temperature_K]
        meta["programs"].append(entry)
    return DeviceSnapshot(meta, arrays)


def _array(arrays: dict[str, np.ndarray], name: str, ndim: int) -> np.ndarray:
    if name not in arrays:
        raise InvalidInputError(f"snapshot: missing array {name!r}")
    return np.array(as_float_array(arrays[name], f"snapshot.{name}", ndim), dtype=np.float64)


def _present(arrays: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in arrays:
        raise InvalidInputError(f"snapshot: missing array {name!r}")
    return np.array(arrays[name])  # a copy: the caller keeps its snapshot


def _gain(arrays: dict[str, np.ndarray], name: str) -> np.ndarray:
    """A calibration's gain array: N x N, or 0 x 0 for an offsets-only calibration."""
    if name in arrays and np.shape(arrays[name]) == (0, 0):
        return np.ones((0, 0))
    return _array(arrays, name, 2)


def _calibration(n: Any, gain: np.ndarray, offset: np.ndarray, times: Any, where: str) -> Calibration:
    if isinstance(n, bool) or not isinstance(n, int) or gain.shape not in ((n, n), (0, 0)) or offset.shape != (n,):
        raise InvalidInputError(f"snapshot: {where} has inconsistent shapes")
    t, temp = _thermo(times, where)
    return Calibration(n, gain, offset, t, temp)


def unpack_snapshot(snapshot: Any, profile: Profile) -> Unpacked:
    """Check a snapshot against this emulator's profile and decode it (typed errors, no side effects)."""
    if not isinstance(snapshot, DeviceSnapshot) or not isinstance(snapshot.meta, dict):
        raise InvalidInputError("restore needs a DeviceSnapshot")
    meta, arrays = snapshot.meta, dict(snapshot.arrays)
    if meta.get("format") != FORMAT or meta.get("backend") != "emulator":
        raise InvalidInputError(f"snapshot: not an emulator snapshot of format {FORMAT} "
                                f"(backend {meta.get('backend')!r}, format {meta.get('format')!r})")
    if meta.get("profile_digest") != profile_digest(profile):
        raise InvalidInputError(f"snapshot: taken on profile {meta.get('profile')!r} with other settings; "
                                f"this device runs {profile.name!r}")
    seed = meta.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidInputError(f"snapshot: seed must be a non-negative integer, got {seed!r}")
    cals: dict[int, Calibration] = {}
    cal_sizes = meta.get("calibrations", [])
    if not isinstance(cal_sizes, list):
        raise InvalidInputError("snapshot: calibrations must be a list")
    for n in cal_sizes:
        cals[n] = _calibration(n, _gain(arrays, f"cal{n}.gain"), _array(arrays, f"cal{n}.offset", 1),
                               meta.get(f"cal{n}"), f"calibration {n}")
    programs: list[ProgramSource | None] = []
    entries = meta.get("programs")
    if not isinstance(entries, list) or len(entries) != 2:
        raise InvalidInputError("snapshot: programs must be [previous, current]")
    for slot, e in zip(("previous", "current"), entries, strict=True):
        if e is None:
            programs.append(None)
            continue
        if not isinstance(e, dict) or e.get("slot") != slot:
            raise InvalidInputError(f"snapshot: malformed {slot} program")
        form = e.get("form")
        cls = DRIFT_CLASSES.get(form) if isinstance(form, str) else None
        if cls is None:
            raise InvalidInputError(f"snapshot: unknown drift form {form!r}")
        # the drift's constructor checks each array's shape, dtype and finiteness
        drift: Drift = drift_from_arrays(form, {name: _present(arrays, f"{slot}.{name}") for name in cls.array_names},
                                         e, where=f"snapshot: {slot} program")
        bias = _array(arrays, f"{slot}.bias", 1)
        if bias.shape != (drift.dim,):
            raise InvalidInputError(f"snapshot: {slot} bias does not match its drift")
        cal = None
        if e.get("calibrated"):
            c = e.get("cal")
            if not isinstance(c, list) or len(c) != 3:
                raise InvalidInputError(f"snapshot: {slot} calibration is malformed")
            cal = _calibration(c[0], _gain(arrays, f"{slot}.cal_gain"),
                               _array(arrays, f"{slot}.cal_offset", 1), c[1:], f"{slot} calibration")
        programs.append(ProgramSource(drift, bias, cal, bool(e.get("unit_scale", False)),
                                      pcg64_from_plain(e.get("rng"), f"snapshot: {slot}.rng"),
                                      _thermo(e.get("thermostat"), f"{slot}.thermostat")))
    state = _array(arrays, "state", 1) if "state" in arrays else None
    flicker = np.array(arrays.get("flicker", np.zeros((0, 0))), dtype=np.float64)
    if flicker.ndim != 2 or not np.isfinite(flicker).all():
        raise InvalidInputError("snapshot: flicker must be a finite 2-D array")
    return Unpacked(seed, pcg64_from_plain(meta.get("rng"), "snapshot: rng"), _thermo(meta.get("thermostat"), "thermostat"),
                    state, flicker, programs, cals)
