"""The real katdal reads karoo's Zarr stores through the adapter and agrees with karoo.open."""

import katdal
import numpy as np
import pytest

import karoo
from karoo.dataset.katdal_adapter import KatdalZarrStore
from karoo.dataset.synthetic import write_dataset

from .conftest import CHUNKS


def _same(kd, d):
    np.testing.assert_array_equal(kd.vis[:], d.vis[:])
    np.testing.assert_array_equal(kd.flags[:], d.flags[:])
    np.testing.assert_allclose(kd.weights[:], d.weights[:], rtol=1e-6)


def test_katdal_reads_karoo_store(dataset):
    kd = katdal.open(dataset.rdb, chunk_store=KatdalZarrStore(dataset.store))
    d = karoo.open(dataset.rdb)
    assert kd.shape == d.shape
    np.testing.assert_allclose(kd.timestamps, d.timestamps)
    np.testing.assert_allclose(kd.freqs, d.freqs)
    _same(kd, d)
    for sel in ({"scans": "track", "ants": "m001"}, {"channels": slice(5, 40), "pol": "hv"},
                {"corrprods": "cross", "dumps": slice(3, 50)}):
        kd.select(**sel)
        d.select(**sel)
        assert kd.shape == d.shape
        _same(kd, d)
        np.testing.assert_allclose(kd.u, d.u, atol=0.02)
        np.testing.assert_allclose(kd.w, d.w, atol=0.02)
    kd.select()
    d.select()
    for name in ("Observation/scan_index", "Observation/scan_state", "Observation/label",
                 "Observation/compscan_index", "Observation/target_index"):
        np.testing.assert_array_equal(np.asarray(kd.sensor[name]), d.sensor[name])
    for name in ("anc_air_temperature", "m001_pos_actual_scan_elev"):
        np.testing.assert_allclose(kd.sensor[name], d.sensor[name])


@pytest.mark.parametrize("shard_chunks", [None, (2, 2)], ids=["chunks", "shards"])
def test_katdal_and_karoo_agree_on_lost_chunks(tmp_path, shard_chunks):
    def skip(name, index):
        return (name, index) in {("correlator_data", (5, 2, 0)), ("weights", (1, 1, 0)),
                                 ("flags", (2, 0, 0))}

    syn = write_dataset(tmp_path, n_ants=2, n_chans=64, chunks=CHUNKS, skip_chunks=skip,
                        shard_chunks=shard_chunks)
    kd = katdal.open(syn.rdb, chunk_store=KatdalZarrStore(syn.store))
    d = karoo.open(syn.rdb)
    assert d.missing_chunks["correlator_data"] == 1
    kd.select(flags="data_lost")
    d.select(flags="data_lost")
    assert d.flags[:].any()
    _same(kd, d)


def test_adapter_errors(dataset):
    store = KatdalZarrStore(dataset.store)
    prefix = f"{dataset.capture_block_id}-sdp-l0"
    chunk = store.get_chunk(f"{prefix}/flags", (slice(0, 4), slice(0, 32), slice(0, 24)),
                            np.uint8)
    np.testing.assert_array_equal(chunk, dataset.flags[:4, :32])
    with pytest.raises(katdal.chunkstore.BadChunk):
        store.get_chunk(f"{prefix}/flags", (slice(1, 5), slice(0, 32), slice(0, 24)), np.uint8)
    with pytest.raises(katdal.chunkstore.BadChunk):
        store.get_chunk(f"{prefix}/flags", (slice(0, 4), slice(0, 32), slice(0, 24)), np.float32)
    with pytest.raises(katdal.chunkstore.ChunkNotFound):
        store.get_chunk(f"{prefix}/nothing", (slice(0, 4), slice(0, 32), slice(0, 24)), np.uint8)
    with pytest.raises(katdal.chunkstore.StoreUnavailable):
        store.get_chunk("no-such-prefix/flags", (slice(0, 4), slice(0, 32), slice(0, 24)),
                        np.uint8)
