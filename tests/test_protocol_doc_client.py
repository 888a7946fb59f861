"""An independent client written from docs/protocol.md alone, driving a real `thermo-device serve`.

The wire client below uses only pyzmq, msgpack and numpy; it does not import the reference
implementation (`protocol/`, `host/`). The embedded `Emulator` is used only to compute the numbers
the daemon must reproduce bit for bit (protocol.md section 4, `open_session`).
"""

from __future__ import annotations

import itertools
import select
import subprocess
import sys
import uuid

import msgpack
import numpy as np
import pytest
import zmq

from thermo_device import Dense, Diagonal, Emulator, Factored, load_profile

PROTO, VERSION = "thermo-ngd", [1, 1]
DTYPES = {"<f4", "<f8", "<i4", "<i8"}
ALL_OPS = {"hello", "info", "open_session", "program", "run", "step", "get_state", "set_state",
           "calibrate", "snapshot", "restore", "status", "ping", "close_session"}


class WireError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class Client:
    """Section 1-2: DEALER socket, msgpack header frame plus one raw frame per array."""

    def __init__(self, endpoint: str, expected_instance: str) -> None:
        self.expected_instance = expected_instance  # from the daemon's "serving ... instance <id>" line
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 10_000)
        self.sock.connect(endpoint)
        self.ids = itertools.count(1)
        self.instance: str | None = None

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()

    @staticmethod
    def encode(arrays: dict[str, np.ndarray]) -> tuple[list[dict], list[bytes]]:
        descs, frames = [], []
        for i, (name, arr) in enumerate(arrays.items()):
            arr = np.ascontiguousarray(arr, dtype=np.asarray(arr).dtype.newbyteorder("<"))
            descs.append({"name": name, "frame": i, "dtype": arr.dtype.str, "shape": list(arr.shape)})
            frames.append(arr.tobytes())
        return descs, frames

    def header(self, op: str, session=None, seq=None, args=None, descs=()) -> dict:
        return {"proto": PROTO, "version": VERSION, "op": op, "id": next(self.ids), "session": session,
                "seq": seq, "args": args or {}, "arrays": list(descs)}

    def send_raw(self, header: dict, frames: list[bytes]) -> int:
        self.sock.send_multipart([msgpack.packb(header), *frames])
        return header["id"]

    def recv(self, want_id) -> tuple[dict, dict[str, np.ndarray]]:
        while True:
            frames = self.sock.recv_multipart()  # zmq.Again after RCVTIMEO: the test fails, never hangs
            head = msgpack.unpackb(frames[0])
            if head.get("id") == want_id:
                break  # section 1: discard replies to requests we are not waiting for
        assert head["proto"] == PROTO and head["version"][0] == VERSION[0]  # section 3
        assert len(head["arrays"]) == len(frames) - 1
        out = {}
        for d, buf in zip(head["arrays"], frames[1:], strict=True):
            dt = np.dtype(d["dtype"])
            assert d["dtype"] in DTYPES and len(buf) == int(np.prod(d["shape"])) * dt.itemsize
            out[d["name"]] = np.frombuffer(buf, dtype=dt).reshape(d["shape"])
        self.instance = head["instance"]
        return head, out

    def request(self, op: str, session=None, seq=None, args=None, arrays=None):
        descs, frames = self.encode(arrays or {})
        head, out = self.recv(self.send_raw(self.header(op, session, seq, args, descs), frames))
        assert head["op"] == op and head["session"] == session and head["seq"] == seq
        if head["status"] != "ok":
            raise WireError(head["error"]["code"], head["error"]["message"])
        return head["result"], out

    def error_code(self, op: str, **kw) -> str:
        with pytest.raises(WireError) as exc:
            self.request(op, **kw)
        return exc.value.code

    def ping(self) -> bool:
        return self.request("ping")[0]["pong"] is True


class Session:
    """A session id plus its own increasing `seq` (section 5)."""

    def __init__(self, client: Client, seed: int = 0) -> None:
        self.c, self.id, self.seq = client, uuid.uuid4().hex, 0
        self.open_header = client.header("open_session", self.id, 0, {"seed": seed})
        head, _ = client.recv(client.send_raw(self.open_header, []))
        assert head["status"] == "ok", head
        self.open_result = head["result"]

    def call(self, op: str, args=None, arrays=None, mutating: bool = True):
        if mutating:
            self.seq += 1
        return self.c.request(op, self.id, self.seq if mutating else None, args, arrays)


def drift_wire(drift, bias=None) -> tuple[dict, dict]:
    """Section 4, drift arguments: args.drift plus arrays named by form."""
    if isinstance(drift, Dense):
        args, arrays = {"form": "dense"}, {"matrix": drift.matrix}
    elif isinstance(drift, Factored):
        args, arrays = {"form": "factored", "damping": drift.damping}, {"J": drift.J, "H": drift.H}
    else:
        args, arrays = {"form": "diagonal"}, {"diag": drift.diag}
    if bias is not None:
        arrays["bias"] = bias
    return {"drift": args}, arrays


def spd(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.logspace(0, 1, n)) @ q.T


@pytest.fixture
def serve(tmp_path):
    procs, clients = [], []

    def start(profile: str = "ideal", *extra: str) -> Client:
        log = tmp_path / f"daemon{len(procs)}.log"
        with open(log, "w") as err:  # the child keeps its own copy of the descriptor
            p = subprocess.Popen([sys.executable, "-m", "thermo_device.cli", "serve", "--bind", "tcp://127.0.0.1:*",
                                  "--profile", profile, "--log-level", "WARNING", *extra],
                                 stdout=subprocess.PIPE, stderr=err, text=True)
        procs.append(p)
        ready, _, _ = select.select([p.stdout], [], [], 60)
        assert ready, f"daemon did not start within 60 s: {log.read_text()}"
        words = p.stdout.readline().split()
        assert len(words) == 4 and words[0] == "serving" and words[2] == "instance", words
        clients.append(Client(words[1], words[3]))
        return clients[-1]

    yield start
    for client in clients:
        client.close()
    for p in procs:
        p.kill()
        p.wait(10)
        p.stdout.close()


RUN = {"duration": 5.0, "burn_in": 1.0, "delay": 0.5, "reset": False, "samples": 4, "second_moment": True}


def assert_same(wire: dict[str, np.ndarray], ref) -> None:
    for name in ("mean", "state", "samples", "second_moment"):
        want = getattr(ref, name)
        assert (name in wire) == (want is not None), name
        if want is not None:
            assert wire[name].dtype == want.dtype and np.array_equal(wire[name], want), name


def test_hello_info_status_ping_close(serve):
    c = serve("ideal")
    res, _ = c.request("hello", args={"features": ["seq_replay", "restart_detect", "teleport"],
                                      "client": "doc-client"})
    assert res["protocol"][0] == 1 and res["instance"] == c.expected_instance == c.instance
    assert set(res["features"]) == {"seq_replay", "restart_detect"}  # the unknown one is dropped
    assert ALL_OPS <= set(res["ops"])
    assert {"max_message_bytes", "max_header_bytes", "max_arrays", "max_ndim", "max_dimension",
            "max_sessions", "queue_size", "session_idle_s"} <= set(res["limits"])
    assert {"pyzmq", "libzmq", "msgpack", "numpy"} <= set(res["versions"])
    assert "capabilities" in res["backend"]
    # Negotiation is an intersection: a client offering nothing gets nothing.
    assert c.request("hello", args={"features": []})[0]["features"] == []

    s = Session(c, seed=3)
    assert s.open_result["session"] == s.id
    info = s.call("info", mutating=False)[0]["info"]
    assert info["capabilities"] and info["seed"] == 3
    # An id in use: seq 0 again is a replay of the open (section 5); only a higher seq is refused.
    assert c.recv(c.send_raw(s.open_header, []))[0]["result"] == s.open_result
    assert c.error_code("open_session", session=s.id, seq=0, args={"seed": 4}) == "invalid_input"  # not a retry
    assert c.error_code("open_session", session=s.id, seq=1, args={"seed": 1}) == "invalid_input"
    for bad in ("a b", "x\nforged log line", "é" * 4, "x" * 65, ""):  # section 5: the id alphabet
        assert c.error_code("open_session", session=bad, seq=0) == "protocol"
    st = c.request("status", session=s.id)[0]
    assert st["instance"] == c.instance and st["sessions"] == 1 and st["running"] is None
    assert st["session_status"]["seed"] == 3 and st["session_status"]["last_seq"] == 0
    assert c.request("status")[0]["session_status"] is None
    assert c.request("ping")[0]["time_ns"] > 0

    st_before = s.call("get_state", mutating=False)[1]["state"]
    assert st_before.dtype == np.float64 and st_before.shape == (0,)  # before any program
    assert c.error_code("run", session=s.id, seq=1, args={"duration": 1.0}) == "not_programmed"
    close = c.header("close_session", s.id, 2)
    assert c.recv(c.send_raw(close, []))[0]["result"] == {"closed": True}
    assert c.recv(c.send_raw(close, []))[0]["result"] == {"closed": True}  # a retried close
    assert c.error_code("info", session=s.id) == "unknown_session"
    assert c.request("status")[0]["sessions"] == 0


@pytest.mark.parametrize("profile", ["ideal", "noisy"])
def test_bit_identical_to_embedded_emulator(serve, profile):
    c, n, seed = serve(profile), 6, 11
    s, emu = Session(c, seed=seed), Emulator(load_profile(profile), seed=seed)
    rng = np.random.default_rng(0)
    a, bias = spd(n, 1) * 0.2, rng.standard_normal(n) * 0.1
    j, h = rng.standard_normal((3, n)) * 0.3, np.eye(3) * 0.5

    drifts = [Dense(a), Factored(j, h, damping=0.3),
              Diagonal(np.linspace(0.5, 2.0, n).astype(np.float32))]  # float32 stays float32 on the wire
    for drift in drifts:  # program + run, each form
        assert s.call("program", *drift_wire(drift, bias))[0] == {}
        emu.program(drift, bias)
        assert_same(s.call("run", dict(RUN))[1], emu.run(**RUN))
    for drift in reversed(drifts):  # the same through step, with a delay under the previous drift
        args, arrays = drift_wire(drift)
        res, out = s.call("step", {**args, **RUN}, arrays)
        ref = emu.step(drift, None, **RUN)
        assert_same(out, ref)
        assert res["analog_time_s"] == ref.analog_time_s
        assert res["diagnostics"]["method"] == ref.diagnostics["method"]
    res, out = s.call("step", {"drift": {"form": "dense"}, "duration": 3.0, "reset": True}, {"matrix": a})
    assert_same(out, emu.step(Dense(a), None, 3.0, reset=True))

    new_state = np.linspace(-0.2, 0.2, n)
    assert s.call("set_state", arrays={"state": new_state})[0] == {}
    emu.state = new_state
    assert np.array_equal(s.call("get_state", mutating=False)[1]["state"], emu.state)
    assert_same(s.call("run", {"duration": 2.0})[1], emu.run(2.0))
    assert np.array_equal(s.call("get_state", mutating=False)[1]["state"], emu.state)
    assert s.call("status", mutating=False)[0]["session_status"]["last_seq"] == s.seq


def test_calibrate_snapshot_restore(serve):
    c, n = serve("noisy"), 4
    s, emu = Session(c, seed=5), Emulator(load_profile("noisy"), seed=5)
    a = spd(n, 2) * 0.3
    s.call("program", *drift_wire(Dense(a)))
    emu.program(Dense(a))
    opts = {"duration": 50.0, "burn_in": 5.0, "probe": 0.5}
    cal = s.call("calibrate", opts)[0]["calibration"]
    ref_cal = emu.calibrate(**opts)
    assert {"n", "gain_rel_std", "gain_rel_max", "offset_rms", "device_time", "temperature_K"} <= set(cal)
    assert cal["n"] == n and cal["gain_rel_std"] == ref_cal["gain_rel_std"]
    assert c.error_code("calibrate", session=s.id, seq=s.seq + 1, args={"bogus": 1}) == "invalid_input"
    s.seq += 1
    s.call("program", *drift_wire(Dense(a)))  # corrected by the calibration on both sides
    emu.program(Dense(a))
    assert_same(s.call("run", dict(RUN))[1], emu.run(**RUN))

    snap, snap_arrays = s.call("snapshot", mutating=False)
    assert isinstance(snap["snapshot"], dict) and "state" in snap_arrays
    first = s.call("run", dict(RUN))[1]
    other = Session(c, seed=99)  # a different seed: restore must replace the noise stream too
    assert other.call("restore", {"snapshot": snap["snapshot"]}, dict(snap_arrays))[0] == {}
    again = other.call("run", dict(RUN))[1]
    assert first.keys() == again.keys() and all(np.array_equal(first[k], again[k]) for k in first)
    forged = {**snap["snapshot"], "profile_digest": "0" * 16}  # as if from another profile
    assert other.c.error_code("restore", session=other.id, seq=other.seq + 1, args={"snapshot": forged},
                              arrays=dict(snap_arrays)) == "invalid_input"
    # A snapshot array of the wrong length (section 4, restore).
    bad = {**snap_arrays, "state": np.zeros(n + 1)}
    assert c.error_code("restore", session=other.id, seq=other.seq + 2, args={"snapshot": snap["snapshot"]},
                        arrays=bad) == "shape_mismatch"
    other.seq += 2
    # Failed restores changed nothing: both sessions are still in the same state.
    mine, theirs = s.call("run", dict(RUN))[1], other.call("run", dict(RUN))[1]
    assert mine.keys() == theirs.keys() and all(np.array_equal(mine[k], theirs[k]) for k in mine)

    rlc = Session(serve("spu-8cell"))
    rlc.call("program", *drift_wire(Dense(np.eye(2))))
    assert rlc.c.error_code("calibrate", session=rlc.id, seq=rlc.seq + 1) == "unsupported"


def test_seq_replay_and_stale(serve):
    c, n = serve("ideal"), 5
    s, emu = Session(c, seed=7), Emulator(load_profile("ideal"), seed=7)
    dia = Diagonal(np.linspace(1.0, 2.0, n))
    args, arrays = drift_wire(dia)
    s.seq = 4  # gaps are allowed
    descs, frames = c.encode(arrays)
    head = c.header("step", s.id, s.seq, {**args, "duration": 2.0}, descs)
    first = c.recv(c.send_raw(head, frames))
    ref = emu.step(dia, None, 2.0)
    assert_same(first[1], ref)
    assert first[0]["timing"]["compute_us"] >= 0 and first[0]["timing"]["queue_us"] >= 0
    again = c.recv(c.send_raw(head, frames))  # same id and seq: a retry after a lost reply
    assert again[0]["status"] == "ok" and all(np.array_equal(first[1][k], again[1][k]) for k in first[1])
    retry = dict(head, id=next(c.ids))  # a retry under a new id is answered under that id
    again = c.recv(c.send_raw(retry, frames))
    assert again[0]["id"] == retry["id"] and all(np.array_equal(first[1][k], again[1][k]) for k in first[1])
    # The same seq with another operation is not a retry: refused, and nothing runs.
    assert c.error_code("run", session=s.id, seq=s.seq, args={"duration": 1.0}) == "stale_request"
    # Nothing ran twice: the next run continues from the single step on the reference.
    assert_same(s.call("run", {"duration": 2.0})[1], emu.run(2.0))
    assert c.error_code("run", session=s.id, seq=3, args={"duration": 1.0}) == "stale_request"
    assert c.request("status", session=s.id)[0]["session_status"]["last_seq"] == s.seq
    assert c.ping()


def raw_error(c: Client, header: dict, frames: list[bytes]) -> dict:
    head, _ = c.recv(c.send_raw(header, frames))
    assert head["status"] == "error"
    return head


def test_errors_keep_daemon_alive(serve):
    c, n = serve("ideal"), 3
    s = Session(c)
    assert c.error_code("teleport") == "unknown_operation"
    assert c.ping()

    h = c.header("ping")
    h["version"] = [2, 0]
    assert raw_error(c, h, [])["error"]["code"] == "version"
    h = c.header("ping")
    h["version"] = [1, 99]  # a different minor version is accepted
    assert c.recv(c.send_raw(h, []))[0]["status"] == "ok"
    h = c.header("ping")
    h["proto"] = "not-thermo"
    assert raw_error(c, h, [])["error"]["code"] == "protocol"

    # A diag frame one byte short of its declared <f8 [3].
    desc = [{"name": "diag", "frame": 0, "dtype": "<f8", "shape": [n]}]
    h = c.header("program", s.id, 1, {"drift": {"form": "diagonal"}}, desc)
    assert raw_error(c, h, [b"\0" * (8 * n - 1)])["error"]["code"] == "protocol"
    h = c.header("program", s.id, 2, {"drift": {"form": "diagonal"}}, desc)
    assert raw_error(c, h, [])["error"]["code"] == "protocol"  # frame count != entries
    s.seq = 2
    assert c.ping()

    nan = np.array([1.0, np.nan, 1.0])
    assert c.error_code("program", session=s.id, seq=3, args={"drift": {"form": "diagonal"}},
                        arrays={"diag": nan}) == "non_finite"
    assert c.error_code("program", session=s.id, seq=4, args={"drift": {"form": "diagonal"}},
                        arrays={"diag": np.ones(n), "bias": np.ones(n + 1)}) == "shape_mismatch"
    assert c.error_code("program", session=s.id, seq=5, args={"drift": {"form": "diagonal"}},
                        arrays={"diag": -np.ones(n)}) == "not_stable"
    assert c.error_code("program", session=s.id, seq=6, args={"drift": {"form": "diagonal"}},
                        arrays={"diag": np.ones(5000)}) == "capacity"  # ideal has 4096 cells
    assert c.error_code("program", session=s.id, args={"drift": {"form": "diagonal"}},
                        arrays={"diag": np.ones(n)}) == "protocol"  # missing seq
    assert c.error_code("run", session="0" * 32, seq=1, args={"duration": 1.0}) == "unknown_session"
    for i, bad in enumerate(("5", True, None, [1.0])):  # section 4: times are msgpack numbers
        assert c.error_code("run", session=s.id, seq=7 + i, args={"duration": bad}) == "invalid_input"
    assert c.error_code("info", session="0" * 32) == "unknown_session"

    c.sock.send_multipart([b"\xc1garbage"])  # unreadable: still answered, with id nil
    head, _ = c.recv(None)
    assert head["status"] == "error" and head["error"]["code"] == "protocol"
    assert c.ping()
    assert c.request("status")[0]["errors"] >= 10


def test_limits_enforced(serve):
    c = serve("ideal", "--max-message-bytes", "1000000")
    limits = c.request("hello", args={"features": []})[0]["limits"]
    assert limits["max_message_bytes"] == 1_000_000
    s = Session(c)
    dia = {"drift": {"form": "diagonal"}}

    # Two 600 kB frames: each under the per-frame guard (section 7, no reply above it), 1.2 MB together.
    # The header is read first, so the reply echoes our id.
    big = {"diag": np.ones(75_000), "bias": np.ones(75_000)}
    descs, frames = c.encode(big)
    assert c.recv(c.send_raw(c.header("program", s.id, 1, dia, descs), frames))[0]["error"]["code"] == "too_large"
    # An oversized header cannot be read: its reply has id nil (section 6).
    pad = c.header("program", s.id, 1, {**dia, "pad": "x" * limits["max_header_bytes"]})
    c.send_raw(pad, [])
    assert c.recv(None)[0]["error"]["code"] == "too_large"
    # Zero-length frames make the remaining limits cheap to probe.
    many = {f"a{i}": np.zeros(0) for i in range(limits["max_arrays"] + 1)}
    assert c.error_code("program", session=s.id, seq=2, args=dia, arrays=many) == "too_large"
    wide = {"diag": np.zeros((limits["max_dimension"] + 1, 0))}
    assert c.error_code("program", session=s.id, seq=3, args=dia, arrays=wide) == "too_large"
    deep = {"diag": np.zeros((1,) * (limits["max_ndim"] + 1))}
    assert c.error_code("program", session=s.id, seq=4, args=dia, arrays=deep) == "too_large"
    # A result larger than max_message_bytes is refused before running.
    s.seq = 5
    s.call("program", dia, {"diag": np.ones(2)})
    assert c.error_code("run", session=s.id, seq=s.seq + 1,
                        args={"duration": 1.0, "samples": 100_000}) == "too_large"  # 1.6 MB of samples
    assert c.error_code("run", session=s.id, seq=s.seq + 2,
                        args={"duration": 1.0, "samples": 1_000_001}) == "invalid_input"  # the wire's cap
    assert c.ping()
