"""CBF stream: karoo's sender and chunk receiver over real spead2 transports."""

import asyncio
import itertools
import socket

import numpy as np
import pytest
import spead2
import spead2.send
import spead2.send.asyncio

from karoo.spead.cbf import (
    CBF_FLAVOUR,
    INT32_MISSING,
    CBFReceiver,
    CBFSender,
    CBFStreamParams,
    make_cbf_item_group,
)
from karoo.spead.transport import inproc_queue, remove_inproc_queues

PARAMS = CBFStreamParams(n_chans=64, n_chans_per_substream=16, n_bls=12, timestamp_step=1000)
BASE = 5000
_names = itertools.count()


@pytest.fixture
def inproc_spec():
    spec = f"inproc://cbf-test-{next(_names)}"
    yield spec
    remove_inproc_queues(spec + "+3")  # also the queues of multi-endpoint specs


def make_dumps(n, seed=0):
    rng = np.random.default_rng(seed)
    dumps = rng.integers(-(2**31), 2**31 - 1, (n, PARAMS.n_chans, PARAMS.n_bls, 2),
                         dtype=np.int32, endpoint=True)
    dumps[:, 3, 2, 0] = INT32_MISSING  # the GPU correlator's missing marker passes through
    dumps[:, 5] = 0  # and so do the old correlator's zeros
    return dumps


async def collect(rx):
    return [(d.timestamp, d.dump_index, d.data.copy(), d.present.copy()) async for d in rx]


def assert_complete(got, dumps):
    """Every collected dump has all its heaps and exactly the data sent."""
    for (_, _, data, present), dump in zip(got, dumps, strict=True):
        assert present.all()
        np.testing.assert_array_equal(data, dump)


def receiver_spec(spec, rx):
    """Where a sender should send to reach `rx` (ports chosen by the receiver)."""
    scheme = spec.split("://")[0]
    if scheme == "inproc":
        return spec
    return ",".join(f"{scheme}://127.0.0.1:{ep.port}" for ep in rx.endpoints)


@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("transport", ["inproc", "inproc+1", "udp", "tcp"])
async def test_roundtrip(transport, byteorder, inproc_spec):
    # inproc+1: two queues read by one stream, which needs distinct heap counters across them
    spec = {"inproc": inproc_spec, "inproc+1": inproc_spec + "+1", "udp": "udp://127.0.0.1:0+1",
            "tcp": "tcp://127.0.0.1:0"}[transport]
    if transport == "udp":
        spec = "udp://127.0.0.1:0,udp://127.0.0.1:0"  # two endpoints, two substreams each
    several = transport in ("udp", "inproc+1")  # a stop heap per endpoint
    rx = CBFReceiver(spec, PARAMS, stop_on_stop_item=not several)
    tx = await CBFSender.create(receiver_spec(spec, rx), PARAMS, byteorder=byteorder, rate=10e6)
    assert tx.n_endpoints == len(rx.endpoints)
    dumps = make_dumps(6)
    missing = {2: [1], 4: [0, 3]}
    await tx.start()
    for i, dump in enumerate(dumps):
        keep = [s for s in range(4) if s not in missing.get(i, [])]
        await tx.send_dump(dump, BASE + i * PARAMS.timestamp_step, substreams=keep)
    await tx.stop()
    if several:
        # Each UDP endpoint gets its own stop heap, so the first cannot end the stream;
        # the daemon stops the receiver itself (at capture-done), which still delivers
        # the dumps under assembly. Wait until spead2 has seen the 21 data heaps besides the
        # descriptor heaps, which are resent every few heaps (stop heaps are not counted).
        task = asyncio.ensure_future(collect(rx))
        for _ in range(1000):
            if rx.heaps_seen - rx.counters["metadata"] >= 21:
                break
            await asyncio.sleep(0.01)
        rx.stop()
        got = await task
    else:
        got = await collect(rx)
    assert rx.byteorder == byteorder
    assert [g[0] for g in got] == [BASE + i * PARAMS.timestamp_step for i in range(6)]
    assert [g[1] for g in got] == list(range(6))
    for i, (_, _, data, present) in enumerate(got):
        expected_present = np.array([s not in missing.get(i, []) for s in range(4)])
        np.testing.assert_array_equal(present, expected_present)
        mask = np.repeat(expected_present, PARAMS.n_chans_per_substream)
        assert data.dtype == np.int32 and data.dtype.isnative
        np.testing.assert_array_equal(data[mask], dumps[i][mask])
        assert not data[~mask].any()  # missing heaps read as zeros, not stale data
    c = rx.counters
    assert c["dumps"] == 6 and c["missing"] == 3 and c["heaps"] == 21
    for reason in ("bad_size", "missing_items", "bad_channel", "bad_timestamp", "too_old",
                   "too_far", "duplicate", "no_descriptor", "bad_descriptor"):
        assert c[reason] == 0, reason


async def test_channel_range_subset(inproc_spec):
    rx = CBFReceiver(inproc_spec, PARAMS, channel_range=(16, 48))
    tx = await CBFSender.create(inproc_spec, PARAMS)
    dumps = make_dumps(2)
    await tx.start()
    for i, dump in enumerate(dumps):
        await tx.send_dump(dump, BASE + i * PARAMS.timestamp_step)
    await tx.stop()
    got = await collect(rx)
    assert len(got) == 2
    for (_, _, data, present), dump in zip(got, dumps, strict=True):
        assert present.tolist() == [True, True]
        np.testing.assert_array_equal(data, dump[16:48])
    # heaps of the other substreams are not ours: rejected and counted
    assert rx.counters["bad_channel"] == 4


def raw_heap(ig_kwargs, timestamp=None, frequency=None, xeng=None):
    """A hand-built heap with whatever items and shapes a test wants."""
    ig = spead2.send.ItemGroup(flavour=CBF_FLAVOUR)
    imm = [("u", 48)]
    if timestamp is not None:
        ig.add_item(0x1600, "timestamp", "", shape=(), format=imm, value=timestamp)
    if frequency is not None:
        ig.add_item(0x4103, "frequency", "", shape=(), format=imm, value=frequency)
    if xeng is not None:
        ig.add_item(0x1800, "xeng_raw", "", shape=xeng.shape, dtype=xeng.dtype, value=xeng)
    heap = ig.get_heap(descriptors="none", data="all")
    heap.repeat_pointers = True
    return heap


async def test_malformed_heaps_counted(inproc_spec):
    rx = CBFReceiver(inproc_spec, PARAMS, timestamp_base=BASE)
    tx = await CBFSender.create(inproc_spec, PARAMS, byteorder="<")
    raw = spead2.send.asyncio.InprocStream(
        spead2.ThreadPool(), [inproc_queue(inproc_spec[len("inproc://"):])],
        spead2.send.StreamConfig(max_packet_size=8872),
    )
    dumps = make_dumps(3, seed=1)
    cps, nb = PARAMS.n_chans_per_substream, PARAMS.n_bls
    good = dumps[1][:cps]
    ts1 = BASE + PARAMS.timestamp_step
    await tx.start()
    await tx.send_dump(dumps[0], BASE)
    bad = [
        raw_heap({}, ts1, 0, np.zeros((cps, nb, 3), np.int32)),  # wrong shape
        raw_heap({}, ts1, 0, np.zeros((cps, nb, 2), np.int16)),  # wrong dtype
        raw_heap({}, ts1, None, good),  # no frequency
        raw_heap({}, None, 0, good),  # no timestamp
        raw_heap({}, ts1, 8, good),  # not a substream start
        raw_heap({}, ts1, 64, good),  # beyond the band
        raw_heap({}, ts1 + 500, 0, good),  # off the dump grid
        raw_heap({}, BASE - PARAMS.timestamp_step, 0, good),  # before the first dump
        raw_heap({}, BASE + 10**9 * PARAMS.timestamp_step, 0, good),  # absurdly far ahead
        raw_heap({}, ts1, 0, good),  # the real heap for substream 0 of dump 1 ...
        raw_heap({}, ts1, 0, good + 1),  # ... and a duplicate that must not overwrite it
    ]
    for heap in bad:
        await raw.async_send_heap(heap)
    await tx.send_dump(dumps[1], ts1, substreams=[1, 2, 3])
    await tx.send_dump(dumps[2], ts1 + PARAMS.timestamp_step)
    await tx.stop()
    got = await collect(rx)
    assert [g[1] for g in got] == [0, 1, 2]
    assert_complete(got, dumps)
    c = rx.counters
    expected = {"bad_size": 2, "missing_items": 2, "bad_channel": 2, "bad_timestamp": 1,
                "too_old": 1, "too_far": 1, "duplicate": 1, "dumps": 3, "missing": 0}
    assert {k: c[k] for k in expected} == expected


async def test_late_heap_is_too_old(inproc_spec):
    rx = CBFReceiver(inproc_spec, PARAMS, max_chunks=1)
    tx = await CBFSender.create(inproc_spec, PARAMS)
    dumps = make_dumps(2)
    await tx.start()
    await tx.send_dump(dumps[0], BASE, substreams=[0, 1, 2])
    await tx.send_dump(dumps[1], BASE + PARAMS.timestamp_step)
    await tx.send_dump(dumps[0], BASE, substreams=[3])  # arrives after dump 1 started
    await tx.stop()
    got = await collect(rx)
    assert [g[3].tolist() for g in got] == [[True, True, True, False], [True] * 4]
    assert rx.counters["too_old"] == 1


async def test_descriptor_rules(inproc_spec):
    """No descriptor and no configured byte order: data is withheld and counted."""
    rx = CBFReceiver(inproc_spec, PARAMS)
    raw = spead2.send.asyncio.InprocStream(
        spead2.ThreadPool(), [inproc_queue(inproc_spec[len("inproc://"):])],
        spead2.send.StreamConfig(max_packet_size=8872),
    )
    dump = make_dumps(1)[0]
    cps = PARAMS.n_chans_per_substream
    for s in range(4):
        await raw.async_send_heap(raw_heap({}, BASE, s * cps, dump[s * cps : (s + 1) * cps]))
    # a descriptor declaring the wrong shape is refused too
    wrong = make_cbf_item_group(cps, PARAMS.n_bls + 1, ">")
    await raw.async_send_heap(wrong.get_heap(descriptors="all", data="none"))
    for s in range(4):
        await raw.async_send_heap(
            raw_heap({}, BASE + 1000, s * cps, dump[s * cps : (s + 1) * cps])
        )
    # then a good one makes the next dump usable (big-endian declared, so byte-swapped)
    good = make_cbf_item_group(cps, PARAMS.n_bls, ">")
    await raw.async_send_heap(good.get_heap(descriptors="all", data="none"))
    be = dump.astype(">i4")
    for s in range(4):
        await raw.async_send_heap(raw_heap({}, BASE + 2000, s * cps, be[s * cps : (s + 1) * cps]))
    await raw.async_send_heap(good.get_end())
    got = await collect(rx)
    assert [g[1] for g in got] == [2]
    np.testing.assert_array_equal(got[0][2], dump)
    c = rx.counters
    assert c["no_descriptor"] == 4 and c["bad_descriptor"] == 4 and c["metadata"] == 3


async def test_configured_byteorder_without_descriptors(inproc_spec):
    rx = CBFReceiver(inproc_spec, PARAMS, byteorder=">")
    raw = spead2.send.asyncio.InprocStream(
        spead2.ThreadPool(), [inproc_queue(inproc_spec[len("inproc://"):])],
        spead2.send.StreamConfig(max_packet_size=8872),
    )
    dump = make_dumps(1)[0]
    be = dump.astype(">i4")
    cps = PARAMS.n_chans_per_substream
    for s in range(4):
        await raw.async_send_heap(raw_heap({}, BASE, s * cps, be[s * cps : (s + 1) * cps]))
    await raw.async_send_heap(make_cbf_item_group(cps, PARAMS.n_bls).get_end())
    got = await collect(rx)
    assert len(got) == 1
    np.testing.assert_array_equal(got[0][2], dump)


def test_blocking_iteration(inproc_spec):
    rx = CBFReceiver(inproc_spec, PARAMS)
    dumps = make_dumps(3)

    async def send():
        tx = await CBFSender.create(inproc_spec, PARAMS)
        await tx.start()
        for i, dump in enumerate(dumps):
            await tx.send_dump(dump, BASE + i * PARAMS.timestamp_step)
        await tx.stop()

    asyncio.run(send())
    got = [(d.dump_index, d.data.copy()) for d in rx]
    assert [g[0] for g in got] == [0, 1, 2]
    for (_, data), dump in zip(got, dumps, strict=True):
        np.testing.assert_array_equal(data, dump)


def test_sender_rejects_bad_input():
    with pytest.raises(ValueError):
        CBFStreamParams(n_chans=60, n_chans_per_substream=16, n_bls=4, timestamp_step=1)
    with pytest.raises(ValueError):
        make_cbf_item_group(16, 4, "=")

    async def bad_send():
        tx = await CBFSender.create("inproc://cbf-bad-input", PARAMS)
        with pytest.raises(ValueError):
            await tx.send_dump(np.zeros((64, 12, 2), np.float32), 0)
        with pytest.raises(ValueError):
            await tx.send_dump(np.zeros((64, 11, 2), np.int32), 0)
        with pytest.raises(ValueError):
            await tx.send_dump(np.zeros((64, 12, 2), np.int32), 2**48)

    asyncio.run(bad_send())
    remove_inproc_queues("inproc://cbf-bad-input")


async def test_fuzz_udp_then_valid_dumps():
    rx = CBFReceiver("udp://127.0.0.1:0", PARAMS, timestamp_base=BASE)
    port = rx.endpoints[0].port
    rng = np.random.default_rng(42)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(600):
        size = int(rng.integers(0, 2000))
        payload = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        if i % 2 and size >= 8:
            # a plausible SPEAD header, so the garbage reaches spead2's decoder and our
            # place callback rather than being refused at the magic number
            payload[:8] = bytes([0x53, 4, 2, 6, 0, 0, 0, min(size - 8, 160) // 8])
        sock.sendto(bytes(payload), ("127.0.0.1", port))
        if i % 50 == 0:
            await asyncio.sleep(0.001)
    sock.close()
    tx = await CBFSender.create(f"udp://127.0.0.1:{port}", PARAMS, rate=20e6)
    dumps = make_dumps(3, seed=3)
    await tx.start()
    for i, dump in enumerate(dumps):
        await tx.send_dump(dump, BASE + i * PARAMS.timestamp_step)
    await tx.stop()
    got = await collect(rx)
    assert [g[1] for g in got] == [0, 1, 2]
    assert_complete(got, dumps)


# -- the timestamp base: voted on, so one stray heap first cannot poison the capture -------------

GENUINE = 2**40  # far enough from 0 that a stray heap can lie a million dumps behind it
STEP = PARAMS.timestamp_step
CPS = PARAMS.n_chans_per_substream


def _raw_sender(spec):
    return spead2.send.asyncio.InprocStream(
        spead2.ThreadPool(), [inproc_queue(spec[len("inproc://"):])],
        spead2.send.StreamConfig(max_packet_size=8872),
    )


def _stray(kind):
    """A heap that is not part of the genuine stream, and the reason it must be counted as."""
    heap = np.zeros((CPS, PARAMS.n_bls, 2), np.int32)
    if kind == "far_future":
        return raw_heap({}, GENUINE + 10**6 * STEP, 0, heap), "outvoted"
    if kind == "far_past":
        return raw_heap({}, GENUINE - 10**6 * STEP, 2 * CPS, heap), "outvoted"
    if kind == "off_grid":  # near the genuine stream, but not on its dump grid
        return raw_heap({}, GENUINE + STEP // 2, CPS, heap), "outvoted"
    if kind == "off_grid_ahead":
        return raw_heap({}, GENUINE + 3 * STEP + 1, 3 * CPS, heap), "outvoted"
    assert kind == "channel_layout"
    # a correlator with 8-channel heaps of twice the baselines: the same heap size, but its
    # second heap starts at channel 8, not one of our substreams (and its timestamp is far off)
    other = np.zeros((CPS // 2, 2 * PARAMS.n_bls, 2), np.int32)
    return raw_heap({}, GENUINE + 10**6 * STEP, CPS // 2, other), "bad_channel"


async def _send_genuine(tx, dumps, first=0):
    for i, dump in enumerate(dumps):
        await tx.send_dump(dump, GENUINE + (first + i) * STEP)


def _check_genuine(got, dumps, rx):
    assert [g[1] for g in got] == list(range(len(dumps)))
    assert [g[0] for g in got] == [GENUINE + i * STEP for i in range(len(dumps))]
    assert_complete(got, dumps)
    assert rx.timestamp_base == GENUINE


@pytest.mark.parametrize(
    "kind", ["far_future", "far_past", "off_grid", "off_grid_ahead", "channel_layout"])
async def test_stray_first_heap_does_not_poison_the_base(kind, inproc_spec):
    rx = CBFReceiver(inproc_spec, PARAMS)
    tx = await CBFSender.create(inproc_spec, PARAMS)
    await tx.start()
    heap, reason = _stray(kind)
    await _raw_sender(inproc_spec).async_send_heap(heap)
    dumps = make_dumps(4, seed=7)
    await _send_genuine(tx, dumps)
    await tx.stop()
    got = await collect(rx)
    _check_genuine(got, dumps, rx)
    c = rx.counters
    assert c[reason] == 1
    assert c["heaps"] == 16 and c["dumps"] == 4 and c["missing"] == 0
    assert c["empty_dumps"] == 0 and c["unconfirmed"] == 0
    others = {"bad_size", "missing_items", "bad_channel", "bad_timestamp", "too_old",
              "too_far", "duplicate", "outvoted"} - {reason}
    assert {k: c[k] for k in others} == dict.fromkeys(others, 0)


async def test_stray_heaps_after_confirmation_keep_their_reasons(inproc_spec):
    """Once a dump's majority has confirmed the base, strays are judged against it."""
    rx = CBFReceiver(inproc_spec, PARAMS)
    tx = await CBFSender.create(inproc_spec, PARAMS)
    raw = _raw_sender(inproc_spec)
    dumps = make_dumps(3, seed=8)
    await tx.start()
    await _send_genuine(tx, dumps[:1])
    for kind in ("far_future", "off_grid", "far_past"):
        await raw.async_send_heap(_stray(kind)[0])
    await _send_genuine(tx, dumps[1:], first=1)
    await tx.stop()
    got = await collect(rx)
    _check_genuine(got, dumps, rx)
    c = rx.counters
    assert (c["too_far"], c["bad_timestamp"], c["too_old"], c["outvoted"]) == (1, 1, 1, 0)


async def test_stray_heap_while_the_base_is_provisional(inproc_spec):
    """A stray heap right after the first genuine one, before a majority has confirmed the
    base: it is outvoted, at the cost of at most the one genuine heap before it."""
    rx = CBFReceiver(inproc_spec, PARAMS, byteorder=">")
    raw = _raw_sender(inproc_spec)
    dumps = make_dumps(3, seed=9)
    be = dumps.astype(">i4")
    await raw.async_send_heap(raw_heap({}, GENUINE, 0, be[0, :CPS]))
    await raw.async_send_heap(_stray("far_future")[0])
    for s in range(1, 4):
        await raw.async_send_heap(raw_heap({}, GENUINE, s * CPS, be[0, s * CPS:(s + 1) * CPS]))
    for d in (1, 2):
        for s in range(4):
            await raw.async_send_heap(
                raw_heap({}, GENUINE + d * STEP, s * CPS, be[d, s * CPS:(s + 1) * CPS]))
    await raw.async_send_heap(make_cbf_item_group(CPS, PARAMS.n_bls).get_end())
    got = await collect(rx)
    assert [g[1] for g in got] == [0, 1, 2]
    assert [g[3].tolist() for g in got] == [[False, True, True, True]] + [[True] * 4] * 2
    for (_, _, data, present), dump in zip(got, dumps, strict=True):
        mask = np.repeat(present, CPS)
        np.testing.assert_array_equal(data[mask], dump[mask])
    assert rx.timestamp_base == GENUINE
    # the stray heap, and the genuine heap placed under the base it briefly held
    assert rx.counters["outvoted"] == 2 and rx.counters["missing"] == 1


async def test_unconfirmed_base_delivers_nothing(inproc_spec):
    """A lone heap never confirms a base: its dump is counted, not delivered."""
    rx = CBFReceiver(inproc_spec, PARAMS, byteorder="<")
    assert rx.timestamp_base is None
    raw = _raw_sender(inproc_spec)
    await raw.async_send_heap(_stray("far_future")[0])
    await raw.async_send_heap(make_cbf_item_group(CPS, PARAMS.n_bls).get_end())
    assert await collect(rx) == []
    assert rx.counters["unconfirmed"] == 1 and rx.counters["dumps"] == 0
    assert rx.timestamp_base is None
