"""``karoo ls <source>`` and ``karoo export-ms <source> <out.ms>``."""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger(__name__)


def _comma_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _int_range(text: str) -> slice | list[int]:
    """``'5~10'`` or ``'5:11'`` (slice, CASA-style inclusive with ~) or ``'1,3,4'``."""
    if "~" in text:
        a, b = text.split("~")
        return slice(int(a), int(b) + 1)
    if ":" in text:
        a, b = text.split(":")
        return slice(int(a) if a else None, int(b) if b else None)
    return [int(x) for x in _comma_list(text)]


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments naming the source and its chunk store."""
    parser.add_argument("source", help="RDB path, s3:// or http(s):// URL of an RDB, or "
                        "redis://host:port of a live telstate")
    group = parser.add_argument_group("source")
    group.add_argument("--chunk-store", help="chunk store (directory or s3://...); default: "
                       "found from telstate or from the RDB's location")
    group.add_argument("--capture-block-id", help="capture block (default: the RDB's)")
    group.add_argument("--stream-name", help="stream (default: the RDB's)")
    group.add_argument("--s3-endpoint-url", help="S3 endpoint of the chunk store")


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """The reader's selection, as command-line options."""
    group = parser.add_argument_group("selection (as DataSet.select)")
    group.add_argument("--scans", help="scan indices ('5~10', '1,3') or states ('track,scan')")
    group.add_argument("--target", action="append", help="target name (repeatable)")
    group.add_argument("--target-tag", action="append", help="target tag, e.g. bpcal")
    group.add_argument("--ants", "--ant", action="append",
                       help="antennas, comma separated ('~m001' deselects; repeatable)")
    group.add_argument("--pol", help="H, V, HH, HV, VH, VV (comma list)")
    group.add_argument("--corrprods", choices=["auto", "cross"], help="autos or crosses only")
    group.add_argument("--channels", type=_int_range,
                       help="channel range 'first~last' (inclusive) or 'start:stop'")
    group.add_argument("--freqrange", type=float, nargs=2, metavar=("LOW", "HIGH"),
                       help="frequency range in Hz (channels wholly inside)")
    group.add_argument("--dumps", type=_int_range, help="dump range 'first~last' or 'start:stop'")
    group.add_argument("--timerange", nargs=2, metavar=("START", "END"),
                       help="UNIX seconds or ISO UTC times (dumps wholly inside)")
    group.add_argument("--flags", default="all",
                       help="flag names that set FLAG (comma list; 'all' or '')")


def selection_from_args(args) -> dict:
    """``DataSet.select`` keywords from the parsed options."""
    kw = {}
    if args.scans:
        items = _comma_list(args.scans)
        if all(not x.lstrip("~").isdigit() for x in items):
            kw["scans"] = items
        else:
            rng = _int_range(args.scans)
            kw["scans"] = list(range(rng.start, rng.stop)) if isinstance(rng, slice) else rng
    if args.target:
        kw["targets"] = [t for arg in args.target for t in _comma_list(arg)]
    if args.target_tag:
        kw["target_tags"] = [t for arg in args.target_tag for t in _comma_list(arg)]
    if args.ants:
        kw["ants"] = [a for arg in args.ants for a in _comma_list(arg)]
    if args.pol:
        kw["pol"] = _comma_list(args.pol)
    if args.corrprods:
        kw["corrprods"] = args.corrprods
    if args.channels is not None:
        kw["channels"] = args.channels
    if args.freqrange:
        kw["freqrange"] = tuple(args.freqrange)
    if args.dumps is not None:
        kw["dumps"] = args.dumps
    if args.timerange:
        kw["timerange"] = tuple(float(t) if t.replace(".", "").isdigit() else t
                                for t in args.timerange)
    if args.flags is not None:
        kw["flags"] = args.flags
    return kw


def open_from_args(args, **extra):
    from . import open as open_dataset

    options = {k: v for k, v in (("capture_block_id", args.capture_block_id),
                                 ("stream_name", args.stream_name),
                                 ("s3_endpoint_url", args.s3_endpoint_url)) if v}
    return open_dataset(args.source, args.chunk_store, **options, **extra)


def run_ls(args) -> int:
    ds = open_from_args(args)
    kw = selection_from_args(args)
    if kw:
        ds.select(**kw)
    print(ds)
    return 0


def _slice_arg(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--slice takes k/N, not {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--slice k/N needs 0 <= k < N, not {text!r}")
    return k, n


def run_export_ms(args) -> int:
    ds = open_from_args(args)
    kw = selection_from_args(args)
    if not args.scans:
        kw.setdefault("scans", ["track", "scan"])  # mvftoms writes only on-source scans
    ds.select(**kw)
    if not all(ds.shape):
        print(f"karoo export-ms: the selection is empty {ds.shape}: nothing to export",
              file=sys.stderr)
        return 1
    source = ds.export_source(applycal=args.applycal or None)
    slice_index = n_slices = None
    if args.slice is not None:
        slice_index, n_slices = args.slice
    elif args.slices:
        n_slices = args.slices
    export(source, args.out, n_slices=n_slices, slice_index=slice_index,
           scheduler=args.scheduler, progress=not args.no_progress,
           calibrated=args.applycal_into)
    return 0


def export(source, out: str, *, n_slices=None, slice_index=None, scheduler=None,
           progress=True, calibrated: str = "CORRECTED_DATA"):
    """Hand an ExportSource to the MS exporter (:func:`karoo.ms.export.export_ms`)."""
    from ..ms.export import export_ms

    return export_ms(source, out, n_slices=n_slices, slice_index=slice_index,
                     scheduler=scheduler, progress=progress, calibrated=calibrated)


def add_commands(subparsers) -> None:
    """Register ``ls`` and ``export-ms``."""
    ls = subparsers.add_parser("ls", help="summarise a dataset (targets, scans, antennas, size)")
    add_source_arguments(ls)
    add_selection_arguments(ls)
    ls.set_defaults(func=run_ls)

    ex = subparsers.add_parser("export-ms", help="export a dataset as a MeasurementSet v2")
    add_source_arguments(ex)
    ex.add_argument("out", help="output MS")
    add_selection_arguments(ex)
    cal = ex.add_argument_group("calibration")
    cal.add_argument("--applycal", default="",
                     help="cal products to apply: 'default' (K,B,G), 'all', or e.g. 'K,B,G'")
    cal.add_argument("--applycal-into", choices=["CORRECTED_DATA", "DATA"],
                     default="CORRECTED_DATA",
                     help="where calibrated data go (default CORRECTED_DATA; DATA stays raw)")
    par = ex.add_argument_group("slices")
    par.add_argument("--slices", type=int, help="export N time slices in parallel")
    par.add_argument("--slice", type=_slice_arg, help="export only slice k of N ('k/N')")
    par.add_argument("--scheduler", help="dask.distributed scheduler address (default local)")
    ex.add_argument("--no-progress", action="store_true", help="no progress bar")
    ex.set_defaults(func=run_export_ms)
