"""The protocol benchmark runs end to end (its --quick mode) and reports every row the notes quote,
so its numbers stay reproducible. Timings are not asserted here (see benchmarks/ and the brief);
what is asserted holds on any machine: the floor servers answer what the framing requires, and a
raw peer that scans for NaN/Inf refuses a J that holds one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench_protocol.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import start_server  # noqa: E402


def test_quick_run_reports_every_row(tmp_path: Path) -> None:
    out = tmp_path / "protocol.json"
    subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(out)], check=True, timeout=600,
                   capture_output=True, cwd=ROOT)
    result = json.loads(out.read_text())
    small, large = result["small_step"], result["large_program"]
    for row in ("raw_pyzmq", "protocol_null_backend", "protocol_emulator", "floor_same_header",
                "floor_compact_header"):
        assert small[row]["n"] > 0 and small[row]["median_us"] > 0
    for row in ("protocol_null_backend", "floor_same_header", "floor_compact_header"):
        assert small[row]["median_ratio_vs_raw"] == pytest.approx(
            small[row]["median_us"] / small["raw_pyzmq"]["median_us"], rel=1e-2)
        assert small[row]["added_us_over_raw"] == pytest.approx(
            small[row]["median_us"] - small["raw_pyzmq"]["median_us"], abs=0.2)
    assert large["floor_raw_plus_nan_scan"]["median_ms"] > 0
    assert set(result["floor_meets"]) >= {"small_step_added_us (framing only, same header)",
                                          "large_program_throughput (raw + NaN/Inf scan)"}
    # fair by construction: one server process per run, every run recorded with its load
    assert result["machine"]["server"].startswith("one process")
    assert len(result["runs"]) == 1 and len(result["machine"]["loadavg_start"]) == 3
    assert all(len(r["loadavg_end"]) == 3 for r in result["runs"])


def test_shared_server_routes_raw_floor_and_protocol_in_one_process() -> None:
    """The raw echo, the floor and a DeviceClient session are all answered by one process."""
    from host.client import DeviceClient

    proc, ep = start_server([sys.executable, str(BENCH), "--serve-shared", "tcp://127.0.0.1:*"])
    try:
        raw = _dealer(ep, b"raw:t")
        raw.send_multipart([b"SET", b"canned", b"reply"])
        assert raw.recv_multipart() == [b"ok"]
        raw.send_multipart([b"anything"])
        assert raw.recv_multipart() == [b"canned", b"reply"]
        floor = _dealer(ep, b"floor:t")
        floor.send_multipart([b"SET", msgpack.packb({"id": None, "status": "ok"})])
        assert floor.recv_multipart() == [b"ok"]
        floor.send_multipart([msgpack.packb({"id": 9, "arrays": []})])
        assert msgpack.unpackb(floor.recv_multipart()[0]) == {"id": 9, "status": "ok"}
        with DeviceClient(ep, seed=0, timeout=30) as null:  # seed 0: the null backend
            assert null.info()["backend"] == "null"
        raw.close(0)
        floor.close(0)
    finally:
        proc.kill()
        proc.wait()


def _dealer(endpoint: str, ident: bytes | None = None) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 10_000)
    if ident is not None:
        s.setsockopt(zmq.ROUTING_ID, ident)
    s.connect(endpoint)
    return s


def test_floor_server_echoes_id_and_returns_reply_arrays() -> None:
    proc, ep = start_server([sys.executable, str(BENCH), "--serve-floor", "tcp://127.0.0.1:*"])
    try:
        s = _dealer(ep)
        reply_arrays = [np.arange(4.0), np.full(4, 2.0)]
        s.send_multipart([b"SET", msgpack.packb({"id": None, "status": "ok"}), *reply_arrays])
        assert s.recv_multipart() == [b"ok"]
        head = {"id": 41, "arrays": [{"name": "diag", "frame": 0, "dtype": "<f8", "shape": [3]}]}
        s.send_multipart([msgpack.packb(head), np.ones(3)])
        frames = s.recv_multipart()
        assert msgpack.unpackb(frames[0]) == {"id": 41, "status": "ok"}
        for got, want in zip(frames[1:], reply_arrays, strict=True):
            np.testing.assert_array_equal(np.frombuffer(got), want)
        s.close(0)
    finally:
        proc.kill()
        proc.wait()


def test_scanning_raw_peer_refuses_nan() -> None:
    proc, ep = start_server([sys.executable, str(BENCH), "--serve-raw-scan", "tcp://127.0.0.1:*"])
    try:
        s = _dealer(ep)
        s.send_multipart([b"SET", b"ack"])
        assert s.recv_multipart() == [b"ok"]
        j = np.ones((64, 1024), dtype=np.float32)  # above the 64 KiB bulk threshold
        s.send_multipart([b"header", j])
        assert s.recv_multipart() == [b"ack"]
        j[17, 5] = np.nan
        s.send_multipart([b"header", j])
        assert s.recv_multipart() == [b"nan"]
        s.close(0)
    finally:
        proc.kill()
        proc.wait()
