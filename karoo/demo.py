"""``karoo demo``: what karoo can do so far, run end to end on real components.

Until the simulated observation exists, the demo is a real telescope-state round trip: it
writes the metadata and sensors an observation produces, reads them back through a capture
block view, dumps an RDB file, loads it again and checks that nothing changed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from .telstate import KeyType, TelescopeState


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run karoo end to end on embedded defaults",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", metavar="URL", default="",
                        help="use this Redis server instead of the in-memory telstate")
    parser.add_argument("--output", metavar="DIR", default=None,
                        help="where to write the RDB file (default: a temporary directory)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ts = TelescopeState(args.redis)
    where = args.redis or "memory"
    cbid = str(int(time.time()))
    stream = "sdp_l0"
    start = time.time()
    n_ants, n_chans, dumps = 4, 4096, 40
    ants = [f"m{i:03d}" for i in range(n_ants)]
    inputs = [f"{ant}{pol}" for ant in ants for pol in "hv"]
    bls = np.array([(a, b) for i, a in enumerate(inputs) for b in inputs[i:]])

    print(f"telstate: {where}; capture block {cbid}")
    attrs = {
        f"{stream}_n_chans": n_chans, f"{stream}_int_time": 0.5, f"{stream}_bls_ordering": bls,
        f"{stream}_sync_time": start - 100.0, f"{stream}_bandwidth": 856e6,
        f"{stream}_center_freq": 1284e6, f"{stream}_stream_type": "sdp.vis",
        f"{cbid}_{stream}_first_timestamp": 100.25,
    }
    for key, value in attrs.items():
        ts[key] = value
    activity = ["slew", "track", "slew", "track"]
    samples = [(f"{cbid}_obs_activity", act, start + 5 * i) for i, act in enumerate(activity)]
    samples += [(f"{ant}_pos_actual_scan_elev", 40 + i * 0.01, start + i * 0.5)
                for ant in ants for i in range(dumps)]
    ts.add_many(samples)
    print(f"wrote {len(attrs)} attributes and {len(samples)} sensor samples in one call")

    view = ts.view(stream).view(cbid).view(f"{cbid}_{stream}")
    assert view["n_chans"] == n_chans and view["first_timestamp"] == 100.25
    assert view.get_range("obs_activity", st=0)[-1][0] == "track"
    elev = ts.get_range(f"{ants[0]}_pos_actual_scan_elev", start + 5, start + 10)
    print(f"read back through the capture block view: n_chans={view['n_chans']}, "
          f"{len(bls)} corr products, {len(elev)} elevation samples in a 5 s window")

    out_dir = args.output or tempfile.mkdtemp(prefix="karoo-demo-")
    os.makedirs(out_dir, exist_ok=True)
    rdb = os.path.join(out_dir, f"{cbid}_{stream}.rdb")
    n_keys = ts.dump(rdb)
    loaded = TelescopeState()
    loaded.load_from_file(rdb)
    names = ts.keys()
    for key in names:
        expected, got = ts.get(key, return_encoded=True), loaded.get(key, return_encoded=True)
        if ts.key_type(key) == loaded.key_type(key) == KeyType.MUTABLE:
            expected, got = ts.get_range(key, st=0), loaded.get_range(key, st=0)
        if expected != got:
            print(f"MISMATCH in {key}")
            return 1
    print(f"dumped {n_keys} keys to {rdb} ({os.path.getsize(rdb)} bytes), loaded them back: "
          "identical")
    return 0
