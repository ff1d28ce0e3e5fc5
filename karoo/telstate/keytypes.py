"""The three kinds of telstate key and how they are stored."""

import enum


class KeyType(enum.IntEnum):
    """Kind of a telstate key (the values match katsdptelstate's ``KeyType``).

    IMMUTABLE keys ("attributes") hold one write-once value (a Redis string). MUTABLE keys
    ("sensors") hold a time series (a Redis zset of ``>d`` timestamp + encoded value, all scores 0).
    INDEXED keys hold a dict of write-once sub-keys (a Redis hash keyed by encoded sub-key).
    """

    IMMUTABLE = 1
    MUTABLE = 2
    INDEXED = 3
