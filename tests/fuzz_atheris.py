"""Coverage-guided fuzzing (atheris / libFuzzer) of the daemon's request path, in process.

Each input is split into a multipart (frames separated by a marker) and fed to the same steps the
daemon runs on a message: ``decode`` -> ``check_request`` -> the argument and drift checks -> an
error reply. Only typed ``DeviceError``s may escape; anything else (or a MemoryError) is a crash
that libFuzzer reports with the input that caused it.

    python3 tests/fuzz_atheris.py -atheris_runs=200000          # bounded by count
    python3 tests/fuzz_atheris.py -max_total_time=60             # bounded by time

``tests/test_fuzz_atheris.py`` runs it for a few seconds in CI (skipped when atheris is absent;
hypothesis remains the CI fuzzer).
"""

from __future__ import annotations

import sys

import atheris
import msgpack

# Coverage feedback from our wire code only: instrumenting numpy/numba (imported by thermo_device)
# costs a minute at start-up and guides nothing.
with atheris.instrument_imports(include=["protocol"]):
    from protocol.codec import check_request, decode, drift_from_wire, encode, reply_header, request_header
    from protocol.errors import DeviceError
    from protocol.messages import Limits
from thermo_device.daemon import _run_kwargs  # noqa: E402

LIMITS = Limits(max_message_bytes=1 << 20)
SEP = b"\xfe\xed\xfa\xce"  # frame separator inside one fuzz input


def one_input(data: bytes) -> None:
    frames = data.split(SEP)
    header = None
    try:
        msg = decode(frames, LIMITS)
        header = msg.header
        op, _, _, _, args = check_request(header)
        if op in ("program", "step"):
            drift_from_wire(args.get("drift"), msg.arrays)
        if op in ("run", "step"):
            _run_kwargs(args)
        reply = reply_header(header, "fuzz", result={})
    except DeviceError as exc:
        reply = reply_header(header or getattr(exc, "header", None), "fuzz", error=exc)
    encode(reply)


def _seeds() -> list[bytes]:
    """Valid messages to start from (libFuzzer mutates them)."""
    out = []
    for op, args in (("step", {"drift": {"form": "diagonal"}, "duration": 1.0, "samples": 2}),
                     ("program", {"drift": {"form": "factored", "damping": 0.5}}), ("ping", {})):
        h = request_header(op, 1, "s" * 8, 1, args)
        frames = encode(h, {"diag": [1.0, 2.0]} if op == "step" else None)
        out.append(SEP.join(f if isinstance(f, bytes) else f.tobytes() for f in frames))
    out.append(msgpack.packb({"proto": "thermo-ngd", "version": [1, 0]}))
    return out


def main(argv: list[str]) -> None:
    import os
    import tempfile

    corpus = tempfile.mkdtemp(prefix="thermo-fuzz-")
    for i, seed in enumerate(_seeds()):
        with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
            f.write(seed)
    atheris.Setup([*argv, corpus], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
