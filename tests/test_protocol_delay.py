"""The ``delay`` semantics docs/protocol.md section 4 states, in-process and through a daemon:

* a ``program`` makes the drift that was current the previous one (bias included), so after
  program(b=10), program(b=0), a run with reset and delay 5 ends near 10 (1 - e^-5);
* once a run has gone by, the previous drift is the current one;
* ``reset`` zeroes the state before the delay;
* a delay needs a previous drift of the same size (else ``delay_applied`` is 0), and
  ``analog_time_s`` is the time run, (delay_applied + duration) x tau.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from host.client import DeviceClient
from protocol import Diagonal
from protocol.device import Device
from thermo_device import Emulator, load_profile

from .inproc_daemon import InprocDaemon

N = 3
ONES = Diagonal(np.ones(N))
TAU = load_profile("ideal").device.tau_s
NEAR = 1e-4  # ideal profile: kappa 4e-12, so the noise is ~1e-6 at most here


@pytest.fixture(scope="module")
def daemon():
    with InprocDaemon(lambda seed: Emulator(load_profile("ideal"), seed)) as d:
        yield d


@pytest.fixture(params=["embedded", "daemon"])
def device(request, daemon):
    if request.param == "embedded":
        yield Emulator(load_profile("ideal"), seed=2)
        return
    dev = DeviceClient(daemon.endpoint, seed=2, timeout=20.0)
    yield dev
    dev.close()


def test_delay_runs_under_the_program_before_the_latest(device: Device):
    device.program(ONES, np.full(N, 10.0))
    device.program(ONES, np.zeros(N))
    r = device.run(0.0, delay=5.0, reset=True)  # reset, then 5 tau under b = 10, then nothing
    assert np.allclose(r.state, 10.0 * (1.0 - math.exp(-5.0)), atol=NEAR)  # 9.93
    assert r.diagnostics["delay_applied"] == 5.0


def test_after_a_run_the_previous_drift_is_the_current_one(device: Device):
    device.program(ONES, np.full(N, 10.0))
    device.program(ONES, np.zeros(N))
    device.run(0.0)  # a run has gone by: b = 0 is now also "previous"
    r = device.run(0.0, delay=5.0, reset=True)
    assert np.allclose(r.state, 0.0, atol=NEAR)


def test_reset_zeroes_the_state_before_the_delay(device: Device):
    device.program(ONES, np.full(N, 4.0))
    warm = device.run(50.0)  # the state is now at the mean, 4
    assert np.allclose(warm.state, 4.0, atol=NEAR)
    device.program(ONES, np.zeros(N))
    cold = device.run(0.0, delay=1.0, reset=True)  # from 0 under b = 4 for 1 tau
    assert np.allclose(cold.state, 4.0 * (1.0 - math.exp(-1.0)), atol=NEAR)
    device.program(ONES, np.zeros(N))  # previous is now b = 0 (it was current at the last run)
    kept = device.run(0.0, delay=1.0)  # warm: from 4 (1 - e^-1) under b = 0
    assert np.allclose(kept.state, 4.0 * (1.0 - math.exp(-1.0)) * math.exp(-1.0), atol=NEAR)


def test_a_delay_needs_a_previous_drift_of_the_same_size(device: Device):
    device.program(Diagonal(np.ones(N + 1)), np.ones(N + 1))
    device.program(ONES, np.ones(N))  # size changed: no previous drift of size N
    r = device.run(2.0, delay=5.0)
    assert r.diagnostics["delay_applied"] == 0.0
    # documented: analog_time_s is the time the device ran, the skipped delay not included
    assert r.analog_time_s == pytest.approx(2.0 * TAU)
    # and an applied delay counts
    r2 = device.run(2.0, delay=5.0)
    assert r2.diagnostics["delay_applied"] == 5.0 and r2.analog_time_s == pytest.approx(7.0 * TAU)
