import pytest
import redis

from karoo.telstate.server import RedisServer


def test_redis_server_starts_and_stops(tmp_path):
    server = RedisServer(directory=tmp_path)
    client = server.client()
    assert client.ping()
    client.set("k", "v")
    assert client.get("k") == b"v"
    server.stop()
    with pytest.raises(redis.ConnectionError):
        client.ping()
