"""The CBF baseline-correlation-products SPEAD stream: item definitions, sender, receiver.

Wire contract (what MeerKAT's correlators and katcbfsim send, what katsdpingest reads):
SPEAD flavour 64-48; one heap per substream (X-engine) per dump carrying the immediates
``timestamp`` (0x1600, ADC sample count of the start of the dump, u48) and ``frequency``
(0x4103, first channel of the heap, u48), and ``xeng_raw`` (0x1800): int32 real/imaginary
pairs of shape ``(n_chans_per_substream, n_bls, 2)``, big-endian (SKARAB, katcbfsim) or
little-endian (GPU correlator) as the descriptor's dtype says. Descriptors travel in their
own heaps. Missing visibilities are zeros (old correlator) or INT32_MIN in the real part
(GPU correlator); the receiver passes both through untouched, they are the ingest's to flag.

The receiver assembles each dump in place with spead2's chunking receiver and a
numba-compiled place callback (:mod:`karoo.spead._place`), so no Python runs per heap.

Unless it is given one, the receiver establishes the timestamp base (dump 0) by a vote
rather than from the first heap: the first well-formed heap's timestamp is only provisional,
a heap off its grid or too far from it counts against it, and the base moves to whichever
timestamp has at least as many heaps behind it, until enough heaps (a majority of one dump's
substreams, at least two) agree and confirm it for good. So one stray or crafted heap
arriving first (a timestamp far ahead or behind, or off the grid) costs nothing but itself;
it is counted as ``outvoted``. Dumps are only delivered under a confirmed base.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import spead2
import spead2.recv
import spead2.recv.asyncio
import spead2.send
import spead2.send.asyncio

from . import _place
from .transport import Endpoint, TransportSpec, add_readers, make_send_stream, parse_transport

__all__ = [
    "CBF_FLAVOUR",
    "FREQUENCY_ID",
    "INT32_MISSING",
    "TIMESTAMP_ID",
    "XENG_RAW_ID",
    "CBFDump",
    "CBFReceiver",
    "CBFSender",
    "CBFStreamParams",
    "make_cbf_item_group",
]

logger = logging.getLogger(__name__)

CBF_FLAVOUR = spead2.Flavour(4, 64, 48, 0)
TIMESTAMP_ID = 0x1600
FREQUENCY_ID = 0x4103
XENG_RAW_ID = 0x1800
#: The GPU correlator's marker for a missing visibility (in the real part).
INT32_MISSING = np.iinfo(np.int32).min
_IMMEDIATE_FORMAT = [("u", CBF_FLAVOUR.heap_address_bits)]

ByteOrder = Literal["<", ">"]


@dataclass(frozen=True)
class CBFStreamParams:
    """Shape of a CBF baseline-correlation-products stream (all from telstate in production).

    Parameters
    ----------
    n_chans
        Channels in the whole band.
    n_chans_per_substream
        Channels per heap (per X-engine).
    n_bls
        Correlation products (``2 * n_ants * (n_ants + 1)`` with all four polarisations).
    timestamp_step
        ADC ticks between dumps: ``ticks_between_spectra * n_accs``.
    """

    n_chans: int
    n_chans_per_substream: int
    n_bls: int
    timestamp_step: int

    def __post_init__(self) -> None:
        for name in ("n_chans", "n_chans_per_substream", "n_bls", "timestamp_step"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.n_chans % self.n_chans_per_substream:
            raise ValueError("n_chans must be a multiple of n_chans_per_substream")

    @property
    def n_substreams(self) -> int:
        return self.n_chans // self.n_chans_per_substream

    @property
    def heap_shape(self) -> tuple[int, int, int]:
        return (self.n_chans_per_substream, self.n_bls, 2)

    @property
    def heap_bytes(self) -> int:
        return self.n_chans_per_substream * self.n_bls * 8


def make_cbf_item_group(
    n_chans_per_substream: int,
    n_bls: int,
    byteorder: str = ">",
    *,
    send: bool = True,
) -> spead2.ItemGroup:
    """The three CBF items, as a send ItemGroup (or a plain ItemGroup if not `send`).

    Parameters
    ----------
    n_chans_per_substream, n_bls
        Give ``xeng_raw`` its shape ``(n_chans_per_substream, n_bls, 2)``.
    byteorder
        ``'>'`` (SKARAB correlator, katcbfsim) or ``'<'`` (GPU correlator): the byte order
        of ``xeng_raw`` on the wire, declared in its descriptor.
    """
    if byteorder not in ("<", ">"):
        raise ValueError(f"byteorder must be '<' or '>', not {byteorder!r}")
    ig = (
        spead2.send.ItemGroup(flavour=CBF_FLAVOUR, descriptor_frequency=None)
        if send
        else spead2.ItemGroup()
    )
    ig.add_item(
        TIMESTAMP_ID, "timestamp",
        "Timestamp of the start of the dump, in ADC sample clocks since sync time",
        shape=(), format=_IMMEDIATE_FORMAT,
    )
    ig.add_item(
        FREQUENCY_ID, "frequency",
        "Index of the first channel in this heap",
        shape=(), format=_IMMEDIATE_FORMAT,
    )
    ig.add_item(
        XENG_RAW_ID, "xeng_raw",
        "Correlation products: real and imaginary int32 parts per channel and baseline",
        shape=(n_chans_per_substream, n_bls, 2), dtype=np.dtype(byteorder + "i4"),
    )
    return ig


def _substream_endpoint(n_substreams: int, n_endpoints: int, substream: int) -> int:
    """Endpoint that carries a substream: contiguous channel blocks per endpoint."""
    return substream * n_endpoints // n_substreams


class CBFSender:
    """Sends dumps of a CBF baseline-correlation-products stream (what a correlator does).

    Use :meth:`create` (it may need to connect). Heaps of one dump are sent interleaved
    (round robin) over the substreams, each substream to the endpoint that owns its
    channels, with ``repeat_pointers`` so every packet carries the timestamp and frequency.

    Parameters
    ----------
    stream
        An asyncio spead2 send stream with one substream per endpoint.
    params
        Stream shape.
    n_endpoints
        Number of endpoints (substreams of `stream`); must divide the number of substreams.
    byteorder
        Byte order of ``xeng_raw`` on the wire.
    descriptor_interval
        Re-send the descriptors every this many dumps (they are always sent by :meth:`start`).
    """

    def __init__(
        self,
        stream: spead2.send.asyncio.AsyncStream,
        params: CBFStreamParams,
        n_endpoints: int = 1,
        *,
        byteorder: ByteOrder = ">",
        descriptor_interval: int = 10,
    ) -> None:
        if params.n_substreams % n_endpoints:
            raise ValueError("the number of substreams must be a multiple of the endpoints")
        self.stream = stream
        self.params = params
        self.n_endpoints = n_endpoints
        self.byteorder = byteorder
        self.descriptor_interval = descriptor_interval
        self._wire_dtype = np.dtype(byteorder + "i4")
        self._groups = [
            make_cbf_item_group(params.n_chans_per_substream, params.n_bls, byteorder)
            for _ in range(params.n_substreams)
        ]
        self._dumps_sent = 0
        self.heaps_sent = 0
        self.bytes_sent = 0

    @classmethod
    async def create(
        cls,
        spec: str | TransportSpec,
        params: CBFStreamParams,
        *,
        byteorder: ByteOrder = ">",
        max_packet_size: int = 8872,
        rate: float = 0.0,
        descriptor_interval: int = 10,
        thread_pool: spead2.ThreadPool | None = None,
        interface_address: str = "",
        ttl: int = 1,
    ) -> CBFSender:
        """Open the transport named by `spec` and make a sender on it.

        `rate` is in bytes per second over all endpoints (0: as fast as possible).
        """
        spec = parse_transport(spec)
        config = spead2.send.StreamConfig(
            max_packet_size=max_packet_size,
            rate=rate,
            max_heaps=params.n_substreams + 2,
        )
        stream = await make_send_stream(
            spec, config, thread_pool=thread_pool, interface_address=interface_address, ttl=ttl
        )
        return cls(
            stream, params, len(spec),
            byteorder=byteorder, descriptor_interval=descriptor_interval,
        )

    def _endpoint(self, substream: int) -> int:
        return _substream_endpoint(self.params.n_substreams, self.n_endpoints, substream)

    async def send_descriptors(self) -> None:
        """Send a descriptor-only heap to every endpoint."""
        heap = self._groups[0].get_heap(descriptors="all", data="none")
        refs = [spead2.send.HeapReference(heap, substream_index=i) for i in range(self.n_endpoints)]
        await self.stream.async_send_heaps(refs, spead2.send.GroupMode.ROUND_ROBIN)

    async def start(self) -> None:
        """Begin the stream: send the descriptors."""
        await self.send_descriptors()

    async def send_dump(
        self,
        data: np.ndarray,
        timestamp: int,
        *,
        substreams: list[int] | None = None,
    ) -> None:
        """Send one dump.

        Parameters
        ----------
        data
            int32 ``(n_chans, n_bls, 2)`` real/imaginary pairs for the whole band.
        timestamp
            ADC sample count of the start of the dump.
        substreams
            Only send these substreams (to simulate lost heaps); default all.
        """
        p = self.params
        expected = (p.n_chans, p.n_bls, 2)
        if data.shape != expected or data.dtype.kind != "i" or data.dtype.itemsize != 4:
            raise ValueError(f"data must be int32 with shape {expected}, not {data.dtype} "
                             f"{data.shape}")
        if not 0 <= timestamp < 2**48:
            raise ValueError("timestamp must fit in 48 bits")
        interval = self.descriptor_interval
        if interval and self._dumps_sent and self._dumps_sent % interval == 0:
            await self.send_descriptors()  # start() sent the first set
        wire = data.astype(self._wire_dtype, copy=False)
        cps = p.n_chans_per_substream
        refs = []
        for s in range(p.n_substreams) if substreams is None else substreams:
            ig = self._groups[s]
            ig["timestamp"].value = timestamp
            ig["frequency"].value = s * cps
            ig["xeng_raw"].value = wire[s * cps : (s + 1) * cps]
            heap = ig.get_heap(descriptors="none", data="all")
            heap.repeat_pointers = True
            refs.append(spead2.send.HeapReference(heap, substream_index=self._endpoint(s)))
        if refs:
            await self.stream.async_send_heaps(refs, spead2.send.GroupMode.ROUND_ROBIN)
        self._dumps_sent += 1
        self.heaps_sent += len(refs)
        self.bytes_sent += len(refs) * p.heap_bytes

    async def stop(self) -> None:
        """Flush, then send a stop heap to every endpoint."""
        await self.stream.async_flush()
        heap = self._groups[0].get_end()
        for i in range(self.n_endpoints):
            await self.stream.async_send_heap(heap, substream_index=i)


@dataclass
class CBFDump:
    """One dump assembled by :class:`CBFReceiver`.

    The arrays are views of the receiver's chunk buffers: valid until the next dump is
    requested from the receiver (copy them to keep them).

    Attributes
    ----------
    timestamp
        ADC sample count of the start of the dump.
    dump_index
        ``(timestamp - timestamp_base) / timestamp_step``.
    data
        Native-endian int32 ``(n_channels, n_bls, 2)`` for the received channel range;
        zeros where a heap is missing.
    present
        bool per substream of the received range: did its heap arrive complete.
    counters
        Cumulative receiver counters at delivery (see :attr:`CBFReceiver.counters`).
    """

    timestamp: int
    dump_index: int
    data: np.ndarray
    present: np.ndarray
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return bool(self.present.all())


class _CBFChunk(spead2.recv.Chunk):
    pass


class CBFReceiver:
    """Receives a CBF baseline-correlation-products stream, one dump at a time.

    Each dump is assembled in a pre-allocated buffer by spead2's chunking receiver; a
    numba place callback steers heaps by (timestamp, frequency) and rejects, and counts
    per reason, everything that does not belong (see :attr:`counters`). Iterate with
    ``async for`` (daemons) or ``for`` (tools); the dump handed out stays valid until the
    next one is requested.

    Parameters
    ----------
    spec
        Transport to receive from (see :mod:`karoo.spead.transport`).
    params
        Stream shape.
    channel_range
        ``(first, stop)`` channels to receive; must align to substreams. Default: all.
    timestamp_base
        Timestamp of dump index 0 (agreed between ingest servers through telstate). Default:
        voted on by the first heaps (see the module docstring); dumps are delivered once a
        majority of a dump's substreams (at least two heaps) agree on it.
    byteorder
        Byte order of ``xeng_raw`` if no descriptor has been seen; None (default) means
        dumps are only delivered once a descriptor has said it (earlier heaps are counted
        as ``no_descriptor``). A descriptor, once seen, always wins.
    max_chunks
        Dumps under assembly at once (reordering tolerance).
    max_dumps_ahead
        A heap more than this many dumps ahead of the newest is suspect (``too_far``) until
        a whole dump's worth of heaps agrees on the jump.
    stop_on_stop_item
        End the stream at the first stop heap: right for one sender on one endpoint (or
        one in-process queue / TCP connection). With several UDP endpoints each carries its
        own stop heap and the first would cut the others short, so pass False and call
        :meth:`stop` (which still delivers the dumps under assembly), as ingest does at
        capture-done.
    """

    def __init__(
        self,
        spec: str | TransportSpec,
        params: CBFStreamParams,
        *,
        channel_range: tuple[int, int] | None = None,
        timestamp_base: int | None = None,
        byteorder: ByteOrder | None = None,
        max_chunks: int = 2,
        max_dumps_ahead: int = 1000,
        stop_on_stop_item: bool = True,
        max_packet_size: int = 9200,
        buffer_size: int = 16 * 1024 * 1024,
        interface_address: str = "",
        thread_pool: spead2.ThreadPool | None = None,
    ) -> None:
        self.params = params
        first, stop = channel_range if channel_range is not None else (0, params.n_chans)
        cps = params.n_chans_per_substream
        if first % cps or stop % cps or not 0 <= first < stop <= params.n_chans:
            raise ValueError(f"channel_range {first}:{stop} must align to {cps}-channel "
                             f"substreams within 0:{params.n_chans}")
        self.channel_range = (first, stop)
        self.n_substreams = (stop - first) // cps
        self._byteorder: str | None = byteorder
        self._descriptor_ok = byteorder is not None
        self._bad_descriptor = False
        self._desc_seen = 0
        self._extra = dict.fromkeys(
            ("missing", "no_descriptor", "bad_descriptor", "dumps", "empty_dumps", "heaps",
             "unconfirmed"), 0
        )
        self._superseded = 0  # heaps in chunks of a base that was outvoted

        config = spead2.recv.StreamConfig(
            max_heaps=self.n_substreams + 2,
            stop_on_stop_item=stop_on_stop_item,
            memcpy=spead2.MEMCPY_NONTEMPORAL,
        )
        stat0 = config.next_stat_index()
        for reason in _place.REASONS:
            config.add_stat("karoo_" + reason)
        self._state = _place.make_state(
            step=params.timestamp_step,
            base=timestamp_base,
            first_channel=first,
            chans_per_substream=cps,
            n_substreams=self.n_substreams,
            heap_bytes=params.heap_bytes,
            max_ahead=max_dumps_ahead,
            stat0=stat0,
            window=max_chunks,
            flush_token=secrets.randbits(47),
        )
        chunk_config = spead2.recv.ChunkStreamConfig(
            items=_place.PLACE_ITEMS,
            max_chunks=max_chunks,
            place=_place.place_callable(self._state),
        )
        n_chunks = max_chunks + 3  # window + ring + the one the consumer holds
        self._data_ring = spead2.recv.asyncio.ChunkRingbuffer(n_chunks)
        self._free_ring = spead2.recv.ChunkRingbuffer(n_chunks)
        self._pool = thread_pool if thread_pool is not None else spead2.ThreadPool(1)
        self._stream = spead2.recv.ChunkRingStream(
            self._pool, config, chunk_config, self._data_ring, self._free_ring
        )
        shape = (stop - first, params.n_bls, 2)
        for _ in range(n_chunks):
            chunk = _CBFChunk(
                data=np.zeros(shape, np.int32),
                present=np.zeros(self.n_substreams, np.uint8),
            )
            self._stream.add_free_chunk(chunk)
        self._current: _CBFChunk | None = None
        self._max_chunks = max_chunks
        self._ending = False
        # A private queue through which stop() sends the flush heap.
        self._flush_queue = spead2.InprocQueue()
        self._stream.add_inproc_reader(self._flush_queue)
        self.endpoints: list[Endpoint] = add_readers(
            self._stream, spec,
            max_packet_size=max_packet_size, buffer_size=buffer_size,
            interface_address=interface_address,
        )

    # -- counters ------------------------------------------------------------------------

    @property
    def counters(self) -> dict[str, int]:
        """Cumulative counts, in heaps unless named otherwise.

        ``heaps`` (accepted into delivered dumps), ``dumps`` (delivered), ``missing``
        (substream slots empty in delivered dumps), ``empty_dumps`` (dumps of which no heap
        arrived, not delivered), ``incomplete`` (heaps with lost packets), rejected heaps by
        reason: ``bad_size`` (payload not the expected shape/dtype size), ``missing_items``
        (no timestamp or frequency), ``bad_channel`` (frequency not a substream start in
        range), ``bad_timestamp`` (not on the dump grid), ``too_old`` (dump already
        delivered or before the base), ``too_far`` (implausibly far ahead), ``duplicate``,
        ``outvoted`` (contradicting the timestamp base the majority of heaps settled on,
        while it was being settled), ``unconfirmed`` (in dumps that ended before any base
        was confirmed); ``metadata`` (descriptor heaps), ``no_descriptor`` /
        ``bad_descriptor`` (heaps in dumps withheld because no usable ``xeng_raw``
        descriptor was known).
        """
        stats = self._stream.stats
        out = {reason: int(stats["karoo_" + reason]) for reason in _place.REASONS}
        out["incomplete"] = int(stats["incomplete_heaps_evicted"]) + int(
            stats["incomplete_heaps_flushed"]
        )
        out.update(self._extra)
        out["outvoted"] += self._superseded
        return out

    @property
    def heaps_seen(self) -> int:
        """Heaps spead2 has finished with (accepted, rejected or incomplete)."""
        return int(self._stream.stats["heaps"])

    @property
    def latest_dump(self) -> int:
        """Newest dump index a heap has been placed in (-1: none yet), under the current
        base. Updated by the place callback as each heap starts, unlike spead2's
        statistics, which are published per batch of packets (an in-process reader may take
        a whole queue as one batch)."""
        latest = int(self._state[_place.P_LATEST])
        return latest - int(self._state[_place.P_ID0]) if latest >= 0 else -1

    @property
    def timestamp_base(self) -> int | None:
        """Timestamp of dump index 0, once confirmed (see the module docstring)."""
        if self._state[_place.P_BASE_STATE] != _place.BASE_CONFIRMED:
            return None
        return int(self._state[_place.P_BASE])

    @property
    def byteorder(self) -> str | None:
        """Byte order of ``xeng_raw`` on the wire, as known now."""
        return self._byteorder

    # -- descriptors ---------------------------------------------------------------------

    def _check_descriptors(self, dump_index: int) -> None:
        """Apply the descriptors captured before this dump's heaps arrived, in order."""
        count = int(self._state[_place.P_DESC_COUNT])
        lengths, latest, words = _place.desc_layout(self._state)
        slots = int(self._state[_place.P_DESC_SLOTS])
        slot_bytes = int(self._state[_place.P_DESC_SLOT_BYTES])
        raw = self._state[words:].view(np.uint8)
        self._desc_seen = max(self._desc_seen, count - slots)  # older ones were overwritten
        while self._desc_seen < count:
            slot = self._desc_seen % slots
            if int(self._state[latest + slot]) >= dump_index:
                break  # arrived while this dump was already under way: for later dumps
            n = int(self._state[lengths + slot])
            self._apply_descriptor(bytes(raw[slot * slot_bytes : slot * slot_bytes + n]))
            self._desc_seen += 1

    def _apply_descriptor(self, packet: bytes) -> None:
        stream = spead2.recv.Stream(spead2.ThreadPool(), spead2.recv.StreamConfig())
        stream.add_buffer_reader(packet)
        ig = spead2.ItemGroup()
        try:
            for heap in stream:
                ig.update(heap)
        except (ValueError, TypeError) as exc:
            logger.warning("undecodable CBF descriptor heap: %s", exc)
            return
        finally:
            stream.stop()
        if "xeng_raw" not in ig:
            return
        item = ig["xeng_raw"]
        expected = self.params.heap_shape
        dtype = item.dtype
        if (
            dtype is None
            or dtype.kind != "i"
            or dtype.itemsize != 4
            or tuple(item.shape) != expected
        ):
            logger.error(
                "CBF xeng_raw descriptor declares %s %s, expected int32 %s: withholding data",
                dtype if dtype is not None else item.format, item.shape, expected,
            )
            self._descriptor_ok = False
            self._byteorder = None
            self._bad_descriptor = True
            return
        self._byteorder = ">" if dtype.byteorder == ">" else "<"
        if dtype.byteorder == "=" and np.little_endian is False:
            self._byteorder = ">"
        self._descriptor_ok = True
        self._bad_descriptor = False

    # -- delivery ------------------------------------------------------------------------

    def _release(self) -> None:
        if self._current is not None:
            self._stream.add_free_chunk(self._current)
            self._current = None

    def _deliver(self, chunk: _CBFChunk) -> CBFDump | None:
        """Turn a finished chunk into a dump, or return None to recycle it."""
        self._check_descriptors(chunk.chunk_id)
        present = chunk.present.astype(bool)
        n_present = int(present.sum())
        # The state first: once confirmed, the base and its epoch never change again.
        confirmed = self._state[_place.P_BASE_STATE] == _place.BASE_CONFIRMED
        id0 = int(self._state[_place.P_ID0])
        if chunk.chunk_id < id0:
            self._superseded += n_present  # placed under a base the majority overturned
            return None
        if not confirmed:
            self._extra["unconfirmed"] += n_present
            return None
        if n_present == 0:
            self._extra["empty_dumps"] += 1
            return None
        if not self._descriptor_ok:
            key = "bad_descriptor" if self._bad_descriptor else "no_descriptor"
            self._extra[key] += n_present
            return None
        data: np.ndarray = chunk.data
        cps = self.params.n_chans_per_substream
        swap = (self._byteorder == ">") == np.little_endian
        for s in range(self.n_substreams):
            block = data[s * cps : (s + 1) * cps]
            if not present[s]:
                block.fill(0)
            elif swap:
                block.byteswap(inplace=True)
        self._extra["missing"] += self.n_substreams - n_present
        self._extra["heaps"] += n_present
        self._extra["dumps"] += 1
        base = int(self._state[_place.P_BASE])
        dump_index = chunk.chunk_id - id0
        self._current = chunk
        return CBFDump(
            timestamp=base + dump_index * self.params.timestamp_step,
            dump_index=dump_index,
            data=data,
            present=present,
            counters=self.counters,
        )

    def _is_last(self, chunk: _CBFChunk) -> bool:
        """Is this the last real dump before our own flush heap?"""
        flush_chunk = int(self._state[_place.P_FLUSH_CHUNK])
        return flush_chunk >= 0 and chunk.chunk_id >= flush_chunk - 2 * self._max_chunks

    def _next(self, chunk: _CBFChunk) -> CBFDump | None:
        last = self._is_last(chunk)
        dump = None if chunk.chunk_id > int(self._state[_place.P_LATEST]) and last \
            else self._deliver(chunk)
        if last:
            self._ending = True
        if dump is None:
            self._stream.add_free_chunk(chunk)
        return dump

    def __aiter__(self) -> AsyncIterator[CBFDump]:
        return self

    async def __anext__(self) -> CBFDump:
        self._release()
        while not self._ending:
            try:
                chunk = await self._data_ring.get()
            except spead2.Stopped:
                break
            dump = self._next(chunk)
            if dump is not None:
                return dump
        self._stream.stop()
        raise StopAsyncIteration

    def __iter__(self) -> Iterator[CBFDump]:
        while True:
            self._release()
            if self._ending:
                break
            try:
                chunk = spead2.recv.ChunkRingbuffer.get(self._data_ring)
            except spead2.Stopped:
                break
            dump = self._next(chunk)
            if dump is not None:
                yield dump
        self._stream.stop()

    def stop(self) -> None:
        """End the stream gracefully: dumps under assembly are still delivered, then
        iteration ends (spead2's own stop would discard them).

        Works by sending a private flush heap through an in-process queue that pushes
        every real dump out of spead2's window.
        """
        if int(self._state[_place.P_LATEST]) < 0:
            self._stream.stop()  # nothing under assembly
            return
        ig = spead2.send.ItemGroup(flavour=CBF_FLAVOUR)
        ig.add_item(_place.FLUSH_ID, "karoo_flush", "", shape=(), format=_IMMEDIATE_FORMAT,
                    value=int(self._state[_place.P_FLUSH_TOKEN]))
        ig.add_item(0x7FF2, "karoo_flush_pad", "", shape=(8,), dtype=np.uint8,
                    value=np.zeros(8, np.uint8))
        sender = spead2.send.InprocStream(
            spead2.ThreadPool(), [self._flush_queue], spead2.send.StreamConfig()
        )
        sender.send_heap(ig.get_heap(descriptors="none", data="all"))

    async def aclose(self) -> None:
        """Stop and let pending callbacks run."""
        self.stop()
        await asyncio.sleep(0)
