"""One BLAS thread per process unless the user asks otherwise.

On a shared machine a multi-threaded BLAS pool oversubscribes the cores: measured on the project's
2-core machine, an N = 1024 solve took 2.56 s with the library's default against 0.72 s with one
thread, and single eigvalsh calls collapsed by 100x while another process ran. The thread count
also fixes the numbers (GEMM and eigh split their sums by thread), so the daemon, the embedded
emulator and a directly built ``Emulator`` must agree on it.

Importing ``thermo_device`` caps the BLAS pools (NumPy's and SciPy's OpenBLAS, which numba's
np.dot also calls) to ``THERMO_NGD_BLAS_THREADS`` threads, default 1; 0 leaves the library's
default. ``set_blas_threads`` changes it later (the daemon's ``--blas-threads``).
"""

from __future__ import annotations

import os

import scipy.linalg  # noqa: F401 - load SciPy's BLAS before capping, or its pool stays uncapped
from threadpoolctl import threadpool_info, threadpool_limits

ENV = "THERMO_NGD_BLAS_THREADS"
# The pools' thread counts before this module capped them: what 0 restores.
_DEFAULT = {p["filepath"]: p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}


def requested_threads() -> int:
    """The thread count from the environment (default 1); ValueError names the variable."""
    text = os.environ.get(ENV, "1").strip()
    try:
        threads = int(text)
    except ValueError:
        raise ValueError(f"{ENV} must be an integer >= 0 (0: the BLAS library's default), got {text!r}") from None
    if threads < 0:
        raise ValueError(f"{ENV} must be an integer >= 0 (0: the BLAS library's default), got {threads}")
    return threads


def set_blas_threads(threads: int) -> None:
    """Cap every loaded BLAS pool to ``threads`` for the rest of the process (0: library default)."""
    if threads < 0:
        raise ValueError(f"BLAS threads must be >= 0 (0: the library's default), got {threads}")
    if threads:
        threadpool_limits(threads, user_api="blas")
    else:
        threadpool_limits(_DEFAULT)


def blas_threads() -> list[int]:
    """The thread count of every loaded BLAS pool (for reports and tests)."""
    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]


set_blas_threads(requested_threads())
