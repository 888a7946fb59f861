"""A simulated SPU board behind the framed register link, on top of the emulator's physics.

    python -m thermo_device.hardware.board_sim --port 0 [--cells 16] [--kappa 1e-4] ...

prints ``listening HOST:PORT`` on stdout once it accepts connections, then serves until SIGINT or
SIGTERM. The board is what the reference driver (``driver.py``) expects from real hardware: dense
coupling only, ``--cells`` cells, fixed converter depths; it receives *codes* (coupling, bias
and state DACs), returns ADC *codes* in sample frames, and knows nothing about host units.

Physics: an ``Emulator`` on the ideal profile with the board's cell count, noise strength and
ADC (depth, full scale 1, sample interval), so every sample frame is quantized at the declared
ADC depth. The coupling and bias arrive already quantized (codes x LSB), so the emulator's own
DAC and coupling converters are off. The noise source is seeded from SEED_LO/HI at soft reset
(FEAT_SEEDABLE): same seed, same codes.

One link owns the board at a time (the first to send a request, until it disconnects); any
other link gets STATUS_BUSY, as a board claimed by another driver would answer.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.drift import Dense
from protocol.errors import DeviceError, NotStableError

from ..converters import lsb
from ..emulator import Emulator
from ..profile import load_profile
from . import link
from . import regmap as R


@dataclass(frozen=True)
class BoardConfig:
    """The simulated board's fixed hardware (what its identity registers report)."""

    cells: int = 16
    dac_bits: int = 12
    adc_bits: int = 14
    coupling_bits: int = 12
    kappa: float = 1e-4  # (full-scale units)^2: the board's injected noise (FPGA noise currents)
    sample_interval: float = 0.1  # nominal ADC interval, tau
    tau_s: float = 1e-6
    fifo_depth: int = 1 << 22  # words

    def __post_init__(self) -> None:
        if not 1 <= self.cells <= R.MAX_CELLS:
            raise ValueError(f"cells must be in [1, {R.MAX_CELLS}]")
        if not (2 <= self.dac_bits <= 16 and 2 <= self.adc_bits <= 16 and 2 <= self.coupling_bits <= 24):
            raise ValueError("converter depths: DAC and ADC 2..16 bits (int16 frames), coupling 2..24")


class Board:
    """Register file + physics. ``access`` is the whole link-level behaviour; not thread-safe
    (the server serialises access through board ownership)."""

    def __init__(self, config: BoardConfig) -> None:
        self.cfg = config
        c = config
        self.adc_lsb = lsb(c.adc_bits, 1.0)
        self.dac_lsb = lsb(c.dac_bits, 1.0)
        self.min_ticks = max(1, round(c.sample_interval * R.TICKS_PER_TAU / 2))
        self.profile = load_profile("ideal", {
            "device.cells": c.cells, "device.tau_s": c.tau_s, "noise.kappa": c.kappa,
            "adc.bits": c.adc_bits, "adc.full_scale": 1.0, "adc.sample_interval": c.sample_interval,
            "integrator.method": "exact"})
        self.identity = {
            R.ID: R.BOARD_MAGIC, R.FW: R.FW_VERSION, R.CELLS: c.cells,
            R.CONVERTERS: c.dac_bits | c.adc_bits << 8 | c.coupling_bits << 16,
            R.FEATURES: R.FEAT_SEEDABLE | R.FEAT_DENSE, R.TAU_PS: round(c.tau_s * 1e12),
            R.ADC_INTERVAL_TICKS: round(c.sample_interval * R.TICKS_PER_TAU), R.ADC_MIN_TICKS: self.min_ticks,
            R.KAPPA_F32: R.f32_bits(c.kappa), R.FIFO_DEPTH: c.fifo_depth}
        self.config = {R.N_ACTIVE: 0, R.COUPLING_LSB_F32: 0, R.DELAY_TICKS: 0, R.BURNIN_TICKS: 0,
                       R.FRAME_TICKS: self.identity[R.ADC_INTERVAL_TICKS], R.FRAMES: 0, R.SEED_LO: 0, R.SEED_HI: 0}
        self.soft_reset()

    # -- state --------------------------------------------------------------------------------------

    def soft_reset(self) -> None:
        seed = self.config[R.SEED_LO] | self.config[R.SEED_HI] << 32
        self.emu = Emulator(self.profile, seed=seed & (2**63 - 1))
        n = self.cfg.cells
        self.bias = np.zeros(n, dtype=np.int64)
        self.ic = np.zeros(n, dtype=np.int64)
        self.coupling = np.zeros((n, n), dtype=np.int64)
        self.active_n = 0
        self.fifo = bytearray()
        self.fifo_pos = 0
        self.status = 0
        self.error = R.ERR_NONE
        self.run_count = 0
        self.delay_applied = 0
        self.clipped = 0

    def _fail(self, code: int) -> None:
        self.status = (self.status | R.ST_ERROR) & ~R.ST_BUSY
        self.error = code

    # -- link entry point ---------------------------------------------------------------------------

    def access(self, op: int, addr: int, count: int, payload: bytes) -> tuple[int, bytes]:
        if op == link.OP_READ:
            if addr == R.FIFO_DATA:
                return self._pop(count)
            words = [self._read(addr + 4 * k) for k in range(count)] if count < 64 else None
            if words is None:
                return self._read_array(addr, count)
            if any(w is None for w in words):
                return link.STATUS_BAD_ADDRESS, b""
            return link.STATUS_OK, np.array(words, dtype=np.int64).astype("<u4").tobytes()
        if op == link.OP_WRITE:
            values = np.frombuffer(payload, dtype="<i4")
            if self._write_array(addr, values):
                return link.STATUS_OK, b""
            for k, v in enumerate(values):
                status = self._write(addr + 4 * k, int(v) & 0xFFFFFFFF)
                if status != link.STATUS_OK:
                    return status, b""
            return link.STATUS_OK, b""
        return link.STATUS_BAD_REQUEST, b""

    def _array(self, addr: int) -> tuple[np.ndarray, int] | None:
        n = self.cfg.cells
        for base, arr in ((R.BIAS_BASE, self.bias), (R.STATE_BASE, self.ic)):
            if base <= addr < base + 4 * n:
                return arr, (addr - base) // 4
        if R.COUPLING_BASE <= addr < R.COUPLING_BASE + 4 * n * n:
            return self.coupling.reshape(-1), (addr - R.COUPLING_BASE) // 4
        return None

    def _write_array(self, addr: int, values: np.ndarray) -> bool:
        hit = self._array(addr)
        if hit is None:
            return False
        arr, i = hit
        if i + len(values) > len(arr):
            return False  # runs off the block: fall back to per-word handling (BAD_ADDRESS)
        arr[i:i + len(values)] = values
        return True

    def _read_array(self, addr: int, count: int) -> tuple[int, bytes]:
        if R.STATE_BASE <= addr < R.STATE_BASE + 4 * self.cfg.cells:
            codes = self._state_codes()
            i = (addr - R.STATE_BASE) // 4
            if i + count > len(codes):
                return link.STATUS_BAD_ADDRESS, b""
            return link.STATUS_OK, codes[i:i + count].astype("<i4").tobytes()
        hit = self._array(addr)
        if hit is None or hit[1] + count > len(hit[0]):
            return link.STATUS_BAD_ADDRESS, b""
        arr, i = hit
        return link.STATUS_OK, arr[i:i + count].astype("<i4").tobytes()

    def _read(self, addr: int) -> int | None:
        if addr in self.identity:
            return self.identity[addr]
        if addr in self.config:
            return self.config[addr]
        if addr == R.FRAME_WORDS:
            return R.frame_words(self.config[R.N_ACTIVE])
        run = {R.STATUS: self.status, R.ERROR_CODE: self.error,
               R.FIFO_COUNT: (len(self.fifo) - self.fifo_pos) // (4 * max(R.frame_words(self.active_n), 1)),
               R.DELAY_APPLIED_TICKS: self.delay_applied, R.RUN_COUNT: self.run_count, R.ADC_CLIPPED: self.clipped}
        if addr in run:
            return run[addr]
        if addr == R.CONTROL:
            return 0
        if R.STATE_BASE <= addr < R.STATE_BASE + 4 * self.cfg.cells:
            return int(self._state_codes()[(addr - R.STATE_BASE) // 4]) & 0xFFFFFFFF
        hit = self._array(addr)
        if hit is not None:
            return int(hit[0][hit[1]]) & 0xFFFFFFFF
        return None

    def _write(self, addr: int, value: int) -> int:
        if addr in self.config:
            self.config[addr] = value
            return link.STATUS_OK
        if addr == R.CONTROL:
            for bit in R.CTRL_ORDER:
                if value & bit:
                    self._control(bit)
            return link.STATUS_OK
        if addr in self.identity or addr in (R.STATUS, R.ERROR_CODE, R.FIFO_COUNT, R.DELAY_APPLIED_TICKS,
                                             R.RUN_COUNT, R.ADC_CLIPPED, R.FRAME_WORDS):
            return link.STATUS_READ_ONLY
        return link.STATUS_BAD_ADDRESS

    # -- control actions ----------------------------------------------------------------------------

    def _control(self, bit: int) -> None:
        if bit == R.CTRL_SOFT_RESET:
            self.soft_reset()
        elif bit == R.CTRL_CLEAR_ERROR:
            self.status &= ~R.ST_ERROR
            self.error = R.ERR_NONE
        elif self.status & R.ST_ERROR:
            return  # a board in error ignores actions until CLEAR_ERROR
        elif bit == R.CTRL_COMMIT:
            self._commit()
        elif bit == R.CTRL_LOAD_STATE:
            n = self.active_n
            if n == 0:
                return self._fail(R.ERR_NOT_PROGRAMMED)
            self.emu.state = self.ic[:n] * self.dac_lsb
        elif bit == R.CTRL_RESET_STATE:
            if self.active_n:
                self.emu.state = np.zeros(self.active_n)
        elif bit == R.CTRL_START:
            self._start()

    def _commit(self) -> None:
        n = self.config[R.N_ACTIVE]
        lsb = R.bits_f32(self.config[R.COUPLING_LSB_F32])
        if not 1 <= n <= self.cfg.cells or not np.isfinite(lsb) or lsb <= 0.0:
            return self._fail(R.ERR_BAD_CONFIG)
        lo, hi = R.code_range(self.cfg.coupling_bits)
        codes = np.clip(self.coupling[:n, :n], lo, hi)  # the conductance DACs saturate
        blo, bhi = R.code_range(self.cfg.dac_bits)
        b = np.clip(self.bias[:n], blo, bhi) * self.dac_lsb
        try:
            self.emu.program(Dense(codes * np.float64(np.float32(lsb))), b)
        except NotStableError:
            return self._fail(R.ERR_NOT_STABLE)
        except DeviceError:
            return self._fail(R.ERR_BAD_CONFIG)
        self.active_n = n
        self.status |= R.ST_PROGRAMMED

    def _start(self) -> None:
        self.status = (self.status | R.ST_BUSY) & ~R.ST_DONE
        n = self.active_n
        if n == 0:
            return self._fail(R.ERR_NOT_PROGRAMMED)
        frames, frame_ticks = self.config[R.FRAMES], self.config[R.FRAME_TICKS]
        if frames and frame_ticks < self.min_ticks:
            return self._fail(R.ERR_BAD_CONFIG)
        fw = R.frame_words(n)
        if max(frames, 1) * fw > self.cfg.fifo_depth:
            return self._fail(R.ERR_FIFO_OVERFLOW)
        burn = self.config[R.BURNIN_TICKS] / R.TICKS_PER_TAU
        delay = self.config[R.DELAY_TICKS] / R.TICKS_PER_TAU
        window = frames * frame_ticks / R.TICKS_PER_TAU
        try:
            res = self.emu.run(burn + window, burn_in=burn, delay=delay, samples=frames)
        except DeviceError:
            return self._fail(R.ERR_BAD_CONFIG)
        values = res.samples if frames else res.mean[None, :]
        lo, hi = R.code_range(self.cfg.adc_bits)
        codes = np.clip(np.rint(values / self.adc_lsb), lo, hi).astype("<i2")
        if n % 2:  # frames are whole words: pad odd cell counts with a zero code
            codes = np.concatenate([codes, np.zeros((codes.shape[0], 1), dtype="<i2")], axis=1)
        self.fifo = bytearray(self.fifo[self.fifo_pos:]) + codes.tobytes()
        self.fifo_pos = 0
        self.delay_applied = round(res.diagnostics.get("delay_applied", 0.0) * R.TICKS_PER_TAU)
        self.clipped = round(res.diagnostics.get("adc_clipped_fraction", 0.0) * values.size)
        self.run_count += 1
        self.status = (self.status | R.ST_DONE) & ~R.ST_BUSY

    def _pop(self, count: int) -> tuple[int, bytes]:
        if 4 * count > len(self.fifo) - self.fifo_pos:
            return link.STATUS_FIFO_UNDERFLOW, b""
        out = bytes(self.fifo[self.fifo_pos:self.fifo_pos + 4 * count])
        self.fifo_pos += 4 * count
        if self.fifo_pos == len(self.fifo):
            self.fifo, self.fifo_pos = bytearray(), 0
        return link.STATUS_OK, out

    def _state_codes(self) -> np.ndarray:
        """What the ADC reads on each cell now (cells beyond the active ones read 0)."""
        out = np.zeros(self.cfg.cells, dtype=np.int64)
        x = self.emu.state
        if x.size:
            lo, hi = R.code_range(self.cfg.adc_bits)
            out[:x.size] = np.clip(np.rint(x / self.adc_lsb), lo, hi)
        return out


class BoardServer:
    """Serve one ``Board`` over TCP; a thread per connection, one owning link at a time."""

    def __init__(self, board: Board, host: str = "127.0.0.1", port: int = 0, idle_timeout: float = 600.0,
                 claim_wait_s: float = 0.5) -> None:
        self.board = board
        self.idle_timeout = idle_timeout
        # A new link waits this long for the owner to go before it is told BUSY: a driver that just
        # closed its link and the next one that opens must not race the owner's teardown.
        self.claim_wait_s = claim_wait_s
        self.sock = socket.create_server((host, port))
        self.sock.settimeout(0.2)  # the accept loop wakes up to notice stop()
        self.address = "{}:{}".format(*self.sock.getsockname()[:2])
        self._stop = threading.Event()
        self._owner_changed = threading.Condition()
        self._owner: socket.socket | None = None

    def stop(self) -> None:
        self._stop.set()

    def serve(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = self.sock.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=self._serve_link, args=(conn,), daemon=True).start()
        finally:
            self.sock.close()

    def _serve_link(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(self.idle_timeout)  # a silent peer does not hold the board forever
        try:
            while not self._stop.is_set():
                head = _recv_exact(conn, link.HEADER.size)
                if head is None:
                    return
                magic, op, _, tag, addr, count = link.HEADER.unpack(head)
                if magic != link.REQUEST_MAGIC or not 0 < count <= link.MAX_BURST_WORDS:
                    conn.sendall(link.pack_response(op, link.STATUS_BAD_REQUEST, tag, addr, 0))
                    return  # framing lost: drop the link
                payload = b""
                if op == link.OP_WRITE:
                    payload = _recv_exact(conn, 4 * count)
                    if payload is None:
                        return
                with self._owner_changed:
                    self._owner_changed.wait_for(lambda: self._owner in (None, conn), timeout=self.claim_wait_s)
                    if self._owner is None:
                        self._owner = conn
                    mine = self._owner is conn
                if not mine:
                    conn.sendall(link.pack_response(op, link.STATUS_BUSY, tag, addr, 0))
                    continue
                status, data = self.board.access(op, addr, count, payload)
                conn.sendall(link.pack_response(op, status, tag, addr, len(data) // 4, data))
        except OSError:
            return
        finally:
            with self._owner_changed:
                if self._owner is conn:
                    self._owner = None
                    self._owner_changed.notify_all()
            conn.close()


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class BoardProcess:
    """The simulator in a child process (tests, benchmarks, demos); ``stop()`` always reaps it.

    Args:
        args: extra command-line arguments (``--cells 8``, ``--kappa 1e-5``, ...).
        startup_timeout: seconds to wait for the ``listening`` line.
        log: where the child's stderr goes (a file; a pipe nobody reads could fill and block it).
    """

    def __init__(self, *args: str, startup_timeout: float = 60.0, log: Any = None, cwd: str | None = None) -> None:
        import select
        import subprocess

        self.proc = subprocess.Popen([sys.executable, "-m", "thermo_device.hardware.board_sim", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=log if log is not None else subprocess.DEVNULL,
                                     cwd=cwd)
        ready, _, _ = select.select([self.proc.stdout], [], [], startup_timeout)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"board simulator did not start (said {line!r})")
        self.address = line.split()[1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except Exception:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> BoardProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m thermo_device.hardware.board_sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="listen address (loopback by default)")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on stdout)")
    d = BoardConfig()
    parser.add_argument("--cells", type=int, default=d.cells)
    parser.add_argument("--dac-bits", type=int, default=d.dac_bits)
    parser.add_argument("--adc-bits", type=int, default=d.adc_bits)
    parser.add_argument("--coupling-bits", type=int, default=d.coupling_bits)
    parser.add_argument("--kappa", type=float, default=d.kappa, help="noise strength, (full-scale units)^2")
    parser.add_argument("--sample-interval", type=float, default=d.sample_interval, help="ADC interval, tau")
    parser.add_argument("--idle-timeout", type=float, default=600.0, help="drop a link silent this long, s")
    args = parser.parse_args(argv)
    cfg = BoardConfig(cells=args.cells, dac_bits=args.dac_bits, adc_bits=args.adc_bits,
                      coupling_bits=args.coupling_bits, kappa=args.kappa, sample_interval=args.sample_interval)
    try:
        server = BoardServer(Board(cfg), args.host, args.port, args.idle_timeout)
    except OSError as exc:
        # one line naming the fix instead of socket.create_server's traceback
        import errno

        if exc.errno == errno.EADDRINUSE:
            why = (f"port {args.port} on {args.host} is already in use (another board simulator?): stop it, "
                   "or pick another --port (0 picks a free one, printed on stdout)")
        else:
            why = f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}): check --host and --port"
        print(f"board_sim: error: {why}", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    print(f"listening {server.address}", flush=True)
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
