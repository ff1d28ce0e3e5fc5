"""karoo.open on datasets with known content: values, selections, scans, sensors, UVW, errors."""

import pickle

import katpoint
import numpy as np
import pytest

import karoo
from karoo import flags as flag_bits
from karoo.dataset import ChunkReadError, DataSourceNotFound
from karoo.dataset.synthetic import write_dataset

from .conftest import CHUNKS, expected_weights


def test_values_and_metadata(dataset):
    d = karoo.open(dataset.rdb)
    sim = dataset.simulator
    assert d.shape == dataset.vis.shape
    np.testing.assert_array_equal(d.vis[:], dataset.vis)
    np.testing.assert_array_equal(d.raw_flags[:], dataset.flags)
    np.testing.assert_array_equal(d.flags[:], dataset.flags != 0)
    np.testing.assert_allclose(d.weights[:], expected_weights(dataset), rtol=1e-6)
    np.testing.assert_allclose(d.timestamps, sim.dump_times, atol=1e-6)
    np.testing.assert_allclose(d.freqs, sim.config.channel_freqs)
    assert d.channel_width == pytest.approx(sim.config.channel_width)
    assert d.dump_period == pytest.approx(sim.config.dump_period)
    assert [a.name for a in d.ants] == ["m000", "m001", "m002"]
    np.testing.assert_array_equal(d.corr_products, sim.model.products.labels)
    assert [t.name for t in d.catalogue] == ["PKS1934-638", "SIM-GCAL", "SIM-FIELD"]
    assert d.missing_chunks == dict.fromkeys(CHUNKS, 0)
    assert isinstance(d.vis.dask, type(d.vis.dask))
    assert d.vis.dask.chunks[0][0] == 2  # the finest grid (vis) wins


def test_indexing_reads_only_needed_chunks(dataset):
    d = karoo.open(dataset.rdb)
    np.testing.assert_array_equal(d.vis[5, 3:9, [0, 4]], dataset.vis[5, 3:9][:, [0, 4]])
    np.testing.assert_array_equal(d.vis[..., 7], dataset.vis[..., 7])
    graph = d.vis.dask[10:12, 0:16].__dask_graph__()
    graph = dict(graph.cull(set(d.vis.dask[10:12, 0:16].__dask_keys__()[0][0])))
    reads = [k for k in graph if str(k[0]).startswith("karoo-read-correlator_data")]
    assert reads == [(reads[0][0], 5, 0, 0)]


def test_selection(dataset):
    d = karoo.open(dataset.rdb)
    d.select(dumps=slice(10, 20), channels=[1, 5, 6], ants="m001", pol="hh")
    labels = dataset.simulator.model.products.labels
    keep = [k for k, (a, b) in enumerate(labels) if a == b == "m001h"]
    assert d.shape == (10, 3, 1)
    np.testing.assert_array_equal(d.vis[:], dataset.vis[10:20][:, [1, 5, 6]][:, :, keep])
    d.select(corrprods="cross", reset="B")
    assert not any(a[:-1] == b[:-1] for a, b in d.corr_products)
    assert d.shape[:2] == (10, 3)
    d.select(ants="~m000", corrprods="auto")
    assert set(d.corr_products.ravel()) == {"m001h", "m001v", "m002h", "m002v"}
    d.select()
    assert d.shape == dataset.vis.shape
    half = 0.5 * d.channel_width
    d.select(freqrange=(d.freqs[3] - half, d.freqs[6] + half))
    np.testing.assert_array_equal(d.channels, [3, 4, 5, 6])
    t = d.timestamps
    d.select(timerange=(t[4] - 0.25, t[7] + 0.25))
    np.testing.assert_array_equal(d.dumps, [4, 5, 6, 7])
    d.select(flags="cam")
    assert not d.flags[:].any()  # only ingest_rfi bits in the data
    d.select(flags="ingest_rfi")
    np.testing.assert_array_equal(d.flags[:], dataset.flags[4:8, 3:7] != 0)
    with pytest.raises(TypeError, match="unknown keywords"):
        d.select(nonsense=1)
    with pytest.raises(ValueError, match="unknown flag"):
        d.select(flags="bogus")


def test_scans_targets_and_empty_selection(dataset):
    d = karoo.open(dataset.rdb)
    scans = list(d.scans())
    assert [s[1] for s in scans] == ["slew", "track"] * 3
    assert [s[2].name for s in scans[1::2]] == ["PKS1934-638", "SIM-GCAL", "SIM-FIELD"]
    d.select(scans="track", targets="SIM-GCAL")
    assert d.target.name == "SIM-GCAL"
    assert set(d.sensor["Observation/scan_state"]) == {"track"}
    np.testing.assert_array_equal(d.vis[:], dataset.vis[d.dumps])
    d.select(targets="SIM-FIELD", scans="slew", reset="T")
    assert set(d.sensor["cbf_target"]) == {dataset.simulator.observation.scans[4].target}
    d.select(target_tags="bpcal")
    assert {d.catalogue[i].name for i in d.sensor["Observation/target_index"]} == {"PKS1934-638"}
    d.select(compscans="gain")
    assert set(d.sensor["obs_label"]) == {"gain"}
    assert len(list(d.compscans())) == 2  # every label event starts a compound scan
    d.select(dumps=[], reset="T")
    assert d.shape[0] == 0
    assert d.vis[:].shape == (0, 64, 24)
    assert d.target is None
    with pytest.raises(ValueError, match="selection is empty"):
        d.export_source()


def test_sensors(dataset):
    d = karoo.open(dataset.rdb)
    raw = dataset.telstate.get_range("anc_air_temperature", st=0)
    expected = np.interp(d.timestamps, [t for _, t in raw], [v for v, _ in raw])
    np.testing.assert_allclose(d.sensor["anc_air_temperature"], expected)
    np.testing.assert_allclose(d.sensor["Antennas/m000/pos_actual_scan_elev"],
                               d.sensor["m000_pos_actual_scan_elev"])
    activity = d.sensor["obs_activity"]
    starts = dataset.simulator.observation.scan_starts
    scans = dataset.simulator.observation.scans
    half = 0.5 * d.dump_period
    for i, t in enumerate(d.timestamps):
        before = max(np.searchsorted(starts, t - half, side="right") - 1, 0)
        after = max(np.searchsorted(starts, t + half, side="right") - 1, 0)
        states = {scans[k].activity for k in range(before, after + 1)}
        # a dump during which the dish slewed at all is a slew (katdal's greedy rule)
        assert activity[i] == ("slew" if "slew" in states else scans[after].activity)
    names = d.sensor.keys()
    assert "obs_activity" in names and "m000_pos_actual_scan_azim" in names
    with pytest.raises(KeyError):
        d.sensor["no_such_sensor"]


def test_uvw_against_katpoint(dataset):
    d = karoo.open(dataset.rdb)
    d.select(scans=[5], dumps=slice(None, None, 8), reset="")
    target = katpoint.Target(d.target.description)
    ref = katpoint.Antenna(dataset.telstate["m000_observer"])
    array = ref.array_reference_antenna()
    ants = {a.name: katpoint.Antenna(a.description) for a in d.ants}
    for k, (a, b) in enumerate(d.corr_products):
        u, v, w = target.uvw(ants[a[:-1]], d.timestamps, array)
        u2, v2, w2 = target.uvw(ants[b[:-1]], d.timestamps, array)
        expected = np.array([u - u2, v - v2, w - w2])
        got = np.array([d.u[:, k], d.v[:, k], d.w[:, k]])
        np.testing.assert_allclose(got, expected, atol=0.02)  # 2 cm on ~100 m baselines


def test_pickle_and_xarray(dataset):
    d = karoo.open(dataset.rdb)
    d.select(ants=["m000", "m001"], channels=slice(8, 24))
    d2 = pickle.loads(pickle.dumps(d))
    assert d2.shape == d.shape
    np.testing.assert_array_equal(d2.vis[:], d.vis[:])
    assert d2.sensor["obs_activity"][0] == d.sensor["obs_activity"][0]
    views = d.to_xarray()
    assert sorted(views) == list(range(6))
    ds = views[3]
    assert ds.VISIBILITY.dims == ("time", "baseline_id", "frequency", "polarization")
    assert list(ds.polarization.values) == ["XX", "XY", "YX", "YY"]
    assert ds.attrs["field_name"] == "SIM-GCAL"
    nbl = 3  # m000-m000, m000-m001, m001-m001
    assert ds.VISIBILITY.shape == (len(ds.time), nbl, 16, 4)
    labels = [tuple(p) for p in d.corr_products]
    k = labels.index(("m000h", "m001v"))
    first = np.flatnonzero(d2.sensor.get_full("Observation/scan_index") == 3)[0]
    np.testing.assert_array_equal(ds.VISIBILITY.values[0, 1, :, 1],
                                  dataset.vis[first, 8:24][:, d._corrprod_keep][:, k])
    assert ds.UVW.shape == (len(ds.time), nbl, 3)
    np.testing.assert_allclose(ds.UVW.values[:, 0], 0)


def test_distributed_workers(dataset):
    distributed = pytest.importorskip("distributed")
    d = karoo.open(dataset.rdb)
    d.select(dumps=slice(0, 40))
    with distributed.Client(n_workers=1, threads_per_worker=1, processes=True,
                            dashboard_address=None) as client:
        total = client.compute(d.vis.dask.sum()).result()
        remote_shape = client.submit(lambda ds: ds.vis[:2, :3].shape, d).result()
    np.testing.assert_allclose(total, dataset.vis[:40].sum(), rtol=1e-5)
    assert remote_shape == (2, 3, 24)


@pytest.mark.parametrize("shard_chunks", [None, (2, 2)], ids=["chunks", "shards"])
def test_missing_and_corrupt_chunks(tmp_path, shard_chunks):
    """Lost chunks, also inside a shard that was written (its index tells)."""
    def skip(name, index):
        return (name, index) in {("correlator_data", (3, 1, 0)), ("weights_channel", (1, 0))}

    syn = write_dataset(tmp_path, n_ants=2, n_chans=64, chunks=CHUNKS, skip_chunks=skip,
                        shard_chunks=shard_chunks)
    d = karoo.open(syn.rdb)
    assert d.missing_chunks == {"correlator_data": 1, "flags": 0, "weights": 0,
                                "weights_channel": 1}
    raw = d.raw_flags[:]
    np.testing.assert_array_equal(raw, d.raw_flags.dask.compute())
    np.testing.assert_array_equal(d.weights[:], d.weights.dask.compute())
    lost = np.zeros(raw.shape[:2], bool)
    lost[6:8, 16:32] = True  # vis chunk (3, 1)
    lost[16:32, :] = True  # weights_channel chunk (1, 0)
    assert np.all(raw[lost] & flag_bits.DATA_LOST)
    np.testing.assert_array_equal(raw[~lost], syn.flags[~lost])
    vis = d.vis[:]
    assert np.all(vis[6:8, 16:32] == 0)
    np.testing.assert_array_equal(vis[~lost], syn.vis[~lost])
    if shard_chunks:
        return  # the corrupt object below is a plain chunk
    # a chunk that exists but is garbage is an error, not lost data
    chunk = next((tmp_path / f"{syn.capture_block_id}-sdp-l0" / "flags").rglob("c/0/0/0"))
    chunk.write_bytes(b"not zstd")
    d = karoo.open(syn.rdb)
    with pytest.raises(ChunkReadError, match=r"flags\[0:4, 0:32, 0:\d+\] .* exists but"):
        d.flags[0]


def test_rdb_without_chunk_info_and_bad_sources(tmp_path, dataset):
    syn = write_dataset(tmp_path, n_ants=2, n_chans=32, chunk_info=False)
    with pytest.raises(DataSourceNotFound, match="no 1717206000_sdp_l0_chunk_info"):
        karoo.open(syn.rdb, chunk_store=False)
    # with the store named, its own shape is used
    d = karoo.open(syn.rdb, chunk_store=syn.store)
    assert d.shape == (syn.n_dumps, 32, 12)
    np.testing.assert_array_equal(d.vis[:], syn.vis)
    with pytest.raises(DataSourceNotFound, match="no RDB file"):
        karoo.open(tmp_path / "missing.rdb")
    meta_only = karoo.open(dataset.rdb, chunk_store=False)
    assert meta_only.shape == dataset.vis.shape
    with pytest.raises(ValueError, match="metadata only"):
        meta_only.vis[0]
    with pytest.raises(DataSourceNotFound, match="no 1717206000_sdp_l1_chunk_info"):
        karoo.open(dataset.rdb, chunk_store=False, stream_name="sdp_l1")


def test_live_redis(dataset, redis_url):
    from karoo.telstate import TelescopeState

    live = TelescopeState(redis_url)
    live.load_from_file(dataset.rdb)
    d = karoo.open(f"{redis_url}?capture_block_id={dataset.capture_block_id}",
                   chunk_store=dataset.store)
    d.select(dumps=slice(0, 4))
    np.testing.assert_array_equal(d.vis[:], dataset.vis[:4])
    d2 = pickle.loads(pickle.dumps(d))
    assert d2.sensor["obs_activity"][0] == "slew"


@pytest.mark.parametrize("selection", [{}, {"dumps": slice(5, 40), "channels": slice(3, 50)},
                                       {"ants": "m002", "scans": "track"},
                                       {"channels": [1, 5, 6], "corrprods": "cross"}])
def test_direct_reader_matches_dask_graph(dataset, selection):
    d = karoo.open(dataset.rdb)
    d.select(**selection)
    arrays = [d.vis, d.flags, d.raw_flags, d.weights]
    direct = karoo.dataset.get(arrays, np.s_[2:9])
    for array, got in zip(arrays, direct, strict=True):
        np.testing.assert_array_equal(got, array.dask[2:9].compute())
    out = [np.empty_like(x) for x in direct]
    karoo.dataset.get(arrays, np.s_[2:9], out=out)
    for a, b in zip(out, direct, strict=True):
        np.testing.assert_array_equal(a, b)


def test_open_telstate_object(dataset):
    from karoo.telstate import TelescopeState

    ts = TelescopeState()
    ts.load_from_file(dataset.rdb)
    d = karoo.open(ts, chunk_store=dataset.store)
    d.select(dumps=[3, 4], channels=slice(0, 8))
    d2 = pickle.loads(pickle.dumps(d))  # the memory telstate travels with it
    np.testing.assert_array_equal(d2.vis[:], dataset.vis[3:5, :8])
    assert d2.sensor["obs_activity"].shape == (2,)
