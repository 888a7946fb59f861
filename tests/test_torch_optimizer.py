"""host.torch_optimizer: torch.optim conventions, and agreement with the NumPy path."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch  # noqa: E402

import host
from host.baselines import ExactNGD
from host.curvature import torch_curvature
from host.torch_optimizer import NGDOptimizer, TNGDOptimizer  # noqa: E402
from protocol.errors import InvalidInputError

EXACT = {"noise.kappa": 0.0, "integrator.method": "exact"}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4)).double()


def _batches(k: int, b: int = 5):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 8, dtype=torch.float64, generator=g), torch.randint(0, 4, (b,), generator=g))
            for _ in range(k)]


def _vec(model: torch.nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


def _dev(kappa: float = 0.0):
    return host.connect("embedded:ideal", seed=0, overrides={**EXACT, "noise.kappa": kappa})


def _checkpoint_midway(opt: TNGDOptimizer, model: torch.nn.Module, batches: list) -> tuple[io.BytesIO, np.ndarray]:
    """Train on the first half of ``batches``, checkpoint, train on the rest: (checkpoint, final weights)."""
    half = len(batches) // 2
    for x, y in batches[:half]:
        opt.step(model, x, y)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for x, y in batches[half:]:
        opt.step(model, x, y)
    buf.seek(0)
    return buf, _vec(model)


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_state_dict_round_trip_continues_bit_for_bit(inner: str) -> None:
    # Short t keeps the device far from equilibrium, so the warm-start state matters: dropping it
    # from the checkpoint would change the continuation.
    kw = {"lr": 0.05, "analog_time": 2.0, "damping": 0.1, "burn_in": 1.0, "inner": inner}
    if inner == "sgd":
        kw["momentum"] = 0.5
    batches = _batches(6)
    model = _model()
    buf, expected = _checkpoint_midway(TNGDOptimizer(model.parameters(), _dev(), **kw), model, batches)
    ckpt = torch.load(buf, weights_only=True)  # a checkpoint loads without pickled code
    model2 = _model()
    model2.load_state_dict(ckpt["model"])
    opt2 = TNGDOptimizer(model2.parameters(), _dev(), **kw)  # a fresh device: state comes from ckpt
    opt2.load_state_dict(ckpt["opt"])
    for x, y in batches[3:]:
        opt2.step(model2, x, y)
    np.testing.assert_array_equal(_vec(model2), expected)
    assert isinstance(opt2.inner, torch.optim.Adam if inner == "adam" else torch.optim.SGD)
    assert opt2.state_dict()["extra"]["steps"] == 6


def test_a_checkpoint_with_the_device_snapshot_resumes_bit_for_bit_with_noise() -> None:
    # kappa > 0: the continuation depends on the device's noise stream, which only the snapshot
    # carries (the analog state alone would resume with a fresh stream, and differ)
    kw = {"lr": 0.05, "analog_time": 2.0, "damping": 0.1}
    batches = _batches(6)
    model = _model()
    buf, expected = _checkpoint_midway(TNGDOptimizer(model.parameters(), _dev(0.01), **kw), model, batches)
    for with_snapshot in (True, False):
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
        if not with_snapshot:
            ckpt["opt"]["extra"]["device_snapshot"] = None
        model2 = _model()
        model2.load_state_dict(ckpt["model"])
        opt2 = TNGDOptimizer(model2.parameters(), host.connect("embedded:ideal", seed=7, overrides={
            **EXACT, "noise.kappa": 0.01}), **kw)  # another seed: the snapshot decides
        opt2.load_state_dict(ckpt["opt"])
        for x, y in batches[3:]:
            opt2.step(model2, x, y)
        assert np.array_equal(_vec(model2), expected) is with_snapshot


def test_without_the_device_state_the_continuation_differs() -> None:
    # the control for the round-trip test: the device state is what carries the warm start
    kw = {"lr": 0.05, "analog_time": 2.0, "damping": 0.1, "burn_in": 1.0}
    batches = _batches(4)
    model, model2 = _model(), _model()
    opt = TNGDOptimizer(model.parameters(), _dev(), **kw)
    opt2 = TNGDOptimizer(model2.parameters(), _dev(), **kw)
    for x, y in batches[:3]:
        opt.step(model, x, y)
        opt2.step(model2, x, y)
    sd = opt.state_dict()
    sd["extra"]["device_state"] = torch.zeros(0, dtype=torch.float64)
    sd["extra"]["device_snapshot"] = None
    opt2.load_state_dict(sd)
    opt2.engine.device.state = np.zeros(sum(p.numel() for p in model2.parameters()))
    opt.step(model, *batches[3])
    opt2.step(model2, *batches[3])
    assert not np.allclose(_vec(model), _vec(model2))


def test_long_t_torch_step_equals_exact_ngd_step() -> None:
    x, y = _batches(1)[0]
    model, ref = _model(), _model()
    curv = torch_curvature(ref, x, y)
    delta = ExactNGD(0.1, 0.01).step(curv.grad, curv.drift())
    opt = TNGDOptimizer(model.parameters(), _dev(), lr=0.1, analog_time=3000.0, damping=0.01, burn_in=2999.0)
    before = _vec(model)
    loss = opt.step(model, x, y)
    assert float(loss) == pytest.approx(curv.loss)
    d = _vec(model) - before
    assert np.linalg.norm(d - delta) / np.linalg.norm(delta) < 1e-6
    ngd_model = _model()
    NGDOptimizer(ngd_model.parameters(), lr=0.1, damping=0.01).step(ngd_model, x, y)
    np.testing.assert_allclose(_vec(ngd_model) - before, delta, rtol=1e-10, atol=1e-14)


def test_param_groups_get_their_own_learning_rate() -> None:
    x, y = _batches(1)[0]
    model = _model()
    curv = torch_curvature(_model(), x, y)
    nat = ExactNGD(1.0, 0.01).direction(curv.grad, curv.drift())
    groups = [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.01}]
    opt = TNGDOptimizer(groups, _dev(), analog_time=3000.0, damping=0.01, burn_in=2999.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    before = _vec(model)
    opt.step(model, x, y)
    n0 = sum(p.numel() for p in model[0].parameters())
    d = _vec(model) - before
    np.testing.assert_allclose(d[:n0], -0.1 * nat[:n0], rtol=1e-6)
    np.testing.assert_allclose(d[n0:], -0.01 * nat[n0:], rtol=1e-6)
    # an LR scheduler edits our groups; the inner optimizer follows
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    opt.step(model, x, y)
    assert opt.inner.param_groups[0]["lr"] == pytest.approx(0.05)


def test_training_reduces_the_loss_and_lm_adapts_damping() -> None:
    from host.tngd import LevenbergMarquardt

    model = _model()
    x, y = _batches(1, b=20)[0]
    opt = TNGDOptimizer(model.parameters(), _dev(1e-6), lr=0.5, analog_time=50.0, damping=1.0,
                        lm=LevenbergMarquardt())
    losses = []
    for _ in range(15):
        losses.append(float(opt.step(model, x, y)))
        opt.adapt_damping(model, x, y)
    assert losses[-1] < 0.5 * losses[0]
    assert opt.damping < 1.0  # steps that do what the quadratic model predicts lower lambda


def test_step_refuses_a_model_that_does_not_hold_the_parameters() -> None:
    model = _model()
    opt = TNGDOptimizer(model.parameters(), _dev())
    x, y = _batches(1)[0]
    with pytest.raises(InvalidInputError):
        opt.step(_model(), x, y)
