"""The ``karoo`` command: one subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Each module adds its subcommands with ``add_commands(subparsers)``; a parsed command runs
# ``args.func(args)`` and its return value is the exit status.
COMMAND_MODULES = [
    "karoo.demo",
    "karoo.bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="karoo", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
