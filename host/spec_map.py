"""A hardware spec map: what precision does TNGD need? (issue 13, item 5)

One axis of the device specification at a time is moved away from the ideal chip, and TNGD
trains the task (digits by default) on each point with its default settings, the same seed and
the same batches. The map is final training loss and test accuracy against the ideal device:

* ``dac.bits``: the bias (gradient) DAC;
* ``coupling.bits``: the conductance codes of every resistor array (J, H, J^T);
* ``adc.bits``: the readout converter (every sample quantised, then averaged);
* ``mismatch.coupling_rel_std``: static relative error of every programmed conductance (the J
  arrays stop being each other's transpose, so these points are time-stepped: slower);
* ``noise.kappa``: the thermal noise strength, (full-scale units)^2.

Every point runs on the ideal profile with ``range.auto`` on (host numbers mapped into the
converters' range with the profile's headroom), ``integrator.method = "auto"`` and, for the
points that must be time-stepped, the noisy profile's accuracy-bounded step. Output: a JSON
file with every run and a heat-map PNG (rows: axes, columns: levels from coarse to fine; colour:
test-accuracy points against ideal, and the final-loss ratio). docs/results.md reads one.

    thermo-host spec-map [--task digits] [--steps 150] [--seeds 0] [--set offset_cancel=false] [--out runs/spec_map]
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Axis:
    key: str  # the profile key it moves
    label: str
    levels: tuple[float, ...]  # coarse to fine


AXES: tuple[Axis, ...] = (
    Axis("dac.bits", "gradient DAC bits", (4, 6, 8, 10, 12)),
    Axis("coupling.bits", "coupling bits", (4, 6, 8, 10, 12)),
    Axis("adc.bits", "ADC bits", (4, 6, 8, 10, 12)),
    Axis("mismatch.coupling_rel_std", "coupling mismatch (rel. std)", (0.01, 0.003, 0.001)),
    Axis("noise.kappa", "kappa", (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)),
)
# Stepped points (mismatch) take the noisy profile's accuracy-bounded step (docs/physics.md).
BASE = {"range.auto": True, "integrator.method": "auto", "integrator.dt": 0.1, "integrator.variance_tol": 0.005}


def _level(value: float) -> int | float:
    return int(value) if float(value).is_integer() and value >= 1 else float(value)


def run_point(task: str, overrides: dict[str, Any], steps: int, seed: int,
              options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One TNGD training run on the ideal profile with ``overrides`` (and TNGD ``options`` over
    its defaults); errors are results."""
    from .tasks import train

    t0 = time.perf_counter()
    try:
        rec = train(task, "tngd", steps=steps, eval_every=max(1, steps // 3), device="embedded:ideal",
                    device_overrides={**BASE, **overrides}, seed=seed, **(options or {}))
    except Exception as exc:  # noqa: BLE001 - a chip TNGD cannot train on is a point of the map
        return {"error": f"{type(exc).__name__}: {exc}"[:300], "wall_s": time.perf_counter() - t0}
    s = rec.summary()
    return {"final_loss": s["final_loss_avg10pct"], "test_accuracy": s["test_accuracy"],
            "wall_ms_per_step": s["wall_ms_per_step"], "wall_s": time.perf_counter() - t0}


def _mean(rows: Sequence[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in rows if key in r]
    return float(np.mean(vals)) if len(vals) == len(rows) and vals else float("nan")


def run_map(task: str = "digits", steps: int = 150, seeds: Sequence[int] = (0,), axes: Sequence[Axis] = AXES,
            progress: Callable[[str], None] | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every point of every axis over ``seeds``, plus the ideal reference; the map as a dict.
    ``options``: TNGD options over its defaults (e.g. {"offset_cancel": False}), for every run."""
    say = progress or (lambda _msg: None)
    opts = dict(options or {})
    ideal = [run_point(task, {}, steps, s, opts) for s in seeds]
    say(f"ideal: loss {_mean(ideal, 'final_loss'):.4f}, test accuracy {_mean(ideal, 'test_accuracy'):.4f}")
    ref_loss, ref_acc = _mean(ideal, "final_loss"), _mean(ideal, "test_accuracy")
    points = []
    for axis in axes:
        for value in axis.levels:
            runs = [run_point(task, {axis.key: _level(value)}, steps, s, opts) for s in seeds]
            loss, acc = _mean(runs, "final_loss"), _mean(runs, "test_accuracy")
            point = {"key": axis.key, "value": _level(value), "runs": runs, "final_loss": loss,
                     "test_accuracy": acc, "loss_ratio": loss / ref_loss,
                     "accuracy_points": 100.0 * (acc - ref_acc)}
            points.append(point)
            say(f"{axis.key} = {value}: loss x{point['loss_ratio']:.2f}, accuracy {point['accuracy_points']:+.2f} points")
    return {
        "what": "TNGD on one spec axis at a time away from the ideal chip (host/spec_map.py)",
        "task": task, "steps": steps, "seeds": list(seeds), "base_overrides": BASE, "tngd_options": opts,
        "ideal": {"runs": ideal, "final_loss": ref_loss, "test_accuracy": ref_acc},
        "axes": [{"key": a.key, "label": a.label, "levels": [_level(v) for v in a.levels]} for a in axes],
        "points": points,
        "versions": {"python": platform.python_version(), "numpy": np.__version__},
        "loadavg_end": os.getloadavg(),
    }


def plot_map(result: dict[str, Any], path: Path) -> bool:
    """Heat maps of accuracy points and loss ratio against ideal; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    axes = result["axes"]
    width = max(len(a["levels"]) for a in axes)
    acc = np.full((len(axes), width), np.nan)
    ratio = np.full((len(axes), width), np.nan)
    for i, a in enumerate(axes):
        for j, v in enumerate(a["levels"]):
            p = next(p for p in result["points"] if p["key"] == a["key"] and p["value"] == v)
            acc[i, j], ratio[i, j] = p["accuracy_points"], p["loss_ratio"]
    fig, panels = plt.subplots(1, 2, figsize=(13, 0.9 * len(axes) + 2.2))
    shown = (("test accuracy against ideal (points)", acc, "RdYlGn", -10.0, 0.0, "{:+.1f}"),
             ("final training loss / ideal", np.log10(ratio), "RdYlGn_r", 0.0, 1.0, None))
    for ax, (title, data, cmap, lo, hi, fmt) in zip(panels, shown, strict=True):
        im = ax.imshow(data, cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        for i, a in enumerate(axes):
            for j, v in enumerate(a["levels"]):
                text = fmt.format(acc[i, j]) if fmt else f"x{ratio[i, j]:.2g}"
                ax.text(j, i, f"{v:g}\n{text}", ha="center", va="center", fontsize=8)
        ax.set_yticks(range(len(axes)), [a["label"] for a in axes])
        ax.set_xticks(range(width), ["coarse"] + [""] * (width - 2) + ["fine"])
        ax.set_title(title)
        fig.colorbar(im, ax=ax, label="points" if fmt else "log10 ratio")
    ideal = result["ideal"]
    fig.suptitle(f"What precision does TNGD need? {result['task']}, {result['steps']} steps, seeds "
                 f"{result['seeds']}; ideal: loss {ideal['final_loss']:.3g}, test accuracy "
                 f"{100 * ideal['test_accuracy']:.1f}%", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_map(result: dict[str, Any], out: Path) -> tuple[Path, Path | None]:
    """``out``.json and ``out``.png (None when matplotlib is missing)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    js = out.with_suffix(".json")
    js.write_text(json.dumps(result, indent=1))
    png = out.with_suffix(".png")
    return js, (png if plot_map(result, png) else None)
