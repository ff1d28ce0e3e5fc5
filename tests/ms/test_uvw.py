"""ITRF positions and UVW in the MS against katpoint (test-only anchor)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from casacore import tables

from karoo.ms import Target, itrf_from_enu, write_ms
from karoo.ms.uvw import geometric_uvw

from .conftest import make_observation

katpoint = pytest.importorskip("katpoint")

REF = "-30:42:39.8, 21:26:38.0, 1035.0"


def katpoint_antennas(obs):
    return [
        katpoint.Antenna(f"{name}, {REF}, 13.5, {e} {n} {u}")
        for name, (e, n, u) in zip(obs.meta.antenna_names, obs.enu, strict=True)
    ]


def test_itrf_positions_match_katpoint(obs):
    ants = katpoint_antennas(obs)
    lat, lon, alt = ants[0].ref_position_wgs84
    ours = itrf_from_enu(obs.enu, lat, lon, alt)
    theirs = np.array([a.position_ecef for a in ants])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_ms_uvw_matches_katpoint(tmp_path):
    obs = make_observation()
    ants = katpoint_antennas(obs)
    ref = katpoint.Antenna(f"array, {REF}")
    lat, lon, _ = ants[0].ref_position_wgs84
    kp_targets = [
        katpoint.Target("PKS1934-638, radec, 19:39:25.03, -63:42:45.6"),
        katpoint.Target("3C286, radec, 13:31:08.29, 30:30:33.0"),
    ]
    targets = [Target(t.name, *(float(x) for x in t.radec())) for t in kp_targets]
    meta = replace(obs.meta, targets=targets, antenna_uvw=geometric_uvw(obs.enu, targets, lat, lon))
    path = write_ms(tmp_path / "uvw.ms", meta, obs.vis, obs.flags, obs.weights)
    with tables.table(str(path), ack=False) as t:
        uvw = t.getcol("UVW").reshape(meta.n_dumps, -1, 3)
        a1 = t.getcol("ANTENNA1")[: uvw.shape[1]]
        a2 = t.getcol("ANTENNA2")[: uvw.shape[1]]
        field = t.getcol("FIELD_ID")[:: uvw.shape[1]]
    for d, time in enumerate(meta.timestamps):
        kp = np.array(kp_targets[field[d]].uvw(ants, time, ref)).T  # (ant, 3)
        expected = kp[a1] - kp[a2]  # katdal's sign: ANTENNA1 - ANTENNA2
        length = np.linalg.norm(expected, axis=-1, keepdims=True)
        assert np.all(np.abs(uvw[d] - expected) <= 5e-3 + 5e-6 * length)
    assert np.abs(uvw).max() > 10.0  # real baselines, not zeros
