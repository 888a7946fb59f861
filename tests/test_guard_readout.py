"""The host's stability guard and noise-aware readout (issue 13)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

import host
from host.guard import StabilityGuard
from host.readout_plan import estimated_rel_error, plan_readout, window_noise_variance
from protocol.device import RunResult
from protocol.drift import Diagonal, Factored
from protocol.errors import InvalidInputError, NotStableError
from thermo_device import Emulator, load_profile

THRESHOLD = 0.05  # the fake chip below realises an unstable drift for damping below this


class _FlakyChip(Emulator):
    """An emulator whose realised drift loses THRESHOLD - 0.01 of stability: below THRESHOLD
    damping it is unstable (reported, or raised when ``raises``), above it the margin shrinks."""

    def __init__(self, raises: bool = False) -> None:
        super().__init__(load_profile("ideal", {"noise.kappa": 1e-6}), seed=0)
        self.raises = raises
        self.dampings: list[float] = []

    def step(self, drift: Any, bias: Any, duration: float, **kw: Any) -> RunResult:
        self.dampings.append(drift.damping)
        margin = drift.damping - (THRESHOLD - 0.01)
        if drift.damping < THRESHOLD:
            if self.raises:
                raise NotStableError("realised drift is not positive-stable")
            res = super().step(drift, bias, duration, **kw)
            return replace(res, mean=np.full_like(res.mean, 1e3),
                           diagnostics={**res.diagnostics, "unstable": True, "stability_margin": margin - 0.01})
        res = super().step(drift, bias, duration, **kw)
        return replace(res, diagnostics={**res.diagnostics, "unstable": False, "stability_margin": margin})


def _problem(n: int = 12, m: int = 4, seed: int = 0) -> tuple[np.ndarray, Factored]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(n), Factored(rng.standard_normal((m, n)), np.eye(m))


@pytest.mark.parametrize("raises", [False, True])
def test_guard_retries_unstable_steps_and_keeps_a_floor(raises: bool) -> None:
    dev = _FlakyChip(raises)
    opt = host.TNGD(dev, lr=0.1, analog_time=20.0, damping=0.01)
    g, curv = _problem()
    opt.step(g, curv)
    # 0.01 -> 0.02 -> 0.04 (unstable) -> 0.08: three retries, the last attempt stable
    assert dev.dampings == pytest.approx([0.01, 0.02, 0.04, 0.08])
    assert opt.last.retries == 3 and opt.last.damping == pytest.approx(0.08)
    assert [e.reason for e in opt.state.guard_events] == ["unstable"] * 3
    assert opt.state.floor == pytest.approx(0.08) and opt.damping == 0.01  # LM's damping is the user's
    # the readout is the solution of the stable attempt, not the runaway one
    exact = np.linalg.solve(curv.dense() + 0.08 * np.eye(12), g)
    assert np.abs(opt.state.start).max() < 1e2
    x, opt.state = opt.engine.solve(opt.state, g, curv)
    assert np.linalg.norm(x - exact) < 0.5 * np.linalg.norm(exact)
    dev.dampings.clear()
    opt.step(g, curv)
    assert dev.dampings == pytest.approx([0.08]) and opt.last.retries == 0  # the floor holds


def test_guard_raises_the_floor_when_the_margin_is_thin() -> None:
    dev = _FlakyChip()
    opt = host.TNGD(dev, lr=0.1, analog_time=5.0, damping=0.06)  # stable, margin 0.02 < 0.5 * 0.06
    g, curv = _problem()
    opt.step(g, curv)
    assert opt.last.retries == 0 and opt.last.stability_margin == pytest.approx(0.02)
    assert [e.reason for e in opt.state.guard_events] == ["margin"]
    assert opt.state.floor == pytest.approx(0.06 + (0.03 - 0.02))
    opt.step(g, curv)
    assert dev.dampings[-1] == pytest.approx(0.07)


def test_guard_off_passes_the_error_through() -> None:
    opt = host.TNGD(_FlakyChip(raises=True), lr=0.1, analog_time=5.0, damping=0.01,
                    guard=StabilityGuard(enabled=False))
    with pytest.raises(NotStableError):
        opt.step(*_problem())


def test_ideal_device_is_untouched_by_the_guard() -> None:
    g, curv = _problem()
    on = host.TNGD(host.connect("embedded:ideal", seed=3), lr=0.1, analog_time=5.0, damping=0.01)
    off = host.TNGD(host.connect("embedded:ideal", seed=3), lr=0.1, analog_time=5.0, damping=0.01,
                    guard=StabilityGuard(enabled=False))
    for _ in range(3):
        assert np.array_equal(on.step(g, curv), off.step(g, curv))
    assert on.state.guard_events == () and on.state.floor == 0.0


def test_window_noise_variance_limits() -> None:
    kappa, a = 0.3, 2.0
    assert window_noise_variance(a, kappa, 1e6) == pytest.approx(2 * kappa / (a * a * 1e6), rel=1e-5)
    assert window_noise_variance(a, kappa, 1e-6) == pytest.approx(2 * kappa * 1e-6 / 3, rel=1e-5)
    assert window_noise_variance(a, kappa, 0.0) == pytest.approx(kappa / a)


def test_window_noise_variance_matches_the_emulator() -> None:
    """Var of the window average from a fixed start, over independent exact runs, against v(a, T):
    the sample variance of K Gaussian draws has relative standard error sqrt(2 / (K - 1))."""
    rates = np.array([0.05, 0.5, 5.0])
    kappa, window, k = 0.01, 8.0, 400
    # dense ADC grid so the discrete average is close to the continuous one (error O(a h) <= 5e-3)
    emu = Emulator(load_profile("ideal", {"noise.kappa": kappa, "adc.sample_interval": 0.001}), seed=1)
    emu.program(Diagonal(rates), np.zeros(3))
    means = np.array([emu.run(window, reset=True).mean for _ in range(k)])
    var = means.var(axis=0, ddof=1)
    theory = window_noise_variance(rates, kappa, window)
    z = (var / theory - 1.0) / math.sqrt(2.0 / (k - 1))
    assert np.all(np.abs(z) < 3.5), (var, theory, z)


def test_plan_readout_meets_its_target_and_is_honest() -> None:
    n, damping, kappa, x_norm = 200, 0.1, 1e-3, 5.0
    total, burn, est = plan_readout(0.05, x_norm, n, damping, kappa, max_time=1e5)
    assert 0.0 < burn < total and est <= 0.025 * (1 + 1e-9)
    assert math.exp(-damping * burn) <= 0.025 * (1 + 1e-9)
    # a shorter window would miss the noise half of the target
    assert estimated_rel_error(x_norm, n, damping, kappa, 0.9 * (total - burn)) > 0.025
    with pytest.raises(InvalidInputError):
        host.TNGD(host.connect("embedded:ideal"), lr=0.1, analog_time="auto", damping=0.1, target_rel_error=0.0)


def test_auto_readout_reaches_the_target_on_a_noisy_device() -> None:
    """TNGD with analog_time='auto' on a device with kappa 1e-3: the step's x_bar is within the
    target of the exact damped solution (the estimate takes every mode at the slowest rate, an
    upper bound), and the reported estimate is the planned half of the target."""
    rng = np.random.default_rng(5)
    n, m = 40, 6
    j = rng.standard_normal((m, n)) / math.sqrt(n)
    g = rng.standard_normal(n)
    damping = 0.2
    dev = host.connect("embedded:ideal", seed=2, overrides={"noise.kappa": 1e-3})
    # the base readout (50 tau) misses a target of 0.4 %, so the plan decides
    opt = host.TNGD(dev, lr=1.0, analog_time="auto", damping=damping, target_rel_error=0.004)
    curv = Factored(j, np.eye(m))
    exact = np.linalg.solve(curv.dense() + damping * np.eye(n), g)
    errs = []
    for _ in range(4):
        planned_norm = opt.state.x_norm  # the plan sizes the window for the previous |x_bar|
        x, opt.state = opt.engine.solve(opt.state, g, curv)
        errs.append(np.linalg.norm(x - exact) / np.linalg.norm(exact))
    assert max(errs) < 0.004, errs
    # the plan meets half the target for |x_bar| = planned_norm; the report divides the same noise
    # by this step's |x_bar| (same kappa: the temperature does not drift on the ideal profile)
    assert opt.last.est_rel_error is not None
    assert opt.last.est_rel_error <= 0.002 * planned_norm / opt.state.x_norm * (1 + 1e-9)
    assert opt.last.burn_in > 0 and opt.last.analog_time > opt.last.burn_in


def test_auto_readout_keeps_the_base_time_on_a_quiet_device() -> None:
    """On the ideal chip (kT/C noise) the base readout meets any sane target: 'auto' runs exactly
    the fixed readout, bit for bit."""
    g, curv = _problem()
    fixed = host.TNGD(host.connect("embedded:ideal", seed=1), lr=0.1, analog_time=50.0, damping=0.01)
    auto = host.TNGD(host.connect("embedded:ideal", seed=1), lr=0.1, analog_time="auto", damping=0.01)
    for _ in range(3):
        assert np.array_equal(fixed.step(g, curv), auto.step(g, curv))
    assert (auto.last.analog_time, auto.last.burn_in) == (50.0, 0.0)
    assert auto.last.est_rel_error is not None and auto.last.est_rel_error < 1e-3


def test_offset_cancellation_removes_the_cells_offsets() -> None:
    """Op-amp offsets o add A^-1 o to every solve; solving with g and -g and halving the
    difference removes it. Offsets of 50 mV (against 1 V) dominate the error without it."""
    rng = np.random.default_rng(8)
    n, m, damping = 10, 3, 0.5
    j = rng.standard_normal((m, n)) / math.sqrt(n)
    g = 0.3 * rng.standard_normal(n)
    curv = Factored(j, np.eye(m))
    exact = np.linalg.solve(curv.dense() + damping * np.eye(n), g)
    errs = {}
    for cancel in (False, True):
        dev = host.connect("embedded:ideal", seed=4, overrides={"mismatch.offset_V_std": 0.05})
        opt = host.TNGD(dev, lr=1.0, analog_time=60.0, burn_in=40.0, damping=damping, offset_cancel=cancel)
        x, opt.state = opt.engine.solve(opt.state, g, curv)
        errs[cancel] = np.linalg.norm(x - exact) / np.linalg.norm(exact)
    # without: the offsets' solution, |A^-1 o| / |A^-1 g| ~ 0.05 / 0.3; with: the 40-tau transient
    # e^{-0.5 * 40} and kT/C noise only
    assert errs[False] > 0.02 and errs[True] < 1e-6, errs


def test_refinement_removes_the_converter_error() -> None:
    """A 6-bit bias DAC leaves a few % of error in x_bar; passes of iterative refinement on the
    host's exact residual shrink it by about that factor each (until the noise floor)."""
    rng = np.random.default_rng(9)
    n, m, damping = 40, 5, 0.5
    j = rng.standard_normal((m, n)) / math.sqrt(n)
    g = rng.standard_normal(n) * np.logspace(0, -3, n)
    curv = Factored(j, np.eye(m))
    exact = np.linalg.solve(curv.dense() + damping * np.eye(n), g)
    errs = {}
    for passes in (0, 1, 2):
        dev = host.connect("embedded:ideal", seed=4, overrides={"dac.bits": 6, "range.auto": True})
        opt = host.TNGD(dev, lr=1.0, analog_time=60.0, burn_in=40.0, damping=damping, refine=passes)
        x, opt.state = opt.engine.solve(opt.state, g, curv)
        errs[passes] = np.linalg.norm(x - exact) / np.linalg.norm(exact)
    assert errs[0] > 0.05 and errs[1] < errs[0] / 3 and errs[2] < errs[1] / 3, errs
    with pytest.raises(InvalidInputError):
        host.TNGD(host.connect("embedded:ideal"), lr=0.1, analog_time=5.0, damping=0.1, refine=-1)


def test_auto_refinement_follows_the_declared_dac() -> None:
    """refine="auto": the fewest passes for the DAC's bits to reach AUTO_REFINE_BITS, read from
    what the device declares (an ideal DAC or a 16-bit one needs none, the noisy chip's 8 bits one)."""
    from host.tngd_core import AUTO_REFINE_BITS, TNGDCore, auto_refine_passes

    assert [auto_refine_passes(b) for b in (0, 3, 4, 5, 6, 8, 11, 12, 16)] == [0, 3, 2, 2, 1, 1, 1, 0, 0]
    for b in range(1, AUTO_REFINE_BITS):
        k = auto_refine_passes(b)
        assert (k + 1) * b >= AUTO_REFINE_BITS > k * b
    for profile, passes in (("ideal", 0), ("noisy", 1), ("tngd-paper", 0)):
        assert TNGDCore(Emulator(load_profile(profile)), analog_time="auto", refine="auto").refine == passes
    with pytest.raises(InvalidInputError, match="refine"):
        TNGDCore(Emulator(load_profile("ideal")), analog_time="auto", refine="always")


def test_auto_offset_cancellation_decides_from_the_first_solve() -> None:
    """offset_cancel="auto": the noisy chip's 2 mV offsets show in the bias-independent half of
    the first solve and cancellation stays on (two runs per solve); a chip that declares a
    systematic error but has no offsets (tngd-paper) turns it off after the first solve; the ideal
    chip (precision 0) never pays the second run."""
    from host.tngd_core import TNGDCore

    rng = np.random.default_rng(3)
    j = rng.standard_normal((6, 40)) / 6.0
    curv = host.Factored(j, np.eye(6))
    # gradients in J's row space (as a network's mostly are), where the curvature damps them,
    # while the offsets reach the flat directions that 1 / lambda amplifies
    grads = [j.T @ rng.standard_normal(6) for _ in range(3)]
    for profile, decided, runs_later in (("noisy", True, 2), ("tngd-paper", False, 1), ("ideal", None, 1)):
        core = TNGDCore(Emulator(load_profile(profile), seed=0), analog_time=50.0, offset_cancel="auto")
        st = core.init(0.01)
        times = []
        for g in grads:
            _, st = core.solve(st, g, curv)
            times.append(st.stats.analog_time_s)
        assert st.offsets is decided, profile
        tau = Emulator(load_profile(profile)).info()["tau_s"]
        assert times[0] == pytest.approx((1 if decided is None else 2) * 50.0 * tau, rel=0.05)  # the first solve
        assert times[-1] == pytest.approx(runs_later * 50.0 * tau, rel=0.05)
    with pytest.raises(InvalidInputError, match="offset_cancel"):
        TNGDCore(Emulator(load_profile("ideal")), analog_time=50.0, offset_cancel="sometimes")
