"""The ``karoo`` command: one subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import sys

from .service import apply_telstate_config, setup_logging

# Each module adds its subcommands with ``add_commands(subparsers)``; a parsed command runs
# ``args.func(args)`` and its return value is the exit status.
COMMAND_MODULES = [
    "karoo.demo",
    "karoo.bench",
    "karoo.chunkstore.writer",
    "karoo.chunkstore.metawriter",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="karoo", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    # Daemons take their defaults from telstate (config.<name>), as katsdpservices does.
    args = apply_telstate_config(args, lambda: parser.parse_args(argv))
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
