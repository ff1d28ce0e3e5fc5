"""Fixtures shared by the whole suite: the real servers the tests talk to."""

import pytest

from karoo.telstate.server import RedisServer


@pytest.fixture(scope="session")
def redis_server():
    """One real redis-server on a free loopback port for the whole session."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server):
    """URL of the session's Redis server, flushed before each test."""
    client = redis_server.client()
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def s3_server():
    """One real S3 server (Ceph RADOS Gateway, see docs/s3-server.md) for the whole session.

    Skipped, with the reason, where Ceph is not installed (``scripts/test`` installs it as root).
    """
    from karoo.chunkstore.s3server import S3Server, ceph_available

    if not ceph_available():
        pytest.skip("Ceph RGW not installed: apt-get install ceph-mon ceph-osd radosgw ceph-common")
    with S3Server() as server:
        yield server
