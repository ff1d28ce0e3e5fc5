"""The calibration pipeline's batch logic, free of I/O: batch cutting, scans, flag, solve, apply.

The cal daemon (:mod:`karoo.cal.service`) buffers L0 dumps, cuts them into batches with
:class:`BatchCutter` (katsdpcal's rule, from ``obs_activity`` and the target's tags), and hands each
batch to :meth:`CalPipeline.process_batch`, which

1. finds the ``track`` scans of the batch (:func:`find_scans`) and processes them **newest first**,
   so a gain calibrator observed after a target is solved before the target is calibrated;
2. flags RFI on calibrator scans with the SumThreshold flagger on the cross hands, ORed into all
   polarisations as ``cal_rfi``;
3. solves per the target's tags: ``delaycal`` → K, ``polcal`` → KCROSS, ``bpcal`` → B (with K
   applied, normalised in the G window) and then one G over the scan (K and B applied), kept in
   memory as G_FLUX when the calibrator has a flux model (never written, as katsdpcal) and
   written as G otherwise, ``gaincal`` → G (K and B applied, two intervals per scan, the source
   taken as 1 Jy);
4. returns the products to write (key suffix, value, timestamp), with the SNR of K, B and G
   (:func:`karoo.cal.solvers.snr_antenna`), and the per-scan summaries of the report.

At the end of the capture block :meth:`CalPipeline.measure_flux` compares each gain
calibrator's G with G_FLUX (katsdpcal's ``measure_flux``, after CASA ``fluxscale``): the daemon
writes the result as ``measured_flux`` / ``measured_flux_std``, which katdal uses to scale G.

Layout inside cal (as katsdpcal): polarisations ``cal_pol_ordering = ['v', 'h']`` and the
pol-product axis ``[vv, hh, vh, hv]``; baselines are the cross-correlations only, as
antenna-index pairs
(:class:`CorrLayout`). Gains follow ``V_ab = g_a·conj(g_b)`` with
``g_a(t, f) = G_a(t)·B_a(f)·exp(+2πi·K_a·f)``.

Band split: with several servers, the K and G windows lie inside one server's channels (the
*owner*). Whatever needs the window (refant, K, KCROSS, the bandpass normalisation, G) is computed
by the owner and handed to the others through a :class:`Shared` object: :class:`LocalShared` for one
server, or the daemon's telstate-backed one (immutable ``shared_solve_<seq>`` keys), so every
server applies identical solutions. Every server calls the shared steps in the same order because
they see the same batches and tags.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .. import flags as flagbits
from .flagger import SumThresholdFlagger, flag_cross_hands
from .solvers import (
    b_solve,
    best_refant,
    g_solve,
    k_solve,
    kcross_solve,
    keep_or_choose_refant,
    measure_flux,
    residuals,
    snr_antenna,
    weighted_average,
)

#: Pol products on the cal pol axis, as (pol index of antenna 1, pol index of antenna 2).
POL_PAIRS = ((0, 0), (1, 1), (0, 1), (1, 0))
#: Activities after which a batch is never cut (katsdpcal's ignore list).
_NO_CUT_ACTIVITIES = frozenset({"slew", "stop", "unknown", "await_pipeline"})
#: Tags that make a scan a calibrator scan (RFI-flagged before solving).
CAL_TAGS = ("bpcal", "delaycal", "gaincal", "polcal")


# --------------------------------------------------------------------------------------------
# Targets


@dataclass(frozen=True)
class CalTarget:
    """A katpoint-style target description: ``'name, body tags..., ra, dec[, (flux model)]'``.

    Attributes
    ----------
    name : str
    tags : tuple of str
        The tags after the body type (``radec``, ``azel``, ...), e.g. ``('bpcal', 'delaycal')``.
    flux_coefs : tuple of float, or None
        katpoint flux density model ``(min_MHz, max_MHz, a, b, c, d, e, f)``:
        ``log10 S[Jy] = a + b·x + c·x² + d·x³ + e·exp(f·x)`` with ``x = log10(f / MHz)``.
    """

    name: str
    tags: tuple[str, ...] = ()
    flux_coefs: tuple[float, ...] | None = None
    description: str = ""

    @classmethod
    def parse(cls, description: str) -> CalTarget:
        """Parse a description; an empty or malformed one gives an untagged target."""
        fields = [f.strip() for f in str(description).split(",")]
        name = fields[0] if fields else ""
        words = fields[1].split() if len(fields) > 1 else []
        tags = tuple(words[1:])
        flux = None
        if len(fields) > 4 and fields[-1].startswith("("):
            try:
                values = tuple(float(v) for v in fields[-1].strip("()").split())
            except ValueError:
                values = ()
            if len(values) >= 3:
                flux = values
        return cls(name, tags, flux, str(description))

    def flux(self, freqs: np.ndarray) -> np.ndarray | None:
        """Flux density (Jy) at `freqs` (Hz), or None without a model (the source counts as 1 Jy).

        Outside the model's frequency range the value is NaN, as katpoint gives.
        """
        if self.flux_coefs is None:
            return None
        lo, hi, *c = self.flux_coefs
        c = list(c) + [0.0] * (6 - len(c))
        mhz = np.asarray(freqs, np.float64) / 1e6
        x = np.log10(mhz)
        log_s = c[0] + c[1] * x + c[2] * x**2 + c[3] * x**3 + c[4] * np.exp(c[5] * x)
        return np.where((mhz >= lo) & (mhz <= hi), 10.0**log_s, np.nan)


# --------------------------------------------------------------------------------------------
# Batches and scans


@dataclass(frozen=True)
class DumpInfo:
    """What the batch cutter knows of one dump.

    Attributes
    ----------
    index : int
        L0 dump index.
    time : float
        UNIX time of the dump centre.
    activity : str
        ``obs_activity`` at or before the dump.
    activity_time : float
        Timestamp of that ``obs_activity`` sample (a new sample means a new scan).
    target : str
        ``cbf_target`` description at or before the dump.
    """

    index: int
    time: float
    activity: str
    activity_time: float
    target: str

    @property
    def tags(self) -> tuple[str, ...]:
        return CalTarget.parse(self.target).tags


def should_cut(old: DumpInfo, new: DumpInfo) -> bool:
    """Whether a batch ends between dump `old` and dump `new` (katsdpcal's rule, without the
    length limit).

    A batch ends when a new ``obs_activity`` sample starts after an activity other than slew,
    stop, unknown or await_pipeline, unless the new target is tagged ``unknown`` or the old one
    ``target`` (a target stays in the batch of the gain calibrator that follows it). A target
    tagged ``single_accumulation`` ends the batch at any activity change.
    """
    changed = new.activity_time != old.activity_time
    if not changed:
        return False
    old_tags = old.tags
    if "single_accumulation" in old_tags and new.activity != old.activity:
        return True
    return (
        old.activity not in _NO_CUT_ACTIVITIES
        and "unknown" not in new.tags
        and "target" not in old_tags
    )


class BatchCutter:
    """Decides, dump by dump, where batches end.

    Parameters
    ----------
    max_dumps : int
        The longest batch (katsdpcal: half the buffer, so one batch can fill while the previous
        one is processed).
    """

    def __init__(self, max_dumps: int) -> None:
        if max_dumps < 1:
            raise ValueError("max_dumps must be at least 1")
        self.max_dumps = max_dumps
        self.current: list[DumpInfo] = []

    def add(self, info: DumpInfo) -> list[DumpInfo] | None:
        """Add the next dump; returns the finished batch (not including `info`) if one ended."""
        done = None
        if self.current and (
            should_cut(self.current[-1], info) or len(self.current) >= self.max_dumps
        ):
            done, self.current = self.current, []
        self.current.append(info)
        return done

    def flush(self) -> list[DumpInfo] | None:
        """The last, unfinished batch (at the end of the capture block), if any."""
        done, self.current = self.current, []
        return done or None


@dataclass(frozen=True)
class ScanSlice:
    """A ``track`` scan inside a batch: dumps ``[start, stop)`` on `target`."""

    start: int
    stop: int
    target: CalTarget

    @property
    def n_dumps(self) -> int:
        return self.stop - self.start


def find_scans(infos: Sequence[DumpInfo]) -> list[ScanSlice]:
    """The ``track`` scans of a batch in time order: runs of dumps with activity ``track``, the
    same activity sample and the same target."""
    scans: list[ScanSlice] = []
    start = None
    for i, info in enumerate(infos):
        same = (
            start is not None
            and info.activity_time == infos[start].activity_time
            and info.target == infos[start].target
        )
        if start is not None and not same:
            scans.append(ScanSlice(start, i, CalTarget.parse(infos[start].target)))
            start = None
        if start is None and info.activity == "track":
            start = i
    if start is not None:
        scans.append(ScanSlice(start, len(infos), CalTarget.parse(infos[start].target)))
    return scans


# --------------------------------------------------------------------------------------------
# Correlation product layout


@dataclass
class CorrLayout:
    """How L0 correlation products map onto cal's (pol product, baseline) axes.

    Attributes
    ----------
    antlist : list of str
        Sorted antenna names (the antenna axis of every product, ``cal_antlist``).
    pols : list of str
        ``cal_pol_ordering`` (``['v', 'h']`` for MeerKAT).
    bls : ndarray, int, shape (n_bl, 2)
        Antenna indices of the cross-correlation baselines.
    index : ndarray, int, shape (4, n_bl)
        L0 product index of each (pol product, baseline); -1 if the L0 stream lacks it.
    conj : ndarray, bool, shape (4, n_bl)
        Whether the L0 product is stored the other way round (conjugate it).
    """

    antlist: list[str]
    pols: list[str]
    bls: np.ndarray
    index: np.ndarray
    conj: np.ndarray
    n_l0_bls: int

    @classmethod
    def from_bls_ordering(cls, bls_ordering: Sequence[Sequence[str]]) -> CorrLayout:
        """Build the layout from an L0 ``bls_ordering`` (pairs of input labels like ``m000h``)."""
        pairs = [(str(a), str(b)) for a, b in bls_ordering]
        if not pairs:
            raise ValueError("bls_ordering is empty")
        ants = sorted({lab[:-1] for pair in pairs for lab in pair})
        pols = sorted({lab[-1] for pair in pairs for lab in pair}, reverse=True)
        if len(pols) != 2:
            raise ValueError(f"cal needs two polarisations per antenna, found {pols}")
        lookup = {pair: i for i, pair in enumerate(pairs)}
        bls = np.array([(a, b) for a in range(len(ants)) for b in range(a + 1, len(ants))],
                       np.int64).reshape(-1, 2)
        index = np.full((4, len(bls)), -1, np.int64)
        conj = np.zeros((4, len(bls)), bool)
        for k, (a, b) in enumerate(bls):
            for p, (pa, pb) in enumerate(POL_PAIRS):
                la, lb = ants[a] + pols[pa], ants[b] + pols[pb]
                if (la, lb) in lookup:
                    index[p, k] = lookup[(la, lb)]
                elif (lb, la) in lookup:
                    index[p, k] = lookup[(lb, la)]
                    conj[p, k] = True
        if (index[:2] < 0).all():
            raise ValueError("bls_ordering has no parallel-hand cross-correlations")
        return cls(ants, pols, bls, index, conj, len(pairs))

    @property
    def n_ants(self) -> int:
        return len(self.antlist)

    @property
    def pol_products(self) -> list[str]:
        """Names of the pol-product axis, e.g. ``['vv', 'hh', 'vh', 'hv']``."""
        return [self.pols[a] + self.pols[b] for a, b in POL_PAIRS]

    @property
    def bls_ordering(self) -> list[tuple[str, str]]:
        """Antenna pairs of the baseline axis (``cal_bls_ordering``)."""
        return [(self.antlist[a], self.antlist[b]) for a, b in self.bls]

    def gather(self, vis: np.ndarray, flags: np.ndarray, weights: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """L0 ``(..., n_l0_bls)`` arrays to cal's ``(..., 4, n_bl)``; absent products are
        flagged ``data_lost`` with zero weight."""
        idx = np.where(self.index < 0, 0, self.index)
        v = vis[..., idx]
        v = np.where(self.conj, np.conj(v), v).astype(np.complex64)
        f = flags[..., idx]
        w = weights[..., idx].astype(np.float32)
        missing = self.index < 0
        if missing.any():
            f = np.where(missing, f | flagbits.DATA_LOST, f)
            w = np.where(missing, 0.0, w).astype(np.float32)
        return v, f.astype(np.uint8), w

    def scatter_flags(self, cal_flags: np.ndarray, l0_flags: np.ndarray) -> np.ndarray:
        """OR cal's flag bits ``(..., 4, n_bl)`` back into L0-ordered flags ``(..., n_l0_bls)``."""
        out = l0_flags.copy()
        ok = self.index >= 0
        out[..., self.index[ok]] |= cal_flags[..., ok]
        return out


# --------------------------------------------------------------------------------------------
# Gains: build and apply


def delay_phasor(delays: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """``exp(+2πi·K·f)``: (n_pols, n_ants) delays in s and (n_chans,) Hz → (n_chans, n_pols,
    n_ants). NaN delays count as 0 (as katdal)."""
    k = np.nan_to_num(np.asarray(delays, np.float64))
    return np.exp(2j * np.pi * np.asarray(freqs, np.float64)[:, None, None] * k[None])


def interpolate_bandpass(bandpass: np.ndarray) -> np.ndarray:
    """Fill NaN channels of B (n_chans, n_pols, n_ants) by linear interpolation of amplitude and
    unwrapped phase, constant beyond the ends (for internal use; telstate keeps the NaNs)."""
    b = np.array(bandpass, np.complex128)
    x = np.arange(b.shape[0])
    flat = b.reshape(b.shape[0], -1)
    for j in range(flat.shape[1]):
        ok = np.isfinite(flat[:, j])
        if ok.all() or not ok.any():
            continue
        amp = np.interp(x, x[ok], np.abs(flat[ok, j]))
        phase = np.interp(x, x[ok], np.unwrap(np.angle(flat[ok, j])))
        flat[:, j] = amp * np.exp(1j * phase)
    return flat.reshape(b.shape)


def interpolate_gains(times: np.ndarray, g_times: np.ndarray, g_values: np.ndarray) -> np.ndarray:
    """G at `times`: linear in amplitude and unwrapped phase between solutions, constant beyond
    (katdal's rule). g_values (n_sol, n_pols, n_ants) → (n_times, n_pols, n_ants); NaN solutions
    are skipped; an antenna with none stays NaN."""
    times = np.asarray(times, np.float64)
    g_times = np.asarray(g_times, np.float64)
    order = np.argsort(g_times)
    g_times, vals = g_times[order], np.asarray(g_values)[order]
    out = np.full((len(times), *vals.shape[1:]), np.nan + 0j)
    flat_in = vals.reshape(len(vals), -1)
    flat_out = out.reshape(len(times), -1)
    for j in range(flat_in.shape[1]):
        ok = np.isfinite(flat_in[:, j])
        if not ok.any():
            continue
        amp = np.interp(times, g_times[ok], np.abs(flat_in[ok, j]))
        phase = np.interp(times, g_times[ok], np.unwrap(np.angle(flat_in[ok, j])))
        flat_out[:, j] = amp * np.exp(1j * phase)
    return out


def apply_gains(vis: np.ndarray, gains: np.ndarray, bls: np.ndarray,
                flags: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Divide per-antenna gains out of visibilities: ``V_ab / (g_a·conj(g_b))`` per pol product.

    Parameters
    ----------
    vis : ndarray, complex, shape (n_dumps, n_chans, n_pp, n_bl)
        Cal-ordered visibilities (n_pp pol products of :data:`POL_PAIRS`, 2 or 4).
    gains : ndarray, complex, broadcastable to (n_dumps, n_chans, 2, n_ants)
        Total gain per antenna and pol; NaN means unknown.
    bls : ndarray, int, shape (n_bl, 2)
    flags : ndarray, uint8, optional
        Same shape as `vis`; where the correction is not finite ``postproc`` is set (as katdal).

    Returns
    -------
    corrected : ndarray, complex64
    flags : ndarray or None
    """
    n_pp = vis.shape[-2]
    pa = np.array([p[0] for p in POL_PAIRS[:n_pp]])
    pb = np.array([p[1] for p in POL_PAIRS[:n_pp]])
    ga = gains[..., pa[:, None], bls[None, :, 0]]
    gb = gains[..., pb[:, None], bls[None, :, 1]]
    denom = ga * np.conj(gb)
    bad = ~np.isfinite(denom) | (denom == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(bad, 0, vis / np.where(bad, 1, denom)).astype(np.complex64)
    if flags is not None:
        flags = flags | np.where(np.broadcast_to(bad, flags.shape), flagbits.POSTPROC,
                                 np.uint8(0)).astype(np.uint8)
    return out, flags


# --------------------------------------------------------------------------------------------
# Cross-server agreement


class Shared(Protocol):
    """How band-split servers agree on a result that only one of them can compute."""

    def solve(self, owner: bool, compute: Callable[[], Any]) -> Any:
        """Run `compute` if `owner`, publish and return its result; otherwise wait for the
        owner's result. The n-th call of every server refers to the same result."""


class LocalShared:
    """A single server: computes everything itself."""

    def solve(self, owner: bool, compute: Callable[[], Any]) -> Any:
        return compute()


# --------------------------------------------------------------------------------------------
# Parameters and results


@dataclass
class CalParams:
    """Everything the pipeline needs to know about the stream and its own share of it.

    Attributes
    ----------
    freqs : ndarray, float64, shape (n_chans,)
        Frequencies (Hz) of the **whole** L0 band.
    channel_range : (int, int)
        This server's channels ``[first, stop)``.
    k_window, g_window : (int, int)
        Global channel ranges of the K and G windows; each must lie inside one server.
    dump_period : float
        Seconds per dump.
    server_index : int
        0-based server index (the ``B<i>`` part number).
    flagger : SumThresholdFlagger
        Calibrator RFI flagger.
    """

    freqs: np.ndarray
    channel_range: tuple[int, int]
    k_window: tuple[int, int]
    g_window: tuple[int, int]
    dump_period: float
    server_index: int = 0
    flagger: SumThresholdFlagger = field(default_factory=SumThresholdFlagger)
    k_max_iters: int = 100
    b_max_iters: int = 100
    g_max_iters: int = 30

    def owns(self, window: tuple[int, int]) -> bool:
        return self.channel_range[0] <= window[0] and window[1] <= self.channel_range[1]

    def local(self, window: tuple[int, int]) -> slice:
        return slice(window[0] - self.channel_range[0], window[1] - self.channel_range[0])

    @property
    def local_freqs(self) -> np.ndarray:
        return self.freqs[self.channel_range[0] : self.channel_range[1]]


def default_window(n_chans: int, servers: int, edge_fraction: float = 0.05) -> tuple[int, int]:
    """The solution window when none is configured: the channels of server ``servers // 2`` (the
    one at or just above the band centre) without the outer `edge_fraction` of the band."""
    per = n_chans // servers
    s = servers // 2
    edge = math.ceil(edge_fraction * n_chans)
    lo, hi = max(s * per, edge), min((s + 1) * per, n_chans - edge)
    if hi - lo < 2:
        lo, hi = s * per, (s + 1) * per
    return lo, hi


@dataclass
class Batch:
    """A batch of buffered dumps in cal's layout (this server's channels only).

    vis (n_dumps, n_chans, 4, n_bl) complex64, flags uint8, weights float32 (0 = unusable), plus
    the per-dump :class:`DumpInfo`.
    """

    infos: list[DumpInfo]
    vis: np.ndarray
    flags: np.ndarray
    weights: np.ndarray

    @property
    def times(self) -> np.ndarray:
        return np.array([i.time for i in self.infos])


@dataclass
class ScanSummary:
    """What the report needs of one processed scan."""

    target: str
    tags: tuple[str, ...]
    start_time: float
    end_time: float
    n_dumps: int
    flag_fraction_before: dict[str, float]
    flag_fraction_after: dict[str, float]
    channel_flag_fraction: np.ndarray  # (n_chans,) after cal flagging
    solved: list[str]
    notes: list[str]


@dataclass
class BatchResult:
    """Products to write (key suffix, value, timestamp) and per-scan summaries."""

    products: list[tuple[str, Any, float]]
    scans: list[ScanSummary]


def _flag_fractions(flags: np.ndarray) -> dict[str, float]:
    """Fraction of flagged samples in the parallel ("auto-pol") and cross hands ("cross-pol")."""
    if flags.size == 0:
        return {"auto-pol": 0.0, "cross-pol": 0.0}
    return {"auto-pol": float(np.mean(flags[:, :, :2] != 0)),
            "cross-pol": float(np.mean(flags[:, :, 2:] != 0))}


# --------------------------------------------------------------------------------------------
# The pipeline


class CalPipeline:
    """Flags and solves batches; keeps the latest solutions of the capture block.

    Parameters
    ----------
    params : CalParams
    layout : CorrLayout
    shared : Shared, optional
        Cross-server agreement (default: a single server).
    refant : int, optional
        Reference antenna carried over from a previous capture block; kept while still good.
    """

    def __init__(self, params: CalParams, layout: CorrLayout, shared: Shared | None = None,
                 refant: int | None = None) -> None:
        self.params = params
        self.layout = layout
        self.shared = shared or LocalShared()
        self.previous_refant = refant
        self.refant: int | None = None
        self.K: np.ndarray | None = None  # (2, n_ants) float32
        self.B: np.ndarray | None = None  # (n_local_chans, 2, n_ants), NaN-interpolated
        self.G_times: list[float] = []
        self.G_values: list[np.ndarray] = []  # (2, n_ants) each
        self.G_targets: list[str] = []  # the target each G was solved on
        #: bpcal gains solved against the flux model: (time, (2, n_ants), target)
        self.G_FLUX: list[tuple[float, np.ndarray, str]] = []
        self.history: dict[str, list[tuple[float, np.ndarray]]] = {
            "K": [], "B": [], "G": [], "KCROSS": [], "G_FLUX": [],
            "SNR_K": [], "SNR_B": [], "SNR_G": []}
        self.notes: list[str] = []

    # -- helpers

    def _gains(self, times: np.ndarray, *, k: bool = True, b: bool = True, g: bool = False
               ) -> np.ndarray:
        """Total gain (n_times, n_local_chans, 2, n_ants) from the latest K, B and G (all ones
        where a term is not known yet)."""
        freqs = self.params.local_freqs
        n_ants = self.layout.n_ants
        out = np.ones((1, len(freqs), 2, n_ants), np.complex128)
        if k and self.K is not None:
            out = out * delay_phasor(self.K, freqs)[None]
        if b and self.B is not None:
            out = out * self.B[None]
        if g and self.G_values:
            out = out * interpolate_gains(times, np.array(self.G_times),
                                          np.array(self.G_values))[:, None]
        return out

    def _time_average(self, vis, weights, flags, model):
        """Weighted time average of parallel hands, divided by the model spectrum."""
        avg, wsum = weighted_average(vis[:, :, :2], weights[:, :, :2], axis=0,
                                     flags=flags[:, :, :2])
        if model is not None:
            m = model[:, None, None]
            with np.errstate(invalid="ignore", divide="ignore"):
                avg = avg / m
                wsum = np.where(np.isfinite(m) & (m > 0), wsum * np.abs(m) ** 2, 0.0)
        return avg, wsum

    def _choose_refant(self, avg_k: np.ndarray, w_k: np.ndarray) -> int:
        bls, n_ants = self.layout.bls, self.layout.n_ants
        if self.previous_refant is not None:
            return keep_or_choose_refant(self.previous_refant, avg_k, bls, n_ants, w_k)
        return best_refant(avg_k, bls, n_ants, w_k)

    # -- the batch

    def process_batch(self, batch: Batch) -> BatchResult:
        """Flag and solve one batch in place (``batch.flags`` gains ``cal_rfi``).

        Returns the products to write and a summary per scan, newest scan first.
        """
        products: list[tuple[str, Any, float]] = []
        summaries: list[ScanSummary] = []
        scans = find_scans(batch.infos)
        times = batch.times
        for scan in reversed(scans):
            summaries.append(self._process_scan(batch, scan, times, products))
        return BatchResult(products, summaries)

    def _process_scan(self, batch: Batch, scan: ScanSlice, times: np.ndarray,
                      products: list) -> ScanSummary:
        p = self.params
        layout = self.layout
        sl = slice(scan.start, scan.stop)
        tags = scan.target.tags
        t_scan = times[sl]
        ts = float(t_scan.mean())
        before = _flag_fractions(batch.flags[sl])
        solved: list[str] = []
        notes: list[str] = []
        is_cal = any(t in CAL_TAGS or t.endswith("cal") for t in tags)
        if is_cal:
            batch.flags[sl] = flag_cross_hands(batch.vis[sl], batch.flags[sl],
                                               layout.pol_products, p.flagger)
        flags = batch.flags[sl]
        vis = batch.vis[sl]
        weights = np.where(flags == 0, batch.weights[sl], 0.0)
        model = scan.target.flux(p.local_freqs)
        kwin, gwin = p.local(p.k_window), p.local(p.g_window)
        owner_k, owner_g = p.owns(p.k_window), p.owns(p.g_window)
        bls, n_ants = layout.bls, layout.n_ants

        if is_cal and (self.refant is None or self.refant < 0):
            def choose():
                avg, w = self._time_average(vis[:, kwin], weights[:, kwin], flags[:, kwin],
                                            None if model is None else model[kwin])
                return int(self._choose_refant(avg, w))
            self.refant = int(self.shared.solve(owner_k, choose))
            if self.refant >= 0:
                products.append(("refant", layout.antlist[self.refant], ts))
            else:
                notes.append("no usable reference antenna")
        refant = self.refant if self.refant is not None and self.refant >= 0 else None

        if "delaycal" in tags and refant is not None:
            def solve_k():
                avg, w = self._time_average(vis[:, kwin], weights[:, kwin], flags[:, kwin],
                                            None if model is None else model[kwin])
                sol = k_solve(avg, bls, n_ants, p.local_freqs[kwin], w, ref_ant=refant,
                              max_iters=p.k_max_iters)
                return sol.delay, sol.snr
            delay, snr = self.shared.solve(owner_k, solve_k)
            self.K = np.asarray(delay, np.float32)
            snr = np.asarray(snr, np.float32)
            self.history["K"].append((ts, self.K))
            self.history["SNR_K"].append((ts, snr))
            solved.append("K")
            if owner_k:
                products.append(("product_K", self.K, ts))
                products.append(("product_SNR_K", snr, ts))

        if "polcal" in tags:
            def solve_kcross():
                gains = self._gains(t_scan, g=True)[:, kwin]
                corr, _ = apply_gains(vis[:, kwin], gains, bls)
                avg, wsum = weighted_average(corr[:, :, 2:], weights[:, kwin, 2:], axis=0)
                return kcross_solve(avg[:, 0], avg[:, 1], p.local_freqs[kwin], wsum[:, 0],
                                    wsum[:, 1])
            kcross = np.asarray(self.shared.solve(owner_k, solve_kcross), np.float32)
            self.history["KCROSS"].append((ts, kcross))
            solved.append("KCROSS")
            if owner_k:
                products.append(("product_KCROSS", kcross, ts))

        if "bpcal" in tags and refant is not None:
            gains = self._gains(t_scan, b=False)
            corr, _ = apply_gains(vis[:, :, :2], gains, bls)
            avg, w = self._time_average(corr, weights, flags, model)
            raw_b = b_solve(avg, bls, n_ants, w, ref_ant=refant, max_iters=p.b_max_iters)
            # SNR of this server's part, from the residuals of the raw (referenced) solution
            snr_b = snr_antenna(residuals(avg, raw_b, bls)[None], w[None], bls, n_ants)[0]

            def norm():
                win = raw_b[gwin]
                with np.errstate(invalid="ignore", divide="ignore"):
                    amp = np.nanmean(np.abs(win), axis=0)
                    phasor = np.nansum(np.where(np.isfinite(win), win / np.abs(win), 0), axis=0)
                    return (np.exp(-1j * np.angle(phasor)) / amp).astype(np.complex64)
            factor = np.asarray(self.shared.solve(owner_g, norm))
            bandpass = (raw_b * factor[None]).astype(np.complex64)
            self.B = interpolate_bandpass(bandpass)
            self.history["B"].append((ts, bandpass))
            self.history["SNR_B"].append((ts, snr_b))
            solved.append("B")
            products.append((f"product_B{p.server_index}", bandpass, ts))
            products.append((f"product_SNR_B{p.server_index}", snr_b, ts))
            self._bpcal_gain(vis, weights, t_scan, scan.target, model, refant, owner_g,
                             products, solved)

        if "gaincal" in tags and refant is not None:
            n = scan.n_dumps
            per = max(1, math.ceil((n - 1) / 2))

            g, g_times, snr = self.shared.solve(
                owner_g, lambda: self._solve_g(vis, weights, t_scan, per, refant))
            self._add_g(g, g_times, snr, scan.target.name, owner_g, products)
            solved.append("G")

        if is_cal and refant is None:
            notes.append("not solved: no reference antenna")
        if "B" in solved and "G_FLUX" not in solved:
            notes.append("no flux model for the bandpass calibrator: no flux scale")
        after = _flag_fractions(batch.flags[sl])
        chan_frac = np.mean(batch.flags[sl] != 0, axis=(0, 2, 3)) if scan.n_dumps else np.zeros(0)
        return ScanSummary(scan.target.name, tags, float(t_scan[0]), float(t_scan[-1]),
                           scan.n_dumps, before, after, chan_frac, solved, notes)

    # -- gains

    def _solve_g(self, vis, weights, t_scan, per: int, refant: int,
                 model: np.ndarray | None = None):
        """G per interval of `per` dumps in the G window with K and B applied, optionally
        against a flux model (per local channel): (gains, times, snr)."""
        p = self.params
        gwin = p.local(p.g_window)
        gains = self._gains(t_scan)[:, gwin]
        corr, _ = apply_gains(vis[:, gwin, :2], gains, self.layout.bls)
        w = weights[:, gwin, :2]
        if model is not None:
            m = model[gwin][None, :, None, None]
            with np.errstate(invalid="ignore", divide="ignore"):
                corr = (corr / m).astype(np.complex64)
            w = np.where(np.isfinite(m) & (m > 0), w * np.abs(m) ** 2, 0.0)
        sol = g_solve(corr, self.layout.bls, self.layout.n_ants, per, w, t_scan,
                      ref_ant=refant, max_iters=p.g_max_iters)
        return sol.gains, sol.times, sol.snr

    def _add_g(self, g, g_times, snr, target: str, owner: bool, products: list) -> None:
        g = np.asarray(g, np.complex64)
        snr = np.asarray(snr, np.float32)
        for gi, ti, si in zip(g, np.asarray(g_times, np.float64), snr, strict=True):
            self.G_times.append(float(ti))
            self.G_values.append(gi)
            self.G_targets.append(target)
            self.history["G"].append((float(ti), gi))
            self.history["SNR_G"].append((float(ti), si))
            if owner:
                products.append(("product_G", gi, float(ti)))
                products.append(("product_SNR_G", si, float(ti)))

    def _bpcal_gain(self, vis, weights, t_scan, target: CalTarget, model, refant: int,
                    owner: bool, products: list, solved: list[str]) -> None:
        """katsdpcal's G after B on a bandpass calibrator: one interval over the scan with K and
        B applied. Against a flux model it is G_FLUX (kept for :meth:`measure_flux`, not
        written); without one it is an ordinary G, unless the scan is also a gain calibrator
        (which solves its own G)."""
        p = self.params

        def solve():
            # Only the owner sees the model in the G window: it decides for all servers.
            usable = model is not None and bool(np.isfinite(model[p.local(p.g_window)]).any())
            if not usable and "gaincal" in target.tags:
                return None
            return (*self._solve_g(vis, weights, t_scan, len(t_scan), refant,
                                   model if usable else None), usable)
        result = self.shared.solve(owner, solve)
        if result is None:
            return
        g, g_times, snr, usable = result
        if usable:
            g = np.asarray(g, np.complex64)
            for gi, ti in zip(g, np.asarray(g_times, np.float64), strict=True):
                self.G_FLUX.append((float(ti), gi, target.name))
                self.history["G_FLUX"].append((float(ti), gi))
            solved.append("G_FLUX")
        else:
            self._add_g(g, g_times, snr, target.name, owner, products)
            solved.append("G")

    def measure_flux(self) -> tuple[dict[str, float], dict[str, float]]:
        """Flux density (Jy) and its standard error of every target with G solutions, from the
        ratio of its gains to G_FLUX (:func:`karoo.cal.solvers.measure_flux`).

        Returns empty dicts without G_FLUX. Targets whose gains are all NaN are left out.
        """
        if not self.G_FLUX or not self.G_values:
            return {}, {}
        g_flux = np.array([g for _, g, _ in self.G_FLUX])
        flux: dict[str, float] = {}
        std: dict[str, float] = {}
        values = np.array(self.G_values)
        targets = np.array(self.G_targets)
        for name in dict.fromkeys(self.G_targets):
            f, e = measure_flux(g_flux, values[targets == name])
            if np.isfinite(f):
                flux[name], std[name] = float(f), float(e)
        return flux, std
