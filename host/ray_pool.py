"""Ray actors as pool devices: each actor hosts one ``TileHost`` (an emulator profile, or a client
to a board's daemon on the node the board is attached to), for users who outgrow one machine.

Needs the ``cluster`` extra (``pip install -e '.[cluster]'``). Ray is the engine: placement,
transport and failure detection are Ray's; we write no cluster manager. An actor needing a board
asks for a custom resource (``PoolConfig(resources={"spu": 1})``) that only the nodes with a board
declare (``ray start --resources '{"spu": 1}'``), so Ray places it there. docs/tiling.md has the
cluster set-up. The actor runs the same ``TileHost`` code as a local pool thread, so a pool of
Ray actors gives the same bits as a pool of in-process emulators with the same seeds.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Sequence
from typing import Any

from protocol.errors import DeviceTimeoutError, InvalidInputError

from .pool import DeviceSpec, TileHost

_ACTOR: Any = None


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise InvalidInputError("the Ray pool needs the cluster extra: pip install -e '.[cluster]'") from exc
    return ray


def ensure_ray(address: str | None = None, **init_kwargs: Any) -> None:
    """Join ``address`` (a cluster, e.g. "ray://head:10001" or "auto"), or start a local Ray, unless
    this process is connected already. Local defaults: no dashboard, quiet logs."""
    ray = _ray()
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, **init_kwargs}
    if address is not None:
        kwargs["address"] = address
    ray.init(**kwargs)


class _ActorHost:
    """The actor's body: a ``TileHost`` with BLAS at one thread (the bits and this machine's 2 cores)."""

    def __init__(self, spec: DeviceSpec, tiles: list[int], seeds: list[int], index: int) -> None:
        from threadpoolctl import threadpool_limits

        self._limits = threadpool_limits(1, user_api="blas")
        self.host = TileHost(spec, tiles, seeds, index)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.host, method)(*args)


def _actor_class() -> Any:
    global _ACTOR
    if _ACTOR is None:
        _ACTOR = _ray().remote(num_cpus=1)(_ActorHost)
    return _ACTOR


class RayHandle:
    """One pool device as a Ray actor; ``submit`` returns a ``concurrent.futures.Future``."""

    def __init__(self, spec: DeviceSpec, tiles: Sequence[int], seeds: Sequence[int], index: int,
                 resources: dict[str, float] | None = None, num_cpus: float = 1.0) -> None:
        cls = _actor_class().options(num_cpus=num_cpus, resources=dict(resources or {}))
        self.actor = cls.remote(spec, list(tiles), [int(s) for s in seeds], index)
        self.index = index

    def ready(self, timeout: float) -> None:
        """Wait until the actor has opened its device (placement can wait for a resource forever)."""
        ray = _ray()
        ref = self.actor.call.remote("describe")
        done, _ = ray.wait([ref], timeout=timeout)
        if not done:
            ray.kill(self.actor)
            raise DeviceTimeoutError(f"Ray actor for pool device {self.index} did not start within {timeout} s "
                                     "(is a node offering its resources up?)")
        ray.get(ref)

    def submit(self, method: str, *args: Any) -> cf.Future:
        return self.actor.call.remote(method, *args).future()

    def close(self, wait: bool = True) -> None:
        """Close the device and end the actor; ``wait=False`` (a retired, maybe hung device)
        ends the actor at once."""
        ray = _ray()
        try:
            if wait:
                ray.get(self.actor.call.remote("close"), timeout=10.0)
        finally:
            ray.kill(self.actor)
