"""Ingest processing kernels on a GPU (numba-cuda).

The per-sample arithmetic is the one of :mod:`karoo.ingest.kernels`, compiled for the device
from the same Python functions, so the GPU chain gives the same visibilities, flags and weights
as the CPU chain. Only the parallel decomposition differs: one thread per (channel, baseline)
for conversion, background, threshold and accumulation; one thread per baseline for the noise
estimate (a bitwise binary search over the channels, with coalesced reads across baselines).

Use it through ``DumpProcessor(..., backend="cuda")``; a dump stays on the device from the copy
of the raw correlator data to the end of the output dump.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from . import kernels as K

_device = cuda.jit(device=True)
_bswap32 = _device(K._bswap32_py)
_unpack_sample = _device(K._unpack_sample_py)
_amplitude = _device(K._amplitude_py)
_window_median13 = _device(K._window_median13_py)
_deviation = _device(K._deviation_py)
_accumulate_sample = _device(K._accumulate_sample_py)
_finalize_sample = _device(K._finalize_sample_py)
_channel_average_at = _device(K._channel_average_at_py)
_weights_row = _device(K._weights_row_py)

_ABS_MASK = np.uint32(0x7FFFFFFF)
_BLOCK_2D = (32, 8)  # (baselines, channels) per thread block: warps read along baselines


def _grid_2d(n_chans: int, n_bls: int) -> tuple[tuple[int, int], tuple[int, int]]:
    bx, by = _BLOCK_2D
    return ((n_bls + bx - 1) // bx, (n_chans + by - 1) // by), _BLOCK_2D


def _grid_1d(n: int, block: int = 128) -> tuple[int, int]:
    return (n + block - 1) // block, block


@cuda.jit
def _convert_kernel(xeng, byteswap, perm, inv_n_accs, static_flags, missing, vis, flags):
    b, c = cuda.grid(2)
    n_chans, n_bls = flags.shape
    if c >= n_chans or b >= n_bls:
        return
    if missing[c]:
        vis[c, b, 0] = 0.0
        vis[c, b, 1] = 0.0
        flags[c, b] = static_flags[c, b] | K.DATA_LOST | K.CAM
        return
    src = perm[b]
    re = xeng[c, src, 0]
    im = xeng[c, src, 1]
    if byteswap:
        re = _bswap32(re)
        im = _bswap32(im)
    vr, vi, f = _unpack_sample(re, im, inv_n_accs)
    vis[c, b, 0] = vr
    vis[c, b, 1] = vi
    flags[c, b] = static_flags[c, b] | f


@cuda.jit(device=True)
def _window_amp(vis, flags, c, b):
    """Amplitude of (c, b) for the median window: +inf when flagged or outside the band."""
    if c < 0 or c >= flags.shape[0] or flags[c, b] != 0:
        return np.float32(math.inf)
    return _amplitude(vis[c, b, 0], vis[c, b, 1])


@cuda.jit
def _background_kernel(vis, flags, dev):
    b, c = cuda.grid(2)
    n_chans, n_bls = flags.shape
    if c >= n_chans or b >= n_bls:
        return
    median = _window_median13(
        _window_amp(vis, flags, c - 6, b), _window_amp(vis, flags, c - 5, b),
        _window_amp(vis, flags, c - 4, b), _window_amp(vis, flags, c - 3, b),
        _window_amp(vis, flags, c - 2, b), _window_amp(vis, flags, c - 1, b),
        _window_amp(vis, flags, c, b), _window_amp(vis, flags, c + 1, b),
        _window_amp(vis, flags, c + 2, b), _window_amp(vis, flags, c + 3, b),
        _window_amp(vis, flags, c + 4, b), _window_amp(vis, flags, c + 5, b),
        _window_amp(vis, flags, c + 6, b),
    )  # fmt: skip
    dev[c, b] = _deviation(_window_amp(vis, flags, c, b), median)


@cuda.jit(device=True)
def _abs_bits(dev_bits, c, b):
    return dev_bits[c, b] & _ABS_MASK


@cuda.jit
def _noise_kernel(dev_bits, dev, n_sigma, noise, thresholds):
    """Per baseline: 1.4826 x median of the non-zero |deviation|s, by binary search on bits."""
    b = cuda.grid(1)
    n_chans, n_bls = dev.shape
    if b >= n_bls:
        return
    zeros = 0
    for c in range(n_chans):
        if _abs_bits(dev_bits, c, b) == 0:
            zeros += 1
    m = n_chans - zeros
    if m == 0:
        noise[b] = math.nan
        thresholds[b] = math.nan
        return
    k = zeros + (m - 1) // 2
    prefix = np.uint32(0)
    for bit in range(30, -1, -1):
        cand = prefix | np.uint32(1 << bit)
        below = 0
        for c in range(n_chans):
            if _abs_bits(dev_bits, c, b) < cand:
                below += 1
        if below <= k:
            prefix = cand
    # prefix is the k-th smallest |dev|: find its value and the next one up.
    lower = np.float64(0.0)
    upper = np.float64(math.inf)
    n_le = 0
    for c in range(n_chans):
        x = _abs_bits(dev_bits, c, b)
        d = np.float64(abs(dev[c, b]))
        if x == prefix:
            lower = d
        if x <= prefix:
            n_le += 1
        elif d < upper:
            upper = d
    median = lower
    if m % 2 == 0 and n_le < k + 2:
        median = 0.5 * (lower + upper)
    sigma = K.MAD_NORMAL * median
    noise[b] = sigma
    thresholds[b] = n_sigma * sigma


@cuda.jit
def _threshold_kernel(dev, thresholds, flag_value, flags, baseline_flags, out):
    b, c = cuda.grid(2)
    n_chans, n_bls = flags.shape
    if c >= n_chans or b >= n_bls:
        return
    rfi = flag_value if dev[c, b] > thresholds[b] else np.uint8(0)
    out[c, b] = flags[c, b] | rfi | baseline_flags[b]


@cuda.jit
def _accumulate_kernel(vis, flags, c0, weight, excise, vis_sum, weight_sum, flag_sum):
    b, c = cuda.grid(2)
    n_chans, n_bls = weight_sum.shape
    if c >= n_chans or b >= n_bls:
        return
    wr, wi, w, f = _accumulate_sample(
        vis[c0 + c, b, 0], vis[c0 + c, b, 1], flags[c0 + c, b], weight, excise
    )
    vis_sum[c, b, 0] += wr
    vis_sum[c, b, 1] += wi
    weight_sum[c, b] += w
    flag_sum[c, b] |= f


@cuda.jit
def _finalize_kernel(vis_sum, weight_sum, flag_sum, excise, vis, weights, flags):
    b, c = cuda.grid(2)
    n_chans, n_bls = weight_sum.shape
    if c >= n_chans or b >= n_bls:
        return
    vr, vi, w, f = _finalize_sample(
        vis_sum[c, b, 0], vis_sum[c, b, 1], weight_sum[c, b], flag_sum[c, b], excise
    )
    vis[c, b, 0] = vr
    vis[c, b, 1] = vi
    weights[c, b] = w
    flags[c, b] = f


@cuda.jit
def _channel_average_kernel(vis, flags, weights, factor, excise, out_vis, out_flags, out_weights):
    b, k = cuda.grid(2)
    n_out, n_bls = out_weights.shape
    if k >= n_out or b >= n_bls:
        return
    vr, vi, w, f = _channel_average_at(vis, flags, weights, factor, excise, k, b)
    out_vis[k, b, 0] = vr
    out_vis[k, b, 1] = vi
    out_weights[k, b] = w
    out_flags[k, b] = f


@cuda.jit
def _weights_kernel(weights, out, weights_channel):
    c = cuda.grid(1)
    if c < weights.shape[0]:
        weights_channel[c] = _weights_row(weights, c, out)


def _l0_from_device(vis, flags, weights, n_dumps: int) -> K.L0Dump:
    """Compress weights on the device and copy one L0 product to the host."""
    n_chans, n_bls = flags.shape
    weights_u8 = cuda.device_array((n_chans, n_bls), np.uint8)
    weights_channel = cuda.device_array(n_chans, np.float32)
    _weights_kernel[_grid_1d(n_chans)](weights, weights_u8, weights_channel)
    host_vis = vis.copy_to_host().view(np.complex64).reshape(n_chans, n_bls)
    return K.L0Dump(
        host_vis,
        flags.copy_to_host(),
        weights_u8.copy_to_host(),
        weights_channel.copy_to_host(),
        n_dumps,
    )


class CudaChain:
    """Device buffers and kernel launches behind ``DumpProcessor(backend="cuda")``."""

    def __init__(self, proc: K.DumpProcessor) -> None:
        if proc.width != K.MEDIAN_WIDTH:
            raise ValueError(f"the CUDA flagger supports width {K.MEDIAN_WIDTH} only")
        self.proc = proc
        n_chans, n_bls = proc.n_chans, proc.n_bls
        start, stop = proc.output_channels
        self.perm = cuda.to_device(proc.bls_permutation)
        self.static_flags = cuda.to_device(proc.static_flags)
        self.no_missing = cuda.to_device(np.zeros(n_chans, np.bool_))
        self.no_baseline_flags = cuda.to_device(np.zeros(n_bls, np.uint8))
        self.vis = cuda.device_array((n_chans, n_bls, 2), np.float32)
        self.flags = cuda.device_array((n_chans, n_bls), np.uint8)
        self.rfi_flags = cuda.device_array((n_chans, n_bls), np.uint8)
        self.dev = cuda.device_array((n_chans, n_bls), np.float32)
        self.noise = cuda.device_array(n_bls, np.float64)
        self.thresholds = cuda.device_array(n_bls, np.float64)
        self.vis_sum = cuda.to_device(np.zeros((stop - start, n_bls, 2), np.float32))
        self.weight_sum = cuda.to_device(np.zeros((stop - start, n_bls), np.float32))
        self.flag_sum = cuda.to_device(np.zeros((stop - start, n_bls), np.uint8))
        self.xeng = None
        self.n_dumps = 0

    def process_dump(self, xeng, byteswap, missing, baseline_flags) -> None:
        proc = self.proc
        n_chans, n_bls = proc.n_chans, proc.n_bls
        if self.xeng is None or self.xeng.shape != xeng.shape:
            self.xeng = cuda.device_array(xeng.shape, np.int32)
        self.xeng.copy_to_device(np.ascontiguousarray(xeng).view(np.int32))
        missing_d = self.no_missing if missing is None else cuda.to_device(missing)
        bl_flags_d = (
            self.no_baseline_flags if baseline_flags is None else cuda.to_device(baseline_flags)
        )
        grid = _grid_2d(n_chans, n_bls)
        _convert_kernel[grid](
            self.xeng, byteswap, self.perm, np.float32(1.0 / proc.n_accs), self.static_flags,
            missing_d, self.vis, self.flags,
        )  # fmt: skip
        _background_kernel[grid](self.vis, self.flags, self.dev)
        _noise_kernel[_grid_1d(n_bls)](
            self.dev.view(np.uint32), self.dev, np.float64(proc.n_sigma), self.noise,
            self.thresholds,
        )  # fmt: skip
        _threshold_kernel[grid](
            self.dev, self.thresholds, K.INGEST_RFI, self.flags, bl_flags_d, self.rfi_flags
        )
        start, stop = proc.output_channels
        _accumulate_kernel[_grid_2d(stop - start, n_bls)](
            self.vis, self.rfi_flags, start, np.float32(proc.n_accs), proc.excise, self.vis_sum,
            self.weight_sum, self.flag_sum,
        )  # fmt: skip
        self.n_dumps += 1

    def finish(self) -> tuple[K.L0Dump, K.L0Dump | None]:
        proc = self.proc
        n_out, n_bls = self.weight_sum.shape
        vis = cuda.device_array((n_out, n_bls, 2), np.float32)
        weights = cuda.device_array((n_out, n_bls), np.float32)
        flags = cuda.device_array((n_out, n_bls), np.uint8)
        _finalize_kernel[_grid_2d(n_out, n_bls)](
            self.vis_sum, self.weight_sum, self.flag_sum, proc.excise, vis, weights, flags
        )
        n_dumps = self.n_dumps
        spectral = _l0_from_device(vis, flags, weights, n_dumps)
        continuum = None
        if proc.continuum_factor is not None:
            factor = proc.continuum_factor
            n_cont = n_out // factor
            c_vis = cuda.device_array((n_cont, n_bls, 2), np.float32)
            c_flags = cuda.device_array((n_cont, n_bls), np.uint8)
            c_weights = cuda.device_array((n_cont, n_bls), np.float32)
            _channel_average_kernel[_grid_2d(n_cont, n_bls)](
                vis, flags, weights, factor, proc.excise, c_vis, c_flags, c_weights
            )
            continuum = _l0_from_device(c_vis, c_flags, c_weights, n_dumps)
        self._reset()
        return spectral, continuum

    def _reset(self) -> None:
        n_out, n_bls = self.weight_sum.shape
        self.vis_sum.copy_to_device(np.zeros((n_out, n_bls, 2), np.float32))
        self.weight_sum.copy_to_device(np.zeros((n_out, n_bls), np.float32))
        self.flag_sum.copy_to_device(np.zeros((n_out, n_bls), np.uint8))
        self.n_dumps = 0

    def noise_estimate(self) -> np.ndarray:
        """Per-baseline noise of the last dump (for tests and diagnostics)."""
        return self.noise.copy_to_host()


def flag_rfi(vis: np.ndarray, flags: np.ndarray, n_sigma: float = 11.0) -> np.ndarray:
    """GPU twin of :func:`karoo.ingest.kernels.flag_rfi` (width 13) for host arrays."""
    vis = np.ascontiguousarray(vis, dtype=np.complex64)
    n_chans, n_bls = vis.shape
    flags = np.ascontiguousarray(np.broadcast_to(flags, (n_chans, n_bls)), dtype=np.uint8)
    vis_d = cuda.to_device(vis.view(np.float32).reshape(n_chans, n_bls, 2))
    flags_d = cuda.to_device(flags)
    dev = cuda.device_array((n_chans, n_bls), np.float32)
    noise = cuda.device_array(n_bls, np.float64)
    thresholds = cuda.device_array(n_bls, np.float64)
    out = cuda.device_array((n_chans, n_bls), np.uint8)
    grid = _grid_2d(n_chans, n_bls)
    _background_kernel[grid](vis_d, flags_d, dev)
    _noise_kernel[_grid_1d(n_bls)](dev.view(np.uint32), dev, np.float64(n_sigma), noise, thresholds)
    no_bl_flags = cuda.to_device(np.zeros(n_bls, np.uint8))
    _threshold_kernel[grid](dev, thresholds, K.INGEST_RFI, flags_d, no_bl_flags, out)
    return out.copy_to_host()
