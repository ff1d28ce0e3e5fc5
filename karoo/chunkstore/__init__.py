"""Chunk store: Zarr v3 arrays of visibilities, flags and weights on a local directory or S3."""

from .store import (
    ARRAYS,
    DATA_LOST,
    BadChunk,
    ChunkStore,
    ChunkStoreError,
    RetryPolicy,
    StoreUnavailable,
    StreamStore,
    choose_chunks,
    chunk_info_entry,
    stream_prefix,
)

__all__ = [
    "ARRAYS", "DATA_LOST", "BadChunk", "ChunkStore", "ChunkStoreError", "RetryPolicy",
    "StoreUnavailable", "StreamStore", "choose_chunks", "chunk_info_entry", "stream_prefix",
]
