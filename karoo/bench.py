"""``karoo bench <part>``: run a part's side-by-side benchmark from benchmarks/."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def add_commands(subparsers) -> None:
    parts = sorted(p.stem[len("bench_"):] for p in BENCHMARKS.glob("bench_*.py"))
    parser = subparsers.add_parser(
        "bench", help="measure a part against its anchor",
        description="Run benchmarks/bench_<part>.py, which prints one line per figure: "
        "'<metric>: karoo <value> <unit> | <anchor> <value> <unit> | ratio <karoo/anchor>'.")
    parser.add_argument("part", choices=parts or None, help="which part to measure")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="passed on (--quick, --reps N)")
    parser.set_defaults(func=run)


def run(args) -> int:
    script = BENCHMARKS / f"bench_{args.part}.py"
    if not script.exists():
        print(f"no benchmark {script} (benchmarks/ comes with a source checkout)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.extra]
    runpy.run_path(str(script), run_name="__main__")
    return 0
