"""``karoo sim``: the correlator simulator as a daemon (what katcbfsim is for MeerKAT's SDP).

At start it writes the CBF metadata (the keys ingest needs, under ``--cbf-name`` and its
antenna-channelised-voltage and instrument streams) and the CAM-like sensors of the scripted
observation to telstate, and the injected truth (gains, delays, bandpasses, RFI mask) to
``--truth-dir`` if given. KATCP ``capture-start`` / ``capture-stop`` (katcbfsim's names) start
and stop sending the CBF baseline-correlation-products SPEAD stream; ``--start`` starts at once.
Sending resumes where it stopped and ends with the script.

The same class runs in-process (`SimService`, with an ``inproc://`` transport) for the
embedded demo and the tests, which also use `SimService.simulator` for the ground truth.
"""

# No `from __future__ import annotations`: aiokatcp reads request annotations as real types.
import argparse
import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
from aiokatcp import FailReply, Sensor

from ..service import Service, add_service_arguments, set_service_factory
from ..spead.cbf import CBFSender, CBFStreamParams
from ..spead.transport import parse_transport
from ..telstate import ImmutableKeyError
from .model import L_BAND, UHF_BAND, CorrelatorConfig, NoiseModel
from .observation import DEFAULT_START_TIME, Scan, Simulator, default_script
from .rfi import HeapLossModel, RfiModel

__all__ = ["SCRIPTS", "SimConfig", "SimService", "add_commands", "load_script"]

logger = logging.getLogger(__name__)

_BCP_SUFFIX = "_baseline_correlation_products"
#: Built-in observation scripts: name -> scans.
SCRIPTS = {
    "default": default_script,
    # bpcal, gaincal, target, gaincal in under a minute: for tests and demos
    "short": lambda: default_script(bpcal_s=12.0, gaincal_s=6.0, target_s=12.0, slew_s=2.0),
}


def load_script(script: str) -> list[Scan]:
    """A built-in script by name (see `SCRIPTS`) or a JSON file.

    The file holds a list of scans (or ``{"scans": [...]}``), each
    ``{"activity": "track", "target": "<katpoint description>", "duration": 30, "label": ""}``.
    """
    if script in SCRIPTS:
        return list(SCRIPTS[script]())
    if not os.path.exists(script):
        raise ValueError(f"script {script!r} is neither a built-in ({', '.join(SCRIPTS)}) "
                         "nor a file")
    with open(script) as f:
        doc = json.load(f)
    scans = doc["scans"] if isinstance(doc, dict) else doc
    try:
        return [Scan(s["activity"], s["target"], float(s["duration"]), s.get("label", ""))
                for s in scans]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"bad scan in {script}: {exc}") from None


@dataclass
class SimConfig:
    """Options of the simulator daemon (the ``karoo sim`` command line)."""

    cbf_spead: str = "udp://127.0.0.1:7148"
    cbf_name: str = "cbf_baseline_correlation_products"
    antennas: int = 4
    channels: int = 4096
    dump_period: float = 0.5
    substreams: int = 0
    script: str = "default"
    start: bool = False
    band: str = "l"
    start_time: float = DEFAULT_START_TIME
    capture_block_id: str = ""
    seed: int = 0
    snr: float = 0.0
    rfi: float = 1.0
    heap_loss: float = 0.0
    heap_loss_burst: float = 0.0
    clock_ratio: float = 1.0
    max_dumps: int = 0
    byteorder: str = ">"
    truth_dir: str = ""

    def __post_init__(self) -> None:
        if not self.cbf_name.endswith(_BCP_SUFFIX) or self.cbf_name == _BCP_SUFFIX[1:]:
            raise ValueError(f"--cbf-name must be <instrument>{_BCP_SUFFIX}, "
                             f"not {self.cbf_name!r}")
        if not 1 <= self.antennas <= 64:
            raise ValueError("--antennas must be 1..64 (MeerKAT's layout)")
        if self.band not in ("l", "u"):
            raise ValueError("--band must be l or u")
        if self.byteorder not in ("<", ">"):
            raise ValueError("--byteorder must be < or >")
        if self.clock_ratio < 0 or self.rfi < 0 or self.max_dumps < 0:
            raise ValueError("--clock-ratio, --rfi and --max-dumps must be >= 0")
        parse_transport(self.cbf_spead)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "SimConfig":
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})

    def make_simulator(self) -> Simulator:
        """The `Simulator` these options describe."""
        instrument = self.cbf_name[: -len(_BCP_SUFFIX)]
        n_sub = self.substreams
        if n_sub <= 0:  # katcbfsim's rule: 16, doubled until >= 4 antennas
            n_sub = 16
            while n_sub < 4 * self.antennas and self.channels % (2 * n_sub) == 0:
                n_sub *= 2
        config = CorrelatorConfig(
            n_chans=self.channels, band=L_BAND if self.band == "l" else UHF_BAND,
            int_time=self.dump_period, n_substreams=n_sub, instrument=instrument,
        )
        sim = Simulator.create(
            self.antennas, self.channels, load_script(self.script), self.start_time,
            config=config, rfi=None, seed=self.seed,
            noise=NoiseModel(snr=self.snr or None),
            heap_loss=HeapLossModel(random_rate=self.heap_loss, burst_rate=self.heap_loss_burst,
                                    seed=self.seed),
        )
        if self.rfi > 0:
            sim.rfi = RfiModel.random(sim.array, sim.config.channel_freqs, sim.n_dumps,
                                      seed=self.seed, power_scale=self.rfi)
        return sim


class _Recorder:
    """Collects what `Simulator.write_telstate` writes, for the asyncio telstate."""

    def __init__(self) -> None:
        self.attributes: list[tuple[str, object]] = []
        self.samples: list[tuple[str, object, float]] = []

    def add(self, key, value, ts=None, immutable=False) -> None:
        if immutable:
            self.attributes.append((key, value))
        else:
            self.samples.append((key, value, time.time() if ts is None else ts))


class SimService(Service):
    """The simulated correlator daemon (see the module docstring).

    Parameters
    ----------
    host, port, telstate, name
        As for every `karoo.service.Service`.
    config
        Options.
    simulator
        Use this `Simulator` instead of the one `config` describes (tests may build their
        own); its CBF stream name must still be ``config.cbf_name``.
    """

    VERSION = "karoo-sim-1.0"

    def __init__(self, host: str, port: int, *, telstate, name: str, config: SimConfig,
                 simulator: Simulator | None = None) -> None:
        super().__init__(host, port, telstate=telstate, name=name)
        self.config = config
        self.simulator = simulator if simulator is not None else config.make_simulator()
        if self.simulator.config.bcp_stream != config.cbf_name:
            raise ValueError(f"simulator stream {self.simulator.config.bcp_stream} is not "
                             f"{config.cbf_name}")
        self.next_dump = 0
        self.sender: CBFSender | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._capture_blocks_written: set[str] = set()
        n = self.simulator.n_dumps
        self.end_dump = min(n, config.max_dumps) if config.max_dumps else n
        self._heaps = self.add_counter("output-heaps-total", "CBF heaps sent")
        self._bytes = self.add_counter("output-bytes-total", "CBF payload bytes sent", "B")
        self._dumps = self.add_counter("output-dumps-total", "CBF dumps sent")
        self._lost = self.add_counter("lost-heaps-total", "heaps dropped on purpose (heap loss)")
        self._next = self.add_gauge("next-dump", "index of the next dump to send", type_=int)
        self.add_gauge("end-dump", "index after the last dump of the script", type_=int,
                    default=self.end_dump)
        self._transmitting = Sensor(bool, "transmitting", "whether dumps are being sent",
                                    default=False, initial_status=Sensor.Status.NOMINAL)
        self.sensors.add(self._transmitting)


    @property
    def params(self) -> CBFStreamParams:
        cfg = self.simulator.config
        return CBFStreamParams(cfg.n_chans, cfg.n_chans_per_substream,
                               self.simulator.model.products.n_bls, cfg.ticks_per_dump)

    async def start(self) -> None:
        await self.write_metadata()
        if self.config.truth_dir:
            await asyncio.to_thread(self.write_truth, self.config.truth_dir)
        await super().start()
        if self.config.start:
            await self.capture_start()

    async def write_metadata(self) -> None:
        """CBF attributes and CAM sensors of the whole script, to telstate."""
        rec = _Recorder()
        cbid = self.config.capture_block_id
        self.simulator.write_telstate(rec, cbid or None, capture_block=bool(cbid))
        if cbid:
            self._capture_blocks_written.add(cbid)
        await self._write_recorded(rec)

    async def write_capture_block(self, capture_block_id: str) -> None:
        """The capture block's ``<cbid>_obs_*`` sensors, once per capture block (CAM's job)."""
        if capture_block_id in self._capture_blocks_written:
            return
        rec = _Recorder()
        self.simulator.write_capture_block(rec, capture_block_id)
        await self._write_recorded(rec)
        self._capture_blocks_written.add(capture_block_id)

    async def _write_recorded(self, rec: "_Recorder") -> None:
        for key, value in rec.attributes:
            try:
                await self.telstate.add(key, value, immutable=True)
            except ImmutableKeyError as exc:
                logger.warning("%s: %s", self.name, exc)
        await self.telstate.add_many(rec.samples)
        logger.info("%s: wrote %d CBF/CAM attributes and %d sensor samples", self.name,
                    len(rec.attributes), len(rec.samples))

    def write_truth(self, directory: str) -> None:
        """``truth.npz`` (gains at every dump, delays, bandpasses) and ``rfi_mask.npz``."""
        os.makedirs(directory, exist_ok=True)
        self.simulator.write_truth(os.path.join(directory, "truth.npz"))
        if isinstance(self.simulator.rfi, RfiModel):
            self.simulator.write_rfi_mask(os.path.join(directory, "rfi_mask.npz"))
        np.savez_compressed(os.path.join(directory, "lost_heaps.npz"), lost=self.simulator.lost)

    # -- sending

    async def capture_start(self) -> None:
        """Start (or resume) sending."""
        if self._task is not None and not self._task.done():
            raise FailReply("already sending; capture-stop first")
        self._task = None
        if self.next_dump >= self.end_dump:
            raise FailReply(f"the script is over (all {self.end_dump} dumps sent)")
        # The controller names the capture block in telstate before it starts the sim.
        cbid = await self.telstate.get("sdp_capture_block_id")
        if cbid:
            await self.write_capture_block(cbid)
        cfg = self.config
        rate = 0.0
        if cfg.clock_ratio:
            rate = self.params.heap_bytes * self.params.n_substreams \
                / self.simulator.config.dump_period * cfg.clock_ratio * 1.1
        try:
            self.sender = await CBFSender.create(cfg.cbf_spead, self.params,
                                                 byteorder=cfg.byteorder, rate=rate)
        except (OSError, ValueError) as exc:
            raise FailReply(f"cannot send to {cfg.cbf_spead}: {exc}") from None
        await self.sender.start()
        self._stopping = False
        self._transmitting.value = True
        self._task = asyncio.create_task(self._send_loop())

    async def capture_stop(self) -> None:
        """Stop sending after the current dump; send the stop heaps."""
        if self._task is None or self._task.done():
            # Already stopped (the script may have ended): what was asked is true.
            self._task = None
            logger.info("%s: capture-stop while not sending", self.name)
            return
        self._stopping = True
        try:
            await self._task
        finally:
            self._task = None

    async def _send_loop(self) -> None:
        sim = self.simulator
        period = sim.config.dump_period / self.config.clock_ratio if self.config.clock_ratio \
            else 0.0
        buffer = np.empty((sim.config.n_chans, self.params.n_bls, 2), np.int32)
        t0 = time.monotonic()
        first = self.next_dump
        try:
            while not self._stopping and self.next_dump < self.end_dump:
                index = self.next_dump
                dump = await asyncio.to_thread(sim.dump, index, buffer)
                keep = [s for s in range(self.params.n_substreams) if not dump.lost[s]]
                if period:
                    await asyncio.sleep(max(0.0, t0 + (index - first) * period
                                            - time.monotonic()))
                await self.sender.send_dump(dump.data, dump.timestamp, substreams=keep)
                self.next_dump = index + 1
                self._next.value = self.next_dump
                self._dumps.value += 1
                self._heaps.value = self.sender.heaps_sent
                self._bytes.value = self.sender.bytes_sent
                self._lost.value += self.params.n_substreams - len(keep)
            await self.sender.stop()
            if self.next_dump >= self.end_dump:
                logger.info("%s: script finished after %d dumps", self.name, self.next_dump)
        except Exception:
            logger.exception("%s: sending failed", self.name)
            raise
        finally:
            self._transmitting.value = False

    async def wait_finished(self) -> None:
        """Wait until the current sending run ends (script over or capture-stop)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def request_capture_start(self, ctx, stream: Optional[str] = None) -> None:  # noqa: UP045
        """Start sending the CBF stream (capture-start [stream])."""
        self._check_stream(stream)
        await self.capture_start()

    async def request_capture_stop(self, ctx, stream: Optional[str] = None) -> None:  # noqa: UP045
        """Stop sending the CBF stream (capture-stop [stream]); replies after the stop heaps."""
        self._check_stream(stream)
        await self.capture_stop()

    def _check_stream(self, stream: str | None) -> None:
        if stream is not None and stream != self.config.cbf_name:
            raise FailReply(f"unknown stream {stream!r} (this simulator sends "
                            f"{self.config.cbf_name})")

    async def on_stop(self) -> None:
        if self._task is not None and not self._task.done():
            await self.capture_stop()
        await super().on_stop()


# -- command line -------------------------------------------------------------------------------


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "sim", help="simulated correlator: CBF SPEAD stream plus telstate metadata",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = SimConfig()
    g = parser.add_argument_group("correlator")
    g.add_argument("--cbf-spead", default=d.cbf_spead, metavar="TRANSPORT",
                   help="destinations (udp://a.b.c.d+N:port, tcp://, inproc://) [%(default)s]")
    g.add_argument("--cbf-name", default=d.cbf_name, help="CBF stream name [%(default)s]")
    g.add_argument("--antennas", type=int, default=d.antennas, help="[%(default)s]")
    g.add_argument("--channels", type=int, default=d.channels, help="[%(default)s]")
    g.add_argument("--dump-period", type=float, default=d.dump_period,
                   help="requested dump period, quantised as a correlator does [%(default)s s]")
    g.add_argument("--substreams", type=int, default=d.substreams,
                   help="heaps per dump; 0: 16 doubled until >= 4 x antennas [%(default)s]")
    g.add_argument("--band", choices=("l", "u"), default=d.band, help="[%(default)s]")
    g.add_argument("--byteorder", choices=("<", ">"), default=d.byteorder,
                   help="xeng_raw byte order on the wire [%(default)s]")
    g = parser.add_argument_group("observation")
    g.add_argument("--script", default=d.script,
                   help=f"built-in script ({', '.join(SCRIPTS)}) or JSON file [%(default)s]")
    g.add_argument("--start-time", type=float, default=d.start_time,
                   help="UNIX time of the start of the script [%(default)s]")
    g.add_argument("--capture-block-id", default="",
                   help="prefix of the capture-block sensors (default: the start time)")
    g.add_argument("--start", action="store_true", help="start sending immediately")
    g.add_argument("--clock-ratio", type=float, default=d.clock_ratio,
                   help="speed relative to real time; 0 for as fast as possible [%(default)s]")
    g.add_argument("--max-dumps", type=int, default=0, help="stop after this many dumps")
    g = parser.add_argument_group("truth")
    g.add_argument("--seed", type=int, default=d.seed, help="[%(default)s]")
    g.add_argument("--snr", type=float, default=0.0,
                   help="SNR of the brightest source per channel and dump; 0: radiometer noise")
    g.add_argument("--rfi", type=float, default=d.rfi,
                   help="RFI power scale; 0 for none [%(default)s]")
    g.add_argument("--heap-loss", type=float, default=0.0,
                   help="probability that any heap is dropped")
    g.add_argument("--heap-loss-burst", type=float, default=0.0,
                   help="probability per dump that a burst of heaps is dropped")
    g.add_argument("--truth-dir", default="",
                   help="write truth.npz (gains, delays, bandpasses), rfi_mask.npz and "
                   "lost_heaps.npz here")
    add_service_arguments(parser, "sim.cbf.1")
    set_service_factory(parser, _make)


def _make(telstate, args: argparse.Namespace) -> SimService:
    try:
        config = SimConfig.from_args(args)
    except ValueError as exc:
        raise SystemExit(f"karoo sim: {exc}") from None
    return SimService(args.host, args.port, telstate=telstate, name=args.name, config=config)
