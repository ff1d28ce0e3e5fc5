"""Redis RDB files of telstate keys: karoo's own writer and reader, free of any Redis server.

The writer emits the most portable dialect: header ``REDIS0009``, ``SELECTDB 0``, plain strings
(type 0), sorted sets as ``zset2`` (type 5, binary double scores, all 0) and hashes as type 4,
then ``EOF`` and the real CRC-64. Redis 5-7.x servers, ``redis-check-rdb`` and katsdptelstate
(via rdbtools, which only knows versions 1-9 and no listpacks) all load it.

The reader accepts what Redis 2.x-7.4 and katsdptelstate write: RDB versions 1-12, strings that
are plain, int-encoded or LZF-compressed, zsets as types 3/5/12 (ziplist)/17 (listpack), hashes
as types 4/9 (zipmap)/13 (ziplist)/16 (listpack), and the AUX, RESIZEDB, EXPIRETIME(_MS), IDLE,
FREQ, MODULE_AUX, FUNCTION2 and SLOT_INFO opcodes. Anything it does not understand, or that is
truncated or corrupt, raises :class:`~karoo.telstate.errors.RdbParseError` with the byte offset.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import secrets
import struct
from collections.abc import Iterable, Mapping
from typing import BinaryIO

import numpy as np

from . import _rdbscan
from ._crc64 import crc64
from ._lzf import lzf_decompress
from .errors import RdbParseError
from .keytypes import KeyType

logger = logging.getLogger(__name__)

Record = tuple[bytes, KeyType, bytes | list[bytes] | dict[bytes, bytes]]

#: RDB version of the files :func:`dump_rdb` writes (Redis 5.0-6.2; the newest rdbtools reads).
WRITE_VERSION = 9
#: Newest RDB version :func:`load_rdb` reads (Redis 7.4).
MAX_READ_VERSION = 12

# Opcodes
_OP_SLOT_INFO = 0xF4
_OP_FUNCTION2 = 0xF5
_OP_FUNCTION_PRE_GA = 0xF6
_OP_MODULE_AUX = 0xF7
_OP_IDLE = 0xF8
_OP_FREQ = 0xF9
_OP_AUX = 0xFA
_OP_RESIZEDB = 0xFB
_OP_EXPIRETIME_MS = 0xFC
_OP_EXPIRETIME = 0xFD
_OP_SELECTDB = 0xFE
_OP_EOF = 0xFF

# Object types
_T_STRING = 0
_T_LIST = 1
_T_SET = 2
_T_ZSET = 3
_T_HASH = 4
_T_ZSET2 = 5
_T_MODULE = 6
_T_MODULE2 = 7
_T_HASH_ZIPMAP = 9
_T_LIST_ZIPLIST = 10
_T_SET_INTSET = 11
_T_ZSET_ZIPLIST = 12
_T_HASH_ZIPLIST = 13
_T_LIST_QUICKLIST = 14
_T_STREAM = 15
_T_HASH_LISTPACK = 16
_T_ZSET_LISTPACK = 17
_T_LIST_QUICKLIST2 = 18
_T_STREAM2 = 19
_T_SET_LISTPACK = 20
_T_STREAM3 = 21

_TYPE_NAMES = {
    _T_LIST: "list", _T_SET: "set", _T_MODULE: "module (v1)", _T_MODULE2: "module",
    _T_LIST_ZIPLIST: "list (ziplist)", _T_SET_INTSET: "set (intset)",
    _T_LIST_QUICKLIST: "list (quicklist)", _T_STREAM: "stream", _T_LIST_QUICKLIST2:
    "list (quicklist v2)", _T_STREAM2: "stream (v2)", _T_SET_LISTPACK: "set (listpack)",
    _T_STREAM3: "stream (v3)", 22: "hash with field expiry (pre-GA)",
    23: "hash listpack with field expiry (pre-GA)", 24: "hash with field expiry",
    25: "hash listpack with field expiry",
}

_KNOWN_TYPES = frozenset(
    {_T_STRING, _T_ZSET, _T_HASH, _T_ZSET2, _T_HASH_ZIPMAP, _T_ZSET_ZIPLIST, _T_HASH_ZIPLIST,
     _T_HASH_LISTPACK, _T_ZSET_LISTPACK} | set(_TYPE_NAMES))
_FAST_ZSET_TYPES = frozenset({_T_ZSET, _T_ZSET2, _T_ZSET_ZIPLIST, _T_ZSET_LISTPACK})
_ZERO_SCORE = bytes(8)
_NEG_ZERO_SCORE = struct.pack("<d", -0.0)
_SMALL_LENGTHS = [bytes([n]) for n in range(64)]
_SMALL_INTS = [b"%d" % n for n in range(128)]
_FLUSH_SIZE = 1 << 22


# --------------------------------------------------------------------------------------- writer

def _length(n: int) -> bytes:
    """RDB length encoding of `n`."""
    if n < 64:
        return _SMALL_LENGTHS[n]
    if n < 16384:
        return (0x4000 | n).to_bytes(2, "big")
    if n <= 0xFFFFFFFF:
        return b"\x80" + n.to_bytes(4, "big")
    return b"\x81" + n.to_bytes(8, "big")


def _as_bytes(value, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        # The anchor's convention for str keys: UTF-8 that round-trips any str.
        return value.encode("utf-8", errors="surrogateescape")
    raise TypeError(f"{what} must be bytes, not {type(value).__name__}")


def _encode_record(out: bytearray, key, kind, value) -> None:
    """Append one key (type byte, name, body) to `out`."""
    key = _as_bytes(key, "key")
    if kind == KeyType.IMMUTABLE:
        value = _as_bytes(value, f"value of {key!r}")
        out += b"\x00"
        out += _length(len(key))
        out += key
        out += _length(len(value))
        out += value
    elif kind == KeyType.MUTABLE:
        if isinstance(value, bytes | str):
            raise TypeError(f"sensor {key!r} must hold a list of members, not a single value")
        # Redis refuses a zset with repeated members, so drop duplicates (they are one member).
        members = sorted({_as_bytes(m, f"member of {key!r}") for m in value})
        if not members:
            raise ValueError(f"sensor {key!r} is empty: Redis cannot hold an empty sorted set")
        out += b"\x05"
        out += _length(len(key))
        out += key
        out += _length(len(members))
        for member in members:
            out += _length(len(member))
            out += member
            out += _ZERO_SCORE
    elif kind == KeyType.INDEXED:
        if not isinstance(value, Mapping):
            raise TypeError(f"indexed key {key!r} must hold a mapping, not {type(value).__name__}")
        if not value:
            raise ValueError(f"indexed key {key!r} is empty: Redis cannot hold an empty hash")
        out += b"\x04"
        out += _length(len(key))
        out += key
        out += _length(len(value))
        for field, item in value.items():
            field = _as_bytes(field, f"field of {key!r}")
            item = _as_bytes(item, f"value of {key!r}[{field!r}]")
            out += _length(len(field))
            out += field
            out += _length(len(item))
            out += item
    else:
        raise ValueError(f"key {key!r} has unknown kind {kind!r}")


def _write_stream(fh: BinaryIO, records: Iterable[Record], aux: Mapping | None) -> int:
    out = bytearray(b"REDIS%04d" % WRITE_VERSION)
    for name, value in (aux or {}).items():
        name = _as_bytes(name, "AUX field name")
        value = _as_bytes(value, "AUX field value")
        out += b"\xfa" + _length(len(name)) + name + _length(len(value)) + value
    out += b"\xfe\x00"
    if isinstance(records, list | tuple):
        # Size hint so that a loading Redis allocates its dict once (no expires here).
        out += b"\xfb" + _length(len(records)) + _length(0)
    crc = 0
    n_keys = 0
    for key, kind, value in records:
        _encode_record(out, key, kind, value)
        n_keys += 1
        if len(out) >= _FLUSH_SIZE:
            crc = crc64(out, crc)
            fh.write(out)
            out = bytearray()
    out += b"\xff"
    crc = crc64(out, crc)
    out += crc.to_bytes(8, "little")
    fh.write(out)
    return n_keys


def dump_rdb(
    target: str | os.PathLike | BinaryIO,
    records: Iterable[Record],
    *,
    aux: Mapping[str | bytes, str | bytes] | None = None,
    fsync: bool = True,
) -> int:
    """Write telstate keys to an RDB file.

    Parameters
    ----------
    target
        File name, or a binary file object to write to (at its current position). With a name,
        the data goes to a temporary file in the same directory that is renamed into place when
        complete, so no half-written file is ever visible; on error nothing is left behind.
    records
        ``(key, kind, value)`` triples: for :attr:`KeyType.IMMUTABLE` the stored bytes, for
        :attr:`KeyType.MUTABLE` an iterable of zset members (any order, written with score 0;
        duplicates are one member), for :attr:`KeyType.INDEXED` a mapping of field to value.
    aux
        Optional AUX fields (name -> value) written after the header, e.g. ``{"ctime": "..."}``.
    fsync
        With a file name, flush the data to disk before the rename.

    Returns
    -------
    int
        Number of keys written.

    Raises
    ------
    TypeError, ValueError
        If a record is malformed (wrong types, or an empty sensor or indexed key, which Redis
        cannot represent). Nothing is written in that case when `target` is a file name.
    """
    if not isinstance(target, str | os.PathLike):
        return _write_stream(target, records, aux)
    path = os.fspath(target)
    directory, base = os.path.split(path)
    tmp_path = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
    # 0o666 so that the final file gets the usual umask-derived permissions.
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                 0o666)
    try:
        with open(fd, "wb") as fh:
            n_keys = _write_stream(fh, records, aux)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
        raise
    return n_keys


# --------------------------------------------------------------------------------------- reader

class _Corrupt(Exception):
    """Internal: a malformed structure, with the offset of the offending byte."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset


def _int_bytes(value: int) -> bytes:
    # Integers inside encoded strings, ziplists and listpacks read back as their decimal text.
    return b"%d" % value


def _parse_ziplist(blob: bytes) -> list[bytes]:
    """Entries of a ziplist (types 10, 12, 13), as bytes."""
    n = len(blob)
    if n < 11 or int.from_bytes(blob[0:4], "little") != n:
        raise _Corrupt("ziplist header does not match its size", 0)
    count = blob[8] | (blob[9] << 8)
    entries = []
    append = entries.append
    pos = 10
    try:
        while True:
            first = blob[pos]
            if first == 0xFF:
                break
            pos += 1 if first < 254 else 5  # previous entry length
            enc = blob[pos]
            top = enc >> 6
            if 0xF1 <= enc <= 0xFD:  # 0-12 held in the encoding byte (telstate's zero scores)
                end = pos + 1
                append(_SMALL_INTS[enc - 0xF1])
            elif top == 0:
                end = pos + 1 + (enc & 0x3F)
                append(blob[pos + 1:end])
            elif top == 1:
                end = pos + 2 + (((enc & 0x3F) << 8) | blob[pos + 1])
                append(blob[pos + 2:end])
            elif top == 2:
                end = pos + 5 + int.from_bytes(blob[pos + 1:pos + 5], "big")
                append(blob[pos + 5:end])
            elif enc == 0xC0:
                end = pos + 3
                append(_int_bytes(int.from_bytes(blob[pos + 1:end], "little", signed=True)))
            elif enc == 0xD0:
                end = pos + 5
                append(_int_bytes(int.from_bytes(blob[pos + 1:end], "little", signed=True)))
            elif enc == 0xE0:
                end = pos + 9
                append(_int_bytes(int.from_bytes(blob[pos + 1:end], "little", signed=True)))
            elif enc == 0xF0:
                end = pos + 4
                append(_int_bytes(int.from_bytes(blob[pos + 1:end], "little", signed=True)))
            elif enc == 0xFE:
                end = pos + 2
                append(_int_bytes(int.from_bytes(blob[pos + 1:end], "little", signed=True)))
            else:
                raise _Corrupt(f"unknown ziplist entry encoding 0x{enc:02x}", pos)
            if end >= n:
                raise _Corrupt("ziplist entry runs past its end", pos)
            pos = end
    except IndexError:
        raise _Corrupt("ziplist ends without its terminator", n) from None
    if pos != n - 1:
        raise _Corrupt("data after ziplist terminator", pos)
    if count != 0xFFFF and count != len(entries):
        raise _Corrupt(f"ziplist holds {len(entries)} entries but its header says {count}", 8)
    return entries


def _parse_listpack(blob: bytes) -> list[bytes]:
    """Entries of a listpack (types 16, 17, 20 and streams), as bytes."""
    n = len(blob)
    if n < 7 or int.from_bytes(blob[0:4], "little") != n:
        raise _Corrupt("listpack header does not match its size", 0)
    count = blob[4] | (blob[5] << 8)
    entries = []
    append = entries.append
    pos = 6
    try:
        while True:
            enc = blob[pos]
            if enc < 0x80:
                append(_SMALL_INTS[enc])
                size = 1
            elif enc < 0xC0:
                size = 1 + (enc & 0x3F)
                append(blob[pos + 1:pos + size])
            elif enc < 0xE0:
                value = ((enc & 0x1F) << 8) | blob[pos + 1]
                append(_int_bytes(value - 8192 if value >= 4096 else value))
                size = 2
            elif enc < 0xF0:
                size = 2 + (((enc & 0x0F) << 8) | blob[pos + 1])
                append(blob[pos + 2:pos + size])
            elif enc == 0xF0:
                size = 5 + int.from_bytes(blob[pos + 1:pos + 5], "little")
                append(blob[pos + 5:pos + size])
            elif 0xF1 <= enc <= 0xF4:
                size = (3, 4, 5, 9)[enc - 0xF1]
                append(_int_bytes(int.from_bytes(blob[pos + 1:pos + size], "little",
                                                 signed=True)))
            elif enc == 0xFF:
                break
            else:
                raise _Corrupt(f"unknown listpack entry encoding 0x{enc:02x}", pos)
            # Skip the back-length: 7 bits per byte of the entry's own size.
            if size < 128:
                size += 1
            elif size < 16383:
                size += 2
            elif size < 2097151:
                size += 3
            elif size < 268435455:
                size += 4
            else:
                size += 5
            if pos + size >= n:
                raise _Corrupt("listpack entry runs past its end", pos)
            pos += size
    except IndexError:
        raise _Corrupt("listpack ends without its terminator", n) from None
    if pos != n - 1:
        raise _Corrupt("data after listpack terminator", pos)
    if count != 0xFFFF and count != len(entries):
        raise _Corrupt(f"listpack holds {len(entries)} entries but its header says {count}", 4)
    return entries


def _parse_zipmap(blob: bytes) -> dict[bytes, bytes]:
    """Fields of a zipmap (type 9, Redis < 2.6)."""
    n = len(blob)
    result = {}
    pos = 1
    try:
        while blob[pos] != 0xFF:
            items = []
            for _ in range(2):
                size = blob[pos]
                if size < 254:
                    pos += 1
                elif size == 254:
                    size = int.from_bytes(blob[pos + 1:pos + 5], "little")
                    pos += 5
                else:
                    raise _Corrupt("zipmap ends in the middle of an entry", pos)
                free = 0
                if items:
                    free = blob[pos]
                    pos += 1
                if pos + size > n:
                    raise _Corrupt("zipmap entry runs past its end", pos)
                items.append(blob[pos:pos + size])
                pos += size + free
            result[items[0]] = items[1]
    except IndexError:
        raise _Corrupt("zipmap ends without its terminator", n) from None
    return result


class _Parser:
    """One pass over an RDB file held in memory."""

    def __init__(self, data: bytes, name: str | None, skip_unsupported: bool) -> None:
        self.data = data
        self.size = len(data)
        self.name = name
        self.skip_unsupported = skip_unsupported
        self._array: np.ndarray | None = None
        self.version = 0

    def error(self, message: str, offset: int) -> RdbParseError:
        where = f"{self.name}: " if self.name else ""
        return RdbParseError(f"{where}{message} (at byte offset {offset})")

    def need(self, pos: int, n: int) -> None:
        if pos + n > self.size:
            raise _Corrupt(f"file truncated: {n} bytes needed, {self.size - pos} left", pos)

    def length(self, pos: int) -> tuple[int, int]:
        """Read a plain length; return (length, next position)."""
        data = self.data
        first = data[pos]
        kind = first >> 6
        if kind == 0:
            return first, pos + 1
        if kind == 1:
            return ((first & 0x3F) << 8) | data[pos + 1], pos + 2
        if first == 0x80:
            self.need(pos + 1, 4)
            return int.from_bytes(data[pos + 1:pos + 5], "big"), pos + 5
        if first == 0x81:
            self.need(pos + 1, 8)
            return int.from_bytes(data[pos + 1:pos + 9], "big"), pos + 9
        raise _Corrupt(f"invalid length byte 0x{first:02x}", pos)

    def string(self, pos: int) -> tuple[bytes, int]:
        """Read a string (plain, int-encoded or LZF); return (bytes, next position)."""
        data = self.data
        first = data[pos]
        kind = first >> 6
        if kind == 0:
            start = pos + 1
            end = start + first
        elif kind == 1:
            start = pos + 2
            end = start + (((first & 0x3F) << 8) | data[pos + 1])
        elif kind == 3:
            enc = first & 0x3F
            if enc == 0:
                return _int_bytes(int.from_bytes(data[pos + 1:pos + 2], "little", signed=True)
                                  ), self._checked(pos, 2)
            if enc == 1:
                return _int_bytes(int.from_bytes(data[pos + 1:pos + 3], "little", signed=True)
                                  ), self._checked(pos, 3)
            if enc == 2:
                return _int_bytes(int.from_bytes(data[pos + 1:pos + 5], "little", signed=True)
                                  ), self._checked(pos, 5)
            if enc == 3:
                return self._lzf(pos)
            raise _Corrupt(f"unknown string encoding 0x{first:02x}", pos)
        else:
            size, start = self.length(pos)
            end = start + size
        if end > self.size:
            raise _Corrupt(f"file truncated inside a string of {end - start} bytes", pos)
        return data[start:end], end

    def _checked(self, pos: int, n: int) -> int:
        self.need(pos, n)
        return pos + n

    def _lzf(self, pos: int) -> tuple[bytes, int]:
        clen, start = self.length(pos + 1)
        ulen, start = self.length(start)
        end = start + clen
        if end > self.size:
            raise _Corrupt("file truncated inside an LZF-compressed string", pos)
        if self._array is None:
            self._array = np.frombuffer(self.data, dtype=np.uint8)
        try:
            return lzf_decompress(self._array, start, end, ulen), end
        except ValueError as exc:
            raise _Corrupt(f"corrupt LZF-compressed string: {exc}", pos) from None

    def blob(self, pos: int, parse):
        """Read a string holding an encoded structure and parse it with `parse`."""
        blob, end = self.string(pos)
        try:
            return parse(blob), end
        except _Corrupt as exc:
            raise _Corrupt(f"{exc.message} (offset {exc.offset} inside the structure)",
                           pos) from None

    def strings(self, pos: int, count: int) -> tuple[list[bytes], int]:
        out = []
        string = self.string
        for _ in range(count):
            item, pos = string(pos)
            out.append(item)
        return out, pos

    # ---- values

    def value(self, vtype: int, pos: int, key: bytes) -> tuple[KeyType | None, object, int]:
        """Read a value of type `vtype`; kind None means an unsupported type that was skipped."""
        if vtype == _T_STRING:
            value, pos = self.string(pos)
            return KeyType.IMMUTABLE, value, pos
        if vtype == _T_ZSET2:
            count, pos = self.length(pos)
            data, string = self.data, self.string
            members = []
            append = members.append
            startswith = data.startswith
            nonzero = False
            for _ in range(count):
                first = data[pos]
                if first < 64:  # short member: inline the common case of string()
                    pos += 1
                    end = pos + first
                    append(data[pos:end])
                else:
                    member, end = string(pos)
                    append(member)
                if not startswith(_ZERO_SCORE, end) and not startswith(_NEG_ZERO_SCORE, end):
                    nonzero = True
                pos = end + 8
            if pos > self.size:
                raise _Corrupt("file truncated inside a zset", self.size)
            return KeyType.MUTABLE, self._zset(key, members, nonzero), pos
        if vtype == _T_ZSET:
            count, pos = self.length(pos)
            data, string = self.data, self.string
            members = []
            nonzero = False
            for _ in range(count):
                member, pos = string(pos)
                size = data[pos]
                if size >= 253:  # NaN, +inf, -inf
                    nonzero = True
                    pos += 1
                else:
                    self.need(pos + 1, size)
                    score = data[pos + 1:pos + 1 + size]
                    if score != b"0" and not self._is_zero(score, pos):
                        nonzero = True
                    pos += 1 + size
                members.append(member)
            return KeyType.MUTABLE, self._zset(key, members, nonzero), pos
        if vtype == _T_HASH:
            count, pos = self.length(pos)
            items, pos = self.strings(pos, 2 * count)
            return KeyType.INDEXED, self._hash(key, items, pos), pos
        if vtype in (_T_ZSET_ZIPLIST, _T_ZSET_LISTPACK):
            parse = _parse_ziplist if vtype == _T_ZSET_ZIPLIST else _parse_listpack
            entries, end = self.blob(pos, parse)
            if len(entries) % 2:
                raise _Corrupt("zset structure has an odd number of entries", pos)
            scores = entries[1::2]
            nonzero = scores.count(b"0") != len(scores) and not all(
                self._is_zero(score, pos) for score in scores)
            return KeyType.MUTABLE, self._zset(key, entries[0::2], nonzero), end
        if vtype in (_T_HASH_ZIPLIST, _T_HASH_LISTPACK):
            parse = _parse_ziplist if vtype == _T_HASH_ZIPLIST else _parse_listpack
            entries, end = self.blob(pos, parse)
            if len(entries) % 2:
                raise _Corrupt("hash structure has an odd number of entries", pos)
            return KeyType.INDEXED, self._hash(key, entries, pos), end
        if vtype == _T_HASH_ZIPMAP:
            value, end = self.blob(pos, _parse_zipmap)
            return KeyType.INDEXED, value, end
        return None, None, self.skip(vtype, pos, key)

    @staticmethod
    def _is_zero(score: bytes, pos: int) -> bool:
        try:
            return float(score) == 0.0
        except ValueError:
            raise _Corrupt(f"invalid zset score {score!r}", pos) from None

    @staticmethod
    def _zset(key: bytes, members: list[bytes], nonzero: bool) -> list[bytes]:
        if nonzero:
            logger.warning("zset %r has non-zero scores: they are ignored (telstate orders "
                           "sensor members by their bytes)", key)
        members.sort()
        return members

    @staticmethod
    def _hash(key: bytes, items: list[bytes], pos: int) -> dict[bytes, bytes]:
        result = dict(zip(items[0::2], items[1::2], strict=True))
        if 2 * len(result) != len(items):
            raise _Corrupt(f"hash {key!r} repeats a field", pos)
        return result

    def skip(self, vtype: int, pos: int, key: bytes) -> int:
        """Skip a value of a Redis type telstate does not use, or raise."""
        type_name = _TYPE_NAMES[vtype]
        if not self.skip_unsupported:
            raise _Corrupt(f"key {key!r} is a {type_name} (type {vtype}), which telstate "
                           "does not use (pass skip_unsupported=True to skip such keys)", pos)
        start = pos
        string, length = self.string, self.length
        if vtype in (_T_LIST, _T_SET):
            count, pos = length(pos)
            for _ in range(count):
                _, pos = string(pos)
        elif vtype in (_T_LIST_ZIPLIST, _T_SET_INTSET, _T_SET_LISTPACK):
            _, pos = string(pos)
        elif vtype == _T_LIST_QUICKLIST:
            count, pos = length(pos)
            for _ in range(count):
                _, pos = string(pos)
        elif vtype == _T_LIST_QUICKLIST2:
            count, pos = length(pos)
            for _ in range(count):
                _, pos = length(pos)  # container kind (plain or packed)
                _, pos = string(pos)
        elif vtype == _T_MODULE2:
            _, pos = length(pos)  # module id
            pos = self._skip_module_data(pos)
        elif vtype in (_T_STREAM, _T_STREAM2, _T_STREAM3):
            pos = self._skip_stream(vtype, pos)
        else:
            raise _Corrupt(f"key {key!r} is a {type_name} (type {vtype}), which this reader "
                           "cannot skip", pos)
        logger.warning("skipped key %r: a %s (type %d) at byte offset %d, which telstate "
                       "does not use", key, type_name, vtype, start)
        return pos

    def _skip_module_data(self, pos: int) -> int:
        # Module values saved with the v2 API are self-describing: (opcode, datum) until EOF.
        while True:
            opcode, pos = self.length(pos)
            if opcode == 0:
                return pos
            if opcode in (1, 2):
                _, pos = self.length(pos)
            elif opcode == 3:
                pos = self._checked(pos, 4)
            elif opcode == 4:
                pos = self._checked(pos, 8)
            elif opcode == 5:
                _, pos = self.string(pos)
            else:
                raise _Corrupt(f"unknown module data opcode {opcode}", pos)

    def _skip_stream(self, vtype: int, pos: int) -> int:
        length, string = self.length, self.string
        count, pos = length(pos)
        for _ in range(2 * count):  # node keys and listpacks
            _, pos = string(pos)
        n_lengths = 3 + (5 if vtype >= _T_STREAM2 else 0)  # length, last id (+ first/max ids...)
        for _ in range(n_lengths):
            _, pos = length(pos)
        groups, pos = length(pos)
        for _ in range(groups):
            _, pos = string(pos)
            for _ in range(3 if vtype >= _T_STREAM2 else 2):  # last id (+ entries read)
                _, pos = length(pos)
            pending, pos = length(pos)
            for _ in range(pending):
                pos = self._checked(pos, 16 + 8)  # entry id, delivery time
                _, pos = length(pos)  # delivery count
            consumers, pos = length(pos)
            for _ in range(consumers):
                _, pos = string(pos)
                pos = self._checked(pos, 16 if vtype >= _T_STREAM3 else 8)  # seen/active time
                pending, pos = length(pos)
                pos = self._checked(pos, 16 * pending)
        return pos

    # ---- whole file

    @staticmethod
    def _duplicate(key: bytes, db1: int, db2: int, offset: int) -> tuple[str, int]:
        where = "twice" if db1 == db2 else f"in databases {db1} and {db2} (choose one with db=)"
        return f"key {key!r} appears {where}", offset

    def parse(self, db: int | None) -> list[Record]:
        self.header()
        result = self.parse_fast(db)
        records, pos = result if result is not None else self.parse_records(db)
        self.trailer(pos)
        return records

    def header(self) -> None:
        data = self.data
        if self.size < 9 or data[:5] != b"REDIS":
            raise _Corrupt("not an RDB file (no REDIS magic)", 0)
        try:
            version = int(data[5:9].decode("ascii"))
        except ValueError:
            raise _Corrupt(f"invalid RDB version {data[5:9]!r}", 5) from None
        if not 1 <= version <= MAX_READ_VERSION:
            raise _Corrupt(f"unsupported RDB version {version} (this reader knows "
                           f"1-{MAX_READ_VERSION})", 5)
        self.version = version

    def parse_fast(self, db: int | None) -> tuple[list[Record], int] | None:
        """Parse with the numba scanner; None if the file needs the full parser."""
        data, size = self.data, self.size
        array = np.frombuffer(data, dtype=np.uint8)
        spans = np.empty((size // 8 + 64, 2), dtype=np.int64)
        recs = np.empty((size // 64 + 16, _rdbscan.REC_COLUMNS), dtype=np.int64)
        state = (9, 0, 0, 0)
        while True:
            status, *state = _rdbscan.scan(array, state[0], state[1], spans, state[2], recs,
                                           state[3])
            if status == _rdbscan.OK:
                break
            if status == _rdbscan.GIVE_UP:
                return None
            # FULL: grow the tables and resume at the record that did not fit.
            spans = np.concatenate([spans, np.empty_like(spans)])
            recs = np.concatenate([recs, np.empty_like(recs)])
        pos, _, n_spans, n_recs = state
        starts = spans[:n_spans, 0].tolist()
        ends = spans[:n_spans, 1].tolist()
        strings = [data[s:e] for s, e in zip(starts, ends, strict=True)]
        records: list[Record] = []
        append = records.append
        seen: dict[bytes, int] = {}
        immutable, mutable, indexed = KeyType.IMMUTABLE, KeyType.MUTABLE, KeyType.INDEXED
        for vtype, rec_db, first, count, _offset in recs[:n_recs].tolist():
            if db is not None and rec_db != db:
                continue
            key = strings[first]
            if key in seen:
                return None  # let the full parser report it
            seen[key] = rec_db
            if vtype == _T_STRING:
                append((key, immutable, strings[first + 1]))
            elif vtype in _FAST_ZSET_TYPES:
                members = strings[first + 1:first + 1 + count]
                members.sort()
                append((key, mutable, members))
            else:
                items = strings[first + 1:first + 1 + count]
                value = dict(zip(items[0::2], items[1::2], strict=True))
                if 2 * len(value) != count:
                    return None
                append((key, indexed, value))
        return records, pos

    def parse_records(self, db: int | None) -> tuple[list[Record], int]:
        """The complete pure-Python parser: every type and opcode, and precise errors."""
        data = self.data
        records: list[Record] = []
        seen: dict[bytes, int] = {}
        current_db = 0
        pos = 9
        start = pos
        try:
            while True:
                start = pos
                op = data[pos]
                pos += 1
                if op == _T_STRING:
                    first = data[pos]
                    if first < 64:
                        pos += 1
                        key = data[pos:pos + first]
                        pos += first
                    else:
                        key, pos = self.string(pos)
                    value, pos = self.string(pos)
                    kind = KeyType.IMMUTABLE
                    if db is not None and current_db != db:
                        continue
                    if key in seen:
                        raise _Corrupt(*self._duplicate(key, seen[key], current_db, start))
                    seen[key] = current_db
                    records.append((key, kind, value))
                elif op < _OP_SLOT_INFO:
                    if op not in _KNOWN_TYPES:
                        raise _Corrupt(f"unknown object type {op}", start)
                    key, pos = self.string(pos)
                    kind, value, pos = self.value(op, pos, key)
                    if kind is None or (db is not None and current_db != db):
                        continue
                    if key in seen:
                        raise _Corrupt(*self._duplicate(key, seen[key], current_db, start))
                    seen[key] = current_db
                    records.append((key, kind, value))
                elif op == _OP_EOF:
                    break
                elif op == _OP_SELECTDB:
                    current_db, pos = self.length(pos)
                elif op == _OP_RESIZEDB:
                    _, pos = self.length(pos)
                    _, pos = self.length(pos)
                elif op == _OP_AUX:
                    _, pos = self.string(pos)
                    _, pos = self.string(pos)
                elif op == _OP_EXPIRETIME_MS:
                    # Telstate keys do not expire; an archive keeps the key whatever the clock.
                    pos = self._checked(pos, 8)
                elif op == _OP_EXPIRETIME:
                    pos = self._checked(pos, 4)
                elif op == _OP_IDLE:
                    _, pos = self.length(pos)
                elif op == _OP_FREQ:
                    pos = self._checked(pos, 1)
                elif op == _OP_SLOT_INFO:
                    for _ in range(3):  # slot id, slot size, expires slot size
                        _, pos = self.length(pos)
                elif op == _OP_MODULE_AUX:
                    _, pos = self.length(pos)  # module id
                    _, pos = self.length(pos)  # when opcode
                    _, pos = self.length(pos)  # when
                    pos = self._skip_module_data(pos)
                elif op == _OP_FUNCTION2:
                    _, pos = self.string(pos)  # library source: not telstate data
                else:
                    raise _Corrupt(f"unsupported opcode 0x{op:02x} (pre-release Redis 7.0 "
                                   "function data?)", start)
        except (IndexError, struct.error):
            raise _Corrupt(f"file truncated (record starting at offset {start} is incomplete)",
                           self.size) from None
        if pos > self.size:
            raise _Corrupt(f"file truncated (record starting at offset {start} is incomplete)",
                           self.size)
        return records, pos

    def trailer(self, pos: int) -> None:
        """Check the CRC-64 after the EOF opcode at `pos` and that nothing follows."""
        data = self.data
        if self.version >= 5:
            self.need(pos, 8)
            stored = int.from_bytes(data[pos:pos + 8], "little")
            # Zero means the writer did not compute one (katsdptelstate, rdbchecksum no).
            if stored != 0:
                actual = crc64(memoryview(data)[:pos])
                if actual != stored:
                    raise _Corrupt(f"checksum mismatch: file says 0x{stored:016x}, data gives "
                                   f"0x{actual:016x}", pos)
            pos += 8
        if pos != self.size:
            raise _Corrupt(f"{self.size - pos} unexpected bytes after the end of the file", pos)


def load_rdb(
    source: str | os.PathLike | BinaryIO | bytes,
    *,
    skip_unsupported: bool = False,
    db: int | None = None,
) -> list[Record]:
    """Read every telstate key from an RDB file.

    Parameters
    ----------
    source
        File name, binary file object (read from its current position to the end), or the file's
        contents as bytes.
    skip_unsupported
        Keys of Redis types telstate never uses (lists, sets, streams, modules) raise
        :class:`RdbParseError` by default; with True they are skipped with a logged warning.
    db
        Only return keys of this database number; None (default) returns the keys of all.

    Returns
    -------
    list of Record
        ``(key, kind, value)`` in file order: bytes for immutable keys, the zset members sorted
        by their bytes for mutable keys (scores are ignored), a dict of field -> value for
        indexed keys. Expiry times in the file are ignored (the keys are kept).

    Raises
    ------
    RdbParseError
        If the file is not RDB, is truncated or corrupt (including a wrong CRC-64), of a newer
        version, or holds unsupported keys. The message names the file and byte offset. Nothing
        is returned unless the whole file parsed.
    """
    name = None
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    elif isinstance(source, str | os.PathLike):
        name = os.fspath(source)
        with open(name, "rb") as fh:
            data = fh.read()
    elif isinstance(source, io.IOBase) or hasattr(source, "read"):
        name = getattr(source, "name", None)
        name = name if isinstance(name, str) else None
        data = source.read()
    else:
        raise TypeError(f"cannot read an RDB file from {type(source).__name__}")
    parser = _Parser(data, name, skip_unsupported)
    try:
        return parser.parse(db)
    except _Corrupt as exc:
        raise parser.error(exc.message, exc.offset) from None
