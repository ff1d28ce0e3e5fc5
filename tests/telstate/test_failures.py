"""Redis going away, coming back, or stalling mid-call; sync-only conveniences."""

import asyncio
import contextlib
import threading
import time

import pytest

from karoo.telstate import ConnectionError, RedisBackend, TelescopeState
from karoo.telstate import aio as telstate_aio
from karoo.telstate.server import RedisServer, free_port


def test_unreachable_server_gives_clear_error():
    port = free_port()
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        TelescopeState(f"redis://127.0.0.1:{port}")


async def test_unreachable_server_gives_clear_error_async():
    port = free_port()
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        await telstate_aio.TelescopeState.from_url(f"127.0.0.1:{port}")


def test_server_restart_reconnects(tmp_path):
    server = RedisServer(directory=tmp_path)
    port = server.port
    ts = TelescopeState(server.endpoint)  # host:port form
    ts["a"] = 1
    server.stop()
    with pytest.raises(ConnectionError, match="lost connection to Redis"):
        ts["b"] = 2
    with pytest.raises(ConnectionError):
        ts.get("a")
    server = RedisServer(directory=tmp_path, port=port)
    try:
        ts["b"] = 2  # reconnects by itself; scripts are reloaded into the new server
        assert ts["b"] == 2 and "a" not in ts
    finally:
        server.stop()


def test_stalled_server_times_out_then_recovers(redis_server):
    ts = TelescopeState(RedisBackend.from_url(redis_server.url, socket_timeout=0.2))
    ts["a"] = 1
    redis_server.pause()
    try:
        start = time.monotonic()
        with pytest.raises(ConnectionError):
            ts.get("a")
        assert time.monotonic() - start < 10
    finally:
        redis_server.resume()
    assert ts["a"] == 1


def test_interrupted_bulk_write_never_corrupts(redis_server):
    """A bulk add whose reply is lost is resent; the sensor ends up exactly right."""
    ts = TelescopeState(RedisBackend.from_url(redis_server.url, socket_timeout=0.3))
    ts.clear()
    samples = [("sens", float(i), 1000.0 + i) for i in range(50_000)]
    redis_server.pause()
    threading.Timer(0.5, redis_server.resume).start()
    # If it gives up before the server comes back, the write may or may not have landed.
    with contextlib.suppress(ConnectionError):
        ts.add_many(samples)
    time.sleep(0.6)
    got = ts.get_range("sens", st=0) if "sens" in ts else []
    assert got in ([], [(v, t) for _, v, t in samples])
    ts.add_many(samples)  # and a retry by the caller is harmless
    assert ts.get_range("sens", st=0) == [(v, t) for _, v, t in samples]


async def test_async_wait_key_cancellation_and_reuse(redis_url):
    ts = await telstate_aio.TelescopeState.from_url(redis_url)
    task = asyncio.create_task(ts.wait_key("never"))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await ts.set("after", 1)
    assert await ts["after"] == 1
    await ts.close()


def test_sync_attribute_style_access():
    ts = TelescopeState()
    ts.n_chans = 4096
    assert ts.n_chans == 4096 and ts["n_chans"] == 4096
    with pytest.raises(AttributeError):
        _ = ts.missing_key
    with pytest.raises(AttributeError, match="reserved"):
        ts.view = 1
    assert "n_chans" in ts and ts.exists("n_chans")


def test_sync_and_async_share_a_memory_backend():
    sync = TelescopeState()
    sync["x"] = 1
    async_view = telstate_aio.TelescopeState(sync.backend).view("cb")

    async def go():
        await async_view.set("y", 2)
        return await async_view["x"]

    assert asyncio.run(go()) == 1
    assert sync["cb_y"] == 2
