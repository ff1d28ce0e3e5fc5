"""The cal pipeline's batch logic without the daemon: batch cutting, scans, layout, solve order."""

from __future__ import annotations

import numpy as np
import pytest

from karoo import flags as flagbits
from karoo.cal.pipeline import (
    Batch,
    BatchCutter,
    CalParams,
    CalPipeline,
    CalTarget,
    CorrLayout,
    DumpInfo,
    apply_gains,
    default_window,
    delay_phasor,
    find_scans,
    interpolate_gains,
    should_cut,
)

BP = "PKS1934-638, radec bpcal delaycal, 19:39:25.03, -63:42:45.6"
GC = "GC, radec gaincal, 20:30:00.0, -55:00:00.0"
TG = "FIELD, radec target, 20:10:00.0, -60:00:00.0"
POL = "POLCAL, radec polcal, 3:00:00.0, -30:00:00.0"


def timeline(steps, dumps_per_step=3):
    """DumpInfos for [(activity, target), ...], one new activity sample per step."""
    infos = []
    t = 1000.0
    for activity, target in steps:
        start = t
        for _ in range(dumps_per_step):
            infos.append(DumpInfo(len(infos), t, activity, start, target))
            t += 1.0
    return infos


def cut(infos, max_dumps=1000):
    cutter = BatchCutter(max_dumps)
    batches = [b for info in infos if (b := cutter.add(info))]
    if (rest := cutter.flush()):
        batches.append(rest)
    return [[(i.activity, i.target.split(",")[0]) for i in b] for b in batches]


def test_batch_ends_after_a_track_and_keeps_the_slew_with_the_next():
    infos = timeline([("slew", BP), ("track", BP), ("slew", GC), ("track", GC)], 2)
    batches = cut(infos)
    assert batches == [
        [("slew", "PKS1934-638")] * 2 + [("track", "PKS1934-638")] * 2,
        [("slew", "GC")] * 2 + [("track", "GC")] * 2,
    ]


def test_target_stays_with_the_following_gain_calibrator():
    infos = timeline([("track", GC), ("slew", TG), ("track", TG), ("slew", GC), ("track", GC),
                      ("slew", TG)], 1)
    assert cut(infos) == [
        [("track", "GC")],
        [("slew", "FIELD"), ("track", "FIELD"), ("slew", "GC"), ("track", "GC")],
        [("slew", "FIELD")],
    ]


def test_unknown_target_and_single_accumulation():
    unknown = "x, radec unknown, 0:00:00, 0:00:00"
    infos = timeline([("track", GC), ("track", unknown)], 1)
    assert len(cut(infos)) == 1  # the new target is tagged unknown: no cut
    single = "BF, radec bfcal single_accumulation, 0:00:00, 0:00:00"
    a = DumpInfo(0, 0.0, "slew", 0.0, single)
    b = DumpInfo(1, 1.0, "track", 1.0, single)
    assert should_cut(a, b)  # activity changed on a single_accumulation target
    assert not should_cut(a, DumpInfo(1, 1.0, "slew", 0.0, single))


def test_batch_length_is_capped():
    infos = timeline([("track", GC)], 7)
    assert [len(b) for b in cut(infos, max_dumps=3)] == [3, 3, 1]
    with pytest.raises(ValueError):
        BatchCutter(0)


def test_find_scans():
    infos = timeline([("slew", BP), ("track", BP), ("slew", TG), ("track", TG), ("stop", TG)], 2)
    scans = find_scans(infos)
    assert [(s.start, s.stop, s.target.name) for s in scans] == [(2, 4, "PKS1934-638"),
                                                                  (6, 8, "FIELD")]
    assert scans[0].target.tags == ("bpcal", "delaycal")


def test_target_parsing_and_flux():
    t = CalTarget.parse("J, radec gaincal, 1:00, -30:00, (800 2000 0.69897)")
    assert t.tags == ("gaincal",) and t.name == "J"
    np.testing.assert_allclose(t.flux(np.array([1e9, 1.5e9])), 5.0, rtol=1e-4)
    assert np.isnan(t.flux(np.array([3e9]))[0])
    assert CalTarget.parse("").tags == ()
    assert CalTarget.parse("J, radec, 1:00, 2:00").flux(np.array([1e9])) is None


def labels(ants):
    out = []
    for i, a in enumerate(ants):
        for b in ants[i:]:
            for pa in "hv":
                for pb in "hv":
                    if a == b and pa > pb:
                        continue
                    out.append((a + pa, b + pb))
    return out


def test_layout_gather_scatter():
    ants = ["m002", "m000", "m001"]
    ordering = labels(ants)
    # one product stored the other way round
    i = ordering.index(("m000v", "m001h"))
    ordering[i] = ("m001h", "m000v")
    layout = CorrLayout.from_bls_ordering(ordering)
    assert layout.antlist == ["m000", "m001", "m002"] and layout.pols == ["v", "h"]
    assert layout.pol_products == ["vv", "hh", "vh", "hv"]
    rng = np.random.default_rng(1)
    vis = (rng.standard_normal((5, len(ordering))) + 1j).astype(np.complex64)
    fl = np.zeros(vis.shape, np.uint8)
    v, _, _ = layout.gather(vis, fl, np.ones(vis.shape, np.float32))
    assert v.shape == (5, 4, 3)
    k = [tuple(b) for b in layout.bls].index((0, 1))
    np.testing.assert_array_equal(v[:, 2, k], np.conj(vis[:, i]))  # vh of (m000, m001)
    cal = np.zeros((5, 4, 3), np.uint8)
    cal[:, 3, k] = flagbits.CAL_RFI
    out = layout.scatter_flags(cal, fl)
    j = ordering.index(("m000h", "m001v"))
    assert np.all(out[:, j] == flagbits.CAL_RFI) and int(out.sum()) == 5 * int(flagbits.CAL_RFI)
    with pytest.raises(ValueError):
        CorrLayout.from_bls_ordering([("m000h", "m000h")])


def test_default_window_inside_one_server():
    assert default_window(64, 1) == (4, 60)
    lo, hi = default_window(4096, 4)
    assert 2048 <= lo < hi <= 3072


def synthetic_batch(tags_by_scan, n_ants=5, n_chans=32, n_dumps=16, seed=0, kcross=0.0,
                    bp_phase=True, noise=1e-5):
    """Noise-free data with known K, B, G (constant in time) and an optional cross-hand delay."""
    rng = np.random.default_rng(seed)
    ants = [f"m{i:03d}" for i in range(n_ants)]
    layout = CorrLayout.from_bls_ordering(labels(ants))
    freqs = 1.3e9 + np.arange(n_chans) * 1e6
    k = rng.uniform(-3e-9, 3e-9, (2, n_ants))
    # smooth bandpasses (the flagger's spectrum pass would take channel-to-channel
    # jumps far above the noise for RFI)
    x = np.linspace(0, 1, n_chans)[:, None, None]
    ph = rng.uniform(0, 2 * np.pi, (2, 2, n_ants))
    b = (1 + 0.1 * np.cos(3 * x + ph[0])) * np.exp(0.3j * bp_phase * np.cos(2 * x + ph[1]))
    g = rng.uniform(0.8, 1.2, (2, n_ants)) * np.exp(1j * rng.uniform(-3, 3, (2, n_ants)))
    gains = g[None] * b * delay_phasor(k, freqs)
    # a cross-hand delay: the v pol's response gets an extra exp(2πi kcross f)
    gains[:, 0] *= np.exp(2j * np.pi * kcross * freqs)[:, None]
    bls = layout.bls
    infos, vis = [], []
    t = 100.0
    for s, tags in enumerate(tags_by_scan):
        target = f"S{s}, radec {tags}, 0:00:00, 0:00:00"
        for _ in range(n_dumps):
            infos.append(DumpInfo(len(infos), t, "track", 100.0 + s * 1000, target))
            t += 1.0
    one = np.ones((len(infos), n_chans, 4, len(bls)), np.complex64)
    # an unpolarised source (cross hands: noise only) or, to measure KCROSS, a 10% polarised
    # part (U) in the cross hands
    one[:, :, 2:] = 0.1 if kcross else 0.0
    vis = apply_gains(one, 1.0 / gains[None], bls)[0]  # V = g_a conj(g_b) M
    # a little noise: the flagger needs some to measure (noise-free data have sigma 0)
    vis += (noise * (rng.standard_normal(vis.shape) + 1j * rng.standard_normal(vis.shape))
            ).astype(np.complex64)
    flags = np.zeros(vis.shape, np.uint8)
    weights = np.ones(vis.shape, np.float32)
    params = CalParams(freqs=freqs, channel_range=(0, n_chans), k_window=(0, n_chans),
                       g_window=(0, n_chans), dump_period=1.0)
    return Batch(infos, vis, flags, weights), params, layout, (k, b, g, gains)


def test_pipeline_solves_newest_scan_first_and_recovers_the_data():
    batch, params, layout, _ = synthetic_batch(
        ["bpcal delaycal", "gaincal"], seed=2)
    pipe = CalPipeline(params, layout)
    result = pipe.process_batch(batch)
    # newest first: the gaincal scan is processed before the bpcal scan
    assert [s.target for s in result.scans] == ["S1", "S0"]
    # without a flux model, the bpcal's G after B is an ordinary G (katsdpcal)
    assert result.scans[0].solved == ["G"] and result.scans[1].solved == ["K", "B", "G"]
    assert any("no flux model" in n for n in result.scans[1].notes)
    keys = [p[0] for p in result.products]
    assert keys.count("product_G") == 3 and "product_K" in keys and "product_B0" in keys
    # an SNR with every K, B part and G, same timestamps, (n_pols, n_ants) float32
    for name in ("K", "B0", "G"):
        sols = [(v, t) for k_, v, t in result.products if k_ == f"product_{name}"]
        snrs = [(v, t) for k_, v, t in result.products if k_ == f"product_SNR_{name}"]
        assert [t for _, t in sols] == [t for _, t in snrs]
        assert all(v.shape == (2, 5) and v.dtype == np.float32 for v, _ in snrs)
    assert pipe.G_FLUX == [] and pipe.measure_flux() == ({}, {})
    assert keys[0] == "refant"
    assert 0 <= pipe.refant < 5
    # G was solved before B existed in this batch, so apply only what the data say: a later
    # batch with a gaincal applies B. Re-run the gain scan alone with B and K now known.
    batch2, *_ = synthetic_batch(["gaincal"], seed=2)
    pipe.process_batch(batch2)
    g_new = interpolate_gains(batch2.times, pipe.G_times[-2:], pipe.G_values[-2:])
    total = pipe._gains(batch2.times) * g_new[:, None]
    corr, _ = apply_gains(batch2.vis[:, :, :2], total, layout.bls)
    np.testing.assert_allclose(corr, 1.0, atol=1e-4)


def test_pipeline_kcross():
    kc_true = 0.4e-9
    batch, params, layout, (k, *_) = synthetic_batch(["bpcal delaycal"], kcross=kc_true, seed=4,
                                                      bp_phase=False, noise=1e-3)
    pipe = CalPipeline(params, layout)
    pipe.process_batch(batch)
    # a gain calibrator after the polcal scan: solved first (newest first), its G makes the
    # per-antenna phases of both pols common again before the cross hands are averaged
    batch2, *_ = synthetic_batch(["polcal", "gaincal"], kcross=kc_true, seed=4,
                                 bp_phase=False, noise=1e-3)
    result = pipe.process_batch(batch2)
    kc = [v for key, v, _ in result.products if key == "product_KCROSS"]
    assert len(kc) == 1 and kc[0].shape == (2, 1) and kc[0].dtype == np.float32
    # K is referenced to the refant per pol, so the refant's v-h delay (including the injected
    # cross-hand delay) is what is left in the cross hands
    ref = pipe.refant
    # with flat bandpass phases, K is the injected delay relative to the refant
    np.testing.assert_allclose(pipe.K, k - k[:, ref : ref + 1], atol=5e-12)
    assert kc[0][1, 0] == 0
    np.testing.assert_allclose(kc[0][0, 0], k[0, ref] + kc_true - k[1, ref], atol=2e-11)


def test_pipeline_without_calibrator_solves_nothing():
    batch, params, layout, _ = synthetic_batch(["target"])
    pipe = CalPipeline(params, layout)
    result = pipe.process_batch(batch)
    assert result.products == [] and result.scans[0].solved == []
    assert not (batch.flags & flagbits.CAL_RFI).any()  # targets are not cal-flagged here
