"""host.tngd_core: the one TNGD step both front ends run, over explicit state and checkpoints."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import host
from host.curvature import Curvature
from host.tngd import TNGD
from host.tngd_core import DeviceCheckpoint, LevenbergMarquardt, TNGDCore, TNGDState
from host.torch_optimizer import TNGDOptimizer
from protocol.drift import Factored
from protocol.errors import InvalidInputError, UnsupportedError

EXACT = {"noise.kappa": 0.0, "integrator.method": "exact"}


def _dev(kappa: float = 0.0, seed: int = 0):
    return host.connect("embedded:ideal", seed=seed, overrides={**EXACT, "noise.kappa": kappa})


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4)).double()


def _batches(k: int, b: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 8, dtype=torch.float64, generator=g), torch.randint(0, 4, (b,), generator=g))
            for _ in range(k)]


def _vec(model: torch.nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


def test_solve_takes_and_returns_state_without_mutating_it() -> None:
    rng = np.random.default_rng(0)
    lm = LevenbergMarquardt()
    core = TNGDCore(_dev(), analog_time=3.0, delay=0.5, lm=lm)
    s0 = core.init(0.1)
    curv = Factored(rng.standard_normal((4, 10)), np.eye(4))
    x1, s1 = core.solve(s0, rng.standard_normal(10), curv)
    assert (s0.steps, s0.stats.analog_time_s) == (0, 0.0)  # the old state is untouched
    assert s1.steps == 1 and s1.damping == 0.1 and s1.stats.damping == 0.1 and x1.shape == (10,)
    s2 = core.record(s1, np.ones(10), -x1, curv, loss=2.0)
    assert s1.last is None and s2.last is not None and s2.last.loss == 2.0
    s3, rho = core.lm_update(s2, None, 1.9)  # the loss recorded with the step is the "before"
    assert (s3.damping, rho) == lm.update(0.1, 2.0, 1.9, np.ones(10), -x1, curv)
    assert s2.damping == 0.1


def test_numpy_and_torch_front_ends_run_the_same_step() -> None:
    # One implementation: the torch optimizer with plain SGD moves theta by exactly what host.TNGD
    # returns for the same gradient and curvature on an identically seeded device (warm start, delay).
    kw = {"lr": 0.05, "analog_time": 2.0, "damping": 0.1, "delay": 0.3, "burn_in": 1.0}
    model, ref = _model(), _model()
    opt = TNGDOptimizer(model.parameters(), _dev(1e-3), **kw)
    tngd = TNGD(_dev(1e-3), **kw)
    theta = _vec(ref)
    for x, y in _batches(3):
        before = _vec(model)
        opt.step(model, x, y)
        curv = opt.last_curvature
        assert curv is not None
        delta = tngd.step(curv.grad, Factored(curv.J, curv.H))
        np.testing.assert_allclose(_vec(model) - before, delta, rtol=1e-12, atol=1e-15)
        theta = theta + delta
    assert opt.tngd_state.steps == tngd.steps == 3


def test_torch_step_builds_the_curvature_drift_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = Curvature.drift

    def counting(self: Curvature, damping: float = 0.0) -> Factored:
        calls.append(damping)
        return original(self, damping)

    monkeypatch.setattr(Curvature, "drift", counting)
    model = _model()
    opt = TNGDOptimizer(model.parameters(), _dev(), analog_time=2.0, lm=LevenbergMarquardt())
    for x, y in _batches(2):
        opt.step(model, x, y)
        opt.adapt_damping(model, x, y)
    assert calls == [0.0, 0.0]


def test_a_loaded_checkpoint_saved_again_before_a_step_keeps_the_device_state() -> None:
    # The loaded device state waits in the state's ``pending`` until the next solve; saving in
    # between must save it, not the fresh device's state.
    kw = {"lr": 0.05, "analog_time": 2.0, "damping": 0.1, "burn_in": 1.0}
    batches = _batches(5)
    model = _model()
    opt = TNGDOptimizer(model.parameters(), _dev(0.01), **kw)
    for x, y in batches[:3]:
        opt.step(model, x, y)
    sd = opt.state_dict()
    model2 = _model()
    model2.load_state_dict(model.state_dict())
    opt2 = TNGDOptimizer(model2.parameters(), _dev(0.01, seed=9), **kw)
    opt2.load_state_dict(sd)
    again = opt2.state_dict()
    assert torch.equal(again["extra"]["device_state"], sd["extra"]["device_state"])
    model3 = _model()
    model3.load_state_dict(model.state_dict())
    opt3 = TNGDOptimizer(model3.parameters(), _dev(0.01, seed=11), **kw)
    opt3.load_state_dict(again)
    for x, y in batches[3:]:
        opt.step(model, x, y)
        opt3.step(model3, x, y)
    np.testing.assert_array_equal(_vec(model3), _vec(model))


class _NoSnapshot:
    """A device that declares snapshots unsupported (as a board without them would)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def info(self) -> dict[str, Any]:
        return self._inner.info()

    def capabilities(self) -> Any:
        return self._inner.capabilities()

    def status(self) -> dict[str, Any]:
        return self._inner.status()

    def program(self, drift: Any, bias: Any = None) -> None:
        self._inner.program(drift, bias)

    def run(self, duration: float, **kw: Any) -> Any:
        return self._inner.run(duration, **kw)

    def step(self, drift: Any, bias: Any, duration: float, **kw: Any) -> Any:
        return self._inner.step(drift, bias, duration, **kw)

    @property
    def state(self) -> np.ndarray:
        return self._inner.state

    @state.setter
    def state(self, value: np.ndarray) -> None:
        self._inner.state = value

    def snapshot(self) -> Any:
        raise UnsupportedError("no snapshots on this device")

    def restore(self, snapshot: Any) -> None:
        raise UnsupportedError("no snapshots on this device")

    def close(self) -> None:
        self._inner.close()


def test_a_device_without_snapshots_checkpoints_its_analog_state() -> None:
    core = TNGDCore(_NoSnapshot(_dev()), analog_time=2.0)  # type: ignore[arg-type]
    _, state = core.solve(core.init(0.1), np.ones(6), Factored(np.eye(3, 6), np.eye(3)))
    saved = core.capture(state)
    assert saved.pending is not None and saved.pending.snapshot is None
    np.testing.assert_array_equal(saved.pending.state, core.device.state)
    # restoring it sets the warm start and clears the pending checkpoint
    core2 = TNGDCore(_NoSnapshot(_dev()), analog_time=2.0)  # type: ignore[arg-type]
    _, after = core2.solve(saved, np.ones(6), Factored(np.eye(3, 6), np.eye(3)))
    assert after.pending is None and after.steps == 2


def test_before_any_solve_nothing_of_the_device_is_saved() -> None:
    core = TNGDCore(_dev(), analog_time=1.0)
    assert core.capture(core.init(0.5)).pending is None
    loaded = TNGDState(steps=4, damping=0.5, pending=DeviceCheckpoint(np.zeros(3), None))
    assert core.capture(loaded).pending is loaded.pending


def test_the_core_refuses_bad_settings_and_early_lm() -> None:
    with pytest.raises(InvalidInputError):
        TNGDCore(_dev(), analog_time=1.0, delay=-1.0)
    with pytest.raises(InvalidInputError):
        TNGDCore(_dev(), analog_time=1.0).init(-0.1)
    core = TNGDCore(_dev(), analog_time=1.0, lm=LevenbergMarquardt())
    with pytest.raises(InvalidInputError, match="before any step"):
        core.lm_update(core.init(0.1), 1.0, 0.5)
    with pytest.raises(InvalidInputError):
        core.solve(core.init(0.1), np.ones(3), np.eye(3))  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        TNGDOptimizer(_model().parameters(), _dev(), lr=0.0)
