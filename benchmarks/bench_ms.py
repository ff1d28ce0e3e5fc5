"""MS v2 writing: karoo.ms against katdal's ms_extra (the core of mvftoms), in one run.

Both write the same MAIN content (DATA, FLAG, WEIGHT_SPECTRUM, SIGMA_SPECTRUM, UVW, scalars)
to a fresh MS on local disk in blocks of 8 dumps, with tiled bulk columns. karoo starts from
(T, F, corr product) blocks and includes its transpose into rows; katdal gets rows already
transposed (its own transpose lives in the mvftoms script), so the comparison favours
katdal. MB/s counts DATA + WEIGHT_SPECTRUM + SIGMA_SPECTRUM + FLAG (1 byte) in memory.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import median_time, parser, report
from katdal import ms_extra

from karoo.ms import (
    MJD_UNIX_OFFSET,
    DumpBlock,
    MSInput,
    MSLayout,
    Scan,
    Target,
    append_dumps,
    create_ms,
    gather_rows,
)

ANCHOR = "katdal.ms_extra"
CHUNK = 8


def observation(n_ants: int, n_chans: int, n_dumps: int):
    rng = np.random.default_rng(1)
    names = [f"m{i:03d}" for i in range(n_ants)]
    pols = (("v", "v"), ("h", "v"), ("v", "h"), ("h", "h"))
    products = [
        (f"{names[a1]}{p1}", f"{names[a2]}{p2}")
        for a2 in range(n_ants)
        for a1 in range(a2 + 1)
        for p1, p2 in pols
    ]
    meta = MSInput(
        antenna_names=names,
        antenna_positions=5e6 + rng.uniform(-1e3, 1e3, (n_ants, 3)),
        channel_freqs=856e6 + 208e3 * np.arange(n_chans),
        channel_width=208e3,
        corr_products=products,
        targets=[Target("t", 1.0, -0.5)],
        scans=[Scan(0, n_dumps, 0)],
        timestamps=1.7e9 + 8.0 * np.arange(n_dumps),
        dump_period=8.0,
    )
    shape = (n_dumps, n_chans, len(products))
    vis = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    flags = (rng.random(shape) < 0.1).astype(np.uint8)
    weights = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    layout = MSLayout.from_input(meta)
    uvw = rng.uniform(-1e3, 1e3, (n_dumps, layout.n_baselines, 3))
    return meta, layout, vis, flags, weights, uvw


def write_karoo(path, meta, vis, flags, weights, uvw):
    with create_ms(path, meta, source_table=False, overwrite=True) as ms:
        append_dumps(
            ms,
            (
                DumpBlock(
                    t,
                    vis[t : t + CHUNK],
                    flags[t : t + CHUNK],
                    weights[t : t + CHUNK],
                    uvw=uvw[t : t + CHUNK],
                )
                for t in range(0, meta.n_dumps, CHUNK)
            ),
        )


def write_katdal(path, meta, layout, rows):
    data, flag, weight, uvw = rows
    nbl, n_chans, n_corr = layout.n_baselines, meta.n_chans, layout.n_corr
    desc, dminfo = ms_extra.kat_ms_desc_and_dminfo(nbl, n_chans, n_corr)
    ms_extra.create_ms(str(path), desc, dminfo)
    with ms_extra.open_table(str(path)) as table:
        for t in range(0, meta.n_dumps, CHUNK):
            sl = slice(t * nbl, min(t + CHUNK, meta.n_dumps) * nbl)
            n = min(CHUNK, meta.n_dumps - t)
            times = np.repeat(meta.timestamps[t : t + n] + MJD_UNIX_OFFSET, nbl)
            main = ms_extra.populate_main_dict(
                uvw[sl],
                data[sl],
                flag[sl],
                weight[sl],
                times,
                np.tile(layout.ant1, n),
                np.tile(layout.ant2, n),
                meta.dump_period,
                field_id=np.zeros(n * nbl, np.int32),
                state_id=np.zeros(n * nbl, np.int32),
                scan_number=np.ones(n * nbl, np.int32),
            )
            ms_extra.write_rows(table, main, verbose=False)


def main() -> None:
    args = parser(__doc__).parse_args()
    reps = args.reps or (3 if args.quick else 5)
    n_ants, n_chans, n_dumps = (16, 256, 32) if args.quick else (16, 1024, 48)
    meta, layout, vis, flags, weights, uvw = observation(n_ants, n_chans, n_dumps)
    rows = (
        gather_rows(vis, layout.corr_index, 0),
        gather_rows(flags, layout.corr_index, 1).astype(bool),
        gather_rows(weights, layout.corr_index, 0),
        uvw.reshape(-1, 3),
    )
    megabytes = rows[0].size * (8 + 4 + 4 + 1) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        ours_path, theirs_path = Path(tmp) / "karoo.ms", Path(tmp) / "katdal.ms"
        print(
            f"# {n_ants} antennas, {n_chans} channels, {n_dumps} dumps, 4 pols: "
            f"{megabytes:.0f} MB per MS; medians of {reps}"
        )

        def clean():
            shutil.rmtree(ours_path, ignore_errors=True)
            shutil.rmtree(theirs_path, ignore_errors=True)

        write_karoo(ours_path, meta, vis, flags, weights, uvw)  # numba compile, warm cache
        ours = median_time(
            lambda: write_karoo(ours_path, meta, vis, flags, weights, uvw), reps, clean
        )
        theirs = median_time(lambda: write_katdal(theirs_path, meta, layout, rows), reps, clean)
        report("MS write throughput", megabytes / ours, ANCHOR, megabytes / theirs, "MB/s", reps)


if __name__ == "__main__":
    main()
