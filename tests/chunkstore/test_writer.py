"""The vis and flag writer daemon: real spead2 L0 streams in, a real aiokatcp client, Zarr out."""

import asyncio
import contextlib
import itertools

import aiokatcp
import numpy as np
import pytest
import spead2
import spead2.send

from karoo.chunkstore import DATA_LOST, ChunkStore
from karoo.chunkstore.writer import VisWriterConfig, VisWriterService
from karoo.spead.l0 import L0Sender, make_l0_item_group
from karoo.spead.transport import make_send_stream, remove_inproc_queues
from karoo.telstate.aio import TelescopeState

N_CHANS, N_BLS, PER_SUB = 64, 24, 16
N_DUMPS = 7
STREAM = "sdp_l0"
_ids = itertools.count()


def make_dumps(n_dumps: int = N_DUMPS, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (n_dumps, N_CHANS, N_BLS)
    return {
        "correlator_data": (rng.normal(size=shape) + 1j * rng.normal(size=shape)
                            ).astype(np.complex64),
        "flags": np.where(rng.random(shape) < 0.1, 16, 0).astype(np.uint8),
        "weights": rng.integers(1, 256, size=shape, dtype=np.uint8),
        "weights_channel": rng.uniform(0.5, 2, size=shape[:2]).astype(np.float32),
    }


async def make_telstate(stream: str = STREAM, per_sub: int = PER_SUB) -> TelescopeState:
    ts = TelescopeState()
    view = ts.view(stream)
    await view.set("n_chans", N_CHANS)
    await view.set("n_bls", N_BLS)
    await view.set("n_chans_per_substream", per_sub)
    return ts


@contextlib.asynccontextmanager
async def writer(store_url: str, telstate, **config):
    """A started writer daemon and a KATCP client connected to it."""
    defaults = dict(l0_spead="udp://127.0.0.1:0", l0_name=STREAM, store=store_url,
                    obj_size_mb=0.005, buffer_mb=5, workers=4, drain_timeout=0.5)
    defaults.update(config)
    service = VisWriterService("127.0.0.1", 0, telstate=telstate, name="vis_writer",
                               config=VisWriterConfig(**defaults))
    await service.start()
    client = await aiokatcp.Client.connect("127.0.0.1", service.port)
    try:
        yield service, client
    finally:
        client.close()
        await client.wait_closed()
        await service.stop()


def sensor(service, name):
    return service.sensors[name].value


async def make_senders(service) -> list[tuple[L0Sender, slice]]:
    """Two L0 senders (ingest instances) of two substreams each, aimed at the writer."""
    ep = service.endpoints[0]
    if service.config.l0_spead.startswith("inproc://"):
        target = f"inproc://{ep.host},inproc://{ep.host}"
    else:
        target = f"udp://127.0.0.1:{ep.port},127.0.0.1:{ep.port}"
    senders = []
    for lo, hi in [(0, N_CHANS // 2), (N_CHANS // 2, N_CHANS)]:
        sender = await L0Sender.create(target, (lo, hi), N_CHANS, N_BLS)
        senders.append((sender, slice(lo, hi)))
    return senders


async def send_dumps(senders, data, dumps) -> None:
    for d in dumps:
        for sender, part in senders:
            await sender.send_dump(data["correlator_data"][d, part], data["flags"][d, part],
                                   data["weights"][d, part], data["weights_channel"][d, part],
                                   timestamp=d * 8.0 + 4.0, dump_index=d)
        await asyncio.sleep(0.002)  # UDP on loopback: do not outrun the receiver


async def send(service, data, dumps=None, stop=True):
    """Send `dumps` of `data` from two L0 senders (ingest instances) to the writer."""
    senders = await make_senders(service)
    await send_dumps(senders, data, dumps if dumps is not None else range(len(data["flags"])))
    if stop:
        for sender, _ in senders:
            await sender.stop()


def read_back(url: str, cbid: str, stream: str = STREAM, **kwargs) -> dict[str, np.ndarray]:
    group = ChunkStore(url, read_only=True, **kwargs).open_zarr_group(cbid, stream)
    return {name: group[name][...] for name in group.array_keys()}


@pytest.fixture
def cbid():
    return f"17100000{next(_ids):02d}"


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path):
    """(store URL, extra ChunkStore kwargs) on a local directory or on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "store"), {}
    server = request.getfixturevalue("s3_server")
    server.start_gateway()
    return "s3://", {"endpoint_url": server.endpoint_url, "access_key": server.access_key,
                     "secret_key": server.secret_key}


async def test_roundtrip(store_url, cbid, monkeypatch):
    url, kwargs = store_url
    if kwargs:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", kwargs["access_key"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", kwargs["secret_key"])
    ts = await make_telstate()
    data = make_dumps()
    async with writer(url, ts, s3_endpoint_url=kwargs.get("endpoint_url")) as (service, client):
        await client.request("capture-init", cbid)
        await send(service, data)
        await client.request("capture-done")
        assert sensor(service, "input-heaps-total") == N_DUMPS * N_CHANS // PER_SUB
        assert sensor(service, "output-failed-chunks-total") == 0
        assert sensor(service, "input-missing-heaps-total") == 0
        assert sensor(service, "queued-bytes") == 0
        assert sensor(service, "output-chunks-total") > 4 * N_DUMPS  # really chunked
    got = read_back(url, cbid, **kwargs)
    assert set(got) == set(data)
    for name in data:
        np.testing.assert_array_equal(got[name], data[name], err_msg=name)
    info = await ts.get(f"{cbid}_{STREAM}_chunk_info")
    assert info["correlator_data"]["shape"] == (N_DUMPS, N_CHANS, N_BLS)
    assert info["flags"]["dtype"] == "|u1"
    assert sum(info["correlator_data"]["chunks"][0]) == N_DUMPS
    assert await ts.get(f"{cbid}_{STREAM}_chunk_store_url") == url
    assert await ts.get(f"{cbid}_{STREAM}_failed_chunks") == []
    group = ChunkStore(url, read_only=True, **kwargs).open_zarr_group(cbid, STREAM)
    assert group.attrs["complete"] is True
    if kwargs:
        assert await ts.get(f"{STREAM}_s3_endpoint_url") == kwargs["endpoint_url"]


async def test_inproc_two_captures(tmp_path, cbid):
    """In-process transport (the embedded demo): two capture blocks in a row."""
    url = str(tmp_path / "store")
    ts = await make_telstate()
    try:
        async with writer(url, ts, l0_spead="inproc://writer-test") as (service, client):
            for n, block in enumerate((cbid, cbid + "b")):
                data = make_dumps(3, seed=n)
                await client.request("capture-init", block)
                await send(service, data)
                await client.request("capture-done")
                got = read_back(url, block)
                for name in data:
                    np.testing.assert_array_equal(got[name], data[name], err_msg=name)
    finally:
        remove_inproc_queues("inproc://writer-test")


async def test_missing_and_out_of_order_heaps(tmp_path, cbid):
    """Heaps never sent read back as data_lost; a sender running behind the other is waited
    for; heaps of dumps every sender has passed are too old."""
    url = str(tmp_path / "store")
    ts = await make_telstate()
    data = make_dumps()
    async with writer(url, ts) as (service, client):
        await client.request("capture-init", cbid)
        (a, b) = await make_senders(service)
        # Dump 2 is never sent; sender b falls three dumps behind a, then catches up; dump 0
        # comes last (too old by then).
        await send_dumps([a, b], data, [1, 3])
        await send_dumps([a], data, [4, 5, 6])
        await send_dumps([b], data, [4, 5, 6])
        await send_dumps([a, b], data, [0])
        await client.request("capture-done")
        assert sensor(service, "input-too-old-heaps-total") == N_CHANS // PER_SUB
        assert sensor(service, "input-missing-heaps-total") == N_CHANS // PER_SUB
    got = read_back(url, cbid)
    for d in (1, 3, 4, 5, 6):
        for name in data:
            np.testing.assert_array_equal(got[name][d], data[name][d], err_msg=f"{name} {d}")
    for d in (0, 2):
        assert (got["flags"][d] == DATA_LOST).all()
        assert (got["correlator_data"][d] == 0).all()
        assert (got["weights"][d] == 0).all()


async def test_dead_sender_is_not_waited_for(tmp_path, cbid):
    """An ingest instance that stops sending: the others' data is written as it comes (after
    max_lag_dumps), its channels read back as data_lost."""
    url = str(tmp_path / "store")
    ts = await make_telstate()
    data = make_dumps(12)
    async with writer(url, ts, max_lag_dumps=2) as (service, client):
        await client.request("capture-init", cbid)
        (a, b) = await make_senders(service)
        await send_dumps([a, b], data, [0])
        await send_dumps([a], data, range(1, 12))
        while service._capture.heaps < 2 * 2 + 11 * 2:
            await asyncio.sleep(0.01)
        # Chunks up to the lag behind the newest dump are no longer waited for.
        assert service._capture.closed_below == 11 - 2
        await client.request("capture-done")
        assert sensor(service, "input-missing-heaps-total") == 11 * 2
    got = read_back(url, cbid)
    half = slice(0, N_CHANS // 2)
    for name in data:
        np.testing.assert_array_equal(got[name][:, half], data[name][:, half], err_msg=name)
    assert (got["flags"][1:, N_CHANS // 2:] == DATA_LOST).all()
    np.testing.assert_array_equal(got["flags"][0], data["flags"][0])


async def test_bad_heaps_and_capture_cycle(tmp_path, cbid):
    """Truncated and malformed heaps are counted; the KATCP cycle refuses what is wrong."""
    url = str(tmp_path / "store")
    ts = await make_telstate()
    data = make_dumps(2)
    async with writer(url, ts) as (service, client):
        with pytest.raises(aiokatcp.FailReply, match="without capture-init"):
            await client.request("capture-done")
        await client.request("capture-init", cbid)
        with pytest.raises(aiokatcp.FailReply, match="already capturing"):
            await client.request("capture-init", cbid + "1")
        port = service.endpoints[0].port
        stream = await make_send_stream(f"udp://127.0.0.1:{port}",
                                        spead2.send.StreamConfig(max_packet_size=8872))
        # A heap with the wrong number of baselines, and one without visibilities.
        ig = make_l0_item_group(PER_SUB, N_BLS + 1)
        ig["correlator_data"].value = np.zeros((PER_SUB, N_BLS + 1), np.complex64)
        ig["flags"].value = np.zeros((PER_SUB, N_BLS + 1), np.uint8)
        ig["weights"].value = np.zeros((PER_SUB, N_BLS + 1), np.uint8)
        ig["weights_channel"].value = np.zeros(PER_SUB, np.float32)
        ig["timestamp"].value = 0.0
        ig["dump_index"].value = 0
        ig["frequency"].value = np.uint32(0)
        await stream.async_send_heap(ig.get_heap(descriptors="all", data="all"))
        partial = spead2.send.ItemGroup(flavour=spead2.Flavour(4, 64, 48, 0))
        partial.add_item(0x1005, "dump_index", "", shape=(), format=[("u", 64)], value=0)
        partial.add_item(0x4103, "frequency", "", shape=(), dtype=np.uint32,
                         value=np.uint32(0))
        await stream.async_send_heap(partial.get_heap(descriptors="all", data="all"))
        await send(service, data)
        await client.request("capture-done")
        assert sensor(service, "input-bad-heaps-total") == 2
        assert sensor(service, "input-heaps-total") == 2 * N_CHANS // PER_SUB
        # The daemon is still healthy and can take the next capture block, with its counters
        # back at zero (they count one capture block, as katsdpdatawriter's do).
        await client.request("capture-init", cbid + "2")
        assert sensor(service, "input-heaps-total") == 0
        assert sensor(service, "input-bad-heaps-total") == 0
        await client.request("capture-done")
    got = read_back(url, cbid)
    np.testing.assert_array_equal(got["correlator_data"], data["correlator_data"])


async def test_flag_writer(tmp_path, cbid):
    """The flags-only stream (cal flags): same daemon, only the flags array."""
    url = str(tmp_path / "store")
    stream_name = "sdp_l0_cal_flags"
    ts = await make_telstate(stream_name, per_sub=N_CHANS)
    data = make_dumps(5)
    async with writer(url, ts, l0_name=stream_name, flags_only=True) as (service, client):
        await client.request("capture-init", cbid)
        port = service.endpoints[0].port
        stream = await make_send_stream(f"udp://127.0.0.1:{port}",
                                        spead2.send.StreamConfig(max_packet_size=8872))
        ig = spead2.send.ItemGroup(flavour=spead2.Flavour(4, 64, 48, 0))
        ig.add_item(0x1001, "flags", "", shape=(N_CHANS, N_BLS), dtype=np.uint8)
        ig.add_item(0x1004, "timestamp", "", shape=(), format=[("f", 64)])
        ig.add_item(0x1005, "dump_index", "", shape=(), format=[("u", 64)])
        ig.add_item(0x4103, "frequency", "", shape=(), dtype=np.uint32)
        for d in range(5):
            ig["flags"].value = data["flags"][d]
            ig["timestamp"].value = float(d)
            ig["dump_index"].value = d
            ig["frequency"].value = np.uint32(0)
            await stream.async_send_heap(ig.get_heap(descriptors="all", data="all"))
        await stream.async_send_heap(ig.get_end())
        await client.request("capture-done")
        assert sensor(service, "input-heaps-total") == 5
    got = read_back(url, cbid, stream_name)
    assert list(got) == ["flags"]
    np.testing.assert_array_equal(got["flags"], data["flags"])
    info = await ts.get(f"{cbid}_{stream_name}_chunk_info")
    assert list(info) == ["flags"]


async def test_slow_store_drops_counted_and_flagged(tmp_path, cbid):
    """A buffer too small for the stream: heaps are dropped, counted and read as data_lost."""
    url = str(tmp_path / "store")
    ts = await make_telstate()
    data = make_dumps(12)
    # Room for 3 dumps only, and no writes may start until the stream has gone by.
    async with writer(url, ts, buffer_mb=0.05, workers=1) as (service, client):
        await client.request("capture-init", cbid)
        async with service._sem:
            await send(service, data)
            await asyncio.sleep(0.2)
        await client.request("capture-done")
        dropped = sensor(service, "input-dropped-heaps-total")
        placed = sensor(service, "input-heaps-total")
        assert dropped > 0
        assert sensor(service, "dropped-dumps-total") > 0
        assert dropped + placed == 12 * N_CHANS // PER_SUB
        assert sensor(service, "device-status") == aiokatcp.DeviceStatus.DEGRADED
    got = read_back(url, cbid)
    complete = [d for d in range(12) if (got["flags"][d] != DATA_LOST).all()]
    lost = [d for d in range(12) if d not in complete]
    assert lost and complete
    for d in complete:
        np.testing.assert_array_equal(got["correlator_data"][d], data["correlator_data"][d])
    for d in lost:
        part = got["flags"][d] == DATA_LOST
        assert part.any()


async def wait_writes_settle(service, quiet: float = 0.5) -> None:
    """Wait until no chunk write has finished for `quiet` seconds and none is in flight."""
    last, since = -1, asyncio.get_running_loop().time()
    while True:
        now = asyncio.get_running_loop().time()
        count = sensor(service, "output-chunks-total") + sensor(service,
                                                                "output-failed-chunks-total")
        if count != last or sensor(service, "active-chunks"):
            last, since = count, now
        elif now - since >= quiet:
            return
        await asyncio.sleep(0.05)


async def test_failed_data_chunk_flags_data_lost(tmp_path, cbid):
    """A correlator_data chunk that cannot be written reads back with data_lost in flags."""
    url = str(tmp_path / "store")
    ts = await make_telstate()
    data = make_dumps()
    async with writer(url, ts) as (service, client):
        await client.request("capture-init", cbid)
        # A plain file where the chunk directories of correlator_data go: every write of that
        # array fails for good (even as root), the other arrays are fine.
        (tmp_path / "store" / f"{cbid}-sdp-l0" / "correlator_data" / "c").write_bytes(b"")
        await send(service, data)
        await client.request("capture-done")
        assert sensor(service, "output-failed-chunks-total") > 0
        assert sensor(service, "device-status") == aiokatcp.DeviceStatus.FAIL
    failed = await ts.get(f"{cbid}_{STREAM}_failed_chunks")
    assert failed and all(entry[0] == "correlator_data" for entry in failed)
    (tmp_path / "store" / f"{cbid}-sdp-l0" / "correlator_data" / "c").unlink()
    got = read_back(url, cbid)
    assert (got["flags"] & DATA_LOST).all()  # every vis chunk failed: all flagged lost
    np.testing.assert_array_equal(got["flags"] & ~np.uint8(DATA_LOST), data["flags"])
    np.testing.assert_array_equal(got["weights"], data["weights"])


async def test_s3_outage_then_recovery(s3_server, cbid, monkeypatch):
    """The S3 gateway is down for 10 s mid-capture: retries carry every chunk through."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    s3_server.start_gateway()
    ts = await make_telstate()
    data = make_dumps(10)
    async with writer("s3://", ts, backoff=0.5, max_backoff=4, retries=10) as (service, client):
        await client.request("capture-init", cbid)
        await send(service, data, dumps=range(4), stop=False)
        await wait_writes_settle(service)
        s3_server.stop_gateway()
        try:
            await send(service, data, dumps=range(4, 10))
            await asyncio.sleep(10)
        finally:
            s3_server.start_gateway()
        await client.request("capture-done")
        assert sensor(service, "output-retries-total") > 0
        assert sensor(service, "output-failed-chunks-total") == 0
        assert sensor(service, "device-status") == aiokatcp.DeviceStatus.OK
    got = read_back("s3://", cbid)
    for name in data:
        np.testing.assert_array_equal(got[name], data[name], err_msg=name)


async def test_s3_down_for_good(s3_server, cbid, monkeypatch):
    """The S3 gateway goes away mid-capture: failures are counted, capture-done completes,
    and what could not be written reads back as data_lost."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    s3_server.start_gateway()
    ts = await make_telstate()
    data = make_dumps(8)
    try:
        async with writer("s3://", ts, backoff=0.1, retries=1, workers=32) as (service, client):
            await client.request("capture-init", cbid)
            await send(service, data, dumps=range(4), stop=False)
            await wait_writes_settle(service)
            written = sensor(service, "output-chunks-total")
            s3_server.stop_gateway()
            await send(service, data, dumps=range(4, 8))
            await client.request("capture-done")
            assert sensor(service, "output-failed-chunks-total") > 0
            assert sensor(service, "output-chunks-total") == written
            assert sensor(service, "device-status") == aiokatcp.DeviceStatus.FAIL
    finally:
        s3_server.start_gateway()
    assert len(await ts.get(f"{cbid}_{STREAM}_failed_chunks")) == sensor(
        service, "output-failed-chunks-total")
    assert (await ts.get(f"{cbid}_{STREAM}_chunk_info"))["flags"]["shape"][0] == 8
    got = read_back("s3://", cbid)
    group = ChunkStore("s3://", read_only=True).open_zarr_group(cbid, STREAM)
    assert "complete" not in group.attrs
    # Dumps 0-3 were written before the outage (but for weights_channel, whose one chunk
    # spans 16 dumps and failed at the end: listed as failed); every later dump the store
    # knows of reads as lost (the shape could not be set to 8 either: readers go by chunk_info).
    good = got["flags"] != DATA_LOST
    assert good[:4].all()
    assert not good[4:].any()
    for name in ("correlator_data", "weights"):
        np.testing.assert_array_equal(got[name][good], data[name][: len(good)][good])
    np.testing.assert_array_equal(got["flags"][:4], data["flags"][:4])
    failed = await ts.get(f"{cbid}_{STREAM}_failed_chunks")
    assert ("weights_channel", (0, 16), (0, N_CHANS)) in failed
