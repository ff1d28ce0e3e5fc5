"""Reading a capture-block stream: karoo.open against katdal.open on the same Zarr store.

Both read the same dataset (written with karoo's chunk store, local disk) in full: vis, flags
and weights (power-scaled, as both do), dump block by dump block so memory stays bounded, the
way an MS export reads. katdal reads through karoo's adapter store (katdal cannot read Zarr
itself), so the storage layer is the same and the figure measures the readers. GB/s counts the
bytes handed to the user: 8 (vis) + 1 (flags) + 4 (weights) per visibility.

"fresh outputs" allocates each block's output arrays (what ``d.vis[...]`` does), "reused
outputs" reads into the same arrays every time (``out=``, which both readers offer), which takes
the kernel's page zeroing out of the figure.

Peak RSS is measured in a fresh process per reader and dataset size, for two sizes a factor 4
apart: a bounded reader's peak must not grow with the dataset.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import parser, report

ANCHOR = "katdal"


def make(root: Path, n_ants: int, n_chans: int, seconds: float) -> str:
    from karoo.dataset.synthetic import short_script, write_dataset

    track = seconds / 3 * 0.8
    slew = seconds / 3 * 0.2
    syn = write_dataset(root, n_ants=n_ants, n_chans=n_chans, script=short_script(track, slew),
                        keep=False)
    return syn.rdb


def _buffers(shape, block: int, reuse: bool):
    import numpy as np

    if not reuse:
        return lambda n: None
    full = [np.empty((block, *shape[1:]), t) for t in (np.complex64, bool, np.float32)]
    return lambda n: [x[:n] for x in full]


def read_karoo(rdb: str, block: int, reuse: bool = False) -> int:
    import karoo
    from karoo.dataset import get

    d = karoo.open(rdb)
    buffers = _buffers(d.shape, block, reuse)
    n = 0
    for start in range(0, d.shape[0], block):
        stop = min(start + block, d.shape[0])
        out = get([d.vis, d.flags, d.weights], slice(start, stop), out=buffers(stop - start))
        n += sum(x.nbytes for x in out)
    return n


def read_katdal(rdb: str, block: int, reuse: bool = False) -> int:
    import katdal
    from katdal.lazy_indexer import DaskLazyIndexer

    from karoo.dataset.katdal_adapter import KatdalZarrStore

    store = str(Path(rdb).parent.parent)
    d = katdal.open(rdb, chunk_store=KatdalZarrStore(store))
    buffers = _buffers(d.shape, block, reuse)
    n = 0
    for start in range(0, d.shape[0], block):
        stop = min(start + block, d.shape[0])
        out = DaskLazyIndexer.get([d.vis, d.flags, d.weights], slice(start, stop),
                                  out=buffers(stop - start))
        n += sum(x.nbytes for x in out)
    return n


def interleaved(funcs, reps: int) -> list[tuple[float, float]]:
    """Median (wall, CPU) seconds of each function, the functions taking turns in each
    repetition so that the load of a shared machine falls on all of them alike."""
    wall: list[list[float]] = [[] for _ in funcs]
    cpu: list[list[float]] = [[] for _ in funcs]
    for _ in range(reps):
        for i, func in enumerate(funcs):
            c, t = time.process_time(), time.perf_counter()
            func()
            wall[i].append(time.perf_counter() - t)
            cpu[i].append(time.process_time() - c)
    return [(statistics.median(w), statistics.median(c)) for w, c in zip(wall, cpu,
                                                                        strict=True)]


def child(which: str, rdb: str, block: int) -> None:
    """Run one read in this (fresh) process and print its peak RSS."""
    import logging

    logging.disable(logging.WARNING)
    n = (read_karoo if which == "karoo" else read_katdal)(rdb, block)
    print(json.dumps({"bytes": n, "peak_mb": _peak_rss_mb()}))


def _peak_rss_mb() -> float:
    # VmHWM belongs to this process image; ru_maxrss would carry the parent's peak over exec.
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss(which: str, rdb: str, block: int, env: dict | None = None) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", which, rdb, str(block)],
                         check=True, capture_output=True, text=True,
                         env={**os.environ, **(env or {})}).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--child", nargs=3, help=argparse_suppress())
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    import logging

    logging.disable(logging.WARNING)
    reps = args.reps or (3 if args.quick else 5)
    n_ants, n_chans = (8, 512) if args.quick else (16, 1024)
    seconds = 32.0 if args.quick else 64.0
    block = 16
    root = Path(tempfile.mkdtemp(prefix="bench_dataset_"))
    try:
        rdb = make(root / "small", n_ants, n_chans, seconds)
        size = read_karoo(rdb, block)  # also warms the page cache and numba/dask imports
        read_katdal(rdb, block)
        shape = f"{n_ants} ants, {n_chans} ch, {size / 1e9:.2f} GB"
        for reuse, how in ((False, "fresh outputs"), (True, "reused outputs")):
            (t_karoo, c_karoo), (t_katdal, c_katdal) = interleaved(
                [lambda r=reuse: read_karoo(rdb, block, r),
                 lambda r=reuse: read_katdal(rdb, block, r)], reps)
            report(f"full read vis+flags+weights, {how} ({shape})", size / t_karoo / 1e9,
                   ANCHOR, size / t_katdal / 1e9, "GB/s", reps)
            # CPU seconds of all threads: what the read costs a shared machine
            report(f"full read vis+flags+weights per CPU second, {how} ({shape})",
                   size / c_karoo / 1e9, ANCHOR, size / c_katdal / 1e9, "GB/CPU-s", reps)
        rdb4 = make(root / "large", n_ants, n_chans, 4 * seconds)
        # glibc raises its mmap threshold as large blocks are freed and then keeps freed
        # blocks in its arenas, so RSS creeps up with the work done; a fixed threshold shows
        # what the readers themselves hold.
        for env, how in ((None, ""), ({"MALLOC_MMAP_THRESHOLD_": str(1 << 20)},
                                      ", fixed malloc mmap threshold")):
            for label, path in (("1x", rdb), ("4x", rdb4)):
                ours = peak_rss("karoo", path, block, env)
                theirs = peak_rss("katdal", path, block, env)
                # lower is better here: a ratio below 1 means karoo holds less
                report(f"peak RSS streaming read, {label} size{how}", ours, ANCHOR, theirs,
                       "MB", 1)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
