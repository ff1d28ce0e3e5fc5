"""Calibration kernels side by side with their anchors.

    python benchmarks/bench_cal.py [--quick]

* StEFCal (64 antennas, complex64): karoo against a straightforward batched numpy StEFCal in the
  same process, and per core against katsdpcalproc's published ~95 us per solve per core.
* SumThreshold on a simulated cross-hand block with a truth mask: karoo against katsdpsigproc's
  SumThresholdFlagger (both on all cores) and, if installed, the AOFlagger CLI on a
  MeasurementSet of the same block; throughput and recall/precision side by side.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py

from common import report

from karoo.cal.flagger import SumThresholdFlagger
from karoo.cal.solvers import stefcal
from tests.cal.simulate import (
    complex_noise,
    cross_baselines,
    gain_vis,
    random_gains,
    rfi_block,
    score_flags,
)

ANCHOR_US_PER_SOLVE = 95.0  # katsdpcalproc stefcal, 4096 x 64-antenna solves, one core


def timed(fn, reps):
    """Median wall and CPU seconds of fn() over reps runs (after one warm-up)."""
    fn()
    wall, cpu = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return float(np.median(wall)), float(np.median(cpu))


def numpy_stefcal(vis, bls, n_ants, max_iters=100, conv_thresh=1e-5):
    """Plain batched numpy StEFCal (same algorithm: dense R, Jacobi update, averaging)."""
    n = vis.shape[0]
    r = np.zeros((n, n_ants, n_ants), np.complex64)
    r[:, bls[:, 0], bls[:, 1]] = vis
    r[:, bls[:, 1], bls[:, 0]] = np.conj(vis)
    m = np.zeros((n_ants, n_ants), np.float32)
    m[bls[:, 0], bls[:, 1]] = 1
    m[bls[:, 1], bls[:, 0]] = 1
    g = np.ones((n, n_ants), np.complex64)
    for it in range(max_iters):
        new = np.einsum("spq,sq->sp", r, g) / ((np.abs(g) ** 2) @ m.T)
        if it % 2 == 1:
            diff = np.linalg.norm(new - g, axis=1)
            if np.all(diff <= conv_thresh * np.linalg.norm(new, axis=1)):
                g = new
                break
            g = 0.5 * (new + g)
        else:
            g = new
    return g * np.conj(g[:, :1]) / np.abs(g[:, :1])


def bench_stefcal(quick):
    n_ants = 64
    bls = cross_baselines(n_ants)
    n_solves = 1024 if quick else 4096
    reps = 3 if quick else 5
    rng = np.random.default_rng(42)
    g = random_gains(rng, (n_solves, n_ants))
    # Baselines last and contiguous, as in L0 data and the pipeline's averaged blocks.
    vis = np.ascontiguousarray(
        (gain_vis(g, bls) + complex_noise(rng, (n_solves, len(bls)), 0.2)).astype(np.complex64))
    wall_k, cpu_k = timed(lambda: stefcal(vis, bls, n_ants), reps)
    n_np = n_solves // 8
    wall_n, _ = timed(lambda: numpy_stefcal(vis[:n_np], bls, n_ants), max(1, reps - 2))
    report("stefcal_64ant_solves", n_solves / wall_k, "numpy", n_np / wall_n, "solves/s", reps)
    report("stefcal_64ant_solves_per_core", n_solves / cpu_k, "katsdpcalproc(published 95us)",
         1e6 / ANCHOR_US_PER_SOLVE, "solves/cpu-s", reps)


def write_ms(path, vis):
    """A single-pol (hh) MeasurementSet of a (time, freq, baseline) block for aoflagger.

    Written with karoo.ms so that every subtable aoflagger reads is filled: a hand-made MS
    with empty FIELD and OBSERVATION tables made aoflagger 3.1 segfault. Baselines are the
    cross-correlations of the smallest array that has enough; the rest are missing products
    (flagged, zero weight). Returns the number of baselines per dump in the MS.
    """
    from karoo.ms import MSInput, Scan, Target
    from karoo.ms import write_ms as write_karoo_ms

    n_t, n_f, n_bl = vis.shape
    n_ants = 2
    while n_ants * (n_ants - 1) // 2 < n_bl:
        n_ants += 1
    names = [f"m{i:03d}" for i in range(n_ants)]
    a1, a2 = np.triu_indices(n_ants, 1)
    meta = MSInput(
        antenna_names=names,
        antenna_positions=5e6 + 100.0 * np.arange(n_ants * 3, dtype=np.float64).reshape(-1, 3),
        channel_freqs=856e6 + np.arange(n_f) * (856e6 / n_f),
        channel_width=856e6 / n_f,
        corr_products=[
            (f"{names[i]}h", f"{names[j]}h") for i, j in zip(a1[:n_bl], a2[:n_bl], strict=True)
        ],
        targets=[Target("field", 0.0, -1.0)],
        scans=[Scan(0, n_t, 0)],
        timestamps=1.7e9 + 8.0 * np.arange(n_t),
        dump_period=8.0,
        include_autos=False,
    )
    flags = np.zeros(vis.shape, np.uint8)
    weights = np.ones(vis.shape, np.float32)
    uvw = np.zeros((n_t, len(a1), 3))
    write_karoo_ms(path, meta, vis, flags, weights, uvw, spectrum=False)
    return len(a1)


def run_aoflagger(vis):
    """Flags from the aoflagger CLI (generic strategy), wall seconds; or a reason string."""
    exe = shutil.which("aoflagger")
    if exe is None:
        return "aoflagger not installed (apt-get install aoflagger)"
    try:
        from casacore import tables
    except ImportError:
        return "python-casacore not available to write a MeasurementSet"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "block.ms")
        try:
            n_rows_per_dump = write_ms(path, vis)
        except Exception as exc:
            return f"could not write a MeasurementSet: {exc}"
        strategy = "/usr/share/aoflagger/strategies/generic-default.lua"
        cmd = [exe, "-j", str(os.cpu_count() or 1)]
        if os.path.exists(strategy):
            cmd += ["-strategy", strategy]
        t0 = time.perf_counter()
        proc = subprocess.run([*cmd, path], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            return (f"aoflagger exited with {proc.returncode} on our MeasurementSet: "
                    f"{(proc.stderr + proc.stdout).strip()[-300:]}")
        with tables.table(path, ack=False) as t:
            flags = t.getcol("FLAG")[..., 0]
    n_t, n_f, n_bl = vis.shape
    flags = flags.reshape(n_t, n_rows_per_dump, n_f)[:, :n_bl]
    return flags.transpose(0, 2, 1), wall


def bench_flagger(quick):
    from katsdpsigproc.rfi.twodflag import SumThresholdFlagger as AnchorFlagger

    n_bl = 16 if quick else 100
    reps = 3 if quick else 5
    blk = rfi_block(1, 100, 4096, n_bl, signal=0.0)
    vis = blk.vis
    mvis = vis.size / 1e6
    ours = SumThresholdFlagger()
    anchor = AnchorFlagger(outlier_nsigma=4.5, spike_width_time=12.5, spike_width_freq=10.0,
                           freq_chunks=8)
    n_cpu = os.cpu_count() or 1
    zeros = np.zeros(vis.shape, np.uint8)
    with ThreadPoolExecutor(n_cpu) as pool:
        wall_k, cpu_k = timed(lambda: ours.get_flags(vis), reps)
        wall_a, cpu_a = timed(lambda: anchor.get_flags(vis, zeros, pool=pool), reps)
        flags_a = anchor.get_flags(vis, zeros, pool=pool)
    flags_k = ours.get_flags(vis)
    report("sumthreshold_throughput", mvis / wall_k, "katsdpsigproc", mvis / wall_a, "Mvis/s",
         reps)
    report("sumthreshold_throughput_per_core", mvis / cpu_k, "katsdpsigproc", mvis / cpu_a,
         "Mvis/cpu-s", reps)
    sk, sa = score_flags(flags_k, blk.truth), score_flags(flags_a, blk.truth)
    report("sumthreshold_recall_cross", sk.recall, "katsdpsigproc", sa.recall, "", 1)
    report("sumthreshold_precision_tol1_cross", sk.precision_tol, "katsdpsigproc",
         sa.precision_tol, "", 1)
    report("sumthreshold_fp_far_cross", sk.fp_far * 100, "katsdpsigproc", sa.fp_far * 100, "%", 1)

    ao = run_aoflagger(vis)
    if isinstance(ao, str):
        print(f"# aoflagger comparison skipped: {ao}")
        return
    flags_ao, wall_ao = ao
    so = score_flags(flags_ao, blk.truth)
    report("sumthreshold_throughput_vs_aoflagger", mvis / wall_k, "aoflagger", mvis / wall_ao,
         "Mvis/s", reps)
    report("sumthreshold_recall_cross_vs_aoflagger", sk.recall, "aoflagger", so.recall, "", 1)
    report("sumthreshold_precision_tol1_cross_vs_aoflagger", sk.precision_tol, "aoflagger",
         so.precision_tol, "", 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    args = parser.parse_args()
    bench_stefcal(args.quick)
    bench_flagger(args.quick)


if __name__ == "__main__":
    main()
