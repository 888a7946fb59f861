"""thermo-device: the device side's command line (info; serve arrives with the daemon)."""

from __future__ import annotations

import argparse
import json
import sys

from protocol.errors import DeviceError


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            from . import Emulator, load_profile

            dev = Emulator(load_profile(args.profile, _overrides(args.set)))
            print(json.dumps(dev.info(), indent=2))
            return 0
    except DeviceError as exc:
        print(f"thermo-device: error [{exc.code.value}]: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
