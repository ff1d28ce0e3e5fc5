"""Lazy Dask arrays over a capture-block stream's Zarr group, with lost data made explicit.

Every stored array becomes a Dask array with one task per stored chunk (time x channel x all
baselines). Which chunks exist is learnt once, from a listing of the group, so that

* a chunk that was never written is not read at all: it becomes its fill value, and every
  visibility it covers (in any of the four arrays) is flagged ``data_lost``, and counted (in a
  sharded array, the index of each stored shard says which of its chunks were written);
* a chunk that exists but cannot be read (a server failing after the chunk store's retries, a
  corrupt object) raises :class:`ChunkReadError` naming the chunk, never lost data in silence.

The four arrays may have different chunk grids (the writer sizes chunks by bytes). They are put on
their common refinement (the union of their chunk boundaries, which the power-of-two grids make a
plain sub-division), so that each output block lies inside exactly one stored chunk of each array;
the ``data_lost`` bit is then a per-block constant known when the graph is built.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from dataclasses import dataclass

import dask.array as da
import numcodecs
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec
from zarr.codecs.bytes import Endian
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from ..chunkstore.store import ARRAYS, DATA_LOST, StoreUnavailable, stream_prefix
from .source import StoreSpec

logger = logging.getLogger(__name__)

_GROUPS: dict[tuple, object] = {}
_GROUPS_LOCK = threading.Lock()
_PLANS: dict[tuple, tuple | None] = {}


class ChunkReadError(OSError):
    """A stored chunk exists but could not be read (server failure after retries, corruption)."""


@dataclass(frozen=True)
class StreamReader:
    """Picklable handle on one capture-block stream's Zarr group (opened once per process)."""

    store: StoreSpec
    capture_block_id: str
    stream: str

    def _key(self) -> tuple:
        return (self.store.url, tokenize(self.store.options), self.capture_block_id, self.stream)

    def group(self):
        key = self._key()
        with _GROUPS_LOCK:
            group = _GROUPS.get(key)
            if group is None:
                store = self.store.open()
                try:
                    group = store.open_zarr_group(self.capture_block_id, self.stream)
                except FileNotFoundError as exc:
                    raise FileNotFoundError(
                        f"no Zarr group for {self.capture_block_id}_{self.stream} in chunk store "
                        f"{self.store.url}") from exc
                _GROUPS[key] = group
            return group

    def array(self, name: str):
        try:
            return self.group()[name]
        except KeyError:
            raise KeyError(f"stream {self.capture_block_id}_{self.stream} has no array "
                           f"{name!r} in {self.store.url}") from None

    def written_chunks(self, name: str) -> set[tuple[int, ...]]:
        """Grid indices of the stored chunks of an array.

        Unsharded, a chunk is stored when its object is. Sharded, a stored shard's index says
        which of its chunks it holds (a shard written in parts may lack some).
        """
        arr = self.array(name)
        grid = arr.shards or arr.chunks
        shape = arr.shape
        counts = [-(-n // c) for n, c in zip(shape, grid, strict=True)]
        by_key = {arr.metadata.encode_chunk_key(idx): idx
                  for idx in itertools.product(*(range(n) for n in counts))}
        store = arr.store_path.store
        prefix = f"{arr.path}/"

        async def listing():
            return [key async for key in store.list_prefix(prefix)]

        try:
            keys = sync(listing())
            objects = [(by_key[k], k) for k in (key.removeprefix(prefix) for key in keys)
                       if k in by_key]
            if arr.shards is None:
                return {idx for idx, _ in objects}
            return sync(_chunks_in_shards(arr, objects))
        except Exception as exc:
            raise StoreUnavailable(f"cannot list {name} in {self.store.url}: {exc}") from exc

    def _raw_plan(self, arr):
        """``(directory, decompress)`` when an array's chunks can be read from local files
        directly (unsharded; plain little-endian bytes, optionally zstd or blosc compressed),
        else None. One ``read`` per chunk, without Zarr's event-loop round trip and copies."""
        key = (*self._key(), arr.path)
        if key in _PLANS:
            return _PLANS[key]
        plan = None
        codecs = arr.metadata.codecs
        if (not self.store.url.startswith("s3://") and arr.shards is None and codecs
                and isinstance(codecs[0], BytesCodec) and len(codecs) <= 2
                and (codecs[0].endian in (None, Endian.little) or arr.dtype.itemsize == 1)
                and arr.dtype.byteorder != ">"):
            decompress = None
            if len(codecs) == 2:
                decompress = {ZstdCodec: numcodecs.Zstd, BloscCodec: numcodecs.Blosc}.get(
                    type(codecs[1]))
            if len(codecs) == 1 or decompress is not None:
                url = self.store.url
                root = url[len("file://"):] if url.startswith("file://") else url
                directory = os.path.join(os.path.abspath(root),
                                         stream_prefix(self.capture_block_id, self.stream),
                                         arr.path)
                plan = (directory, decompress() if decompress else None)
        _PLANS[key] = plan
        return plan

    def _read_raw(self, arr, plan, slices: tuple[slice, ...]) -> np.ndarray:
        directory, decompress = plan
        index = tuple(s.start // c for s, c in zip(slices, arr.chunks, strict=True))
        path = os.path.join(directory, arr.metadata.encode_chunk_key(index))
        count = int(np.prod(arr.chunks))
        if decompress is None:
            chunk = np.fromfile(path, arr.dtype, count=count)
        else:
            with open(path, "rb") as f:
                chunk = np.frombuffer(decompress.decode(f.read()), arr.dtype)
        if chunk.size != count:
            raise ValueError(f"{path} holds {chunk.size} elements, not {count}")
        chunk = chunk.reshape(arr.chunks)
        return chunk[tuple(slice(0, s.stop - s.start) for s in slices)]

    def read_into(self, name: str, index: tuple[int, ...], dest: np.ndarray) -> bool:
        """Read the leading part of a stored chunk straight into `dest` (C-contiguous, the
        chunk's shape except maybe fewer dumps), if the chunk is plain bytes on local disk.

        Returns False (reading nothing) when that is not possible.
        """
        arr = self.array(name)
        plan = self._raw_plan(arr)
        if (plan is None or plan[1] is not None or not dest.flags.c_contiguous
                or dest.dtype != arr.dtype or dest.shape[1:] != arr.chunks[1:]):
            return False
        path = os.path.join(plan[0], arr.metadata.encode_chunk_key(index))
        try:
            with open(path, "rb") as f:
                n = f.readinto(memoryview(dest).cast("B"))
            if n != dest.nbytes:
                raise ValueError(f"{path} holds {n} bytes, expected at least {dest.nbytes}")
        except Exception as exc:
            raise ChunkReadError(
                f"chunk {name}{list(index)} of {self.capture_block_id}_{self.stream} exists but "
                f"could not be read from {self.store.url}: {type(exc).__name__}: {exc}"
            ) from exc
        return True

    def read(self, name: str, slices: tuple[slice, ...]) -> np.ndarray:
        try:
            arr = self.array(name)
            plan = self._raw_plan(arr)
            if plan is not None:
                return self._read_raw(arr, plan, slices)
            return arr[slices]
        except Exception as exc:
            where = ", ".join(f"{s.start}:{s.stop}" for s in slices)
            raise ChunkReadError(
                f"chunk {name}[{where}] of {self.capture_block_id}_{self.stream} exists but could "
                f"not be read from {self.store.url}: {type(exc).__name__}: {exc}") from exc


def _read_chunk(reader: StreamReader, name: str, slices: tuple[slice, ...], present: bool,
                dtype: str, fill) -> np.ndarray:
    if not present:
        return np.full(tuple(s.stop - s.start for s in slices), fill, dtype)
    return reader.read(name, slices)


def _or_lost(flags: np.ndarray) -> np.ndarray:
    return flags | DATA_LOST


def _boundaries(sizes) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def _sizes(bounds: np.ndarray) -> tuple[int, ...]:
    return tuple(int(x) for x in np.diff(bounds))


def _array_from_tasks(name: str, tasks: dict, chunks, dtype, deps=()) -> da.Array:
    graph = HighLevelGraph.from_collections(name, tasks, dependencies=list(deps))
    return da.Array(graph, name, chunks, dtype=dtype,
                    meta=np.empty((0,) * len(chunks), dtype))


@dataclass
class StoredArrays:
    """The four arrays of a stream on their common block grid, and what is lost.

    Attributes
    ----------
    arrays
        ``correlator_data``, ``flags`` (with ``data_lost`` set wherever any array's chunk is
        missing), ``weights`` (T, F, B) and ``weights_channel`` (T, F) Dask arrays.
    missing_chunks
        Number of stored chunks never written, per array.
    lost_blocks
        ``(n_time_blocks, n_chan_blocks)`` bool: blocks flagged ``data_lost`` for that reason.
    time_bounds, chan_bounds
        Block boundaries of the common grid.
    reader
        The stream's reader.
    chunk_shape, missing
        Stored chunk shape and the grid of chunks never written, per array.
    """

    arrays: dict[str, da.Array]
    missing_chunks: dict[str, int]
    lost_blocks: np.ndarray
    time_bounds: np.ndarray
    chan_bounds: np.ndarray
    reader: StreamReader | None = None
    chunk_shape: dict[str, tuple[int, ...]] | None = None
    missing: dict[str, np.ndarray] | None = None
    n_bls: int = 0

    def read_chunk(self, name: str, index: tuple[int, ...]) -> np.ndarray:
        """One stored chunk (clipped to the dataset), or its fill value if never written."""
        shape = self.chunk_shape[name]
        extent = (int(self.time_bounds[-1]), int(self.chan_bounds[-1]), self.n_bls)
        slices = tuple(slice(i * c, min((i + 1) * c, n))
                       for i, c, n in zip(index, shape, extent, strict=False))
        spec = ARRAYS[name]
        return _read_chunk(self.reader, name, slices, not self.missing[name][index],
                           spec.dtype.str, spec.fill_value)


async def _chunks_in_shards(arr, shards: list[tuple[tuple[int, ...], str]]
                            ) -> set[tuple[int, ...]]:
    """Chunk-grid indices of the chunks that the given stored shards of `arr` hold.

    Reads each shard's index (Zarr's default layout: little-endian (offset, nbytes) uint64
    pairs, then a CRC32C; both all ones for an absent chunk). An index of another layout is
    not parsed: its shard then counts as whole.
    """
    codec = arr.metadata.codecs[0]
    per_shard = tuple(s // c for s, c in zip(arr.shards, arr.chunks, strict=True))
    n_inner = int(np.prod(per_shard))
    index_bytes = 16 * n_inner + 4
    default = (len(codec.index_codecs) == 2
               and isinstance(codec.index_codecs[0], BytesCodec)
               and codec.index_codecs[0].endian in (None, Endian.little)
               and type(codec.index_codecs[1]).__name__ == "Crc32cCodec")
    at_end = codec.index_location.value == "end"
    request = SuffixByteRequest(index_bytes) if at_end else RangeByteRequest(0, index_bytes)
    store = arr.store_path.store

    async def inner(idx, key):
        first = [i * n for i, n in zip(idx, per_shard, strict=True)]
        cells = itertools.product(*(range(n) for n in per_shard))
        if not default:
            held = np.ones(per_shard, bool)
        else:
            buf = await store.get(f"{arr.path}/{key}", default_buffer_prototype(),
                                  byte_range=request)
            if buf is None:  # gone since the listing
                return []
            pairs = np.frombuffer(buf.to_bytes()[:-4], "<u8").reshape(*per_shard, 2)
            held = ~(pairs == np.iinfo(np.uint64).max).all(axis=-1)
        return [tuple(f + c for f, c in zip(first, cell, strict=True))
                for cell in cells if held[cell]]

    found = await asyncio.gather(*(inner(idx, key) for idx, key in shards))
    return {chunk for chunks in found for chunk in chunks}


def chunk_stored(arr, index: tuple[int, ...]) -> bool:
    """Whether the chunk at chunk-grid `index` of Zarr array `arr` is stored (see
    :meth:`StreamReader.written_chunks`)."""
    grid = arr.shards or arr.chunks
    obj = tuple(i * c // g for i, c, g in zip(index, arr.chunks, grid, strict=True))
    key = arr.metadata.encode_chunk_key(obj)
    if not sync(arr.store_path.store.exists(f"{arr.path}/{key}")):
        return False
    return arr.shards is None or index in sync(_chunks_in_shards(arr, [(obj, key)]))


def stored_arrays(reader: StreamReader, n_dumps: int) -> StoredArrays:
    """Build the lazy arrays of the first `n_dumps` dumps of a stream (see module docstring)."""
    raw, grids, missing_grid, missing_count = {}, {}, {}, {}
    for name, spec in ARRAYS.items():
        arr = reader.array(name)
        if arr.shape[0] < n_dumps:
            raise ValueError(f"{name} holds {arr.shape[0]} dumps, fewer than the {n_dumps} "
                             "the dataset should have")
        shape = (n_dumps, *arr.shape[1:])
        written = reader.written_chunks(name)
        sizes = [tuple(min(c, n - i) for i in range(0, n, c)) for n, c in
                 zip(shape, arr.chunks, strict=True)]
        token = tokenize(reader, name, n_dumps, sorted(written))
        src = f"karoo-read-{name}-{token}"
        tasks = {}
        missing = np.zeros([len(s) for s in sizes], bool)
        for idx in itertools.product(*(range(len(s)) for s in sizes)):
            start = [i * c for i, c in zip(idx, arr.chunks, strict=True)]
            slices = tuple(slice(s, s + n[i]) for s, n, i in zip(start, sizes, idx, strict=True))
            present = idx in written
            missing[idx] = not present
            tasks[(src, *idx)] = (_read_chunk, reader, name, slices, present, spec.dtype.str,
                                  spec.fill_value)
        raw[name] = _array_from_tasks(src, tasks, tuple(sizes), spec.dtype)
        grids[name] = sizes
        missing_grid[name] = missing
        missing_count[name] = int(missing.sum())
    time_bounds = np.unique(np.concatenate([_boundaries(g[0]) for g in grids.values()]))
    chan_bounds = np.unique(np.concatenate([_boundaries(g[1]) for g in grids.values()]))
    n_bls = raw["correlator_data"].shape[2]
    common = (_sizes(time_bounds), _sizes(chan_bounds))
    lost = np.zeros((len(common[0]), len(common[1])), bool)
    for name, grid in grids.items():
        ti = np.searchsorted(_boundaries(grid[0]), time_bounds[:-1], side="right") - 1
        fi = np.searchsorted(_boundaries(grid[1]), chan_bounds[:-1], side="right") - 1
        lost |= missing_grid[name][np.ix_(ti, fi)].reshape(lost.shape)
    arrays = {}
    for name, arr in raw.items():
        chunks = common + ((n_bls,) if arr.ndim == 3 else ())
        arrays[name] = arr if arr.chunks == chunks else arr.rechunk(chunks)
    if lost.any():
        flags = arrays["flags"]
        name = f"karoo-lost-{tokenize(flags.name, lost)}"
        tasks = {}
        for i, j in itertools.product(range(lost.shape[0]), range(lost.shape[1])):
            source = (flags.name, i, j, 0)
            tasks[(name, i, j, 0)] = (_or_lost, source) if lost[i, j] else source
        arrays["flags"] = _array_from_tasks(name, tasks, flags.chunks, flags.dtype, [flags])
        logger.warning("%s_%s: %s chunks never written; their data read as flagged data_lost",
                       reader.capture_block_id, reader.stream,
                       ", ".join(f"{n} {c}" for n, c in missing_count.items() if c))
    chunk_shape = {name: reader.array(name).chunks for name in raw}
    return StoredArrays(arrays, missing_count, lost, time_bounds, chan_bounds, reader,
                        chunk_shape, missing_grid, n_bls)
