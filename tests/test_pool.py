"""Device pools (host.pool): tiles in parallel and time-multiplexed give the same bits, warm start
survives multiplexing, and failures name the tile (nothing silently dropped, nothing hangs)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import host
from host.pool import DeviceSpec, PoolConfig, TiledDevice, TileFailedError, open_pool, tile_seed
from host.tiling import TilePlan, plan_tiles
from host.tngd_core import TNGDCore
from protocol import Factored
from protocol.errors import CapacityError, DeviceTimeoutError, InvalidInputError, UnsupportedError

NOISY = DeviceSpec("embedded:ideal", {"noise.kappa": 1e-3})  # noise that matters: bits depend on streams


def _steps(n: int = 60, m: int = 12, steps: int = 4, seed: int = 0) -> list[tuple[np.ndarray, Factored]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        J = rng.standard_normal((m, n)) / np.sqrt(n)
        out.append((rng.standard_normal(n), Factored(J, np.eye(m), 0.0)))
    return out


def _run(dev, steps, delay: float = 0.0) -> np.ndarray:
    core = TNGDCore(dev, analog_time=5.0, delay=delay, burn_in=1.0)
    st = core.init(0.05)
    xs = []
    for g, curv in steps:
        x, st = core.solve(st, g, curv)
        xs.append(x)
    return np.concatenate(xs)


PLAN = plan_tiles([("a.weight", 30), ("a.bias", 6), ("b.weight", 24)], 16)  # tiles 12,12,12,12,12


@pytest.mark.parametrize("delay", [0.0, 0.7])
def test_parallel_and_multiplexed_pools_give_the_same_bits(delay: float) -> None:
    """Each tile owns its noise stream (tile_seed) and, when multiplexed, its snapshot; so the
    numbers do not depend on how many devices share the tiles. delay > 0 needs the previous
    program of each tile restored too (the full snapshot)."""
    steps = _steps()
    runs = {}
    for devices in (5, 2, 1):
        with open_pool(PLAN, NOISY, PoolConfig(devices=devices, sweeps=1), seed=3) as dev:
            runs[devices] = _run(dev, steps, delay)
            modes = {h["mode"] for h in dev.hosts}
            assert modes == ({"single"} if devices == 5 else {"snapshot"})
    assert np.array_equal(runs[5], runs[1]) and np.array_equal(runs[5], runs[2])
    # and the noise is real: another seed gives other numbers
    with open_pool(PLAN, NOISY, PoolConfig(devices=5, sweeps=1), seed=4) as dev:
        assert not np.array_equal(_run(dev, steps, delay), runs[5])


def test_a_one_tile_pool_is_the_device_with_the_tile_seed() -> None:
    steps = _steps()
    plan = TilePlan.from_bounds([0, 60])
    with open_pool(plan, NOISY, PoolConfig(), seed=3) as pool:
        tiled = _run(pool, steps)
    plain = _run(NOISY.open(tile_seed(3, 0)), steps)
    assert np.array_equal(tiled, plain)


class _Wrapped:
    """A device that forwards everything to ``inner`` (state included); subclasses change one call."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def state(self):
        return self.inner.state

    @state.setter
    def state(self, value):
        self.inner.state = value


class _NoSnapshot(_Wrapped):
    """An emulator that cannot snapshot (as the register board): multiplexing keeps states only."""

    def snapshot(self):
        raise UnsupportedError("no snapshots on this board")


@dataclass(frozen=True)
class _NoSnapshotSpec(DeviceSpec):
    def open(self, seed: int):
        return _NoSnapshot(super().open(seed))


def test_warm_start_survives_multiplexing_on_a_device_without_snapshots() -> None:
    """Without noise (kappa = 0) a tile's result depends only on its warm start: a device that
    multiplexes by saving and restoring states must match dedicated devices."""
    spec = _NoSnapshotSpec("embedded:ideal", {"noise.kappa": 0.0})
    steps = _steps()
    with open_pool(PLAN, spec, PoolConfig(devices=5), seed=0) as par:
        a = _run(par, steps)
    with open_pool(PLAN, spec, PoolConfig(devices=1), seed=0) as mux:
        assert mux.hosts[0]["mode"] == "state"
        b = _run(mux, steps)
        st = mux.state
    np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)
    # the warm start matters: starting every solve from the gradient gives other numbers
    with open_pool(PLAN, spec, PoolConfig(devices=1), seed=0) as mux:
        core = TNGDCore(mux, analog_time=5.0, burn_in=1.0, init="grad")
        s = core.init(0.05)
        xs = []
        for g, curv in steps:
            x, s = core.solve(s, g, curv)
            xs.append(x)
    assert np.abs(np.concatenate(xs) - a).max() > 1e-3
    assert st.shape == (60,)


def test_a_tile_larger_than_every_device_is_a_clear_error() -> None:
    plan = TilePlan.from_bounds([0, 10, 30])
    spec = DeviceSpec("embedded:ideal", {"device.cells": 16})
    with pytest.raises(CapacityError, match=r"tile 1 .*20 parameters.*16 cells"):
        open_pool(plan, spec, PoolConfig(devices=2))


class _Slow:
    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay = inner, delay

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.inner.step(*args, **kwargs)


@dataclass(frozen=True)
class _SlowSpec(DeviceSpec):
    slow_seed: int = -1

    def open(self, seed: int):
        dev = super().open(seed)
        return _Slow(dev, 3.0) if seed == self.slow_seed else dev


def test_a_device_that_does_not_answer_ends_the_step_within_the_pool_timeout() -> None:
    plan = TilePlan.from_bounds([0, 30, 60])
    spec = _SlowSpec("embedded:ideal", slow_seed=tile_seed(0, 1))
    dev = open_pool(plan, spec, PoolConfig(devices=2, timeout=0.5, failover=False), seed=0)
    g, curv = _steps(steps=1)[0]
    t0 = time.perf_counter()
    with pytest.raises(DeviceTimeoutError, match=r"device\(s\) \[1\] \(tiles \[1\]\).*0.5 s"):
        dev.step(curv.damped(0.1), g, 5.0)
    assert time.perf_counter() - t0 < 2.0
    time.sleep(3.0)  # let the slow call end before closing its device
    dev.close()
    # with failover the late device is retired and its tile finishes on the other one
    dev = open_pool(plan, spec, PoolConfig(devices=2, timeout=0.5), seed=0)
    t0 = time.perf_counter()
    res = dev.step(curv.damped(0.1), g, 5.0)
    assert time.perf_counter() - t0 < 2.5 and np.all(np.isfinite(res.mean))
    assert dev.moves == [{"tile": 1, "from": 1, "to": 0, "why": dev.retired[1][:200]}]
    assert "did not finish within 0.5 s" in dev.retired[1]
    dev.close()
    time.sleep(3.0)  # the retired device's slow call ends on its own thread


# -- a daemon that dies mid-step -----------------------------------------------------------------------


def test_a_daemon_that_dies_mid_step_fails_that_tile_by_name(tmp_path: Path) -> None:
    from tests.test_wire_daemon import DaemonProcess

    # time stepping with a small dt makes one run take seconds: long enough to kill the daemon in it
    args = ("--set", "integrator.method=euler_maruyama", "--set", "integrator.dt=0.0005")
    daemons = [DaemonProcess(tmp_path / f"d{k}.log", *args) for k in range(2)]
    try:
        # one pool per daemon (a pool is built from one spec), stepped concurrently
        pools = [open_pool(TilePlan.from_bounds([0, 30]), DeviceSpec(d.endpoint, options={"timeout": 8.0}),
                           PoolConfig(devices=1, timeout=30.0), seed=k) for k, d in enumerate(daemons)]
        g, curv = _steps(n=30, steps=1)[0]
        drift = curv.damped(0.1)
        pools[0].step(drift, g, 1.0)  # the first run may compile kernels
        duration, single = 100.0, 0.0
        while single < 0.6 and duration < 1e6:  # a run long enough to be killed in, whatever the load
            duration *= 2
            t0 = time.perf_counter()
            pools[0].step(drift, g, duration)
            single = time.perf_counter() - t0
        assert single > 0.5, f"a run took {single:.2f} s: too short to kill the daemon during it"
        killer = threading.Timer(0.3, daemons[1].proc.kill)
        killer.start()
        results: dict[int, object] = {}

        def go(k: int) -> None:
            try:
                results[k] = pools[k].step(drift, g, duration).mean
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                results[k] = exc

        threads = [threading.Thread(target=go, args=(k,)) for k in range(2)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert time.perf_counter() - t0 < 20.0
        assert isinstance(results[0], np.ndarray)  # the live daemon's tile is unaffected
        err = results[1]
        assert isinstance(err, TileFailedError) and err.tile == 0 and err.device == daemons[1].endpoint
        assert "tile 0 on device 0" in str(err) and daemons[1].endpoint in str(err)
        for p in pools:
            p.close()
    finally:
        for d in daemons:
            d.stop()


def test_a_failing_tile_in_a_pool_is_reported_with_its_index() -> None:
    """A tile whose device raises ends the step with TileFailedError naming that tile."""

    class _Broken:
        def __init__(self, inner) -> None:
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def step(self, *a, **k):
            raise RuntimeError("link down")

    @dataclass(frozen=True)
    class _BrokenSpec(DeviceSpec):
        def open(self, seed: int):
            dev = super().open(seed)
            return _Broken(dev) if seed == tile_seed(0, 2) else dev

    plan = TilePlan.from_bounds([0, 20, 40, 60])
    with open_pool(plan, _BrokenSpec("embedded:ideal"), PoolConfig(devices=3, failover=False), seed=0) as dev:
        g, curv = _steps(steps=1)[0]
        with pytest.raises(TileFailedError, match="tile 2 on device 2 .*RuntimeError: link down") as info:
            dev.step(curv.damped(0.1), g, 5.0)
        assert info.value.tile == 2


def test_tiled_device_refuses_what_it_cannot_do() -> None:
    with open_pool(TilePlan.from_bounds([0, 30, 60]), NOISY, PoolConfig(devices=2)) as dev:
        assert isinstance(dev, TiledDevice) and dev.capabilities().cells == 60
        with pytest.raises(InvalidInputError, match="not a snapshot of a 2-tile pool"):
            dev.restore(NOISY.open(0).snapshot())
        with pytest.raises(UnsupportedError):
            dev.step(Factored(np.ones((2, 60)), np.eye(2), 0.1), np.ones(60), 5.0, samples=3)
        with pytest.raises(Exception, match="N = 61"):
            dev.step(Factored(np.ones((2, 61)), np.eye(2), 0.1), np.ones(61), 5.0)
    assert host.connect  # the pool is built on host.connect's devices


def test_pool_config_is_checked() -> None:
    with pytest.raises(Exception, match="devices"):
        PoolConfig(devices=0)
    with pytest.raises(Exception, match="backend"):
        PoolConfig(backend="slurm")


# -- the register board (16 cells, dense-only, no snapshots) behind its daemon --------------------------


def test_tiles_time_multiplexed_on_the_register_board(tmp_path: Path) -> None:
    """A 40-parameter problem on the 16-cell dense-only board: 3 tiles converted to Dense on the
    host, multiplexed by state on the one board; each tile's solve matches the exact block solve
    within the board's declared precision (kappa 1e-7: noise negligible), with and without sweeps."""
    from host.tiling import exact_tiles, solve_tiles
    from tests.test_wire_daemon import DaemonProcess
    from thermo_device.hardware.board_sim import BoardProcess

    log = open(tmp_path / "board.log", "ab")
    board = BoardProcess("--kappa", "1e-7", log=log, cwd=str(Path(__file__).resolve().parent.parent))
    daemon = DaemonProcess(tmp_path / "daemon.log", "--backend", "register", "--backend-option",
                           f"address={board.address}", "--backend-option", "timeout=10")
    try:
        rng = np.random.default_rng(5)
        n, m = 40, 8
        J = rng.standard_normal((m, n)) / np.sqrt(n)
        drift = Factored(J, np.eye(m), 0.5)
        g = 0.2 * rng.standard_normal(n)
        plan = plan_tiles([("w", n)], 16)
        assert [t.size for t in plan.tiles] == [14, 13, 13]
        with open_pool(plan, DeviceSpec(daemon.endpoint, options={"timeout": 20.0}),
                       PoolConfig(devices=1, timeout=60.0), seed=0) as dev:
            assert dev.hosts[0]["mode"] == "state" and dev.hosts[0]["cells"] == 16
            precision = dev.capabilities().precision  # the board's declared systematic error
            assert 0.0 < precision < 0.05
            for sweeps in (0, 2):
                dev.sweeps, dev.method = sweeps, "gauss-seidel"
                dev.state = np.zeros(n)
                res = dev.step(drift, g, 60.0, burn_in=20.0)
                want, _ = solve_tiles(drift, g, plan, exact_tiles(drift, plan), sweeps=sweeps, method="gauss-seidel")
                # each pass adds at most the declared precision of one solve; sweeps compound it
                bound = (sweeps + 1) * precision * np.max(np.abs(want))  # measured: ~1e-3 against 0.03-0.09
                assert np.max(np.abs(res.mean - want)) <= bound, (sweeps, np.max(np.abs(res.mean - want)), bound)
                assert len(res.diagnostics["residuals"]) == sweeps + 1
            # warm start across a shrinking gradient: each tile's saved state is far outside the
            # range the board picks for the small bias; the host re-stages the range so the state
            # loads (a dedicated board widens its own range). Short runs, so the start matters:
            # compare with the same multiplexing on a noiseless emulator.
            dev.sweeps = 0
            emu_spec = _NoSnapshotSpec("embedded:ideal", {"noise.kappa": 0.0})
            with open_pool(plan, emu_spec, PoolConfig(devices=1), seed=0) as emu:
                for d in (dev, emu):
                    d.state = np.zeros(n)
                    d.step(drift, g, 60.0, burn_in=20.0)
                small = [d.step(drift, 0.02 * g, 1.0).mean for d in (dev, emu)]
            assert dev.handles[0].host.restaged > 0  # the path this checks was taken
            # x_bar is dominated by the warm start (|x| ~ 0.7 relaxing for 1 tau), not by 0.02 g
            assert np.max(np.abs(small[1])) > 0.3
            assert np.max(np.abs(small[0] - small[1])) <= 2 * precision * np.max(np.abs(small[1]))
    finally:
        daemon.stop()
        board.stop()
        log.close()



# -- failover and checkpoints (issue 14) ----------------------------------------------------------------

class _Failing(_Wrapped):
    """An emulator whose ``step`` raises from its ``fail_at``-th call on (a device that died)."""

    def __init__(self, inner, fail_at: int) -> None:
        super().__init__(inner)
        self.fail_at, self.calls = fail_at, 0

    def step(self, *args, **kwargs):
        self.calls += 1
        if self.calls >= self.fail_at:
            from protocol.errors import InternalError
            raise InternalError("the board stopped answering")
        return self.inner.step(*args, **kwargs)


@dataclass(frozen=True)
class _FailingSpec(DeviceSpec):
    bad_seed: int = 0
    fail_at: int = 5

    def open(self, seed: int):
        dev = super().open(seed)
        return _Failing(dev, self.fail_at) if seed == self.bad_seed else dev


def test_a_failed_device_hands_its_tiles_to_the_others() -> None:
    """Device 0 (tiles 0, 2, 4) dies in the middle of the second step's pass: its tiles move to
    device 1, re-run from their last states, and the step completes with the numbers a healthy
    pool gives (noiseless, so they depend on the warm starts only)."""
    spec = _FailingSpec("embedded:ideal", {"noise.kappa": 0.0}, bad_seed=tile_seed(0, 0), fail_at=5)
    healthy = DeviceSpec("embedded:ideal", {"noise.kappa": 0.0})
    steps = _steps()
    with open_pool(PLAN, healthy, PoolConfig(devices=2), seed=0) as ok:
        ref = _run(ok, steps)
    with open_pool(PLAN, spec, PoolConfig(devices=2), seed=0) as pool:
        got = _run(pool, steps)
        assert [m["tile"] for m in pool.moves] == [0, 2, 4] and {m["to"] for m in pool.moves} == {1}
        assert "stopped answering" in pool.retired[0] and pool.last["tile_moves"] == 3
        assert pool.assignment == [1] * 5
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)


def test_without_failover_or_a_spare_the_failed_tile_is_named() -> None:
    spec = _FailingSpec("embedded:ideal", {"noise.kappa": 0.0}, bad_seed=tile_seed(0, 0), fail_at=2)
    for config in (PoolConfig(devices=2, failover=False), PoolConfig(devices=1)):
        with open_pool(PLAN, spec, config, seed=0) as pool:
            with pytest.raises(TileFailedError, match="stopped answering") as info:
                _run(pool, _steps())
            assert info.value.tile == (2 if config.devices == 2 else 1)


@pytest.mark.parametrize("devices_after", [5, 2])
def test_a_tiled_checkpoint_resumes_bit_for_bit(devices_after: int) -> None:
    """snapshot() carries every tile's noise stream and programs: restored into a pool of any
    size, the next steps give the same bits as the uninterrupted run."""
    steps = _steps(steps=4)
    with open_pool(PLAN, NOISY, PoolConfig(devices=2, sweeps=1), seed=3) as pool:
        core = TNGDCore(pool, analog_time=5.0, delay=0.5, burn_in=1.0)
        st = core.init(0.05)
        for g, curv in steps[:2]:
            _, st = core.solve(st, g, curv)
        snap, mid = pool.snapshot(), st
        ref = []
        for g, curv in steps[2:]:
            x, st = core.solve(st, g, curv)
            ref.append(x)
    with open_pool(PLAN, NOISY, PoolConfig(devices=devices_after, sweeps=1), seed=99) as fresh:
        fresh.restore(snap)
        core = TNGDCore(fresh, analog_time=5.0, delay=0.5, burn_in=1.0)
        st, got = mid, []
        for g, curv in steps[2:]:
            x, st = core.solve(st, g, curv)
            got.append(x)
    assert np.array_equal(np.concatenate(got), np.concatenate(ref))
