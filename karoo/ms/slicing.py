"""Exporting an observation whole or as time slices cut at dump boundaries.

Every slice is a complete MS written from the same `MSInput`: identical subtables and
global ids (FIELD_ID, SCAN_NUMBER, STATE_ID, ANTENNA ids), so the slices concatenated in
time (`concat_slices`) give the same MAIN table as the whole export.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from casacore import tables

from .layout import MSInput
from .writer import DumpBlock, MSWriter, Progress, append_dumps, create_ms


def plan_slices(
    n_dumps: int, bytes_per_dump: float | Sequence[float] | np.ndarray, n_slices: int
) -> list[range]:
    """Cut dumps ``0 .. n_dumps - 1`` into contiguous slices of about equal bytes.

    Parameters
    ----------
    n_dumps
        Number of dumps to export.
    bytes_per_dump
        Size of each dump (one number for all, or one per dump, e.g. 0 for dumps that
        will be skipped).
    n_slices
        Wanted number of slices; at most `n_dumps` non-empty slices are returned.

    Returns
    -------
    list of range
        Dump ranges in order, non-empty, covering every dump exactly once. Slice ``k``
        ends at the first dump boundary where the cumulative bytes reach
        ``(k + 1) / n_slices`` of the total.
    """
    if n_dumps < 0 or n_slices < 1:
        raise ValueError(f"need n_dumps >= 0 and n_slices >= 1, not {n_dumps}, {n_slices}")
    sizes = np.broadcast_to(np.asarray(bytes_per_dump, np.float64), (n_dumps,))
    if np.any(sizes < 0) or not np.all(np.isfinite(sizes)):
        raise ValueError("bytes_per_dump must be finite and non-negative")
    if n_dumps == 0:
        return []
    n_slices = min(n_slices, n_dumps)
    cumulative = np.cumsum(sizes)
    total = cumulative[-1]
    if total == 0:
        cumulative = np.arange(1, n_dumps + 1, dtype=np.float64)
        total = float(n_dumps)
    targets = total * np.arange(1, n_slices) / n_slices
    # side="left": a slice ends with the dump that reaches its share
    stops = np.searchsorted(cumulative, targets, side="left") + 1
    bounds = [0]
    for k, stop in enumerate(stops):
        # keep every slice non-empty and leave room for the ones after it
        stop = int(np.clip(stop, bounds[-1] + 1, n_dumps - (n_slices - 1 - k)))
        bounds.append(stop)
    bounds.append(n_dumps)
    return [range(a, b) for a, b in itertools.pairwise(bounds)]


def iter_blocks(
    dumps: range,
    vis,
    flags,
    weights,
    uvw=None,
    *,
    chunk_dumps: int = 8,
) -> Iterator[DumpBlock]:
    """Blocks of at most `chunk_dumps` dumps of `dumps` from array-likes indexed by dump.

    `vis`, `flags`, `weights` (and ``uvw`` if given) are indexed with the global dump slice,
    so numpy, zarr and dask arrays all work; each chunk is read with ``np.asarray``.
    """
    if chunk_dumps < 1:
        raise ValueError(f"chunk_dumps must be positive, not {chunk_dumps}")
    for start in range(dumps.start, dumps.stop, chunk_dumps):
        sl = slice(start, min(start + chunk_dumps, dumps.stop))
        yield DumpBlock(
            first_dump=start,
            vis=np.asarray(vis[sl]),
            flags=np.asarray(flags[sl]),
            weights=np.asarray(weights[sl]),
            uvw=None if uvw is None else np.asarray(uvw[sl]),
        )


def write_ms(
    path: str | os.PathLike,
    meta: MSInput,
    vis,
    flags,
    weights,
    uvw=None,
    *,
    dumps: range | None = None,
    chunk_dumps: int = 8,
    progress: Progress | None = None,
    **create_kwargs,
) -> Path:
    """Export dumps `dumps` (default: all) of whole-observation arrays as one MS.

    Parameters
    ----------
    path
        Output MS name.
    meta
        The whole observation (global subtables and ids).
    vis, flags, weights
        ``(T, F, B)`` array-likes over all of ``meta``'s dumps.
    uvw
        Optional ``(T, nbl, 3)`` array-like; otherwise ``meta.antenna_uvw`` is used.
    dumps
        Global dump range of this slice.
    chunk_dumps
        Dumps per block handed to ``putcol``.
    progress
        Called after each block with ``(dumps written, len(dumps))``.
    **create_kwargs
        Passed to `create_ms`.

    Returns
    -------
    Path
        The published MS.
    """
    dumps = range(meta.n_dumps) if dumps is None else dumps
    if dumps.step != 1 or not 0 <= dumps.start <= dumps.stop <= meta.n_dumps:
        raise ValueError(f"dumps {dumps} is not a contiguous range within 0..{meta.n_dumps}")
    writer: MSWriter = create_ms(path, meta, **create_kwargs)
    with writer:
        append_dumps(
            writer,
            iter_blocks(dumps, vis, flags, weights, uvw, chunk_dumps=chunk_dumps),
            progress=progress,
            total_dumps=len(dumps),
        )
    return writer.path


def concat_slices(parts: Sequence[str | os.PathLike], path: str | os.PathLike) -> Path:
    """Concatenate time slices into one MS at `path` (virtual, referring to the parts).

    What casacore's ``msconcat(..., concatTime=True)`` does, without its console output: MAIN
    rows follow the parts in order and the subtables are the first part's, which is right
    because every slice of an export carries the same global subtables. The parts are
    recorded relative to `path`'s directory, so moving both together keeps it readable.
    """
    if not parts:
        raise ValueError("no parts to concatenate")
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists")
    concat = tables.table([str(p) for p in parts], ack=False)
    try:
        concat.rename(str(path))
    finally:
        concat.close()
    return path
