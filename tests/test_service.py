"""The daemon base: capture cycle over a real aiokatcp client, telstate-backed configuration."""

import argparse
import asyncio
import json

import aiokatcp
import pytest

from karoo.service import Service, add_service_arguments, apply_telstate_config, task_config
from karoo.telstate import TelescopeState
from karoo.telstate import aio as telstate_aio


class Recorder(Service):
    """A service that records the capture blocks it saw, and can be told to fail one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events = []

    async def capture_init(self, capture_block_id):
        if capture_block_id == "refused":
            raise aiokatcp.FailReply("refused on purpose")
        self.events.append(("init", capture_block_id))

    async def capture_done(self, capture_block_id):
        await asyncio.sleep(0.05)  # a flush that takes time: capture-block-state shows burndown
        self.events.append(("done", capture_block_id))


@pytest.fixture
async def service_and_client():
    service = Recorder("127.0.0.1", 0, telstate=telstate_aio.TelescopeState(), name="test")
    await service.start()
    client = await aiokatcp.Client.connect("127.0.0.1", service.port)
    yield service, client
    client.close()
    await client.wait_closed()
    await service.stop()


async def sensor_value(client, name):
    _, informs = await client.request("sensor-value", name)
    return informs[0].arguments[4].decode()


async def test_capture_cycle(service_and_client):
    service, client = service_and_client
    assert await sensor_value(client, "device-status") == "ok"
    await client.request("capture-init", "1700000000")
    assert json.loads(await sensor_value(client, "capture-block-state")) == {
        "1700000000": "CAPTURING"
    }
    assert await sensor_value(client, "capture-active") == "1"
    done = asyncio.ensure_future(client.request("capture-done"))
    await asyncio.sleep(0.02)
    assert json.loads(await sensor_value(client, "capture-block-state")) == {
        "1700000000": "BURNDOWN"
    }
    await done
    assert json.loads(await sensor_value(client, "capture-block-state")) == {}
    assert service.events == [("init", "1700000000"), ("done", "1700000000")]


async def test_bad_capture_requests(service_and_client):
    service, client = service_and_client
    with pytest.raises(aiokatcp.FailReply, match="without capture-init"):
        await client.request("capture-done")
    with pytest.raises(aiokatcp.FailReply, match="invalid capture block id"):
        await client.request("capture-init", "../etc")
    with pytest.raises(aiokatcp.FailReply, match="refused on purpose"):
        await client.request("capture-init", "refused")
    await client.request("capture-init", "cb1")
    with pytest.raises(aiokatcp.FailReply, match="already capturing cb1"):
        await client.request("capture-init", "cb2")
    with pytest.raises(aiokatcp.FailReply, match="capturing cb1, not cb2"):
        await client.request("capture-done", "cb2")
    await client.request("capture-done", "cb1")
    assert service.events == [("init", "cb1"), ("done", "cb1")]


async def test_stop_finishes_open_capture_block():
    service = Recorder("127.0.0.1", 0, telstate=telstate_aio.TelescopeState(), name="test")
    await service.start()
    client = await aiokatcp.Client.connect("127.0.0.1", service.port)
    await client.request("capture-init", "cb9")
    client.close()
    await client.wait_closed()
    await service.stop()
    assert service.events == [("init", "cb9"), ("done", "cb9")]


def test_task_config_merge_order():
    ts = TelescopeState()
    ts["config"] = {"workers": 1, "ingest": {"workers": 2, "sdp_l0": {"buffer": 3}}}
    ts["config.ingest.sdp_l0"] = {"workers": 4}
    ts["config.ingest.sdp_l0.1"] = {"channels": "0:1024"}
    assert task_config(ts, "ingest.sdp_l0.1") == {"workers": 4, "buffer": 3, "channels": "0:1024"}
    assert task_config(ts, "cal") == {"workers": 1}


def test_telstate_config_gives_defaults(redis_url):
    ts = TelescopeState(redis_url)
    ts["config.demo_daemon"] = {"port": 4321, "host": "0.0.0.0", "unknown_option": 1}
    ts.close()

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    daemon = sub.add_parser("demo-daemon")
    add_service_arguments(daemon, "demo_daemon")
    argv = ["demo-daemon", "--telstate", redis_url, "--host", "127.0.0.2"]
    args = apply_telstate_config(parser.parse_args(argv), lambda: parser.parse_args(argv))
    assert args.port == 4321  # from telstate
    assert args.host == "127.0.0.2"  # the command line wins


async def test_gauges_and_counters():
    service = Recorder("127.0.0.1", 0, telstate=telstate_aio.TelescopeState(), name="test")
    counter = service.add_counter("input-heaps-total", "heaps received")
    gauge = service.add_gauge("queue-bytes", "bytes waiting", "B")
    counter.value += 3
    gauge.value = 1.5
    assert "(prometheus: counter)" in counter.description
    assert (counter.value, gauge.value) == (3, 1.5)


async def test_named_memory_telstate_is_shared():
    """memory://name: daemons in one process share a telstate, as processes share Redis."""
    from karoo.telstate.memory import forget_memory_backend

    sync = TelescopeState("memory://service-test")
    sync["config.x"] = {"port": 1}
    ats = await telstate_aio.TelescopeState.from_url("memory://service-test")
    assert await ats.get("config.x") == {"port": 1}
    assert task_config(TelescopeState("memory://service-test"), "x") == {"port": 1}
    assert "config.x" not in TelescopeState("memory://other-test")
    forget_memory_backend("service-test")
    assert "config.x" not in TelescopeState("memory://service-test")
