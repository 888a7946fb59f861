"""Daemon sessions: one backend per host session, plus the per-session replay cache.

A session owns its own backend object (its own analog state and noise stream), so nothing one
host does is visible to another. Mutating requests carry a sequence number; the last reply is
kept so a retried request (same number) is answered again without running twice.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from protocol.device import Device


@dataclass(eq=False)
class Job:
    """A request waiting for, or in, the compute path."""

    identity: list[Any]  # routing envelope; a retry from a new socket replaces it
    header: dict[str, Any]
    arrays: dict[str, Any]
    op: str
    args: dict[str, Any]
    session: Session
    seq: int | None
    received_ns: int


@dataclass(eq=False)
class Session:
    id: str
    backend: Device
    seed: int
    info: dict[str, Any]
    last_seq: int = 0
    last_reply: list[Any] | None = None
    last_op: str = ""  # the operation whose reply is cached: a replay must be of the same request
    pending: Job | None = None  # the one request of this session queued or running
    owner: str = ""  # the CURVE public key (Z85) that opened it; "" without authentication
    closed: bool = False
    ops: int = 0
    last_used: float = field(default_factory=time.monotonic)

    def status(self) -> dict[str, Any]:
        return {"last_seq": self.last_seq, "ops": self.ops, "busy": self.pending is not None,
                "idle_s": round(time.monotonic() - self.last_used, 3), "seed": self.seed}


class SessionTable:
    """Open sessions by id, and the close replies of recently closed ones (for retried closes).

    Not thread-safe by itself: the daemon only touches it while holding its socket lock.
    """

    def __init__(self, max_sessions: int, closed_memory: int = 256) -> None:
        self.max_sessions = max_sessions
        self.open: dict[str, Session] = {}
        self.closed: OrderedDict[str, tuple[int, list[Any]]] = OrderedDict()
        self._closed_memory = closed_memory

    def __len__(self) -> int:
        return len(self.open)

    def get(self, session_id: str | None) -> Session | None:
        return self.open.get(session_id) if session_id is not None else None

    def add(self, session: Session) -> None:
        self.open[session.id] = session

    def remove(self, session: Session, seq: int, reply: list[Any]) -> None:
        """Forget ``session``; keep its close reply so a retried close is answered the same."""
        session.closed = True
        self.open.pop(session.id, None)
        self.closed[session.id] = (seq, reply)
        while len(self.closed) > self._closed_memory:
            self.closed.popitem(last=False)

    def idle(self, max_idle_s: float) -> list[Session]:
        if max_idle_s <= 0:
            return []
        now = time.monotonic()
        return [s for s in self.open.values() if s.pending is None and now - s.last_used > max_idle_s]
