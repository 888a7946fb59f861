"""Digital baselines behind TNGD's step interface: ``step(grad, curvature) -> delta``.

theta_new = theta + delta for every optimizer here, so a training loop swaps TNGD for a
baseline without other changes. ``curvature`` is a drift description (``Factored``, ``Dense``,
``Diagonal``) of the *undamped* curvature; the optimizer adds its own damping lambda, exactly as
``host.TNGD`` does, so both solve the same system (G + lambda I) x = g.

* ``ExactNGD``: a direct solve. Dense: Cholesky of G + lambda I (O(N^3)). Factored: Woodbury on
  G = J^T H J, through the m x m system lambda I + J J^T H (O(m^2 N + m^3)); N x N is never formed.
* ``NGDCG``: conjugate gradients (SciPy) on matrix-vector products with the drift, never forming
  G; ``maxiter`` bounds the work (the paper's c).
* ``SGD`` and ``Adam``: NumPy wrappers for the framework-free path (curvature is ignored). On the
  PyTorch path use ``torch.optim.SGD`` / ``torch.optim.Adam`` instead (``host.torch_optimizer``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

from protocol.drift import Drift, drift_form
from protocol.errors import InvalidInputError, NonFiniteError


def damped(curvature: Drift, damping: float) -> Drift:
    """The drift G + damping I for a curvature G given as any drift form (``curvature.damped``,
    after checking ``damping``: the arrays are the validated curvature's, not scanned again)."""
    if damping < 0.0:
        raise InvalidInputError(f"damping must be >= 0, got {damping}")
    if not math.isfinite(damping):
        raise NonFiniteError(f"damping must be finite, got {damping}")
    drift_form(curvature)  # InvalidInputError for anything that is not a drift description
    return curvature.damped(damping)


def natural_direction(grad: np.ndarray, drift: Drift, method: str = "auto") -> np.ndarray:
    """A^-1 grad for a positive definite drift A (the damping already included), directly.

    method: "auto" (Woodbury for Factored, Cholesky for Dense), "cholesky" (forms A if Factored:
    O(N^2) memory, for tests), "woodbury" (Factored only).
    """
    g = np.asarray(grad, dtype=np.float64)
    form = drift_form(drift)
    if form == "diagonal":
        return g / drift.diag
    if form == "factored" and method in ("auto", "woodbury"):
        # Push-through form of Woodbury: (lam I + J^T H J)^-1 = (I - J^T H (lam I + J J^T H)^-1 J) / lam.
        # lam I + K H (K = J J^T) has the eigenvalues of lam I + H^1/2 K H^1/2, all >= lam, so the
        # m x m LU solve is safe for a singular H (softmax blocks) and needs no square root of H.
        lam = drift.damping
        if lam <= 0.0:
            raise InvalidInputError("Woodbury needs damping > 0 (A = J^T H J is singular when m < N)")
        j, h = drift.J, drift.H
        small = (j @ j.T) @ h
        small[np.diag_indices_from(small)] += lam
        return (g - j.T @ (h @ np.linalg.solve(small, j @ g))) / lam
    if method == "woodbury":
        raise InvalidInputError("woodbury applies to Factored curvature only")
    a = drift.dense()
    c = scipy.linalg.cho_factor(0.5 * (a + a.T), lower=True)
    return scipy.linalg.cho_solve(c, g)


@dataclass
class SGD:
    """theta <- theta - lr * v, v = momentum * v + grad (momentum 0: plain SGD)."""

    lr: float
    momentum: float = 0.0
    _velocity: np.ndarray | None = field(default=None, repr=False)

    def update(self, direction: np.ndarray) -> np.ndarray:
        """delta for a given descent direction (the gradient, or a preconditioned gradient)."""
        if self.momentum:
            self._velocity = direction.copy() if self._velocity is None else \
                self.momentum * self._velocity + direction
            direction = self._velocity
        return -self.lr * direction

    def step(self, grad: np.ndarray, curvature: Drift | None = None) -> np.ndarray:
        return self.update(np.asarray(grad, dtype=np.float64))


@dataclass
class Adam:
    """Adam (Kingma and Ba) with bias correction, NumPy in and out."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    _m: np.ndarray | None = field(default=None, repr=False)
    _v: np.ndarray | None = field(default=None, repr=False)
    _t: int = field(default=0, repr=False)

    def update(self, direction: np.ndarray) -> np.ndarray:
        b1, b2 = self.betas
        if self._m is None:
            self._m = np.zeros_like(direction)
            self._v = np.zeros_like(direction)
        self._t += 1
        self._m = b1 * self._m + (1.0 - b1) * direction
        self._v = b2 * self._v + (1.0 - b2) * direction**2
        m_hat = self._m / (1.0 - b1**self._t)
        v_hat = self._v / (1.0 - b2**self._t)
        return -self.lr * m_hat / (np.sqrt(v_hat) + self.eps)

    def step(self, grad: np.ndarray, curvature: Drift | None = None) -> np.ndarray:
        return self.update(np.asarray(grad, dtype=np.float64))


@dataclass
class ExactNGD:
    """delta = -lr (G + damping I)^-1 grad by a direct solve (see ``natural_direction``)."""

    lr: float
    damping: float
    method: str = "auto"

    def direction(self, grad: np.ndarray, curvature: Drift) -> np.ndarray:
        return natural_direction(grad, damped(curvature, self.damping), self.method)

    def step(self, grad: np.ndarray, curvature: Drift) -> np.ndarray:
        return -self.lr * self.direction(grad, curvature)


@dataclass
class NGDCG:
    """delta = -lr x, x from at most ``maxiter`` CG iterations on (G + damping I) x = grad.

    Starts from zero each step (the paper's NGD-CG); ``rtol`` stops early when converged.
    """

    lr: float
    damping: float
    maxiter: int = 50
    rtol: float = 1e-6
    last_iterations: int = field(default=0, repr=False)

    def direction(self, grad: np.ndarray, curvature: Drift) -> np.ndarray:
        drift = damped(curvature, self.damping)
        g = np.asarray(grad, dtype=np.float64)
        n = g.shape[0]
        op = scipy.sparse.linalg.LinearOperator((n, n), matvec=drift.matvec, dtype=np.float64)
        count = [0]

        def _count(_x: np.ndarray) -> None:
            count[0] += 1

        x, _info = scipy.sparse.linalg.cg(op, g, rtol=self.rtol, atol=0.0, maxiter=self.maxiter,
                                          callback=_count)
        self.last_iterations = count[0]
        return x

    def step(self, grad: np.ndarray, curvature: Drift) -> np.ndarray:
        return -self.lr * self.direction(grad, curvature)
