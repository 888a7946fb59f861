"""Equipartition on the RLC board (issue 13, item 4): fluctuation-dissipation for any R.

The cells' resistors carry Johnson current noise of density 2 kT / R, so the board obeys

    di = L^-1 v dt,   dv = -C^-1 R^-1 v dt - C^-1 i dt + sqrt(2 kappa / R) C^-1 dW

and at equilibrium <v^T C v> / N = <i^T L i> / N = kappa (kappa = kT in the model's units)
whatever R is. The old model (noise sqrt(2 kappa) C^-1 dW) gave R kappa: 0.5, 1, 2, 4 x kappa
for the resistances tested here, which these tests reject by tens of standard errors.

Estimator: K snapshots of the full state z = [v, i] (``Emulator.state``), spaced h apart along one
stationary trajectory. Its standard error comes from theory, not from the data: z_k is a stationary
Gaussian chain with lag covariance E[z_{k+t} z_k^T] = Phi^t S (Phi = e^{-F h}, S = kappa diag(C^-1,
L^-1)), so an energy E_k = z_k^T M z_k / N has Cov(E_k, E_{k+t}) = 2 tr(M Phi^t S M S Phi^tT) / N^2
(Isserlis), and the mean of K of them has variance (c_0 + 2 sum_t (1 - t / K) c_t) / K. F and S are
written here from the circuit equations, independently of the emulator's code.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from protocol.drift import Dense
from tests.conftest import emulator, spd_matrix

KAPPA = 0.05
INDUCTANCE = 1.5
N = 4
SPACING = 0.5  # tau between snapshots
SNAPSHOTS = 3000
Z_MAX = 3.0  # the bound: within 3 standard errors
SEED = 17


def _circuit(c: np.ndarray, resistance: float) -> tuple[np.ndarray, np.ndarray]:
    """(F, S): the drift of dz = -F z dt + ... and the equipartition covariance kappa diag(C^-1, L^-1)."""
    n = c.shape[0]
    c_inv = np.linalg.inv(c)
    f = np.zeros((2 * n, 2 * n))
    f[:n, :n] = c_inv / resistance
    f[:n, n:] = c_inv
    f[n:, :n] = -np.eye(n) / INDUCTANCE
    s = np.zeros((2 * n, 2 * n))
    s[:n, :n] = KAPPA * c_inv
    s[n:, n:] = KAPPA / INDUCTANCE * np.eye(n)
    return f, s


def _standard_error(f: np.ndarray, s: np.ndarray, m: np.ndarray, k: int) -> float:
    """Standard error of the mean of K energies z^T M z / N along the stationary chain."""
    phi = scipy.linalg.expm(-f * SPACING)
    lag = s.copy()  # E[z_{k+t} z_k^T] = Phi^t S
    total = 0.0
    for t in range(k):
        c_t = 2.0 * np.trace(m @ lag @ m @ lag.T) / N**2
        total += c_t if t == 0 else 2.0 * (1.0 - t / k) * c_t
        if abs(c_t) < 1e-12 * total:
            break
        lag = phi @ lag
    return float(np.sqrt(total / k))


@pytest.mark.parametrize("method", ["exact", "baoab"])
@pytest.mark.parametrize("resistance", [0.5, 1.0, 2.0, 4.0])
def test_equipartition_for_any_resistance(method: str, resistance: float) -> None:
    c, _ = spd_matrix(N, 3.0, seed=31, lo=0.5)
    f, s = _circuit(c, resistance)
    # Lyapunov check of the theory itself: S is the stationary covariance of dz = -F z dt + G dW
    g_d = np.zeros_like(f)
    c_inv = np.linalg.inv(c)
    g_d[:N, :N] = 2.0 * KAPPA / resistance * c_inv @ c_inv
    np.testing.assert_allclose(f @ s + s @ f.T, g_d, atol=1e-12)

    emu = emulator(SEED, device__dynamics="underdamped", device__cells=N, noise__kappa=KAPPA,
                   integrator__method=method, integrator__dt=0.01, underdamped__resistance=resistance,
                   underdamped__inductance=INDUCTANCE)
    emu.program(Dense(c), None)
    # burn-in: the covariance relaxes at twice the slowest decay rate, e^{-2 a T} < 1e-9
    slowest = float(np.linalg.eigvals(f).real.min())
    burn = 10.0 / slowest
    emu.run(burn, burn_in=burn, reset=True)
    z = np.empty((SNAPSHOTS, 2 * N))
    for k in range(SNAPSHOTS):
        emu.run(SPACING, burn_in=SPACING)  # one unobserved step of SPACING: z is in emu.state
        z[k] = emu.state
    v, i = z[:, :N], z[:, N:]
    m_v = np.zeros((2 * N, 2 * N))
    m_v[:N, :N] = c
    m_i = np.zeros((2 * N, 2 * N))
    m_i[N:, N:] = INDUCTANCE * np.eye(N)
    e_v = np.mean(np.einsum("ki,ij,kj->k", v, c, v)) / N
    e_i = np.mean(INDUCTANCE * np.sum(i * i, axis=1)) / N
    se_v = _standard_error(f, s, m_v, SNAPSHOTS)
    se_i = _standard_error(f, s, m_i, SNAPSHOTS)
    z_v, z_i = (e_v - KAPPA) / se_v, (e_i - KAPPA) / se_i
    print(f"R={resistance} {method}: <vCv>/N = {e_v / KAPPA:.4f} kT ({z_v:+.2f} se, se {se_v / KAPPA:.4f} kT); "
          f"<iLi>/N = {e_i / KAPPA:.4f} kT ({z_i:+.2f} se, se {se_i / KAPPA:.4f} kT)")
    assert abs(z_v) < Z_MAX, (e_v / KAPPA, z_v)
    assert abs(z_i) < Z_MAX, (e_i / KAPPA, z_i)
    # the test has power: the old law (R kappa) lies many standard errors away when R != 1
    if resistance != 1.0:
        assert abs(resistance * KAPPA - KAPPA) / max(se_v, se_i) > 10.0


def test_info_covariance_scale_is_kappa_on_the_rlc_board() -> None:
    emu = emulator(0, device__dynamics="underdamped", noise__kappa=KAPPA, underdamped__resistance=4.0)
    info = emu.info()
    assert info["covariance_scale"] == pytest.approx(info["kappa"])
