"""katsdptelstate (the anchor, test-only) and karoo share a Redis server and read each other."""

import threading
import time

import katsdptelstate
import numpy as np
import pytest

from karoo.telstate import KeyType, TelescopeState

VALUES = {
    "int": 3, "float": 2.5, "str": "abc", "bytes": b"\x01\x02", "none": None, "bool": False,
    "tuple": (1, (2, "x")), "list": [1.5, "y"], "complex": 1 + 2j, "f32": np.float32(0.25),
    "u8": np.uint8(7), "array": np.arange(12, dtype=np.int16).reshape(3, 4),
    "bls": np.array([["m000h", "m000h"], ["m000h", "m001v"]]),
    "dict": {"ants": ["m000", "m001"], "n": 2},
}


def _same(a, b):
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return a == b and type(a) is type(b)


@pytest.fixture
def both(redis_url):
    ours = TelescopeState(redis_url)
    theirs = katsdptelstate.TelescopeState(redis_url)
    yield ours, theirs
    ours.close()


@pytest.mark.parametrize("direction", ["karoo->anchor", "anchor->karoo"])
def test_values_sensors_indexed_cross_read(both, direction):
    writer, reader = both if direction == "karoo->anchor" else both[::-1]
    cb = writer.view("cb")
    for key, value in VALUES.items():
        cb[key] = value
    for t in range(20):
        writer.add("activity", "track" if t % 2 else "slew", ts=1000.0 + t)
        writer.add("elev", 45.0 + t, ts=1000.0 + t)
    writer.set_indexed("products", ("m000", "h"), np.ones(3))
    writer.set_indexed("products", "B0", {"x": 1})

    view = reader.view("cb")
    for key, value in VALUES.items():
        assert _same(view[key], value), key
        assert view.get(key, return_encoded=True) == writer.view("cb").get(
            key, return_encoded=True
        )
    assert reader["activity"] == "track"
    assert reader.get_range("elev", 1005.0, 1008.0) == [(45.0 + t, 1000.0 + t) for t in (5, 6, 7)]
    assert reader.get_range("activity", st=0) == writer.get_range("activity", st=0)
    assert reader.get_range("elev", et=1003.5) == [(48.0, 1003.0)]
    np.testing.assert_array_equal(reader.get_indexed("products", ("m000", "h")), np.ones(3))
    assert reader["products"]["B0"] == {"x": 1}
    assert reader.key_type("elev").value == KeyType.MUTABLE.value
    assert sorted(reader.keys()) == sorted(writer.keys())


def test_immutable_conflicts_are_seen_across_clients(both):
    ours, theirs = both
    theirs["x"] = 1
    ours["x"] = 1
    with pytest.raises(katsdptelstate.ImmutableKeyError):
        theirs["x"] = 2
    from karoo.telstate import ImmutableKeyError

    with pytest.raises(ImmutableKeyError):
        ours["x"] = 2.0


@pytest.mark.parametrize("kind", ["attribute", "sensor", "indexed"])
@pytest.mark.parametrize("direction", ["karoo wakes anchor", "anchor wakes karoo"])
def test_wait_key_notifications_interoperate(both, kind, direction):
    ours, theirs = both
    writer, waiter = (ours, theirs) if direction == "karoo wakes anchor" else (theirs, ours)

    def write():
        time.sleep(0.2)
        if kind == "attribute":
            writer["k"] = "done"
        elif kind == "sensor":
            writer.add("k", "done", ts=time.time())
        else:
            writer.set_indexed("k", "sub", "done")

    thread = threading.Thread(target=write)
    thread.start()
    if kind == "indexed":
        waiter.wait_indexed("k", "sub", lambda v: v == "done", timeout=10)
    else:
        waiter.wait_key("k", lambda v, _: v == "done", timeout=10)
    thread.join()
