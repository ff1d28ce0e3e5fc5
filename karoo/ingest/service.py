"""The ingest daemon: CBF visibilities in, flagged and averaged L0 spectral and continuum out.

``karoo ingest`` (or `IngestService` in-process) reads the correlator's metadata from telstate
(the 11 CBF keys katsdpingest needs; it refuses to start, naming the key, when one is missing),
and for each capture block (``capture-init`` .. ``capture-done``):

1. receives the CBF baseline-correlation-products stream with `karoo.spead.cbf.CBFReceiver`
   (channels of this server's band share plus guard channels, whole substreams);
2. agrees with the other ingest servers on the timestamp of dump 0 through the set-once
   telstate key ``<cbid>_<l0>_first_timestamp_adc`` (the first writer wins), so every server
   numbers output dumps alike; the value offered is the first delivered dump's, which the
   receiver only delivers once enough heaps have confirmed its timestamp base (a stray heap
   arriving first is outvoted, not made dump 0);
3. converts, flags and accumulates every CBF dump with `karoo.ingest.kernels.DumpProcessor`
   (numba CPU or numba-cuda GPU), heaps that never arrived flagged ``data_lost``;
4. at the end of each output dump (groups of ``round(output_int_time / cbf_int_time)`` CBF
   dumps, aligned to absolute dump indices) sends the L0 spectral and continuum heaps with
   `karoo.spead.l0.L0Sender`; a group of which nothing arrived between two that did is sent
   as an all-``data_lost`` dump so the output keeps its cadence;
5. at ``capture-done`` waits for the input to go quiet, flushes the partial output dump,
   sends the stop heaps and only then replies.

Malformed input never stops it: every rejected heap is counted in a sensor by reason
(``input-<reason>-heaps-total``), every missing heap flagged and counted.
"""

# No `from __future__ import annotations`: aiokatcp reads request annotations as real types.
import argparse
import asyncio
import concurrent.futures
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from aiokatcp import DeviceStatus, FailReply, Sensor

from .. import flags as flag_bits
from ..service import Service, add_service_arguments, set_service_factory
from ..spead.cbf import CBFReceiver, CBFStreamParams
from ..spead.l0 import L0Sender
from ..spead.transport import TransportSpec, parse_transport
from ..telstate import ImmutableKeyError
from .kernels import DumpProcessor, baseline_permutation

__all__ = [
    "CBF_KEYS",
    "CBFConfig",
    "ChannelRanges",
    "ConfigError",
    "IngestConfig",
    "IngestService",
    "add_commands",
    "channel_ranges",
    "read_cbf_config",
]

logger = logging.getLogger(__name__)

#: The CBF attributes ingest cannot run without (katsdpingest's critical set).
CBF_KEYS = (
    "n_chans", "n_chans_per_substream", "n_accs", "bls_ordering", "bandwidth", "center_freq",
    "input_labels", "sync_time", "int_time", "scale_factor_timestamp", "ticks_between_spectra",
)
#: Input rejection reasons from the receiver, as sensor names (``input-<name>-heaps-total``).
INPUT_REASONS = {
    "bad_size": "wrong shape or dtype (payload size does not match xeng_raw)",
    "missing_items": "without timestamp or frequency",
    "bad_channel": "frequency (channel offset) not a substream start in the subscribed range",
    "bad_timestamp": "timestamp not on the dump grid",
    "too_old": "timestamp of a dump already delivered or before the first timestamp",
    "too_far": "timestamp implausibly far ahead",
    "duplicate": "a second heap for the same dump and channels",
    "outvoted": "contradicting the timestamp base most heaps agreed on (e.g. a stray first heap)",
    "unconfirmed": "in dumps that ended before enough heaps agreed on a timestamp base",
    "incomplete": "packets lost: heap discarded",
    "no_descriptor": "data before any xeng_raw descriptor",
    "bad_descriptor": "data while the xeng_raw descriptor declared a wrong shape or dtype",
    "missing": "never arrived (substream slots empty in a delivered dump)",
}
#: A whole output dump of which nothing arrived is sent as data_lost if the gap is at most
#: this long; a longer silence is a break in the stream (logged), not lost data to fill.
MAX_GAP_FILL = 64
# Waiting for the input to go quiet at capture-done (the anchor waits 5 s for stop heaps).
_DRAIN_QUIET = 1.0
_DRAIN_TIMEOUT = 5.0

# numba's parallel kernels run in one thread per process: several services in one process
# (the embedded demo, band-split tests) take turns rather than oversubscribing the cores.
_EXECUTOR = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="karoo-ingest")


class ConfigError(ValueError):
    """The configuration (telstate or options) does not allow ingest to run."""


# -- configuration ------------------------------------------------------------------------------


@dataclass
class IngestConfig:
    """Options of the ingest daemon (the ``karoo ingest`` command line).

    Transports are `karoo.spead.transport` strings (``udp://host:port``, ``tcp://...``,
    ``inproc://name``); an empty L0 transport disables that stream.
    """

    cbf_spead: str = "udp://0.0.0.0:7148"
    cbf_name: str = "cbf_baseline_correlation_products"
    l0_spectral_spead: str = "udp://127.0.0.1:7200"
    l0_spectral_name: str = "sdp_l0"
    l0_continuum_spead: str = ""
    l0_continuum_name: str = "sdp_l0_continuum"
    output_int_time: float = 2.0
    continuum_factor: int = 16
    servers: int = 1
    server_id: int = 1
    backend: str = "cpu"
    guard_channels: int = 64
    excise: bool = True
    clock_ratio: float = 1.0
    cbf_interface: str = ""
    l0_interface: str = ""

    def __post_init__(self) -> None:
        if not self.l0_spectral_spead and not self.l0_continuum_spead:
            raise ConfigError("at least one of --l0-spectral-spead / --l0-continuum-spead needed")
        if self.servers < 1 or not 1 <= self.server_id <= self.servers:
            raise ConfigError(f"--server-id must be in 1..{self.servers}, not {self.server_id}")
        if self.backend not in ("cpu", "cuda"):
            raise ConfigError(f"--backend must be cpu or cuda, not {self.backend!r}")
        if self.continuum_factor < 1 or self.guard_channels < 0 or self.output_int_time <= 0:
            raise ConfigError("continuum factor, guard channels and output int time must be "
                              "positive")
        if self.clock_ratio < 0:
            raise ConfigError("--clock-ratio must be >= 0 (0: send output unthrottled)")
        for name in ("cbf_spead", "l0_spectral_spead", "l0_continuum_spead"):
            value = getattr(self, name)
            if value:
                try:
                    parse_transport(value)
                except ValueError as exc:
                    raise ConfigError(f"--{name.replace('_', '-')}: {exc}") from None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "IngestConfig":
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})


class CBFConfig(NamedTuple):
    """The CBF stream as described in telstate."""

    n_chans: int
    n_chans_per_substream: int
    n_accs: int
    bls_ordering: list[tuple[str, str]]
    bandwidth: float
    center_freq: float
    input_labels: list[str]
    sync_time: float
    int_time: float
    scale_factor_timestamp: float
    ticks_between_spectra: int

    @property
    def timestamp_step(self) -> int:
        return self.ticks_between_spectra * self.n_accs

    @property
    def channel_width(self) -> float:
        return self.bandwidth / self.n_chans

    def stream_params(self) -> CBFStreamParams:
        return CBFStreamParams(
            self.n_chans, self.n_chans_per_substream, len(self.bls_ordering), self.timestamp_step
        )


def _normalise(name: str) -> str:
    return name.replace(".", "_").replace("-", "_")


async def read_cbf_config(telstate, cbf_name: str) -> CBFConfig:
    """Read the 11 CBF keys for stream `cbf_name`.

    Looked up as katsdpingest does: on the stream itself, then its upstream
    antenna-channelised-voltage stream (``<cbf>_src_streams``), then that stream's instrument
    (``<acv>_instrument_dev_name``), then ``cbf``.

    Raises
    ------
    ConfigError
        Naming every missing key and where it was looked for.
    """
    cbf = _normalise(cbf_name)
    prefixes = [cbf]
    src = await telstate.get(f"{cbf}_src_streams")
    if src:
        acv = _normalise(str(next(iter(src))))
        prefixes.append(acv)
        instrument = await telstate.get(f"{acv}_instrument_dev_name")
        if instrument:
            prefixes.append(_normalise(str(instrument)))
    prefixes.append("cbf")
    view = telstate.root()
    for prefix in reversed(prefixes):
        view = view.view(prefix)
    values = {}
    missing = []
    for key in CBF_KEYS:
        value = await view.get(key)
        if value is None:
            missing.append(key)
        else:
            values[key] = value
    if missing:
        raise ConfigError(
            f"telstate lacks CBF key(s) {', '.join(missing)} for stream {cbf_name!r} "
            f"(looked under {', '.join(p + '_' for p in prefixes)}); is the correlator "
            "(or karoo sim) configured?"
        )
    try:
        return CBFConfig(
            n_chans=int(values["n_chans"]),
            n_chans_per_substream=int(values["n_chans_per_substream"]),
            n_accs=int(values["n_accs"]),
            bls_ordering=[(str(a), str(b)) for a, b in values["bls_ordering"]],
            bandwidth=float(values["bandwidth"]),
            center_freq=float(values["center_freq"]),
            input_labels=[str(x) for x in values["input_labels"]],
            sync_time=float(values["sync_time"]),
            int_time=float(values["int_time"]),
            scale_factor_timestamp=float(values["scale_factor_timestamp"]),
            ticks_between_spectra=int(values["ticks_between_spectra"]),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"malformed CBF metadata for {cbf_name!r}: {exc}") from None


class ChannelRanges(NamedTuple):
    """One server's channels, all as (start, stop) CBF channel numbers.

    ``output``: what it emits; ``input``: output plus guard channels (clipped to the band),
    what it flags; ``subscribed``: input widened to whole substreams, what it receives.
    """

    output: tuple[int, int]
    input: tuple[int, int]
    subscribed: tuple[int, int]


def channel_ranges(
    n_chans: int,
    n_chans_per_substream: int,
    servers: int,
    server_id: int,
    continuum_factor: int = 1,
    guard: int = 64,
    all_output: tuple[int, int] | None = None,
) -> ChannelRanges:
    """Split the output band between `servers` ingest servers (katsdpingest's ChannelRanges).

    Parameters
    ----------
    n_chans, n_chans_per_substream
        The CBF band and its heap size.
    servers, server_id
        Number of servers and this one's 1-based id.
    continuum_factor
        Every server's share must be whole continuum channels.
    guard
        Channels received and flagged on each side of the output for the median filter's
        and noise estimate's context, but not emitted.
    all_output
        Output channels of all servers together (default the whole band).
    """
    start, stop = all_output if all_output is not None else (0, n_chans)
    if not 0 <= start < stop <= n_chans:
        raise ConfigError(f"output channels {start}:{stop} not within 0:{n_chans}")
    width = stop - start
    if width % (servers * continuum_factor):
        raise ConfigError(
            f"{width} output channels do not split into {servers} server(s) of whole "
            f"{continuum_factor}-channel continuum channels"
        )
    share = width // servers
    out = (start + (server_id - 1) * share, start + server_id * share)
    inp = (max(0, out[0] - guard), min(n_chans, out[1] + guard))
    cps = n_chans_per_substream
    sub = (inp[0] // cps * cps, -(-inp[1] // cps) * cps)
    return ChannelRanges(out, inp, sub)


def _server_endpoints(spec: TransportSpec, servers: int, server_id: int) -> TransportSpec:
    """This server's share of an L0 stream's endpoints (several servers may share one)."""
    n = len(spec)
    if n >= servers:
        if n % servers:
            raise ConfigError(f"{n} L0 endpoints do not divide between {servers} servers")
        k = n // servers
        chosen = spec.endpoints[(server_id - 1) * k : server_id * k]
    else:
        if servers % n:
            raise ConfigError(f"{servers} servers cannot share {n} L0 endpoints evenly")
        chosen = (spec.endpoints[(server_id - 1) * n // servers],)
    return TransportSpec(spec.scheme, tuple(chosen))


class _L0Stream:
    """One L0 output stream of this server: its name, channels and sender."""

    def __init__(self, name: str, spec: TransportSpec, n_chans: int, channel_range, factor: int,
                 cbf: CBFConfig) -> None:
        self.name = name
        self.spec = spec
        self.n_chans = n_chans
        self.channel_range = channel_range
        self.factor = factor
        n_mine = channel_range[1] - channel_range[0]
        if n_mine % len(spec):
            raise ConfigError(f"{n_mine} {name} channels per server do not divide over "
                              f"{len(spec)} endpoints")
        self.n_chans_per_substream = n_mine // len(spec)
        # The L0 band is the whole CBF band (all servers together). A continuum channel is
        # centred on the spectral channels it averages, hence the (factor - 1) / 2 offset.
        self.center_freq = cbf.center_freq + (factor - 1) / 2 * cbf.channel_width
        self.bandwidth = cbf.bandwidth
        self.sender: L0Sender | None = None


# -- the daemon ---------------------------------------------------------------------------------


class IngestService(Service):
    """The ingest daemon (see the module docstring).

    Parameters
    ----------
    host, port
        KATCP address (port 0 picks a free one).
    telstate
        asyncio telescope state (`karoo.telstate.aio.TelescopeState`).
    name
        Task name.
    config
        Options.

    The CBF metadata is read by :meth:`start` (or :meth:`configure`), which raises
    `ConfigError` naming any missing key.
    """

    VERSION = "karoo-ingest-1.0"

    def __init__(self, host: str, port: int, *, telstate, name: str,
                 config: IngestConfig) -> None:
        super().__init__(host, port, telstate=telstate, name=name)
        self.config = config
        self.cbf: CBFConfig | None = None
        self.ranges: ChannelRanges | None = None
        self.receiver: CBFReceiver | None = None
        self.processor: DumpProcessor | None = None
        self.streams: list[_L0Stream] = []
        self._capture_task: asyncio.Task | None = None
        self._idle, self._idle_since = True, 0.0
        self._dumps_seen = 0
        self._before_base = 0
        self._input = {
            "bytes": self.add_counter("input-bytes-total", "CBF payload bytes received", "B"),
            "heaps": self.add_counter("input-heaps-total", "CBF heaps accepted"),
            "dumps": self.add_counter("input-dumps-total", "CBF dumps received"),
            "metadata": self.add_counter("input-metadata-heaps-total",
                                         "CBF descriptor and start/stop heaps"),
        }
        self._rejects = {
            reason: self.add_counter(f"input-{reason.replace('_', '-')}-heaps-total",
                                     f"CBF heaps {why}")
            for reason, why in INPUT_REASONS.items()
        }
        self._output = {
            "bytes": self.add_counter("output-bytes-total", "L0 bytes sent (all streams)", "B"),
            "heaps": self.add_counter("output-heaps-total", "L0 heaps sent (all streams)"),
            "dumps": self.add_counter("output-dumps-total", "L0 spectral output dumps sent"),
            "lost_dumps": self.add_counter(
                "output-lost-dumps-total", "output dumps sent all data_lost (nothing arrived)"),
            "vis": self.add_counter("output-vis-total", "L0 spectral visibilities sent"),
            "flagged": self.add_counter("output-flagged-total",
                                        "L0 spectral visibilities sent with any flag"),
        }
        self._flagged_fraction = self.add_gauge(
            "output-flagged-fraction", "fraction of flagged visibilities in the last output dump")
        self._lost_fraction = self.add_gauge(
            "output-data-lost-fraction", "fraction of data_lost visibilities in the last output "
            "dump")
        self._last_dump = self.add_gauge(
            "last-dump-timestamp", "UNIX time of the start of the last CBF dump received", "s")
        self._descriptors = Sensor(bool, "descriptors-received",
                                   "whether a CBF xeng_raw descriptor has been received",
                                   default=False, initial_status=Sensor.Status.NOMINAL)
        self.sensors.add(self._descriptors)
        self._shape = {
            "n_bls": self.add_gauge("output-n-bls", "baselines in the L0 output", type_=int),
            "n_chans": self.add_gauge("output-n-chans", "spectral channels emitted by this "
                                      "server", type_=int),
            "int_time": self.add_gauge("output-int-time", "L0 dump period", "s"),
        }


    # -- set-up

    async def start(self) -> None:
        if self.cbf is None:
            await self.configure()
        await super().start()

    async def warm_up(self) -> None:
        """Compile the kernels now (a tiny dump), not on the first dump of a capture."""
        factor = self.config.continuum_factor if self.config.l0_continuum_spead else None
        n = 2 * (factor or 16)
        proc = DumpProcessor(n, self.permutation, self.cbf.n_accs, continuum_factor=factor,
                             excise=self.config.excise, backend=self.config.backend)
        xeng = np.ones((n, len(self.cbf.bls_ordering), 2), np.int32)

        def run() -> None:
            proc.process_dump(xeng, np.zeros(n, bool))
            proc.finish()

        await asyncio.get_running_loop().run_in_executor(_EXECUTOR, run)

    async def configure(self) -> None:
        """Read the CBF metadata and work out ranges, baselines and output geometry."""
        cfg = self.config
        cbf = await read_cbf_config(self.telstate, cfg.cbf_name)
        if cbf.n_chans % cbf.n_chans_per_substream:
            raise ConfigError(f"CBF n_chans {cbf.n_chans} is not a multiple of "
                              f"n_chans_per_substream {cbf.n_chans_per_substream}")
        factor = cfg.continuum_factor if cfg.l0_continuum_spead else 1
        self.ranges = channel_ranges(
            cbf.n_chans, cbf.n_chans_per_substream, cfg.servers, cfg.server_id,
            factor, cfg.guard_channels,
        )
        self.permutation, self.bls_ordering = baseline_permutation(cbf.bls_ordering)
        if len(self.permutation) == 0:
            raise ConfigError("the CBF bls_ordering has no usable correlation products")
        self.ratio = max(1, round(cfg.output_int_time / cbf.int_time))
        self.int_time = self.ratio * cbf.int_time
        self.cbf = cbf
        out = self.ranges.output
        n_bls = len(self.permutation)
        self.streams = []
        if cfg.l0_spectral_spead:
            spec = _server_endpoints(parse_transport(cfg.l0_spectral_spead), cfg.servers,
                                     cfg.server_id)
            self.streams.append(_L0Stream(cfg.l0_spectral_name, spec, cbf.n_chans, out, 1, cbf))
        if cfg.l0_continuum_spead:
            spec = _server_endpoints(parse_transport(cfg.l0_continuum_spead), cfg.servers,
                                     cfg.server_id)
            f = cfg.continuum_factor
            self.streams.append(_L0Stream(cfg.l0_continuum_name, spec, cbf.n_chans // f,
                                          (out[0] // f, out[1] // f), f, cbf))
        self._shape["n_bls"].value = n_bls
        self._shape["n_chans"].value = out[1] - out[0]
        self._shape["int_time"].value = self.int_time
        logger.info(
            "%s: CBF %s, %d channels, %d products -> %d baselines; output channels %d:%d "
            "(receiving %d:%d), %d CBF dumps per %.3f s output dump", self.name, cfg.cbf_name,
            cbf.n_chans, len(cbf.bls_ordering), n_bls, *out, *self.ranges.subscribed,
            self.ratio, self.int_time,
        )
        # Written at start-up, as katsdpingest does: the writers and cal read them at their
        # capture-init, which comes before ingest's.
        await self._write_stream_attributes()
        await self.warm_up()

    def _stream_attributes(self, stream: _L0Stream) -> dict[str, Any]:
        """The ``<l0>_*`` keys (katsdpingest's set), identical on every server."""
        cbf = self.cbf
        return {
            "n_chans": stream.n_chans,
            "n_chans_per_substream": stream.n_chans_per_substream,
            "n_bls": len(self.bls_ordering),
            "bls_ordering": np.array(self.bls_ordering),
            "sync_time": cbf.sync_time,
            "int_time": self.int_time,
            "bandwidth": stream.bandwidth,
            "center_freq": stream.center_freq,
            "channel_range": (0, cbf.n_chans),
            "excise": self.config.excise,
            "src_streams": [self.config.cbf_name],
            "stream_type": "sdp.vis",
            "calibrations_applied": [],
            "need_weights_power_scale": True,
        }

    async def _write_stream_attributes(self) -> None:
        for stream in self.streams:
            for key, value in self._stream_attributes(stream).items():
                full = f"{stream.name}_{key}"
                try:
                    await self.telstate.add(full, value, immutable=True)
                except ImmutableKeyError as exc:
                    # Another configuration already wrote it: readers get that one.
                    logger.warning("%s: %s", self.name, exc)

    # -- the capture cycle

    async def capture_init(self, capture_block_id: str) -> None:
        cfg = self.config
        if self.cbf is None:
            await self.configure()
        for sensor in (*self._input.values(), *self._rejects.values(), *self._output.values()):
            sensor.set_value(0, status=Sensor.Status.NOMINAL)
        try:
            self.receiver = CBFReceiver(
                cfg.cbf_spead, self.cbf.stream_params(), channel_range=self.ranges.subscribed,
                stop_on_stop_item=False, interface_address=cfg.cbf_interface,
            )
        except (OSError, ValueError) as exc:
            raise FailReply(f"cannot receive from {cfg.cbf_spead}: {exc}") from None
        lo = self.ranges.input[0] - self.ranges.subscribed[0]
        out = self.ranges.output
        self.processor = DumpProcessor(
            self.ranges.input[1] - self.ranges.input[0], self.permutation, self.cbf.n_accs,
            output_channels=(out[0] - self.ranges.input[0], out[1] - self.ranges.input[0]),
            excise=cfg.excise,
            continuum_factor=cfg.continuum_factor if cfg.l0_continuum_spead else None,
            backend=cfg.backend,
        )
        self._input_slice = slice(lo, lo + self.ranges.input[1] - self.ranges.input[0])
        try:
            for stream in self.streams:
                int_time = self.int_time / cfg.clock_ratio if cfg.clock_ratio else None
                stream.sender = await L0Sender.create(
                    stream.spec, stream.channel_range, stream.n_chans, len(self.permutation),
                    int_time=int_time, interface_address=cfg.l0_interface,
                )
                await stream.sender.start()
        except (OSError, ValueError) as exc:
            self.receiver.stop()
            raise FailReply(f"cannot open L0 output: {exc}") from None
        self.set_device_status(DeviceStatus.OK)
        self._capture_task = asyncio.create_task(self._capture(capture_block_id))

    async def capture_done(self, capture_block_id: str) -> None:
        rx = self.receiver
        await self._drain(rx)
        rx.stop()
        try:
            await self._capture_task
        finally:
            self._capture_task = None
            for stream in self.streams:
                if stream.sender is not None:
                    try:
                        await stream.sender.stop()
                    except OSError as exc:
                        logger.warning("%s: stop heap on %s not sent: %s", self.name,
                                       stream.name, exc)
            self._count_sent()
            for stream in self.streams:
                stream.sender = None
            self._update_input(rx.counters, self._before_base)

    async def _drain(self, rx: CBFReceiver) -> None:
        """Wait until every dump that arrived is processed and no heap has come for a while
        (`_DRAIN_QUIET` seconds: the receive thread may be starved of CPU for a moment).

        A backlog being processed is waited for; a sender that keeps sending is cut off after
        `_DRAIN_TIMEOUT` seconds of idle waiting.
        """
        last = None
        changed = time.monotonic()
        idle_time = 0.0
        tick = 0.05
        while self._capture_task is not None and not self._capture_task.done():
            await asyncio.sleep(tick)
            now = (rx.heaps_seen, rx.latest_dump, self._dumps_seen)
            if self._idle:
                idle_time += tick
            if now != last:
                last, changed = now, time.monotonic()
            # Quiet means waiting for input all along: a slow (paced) send of the previous
            # dump also leaves the counters unchanged while a backlog is still queued.
            elif self._idle and time.monotonic() - max(changed, self._idle_since) >= _DRAIN_QUIET:
                return  # no input for a while, nothing being processed
            if idle_time >= _DRAIN_TIMEOUT:
                logger.warning("%s: input still arriving after capture-done; stopping anyway",
                               self.name)
                return

    # -- the capture task

    async def _capture(self, cbid: str) -> None:
        loop = asyncio.get_running_loop()
        rx = self.receiver
        cbf = self.cbf
        step = cbf.timestamp_step
        cps = cbf.n_chans_per_substream
        self._base: int | None = None
        self._group: int | None = None
        self._cbid = cbid
        self._before_base = 0
        self._dumps_seen = 0
        dumps = aiter(rx)
        try:
            while True:
                self._idle, self._idle_since = True, time.monotonic()
                try:
                    dump = await anext(dumps)
                except StopAsyncIteration:
                    break
                finally:
                    self._idle = False
                self._dumps_seen += 1
                self._update_input(dump.counters, self._before_base)
                self._last_dump.value = cbf.sync_time + dump.timestamp / cbf.scale_factor_timestamp
                if self._base is None:
                    # The receiver only delivers dumps under a base that enough heaps have
                    # confirmed, so a stray first heap cannot set dump 0 for every server.
                    self._base = await self._agree_first_timestamp(cbid, dump.timestamp)
                offset = dump.timestamp - self._base
                if offset < 0 or offset % step:
                    # Before the agreed start, or on another grid: not ours to number.
                    self._before_base += int(dump.present.sum())
                    logger.warning("%s: CBF dump at %d is not on the agreed grid (first "
                                   "timestamp %d, step %d): dropped", self.name,
                                   dump.timestamp, self._base, step)
                    self._update_input(dump.counters, self._before_base)
                    continue
                group = offset // step // self.ratio
                if self._group is not None and group != self._group:
                    await self._flush()
                    await self._fill_gap(self._group + 1, group)
                self._group = group
                missing = np.repeat(~dump.present, cps)[self._input_slice]
                data = dump.data[self._input_slice]
                await loop.run_in_executor(_EXECUTOR, self.processor.process_dump, data, missing)
            if self._group is not None:
                await self._flush()
            self._update_input(rx.counters, self._before_base)
        except Exception as exc:
            logger.exception("%s: capture of %s failed", self.name, cbid)
            self.set_device_status(DeviceStatus.FAIL, f"capture failed: {exc}")
            raise

    async def _agree_first_timestamp(self, cbid: str, timestamp: int) -> int:
        """The first writer of ``<cbid>_<l0>_first_timestamp_adc`` sets dump 0 for all."""
        cbf = self.cbf
        key = f"{cbid}_{self.streams[0].name}_first_timestamp_adc"
        with contextlib.suppress(ImmutableKeyError):  # another server was first
            await self.telstate.add(key, int(timestamp), immutable=True)
        base = int(await self.telstate.get(key))
        first = base / cbf.scale_factor_timestamp + 0.5 * self.int_time
        for stream in self.streams:
            for name, value in (("first_timestamp_adc", base), ("first_timestamp", first)):
                try:
                    await self.telstate.add(f"{cbid}_{stream.name}_{name}", value, immutable=True)
                except ImmutableKeyError as exc:
                    logger.error("%s: %s", self.name, exc)
        logger.info("%s: capture block %s first timestamp %d (%.6f s after sync)", self.name,
                    cbid, base, first)
        return base

    def _timestamp(self, group: int) -> float:
        """Centre of output dump `group`, in seconds since sync."""
        cbf = self.cbf
        ticks = (group + 0.5) * self.ratio * cbf.timestamp_step + self._base
        return ticks / cbf.scale_factor_timestamp

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        spectral, continuum = await loop.run_in_executor(_EXECUTOR, self.processor.finish)
        products = [spectral if s.factor == 1 else continuum for s in self.streams]
        await self._send(self._group, products)

    async def _fill_gap(self, first: int, stop: int) -> None:
        """Send the output dumps in [first, stop) of which nothing arrived, as data_lost."""
        if stop - first > MAX_GAP_FILL:
            logger.warning("%s: no CBF data for output dumps %d..%d: a break in the stream, "
                           "not filled", self.name, first, stop - 1)
            return
        for group in range(first, stop):
            products = []
            for s in self.streams:
                n = s.channel_range[1] - s.channel_range[0]
                shape = (n, len(self.permutation))
                products.append((np.zeros(shape, np.complex64),
                                 np.full(shape, flag_bits.DATA_LOST, np.uint8),
                                 np.zeros(shape, np.uint8), np.zeros(n, np.float32)))
            await self._send(group, products)
            self._output["lost_dumps"].value += 1

    async def _send(self, group: int, products) -> None:
        timestamp = self._timestamp(group)
        for stream, (vis, flags, weights, weights_channel, *_) in zip(
            self.streams, products, strict=True
        ):
            await stream.sender.send_dump(vis, flags, weights, weights_channel, timestamp, group)
            if stream.factor == 1 or len(self.streams) == 1:
                flagged = int(np.count_nonzero(flags))
                lost = int(np.count_nonzero(flags & flag_bits.DATA_LOST))
                self._output["vis"].value += flags.size
                self._output["flagged"].value += flagged
                self._flagged_fraction.value = flagged / flags.size
                self._lost_fraction.value = lost / flags.size
        self._output["dumps"].value += 1
        self._count_sent()

    def _count_sent(self) -> None:
        # Senders are per capture; sensors too (reset at capture-init).
        senders = [s.sender for s in self.streams if s.sender is not None]
        self._output["heaps"].value = sum(x.heaps_sent for x in senders)
        self._output["bytes"].value = sum(x.bytes_sent for x in senders)

    def _update_input(self, counters: dict[str, int], before_base: int = 0) -> None:
        heap_bytes = self.cbf.stream_params().heap_bytes
        self._input["heaps"].value = counters["heaps"] - before_base
        self._input["bytes"].value = (counters["heaps"] - before_base) * heap_bytes
        self._input["dumps"].value = counters["dumps"]
        self._input["metadata"].value = counters["metadata"]
        extra = {
            "too_old": before_base,
            # dumps of which nothing arrived (between ones that did) are missing heaps too
            "missing": counters["empty_dumps"] * self.receiver.n_substreams,
        }
        for reason, sensor in self._rejects.items():
            value = counters[reason] + extra.get(reason, 0)
            if value != sensor.value:
                sensor.set_value(value, status=Sensor.Status.WARN if value else
                                 Sensor.Status.NOMINAL)
        self._descriptors.value = self.receiver.byteorder is not None


# -- command line -------------------------------------------------------------------------------


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "ingest", help="the ingest daemon: CBF SPEAD in, flagged/averaged L0 SPEAD out",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = IngestConfig()
    g = parser.add_argument_group("streams")
    g.add_argument("--cbf-spead", default=d.cbf_spead, metavar="TRANSPORT",
                   help="where the CBF stream arrives (udp://a.b.c.d+N:port, tcp://, "
                   "inproc://) [%(default)s]")
    g.add_argument("--cbf-name", default=d.cbf_name,
                   help="CBF stream name: telstate prefix of its metadata [%(default)s]")
    g.add_argument("--cbf-interface", default="", metavar="ADDRESS",
                   help="interface address for multicast input")
    g.add_argument("--l0-spectral-spead", default=d.l0_spectral_spead, metavar="TRANSPORT",
                   help="L0 spectral destinations; '' for none [%(default)s]")
    g.add_argument("--l0-spectral-name", default=d.l0_spectral_name, help="[%(default)s]")
    g.add_argument("--l0-continuum-spead", default=d.l0_continuum_spead, metavar="TRANSPORT",
                   help="L0 continuum destinations; '' for none [%(default)s]")
    g.add_argument("--l0-continuum-name", default=d.l0_continuum_name, help="[%(default)s]")
    g.add_argument("--l0-interface", default="", metavar="ADDRESS",
                   help="interface address for multicast output")
    g = parser.add_argument_group("processing")
    g.add_argument("--output-int-time", type=float, default=d.output_int_time,
                   help="L0 dump period, rounded to whole CBF dumps [%(default)s s]")
    g.add_argument("--continuum-factor", type=int, default=d.continuum_factor,
                   help="spectral channels per continuum channel [%(default)s]")
    g.add_argument("--guard-channels", type=int, default=d.guard_channels,
                   help="extra channels each side flagged for context [%(default)s]")
    g.add_argument("--no-excise", dest="excise", action="store_false",
                   help="average flagged data in rather than excising it")
    g.add_argument("--backend", choices=("cpu", "cuda"), default=d.backend,
                   help="where the kernels run [%(default)s]")
    g.add_argument("--servers", type=int, default=d.servers,
                   help="ingest servers splitting the band [%(default)s]")
    g.add_argument("--server-id", type=int, default=d.server_id,
                   help="this server's 1-based index [%(default)s]")
    g.add_argument("--clock-ratio", type=float, default=d.clock_ratio,
                   help="L0 send rate limit relative to real time; 0 for none [%(default)s]")
    add_service_arguments(parser, "ingest.sdp_l0.1")
    set_service_factory(parser, _make)


async def _make(telstate, args: argparse.Namespace) -> IngestService:
    try:
        config = IngestConfig.from_args(args)
        service = IngestService(args.host, args.port, telstate=telstate, name=args.name,
                                config=config)
        await service.configure()
    except ConfigError as exc:
        raise SystemExit(f"karoo ingest: {exc}") from None
    return service

