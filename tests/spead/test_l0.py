"""L0 stream: karoo's senders and receiver, and a plain-spead2 consumer like katsdpcal's."""

import asyncio
import itertools

import numpy as np
import pytest
import spead2
import spead2.recv
import spead2.recv.asyncio

from karoo.spead.l0 import DATA_LOST, FLAGS_ITEMS, L0_ITEMS, L0Receiver, L0Sender
from karoo.spead.transport import inproc_queue, remove_inproc_queues

N_CHANS, N_BLS, PER_SENDER = 32, 6, 16
_names = itertools.count()


@pytest.fixture
def inproc_spec():
    spec = f"inproc://l0-test-{next(_names)}"
    yield spec
    remove_inproc_queues(spec)


def make_dump(index, seed=0):
    rng = np.random.default_rng(seed + index)
    vis = (rng.standard_normal((N_CHANS, N_BLS)) + 1j * rng.standard_normal((N_CHANS, N_BLS)))
    return (
        vis.astype(np.complex64),
        rng.integers(0, 256, (N_CHANS, N_BLS), dtype=np.uint8),
        rng.integers(0, 256, (N_CHANS, N_BLS), dtype=np.uint8),
        rng.random(N_CHANS, dtype=np.float32),
        100.25 + 8.0 * index,
    )


async def make_senders(spec_for):
    senders = []
    for i in range(N_CHANS // PER_SENDER):
        rng = (i * PER_SENDER, (i + 1) * PER_SENDER)
        senders.append(await L0Sender.create(spec_for(i), rng, N_CHANS, N_BLS))
    return senders


async def send(sender, index, skip=False):
    if skip:
        return
    vis, flags, weights, wchan, ts = make_dump(index)
    part = slice(*sender.channel_range)
    await sender.send_dump(vis[part], flags[part], weights[part], wchan[part], ts, index)


@pytest.mark.parametrize("transport", ["inproc", "udp", "tcp"])
async def test_two_senders_to_receiver(transport, inproc_spec):
    if transport == "inproc":
        rx = L0Receiver(inproc_spec, N_CHANS, N_BLS, PER_SENDER)
        senders = await make_senders(lambda i: inproc_spec)
    elif transport == "udp":  # both ingest instances send to the one port
        rx = L0Receiver("udp://127.0.0.1:0", N_CHANS, N_BLS, PER_SENDER)
        port = rx.endpoints[0].port
        senders = await make_senders(lambda i: f"udp://127.0.0.1:{port}")
    else:  # one TCP connection (port) per sender
        rx = L0Receiver("tcp://127.0.0.1:0,tcp://127.0.0.1:0", N_CHANS, N_BLS, PER_SENDER,
                        max_pending=4)  # two connections drift apart: allow for it
        senders = await make_senders(lambda i: f"tcp://127.0.0.1:{rx.endpoints[i].port}")
    for s in senders:
        await s.start()
    # dump 2 is missing from sender 1; sender 0 stops before sender 1 sends its last dump,
    # so the stream must not end at the first stop heap
    for index in range(4):
        await send(senders[0], index)
        if index == 3:
            await senders[0].stop()
        await send(senders[1], index, skip=index == 2)
        await asyncio.sleep(0.01 if transport == "udp" else 0)
    await senders[1].stop()
    got = [d async for d in rx]
    assert [d.dump_index for d in got] == [0, 1, 2, 3]
    for d in got:
        vis, flags, weights, wchan, ts = make_dump(d.dump_index)
        assert d.timestamp == ts
        present = np.array([True, d.dump_index != 2])
        np.testing.assert_array_equal(d.present, present)
        good = np.repeat(present, PER_SENDER)
        np.testing.assert_array_equal(d.vis[good], vis[good])
        np.testing.assert_array_equal(d.flags[good], flags[good])
        np.testing.assert_array_equal(d.weights[good], weights[good])
        np.testing.assert_array_equal(d.weights_channel[good], wchan[good])
        assert (d.flags[~good] == DATA_LOST).all() and not d.vis[~good].any()
        assert not d.weights[~good].any() and not d.weights_channel[~good].any()
    c = rx.counters
    assert rx.stopped_substreams == {0, 1}
    assert c["stop_heaps"] == 2 and c["start_heaps"] == 2
    assert c["heaps"] == 7 and c["dumps"] == 4 and c["missing"] == 1
    for reason in ("missing_items", "bad_shape", "bad_channel", "too_old", "duplicate",
                   "bad_stop", "incomplete"):
        assert c[reason] == 0, reason


async def test_bad_heaps_counted(inproc_spec):
    rx = L0Receiver(inproc_spec, N_CHANS, N_BLS, PER_SENDER)
    senders = await make_senders(lambda i: inproc_spec)
    # a sender whose heaps are 8 channels wide does not fit this stream's substreams
    narrow = await L0Sender.create(inproc_spec, (8, 16), N_CHANS, N_BLS)
    await send(senders[0], 0)
    await send(senders[1], 0)
    await send(senders[0], 0)  # dump 0 was already delivered: too old
    await send(senders[0], 1)
    await send(senders[0], 1)  # duplicate
    vis, flags, weights, wchan, ts = make_dump(1)
    await narrow.send_dump(vis[8:16], flags[8:16], weights[8:16], wchan[8:16], ts, 1)
    await send(senders[1], 1)
    for s in senders:
        await s.stop()
    got = [d async for d in rx]
    assert [(d.dump_index, d.complete) for d in got] == [(0, True), (1, True)]
    c = rx.counters
    assert (c["too_old"], c["duplicate"], c["bad_shape"]) == (1, 1, 1)


def test_sender_validates():
    async def run():
        s = await L0Sender.create("inproc://l0-validate", (0, 16), N_CHANS, N_BLS)
        vis, flags, weights, wchan, ts = make_dump(0)
        with pytest.raises(ValueError, match="correlator_data must be complex64"):
            await s.send_dump(vis[:16].astype(np.complex128), flags[:16], weights[:16],
                              wchan[:16], ts, 0)
        with pytest.raises(ValueError, match="weights_channel"):
            await s.send_dump(vis[:16], flags[:16], weights[:16], wchan[:15], ts, 0)
        with pytest.raises(ValueError):
            await L0Sender.create("inproc://l0-validate", (0, 40), N_CHANS, N_BLS)
        flags_only = await L0Sender.create("inproc://l0-validate", (0, 16), N_CHANS, N_BLS,
                                           items=FLAGS_ITEMS)
        with pytest.raises(ValueError, match="sends \\['flags'\\]"):
            await flags_only.send_dump(vis[:16], flags[:16], weights[:16], wchan[:16], ts, 0)
        with pytest.raises(ValueError, match="sends \\['correlator_data'"):
            await s.send_flags(flags[:16], ts, 0)

    asyncio.run(run())
    remove_inproc_queues("inproc://l0-validate")


async def test_plain_spead2_consumer(inproc_spec):
    """Read karoo's L0 stream the way katsdpcal/the writers do: spead2 ItemGroup, by name."""
    sender = await L0Sender.create(inproc_spec, (16, 32), N_CHANS, N_BLS)
    await sender.start()
    await send(sender, 5)
    await sender.stop()

    stream = spead2.recv.asyncio.Stream(spead2.ThreadPool(), spead2.recv.StreamConfig())
    stream.add_inproc_reader(inproc_queue(inproc_spec[len("inproc://"):]))
    ig = spead2.ItemGroup()
    seen = []
    async for heap in stream:
        if heap.is_start_of_stream():
            seen.append("start")
            continue
        updated = ig.update(heap)
        seen.append(sorted(updated))
    assert seen == ["start", sorted(L0_ITEMS)]  # the stop heap ended the iteration
    expected_ids = {"correlator_data": 0x1000, "flags": 0x1001, "weights": 0x1002,
                    "weights_channel": 0x1003, "timestamp": 0x1004, "dump_index": 0x1005,
                    "frequency": 0x4103}
    assert {name: ig[name].id for name in L0_ITEMS} == expected_ids
    assert ig["correlator_data"].dtype == np.complex64
    assert ig["correlator_data"].shape == (16, N_BLS)
    assert ig["flags"].dtype == np.uint8 and ig["flags"].shape == (16, N_BLS)
    assert ig["weights"].dtype == np.uint8 and ig["weights"].shape == (16, N_BLS)
    assert ig["weights_channel"].dtype == np.float32 and ig["weights_channel"].shape == (16,)
    assert ig["timestamp"].format == [("f", 64)] and ig["timestamp"].shape == ()
    assert ig["dump_index"].format == [("u", 64)]
    assert ig["frequency"].dtype == np.uint32 and ig["frequency"].shape == ()
    vis, flags, weights, wchan, ts = make_dump(5)
    np.testing.assert_array_equal(ig["correlator_data"].value, vis[16:32])
    np.testing.assert_array_equal(ig["flags"].value, flags[16:32])
    np.testing.assert_array_equal(ig["weights"].value, weights[16:32])
    np.testing.assert_array_equal(ig["weights_channel"].value, wchan[16:32])
    assert ig["timestamp"].value == ts
    assert ig["dump_index"].value == 5
    assert ig["frequency"].value == 16


async def test_inproc_stream_reaches_every_receiver(inproc_spec):
    """Like a multicast group: the vis writer and cal both receive the whole L0 stream."""
    writer = L0Receiver(inproc_spec, N_CHANS, N_BLS, PER_SENDER)
    cal = L0Receiver(inproc_spec, N_CHANS, N_BLS, PER_SENDER)
    senders = await make_senders(lambda i: inproc_spec)
    for s in senders:
        await s.start()
    for index in range(3):
        for s in senders:
            await send(s, index)
    for s in senders:
        await s.stop()
    for rx in (writer, cal):
        got = [d async for d in rx]
        assert [d.dump_index for d in got] == [0, 1, 2]
        vis = make_dump(2)[0]
        np.testing.assert_array_equal(got[2].vis, vis)
