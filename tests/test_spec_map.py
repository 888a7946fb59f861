"""The hardware spec map (host/spec_map.py): points against the ideal chip, JSON and PNG."""

from __future__ import annotations

import json

import pytest

from host import spec_map
from host.spec_map import Axis, run_map, run_point, write_map


def test_points_are_measured_against_the_ideal_run(monkeypatch, tmp_path) -> None:
    """Each point's loss ratio and accuracy difference are against the ideal runs (mean over seeds)."""
    calls = []

    def fake(task, overrides, steps, seed, options=None):
        calls.append((dict(overrides), seed))
        bits = overrides.get("dac.bits", 0)
        worse = {0: 1.0, 4: 3.0, 8: 1.5}[bits]
        return {"final_loss": 0.1 * worse + 0.01 * seed, "test_accuracy": 0.9 / worse, "wall_ms_per_step": 1.0}

    monkeypatch.setattr(spec_map, "run_point", fake)
    result = run_map("digits", steps=5, seeds=(0, 1), axes=(Axis("dac.bits", "DAC bits", (4, 8)),))
    assert [c[0] for c in calls] == [{}, {}, {"dac.bits": 4}, {"dac.bits": 4}, {"dac.bits": 8}, {"dac.bits": 8}]
    ideal = result["ideal"]
    assert ideal["final_loss"] == pytest.approx(0.105) and ideal["test_accuracy"] == pytest.approx(0.9)
    p4, p8 = result["points"]
    assert p4["loss_ratio"] == pytest.approx(0.305 / 0.105) and p4["accuracy_points"] == pytest.approx(-60.0)
    assert p8["accuracy_points"] == pytest.approx(100.0 * (0.6 - 0.9))
    js, png = write_map(result, tmp_path / "map")
    assert json.loads(js.read_text())["points"][0]["value"] == 4
    assert png is not None and png.stat().st_size > 10_000


def test_a_chip_tngd_cannot_use_is_a_point_with_its_error() -> None:
    out = run_point("digits", {"dac.bits": -3}, steps=1, seed=0)
    assert "error" in out and "dac.bits" in out["error"]


def test_the_command_refuses_an_unknown_axis_in_one_line() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "host.cli", "spec-map", "--axes", "dac.bitz"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip().count("\n") == 0 and "dac.bits" in out.stderr
