"""The board link: a small framed binary protocol for register access (what a USB/PCIe/Ethernet
board bridge carries), shared by the driver's socket transport and the board simulator.

Every request gets exactly one response; the tag (16 bits) pairs them. Frames, little-endian:

    request:  magic "SPUQ" | op u8 | flags u8 | tag u16 | addr u32 | count u32 | payload
    response: magic "SPUR" | op u8 | status u8 | tag u16 | addr u32 | count u32 | payload

``count`` is in 32-bit words. WRITE carries count words of payload and gets an empty response;
READ carries none and gets count words back (consecutive addresses, except at the FIFO port,
where a burst pops words). A response with a non-zero status carries no payload.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("<4sBBHII")
REQUEST_MAGIC = b"SPUQ"
RESPONSE_MAGIC = b"SPUR"
MAX_BURST_WORDS = 1 << 22  # 16 MiB in one request

OP_READ = 1
OP_WRITE = 2

STATUS_OK = 0
STATUS_BAD_ADDRESS = 1  # no register there, or a burst that runs off a block
STATUS_READ_ONLY = 2  # a write to a read-only register
STATUS_BUSY = 3  # the board is owned by another link
STATUS_BAD_REQUEST = 4  # bad magic, op or count
STATUS_FIFO_UNDERFLOW = 5  # a FIFO burst longer than what is waiting

STATUS_NAMES = {STATUS_OK: "ok", STATUS_BAD_ADDRESS: "bad address", STATUS_READ_ONLY: "read-only register",
                STATUS_BUSY: "board owned by another link", STATUS_BAD_REQUEST: "bad request",
                STATUS_FIFO_UNDERFLOW: "FIFO underflow"}


def pack_request(op: int, tag: int, addr: int, count: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(REQUEST_MAGIC, op, 0, tag & 0xFFFF, addr, count) + payload


def pack_response(op: int, status: int, tag: int, addr: int, count: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(RESPONSE_MAGIC, op, status, tag & 0xFFFF, addr, count) + payload
