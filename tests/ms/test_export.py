"""export_ms: whole, slice k of N, N slices on dask.distributed, calibrated columns.

The sources are Dask arrays over a Zarr store on disk, so the parallel export pickles them to
real worker processes the way a reader's lazy arrays travel.
"""

from __future__ import annotations

import pickle
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from casacore import tables

from karoo.ms import MSLayout, Scan, concat_slices, export_ms, plan_export, write_ms

from .conftest import N_DUMPS, calibration_gains, make_observation, zarr_source
from .test_slicing import SUBTABLES, assert_tables_equal


def open_table(path, sub=None):
    return tables.table(str(path) + (f"::{sub}" if sub else ""), ack=False)


def assert_ms_equal(a_path, b_path, subtables=SUBTABLES):
    with open_table(a_path) as a, open_table(b_path) as b:
        assert a.nrows() > 0
        assert_tables_equal(a, b)
    for sub in subtables:
        with open_table(a_path, sub) as a, open_table(b_path, sub) as b:
            assert_tables_equal(a, b)


@pytest.fixture
def source(obs, tmp_path):
    return zarr_source(obs, tmp_path / "store.zarr")[0]


def test_whole_export_equals_writer(obs, source, tmp_path, capsys):
    reference = write_ms(tmp_path / "ref.ms", obs.meta, obs.vis, obs.flags, obs.weights)
    result = export_ms(source, tmp_path / "whole.ms", progress=True)
    assert "dump" in capsys.readouterr().err  # the tqdm bar
    assert result.path == tmp_path / "whole.ms"
    assert result.n_rows == N_DUMPS * 10
    assert result.nbytes == N_DUMPS * source.bytes_per_dump
    assert_ms_equal(reference, result.path)
    # one dump per block reads the same
    small = export_ms(source, tmp_path / "small.ms", chunk_bytes=1, progress=False)
    assert_ms_equal(reference, small.path)
    assert not (tmp_path / "whole.ms.partial").exists()


def test_source_pickles(source):
    again = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(np.asarray(again.vis[3:5]), np.asarray(source.vis[3:5]))


def test_parallel_slices_equal_whole(source, tmp_path):
    """3 slices on 2 local dask.distributed workers, concatenated: the whole export exactly."""
    whole = export_ms(source, tmp_path / "whole.ms", progress=False).path
    out = tmp_path / "out" / "par.ms"
    out.parent.mkdir()
    result = export_ms(source, out, n_slices=3, n_workers=2, progress=False)
    assert result.path == out
    assert [s.dumps for s in result.slices] == [range(0, 4), range(4, 7), range(7, 10)]
    assert all(s.path.parent == tmp_path / "out" / "par.ms.slices" for s in result.slices)
    assert_ms_equal(whole, out)
    for part in result.slices:
        with open_table(part.path) as t:
            assert t.nrows() == part.n_rows
        for sub in SUBTABLES:  # every slice carries the global subtables
            with open_table(whole, sub) as a, open_table(part.path, sub) as b:
                assert_tables_equal(a, b)
    # the concatenation refers to its parts relatively: moving both keeps it readable
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "out", moved)
    assert_ms_equal(whole, moved / "par.ms")
    # an existing output is not overwritten unless asked
    with pytest.raises(FileExistsError):
        export_ms(source, moved / "par.ms", n_slices=3, progress=False)


def test_slice_reads_only_its_dumps(obs, tmp_path):
    """Chunks of other dumps are corrupted on disk: slice k must not touch them."""
    source, group = zarr_source(obs, tmp_path / "store.zarr", chunk_dumps=1)
    whole = export_ms(source, tmp_path / "whole.ms", progress=False).path
    plan = plan_export(source, 3)
    k = 1
    dumps = plan[k]
    store = Path(group.store.root)
    corrupted = 0
    for chunk in store.glob("*/c/*/0/0"):
        if int(chunk.parent.parent.name) not in dumps:
            chunk.write_bytes(b"not a chunk")
            corrupted += 1
    assert corrupted == 3 * (N_DUMPS - len(dumps))
    with pytest.raises(Exception):  # noqa: B017 - the corruption is real: a full read fails
        np.asarray(source.vis[0])
    result = export_ms(source, tmp_path / "s1.ms", n_slices=3, slice_index=k, progress=False)
    nbl = MSLayout.from_input(obs.meta).n_baselines
    rows = slice(dumps[0] * nbl, (dumps[-1] + 1) * nbl)
    with open_table(whole) as a, open_table(result.path) as b:
        assert b.nrows() == len(dumps) * nbl
        for name in a.colnames():
            if name != "FLAG_CATEGORY":
                x, y = a.getcol(name)[rows], b.getcol(name)
                assert np.array_equal(x, y, equal_nan=x.dtype.kind in "fc"), name


def test_slices_concatenate_around_slews(tmp_path):
    """Dumps outside every scan (slews) are not exported; slices still tile the scans."""
    obs = make_observation(n_dumps=14)
    meta = replace(obs.meta, scans=[Scan(1, 5, 0, "CALIBRATE_BANDPASS#ON_SOURCE"), Scan(7, 13, 1)])
    obs = replace(obs, meta=meta)
    source = zarr_source(obs, tmp_path / "store.zarr", chunk_dumps=3)[0]
    whole = export_ms(source, tmp_path / "whole.ms", progress=False).path
    plan = plan_export(source, 4)
    assert np.array_equal(np.concatenate(plan), [1, 2, 3, 4, 7, 8, 9, 10, 11, 12])
    parts = [
        export_ms(source, tmp_path / f"s{k}.ms", n_slices=4, slice_index=k, progress=False).path
        for k in range(4)
    ]
    concat = concat_slices(parts, tmp_path / "concat.ms")
    assert_ms_equal(whole, concat)
    with open_table(whole) as t:
        times = np.unique(t.getcol("TIME"))
        assert len(times) == 10
        assert sorted(set(t.getcol("SCAN_NUMBER"))) == [1, 2]


@pytest.mark.parametrize("calibrated", ["CORRECTED_DATA", "DATA"])
def test_calibrated_columns(obs, tmp_path, calibrated):
    source = zarr_source(obs, tmp_path / "store.zarr", calibrated=True)[0]
    path = export_ms(source, tmp_path / "cal.ms", calibrated=calibrated, progress=False).path
    gain = calibration_gains(obs.vis.shape[2])
    # the expected MS: the raw writer on corrected or raw inputs
    corrected = (obs.vis * gain).astype(np.complex64)
    cal_weights = (obs.weights / np.abs(gain) ** 2).astype(np.float32)
    raw = write_ms(tmp_path / "raw.ms", obs.meta, obs.vis, obs.flags, obs.weights)
    cal = write_ms(tmp_path / "calref.ms", obs.meta, corrected, obs.flags, cal_weights)
    with open_table(path) as t, open_table(raw) as r, open_table(cal) as c:
        for name in ("WEIGHT", "WEIGHT_SPECTRUM", "FLAG", "UVW", "TIME"):
            np.testing.assert_array_equal(t.getcol(name), c.getcol(name), err_msg=name)
        if calibrated == "CORRECTED_DATA":
            np.testing.assert_array_equal(t.getcol("DATA"), r.getcol("DATA"))
            np.testing.assert_array_equal(t.getcol("CORRECTED_DATA"), c.getcol("DATA"))
            sigma_from = r  # SIGMA* describe the raw DATA (CASA's convention)
        else:
            assert "CORRECTED_DATA" not in t.colnames()
            np.testing.assert_array_equal(t.getcol("DATA"), c.getcol("DATA"))
            sigma_from = c
        for name in ("SIGMA", "SIGMA_SPECTRUM"):
            np.testing.assert_array_equal(t.getcol(name), sigma_from.getcol(name), err_msg=name)
        # the calibration really changed the weights (the comparison can fail)
        assert not np.array_equal(t.getcol("WEIGHT"), r.getcol("WEIGHT"))


class Unpicklable:
    """An array-like that cannot travel to a worker."""

    def __init__(self, array):
        self.array, self.lock = array, threading.Lock()
        self.shape, self.dtype = array.shape, array.dtype

    def __getitem__(self, index):
        return self.array[index]


def test_bad_requests(obs, source, tmp_path):
    with pytest.raises(ValueError, match=r"source\.vis has shape"):
        export_ms(replace(source, vis=source.vis[:5]), tmp_path / "x.ms", progress=False)
    with pytest.raises(ValueError, match="calibrated_weights given without"):
        export_ms(replace(source, calibrated_weights=source.weights), tmp_path / "x.ms")
    with pytest.raises(ValueError, match="slice_index needs n_slices"):
        export_ms(source, tmp_path / "x.ms", slice_index=0)
    with pytest.raises(ValueError, match="slice_index must be in"):
        export_ms(source, tmp_path / "x.ms", n_slices=3, slice_index=3)
    with pytest.raises(ValueError, match="calibrated must be"):
        export_ms(source, tmp_path / "x.ms", calibrated="MODEL_DATA")
    with pytest.raises(TypeError, match="does not pickle"):
        export_ms(replace(source, vis=Unpicklable(obs.vis)), tmp_path / "x.ms", n_slices=2)
    assert not (tmp_path / "x.ms").exists()
    # unpicklable array-likes are fine in-process
    export_ms(replace(source, vis=Unpicklable(obs.vis)), tmp_path / "x.ms", progress=False)
    with pytest.raises(FileExistsError):
        export_ms(source, tmp_path / "x.ms", progress=False)
    export_ms(source, tmp_path / "x.ms", progress=False, overwrite=True)
