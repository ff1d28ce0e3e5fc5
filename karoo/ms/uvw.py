"""Per-antenna uvw for `MSInput.antenna_uvw` from array geometry and J2000 targets."""

from __future__ import annotations

import numpy as np

from karoo.sim.astro import uvw_basis

from .layout import AntennaUVW, Target


def geometric_uvw(
    enu: np.ndarray, targets: list[Target], latitude: float, longitude: float
) -> AntennaUVW:
    """Hook computing per-antenna uvw (metres) towards each dump's target.

    Uses katpoint's definition (w towards the apparent phase centre; u, v aligned with the
    J2000 axes), relative to the array reference position. The MS writer turns it into
    baseline uvw as ``uvw[ANTENNA1] - uvw[ANTENNA2]``, the sign katdal writes (CASA
    practice rather than the wording of MS note 229).

    Parameters
    ----------
    enu
        ``(A, 3)`` antenna ENU offsets from the reference position, metres.
    targets
        The observation's targets (indexed by the per-dump target index).
    latitude, longitude
        Geodetic reference position, radians.
    """
    enu = np.asarray(enu, np.float64)

    def hook(timestamps: np.ndarray, target: np.ndarray) -> np.ndarray:
        timestamps = np.asarray(timestamps, np.float64)
        target = np.asarray(target)
        out = np.empty((len(timestamps), len(enu), 3))
        for index in np.unique(target):
            dumps = target == index
            tgt = targets[int(index)]
            basis = uvw_basis(tgt.ra, tgt.dec, timestamps[dumps], latitude, longitude)
            out[dumps] = np.einsum("tij,aj->tai", basis, enu)
        return out

    return hook
