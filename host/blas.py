"""One BLAS thread per process on the host side too (``thermo_device.blas`` says why).

Importing ``host`` caps NumPy's and SciPy's BLAS pools to ``THERMO_NGD_BLAS_THREADS`` threads,
default 1 (0 leaves the library's default), so ``host.linalg``, ``thermo-host solve`` and the
digital baselines run as the emulator does. The host cannot import the emulator's module (the
rooms meet only through ``protocol``), hence this short twin.
"""

from __future__ import annotations

import os

import scipy.linalg  # noqa: F401 - load SciPy's BLAS before capping, or its pool stays uncapped
from threadpoolctl import threadpool_limits

ENV = "THERMO_NGD_BLAS_THREADS"


def cap_from_environment() -> None:
    text = os.environ.get(ENV, "1").strip()
    if not text.isdigit():
        raise ValueError(f"{ENV} must be an integer >= 0 (0: the BLAS library's default), got {text!r}")
    if int(text):
        threadpool_limits(int(text), user_api="blas")


cap_from_environment()
