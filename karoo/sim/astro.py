"""Just enough positional astronomy for the simulator, in vectorised numpy.

Directions are unit vectors. A J2000 (astrometric) direction is turned into the apparent
topocentric direction of date (IAU 1976 precession, the leading terms of the IAU 1980
nutation series, annual aberration), then into local East-North-Up (ENU) at the array
reference using the apparent sidereal time. Accuracy is about 0.1 arcsec, i.e. a few
centimetres of (u, v, w) on MeerKAT's 8 km baselines. UTC stands in for UT1 and TT.
"""

from __future__ import annotations

import math
import re

import numpy as np

ARCSEC = math.pi / (180.0 * 3600.0)
SPEED_OF_LIGHT = 299792458.0
UNIX_J2000 = 946728000.0  # 2000-01-01T12:00:00 UTC as a UNIX time
# WGS84 ellipsoid
_WGS84_A = 6378137.0
_WGS84_E2 = 6.69437999014e-3


def parse_angle(text: str | float, hours: bool = False) -> float:
    """Parse a sexagesimal angle (``'-30:42:39.8'``) or a decimal one, into radians.

    Parameters
    ----------
    text
        ``d:m:s`` / ``h:m:s`` string, decimal string or number (degrees or hours).
    hours
        Interpret the value as hours (right ascension) instead of degrees.
    """
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        text = text.strip()
        if not re.fullmatch(r"[+-]?\d+(\.\d*)?(:\d+(\.\d*)?){0,2}", text):
            raise ValueError(f"cannot parse angle {text!r}")
        negative = text.startswith("-")
        parts = [abs(float(p)) for p in text.lstrip("+-").split(":")]
        value = sum(p / 60.0**i for i, p in enumerate(parts))
        value = -value if negative else value
    return math.radians(value * 15.0 if hours else value)


def format_angle(radians: float, hours: bool = False, decimals: int = 2) -> str:
    """Format an angle as sexagesimal ``[-]d:mm:ss.ss`` (or hours), inverse of `parse_angle`."""
    value = math.degrees(radians) / (15.0 if hours else 1.0)
    sign = "-" if value < 0 else ""
    scale = 10**decimals
    total = round(abs(value) * 3600.0 * scale)
    whole, frac = divmod(total, scale)
    d, rem = divmod(whole, 3600)
    m, s = divmod(rem, 60)
    frac_text = f".{frac:0{decimals}d}" if decimals > 0 else ""
    return f"{sign}{d}:{m:02d}:{s:02d}{frac_text}"


def radec_to_vector(ra: np.ndarray | float, dec: np.ndarray | float) -> np.ndarray:
    """Unit vector(s) ``(..., 3)`` in the equatorial frame for (ra, dec) in radians."""
    ra = np.asarray(ra, dtype=np.float64)
    dec = np.asarray(dec, dtype=np.float64)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def lla_to_ecef(lat: float, lon: float, alt: float) -> np.ndarray:
    """Geodetic WGS84 (radians, metres) to Earth-centred Earth-fixed XYZ (metres)."""
    n = _WGS84_A / math.sqrt(1.0 - _WGS84_E2 * math.sin(lat) ** 2)
    return np.array(
        [
            (n + alt) * math.cos(lat) * math.cos(lon),
            (n + alt) * math.cos(lat) * math.sin(lon),
            (n * (1.0 - _WGS84_E2) + alt) * math.sin(lat),
        ]
    )


def enu_to_ecef_matrix(lat: float, lon: float) -> np.ndarray:
    """Rotation taking ENU offsets at (lat, lon) to ECEF offsets."""
    sl, cl = math.sin(lat), math.cos(lat)
    so, co = math.sin(lon), math.cos(lon)
    return np.array([[-so, -sl * co, cl * co], [co, -sl * so, cl * so], [0.0, cl, sl]])


def _rot1(a: np.ndarray) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    one, zero = np.ones_like(a), np.zeros_like(a)
    return np.stack(
        [np.stack([one, zero, zero], -1), np.stack([zero, c, s], -1), np.stack([zero, -s, c], -1)],
        -2,
    )


def _rot2(a: np.ndarray) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    one, zero = np.ones_like(a), np.zeros_like(a)
    return np.stack(
        [np.stack([c, zero, -s], -1), np.stack([zero, one, zero], -1), np.stack([s, zero, c], -1)],
        -2,
    )


def _rot3(a: np.ndarray) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    one, zero = np.ones_like(a), np.zeros_like(a)
    return np.stack(
        [np.stack([c, s, zero], -1), np.stack([-s, c, zero], -1), np.stack([zero, zero, one], -1)],
        -2,
    )


# Leading IAU 1980 nutation terms: multipliers of (l, l', F, D, Omega), then
# dpsi = (a + b T) sin(arg), deps = (c + d T) cos(arg), in units of 0.1 mas.
_NUTATION = np.array(
    [
        [0, 0, 0, 0, 1, -171996, -174.2, 92025, 8.9],
        [0, 0, 2, -2, 2, -13187, -1.6, 5736, -3.1],
        [0, 0, 2, 0, 2, -2274, -0.2, 977, -0.5],
        [0, 0, 0, 0, 2, 2062, 0.2, -895, 0.5],
        [0, 1, 0, 0, 0, 1426, -3.4, 54, -0.1],
        [1, 0, 0, 0, 0, 712, 0.1, -7, 0.0],
        [0, 1, 2, -2, 2, -517, 1.2, 224, -0.6],
        [0, 0, 2, 0, 1, -386, -0.4, 200, 0.0],
        [1, 0, 2, 0, 2, -301, 0.0, 129, -0.1],
        [0, -1, 2, -2, 2, 217, -0.5, -95, 0.3],
        [1, 0, 0, -2, 0, -158, 0.0, 0, 0.0],
        [0, 0, 2, -2, 1, 129, 0.1, -70, 0.0],
        [-1, 0, 2, 0, 2, 123, 0.0, -53, 0.0],
        [1, 0, 0, 0, 1, 63, 0.1, -33, 0.0],
        [0, 0, 0, 2, 0, 63, 0.0, -2, 0.0],
        [-1, 0, 2, 2, 2, -59, 0.0, 26, 0.0],
        [-1, 0, 0, 0, 1, -58, -0.1, 32, 0.0],
        [1, 0, 2, 0, 1, -51, 0.0, 27, 0.0],
    ]
)


def _centuries(unix_time: np.ndarray) -> np.ndarray:
    return (np.asarray(unix_time, dtype=np.float64) - UNIX_J2000) / (86400.0 * 36525.0)


def _nutation(t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nutation in longitude and obliquity, and mean obliquity (radians) at T centuries."""
    deg = math.pi / 180.0
    args = np.stack(
        [
            (134.96298 + 477198.867398 * t) * deg,  # l, Moon's mean anomaly
            (357.52772 + 35999.050340 * t) * deg,  # l', Sun's mean anomaly
            (93.27191 + 483202.017538 * t) * deg,  # F
            (297.85036 + 445267.111480 * t) * deg,  # D
            (125.04452 - 1934.136261 * t) * deg,  # Omega
        ],
        axis=-1,
    )
    phase = args @ _NUTATION[:, :5].T
    tt = t[..., np.newaxis]
    dpsi = np.sum((_NUTATION[:, 5] + _NUTATION[:, 6] * tt) * np.sin(phase), axis=-1)
    deps = np.sum((_NUTATION[:, 7] + _NUTATION[:, 8] * tt) * np.cos(phase), axis=-1)
    eps0 = (84381.448 - 46.8150 * t - 0.00059 * t**2 + 0.001813 * t**3) * ARCSEC
    return dpsi * 1e-4 * ARCSEC, deps * 1e-4 * ARCSEC, eps0


def apparent_sidereal_time(unix_time: np.ndarray | float, longitude: float) -> np.ndarray:
    """Local apparent sidereal time (radians) at east `longitude` for UNIX time(s)."""
    t = _centuries(unix_time)
    days = t * 36525.0
    gmst = 280.46061837 + 360.98564736629 * days + 0.000387933 * t**2 - t**3 / 38710000.0
    dpsi, deps, eps0 = _nutation(t)
    gast = np.radians(gmst % 360.0) + dpsi * np.cos(eps0 + deps)
    return (gast + longitude) % (2 * math.pi)


def _annual_aberration_velocity(t: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """Earth's orbital velocity / c in the true equatorial frame of date, shape (..., 3)."""
    deg = math.pi / 180.0
    mean_long = (280.46646 + 36000.76983 * t) * deg
    anomaly = (357.52911 + 35999.05029 * t) * deg
    centre = (
        (1.914602 - 0.004817 * t) * np.sin(anomaly)
        + (0.019993 - 0.000101 * t) * np.sin(2 * anomaly)
        + 0.000289 * np.sin(3 * anomaly)
    ) * deg
    sun = mean_long + centre
    ecc = 0.016708634 - 0.000042037 * t
    perihelion = (102.93735 + 1.71946 * t) * deg
    kappa = 20.49552 * ARCSEC
    vx = kappa * (np.sin(sun) - ecc * np.sin(perihelion))
    vy = kappa * (-np.cos(sun) + ecc * np.cos(perihelion))
    # ecliptic -> equatorial of date
    return np.stack([vx, vy * np.cos(eps), vy * np.sin(eps)], axis=-1)


def apparent_enu(
    ra: np.ndarray | float,
    dec: np.ndarray | float,
    unix_time: np.ndarray | float,
    latitude: float,
    longitude: float,
) -> np.ndarray:
    """Apparent topocentric ENU unit vectors of J2000 (ra, dec) at the given times.

    Parameters
    ----------
    ra, dec
        J2000 coordinates in radians, shape ``S`` (broadcast against `unix_time`).
    unix_time
        UTC seconds since the UNIX epoch.
    latitude, longitude
        Geodetic position of the observer (radians, east positive).

    Returns
    -------
    enu : array of shape ``broadcast(S, T) + (3,)``
    """
    ra, dec, unix_time = np.broadcast_arrays(
        np.asarray(ra, np.float64), np.asarray(dec, np.float64), np.asarray(unix_time, np.float64)
    )
    t = _centuries(unix_time)
    zeta = (2306.2181 * t + 0.30188 * t**2 + 0.017998 * t**3) * ARCSEC
    z = (2306.2181 * t + 1.09468 * t**2 + 0.018203 * t**3) * ARCSEC
    theta = (2004.3109 * t - 0.42665 * t**2 - 0.041833 * t**3) * ARCSEC
    precess = _rot3(-z) @ _rot2(theta) @ _rot3(-zeta)
    dpsi, deps, eps0 = _nutation(t)
    nutate = _rot1(-(eps0 + deps)) @ _rot3(-dpsi) @ _rot1(eps0)
    s = (nutate @ precess @ radec_to_vector(ra, dec)[..., np.newaxis])[..., 0]
    # First-order annual aberration: shift towards the apex, then renormalise
    beta = _annual_aberration_velocity(t, eps0 + deps)
    s = s + beta - np.sum(s * beta, axis=-1, keepdims=True) * s
    s /= np.linalg.norm(s, axis=-1, keepdims=True)
    app_ra = np.arctan2(s[..., 1], s[..., 0])
    app_dec = np.arcsin(np.clip(s[..., 2], -1.0, 1.0))
    ha = apparent_sidereal_time(unix_time, longitude) - app_ra
    sl, cl = math.sin(latitude), math.cos(latitude)
    east = -np.cos(app_dec) * np.sin(ha)
    north = cl * np.sin(app_dec) - sl * np.cos(app_dec) * np.cos(ha)
    up = sl * np.sin(app_dec) + cl * np.cos(app_dec) * np.cos(ha)
    return np.stack([east, north, up], axis=-1)


def enu_to_azel(enu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Azimuth (from north through east) and elevation, radians, of ENU unit vectors."""
    az = np.arctan2(enu[..., 0], enu[..., 1]) % (2 * math.pi)
    el = np.arcsin(np.clip(enu[..., 2], -1.0, 1.0))
    return az, el


def uvw_basis(
    ra: float, dec: float, unix_time: np.ndarray | float, latitude: float, longitude: float
) -> np.ndarray:
    """Rows (u, v, w) of the ENU -> UVW transformation for a phase centre, shape ``(T, 3, 3)``.

    w points at the apparent phase centre; v lies in the plane of w and the direction of
    increasing J2000 declination at the phase centre (found with a 0.03 rad offset towards
    the equator, katpoint's definition, so u and v stay aligned with J2000 axes); u = v x w
    points east.
    """
    sign = -1.0 if dec > 0 else 1.0
    both = apparent_enu(
        np.array([[ra], [ra]]),
        np.array([[dec], [dec + 0.03 * sign]]),
        np.atleast_1d(np.asarray(unix_time, np.float64))[np.newaxis, :],
        latitude,
        longitude,
    )
    w, offset = both[0], both[1]
    u = np.cross(offset, w) * sign
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    v = np.cross(w, u)
    return np.stack([u, v, w], axis=-2)
