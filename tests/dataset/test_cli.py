"""``karoo ls`` and ``karoo export-ms`` on a dataset with known content."""

import numpy as np
from casacore import tables

from karoo.cli import main


def test_ls(dataset, capsys):
    assert main(["ls", dataset.rdb, "--ants", "m000,m001"]) == 0
    out = capsys.readouterr().out
    assert "Antennas: 2  m000 m001" in out
    assert "PKS1934-638" in out and "SIM-FIELD" in out
    assert "track" in out and "Shape (dumps, channels, corrprods)" in out


def test_export_ms(dataset, tmp_path):
    out = tmp_path / "obs.ms"
    assert main(["export-ms", dataset.rdb, str(out), "--target", "SIM-GCAL", "--channels",
                 "4~19", "--pol", "HH,VV", "--no-progress"]) == 0
    import karoo

    d = karoo.open(dataset.rdb)
    d.select(targets="SIM-GCAL", scans=["track", "scan"])
    n_dumps = d.shape[0]
    ms = tables.table(str(out), ack=False)
    assert ms.nrows() == n_dumps * 6  # 3 ants: 6 baselines with autos
    data = ms.getcol("DATA")
    assert data.shape == (n_dumps * 6, 16, 2)
    field = tables.table(str(out / "FIELD"), ack=False)
    assert list(field.getcol("NAME")) == ["SIM-GCAL"]
    # the row of baseline m000-m001 of the first dump holds the stored hh visibility
    labels = [tuple(p) for p in dataset.simulator.model.products.labels]
    a1, a2 = ms.getcol("ANTENNA1"), ms.getcol("ANTENNA2")
    row = int(np.flatnonzero((a1 == 0) & (a2 == 1))[0])
    k = labels.index(("m000h", "m001h"))
    np.testing.assert_array_equal(data[row, :, 0], dataset.vis[d.dumps[0], 4:20, k])
    ms.close()
    field.close()


def test_export_ms_parallel_slices_equal_whole(dataset, tmp_path):
    args = [dataset.rdb, "--channels", "0:16", "--ants", "m000,m001", "--no-progress"]
    assert main(["export-ms", *args[:1], str(tmp_path / "whole.ms"), *args[1:]]) == 0
    assert main(["export-ms", *args[:1], str(tmp_path / "par.ms"), *args[1:],
                 "--slices", "2"]) == 0
    with tables.table(str(tmp_path / "whole.ms"), ack=False) as whole, \
            tables.table(str(tmp_path / "par.ms"), ack=False) as par:
        assert whole.nrows() == par.nrows() > 0
        for column in ("DATA", "FLAG", "WEIGHT_SPECTRUM", "UVW", "TIME", "SCAN_NUMBER"):
            np.testing.assert_array_equal(whole.getcol(column), par.getcol(column))


def test_export_ms_slice_and_empty(dataset, tmp_path, capsys):
    out = tmp_path / "slice.ms"
    assert main(["export-ms", dataset.rdb, str(out), "--slice", "1/3", "--channels", "0:8",
                 "--no-progress"]) == 0
    with tables.table(str(out), ack=False) as ms:
        assert 0 < ms.nrows() < 96 * 6
    assert main(["export-ms", dataset.rdb, str(tmp_path / "none.ms"), "--dumps", "0:2",
                 "--no-progress"]) == 1  # the first dumps are a slew: nothing on source
    assert "selection is empty" in capsys.readouterr().err
