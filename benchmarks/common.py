"""What every benchmark shares: repetition, medians and the one-line-per-figure report."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a smaller run, under a minute")
    p.add_argument("--reps", type=int, default=None, help="repetitions per figure")
    return p


def median_time(func: Callable[[], object], reps: int, setup: Callable[[], object] | None = None):
    """Median wall time of `func` over `reps` runs (`setup` runs untimed before each)."""
    times = []
    for _ in range(reps):
        if setup is not None:
            setup()
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(metric: str, ours: float, anchor_name: str, theirs: float, unit: str,
           reps: int | str) -> float:
    """Print one figure as ``<metric>: karoo X unit | anchor Y unit | ratio R (median of N)``.

    The ratio is always karoo/anchor of the printed values; for a time (lower is better) the
    caller should pass rates instead, so that a ratio above 1 always means karoo is faster.
    `reps` may say "karoo/anchor" repetitions when they differ (e.g. "5/3").
    """
    ratio = ours / theirs if theirs else float("inf")
    print(
        f"{metric}: karoo {_fmt(ours)} {unit} | {anchor_name} {_fmt(theirs)} {unit} | "
        f"ratio {ratio:.2f} (median of {reps})",
        flush=True,
    )
    return ratio


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.4g}"
