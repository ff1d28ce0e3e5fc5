"""Correlator simulator: array, sky, instrument, noise, RFI and a scripted observation.

Everything up to the int32 CBF dumps and the telstate metadata; the SPEAD sender lives in
:mod:`karoo.spead`.
"""

from .array import MEERKAT_ENU, Antenna, Array, CorrProducts, meerkat_antennas
from .model import (
    L_BAND,
    UHF_BAND,
    Band,
    CorrelatorConfig,
    InstrumentModel,
    NoiseModel,
    VisibilityModel,
)
from .observation import Dump, Observation, Scan, Simulator, default_script
from .rfi import HeapLossModel, RfiEvent, RfiModel, load_rfi_mask
from .sky import BPCAL, GAINCAL, TARGET, FluxModel, PointSource, SkyModel, Target, default_sky

__all__ = [
    "BPCAL",
    "GAINCAL",
    "L_BAND",
    "MEERKAT_ENU",
    "TARGET",
    "UHF_BAND",
    "Antenna",
    "Array",
    "Band",
    "CorrProducts",
    "CorrelatorConfig",
    "Dump",
    "FluxModel",
    "HeapLossModel",
    "InstrumentModel",
    "NoiseModel",
    "Observation",
    "PointSource",
    "RfiEvent",
    "RfiModel",
    "Scan",
    "Simulator",
    "SkyModel",
    "Target",
    "VisibilityModel",
    "default_script",
    "default_sky",
    "load_rfi_mask",
    "meerkat_antennas",
]
