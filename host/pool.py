"""A pool of devices that solves a tiled TNGD step: parallel across devices, multiplexed on each.

``TiledDevice`` is a ``protocol.Device`` of N cells (N = the whole parameter vector) built on a
``TilePlan`` and a few real devices; ``TNGDCore`` uses it like any device. Its ``step`` cuts the
drift into tile blocks (``host.tiling``), runs them on the pool and returns the concatenated x.

Scheduling: tile t lives on host t mod D (D devices; a host is one device plus the tiles it
serves). The hosts run concurrently, one thread each (or one Ray actor each, ``host.ray_pool``),
so a step costs about the slowest host, not the sum; one host runs its tiles one after another.

Multiplexing keeps every tile's device context. Each tile owns a noise stream, seeded by
``tile_seed(seed, t)``: a dedicated device is opened with that seed, and a shared device swaps
the tiles' snapshots in and out (analog state, noise generator, programs), so a tile's numbers do
not depend on which device ran it, nor on how many tiles shared it: a pool of 4 devices, one
device multiplexing 4 tiles and 4 Ray actors give the same bits. A device that cannot snapshot
(the register board) keeps each tile's analog state only (``device.state``): the warm start
survives multiplexing, the noise stream is the device's own (deterministic, not the same bits).

Failures: with ``PoolConfig.failover`` (the default), a device whose tile run raises or does not
answer within ``timeout`` seconds is retired: its tiles move to the least loaded live devices
(each adopts a moved tile as a fresh context of the tile's own seed, warm-started from the tile's
last returned state) and the pass re-runs them there; every move is recorded (``moves``, and
``tile_moves`` in the step's diagnostics). Without failover, or with no device left, the step ends
with ``TileFailedError`` naming the tile, the device and the cause, after every other host has
answered (nothing is silently dropped), or ``DeviceTimeoutError`` naming the late tiles. A stability
refusal (NotStable) is never failed over: the TNGD guard handles it. Reconnecting to a restarted
daemon is the ``DeviceClient``'s (``retries``, ``restore``).

Checkpoints: ``snapshot()`` gathers every tile's context (analog state, programs, noise stream),
so a tiled run resumes bit for bit; a pool with a device that cannot snapshot keeps states only.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from protocol.capabilities import Capabilities
from protocol.device import Device, DeviceSnapshot, RunResult
from protocol.drift import DRIFT_FORMS, Drift
from protocol.errors import (
    CapacityError,
    DeviceError,
    DeviceTimeoutError,
    ErrorCode,
    InvalidInputError,
    NotStableError,
    ShapeError,
    UnsupportedError,
)

from .adapt import DriftAdapter
from .connect import connect
from .tiling import SweepReport, TilePlan, compact, solve_tiles, tile_drift

BACKENDS = ("local", "ray")
_log = logging.getLogger(__name__)


def tile_seed(seed: int, tile: int) -> int:
    """Tile ``tile``'s device seed: an independent stream per tile (SeedSequence spawn keys), the
    same wherever the tile runs."""
    return int(np.random.SeedSequence(int(seed), spawn_key=(int(tile),)).generate_state(1)[0])


class TileFailedError(DeviceError):
    """A tile's run failed on its device; ``tile`` and ``device`` say where, the message why."""

    def __init__(self, message: str, *, tile: int = -1, device: str = "", code: ErrorCode | None = None) -> None:
        super().__init__(message, code=code)
        self.tile, self.device = tile, device

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries (Ray) with its fields
        return (_rebuild_tile_error, (self.message, self.tile, self.device, self.code))


def _rebuild_tile_error(message: str, tile: int, device: str, code: ErrorCode) -> TileFailedError:
    return TileFailedError(message, tile=tile, device=device, code=code)


@dataclass(frozen=True)
class DeviceSpec:
    """How to open one device of the pool: an address for ``host.connect`` and its settings.

    ``overrides`` apply to embedded devices (profile keys); ``options`` to daemons (``timeout``,
    ``retries``, ``restore``, ``curve``). Plain data, so a Ray actor can open the device itself.
    """

    address: str = "embedded:ideal"
    overrides: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def open(self, seed: int) -> Device:
        if self.address == "embedded" or self.address.startswith("embedded:"):
            return connect(self.address, seed=seed, overrides=self.overrides)
        if self.overrides:
            raise InvalidInputError(f"profile overrides apply to embedded devices only, not {self.address!r}")
        return connect(self.address, seed=seed, **self.options)


@dataclass(frozen=True, eq=False)
class TileJob:
    """One run of one tile: its block drift, bias and run settings; ``state``: set before the run."""

    tile: int
    drift: Drift
    bias: np.ndarray
    duration: float
    burn_in: float = 0.0
    delay: float = 0.0
    reset: bool = False
    state: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class TileOutcome:
    tile: int
    mean: np.ndarray
    state: np.ndarray
    analog_time_s: float
    wall_s: float
    diagnostics: dict[str, Any] = field(default_factory=dict)


# what a tile's run reports that the TNGD core reads (stability guard, noise-aware readout)
_DIAGNOSTICS = ("unstable", "stability_margin", "kappa")


def _light(snap: DeviceSnapshot) -> DeviceSnapshot:
    """The snapshot without its programs, for a restore followed by a program and a run without
    delay: the next program replaces them and no delay reads the previous one, so rebuilding
    them (an O(N m^2) set-up each) would be wasted. Generator, thermostat and state stay."""
    meta = snap.meta
    if meta.get("backend") != "emulator" or meta.get("format") != 1 or not isinstance(meta.get("programs"), list):
        return snap  # another backend's format: restored as it is
    arrays = {k: v for k, v in snap.arrays.items() if not k.startswith(("previous.", "current."))}
    return DeviceSnapshot({**meta, "programs": [None, None]}, arrays)


class TileHost:
    """One device and the tiles scheduled on it (in a worker thread or a Ray actor).

    With one tile the device is simply that tile's device. With several, the device holds one
    tile's context at a time; switching saves the leaving tile's snapshot (or state) and loads the
    arriving one's. Each tile starts from a fresh device of its own seed: the snapshot of a
    device opened with ``tile_seed`` (a temporary session for all but the first tile).
    """

    def __init__(self, spec: DeviceSpec, tiles: Sequence[int], seeds: Sequence[int], index: int = 0) -> None:
        if not tiles or len(tiles) != len(seeds):
            raise InvalidInputError("a tile host needs one seed per tile and at least one tile")
        self.spec, self.index = spec, index
        self.tiles = [int(t) for t in tiles]
        self.device = spec.open(int(seeds[0]))
        self.adapt = DriftAdapter(self.device.capabilities())
        self.current = self.tiles[0]
        self.restaged = 0  # state-mode runs that needed a range-setting program first
        self.saved: dict[int, DeviceSnapshot | np.ndarray | None] = {}
        self.mode = "single"
        if len(self.tiles) > 1:
            self.mode = "snapshot"
            try:
                self.device.snapshot()
            except UnsupportedError:
                self.mode = "state"
            for t, s in zip(self.tiles[1:], seeds[1:], strict=True):
                self.saved[t] = self._fresh(int(s)) if self.mode == "snapshot" else None

    def _fresh(self, seed: int) -> DeviceSnapshot:
        temp = self.spec.open(seed)
        try:
            return temp.snapshot()
        finally:
            temp.close()

    def capabilities(self) -> Capabilities:
        return self.adapt.capabilities  # type: ignore[return-value]

    def describe(self) -> dict[str, Any]:
        try:
            info = self.device.info()
        except Exception:  # noqa: BLE001 - a terse board: the pool works without these facts
            info = {}
        return {"address": self.spec.address, "tiles": self.tiles, "mode": self.mode,
                "cells": self.capabilities().cells, "kappa": info.get("kappa"), "adc": info.get("adc")}

    def _switch(self, tile: int, light: bool) -> None:
        if tile == self.current:
            return
        if self.mode == "snapshot":
            self.saved[self.current] = self.device.snapshot()
            snap = self.saved[tile]
            assert isinstance(snap, DeviceSnapshot)
            self.device.restore(_light(snap) if light else snap)
        # state mode: the leaving tile's state was kept from its last run's result (no round trip)
        self.current = tile

    def run(self, jobs: Sequence[TileJob]) -> list[TileOutcome]:
        """Run the jobs in order; the first failure raises ``TileFailedError`` for its tile."""
        out = []
        for job in jobs:
            try:
                out.append(self._run(job))
            except TileFailedError:
                raise
            except Exception as exc:  # any cause: the caller must learn which tile did not run
                code = exc.code if isinstance(exc, DeviceError) else None
                raise TileFailedError(f"tile {job.tile} on device {self.index} ({self.spec.address}) failed: "
                                      f"{type(exc).__name__}: {exc}", tile=job.tile, device=self.spec.address,
                                      code=code) from exc
        return out

    def _run(self, job: TileJob) -> TileOutcome:
        if job.tile not in self.tiles:
            raise InvalidInputError(f"tile {job.tile} is not scheduled on this device (it serves {self.tiles})")
        t0 = time.perf_counter()
        drift = self.adapt(job.drift)
        self._switch(job.tile, light=job.delay == 0.0)
        kw = {"burn_in": job.burn_in, "delay": job.delay, "reset": job.reset}
        if self.mode == "state":
            # the state setter checks the length against the program the device holds (another
            # tile's): program this tile first, then put its warm start back, then run
            self.device.program(drift, job.bias)
            st = job.state if job.state is not None else self.saved.get(job.tile)
            # a tile's first run starts from zero, as on a fresh device: never from the state
            # another tile left behind
            st = st if st is not None else np.zeros(drift.dim)
            try:
                self.device.state = st
            except CapacityError:
                # the range the device chose for this program cannot hold the tile's state (a
                # dedicated board would have widened it for its own state). A program whose
                # solution is that state makes it pick a range that holds it; re-programming the
                # tile's bias then keeps or widens that range around the state it holds.
                self.device.program(drift, drift.matvec(st))
                self.device.state = st
                self.device.program(drift, job.bias)
                self.restaged += 1
            res = self.device.run(job.duration, **kw)
            self.saved[job.tile] = np.array(res.state, dtype=np.float64)  # the final state, in host units
        else:
            if job.state is not None:
                self.device.state = job.state
            res = self.device.step(drift, job.bias, job.duration, **kw)
        diag = {k: res.diagnostics[k] for k in _DIAGNOSTICS if k in res.diagnostics}
        return TileOutcome(job.tile, np.asarray(res.mean, dtype=np.float64), np.asarray(res.state),
                           float(res.analog_time_s), time.perf_counter() - t0, diag)

    def snapshot_tiles(self) -> dict[int, DeviceSnapshot]:
        """Every tile's full context (analog state, programs, noise stream) by tile index."""
        if self.mode == "state":
            raise UnsupportedError(f"device {self.index} ({self.spec.address}) cannot snapshot: its tiles keep "
                                   "their analog states only")
        out = {t: snap for t, snap in self.saved.items() if t != self.current and isinstance(snap, DeviceSnapshot)}
        out[self.current] = self.device.snapshot()
        return out

    def restore_tiles(self, snaps: dict[int, DeviceSnapshot]) -> None:
        """Load ``snapshot_tiles``'s result (every tile of this host must be in it)."""
        if self.mode == "state":
            raise UnsupportedError(f"device {self.index} ({self.spec.address}) cannot restore snapshots")
        missing = [t for t in self.tiles if t not in snaps]
        if missing:
            raise InvalidInputError(f"the snapshot holds no context for tile(s) {missing} of device {self.index}")
        for t in self.tiles:
            if t == self.current:
                self.device.restore(snaps[t])
            else:
                self.saved[t] = snaps[t]

    def adopt(self, tile: int, seed: int) -> None:
        """Serve one more tile, moved here from a failed device: a fresh context of its own seed
        (its warm start comes with its next job). A dedicated device starts multiplexing."""
        if tile in self.tiles:
            return
        if self.mode == "single":
            try:
                self.device.snapshot()
                self.mode = "snapshot"
            except UnsupportedError:
                self.mode = "state"
        self.tiles.append(int(tile))
        self.saved[int(tile)] = self._fresh(int(seed)) if self.mode == "snapshot" else None

    def get_state(self, tile: int) -> np.ndarray:
        """Tile ``tile``'s analog state in host units (switches it in when multiplexed)."""
        if self.mode == "state" and tile != self.current:
            st = self.saved.get(tile)
            return np.zeros(0) if st is None else np.array(st)
        self._switch(tile, light=False)
        return np.array(self.device.state, dtype=np.float64)

    def close(self) -> None:
        self.device.close()


class LocalHandle:
    """A ``TileHost`` behind a one-thread executor: calls run in order, concurrently with other hosts
    (numba kernels and the ZeroMQ client release the GIL; one socket per device, one thread each)."""

    def __init__(self, spec: DeviceSpec, tiles: Sequence[int], seeds: Sequence[int], index: int) -> None:
        self.pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tile-host-{index}")
        try:
            self.host = self.pool.submit(TileHost, spec, tiles, seeds, index).result()
        except BaseException:
            self.pool.shutdown(wait=False)
            raise

    def submit(self, method: str, *args: Any) -> cf.Future:
        return self.pool.submit(getattr(self.host, method), *args)

    def close(self, wait: bool = True) -> None:
        """Close the device; ``wait=False`` (a retired, maybe hung device) queues it and returns."""
        try:
            done = self.pool.submit(self.host.close)
            if wait:
                done.result(timeout=10.0)
        finally:
            self.pool.shutdown(wait=False)


@dataclass(frozen=True)
class PoolConfig:
    """How to tile and where to run the tiles (``train(..., pool=PoolConfig(...))``).

    Attributes:
        tiles: tiling policy ("layer", "param", "chunk"; ``host.tiling``).
        devices: devices in the pool (fewer than tiles: each multiplexes several).
        backend: "local" (threads in this process) or "ray" (one Ray actor per device).
        cells: tile size limit; None: the device's declared cells.
        sweeps, method, relax: refinement (``host.tiling.solve_tiles``).
        timeout: seconds one pool call may take before it fails.
        resources: Ray custom resources per actor, e.g. {"spu": 1} (backend "ray").
        ray_cpus: CPUs each Ray actor reserves (0.5: four actors on two cores).
        ray_address: ``ray.init`` address (None: the running session or a local one).
        failover: a device whose tile run fails (an error or a timeout) is retired and its tiles
            move to the remaining devices, which re-run them from their last states; False: the
            step fails with ``TileFailedError`` as soon as one tile does.
    """

    tiles: str = "layer"
    devices: int = 1
    backend: str = "local"
    cells: int | None = None
    sweeps: int = 0
    method: str = "gauss-seidel"
    relax: float = 1.0
    timeout: float = 600.0
    resources: dict[str, float] | None = None
    ray_address: str | None = None
    ray_cpus: float = 1.0
    failover: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.devices, bool) or not isinstance(self.devices, int) or self.devices < 1:
            raise InvalidInputError(f"pool devices must be a positive integer, got {self.devices!r}")
        if self.backend not in BACKENDS:
            raise InvalidInputError(f"pool backend must be one of {BACKENDS}, got {self.backend!r}")
        if not self.timeout > 0:
            raise InvalidInputError(f"pool timeout must be positive, got {self.timeout!r}")

    def to_plain(self) -> dict[str, Any]:
        return asdict(self)


class TiledDevice:
    """A ``protocol.Device`` over a tile plan and a pool of devices (module docstring).

    Build it with ``open_pool``. Only ``step`` runs (a tile's program and run are one job);
    ``state`` is the concatenation of the tiles' analog states, and setting it hands each tile
    its slice before its next run. ``last`` holds the last step's ``SweepReport`` and timings.
    """

    def __init__(self, plan: TilePlan, handles: Sequence[Any], assignment: Sequence[int], *, sweeps: int = 0,
                 method: str = "gauss-seidel", relax: float = 1.0, timeout: float = 600.0,
                 seeds: Sequence[int] | None = None, failover: bool = False) -> None:
        self.plan, self.handles, self.assignment = plan, list(handles), list(assignment)
        self.sweeps, self.method, self.relax, self.timeout = sweeps, method, relax, float(timeout)
        self.seeds = list(seeds) if seeds is not None else [tile_seed(0, t) for t in range(len(plan))]
        self.failover = failover
        self.retired: dict[int, str] = {}  # device index -> why it was retired
        self.moves: list[dict[str, Any]] = []  # every tile move, in order
        self._tile_states: dict[int, np.ndarray] = {}  # each tile's last returned state (a move's warm start)
        self.pending: dict[int, np.ndarray] = {}
        self.last: dict[str, Any] = {}
        self.last_report: SweepReport | None = None
        self._closed = False
        self.hosts = self._gather([h.submit("describe") for h in self.handles], "describe")
        caps = self._gather([h.submit("capabilities") for h in self.handles], "capabilities")
        for h, c in zip(self.hosts, caps, strict=True):
            plan.check_fits(c.cells, f"device {h['address']}")
        c0 = caps[0]
        # the pool takes every drift form: each tile is converted for its own device
        self._caps = replace(c0, backend=f"tiled({c0.backend})", cells=plan.n, drift_forms=DRIFT_FORMS,
                             max_duration=min(c.max_duration for c in caps), max_rank=None)

    def _gather(self, futures: list[cf.Future], what: str) -> list[Any]:
        done, pending = cf.wait(futures, timeout=self.timeout)
        if pending:
            late = [k for k, f in enumerate(futures) if f in pending]
            tiles = [t for k in late for t, d in enumerate(self.assignment) if d == k]
            raise DeviceTimeoutError(f"tile pool: {what} on device(s) {late} (tiles {tiles}) did not finish "
                                     f"within {self.timeout} s")
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            self._raise(errors)
        return [f.result() for f in futures]

    def _raise(self, errors: list[BaseException]) -> None:
        if errors:
            first = errors[0]
            if isinstance(first, DeviceError) and first.code == ErrorCode.NOT_STABLE:
                # the stability guard retries an unstable drift with more damping: keep its type
                raise NotStableError(str(first)) from first
            if isinstance(first, TileFailedError) or not isinstance(first, DeviceError):
                cause = getattr(first, "cause", None)  # Ray wraps the actor's exception
                first = cause if isinstance(cause, TileFailedError) else first
            if len(errors) > 1 and isinstance(first, DeviceError):
                raise type(first)(f"{first} (and {len(errors) - 1} more failed device call(s))",
                                  **_fields(first)) from errors[0]
            raise first

    def _live(self) -> list[int]:
        return [k for k in range(len(self.handles)) if k not in self.retired]

    def _retire(self, k: int, why: BaseException) -> None:
        """Take device k out of the pool and move its tiles to the least loaded live devices."""
        self.retired[k] = f"{type(why).__name__}: {why}"
        try:
            self.handles[k].close(wait=False)  # a hung device must not hold the step up
        except Exception:  # noqa: BLE001 - it failed already; its goodbye may fail too
            pass
        for t, d in enumerate(self.assignment):
            if d != k:
                continue
            live = self._live()
            to = min(live, key=lambda j: (self.assignment.count(j), j))
            self._gather([self.handles[to].submit("adopt", t, self.seeds[t])], "adopt")
            self.assignment[t] = to
            self.hosts[to]["tiles"] = sorted([*self.hosts[to]["tiles"], t])
            self.moves.append({"tile": t, "from": k, "to": to, "why": self.retired[k][:200]})
            _log.warning("tile pool: device %d retired (%s); tile %d moved to device %d", k,
                         self.retired[k][:200], t, to)
        self.hosts[k]["tiles"] = []
        self.hosts[k]["retired"] = self.retired[k][:200]

    def _run_pass(self, jobs: list[TileJob]) -> tuple[dict[int, TileOutcome], list[list[TileOutcome]]]:
        """Run one pass of tile jobs on their devices; with ``failover``, a device that fails (or
        does not answer in time) is retired and its jobs re-run where its tiles moved."""
        outcomes: dict[int, TileOutcome] = {}
        per_device_outcomes: list[list[TileOutcome]] = []
        todo = list(jobs)
        while todo:
            per_host: dict[int, list[TileJob]] = {}
            for job in todo:
                per_host.setdefault(self.assignment[job.tile], []).append(job)
            futures = {k: self.handles[k].submit("run", js) for k, js in per_host.items()}
            _, late = cf.wait(list(futures.values()), timeout=self.timeout)
            failed: dict[int, BaseException] = {}
            for k, f in futures.items():
                if f in late:
                    tiles = [j.tile for j in per_host[k]]
                    failed[k] = DeviceTimeoutError(f"tile pool: run on device(s) [{k}] (tiles {tiles}) did not finish "
                                                   f"within {self.timeout} s")
                elif f.exception() is not None:
                    failed[k] = f.exception()  # type: ignore[assignment]
                else:
                    outs = f.result()
                    per_device_outcomes.append(outs)
                    outcomes.update((o.tile, o) for o in outs)
            if not failed:
                break
            errors = list(failed.values())
            unstable = any(isinstance(e, DeviceError) and e.code == ErrorCode.NOT_STABLE for e in errors)
            if unstable or not self.failover or len(self._live()) <= len(failed):
                # the guard's NotStable keeps its type; without failover (or a device left) it fails
                self._raise(errors)
            for k, exc in failed.items():
                self._retire(k, exc)
            todo = [replace(j, state=j.state if j.state is not None else self._tile_states.get(j.tile))
                    for k in failed for j in per_host[k]]
        return outcomes, per_device_outcomes

    # -- the Device role ---------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        c = self._caps
        return {"backend": c.backend, "cells": c.cells, "kappa": self.hosts[0].get("kappa"),
                "adc": self.hosts[0].get("adc"), "dynamics": c.dynamics, "drift_forms": list(c.drift_forms),
                "tau_s": c.tau_s, "max_duration": c.max_duration, "capabilities": asdict(c),
                "tiles": self.plan.describe(), "devices": self.hosts,
                "refinement": {"sweeps": self.sweeps, "method": self.method, "relax": self.relax}}

    def capabilities(self) -> Capabilities:
        return self._caps

    def status(self) -> dict[str, Any]:
        return {"last_step": self.last}

    def program(self, drift: Drift, bias: np.ndarray | None = None) -> None:
        raise UnsupportedError("a tiled device runs step() only (each tile's program and run are one job)")

    def run(self, duration: float, **kwargs: Any) -> RunResult:
        raise UnsupportedError("a tiled device runs step() only (each tile's program and run are one job)")

    def step(self, drift: Drift, bias: np.ndarray | None, duration: float, *, burn_in: float = 0.0,
             delay: float = 0.0, reset: bool = False, samples: int = 0, second_moment: bool = False) -> RunResult:
        """The tiled solve of drift x = bias (``host.tiling.solve_tiles``), tiles on the pool."""
        if samples or second_moment:
            raise UnsupportedError("a tiled device returns the mean only (samples=0, second_moment=False)")
        if drift.dim != self.plan.n:
            raise ShapeError(f"the drift has N = {drift.dim} but the tile plan covers {self.plan.n} parameters")
        g = np.zeros(self.plan.n) if bias is None else np.asarray(bias, dtype=np.float64)
        if g.shape != (self.plan.n,):
            raise ShapeError(f"bias of shape {g.shape} does not fit N = {self.plan.n}")
        blocks = [compact(tile_drift(drift, t)) for t in self.plan.tiles]
        passes: list[dict[str, Any]] = []
        states: dict[int, np.ndarray] = {}
        diags: list[dict[str, Any]] = []

        def run(jobs: list[tuple[int, np.ndarray]], first: bool) -> list[np.ndarray]:
            per_host: list[list[TileJob]] = [[] for _ in self.handles]
            for t, b in jobs:
                per_host[self.assignment[t]].append(TileJob(t, blocks[t], b, duration, burn_in,
                                                            delay if first else 0.0, reset, self.pending.pop(t, None)))
            t0 = time.perf_counter()
            by_tile, results = self._run_pass([j for js in per_host for j in js])
            wall = time.perf_counter() - t0
            for o in by_tile.values():
                states[o.tile] = o.state
                diags.append(o.diagnostics)
            passes.append({"wall_s": wall, "analog_s": max(sum(o.analog_time_s for o in outs) for outs in results),
                           "device_s": [sum(o.wall_s for o in outs) for outs in results]})
            return [by_tile[t].mean for t, _ in jobs]

        t0 = time.perf_counter()
        x, report = solve_tiles(drift, g, self.plan, run, sweeps=self.sweeps, method=self.method, relax=self.relax)
        wall = time.perf_counter() - t0
        self.last_report = report
        analog = float(sum(p["analog_s"] for p in passes))
        self.last = {"residuals": report.residuals, "runs": report.runs, "wall_s": wall,
                     "device_wall_s": float(sum(p["wall_s"] for p in passes)), "analog_time_s": analog,
                     "passes": len(passes), "tile_moves": len(self.moves), "retired_devices": sorted(self.retired)}
        self._tile_states.update(states)
        state = np.concatenate([states[t.index] if t.index in states else np.zeros(0) for t in self.plan.tiles])
        diagnostics: dict[str, Any] = dict(self.last)
        if any(d.get("unstable") for d in diags):
            diagnostics["unstable"] = True
        margins = [d["stability_margin"] for d in diags if d.get("stability_margin") is not None]
        if margins:
            diagnostics["stability_margin"] = float(min(margins))
        kappas = [d["kappa"] for d in diags if d.get("kappa") is not None]
        if kappas:
            diagnostics["kappa"] = float(max(kappas))
        return RunResult(x, state, analog_time_s=analog, diagnostics=diagnostics)

    @property
    def state(self) -> np.ndarray:
        futs = [self.handles[self.assignment[t.index]].submit("get_state", t.index) for t in self.plan.tiles]
        parts = self._gather(futs, "get_state")
        for t in self.plan.tiles:  # a state set but not yet run is the tile's state
            if t.index in self.pending:
                parts[t.index] = self.pending[t.index]
        if any(p.size == 0 for p in parts):
            return np.zeros(0)  # before the first run: nothing to save (as a fresh device)
        return np.concatenate(parts)

    @state.setter
    def state(self, value: np.ndarray) -> None:
        v = np.asarray(value, dtype=np.float64)
        if v.shape != (self.plan.n,):
            raise ShapeError(f"state: expected length {self.plan.n}, got {v.shape}")
        self.pending = {t.index: v[t.slice].copy() for t in self.plan.tiles}

    def calibrate(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        raise UnsupportedError("calibrate the pool's devices one by one, before tiling")

    def snapshot(self) -> DeviceSnapshot:
        """Every tile's full context (analog state, programs, noise stream): a tiled checkpoint
        resumes bit for bit. UnsupportedError when a device of the pool cannot snapshot (then a
        checkpoint keeps each tile's analog state)."""
        live = [k for k in self._live() if any(d == k for d in self.assignment)]
        parts = self._gather([self.handles[k].submit("snapshot_tiles") for k in live], "snapshot")
        meta: dict[str, Any] = {"backend": "tiled", "format": 1, "tiles": len(self.plan), "contexts": {}}
        arrays: dict[str, np.ndarray] = {}
        for part in parts:
            for t, snap in part.items():
                meta["contexts"][str(t)] = snap.meta
                arrays.update((f"{t}/{name}", a) for name, a in snap.arrays.items())
        for t, st in self.pending.items():  # a state set but not yet run belongs to the checkpoint
            arrays[f"pending/{t}"] = st
        return DeviceSnapshot(meta, arrays)

    def restore(self, snapshot: DeviceSnapshot) -> None:
        """Load ``snapshot()``'s result into the same plan (any number of devices, any assignment)."""
        meta = snapshot.meta
        if meta.get("backend") != "tiled" or meta.get("tiles") != len(self.plan):
            raise InvalidInputError(f"not a snapshot of a {len(self.plan)}-tile pool (backend "
                                    f"{meta.get('backend')!r}, tiles {meta.get('tiles')!r})")
        contexts = meta.get("contexts", {})
        snaps: dict[int, DeviceSnapshot] = {}
        for t in range(len(self.plan)):
            if str(t) not in contexts:
                raise InvalidInputError(f"the pool snapshot holds no context for tile {t}")
            prefix = f"{t}/"
            snaps[t] = DeviceSnapshot(contexts[str(t)], {k[len(prefix):]: v for k, v in snapshot.arrays.items()
                                                         if k.startswith(prefix)})
        live = [k for k in self._live() if any(d == k for d in self.assignment)]
        self._gather([self.handles[k].submit("restore_tiles", {t: snaps[t] for t, d in enumerate(self.assignment)
                                                                if d == k}) for k in live], "restore")
        self.pending = {int(k.split("/", 1)[1]): v for k, v in snapshot.arrays.items() if k.startswith("pending/")}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for k, h in enumerate(self.handles):
            if k in self.retired:
                continue  # closed when it was retired
            try:
                h.close()
            except Exception:  # noqa: BLE001 - closing the rest matters more than one device's goodbye
                pass

    def __enter__(self) -> TiledDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fields(err: DeviceError) -> dict[str, Any]:
    if isinstance(err, TileFailedError):
        return {"tile": err.tile, "device": err.device, "code": err.code}
    return {}


def open_pool(plan: TilePlan, spec: DeviceSpec, config: PoolConfig, seed: int = 0) -> TiledDevice:
    """A ``TiledDevice``: ``min(config.devices, len(plan))`` devices of ``spec``, tile t on device
    t mod D, tile seeds ``tile_seed(seed, t)``; local threads or Ray actors (``config.backend``)."""
    n_dev = min(config.devices, len(plan))
    assignment = [t % n_dev for t in range(len(plan))]
    groups = [[t for t in range(len(plan)) if assignment[t] == d] for d in range(n_dev)]
    handles: list[Any] = []
    try:
        if config.backend == "ray":
            from .ray_pool import RayHandle, ensure_ray

            # a local Ray gets enough logical CPUs for the pool (the actors mostly wait on their
            # devices; a cluster declares its own)
            ensure_ray(config.ray_address, **({} if config.ray_address else
                                              {"num_cpus": max(os.cpu_count() or 1, math.ceil(n_dev * config.ray_cpus))}))
            pending = [RayHandle(spec, g, [tile_seed(seed, t) for t in g], d, config.resources, config.ray_cpus)
                       for d, g in enumerate(groups)]
            handles.extend(pending)
            for h in pending:
                h.ready(config.timeout)
        else:
            for d, g in enumerate(groups):
                handles.append(LocalHandle(spec, g, [tile_seed(seed, t) for t in g], d))
        return TiledDevice(plan, handles, assignment, sweeps=config.sweeps, method=config.method,
                           relax=config.relax, timeout=config.timeout,
                           seeds=[tile_seed(seed, t) for t in range(len(plan))], failover=config.failover)
    except BaseException:
        for h in handles:
            try:
                h.close()
            except Exception:  # noqa: BLE001
                pass
        raise


def device_cells(spec: DeviceSpec, seed: int = 0) -> int:
    """The cells a device of ``spec`` declares (opens and closes one device)."""
    dev = spec.open(seed)
    try:
        return dev.capabilities().cells
    finally:
        dev.close()
