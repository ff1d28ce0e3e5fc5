"""The master controller: one KATCP endpoint for every product (katsdpcontroller's MC).

``product-configure <name> <config-json>`` starts a product controller process for the product
and configures it; ``capture-init``/``capture-done``/``capture-status``/``telstate-endpoint``
are passed to that product's controller; ``product-deconfigure`` deconfigures it and waits for
its controller to exit. Every product controller sensor is replicated here as
``<product>.<sensor>``.

Capture block ids are Unix seconds at ``capture-init``, strictly increasing even within one
second (10 digits). The products, their configurations and where their controllers listen, and
the next capture block id, are kept in ``<state-dir>/state.json``; a restarted master reconnects
to the product controllers that are still running, so products survive it.
"""

# No `from __future__ import annotations`: aiokatcp reads request annotations as real types.
import asyncio
import contextlib
import enum
import json
import logging
import os
import re
import shlex
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import aiokatcp
import psutil
from aiokatcp import DeviceStatus, FailReply, Sensor

from .. import __version__
from ..telstate.server import free_port
from .launch import karoo_command, karoo_env, log_tail
from .product import MirrorWatcher
from .schema import ConfigError, validate_config

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_]+\*?$")
STATE_VERSION = 1


class ProductPhase(enum.Enum):
    """A product as the master sees it."""

    STARTING = 0  # its controller runs, product-configure has not finished
    ACTIVE = 1
    DEAD = 2


@dataclass
class Product:
    """A product and the connection to its controller."""

    name: str
    config: dict[str, Any]
    host: str
    port: int
    pid: int
    data_dir: str
    start_time: float = field(default_factory=time.time)
    phase: ProductPhase = ProductPhase.STARTING
    client: aiokatcp.Client | None = None
    watcher: MirrorWatcher | None = None
    deconfiguring: bool = False
    reaper: asyncio.Task | None = None

    def record(self) -> dict[str, Any]:
        return {"config": self.config, "host": self.host, "port": self.port, "pid": self.pid,
                "data_dir": self.data_dir, "start_time": self.start_time}

    def pid_alive(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            return proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


class MasterController(aiokatcp.DeviceServer):
    """KATCP server that configures products and forwards capture requests to them.

    Parameters
    ----------
    host, port
        KATCP address (port 0 picks a free one).
    state_dir
        Where the state file and each product's working directory live.
    command
        What runs ``karoo`` for a product controller; ``python -m karoo.cli`` by default.
    task_command
        What the product controllers run a daemon with (their ``--task-command``).
    configure_timeout
        Seconds a product-configure may take.
    """

    VERSION = "karoo-master-controller-1.0"
    BUILD_STATE = f"karoo-{__version__}"

    def __init__(self, host: str, port: int, *, state_dir: str | Path,
                 command: list[str] | None = None, task_command: list[str] | None = None,
                 configure_timeout: float = 300.0) -> None:
        super().__init__(host, port, max_backlog=256 * 1024**2)
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.command = command or karoo_command()
        self.task_command = task_command
        self.configure_timeout = configure_timeout
        self.products: dict[str, Product] = {}
        self.next_capture_block_id = 0
        self._lock = asyncio.Lock()  # serialises product-configure and state file writes
        self._device_status = Sensor(DeviceStatus, "device-status",
                                     "worst device-status of the products",
                                     default=DeviceStatus.OK,
                                     initial_status=Sensor.Status.NOMINAL)
        self._products_sensor = Sensor(str, "products", "JSON list of the products",
                                       default="[]", initial_status=Sensor.Status.NOMINAL)
        self.sensors.add(self._device_status)
        self.sensors.add(self._products_sensor)

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    # -- persistent state

    def _save(self) -> None:
        state = {
            "version": STATE_VERSION,
            "next_capture_block_id": self.next_capture_block_id,
            "products": {n: p.record() for n, p in self.products.items()
                         if p.phase == ProductPhase.ACTIVE},
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.state_file)  # atomic: a crash leaves the old or the new state
        self._products_sensor.value = json.dumps(sorted(self.products))

    async def start(self) -> None:
        """Start serving, after reconnecting to the product controllers still running."""
        if self.state_file.exists():
            state = json.loads(self.state_file.read_text())
            self.next_capture_block_id = int(state.get("next_capture_block_id", 0))
            for name, record in state.get("products", {}).items():
                product = Product(name, record["config"], record["host"], record["port"],
                                  record["pid"], record["data_dir"], record["start_time"])
                if await self._reconnect(product):
                    logger.info("product %s: reconnected to its controller at %s:%d", name,
                                product.host, product.port)
                else:
                    logger.warning("product %s: its controller is gone; dropping it", name)
            self._save()
        await super().start()

    async def _reconnect(self, product: Product) -> bool:
        if not product.pid_alive():
            return False
        try:
            client = await asyncio.wait_for(
                aiokatcp.Client.connect(product.host, product.port), 10)
            reply, _ = await asyncio.wait_for(client.request("capture-status"), 10)
        except (OSError, TimeoutError, aiokatcp.FailReply):
            return False
        if reply[0] in (b"dead", b"deconfiguring"):
            client.close()
            return False
        self._attach(product, client)
        product.phase = ProductPhase.ACTIVE
        self.products[product.name] = product
        return True

    def _attach(self, product: Product, client: aiokatcp.Client) -> None:
        product.client = client
        product.watcher = MirrorWatcher(client, self, product.name + ".", self._product_sensor)
        client.add_sensor_watcher(product.watcher)
        client.add_disconnected_callback(lambda: self._disconnected(product))
        address = Sensor(str, f"{product.name}.katcp-address",
                         "KATCP address (host:port) of the product controller",
                         default=f"{product.host}:{product.port}",
                         initial_status=Sensor.Status.NOMINAL)
        self.sensors.add(address)
        self.mass_inform("interface-changed", "sensor-list")

    def _product_sensor(self, name: str, value: Any, status: Sensor.Status) -> None:
        if name == "device-status":
            self._update_device_status()

    def _update_device_status(self) -> None:
        worst = DeviceStatus.OK
        order = [DeviceStatus.OK, DeviceStatus.DEGRADED, DeviceStatus.FAIL]
        for product in self.products.values():
            sensor = self.sensors.get(f"{product.name}.device-status")
            if sensor is not None and isinstance(sensor.value, DeviceStatus):
                worst = max(worst, sensor.value, key=order.index)
        self._device_status.value = worst

    def _disconnected(self, product: Product) -> None:
        # The controller closes its connections when it exits after deconfigure or dies.
        asyncio.get_running_loop().call_later(0.5, self._check_alive, product)

    def _check_alive(self, product: Product) -> None:
        if self.products.get(product.name) is product and not product.pid_alive() \
                and not product.deconfiguring:
            logger.error("product %s: its controller died", product.name)
            self._drop(product)

    def _drop(self, product: Product) -> None:
        product.phase = ProductPhase.DEAD
        if product.client is not None:
            product.client.close()
        if product.watcher is not None:
            product.watcher.remove_all()
        self.sensors.pop(f"{product.name}.katcp-address", None)
        self.mass_inform("interface-changed", "sensor-list")
        if self.products.get(product.name) is product:
            del self.products[product.name]
        self._save()
        self._update_device_status()

    # -- helpers

    def _product(self, name: str) -> Product:
        product = self.products.get(name)
        if product is None:
            known = ", ".join(sorted(self.products)) or "none"
            raise FailReply(f"no product named {name!r} (products: {known})")
        if product.phase != ProductPhase.ACTIVE:
            raise FailReply(f"product {name} is still configuring")
        return product

    async def _forward(self, product: Product, *request: str,
                       timeout: float | None = None) -> list[bytes]:
        assert product.client is not None
        try:
            reply, _ = await asyncio.wait_for(product.client.request(*request), timeout)
        except (OSError, ConnectionError) as exc:
            raise FailReply(f"product {product.name}: controller unreachable ({exc})") from None
        except TimeoutError:
            raise FailReply(f"product {product.name}: {request[0]} timed out") from None
        except aiokatcp.FailReply as exc:
            raise FailReply(f"product {product.name}: {exc}") from None
        return reply

    def _unique_name(self, name: str) -> str:
        if not name.endswith("*"):
            return name
        prefix = name[:-1]
        i = 0
        while f"{prefix}{i}" in self.products:
            i += 1
        return f"{prefix}{i}"

    async def _start_product_controller(self, name: str) -> Product:
        data_dir = self.state_dir / "products" / name
        data_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        command = [*self.command, "product-controller", "-p", str(port),
                   "--data-dir", str(data_dir)]
        if self.task_command:
            command += ["--task-command", shlex.join(self.task_command)]
        with open(data_dir / "product-controller.log", "ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=log,
                stderr=asyncio.subprocess.STDOUT, env=karoo_env(), cwd=data_dir,
                start_new_session=True,  # it outlives the master (products survive restarts)
            )
        product = Product(name, {}, "127.0.0.1", port, proc.pid, str(data_dir))
        self.products[name] = product
        deadline = time.monotonic() + 60
        while True:
            try:
                client = await aiokatcp.Client.connect(product.host, port)
                break
            except OSError:
                if proc.returncode is not None or time.monotonic() > deadline:
                    del self.products[name]
                    tail = log_tail(data_dir / "product-controller.log")
                    raise FailReply(
                        f"product controller for {name} did not start\n{tail}") from None
                await asyncio.sleep(0.1)
        self._attach(product, client)
        # Reap it when it exits, so that it does not linger as a zombie.
        product.reaper = asyncio.create_task(proc.wait())
        return product

    # -- requests

    async def request_product_configure(self, ctx, name: str, config: str) -> tuple:
        """Configure a product: name (a trailing * picks a free one) and configuration JSON."""
        if not _NAME.match(name):
            raise FailReply(f"invalid product name {name!r}: letters, digits, _ (and a "
                            "trailing * for a unique name)")
        try:
            parsed = validate_config(config)
        except ConfigError as exc:
            raise FailReply(str(exc)) from None
        async with self._lock:
            name = self._unique_name(name)
            if name in self.products:
                raise FailReply(f"product {name} already exists")
            product = await self._start_product_controller(name)
        try:
            await self._forward(product, "product-configure", name, json.dumps(parsed),
                                timeout=self.configure_timeout)
        except FailReply:
            product.deconfiguring = True
            await self._stop_controller(product, grace=15)
            self._drop(product)
            raise
        product.config = parsed
        product.phase = ProductPhase.ACTIVE
        async with self._lock:
            self._save()
        return name, product.host, product.port

    async def _stop_controller(self, product: Product, grace: float) -> None:
        """Wait for the product controller to exit; kill it after `grace` seconds."""
        deadline = time.monotonic() + grace
        while product.pid_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if product.pid_alive():
            logger.warning("product %s: controller still running: killing it", product.name)
            with contextlib.suppress(ProcessLookupError):
                os.kill(product.pid, signal.SIGKILL)

    async def request_product_deconfigure(self, ctx, name: str, force: bool = False) -> None:
        """Deconfigure a product (waits for writers and cal; force: at once)."""
        product = self.products.get(name)
        if product is None:
            raise FailReply(f"no product named {name!r}")
        product.deconfiguring = True
        try:
            await self._forward(product, "product-deconfigure", "1" if force else "0")
        except FailReply:
            if not force:
                product.deconfiguring = False
                raise
        await self._stop_controller(product, grace=15 if force else 120)
        self._drop(product)

    async def request_product_list(self, ctx, name: Optional[str] = None) -> None:  # noqa: UP045
        """List products: informs (name, "state, started at ..."), count in the reply."""
        names = [name] if name is not None else sorted(self.products)
        informs = []
        for n in names:
            product = self.products.get(n)
            if product is None:
                raise FailReply(f"no product named {n!r}")
            state = await self._state(product)
            started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(product.start_time))
            informs.append((n, f"{state}, started at {started}"))
        ctx.informs(informs)

    async def _state(self, product: Product) -> str:
        if product.phase == ProductPhase.STARTING:
            return "configuring"
        try:
            return (await self._forward(product, "capture-status", timeout=10))[0].decode()
        except FailReply:
            return "dead"

    async def request_capture_init(self, ctx, subarray_product_id: str,
                                   override_dict_json: str = "{}") -> str:
        """Start a capture block on a product; replies with its id (Unix seconds)."""
        product = self._product(subarray_product_id)
        async with self._lock:
            cbid = max(int(time.time()), self.next_capture_block_id)
            self.next_capture_block_id = cbid + 1
            self._save()  # persisted first: an id is never reused, even after a crash
        cbid_text = f"{cbid:010d}"
        await self._forward(product, "capture-init", cbid_text, override_dict_json)
        return cbid_text

    async def request_capture_done(self, ctx, subarray_product_id: str) -> str:
        """Stop capturing on a product; replies with the capture block id once written."""
        product = self._product(subarray_product_id)
        return (await self._forward(product, "capture-done"))[0].decode()

    async def _each(self, ctx, name: Optional[str], request: str) -> str | None:  # noqa: UP045
        if name is not None:
            if name in self.products and self.products[name].phase == ProductPhase.STARTING:
                return "" if request == "telstate-endpoint" else "configuring"
            return (await self._forward(self._product(name), request))[0].decode()
        informs = []
        for n, product in sorted(self.products.items()):
            if request == "capture-status":
                informs.append((n, await self._state(product)))
            elif product.phase == ProductPhase.ACTIVE:
                informs.append((n, (await self._forward(product, request))[0].decode()))
        ctx.informs(informs)
        return None

    async def request_capture_status(
            self, ctx, subarray_product_id: Optional[str] = None) -> Optional[str]:  # noqa: UP045
        """State of a product (or, with no name, an inform per product)."""
        return await self._each(ctx, subarray_product_id, "capture-status")

    async def request_telstate_endpoint(
            self, ctx, subarray_product_id: Optional[str] = None) -> Optional[str]:  # noqa: UP045
        """host:port of a product's telstate (or, with no name, an inform per product)."""
        return await self._each(ctx, subarray_product_id, "telstate-endpoint")

    async def on_stop(self) -> None:
        # The product controllers keep running: a restarted master reconnects to them.
        for product in self.products.values():
            if product.client is not None:
                product.client.close()


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "master-controller", help="run the master controller (KATCP, port 5001)",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("-a", "--host", default="127.0.0.1", help="KATCP address [%(default)s]")
    parser.add_argument("-p", "--port", type=int, default=5001, help="KATCP port [%(default)s]")
    parser.add_argument("--state-dir", default="karoo-master",
                        help="state file and products' working directories [%(default)s]")
    parser.add_argument("--task-command", default="",
                        help="command the product controllers run daemons with (a wrapper)")
    parser.set_defaults(func=run)


def run(args) -> int:
    async def main() -> None:
        from ..service import serve

        server = MasterController(args.host, args.port, state_dir=args.state_dir,
                                  task_command=shlex.split(args.task_command) or None)
        server.name = "master-controller"
        await serve(server)

    asyncio.run(main())
    return 0
