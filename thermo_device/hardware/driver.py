"""The reference register-level driver: a ``Backend`` that drives an SPU board through a Transport.

Everything a board does not do is done here, on the host side of the driver:

* validation (shapes, finiteness, stability after quantization) before any register is written,
  so invalid input changes nothing on the board;
* range mapping: host numbers are divided by a scale s so that max|b| and max|A^-1 b| sit at
  ``headroom`` of the DAC / ADC full scale (1.0); readouts are multiplied back by s. The scale is
  sticky (kept while the new problem fits and uses at least a quarter of the range), and when it
  changes the cells are re-charged so the state keeps its value in host units across re-ranging;
* coding: coupling entries to signed codes relative to max|A| (the COUPLING_LSB register sets
  the rate of one code), bias and state to DAC codes, run times to ticks of 2^-16 tau, and the
  readout grid exactly as the emulator plans it (``readout.plan_grid``);
* readout: the ADC sample frames are read from the FIFO and averaged here; the mean, returned
  samples, second moment and final state (the last frame) are converted to host units.

Per step the link carries: program = 5 transactions (config, coupling burst, bias burst, COMMIT,
status), run = 4 (timing burst, START, status burst, FIFO burst), plus a state reload when the
range changes. See docs/hardware-backend.md for the register map and the timing contract.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from protocol.capabilities import Capabilities
from protocol.device import RunResult
from protocol.drift import Drift, as_float_array
from protocol.errors import (
    CapacityError,
    DeviceError,
    DeviceTimeoutError,
    InternalError,
    InvalidInputError,
    NotProgrammedError,
    NotStableError,
    ShapeError,
)

from ..backend import Backend, check_run_args
from ..converters import converter_precision, lsb
from ..readout import plan_grid
from . import regmap as R
from .transport import DEFAULT_TIMEOUT_S, Recorder, SocketTransport, Transport

MAX_DURATION_TAU = 10_000.0  # delay + duration: timing registers span 65535 tau; FIFO bounds the window
RANGE_SHRINK = 4.0  # keep the scale while the problem uses at least 1/RANGE_SHRINK of it
STATE_LIMIT = 0.9  # states are charged within this fraction of the DAC full scale
POLL_INTERVAL_S = 1e-4
_BOARD_ERRORS: dict[int, type[DeviceError]] = {
    R.ERR_NOT_STABLE: NotStableError, R.ERR_NOT_PROGRAMMED: NotProgrammedError,
    R.ERR_BAD_CONFIG: InvalidInputError, R.ERR_FIFO_OVERFLOW: CapacityError}


class HardwareBackend(Backend):
    """Drive an SPU board (regmap.py) through ``transport``.

    Args:
        transport: register access to the board; the backend owns it (closes it on close()).
        seed: written to SEED before a soft reset (boards with FEAT_SEEDABLE; ignored otherwise).
        headroom: fraction of full scale the range mapping targets for max|b| and max|A^-1 b|.
        run_timeout_s: wall-clock allowance per run on top of its analog time (polling deadline).
    """

    def __init__(self, transport: Transport, seed: int = 0, *, headroom: float = 0.5,
                 run_timeout_s: float = DEFAULT_TIMEOUT_S, name: str = "register") -> None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise InvalidInputError(f"seed must be a non-negative integer, got {seed!r}")
        if not 0.0 < headroom <= 1.0:
            raise InvalidInputError(f"headroom must lie in (0, 1], got {headroom}")
        self.link = transport if isinstance(transport, Recorder) else Recorder(transport)
        self.headroom = float(headroom)
        self.run_timeout_s = float(run_timeout_s)
        self.name = name
        self.seed = int(seed)
        try:
            ident = np.frombuffer(self.link.read_block(R.ID, R.IDENTITY_WORDS), dtype="<u4")
            if int(ident[0]) != R.BOARD_MAGIC:
                raise DeviceError(f"not an SPU board: ID register reads {int(ident[0]):#010x}")
            if int(ident[1]) >> 16 != R.FW_VERSION >> 16:
                raise DeviceError(f"board firmware {int(ident[1]):#x} is not major version {R.FW_VERSION >> 16}")
            self._identity(ident)
            self.link.write_block(R.SEED_LO, np.array([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF]))
            self.link.write_reg(R.CONTROL, R.CTRL_SOFT_RESET)
        except BaseException:
            self.link.close()
            raise
        self._n = 0  # active cells (0: nothing programmed)
        self._scale = 1.0
        self._bias_host: np.ndarray | None = None
        self._pending_state: np.ndarray | None = None  # set before the first program
        self._closed = False

    def _identity(self, ident: np.ndarray) -> None:
        conv = int(ident[(R.CONVERTERS - R.ID) // 4])
        self.cells = int(ident[(R.CELLS - R.ID) // 4])
        self.dac_bits, self.adc_bits, self.coupling_bits = conv & 0xFF, (conv >> 8) & 0xFF, (conv >> 16) & 0xFF
        self.features = int(ident[(R.FEATURES - R.ID) // 4])
        self.tau_s = int(ident[(R.TAU_PS - R.ID) // 4]) * 1e-12
        self.sample_interval = int(ident[(R.ADC_INTERVAL_TICKS - R.ID) // 4]) / R.TICKS_PER_TAU
        self.min_frame_ticks = int(ident[(R.ADC_MIN_TICKS - R.ID) // 4])
        self.kappa = R.bits_f32(int(ident[(R.KAPPA_F32 - R.ID) // 4]))
        self.fifo_depth = int(ident[(R.FIFO_DEPTH - R.ID) // 4])
        self.dac_lsb = lsb(self.dac_bits, 1.0)
        self.adc_lsb = lsb(self.adc_bits, 1.0)
        if self.dac_bits < 2 or self.adc_bits < 2 or self.adc_bits > 16 or self.coupling_bits < 2:
            raise DeviceError(f"unsupported converter depths (DAC {self.dac_bits}, ADC {self.adc_bits}, "
                              f"coupling {self.coupling_bits} bits)")
        forms = tuple(f for f, bit in (("dense", R.FEAT_DENSE), ("factored", R.FEAT_FACTORED),
                                       ("diagonal", R.FEAT_DIAGONAL)) if self.features & bit)
        if forms != ("dense",):
            raise DeviceError(f"this driver programs dense coupling only; the board offers {forms}")
        self._caps = Capabilities(
            backend=self.name, cells=self.cells, dynamics="overdamped", drift_forms=forms, tau_s=self.tau_s,
            max_duration=MAX_DURATION_TAU, sample_interval=self.sample_interval, dac_bits=self.dac_bits,
            adc_bits=self.adc_bits, coupling_bits=self.coupling_bits,
            precision=converter_precision(cells=self.cells, dac_bits=self.dac_bits, adc_bits=self.adc_bits,
                                          coupling_bits=self.coupling_bits, headroom=self.headroom),
            supports_calibration=False, deterministic=bool(self.features & R.FEAT_SEEDABLE))

    # -- description ------------------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        return self._caps

    def info(self) -> dict[str, Any]:
        out = super().info()
        out.update({"kappa": self.kappa, "covariance_scale": self.kappa * self._scale**2,
                    "range_scale": self._scale, "seed": self.seed,
                    "adc": {"bits": self.adc_bits, "full_scale": 1.0, "sample_interval": self.sample_interval},
                    "dac": {"bits": self.dac_bits, "full_scale": 1.0},
                    "coupling": {"bits": self.coupling_bits},
                    "board": {"fifo_depth": self.fifo_depth, "min_frame_interval": self.min_frame_ticks / R.TICKS_PER_TAU,
                              "link": getattr(self.link.inner, "address", type(self.link.inner).__name__)}})
        return out

    def status(self) -> dict[str, Any]:
        st = self._status_block()
        c = self.link.counters
        return {"programmed": bool(st[0] & R.ST_PROGRAMMED), "error_code": int(st[1]), "runs": int(st[4]),
                "dim": self._n, "range_scale": self._scale,
                "link": {"transactions": c.transactions, "words_written": c.words_written, "words_read": c.words_read}}

    # -- program ----------------------------------------------------------------------------------

    def program(self, drift: Drift, bias: np.ndarray | None = None) -> None:
        self._check_open()
        self.check_form(drift)  # "dense" only (see _identity): dense() is the matrix itself
        n = drift.dim
        if n > self.cells:
            raise CapacityError(f"dense drift has dimension {n}, the board has {self.cells} cells")
        b = np.zeros(n) if bias is None else np.asarray(as_float_array(bias, "bias", 1), dtype=np.float64)
        if b.shape[0] != n:
            raise ShapeError(f"bias: expected length {n} to match the drift, got {b.shape[0]}")
        codes, lsb, a_q = self._coupling_codes(drift.dense())
        x_star = _check_stable(a_q, b)
        # a state set before this size was programmed applies only if its length fits (else it is
        # dropped below, and must not widen the range either)
        pending = self._pending_state
        fits = pending if pending is not None and pending.shape[0] == n else None
        # Warm start survives re-ranging: read the state (host units) only when the scale may change.
        old_state = None
        if self._n == n and pending is None and self._needs_rerange(b, x_star):
            old_state = self.state
        scale = self._choose_scale(b, x_star, old_state, fits)
        # Everything is validated: from here on the board is written.
        block = np.zeros((n, self.cells), dtype=np.int64)
        block[:, :n] = codes
        self.link.write_block(R.N_ACTIVE, np.array([n, R.f32_bits(lsb)]))
        self.link.write_block(R.COUPLING_BASE, block.reshape(-1))
        self.link.write_block(R.BIAS_BASE, self._dac_codes(b / scale, "bias"))
        self.link.write_reg(R.CONTROL, R.CTRL_COMMIT)
        self._raise_board_error(self._status_block())
        rescaled = scale != self._scale
        self._n, self._scale, self._bias_host = n, scale, b
        state = fits if pending is not None else (old_state if rescaled else None)
        self._pending_state = None
        if state is not None:
            self._load_state(state)

    def _coupling_codes(self, a: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        amax = float(np.max(np.abs(a)))
        if amax == 0.0:
            raise NotStableError("dense drift is zero: not positive-stable")
        top = 2 ** (self.coupling_bits - 1) - 1
        lsb = float(np.float32(amax / top))  # the board holds the LSB as float32: use that value
        lo, hi = R.code_range(self.coupling_bits)
        codes = np.clip(np.rint(a / lsb), lo, hi).astype(np.int64)
        return codes, lsb, codes * lsb

    def _needs_rerange(self, b: np.ndarray, x_star: np.ndarray) -> bool:
        need = self._required_scale(b, x_star)
        return not (self._scale / RANGE_SHRINK <= need <= self._scale)

    def _required_scale(self, b: np.ndarray, x_star: np.ndarray) -> float:
        return max(float(np.max(np.abs(b), initial=0.0)), float(np.max(np.abs(x_star), initial=0.0))) / self.headroom

    def _choose_scale(self, b: np.ndarray, x_star: np.ndarray, state: np.ndarray | None,
                      pending: np.ndarray | None = None) -> float:
        need = self._required_scale(b, x_star)
        if state is not None:
            need = max(need, float(np.max(np.abs(state), initial=0.0)) / STATE_LIMIT)
        if self._n and self._scale / RANGE_SHRINK <= need <= self._scale:
            return self._scale
        if pending is not None:
            need = max(need, float(np.max(np.abs(pending), initial=0.0)) / STATE_LIMIT)
        return need if need > 0.0 else 1.0

    def _dac_codes(self, values: np.ndarray, what: str) -> np.ndarray:
        if float(np.max(np.abs(values), initial=0.0)) > 1.0 + 1e-12:  # the range mapping prevents this
            raise CapacityError(f"{what} exceeds the board's DAC full scale at range scale {self._scale:g}")
        lo, hi = R.code_range(self.dac_bits)
        return np.clip(np.rint(values / self.dac_lsb), lo, hi).astype(np.int64)  # +FS is one LSB past the top code

    # -- state --------------------------------------------------------------------------------------

    @property
    def state(self) -> np.ndarray:
        if self._n == 0:
            return np.zeros(0) if self._pending_state is None else self._pending_state.copy()
        codes = np.frombuffer(self.link.read_block(R.STATE_BASE, self._n), dtype="<i4")
        return codes * (self.adc_lsb * self._scale)

    @state.setter
    def state(self, value: np.ndarray) -> None:
        self._check_open()
        arr = np.array(as_float_array(value, "state", 1), dtype=np.float64)
        if self._n == 0:
            if arr.shape[0] > self.cells:
                raise CapacityError(f"state of length {arr.shape[0]}: the board has {self.cells} cells")
            self._pending_state = arr
            return
        if arr.shape[0] != self._n:
            raise ShapeError(f"state: expected length {self._n}, got {arr.shape[0]}")
        if float(np.max(np.abs(arr))) > STATE_LIMIT * self._scale * (1 + 1e-12):
            raise CapacityError(f"state max |x| = {np.max(np.abs(arr)):g} exceeds the cells' range at the current "
                                f"range scale ({STATE_LIMIT * self._scale:g}); program a larger problem first")
        self._load_state(arr)

    def _load_state(self, x: np.ndarray) -> None:
        self.link.write_block(R.STATE_BASE, self._dac_codes(x / self._scale, "state"))
        self.link.write_reg(R.CONTROL, R.CTRL_LOAD_STATE)

    # -- run ------------------------------------------------------------------------------------------

    def run(self, duration: float, *, burn_in: float = 0.0, delay: float = 0.0, reset: bool = False,
            samples: int = 0, second_moment: bool = False) -> RunResult:
        self._check_open()
        if self._n == 0:
            raise NotProgrammedError("run before program: program a drift first")
        duration, burn_in, delay, samples = check_run_args(duration, burn_in, delay, samples, MAX_DURATION_TAU)
        grid = plan_grid(duration - burn_in, self.sample_interval, samples)
        frame_ticks = round(grid.h * R.TICKS_PER_TAU) if grid.n_adc else self.min_frame_ticks
        if grid.n_adc and frame_ticks < self.min_frame_ticks:
            raise InvalidInputError(f"{samples} samples over a {duration - burn_in} tau window need frames "
                                    f"{grid.h:g} tau apart; the ADC needs at least "
                                    f"{self.min_frame_ticks / R.TICKS_PER_TAU:g} tau")
        frames_read = max(grid.n_adc, 1)
        words = R.frame_words(self._n)
        if frames_read * words > self.fifo_depth:
            raise CapacityError(f"{frames_read} frames of {words} words exceed the FIFO ({self.fifo_depth} words)")
        t0 = time.perf_counter()
        self.link.write_block(R.DELAY_TICKS, np.array([round(delay * R.TICKS_PER_TAU), round(burn_in * R.TICKS_PER_TAU),
                                                       frame_ticks, grid.n_adc]))
        self.link.write_reg(R.CONTROL, R.CTRL_START | (R.CTRL_RESET_STATE if reset else 0))
        st = self._wait_done(delay + duration)
        raw = self.link.read_block(R.FIFO_DATA, frames_read * words)
        codes = np.frombuffer(raw, dtype="<i2").reshape(frames_read, 2 * words)[:, :self._n]
        x = codes * (self.adc_lsb * self._scale)  # (frames, n) in host units
        mean = x.mean(axis=0)
        kept = x[grid.stride - 1::grid.stride] if grid.stride else None
        moment = (x.T @ x) / frames_read if second_moment else None
        diag = {"method": "register", "adc_samples": grid.n_adc, "adc_interval": frame_ticks / R.TICKS_PER_TAU,
                "delay_applied": int(st[3]) / R.TICKS_PER_TAU, "kappa": self.kappa * self._scale**2,
                "range_scale": self._scale, "adc_clipped_fraction": int(st[5]) / max(x.size, 1),
                "adc_lsb": self.adc_lsb * self._scale, "wall_s": time.perf_counter() - t0}
        return RunResult(mean=mean, state=x[-1].copy(), samples=kept, second_moment=moment,
                         analog_time_s=(delay + duration) * self.tau_s, diagnostics=diag)

    def _wait_done(self, analog_tau: float) -> np.ndarray:
        deadline = time.monotonic() + self.run_timeout_s + analog_tau * self.tau_s
        while True:
            st = self._status_block()
            self._raise_board_error(st)
            if not st[0] & R.ST_BUSY and st[0] & R.ST_DONE:
                return st
            if time.monotonic() > deadline:
                raise DeviceTimeoutError(f"board run did not finish within {self.run_timeout_s} s")
            time.sleep(POLL_INTERVAL_S)

    def _status_block(self) -> np.ndarray:
        return np.frombuffer(self.link.read_block(R.STATUS, R.STATUS_WORDS), dtype="<u4")

    def _raise_board_error(self, st: np.ndarray) -> None:
        if not st[0] & R.ST_ERROR:
            return
        code = int(st[1])
        self.link.write_reg(R.CONTROL, R.CTRL_CLEAR_ERROR)
        cls = _BOARD_ERRORS.get(code, InternalError)
        raise cls(f"board reported error {code} ({cls.__name__})")

    # -- life cycle -----------------------------------------------------------------------------------

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.link.close()

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidInputError("this backend is closed")


def _check_stable(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A^-1 b for the quantized A, or NotStableError if A is not positive-stable."""
    if np.array_equal(a, a.T):
        lam = np.linalg.eigvalsh(a)
        ok = lam[0] > 0.0 and math.isfinite(lam[0])
    else:
        ok = bool(np.all(np.linalg.eigvals(a).real > 0.0))
    if not ok:
        raise NotStableError("dense drift is not positive-stable after coupling quantization "
                             "(some eigenvalue has a non-positive real part)")
    return np.linalg.solve(a, b)


def make_register_backend(seed: int = 0, address: str = "127.0.0.1:7700", timeout: float = DEFAULT_TIMEOUT_S,
                          headroom: float = 0.5) -> HardwareBackend:
    """Plugin factory: ``--backend register --backend-option address=HOST:PORT``."""
    return HardwareBackend(SocketTransport.from_address(str(address), timeout=float(timeout)), seed=seed,
                           headroom=float(headroom), run_timeout_s=float(timeout))
