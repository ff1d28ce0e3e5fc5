"""karoo's RDB writer and reader against real Redis 7, redis-check-rdb and katsdptelstate."""

from __future__ import annotations

import io
import logging
import os
import shutil
import struct
import subprocess

import katsdptelstate
import lzf
import numpy as np
import pytest
from katsdptelstate import encode_value
from katsdptelstate.rdb_writer import RDBWriter

from karoo.telstate._crc64 import crc64
from karoo.telstate._lzf import lzf_decompress
from karoo.telstate.errors import RdbParseError
from karoo.telstate.keytypes import KeyType
from karoo.telstate.rdb import _length, _Parser, dump_rdb, load_rdb
from karoo.telstate.server import RedisServer

IMMUTABLE, MUTABLE, INDEXED = KeyType.IMMUTABLE, KeyType.MUTABLE, KeyType.INDEXED


def sensor_member(value, ts: float) -> bytes:
    return struct.pack(">d", ts) + encode_value(value)


def normalised(records) -> list:
    """What load_rdb returns for `records`: bytes keys, zset members sorted and unique."""
    return [(key, kind, sorted(set(value)) if kind == MUTABLE else value)
            for key, kind, value in records]


def telstate_records() -> list:
    """A capture-block-like mix of attributes, sensors and indexed keys, telstate-encoded."""
    rng = np.random.default_rng(1)
    return [
        (b"cbf_n_chans", IMMUTABLE, encode_value(4096)),
        (b"sdp_l0_bls_ordering", IMMUTABLE,
         encode_value(np.array([["m000h", "m001v"]] * 40))),
        (b"cb1_obs_params", IMMUTABLE, encode_value({"sb_id_code": "20240101-0001", "n": 3})),
        (b"anc_gains", IMMUTABLE, encode_value(rng.normal(size=3000) + 1j)),  # > 16 KiB
        (b"cb1_obs_activity", MUTABLE,
         [sensor_member(a, 1.7e9 + i) for i, a in enumerate(["slew", "track", "stop"])]),
        (b"m000_pos_actual_scan_azim", MUTABLE,
         [sensor_member(float(i), 1.7e9 + i) for i in range(1000)]),
        (b"cb1_cal_product_G", INDEXED, {encode_value(("m000", 0)): encode_value(1.0 + 2j)}),
        (b"cb1_chunk_info", INDEXED,
         {encode_value(i): encode_value({"prefix": f"p{i}", "shape": (i, 2)})
          for i in range(1000)}),
    ]


# ---------------------------------------------------------------------------------- primitives

def test_crc64_check_value_and_streaming():
    assert crc64(b"123456789") == 0xE9C6D914C4B8D9CA
    data = os.urandom(100_003)
    assert crc64(data[777:], crc64(data[:777])) == crc64(data)
    assert crc64(b"") == 0


@pytest.mark.parametrize("payload", [
    b"ab" * 20,
    b"telescope state " * 200,
    bytes(range(256)) * 40 + b"xyz" * 5000,
    os.urandom(3000) + bytes(70000),
])
def test_lzf_matches_python_lzf(payload):
    compressed = lzf.compress(payload) or b""
    if not compressed:
        pytest.skip("incompressible")
    buf = np.frombuffer(b"??" + compressed + b"!!", dtype=np.uint8)
    assert lzf_decompress(buf, 2, 2 + len(compressed), len(payload)) == payload
    with pytest.raises(ValueError):
        lzf_decompress(buf, 2, 2 + len(compressed), len(payload) - 1)
    with pytest.raises(ValueError):
        lzf_decompress(buf, 2, 1 + len(compressed), len(payload))


def test_length_encoding_boundaries():
    assert _length(0) == b"\x00"
    assert _length(63) == b"\x3f"
    assert _length(64) == b"\x40\x40"
    assert _length(16383) == b"\x7f\xff"
    assert _length(16384) == b"\x80\x00\x00\x40\x00"
    assert _length(2**32 - 1) == b"\x80\xff\xff\xff\xff"
    assert _length(2**32) == b"\x81" + (2**32).to_bytes(8, "big")


# ---------------------------------------------------------------------------------- round trips

def test_round_trip_all_kinds(tmp_path):
    records = [
        (b"", IMMUTABLE, b""),                          # empty key and empty value
        (b"\x00\xff\x80binary\n", IMMUTABLE, bytes(range(256))),
        (b"len63", IMMUTABLE, b"x" * 63),
        (b"len64", IMMUTABLE, b"x" * 64),
        (b"len16383", IMMUTABLE, os.urandom(16383)),
        (b"len16384", IMMUTABLE, os.urandom(16384)),
        (b"big", IMMUTABLE, os.urandom(70_000)),
        (b"k" * 20000, IMMUTABLE, b"long key"),
        (b"zset1", MUTABLE, [b""]),
        (b"zset1000", MUTABLE, [os.urandom(20) for _ in range(1000)]),
        (b"zset_dup_unsorted", MUTABLE, [b"b", b"a", b"b", b"c" * 70_000]),
        (b"hash1", INDEXED, {b"": b""}),
        (b"hash1000", INDEXED, {os.urandom(8) + b"%d" % i: b"v" * i for i in range(1000)}),
        *telstate_records(),
    ]
    path = tmp_path / "all.rdb"
    assert dump_rdb(path, records) == len(records)
    assert load_rdb(path) == normalised(records)
    # Also through file objects and bytes.
    buf = io.BytesIO()
    assert dump_rdb(buf, iter(records)) == len(records)
    assert buf.getvalue()[:9] == b"REDIS0009"
    assert load_rdb(io.BytesIO(buf.getvalue())) == normalised(records)
    assert load_rdb(buf.getvalue()) == normalised(records)
    # str keys are accepted on writing (UTF-8, as katsdptelstate does).
    assert load_rdb(dump_bytes([("ünï", IMMUTABLE, b"v")])) == [("ünï".encode(), IMMUTABLE, b"v")]


def dump_bytes(records, **kwargs) -> bytes:
    buf = io.BytesIO()
    dump_rdb(buf, records, **kwargs)
    return buf.getvalue()


def test_round_trip_10k_keys(tmp_path):
    records = []
    for i in range(10_000):
        if i % 2:
            records.append((b"attr_%05d" % i, IMMUTABLE, encode_value(i * 1.5)))
        else:
            records.append((b"sensor_%05d" % i, MUTABLE,
                            [sensor_member(j, 1e9 + j) for j in range(3)]))
    path = tmp_path / "10k.rdb"
    assert dump_rdb(path, records, aux={"karoo-test": "yes"}) == 10_000
    assert load_rdb(path) == normalised(records)


def test_writer_rejects_bad_records(tmp_path):
    with pytest.raises(TypeError, match="bytes"):
        dump_bytes([(b"k", IMMUTABLE, 1.5)])
    with pytest.raises(TypeError, match="list of members"):
        dump_bytes([(b"k", MUTABLE, b"abc")])
    with pytest.raises(ValueError, match="empty sorted set"):
        dump_bytes([(b"k", MUTABLE, [])])
    with pytest.raises(ValueError, match="empty hash"):
        dump_bytes([(b"k", INDEXED, {})])
    with pytest.raises(ValueError, match="unknown kind"):
        dump_bytes([(b"k", 7, b"")])


def test_failed_dump_leaves_nothing(tmp_path):
    target = tmp_path / "out.rdb"
    target.write_bytes(b"previous contents")

    def records():
        yield (b"ok", IMMUTABLE, b"v" * 10_000_000)  # forces a flush to the temporary file
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError, match="source failed"):
        dump_rdb(target, records())
    assert os.listdir(tmp_path) == ["out.rdb"]
    assert target.read_bytes() == b"previous contents"
    with pytest.raises(FileNotFoundError):
        dump_rdb(tmp_path / "missing" / "out.rdb", [(b"k", IMMUTABLE, b"v")])
    assert os.listdir(tmp_path) == ["out.rdb"]


# ------------------------------------------------------------------- real Redis and the anchor

def test_redis_server_loads_karoo_file(tmp_path):
    records = [*telstate_records(), (b"empty", IMMUTABLE, b""), (b"\xfe\x00", INDEXED, {b"": b""})]
    path = tmp_path / "x.rdb"
    dump_rdb(path, records)
    check = subprocess.run(["redis-check-rdb", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "Checksum OK" in check.stdout
    assert "RDB looks OK" in check.stdout
    with RedisServer(directory=tmp_path, dbfilename="x.rdb") as server:
        client = server.client()
        assert client.dbsize() == len(records)
        for key, kind, value in records:
            if kind == IMMUTABLE:
                assert client.type(key) == b"string"
                assert client.get(key) == value
            elif kind == MUTABLE:
                assert client.type(key) == b"zset"
                assert client.zrange(key, 0, -1) == sorted(value)
                assert {score for _, score in client.zrange(key, 0, -1, withscores=True)} == {0}
            else:
                assert client.type(key) == b"hash"
                assert client.hgetall(key) == value
        client.close()


def test_katsdptelstate_loads_karoo_file(tmp_path):
    records = telstate_records()
    path = tmp_path / "x.rdb"
    dump_rdb(path, records)
    ts = katsdptelstate.TelescopeState()
    assert ts.load_from_file(path) == len(records)
    assert sorted(ts.keys()) == sorted(key.decode() for key, _, _ in records)
    for key, kind, value in records:
        assert ts.key_type(key) == katsdptelstate.KeyType(kind)
        if kind == IMMUTABLE:
            assert ts.get(key, return_encoded=True) == value
        elif kind == MUTABLE:
            got = ts.get_range(key, st=0, return_encoded=True)
            assert [struct.pack(">d", t) + v for v, t in got] == sorted(value)
        else:
            for sub_key, sub_value in value.items():
                sub = katsdptelstate.decode_value(sub_key)
                assert ts.get_indexed(key, sub, return_encoded=True) == sub_value
    # Decoded values come out right too.
    assert ts["cbf_n_chans"] == 4096
    assert ts.get_range("cb1_obs_activity", st=0)[-1] == ("stop", 1.7e9 + 2)


def test_load_file_written_by_katsdptelstate(tmp_path):
    """The anchor's memory backend writes ziplists (12/13) for small keys, types 3/4 for big."""
    ts = katsdptelstate.TelescopeState()
    expected = {}
    ts["attr"] = {"a": [1, 2, 3]}
    expected[b"attr"] = (IMMUTABLE, encode_value({"a": [1, 2, 3]}))
    ts["big_attr"] = "y" * 100_000
    expected[b"big_attr"] = (IMMUTABLE, encode_value("y" * 100_000))
    for name, n in [("small_sensor", 5), ("big_sensor", 300)]:
        for i in range(n):
            ts.add(name, i * 0.5, ts=1000.0 + i)
        expected[name.encode()] = (MUTABLE, sorted(sensor_member(i * 0.5, 1000.0 + i)
                                                   for i in range(n)))
    for name, n in [("small_index", 3), ("big_index", 400)]:
        for i in range(n):
            ts.set_indexed(name, ("ant", i), f"v{i}")
        expected[name.encode()] = (INDEXED, {encode_value(("ant", i)): encode_value(f"v{i}")
                                             for i in range(n)})
    # Check that the anchor really uses the encodings this test is about.
    assert [ts.backend.dump(k)[0] for k in
            (b"small_sensor", b"big_sensor", b"small_index", b"big_index")] == [12, 3, 13, 4]
    path = tmp_path / "anchor.rdb"
    with RDBWriter(path) as writer:
        writer.save(ts)
    assert writer.keys_written == len(expected)
    loaded = load_rdb(path)
    assert {key: (kind, value) for key, kind, value in loaded} == expected


def redis7_populate(client) -> None:
    client.set("short", "abc")
    client.set("compressible", "telescope " * 1000)  # saved LZF-compressed
    client.set("random", os.urandom(5000))
    for name, text in [("i8", "-5"), ("i16", "3000"), ("i32", "-2000000000"),
                       ("i64", "9000000000"), ("i_lead0", "007")]:
        client.set(name, text)
    client.set("expiring", encode_value(1.0), ex=100_000)
    client.set("expiring_ms", encode_value(2.0), px=100_000_000)
    client.zadd("zset_listpack", {sensor_member(i, 1e9 + i): 0 for i in range(5)})
    client.zadd("zset_ints", {"123": 0, "-70000": 0, "5": 0, "1099511627776": 0, "x": 0})
    client.zadd("zset_skiplist", {sensor_member(i, 1e9 + i): 0 for i in range(300)})
    client.zadd("zset_scored", {"a": 1.5, "b": -3, "c": float("inf")})
    client.zadd("zset_scored_big", {b"m%d" % i: i for i in range(200)})
    client.hset("hash_listpack", mapping={"f1": "v1", "12": "-3", "big": "4000000000",
                                          "neg13": "-4000", "i24": "8000000"})
    client.hset("hash_table", mapping={encode_value(i): encode_value(str(i)) for i in range(600)})
    client.hset("hash_long_value", mapping={"f": "v" * 1000})
    client.execute_command("EXPIRE", "hash_listpack", 100_000)


def redis7_expected(client) -> list:
    records = []
    for key in sorted(client.keys()):
        kind = client.type(key)
        if kind == b"string":
            records.append((key, IMMUTABLE, client.get(key)))
        elif kind == b"zset":
            records.append((key, MUTABLE, sorted(client.zrange(key, 0, -1))))
        elif kind == b"hash":
            records.append((key, INDEXED, client.hgetall(key)))
    return records


def test_load_redis7_saved_file(tmp_path, caplog):
    with RedisServer(directory=tmp_path, dbfilename="saved.rdb") as server:
        client = server.client()
        redis7_populate(client)
        # A function library adds a FUNCTION2 opcode to the file.
        client.execute_command(
            "FUNCTION", "LOAD",
            "#!lua name=karoolib\nredis.register_function('karoo_f', function() return 1 end)")
        encodings = {k.decode(): client.object("encoding", k).decode() for k in client.keys("*")}
        expected = redis7_expected(client)
        client.save()
        client.close()
    assert encodings["zset_listpack"] == "listpack"
    assert encodings["zset_skiplist"] == "skiplist"
    assert encodings["hash_listpack"] == "listpack"
    assert encodings["hash_table"] == "hashtable"
    assert encodings["i16"] == "int"
    path = tmp_path / "saved.rdb"
    data = path.read_bytes()
    assert data[:9] == b"REDIS0010"
    assert len(data) < 40_000  # the 10 kB compressible string went in compressed
    with caplog.at_level(logging.WARNING, logger="karoo.telstate.rdb"):
        loaded = load_rdb(path)
    assert sorted(loaded) == sorted(expected)
    assert "zset_scored" in caplog.text  # non-zero scores are reported, members kept
    # The anchor cannot read what Redis 7 saves.
    with pytest.raises(katsdptelstate.RdbParseError):
        katsdptelstate.TelescopeState().load_from_file(path)


def test_redis7_unsupported_types(tmp_path, caplog):
    with RedisServer(directory=tmp_path, dbfilename="saved.rdb") as server:
        client = server.client()
        client.set("attr", encode_value(1))
        client.rpush("a_list", *[b"item%d" % i for i in range(10)])
        client.sadd("a_set", 1, 2, 3)
        client.sadd("a_str_set", *[b"s" * 70 + b"%d" % i for i in range(200)])
        client.xadd("a_stream", {"f": "v"})
        client.xgroup_create("a_stream", "group", id="0")
        client.xreadgroup("group", "consumer", {"a_stream": ">"})
        client.hset("hash", "f", "v")
        client.save()
        client.close()
    path = tmp_path / "saved.rdb"
    with pytest.raises(RdbParseError, match=r"a_(list|set|str_set|stream).*offset"):
        load_rdb(path)
    with caplog.at_level(logging.WARNING, logger="karoo.telstate.rdb"):
        loaded = load_rdb(path, skip_unsupported=True)
    assert sorted(loaded) == [(b"attr", IMMUTABLE, encode_value(1)),
                              (b"hash", INDEXED, {b"f": b"v"})]
    for name in ["a_list", "a_set", "a_str_set", "a_stream"]:
        assert name in caplog.text


@pytest.mark.skipif(shutil.which("redis-check-rdb") is None, reason="needs redis-check-rdb")
def test_redis_check_rdb_rejects_flipped_byte(tmp_path):
    """Our CRC is the one Redis checks: flipping a byte makes both tools complain."""
    path = tmp_path / "x.rdb"
    dump_rdb(path, telstate_records())
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(data)
    check = subprocess.run(["redis-check-rdb", str(path)], capture_output=True, text=True)
    assert check.returncode != 0
    with pytest.raises(RdbParseError, match="checksum mismatch"):
        load_rdb(path)


# ---------------------------------------------------------------------------------- hand-made

def rdb_string(data: bytes) -> bytes:
    return _length(len(data)) + data


def handmade(body: bytes, version: int = 9, checksum: bool = True) -> bytes:
    data = b"REDIS%04d" % version + b"\xfe\x00" + body + b"\xff"
    if version >= 5:
        data += crc64(data).to_bytes(8, "little") if checksum else bytes(8)
    return data


def test_old_encodings_and_opcodes():
    zipmap = (b"\x02" + b"\x01a" + b"\x02\x01xy?" + b"\x02bb" + b"\x00\x00" + b"\xff")
    body = b"".join([
        b"\xfa" + rdb_string(b"redis-ver") + rdb_string(b"2.4.0"),
        b"\xfb\x05\x01",
        b"\xfd" + struct.pack("<I", 1_000),                       # long expired: still kept
        b"\x00" + rdb_string(b"expired") + rdb_string(b"v"),
        b"\xfc" + struct.pack("<Q", 1_000_000),
        b"\xf8\x05\xf9\x03",                                      # IDLE, FREQ
        b"\x00" + rdb_string(b"k64") + b"\x81" + (3).to_bytes(8, "big") + b"abc",
        b"\x00" + rdb_string(b"k32") + b"\x80" + (3).to_bytes(4, "big") + b"def",
        b"\x00" + rdb_string(b"int8") + b"\xc0\xfb",
        b"\x00" + rdb_string(b"int16") + b"\xc1" + struct.pack("<h", -1234),
        b"\x00" + rdb_string(b"int32") + b"\xc2" + struct.pack("<i", 123456789),
        b"\x09" + rdb_string(b"zipmap") + rdb_string(zipmap),
        b"\x03" + rdb_string(b"zset_v1") + b"\x03"
        + rdb_string(b"m1") + b"\x010" + rdb_string(b"m0") + b"\x030.0"
        + rdb_string(b"m2") + b"\xfe",                            # +inf score
        b"\xf4\x01\x02\x00",                                      # SLOT_INFO
        b"\xf7" + b"\x81" + (12345).to_bytes(8, "big") + b"\x02\x00"
        + b"\x02\x07" + b"\x05" + rdb_string(b"blob") + b"\x04" + bytes(8) + b"\x00",
        b"\xf5" + rdb_string(b"#!lua name=lib\n..."),             # FUNCTION2
        b"\xfe\x03",
        b"\x00" + rdb_string(b"in_db3") + rdb_string(b"x"),
    ])
    loaded = load_rdb(handmade(body))
    assert loaded == [
        (b"expired", IMMUTABLE, b"v"),
        (b"k64", IMMUTABLE, b"abc"),
        (b"k32", IMMUTABLE, b"def"),
        (b"int8", IMMUTABLE, b"-5"),
        (b"int16", IMMUTABLE, b"-1234"),
        (b"int32", IMMUTABLE, b"123456789"),
        (b"zipmap", INDEXED, {b"a": b"xy", b"bb": b""}),
        (b"zset_v1", MUTABLE, [b"m0", b"m1", b"m2"]),
        (b"in_db3", IMMUTABLE, b"x"),
    ]
    assert [r[0] for r in load_rdb(handmade(body), db=3)] == [b"in_db3"]
    # Old versions without checksum, and files with the checksum disabled.
    assert load_rdb(handmade(b"\x00" + rdb_string(b"a") + rdb_string(b"b"), version=3)) == [
        (b"a", IMMUTABLE, b"b")]
    assert load_rdb(handmade(b"\x00\x01a\x01b", checksum=False)) == [(b"a", IMMUTABLE, b"b")]


def test_duplicate_keys_rejected():
    record = b"\x00" + rdb_string(b"a") + rdb_string(b"b")
    with pytest.raises(RdbParseError, match="appears twice"):
        load_rdb(handmade(record + record))
    with pytest.raises(RdbParseError, match="databases 0 and 1"):
        load_rdb(handmade(record + b"\xfe\x01" + record))
    assert len(load_rdb(handmade(record + b"\xfe\x01" + record), db=1)) == 1
    dup_hash = b"\x04" + rdb_string(b"h") + b"\x02" + rdb_string(b"f") * 4
    with pytest.raises(RdbParseError, match="repeats a field"):
        load_rdb(handmade(dup_hash))


# ---------------------------------------------------------------------------------- corruption

@pytest.fixture(scope="module")
def good_file() -> bytes:
    records = [
        (b"attr", IMMUTABLE, encode_value("some value")),
        (b"big", IMMUTABLE, os.urandom(20_000)),
        (b"sensor", MUTABLE, [sensor_member(i, 1e9 + i) for i in range(4)]),
        (b"index", INDEXED, {encode_value(i): encode_value(i) for i in range(3)}),
    ]
    return dump_bytes(records)


def test_truncated_everywhere(good_file, tmp_path):
    stops = list(range(0, 400)) + list(range(400, len(good_file), 97)) + [len(good_file) - 1]
    for stop in stops:
        with pytest.raises(RdbParseError, match="offset") as info:
            load_rdb(good_file[:stop])
        assert not isinstance(info.value.__cause__, IndexError | struct.error)
    path = tmp_path / "cut.rdb"
    path.write_bytes(good_file[:200])
    with pytest.raises(RdbParseError, match=r"cut\.rdb.*truncated.*offset"):
        load_rdb(path)


def test_flipped_bytes_fail_checksum(good_file):
    rng = np.random.default_rng(7)
    for offset in rng.integers(9, len(good_file) - 9, size=200):
        corrupt = bytearray(good_file)
        corrupt[offset] ^= 1 << int(rng.integers(8))
        with pytest.raises(RdbParseError, match="offset"):
            load_rdb(bytes(corrupt))


def test_bad_headers_and_types(good_file):
    with pytest.raises(RdbParseError, match=r"magic.*offset 0"):
        load_rdb(b"RUDIS0009" + good_file[9:])
    with pytest.raises(RdbParseError, match="unsupported RDB version 13"):
        load_rdb(b"REDIS0013" + good_file[9:])
    with pytest.raises(RdbParseError, match="version"):
        load_rdb(b"REDIS00x9" + good_file[9:])
    with pytest.raises(RdbParseError, match=r"unknown object type 30 \(at byte offset 11\)"):
        load_rdb(handmade(b"\x1e" + rdb_string(b"k") + rdb_string(b"v")))
    with pytest.raises(RdbParseError, match="opcode 0xf6"):
        load_rdb(handmade(b"\xf6" + rdb_string(b"x")))
    with pytest.raises(RdbParseError, match="unknown string encoding"):
        load_rdb(handmade(b"\x00" + rdb_string(b"k") + b"\xc5"))
    with pytest.raises(RdbParseError, match="unexpected bytes after the end"):
        load_rdb(good_file + b"\x00")
    bad_ziplist = b"\x0c" + rdb_string(b"z") + rdb_string(b"\x0b\x00\x00\x00" + bytes(7))
    with pytest.raises(RdbParseError, match="ziplist"):
        load_rdb(handmade(bad_ziplist))
    with pytest.raises(RdbParseError, match="LZF"):
        load_rdb(handmade(b"\x00" + rdb_string(b"k") + b"\xc3\x05\x0a" + b"\xff" * 5))
    with pytest.raises(TypeError):
        load_rdb(12345)


# ---------------------------------------------------------------------- fast and full parsers

def both_parsers(data: bytes):
    """Results of the numba fast path (None if it gave up) and of the full Python parser."""
    fast = _Parser(data, None, False)
    fast.header()
    full = _Parser(data, None, False)
    full.header()
    return fast.parse_fast(None), full.parse_records(None)


def test_fast_path_agrees_with_full_parser(tmp_path):
    # Tiny records overflow the initial tables, exercising the resume-after-growth path.
    tiny = [(b"%d" % i, IMMUTABLE, b"") for i in range(3000)]
    for records in (telstate_records(), tiny):
        fast, full = both_parsers(dump_bytes(records))
        assert fast is not None
        assert fast == full
        assert fast[0] == normalised(records)
    # The anchor's ziplists and type-3 zsets.
    ts = katsdptelstate.TelescopeState()
    for i in range(100):
        ts.add("big_sensor", i, ts=float(i))
        ts.add(f"sensor{i}", "on", ts=1.0)
        ts.set_indexed(f"index{i}", i, "x")
    path = tmp_path / "anchor.rdb"
    with RDBWriter(path) as writer:
        writer.save(ts)
    fast, full = both_parsers(path.read_bytes())
    assert fast is not None
    assert fast == full
    # Redis-saved files (LZF, int-encoded strings) need the full parser.
    with RedisServer(directory=tmp_path, dbfilename="saved.rdb") as server:
        client = server.client()
        redis7_populate(client)
        client.save()
        client.close()
    fast, full = both_parsers((tmp_path / "saved.rdb").read_bytes())
    assert fast is None
    assert full[0]


def test_load_rdbwriter_dump_of_redis7(tmp_path):
    """katsdptelstate's RDBWriter on a Redis 7 server writes listpacks it cannot read back."""
    with RedisServer(directory=tmp_path) as server:
        ts = katsdptelstate.TelescopeState(server.url)
        ts["attr"] = "value"
        for i in range(5):
            ts.add("sensor", i, ts=100.0 + i)
        ts.set_indexed("index", "sub", 1)
        path = tmp_path / "from_redis7.rdb"
        with RDBWriter(path) as writer:
            writer.save(ts)
        expected = redis7_expected(server.client())
    loaded = load_rdb(path)
    assert sorted(loaded) == sorted(expected)
    assert b"\xc3" in path.read_bytes()  # Redis compressed the sensor's listpack with LZF
    with pytest.raises(katsdptelstate.RdbParseError):
        katsdptelstate.TelescopeState().load_from_file(path)
