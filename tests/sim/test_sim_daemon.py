"""The ``karoo sim`` daemon: telstate metadata, truth files, capture-start/stop over KATCP."""

import asyncio
import itertools
import json
import os

import aiokatcp
import numpy as np
import pytest

from karoo.ingest.service import CBF_KEYS
from karoo.sim import load_rfi_mask
from karoo.sim.service import SimConfig, SimService, load_script
from karoo.spead.cbf import CBFReceiver
from karoo.spead.transport import remove_inproc_queues
from karoo.telstate import aio as telstate_aio

CBF = "cbf_baseline_correlation_products"
_names = itertools.count()


@pytest.fixture
def spec():
    name = f"inproc://simd-{os.getpid()}-{next(_names)}"
    yield name
    remove_inproc_queues(name)


def config(spec, **kwargs):
    defaults = dict(antennas=4, channels=256, script="short", clock_ratio=0, max_dumps=6)
    defaults.update(kwargs)
    return SimConfig(cbf_spead=spec, **defaults)


async def sensor(client, name):
    _, informs = await client.request("sensor-value", name)
    return informs[0].arguments[4].decode()


async def test_metadata_truth_and_capture_cycle(spec, tmp_path):
    ts = telstate_aio.TelescopeState()
    sim = SimService("127.0.0.1", 0, telstate=ts, name="sim",
                     config=config(spec, truth_dir=str(tmp_path), capture_block_id="cb7",
                                   rfi=1.0))
    await sim.start()
    client = await aiokatcp.Client.connect("127.0.0.1", sim.port)
    try:
        # the CBF keys ingest needs, all on the stream, and the CAM-like sensors
        view = ts.view(CBF)
        for key in CBF_KEYS:
            assert await view.get(key) is not None, key
        assert await ts.get("cbf_sync_time") == sim.simulator.sync_time
        assert await ts.get("cbf_antenna_channelised_voltage_n_chans") == 256
        assert await ts.get("sub_band") == "l"
        assert (await ts.get("m000_observer")).startswith("m000")
        activity = await ts.get_range("cb7_obs_activity", st=0)
        assert [a for a, _ in activity][:2] == ["slew", "track"]
        assert "bpcal" in (await ts.get_range("cbf_target", st=0))[1][0]
        # the truth files
        with np.load(tmp_path / "truth.npz") as truth:
            assert truth["gains"].shape[0] == sim.simulator.n_dumps
        mask = load_rfi_mask(tmp_path / "rfi_mask.npz")
        assert mask.shape == (sim.simulator.n_dumps, 256, 40) and mask.any()
        with np.load(tmp_path / "lost_heaps.npz") as lost:
            assert not lost["lost"].any()

        params = sim.params
        rx = CBFReceiver(spec, params, stop_on_stop_item=False)

        async def collect():
            return [(d.timestamp, d.data.copy()) async for d in rx]

        task = asyncio.ensure_future(collect())
        # send three dumps, stop, resume for the remaining three
        await client.request("capture-start", CBF)
        with pytest.raises(aiokatcp.FailReply, match="already sending"):
            await client.request("capture-start")
        await sim.wait_finished()
        assert await sensor(client, "output-dumps-total") == "6"
        await client.request("capture-stop")  # the script ended: already stopped is fine
        with pytest.raises(aiokatcp.FailReply, match="script is over"):
            await client.request("capture-start")
        with pytest.raises(aiokatcp.FailReply, match="unknown stream"):
            await client.request("capture-start", "other")
        for _ in range(400):
            if rx.heaps_seen - rx.counters["metadata"] >= 6 * params.n_substreams:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the dumps did not arrive")
        rx.stop()
        got = await task
        assert [t for t, _ in got] == [sim.simulator.dump_timestamp(i) for i in range(6)]
        np.testing.assert_array_equal(got[4][1], sim.simulator.dump(4).data)
        assert int(await sensor(client, "output-heaps-total")) == 6 * params.n_substreams
    finally:
        client.close()
        await client.wait_closed()
        await sim.stop()


async def test_stop_and_resume(spec):
    ts = telstate_aio.TelescopeState()
    sim = SimService("127.0.0.1", 0, telstate=ts, name="sim",
                     config=config(spec, clock_ratio=20.0, max_dumps=40, start=True))
    rx = CBFReceiver(spec, sim.params, stop_on_stop_item=False)
    await sim.start()  # --start: already sending
    client = await aiokatcp.Client.connect("127.0.0.1", sim.port)
    try:
        assert await sensor(client, "transmitting") == "1"
        await asyncio.sleep(0.2)
        await client.request("capture-stop")
        assert await sensor(client, "transmitting") == "0"
        stopped_at = sim.next_dump
        assert 0 < stopped_at < 40
        assert int(await sensor(client, "output-dumps-total")) == stopped_at
        await client.request("capture-start")
        await client.request("capture-stop")
        assert sim.next_dump > stopped_at
    finally:
        client.close()
        await client.wait_closed()
        await sim.stop()
        rx.stop()


def test_scripts_and_options(tmp_path):
    assert [s.activity for s in load_script("short")][:2] == ["slew", "track"]
    path = tmp_path / "script.json"
    target = "PKS1934-638, radec bpcal, 19:39:25.03, -63:42:45.6"
    path.write_text(json.dumps([{"activity": "track", "target": target, "duration": 5}]))
    scans = load_script(str(path))
    assert len(scans) == 1 and scans[0].duration == 5.0
    with pytest.raises(ValueError, match="neither a built-in"):
        load_script("no-such-script")
    with pytest.raises(ValueError, match="cbf-name"):
        SimConfig(cbf_name="whatever")
    sim = SimConfig(script=str(path), channels=1024, antennas=8, dump_period=1.0).make_simulator()
    assert sim.config.n_substreams == 32  # 16 doubled until >= 4 x antennas
    assert sim.config.bcp_stream == CBF
    assert sim.n_dumps in (4, 5)  # dumps start on the first whole dump after the start

    from karoo.cli import build_parser
    args = build_parser().parse_args([
        "sim", "--cbf-spead", "udp://239.1.2.3+3:7148", "--cbf-name", CBF, "--antennas", "8",
        "--channels", "1024", "--dump-period", "1.0", "--substreams", "64", "--script",
        "short", "--start",
    ])
    cfg = SimConfig.from_args(args)
    assert (cfg.antennas, cfg.channels, cfg.substreams, cfg.start) == (8, 1024, 64, True)


async def test_capture_block_sensors_follow_the_controllers_capture_block(spec):
    """Without a fixed capture block id, capture-start writes ``<cbid>_obs_*`` for the capture
    block the controller named in ``sdp_capture_block_id`` (what CAM does on a telescope)."""
    ts = telstate_aio.TelescopeState()
    sim = SimService("127.0.0.1", 0, telstate=ts, name="sim", config=config(spec, max_dumps=2))
    await sim.start()
    try:
        assert not await ts.keys("*_obs_activity")
        await ts.add("sdp_capture_block_id", "1700000001")
        await sim.capture_start()
        await sim.wait_finished()
        activity = await ts.get_range("1700000001_obs_activity", st=0)
        assert [a for a, _ in activity][:2] == ["slew", "track"]
        assert (await ts.get("1700000001_obs_params"))["experiment_id"] == "1700000001"
        assert await ts.keys("*_obs_activity") == ["1700000001_obs_activity"]
    finally:
        await sim.stop()
