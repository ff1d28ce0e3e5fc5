"""MS v2 writer against real python-casacore tables."""

from __future__ import annotations

import numpy as np
import pytest
from casacore import tables

from karoo.ms import (
    MJD_UNIX_OFFSET,
    DumpBlock,
    MSLayout,
    append_dumps,
    create_ms,
    gather_rows,
    write_ms,
)
from karoo.ms.kernels import block_to_rows

from .conftest import N_ANTS, N_CHANS, N_DUMPS, make_observation

SUBTABLES = (
    "ANTENNA",
    "DATA_DESCRIPTION",
    "FEED",
    "FIELD",
    "FLAG_CMD",
    "HISTORY",
    "OBSERVATION",
    "POINTING",
    "POLARIZATION",
    "PROCESSOR",
    "SPECTRAL_WINDOW",
    "STATE",
)
N_BLS = N_ANTS * (N_ANTS + 1) // 2


def open_table(path, sub=None):
    return tables.table(str(path) + (f"::{sub}" if sub else ""), ack=False)


def expected_rows(obs):
    """MAIN-row arrays computed directly from the labels, one (t, b, p) at a time."""
    meta = obs.meta
    index = {(in1, in2): k for k, (in1, in2) in enumerate(meta.corr_products)}
    pols = [("h", "h"), ("h", "v"), ("v", "h"), ("v", "v")]
    pols = [p for p in pols if any(in1[-1] == p[0] and in2[-1] == p[1] for in1, in2 in index)]
    names = meta.antenna_names
    bls = [(a1, a2) for a1 in range(N_ANTS) for a2 in range(a1, N_ANTS)]
    n_rows = meta.n_dumps * len(bls)
    data = np.zeros((n_rows, N_CHANS, len(pols)), np.complex64)
    flag = np.ones(data.shape, bool)
    weight = np.zeros(data.shape, np.float32)
    row = 0
    for t in range(meta.n_dumps):
        for a1, a2 in bls:
            for p, (p1, p2) in enumerate(pols):
                k = index.get((names[a1] + p1, names[a2] + p2))
                if k is not None:
                    data[row, :, p] = obs.vis[t, :, k]
                    flag[row, :, p] = obs.flags[t, :, k] != 0
                    weight[row, :, p] = obs.weights[t, :, k]
            row += 1
    return bls, pols, data, flag, weight


@pytest.fixture
def ms_path(obs, tmp_path):
    path = tmp_path / "whole.ms"
    with create_ms(path, obs.meta) as ms:
        # two blocks of unequal size, the second through the iterable form
        append_dumps(ms, DumpBlock(0, obs.vis[:3], obs.flags[:3], obs.weights[:3]))
        append_dumps(
            ms, (DumpBlock(3, obs.vis[3:], obs.flags[3:], obs.weights[3:]),), total_dumps=N_DUMPS
        )
    return path


def test_schema(ms_path):
    with open_table(ms_path) as t:
        required = tables.required_ms_desc("MAIN")
        names = set(t.colnames())
        for name in (k for k in required if not k.startswith("_")):
            assert name in names
            assert t.getcoldesc(name)["valueType"] == required[name]["valueType"], name
        for name, vtype in (
            ("DATA", "complex"),
            ("WEIGHT_SPECTRUM", "float"),
            ("SIGMA_SPECTRUM", "float"),
            ("FLAG", "boolean"),
        ):
            desc = t.getcoldesc(name)
            assert desc["valueType"] == vtype
            assert list(desc["shape"]) == [N_CHANS, 4]
        assert "CORRECTED_DATA" not in names
        assert t.getkeyword("MS_VERSION") == 2.0
        time_info = t.getcolkeyword("TIME", "MEASINFO")
        assert time_info["type"] == "epoch" and time_info["Ref"] == "UTC"
        assert t.getcolkeyword("TIME", "QuantumUnits") == ["s"]
        assert t.getcolkeyword("UVW", "MEASINFO")["type"] == "uvw"
        assert t.getcolkeyword("DATA", "UNIT") == "Jy"
        keywords = t.getkeywords()
        for sub in (*SUBTABLES, "SOURCE"):
            assert sub in keywords, sub
            with open_table(ms_path, sub) as s:
                s.nrows()
        tiled = {}
        for dm in t.getdminfo().values():
            if dm["TYPE"] == "TiledColumnStMan":
                (column,) = dm["COLUMNS"]
                tiled[column] = list(dm["SPEC"]["DEFAULTTILESHAPE"])
        expected = {"DATA", "FLAG", "UVW", "WEIGHT", "SIGMA", "WEIGHT_SPECTRUM", "SIGMA_SPECTRUM"}
        assert set(tiled) == expected
        for column in ("DATA", "FLAG", "WEIGHT_SPECTRUM", "SIGMA_SPECTRUM"):
            assert tiled[column][:2] == [4, N_CHANS]
        for shape in tiled.values():
            assert shape[-1] % N_BLS == 0  # tiles hold whole dumps


def test_row_invariants(ms_path, obs):
    with open_table(ms_path) as t:
        assert t.nrows() == N_DUMPS * N_BLS
        time = t.getcol("TIME")
        np.testing.assert_array_equal(time, np.repeat(obs.meta.timestamps + MJD_UNIX_OFFSET, N_BLS))
        np.testing.assert_array_equal(t.getcol("TIME_CENTROID"), time)
        counts = tables.taql("select gcount() as n from $t groupby TIME").getcol("n")
        assert np.all(counts == N_BLS)
        a1, a2 = t.getcol("ANTENNA1"), t.getcol("ANTENNA2")
        assert np.all(a1 <= a2)
        assert np.sum(a1 == a2) == N_ANTS * N_DUMPS
        pairs = np.stack([time, a1, a2], axis=1)
        assert len(np.unique(pairs, axis=0)) == len(pairs)
        np.testing.assert_array_equal(t.getcol("INTERVAL"), 8.0)
        np.testing.assert_array_equal(t.getcol("EXPOSURE"), 8.0)
        uvw = t.getcol("UVW")
        np.testing.assert_array_equal(uvw[a1 == a2], 0.0)
        for column, sub in (
            ("FIELD_ID", "FIELD"),
            ("STATE_ID", "STATE"),
            ("DATA_DESC_ID", "DATA_DESCRIPTION"),
            ("ANTENNA2", "ANTENNA"),
            ("OBSERVATION_ID", "OBSERVATION"),
        ):
            values = t.getcol(column)
            with open_table(ms_path, sub) as s:
                assert values.min() >= 0 and values.max() < s.nrows(), column
        np.testing.assert_array_equal(t.getcol("PROCESSOR_ID"), -1)
        np.testing.assert_array_equal(t.getcol("FEED1"), 0)
        scan = t.getcol("SCAN_NUMBER").reshape(N_DUMPS, N_BLS)
        np.testing.assert_array_equal(scan[:, 0], [1] * 4 + [2] * 6)
        assert np.all(scan == scan[:, :1])
        np.testing.assert_array_equal(t.getcol("FIELD_ID")[::N_BLS], [0] * 4 + [1] * 6)
        np.testing.assert_array_equal(t.getcol("STATE_ID")[::N_BLS], [0] * 4 + [1] * 6)


def test_content_round_trip(ms_path, obs):
    bls, pols, data, flag, weight = expected_rows(obs)
    assert pols == [("h", "h"), ("h", "v"), ("v", "h"), ("v", "v")]
    with open_table(ms_path) as t:
        np.testing.assert_array_equal(t.getcol("ANTENNA1")[:N_BLS], [b[0] for b in bls])
        np.testing.assert_array_equal(t.getcol("ANTENNA2")[:N_BLS], [b[1] for b in bls])
        np.testing.assert_array_equal(t.getcol("DATA"), data)
        np.testing.assert_array_equal(t.getcol("FLAG"), flag)
        np.testing.assert_array_equal(t.getcol("FLAG_ROW"), flag.all(axis=(1, 2)))
        assert t.getcol("FLAG_ROW").sum() >= 1  # the fully flagged baseline
        np.testing.assert_array_equal(t.getcol("WEIGHT_SPECTRUM"), weight)
        with np.errstate(divide="ignore"):
            np.testing.assert_allclose(t.getcol("SIGMA_SPECTRUM"), 1 / np.sqrt(weight), rtol=1e-6)
            assert np.isinf(t.getcol("SIGMA_SPECTRUM")[weight == 0]).all()
            mean = weight.mean(axis=1)
            np.testing.assert_allclose(t.getcol("WEIGHT"), mean, rtol=1e-6)
            np.testing.assert_allclose(t.getcol("SIGMA"), 1 / np.sqrt(mean), rtol=1e-6)
        # UVW = uvw[ANTENNA1] - uvw[ANTENNA2] from the per-antenna hook
        meta = obs.meta
        field = np.repeat([0, 1], [4, N_DUMPS - 4])
        ant_uvw = meta.antenna_uvw(meta.timestamps, field)
        a1, a2 = np.array(bls).T
        np.testing.assert_allclose(
            t.getcol("UVW"), (ant_uvw[:, a1] - ant_uvw[:, a2]).reshape(-1, 3), rtol=0, atol=1e-9
        )


def test_subtables(ms_path, obs):
    meta = obs.meta
    with open_table(ms_path, "POLARIZATION") as t:
        np.testing.assert_array_equal(t.getcol("CORR_TYPE"), [[9, 10, 11, 12]])
        np.testing.assert_array_equal(t.getcol("CORR_PRODUCT"), [[[0, 0], [0, 1], [1, 0], [1, 1]]])
        assert list(t.getcol("NUM_CORR")) == [4]
    with open_table(ms_path, "SPECTRAL_WINDOW") as t:
        np.testing.assert_array_equal(t.getcol("CHAN_FREQ"), [meta.channel_freqs])
        np.testing.assert_array_equal(t.getcol("CHAN_WIDTH"), 53.5e6)
        np.testing.assert_array_equal(t.getcol("RESOLUTION"), 53.5e6)
        assert list(t.getcol("NUM_CHAN")) == [N_CHANS]
        assert list(t.getcol("MEAS_FREQ_REF")) == [5]
        assert t.getcol("TOTAL_BANDWIDTH")[0] == 53.5e6 * N_CHANS
    with open_table(ms_path, "ANTENNA") as t:
        assert t.getcol("NAME") == list(meta.antenna_names)
        np.testing.assert_array_equal(t.getcol("POSITION"), meta.antenna_positions)
        np.testing.assert_array_equal(t.getcol("DISH_DIAMETER"), 13.5)
        assert set(t.getcol("MOUNT")) == {"ALT-AZ"}
        # ITRF positions lie ~6373 km from the geocentre and keep the ENU baselines
        radius = np.linalg.norm(t.getcol("POSITION"), axis=1)
        assert np.all((radius > 6.37e6) & (radius < 6.38e6))
        pos = t.getcol("POSITION")
        np.testing.assert_allclose(
            np.linalg.norm(pos[1] - pos[0]), np.linalg.norm(obs.enu[1] - obs.enu[0]), rtol=1e-12
        )
    with open_table(ms_path, "FEED") as t:
        assert t.nrows() == N_ANTS
        for row in range(N_ANTS):
            assert list(t.getcell("POLARIZATION_TYPE", row)) == ["X", "Y"]
        np.testing.assert_allclose(t.getcol("RECEPTOR_ANGLE"), -np.pi / 2)
        np.testing.assert_array_equal(t.getcol("SPECTRAL_WINDOW_ID"), -1)
    with open_table(ms_path, "FIELD") as t:
        assert t.getcol("NAME") == ["PKS1934-638", "J0408-6545"]
        expected = [[[tg.ra, tg.dec]] for tg in meta.targets]
        for column in ("PHASE_DIR", "DELAY_DIR", "REFERENCE_DIR"):
            np.testing.assert_array_equal(t.getcol(column), expected)
        assert t.getcolkeyword("PHASE_DIR", "MEASINFO")["Ref"] == "J2000"
    with open_table(ms_path, "STATE") as t:
        assert t.getcol("OBS_MODE") == ["CALIBRATE_BANDPASS#ON_SOURCE", "OBSERVE_TARGET#ON_SOURCE"]
    with open_table(ms_path, "OBSERVATION") as t:
        assert t.getcol("TELESCOPE_NAME") == ["MeerKAT"]
        start = meta.timestamps[0] - 4.0 + MJD_UNIX_OFFSET
        np.testing.assert_array_equal(t.getcol("TIME_RANGE"), [[start, start + 80.0]])
    with open_table(ms_path, "DATA_DESCRIPTION") as t:
        assert list(t.getcol("SPECTRAL_WINDOW_ID")) == [0]
    with open_table(ms_path, "SOURCE") as t:
        assert t.getcol("NAME") == ["PKS1934-638", "J0408-6545"]
    with open_table(ms_path, "HISTORY") as t:
        assert t.getcol("MESSAGE") == ["synthetic observation"]


def test_dual_pol_and_missing_product(tmp_path):
    # hh and vv only, and drop m000h x m001h (CBF pair index 1, pol hh at position 1)
    obs = make_observation(pols=(("v", "v"), ("h", "h")), drop=3)
    assert obs.meta.corr_products[2] == ("m000v", "m001v")
    path = write_ms(tmp_path / "dual.ms", obs.meta, obs.vis, obs.flags, obs.weights, chunk_dumps=4)
    _, pols, data, flag, weight = expected_rows(obs)
    assert pols == [("h", "h"), ("v", "v")]
    with open_table(path, "POLARIZATION") as t:
        np.testing.assert_array_equal(t.getcol("CORR_TYPE"), [[9, 12]])
        np.testing.assert_array_equal(t.getcol("CORR_PRODUCT"), [[[0, 0], [1, 1]]])
    with open_table(path) as t:
        np.testing.assert_array_equal(t.getcol("DATA"), data)
        np.testing.assert_array_equal(t.getcol("FLAG"), flag)
        np.testing.assert_array_equal(t.getcol("WEIGHT_SPECTRUM"), weight)
        missing = t.getcol("FLAG")[1::N_BLS, :, 0]  # baseline (0, 1), pol XX
        assert missing.all()
        assert (t.getcol("DATA")[1::N_BLS, :, 0] == 0).all()
        assert (t.getcol("WEIGHT")[1::N_BLS, 0] == 0).all()


def test_products_with_antennas_the_other_way_round(tmp_path, obs):
    """A correlator that gives (m001, m000) products: the MS holds their conjugates as (m000,
    m001) rows, with the cross hands swapped, the same MS as from the upper triangle."""
    from dataclasses import replace

    swapped = [(in2, in1) if in1[:-1] != in2[:-1] else (in1, in2)
               for in1, in2 in obs.meta.corr_products]
    conj = np.array([a != b for a, b in zip(swapped, obs.meta.corr_products, strict=True)])
    assert conj.sum() > 0 and not conj.all()
    vis = np.where(conj, obs.vis.conj(), obs.vis)
    corrected = 2 * obs.vis

    def write(path, meta, vis, corrected):
        with create_ms(path, meta, corrected_data=True) as ms:
            ms.append(DumpBlock(0, vis, obs.flags, obs.weights, corrected=corrected))
        return path

    upper = write(tmp_path / "upper.ms", obs.meta, obs.vis, corrected)
    lower = write(tmp_path / "lower.ms", replace(obs.meta, corr_products=swapped), vis,
                  np.where(conj, corrected.conj(), corrected))
    with open_table(upper) as a, open_table(lower) as b:
        for column in ("ANTENNA1", "ANTENNA2", "UVW", "DATA", "CORRECTED_DATA", "FLAG",
                       "WEIGHT_SPECTRUM", "SIGMA"):
            np.testing.assert_array_equal(b.getcol(column), a.getcol(column), err_msg=column)
        assert not np.array_equal(b.getcol("DATA"), b.getcol("DATA").conj())


def test_flag_mask_corrected_and_options(tmp_path, obs):
    progress = []
    path = write_ms(
        tmp_path / "opts.ms",
        obs.meta,
        obs.vis,
        obs.flags,
        obs.weights,
        flag_mask=8,
        corrected_data=True,
        spectrum=False,
        source_table=False,
        zero_weight_sigma=-1.0,
        chunk_dumps=3,
        progress=lambda done, total: progress.append((done, total)),
    )
    assert progress == [(3, 10), (6, 10), (9, 10), (10, 10)]
    _, _, data, _, weight = expected_rows(obs)
    # flag bits outside the mask are ignored
    flag_bits = make_flag_bits_rows(obs)
    with open_table(path) as t:
        names = set(t.colnames())
        assert "CORRECTED_DATA" in names and "WEIGHT_SPECTRUM" not in names
        assert "SOURCE" not in t.getkeywords()
        np.testing.assert_array_equal(t.getcol("CORRECTED_DATA"), data)
        np.testing.assert_array_equal(t.getcol("FLAG"), (flag_bits & 8) != 0)
        mean = weight.mean(axis=1)
        sigma = t.getcol("SIGMA")
        np.testing.assert_array_equal(sigma[mean == 0], -1.0)


def make_flag_bits_rows(obs):
    layout = MSLayout.from_input(obs.meta)
    rows = []
    for t in range(obs.meta.n_dumps):
        for b in range(layout.n_baselines):
            rows.append(obs.flags[t][:, layout.corr_index[b]])
    return np.array(rows)


def test_gather_rows_matches_fancy_indexing(obs):
    layout = MSLayout.from_input(obs.meta)
    out = gather_rows(obs.vis, layout.corr_index, 0)
    expected = obs.vis[:, :, layout.corr_index].transpose(0, 2, 1, 3).reshape(out.shape)
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match="correlation products"):
        gather_rows(obs.vis[:, :, :10], layout.corr_index, 0)


def test_bad_input(tmp_path, obs):
    meta = obs.meta
    with create_ms(tmp_path / "bad.ms", meta) as ms:
        with pytest.raises(ValueError, match="shape"):
            ms.append(DumpBlock(0, obs.vis[:2, :8], obs.flags[:2], obs.weights[:2]))
        with pytest.raises(ValueError, match="uvw must have shape"):
            ms.append(DumpBlock(0, obs.vis[:2], obs.flags[:2], obs.weights[:2], uvw=np.zeros(3)))
        ms.append(DumpBlock(2, obs.vis[2:4], obs.flags[2:4], obs.weights[2:4]))
        with pytest.raises(ValueError, match="time order"):
            ms.append(DumpBlock(0, obs.vis[:2], obs.flags[:2], obs.weights[:2]))
        with pytest.raises(ValueError, match="beyond"):
            ms.append(DumpBlock(9, obs.vis[:2], obs.flags[:2], obs.weights[:2]))
    with pytest.raises(FileExistsError):
        create_ms(tmp_path / "bad.ms", meta)

    from dataclasses import replace

    from karoo.ms import Scan

    gap = replace(meta, scans=[Scan(0, 4, 0), Scan(5, N_DUMPS, 1)])
    with create_ms(tmp_path / "gap.ms", gap) as ms, pytest.raises(ValueError, match=r"\[4\]"):
        ms.append(DumpBlock(0, obs.vis, obs.flags, obs.weights))
    for bad, match in (
        (replace(meta, corr_products=[("m009h", "m000h")]), "not in antenna_names"),
        (replace(meta, corr_products=[("m000h", "m001v"), ("m001v", "m000h")]),
         "appears twice"),
        (replace(meta, corr_products=[("m000x", "m000h")]), "MeerKAT pol"),
        (replace(meta, scans=[Scan(0, 11, 0)]), "outside"),
        (replace(meta, scans=[Scan(0, 5, 0), Scan(4, 6, 1)]), "overlaps"),
        (replace(meta, scans=[Scan(0, 5, 2)]), "target 2"),
        (replace(meta, timestamps=meta.timestamps[::-1]), "increasing"),
    ):
        with pytest.raises(ValueError, match=match):
            MSLayout.from_input(bad)
    no_uvw = replace(meta, antenna_uvw=None)
    with create_ms(tmp_path / "nouvw.ms", no_uvw) as ms, pytest.raises(ValueError, match="uvw"):
        ms.append(DumpBlock(0, obs.vis, obs.flags, obs.weights))


def test_partial_until_closed(tmp_path, obs):
    path = tmp_path / "p.ms"
    ms = create_ms(path, obs.meta)
    append_dumps(ms, DumpBlock(0, obs.vis[:2], obs.flags[:2], obs.weights[:2]))
    assert not path.exists() and (tmp_path / "p.ms.partial").is_dir()
    ms.close()
    assert path.is_dir() and not (tmp_path / "p.ms.partial").exists()
    with open_table(path) as t:
        assert t.nrows() == 2 * N_BLS
    with open_table(path, "SOURCE") as t:  # subtable keyword survives the rename
        assert t.nrows() == 2

    with pytest.raises(RuntimeError, match="boom"), create_ms(tmp_path / "x.ms", obs.meta) as ms:
        raise RuntimeError("boom")
    assert not (tmp_path / "x.ms").exists() and not (tmp_path / "x.ms.partial").exists()


def test_block_to_rows_matches_numpy():
    """The fused row kernel against gather_rows plus numpy, with a missing product."""
    obs = make_observation(drop=5)
    layout = MSLayout.from_input(obs.meta)
    rng = np.random.default_rng(3)
    sigma_w = rng.uniform(0.1, 2.0, obs.weights.shape).astype(np.float32)
    sigma_w[0, 0, :3] = 0
    for sw, mask, zero in ((None, 0xFF, np.inf), (sigma_w, 8, -1.0)):
        cols = block_to_rows(
            obs.vis, obs.flags, obs.weights, layout.corr_index,
            sigma_weights=sw, flag_mask=mask, zero_sigma=zero,
        )  # fmt: skip
        idx = layout.corr_index
        np.testing.assert_array_equal(cols["DATA"], gather_rows(obs.vis, idx, 0))
        flag = (gather_rows(obs.flags, idx, 0xFF) & mask) != 0
        np.testing.assert_array_equal(cols["FLAG"], flag)
        np.testing.assert_array_equal(cols["FLAG_ROW"], flag.all(axis=(1, 2)))
        weight = gather_rows(obs.weights, idx, 0)
        np.testing.assert_array_equal(cols["WEIGHT_SPECTRUM"], weight)
        np.testing.assert_allclose(cols["WEIGHT"], weight.mean(axis=1), rtol=1e-6)
        s = weight if sw is None else gather_rows(sw, idx, 0)
        with np.errstate(divide="ignore"):
            expected = np.where(s == 0, np.float32(zero), 1 / np.sqrt(s))
            np.testing.assert_allclose(cols["SIGMA_SPECTRUM"], expected, rtol=1e-6)
            mean = s.mean(axis=1)
            expected = np.where(mean == 0, np.float32(zero), 1 / np.sqrt(mean))
            np.testing.assert_allclose(cols["SIGMA"], expected, rtol=1e-6)
        assert (cols["SIGMA_SPECTRUM"] == zero).any()
    no_spectrum = block_to_rows(obs.vis, obs.flags, obs.weights, idx, spectrum=False)
    assert "WEIGHT_SPECTRUM" not in no_spectrum
    with pytest.raises(ValueError, match="share a"):
        block_to_rows(obs.vis, obs.flags[:2], obs.weights, idx)
