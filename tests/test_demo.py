"""``karoo demo`` end to end: a short simulated observation through every part."""

import glob

import numpy as np
from casacore.tables import table

import karoo
from karoo.cli import main
from karoo.flags import DATA_LOST


def test_demo_short_observation(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--antennas", "4", "--channels", "256"]) == 0
    out = capsys.readouterr().out
    assert "delays vs injected truth" in out
    assert "measured flux of SIM-GCAL" in out and "(injected " in out

    (rdb,) = glob.glob(str(tmp_path / "store" / "*" / "*_sdp_l0.full.rdb"))
    assert glob.glob(str(tmp_path / "store" / "*" / "*_sdp_l0.rdb"))  # the light one too
    ds = karoo.open(rdb)
    n_dumps, n_chans, n_corr = ds.shape
    assert (n_chans, n_corr) == (256, 4 * 5 // 2 * 4) and n_dumps >= 20
    assert ds.missing_chunks == {name: 0 for name in ds.missing_chunks}
    assert not (ds.raw_flags[:] & np.uint8(DATA_LOST)).any()
    cbid = ds.capture_block_id
    for product in ("K", "B0", "G"):
        assert f"{cbid}_cal_product_{product}" in ds.telstate

    (ms,) = glob.glob(str(tmp_path / "*.ms"))
    with table(ms, ack=False) as main_table:
        assert "CORRECTED_DATA" in main_table.colnames()
        n_baselines = 4 * 5 // 2
        # only dumps inside a scan are exported, each with every baseline
        assert main_table.nrows() % n_baselines == 0 and main_table.nrows() > 0
    assert glob.glob(str(tmp_path / "cal_reports" / "*" / "*.html"))
