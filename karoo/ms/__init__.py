"""MeasurementSet v2 export: layout, per-slice writer, time slicing and concatenation.

Typical use::

    meta = MSInput(antenna_names=..., antenna_positions=..., channel_freqs=..., ...)
    with create_ms("obs.ms", meta) as ms:
        append_dumps(ms, DumpBlock(first_dump=0, vis=vis, flags=flags, weights=weights, uvw=uvw))

or, for slices written independently (e.g. one per dask worker)::

    for k, dumps in enumerate(plan_slices(meta.n_dumps, bytes_per_dump, n_slices)):
        write_ms(f"obs_{k}.ms", meta, vis, flags, weights, uvw, dumps=dumps)
"""

from .export import ExportSource
from .kernels import gather_rows
from .layout import MJD_UNIX_OFFSET, MSInput, MSLayout, Scan, Target, itrf_from_enu
from .slicing import concat_slices, iter_blocks, plan_slices, write_ms
from .uvw import geometric_uvw
from .writer import DumpBlock, MSWriter, append_dumps, create_ms, main_table_layout

__all__ = [
    "MJD_UNIX_OFFSET",
    "DumpBlock",
    "ExportSource",
    "MSInput",
    "MSLayout",
    "MSWriter",
    "Scan",
    "Target",
    "append_dumps",
    "concat_slices",
    "create_ms",
    "gather_rows",
    "geometric_uvw",
    "iter_blocks",
    "itrf_from_enu",
    "main_table_layout",
    "plan_slices",
    "write_ms",
]
