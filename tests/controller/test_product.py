"""The product controller over a real aiokatcp client, launching real daemon processes.

The daemons here are `recorder_daemon.py`: real `karoo.service.Service` processes that take
their configuration from telstate and record each request in it, so these tests see the
launch order, the configuration each task received and the order of capture transitions.
"""

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import aiokatcp
import pytest

from karoo.controller.launch import ProcessLauncher
from karoo.controller.product import ProductController
from karoo.telstate import TelescopeState

RECORDER = [sys.executable, str(Path(__file__).with_name("recorder_daemon.py"))]


def product_config(**settings):
    return {
        "version": "1.0",
        "outputs": {
            "cbf_baseline_correlation_products": {
                "type": "sim.cbf.baseline_correlation_products",
                "n_antennas": 4, "n_chans": 256, "int_time": 0.5, "n_substreams": 4},
            "sdp_l0": {"type": "sdp.vis", "src_streams": ["cbf_baseline_correlation_products"],
                       "output_int_time": 1.0, "continuum_factor": 1, "archive": True},
            "sdp_l0_continuum": {"type": "sdp.vis",
                                 "src_streams": ["cbf_baseline_correlation_products"],
                                 "output_int_time": 1.0, "continuum_factor": 16},
            "cal": {"type": "sdp.cal", "src_streams": ["sdp_l0"]},
            "sdp_l0_cal_flags": {"type": "sdp.flags", "src_streams": ["sdp_l0", "cal"]},
        },
        "config": {"ingest_servers": 2, **settings},
        "simulation": {"script": "calibrator-target"},
    }


@pytest.fixture
async def product(tmp_path):
    server = ProductController("127.0.0.1", 0, data_dir=tmp_path,
                               launcher=ProcessLauncher(tmp_path, command=RECORDER),
                               ready_timeout=60)
    await server.start()
    client = await aiokatcp.Client.connect("127.0.0.1", server.port)
    yield server, client
    client.close()
    await client.wait_closed()
    await server.stop()
    for runner in server.runners:  # nothing may outlive the test
        assert not runner.alive


async def sensor(client, name):
    _, informs = await client.request("sensor-value", name)
    return informs[0].arguments[4].decode()


def requests_seen(server):
    ts = TelescopeState("redis://" + server.telstate_endpoint)
    try:
        return [tuple(v) for v, _ in ts.get_range("test_requests", st=0)]
    finally:
        ts.close()


async def wait_for(predicate, timeout=30.0):
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


async def test_configure_capture_deconfigure(product):
    server, client = product
    config = product_config()
    await client.request("product-configure", "array_1", json.dumps(config))
    assert await sensor(client, "product-state") == "idle"
    # Every task is up, its sensors replicated under its name, its config read from telstate.
    names = [r.task.name for r in server.runners]
    assert names == ["sim.cbf_baseline_correlation_products", "ingest.sdp_l0.1",
                     "ingest.sdp_l0.2", "cal.1", "vis_writer.sdp_l0",
                     "flag_writer.sdp_l0_cal_flags", "meta_writer"]
    for name in names:
        assert await sensor(client, f"{name}.state") == "ready"
        assert await sensor(client, f"{name}.device-status") == "ok"
    ts = TelescopeState("redis://" + await sensor(client, "telstate-endpoint"))
    try:
        ingest2 = ts["test_config.ingest.sdp_l0.2"]
        assert ingest2["server_id"] == 2 and ingest2["servers"] == 2
        assert ingest2["cbf_name"] == "cbf_baseline_correlation_products"
        assert ingest2["l0_continuum_name"] == "sdp_l0_continuum"
        sim = ts["test_config.sim.cbf_baseline_correlation_products"]
        assert sim["cbf_spead"] == ingest2["cbf_spead"]
        assert sim["script"] == "calibrator-target"
        cal = ts["test_config.cal.1"]
        vis_writer = ts["test_config.vis_writer.sdp_l0"]
        flag_writer = ts["test_config.flag_writer.sdp_l0_cal_flags"]
        assert cal["l0_spead"] == vis_writer["l0_spead"] == ingest2["l0_spectral_spead"]
        assert flag_writer["l0_spead"] == cal["flags_spead"]
        assert vis_writer["store"] == str(server.data_dir / "store")
        assert ts["sdp_archived_streams"] == ["sdp_l0", "cal", "sdp_l0_cal_flags"]
        assert ts["subarray_product_id"] == "array_1"
        assert set(ts["sdp_task_details"]) == set(names)

        for cbid in ("1700000001", "1700000002"):
            await client.request("capture-init", cbid)
            assert await sensor(client, "product-state") == "capturing"
            assert json.loads(await sensor(client, "capture-block-state")) == {
                cbid: "capturing"}
            reply, _ = await client.request("capture-done")
            assert reply == [cbid.encode()]
            assert await sensor(client, "product-state") == "idle"
            await wait_for(lambda: server._cb_sensor.value == "{}")
        assert ts.get_range("sdp_capture_block_id", st=0)[-1][0] == "1700000002"
    finally:
        ts.close()

    seen = [r for r in requests_seen(server) if r[2] == "1700000001" or r[0].startswith("sim")]
    order = [(name.split(".")[0], request) for name, request, *_ in seen]

    def position(task, request):
        return order.index((task, request))

    # capture-init: consumers, then ingest, then the simulator starts.
    for consumer in ("cal", "vis_writer", "flag_writer"):
        assert position(consumer, "capture-init") < position("ingest", "capture-init")
    assert position("ingest", "capture-init") < position("sim", "capture-start")
    # capture-done: simulator, ingest, then writers and cal, light RDB, flags, full RDB.
    assert position("sim", "capture-stop") < position("ingest", "capture-done")
    for consumer in ("cal", "vis_writer"):
        assert position("ingest", "capture-done") < position(consumer, "capture-done")
        assert position(consumer, "capture-done") < order.index(("meta_writer", "write-meta"))
    light = [r for r in seen if r[1] == "write-meta"]
    assert [r[3] for r in light] == ["1", "0"]
    assert seen.index(light[0]) < seen.index(("flag_writer.sdp_l0_cal_flags", "capture-done",
                                               "1700000001")) < seen.index(light[1])
    assert sum(1 for r in seen if r[1] == "capture-done" and r[0].startswith("ingest")) == 2

    processes = [r.process for r in server.runners]
    reply, _ = await client.request("product-deconfigure")
    assert reply == [b"0"]
    assert await sensor(client, "product-state") == "dead"
    assert all(p.returncode is not None for p in processes)
    # Stopped gracefully (SIGTERM), not killed.
    assert all(p.returncode == 0 for p in processes)


async def test_task_death_while_capturing(product):
    server, client = product
    await client.request("product-configure", "array_1", json.dumps(product_config()))
    await client.request("capture-init", "1700000010")
    ingest = next(r for r in server.runners if r.task.name == "ingest.sdp_l0.1")
    os.kill(ingest.process.pid, signal.SIGKILL)
    await wait_for(lambda: server.state.name == "ERROR")
    assert await sensor(client, "device-status") == "fail"
    reason = await sensor(client, "device-status-reason")
    assert "ingest.sdp_l0.1 died (killed by signal 9)" in reason
    # The rest finished the capture block: data flushed, light and full RDB written.
    await wait_for(lambda: server._cb_sensor.value == "{}")
    seen = requests_seen(server)
    done = {r[0] for r in seen if r[1] == "capture-done"}
    assert {"ingest.sdp_l0.2", "cal.1", "vis_writer.sdp_l0",
            "flag_writer.sdp_l0_cal_flags"} <= done
    assert [r[3] for r in seen if r[1] == "write-meta"] == ["1", "0"]
    # ERROR is sticky: no new capture block until deconfigured.
    with pytest.raises(aiokatcp.FailReply, match="product is error"):
        await client.request("capture-init", "1700000011")
    await client.request("product-deconfigure")
    assert await sensor(client, "product-state") == "dead"


async def test_bad_requests(product):
    server, client = product
    with pytest.raises(aiokatcp.FailReply, match="invalid product configuration: "
                       "outputs/sdp_l0: 'output_int_time' is a required property"):
        config = product_config()
        del config["outputs"]["sdp_l0"]["output_int_time"]
        await client.request("product-configure", "array_1", json.dumps(config))
    with pytest.raises(aiokatcp.FailReply, match="not valid JSON"):
        await client.request("product-configure", "array_1", "{not json")
    with pytest.raises(aiokatcp.FailReply, match="unicast udp gives it only one"):
        await client.request("product-configure", "array_1",
                             json.dumps(product_config(transport="udp", ingest_servers=1)))
    # A failed configure leaves the controller usable.
    config = product_config(service_overrides={"cal": {"config": {"fail_on": "capture-init"}}})
    await client.request("product-configure", "array_1", json.dumps(config))
    with pytest.raises(aiokatcp.FailReply, match="already configured"):
        await client.request("product-configure", "array_2", json.dumps(config))
    with pytest.raises(aiokatcp.FailReply, match="not capturing"):
        await client.request("capture-done")
    with pytest.raises(aiokatcp.FailReply, match=r"cal.1: \?capture-init 17.*refuses"):
        await client.request("capture-init", "1700000020")
    assert await sensor(client, "product-state") == "error"
    # The tasks that had started the block finished it; ingest and the simulator never got it.
    await wait_for(lambda: server._cb_sensor.value == "{}")
    seen = requests_seen(server)
    assert {r[0] for r in seen if r[1] == "capture-done"} == {"vis_writer.sdp_l0",
                                                              "flag_writer.sdp_l0_cal_flags"}
    assert not [r for r in seen if r[0].startswith(("ingest", "sim"))]
    assert await sensor(client, "device-status-reason") == (
        "cal.1: ?capture-init 1700000020 failed: cal.1 refuses capture-init (test)")
    await client.request("product-deconfigure")
    with pytest.raises(aiokatcp.FailReply, match="already dead"):
        await client.request("product-deconfigure")


async def test_task_that_fails_to_start(product):
    server, client = product
    config = product_config(service_overrides={"meta_writer": {"config": {"slow_done": "x"}}})
    with pytest.raises(aiokatcp.FailReply, match=r"meta_writer failed to start: exited with "
                       r"status 2(.|\n)*slow-done"):
        await client.request("product-configure", "array_1", json.dumps(config))
    assert await sensor(client, "product-state") == "dead"
    assert all(not r.alive for r in server.runners)


async def test_forced_deconfigure_while_configuring(product):
    server, client = product
    configure = asyncio.ensure_future(
        client.request("product-configure", "array_1", json.dumps(product_config())))
    await wait_for(lambda: any(r.process is not None for r in server.runners))
    with pytest.raises(aiokatcp.FailReply, match="busy with product-configure"):
        await client.request("capture-init", "1700000030")
    await client.request("product-deconfigure", "1")
    with pytest.raises(aiokatcp.FailReply):
        await configure
    assert await sensor(client, "product-state") == "dead"
    assert all(not r.alive for r in server.runners)
