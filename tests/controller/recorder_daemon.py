"""A real karoo daemon for the controller tests: it records what it is asked, in telstate.

Run as ``python recorder_daemon.py <command> --telstate ... --name ... -p PORT`` for any of the
product's commands (sim, ingest, cal, vis-writer, flag-writer, meta-writer). It is a
`karoo.service.Service` taking its defaults from ``config.<name>`` like every daemon; it writes
the configuration it received to ``test_config.<name>`` and appends each request it gets to the
telstate sensor ``test_requests`` (so the tests see the order across processes). Its option
``--fail-on`` makes a request fail, ``--slow-done`` makes capture-done take a while.
"""

import argparse
import asyncio
import sys
import time
from typing import Optional

import aiokatcp

from karoo.service import Service, add_service_arguments, apply_telstate_config, run_service

COMMANDS = ("sim", "ingest", "cal", "vis-writer", "flag-writer", "meta-writer")
# The option dests the controller writes (COMMON.md), per command.
OPTIONS = {
    "sim": ["cbf_spead", "cbf_name", "antennas", "channels", "dump_period", "substreams",
            "script", "start"],
    "ingest": ["cbf_spead", "cbf_name", "l0_spectral_spead", "l0_spectral_name",
               "l0_continuum_spead", "l0_continuum_name", "output_int_time",
               "continuum_factor", "servers", "server_id", "backend"],
    "cal": ["l0_spead", "l0_name", "flags_spead", "flags_name", "servers", "server_id",
            "report_path", "buffer_dumps"],
    "vis-writer": ["l0_spead", "l0_name", "store", "s3_endpoint_url", "obj_size_mb",
                   "buffer_mb", "workers"],
    "meta-writer": ["store", "s3_endpoint_url"],
}
OPTIONS["flag-writer"] = OPTIONS["vis-writer"]


class Recorder(Service):
    def __init__(self, *args, config: dict, fail_on: str, slow_done: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.config = config
        self.fail_on = fail_on
        self.slow_done = slow_done

    async def record(self, request: str, *args: str) -> None:
        if request == self.fail_on:
            raise aiokatcp.FailReply(f"{self.name} refuses {request} (test)")
        await self.telstate.add("test_requests", [self.name, request, *args], ts=time.time())

    async def capture_init(self, capture_block_id):
        await self.record("capture-init", capture_block_id)

    async def capture_done(self, capture_block_id):
        await asyncio.sleep(self.slow_done)
        await self.record("capture-done", capture_block_id)

    async def request_capture_start(self, ctx, stream: str) -> None:
        """Start sending (simulator)."""
        await self.record("capture-start", stream)

    async def request_capture_stop(self, ctx, stream: str) -> None:
        """Stop sending (simulator)."""
        await self.record("capture-stop", stream)

    async def request_write_meta(self, ctx, capture_block_id: str,
                                 lite: Optional[bool] = True) -> None:  # noqa: UP045
        """Write an RDB (meta writer)."""
        await self.record("write-meta", capture_block_id, "1" if lite else "0")


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command)
        add_service_arguments(p, command)
        for dest in OPTIONS[command]:
            p.add_argument("--" + dest.replace("_", "-"), dest=dest)
        p.add_argument("--fail-on", default="")
        p.add_argument("--slow-done", type=float, default=0.0)
    args = parser.parse_args()
    args = apply_telstate_config(args, parser.parse_args)
    config = {d: getattr(args, d) for d in OPTIONS[args.command]
              if getattr(args, d) is not None}

    async def make(telstate, args):
        await telstate.set(f"test_config.{args.name}", config)
        return Recorder(args.host, args.port, telstate=telstate, name=args.name,
                        config=config, fail_on=args.fail_on, slow_done=args.slow_done)

    return run_service(make, args)


if __name__ == "__main__":
    sys.exit(main())
