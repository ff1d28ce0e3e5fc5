"""karoo: the science data processing core of a radio interferometer."""

__version__ = "0.1.0"
