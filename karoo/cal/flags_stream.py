"""The cal flags stream (``sdp_l0_cal_flags``): L0 flags with ``cal_rfi`` set, for the flag writer.

A flags-only L0 stream (katsdpcal's ``sdp.flags`` stream type): flavour 64-48, descriptors in every
heap, one heap per endpoint per dump, with the L0 item IDs:

==========  ======  ======  =============  ===========================================
name        ID      type    shape          meaning
==========  ======  ======  =============  ===========================================
flags       0x1001  uint8   (chans, bls)   L0 flag bits, ``cal_rfi`` (64) added by cal
timestamp   0x1004  f64     ()             centre of the dump, s since sync
dump_index  0x1005  u64     ()             L0 dump index
frequency   0x4103  uint32  ()             first channel of the heap
==========  ======  ======  =============  ===========================================

Baselines are in the L0 ``bls_ordering``. Each cal server sends its own channel range; heap
``cnt`` sequences start at the heap's first channel and step by the band's channel count, as
on L0, so they are unique over all senders.
"""

from __future__ import annotations

import numpy as np
import spead2
import spead2.send
import spead2.send.asyncio

from ..spead.l0 import FREQUENCY_ID, L0_FLAVOUR
from ..spead.transport import TransportSpec, make_send_stream, parse_transport

FLAGS_ITEMS = ("flags", "timestamp", "dump_index", "frequency")


def make_flags_item_group(n_chans: int, n_bls: int) -> spead2.send.ItemGroup:
    """The flags-stream items for heaps of `n_chans` channels and `n_bls` baselines."""
    ig = spead2.send.ItemGroup(flavour=L0_FLAVOUR, descriptor_frequency=1)
    ig.add_item(0x1001, "flags", "Flag bits per visibility (katdal conventions)",
                shape=(n_chans, n_bls), dtype=np.uint8)
    ig.add_item(0x1004, "timestamp", "Centre of the dump, in seconds since sync time",
                shape=(), format=[("f", 64)])
    ig.add_item(0x1005, "dump_index", "Index of the L0 dump", shape=(), format=[("u", 64)])
    ig.add_item(FREQUENCY_ID, "frequency", "Index of the first channel in this heap",
                shape=(), dtype=np.uint32)
    return ig


class FlagsSender:
    """Sends one cal server's channel range of the flags stream (use :meth:`create`).

    The range is split evenly over the endpoints, one heap per endpoint per dump.
    """

    def __init__(self, streams: list, channel_range: tuple[int, int], n_chans: int,
                 n_bls: int) -> None:
        first, stop = channel_range
        if not 0 <= first < stop <= n_chans or (stop - first) % len(streams):
            raise ValueError(f"channel range {first}:{stop} does not split over "
                             f"{len(streams)} endpoints within 0:{n_chans}")
        self.channel_range = (first, stop)
        self.n_bls = n_bls
        self.streams = streams
        self.chans_per_heap = (stop - first) // len(streams)
        self._groups = []
        for i, stream in enumerate(streams):
            heap_first = first + i * self.chans_per_heap
            stream.set_cnt_sequence(heap_first if heap_first else n_chans, n_chans)
            self._groups.append(make_flags_item_group(self.chans_per_heap, n_bls))
        self.heaps_sent = 0
        self.bytes_sent = 0

    @classmethod
    async def create(cls, spec: str | TransportSpec, channel_range: tuple[int, int],
                     n_chans: int, n_bls: int, *, rate: float = 0.0,
                     thread_pool: spead2.ThreadPool | None = None) -> FlagsSender:
        """Open one stream per endpoint of `spec` (`rate` in bytes/s, 0 = unlimited)."""
        spec = parse_transport(spec)
        pool = thread_pool if thread_pool is not None else spead2.ThreadPool()
        streams = []
        for ep in spec.endpoints:
            config = spead2.send.StreamConfig(max_packet_size=8872, rate=rate)
            streams.append(await make_send_stream(TransportSpec(spec.scheme, (ep,)), config,
                                                  thread_pool=pool))
        return cls(streams, channel_range, n_chans, n_bls)

    async def start(self) -> None:
        for stream, ig in zip(self.streams, self._groups, strict=True):
            await stream.async_send_heap(ig.get_start())

    async def send_dump(self, flags: np.ndarray, timestamp: float, dump_index: int) -> None:
        """Send the flags (channels of the range, n_bls) uint8 of one dump."""
        n = self.channel_range[1] - self.channel_range[0]
        if flags.shape != (n, self.n_bls) or flags.dtype != np.uint8:
            raise ValueError(f"flags must be uint8 {(n, self.n_bls)}, not {flags.dtype} "
                             f"{flags.shape}")
        c = self.chans_per_heap
        futures = []
        for i, (stream, ig) in enumerate(zip(self.streams, self._groups, strict=True)):
            ig["flags"].value = np.ascontiguousarray(flags[i * c : (i + 1) * c])
            ig["timestamp"].value = float(timestamp)
            ig["dump_index"].value = int(dump_index)
            ig["frequency"].value = np.uint32(self.channel_range[0] + i * c)
            futures.append(stream.async_send_heap(ig.get_heap(descriptors="all", data="all")))
        for future in futures:
            await future
        self.heaps_sent += len(futures)
        self.bytes_sent += flags.nbytes

    async def stop(self) -> None:
        for stream, ig in zip(self.streams, self._groups, strict=True):
            await stream.async_flush()
            await stream.async_send_heap(ig.get_end())
