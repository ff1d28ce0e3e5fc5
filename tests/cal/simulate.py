"""Simulated calibrator data with known truth, for the cal kernel tests and benchmarks.

Everything takes a seed or a ``numpy.random.Generator`` so results are deterministic.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def cross_baselines(n_ants: int) -> np.ndarray:
    """All cross-correlation antenna pairs (a < b), shape (n_bl, 2)."""
    a1, a2 = np.triu_indices(n_ants, 1)
    return np.stack([a1, a2], axis=1)


def complex_noise(rng: np.random.Generator, shape, sigma: float | np.ndarray) -> np.ndarray:
    """Circular complex Gaussian noise with E|n|² = sigma² (sigma/√2 per component)."""
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) * (
        np.asarray(sigma) / np.sqrt(2))


def random_gains(rng: np.random.Generator, shape) -> np.ndarray:
    """Gains with amplitude U(0.8, 1.2) and phase U(-π, π)."""
    return rng.uniform(0.8, 1.2, shape) * np.exp(1j * rng.uniform(-np.pi, np.pi, shape))


def gain_vis(gains: np.ndarray, bls: np.ndarray) -> np.ndarray:
    """Noise-free V_ab = g_a·conj(g_b) for gains (..., n_ants) → (..., n_bl)."""
    return gains[..., bls[:, 0]] * np.conj(gains[..., bls[:, 1]])


def band_shape(n_chans: int, edge: float = 0.2, ripple: float = 0.05,
               ripple_period: float = 700.0) -> np.ndarray:
    """A bandpass amplitude: flat top with a steep roll-off to `edge` at both ends
    (∝ (|f - f_c|/half-band)⁶) and a sinusoidal ripple."""
    x = (np.arange(n_chans) - (n_chans - 1) / 2) / ((n_chans - 1) / 2)
    shape = 1.0 - (1.0 - edge) * np.abs(x) ** 6
    return shape * (1.0 + ripple * np.sin(2 * np.pi * np.arange(n_chans) / ripple_period))


class RfiBlock(NamedTuple):
    """A (time, freq, baseline) block with injected RFI.

    Attributes
    ----------
    vis : ndarray, complex64
    truth : ndarray, bool
        Where RFI was injected.
    kind : ndarray, uint8
        0 none, 1 narrowband line, 2 broadband burst, 3 blip (strongest wins).
    strength : ndarray, float32
        Injected amplitude in units of the noise sigma (0 where none).
    """

    vis: np.ndarray
    truth: np.ndarray
    kind: np.ndarray
    strength: np.ndarray


LINE_STRENGTHS = (1, 2, 3, 5, 10, 30, 100)
BURST_STRENGTHS = (1, 2, 3, 5, 10, 30)
BLIP_STRENGTHS = (3, 5, 10, 30)


def rfi_block(
    seed: int,
    n_dumps: int = 100,
    n_chans: int = 4096,
    n_bl: int = 100,
    signal: float = 10.0,
    noise_follows_band: bool = False,
    rfi: bool = True,
    lines_per_strength: int = 6,
    bursts_per_strength: int = 2,
    blips_per_strength: int | None = None,
) -> RfiBlock:
    """The reference's flagging test block (after katsdpcal-vs-AOFlagger measurements).

    |V| = `signal` x :func:`band_shape` with a 10% slow drift in time and a linear phase per
    baseline, plus complex noise sigma = 1 (times the band shape if `noise_follows_band`, as in
    real cross hands where both scale with the receiver gain). ``signal=0`` gives cross-hand-like
    data of an unpolarised calibrator. RFI has random phase: persistent lines (1-3 channels, on
    ~70% of baselines), broadband bursts (1-2 dumps x 200-1500 channels, ~50% of baselines) and
    single-sample blips.
    """
    rng = np.random.default_rng(seed)
    shape = band_shape(n_chans)
    drift = 1.0 + 0.1 * np.sin(2 * np.pi * np.arange(n_dumps) / (1.7 * n_dumps)
                               + rng.uniform(0, 2 * np.pi))
    phase = np.exp(2j * np.pi * rng.uniform(-3, 3, n_bl)[None, :]
                   * np.linspace(-0.5, 0.5, n_chans)[:, None])
    amp = signal * shape[None, :, None] * drift[:, None, None]
    sigma = shape[None, :, None] if noise_follows_band else 1.0
    vis = amp * phase[None] + complex_noise(rng, (n_dumps, n_chans, n_bl), sigma)
    strength = np.zeros((n_dumps, n_chans, n_bl), np.float32)
    kind = np.zeros((n_dumps, n_chans, n_bl), np.uint8)
    if rfi:
        def inject(idx, k, s):
            # Fancy indexing copies, so read, update and write back; the strongest event wins.
            sub = strength[idx]
            knd = kind[idx]
            stronger = s > sub
            sub[stronger] = s
            knd[stronger] = k
            strength[idx] = sub
            kind[idx] = knd

        for s in LINE_STRENGTHS:
            for _ in range(lines_per_strength):
                c0 = rng.integers(0, n_chans - 3)
                width = rng.integers(1, 4)
                bls = rng.random(n_bl) < 0.7
                inject(np.ix_(np.arange(n_dumps), np.arange(c0, c0 + width), np.flatnonzero(bls)),
                       1, s)
        for s in BURST_STRENGTHS:
            for _ in range(bursts_per_strength):
                t0 = rng.integers(0, n_dumps - 1)
                dur = rng.integers(1, 3)
                width = rng.integers(200, 1501)
                c0 = rng.integers(0, n_chans - width)
                bls = rng.random(n_bl) < 0.5
                inject(np.ix_(np.arange(t0, t0 + dur), np.arange(c0, c0 + width),
                              np.flatnonzero(bls)), 2, s)
        n_blips = blips_per_strength or max(1, n_dumps * n_chans * n_bl // 13700)
        for s in BLIP_STRENGTHS:
            idx = (rng.integers(0, n_dumps, n_blips), rng.integers(0, n_chans, n_blips),
                   rng.integers(0, n_bl, n_blips))
            inject(idx, 3, s)
        # Strength is in units of the local noise sigma.
        local_sigma = np.broadcast_to(sigma, vis.shape)
        rfi_phase = np.exp(2j * np.pi * rng.random(vis.shape))
        vis = vis + strength * local_sigma * rfi_phase
    return RfiBlock(vis.astype(np.complex64), strength > 0, kind, strength)


class FlagScores(NamedTuple):
    recall: float
    precision: float
    precision_tol: float
    fp_far: float
    flagged: float


def _dilate_tf(mask: np.ndarray) -> np.ndarray:
    """±1 dump/channel dilation of a (time, freq, baseline) mask."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    wide = out.copy()
    wide[:, 1:] |= out[:, :-1]
    wide[:, :-1] |= out[:, 1:]
    return wide


def score_flags(flags: np.ndarray, truth: np.ndarray) -> FlagScores:
    """Recall, strict precision, precision with ±1 dump/channel tolerance, and the false-flag
    rate on samples farther than ±1 from any RFI."""
    near = _dilate_tf(truth)
    n_flag = max(int(flags.sum()), 1)
    return FlagScores(
        recall=float((flags & truth).sum() / max(int(truth.sum()), 1)),
        precision=float((flags & truth).sum() / n_flag),
        precision_tol=float((flags & near).sum() / n_flag),
        fp_far=float((flags & ~near).sum() / max(int((~near).sum()), 1)),
        flagged=float(flags.mean()),
    )
