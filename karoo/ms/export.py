"""What an MS export reads: `ExportSource`, the contract between a dataset reader and the exporter.

A reader (``karoo.dataset``) turns a selection of a capture block into an `ExportSource`; the
exporter writes it whole or as slices, possibly on ``dask.distributed`` workers, so an
`ExportSource` must pickle: its arrays are Dask arrays (or other picklable array-likes indexed by
dump) whose graphs read the chunk store, and ``meta.antenna_uvw`` must be a picklable callable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .layout import MSInput


@dataclass
class ExportSource:
    """One observation to export: metadata plus ``(T, F, B)`` array-likes indexed by dump.

    Attributes
    ----------
    meta
        The whole selection's metadata (global subtables and ids), see `MSInput`.
    vis
        complex64 visibilities in ``meta.corr_products`` order (raw, as captured).
    flags
        uint8 flag bits (or bool); any set bit flags the visibility.
    weights
        float32 weights (the real weights, not the stored uint8 codes).
    uvw
        Optional ``(T, n_baselines, 3)`` baseline uvw in metres in canonical baseline order;
        ``meta.antenna_uvw`` is used when omitted.
    corrected
        Optional calibrated visibilities for CORRECTED_DATA (same shape as `vis`); with
        ``calibrated_weights`` the weights that go with them.
    """

    meta: MSInput
    vis: Any
    flags: Any
    weights: Any
    uvw: Any = None
    corrected: Any = None
    calibrated_weights: Any = None

    @property
    def bytes_per_dump(self) -> int:
        """Bytes read from the store per dump (vis + flags + weights), for slice planning."""
        n_chans, n_corr = self.vis.shape[1:]
        per_vis = 8 + 1 + 4 + (8 if self.corrected is not None else 0)
        return int(n_chans * n_corr * per_vis)
