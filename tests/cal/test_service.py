"""The cal daemon end to end: simulator → ingest kernels → L0 SPEAD → cal → telstate, report, flags.

The simulator's injected truth (gains, delays, bandpasses) and the sky model are the reference:
the products cal writes, applied to the data the katdal way, must give back the model.
"""

from __future__ import annotations

import asyncio
import json
import math

import aiokatcp
import numpy as np
import pytest
import spead2
import spead2.recv

from karoo import flags as flagbits
from karoo.cal.pipeline import (
    CorrLayout,
    apply_gains,
    delay_phasor,
    interpolate_bandpass,
    interpolate_gains,
)
from karoo.cal.service import CalConfig, CalService
from karoo.ingest.kernels import DumpProcessor, baseline_permutation
from karoo.sim import (
    Array,
    CorrelatorConfig,
    InstrumentModel,
    NoiseModel,
    Observation,
    PointSource,
    Scan,
    Simulator,
    SkyModel,
    Target,
)
from karoo.spead.l0 import L0Sender
from karoo.spead.transport import inproc_queue, remove_inproc_queues
from karoo.telstate import TelescopeState
from karoo.telstate import aio as telstate_aio

BPCAL = Target.parse(
    "PKS1934-638, radec bpcal delaycal, 19:39:25.03, -63:42:45.6, "
    "(800.0 8400.0 -30.7667 26.4908 -7.0977 0.605334)")
GCAL = Target.parse("GCAL5, radec gaincal, 20:30:00.0, -55:00:00.0, (800 2000 0.69897)")
FIELD = Target.parse("FIELD, radec target, 20:10:00.0, -60:00:00.0")
N_ANTS = 4
N_CHANS = 64


def make_sim(script: list[Scan] | None = None, snr: float = 1e5, seed: int = 3,
             gcal: Target = GCAL, n_ants: int = N_ANTS) -> Simulator:
    """A small, drift-free, high-SNR observation: bpcal, gaincal, target, gaincal."""
    if script is None:
        script = [
            Scan("slew", BPCAL.description, 1.0), Scan("track", BPCAL.description, 10.0),
            Scan("slew", gcal.description, 1.0), Scan("track", gcal.description, 5.0),
            Scan("slew", FIELD.description, 1.0), Scan("track", FIELD.description, 5.0),
            Scan("slew", gcal.description, 1.0), Scan("track", gcal.description, 5.0),
        ]
    array = Array.meerkat(n_ants)
    config = CorrelatorConfig(n_chans=N_CHANS, n_substreams=4, int_time=0.5)
    obs = Observation(tuple(script))
    instrument = InstrumentModel.random(array, config, seed, epoch=obs.start_time,
                                        drift_amplitude=0.0, drift_phase=0.0)
    sky = SkyModel((PointSource.from_target(BPCAL), PointSource.from_target(gcal)))
    return Simulator(array, config, obs, sky=sky, instrument=instrument,
                     noise=NoiseModel(snr=snr), rfi=None, seed=seed)


def write_l0_metadata(ts, sim: Simulator, l0_name: str = "sdp_l0") -> list[tuple[str, str]]:
    """The ``sdp_l0_*`` keys ingest would write; returns the L0 bls_ordering."""
    cfg = sim.config
    _, ordering = baseline_permutation(sim.model.products.labels)
    for key, value in {
        "n_chans": cfg.n_chans, "n_chans_per_substream": cfg.n_chans // 4,
        "bls_ordering": ordering, "n_bls": len(ordering), "int_time": cfg.dump_period,
        "sync_time": sim.sync_time, "center_freq": cfg.band.center_freq,
        "bandwidth": cfg.band.bandwidth,
    }.items():
        ts.add(f"{l0_name}_{key}", value, immutable=True)
    return ordering


def l0_dumps(sim: Simulator):
    """sim → ingest kernels (convert, flag, weights): (index, timestamp since sync, L0 dump)."""
    perm, _ = baseline_permutation(sim.model.products.labels)
    proc = DumpProcessor(sim.config.n_chans, perm, sim.config.n_accs)
    for dump in sim.dumps():
        proc.process_dump(dump.data)
        spectral, _ = proc.finish()
        yield dump.index, dump.time - sim.sync_time, spectral


async def send_l0(spec: str, sim: Simulator, n_chans: int, n_bls: int) -> list:
    sender = await L0Sender.create(spec, (0, n_chans), n_chans, n_bls)
    await sender.start()
    sent = []
    for index, timestamp, d in l0_dumps(sim):
        await sender.send_dump(d.correlator_data, d.flags, d.weights, d.weights_channel,
                               timestamp, index)
        sent.append((index, timestamp, d))
    await sender.stop()
    return sent


def read_flags_stream(name: str) -> dict[tuple[int, int], np.ndarray]:
    """Everything sent on an in-process flags stream: {(dump_index, first channel): flags}."""
    stream = spead2.recv.Stream(spead2.ThreadPool(), spead2.recv.StreamConfig(
        stop_on_stop_item=False))
    stream.add_inproc_reader(inproc_queue(name))
    ig = spead2.ItemGroup()
    out = {}
    stops = 0
    for heap in stream:
        if heap.is_end_of_stream():
            stops += 1
            if stops == 1:
                break
            continue
        updated = ig.update(heap)
        if "flags" in updated:
            out[int(ig["dump_index"].value), int(ig["frequency"].value)] = ig["flags"].value.copy()
    stream.stop()
    return out


async def run_cal(sim: Simulator, sync_ts, aio_ts, tmp_path, servers: int = 1,
                  cbid: str = "1717206000", tag: str = "a", flags: bool = True):
    """Start `servers` cal daemons, capture one block, return (services, sent L0 dumps)."""
    ordering = write_l0_metadata(sync_ts, sim)
    sim.write_telstate(sync_ts, cbid)
    # One queue per L0 substream (4); each server listens to the queues of its channels.
    queues = [f"cal-{tag}-l0"] + [f"cal-{tag}-l0.{i}" for i in range(1, 4)]
    l0 = f"inproc://cal-{tag}-l0+3"
    services = []
    clients = []
    for k in range(1, servers + 1):
        mine = queues[(k - 1) * 4 // servers : k * 4 // servers]
        cfg = CalConfig(
            l0_spead=",".join(f"inproc://{q}" for q in mine),
            flags_spead=f"inproc://cal-{tag}-flags{k}" if flags else "",
            servers=servers, server_id=k, report_path=str(tmp_path), buffer_dumps=128,
            shared_timeout=60.0,
        )
        service = CalService("127.0.0.1", 0, telstate=aio_ts, name=f"cal.{k}", config=cfg)
        await service.start()
        services.append(service)
        clients.append(await aiokatcp.Client.connect("127.0.0.1", service.port))
    try:
        for client in clients:
            await client.request("capture-init", cbid)
        sent = await send_l0(l0, sim, sim.config.n_chans, len(ordering))
        await asyncio.gather(*(c.request("capture-done") for c in clients))
    finally:
        for client in clients:
            client.close()
            await client.wait_closed()
        for service in services:
            await service.stop()
        remove_inproc_queues(l0)
    return services, sent


def solutions(ts, cbid: str, servers: int = 1):
    """K, B (parts joined, as katdal does), G times and values from telstate."""
    cal = f"{cbid}_cal_"
    k = ts.get_range(cal + "product_K", st=0)
    parts = [ts.get_range(cal + f"product_B{i}", st=0) for i in range(servers)]
    g = ts.get_range(cal + "product_G", st=0)
    b = np.concatenate([p[-1][0] for p in parts], axis=0)
    return k, b, g


def corrected_gaincal(sim, sent, ts, cbid, servers=1):
    """Apply K, B, G katdal-style to the gain-calibrator L0 data: (corrected, usable) arrays."""
    layout = CorrLayout.from_bls_ordering(ts["sdp_l0_bls_ordering"])
    k, b, g = solutions(ts, cbid, servers)
    freqs = sim.config.channel_freqs
    g_times = np.array([t for _, t in g])
    g_vals = np.array([v for v, _ in g])
    out, ok = [], []
    for _, timestamp, d in sent:
        t = sim.sync_time + timestamp
        scan = sim.observation.scans[sim.observation.scan_index(t)]
        if scan.activity != "track" or "gaincal" not in scan.target:
            continue
        w = d.weights.astype(np.float32) * d.weights_channel[:, None]
        vis, flags, w = layout.gather(d.correlator_data, d.flags, w)
        gains = (delay_phasor(k[-1][0], freqs) * interpolate_bandpass(b)
                 * interpolate_gains([t], g_times, g_vals)[:, None])
        corr, fl = apply_gains(vis[None, :, :2], gains, layout.bls, flags[None, :, :2])
        out.append(corr[0])
        ok.append((fl[0] == 0) & (w[:, :2] > 0))
    return np.array(out), np.array(ok)


@pytest.fixture
def memory_telstate():
    sync_ts = TelescopeState()
    return sync_ts, telstate_aio.TelescopeState(sync_ts.backend)


async def test_end_to_end_products_and_recovery(memory_telstate, tmp_path):
    sync_ts, aio_ts = memory_telstate
    sim = make_sim()
    cbid = "1717206000"
    (service,), sent = await run_cal(sim, sync_ts, aio_ts, tmp_path, cbid=cbid, tag="e2e")
    cal = f"{cbid}_cal_"
    # Static keys, katsdpcal's names and types
    assert sync_ts["cal_antlist"] == sorted(a.name for a in sim.array.antennas)
    assert sync_ts["cal_pol_ordering"] == ["v", "h"]
    assert sync_ts["cal_product_B_parts"] == 1
    assert sync_ts["cal_n_chans"] == N_CHANS
    assert sync_ts["cal_stream_type"] == "sdp.cal"
    k, b, g = solutions(sync_ts, cbid)
    assert len(k) == 1 and k[0][0].shape == (2, N_ANTS) and k[0][0].dtype == np.float32
    assert b.shape == (N_CHANS, 2, N_ANTS) and b.dtype == np.complex64
    assert len(g) == 4  # two gaincal scans, two intervals each
    assert all(v.shape == (2, N_ANTS) and v.dtype == np.complex64 for v, _ in g)
    assert sync_ts.get_range(cal + "product_SNR_K", st=0)
    refant = sync_ts.get_range(cal + "refant", st=0)[0][0]
    assert refant in sync_ts["cal_antlist"]
    assert service.sensors["pipeline-reference-antenna"].value == refant
    # K against the truth: delays relative to the refant, in seconds, exp(+2πi K f)
    truth = dict(zip(sim.instrument.input_labels, sim.instrument.delays, strict=True))
    antlist = sync_ts["cal_antlist"]
    for p, pol in enumerate(["v", "h"]):
        want = np.array([truth[a + pol] - truth[refant + pol] for a in antlist])
        # the bandpass ripple's phase slope is absorbed by K; B takes the rest
        np.testing.assert_allclose(k[0][0][p], want, atol=2e-11)
    # Applying K, B and G to the gain calibrator gives its (flat, 5 Jy) model back
    corr, ok = corrected_gaincal(sim, sent, sync_ts, cbid)
    assert ok.mean() > 0.9
    err = np.abs(corr[ok] - 1.0)
    assert np.median(err) < 1e-3 and np.percentile(err, 99) < 3e-3
    # Sensors
    s = service.sensors
    assert s["accumulator-batches"].value >= 2
    assert s["pipeline-batches"].value == s["accumulator-batches"].value
    assert s["free-slots"].value == s["slots"].value
    assert s["input-dumps-total"].value == len(sent)
    assert s["pipeline-exceptions"].value == 0
    assert s["reports-written"].value == 1
    assert s["pipeline-last-solution-time"].value > sim.observation.start_time
    assert 0 <= s["pipeline-final-flag-fraction-cross-pol"].value < 0.2
    # Flags stream: every dump, L0 flags plus cal_rfi only
    got = read_flags_stream("cal-e2e-flags1")
    assert sorted(i for i, _ in got) == [i for i, _, _ in sent]
    for index, _, d in sent:
        f = got[index, 0]
        assert f.shape == d.flags.shape
        assert np.all((f & ~flagbits.CAL_RFI) == d.flags)
    # The report
    report = tmp_path / f"{cbid}_sdp_l0_calreport_cal.1"
    meta = json.loads((report / "metadata.json").read_text())
    assert meta["CaptureBlockId"] == cbid and meta["Run"] == 1
    assert set(meta["Solved"]) == {"B", "G", "G_FLUX", "K"}
    html = (report / "calreport1.html").read_text()
    for png in ("bandpass.png", "gains.png", "delays.png", "flags.png"):
        assert (report / png).stat().st_size > 0 and png in html


async def test_two_servers_split_the_band(redis_url, tmp_path):
    """Two instances on Redis, each with half the band, agree on K, G and the refant."""
    sync_ts = TelescopeState(redis_url)
    aio_ts = await telstate_aio.TelescopeState.from_url(redis_url)
    try:
        sim = make_sim()
        cbid = "1717206001"
        services, sent = await run_cal(sim, sync_ts, aio_ts, tmp_path, servers=2, cbid=cbid,
                                       tag="two", flags=False)
        assert sync_ts["cal_product_B_parts"] == 2
        k, b, g = solutions(sync_ts, cbid, servers=2)
        assert b.shape == (N_CHANS, 2, N_ANTS)
        assert len(sync_ts.get_range(f"{cbid}_cal_product_B0", st=0)[0][0]) == N_CHANS // 2
        assert len(k) == 1 and len(g) == 4
        # the window owner handed refant, K, B normalisation and G over through telstate
        assert sync_ts.is_immutable(f"{cbid}_cal_shared_solve_0")
        assert {s.sensors["pipeline-reference-antenna"].value for s in services} == {
            sync_ts.get_range(f"{cbid}_cal_refant", st=0)[0][0]}
        corr, ok = corrected_gaincal(sim, sent, sync_ts, cbid, servers=2)
        err = np.abs(corr[ok] - 1.0)
        assert ok.mean() > 0.9 and np.median(err) < 1e-3
        # SNR_B per part; the flux scale (GCAL5 is a flat 5 Jy) written once, by the G window
        # owner, and the same on both servers (they share G and G_FLUX)
        for i in range(2):
            assert sync_ts.get_range(f"{cbid}_cal_product_SNR_B{i}", st=0)[0][0].shape == (
                2, N_ANTS)
        flux = sync_ts[f"{cbid}_cal_measured_flux"]
        assert sync_ts.is_immutable(f"{cbid}_cal_measured_flux")
        np.testing.assert_allclose(flux["GCAL5"], 5.0, rtol=1e-3)
        metas = [json.loads((tmp_path / f"{cbid}_sdp_l0_calreport_cal.{k_}" / "metadata.json")
                            .read_text()) for k_ in (1, 2)]
        assert metas[0]["MeasuredFlux"] == metas[1]["MeasuredFlux"]
        assert metas[0]["MeasuredFlux"]["GCAL5"]["flux_jy"] == flux["GCAL5"]
    finally:
        sync_ts.close()
        await aio_ts.close()


#: A gain calibrator with a spectral index (about 4 Jy at 1284 MHz, S ∝ f^-0.7).
GCAL_SPEC = Target.parse("GCAL-SPEC, radec gaincal, 20:30:00.0, -55:00:00.0, (800 2000 2.778 -0.7)")


async def test_flux_scale_and_snr_against_the_simulator(memory_telstate, tmp_path):
    """Noisy data (sim snr=2: a 1934-638-flux source has SNR 2 per visibility, channel and
    dump): the measured flux of the gain calibrator matches the simulator's truth, and SNR_G /
    SNR_B match what the injected noise level predicts."""
    sync_ts, aio_ts = memory_telstate
    n_ants, snr = 8, 2.0
    sim = make_sim(snr=snr, gcal=GCAL_SPEC, n_ants=n_ants)
    cbid = "1717206003"
    _, sent = await run_cal(sim, sync_ts, aio_ts, tmp_path, cbid=cbid, tag="flux", flags=False)
    sim.write_truth(tmp_path / "truth.npz")
    with np.load(tmp_path / "truth.npz") as truth:
        names = list(truth["source_names"])
        source_flux = truth["source_flux"]
    lo, hi = sync_ts["cal_param_g_bchan"], sync_ts["cal_param_g_echan"]
    # G averages the window's channels: the gain calibrator's mean flux there
    want = float(np.mean(source_flux[names.index("GCAL-SPEC"), lo:hi]))
    flux = sync_ts[f"{cbid}_cal_measured_flux"]["GCAL-SPEC"]
    std = sync_ts[f"{cbid}_cal_measured_flux_std"]["GCAL-SPEC"]
    assert set(sync_ts[f"{cbid}_cal_measured_flux"]) == {"GCAL-SPEC"}
    assert 0 < std < 0.05 * want
    assert abs(flux - want) < 3 * std and abs(flux - want) < 0.05 * want
    assert not sync_ts.exists(f"{cbid}_cal_product_G_FLUX")  # in memory only, as katsdpcal

    # The noise the sim injects: complex sigma = S_ref/snr per visibility (S_ref the brightest
    # source at the band centre); with K, B, G divided out a source of flux S has relative
    # noise S_ref/(snr·S), reduced by √N for N averaged samples. katsdpcal's SNR is √2/sigma_rel,
    # and the fit absorbs a fraction 2/n of the residual phase variance.
    s_ref = float(np.max(sim.sky.flux(np.array([sim.config.band.center_freq]))))
    dof = np.sqrt(n_ants / (n_ants - 2))
    freqs = sim.config.channel_freqs
    obs = sim.observation
    track = [obs.scan_index(sim.sync_time + ts) for _, ts, _ in sent]
    track = [k for k in track if obs.scans[k].activity == "track"]
    g_scans = {k: track.count(k) for k in track if "gaincal" in obs.scans[k].target}
    expected_g = []
    for n in g_scans.values():
        per = math.ceil((n - 1) / 2)
        for n_int in (per, n - per):
            sigma = s_ref / (snr * want * np.sqrt(n_int * (hi - lo)))
            expected_g.append(np.sqrt(2) / sigma * dof)
    snr_g = np.array([v for v, _ in sync_ts.get_range(f"{cbid}_cal_product_SNR_G", st=0)])
    assert snr_g.shape == (len(expected_g), 2, n_ants) and snr_g.dtype == np.float32
    ratio_g = np.median(snr_g / np.array(expected_g)[:, None, None])
    assert abs(ratio_g - 1) < 0.1, ratio_g
    n_bp = sum(1 for k in track if "bpcal" in obs.scans[k].target)
    # B: per channel, averaged over the scan, divided by the model; the channels' residual
    # phases are weighted by |model|² (inverse variance), so the mean of S² sets the noise
    s_bp = sim.sky.flux(freqs)[0]
    sigma_b = s_ref / (snr * np.sqrt(n_bp * np.mean(s_bp**2)))
    snr_b = sync_ts.get_range(f"{cbid}_cal_product_SNR_B0", st=0)[0][0]
    ratio_b = np.median(snr_b / (np.sqrt(2) / sigma_b * dof))
    assert abs(ratio_b - 1) < 0.1, ratio_b
    # the report has the SNR summary and the flux table
    report = tmp_path / f"{cbid}_sdp_l0_calreport_cal.1"
    meta = json.loads((report / "metadata.json").read_text())
    assert meta["MeasuredFlux"]["GCAL-SPEC"] == {"flux_jy": flux, "std_jy": std}
    summary = meta["SNRSummary"]
    assert set(summary) == {"K", "B", "G"}
    assert len(summary["G"]) == len(expected_g)
    first = summary["G"][0]
    np.testing.assert_allclose(first["median"], np.nanmedian(snr_g[0]), rtol=1e-5)
    assert first["n_low"] == int(np.sum(~(snr_g[0] >= 10)))
    html = (report / "calreport1.html").read_text()
    assert "Calibration product SNR summary" in html and "Flux calibration" in html
    assert "GCAL-SPEC" in html and (report / "snr.png").stat().st_size > 0


async def test_report_without_solvable_data(memory_telstate, tmp_path):
    """A target-only observation: nothing to solve, yet a report that says so."""
    sync_ts, aio_ts = memory_telstate
    sim = make_sim([Scan("slew", FIELD.description, 1.0), Scan("track", FIELD.description, 4.0)])
    cbid = "1717206002"
    await run_cal(sim, sync_ts, aio_ts, tmp_path, cbid=cbid, tag="none", flags=False)
    assert not sync_ts.exists(f"{cbid}_cal_product_G")
    report = tmp_path / f"{cbid}_sdp_l0_calreport_cal.1"
    meta = json.loads((report / "metadata.json").read_text())
    assert meta["Solved"] == []
    assert any("no calibration product" in p for p in meta["Problems"])
    assert "no calibration product could be solved" in (report / "calreport1.html").read_text()


async def test_report_without_any_data(memory_telstate, tmp_path):
    sync_ts, aio_ts = memory_telstate
    sim = make_sim()
    write_l0_metadata(sync_ts, sim)
    cfg = CalConfig(l0_spead="inproc://cal-empty-l0", report_path=str(tmp_path))
    service = CalService("127.0.0.1", 0, telstate=aio_ts, name="cal", config=cfg)
    await service.start()
    service.config.done_timeout = 0.2
    client = await aiokatcp.Client.connect("127.0.0.1", service.port)
    try:
        await client.request("capture-init", "cb1")
        await client.request("capture-done")
    finally:
        client.close()
        await client.wait_closed()
        await service.stop()
        remove_inproc_queues("inproc://cal-empty-l0")
    meta = json.loads((tmp_path / "cb1_sdp_l0_calreport_cal.1" / "metadata.json").read_text())
    assert "no L0 data were received" in meta["Problems"]


async def test_capture_init_needs_l0_metadata(memory_telstate, tmp_path):
    _, aio_ts = memory_telstate
    cfg = CalConfig(l0_spead="inproc://cal-nometa", report_path=str(tmp_path))
    service = CalService("127.0.0.1", 0, telstate=aio_ts, name="cal", config=cfg)
    await service.start()
    client = await aiokatcp.Client.connect("127.0.0.1", service.port)
    try:
        with pytest.raises(aiokatcp.FailReply, match="sdp_l0_n_chans"):
            await client.request("capture-init", "cb2")
    finally:
        client.close()
        await client.wait_closed()
        await service.stop()


def test_config_checks():
    with pytest.raises(ValueError, match="server_id"):
        CalConfig(l0_spead="x", servers=2, server_id=3)
    assert CalConfig(l0_spead="x", k_window="10,20").k_window == (10, 20)
    assert math.isfinite(CalConfig(l0_spead="x").shared_timeout)
