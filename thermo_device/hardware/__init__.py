"""The reference register-level driver and its simulated board.

* ``regmap``: the board's registers (addresses, widths, codes, control and status bits).
* ``link`` / ``transport``: the framed register link and the ``Transport`` interface a board
  bridge implements (``SocketTransport`` over TCP; ``Recorder`` for counters and transcripts).
* ``driver``: ``HardwareBackend``, the ``Backend`` that programs codes, runs, and reads frames.
* ``board_sim``: the board simulator (``python -m thermo_device.hardware.board_sim --port 0``).

Nothing here is imported by ``thermo_device`` itself: a deployment without a board never loads it.
"""

from .driver import HardwareBackend, make_register_backend
from .transport import Recorder, SocketTransport, Transport

__all__ = ["HardwareBackend", "Recorder", "SocketTransport", "Transport", "make_register_backend"]
