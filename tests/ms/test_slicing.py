"""Time slices of an export, concatenated with casacore, equal the whole export."""

from __future__ import annotations

import itertools
import shutil
import subprocess

import numpy as np
import pytest
from casacore import tables

from karoo.ms import concat_slices, plan_slices, write_ms

from .conftest import N_DUMPS

SUBTABLES = (
    "ANTENNA",
    "DATA_DESCRIPTION",
    "FEED",
    "FIELD",
    "HISTORY",
    "OBSERVATION",
    "POLARIZATION",
    "SOURCE",
    "SPECTRAL_WINDOW",
    "STATE",
)


def test_plan_slices_even_and_weighted():
    assert plan_slices(10, 100, 3) == [range(0, 4), range(4, 7), range(7, 10)]
    assert plan_slices(10, 1, 1) == [range(0, 10)]
    assert plan_slices(4, 1, 9) == [range(i, i + 1) for i in range(4)]
    assert plan_slices(0, 1, 3) == []
    # the first half of the dumps is three times bigger: more, smaller slices there
    sizes = np.array([3.0] * 6 + [1.0] * 6)
    slices = plan_slices(12, sizes, 4)
    assert [len(s) for s in slices] == [2, 2, 2, 6]
    # a big dump at the start still leaves a dump for every later slice
    assert plan_slices(4, [100, 1, 1, 1], 3) == [range(0, 1), range(1, 2), range(2, 4)]
    assert plan_slices(3, 0, 2) == [range(0, 2), range(2, 3)]
    with pytest.raises(ValueError):
        plan_slices(5, -1, 2)
    with pytest.raises(ValueError):
        plan_slices(5, 1, 0)


@pytest.mark.parametrize("n_dumps, n_slices", [(37, 5), (100, 7), (7, 7), (50, 1)])
def test_plan_slices_cover_once(n_dumps, n_slices):
    rng = np.random.default_rng(n_dumps)
    slices = plan_slices(n_dumps, rng.uniform(0, 10, n_dumps), n_slices)
    assert len(slices) == min(n_dumps, n_slices)
    assert slices[0].start == 0 and slices[-1].stop == n_dumps
    assert all(len(s) > 0 for s in slices)
    assert all(a.stop == b.start for a, b in itertools.pairwise(slices))


def assert_tables_equal(a: tables.table, b: tables.table, skip=("FLAG_CATEGORY",)) -> None:
    assert a.nrows() == b.nrows()
    assert sorted(a.colnames()) == sorted(b.colnames())
    for name in a.colnames():
        if name in skip or a.nrows() == 0:
            continue
        if a.isvarcol(name):
            for row in range(a.nrows()):
                x, y = a.getcell(name, row), b.getcell(name, row)
                same = np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
                assert same, (name, row)
            continue
        x, y = a.getcol(name), b.getcol(name)
        if isinstance(x, list):
            assert x == y, name
        else:
            assert x.dtype == y.dtype, name
            assert np.array_equal(x, y, equal_nan=x.dtype.kind in "fc"), name


@pytest.fixture
def whole_and_parts(obs, tmp_path):
    meta = obs.meta
    whole = write_ms(tmp_path / "whole.ms", meta, obs.vis, obs.flags, obs.weights, chunk_dumps=4)
    bytes_per_dump = obs.vis[0].nbytes + obs.flags[0].nbytes + obs.weights[0].nbytes
    slices = plan_slices(meta.n_dumps, bytes_per_dump, 3)
    assert [len(s) for s in slices] == [4, 3, 3]
    parts = [
        # a different chunking per slice must not matter either
        write_ms(
            tmp_path / f"part{k}.ms", meta, obs.vis, obs.flags, obs.weights, dumps=s, chunk_dumps=2
        )
        for k, s in enumerate(slices)
    ]
    return whole, parts


def test_concatenated_slices_equal_whole(whole_and_parts, tmp_path):
    whole, parts = whole_and_parts
    concat = concat_slices(parts, tmp_path / "concat.ms")
    with (
        tables.table(str(whole), ack=False) as a,
        tables.table(str(concat), ack=False) as b,
    ):
        assert a.nrows() > 0
        assert_tables_equal(a, b)
        # Infinite sigmas and zero weights really are in there (the comparison sees them)
        assert np.isinf(b.getcol("SIGMA_SPECTRUM")).any()
    for sub in SUBTABLES:
        with tables.table(f"{whole}::{sub}", ack=False) as a:
            for part in parts:
                with tables.table(f"{part}::{sub}", ack=False) as b:
                    assert_tables_equal(a, b)
    # each part holds its own dumps with global ids
    with tables.table(str(parts[1]), ack=False) as t:
        assert sorted(set(t.getcol("SCAN_NUMBER"))) == [2]
        assert sorted(set(t.getcol("FIELD_ID"))) == [1]


def test_slice_differs_when_ids_differ(whole_and_parts, tmp_path):
    """The comparison can fail: swapping two parts breaks TIME and SCAN_NUMBER."""
    whole, parts = whole_and_parts
    concat = concat_slices([parts[1], parts[0], parts[2]], tmp_path / "swapped.ms")
    with (
        tables.table(str(whole), ack=False) as a,
        tables.table(str(concat), ack=False) as b,
        pytest.raises(AssertionError, match=r"TIME|SCAN|DATA|FIELD|FLAG|UVW|WEIGHT|SIGMA|STATE"),
    ):
        assert_tables_equal(a, b)


def test_casacore_tools_read_ms(whole_and_parts, tmp_path):
    """casacore-tools (Debian package) read the export: taql counts, showtableinfo storage."""
    taql = shutil.which("taql")
    showtableinfo = shutil.which("showtableinfo")
    if taql is None or showtableinfo is None:
        pytest.skip(
            "casacore-tools (taql, showtableinfo) not installed: apt-get install casacore-tools"
        )
    whole, parts = whole_and_parts
    concat = concat_slices(parts, tmp_path / "concat.ms")
    for ms in (whole, concat):
        result = subprocess.run(
            [taql, f"select gcount() as N from {ms} groupby TIME having gcount() != 10"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert "select result of 0 rows" in result.stdout, result.stdout
        result = subprocess.run(
            [
                taql,
                f"select from {ms} where ANTENNA1 > ANTENNA2"
                f" or FIELD_ID not in [select rowid() from {ms}::FIELD]"
                f" or STATE_ID not in [select rowid() from {ms}::STATE]",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert "select result of 0 rows" in result.stdout, result.stdout
        result = subprocess.run(
            [taql, f"select from {ms}"], capture_output=True, text=True, timeout=60, check=True
        )
        assert f"select result of {N_DUMPS * 10} rows" in result.stdout, result.stdout
    info = subprocess.run(
        [showtableinfo, f"in={whole}", "dm=true"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "TiledColumnStMan" in info
    assert "DATA" in info and "WEIGHT_SPECTRUM" in info
