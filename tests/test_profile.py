"""Profiles: TOML loading, validation errors that name the key and range, overrides."""

from __future__ import annotations

import pytest

from protocol.errors import ProfileError, UnsupportedError
from thermo_device import Emulator, load_profile
from thermo_device.noise import K_BOLTZMANN


def test_ideal_kappa_is_kt_over_c() -> None:
    kappa = Emulator("ideal").kappa
    assert kappa == pytest.approx(K_BOLTZMANN * 300.0 / 1e-9)
    assert Emulator(load_profile("ideal", {"noise.kappa": 0.01})).kappa == 0.01
    hot = Emulator(load_profile("ideal", {"noise.temperature_K": 600.0, "temperature.reference_K": 600.0}))
    assert hot.kappa == pytest.approx(2 * kappa)


@pytest.mark.parametrize("overrides,match", [
    ({"noise.kappa": -1.0}, r"noise\.kappa = -1\.0 is out of range \[0"),
    ({"integrator.dt": 0.0}, r"integrator\.dt = 0\.0 is out of range \(0"),
    ({"integrator.method": "rk4"}, r"integrator\.method: 'rk4' is not one of"),
    ({"device.cells": 2.5}, r"device\.cells: expected an integer"),
    ({"noise.tempreature_K": 1.0}, r"unknown key noise\.tempreature_K"),
    ({"nosie.kappa": 1.0}, r"unknown section in override 'nosie\.kappa'"),
    ({"kappa": 1.0}, r"must look like 'section\.key'"),
    ({"noise.kappa": float("inf")}, r"noise\.kappa: must be finite"),
])
def test_bad_values_name_the_key_and_range(overrides, match) -> None:
    with pytest.raises(ProfileError, match=match):
        load_profile("ideal", overrides)


def test_unknown_profile_lists_builtins() -> None:
    with pytest.raises(ProfileError, match="ideal"):
        load_profile("no-such-profile")


def test_profile_from_file(tmp_path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('[noise]\nkappa = 0.5\n[device]\ncells = 16\n')
    p = load_profile(path)
    assert (p.name, p.noise.kappa, p.device.cells) == ("mine", 0.5, 16)
    path.write_text('[noise\nkappa = 0.5\n')
    with pytest.raises(ProfileError, match="invalid TOML"):
        load_profile(path)
    with pytest.raises(ProfileError, match="not found"):
        load_profile(tmp_path / "missing.toml")


def test_method_must_fit_dynamics() -> None:
    with pytest.raises(ProfileError, match="heun.*does not apply to underdamped"):
        Emulator(load_profile("ideal", {"device.dynamics": "underdamped", "integrator.method": "heun"}))
    with pytest.raises(ProfileError, match="baoab"):
        Emulator(load_profile("ideal", {"integrator.method": "baoab"}))


def test_exact_refuses_what_it_cannot_propagate() -> None:
    import numpy as np

    from protocol.drift import Dense, Diagonal

    emu = Emulator(load_profile("ideal", {"range.rail": 1.0, "mismatch.coupling_rel_std": 0.01}))
    with pytest.raises(UnsupportedError, match="auto"):  # rails on a non-symmetric drift
        emu.program(Dense(np.eye(3) + 0.1 * np.arange(9).reshape(3, 3)), np.ones(3))
    # rails alone leave a symmetric drift exact (rails.RailGuard)
    Emulator(load_profile("ideal", {"range.rail": 1.0})).program(Diagonal(np.ones(3)), np.ones(3))
    with pytest.raises(ProfileError, match="range.rail"):
        Emulator(load_profile("ideal", {"device.dynamics": "underdamped", "range.rail": 1.0}))
