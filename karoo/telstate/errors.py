"""Exceptions raised by the telescope state, named as katsdptelstate names them."""


class TelstateError(RuntimeError):
    """Base class of every telescope state error."""


class ConnectionError(TelstateError):
    """The backend (Redis) could not be reached, even after reconnecting."""


class RdbParseError(TelstateError):
    """An RDB file is corrupt, truncated or of a kind this reader does not understand."""


class InvalidKeyError(TelstateError):
    """A key name is not valid (e.g. it clashes with an attribute of the class)."""


class InvalidTimestampError(TelstateError):
    """A sensor timestamp is negative, infinite or NaN."""


class ImmutableKeyError(TelstateError):
    """An attribute was given a different value, or a key was used as the wrong kind."""


class TimeoutError(TelstateError):
    """A wait for a key ran out of time."""


class CancelledError(TelstateError):
    """A wait for a key was cancelled."""


class DecodeError(ValueError, TelstateError):
    """A stored value could not be decoded."""


class EncodeError(ValueError, TelstateError):
    """A value cannot be encoded for storage."""
