"""A simulated product on real daemons, through the master controller and a real aiokatcp
client: sim -> ingest x 2 -> vis writer and cal -> flag writer -> meta writer, with a real
redis-server per product and multicast SPEAD on this host.

Two capture blocks come out complete (RDB files, chunk_info, Zarr arrays, calibration products);
kill -9 of an ingest or of the vis writer mid-capture puts the product in ERROR after the others
have finished the capture block, so the RDB is still written and nothing hangs.
"""

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import struct
from pathlib import Path

import aiokatcp
import numpy as np
import pytest

from karoo.cli import build_parser
from karoo.controller.master import MasterController
from karoo.controller.schema import simulated_config
from karoo.flags import DATA_LOST
from karoo.telstate import TelescopeState

from .test_master import kill_tree

DAEMONS = {"sim", "ingest", "cal", "vis-writer", "flag-writer", "meta-writer"}
CBF = "cbf_baseline_correlation_products"


def _commands():
    return set(build_parser()._subparsers._group_actions[0].choices)


def _multicast_loops_back() -> bool:
    """Whether a multicast datagram sent here reaches a receiver here (two in fact)."""
    group = f"239.255.{random.randrange(256)}.{random.randrange(1, 255)}"
    socks = []
    try:
        for _ in range(2):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((group, 0 if not socks else socks[0].getsockname()[1]))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                            struct.pack("4s4s", socket.inet_aton(group),
                                        socket.inet_aton("0.0.0.0")))
            sock.settimeout(1)
            socks.append(sock)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            tx.sendto(b"karoo", (group, socks[0].getsockname()[1]))
        return all(s.recv(16) == b"karoo" for s in socks)
    except OSError:
        return False
    finally:
        for sock in socks:
            sock.close()


pytestmark = [
    pytest.mark.skipif(not _commands() >= DAEMONS,
                       reason=f"daemons not in this tree: {sorted(DAEMONS - _commands())}"),
    pytest.mark.skipif(not _multicast_loops_back(),
                       reason="multicast does not loop back on this host (no MULTICAST "
                              "interface with a route for 239.0.0.0/8)"),
]


def config(store: Path):
    return simulated_config(
        n_antennas=4, n_chans=256, int_time=0.25, output_int_time=0.5, continuum_factor=16,
        script="short", store=str(store), ingest_servers=2,
        multicast_cidr=f"239.192.{random.randrange(64)}.0/24",
    )


@pytest.fixture
async def master(tmp_path):
    server = MasterController("127.0.0.1", 0, state_dir=tmp_path / "master",
                              configure_timeout=180)
    await server.start()
    client = await aiokatcp.Client.connect("127.0.0.1", server.port)
    yield server, client
    pids = [p.pid for p in server.products.values()]
    with contextlib.suppress(Exception):
        for name in list(server.products):
            await asyncio.wait_for(client.request("product-deconfigure", name, "1"), 60)
    client.close()
    await client.wait_closed()
    await server.stop()
    for pid in pids:  # nothing may outlive the test
        kill_tree(pid)


async def value(client, name):
    _, informs = await client.request("sensor-value", name)
    return informs[0].arguments[4].decode()


async def wait_until(check, what, timeout=90.0):
    async def poll():
        while not await check():
            await asyncio.sleep(0.2)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def capture_some(client, product, dumps=6):
    """capture-init, then wait until the vis writer has received `dumps` dumps' heaps."""
    cbid = (await client.request("capture-init", product))[0][0].decode()
    heaps = f"{product}.vis_writer.sdp_l0.input-heaps-total"

    async def enough():
        return int(await value(client, heaps)) >= 2 * dumps  # 2 ingest servers: 2 heaps/dump

    await wait_until(enough, f"{dumps} dumps at the vis writer")
    return cbid


async def postprocessed(client, product):
    async def done():
        return json.loads(await value(client, f"{product}.capture-block-state")) == {}

    await wait_until(done, "post-processing of the capture block")


def rdb(store: Path, cbid: str, full: bool) -> TelescopeState:
    path = store / cbid / f"{cbid}_sdp_l0{'.full' if full else ''}.rdb"
    assert path.exists(), path
    ts = TelescopeState()
    ts.load_from_file(str(path))
    return ts


def check_stream(store: Path, ts: TelescopeState, cbid: str, stream: str, min_dumps: int):
    """chunk_info in the RDB matches the Zarr arrays, which hold real (not lost) data."""
    import zarr

    info = ts[f"{cbid}_{stream}_chunk_info"]
    group = zarr.open_group(str(store / f"{cbid}-{stream.replace('_', '-')}"), mode="r")
    flags = group["flags"][:]
    assert flags.shape == tuple(info["flags"]["shape"])
    assert flags.shape[0] >= min_dumps
    lost = np.mean(flags & DATA_LOST != 0)
    assert lost < 0.5, f"{stream}: {lost:.0%} of the data lost"
    return group


async def test_two_capture_blocks(master, tmp_path):
    _, client = master
    store = tmp_path / "store"
    await client.request("product-configure", "array_1", json.dumps(config(store)))
    cbids = []
    for _ in range(2):
        cbids.append(await capture_some(client, "array_1"))
        assert (await client.request("capture-done", "array_1"))[0] == [cbids[-1].encode()]
    await postprocessed(client, "array_1")
    await client.request("product-deconfigure", "array_1")
    assert int(cbids[1]) > int(cbids[0])
    for cbid in cbids:
        light, full = rdb(store, cbid, False), rdb(store, cbid, True)
        assert light["capture_block_id"] == cbid and light["stream_name"] == "sdp_l0"
        group = check_stream(store, light, cbid, "sdp_l0", 6)
        assert group["correlator_data"].shape == group["flags"].shape
        check_stream(store, full, cbid, "sdp_l0_cal_flags", 1)
        # Calibration ran on the block and its products are in the full dump.
        assert [k for k in full.keys() if "cal_product_" in k]  # noqa: SIM118, "no calibration products"


@pytest.mark.parametrize("victim", ["ingest.sdp_l0.1", "vis_writer.sdp_l0"])
async def test_kill_mid_capture(master, tmp_path, victim):
    _, client = master
    store = tmp_path / "store"
    await client.request("product-configure", "array_1", json.dumps(config(store)))
    endpoint = (await client.request("telstate-endpoint", "array_1"))[0][0].decode()
    ts = TelescopeState("redis://" + endpoint)
    pid = ts["sdp_task_details"][victim]["pid"]
    ts.close()
    cbid = await capture_some(client, "array_1")
    os.kill(pid, signal.SIGKILL)

    async def in_error():
        return (await client.request("capture-status", "array_1"))[0] == [b"error"]

    await wait_until(in_error, "the product to reach ERROR")
    reason = await value(client, "array_1.device-status-reason")
    assert f"{victim} died (killed by signal 9)" in reason
    await postprocessed(client, "array_1")
    light, full = rdb(store, cbid, False), rdb(store, cbid, True)
    if victim.startswith("ingest"):
        # The vis writer flushed what it had: the capture block reads back.
        check_stream(store, light, cbid, "sdp_l0", 6)
    else:
        # The vis writer's chunks written before it died are in the store.
        chunks = list((store / f"{cbid}-sdp-l0").rglob("c/*"))
        assert chunks, "no chunk of the killed writer in the store"
    check_stream(store, full, cbid, "sdp_l0_cal_flags", 1)
    await asyncio.wait_for(client.request("product-deconfigure", "array_1"), 120)
