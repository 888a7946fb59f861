"""The readout window of an exact modal propagation in closed form: 2 normals per mode.

A mode with rate a, noise strength kappa and target w*, sampled by the ADC every h tau for n
samples, follows w_k = w* + rho (w_{k-1} - w*) + s xi_k with rho = e^{-a h} and
s^2 = kappa (1 - rho^2) / a. The device returns the average of the n samples and keeps the last
one as its state. Given the start w_0, the pair

    z_n = (w_n - w*,  sum_{k=1..n} (w_k - w*))

is Gaussian: z_n = F^n z_0 + eta, z_0 = (w_0 - w*, 0), F = [[rho, 0], [rho, 1]] (the sum gains
the new value each step) and eta ~ N(0, Q_n), Q_n = sum_{i<n} F^i g g^T F^{iT}, g = (s, s). So
one draw of (eta_1, eta_2) per mode gives the window average and the final state exactly in
distribution (the same law as stepping through all n samples): the cost is O(modes log n)
instead of O(modes n), and 2 normals per mode instead of n.

F^n and Q_n are built by binary powering (one numba pass over the modes, in scalars) with Q_{j+k} = F^k Q_j F^{kT} + Q_k: every term is a
sum of positive-semidefinite pieces, so no cancellation spoils a slow mode (a h n << 1), where
the closed forms in 1 - rho lose their digits. Exact in distribution; the random stream differs
from the sampled path, so the same seed gives other (equally distributed) numbers. Only the mean
and the final state come out: returned samples, second moments and a non-ideal ADC (which must
see every sample) keep the sampled path (``exact.ModalPropagator.window``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _transitions(rates, kappa, h, n, f, q):
    """Binary powering per mode in scalars (F lower triangular [[p, 0], [c, 1]], Q symmetric).

    Segment a then b: F = F_b F_a, Q = F_b Q_a F_b^T + Q_b, the same recursion as a 2 x 2 matrix
    product, written out so that one pass over the modes costs O(log n) flops each.
    """
    for i in range(rates.shape[0]):
        a = rates[i]
        rho = math.exp(-a * h)
        s2 = kappa * -math.expm1(-2.0 * a * h) / a
        # the power of one step: F1 = [[rho, 0], [rho, 1]], Q1 = s2 [[1, 1], [1, 1]]
        pp, pc, q00, q01, q11 = rho, rho, s2, s2, s2
        # the accumulator: identity, zero
        ap, ac, a00, a01, a11 = 1.0, 0.0, 0.0, 0.0, 0.0
        k = n
        while k:
            if k & 1:
                # acc <- pow after acc: F = [[pp, 0], [pc, 1]] [[ap, 0], [ac, 1]]
                b00 = pp * pp * a00
                b01 = pp * (pc * a00 + a01)
                b11 = pc * pc * a00 + 2.0 * pc * a01 + a11
                ap, ac = pp * ap, pc * ap + ac
                a00, a01, a11 = b00 + q00, b01 + q01, b11 + q11
            k >>= 1
            if k:
                c00 = pp * pp * q00
                c01 = pp * (pc * q00 + q01)
                c11 = pc * pc * q00 + 2.0 * pc * q01 + q11
                pp, pc = pp * pp, pc * pp + pc
                q00, q01, q11 = c00 + q00, c01 + q01, c11 + q11
        f[i, 0, 0] = ap
        f[i, 0, 1] = 0.0
        f[i, 1, 0] = ac
        f[i, 1, 1] = 1.0
        q[i, 0, 0] = a00
        q[i, 0, 1] = a01
        q[i, 1, 0] = a01
        q[i, 1, 1] = a11


def window_transition(rates: np.ndarray, kappa: float, h: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(F^n, Q_n) per mode, shapes (R, 2, 2): the module docstring's transition over n samples."""
    r = rates.shape[0]
    f = np.empty((r, 2, 2))
    q = np.empty((r, 2, 2))
    _transitions(np.ascontiguousarray(rates, dtype=np.float64), float(kappa), float(h), int(n), f, q)
    return f, q


def draw_window(w0: np.ndarray, target: np.ndarray, rates: np.ndarray, kappa: float, h: float, n: int,
                rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """(final state, sum of the n samples) per mode, exact in distribution (module docstring).

    ``rng=None`` (kappa = 0) gives the noiseless values.
    """
    f, q = window_transition(rates, kappa, h, n)
    d = w0 - target
    last = f[:, 0, 0] * d
    total = f[:, 1, 0] * d
    if rng is not None:
        # Cholesky of each 2 x 2 Q with a guard for the rank-one limit (a h n -> 0, where the two
        # noises are almost the same variable): negative round-off clipped to zero.
        a, b, c = q[:, 0, 0], q[:, 1, 0], q[:, 1, 1]
        l11 = np.sqrt(np.clip(a, 0.0, None))
        l21 = np.divide(b, l11, out=np.zeros_like(b), where=l11 > 0.0)
        l22 = np.sqrt(np.clip(c - l21 * l21, 0.0, None))
        z = rng.standard_normal((rates.shape[0], 2))
        last = last + l11 * z[:, 0]
        total = total + l21 * z[:, 0] + l22 * z[:, 1]
    return target + last, n * target + total
