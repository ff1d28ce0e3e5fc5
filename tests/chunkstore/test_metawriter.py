"""The meta writer: telstate (on a real Redis) to RDB files that real katsdptelstate and a real
redis-server load, on a local directory and on S3."""

import io
import itertools

import aiokatcp
import numpy as np
import pytest

from karoo.chunkstore.metawriter import MetaWriterConfig, MetaWriterService, rdb_path
from karoo.telstate.aio import TelescopeState
from karoo.telstate.server import RedisServer

STREAM = "sdp_l0"
_ids = itertools.count()


@pytest.fixture
def cbid():
    return f"17200000{next(_ids):02d}"


async def fill_telstate(ts, cbid: str) -> None:
    """The keys an observation leaves: light ones, and some only the full dump has."""
    await ts.set(f"{STREAM}_n_chans", 4096)
    await ts.set(f"{STREAM}_int_time", 7.99)
    await ts.set(f"{STREAM}_sync_time", 1.7e9)
    await ts.set(f"{STREAM}_bandwidth", 856e6)
    await ts.set(f"{STREAM}_center_freq", 1284e6)
    await ts.set(f"{STREAM}_stream_type", "sdp.vis")
    await ts.set(f"{STREAM}_bls_ordering", np.array([["m000h", "m000h"], ["m000h", "m001v"]]))
    await ts.set(f"{cbid}_obs_params", {"observer": "me", "ants": "m000,m001"})
    await ts.add(f"{cbid}_obs_activity", "track", ts=1.7e9 + 10)
    await ts.add(f"{cbid}_obs_activity", "slew", ts=1.7e9 + 5)
    await ts.set(f"{cbid}_{STREAM}_chunk_info", {"flags": {"prefix": f"{cbid}-sdp-l0",
                                                           "shape": (2, 4096, 2)}})
    await ts.set(f"{cbid}_{STREAM}_first_timestamp", 4.0)
    await ts.set("sub_pool_resources", "cbf_1,m000,m001")
    await ts.set("sub_band", "l")
    await ts.set("sub_product", "c856M4k")
    await ts.add("cbf_target", "Zenith, azel, 0, 90", ts=1.7e9)
    for ant in ("m000", "m001"):
        await ts.set(f"{ant}_observer", f"{ant}, -30:42:39.8, 21:26:38.0, 1035.0, 13.5")
        await ts.add(f"{ant}_activity", "track", ts=1.7e9)
    # Only in the full dump:
    await ts.add("anc_air_temperature", 21.5, ts=1.7e9)
    await ts.set_indexed("cal_product_B_parts", 0, [1, 2])
    await ts.set("sdp_archived_streams", [STREAM, "sdp_l0_cal_flags"])
    await ts.set("sdp_l0_cal_flags_stream_type", "sdp.flags")


LIGHT_ABSENT = ("anc_air_temperature", "cal_product_B_parts", "sdp_archived_streams")


def check_katsdptelstate(data: bytes, cbid: str, light: bool) -> None:
    """The file loads into the real katsdptelstate, with the values written."""
    import katsdptelstate

    ts = katsdptelstate.TelescopeState()
    ts.load_from_file(io.BytesIO(data))
    assert ts["capture_block_id"] == cbid
    assert ts["stream_name"] == STREAM
    assert ts[f"{STREAM}_n_chans"] == 4096
    assert ts[f"{cbid}_obs_params"]["observer"] == "me"
    assert ts.get_range(f"{cbid}_obs_activity", st=0) == [("slew", 1.7e9 + 5),
                                                         ("track", 1.7e9 + 10)]
    np.testing.assert_array_equal(ts[f"{STREAM}_bls_ordering"][1], ["m000h", "m001v"])
    assert ts["m001_observer"].startswith("m001")
    assert ts.get_range("m000_activity", st=0) == [("track", 1.7e9)]
    for key in LIGHT_ABSENT:
        assert (key in ts) is not light, key
    if not light:
        assert ts.get_indexed("cal_product_B_parts", 0) == [1, 2]


async def test_write_meta_local(redis_url, tmp_path, cbid):
    ts = await TelescopeState.from_url(redis_url)
    await fill_telstate(ts, cbid)
    service = MetaWriterService("127.0.0.1", 0, telstate=ts, name="meta_writer",
                                config=MetaWriterConfig(store=str(tmp_path)))
    await service.start()
    client = await aiokatcp.Client.connect("127.0.0.1", service.port)
    try:
        _, informs = await client.request("write-meta", cbid)  # light by default
        assert len(informs) == 1
        light = tmp_path / rdb_path(cbid, STREAM, light=True)
        assert informs[0].arguments[0].decode() == str(light)
        check_katsdptelstate(light.read_bytes(), cbid, light=True)
        assert service.sensors["key-failures"].value == 0

        assert not (tmp_path / cbid / "complete").exists()
        # The full dump (as the controller asks for it), then the completion marker.
        await client.request("write-meta", cbid, False)
        full = tmp_path / rdb_path(cbid, STREAM, light=False)
        check_katsdptelstate(full.read_bytes(), cbid, light=False)
        assert (tmp_path / cbid / "complete").exists()
        # capture-done writes both dumps and the marker too.
        for path in (light, full, tmp_path / cbid / "complete"):
            path.unlink()
        await client.request("capture-init", cbid)
        await client.request("capture-done")
        assert light.exists() and full.exists() and (tmp_path / cbid / "complete").exists()

        # A real redis-server loads the file at start-up.
        with RedisServer(directory=full.parent, dbfilename=full.name) as server:
            r = server.client()
            assert r.type("cbf_target") == b"zset"
            assert r.type("cal_product_B_parts") == b"hash"
            assert r.exists(f"{STREAM}_n_chans", "capture_block_id", "stream_name") == 3
            assert r.dbsize() == len(await ts.keys()) + 2
            r.close()

        # Without sdp_archived_streams, the streams are those with chunk_info.
        await ts.delete("sdp_archived_streams")
        _, informs = await client.request("write-meta", cbid)
        assert len(informs) == 1
        with pytest.raises(aiokatcp.FailReply, match=r"no sdp\.vis stream"):
            await client.request("write-meta", "1234")
        # A stream without its light keys: written, and the missing keys counted.
        await client.request("write-meta", cbid, True, "sdp_l0_cal_flags")
        assert service.sensors["key-failures"].value > 0
    finally:
        client.close()
        await client.wait_closed()
        await service.stop()
        await ts.close()


async def test_write_meta_s3(s3_server, cbid, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    s3_server.start_gateway()
    ts = TelescopeState()
    await fill_telstate(ts, cbid)
    service = MetaWriterService("127.0.0.1", 0, telstate=ts, name="meta_writer",
                                config=MetaWriterConfig(store="s3://"))
    await service.start()
    client = await aiokatcp.Client.connect("127.0.0.1", service.port)
    try:
        await client.request("write-meta", cbid, False)
    finally:
        client.close()
        await client.wait_closed()
        await service.stop()
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    body = s3.get_object(Bucket=cbid, Key=f"{cbid}_{STREAM}.full.rdb")["Body"].read()
    check_katsdptelstate(body, cbid, light=False)


async def test_s3_bad_request_is_not_retried(s3_server, monkeypatch):
    """An S3 client error (here an invalid bucket name) is raised as it is, not retried."""
    from karoo.chunkstore import ChunkStore, StoreUnavailable

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    s3_server.start_gateway()
    retried = []
    store = ChunkStore("s3://", on_retry=lambda *args: retried.append(args))
    with pytest.raises(OSError) as info:
        await store.put("x/too-short-a-bucket-name", b"")
    assert not isinstance(info.value, StoreUnavailable)
    assert retried == []
