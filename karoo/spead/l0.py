"""The L0 visibility SPEAD stream (spectral and continuum): items, sender, receiver.

Wire contract (katsdpingest's ``sdp_l0`` / ``sdp_l0_continuum``, read by cal and the
writers): flavour 64-48, one heap per substream per output dump, descriptors in every heap,
items (IDs auto-assigned from 0x1000 in this order, except ``frequency``):

==================  ======  ==========  =================  ====================================
name                ID      type        shape              meaning
==================  ======  ==========  =================  ====================================
correlator_data     0x1000  complex64   (chans, bls)       visibilities, channel-major
flags               0x1001  uint8       (chans, bls)       katdal flag bits
weights             0x1002  uint8       (chans, bls)       to be scaled by weights_channel
weights_channel     0x1003  float32     (chans,)           per-channel weight scale
timestamp           0x1004  f64         ()                 centre of the dump, s since sync
dump_index          0x1005  u64         ()                 output dump index (gaps possible)
frequency           0x4103  uint32      ()                 first channel of the heap
==================  ======  ==========  =================  ====================================

A heap's ``cnt`` sequence starts at its first channel and steps by the total number of
channels, so cnts are unique over all senders and identify the sender of a stop heap.

The cal flags stream (katsdpcal's ``sdp.flags``, e.g. ``sdp_l0_cal_flags``) is the same
contract with only ``flags`` (``cal_rfi`` added by cal), ``timestamp``, ``dump_index`` and
``frequency`` (:data:`FLAGS_ITEMS`), with the same IDs; each cal server sends its range.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import numpy as np
import spead2
import spead2.recv
import spead2.recv.asyncio
import spead2.send
import spead2.send.asyncio

from .. import flags
from .transport import Endpoint, TransportSpec, add_readers, make_send_stream, parse_transport

__all__ = [
    "DATA_LOST",
    "FLAGS_ITEMS",
    "FREQUENCY_ID",
    "L0_FLAVOUR",
    "L0_ITEMS",
    "L0Dump",
    "L0Receiver",
    "L0Sender",
    "make_l0_item_group",
]

logger = logging.getLogger(__name__)

L0_FLAVOUR = spead2.Flavour(4, 64, 48, 0)
FREQUENCY_ID = 0x4103
#: katdal's flag bit for data that never arrived.
DATA_LOST = int(flags.DATA_LOST)
#: Item names in descriptor order.
L0_ITEMS = (
    "correlator_data", "flags", "weights", "weights_channel", "timestamp", "dump_index",
    "frequency",
)
#: The items of a flags-only stream (cal's ``sdp.flags``).
FLAGS_ITEMS = ("flags", "timestamp", "dump_index", "frequency")
_PACKET_SIZE = 8872


def _item_specs(n_chans: int, n_bls: int) -> dict[str, tuple[int, str, dict]]:
    """name -> (ID, description, shape/type) of every L0 item."""
    return {
        "correlator_data": (0x1000, "Visibilities (channel, baseline)",
                            dict(shape=(n_chans, n_bls), dtype=np.complex64)),
        "flags": (0x1001, "Flag bits per visibility (katdal conventions)",
                  dict(shape=(n_chans, n_bls), dtype=np.uint8)),
        "weights": (0x1002, "Weight per visibility, to multiply by weights_channel",
                    dict(shape=(n_chans, n_bls), dtype=np.uint8)),
        "weights_channel": (0x1003, "Weight scale per channel",
                            dict(shape=(n_chans,), dtype=np.float32)),
        "timestamp": (0x1004, "Centre of the dump, in seconds since sync time",
                      dict(shape=(), format=[("f", 64)])),
        "dump_index": (0x1005, "Index of the output dump", dict(shape=(), format=[("u", 64)])),
        "frequency": (FREQUENCY_ID, "Index of the first channel in this heap",
                      dict(shape=(), dtype=np.uint32)),
    }


def make_l0_item_group(
    n_chans: int, n_bls: int, *, items: tuple[str, ...] = L0_ITEMS,
    descriptor_frequency: int | None = 1,
) -> spead2.send.ItemGroup:
    """The L0 `items` for heaps of `n_chans` channels and `n_bls` baselines (send side).

    The IDs are those katsdpingest uses: 0x1000.. in the order of :data:`L0_ITEMS`, and
    0x4103 for ``frequency``; a flags-only stream (:data:`FLAGS_ITEMS`) keeps them.
    """
    specs = _item_specs(n_chans, n_bls)
    ig = spead2.send.ItemGroup(flavour=L0_FLAVOUR, descriptor_frequency=descriptor_frequency)
    for name in items:
        item_id, description, kind = specs[name]
        ig.add_item(item_id, name, description, **kind)
    return ig


def _heap_bytes(n_chans: int, n_bls: int, items: tuple[str, ...] = L0_ITEMS) -> int:
    """Payload of the per-channel items of one heap (the scalars are negligible)."""
    specs = _item_specs(n_chans, n_bls)
    total = 0
    for name in items:
        kind = specs[name][2]
        if kind["shape"]:
            total += math.prod(kind["shape"]) * np.dtype(kind["dtype"]).itemsize
    return total


class L0Sender:
    """Sends one instance's channel range of an L0 stream, or of a flags-only stream.

    The range is split evenly over the endpoints (one heap per endpoint per dump), each
    endpoint on its own spead2 stream with its own cnt sequence. Use :meth:`create`.

    Parameters
    ----------
    streams
        One asyncio send stream per endpoint.
    channel_range
        ``(first, stop)`` channels of the whole L0 band sent by this instance.
    n_chans
        Channels in the whole L0 band.
    n_bls
        Baselines.
    items
        :data:`L0_ITEMS` (send with :meth:`send_dump`) or :data:`FLAGS_ITEMS` (send with
        :meth:`send_flags`).
    """

    def __init__(
        self,
        streams: list[spead2.send.asyncio.AsyncStream],
        channel_range: tuple[int, int],
        n_chans: int,
        n_bls: int,
        *,
        items: tuple[str, ...] = L0_ITEMS,
    ) -> None:
        first, stop = channel_range
        if not 0 <= first < stop <= n_chans:
            raise ValueError(f"channel_range {first}:{stop} not within 0:{n_chans}")
        if (stop - first) % len(streams):
            raise ValueError(f"channels {first}:{stop} do not divide evenly over "
                             f"{len(streams)} endpoints")
        self.channel_range = (first, stop)
        self.n_chans = n_chans
        self.n_bls = n_bls
        self.items = items
        self.streams = streams
        self.chans_per_heap = (stop - first) // len(streams)
        self._groups = []
        for i, stream in enumerate(streams):
            heap_first = first + i * self.chans_per_heap
            stream.set_cnt_sequence(heap_first if heap_first else n_chans, n_chans)
            self._groups.append(make_l0_item_group(self.chans_per_heap, n_bls, items=items))
        # What send_dump / send_flags must be given, and what each heap carries.
        specs = _item_specs(stop - first, n_bls)
        self._arrays = {name: specs[name][2] for name in items
                        if name not in ("timestamp", "dump_index", "frequency")}
        self._heap_bytes = _heap_bytes(self.chans_per_heap, n_bls, items)
        self.heaps_sent = 0
        self.bytes_sent = 0

    @classmethod
    async def create(
        cls,
        spec: str | TransportSpec,
        channel_range: tuple[int, int],
        n_chans: int,
        n_bls: int,
        *,
        items: tuple[str, ...] = L0_ITEMS,
        int_time: float | None = None,
        max_packet_size: int = _PACKET_SIZE,
        thread_pool: spead2.ThreadPool | None = None,
        interface_address: str = "",
        ttl: int = 1,
    ) -> L0Sender:
        """Open one stream per endpoint of `spec`.

        With `int_time` the rate is limited to 5% above the data rate (as katsdpingest
        does), otherwise unlimited.
        """
        spec = parse_transport(spec)
        n_ep = len(spec)
        chans = (channel_range[1] - channel_range[0]) // max(n_ep, 1)
        rate = 0.0
        if int_time:
            rate = (_heap_bytes(chans, n_bls, items) + 2048) / int_time * 1.05
        pool = thread_pool if thread_pool is not None else spead2.ThreadPool()
        streams = []
        for ep in spec.endpoints:
            config = spead2.send.StreamConfig(max_packet_size=max_packet_size, rate=rate)
            streams.append(await make_send_stream(
                TransportSpec(spec.scheme, (ep,)), config, thread_pool=pool,
                interface_address=interface_address, ttl=ttl,
            ))
        return cls(streams, channel_range, n_chans, n_bls, items=items)

    async def start(self) -> None:
        """Send a start heap on every endpoint."""
        for stream, ig in zip(self.streams, self._groups, strict=True):
            await stream.async_send_heap(ig.get_start())

    async def send_dump(
        self,
        vis: np.ndarray,
        flags: np.ndarray,
        weights: np.ndarray,
        weights_channel: np.ndarray,
        timestamp: float,
        dump_index: int,
    ) -> None:
        """Send one output dump of this instance's channel range.

        Parameters
        ----------
        vis, flags, weights
            complex64 / uint8 / uint8 ``(channels, n_bls)`` for :attr:`channel_range`.
        weights_channel
            float32 ``(channels,)``.
        timestamp
            Centre of the dump in seconds since sync time.
        dump_index
            Output dump index.
        """
        await self._send(timestamp, dump_index, correlator_data=vis, flags=flags,
                         weights=weights, weights_channel=weights_channel)

    async def send_flags(self, flags: np.ndarray, timestamp: float, dump_index: int) -> None:
        """Send the uint8 ``(channels, n_bls)`` flags of one dump on a flags-only stream."""
        await self._send(timestamp, dump_index, flags=flags)

    async def _send(self, timestamp: float, dump_index: int, **arrays: np.ndarray) -> None:
        if arrays.keys() != self._arrays.keys():
            raise ValueError(f"this stream sends {sorted(self._arrays)}, not {sorted(arrays)}")
        c = self.chans_per_heap
        for name, arr in arrays.items():
            kind = self._arrays[name]
            if arr.dtype != kind["dtype"] or arr.shape != kind["shape"]:
                raise ValueError(f"{name} must be {np.dtype(kind['dtype'])} {kind['shape']}, "
                                 f"not {arr.dtype} {arr.shape}")
        futures = []
        for i, (stream, ig) in enumerate(zip(self.streams, self._groups, strict=True)):
            part = slice(i * c, (i + 1) * c)
            for name, arr in arrays.items():
                ig[name].value = np.ascontiguousarray(arr[part])
            ig["timestamp"].value = float(timestamp)
            ig["dump_index"].value = int(dump_index)
            ig["frequency"].value = np.uint32(self.channel_range[0] + i * c)
            futures.append(stream.async_send_heap(ig.get_heap(descriptors="all", data="all")))
        for future in futures:
            await future
        self.heaps_sent += len(futures)
        self.bytes_sent += len(futures) * self._heap_bytes

    async def stop(self) -> None:
        """Flush each stream, then send its stop heap and wait for it to go."""
        for stream, ig in zip(self.streams, self._groups, strict=True):
            await stream.async_flush()
            await stream.async_send_heap(ig.get_end())


@dataclass
class L0Dump:
    """One L0 output dump assembled from all substreams.

    Missing substreams have zero visibilities, weights and ``weights_channel`` and flags
    :data:`DATA_LOST`; `present` says which arrived.
    """

    dump_index: int
    timestamp: float
    vis: np.ndarray
    flags: np.ndarray
    weights: np.ndarray
    weights_channel: np.ndarray
    present: np.ndarray
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return bool(self.present.all())


class _Pending:
    def __init__(self, index: int, n_chans: int, n_bls: int, n_sub: int) -> None:
        self.index = index
        self.timestamp = float("nan")
        self.vis = np.zeros((n_chans, n_bls), np.complex64)
        self.flags = np.full((n_chans, n_bls), DATA_LOST, np.uint8)
        self.weights = np.zeros((n_chans, n_bls), np.uint8)
        self.weights_channel = np.zeros(n_chans, np.float32)
        self.present = np.zeros(n_sub, bool)


class L0Receiver:
    """Receives an L0 stream from one or more senders and assembles whole dumps.

    Iterate with ``async for`` (or ``for`` in tools). Dumps come out in increasing
    ``dump_index``; a dump is delivered when all substreams have arrived, or when more than
    `max_pending` newer dumps are under assembly, or at the end of the stream. The stream
    ends when every substream has sent its stop heap (or the transports close, or
    :meth:`stop` is called).

    Parameters
    ----------
    spec
        Transport(s) to receive from; several TCP endpoints mean several listening ports.
    n_chans
        Channels in the whole L0 band.
    n_bls
        Baselines.
    n_chans_per_substream
        Channels per heap (``<l0>_n_chans_per_substream`` in telstate).
    max_pending
        Dumps under assembly at once (how unsynchronised senders may be).
    channel_range
        ``(first, stop)``: receive only these channels of the band (a band-split consumer
        that listens to a subset of the senders); dumps then hold ``stop - first``
        channels. Default: the whole band.
    """

    def __init__(
        self,
        spec: str | TransportSpec,
        n_chans: int,
        n_bls: int,
        n_chans_per_substream: int,
        *,
        max_pending: int = 2,
        channel_range: tuple[int, int] | None = None,
        max_packet_size: int = 9200,
        buffer_size: int = 16 * 1024 * 1024,
        interface_address: str = "",
        thread_pool: spead2.ThreadPool | None = None,
    ) -> None:
        if n_chans % n_chans_per_substream:
            raise ValueError("n_chans must be a multiple of n_chans_per_substream")
        first, stop = (0, n_chans) if channel_range is None else channel_range
        if not 0 <= first < stop <= n_chans or first % n_chans_per_substream \
                or stop % n_chans_per_substream:
            raise ValueError(f"channel_range {first}:{stop} must lie within 0:{n_chans} on "
                             f"substream boundaries ({n_chans_per_substream} channels)")
        self.n_chans = n_chans
        self.channel_range = (first, stop)
        self.n_bls = n_bls
        self.chans_per_substream = n_chans_per_substream
        self.n_substreams = (stop - first) // n_chans_per_substream
        self.max_pending = max_pending
        heap_bytes = _heap_bytes(n_chans_per_substream, n_bls)
        ring_heaps = self.n_substreams + 4
        pool_heaps = ring_heaps + self.n_substreams + 8
        memory_pool = spead2.MemoryPool(16384, heap_bytes + 65536, pool_heaps, 4)
        config = spead2.recv.StreamConfig(
            max_heaps=self.n_substreams + 2,
            stop_on_stop_item=False,
            memory_allocator=memory_pool,
        )
        self._pool = thread_pool if thread_pool is not None else spead2.ThreadPool(1)
        self._stream = spead2.recv.asyncio.Stream(
            self._pool, config, spead2.recv.RingStreamConfig(heaps=ring_heaps)
        )
        self._ig = spead2.ItemGroup()
        self._pending: dict[int, _Pending] = {}
        self._ready: deque[L0Dump] = deque()
        self._last_delivered = -1
        self._stopped_substreams: set[int] = set()
        self._ended = False
        self._counts = dict.fromkeys(
            ("heaps", "dumps", "missing", "start_heaps", "stop_heaps", "missing_items",
             "bad_shape", "bad_channel", "too_old", "duplicate", "bad_stop"), 0
        )
        self.endpoints: list[Endpoint] = add_readers(
            self._stream, spec,
            max_packet_size=max_packet_size, buffer_size=buffer_size,
            interface_address=interface_address,
        )

    @property
    def counters(self) -> dict[str, int]:
        """Cumulative counts: ``heaps`` accepted, ``dumps`` delivered, ``missing``
        substreams in delivered dumps, ``start_heaps``, ``stop_heaps``, rejected heaps by
        reason (``missing_items``, ``bad_shape``, ``bad_channel``, ``too_old``,
        ``duplicate``, ``bad_stop`` (stop heap from an unknown sender)) and ``incomplete``
        (heaps with lost packets, from spead2)."""
        stats = self._stream.stats
        out = dict(self._counts)
        out["incomplete"] = int(stats["incomplete_heaps_evicted"]) + int(
            stats["incomplete_heaps_flushed"]
        )
        return out

    @property
    def stopped_substreams(self) -> frozenset[int]:
        """Substreams ((first channel - channel_range[0]) / n_chans_per_substream) whose stop
        heap arrived."""
        return frozenset(self._stopped_substreams)

    # -- assembly ------------------------------------------------------------------------

    def _flush(self, index: int) -> None:
        p = self._pending.pop(index)
        self._last_delivered = max(self._last_delivered, index)
        self._counts["dumps"] += 1
        self._counts["missing"] += int((~p.present).sum())
        self._ready.append(L0Dump(
            dump_index=p.index, timestamp=p.timestamp, vis=p.vis, flags=p.flags,
            weights=p.weights, weights_channel=p.weights_channel, present=p.present,
            counters=self.counters,
        ))

    def _flush_ready(self) -> None:
        while self._pending:
            oldest = min(self._pending)
            if len(self._pending) > self.max_pending or self._pending[oldest].present.all():
                self._flush(oldest)
            else:
                break

    def _flush_all(self) -> None:
        for index in sorted(self._pending):
            self._flush(index)

    def _handle_stop(self, heap: spead2.recv.Heap) -> None:
        self._counts["stop_heaps"] += 1
        first = heap.cnt % self.n_chans
        lo, hi = self.channel_range
        if first % self.chans_per_substream or not lo <= first < hi:
            self._counts["bad_stop"] += 1
            return
        self._stopped_substreams.add((first - lo) // self.chans_per_substream)
        if len(self._stopped_substreams) == self.n_substreams:
            self._flush_all()
            self._ended = True
            self._stream.stop()

    def _process(self, heap: spead2.recv.Heap) -> None:
        if heap.is_end_of_stream():
            self._handle_stop(heap)
            return
        if heap.is_start_of_stream():
            self._counts["start_heaps"] += 1
            return
        try:
            updated = self._ig.update(heap)
        except (ValueError, TypeError) as exc:
            logger.debug("undecodable L0 heap %d: %s", heap.cnt, exc)
            self._counts["bad_shape"] += 1
            return
        if not all(name in updated for name in L0_ITEMS):
            if any(name in updated for name in L0_ITEMS):
                self._counts["missing_items"] += 1
            return  # descriptor-only heaps are fine
        c, b = self.chans_per_substream, self.n_bls
        vis = updated["correlator_data"].value
        flags = updated["flags"].value
        weights = updated["weights"].value
        wchan = updated["weights_channel"].value
        if (
            getattr(vis, "shape", None) != (c, b) or vis.dtype != np.complex64
            or getattr(flags, "shape", None) != (c, b) or flags.dtype != np.uint8
            or getattr(weights, "shape", None) != (c, b) or weights.dtype != np.uint8
            or getattr(wchan, "shape", None) != (c,) or wchan.dtype != np.float32
        ):
            self._counts["bad_shape"] += 1
            return
        lo, hi = self.channel_range
        first = int(updated["frequency"].value)
        if first % c or not lo <= first < hi:
            self._counts["bad_channel"] += 1
            return
        index = int(updated["dump_index"].value)
        if index <= self._last_delivered:
            self._counts["too_old"] += 1
            return
        pending = self._pending.get(index)
        if pending is None:
            pending = self._pending[index] = _Pending(
                index, hi - lo, self.n_bls, self.n_substreams
            )
        sub = (first - lo) // c
        if pending.present[sub]:
            self._counts["duplicate"] += 1
            return
        part = slice(first - lo, first - lo + c)
        pending.vis[part] = vis
        pending.flags[part] = flags
        pending.weights[part] = weights
        pending.weights_channel[part] = wchan
        pending.timestamp = float(updated["timestamp"].value)
        pending.present[sub] = True
        self._counts["heaps"] += 1
        self._flush_ready()

    def _finish(self) -> None:
        self._flush_all()
        self._ended = True

    # -- iteration -----------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[L0Dump]:
        return self

    async def __anext__(self) -> L0Dump:
        while not self._ready:
            if self._ended:
                raise StopAsyncIteration
            try:
                heap = await self._stream.get()
            except spead2.Stopped:
                self._finish()
                continue
            self._process(heap)
        return self._ready.popleft()

    def __iter__(self) -> Iterator[L0Dump]:
        while True:
            while not self._ready:
                if self._ended:
                    return
                try:
                    heap = spead2.recv.Stream.get(self._stream)
                except spead2.Stopped:
                    self._finish()
                    continue
                self._process(heap)
            yield self._ready.popleft()

    def stop(self) -> None:
        """Stop receiving; dumps under assembly are delivered, then iteration ends."""
        self._stream.stop()
