"""Set-up and sampling of a general linear SDE without Van Loan (``exact.GeneralPropagator``).

The system is dz = -(F z - c) dt + G dW, D = G G^T, F positive-stable and possibly non-normal;
temperature scales it to (r F, r kappa D). Its exact transition over a step h is

    z <- z* + Phi (z - z*) + xi,   Phi = e^{-r F h},   xi ~ N(0, Q),   Q = kappa (S - Phi S Phi^T)

with S the stationary covariance at kappa = 1: F S + S F^T = D. S does not depend on r (both rates
scale) and is linear in kappa, so one S serves every chunk of a run. Two ways to use it:

**Eigenbasis** (``EigenBasis``), when F is diagonalisable with a well-conditioned eigenbasis. In
real block coordinates y = X^-1 z, F = X B X^-1 with B block diagonal (1 x 1 for a real eigenvalue,
[[a, b], [-b, a]] for a pair a +- ib, X = [Re v, Im v]). In the complex eigenbasis the transition
covariance is entrywise, with no cancellation at any step (expm1):

    Q_u[i, j] = kappa D_u[i, j] (1 - e^{-r (l_i + conj l_j) h}) / (l_i + conj l_j),  D_u = V^-1 D V^-H

and Q_y = W Q_u W^H (V = X W, W 2 x 2 per pair). The mean step is O(n) (B is block diagonal), the
correlated noise of a block of steps is one GEMM (the normals times chol(Q_y)^T), and the stored
readouts are one GEMM (y times X[:n_out]^T). Set-up: one ``eig`` and one inverse per program, O(n^2)
plus one Cholesky per (h, r, kappa).

Error bound of the eigenbasis. With the computed X, B and Y = X^-1 the sampler is exact for the
drift F~ = X B Y and the diffusion X fl(Y D Y^T) X^T. F~ - F = (X B - F X) Y + F (X Y - I): both
terms are measured (residual R = F X - X B, one GEMM) and ~ u kappa(X) for a backward-stable
``eig``. The noise covariance goes through Y twice and back through X twice, so its backward
error is ~ u kappa(X)^2 relative to ||Q||. ``BASIS_COND_MAX`` = 1e4 keeps that below 1.1e-8 (u =
1.1e-16): three orders under a 16-bit converter's LSB, and ~1e16 samples would be needed to see
it. Beyond it (or when the measured drift backward error exceeds ``BASIS_BACKWARD_MAX``, as for a
defective F) the propagator uses the dense form below and the per-step gemv kernel.

**Dense** (``lyapunov_transition``): S by a blocked Bartels-Stewart solve (real Schur, then a
recursive triangular Sylvester solve whose work is GEMMs; scipy's ``solve_continuous_lyapunov``
calls the unblocked LAPACK ``trsyl`` and takes 10 s at n = 1024, 2.4x the whole Van Loan set-up),
Phi = expm(-r F h) (n x n, not 2n x 2n), Q = kappa (S - Phi S Phi^T). The subtraction cancels:
with S known to relative accuracy e_S (its measured Lyapunov residual) and the products rounded,
the error of Q is about (e_S + c u) (1 + ||Phi||^2) ||S||, i.e. relative ~ e ||S|| / ||Q|| (||Q||
~ 2 h margin ||S|| for small steps). ``lyapunov_transition`` returns that estimate; the caller falls
back to Van Loan when it exceeds ``LYAPUNOV_REL_MAX`` or Q has an eigenvalue below -that * ||Q||.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
from numba import njit
from scipy.linalg.lapack import dtrsyl

EPS = float(np.finfo(np.float64).eps)
# u kappa(X)^2 <= 1.1e-8: see the module docstring.
BASIS_COND_MAX = 1e4
# Measured drift backward error ||F~ - F|| / ||F|| allowed for the eigenbasis (a defective or
# nearly defective F fails here even when the condition estimate is fooled).
BASIS_BACKWARD_MAX = 1e-10
# Relative error estimate of Q = kappa (S - Phi S Phi^T) allowed before falling back to Van Loan.
LYAPUNOV_REL_MAX = 1e-8
# ``GeneralPropagator(method="auto")`` keeps the original Van Loan set-up and gemv kernel for
# systems of at most this dimension. Both are cheap there (a 2n x 2n expm, O(n^2) per step), and
# the Van Loan path draws the random stream recorded before issue 15 (tests/bits_cases.py: n = 6
# and the 8-cell board, dimension 16), which the eigenbasis maps through other, equally
# distributed, factors. 0: the new paths at every size.
VAN_LOAN_MAX_DIM = 0
_SYLVESTER_BLOCK = 64  # below this, LAPACK's unblocked trsyl; above, split and GEMM


def norm2_estimate(m: np.ndarray, iters: int = 40) -> float:
    """||m||_2 by power iteration on m^T m from a fixed start (deterministic, a lower bound that
    is typically within a few per cent; O(n^2) per iteration instead of an O(n^3) SVD)."""
    n = m.shape[1]
    v = np.cos(np.arange(n) * 0.7 + 0.3)  # fixed, not orthogonal to anything in particular
    v /= np.linalg.norm(v)
    est = 0.0
    for _ in range(iters):
        w = m @ v
        v = m.T @ w
        nv = float(np.linalg.norm(v))
        if nv == 0.0:
            return 0.0
        new = float(np.sqrt(nv))
        v /= nv
        if abs(new - est) <= 1e-2 * new:  # a threshold test needs no more
            return new
        est = new
    return est


# --- stationary covariance: blocked Bartels-Stewart -------------------------------------------

def _split(t: np.ndarray) -> int:
    """A split point of a real quasi-triangular matrix that does not cut a 2 x 2 block."""
    k = t.shape[0] // 2
    if t[k, k - 1] != 0.0:
        k += 1
    return k


def _tri_sylvester(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Solve a X + X b^T = c with a, b upper quasi-triangular (recursive, Jonsson-Kagstrom)."""
    m, n = c.shape
    if m <= _SYLVESTER_BLOCK and n <= _SYLVESTER_BLOCK:
        x, scale, info = dtrsyl(a, b, c, tranb="T")
        if info < 0:
            raise ValueError(f"trsyl: illegal argument {-info}")
        # info = 1: a near-singular Sylvester operator (eigenvalues summing to ~0), impossible
        # for a positive-stable F; the perturbed solution is still returned by LAPACK.
        return x / scale if scale != 1.0 else x
    if m >= n and m > 1:
        k = _split(a)
        if k < m:
            x2 = _tri_sylvester(a[k:, k:], b, c[k:])
            x1 = _tri_sylvester(a[:k, :k], b, c[:k] - a[:k, k:] @ x2)
            return np.vstack((x1, x2))
    k = _split(b)
    x2 = _tri_sylvester(a, b[k:, k:], c[:, k:])
    x1 = _tri_sylvester(a, b[:k, :k], c[:, :k] - x2 @ b[:k, k:].T)
    return np.hstack((x1, x2))


def stationary_covariance(f: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, float]:
    """S with F S + S F^T = D, and its relative residual ||F S + S F^T - D|| / (2 ||F|| ||S||
    + ||D||) (Frobenius): the backward error the cancellation estimate of Q starts from."""
    t, u = scipy.linalg.schur(f, output="real")
    c = u.T @ d @ u
    y = _tri_sylvester(t, t, np.ascontiguousarray(c))
    s = u @ y @ u.T
    s = 0.5 * (s + s.T)
    res = f @ s
    res = res + res.T - d
    scale = 2.0 * np.linalg.norm(f) * np.linalg.norm(s) + np.linalg.norm(d)
    return s, float(np.linalg.norm(res) / max(scale, 1e-300))


def lyapunov_transition(f: np.ndarray, s: np.ndarray, s_residual: float, h: float, r: float,
                        kappa: float) -> tuple[np.ndarray, np.ndarray, float]:
    """(Phi, Q, relative error estimate of Q) with Phi = expm(-r F h), Q = kappa (S - Phi S Phi^T).

    The estimate is (e_S + 16 u)(1 + ||Phi||^2) ||S|| / ||Q|| (2-norms, see the module docstring);
    inf when Q vanishes (kappa = 0 needs no noise factor and is handled by the caller)."""
    phi = scipy.linalg.expm(f * (-r * h))
    q = s - phi @ s @ phi.T
    q = kappa * 0.5 * (q + q.T)
    qn = norm2_estimate(q)
    if qn == 0.0:
        return phi, q, np.inf
    err = (s_residual + 16 * EPS) * (1.0 + norm2_estimate(phi) ** 2) * kappa * norm2_estimate(s) / qn
    return phi, q, float(err)


def psd_factor(q: np.ndarray, tol: float) -> np.ndarray | None:
    """A square root L (L L^T = Q) of a PSD Q that may be singular (the RLC currents get no
    direct noise): eigen decomposition with round-off negatives clipped. None when an eigenvalue
    is below -tol ||Q||, i.e. Q is not PSD to its own accuracy."""
    evals, evecs = np.linalg.eigh(q)
    top = max(float(np.max(np.abs(evals))), 1e-300)
    if evals[0] < -tol * top:
        return None
    return np.ascontiguousarray(evecs * np.sqrt(np.clip(evals, 0.0, None)))


# --- eigenbasis ----------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class EigenBasis:
    """F = X B X^-1 in real block coordinates, with everything the per-step coefficients need."""

    x_out: np.ndarray  # X[:n_out], maps y to the readout (contiguous)
    x: np.ndarray  # X (n x n)
    y: np.ndarray  # X^-1
    lam: np.ndarray  # complex eigenvalue per column (pairs as a + ib, a - ib at p, p + 1)
    pair: np.ndarray  # bool, True at the first index p of each complex pair
    partner: np.ndarray  # int64, p <-> p + 1 for a pair, i for a real eigenvalue
    s_u: np.ndarray  # stationary covariance in the complex eigenbasis at kappa = 1 (n x n)
    cond: float  # kappa_2(X) estimate
    backward: float  # measured ||F~ - F||_1 / ||F||_1

    def to_basis(self, z: np.ndarray) -> np.ndarray:
        return self.y @ z


def _w_rows(m: np.ndarray, p: np.ndarray) -> np.ndarray:
    """W M for V = X W: row p <- M[p] + M[p+1], row p+1 <- i (M[p] - M[p+1])."""
    out = m.astype(np.complex128, copy=True)
    a, b = m[p], m[p + 1]
    out[p] = a + b
    out[p + 1] = 1j * (a - b)
    return out


def _w_inv_rows(m: np.ndarray, p: np.ndarray) -> np.ndarray:
    """W^-1 M: row p <- (M[p] - i M[p+1]) / 2, row p+1 <- (M[p] + i M[p+1]) / 2."""
    out = m.astype(np.complex128, copy=True)
    a, b = m[p], m[p + 1]
    out[p] = 0.5 * (a - 1j * b)
    out[p + 1] = 0.5 * (a + 1j * b)
    return out


def eigen_basis(f: np.ndarray, d: np.ndarray, n_out: int) -> EigenBasis | None:
    """The real block eigenbasis of F, or None when it is too ill-conditioned to sample in (see
    ``BASIS_COND_MAX`` and ``BASIS_BACKWARD_MAX``)."""
    n = f.shape[0]
    try:
        lam, v = scipy.linalg.eig(f, check_finite=False)
    except (np.linalg.LinAlgError, ValueError):
        return None
    x = np.empty((n, n))
    pair = np.zeros(n, dtype=bool)
    partner = np.arange(n, dtype=np.int64)
    j = 0
    while j < n:
        if lam[j].imag == 0.0:
            x[:, j] = v[:, j].real
            j += 1
            continue
        # LAPACK returns a complex pair consecutively, positive imaginary part first
        if j + 1 >= n or lam[j + 1] != np.conj(lam[j]) or lam[j].imag < 0.0:
            return None
        x[:, j] = v[:, j].real
        x[:, j + 1] = v[:, j].imag
        pair[j] = True
        partner[j], partner[j + 1] = j + 1, j
        j += 2
    if np.any(lam.real <= 0.0):
        return None
    try:
        y = np.linalg.inv(x)
    except np.linalg.LinAlgError:
        return None
    if not np.all(np.isfinite(y)):
        return None
    cond = norm2_estimate(x) * norm2_estimate(y)
    if not cond <= BASIS_COND_MAX:
        return None
    # B in real block form: x_p' = a x_p - b x_q... F [Re v, Im v] = [Re v, Im v] [[a, b], [-b, a]]
    xb = x * lam.real
    p = np.nonzero(pair)[0]
    xb[:, p] += -lam.imag[p] * x[:, p + 1]
    xb[:, p + 1] += lam.imag[p] * x[:, p]
    resid = f @ x - xb
    fn = np.linalg.norm(f, 1)
    backward = (np.linalg.norm(resid, 1) * np.linalg.norm(y, 1) / fn
                + np.linalg.norm(x @ y - np.eye(n), 1))
    if not backward <= BASIS_BACKWARD_MAX:
        return None
    d_y = y @ d @ y.T
    d_u = _w_inv_rows(_w_inv_rows(d_y, p).T.conj(), p).T.conj()  # W^-1 D_y W^-H
    den = lam[:, None] + np.conj(lam)[None, :]
    s_u = d_u / den
    return EigenBasis(np.ascontiguousarray(x[:n_out]), x, y, lam, pair, partner, s_u, float(cond),
                      float(backward))


@dataclass(frozen=True, eq=False)
class BasisStep:
    """Per (h, r, kappa): y <- y* + P (y - y*) + L xi in the block basis."""

    pdiag: np.ndarray
    poff: np.ndarray
    lt: np.ndarray  # L^T (n x n), noise block times lt = correlated noise; zero-size if kappa = 0
    target: np.ndarray  # y* = X^-1 z*


def basis_step(basis: EigenBasis, target_y: np.ndarray, h: float, r: float,
               kappa: float) -> BasisStep | None:
    """The block-basis coefficients of one step; None when Q_y has no factor to its accuracy."""
    lam = basis.lam
    p = np.nonzero(basis.pair)[0]
    e = np.exp(-r * h * lam.real)
    pdiag = e.copy()
    poff = np.zeros_like(e)
    ang = r * h * lam.imag[p]
    # e^{-B h} on a pair block [[a, b], [-b, a]]: e^{-a h} [[cos bh, -sin bh], [sin bh, cos bh]]
    pdiag[p] = e[p] * np.cos(ang)
    pdiag[p + 1] = pdiag[p]
    poff[p] = -e[p] * np.sin(ang)
    poff[p + 1] = -poff[p]
    n = lam.shape[0]
    if kappa > 0.0:
        den = lam[:, None] + np.conj(lam)[None, :]
        q_u = basis.s_u * (-np.expm1(-(r * h) * den)) * kappa  # no cancellation at any h
        q_y = _w_rows(_w_rows(q_u, p).T.conj(), p).T.conj().real  # W Q_u W^H, real
        q_y = 0.5 * (q_y + q_y.T)
        try:
            lt = np.linalg.cholesky(q_y).T
        except np.linalg.LinAlgError:
            # singular to round-off (a noise-free direction): the clipped eigen square root
            fac = psd_factor(q_y, 1e-8)
            if fac is None:
                return None
            lt = fac.T
        lt = np.ascontiguousarray(lt)
    else:
        lt = np.zeros((n, 0))
    return BasisStep(pdiag, poff, lt, target_y)


@njit(cache=True, nogil=True)
def basis_window(y, pdiag, poff, partner, target, lt, x_out_t, noise, buf, k0, stride, total, out,
                 total_outer):
    """Advance y by noise.shape[0] exact steps in the block eigenbasis.

    The correlated noise of the whole block is one GEMM into ``buf`` (normals times L^T); each
    step is O(n) (B is block diagonal) and overwrites its row of ``buf`` with the new state, so
    the stored readouts (one GEMM with X[:n_out]^T) and the second moment (one GEMM, y^T y) are
    taken from ``buf`` after the loop. ``total`` and ``total_outer`` are in basis coordinates.
    """
    n = y.shape[0]
    k = noise.shape[0]
    noisy = noise.shape[1] == n
    rows = buf[:k]
    if noisy:
        np.dot(noise, lt, rows)
    u = np.empty(n)
    for j in range(k):
        for i in range(n):
            u[i] = y[i] - target[i]
        for i in range(n):
            v = target[i] + pdiag[i] * u[i] + poff[i] * u[partner[i]]
            if noisy:
                v += rows[j, i]
            y[i] = v
            total[i] += v
            rows[j, i] = v
    if stride > 0:
        first = (k0 // stride + 1) * stride  # first stored global step (1-based) in this block
        if first <= k0 + k:
            last = (k0 + k) // stride
            m = last - first // stride + 1
            o = out[first // stride - 1: last]
            if stride == 1:
                np.dot(rows, x_out_t, o)
            else:
                sel = np.empty((m, n))
                for a in range(m):
                    sel[a] = rows[first - k0 - 1 + a * stride]
                np.dot(sel, x_out_t, o)
    if total_outer.shape[0] == n:
        total_outer += np.dot(rows.T, rows)
