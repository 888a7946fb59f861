"""Faults survived, measured: kill -9 of the daemon mid-training (then a restart on the same port)
and a network partition, against uninterrupted runs of the same TNGD training; writes JSON.

The training is tests/test_faults.py's: TNGD on a 24-parameter least-squares problem, Factored
curvature, 10 tau per step, noise kappa = 1e-4, 30 steps; the host uses a DeviceClient with a
15 s deadline and 5 retries. For each fault: the final loss, its difference from the
uninterrupted run, and the time from the fault to the first successful call after it.

Run: python3 benchmarks/bench_faults.py [--kills 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from host.client import DeviceClient  # noqa: E402
from tests.test_faults import KAPPA, Proxy, free_port, train  # noqa: E402
from tests.test_wire_daemon import DaemonProcess  # noqa: E402

STEPS = 30


def uninterrupted(tmp: Path, seed: int) -> float:
    d = DaemonProcess(tmp / "ref.log", "--set", KAPPA)
    try:
        with DeviceClient(d.endpoint, seed=seed, timeout=20) as dev:
            return train(dev, STEPS)[0]
    finally:
        d.stop()


def kill_run(tmp: Path, seed: int, kill_at: int) -> dict[str, float]:
    bind = f"tcp://127.0.0.1:{free_port()}"
    box = {"d": DaemonProcess(tmp / f"k{kill_at}a.log", "--set", KAPPA, bind=bind)}
    t: dict[str, float] = {}

    def kill_and_restart() -> None:
        os.kill(box["d"].proc.pid, signal.SIGKILL)
        box["d"].proc.wait(timeout=10)
        t["fault"] = time.monotonic()
        time.sleep(1.0)
        box["d"] = DaemonProcess(tmp / f"k{kill_at}b.log", "--set", KAPPA, bind=bind)

    def on_step(k: int) -> None:
        if k == kill_at:
            threading.Thread(target=kill_and_restart, daemon=True).start()
            time.sleep(0.3)
        if k == kill_at + 1:
            t["recovered"] = time.monotonic()

    try:
        with DeviceClient(bind, seed=seed, timeout=15, retries=5) as dev:
            final = train(dev, STEPS, on_step)[0]
    finally:
        box["d"].stop()
    return {"final_loss": final, "recovery_s": t["recovered"] - t["fault"]}


def partition_run(tmp: Path, seed: int, cut_at: int, cut_s: float) -> dict[str, float]:
    d = DaemonProcess(tmp / "p.log", "--set", KAPPA)
    proxy = Proxy(int(d.endpoint.rpartition(":")[2]))
    t: dict[str, float] = {}

    def on_step(k: int) -> None:
        if k == cut_at:
            proxy.cut()
            t["fault"] = time.monotonic()
            threading.Timer(cut_s, proxy.heal).start()
        if k == cut_at + 1:
            t["recovered"] = time.monotonic()

    try:
        with DeviceClient(f"tcp://127.0.0.1:{proxy.port}", seed=seed, timeout=20, retries=6) as dev:
            final = train(dev, STEPS, on_step)[0]
    finally:
        proxy.close()
        d.stop()
    return {"final_loss": final, "recovery_s": t["recovered"] - t["fault"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=3, help="kill points (spread over the run)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "faults.json"))
    args = ap.parse_args()
    seed = 1
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        ref = uninterrupted(tmp, seed)
        rows = []
        for i in range(args.kills):
            k = 3 + i * (STEPS - 6) // max(1, args.kills - 1) if args.kills > 1 else STEPS // 2
            r = kill_run(tmp, seed, k)
            rows.append({"fault": f"kill -9 before step {k}, restart after 1 s", **r,
                         "loss_diff": r["final_loss"] - ref})
        r = partition_run(tmp, seed, 10, 1.5)
        rows.append({"fault": "partition of 1.5 s before step 10", **r, "loss_diff": r["final_loss"] - ref})
    out = {"what": __doc__, "uninterrupted_final_loss": ref, "runs": rows,
           "loadavg_at_end": list(os.getloadavg())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["runs"], indent=1), "\nuninterrupted:", ref)


if __name__ == "__main__":
    main()
