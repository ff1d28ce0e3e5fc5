"""What goes into a MeasurementSet v2: the observation description and its fixed layout.

`MSInput` describes a whole observation (antennas, band, correlation products, targets,
scans, dump times). `MSLayout` derives from it everything that is the same in every slice
of an export: the canonical baseline order, the polarisation products and the mapping
from correlation products to (baseline, polarisation), and the global FIELD, STATE and
SCAN numbering per dump. Every slice written from the same `MSInput` therefore carries
identical subtables and IDs, so slices concatenate in time into the whole export.

Conventions
-----------
* Baselines are ordered by ANTENNA1 then ANTENNA2 with ANTENNA1 <= ANTENNA2 (the upper
  triangle, autocorrelations included unless ``include_autos=False``); MAIN row
  ``t * n_baselines + b`` holds dump ``t`` and baseline ``b``.
* MeerKAT inputs end in ``h`` or ``v``; H is written as the linear feed X and V as Y, so
  the products are ordered XX (hh), XY (hv), YX (vh), YY (vv), keeping those present.
* UVW of a baseline is ``uvw[ANTENNA1] - uvw[ANTENNA2]`` in metres, with per-antenna uvw
  relative to the array reference (katdal/CASA practice).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

#: Seconds from the MJD epoch (1858-11-17 UTC) to the UNIX epoch.
MJD_UNIX_OFFSET = 3506716800.0

#: CASA Stokes codes of the linear products, in MS order, keyed by MeerKAT pol pair.
LINEAR_PRODUCTS = {("h", "h"): 9, ("h", "v"): 10, ("v", "h"): 11, ("v", "v"): 12}
_FEED_INDEX = {"h": 0, "v": 1}

# WGS84 ellipsoid
_WGS84_A = 6378137.0
_WGS84_E2 = 6.69437999014e-3

#: Hook computing per-antenna uvw: ``(timestamps (T,), target index (T,)) -> (T, A, 3)``.
AntennaUVW = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Target:
    """A field: name and J2000 phase centre (radians)."""

    name: str
    ra: float
    dec: float


@dataclass(frozen=True)
class Scan:
    """Dumps ``start <= d < stop`` spent on target `target` with CASA intent `intent`.

    `intent` is written to STATE.OBS_MODE as given, e.g. ``'CALIBRATE_BANDPASS#ON_SOURCE'``
    or katdal's ``'TARGET'``; scans sharing an intent share a STATE row.
    """

    start: int
    stop: int
    target: int
    intent: str = "OBSERVE_TARGET#ON_SOURCE"


def itrf_from_enu(
    enu: np.ndarray, latitude: float, longitude: float, altitude: float
) -> np.ndarray:
    """ITRF (WGS84 ECEF) positions in metres of ENU offsets from a geodetic reference.

    Parameters
    ----------
    enu
        ``(A, 3)`` east, north, up offsets in metres.
    latitude, longitude
        Geodetic reference position in radians (east positive).
    altitude
        Reference height above the ellipsoid in metres.
    """
    enu = np.asarray(enu, dtype=np.float64)
    if enu.ndim != 2 or enu.shape[1] != 3:
        raise ValueError(f"enu must have shape (A, 3), not {enu.shape}")
    sl, cl = math.sin(latitude), math.cos(latitude)
    so, co = math.sin(longitude), math.cos(longitude)
    n = _WGS84_A / math.sqrt(1.0 - _WGS84_E2 * sl**2)
    ref = np.array(
        [
            (n + altitude) * cl * co,
            (n + altitude) * cl * so,
            (n * (1.0 - _WGS84_E2) + altitude) * sl,
        ]
    )
    rot = np.array([[-so, -sl * co, cl * co], [co, -sl * so, cl * so], [0.0, cl, sl]])
    return ref + enu @ rot.T


@dataclass
class MSInput:
    """Metadata of one observation, enough to write a complete MS v2.

    Attributes
    ----------
    antenna_names
        Antenna names (e.g. ``'m000'``); their order defines ANTENNA ids.
    antenna_positions
        ``(A, 3)`` ITRF positions in metres (see `itrf_from_enu` for ENU offsets).
    channel_freqs
        ``(F,)`` channel centre frequencies in Hz.
    channel_width
        Channel width in Hz.
    corr_products
        ``(B, 2)`` input label pairs, e.g. ``('m000h', 'm001v')``: the correlation product
        axis of the visibility blocks (telstate ``bls_ordering``).
    targets
        The fields, one FIELD (and SOURCE) row each.
    scans
        Dump ranges per scan; SCAN_NUMBER is the scan's index here plus one.
    timestamps
        ``(T,)`` UTC seconds since the UNIX epoch of the dump centres.
    dump_period
        Integration time per dump in seconds (INTERVAL and EXPOSURE).
    dish_diameters
        Dish diameter in metres, one per antenna or one for all.
    antenna_uvw
        Optional hook ``(timestamps, target_index) -> (T, A, 3)`` giving per-antenna uvw in
        metres towards each dump's target; used when a block comes without uvw.
    include_autos
        Whether baselines include autocorrelations.
    telescope_name, observer, project, stations
        OBSERVATION and ANTENNA labels; `stations` defaults to the antenna names.
    """

    antenna_names: Sequence[str]
    antenna_positions: np.ndarray
    channel_freqs: np.ndarray
    channel_width: float
    corr_products: Sequence[tuple[str, str]] | np.ndarray
    targets: Sequence[Target]
    scans: Sequence[Scan]
    timestamps: np.ndarray
    dump_period: float
    dish_diameters: float | Sequence[float] = 13.5
    antenna_uvw: AntennaUVW | None = None
    include_autos: bool = True
    telescope_name: str = "MeerKAT"
    observer: str = ""
    project: str = ""
    stations: Sequence[str] | None = None
    history: Sequence[str] = field(default_factory=tuple)

    @property
    def n_dumps(self) -> int:
        return len(self.timestamps)

    @property
    def n_ants(self) -> int:
        return len(self.antenna_names)

    @property
    def n_chans(self) -> int:
        return len(self.channel_freqs)


@dataclass(frozen=True)
class MSLayout:
    """The slice-independent layout derived from an `MSInput` (see module docstring).

    Attributes
    ----------
    ant1, ant2
        ``(nbl,)`` antenna indices of the canonical baselines.
    pol_pairs
        MeerKAT pol pairs in MS order, e.g. ``(('h','h'), ('h','v'), ...)``.
    corr_types
        CASA Stokes codes of `pol_pairs`.
    corr_index
        ``(nbl, P)`` index into the correlation product axis, -1 where the correlator did
        not produce the product (written as zero, weight 0, flagged).
    corr_conj
        ``(nbl, P)`` bool: the correlator gave the product with its antennas the other way
        round (ANTENNA1 > ANTENNA2), so the MS row holds its conjugate.
    scan_number, field_id, state_id
        ``(T,)`` global ids of each dump; -1 for dumps that belong to no scan.
    intents
        STATE.OBS_MODE rows.
    """

    ant1: np.ndarray
    ant2: np.ndarray
    pol_pairs: tuple[tuple[str, str], ...]
    corr_types: tuple[int, ...]
    corr_index: np.ndarray
    corr_conj: np.ndarray
    scan_number: np.ndarray
    field_id: np.ndarray
    state_id: np.ndarray
    intents: tuple[str, ...]

    @property
    def n_baselines(self) -> int:
        return len(self.ant1)

    @property
    def n_corr(self) -> int:
        return len(self.pol_pairs)

    @property
    def corr_product(self) -> np.ndarray:
        """``(P, 2)`` receptor indices of each product (POLARIZATION.CORR_PRODUCT)."""
        return np.array([[_FEED_INDEX[a], _FEED_INDEX[b]] for a, b in self.pol_pairs], np.int32)

    @classmethod
    def from_input(cls, meta: MSInput) -> MSLayout:
        """Check `meta` and derive its layout; raises ValueError on inconsistent input."""
        n_ants, n_dumps = meta.n_ants, meta.n_dumps
        positions = np.asarray(meta.antenna_positions)
        if positions.shape != (n_ants, 3):
            raise ValueError(
                f"antenna_positions must have shape ({n_ants}, 3), not {positions.shape}"
            )
        if len(set(meta.antenna_names)) != n_ants:
            raise ValueError("antenna names must be unique")
        if meta.n_chans == 0 or np.ndim(meta.channel_freqs) != 1:
            raise ValueError("channel_freqs must be a non-empty 1-D array")
        if np.ndim(meta.timestamps) != 1 or np.any(np.diff(meta.timestamps) <= 0):
            raise ValueError("timestamps must be a strictly increasing 1-D array")
        if not meta.dump_period > 0:
            raise ValueError(f"dump_period must be positive, not {meta.dump_period}")

        ant_index = {name: i for i, name in enumerate(meta.antenna_names)}
        # (ant1, ant2, pol1, pol2) with ant1 <= ant2 -> (product index, conjugated)
        products: dict[tuple[int, int, str, str], tuple[int, bool]] = {}
        for k, (in1, in2) in enumerate(np.asarray(meta.corr_products, dtype=str).reshape(-1, 2)):
            a1, p1 = _split_input(in1, ant_index)
            a2, p2 = _split_input(in2, ant_index)
            # The MS holds the upper triangle: V(a2, a1) is the conjugate of V(a1, a2).
            conj = a1 > a2
            key = (a2, a1, p2, p1) if conj else (a1, a2, p1, p2)
            if key in products:
                raise ValueError(f"corr product ({in1}, {in2}) appears twice (directly or as "
                                 "its conjugate)")
            products[key] = (k, conj)
        present = {(p1, p2) for _, _, p1, p2 in products}
        pol_pairs = tuple(p for p in LINEAR_PRODUCTS if p in present)
        if not pol_pairs:
            raise ValueError("no correlation products given")

        first = 0 if meta.include_autos else 1
        ant1, ant2 = np.triu_indices(n_ants, first)
        found = [[products.get((a1, a2, *pp), (-1, False)) for pp in pol_pairs]
                 for a1, a2 in zip(ant1, ant2, strict=True)]
        shape = (len(ant1), len(pol_pairs))
        corr_index = np.array([[k for k, _ in row] for row in found], np.int64).reshape(shape)
        corr_conj = np.array([[c for _, c in row] for row in found], np.bool_).reshape(shape)

        scan_number = np.full(n_dumps, -1, np.int32)
        field_id = np.full(n_dumps, -1, np.int32)
        state_id = np.full(n_dumps, -1, np.int32)
        intents: list[str] = []
        for s, scan in enumerate(meta.scans):
            if not 0 <= scan.start < scan.stop <= n_dumps:
                raise ValueError(f"scan {s} dumps [{scan.start}, {scan.stop}) outside 0..{n_dumps}")
            if not 0 <= scan.target < len(meta.targets):
                raise ValueError(f"scan {s} refers to target {scan.target} of {len(meta.targets)}")
            if np.any(scan_number[scan.start : scan.stop] >= 0):
                raise ValueError(f"scan {s} overlaps an earlier scan")
            if scan.intent not in intents:
                intents.append(scan.intent)
            scan_number[scan.start : scan.stop] = s + 1
            field_id[scan.start : scan.stop] = scan.target
            state_id[scan.start : scan.stop] = intents.index(scan.intent)
        return cls(
            ant1=ant1.astype(np.int32),
            ant2=ant2.astype(np.int32),
            pol_pairs=pol_pairs,
            corr_types=tuple(LINEAR_PRODUCTS[p] for p in pol_pairs),
            corr_index=corr_index,
            corr_conj=corr_conj,
            scan_number=scan_number,
            field_id=field_id,
            state_id=state_id,
            intents=tuple(intents),
        )


def _split_input(label: str, ant_index: dict[str, int]) -> tuple[int, str]:
    """``'m012h'`` -> (index of antenna ``m012``, ``'h'``)."""
    name, pol = label[:-1], label[-1:]
    if pol not in _FEED_INDEX:
        raise ValueError(f"input {label!r} does not end in a MeerKAT pol ('h' or 'v')")
    if name not in ant_index:
        raise ValueError(f"input {label!r} names an antenna not in antenna_names")
    return ant_index[name], pol
