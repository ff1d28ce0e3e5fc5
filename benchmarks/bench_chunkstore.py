"""Chunk store throughput: karoo's Zarr store vs katdal's chunk stores vs raw I/O, same run.

Writes and reads 15.7 MB chunks (1 dump x 256 channels x 7680 baselines, complex64 noise):

* local directory: karoo ``ChunkStore`` vs katdal ``NpyFileChunkStore`` vs plain file writes and
  reads (``open``/``write``/``readinto``);
* S3 (a Ceph RGW started here, see docs/s3-server.md): karoo vs katdal ``S3ChunkStore`` vs plain
  boto3 ``put_object``/``get_object``.

Every method has the same number of chunks in flight (threads for katdal and raw, asyncio tasks
for karoo). Prints one line per figure: ``<metric>: karoo ... | <anchor> ... | ratio ...``.

    python benchmarks/bench_chunkstore.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py

import common

from karoo.chunkstore import ChunkStore
from karoo.chunkstore.s3server import S3Server, ceph_available

CHUNK_SHAPE = (1, 256, 7680)


def make_chunks(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (*CHUNK_SHAPE[:-1], 2 * CHUNK_SHAPE[-1])
    base = rng.normal(size=shape).view(np.complex128).astype(np.complex64)
    # Different contents per chunk without paying for n random draws.
    return [np.roll(base, i, axis=-1) for i in range(n)]


def threaded(func, items, concurrency: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(func, items))
    return time.perf_counter() - start


# -- karoo ---------------------------------------------------------------------------------------


def karoo_run(store: ChunkStore, chunks, concurrency: int) -> tuple[float, float]:
    async def main():
        cbid = f"b{uuid.uuid4().hex[:10]}"
        stream = await store.create_stream(cbid, "sdp_l0", CHUNK_SHAPE[1], CHUNK_SHAPE[2],
                                           chunks={"correlator_data": CHUNK_SHAPE[:2]})
        sem = asyncio.Semaphore(concurrency)

        async def put(i):
            async with sem:
                await stream.write_chunk("correlator_data", (i, 0, 0), chunks[i])

        async def get(i):
            async with sem:
                return await stream.read_chunk("correlator_data", (i, 0, 0))

        await stream._grow(len(chunks))  # metadata first, as a long capture amortises it
        start = time.perf_counter()
        await asyncio.gather(*(put(i) for i in range(len(chunks))))
        t_write = time.perf_counter() - start
        start = time.perf_counter()
        out = await asyncio.gather(*(get(i) for i in range(len(chunks))))
        t_read = time.perf_counter() - start
        assert all((a == b).all() for a, b in zip(out[:2], chunks[:2], strict=True))
        await stream.close()
        return t_write, t_read

    return asyncio.run(main())


# -- katdal --------------------------------------------------------------------------------------


def katdal_run(kstore, chunks, concurrency: int) -> tuple[float, float]:
    array = f"b{uuid.uuid4().hex[:10]}/correlator_data"
    kstore.create_array(array)
    n = CHUNK_SHAPE

    def slices(i):
        return (slice(i, i + 1), slice(0, n[1]), slice(0, n[2]))

    t_write = threaded(lambda i: kstore.put_chunk(array, slices(i), chunks[i]),
                       range(len(chunks)), concurrency)
    t_read = threaded(lambda i: kstore.get_chunk(array, slices(i), np.complex64),
                      range(len(chunks)), concurrency)
    return t_write, t_read


# -- raw -----------------------------------------------------------------------------------------


def raw_local_run(root: Path, chunks, concurrency: int) -> tuple[float, float]:
    directory = root / f"raw-{uuid.uuid4().hex[:10]}"
    directory.mkdir()

    def put(i):
        with open(directory / str(i), "wb") as f:
            f.write(chunks[i].data)

    def get(i):
        out = np.empty(CHUNK_SHAPE, np.complex64)
        with open(directory / str(i), "rb") as f:
            f.readinto(out.data)
        return out

    return (threaded(put, range(len(chunks)), concurrency),
            threaded(get, range(len(chunks)), concurrency))


def raw_s3_run(client, chunks, concurrency: int) -> tuple[float, float]:
    bucket = f"raw-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)

    def put(i):
        client.put_object(Bucket=bucket, Key=str(i), Body=chunks[i].tobytes())

    def get(i):
        return client.get_object(Bucket=bucket, Key=str(i))["Body"].read()

    return (threaded(put, range(len(chunks)), concurrency),
            threaded(get, range(len(chunks)), concurrency))


# -- driver --------------------------------------------------------------------------------------


def empty_directory(root: Path) -> None:
    """Remove what the runs wrote under `root` (keeping the directories the stores need)."""
    for top in root.iterdir():
        for path in top.iterdir():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def measure(runs: dict, reps: int, nbytes: int,
            cleanup=None) -> dict[str, tuple[float, float]]:
    """Median write and read MB/s of each method, interleaving the methods in every repetition.

    `cleanup` runs (untimed) after each method, so that every method starts with the same file
    system and page cache state rather than behind gigabytes of its predecessors' files.
    """
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            # Start each method with no dirty pages of the previous one still being written
            # back, which otherwise slows whichever method comes next.
            os.sync()
            t_write, t_read = run()
            if cleanup is not None:
                cleanup()
            rates[name].append((nbytes / t_write / 1e6, nbytes / t_read / 1e6))
    return {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
            for name, rs in rates.items()}


def report(where: str, medians: dict, anchors: list[str], reps: int) -> None:
    for phase, k in (("write", 0), ("read", 1)):
        for anchor in anchors:
            ours, theirs = medians["karoo"][k], medians[anchor][k]
            common.report(f"{where} {phase} 15.7 MB chunks", ours, anchor, theirs, "MB/s", reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run, under a minute")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    n_chunks, reps = (12, 3) if args.quick else (40, 5)
    chunks = make_chunks(n_chunks)
    nbytes = sum(c.nbytes for c in chunks)
    c = args.concurrency

    from katdal.chunkstore_npy import NpyFileChunkStore
    from katdal.chunkstore_s3 import S3ChunkStore

    with tempfile.TemporaryDirectory(prefix="karoo-bench-", dir=os.environ.get("TMPDIR")) as tmp:
        root = Path(tmp)
        (root / "katdal").mkdir()
        local = ChunkStore(root / "karoo")
        npy = NpyFileChunkStore(str(root / "katdal"))
        medians = measure({
            "karoo": lambda: karoo_run(local, chunks, c),
            "katdal-npy": lambda: katdal_run(npy, chunks, c),
            "raw-file": lambda: raw_local_run(root, chunks, c),
        }, reps, nbytes, cleanup=lambda: empty_directory(root))
        report("local", medians, ["katdal-npy", "raw-file"], reps)

    if not ceph_available():
        print("S3: skipped (Ceph RGW not installed; see docs/s3-server.md)")
        return
    import boto3
    import botocore.config

    with S3Server(osd_size_gb=20) as server:
        s3 = ChunkStore("s3://", endpoint_url=server.endpoint_url, access_key=server.access_key,
                        secret_key=server.secret_key)
        kstore = S3ChunkStore(server.endpoint_url,
                              credentials=(server.access_key, server.secret_key))
        client = boto3.session.Session().client(
            "s3", endpoint_url=server.endpoint_url, aws_access_key_id=server.access_key,
            aws_secret_access_key=server.secret_key, region_name="us-east-1",
            # The same request settings as karoo's store (no body hash in the signature, no
            # extra checksums), so that the figure compares the libraries, not the settings.
            config=botocore.config.Config(max_pool_connections=c,
                                          s3={"payload_signing_enabled": False},
                                          request_checksum_calculation="when_required",
                                          response_checksum_validation="when_required"))
        medians = measure({
            "karoo": lambda: karoo_run(s3, chunks, c),
            "katdal-s3": lambda: katdal_run(kstore, chunks, c),
            "raw-boto3": lambda: raw_s3_run(client, chunks, c),
        }, reps, nbytes)
        report("S3", medians, ["katdal-s3", "raw-boto3"], reps)


if __name__ == "__main__":
    main()
