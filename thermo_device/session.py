"""Daemon sessions: one backend per host session, plus the per-session replay cache.

A session owns its own backend object (its own analog state and noise stream), so nothing one
host does is visible to another. Mutating requests carry a sequence number; the last reply is
kept so a retried request (same number) is answered again without running twice.

Sessions are keyed by (owner, id), the owner being the CURVE key that opened it ("" without
CURVE): another key's session id names no session of this peer, so every operation, open
included, answers exactly as for an id never used (an id is not an oracle across keys).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol.device import Device


@dataclass(eq=False, slots=True)
class Staged:
    """An array arriving in row blocks (``upload``): written in place, each block scanned on arrival."""

    array: np.ndarray
    rows: np.ndarray  # bool per row (axis 0): received
    received: int = 0

    @property
    def complete(self) -> bool:
        return self.received == self.array.shape[0]


@dataclass(eq=False, slots=True)
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
    nbytes: int = 0  # the request's frames: in flight until the job ends (the memory budget)
    program_charge: int = 0  # what the session's program costs once this job programs it
    program_raw: int = 0  # this job's program array bytes (0: not a programming operation)


@dataclass(eq=False)
class Session:
    id: str
    backend: Device
    seed: int
    info: dict[str, Any]
    last_seq: int = 0
    last_reply: list[Any] | None = None  # None with last_seq > 0: the reply was too large to keep
    last_op: str = ""  # the operation whose reply is cached: a replay must be of the same request
    pending: Job | None = None  # the one request of this session queued or running
    owner: str = ""  # the CURVE public key (Z85) that opened it; "" without authentication
    closed: bool = False
    ops: int = 0
    last_used: float = field(default_factory=time.monotonic)
    lease_s: float = 0.0  # reclaimed after this long without a request or heartbeat (0: never)
    reply_bytes: int = 0  # bytes of last_reply (what the replay cache pins)
    program_bytes: int = 0  # the memory budget's charge for its programs (PROGRAM_FACTOR x arrays)
    program_raw: int = 0  # array bytes of its last program (the next one's "previous")
    staged: dict[str, Staged] = field(default_factory=dict)  # uploads not yet used by a program

    @property
    def staged_bytes(self) -> int:
        return sum(st.array.nbytes for st in self.staged.values())

    def status(self) -> dict[str, Any]:
        return {"last_seq": self.last_seq, "ops": self.ops, "busy": self.pending is not None,
                "idle_s": round(time.monotonic() - self.last_used, 3), "seed": self.seed,
                "lease_s": self.lease_s}


class SessionTable:
    """Open sessions by id, and the close replies of recently closed ones (for retried closes).

    Not thread-safe by itself: the daemon only touches it while holding its socket lock.
    """

    def __init__(self, max_sessions: int, closed_memory: int = 256) -> None:
        self.max_sessions = max_sessions
        self.open: dict[tuple[str, str], Session] = {}
        self.closed: OrderedDict[tuple[str, str], tuple[int, list[Any]]] = OrderedDict()
        self._closed_memory = closed_memory

    def __len__(self) -> int:
        return len(self.open)

    def get(self, session_id: str | None, owner: str = "") -> Session | None:
        return self.open.get((owner, session_id)) if session_id is not None else None

    def add(self, session: Session) -> None:
        self.open[(session.owner, session.id)] = session

    def remove(self, session: Session, seq: int, reply: list[Any]) -> None:
        """Forget ``session``; keep its close reply so a retried close is answered the same."""
        session.closed = True
        key = (session.owner, session.id)
        self.open.pop(key, None)
        self.closed[key] = (seq, reply)
        while len(self.closed) > self._closed_memory:
            self.closed.popitem(last=False)

    def closed_reply(self, session_id: str | None, owner: str) -> tuple[int, list[Any]] | None:
        return self.closed.get((owner, session_id)) if session_id is not None else None

    def replay_bytes(self) -> int:
        """Bytes pinned by the replay caches of all open sessions."""
        return sum(s.reply_bytes for s in self.open.values())

    def idle(self) -> list[Session]:
        """Sessions whose lease ran out (none while a request of theirs is queued or running)."""
        now = time.monotonic()
        return [s for s in self.open.values()
                if s.lease_s > 0 and s.pending is None and now - s.last_used > s.lease_s]
