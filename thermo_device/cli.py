"""thermo-device: the device side's command line (info, serve)."""

from __future__ import annotations

import argparse
import json
import sys

from protocol.errors import DeviceError
from protocol.messages import Limits


def _overrides(pairs: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects section.key=value, got {pair!r}")
        try:
            import tomllib

            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except Exception:
            out[key] = raw
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thermo-device", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print the capabilities of an emulated device as JSON")
    info.add_argument("--profile", default="ideal", help="built-in profile name or TOML path")
    info.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override a profile key (repeatable)")
    serve = sub.add_parser("serve", help="serve emulated devices over ZeroMQ (one per session)")
    serve.add_argument("--profile", default="ideal", help="built-in profile name or TOML path")
    serve.add_argument("--bind", default="tcp://127.0.0.1:5555",
                       help="ZeroMQ endpoint (loopback by default; a '*' port picks a free one)")
    serve.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a profile key (repeatable)")
    serve.add_argument("--max-message-bytes", type=int, default=Limits().max_message_bytes,
                       help="largest request accepted, all frames together (default %(default)s)")
    serve.add_argument("--max-sessions", type=int, default=Limits().max_sessions)
    serve.add_argument("--queue-size", type=int, default=Limits().queue_size,
                       help="compute requests waiting behind a running one before 'busy'")
    serve.add_argument("--session-idle-s", type=float, default=Limits().session_idle_s,
                       help="reclaim a session idle this long (0: never)")
    serve.add_argument("--allow-remote", action="store_true",
                       help="allow a non-loopback bind (the protocol has no authentication yet)")
    serve.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def serve(args: argparse.Namespace) -> int:
    """Build the profile, bind, print the endpoint on stdout, serve until SIGINT/SIGTERM."""
    import logging
    import signal

    from . import Emulator, load_profile
    from .daemon import Daemon, check_bind

    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.max_message_bytes <= 0 or args.max_sessions <= 0 or args.queue_size < 0:
        raise SystemExit("--max-message-bytes and --max-sessions must be positive, --queue-size >= 0")
    check_bind(args.bind, args.allow_remote)
    profile = load_profile(args.profile, _overrides(args.set))
    Emulator(profile, 0)  # fail at start-up, not at the first session, on a profile it cannot run
    limits = Limits(max_message_bytes=args.max_message_bytes, max_sessions=args.max_sessions,
                    queue_size=args.queue_size, session_idle_s=args.session_idle_s,
                    max_dimension=max(Limits().max_dimension, profile.device.cells))
    daemon = Daemon(lambda seed: Emulator(profile, seed), args.bind, limits=limits)
    endpoint = daemon.start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: daemon.stop())
    # One line on stdout so scripts (and tests) learn the endpoint when the port was '*'.
    print(f"serving {endpoint} instance {daemon.instance}", flush=True)
    daemon.serve()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            from . import Emulator, load_profile

            dev = Emulator(load_profile(args.profile, _overrides(args.set)))
            print(json.dumps(dev.info(), indent=2))
            return 0
        if args.command == "serve":
            return serve(args)
    except DeviceError as exc:
        print(f"thermo-device: error [{exc.code.value}]: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
