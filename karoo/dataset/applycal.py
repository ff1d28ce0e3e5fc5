"""Calibration on the fly: corrections from the cal products in telstate, applied in the Dask graph.

The cal daemon writes, under ``<cbid>_<cal>_`` (default stream ``cal``), the sensors
``product_K`` (n_pol, n_ant) delays in s, ``product_B<i>`` (n_chan/n_parts, n_pol, n_ant) with
``product_B_parts`` parts, ``product_G`` (n_pol, n_ant) complex gains and ``product_KCROSS``
((n_pol, 1) or (n_pol, n_ant) cross-hand delays in s), with the attributes ``antlist``,
``pol_ordering``, ``center_freq``, ``bandwidth`` and ``n_chans``. Each data input ``<ant><pol>``
maps to ``(pol_ordering.index(pol), antlist.index(ant))``.

Corrections per input (katdal's rules, plus KCROSS, which katdal ignores):

* K and KCROSS: ``exp(-2 pi i K nu)`` at each data channel frequency (the gain convention is
  ``exp(+2 pi i K nu)``); piecewise constant in time, each solution applying from the dump during
  which it was made, the first one back to dump 0; NaN delays count as 0.
* B: the parts of one solution time are stitched along frequency (a missing part is NaN); NaN
  channels are interpolated linearly in magnitude and unwrapped phase, not extrapolated past the
  last valid channel (those stay invalid); data channels take the cal band's interpolation at
  their frequency; correction ``1/B``; piecewise constant in time like K.
* G: first flux-scaled as katdal does: each solution made on a target with a known flux density
  S (``measured_flux`` from cal, updated with the user's ``gaincal_flux``; the target's name or
  one of its aliases at the dump of the solution) is divided by ``√S`` (cal solved the gain
  calibrator as a 1 Jy source); ``gaincal_flux=None`` turns this off. Then interpolated linearly
  over dumps in magnitude and unwrapped phase between valid solutions, held flat beyond the
  ends; correction ``1/G``.

A visibility of inputs (a, b) is multiplied by ``c_a conj(c_b)``; where that is not finite the
visibility is left as it is and flagged ``postproc``. Weights are divided by ``|c_a c_b|^2``
(the noise of the corrected visibility scales with the correction: a weight is multiplied by the
gains' ``|g_a g_b|^2``), and set to 0 where the correction is invalid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .. import flags as flag_bits
from .sensors import event_dumps, hold_index

logger = logging.getLogger(__name__)

PRODUCT_TYPES = ("K", "B", "G", "KCROSS")
DEFAULT_PRODUCTS = ("K", "B", "G")


class CalibrationError(ValueError):
    """The requested calibration products are missing or inconsistent."""


def parse_applycal(spec: str | list | tuple | None) -> tuple[tuple[str, ...], bool]:
    """Product types to apply and whether all were asked for explicitly.

    ``''``/None: none; ``'default'``: K, B, G; ``'all'``: K, B, G, KCROSS (both skip missing
    products); otherwise a comma list of types, optionally as ``<stream>.<type>`` (``l1.G``).
    """
    if not spec:
        return (), False
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [i.strip() for i in items if i.strip()]
    if items in (["default"], ["l1"]):
        return DEFAULT_PRODUCTS, False
    if items == ["all"]:
        return PRODUCT_TYPES, False
    products = []
    for item in items:
        product = item.split(".")[-1].upper()
        if product not in PRODUCT_TYPES:
            raise CalibrationError(f"unknown cal product {item!r}: use {', '.join(PRODUCT_TYPES)}"
                                   ", 'default' or 'all'")
        if product not in products:
            products.append(product)
    return tuple(products), True


def complex_interp(x: np.ndarray, xi: np.ndarray, yi: np.ndarray, left=None,
                   right=None) -> np.ndarray:
    """Linear interpolation of magnitude and unwrapped phase (``np.interp`` for gains)."""
    mag = np.interp(x, xi, np.abs(yi), left=None if left is None else np.abs(left),
                    right=None if right is None else np.abs(right))
    phase = np.interp(x, xi, np.unwrap(np.angle(yi)))
    out = (mag * np.exp(1j * phase)).astype(np.complex64)
    if left is not None:
        out[x < xi[0]] = left
    if right is not None:
        out[x > xi[-1]] = right
    return out


@dataclass
class CalTables:
    """Per-input corrections over the whole dataset, compact enough to ship in a Dask graph.

    Attributes
    ----------
    freqs
        ``(F,)`` data channel frequencies, Hz.
    delay
        ``(T, n_in)`` total delay (K + KCROSS) to undo per dump and input, s, or None.
    bandpass
        ``(n_sol, F, n_in)`` bandpass corrections, with ``bandpass_index`` ``(T,)`` choosing the
        solution of each dump; or None.
    gain
        ``(T, n_in)`` gain corrections, or None.
    products
        The product types in use.
    """

    freqs: np.ndarray
    delay: np.ndarray | None
    bandpass: np.ndarray | None
    bandpass_index: np.ndarray | None
    gain: np.ndarray | None
    products: tuple[str, ...]

    def correction(self, t0: int, t1: int, f0: int, f1: int) -> np.ndarray:
        """``(t1 - t0, f1 - f0, n_in)`` complex64 corrections of a block of dumps x channels."""
        n_in = next(x.shape[-1] for x in (self.delay, self.bandpass, self.gain) if x is not None)
        out = np.ones((t1 - t0, f1 - f0, n_in), np.complex64)
        if self.delay is not None:
            phase = -2 * np.pi * self.delay[t0:t1, None, :] * self.freqs[None, f0:f1, None]
            out *= np.exp(1j * phase).astype(np.complex64)
        if self.bandpass is not None:
            out *= self.bandpass[self.bandpass_index[t0:t1]][:, f0:f1]
        if self.gain is not None:
            out *= self.gain[t0:t1, None, :]
        return out


def cal_channel_freqs(center_freq: float, bandwidth: float, n_chans: int) -> np.ndarray:
    """Channel centres: channel ``n_chans // 2`` is at `center_freq` (katdal's convention)."""
    return center_freq + (np.arange(n_chans) - n_chans // 2) * (bandwidth / n_chans)


def _hold_by_dump(values: np.ndarray, times: np.ndarray, timestamps: np.ndarray,
                  dump_period: float) -> np.ndarray:
    """Piecewise-constant solutions: index of the solution in force at each dump."""
    return hold_index(times, timestamps, dump_period)


def flux_scale(view, gaincal_flux: dict[str, float] | None = None) -> dict[str, float]:
    """Flux densities (Jy) to scale G with: cal's ``measured_flux`` updated with `gaincal_flux`
    (katdal's rule); empty when `gaincal_flux` is None (flux scaling off)."""
    if gaincal_flux is None:
        return {}
    flux = dict(view.get("measured_flux") or {})
    flux.update(gaincal_flux)
    return {str(k): float(v) for k, v in flux.items()}


def build_cal_tables(view, inputs: list[str], freqs: np.ndarray, timestamps: np.ndarray,
                     dump_period: float, products: tuple[str, ...], explicit: bool,
                     dump_targets: list[tuple[str, ...]] | None = None,
                     gaincal_flux: dict[str, float] | None = None) -> CalTables:
    """Read the cal products from a telstate view and tabulate the corrections per input.

    Parameters
    ----------
    view
        Telstate view with the cal stream's prefixes first (``<cbid>_cal_``, ``cal_``, ...).
    inputs
        Data input labels (``'m000h'``), the last axis of the tables.
    freqs, timestamps, dump_period
        The data's channel frequencies (Hz) and dump centres (UNIX s).
    products, explicit
        From :func:`parse_applycal`; with `explicit` a missing product is an error.
    dump_targets
        Per dump, the target's name and aliases (for the flux scale of G); None: no scaling.
    gaincal_flux
        Flux densities (Jy) overriding cal's ``measured_flux``; None turns flux scaling off.
    """
    antlist = [str(a) for a in (view.get("antlist") or [])]
    pols = [str(p) for p in (view.get("pol_ordering") or [])]
    if not antlist or not pols:
        raise CalibrationError("no cal antlist / pol_ordering in telstate: no cal products to "
                               "apply")
    index = []
    for inp in inputs:
        ant, pol = inp[:-1], inp[-1:]
        if ant not in antlist or pol not in pols:
            raise CalibrationError(f"input {inp} is not among the cal antennas/pols")
        index.append((pols.index(pol), antlist.index(ant)))
    pol_idx = np.array([p for p, _ in index])
    ant_idx = np.array([a for _, a in index])
    n_dumps, n_in = len(timestamps), len(inputs)

    def series(name: str) -> list[tuple]:
        try:
            return list(view.get_range(name, st=0))
        except KeyError:
            return []

    def per_input(value) -> np.ndarray:
        value = np.asarray(value)
        if value.ndim != 2:
            raise CalibrationError(f"cal product of shape {value.shape}, expected (pol, ant)")
        value = np.broadcast_to(value, (value.shape[0], max(value.shape[1], len(antlist))))
        return value[pol_idx, ant_idx]

    used = []
    delay = None
    for product in ("K", "KCROSS"):
        if product not in products:
            continue
        samples = series(f"product_{product}")
        if not samples:
            if explicit:
                raise CalibrationError(f"no cal product {product} in telstate")
            continue
        values = np.array([np.nan_to_num(per_input(v).astype(np.float64)) for v, _ in samples])
        times = np.array([t for _, t in samples])
        held = values[_hold_by_dump(values, times, timestamps, dump_period)]
        delay = held if delay is None else delay + held
        used.append(product)

    bandpass = bandpass_index = None
    if "B" in products:
        bandpass, bandpass_index = _bandpass(view, series, per_input, freqs, timestamps,
                                             dump_period, n_in)
        if bandpass is None and explicit:
            raise CalibrationError("no cal product B in telstate")
        if bandpass is not None:
            used.append("B")

    gain = None
    if "G" in products:
        samples = series("product_G")
        if not samples and explicit:
            raise CalibrationError("no cal product G in telstate")
        if samples:
            values = np.array([per_input(v) for v, _ in samples], np.complex128)
            events = event_dumps(np.array([t for _, t in samples]), timestamps, dump_period)
            flux = flux_scale(view, gaincal_flux) if dump_targets else {}
            if flux:
                for k, dump in enumerate(np.clip(events, 0, n_dumps - 1)):
                    for name in dump_targets[dump]:
                        if flux.get(name, 0.0) > 0.0:
                            values[k] /= np.sqrt(flux[name])
                            break
            dumps = np.arange(n_dumps)
            gain = np.full((n_dumps, n_in), np.nan, np.complex64)
            for i in range(n_in):
                valid = np.isfinite(values[:, i])
                if valid.any():
                    gain[:, i] = complex_interp(dumps, events[valid], values[valid, i])
            with np.errstate(divide="ignore", invalid="ignore"):
                gain = np.reciprocal(gain)
            used.append("G")
    if not used:
        raise CalibrationError(f"none of the cal products {', '.join(products)} is in telstate")
    return CalTables(np.asarray(freqs, np.float64), delay, bandpass, bandpass_index, gain,
                     tuple(used))


def _bandpass(view, series, per_input, freqs, timestamps, dump_period, n_in):
    n_parts = int(view.get("product_B_parts") or 0)
    names = [f"product_B{i}" for i in range(n_parts)] if n_parts else ["product_B"]
    if not n_parts and not series("product_B") and series("product_B0"):
        names = ["product_B0"]
    parts = [series(name) for name in names]
    times = sorted({t for part in parts for _, t in part})
    if not times:
        return None, None
    n_cal = int(view["n_chans"])
    cal_freqs = cal_channel_freqs(float(view["center_freq"]), float(view["bandwidth"]), n_cal)
    per_part = n_cal // len(names)
    solutions = []
    for t in times:
        stitched = np.full((n_cal, n_in), np.nan, np.complex128)
        for p, part in enumerate(parts):
            for value, when in part:
                if when == t:
                    value = np.asarray(value)
                    chans = slice(p * per_part, p * per_part + value.shape[0])
                    stitched[chans] = np.array([per_input(v) for v in value])
        corr = np.full((len(freqs), n_in), np.nan, np.complex64)
        for i in range(n_in):
            valid = np.isfinite(stitched[:, i])
            if valid.any():
                bp = complex_interp(freqs, cal_freqs[valid], stitched[valid, i],
                                    left=np.nan, right=np.nan)
                with np.errstate(divide="ignore", invalid="ignore"):
                    corr[:, i] = np.reciprocal(bp)
        solutions.append(corr)
    solutions = np.array(solutions)
    index = _hold_by_dump(solutions, np.array(times), timestamps, dump_period)
    return solutions, index


def apply_vis(vis, corr, in1, in2):
    """Corrected visibilities of one block (uncorrectable ones left as they are)."""
    c = corr[..., in1] * np.conj(corr[..., in2])
    ok = np.isfinite(c)
    return np.where(ok, vis * np.where(ok, c, 1), vis).astype(np.complex64)


def apply_weights(weights, corr, in1, in2):
    """Weights of the corrected visibilities of one block (0 where uncorrectable)."""
    c = corr[..., in1] * np.conj(corr[..., in2])
    power = (c.real**2 + c.imag**2).astype(np.float32)
    ok = np.isfinite(power) & (power > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, weights / np.where(ok, power, 1), 0).astype(np.float32)


def apply_flags(flags, corr, in1, in2):
    """Flags of one block with ``postproc`` where the correction is invalid."""
    c = corr[..., in1] * np.conj(corr[..., in2])
    return np.where(np.isfinite(c), flags, flags | flag_bits.POSTPROC).astype(np.uint8)
