"""The ingest daemon end to end: karoo sim -> karoo ingest -> L0 receivers, over real spead2
streams, driven through real aiokatcp clients.

The L0 output is read by a plain ``spead2.recv`` stream (not karoo's L0 receiver) in the main
test, and checked against the simulator's own dumps, truth masks and lost-heap table.
"""

import asyncio
import contextlib
import itertools
import os
import random
import socket

import aiokatcp
import numpy as np
import pytest
import spead2
import spead2.recv
import spead2.recv.asyncio
import spead2.send
import spead2.send.asyncio

from karoo import flags as F
from karoo.ingest import kernels as K
from karoo.ingest.service import (
    CBF_KEYS,
    ConfigError,
    IngestConfig,
    IngestService,
    channel_ranges,
)
from karoo.sim import HeapLossModel, RfiEvent, RfiModel
from karoo.sim.service import SimConfig, SimService
from karoo.spead.cbf import CBF_FLAVOUR, CBFSender
from karoo.spead.l0 import L0Receiver
from karoo.spead.transport import inproc_queue, remove_inproc_queues
from karoo.telstate import aio as telstate_aio

CBF = "cbf_baseline_correlation_products"
_names = itertools.count()


# -- helpers --------------------------------------------------------------------------------------


class PlainL0:
    """An L0 receiver written with nothing but spead2: one stream, items looked up by name."""

    def __init__(self, *, queue=None, port=None):
        self.stream = spead2.recv.asyncio.Stream(
            spead2.ThreadPool(), spead2.recv.StreamConfig(max_heaps=4),
            spead2.recv.RingStreamConfig(heaps=64),
        )
        if queue is not None:
            self.stream.add_inproc_reader(queue)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
            self.stream.add_udp_reader(sock, 9200)
            sock.close()
        self.task = asyncio.ensure_future(self._collect())

    async def _collect(self):
        ig = spead2.ItemGroup()
        heaps = []
        async for heap in self.stream:  # ends at the sender's stop heap
            updated = ig.update(heap)
            if "correlator_data" in updated:
                heaps.append({name: np.copy(item.value) if isinstance(item.value, np.ndarray)
                              else item.value for name, item in ig.items()})
        return heaps


async def sensor(client, name):
    _, informs = await client.request("sensor-value", name)
    return informs[0].arguments[4].decode()


async def wait_sensor(client, name, predicate, timeout=60.0):
    for _ in range(int(timeout / 0.05)):
        value = await sensor(client, name)
        if predicate(value):
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"sensor {name} stuck at {value}")


async def wait_received(ingest, n_heaps, timeout=60.0):
    """Wait until the ingest's receiver has seen `n_heaps` data heaps (some may still be in
    its window, not yet in the sensors), so that capture-done cannot cut them off."""
    rx = ingest.receiver
    for _ in range(int(timeout / 0.05)):
        if rx.heaps_seen - rx.counters["metadata"] >= n_heaps:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"only {rx.heaps_seen} heaps arrived")


@contextlib.asynccontextmanager
async def running(service):
    await service.start()
    client = await aiokatcp.Client.connect("127.0.0.1", service.port)
    try:
        yield client
    finally:
        client.close()
        await client.wait_closed()
        await service.stop()


def sim_config(cbf_spead, **kwargs):
    defaults = dict(antennas=4, channels=256, script="short", clock_ratio=0, rfi=0.0,
                    max_dumps=16)
    defaults.update(kwargs)
    return SimConfig(cbf_spead=cbf_spead, **defaults)


def make_sim(channels=256, seed=0):
    """A clean simulator with the contract's CBF stream name, to customise in a test."""
    return sim_config("inproc://unused", channels=channels, seed=seed).make_simulator()


def converted(sim, index, permutation):
    """A CBF dump as ingest should see it: complex64 / n_accs, output baseline order."""
    data = sim.dump(index).data
    vis = (data[..., 0] + 1j * data[..., 1]).astype(np.complex64) / np.float32(sim.config.n_accs)
    return vis[:, permutation].astype(np.complex64)


@pytest.fixture
def names():
    n = next(_names)
    used = []

    def make(kind):
        spec = f"inproc://{kind}-{os.getpid()}-{n}"
        used.append(spec)
        return spec

    yield make
    for spec in used:
        remove_inproc_queues(spec)


# -- tests ----------------------------------------------------------------------------------------


def test_channel_ranges():
    # Four servers over 4096 channels in 256-channel substreams, continuum factor 16.
    r = channel_ranges(4096, 256, 4, 2, continuum_factor=16, guard=64, all_output=(464, 1744))
    assert r.output == (784, 1104)
    assert r.input == (720, 1168)
    assert r.subscribed == (512, 1280)
    r = channel_ranges(1024, 64, 2, 1, continuum_factor=16, guard=64)
    assert r == ((0, 512), (0, 576), (0, 576))
    with pytest.raises(ConfigError, match="continuum"):
        channel_ranges(1024, 64, 3, 1, continuum_factor=16)


async def test_missing_cbf_key_refuses_to_start(names):
    ts = telstate_aio.TelescopeState()
    sim = SimService("127.0.0.1", 0, telstate=ts, name="sim", config=sim_config(names("cbf")))
    await sim.write_metadata()
    # a telstate holding everything but one key, at the level ingest looks for it
    partial = telstate_aio.TelescopeState()
    for key in await ts.keys():
        if not key.endswith("_scale_factor_timestamp"):
            await partial.add(key, await ts.get(key), immutable=True)
    ingest = IngestService("127.0.0.1", 0, telstate=partial, name="ingest",
                           config=IngestConfig(cbf_spead=names("cbf")))
    with pytest.raises(ConfigError, match="scale_factor_timestamp"):
        await ingest.start()
    # and reading them all works on the full one
    ingest = IngestService("127.0.0.1", 0, telstate=ts, name="ingest",
                           config=IngestConfig(cbf_spead=names("cbf")))
    await ingest.configure()
    assert ingest.cbf.n_chans == 256 and len(CBF_KEYS) == 11


async def test_sim_to_ingest_to_plain_spead2(names):
    """Shapes, timestamps, weights, time and channel averaging, telstate keys."""
    ts = telstate_aio.TelescopeState()
    cbf = names("cbf")
    sim = SimService("127.0.0.1", 0, telstate=ts, name="sim", config=sim_config(cbf))
    spectral = PlainL0()
    continuum = PlainL0()
    config = IngestConfig(
        cbf_spead=cbf, l0_spectral_spead=f"udp://127.0.0.1:{spectral.port}",
        l0_continuum_spead=f"udp://127.0.0.1:{continuum.port}", output_int_time=2.0,
        continuum_factor=16, clock_ratio=0,
    )
    ingest = IngestService("127.0.0.1", 0, telstate=ts, name="ingest", config=config)
    async with running(sim) as sim_client, running(ingest) as client:
        await client.request("capture-init", "cb1")
        await sim_client.request("capture-start", CBF)
        await sim.wait_finished()
        await wait_received(ingest, 16 * 16)
        await client.request("capture-done")
        heaps = await asyncio.wait_for(spectral.task, 30)
        cont_heaps = await asyncio.wait_for(continuum.task, 30)
        assert await sensor(client, "output-dumps-total") == "4"
        assert await sensor(client, "input-dumps-total") == "16"
        assert await sensor(client, "input-missing-heaps-total") == "0"
        assert await sensor(client, "device-status") == "ok"

    s = sim.simulator
    n_accs = s.config.n_accs
    perm = ingest.permutation
    n_bls = len(perm)
    assert n_bls == 40
    # telstate, as katsdpingest writes it
    view = ts.view("sdp_l0")
    assert await view.get("n_chans") == 256
    assert await view.get("n_bls") == n_bls
    assert await view.get("need_weights_power_scale") is True
    assert await view.get("stream_type") == "sdp.vis"
    assert await view.get("src_streams") == [CBF]
    assert await view.get("sync_time") == s.sync_time
    int_time = await view.get("int_time")
    assert int_time == pytest.approx(4 * s.config.dump_period)
    assert [tuple(p) for p in await view.get("bls_ordering")] == ingest.bls_ordering
    assert await ts.get("sdp_l0_continuum_n_chans") == 16
    width = s.config.channel_width
    assert await ts.get("sdp_l0_continuum_center_freq") == pytest.approx(
        s.config.band.center_freq + 7.5 * width)
    first_adc = await ts.get("cb1_sdp_l0_first_timestamp_adc")
    assert first_adc == s.first_timestamp
    first = await ts.get("cb1_sdp_l0_first_timestamp")
    assert await ts.get("cb1_sdp_l0_continuum_first_timestamp") == first

    assert [h["dump_index"] for h in heaps] == [0, 1, 2, 3]
    assert [h["dump_index"] for h in cont_heaps] == [0, 1, 2, 3]
    for k, (h, c) in enumerate(zip(heaps, cont_heaps, strict=True)):
        assert h["correlator_data"].shape == (256, n_bls)
        assert h["correlator_data"].dtype == np.complex64
        assert h["flags"].dtype == np.uint8 and h["weights"].dtype == np.uint8
        assert h["weights_channel"].shape == (256,)
        assert c["correlator_data"].shape == (16, n_bls)
        assert int(h["frequency"]) == 0
        # centre of the output dump, seconds since sync: the mean of its CBF dump centres
        centres = [s.dump_time(d) - s.sync_time for d in range(4 * k, 4 * k + 4)]
        assert h["timestamp"] == pytest.approx(np.mean(centres), abs=1e-6)  # float64 at 1.7e9 s
        assert h["timestamp"] == pytest.approx(first + k * int_time, abs=1e-9)
        assert c["timestamp"] == h["timestamp"]

        # reference: convert, flag (the flagger is checked against katsdpsigproc elsewhere),
        # excised weighted mean over the four CBF dumps
        vis = np.stack([converted(s, d, perm) for d in range(4 * k, 4 * k + 4)])
        flags = np.stack([K.flag_rfi(v, (v == 0).astype(np.uint8) * F.CAM) for v in vis])
        good = flags == 0
        w = np.where(good.any(axis=0), good, True) * float(n_accs)
        expected = (w * vis).sum(axis=0) / w.sum(axis=0)
        np.testing.assert_allclose(h["correlator_data"], expected, rtol=2e-5, atol=1e-6)
        assert not (h["flags"] & ~np.uint8(F.INGEST_RFI | F.CAM)).any()
        np.testing.assert_array_equal(h["flags"] != 0, ~good.any(axis=0))
        # weights: uint8 x per-channel scale recovers n_dumps x n_accs to half a step
        weight = h["weights"] * h["weights_channel"][:, None]
        np.testing.assert_allclose(weight, w.sum(axis=0),
                                   atol=0.51 * h["weights_channel"].max())
        # continuum: weighted mean of 16 spectral channels, flagged ones excised
        sgood = good.any(axis=0).reshape(16, 16, n_bls)
        keep = np.where(sgood.any(axis=1, keepdims=True), sgood, True)
        wsum = w.sum(axis=0).reshape(16, 16, n_bls) * keep
        cexp = (wsum * expected.reshape(16, 16, n_bls)).sum(1) / wsum.sum(1)
        np.testing.assert_allclose(c["correlator_data"], cexp, rtol=1e-4, atol=1e-5)


def _truth_masks(sim, n_dumps, permutation):
    return np.stack([sim.rfi.mask(d)[:, permutation] for d in range(n_dumps)])


async def _run_ratio_one(names, simulator_config, *, simulator=None, extra=None, expect=None):
    """Run sim -> ingest with one CBF dump per output dump.

    Returns (ingest, L0 dumps, ingest sensors, sim sensors)."""
    ts = telstate_aio.TelescopeState()
    cbf, l0 = names("cbf"), names("l0")
    sim = SimService("127.0.0.1", 0, telstate=ts, name="sim",
                     config=sim_config(cbf, **simulator_config), simulator=simulator)
    config = IngestConfig(cbf_spead=cbf, l0_spectral_spead=l0,
                          **{"output_int_time": 0.5, "clock_ratio": 0, **(extra or {})})
    ingest = IngestService("127.0.0.1", 0, telstate=ts, name="ingest", config=config)
    async with running(sim) as sim_client, running(ingest) as client:
        rx = L0Receiver(l0, sim.simulator.config.n_chans, len(ingest.permutation),
                        sim.simulator.config.n_chans)
        task = asyncio.ensure_future(_collect(rx))
        await client.request("capture-init", "cb1")
        await sim_client.request("capture-start")
        await sim.wait_finished()
        if expect is not None:
            await wait_received(ingest, expect)
        await client.request("capture-done")
        dumps = await asyncio.wait_for(task, 30)
        sensors = {name: await sensor(client, name) for name in (
            "input-heaps-total", "input-missing-heaps-total", "input-dumps-total",
            "output-dumps-total", "output-lost-dumps-total", "device-status")}
        sim_sensors = {name: await sensor(sim_client, name) for name in (
            "output-heaps-total", "lost-heaps-total")}
    return ingest, dumps, sensors, sim_sensors


async def _collect(rx):
    return [d async for d in rx]


@pytest.mark.parametrize("rfi", [True, False], ids=["rfi", "clean"])
async def test_rfi_recall_and_false_flags(names, rfi):
    n_dumps = 8
    sim = make_sim(1024, seed=3)
    if rfi:
        # persistent narrowband transmitters and blips (a per-dump median filter along
        # frequency cannot see broadband bursts wider than its window, nor can the anchor's)
        sim.rfi = RfiModel.random(sim.array, sim.config.channel_freqs, sim.n_dumps, seed=3,
                                  n_narrowband=8, burst_rate=0.0, blip_rate=0.5)
    config = dict(channels=1024, max_dumps=n_dumps)
    ingest, dumps, sensors, _ = await _run_ratio_one(
        names, config, simulator=sim, expect=n_dumps * sim.config.n_substreams)
    assert [d.dump_index for d in dumps] == list(range(n_dumps))
    flagged = np.stack([d.flags & F.INGEST_RFI for d in dumps]) != 0
    perm = ingest.permutation
    if rfi:
        truth = _truth_masks(sim, n_dumps, perm)
        # strong: the injected RFI raised the amplitude by more than 30 sigma of the noise
        clean = make_sim(1024, seed=3)
        raise_amp = np.stack([np.abs(converted(sim, d, perm)) - np.abs(converted(clean, d, perm))
                              for d in range(n_dumps)])
        diff = np.diff(np.stack([converted(clean, d, perm) for d in range(n_dumps)]), axis=1)
        sigma = 1.4826 * np.median(np.abs(diff.real), axis=(0, 1)) / np.sqrt(2)
        strong = truth & (raise_amp > 30 * sigma)
        assert strong.sum() > 100
        recall = flagged[strong].mean()
        assert recall >= 0.95, recall
        false = flagged[~truth].mean()
    else:
        false = flagged.mean()
    assert false <= 1e-3, false
    assert sensors["device-status"] == "ok"


async def test_heap_loss_flags_data_lost_exactly(names):
    n_dumps = 24
    loss = HeapLossModel(random_rate=0.05, burst_rate=0.1, burst_dumps=(1, 2),
                         burst_substreams=(2, 16), seed=5)
    sim = make_sim(seed=5)
    sim.lost = loss.lost(sim.n_dumps, sim.config.n_substreams)
    lost = sim.lost[:n_dumps]
    lost[0] = lost[-1] = False  # the first and last dumps bound the capture
    lost[10] = True  # a whole dump lost: the output keeps its cadence, all data_lost
    lost[11, 3] = True
    n_sub = sim.config.n_substreams
    sent = n_dumps * n_sub - int(lost.sum())
    _, dumps, sensors, sim_sensors = await _run_ratio_one(
        names, dict(max_dumps=n_dumps), simulator=sim, expect=sent)
    assert [d.dump_index for d in dumps] == list(range(n_dumps))
    cps = sim.config.n_chans_per_substream
    for d in dumps:
        expected = np.repeat(lost[d.dump_index], cps)[:, None]
        got = (d.flags & F.DATA_LOST) != 0
        np.testing.assert_array_equal(got, np.broadcast_to(expected, got.shape))
        assert not d.vis[np.broadcast_to(expected, got.shape)].any()
        assert (d.weights[np.broadcast_to(~expected, got.shape)] > 0).all()
    assert int(sim_sensors["lost-heaps-total"]) == int(lost.sum())
    assert int(sim_sensors["output-heaps-total"]) == sent
    assert int(sensors["input-heaps-total"]) == sent
    assert int(sensors["input-missing-heaps-total"]) == int(lost.sum())
    assert int(sensors["output-lost-dumps-total"]) == 1
    assert int(sensors["output-dumps-total"]) == n_dumps


async def test_capture_done_waits_for_a_paced_backlog(names):
    """The simulator sends everything at once while ingest paces its output in real time,
    so most of the capture is still queued when capture-done comes: none of it may be cut."""
    n_dumps = 24
    _, dumps, sensors, _ = await _run_ratio_one(
        names, dict(max_dumps=n_dumps), extra=dict(output_int_time=2.0, clock_ratio=1.6))
    assert [d.dump_index for d in dumps] == list(range(n_dumps // 4))
    assert not any((d.flags & F.DATA_LOST).any() for d in dumps)
    assert sensors["input-dumps-total"] == str(n_dumps)


async def test_adopts_first_timestamp_of_another_server(names):
    """A server that finds <cbid>_sdp_l0_first_timestamp_adc set numbers its dumps from it."""
    sim = make_sim()
    ticks = sim.config.ticks_per_dump
    # pretend another server started three dumps earlier
    ts_key = "cb1_sdp_l0_first_timestamp_adc"
    holder = {}

    class Early(SimService):
        async def write_metadata(self):
            await super().write_metadata()
            await self.telstate.add(ts_key, sim.first_timestamp - 3 * ticks, immutable=True)
            holder["done"] = True

    ts = telstate_aio.TelescopeState()
    cbf, l0 = names("cbf"), names("l0")
    early = Early("127.0.0.1", 0, telstate=ts, name="sim",
                  config=sim_config(cbf, max_dumps=4), simulator=sim)
    ingest = IngestService("127.0.0.1", 0, telstate=ts, name="ingest", config=IngestConfig(
        cbf_spead=cbf, l0_spectral_spead=l0, output_int_time=0.5, clock_ratio=0))
    async with running(early) as sim_client, running(ingest) as client:
        rx = L0Receiver(l0, 256, len(ingest.permutation), 256)
        task = asyncio.ensure_future(_collect(rx))
        await client.request("capture-init", "cb1")
        await sim_client.request("capture-start")
        await early.wait_finished()
        await wait_received(ingest, 4 * 16)
        await client.request("capture-done")
        dumps = await asyncio.wait_for(task, 30)
    assert holder["done"]
    assert [d.dump_index for d in dumps] == [3, 4, 5, 6]
    first = await ts.get("cb1_sdp_l0_first_timestamp")
    int_time = await ts.get("sdp_l0_int_time")
    for d in dumps:
        assert d.timestamp == pytest.approx(first + d.dump_index * int_time, abs=1e-9)


async def test_band_split_two_servers_agree(names):
    ts = telstate_aio.TelescopeState()
    cbf, l0 = names("cbf"), names("l0")
    # the simulator sends each half of the band to its own queue (cbf and cbf.1)
    sim = SimService("127.0.0.1", 0, telstate=ts, name="sim",
                     config=sim_config(cbf + "+1", max_dumps=8))
    services = [
        IngestService("127.0.0.1", 0, telstate=ts, name=f"ingest{k}", config=IngestConfig(
            cbf_spead=cbf if k == 1 else cbf + ".1", l0_spectral_spead=l0,
            output_int_time=1.0, servers=2, server_id=k, guard_channels=0, clock_ratio=0))
        for k in (1, 2)
    ]
    async with running(sim) as sim_client, running(services[0]) as c1, \
            running(services[1]) as c2:
        assert services[0].ranges.output == (0, 128)
        assert services[1].ranges.output == (128, 256)
        rx = L0Receiver(l0, 256, len(services[0].permutation), 128)
        task = asyncio.ensure_future(_collect(rx))
        await c1.request("capture-init", "cb1")
        await c2.request("capture-init", "cb1")
        await sim_client.request("capture-start")
        await sim.wait_finished()
        for service in services:
            await wait_received(service, 8 * 8)
        await asyncio.gather(c1.request("capture-done"), c2.request("capture-done"))
        dumps = await asyncio.wait_for(task, 30)
    assert await ts.get("sdp_l0_n_chans_per_substream") == 128
    assert [d.dump_index for d in dumps] == [0, 1, 2, 3]
    assert all(d.complete for d in dumps)  # both halves, same index and timestamp
    first = await ts.get("cb1_sdp_l0_first_timestamp")
    assert [d.timestamp for d in dumps] == pytest.approx(
        [first + k * await ts.get("sdp_l0_int_time") for k in range(4)])
    assert rx.counters["heaps"] == 8


def _boundary_rfi(sim):
    """Strong RFI next to channel 128, where two servers split a 256-channel band: four-channel
    transmitters ending at the boundary on one side (dumps 0-3) then starting at it on the other
    (4-7), so that a median window cut at the boundary sees mostly RFI, and blips on the
    boundary channels."""
    events = [
        RfiEvent("narrowband", 0, 4, 124, 128, 200.0, 3000.0, 1),
        RfiEvent("narrowband", 4, 4, 128, 132, 200.0, 3000.0, 2),
        RfiEvent("blip", 1, 1, 127, 129, 400.0, 3000.0, 3),
        RfiEvent("blip", 5, 1, 126, 127, 400.0, 3000.0, 4),
        RfiEvent("blip", 6, 1, 128, 129, 400.0, 3000.0, 5),
    ]
    return RfiModel(sim.array, sim.config.n_chans, events)


async def test_guard_channels_make_a_band_split_equal_one_server(names):
    """sim -> two ingest servers with guard channels -> L0 equals one server over the whole
    band, flags and visibilities bit-identical around the inner boundary; without guard
    channels (the negative control) the flags there differ."""
    n_dumps, guard = 8, 16
    sim = make_sim(seed=11)
    sim.rfi = _boundary_rfi(sim)
    ts = telstate_aio.TelescopeState()
    cbf = names("cbf")  # in-process queues fan out: every server gets every heap
    sim_service = SimService("127.0.0.1", 0, telstate=ts, name="sim",
                             config=sim_config(cbf, max_dumps=n_dumps), simulator=sim)
    runs = {"whole": (1, 0), "guarded": (2, guard), "unguarded": (2, 0)}
    outputs = {run: names(f"l0-{run}") for run in runs}
    services = {
        run: [IngestService("127.0.0.1", 0, telstate=ts, name=f"ingest-{run}{k}",
                            config=IngestConfig(
                                cbf_spead=cbf, l0_spectral_spead=outputs[run],
                                l0_spectral_name=f"sdp_l0_{run}", output_int_time=1.0,
                                servers=servers, server_id=k, guard_channels=guard_channels,
                                clock_ratio=0))
              for k in range(1, servers + 1)]
        for run, (servers, guard_channels) in runs.items()
    }
    every = [service for group in services.values() for service in group]
    async with contextlib.AsyncExitStack() as stack:
        sim_client = await stack.enter_async_context(running(sim_service))
        clients = [await stack.enter_async_context(running(s)) for s in every]
        n_bls = len(every[0].permutation)
        tasks = {run: asyncio.ensure_future(_collect(L0Receiver(
            outputs[run], 256, n_bls, 256 // len(services[run])))) for run in runs}
        for client in clients:
            await client.request("capture-init", "cb1")
        await sim_client.request("capture-start")
        await sim_service.wait_finished()
        for service in every:
            await wait_received(service, n_dumps * 16)
        await asyncio.gather(*(client.request("capture-done") for client in clients))
        got = {run: await asyncio.wait_for(task, 30) for run, task in tasks.items()}
        for client in clients:
            assert await sensor(client, "input-missing-heaps-total") == "0"
    assert services["guarded"][0].ranges.input == (0, 128 + guard)
    assert services["guarded"][1].ranges.input == (128 - guard, 256)

    whole, guarded, unguarded = got["whole"], got["guarded"], got["unguarded"]
    assert [d.dump_index for d in whole] == list(range(n_dumps // 2))
    for run in (guarded, unguarded):
        assert [d.dump_index for d in run] == [d.dump_index for d in whole]
        assert [d.timestamp for d in run] == [d.timestamp for d in whole]
        assert all(d.complete for d in run)
    rfi = np.stack([d.flags & F.INGEST_RFI for d in whole]) != 0
    near = slice(128 - guard, 128 + guard)
    truth = _truth_masks(sim, n_dumps, every[0].permutation)
    assert rfi[:, near].sum() > 100  # the boundary RFI is there to be found ...
    assert (rfi[:, near] <= truth.reshape(-1, 2, 256, n_bls).any(1)[:, near]).all()  # ... only
    # Bit-identical around the boundary, where the guard gives each server the median
    # filter's context. Not necessarily elsewhere: each server estimates a baseline's noise
    # (the flagging threshold) from its own channels, as katsdpingest's do, so a sample close
    # to the threshold may go either way (one does, far from the boundary, in this run).
    for a, b in zip(whole, guarded, strict=True):
        for name in ("vis", "flags", "weights", "weights_channel"):
            x, y = getattr(a, name)[near], getattr(b, name)[near]
            assert x.tobytes() == y.tobytes(), name
    # Negative control: without the guard the median windows at the boundary are cut short.
    differ = sum(int(np.count_nonzero(a.flags[near] != b.flags[near]))
                 for a, b in zip(whole, unguarded, strict=True))
    assert differ > 0


async def test_fuzz_udp(names):
    """Random packets and malformed heaps are counted by reason; valid data still flows."""
    ts = telstate_aio.TelescopeState()
    l0 = names("l0")
    sim = SimService("127.0.0.1", 0, telstate=ts, name="sim",
                     config=sim_config("udp://127.0.0.1:9", max_dumps=6))
    await sim.write_metadata()
    ingest = IngestService("127.0.0.1", 0, telstate=ts, name="ingest", config=IngestConfig(
        cbf_spead="udp://127.0.0.1:0", l0_spectral_spead=l0, output_int_time=0.5,
        clock_ratio=0))
    s = sim.simulator
    params = sim.params
    async with running(ingest) as client:
        rx = L0Receiver(l0, 256, len(ingest.permutation), 256)
        task = asyncio.ensure_future(_collect(rx))
        await client.request("capture-init", "cb1")
        port = ingest.receiver.endpoints[0].port
        dest = f"udp://127.0.0.1:{port}"
        rng = random.Random(7)
        # 1. pure garbage datagrams, and SPEAD-looking headers with random bytes after them
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(300):
            size = rng.randrange(1, 9000)
            payload = bytearray(rng.randbytes(size))
            if i % 2 and size >= 8:
                payload[:8] = bytes([0x53, 0x04, 0x02, 0x06, 0, 0, 0, rng.randrange(1, 8)])
            sock.sendto(bytes(payload), ("127.0.0.1", port))
        sock.close()
        tx = await CBFSender.create(dest, params, rate=50e6)
        await tx.start()
        raw = spead2.send.asyncio.UdpStream(
            spead2.ThreadPool(), [("127.0.0.1", port)],
            spead2.send.StreamConfig(max_packet_size=8872, rate=50e6))
        await tx.send_dump(s.dump(0).data, s.dump_timestamp(0))
        await asyncio.sleep(0.2)
        # 2. malformed heaps, each of a known kind
        cps, step = params.n_chans_per_substream, params.timestamp_step
        good_ts = s.dump_timestamp(1)
        xeng = np.zeros((cps, params.n_bls, 2), ">i4")
        cases = [
            (dict(timestamp=good_ts, frequency=0, xeng=xeng[:, :-1]), "bad-size"),
            (dict(timestamp=good_ts, frequency=0, xeng=xeng.astype(">i2")), "bad-size"),
            (dict(frequency=0, xeng=xeng), "missing-items"),
            (dict(timestamp=good_ts, xeng=xeng), "missing-items"),
            (dict(timestamp=good_ts, frequency=3, xeng=xeng), "bad-channel"),
            (dict(timestamp=good_ts, frequency=params.n_chans, xeng=xeng), "bad-channel"),
            (dict(timestamp=good_ts + 17, frequency=0, xeng=xeng), "bad-timestamp"),
            (dict(timestamp=good_ts + 5000 * step, frequency=0, xeng=xeng), "too-far"),
            (dict(timestamp=s.dump_timestamp(0) - 50 * step, frequency=0, xeng=xeng), "too-old"),
        ]
        for kwargs, _ in cases:
            await raw.async_send_heap(_raw_heap(**kwargs))
        # 3. real dumps, one of them with a duplicate heap
        for d in range(1, 6):
            await tx.send_dump(s.dump(d).data, s.dump_timestamp(d))
            if d == 2:
                await tx.send_dump(s.dump(d).data, s.dump_timestamp(d), substreams=[5])
        await tx.stop()
        await wait_received(ingest, 6 * 16 + 1)
        await client.request("capture-done")
        dumps = await asyncio.wait_for(task, 30)
        counts = {}
        for _, reason in cases:
            counts[reason] = counts.get(reason, 0) + 1
        for reason, n in counts.items():
            got = int(await sensor(client, f"input-{reason}-heaps-total"))
            assert got >= n, (reason, got)
        assert int(await sensor(client, "input-duplicate-heaps-total")) == 1
        assert await sensor(client, "device-status") == "ok"
        assert int(await sensor(client, "input-missing-heaps-total")) == 0
    assert [d.dump_index for d in dumps] == list(range(6))
    assert all(not (d.flags & F.DATA_LOST).any() for d in dumps)


async def test_stray_first_heap_does_not_move_dump_zero(names):
    """A well-formed heap far in the future arriving before the correlator starts must not
    become dump 0 (for this server and, through telstate, for every other)."""
    ts = telstate_aio.TelescopeState()
    cbf, l0 = names("cbf"), names("l0")
    sim = SimService("127.0.0.1", 0, telstate=ts, name="sim",
                     config=sim_config(cbf, max_dumps=4))
    ingest = IngestService("127.0.0.1", 0, telstate=ts, name="ingest", config=IngestConfig(
        cbf_spead=cbf, l0_spectral_spead=l0, output_int_time=0.5, clock_ratio=0))
    s, params = sim.simulator, sim.params
    stray = _raw_heap(timestamp=s.dump_timestamp(10**6), frequency=0,
                      xeng=np.zeros((params.n_chans_per_substream, params.n_bls, 2), ">i4"))
    async with running(sim) as sim_client, running(ingest) as client:
        rx = L0Receiver(l0, 256, len(ingest.permutation), 256)
        task = asyncio.ensure_future(_collect(rx))
        await client.request("capture-init", "cb1")
        raw = spead2.send.asyncio.InprocStream(
            spead2.ThreadPool(), [inproc_queue(cbf[len("inproc://"):])],
            spead2.send.StreamConfig(max_packet_size=8872))
        await raw.async_send_heap(stray)
        await sim_client.request("capture-start")
        await sim.wait_finished()
        await wait_received(ingest, 1 + 4 * 16)
        await client.request("capture-done")
        dumps = await asyncio.wait_for(task, 30)
        assert await sensor(client, "input-outvoted-heaps-total") == "1"
        assert await sensor(client, "input-heaps-total") == str(4 * 16)
        for reason in ("too-far", "too-old", "bad-timestamp", "missing", "unconfirmed"):
            assert await sensor(client, f"input-{reason}-heaps-total") == "0", reason
    assert await ts.get("cb1_sdp_l0_first_timestamp_adc") == s.first_timestamp
    assert [d.dump_index for d in dumps] == [0, 1, 2, 3]
    assert not any((d.flags & F.DATA_LOST).any() for d in dumps)


def _raw_heap(timestamp=None, frequency=None, xeng=None):
    ig = spead2.send.ItemGroup(flavour=CBF_FLAVOUR)
    imm = [("u", 48)]
    if timestamp is not None:
        ig.add_item(0x1600, "timestamp", "", shape=(), format=imm, value=timestamp)
    if frequency is not None:
        ig.add_item(0x4103, "frequency", "", shape=(), format=imm, value=frequency)
    if xeng is not None:
        ig.add_item(0x1800, "xeng_raw", "", shape=xeng.shape, dtype=xeng.dtype, value=xeng)
    heap = ig.get_heap(descriptors="none", data="all")
    heap.repeat_pointers = True
    return heap


def test_command_line_options():
    """The option names of the cross-part contract, with telstate config keys as dests."""
    from karoo.cli import build_parser
    args = build_parser().parse_args([
        "ingest", "--cbf-spead", "udp://239.1.2.3+3:7148", "--cbf-name", CBF,
        "--l0-spectral-spead", "udp://127.0.0.1:7200", "--l0-spectral-name", "sdp_l0",
        "--l0-continuum-spead", "udp://127.0.0.1:7201", "--l0-continuum-name", "cont",
        "--output-int-time", "4", "--continuum-factor", "8", "--servers", "4",
        "--server-id", "2", "--backend", "cuda",
    ])
    config = IngestConfig.from_args(args)
    assert (config.servers, config.server_id, config.backend, config.continuum_factor) == (
        4, 2, "cuda", 8)
    assert config.output_int_time == 4.0 and config.l0_continuum_name == "cont"
    with pytest.raises(ConfigError, match="server-id"):
        IngestConfig(servers=2, server_id=3)
