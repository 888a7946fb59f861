"""The reference SPU board's register map (board firmware 1.0). docs/hardware-backend.md has the table.

All registers are 32 bits wide, little-endian, at byte addresses (stride 4). Signed codes are
two's complement in the register's low bits, sign-extended to 32 bits. Times are in ticks of
2^-16 tau (``TICKS_PER_TAU``), so a 32-bit timing register spans 65535 tau.

Blocks:

* identity (read-only): what the board is and its converters; the driver builds ``Capabilities``
  from these alone, so a board describes itself.
* run status (read-only, contiguous so one burst read polls a run).
* configuration (read-write): active cell count, coupling LSB, seed, run timing.
* ``CONTROL`` (write-only, write 1 to act; bits act in the order listed by ``CTRL_ORDER``).
* arrays: ``BIAS[i]`` (bias DAC codes), ``STATE[i]`` (write: initial-condition DAC codes, applied
  by ``CTRL_LOAD_STATE``; read: ADC code of cell i now), ``COUPLING[i][j]`` (row-major over the
  physical cell count), and ``FIFO_DATA``, a port: a burst read there pops sample frames.

Programming is double-buffered: writes to ``BIAS`` / ``COUPLING`` / ``COUPLING_LSB`` / ``N_ACTIVE``
go to shadow registers; ``CTRL_COMMIT`` latches them. During the ``DELAY_TICKS`` after
``CTRL_START`` the previously latched drift keeps acting (the TNGD delay t_d).
"""

from __future__ import annotations

import struct

BOARD_MAGIC = 0x53505531  # "SPU1"
FW_VERSION = 0x00010000  # 1.0
TICKS_PER_TAU = 1 << 16

# -- identity (RO) ----------------------------------------------------------------------------------
ID = 0x0000
FW = 0x0004
CELLS = 0x0008
CONVERTERS = 0x000C  # [7:0] DAC bits (bias and state), [15:8] ADC bits, [23:16] coupling bits
FEATURES = 0x0010  # FEAT_* bits
TAU_PS = 0x0014  # tau in picoseconds
ADC_INTERVAL_TICKS = 0x0018  # nominal ADC sample interval
ADC_MIN_TICKS = 0x001C  # shortest frame interval the ADC accepts
KAPPA_F32 = 0x0020  # noise strength, (full-scale units)^2, float32 bits
FIFO_DEPTH = 0x0024  # FIFO capacity in words
IDENTITY_WORDS = 10  # ID .. FIFO_DEPTH, read in one burst

FEAT_SEEDABLE = 1 << 0  # the noise source is a seeded digital generator (simulators, FPGA noise)
FEAT_DENSE = 1 << 1
FEAT_FACTORED = 1 << 2
FEAT_DIAGONAL = 1 << 3

# -- run status (RO), contiguous: one burst of STATUS_WORDS polls a run -----------------------------
STATUS = 0x0040  # ST_* bits
ERROR_CODE = 0x0044  # ERR_*
FIFO_COUNT = 0x0048  # whole frames waiting in the FIFO
DELAY_APPLIED_TICKS = 0x004C  # delay the last run really spent under the previous drift
RUN_COUNT = 0x0050  # runs completed since the last soft reset
ADC_CLIPPED = 0x0054  # samples clipped at the ADC rails in the last run
STATUS_WORDS = 6

ST_BUSY = 1 << 0
ST_DONE = 1 << 1
ST_PROGRAMMED = 1 << 2
ST_ERROR = 1 << 3

ERR_NONE = 0
ERR_NOT_STABLE = 1  # the committed coupling matrix is not positive-stable
ERR_NOT_PROGRAMMED = 2  # START before any COMMIT
ERR_BAD_CONFIG = 3  # inconsistent configuration (sizes, frame interval below ADC_MIN_TICKS)
ERR_FIFO_OVERFLOW = 4  # FRAMES x FRAME_WORDS exceeds FIFO_DEPTH

# -- configuration (RW) -----------------------------------------------------------------------------
N_ACTIVE = 0x0060  # cells in use, 1..CELLS (shadow; latched by COMMIT)
COUPLING_LSB_F32 = 0x0064  # rate (1/tau) of one coupling code, float32 bits (shadow)
DELAY_TICKS = 0x0068
BURNIN_TICKS = 0x006C
FRAME_TICKS = 0x0070  # spacing of the frames in the readout window
FRAMES = 0x0074  # frames in the readout window; 0 = one snapshot frame at the end of burn-in
RUN_CONFIG_WORDS = 4  # DELAY_TICKS .. FRAMES, written in one burst
SEED_LO = 0x0078
SEED_HI = 0x007C
FRAME_WORDS = 0x0080  # RO: words per frame = ceil(N_ACTIVE / 2)

# -- control (WO) -----------------------------------------------------------------------------------
CONTROL = 0x00A0
CTRL_SOFT_RESET = 1 << 0  # reseed the noise source from SEED; clear program, state, FIFO, errors
CTRL_CLEAR_ERROR = 1 << 1
CTRL_COMMIT = 1 << 2  # latch the shadow drift and bias
CTRL_LOAD_STATE = 1 << 3  # charge the cells to the STATE codes
CTRL_RESET_STATE = 1 << 4  # discharge the cells to zero
CTRL_START = 1 << 5  # run: delay, burn-in, then FRAMES frames into the FIFO
CTRL_ORDER = (CTRL_SOFT_RESET, CTRL_CLEAR_ERROR, CTRL_COMMIT, CTRL_LOAD_STATE, CTRL_RESET_STATE, CTRL_START)

# -- arrays -----------------------------------------------------------------------------------------
BIAS_BASE = 0x1000  # BIAS[i] at BIAS_BASE + 4 i (RW, shadow)
STATE_BASE = 0x2000  # STATE[i] at STATE_BASE + 4 i
FIFO_DATA = 0x8000  # port: burst reads pop frames; two int16 ADC codes per word, cell 2k low
COUPLING_BASE = 0x10000  # COUPLING[i][j] at COUPLING_BASE + 4 (i CELLS + j) (RW, shadow)
MAX_CELLS = 1024  # BIAS and STATE blocks hold 1024 words each


def bias_addr(i: int) -> int:
    return BIAS_BASE + 4 * i


def state_addr(i: int) -> int:
    return STATE_BASE + 4 * i


def coupling_addr(i: int, j: int, cells: int) -> int:
    return COUPLING_BASE + 4 * (i * cells + j)


def f32_bits(x: float) -> int:
    """The IEEE-754 float32 bit pattern of x, as an unsigned register value."""
    return struct.unpack("<I", struct.pack("<f", x))[0]


def bits_f32(word: int) -> float:
    return struct.unpack("<f", struct.pack("<I", word & 0xFFFFFFFF))[0]


def code_range(bits: int) -> tuple[int, int]:
    """Two's-complement code range of a ``bits``-bit converter."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def frame_words(n: int) -> int:
    return (n + 1) // 2
