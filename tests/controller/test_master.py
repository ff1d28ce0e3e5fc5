"""The master controller over a real aiokatcp client: real product controller processes, each
running real daemon processes (`recorder_daemon.py`), and a master restart."""

import asyncio
import contextlib
import json

import aiokatcp
import psutil
import pytest

from karoo.controller.master import MasterController

from .test_product import RECORDER, product_config


def kill_tree(pid):
    try:
        proc = psutil.Process(pid)
    except psutil.Error:
        return
    for p in [*proc.children(recursive=True), proc]:
        with contextlib.suppress(psutil.Error):
            p.kill()


@pytest.fixture
async def master_factory(tmp_path):
    servers, clients = [], []

    async def make():
        server = MasterController("127.0.0.1", 0, state_dir=tmp_path, task_command=RECORDER)
        await server.start()
        client = await aiokatcp.Client.connect("127.0.0.1", server.port)
        servers.append(server)
        clients.append(client)
        return server, client

    yield make
    pids = {p.pid for s in servers for p in s.products.values()}
    for client in clients:
        client.close()
        await client.wait_closed()
    for server in servers:
        if server.server is not None and server.server.is_serving():
            await server.stop()
    for pid in pids:  # nothing may outlive the test
        kill_tree(pid)


async def informs_of(client, *request):
    _, informs = await client.request(*request)
    return [tuple(a.decode() for a in i.arguments) for i in informs]


async def test_master_lifecycle_and_restart(master_factory):
    master, client = await master_factory()
    reply, _ = await client.request("product-configure", "array_*", json.dumps(product_config()))
    name = reply[0].decode()
    assert name == "array_0"
    pid = master.products[name].pid
    assert (await client.request("capture-status", name))[0] == [b"idle"]
    endpoint = (await client.request("telstate-endpoint", name))[0][0].decode()
    assert endpoint.startswith("127.0.0.1:")
    [(listed, state)] = await informs_of(client, "product-list")
    assert listed == name and state.startswith("idle, started at ")
    # The product controller's sensors, and through it its tasks', appear on the master.
    _, informs = await client.request("sensor-value", f"{name}.ingest.sdp_l0.1.device-status")
    assert informs[0].arguments[4] == b"ok"

    first = (await client.request("capture-init", name))[0][0].decode()
    assert len(first) == 10 and first.isdigit()
    assert (await client.request("capture-status", name))[0] == [b"capturing"]
    assert (await client.request("capture-done", name))[0] == [first.encode()]
    second = (await client.request("capture-init", name))[0][0].decode()
    assert int(second) > int(first)  # strictly increasing, even within one second

    # The master goes away and comes back: the product, still capturing, is found again.
    client.close()
    await client.wait_closed()
    await master.stop()
    master, client = await master_factory()
    assert list(master.products) == [name] and master.products[name].pid == pid
    assert await informs_of(client, "capture-status") == [(name, "capturing")]
    assert (await client.request("capture-done", name))[0] == [second.encode()]
    third = (await client.request("capture-init", name))[0][0].decode()
    assert int(third) > int(second)
    await client.request("capture-done", name)

    await client.request("product-deconfigure", name)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert await informs_of(client, "product-list") == []
    assert json.loads(master.state_file.read_text())["products"] == {}


async def test_master_bad_requests(master_factory):
    master, client = await master_factory()
    bad = product_config()
    bad["outputs"]["cal"]["src_streams"] = ["nope"]
    with pytest.raises(aiokatcp.FailReply, match="outputs/cal/src_streams/0: no stream named"):
        await client.request("product-configure", "array_1", json.dumps(bad))
    with pytest.raises(aiokatcp.FailReply, match="invalid product name"):
        await client.request("product-configure", "bad name!", json.dumps(product_config()))
    with pytest.raises(aiokatcp.FailReply, match="no product named 'array_1'"):
        await client.request("capture-init", "array_1")
    with pytest.raises(aiokatcp.FailReply, match="no product named"):
        await client.request("product-deconfigure", "array_1")
    with pytest.raises(aiokatcp.FailReply):
        await client.request("capture-init")  # missing argument
    # A configuration that passes the schema but whose product fails to start: the product
    # controller reports why and is stopped; nothing is left behind.
    failing = product_config(service_overrides={"cal": {"config": {"slow_done": "x"}}})
    with pytest.raises(aiokatcp.FailReply, match=r"cal\.1 failed to start"):
        await client.request("product-configure", "array_1", json.dumps(failing))
    assert master.products == {}
    # The master is still up and still works.
    await client.request("watchdog")
    reply, _ = await client.request("product-configure", "array_1", json.dumps(product_config()))
    assert reply[0] == b"array_1"
    with pytest.raises(aiokatcp.FailReply, match="already exists"):
        await client.request("product-configure", "array_1", json.dumps(product_config()))
    await client.request("capture-init", "array_1")
    with pytest.raises(aiokatcp.FailReply, match="issue capture-done first"):
        await client.request("product-deconfigure", "array_1")
    # force works while capturing.
    await client.request("product-deconfigure", "array_1", "1")
    assert master.products == {}
    await asyncio.sleep(0)
