"""MeasurementSet v2 export: layout, per-slice writer, time slicing and concatenation.

Typical use::

    meta = MSInput(antenna_names=..., antenna_positions=..., channel_freqs=..., ...)
    with create_ms("obs.ms", meta) as ms:
        append_dumps(ms, DumpBlock(first_dump=0, vis=vis, flags=flags, weights=weights, uvw=uvw))

or, from a dataset reader's `ExportSource`, whole, as slice k of N, or N slices in parallel::

    export_ms(source, "obs.ms", n_slices=8)          # dask.distributed, then concatenated

or, for slices written by hand (e.g. one per dask worker)::

    for k, dumps in enumerate(plan_slices(meta.n_dumps, bytes_per_dump, n_slices)):
        write_ms(f"obs_{k}.ms", meta, vis, flags, weights, uvw, dumps=dumps)
"""

from .export import ExportResult, ExportSource, SliceResult, export_ms, plan_export, write_slice
from .kernels import gather_rows
from .layout import MJD_UNIX_OFFSET, MSInput, MSLayout, Scan, Target, itrf_from_enu
from .slicing import concat_slices, iter_blocks, plan_slices, write_ms
from .uvw import geometric_uvw
from .writer import DumpBlock, MainRows, MSWriter, append_dumps, create_ms, main_table_layout

__all__ = [
    "MJD_UNIX_OFFSET",
    "DumpBlock",
    "ExportResult",
    "ExportSource",
    "MSInput",
    "MSLayout",
    "MSWriter",
    "MainRows",
    "Scan",
    "SliceResult",
    "Target",
    "append_dumps",
    "concat_slices",
    "create_ms",
    "export_ms",
    "gather_rows",
    "geometric_uvw",
    "iter_blocks",
    "itrf_from_enu",
    "main_table_layout",
    "plan_export",
    "plan_slices",
    "write_ms",
    "write_slice",
]
