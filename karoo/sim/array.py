"""The array: MeerKAT antenna positions, antenna descriptions and correlation products.

Positions are East-North-Up offsets in metres from the MeerKAT array reference
(-30:42:39.8, 21:26:38.0, 1035 m), as in the public MeerKAT antenna catalogue. m000, m001,
m002, m062 and m063 are the catalogue's current values; for the other antennas east and
north come from the public survey list referred to 1086.6 m and the up offset was moved to
the 1035 m reference by the mean difference seen on those five antennas (7.394 m), so the
heights may be off by a few centimetres. That is plenty for a simulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .astro import format_angle, parse_angle

REFERENCE_LATITUDE = "-30:42:39.8"
REFERENCE_LONGITUDE = "21:26:38.0"
REFERENCE_ALTITUDE = 1035.0
DISH_DIAMETER = 13.5

# ENU offsets (m) of m000 ... m063 from the array reference
MEERKAT_ENU = (
    (-8.258, -207.289, 1.2075),  # m000
    (1.126, -171.761, 1.0605),  # m001
    (-32.1085, -224.2365, 1.248),  # m002
    (-66.518, -202.276, 0.891),  # m003
    (-123.624, -252.946, 1.119),  # m004
    (-102.088, -283.12, 1.481),  # m005
    (-18.232, -295.428, 1.794),  # m006
    (-89.592, -402.732, 2.375),  # m007
    (-93.527, -535.026, 3.051),  # m008
    (32.357, -371.056, 2.746),  # m009
    (88.095, -511.872, 3.792),  # m010
    (84.012, -352.078, 2.757),  # m011
    (140.019, -368.267, 3.055),  # m012
    (236.792, -393.46, 3.73),  # m013
    (280.669, -285.792, 3.153),  # m014
    (210.644, -219.142, 2.344),  # m015
    (288.159, -185.873, 2.401),  # m016
    (199.624, -112.263, 1.561),  # m017
    (105.727, -245.87, 2.135),  # m018
    (170.787, -285.223, 2.677),  # m019
    (97.016, -299.638, 2.483),  # m020
    (-295.966, -327.241, 0.723),  # m021
    (-373.002, 0.544, -1.745),  # m022
    (-322.306, -142.185, -0.569),  # m023
    (-351.046, 150.088, -2.549),  # m024
    (-181.978, 225.617, -2.326),  # m025
    (-99.004, 17.045, -0.583),  # m026
    (40.475, -23.112, 0.3),  # m027
    (-51.179, -87.17, 0.242),  # m028
    (-88.762, -124.111, 0.306),  # m029
    (171.281, 113.949, -0.116),  # m030
    (246.567, 93.756, 0.075),  # m031
    (461.275, 175.505, -0.027),  # m032
    (580.678, 863.959, -3.794),  # m033
    (357.811, -28.308, 1.578),  # m034
    (386.152, -180.894, 2.896),  # m035
    (388.257, -290.759, 3.418),  # m036
    (380.286, -459.309, 4.778),  # m037
    (213.308, -569.08, 4.552),  # m038
    (253.748, -592.147, 5.047),  # m039
    (-26.858, -712.219, 4.439),  # m040
    (-287.545, -661.678, 2.555),  # m041
    (-361.714, -460.318, 1.103),  # m042
    (-629.853, -128.326, -2.13),  # m043
    (-896.164, 600.497, -8.034),  # m044
    (-1832.86, 266.75, -7.286),  # m045
    (-1467.341, 1751.923, -14.472),  # m046
    (-578.296, -517.297, 0.221),  # m047
    (-2805.653, 2686.863, -17.149),  # m048
    (-3605.957, 436.462, -4.698),  # m049
    (-2052.336, -843.715, -2.056),  # m050
    (-850.255, -769.359, 0.22),  # m051
    (-593.192, -1148.652, 3.156),  # m052
    (9.365, -1304.462, 7.638),  # m053
    (871.98, -499.812, 5.97),  # m054
    (1201.78, 96.492, 2.629),  # m055
    (1598.403, 466.668, -0.404),  # m056
    (294.645, 3259.915, -18.031),  # m057
    (2805.764, 2686.873, -11.054),  # m058
    (3686.427, 758.895, 4.428),  # m059
    (3419.683, -1840.478, 16.303),  # m060
    (-16.409, -2323.779, 13.91),  # m061
    (-1440.6235, -2503.7705, 14.288),  # m062
    (-3419.58, -1840.4655, 9.005),  # m063
)

# Order of the four products of each antenna pair in the CBF output (katgpucbf):
# (ant1 v, ant2 v), (ant1 h, ant2 v), (ant1 v, ant2 h), (ant1 h, ant2 h)
CBF_POL_PRODUCTS = (("v", "v"), ("h", "v"), ("v", "h"), ("h", "h"))
POLS = ("h", "v")


@dataclass(frozen=True)
class Antenna:
    """One dish: name, ENU offset (m) from the array reference, diameter (m)."""

    name: str
    enu: tuple[float, float, float]
    diameter: float = DISH_DIAMETER

    @property
    def description(self) -> str:
        """katpoint-style description ``'m000, lat, lon, alt, diameter, e n u'``."""
        e, n, u = self.enu
        return (
            f"{self.name}, {REFERENCE_LATITUDE}, {REFERENCE_LONGITUDE}, {REFERENCE_ALTITUDE}, "
            f"{self.diameter}, {e} {n} {u}"
        )


def meerkat_antennas(n_ants: int = 64) -> list[Antenna]:
    """The first `n_ants` MeerKAT antennas, m000 onwards (4 <= n_ants <= 64)."""
    if not 1 <= n_ants <= len(MEERKAT_ENU):
        raise ValueError(f"n_ants must be between 1 and {len(MEERKAT_ENU)}, not {n_ants}")
    return [Antenna(f"m{i:03d}", MEERKAT_ENU[i]) for i in range(n_ants)]


@dataclass(frozen=True)
class Array:
    """A set of antennas sharing the array reference position.

    Attributes
    ----------
    antennas
        The antennas, in input order.
    latitude, longitude, altitude
        Reference position (radians, radians, metres).
    """

    antennas: tuple[Antenna, ...]
    latitude: float = parse_angle(REFERENCE_LATITUDE)
    longitude: float = parse_angle(REFERENCE_LONGITUDE)
    altitude: float = REFERENCE_ALTITUDE

    @classmethod
    def meerkat(cls, n_ants: int = 64) -> Array:
        """MeerKAT's first `n_ants` antennas."""
        return cls(tuple(meerkat_antennas(n_ants)))

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.antennas]

    @property
    def n_ants(self) -> int:
        return len(self.antennas)

    @property
    def enu(self) -> np.ndarray:
        """ENU offsets, shape (n_ants, 3), metres."""
        return np.array([a.enu for a in self.antennas], dtype=np.float64)

    @property
    def reference_description(self) -> str:
        """katpoint description of the array reference position (``'array, lat, lon, alt'``)."""
        lat = format_angle(self.latitude, decimals=1)
        lon = format_angle(self.longitude, decimals=1)
        return f"array, {lat}, {lon}, {self.altitude}"

    @property
    def input_labels(self) -> list[str]:
        """CBF input labels, two per antenna: ``['m000h', 'm000v', 'm001h', ...]``."""
        return [f"{name}{pol}" for name in self.names for pol in POLS]

    @property
    def max_baseline(self) -> float:
        enu = self.enu
        return float(math.sqrt(np.max(np.sum((enu[:, None] - enu[None]) ** 2, axis=-1))))


@dataclass(frozen=True)
class CorrProducts:
    """The CBF correlation products of an array, in CBF order.

    Antenna pairs (a1 <= a2) are ordered by a2 then a1, i.e. pair index
    ``a2 * (a2 + 1) / 2 + a1`` (autos included), and each pair holds the four
    polarisation products in `CBF_POL_PRODUCTS` order.

    Attributes
    ----------
    labels
        ``(n_bls, 2)`` array of input labels (``'<U5'`` for MeerKAT), the telstate
        ``bls_ordering``.
    input1, input2
        Input index (into `Array.input_labels`) of each side of each product.
    ant1, ant2
        Antenna index of each side.
    """

    labels: np.ndarray
    input1: np.ndarray
    input2: np.ndarray
    ant1: np.ndarray
    ant2: np.ndarray

    @classmethod
    def cbf(cls, array: Array) -> CorrProducts:
        """Products in the order of the MeerKAT (katgpucbf) X-engine output."""
        input_index = {label: i for i, label in enumerate(array.input_labels)}
        pairs = [
            (f"{array.names[a1]}{p1}", f"{array.names[a2]}{p2}")
            for a2 in range(array.n_ants)
            for a1 in range(a2 + 1)
            for p1, p2 in CBF_POL_PRODUCTS
        ]
        labels = np.array(pairs)
        input1 = np.array([input_index[p[0]] for p in pairs], dtype=np.int32)
        input2 = np.array([input_index[p[1]] for p in pairs], dtype=np.int32)
        return cls(labels, input1, input2, input1 // len(POLS), input2 // len(POLS))

    @property
    def n_bls(self) -> int:
        return len(self.labels)

    @property
    def is_auto(self) -> np.ndarray:
        """True where both inputs belong to the same antenna."""
        return self.ant1 == self.ant2

    @property
    def is_parallel(self) -> np.ndarray:
        """True for hh and vv products."""
        return (self.input1 % len(POLS)) == (self.input2 % len(POLS))
