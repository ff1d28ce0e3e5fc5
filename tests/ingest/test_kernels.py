"""Tests of the ingest kernels against numpy/scipy references and katsdpsigproc's host flagger."""

import itertools

import numpy as np
import pytest
import scipy.ndimage
from katsdpsigproc.rfi import host

from karoo.ingest import kernels as K

RFI = int(K.INGEST_RFI)


def _noise_vis(rng, n_chans, n_bls, rfi_fraction=0.01, scale=40.0):
    """Complex Gaussian noise on a smooth bandpass, with strong outliers at random places."""
    bandpass = 5.0 + np.sin(np.linspace(0, 3, n_chans))[:, np.newaxis]
    vis = bandpass + rng.normal(size=(n_chans, n_bls)) + 1j * rng.normal(size=(n_chans, n_bls))
    rfi = rng.random((n_chans, n_bls)) < rfi_fraction
    vis[rfi] *= scale
    return vis.astype(np.complex64), rfi


def _reference_flags(vis, flags, width=13, n_sigma=11.0):
    """scipy/numpy flagger: NaN-masked running median (truncated at the edges), MAD, threshold."""
    amp = np.abs(vis).astype(np.float64)
    amp[flags != 0] = np.nan
    background = scipy.ndimage.generic_filter(
        amp, np.nanmedian, size=(width, 1), mode="constant", cval=np.nan
    )
    dev = np.nan_to_num(amp - background, nan=0.0)
    out = flags.copy()
    for b in range(vis.shape[1]):
        nz = np.abs(dev[:, b])
        nz = nz[nz != 0]
        if nz.size:
            out[dev[:, b] > n_sigma * K.MAD_NORMAL * np.median(nz), b] |= RFI
    return out


def _anchor_flags(vis, flags, width=13, n_sigma=11.0):
    flagger = host.FlaggerHost(
        host.BackgroundMedianFilterHost(width),
        host.NoiseEstMADHost(),
        host.ThresholdSimpleHost(n_sigma, flag_value=RFI),
    )
    return flagger(vis, flags) | flags


def test_median_network_sorts_middle():
    """0-1 principle: the network yields the right middle elements for every 0/1 input."""
    med = K._window_median13_py
    for bits in range(1 << 13):
        x = [np.float32((bits >> i) & 1) for i in range(13)]
        assert med(*x) == np.median(x)


@pytest.mark.parametrize("n_invalid", range(14))
def test_median_network_with_invalid(n_invalid):
    rng = np.random.default_rng(n_invalid)
    x = rng.normal(size=13).astype(np.float32)
    invalid = rng.permutation(13)[:n_invalid]
    x[invalid] = np.inf
    got = K._window_median13_py(*x)
    valid = x[np.isfinite(x)]
    if valid.size:
        assert got == np.median(valid.astype(np.float64))
    # With no valid value the centre is flagged too, so its deviation is 0 whatever this is.


def test_flag_rfi_matches_scipy_reference():
    rng = np.random.default_rng(1)
    vis, rfi = _noise_vis(rng, 200, 24)
    flags = np.zeros(vis.shape, np.uint8)
    flags[rng.random(vis.shape) < 0.05] = K.CAM
    flags[:3] = K.STATIC  # flagged band edge
    flags[50:60, 3] = K.DATA_LOST
    flags[:, 5] = K.DATA_LOST  # whole baseline flagged: no noise estimate, nothing added
    noise = np.empty(vis.shape[1])
    got = K.flag_rfi(vis, flags, noise=noise)
    np.testing.assert_array_equal(got, _reference_flags(vis, flags))
    assert np.isnan(noise[5])
    # Injected RFI on unflagged samples is found, and little else.
    new = (got & RFI) != 0
    assert new[rfi & (flags == 0)].mean() > 0.9
    assert new[~rfi].mean() < 0.001


def test_flag_rfi_background_is_scipy_median_filter():
    """Without flags, away from the edges, the background is scipy's plain median filter."""
    rng = np.random.default_rng(2)
    vis, _ = _noise_vis(rng, 128, 16)
    amp = np.abs(vis).astype(np.float64)
    dev = amp - scipy.ndimage.median_filter(amp, size=(13, 1))
    noise = np.empty(16)
    K.flag_rfi(vis, noise=noise)
    anchor_dev = host.BackgroundMedianFilterHost(13)(vis)
    np.testing.assert_allclose(anchor_dev[6:-6], dev[6:-6], atol=1e-6)
    np.testing.assert_allclose(noise, host.NoiseEstMADHost()(anchor_dev), rtol=1e-6)
    np.testing.assert_array_equal(
        K.flag_rfi(vis), _reference_flags(vis, np.zeros_like(vis, np.uint8))
    )


@pytest.mark.parametrize("width", [13, 5])
def test_flag_rfi_matches_katsdpsigproc(width):
    rng = np.random.default_rng(3)
    vis, _ = _noise_vis(rng, 512, 40)
    flags = np.zeros(vis.shape, np.uint8)
    flags[rng.random(vis.shape) < 0.02] = K.STATIC
    flags[-20:] = K.STATIC
    noise = np.empty(40)
    got = K.flag_rfi(vis, flags, width=width, noise=noise)
    np.testing.assert_array_equal(got, _anchor_flags(vis, flags, width))
    anchor_noise = host.NoiseEstMADHost()(host.BackgroundMedianFilterHost(width)(vis, flags))
    np.testing.assert_allclose(noise, anchor_noise, rtol=1e-6)


def test_flag_rfi_per_channel_flags_and_out_in_place():
    rng = np.random.default_rng(4)
    vis, _ = _noise_vis(rng, 300, 17)  # not a multiple of the block size
    chan_flags = np.zeros(300, np.uint8)
    chan_flags[100:140] = K.STATIC
    expected = _anchor_flags(vis, np.broadcast_to(chan_flags[:, None], vis.shape).copy())
    flags = np.broadcast_to(chan_flags[:, None], vis.shape).copy()
    np.testing.assert_array_equal(K.flag_rfi(vis, chan_flags), expected)
    K.flag_rfi(vis, flags, out=flags)
    np.testing.assert_array_equal(flags, expected)


def test_flag_rfi_bad_input():
    with pytest.raises(ValueError, match="complex64"):
        K.flag_rfi(np.zeros((10, 4), np.complex128))
    with pytest.raises(ValueError, match="odd"):
        K.flag_rfi(np.zeros((10, 4), np.complex64), width=4)
    with pytest.raises(ValueError, match="shape"):
        K.flag_rfi(np.zeros((10, 4), np.complex64), np.zeros((10, 3), np.uint8))


def _bls_ordering(n_ants):
    """The correlator's 4 products (hh, hv, vh, vv) per antenna pair, autos included."""
    ants = [f"m{a:03d}" for a in range(n_ants)]
    return [
        (f"{a}{p}", f"{b}{q}")
        for i, a in enumerate(ants)
        for b in ants[i:]
        for p, q in itertools.product("hv", "hv")
    ]


def test_baseline_permutation_order():
    ordering = _bls_ordering(3)
    perm, out = K.baseline_permutation(ordering[::-1])  # scrambled input order
    assert len(out) == len(ordering) == 2 * 3 * 4
    assert [ordering[::-1][i] for i in perm] == out
    kinds = [(a[:-1] != b[:-1], a[-1] != b[-1], a[-1], b[-1]) for a, b in out]
    assert kinds == sorted(kinds, key=lambda k: (k[0], k[1], "hv".index(k[2]), "hv".index(k[3])))
    assert out[0][0][:-1] == out[0][1][:-1]  # autos first
    perm2, out2 = K.baseline_permutation(ordering, antennas=["m000", "m002"])
    assert all(a[:-1] in ("m000", "m002") and b[:-1] in ("m000", "m002") for a, b in out2)
    assert [ordering[i] for i in perm2] == out2
    # Duplicate halves (second input sorting first) are dropped.
    _, out3 = K.baseline_permutation([("m000h", "m001h"), ("m001h", "m000h")])
    assert out3 == [("m000h", "m001h")]


def test_convert_dump_matches_numpy():
    rng = np.random.default_rng(5)
    n_chans, n_prod = 64, 24
    xeng = rng.integers(-(2**20), 2**20, size=(n_chans, n_prod, 2), dtype=np.int32)
    xeng[3, 5] = 0  # zero visibility: cam
    xeng[7, 2, 0] = K.INT32_MIN  # GPU-CBF missing marker: cam + data_lost
    perm = rng.permutation(n_prod)[:20].astype(np.int32)
    static = np.zeros(n_chans, np.uint8)
    static[10:12] = K.STATIC
    missing = np.zeros(n_chans, bool)
    missing[40:48] = True
    xeng[40:48] = 12345  # garbage in the buffer of a missing heap must not leak through
    n_accs = 1000
    vis, flags = K.convert_dump(xeng, n_accs, perm, static, missing)

    ref = xeng[:, perm].astype(np.float32) * np.float32(1 / n_accs)
    ref_vis = (ref[..., 0] + 1j * ref[..., 1]).astype(np.complex64)
    ref_flags = np.broadcast_to(static[:, None], vis.shape).copy()
    raw = xeng[:, perm]
    ref_flags[(raw[..., 0] == 0) & (raw[..., 1] == 0)] |= K.CAM
    marker = raw[..., 0] == K.INT32_MIN
    ref_vis[marker] = 0
    ref_flags[marker] |= K.CAM | K.DATA_LOST
    ref_vis[missing] = 0
    ref_flags[missing] |= K.CAM | K.DATA_LOST
    np.testing.assert_array_equal(vis, ref_vis)
    np.testing.assert_array_equal(flags, ref_flags)
    # data_lost exactly where data is missing
    lost = (flags & K.DATA_LOST) != 0
    np.testing.assert_array_equal(lost, marker | missing[:, None])
    assert np.signbit(vis[marker].real).all()

    # Big-endian input (SKARAB CBF and katcbfsim) gives the same result.
    vis_be, flags_be = K.convert_dump(xeng.astype(">i4"), n_accs, perm, static, missing)
    np.testing.assert_array_equal(vis_be, vis)
    np.testing.assert_array_equal(flags_be, flags)


def test_convert_dump_bad_input():
    xeng = np.zeros((4, 3, 2), np.int32)
    with pytest.raises(ValueError, match="bls_permutation"):
        K.convert_dump(xeng, 10, np.array([0, 3]))
    with pytest.raises(ValueError, match="int32"):
        K.convert_dump(np.zeros((4, 3), np.int32), 10, np.array([0]))
    with pytest.raises(ValueError, match="n_accs"):
        K.convert_dump(xeng, 0, np.array([0]))
    with pytest.raises(ValueError, match="static_flags"):
        K.convert_dump(xeng, 10, np.array([0]), np.zeros(5, np.uint8))


def _reference_average(dumps, weight, excise):
    """numpy reference of the weighted, excised time average."""
    vis = np.array([d[0] for d in dumps], np.complex128)
    flags = np.array([d[1] for d in dumps])
    w = np.full(vis.shape, weight, np.float64)
    if not excise:
        wsum = w.sum(0)
        return (w * vis).sum(0) / wsum, np.bitwise_or.reduce(flags, 0), wsum
    good = flags == 0
    any_good = good.any(0)
    use = np.where(any_good, good, True)
    wsum = (w * use).sum(0)
    out_vis = (w * use * vis).sum(0) / wsum
    out_flags = np.where(any_good, 0, np.bitwise_or.reduce(flags, 0)).astype(np.uint8)
    return out_vis, out_flags, wsum


@pytest.mark.parametrize("excise", [True, False])
def test_time_averager_matches_numpy(excise):
    rng = np.random.default_rng(6)
    n_chans, n_bls, n_dumps = 32, 10, 4
    dumps = []
    for _ in range(n_dumps):
        vis = rng.normal(size=(n_chans + 8, n_bls)) + 1j * rng.normal(size=(n_chans + 8, n_bls))
        flags = np.where(rng.random(vis.shape) < 0.4, K.INGEST_RFI, 0).astype(np.uint8)
        dumps.append((vis.astype(np.complex64), flags))
    dumps[0][1][:, 0] = K.DATA_LOST  # all flagged in every dump for one baseline
    for _, f in dumps[1:]:
        f[:, 0] = K.CAM
    avg = K.TimeAverager(n_chans, n_bls, excise=excise)
    for vis, flags in dumps:
        avg.add(vis, flags, 1000.0, channel_offset=4)
    out = avg.finish()
    assert out.n_dumps == n_dumps and avg.n_dumps == 0
    ref_vis, ref_flags, ref_w = _reference_average(
        [(v[4:-4], f[4:-4]) for v, f in dumps], 1000.0, excise
    )
    np.testing.assert_allclose(out.vis, ref_vis, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.flags, ref_flags)
    np.testing.assert_allclose(out.weights, ref_w, rtol=1e-6)
    assert (out.flags[:, 0] == (K.DATA_LOST | K.CAM)).all()
    with pytest.raises(RuntimeError):
        avg.finish()


@pytest.mark.parametrize("excise", [True, False])
def test_channel_average_matches_numpy(excise):
    rng = np.random.default_rng(7)
    vis = (rng.normal(size=(64, 6)) + 1j * rng.normal(size=(64, 6))).astype(np.complex64)
    flags = np.where(rng.random(vis.shape) < 0.5, K.INGEST_RFI, 0).astype(np.uint8)
    flags[0:16, 2] = K.STATIC  # a fully flagged continuum channel
    weights = rng.uniform(1, 8, size=vis.shape).astype(np.float32)
    c_vis, c_flags, c_weights = K.channel_average(vis, flags, weights, 16, excise)
    shape = (4, 16, 6)
    v, f, w = vis.reshape(shape), flags.reshape(shape), weights.reshape(shape).astype(float)
    use = np.ones(shape, bool)
    if excise:
        good = f == 0
        use = np.where(good.any(1, keepdims=True), good, True)
    ref_w = (w * use).sum(1)
    np.testing.assert_allclose(c_weights, ref_w, rtol=1e-5)
    np.testing.assert_allclose(c_vis, (w * use * v).sum(1) / ref_w, rtol=1e-4, atol=1e-5)
    ref_flags = np.bitwise_or.reduce(np.where(use, f, 0), 1)
    np.testing.assert_array_equal(c_flags, ref_flags)
    assert (c_flags[0, 2] == K.STATIC) and (excise or c_flags.any())
    with pytest.raises(ValueError, match="divide"):
        K.channel_average(vis, flags, weights, 5)


def test_weights_to_uint8():
    rng = np.random.default_rng(8)
    weights = rng.uniform(0, 5000, size=(20, 7)).astype(np.float32)
    weights[3] = 0  # a channel without any weight
    w8, wc = K.weights_to_uint8(weights)
    ref_wc = np.maximum(weights.max(1), np.float32(2.0**-96)) / np.float32(255)
    np.testing.assert_array_equal(wc, ref_wc.astype(np.float32))
    np.testing.assert_array_equal(w8, np.floor(weights / ref_wc[:, None] + 0.5).astype(np.uint8))
    assert (w8.max(1)[np.arange(20) != 3] == 255).all()
    err = np.abs(w8 * wc[:, None] - weights)
    assert (err <= 0.5 * wc[:, None] * (1 + 1e-5)).all()


def _chain_inputs(rng, n_ants=4, n_chans=96):
    ordering = _bls_ordering(n_ants)
    perm, _ = K.baseline_permutation(ordering)
    n_prod = len(ordering)
    dumps = []
    for i in range(3):
        vis, _ = _noise_vis(rng, n_chans, n_prod)
        xeng = np.stack([vis.real, vis.imag], axis=-1) * 1000
        xeng = np.round(xeng).astype(np.int32)
        missing = np.zeros(n_chans, bool)
        if i == 1:
            missing[32:48] = True
        dumps.append((xeng, missing))
    static = np.zeros(n_chans, np.uint8)
    static[:4] = K.STATIC
    return perm, dumps, static


def _run_chain(backend, perm, dumps, static, n_chans):
    proc = K.DumpProcessor(
        n_chans, perm, 1000, output_channels=(8, n_chans - 8), static_flags=static,
        continuum_factor=16, backend=backend,
    )  # fmt: skip
    bl_flags = np.zeros(len(perm), np.uint8)
    bl_flags[2] = K.CAM
    for xeng, missing in dumps:
        proc.process_dump(xeng, missing, bl_flags)
    return proc.finish()


def test_dump_processor_matches_kernels():
    rng = np.random.default_rng(9)
    n_chans = 96
    perm, dumps, static = _chain_inputs(rng, n_chans=n_chans)
    spectral, continuum = _run_chain("cpu", perm, dumps, static, n_chans)
    avg = K.TimeAverager(n_chans - 16, len(perm))
    for xeng, missing in dumps:
        vis, flags = K.convert_dump(xeng, 1000, perm, static, missing)
        flags = K.flag_rfi(vis, flags)
        flags[:, 2] |= K.CAM
        avg.add(vis, flags, 1000, channel_offset=8)
    ref = avg.finish()
    np.testing.assert_array_equal(spectral.correlator_data, ref.vis)
    np.testing.assert_array_equal(spectral.flags, ref.flags)
    w8, wc = K.weights_to_uint8(ref.weights)
    np.testing.assert_array_equal(spectral.weights, w8)
    np.testing.assert_array_equal(spectral.weights_channel, wc)
    assert spectral.n_dumps == 3
    assert continuum.correlator_data.shape == ((n_chans - 16) // 16, len(perm))
    # Baseline 2 is flagged cam in every dump: not excised, flags kept.
    assert (spectral.flags[:, 2] & K.CAM).all()
    # Missing channels of dump 1 are excised by the good dumps 0 and 2 (weight 2 x n_accs, less
    # where RFI was also excised), and come out unflagged.
    lost = np.delete(ref.weights[32 - 8 : 48 - 8], 2, axis=1)  # baseline 2: always flagged
    assert (lost <= 2000).all() and (lost == 2000).mean() > 0.9
    assert not (np.delete(spectral.flags[32 - 8 : 48 - 8], 2, axis=1) & K.DATA_LOST).any()


def test_dump_processor_bad_input():
    perm = np.arange(10, dtype=np.int32)
    with pytest.raises(ValueError, match="backend"):
        K.DumpProcessor(16, perm, 100, backend="opencl")
    with pytest.raises(ValueError, match="continuum"):
        K.DumpProcessor(16, perm, 100, continuum_factor=5)
    proc = K.DumpProcessor(16, perm, 100)
    with pytest.raises(ValueError, match="channels"):
        proc.process_dump(np.zeros((8, 10, 2), np.int32))
    with pytest.raises(RuntimeError):
        proc.finish()


# --- GPU: under NUMBA_ENABLE_CUDASIM=1 (or on a real GPU), small inputs only --------------


def _cuda_available():
    try:
        from numba import cuda

        return cuda.is_available()
    except Exception:
        return False


cuda_only = pytest.mark.skipif(not _cuda_available(), reason="no CUDA GPU or simulator")


@cuda_only
def test_cuda_flagger_matches_cpu():
    from karoo.ingest import kernels_cuda

    rng = np.random.default_rng(10)
    vis, _ = _noise_vis(rng, 64, 40, rfi_fraction=0.03)
    flags = np.zeros(vis.shape, np.uint8)
    flags[rng.random(vis.shape) < 0.05] = K.CAM
    flags[:, 7] = K.DATA_LOST
    got = kernels_cuda.flag_rfi(vis, flags)
    np.testing.assert_array_equal(got, K.flag_rfi(vis, flags))
    assert (got & RFI).any()


@cuda_only
def test_cuda_chain_matches_cpu():
    rng = np.random.default_rng(11)
    n_chans = 64
    perm, dumps, static = _chain_inputs(rng, n_chans=n_chans)
    cpu = _run_chain("cpu", perm, dumps, static, n_chans)
    gpu = _run_chain("cuda", perm, dumps, static, n_chans)
    for a, b in zip(cpu, gpu, strict=True):
        for field in a._fields:
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
