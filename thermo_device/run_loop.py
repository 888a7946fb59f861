"""One run of the device: thermostat chunks x propagator x ADC stage.

A run advances the analog state in three phases (durations in tau):

1. ``delay`` under the previously programmed drift (the device keeps evolving while the host
   computes; skipped, and reported, when there is no earlier program of the same size);
2. ``burn_in`` under the new drift, unobserved;
3. the readout window, ``duration - burn_in``, sampled on the ADC grid (``readout.py``) and passed
   through the ADC (``converters.AdcChain``); the device averages the samples.

Temperature (``temperature.py``) is held for ``temperature.update_interval`` tau at a time: each
chunk runs with its own rate multiplier r and noise strength kappa. When every sample must pass
through a non-ideal ADC the window is also cut into blocks of bounded memory. The run works in
physical (full-scale) units; the range scale s turns results into host units at the end.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from protocol.device import RunResult
from protocol.errors import InvalidInputError

from .converters import AdcChain, lsb
from .noise import cell_kappa
from .profile import Profile
from .programming import Programmed
from .propagator import Propagator, StepCounters
from .readout import ReadoutGrid, plan_grid
from .temperature import Conditions, Thermostat

# Readout blocks when every ADC sample has to be seen (non-ideal ADC): bounded memory.
ADC_BLOCK_FLOATS = 1 << 20


@dataclass(frozen=True)
class RunRequest:
    """A checked ``run`` call (``protocol.run_args``)."""

    duration: float
    burn_in: float
    delay: float
    reset: bool
    samples: int
    second_moment: bool


class RunLoop:
    """Runs programs on one chip: its thermostat, its ADC, and its noise generator."""

    def __init__(self, profile: Profile, thermostat: Thermostat, adc: AdcChain, rng: np.random.Generator) -> None:
        self.profile = profile
        self.thermostat = thermostat
        self.adc = adc
        self.rng = rng

    def conditions(self) -> Conditions:
        """Rate multiplier and noise strength at the temperature now (InvalidInputError outside
        the temperature coefficients' range)."""
        noise = self.profile.noise
        try:
            return self.thermostat.conditions(partial(cell_kappa, noise), noise.injected_kappa)
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from exc

    def run(self, cur: Programmed, prev: Programmed | None, x0: np.ndarray | None,
            req: RunRequest) -> tuple[np.ndarray, RunResult]:
        """(final state in physical units, the RunResult in host units)."""
        grid = plan_grid(req.duration - req.burn_in, self.profile.adc.sample_interval, req.samples)
        t0 = time.perf_counter()
        temp_start = self.thermostat.temperature_K
        prop = cur.propagator
        adc_before = (self.adc.clipped, self.adc.count)
        counters_before = prop.counters
        x = np.zeros(cur.state_dim) if req.reset else x0.copy()
        delay_applied = 0.0
        if req.delay > 0.0 and prev is not None and prev.state_dim == cur.state_dim:
            x = self.jump(prev.propagator, x, req.delay)
            delay_applied = req.delay
        x = self.jump(prop, x, req.burn_in)
        x, mean, moment, out_samples = self.window(prop, x, grid, cur.n_out, req.second_moment)
        scale = cur.realized.scale
        wall = time.perf_counter() - t0
        diag = self.diagnostics(cur, grid, delay_applied, temp_start, adc_before, counters_before)
        diag["wall_s"] = wall
        return x, RunResult(
            mean=mean * scale,
            state=x.copy() * scale,
            samples=out_samples * scale if req.samples else None,
            second_moment=moment * scale**2 if moment is not None else None,
            analog_time_s=(delay_applied + req.duration) * self.profile.device.tau_s,  # the time it ran
            diagnostics=diag,
        )

    def chunks(self, total: float) -> list[float]:
        """Split device time into pieces of constant temperature."""
        if total <= 0.0:
            return []
        if not self.thermostat.drifts:
            return [total]
        k = max(1, math.ceil(total / self.thermostat.update_interval - 1e-9))
        return [total / k] * k

    def jump(self, prop: Propagator, x: np.ndarray, total: float) -> np.ndarray:
        """Advance ``total`` tau unobserved, chunk by chunk of constant temperature."""
        for h in self.chunks(total):
            c = self.conditions()
            x = prop.jump(x, h, self.rng, c.rate, c.kappa)
            self.thermostat.advance(h)
        return x

    def window(self, prop: Propagator, x: np.ndarray, grid: ReadoutGrid, n_out: int,
               second_moment: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """The readout window: (final state, mean readout, mean outer product or None, samples)."""
        adc, rng = self.adc, self.rng
        if grid.n_adc == 0:
            snap = adc(x[:n_out][None, :], rng)[0] if not adc.ideal else x[:n_out].copy()
            return x, snap, (np.outer(snap, snap) if second_moment else None), np.empty((0, n_out))
        # Chunk the window on ADC samples: temperature updates, and bounded memory when every
        # sample must pass through a non-ideal ADC. Chunks are multiples of the sample stride.
        per_chunk = grid.n_adc
        if self.thermostat.drifts:
            per_chunk = max(1, int(self.thermostat.update_interval / grid.h))
        if not adc.ideal:
            per_chunk = min(per_chunk, max(1, ADC_BLOCK_FLOATS // n_out))
        if grid.stride:
            per_chunk = max(grid.stride, per_chunk // grid.stride * grid.stride)
        total = np.zeros(n_out)
        outer = np.zeros((n_out, n_out)) if second_moment else None
        kept: list[np.ndarray] = []
        done = 0
        while done < grid.n_adc:
            k = min(per_chunk, grid.n_adc - done)
            c = self.conditions()
            if adc.ideal:
                win = prop.window(x, grid.h, k, grid.stride, rng, second_moment, c.rate, c.kappa)
                total += win.total
                if second_moment:
                    outer += win.total_outer
                if grid.stride:
                    kept.append(win.samples)
            else:
                win = prop.window(x, grid.h, k, 1, rng, False, c.rate, c.kappa)
                q = adc(win.samples[:, :n_out], rng)
                total += q.sum(axis=0)
                if second_moment:
                    outer += q.T @ q
                if grid.stride:
                    kept.append(q[grid.stride - 1::grid.stride])
            x = win.state
            self.thermostat.advance(k * grid.h)
            done += k
        samples = np.concatenate(kept) if kept else np.empty((0, n_out))
        return x, total / grid.n_adc, (outer / grid.n_adc if second_moment else None), samples

    def diagnostics(self, cur: Programmed, grid: ReadoutGrid, delay_applied: float, temp_start: float,
                    adc_before: tuple[int, int], before: StepCounters | None) -> dict[str, Any]:
        p = self.profile
        scale = cur.realized.scale
        report = cur.realized.report
        diag: dict[str, Any] = {
            "method": cur.method,
            "adc_samples": grid.n_adc,
            "adc_interval": grid.h,
            "delay_applied": delay_applied,
            "kappa": self.conditions().kappa * scale**2,  # in host units
            "range_scale": scale,
            "temperature_K_start": temp_start,
            "temperature_K_end": self.thermostat.temperature_K,
            "dac_clipped": report.dac_clipped,
            "calibrated": report.calibrated,
            # min Re eig of the realised drift (C^-1 A; the 2N RLC matrix), 1/tau at nominal T
            "stability_margin": report.stability_margin,
            # the realised drift is not positive-stable: the cells ran into their rails
            "unstable": report.unstable,
        }
        now = cur.propagator.counters
        if now is not None and before is not None:
            if now.last_step is not None and grid.n_adc:
                diag["dt"] = now.last_step
            steps = now.steps_taken - before.steps_taken
            diag["rail_clipped_fraction"] = (now.rail_clipped - before.rail_clipped) / max(steps * cur.state_dim, 1)
            if cur.method == "exact":
                # rails.RailGuard: the rails were within reach, so (part of) this run was stepped
                diag["stepped_for_rails"] = steps > 0
        if not self.adc.ideal:
            clipped = self.adc.clipped - adc_before[0]
            count = self.adc.count - adc_before[1]
            diag["adc_clipped_fraction"] = clipped / max(count, 1)
            # effective number of bits of one sample: quantization (LSB^2 / 12) plus read noise
            q_var = (lsb(p.adc.bits, p.adc.full_scale) ** 2 / 12.0 if p.adc.bits else 0.0) + p.adc.read_noise_std**2
            diag["adc_effective_bits"] = math.log2(2.0 * p.adc.full_scale / math.sqrt(12.0 * q_var))
        return diag
