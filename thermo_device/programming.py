"""Programming the chip: from the host's (A, b) to what the cells see, then how to propagate it.

Programming is an ordered list of stages (``STAGES``), each one model living in its own module and
documented there and in docs/physics.md. Each stage transforms a ``realization.ProgramWork``:

1. ``calibration.predistort``: A -> A / G_hat when a calibration of this size exists;
2. ``converters.write_couplings``: every resistor array to its conductance codes;
3. ``Chip.apply_coupling_mismatch`` (mismatch.py): every conductance times its static (1 + d);
4. ``Chip.apply_cell_capacitance`` (mismatch.py): per-cell capacitances;
5. ``analyse``: the realised drift as a linear system and its stability margin (``dynamics.py``).
   A realised drift that is not positive-stable is the host's error (NotStableError) when the
   host's own drift is not positive-stable either; otherwise it is the chip's doing (coupling codes,
   mismatch, per-cell capacitances) and the chip runs it: time stepping with the node voltages
   saturating at ``range_map.saturation_rail`` (``diagnostics["unstable"]``);
6. ``range_map.map_range``: host numbers into the physical range, b / s;
7. ``calibration.cancel_offset``: b - o_hat;
8. ``converters.write_bias``: the bias DAC;
9. ``Chip.apply_input_errors`` (mismatch.py): input gains and op-amp offsets;
10. ``bias_system``: the system with the realised bias.

The RLC array (underdamped) takes stages 1-3 and its own analysis: it has no bias path.
``program`` runs the stages and then picks the integrator and builds its ``Propagator``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from protocol.drift import Drift
from protocol.errors import UnsupportedError

from . import calibration, converters, range_map
from .calibration import Calibration
from .dynamics import (
    ModalSystem,
    SteppingOnlySystem,
    UnstableSystem,
    overdamped_system,
    stable_step,
    underdamped_system,
)
from .exact import GeneralPropagator, ModalPropagator
from .flicker_exact import FlickerModalPropagator
from .mismatch import Chip
from .noise import FlickerNoise
from .profile import Profile
from .propagator import Propagator
from .rails import RailGuard
from .range_map import saturation_rail
from .realization import ProgramWork, Realized
from .snapshot import ProgramSource
from .stepping import OverdampedStepper, UnderdampedStepper

Stage = Callable[[ProgramWork], None]
# Stepping integrators run at most at this fraction of their stability limit: the profile's dt is
# an upper bound, and a stiff drift shrinks it (reported as diagnostics["dt"]).
STABILITY_MARGIN = 0.9


def analyse(work: ProgramWork) -> None:
    """Stage: the realised drift as a linear system and its stability margin (bias 0 for now).

    The host's drift is analysed only when the realised one is not positive-stable (a stable
    realised drift costs nothing extra): if the host's is not positive-stable either, that
    analysis raises NotStableError (the host's error, as on an ideal chip); otherwise the chip made
    it unstable and runs away into its rails (``program``).
    """
    zeros = np.zeros(work.drift.dim)
    system = overdamped_system(work.drift, zeros, work.cap, work.j_out, unstable_ok=True)
    if isinstance(system, UnstableSystem):
        host = overdamped_system(work.host_drift, zeros)  # NotStableError: the host's drift
        system = replace(system, host=host)
    work.system = system
    work.report.stability_margin = float(system.margin)
    work.report.unstable = isinstance(system, UnstableSystem)


def analyse_underdamped(work: ProgramWork) -> None:
    """Stage: the RLC array's 2N-dimensional system (the bias must be zero: inductors short DC)."""
    u = work.profile.underdamped
    work.system = underdamped_system(work.drift, work.host_bias, u.inductance, u.resistance)
    work.bias = work.host_bias
    work.report.stability_margin = float(work.system.margin)


def bias_system(work: ProgramWork) -> None:
    """Stage: the analysed system with the realised bias (O(N r): only its target moves)."""
    work.system = work.system.with_bias(work.bias)


def stages(profile: Profile, chip: Chip) -> tuple[Stage, ...]:
    """The programming stages of this chip, in order (see the module docstring)."""
    if profile.device.dynamics == "underdamped":
        return (calibration.predistort, converters.write_couplings, chip.apply_coupling_mismatch,
                analyse_underdamped)
    return (calibration.predistort, converters.write_couplings, chip.apply_coupling_mismatch,
            chip.apply_cell_capacitance, analyse, range_map.map_range, calibration.cancel_offset,
            converters.write_bias, chip.apply_input_errors, bias_system)


def realize(profile: Profile, pipeline: Sequence[Stage], drift: Drift, b_host: np.ndarray,
            rng: np.random.Generator, cal: Calibration | None, *, unit_scale: bool = False) -> Realized:
    """Run the stages; invalid or unstable input raises before anything is kept."""
    work = ProgramWork(profile=profile, rng=rng, drift=drift, bias=b_host, host_bias=b_host, host_drift=drift,
                       calibration=cal, unit_scale=unit_scale)
    for stage in pipeline:
        stage(work)
    return Realized.from_work(work)


@dataclass(frozen=True, eq=False)
class Programmed:
    """One installed program: what the chip holds and how it is propagated."""

    realized: Realized
    propagator: Propagator
    state_dim: int
    method: str
    # What rebuilds this program bit for bit (``snapshot``): the inputs, the calibration used, and
    # the noise generator's and thermostat's state just before realisation drew from them.
    source: ProgramSource

    @property
    def n_out(self) -> int:
        """Readout width: the node voltages (half the state on the RLC array)."""
        return self.realized.drift.dim


def step_bound(profile: Profile, system: object, scheme: str) -> float:
    """The overdamped stepping integrator's step: ``integrator.dt``, at most STABILITY_MARGIN of the
    stability limit, and, with ``integrator.variance_tol`` > 0, short enough that the fastest
    mode's stationary variance is off by at most that fraction.

    On a mode with rate a, Heun's stationary variance is the exact kappa / a times
    (1 - z + z^2/4) / (1 - z + z^2/2 - z^3/8) = 1 - z^2/4 + O(z^3) with z = a dt, and
    Euler-Maruyama's times 2 / (2 - z): the largest z within tol solves these exactly
    (``_largest_z``). The stability limit 2 / rho (real spectrum) gives the fastest rate rho. The
    time average's mean is exact at any stable step (the fixed point is exact), and its variance to
    leading order in z.
    """
    limit = stable_step(system, scheme)
    dt = min(profile.integrator.dt, STABILITY_MARGIN * limit)
    tol = profile.integrator.variance_tol
    if tol > 0.0 and math.isfinite(limit):
        dt = min(dt, _largest_z(scheme, tol) * limit / 2.0)  # rho = 2 / limit
    return dt


def _variance_error(scheme: str, z: float) -> float:
    """|stationary variance / (kappa / a) - 1| of one step of the scheme on an OU mode, z = a dt."""
    if scheme == "heun":
        r = 1.0 - z + 0.5 * z * z
        return abs(2.0 * z * (1.0 - 0.5 * z) ** 2 / (1.0 - r * r) - 1.0)
    return z / (2.0 - z)  # Euler-Maruyama: 2 / (2 - z) - 1


def _largest_z(scheme: str, tol: float) -> float:
    """The largest z in (0, 1] whose variance error is at most tol (bisection: it grows with z)."""
    lo, hi = 0.0, 1.0
    if _variance_error(scheme, hi) <= tol:
        return hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _variance_error(scheme, mid) <= tol else (lo, mid)
    return lo


def needs_stepping(profile: Profile, system: object) -> bool:
    """An unstable drift lives only by its rails: no exact propagator. Rails alone leave a
    symmetric drift exact where the rails are out of reach (``rails.RailGuard``); a non-symmetric
    one keeps stepping with rails. 1/f noise is exact on a symmetric drift with isotropic noise and
    no rails (``flicker_exact``); per-cell capacitances or rails make it step."""
    modal = isinstance(system, ModalSystem)
    rails = profile.range.rail > 0.0 and not modal
    # 1/f noise is exact on a modal system with isotropic noise and no rails (flicker_exact.py)
    flicker = profile.noise.flicker_corner > 0.0 and not (
        modal and system.cell_scale is None and profile.range.rail == 0.0)
    return isinstance(system, (SteppingOnlySystem, UnstableSystem)) or rails or flicker


def program(profile: Profile, pipeline: Sequence[Stage], source: ProgramSource, rng: np.random.Generator,
            flicker: FlickerNoise, kappa: Callable[[], float]) -> Programmed:
    """Realise ``source`` on the chip and build the propagator the profile's integrator asks for.

    ``kappa()`` (the noise strength now) sets the 1/f poles' variance of a stepping program. An
    unstable realised drift (``dynamics.UnstableSystem``) is time-stepped (Heun where the profile
    asks for exact or auto) with its nodes clipped at ``range_map.saturation_rail``.
    """
    real = realize(profile, pipeline, source.drift, source.bias, rng, source.calibration,
                   unit_scale=source.unit_scale)
    system = real.system
    dynamics = profile.device.dynamics
    method = profile.integrator.method
    stepping = needs_stepping(profile, system)
    unstable = isinstance(system, UnstableSystem)
    if method == "exact" and unstable:
        method = "auto"  # a runaway into the rails has no exact propagator: the chip still runs it
    if method == "exact" and stepping:
        why = system.reason if isinstance(system, SteppingOnlySystem) else "rails on a non-symmetric drift or 1/f noise"
        raise UnsupportedError(f"exact integration cannot propagate this drift ({why}); "
                               "use integrator.method = 'auto' or a stepping method")
    if method == "auto":
        method = "exact" if not stepping else ("heun" if dynamics == "overdamped" else "baoab")
    n = real.drift.dim
    prop: Propagator
    def stepper(scheme: str) -> OverdampedStepper:
        dt = step_bound(profile, system, scheme)
        rail = saturation_rail(profile) if unstable else profile.range.rail
        return OverdampedStepper(real.drift, real.bias, dt, scheme, j_out=real.j_out, cap=real.cap,
                                 rail=rail, flicker=flicker.for_program(kappa(), n))

    fl = flicker.for_program(kappa(), n) if method == "exact" and isinstance(system, ModalSystem) else None
    if fl is not None:
        prop = FlickerModalPropagator(system, fl)  # needs_stepping: isotropic, no rails
    elif method == "exact" and isinstance(system, ModalSystem):
        prop = ModalPropagator(system, closed_form=profile.integrator.window == "closed_form")
        if profile.range.rail > 0.0:
            # exact while the rails are out of reach, Heun with clipping when they are not
            dt = step_bound(profile, system, "heun")
            prop = RailGuard(prop, profile.range.rail, dt, lambda: stepper("heun"))
    elif method == "exact":
        prop = GeneralPropagator(system)
    elif dynamics == "overdamped":
        prop = stepper(method)
    else:
        u = profile.underdamped
        dt = min(profile.integrator.dt, STABILITY_MARGIN * stable_step(system, method, u.inductance))
        prop = UnderdampedStepper(real.drift, dt, method, u.inductance, u.resistance)
    state_dim = n if dynamics == "overdamped" else 2 * n
    return Programmed(real, prop, state_dim, method, source)
