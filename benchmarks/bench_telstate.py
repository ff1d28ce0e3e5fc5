"""Telescope state: karoo against katsdptelstate on the same real redis-server, in one run.

Figures: sensor adds, attribute gets (one at a time and in bulk), gets through a katdal-style
4-prefix view, ``get_range`` of a one-hour window on a 100k-sample sensor, and RDB dump and load
of 10k keys. Every ratio is karoo / katsdptelstate, so above 1 means karoo is faster.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import katsdptelstate
import numpy as np
from katsdptelstate.rdb_writer import RDBWriter

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import median_time, parser, report

from karoo.telstate import TelescopeState
from karoo.telstate.server import RedisServer

ANCHOR = "katsdptelstate"


def main() -> None:
    args = parser(__doc__).parse_args()
    reps = args.reps or (3 if args.quick else 5)
    n_ops = 2_000 if args.quick else 10_000
    n_samples = 20_000 if args.quick else 100_000
    n_keys = 2_000 if args.quick else 10_000

    with RedisServer() as server, tempfile.TemporaryDirectory() as tmp:
        ours = TelescopeState(server.url)
        theirs = katsdptelstate.TelescopeState(server.url)
        print(f"# redis-server on {server.endpoint}; {n_ops} ops per figure; medians of {reps}")

        # Sensor adds: one call per sample on both sides, then karoo's bulk call.
        stamps = 1.7e9 + np.arange(n_ops, dtype=float)
        values = np.random.default_rng(1).normal(size=n_ops).tolist()

        def clear():
            ours.clear()

        pairs = list(zip(values, stamps, strict=True))
        t_ours = median_time(lambda: [ours.add("s", v, ts=t) for v, t in pairs], reps, clear)
        t_theirs = median_time(lambda: [theirs.add("s", v, ts=t) for v, t in pairs], reps, clear)
        report(f"sensor add, {n_ops} one at a time", n_ops / t_ours, ANCHOR, n_ops / t_theirs,
               "adds/s", reps)
        samples = [("s", v, t) for v, t in pairs]
        t_bulk = median_time(lambda: ours.add_many(samples), reps, clear)
        report(f"sensor add, {n_ops} in bulk (add_many vs one at a time)", n_ops / t_bulk, ANCHOR,
               n_ops / t_theirs, "adds/s", reps)

        # Attribute gets.
        ours.clear()
        names = [f"attr{i}" for i in range(n_ops)]
        for i, name in enumerate(names[:1000]):
            ours[name] = float(i)
        names = names[:1000] * (n_ops // 1000)
        t_ours = median_time(lambda: [ours[name] for name in names], reps)
        t_theirs = median_time(lambda: [theirs[name] for name in names], reps)
        report(f"attribute get, {n_ops} one at a time", n_ops / t_ours, ANCHOR, n_ops / t_theirs,
               "gets/s", reps)
        t_bulk = median_time(lambda: ours.get_many(names), reps)
        report(f"attribute get, {n_ops} in bulk (get_many vs one at a time)", n_ops / t_bulk,
               ANCHOR, n_ops / t_theirs, "gets/s", reps)

        # katdal's view: <cb>_<stream>_, <cb>_, <stream>_, '' with the key only in the root.
        def katdal_view(ts):
            return ts.view("sdp_l0").view("cb").view("cb_sdp_l0", add_separator=True)

        ov, tv = katdal_view(ours), katdal_view(theirs)
        few = names[: n_ops // 4]
        t_ours = median_time(lambda: [ov[name] for name in few], reps)
        t_theirs = median_time(lambda: [tv[name] for name in few], reps)
        report("attribute get through a 4-prefix view", len(few) / t_ours, ANCHOR,
               len(few) / t_theirs, "gets/s", reps)

        # get_range of a one-hour window (3600 samples at 1 Hz) on a long sensor.
        ours.clear()
        base = 1.7e9
        temps = np.random.default_rng(2).normal(20, 1, n_samples)
        ours.add_many(("temp", float(v), base + i) for i, v in enumerate(temps))
        starts = np.random.default_rng(3).uniform(0, n_samples - 3600, reps * 4)
        def window(ts, start_iter):
            start = base + next(start_iter)
            return ts.get_range("temp", start, start + 3600)

        it_ours, it_theirs = iter(starts), iter(starts)
        t_ours = median_time(lambda: window(ours, it_ours), reps)
        t_theirs = median_time(lambda: window(theirs, it_theirs), reps)
        check = ours.get_range("temp", base + 100, base + 3700)
        assert check == theirs.get_range("temp", base + 100, base + 3700) and len(check) == 3600
        report(f"get_range 1 h window of a {n_samples} sample sensor", 1 / t_ours, ANCHOR,
               1 / t_theirs, "calls/s", reps)

        # RDB dump and load: 10k keys, a telstate-like mix of attributes and short sensors.
        ours.clear()
        rng = np.random.default_rng(4)
        for i in range(n_keys):
            if i % 4 == 0:
                ours.add_many((f"sensor{i}", float(x), base + j) for j, x in
                              enumerate(rng.normal(size=10)))
            else:
                ours[f"attr{i}"] = rng.normal(size=4) if i % 4 == 1 else f"value {i}"
        mem_ours = TelescopeState()
        mem_ours.load_from_file(_dump_with(ours, tmp, "seed.rdb"))
        mem_theirs = katsdptelstate.TelescopeState()
        mem_theirs.load_from_file(os.path.join(tmp, "seed.rdb"))

        t_ours = median_time(lambda: mem_ours.dump(os.path.join(tmp, "ours.rdb")), reps)
        t_theirs = median_time(lambda: _anchor_dump(mem_theirs, os.path.join(tmp, "theirs.rdb")),
                               reps)
        report(f"RDB dump of {n_keys} keys from memory", n_keys / t_ours, ANCHOR,
               n_keys / t_theirs, "keys/s", reps)
        t_ours = median_time(lambda: ours.dump(os.path.join(tmp, "ours_r.rdb")), reps)
        t_theirs = median_time(lambda: _anchor_dump(theirs, os.path.join(tmp, "theirs_r.rdb")),
                               reps)
        report(f"RDB dump of {n_keys} keys from Redis", n_keys / t_ours, ANCHOR,
               n_keys / t_theirs, "keys/s", reps)

        rdb = os.path.join(tmp, "ours.rdb")
        t_ours = median_time(lambda: TelescopeState().load_from_file(rdb), reps)
        t_theirs = median_time(lambda: katsdptelstate.TelescopeState().load_from_file(rdb), reps)
        report(f"RDB load of {n_keys} keys into memory", n_keys / t_ours, ANCHOR,
               n_keys / t_theirs, "keys/s", reps)
        ours.close()


def _dump_with(ts: TelescopeState, tmp: str, name: str) -> str:
    path = os.path.join(tmp, name)
    ts.dump(path)
    return path


def _anchor_dump(ts, path: str) -> None:
    with RDBWriter(path) as writer:
        writer.save(ts)


if __name__ == "__main__":
    main()
