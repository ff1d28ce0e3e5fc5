"""Every telescope state operation, on the memory and Redis backends, sync and asyncio."""

import threading
import time

import numpy as np
import pytest

from karoo.telstate import (
    DecodeError,
    ImmutableKeyError,
    InvalidTimestampError,
    KeyType,
    TimeoutError,
    encode_value,
)


def test_attribute_set_get(ts):
    ts["n_chans"] = 4096
    assert ts["n_chans"] == 4096
    assert ts.get("n_chans") == 4096
    assert ts.get("missing", "dflt") == "dflt"
    with pytest.raises(KeyError):
        ts["missing"]
    assert ts.get("n_chans", return_encoded=True) == encode_value(4096)
    assert ts.key_type("n_chans") == KeyType.IMMUTABLE
    assert ts.is_immutable("n_chans")
    assert ts.key_type("missing") is None


def test_attribute_is_write_once(ts):
    ts["x"] = {"a": 1, "b": (2, 3)}
    ts["x"] = {"a": 1, "b": (2, 3)}  # identical bytes: allowed
    with pytest.raises(ImmutableKeyError, match="immutable key x"):
        ts["x"] = {"b": (2, 3), "a": 1}  # same dict, other bytes: a change
    ts["s"] = "abc"
    ts["s"] = b"abc"  # str and bytes of the same text are equal
    ts["one"] = 1
    with pytest.raises(ImmutableKeyError):
        ts["one"] = 1.0
    assert ts["one"] == 1 and ts["x"] == {"a": 1, "b": (2, 3)}


def test_values_roundtrip(ts):
    values = {
        "int": -7, "float": 1.5, "str": "ü", "bytes": b"\x00\xff", "none": None, "bool": True,
        "tuple": (1, "a"), "list": [1, [2, 3]], "complex": 1 - 2j, "f32": np.float32(1.5),
        "i64": np.int64(7), "c64": np.complex64(1 + 1j), "array": np.arange(6.0).reshape(2, 3),
        "dict": {"k": [1, 2], "n": {"m": None}}, "bigint": 2**63,
    }
    for key, value in values.items():
        ts[key] = value
    for key, value in values.items():
        got = ts[key]
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(got, value)
            assert got.dtype == value.dtype
        else:
            assert got == value and type(got) is type(value), key


def test_sensor_add_and_latest(ts):
    ts.add("activity", "slew", ts=10.0)
    ts.add("activity", "track", ts=20.0)
    ts.add("activity", "scan", ts=15.0)  # out of order is fine
    assert ts["activity"] == "track"
    assert ts.key_type("activity") == KeyType.MUTABLE
    assert not ts.is_immutable("activity")
    before = time.time()
    ts.add("now", 1)
    (_, stamp), = ts.get_range("now")
    assert before <= stamp <= time.time()


def test_sensor_duplicates_and_ties(ts):
    ts.add("s", 5, ts=10.0)
    ts.add("s", 5, ts=10.0)
    ts.add("s", 6, ts=10.0)
    assert ts.get_range("s", st=0) == [(5, 10.0), (6, 10.0)]
    assert ts["s"] == 6


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_sensor_bad_timestamp(ts, bad):
    with pytest.raises(InvalidTimestampError):
        ts.add("s", 1, ts=bad)


def test_get_range_semantics(ts):
    for t in range(10):
        ts.add("sens", float(t), ts=float(t))
    assert ts.get_range("sens") == [(9.0, 9.0)]
    assert ts.get_range("sens", st=0) == [(float(t), float(t)) for t in range(10)]
    assert ts.get_range("sens", et=4.5) == [(4.0, 4.0)]
    assert ts.get_range("sens", 3, 6) == [(3.0, 3.0), (4.0, 4.0), (5.0, 5.0)]
    assert ts.get_range("sens", 3, 6, include_end=True)[-1] == (6.0, 6.0)
    assert ts.get_range("sens", 3.5, 6, include_previous=True)[0] == (3.0, 3.0)
    assert ts.get_range("sens", 0, 0, include_end=True) == [(0.0, 0.0)]
    assert ts.get_range("sens", 20, 30) == []
    assert ts.get_range("sens", 20, 30, include_previous=True) == [(9.0, 9.0)]
    assert ts.get_range("sens", 3, 6, return_encoded=True)[0] == (encode_value(3.0), 3.0)
    with pytest.raises(KeyError):
        ts.get_range("nosens")
    with pytest.raises(InvalidTimestampError):
        ts.get_range("sens", float("nan"))


def test_get_range_many_float_samples(ts):
    """Float sensors take the vectorised decode path; it must agree with the general one."""
    stamps = 1.7e9 + np.arange(5000) * 0.5
    ts.add_many(("f", float(v), t) for v, t in zip(stamps * 2, stamps, strict=True))
    got = ts.get_range("f", stamps[100], stamps[3700])
    assert len(got) == 3600
    assert got[0] == (stamps[100] * 2, stamps[100])
    assert all(type(v) is float for v, _ in got[:10])
    ts.add("mixed", 1, ts=1.0)
    ts.add_many(("mixed", float(i), 2.0 + i) for i in range(100))
    assert ts.get_range("mixed", st=0)[:2] == [(1, 1.0), (0.0, 2.0)]


def test_get_range_on_attribute_fails(ts):
    ts["attr"] = 1
    with pytest.raises(ImmutableKeyError):
        ts.get_range("attr")


def test_wrong_kind_writes(ts):
    ts["attr"] = 1
    ts.add("sens", 1, ts=1.0)
    with pytest.raises(ImmutableKeyError, match="to mutable"):
        ts.add("attr", 2, ts=2.0)
    with pytest.raises(ImmutableKeyError, match="to immutable"):
        ts["sens"] = 2
    with pytest.raises(ImmutableKeyError, match="to indexed"):
        ts.set_indexed("sens", "k", 1)
    assert ts["attr"] == 1 and ts.get_range("sens", st=0) == [(1, 1.0)]


def test_indexed(ts):
    ts.set_indexed("idx", "a", 1)
    ts.set_indexed("idx", ("t", 2), [1, 2])
    ts.set_indexed("idx", "a", 1)
    with pytest.raises(ImmutableKeyError):
        ts.set_indexed("idx", "a", 2)
    assert ts.get_indexed("idx", "a") == 1
    assert ts.get_indexed("idx", ("t", 2)) == [1, 2]
    assert ts.get_indexed("idx", "zz", "d") == "d"
    assert ts.get_indexed("noidx", "a", "d") == "d"
    assert ts["idx"] == {"a": 1, ("t", 2): [1, 2]}
    assert ts.key_type("idx") == KeyType.INDEXED
    assert ts.get_indexed("idx", "a", return_encoded=True) == encode_value(1)


def test_views_read_through_prefixes_and_write_to_first(ts):
    ts["shared"] = "root"
    ts["both"] = "root"
    cb = ts.view("cb")
    stream = cb.view("cb_sdp_l0", add_separator=False)
    assert cb.prefixes == ("cb_", "")
    assert stream.prefixes == ("cb_sdp_l0", "cb_", "")
    cb["both"] = "cb"
    assert cb["both"] == "cb" and ts["both"] == "root"
    assert cb["shared"] == "root"
    assert "shared" in cb and "nothing" not in cb
    assert ts.view("q", exclusive=True).prefixes == ("q_",)
    assert ts.view("q_").prefixes == ("q_", "")
    assert ts.view("q_", exclusive=True).get("shared") is None
    assert cb.root().prefixes == ("",)
    assert ts.join("cb", "sdp_l0", "n_chans") == "cb_sdp_l0_n_chans"
    cb.add("act", "track", ts=1.0)
    assert ts["cb_act"] == "track" and cb.get_range("act", st=0) == [("track", 1.0)]
    cb.set_indexed("ix", 1, 2)
    assert cb.get_indexed("ix", 1) == 2 and ts.get_indexed("cb_ix", 1) == 2
    assert cb.key_type("shared") == KeyType.IMMUTABLE


def test_keys_delete_clear(ts):
    for name in ["b", "a", "cb_x", "cb_y", "c*d"]:
        ts[name] = 1
    assert ts.keys() == ["a", "b", "c*d", "cb_x", "cb_y"]
    assert ts.keys("cb_*") == ["cb_x", "cb_y"]
    assert ts.keys("?") == ["a", "b"]
    assert ts.keys("c\\*d") == ["c*d"]
    ts.view("cb")["a"] = 2
    ts.view("cb").delete("a")  # under every prefix of the view
    assert "a" not in ts and "cb_a" not in ts
    ts.clear()
    assert ts.keys() == []


def test_get_many(ts):
    ts["a"] = 1
    ts.add("s", "x", ts=1.0)
    ts.set_indexed("i", "k", "v")
    cb = ts.view("cb")
    cb["a"] = 2
    assert cb.get_many(["a", "s", "i", "missing"], default=0) == {
        "a": 2, "s": "x", "i": {"k": "v"}, "missing": 0,
    }
    assert ts.get_many([]) == {}


def test_add_many(ts):
    ts.add_many([("s1", 1.0, 1.0), ("s2", "two", 2.0), ("s1", 3.0, 3.0), ("s1", 3.0, 3.0)])
    assert ts.get_range("s1", st=0) == [(1.0, 1.0), (3.0, 3.0)]
    assert ts["s2"] == "two"
    ts["attr"] = 0
    with pytest.raises(ImmutableKeyError, match="no sample was added"):
        ts.add_many([("s3", 1.0, 1.0), ("attr", 1.0, 1.0)])
    assert "s3" not in ts
    with pytest.raises(InvalidTimestampError):
        ts.add_many([("s3", 1.0, -1.0)])
    ts.add_many([])


def test_wait_key_existing_and_condition(ts):
    ts.add("s", 1, ts=1.0)
    ts.wait_key("s", timeout=1)
    ts.wait_key("s", lambda value, stamp: value == 1 and stamp == 1.0, timeout=1)
    with pytest.raises(TimeoutError):
        ts.wait_key("s", lambda value, stamp: value == 2, timeout=0.2)
    with pytest.raises(TimeoutError):
        ts.wait_key("absent", timeout=0)


@pytest.mark.parametrize("kind", ["attribute", "sensor", "indexed"])
def test_wait_key_woken_by_writer(ts, kind):
    def write():
        time.sleep(0.1)
        writer = ts.view("cb")
        if kind == "attribute":
            writer["k"] = "done"
        elif kind == "sensor":
            for value in ["a", "b", "done"]:
                writer.add("k", value, ts=time.time())
        else:
            writer.set_indexed("k", "sub", "done")

    thread = threading.Thread(target=write)
    start = time.monotonic()
    thread.start()
    cb = ts.view("cb")
    if kind == "indexed":
        cb.wait_indexed("k", "sub", lambda value: value == "done", timeout=10)
    else:
        cb.wait_key("k", lambda value, _: value == "done", timeout=10)
    thread.join()
    # Woken by the notification, not by a once-a-second poll.
    assert time.monotonic() - start < 0.9


def test_wait_indexed_existing_and_timeout(ts):
    ts.set_indexed("k", 1, "x")
    ts.wait_indexed("k", 1, timeout=1)
    with pytest.raises(TimeoutError):
        ts.wait_indexed("k", 2, timeout=0.1)


def test_undecodable_values(ts, redis_server):
    backend = ts.backend
    # Write raw bytes straight into the backend, as a buggy or hostile peer could.
    if hasattr(backend, "client"):
        client = redis_server.client()
        client.set("bad", b"\xfe123")
        client.set("pickled", b"\x80\x02K\x01.")
        client.set("empty", b"")
    else:
        backend.set_immutable(b"bad", b"\xfe123")
        backend.set_immutable(b"pickled", b"\x80\x02K\x01.")
        backend.set_immutable(b"empty", b"")
    with pytest.raises(DecodeError, match="header byte"):
        ts["bad"]
    with pytest.raises(DecodeError, match="pickle"):
        ts["pickled"]
    with pytest.raises(DecodeError, match="empty"):
        ts["empty"]
    assert ts.get("bad", return_encoded=True) == b"\xfe123"
