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
    }
    (work / "metadata.json").write_text(json.dumps(metadata, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)
    return final
