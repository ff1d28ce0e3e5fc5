"""katdal's applycal reads the products the cal pipeline writes and corrects as karoo does.

The products go into a katsdptelstate under the daemon's key names (``<cbid>_cal_product_*``
plus the static ``cal_*`` attributes, as karoo.cal.service writes them); katdal's own sensor
cache and applycal machinery (add_applycal_sensors / calc_correction, what ``katdal.open(...,
applycal='l1.K,l1.B,l1.G')`` runs) then compute the per-corrprod corrections.
"""

from dataclasses import replace

import katpoint
import numpy as np
import pytest
from katdal.applycal import add_applycal_sensors, calc_correction
from katdal.categorical import CategoricalData
from katdal.sensordata import SensorCache, TelstateSensorGetter
from katsdptelstate import TelescopeState

from karoo.cal.pipeline import Batch, CalPipeline, apply_gains

from .test_pipeline import synthetic_batch

CBID = "1700000000"


def write_products(telstate, layout, freqs, results):
    n_chans = len(freqs)
    df = freqs[1] - freqs[0]
    static = {"antlist": layout.antlist, "pol_ordering": layout.pols, "product_B_parts": 1,
              "stream_type": "sdp.cal", "n_chans": n_chans, "bandwidth": n_chans * df,
              # katdal rebuilds channel i at center + (i - n/2)·bandwidth/n
              "center_freq": float(freqs[0] + n_chans // 2 * df)}
    for key, value in static.items():
        telstate.add("cal_" + key, value, immutable=True)
    for result in results:
        for key, value, ts in result.products:
            telstate.add(f"{CBID}_cal_{key}", value, ts=ts)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_katdal_applycal_matches_karoo():
    batch1, params, layout, _ = synthetic_batch(["bpcal delaycal"], seed=2)
    pipe = CalPipeline(params, layout)
    res1 = pipe.process_batch(batch1)
    # A later gain-cal scan, solved with K and B known: the dataset katdal corrects.
    batch2, *_ = synthetic_batch(["gaincal"], seed=2)
    batch2 = Batch([replace(d, index=d.index + 100, time=d.time + 100.0,
                            activity_time=d.activity_time + 100.0) for d in batch2.infos],
                   batch2.vis, batch2.flags, batch2.weights)
    res2 = pipe.process_batch(batch2)
    freqs = params.freqs
    telstate = TelescopeState()
    write_products(telstate, layout, freqs, [res1, res2])
    keys = telstate.keys()
    for product in ("K", "B0", "G"):
        assert f"{CBID}_cal_product_{product}" in keys

    view = telstate.view(CBID)
    times = batch2.times
    n_dumps = len(times)
    sensors = {name: TelstateSensorGetter(view, name)
               for name in ("cal_product_K", "cal_product_B0", "cal_product_G")}
    target = katpoint.Target("S0, radec gaincal, 0:00:00, 0:00:00")
    sensors["Observation/target"] = CategoricalData([target], [0, n_dumps])
    cache = SensorCache(sensors, times, 1.0)
    cal_freqs = add_applycal_sensors(cache, telstate.view("cal"), freqs, cal_stream="l1",
                                     cal_substreams=["cal"])
    np.testing.assert_allclose(cal_freqs, freqs)
    ants, pols = layout.antlist, layout.pols
    bls = layout.bls
    corrprods = [(ants[a] + pols[p], ants[b] + pols[p]) for p in range(2) for a, b in bls]
    chunks = ((n_dumps,), (len(freqs),), (len(corrprods),))
    products, corrections = calc_correction(chunks, cache, corrprods,
                                            ["l1.K", "l1.B", "l1.G"], freqs, {"l1": cal_freqs})
    assert products == ["l1.K", "l1.B", "l1.G"]
    corr = corrections.compute()  # (n_dumps, n_chans, n_corrprods), multiplies the vis

    vis = batch2.vis[:, :, :2]  # vv, hh: (n_dumps, n_chans, 2, n_bl)
    katdal_corrected = vis.reshape(n_dumps, len(freqs), -1) * corr
    total = pipe._gains(times, k=True, b=True, g=True)
    karoo_corrected, _ = apply_gains(vis, total, bls)
    karoo_corrected = karoo_corrected.reshape(n_dumps, len(freqs), -1)
    np.testing.assert_allclose(katdal_corrected, karoo_corrected, rtol=1e-4, atol=1e-5)
    # and both recover the unit point-source model
    np.testing.assert_allclose(katdal_corrected, 1.0, atol=1e-3)
