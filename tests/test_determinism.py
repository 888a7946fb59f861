"""Same profile + seed = same numbers, whether the numba kernels were compiled in this process or
loaded from numba's cache. A daemon usually runs with a warm cache while a host compiles afresh
(or the other way round), and the host checks the daemon against its embedded emulator bit for
bit; with LLVM's full fast-math flag set the two rounded differently (1 ulp in the Factored Heun
state, found by tests/test_protocol_doc_client.py on a fresh clone)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# Every time-stepped kernel path: the three drift forms on the noisy profile (Heun), 1/f noise
# (flicker poles inside the stepping loop) and the underdamped RLC board (BAOAB), with a delay,
# readouts and the second moment.
SCRIPT = """
import sys
import numpy as np
from thermo_device import Dense, Diagonal, Emulator, Factored, load_profile
rng = np.random.default_rng(0)
n = 6
q, _ = np.linalg.qr(rng.standard_normal((n, n)))
a = (q * np.logspace(0, 1, n)) @ q.T * 0.2
bias = rng.standard_normal(n) * 0.1
j, h = rng.standard_normal((3, n)) * 0.3, np.eye(3) * 0.5
cases = [("noisy", {"integrator.method": "heun"}, d, bias) for d in (Dense(a), Factored(j, h, damping=0.3),
                                          Diagonal(np.linspace(0.5, 2.0, n).astype(np.float32)))]
cases += [("ideal", {"noise.flicker_corner": 0.1, "integrator.method": "heun"}, Dense(a), bias),
          ("spu-8cell", {"integrator.method": "baoab"}, Dense(a), None)]  # an RLC array takes no bias
out = []
for profile, overrides, drift, b in cases:
    emu = Emulator(load_profile(profile, overrides), seed=11)
    emu.program(drift, b)
    emu.run(0.5)
    r = emu.run(5.0, burn_in=1.0, delay=0.5, samples=4, second_moment=True)
    method = r.diagnostics["method"]
    assert method in ("heun", "baoab"), (profile, method)
    out += [r.mean, r.state, r.samples.ravel(), r.second_moment.ravel()]
np.save(sys.argv[1], np.concatenate(out))
"""


def _run(cache: Path, out: Path) -> np.ndarray:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    subprocess.run([sys.executable, "-c", SCRIPT, str(out)], check=True, timeout=600, cwd=ROOT, env=env)
    return np.load(out)


def test_cold_compile_and_cached_kernels_give_the_same_bits(tmp_path):
    cache = tmp_path / "numba-cache"
    cold = _run(cache, tmp_path / "cold.npy")  # empty cache: compiled in process, then cached
    assert any(cache.rglob("*.nbi")), "the first run should have written numba's cache"
    warm = _run(cache, tmp_path / "warm.npy")  # the same kernels, loaded from that cache
    assert cold.shape == warm.shape and np.isfinite(cold).all()
    assert np.array_equal(cold, warm), f"max difference {np.abs(cold - warm).max():.3g}"
