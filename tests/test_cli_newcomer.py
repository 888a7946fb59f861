"""Issue 18: a newcomer's mistakes end in one line on stderr that names the fix (exit status 2),
run as a user would (a subprocess), and ``thermo-host train`` against a daemon leaves no session
open, whether it succeeds or fails."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from host.client import DeviceClient
from thermo_device.hardware.board_sim import BoardProcess

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run(argv: list[str], cwd: Path, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=ENV)


def _one_line(proc: subprocess.CompletedProcess[str], *needles: str, code: int = 2) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


class _Daemon:
    """``thermo-device serve`` on a free loopback port, as a user starts it."""

    def __init__(self, *extra: str, bind: str = "tcp://127.0.0.1:*") -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "thermo_device.cli", "serve", "--bind", bind, *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
        ready, _, _ = select.select([self.proc.stdout], [], [], 120.0)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("serving "):
            self.stop()
            raise RuntimeError(f"daemon did not start: {line!r}")
        self.endpoint = line.split()[1]

    def sessions(self) -> int:
        """Open sessions other than the one this query opens."""
        with DeviceClient(self.endpoint, timeout=10.0) as client:
            return int(client.status()["sessions"]) - 1

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def daemon() -> Iterator[_Daemon]:
    d = _Daemon()
    try:
        yield d
    finally:
        d.stop()


def _closed_port() -> int:
    with socket.socket() as s:  # bound and closed again: nothing listens there
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_on_a_port_in_use_is_one_line(daemon: _Daemon, tmp_path: Path) -> None:
    proc = _run(["-m", "thermo_device.cli", "serve", "--bind", daemon.endpoint], tmp_path, timeout=120)
    _one_line(proc, "already in use", "--bind")


def test_serve_bind_without_a_port_is_one_line(tmp_path: Path) -> None:
    proc = _run(["-m", "thermo_device.cli", "serve", "--bind", "tcp://127.0.0.1"], tmp_path, timeout=120)
    _one_line(proc, "needs a host and a port", "tcp://127.0.0.1:5555")


def test_board_simulator_on_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    board = BoardProcess()
    try:
        port = board.address.rpartition(":")[2]
        proc = _run(["-m", "thermo_device.hardware.board_sim", "--port", port], tmp_path, timeout=120)
        _one_line(proc, "already in use", "--port")
    finally:
        board.stop()


def test_unreachable_board_is_one_line_naming_the_simulator(tmp_path: Path) -> None:
    proc = _run(["-m", "thermo_device.cli", "info", "--backend", "register", "--backend-option",
                 f"address=127.0.0.1:{_closed_port()}"], tmp_path, timeout=120)
    line = _one_line(proc, "[unreachable]", "board_sim")
    assert "[internal]" not in line


def test_misspelled_conformance_backend_is_one_usage_error(tmp_path: Path) -> None:
    proc = _run(["-m", "pytest", str(ROOT / "tests" / "conformance"), "--backend", "emulatr", "-q",
                 "-p", "no:cacheprovider"], tmp_path, timeout=300)
    # pytest's exit status for a usage error is 4
    _one_line(proc, "unknown backend 'emulatr'", "emulator", code=4)
    assert "failed" not in proc.stdout


def test_solve_on_the_8_cell_board_inverts_and_says_so(tmp_path: Path) -> None:
    import json

    proc = _run(["-m", "host.cli", "solve", "--device", "embedded:spu-8cell"], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["n"] == 8 and report["operation"].startswith("A^-1 (sampled")
    # the noise part and the declared systematic part are both printed, and the bound is their sum
    assert report["estimated_relative_error_bound"] == pytest.approx(
        report["estimated_relative_error_noise_part"] + report["declared_systematic_relative_error"])
    proc = _run(["-m", "host.cli", "solve", "--device", "embedded:spu-8cell", "--op", "solve"], tmp_path)
    _one_line(proc, "underdamped", "--op inverse")
    proc = _run(["-m", "host.cli", "solve", "--device", "embedded:spu-8cell", "--cond", "50"], tmp_path)
    _one_line(proc, "--cond 3")


def test_solve_help_shows_defaults(tmp_path: Path) -> None:
    proc = _run(["-m", "host.cli", "solve", "--help"], tmp_path, timeout=120)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())  # argparse wraps to the terminal's width
    assert "(default: 500.0)" in text and "(default: embedded:ideal)" in text


def test_max_sessions_has_help(tmp_path: Path) -> None:
    proc = _run(["-m", "thermo_device.cli", "serve", "--help"], tmp_path, timeout=120)
    text = " ".join(proc.stdout.split())
    assert "--max-sessions MAX_SESSIONS sessions open at once" in text


def test_connect_gives_a_context_manager_that_closes_its_session(daemon: _Daemon) -> None:
    import host

    with host.connect(daemon.endpoint, seed=0) as dev:
        assert dev.info()["cells"] > 0
        assert daemon.sessions() == 1  # this one
    assert daemon.sessions() == 0
    with host.connect("embedded:ideal") as emb:  # the in-process device has the same face
        assert emb.info()["cells"] > 0


def test_the_torch_optimizer_closes_its_device(daemon: _Daemon) -> None:
    import torch

    import host
    from host.torch_optimizer import TNGDOptimizer

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with TNGDOptimizer(model.parameters(), host.connect(daemon.endpoint, seed=0), lr=0.1) as opt:
        opt.step(model, x, y)
        assert daemon.sessions() == 1
    assert daemon.sessions() == 0


def test_train_against_a_daemon_closes_its_session(daemon: _Daemon, tmp_path: Path) -> None:
    assert daemon.sessions() == 0
    ok = _run(["-m", "host.cli", "train", "--device", daemon.endpoint, "--steps", "2", "--eval-every", "2",
               "--no-progress", "--checkpoint", "none"], tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert daemon.sessions() == 0
    # written under runs/ by default, nothing loose in the working directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert (tmp_path / "runs" / "digits-tngd.json").exists()
    # a failure while the optimizer is built (lr <= 0): one line, session closed
    bad = _run(["-m", "host.cli", "train", "--device", daemon.endpoint, "--steps", "2", "--lr=-1",
                "--no-progress"], tmp_path)
    _one_line(bad, "lr must be > 0")
    assert daemon.sessions() == 0
    # a failure mid-run (the checkpoint path is a directory: writing it fails at step 1): one line,
    # session closed
    (tmp_path / "adir").mkdir()
    bad = _run(["-m", "host.cli", "train", "--device", daemon.endpoint, "--steps", "3", "--no-progress",
                "--checkpoint-every", "1", "--checkpoint", str(tmp_path / "adir")], tmp_path)
    _one_line(bad, "adir", "--checkpoint")
    assert daemon.sessions() == 0


def test_a_time_stepping_profile_is_announced_in_one_line() -> None:
    from host.tasks_report import stepping_warning

    line = stepping_warning("embedded:noisy", None)
    assert line is not None and "\n" not in line and "time-steps" in line and "seconds per step" in line
    assert stepping_warning("embedded:ideal", None) is None
    assert stepping_warning("embedded:tngd-paper", None) is None
    # the daemon says it too when it starts on such a profile
    from thermo_device import load_profile
    from thermo_device.cli import _stepping_warning

    assert "time-steps" in (_stepping_warning(load_profile("noisy")) or "")
    assert _stepping_warning(load_profile("ideal")) is None


def test_first_step_is_reported_apart_from_the_mean_step_time() -> None:
    from host.tasks import RunRecord

    # step 1 took 5 s (numba's compilation), the next two 0.1 s each, 0.06 s of it in the emulator
    rec = RunRecord("t", "tngd", "tngd", {}, "embedded:ideal", steps=[0, 1, 2], loss=[1.0, 0.9, 0.8],
                    wall_s=[5.0, 5.1, 5.2], emulator_s=[4.9, 4.96, 5.02], analog_s=[0.0, 0.0, 0.0])
    s = rec.summary()
    assert s["first_step_ms"] == pytest.approx(5000.0)
    assert s["wall_ms_per_step"] == pytest.approx(100.0)
    assert s["emulator_ms_per_step"] == pytest.approx(60.0) and s["host_ms_per_step"] == pytest.approx(40.0)


def test_plot_and_table_say_what_tngd_noisy_is() -> None:
    from host.tasks_report import describe_run

    assert describe_run("tngd-noisy", "tngd", {"device_overrides": {"noise.kappa": 1e-3}}) == \
        "tngd-noisy (TNGD, device noise.kappa = 0.001)"
    assert describe_run("adam", "adam", {}) == "adam"
