"""``karoo cal``: the calibration daemon.

Receives L0 (this server's channels), buffers dumps (``--buffer-dumps`` slots; the receiver waits
when they are all in use, as katsdpcal's accumulator does), cuts batches from ``obs_activity`` and
the target's tags (:class:`karoo.cal.pipeline.BatchCutter`), and runs each batch through
:class:`karoo.cal.pipeline.CalPipeline` in a worker thread: SumThreshold flagging, then K, B, G
and KCROSS. Solutions go to telstate under katsdpcal's names (``<cbid>_<cal>_product_K`` ...),
the flags (``cal_rfi`` added) go out on the flags stream (``--flags-spead``), and a report is
written per capture block. ``capture-done`` replies once all of that is done.

Several servers (``--servers N --server-id K``, 1-based) split the band; the window owner
publishes shared results under immutable ``<cbid>_<cal>_shared_solve_<seq>`` keys.
"""

# No `from __future__ import annotations`: aiokatcp reads request annotations as real types.
import argparse
import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiokatcp import DeviceStatus, FailReply, Sensor

from ..service import Service, add_service_arguments, set_service_factory
from ..spead.l0 import FLAGS_ITEMS, L0Receiver, L0Sender
from ..telstate.errors import ImmutableKeyError
from .flagger import SumThresholdFlagger
from .pipeline import (
    Batch,
    BatchCutter,
    CalParams,
    CalPipeline,
    CorrLayout,
    DumpInfo,
    LocalShared,
    ScanSummary,
    default_window,
)
from .report import ReportData, write_report

logger = logging.getLogger(__name__)

#: L0 keys cal needs (under the L0 stream's prefix).
L0_KEYS = ("n_chans", "n_chans_per_substream", "bls_ordering", "int_time", "sync_time",
           "center_freq", "bandwidth")


def _parse_window(text: Any) -> tuple[int, int] | None:
    if text in (None, ""):
        return None
    if isinstance(text, (list, tuple)):
        lo, hi = text
    else:
        lo, hi = str(text).split(",")
    return int(lo), int(hi)


@dataclass
class CalConfig:
    """Configuration of one cal server.

    Attributes
    ----------
    l0_spead : str
        L0 transport(s) to receive this server's channels from.
    l0_name : str
        L0 stream name (telstate prefix of its metadata).
    flags_spead : str
        Transport of the flags stream; empty: no flags are sent.
    flags_name : str
        Flags stream name (its telstate metadata is written under it).
    servers, server_id : int
        Band split: this is server `server_id` (1-based) of `servers`.
    report_path : str
        Directory for the reports.
    buffer_dumps : int
        Buffer slots (dumps); a batch holds at most half of them.
    cal_name : str
        Name of the cal products (telstate prefix ``<cbid>_<cal_name>_``).
    k_window, g_window : (int, int), optional
        Global channel ranges of the K and G windows (default: :func:`default_window`).
    shared_timeout : float
        Seconds to wait for another server's shared result.
    done_timeout : float
        Seconds capture-done waits for the end of the L0 stream before stopping the receiver.
    """

    l0_spead: str
    l0_name: str = "sdp_l0"
    flags_spead: str = ""
    flags_name: str = "sdp_l0_cal_flags"
    servers: int = 1
    server_id: int = 1
    report_path: str = "."
    buffer_dumps: int = 256
    cal_name: str = "cal"
    k_window: tuple[int, int] | None = None
    g_window: tuple[int, int] | None = None
    shared_timeout: float = 60.0
    done_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not 1 <= self.server_id <= self.servers:
            raise ValueError(f"server_id must be in 1..{self.servers}, not {self.server_id}")
        if self.buffer_dumps < 2:
            raise ValueError("buffer_dumps must be at least 2")
        self.k_window = _parse_window(self.k_window)
        self.g_window = _parse_window(self.g_window)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "CalConfig":
        return cls(
            l0_spead=args.l0_spead, l0_name=args.l0_name, flags_spead=args.flags_spead,
            flags_name=args.flags_name, servers=args.servers, server_id=args.server_id,
            report_path=args.report_path, buffer_dumps=args.buffer_dumps,
            cal_name=args.cal_name, k_window=args.k_window, g_window=args.g_window,
            shared_timeout=args.shared_timeout,
        )


class TelstateShared:
    """Cross-server agreement through immutable telstate keys, called from the pipeline thread.

    The owner stores ``("soln", value)`` or ``("error", message)`` under
    ``shared_solve_<seq>``; the others wait for the key. Immutable keys make the hand-over
    atomic: a value is either absent or complete.
    """

    def __init__(self, telstate, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.telstate = telstate
        self.loop = loop
        self.timeout = timeout
        self.seq = 0

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def solve(self, owner: bool, compute):
        key = f"shared_solve_{self.seq}"
        self.seq += 1
        if owner:
            try:
                value = compute()
            except Exception as exc:
                self._run(self.telstate.set(key, ("error", repr(exc))))
                raise
            self._run(self.telstate.set(key, ("soln", value)))
            return value
        self._run(self.telstate.wait_key(key, timeout=self.timeout))
        kind, value = self._run(self.telstate.get(key))
        if kind != "soln":
            raise RuntimeError(f"the owning cal server failed: {value}")
        return value


class _Capture:
    """State of one capture block."""

    def __init__(self, cbid: str) -> None:
        self.cbid = cbid
        self.receiver: L0Receiver | None = None
        self.flags_sender: L0Sender | None = None
        self.cutter: BatchCutter | None = None
        self.pending: list[tuple[DumpInfo, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.queue: asyncio.Queue = asyncio.Queue()
        self.recv_task: asyncio.Task | None = None
        self.pipe_task: asyncio.Task | None = None
        self.pipeline: CalPipeline | None = None
        self.scans: list[ScanSummary] = []
        self.problems: list[str] = []
        self.dumps = 0
        self.measured_flux: dict[str, tuple[float, float]] = {}


class CalService(Service):
    """The calibration daemon (see the module docstring).

    Parameters
    ----------
    host, port, telstate, name
        As for `karoo.service.Service`.
    config : CalConfig
    """

    VERSION = "karoo-cal-1.0"

    def __init__(self, host: str, port: int, *, telstate, name: str, config: CalConfig) -> None:
        super().__init__(host, port, telstate=telstate, name=name)
        self.config = config
        self._capture: _Capture | None = None
        self._slots = asyncio.Semaphore(config.buffer_dumps)
        self._refant_name: str | None = None  # kept across capture blocks
        c = self.add_counter
        g = self.add_gauge
        self._s_dumps = c("input-dumps-total", "L0 dumps received")
        self._s_heaps = c("input-heaps-total", "L0 heaps received")
        self._s_missing = c("input-missing-heaps-total",
                            "L0 heaps missing from received dumps (flagged data_lost)")
        self._s_rejected = c("input-rejected-heaps-total", "L0 heaps rejected as malformed")
        self._s_slots = g("slots", "buffer slots (dumps)", type_=int, default=config.buffer_dumps)
        self._s_free = g("free-slots", "free buffer slots", type_=int,
                         default=config.buffer_dumps,
                         status_func=lambda v: Sensor.Status.WARN if v == 0
                         else Sensor.Status.NOMINAL)
        self._s_acc_slots = g("accumulator-slots", "dumps in the batch being accumulated",
                              type_=int)
        self._s_pipe_slots = g("pipeline-slots", "dumps waiting for or in the pipeline",
                               type_=int)
        self._s_batches = c("accumulator-batches", "batches handed to the pipeline")
        self._s_observations = c("accumulator-observations", "capture blocks received")
        self._s_processed = c("pipeline-batches", "batches processed by the pipeline")
        self._s_exceptions = c("pipeline-exceptions", "batches whose processing failed")
        self._s_last_time = g("pipeline-last-time", "processing time of the last batch", "s")
        self._s_last_slots = g("pipeline-last-slots", "dumps in the last batch", type_=int)
        self._s_active = g("pipeline-active", "whether a batch is being processed", type_=bool,
                           default=False)
        self._s_solution_time = g("pipeline-last-solution-time",
                                  "timestamp of the latest solution written", "s")
        self._s_refant = g("pipeline-reference-antenna", "reference antenna", type_=str,
                           default="")
        self._s_frac = {
            (when, kind): g(f"pipeline-{when}-flag-fraction-{kind}",
                            f"flagged fraction of {kind} calibrator data {when} cal flagging")
            for when in ("start", "final") for kind in ("auto-pol", "cross-pol")
        }
        self._s_out_heaps = c("output-heaps-total", "flags-stream heaps sent")
        self._s_out_bytes = c("output-bytes-total", "flags-stream bytes sent", "B")
        self._s_reports = c("reports-written", "calibration reports written")
        self._s_report_path = g("report-last-path", "directory of the last report", type_=str,
                                default="")
        self._s_report_time = g("report-last-time", "when the last report was written", "s")

    # -- telstate helpers

    @property
    def _cal(self):
        return self.telstate.view(self.config.cal_name)

    async def _l0_metadata(self) -> dict[str, Any]:
        view = self.telstate.view(self.config.l0_name)
        values = await view.get_many(L0_KEYS)
        missing = [k for k in L0_KEYS if values.get(k) is None]
        if missing:
            raise FailReply(f"telstate lacks {self.config.l0_name}_{', _'.join(missing)}")
        return values

    async def _set_once(self, view, key: str, value: Any) -> None:
        """Set an immutable key unless a server already has (band-split servers share them)."""
        try:
            await view.set(key, value)
        except ImmutableKeyError:
            if await view.get(key) != value:
                logger.warning("telstate %s differs between cal servers", key)

    async def _write_static(self, meta, layout: CorrLayout, params: CalParams) -> None:
        cal = self._cal
        static = {
            "antlist": layout.antlist,
            "pol_ordering": layout.pols,
            "bls_ordering": layout.bls_ordering,
            "product_B_parts": self.config.servers,
            "stream_type": "sdp.cal",
            "center_freq": float(meta["center_freq"]),
            "bandwidth": float(meta["bandwidth"]),
            "n_chans": int(meta["n_chans"]),
            "src_streams": [self.config.l0_name],
            "param_k_bchan": params.k_window[0],
            "param_k_echan": params.k_window[1],
            "param_g_bchan": params.g_window[0],
            "param_g_echan": params.g_window[1],
            "param_rfi_calib_nsigma": params.flagger.outlier_nsigma,
            "param_servers": self.config.servers,
        }
        for key, value in static.items():
            await self._set_once(cal, key, value)
        if self.config.flags_spead:
            flags = self.telstate.view(self.config.flags_name)
            for key, value in {
                "stream_type": "sdp.flags",
                "src_streams": [self.config.l0_name],
                "n_chans": int(meta["n_chans"]),
                "n_chans_per_substream": int(meta["n_chans"]) // self.config.servers,
                "n_bls": len(meta["bls_ordering"]),
                "bls_ordering": meta["bls_ordering"],
                "int_time": float(meta["int_time"]),
                "sync_time": float(meta["sync_time"]),
                "center_freq": float(meta["center_freq"]),
                "bandwidth": float(meta["bandwidth"]),
            }.items():
                await self._set_once(flags, key, value)

    async def _sensor_at(self, key: str, t: float) -> tuple[Any, float]:
        samples = await self.telstate.get_range(key, st=t, include_previous=True)
        if not samples or samples[0][1] > t:
            return "unknown", 0.0
        return samples[0]

    # -- capture cycle

    async def _prepare(self) -> tuple[dict[str, Any], CorrLayout, CalParams]:
        """The L0 metadata and what follows from it: product layout and solver parameters."""
        cfg = self.config
        meta = await self._l0_metadata()
        n_chans = int(meta["n_chans"])
        if n_chans % cfg.servers:
            raise FailReply(f"{n_chans} channels do not split over {cfg.servers} servers")
        per = n_chans // cfg.servers
        chan_range = ((cfg.server_id - 1) * per, cfg.server_id * per)
        try:
            layout = CorrLayout.from_bls_ordering(meta["bls_ordering"])
        except ValueError as exc:
            raise FailReply(f"unusable {cfg.l0_name}_bls_ordering: {exc}") from exc
        freqs = float(meta["center_freq"]) + (np.arange(n_chans) - n_chans // 2) * (
            float(meta["bandwidth"]) / n_chans)
        k_window = cfg.k_window or default_window(n_chans, cfg.servers)
        g_window = cfg.g_window or k_window
        for w in (k_window, g_window):
            if not any(s * per <= w[0] < w[1] <= (s + 1) * per for s in range(cfg.servers)):
                raise FailReply(f"window {w} does not lie inside one server's channels")
        params = CalParams(
            freqs=freqs, channel_range=chan_range, k_window=k_window, g_window=g_window,
            dump_period=float(meta["int_time"]), server_index=cfg.server_id - 1,
            flagger=SumThresholdFlagger.meerkat(float(meta["bandwidth"]) / n_chans,
                                                float(meta["int_time"])),
        )
        return meta, layout, params

    async def start(self) -> None:
        # The cal and flags stream keys go to telstate at start-up when ingest's L0 metadata
        # is already there (katsdpcal's order): the flag writer reads them at its capture-init.
        try:
            await self._write_static(*await self._prepare())
        except FailReply as exc:
            logger.info("%s: stream metadata deferred to capture-init (%s)", self.name, exc)
        await super().start()

    async def capture_init(self, capture_block_id: str) -> None:
        cfg = self.config
        meta, layout, params = await self._prepare()
        n_chans = int(meta["n_chans"])
        chan_range = params.channel_range
        cap = _Capture(capture_block_id)
        cb_cal = self.telstate.view(f"{capture_block_id}_{cfg.cal_name}")
        shared = TelstateShared(cb_cal, asyncio.get_running_loop(), cfg.shared_timeout) \
            if cfg.servers > 1 else LocalShared()
        refant = layout.antlist.index(self._refant_name) \
            if self._refant_name in layout.antlist else None
        cap.pipeline = CalPipeline(params, layout, shared, refant=refant)
        cap.cutter = BatchCutter(max(1, cfg.buffer_dumps // 2))
        try:
            cap.receiver = L0Receiver(
                cfg.l0_spead, n_chans, len(meta["bls_ordering"]),
                int(meta["n_chans_per_substream"]), channel_range=chan_range,
            )
            if cfg.flags_spead:
                cap.flags_sender = await L0Sender.create(
                    cfg.flags_spead, chan_range, n_chans, len(meta["bls_ordering"]),
                    items=FLAGS_ITEMS)
                await cap.flags_sender.start()
        except (OSError, ValueError) as exc:
            raise FailReply(f"cannot open the streams: {exc}") from exc
        await self._write_static(meta, layout, params)
        self._meta = meta
        self._capture = cap
        self._s_observations.value += 1
        cap.recv_task = asyncio.create_task(self._receive(cap))
        cap.pipe_task = asyncio.create_task(self._run_pipeline(cap))

    async def capture_done(self, capture_block_id: str) -> None:
        cap = self._capture
        if cap is None or cap.cbid != capture_block_id:
            return
        try:
            await asyncio.wait_for(asyncio.shield(cap.recv_task), self.config.done_timeout)
        except TimeoutError:
            cap.receiver.stop()
            await cap.recv_task
        await cap.queue.put(None)
        await cap.pipe_task
        if cap.flags_sender is not None:
            await cap.flags_sender.stop()
        await self._write_flux(cap)
        await self._write_report(cap)
        self._capture = None

    # -- receive and batch

    async def _receive(self, cap: _Capture) -> None:
        meta = self._meta
        sync_time = float(meta["sync_time"])
        layout = cap.pipeline.layout
        cbid = cap.cbid
        try:
            async for dump in cap.receiver:
                counters = dump.counters
                self._s_heaps.value = counters["heaps"]
                self._s_missing.value = counters["missing"]
                self._s_rejected.value = sum(counters[k] for k in (
                    "missing_items", "bad_shape", "bad_channel", "too_old", "duplicate"))
                if not dump.present.all():
                    self.set_device_status(DeviceStatus.DEGRADED, "L0 heaps missing")
                t = sync_time + dump.timestamp
                activity, activity_time = await self._sensor_at(f"{cbid}_obs_activity", t)
                target, _ = await self._sensor_at("cbf_target", t)
                info = DumpInfo(dump.dump_index, t, str(activity), float(activity_time),
                                str(target) if target != "unknown" else "")
                weights = dump.weights.astype(np.float32) * dump.weights_channel[:, None]
                vis, flags, w = layout.gather(dump.vis, dump.flags, weights)
                await self._slots.acquire()
                self._s_free.value -= 1
                batch = cap.cutter.add(info)
                if batch is not None:
                    await self._hand_over(cap, len(batch))
                cap.pending.append((info, vis, flags, w, dump.flags))
                cap.dumps += 1
                self._s_dumps.value += 1
                self._s_acc_slots.value = len(cap.pending)
        except Exception as exc:  # never die on what a peer sends
            logger.exception("L0 receive failed")
            cap.problems.append(f"receive failed: {exc!r}")
            self.set_device_status(DeviceStatus.DEGRADED, f"receive failed: {exc}")
        rest = cap.cutter.flush()
        if rest:
            await self._hand_over(cap, len(rest))

    async def _hand_over(self, cap: _Capture, n: int) -> None:
        items, cap.pending = cap.pending[:n], cap.pending[n:]
        self._s_acc_slots.value = len(cap.pending)
        self._s_pipe_slots.value += len(items)
        self._s_batches.value += 1
        await cap.queue.put(items)

    # -- process

    async def _run_pipeline(self, cap: _Capture) -> None:
        while True:
            items = await cap.queue.get()
            if items is None:
                return
            try:
                await self._process(cap, items)
            except Exception as exc:
                logger.exception("batch processing failed")
                self._s_exceptions.value += 1
                cap.problems.append(f"batch processing failed: {exc!r}")
                self.set_device_status(DeviceStatus.DEGRADED, f"pipeline exception: {exc}")
            finally:
                for _ in items:
                    self._slots.release()
                self._s_free.value += len(items)
                self._s_pipe_slots.value -= len(items)

    async def _process(self, cap: _Capture, items) -> None:
        infos = [it[0] for it in items]
        batch = Batch(infos, np.stack([it[1] for it in items]), np.stack([it[2] for it in items]),
                      np.stack([it[3] for it in items]))
        start = time.monotonic()
        self._s_active.value = True
        try:
            result = await asyncio.to_thread(cap.pipeline.process_batch, batch)
        finally:
            self._s_active.value = False
            # The flags go out whatever happened, so the flag writer sees every dump.
            await self._send_flags(cap, items, batch)
        self._s_last_time.value = time.monotonic() - start
        self._s_last_slots.value = len(items)
        self._s_processed.value += 1
        cb_cal = f"{cap.cbid}_{self.config.cal_name}_"
        for key, value, ts in result.products:
            await self.telstate.add(cb_cal + key, value, ts=ts)
            if key.startswith("product_"):
                self._s_solution_time.value = max(self._s_solution_time.value, ts)
        pipeline = cap.pipeline
        if pipeline.refant is not None and pipeline.refant >= 0:
            self._refant_name = pipeline.layout.antlist[pipeline.refant]
            self._s_refant.value = self._refant_name
        cap.scans.extend(result.scans)
        cal_scans = [s for s in result.scans if s.flag_fraction_before is not None]
        if cal_scans:
            for when, attr in (("start", "flag_fraction_before"), ("final", "flag_fraction_after")):
                for kind in ("auto-pol", "cross-pol"):
                    self._s_frac[when, kind].value = float(np.mean(
                        [getattr(s, attr)[kind] for s in cal_scans]))

    async def _send_flags(self, cap: _Capture, items, batch: Batch) -> None:
        if cap.flags_sender is None:
            return
        sync_time = float(self._meta["sync_time"])
        layout = cap.pipeline.layout
        for i, it in enumerate(items):
            out = layout.scatter_flags(batch.flags[i], it[4])
            await cap.flags_sender.send_flags(out, it[0].time - sync_time, it[0].index)
        self._s_out_heaps.value = cap.flags_sender.heaps_sent
        self._s_out_bytes.value = cap.flags_sender.bytes_sent

    async def _write_flux(self, cap: _Capture) -> None:
        """Measure the gain calibrators' flux against G_FLUX and write ``measured_flux`` and
        ``measured_flux_std`` (immutable dicts, Jy). Every server holds the same G and G_FLUX
        (the G window owner solved them for all), so they agree; the owner writes."""
        pipeline = cap.pipeline
        try:
            flux, std = await asyncio.to_thread(pipeline.measure_flux)
        except Exception as exc:
            logger.exception("flux measurement failed")
            cap.problems.append(f"flux measurement failed: {exc!r}")
            return
        cap.measured_flux = {name: (flux[name], std[name]) for name in flux}
        if not flux or not pipeline.params.owns(pipeline.params.g_window):
            return
        cb_cal = self.telstate.view(f"{cap.cbid}_{self.config.cal_name}")
        await self._set_once(cb_cal, "measured_flux", flux)
        await self._set_once(cb_cal, "measured_flux_std", std)
        logger.info("%s: measured flux %s", self.name,
                    ", ".join(f"{n} {flux[n]:.4g} ± {std[n]:.2g} Jy" for n in flux))

    # -- report

    async def _write_report(self, cap: _Capture) -> None:
        cfg = self.config
        pipeline = cap.pipeline
        layout = pipeline.layout
        problems = list(cap.problems)
        if cap.dumps == 0:
            problems.append("no L0 data were received")
        obs_params = await self.telstate.get(f"{cap.cbid}_obs_params", {}) or {}
        refant = pipeline.refant
        data = ReportData(
            capture_block_id=cap.cbid, l0_name=cfg.l0_name, cal_name=cfg.cal_name,
            server_id=cfg.server_id, antlist=layout.antlist, pols=layout.pols,
            freqs=pipeline.params.local_freqs, int_time=float(self._meta["int_time"]),
            refant=layout.antlist[refant] if refant is not None and refant >= 0 else None,
            scans=cap.scans, history=pipeline.history, measured_flux=cap.measured_flux,
            obs_params=obs_params if isinstance(obs_params, dict) else {}, problems=problems,
        )
        path = await asyncio.to_thread(write_report, data, cfg.report_path)
        self._s_reports.value += 1
        self._s_report_path.value = str(path)
        self._s_report_time.value = time.time()
        logger.info("%s: report written to %s", self.name, path)


# -- command line -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``karoo cal`` options."""
    parser.add_argument("--l0-spead", required=True,
                        help="L0 transport(s) carrying this server's channels")
    parser.add_argument("--l0-name", default="sdp_l0", help="L0 stream name [%(default)s]")
    parser.add_argument("--flags-spead", default="",
                        help="transport of the flags stream (empty: none) [%(default)s]")
    parser.add_argument("--flags-name", default="sdp_l0_cal_flags",
                        help="flags stream name [%(default)s]")
    parser.add_argument("--servers", type=int, default=1, help="cal servers [%(default)s]")
    parser.add_argument("--server-id", type=int, default=1,
                        help="this server (1-based) [%(default)s]")
    parser.add_argument("--report-path", default=".", help="report directory [%(default)s]")
    parser.add_argument("--buffer-dumps", type=int, default=256,
                        help="buffer slots in dumps; a batch holds at most half [%(default)s]")
    parser.add_argument("--cal-name", default="cal", help="cal products name [%(default)s]")
    parser.add_argument("--k-window", default=None,
                        help="K window as 'first,stop' global channels [auto]")
    parser.add_argument("--g-window", default=None,
                        help="G window (and bandpass normalisation) 'first,stop' [the K window]")
    parser.add_argument("--shared-timeout", type=float, default=60.0,
                        help="seconds to wait for another server's result [%(default)s]")


def add_commands(subparsers) -> None:
    """Register ``karoo cal``."""
    parser = subparsers.add_parser("cal", help="calibration daemon",
                                   description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    add_service_arguments(parser, "cal")

    def make(telstate, args):
        return CalService(args.host, args.port, telstate=telstate, name=args.name,
                          config=CalConfig.from_args(args))

    set_service_factory(parser, make)
