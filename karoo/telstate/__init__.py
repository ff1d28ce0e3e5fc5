"""karoo's telescope state: katsdptelstate's data model and wire format, in memory or on Redis.

>>> from karoo.telstate import TelescopeState
>>> ts = TelescopeState()                      # in memory; TelescopeState('redis://host:6379')
>>> ts['sdp_l0_n_chans'] = 4096                # an attribute (write once)
>>> ts.add('obs_activity', 'track', ts=1.0)    # a sensor sample
>>> ts.view('sdp_l0')['n_chans']
4096
"""

from .encoding import (
    ALLOWED_ENCODINGS,
    ENCODING_DEFAULT,
    ENCODING_MSGPACK,
    ENCODING_PICKLE,
    PICKLE_PROTOCOL,
    decode_value,
    encode_value,
    equal_encoded_values,
    set_allow_pickle,
)
from .errors import (
    CancelledError,
    ConnectionError,
    DecodeError,
    EncodeError,
    ImmutableKeyError,
    InvalidKeyError,
    InvalidTimestampError,
    RdbParseError,
    TelstateError,
    TimeoutError,
)
from .keytypes import KeyType
from .memory import MemoryBackend
from .redis import AsyncRedisBackend, RedisBackend
from .telescope_state import SEPARATOR, TelescopeState

__all__ = [
    "ALLOWED_ENCODINGS", "ENCODING_DEFAULT", "ENCODING_MSGPACK", "ENCODING_PICKLE",
    "PICKLE_PROTOCOL", "SEPARATOR", "AsyncRedisBackend", "CancelledError", "ConnectionError",
    "DecodeError", "EncodeError", "ImmutableKeyError", "InvalidKeyError",
    "InvalidTimestampError", "KeyType", "MemoryBackend", "RdbParseError", "RedisBackend",
    "TelescopeState", "TelstateError", "TimeoutError", "decode_value", "encode_value",
    "equal_encoded_values", "set_allow_pickle",
]
