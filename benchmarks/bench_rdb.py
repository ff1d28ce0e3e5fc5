"""RDB dump and load: karoo.telstate.rdb side by side with katsdptelstate (RDBWriter + rdbtools).

Usage: python benchmarks/bench_rdb.py [--quick] [--keys N]

Figures are throughputs (higher is better), so the ratio is karoo's speed-up over the anchor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py

import katsdptelstate
import lzf
from common import report
from katsdptelstate import encode_value
from katsdptelstate.rdb_writer import RDBWriter

from karoo.telstate._lzf import lzf_decompress
from karoo.telstate.keytypes import KeyType
from karoo.telstate.rdb import dump_rdb, load_rdb


def make_dataset(n_keys: int):
    """The same keys as karoo records and as a katsdptelstate memory telstate.

    Half are attributes (ints, floats, strings, dicts, small arrays), half small sensors of
    1-20 samples, like a capture block's metadata.
    """
    rng = np.random.default_rng(42)
    ts = katsdptelstate.TelescopeState()
    records = []
    for i in range(n_keys):
        if i % 2 == 0:
            key = f"cb_stream_attr_{i:06d}"
            value = [i, i * 0.5, f"text value {i}", {"a": i, "b": [1, 2]},
                     rng.normal(size=8)][i % 5]
            ts[key] = value
            records.append((key.encode(), KeyType.IMMUTABLE, encode_value(value)))
        else:
            key = f"m{i % 64:03d}_sensor_{i:06d}"
            members = []
            for j in range(1 + i % 20):
                t = 1.7e9 + j * 10.0
                value = ["track", "slew", float(j), j][j % 4]
                ts.add(key, value, ts=t)
                members.append(struct.pack(">d", t) + encode_value(value))
            records.append((key.encode(), KeyType.MUTABLE, members))
    return records, ts


def timed(func, repeats: int) -> float:
    """Median wall time of `func()` over `repeats` runs (after one warm-up)."""
    func()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (< 1 minute)")
    parser.add_argument("--keys", type=int, default=10_000, help="number of keys")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    n_keys = args.keys
    records, ts = make_dataset(n_keys)

    with tempfile.TemporaryDirectory(prefix="bench-rdb-") as tmp:
        karoo_file = os.path.join(tmp, "karoo.rdb")
        anchor_file = os.path.join(tmp, "anchor.rdb")

        def karoo_dump():
            # The anchor does not fsync either.
            dump_rdb(karoo_file, records, fsync=False)

        def anchor_dump():
            with RDBWriter(anchor_file) as writer:
                writer.save(ts)

        label = f"dump {n_keys // 1000}k keys"
        t_karoo, t_anchor = timed(karoo_dump, repeats), timed(anchor_dump, repeats)
        report(label, n_keys / t_karoo / 1e3, "katsdptelstate", n_keys / t_anchor / 1e3,
               "kkeys/s", repeats)

        for name, path in [("karoo", karoo_file), ("katsdptelstate", anchor_file)]:
            def karoo_load(path=path):
                # Include filling a dict, as a memory backend would.
                return {key: (kind, value) for key, kind, value in load_rdb(path)}

            def anchor_load(path=path):
                return katsdptelstate.TelescopeState().load_from_file(path)

            assert len(karoo_load()) == anchor_load() == n_keys
            t_karoo, t_anchor = timed(karoo_load, repeats), timed(anchor_load, repeats)
            report(f"load {n_keys // 1000}k keys ({name} file, {os.path.getsize(path) >> 10} KiB)",
                   n_keys / t_karoo / 1e3, "katsdptelstate", n_keys / t_anchor / 1e3,
                   "kkeys/s", repeats)

    # LZF: what Redis-saved files use for every compressible value longer than 20 bytes.
    payload = b"".join(encode_value({"ant": f"m{i:03d}", "gain": i * 0.25}) for i in range(40_000))
    compressed = lzf.compress(payload)
    buf = np.frombuffer(compressed, dtype=np.uint8)
    assert lzf_decompress(buf, 0, len(buf), len(payload)) == payload
    t_karoo = timed(lambda: lzf_decompress(buf, 0, len(buf), len(payload)), repeats * 3)
    t_anchor = timed(lambda: lzf.decompress(compressed, len(payload)), repeats * 3)
    mb = len(payload) / 1e6
    report(f"lzf decompress {mb:.1f} MB", mb / t_karoo, "python-lzf", mb / t_anchor, "MB/s",
           repeats * 3)


if __name__ == "__main__":
    main()
