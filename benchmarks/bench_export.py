"""MS export: karoo.ms.export_ms against katdal's mvftoms.py, slices and workers, memory.

Both exporters read the same Dask arrays over a Zarr store on local disk (complex64 vis, uint8
flags, float32 weights, chunks of 4 dumps) and write a full-pol MS with autocorrelations.
katdal's side is the real ``mvftoms.py`` script (its ``main()``, with its numba transpose and
its separate writer process), fed by a katdal ``DataSet`` over those arrays: katdal's own
test ``MinimalDataSet`` (one slew dump, then a track) with ``DaskLazyIndexer`` vis, flags
and weights, returned by a patched ``katdal.open``. MB/s counts the source bytes of the
exported dumps (8 + 1 + 4 bytes per visibility).

Figures:

* export throughput, karoo vs mvftoms;
* slice k of N against the whole export (throughput of one slice vs whole; target >= 0.83,
  i.e. a slice takes at most 1.2x whole / N);
* N slices on 2 dask.distributed workers against 1 (target >= 1.6 on a machine with 2 free
  cores; the clusters are started before timing);
* peak RSS (the exporting process and its children, MB) of a whole export of two observations
  4x apart in dumps, each in a fresh process; for memory a ratio below 1 means karoo uses less.
  karoo's export blocks are 8 MB of source data in --quick (64 MB, the default, otherwise),
  so that even the smaller observation spans a few blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import median_time, parser, report

from karoo.ms import ExportSource, MSInput, Scan, Target, export_ms, itrf_from_enu
from karoo.ms.uvw import geometric_uvw
from karoo.sim.array import MEERKAT_ENU

ANCHOR = "katdal mvftoms.py"
LAT, LON, ALT = np.radians(-30.71106), np.radians(21.44389), 1035.0
REF = "-30:42:39.8, 21:26:38.0, 1035.0"
TARGET = ("SIM-FIELD", "20:10:00.0", "-60:00:00.0")
CHUNK_DUMPS = 4


def make_store(path: Path, n_ants: int, n_chans: int, n_dumps: int) -> None:
    """Synthetic (T, F, corr product) vis/flags/weights in a Zarr group at `path`.

    One random block of `CHUNK_DUMPS` dumps per array is written at every chunk (the vis
    offset by the dump index), which keeps large stores cheap to make.
    """
    import zarr

    n_products = 4 * n_ants * (n_ants + 1) // 2
    group = zarr.open_group(str(path), mode="w")
    rng = np.random.default_rng(7)
    shape = (CHUNK_DUMPS, n_chans, n_products)
    blocks = {
        "vis": (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64),
        "flags": ((rng.random(shape) < 0.05) * 16).astype(np.uint8),
        "weights": rng.uniform(0.5, 2.0, shape).astype(np.float32),
    }
    for name, block in blocks.items():
        z = group.create_array(name, shape=(n_dumps, *shape[1:]), dtype=block.dtype, chunks=shape)
        for t in range(0, n_dumps, CHUNK_DUMPS):
            n = min(CHUNK_DUMPS, n_dumps - t)
            z[t : t + n] = block[:n] + t if name == "vis" else block[:n]
    group.attrs["n_ants"] = n_ants


def open_arrays(path: Path):
    import dask.array as da
    import zarr

    group = zarr.open_group(str(path), mode="r")
    return group.attrs["n_ants"], {k: da.from_zarr(group[k]) for k in ("vis", "flags", "weights")}


def products(names: list[str]) -> list[tuple[str, str]]:
    """Correlation products in MeerKAT CBF order."""
    pols = (("v", "v"), ("h", "v"), ("v", "h"), ("h", "h"))
    return [
        (f"{names[a1]}{p1}", f"{names[a2]}{p2}")
        for a2 in range(len(names))
        for a1 in range(a2 + 1)
        for p1, p2 in pols
    ]


def timestamps(n_dumps: int) -> np.ndarray:
    return 1717206000.0 + 8.0 * np.arange(n_dumps) + 4.0


def karoo_source(path: Path) -> ExportSource:
    """The store as an `ExportSource`: dump 0 is a slew, the rest one track (as katdal's)."""
    n_ants, arrays = open_arrays(path)
    n_dumps, n_chans, _ = arrays["vis"].shape
    names = [f"m{i:03d}" for i in range(n_ants)]
    enu = np.array(MEERKAT_ENU[:n_ants])
    from karoo.sim.astro import parse_angle

    targets = [Target(TARGET[0], parse_angle(TARGET[1], hours=True), parse_angle(TARGET[2]))]
    meta = MSInput(
        antenna_names=names,
        antenna_positions=itrf_from_enu(enu, LAT, LON, ALT),
        channel_freqs=1284e6 + (np.arange(n_chans) - n_chans // 2) * (856e6 / n_chans),
        channel_width=856e6 / n_chans,
        corr_products=products(names),
        targets=targets,
        scans=[Scan(1, n_dumps, 0, "TARGET")],
        timestamps=timestamps(n_dumps),
        dump_period=8.0,
        antenna_uvw=geometric_uvw(enu, targets, LAT, LON),
    )
    return ExportSource(meta, **arrays)


def katdal_dataset(path: Path):
    """A katdal DataSet over the same Dask arrays (katdal's test MinimalDataSet + indexers)."""
    import katpoint
    from katdal.dataset import Subarray
    from katdal.lazy_indexer import DaskLazyIndexer
    from katdal.spectral_window import SpectralWindow
    from katdal.test.test_dataset import MinimalDataSet

    n_ants, arrays = open_arrays(path)
    n_dumps, n_chans, _ = arrays["vis"].shape
    ants = [
        katpoint.Antenna(f"m{i:03d}, {REF}, 13.5, {e} {n} {u}")
        for i, (e, n, u) in enumerate(MEERKAT_ENU[:n_ants])
    ]
    spw = SpectralWindow(
        centre_freq=1284e6,
        channel_width=856e6 / n_chans,
        num_chans=n_chans,
        sideband=1,
        bandwidth=856e6,
    )
    subarray = Subarray(ants, products([a.name for a in ants]))
    target = katpoint.Target(f"{TARGET[0]}, radec target, {TARGET[1]}, {TARGET[2]}")

    class Dataset(MinimalDataSet):
        def __init__(self):
            self._lazy = (arrays["vis"], arrays["flags"] != 0, arrays["weights"])
            super().__init__([target], timestamps(n_dumps), subarray, spw)
            self.applycal_products = []
            self.name = self.observer = self.description = self.experiment_id = "bench"
            self.version = "4.0"

        def _indexer(self, i):
            keep = (self._time_keep, self._freq_keep, self._corrprod_keep)
            return DaskLazyIndexer(self._lazy[i], keep)

        vis = property(lambda self: self._indexer(0))
        flags = property(lambda self: self._indexer(1))
        weights = property(lambda self: self._indexer(2))

    return Dataset()


def load_mvftoms():
    """katdal's mvftoms.py script as a module (its numba kernel compiles once per process)."""
    script = shutil.which("mvftoms.py") or str(Path(sys.executable).parent / "mvftoms.py")
    spec = importlib.util.spec_from_file_location("mvftoms", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_mvftoms(module, dataset, out: Path) -> None:
    import io

    import dask
    import katdal

    katdal.open = lambda *args, **kwargs: dataset
    argv = sys.argv
    sys.argv = ["mvftoms.py", "-f", "--quack", "0", "-o", str(out), "bench.rdb"]
    pool = dask.config.get("pool", None)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            module.main()
    finally:
        sys.argv = argv
        # mvftoms sets a global dask thread pool, which dask.distributed cannot ship to workers
        dask.config.set(pool=pool)
        if pool is None:
            dask.config.config.pop("pool", None)


class PeakRSS:
    """Peak resident memory (MB) of this process plus its children, sampled every 5 ms.

    (``ru_maxrss`` would not do: a child started by ``fork`` + ``exec`` inherits its
    parent's high-water mark, and mvftoms' writer is a separate process.)
    """

    def __init__(self) -> None:
        import threading

        import psutil

        self.peak = 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        total = 0
        for proc in (self._process, *self._process.children(recursive=True)):
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        self.peak = max(self.peak, total)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self._sample()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self._sample()
        return self.peak / 1e6


def child(which: str, store: Path, out: Path, chunk_mb: float) -> None:
    """Entry point of the memory runs: one export in a fresh process, print the peak RSS."""
    if which == "karoo":
        source = karoo_source(store)
        rss = PeakRSS()
        export_ms(source, out, progress=False, chunk_bytes=int(chunk_mb * 1e6))
    else:
        module, dataset = load_mvftoms(), katdal_dataset(store)
        rss = PeakRSS()
        run_mvftoms(module, dataset, out)
    print(json.dumps({"rss_mb": rss.stop()}))


def measure_rss(which: str, store: Path, out: Path, chunk_mb: float) -> float:
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run(
        [sys.executable, __file__, "--child", which, str(store), str(out), str(chunk_mb)],
        capture_output=True,
        text=True,
        check=True,
    )
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["rss_mb"]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]), float(args.child[3]))
        return
    reps = args.reps or (3 if args.quick else 5)
    n_ants, n_chans, n_dumps = (16, 256, 25) if args.quick else (16, 1024, 49)
    n_slices = 4
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = tmp / "store.zarr"
        make_store(store, n_ants, n_chans, n_dumps)
        source = karoo_source(store)
        megabytes = (n_dumps - 1) * source.bytes_per_dump / 1e6
        print(
            f"# {n_ants} antennas, {n_chans} channels, {n_dumps - 1} dumps exported, 4 pols: "
            f"{megabytes:.0f} MB of source data; medians of {reps}"
        )
        out = tmp / "out.ms"

        def clean():
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(out.with_name(out.name + ".slices"), ignore_errors=True)

        def karoo_whole():
            export_ms(source, out, progress=False)

        clean()
        karoo_whole()  # numba compile and page cache
        ours = median_time(karoo_whole, reps, clean)
        mvftoms, dataset = load_mvftoms(), katdal_dataset(store)
        clean()
        run_mvftoms(mvftoms, dataset, out)  # numba compile
        theirs = median_time(lambda: run_mvftoms(mvftoms, dataset, out), reps, clean)
        report("MS export throughput", megabytes / ours, ANCHOR, megabytes / theirs, "MB/s", reps)

        k = n_slices // 2
        slice_result = []

        def karoo_slice():
            slice_result[:] = [
                export_ms(source, out, n_slices=n_slices, slice_index=k, progress=False)
            ]

        one = median_time(karoo_slice, reps, clean)
        slice_mb = slice_result[0].nbytes / 1e6
        report(
            f"slice {k} of {n_slices} export throughput",
            slice_mb / one,
            "karoo whole export",
            megabytes / ours,
            "MB/s",
            reps,
        )

        rates = []
        for workers in (2, 1):
            # fewer repetitions in --quick: each one exports every slice on the cluster
            parallel_reps = 2 if args.quick else reps
            rates.append(
                megabytes / parallel_time(source, out, n_slices, workers, parallel_reps, clean)
            )
        report(
            f"{n_slices} slices export throughput, 2 workers vs 1",
            rates[0],
            "karoo 1 worker",
            rates[1],
            "MB/s",
            parallel_reps,
        )
        clean()

        # Memory: a few export blocks (chunk_mb of source each) for 1x, four times that for 4x
        chunk_mb = 8.0 if args.quick else 64.0
        per_dump_mb = source.bytes_per_dump / 1e6
        n_small = int(3 * chunk_mb / per_dump_mb) + 1
        print(f"# memory: export blocks of {chunk_mb:g} MB; peak RSS includes the imports")
        for label, dumps in (("1x", n_small), ("4x", 4 * (n_small - 1) + 1)):
            path = tmp / f"{label}.zarr"
            make_store(path, n_ants, n_chans, dumps)
            ours_rss = measure_rss("karoo", path, out, chunk_mb)
            theirs_rss = measure_rss("katdal", path, out, chunk_mb)
            shutil.rmtree(path)
            report(
                f"export peak RSS, {(dumps - 1) * per_dump_mb:.0f} MB of dumps ({label})",
                ours_rss,
                ANCHOR,
                theirs_rss,
                "MB",
                1,
            )


def parallel_time(source, out, n_slices, workers, reps, clean) -> float:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):

        def run():
            export_ms(source, out, n_slices=n_slices, scheduler=client, progress=False)

        clean()
        run()  # imports and numba on the workers
        return median_time(run, reps, clean)


if __name__ == "__main__":
    main()
