"""host.TNGD against the exact solves it approximates, and its digital baselines."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

import host
from host.baselines import NGDCG, SGD, Adam, ExactNGD, natural_direction
from host.tngd import TNGD, LevenbergMarquardt
from protocol.drift import Dense, Factored
from protocol.errors import InvalidInputError

EXACT = {"noise.kappa": 0.0, "integrator.method": "exact"}


def _ggn_problem(rng: np.random.Generator, n: int = 120, b: int = 6, d: int = 4) -> Factored:
    """A softmax-cross-entropy-shaped GGN: J (b d x n), singular per-sample blocks over b."""
    j = rng.standard_normal((b * d, n)) / np.sqrt(n)
    h = np.zeros((b * d, b * d))
    for i in range(b):
        z = rng.standard_normal(d)
        p = np.exp(z) / np.exp(z).sum()
        h[i * d:(i + 1) * d, i * d:(i + 1) * d] = (np.diag(p) - np.outer(p, p)) / b
    return Factored(j, h, 0.0)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("init", ["warm", "grad", "reset"])
def test_long_t_ideal_device_equals_exact_ngd(init: str) -> None:
    # lambda_min(A) = damping = 0.01, so the start is forgotten as e^{-0.01 t}: at t = 3000 tau
    # that is e^-30 ~ 1e-13; the readout window is the last tau.
    rng = np.random.default_rng(0)
    dev = host.connect("embedded:ideal", seed=0, overrides=EXACT)
    tngd = TNGD(dev, lr=0.01, analog_time=3000.0, damping=0.01, burn_in=2999.0, init=init)
    ngd = ExactNGD(lr=0.01, damping=0.01)
    for _ in range(3):  # successive steps, new curvature each time (warm start carries over)
        curv = _ggn_problem(rng)
        g = rng.standard_normal(curv.dim)
        assert _rel(tngd.step(g, curv), ngd.step(g, curv)) < 1e-6


def test_long_t_dense_curvature_equals_cholesky() -> None:
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    g_mat = (q * np.linspace(0.0, 3.0, 40)) @ q.T  # PSD, with a zero eigenvalue
    g = rng.standard_normal(40)
    dev = host.connect("embedded:ideal", seed=0, overrides=EXACT)
    tngd = TNGD(dev, lr=0.1, analog_time=3000.0, damping=0.01, burn_in=2990.0)
    assert _rel(tngd.step(g, Dense(g_mat)), ExactNGD(0.1, 0.01).step(g, Dense(g_mat))) < 1e-6


def test_t_zero_from_gradient_is_sgd() -> None:
    # The paper's interpolation: x0 = g and t -> 0 gives SGD exactly.
    rng = np.random.default_rng(2)
    curv = _ggn_problem(rng)
    dev = host.connect("embedded:ideal", seed=0, overrides=EXACT)
    tngd = TNGD(dev, lr=0.05, analog_time=0.0, damping=0.01, init="grad")
    for _ in range(2):
        g = rng.standard_normal(curv.dim)
        np.testing.assert_allclose(tngd.step(g, curv), SGD(0.05).step(g), rtol=1e-12)


def test_warm_start_and_delay_follow_the_mean_recursion() -> None:
    # Snapshot readout. The delay runs the previous drift *and bias* for t_d (the device keeps
    # relaxing towards the old solution s_{k-1} while the host computes), then the new one for t:
    # y = e^{-A_{k-1} t_d} (x_{k-1} - s_{k-1}) + s_{k-1};  x_k = e^{-A_k t} (y - s_k) + s_k
    rng = np.random.default_rng(3)
    n, t, td, lam = 30, 2.0, 0.7, 0.1
    dev = host.connect("embedded:ideal", seed=0, overrides=EXACT)
    tngd = TNGD(dev, lr=1.0, analog_time=t, damping=lam, delay=td, burn_in=t)
    x = sol_prev = a_prev = None
    for k in range(3):
        curv = _ggn_problem(rng, n=n, b=3, d=3)
        g = rng.standard_normal(n)
        a = curv.J.T @ curv.H @ curv.J + lam * np.eye(n)
        x_bar = tngd.direction(g, curv)
        sol = np.linalg.solve(a, g)
        if k == 0:
            x = g  # the first warm solve starts from g_0 (Algorithm 1's g~_0)
        else:
            x = scipy.linalg.expm(-a_prev * td) @ (x - sol_prev) + sol_prev
        x = scipy.linalg.expm(-a * t) @ (x - sol) + sol
        np.testing.assert_allclose(x_bar, x, rtol=1e-9, atol=1e-12)
        a_prev, sol_prev = a, sol


def test_window_average_is_the_averaged_trajectory() -> None:
    # burn_in = 0: x_bar averages the ADC samples of the relaxation (sample_interval 0.1 tau).
    dev = host.connect("embedded:ideal", seed=0, overrides=EXACT)
    d = np.array([0.5, 1.0, 2.0])
    g = np.array([1.0, -1.0, 2.0])
    tngd = TNGD(dev, lr=1.0, analog_time=1.0, damping=0.0, init="reset")
    x_bar = tngd.direction(g, host.Diagonal(d))
    ts = np.arange(1, 11) * 0.1
    expect = np.mean([(1 - np.exp(-d * s)) * g / d for s in ts], axis=0)
    np.testing.assert_allclose(x_bar, expect, rtol=1e-10)


def test_noisy_snapshot_has_the_stationary_spread() -> None:
    # One snapshot at equilibrium is N(A^-1 g, kappa A^-1): with A = diag(d) the standardised
    # errors over 2000 coordinates have unit variance; 2000 chi^2 samples put the sample
    # variance within 1 +- 5 * sqrt(2/2000) = 1 +- 0.16 (5 sigma).
    kappa = 1e-3
    dev = host.connect("embedded:ideal", seed=7, overrides={"noise.kappa": kappa})
    rng = np.random.default_rng(4)
    d = rng.uniform(0.5, 2.0, 2000)
    g = rng.standard_normal(2000)
    tngd = TNGD(dev, lr=1.0, analog_time=40.0, damping=0.0, burn_in=40.0, init="reset")
    z = (tngd.direction(g, host.Diagonal(d)) - g / d) / np.sqrt(kappa / d)
    assert abs(z.mean()) < 5 / np.sqrt(2000)
    assert abs(z.var() - 1.0) < 5 * np.sqrt(2 / 2000)


def test_tngd_adam_first_step_is_sign_of_natural_gradient() -> None:
    # Adam's first bias-corrected step is lr * m/sqrt(v) = lr * sign(x_bar) (up to eps).
    rng = np.random.default_rng(5)
    curv = _ggn_problem(rng)
    g = rng.standard_normal(curv.dim)
    dev = host.connect("embedded:ideal", seed=0, overrides=EXACT)
    tngd = TNGD(dev, lr=1e-3, analog_time=3000.0, damping=0.01, burn_in=2999.0, optimizer="adam")
    delta = tngd.step(g, curv)
    nat = ExactNGD(1.0, 0.01).direction(g, curv)
    np.testing.assert_allclose(delta, -1e-3 * np.sign(nat), rtol=1e-6)


def test_levenberg_marquardt_moves_damping_both_ways() -> None:
    # On an exactly quadratic loss the model is perfect: rho = 1 -> damping shrinks by alpha.
    rng = np.random.default_rng(6)
    curv = _ggn_problem(rng, n=50)
    g = rng.standard_normal(50)
    g_mat = curv.J.T @ curv.H @ curv.J

    def loss(theta: np.ndarray) -> float:
        return float(g @ theta + 0.5 * theta @ g_mat @ theta)

    dev = host.connect("embedded:ideal", seed=0, overrides=EXACT)
    lm = LevenbergMarquardt()
    tngd = TNGD(dev, lr=1.0, analog_time=3000.0, damping=0.1, burn_in=2999.0, lm=lm)
    delta = tngd.step(g, curv)
    rho = tngd.adapt_damping(loss(np.zeros(50)), loss(delta))
    assert rho == pytest.approx(1.0, rel=1e-9)
    assert tngd.damping == pytest.approx(0.1 * 2 / 3)
    tngd.step(g, curv)
    tngd.adapt_damping(0.0, 1.0)  # the loss went up: distrust the model
    assert tngd.damping == pytest.approx(0.1)


def test_woodbury_cholesky_and_cg_agree() -> None:
    rng = np.random.default_rng(8)
    curv = _ggn_problem(rng, n=200, b=10, d=5)
    g = rng.standard_normal(200)
    a = Factored(curv.J, curv.H, 0.05)
    ref = natural_direction(g, a, "cholesky")
    assert _rel(natural_direction(g, a, "woodbury"), ref) < 1e-10
    cg = NGDCG(lr=1.0, damping=0.05, maxiter=200, rtol=1e-12)
    assert _rel(cg.direction(g, Factored(curv.J, curv.H, 0.0)), ref) < 1e-8
    assert cg.last_iterations <= 60  # rank <= 50 plus the damping: CG converges in ~rank steps
    truncated = NGDCG(lr=1.0, damping=0.05, maxiter=3)
    truncated.direction(g, Factored(curv.J, curv.H, 0.0))
    assert truncated.last_iterations == 3


def test_numpy_adam_matches_torch_adam() -> None:
    import torch
    rng = np.random.default_rng(9)
    grads = rng.standard_normal((5, 7))
    p = torch.zeros(7, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.01)
    mine = Adam(0.01)
    theta = np.zeros(7)
    for g in grads:
        p.grad = torch.from_numpy(g.copy())
        opt.step()
        theta = theta + mine.step(g)
    np.testing.assert_allclose(theta, p.detach().numpy(), rtol=1e-12, atol=1e-15)


def test_bad_arguments_are_refused() -> None:
    dev = host.connect("embedded:ideal", seed=0)
    with pytest.raises(InvalidInputError):
        TNGD(dev, lr=0.1, analog_time=1.0, damping=0.01, burn_in=2.0)
    with pytest.raises(InvalidInputError):
        TNGD(dev, lr=0.1, analog_time=1.0, damping=0.01, init="cold")
    with pytest.raises(InvalidInputError):
        TNGD(dev, lr=0.1, analog_time=1.0, damping=0.01, optimizer="lion")
    with pytest.raises(InvalidInputError):
        TNGD(dev, lr=0.1, analog_time=1.0, damping=0.01).adapt_damping(1.0, 0.5)
