"""katdal-style reader: ``karoo.open(source)`` gives a `DataSet` with lazy Dask arrays.

>>> import karoo
>>> d = karoo.open("/data/1700000000/1700000000_sdp_l0.rdb")   # doctest: +SKIP
>>> d.select(scans="track", ants="m000,m001", pol="hh", channels=slice(100, 200))
>>> vis = d.vis[:]              # reads only the chunks of the selection
>>> d.vis.dask                  # the Dask array
"""

from .applycal import CalibrationError
from .chunks import ChunkReadError
from .dataset import DataSet, LazyArray, SensorCache, get, open
from .geometry import Antenna, AntennaUVW
from .source import DataSourceNotFound

__all__ = [
    "Antenna",
    "AntennaUVW",
    "CalibrationError",
    "ChunkReadError",
    "DataSet",
    "DataSourceNotFound",
    "LazyArray",
    "SensorCache",
    "get",
    "open",
]
