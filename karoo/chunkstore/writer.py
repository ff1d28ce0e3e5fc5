"""The vis writer daemon (``karoo vis-writer``), also the flag writer (``karoo flag-writer``).

One class serves both: the vis writer stores the four arrays of an L0 stream
(``correlator_data``, ``flags``, ``weights``, ``weights_channel``); the flag writer stores the
``flags`` of a flags-only L0 stream (cal's ``sdp_l0_cal_flags``). Everything else is shared.

Data path
---------
``capture-init <cbid>`` reads the stream's shape from telstate (``<stream>_n_chans``,
``_n_bls``, optionally ``_n_chans_per_substream``), creates the capture-block stream in the
chunk store (:meth:`ChunkStore.create_stream`, chunks of ``--obj-size-mb``) and opens a spead2
receiver on ``--l0-spead``, which takes heaps from every ingest (or cal) instance. Each heap
(one dump of one channel range) is copied straight into the chunk buffers it overlaps; a chunk
is handed to the store as soon as every heap it covers has arrived, or, when heaps are missing,
once every substream has moved past it (or the newest dump is ``max_lag_dumps`` beyond it).
Missing parts keep the fill values, so they read back with the ``data_lost`` flag.

Writes run as asyncio tasks, at most ``--workers`` at once, so that many chunks are in flight
(what makes Zarr v3 and S3 fast). Every chunk buffer counts against ``--buffer-mb`` from its
first heap until its write ends. When a heap needs a new chunk buffer and the budget is spent,
the store is slower than the stream: the heap is dropped (``input-dropped-heaps-total``,
``dropped-dumps-total``), ``device-status`` turns ``degraded`` and the log says so; the dropped
part reads back as ``data_lost``. The receive loop never waits on the store, so nothing is lost
unaccounted in socket buffers.

With ``--shard-chunks DUMPS,CHANS`` the arrays are Zarr-sharded (one object per DUMPS x CHANS
chunks). The chunks of a shard are views of one shard buffer (pages are touched, and counted in
the budget, chunk by chunk as they open); finished chunks are held until all the shard's chunks
are, then the shard is written in one go (``output-shards-total``), with no read-modify-write.
When a row of shards is closed with some chunks never opened (heaps lost or dropped), the held
chunks are written one by one into the shard and the others read as their fill value. Since a
row of shards must be buffered, ``capture-init`` refuses a budget of fewer than two rows of
shards, and chunk time extents shrink to fit about four rows of shards.

Store failures are retried with exponential backoff by the store (``output-retries-total``). A
chunk that still fails is counted (``output-failed-chunks-total``), listed in telstate under
``<cbid>_<stream>_failed_chunks`` and leaves ``device-status`` at ``fail``. It reads back as its
fill value; and because a ``flags`` chunk is written only after the data chunks it covers, the
``data_lost`` bit is set in ``flags`` wherever a ``correlator_data``, ``weights`` or
``weights_channel`` chunk failed, so readers see the loss in the flags too.

``capture-done`` waits for the senders' stop heaps (or ``drain_timeout`` seconds without a
heap), writes every remaining chunk, sets the exact number of dumps, records
``<cbid>_<stream>_chunk_info`` (katdal's layout), ``<cbid>_<stream>_chunk_store_url`` and the
failed chunks in telstate, writes the completion marker, and only then replies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, fields

import numpy as np
import spead2
import spead2.recv
import spead2.recv.asyncio
from aiokatcp import DeviceStatus, FailReply, Sensor

from ..service import Service, add_service_arguments, set_service_factory
from ..spead.transport import Endpoint, add_readers
from .store import ARRAYS, DATA_LOST, ChunkStore, ChunkStoreError, StreamStore

logger = logging.getLogger(__name__)

VIS_ARRAYS = tuple(ARRAYS)
FLAG_WRITER_MAX_LAG = 256
FLAG_ARRAYS = ("flags",)
# Arrays whose failed chunks are marked data_lost in `flags` (written after them).
_DATA_ARRAYS = ("correlator_data", "weights", "weights_channel")


@dataclass
class VisWriterConfig:
    """Configuration of a vis or flag writer (the ``karoo vis-writer`` options).

    Attributes
    ----------
    l0_spead
        Transport(s) to receive the L0 (or flags) stream on (karoo.spead transport string).
    l0_name
        Name of the stream: telstate prefix of its keys and the stream name in the store.
    store
        Chunk store URL: a local directory or ``s3://[bucket/path]``.
    s3_endpoint_url
        S3 endpoint (else ``AWS_ENDPOINT_URL``); credentials come from the AWS environment.
    obj_size_mb
        Upper limit of a chunk (object) size, in MB.
    obj_max_dumps
        Upper limit of the time extent of a chunk.
    buffer_mb
        Memory budget of the chunk buffers (assembling, queued and being written), in MB.
    workers
        Chunk writes in flight at once.
    flags_only
        A flag writer: the stream carries only ``flags``.
    retries, backoff, max_backoff
        Retry policy of store requests (see :class:`karoo.chunkstore.store.RetryPolicy`).
    max_lag_dumps
        How far (in dumps) a substream may fall behind the newest dump before its late heaps
        are no longer waited for (chunks are otherwise written once every substream has
        passed them). Cal servers send their flags a batch at a time, hence the flag
        writer's larger default.
    drain_timeout
        At capture-done, seconds without a heap after which the senders are taken to be done
        even without their stop heaps.
    l0_interface
        Address of the interface to receive multicast on.
    shard_chunks
        ``(dumps, channels)`` counted in chunks: group that many chunks of every array into one
        Zarr shard (one object), or None for one object per chunk. A list (as the controller's
        JSON config gives it) or a ``"DUMPS,CHANS"`` string is accepted too.
    """

    l0_spead: str = ":7200"
    l0_name: str = "sdp_l0"
    store: str = "/var/kat/data"
    s3_endpoint_url: str | None = None
    obj_size_mb: float = 20.0
    obj_max_dumps: int = 16
    buffer_mb: float = 2000.0
    workers: int = 50
    flags_only: bool = False
    retries: int = 8
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_lag_dumps: int = 4
    drain_timeout: float = 1.0
    l0_interface: str = ""
    shard_chunks: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.shard_chunks = parse_shard_chunks(self.shard_chunks)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> VisWriterConfig:
        """Build from parsed ``karoo vis-writer`` / ``flag-writer`` arguments."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    @property
    def arrays(self) -> tuple[str, ...]:
        return FLAG_ARRAYS if self.flags_only else VIS_ARRAYS


def parse_shard_chunks(value) -> tuple[int, int] | None:
    """``(dumps, channels)`` chunks per shard from ``"2,4"``, ``[2, 4]`` or ``(2, 4)``.

    None or an empty string means unsharded.

    Raises
    ------
    ValueError
        Unless `value` is two positive whole numbers.
    """
    if value is None or value == "":
        return None
    parts = value.split(",") if isinstance(value, str) else value
    try:
        parts = list(parts)
        numbers = tuple(int(p) for p in parts)
        exact = all(float(p) == n for p, n in zip(parts, numbers, strict=True))
    except (TypeError, ValueError):
        numbers, exact = (), False
    if len(numbers) != 2 or not exact or min(numbers) < 1:
        raise ValueError(f"shard_chunks should be two positive whole numbers DUMPS,CHANS "
                         f"(chunks per shard in time and in channel), not {value!r}")
    return numbers


def _shard_chunks_arg(text: str) -> tuple[int, int] | None:
    try:
        return parse_shard_chunks(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def public_url(url: str) -> str:
    """`url` without any ``user:password@`` part."""
    return re.sub(r"^([a-z0-9+.-]+://)[^/@]*@", r"\1", url)


class _Chunk:
    """The buffer of one chunk being assembled, queued or written."""

    __slots__ = ("array", "data", "expected", "f0", "filled", "index", "t0")

    def __init__(self, array: str, index: tuple[int, int], t0: int, f0: int,
                 shape: tuple[int, ...], spec, data: np.ndarray | None = None) -> None:
        self.array = array
        self.index = index
        self.t0 = t0
        self.f0 = f0
        # np.zeros maps fresh pages lazily; only flags need an explicit fill. `data` is this
        # chunk's part of its shard's buffer (zeros, or not yet initialised).
        if data is not None:
            if spec.fill_value != 0:
                data.fill(spec.fill_value)
            self.data = data
        elif spec.fill_value == 0:
            self.data = np.zeros(shape, spec.dtype)
        else:
            self.data = np.full(shape, spec.fill_value, spec.dtype)
        self.filled = 0  # dump-channels placed so far
        self.expected = shape[0] * shape[1]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


class _Capture:
    """State of one capture block: the store stream, the receiver and the chunks in progress."""

    def __init__(self, cbid: str, stream: StreamStore, arrays: tuple[str, ...], n_chans: int,
                 n_bls: int, n_chans_per_substream: int | None) -> None:
        self.cbid = cbid
        self.stream = stream
        self.arrays = arrays
        self.n_chans = n_chans
        self.n_bls = n_bls
        self.chans_per_heap = n_chans_per_substream
        self.grid = {name: stream.arrays[name].chunks[:2] for name in arrays}
        # Chunks per shard (time, channel) of the sharded arrays. Their chunks are buffered in
        # one array per shard and held until the shard can be written whole (or its row of
        # shards is closed): one write per shard instead of a read-modify-write per chunk.
        self.shard_grid = {
            name: tuple(s // c for s, c in zip(stream.arrays[name].shards[:2], grid,
                                               strict=True))
            for name, grid in self.grid.items() if stream.arrays[name].shards is not None}
        self.shard_buffers: dict[tuple[str, tuple[int, int]], np.ndarray] = {}
        self.held: dict[tuple[str, tuple[int, int]], dict[tuple[int, int], _Chunk]] = {}
        self.held_done: dict[tuple[str, tuple[int, int]], asyncio.Future] = {}
        self.open: dict[str, dict[tuple[int, int], _Chunk]] = {name: {} for name in arrays}
        self.closed_rows = dict.fromkeys(arrays, 0)  # rows below are handed to the store
        # Write of each chunk handed over (a future while it is held for its shard).
        self.writes: dict[tuple[str, tuple[int, int]], asyncio.Future] = {}
        self.all_writes: list[asyncio.Task] = []
        self.failed: list[tuple[str, int, int, int, int]] = []  # array, t0, t1, f0, f1
        self.seen: dict[int, set[int]] = {}  # dump -> first channels of accepted heaps
        self.newest = -1
        self.sub_newest: dict[int, int] = {}  # first channel -> newest dump of that substream
        self.closed_below = 0  # heaps of earlier dumps are too old
        self.heaps = 0
        self.dropped_heaps = 0
        self.too_old = 0
        self.dropped_dumps: set[int] = set()
        self.dropping = False
        self.stopped: set[int] = set()
        self.last_heap = time.monotonic()
        self.rx: spead2.recv.asyncio.Stream | None = None
        self.rx_task: asyncio.Task | None = None
        self.ended = asyncio.Event()

    @property
    def n_dumps(self) -> int:
        return self.newest + 1


class VisWriterService(Service):
    """The vis writer (or, with ``config.flags_only``, the flag writer) daemon.

    Parameters
    ----------
    host, port
        KATCP address (port 0 picks a free one).
    telstate
        asyncio telescope state (``karoo.telstate.aio.TelescopeState``).
    name
        Task name.
    config
        What to receive and where to write it.

    Attributes
    ----------
    endpoints : list of Endpoint
        Where the current capture's receiver listens (real ports when 0 was asked for).
    """

    VERSION = "karoo-vis-writer-1.0"

    def __init__(self, host: str, port: int, *, telstate, name: str,
                 config: VisWriterConfig) -> None:
        super().__init__(host, port, telstate=telstate, name=name)
        self.config = config
        self.endpoints: list[Endpoint] = []
        self._capture: _Capture | None = None
        self._budget = int(config.buffer_mb * 1e6)
        self._queued = 0
        self._sem = asyncio.Semaphore(config.workers)
        self.store = ChunkStore(
            config.store, endpoint_url=config.s3_endpoint_url, retries=config.retries,
            backoff=config.backoff, max_backoff=config.max_backoff, on_retry=self._on_retry,
        )
        c = self.add_counter
        self.s_heaps = c("input-heaps-total", "heaps received and placed")
        self.s_bytes = c("input-bytes-total", "bytes of heaps received and placed", "B")
        self.s_incomplete = c("input-incomplete-heaps-total", "heaps with lost packets (spead2)")
        self.s_too_old = c("input-too-old-heaps-total",
                           "heaps that arrived after their chunks were written")
        self.s_missing = c("input-missing-heaps-total",
                           "heaps never received within the dumps of finished captures")
        self.s_bad = c("input-bad-heaps-total",
                       "heaps with missing items, wrong shapes or channels, or duplicates")
        self.s_dropped_heaps = c("input-dropped-heaps-total",
                                 "heaps dropped because the buffer budget was spent")
        self.s_dropped_dumps = c("dropped-dumps-total",
                                 "dumps with heaps dropped because the store was too slow")
        self.s_chunks = c("output-chunks-total", "chunks written")
        self.s_shards = c("output-shards-total", "whole shards written in one go (sharded)")
        self.s_out_bytes = c("output-bytes-total", "bytes of chunks written", "B")
        self.s_out_seconds = c("output-seconds-total", "time spent writing chunks", "s", float)
        self.s_retries = c("output-retries-total", "store requests retried")
        self.s_failed = c("output-failed-chunks-total", "chunks that could not be written")
        self.s_queued = self.add_gauge("queued-bytes", "bytes in chunk buffers", "B", int)
        self.s_max_queued = self.add_gauge("max-queued-bytes", "peak of queued-bytes", "B", int)
        self.s_active = self.add_gauge("active-chunks", "chunk writes in flight", "", int)
        self._counters = [sensor for sensor in self.sensors.values()
                          if "(prometheus: counter)" in sensor.description]
        for sensor in (self.s_incomplete, self.s_too_old, self.s_missing, self.s_bad,
                       self.s_dropped_heaps, self.s_dropped_dumps, self.s_failed):
            sensor.status_func = _warn_if_positive
        self._incomplete_base = 0

    # -- sensors

    @staticmethod
    def _bump(sensor: Sensor, n: float = 1) -> None:
        sensor.value = sensor.value + n

    def _set_queued(self, delta: int) -> None:
        self._queued += delta
        self.s_queued.value = self._queued
        if self._queued > self.s_max_queued.value:
            self.s_max_queued.value = self._queued

    def _on_retry(self, what: str, key: str, exc: BaseException) -> None:
        self._bump(self.s_retries)

    # -- capture cycle

    async def _stream_attr(self, key: str, default=None):
        """`<stream>_<key>` from telstate, else from the stream's source streams."""
        view = self.telstate.view(self.config.l0_name)
        value = await view.get(key)
        if value is None:
            for src in await view.get("src_streams", []) or []:
                value = await self.telstate.view(src).get(key)
                if value is not None:
                    break
        return default if value is None else value

    async def capture_init(self, capture_block_id: str) -> None:
        cfg = self.config
        n_chans = await self._stream_attr("n_chans")
        n_bls = await self._stream_attr("n_bls")
        if n_bls is None:
            bls = await self._stream_attr("bls_ordering")
            n_bls = None if bls is None else len(bls)
        if n_chans is None or n_bls is None:
            raise FailReply(f"telstate lacks {cfg.l0_name}_n_chans / _n_bls: is the stream "
                            "source (ingest or cal) configured?")
        n_chans, n_bls = int(n_chans), int(n_bls)
        per_sub = await self._stream_attr("n_chans_per_substream")
        per_sub = int(per_sub) if per_sub else None
        max_dumps = self._max_dumps(n_chans, n_bls)
        try:
            stream = await self.store.create_stream(
                capture_block_id, cfg.l0_name, n_chans, n_bls,
                max_chunk_bytes=cfg.obj_size_mb * 1e6, max_dumps=max_dumps, arrays=cfg.arrays,
                shard_chunks=cfg.shard_chunks,
            )
        except FileExistsError as exc:
            raise FailReply(f"capture block {capture_block_id} stream {cfg.l0_name} is already "
                            "in the store") from exc
        except (ChunkStoreError, OSError) as exc:
            raise FailReply(f"cannot create the stream in {public_url(cfg.store)}: {exc}") from exc
        capture = _Capture(capture_block_id, stream, cfg.arrays, n_chans, n_bls, per_sub)
        try:
            capture.rx = self._make_receiver(n_chans, n_bls, per_sub)
        except (OSError, ValueError) as exc:
            await stream.close()
            raise FailReply(f"cannot receive on {cfg.l0_spead}: {exc}") from exc
        # As katsdpdatawriter: the counters are per capture block (the controller and CAM
        # read "heaps of this capture block"; Prometheus takes a reset as a new series).
        for sensor in self._counters:
            sensor.value = sensor.stype(0)
        self.s_max_queued.value = self._queued
        self._incomplete_base = 0
        self.set_device_status(DeviceStatus.OK)
        await self._record_endpoint()
        self._capture = capture
        capture.rx_task = asyncio.create_task(self._receive(capture), name="receive")

    def _max_dumps(self, n_chans: int, n_bls: int) -> int:
        """Time extent limit of chunks, so that about four rows of chunks (of shards, when
        sharded: chunks are held until their shard is whole) fit the budget."""
        dump_bytes = sum(n_chans * (n_bls if ARRAYS[a].ndim == 3 else 1)
                         * ARRAYS[a].dtype.itemsize for a in self.config.arrays)
        buffer_dumps = self._budget // dump_bytes
        shard_rows = self.config.shard_chunks[0] if self.config.shard_chunks else 1
        # One row of shards being filled while the one before is written, and a dump more.
        needed = 2 * shard_rows + 1
        if buffer_dumps < needed:
            what = f" (shards of {shard_rows} dumps)" if self.config.shard_chunks else ""
            raise FailReply(f"--buffer-mb {self.config.buffer_mb} holds {buffer_dumps} dumps of "
                            f"{dump_bytes / 1e6:.1f} MB; at least {needed} are needed{what}")
        limit = max(1, buffer_dumps // (4 * shard_rows))
        return max(1, min(self.config.obj_max_dumps, 1 << int(math.log2(limit))))

    async def _record_endpoint(self) -> None:
        """katdal's ``<stream>_s3_endpoint_url``, where readers find an S3 store."""
        if not self.store.is_s3:
            return
        endpoint = self.config.s3_endpoint_url or _env_endpoint()
        if not endpoint:
            return
        key = f"{self.config.l0_name}_s3_endpoint_url"
        try:
            await self.telstate.add(key, public_url(endpoint), immutable=True)
        except Exception as exc:  # e.g. already set to another URL by an earlier writer
            logger.warning("could not set %s: %s", key, exc)

    def _make_receiver(self, n_chans: int, n_bls: int,
                       per_sub: int | None) -> spead2.recv.asyncio.Stream:
        n_sub = n_chans // per_sub if per_sub else 4
        kwargs = {}
        if per_sub:
            heap = per_sub * n_bls * (10 if not self.config.flags_only else 1) + per_sub * 4
            kwargs["memory_allocator"] = spead2.MemoryPool(
                16384, heap + 65536, 2 * n_sub + 12, 4)
        config = spead2.recv.StreamConfig(max_heaps=n_sub + 2, stop_on_stop_item=False, **kwargs)
        rx = spead2.recv.asyncio.Stream(
            spead2.ThreadPool(1), config, spead2.recv.RingStreamConfig(heaps=n_sub + 4))
        self.endpoints = add_readers(rx, self.config.l0_spead,
                                     interface_address=self.config.l0_interface)
        return rx

    async def _receive(self, capture: _Capture) -> None:
        ig = spead2.ItemGroup()
        rx = capture.rx
        while True:
            try:
                heap = await rx.get()
            except spead2.Stopped:
                break
            capture.last_heap = time.monotonic()
            try:
                self._process(capture, ig, heap)
            except Exception:  # a peer's heap must never kill the daemon
                logger.exception("unexpected error on heap %d", heap.cnt)
                self._bump(self.s_bad)
            stats = rx.stats
            incomplete = int(stats["incomplete_heaps_evicted"]) + int(
                stats["incomplete_heaps_flushed"])
            if incomplete != self._incomplete_base:
                self._bump(self.s_incomplete, incomplete - self._incomplete_base)
                self._incomplete_base = incomplete
        capture.ended.set()

    # -- heap placement

    def _process(self, capture: _Capture, ig: spead2.ItemGroup, heap) -> None:
        if heap.is_end_of_stream():
            n_sub = capture.n_chans // (capture.chans_per_heap or capture.n_chans)
            capture.stopped.add(heap.cnt % capture.n_chans)
            if capture.chans_per_heap and len(capture.stopped) >= n_sub:
                capture.rx.stop()
            return
        if heap.is_start_of_stream():
            return
        try:
            updated = ig.update(heap)
        except (ValueError, TypeError) as exc:
            logger.debug("undecodable heap %d: %s", heap.cnt, exc)
            self._bump(self.s_bad)
            return
        needed = (*capture.arrays, "dump_index", "frequency")
        if not all(name in updated for name in needed):
            if any(name in updated for name in needed):
                self._bump(self.s_bad)  # a truncated heap; descriptor-only heaps are fine
            return
        first = int(updated["frequency"].value)
        dump = int(updated["dump_index"].value)
        chans = None
        parts = {}
        for name in capture.arrays:
            value = updated[name].value
            spec = ARRAYS[name]
            if not isinstance(value, np.ndarray) or value.dtype != spec.dtype \
                    or value.ndim != spec.ndim - 1 \
                    or (spec.ndim == 3 and value.shape[1] != capture.n_bls):
                self._bump(self.s_bad)
                return
            if chans is None:
                chans = value.shape[0]
            elif value.shape[0] != chans:
                self._bump(self.s_bad)
                return
            parts[name] = value
        if not chans or first < 0 or first + chans > capture.n_chans or dump < 0 \
                or (capture.chans_per_heap and chans != capture.chans_per_heap):
            self._bump(self.s_bad)
            return
        if capture.chans_per_heap is None:
            capture.chans_per_heap = chans
        if dump < capture.closed_below:
            self._bump(self.s_too_old)
            capture.too_old += 1
            return
        seen = capture.seen.setdefault(dump, set())
        if first in seen:
            self._bump(self.s_bad)
            return
        seen.add(first)
        placed = self._place(capture, dump, first, chans, parts)
        self._advance(capture, dump, first)
        if not placed:
            self._bump(self.s_dropped_heaps)
            capture.dropped_heaps += 1
            if dump not in capture.dropped_dumps:
                capture.dropped_dumps.add(dump)
                self._bump(self.s_dropped_dumps)
            if not capture.dropping:
                capture.dropping = True
                self.set_device_status(
                    DeviceStatus.DEGRADED,
                    f"the store is slower than the stream: buffer of {self.config.buffer_mb} MB "
                    "full, dropping heaps (flagged data_lost)")
            return
        capture.heaps += 1
        self._bump(self.s_heaps)
        self._bump(self.s_bytes, sum(p.nbytes for p in parts.values()))
        if capture.dropping and self._queued <= self._budget // 2:
            capture.dropping = False
            if self._device_status.value == DeviceStatus.DEGRADED:
                self.set_device_status(DeviceStatus.OK)

    def _advance(self, capture: _Capture, dump: int, first: int) -> None:
        """Note a heap's progress; write the chunks no heap can reach any more.

        Senders send their dumps in order, so once every substream has sent dump ``d``, no
        heap of a dump up to ``d`` is still to come. A substream that falls more than
        ``max_lag_dumps`` behind the newest dump (or never starts) is not waited for.
        """
        sub = capture.sub_newest
        if dump > sub.get(first, -1):
            sub[first] = dump
        capture.newest = max(capture.newest, dump)
        below = capture.newest - self.config.max_lag_dumps
        n_sub = capture.n_chans // capture.chans_per_heap
        if len(sub) == n_sub:
            below = max(below, min(sub.values()) + 1)
        if below > capture.closed_below:
            capture.closed_below = below
            self._close_rows(capture, below)

    def _chunk_ranges(self, capture: _Capture, name: str, dump: int, first: int, chans: int):
        """(chunk index, heap channel slice, chunk channel slice) of every chunk a heap covers."""
        t_c, f_c = capture.grid[name]
        row = dump // t_c
        for j in range(first // f_c, (first + chans - 1) // f_c + 1):
            lo, hi = max(first, j * f_c), min(first + chans, (j + 1) * f_c)
            yield (row, j), slice(lo - first, hi - first), slice(lo - j * f_c, hi - j * f_c)

    def _place(self, capture: _Capture, dump: int, first: int, chans: int,
               parts: dict[str, np.ndarray]) -> bool:
        """Copy a heap into its chunks, allocating buffers within the budget (False if not)."""
        need = 0
        new = []
        for name in capture.arrays:
            for index, _, _ in self._chunk_ranges(capture, name, dump, first, chans):
                if index not in capture.open[name]:
                    shape = self._chunk_shape(capture, name, index)
                    need += math.prod(shape) * ARRAYS[name].dtype.itemsize
                    new.append((name, index, shape))
        if need and self._queued + need > self._budget:
            return False
        for name, index, shape in new:
            capture.open[name][index] = self._new_chunk(capture, name, index, shape)
        self._set_queued(need)
        # Data arrays first: a complete flags chunk waits on the data chunks it covers.
        for name in sorted(capture.arrays, key=lambda a: a == "flags"):
            for index, src, dst in self._chunk_ranges(capture, name, dump, first, chans):
                chunk = capture.open[name][index]
                chunk.data[dump - chunk.t0, dst] = parts[name][src]
                chunk.filled += src.stop - src.start
                if chunk.filled == chunk.expected:
                    self._submit(capture, capture.open[name].pop(index))
        return True

    @staticmethod
    def _new_chunk(capture: _Capture, name: str, index: tuple[int, int],
                   shape: tuple[int, ...]) -> _Chunk:
        """A chunk buffer: its own array, or (sharded) its part of its shard's buffer."""
        t_c, f_c = capture.grid[name]
        t0, f0 = index[0] * t_c, index[1] * f_c
        spec = ARRAYS[name]
        ratio = capture.shard_grid.get(name)
        if ratio is None:
            return _Chunk(name, index, t0, f0, shape, spec)
        shard = _shard_of(index, ratio)
        st0, sf0 = shard[0] * t_c * ratio[0], shard[1] * f_c * ratio[1]
        buffer = capture.shard_buffers.get((name, shard))
        if buffer is None:
            # Pages are mapped as chunks are touched, so only opened chunks take memory.
            chans = min(f_c * ratio[1], capture.n_chans - sf0)
            alloc = np.zeros if spec.fill_value == 0 else np.empty
            buffer = alloc((t_c * ratio[0], chans, capture.n_bls)[: spec.ndim], spec.dtype)
            capture.shard_buffers[(name, shard)] = buffer
        view = buffer[t0 - st0:t0 - st0 + shape[0], f0 - sf0:f0 - sf0 + shape[1]]
        return _Chunk(name, index, t0, f0, shape, spec, view)

    @staticmethod
    def _chunk_shape(capture: _Capture, name: str, index: tuple[int, int]) -> tuple[int, ...]:
        t_c, f_c = capture.grid[name]
        chans = min(f_c, capture.n_chans - index[1] * f_c)
        return (t_c, chans, capture.n_bls)[: ARRAYS[name].ndim]

    def _close_rows(self, capture: _Capture, below_dump: int) -> None:
        """Hand to the store every chunk all of whose dumps are below `below_dump`."""
        for name in sorted(capture.arrays, key=lambda a: a == "flags"):
            t_c = capture.grid[name][0]
            rows = max(0, below_dump) // t_c
            if rows <= capture.closed_rows[name]:
                continue
            capture.closed_rows[name] = rows
            for index in sorted(i for i in capture.open[name] if i[0] < rows):
                self._submit(capture, capture.open[name].pop(index))
            if name in capture.shard_grid:
                s_t = capture.shard_grid[name][0]
                for key in sorted(k for k in capture.held
                                  if k[0] == name and (k[1][0] + 1) * s_t <= rows):
                    self._flush_shard(capture, key)
        for dump in [d for d in capture.seen if d < below_dump]:
            del capture.seen[dump]

    # -- writing

    def _submit(self, capture: _Capture, chunk: _Chunk, n_dumps: int | None = None) -> None:
        """Hand a finished chunk to the store, or (sharded) hold it until its shard is whole."""
        ratio = capture.shard_grid.get(chunk.array)
        if ratio is None:
            self._start_write(capture, chunk.array, [chunk], n_dumps)
            return
        key = (chunk.array, _shard_of(chunk.index, ratio))
        held = capture.held.setdefault(key, {})
        held[chunk.index] = chunk
        done = capture.held_done.get(key)
        if done is None:
            done = capture.held_done[key] = asyncio.get_running_loop().create_future()
        # A flags write covering a held chunk waits for its shard's write, as for any chunk.
        capture.writes[(chunk.array, chunk.index)] = done
        if len(held) == self._shard_size(capture, *key, n_dumps):
            self._flush_shard(capture, key, n_dumps)

    @staticmethod
    def _shard_size(capture: _Capture, name: str, shard: tuple[int, int],
                    n_dumps: int | None = None) -> int:
        """Number of chunks in a shard (clipped at the band edge and, given, at `n_dumps`)."""
        (t_c, f_c), (s_t, s_f) = capture.grid[name], capture.shard_grid[name]
        cols = min(s_f, -(-capture.n_chans // f_c) - shard[1] * s_f)
        rows = s_t if n_dumps is None else max(0, min(s_t, -(-n_dumps // t_c) - shard[0] * s_t))
        return rows * cols

    def _flush_shard(self, capture: _Capture, key: tuple[str, tuple[int, int]],
                     n_dumps: int | None = None) -> None:
        """Write the held chunks of a shard: in one go if they are all of it, else one by one
        (chunks never opened stay absent and read as their fill value)."""
        chunks = capture.held.pop(key)
        done = capture.held_done.pop(key)
        buffer = capture.shard_buffers.pop(key)
        whole = len(chunks) == self._shard_size(capture, *key, n_dumps)
        task = self._start_write(capture, key[0], [chunks[i] for i in sorted(chunks)], n_dumps,
                                 shard=key[1] if whole else None, buffer=buffer)
        task.add_done_callback(lambda _: done.set_result(None))

    def _start_write(self, capture: _Capture, name: str, chunks: list[_Chunk],
                     n_dumps: int | None, shard: tuple[int, int] | None = None,
                     buffer: np.ndarray | None = None) -> asyncio.Task:
        deps = []
        if name == "flags":
            deps = list(self._covered_writes(
                capture, min(c.t0 for c in chunks), max(c.t0 + c.data.shape[0] for c in chunks),
                min(c.f0 for c in chunks), max(c.f0 + c.data.shape[1] for c in chunks)))
        task = asyncio.create_task(self._write(capture, name, chunks, deps, n_dumps, shard,
                                               buffer))
        capture.all_writes.append(task)
        for chunk in chunks:
            key = (name, chunk.index)
            capture.writes[key] = task
            task.add_done_callback(
                lambda _, key=key: capture.writes.pop(key) if capture.writes.get(key) is task
                else None)
        return task

    @staticmethod
    def _covered_writes(capture: _Capture, t0: int, t1: int, f0: int, f1: int
                        ) -> Iterable[asyncio.Future]:
        """Writes (or held chunks) of the data arrays that overlap dumps t0:t1, channels f0:f1."""
        for name in _DATA_ARRAYS:
            if name not in capture.grid:
                continue
            t_c, f_c = capture.grid[name]
            for row in range(t0 // t_c, -(-t1 // t_c)):
                for j in range(f0 // f_c, -(-f1 // f_c)):
                    task = capture.writes.get((name, (row, j)))
                    if task is not None:
                        yield task

    async def _write(self, capture: _Capture, name: str, chunks: list[_Chunk],
                     deps: list[asyncio.Future], n_dumps: int | None,
                     shard: tuple[int, int] | None, buffer: np.ndarray | None) -> None:
        """Write chunks (one by one), or a whole shard (`shard`, from `buffer`, in one go)."""
        try:
            if deps:
                await asyncio.gather(*deps, return_exceptions=True)
            if shard is not None:
                (t_c, f_c), (s_t, s_f) = capture.grid[name], capture.shard_grid[name]
                pieces = [(shard, shard[0] * t_c * s_t, shard[1] * f_c * s_f, buffer, chunks)]
            else:
                pieces = [(c.index, c.t0, c.f0, c.data, [c]) for c in chunks]
            for index, t0, f0, data, covered in pieces:
                if n_dumps is not None:
                    data = data[: max(1, n_dumps - t0)]
                await self._write_piece(capture, name, index, t0, f0, data, covered,
                                        shard is not None)
        finally:
            self._set_queued(-sum(c.nbytes for c in chunks))

    async def _write_piece(self, capture: _Capture, name: str, index: tuple[int, int], t0: int,
                           f0: int, data: np.ndarray, covered: list[_Chunk], shard: bool) -> None:
        """One store write: a chunk, or (`shard`) the shard at `index` holding `covered`."""
        try:
            if name == "flags":
                self._mark_failed(capture, t0, f0, data)
            index = index + (0,) * (ARRAYS[name].ndim - 2)
            write = capture.stream.write_shard if shard else capture.stream.write_chunk
            async with self._sem:
                self.s_active.value += 1
                start = time.perf_counter()
                try:
                    await write(name, index, data)
                finally:
                    self.s_active.value -= 1
                    self._bump(self.s_out_seconds, time.perf_counter() - start)
            self._bump(self.s_chunks, len(covered))
            self._bump(self.s_out_bytes, data.nbytes)
            if shard:
                self._bump(self.s_shards)
        except (ChunkStoreError, OSError, TimeoutError) as exc:
            for c in covered:
                capture.failed.append((name, c.t0, c.t0 + c.data.shape[0], c.f0,
                                       c.f0 + c.data.shape[1]))
            self._bump(self.s_failed, len(covered))
            logger.error("failed to write %s %s %s of %s: %s", name, "shard" if shard else
                         "chunk", index, capture.stream.prefix, exc)
            self.set_device_status(DeviceStatus.FAIL,
                                   f"{self.s_failed.value} chunks could not be written")

    @staticmethod
    def _mark_failed(capture: _Capture, t0: int, f0: int, data: np.ndarray) -> None:
        """Set data_lost in flags (`data`, from dump t0 and channel f0) wherever a data chunk
        they cover failed."""
        t1, f1 = t0 + data.shape[0], f0 + data.shape[1]
        for _, a0, a1, b0, b1 in capture.failed:
            lo_t, hi_t = max(a0, t0), min(a1, t1)
            lo_f, hi_f = max(b0, f0), min(b1, f1)
            if lo_t < hi_t and lo_f < hi_f:
                data[lo_t - t0:hi_t - t0, lo_f - f0:hi_f - f0] |= DATA_LOST

    async def capture_done(self, capture_block_id: str) -> None:
        capture = self._capture
        if capture is None or capture.cbid != capture_block_id:
            return
        self._capture = None
        try:
            await self._drain(capture)
            await self._finish(capture)
        finally:
            await capture.stream.close()

    async def _drain(self, capture: _Capture) -> None:
        """Wait for the stop heaps, or for the stream to go quiet, then stop receiving."""
        while not capture.ended.is_set():
            quiet = time.monotonic() - capture.last_heap
            if quiet >= self.config.drain_timeout:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(capture.ended.wait(), self.config.drain_timeout - quiet)
        capture.rx.stop()
        await capture.rx_task

    async def _finish(self, capture: _Capture) -> None:
        n_dumps = capture.n_dumps
        for name in sorted(capture.arrays, key=lambda a: a == "flags"):
            for index in sorted(capture.open[name]):
                self._submit(capture, capture.open[name].pop(index), n_dumps)
            for key in sorted(k for k in capture.held if k[0] == name):
                self._flush_shard(capture, key, n_dumps)
        await asyncio.gather(*capture.all_writes)
        if capture.chans_per_heap:
            expected = n_dumps * (capture.n_chans // capture.chans_per_heap)
            lost = expected - capture.heaps - capture.dropped_heaps - capture.too_old
            if lost > 0:
                self._bump(self.s_missing, lost)
        stream = capture.stream
        if n_dumps == 0:
            logger.warning("%s: no data received for %s", self.name, stream.prefix)
        try:
            await stream.finish(n_dumps)
        except (ChunkStoreError, OSError) as exc:
            logger.error("could not set the shape of %s: %s", stream.prefix, exc)
            self.set_device_status(DeviceStatus.FAIL, f"store metadata not written: {exc}")
        prefix = f"{capture.cbid}_{self.config.l0_name}"
        await self.telstate.add(f"{prefix}_chunk_info", stream.chunk_info(n_dumps),
                                immutable=True)
        await self.telstate.add(f"{prefix}_chunk_store_url", public_url(self.store.url),
                                immutable=True)
        await self.telstate.add(
            f"{prefix}_failed_chunks",
            [(a, (t0, t1), (f0, f1)) for a, t0, t1, f0, f1 in capture.failed], immutable=True)
        try:
            await stream.mark_complete()
        except (ChunkStoreError, OSError) as exc:
            logger.error("could not mark %s complete: %s", stream.prefix, exc)
            self.set_device_status(DeviceStatus.FAIL, f"completion marker not written: {exc}")


def _shard_of(index: tuple[int, int], ratio: tuple[int, int]) -> tuple[int, int]:
    return index[0] // ratio[0], index[1] // ratio[1]


def _warn_if_positive(value) -> Sensor.Status:
    return Sensor.Status.WARN if value > 0 else Sensor.Status.NOMINAL


def _env_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL")


# -- command line -----------------------------------------------------------------------------


def _add_writer_parser(subparsers, command: str, flags_only: bool):
    what = "flags-only L0 stream (cal flags)" if flags_only else "L0 visibility stream"
    parser = subparsers.add_parser(
        command, help=f"write the {what} to the chunk store",
        description=f"Receive the {what} from every sender and write it to a Zarr chunk store "
        "(local directory or S3).")
    defaults = VisWriterConfig()
    parser.add_argument("--l0-spead", default=":7202" if flags_only else defaults.l0_spead,
                        help="transport(s) to receive on [%(default)s]")
    parser.add_argument("--l0-name", default="sdp_l0_cal_flags" if flags_only
                        else defaults.l0_name, help="stream name [%(default)s]")
    parser.add_argument("--l0-interface", default="",
                        help="interface address to receive multicast on")
    parser.add_argument("--store", default=defaults.store,
                        help="chunk store: directory or s3://[bucket/path] [%(default)s]")
    parser.add_argument("--s3-endpoint-url", default=None,
                        help="S3 endpoint (else AWS_ENDPOINT_URL; credentials from the AWS env)")
    parser.add_argument("--obj-size-mb", type=float, default=defaults.obj_size_mb,
                        help="largest chunk, MB [%(default)s]")
    parser.add_argument("--obj-max-dumps", type=int, default=defaults.obj_max_dumps,
                        help="most dumps per chunk [%(default)s]")
    parser.add_argument("--buffer-mb", type=float, default=defaults.buffer_mb,
                        help="memory budget of the chunk buffers, MB [%(default)s]")
    parser.add_argument("--workers", type=int, default=defaults.workers,
                        help="chunk writes in flight [%(default)s]")
    parser.add_argument("--shard-chunks", type=_shard_chunks_arg, default=None,
                        metavar="DUMPS,CHANS",
                        help="group DUMPS x CHANS chunks into one Zarr shard (object), for "
                        "captures that would make millions of objects; readable by karoo.open "
                        "and karoo's katdal adapter only [unsharded]")
    parser.add_argument("--retries", type=int, default=defaults.retries,
                        help="retries of a failed store request [%(default)s]")
    parser.add_argument("--max-lag-dumps", type=int,
                        default=FLAG_WRITER_MAX_LAG if flags_only else defaults.max_lag_dumps,
                        help="how late (in dumps) a heap may arrive [%(default)s]")
    add_service_arguments(parser, "flag_writer" if flags_only else "vis_writer")
    # The anchors' ports, so that both writers can run on one host.
    set_service_factory(parser, _make_service)
    parser.set_defaults(flags_only=flags_only, port=2052 if flags_only else 2046)


def _make_service(telstate, args) -> VisWriterService:
    return VisWriterService(args.host, args.port, telstate=telstate, name=args.name,
                            config=VisWriterConfig.from_args(args))


def add_commands(subparsers) -> None:
    """Add ``karoo vis-writer`` and ``karoo flag-writer``."""
    _add_writer_parser(subparsers, "vis-writer", flags_only=False)
    _add_writer_parser(subparsers, "flag-writer", flags_only=True)
