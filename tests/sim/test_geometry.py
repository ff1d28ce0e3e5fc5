"""Array geometry and correlation products, checked against katpoint (test-only anchor)."""

import numpy as np
import pytest

from karoo.sim.array import MEERKAT_ENU, Array, CorrProducts
from karoo.sim.astro import apparent_enu, enu_to_azel, format_angle, parse_angle, uvw_basis
from karoo.sim.sky import BPCAL, Target

katpoint = pytest.importorskip("katpoint")

TARGETS = [
    BPCAL.description,
    "3C286, radec, 13:31:08.29, 30:30:33.0",
    "eq, radec, 2:00:00.0, -5:00:00.0",
]
TIMES = 1717206000.0 + np.array([0.0, 1800.0, 7200.0, 5e6])


def test_antenna_descriptions_match_katpoint():
    array = Array.meerkat(64)
    assert len(MEERKAT_ENU) == 64
    for ant in array.antennas:
        kp = katpoint.Antenna(ant.description)
        assert kp.name == ant.name
        np.testing.assert_allclose(kp.position_enu, ant.enu, atol=1e-9)
        assert kp.diameter == 13.5
    ref = katpoint.Antenna(array.reference_description)
    assert ref.observer.lat == pytest.approx(array.latitude, abs=1e-9)
    assert ref.observer.long == pytest.approx(array.longitude, abs=1e-9)
    assert ref.observer.elevation == pytest.approx(1035.0)
    # The longest MeerKAT baseline is about 7.7 km
    assert 7500 < array.max_baseline < 8000


@pytest.mark.parametrize("description", TARGETS)
def test_azel_matches_katpoint(description):
    array = Array.meerkat(4)
    ref = katpoint.Antenna(array.reference_description)
    target = katpoint.Target(description)
    ra, dec = (float(x) for x in target.radec())
    az, el = enu_to_azel(apparent_enu(ra, dec, TIMES, array.latitude, array.longitude))
    kp_az, kp_el = target.azel(TIMES, ref)
    # 1 arcsec: PyEphem's own precision is about 0.1-1 arcsec
    tol = np.radians(1.0 / 3600)
    np.testing.assert_allclose(np.angle(np.exp(1j * (az - kp_az))), 0, atol=tol)
    np.testing.assert_allclose(el, kp_el, atol=tol)


@pytest.mark.parametrize("description", TARGETS)
def test_baseline_uvw_matches_katpoint(description):
    array = Array.meerkat(64)
    products = CorrProducts.cbf(array)
    ref = katpoint.Antenna(array.reference_description)
    ants = [katpoint.Antenna(a.description) for a in array.antennas]
    target = katpoint.Target(description)
    ours = Target.parse(description)
    basis = uvw_basis(ours.ra, ours.dec, TIMES, array.latitude, array.longitude)
    ant_uvw = np.einsum("tij,aj->tai", basis, array.enu)  # (time, ant, uvw)
    kp = np.moveaxis(np.array(target.uvw(ants, TIMES, ref)), 0, -1)  # (time, ant, uvw)
    # baseline uvw = antenna 2 - antenna 1 (katdal / CASA convention)
    ours_bl = ant_uvw[:, products.ant2] - ant_uvw[:, products.ant1]
    kp_bl = kp[:, products.ant2] - kp[:, products.ant1]
    length = np.linalg.norm(kp_bl, axis=-1, keepdims=True)
    # within 5 mm + 5e-6 of the baseline length (~4 cm on the longest baseline)
    assert np.all(np.abs(ours_bl - kp_bl) <= 5e-3 + 5e-6 * length)


def test_bls_ordering():
    array = Array.meerkat(5)
    products = CorrProducts.cbf(array)
    n = array.n_ants
    assert products.labels.shape == (2 * n * (n + 1), 2)
    assert products.labels.dtype == np.dtype("<U5")
    labels = [tuple(p) for p in products.labels]
    assert len(set(labels)) == len(labels)
    # Pair index a2 * (a2 + 1) / 2 + a1, four products each in vv, hv, vh, hh order
    assert labels[:8] == [
        ("m000v", "m000v"),
        ("m000h", "m000v"),
        ("m000v", "m000h"),
        ("m000h", "m000h"),
        ("m000v", "m001v"),
        ("m000h", "m001v"),
        ("m000v", "m001h"),
        ("m000h", "m001h"),
    ]
    for a2 in range(n):
        for a1 in range(a2 + 1):
            k = 4 * (a2 * (a2 + 1) // 2 + a1)
            assert labels[k] == (f"m00{a1}v", f"m00{a2}v")
    # Every ordered input pair appears exactly once (up to conjugation)
    inputs = array.input_labels
    want = {tuple(sorted((a, b))) for a in inputs for b in inputs}
    assert {tuple(sorted(p)) for p in labels} == want
    assert np.array_equal(products.labels[:, 0], np.array(inputs)[products.input1])
    assert np.array_equal(products.labels[:, 1], np.array(inputs)[products.input2])
    assert products.is_auto.sum() == 4 * n
    assert products.is_parallel.sum() == 2 * (n * (n + 1) // 2)


def test_angles_round_trip():
    assert parse_angle("-30:42:39.8") == pytest.approx(-np.radians(30 + 42 / 60 + 39.8 / 3600))
    assert parse_angle("19:39:25.03", hours=True) == pytest.approx(
        np.radians(15 * (19 + 39 / 60 + 25.03 / 3600))
    )
    assert format_angle(parse_angle("-0:42:08.0")) == "-0:42:08.00"
    with pytest.raises(ValueError):
        parse_angle("12h30m")


def test_antenna_count_checked():
    with pytest.raises(ValueError):
        Array.meerkat(65)
