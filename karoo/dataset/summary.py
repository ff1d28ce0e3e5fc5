"""A katdal-like text summary of a dataset (what ``karoo ls`` prints)."""

from __future__ import annotations

import datetime

import numpy as np


def _utc(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def summary(ds) -> str:
    """Observation, antennas, channels, targets and scans of the current selection."""
    lines = []
    sep = "=" * 78
    lines.append(sep)
    lines.append(f"Name: {ds.name} (capture block {ds.capture_block_id}, stream {ds.stream_name})")
    lines.append(f"Observer: {ds.observer}  Experiment ID: {ds.experiment_id}")
    lines.append(f"Description: {ds.description!r}")
    if len(ds.timestamps):
        duration = ds.end_time - ds.start_time
        lines.append(f"Observed from {_utc(ds.start_time)} to {_utc(ds.end_time)} UTC "
                     f"({duration:.1f} s)")
    t, f, b = ds.shape
    lines.append(f"Dump period: {ds.dump_period:.4f} s, {t} dumps selected of "
                 f"{len(ds._timestamps)}")
    size = ds.size
    lines.append(f"Shape (dumps, channels, corrprods): ({t}, {f}, {b}); size {size / 1e9:.3f} GB "
                 "(vis + flags + weights)")
    lines.append(sep)
    ants = ds.ants
    lines.append(f"Antennas: {len(ants)}  {' '.join(a.name for a in ants)}")
    lines.append(f"Inputs: {len(ds.inputs)}  Corr products: {b}")
    if f:
        lines.append(f"Channels: {f} of {len(ds._freqs)}, {ds.freqs[0] / 1e6:.3f} - "
                     f"{ds.freqs[-1] / 1e6:.3f} MHz, width {ds.channel_width / 1e3:.3f} kHz")
    lines.append(sep)
    lines.append(f"Targets: {len(ds.catalogue)}")
    counts = np.bincount(ds._target_index[ds._time_keep][ds._target_index[ds._time_keep] >= 0],
                         minlength=len(ds.catalogue))
    for i, target in enumerate(ds.catalogue):
        tags = " ".join(target.tags)
        lines.append(f"  {i:3d}  {target.name:<20s} {tags:<24s} {counts[i]:6d} dumps")
    lines.append(sep)
    lines.append("Scans:")
    lines.append("  scan  state   compscan  label        dumps  target")
    for s, state, target in ds.scans():
        first = ds.dumps[0]
        label = ds._label[first] or ""
        lines.append(f"  {s:4d}  {state:<6s}  {ds._compscan_index[first]:8d}  {label:<11s} "
                     f"{len(ds.timestamps):6d}  {target.name if target else '-'}")
    return "\n".join(lines)
