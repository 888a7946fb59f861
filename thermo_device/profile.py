"""Device profiles: frozen dataclasses loaded from TOML and validated on load.

A profile is a tree of sections (``[device]``, ``[integrator]``, ``[noise]``, ...). Every key has
a default (the defaults are the ideal device), a unit, and an allowed range; an error names the
key and its range. ``load_profile("ideal")`` reads ``thermo_device/profiles/ideal.toml`` (package
data; ``configs/`` in a source checkout links there); a path reads that file;
``overrides={"noise.kappa": 0.01}`` changes keys after the file, validated the same way.

Units: times in tau (the device time constant), voltages in volts unless a key says otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.errors import ProfileError

# The built-in profiles are package data, so an installed (non-editable) package finds them next to
# this module; the top-level configs/ of a source checkout is a symlink to this folder.
CONFIG_DIR = Path(__file__).resolve().parent / "profiles"
BUILTIN_PROFILES = ("ideal", "tngd-paper", "spu-8cell", "noisy")


def _key(default: Any, doc: str, *, lo: float | None = None, hi: float | None = None,
         lo_open: bool = False, choices: tuple[Any, ...] | None = None, optional: bool = False) -> Any:
    """A profile key: default, docstring, and its validation rule."""
    meta = {"doc": doc, "lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices,
            "optional": optional}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DeviceSection:
    cells: int = _key(4096, "number of analog cells (the largest N a drift may have)", lo=1, hi=1 << 24)
    dynamics: str = _key("overdamped", "cell dynamics", choices=("overdamped", "underdamped"))
    tau_s: float = _key(1e-6, "device time constant tau = RC, in seconds", lo=0.0, lo_open=True)
    max_duration: float = _key(1e7, "longest single run accepted, in tau", lo=0.0, lo_open=True)


@dataclass(frozen=True)
class IntegratorSection:
    method: str = _key("exact", "exact (linear time-invariant only), euler_maruyama, heun (overdamped), "
                       "baoab (underdamped), or auto (exact where it applies, else heun / baoab)",
                       choices=("exact", "euler_maruyama", "heun", "baoab", "auto"))
    dt: float = _key(0.01, "time step of the stepping integrators, in tau (an upper bound: the "
                     "step is shrunk so readout times fall on the grid)", lo=0.0, lo_open=True, hi=10.0)
    variance_tol: float = _key(0.0, "stepping accuracy: largest relative error of a mode's stationary "
                               "variance the step may cause (Heun: (a dt)^2 / 4, Euler-Maruyama: a dt / 2 for "
                               "the fastest rate a); 0 = bounded by dt and stability only", lo=0.0, hi=0.5)
    window: str = _key("closed_form", "readout window of the exact modal propagator: closed_form (the mean "
                       "and final state drawn exactly in distribution, 2 normals per mode) or sampled "
                       "(every ADC sample stepped, the random stream of earlier versions); returned samples, second "
                       "moments and a non-ideal ADC always sample", choices=("closed_form", "sampled"))


@dataclass(frozen=True)
class NoiseSection:
    temperature_K: float = _key(300.0, "cell temperature at the start, kelvin", lo=0.0, lo_open=True)
    capacitance_F: float = _key(1e-9, "cell capacitance, farad (sets kT/C)", lo=0.0, lo_open=True)
    full_scale_V: float = _key(1.0, "voltage that the value 1.0 maps to, volt", lo=0.0, lo_open=True)
    kappa: float | None = _key(None, "thermal noise strength in (full-scale units)^2; when set it "
                               "replaces k_B T / (C full_scale_V^2)", lo=0.0, optional=True)
    injected_kappa: float = _key(0.0, "noise injected on top of the thermal noise, (full-scale units)^2 "
                                 "(raises the effective temperature; not temperature dependent)", lo=0.0)
    flicker_corner: float = _key(0.0, "1/f noise corner frequency, 1/tau (0 = off): below it the "
                                 "flicker PSD exceeds the white one", lo=0.0)
    flicker_min_freq: float = _key(1e-4, "lowest frequency of the 1/f band, 1/tau", lo=0.0, lo_open=True)
    flicker_poles: int = _key(6, "OU processes summed to synthesise 1/f noise", lo=1, hi=32)


@dataclass(frozen=True)
class TemperatureSection:
    reference_K: float = _key(300.0, "temperature at which components take their nominal values, K",
                              lo=0.0, lo_open=True)
    ramp_K_per_tau: float = _key(0.0, "linear temperature drift, K per tau of device time")
    walk_K_per_sqrt_tau: float = _key(0.0, "random-walk temperature drift, K per sqrt(tau)", lo=0.0)
    conductance_tempco_per_K: float = _key(0.0, "relative change of every conductance per kelvin "
                                           "(e.g. 1e-4 = 100 ppm/K)", lo=-0.1, hi=0.1)
    capacitance_tempco_per_K: float = _key(0.0, "relative change of every cell capacitance per kelvin",
                                           lo=-0.1, hi=0.1)
    update_interval: float = _key(10.0, "temperature is held constant over this much device time, tau",
                                  lo=0.0, lo_open=True)


@dataclass(frozen=True)
class UnderdampedSection:
    inductance: float = _key(1.0, "cell inductance L, in units where tau and C are 1", lo=0.0, lo_open=True)
    resistance: float = _key(1.0, "cell resistance R (friction 1/R), same units", lo=0.0, lo_open=True)


@dataclass(frozen=True)
class MismatchSection:
    seed: int = _key(0, "chip id: seeds every static (per-chip) error", lo=0, hi=2**63 - 1)
    coupling_rel_std: float = _key(0.0, "relative std of each programmed coupling conductance", lo=0.0, hi=0.5)
    capacitance_rel_std: float = _key(0.0, "relative std of each cell capacitance (per-cell tau)", lo=0.0, hi=0.5)
    gain_rel_std: float = _key(0.0, "relative std of each cell's input gain (applied to b)", lo=0.0, hi=0.5)
    offset_V_std: float = _key(0.0, "std of each cell's op-amp offset voltage, volt", lo=0.0)


@dataclass(frozen=True)
class DacSection:
    bits: int = _key(0, "resolution of the bias DAC in bits; 0 = ideal", lo=0, hi=32)
    full_scale: float = _key(1.0, "bias DAC range is [-full_scale, full_scale], full-scale units",
                             lo=0.0, lo_open=True)
    rounding: str = _key("nearest", "rounding to DAC codes", choices=("nearest", "stochastic"))


@dataclass(frozen=True)
class CouplingSection:
    bits: int = _key(0, "resolution of conductance programming in bits (each array relative to its "
                     "largest entry); 0 = ideal", lo=0, hi=32)
    rounding: str = _key("nearest", "rounding to conductance codes", choices=("nearest", "stochastic"))


@dataclass(frozen=True)
class AdcSection:
    bits: int = _key(0, "ADC resolution in bits; 0 = ideal (no quantization, no clipping)", lo=0, hi=32)
    full_scale: float = _key(1.0, "ADC range is [-full_scale, full_scale], full-scale units", lo=0.0, lo_open=True)
    sample_interval: float = _key(0.1, "ADC sample interval, in tau (the readout grid)", lo=0.0, lo_open=True)
    read_noise_std: float = _key(0.0, "ADC input-referred noise per sample, full-scale units", lo=0.0)


@dataclass(frozen=True)
class RangeSection:
    auto: bool = _key(False, "map host numbers into the physical range automatically (scale reported "
                      "in diagnostics and undone on readout); off: host units are full-scale units")
    headroom: float = _key(0.5, "auto range puts max|b| and max|A^-1 b| at this fraction of full scale",
                           lo=0.0, lo_open=True, hi=1.0)
    rail: float = _key(0.0, "node voltages saturate at +-rail, full-scale units; 0 = no rails",
                       lo=0.0)


@dataclass(frozen=True)
class Profile:
    """A validated device profile. ``name`` is the built-in name or the file stem."""

    name: str = "ideal"
    device: DeviceSection = DeviceSection()
    integrator: IntegratorSection = IntegratorSection()
    noise: NoiseSection = NoiseSection()
    temperature: TemperatureSection = TemperatureSection()
    underdamped: UnderdampedSection = UnderdampedSection()
    mismatch: MismatchSection = MismatchSection()
    dac: DacSection = DacSection()
    coupling: CouplingSection = CouplingSection()
    adc: AdcSection = AdcSection()
    range: RangeSection = RangeSection()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS: dict[str, type] = {f.name: f.default.__class__ for f in dataclasses.fields(Profile)
                              if f.name != "name"}


def _check_value(where: str, value: Any, f: dataclasses.Field) -> Any:
    meta = f.metadata
    default = f.default
    if value is None:
        if meta.get("optional"):
            return None
        raise ProfileError(f"{where}: a value is required")
    expected = type(default) if default is not None else float
    if expected is bool:
        if not isinstance(value, bool):
            raise ProfileError(f"{where}: expected true or false, got {value!r}")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProfileError(f"{where}: expected an integer, got {value!r}")
    elif expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProfileError(f"{where}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ProfileError(f"{where}: must be finite, got {value}")
    elif expected is str:
        if not isinstance(value, str):
            raise ProfileError(f"{where}: expected a string, got {value!r}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ProfileError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None or hi is not None:
        lo_open = meta.get("lo_open", False)
        low_ok = lo is None or (value > lo if lo_open else value >= lo)
        if not low_ok or (hi is not None and value > hi):
            rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise ProfileError(f"{where} = {value!r} is out of range {rng}")
    return value


def _build_section(cls: type, section: str, data: Mapping[str, Any], source: str) -> Any:
    if not isinstance(data, Mapping):
        raise ProfileError(f"{source}: [{section}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ProfileError(f"{source}: unknown key {section}.{unknown[0]} "
                           f"(known: {', '.join(sorted(fields))})")
    values = {name: _check_value(f"{source}: {section}.{name}", data[name], f)
              for name, f in fields.items() if name in data}
    return cls(**values)


def profile_from_dict(data: Mapping[str, Any], *, name: str = "custom", source: str | None = None) -> Profile:
    """Build and validate a Profile from a nested dict (the parsed TOML)."""
    source = source or f"profile {name!r}"
    unknown = sorted(set(data) - set(_SECTIONS) - {"name"})
    if unknown:
        raise ProfileError(f"{source}: unknown section [{unknown[0]}] (known: {', '.join(_SECTIONS)})")
    sections = {sec: _build_section(cls, sec, data.get(sec, {}), source) for sec, cls in _SECTIONS.items()}
    profile = Profile(name=str(data.get("name", name)), **sections)
    check_profile(profile, source)
    return profile


def _apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any], source: str) -> None:
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if len(parts) != 2:
            raise ProfileError(f"{source}: override key {dotted!r} must look like 'section.key'")
        section, key = parts
        if section not in _SECTIONS:
            raise ProfileError(f"{source}: unknown section in override {dotted!r} (known: {', '.join(_SECTIONS)})")
        data.setdefault(section, {})[key] = value


def load_profile(name_or_path: str | Path = "ideal", overrides: Mapping[str, Any] | None = None) -> Profile:
    """Load a built-in profile by name, or a TOML file by path, then apply ``overrides``.

    Args:
        name_or_path: "ideal", "tngd-paper", "spu-8cell", "noisy", or a path to a .toml file.
        overrides: {"section.key": value}, validated like the file.

    Raises:
        ProfileError: unknown profile, unknown key, wrong type, or value out of range (the message
            names the key and the allowed range).
    """
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = CONFIG_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            available = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
            raise ProfileError(f"unknown profile {str(name_or_path)!r} (built-in: {', '.join(available)})")
    elif not path.is_file():
        raise ProfileError(f"profile file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"profile {path.name}: invalid TOML ({exc})") from exc
    source = f"profile {path.stem!r}"
    if overrides:
        _apply_overrides(data, overrides, source)
    return profile_from_dict(data, name=path.stem, source=source)


# -- rules that join keys of several sections ---------------------------------------------------

# Integrators by dynamics: "auto" is exact where it applies, else heun (overdamped) / baoab.
METHODS: dict[str, tuple[str, ...]] = {"overdamped": ("exact", "auto", "euler_maruyama", "heun"),
                                       "underdamped": ("exact", "auto", "euler_maruyama", "baoab")}


def check_profile(profile: Profile, source: str | None = None) -> None:
    """Cross-key rules (each key's own range is checked on load): ProfileError naming the keys."""
    where = f"{source}: " if source else ""
    method, dynamics = profile.integrator.method, profile.device.dynamics
    if method not in METHODS[dynamics]:
        raise ProfileError(f"{where}integrator.method = {method!r} does not apply to {dynamics} dynamics "
                           f"(allowed: {', '.join(METHODS[dynamics])})")
    if dynamics == "underdamped":
        bad = [k for k, v in (("range.rail", profile.range.rail), ("noise.flicker_corner", profile.noise.flicker_corner),
                              ("mismatch.capacitance_rel_std", profile.mismatch.capacitance_rel_std))
               if v != 0.0]
        if bad:
            raise ProfileError(f"{where}{', '.join(bad)}: not modelled for the underdamped RLC array (set to 0)")
