"""Solver accuracy against injected truth and the theoretical bounds of the reference."""

import numpy as np
import pytest

from karoo.cal.solvers import (
    antenna_flag_fraction,
    b_solve,
    best_refant,
    g_solve,
    k_solve,
    kcross_solve,
    keep_or_choose_refant,
    normalise_bandpass,
    residuals,
    snr_antenna,
    solint_from_nominal,
    stefcal,
    valid_weights,
    weighted_average,
)

from .simulate import complex_noise, cross_baselines, gain_vis, random_gains

N_ANTS = 64
BLS = cross_baselines(N_ANTS)
# The L-band 4k K window: 200 channels of 208.984 kHz.
K_FREQS = 1326.214e6 + np.arange(200) * 208.984375e3


def referenced(g, ref=0):
    return g * np.conj(g[..., ref : ref + 1]) / np.abs(g[..., ref : ref + 1])


def simulate_gain_solves(seed, n_solves, sigma, dtype=np.complex64):
    rng = np.random.default_rng(seed)
    g = random_gains(rng, (n_solves, N_ANTS))
    vis = gain_vis(g, BLS) + complex_noise(rng, (n_solves, len(BLS)), sigma)
    return g, vis.astype(dtype)


@pytest.mark.parametrize("snr", [50, 5, 1])
def test_stefcal_reaches_bound(snr):
    sigma = 1.0 / snr
    g, vis = simulate_gain_solves(snr, 1024, sigma)
    res = stefcal(vis, BLS, N_ANTS)
    assert res.gains.shape == (1024, N_ANTS) and res.gains.dtype == np.complex64
    err = res.gains - referenced(g)
    rms = np.sqrt(np.mean(np.abs(err[:, 1:]) ** 2))
    bound = np.sqrt(1.5) * sigma / np.sqrt(N_ANTS - 1)
    assert 0.95 < rms / bound <= 1.05
    phase_rms = np.sqrt(np.mean(np.angle(res.gains[:, 1:] / referenced(g)[:, 1:]) ** 2))
    assert phase_rms / (sigma / np.sqrt(N_ANTS - 1)) <= 1.05
    assert np.median(res.iterations) <= 20
    assert res.iterations.max() <= 40
    assert res.converged.all()
    assert (res.ref_ant == 0).all()


def test_stefcal_noise_free_float64():
    g, vis = simulate_gain_solves(3, 16, 0.0, np.complex128)
    res = stefcal(vis, BLS, N_ANTS, conv_thresh=1e-10, max_iters=200)
    assert res.gains.dtype == np.complex128
    np.testing.assert_allclose(res.gains, referenced(g), atol=1e-6)


def test_stefcal_noise_free_float32_threshold():
    g, vis = simulate_gain_solves(4, 16, 0.0)
    res = stefcal(vis, BLS, N_ANTS, conv_thresh=1e-4)
    assert np.max(np.abs(res.gains - referenced(g))) <= 1e-3  # 10 x conv_thresh


def test_stefcal_batches_any_leading_shape():
    _, vis = simulate_gain_solves(5, 12, 0.1)
    res = stefcal(vis.reshape(3, 4, -1), BLS, N_ANTS)
    assert res.gains.shape == (3, 4, N_ANTS)
    assert res.iterations.shape == (3, 4)
    single = stefcal(vis[7], BLS, N_ANTS)
    np.testing.assert_array_equal(res.gains[1, 3], single.gains)


def test_stefcal_nan_input_is_treated_as_flagged():
    _, vis = simulate_gain_solves(6, 8, 0.2)
    bad = np.zeros(vis.shape, bool)
    bad[:, ::17] = True
    nan_vis = vis.copy()
    nan_vis[bad] = np.nan + 1j * np.nan
    weights = np.ones(vis.shape, np.float32)
    weights[:, 5] = np.nan  # a NaN weight is a flag too
    res_nan = stefcal(nan_vis, BLS, N_ANTS, weights=weights)
    weights_zero = np.where(bad, 0, weights)
    weights_zero[:, 5] = 0
    res_zero = stefcal(vis, BLS, N_ANTS, weights=weights_zero)
    assert np.isfinite(res_nan.gains).all()
    np.testing.assert_allclose(res_nan.gains, res_zero.gains, rtol=1e-5, atol=1e-6)


def test_stefcal_flagged_antenna_and_refant():
    g, vis = simulate_gain_solves(7, 4, 0.05)
    weights = np.ones(vis.shape, np.float32)
    touches = lambda ant: (BLS[:, 0] == ant) | (BLS[:, 1] == ant)  # noqa: E731
    weights[:, touches(0)] = 0  # the requested refant
    weights[:, touches(9)] = 0  # another antenna
    res = stefcal(vis, BLS, N_ANTS, weights=weights, ref_ant=0)
    assert np.isnan(res.gains[:, [0, 9]]).all()
    others = np.setdiff1d(np.arange(N_ANTS), [0, 9])
    assert np.isfinite(res.gains[:, others]).all()
    new_ref = res.ref_ant[0]
    assert new_ref not in (0, 9) and (res.ref_ant == new_ref).all()
    assert np.allclose(np.angle(res.gains[:, new_ref]), 0, atol=1e-6)
    truth = referenced(g, new_ref)
    assert np.max(np.abs(res.gains[:, others] - truth[:, others])) < 0.05


def test_stefcal_all_flagged_gives_nan_and_minus_one():
    _, vis = simulate_gain_solves(8, 2, 0.1)
    res = stefcal(vis, BLS, N_ANTS, weights=0)
    assert np.isnan(res.gains).all() and (res.ref_ant == -1).all()


def test_stefcal_ignores_autocorrelations():
    _, vis = simulate_gain_solves(9, 4, 0.1)
    autos = np.stack([np.arange(N_ANTS)] * 2, axis=1)
    bls = np.concatenate([BLS, autos])
    vis_auto = np.concatenate([vis, np.full((4, N_ANTS), 123.0, np.complex64)], axis=1)
    np.testing.assert_array_equal(stefcal(vis_auto, bls, N_ANTS).gains,
                                  stefcal(vis, BLS, N_ANTS).gains)


def test_stefcal_inverse_variance_weights_are_optimal():
    rng = np.random.default_rng(10)
    n = 512
    g = random_gains(rng, (n, N_ANTS))
    sigma = rng.uniform(0.05, 0.5, (n, len(BLS)))
    vis = (gain_vis(g, BLS) + complex_noise(rng, sigma.shape, sigma)).astype(np.complex64)

    def err(w):
        res = stefcal(vis, BLS, N_ANTS, weights=w)
        return np.sqrt(np.mean(np.abs(res.gains - referenced(g))[:, 1:] ** 2))

    e_inv_var, e_inv_sigma, e_none = err(1 / sigma**2), err(1 / sigma), err(None)
    assert e_inv_var < e_inv_sigma < e_none
    # Bound for inverse-variance weighting: the noise of each gain is ~1/sqrt(sum of weights).
    ant_w = np.zeros((n, N_ANTS))
    np.add.at(ant_w.T, BLS[:, 0], (1 / sigma**2).T)
    np.add.at(ant_w.T, BLS[:, 1], (1 / sigma**2).T)
    bound = np.sqrt(np.mean(1 / ant_w[:, 1:]) + np.mean(1 / ant_w[:, 0]) / 2)
    assert e_inv_var / bound <= 1.05


def test_stefcal_bad_shapes():
    with pytest.raises(ValueError):
        stefcal(np.ones((3, 5), np.complex64), BLS, N_ANTS)
    with pytest.raises(ValueError):
        stefcal(np.ones(len(BLS), np.complex64), BLS + N_ANTS, N_ANTS)
    with pytest.raises(ValueError):
        stefcal(np.ones((2, len(BLS)), np.complex64), BLS, N_ANTS, weights=np.ones(3))


def simulate_delays(seed, sigma, n_pols=2):
    rng = np.random.default_rng(seed)
    k = rng.uniform(-5e-9, 5e-9, (n_pols, N_ANTS))
    phase = rng.uniform(-np.pi, np.pi, (n_pols, N_ANTS))
    g = np.exp(2j * np.pi * k[None] * K_FREQS[:, None, None] + 1j * phase[None])
    vis = gain_vis(g, BLS)
    vis = vis + complex_noise(rng, vis.shape, sigma)
    return k, vis.astype(np.complex64)


def k_bound(sigma):
    fc = K_FREQS - K_FREQS.mean()
    return np.sqrt(2) * (sigma / np.sqrt(2)) / np.sqrt(N_ANTS - 1) / (
        2 * np.pi * np.sqrt(np.sum(fc**2)))


@pytest.mark.parametrize("snr", [10, 3, 1])
def test_k_solve_reaches_bound(snr):
    sigma = 1.0 / snr
    errs = []
    for seed in range(5):
        k, vis = simulate_delays(100 * snr + seed, sigma)
        sol = k_solve(vis, BLS, N_ANTS, K_FREQS)
        assert sol.delay.shape == (2, N_ANTS) and sol.delay.dtype == np.float32
        assert sol.ref_ant == 0 and (sol.delay[:, 0] == 0).all()
        errs.append((sol.delay - (k - k[:, :1]))[:, 1:].ravel())
    err = np.concatenate(errs)
    gross = np.abs(err) > 1e-9
    assert gross.mean() < 0.01
    assert np.sqrt(np.mean(err[~gross] ** 2)) / k_bound(sigma) <= 1.1


def test_k_solve_sign_convention_and_refant_reselection():
    k, vis = simulate_delays(1, 0.0, n_pols=1)
    weights = np.ones(vis.shape, np.float32)
    weights[..., (BLS[:, 0] == 3) | (BLS[:, 1] == 3)] = 0
    sol = k_solve(vis, BLS, N_ANTS, K_FREQS, weights=weights, ref_ant=3)
    assert sol.ref_ant != 3 and np.isnan(sol.delay[0, 3])
    good = np.setdiff1d(np.arange(N_ANTS), [3])
    expected = k - k[:, sol.ref_ant : sol.ref_ant + 1]
    np.testing.assert_allclose(sol.delay[0, good], expected[0, good], atol=1e-13)
    # Dividing out exp(+2πi·K·f) leaves frequency-independent phases on every baseline.
    corr = np.exp(-2j * np.pi * sol.delay[0][None, :] * K_FREQS[:, None])
    fixed = vis[:, 0] * corr[:, BLS[:, 0]] * np.conj(corr[:, BLS[:, 1]])
    ok = (BLS[:, 0] != 3) & (BLS[:, 1] != 3)
    ramp = np.angle(fixed[1:, ok] * np.conj(fixed[:-1, ok]))
    assert np.max(np.abs(ramp)) < 1e-3


def test_kcross_solve():
    rng = np.random.default_rng(2)
    tau = 1.7e-9
    n_bl = 40
    pol_term = 0.3 * np.exp(1j * 0.4)  # source polarisation (real U with a leakage phase)
    vh = pol_term * np.exp(2j * np.pi * tau * K_FREQS)[:, None] * np.ones(n_bl)
    hv = np.conj(pol_term * np.exp(2j * np.pi * tau * K_FREQS))[:, None] * np.ones(n_bl)
    vh = vh + complex_noise(rng, vh.shape, 0.1)
    hv = hv + complex_noise(rng, hv.shape, 0.1)
    out = kcross_solve(vh, hv, K_FREQS)
    assert out.shape == (2, 1) and out.dtype == np.float32 and out[1, 0] == 0
    # Expected rms error: phase noise 0.1/sqrt(80)/0.3/sqrt(2) rad over the band → 25 ps.
    fc = K_FREQS - K_FREQS.mean()
    expected = 0.1 / np.sqrt(80) / 0.3 / np.sqrt(2) / (2 * np.pi * np.sqrt(np.sum(fc**2)))
    assert abs(out[0, 0] - tau) < 5 * expected


def test_b_solve_and_normalise():
    rng = np.random.default_rng(3)
    n_chans = 32
    g = random_gains(rng, (n_chans, 2, N_ANTS))
    vis = gain_vis(g, BLS).astype(np.complex64)
    vis[5, 1] = np.nan
    b = b_solve(vis, BLS, N_ANTS)
    assert b.shape == (n_chans, 2, N_ANTS) and b.dtype == np.complex64
    assert np.isnan(b[5, 1]).all() and np.isfinite(b[5, 0]).all()
    ok = np.isfinite(b)
    np.testing.assert_allclose(b[ok], referenced(g)[ok], atol=1e-4)
    bn = normalise_bandpass(b, 4, 20)
    win = bn[4:20]
    np.testing.assert_allclose(np.nanmean(np.abs(win), axis=0), 1, rtol=1e-5)
    with np.errstate(invalid="ignore"):
        phasor = np.nansum(win / np.abs(win), axis=0)
    np.testing.assert_allclose(np.angle(phasor), 0, atol=1e-5)


def test_g_solve_intervals():
    rng = np.random.default_rng(4)
    n_dumps, n_chans = 10, 8
    g = random_gains(rng, (3, 2, N_ANTS))  # 3 intervals of 4, 4, 2 dumps
    per_dump = g[[0, 0, 0, 0, 1, 1, 1, 1, 2, 2]]
    vis = gain_vis(per_dump, BLS)[:, None] * np.ones((1, n_chans, 1, 1))
    vis = (vis + complex_noise(rng, vis.shape, 0.01)).astype(np.complex64)
    flags = np.zeros(vis.shape, bool)
    flags[2, 3] = True
    vis[2, 3] = 1e6  # flagged garbage must not leak in
    times = 100.0 + 8 * np.arange(n_dumps)
    w = valid_weights(vis, None, flags)
    sol = g_solve(vis, BLS, N_ANTS, 4, weights=w, timestamps=times)
    assert sol.gains.shape == (3, 2, N_ANTS) and sol.gains.dtype == np.complex64
    np.testing.assert_allclose(sol.times, [112.0, 144.0, 168.0])
    assert np.max(np.abs(sol.gains - referenced(g))) < 5e-3
    assert sol.converged.all()


@pytest.mark.parametrize("n_ants", [16, 32])
def test_g_snr_matches_the_injected_noise(n_ants):
    """SNR_G = 1/RMS residual phase ≈ √2/sigma_avg·√(N/(N-2)) for complex noise sigma_avg on the
    interval average (the fit absorbs (N-1) of the N(N-1)/2 phase degrees of freedom)."""
    rng = np.random.default_rng(11)
    bls = cross_baselines(n_ants)
    n_dumps, n_chans, sigma = 16, 16, 0.8  # per visibility; sigma_avg = sigma/√(4·16) = 0.1
    g = random_gains(rng, (1, 2, n_ants))
    vis = gain_vis(g, bls)[:, None] * np.ones((n_dumps, n_chans, 1, 1))
    vis = (vis + complex_noise(rng, vis.shape, sigma * np.abs(gain_vis(g, bls)))
           ).astype(np.complex64)
    sol = g_solve(vis, bls, n_ants, 4, timestamps=np.arange(n_dumps, dtype=float))
    assert sol.snr.shape == (4, 2, n_ants) and sol.snr.dtype == np.float32
    sigma_avg = sigma / np.sqrt(4 * n_chans)
    want = np.sqrt(2) / sigma_avg * np.sqrt(n_ants / (n_ants - 2))
    # per antenna the estimate has (N-1) baselines: relative scatter ~ 1/√(2(N-1)), with a
    # long upper tail (1/RMS of few samples)
    assert abs(np.median(sol.snr) / want - 1) < 0.05
    assert np.mean(np.abs(sol.snr / want - 1) < 3 / np.sqrt(2 * (n_ants - 1))) > 0.9


def test_snr_antenna_poor_antenna_and_nan():
    rng = np.random.default_rng(12)
    n_ants = 8
    bls = cross_baselines(n_ants)
    resid = 1 + complex_noise(rng, (1, 200, 1, len(bls)), 0.02)
    bad = (bls == 3).any(axis=1)
    resid[..., bad] = np.exp(1j * rng.uniform(-np.pi, np.pi, resid[..., bad].shape))
    resid[..., (bls == 5).any(axis=1)] = np.nan  # antenna 5 has no data
    snr = snr_antenna(resid, None, bls, n_ants)
    good = [a for a in range(n_ants) if a not in (3, 5)]
    # the poor antenna 3 does not drag the others down, and gets its own low SNR
    np.testing.assert_allclose(snr[0, 0, good], np.sqrt(2) / 0.02, rtol=0.1)
    assert snr[0, 0, 3] < 1 and np.isnan(snr[0, 0, 5])
    # the same antenna 3 not marked poor (threshold above its RMS) drags everyone down
    loose = snr_antenna(resid, None, bls, n_ants, poor_threshold=10.0)
    assert np.all(loose[0, 0, good] < 0.5 * snr[0, 0, good])
    np.testing.assert_allclose(residuals(np.array([2j]), np.array([1j, 2.0]), np.array([[0, 1]])),
                               [1.0])
    with pytest.raises(ValueError):
        snr_antenna(resid[0], None, bls, n_ants)


def test_weighted_average_nan_safe():
    vis = np.array([[1 + 1j, np.nan, 3.0], [0.0, 2.0, 5.0]])
    avg, wsum = weighted_average(vis, np.array([[1.0, 1.0, 1.0], [1.0, 3.0, 0.0]]), axis=0)
    np.testing.assert_allclose(avg[:2], [1 + 1j, 2.0])
    np.testing.assert_allclose(wsum, [1.0, 3.0, 1.0])


@pytest.mark.parametrize(("solint", "dump", "n", "expected"),
                         [(5, 8, 20, 1), (100, 8, 10, 10), (40, 8, 24, 6), (40, 8, 22, 6),
                          (40, 8, 20, 5)])
def test_solint_from_nominal(solint, dump, n, expected):
    _, dumps = solint_from_nominal(solint, dump, n)
    assert dumps == expected


def refant_data(seed, weak=(), flagged=()):
    rng = np.random.default_rng(seed)
    n_ants = 16
    bls = cross_baselines(n_ants)
    k = rng.uniform(-5e-9, 5e-9, n_ants)
    g = np.exp(2j * np.pi * k[None, None] * K_FREQS[:, None, None]) * np.ones((1, 2, 1))
    sigma = np.ones(n_ants) * 0.5
    sigma[list(weak)] = 20.0
    vis = gain_vis(g, bls)
    noise_sigma = np.sqrt(sigma[bls[:, 0]] * sigma[bls[:, 1]])
    vis = vis + complex_noise(rng, vis.shape, noise_sigma)
    weights = np.ones(vis.shape)
    for ant in flagged:
        weights[..., (bls[:, 0] == ant) | (bls[:, 1] == ant)] = 0
    return vis, bls, n_ants, weights


def test_refant_choice_and_stickiness():
    vis, bls, n_ants, weights = refant_data(5, weak=(15, 14), flagged=(13,))
    frac = antenna_flag_fraction(valid_weights(vis, weights), bls, n_ants)
    assert frac[13] == 1 and frac[0] == pytest.approx(1 / 15)
    ref = best_refant(vis, bls, n_ants, weights)
    assert ref not in (13, 14, 15) and ref >= 0
    # katsdpcal's rule: highest-index acceptable antenna.
    assert best_refant(vis, bls, n_ants, weights, prefer="index") == 12
    # A good previous refant is kept; a flagged or weak one is replaced.
    assert keep_or_choose_refant(4, vis, bls, n_ants, weights) == 4
    new = keep_or_choose_refant(13, vis, bls, n_ants, weights)
    assert new not in (13, 14, 15) and new >= 0
    assert keep_or_choose_refant(15, vis, bls, n_ants, weights) not in (13, 14, 15)
    assert best_refant(vis, bls, n_ants, np.zeros_like(weights)) == -1


def test_stefcal_shared_weights_and_initial_gains():
    _, vis = simulate_gain_solves(12, 6, 0.2)
    rng = np.random.default_rng(12)
    per_bl = rng.uniform(0.5, 2.0, len(BLS)).astype(np.float32)
    shared = stefcal(vis, BLS, N_ANTS, weights=per_bl)
    full = stefcal(vis, BLS, N_ANTS, weights=np.tile(per_bl, (6, 1)))
    np.testing.assert_array_equal(shared.gains, full.gains)
    # The default start (phases from the refant's baselines) and all-ones reach the same point.
    ones = stefcal(vis, BLS, N_ANTS, weights=per_bl, init_gain=np.ones(N_ANTS))
    np.testing.assert_allclose(shared.gains, ones.gains, atol=1e-4)
    assert np.median(shared.iterations) < np.median(ones.iterations)
