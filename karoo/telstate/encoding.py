"""Value encoding, byte-compatible with katsdptelstate.

Every stored value, sensor value, indexed value and indexed sub-key is a byte string whose first
byte says how the rest is encoded: ``0xFF`` for msgpack (the default) and ``<= 0x80`` for a legacy
Python pickle, which is refused unless explicitly allowed. The msgpack extension types are those
of katsdptelstate, so each side reads what the other writes.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import warnings
from typing import Any

import msgpack
import numpy as np

from .errors import DecodeError, EncodeError, InvalidTimestampError
from .keytypes import KeyType

ENCODING_PICKLE = b"\x80"
ENCODING_MSGPACK = b"\xff"
ENCODING_DEFAULT = ENCODING_MSGPACK
ALLOWED_ENCODINGS = frozenset([ENCODING_PICKLE, ENCODING_MSGPACK])
PICKLE_PROTOCOL = 2

MSGPACK_EXT_TUPLE = 1
MSGPACK_EXT_COMPLEX128 = 2
MSGPACK_EXT_NDARRAY = 3
MSGPACK_EXT_NUMPY_SCALAR = 4

_allow_pickle = os.environ.get("KATSDPTELSTATE_ALLOW_PICKLE") == "1"
_warn_on_pickle = False


def set_allow_pickle(allow: bool, warn: bool = False) -> None:
    """Allow (or forbid) decoding of pickled legacy values.

    Pickles run arbitrary code when loaded, so they are refused by default. Data written before
    2019 by MeerKAT's telstate is pickle-encoded; allow it only for files you trust. The
    environment variable ``KATSDPTELSTATE_ALLOW_PICKLE=1`` allows it too, as in katsdptelstate.
    """
    global _allow_pickle, _warn_on_pickle
    _allow_pickle = allow
    _warn_on_pickle = warn


def _encode_ext(value: Any) -> msgpack.ExtType:
    if isinstance(value, tuple):
        return msgpack.ExtType(MSGPACK_EXT_TUPLE, _pack(list(value)))
    if isinstance(value, complex):
        return msgpack.ExtType(MSGPACK_EXT_COMPLEX128, struct.pack(">dd", value.real, value.imag))
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise EncodeError("cannot encode numpy arrays of objects")
        out = io.BytesIO()
        np.save(out, value, allow_pickle=False)
        return msgpack.ExtType(MSGPACK_EXT_NDARRAY, out.getvalue())
    if isinstance(value, np.generic):
        if value.dtype.hasobject:
            raise EncodeError("cannot encode numpy scalars of object type")
        descr = np.lib.format.dtype_to_descr(value.dtype)
        return msgpack.ExtType(MSGPACK_EXT_NUMPY_SCALAR, _pack(descr) + value.tobytes())
    raise EncodeError(f"do not know how to encode type {type(value).__name__}")


def _decode_ext(code: int, data: bytes) -> Any:
    if code == MSGPACK_EXT_TUPLE:
        content = _unpack(data)
        if not isinstance(content, list):
            raise DecodeError("tuple extension does not contain a list")
        return tuple(content)
    if code == MSGPACK_EXT_COMPLEX128:
        if len(data) != 16:
            raise DecodeError(f"complex128 extension has {len(data)} bytes, expected 16")
        real, imag = struct.unpack(">dd", data)
        return complex(real, imag)
    if code == MSGPACK_EXT_NDARRAY:
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as exc:
            raise DecodeError(f"invalid ndarray extension: {exc}") from exc
    if code == MSGPACK_EXT_NUMPY_SCALAR:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(data) or 1)
        unpacker.feed(data)
        try:
            descr = unpacker.unpack()
            raw = data[unpacker.tell() :]
            dtype = np.dtype(np.lib.format.descr_to_dtype(descr))
        except Exception as exc:
            raise DecodeError(f"invalid numpy scalar extension: {exc}") from exc
        if dtype.hasobject:
            raise DecodeError("numpy scalar extension of object type")
        if len(raw) != dtype.itemsize:
            raise DecodeError(f"numpy scalar of {dtype} has {len(raw)} bytes")
        return np.frombuffer(raw, dtype, 1)[0]
    raise DecodeError(f"unknown msgpack extension type {code}")


# strict_types: numpy float64/bool subclasses go through the hook, exactly as the anchor does, so
# that equal values encode to identical bytes on both sides.
_packer_options = dict(use_bin_type=True, strict_types=True, default=_encode_ext)


def _pack(value: Any) -> bytes:
    try:
        return msgpack.packb(value, **_packer_options)
    except EncodeError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"cannot encode {type(value).__name__}: {exc}") from exc


def _unpack(data: bytes) -> Any:
    n = len(data)
    return msgpack.unpackb(
        data, raw=False, ext_hook=_decode_ext, max_bin_len=n, max_str_len=n,
        max_array_len=n, max_map_len=n, max_ext_len=n,
    )


def encode_value(value: Any, encoding: bytes = ENCODING_DEFAULT) -> bytes:
    """Encode `value` for storage, with its one-byte encoding header."""
    if encoding == ENCODING_MSGPACK:
        return ENCODING_MSGPACK + _pack(value)
    if encoding == ENCODING_PICKLE:
        return pickle.dumps(value, protocol=PICKLE_PROTOCOL)
    raise ValueError(f"unknown encoding {encoding!r}")


def decode_value(value: bytes, allow_pickle: bool | None = None) -> Any:
    """Decode a stored value (the inverse of `encode_value`).

    Raises
    ------
    DecodeError
        If the value is empty, has an unknown header, is malformed, or is a pickle while pickles
        are not allowed.
    """
    if not value:
        raise DecodeError("empty value")
    header = value[0]
    if header == 0xFF:
        try:
            return _unpack(value[1:])
        except DecodeError:
            raise
        except Exception as exc:
            raise DecodeError(f"invalid msgpack value: {exc}") from exc
    if header <= 0x80:
        if not (_allow_pickle if allow_pickle is None else allow_pickle):
            raise DecodeError(
                "value is a pickle, which is refused by default because loading it can run "
                "arbitrary code; call karoo.telstate.set_allow_pickle(True) or set "
                "KATSDPTELSTATE_ALLOW_PICKLE=1 for legacy data you trust"
            )
        if _warn_on_pickle:
            warnings.warn("decoding a pickled telstate value", UserWarning, stacklevel=2)
        try:
            return pickle.loads(value, encoding="latin1")
        except Exception as exc:
            raise DecodeError(f"invalid pickle: {exc}") from exc
    raise DecodeError(f"unrecognised header byte 0x{header:02x}")


def equal_encoded_values(a: bytes, b: bytes) -> bool:
    """Whether two encoded values count as equal for re-setting an immutable key.

    Identical bytes are equal; otherwise only str and bytes holding the same UTF-8 text are (so a
    value written as ``'abc'`` by one client and ``b'abc'`` by another is not a conflict).
    """
    if a == b:
        return True
    try:
        va, vb = decode_value(a), decode_value(b)
    except DecodeError:
        return False
    if isinstance(va, str | bytes) and isinstance(vb, str | bytes):
        return _to_bytes(va) == _to_bytes(vb)
    return False


def _to_bytes(s: str | bytes) -> bytes:
    return s.encode("utf-8", errors="surrogateescape") if isinstance(s, str) else s


def ensure_binary(key: str | bytes) -> bytes:
    """Telstate key names are bytes internally; str converts as UTF-8 (surrogateescape)."""
    return key if isinstance(key, bytes) else key.encode("utf-8", errors="surrogateescape")


def ensure_str(key: str | bytes) -> str:
    return key if isinstance(key, str) else key.decode("utf-8", errors="surrogateescape")


# Sensor samples: an 8-byte big-endian double timestamp followed by the encoded value. Positive
# big-endian doubles sort bytewise in numeric order, so a lexicographic zset is a time index.

_TIMESTAMP = struct.Struct(">d")


def check_timestamp(timestamp: float) -> float:
    timestamp = float(timestamp)
    if not math.isfinite(timestamp) or timestamp < 0.0:
        raise InvalidTimestampError(f"timestamp {timestamp} is not finite and non-negative")
    return abs(timestamp)  # -0.0 -> +0.0


def pack_timestamp(timestamp: float) -> bytes:
    return _TIMESTAMP.pack(check_timestamp(timestamp))


def split_sample(sample: bytes) -> tuple[bytes, float]:
    """Split a stored sensor sample into (encoded value, timestamp)."""
    if len(sample) < 9:
        raise DecodeError(f"sensor sample of {len(sample)} bytes is too short")
    return sample[8:], _TIMESTAMP.unpack_from(sample)[0]


def pack_query_timestamp(time: float, is_end: bool, include_end: bool = False) -> bytes:
    """Turn a time into a Redis ZRANGEBYLEX bound (also used by the memory backend)."""
    if math.isnan(time):
        raise InvalidTimestampError("time range bound is NaN")
    if time == math.inf:
        return b"+"
    if time < 0.0 or (time == 0.0 and not (is_end and include_end)):
        return b"-"
    packed = _TIMESTAMP.pack(time)
    if not is_end:
        return b"[" + packed
    if not include_end:
        return b"(" + packed
    # Inclusive end: exclusive bound at the next representable double.
    return b"(" + (int.from_bytes(packed, "big") + 1).to_bytes(8, "big")


_FLOAT_SAMPLE = np.dtype([("ts", ">f8"), ("header", "u1"), ("tag", "u1"), ("value", ">f8")])


def decode_samples(samples: list[bytes]) -> list[tuple[Any, float]]:
    """Decode sensor samples into ``(value, timestamp)`` pairs.

    Float sensors (by far the most common kind: every sample 0xFF 0xCB + 8 bytes) are decoded in
    one vectorised pass; anything else falls back to decoding sample by sample.
    """
    n = len(samples)
    if n > 16 and set(map(len, samples)) == {18}:
        records = np.frombuffer(b"".join(samples), _FLOAT_SAMPLE)
        if np.all(records["header"] == 0xFF) and np.all(records["tag"] == 0xCB):
            return list(zip(records["value"].tolist(), records["ts"].tolist(), strict=True))
    out = []
    for sample in samples:
        encoded, timestamp = split_sample(sample)
        out.append((decode_value(encoded), timestamp))
    return out


def encode_sub_key(sub_key: Any) -> bytes:
    """Indexed sub-keys are always msgpack-encoded, whatever encoding the values use."""
    return encode_value(sub_key, ENCODING_MSGPACK)


# Pub/sub update messages on channel ``update/<full key>``, in katsdptelstate's format: a KeyType
# byte, then the encoded value (IMMUTABLE), the sensor sample (MUTABLE), or the sub-key length in
# ASCII, a newline, the encoded sub-key and the encoded value (INDEXED).

UPDATE_CHANNEL_PREFIX = b"update/"


def update_message(key_type: KeyType, payload: bytes, sub_key: bytes = b"") -> bytes:
    if key_type == KeyType.INDEXED:
        return b"\x03%d\n%s%s" % (len(sub_key), sub_key, payload)
    return bytes([key_type]) + payload


def parse_update(message: bytes) -> tuple[KeyType | None, bytes, bytes]:
    """Split an update message into (key type, payload, encoded sub-key).

    Old writers send no type byte for immutable and mutable keys; the type is then None and the
    payload is the whole message.
    """
    try:
        key_type = KeyType(message[0])
    except (ValueError, IndexError):
        return None, message, b""
    if key_type != KeyType.INDEXED:
        return key_type, message[1:], b""
    newline = message.find(b"\n")
    if newline < 0:
        raise DecodeError("indexed update message without sub-key length")
    length = int(message[1:newline])
    start = newline + 1
    return key_type, message[start + length :], message[start : start + length]
