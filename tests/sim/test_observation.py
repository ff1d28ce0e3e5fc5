"""Observation script: telstate keys, sensor timestamps and the dump generator."""

import itertools

import numpy as np
import pytest

from karoo.sim import (
    BPCAL,
    GAINCAL,
    TARGET,
    HeapLossModel,
    NoiseModel,
    Scan,
    Simulator,
    default_script,
    load_rfi_mask,
)

katsdptelstate = pytest.importorskip("katsdptelstate")
katpoint = pytest.importorskip("katpoint")

CBF_CRITICAL = (
    "n_chans",
    "n_chans_per_substream",
    "n_accs",
    "bls_ordering",
    "bandwidth",
    "center_freq",
    "input_labels",
    "sync_time",
    "int_time",
    "scale_factor_timestamp",
    "ticks_between_spectra",
)
SCRIPT = [
    Scan("slew", BPCAL.description, 4.0),
    Scan("track", BPCAL.description, 10.0, "bandpass"),
    Scan("slew", GAINCAL.description, 4.0),
    Scan("track", GAINCAL.description, 6.0, "gain"),
    Scan("track", TARGET.description, 6.0, "target"),
]


@pytest.fixture(scope="module")
def sim():
    return Simulator.create(
        n_ants=4,
        n_chans=256,
        script=SCRIPT,
        noise=NoiseModel(snr=50.0),
        heap_loss=HeapLossModel(random_rate=0.1, seed=1),
        seed=2,
    )


@pytest.fixture(scope="module")
def telstate(sim):
    ts = katsdptelstate.TelescopeState()
    sim.write_telstate(ts, capture_block_id="1717206000", sensor_period=2.0)
    return ts


def test_cbf_keys(sim, telstate):
    bcp = sim.config.bcp_stream
    view = telstate.view(bcp)
    for key in CBF_CRITICAL:
        assert telstate.key_type(f"{bcp}_{key}") == katsdptelstate.KeyType.IMMUTABLE
        assert key in view
    assert view["n_chans"] == 256 and isinstance(view["n_chans"], int)
    assert view["n_accs"] % 256 == 0
    assert view["int_time"] == pytest.approx(
        view["n_accs"] * view["ticks_between_spectra"] / view["scale_factor_timestamp"]
    )
    assert view["n_chans"] % view["n_chans_per_substream"] == 0
    bls = view["bls_ordering"]
    assert isinstance(bls, np.ndarray) and bls.shape == (2 * 4 * 5, 2)
    assert tuple(bls[3]) == ("m000h", "m000h")
    assert list(view["input_labels"]) == [
        "m000h",
        "m000v",
        "m001h",
        "m001v",
        "m002h",
        "m002v",
        "m003h",
        "m003v",
    ]
    assert view["sync_time"] == sim.sync_time
    assert view["bandwidth"] == 856e6 and view["center_freq"] == 1284e6
    # The same values at the levels a real CBF writes them
    acv = sim.config.acv_stream
    assert telstate[f"{bcp}_src_streams"] == [acv]
    assert telstate[f"{acv}_instrument_dev_name"] == "i0"
    assert telstate["i0_scale_factor_timestamp"] == 1712e6
    assert telstate[f"{acv}_ticks_between_spectra"] == 512


def test_cam_keys(sim, telstate):
    assert telstate["sub_band"] == "l"
    assert telstate["sub_product"] == "c856M256"
    assert telstate["sub_pool_resources"].split(",")[2:] == ["m000", "m001", "m002", "m003"]
    for ant in sim.array.antennas:
        kp = katpoint.Antenna(telstate[f"{ant.name}_observer"])
        np.testing.assert_allclose(kp.position_enu, ant.enu)
    params = telstate["1717206000_obs_params"]
    assert params["ants"] == "m000,m001,m002,m003"


def test_sensors_follow_script(sim, telstate):
    starts = sim.observation.scan_starts
    activity = telstate.get_range("1717206000_obs_activity", st=0)
    assert [a for a, _ in activity] == ["slew", "track", "slew", "track", "track", "stop"]
    np.testing.assert_allclose([t for _, t in activity], [*starts, sim.observation.end_time])
    targets = telstate.get_range("cbf_target", st=0)
    assert [katpoint.Target(v).name for v, _ in targets] == [
        "PKS1934-638",
        "PKS1934-638",
        "SIM-GCAL",
        "SIM-GCAL",
        "SIM-FIELD",
    ]
    assert "bpcal" in katpoint.Target(targets[0][0]).tags
    assert "delaycal" in katpoint.Target(targets[0][0]).tags
    for ant in sim.array.names:
        assert telstate.get_range(f"{ant}_target", st=0) == targets
        assert [a for a, _ in telstate.get_range(f"{ant}_activity", st=0)] == [
            a for a, _ in activity
        ]
    labels = telstate.get_range("1717206000_obs_label", st=0)
    assert [v for v, _ in labels] == ["bandpass", "gain", "target"]
    # The value at a time inside the 2nd scan is 'track' on the bpcal
    t = starts[1] + 1.0
    ((value, ts),) = telstate.get_range("1717206000_obs_activity", et=t, include_previous=True)
    assert value == "track" and ts == starts[1]
    log = telstate.get_range("1717206000_obs_script_log", st=0)
    assert any("Tracking PKS1934-638" in line for line, _ in log)


def test_pointing_and_weather(sim, telstate):
    elev = telstate.get_range("m000_pos_actual_scan_elev", st=0)
    azim = telstate.get_range("m001_pos_actual_scan_azim", st=0)
    duration = sim.observation.end_time - sim.observation.start_time
    assert len(elev) == len(azim) == int(duration) // 2 + 1
    ref = katpoint.Antenna(sim.array.reference_description)
    value, t = elev[3]
    target = katpoint.Target(telstate.get_range("cbf_target", et=t, include_previous=True)[0][0])
    assert value == pytest.approx(np.degrees(target.azel(t, ref)[1]), abs=1e-3)
    for key in (
        "anc_air_temperature",
        "anc_air_pressure",
        "anc_air_relative_humidity",
        "anc_mean_wind_speed",
        "anc_wind_direction",
    ):
        assert isinstance(telstate.get_range(key, st=0)[0][0], float)


def test_dumps(sim):
    cfg = sim.config
    dumps = list(sim.dumps(0, 3))
    assert [d.index for d in dumps] == [0, 1, 2]
    ticks = cfg.ticks_per_dump
    assert dumps[0].timestamp % ticks == 0
    assert all(b.timestamp - a.timestamp == ticks for a, b in itertools.pairwise(dumps))
    assert dumps[0].time == pytest.approx(
        sim.sync_time + (dumps[0].timestamp + ticks / 2) / cfg.band.adc_sample_rate
    )
    assert sim.observation.start_time <= dumps[0].time - cfg.dump_period / 2
    d = dumps[1]
    assert d.data.dtype == np.int32 and d.data.shape == (256, 40, 2)
    assert d.lost.shape == (cfg.n_substreams,) and d.lost.dtype == bool
    assert d.rfi_mask.shape == (256, 40)
    first, heap = d.heap(2)
    assert first == 2 * cfg.n_chans_per_substream and heap.flags.c_contiguous
    assert np.shares_memory(heap, d.data)
    # Whole observation fits in the script
    assert sim.dump_time(sim.n_dumps - 1) + cfg.dump_period / 2 <= sim.observation.end_time + 1e-6
    with pytest.raises(IndexError):
        sim.dump(sim.n_dumps)
    # The same dump twice is identical (deterministic noise/RFI)
    np.testing.assert_array_equal(sim.dump(1).data, d.data)


def test_slew_has_no_source_and_track_has_it(sim):
    p = sim.model.products
    cross = p.is_parallel & ~p.is_auto
    slew = sim.dump(1).data  # inside the first 4 s slew
    track = sim.dump(10).data  # on PKS1934-638

    def amp(d):
        return np.abs(d[..., 0] + 1j * d[..., 1])[:, cross].mean() / sim.model.count_scale

    assert amp(track) > 5 * amp(slew)


def test_truth_and_rfi_files(sim, tmp_path):
    sim.write_truth(tmp_path / "truth.npz")
    sim.write_rfi_mask(tmp_path / "rfi.npz")
    with np.load(tmp_path / "truth.npz") as npz:
        assert npz["gains"].shape == (sim.n_dumps, 8)
    mask = load_rfi_mask(tmp_path / "rfi.npz")
    assert mask.shape == (sim.n_dumps, 256, 40)
    np.testing.assert_array_equal(mask[5], sim.dump(5).rfi_mask)


def test_bad_script_rejected():
    with pytest.raises(ValueError):
        Scan("dance", BPCAL.description, 1.0)
    with pytest.raises(ValueError):
        Scan("track", "nonsense", 1.0)
    assert len(default_script()) == 8
