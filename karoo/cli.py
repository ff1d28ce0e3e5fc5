"""The ``karoo`` command: one subcommand per job."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

from .service import apply_telstate_config, setup_logging

# Each module adds its subcommands with ``add_commands(subparsers)``; a parsed command runs
# ``args.func(args)`` and its return value is the exit status.
COMMAND_MODULES = [
    "karoo.demo",
    "karoo.bench",
    "karoo.sim.service",
    "karoo.ingest.service",
    "karoo.cal.service",
    "karoo.controller.kubernetes",
    "karoo.controller.master",
    "karoo.controller.product",
    "karoo.dataset.cli",
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


@contextlib.contextmanager
def _required_options_deferred(parser: argparse.ArgumentParser):
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    actions = [action for sub in subparsers for p in sub.choices.values() for action in p._actions
               if action.required and action.option_strings]
    for action in actions:
        action.required = False
    try:
        yield
    finally:
        for action in actions:
            action.required = True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a ``karoo`` command line; daemons' defaults come from telstate ``config.<name>``."""
    parser = build_parser()
    # A daemon's required options may come from telstate: they are checked on the final
    # parse, once the telstate defaults are in.
    with _required_options_deferred(parser):
        args = parser.parse_args(argv)
    setup_logging(args.verbose)
    # Daemons take their defaults from telstate (config.<name>), as katsdpservices does.
    return apply_telstate_config(args, lambda: parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
