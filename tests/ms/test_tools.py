"""External tools on an exported simulated observation: python-casacore, CASA listobs,
aoflagger and WSClean (Debian), the last imaging a point source at its known position.

Each tool is skipped, with the reason, only when it is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from casacore import tables

from karoo.ms import concat_slices, export_ms

from .conftest import simulated_source

IMAGE_SIZE, PIXEL_ARCSEC = 128, 20.0


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """A 16-antenna snapshot of a 10 Jy point source, exported whole and as 3 slices."""
    tmp = tmp_path_factory.mktemp("sim")
    source, position = simulated_source()
    whole = export_ms(source, tmp / "whole.ms", progress=False).path
    parts = [
        export_ms(source, tmp / f"part{k}.ms", n_slices=3, slice_index=k, progress=False).path
        for k in range(3)
    ]
    concat = concat_slices(parts, tmp / "concat.ms")
    return source, position, whole, concat


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (apt-get install {package})")
    return path


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, (
        f"{cmd[0]} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
    return result


def test_python_casacore_reads_it(sim):
    source, _, whole, _ = sim
    meta = source.meta
    n_dumps = meta.scans[0].stop - meta.scans[0].start
    nbl = meta.n_ants * (meta.n_ants + 1) // 2
    with tables.table(str(whole), ack=False) as t:
        assert t.nrows() == n_dumps * nbl
        assert t.getcol("DATA").shape == (n_dumps * nbl, meta.n_chans, 4)
        autos = t.getcol("ANTENNA1") == t.getcol("ANTENNA2")
        assert np.all(t.getcol("UVW")[autos] == 0)
        # the slew's dumps are not there: the first TIME is the track's first dump
        first = meta.timestamps[meta.scans[0].start] + 3506716800.0
        assert t.getcol("TIME")[0] == first
    with tables.table(f"{whole}::ANTENNA", ack=False) as t:
        assert t.getcol("NAME") == list(meta.antenna_names)


# --- CASA -------------------------------------------------------------------------------------

LISTOBS = textwrap.dedent(
    """
    import json, sys
    from casatasks import listobs
    try:
        summary = listobs(vis=sys.argv[1], listfile=sys.argv[2], overwrite=True)
    except Exception as exc:
        print(json.dumps({"error": str(exc)}))
    else:
        print(json.dumps({"nfields": summary["nfields"], "numrecords": summary["numrecords"]}))
    """
)


@pytest.fixture(scope="module")
def casa_home(tmp_path_factory):
    """A HOME with ``.casa/config.py``: measures from python-casacore's data, no updates."""
    if importlib.util.find_spec("casatasks") is None:
        pytest.skip("casatasks not installed (pip install casatasks casatools)")
    measures = Path(importlib.util.find_spec("casacore").origin).parent / "data"
    if not (measures / "geodetic").is_dir():
        measures = Path("/usr/share/casacore/data")
    if not (measures / "geodetic").is_dir():
        pytest.skip("no casacore measures data (geodetic) for CASA to run offline")
    home = tmp_path_factory.mktemp("casa")
    (home / ".casa").mkdir()
    (home / ".casa" / "config.py").write_text(
        f"measurespath = {str(measures)!r}\n"
        "measures_auto_update = False\n"
        "data_auto_update = False\n"
        "nologfile = True\n"
    )
    return home


def listobs(casa_home: Path, ms: Path, listfile: Path) -> dict:
    env = {**os.environ, "HOME": str(casa_home)}
    result = run([sys.executable, "-c", LISTOBS, str(ms), str(listfile)], env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_casa_listobs(sim, casa_home, tmp_path):
    source, _, whole, concat = sim
    meta = source.meta
    for ms in (whole, concat):
        summary = listobs(casa_home, ms, tmp_path / "listobs.txt")
        assert "error" not in summary, summary["error"]
        with tables.table(str(whole), ack=False) as t:
            assert summary["numrecords"] == t.nrows()
        assert summary["nfields"] == 1
        text = (tmp_path / "listobs.txt").read_text()
        assert "MS Version 2" in text
        assert f"Antennas: {meta.n_ants}" in text
        assert "SIM-FIELD" in text and "OBSERVE_TARGET#ON_SOURCE" in text
        assert "XX  XY  YX  YY" in text
        assert "Observation: MeerKAT" in text
    # listobs does check: a dangling FIELD_ID is refused
    bad = tmp_path / "bad.ms"
    shutil.copytree(whole, bad)
    with tables.table(str(bad), readonly=False, ack=False) as t:
        t.putcell("FIELD_ID", 5, 3)
    summary = listobs(casa_home, bad, tmp_path / "bad.txt")
    assert "Illegal FIELD_ID" in summary.get("error", "")


# --- aoflagger --------------------------------------------------------------------------------


def test_aoflagger_flags_it(tmp_path):
    """aoflagger opens the export, flags the injected RFI and records itself in HISTORY."""
    aoflagger = tool("aoflagger", "aoflagger")
    source, _ = simulated_source(n_ants=8, point_offset=None, rfi=True)
    ms = export_ms(source, tmp_path / "rfi.ms", progress=False).path
    result = run([aoflagger, "-j", "2", str(ms)])
    assert "MeerKAT" in result.stdout  # the telescope name came from OBSERVATION
    with tables.table(str(ms), ack=False) as t:
        flag = t.getcol("FLAG")
        cross = t.getcol("ANTENNA1") != t.getcol("ANTENNA2")
    assert 0.0 < flag[cross].mean() < 0.5
    with tables.table(f"{ms}::HISTORY", ack=False) as t:
        assert "AOFlagger" in t.getcol("APPLICATION")


# --- WSClean ----------------------------------------------------------------------------------


def dirty_image(wsclean: str, ms: Path, name: Path) -> tuple[np.ndarray, object, str]:
    result = run(
        [
            wsclean,
            "-size", str(IMAGE_SIZE), str(IMAGE_SIZE),
            "-scale", f"{PIXEL_ARCSEC}asec",
            "-niter", "0",
            "-j", "2",
            "-no-update-model-required",
            "-name", str(name),
            str(ms),
        ]
    )  # fmt: skip
    from casacore import images

    image = images.image(f"{name}-dirty.fits")
    return np.asarray(image.getdata())[0, 0], image, result.stdout


def test_wsclean_images_point_source_at_its_position(sim, tmp_path):
    wsclean = tool("wsclean", "wsclean")
    _, (ra, dec), whole, concat = sim
    data, image, log = dirty_image(wsclean, whole, tmp_path / "whole")
    y, x = np.unravel_index(np.argmax(data), data.shape)
    world = image.toworld([0, 0, int(y), int(x)])  # [stokes, freq, dec, ra] in radians
    peak_dec, peak_ra = world[2], world[3]
    offset = math.hypot((math.remainder(peak_ra - ra, 2 * math.pi)) * math.cos(dec), peak_dec - dec)
    pixel = math.radians(PIXEL_ARCSEC / 3600)
    assert offset < 1.5 * pixel, f"peak {offset / pixel:.1f} pixels from the source"
    assert data.max() > 5.0  # 10 Jy, a little beam attenuation: a real detection
    # the source is 0.14 deg from the centre: the mirror image would be 50 pixels away
    assert data[IMAGE_SIZE - y, IMAGE_SIZE - x] < 0.5 * data.max()
    # the concatenated slices grid the same visibilities and give the same image
    concat_data, _, concat_log = dirty_image(wsclean, concat, tmp_path / "concat")
    count = [line for line in log.splitlines() if "Gridded visibility count" in line]
    assert count and count == [
        line for line in concat_log.splitlines() if "Gridded visibility count" in line
    ]
    np.testing.assert_allclose(concat_data, data, rtol=1e-5, atol=1e-6 * data.max())
