"""Ingest processing kernels on the CPU (numba).

Everything here is a plain function on numpy arrays, free of I/O, in the order the ingest daemon
applies them to each correlator (CBF) dump:

1. :func:`convert_dump` - int32 re/im pairs to complex64 divided by ``n_accs``, baseline
   permutation, initial flags (static mask, zero visibilities, missing data).
2. :func:`flag_rfi` - median-filter background along frequency, MAD noise per baseline,
   one-sided threshold, flag bit ``ingest_rfi``.
3. :class:`TimeAverager` - weighted accumulation over the dumps of one output dump, with excision.
4. :func:`channel_average` (continuum) and :func:`weights_to_uint8` (L0 weights format).

:class:`DumpProcessor` chains them and can run on the CPU or (``backend="cuda"``) on a GPU
through :mod:`karoo.ingest.kernels_cuda`, which compiles the per-sample functions defined here
for the device so that both back ends compute the same thing.

Arrays are channel-major, ``(n_chans, n_bls)``, as in the CBF input and the L0 output, so nothing
is ever transposed. The semantics follow katsdpingest/katsdpsigproc; deliberate differences are
noted in the docstrings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

# Flag bits (katdal.flags).
from ..flags import CAL_RFI, CAM, DATA_LOST, INGEST_RFI, POSTPROC, PREDICTED_RFI, STATIC

#: Scale factor from median absolute deviation to standard deviation for Gaussian noise.
MAD_NORMAL = 1.4826
#: Width of the median filter for which the fast sorting-network path exists.
MEDIAN_WIDTH = 13
#: The GPU correlator's missing-data marker in the real part.
INT32_MIN = -(2**31)

# While accumulating with excision, bit 6 (cal_rfi, never emitted by ingest) records that at least
# one unflagged sample contributed; flagged samples get their weight scaled by 2^-64 so that
# they vanish next to any unflagged one but can be scaled back if there is none (katsdpingest).
_SEEN_UNFLAGGED = 64
_EXCISE_SCALE = np.float32(2.0**-64)
_EXCISE_UNSCALE = np.float32(2.0**64)
_BLOCK_BLS = 16  # baselines per flagger work item: one AVX-512 vector of float32

_INF = np.inf
_cpu_inline = njit(inline="always", cache=True, nogil=True)


# --------------------------------------------------------------------------------------------
# Per-sample functions. Plain Python on scalars, compiled here for the CPU and by kernels_cuda
# for the GPU (via ``.py_func``), so both back ends share one definition. They may only use
# scalar arithmetic and ``math`` (no calls to other helpers).


def _unpack_sample_py(re, im, inv_n_accs):
    """Scaled (re, im) and initial flag bits of one int32 correlator sample."""
    if re == INT32_MIN:
        # GPU-CBF marker for missing data: katsdpingest stores -0.0 and flags cam + data_lost.
        return np.float32(-0.0), np.float32(0.0), np.uint8(CAM | DATA_LOST)
    vr = np.float32(re) * inv_n_accs
    vi = np.float32(im) * inv_n_accs
    flag = np.uint8(CAM) if (re == 0 and im == 0) else np.uint8(0)
    return vr, vi, flag


def _amplitude_py(re, im):
    """|v| of a complex64 sample, bit-identical to numpy's ``abs`` (and so to katsdpsigproc).

    numpy's SIMD loop computes ``larger * sqrt(fma(r, r, 1))`` with ``r = smaller / larger`` in
    float32; the fma is emulated exactly in double precision.
    """
    a = abs(re)
    b = abs(im)
    larger = max(a, b)
    smaller = min(a, b)
    ratio = smaller / larger if larger > 0 else np.float32(0.0)
    r = np.float64(ratio)
    return np.float32(math.sqrt(np.float32(r * r + 1.0))) * larger


def _window_median13_py(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12):
    """Median of the valid values among 13, where +inf marks an invalid (flagged) value.

    Every second invalid value is turned into -inf, so the valid values always straddle the
    middle of the sorted window: with k invalid values the median is element 6 of the sorted
    list for even k, and the mean of elements 5 and 6 for odd k. That needs only the two middle
    outputs of a sorting network, which compiles to branch-free min/max code that the CPU
    vectorises over baselines. Returns NaN when all 13 values are invalid.
    """
    inf = np.float32(_INF)
    odd = False
    odd ^= x0 == inf
    x0 = x0 if (odd | (x0 != inf)) else -inf
    odd ^= x1 == inf
    x1 = x1 if (odd | (x1 != inf)) else -inf
    odd ^= x2 == inf
    x2 = x2 if (odd | (x2 != inf)) else -inf
    odd ^= x3 == inf
    x3 = x3 if (odd | (x3 != inf)) else -inf
    odd ^= x4 == inf
    x4 = x4 if (odd | (x4 != inf)) else -inf
    odd ^= x5 == inf
    x5 = x5 if (odd | (x5 != inf)) else -inf
    odd ^= x6 == inf
    x6 = x6 if (odd | (x6 != inf)) else -inf
    odd ^= x7 == inf
    x7 = x7 if (odd | (x7 != inf)) else -inf
    odd ^= x8 == inf
    x8 = x8 if (odd | (x8 != inf)) else -inf
    odd ^= x9 == inf
    x9 = x9 if (odd | (x9 != inf)) else -inf
    odd ^= x10 == inf
    x10 = x10 if (odd | (x10 != inf)) else -inf
    odd ^= x11 == inf
    x11 = x11 if (odd | (x11 != inf)) else -inf
    odd ^= x12 == inf
    x12 = x12 if (odd | (x12 != inf)) else -inf
    # Batcher's odd-even merge sort for 16 inputs without the comparators that touch inputs
    # 13-15 (48 comparators; checked exhaustively by the tests with the 0-1 principle). The
    # compiler drops the comparators that do not feed x5 and x6.
    x0, x1 = min(x0, x1), max(x0, x1)
    x2, x3 = min(x2, x3), max(x2, x3)
    x4, x5 = min(x4, x5), max(x4, x5)
    x6, x7 = min(x6, x7), max(x6, x7)
    x8, x9 = min(x8, x9), max(x8, x9)
    x10, x11 = min(x10, x11), max(x10, x11)
    x0, x2 = min(x0, x2), max(x0, x2)
    x1, x3 = min(x1, x3), max(x1, x3)
    x4, x6 = min(x4, x6), max(x4, x6)
    x5, x7 = min(x5, x7), max(x5, x7)
    x8, x10 = min(x8, x10), max(x8, x10)
    x9, x11 = min(x9, x11), max(x9, x11)
    x1, x2 = min(x1, x2), max(x1, x2)
    x5, x6 = min(x5, x6), max(x5, x6)
    x9, x10 = min(x9, x10), max(x9, x10)
    x0, x4 = min(x0, x4), max(x0, x4)
    x1, x5 = min(x1, x5), max(x1, x5)
    x2, x6 = min(x2, x6), max(x2, x6)
    x3, x7 = min(x3, x7), max(x3, x7)
    x8, x12 = min(x8, x12), max(x8, x12)
    x2, x4 = min(x2, x4), max(x2, x4)
    x3, x5 = min(x3, x5), max(x3, x5)
    x10, x12 = min(x10, x12), max(x10, x12)
    x1, x2 = min(x1, x2), max(x1, x2)
    x3, x4 = min(x3, x4), max(x3, x4)
    x5, x6 = min(x5, x6), max(x5, x6)
    x9, x10 = min(x9, x10), max(x9, x10)
    x11, x12 = min(x11, x12), max(x11, x12)
    x0, x8 = min(x0, x8), max(x0, x8)
    x1, x9 = min(x1, x9), max(x1, x9)
    x2, x10 = min(x2, x10), max(x2, x10)
    x3, x11 = min(x3, x11), max(x3, x11)
    x4, x12 = min(x4, x12), max(x4, x12)
    x4, x8 = min(x4, x8), max(x4, x8)
    x5, x9 = min(x5, x9), max(x5, x9)
    x6, x10 = min(x6, x10), max(x6, x10)
    x7, x11 = min(x7, x11), max(x7, x11)
    x2, x4 = min(x2, x4), max(x2, x4)
    x3, x5 = min(x3, x5), max(x3, x5)
    x6, x8 = min(x6, x8), max(x6, x8)
    x7, x9 = min(x7, x9), max(x7, x9)
    x10, x12 = min(x10, x12), max(x10, x12)
    x1, x2 = min(x1, x2), max(x1, x2)
    x3, x4 = min(x3, x4), max(x3, x4)
    x5, x6 = min(x5, x6), max(x5, x6)
    x7, x8 = min(x7, x8), max(x7, x8)
    x9, x10 = min(x9, x10), max(x9, x10)
    x11, x12 = min(x11, x12), max(x11, x12)
    # Mean in double precision, as pandas' rolling median computes it.
    return 0.5 * (np.float64(x5) + np.float64(x6)) if odd else np.float64(x6)


def _deviation_py(centre, median):
    """Deviation of a sample from its background; 0 for a flagged (+inf) sample."""
    if centre == np.float32(_INF):
        return np.float32(0.0)
    return np.float32(np.float64(centre) - median)


def _accumulate_sample_py(vr, vi, flag, weight, excise):
    """Weighted contribution (w*re, w*im, w, flag bits) of one sample to an output dump."""
    if excise:
        if flag != 0:
            weight = weight * _EXCISE_SCALE
        else:
            flag = np.uint8(_SEEN_UNFLAGGED)
    return weight * vr, weight * vi, weight, flag


def _finalize_sample_py(sr, si, w, flag, excise):
    """Turn accumulated (w*vis, w, flags) into (vis, weight, flags) of the output dump."""
    if excise:
        if flag & _SEEN_UNFLAGGED:
            flag = np.uint8(0)
        else:
            # Only flagged samples contributed: undo their down-weighting.
            w = w * _EXCISE_UNSCALE
            sr = sr * _EXCISE_UNSCALE
            si = si * _EXCISE_UNSCALE
    if w > 0:
        return sr / w, si / w, w, flag
    # Nothing at all contributed (cannot happen through TimeAverager, which needs a dump).
    return np.float32(0.0), np.float32(0.0), np.float32(0.0), np.uint8(flag | DATA_LOST)


def _bswap32_py(x):
    """Byte-swapped int32 (big-endian correlator data)."""
    x = np.uint32(x)
    return np.int32(
        ((x & 0xFF) << 24) | ((x & 0xFF00) << 8) | ((x >> 8) & 0xFF00) | ((x >> 24) & 0xFF)
    )


_bswap32 = _cpu_inline(_bswap32_py)
_unpack_sample = _cpu_inline(_unpack_sample_py)
_amplitude = _cpu_inline(_amplitude_py)
_window_median13 = _cpu_inline(_window_median13_py)
_deviation = _cpu_inline(_deviation_py)
_accumulate_sample = _cpu_inline(_accumulate_sample_py)
_finalize_sample = _cpu_inline(_finalize_sample_py)


# --------------------------------------------------------------------------------------------
# Baseline ordering


def baseline_permutation(
    bls_ordering: Sequence[tuple[str, str]], antennas: Sequence[str] | None = None
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Choose and order the correlation products that ingest emits.

    Products whose second antenna sorts before the first (the duplicate half in some correlator
    modes) and, if `antennas` is given, products involving other antennas are dropped. The rest
    are stably sorted as katsdpingest does: autocorrelations first, then same-polarisation
    before cross-hand products, then by the two polarisations (auto hh, vv, hv, vh, cross hh,
    vv, hv, vh), keeping the correlator's order within each group.

    Parameters
    ----------
    bls_ordering
        The CBF ``bls_ordering``: one (input A, input B) label pair per correlation product,
        labels being antenna name plus one polarisation letter (``m001h``).
    antennas
        Antenna names to keep (all if None).

    Returns
    -------
    permutation
        int32 array, for each output baseline the index of its CBF correlation product
        (a gather index, unlike katsdpingest's scatter table).
    ordering
        The output ``bls_ordering`` (what ingest writes as ``sdp_l0_bls_ordering``).
    """
    keep = None if antennas is None else set(antennas)
    keys = []
    for index, (a, b) in enumerate(bls_ordering):
        a, b = str(a), str(b)
        ant_a, pol_a, ant_b, pol_b = a[:-1], a[-1], b[:-1], b[-1]
        if ant_b < ant_a:
            continue
        if keep is not None and (ant_a not in keep or ant_b not in keep):
            continue
        pol_rank = {"h": 0, "v": 1}
        key = (ant_a != ant_b, pol_a != pol_b, pol_rank.get(pol_a, 2), pol_rank.get(pol_b, 2))
        keys.append((key, index, (a, b)))
    keys.sort(key=lambda item: item[0])  # stable: correlator order within a group
    permutation = np.array([index for _, index, _ in keys], dtype=np.int32)
    return permutation, [pair for _, _, pair in keys]


# --------------------------------------------------------------------------------------------
# Conversion


@njit(parallel=True, nogil=True, cache=True)
def _convert_cpu(xeng, byteswap, perm, inv_n_accs, static_flags, missing, vis, flags):
    n_chans, n_bls = flags.shape
    for c in prange(n_chans):
        if missing[c]:
            for b in range(n_bls):
                vis[c, b, 0] = 0.0
                vis[c, b, 1] = 0.0
                flags[c, b] = static_flags[c, b] | DATA_LOST | CAM
            continue
        for b in range(n_bls):
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


def _as_flags_2d(flags: np.ndarray | None, shape: tuple[int, int], name: str) -> np.ndarray:
    """Per-channel (F,), per-baseline-and-channel (F, B) or no flags as an (F, B) uint8 view."""
    if flags is None:
        return np.broadcast_to(np.zeros(1, np.uint8)[:, np.newaxis], shape)
    flags = np.asarray(flags)
    if flags.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8 flag bits, not {flags.dtype}")
    if flags.ndim == 1:
        if flags.shape[0] != shape[0]:
            raise ValueError(f"{name} has {flags.shape[0]} channels, expected {shape[0]}")
        return np.broadcast_to(flags[:, np.newaxis], shape)
    if flags.shape != shape:
        raise ValueError(f"{name} has shape {flags.shape}, expected {shape}")
    return flags


def _check_xeng(xeng_raw: np.ndarray, bls_permutation: np.ndarray) -> tuple[np.ndarray, bool]:
    xeng_raw = np.asarray(xeng_raw)
    if xeng_raw.ndim != 3 or xeng_raw.shape[2] != 2 or xeng_raw.dtype.kind != "i":
        raise ValueError(
            f"xeng_raw must be int32 of shape (n_chans, n_bls, 2), not {xeng_raw.dtype} "
            f"{xeng_raw.shape}"
        )
    if xeng_raw.dtype.itemsize != 4:
        raise ValueError(f"xeng_raw must be 32-bit integers, not {xeng_raw.dtype}")
    perm = np.asarray(bls_permutation)
    if perm.ndim != 1 or perm.size == 0:
        raise ValueError("bls_permutation must be a non-empty 1-D index array")
    if perm.min() < 0 or perm.max() >= xeng_raw.shape[1]:
        raise ValueError(
            f"bls_permutation indices must lie in [0, {xeng_raw.shape[1]}) (the CBF products)"
        )
    byteswap = not xeng_raw.dtype.isnative
    return xeng_raw.view(xeng_raw.dtype.newbyteorder("=")), byteswap


def convert_dump(
    xeng_raw: np.ndarray,
    n_accs: int,
    bls_permutation: np.ndarray,
    static_flags: np.ndarray | None = None,
    missing: np.ndarray | None = None,
    *,
    vis: np.ndarray | None = None,
    flags: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Convert one CBF dump to normalised visibilities and initial flags.

    Parameters
    ----------
    xeng_raw
        int32 (either byte order) of shape (n_chans, n_cbf_products, 2): real and imaginary
        correlator sums.
    n_accs
        Number of accumulations per dump; visibilities are divided by it.
    bls_permutation
        For each output baseline the index of its CBF product (see :func:`baseline_permutation`).
    static_flags
        uint8 flag bits ORed into every dump: per channel (n_chans,) or (n_chans, n_bls).
    missing
        bool (n_chans,): channels whose X-engine heap did not arrive. Their visibilities are 0
        and flagged ``data_lost | cam`` whatever the buffer holds. Unlike katsdpingest, which
        overwrites the static bits of such channels, the static bits are kept.
    vis, flags
        Optional output arrays (complex64 and uint8, (n_chans, n_bls)).

    Returns
    -------
    vis
        complex64 (n_chans, n_bls), ``xeng_raw / n_accs`` in output baseline order.
    flags
        uint8 (n_chans, n_bls): static bits, ``cam`` where the visibility is exactly 0 (the old
        correlator's missing-data convention), ``cam | data_lost`` where the real part is
        INT32_MIN (the GPU correlator's marker; the visibility becomes -0.0), ``data_lost | cam``
        for missing channels.
    """
    xeng, byteswap = _check_xeng(xeng_raw, bls_permutation)
    if n_accs <= 0:
        raise ValueError(f"n_accs must be positive, not {n_accs}")
    n_chans = xeng.shape[0]
    perm = np.ascontiguousarray(bls_permutation, dtype=np.int32)
    shape = (n_chans, perm.shape[0])
    static = _as_flags_2d(static_flags, shape, "static_flags")
    if missing is None:
        missing = np.zeros(n_chans, np.bool_)
    missing = np.asarray(missing, dtype=np.bool_)
    if missing.shape != (n_chans,):
        raise ValueError(f"missing must have shape ({n_chans},), not {missing.shape}")
    if vis is None:
        vis = np.empty(shape, np.complex64)
    if flags is None:
        flags = np.empty(shape, np.uint8)
    if vis.shape != shape or vis.dtype != np.complex64 or not vis.flags.c_contiguous:
        raise ValueError(f"vis must be C-contiguous complex64 of shape {shape}")
    if flags.shape != shape or flags.dtype != np.uint8:
        raise ValueError(f"flags must be uint8 of shape {shape}")
    _convert_cpu(
        xeng, byteswap, perm, np.float32(1.0 / n_accs), static, missing,
        vis.view(np.float32).reshape(*shape, 2), flags,
    )  # fmt: skip
    return vis, flags


# --------------------------------------------------------------------------------------------
# RFI flagging


@njit(nogil=True, cache=True)
def _select_inplace(buf, n, k):
    """Rearrange buf[:n] so that buf[k] is the k-th smallest and buf[k+1:n] >= buf[k]."""
    lo = 0
    hi = n - 1
    while hi > lo:
        mid = (lo + hi) // 2
        # median of three as pivot, moved to hi
        if buf[mid] < buf[lo]:
            buf[mid], buf[lo] = buf[lo], buf[mid]
        if buf[hi] < buf[lo]:
            buf[hi], buf[lo] = buf[lo], buf[hi]
        if buf[mid] < buf[hi]:
            buf[mid], buf[hi] = buf[hi], buf[mid]
        pivot = buf[hi]
        i = lo - 1
        j = hi
        while True:
            i += 1
            while buf[i] < pivot:
                i += 1
            j -= 1
            while j > lo and buf[j] > pivot:
                j -= 1
            if i >= j:
                break
            buf[i], buf[j] = buf[j], buf[i]
        buf[i], buf[hi] = buf[hi], buf[i]
        if i == k:
            return
        if i < k:
            lo = i + 1
        else:
            hi = i - 1


@njit(nogil=True, cache=True)
def _median_inplace(buf, n):
    """Median of buf[:n] (mean of the middle two for even n), reordering buf; NaN if n == 0."""
    if n == 0:
        return np.nan
    k = (n - 1) // 2
    _select_inplace(buf, n, k)
    lower = np.float64(buf[k])
    if n % 2 == 1:
        return lower
    upper = buf[k + 1]
    for i in range(k + 2, n):
        upper = min(upper, buf[i])
    return 0.5 * (lower + np.float64(upper))


@njit(nogil=True, cache=True)
def _window_median_generic(amp, c, half):
    """Median of the valid (finite) values in amp[c:c+2*half+1] for widths other than 13."""
    width = 2 * half + 1
    buf = np.empty(width, np.float32)
    n = 0
    for k in range(width):
        x = amp[c + k]
        if x != np.inf:
            buf[n] = x
            n += 1
    return _median_inplace(buf, n)


_ABS_MASK = np.uint32(0x7FFFFFFF)
_COARSE_BITS = 11  # top bits settled by full passes before the candidates are compacted


@njit(nogil=True, cache=True)
def _count_below(bits, n, cand):
    count = 0
    for i in range(n):
        count += np.int32((bits[i] & _ABS_MASK) < cand)
    return count


@njit(nogil=True, cache=True)
def _kth_smallest_abs(bits, k, scratch):
    """Bit pattern of the k-th smallest of |x| over float32 values given as their bit patterns.

    The bit patterns of non-negative floats sort like the floats, so this is a binary search
    from the top bit that counts, for each candidate, the values below it: branch-free passes
    that vectorise, unlike quickselect. After the top bits are settled, the few values that
    share them are compacted into `scratch` and the search finishes on those.
    """
    n = bits.shape[0]
    prefix = np.uint32(0)
    for bit in range(30, 30 - _COARSE_BITS, -1):
        cand = prefix | np.uint32(1 << bit)
        if _count_below(bits, n, cand) <= k:
            prefix = cand
    shift = 31 - _COARSE_BITS
    top = prefix >> shift
    below = 0
    m = 0
    for i in range(n):
        x = bits[i] & _ABS_MASK
        scratch[m] = x
        same = (x >> shift) == top
        m += np.int32(same)
        below += np.int32((x >> shift) < top)
    k -= below
    for bit in range(shift - 1, -1, -1):
        cand = prefix | np.uint32(1 << bit)
        if _count_below(scratch, m, cand) <= k:
            prefix = cand
    return prefix


@njit(parallel=True, nogil=True, cache=True)
def _flag_rfi_cpu(vis, flags, half, n_sigma, flag_value, out, noise, n_workers):
    n_chans, n_bls = flags.shape
    n_blocks = (n_bls + _BLOCK_BLS - 1) // _BLOCK_BLS
    inf = np.float32(np.inf)
    # One work list per thread, so that the scratch arrays are allocated once per thread. A block
    # of baselines is transposed to baseline-major so that the median and the noise estimate
    # run along contiguous channels.
    for worker in prange(n_workers):
        # Amplitudes with `half` channels of +inf (invalid) at each end, so that the window
        # shrinks at the band edges as pandas' rolling(center=True, min_periods=1) does.
        amp = np.empty((_BLOCK_BLS, n_chans + 2 * half), np.float32)
        dev = np.empty((_BLOCK_BLS, n_chans), np.float32)
        scratch = np.empty(n_chans, np.uint32)
        thresholds = np.empty(_BLOCK_BLS, np.float64)
        low_bits = np.empty(1, np.uint32)
        for block in range(worker, n_blocks, n_workers):
            b0 = block * _BLOCK_BLS
            nb = min(_BLOCK_BLS, n_bls - b0)
            amp[:, :half] = inf
            amp[:, n_chans + half :] = inf
            for c in range(n_chans):
                for j in range(nb):
                    a = _amplitude(vis[c, b0 + j, 0], vis[c, b0 + j, 1])
                    amp[j, c + half] = a if flags[c, b0 + j] == 0 else inf
            for j in range(nb):
                a = amp[j]
                d = dev[j]
                if half == MEDIAN_WIDTH // 2:
                    for c in range(n_chans):
                        median = _window_median13(
                            a[c], a[c + 1], a[c + 2], a[c + 3], a[c + 4], a[c + 5], a[c + 6],
                            a[c + 7], a[c + 8], a[c + 9], a[c + 10], a[c + 11], a[c + 12],
                        )  # fmt: skip
                        d[c] = _deviation(a[c + 6], median)
                else:
                    for c in range(n_chans):
                        d[c] = _deviation(a[c + half], _window_median_generic(a, c, half))
                # Noise: 1.4826 x median of the non-zero |deviation|s over all channels. Zeros
                # sort first, so that is the (zeros + (m - 1) // 2)-th smallest |deviation|.
                bits = d.view(np.uint32)
                zeros = 0
                for c in range(n_chans):
                    zeros += np.int32((bits[c] & _ABS_MASK) == 0)
                m = n_chans - zeros
                if m == 0:
                    sigma = np.nan  # every deviation zero: flags nothing, as katsdpsigproc
                else:
                    k = zeros + (m - 1) // 2
                    low = _kth_smallest_abs(bits, k, scratch)
                    low_bits[0] = low
                    median = np.float64(low_bits.view(np.float32)[0])
                    if m % 2 == 0:
                        # Mean with the next value up, which may equal this one.
                        n_le = 0
                        upper = inf
                        for c in range(n_chans):
                            x = bits[c] & _ABS_MASK
                            n_le += np.int32(x <= low)
                            upper = min(upper, abs(d[c]) if x > low else inf)
                        if n_le < k + 2:
                            median = 0.5 * (median + np.float64(upper))
                    sigma = MAD_NORMAL * median
                noise[b0 + j] = sigma
                thresholds[j] = n_sigma * sigma
            for c in range(n_chans):
                for j in range(nb):
                    rfi = flag_value if dev[j, c] > thresholds[j] else np.uint8(0)
                    out[c, b0 + j] = flags[c, b0 + j] | rfi


def flag_rfi(
    vis: np.ndarray,
    flags: np.ndarray | None = None,
    width: int = MEDIAN_WIDTH,
    n_sigma: float = 11.0,
    flag_value: int = INGEST_RFI,
    *,
    out: np.ndarray | None = None,
    noise: np.ndarray | None = None,
) -> np.ndarray:
    """Flag RFI in one dump: median-filter background, MAD noise, simple threshold.

    For each baseline, the background is the running median of the amplitudes ``|vis|`` over
    `width` channels centred on each channel, excluding samples with any input flag; at the band
    edges the window is truncated. The deviation is ``|vis| - background`` (0 for flagged
    samples). The noise of a baseline is ``1.4826 * median(|deviation|)`` over its non-zero
    deviations in all channels given (guard channels included), and a sample is flagged when
    ``deviation > n_sigma * noise`` (one-sided). This is katsdpingest's flagger (katsdpsigproc's
    ``BackgroundMedianFilter`` + ``NoiseEstMAD`` + ``ThresholdSimple``) and gives the same flags
    as its host version; medians of an even count are the mean of the middle two.

    Parameters
    ----------
    vis
        complex64 (n_chans, n_bls).
    flags
        uint8 initial flags (n_chans, n_bls), per channel (n_chans,), or None. Any non-zero
        value excludes a sample from the background.
    width
        Odd median filter width in channels. 13 uses a vectorised sorting network; other widths
        use a slower generic path.
    n_sigma
        Threshold in units of the noise estimate.
    flag_value
        Bits set on RFI (``ingest_rfi``).
    out
        Optional uint8 (n_chans, n_bls) output; may be `flags` itself.
    noise
        Optional float64 (n_bls,) array that receives the per-baseline noise estimate (NaN where
        every deviation is zero, which flags nothing).

    Returns
    -------
    flags
        ``flags | rfi_flags`` as uint8 (n_chans, n_bls).
    """
    vis = np.asarray(vis)
    if vis.ndim != 2 or vis.dtype != np.complex64:
        raise ValueError(f"vis must be complex64 (n_chans, n_bls), not {vis.dtype} {vis.shape}")
    if width < 1 or width % 2 != 1:
        raise ValueError(f"width must be a positive odd number, not {width}")
    vis = np.ascontiguousarray(vis)
    shape = vis.shape
    in_flags = _as_flags_2d(flags, shape, "flags")
    if out is None:
        out = np.empty(shape, np.uint8)
    elif out.shape != shape or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 of shape {shape}")
    if noise is None:
        noise = np.empty(shape[1], np.float64)
    elif noise.shape != (shape[1],) or noise.dtype != np.float64:
        raise ValueError(f"noise must be float64 of shape ({shape[1]},)")
    _flag_rfi_cpu(
        vis.view(np.float32).reshape(*shape, 2), in_flags, width // 2, np.float64(n_sigma),
        np.uint8(flag_value), out, noise, max(1, min(numba.get_num_threads(), shape[1] // 16)),
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# Time averaging, continuum averaging, weights


@njit(parallel=True, nogil=True, cache=True)
def _accumulate_cpu(vis, flags, c0, weight, excise, vis_sum, weight_sum, flag_sum):
    n_chans, n_bls = weight_sum.shape
    for c in prange(n_chans):
        for b in range(n_bls):
            wr, wi, w, f = _accumulate_sample(
                vis[c0 + c, b, 0], vis[c0 + c, b, 1], flags[c0 + c, b], weight, excise
            )
            vis_sum[c, b, 0] += wr
            vis_sum[c, b, 1] += wi
            weight_sum[c, b] += w
            flag_sum[c, b] |= f


@njit(parallel=True, nogil=True, cache=True)
def _finalize_cpu(vis_sum, weight_sum, flag_sum, excise, vis, weights, flags):
    n_chans, n_bls = weight_sum.shape
    for c in prange(n_chans):
        for b in range(n_bls):
            vr, vi, w, f = _finalize_sample(
                vis_sum[c, b, 0], vis_sum[c, b, 1], weight_sum[c, b], flag_sum[c, b], excise
            )
            vis[c, b, 0] = vr
            vis[c, b, 1] = vi
            weights[c, b] = w
            flags[c, b] = f


class AveragedDump(NamedTuple):
    """Visibilities, flags and float32 weights of one output (L0) dump."""

    vis: np.ndarray
    flags: np.ndarray
    weights: np.ndarray
    n_dumps: int


class TimeAverager:
    """Weighted average of CBF dumps into one output dump, with optional excision.

    Each sample contributes ``weight * vis`` and ``weight`` (katsdpingest uses ``n_accs``: weights
    count correlator accumulations; they are not derived from the data), and its flags are ORed.
    With excision, flagged samples are left out of the average wherever at least one unflagged
    sample contributed, and then the output is unflagged; where every contributing sample was
    flagged, all of them are averaged and the OR of their flags is kept.

    Parameters
    ----------
    n_chans, n_bls
        Output dump shape.
    excise
        Excise flagged data (katsdpingest's default).
    """

    def __init__(self, n_chans: int, n_bls: int, excise: bool = True) -> None:
        self.excise = bool(excise)
        self.vis_sum = np.zeros((n_chans, n_bls), np.complex64)
        self.weight_sum = np.zeros((n_chans, n_bls), np.float32)
        self.flag_sum = np.zeros((n_chans, n_bls), np.uint8)
        self.n_dumps = 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight_sum.shape

    def add(
        self, vis: np.ndarray, flags: np.ndarray, weight: float, channel_offset: int = 0
    ) -> None:
        """Accumulate one dump.

        Parameters
        ----------
        vis, flags
            complex64 and uint8 (n_chans_in, n_bls) of one CBF dump.
        weight
            Weight of every sample of the dump (``n_accs``).
        channel_offset
            First input channel of the output range (guard channels are flagged, not output).
        """
        n_chans, n_bls = self.shape
        if vis.ndim != 2 or vis.shape[1] != n_bls or vis.dtype != np.complex64:
            raise ValueError(f"vis must be complex64 (n_chans, {n_bls}), not {vis.shape}")
        if flags.shape != vis.shape or flags.dtype != np.uint8:
            raise ValueError("flags must be uint8 of the same shape as vis")
        if channel_offset < 0 or channel_offset + n_chans > vis.shape[0]:
            raise ValueError(
                f"channels {channel_offset}:{channel_offset + n_chans} outside the dump's "
                f"{vis.shape[0]} channels"
            )
        vis = np.ascontiguousarray(vis)
        _accumulate_cpu(
            vis.view(np.float32).reshape(*vis.shape, 2), flags, channel_offset,
            np.float32(weight), self.excise, self.vis_sum.view(np.float32).reshape(n_chans,
            n_bls, 2), self.weight_sum, self.flag_sum,
        )  # fmt: skip
        self.n_dumps += 1

    def finish(self) -> AveragedDump:
        """Return the averaged dump and reset the accumulators."""
        if self.n_dumps == 0:
            raise RuntimeError("no dumps were accumulated")
        n_chans, n_bls = self.shape
        vis = np.empty((n_chans, n_bls), np.complex64)
        weights = np.empty((n_chans, n_bls), np.float32)
        flags = np.empty((n_chans, n_bls), np.uint8)
        _finalize_cpu(
            self.vis_sum.view(np.float32).reshape(n_chans, n_bls, 2), self.weight_sum,
            self.flag_sum, self.excise, vis.view(np.float32).reshape(n_chans, n_bls, 2),
            weights, flags,
        )  # fmt: skip
        result = AveragedDump(vis, flags, weights, self.n_dumps)
        self.reset()
        return result

    def reset(self) -> None:
        self.vis_sum.fill(0)
        self.weight_sum.fill(0)
        self.flag_sum.fill(0)
        self.n_dumps = 0


def _channel_average_at_py(vis, flags, weights, factor, excise, k, b):
    """Continuum channel k of baseline b: weighted mean, summed weight and ORed flags."""
    good = False
    for c in range(k * factor, (k + 1) * factor):
        good |= flags[c, b] == 0
    sr = np.float32(0.0)
    si = np.float32(0.0)
    sw = np.float32(0.0)
    sf = np.uint8(0)
    for c in range(k * factor, (k + 1) * factor):
        if not (excise and good and flags[c, b] != 0):
            w = weights[c, b]
            sr += w * vis[c, b, 0]
            si += w * vis[c, b, 1]
            sw += w
            sf |= flags[c, b]
    if sw > 0:
        return sr / sw, si / sw, sw, sf
    return np.float32(0.0), np.float32(0.0), sw, sf


def _weights_row_py(weights, c, out):
    """Compress the weights of channel c to uint8 in `out`; return weights_channel[c]."""
    peak = np.float32(2.0**-96)
    for b in range(weights.shape[1]):
        peak = max(peak, weights[c, b])
    scale = peak / np.float32(255.0)
    for b in range(weights.shape[1]):
        out[c, b] = np.uint8(min(math.floor(weights[c, b] / scale + np.float32(0.5)), 255))
    return scale


_channel_average_at = _cpu_inline(_channel_average_at_py)
_weights_row = _cpu_inline(_weights_row_py)


@njit(parallel=True, nogil=True, cache=True)
def _channel_average_cpu(vis, flags, weights, factor, excise, out_vis, out_flags, out_weights):
    n_out, n_bls = out_weights.shape
    for k in prange(n_out):
        for b in range(n_bls):
            vr, vi, w, f = _channel_average_at(vis, flags, weights, factor, excise, k, b)
            out_vis[k, b, 0] = vr
            out_vis[k, b, 1] = vi
            out_weights[k, b] = w
            out_flags[k, b] = f


def channel_average(
    vis: np.ndarray, flags: np.ndarray, weights: np.ndarray, factor: int, excise: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Average groups of `factor` adjacent channels (the continuum product).

    Weighted mean of the visibilities, sum of the weights, OR of the flags. With excision, the
    flagged channels of a group are left out when at least one channel of the group (for that
    baseline) is unflagged, and the result is then unflagged. Applied to an output of
    :class:`TimeAverager` this equals katsdpingest's continuum average of the accumulators.

    Parameters
    ----------
    vis, flags, weights
        complex64, uint8 and float32 (n_chans, n_bls).
    factor
        Channels per continuum channel; must divide n_chans.
    excise
        Leave flagged channels out where possible.

    Returns
    -------
    vis, flags, weights
        Of shape (n_chans // factor, n_bls).
    """
    n_chans, n_bls = weights.shape
    if factor < 1 or n_chans % factor:
        raise ValueError(f"continuum factor {factor} does not divide {n_chans} channels")
    if vis.shape != (n_chans, n_bls) or flags.shape != (n_chans, n_bls):
        raise ValueError("vis, flags and weights must have the same shape")
    vis = np.ascontiguousarray(vis, dtype=np.complex64)
    n_out = n_chans // factor
    out_vis = np.empty((n_out, n_bls), np.complex64)
    out_flags = np.empty((n_out, n_bls), np.uint8)
    out_weights = np.empty((n_out, n_bls), np.float32)
    _channel_average_cpu(
        vis.view(np.float32).reshape(n_chans, n_bls, 2), flags, weights.astype(np.float32,
        copy=False), factor, bool(excise), out_vis.view(np.float32).reshape(n_out, n_bls, 2),
        out_flags, out_weights,
    )  # fmt: skip
    return out_vis, out_flags, out_weights


@njit(parallel=True, nogil=True, cache=True)
def _weights_to_uint8_cpu(weights, out, weights_channel):
    for c in prange(weights.shape[0]):
        weights_channel[c] = _weights_row(weights, c, out)


def weights_to_uint8(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compress float weights to the L0 format: uint8 per visibility times float32 per channel.

    ``weights_channel = max(max over baselines of weights, 2**-96) / 255`` and
    ``weights = floor(weights / weights_channel + 0.5)``, so the largest weight in each channel
    maps to 255 and ``weights * weights_channel`` recovers the weight to within half a step. As in
    katsdpingest, weights are not power-scaled here: readers divide by the product of the
    autocorrelation powers when ``need_weights_power_scale`` is set in telstate.

    Parameters
    ----------
    weights
        float32 (n_chans, n_bls), non-negative.

    Returns
    -------
    weights
        uint8 (n_chans, n_bls).
    weights_channel
        float32 (n_chans,).
    """
    weights = np.asarray(weights, dtype=np.float32)
    if weights.ndim != 2:
        raise ValueError(f"weights must be 2-D (n_chans, n_bls), not {weights.shape}")
    out = np.empty(weights.shape, np.uint8)
    weights_channel = np.empty(weights.shape[0], np.float32)
    _weights_to_uint8_cpu(weights, out, weights_channel)
    return out, weights_channel


# --------------------------------------------------------------------------------------------
# The per-dump chain


class L0Dump(NamedTuple):
    """One output dump in the L0 stream's format (channel-major)."""

    correlator_data: np.ndarray  # complex64 (n_chans, n_bls)
    flags: np.ndarray  # uint8 (n_chans, n_bls)
    weights: np.ndarray  # uint8 (n_chans, n_bls)
    weights_channel: np.ndarray  # float32 (n_chans,)
    n_dumps: int  # CBF dumps that contributed


def make_l0_dump(averaged: AveragedDump) -> L0Dump:
    """Compress the weights of an averaged dump into the L0 format."""
    weights, weights_channel = weights_to_uint8(averaged.weights)
    return L0Dump(averaged.vis, averaged.flags, weights, weights_channel, averaged.n_dumps)


class DumpProcessor:
    """Ingest's per-dump chain: convert, flag, accumulate; and the output at the end of a group.

    Parameters
    ----------
    n_chans
        Channels per CBF dump given to this processor (output range plus guard channels).
    bls_permutation
        Output baseline -> CBF product index (:func:`baseline_permutation`).
    n_accs
        CBF accumulations per dump (divisor of the visibilities and weight of each sample).
    output_channels
        (start, stop) of the output range within the input channels (default all); the
        channels outside are guard channels: flagged for context, never output.
    static_flags
        uint8 flag bits per input channel (n_chans,) or (n_chans, n_bls).
    excise
        Excise flagged data when averaging.
    continuum_factor
        Channels per continuum channel, or None for no continuum product.
    width, n_sigma
        Flagger parameters (:func:`flag_rfi`).
    backend
        ``"cpu"`` (numba) or ``"cuda"`` (numba-cuda; the dump stays on the GPU from the
        host-to-device copy of the raw data to the end of the group).
    """

    def __init__(
        self,
        n_chans: int,
        bls_permutation: np.ndarray,
        n_accs: int,
        *,
        output_channels: tuple[int, int] | None = None,
        static_flags: np.ndarray | None = None,
        excise: bool = True,
        continuum_factor: int | None = None,
        width: int = MEDIAN_WIDTH,
        n_sigma: float = 11.0,
        backend: str = "cpu",
    ) -> None:
        self.n_chans = int(n_chans)
        self.bls_permutation = np.ascontiguousarray(bls_permutation, dtype=np.int32)
        self.n_bls = int(self.bls_permutation.shape[0])
        if n_accs <= 0:
            raise ValueError(f"n_accs must be positive, not {n_accs}")
        self.n_accs = int(n_accs)
        start, stop = (0, self.n_chans) if output_channels is None else output_channels
        if not 0 <= start < stop <= self.n_chans:
            raise ValueError(f"output_channels {output_channels} outside 0:{self.n_chans}")
        self.output_channels = (int(start), int(stop))
        if continuum_factor is not None and (stop - start) % continuum_factor:
            raise ValueError(
                f"continuum factor {continuum_factor} does not divide {stop - start} channels"
            )
        self.continuum_factor = continuum_factor
        shape = (self.n_chans, self.n_bls)
        self.static_flags = np.ascontiguousarray(_as_flags_2d(static_flags, shape, "static"))
        self.excise = bool(excise)
        self.width = int(width)
        self.n_sigma = float(n_sigma)
        if backend == "cpu":
            self._impl = _CpuChain(self)
        elif backend == "cuda":
            from . import kernels_cuda

            self._impl = kernels_cuda.CudaChain(self)
        else:
            raise ValueError(f"unknown backend {backend!r} (expected 'cpu' or 'cuda')")
        self.backend = backend

    @property
    def n_dumps(self) -> int:
        """CBF dumps accumulated into the current output dump."""
        return self._impl.n_dumps

    def process_dump(
        self,
        xeng_raw: np.ndarray,
        missing: np.ndarray | None = None,
        baseline_flags: np.ndarray | None = None,
    ) -> None:
        """Convert, flag and accumulate one CBF dump.

        Parameters
        ----------
        xeng_raw
            int32 (n_chans, n_cbf_products, 2).
        missing
            bool (n_chans,): channels whose heap is missing (flagged ``data_lost``).
        baseline_flags
            uint8 (n_bls,) bits ORed into every channel of a baseline after flagging (``cam``
            from ``*_data_suspect`` sensors); they do not exclude data from the background.
        """
        xeng, byteswap = _check_xeng(xeng_raw, self.bls_permutation)
        if xeng.shape[0] != self.n_chans:
            raise ValueError(f"xeng_raw has {xeng.shape[0]} channels, expected {self.n_chans}")
        if missing is not None:
            missing = np.asarray(missing, dtype=np.bool_)
            if missing.shape != (self.n_chans,):
                raise ValueError(f"missing must have shape ({self.n_chans},)")
        if baseline_flags is not None:
            baseline_flags = np.asarray(baseline_flags)
            if baseline_flags.shape != (self.n_bls,) or baseline_flags.dtype != np.uint8:
                raise ValueError(f"baseline_flags must be uint8 of shape ({self.n_bls},)")
        self._impl.process_dump(xeng, byteswap, missing, baseline_flags)

    def finish(self) -> tuple[L0Dump, L0Dump | None]:
        """End the output dump: return the spectral and continuum (or None) L0 products."""
        if self.n_dumps == 0:
            raise RuntimeError("no dumps were accumulated")
        return self._impl.finish()


@njit(parallel=True, nogil=True, cache=True)
def _or_baseline_flags(flags, baseline_flags):
    n_chans, n_bls = flags.shape
    for c in prange(n_chans):
        for b in range(n_bls):
            flags[c, b] |= baseline_flags[b]


class _CpuChain:
    def __init__(self, proc: DumpProcessor) -> None:
        self.proc = proc
        shape = (proc.n_chans, proc.n_bls)
        self.vis = np.empty(shape, np.complex64)
        self.flags = np.empty(shape, np.uint8)
        self.rfi_flags = np.empty(shape, np.uint8)
        self.noise = np.empty(proc.n_bls, np.float64)
        start, stop = proc.output_channels
        self.averager = TimeAverager(stop - start, proc.n_bls, proc.excise)

    @property
    def n_dumps(self) -> int:
        return self.averager.n_dumps

    def process_dump(self, xeng, byteswap, missing, baseline_flags) -> None:
        proc = self.proc
        if missing is None:
            missing = np.zeros(proc.n_chans, np.bool_)
        _convert_cpu(
            xeng, byteswap, proc.bls_permutation, np.float32(1.0 / proc.n_accs),
            proc.static_flags, missing, self.vis.view(np.float32).reshape(*self.vis.shape, 2),
            self.flags,
        )  # fmt: skip
        flag_rfi(
            self.vis, self.flags, proc.width, proc.n_sigma, out=self.rfi_flags, noise=self.noise
        )
        if baseline_flags is not None:
            _or_baseline_flags(self.rfi_flags, baseline_flags)
        self.averager.add(self.vis, self.rfi_flags, proc.n_accs, proc.output_channels[0])

    def finish(self) -> tuple[L0Dump, L0Dump | None]:
        averaged = self.averager.finish()
        return _l0_products(averaged, self.proc)


def _l0_products(averaged: AveragedDump, proc: DumpProcessor) -> tuple[L0Dump, L0Dump | None]:
    spectral = make_l0_dump(averaged)
    if proc.continuum_factor is None:
        return spectral, None
    cont = channel_average(
        averaged.vis, averaged.flags, averaged.weights, proc.continuum_factor, proc.excise
    )
    return spectral, make_l0_dump(AveragedDump(*cont, averaged.n_dumps))


__all__ = [
    "CAL_RFI",
    "CAM",
    "DATA_LOST",
    "INGEST_RFI",
    "MAD_NORMAL",
    "MEDIAN_WIDTH",
    "POSTPROC",
    "PREDICTED_RFI",
    "STATIC",
    "AveragedDump",
    "DumpProcessor",
    "L0Dump",
    "TimeAverager",
    "baseline_permutation",
    "channel_average",
    "convert_dump",
    "flag_rfi",
    "make_l0_dump",
    "weights_to_uint8",
]
