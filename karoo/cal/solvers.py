"""Calibration solvers: StEFCal gains, delay (K), bandpass (B), gain (G) and cross-hand delay.

Conventions (identical to katsdpcal, so that katdal's applycal reads our products unchanged):

* Visibility model: ``V_ab = g_a · conj(g_b) · M_ab`` with the sky model ``M`` already divided
  out by the caller, so the solvers assume a unit point source.
* ``bls`` is an int array ``(n_bl, 2)`` of antenna indices per baseline (katsdpcal's
  ``bls_lookup``). Autocorrelations (``a == b``) are ignored.
* Delays are in **seconds** and describe the gain ``g_a(f) = exp(+2πi·K_a·f)``; the correction
  divides that out. K is referenced to the reference antenna (its delay is 0).
* Products are shaped like katsdpcal's: K ``(n_pols, n_ants)`` float32, B ``(n_chans, n_pols,
  n_ants)`` complex64, G ``(n_intervals, n_pols, n_ants)`` complex64 (one telstate entry per
  interval), KCROSS ``(2, 1)`` float32 with row 1 = 0. The pol axis follows ``cal_pol_ordering``
  (``['v', 'h']`` for MeerKAT).
* Gains are phase-referenced: the reference antenna's phase is 0. An antenna without valid data
  gets NaN.

Weights are **inverse-variance** weights ``w = 1/sigma²`` (sigma² the variance of the complex
visibility). They enter the least-squares cost ``Σ w·|V - g_a·conj(g_b)|²`` linearly, which is the
maximum-likelihood solution for Gaussian noise. Zero, negative, non-finite or absurdly large
(> 1e15) weights and non-finite visibilities all mean "flagged": such samples are ignored and can
never poison a solution.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

#: Weights above this are treated as invalid (katsdpcal drops them too: "stefcal divide by zero").
HIGH_WEIGHT = 1e15


class StefcalResult(NamedTuple):
    """Output of :func:`stefcal`.

    Attributes
    ----------
    gains : ndarray, complex, shape (..., n_ants)
        Phase-referenced gains; NaN for antennas without valid data.
    iterations : ndarray, int32, shape (...)
        Iterations used by each solve.
    converged : ndarray, bool, shape (...)
        Whether each solve met the convergence threshold before ``max_iters``.
    ref_ant : ndarray, int32, shape (...)
        The antenna each solve was referenced to (differs from the requested one when that
        antenna had no valid data), or -1 if the solve had no valid data at all.
    """

    gains: np.ndarray
    iterations: np.ndarray
    converged: np.ndarray
    ref_ant: np.ndarray


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract", "arcp", "nsz"})
def _stefcal_update(rr, ri, w, gr, gi, ag2, num_r, num_i, den):
    """Numerator Σ_q R[p,q]·g_q and denominator Σ_q w[p,q]·|g_q|² of every antenna's update.

    The dense rows (unit stride, a multiple of the vector width for typical array sizes)
    vectorise fully; the accumulators have the precision of the data, so complex64 solves run
    in single precision throughout.
    """
    n = gr.shape[0]
    for p in range(n):
        num_r[p] = 0
        num_i[p] = 0
        den[p] = 0
        acc_r = num_r[p]
        acc_i = num_i[p]
        acc_d = den[p]
        for q in range(n):
            a = rr[p, q]
            b = ri[p, q]
            acc_r += a * gr[q] - b * gi[q]
            acc_i += a * gi[q] + b * gr[q]
            acc_d += w[p, q] * ag2[q]
        num_r[p] = acc_r
        num_i[p] = acc_i
        den[p] = acc_d


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract", "nsz"})
def _row_sums(m, out):
    """Row sums of a square matrix (vectorised; weights are finite and non-negative)."""
    for p in range(m.shape[0]):
        out[p] = 0
        t = out[p]
        for q in range(m.shape[1]):
            t += m[p, q]
        out[p] = t


@njit(nogil=True, cache=True)
def _seed_gains(rr, ri, w, total_w, ref_ant, gr, gi):
    """Starting gains from one row of the visibility matrix: V_sq ≈ g_s·conj(g_q), so the
    phase of conj(V_sq) is that of g_q relative to the seed antenna s (the requested
    reference antenna if it has data, else the best-connected one). Amplitudes start at the
    RMS visibility amplitude. Starting with the phases nearly right roughly halves the
    iterations at moderate and high SNR; the fixed point is the same."""
    n = gr.shape[0]
    s = ref_ant
    if s < 0 or s >= n or not total_w[s] > 0:
        s = 0
        for p in range(n):
            if total_w[p] > total_w[s]:
                s = p
    num = 0.0
    wsum = 0.0
    for q in range(n):
        # gr/gi hold |V_sq| for now (finite: sanitised in the build).
        a = float(rr[s, q])
        b = float(ri[s, q])
        gr[q] = math.sqrt(a * a + b * b)
        if w[s, q] > 0:
            num += gr[q]
            wsum += w[s, q]
    amp = math.sqrt(num / wsum) if wsum > 0 and num > 0 else 1.0
    for q in range(n):
        mag = gr[q]
        if q != s and mag > 0:
            gr[q] = amp * rr[s, q] / mag
            gi[q] = -amp * ri[s, q] / mag
        else:
            gr[q] = amp
            gi[q] = 0.0


@njit(nogil=True, cache=True)
def _stefcal_one(vis, weights, ant1, ant2, n_ants, ref_ant, init_gain, seed_init, max_iters,
                 thresh2, rr, ri, w, gr, gi, new_r, new_i, ag2, den, total_w, gains):
    """One StEFCal solve; the work arrays come from the caller and are reused across solves.

    Returns (iterations, converged, reference antenna used or -1).
    """
    n_bl = vis.shape[0]
    rr[:] = 0
    ri[:] = 0
    w[:] = 0
    for k in range(n_bl):
        a = ant1[k]
        b = ant2[k]
        if a == b:
            continue
        v = vis[k]
        wt = weights[k]
        # The comparisons are False for NaN, so NaN weights fall out here too.
        if not (wt > 0 and wt < HIGH_WEIGHT and np.isfinite(v.real) and np.isfinite(v.imag)):
            continue
        re = wt * v.real
        im = wt * v.imag
        rr[a, b] += re
        ri[a, b] += im
        rr[b, a] += re
        ri[b, a] -= im
        w[a, b] += wt
        w[b, a] += wt
    _row_sums(w, total_w)
    if seed_init:
        _seed_gains(rr, ri, w, total_w, ref_ant, gr, gi)
    else:
        for p in range(n_ants):
            g0 = init_gain[p]
            if np.isfinite(g0.real) and np.isfinite(g0.imag) and abs(g0) > 0:
                gr[p] = g0.real
                gi[p] = g0.imag
            else:
                gr[p] = 1.0
                gi[p] = 0.0
    it = 0
    conv = False
    while it < max_iters:
        for p in range(n_ants):
            ag2[p] = gr[p] * gr[p] + gi[p] * gi[p]
        _stefcal_update(rr, ri, w, gr, gi, ag2, new_r, new_i, den)
        for p in range(n_ants):
            # An antenna without data (den = 0) keeps its value and ends up NaN below.
            if den[p] > 0:
                inv = 1 / den[p]
                new_r[p] *= inv
                new_i[p] *= inv
            else:
                new_r[p] = gr[p]
                new_i[p] = gi[p]
        it += 1
        if it % 2 == 0:
            # Salvini & Wijnholds: test and average on every second iteration, which
            # damps the two-cycle oscillation of the plain Jacobi update.
            diff = 0.0
            norm = 0.0
            for p in range(n_ants):
                dr = new_r[p] - gr[p]
                di = new_i[p] - gi[p]
                diff += dr * dr + di * di
                norm += new_r[p] * new_r[p] + new_i[p] * new_i[p]
            if diff <= thresh2 * norm:
                conv = True
                gr[:] = new_r
                gi[:] = new_i
                break
            for p in range(n_ants):
                gr[p] = 0.5 * (new_r[p] + gr[p])
                gi[p] = 0.5 * (new_i[p] + gi[p])
        else:
            gr[:] = new_r
            gi[:] = new_i
    # Reference antenna: the requested one if it has data, else the best-connected one.
    ref = ref_ant
    if (ref < 0 or ref >= n_ants or not total_w[ref] > 0
            or gr[ref] * gr[ref] + gi[ref] * gi[ref] == 0):
        ref = -1
        best = 0.0
        for p in range(n_ants):
            if total_w[p] > best and gr[p] * gr[p] + gi[p] * gi[p] > 0:
                best = total_w[p]
                ref = p
    if ref < 0:
        for p in range(n_ants):
            gains[p] = np.nan + 1j * np.nan
        return it, conv, ref
    amp = np.sqrt(gr[ref] * gr[ref] + gi[ref] * gi[ref])
    cr = gr[ref] / amp
    ci = -gi[ref] / amp
    for p in range(n_ants):
        if total_w[p] > 0:
            gains[p] = (gr[p] * cr - gi[p] * ci) + 1j * (gr[p] * ci + gi[p] * cr)
        else:
            gains[p] = np.nan + 1j * np.nan
    return it, conv, ref


@njit(parallel=True, nogil=True, cache=True)
def _stefcal_kernel(vis, weights, ant1, ant2, n_ants, ref_ant, init_gain, seed_init, max_iters,
                    conv_thresh, n_chunks, gains, iterations, converged, ref_used):
    """Independent solves over the rows of vis (n_solves, n_bl). weights and init_gain have
    1 or n_solves rows (a single row is shared by every solve, so the common cases never
    materialise a broadcast). Each of the n_chunks runs of consecutive solves allocates its
    work arrays once."""
    n_solves = vis.shape[0]
    real_t = weights.dtype
    thresh2 = conv_thresh * conv_thresh
    for c in prange(n_chunks):
        rr = np.empty((n_ants, n_ants), real_t)
        ri = np.empty((n_ants, n_ants), real_t)
        w = np.empty((n_ants, n_ants), real_t)
        gr = np.empty(n_ants, real_t)
        gi = np.empty(n_ants, real_t)
        new_r = np.empty(n_ants, real_t)
        new_i = np.empty(n_ants, real_t)
        ag2 = np.empty(n_ants, real_t)
        den = np.empty(n_ants, real_t)
        total_w = np.empty(n_ants, real_t)
        for s in range(c * n_solves // n_chunks, (c + 1) * n_solves // n_chunks):
            w_row = weights[s if weights.shape[0] > 1 else 0]
            g_row = init_gain[s if init_gain.shape[0] > 1 else 0]
            it, conv, ref = _stefcal_one(vis[s], w_row, ant1, ant2, n_ants, ref_ant, g_row,
                                         seed_init, max_iters, thresh2, rr, ri, w, gr, gi,
                                         new_r, new_i, ag2, den, total_w, gains[s])
            iterations[s] = it
            converged[s] = conv
            ref_used[s] = ref


def _check_bls(bls: np.ndarray, n_ants: int) -> np.ndarray:
    bls = np.asarray(bls)
    if bls.ndim != 2 or bls.shape[1] != 2:
        raise ValueError(f"bls must have shape (n_bl, 2), not {bls.shape}")
    if bls.size and (bls.min() < 0 or bls.max() >= n_ants):
        raise ValueError(f"bls refers to antennas outside 0..{n_ants - 1}")
    return bls.astype(np.int64)


def _weight_rows(weights, vis: np.ndarray, real_dtype) -> np.ndarray:
    """Weights as (1 or n_solves, n_bl) rows of `real_dtype`: a single row when they do not
    vary between solves, so the common cases (no weights, per-baseline weights) cost nothing."""
    n_bl = vis.shape[-1]
    if weights is None:
        return np.ones((1, n_bl), real_dtype)
    weights = np.asarray(weights)
    try:
        full = np.broadcast_to(weights, vis.shape)
    except ValueError:
        raise ValueError(
            f"weights of shape {weights.shape} do not broadcast to vis {vis.shape}"
        ) from None
    if weights.ndim <= 1 or all(s == 1 for s in weights.shape[:-1]):
        return np.ascontiguousarray(np.broadcast_to(weights.reshape(-1), (1, n_bl)),
                                    real_dtype)
    return np.ascontiguousarray(full.reshape(-1, n_bl), real_dtype)


def stefcal(
    vis: np.ndarray,
    bls: np.ndarray,
    n_ants: int,
    weights: np.ndarray | None = None,
    ref_ant: int = 0,
    init_gain: np.ndarray | None = None,
    max_iters: int = 100,
    conv_thresh: float = 1e-5,
) -> StefcalResult:
    """Solve for per-antenna complex gains with StEFCal, many independent solves at once.

    Every leading axis of `vis` is an independent problem (channel, interval, pol ...); the
    solves run in parallel over numba threads, so one call with many solves is much cheaper
    than many calls. Weights shared by all solves (None, a scalar or one value per baseline)
    are never broadcast in memory. For speed, pass `vis` with baselines contiguous (C order):
    other layouts are copied first.

    Parameters
    ----------
    vis : ndarray, complex64 or complex128, shape (..., n_bl)
        Visibilities divided by the model, ``V_ab ≈ g_a·conj(g_b)``.
    bls : ndarray, int, shape (n_bl, 2)
        Antenna indices of each baseline. Autocorrelations are ignored.
    n_ants : int
        Number of antennas.
    weights : ndarray, optional
        Inverse-variance weights broadcastable to `vis` (see the module docstring); zero,
        non-finite or > 1e15 means flagged. Default: all 1.
    ref_ant : int
        Antenna whose phase is set to 0. If it has no valid data in a solve, that solve is
        referenced to the antenna with the most total weight instead (reported in
        ``ref_ant`` of the result). A negative value always picks that antenna.
    init_gain : ndarray, complex, optional
        Initial gains broadcastable to (..., n_ants). Default: phases from the visibilities
        of the reference antenna's baselines (``conj(V_ref,q)``) and a common amplitude, which
        converges in about half the iterations of all-ones at moderate and high SNR.
    max_iters : int
        Maximum number of iterations.
    conv_thresh : float
        Stop when ``‖g - g_prev‖ ≤ conv_thresh·‖g‖`` (tested every second iteration).

    Returns
    -------
    StefcalResult
        Gains (..., n_ants) of the precision of `vis`, iterations, convergence flags and the
        reference antenna used.
    """
    vis = np.asarray(vis)
    if not np.iscomplexobj(vis):
        vis = vis.astype(np.complex128)
    if vis.dtype not in (np.complex64, np.complex128):
        vis = vis.astype(np.complex128)
    bls = _check_bls(bls, n_ants)
    if vis.ndim < 1 or vis.shape[-1] != len(bls):
        raise ValueError(f"vis last axis {vis.shape[-1:]} does not match {len(bls)} baselines")
    real_dtype = np.float32 if vis.dtype == np.complex64 else np.float64
    lead = vis.shape[:-1]
    w = _weight_rows(weights, vis, real_dtype)
    flat = np.ascontiguousarray(vis.reshape(-1, len(bls)))
    n_solves = flat.shape[0]
    if init_gain is None:
        g0 = np.ones((1, n_ants), vis.dtype)
    else:
        g0 = np.broadcast_to(np.asarray(init_gain, vis.dtype), (*lead, n_ants))
        g0 = np.ascontiguousarray(g0.reshape(n_solves, n_ants))
    gains = np.empty((n_solves, n_ants), vis.dtype)
    iterations = np.empty(n_solves, np.int32)
    converged = np.empty(n_solves, np.bool_)
    ref_used = np.empty(n_solves, np.int32)
    if n_solves:
        n_chunks = min(n_solves, 4 * numba.get_num_threads())
        _stefcal_kernel(flat, w, bls[:, 0].copy(), bls[:, 1].copy(), n_ants, int(ref_ant), g0,
                        init_gain is None, int(max_iters), float(conv_thresh), n_chunks, gains,
                        iterations, converged, ref_used)
    return StefcalResult(gains.reshape(*lead, n_ants), iterations.reshape(lead),
                         converged.reshape(lead), ref_used.reshape(lead))


# --------------------------------------------------------------------------------------------
# Averaging helpers


def valid_weights(vis: np.ndarray, weights: np.ndarray | None = None,
                  flags: np.ndarray | None = None) -> np.ndarray:
    """Weights with every invalid sample set to 0 (float64, the shape of `vis`).

    A sample is invalid when it is flagged (non-zero `flags`), when the visibility is not finite
    or exactly zero, or when its weight is not finite, not positive or above ``HIGH_WEIGHT``.
    """
    vis = np.asarray(vis)
    w = np.ones(vis.shape) if weights is None else np.broadcast_to(weights, vis.shape)
    w = np.asarray(w, np.float64)
    bad = ~np.isfinite(vis) | (vis == 0) | ~(w > 0) | ~(w < HIGH_WEIGHT)
    if flags is not None:
        bad |= np.broadcast_to(np.asarray(flags) != 0, vis.shape)
    return np.where(bad, 0.0, w)


def weighted_average(vis: np.ndarray, weights: np.ndarray | None = None,
                     axis: int | tuple[int, ...] = 0, flags: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """NaN-safe inverse-variance weighted average along `axis`.

    Returns
    -------
    vis_avg : ndarray, complex128
        Average; NaN where nothing valid contributed.
    weight_sum : ndarray, float64
        Summed weights, i.e. the inverse variance of the average (0 where nothing was valid).
    """
    vis = np.asarray(vis)
    w = valid_weights(vis, weights, flags)
    wsum = w.sum(axis=axis)
    num = np.where(w > 0, vis * w, 0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        avg = np.where(wsum > 0, num / np.where(wsum > 0, wsum, 1), np.nan + 0j)
    return avg, wsum


# --------------------------------------------------------------------------------------------
# Delay fitting


def _fit_delays(spectra: np.ndarray, weights: np.ndarray, freqs: np.ndarray,
                oversample: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Delay of each complex spectrum ``s(f) ∝ exp(+2πi·τ·f)``: FFT peak, then a phase-slope fit.

    The coarse FFT search is over the whole unambiguous range ±1/(2Δf); the fine fit is a
    weighted least-squares line through the phase after the coarse delay and the mean phase
    are removed, so no phase unwrapping is needed (the residual stays well inside ±π), iterated
    twice to re-centre.

    Parameters
    ----------
    spectra : ndarray, complex, shape (n, n_chans)
    weights : ndarray, float, shape (n, n_chans)
        Relative weight of each channel (0 = unusable).
    freqs : ndarray, float, shape (n_chans,)
        Uniformly spaced channel frequencies in Hz.

    Returns
    -------
    delay, phase_rms : ndarray, float64, shape (n,)
        Delay in seconds (NaN with no valid channel) and the weighted RMS of the residual phase.
    """
    freqs = np.asarray(freqs, np.float64)
    n_chans = freqs.size
    n = spectra.shape[0]
    delay = np.full(n, np.nan)
    phase_rms = np.full(n, np.nan)
    if n_chans < 2:
        return delay, phase_rms
    df = (freqs[-1] - freqs[0]) / (n_chans - 1)
    if df == 0 or not np.allclose(np.diff(freqs), df, rtol=1e-6, atol=abs(df) * 1e-6):
        raise ValueError("delay fitting needs uniformly spaced channel frequencies")
    ok = (weights > 0) & np.isfinite(spectra)
    w = np.where(ok, weights, 0.0)
    unit = np.where(ok, spectra / np.where(ok & (spectra != 0), np.abs(spectra), 1), 0)
    n_fft = 1 << int(np.ceil(np.log2(oversample * n_chans)))
    power = np.abs(np.fft.ifft(unit * w, n=n_fft, axis=-1))
    # ifft's kernel is exp(+2πi·m·k/M); a spectrum ∝ exp(+2πi·τ·Δf·k) peaks at m = -τ·Δf·M.
    peak = np.argmax(power, axis=-1)
    m = np.where(peak > n_fft // 2, peak - n_fft, peak)
    coarse = -m / (n_fft * df)
    fc = freqs - freqs.mean()
    tau = coarse.copy()
    for _ in range(2):
        rot = unit * np.exp(-2j * np.pi * tau[:, None] * fc[None, :])
        offset = np.angle(np.sum(w * rot, axis=-1))
        phase = np.angle(rot * np.exp(-1j * offset)[:, None])
        wsum = w.sum(axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            fbar = (w * fc).sum(axis=-1) / wsum
            x = fc[None, :] - fbar[:, None]
            slope = (w * x * phase).sum(axis=-1) / (w * x * x).sum(axis=-1)
        tau = tau + slope / (2 * np.pi)
    rot = unit * np.exp(-2j * np.pi * tau[:, None] * fc[None, :])
    offset = np.angle(np.sum(w * rot, axis=-1))
    resid = np.angle(rot * np.exp(-1j * offset)[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        phase_rms = np.sqrt((w * resid**2).sum(axis=-1) / w.sum(axis=-1))
    valid = w.sum(axis=-1) > 0
    delay = np.where(valid, tau, np.nan)
    phase_rms = np.where(valid, phase_rms, np.nan)
    return delay, phase_rms


class DelaySolution(NamedTuple):
    """Output of :func:`k_solve`.

    Attributes
    ----------
    delay : ndarray, float32, shape (n_pols, n_ants)
        Delays in seconds, gain convention exp(+2πi·K·f), refant = 0; NaN where unsolvable.
    snr : ndarray, float32, shape (n_pols, n_ants)
        1 / RMS residual phase of the per-channel solutions about the fitted slope.
    ref_ant : int
        Reference antenna actually used.
    """

    delay: np.ndarray
    snr: np.ndarray
    ref_ant: int


def _antenna_weights(weights: np.ndarray, bls: np.ndarray, n_ants: int) -> np.ndarray:
    """Sum of valid cross-correlation weights touching each antenna: (..., n_bl) → (..., n_ants)."""
    cross = bls[:, 0] != bls[:, 1]
    inc = np.zeros((len(bls), n_ants))
    idx = np.arange(len(bls))
    inc[idx[cross], bls[cross, 0]] = 1
    inc[idx[cross], bls[cross, 1]] = 1
    return weights @ inc


def _usable_refant(ref_ant: int, ant_w: np.ndarray) -> int:
    """`ref_ant` if it has data in ant_w (..., n_ants), else the antenna with the most weight."""
    total = ant_w.reshape(-1, ant_w.shape[-1]).sum(axis=0)
    if 0 <= ref_ant < total.size and total[ref_ant] > 0:
        return ref_ant
    return int(np.argmax(total)) if total.max() > 0 else -1


def k_solve(
    vis: np.ndarray,
    bls: np.ndarray,
    n_ants: int,
    freqs: np.ndarray,
    weights: np.ndarray | None = None,
    ref_ant: int = 0,
    max_iters: int = 100,
) -> DelaySolution:
    """Solve for per-antenna delays (K) from time-averaged visibilities.

    Per channel, StEFCal (all baselines at once) gives each antenna's gain referenced to the
    refant; the delay of each antenna is then found by an FFT search over the full band of its
    gain spectrum followed by a weighted phase-slope fit. Using all baselines per channel before
    the FFT keeps the coarse search reliable down to SNR ≈ 1 per visibility per channel, where
    a per-baseline FFT plus phase unwrapping (katsdpcal's ``k_fit``) breaks down.

    Parameters
    ----------
    vis : ndarray, complex, shape (n_chans, n_pols, n_bl)
        Time-averaged parallel-hand visibilities of the K window, divided by the model.
    bls : ndarray, int, shape (n_bl, 2)
    n_ants : int
    freqs : ndarray, float, shape (n_chans,)
        Channel frequencies in Hz, uniformly spaced.
    weights : ndarray, optional
        Inverse-variance weights, broadcastable to `vis`.
    ref_ant : int
        Reference antenna (reselected if it has no valid data).

    Returns
    -------
    DelaySolution
    """
    vis = np.asarray(vis)
    if vis.ndim != 3:
        raise ValueError(f"vis must be (n_chans, n_pols, n_bl), not {vis.shape}")
    bls = _check_bls(bls, n_ants)
    freqs = np.asarray(freqs, np.float64)
    if freqs.shape != (vis.shape[0],):
        raise ValueError(f"freqs shape {freqs.shape} does not match {vis.shape[0]} channels")
    w = valid_weights(vis, weights)
    ant_w = _antenna_weights(w, bls, n_ants)  # (n_chans, n_pols, n_ants)
    ref = _usable_refant(ref_ant, ant_w)
    n_pols = vis.shape[1]
    delay = np.full((n_pols, n_ants), np.nan, np.float32)
    snr = np.full((n_pols, n_ants), np.nan, np.float32)
    if ref < 0:
        return DelaySolution(delay, snr, ref)
    res = stefcal(vis, bls, n_ants, w, ref_ant=ref, max_iters=max_iters)
    # Channels whose solve had to use another refant are on a different phase reference.
    chan_ok = res.ref_ant == ref  # (n_chans, n_pols)
    gains = np.where(chan_ok[..., None], res.gains, np.nan)
    spectra = np.moveaxis(gains, 0, -1).reshape(n_pols * n_ants, -1)
    # The variance of a gain is ~1/Σ w|g|², so the antenna weight is its inverse-variance weight.
    sw = np.moveaxis(np.where(chan_ok[..., None], ant_w, 0.0), 0, -1).reshape(n_pols * n_ants, -1)
    tau, rms = _fit_delays(spectra, sw, freqs)
    tau = tau.reshape(n_pols, n_ants)
    rms = rms.reshape(n_pols, n_ants)
    tau -= tau[:, ref : ref + 1]
    tau[:, ref] = np.where(np.isfinite(tau[:, ref]), 0.0, np.nan)
    with np.errstate(divide="ignore"):
        snr_v = np.where(rms > 0, 1.0 / rms, np.inf)
    snr_v[:, ref] = np.nan
    return DelaySolution(tau.astype(np.float32), snr_v.astype(np.float32), ref)


def kcross_solve(
    vis_vh: np.ndarray,
    vis_hv: np.ndarray,
    freqs: np.ndarray,
    weights_vh: np.ndarray | None = None,
    weights_hv: np.ndarray | None = None,
) -> np.ndarray:
    """Solve the cross-hand delay (KCROSS) from K/B/G-corrected cross-hand visibilities.

    As katsdpcal: ``vh + conj(hv)`` averaged over time (done by the caller) and over all
    baselines, then one delay for the whole array.

    Parameters
    ----------
    vis_vh, vis_hv : ndarray, complex, shape (n_chans, n_bl)
        Cross-hand visibilities, ordered as in ``cal_pol_ordering`` (first pol is 'v').
    freqs : ndarray, float, shape (n_chans,)
    weights_vh, weights_hv : ndarray, optional

    Returns
    -------
    ndarray, float32, shape (2, 1)
        Row 0: delay (s) of the first pol relative to the second, ``vh ∝ exp(+2πi·K·f)``;
        row 1: 0. NaN if there was no valid data.
    """
    vis_vh = np.asarray(vis_vh)
    vis_hv = np.asarray(vis_hv)
    if vis_vh.shape != vis_hv.shape or vis_vh.ndim != 2:
        raise ValueError("vis_vh and vis_hv must both be (n_chans, n_bl)")
    w_vh = valid_weights(vis_vh, weights_vh)
    w_hv = valid_weights(vis_hv, weights_hv)
    both = np.concatenate([vis_vh, np.conj(vis_hv)], axis=1)
    spec, wsum = weighted_average(both, np.concatenate([w_vh, w_hv], axis=1), axis=1)
    tau, _ = _fit_delays(spec[None, :], wsum[None, :], freqs)
    return np.array([[tau[0]], [0.0]], np.float32)


# --------------------------------------------------------------------------------------------
# Bandpass and gain


def b_solve(
    vis: np.ndarray,
    bls: np.ndarray,
    n_ants: int,
    weights: np.ndarray | None = None,
    ref_ant: int = 0,
    max_iters: int = 100,
) -> np.ndarray:
    """Solve the bandpass (B): one StEFCal per channel and pol on time-averaged visibilities.

    Parameters
    ----------
    vis : ndarray, complex, shape (n_chans, n_pols, n_bl)
        Time-averaged parallel-hand visibilities (K applied, model divided out).
    bls, n_ants, weights, ref_ant, max_iters
        As for :func:`stefcal`.

    Returns
    -------
    ndarray, complex64, shape (n_chans, n_pols, n_ants)
        NaN where a channel has no data or could not be referenced to `ref_ant`.
    """
    vis = np.asarray(vis)
    if vis.ndim != 3:
        raise ValueError(f"vis must be (n_chans, n_pols, n_bl), not {vis.shape}")
    bls = _check_bls(bls, n_ants)
    w = valid_weights(vis, weights)
    ref = _usable_refant(ref_ant, _antenna_weights(w, bls, n_ants))
    res = stefcal(vis, bls, n_ants, w, ref_ant=ref, max_iters=max_iters)
    return np.where((res.ref_ant == ref)[..., None], res.gains, np.nan).astype(np.complex64)


def normalise_bandpass(bandpass: np.ndarray, bchan: int = 0, echan: int | None = None
                       ) -> np.ndarray:
    """Scale B so that, in channels [bchan, echan), each (pol, ant) has mean amplitude 1 and
    mean phase 0 (NaN channels ignored), as katsdpcal does in the G window.

    Returns a new complex64 array of the same shape (n_chans, n_pols, n_ants).
    """
    b = np.asarray(bandpass)
    win = b[bchan:echan]
    with np.errstate(invalid="ignore", divide="ignore"):
        amp = np.nanmean(np.abs(win), axis=0)
        phasor = np.nansum(np.where(np.isfinite(win), win / np.abs(win), 0), axis=0)
        norm = np.exp(-1j * np.angle(phasor)) / amp
    return (b * norm[None]).astype(np.complex64)


def solint_from_nominal(solint: float, dump_period: float, n_dumps: int) -> tuple[float, int]:
    """Adjust a nominal solution interval by up to ±20% so the last interval is as full as
    possible.

    Returns
    -------
    solint : float
        The adjusted interval in seconds.
    dumps_per_solint : int
        At least 1 and at most `n_dumps`.
    """
    if dump_period <= 0 or n_dumps < 1:
        raise ValueError("dump_period must be positive and n_dumps at least 1")
    nominal = solint / dump_period
    if nominal <= 1:
        return dump_period, 1
    if nominal >= n_dumps:
        return n_dumps * dump_period, n_dumps
    lo = max(1, int(np.floor(0.8 * nominal)))
    hi = min(n_dumps, int(np.ceil(1.2 * nominal)))
    best = None
    for n in range(lo, hi + 1):
        rem = n_dumps % n
        fill = 1.0 if rem == 0 else rem / n
        key = (-fill, abs(n - nominal), -n)  # ties: the longer interval (more signal)
        if best is None or key < best[0]:
            best = (key, n)
    n = best[1]
    return n * dump_period, n


class GainSolution(NamedTuple):
    """Output of :func:`g_solve`.

    Attributes
    ----------
    gains : ndarray, complex64, shape (n_intervals, n_pols, n_ants)
    times : ndarray, float64, shape (n_intervals,)
        Mean timestamp of each interval (interval index if no timestamps were given).
    iterations : ndarray, int32, shape (n_intervals, n_pols)
    converged : ndarray, bool, shape (n_intervals, n_pols)
    snr : ndarray, float32, shape (n_intervals, n_pols, n_ants)
        :func:`snr_antenna` of each interval's channel-averaged residuals (katsdpcal's
        ``product_SNR_G``).
    """

    gains: np.ndarray
    times: np.ndarray
    iterations: np.ndarray
    converged: np.ndarray
    snr: np.ndarray


def g_solve(
    vis: np.ndarray,
    bls: np.ndarray,
    n_ants: int,
    dumps_per_solint: int,
    weights: np.ndarray | None = None,
    timestamps: np.ndarray | None = None,
    ref_ant: int = 0,
    max_iters: int = 30,
    conv_thresh: float = 1e-5,
) -> GainSolution:
    """Solve a gain (G) per solution interval: average dumps of each interval and all channels
    given (the G window), then one StEFCal per (interval, pol).

    Parameters
    ----------
    vis : ndarray, complex, shape (n_dumps, n_chans, n_pols, n_bl)
        Corrected (K, B applied) parallel-hand visibilities of the G window.
    bls, n_ants : as for :func:`stefcal`
    dumps_per_solint : int
        Dumps per interval (see :func:`solint_from_nominal`); the last interval may be shorter.
    weights : ndarray, optional
        Inverse-variance weights broadcastable to `vis`.
    timestamps : ndarray, float, shape (n_dumps,), optional
    ref_ant, max_iters, conv_thresh : as for :func:`stefcal`

    Returns
    -------
    GainSolution
    """
    vis = np.asarray(vis)
    if vis.ndim != 4:
        raise ValueError(f"vis must be (n_dumps, n_chans, n_pols, n_bl), not {vis.shape}")
    if dumps_per_solint < 1:
        raise ValueError("dumps_per_solint must be at least 1")
    bls = _check_bls(bls, n_ants)
    n_dumps = vis.shape[0]
    w = valid_weights(vis, weights)
    starts = np.arange(0, n_dumps, dumps_per_solint)
    avg = []
    wsum = []
    for s in starts:
        a, ws = weighted_average(vis[s : s + dumps_per_solint], w[s : s + dumps_per_solint],
                                 axis=(0, 1))
        avg.append(a)
        wsum.append(ws)
    avg = np.array(avg)
    wsum = np.array(wsum)
    if timestamps is None:
        timestamps = np.arange(n_dumps, dtype=np.float64)
    timestamps = np.asarray(timestamps, np.float64)
    times = np.array([timestamps[s : s + dumps_per_solint].mean() for s in starts])
    # Scale weights to O(1): only their ratios matter, and float32 sums stay accurate.
    scale = wsum[wsum > 0].mean() if np.any(wsum > 0) else 1.0
    dtype = np.complex64 if vis.dtype == np.complex64 else np.complex128
    res = stefcal(np.where(wsum > 0, avg, 0).astype(dtype), bls, n_ants, wsum / scale,
                  ref_ant=ref_ant, max_iters=max_iters, conv_thresh=conv_thresh)
    snr = snr_antenna(residuals(avg, res.gains, bls)[:, None], wsum[:, None], bls, n_ants)
    return GainSolution(res.gains.astype(np.complex64), times, res.iterations, res.converged,
                        snr)


# --------------------------------------------------------------------------------------------
# Solution SNR


def residuals(vis: np.ndarray, gains: np.ndarray, bls: np.ndarray) -> np.ndarray:
    """``V_ab / (g_a·conj(g_b))``: what a solution leaves of the data (1 for a perfect fit).

    Parameters
    ----------
    vis : ndarray, complex, shape (..., n_bl)
    gains : ndarray, complex, shape (..., n_ants)
        Broadcastable against `vis` except for the last axis.
    bls : ndarray, int, shape (n_bl, 2)

    Returns
    -------
    ndarray, complex128
        NaN where a gain is NaN or zero.
    """
    g = np.asarray(gains)
    denom = g[..., bls[:, 0]] * np.conj(g[..., bls[:, 1]])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom != 0, np.asarray(vis) / np.where(denom != 0, denom, 1), np.nan)


def snr_antenna(
    resid: np.ndarray,
    weights: np.ndarray | None,
    bls: np.ndarray,
    n_ants: int,
    poor_threshold: float = 0.2,
    poor_fraction: float = 0.8,
) -> np.ndarray:
    """Per-antenna SNR of a solution from its residual phases, as katsdpcal defines it.

    ``SNR_a = 1 / RMS(arg r)`` over all samples (leading axes of `resid` but the first) and all
    baselines of antenna ``a``, weighted by `weights`, with the mean residual phase taken as 0.
    For a residual ``r = 1 + n`` with complex noise ``E|n|² = sigma²`` this is ``√2/sigma`` at
    high SNR, i.e. the per-visibility SNR of the data the solution was fitted to (real part over the
    noise of one component). The fit absorbs part of the noise: with ``N`` antennas solved from
    all ``N(N-1)/2`` baselines the expected value is ``√2/sigma · √(N/(N-2))``. At low SNR the phase
    wraps and the estimate saturates near ``√3/π ≈ 0.55``.

    Antennas are first marked *poor* when more than `poor_fraction` of their baselines have a
    phase RMS above `poor_threshold` rad (katsdpcal's ``poor_antenna_flags``). A poor antenna's
    baselines are left out of the other antennas' SNR, so one bad antenna cannot drag down the
    rest, but they are used for its own.

    Parameters
    ----------
    resid : ndarray, complex, shape (n_sol, n_samples, n_pols, n_bl)
        Residuals (:func:`residuals`) of each solution: for B the channels of one time average,
        for G the (one) channel-averaged sample of each interval.
    weights : ndarray, optional
        Broadcastable to `resid`; zero or NaN residuals get no weight.
    bls : ndarray, int, shape (n_bl, 2)
    n_ants : int
    poor_threshold, poor_fraction : float

    Returns
    -------
    ndarray, float32, shape (n_sol, n_pols, n_ants)
        NaN for an antenna without valid residuals (also the reference antenna if it has none).
    """
    resid = np.asarray(resid)
    if resid.ndim != 4:
        raise ValueError(f"resid must be (n_sol, n_samples, n_pols, n_bl), not {resid.shape}")
    bls = _check_bls(bls, n_ants)
    w = valid_weights(resid, weights)
    phase2 = np.where(w > 0, np.angle(np.where(w > 0, resid, 1)) ** 2, 0.0)
    # Per baseline: phase RMS over samples, to find poor antennas.
    wb = w.sum(axis=1)  # (n_sol, n_pols, n_bl)
    pb = (w * phase2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rms_bl = np.sqrt(pb / wb)
    has = wb > 0
    cross = bls[:, 0] != bls[:, 1]
    inc = np.zeros((len(bls), n_ants), bool)
    inc[np.flatnonzero(cross), bls[cross, 0]] = True
    inc[np.flatnonzero(cross), bls[cross, 1]] = True
    high = (has & (rms_bl > poor_threshold)).astype(np.float64) @ inc
    valid = has.astype(np.float64) @ inc
    poor = high > poor_fraction * np.maximum(valid, 1)  # (n_sol, n_pols, n_ants)
    poor &= valid > 0
    # A baseline is left out of antenna a's SNR when its other antenna is poor and a is not.
    snr = np.full(poor.shape, np.nan, np.float32)
    for ant in range(n_ants):
        sel = inc[:, ant]
        other = np.where(bls[sel, 0] == ant, bls[sel, 1], bls[sel, 0])
        keep = ~poor[..., other] | poor[..., ant : ant + 1]  # (n_sol, n_pols, n_sel)
        ws = np.where(keep, wb[..., sel], 0.0).sum(axis=-1)
        ps = np.where(keep, pb[..., sel], 0.0).sum(axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            snr[..., ant] = np.where(ws > 0, 1.0 / np.sqrt(ps / ws), np.nan)
    return snr


# --------------------------------------------------------------------------------------------
# Flux scale

#: Standard error of a median over that of a mean, for Gaussian samples (√(π/2)).
MEDIAN_ERROR_FACTOR = 1.2533


def measure_flux(g_flux: np.ndarray, g: np.ndarray) -> tuple[float, float]:
    """Flux density of a gain calibrator from its gains and the flux calibrator's (katsdpcal's
    ``measure_flux``, the last step of CASA ``fluxscale``).

    The gain calibrator was solved as a 1 Jy point source, so ``|G| = |g|·√S``, while G_FLUX
    was solved against the flux calibrator's model, ``|G_FLUX| = |g|``. Per (pol, antenna) the
    ratio ``r = median_t|G| / median_t|G_FLUX|`` estimates √S; S is the square of the median
    of r over (pol, antenna). Its standard error is ``2·S·1.253·s_r/(r̃·√n)``: the standard
    error of a median of n samples of relative scatter ``s_r/r̃`` (s_r the standard deviation
    of r about its median r̃), doubled by the square.

    Parameters
    ----------
    g_flux : ndarray, complex, shape (n_t1, n_pols, n_ants)
        Gains of the flux (bandpass) calibrator, solved against its model.
    g : ndarray, complex, shape (n_t2, n_pols, n_ants)
        Gains of the gain calibrator (solved as 1 Jy). NaNs are ignored.

    Returns
    -------
    flux, std : float
        Jy; NaN if no (pol, antenna) has both. `std` is NaN with a single (pol, antenna).
    """
    g_flux = np.asarray(g_flux)
    g = np.asarray(g)
    if g_flux.ndim != 3 or g.ndim != 3 or g_flux.shape[1:] != g.shape[1:]:
        raise ValueError(f"g_flux {g_flux.shape} and g {g.shape} must be (time, pol, ant) alike")
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN (pol, ant) slices
        ratio = np.nanmedian(np.abs(g), axis=0) / np.nanmedian(np.abs(g_flux), axis=0)
    ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
    if ratio.size == 0:
        return math.nan, math.nan
    med = float(np.median(ratio))
    flux = med**2
    if ratio.size < 2:
        return flux, math.nan
    sigma = math.sqrt(float(np.mean((ratio - med) ** 2)))
    return flux, 2.0 * flux * MEDIAN_ERROR_FACTOR * sigma / (med * math.sqrt(ratio.size))


# --------------------------------------------------------------------------------------------
# Reference antenna


def antenna_flag_fraction(weights: np.ndarray, bls: np.ndarray, n_ants: int) -> np.ndarray:
    """Fraction of each antenna's cross-correlation samples that are flagged (weight 0).

    `weights` has baselines on the last axis (use :func:`valid_weights` to fold in flags/NaNs).
    Antennas without any baseline get 1.
    """
    bls = _check_bls(bls, n_ants)
    w = np.asarray(weights).reshape(-1, len(bls))
    good = _antenna_weights((w > 0).astype(np.float64), bls, n_ants).sum(axis=0)
    total = _antenna_weights(np.ones_like(w, np.float64), bls, n_ants).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 1.0 - good / np.where(total > 0, total, 1), 1.0)


def refant_pnr(vis: np.ndarray, bls: np.ndarray, n_ants: int,
               weights: np.ndarray | None = None) -> np.ndarray:
    """Median delay-spectrum peak-to-noise ratio of each antenna's baselines.

    For each (pol, baseline) the FFT over frequency of the time-averaged visibility is taken;
    PNR = (peak - mean)/std, with mean and std over the half of the delay spectrum farthest
    from the peak. Each antenna gets the median over its baselines and pols.

    Parameters
    ----------
    vis : ndarray, complex, shape (n_chans, n_pols, n_bl)
    weights : ndarray, optional

    Returns
    -------
    ndarray, float64, shape (n_ants,)
        NaN for antennas without valid data.
    """
    vis = np.asarray(vis)
    bls = _check_bls(bls, n_ants)
    w = valid_weights(vis, weights)
    n_chans = vis.shape[0]
    spec = np.abs(np.fft.fft(np.where(w > 0, vis, 0), axis=0))  # (n_chans, n_pols, n_bl)
    peak_idx = np.argmax(spec, axis=0)
    rolled = np.take_along_axis(
        spec, (np.arange(n_chans)[:, None, None] + peak_idx[None]) % n_chans, axis=0)
    far = rolled[n_chans // 4 : n_chans - n_chans // 4]
    with np.errstate(invalid="ignore", divide="ignore"):
        pnr = (rolled[0] - far.mean(axis=0)) / far.std(axis=0)
    has_data = (w > 0).any(axis=0)
    pnr = np.where(has_data & np.isfinite(pnr), pnr, np.nan)
    out = np.full(n_ants, np.nan)
    for ant in range(n_ants):
        sel = ((bls[:, 0] == ant) | (bls[:, 1] == ant)) & (bls[:, 0] != bls[:, 1])
        vals = pnr[:, sel]
        if np.isfinite(vals).any():
            out[ant] = np.nanmedian(vals)
    return out


def _refant_candidates(vis, bls, n_ants, weights, max_flag_fraction):
    """PNR per antenna and the mask of antennas fit to be the refant (enough data, PNR not a
    low outlier: at least median - 1.4826·MAD)."""
    pnr = refant_pnr(vis, bls, n_ants, weights)
    frac = antenna_flag_fraction(valid_weights(vis, weights), bls, n_ants)
    ok = np.isfinite(pnr) & (frac < max_flag_fraction)
    if not ok.any():
        return pnr, ok
    med = np.median(pnr[ok])
    mad = np.median(np.abs(pnr[ok] - med))
    return pnr, ok & (pnr >= med - 1.4826 * mad)


def best_refant(
    vis: np.ndarray,
    bls: np.ndarray,
    n_ants: int,
    weights: np.ndarray | None = None,
    exclude: tuple[int, ...] | list[int] = (),
    max_flag_fraction: float = 0.8,
    prefer: str = "pnr",
) -> int:
    """Choose a reference antenna from time-averaged calibrator visibilities.

    Candidates are antennas with a flag fraction below `max_flag_fraction` whose median PNR
    (:func:`refant_pnr`) is at least ``median - 1.4826·MAD`` over the antennas with data. Among
    those, ``prefer="pnr"`` takes the highest PNR; ``prefer="index"`` reproduces katsdpcal, which
    takes the highest antenna index (it promotes outer antennas).

    Parameters
    ----------
    vis : ndarray, complex, shape (n_chans, n_pols, n_bl)
        Time-averaged parallel-hand visibilities (the K window).
    bls, n_ants, weights : as for :func:`stefcal`
    exclude : sequence of int
        Antennas not to choose.
    max_flag_fraction : float
    prefer : {"pnr", "index"}

    Returns
    -------
    int
        Antenna index, or -1 if no antenna qualifies.
    """
    if prefer not in ("pnr", "index"):
        raise ValueError(f"prefer must be 'pnr' or 'index', not {prefer!r}")
    pnr, cand = _refant_candidates(vis, bls, n_ants, weights, max_flag_fraction)
    cand[list(exclude)] = False
    idx = np.flatnonzero(cand)
    if idx.size == 0:
        return -1
    if prefer == "index":
        return int(idx.max())
    return int(idx[np.argmax(pnr[idx])])


def keep_or_choose_refant(
    previous: int | None,
    vis: np.ndarray,
    bls: np.ndarray,
    n_ants: int,
    weights: np.ndarray | None = None,
    max_flag_fraction: float = 0.8,
    prefer: str = "pnr",
) -> int:
    """Refant for a new capture block: keep `previous` while it is still good, else choose anew.

    The previous refant is kept when it passes the same test as :func:`best_refant`'s
    candidates in this data (flag fraction below `max_flag_fraction`, PNR not a low outlier).
    Otherwise a new one is chosen with `previous` excluded.

    Returns
    -------
    int
        Antenna index, or -1 if no antenna qualifies.
    """
    if previous is None or not 0 <= previous < n_ants:
        return best_refant(vis, bls, n_ants, weights, max_flag_fraction=max_flag_fraction,
                           prefer=prefer)
    _, cand = _refant_candidates(vis, bls, n_ants, weights, max_flag_fraction)
    if cand[previous]:
        return int(previous)
    return best_refant(vis, bls, n_ants, weights, exclude=(previous,),
                       max_flag_fraction=max_flag_fraction, prefer=prefer)
