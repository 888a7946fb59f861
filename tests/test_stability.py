"""Stability of the realised drift (issue 13, item 1, device side).

* every run reports ``stability_margin``: min Re eig of the drift the cells see (C^-1 A), 1/tau;
* a drift the host hands over positive-stable but that the chip (codes, mismatch, capacitances)
  makes unstable is run, not refused: it runs away into the rails and says ``unstable = True``;
* a drift that is not positive-stable on the host's side still raises NotStableError;
* ``Capabilities.coupling_rel_error`` predicts the spread of the realised conductances.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from protocol.capabilities import Capabilities
from protocol.drift import Dense, Diagonal, Factored
from protocol.errors import NotStableError
from tests.conftest import emulator, spd_matrix
from thermo_device import Emulator, load_profile
from thermo_device.mismatch import Chip
from thermo_device.programming import realize, stages
from thermo_device.range_map import saturation_rail


def _realize(profile, drift, b):
    """The drift as this chip realises it (the programming stages, without installing it)."""
    chip = Chip(profile.mismatch, profile.noise.full_scale_V)
    return realize(profile, stages(profile, chip), drift, b, np.random.default_rng(0), None)


def _realised_matrix(real) -> np.ndarray:
    """C^-1 A of a realised overdamped drift, N x N (small test sizes only)."""
    d = real.drift
    if d.form == "factored":
        j_out = d.J if real.j_out is None else real.j_out
        a = j_out.T @ d.H @ d.J + d.damping * np.eye(d.dim)
    else:
        a = d.dense()
    return a if real.cap is None else a / real.cap[:, None]


def _crossing_problem(n: int = 24, m: int = 16, seed: int = 0):
    """A GGN-like Factored curvature (softmax blocks: PSD, singular) large enough that 1 %
    mismatch on J, J^T and H moves its small eigenvalues by more than a damping of 0.01."""
    rng = np.random.default_rng(seed)
    j = 3.0 * rng.standard_normal((m, n))
    h = np.zeros((m, m))
    for k in range(0, m, 8):
        p = rng.dirichlet(np.ones(8))
        h[k:k + 8, k:k + 8] = np.diag(p) - np.outer(p, p)
    return j, h, 0.1 * rng.standard_normal(n)


def test_margin_is_the_smallest_real_part_of_the_realised_drift() -> None:
    """Without capacitances the margin is exact (m x m eigenvalues plus damping); with them it is
    a lower bound with the right sign (Ostrowski / Sylvester), within the capacitance spread."""
    j, h, g = _crossing_problem()
    for damping in (0.01, 1.0):
        exact_prof = load_profile("noisy", {"mismatch.capacitance_rel_std": 0.0})
        real = _realize(exact_prof, Factored(j, h, damping), g)
        truth = float(np.linalg.eigvals(_realised_matrix(real)).real.min())
        assert real.report.stability_margin == pytest.approx(truth, rel=1e-6, abs=1e-9)
        assert real.report.unstable == (truth <= 0.0)

        prof = load_profile("noisy")
        real = _realize(prof, Factored(j, h, damping), g)
        truth = float(np.linalg.eigvals(_realised_matrix(real)).real.min())
        margin = real.report.stability_margin
        assert np.sign(margin) == np.sign(truth)
        assert margin <= truth + 1e-9 * abs(truth)
        spread = float(real.cap.max() / real.cap.min())
        assert abs(margin) >= abs(truth) / spread**2 if margin > 0 else abs(margin) <= abs(truth) * spread**2
    # the small damping does cross zero on this chip (the failure), the large one does not
    assert _realize(load_profile("noisy"), Factored(j, h, 0.01), g).report.unstable
    assert not _realize(load_profile("noisy"), Factored(j, h, 1.0), g).report.unstable


@pytest.mark.parametrize("make", [
    lambda a, n: Dense(a),                                           # symmetric host, non-symmetric chip
    lambda a, n: Diagonal(np.linspace(0.5, 2.0, n)),
])
def test_stable_runs_report_their_margin(make) -> None:
    n = 6
    a, lam = spd_matrix(n, 4.0, seed=2, lo=0.5)
    drift = make(a, n)
    prof = load_profile("noisy")
    real = _realize(prof, drift, np.ones(n) * 0.1)
    truth = float(np.linalg.eigvals(_realised_matrix(real)).real.min())
    emu = Emulator(prof, seed=1)
    emu.program(drift, np.ones(n) * 0.1)
    r = emu.run(5.0, burn_in=1.0)
    assert r.diagnostics["unstable"] is False
    assert r.diagnostics["stability_margin"] == pytest.approx(truth, rel=1e-9)
    # the ideal chip's margin is the host's smallest eigenvalue
    ideal = emulator(0, noise__kappa=1e-6)
    ideal.program(drift, np.ones(n))
    host_low = float(np.linalg.eigvalsh(drift.dense())[0])
    assert ideal.run(1.0).diagnostics["stability_margin"] == pytest.approx(host_low, rel=1e-12)


def test_chip_made_unstable_runs_into_the_rails_instead_of_raising() -> None:
    j, h, g = _crossing_problem()
    emu = Emulator(load_profile("noisy"), seed=3)
    emu.program(Factored(j, h, 0.01), g)  # raised NotStableError before issue 13
    first = emu.run(1.0)
    assert first.diagnostics["unstable"] is True and first.diagnostics["stability_margin"] < 0.0
    assert first.diagnostics["method"] == "heun"
    r = emu.run(400.0, burn_in=300.0, samples=10)  # e^{|margin| 300}: far beyond the rails
    rail = saturation_rail(emu.profile) * r.diagnostics["range_scale"]  # in host units
    assert np.all(np.isfinite(r.mean)) and np.abs(r.samples).max() <= rail * (1 + 1e-12)
    assert r.diagnostics["rail_clipped_fraction"] > 0.05
    assert np.isclose(np.abs(r.state).max(), rail)  # some cell sits at the rail
    # the same host drift with enough damping is stable on the same chip, and never clipped
    emu.program(Factored(j, h, 2.0), g)
    ok = emu.run(60.0, burn_in=30.0)
    assert ok.diagnostics["unstable"] is False and ok.diagnostics["stability_margin"] > 0.0
    assert ok.diagnostics["rail_clipped_fraction"] == 0.0


def test_unstable_without_modelled_rails_saturates_at_the_converter_full_scale() -> None:
    """Ideal profile (exact integrator, no rails) with 4-bit conductance codes: a tiny rate
    quantises to 0, so the cell integrates its bias until the supply (the ADC full scale, 1 with
    an ideal ADC) stops it. The host's drift was positive definite, so this is the chip's doing."""
    d = np.array([1.0, 0.02, 0.5])  # 0.02 < LSB / 2 = 1 / 14: the code is 0
    emu = emulator(0, noise__kappa=1e-8, coupling__bits=4)
    emu.program(Diagonal(d), np.array([0.1, 0.3, -0.2]))
    r = emu.run(20.0, burn_in=10.0)
    assert r.diagnostics["unstable"] is True and r.diagnostics["stability_margin"] == 0.0
    assert r.diagnostics["method"] == "heun"  # exact cannot follow a runaway into the rails
    assert r.state[1] == pytest.approx(1.0)  # 0.3 / tau for 10 tau: at the rail of 1
    # the other cells settle at b / code: codes of 4 bits relative to max |d| = 1 are k / 7
    assert r.mean[0] == pytest.approx(0.1, abs=1e-3) and r.mean[2] == pytest.approx(-0.2 / (4 / 7), abs=1e-3)
    assert r.diagnostics["rail_clipped_fraction"] > 0.2


@pytest.mark.parametrize("profile", ["ideal", "noisy"])
@pytest.mark.parametrize("name,drift", [
    ("negative definite dense", lambda a: Dense(-a)),
    ("indefinite diagonal", lambda a: Diagonal(np.r_[np.ones(5), -0.5])),
    ("H not PSD", lambda a: Factored(np.ones((2, 6)), -np.eye(2), 1.0)),
])
def test_host_unstable_drift_still_raises(profile: str, name: str, drift) -> None:
    a, _ = spd_matrix(6, 3.0, seed=4)
    emu = Emulator(profile, seed=0)
    with pytest.raises(NotStableError):
        emu.program(drift(a), np.ones(6) * 0.1)


def test_coupling_rel_error_is_declared_and_predicts_the_realised_spread() -> None:
    prof = load_profile("noisy")
    caps = Capabilities.from_info(Emulator(prof).info())
    lsb = 1.0 / (2 ** (prof.coupling.bits - 1) - 1)
    assert caps.coupling_rel_error == pytest.approx(math.sqrt(0.01**2 + lsb**2 / 12))
    assert Capabilities.from_info(Emulator("ideal").info()).coupling_rel_error == 0.0
    # Entries of |a| in [0.5, 1]: relative to max|a| the realised error's spread is
    # sqrt(mean(a^2) / max^2 std^2 + LSB^2 / 12), at most the declared bound (reached when every
    # entry is the largest). Only the coupling stages run: this matrix need not be stable.
    n = 40
    rng = np.random.default_rng(8)
    a = rng.uniform(0.5, 1.0, (n, n)) * rng.choice([-1.0, 1.0], (n, n))
    chip = Chip(prof.mismatch, prof.noise.full_scale_V)
    real = realize(prof, stages(prof, chip)[:3], Dense(a), np.zeros(n), np.random.default_rng(0), None)
    top = np.abs(a).max()
    spread = ((real.drift.matrix - a) / top).std()
    lsb_top = 1.0 / (2 ** (prof.coupling.bits - 1) - 1)  # the code step relative to max|a|
    expect = math.sqrt(np.mean(a**2) / top**2 * prof.mismatch.coupling_rel_std**2 + lsb_top**2 / 12)
    # sd of a sample sd over n^2 = 1600 draws: 1 / sqrt(2 n^2) = 1.8 %
    assert abs(spread / expect - 1.0) < 4.0 / math.sqrt(2 * n * n)
    assert expect <= caps.coupling_rel_error


def test_stochastic_rounding_keeps_a_symmetric_h_symmetric() -> None:
    """H's (i, j) and (j, i) conductances are one component (its mismatch is symmetric too): one
    stochastic rounding per pair. Independent roundings made a PSD H non-symmetric and the chip
    refused a drift the host got right ("Factored.H must be symmetric")."""
    rng = np.random.default_rng(0)
    j, b = rng.standard_normal((5, 20)), rng.standard_normal((5, 5))
    h = b @ b.T + 0.5 * np.eye(5)
    prof = load_profile("ideal", {"noise.kappa": 1e-6, "coupling.rounding": "stochastic", "coupling.bits": 8})
    gen = np.random.default_rng(4)
    real = realize(prof, stages(prof, Chip(prof.mismatch, prof.noise.full_scale_V)), Factored(j, h, 0.1),
                   np.zeros(20), gen, None)
    assert np.array_equal(real.drift.H, real.drift.H.T) and not np.array_equal(real.drift.H, h)
    # the noise stream advanced by one draw per entry of J and of H, as before pairing
    ref = np.random.default_rng(4)
    ref.random((5, 20))
    ref.random((5, 5))
    assert gen.random() == ref.random()
    emu = Emulator(prof, seed=0)
    emu.program(Factored(j, h, 0.1), rng.standard_normal(20))
    r = emu.run(2.0)
    assert r.diagnostics["method"] == "exact" and r.diagnostics["stability_margin"] > 0.0
