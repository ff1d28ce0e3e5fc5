"""Visibility model: analytic checks, noise level, RFI truth and heap loss."""

import math

import numpy as np
import pytest

from karoo.sim.array import Array, CorrProducts
from karoo.sim.astro import SPEED_OF_LIGHT, uvw_basis
from karoo.sim.model import CorrelatorConfig, InstrumentModel, NoiseModel, VisibilityModel
from karoo.sim.rfi import HeapLossModel, RfiEvent, RfiModel, load_rfi_mask
from karoo.sim.sky import BPCAL, FluxModel, PointSource, SkyModel

TIME = 1717206000.0
CENTRE = (BPCAL.ra, BPCAL.dec)


@pytest.fixture(scope="module")
def setup():
    array = Array.meerkat(4)
    config = CorrelatorConfig(n_chans=256, n_substreams=4)
    instrument = InstrumentModel.random(array, config, seed=3, epoch=TIME)
    return array, config, instrument


def complex_vis(model, data):
    return (data[..., 0] + 1j * data[..., 1]) / model.count_scale


def test_config_derived_values():
    config = CorrelatorConfig(n_chans=4096)
    assert config.ticks_between_spectra == 8192
    assert config.n_accs == 104448
    assert config.dump_period == pytest.approx(0.49979, abs=1e-5)
    assert config.channel_freqs[2048] == config.band.center_freq
    assert CorrelatorConfig(n_chans=32768).n_accs % 256 == 0
    with pytest.raises(ValueError):
        CorrelatorConfig(n_chans=1000, n_substreams=16)


def test_point_source_at_phase_centre_is_product_of_gains(setup):
    array, config, instrument = setup
    sky = SkyModel((PointSource.from_target(BPCAL),))
    model = VisibilityModel(array, config, sky, instrument, NoiseModel(enabled=False))
    data, mask = model.predict(TIME, CENTRE)
    assert data.dtype == np.int32 and data.shape == (256, 40, 2)
    assert not mask.any()
    p = model.products
    J = instrument.response(TIME)
    flux = BPCAL.flux(config.channel_freqs)[:, None]
    expected = flux * J[:, p.input1] * np.conj(J[:, p.input2]) * p.is_parallel
    expected += (p.input1 == p.input2) * model.noise.sefd * np.abs(J[:, p.input1]) ** 2
    vis = complex_vis(model, data)
    # Quantisation: at most half a count per component
    bound = 0.5 / model.count_scale * (1 + 1e-6) + 1e-6 * np.abs(expected)
    assert np.all(np.abs(vis.real - expected.real) <= bound)
    assert np.all(np.abs(vis.imag - expected.imag) <= bound)
    # ... and the quantisation is real: values are whole counts, not exact floats
    assert np.abs(vis - expected).max() > 0


def test_delay_gives_linear_phase_slope():
    array = Array.meerkat(4)
    config = CorrelatorConfig(n_chans=1024, n_substreams=4)
    instrument = InstrumentModel.ideal(array, config)
    instrument.delays[:] = 0.0
    instrument.delays[array.input_labels.index("m001h")] = 2.5e-9
    sky = SkyModel((PointSource("flat", *CENTRE, FluxModel.power_law(10.0, 1.4e9, 0.0)),))
    model = VisibilityModel(array, config, sky, instrument, NoiseModel(enabled=False))
    vis = complex_vis(model, model.predict(TIME, CENTRE)[0])
    labels = [tuple(x) for x in model.products.labels]
    k = labels.index(("m000h", "m001h"))
    phase = np.unwrap(np.angle(vis[:, k]))
    slope = np.polyfit(config.channel_freqs, phase, 1)[0]
    # V_pq = J_p conj(J_q), J = exp(2 pi i K f): slope = 2 pi (K_p - K_q)
    assert slope == pytest.approx(2 * math.pi * (0 - 2.5e-9), rel=1e-4)
    assert np.abs(vis[:, k]).std() < 1e-3 * np.abs(vis[:, k]).mean()
    # The v pol of the same baseline has no delay
    assert np.ptp(np.angle(vis[:, labels.index(("m000v", "m001v"))])) < 1e-3


def test_offset_source_fringe_phase_follows_uvw():
    array = Array.meerkat(16)
    config = CorrelatorConfig(n_chans=64, n_substreams=4)
    instrument = InstrumentModel.ideal(array, config)
    source = PointSource(
        "off",
        BPCAL.ra + math.radians(0.1),
        BPCAL.dec + math.radians(0.05),
        FluxModel.power_law(10.0, 1.4e9, 0.0),
    )
    model = VisibilityModel(
        array, config, SkyModel((source,)), instrument, NoiseModel(enabled=False)
    )
    vis = complex_vis(model, model.predict(TIME, CENTRE)[0])
    # Expected: exp(-2 pi i (u l + v m + w (n - 1)) / lambda) with uvw = x2 - x1
    basis = uvw_basis(*CENTRE, TIME, array.latitude, array.longitude)[0]
    uvw = array.enu @ basis.T
    ca, sa = math.cos(source.ra - CENTRE[0]), math.sin(source.ra - CENTRE[0])
    l_ = math.cos(source.dec) * sa
    m_ = math.sin(source.dec) * math.cos(CENTRE[1]) - (
        math.cos(source.dec) * math.sin(CENTRE[1]) * ca
    )
    n_ = math.sqrt(1 - l_**2 - m_**2)
    p = model.products
    bl = uvw[p.ant2] - uvw[p.ant1]
    path = bl @ np.array([l_, m_, n_ - 1])
    freqs = config.channel_freqs
    expected_phase = -2 * math.pi * freqs[:, None] * path[None, :] / SPEED_OF_LIGHT
    cross = p.is_parallel & ~p.is_auto
    diff = np.angle(vis[:, cross] * np.exp(-1j * expected_phase[:, cross]))
    # lmn from J2000 vs apparent direction differ by aberration/precession distortion
    # (~1e-4 relative), far below a radian of fringe phase on these baselines
    assert np.abs(diff).max() < 0.05
    assert np.abs(expected_phase[:, cross]).max() > 10  # the test has fringes to check


@pytest.mark.parametrize("snr", [5.0, 20.0])
def test_noise_at_requested_snr(setup, snr):
    array, config, _ = setup
    instrument = InstrumentModel.ideal(array, config)
    sky = SkyModel((PointSource("cal", *CENTRE, FluxModel.power_law(10.0, 1.284e9, 0.0)),))
    model = VisibilityModel(array, config, sky, instrument, NoiseModel(snr=snr), seed=7)
    p = model.products
    cross = p.is_parallel & ~p.is_auto
    vis = np.stack(
        [
            complex_vis(model, model.predict(TIME, CENTRE, dump_index=d)[0])[:, cross]
            for d in range(20)
        ]
    )
    noise = vis - 10.0
    measured = 10.0 / np.sqrt(np.mean(np.abs(noise) ** 2))
    assert measured == pytest.approx(snr, rel=0.03)
    # Real and imaginary parts carry half the power each; the noise is Gaussian-like
    assert np.var(noise.real) == pytest.approx(np.var(noise.imag), rel=0.05)
    kurtosis = np.mean(noise.real**4) / np.var(noise.real) ** 2
    assert kurtosis == pytest.approx(3.0, abs=0.15)
    # Different dumps get independent noise
    assert np.abs(np.corrcoef(noise[0].real.ravel(), noise[1].real.ravel())[0, 1]) < 0.05


def test_radiometer_noise_level(setup):
    array, config, _ = setup
    instrument = InstrumentModel.ideal(array, config)
    model = VisibilityModel(array, config, SkyModel(), instrument, NoiseModel(sefd=400.0))
    p = model.products
    vis = complex_vis(model, model.predict(TIME, None)[0])
    expected = 400.0 / math.sqrt(config.channel_width * config.dump_period)
    cross = ~p.is_auto
    assert np.sqrt(np.mean(np.abs(vis[:, cross]) ** 2)) == pytest.approx(expected, rel=0.05)
    autos = vis[:, p.input1 == p.input2]
    assert np.all(autos.imag == 0)
    assert autos.real.mean() == pytest.approx(400.0, rel=1e-3)


def test_rfi_mask_matches_added_power(setup):
    array, config, instrument = setup
    events = [
        RfiEvent("narrowband", 0, 10, 40, 42, 200.0, 1000.0, 1),
        RfiEvent("burst", 1, 2, 100, 180, 50.0, 500.0, 2),
        RfiEvent("blip", 1, 1, 7, 8, 500.0, 2000.0, 3),
    ]
    rfi = RfiModel(array, config.n_chans, events)
    sky = SkyModel((PointSource.from_target(BPCAL),))
    model = VisibilityModel(array, config, sky, instrument, NoiseModel(), seed=1)
    for dump in range(3):
        clean, clean_mask = model.predict(TIME, CENTRE, dump_index=dump)
        dirty, mask = model.predict(TIME, CENTRE, dump_index=dump, rfi=rfi.dump_terms(dump))
        assert not clean_mask.any()
        added = np.any(np.abs(dirty.astype(np.int64) - clean) > 1, axis=-1)
        np.testing.assert_array_equal(mask, added)
        np.testing.assert_array_equal(mask, rfi.mask(dump))
    assert rfi.mask(0)[40:42].any() and not rfi.mask(0)[100:180].any()
    assert rfi.mask(1)[7].any() and rfi.mask(1)[100:180].any() and not rfi.mask(3)[7].any()
    # Long baselines decorrelate: a 500 m decorrelation length cuts km baselines out
    long = np.linalg.norm(array.enu[rfi.products.ant2] - array.enu[rfi.products.ant1], axis=1)
    assert not rfi.mask(1)[150, long > 500 * math.log(10)].any()
    assert rfi.mask(1)[150, rfi.products.is_auto].all()


def test_rfi_mask_file_round_trip(tmp_path):
    array = Array.meerkat(4)
    config = CorrelatorConfig(n_chans=256, n_substreams=4)
    rfi = RfiModel.random(array, config.channel_freqs, 30, seed=5, blip_rate=0.3)
    kinds = {e.kind for e in rfi.events}
    assert {"narrowband", "blip"} <= kinds
    rfi.write_npz(tmp_path / "rfi.npz", 30)
    mask = load_rfi_mask(tmp_path / "rfi.npz")
    assert mask.shape == (30, 256, CorrProducts.cbf(array).n_bls)
    for d in (0, 7, 29):
        np.testing.assert_array_equal(mask[d], rfi.mask(d))
    assert mask.any()


def test_heap_loss_statistics():
    lost = HeapLossModel(random_rate=0.1, seed=4).lost(2000, 16)
    assert lost.shape == (2000, 16) and lost.dtype == bool
    n = lost.size
    assert abs(lost.mean() - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n)
    assert not HeapLossModel().lost(100, 16).any()
    burst = HeapLossModel(burst_rate=0.01, burst_dumps=(3, 3), burst_substreams=(2, 2), seed=2)
    lost = burst.lost(5000, 16)
    assert lost.any()
    # Each burst hits 2 adjacent substreams for 3 consecutive dumps
    per_dump = lost.sum(axis=1)
    assert set(np.unique(per_dump)) <= {0, 2, 4, 6}
    runs = np.diff(np.concatenate([[0], lost[:, lost.any(axis=0)].any(axis=1), [0]]).astype(int))
    lengths = np.flatnonzero(runs == -1) - np.flatnonzero(runs == 1)
    assert np.all(lengths >= 3)
    # The same seed gives the same losses
    np.testing.assert_array_equal(lost, burst.lost(5000, 16))
    with pytest.raises(ValueError):
        HeapLossModel(random_rate=1.5)


def test_truth_file(setup, tmp_path):
    array, _config, instrument = setup
    times = TIME + np.arange(5) * 60.0
    instrument.write_npz(tmp_path / "truth.npz", times)
    with np.load(tmp_path / "truth.npz") as npz:
        assert list(npz["input_labels"]) == array.input_labels
        np.testing.assert_allclose(npz["gains"], instrument.gains(times))
        np.testing.assert_array_equal(npz["bandpass"], instrument.bandpass)
        np.testing.assert_array_equal(npz["delays"], instrument.delays)
    gains = instrument.gains(times)
    # Slowly varying: changes but only by a few per cent over minutes
    assert 0 < np.abs(gains[1] / gains[0] - 1).max() < 0.1
    # Bandpass rolls off at the band edges
    assert np.all(np.abs(instrument.bandpass[0]) < 0.2)
    assert np.all(np.abs(instrument.bandpass[128]) > 0.8)
