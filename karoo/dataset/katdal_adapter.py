"""Let the real katdal read karoo's Zarr chunk stores: ``katdal.open(rdb, chunk_store=...)``.

katdal cannot read Zarr by itself (its chunks are NPY objects named by element offsets), but it
takes any :class:`katdal.chunkstore.ChunkStore` instance. `KatdalZarrStore` is one: katdal asks
for ``<prefix>/<array>`` and a chunk's slices (which follow ``chunk_info``, i.e. the Zarr chunk
grid), and it gets the Zarr chunk, or ``ChunkNotFound`` for a chunk never written (which katdal
turns into ``data_lost``), or ``StoreUnavailable`` when the store fails::

    import katdal
    from karoo.dataset.katdal_adapter import KatdalZarrStore
    d = katdal.open("/data/1700000000/1700000000_sdp_l0.rdb",
                    chunk_store=KatdalZarrStore("/data"))

katdal is not a dependency of karoo: importing this module needs it installed.
"""

from __future__ import annotations

import threading

import katdal.chunkstore as kcs
import numpy as np
import zarr

from ..chunkstore.store import ChunkStore, StoreUnavailable
from .chunks import chunk_stored


class KatdalZarrStore(kcs.ChunkStore):
    """A katdal chunk store over a karoo chunk store (local directory or S3).

    Parameters
    ----------
    store
        A :class:`karoo.chunkstore.ChunkStore` or its URL.
    **options
        ChunkStore options when `store` is a URL (``endpoint_url``, ``access_key``, ...).
    """

    def __init__(self, store: ChunkStore | str, **options) -> None:
        super().__init__({KeyError: kcs.ChunkNotFound, StoreUnavailable: kcs.StoreUnavailable,
                          OSError: kcs.StoreUnavailable, ValueError: kcs.BadChunk})
        self.store = store if isinstance(store, ChunkStore) else ChunkStore(store, read_only=True,
                                                                            **options)
        self._groups: dict[str, zarr.Group] = {}
        self._lock = threading.Lock()

    def _array(self, array_name: str):
        prefix, _, name = array_name.rpartition(self.NAME_SEP)
        with self._lock:
            group = self._groups.get(prefix)
            if group is None:
                zstore = self.store.zarr_store(prefix, read_only=True)
                try:
                    group = zarr.open_group(store=zstore, mode="r", zarr_format=3)
                except FileNotFoundError as exc:
                    raise kcs.StoreUnavailable(f"no Zarr group {prefix!r} in {self.store.url}") \
                        from exc
                self._groups[prefix] = group
        try:
            return group[name]
        except KeyError:
            raise kcs.ChunkNotFound(f"no array {name!r} in {prefix!r}") from None

    def get_chunk(self, array_name, slices, dtype):
        chunk_name, shape = self.chunk_metadata(array_name, slices, dtype=dtype)
        with self._standard_errors(chunk_name):
            arr = self._array(array_name)
            if np.dtype(dtype) != arr.dtype:
                raise kcs.BadChunk(f"{chunk_name}: requested dtype {np.dtype(dtype)}, stored "
                                   f"{arr.dtype}")
            if any(s.start % c for s, c in zip(slices, arr.chunks, strict=True)):
                raise kcs.BadChunk(f"{chunk_name}: slices do not start on the Zarr chunk grid "
                                   f"{arr.chunks}")
            index = tuple(s.start // c for s, c in zip(slices, arr.chunks, strict=True))
            if not chunk_stored(arr, index):
                raise kcs.ChunkNotFound(f"{chunk_name}: never written")
            chunk = arr[tuple(slices)]
        if chunk.shape != shape:
            raise kcs.BadChunk(f"{chunk_name}: shape {chunk.shape}, expected {shape}")
        return chunk

    def put_chunk(self, array_name, slices, chunk):
        raise NotImplementedError("KatdalZarrStore is read-only; write with karoo's ChunkStore")
