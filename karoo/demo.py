"""``karoo demo``: a complete simulated observation, from correlator to MeasurementSet.

A product controller configures a simulated product (correlator simulator -> ingest -> vis
writer and cal -> flag writer -> meta writer), captures one capture block of a scripted
observation (bandpass calibrator, gain calibrator, target), and deconfigures. The dataset is
then opened with `karoo.open`, exported to a MeasurementSet with the calibration applied, and
the calibration solutions are compared with the gains and delays the simulator injected.

By default everything runs in this one process (memory telstate, in-process SPEAD queues, a
Zarr store in a local directory), with the same daemon classes that run as separate processes
in production. ``--redis``, ``--store s3://...`` and ``--processes`` run the same observation
on a real Redis server, an S3 store, or one process per daemon (over loopback multicast).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import aiokatcp
import numpy as np
from tqdm import tqdm

logger = logging.getLogger(__name__)

PRODUCT = "demo"
CBF = "cbf_baseline_correlation_products"
L0 = "sdp_l0"


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run a complete simulated observation (sim -> ingest -> cal/writers -> MS)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", metavar="DIR", default=None,
                        help="where the store, RDB, reports, logs and MS go "
                             "[./karoo-demo-<capture block>]")
    parser.add_argument("--antennas", type=int, default=8, help="[%(default)s]")
    parser.add_argument("--channels", type=int, default=1024, help="[%(default)s]")
    parser.add_argument("--dump-period", type=float, default=0.5,
                        help="correlator dump period in seconds [%(default)s]")
    parser.add_argument("--output-int-time", type=float, default=2.0,
                        help="L0 integration time in seconds [%(default)s]")
    parser.add_argument("--script", default="short",
                        help="observation script: short, default or a JSON file [%(default)s]")
    parser.add_argument("--clock-ratio", type=float, default=None,
                        help="simulator speed relative to real time; 0: as fast as the "
                             "pipeline takes it (default: 0 in one process, where streams are "
                             "lossless queues; 1 with --processes, where they are UDP)")
    parser.add_argument("--redis", metavar="ENDPOINT", nargs="?", const="start", default="",
                        help="telstate on Redis: an endpoint, or none to start a "
                             "redis-server (default: in memory)")
    parser.add_argument("--store", metavar="URL", default="",
                        help="chunk store: a directory or s3://bucket "
                             "[<workdir>/store]")
    parser.add_argument("--s3-endpoint-url", default="",
                        help="S3 endpoint for an s3:// store (credentials from the AWS "
                             "environment)")
    parser.add_argument("--processes", action="store_true",
                        help="run each daemon as its own process, telstate on a redis-server, "
                             "SPEAD over loopback multicast")
    parser.add_argument("--no-ms", action="store_true", help="skip the MeasurementSet export")
    parser.set_defaults(func=run)


@dataclass
class Capture:
    """Where an observation's outputs went."""

    capture_block_id: str
    workdir: Path
    store: str
    rdb: str
    dumps_sent: int
    sensors: dict[str, object]


def run(args: argparse.Namespace) -> int:
    cbid = str(int(time.time()))
    workdir = Path(args.workdir or f"karoo-demo-{cbid}").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    store = args.store or str(workdir / "store")
    print(f"karoo demo: capture block {cbid}, files in {workdir}")
    capture = asyncio.run(observe(args, cbid, workdir, store))
    report(capture, export=not args.no_ms)
    return 0


def product_config(args, store: str, truth_dir: Path) -> dict:
    from .controller.schema import simulated_config

    clock_ratio = args.clock_ratio if args.clock_ratio is not None else (
        1.0 if args.processes else 0.0)
    settings: dict[str, object] = {"store": store,
                                   "transport": "multicast" if args.processes else "inproc"}
    if args.s3_endpoint_url:
        settings["s3_endpoint_url"] = args.s3_endpoint_url
    return simulated_config(
        n_antennas=args.antennas, n_chans=args.channels, int_time=args.dump_period,
        output_int_time=args.output_int_time, continuum_factor=1, script=args.script,
        simulation={"clock_ratio": clock_ratio, "truth_dir": str(truth_dir)},
        **settings,
    )


async def observe(args, cbid: str, workdir: Path, store: str) -> Capture:
    """Configure the product, capture one capture block of the whole script, deconfigure."""
    from .controller.launch import InProcessLauncher, ProcessLauncher
    from .controller.product import ProductController
    from .telstate.server import RedisServer

    async with contextlib.AsyncExitStack() as stack:
        redis = args.redis
        if args.processes:
            launcher = ProcessLauncher(workdir)  # it starts the product's own redis-server
            redis = "redis"
        else:
            if redis == "start":
                redis = stack.enter_context(RedisServer(workdir / "telstate")).endpoint
            launcher = InProcessLauncher(workdir, telstate=redis)
        pc = ProductController("127.0.0.1", 0, data_dir=workdir, launcher=launcher,
                               ready_timeout=300.0)
        await pc.start()
        stack.push_async_callback(pc.stop)
        client = await aiokatcp.Client.connect("127.0.0.1", pc.server.sockets[0].getsockname()[1])
        stack.callback(client.close)

        config = product_config(args, store, workdir / "truth")
        print(f"configuring: {args.antennas} antennas x {args.channels} channels, "
              f"{args.dump_period:g} s dumps -> {args.output_int_time:g} s L0, "
              f"{'one process per daemon' if args.processes else 'all in this process'}, "
              f"telstate {redis or 'in memory'}, store {store}")
        t0 = time.monotonic()
        await client.request("product-configure", PRODUCT, json.dumps(config))
        tasks = sorted({name.split(".")[0] for name in pc.sensors if "." in name})
        print(f"configured in {time.monotonic() - t0:.1f} s: {', '.join(tasks)}")

        await client.request("capture-init", cbid)
        sim = f"sim.{CBF}"
        total = int(pc.sensors[f"{sim}.end-dump"].value)
        with tqdm(total=total, unit="dump", desc="capturing") as bar:
            while True:
                sent = int(pc.sensors[f"{sim}.next-dump"].value)
                bar.update(sent - bar.n)
                if sent >= total:
                    break
                if pc.sensors["device-status"].value.name == "FAIL":
                    raise RuntimeError("the product failed: "
                                       + pc.sensors["device-status-reason"].value)
                await asyncio.sleep(0.2)
        print("capture-done: flushing ingest, cal, writers; writing the RDB")
        await client.request("capture-done")
        sensors = {name: pc.sensors[name].value for name in pc.sensors}
        await client.request("product-deconfigure")  # waits for flags and the full RDB
        rdb = _rdb_path(store, cbid)
        return Capture(cbid, workdir, store, rdb, total, sensors)


def _rdb_path(store: str, cbid: str) -> str:
    # the full RDB: the light one (katsdpmetawriter's key set) has no calibration products
    return f"{store.rstrip('/')}/{cbid}/{cbid}_{L0}.full.rdb"


def report(capture: Capture, export: bool = True) -> None:
    """Open the dataset, summarise it, check calibration against the truth, export an MS."""
    import karoo

    from .flags import NAMES

    ds = karoo.open(capture.rdb)
    print()
    print(ds)
    t, f, b = ds.shape
    print(f"\ncaptured: {t} L0 dumps x {f} channels x {b} corr products "
          f"({ds.size / 1e6:.1f} MB) from {capture.dumps_sent} correlator dumps")
    missing = {k: v for k, v in ds.missing_chunks.items() if v}
    print(f"chunks never written: {missing or 'none'}")

    raw = ds.raw_flags[:]
    fractions = {name: float(np.mean(raw & np.uint8(bit) != 0)) for name, bit in NAMES.items()}
    print("flagged: " + (", ".join(f"{name} {100 * v:.2f}%" for name, v in fractions.items() if v)
                         or "nothing"))

    calibration_summary(ds, capture)

    reports = sorted(glob.glob(str(capture.workdir / "cal_reports" / "**" / "*.html"),
                               recursive=True))
    ms_path = None
    if export:
        from .ms.export import export_ms

        ms_path = str(capture.workdir / f"{capture.capture_block_id}_{L0}.ms")
        try:
            source = ds.export_source(applycal="default")
            column = "CORRECTED_DATA (K, B, G applied)"
        except Exception as exc:  # no usable solutions: export the raw data only
            logger.warning("exporting without calibration: %s", exc)
            source = ds.export_source()
            column = None
        export_ms(source, ms_path, overwrite=True)
    print("\nfiles:")
    print(f"  dataset (open with karoo.open or karoo ls): {capture.rdb}")
    print(f"  chunk store: {capture.store}")
    for path in reports:
        print(f"  calibration report: {path}")
    if ms_path:
        print(f"  MeasurementSet: {ms_path}" + (f" with {column}" if column else ""))
    print(f"  logs and simulator truth: {capture.workdir}")


def calibration_summary(ds, capture: Capture) -> None:
    """Delay and gain solutions against what the simulator injected."""
    ts = ds.telstate
    cbid = capture.capture_block_id
    k = ts.get_range(f"{cbid}_cal_product_K", st=0)
    refant = ts.get(f"{cbid}_cal_refant") or (ts.get_range(f"{cbid}_cal_refant", st=0)
                                              or [[None]])[-1][0]
    g = ts.get_range(f"{cbid}_cal_product_G", st=0)
    b = [key for key in ts.keys(f"{cbid}_cal_product_B*")]
    print(f"calibration: refant {refant}, {len(k)} K, {len(b)} B part(s), {len(g)} G solutions")
    truth_file = capture.workdir / "truth" / "truth.npz"
    if not k or refant is None or not truth_file.exists():
        return
    with np.load(truth_file) as truth:
        delays = dict(zip(truth["input_labels"], truth["delays"], strict=True))
        sources = list(truth["source_names"]) if "source_names" in truth else []
        source_flux = truth["source_flux"] if sources else None
    antlist = list(ts.get("cal_antlist"))
    pols = list(ts.get("cal_pol_ordering"))
    solved = np.asarray(k[-1][0])
    errors = [solved[p, a] - (delays[ant + pol] - delays[refant + pol])
              for p, pol in enumerate(pols) for a, ant in enumerate(antlist)
              if np.isfinite(solved[p, a])]
    if errors:
        err = np.abs(errors)
        print(f"delays vs injected truth: rms error {1e12 * np.sqrt(np.mean(err ** 2)):.1f} ps, "
              f"max {1e12 * err.max():.1f} ps over {len(err)} inputs")
    measured = ts.get(f"{cbid}_cal_measured_flux") or {}
    std = ts.get(f"{cbid}_cal_measured_flux_std") or {}
    # G averages the G window's channels: compare with the true mean flux there
    lo, hi = ts.get("cal_param_g_bchan", 0), ts.get("cal_param_g_echan", None)
    for name, flux in measured.items():
        line = f"measured flux of {name}: {flux:.3f} +- {std.get(name, np.nan):.3f} Jy"
        if name in sources:
            line += f" (injected {np.mean(source_flux[sources.index(name), lo:hi]):.3f} Jy)"
        print(line)

