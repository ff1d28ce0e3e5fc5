"""The in-memory backend: the embedded default, and what RDB files are loaded into for reading.

Keys hold raw encoded bytes exactly as Redis would: attributes as bytes, sensors as a sorted list
of samples (so ``bisect`` does what ZRANGEBYLEX does), indexed keys as a dict. One lock guards
everything, so the backend can be shared between threads and between the sync and asyncio APIs.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import queue
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence

from .encoding import update_message
from .errors import ImmutableKeyError
from .keytypes import KeyType

_PYTHON_TYPE = {bytes: KeyType.IMMUTABLE, list: KeyType.MUTABLE, dict: KeyType.INDEXED}

Update = tuple[bytes, bytes]  # (full key, update message)


def _glob_to_regex(pattern: bytes) -> re.Pattern:
    """Redis glob syntax (``*``, ``?``, ``[abc]``, ``[^a-z]``, ``\\`` escapes) as a regex."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i : i + 1]
        if c == b"\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1 : i + 2]))
            i += 2
            continue
        if c == b"*":
            out.append(b".*")
        elif c == b"?":
            out.append(b".")
        elif c == b"[" and pattern.find(b"]", i + 1) > i:
            end = pattern.find(b"]", i + 2 if pattern[i + 1 : i + 2] == b"^" else i + 1)
            body = pattern[i + 1 : end]
            negate = body.startswith(b"^")
            body = body[1:] if negate else body
            body = re.sub(rb"([\\\]\[^])", rb"\\\1", body)
            out.append(b"[" + (b"^" if negate else b"") + body + b"]")
            i = end + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile(b"".join(out) + rb"\Z", re.DOTALL)


def _wrong_type(key: bytes, actual: KeyType, wanted: KeyType) -> ImmutableKeyError:
    return ImmutableKeyError(
        f"key {key!r} is {actual.name.lower()}, so it cannot be used as {wanted.name.lower()}"
    )


def _range_bounds(samples: list[bytes], start: bytes, end: bytes) -> tuple[int, int]:
    """Index range of `samples` between two ZRANGEBYLEX bounds."""
    if start == b"-":
        lo = 0
    elif start == b"+":
        lo = len(samples)
    elif start[:1] == b"[":
        lo = bisect.bisect_left(samples, start[1:])
    else:
        lo = bisect.bisect_right(samples, start[1:])
    if end == b"+":
        hi = len(samples)
    elif end == b"-":
        hi = 0
    elif end[:1] == b"[":
        hi = bisect.bisect_right(samples, end[1:])
    else:
        hi = bisect.bisect_left(samples, end[1:])
    return lo, max(lo, hi)


class MemoryBackend:
    """Telescope state held in this process.

    Every method takes fully prefixed keys; where a list of keys is taken, they are the
    candidates of a view in order of priority and the first that exists is used.
    """

    def __init__(self) -> None:
        self._data: dict[bytes, bytes | list[bytes] | dict[bytes, bytes]] = {}
        self._lock = threading.RLock()
        self._subscribers: dict[bytes, set[Callable[[Update], None]]] = {}

    def __repr__(self) -> str:
        return f"<MemoryBackend with {len(self._data)} keys>"

    # Reading

    def _typed(self, key: bytes, wanted: KeyType):
        value = self._data.get(key)
        if value is not None and _PYTHON_TYPE[type(value)] != wanted:
            raise _wrong_type(key, _PYTHON_TYPE[type(value)], wanted)
        return value

    def key_type(self, keys: Sequence[bytes]) -> KeyType | None:
        with self._lock:
            for key in keys:
                value = self._data.get(key)
                if value is not None:
                    return _PYTHON_TYPE[type(value)]
        return None

    def exists(self, keys: Sequence[bytes]) -> bool:
        with self._lock:
            return any(key in self._data for key in keys)

    def keys(self, pattern: bytes) -> list[bytes]:
        with self._lock:
            if pattern == b"*":
                return sorted(self._data)
            regex = _glob_to_regex(pattern)
            return sorted(key for key in self._data if regex.match(key))

    def get(self, keys: Sequence[bytes]) -> tuple[bytes | dict | None, KeyType | None]:
        """The value under the first existing key: bytes, the latest sample, or a dict."""
        with self._lock:
            for key in keys:
                value = self._data.get(key)
                if value is None:
                    continue
                key_type = _PYTHON_TYPE[type(value)]
                if key_type == KeyType.MUTABLE:
                    return value[-1], key_type
                if key_type == KeyType.INDEXED:
                    return dict(value), key_type
                return value, key_type
        return None, None

    def get_many(self, key_lists: Sequence[Sequence[bytes]]) -> list[tuple]:
        with self._lock:
            return [self.get(keys) for keys in key_lists]

    def get_indexed(self, keys: Sequence[bytes], sub_key: bytes) -> tuple[bool, bytes | None]:
        """(whether an indexed key exists, the value of `sub_key` in it or None)."""
        with self._lock:
            for key in keys:
                value = self._typed(key, KeyType.INDEXED)
                if value is not None:
                    return True, value.get(sub_key)
        return False, None

    def get_range(
        self, keys: Sequence[bytes], start: bytes, end: bytes, include_previous: bool
    ) -> list[bytes] | None:
        """Samples of the first existing sensor between two ZRANGEBYLEX bounds, or None."""
        with self._lock:
            for key in keys:
                samples = self._typed(key, KeyType.MUTABLE)
                if samples is None:
                    continue
                lo, hi = _range_bounds(samples, start, end)
                if include_previous and lo > 0:
                    lo -= 1
                return samples[lo:hi]
        return None

    # Writing

    def set_immutable(self, key: bytes, value: bytes) -> bytes | None:
        """Set an attribute unless it exists; returns the existing value if it does."""
        with self._lock:
            old = self._typed(key, KeyType.IMMUTABLE)
            if old is not None:
                return old
            self._data[key] = value
            self._publish(key, update_message(KeyType.IMMUTABLE, value))
        return None

    def add_mutable(self, key: bytes, sample: bytes) -> None:
        self.add_mutable_many([(key, sample)])

    def add_mutable_many(self, samples: Iterable[tuple[bytes, bytes]]) -> None:
        """Add sensor samples (full key, timestamp + encoded value); all or none are added."""
        samples = list(samples)
        with self._lock:
            for key in {key for key, _ in samples}:
                self._typed(key, KeyType.MUTABLE)
            for key, sample in samples:
                series = self._data.setdefault(key, [])
                if not series or sample > series[-1]:
                    series.append(sample)  # the common case: samples arrive in time order
                else:
                    pos = bisect.bisect_left(series, sample)
                    if pos < len(series) and series[pos] == sample:
                        continue  # an existing sample is not added (or announced) again
                    series.insert(pos, sample)
                self._publish(key, update_message(KeyType.MUTABLE, sample))

    def set_indexed(self, key: bytes, sub_key: bytes, value: bytes) -> bytes | None:
        with self._lock:
            mapping = self._typed(key, KeyType.INDEXED)
            if mapping is None:
                mapping = self._data[key] = {}
            old = mapping.get(sub_key)
            if old is not None:
                return old
            mapping[sub_key] = value
            self._publish(key, update_message(KeyType.INDEXED, value, sub_key))
        return None

    def delete(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            for key in keys:
                self._data.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    # Bulk transfer (RDB files)

    def dump_records(self, keys: Sequence[bytes] | None = None) -> list[tuple]:
        """Every key (or those given that exist) as ``(key, KeyType, raw content)`` records."""
        with self._lock:
            names = sorted(self._data) if keys is None else [k for k in keys if k in self._data]
            records = []
            for key in names:
                value = self._data[key]
                copy = value if isinstance(value, bytes) else type(value)(value)
                records.append((key, _PYTHON_TYPE[type(value)], copy))
            return records

    def load_records(self, records: Iterable[tuple]) -> int:
        """Replace the keys named in `records` with their content, all at once."""
        staged = {}
        for key, key_type, content in records:
            if key_type == KeyType.IMMUTABLE:
                staged[key] = bytes(content)
            elif key_type == KeyType.MUTABLE:
                staged[key] = sorted(content)  # zset members are unique by construction
            else:
                staged[key] = dict(content)
        with self._lock:
            self._data.update(staged)
        return len(staged)

    # Waiting: subscribers get (key, update message) pairs, as Redis pub/sub would deliver them.

    def _publish(self, key: bytes, message: bytes) -> None:
        for deliver in self._subscribers.get(key, ()):
            deliver((key, message))

    @contextlib.contextmanager
    def _subscribed(self, keys: Sequence[bytes], deliver: Callable[[Update], None]):
        with self._lock:
            for key in keys:
                self._subscribers.setdefault(key, set()).add(deliver)
        try:
            yield
        finally:
            with self._lock:
                for key in keys:
                    subscribers = self._subscribers.get(key)
                    if subscribers is not None:
                        subscribers.discard(deliver)
                        if not subscribers:
                            del self._subscribers[key]

    @contextlib.contextmanager
    def monitor_keys(self, keys: Sequence[bytes]) -> Iterator[Callable[[float | None], Update]]:
        """Subscribe to updates of `keys`; yields ``next_update(timeout)``.

        ``next_update`` returns the next ``(key, message)`` or raises `queue.Empty` on timeout.
        """
        updates: queue.SimpleQueue = queue.SimpleQueue()
        with self._subscribed(keys, updates.put):
            yield lambda timeout: updates.get(timeout=timeout)

    @contextlib.asynccontextmanager
    async def amonitor_keys(self, keys: Sequence[bytes]):
        """asyncio version of `monitor_keys`: yields a coroutine function ``next_update()``."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()

        def deliver(update: Update) -> None:
            # Writers may be on other threads; hand the update to the loop that waits.
            loop.call_soon_threadsafe(updates.put_nowait, update)

        with self._subscribed(keys, deliver):
            yield updates.get

    def close(self) -> None:
        pass


_named_lock = threading.Lock()
_named_backends: dict[str, MemoryBackend] = {}


def named_memory_backend(name: str) -> MemoryBackend:
    """The process-wide memory store called `name` (``memory://name``), created on first use.

    Daemons that run in one process (the embedded demo) share a telstate this way, as separate
    processes share a Redis server.
    """
    with _named_lock:
        backend = _named_backends.get(name)
        if backend is None:
            backend = _named_backends[name] = MemoryBackend()
        return backend


def forget_memory_backend(name: str) -> None:
    """Drop the named memory store (the next user of the name gets an empty one)."""
    with _named_lock:
        _named_backends.pop(name, None)
