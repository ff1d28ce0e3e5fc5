"""The calibration report of a capture block: an HTML page with PNG plots and ``metadata.json``.

Written by each cal server when a capture block ends, to
``<report_path>/<cbid>_<l0_name>_calreport_<cal_name>.<server_id>/`` (katsdpcal's naming; the
directory is first written as ``...-current`` and renamed when complete). A report is always
written, also when nothing could be solved; it then says why.
"""

from __future__ import annotations

import datetime
import html
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .pipeline import ScanSummary


@dataclass
class ReportData:
    """Everything the report shows (collected by the daemon over the capture block)."""

    capture_block_id: str
    l0_name: str
    cal_name: str
    server_id: int
    antlist: list[str]
    pols: list[str]
    freqs: np.ndarray  # this server's channel frequencies (Hz)
    int_time: float
    refant: str | None = None
    scans: list[ScanSummary] = field(default_factory=list)
    history: dict[str, list[tuple[float, np.ndarray]]] = field(default_factory=dict)
    obs_params: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    #: target name -> (flux, standard error) in Jy, from :meth:`CalPipeline.measure_flux`
    measured_flux: dict[str, tuple[float, float]] = field(default_factory=dict)


#: katsdpcal's report threshold: a solution with SNR below this is counted as poor.
LOW_SNR = 10.0
#: Products whose SNR the report summarises, and their history keys.
SNR_PRODUCTS = ("K", "B", "G")


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def snr_summary(history: dict[str, list[tuple[float, np.ndarray]]]
                ) -> dict[str, list[dict[str, Any]]]:
    """katsdpcal's "Calibration product SNR summary": per product and solution time, the median
    and inter-quartile range of the SNR across inputs (antenna and polarisation), and the number
    of inputs with an SNR below :data:`LOW_SNR` or NaN.

    Returns
    -------
    dict
        ``{product: [{"time", "median", "p25", "p75", "n_low", "n_inputs"}, ...]}`` for the
        products of :data:`SNR_PRODUCTS` that have SNRs, in time order; non-finite statistics
        are None (JSON-safe).
    """
    out: dict[str, list[dict[str, Any]]] = {}
    for product in SNR_PRODUCTS:
        rows = []
        for t, snr in sorted(history.get(f"SNR_{product}", []), key=lambda e: e[0]):
            v = np.asarray(snr, np.float64).ravel()
            ok = v[~np.isnan(v)]
            if ok.size:
                p25, med, p75 = np.percentile(ok, [25, 50, 75])
            else:
                p25 = med = p75 = np.nan
            rows.append({"time": float(t), "median": _finite(med), "p25": _finite(p25),
                         "p75": _finite(p75), "n_low": int(np.sum(~(v >= LOW_SNR))),
                         "n_inputs": int(v.size)})
        if rows:
            out[product] = rows
    return out


def report_dir(report_path: str | os.PathLike, cbid: str, l0_name: str, cal_name: str,
               server_id: int) -> Path:
    """Final directory of a report (without ``-current``)."""
    return Path(report_path) / f"{cbid}_{l0_name}_calreport_{cal_name}.{server_id}"


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _plots(data: ReportData, out: Path) -> list[tuple[str, str]]:
    """Make the figures; returns (title, file name) pairs."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figs: list[tuple[str, str]] = []
    mhz = data.freqs / 1e6
    n_ants = len(data.antlist)

    def save(fig, name, title):
        fig.savefig(out / name, bbox_inches="tight", dpi=80)
        plt.close(fig)
        figs.append((title, name))

    if data.scans:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        for s in sorted(data.scans, key=lambda s: s.start_time):
            if len(s.channel_flag_fraction) == len(mhz):
                ax.plot(mhz, 100 * s.channel_flag_fraction, lw=0.8,
                        label=f"{s.target} {_iso(s.start_time)[11:19]}")
        ax.set_xlabel("frequency (MHz)")
        ax.set_ylabel("flagged (%)")
        ax.set_title("Flags per channel after cal RFI flagging, per scan")
        if len(data.scans) <= 10:
            ax.legend(fontsize=6)
        save(fig, "flags.png", "RFI and flagging summary")

    for soln in data.history.get("B", [])[-1:]:
        t, bp = soln
        fig, axes = plt.subplots(2, len(data.pols), figsize=(10, 6), squeeze=False, sharex=True)
        for p, pol in enumerate(data.pols):
            for a in range(n_ants):
                axes[0, p].plot(mhz, np.abs(bp[:, p, a]), lw=0.7, label=data.antlist[a])
                axes[1, p].plot(mhz, np.degrees(np.angle(bp[:, p, a])), lw=0.7)
            axes[0, p].set_title(f"B amplitude, pol {pol}")
            axes[1, p].set_title(f"B phase (deg), pol {pol}")
            axes[1, p].set_xlabel("frequency (MHz)")
        if n_ants <= 16:
            axes[0, 0].legend(fontsize=6, ncol=2)
        save(fig, "bandpass.png", f"Bandpass at {_iso(t)}")

    g = data.history.get("G", [])
    if g:
        times = np.array([t for t, _ in g])
        vals = np.array([v for _, v in g])  # (n, pol, ant)
        rel = (times - times[0]) / 60
        fig, axes = plt.subplots(2, len(data.pols), figsize=(10, 6), squeeze=False, sharex=True)
        for p, pol in enumerate(data.pols):
            for a in range(n_ants):
                axes[0, p].plot(rel, np.abs(vals[:, p, a]), ".-", lw=0.7)
                axes[1, p].plot(rel, np.degrees(np.angle(vals[:, p, a])), ".-", lw=0.7)
            axes[0, p].set_title(f"G amplitude, pol {pol}")
            axes[1, p].set_title(f"G phase (deg), pol {pol}")
            axes[1, p].set_xlabel(f"minutes since {_iso(times[0])}")
        save(fig, "gains.png", "Gains against time")

    summary = snr_summary(data.history)
    if summary:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        t0 = min(r["time"] for rows in summary.values() for r in rows)
        for product, rows in summary.items():
            rel = np.array([(r["time"] - t0) / 60 for r in rows])
            med, lo, hi = (np.array([np.nan if r[k] is None else r[k] for r in rows])
                           for k in ("median", "p25", "p75"))
            ax.errorbar(rel, med, yerr=[med - lo, hi - med], fmt="o-", capsize=3,
                        label=f"SNR_{product}")
        ax.axhline(LOW_SNR, color="grey", ls=":", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel(f"minutes since {_iso(t0)}")
        ax.set_ylabel("SNR (median, IQR across inputs)")
        ax.legend(fontsize=7)
        save(fig, "snr.png", "Calibration product SNR against time")

    k = data.history.get("K", [])
    if k:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        x = np.arange(n_ants)
        for p, pol in enumerate(data.pols):
            ax.plot(x, 1e9 * k[-1][1][p], "o", label=f"pol {pol}")
        ax.set_xticks(x, data.antlist, rotation=90, fontsize=6)
        ax.set_ylabel("delay (ns)")
        ax.set_title(f"Delays (K) at {_iso(k[-1][0])}, refant {data.refant}")
        ax.legend()
        save(fig, "delays.png", "Delays")
    return figs


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table border='1' cellspacing='0' cellpadding='3'><tr>{head}</tr>{body}</table>"


def write_report(data: ReportData, report_path: str | os.PathLike) -> Path:
    """Write the report of one capture block; returns its directory.

    The page always has the observation summary and, when nothing was solved, the reasons
    (``data.problems`` and per-scan notes).
    """
    final = report_dir(report_path, data.capture_block_id, data.l0_name, data.cal_name,
                       data.server_id)
    work = final.with_name(final.name + "-current")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    problems = list(data.problems)
    solved = sorted({p for s in data.scans for p in s.solved})
    if not data.scans:
        problems.append("no track scans were received in this capture block")
    elif not solved:
        problems.append("no calibration product could be solved")
    try:
        figs = _plots(data, work)
    except Exception as exc:  # a plotting failure must not lose the report
        figs = []
        problems.append(f"plots failed: {exc!r}")
    start = min((s.start_time for s in data.scans), default=None)
    parts = [
        "<html><head><meta charset='utf-8'>",
        f"<title>Calibration report {html.escape(data.capture_block_id)}</title></head><body>",
        f"<h1>Calibration report: capture block {html.escape(data.capture_block_id)}</h1>",
        "<h2>Observation summary</h2>",
        _table([
            ["capture block", data.capture_block_id],
            ["stream", data.l0_name],
            ["cal server", f"{data.cal_name}.{data.server_id}"],
            ["start time", _iso(start) if start is not None else "-"],
            ["dump period (s)", f"{data.int_time:g}"],
            ["channels (this server)", len(data.freqs)],
            ["antennas", f"{len(data.antlist)}: " + ", ".join(
                a + (" (refant)" if a == data.refant else "") for a in data.antlist)],
            ["reference antenna", data.refant or "none"],
            ["products solved", ", ".join(solved) or "none"],
            ["sources", ", ".join(sorted({s.target for s in data.scans})) or "none"],
        ], ["item", "value"]),
    ]
    if problems:
        parts.append("<h2>Problems</h2><ul>" + "".join(
            f"<li>{html.escape(p)}</li>" for p in problems) + "</ul>")
    parts.append("<h2>Scans</h2>")
    parts.append(_table([
        [_iso(s.start_time), s.target, " ".join(s.tags), s.n_dumps,
         f"{100 * s.flag_fraction_before['auto-pol']:.2f} / "
         f"{100 * s.flag_fraction_before['cross-pol']:.2f}",
         f"{100 * s.flag_fraction_after['auto-pol']:.2f} / "
         f"{100 * s.flag_fraction_after['cross-pol']:.2f}",
         ", ".join(s.solved) or "-", "; ".join(s.notes) or ""]
        for s in sorted(data.scans, key=lambda s: s.start_time)
    ], ["start", "target", "tags", "dumps", "flagged % before (par / cross)",
        "flagged % after (par / cross)", "solved", "notes"]))
    summary = snr_summary(data.history)
    if summary:
        def fmt(v):
            return "NaN" if v is None else f"{v:.3g}"
        parts.append("<h2>Calibration product SNR summary</h2>")
        parts.append(_table(
            [[f"SNR_{product}", _iso(r["time"]), fmt(r["median"]),
              f"{fmt(r['p25'])} to {fmt(r['p75'])}", f"{r['n_low']} of {r['n_inputs']}"]
             for product, rows in summary.items() for r in rows],
            ["product", "time", "median", "IQR (25-75%)",
             f"inputs with SNR < {LOW_SNR:g} or NaN"]))
    parts.append("<h2>Flux calibration</h2>")
    if data.measured_flux:
        parts.append(_table(
            [[name, f"{f:.4g} ± {e:.2g}"] for name, (f, e) in sorted(data.measured_flux.items())],
            ["gain calibrator", "measured flux density (Jy)"]))
    else:
        parts.append("<p>No flux measured: it needs a bandpass calibrator with a flux model "
                     "and a gain calibrator in the same capture block.</p>")
    k = data.history.get("K", [])
    if k:
        t, delay = k[-1]
        parts.append(f"<h2>Delays (K, ns) at {_iso(t)}</h2>")
        parts.append(_table(
            [[a] + [f"{1e9 * delay[p, i]:.4f}" for p in range(len(data.pols))]
             for i, a in enumerate(data.antlist)],
            ["antenna"] + [f"pol {p}" for p in data.pols]))
    for title, name in figs:
        parts.append(f"<h2>{html.escape(title)}</h2><img src='{name}'>")
    parts.append("</body></html>")
    (work / f"calreport{data.server_id}.html").write_text("\n".join(parts))
    obs = data.obs_params or {}
    metadata = {
        "ProductType": {"ProductTypeName": "MeerKATReductionProduct",
                        "ReductionName": "Calibration Report"},
        "StartTime": _iso(start) if start is not None else None,
        "CaptureBlockId": data.capture_block_id,
        "Description": f"{obs.get('description', '')} cal report".strip(),
        "ProposalId": obs.get("proposal_id", ""),
        "Observer": obs.get("observer", ""),
        "ScheduleBlockIdCode": obs.get("sb_id_code", ""),
        "Run": data.server_id,
        "Solved": solved,
        "Problems": problems,
        "SNRSummary": summary,
        "MeasuredFlux": {name: {"flux_jy": _finite(f), "std_jy": _finite(e)}
                         for name, (f, e) in data.measured_flux.items()},
    }
    (work / "metadata.json").write_text(json.dumps(metadata, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)
    return final
