"""Chunk store on a local directory and on a real S3 server (Ceph RGW): the same tests for both."""

import asyncio
import itertools

import numpy as np
import pytest

from karoo.chunkstore import (
    ARRAYS,
    DATA_LOST,
    BadChunk,
    ChunkStore,
    StoreUnavailable,
    choose_chunks,
    stream_prefix,
)
from karoo.chunkstore.s3server import free_port

N_CHANS, N_BLS = 64, 24
CHUNKS = {"correlator_data": (2, 16), "flags": (4, 32), "weights": (4, 32),
          "weights_channel": (4, 64)}
N_DUMPS = 7  # not a multiple of any time chunk: the last chunks are short


def make_data(seed: int = 1) -> dict[str, np.ndarray]:
    """Realistic-looking contents of every array of a capture-block stream."""
    rng = np.random.default_rng(seed)
    shape = (N_DUMPS, N_CHANS, N_BLS)
    vis = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    flags = np.where(rng.random(shape) < 0.05, 16, 0).astype(np.uint8)
    weights = rng.integers(200, 256, size=shape, dtype=np.uint8)
    weights_channel = rng.uniform(0.5, 1.5, size=shape[:2]).astype(np.float32)
    return {"correlator_data": vis, "flags": flags, "weights": weights,
            "weights_channel": weights_channel}


def chunk_slices(name: str, index: tuple[int, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    steps = (*CHUNKS[name], N_BLS)[: len(shape)]
    return tuple(slice(i * s, min((i + 1) * s, n))
                 for i, s, n in zip(index, steps, shape, strict=True))


def all_chunks(name: str, shape: tuple[int, ...]):
    steps = (*CHUNKS[name], N_BLS)[: len(shape)]
    return itertools.product(*(range(-(-n // s)) for n, s in zip(shape, steps, strict=True)))


async def write_all(stream, data, concurrency: int = 8) -> None:
    """Write every chunk of every array, `concurrency` at a time (as a writer daemon would)."""
    sem = asyncio.Semaphore(concurrency)

    async def one(name, index):
        async with sem:
            await stream.write_chunk(name, index, data[name][chunk_slices(name, index,
                                                                         data[name].shape)])

    await asyncio.gather(*(one(name, index) for name in data
                           for index in all_chunks(name, data[name].shape)))


async def test_write_read_roundtrip(make_store, cbid):
    store = make_store()
    data = make_data()
    async with await store.create_stream(cbid, "sdp_l0", N_CHANS, N_BLS, chunks=CHUNKS) as stream:
        await write_all(stream, data)
        await stream.finish(N_DUMPS)
        for name, expected in data.items():
            for index in all_chunks(name, expected.shape):
                got = await stream.read_chunk(name, index)
                np.testing.assert_array_equal(got, expected[chunk_slices(name, index,
                                                                         expected.shape)])
    # A new store object, through Zarr's own (synchronous) arrays, as a lazy reader would.
    group = make_store(read_only=True).open_zarr_group(cbid, "sdp_l0")
    assert group.attrs["capture_block_id"] == cbid
    for name, expected in data.items():
        array = group[name]
        assert array.shape == expected.shape
        assert array.dtype == expected.dtype
        assert array.chunks == (*CHUNKS[name], N_BLS)[: expected.ndim]
        np.testing.assert_array_equal(array[:], expected)
    # Reopened for writing: the chunks and the shape are all there.
    async with await make_store().open_stream(cbid, "sdp_l0") as stream:
        assert stream.arrays["flags"].shape == (N_DUMPS, N_CHANS, N_BLS)
        np.testing.assert_array_equal(await stream.read_chunk("flags", (1, 1, 0)),
                                      data["flags"][4:7, 32:64])


async def test_missing_chunks_read_as_fill_value(make_store, cbid):
    store = make_store()
    async with await store.create_stream(cbid, "sdp_l0", N_CHANS, N_BLS, chunks=CHUNKS) as stream:
        vis = np.ones((2, 16, N_BLS), np.complex64)
        await stream.write_chunk("correlator_data", (2, 1, 0), vis)  # grows the time axis to 8
        assert await stream.has_chunk("correlator_data", (2, 1, 0))
        assert not await stream.has_chunk("flags", (0, 0, 0))
        flags = await stream.read_chunk("flags", (0, 0, 0))
        assert flags.shape == (4, 32, N_BLS)
        assert (flags == DATA_LOST).all()
        assert (await stream.read_chunk("correlator_data", (0, 0, 0)) == 0).all()
        assert (await stream.read_chunk("weights", (1, 1, 0)) == 0).all()
        np.testing.assert_array_equal(await stream.read_chunk("correlator_data", (2, 1, 0)), vis)


async def test_bad_chunks_are_refused(make_store, cbid):
    store = make_store()
    async with await store.create_stream(cbid, "sdp_l0", N_CHANS, N_BLS, chunks=CHUNKS) as stream:
        with pytest.raises(BadChunk, match="dtype"):
            await stream.write_chunk("flags", (0, 0, 0), np.zeros((4, 32, N_BLS), np.int16))
        with pytest.raises(BadChunk, match="shape"):
            await stream.write_chunk("flags", (0, 0, 0), np.zeros((4, 31, N_BLS), np.uint8))
        with pytest.raises(BadChunk, match="shape"):
            await stream.write_chunk("flags", (0, 0, 0), np.zeros((5, 32, N_BLS), np.uint8))
        with pytest.raises(BadChunk, match="outside"):
            await stream.write_chunk("flags", (0, 2, 0), np.zeros((4, 32, N_BLS), np.uint8))
        with pytest.raises(KeyError):
            await stream.write_chunk("vis", (0, 0, 0), np.zeros((4, 32, N_BLS), np.uint8))
        with pytest.raises(FileExistsError):
            await store.create_stream(cbid, "sdp_l0", N_CHANS, N_BLS)


async def test_sharded_stream(make_store, cbid):
    store = make_store()
    data = make_data(2)
    async with await store.create_stream(cbid, "sdp_l0", N_CHANS, N_BLS, chunks=CHUNKS,
                                         shard_chunks=(2, 2)) as stream:
        assert stream.arrays["flags"].shards == (8, 64, N_BLS)
        await write_all(stream, data)
        await stream.finish(N_DUMPS)
        info = stream.chunk_info()
    assert info["flags"]["chunks"] == ((4, 3), (32, 32), (N_BLS,))
    group = make_store(read_only=True).open_zarr_group(cbid, "sdp_l0")
    for name, expected in data.items():
        np.testing.assert_array_equal(group[name][:], expected)


async def test_write_whole_shards(make_store, cbid):
    """write_shard stores every chunk of a shard as one object; the last, short shard row and
    the band-edge shards too; what reads back is what was written, chunk by chunk."""
    store = make_store()
    data = make_data(3)
    async with await store.create_stream(cbid, "sdp_l0", N_CHANS, N_BLS, chunks=CHUNKS,
                                         shard_chunks=(2, 2)) as stream:
        for name, arr in stream.arrays.items():
            t_s, f_s = arr.shards[:2]
            for i, j in itertools.product(range(-(-N_DUMPS // t_s)), range(-(-N_CHANS // f_s))):
                index = (i, j, 0)[: arr.ndim]
                await stream.write_shard(name, index, data[name][i * t_s:(i + 1) * t_s,
                                                                 j * f_s:(j + 1) * f_s])
        vis = stream.arrays["correlator_data"]
        with pytest.raises(BadChunk, match="shape"):
            await stream.write_shard("correlator_data", (0, 0, 0), data["correlator_data"][:4])
        with pytest.raises(BadChunk, match="outside"):
            await stream.write_shard("flags", (0, 1, 0), data["flags"][:, :64])
        keys = [key async for key in stream.zarr_store.list_prefix("correlator_data/c")]
        assert len(keys) == (-(-N_DUMPS // vis.shards[0])) * (N_CHANS // vis.shards[1]) == 4
        assert await stream.has_chunk("correlator_data", (3, 3, 0))
        np.testing.assert_array_equal(await stream.read_chunk("correlator_data", (1, 2, 0)),
                                      data["correlator_data"][2:4, 32:48])
        await stream.finish(N_DUMPS)
    group = make_store(read_only=True).open_zarr_group(cbid, "sdp_l0")
    for name, expected in data.items():
        np.testing.assert_array_equal(group[name][:], expected, err_msg=name)
    async with await store.create_stream(cbid + "u", "sdp_l0", N_CHANS, N_BLS,
                                         chunks=CHUNKS) as stream:
        with pytest.raises(BadChunk, match="not sharded"):
            await stream.write_shard("flags", (0, 0, 0), data["flags"][:4, :32])


def test_choose_chunks():
    # The worked examples of katsdpdatawriter (20 MB objects, 1024-channel substreams).
    assert choose_chunks(4096, 8320, np.complex64, max_dumps=2, max_chans=1024) == (1, 256)
    assert choose_chunks(4096, 8320, np.uint8, max_dumps=2, max_chans=1024) == (2, 1024)
    assert choose_chunks(4096, 544, np.complex64, max_dumps=32, max_chans=1024) == (4, 1024)
    assert choose_chunks(4096, 544, np.uint8, max_dumps=32, max_chans=1024) == (32, 1024)
    # Without a substream limit, the whole band first.
    assert choose_chunks(4096, 8320, np.uint8, max_dumps=2) == (1, 2048)
    assert choose_chunks(4096, 1, np.float32, max_dumps=32) == (32, 4096)
    assert choose_chunks(4096, 8320, np.complex64, max_chans=64) == (4, 64)
    assert choose_chunks(100, 10, np.uint8) == (16, 100)
    assert stream_prefix("1700000000", "sdp_l0_continuum") == "1700000000-sdp-l0-continuum"


def test_array_specs():
    assert ARRAYS["flags"].fill_value == DATA_LOST
    assert {name: spec.dtype.str for name, spec in ARRAYS.items()} == {
        "correlator_data": "<c8", "flags": "|u1", "weights": "|u1", "weights_channel": "<f4"}


# -- server failures ----------------------------------------------------------------------------


async def test_unreachable_server_raises_store_unavailable(cbid):
    """Nothing listening: a clear StoreUnavailable after the retries, never a fill value."""
    store = ChunkStore("s3://", endpoint_url=f"http://127.0.0.1:{free_port()}",
                       access_key="k", secret_key="s", retries=2, backoff=0.01)
    with pytest.raises(StoreUnavailable, match="after 3 attempts"):
        await store.create_stream(cbid, "sdp_l0", N_CHANS, N_BLS)


async def test_server_failure_is_not_a_missing_chunk(s3_server, cbid):
    store = ChunkStore("s3://", endpoint_url=s3_server.endpoint_url,
                       access_key=s3_server.access_key, secret_key=s3_server.secret_key,
                       retries=1, backoff=0.1, timeout=0.5)
    async with await store.create_stream(cbid, "sdp_l0", N_CHANS, N_BLS, chunks=CHUNKS) as stream:
        await stream.write_chunk("flags", (0, 0, 0), np.zeros((4, 32, N_BLS), np.uint8))
        assert (await stream.read_chunk("flags", (0, 1, 0)) == DATA_LOST).all()
        s3_server.pause()  # the gateway hangs: requests time out
        try:
            with pytest.raises(StoreUnavailable):
                await stream.read_chunk("flags", (0, 1, 0))
            with pytest.raises(StoreUnavailable):
                await stream.read_chunk("flags", (0, 0, 0))
            with pytest.raises(StoreUnavailable):
                await stream.write_chunk("flags", (0, 1, 0), np.zeros((4, 32, N_BLS), np.uint8))
        finally:
            s3_server.resume()
        assert (await stream.read_chunk("flags", (0, 0, 0)) == 0).all()


async def test_write_survives_server_restart(s3_server, cbid):
    """The gateway is down for about 12 s; a write with enough retries gets through."""
    store = ChunkStore("s3://", endpoint_url=s3_server.endpoint_url,
                       access_key=s3_server.access_key, secret_key=s3_server.secret_key,
                       retries=10, backoff=0.5, max_backoff=4, timeout=5)
    vis = make_data(3)["correlator_data"][:2, :16]
    async with await store.create_stream(cbid, "sdp_l0", N_CHANS, N_BLS, chunks=CHUNKS) as stream:
        s3_server.stop_gateway()
        try:
            write = asyncio.create_task(stream.write_chunk("correlator_data", (0, 0, 0), vis))
            await asyncio.sleep(8)
            assert not write.done()
        finally:
            s3_server.start_gateway()  # from the main thread: see S3Server._spawn
        await write
        np.testing.assert_array_equal(await stream.read_chunk("correlator_data", (0, 0, 0)), vis)
