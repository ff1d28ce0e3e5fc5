"""What every karoo daemon shares: the KATCP server base, telstate-backed configuration, logging.

A daemon is a subclass of `Service` (an aiokatcp ``DeviceServer``). It implements
`Service.capture_init` and `Service.capture_done`; the base class gives it the anchors' requests
and sensors (``capture-init``, ``capture-done``, ``device-status``, ``capture-block-state``) and
serialises capture transitions, so a second ``capture-init`` or a ``capture-done`` without one gets
a clear ``fail`` reply instead of corrupting state.

Configuration follows katsdpservices: a daemon started with ``--telstate ENDPOINT --name a.b.c``
takes its defaults from the telstate dict ``config`` and the keys ``config.a``, ``config.a.b``,
``config.a.b.c`` (most specific wins); an explicit command-line option still wins over them.
The same classes run in the embedded demo, where they are constructed directly with an in-memory
telstate.
"""

# No `from __future__ import annotations`: aiokatcp reads request annotations as real types.
import argparse
import asyncio
import enum
import functools
import json
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any, Optional

import aiokatcp
from aiokatcp import DeviceStatus, FailReply, Sensor

from . import __version__
from .telstate import TelescopeState
from .telstate import aio as telstate_aio

logger = logging.getLogger(__name__)

# Capture block ids are Unix seconds in production, but any katcp-safe token is accepted so that
# tests and replays can name their own; they become key prefixes and object names.
_CAPTURE_BLOCK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]*$")


class CaptureBlockState(enum.Enum):
    """Life of a capture block inside one daemon (the anchors' names)."""

    CAPTURING = "capturing"
    BURNDOWN = "burndown"


# -- configuration ------------------------------------------------------------------------------


def telstate_url(endpoint: str | None) -> str:
    """Normalise ``host:port`` or ``redis://...`` to a URL; empty or None means in memory."""
    if not endpoint:
        return ""
    return endpoint if "://" in endpoint else "redis://" + endpoint  # memory://name stays


def task_config(telstate: TelescopeState, name: str) -> dict[str, Any]:
    """The configuration of task `name` stored in telstate, merged the katsdpservices way.

    The dict ``config`` and its nested dicts along the dotted `name` come first, then the flat
    keys ``config.a``, ``config.a.b``, ...; the most specific value wins.
    """
    merged: dict[str, Any] = {}
    parts = name.split(".") if name else []
    root = telstate.get("config", {})
    node = root if isinstance(root, Mapping) else {}
    merged.update({k: v for k, v in node.items() if not isinstance(v, Mapping)})
    for part in parts:
        node = node.get(part, {}) if isinstance(node, Mapping) else {}
        if isinstance(node, Mapping):
            merged.update({k: v for k, v in node.items() if not isinstance(v, Mapping)})
    for i in range(1, len(parts) + 1):
        flat = telstate.get("config." + ".".join(parts[:i]), {})
        if isinstance(flat, Mapping):
            merged.update(flat)
    return merged


def add_service_arguments(parser: argparse.ArgumentParser, default_name: str) -> None:
    """Add the options every daemon has: telstate, task name, KATCP address and port."""
    group = parser.add_argument_group("service")
    group.add_argument(
        "--telstate", metavar="ENDPOINT", default="",
        help="telstate Redis endpoint (host:port or redis://...); default: in memory",
    )
    group.add_argument(
        "--name", default=default_name,
        help="task name: selects the telstate config.<name> defaults [%(default)s]",
    )
    group.add_argument(
        "-a", "--host", default="127.0.0.1", help="KATCP listening address [%(default)s]"
    )
    group.add_argument(
        "-p", "--port", type=int, default=2050, help="KATCP port (0 picks a free one) [%(default)s]"
    )
    parser.set_defaults(_service_parser=parser)


def apply_telstate_config(args: argparse.Namespace, reparse: Callable[[], argparse.Namespace]):
    """Re-parse with the task's telstate config as defaults (explicit options still win).

    Called by the ``karoo`` command after a first parse; `reparse` parses the same argv again
    (and so checks required options: one that the telstate config gives is satisfied).
    Returns the final namespace.
    """
    parser = getattr(args, "_service_parser", None)
    if parser is None or not args.telstate:
        return reparse()
    telstate = TelescopeState(telstate_url(args.telstate))
    try:
        config = task_config(telstate, args.name)
    finally:
        telstate.close()
    dests = {action.dest for action in parser._actions}
    unknown = sorted(set(config) - dests)
    if unknown:
        logger.debug("telstate config keys without a matching option: %s", ", ".join(unknown))
    parser.set_defaults(**{k: v for k, v in config.items() if k in dests})
    for action in parser._actions:
        if action.dest in config and action.option_strings:
            action.required = False
    return reparse()


def setup_logging(verbose: int = 0) -> None:
    """Log to stderr in UTC ISO 8601; ``KATSDP_LOG_LEVEL`` or ``-v`` sets the level."""
    level = os.environ.get("KATSDP_LOG_LEVEL") or (logging.WARNING - 10 * verbose)
    handler = logging.StreamHandler()
    formatter = logging.Formatter(
        "%(asctime)s.%(msecs)03dZ - %(name)s - %(levelname)s - %(message)s", "%Y-%m-%dT%H:%M:%S"
    )
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if isinstance(level, int) else level.upper())


# -- the server base ----------------------------------------------------------------------------


class Service(aiokatcp.DeviceServer):
    """Base KATCP server of a karoo daemon.

    Parameters
    ----------
    host, port
        KATCP listening address; port 0 picks a free one (see `port`).
    telstate
        The asyncio telescope state (`karoo.telstate.aio.TelescopeState`), memory or Redis.
    name
        Task name (``ingest.sdp_l0.1``); used in logs and as the default sensor prefix.
    """

    VERSION = "karoo-service-1.0"
    BUILD_STATE = f"karoo-{__version__}"

    def __init__(self, host: str, port: int, *, telstate, name: str) -> None:
        super().__init__(host, port, max_backlog=256 * 1024**2)
        self.telstate = telstate
        self.name = name
        self.capture_block_id: str | None = None
        self._capture_lock = asyncio.Lock()
        self._capture_blocks: dict[str, CaptureBlockState] = {}
        self._device_status = Sensor(
            DeviceStatus, "device-status", "health of the daemon", default=DeviceStatus.OK,
            initial_status=Sensor.Status.NOMINAL,
            status_func=lambda v: {
                DeviceStatus.OK: Sensor.Status.NOMINAL,
                DeviceStatus.DEGRADED: Sensor.Status.WARN,
                DeviceStatus.FAIL: Sensor.Status.ERROR,
            }[v],
        )
        self._device_status_reason = Sensor(
            str, "device-status-reason", "why device-status is not ok", default="",
            initial_status=Sensor.Status.NOMINAL,
        )
        self._capture_block_state = Sensor(
            str, "capture-block-state", "JSON dict of capture blocks in progress and their states",
            default="{}", initial_status=Sensor.Status.NOMINAL,
        )
        self._capture_active = Sensor(
            bool, "capture-active", "whether a capture block is being captured", default=False,
            initial_status=Sensor.Status.NOMINAL,
        )
        for sensor in (self._device_status, self._device_status_reason,
                       self._capture_block_state, self._capture_active):
            self.sensors.add(sensor)

    # -- sensors

    def add_counter(self, name: str, description: str, units: str = "", type_=int) -> Sensor:
        """A monotonic counter sensor, marked for the Prometheus bridge."""
        sensor = Sensor(type_, name, f"{description} (prometheus: counter)", units,
                        default=type_(0), initial_status=Sensor.Status.NOMINAL)
        self.sensors.add(sensor)
        return sensor

    def add_gauge(self, name: str, description: str, units: str = "", type_=float,
                  default: Any = None, status_func=None) -> Sensor:
        """A gauge sensor (a value that goes up and down), marked for the Prometheus bridge."""
        extra = {} if status_func is None else {"status_func": status_func}
        sensor = Sensor(type_, name, f"{description} (prometheus: gauge)", units,
                        default=type_(0) if default is None else default,
                        initial_status=Sensor.Status.NOMINAL, **extra)
        self.sensors.add(sensor)
        return sensor

    def set_device_status(self, status: DeviceStatus, reason: str = "") -> None:
        """Report health; a worse status is logged with its reason."""
        if status != self._device_status.value or reason != self._device_status_reason.value:
            log = logger.error if status == DeviceStatus.FAIL else (
                logger.warning if status == DeviceStatus.DEGRADED else logger.info)
            log("%s: device-status %s%s", self.name, status.name.lower(),
                f" ({reason})" if reason else "")
        self._device_status.value = status
        self._device_status_reason.value = reason

    def _publish_capture_blocks(self) -> None:
        self._capture_block_state.value = json.dumps(
            {cbid: state.name for cbid, state in self._capture_blocks.items()}
        )
        self._capture_active.value = self.capture_block_id is not None

    # -- the capture cycle

    async def capture_init(self, capture_block_id: str) -> None:
        """Prepare for capture block `capture_block_id` (override; raise FailReply to refuse)."""

    async def capture_done(self, capture_block_id: str) -> None:
        """Finish capture block `capture_block_id`: flush and write everything (override)."""

    async def request_capture_init(self, ctx, capture_block_id: str) -> None:
        """Start capturing a capture block (capture-init <capture-block-id>)."""
        if not _CAPTURE_BLOCK_ID.match(capture_block_id):
            raise FailReply(f"invalid capture block id {capture_block_id!r}")
        async with self._capture_lock:
            if self.capture_block_id is not None:
                raise FailReply(f"already capturing {self.capture_block_id}; send capture-done")
            if capture_block_id in self._capture_blocks:
                raise FailReply(f"capture block {capture_block_id} is still being finished")
            await self.capture_init(capture_block_id)
            self.capture_block_id = capture_block_id
            self._capture_blocks[capture_block_id] = CaptureBlockState.CAPTURING
            self._publish_capture_blocks()
            logger.info("%s: capture block %s started", self.name, capture_block_id)

    async def request_capture_done(
        self, ctx, capture_block_id: Optional[str] = None  # noqa: UP045 (aiokatcp needs Optional)
    ) -> None:
        """Stop capturing and flush (capture-done [cbid]); replies once everything is written."""
        async with self._capture_lock:
            cbid = self.capture_block_id
            if cbid is None:
                raise FailReply("not capturing: capture-done without capture-init")
            if capture_block_id is not None and capture_block_id != cbid:
                raise FailReply(f"capturing {cbid}, not {capture_block_id}")
            self._capture_blocks[cbid] = CaptureBlockState.BURNDOWN
            self.capture_block_id = None
            self._publish_capture_blocks()
            try:
                await self.capture_done(cbid)
            finally:
                del self._capture_blocks[cbid]
                self._publish_capture_blocks()
            logger.info("%s: capture block %s done", self.name, cbid)

    async def on_stop(self) -> None:
        """Finish an open capture block before the server goes away, so nothing is lost."""
        if self.capture_block_id is not None:
            cbid = self.capture_block_id
            logger.warning("%s: stopping while capturing %s; finishing it first", self.name, cbid)
            try:
                await self.request_capture_done(None, cbid)
            except Exception:
                logger.exception("%s: could not finish %s on stop", self.name, cbid)

    @property
    def port(self) -> int:
        """The KATCP port actually bound (useful with port 0)."""
        return self.server.sockets[0].getsockname()[1]


async def open_telstate(endpoint: str | None):
    """The asyncio telescope state for a daemon: Redis at `endpoint`, or in memory."""
    return await telstate_aio.TelescopeState.from_url(telstate_url(endpoint))


async def serve(service: Service) -> None:
    """Run `service` until SIGINT/SIGTERM or a halt, then stop it cleanly."""
    await service.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, service.halt)
    logger.info("%s: KATCP on %s:%d", service.name, *service.server.sockets[0].getsockname()[:2])
    try:
        await service.join()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def set_service_factory(parser: argparse.ArgumentParser,
                        make: Callable[[Any, argparse.Namespace], Any]) -> None:
    """Make a subcommand run the service that `make(telstate, args)` builds.

    The factory is also kept as ``args.make_service``, so that the embedded launcher can build
    the same service inside a running event loop instead of in a process of its own.
    """
    parser.set_defaults(func=functools.partial(run_service, make), make_service=make)


def run_service(make: Callable[[Any, argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Entry point of a daemon subcommand: open telstate, build the service with `make`, serve.

    `make(telstate, args)` returns the `Service` (it may be a coroutine function).
    """
    async def main() -> None:
        telstate = await open_telstate(args.telstate)
        service = make(telstate, args)
        if asyncio.iscoroutine(service):
            service = await service
        try:
            await serve(service)
        finally:
            await telstate.close()

    asyncio.run(main())
    return 0
