"""The writer with Zarr sharding (``--shard-chunks``): real spead2 L0 streams in, a real aiokatcp
client, read back with karoo.open (and the real katdal through karoo's adapter)."""

import argparse
import asyncio
import os

import aiokatcp
import katdal
import numpy as np
import pytest
from zarr.core.sync import sync

import karoo
from karoo.chunkstore import ChunkStore, stream_prefix
from karoo.chunkstore.writer import VisWriterConfig, add_commands, parse_shard_chunks
from karoo.dataset.katdal_adapter import KatdalZarrStore
from karoo.dataset.synthetic import short_script, write_dataset

from .test_writer import (
    N_BLS,
    N_CHANS,
    PER_SUB,
    STREAM,
    make_senders,
    make_telstate,
    send_dumps,
    sensor,
    writer,
)

MISSING_DUMP = 9  # never sent: whole rows of chunks absent, so some shards are partial
HALF_DUMP = 5  # the second sender's heaps of this dump are never sent


def test_shard_chunks_option():
    assert parse_shard_chunks(None) is None
    assert parse_shard_chunks("") is None
    assert parse_shard_chunks("2,4") == (2, 4)
    assert parse_shard_chunks([2, 4]) == (2, 4)  # JSON-like telstate config
    assert VisWriterConfig(shard_chunks=[1, 8]).shard_chunks == (1, 8)
    for bad in ("2", "2,0", "1,2,3", "a,b", [2.5, 1], [-1, 2], 3):
        with pytest.raises(ValueError, match="shard_chunks"):
            parse_shard_chunks(bad)
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["vis-writer", "--shard-chunks", "4,2"])
    assert VisWriterConfig.from_args(args).shard_chunks == (4, 2)
    assert VisWriterConfig.from_args(parser.parse_args(["flag-writer"])).shard_chunks is None
    with pytest.raises(SystemExit):
        parser.parse_args(["vis-writer", "--shard-chunks", "4,x"])


def count_objects(store: ChunkStore, cbid: str) -> int:
    """Chunk (or shard) objects of every array of a stream, from a listing of the store."""
    group = store.open_zarr_group(cbid, STREAM)

    async def listing(prefix):
        return [key async for key in group.store.list_prefix(prefix)]

    return sum(len(sync(listing(f"{group[name].path}/c/"))) for name in group.array_keys())


async def capture(url: str, cbid: str, data: dict, ts, **config) -> dict:
    """One capture block through the writer; the sensors at its end."""
    n_dumps = len(data["flags"])
    async with writer(url, ts, obj_size_mb=0.005, buffer_mb=5, **config) as (service, client):
        await client.request("capture-init", cbid)
        (a, b) = await make_senders(service)
        for d in range(n_dumps):
            if d != MISSING_DUMP:
                await send_dumps([a] if d == HALF_DUMP else [a, b], data, [d])
        for sender, _ in (a, b):
            await sender.stop()
        await client.request("capture-done")
        return {name: sensor(service, name) for name in (
            "output-chunks-total", "output-shards-total", "output-failed-chunks-total",
            "input-missing-heaps-total", "queued-bytes", "device-status")}


@pytest.fixture(params=["local", "s3"])
def store_kwargs(request, tmp_path, monkeypatch):
    if request.param == "local":
        return str(tmp_path / "store"), {}
    server = request.getfixturevalue("s3_server")
    server.start_gateway()
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    return "s3://", {"endpoint_url": server.endpoint_url, "access_key": server.access_key,
                     "secret_key": server.secret_key}


async def test_sharded_capture_reads_back(store_kwargs, cbid, tmp_path):
    """A sharded capture with lost heaps equals what was sent, through karoo.open (and katdal
    via karoo's adapter), in fewer objects than the same capture unsharded."""
    url, kwargs = store_kwargs
    # The metadata of a real observation (3 antennas: 24 baselines), for karoo.open.
    syn = await asyncio.to_thread(
        write_dataset, tmp_path / "meta", n_ants=3, n_chans=N_CHANS, chunk_info=False,
        capture_block_id=cbid, script=short_script(8.0, 4.0))
    assert syn.vis.shape[1:] == (N_CHANS, N_BLS)
    data = {"correlator_data": syn.vis, "flags": syn.flags, "weights": syn.weights,
            "weights_channel": syn.weights_channel}
    runs = {}
    for label, block, shards in (("sharded", cbid, (2, 2)), ("plain", cbid + "p", None)):
        ts = await make_telstate()
        runs[label] = await capture(url, block, data, ts, shard_chunks=shards,
                                    s3_endpoint_url=kwargs.get("endpoint_url"))
        runs[label]["info"] = await ts.get(f"{block}_{STREAM}_chunk_info")
    sharded, plain = runs["sharded"], runs["plain"]
    for run in (sharded, plain):
        assert run["output-failed-chunks-total"] == 0
        assert run["queued-bytes"] == 0
        assert run["input-missing-heaps-total"] == N_CHANS // PER_SUB * 3 // 2
    # Same chunks, fewer objects; whole shards written in one go wherever no heap was lost.
    assert sharded["output-chunks-total"] == plain["output-chunks-total"]
    assert sharded["output-shards-total"] > 0 and plain["output-shards-total"] == 0
    assert sharded["info"] == {name: {**info, "prefix": stream_prefix(cbid, STREAM)}
                               for name, info in plain["info"].items()}
    store = ChunkStore(url, read_only=True, **kwargs)
    n_sharded = await asyncio.to_thread(count_objects, store, cbid)
    n_plain = await asyncio.to_thread(count_objects, store, cbid + "p")
    assert n_plain == plain["output-chunks-total"]
    assert n_sharded * 3 < n_plain
    # Every shard was written whole but the three with chunks no heap reached (dump 9's two
    # correlator_data shards, and the upper half of dump 5's): those went chunk by chunk.
    assert sharded["output-shards-total"] == n_sharded - 3
    await asyncio.to_thread(check_read_back, store, cbid, syn, sharded["info"], tmp_path)


def check_read_back(store, cbid, syn, info, tmp_path):
    n_dumps = len(syn.flags)

    # karoo.open, from an RDB next to the data (as the meta writer puts it).
    syn.telstate.add(f"{cbid}_{STREAM}_chunk_info", info, immutable=True)
    rdb_dir = tmp_path / "rdb" / cbid
    os.makedirs(rdb_dir)
    rdb = str(rdb_dir / f"{cbid}_{STREAM}.rdb")
    syn.telstate.dump(rdb)
    d = karoo.open(rdb, chunk_store=store)
    assert d.shape == (n_dumps, N_CHANS, N_BLS)
    vis = d.vis[:]
    lost = np.zeros((n_dumps, N_CHANS), bool)
    lost[MISSING_DUMP] = True
    lost[HALF_DUMP, N_CHANS // 2:] = True
    np.testing.assert_array_equal(vis[~lost], syn.vis[~lost])
    assert (vis[lost] == 0).all()
    d.select(flags="data_lost")
    np.testing.assert_array_equal(d.flags[:], np.broadcast_to(lost[..., None], d.shape))
    d.select(flags="ingest_rfi")
    np.testing.assert_array_equal(d.flags[:][~lost], syn.flags[~lost] != 0)
    # The real katdal reads the sharded stream through karoo's adapter, and agrees.
    kd = katdal.open(rdb, chunk_store=KatdalZarrStore(store))
    np.testing.assert_array_equal(kd.vis[:], vis)
    kd.select(flags="data_lost")
    np.testing.assert_array_equal(kd.flags[:], np.broadcast_to(lost[..., None], d.shape))


async def test_shard_row_must_fit_the_budget(tmp_path, cbid):
    """Chunks wait for their shard: a budget that cannot hold two rows of shards is refused."""
    ts = await make_telstate()
    async with writer(str(tmp_path / "store"), ts, buffer_mb=0.2,
                      shard_chunks=(16, 1)) as (_, client):
        with pytest.raises(aiokatcp.FailReply, match="shards of 16 dumps"):
            await client.request("capture-init", cbid)
