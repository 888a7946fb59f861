"""How much the BLAS thread count moves the numbers; writes benchmarks/results/blas_threads.json.

1. The emulator alone: Dense drift, N = 600, exact path (eigh, GEMM), the same seed run in two
   subprocesses with 1 and with 2 BLAS threads: the largest difference of the final state.
2. Training behind the wire: digits TNGD on a noisy device (kappa 1e-3), 6 steps, through a daemon
   started with ``--blas-threads K`` for K = 1 and 0 (the library's default, 2 on this machine),
   against the same run on the embedded emulator (``train`` limits it to 1 thread): the largest
   loss difference per K (0 means bit-identical).

Run: python3 benchmarks/bench_blas_threads.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import start_server, write_json  # noqa: E402

EMULATOR = """
import sys
import numpy as np
from threadpoolctl import threadpool_limits
from thermo_device import Dense, Emulator, load_profile
rng = np.random.default_rng(8)
n = 600
q, _ = np.linalg.qr(rng.standard_normal((n, n)))
a, b = (q * np.logspace(0, 1, n)) @ q.T, rng.standard_normal(n)
with threadpool_limits(int(sys.argv[2]), user_api="blas"):
    emu = Emulator(load_profile("ideal"), 2)
    emu.program(Dense(a), b)
    np.save(sys.argv[1], emu.run(2.0, samples=2).state)
"""


def emulator_state_difference(tmp: Path) -> float:
    states = []
    for threads in (1, 2):
        out = tmp / f"state{threads}.npy"
        subprocess.run([sys.executable, "-c", EMULATOR, str(out), str(threads)], check=True, cwd=ROOT,
                       timeout=600)
        states.append(np.load(out))
    return float(np.abs(states[0] - states[1]).max())


def training_loss_difference(daemon_blas_threads: int) -> float:
    from host.tasks import train

    proc, endpoint = start_server([sys.executable, "-m", "thermo_device.cli", "serve", "--profile", "ideal",
                                   "--set", "noise.kappa=1e-3", "--bind", "tcp://127.0.0.1:*",
                                   "--blas-threads", str(daemon_blas_threads), "--log-level", "WARNING"])
    try:
        remote = train("digits", "tngd", steps=6, eval_every=3, device=endpoint)
    finally:
        proc.kill()
        proc.wait()
    local = train("digits", "tngd", steps=6, eval_every=3, device="embedded:ideal",
                  device_overrides={"noise.kappa": 1e-3})
    return float(max(abs(a - b) for a, b in zip(remote.loss, local.loss, strict=True)))


def main() -> None:
    tmp = ROOT / "benchmarks" / "results" / ".blas_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        state_diff = emulator_state_difference(tmp)
    finally:
        for f in tmp.glob("*.npy"):
            f.unlink()
        tmp.rmdir()
    result = {
        "what": __doc__,
        "cpus": os.cpu_count(),
        "emulator_n600_state_max_abs_diff_1_vs_2_threads": state_diff,
        "digits_tngd_6_steps_max_loss_diff_vs_embedded": {
            "daemon_blas_threads_1": training_loss_difference(1),
            "daemon_blas_threads_0_library_default": training_loss_difference(0),
        },
        "loadavg_at_end": list(os.getloadavg()),
    }
    write_json(ROOT / "benchmarks" / "results" / "blas_threads.json", result)
    print(result["emulator_n600_state_max_abs_diff_1_vs_2_threads"],
          result["digits_tngd_6_steps_max_loss_diff_vs_embedded"])


if __name__ == "__main__":
    main()
