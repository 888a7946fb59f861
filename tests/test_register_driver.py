"""The reference register driver against an in-process board simulator: the register traffic of a
step (golden transcript), coding and range mapping, link errors and timeouts, board ownership."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from protocol.drift import Dense
from protocol.errors import BusyError, DeviceError, DeviceTimeoutError, NotStableError
from thermo_device.hardware import regmap as R
from thermo_device.hardware.board_sim import Board, BoardConfig, BoardServer
from thermo_device.hardware.driver import HardwareBackend
from thermo_device.hardware.transport import LinkError, Recorder, SocketTransport


@pytest.fixture
def board():
    server = BoardServer(Board(BoardConfig(cells=8, kappa=1e-6)), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    yield server
    server.stop()
    thread.join(timeout=5)


def _driver(server: BoardServer, seed: int = 0, keep: bool = False) -> HardwareBackend:
    host, port = server.address.split(":")
    return HardwareBackend(Recorder(SocketTransport(host, int(port), timeout=2.0), keep=keep), seed=seed)


def _problem(n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.linspace(1.0, 3.0, n)) @ q.T, rng.standard_normal(n)


def test_golden_transcript_of_a_step(board) -> None:
    dev = _driver(board, keep=True)
    a, b = _problem()
    dev.link.transcript.clear()
    dev.step(Dense(a), b, 2.0, burn_in=1.0)
    cells = 8
    frames = 10  # a 1 tau window at the 0.1 tau ADC interval
    assert dev.link.transcript == [
        ("W", R.N_ACTIVE, 2),  # N_ACTIVE, COUPLING_LSB
        ("W", R.COUPLING_BASE, 6 * cells),  # the active rows, padded to the physical row length
        ("W", R.BIAS_BASE, 6),
        ("W", R.CONTROL, 1),  # COMMIT
        ("R", R.STATUS, R.STATUS_WORDS),
        ("W", R.DELAY_TICKS, R.RUN_CONFIG_WORDS),
        ("W", R.CONTROL, 1),  # START
        ("R", R.STATUS, R.STATUS_WORDS),
        ("R", R.FIFO_DATA, frames * R.frame_words(6)),  # every frame: averaged on the host side
    ]
    dev.close()


def test_codes_written_are_the_quantized_problem(board) -> None:
    dev = _driver(board)
    a, b = _problem()
    dev.program(Dense(a), b)
    hw = board.board
    lsb = R.bits_f32(hw.config[R.COUPLING_LSB_F32])
    top = 2 ** (dev.coupling_bits - 1) - 1
    assert np.max(np.abs(hw.coupling[:6, :6])) == top  # the largest entry uses the full code range
    np.testing.assert_allclose(hw.coupling[:6, :6] * lsb, a, atol=lsb / 2 + 1e-12)
    scale = dev.info()["range_scale"]
    np.testing.assert_allclose(hw.bias[:6] * hw.dac_lsb * scale, b, atol=hw.dac_lsb * scale / 2 + 1e-12)
    x_star = np.linalg.solve(a, b)
    assert max(np.max(np.abs(b)), np.max(np.abs(x_star))) / scale == pytest.approx(dev.headroom)
    dev.close()


def test_state_keeps_its_host_value_when_the_range_changes(board) -> None:
    dev = _driver(board)
    a, b = _problem()
    dev.program(Dense(a), b)
    dev.run(30.0, burn_in=30.0)
    before, s1 = dev.state, dev.info()["range_scale"]
    dev.program(Dense(a), 10.0 * b)  # needs a 10x larger range: the cells are re-charged
    s2 = dev.info()["range_scale"]
    assert s2 > 4 * s1
    tol = (dev.adc_lsb * s1 + dev.dac_lsb * s2 + dev.adc_lsb * s2)  # ADC read, DAC write, ADC read
    np.testing.assert_allclose(dev.state, before, atol=tol)
    dev.program(Dense(a), 9.0 * b)  # fits the current range: nothing re-charged, the scale is kept
    assert dev.info()["range_scale"] == s2
    dev.close()


def test_unstable_after_quantization_is_refused_before_any_write(board) -> None:
    dev = _driver(board, keep=True)
    dev.link.transcript.clear()
    with pytest.raises(NotStableError):
        dev.program(Dense(np.array([[1.0, 2.0], [2.0, 1.0]])), None)
    assert dev.link.transcript == []
    dev.close()


def test_board_errors_become_typed_errors(board) -> None:
    dev = _driver(board)
    dev.link.write_reg(R.CELLS, 3)  # posted: the error surfaces at the next read
    with pytest.raises(LinkError, match="read-only"):
        dev.link.read_reg(R.ID)
    assert dev.link.read_reg(R.ID) == R.BOARD_MAGIC  # the link stayed in step
    with pytest.raises(LinkError, match="bad address"):
        dev.link.read_reg(0x7FF0)
    with pytest.raises(LinkError, match="FIFO underflow"):
        dev.link.read_block(R.FIFO_DATA, 4)
    # a board-side refusal (COMMIT of a singular matrix written behind the driver's back)
    dev.link.write_block(R.N_ACTIVE, np.array([2, R.f32_bits(1.0)]))
    dev.link.write_block(R.COUPLING_BASE, np.zeros(16, dtype=np.int64))
    dev.link.write_reg(R.CONTROL, R.CTRL_COMMIT)
    with pytest.raises(NotStableError):
        dev._raise_board_error(dev._status_block())
    assert not dev._status_block()[0] & R.ST_ERROR  # cleared for the next command
    dev.close()


def test_one_driver_owns_the_board(board) -> None:
    first = _driver(board)
    with pytest.raises(BusyError):
        _driver(board)
    first.close()
    _driver(board).close()  # the board hands over once the owner's link is gone


def test_silent_links_time_out_and_are_not_reused() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    conns: list[socket.socket] = []

    def accept_and_stay_silent() -> None:
        srv.settimeout(5)
        try:
            conns.append(srv.accept()[0])
        except OSError:
            pass

    t = threading.Thread(target=accept_and_stay_silent, daemon=True)
    t.start()
    link = SocketTransport("127.0.0.1", port, timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(DeviceTimeoutError):
        link.read_reg(R.ID)
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(DeviceError, match="closed"):  # a timed-out link is not reused out of step
        link.read_reg(R.ID)
    for c in conns:
        c.close()
    srv.close()
    with pytest.raises(DeviceError, match="cannot connect"):
        SocketTransport("127.0.0.1", port, timeout=0.3, connect_timeout=0.3)


class _Zeros(Recorder):
    """A transport to something that is not an SPU board: every register reads 0."""

    def __init__(self) -> None:
        self.timeout = 1.0
        self.closed = False

    def read_block(self, addr: int, count: int) -> bytes:
        return bytes(4 * count)

    def write_block(self, addr: int, words) -> None:
        raise AssertionError("nothing may be written to an unidentified device")

    def close(self) -> None:
        self.closed = True


def test_an_unknown_device_is_refused_and_released() -> None:
    link = _Zeros()
    with pytest.raises(DeviceError, match="not an SPU board"):
        HardwareBackend(link)
    assert link.closed


def test_unposted_writes_report_errors_at_once(board) -> None:
    host, port = board.address.split(":")
    link = SocketTransport(host, int(port), timeout=2.0, posted_writes=False)
    with pytest.raises(LinkError, match="read-only"):
        link.write_reg(R.CELLS, 3)
    dev = HardwareBackend(link, seed=1)  # the driver works the same without posted writes
    a, b = _problem()
    res = dev.step(Dense(a), b, 50.0, burn_in=10.0)
    x_star = np.linalg.solve(a, b)
    assert np.max(np.abs(res.mean - x_star)) <= dev.capabilities().precision * np.max(np.abs(x_star))
    dev.close()


def test_a_dropped_state_of_another_length_does_not_widen_the_range(board) -> None:
    # state = 3 values of 100 before a 4-cell program: dropped (wrong length), so the range is
    # set by A and b alone, the same as without it (one driver owns the board at a time)
    scales = []
    for preset in (np.full(3, 100.0), None):
        dev = _driver(board)
        try:
            if preset is not None:
                dev.state = preset
            dev.program(Dense(np.eye(4)), np.ones(4))
            scales.append(dev.status()["range_scale"])
        finally:
            dev.close()
    assert scales[0] == scales[1]
