"""Backend plugins: built-in backends plus those other packages register by entry point.

A package makes a backend available by declaring, in its pyproject.toml::

    [project.entry-points."thermo_device.backends"]
    myboard = "myboard_driver:make_backend"

The entry point names a callable ``make_backend(seed: int = 0, **options) -> Backend``
(a Backend subclass whose constructor has that signature works too). ``options`` are the
``--backend-option key=value`` pairs of ``thermo-device serve``, values parsed as TOML scalars
when they parse (numbers, booleans, quoted strings) and kept as strings otherwise.

Built-in names ("emulator", "register") cannot be shadowed: a plugin that registers one of them
is ignored with a warning, so a stray package cannot replace the reference backends silently.
"""

from __future__ import annotations

import importlib
import tomllib
import warnings
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import entry_points
from typing import Any

from protocol.errors import InvalidInputError

from .backend import Backend

GROUP = "thermo_device.backends"
BUILTINS: dict[str, str] = {
    "emulator": "thermo_device.plugins:make_emulator",
    "register": "thermo_device.hardware.driver:make_register_backend",
}

BackendFactory = Callable[..., Backend]


def make_emulator(seed: int = 0, profile: str = "ideal", **overrides: Any) -> Backend:
    """The emulator as a plugin: ``profile`` (name or TOML path) and "section.key" overrides."""
    from .emulator import Emulator
    from .profile import load_profile

    return Emulator(load_profile(profile, overrides or None), seed=seed)


def available() -> dict[str, str]:
    """Backend name -> "module:attribute", built-ins first, then installed plugins."""
    out = dict(BUILTINS)
    for ep in entry_points(group=GROUP):
        if ep.name in BUILTINS:
            warnings.warn(f"ignoring plugin {ep.value!r}: {ep.name!r} is a built-in backend name",
                          RuntimeWarning, stacklevel=2)
            continue
        out.setdefault(ep.name, ep.value)
    return out


def load(name: str) -> BackendFactory:
    """The factory registered under ``name`` (imported now), or InvalidInputError listing the names."""
    names = available()
    target = names.get(name)
    if target is None:
        raise InvalidInputError(f"unknown backend {name!r}; available: {', '.join(sorted(names))} "
                                f"(plugins register under the entry-point group {GROUP!r})")
    module, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise InvalidInputError(f"backend {name!r} ({target}) cannot be loaded: {exc}") from exc
    if not callable(obj):
        raise InvalidInputError(f"backend {name!r} ({target}) is not callable")
    return obj


def create(name: str, seed: int = 0, options: Mapping[str, Any] | None = None) -> Backend:
    """Build backend ``name`` for one session; the result must be a ``Backend``."""
    factory = load(name)
    try:
        backend = factory(seed=seed, **dict(options or {}))
    except TypeError as exc:  # an option the factory does not take
        raise InvalidInputError(f"backend {name!r}: {exc}") from exc
    if not isinstance(backend, Backend):
        raise InvalidInputError(f"backend {name!r} returned {type(backend).__name__}, not a "
                                "thermo_device.backend.Backend")
    return backend


def parse_options(pairs: Iterable[str]) -> dict[str, Any]:
    """["k=v", ...] -> {k: v}; v parsed as a TOML value when it is one, else kept as a string."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"backend options are key=value, got {pair!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw
    return out
