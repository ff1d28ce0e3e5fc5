"""From a product configuration to the graph of tasks that runs it.

A product is: telstate (Redis), optionally a correlator simulator, ingest x N (band split), cal
x M, a vis writer per archived L0 stream, a flag writer per archived flags stream and a meta
writer. `build_graph` turns a validated configuration into `Task` objects in start order, each
with the telstate configuration it reads as ``config.<task name>`` (the katsdpservices
convention; keys are the daemons' option dests), the tasks it waits for before it starts, and
the KATCP requests it gets at each step of a capture block.

Ordering follows katsdpcontroller: tasks start producers first (sim, then ingest, then the
consumers that need ingest's telstate attributes); ``capture-init`` goes to consumers first
(writers and cal before ingest, the simulator last) and ``capture-done`` to producers first
(simulator, ingest, then writers and cal, then the light RDB), so nothing received is lost. The
flag writer finishes after cal has sent its flags, and the full RDB comes last.
"""

from __future__ import annotations

import copy
import enum
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..telstate.server import free_port
from .schema import ConfigError

CBF_STREAM = "cbf_baseline_correlation_products"
SPEAD_PORT = 7148  # MeerKAT's port for every multicast SPEAD stream


class CaptureBlockState(enum.IntEnum):
    """Life of a capture block in the product (katsdpcontroller's states)."""

    INITIALISING = 0
    CAPTURING = 1
    BURNDOWN = 2
    POSTPROCESSING = 3
    DEAD = 4


# Steps of capture-done, run in this order; the requests of one step go out in parallel.
# Steps before FIRST_BACKGROUND_STEP finish before capture-done replies.
DONE_SIM, DONE_INGEST, DONE_CONSUMERS, DONE_LIGHT_META, DONE_FLAGS, DONE_FULL_META = range(6)
FIRST_BACKGROUND_STEP = DONE_FLAGS
# The capture block state reached once a step has finished.
STATE_AFTER_STEP = {DONE_FLAGS: CaptureBlockState.POSTPROCESSING,
                    DONE_FULL_META: CaptureBlockState.DEAD}
# Steps of capture-init: consumers first, then ingest, then the simulator starts sending.
INIT_CONSUMERS, INIT_INGEST, INIT_SIM = range(3)


@dataclass(frozen=True)
class Transition:
    """A KATCP request a task gets at one step of a capture block.

    `arguments` may contain ``{capture_block_id}``, filled in when it is sent.
    """

    step: int
    request: str
    arguments: tuple[str, ...] = ()
    timeout: float = 240.0

    def format(self, capture_block_id: str) -> tuple[str, ...]:
        return tuple(a.format(capture_block_id=capture_block_id) for a in self.arguments)


@dataclass
class Task:
    """One daemon of the product.

    Attributes
    ----------
    name
        Task name, e.g. ``ingest.sdp_l0.1``; the daemon's ``--name`` and the prefix of its
        replicated sensors.
    command
        The ``karoo`` subcommand that runs it (``ingest``, ``vis-writer``, ...).
    config
        Its own telstate configuration (``config.<name>``).
    group, group_config
        For the instances of a band-split group (``ingest.sdp_l0``, ``cal``): the group's name
        and the configuration the instances share (``config.<group>``).
    depends_ready
        Tasks that must be ready before this one starts.
    init, done
        The requests it gets at capture-init and at the steps of capture-done.
    """

    name: str
    command: str
    config: dict[str, Any] = field(default_factory=dict)
    group: str | None = None
    group_config: dict[str, Any] | None = None
    depends_ready: list[str] = field(default_factory=list)
    init: list[Transition] = field(default_factory=list)
    done: list[Transition] = field(default_factory=list)
    critical: bool = True


@dataclass
class ProductGraph:
    """What `build_graph` makes: tasks in start order, and the telstate keys of the product."""

    name: str
    config: dict[str, Any]
    tasks: list[Task]
    telstate: dict[str, Any]

    def task(self, name: str) -> Task:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(name)

    def telstate_config(self) -> dict[str, dict[str, Any]]:
        """Every ``config.<name>`` key: groups' shared configuration and each task's own."""
        keys: dict[str, dict[str, Any]] = {}
        for task in self.tasks:
            if task.group is not None and task.group_config is not None:
                keys[f"config.{task.group}"] = task.group_config
            keys[f"config.{task.name}"] = task.config
        return keys


# -- SPEAD endpoints ------------------------------------------------------------------------------


class EndpointAllocator:
    """Chooses the SPEAD endpoints of the product's streams.

    ``multicast``: consecutive groups from `cidr` on port 7148 (katsdpcontroller's scheme), so
    any number of receivers on any hosts can join a stream. ``udp``: unicast on `host` with a
    free port per endpoint; a stream can then have only one receiving process. ``inproc``:
    spead2 in-process queues, for a product run inside one process (every reader of a queue
    name gets every heap, as with multicast).
    """

    def __init__(self, transport: str = "multicast", cidr: str = "239.192.0.0/18",
                 host: str = "127.0.0.1") -> None:
        self.transport = transport
        self.host = host
        self._network = ipaddress.IPv4Network(cidr)
        # in-process queue names are process-wide: keep each product's apart
        self._inproc_prefix = f"stream-{id(self):x}-"
        if not self._network.is_multicast and transport == "multicast":
            raise ConfigError([f"config/multicast_cidr: {cidr} is not a multicast network"])
        self._next = 0

    def allocate(self, n: int) -> str:
        """A transport specification with `n` endpoints."""
        if self.transport == "inproc":
            first = self._next
            self._next += n
            return f"inproc://{self._inproc_prefix}{first}" + (f"+{n - 1}" if n > 1 else "")
        if self.transport == "udp":
            return ",".join(f"udp://{self.host}:{free_port(self.host)}" for _ in range(n))
        if self._next + n > self._network.num_addresses:
            raise ConfigError([f"config/multicast_cidr: {self._network} has no {n} free groups"])
        first = self._network.network_address + self._next
        self._next += n
        return f"udp://{first}+{n - 1}:{SPEAD_PORT}" if n > 1 else f"udp://{first}:{SPEAD_PORT}"


# -- the graph -------------------------------------------------------------------------------------


def _streams_of(config: dict[str, Any], type_: str) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in config["outputs"].items() if s["type"] == type_}


def _archived(stream: dict[str, Any]) -> bool:
    # As katsdpcontroller: spectral L0 and flags are archived unless said otherwise.
    default = stream["type"] == "sdp.flags" or stream.get("continuum_factor", 1) == 1
    return stream.get("archive", default)


def build_graph(
    name: str,
    config: dict[str, Any],
    *,
    allocator: EndpointAllocator | None = None,
    store: str | None = None,
    data_dir: str = ".",
) -> ProductGraph:
    """Turn a validated product configuration into its tasks.

    Parameters
    ----------
    name
        The product (subarray product id).
    config
        A configuration that passed `validate_config`.
    allocator
        Chooses stream endpoints; by default from ``config.transport`` / ``multicast_cidr``.
    store
        Chunk store URL when the configuration has no ``config.store``.
    data_dir
        Local directory of the product (calibration reports).

    Raises
    ------
    ConfigError
        If the product cannot be laid out (no store; unicast streams with several receivers).
    """
    settings = config.get("config", {})
    if allocator is None:
        allocator = EndpointAllocator(settings.get("transport", "multicast"),
                                      settings.get("multicast_cidr", "239.192.0.0/18"))
    store = settings.get("store", store)
    if not store:
        raise ConfigError(["config/store: no chunk store given (a directory or s3:// URL)"])
    n_ingest = settings.get("ingest_servers", 1)
    n_cal = settings.get("cal_servers", 1)
    writer = {"store": store, **settings.get("writer", {})}
    if settings.get("s3_endpoint_url"):
        writer["s3_endpoint_url"] = settings["s3_endpoint_url"]
    unicast = allocator.transport == "udp"
    problems: list[str] = []

    tasks: list[Task] = []
    telstate: dict[str, Any] = {
        "subarray_product_id": name,
        "sdp_config": config,
    }
    endpoints: dict[str, str] = {}

    for cbf, stream in config.get("inputs", {}).items():
        endpoints[cbf] = stream["url"]
        telstate[f"{cbf}_instrument_dev_name"] = stream.get("instrument_dev_name", "")
        telstate[f"{cbf}_src_streams"] = []
        for key, value in stream.get("attributes", {}).items():
            telstate[f"{cbf}_{key}"] = value

    for cbf, stream in _streams_of(config, "sim.cbf.baseline_correlation_products").items():
        n_substreams = stream.get("n_substreams", 4)
        endpoints[cbf] = allocator.allocate(stream.get("n_endpoints", n_substreams))
        sim = {
            "cbf_spead": endpoints[cbf], "cbf_name": cbf,
            "antennas": stream["n_antennas"], "channels": stream["n_chans"],
            "dump_period": stream["int_time"], "substreams": n_substreams, "start": False,
        }
        sim.update(config.get("simulation", {}))  # script, clock_ratio, seed, ... (the schema's)
        tasks.append(Task(
            f"sim.{cbf}", "sim", sim,
            init=[Transition(INIT_SIM, "capture-start", (cbf,), 30.0)],
            done=[Transition(DONE_SIM, "capture-stop", (cbf,), 30.0)],
        ))

    # Ingest: one group per correlator stream, making its spectral and continuum L0.
    ingest_tasks: dict[str, list[str]] = {}  # L0 stream -> ingest task names
    vis = _streams_of(config, "sdp.vis")
    for cbf in dict.fromkeys(s["src_streams"][0] for s in vis.values()):
        spectral = next(n for n, s in vis.items()
                        if s["src_streams"][0] == cbf and s["continuum_factor"] == 1)
        continuum = next((n for n, s in vis.items()
                          if s["src_streams"][0] == cbf and s["continuum_factor"] > 1), None)
        group = f"ingest.{spectral}"
        shared = {
            "cbf_spead": endpoints[cbf], "cbf_name": cbf,
            "l0_spectral_spead": allocator.allocate(n_ingest), "l0_spectral_name": spectral,
            "output_int_time": vis[spectral]["output_int_time"], "servers": n_ingest,
            "backend": settings.get("backend", "cpu"),
        }
        endpoints[spectral] = shared["l0_spectral_spead"]
        if continuum:
            shared.update(l0_continuum_spead=allocator.allocate(n_ingest),
                          l0_continuum_name=continuum,
                          continuum_factor=vis[continuum]["continuum_factor"])
            endpoints[continuum] = shared["l0_continuum_spead"]
        if unicast and n_ingest > 1:
            problems.append(f"config/ingest_servers: {n_ingest} ingest servers share the "
                            f"endpoints of {cbf!r}, which needs multicast transport")
        depends = [t.name for t in tasks if t.command == "sim" and t.config["cbf_name"] == cbf]
        if depends and "clock_ratio" in config.get("simulation", {}):
            # Pace the L0 output at the simulated correlator's rate, not the real one's: a
            # fast simulation would otherwise queue up behind a real-time sender.
            shared["clock_ratio"] = config["simulation"]["clock_ratio"]
        names = []
        for k in range(1, n_ingest + 1):
            names.append(f"{group}.{k}")
            tasks.append(Task(
                f"{group}.{k}", "ingest", {"server_id": k}, group=group, group_config=shared,
                depends_ready=list(depends),
                init=[Transition(INIT_INGEST, "capture-init", ("{capture_block_id}",), 30.0)],
                done=[Transition(DONE_INGEST, "capture-done", (), 240.0)],
            ))
        for stream in (spectral, continuum):
            if stream:
                ingest_tasks[stream] = names

    receivers: dict[str, list[str]] = {}  # stream -> receiving task names

    for cal_name, stream in _streams_of(config, "sdp.cal").items():
        l0 = stream["src_streams"][0]
        flags = next((n for n, s in _streams_of(config, "sdp.flags").items()
                      if s["src_streams"][1] == cal_name), None)
        shared = {"l0_spead": endpoints[l0], "l0_name": l0, "servers": n_cal,
                  "report_path": f"{data_dir}/cal_reports"}
        if "buffer_dumps" in stream:
            shared["buffer_dumps"] = stream["buffer_dumps"]
        if flags:
            endpoints[flags] = shared["flags_spead"] = allocator.allocate(n_cal)
            shared["flags_name"] = flags
        for k in range(1, n_cal + 1):
            tasks.append(Task(
                f"{cal_name}.{k}", "cal", {"server_id": k}, group=cal_name, group_config=shared,
                depends_ready=list(ingest_tasks[l0]),
                init=[Transition(INIT_CONSUMERS, "capture-init", ("{capture_block_id}",), 30.0)],
                done=[Transition(DONE_CONSUMERS, "capture-done", (), 240.0)],
            ))
            receivers.setdefault(l0, []).append(f"{cal_name}.{k}")

    archived: list[str] = []
    for l0, stream in vis.items():
        if not _archived(stream):
            continue
        archived.append(l0)
        task = Task(
            f"vis_writer.{l0}", "vis-writer", {"l0_spead": endpoints[l0], "l0_name": l0, **writer},
            depends_ready=list(ingest_tasks[l0]),
            init=[Transition(INIT_CONSUMERS, "capture-init", ("{capture_block_id}",), 30.0)],
            done=[Transition(DONE_CONSUMERS, "capture-done", ("{capture_block_id}",), 240.0)],
        )
        tasks.append(task)
        receivers.setdefault(l0, []).append(task.name)
    archived += list(_streams_of(config, "sdp.cal"))
    for flags, stream in _streams_of(config, "sdp.flags").items():
        if not _archived(stream):
            continue
        archived.append(flags)
        cal_name = stream["src_streams"][1]
        task = Task(
            f"flag_writer.{flags}", "flag-writer",
            {"l0_spead": endpoints[flags], "l0_name": flags, **writer},
            depends_ready=[t.name for t in tasks if t.group == cal_name],
            init=[Transition(INIT_CONSUMERS, "capture-init", ("{capture_block_id}",), 30.0)],
            # After cal has finished the capture block, so that all its flags are in.
            done=[Transition(DONE_FLAGS, "capture-done", ("{capture_block_id}",), 60.0)],
        )
        tasks.append(task)
        receivers.setdefault(flags, []).append(task.name)
    if any(t.command.endswith("writer") for t in tasks):
        # As katsdpcontroller: no meta writer without an archived stream.
        tasks.append(Task(
            "meta_writer", "meta-writer", dict(writer),
            depends_ready=[t.name for t in tasks if t.command.endswith("writer")],
            done=[Transition(DONE_LIGHT_META, "write-meta", ("{capture_block_id}", "1"), 120.0),
                  Transition(DONE_FULL_META, "write-meta", ("{capture_block_id}", "0"), 300.0)],
        ))
    telstate["sdp_archived_streams"] = archived

    if unicast:
        for stream, names in receivers.items():
            if len(names) > 1:
                problems.append(f"config/transport: stream {stream!r} has {len(names)} receivers "
                                f"({', '.join(names)}); unicast udp gives it only one, use "
                                f"multicast")
    overrides = settings.get("service_overrides", {})
    known = {t.name for t in tasks} | {t.group for t in tasks if t.group}
    for target, override in overrides.items():
        if target not in known:
            problems.append(f"config/service_overrides/{target}: no such task "
                            f"(tasks: {', '.join(sorted(known))})")
            continue
        for task in tasks:
            if task.name == target:
                task.config.update(copy.deepcopy(override.get("config", {})))
            elif task.group == target and task.group_config is not None:
                task.group_config.update(copy.deepcopy(override.get("config", {})))
    if problems:
        raise ConfigError(problems)
    return ProductGraph(name, config, tasks, telstate)


def steps(tasks: Iterable[Task], which: str) -> list[tuple[int, list[tuple[Task, Transition]]]]:
    """The capture-init (`which` = ``"init"``) or capture-done steps, in order."""
    by_step: dict[int, list[tuple[Task, Transition]]] = {}
    for task in tasks:
        for transition in getattr(task, which):
            by_step.setdefault(transition.step, []).append((task, transition))
    return sorted(by_step.items())
