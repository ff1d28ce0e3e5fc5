"""SumThreshold flagger against simulated RFI with a truth mask (reference §3.6/§6.3)."""

import numpy as np
import pytest

from karoo.cal.flagger import CAL_RFI, SumThresholdFlagger, flag_cross_hands

from .simulate import complex_noise, rfi_block, score_flags

N_DUMPS, N_CHANS, N_BL = 100, 4096, 12
EDGE = 200


@pytest.fixture(scope="module")
def flagger():
    return SumThresholdFlagger()


@pytest.fixture(scope="module")
def cross_block():
    return rfi_block(1, N_DUMPS, N_CHANS, N_BL, signal=0.0)


@pytest.fixture(scope="module")
def cross_flags(flagger, cross_block):
    return flagger.get_flags(cross_block.vis)


def test_rfi_cross_hands(cross_block, cross_flags):
    s = score_flags(cross_flags, cross_block.truth)
    assert s.recall >= 0.90
    assert s.precision_tol >= 0.80
    assert s.fp_far <= 0.01


def test_rfi_per_class_recall(cross_block, cross_flags):
    def recall(kind, strength):
        sel = (cross_block.kind == kind) & (cross_block.strength == strength)
        return cross_flags[sel].mean()

    assert recall(1, 5) >= 0.99  # 5 sigma narrowband line
    assert recall(2, 5) >= 0.90  # 5 sigma broadband burst
    assert recall(3, 10) >= 0.75  # 10 sigma single-sample blip


def test_rfi_parallel_hands(flagger):
    blk = rfi_block(11, N_DUMPS, N_CHANS, N_BL, signal=10.0)
    s = score_flags(flagger.get_flags(blk.vis), blk.truth)
    assert s.recall >= 0.75
    assert s.precision_tol >= 0.80
    assert s.fp_far <= 0.01


@pytest.mark.parametrize(("signal", "noise_follows_band"),
                         [(10.0, False), (10.0, True), (0.0, True)])
def test_clean_data_false_flags(flagger, signal, noise_follows_band):
    blk = rfi_block(21, N_DUMPS, N_CHANS, N_BL, signal=signal,
                    noise_follows_band=noise_follows_band, rfi=False)
    flags = flagger.get_flags(blk.vis)
    interior = flags[:, EDGE:-EDGE].mean()
    edges = np.concatenate([flags[:, :EDGE], flags[:, -EDGE:]], axis=1).mean()
    assert interior <= 0.001
    assert edges <= 0.005


def edge_and_interior(flags):
    interior = flags[:, EDGE:-EDGE].mean()
    edges = np.concatenate([flags[:, :EDGE], flags[:, -EDGE:]], axis=1).mean()
    return interior, edges


@pytest.mark.parametrize("n_dumps", [4, 6, 8])
@pytest.mark.parametrize(("signal", "noise_follows_band"),
                         [(0.0, False), (10.0, False), (10.0, True)])
def test_clean_short_scans(flagger, n_dumps, signal, noise_follows_band):
    # A 30 s gain-cal scan of 8 s dumps has ~4 dumps: too few for per-channel noise estimates.
    blk = rfi_block(22 + n_dumps, n_dumps, N_CHANS, N_BL, signal=signal,
                    noise_follows_band=noise_follows_band, rfi=False)
    interior, edges = edge_and_interior(flagger.get_flags(blk.vis))
    assert interior <= 0.001
    assert edges <= 0.005


@pytest.mark.parametrize("n_dumps", [4, 8, 24, 100])
def test_clean_high_snr_smooth_spectrum(flagger, n_dumps):
    # SNR 100 per sample: band shape, ripple and a 10% gain drift are far above the noise,
    # as for a strong calibrator (or a polarised one in the cross hands).
    blk = rfi_block(23, n_dumps, N_CHANS, N_BL, signal=100.0, noise_follows_band=True,
                    rfi=False)
    interior, edges = edge_and_interior(flagger.get_flags(blk.vis))
    assert interior <= 0.001
    assert edges <= 0.005


def test_clean_high_snr_few_channels(flagger):
    # 32 channels of a curved spectrum at SNR ~100: the spectrum background must follow the
    # curvature (a running median alone flagged whole channels near the peak).
    rng = np.random.default_rng(24)
    x = np.linspace(0, 1, 32)[None, :, None]
    ph = rng.uniform(0, 2 * np.pi, (1, 1, 10))
    amp = 0.1 * (1 + 0.1 * np.cos(3 * x + ph)) * (1 + 0.1 * np.cos(3 * x + 2 * ph))
    for n_dumps in (4, 8, 16):
        vis = amp * np.exp(2j * np.pi * rng.random((1, 1, 10)) * x) + complex_noise(
            rng, (n_dumps, 32, 10), 1e-3 * np.sqrt(2))
        assert flagger.get_flags(vis.astype(np.complex64)).mean() <= 0.005


def test_idempotent_and_deterministic(flagger, cross_block, cross_flags):
    np.testing.assert_array_equal(flagger.get_flags(cross_block.vis), cross_flags)


def test_nan_and_input_flags(flagger):
    blk = rfi_block(31, 40, 256, 3, signal=10.0, rfi=False)
    vis = blk.vis.copy()
    vis[3, 10, 0] = np.nan
    in_flags = np.zeros(vis.shape, np.uint8)
    in_flags[5, 20:30, 1] = 1
    reference = flagger.get_flags(vis, in_flags)
    vis[5, 20:30, 1] = 1e6  # garbage under an input flag must be ignored
    flags = flagger.get_flags(vis, in_flags.astype(bool))
    np.testing.assert_array_equal(flags, reference)
    assert flags[3, 10, 0]  # NaN is always flagged


def test_flag_cross_hands_sets_cal_rfi_in_all_pols():
    blk = rfi_block(41, 40, 512, 4, signal=0.0, rfi=False)
    pols = ["vv", "hh", "vh", "hv"]
    rng = np.random.default_rng(0)
    vis = np.stack([blk.vis + 10, blk.vis + 10, blk.vis, blk.vis[:, :, ::-1]], axis=2)
    vis[7, 100:103, 2, 1] += 50 * np.exp(2j * np.pi * rng.random(3))  # RFI seen in vh only
    vis[30, 300, 0, 2] += 1000  # a spike in vv only: not a detection, cross hands decide
    flags = np.zeros(vis.shape, np.uint8)
    flags[0, 0, :, 0] = 8 | CAL_RFI  # data_lost plus a stale cal_rfi bit
    out = flag_cross_hands(vis, flags, pols)
    assert out.dtype == np.uint8
    rfi = (out & CAL_RFI) != 0
    assert rfi[7, 100:103, :, 1].all()  # ORed into every pol
    assert not rfi[30, 300, :, 2].any()
    assert not rfi[0, 0, :, 0].any() and (out[0, 0, :, 0] == 8).all()  # other bits kept
    assert ((out & ~CAL_RFI) == (flags & ~CAL_RFI)).all()  # only bit 64 changes
    again = flag_cross_hands(vis, out, pols)
    np.testing.assert_array_equal(again, out)


def test_meerkat_parameters():
    calib = SumThresholdFlagger.meerkat(208984.375, 8.0)
    assert calib.outlier_nsigma == 4.5 and calib.freq_extend == 3
    assert calib.spike_width_time == 12.5 and calib.spike_width_freq == pytest.approx(10.0, 0.01)
    target = SumThresholdFlagger.meerkat(208984.375 / 8, 2.0, target=True)
    assert target.outlier_nsigma == 7.0 and target.freq_extend == 15
    assert target.spike_width_time == 50.0 and target.spike_width_freq == pytest.approx(160, 0.01)


def test_bad_input():
    with pytest.raises(ValueError):
        SumThresholdFlagger().get_flags(np.zeros((3, 4), np.complex64))
    with pytest.raises(ValueError):
        SumThresholdFlagger(windows_time=(4, 2))
    with pytest.raises(ValueError):
        flag_cross_hands(np.zeros((2, 3, 4, 5), np.complex64), np.zeros((2, 3, 4, 5), bool),
                         ["vv", "hh", "vh", "hv"])
