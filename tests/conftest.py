"""Shared fixtures: test matrices with known spectra, and emulator factories."""

from __future__ import annotations

import numpy as np
import pytest

from thermo_device import Emulator, load_profile


def spd_matrix(n: int, cond: float, seed: int, lo: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A = Q diag(lam) Q^T with lam log-spaced in [lo, lo * cond]; returns (A, lam)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = lo * np.logspace(0.0, np.log10(cond), n)
    return (q * lam) @ q.T, lam


def emulator(seed: int = 0, **overrides: object) -> Emulator:
    """Emulator on the ideal profile with dotted overrides given as section__key=value."""
    ov = {k.replace("__", "."): v for k, v in overrides.items()}
    return Emulator(load_profile("ideal", ov), seed=seed)


@pytest.fixture
def make_emulator():
    return emulator
