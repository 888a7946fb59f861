"""The general exact path without Van Loan (issue 15, item 5): ``thermo_device.general_basis``.

For non-normal drifts (strongly non-normal 2 x 2, random n = 20, a singular D, the RLC board) the
eigenbasis and the Lyapunov set-ups give the Van Loan Phi and Q to tight tolerances (the bounds
are the module's error estimates), the fallbacks trigger where they should, and the sampled
transitions follow the exact law: z-tests of the mean and covariance of one-step transitions
against Phi, Q computed here by an independent Van Loan, with standard errors from theory and
fixed seeds. Bound |z| < 4.5: with ~250 tests per case the chance of a false alarm is ~2e-3.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from protocol.drift import Dense
from thermo_device import general_basis as gb
from thermo_device.dynamics import GeneralSystem, underdamped_system
from thermo_device.exact import GeneralPropagator

Z_MAX = 4.5
EPS = np.finfo(float).eps


def _system(f: np.ndarray, d: np.ndarray, n_out: int | None = None) -> GeneralSystem:
    n = f.shape[0]
    c = np.linspace(-1.0, 1.0, n)
    return GeneralSystem(F=f, c=c, D=d, n_out=n if n_out is None else n_out, target=np.linalg.solve(f, c))


def _random_nonnormal(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = 1.5 * np.eye(n) + rng.standard_normal((n, n)) / np.sqrt(n)
    g = rng.standard_normal((n, n)) / np.sqrt(n)
    assert np.linalg.eigvals(f).real.min() > 0.0
    return f, g @ g.T


def _rlc() -> GeneralSystem:
    rng = np.random.default_rng(4)
    m = rng.standard_normal((3, 3))
    c = np.eye(3) + 0.1 * (m + m.T)
    return underdamped_system(Dense(c), np.zeros(3), 1.5, 0.5)


def _cases() -> dict[str, GeneralSystem]:
    f20, d20 = _random_nonnormal(20, 3)
    dsing = np.diag(np.r_[np.ones(10), np.zeros(10)])  # half the coordinates get no direct noise
    return {
        "jordan_like_3": _system(np.array([[1.0, 3.0], [0.0, 2.0]]), 2.0 * np.eye(2)),
        "jordan_like_30": _system(np.array([[1.0, 30.0], [0.0, 2.0]]), 2.0 * np.eye(2)),
        "random20": _system(f20, d20),
        "random20_singular_d": _system(f20, dsing),
        "rlc_board": _rlc(),
    }


def _van_loan(f: np.ndarray, d: np.ndarray, h: float) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: Van Loan at h / 2^k, squared up (Phi(2h) = Phi^2, Q(2h) = Phi Q
    Phi^T + Q)."""
    n = f.shape[0]
    k = max(0, int(np.ceil(np.log2(max(np.linalg.norm(f, 1) * h, 1e-300) / 0.25))))
    h0 = h / 2**k
    e = scipy.linalg.expm(np.block([[f, d], [np.zeros((n, n)), -f.T]]) * h0)
    phi = e[n:, n:].T
    q = phi @ e[:n, n:]
    for _ in range(k):
        q = phi @ q @ phi.T + q
        phi = phi @ phi
    return phi, 0.5 * (q + q.T)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _basis_transition(prop: GeneralPropagator, h: float, r: float, kappa: float) -> tuple[np.ndarray, np.ndarray]:
    """Phi and Q in z coordinates from the block-basis coefficients (X P X^-1, X L L^T X^T)."""
    b = prop.basis
    step = prop._basis_step(h, r, kappa)
    n = b.lam.shape[0]
    p = np.diag(step.pdiag)
    p[np.arange(n), b.partner] += np.where(b.partner != np.arange(n), step.poff, 0.0)
    return b.x @ p @ b.y, b.x @ (step.lt.T @ step.lt) @ b.x.T


STEPS = [(0.1, 1.0, 0.3), (1e-3, 1.0, 1.0), (3.0, 2.0, 0.5)]  # (h, r, kappa)


@pytest.mark.parametrize("case", list(_cases()))
def test_eigenbasis_and_lyapunov_match_van_loan(case: str) -> None:
    s = _cases()[case]
    auto = GeneralPropagator(s)
    dense = GeneralPropagator(s, method="dense")
    b = auto.basis
    assert b is not None and b.cond <= gb.BASIS_COND_MAX
    if case.startswith("jordan_like"):
        assert np.linalg.norm(s.F @ s.F.T - s.F.T @ s.F) > 1.0  # really non-normal
    stat = gb.stationary_covariance(s.F, s.D)
    for h, r, kappa in STEPS:
        phi_ref, q_ref = _van_loan(r * s.F, r * kappa * s.D, h)
        # eigenbasis: backward error u kappa(X) for Phi and u kappa(X)^2 for Q (module docstring)
        phi_b, q_b = _basis_transition(auto, h, r, kappa)
        tol_b = 100 * EPS * b.cond**2 + 1e-13
        assert _rel(phi_b, phi_ref) < tol_b, (h, r, kappa)
        assert _rel(q_b, q_ref) < tol_b, (h, r, kappa)
        # dense Lyapunov form: within its own cancellation estimate (or Van Loan when rejected)
        phi_d, _, chol_d = dense.coefficients(h, r, kappa)
        _, _, est = gb.lyapunov_transition(s.F, *stat, h, r, kappa)
        assert dense.path == ("lyapunov" if est <= gb.LYAPUNOV_REL_MAX else "van_loan")
        assert _rel(phi_d, phi_ref) < 1e-12
        assert _rel(chol_d @ chol_d.T, q_ref) < max(10 * est, 1e-12), (h, r, kappa, est)


def test_stationary_covariance_blocked_solver_matches_scipy() -> None:
    """n = 150 > the 64 block: the recursion splits (never through a 2 x 2 Schur block)."""
    f, d = _random_nonnormal(150, 8)
    s, resid = gb.stationary_covariance(f, d)
    assert resid < 1e-14
    ref = scipy.linalg.solve_continuous_lyapunov(f, d)
    assert _rel(s, ref) < 1e-12
    s2, _ = gb.stationary_covariance(np.array([[1.0, 3.0], [0.0, 2.0]]), 2.0 * np.eye(2))
    np.testing.assert_allclose(s2, [[2.5, -0.5], [-0.5, 0.5]], rtol=1e-13)  # known closed form


def test_fallbacks() -> None:
    # a defective F (one Jordan block) has no eigenbasis: the dense Lyapunov set-up serves
    jordan = _system(np.array([[1.0, 1.0], [0.0, 1.0]]), 2.0 * np.eye(2))
    prop = GeneralPropagator(jordan)
    assert prop.basis is None
    assert prop.prepare(0.1, 1.0, 0.5) == "lyapunov"
    phi_ref, q_ref = _van_loan(jordan.F, 0.5 * jordan.D, 0.1)
    phi, _, chol = prop.coefficients(0.1, 1.0, 0.5)
    assert _rel(phi, phi_ref) < 1e-13 and _rel(chol @ chol.T, q_ref) < 1e-12
    # nearly defective: kappa(X) ~ 1e9 > BASIS_COND_MAX
    assert GeneralPropagator(_system(np.array([[1.0, 1e6], [0.0, 1.001]]), np.eye(2))).basis is None
    # a step so short that ||S|| / ||Q|| ~ 1e9: S - Phi S Phi^T cancels, Van Loan takes over
    s = _cases()["random20"]
    dense = GeneralPropagator(s, method="dense")
    assert dense.prepare(1e-9, 1.0, 1.0) == "van_loan"
    phi_ref, q_ref = _van_loan(s.F, s.D, 1e-9)
    phi, _, chol = dense.coefficients(1e-9, 1.0, 1.0)
    assert _rel(chol @ chol.T, q_ref) < 1e-9
    # noiseless: no covariance to factor, any path
    assert GeneralPropagator(s, method="dense").prepare(0.1, 1.0, 0.0) == "lyapunov"


def _z_tests(e: np.ndarray, q: np.ndarray) -> float:
    """Largest |z| of the sample mean (SE sqrt(Q_ii / K)) and of the sample covariance entries
    (known mean 0: SE sqrt((Q_ii Q_jj + Q_ij^2) / K)) of K i.i.d. N(0, Q) vectors."""
    k = e.shape[0]
    dq = np.diag(q)
    z_mean = np.abs(e.mean(0)) / np.sqrt(dq / k)
    c = e.T @ e / k
    iu = np.triu_indices(q.shape[0])
    se = np.sqrt((np.outer(dq, dq) + q**2) / k)
    z_cov = np.abs(c - q)[iu] / se[iu]
    return float(max(z_mean.max(), z_cov.max()))


@pytest.mark.parametrize("case", ["jordan_like_30", "random20", "rlc_board"])
@pytest.mark.parametrize("method", ["auto", "dense"])
def test_window_transitions_follow_the_exact_law(case: str, method: str) -> None:
    """Residuals e_k = z_{k+1} - Phi z_k - (I - Phi) z* of a sampled window are i.i.d. N(0, Q)
    under the exact law (a Gaussian Markov chain is its transition law)."""
    s = _cases()[case]
    s = GeneralSystem(s.F, s.c, s.D, s.dim, s.target)  # read the whole state (RLC: n_out = N)
    h, r, kappa, k = 0.7, 1.3, 0.4, 20000
    prop = GeneralPropagator(s, method=method)
    z0 = s.target + 0.5
    res = prop.window(z0, h, k, 1, np.random.default_rng(41), False, r, kappa)
    assert prop.path == ("eigenbasis" if method == "auto" else "lyapunov")
    phi, q = _van_loan(r * s.F, r * kappa * s.D, h)
    z = np.vstack([z0, res.samples])
    e = z[1:] - z[:-1] @ phi.T - (s.target - phi @ s.target)
    assert _z_tests(e, q) < Z_MAX


@pytest.mark.parametrize("case", ["jordan_like_3", "random20_singular_d"])
def test_jumps_follow_the_exact_law(case: str) -> None:
    """K independent one-step jumps from one start: mean Phi z0 + (I - Phi) z*, covariance Q."""
    s = _cases()[case]
    h, r, kappa, k = 0.25, 1.0, 0.8, 20000
    prop = GeneralPropagator(s)
    rng = np.random.default_rng(5)
    z0 = s.target - 1.0
    zs = np.array([prop.jump(z0, h, rng, r, kappa) for _ in range(k)])
    assert prop.path == "eigenbasis"
    phi, q = _van_loan(r * s.F, r * kappa * s.D, h)
    e = zs - (phi @ z0 + s.target - phi @ s.target)
    assert _z_tests(e, q) < Z_MAX


def test_window_bookkeeping_in_the_basis(monkeypatch: pytest.MonkeyPatch) -> None:
    """Totals, stored readouts (any stride, across noise blocks) and second moments of the
    eigenbasis window are those of its own path, and its noiseless path is the dense one's."""
    f, d = _random_nonnormal(20, 3)
    s = _system(f, d, n_out=12)
    auto, dense = GeneralPropagator(s), GeneralPropagator(s, method="dense")
    z0 = np.linspace(1.0, -1.0, 20)
    for stride in (1, 3, 0):
        a = auto.window(z0, 0.1, 100, stride, np.random.default_rng(0), True, 1.3, 0.0)
        b = dense.window(z0, 0.1, 100, stride, np.random.default_rng(0), True, 1.3, 0.0)
        for key in ("state", "total", "samples", "total_outer"):
            np.testing.assert_allclose(getattr(a, key), getattr(b, key), rtol=1e-11, atol=1e-12)
    full = auto.window(z0, 0.1, 200, 1, np.random.default_rng(1), True, 1.0, 0.5)
    np.testing.assert_allclose(full.total, full.samples.sum(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(full.total_outer, full.samples.T @ full.samples, rtol=1e-12, atol=1e-12)
    # small noise blocks (3 steps): strided readouts cross block boundaries; the normals are drawn
    # in the same order, so the path is the same to rounding
    import thermo_device.propagator as propagator

    monkeypatch.setattr(propagator, "NOISE_BLOCK_FLOATS", 60)
    small = GeneralPropagator(s).window(z0, 0.1, 200, 7, np.random.default_rng(1), True, 1.0, 0.5)
    np.testing.assert_allclose(small.samples, full.samples[6::7], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(small.total, full.total, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(small.state, full.state, rtol=1e-12, atol=1e-12)


def test_same_seed_same_bits() -> None:
    s = _cases()["random20"]
    runs = []
    for _ in range(2):
        prop = GeneralPropagator(s)
        rng = np.random.default_rng(9)
        z = prop.jump(s.target, 1.0, rng, 1.0, 0.2)
        w = prop.window(z, 0.2, 500, 5, rng, True, 1.1, 0.2)
        runs.append((z, w.state, w.total, w.samples, w.total_outer))
    for a, b in zip(*runs, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("method", ["auto", "dense"])
def test_singular_noise_covariance(method: str) -> None:
    """A coordinate with no noise and no noisy input (Q singular, as for a noise-free direction
    of the RLC board): the factor is the clipped eigen square root, the coordinate stays on its
    mean and the other one follows its law."""
    s = _system(np.array([[1.0, 0.5], [0.0, 2.0]]), np.diag([2.0, 0.0]))
    h, kappa, k = 0.3, 0.5, 20000
    prop = GeneralPropagator(s, method=method)
    z0 = np.array([1.0, -1.0])
    res = prop.window(z0, h, k, 1, np.random.default_rng(12), False, 1.0, kappa)
    assert prop.path == ("eigenbasis" if method == "auto" else "lyapunov")
    phi, q = _van_loan(s.F, kappa * s.D, h)
    assert abs(q[1, 1]) < 1e-300 and q[0, 0] > 0.0
    z = np.vstack([z0, res.samples])
    e = z[1:] - z[:-1] @ phi.T - (s.target - phi @ s.target)
    assert np.max(np.abs(e[:, 1])) < 1e-12
    assert _z_tests(e[:, :1], q[:1, :1]) < Z_MAX
