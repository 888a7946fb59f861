"""Emulator semantics: validation, warm start, reset, delay, readout grid, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from protocol import Device
from protocol.drift import Dense, Diagonal, Factored
from protocol.errors import (
    CapacityError,
    InvalidInputError,
    NonFiniteError,
    NotProgrammedError,
    NotStableError,
    ShapeError,
)
from tests.conftest import emulator, spd_matrix


def _problem(n: int = 6, seed: int = 0):
    a, _ = spd_matrix(n, 5.0, seed)
    return a, np.random.default_rng(seed).standard_normal(n)


def test_emulator_is_a_device() -> None:
    assert isinstance(emulator(), Device)
    info = emulator().info()
    for key in ("cells", "dynamics", "drift_forms", "tau_s", "kappa", "versions", "max_duration"):
        assert key in info


BAD_PROGRAMS = [
    ("bias length", lambda a, b: (Dense(a), b[:-1]), ShapeError),
    ("bias NaN", lambda a, b: (Dense(a), np.r_[b[:-1], np.nan]), NonFiniteError),
    ("not positive definite", lambda a, b: (Dense(-a), b), NotStableError),
    ("non-symmetric unstable", lambda a, b: (Dense(np.triu(a) - 3 * np.diag(np.diag(a))), b), NotStableError),
    ("diagonal zero", lambda a, b: (Diagonal(np.r_[np.ones(5), 0.0]), b), NotStableError),
    ("H not PSD", lambda a, b: (Factored(np.ones((2, 6)), -np.eye(2), 1.0), b), NotStableError),
    ("singular factored", lambda a, b: (Factored(np.ones((2, 6)), np.eye(2), 0.0), b), NotStableError),
    ("too many cells", lambda a, b: (Diagonal(np.ones(9)), np.ones(9)), CapacityError),
    ("not a drift", lambda a, b: (a, b), InvalidInputError),
]


@pytest.mark.parametrize("name,make,exc", BAD_PROGRAMS, ids=[p[0] for p in BAD_PROGRAMS])
def test_bad_program_raises_and_changes_nothing(name, make, exc) -> None:
    a, b = _problem()
    twins = [emulator(7, noise__kappa=0.1, device__cells=8) for _ in range(2)]
    for emu in twins:
        emu.program(Dense(a), b)
        emu.run(3.0)
    with pytest.raises(exc):
        twins[0].program(*make(a, b))
    # the failed program left state, drift and RNG exactly as they were
    np.testing.assert_array_equal(twins[0].state, twins[1].state)
    r0, r1 = twins[0].run(2.0, samples=2), twins[1].run(2.0, samples=2)
    np.testing.assert_array_equal(r0.mean, r1.mean)
    np.testing.assert_array_equal(r0.samples, r1.samples)


def test_drift_constructors_validate() -> None:
    with pytest.raises(ShapeError):
        Dense(np.ones((3, 4)))
    with pytest.raises(NonFiniteError):
        Dense(np.array([[1.0, np.inf], [0.0, 1.0]]))
    with pytest.raises(ShapeError):
        Factored(np.ones((2, 5)), np.eye(3), 0.1)
    with pytest.raises(InvalidInputError):
        Factored(np.ones((2, 5)), np.eye(2), -1.0)
    with pytest.raises(InvalidInputError):
        Diagonal(np.array(["a", "b"]))
    with pytest.raises(ShapeError):
        Diagonal(np.zeros(0))


@pytest.mark.parametrize("kwargs,exc", [
    ({"duration": -1.0}, InvalidInputError),
    ({"duration": float("nan")}, NonFiniteError),
    ({"duration": 1.0, "burn_in": 2.0}, InvalidInputError),
    ({"duration": 1.0, "delay": -0.5}, InvalidInputError),
    ({"duration": 2e7}, InvalidInputError),
    ({"duration": 1.0, "samples": -1}, CapacityError),
    ({"duration": 1.0, "samples": 1.5}, InvalidInputError),
    ({"duration": 1.0, "burn_in": 1.0, "samples": 3}, InvalidInputError),
])
def test_bad_run_arguments(kwargs, exc) -> None:
    a, b = _problem()
    emu = emulator(0)
    emu.program(Dense(a), b)
    before = emu.state
    duration = kwargs.pop("duration")
    with pytest.raises(exc):
        emu.run(duration, **kwargs)
    np.testing.assert_array_equal(emu.state, before)


def test_run_before_program() -> None:
    with pytest.raises(NotProgrammedError):
        emulator().run(1.0)


def test_state_setter_validates() -> None:
    a, b = _problem()
    emu = emulator()
    emu.program(Dense(a), b)
    with pytest.raises(ShapeError):
        emu.state = np.ones(5)
    with pytest.raises(NonFiniteError):
        emu.state = np.full(6, np.nan)
    emu.state = np.arange(6.0)
    np.testing.assert_array_equal(emu.state, np.arange(6.0))


def test_determinism_same_seed_bitwise_different_seed_differs() -> None:
    a, b = _problem(8)
    results = []
    for seed in (3, 3, 4):
        emu = emulator(seed, noise__kappa=0.05)
        emu.program(Dense(a), b)
        r1 = emu.run(10.0, burn_in=2.0, samples=4)
        emu.program(Factored(np.ones((2, 8)), np.eye(2), 0.5), b)
        r2 = emu.run(5.0, delay=1.0)
        results.append(np.concatenate([r1.mean, r1.samples.ravel(), r2.mean, r2.state]))
    assert np.array_equal(results[0], results[1])
    assert not np.array_equal(results[0], results[2])


def _transient(a, b, x0, t):
    xs = np.linalg.solve(a, b)
    return scipy.linalg.expm(-a * t) @ (x0 - xs) + xs


def test_warm_start_continues_and_reset_restarts() -> None:
    a, b = _problem()
    emu = emulator(0, noise__kappa=0.0)
    emu.program(Dense(a), b)
    emu.run(0.4)
    r = emu.run(0.6)  # warm start: same as one run of 1.0 from zero
    np.testing.assert_allclose(r.state, _transient(a, b, np.zeros(6), 1.0), rtol=1e-10, atol=1e-12)
    r = emu.run(0.3, reset=True)
    np.testing.assert_allclose(r.state, _transient(a, b, np.zeros(6), 0.3), rtol=1e-10, atol=1e-12)
    # reprogramming keeps the state (the device is not reset by a new drift)
    a2, b2 = _problem(6, seed=1)
    emu.program(Dense(a2), b2)
    np.testing.assert_allclose(emu.state, r.state)


def test_delay_runs_the_previous_drift_once() -> None:
    a1, b1 = _problem(6, 0)
    a2, b2 = _problem(6, 1)
    emu = emulator(0, noise__kappa=0.0)
    emu.program(Dense(a1), b1)
    x1 = emu.run(0.5).state
    emu.program(Dense(a2), b2)
    r = emu.run(0.8, delay=0.3)
    expected = _transient(a2, b2, _transient(a1, b1, x1, 0.3), 0.8)
    np.testing.assert_allclose(r.state, expected, rtol=1e-10, atol=1e-12)
    assert r.diagnostics["delay_applied"] == 0.3
    assert r.analog_time_s == pytest.approx(1.1e-6)
    # no new program: the drift acting during a further delay is the current one
    r2 = emu.run(0.2, delay=0.3)
    np.testing.assert_allclose(r2.state, _transient(a2, b2, r.state, 0.5), rtol=1e-10, atol=1e-12)


def test_samples_are_evenly_spaced_over_the_window() -> None:
    a, b = _problem()
    emu = emulator(0, noise__kappa=0.0)
    emu.program(Dense(a), b)
    r = emu.run(3.0, burn_in=1.0, samples=4, reset=True)
    ts = 1.0 + 2.0 * np.arange(1, 5) / 4
    expected = np.stack([_transient(a, b, np.zeros(6), t) for t in ts])
    np.testing.assert_allclose(r.samples, expected, rtol=1e-10, atol=1e-12)
    assert r.diagnostics["adc_samples"] % 4 == 0
    np.testing.assert_allclose(r.samples[-1], r.state)


def test_empty_window_reads_a_snapshot_and_second_moment() -> None:
    a, b = _problem()
    emu = emulator(0, noise__kappa=0.0)
    emu.program(Dense(a), b)
    r = emu.run(0.5, burn_in=0.5, second_moment=True)
    np.testing.assert_allclose(r.mean, r.state)
    np.testing.assert_allclose(r.second_moment, np.outer(r.state, r.state))


def test_second_moment_matches_samples() -> None:
    """With stride 1 the returned samples are the ADC samples: moments must agree exactly."""
    a, b = _problem()
    for method in ("exact", "heun"):
        emu = emulator(1, noise__kappa=0.1, integrator__method=method)
        emu.program(Dense(a), b)
        r = emu.run(5.0, samples=50, second_moment=True)
        assert r.diagnostics["adc_samples"] == 50
        np.testing.assert_allclose(r.mean, r.samples.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(r.second_moment, r.samples.T @ r.samples / 50, rtol=1e-9, atol=1e-12)
