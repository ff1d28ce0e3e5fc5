"""MS export of an observation, whole or as slices on demand, in parallel on ``dask.distributed``.

`ExportSource` is the contract between a dataset reader and the exporter: metadata
(`MSInput`) plus ``(T, F, B)`` array-likes indexed by dump. A reader (``karoo.dataset``) turns a
selection of a capture block into an `ExportSource`; `export_ms` writes it

* whole, as one MS;
* as slice ``k`` of ``N`` (``slice_index=k``): one complete, standalone MS holding only that
  slice's dumps, reading only those dumps from the source;
* as ``N`` slices written in parallel, each an independent task on a ``dask.distributed``
  cluster (a local one by default), then concatenated in time into one MS whose MAIN table
  is identical to the whole export.

Slices are cut at dump boundaries by bytes (`plan_slices`), over the dumps that belong to a
scan (slews and other dumps outside `MSInput.scans` are never written). Every slice carries the
global subtables and ids, which is what makes the concatenation exact.

Calibration: when the source has ``corrected`` visibilities they go to CORRECTED_DATA and DATA
stays raw (``calibrated='CORRECTED_DATA'``, the default), or they replace DATA
(``calibrated='DATA'``). Weights follow CASA's convention after ``applycal(calwt=True)``:
WEIGHT and WEIGHT_SPECTRUM describe the calibrated visibilities (``calibrated_weights``), while
SIGMA and SIGMA_SPECTRUM describe DATA, so they come from the raw weights when DATA is raw and
from the calibrated weights when DATA holds the calibrated visibilities.

Memory is bounded by the block size (``chunk_bytes``, about 64 MB of source data by default,
at least one dump): a slice holds the block being written and the next one being read, whatever
the size of the observation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from .layout import MSInput, MSLayout
from .slicing import concat_slices, plan_slices
from .writer import DumpBlock, create_ms

T = TypeVar("T")

logger = logging.getLogger(__name__)

#: Source bytes read per block handed to the writer (rounded to the source's time chunks).
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
CALIBRATED_COLUMNS = ("CORRECTED_DATA", "DATA")


@dataclass
class ExportSource:
    """One observation to export: metadata plus ``(T, F, B)`` array-likes indexed by dump.

    Attributes
    ----------
    meta
        The whole selection's metadata (global subtables and ids), see `MSInput`.
    vis
        complex64 visibilities in ``meta.corr_products`` order (raw, as captured).
    flags
        uint8 flag bits (or bool); any set bit flags the visibility.
    weights
        float32 weights (the real weights, not the stored uint8 codes).
    uvw
        Optional ``(T, n_baselines, 3)`` baseline uvw in metres in canonical baseline order;
        ``meta.antenna_uvw`` is used when omitted.
    corrected
        Optional calibrated visibilities for CORRECTED_DATA (same shape as `vis`); with
        ``calibrated_weights`` the weights that go with them.
    """

    meta: MSInput
    vis: Any
    flags: Any
    weights: Any
    uvw: Any = None
    corrected: Any = None
    calibrated_weights: Any = None

    @property
    def bytes_per_dump(self) -> int:
        """Bytes read from the store per dump (vis + flags + weights), for slice planning."""
        n_chans, n_corr = self.vis.shape[1:]
        per_vis = 8 + 1 + 4 + (8 if self.corrected is not None else 0)
        return int(n_chans * n_corr * per_vis)


@dataclass(frozen=True)
class SliceResult:
    """What one slice task wrote."""

    path: Path
    dumps: range | None
    n_dumps: int
    n_rows: int
    nbytes: int  # source bytes exported (vis, flags, weights, corrected)


@dataclass
class ExportResult:
    """The outcome of `export_ms`.

    Attributes
    ----------
    path
        The MS written: the whole export, the one slice, or the concatenation of the slices.
    slices
        One `SliceResult` per MS written (the parts of a concatenation, in time order).
    """

    path: Path
    slices: list[SliceResult] = field(default_factory=list)

    @property
    def n_rows(self) -> int:
        return sum(s.n_rows for s in self.slices)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.slices)


def exported_dumps(meta: MSInput) -> np.ndarray:
    """Global indices of the dumps an export writes: those inside a scan, in time order."""
    return np.flatnonzero(MSLayout.from_input(meta).scan_number >= 0)


def plan_export(source: ExportSource, n_slices: int) -> list[np.ndarray]:
    """The dumps of each of `n_slices` slices (global indices; fewer slices if few dumps).

    Slices are contiguous runs of the exported dumps (`exported_dumps`) with about equal
    bytes each (`plan_slices`); together they hold every exported dump exactly once.
    """
    dumps = exported_dumps(source.meta)
    return [
        dumps[s.start : s.stop] for s in plan_slices(len(dumps), source.bytes_per_dump, n_slices)
    ]


def slice_paths(out: str | os.PathLike, n_slices: int) -> list[Path]:
    """Where `export_ms` puts the parts of an `n_slices` export to `out`: ``<out>.slices/``."""
    out = Path(out)
    parts = out.with_name(out.name + ".slices")
    return [parts / f"slice-{k:04d}-of-{n_slices:04d}.ms" for k in range(n_slices)]


def export_ms(
    source: ExportSource,
    out: str | os.PathLike,
    *,
    n_slices: int | None = None,
    slice_index: int | None = None,
    scheduler: Any = None,
    n_workers: int | None = None,
    calibrated: Literal["CORRECTED_DATA", "DATA"] = "CORRECTED_DATA",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = True,
    overwrite: bool = False,
    **create_kwargs,
) -> ExportResult:
    """Export `source` as a MeasurementSet v2: whole, one slice, or N slices in parallel.

    Parameters
    ----------
    source
        What to export (must pickle when ``n_slices > 1`` and `slice_index` is None).
    out
        The output MS. For a parallel export the parts go to ``<out>.slices/`` (see
        `slice_paths`) and `out` is their virtual concatenation, which refers to them by
        relative path: keep (and move) both together.
    n_slices
        Number of slices to cut the exported dumps into (by bytes, at dump boundaries).
        Without `slice_index`, all slices are written in parallel on ``dask.distributed`` and
        concatenated; None or 1 writes the whole export in this process.
    slice_index
        With `n_slices`: write only slice ``k`` (0-based) as a standalone MS at `out`,
        reading only its dumps.
    scheduler
        A ``distributed.Client`` or a scheduler address for the parallel export; default a
        ``LocalCluster`` of process workers, closed at the end. The workers must see `out`'s
        file system.
    n_workers
        Workers of the default local cluster (default: min(slices, CPUs)).
    calibrated
        Where ``source.corrected`` goes: ``'CORRECTED_DATA'`` (DATA stays raw) or ``'DATA'``.
    chunk_bytes
        Source bytes per block handed to the writer (bounds the memory of a slice).
    progress
        Show a tqdm progress bar (in dumps).
    overwrite
        Replace existing outputs instead of raising FileExistsError.
    **create_kwargs
        Passed to `create_ms` (``flag_mask``, ``tile_bytes``, ``spectrum``, ...).

    Returns
    -------
    ExportResult
    """
    if calibrated not in CALIBRATED_COLUMNS:
        raise ValueError(f"calibrated must be one of {CALIBRATED_COLUMNS}, not {calibrated!r}")
    if "corrected_data" in create_kwargs:
        raise TypeError("CORRECTED_DATA follows source.corrected and `calibrated`")
    _check_source(source)
    out = Path(out)
    options = _SliceOptions(calibrated, chunk_bytes, overwrite, create_kwargs)
    if slice_index is not None and n_slices is None:
        raise ValueError("slice_index needs n_slices")
    if n_slices is not None and n_slices < 1:
        raise ValueError(f"n_slices must be positive, not {n_slices}")
    if slice_index is None and (n_slices is None or n_slices == 1):
        dumps = exported_dumps(source.meta)
        with _progress_bar(progress, len(dumps), out.name) as bar:
            result = write_slice(source, out, dumps, progress=bar.update, **options.kwargs())
        return ExportResult(out, [result])

    plan = plan_export(source, n_slices)
    if slice_index is not None:
        if not 0 <= slice_index < n_slices:
            raise ValueError(f"slice_index must be in 0..{n_slices - 1}, not {slice_index}")
        # fewer dumps than slices: the slices past the last dump are empty but still valid MSs
        dumps = plan[slice_index] if slice_index < len(plan) else np.zeros(0, np.int64)
        with _progress_bar(progress, len(dumps), out.name) as bar:
            result = write_slice(source, out, dumps, progress=bar.update, **options.kwargs())
        return ExportResult(out, [result])

    paths = slice_paths(out, len(plan))
    _make_room([out, paths[0].parent], overwrite)
    paths[0].parent.mkdir(parents=True)
    jobs = [_SliceJob(p, d, options) for p, d in zip(paths, plan, strict=True)]
    results = _run_distributed(source, jobs, scheduler, n_workers, progress, out.name)
    concat_slices([r.path for r in results], out)
    return ExportResult(out, results)


@dataclass(frozen=True)
class _SliceOptions:
    calibrated: str = "CORRECTED_DATA"
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    overwrite: bool = False
    create_kwargs: dict = field(default_factory=dict)

    def kwargs(self) -> dict:
        return {
            "calibrated": self.calibrated,
            "chunk_bytes": self.chunk_bytes,
            "overwrite": self.overwrite,
            **self.create_kwargs,
        }


@dataclass(frozen=True)
class _SliceJob:
    path: Path
    dumps: np.ndarray
    options: _SliceOptions


def write_slice(
    source: ExportSource,
    path: str | os.PathLike,
    dumps: np.ndarray | range,
    *,
    calibrated: Literal["CORRECTED_DATA", "DATA"] = "CORRECTED_DATA",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    overwrite: bool = False,
    progress: Callable[[int], object] | None = None,
    **create_kwargs,
) -> SliceResult:
    """Write the given global dumps of `source` (time order, inside scans) as one MS.

    The building block of `export_ms` (see there for the parameters): reads blocks of
    about `chunk_bytes`, and reads and transposes the next block in a thread while casacore
    writes the current one. `progress` is called with the number of dumps of each block.
    """
    options = _SliceOptions(calibrated, chunk_bytes, overwrite, create_kwargs)
    dumps = np.asarray(dumps, np.int64)
    if len(dumps) and (np.any(np.diff(dumps) <= 0) or dumps[0] < 0):
        raise ValueError("dumps must be increasing global dump indices")
    with_corrected = source.corrected is not None and options.calibrated == "CORRECTED_DATA"
    writer = create_ms(
        path,
        source.meta,
        corrected_data=with_corrected,
        overwrite=options.overwrite,
        **options.create_kwargs,
    )
    with writer:
        # read and transpose the next block in a thread while casacore writes this one
        blocks = _prefetch(writer.rows(b) for b in _read_blocks(source, dumps, options))
        try:
            for rows in blocks:
                writer.write_rows(rows)
                if progress is not None:
                    progress(rows.n_dumps)
        finally:
            blocks.close()
    runs = _runs(dumps)
    return SliceResult(
        path=writer.path,
        dumps=range(runs[0][0], runs[0][1]) if len(runs) == 1 else None,
        n_dumps=len(dumps),
        n_rows=len(dumps) * writer.layout.n_baselines,
        nbytes=len(dumps) * source.bytes_per_dump,
    )


# --- reading ------------------------------------------------------------------------------


def _check_source(source: ExportSource) -> None:
    meta = source.meta
    shape = (meta.n_dumps, meta.n_chans, len(np.asarray(meta.corr_products).reshape(-1, 2)))
    for name in ("vis", "flags", "weights", "corrected", "calibrated_weights"):
        array = getattr(source, name)
        if array is not None and tuple(array.shape) != shape:
            raise ValueError(f"source.{name} has shape {tuple(array.shape)}, expected {shape}")
    if source.calibrated_weights is not None and source.corrected is None:
        raise ValueError("source.calibrated_weights given without source.corrected")
    if source.uvw is not None:
        nbl = MSLayout.from_input(meta).n_baselines
        if tuple(source.uvw.shape) != (meta.n_dumps, nbl, 3):
            raise ValueError(
                f"source.uvw has shape {tuple(source.uvw.shape)}, expected {(meta.n_dumps, nbl, 3)}"
            )


def _runs(dumps: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous runs ``[(start, stop), ...]`` of increasing dump indices."""
    if len(dumps) == 0:
        return []
    breaks = np.flatnonzero(np.diff(dumps) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(dumps)]])
    return [(int(dumps[a]), int(dumps[b - 1]) + 1) for a, b in zip(starts, stops, strict=True)]


def _time_chunks(array: Any, n_dumps: int) -> np.ndarray:
    """Dump boundaries of the time chunks of `array` (every dump for unchunked arrays)."""
    chunks = getattr(array, "chunks", None)
    if isinstance(chunks, tuple) and chunks and isinstance(chunks[0], tuple):  # dask
        return np.concatenate([[0], np.cumsum(chunks[0])])
    if isinstance(chunks, tuple) and chunks and isinstance(chunks[0], int | np.integer):  # zarr
        return np.unique(np.concatenate([np.arange(0, n_dumps, chunks[0]), [n_dumps]]))
    return np.arange(n_dumps + 1)


def _block_bounds(source: ExportSource, chunk_bytes: int) -> np.ndarray:
    """Global dump boundaries of the blocks: whole source chunks, about `chunk_bytes` each."""
    n_dumps = source.meta.n_dumps
    edges = _time_chunks(source.vis, n_dumps)
    per_dump = max(1, source.bytes_per_dump)
    bounds, start = [0], 0
    for edge in edges[1:]:
        if (edge - start) * per_dump >= chunk_bytes or edge == n_dumps:
            bounds.append(int(edge))
            start = int(edge)
    return np.unique(np.asarray(bounds, np.int64))


def _read_blocks(
    source: ExportSource, dumps: np.ndarray, options: _SliceOptions
) -> Iterator[DumpBlock]:
    """Blocks of `dumps` read from the source, cut at runs and at `_block_bounds`."""
    if options.calibrated not in CALIBRATED_COLUMNS:
        raise ValueError(f"calibrated must be one of {CALIBRATED_COLUMNS}")
    raw_weights = source.weights
    weights = source.calibrated_weights if source.calibrated_weights is not None else raw_weights
    vis, corrected, sigma_weights = source.vis, None, None
    if source.corrected is not None:
        if options.calibrated == "DATA":
            vis = source.corrected
        else:
            corrected = source.corrected
            if source.calibrated_weights is not None:
                sigma_weights = raw_weights
    arrays = {
        "vis": vis,
        "flags": source.flags,
        "weights": weights,
        "uvw": source.uvw,
        "corrected": corrected,
        "sigma_weights": sigma_weights,
    }
    arrays = {k: v for k, v in arrays.items() if v is not None}
    bounds = _block_bounds(source, options.chunk_bytes)
    for start, stop in _runs(dumps):
        cuts = bounds[(bounds > start) & (bounds < stop)]
        for a, b in zip([start, *cuts], [*cuts, stop], strict=True):
            values = _read(arrays, slice(int(a), int(b)))
            yield DumpBlock(first_dump=int(a), **values)


def _read(arrays: dict[str, Any], sl: slice) -> dict[str, np.ndarray]:
    """Read ``array[sl]`` of every array, computing Dask arrays together (shared graphs)."""
    lazy = {k: v[sl] for k, v in arrays.items() if _is_dask(v)}
    values = {k: np.asarray(v[sl]) for k, v in arrays.items() if not _is_dask(v)}
    if lazy:
        import dask

        # threads of this process, even inside a dask.distributed worker
        computed = dask.compute(*lazy.values(), scheduler="threads")
        values.update(zip(lazy, (np.asarray(c) for c in computed), strict=True))
    return values


def _is_dask(array: Any) -> bool:
    return hasattr(array, "__dask_graph__")


def _prefetch(blocks: Iterator[T]) -> Iterator[T]:
    """Iterate `blocks`, producing the next item in a thread while the caller uses one."""
    done = object()
    with ThreadPoolExecutor(1, thread_name_prefix="ms-read") as pool:

        def pull():
            return next(blocks, done)

        future = pool.submit(pull)
        try:
            while True:
                block = future.result()
                if block is done:
                    return
                future = pool.submit(pull)
                yield block
        finally:
            future.cancel()
            # wait for a read in flight; its error is moot when the caller stopped early
            with contextlib.suppress(Exception):
                future.result()


# --- parallel export ------------------------------------------------------------------------


def _make_room(paths: list[Path], overwrite: bool) -> None:
    for path in paths:
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
            shutil.rmtree(path)


def _slice_task(payload: bytes, job: _SliceJob) -> SliceResult:
    """Runs on a worker: unpickle the source (once per process) and write one slice."""
    source = _unpickle_source(payload)
    return write_slice(source, job.path, job.dumps, **job.options.kwargs())


_source_cache: dict[int, tuple[bytes, ExportSource]] = {}
_source_lock = threading.Lock()


def _unpickle_source(payload: bytes) -> ExportSource:
    import cloudpickle

    key = hash(payload)
    with _source_lock:
        cached = _source_cache.get(key)
        if cached is None or cached[0] != payload:
            _source_cache.clear()
            cached = (payload, cloudpickle.loads(payload))
            _source_cache[key] = cached
        return cached[1]


def _run_distributed(
    source: ExportSource,
    jobs: list[_SliceJob],
    scheduler: Any,
    n_workers: int | None,
    progress: bool,
    label: str,
) -> list[SliceResult]:
    import cloudpickle
    from distributed import Client, LocalCluster, as_completed

    # Pickled here, once: a clear error if the source does not pickle, and the Dask arrays
    # inside travel as opaque bytes (distributed would otherwise compute collections in args).
    try:
        payload = cloudpickle.dumps(source)
    except Exception as exc:
        raise TypeError(f"the export source does not pickle: {exc}") from exc
    cluster = None
    if scheduler is None:
        workers = n_workers or min(len(jobs), os.cpu_count() or 1)
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster, set_as_default=False)
    elif isinstance(scheduler, Client):
        client = scheduler
    else:
        client = Client(scheduler, set_as_default=False)
    try:
        shared = client.scatter(payload, broadcast=True)
        futures = {
            client.submit(_slice_task, shared, job, pure=False, key=f"ms-slice-{k}-{job.path}"): k
            for k, job in enumerate(jobs)
        }
        results: list[SliceResult | None] = [None] * len(jobs)
        total = sum(len(job.dumps) for job in jobs)
        with _progress_bar(progress, total, label) as bar:
            for future in as_completed(futures, loop=client.loop):
                result = future.result()
                results[futures[future]] = result
                bar.update(result.n_dumps)
        return [r for r in results if r is not None]
    finally:
        if client is not scheduler:
            client.close()
        if cluster is not None:
            cluster.close()


def _progress_bar(enabled: bool, total: int, label: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="dump", desc=label, disable=not enabled)
