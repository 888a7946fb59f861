"""The Ray pool (host.ray_pool): Ray actors hosting emulators give the bits of in-process devices,
and a failing actor's tile is named. One local Ray session for the module (starting Ray takes
10-20 s on this machine); skipped when the cluster extra is not installed."""

from __future__ import annotations

import numpy as np
import pytest

from host.pool import DeviceSpec, PoolConfig, TileFailedError, open_pool
from host.tiling import plan_tiles
from tests.test_pool import NOISY, _run, _steps

ray = pytest.importorskip("ray")

PLAN = plan_tiles([("a.weight", 30), ("a.bias", 6), ("b.weight", 24)], 16)


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_actors_give_the_bits_of_local_devices(ray_session) -> None:
    steps = _steps()
    with open_pool(PLAN, NOISY, PoolConfig(devices=5, sweeps=1), seed=3) as local:
        a = _run(local, steps, delay=0.5)
    with open_pool(PLAN, NOISY, PoolConfig(devices=5, sweeps=1, backend="ray", timeout=60.0, ray_cpus=0.25), seed=3) as remote:
        assert len(remote.handles) == 5
        b = _run(remote, steps, delay=0.5)
    with open_pool(PLAN, NOISY, PoolConfig(devices=2, sweeps=1, backend="ray", timeout=60.0, ray_cpus=0.25), seed=3) as mux:
        c = _run(mux, steps, delay=0.5)  # two actors multiplexing five tiles
    assert np.array_equal(a, b) and np.array_equal(a, c)


def test_a_failing_actor_names_its_tile(ray_session) -> None:
    spec = DeviceSpec("embedded:ideal", {"device.max_duration": 3.0})
    with open_pool(PLAN, spec, PoolConfig(devices=5, backend="ray", timeout=60.0, ray_cpus=0.25), seed=0) as dev:
        g, curv = _steps(steps=1)[0]
        with pytest.raises(TileFailedError, match=r"tile \d on device \d \(embedded:ideal\) failed") as info:
            dev.step(curv.damped(0.1), g, 5.0)  # longer than max_duration on every device
        assert info.value.tile in range(5)
