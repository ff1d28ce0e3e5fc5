"""Write a capture-block stream with known content, as the pipeline would (tests, benchmarks).

The metadata are the simulator's (CBF keys, antennas, targets, activity and pointing sensors)
plus the L0 keys ingest and the writers record; the data are pseudo-random, with positive real
autocorrelations so that weights can be power-scaled. The RDB goes to
``<store>/<cbid>/<cbid>_<stream>.rdb``, the meta writer's layout.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..chunkstore.store import ChunkStore
from ..sim import Simulator
from ..sim.observation import Scan
from ..sim.sky import BPCAL, GAINCAL, TARGET
from ..telstate import TelescopeState


def short_script(track_s: float = 16.0, slew_s: float = 4.0) -> list[Scan]:
    """Slew/track on a bandpass calibrator, a gain calibrator and a target (labelled)."""
    scans = []
    for target, label in ((BPCAL, "bandpass"), (GAINCAL, "gain"), (TARGET, "target")):
        scans.append(Scan("slew", target.description, slew_s, label))
        scans.append(Scan("track", target.description, track_s, label))
    return scans


@dataclass
class SyntheticDataset:
    """What was written: where, and the arrays as stored (whole dataset)."""

    rdb: str
    store: str
    capture_block_id: str
    stream: str
    telstate: TelescopeState
    simulator: Simulator
    vis: np.ndarray | None
    flags: np.ndarray | None
    weights: np.ndarray | None
    weights_channel: np.ndarray | None

    @property
    def n_dumps(self) -> int:
        return self.simulator.n_dumps


def make_content(n_dumps: int, n_chans: int, labels: np.ndarray, seed: int = 1,
                 t0: int = 0) -> dict[str, np.ndarray]:
    """Pseudo-random stored arrays for dumps ``t0 .. t0 + n_dumps - 1`` (reproducible per dump)."""
    rng = np.random.default_rng([seed, t0])
    n_bls = len(labels)
    shape = (n_dumps, n_chans, n_bls)
    vis = (rng.standard_normal(shape, np.float32)
           + 1j * rng.standard_normal(shape, np.float32)).astype(np.complex64)
    autos = np.array([a == b for a, b in labels])
    vis[:, :, autos] = (10.0 + rng.random((n_dumps, n_chans, int(autos.sum())), np.float32))
    flags = np.where(rng.random(shape, np.float32) < 0.02, np.uint8(16), np.uint8(0))
    weights = rng.integers(1, 256, shape, dtype=np.uint8)
    channel = (0.5 + rng.random((n_dumps, n_chans), np.float32)).astype(np.float32)
    return {"correlator_data": vis, "flags": flags, "weights": weights,
            "weights_channel": channel}


def write_dataset(
    store_dir: str | os.PathLike,
    *,
    n_ants: int = 3,
    n_chans: int = 64,
    script: list[Scan] | None = None,
    chunks: dict[str, tuple[int, int]] | None = None,
    max_chunk_bytes: float = 20_000_000,
    capture_block_id: str = "1717206000",
    stream: str = "sdp_l0",
    need_weights_power_scale: bool = True,
    skip_chunks: Callable[[str, tuple[int, ...]], bool] | None = None,
    keep: bool = True,
    store: ChunkStore | None = None,
    chunk_info: bool = True,
    dump_period: float | None = None,
    extra_keys: dict | None = None,
    seed: int = 1,
    content: Callable[..., dict[str, np.ndarray]] | None = None,
    shard_chunks: tuple[int, int] | None = None,
) -> SyntheticDataset:
    """Write a synthetic capture-block stream and its RDB.

    Parameters
    ----------
    store_dir
        Local directory of the chunk store (and of the RDB), unless `store` is given.
    n_ants, n_chans, script
        Size and observation script (default :func:`short_script`).
    chunks, max_chunk_bytes
        Chunking per array (see :meth:`ChunkStore.create_stream`).
    skip_chunks
        ``(array, chunk_index) -> bool``: chunks not to write (lost data).
    keep
        Keep the arrays in the result (False for large benchmark datasets: written in
        blocks of chunks, never whole in memory).
    chunk_info
        Record ``chunk_info`` in telstate (False to make an incomplete RDB).
    content
        ``(n_dumps, n_chans, labels, seed, t0) -> arrays`` to replace :func:`make_content`.
    shard_chunks
        Group the chunks into Zarr shards (see :meth:`ChunkStore.create_stream`).
    """
    sim = Simulator.create(n_ants=n_ants, n_chans=n_chans, script=script or short_script(),
                           rfi=None)
    labels = np.asarray(sim.model.products.labels)
    n_bls = len(labels)
    n_dumps = sim.n_dumps
    period = dump_period or sim.config.dump_period
    telstate = TelescopeState()
    sim.write_telstate(telstate, capture_block_id)
    cbf = sim.config.bcp_stream
    l0 = {
        "int_time": float(period), "sync_time": float(sim.sync_time),
        "bandwidth": float(sim.config.band.bandwidth),
        "center_freq": float(sim.config.band.center_freq), "n_chans": n_chans,
        "bls_ordering": labels, "n_bls": n_bls, "stream_type": "sdp.vis",
        "need_weights_power_scale": need_weights_power_scale, "src_streams": [cbf],
        "n_chans_per_substream": n_chans, "channel_range": (0, n_chans),
    }
    for key, value in l0.items():
        telstate.add(f"{stream}_{key}", value, immutable=True)
    telstate.add("capture_block_id", capture_block_id, immutable=True)
    telstate.add("stream_name", stream, immutable=True)
    first = sim.dump_time(0) - sim.sync_time
    telstate.add(f"{capture_block_id}_{stream}_first_timestamp", float(first), immutable=True)
    for key, value in (extra_keys or {}).items():
        telstate.add(key, value, immutable=True)
    store = store or ChunkStore(store_dir)
    kept: dict[str, list] = {}

    async def write():
        stream_store = await store.create_stream(capture_block_id, stream, n_chans, n_bls,
                                                 chunks=chunks, max_chunk_bytes=max_chunk_bytes,
                                                 shard_chunks=shard_chunks)
        async with stream_store:
            t_step = max(arr.chunks[0] for arr in stream_store.arrays.values())
            for t0 in range(0, n_dumps, t_step):
                t1 = min(t0 + t_step, n_dumps)
                data = (content or make_content)(t1 - t0, n_chans, labels, seed, t0)
                if keep:
                    for name, value in data.items():
                        kept.setdefault(name, []).append(value)
                writes = []
                for name, arr in stream_store.arrays.items():
                    dt, dc = arr.chunks[:2]
                    for ti, ci in itertools.product(range(t0 // dt, -(-t1 // dt)),
                                                    range(-(-n_chans // dc))):
                        index = (ti, ci, 0)[: arr.ndim]
                        if skip_chunks is not None and skip_chunks(name, index):
                            continue
                        block = data[name][ti * dt - t0:(ti + 1) * dt - t0, ci * dc:(ci + 1) * dc]
                        writes.append(stream_store.write_chunk(name, index, block))
                await asyncio.gather(*writes)
            await stream_store.finish(n_dumps)
            await stream_store.mark_complete()
            if chunk_info:
                stream_store.write_chunk_info(telstate)

    asyncio.run(write())
    if store.is_s3:
        telstate.add(f"{capture_block_id}_{stream}_chunk_store_url", store.url, immutable=True)
    rdb_dir = os.path.join(os.fspath(store_dir), capture_block_id)
    os.makedirs(rdb_dir, exist_ok=True)
    rdb = os.path.join(rdb_dir, f"{capture_block_id}_{stream}.rdb")
    telstate.dump(rdb)
    arrays = {k: np.concatenate(v) for k, v in kept.items()} if keep else {}
    return SyntheticDataset(rdb, os.fspath(store_dir) if not store.is_s3 else store.url,
                            capture_block_id, stream, telstate, sim,
                            arrays.get("correlator_data"), arrays.get("flags"),
                            arrays.get("weights"), arrays.get("weights_channel"))
