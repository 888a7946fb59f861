"""The TNGD step over explicit state: one device solve and one Levenberg-Marquardt rule.

Both front ends build on this module: ``host.TNGD`` (NumPy, with a NumPy SGD/Adam for the digital
update) and ``host.torch_optimizer.TNGDOptimizer`` (torch's own SGD/Adam). The shape follows
posteriors' ``build -> (init, update)``: ``TNGDCore`` holds what does not change during training
(the device and the solve settings); everything that does lives in a frozen ``TNGDState`` that
each call takes and returns::

    core = TNGDCore(device, analog_time=50.0)
    state = core.init(damping=0.01)
    x_bar, state = core.solve(state, grad, curvature)        # x_bar ~ (G + lambda I)^-1 grad
    state = core.record(state, grad, delta, curvature, loss)  # what the LM rule needs
    state, rho = core.lm_update(state, loss_before, loss_after)

The host-side state plus the device's analog state (and, where the device offers it, its whole
snapshot: programs and noise stream) is a checkpoint: ``core.capture(state)`` returns the state to
save, and a state with ``pending`` set is restored into the device before its next solve. See
``host.tngd`` for the step itself (warm start, delay, readout window).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

from protocol.device import Device, DeviceSnapshot
from protocol.drift import Drift
from protocol.errors import (
    DeviceError,
    InvalidInputError,
    NonFiniteError,
    NotStableError,
    ShapeError,
    UnsupportedError,
)

from .adapt import DriftAdapter, device_capabilities
from .baselines import damped
from .guard import GuardEvent, StabilityGuard
from .readout_plan import estimated_rel_error, plan_readout

INITS = ("warm", "grad", "reset")


@dataclass
class StepStats:
    """What the last step cost and how it went.

    Attributes:
        analog_time_s, device_wall_s: analog time on the device and host wall time around the call
            (retries included).
        damping: the damping the device was given (the guard may raise it above ``state.damping``).
        retries: attempts the stability guard repeated because the realised drift was unstable.
        stability_margin: the realised drift's smallest eigenvalue real part the device reported
            (1/tau), or None when it reports none.
        analog_time, burn_in: the readout used (tau): the settings, or the noise-aware plan.
        est_rel_error: the estimated relative noise error of x_bar (``readout_plan``), or None when
            the device reports no noise strength.
    """

    analog_time_s: float = 0.0
    device_wall_s: float = 0.0
    damping: float = 0.0
    retries: int = 0
    stability_margin: float | None = None
    analog_time: float = 0.0
    burn_in: float = 0.0
    est_rel_error: float | None = None


@dataclass
class LevenbergMarquardt:
    """Levenberg-Marquardt damping schedule (TNGD App. A; Martens 2010 constants).

    rho = (l(theta + delta) - l(theta)) / (q(delta) - q(0)), q(p) = g^T p + p^T G p / 2 with the
    undamped curvature G. rho > a (the model is trusted): lambda *= alpha; rho < 1 - a:
    lambda /= alpha. alpha < 1 so that trust shrinks the damping.
    """

    a: float = 0.75
    alpha: float = 2.0 / 3.0
    minimum: float = 1e-6
    maximum: float = 1e3

    def __post_init__(self) -> None:
        if not 0.5 < self.a < 1.0 or not 0.0 < self.alpha < 1.0:
            raise InvalidInputError("LevenbergMarquardt needs 0.5 < a < 1 and 0 < alpha < 1")

    def update(self, damping: float, loss_before: float, loss_after: float, grad: np.ndarray,
               delta: np.ndarray, curvature: Drift) -> tuple[float, float]:
        """(new damping, rho). Costs one curvature-vector product."""
        predicted = float(grad @ delta + 0.5 * delta @ curvature.matvec(delta))
        # a step the quadratic model does not predict to descend cannot be trusted: rho = -inf
        rho = (loss_after - loss_before) / predicted if predicted < 0.0 else -np.inf
        if rho > self.a:
            damping *= self.alpha
        elif rho < 1.0 - self.a:
            damping /= self.alpha
        return float(np.clip(damping, self.minimum, self.maximum)), float(rho)


@dataclass(frozen=True, eq=False)
class LastStep:
    """The last step as the LM rule needs it: gradient, the step taken, the undamped curvature,
    and the batch loss before the step when the caller knew it (the torch optimizer does)."""

    grad: np.ndarray
    delta: np.ndarray
    curvature: Drift
    loss: float | None = None


@dataclass(frozen=True, eq=False)
class DeviceCheckpoint:
    """The device's side of a checkpoint.

    ``state`` is the analog state (the warm start; None: nothing to set); ``snapshot`` the whole
    device (programs, noise stream) when the device can snapshot, else None. A snapshot, when
    present, supersedes ``state``: it carries it and the noise stream too.
    """

    state: np.ndarray | None = None
    snapshot: DeviceSnapshot | None = None


@dataclass(frozen=True, eq=False)
class TNGDState:
    """Everything about a TNGD run that changes from step to step, on the host side.

    Attributes:
        steps: solves done so far (the first warm solve starts from the gradient; the delay
            applies from the second on).
        damping: lambda, added to the curvature of the next solve (LM moves it).
        last: the last recorded step, for ``lm_update``; None before any.
        pending: a device checkpoint to put into the device before the next solve (set when a
            checkpoint is loaded; cleared by the solve that restores it).
        stats: the cost of the last solve.
        floor: the stability guard's damping floor (the device gets max(damping, floor)).
        guard_events: every raise of the damping by the guard, in order.
        x_norm: |x_bar| of the last solve (the noise-aware readout's scale), 0 before any.
        kappa: the noise strength in host units the device last reported, None before any.
        start: the analog state the last solve ended in (host units): where a retried solve starts.
        neg_start: with offset cancellation, where the -g run of the last solve ended (its warm start).
        offsets: with ``offset_cancel="auto"``, whether the first solve found bias-independent
            errors worth cancelling (None before it decides).
    """

    steps: int = 0
    damping: float = 0.0
    last: LastStep | None = None
    pending: DeviceCheckpoint | None = None
    stats: StepStats = field(default_factory=StepStats)
    floor: float = 0.0
    guard_events: tuple[GuardEvent, ...] = ()
    x_norm: float = 0.0
    kappa: float | None = None
    start: np.ndarray | None = None
    neg_start: np.ndarray | None = None
    offsets: bool | None = None


def take_snapshot(device: Device) -> DeviceSnapshot | None:
    """The device's snapshot, or None for a device that cannot take one (then a checkpoint carries
    only the analog state: resuming continues the warm start, with a new noise stream)."""
    try:
        return device.snapshot()
    except UnsupportedError:
        return None


class TNGDCore:
    """One TNGD device solve per step against any ``protocol.Device``, over a ``TNGDState``.

    Args:
        device: from ``host.connect(...)``.
        analog_time: t, the duration of each solve in tau (includes ``burn_in``).
        delay: t_d in tau: the previous drift keeps acting this long before the new one.
        burn_in: start of the readout window within the run, in tau.
        init: "warm", "grad" or "reset": where each solve starts (``host.tngd``'s docstring).
        lm: a ``LevenbergMarquardt`` schedule for lambda, or None (``lm_update`` then refuses).
        guard: the ``StabilityGuard`` (``host.guard``); ``StabilityGuard(enabled=False)`` turns it off.
        target_rel_error: with ``analog_time="auto"``, the relative noise error of x_bar the
            readout must meet (``host.readout_plan``). The readout is ``min_analog_time`` with
            ``burn_in`` when its estimated error already meets the target (a quiet device runs
            exactly as with that fixed time); otherwise the planned ``analog_time`` and ``burn_in``
            (a burn-in that forgets the warm start, then a window that averages the noise down),
            at least ``min_analog_time`` and at most ``max_analog_time``.
        offset_cancel: solve with g and with -g (the same drift, each run warm-starting from its
            own last state) and take the half difference: op-amp offsets and other errors that do
            not change sign with b cancel, at twice the analog time. ``"auto"``: on a device that
            declares a systematic error (``Capabilities.precision`` > 0), the first solve cancels
            and measures the bias-independent part 0.5 (x_bar(g) + x_bar(-g)); later solves keep
            cancelling only if it exceeded OFFSET_AUTO_FACTOR x ``target_rel_error`` of the
            half difference (more than the readout's planned noise could explain).
        refine: passes of iterative refinement: the host computes the residual r = g - A x_bar
            exactly (one product with J, H), the device solves A d = r (ranged on its own, so
            converter, mismatch and offset errors shrink with |r|), and x_bar += d. Each pass
            multiplies the relative error by about the chip's error of one solve; it aims x_bar
            at (G + lambda I)^-1 g, so it belongs with converged readouts (``analog_time="auto"``
            or a long burn-in), not with the warm-started momentum regime. One run per pass.
            ``"auto"``: from the device's declared bias DAC (``Capabilities.dac_bits``): each pass
            re-ranges the residual into the DAC, so a b-bit DAC gains about b bits per pass; the
            passes are the fewest that reach ``AUTO_REFINE_BITS`` (0 for an ideal DAC or one of
            at least that many bits: 1 for 6-11 bits, 2 for 4-5).
    """

    def __init__(self, device: Device, analog_time: float | str, delay: float = 0.0, burn_in: float = 0.0, *,
                 init: str = "warm", lm: LevenbergMarquardt | None = None,
                 guard: StabilityGuard | None = None, target_rel_error: float = 0.1,
                 min_analog_time: float = 50.0, max_analog_time: float = 1e4,
                 offset_cancel: bool | str = False, refine: int | str = 0) -> None:
        if init not in INITS:
            raise InvalidInputError(f"init must be one of {INITS}, got {init!r}")
        self.auto = analog_time == "auto"
        if self.auto:
            if not 0.0 < target_rel_error < 1.0:
                raise InvalidInputError(f"target_rel_error must lie in (0, 1), got {target_rel_error}")
            if not 0.0 < min_analog_time <= max_analog_time:
                raise InvalidInputError(f"need 0 < min_analog_time ({min_analog_time}) <= max_analog_time "
                                        f"({max_analog_time})")
            analog_time = min_analog_time
        elif isinstance(analog_time, str):
            raise InvalidInputError(f"analog_time must be a number of tau or 'auto', got {analog_time!r}")
        if not 0.0 <= burn_in <= analog_time:
            raise InvalidInputError(f"burn_in ({burn_in}) must lie in [0, analog_time = {analog_time}]")
        self.guard = guard if guard is not None else StabilityGuard()
        self.target_rel_error = float(target_rel_error)
        self.max_analog_time = float(max_analog_time)
        if offset_cancel == "auto":
            caps = device_capabilities(device)
            self.offset_auto = caps is not None and caps.precision > 0.0
            self.offset_cancel = False
        elif isinstance(offset_cancel, bool):
            self.offset_auto, self.offset_cancel = False, offset_cancel
        else:
            raise InvalidInputError(f"offset_cancel must be True, False or 'auto', got {offset_cancel!r}")
        if refine == "auto":
            caps = device_capabilities(device)
            refine = auto_refine_passes(caps.dac_bits if caps is not None else 0)
        if isinstance(refine, bool) or not isinstance(refine, int) or not 0 <= refine <= 16:
            raise InvalidInputError(f"refine must be an integer in [0, 16] or 'auto', got {refine!r}")
        self.refine = refine
        if delay < 0.0:
            raise InvalidInputError(f"delay must be >= 0, got {delay}")
        self.device = device
        self.analog_time = float(analog_time)
        self.delay = float(delay)
        self.burn_in = float(burn_in)
        self.init_mode = init
        self.lm = lm
        # what the device declares (cells, drift forms): curvature is converted to fit, or refused early
        self.adapt = DriftAdapter(device_capabilities(device))
        self._noise = _declared_noise(device)

    def init(self, damping: float) -> TNGDState:
        """The state before the first step."""
        if damping < 0.0:
            raise InvalidInputError(f"damping must be >= 0, got {damping}")
        return TNGDState(damping=float(damping))

    def solve(self, state: TNGDState, grad: np.ndarray, curvature: Drift) -> tuple[np.ndarray, TNGDState]:
        """(x_bar, new state): the device's estimate of (curvature + damping I)^-1 grad.

        The stability guard may repeat the solve with more damping (``host.guard``); the readout
        is the fixed one or, with ``analog_time="auto"``, planned from the declared noise.
        """
        self._restore(state.pending)
        g = _checked_grad(grad, curvature)
        guard = self.guard
        damping = max(state.damping, state.floor)
        kappa = state.kappa if state.kappa is not None else self._noise.kappa
        analog_time, burn_in = self.analog_time, self.burn_in
        if self.auto:
            x_norm = state.x_norm or float(np.linalg.norm(g)) / max(damping, 1e-12)
            lam = max(damping, 1e-12)
            noise = {"adc_var": self._noise.adc_var, "sample_interval": self._noise.interval}
            if estimated_rel_error(x_norm, g.shape[0], lam, kappa or 0.0, analog_time - burn_in,
                                   **noise) > self.target_rel_error:
                analog_time, burn_in, _ = plan_readout(self.target_rel_error, x_norm, g.shape[0], lam,
                                                       kappa or 0.0, max_time=self.max_analog_time, **noise)
                if analog_time < self.analog_time:  # never shorter than the base readout
                    analog_time, burn_in = self.analog_time, min(burn_in, self.analog_time)
        events = list(state.guard_events)
        first = self.init_mode == "grad" or (self.init_mode == "warm" and state.steps == 0)
        t0 = time.perf_counter()
        analog_s = 0.0
        for attempt in range(guard.max_retries + 1):
            # damped() checks lambda and the drift's form, and reuses the curvature's validated
            # arrays (drift.damped): the curvature is not scanned for NaN a second time
            drift = self.adapt(damped(curvature, damping))
            if first:
                try:
                    self.device.state = g
                except ShapeError as exc:  # name what the caller passed, not the device's "state"
                    raise ShapeError(f"grad of length {g.shape[0]} cannot start the solve: the device still holds "
                                     f"a program of another dimension ({exc}); give the optimizer a device of "
                                     "its own, or init='reset'") from None
            elif attempt and state.start is not None:
                self.device.state = state.start  # a retry starts where the failed attempt did
            try:
                res = self.device.step(drift, g, analog_time, burn_in=burn_in,
                                       delay=self.delay if state.steps else 0.0, reset=self.init_mode == "reset")
            except NotStableError:
                if not guard.enabled or attempt == guard.max_retries:
                    raise
                unstable, margin = True, None
            else:
                analog_s += res.analog_time_s
                unstable = bool(res.diagnostics.get("unstable", False))
                margin = res.diagnostics.get("stability_margin")
                if not (unstable and guard.enabled and attempt < guard.max_retries):
                    break
            raised = guard.retry_damping(damping)
            events.append(GuardEvent(state.steps, "unstable", damping, raised, margin))
            damping = raised
        floor = damping if attempt else state.floor  # retries only raise it: the raised value is the floor
        new_floor = guard.floor_after(floor, damping, margin)
        if new_floor > floor:
            events.append(GuardEvent(state.steps, "margin", damping, new_floor, margin))
        x_bar = np.asarray(res.mean, dtype=np.float64)
        neg_start = state.neg_start
        offsets = state.offsets
        cancel = self.offset_cancel or (self.offset_auto and offsets is not False)
        extra = cancel or self.refine
        if cancel:
            # the same drift with -g, from the -g run's own warm start: x_bar(g) - x_bar(-g) is
            # 2 A^-1 g with the cells' offsets (and every other bias-independent error) cancelled
            self.device.state = -g if first or neg_start is None else neg_start
            neg = self.device.step(drift, -g, analog_time, burn_in=burn_in, reset=self.init_mode == "reset")
            analog_s += neg.analog_time_s
            x_neg = np.asarray(neg.mean, dtype=np.float64)
            if self.offset_auto and offsets is None:
                even = 0.5 * (x_bar + x_neg)  # what does not change sign with the bias
                odd = 0.5 * (x_bar - x_neg)
                offsets = bool(np.linalg.norm(even) > OFFSET_AUTO_FACTOR * self.target_rel_error
                               * np.linalg.norm(odd))
            x_bar = 0.5 * (x_bar - x_neg)
            neg_start = neg.state
        if self.refine:
            intended = damped(curvature, damping)  # the host's own A: exact products
            for _ in range(self.refine):
                r = g - intended.matvec(x_bar)
                self.device.state = r
                fix = self.device.step(drift, r, analog_time, burn_in=burn_in)
                analog_s += fix.analog_time_s
                x_bar = x_bar + np.asarray(fix.mean, dtype=np.float64)
        if extra:
            self.device.state = res.state  # the next step continues the +g run's warm start
        kappa_now = res.diagnostics.get("kappa", kappa)
        scale = float(res.diagnostics.get("range_scale", 1.0))
        est = None if kappa_now is None else estimated_rel_error(
            float(np.linalg.norm(x_bar)), g.shape[0], max(damping, 1e-12), float(kappa_now), analog_time - burn_in,
            adc_var=self._noise.adc_var * scale**2, sample_interval=self._noise.interval)
        stats = StepStats(analog_s, time.perf_counter() - t0, damping, attempt, margin, analog_time, burn_in, est)
        return x_bar, replace(state, steps=state.steps + 1, pending=None, stats=stats, floor=new_floor,
                              guard_events=tuple(events), x_norm=float(np.linalg.norm(x_bar)),
                              kappa=None if kappa_now is None else float(kappa_now), start=res.state,
                              neg_start=neg_start, offsets=offsets)

    def _restore(self, pending: DeviceCheckpoint | None) -> None:
        if pending is None:
            return
        if pending.snapshot is not None:  # the whole device, noise stream too
            self.device.restore(pending.snapshot)
        elif pending.state is not None:  # at least the warm start
            self.device.state = pending.state

    @staticmethod
    def record(state: TNGDState, grad: np.ndarray, delta: np.ndarray, curvature: Drift,
               loss: float | None = None) -> TNGDState:
        """The state with this step remembered for ``lm_update`` (delta: theta_new - theta)."""
        return replace(state, last=LastStep(np.asarray(grad, dtype=np.float64), delta, curvature, loss))

    def lm_update(self, state: TNGDState, loss_before: float | None, loss_after: float) -> tuple[TNGDState, float]:
        """(new state, rho): the Levenberg-Marquardt update of lambda from the last recorded step's
        losses on the same batch. ``loss_before=None`` takes the loss recorded with the step."""
        lm, last = self.lm_ready(state)
        before = last.loss if loss_before is None else loss_before
        if before is None:
            raise InvalidInputError("lm_update needs the loss before the step (none was recorded)")
        damping, rho = lm.update(state.damping, before, loss_after, last.grad, last.delta, last.curvature)
        return replace(state, damping=damping), rho

    def lm_ready(self, state: TNGDState) -> tuple[LevenbergMarquardt, LastStep]:
        """The schedule and the last recorded step, or an error saying why LM cannot run yet."""
        if self.lm is None:
            raise InvalidInputError("adapt_damping needs lm=LevenbergMarquardt()")
        if state.last is None:
            raise InvalidInputError("adapt_damping before any step")
        return self.lm, state.last

    def capture(self, state: TNGDState) -> TNGDState:
        """The state to save in a checkpoint: ``pending`` holds the device's analog state and
        snapshot (read now), so loading it and solving continues where this run would.

        A state loaded but not yet solved from still holds the loaded device checkpoint: that is
        saved again (the device itself has not been given it yet). Before any solve the device
        holds nothing of this run, so nothing of it is saved.
        """
        if state.pending is not None or not state.steps:
            return replace(state, last=None)
        device_state = np.asarray(self.device.state, dtype=np.float64)
        return replace(state, last=None, pending=DeviceCheckpoint(device_state, take_snapshot(self.device)))


@dataclass(frozen=True)
class _DeclaredNoise:
    """What the device's ``info()`` says of its noise, in its full-scale units (0 when silent)."""

    kappa: float | None
    adc_var: float  # per-sample ADC noise variance: read noise^2 + LSB^2 / 12
    interval: float  # ADC sample interval, tau


# offset_cancel="auto" keeps cancelling when the bias-independent part of the first solve exceeds
# this many times the readout's target relative error (noise alone gives about 1/sqrt(2) of it).
OFFSET_AUTO_FACTOR = 2.0

# Bits of the gradient that refine="auto" aims at: 2^-12 is below the noise-aware readout's
# default target (10% of |x_bar|) by far, and a 12-bit DAC needs no pass.
AUTO_REFINE_BITS = 12


def auto_refine_passes(dac_bits: int) -> int:
    """Refinement passes for a b-bit bias DAC (0: ideal): the fewest k with (k + 1) b >= AUTO_REFINE_BITS."""
    if dac_bits <= 0 or dac_bits >= AUTO_REFINE_BITS:
        return 0
    return math.ceil(AUTO_REFINE_BITS / dac_bits) - 1


def _checked_grad(grad: np.ndarray, curvature: Drift) -> np.ndarray:
    """grad as float64, or an error that names grad: the device would report it as its "state"
    or "bias", which the caller never set."""
    g = np.asarray(grad, dtype=np.float64)
    dim = getattr(curvature, "dim", None)
    if g.ndim != 1 or (dim is not None and g.shape[0] != dim):
        raise ShapeError(f"grad: expected a vector of length {dim} (the curvature's dimension), got shape "
                         f"{g.shape}")
    if not np.all(np.isfinite(g)):
        bad = np.flatnonzero(~np.isfinite(g))
        raise NonFiniteError(f"grad contains NaN or Inf ({bad.size} of {g.size} entries, first at index "
                             f"{bad[0]}): the loss or its gradient overflowed; lower the learning rate")
    return g


def _declared_noise(device: Device) -> _DeclaredNoise:
    try:
        info = device.info()
    except DeviceError:  # a board that cannot say: plan without its noise
        return _DeclaredNoise(None, 0.0, 0.1)
    adc = info.get("adc") if isinstance(info.get("adc"), dict) else {}
    bits, fs = int(adc.get("bits", 0) or 0), float(adc.get("full_scale", 1.0) or 1.0)
    lsb = 2.0 * fs / 2**bits if bits else 0.0
    var = float(adc.get("read_noise_std", 0.0) or 0.0) ** 2 + lsb**2 / 12.0
    kappa = info.get("kappa")
    return _DeclaredNoise(float(kappa) if isinstance(kappa, (int, float)) else None, var,
                          float(adc.get("sample_interval", 0.1) or 0.1))
