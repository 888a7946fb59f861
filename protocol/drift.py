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
import weakref
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

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


# Arrays already scanned block by block as they arrived (chunked uploads, docs/protocol.md
# ``upload``): the constructors skip their own scan of exactly these objects. Weak: an array
# leaves the table when it is freed, so a recycled id() can never match another object.
_KNOWN_FINITE: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()


def mark_finite(arr: np.ndarray) -> None:
    """Record that ``arr`` (a base ndarray, not written to afterwards) holds no NaN or Inf."""
    _KNOWN_FINITE[id(arr)] = arr


def _known_finite(arr: np.ndarray) -> bool:
    return _KNOWN_FINITE.get(id(arr)) is arr


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
        if not (_known_finite(value) or all_finite(value)):  # the common case: from the wire or the host
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


def _trusted(cls: type, **fields: object) -> object:
    """An instance built without the checks of ``__post_init__``: for arrays derived in-process
    from an already validated drift (damping added, codes quantised, mismatch applied), so that a
    drift is scanned for NaN/Inf once, where it enters a process."""
    obj = object.__new__(cls)
    for k, v in fields.items():
        object.__setattr__(obj, k, v)
    return obj


def _symmetric(a: np.ndarray, rtol: float) -> bool:
    scale = float(np.max(np.abs(a)))
    return bool(np.max(np.abs(a - a.T)) <= rtol * max(scale, 1e-300))


# Relative tolerance below which a matrix counts as symmetric (host round-off is ~1e-16).
SYMMETRY_RTOL = 1e-10


@dataclass(frozen=True, eq=False)
class Dense:
    """A = matrix (N x N)."""

    matrix: np.ndarray

    form: ClassVar[str] = "dense"
    array_names: ClassVar[tuple[str, ...]] = ("matrix",)
    param_names: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        a = as_float_array(self.matrix, "Dense.matrix", 2)
        if a.shape[0] != a.shape[1]:
            raise ShapeError(f"Dense.matrix: must be square, got shape {a.shape}")
        object.__setattr__(self, "matrix", a)

    @classmethod
    def trusted(cls, matrix: np.ndarray) -> Dense:
        """No checks: ``matrix`` is derived from a validated drift (see ``_trusted``)."""
        return _trusted(cls, matrix=matrix)  # type: ignore[return-value]

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[0])

    def matvec(self, x: np.ndarray) -> np.ndarray:
        return self.matrix @ x

    def dense(self) -> np.ndarray:
        """A as an N x N float64 array (the matrix itself, not a copy, when it is float64)."""
        return np.asarray(self.matrix, dtype=np.float64)

    def damped(self, damping: float) -> Dense:
        a = np.array(self.matrix, dtype=np.float64)
        a[np.diag_indices_from(a)] += damping
        return Dense.trusted(a)

    def block(self, s: slice) -> Dense:
        """The diagonal block A[s, s] (a tile), built trusted from this validated drift."""
        return Dense.trusted(np.ascontiguousarray(self.matrix[s, s]))

    def is_symmetric(self, rtol: float = SYMMETRY_RTOL) -> bool:
        return _symmetric(np.asarray(self.matrix), rtol)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"matrix": self.matrix}

    def params(self) -> dict[str, float]:
        return {}


@dataclass(frozen=True, eq=False)
class Factored:
    """A = J^T H J + damping * I, with J (m x N) and H (m x m, symmetric PSD)."""

    J: np.ndarray
    H: np.ndarray
    damping: float = 0.0

    form: ClassVar[str] = "factored"
    array_names: ClassVar[tuple[str, ...]] = ("J", "H")
    param_names: ClassVar[tuple[str, ...]] = ("damping",)

    def __post_init__(self) -> None:
        j = as_float_array(self.J, "Factored.J", 2)
        h = as_float_array(self.H, "Factored.H", 2)
        m = j.shape[0]
        if h.shape != (m, m):
            raise ShapeError(f"Factored.H: expected shape ({m}, {m}) to match J {j.shape}, got {h.shape}")
        object.__setattr__(self, "J", j)
        object.__setattr__(self, "H", h)
        object.__setattr__(self, "damping", as_finite_scalar(self.damping, "Factored.damping", minimum=0.0))

    @classmethod
    def trusted(cls, J: np.ndarray, H: np.ndarray, damping: float = 0.0) -> Factored:  # noqa: N803
        """No checks: the arrays are derived from a validated drift (see ``_trusted``)."""
        return _trusted(cls, J=J, H=H, damping=float(damping))  # type: ignore[return-value]

    @property
    def dim(self) -> int:
        return int(self.J.shape[1])

    @property
    def rank_bound(self) -> int:
        """m, the number of rows of J (an upper bound on the rank of J^T H J)."""
        return int(self.J.shape[0])

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """A x in O(mN + m^2), never forming A."""
        return self.J.T @ (self.H @ (self.J @ x)) + self.damping * x

    def dense(self) -> np.ndarray:
        """J^T H J + damping I as N x N (O(m N^2) work, N^2 memory), exactly symmetric."""
        j = np.asarray(self.J, dtype=np.float64)
        a = j.T @ (np.asarray(self.H, dtype=np.float64) @ j)
        a = 0.5 * (a + a.T)
        a[np.diag_indices_from(a)] += self.damping
        return a

    def damped(self, damping: float) -> Factored:
        return Factored.trusted(self.J, self.H, self.damping + damping)

    def block(self, s: slice) -> Factored:
        """The diagonal block A[s, s] = J[:, s]^T H J[:, s] + damping I: no N x N matrix."""
        return Factored.trusted(np.ascontiguousarray(self.J[:, s]), self.H, self.damping)

    def is_symmetric(self, rtol: float = SYMMETRY_RTOL) -> bool:
        return _symmetric(np.asarray(self.H), rtol)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"J": self.J, "H": self.H}

    def params(self) -> dict[str, float]:
        return {"damping": self.damping}


@dataclass(frozen=True, eq=False)
class Diagonal:
    """A = diag(diag)."""

    diag: np.ndarray

    form: ClassVar[str] = "diagonal"
    array_names: ClassVar[tuple[str, ...]] = ("diag",)
    param_names: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "diag", as_float_array(self.diag, "Diagonal.diag", 1))

    @classmethod
    def trusted(cls, diag: np.ndarray) -> Diagonal:
        """No checks: ``diag`` is derived from a validated drift (see ``_trusted``)."""
        return _trusted(cls, diag=diag)  # type: ignore[return-value]

    @property
    def dim(self) -> int:
        return int(self.diag.shape[0])

    def matvec(self, x: np.ndarray) -> np.ndarray:
        return self.diag * x

    def dense(self) -> np.ndarray:
        return np.diag(np.asarray(self.diag, dtype=np.float64))

    def damped(self, damping: float) -> Diagonal:
        return Diagonal.trusted(self.diag + damping)

    def block(self, s: slice) -> Diagonal:
        return Diagonal.trusted(np.ascontiguousarray(self.diag[s]))

    def is_symmetric(self, rtol: float = SYMMETRY_RTOL) -> bool:
        return True

    def arrays(self) -> dict[str, np.ndarray]:
        return {"diag": self.diag}

    def params(self) -> dict[str, float]:
        return {}


Drift = Dense | Factored | Diagonal
DRIFT_CLASSES: dict[str, type] = {"dense": Dense, "factored": Factored, "diagonal": Diagonal}
DRIFT_FORMS: tuple[str, ...] = tuple(DRIFT_CLASSES)


def drift_form(drift: Drift) -> str:
    """The wire name of a drift description's form."""
    form = getattr(type(drift), "form", None)
    if DRIFT_CLASSES.get(form) is not type(drift):
        raise InvalidInputError(f"not a drift description: {type(drift).__name__} "
                                "(expected Dense, Factored or Diagonal)")
    return form


def drift_from_arrays(form: object, arrays: Mapping[str, np.ndarray], params: Mapping[str, object] | None = None,
                      *, where: str = "drift") -> Drift:
    """Rebuild a drift from its form name, its named arrays and its scalars (``arrays()``,
    ``params()``), validating like the constructors. Errors name ``where``."""
    cls = DRIFT_CLASSES.get(form) if isinstance(form, str) else None
    if cls is None:
        raise InvalidInputError(f"{where}: unknown drift form {form!r} (known: {', '.join(DRIFT_FORMS)})")
    missing = [k for k in cls.array_names if k not in arrays]
    if missing:
        raise InvalidInputError(f"{where}: a {form} drift needs the array {missing[0]!r}")
    kwargs: dict[str, object] = {k: arrays[k] for k in cls.array_names}
    if cls is Factored:
        kwargs["damping"] = (params or {}).get("damping", 0.0)
    return cls(**kwargs)


def drift_matvec(drift: Drift, x: np.ndarray) -> np.ndarray:
    """A @ x without forming A (O(mN + m^2) for Factored): ``drift.matvec(x)``."""
    drift_form(drift)
    return drift.matvec(x)
