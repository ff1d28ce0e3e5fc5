"""SumThreshold RFI flagger (numba), as used by the cal pipeline to set the ``cal_rfi`` bit.

The detector works per baseline on visibility amplitudes of a (time, frequency) block:

1. **Spectrum pass.** The per-channel median over time (the "time-median spectrum") is compared
   with its background, a running median refined by two robust local quadratic fits (so a
   strong, curved spectrum is followed; a median alone flattens curvature into many sigma);
   SumThreshold along frequency on that difference flags weak persistent channels for all
   dumps.
2. **Background.** That smooth spectrum times a per-dump scale (the median ratio over the
   signal-dominated channels: gain drifts, a polarised source turning with parallactic angle),
   plus a masked box-smoothed residual that follows what is left (time, then a few channels).
   Smoothing windows shrink symmetrically at the edges of the block, which keeps them unbiased
   on linear trends, so steep band edges are not over-flagged. A smooth background (rather
   than each channel's own median) also keeps short scans honest: the median of 4 dumps is
   nearly as noisy as a sample.
3. **Noise.** From the upper half of the residual distribution, sigma = (q90 - q50)/1.2816,
   pooled over groups of channels x all dumps (at least ``POOL_SAMPLES`` samples, however short
   the block) and smoothed across channels by a running median. For noise-dominated
   (Rayleigh-distributed) amplitudes, such as the cross hands of an unpolarised calibrator, the
   upper half describes the heavier upper tail, which a MAD would underestimate. Pooling matters
   for short scans: per-channel estimates from a handful of dumps are skewed, and their median
   across channels is biased low (17% false flags at 4 dumps before).
4. **SumThreshold** on |residual|/sigma along time, then along frequency (time flags pre-flagged),
   with windows `windows_*` and thresholds ``outlier_nsigma / rho**log2(window)``; already
   flagged samples count as the threshold (Offringa et al. 2010).
5. **Smear.** Dilate by `time_extend` x `freq_extend`, flag whole dumps (channels) where more
   than `flag_all_freq_frac` (`flag_all_time_frac`) is flagged. NaN input is always flagged.

The defaults are katsdpcal's L-band 4k calibrator settings (4.5sigma, windows 1-8, background
widths 12.5 dumps x 10 channels, extend 3 x 3, flag-all fractions 0.6/0.8, rho = 1.3).
:func:`flag_cross_hands` runs the detector on the cross hands only and ORs the result into
every polarisation as the ``cal_rfi`` bit, as katsdpcal does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

#: L0 flag bit set by the cal RFI flagger.
from ..flags import CAL_RFI

#: Samples pooled per noise estimate (channels x dumps).
POOL_SAMPLES = 256
#: Channels farther than this many sigma from the spectrum background are left out of its fit.
SPEC_REJECT = 3.0
#: Channels whose spectrum exceeds this many sigma carry the per-dump scale of the background.
SCALE_SNR = 5.0


@njit(nogil=True, cache=True)
def _running_median(x, valid, half, out):
    """Median of valid x in a window of ±half, shrunk symmetrically at the ends."""
    n = x.shape[0]
    buf = np.empty(2 * half + 1, x.dtype)
    for i in range(n):
        h = min(half, i, n - 1 - i)
        k = 0
        for j in range(i - h, i + h + 1):
            if valid[j]:
                buf[k] = x[j]
                k += 1
        out[i] = np.median(buf[:k]) if k > 0 else np.nan


@njit(nogil=True, cache=True)
def _local_quadratic(y, valid, half, out):
    """Least-squares quadratic through the valid y in a window of ±half (shrunk symmetrically
    at the ends), evaluated at the centre; a line or the mean where the window has too few
    distinct points, the previous `out` where it has none."""
    n = y.shape[0]
    for i in range(n):
        h = min(half, i, n - 1 - i)
        s0 = s1 = s2 = s3 = s4 = 0.0
        t0 = t1 = t2 = 0.0
        for j in range(i - h, i + h + 1):
            if valid[j]:
                x = float(j - i)
                x2 = x * x
                v = float(y[j])
                s0 += 1.0
                s1 += x
                s2 += x2
                s3 += x2 * x
                s4 += x2 * x2
                t0 += v
                t1 += v * x
                t2 += v * x2
        if s0 == 0:
            continue
        # Cramer's rule for [[s0 s1 s2] [s1 s2 s3] [s2 s3 s4]] (a b c) = (t0 t1 t2).
        det = s0 * (s2 * s4 - s3 * s3) - s1 * (s1 * s4 - s3 * s2) + s2 * (s1 * s3 - s2 * s2)
        if s0 >= 3 and det > 1e-9 * s0 * s2 * s4:
            out[i] = (t0 * (s2 * s4 - s3 * s3) - s1 * (t1 * s4 - s3 * t2)
                      + s2 * (t1 * s3 - s2 * t2)) / det
        else:
            det2 = s0 * s2 - s1 * s1
            if s0 >= 2 and det2 > 1e-9 * s0 * s2:
                out[i] = (t0 * s2 - s1 * t1) / det2
            else:
                out[i] = t0 / s0


@njit(nogil=True, cache=True)
def _fill_nans_linear(x):
    """Replace NaNs in place by linear interpolation (constant beyond the ends)."""
    n = x.shape[0]
    last = -1
    for i in range(n):
        if not np.isnan(x[i]):
            if last < 0:
                for j in range(i):
                    x[j] = x[i]
            elif i - last > 1:
                for j in range(last + 1, i):
                    x[j] = x[last] + (x[i] - x[last]) * (j - last) / (i - last)
            last = i
    if last < 0:
        x[:] = 0
    else:
        for j in range(last + 1, n):
            x[j] = x[last]


@njit(nogil=True, cache=True)
def _sum_threshold_1d(z, missing, flags, windows, nsigma, rho, vals):
    """SumThreshold on |z| along a 1-D line; `flags` holds prior flags and receives new ones.
    `vals` is scratch space of the same length."""
    n = z.shape[0]
    for w in windows:
        if w > n:
            break
        thr = nsigma / rho ** math.log2(w)
        for i in range(n):
            if flags[i]:
                vals[i] = thr
            elif missing[i]:
                vals[i] = 0.0
            else:
                vals[i] = abs(z[i])
        limit = w * thr
        s = 0.0
        for i in range(w - 1):
            s += vals[i]
        for i in range(w - 1, n):
            s += vals[i]
            if s > limit:
                for j in range(i - w + 1, i + 1):
                    flags[j] = True
            s -= vals[i - w + 1]


@njit(nogil=True, cache=True)
def _box_smooth_time(x, m, half, out):
    """Masked mean over ±half dumps (shrunk symmetrically at the ends), per channel."""
    n_t, n_f = x.shape
    cs = np.zeros((n_t + 1, n_f))
    cm = np.zeros((n_t + 1, n_f))
    for t in range(n_t):
        for f in range(n_f):
            cs[t + 1, f] = cs[t, f] + (x[t, f] if m[t, f] else 0.0)
            cm[t + 1, f] = cm[t, f] + (1.0 if m[t, f] else 0.0)
    for t in range(n_t):
        h = min(half, t, n_t - 1 - t)
        for f in range(n_f):
            c = cm[t + h + 1, f] - cm[t - h, f]
            out[t, f] = (cs[t + h + 1, f] - cs[t - h, f]) / c if c > 0 else np.nan


@njit(nogil=True, cache=True)
def _box_smooth_freq(x, half, out):
    """NaN-ignoring mean over ±half channels (shrunk symmetrically at the ends), per dump."""
    n_t, n_f = x.shape
    cs = np.zeros(n_f + 1)
    cm = np.zeros(n_f + 1)
    for t in range(n_t):
        for f in range(n_f):
            v = x[t, f]
            ok = not np.isnan(v)
            cs[f + 1] = cs[f] + (v if ok else 0.0)
            cm[f + 1] = cm[f] + (1.0 if ok else 0.0)
        for f in range(n_f):
            h = min(half, f, n_f - 1 - f)
            c = cm[f + h + 1] - cm[f - h]
            out[t, f] = (cs[f + h + 1] - cs[f - h]) / c if c > 0 else 0.0


@njit(nogil=True, cache=True)
def _select(buf, k, lo, hi):
    """Partially order buf[lo:hi] in place so that buf[k] is its k-th smallest (Hoare)."""
    while hi - lo > 1:
        mid = (lo + hi - 1) // 2
        pivot = buf[mid]
        i = lo
        j = hi - 1
        while i <= j:
            while buf[i] < pivot:
                i += 1
            while buf[j] > pivot:
                j -= 1
            if i <= j:
                tmp = buf[i]
                buf[i] = buf[j]
                buf[j] = tmp
                i += 1
                j -= 1
        if k <= j:
            hi = j + 1
        elif k >= i:
            lo = i
        else:
            return


@njit(nogil=True, cache=True)
def _normal_quantile(p):
    """Inverse standard normal CDF (Abramowitz & Stegun 26.2.23, |error| < 4.5e-4)."""
    q = p if p < 0.5 else 1.0 - p
    t = math.sqrt(-2.0 * math.log(q))
    x = t - (2.515517 + 0.802853 * t + 0.010328 * t * t) / (
        1.0 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t * t * t)
    return -x if p < 0.5 else x


@njit(nogil=True, cache=True)
def _order_stat_z(i, k):
    """Expected standard-normal value of the i-th (0-based) of k sorted samples (Blom)."""
    return _normal_quantile((i + 1 - 0.375) / (k + 0.25))


@njit(nogil=True, cache=True)
def _channel_median(r, usable, med):
    """Per channel: median over time of the usable samples (NaN if none)."""
    n_t, n_f = r.shape
    # Gather channels in blocks so that the strided reads along time stay in cache.
    blk = 16
    buf = np.empty((blk, n_t), np.float32)
    cnt = np.empty(blk, np.int64)
    for f0 in range(0, n_f, blk):
        nb = min(blk, n_f - f0)
        cnt[:] = 0
        for t in range(n_t):
            for i in range(nb):
                if usable[t, f0 + i]:
                    buf[i, cnt[i]] = r[t, f0 + i]
                    cnt[i] += 1
        for i in range(nb):
            k = cnt[i]
            if k == 0:
                med[f0 + i] = np.nan
                continue
            row = buf[i]
            k50 = k // 2
            _select(row, k50, 0, k)
            if k % 2:
                med[f0 + i] = row[k50]
            else:
                # Mean of the two middle values: a less noisy median for short blocks.
                _select(row, k50 - 1, 0, k50)
                med[f0 + i] = 0.5 * (row[k50] + row[k50 - 1])


@njit(nogil=True, cache=True)
def _pooled_noise(r, usable, center, group, sigma):
    """Noise sigma of groups of `group` adjacent channels, each pooled over all dumps.

    From the usable samples of the channels around each group centre, less their channel's
    `center`: sigma = (q90 - q50)/(z90 - z50), the upper half of the distribution (for
    noise-dominated, Rayleigh-distributed amplitudes it describes the heavier upper tail, which
    a MAD would underestimate). Pooling keeps at least a few hundred samples per estimate
    however short the block, so the estimate is nearly unbiased and precise; per-channel
    estimates from a handful of dumps are skewed and their median across channels is biased
    low, which over-flags short scans. The value goes to the group's centre channel, NaN
    elsewhere.
    """
    n_t, n_f = r.shape
    sigma[:] = np.nan
    buf = np.empty(group * n_t, np.float32)
    for c0 in range(0, n_f, group):
        c1 = min(n_f, c0 + group)
        k = 0
        for t in range(n_t):
            for f in range(c0, c1):
                if usable[t, f] and not np.isnan(center[f]):
                    buf[k] = r[t, f] - center[f]
                    k += 1
        if k < 8:
            continue
        k50 = k // 2
        _select(buf, k50, 0, k)
        q50 = buf[k50]
        k90 = max(k50 + 1, min(k - 1, int(0.9 * (k - 1) + 0.5)))
        _select(buf, k90, k50, k)
        sigma[(c0 + c1 - 1) // 2] = (buf[k90] - q50) / (_order_stat_z(k90, k)
                                                         - _order_stat_z(k50, k))


@njit(nogil=True, cache=True)
def _smooth_sigma(sigma, half):
    """Running median of the per-channel noise over ±half channels, evaluated every half/4
    channels and interpolated linearly (the noise varies slowly), gaps and zeros filled."""
    n_f = sigma.shape[0]
    step = max(1, half // 4)
    n_s = (n_f - 1) // step + 1
    buf = np.empty(2 * half + 1, sigma.dtype)
    out = np.empty_like(sigma)
    grid = np.empty(n_s + 1, np.float64)
    pos = np.empty(n_s + 1, np.int64)
    m = 0
    for c in [*range(0, n_f, step), n_f - 1]:
        if m > 0 and pos[m - 1] == c:
            continue
        h = min(half, c, n_f - 1 - c)
        k = 0
        for j in range(c - h, c + h + 1):
            if sigma[j] > 0:
                buf[k] = sigma[j]
                k += 1
        pos[m] = c
        grid[m] = np.median(buf[:k]) if k > 0 else np.nan
        m += 1
    _fill_nans_linear(grid[:m])
    for i in range(m - 1):
        a = pos[i]
        b = pos[i + 1]
        for f in range(a, b + 1):
            out[f] = grid[i] + (grid[i + 1] - grid[i]) * (f - a) / (b - a)
    if m == 1:
        out[:] = grid[0]
    floor = 0.0
    for f in range(n_f):
        floor = max(floor, out[f])
    floor = max(floor * 1e-6, 1e-30)
    for f in range(n_f):
        if not out[f] > floor:
            out[f] = floor
    return out


@njit(nogil=True, cache=True)
def _sum_threshold_time(z, missing, flags, windows, nsigma, rho):
    """SumThreshold along time for every channel at once (row-major, vectorises over f)."""
    n_t, n_f = z.shape
    vals = np.empty((n_t, n_f), np.float32)
    s = np.empty(n_f, np.float32)
    for w in windows:
        if w > n_t:
            break
        thr = np.float32(nsigma / rho ** math.log2(w))
        limit = np.float32(w * thr)
        for t in range(n_t):
            for f in range(n_f):
                v = abs(z[t, f])
                vals[t, f] = thr if flags[t, f] else (np.float32(0) if missing[t, f] else v)
        s[:] = 0
        for t in range(w - 1):
            for f in range(n_f):
                s[f] += vals[t, f]
        for t in range(w - 1, n_t):
            hit = False
            for f in range(n_f):
                s[f] += vals[t, f]
                hit |= s[f] > limit
            if hit:
                for f in range(n_f):
                    if s[f] > limit:
                        for u in range(t - w + 1, t + 1):
                            flags[u, f] = True
            for f in range(n_f):
                s[f] -= vals[t - w + 1, f]


@njit(nogil=True, cache=True)
def _dilate(flags, half_t, half_f, out):
    n_t, n_f = flags.shape
    tmp = np.zeros((n_t, n_f), np.bool_)
    for t in range(n_t):
        for f in range(n_f):
            if flags[t, f]:
                for u in range(max(0, t - half_t), min(n_t, t + half_t + 1)):
                    tmp[u, f] = True
    for t in range(n_t):
        for f in range(n_f):
            if tmp[t, f]:
                for g in range(max(0, f - half_f), min(n_f, f + half_f + 1)):
                    out[t, g] = True


@njit(nogil=True, cache=True)
def _dump_scale(amp, usable, skip, spectrum, sigma):
    """Per dump: median over channels of amp/spectrum, from the channels where the spectrum
    is signal-dominated (above ``SCALE_SNR`` sigma); 1 if there are too few of them.

    A gain drift scales the signal; in noise-dominated data (cross hands of an unpolarised
    calibrator) there is nothing to scale, and there a broadband burst would only pull the
    median up and hide itself. Random-phase RFI hardly moves the median amplitude of a strong
    signal.
    """
    n_t, n_f = amp.shape
    scale = np.ones(n_t, np.float32)
    strong = np.zeros(n_f, np.bool_)
    n_strong = 0
    for f in range(n_f):
        strong[f] = not skip[f] and spectrum[f] > SCALE_SNR * sigma[f]
        n_strong += strong[f]
    if n_strong < max(16, n_f // 10):
        return scale
    buf = np.empty(n_f, np.float32)
    for t in range(n_t):
        k = 0
        for f in range(n_f):
            if usable[t, f] and strong[f]:
                buf[k] = amp[t, f] / spectrum[f]
                k += 1
        if k > 0:
            k50 = k // 2
            _select(buf, k50, 0, k)
            scale[t] = buf[k50]
    return scale


@njit(nogil=True, cache=True)
def _flag_baseline(amp, missing, windows_t, windows_f, nsigma, rho, half_bg_t, half_bg_f,
                   half_spec, half_noise, reject, half_ext_t, half_ext_f, all_time_frac,
                   all_freq_frac, out):
    n_t, n_f = amp.shape
    usable = ~missing
    # Channels per noise estimate: enough to pool ~POOL_SAMPLES samples over the block's dumps.
    group = max(1, min(n_f, -(-POOL_SAMPLES // n_t)))
    half_sig = max(half_noise, 2 * group)
    # 1. Time-median spectrum and its own SumThreshold along frequency.
    spec = np.empty(n_f, np.float32)
    _channel_median(amp, usable, spec)
    spec_ok = ~np.isnan(spec)
    sig0 = np.empty(n_f, np.float32)
    _pooled_noise(amp, usable, spec, group, sig0)
    spec_sigma = _smooth_sigma(sig0, half_sig)
    # Deviations from a channel's own median understate sigma by about sqrt((n-1)/n).
    dof = math.sqrt(n_t / (n_t - 1)) if n_t > 1 else 1.0
    for f in range(n_f):
        spec_sigma[f] *= dof
    # Background of the spectrum: a running median, then twice a local quadratic fit without
    # the channels that stand out from the previous estimate. The median alone flattens
    # curvature (bias ~ S''·half²/6), which a strong smooth spectrum turns into many sigma.
    spec_bg = np.empty(n_f, np.float32)
    _running_median(spec, spec_ok, half_spec, spec_bg)
    fit_ok = np.empty(n_f, np.bool_)
    for _ in range(2):
        for f in range(n_f):
            lim = SPEC_REJECT * 1.2533 * spec_sigma[f] / math.sqrt(n_t)
            fit_ok[f] = spec_ok[f] and abs(spec[f] - spec_bg[f]) < lim
        _local_quadratic(spec, fit_ok, half_spec, spec_bg)
    # Noise of a median of n samples is ~1.25·sigma/√n. (A running MAD of the spectrum itself
    # would collapse at the block edges, where the shrinking running-median window follows the
    # data exactly.)
    zs = np.zeros(n_f, np.float32)
    dev_missing = np.empty(n_f, np.bool_)
    for f in range(n_f):
        n_ok = 0
        for t in range(n_t):
            n_ok += usable[t, f]
        dev_missing[f] = not spec_ok[f] or np.isnan(spec_bg[f])
        if not dev_missing[f]:
            zs[f] = (spec[f] - spec_bg[f]) * math.sqrt(n_ok) / (1.2533 * spec_sigma[f])
    spec_flags = np.zeros(n_f, np.bool_)
    _sum_threshold_1d(zs, dev_missing, spec_flags, windows_f, nsigma, rho,
                      np.empty(n_f, np.float32))
    clean = spec_bg.copy()
    _fill_nans_linear(clean)

    # 2. Background: the spectrum times a per-dump scale (gain drifts, a polarised source
    # turning with parallactic angle: changes common to the band), then a masked smooth of
    # what is left.
    sigma = spec_sigma
    m = np.empty((n_t, n_f), np.bool_)
    scale = _dump_scale(amp, usable, spec_flags, clean, sigma)
    r = np.empty((n_t, n_f), np.float32)
    for t in range(n_t):
        for f in range(n_f):
            r[t, f] = amp[t, f] - clean[f] * scale[t]
            m[t, f] = usable[t, f] and not spec_flags[f] and abs(r[t, f]) < reject * sigma[f]
    bg_t = np.empty((n_t, n_f), np.float32)
    _box_smooth_time(r, m, half_bg_t, bg_t)
    bg = np.empty((n_t, n_f), np.float32)
    _box_smooth_freq(bg_t, half_bg_f, bg)
    for t in range(n_t):
        for f in range(n_f):
            r[t, f] -= bg[t, f]
    # 3. Noise of the final residual (pooled over channel groups, smoothed over frequency).
    for t in range(n_t):
        for f in range(n_f):
            m[t, f] = usable[t, f] and not spec_flags[f]
    sig1 = np.empty(n_f, np.float32)
    _pooled_noise(r, m, np.zeros(n_f, np.float32), group, sig1)
    sigma = _smooth_sigma(sig1, half_sig)
    z = np.empty((n_t, n_f), np.float32)
    for t in range(n_t):
        for f in range(n_f):
            z[t, f] = r[t, f] / sigma[f] if usable[t, f] else 0.0

    # 4. SumThreshold along time, then along frequency with the time flags as prior flags.
    flags = np.zeros((n_t, n_f), np.bool_)
    for t in range(n_t):
        for f in range(n_f):
            flags[t, f] = spec_flags[f]
    _sum_threshold_time(z, missing, flags, windows_t, nsigma, rho)
    scratch = np.empty(n_f, np.float32)
    for t in range(n_t):
        _sum_threshold_1d(z[t], missing[t], flags[t], windows_f, nsigma, rho, scratch)

    # 5. Smear, then flag mostly-flagged dumps and channels.
    out[:, :] = False
    _dilate(flags, half_ext_t, half_ext_f, out)
    for t in range(n_t):
        c = 0
        for f in range(n_f):
            c += out[t, f]
        if c > all_freq_frac * n_f:
            out[t, :] = True
    for f in range(n_f):
        c = 0
        for t in range(n_t):
            c += out[t, f]
        if c > all_time_frac * n_t:
            out[:, f] = True
    for t in range(n_t):
        for f in range(n_f):
            if missing[t, f] and not np.isfinite(amp[t, f]):
                out[t, f] = True


@njit(parallel=True, nogil=True, cache=True)
def _flag_kernel(data, in_flags, windows_t, windows_f, nsigma, rho, half_bg_t, half_bg_f,
                 half_spec, half_noise, reject, half_ext_t, half_ext_f, all_time_frac,
                 all_freq_frac, out):
    n_t, n_f, n_bl = data.shape
    for b in prange(n_bl):
        amp = np.empty((n_t, n_f), np.float32)
        missing = np.empty((n_t, n_f), np.bool_)
        for t in range(n_t):
            for f in range(n_f):
                a = abs(data[t, f, b])
                amp[t, f] = a
                missing[t, f] = in_flags[t, f, b] != 0 or not np.isfinite(a)
        res = np.empty((n_t, n_f), np.bool_)
        _flag_baseline(amp, missing, windows_t, windows_f, nsigma, rho, half_bg_t, half_bg_f,
                       half_spec, half_noise, reject, half_ext_t, half_ext_f, all_time_frac,
                       all_freq_frac, res)
        for t in range(n_t):
            for f in range(n_f):
                out[t, f, b] = res[t, f]


@dataclass(frozen=True)
class SumThresholdFlagger:
    """SumThreshold flagger configuration (defaults: katsdpcal's L-band 4k calibrator flagger).

    Parameters
    ----------
    outlier_nsigma : float
        Threshold for single samples, in units of the noise sigma.
    windows_time, windows_freq : tuple of int
        SumThreshold window lengths (dumps, channels), increasing.
    rho : float
        Threshold fall-off: window w uses ``outlier_nsigma / rho**log2(w)``.
    spike_width_time, spike_width_freq : float
        Half-widths (dumps, channels) of the box that smooths the background residual.
    background_reject : float
        Samples beyond this many sigma are left out of the background smoothing.
    time_extend, freq_extend : int
        Odd sizes of the dilation box (3 = ±1).
    flag_all_time_frac, flag_all_freq_frac : float
        Flag a whole channel (dump) of a baseline when more than this fraction of it is flagged.
    """

    outlier_nsigma: float = 4.5
    windows_time: tuple[int, ...] = (1, 2, 4, 8)
    windows_freq: tuple[int, ...] = (1, 2, 4, 8)
    rho: float = 1.3
    spike_width_time: float = 12.5
    spike_width_freq: float = 10.0
    background_reject: float = 3.0
    time_extend: int = 3
    freq_extend: int = 3
    flag_all_time_frac: float = 0.6
    flag_all_freq_frac: float = 0.8

    def __post_init__(self) -> None:
        for name in ("windows_time", "windows_freq"):
            w = tuple(int(x) for x in getattr(self, name))
            if not w or min(w) < 1 or list(w) != sorted(w):
                raise ValueError(f"{name} must be increasing positive integers, not {w}")
            object.__setattr__(self, name, w)
        if self.outlier_nsigma <= 0 or self.rho <= 0:
            raise ValueError("outlier_nsigma and rho must be positive")
        if self.time_extend < 1 or self.freq_extend < 1:
            raise ValueError("time_extend and freq_extend must be at least 1")

    @classmethod
    def meerkat(cls, channel_width: float, dump_period: float, target: bool = False
                ) -> SumThresholdFlagger:
        """katsdpcal's wideband settings converted to channels and dumps.

        Parameters
        ----------
        channel_width : float
            Channel width in Hz (e.g. 208984.375 for L-band 4k).
        dump_period : float
            Dump period in seconds.
        target : bool
            The 7sigma target flagger (wider frequency background) instead of the 4.5sigma
            calibrator flagger.
        """
        spike_hz = 4.18e6 if target else 2.09e6
        extend = max(3, math.ceil(391845.0 / channel_width))
        return cls(
            outlier_nsigma=7.0 if target else 4.5,
            spike_width_time=100.0 / dump_period,
            spike_width_freq=spike_hz / channel_width,
            freq_extend=extend if extend % 2 else extend + 1,
        )

    def get_flags(self, data: np.ndarray, flags: np.ndarray | None = None) -> np.ndarray:
        """Detect RFI in a (time, frequency, baseline) block.

        Parameters
        ----------
        data : ndarray, complex or real, shape (n_dumps, n_chans, n_bl)
            Visibilities (their amplitude is used) or amplitudes.
        flags : ndarray, bool or uint8, optional
            Non-zero marks samples to ignore (they are neither used nor, by themselves,
            flagged in the output).

        Returns
        -------
        ndarray, bool, shape (n_dumps, n_chans, n_bl)
            True where RFI was detected (after dilation), and where the input is not finite.
        """
        data = np.asarray(data)
        if data.ndim != 3:
            raise ValueError(f"data must be (n_dumps, n_chans, n_bl), not {data.shape}")
        if flags is None:
            flags = np.zeros(data.shape, np.uint8)
        else:
            flags = np.asarray(flags)
            if flags.shape != data.shape:
                raise ValueError(f"flags shape {flags.shape} != data shape {data.shape}")
            if flags.dtype == np.bool_:
                flags = flags.view(np.uint8)
        if np.iscomplexobj(data):
            data = data.astype(np.complex64, copy=False)
        else:
            data = data.astype(np.float32, copy=False)
        out = np.empty(data.shape, np.bool_)
        _flag_kernel(
            data, flags, np.array(self.windows_time, np.int64),
            np.array(self.windows_freq, np.int64), float(self.outlier_nsigma), float(self.rho),
            max(1, round(self.spike_width_time)), max(1, round(self.spike_width_freq)),
            max(2, round(self.spike_width_freq)), max(8, round(4 * self.spike_width_freq)),
            float(self.background_reject), self.time_extend // 2, self.freq_extend // 2,
            float(self.flag_all_time_frac), float(self.flag_all_freq_frac), out)
        return out


def flag_cross_hands(
    vis: np.ndarray,
    flags: np.ndarray,
    pol_ordering: list[str] | tuple[str, ...],
    flagger: SumThresholdFlagger | None = None,
) -> np.ndarray:
    """Run the flagger on the cross hands and set ``cal_rfi`` in every polarisation.

    Detection on the cross hands of a (nearly) unpolarised calibrator sees RFI against noise
    rather than against the source, which improves recall (katsdpcal does the same). The
    ``cal_rfi`` bit of the input is ignored, so running this twice gives the same flags.

    Parameters
    ----------
    vis : ndarray, complex, shape (n_dumps, n_chans, n_pols, n_bl)
        Cross-correlation visibilities, pol axis as in `pol_ordering`.
    flags : ndarray, uint8, shape (n_dumps, n_chans, n_pols, n_bl)
        L0/cal flag bits; any bit but ``cal_rfi`` excludes a sample from detection.
    pol_ordering : sequence of str
        Two-letter pol products (e.g. ``['vv', 'hh', 'vh', 'hv']``); the cross hands are those
        whose letters differ. With only parallel hands these are used instead.
    flagger : SumThresholdFlagger, optional
        Default: ``SumThresholdFlagger()``.

    Returns
    -------
    ndarray, uint8, shape (n_dumps, n_chans, n_pols, n_bl)
        `flags` with ``cal_rfi`` cleared and then set where RFI was detected.
    """
    vis = np.asarray(vis)
    flags = np.asarray(flags)
    if vis.ndim != 4 or flags.shape != vis.shape or flags.dtype != np.uint8:
        raise ValueError("vis and flags must both be (n_dumps, n_chans, n_pols, n_bl), "
                         "flags uint8")
    if len(pol_ordering) != vis.shape[2]:
        raise ValueError(f"pol_ordering has {len(pol_ordering)} entries for {vis.shape[2]} pols")
    flagger = flagger or SumThresholdFlagger()
    cross = [i for i, p in enumerate(pol_ordering) if len(p) == 2 and p[0] != p[1]]
    detect_pols = cross or list(range(vis.shape[2]))
    other = flags & ~CAL_RFI
    detected = np.zeros(vis.shape[:2] + vis.shape[3:], np.bool_)
    for p in detect_pols:
        detected |= flagger.get_flags(vis[:, :, p], other[:, :, p])
    return other | np.where(detected[:, :, None, :], CAL_RFI, np.uint8(0))
