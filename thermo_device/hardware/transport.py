"""Low-level transports: how a driver reaches a board's registers.

``Transport`` is the interface a board bridge implements (four calls, all with timeouts).
``SocketTransport`` speaks the framed link of ``link.py`` over TCP (the board simulator; a board
behind an Ethernet bridge). ``Recorder`` wraps any transport and keeps a transcript and counters
(the QCoDeS lesson: compare register traffic with golden transcripts; count round trips).
"""

from __future__ import annotations

import socket
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from protocol.errors import BusyError, DeviceError, DeviceTimeoutError, InternalError, InvalidInputError

from . import link

DEFAULT_TIMEOUT_S = 5.0


class LinkError(InternalError):
    """The board answered a register access with an error status (a driver or board bug)."""


class Transport(ABC):
    """Register access to one board. Not thread-safe: one driver owns one transport."""

    timeout: float = DEFAULT_TIMEOUT_S

    @abstractmethod
    def read_block(self, addr: int, count: int) -> bytes:
        """``count`` words from ``addr`` (consecutive registers, or popped from a FIFO port)."""

    @abstractmethod
    def write_block(self, addr: int, words: np.ndarray | bytes) -> None:
        """Write consecutive registers from ``addr`` (uint32 / int32 array or raw little-endian bytes)."""

    def read_reg(self, addr: int) -> int:
        return int.from_bytes(self.read_block(addr, 1), "little")

    def write_reg(self, addr: int, value: int) -> None:
        self.write_block(addr, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    def close(self) -> None:
        return None


def _as_bytes(words: np.ndarray | bytes) -> bytes:
    if isinstance(words, (bytes, bytearray, memoryview)):
        return bytes(words)
    arr = np.asarray(words)
    if arr.dtype.kind not in "iu":
        raise InvalidInputError(f"register words must be integers, got {arr.dtype}")
    return (arr.astype(np.int64) & 0xFFFFFFFF).astype("<u4").tobytes()  # two's complement


class SocketTransport(Transport):
    """The link over TCP. Every call has a deadline; a timeout or a dropped link raises.

    Writes are *posted* by default (as on PCIe): a write is sent without waiting for its
    acknowledgement, and the acknowledgements are collected, in order, before the next read (or
    after ``MAX_POSTED`` writes). A write error therefore surfaces at the next read; drivers read a
    status register after every action that matters (the reference driver does after COMMIT and
    START), so no error goes unseen, and a program + run costs ~3 round trips instead of ~9.

    Args:
        host, port: where the board (or its bridge, or the simulator) listens.
        timeout: seconds for one request/response exchange.
        connect_timeout: seconds to establish the connection.
        posted_writes: False waits for every write's acknowledgement (simpler to debug).
    """

    MAX_POSTED = 64
    MAX_BUFFERED = 1 << 20  # bytes of coalesced writes before they are sent anyway

    def __init__(self, host: str, port: int, *, timeout: float = DEFAULT_TIMEOUT_S,
                 connect_timeout: float = DEFAULT_TIMEOUT_S, posted_writes: bool = True) -> None:
        self.address = f"{host}:{port}"
        self.timeout = float(timeout)
        try:
            self._sock: socket.socket | None = socket.create_connection((host, port), timeout=connect_timeout)
        except TimeoutError as exc:
            raise DeviceTimeoutError(f"board link {self.address}: connect timed out") from exc
        except OSError as exc:
            raise DeviceError(f"board link {self.address}: cannot connect ({exc})") from exc
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small frames: no Nagle delay
        self._tag = 0
        self.posted_writes = posted_writes
        self._posted: list[tuple[int, int, int]] = []  # (tag, addr, count) of unacknowledged writes
        self._out = bytearray()  # coalesced posted writes not sent yet

    @classmethod
    def from_address(cls, address: str, **kwargs: float) -> SocketTransport:
        """"host:port" or "tcp://host:port"."""
        addr = address.removeprefix("tcp://")
        host, sep, port = addr.rpartition(":")
        if not sep or not port.isdigit():
            raise InvalidInputError(f"board address must be host:port, got {address!r}")
        return cls(host.strip("[]") or "127.0.0.1", int(port), **kwargs)

    def read_block(self, addr: int, count: int) -> bytes:
        # posted writes go out with this read; their acknowledgements come back before its data
        return self._exchange(link.OP_READ, addr, count, b"")

    def write_block(self, addr: int, words: np.ndarray | bytes) -> None:
        payload = _as_bytes(words)
        if len(payload) % 4:
            raise InvalidInputError("register writes are whole 32-bit words")
        if not self.posted_writes:
            self._exchange(link.OP_WRITE, addr, len(payload) // 4, payload)
            return
        count = len(payload) // 4
        if not 0 < count <= link.MAX_BURST_WORDS:
            raise InvalidInputError(f"burst of {count} words (1..{link.MAX_BURST_WORDS})")
        if self._sock is None:
            raise DeviceError(f"board link {self.address} is closed")
        # Posted writes are coalesced into one send: fewer system calls and process wake-ups.
        self._tag = (self._tag + 1) & 0xFFFF
        self._out += link.pack_request(link.OP_WRITE, self._tag, addr, count, payload)
        self._posted.append((self._tag, addr, count))
        if len(self._posted) >= self.MAX_POSTED or len(self._out) >= self.MAX_BUFFERED:
            self.flush()

    def flush(self) -> None:
        """Send coalesced posted writes and collect their acknowledgements; raise the first error."""
        if self._out:
            out, self._out = bytes(self._out), bytearray()
            self._sendall(out)
        self._drain_posted()

    def _drain_posted(self) -> None:
        first: DeviceError | None = None
        while self._posted:
            tag, addr, count = self._posted.pop(0)
            try:
                self._receive(link.OP_WRITE, tag, addr, count, time.monotonic() + self.timeout)
            except (LinkError, BusyError) as exc:  # keep draining: the stream stays in step
                first = first or exc
        if first is not None:
            raise first

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._posted.clear()
        self._out = bytearray()

    def _send(self, op: int, addr: int, count: int, payload: bytes) -> None:
        if self._sock is None:
            raise DeviceError(f"board link {self.address} is closed")
        if not 0 < count <= link.MAX_BURST_WORDS:
            raise InvalidInputError(f"burst of {count} words (1..{link.MAX_BURST_WORDS})")
        self._tag = (self._tag + 1) & 0xFFFF
        self._sendall(link.pack_request(op, self._tag, addr, count, payload))

    def _sendall(self, data: bytes) -> None:
        if self._sock is None:
            raise DeviceError(f"board link {self.address} is closed")
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(data)
        except TimeoutError as exc:
            self.close()
            raise DeviceTimeoutError(f"board link {self.address}: send timed out after {self.timeout} s") from exc
        except OSError as exc:
            self.close()
            raise DeviceError(f"board link {self.address} lost: {exc}") from exc

    def _exchange(self, op: int, addr: int, count: int, payload: bytes) -> bytes:
        if self._out:  # a read goes out in the same send as the writes before it
            self._tag = (self._tag + 1) & 0xFFFF
            self._out += link.pack_request(op, self._tag, addr, count, payload)
            tag, data = self._tag, bytes(self._out)
            self._out = bytearray()
            self._sendall(data)
            write_error: DeviceError | None = None
            try:
                self._drain_posted()
            except (LinkError, BusyError) as exc:  # the read's response is still due: take it first
                write_error = exc
            data = self._receive(op, tag, addr, count, time.monotonic() + self.timeout)
            if write_error is not None:
                raise write_error
            return data
        self._send(op, addr, count, payload)
        return self._receive(op, self._tag, addr, count, time.monotonic() + self.timeout)

    def _receive(self, op: int, expect_tag: int, addr: int, count: int, deadline: float) -> bytes:
        try:
            magic, r_op, status, tag, r_addr, r_count = link.HEADER.unpack(self._recv(link.HEADER.size, deadline))
            if magic != link.RESPONSE_MAGIC or tag != expect_tag or r_op != op:
                self.close()  # out of step: nothing later on this stream can be trusted
                raise LinkError(f"board link {self.address}: malformed or out-of-order response")
            if status == link.STATUS_BUSY:
                raise BusyError(f"board at {self.address} is in use by another driver")
            if status != link.STATUS_OK:
                raise LinkError(f"board link {self.address}: {link.STATUS_NAMES.get(status, status)} "
                                f"(op {op}, address {addr:#x}, {count} words)")
            return self._recv(4 * r_count, deadline) if op == link.OP_READ else b""
        except TimeoutError as exc:
            self.close()  # a late response would pair with the next request
            raise DeviceTimeoutError(f"board link {self.address}: no response within {self.timeout} s") from exc
        except OSError as exc:
            self.close()
            raise DeviceError(f"board link {self.address} lost: {exc}") from exc

    def _recv(self, n: int, deadline: float) -> bytes:
        if self._sock is None:
            raise ConnectionError("closed")
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self._sock.settimeout(left)
            k = self._sock.recv_into(view[got:], n - got)
            if k == 0:
                raise ConnectionError("closed by the board")
            got += k
        return bytes(buf)


@dataclass
class LinkCounters:
    transactions: int = 0
    words_written: int = 0
    words_read: int = 0


class Recorder(Transport):
    """Wraps a transport; counts every access and, with ``keep=True``, records a transcript of
    (op, address, count) tuples for golden-transcript tests."""

    def __init__(self, inner: Transport, keep: bool = False) -> None:
        self.inner = inner
        self.timeout = inner.timeout
        self.counters = LinkCounters()
        self.transcript: list[tuple[str, int, int]] | None = [] if keep else None

    def read_block(self, addr: int, count: int) -> bytes:
        self.counters.transactions += 1
        self.counters.words_read += count
        if self.transcript is not None:
            self.transcript.append(("R", addr, count))
        return self.inner.read_block(addr, count)

    def write_block(self, addr: int, words: np.ndarray | bytes) -> None:
        payload = _as_bytes(words)
        self.counters.transactions += 1
        self.counters.words_written += len(payload) // 4
        if self.transcript is not None:
            self.transcript.append(("W", addr, len(payload) // 4))
        self.inner.write_block(addr, payload)

    def close(self) -> None:
        self.inner.close()
