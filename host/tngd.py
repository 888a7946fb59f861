"""Thermodynamic Natural Gradient Descent (TNGD), framework-free: NumPy in, NumPy out.

One step (DESIGN section 1; TNGD paper, Algorithm 1):

1. the host hands over the gradient g and the undamped curvature G as a drift description
   (``Factored(J, H)`` for the GGN or empirical Fisher, or ``Dense``);
2. the device is programmed with A = G + lambda I and bias g, and runs for ``analog_time`` tau,
   after ``delay`` tau during which the previous drift and bias still act (the host's compute
   time: the state keeps relaxing towards the previous step's solution);
3. the device returns x_bar, the time average of its state over the readout window
   [burn_in, analog_time];
4. delta = -lr * x_bar (SGD, optional momentum) or Adam's step fed with x_bar (TNGD-Adam).

Where the device starts each solve (``init``):

* ``"warm"`` (the default, as in Algorithm 1 and the hardware): the device continues from the
  state the previous step left, so x_k = e^{-At} x_{k-1} + (I - e^{-At}) A^-1 g_k in the mean;
  small t gives a curvature-aware momentum. The very first solve starts from g_0, like the
  paper's g~_0 = grad l(theta_0).
* ``"grad"``: the device state is set to g before every solve (the paper's x0 = g), so t -> 0 is
  exactly SGD and t -> infinity is NGD.
* ``"reset"``: every solve starts from zero.

Readout: ``burn_in`` = 0 averages the whole run; ``burn_in`` = ``analog_time`` reads one snapshot
of the final state. With long t and no noise x_bar -> (G + lambda I)^-1 g, the exact natural
gradient (tested to 1e-6 against ``host.baselines.ExactNGD``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from protocol.device import Device
from protocol.drift import Drift, drift_matvec
from protocol.errors import InvalidInputError

from .adapt import DriftAdapter, device_capabilities
from .baselines import SGD, Adam, damped

INITS = ("warm", "grad", "reset")


@dataclass
class StepStats:
    """What the last step cost: analog time on the device and host wall time around the call."""

    analog_time_s: float = 0.0
    device_wall_s: float = 0.0
    damping: float = 0.0


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
        """(new damping, rho)."""
        predicted = float(grad @ delta + 0.5 * delta @ drift_matvec(curvature, delta))
        rho = (loss_after - loss_before) / predicted if predicted < 0.0 else -np.inf
        if rho > self.a:
            damping *= self.alpha
        elif rho < 1.0 - self.a:
            damping /= self.alpha
        return float(np.clip(damping, self.minimum, self.maximum)), float(rho)


class TNGD:
    """TNGD against any ``protocol.Device``.

    Args:
        device: from ``host.connect(...)``.
        lr: learning rate eta.
        analog_time: t, the duration of each solve in tau (includes ``burn_in``).
        damping: lambda, added to the curvature passed to ``step``.
        delay: t_d in tau: the previous drift keeps acting this long before the new one.
        burn_in: start of the readout window within the run, in tau (see the module docstring).
        init: "warm" (default), "grad" or "reset": where each solve starts.
        optimizer: "sgd" (theta -= lr * v, v = momentum * v + x_bar) or "adam" (TNGD-Adam).
        momentum, betas, eps: of the digital optimizer x_bar is fed to.
        lm: a ``LevenbergMarquardt`` schedule for lambda; call ``adapt_damping`` after a step.
    """

    def __init__(self, device: Device, lr: float, analog_time: float, damping: float,
                 delay: float = 0.0, burn_in: float = 0.0, *, init: str = "warm", optimizer: str = "sgd",
                 momentum: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 lm: LevenbergMarquardt | None = None) -> None:
        if init not in INITS:
            raise InvalidInputError(f"init must be one of {INITS}, got {init!r}")
        if not 0.0 <= burn_in <= analog_time:
            raise InvalidInputError(f"burn_in ({burn_in}) must lie in [0, analog_time = {analog_time}]")
        if damping < 0.0 or delay < 0.0 or lr <= 0.0:
            raise InvalidInputError("need lr > 0, damping >= 0 and delay >= 0")
        if optimizer == "sgd":
            self.inner: SGD | Adam = SGD(lr, momentum)
        elif optimizer == "adam":
            self.inner = Adam(lr, betas, eps)
        else:
            raise InvalidInputError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        self.device = device
        self.lr = lr
        self.analog_time = float(analog_time)
        self.damping = float(damping)
        self.delay = float(delay)
        self.burn_in = float(burn_in)
        self.init = init
        self.lm = lm
        self.steps = 0
        self.last = StepStats()
        self._last_step: tuple[np.ndarray, np.ndarray, Drift] | None = None
        # what the device declares (cells, drift forms): curvature is converted to fit, or refused early
        self.adapt = DriftAdapter(device_capabilities(device))

    def direction(self, grad: np.ndarray, curvature: Drift) -> np.ndarray:
        """x_bar: the device's estimate of (curvature + damping I)^-1 grad for this step."""
        g = np.asarray(grad, dtype=np.float64)
        drift = self.adapt(damped(curvature, self.damping))
        if self.init == "grad" or (self.init == "warm" and self.steps == 0):
            self.device.state = g
        t0 = time.perf_counter()
        res = self.device.step(drift, g, self.analog_time, burn_in=self.burn_in,
                               delay=self.delay if self.steps else 0.0, reset=self.init == "reset")
        self.last = StepStats(res.analog_time_s, time.perf_counter() - t0, self.damping)
        self.steps += 1
        return np.asarray(res.mean, dtype=np.float64)

    def step(self, grad: np.ndarray, curvature: Drift) -> np.ndarray:
        """delta (theta_new = theta + delta) for the gradient and undamped curvature at theta."""
        x_bar = self.direction(grad, curvature)
        self.inner.lr = self.lr
        delta = self.inner.update(x_bar)
        self._last_step = (np.asarray(grad, dtype=np.float64), delta, curvature)
        return delta

    def adapt_damping(self, loss_before: float, loss_after: float) -> float:
        """Levenberg-Marquardt update of lambda from the last step's losses on the same batch.

        Returns rho. Costs one curvature-vector product (no extra device run).
        """
        if self.lm is None:
            raise InvalidInputError("adapt_damping needs TNGD(..., lm=LevenbergMarquardt())")
        if self._last_step is None:
            raise InvalidInputError("adapt_damping before any step")
        grad, delta, curvature = self._last_step
        self.damping, rho = self.lm.update(self.damping, loss_before, loss_after, grad, delta, curvature)
        return rho
