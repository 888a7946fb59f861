"""thermo-device: the device side's command line (info, serve), for any registered backend."""

from __future__ import annotations

import argparse
import json
import re
import sys

from protocol.errors import DeviceError
from protocol.messages import Limits


class CliError(Exception):
    """A usage problem reported as one line on stderr with exit status 2."""


def _bind_failure(bind: str, exc: Exception) -> str:
    """What to do when ``bind`` cannot be bound (``exc`` from ZeroMQ)."""
    import errno

    if getattr(exc, "errno", None) == errno.EADDRINUSE:
        return (f"{bind} is already in use (another daemon?): stop it, or pick another port, e.g. "
                "--bind 'tcp://127.0.0.1:*' for a free one (printed on stdout)")
    return f"cannot bind {bind} ({exc}): use tcp://HOST:PORT (e.g. tcp://127.0.0.1:5556) or ipc://PATH"


def _unreachable(exc: DeviceError) -> str | None:
    """A board the driver cannot reach: the one-line fix, or None for any other error."""
    if isinstance(exc.__cause__, OSError) and not isinstance(exc.__cause__, TimeoutError) \
            or isinstance(exc.__cause__, ConnectionError):
        return (f"{exc}: is the board running and is the address right? Start a simulated one with "
                "'python -m thermo_device.hardware.board_sim --port PORT' and pass "
                "--backend-option address=127.0.0.1:PORT")
    return None


def _stepping_warning(profile: object) -> str | None:
    """One line when ``profile`` time-steps its dynamics (no exact propagator), else None."""
    from .programming import needs_stepping

    method = profile.integrator.method  # type: ignore[attr-defined]
    if method in ("euler_maruyama", "heun", "baoab") or (method == "auto" and needs_stepping(profile, None)):  # type: ignore[arg-type]
        return (f"profile {profile.name!r} time-steps its dynamics (integrator {method}; mismatched arrays, "  # type: ignore[attr-defined]
                "per-cell capacitances, rails or 1/f noise): a TNGD step takes seconds, not milliseconds "
                "(ideal and tngd-paper integrate exactly)")
    return None


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


def _backend_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="emulator",
                        help="backend name: emulator (default; --profile/--set apply), register (the "
                             "reference board driver), or a plugin of the thermo_device.backends group")
    parser.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                        help="option for the backend's factory (repeatable), e.g. address=127.0.0.1:7700")


def _plugin_options(args: argparse.Namespace) -> dict[str, object] | None:
    """Factory options for a plugin backend, or None when the emulator path of --profile applies."""
    from .plugins import parse_options

    options = parse_options(args.backend_option)
    if args.backend != "emulator":
        return options
    if not options:
        return None
    return {"profile": args.profile, **_overrides(args.set), **options}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thermo-device", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print the capabilities of a device as JSON")
    info.add_argument("--profile", default="ideal", help="built-in profile name or TOML path")
    info.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override a profile key (repeatable)")
    _backend_args(info)
    serve = sub.add_parser("serve", help="serve devices over ZeroMQ (one backend per session)")
    _backend_args(serve)
    serve.add_argument("--profile", default="ideal", help="built-in profile name or TOML path")
    serve.add_argument("--bind", default="tcp://127.0.0.1:5555",
                       help="ZeroMQ endpoint (loopback by default; a '*' port picks a free one)")
    serve.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a profile key (repeatable)")
    serve.add_argument("--max-message-bytes", type=int, default=Limits().max_message_bytes,
                       help="largest request accepted, all frames together (default %(default)s)")
    serve.add_argument("--max-sessions", type=int, default=Limits().max_sessions,
                       help="sessions open at once (each host's connect() is one; a further open is "
                            "refused with 'capacity' until one closes or idles out) (default %(default)s)")
    serve.add_argument("--queue-size", type=int, default=Limits().queue_size,
                       help="compute requests waiting behind a running one before 'busy'")
    serve.add_argument("--session-idle-s", type=float, default=Limits().session_idle_s,
                       help="reclaim a session idle this long (0: never)")
    serve.add_argument("--blas-threads", type=int, default=1,
                       help="BLAS threads for the whole daemon (0: leave the library's default). "
                            "Multi-threaded BLAS rounds differently from single-threaded, so this "
                            "must match the host's for bit-identical results (default %(default)s, "
                            "as host.tasks.train runs the embedded emulator)")
    serve.add_argument("--allow-remote", action="store_true",
                       help="allow a non-loopback bind without CURVE (anyone who reaches the port can use it)")
    serve.add_argument("--curve-secret-key", metavar="FILE",
                       help="CURVE: this daemon's NAME.key_secret certificate (from 'keygen'); "
                            "needs --allow-keys (see docs/security.md)")
    serve.add_argument("--allow-keys", metavar="DIR",
                       help="CURVE: directory of allowed clients' public *.key certificates "
                            "(re-read on SIGHUP)")
    keygen = sub.add_parser("keygen", help="write a CURVE key pair: NAME.key (public) and NAME.key_secret")
    keygen.add_argument("--out", required=True, metavar="DIR", help="directory to write the two files to")
    keygen.add_argument("--name", required=True, help="file name stem, e.g. 'daemon' or a client's host name")
    keygen.add_argument("--force", action="store_true", help="replace an existing key pair of that name")
    serve.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def serve(args: argparse.Namespace) -> int:
    """Build the profile, bind, print the endpoint on stdout, serve until SIGINT/SIGTERM."""
    import logging
    import signal

    import zmq

    from . import Backend, Emulator, load_profile
    from .daemon import Daemon, check_bind

    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.max_message_bytes <= 0 or args.max_sessions <= 0 or args.queue_size < 0:
        raise SystemExit("--max-message-bytes and --max-sessions must be positive, --queue-size >= 0")
    if args.blas_threads < 0:
        raise SystemExit("--blas-threads must be >= 0 (0: the BLAS library's default)")
    from .blas import set_blas_threads

    # Process-wide for the daemon's life (numpy's and scipy's OpenBLAS alike): eigh, GEMM and
    # friends split their sums by thread count, so this is part of what fixes the numbers.
    set_blas_threads(args.blas_threads)
    security = None
    if args.curve_secret_key or args.allow_keys:
        if not (args.curve_secret_key and args.allow_keys):
            raise SystemExit("CURVE needs both --curve-secret-key and --allow-keys (ironhouse: "
                             "only allow-listed clients)")
        from .security import ServerSecurity

        security = ServerSecurity(args.curve_secret_key, args.allow_keys)
    if args.bind.startswith("tcp://") and not re.fullmatch(r"tcp://(\[[0-9a-fA-F:.]+\]|[^:/\s\[\]]+):(\d{1,5}|\*)",
                                                           args.bind):
        raise CliError(f"--bind {args.bind!r} needs a host and a port, e.g. tcp://127.0.0.1:5555 "
                       "(or tcp://127.0.0.1:* for a free port)")
    check_bind(args.bind, args.allow_remote, authenticated=security is not None)
    options = _plugin_options(args)
    describe = None
    if options is None:
        profile = load_profile(args.profile, _overrides(args.set))
        Emulator(profile, 0)  # fail at start-up, not at the first session, on a profile it cannot run
        cells = profile.device.cells
        warning = _stepping_warning(profile)
        if warning:
            print(f"thermo-device: warning: {warning}", file=sys.stderr, flush=True)

        def factory(seed: int) -> Emulator:
            return Emulator(profile, seed)
    else:
        from .plugins import create

        name = args.backend
        probe = create(name, 0, options)  # fail at start-up on a backend that cannot be built
        try:
            describe = probe.info()
            cells = probe.capabilities().cells
        finally:
            probe.close()  # a board serves one driver at a time: release it for the sessions

        def factory(seed: int) -> Backend:
            return create(name, seed, options)
    limits = Limits(max_message_bytes=args.max_message_bytes, max_sessions=args.max_sessions,
                    queue_size=args.queue_size, session_idle_s=args.session_idle_s,
                    max_dimension=max(Limits().max_dimension, cells))
    daemon = Daemon(factory, args.bind, limits=limits, describe=describe, security=security)
    try:
        endpoint = daemon.start()
    except zmq.ZMQError as exc:
        # the daemon's socket did not bind: one line naming the fix, not pyzmq's traceback
        raise CliError(_bind_failure(args.bind, exc)) from exc
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: daemon.stop())
    if security is not None:
        signal.signal(signal.SIGHUP, lambda *_: security.reload())
    # One line on stdout so scripts (and tests) learn the endpoint when the port was '*'.
    print(f"serving {endpoint} instance {daemon.instance}", flush=True)
    daemon.serve()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            from . import Emulator, load_profile

            options = _plugin_options(args)
            if options is None:
                dev = Emulator(load_profile(args.profile, _overrides(args.set)))
            else:
                from .plugins import create

                dev = create(args.backend, 0, options)
            try:
                print(json.dumps(dev.info(), indent=2))
            finally:
                dev.close()
            return 0
        if args.command == "serve":
            return serve(args)
        if args.command == "keygen":
            from .security import keygen

            public, secret = keygen(args.out, args.name, force=args.force)
            print(f"public key (share it): {public}\nsecret key (keep it private): {secret}")
            return 0
    except CliError as exc:
        print(f"thermo-device: error: {exc}", file=sys.stderr)
        return 2
    except DeviceError as exc:
        fix = _unreachable(exc)
        if fix is not None:
            print(f"thermo-device: error [unreachable]: {fix}", file=sys.stderr)
        else:
            print(f"thermo-device: error [{exc.code.value}]: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
