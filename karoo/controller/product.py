"""The product controller: runs one subarray product over KATCP (katsdpcontroller's PC).

``product-configure <name> <config-json>`` validates the configuration, builds its task graph,
starts telstate, writes each task's ``config.<task>`` and the product's telstate keys, starts the
daemons in dependency order and waits until each is ready (KATCP connected, sensor list synced);
their sensors are then replicated here as ``<task>.<sensor>``.

Product states: CONFIGURING -> IDLE <-> CAPTURING; any -> DECONFIGURING -> DEAD; IDLE or
CAPTURING -> ERROR when a task dies or reports ``device-status`` fail. ERROR is sticky: only
``product-deconfigure`` leaves it. A capture block goes INITIALISING -> CAPTURING -> BURNDOWN
(capture-done in progress) -> POSTPROCESSING (flags, full RDB) -> DEAD.

A task that dies while capturing makes the product finish the capture block on the others
(``capture-done``: what was captured is flushed and the RDB written) and then go to ERROR with
the reason in ``device-status-reason``. State-changing requests are serialised: a second one
while one runs gets a ``fail`` saying so; only a forced deconfigure pre-empts.
"""

# No `from __future__ import annotations`: aiokatcp reads request annotations as real types.
import asyncio
import contextlib
import enum
import json
import logging
import shlex
import signal
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiokatcp
from aiokatcp import DeviceStatus, FailReply, Sensor

from .. import __version__
from ..service import telstate_url
from ..telstate import aio as telstate_aio
from .graph import (
    FIRST_BACKGROUND_STEP,
    STATE_AFTER_STEP,
    CaptureBlockState,
    ProductGraph,
    Task,
    Transition,
    build_graph,
    steps,
)
from .launch import AttachLauncher, ProcessLauncher, TaskProcess, log_tail
from .schema import ConfigError, validate_config

logger = logging.getLogger(__name__)

PRODUCT_NAME = r"^[A-Za-z0-9_]+$"


class ProductState(enum.Enum):
    """State of a product (katsdpcontroller's names; sent lower case over KATCP)."""

    CONFIGURING = 0
    IDLE = 1
    CAPTURING = 2
    DECONFIGURING = 3
    DEAD = 4
    ERROR = 5
    POSTPROCESSING = 6


class TaskState(enum.Enum):
    """State of one task of the product."""

    NOT_READY = 0
    STARTING = 1
    READY = 2
    KILLING = 3
    DEAD = 4


class MirrorWatcher(aiokatcp.SensorWatcher):
    """Replicates a remote server's sensors into `server`'s sensors as ``<prefix><name>``.

    `on_update(name, value, status)` sees every update, under the remote name.
    """

    def __init__(self, client: aiokatcp.Client, server: aiokatcp.DeviceServer, prefix: str,
                 on_update: Callable[[str, Any, Sensor.Status], None] | None = None) -> None:
        super().__init__(client, enum_types=(DeviceStatus,))
        self.sensors = server.sensors
        self.server = server
        self.prefix = prefix
        self.on_update = on_update
        self._names: set[str] = set()
        self._changed = False

    def rewrite_name(self, name: str) -> str:
        return self.prefix + name

    def sensor_added(self, name: str, *args) -> None:
        super().sensor_added(name, *args)
        self._names.add(self.prefix + name)
        self._changed = True

    def sensor_removed(self, name: str) -> None:
        super().sensor_removed(name)
        self._names.discard(self.prefix + name)
        self._changed = True

    def batch_stop(self) -> None:
        if self._changed:
            self._changed = False
            self.server.mass_inform("interface-changed", "sensor-list")

    def set_sensor_value(self, sensor: Sensor, value: Any, status: Sensor.Status,
                         timestamp: float) -> None:
        super().set_sensor_value(sensor, value, status, timestamp)
        if self.on_update is not None:
            self.on_update(sensor.name[len(self.prefix):], value, status)

    def state_updated(self, state: aiokatcp.SyncState) -> None:
        # Only our own sensors become unreachable, not the whole server's.
        if state == aiokatcp.SyncState.DISCONNECTED:
            now = time.time()
            for name in self._names:
                sensor = self.sensors.get(name)
                if sensor is not None:
                    sensor.set_value(sensor.value, Sensor.Status.UNREACHABLE, now)
        if state == aiokatcp.SyncState.SYNCED:
            self.synced.set()
        else:
            self.synced.clear()

    def remove_all(self) -> None:
        """Drop the replicated sensors (when the remote server is gone for good)."""
        for name in self._names:
            self.sensors.pop(name, None)
        if self._names:
            self._names.clear()
            self.server.mass_inform("interface-changed", "sensor-list")


def _status_of(state: ProductState) -> Sensor.Status:
    return Sensor.Status.ERROR if state == ProductState.ERROR else Sensor.Status.NOMINAL


class TaskRunner:
    """One running task: its process, KATCP client, replicated sensors and state."""

    def __init__(self, product: "ProductController", task: Task) -> None:
        self.product = product
        self.task = task
        self.process: TaskProcess | None = None
        self.client: aiokatcp.Client | None = None
        self.watcher: MirrorWatcher | None = None
        self.ready = asyncio.Event()
        self.death_expected = False
        self.exit_status: int | None = None
        self._monitor: asyncio.Task | None = None
        self.state_sensor = Sensor(TaskState, f"{task.name}.state", "state of the task",
                                   default=TaskState.NOT_READY,
                                   initial_status=Sensor.Status.NOMINAL)
        product.sensors.add(self.state_sensor)

    @property
    def state(self) -> TaskState:
        return self.state_sensor.value

    @state.setter
    def state(self, value: TaskState) -> None:
        self.state_sensor.value = value

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self, telstate: str, timeout: float) -> None:
        """Launch the daemon and wait until it is ready: KATCP connected and sensors synced."""
        self.state = TaskState.STARTING
        self.process = await self.product.launcher.launch(self.task, telstate)
        self._monitor = asyncio.create_task(self._watch_process())
        self.client = aiokatcp.Client(self.process.host, self.process.port)
        self.client.add_disconnected_callback(self._disconnected)
        self.watcher = MirrorWatcher(self.client, self.product, self.task.name + ".",
                                     self._sensor_updated)
        self.client.add_sensor_watcher(self.watcher)
        synced = asyncio.create_task(self.watcher.synced.wait())
        try:
            done, _ = await asyncio.wait({synced, self._monitor}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            synced.cancel()
        if synced not in done:
            why = (f"exited with status {self.process.returncode}" if not self.alive
                   else f"not ready after {timeout:.0f} s")
            tail = log_tail(self.process.log)
            raise RuntimeError(f"{self.task.name} failed to start: {why}"
                               + (f"\n{tail}" if tail else ""))
        self.state = TaskState.READY
        self.ready.set()

    def _sensor_updated(self, name: str, value: Any, status: Sensor.Status) -> None:
        if name == "device-status" and value == DeviceStatus.FAIL and not self.death_expected:
            reason = ""
            sensor = self.product.sensors.get(f"{self.task.name}.device-status-reason")
            if sensor is not None:
                reason = sensor.value.decode(errors="replace") if isinstance(
                    sensor.value, bytes) else str(sensor.value)
            self.product.task_failed(self, f"{self.task.name} reports device-status fail"
                                     + (f": {reason}" if reason else ""))

    def _disconnected(self) -> None:
        # Where the launcher cannot see the process (Kubernetes), a lost connection is death.
        if self.ready.is_set() and not self.death_expected and not self.process.observable:
            self.state = TaskState.DEAD
            self.product.task_failed(self, f"{self.task.name} lost its KATCP connection")

    async def _watch_process(self) -> None:
        assert self.process is not None
        self.exit_status = await self.process.wait()
        self.state = TaskState.DEAD
        if not self.death_expected:
            how = (f"killed by signal {-self.exit_status}" if self.exit_status < 0
                   else f"exit status {self.exit_status}")
            logger.error("%s died unexpectedly (%s)", self.task.name, how)
            self.product.task_failed(self, f"{self.task.name} died ({how})")

    async def request(self, transition: Transition, capture_block_id: str) -> str | None:
        """Send a capture transition; returns None on success, else what went wrong."""
        args = transition.format(capture_block_id)
        what = f"{self.task.name}: ?{transition.request} {' '.join(args)}".rstrip()
        if not self.alive or self.client is None or not self.client.is_connected:
            logger.warning("%s skipped: task is not running", what)
            return None
        try:
            await asyncio.wait_for(self.client.request(transition.request, *args),
                                   transition.timeout)
        except (aiokatcp.FailReply, aiokatcp.InvalidReply) as exc:
            return f"{what} failed: {exc}"
        except TimeoutError:
            return f"{what} timed out after {transition.timeout:.0f} s"
        except (OSError, ConnectionError) as exc:
            if not self.alive:
                logger.warning("%s: task died during the request", what)
                return None
            return f"{what}: {exc}"
        logger.info("%s ok", what)
        return None

    async def stop(self, force: bool, grace: float) -> None:
        """Stop the daemon: SIGTERM (it finishes its capture block) or, forced, SIGKILL."""
        self.death_expected = True
        if self.alive:
            self.state = TaskState.KILLING
            if force:
                self.process.signal(signal.SIGKILL)
                await self.process.wait()
            else:
                await self.process.stop(grace)
        if self._monitor is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        self.close()
        self.state = TaskState.DEAD

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.watcher is not None:
            self.watcher.remove_all()


class ProductController(aiokatcp.DeviceServer):
    """KATCP server that configures, captures with and deconfigures one product.

    Parameters
    ----------
    host, port
        KATCP address (port 0 picks a free one).
    data_dir
        The product's working directory: telstate files, task logs, calibration reports, and
        the default chunk store (``<data_dir>/store``) when the configuration names none.
    launcher
        Launch backend; a `ProcessLauncher` in `data_dir` by default.
    ready_timeout
        Seconds a task may take to become ready.
    halt_on_dead
        Stop the server once the product is deconfigured (what a standalone process wants).
    """

    VERSION = "karoo-product-controller-1.0"
    BUILD_STATE = f"karoo-{__version__}"

    def __init__(self, host: str, port: int, *, data_dir: str | Path, launcher=None,
                 ready_timeout: float = 120.0, stop_grace: float = 60.0,
                 halt_on_dead: bool = False) -> None:
        super().__init__(host, port, max_backlog=256 * 1024**2)
        self.data_dir = Path(data_dir)
        self.launcher = launcher or ProcessLauncher(self.data_dir)
        self.ready_timeout = ready_timeout
        self.stop_grace = stop_grace
        self.halt_on_dead = halt_on_dead
        self.product_name: str | None = None
        self.graph: ProductGraph | None = None
        self.runners: list[TaskRunner] = []
        self.telstate = None
        self.telstate_endpoint = ""
        self.capture_block_id: str | None = None
        self._capture_blocks: dict[str, CaptureBlockState] = {}
        self._postprocessing: dict[str, asyncio.Task] = {}
        self._op: asyncio.Task | None = None
        self._op_name = ""
        self._errors: list[str] = []
        self._forcing = False  # a forced deconfigure is under way: start nothing new
        self._started: dict[str, set[str]] = {}  # capture block -> tasks that accepted init
        self._state = Sensor(ProductState, "product-state", "state of the product "
                             "(prometheus: gauge)", default=ProductState.CONFIGURING,
                             initial_status=Sensor.Status.NOMINAL, status_func=_status_of)
        self._device_status = Sensor(
            DeviceStatus, "device-status", "health of the product", default=DeviceStatus.OK,
            initial_status=Sensor.Status.NOMINAL,
            status_func=lambda v: Sensor.Status.ERROR if v == DeviceStatus.FAIL
            else Sensor.Status.NOMINAL)
        self._device_status_reason = Sensor(str, "device-status-reason",
                                            "why the product is in error", default="",
                                            initial_status=Sensor.Status.NOMINAL)
        self._cb_sensor = Sensor(str, "capture-block-state",
                                 "JSON dict of live capture blocks and their states",
                                 default="{}", initial_status=Sensor.Status.NOMINAL)
        self._config_sensor = Sensor(str, "product-config", "the product configuration (JSON)",
                                     default="", initial_status=Sensor.Status.NOMINAL)
        self._telstate_sensor = Sensor(str, "telstate-endpoint", "host:port of telstate",
                                       default="", initial_status=Sensor.Status.NOMINAL)
        for sensor in (self._state, self._device_status, self._device_status_reason,
                       self._cb_sensor, self._config_sensor, self._telstate_sensor):
            self.sensors.add(sensor)

    # -- state

    @property
    def state(self) -> ProductState:
        return self._state.value

    @state.setter
    def state(self, value: ProductState) -> None:
        if value != self._state.value:
            logger.info("product %s: %s -> %s", self.product_name, self._state.value.name,
                        value.name)
        self._state.value = value

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    def _set_cb_state(self, cbid: str, state: CaptureBlockState) -> None:
        if state == CaptureBlockState.DEAD:
            self._capture_blocks.pop(cbid, None)
        else:
            self._capture_blocks[cbid] = state
        self._cb_sensor.value = json.dumps(
            {cb: s.name.lower() for cb, s in self._capture_blocks.items()})

    def _go_to_error(self) -> None:
        reason = "; ".join(dict.fromkeys(self._errors)) or "unknown error"
        self.state = ProductState.ERROR
        self._device_status.value = DeviceStatus.FAIL
        self._device_status_reason.value = reason
        logger.error("product %s in ERROR: %s", self.product_name, reason)

    def task_failed(self, runner: TaskRunner, reason: str) -> None:
        """A critical task died or reported failure: wind up the capture block, then ERROR."""
        if not runner.task.critical or self.state in (ProductState.DECONFIGURING,
                                                      ProductState.DEAD):
            return
        self._errors.append(reason)
        if self._op is not None or self._forcing:
            return  # the operation in progress ends in ERROR (see _run_op)
        if self.state == ProductState.CAPTURING:
            self._start_op("capture-done", self._capture_done(error_expected=True))
        elif self.state == ProductState.IDLE:
            self._go_to_error()

    # -- serialised operations

    def _start_op(self, name: str, coro: Coroutine) -> asyncio.Task:
        self._op_name = name
        self._op = asyncio.create_task(self._run_op(coro))
        return self._op

    async def _run_op(self, coro: Coroutine) -> Any:
        try:
            return await coro
        finally:
            self._op = None
            if self._errors and not self._forcing and self.state in (ProductState.IDLE,
                                                                     ProductState.CAPTURING):
                if self.state == ProductState.CAPTURING and self.capture_block_id is not None:
                    self._start_op("capture-done", self._capture_done(error_expected=True))
                else:
                    self._go_to_error()

    async def _operation(self, name: str, coro: Coroutine) -> Any:
        if self._op is not None:
            coro.close()
            raise FailReply(f"product is busy with {self._op_name}; please wait and try again")
        # Shielded: a client that goes away does not abandon the operation half way.
        return await asyncio.shield(self._start_op(name, coro))

    # -- configure

    async def configure(self, name: str, config: Any) -> None:
        """Configure the product (what ``product-configure`` does); raises on failure."""
        if self.product_name is not None:
            raise FailReply(f"already configured or configuring ({self.product_name})")
        await self._operation("product-configure", self._configure(name, config))

    async def _configure(self, name: str, config: Any) -> None:
        import re

        if not re.match(PRODUCT_NAME, name):
            raise FailReply(f"invalid product name {name!r}: use letters, digits and _")
        try:
            config = validate_config(config)
            graph = build_graph(name, config, store=str(self.data_dir / "store"),
                                data_dir=str(self.data_dir))
        except ConfigError as exc:
            raise FailReply(str(exc)) from None
        self.product_name = name
        self.graph = graph
        self._config_sensor.value = json.dumps(config)
        self.state = ProductState.CONFIGURING
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.telstate_endpoint = await self.launcher.start_telstate()
            self._telstate_sensor.value = self.telstate_endpoint
            self.telstate = await telstate_aio.TelescopeState.from_url(
                telstate_url(self.telstate_endpoint))
            for key, value in {**graph.telstate, **graph.telstate_config()}.items():
                await self.telstate.set(key, value)
            self.runners = [TaskRunner(self, task) for task in graph.tasks]
            self.mass_inform("interface-changed", "sensor-list")
            by_name = {r.task.name: r for r in self.runners}

            async def start(runner: TaskRunner) -> None:
                for dep in runner.task.depends_ready:
                    await by_name[dep].ready.wait()
                await runner.start(self.telstate_endpoint, self.ready_timeout)

            starts = [asyncio.create_task(start(r)) for r in self.runners]
            try:
                await asyncio.gather(*starts)
            except BaseException:
                for s in starts:
                    s.cancel()
                raise
            if self._errors:
                raise RuntimeError("; ".join(self._errors))
            await self.telstate.set("sdp_task_details",
                                    {r.task.name: r.process.details() for r in self.runners})
        except BaseException as exc:
            logger.error("product %s failed to configure: %s", name, exc)
            self._errors.clear()  # the product is torn down, not left in ERROR
            await self._teardown(force=True)
            self.state = ProductState.DEAD
            self.product_name = None
            if self.halt_on_dead:
                self.halt()
            if isinstance(exc, FailReply | asyncio.CancelledError):
                raise
            raise FailReply(f"product-configure failed: {exc}") from None
        self.state = ProductState.IDLE
        if self._errors:  # a task failed just as configure ended
            self._go_to_error()

    # -- capture

    def _live(self) -> list[Task]:
        return [r.task for r in self.runners]

    async def _run_steps(self, cbid: str, which: str, only: Callable[[int], bool],
                         stop_on_failure: bool = False,
                         after_step: Callable[[int], None] | None = None) -> list[str]:
        by_name = {r.task.name: r for r in self.runners}
        failures: list[str] = []
        if which == "init":
            self._started[cbid] = set()
        started = self._started.get(cbid, set())
        for step, items in steps(self._live(), which):
            if not only(step):
                continue
            if which == "done":
                # A task that never accepted this block's capture-init has nothing to finish.
                items = [(t, tr) for t, tr in items if not t.init or t.name in started]
            results = await asyncio.gather(
                *(by_name[task.name].request(transition, cbid) for task, transition in items))
            failures += [r for r in results if r]
            if which == "init":
                started.update(t.name for (t, _), r in zip(items, results, strict=True)
                               if r is None)
            if after_step is not None:
                after_step(step)
            if failures and stop_on_failure:
                break
        return failures

    async def capture_init(self, capture_block_id: str) -> None:
        await self._operation("capture-init", self._capture_init(capture_block_id))

    async def _capture_init(self, cbid: str) -> None:
        if self.state != ProductState.IDLE:
            raise FailReply(f"cannot capture-init: product is {self.state.name.lower()}"
                            + (" (deconfigure it)" if self.state == ProductState.ERROR else ""))
        if cbid in self._capture_blocks:
            raise FailReply(f"capture block {cbid} already exists")
        # The previous block's flags and full RDB first: a daemon (the flag writer) takes one
        # capture block at a time.
        pending = list(self._postprocessing.values())
        if pending:
            await asyncio.wait(pending, timeout=300)
        self._set_cb_state(cbid, CaptureBlockState.INITIALISING)
        await self.telstate.add("sdp_capture_block_id", cbid)
        self.capture_block_id = cbid
        self.state = ProductState.CAPTURING
        failures = await self._run_steps(cbid, "init", lambda step: True, stop_on_failure=True)
        if failures:
            # Unwind: finish the block on the tasks that did start it, then ERROR.
            self._errors += failures
            await self._capture_done(error_expected=True)
            raise FailReply("capture-init failed: " + "; ".join(failures))
        self._set_cb_state(cbid, CaptureBlockState.CAPTURING)
        logger.info("product %s: capture block %s started", self.product_name, cbid)

    async def capture_done(self) -> str:
        return await self._operation("capture-done", self._capture_done())

    async def _capture_done(self, error_expected: bool = False) -> str:
        cbid = self.capture_block_id
        if self.state != ProductState.CAPTURING or cbid is None:
            raise FailReply(f"cannot capture-done: product is {self.state.name.lower()}, "
                            "not capturing")
        self._set_cb_state(cbid, CaptureBlockState.BURNDOWN)
        failures = await self._run_steps(cbid, "done", lambda s: s < FIRST_BACKGROUND_STEP)
        self.capture_block_id = None
        self._postprocessing[cbid] = asyncio.create_task(self._postprocess(cbid))
        self._errors += failures
        if self._errors:
            self._go_to_error()
        else:
            self.state = ProductState.IDLE
        if failures and not error_expected:
            raise FailReply("capture-done failed: " + "; ".join(failures))
        logger.info("product %s: capture block %s done", self.product_name, cbid)
        return cbid

    async def _postprocess(self, cbid: str) -> None:
        """Flags then the full RDB, in the background; the block is DEAD at the end."""
        try:
            failures = await self._run_steps(
                cbid, "done", lambda s: s >= FIRST_BACKGROUND_STEP,
                after_step=lambda s: self._set_cb_state(
                    cbid, STATE_AFTER_STEP.get(s, CaptureBlockState.POSTPROCESSING)))
            for failure in failures:
                logger.error("capture block %s post-processing: %s", cbid, failure)
        finally:
            self._set_cb_state(cbid, CaptureBlockState.DEAD)
            self._postprocessing.pop(cbid, None)
            self._started.pop(cbid, None)

    # -- deconfigure

    async def deconfigure(self, force: bool = False) -> None:
        if force:
            if self.state in (ProductState.DEAD, ProductState.DECONFIGURING):
                raise FailReply(f"product is already {self.state.name.lower()}")
            self._forcing = True
            if self._op is not None:
                self._op.cancel()
                with contextlib.suppress(BaseException):
                    await self._op
            if self.state == ProductState.DEAD:
                return  # a configure it interrupted has already torn everything down
            await self._operation("product-deconfigure", self._deconfigure(force=True))
        else:
            await self._operation("product-deconfigure", self._deconfigure(force=False))

    async def _deconfigure(self, force: bool) -> None:
        if self.state in (ProductState.DEAD, ProductState.DECONFIGURING):
            raise FailReply(f"product is already {self.state.name.lower()}")
        if not force and self.state not in (ProductState.IDLE, ProductState.ERROR):
            raise FailReply(f"cannot deconfigure while {self.state.name.lower()}: issue "
                            "capture-done first (or deconfigure with force)")
        previous = self.state
        self.state = ProductState.DECONFIGURING
        if force and previous == ProductState.CAPTURING and self.capture_block_id:
            # As katsdpcontroller: a forced deconfigure still finishes the block (light RDB).
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._run_steps(
                    self.capture_block_id, "done", lambda s: s < FIRST_BACKGROUND_STEP), 30)
        await self._teardown(force)
        self.state = ProductState.DEAD
        logger.info("product %s deconfigured", self.product_name)
        if self.halt_on_dead:
            self.halt()

    async def _teardown(self, force: bool) -> None:
        """Stop every task (producers first), after post-processing unless forced."""
        pending = list(self._postprocessing.values())
        if force:
            for task in pending:
                task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for runner in reversed(self.runners):
            runner.death_expected = True
        # Producers stop first so that consumers drain what is already sent; the tasks of one
        # level of the dependency graph stop together.
        depth: dict[str, int] = {}
        for runner in self.runners:  # in start order: dependencies come first
            deps = runner.task.depends_ready
            depth[runner.task.name] = 1 + max((depth[d] for d in deps), default=-1)
        for level in sorted(set(depth.values())):
            await asyncio.gather(*(r.stop(force, self.stop_grace) for r in self.runners
                                   if depth[r.task.name] == level))
        if self.telstate is not None:
            with contextlib.suppress(Exception):
                await self.telstate.close()
            self.telstate = None
        await self.launcher.stop_telstate()

    async def on_stop(self) -> None:
        """Stopping the controller deconfigures its product by force (as the anchor's)."""
        if self.state not in (ProductState.DEAD, ProductState.DECONFIGURING) and self.runners:
            with contextlib.suppress(Exception):
                await self.deconfigure(force=True)
        await self.launcher.stop_telstate()

    # -- requests

    async def request_product_configure(self, ctx, name: str, config: str) -> None:
        """Configure the product: name, configuration JSON (product-configure name config)."""
        await self.configure(name, config)

    async def request_product_deconfigure(self, ctx, force: bool = False) -> bool:
        """Deconfigure: stop every task once post-processing is done (force: at once)."""
        await self.deconfigure(force)
        return False  # not delayed: the tasks are gone when this replies

    async def request_capture_init(self, ctx, capture_block_id: str,
                                   override_dict_json: str = "{}") -> None:
        """Start a capture block (capture-init cbid [override-json])."""
        try:
            override = json.loads(override_dict_json)
        except json.JSONDecodeError as exc:
            raise FailReply(f"override is not valid JSON: {exc}") from None
        if override:
            raise FailReply("configuration overrides at capture-init are not supported")
        await self.capture_init(capture_block_id)

    async def request_capture_done(self, ctx) -> str:
        """Stop capturing; replies with the capture block id once the data is written."""
        return await self.capture_done()

    async def request_capture_status(self, ctx) -> ProductState:
        """The state of the product."""
        return self.state

    async def request_telstate_endpoint(self, ctx) -> str:
        """host:port of the product's telstate (empty while not configured)."""
        return self.telstate_endpoint


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "product-controller", help="run a product controller (normally started by the master)",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("-a", "--host", default="127.0.0.1", help="KATCP address [%(default)s]")
    parser.add_argument("-p", "--port", type=int, default=5101, help="KATCP port [%(default)s]")
    parser.add_argument("--data-dir", required=True,
                        help="working directory: telstate, logs, default chunk store")
    parser.add_argument("--ready-timeout", type=float, default=120.0,
                        help="seconds a task may take to become ready [%(default)s]")
    parser.add_argument("--attach", metavar="TASKS_JSON", default=None,
                        help="attach to daemons already running (Kubernetes) instead of "
                             "starting them: {telstate: host:port, tasks: {name: host:port}}")
    parser.add_argument("--task-command", default="",
                        help="command that runs a daemon, before its subcommand (a wrapper); "
                             "default: this python -m karoo.cli")
    parser.set_defaults(func=run)


def run(args) -> int:
    async def main() -> None:
        if args.attach:
            launcher = AttachLauncher(args.attach)
        else:
            launcher = ProcessLauncher(args.data_dir,
                                       command=shlex.split(args.task_command) or None)
        server = ProductController(args.host, args.port, data_dir=args.data_dir,
                                   launcher=launcher, ready_timeout=args.ready_timeout,
                                   halt_on_dead=True)
        from ..service import serve

        server.name = "product-controller"
        await serve(server)

    asyncio.run(main())
    return 0


__all__ = ["MirrorWatcher", "ProductController", "ProductState", "TaskState", "add_commands"]
