"""Writing a MeasurementSet v2 with python-casacore: the table layout and the row writer.

MAIN is time-major, one row per baseline per dump, in `MSLayout`'s canonical order. The
bulk columns (DATA, FLAG, WEIGHT_SPECTRUM, SIGMA_SPECTRUM, CORRECTED_DATA, UVW, WEIGHT,
SIGMA) sit on TiledColumnStMan with tiles of all correlations x all channels x a whole
number of dumps' rows, so a tile never straddles dumps and row ranges map to byte ranges;
the scalars stay on StandardStMan.

Values written per row:

* TIME = TIME_CENTROID: dump centre in MJD seconds (UTC); INTERVAL = EXPOSURE: dump period.
* FLAG: ``(flags & flag_mask) != 0``; FLAG_ROW: every FLAG of the row set.
* WEIGHT_SPECTRUM: the weights as given; SIGMA_SPECTRUM: ``weight ** -0.5``.
* WEIGHT: mean of WEIGHT_SPECTRUM over channels; SIGMA: ``WEIGHT ** -0.5``.
* When a block gives ``sigma_weights`` (CASA's convention after ``applycal``: WEIGHT* go with
  CORRECTED_DATA, SIGMA* with the raw DATA), SIGMA and SIGMA_SPECTRUM come from them instead.
* Zero weight gives SIGMA (and SIGMA_SPECTRUM) = inf, so that ``1 / SIGMA**2`` is again 0
  (katdal's policy); pass ``zero_weight_sigma`` to choose another value.
* Missing correlation products: DATA 0, WEIGHT 0, FLAG set.
* UVW = uvw[ANTENNA1] - uvw[ANTENNA2] (metres; CASA practice, as katdal writes it).
* FEED1 = FEED2 = DATA_DESC_ID = ARRAY_ID = OBSERVATION_ID = 0, PROCESSOR_ID = -1.

The MS is built under ``<path>.partial`` and renamed to `path` on `MSWriter.close`, so an
interrupted export never leaves something that looks like a complete MS.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import math
import os
import pickle
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from casacore import tables

from .kernels import block_to_rows, gather_rows
from .layout import MJD_UNIX_OFFSET, MSInput, MSLayout

logger = logging.getLogger(__name__)

#: Callback after each block: ``progress(dumps_written, total_dumps_or_None)``.
Progress = Callable[[int, int | None], None]

DEFAULT_TILE_BYTES = 4 * 1024 * 1024
#: RECEPTOR_ANGLE of MeerKAT's linear feeds (H -> X at -90 degrees, as katdal writes it).
MEERKAT_RECEPTOR_ANGLE = (-math.pi / 2, -math.pi / 2)


@dataclass
class DumpBlock:
    """Consecutive dumps ``first_dump .. first_dump + T - 1`` (global dump indices).

    Attributes
    ----------
    first_dump
        Global index of the first dump of the block.
    vis
        ``(T, F, B)`` complex64 visibilities in correlation-product order.
    flags
        ``(T, F, B)`` bool, or uint8 flag bits (any bit in ``flag_mask`` flags).
    weights
        ``(T, F, B)`` float32 weights.
    uvw
        Optional ``(T, nbl, 3)`` baseline uvw in metres in canonical baseline order; if
        omitted, ``MSInput.antenna_uvw`` is used.
    corrected
        Optional ``(T, F, B)`` complex64 for CORRECTED_DATA (DATA is copied if omitted).
    sigma_weights
        Optional ``(T, F, B)`` float32 weights from which SIGMA and SIGMA_SPECTRUM are
        derived (default `weights`): the raw weights when `weights` are calibrated ones.
    """

    first_dump: int
    vis: np.ndarray
    flags: np.ndarray
    weights: np.ndarray
    uvw: np.ndarray | None = None
    corrected: np.ndarray | None = None
    sigma_weights: np.ndarray | None = None

    @property
    def n_dumps(self) -> int:
        return len(self.vis)


@dataclass
class MainRows:
    """MAIN columns of a block of dumps, ready for ``putcol`` (see `MSWriter.rows`)."""

    first_dump: int
    n_dumps: int
    columns: dict[str, np.ndarray]


def _tile_rows(n_baselines: int, n_dumps: int, row_bits: int, tile_bytes: int) -> int:
    """Rows per tile: whole dumps, as many as fit in `tile_bytes` (at least one dump)."""
    dumps = max(1, (8 * tile_bytes) // max(1, n_baselines * row_bits))
    return n_baselines * min(dumps, max(1, n_dumps))


def main_table_layout(
    meta: MSInput,
    layout: MSLayout,
    *,
    corrected_data: bool = False,
    spectrum: bool = True,
    tile_bytes: int = DEFAULT_TILE_BYTES,
) -> tuple[dict, dict]:
    """Table description and data-manager info for MAIN (to pass to ``default_ms``).

    Returns
    -------
    tabdesc, dminfo
        The extra and overridden columns, and their TiledColumnStMan specs.
    """
    required = tables.required_ms_desc("MAIN")
    n_chans, n_corr, nbl = meta.n_chans, layout.n_corr, layout.n_baselines
    # name -> (value, cell shape, bits per cell element)
    bulk: dict[str, tuple[object, list[int], int]] = {
        "DATA": (np.complex64(0), [n_chans, n_corr], 64),
        "FLAG": (False, [n_chans, n_corr], 1),
        "UVW": (0.0, [3], 64),
        "WEIGHT": (np.float32(0), [n_corr], 32),
        "SIGMA": (np.float32(0), [n_corr], 32),
    }
    if spectrum:
        bulk["WEIGHT_SPECTRUM"] = (np.float32(0), [n_chans, n_corr], 32)
        bulk["SIGMA_SPECTRUM"] = (np.float32(0), [n_chans, n_corr], 32)
    if corrected_data:
        bulk["CORRECTED_DATA"] = (np.complex64(0), [n_chans, n_corr], 64)
    type_names = {np.complex64: "complex", bool: "boolean", float: "double", np.float32: "float"}
    columns, dminfo = [], {}
    for i, (name, (value, shape, bits)) in enumerate(bulk.items()):
        desc = required.get(name, {})
        keywords = dict(desc.get("keywords", {}))
        if name in ("DATA", "CORRECTED_DATA"):
            keywords["UNIT"] = "Jy"
        group = f"Tiled{name}"
        columns.append(
            tables.makearrcoldesc(
                name,
                value,
                shape=shape,
                valuetype=type_names[type(value)],
                options=4,  # FixedShape, so TiledColumnStMan can hold it
                datamanagertype="TiledColumnStMan",
                datamanagergroup=group,
                comment=desc.get("comment", ""),
                keywords=keywords,
            )
        )
        rows = _tile_rows(nbl, meta.n_dumps, bits * int(np.prod(shape)), tile_bytes)
        dminfo[f"*{i + 1}"] = {
            "TYPE": "TiledColumnStMan",
            "NAME": group,
            "SPEC": {"DEFAULTTILESHAPE": np.array([*shape[::-1], rows], np.int32)},
            "COLUMNS": [name],
        }
    return tables.maketabdesc(columns), dminfo


class MSWriter:
    """An MS v2 being written: the open MAIN table plus what rows need.

    Create it with `create_ms`; add rows with `append` (or `append_dumps`); `close` it
    (or use it as a context manager) to publish it under its final name.
    """

    def __init__(
        self,
        path: Path,
        partial: Path,
        table: tables.table,
        meta: MSInput,
        layout: MSLayout,
        *,
        flag_mask: int,
        zero_weight_sigma: float,
    ) -> None:
        self.path = path
        self.partial = partial
        self.table = table
        self.meta = meta
        self.layout = layout
        self.flag_mask = flag_mask
        self.zero_weight_sigma = zero_weight_sigma
        self.columns = set(table.colnames())
        self.dumps_written = 0
        self._next_dump = 0

    def __enter__(self) -> MSWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def close(self) -> Path:
        """Flush, close and rename ``<path>.partial`` to `path`; returns `path`."""
        self.table.close()
        os.replace(self.partial, self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the partial MS."""
        self.table.close()
        shutil.rmtree(self.partial, ignore_errors=True)

    def append(self, block: DumpBlock) -> None:
        """Write one block of dumps as ``T * nbl`` new MAIN rows (see the module docstring)."""
        self.write_rows(self.rows(block))

    def rows(self, block: DumpBlock) -> MainRows:
        """The MAIN rows of `block`, computed without touching the table.

        Safe to call from another thread while `write_rows` writes the previous block, which
        is how an export overlaps the transpose with casacore's writes.
        """
        meta, layout = self.meta, self.layout
        n_dumps, nbl = block.n_dumps, layout.n_baselines
        dumps = np.arange(block.first_dump, block.first_dump + n_dumps)
        expected = (n_dumps, meta.n_chans)
        for name in ("vis", "flags", "weights", "corrected", "sigma_weights"):
            if getattr(block, name) is None:
                continue
            shape = np.shape(getattr(block, name))
            if len(shape) != 3 or shape[:2] != expected:
                raise ValueError(
                    f"{name} must have shape (T, F, B) = {expected} + (B,), not {shape}"
                )
        if n_dumps == 0:
            return MainRows(block.first_dump, 0, {})
        if dumps[-1] >= meta.n_dumps:
            raise ValueError(f"dumps {dumps[0]}..{dumps[-1]} beyond the {meta.n_dumps} described")
        outside = dumps[layout.scan_number[dumps] < 0]
        if len(outside):
            raise ValueError(f"dumps {outside.tolist()} belong to no scan")

        cols = block_to_rows(
            block.vis,
            block.flags,
            block.weights,
            layout.corr_index,
            corr_conj=layout.corr_conj,
            sigma_weights=block.sigma_weights,
            flag_mask=self.flag_mask,
            zero_sigma=self.zero_weight_sigma,
            spectrum="WEIGHT_SPECTRUM" in self.columns,
        )
        data = cols["DATA"]
        cols["UVW"] = self._uvw(block, dumps)
        if "CORRECTED_DATA" in self.columns:
            cols["CORRECTED_DATA"] = (
                data
                if block.corrected is None
                else gather_rows(np.asarray(block.corrected, np.complex64), layout.corr_index, 0,
                                 corr_conj=layout.corr_conj)
            )

        def per_dump(values: np.ndarray, dtype) -> np.ndarray:
            return np.repeat(np.asarray(values, dtype), nbl)

        time = per_dump(np.asarray(meta.timestamps)[dumps] + MJD_UNIX_OFFSET, np.float64)
        n_rows = n_dumps * nbl
        cols.update(
            TIME=time,
            TIME_CENTROID=time,
            INTERVAL=np.full(n_rows, meta.dump_period, np.float64),
            EXPOSURE=np.full(n_rows, meta.dump_period, np.float64),
            ANTENNA1=np.tile(layout.ant1, n_dumps),
            ANTENNA2=np.tile(layout.ant2, n_dumps),
            FIELD_ID=per_dump(layout.field_id[dumps], np.int32),
            SCAN_NUMBER=per_dump(layout.scan_number[dumps], np.int32),
            STATE_ID=per_dump(layout.state_id[dumps], np.int32),
            PROCESSOR_ID=np.full(n_rows, -1, np.int32),
        )
        zeros = np.zeros(n_rows, np.int32)
        for name in ("FEED1", "FEED2", "DATA_DESC_ID", "ARRAY_ID", "OBSERVATION_ID"):
            cols[name] = zeros
        return MainRows(block.first_dump, n_dumps, cols)

    def write_rows(self, rows: MainRows) -> None:
        """Append rows from `rows` (blocks in time order) to MAIN."""
        if rows.first_dump < self._next_dump:
            raise ValueError(
                f"dumps must be appended in time order: block starts at dump {rows.first_dump}, "
                f"dump {self._next_dump - 1} is already written"
            )
        if rows.n_dumps == 0:
            return
        n_rows = rows.n_dumps * self.layout.n_baselines
        start = self.table.nrows()
        self.table.addrows(n_rows)
        for name, values in rows.columns.items():
            self.table.putcol(name, values, startrow=start, nrow=n_rows)
        self._next_dump = rows.first_dump + rows.n_dumps
        self.dumps_written += rows.n_dumps

    def _uvw(self, block: DumpBlock, dumps: np.ndarray) -> np.ndarray:
        nbl = self.layout.n_baselines
        if block.uvw is not None:
            uvw = np.asarray(block.uvw, np.float64)
            if uvw.shape != (len(dumps), nbl, 3):
                raise ValueError(f"uvw must have shape {(len(dumps), nbl, 3)}, not {uvw.shape}")
            return uvw.reshape(-1, 3)
        if self.meta.antenna_uvw is None:
            raise ValueError("block has no uvw and MSInput.antenna_uvw is not set")
        ant_uvw = np.asarray(
            self.meta.antenna_uvw(
                np.asarray(self.meta.timestamps)[dumps], self.layout.field_id[dumps]
            ),
            np.float64,
        )
        expected = (len(dumps), self.meta.n_ants, 3)
        if ant_uvw.shape != expected:
            raise ValueError(f"antenna_uvw returned shape {ant_uvw.shape}, not {expected}")
        return (ant_uvw[:, self.layout.ant1] - ant_uvw[:, self.layout.ant2]).reshape(-1, 3)


def create_ms(
    path: str | os.PathLike,
    meta: MSInput,
    *,
    corrected_data: bool = False,
    spectrum: bool = True,
    source_table: bool = True,
    tile_bytes: int = DEFAULT_TILE_BYTES,
    flag_mask: int = 0xFF,
    zero_weight_sigma: float = math.inf,
    receptor_angle: tuple[float, float] = MEERKAT_RECEPTOR_ANGLE,
    overwrite: bool = False,
) -> MSWriter:
    """Create an empty MS v2 at `path` with all subtables filled from `meta`.

    Parameters
    ----------
    path
        Final name of the MS; it is written as ``<path>.partial`` until closed.
    meta
        The observation; every slice written from the same `meta` gets identical
        subtables and global ids.
    corrected_data
        Add CORRECTED_DATA (a copy of DATA unless blocks give ``corrected``).
    spectrum
        Add WEIGHT_SPECTRUM and SIGMA_SPECTRUM.
    source_table
        Add the optional SOURCE subtable (one row per target).
    tile_bytes
        Upper bound on a tile of a bulk column (at least one dump's rows per tile).
    flag_mask
        Flag bits that set FLAG when blocks give uint8 flags.
    zero_weight_sigma
        SIGMA / SIGMA_SPECTRUM where the weight is 0 (default inf).
    receptor_angle
        FEED.RECEPTOR_ANGLE of the X and Y receptors in radians.
    overwrite
        Replace an existing MS at `path` (otherwise FileExistsError).

    Returns
    -------
    MSWriter
        Open for `append_dumps`; close it to publish the MS.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    layout = MSLayout.from_input(meta)
    shutil.rmtree(partial, ignore_errors=True)
    if path.exists():
        shutil.rmtree(path)
    options = (corrected_data, spectrum, source_table, tile_bytes, tuple(receptor_angle))
    template = _TEMPLATES.get(meta, options)
    if template is not None:
        shutil.copytree(template, partial)
        table = tables.table(str(partial), readonly=False, ack=False)
    else:
        table = _create_empty_ms(partial, meta, layout, *options)
    return MSWriter(
        path, partial, table, meta, layout, flag_mask=flag_mask, zero_weight_sigma=zero_weight_sigma
    )


def _create_empty_ms(
    path: Path,
    meta: MSInput,
    layout: MSLayout,
    corrected_data: bool,
    spectrum: bool,
    source_table: bool,
    tile_bytes: int,
    receptor_angle: tuple[float, float],
) -> tables.table:
    """A new MS at `path`: MAIN without rows, subtables filled; returned open for writing."""
    tabdesc, dminfo = main_table_layout(
        meta, layout, corrected_data=corrected_data, spectrum=spectrum, tile_bytes=tile_bytes
    )
    table = tables.default_ms(str(path), tabdesc, dminfo)
    try:
        _write_subtables(table, path, meta, layout, receptor_angle, source_table)
    except BaseException:
        table.close()
        shutil.rmtree(path, ignore_errors=True)
        raise
    return table


class _TemplateCache:
    """Empty MSs (subtables filled, MAIN without rows) already built in this process.

    casacore takes a few tenths of a second to create an MS and its 12 subtables, which
    dominates small slices; every slice of an export has the same empty MS, so a process
    writing several builds it once and copies the directory (a few milliseconds). A template
    is only reused for the same `MSInput` and options (compared by their pickled bytes).
    """

    def __init__(self, max_templates: int = 4) -> None:
        self.max_templates = max_templates
        self._dir: Path | None = None
        self._paths: dict[bytes, Path] = {}
        self._lock = threading.Lock()

    def get(self, meta: MSInput, options: tuple) -> Path | None:
        """The template for `meta` and `options`, built now if needed (None: not cacheable)."""
        try:
            key = hashlib.sha256(pickle.dumps((meta, options), protocol=5)).digest()
        except Exception:  # e.g. an antenna_uvw hook that does not pickle: build each time
            return None
        with self._lock:
            path = self._paths.get(key)
            if path is not None and path.exists():
                return path
            if self._dir is None:
                self._dir = Path(tempfile.mkdtemp(prefix="karoo-ms-templates-"))
                atexit.register(shutil.rmtree, self._dir, ignore_errors=True)
            if len(self._paths) >= self.max_templates:
                old = self._paths.pop(next(iter(self._paths)))
                shutil.rmtree(old, ignore_errors=True)
            path = self._dir / f"{key.hex()[:16]}.ms"
            _create_empty_ms(path, meta, MSLayout.from_input(meta), *options).close()
            self._paths[key] = path
            return path


_TEMPLATES = _TemplateCache()


def append_dumps(
    ms: MSWriter,
    blocks: DumpBlock | Iterable[DumpBlock],
    *,
    progress: Progress | None = None,
    total_dumps: int | None = None,
) -> int:
    """Append blocks of dumps to `ms` in time order; returns the number of dumps written.

    Parameters
    ----------
    ms
        Writer from `create_ms`.
    blocks
        One `DumpBlock` or an iterable of them (e.g. a generator reading a chunk store).
    progress
        Called after each block with ``(dumps written so far, total_dumps)``.
    total_dumps
        Passed through to `progress`.
    """
    if isinstance(blocks, DumpBlock):
        blocks = [blocks]
    written = 0
    for block in blocks:
        ms.append(block)
        written += block.n_dumps
        if progress is not None:
            progress(ms.dumps_written, total_dumps)
    return written


def _put_rows(table: tables.table, columns: dict[str, object]) -> None:
    """Fill an empty subtable: each value is a per-row sequence/array or a scalar for all."""
    n_rows = max((len(v) for v in columns.values() if isinstance(v, list | np.ndarray)), default=1)
    table.addrows(n_rows)
    for name, values in columns.items():
        if not isinstance(values, list | np.ndarray):
            values = [values] * n_rows
        if isinstance(values, list) and values and isinstance(values[0], str):
            table.putcol(name, values)
        else:
            table.putcol(name, np.asarray(values))


def _write_subtables(
    ms: tables.table,
    path: Path,
    meta: MSInput,
    layout: MSLayout,
    receptor_angle: tuple[float, float],
    source_table: bool,
) -> None:
    def sub(name: str) -> tables.table:
        return tables.table(str(path / name), readonly=False, ack=False)

    n_ants, n_targets = meta.n_ants, len(meta.targets)
    timestamps = np.asarray(meta.timestamps, np.float64) + MJD_UNIX_OFFSET
    start, end = timestamps[0] - meta.dump_period / 2, timestamps[-1] + meta.dump_period / 2
    diameters = np.broadcast_to(np.asarray(meta.dish_diameters, np.float64), (n_ants,))
    stations = list(meta.stations) if meta.stations is not None else list(meta.antenna_names)
    with sub("ANTENNA") as t:
        _put_rows(
            t,
            {
                "NAME": list(meta.antenna_names),
                "STATION": stations,
                "TYPE": ["GROUND-BASED"] * n_ants,
                "MOUNT": ["ALT-AZ"] * n_ants,
                "POSITION": np.asarray(meta.antenna_positions, np.float64),
                "OFFSET": np.zeros((n_ants, 3)),
                "DISH_DIAMETER": diameters.copy(),
                "FLAG_ROW": np.zeros(n_ants, bool),
            },
        )
    with sub("FEED") as t:
        _put_rows(
            t,
            {
                "ANTENNA_ID": np.arange(n_ants, dtype=np.int32),
                "FEED_ID": np.zeros(n_ants, np.int32),
                "SPECTRAL_WINDOW_ID": np.full(n_ants, -1, np.int32),
                "TIME": np.full(n_ants, (start + end) / 2),
                "INTERVAL": np.full(n_ants, end - start),
                "NUM_RECEPTORS": np.full(n_ants, 2, np.int32),
                "BEAM_ID": np.full(n_ants, -1, np.int32),
                "BEAM_OFFSET": np.zeros((n_ants, 2, 2)),
                "POLARIZATION_TYPE": np.array([["X", "Y"]] * n_ants),
                "POL_RESPONSE": np.broadcast_to(
                    np.eye(2, dtype=np.complex64), (n_ants, 2, 2)
                ).copy(),
                "POSITION": np.zeros((n_ants, 3)),
                "RECEPTOR_ANGLE": np.tile(np.asarray(receptor_angle, np.float64), (n_ants, 1)),
            },
        )
    freqs = np.asarray(meta.channel_freqs, np.float64)
    width = np.full(meta.n_chans, float(meta.channel_width))
    with sub("SPECTRAL_WINDOW") as t:
        _put_rows(
            t,
            {
                "NUM_CHAN": np.array([meta.n_chans], np.int32),
                "NAME": ["SPW0"],
                "REF_FREQUENCY": np.array([freqs[meta.n_chans // 2]]),
                "CHAN_FREQ": freqs[np.newaxis],
                "CHAN_WIDTH": width[np.newaxis],
                "EFFECTIVE_BW": np.abs(width)[np.newaxis],
                "RESOLUTION": np.abs(width)[np.newaxis],
                "MEAS_FREQ_REF": np.array([5], np.int32),  # TOPO
                "TOTAL_BANDWIDTH": np.array([abs(float(meta.channel_width)) * meta.n_chans]),
                "NET_SIDEBAND": np.array([1], np.int32),
                "IF_CONV_CHAIN": np.array([0], np.int32),
                "FREQ_GROUP": np.array([0], np.int32),
                "FREQ_GROUP_NAME": ["none"],
                "FLAG_ROW": np.array([False]),
            },
        )
    with sub("POLARIZATION") as t:
        _put_rows(
            t,
            {
                "NUM_CORR": np.array([layout.n_corr], np.int32),
                "CORR_TYPE": np.array([layout.corr_types], np.int32),
                "CORR_PRODUCT": layout.corr_product[np.newaxis],
                "FLAG_ROW": np.array([False]),
            },
        )
    with sub("DATA_DESCRIPTION") as t:
        _put_rows(
            t,
            {
                "SPECTRAL_WINDOW_ID": np.array([0], np.int32),
                "POLARIZATION_ID": np.array([0], np.int32),
                "FLAG_ROW": np.array([False]),
            },
        )
    # FIELD.TIME: centre of the first dump of the field's first scan (or of the data)
    field_time = np.full(n_targets, np.inf)
    for scan in meta.scans:
        field_time[scan.target] = min(field_time[scan.target], timestamps[scan.start])
    field_time[np.isinf(field_time)] = timestamps[0]
    directions = np.array([[[tg.ra, tg.dec]] for tg in meta.targets], np.float64).reshape(-1, 1, 2)
    names = [tg.name for tg in meta.targets]
    with sub("FIELD") as t:
        _put_rows(
            t,
            {
                "NAME": names,
                "CODE": ["T"] * n_targets,
                "TIME": field_time,
                "NUM_POLY": np.zeros(n_targets, np.int32),
                "DELAY_DIR": directions,
                "PHASE_DIR": directions,
                "REFERENCE_DIR": directions,
                "SOURCE_ID": np.arange(n_targets, dtype=np.int32),
                "FLAG_ROW": np.zeros(n_targets, bool),
            },
        )
    with sub("OBSERVATION") as t:
        _put_rows(
            t,
            {
                "TELESCOPE_NAME": [meta.telescope_name],
                "OBSERVER": [meta.observer],
                "PROJECT": [meta.project],
                "TIME_RANGE": np.array([[start, end]]),
                "RELEASE_DATE": np.array([end]),
                "SCHEDULE_TYPE": [""],
                "LOG": np.array([[""]]),
                "SCHEDULE": np.array([[""]]),
                "FLAG_ROW": np.array([False]),
            },
        )
    n_states = len(layout.intents)
    with sub("STATE") as t:
        _put_rows(
            t,
            {
                "OBS_MODE": list(layout.intents),
                "SIG": np.ones(n_states, bool),
                "REF": np.zeros(n_states, bool),
                "CAL": np.zeros(n_states),
                "LOAD": np.zeros(n_states),
                "SUB_SCAN": np.zeros(n_states, np.int32),
                "FLAG_ROW": np.zeros(n_states, bool),
            },
        )
    if meta.history:
        n_hist = len(meta.history)
        with sub("HISTORY") as t:
            _put_rows(
                t,
                {
                    "TIME": np.full(n_hist, start),
                    "OBSERVATION_ID": np.zeros(n_hist, np.int32),
                    "MESSAGE": list(meta.history),
                    "PRIORITY": ["NORMAL"] * n_hist,
                    "ORIGIN": ["karoo.ms"] * n_hist,
                    "OBJECT_ID": np.zeros(n_hist, np.int32),
                    "APPLICATION": ["karoo"] * n_hist,
                    "CLI_COMMAND": np.array([[""]] * n_hist),
                    "APP_PARAMS": np.array([[""]] * n_hist),
                },
            )
    if source_table:
        source = tables.default_ms_subtable("SOURCE", str(path / "SOURCE"))
        with source as t:
            _put_rows(
                t,
                {
                    "SOURCE_ID": np.arange(n_targets, dtype=np.int32),
                    "TIME": np.full(n_targets, (start + end) / 2),
                    "INTERVAL": np.full(n_targets, end - start),
                    "SPECTRAL_WINDOW_ID": np.full(n_targets, -1, np.int32),
                    "NUM_LINES": np.zeros(n_targets, np.int32),
                    "NAME": names,
                    "CALIBRATION_GROUP": np.zeros(n_targets, np.int32),
                    "CODE": ["T"] * n_targets,
                    "DIRECTION": directions[:, 0],
                    "PROPER_MOTION": np.zeros((n_targets, 2)),
                },
            )
        ms.putkeyword("SOURCE", "Table: " + str(path / "SOURCE"))
