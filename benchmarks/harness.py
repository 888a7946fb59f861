"""What the benchmark scripts share: starting a server process, reading its RSS, latency
statistics, writing the results file. Imported as ``harness`` (scripts run from this folder)."""

from __future__ import annotations

import json
import re
import select
import subprocess
from pathlib import Path
from typing import IO, Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def start_server(cmd: list[str], *, stderr: int | IO[bytes] = subprocess.DEVNULL,
                 timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start ``cmd`` (a daemon or test server printing "serving ENDPOINT ..." first) and return
    the process and its endpoint; kill it and raise if that line does not come in time."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, cwd=ROOT)
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline().decode() if ready else ""
    m = re.match(r"serving (\S+)", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, m.group(1)


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux /proc), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stats_us(samples_ns: list[int]) -> dict[str, float]:
    """Median and p99 of durations given in ns, in microseconds."""
    a = np.asarray(samples_ns, dtype=float) / 1e3
    return {"median_us": round(float(np.median(a)), 1), "p99_us": round(float(np.percentile(a, 99)), 1),
            "n": int(a.size)}


def write_json(path: str | Path, result: dict[str, Any]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out
