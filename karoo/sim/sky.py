"""Targets (katpoint-style descriptions) and a point-source sky model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .astro import format_angle, parse_angle


@dataclass(frozen=True)
class FluxModel:
    """katpoint-style flux density polynomial.

    ``log10(S / Jy) = a + b log10(nu) + c log10(nu)**2 + d log10(nu)**3`` with nu in MHz,
    valid between `min_mhz` and `max_mhz` (clamped outside).
    """

    min_mhz: float
    max_mhz: float
    coefs: tuple[float, ...]

    @classmethod
    def parse(cls, text: str) -> FluxModel:
        """Parse ``'(800.0 8400.0 -30.7667 26.4908 -7.0977 0.605334)'``."""
        values = [float(v) for v in text.strip().strip("()").split()]
        if len(values) < 3:
            raise ValueError(f"flux model needs a frequency range and a coefficient: {text!r}")
        return cls(values[0], values[1], tuple(values[2:]))

    @classmethod
    def power_law(cls, flux_jy: float, ref_hz: float, spectral_index: float) -> FluxModel:
        """S = flux_jy (f / ref_hz) ** spectral_index."""
        log_ref = math.log10(ref_hz / 1e6)
        return cls(1.0, 1e6, (math.log10(flux_jy) - spectral_index * log_ref, spectral_index))

    def __call__(self, freq_hz: np.ndarray) -> np.ndarray:
        log_nu = np.log10(np.clip(np.asarray(freq_hz) / 1e6, self.min_mhz, self.max_mhz))
        return 10.0 ** sum(c * log_nu**i for i, c in enumerate(self.coefs))

    @property
    def description(self) -> str:
        return "(" + " ".join(f"{v:g}" for v in (self.min_mhz, self.max_mhz, *self.coefs)) + ")"


@dataclass(frozen=True)
class Target:
    """A radec target: ``'name, radec tag1 tag2, ra, dec[, (flux model)]'``.

    Attributes
    ----------
    name
        Target name (first field).
    tags
        Tags after the body type, e.g. ``('bpcal', 'delaycal')``.
    ra, dec
        J2000 coordinates in radians.
    flux
        Optional flux density model.
    """

    name: str
    tags: tuple[str, ...]
    ra: float
    dec: float
    flux: FluxModel | None = None

    @classmethod
    def parse(cls, description: str) -> Target:
        """Parse a katpoint-style radec target description."""
        fields = [f.strip() for f in description.split(",")]
        if len(fields) < 4:
            raise ValueError(f"target description needs name, tags, ra, dec: {description!r}")
        body, *tags = fields[1].split()
        if body != "radec":
            raise ValueError(f"only radec targets are supported, not {body!r}")
        flux = FluxModel.parse(fields[4]) if len(fields) > 4 and fields[4] else None
        return cls(
            fields[0], tuple(tags), parse_angle(fields[2], hours=True), parse_angle(fields[3]), flux
        )

    @property
    def description(self) -> str:
        """The katpoint description string (what goes into ``cbf_target``)."""
        tags = " ".join(("radec", *self.tags))
        text = f"{self.name}, {tags}, {format_angle(self.ra, hours=True)}, {format_angle(self.dec)}"
        return f"{text}, {self.flux.description}" if self.flux else text


@dataclass(frozen=True)
class PointSource:
    """An unpolarised point source with a flux density model."""

    name: str
    ra: float
    dec: float
    flux: FluxModel

    @classmethod
    def from_target(cls, target: Target | str) -> PointSource:
        target = Target.parse(target) if isinstance(target, str) else target
        if target.flux is None:
            raise ValueError(f"target {target.name} has no flux model")
        return cls(target.name, target.ra, target.dec, target.flux)


@dataclass(frozen=True)
class SkyModel:
    """A list of point sources."""

    sources: tuple[PointSource, ...] = field(default_factory=tuple)

    @property
    def ra(self) -> np.ndarray:
        return np.array([s.ra for s in self.sources])

    @property
    def dec(self) -> np.ndarray:
        return np.array([s.dec for s in self.sources])

    def flux(self, freqs: np.ndarray) -> np.ndarray:
        """Flux densities, shape (n_sources, n_freqs), Jy."""
        freqs = np.atleast_1d(np.asarray(freqs, np.float64))
        out = np.empty((len(self.sources), len(freqs)))
        for i, source in enumerate(self.sources):
            out[i] = source.flux(freqs)
        return out


# A real bandpass/delay calibrator (katpoint catalogue flux model) and a simulated
# gain calibrator and target field (names make clear they are not real sources).
BPCAL = Target.parse(
    "PKS1934-638, radec bpcal delaycal, 19:39:25.03, -63:42:45.6, "
    "(800.0 8400.0 -30.7667 26.4908 -7.0977 0.605334)"
)
# katpoint flux models take frequency in MHz: this is 4 Jy at 1 GHz with spectral index -0.7.
GAINCAL = Target.parse("SIM-GCAL, radec gaincal, 20:30:00.0, -55:00:00.0, (800 2000 2.7 -0.7)")
TARGET = Target.parse("SIM-FIELD, radec target, 20:10:00.0, -60:00:00.0")


def default_sky(seed: int = 1, n_field: int = 5) -> SkyModel:
    """The calibrators plus `n_field` random 0.1-1 Jy sources within 0.4 deg of `TARGET`."""
    rng = np.random.default_rng(seed)
    sources = [PointSource.from_target(BPCAL), PointSource.from_target(GAINCAL)]
    for i in range(n_field):
        radius = math.radians(0.4) * math.sqrt(rng.uniform())
        angle = rng.uniform(0, 2 * math.pi)
        dec = TARGET.dec + radius * math.cos(angle)
        ra = TARGET.ra + radius * math.sin(angle) / math.cos(TARGET.dec)
        flux = FluxModel.power_law(rng.uniform(0.1, 1.0), 1.4e9, rng.uniform(-1.0, -0.5))
        sources.append(PointSource(f"SIM-FIELD-{i}", ra, dec, flux))
    return SkyModel(tuple(sources))
