"""Receive path: CBF SPEAD -> karoo's receiver and the whole ingest daemon, vs plain spead2.

Usage: python benchmarks/bench_spead.py [--quick] [--reps N]

Figures (CBF payload MB/s, heaps pre-queued in an in-process spead2 queue so the sender's cost
is out of the timing; every run checked lossless: no missing or rejected heap):

* ``CBF receive``: `karoo.spead.cbf.CBFReceiver` (chunk stream, numba place callback)
  against a plain ``spead2.recv.Stream`` + ``ItemGroup`` receiver that copies each heap into
  a dump array (the reference document's case (a'), what katsdpingest's receiver does).
* ``sim -> ingest daemon``: `IngestService` receiving, converting, flagging, averaging and
  sending L0, against the same plain spead2 receiver (which does none of the processing).
  Rates are over the dumps delivered before the last receiver window, as in the reference.
* ``ingest peak RSS``: the ingest daemon for 64 antennas x 4096 channels (one server, the
  whole band, 272 MB per CBF dump; 1024 channels with --quick) in a subprocess that also
  holds the sender (one dump) and its in-process queue (about one dump), for a short and a
  long observation (same memory = bounded), against katsdpcontroller's host-memory budget
  for an ingest (32 CBF dumps / servers + 4 GiB). Lower is better here: ratio < 1 is good.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import spead2
import spead2.recv
import spead2.send

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py

from common import parser, report  # noqa: E402

from karoo.spead.cbf import CBFReceiver, CBFSender, CBFStreamParams  # noqa: E402
from karoo.spead.transport import inproc_queue, remove_inproc_queues  # noqa: E402

_count = iter(range(10**6))


def _cbf_ordering(n_ants):
    """The correlator's 4 products per antenna pair (autos included): 2 n (n + 1)."""
    ants = [f"m{a:03d}" for a in range(n_ants)]
    return [(f"{a}{p}", f"{b}{q}") for i, a in enumerate(ants) for b in ants[i:]
            for p in "hv" for q in "hv"]


def _dump(n_chans, n_prod, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.normal(0, 2000, size=(n_chans, n_prod, 2)).astype(np.int32)
    data[..., 0] += 20000
    return data


async def _fill(spec, params, data, n_dumps, base, step):
    """Queue descriptors, n_dumps dumps and a stop heap in an in-process queue."""
    tx = await CBFSender.create(spec, params, byteorder="<", max_packet_size=65536)
    await tx.start()
    for i in range(n_dumps):
        await tx.send_dump(data, base + i * step)
    await tx.stop()


def plain_receive(spec, params, n_dumps):
    """spead2 Stream + ItemGroup, each heap copied into its dump (case a'); returns MB/s."""
    stream = spead2.recv.Stream(spead2.ThreadPool(), spead2.recv.StreamConfig(
        max_heaps=params.n_substreams + 2,
        memory_allocator=spead2.MemoryPool(16384, params.heap_bytes + 4096, 256, 64)),
        spead2.recv.RingStreamConfig(heaps=params.n_substreams + 4))
    stream.add_inproc_reader(inproc_queue(spec.split("://")[1]))
    ig = spead2.ItemGroup()
    dump = np.empty((params.n_chans, params.n_bls, 2), np.int32)
    cps = params.n_chans_per_substream
    heaps = 0
    times = []
    for heap in stream:
        updated = ig.update(heap)
        if "xeng_raw" not in updated:
            continue
        f = int(ig["frequency"].value)
        dump[f:f + cps] = ig["xeng_raw"].value
        heaps += 1
        if heaps % params.n_substreams == 0:
            times.append(time.perf_counter())
    stream.stop()
    assert heaps == n_dumps * params.n_substreams, "plain receiver lost heaps"
    return (len(times) - 1) * params.n_substreams * params.heap_bytes / (times[-1] - times[0]) / 1e6


def karoo_receive(spec, params, n_dumps):
    """karoo's CBFReceiver (chunks placed by the numba callback); returns MB/s."""
    rx = CBFReceiver(spec, params, byteorder="<")
    times = []
    for dump in rx:
        times.append(time.perf_counter())
        assert dump.complete
    c = rx.counters
    assert c["dumps"] == n_dumps and c["missing"] == 0, c
    return (len(times) - 1) * params.n_substreams * params.heap_bytes / (times[-1] - times[0]) / 1e6


async def ingest_daemon(spec, params, n_ants, n_dumps, data):
    """The ingest daemon on pre-queued dumps; returns MB/s of CBF payload processed."""
    from karoo.ingest.service import IngestConfig, IngestService
    from karoo.telstate import aio as telstate_aio

    ts = telstate_aio.TelescopeState()
    cbf = "cbf_baseline_correlation_products"
    step = params.timestamp_step
    attrs = dict(n_chans=params.n_chans, n_chans_per_substream=params.n_chans_per_substream,
                 n_accs=step // (2 * params.n_chans), bls_ordering=_cbf_ordering(n_ants),
                 bandwidth=856e6, center_freq=1284e6,
                 input_labels=[f"m{a:03d}{p}" for a in range(n_ants) for p in "hv"],
                 sync_time=1.7e9, int_time=step / 1712e6, scale_factor_timestamp=1712e6,
                 ticks_between_spectra=2 * params.n_chans)
    for key, value in attrs.items():
        await ts.add(f"{cbf}_{key}", value, immutable=True)
    l0 = f"inproc://bench-l0-{next(_count)}"
    ingest = IngestService("127.0.0.1", 0, telstate=ts, name="ingest", config=IngestConfig(
        cbf_spead=spec, l0_spectral_spead=l0, l0_continuum_spead=l0 + "-cont",
        output_int_time=2 * attrs["int_time"], clock_ratio=0))
    await ingest.start()
    l0_queue = inproc_queue(l0.split("://")[1])
    await ingest.capture_init("bench")
    window = 2  # dumps the receiver holds back for reordering
    t0 = None
    while ingest._dumps_seen < n_dumps - window:
        if t0 is None and ingest._dumps_seen >= 1:
            t0, first = time.perf_counter(), ingest._dumps_seen
        await asyncio.sleep(0.001)
    t1, last = time.perf_counter(), ingest._dumps_seen
    await ingest.capture_done("bench")
    missing = ingest.sensors["input-missing-heaps-total"].value
    assert missing == 0 and ingest.sensors["input-heaps-total"].value == \
        n_dumps * params.n_substreams
    await ingest.stop()
    del l0_queue
    remove_inproc_queues(l0)
    remove_inproc_queues(l0 + "-cont")
    return (last - first) * params.n_substreams * params.heap_bytes / (t1 - t0) / 1e6


def _fresh_spec():
    return f"inproc://bench-cbf-{next(_count)}"


def measure_receive(n_ants, n_chans, n_sub, n_dumps, reps):
    n_prod = len(_cbf_ordering(n_ants))
    step = 2 * n_chans * 256 * 8
    params = CBFStreamParams(n_chans, n_chans // n_sub, n_prod, step)
    data = _dump(n_chans, n_prod)
    results = {"plain": [], "karoo": [], "ingest": []}
    for _ in range(reps):
        for kind in results:
            spec = _fresh_spec()
            asyncio.run(_fill(spec, params, data, n_dumps, 10**9, step))
            if kind == "plain":
                results[kind].append(plain_receive(spec, params, n_dumps))
            elif kind == "karoo":
                results[kind].append(karoo_receive(spec, params, n_dumps))
            else:
                results[kind].append(asyncio.run(ingest_daemon(spec, params, n_ants, n_dumps,
                                                                data)))
            remove_inproc_queues(spec)
    return {k: statistics.median(v) for k, v in results.items()}, params


# -- peak RSS in a subprocess ----------------------------------------------------------------------

_RSS_CHILD = r"""
import asyncio, json, resource, socket, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from karoo.ingest.service import IngestConfig, IngestService
from karoo.spead.cbf import CBFSender, CBFStreamParams
from karoo.telstate import aio
n_ants, n_chans, n_sub, n_dumps = (int(x) for x in sys.argv[2:6])
ants = [f"m{a:03d}" for a in range(n_ants)]
ordering = [(f"{a}{p}", f"{b}{q}") for i, a in enumerate(ants) for b in ants[i:]
            for p in "hv" for q in "hv"]
step = 2 * n_chans * 256 * 8

async def main():
    ts = aio.TelescopeState()
    cbf = "cbf_baseline_correlation_products"
    attrs = dict(n_chans=n_chans, n_chans_per_substream=n_chans // n_sub, n_accs=2048,
                 bls_ordering=ordering, bandwidth=856e6, center_freq=1284e6,
                 input_labels=[f"{a}{p}" for a in ants for p in "hv"], sync_time=1.7e9,
                 int_time=step / 1712e6, scale_factor_timestamp=1712e6,
                 ticks_between_spectra=2 * n_chans)
    for k, v in attrs.items():
        await ts.add(f"{cbf}_{k}", v, immutable=True)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # L0 goes here, unread
    sink.bind(("127.0.0.1", 0))
    dest = f"udp://127.0.0.1:{sink.getsockname()[1]}"
    ingest = IngestService("127.0.0.1", 0, telstate=ts, name="ingest", config=IngestConfig(
        cbf_spead="inproc://rss-cbf", l0_spectral_spead=dest, l0_continuum_spead=dest,
        output_int_time=2 * attrs["int_time"], clock_ratio=0))
    await ingest.start()
    await ingest.capture_init("rss")
    params = CBFStreamParams(n_chans, n_chans // n_sub, len(ordering), step)
    tx = await CBFSender.create("inproc://rss-cbf", params, byteorder="<",
                                max_packet_size=65536)
    await tx.start()
    rng = np.random.default_rng(0)
    data = rng.normal(0, 2000, size=(n_chans, len(ordering), 2)).astype(np.int32)
    for i in range(n_dumps):
        # a real-time sender: the previous dump is being read, no backlog of processing
        while ingest.receiver.latest_dump < i - 1 or ingest._dumps_seen < i - 3:
            await asyncio.sleep(0.01)
        await tx.send_dump(data, 10**9 + i * step)
    await tx.stop()
    await ingest.capture_done("rss")
    counts = {s.name: s.value for s in ingest.sensors.values() if s.name.startswith("input")}
    assert counts["input-missing-heaps-total"] == 0, counts
    assert counts["input-heaps-total"] == n_dumps * n_sub, counts
    await ingest.stop()

asyncio.run(main())
print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def peak_rss_mb(n_ants, n_chans, n_sub, n_dumps):
    out = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, ROOT, str(n_ants), str(n_chans), str(n_sub),
         str(n_dumps)], capture_output=True, text=True,
    )
    if out.returncode:
        raise RuntimeError(f"RSS measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["maxrss_kb"] / 1024


def main():
    args = parser(__doc__.splitlines()[0]).parse_args()
    reps = args.reps or (3 if args.quick else 5)
    if args.quick:
        n_ants, n_chans, n_sub, n_dumps = 8, 4096, 64, 16
    else:
        n_ants, n_chans, n_sub, n_dumps = 16, 4096, 64, 24
    rates, params = measure_receive(n_ants, n_chans, n_sub, n_dumps, reps)
    label = f"{n_ants} ants x {n_chans} ch, {params.heap_bytes / 1e6:.2f} MB heaps"
    report(f"CBF receive ({label})", rates["karoo"], "plain spead2 (a')", rates["plain"],
           "MB/s", reps)
    report(f"sim -> ingest daemon: receive + convert/flag/average + L0 send ({label})",
           rates["ingest"], "plain spead2 receive only (a')", rates["plain"], "MB/s", reps)
    n_chans = 1024 if args.quick else 4096
    n_sub = n_chans // 16
    dump_mb = n_chans * len(_cbf_ordering(64)) * 8 / 2**20
    budget = 32 * dump_mb + 4096  # katsdpcontroller: 32 CBF dumps / n_servers + 4 GiB
    for n_dumps in (6, 12) if args.quick else (8, 24):
        rss = peak_rss_mb(64, n_chans, n_sub, n_dumps)
        report(f"ingest peak RSS, 64 ants x {n_chans} ch ({dump_mb:.0f} MiB dumps), "
               f"{n_dumps} dumps (lower is better)", rss, "katsdpcontroller budget", budget,
               "MiB", 1)

if __name__ == "__main__":
    main()
