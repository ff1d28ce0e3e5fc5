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
