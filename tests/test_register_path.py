"""The whole hardware path in separate processes: host -> daemon -> register driver -> link ->
simulated board; capability adaptation in host.TNGD; TNGD through the board equals TNGD on the
emulator within the board's declared precision and noise."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import host
from host.adapt import DriftAdapter, device_capabilities
from host.tngd import TNGD
from protocol import Capabilities, Dense, Diagonal, Factored
from protocol.errors import BusyError, CapacityError, UnsupportedError
from tests.test_wire_daemon import DaemonProcess
from thermo_device.hardware.board_sim import BoardProcess

ROOT = Path(__file__).resolve().parent.parent
BOARD_KAPPA = 1e-7  # small: the comparison is about quantization and plumbing, not thermal noise
TIMEOUT = 20.0


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    log = open(tmp_path_factory.mktemp("board") / "board.log", "ab")
    b = BoardProcess("--kappa", str(BOARD_KAPPA), log=log, cwd=str(ROOT))
    yield b
    b.stop()
    log.close()


@pytest.fixture(scope="module")
def daemon(board, tmp_path_factory):
    d = DaemonProcess(tmp_path_factory.mktemp("daemon") / "daemon.log", "--backend", "register",
                      "--backend-option", f"address={board.address}", "--backend-option", "timeout=10")
    yield d
    d.stop()


@pytest.fixture
def client(daemon):
    dev = host.connect(daemon.endpoint, seed=3, timeout=TIMEOUT)
    yield dev
    dev.close()


def _least_squares(n: int = 12, rows: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n))
    theta_true = rng.standard_normal(n)
    return x, x @ theta_true + 0.1 * rng.standard_normal(rows)


def test_register_backend_through_a_daemon(client) -> None:
    info = client.info()
    caps = Capabilities.from_info(info)
    assert caps.backend == "register" and caps.drift_forms == ("dense",) and caps.cells == 16
    assert caps.adc_bits == 14 and caps.deterministic
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    a = (q * np.linspace(1.0, 3.0, 8)) @ q.T
    b = rng.standard_normal(8)
    client.program(Dense(a), b)
    res = client.run(200.0, burn_in=20.0)
    x_star = np.linalg.solve(a, b)
    # noise is negligible (kappa 1e-7): the error is the declared systematic precision
    assert np.max(np.abs(res.mean - x_star)) <= caps.precision * np.max(np.abs(x_star))
    assert res.diagnostics["method"] == "register"
    # typed errors cross the wire unchanged
    with pytest.raises(UnsupportedError):
        client.program(Factored(np.ones((2, 8)), np.eye(2), 1.0), b)
    with pytest.raises(CapacityError):
        client.program(Dense(np.eye(17)), None)


def test_one_board_one_session(daemon, client) -> None:
    client.info()  # the first session owns the board
    with pytest.raises(BusyError):
        host.connect(daemon.endpoint, seed=4, timeout=TIMEOUT)


def test_host_adapts_to_declared_capabilities(client) -> None:
    caps = device_capabilities(client)
    adapt = DriftAdapter(caps)
    rng = np.random.default_rng(2)
    j, h = rng.standard_normal((5, 10)), np.diag(rng.uniform(0.5, 1.0, 5))
    dense = adapt(Factored(j, h, 0.3))
    assert isinstance(dense, Dense)
    np.testing.assert_allclose(dense.matrix, j.T @ h @ j + 0.3 * np.eye(10), rtol=1e-12, atol=1e-12)
    assert isinstance(adapt(Diagonal(np.arange(1.0, 5.0))), Dense)
    opt = TNGD(client, lr=0.1, analog_time=5.0, damping=0.1)
    with pytest.raises(CapacityError, match="16 cells"):  # refused on the host, before any traffic
        opt.step(np.ones(20), Factored(np.ones((3, 20)), np.eye(3), 0.0))
    assert opt.steps == 0


def test_tngd_through_the_board_matches_the_emulator(client) -> None:
    x, y = _least_squares()
    rows, n = x.shape
    lr, damping, t, burn = 0.5, 0.1, 30.0, 5.0
    curvature = Factored(x, np.eye(rows) / rows, 0.0)  # GGN of 0.5 mean (x theta - y)^2
    emu = host.connect("embedded:ideal", seed=3, overrides={"noise.kappa": 0.0})
    runs = {}
    for name, dev in (("emulator", emu), ("register", client)):
        opt = TNGD(dev, lr=lr, analog_time=t, damping=damping, burn_in=burn)
        theta = np.zeros(n)
        traj = []
        for _ in range(8):
            g = x.T @ (x @ theta - y) / rows
            theta = theta + opt.step(g, curvature)
            traj.append(theta.copy())
        runs[name] = (np.array(traj), opt.adapt.converted)
    emu_traj, reg_traj = runs["emulator"][0], runs["register"][0]
    assert runs["emulator"][1] == 0 and runs["register"][1] == 8  # converted to Dense only for the board
    caps = device_capabilities(client)
    # Bound: each step's direction may be off by precision * max|x_bar| (systematic) plus Z standard
    # errors of a window average, sqrt(2 kappa_host / (lambda_min^2 T)), kappa_host = kappa s^2 with
    # the range scale s <= 4 max(|g|, |x|) / headroom (sticky range). Errors add up over the steps
    # (theta moves by lr x_bar; the contraction of gradient descent only helps), so the bound on
    # theta after k steps is lr * sum of the per-step bounds.
    a = x.T @ x / rows + damping * np.eye(n)
    lam_min = np.linalg.eigvalsh(a)[0]
    budget, bounds, theta = 0.0, [], np.zeros(n)
    for k in range(len(emu_traj)):
        g = x.T @ (x @ theta - y) / rows
        step = (emu_traj[k] - theta) / lr
        s = 4.0 * max(np.max(np.abs(g)), np.max(np.abs(np.linalg.solve(a, g)))) / 0.5
        se = math.sqrt(2.0 * BOARD_KAPPA * s**2 / (lam_min**2 * (t - burn)))
        budget += lr * (caps.precision * np.max(np.abs(step)) + 5.0 * se)
        bounds.append(budget)
        theta = emu_traj[k]
    err = np.max(np.abs(reg_traj - emu_traj), axis=1)
    assert np.all(err <= np.array(bounds)), f"{err} vs {bounds}"
    loss = [0.5 * np.mean((x @ th - y) ** 2) for th in (emu_traj[-1], reg_traj[-1])]
    assert loss[1] < 0.05 * 0.5 * np.mean(y**2)  # the board trains
    print(f"max |theta_register - theta_emulator| per step: {err}; bound {np.array(bounds)}; losses {loss}")
