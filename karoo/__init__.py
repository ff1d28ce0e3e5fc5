"""karoo: the science data processing core of a radio interferometer."""

__version__ = "0.1.0"


def open(source, chunk_store=None, **options):
    """Open a capture-block stream for reading; see :func:`karoo.dataset.open`."""
    # Imported here so that ``import karoo`` stays light (no dask, zarr or casacore).
    from .dataset import open as _open

    return _open(source, chunk_store, **options)
