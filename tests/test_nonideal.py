"""Non-ideality models: each one's statistical signature, and all of them off = the ideal device."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

import host
from protocol.drift import Dense, Diagonal, Factored
from protocol.errors import InvalidInputError
from tests.conftest import spd_matrix
from thermo_device import Emulator, load_profile
from thermo_device.converters import quantize
from thermo_device.noise import K_BOLTZMANN, flicker_poles

# Every non-ideality key at its "off" value, with a chip id and temperature set that must not
# matter when all spreads and coefficients are zero.
ALL_OFF = {
    "mismatch.seed": 12345, "mismatch.coupling_rel_std": 0.0, "mismatch.capacitance_rel_std": 0.0,
    "mismatch.gain_rel_std": 0.0, "mismatch.offset_V_std": 0.0, "dac.bits": 0, "coupling.bits": 0,
    "adc.bits": 0, "adc.read_noise_std": 0.0, "range.auto": False, "range.rail": 0.0,
    "noise.injected_kappa": 0.0, "noise.flicker_corner": 0.0, "temperature.ramp_K_per_tau": 0.0,
    "temperature.walk_K_per_sqrt_tau": 0.0, "temperature.conductance_tempco_per_K": 0.0,
    "temperature.capacitance_tempco_per_K": 0.0, "noise.kappa": 0.02, "integrator.dt": 0.01,
    "integrator.variance_tol": 0.0,
}


def _sequence(emu: Emulator) -> np.ndarray:
    a, _ = spd_matrix(12, 8.0, seed=1)
    rng = np.random.default_rng(3)
    b = rng.standard_normal(12)
    out = []
    emu.program(Dense(a), b)
    r = emu.run(30.0, burn_in=5.0, samples=3, second_moment=True)
    out += [r.mean, r.samples.ravel(), r.second_moment.ravel()]
    emu.program(Factored(rng.standard_normal((3, 12)), np.eye(3), 0.5), b)
    out += [emu.run(10.0, delay=1.0).mean, emu.state]
    return np.concatenate(out)


@pytest.mark.parametrize("method", ["exact", "heun"])
def test_all_models_off_is_the_ideal_device_bitwise(method: str) -> None:
    ideal = Emulator(load_profile("ideal", {"noise.kappa": 0.02, "integrator.method": method}), seed=4)
    off = Emulator(load_profile("noisy", {**ALL_OFF, "integrator.method": method}), seed=4)
    assert np.array_equal(_sequence(ideal), _sequence(off))


def test_equilibrium_variance_scales_linearly_with_temperature() -> None:
    """kappa = k_B T / C: the stationary variance kappa / a of independent cells is linear in T."""
    d = np.linspace(1.0, 2.0, 16)
    n = 3000
    variances = {}
    for temp in (150.0, 300.0, 600.0):
        emu = Emulator(load_profile("ideal", {"noise.temperature_K": temp, "temperature.reference_K": temp,
                                              "noise.capacitance_F": 1e-15, "adc.sample_interval": 4.0}), seed=1)
        emu.program(Diagonal(d), np.zeros(16))
        emu.run(20.0, burn_in=20.0)
        s = emu.run(4.0 * n, samples=n).samples
        variances[temp] = np.mean(s.var(axis=0, ddof=1) * d)  # estimates kappa, pooled over cells
        kappa = K_BOLTZMANN * temp / 1e-15
        # pooled over 16 independent cells: relative sd sqrt(2 / (16 (n - 1)))
        assert abs(variances[temp] / kappa - 1.0) < 4.5 * np.sqrt(2 / (16 * (n - 1)))
    assert variances[600.0] > variances[300.0] > variances[150.0]


def test_injected_noise_adds_to_thermal() -> None:
    p = load_profile("ideal", {"noise.injected_kappa": 0.01})
    assert Emulator(p).kappa == pytest.approx(0.01 + K_BOLTZMANN * 300.0 / 1e-9)


def test_temperature_drift_is_reported_and_tempcos_move_the_time_constant() -> None:
    a, _ = spd_matrix(6, 4.0, seed=2)
    b = np.ones(6)
    emu = Emulator(load_profile("ideal", {"noise.kappa": 0.0, "noise.temperature_K": 310.0,
                                          "temperature.ramp_K_per_tau": 0.5,
                                          "temperature.conductance_tempco_per_K": 0.01,
                                          "temperature.update_interval": 0.1}), seed=0)
    emu.program(Dense(a), b)
    r = emu.run(0.4)
    assert r.diagnostics["temperature_K_start"] == 310.0
    assert r.diagnostics["temperature_K_end"] == pytest.approx(310.2)
    # rate multiplier g = 1 + 0.01 (T - 300), held per 0.1 tau chunk (one ADC interval):
    # x(t) = e^{-A sum(g_k) 0.1} (x0 - x*) + x*
    g = 1.0 + 0.01 * (310.0 + 0.5 * 0.1 * np.arange(4) - 300.0)
    x_star = np.linalg.solve(a, b)
    expected = scipy.linalg.expm(-a * 0.1 * g.sum()) @ (0.0 - x_star) + x_star
    np.testing.assert_allclose(r.state, expected, rtol=1e-9, atol=1e-12)
    # uniform tempcos are ratiometric: the stationary solution does not move
    np.testing.assert_allclose(emu.run(200.0).state, x_star, rtol=1e-8)


def _mismatched_solution(std: float, chip: int, n: int = 10) -> tuple[np.ndarray, np.ndarray]:
    a, _ = spd_matrix(n, 5.0, seed=7)
    b = np.random.default_rng(8).standard_normal(n)
    emu = Emulator(load_profile("ideal", {"noise.kappa": 0.0, "mismatch.seed": chip,
                                          "mismatch.coupling_rel_std": std}), seed=chip + 1)
    emu.program(Dense(a), b)
    return emu.run(100.0).state, np.linalg.solve(a, b)


def test_same_chip_same_bias_other_chip_other_bias() -> None:
    x1, x_star = _mismatched_solution(0.01, chip=1)
    x1b, _ = _mismatched_solution(0.01, chip=1)
    x2, _ = _mismatched_solution(0.01, chip=2)
    np.testing.assert_array_equal(x1, x1b)
    assert np.linalg.norm(x1 - x_star) > 1e-4 * np.linalg.norm(x_star)
    assert np.linalg.norm(x1 - x2) > 0.2 * np.linalg.norm(x1 - x_star)


def test_solution_bias_grows_linearly_with_mismatch_spread() -> None:
    """First-order perturbation: bias = -A^-1 (Delta o A) x* is linear in the spread; the same chip
    draws the same normals, so doubling the spread doubles the bias up to O(spread^2)."""
    biases = []
    for std in (0.005, 0.01, 0.02, 0.04):
        x, x_star = _mismatched_solution(std, chip=3)
        biases.append(np.linalg.norm(x - x_star) / np.linalg.norm(x_star))
    ratios = np.array(biases[1:]) / np.array(biases[:-1])
    assert np.all((ratios > 1.8) & (ratios < 2.2)), ratios


def test_mismatch_makes_factored_arrays_asymmetric_and_steps() -> None:
    rng = np.random.default_rng(0)
    j, g = rng.standard_normal((4, 20)), rng.standard_normal(20)
    emu = Emulator(load_profile("ideal", {"noise.kappa": 0.0, "mismatch.coupling_rel_std": 0.02,
                                          "integrator.method": "auto"}))
    emu.program(Factored(j, np.eye(4), 1.0), g)
    r = emu.run(60.0)
    assert r.diagnostics["method"] == "heun"
    x_star = np.linalg.solve(j.T @ j + np.eye(20), g)
    err = np.linalg.norm(r.state - x_star) / np.linalg.norm(x_star)
    assert 1e-4 < err < 0.1
    exact = Emulator(load_profile("ideal", {"mismatch.coupling_rel_std": 0.02}))
    with pytest.raises(Exception, match="auto"):
        exact.program(Factored(j, np.eye(4), 1.0), g)


def test_adc_levels_and_clipping() -> None:
    emu = Emulator(load_profile("ideal", {"noise.kappa": 0.3, "adc.bits": 3}), seed=2)
    emu.program(Diagonal(np.ones(4)), np.array([0.0, 0.5, 2.0, -3.0]))
    r = emu.run(200.0, burn_in=10.0, samples=2000)
    assert len(np.unique(r.samples)) <= 2**3
    assert r.samples.max() <= 0.75 + 1e-12 and r.samples.min() >= -1.0  # two's complement codes
    assert r.diagnostics["adc_clipped_fraction"] > 0.2  # cells 3 and 4 sit beyond full scale
    assert r.diagnostics["adc_effective_bits"] < 3.0 + 1e-9


def test_dac_quantizes_the_bias() -> None:
    a, _ = spd_matrix(5, 3.0, seed=4)
    b = np.array([0.11, -0.37, 0.52, 0.05, -0.8])
    emu = Emulator(load_profile("ideal", {"noise.kappa": 0.0, "dac.bits": 4}))
    emu.program(Dense(a), b)
    bq, _ = quantize(b, 4, 1.0)
    np.testing.assert_allclose(emu.run(100.0).state, np.linalg.solve(a, bq), rtol=1e-9)
    assert not np.allclose(bq, b)


def test_stochastic_rounding_is_unbiased() -> None:
    x = np.full(20000, 0.3)
    q, _ = quantize(x, 4, 1.0, "stochastic", np.random.default_rng(0))
    step = 2.0 / 16
    # Bernoulli rounding between two codes: sd of the mean = step sqrt(p (1 - p) / n)
    p = (0.3 / step) % 1.0
    assert abs(q.mean() - 0.3) < 4.5 * step * np.sqrt(p * (1 - p) / x.size)
    assert len(np.unique(q)) == 2


def test_rails_clip_and_are_reported() -> None:
    emu = Emulator(load_profile("ideal", {"noise.kappa": 1e-4, "range.rail": 1.0, "integrator.method": "auto"}))
    emu.program(Diagonal(np.ones(3)), np.array([0.2, 2.0, -1.5]))
    r = emu.run(30.0, burn_in=10.0, samples=50)
    # a symmetric drift is exact while the rails are out of reach (rails.RailGuard); here two
    # fixed points lie beyond them, so the run is stepped with clipping
    assert r.diagnostics["method"] == "exact" and r.diagnostics["stepped_for_rails"]
    assert np.abs(r.samples).max() <= 1.0
    assert r.mean[1] == pytest.approx(1.0, abs=1e-3) and r.mean[2] == pytest.approx(-1.0, abs=1e-3)
    assert r.mean[0] == pytest.approx(0.2, abs=0.01)
    assert 0.3 < r.diagnostics["rail_clipped_fraction"] < 0.7  # two of three cells at the rail


def test_auto_range_keeps_a_large_problem_inside_the_rails() -> None:
    a, _ = spd_matrix(6, 4.0, seed=5)
    b = 40.0 * np.random.default_rng(1).standard_normal(6)
    emu = Emulator(load_profile("ideal", {"noise.kappa": 1e-8, "range.rail": 1.0, "range.auto": True,
                                          "integrator.method": "auto"}))
    emu.program(Dense(a), b)
    r = emu.run(60.0, burn_in=20.0)
    assert r.diagnostics["range_scale"] > 10.0
    assert r.diagnostics["rail_clipped_fraction"] == 0.0
    # noise is physical: in host units it is kappa s^2; the 40 tau average has per-coordinate
    # variance about 2 kappa_host (A^-2)_ii / T
    kappa_host = r.diagnostics["kappa"]
    assert kappa_host == pytest.approx(1e-8 * r.diagnostics["range_scale"] ** 2)
    sd = np.sqrt(2 * kappa_host / 40.0 * np.diag(np.linalg.matrix_power(np.linalg.inv(a), 2)))
    assert np.max(np.abs(r.mean - np.linalg.solve(a, b)) / sd) < 4.5


def test_flicker_poles_match_white_psd_at_corner_and_raise_variance() -> None:
    poles = flicker_poles(0.01, 0.1, 0.01, 4)
    w = 2 * np.pi * 0.1
    psd = np.sum(2 * poles.variance * poles.rates / (poles.rates**2 + w**2))
    assert psd == pytest.approx(2 * 0.01)
    # A cell with rate a driven by white noise and by the OU poles (each independent):
    # Var(x) = kappa / a + sum_p v / (a (a + g_p))
    a_rate = 1.0
    n = 2500
    emu = Emulator(load_profile("ideal", {"noise.kappa": 0.01, "noise.flicker_corner": 0.1,
                                          "noise.flicker_min_freq": 0.01, "noise.flicker_poles": 4,
                                          "integrator.method": "auto", "integrator.dt": 0.05,
                                          "adc.sample_interval": 50.0}), seed=3)
    emu.program(Diagonal(np.full(8, a_rate)), np.zeros(8))
    emu.run(200.0, burn_in=200.0)
    s = emu.run(50.0 * n, samples=n).samples
    var_theory = 0.01 / a_rate + np.sum(poles.variance / (a_rate * (a_rate + poles.rates)))
    assert var_theory > 1.5 * 0.01  # the flicker part is not negligible
    # samples 50 tau apart: the slowest pole (rate 0.063) still correlates them by e^{-3.1} = 4 %:
    # use an effective sample count halved for the bound
    est = s.var(axis=0, ddof=1).mean()
    assert abs(est / var_theory - 1.0) < 4.5 * np.sqrt(2 / (8 * n / 2))


def test_calibration_brings_the_noisy_profile_down_to_its_noise_floor() -> None:
    """Uncalibrated, the percent-level mismatch shows far above the solve's own statistical error
    (its ensemble estimate, a standard error); calibrated, what is left is within 3 of them.
    (A fixed ratio such as 5x is not a bound: the calibrated error is noise, 0.003-0.009 over
    seeds and steps for an estimate of 0.006.)"""
    a, _ = spd_matrix(16, 10.0, seed=1)
    b = np.random.default_rng(0).standard_normal(16)
    x_star = np.linalg.solve(a, b)
    overrides = {"coupling.rounding": "stochastic", "dac.rounding": "stochastic"}
    errors, noise = {}, {}
    for calibrated in (False, True):
        emu = Emulator(load_profile("noisy", overrides), seed=0)
        if calibrated:
            summary = emu.calibrate(16)
            assert summary["n"] == 16 and emu.info()["calibrated_sizes"] == [16]
        res = host.solve(a, b, duration=32 * 200.0, burn_in=20.0, batches=32, ensemble=True, device=emu)
        errors[calibrated] = np.linalg.norm(res.value - x_star) / np.linalg.norm(x_star)
        noise[calibrated] = res.rel_error_estimate
    assert errors[False] > 3.0 * noise[False], (errors, noise)  # mismatch shows above the noise
    assert errors[True] < 3.0 * noise[True], (errors, noise)


def test_calibrate_restores_program_and_state() -> None:
    a, _ = spd_matrix(4, 3.0, seed=9)
    emu = Emulator(load_profile("ideal", {"noise.kappa": 0.0, "mismatch.coupling_rel_std": 0.01}))
    emu.program(Dense(a), np.ones(4))
    emu.run(0.5)
    before = emu.state
    emu.calibrate(4, duration=50.0)
    np.testing.assert_array_equal(emu.state, before)
    x = emu.run(100.0).state
    assert np.linalg.norm(x - np.linalg.solve(a, np.ones(4))) < 0.1  # still the user's drift


def test_offset_calibration_cancels_offsets_for_factored_drifts() -> None:
    """calibrate(n, what="offsets"): one Diagonal(1) run at b = 0 measures the cells' offsets, and
    every later program of that size (here Factored, with coupling mismatch: Heun) subtracts them.
    With a DAC fine enough to write the correction (16 bits), the error against A^-1 g falls from
    the offsets' 0.24 to the residual of the 1% mismatch and gains (bound: 0.03, 8x below)."""
    ov = {"mismatch.offset_V_std": 0.002, "mismatch.gain_rel_std": 0.01, "mismatch.coupling_rel_std": 0.01,
          "dac.bits": 16, "range.auto": True, "integrator.method": "auto", "noise.kappa": 1e-8}
    rng = np.random.default_rng(0)
    j = rng.standard_normal((5, 50)) / 5
    g = rng.standard_normal(50)
    x_star = np.linalg.solve(j.T @ j + 0.05 * np.eye(50), g)
    errors = {}
    for cal in (False, True):
        emu = Emulator(load_profile("ideal", ov), seed=0)
        if cal:
            summary = emu.calibrate(50, what="offsets")
            assert summary["kind"] == "offsets" and emu.info()["calibrated_sizes"] == [50]
        r = emu.step(Factored(j, np.eye(5), 0.05), g, 600.0, burn_in=300.0)
        assert r.diagnostics["calibrated"] is cal
        errors[cal] = np.linalg.norm(r.mean - x_star) / np.linalg.norm(x_star)
    assert errors[False] > 0.1 and errors[True] < 0.03, errors
    # the offsets-only calibration travels in snapshots like a full one
    other = Emulator(load_profile("ideal", ov), seed=5)
    other.restore(emu.snapshot())
    assert other.info()["calibrated_sizes"] == [50]
    assert np.array_equal(other.run(5.0).mean, emu.run(5.0).mean)
    with pytest.raises(InvalidInputError, match="what"):
        Emulator(load_profile("ideal")).calibrate(4, what="gains")
