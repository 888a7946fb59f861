"""Issue 18 item 5: errors about what the caller passed name it ("grad"), not the device's
"state" or "bias", which the caller never set."""

from __future__ import annotations

import numpy as np
import pytest

import host
from host import Dense, Factored
from protocol.errors import NonFiniteError, ShapeError


def _problem(n: int = 50, m: int = 10) -> tuple[np.ndarray, Factored]:
    rng = np.random.default_rng(0)
    return rng.standard_normal(n), Factored(rng.standard_normal((m, n)), np.eye(m))


def test_a_device_left_programmed_at_another_size_names_grad() -> None:
    dev = host.connect("embedded:ideal", seed=0)
    dev.program(Dense(2.0 * np.eye(8)), np.ones(8))
    opt = host.TNGD(dev, lr=0.1, analog_time=50.0, damping=0.01)
    g, curv = _problem()
    with pytest.raises(ShapeError, match=r"^grad of length 50 .*init='reset'"):
        opt.step(g, curv)
    # the fix the message names works
    opt = host.TNGD(dev, lr=0.1, analog_time=50.0, damping=0.01, init="reset")
    assert opt.step(g, curv).shape == (50,)


def test_grad_and_curvature_of_different_sizes_name_grad() -> None:
    opt = host.TNGD(host.connect("embedded:ideal", seed=0), lr=0.1, analog_time=50.0, damping=0.01)
    g, curv = _problem()
    with pytest.raises(ShapeError, match=r"^grad: expected a vector of length 50 .* got shape \(40,\)"):
        opt.step(g[:40], curv)


def test_a_nan_gradient_is_reported_as_grad_on_every_step() -> None:
    opt = host.TNGD(host.connect("embedded:ideal", seed=0), lr=0.1, analog_time=50.0, damping=0.01)
    g, curv = _problem()
    bad = g.copy()
    bad[3] = np.nan
    with pytest.raises(NonFiniteError, match=r"^grad contains NaN or Inf \(1 of 50 entries, first at index 3\)"):
        opt.step(bad, curv)  # the first step (the device would have said "state")
    opt.step(g, curv)
    with pytest.raises(NonFiniteError, match=r"^grad contains NaN"):
        opt.step(bad, curv)  # a later step (the device would have said "bias")
