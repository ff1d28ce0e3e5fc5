"""Antennas and targets as a reader needs them: katpoint descriptions, positions and uvw."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..sim.astro import enu_to_ecef_matrix, lla_to_ecef, parse_angle, uvw_basis
from ..sim.sky import Target


@dataclass(frozen=True)
class Antenna:
    """An antenna from its katpoint description ``'name, lat, lon, alt, diameter, e n u, ...'``.

    Attributes
    ----------
    name, latitude, longitude, altitude, diameter
        Name, geodetic reference position (radians, radians, metres) and dish diameter (m).
    enu
        Offset (m) of the dish from its reference position.
    description
        The description it was parsed from.
    """

    name: str
    latitude: float
    longitude: float
    altitude: float
    diameter: float
    enu: tuple[float, float, float]
    description: str

    @classmethod
    def parse(cls, description: str) -> Antenna:
        fields = [f.strip() for f in str(description).split(",")]
        if len(fields) < 4:
            raise ValueError(f"antenna description needs name, lat, lon, alt: {description!r}")
        diameter = float(fields[4]) if len(fields) > 4 and fields[4] else 0.0
        enu = (0.0, 0.0, 0.0)
        if len(fields) > 5 and fields[5]:
            parts = [float(x) for x in fields[5].split()]
            enu = tuple([*parts, 0.0, 0.0, 0.0][:3])
        return cls(fields[0], parse_angle(fields[1]), parse_angle(fields[2]), float(fields[3]),
                   diameter, enu, str(description))

    @property
    def ecef(self) -> np.ndarray:
        """ITRF (WGS84 ECEF) position of the dish, metres."""
        return (lla_to_ecef(self.latitude, self.longitude, self.altitude)
                + enu_to_ecef_matrix(self.latitude, self.longitude) @ np.asarray(self.enu))

    def __repr__(self) -> str:
        return f"<Antenna {self.name}>"


def enu_from_reference(antennas: list[Antenna], reference: Antenna) -> np.ndarray:
    """``(A, 3)`` ENU offsets (m) of the dishes from the reference position of `reference`."""
    ref = lla_to_ecef(reference.latitude, reference.longitude, reference.altitude)
    rot = enu_to_ecef_matrix(reference.latitude, reference.longitude)
    ecef = np.array([a.ecef for a in antennas]).reshape(-1, 3)
    return (ecef - ref) @ rot


def parse_target(description: str) -> Target:
    """A :class:`karoo.sim.sky.Target` (radec) from a katpoint description."""
    return Target.parse(str(description))


@dataclass(frozen=True)
class AntennaUVW:
    """Picklable per-antenna uvw: ``(timestamps (T,), target index (T,)) -> (T, A, 3)`` metres.

    u, v, w follow katpoint's definition (w towards the apparent phase centre, u and v along the
    J2000 axes), relative to the array reference position, so that a baseline's uvw is the
    difference of its antennas' uvw.
    """

    enu: np.ndarray
    ra: tuple[float, ...]
    dec: tuple[float, ...]
    latitude: float
    longitude: float

    def __call__(self, timestamps: np.ndarray, target: np.ndarray) -> np.ndarray:
        timestamps = np.asarray(timestamps, np.float64)
        target = np.broadcast_to(np.asarray(target), timestamps.shape)
        out = np.empty((len(timestamps), len(self.enu), 3))
        for index in np.unique(target):
            dumps = target == index
            basis = uvw_basis(self.ra[int(index)], self.dec[int(index)], timestamps[dumps],
                              self.latitude, self.longitude)
            out[dumps] = np.einsum("tij,aj->tai", basis, self.enu)
        return out
