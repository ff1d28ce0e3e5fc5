"""RDB files at the TelescopeState level: karoo, katsdptelstate and redis-server read each other."""

import asyncio
import shutil

import katsdptelstate
import numpy as np
import pytest

from karoo.telstate import RdbParseError, TelescopeState
from karoo.telstate import aio as telstate_aio
from karoo.telstate.server import RedisServer

ATTRS = {
    "sdp_l0_n_chans": 4096, "sdp_l0_bls_ordering": np.array([["m000h", "m000h"]] * 3),
    "sdp_l0_int_time": 0.499, "cbf_target": "3C286, radec, 13:31:08.29, +30:30:33.0",
    "long_text": "x" * 5000, "numbers": list(range(300)), "sdp_l0_sync_time": 1.7e9,
}


def populate(ts):
    for key, value in ATTRS.items():
        ts[key] = value
    for i in range(4):
        for t in range(200):
            ts.add(f"m00{i}_elev", 40.0 + t, ts=1.7e9 + t)
    ts.add("cb_obs_activity", "track", ts=1.7e9)
    for i in range(200):
        ts.set_indexed("cal_product_B", i, np.full(4, i, np.complex64))


def check(ts):
    for key, value in ATTRS.items():
        got = ts[key]
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(got, value)
        else:
            assert got == value, key
    assert ts.get_range("m002_elev", st=0) == [(40.0 + t, 1.7e9 + t) for t in range(200)]
    assert ts["cb_obs_activity"] == "track"
    np.testing.assert_array_equal(ts.get_indexed("cal_product_B", 123), np.full(4, 123))


@pytest.fixture(params=["memory", "redis"])
def source(request, redis_url):
    ts = TelescopeState(redis_url if request.param == "redis" else "")
    populate(ts)
    return ts


def test_dump_loads_in_karoo_katsdptelstate_and_redis_server(source, tmp_path):
    path = tmp_path / "cb.rdb"
    assert source.dump(path) == len(source.keys())
    mine = TelescopeState()
    assert mine.load_from_file(path) == len(source.keys())
    check(mine)
    theirs = katsdptelstate.TelescopeState()
    theirs.load_from_file(str(path))
    check(theirs)
    with RedisServer(directory=tmp_path, dbfilename="cb.rdb") as server:
        check(katsdptelstate.TelescopeState(server.url))
        check(TelescopeState(server.url))


def test_dump_selected_keys(source, tmp_path):
    path = tmp_path / "light.rdb"
    assert source.dump(path, keys=["sdp_l0_n_chans", "cb_obs_activity", "not_there"]) == 2
    light = TelescopeState()
    light.load_from_file(path)
    assert light.keys() == ["cb_obs_activity", "sdp_l0_n_chans"]


def test_load_katsdptelstate_dump(tmp_path):
    theirs = katsdptelstate.TelescopeState()
    populate(theirs)
    from katsdptelstate.rdb_writer import RDBWriter

    with RDBWriter(str(tmp_path / "theirs.rdb")) as writer:
        writer.save(theirs)
    mine = TelescopeState()
    mine.load_from_file(tmp_path / "theirs.rdb")
    check(mine)


def test_load_redis7_save_that_katsdptelstate_cannot_read(tmp_path, redis_url):
    with RedisServer(directory=tmp_path, dbfilename="r7.rdb") as server:
        populate(katsdptelstate.TelescopeState(server.url))
        server.client().save()
    path = tmp_path / "r7.rdb"
    assert path.read_bytes()[:9] == b"REDIS0010"
    with pytest.raises(katsdptelstate.errors.RdbParseError):
        katsdptelstate.TelescopeState().load_from_file(str(path))
    mine = TelescopeState()
    mine.load_from_file(path)
    check(mine)


def test_load_into_redis_backend(tmp_path, redis_url):
    source = TelescopeState()
    populate(source)
    source.dump(tmp_path / "a.rdb")
    target = TelescopeState(redis_url)
    target["already"] = "here"
    target.load_from_file(tmp_path / "a.rdb")
    check(target)
    check(katsdptelstate.TelescopeState(redis_url))
    assert target["already"] == "here"


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_corrupt_file_loads_nothing(tmp_path, redis_url, backend):
    source = TelescopeState()
    populate(source)
    source.dump(tmp_path / "good.rdb")
    data = (tmp_path / "good.rdb").read_bytes()
    target = TelescopeState(redis_url if backend == "redis" else "")
    target["before"] = 1
    for name, content in [("truncated", data[: len(data) * 2 // 3]),
                          ("flipped", data[:100] + bytes([data[100] ^ 0x55]) + data[101:]),
                          ("garbage", b"not an rdb file at all")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(RdbParseError, match=name):
            target.load_from_file(tmp_path / name)
        assert target.keys() == ["before"]


def test_async_dump_and_load(tmp_path):
    async def go():
        ts = telstate_aio.TelescopeState()
        await ts.set("a", 1)
        await ts.add("s", 2.0, ts=5.0)
        await ts.dump(tmp_path / "x.rdb")
        other = telstate_aio.TelescopeState()
        await other.load_from_file(tmp_path / "x.rdb")
        return await other["a"], await other.get_range("s", st=0)

    assert asyncio.run(go()) == (1, [(2.0, 5.0)])


@pytest.mark.skipif(shutil.which("redis-check-rdb") is None, reason="redis-check-rdb missing")
def test_redis_check_rdb_accepts_dump(source, tmp_path):
    import subprocess

    source.dump(tmp_path / "c.rdb")
    result = subprocess.run(["redis-check-rdb", str(tmp_path / "c.rdb")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
