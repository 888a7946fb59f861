"""Drift descriptions: what a host programs into a device.

The overdamped device integrates ``dx = -(A x - b) dt + sqrt(2 kappa) dW``. A host never has to
form the N x N matrix A when its curvature is a product, so A is described in one of three forms:

* ``Dense(matrix)``: A given explicitly (N x N, positive-stable; need not be symmetric, since
  mismatch makes real couplings asymmetric).
* ``Factored(J, H, damping)``: A = J^T H J + damping * I with J (m x N) and H (m x m, symmetric
  PSD). One drift product costs O(mN + m^2); this is the TNGD hardware's three resistor arrays.
* ``Diagonal(diag)``: A = diag(d).

These classes check what can be checked without physics (shapes, dtypes, finiteness). Whether a
drift is positive-stable is the device's call: it raises ``NotStableError``.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInputError, NonFiniteError, ShapeError

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_SMALL_BYTES = 64 << 10  # below this np.isfinite is as fast and needs no error-state switch
_SPLIT_BYTES = 4 << 20  # above this, the finiteness scan runs on two threads
_pool: ThreadPoolExecutor | None = None


def _dot_finite(flat: np.ndarray) -> bool:
    # x.x is NaN or Inf whenever some x_i is, and BLAS reads x once without allocating (np.isfinite
    # writes a bool array as large as x: 2.7 ms for 25 MB against 1.9 ms). A finite x whose square
    # overflows only sends the caller to the exact check.
    with np.errstate(over="ignore", invalid="ignore"):
        return math.isfinite(float(np.dot(flat, flat)))


def all_finite(arr: np.ndarray) -> bool:
    """True when no element of a float array is NaN or Inf.

    Large contiguous arrays are scanned in two halves on two threads (NumPy releases the GIL), so a
    25 MB J costs about 0.9 ms instead of 2.7 ms on this project's 2-core reference machine.
    """
    global _pool
    if arr.nbytes < _SMALL_BYTES or not arr.flags.c_contiguous:
        return bool(np.isfinite(arr).all())
    flat = arr.reshape(-1)
    if flat.nbytes >= _SPLIT_BYTES:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finite-scan")
        half = flat.size // 2
        other = _pool.submit(_dot_finite, flat[half:])
        ok = _dot_finite(flat[:half])
        ok = other.result() and ok
    else:
        ok = _dot_finite(flat)
    return ok or bool(np.isfinite(arr).all())


def as_float_array(value: object, name: str, ndim: int) -> np.ndarray:
    """Return ``value`` as a float32/float64 ndarray of ``ndim`` dims, finite, or raise.

    Float32 and float64 inputs are kept as they are (no copy), so a large J travels without
    conversion; anything else numeric is converted to float64.
    """
    if type(value) is np.ndarray and value.dtype in _FLOAT_DTYPES and value.ndim == ndim and value.size:
        if not all_finite(value):  # the common case, a float array from the wire or the host
            raise NonFiniteError(f"{name}: contains NaN or Inf")
        return value
    try:
        arr = np.asarray(value)
    except Exception as exc:  # pragma: no cover - exotic array-likes
        raise InvalidInputError(f"{name}: cannot be read as an array ({exc})") from exc
    if arr.dtype not in _FLOAT_DTYPES:
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise InvalidInputError(f"{name}: expected a real numeric array, got dtype {arr.dtype}")
        if np.iscomplexobj(arr):
            raise InvalidInputError(f"{name}: complex values are not supported")
        arr = arr.astype(np.float64)
    if arr.ndim != ndim:
        raise ShapeError(f"{name}: expected {ndim}-D array, got shape {arr.shape}")
    if any(s == 0 for s in arr.shape):
        raise ShapeError(f"{name}: empty array of shape {arr.shape}")
    if not all_finite(arr):
        raise NonFiniteError(f"{name}: contains NaN or Inf")
    return arr


def as_finite_scalar(value: object, name: str, *, minimum: float | None = None) -> float:
    """A finite float, optionally bounded below (inclusive), or a typed error naming ``name``."""
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name}: expected a number, got {value!r}") from exc
    if not np.isfinite(x):
        raise NonFiniteError(f"{name}: must be finite, got {x}")
    if minimum is not None and x < minimum:
        raise InvalidInputError(f"{name}: must be >= {minimum}, got {x}")
    return x


@dataclass(frozen=True, eq=False)
class Dense:
    """A = matrix (N x N)."""

    matrix: np.ndarray

    def __post_init__(self) -> None:
        a = as_float_array(self.matrix, "Dense.matrix", 2)
        if a.shape[0] != a.shape[1]:
            raise ShapeError(f"Dense.matrix: must be square, got shape {a.shape}")
        object.__setattr__(self, "matrix", a)

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[0])


@dataclass(frozen=True, eq=False)
class Factored:
    """A = J^T H J + damping * I, with J (m x N) and H (m x m, symmetric PSD)."""

    J: np.ndarray
    H: np.ndarray
    damping: float = 0.0

    def __post_init__(self) -> None:
        j = as_float_array(self.J, "Factored.J", 2)
        h = as_float_array(self.H, "Factored.H", 2)
        m = j.shape[0]
        if h.shape != (m, m):
            raise ShapeError(f"Factored.H: expected shape ({m}, {m}) to match J {j.shape}, got {h.shape}")
        object.__setattr__(self, "J", j)
        object.__setattr__(self, "H", h)
        object.__setattr__(self, "damping", as_finite_scalar(self.damping, "Factored.damping", minimum=0.0))

    @property
    def dim(self) -> int:
        return int(self.J.shape[1])

    @property
    def rank_bound(self) -> int:
        """m, the number of rows of J (an upper bound on the rank of J^T H J)."""
        return int(self.J.shape[0])


@dataclass(frozen=True, eq=False)
class Diagonal:
    """A = diag(diag)."""

    diag: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "diag", as_float_array(self.diag, "Diagonal.diag", 1))

    @property
    def dim(self) -> int:
        return int(self.diag.shape[0])


Drift = Dense | Factored | Diagonal
DRIFT_FORMS: tuple[str, ...] = ("dense", "factored", "diagonal")


def drift_form(drift: Drift) -> str:
    """The wire name of a drift description's form."""
    if isinstance(drift, Dense):
        return "dense"
    if isinstance(drift, Factored):
        return "factored"
    if isinstance(drift, Diagonal):
        return "diagonal"
    raise InvalidInputError(f"not a drift description: {type(drift).__name__} "
                            "(expected Dense, Factored or Diagonal)")


def drift_matvec(drift: Drift, x: np.ndarray) -> np.ndarray:
    """A @ x without forming A (O(mN + m^2) for Factored). For checks and host-side residuals."""
    if isinstance(drift, Dense):
        return drift.matrix @ x
    if isinstance(drift, Diagonal):
        return drift.diag * x
    if isinstance(drift, Factored):
        return drift.J.T @ (drift.H @ (drift.J @ x)) + drift.damping * x
    raise InvalidInputError(f"not a drift description: {type(drift).__name__}")
