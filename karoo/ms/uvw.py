"""Per-antenna uvw for `MSInput.antenna_uvw` from array geometry and J2000 targets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from karoo.sim.astro import uvw_basis

from .layout import AntennaUVW, Target


@dataclass(frozen=True)
class GeometricUVW:
    """Picklable `AntennaUVW` hook: per-antenna uvw (metres) towards each dump's target.

    Uses katpoint's definition (w towards the apparent phase centre; u, v aligned with the
    J2000 axes), relative to the array reference position. The MS writer turns it into
    baseline uvw as ``uvw[ANTENNA1] - uvw[ANTENNA2]``, the sign katdal writes (CASA
    practice rather than the wording of MS note 229).

    Attributes
    ----------
    enu
        ``(A, 3)`` antenna ENU offsets from the reference position, metres.
    targets
        The observation's targets (indexed by the per-dump target index).
    latitude, longitude
        Geodetic reference position, radians.
    """

    enu: np.ndarray
    targets: tuple[Target, ...]
    latitude: float
    longitude: float

    def __call__(self, timestamps: np.ndarray, target: np.ndarray) -> np.ndarray:
        timestamps = np.asarray(timestamps, np.float64)
        target = np.asarray(target)
        enu = np.asarray(self.enu, np.float64)
        out = np.empty((len(timestamps), len(enu), 3))
        for index in np.unique(target):
            dumps = target == index
            tgt = self.targets[int(index)]
            basis = uvw_basis(tgt.ra, tgt.dec, timestamps[dumps], self.latitude, self.longitude)
            out[dumps] = np.einsum("tij,aj->tai", basis, enu)
        return out


def geometric_uvw(
    enu: np.ndarray, targets: Sequence[Target], latitude: float, longitude: float
) -> AntennaUVW:
    """A `GeometricUVW` hook for `MSInput.antenna_uvw` (see there for the conventions)."""
    return GeometricUVW(np.asarray(enu, np.float64), tuple(targets), latitude, longitude)
