"""Reading a plain selection straight into the caller's arrays, without a Dask graph.

For the common request (contiguous dumps and channels, any corr products, no calibration) the
work per block of the common chunk grid is small and regular: read the chunks, pick the corr
products, scale the weights, test the flag bits. Doing it in a thread pool with the results
written directly into the output arrays saves the Dask graph, its scheduling and the copy of
every block into the outputs (``da.store``); each stored chunk is still read once however many
blocks share it. The Dask path (``DataSet.vis.dask``) gives the same values.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from ..chunkstore.store import DATA_LOST
from . import kernels
from .chunks import StoredArrays

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            # More threads than cores: a thread waiting for a chunk (S3 latency, disk) should
            # not leave a core idle; the kernels release the GIL.
            _POOL = ThreadPoolExecutor(max_workers=max(8, 2 * (os.cpu_count() or 2)),
                                       thread_name_prefix="karoo-read")
        return _POOL


class _ChunkCache:
    """Stored chunks shared by several blocks: read once, dropped after their last use."""

    def __init__(self, stored: StoredArrays, uses: dict) -> None:
        self._stored = stored
        self._uses = dict(uses)
        self._chunks: dict = {}
        self._locks: dict = {key: threading.Lock() for key in uses}
        self._lock = threading.Lock()

    def get(self, key):
        with self._locks[key]:
            chunk = self._chunks.get(key)
            if chunk is None:
                chunk = self._stored.read_chunk(*key)
                self._chunks[key] = chunk
        return chunk

    def done(self, key) -> None:
        with self._lock:
            self._uses[key] -= 1
            if self._uses[key] == 0:
                self._chunks.pop(key, None)


def read_into(stored: StoredArrays, what: Sequence[str], dumps: range, chans: range,
              corrprods: np.ndarray | None, outputs: Sequence[np.ndarray], flag_mask: int,
              power_scale: tuple | None) -> None:
    """Fill `outputs` with the selection ``[dumps, chans, corrprods]`` of each array in `what`.

    Parameters
    ----------
    what
        ``'vis'``, ``'flags'`` (bool, any bit of `flag_mask`), ``'raw_flags'`` (uint8),
        ``'weights'`` (float32).
    dumps, chans
        Contiguous global dump and channel ranges.
    corrprods
        Corr product indices (None for all).
    power_scale
        ``(auto_index, in1, in2)`` when weights are divided by autocorrelation power.
    """
    tb, fb = stored.time_bounds, stored.chan_bounds
    t_blocks = range(np.searchsorted(tb, dumps.start, "right") - 1,
                     np.searchsorted(tb, dumps.stop, "left"))
    f_blocks = range(np.searchsorted(fb, chans.start, "right") - 1,
                     np.searchsorted(fb, chans.stop, "left"))
    arrays = {"vis": ["correlator_data"], "flags": ["flags"], "raw_flags": ["flags"],
              "weights": ["weights", "weights_channel"]}
    needed = sorted({a for w in what for a in arrays[w]}
                    | ({"correlator_data"} if "weights" in what and power_scale else set()))
    jobs, uses = [], {}
    for i in t_blocks:
        for j in f_blocks:
            t0, t1 = max(int(tb[i]), dumps.start), min(int(tb[i + 1]), dumps.stop)
            f0, f1 = max(int(fb[j]), chans.start), min(int(fb[j + 1]), chans.stop)
            if t0 >= t1 or f0 >= f1:
                continue
            keys = {}
            for name in needed:
                shape = stored.chunk_shape[name]
                keys[name] = (name, (t0 // shape[0], f0 // shape[1], 0)[: len(shape)])
                uses[keys[name]] = uses.get(keys[name], 0) + 1
            jobs.append((t0, t1, f0, f1, bool(stored.lost_blocks[i, j]), keys))
    cache = _ChunkCache(stored, uses)
    all_bls = corrprods is None
    bsel = np.arange(stored.n_bls) if all_bls else np.asarray(corrprods, np.int64)
    mask = np.uint8(flag_mask)

    def piece(keys, name, t0, t1, f0, f1):
        chunk = cache.get(keys[name])
        shape = stored.chunk_shape[name]
        ct, cf = keys[name][1][0] * shape[0], keys[name][1][1] * shape[1]
        return chunk[t0 - ct:t1 - ct, f0 - cf:f1 - cf]

    def run(job):
        t0, t1, f0, f1, lost, keys = job
        region = (slice(t0 - dumps.start, t1 - dumps.start),
                  slice(f0 - chans.start, f1 - chans.start))
        try:
            vis = None
            if "vis" in what and all_bls:
                # The commonest case, a whole stored chunk into a contiguous part of the
                # output: one read() into place (the output then serves the weights too).
                dest = outputs[what.index("vis")][region]
                name, index = keys["correlator_data"]
                shape = stored.chunk_shape[name]
                whole = (t0 == index[0] * shape[0] and f0 == index[1] * shape[1]
                         and f1 - f0 == shape[1] and t1 - t0 <= shape[0])
                if (whole and not stored.missing[name][index]
                        and stored.reader.read_into(name, index, dest)):
                    vis = dest
            if vis is None and "correlator_data" in keys:
                vis = piece(keys, "correlator_data", t0, t1, f0, f1)
            for kind, out in zip(what, outputs, strict=True):
                dest = out[region]
                if kind == "vis":
                    if vis is dest:
                        pass
                    elif all_bls:
                        dest[...] = vis
                    else:
                        np.take(vis, bsel, axis=2, out=dest)
                elif kind in ("flags", "raw_flags"):
                    flags = piece(keys, "flags", t0, t1, f0, f1)
                    extra = DATA_LOST if lost else np.uint8(0)
                    if kind == "flags":
                        kernels.flags_into(flags, bsel, extra, mask, dest)
                    else:
                        kernels.raw_flags_into(flags, bsel, extra, dest)
                else:
                    weights = piece(keys, "weights", t0, t1, f0, f1)
                    channel = piece(keys, "weights_channel", t0, t1, f0, f1)
                    if power_scale is None:
                        kernels.weights_into(weights, channel, bsel, dest)
                    else:
                        auto_index, in1, in2 = power_scale
                        kernels.power_scaled_weights_into(weights, channel, vis, auto_index,
                                                          in1, in2, bsel, dest)
        finally:
            for key in keys.values():
                cache.done(key)

    futures = [_pool().submit(run, job) for job in jobs]
    try:
        for future in futures:
            future.result()
    except BaseException:
        # leave nothing running (or retrying a failed server) behind the error
        for future in futures:
            future.cancel()
        wait(futures)
        raise
