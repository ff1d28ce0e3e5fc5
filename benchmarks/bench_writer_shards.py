"""The vis writer with Zarr sharding vs without: write throughput and objects per capture.

The same capture block (L0 heaps from two senders of two substreams each, over karoo's inproc
transport) goes through the real writer daemon twice, to a local directory: with
``--shard-chunks`` and without. The "anchor" column is the unsharded karoo writer. Throughput is
the bytes of the capture over the time from capture-init to the capture-done reply (so the
sender's cost is in both); objects are the stored chunk/shard files of the stream.

    python benchmarks/bench_writer_shards.py [--quick]
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py

import common

from karoo.chunkstore.writer import VisWriterConfig, VisWriterService
from karoo.spead.l0 import L0Sender
from karoo.spead.transport import remove_inproc_queues
from karoo.telstate.aio import TelescopeState

N_CHANS, N_BLS, N_SUB = 1024, 544, 4
OBJ_SIZE_MB = 1.0  # small objects: the case sharding is for
SHARD_CHUNKS = (4, 8)
_ids = itertools.count()


def make_dump(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (N_CHANS, N_BLS)
    return {"correlator_data": rng.normal(size=(*shape[:-1], 2 * N_BLS)).view(np.complex128)
            .astype(np.complex64),
            "flags": np.where(rng.random(shape) < 0.01, 16, 0).astype(np.uint8),
            "weights": rng.integers(200, 256, size=shape, dtype=np.uint8),
            "weights_channel": rng.uniform(0.5, 2, size=N_CHANS).astype(np.float32)}


async def one_capture(root: str, n_dumps: int, dumps: list[dict], shard_chunks) -> tuple[float,
                                                                                          int]:
    """Seconds from capture-init to the capture-done reply, and objects stored."""
    ts = TelescopeState()
    view = ts.view("sdp_l0")
    await view.set("n_chans", N_CHANS)
    await view.set("n_bls", N_BLS)
    await view.set("n_chans_per_substream", N_CHANS // N_SUB)
    queue = f"inproc://bench-writer-{os.getpid()}-{next(_ids)}"
    config = VisWriterConfig(l0_spead=queue, store=root, obj_size_mb=OBJ_SIZE_MB,
                             buffer_mb=1000, workers=16, drain_timeout=0.5,
                             shard_chunks=shard_chunks)
    service = VisWriterService("127.0.0.1", 0, telstate=ts, name="vis_writer", config=config)
    await service.start()
    cbid = f"17{next(_ids):08d}"
    try:
        start = time.perf_counter()
        await service.capture_init(cbid)
        host = service.endpoints[0].host
        senders = []
        half = N_CHANS // 2
        for lo in (0, half):
            target = ",".join([f"inproc://{host}"] * (N_SUB // 2))
            senders.append((await L0Sender.create(target, (lo, lo + half), N_CHANS, N_BLS),
                            slice(lo, lo + half)))
        for d in range(n_dumps):
            data = dumps[d % len(dumps)]
            for sender, part in senders:
                await sender.send_dump(data["correlator_data"][part], data["flags"][part],
                                       data["weights"][part], data["weights_channel"][part],
                                       timestamp=d * 8.0, dump_index=d)
            await asyncio.sleep(0)
        for sender, _ in senders:
            await sender.stop()
        await service.capture_done(cbid)
        elapsed = time.perf_counter() - start
        assert service.sensors["output-failed-chunks-total"].value == 0
        assert service.sensors["input-dropped-heaps-total"].value == 0
    finally:
        await service.stop()
        remove_inproc_queues(queue)
    group = os.path.join(root, f"{cbid}-sdp-l0")
    objects = sum(len(files) for path, _, files in os.walk(group)
                  if f"{os.sep}c" in path[len(group):])
    return elapsed, objects


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    n_dumps = 16 if args.quick else 64
    reps = args.reps or (3 if args.quick else 5)
    dumps = [make_dump(i) for i in range(4)]
    nbytes = n_dumps * sum(v.nbytes for v in dumps[0].values())
    base = tempfile.mkdtemp(prefix="bench-writer-shards-")
    rates: dict[str, list[float]] = {"sharded": [], "plain": []}
    objects: dict[str, int] = {}
    try:
        for _ in range(reps):
            for label, shards in (("sharded", SHARD_CHUNKS), ("plain", None)):
                root = tempfile.mkdtemp(dir=base)
                elapsed, n = asyncio.run(one_capture(root, n_dumps, dumps, shards))
                shutil.rmtree(root)
                rates[label].append(nbytes / elapsed / 1e6)
                objects[label] = n
    finally:
        shutil.rmtree(base, ignore_errors=True)
    what = (f"{n_dumps} dumps x {N_CHANS} ch x {N_BLS} bl, {OBJ_SIZE_MB:g} MB chunks, "
            f"{SHARD_CHUNKS[0]}x{SHARD_CHUNKS[1]} chunks per shard")
    common.report(f"vis writer throughput, local, sharded vs unsharded karoo writer ({what})",
                  statistics.median(rates["sharded"]), "unsharded-karoo-writer",
                  statistics.median(rates["plain"]), "MB/s", reps)
    common.report(f"objects per capture, sharded vs unsharded karoo writer ({what})",
                  objects["sharded"], "unsharded-karoo-writer", objects["plain"], "objects",
                  reps)


if __name__ == "__main__":
    main()
