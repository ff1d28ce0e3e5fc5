"""``karoo sim`` and ``karoo ingest`` as the controller runs them: separate processes, telstate
on a real Redis server, SPEAD over UDP on loopback, control over KATCP."""

import asyncio
import os
import signal
import socket
import subprocess
import sys

import aiokatcp
import numpy as np
import pytest
import spead2
import spead2.recv.asyncio

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def karoo(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "karoo.cli", *args], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


async def connect(port, proc, timeout=180.0):
    """A KATCP client, once the daemon listens (the first start may compile kernels)."""
    for _ in range(int(timeout / 0.1)):
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited: {proc.communicate()[1][-2000:]}")
        try:
            return await aiokatcp.Client.connect("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
    raise AssertionError("daemon did not start")


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.communicate()


def test_ingest_refuses_to_start_without_cbf_metadata(redis_url):
    proc = karoo("ingest", "--telstate", redis_url, "--cbf-spead", "udp://127.0.0.1:0",
                 "-p", "0")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "telstate lacks CBF key(s) n_chans" in err
    assert "scale_factor_timestamp" in err


async def test_sim_and_ingest_processes(redis_url):
    cbf_port = free_port(socket.SOCK_DGRAM)
    sim_port, ingest_port = free_port(), free_port()
    stream = spead2.recv.asyncio.Stream(spead2.ThreadPool(), spead2.recv.StreamConfig(),
                                        spead2.recv.RingStreamConfig(heaps=32))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    sock.bind(("127.0.0.1", 0))
    stream.add_udp_reader(sock, 9200)
    l0_port = sock.getsockname()[1]
    sock.close()

    sim = karoo("sim", "--telstate", redis_url, "--cbf-spead", f"udp://127.0.0.1:{cbf_port}",
                "--antennas", "4", "--channels", "256", "--script", "short", "--max-dumps", "8",
                "--clock-ratio", "8", "--rfi", "0", "-p", str(sim_port))
    ingest = None
    try:
        sim_client = await connect(sim_port, sim)
        ingest = karoo("ingest", "--telstate", redis_url,
                       "--cbf-spead", f"udp://127.0.0.1:{cbf_port}",
                       "--l0-spectral-spead", f"udp://127.0.0.1:{l0_port}",
                       "--output-int-time", "1.0", "--clock-ratio", "0", "-p", str(ingest_port))
        client = await connect(ingest_port, ingest)

        async def collect():
            ig = spead2.ItemGroup()
            out = []
            async for heap in stream:
                if "correlator_data" in ig.update(heap):
                    out.append((int(ig["dump_index"].value), np.copy(ig["flags"].value)))
            return out

        task = asyncio.ensure_future(collect())
        await client.request("capture-init", "cb1")
        await sim_client.request("capture-start")
        for _ in range(600):
            _, informs = await sim_client.request("sensor-value", "transmitting")
            if informs[0].arguments[4] == b"0":
                break
            await asyncio.sleep(0.1)
        for _ in range(300):  # until the ingest has received all 8 x 16 heaps
            _, informs = await client.request("sensor-value", "input-heaps-total")
            if int(informs[0].arguments[4]) + 4 * 16 >= 8 * 16:  # the window holds <= 4
                break
            await asyncio.sleep(0.1)
        await client.request("capture-done")
        heaps = await asyncio.wait_for(task, 60)
        assert [index for index, _ in heaps] == [0, 1, 2, 3]
        _, informs = await client.request("sensor-value", "input-heaps-total")
        assert int(informs[0].arguments[4]) == 8 * 16
        for c in (client, sim_client):
            c.close()
            await c.wait_closed()
    finally:
        for proc in (ingest, sim):
            if proc is not None:
                _, err = stop(proc)
                if proc.returncode not in (0, -signal.SIGTERM):
                    pytest.fail(f"daemon failed: {err[-2000:]}")
