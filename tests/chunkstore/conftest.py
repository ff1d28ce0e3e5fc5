"""Fixtures for the chunk store tests: the same tests on a local directory and on real S3."""

import itertools

import pytest

from karoo.chunkstore import ChunkStore

_ids = itertools.count()


@pytest.fixture(params=["local", "s3"])
def make_store(request, tmp_path):
    """A factory of :class:`ChunkStore` objects on a local directory or on the S3 server."""
    if request.param == "local":
        return lambda **kwargs: ChunkStore(tmp_path / "store", **kwargs)
    server = request.getfixturevalue("s3_server")
    if not server._running("rgw"):
        server.start_gateway()
    return lambda **kwargs: ChunkStore(
        "s3://", endpoint_url=server.endpoint_url, access_key=server.access_key,
        secret_key=server.secret_key, **kwargs,
    )


@pytest.fixture
def cbid():
    """A capture block ID not used before in this session (buckets outlive tests)."""
    return f"17000000{next(_ids):02d}"
