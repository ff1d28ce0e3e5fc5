"""TelescopeState: the katsdptelstate API over karoo's backends, synchronous and asyncio.

Each operation is written once in `TelescopeStateBase`, as a generator that yields the backend
calls it needs and receives their results; `TelescopeState` runs those generators with plain
calls and `karoo.telstate.aio.TelescopeState` with awaits. Views only change the list of
candidate keys handed to the backend, which resolves them in one step (one round trip on Redis).
"""

from __future__ import annotations

import math
import queue
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import Any

from . import errors
from .encoding import (
    ENCODING_DEFAULT,
    decode_samples,
    decode_value,
    encode_sub_key,
    encode_value,
    ensure_binary,
    ensure_str,
    equal_encoded_values,
    pack_query_timestamp,
    pack_timestamp,
    parse_update,
    split_sample,
)
from .keytypes import KeyType
from .memory import MemoryBackend, named_memory_backend

SEPARATOR = "_"
SEPARATOR_BYTES = b"_"

Key = str | bytes
Condition = Callable[[Any, float | None], bool]


class _NextUpdate:
    """Request for the next key update from the monitor a wait holds (None on timeout)."""

    __slots__ = ("timeout",)

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout


Op = Generator[Any, Any, Any]


def _call(method: str, *args: Any) -> tuple[str, tuple]:
    return method, args


def _one(method: str, *args: Any) -> Op:
    """An operation that is a single backend call."""
    return (yield _call(method, *args))


class TelescopeStateBase:
    """What the sync and asyncio TelescopeState share: prefixes, encoding and the operations."""

    SEPARATOR = SEPARATOR

    def __init__(self, backend, prefixes: Sequence[Key] = (b"",), base=None) -> None:
        if base is not None:
            backend = base.backend
        if not prefixes:
            raise ValueError("a view needs at least one prefix")
        # object.__setattr__ because the sync class turns attribute setting into telstate writes.
        object.__setattr__(self, "_backend", backend)
        object.__setattr__(self, "_prefixes", tuple(ensure_binary(p) for p in prefixes))

    @property
    def backend(self):
        return self._backend

    @property
    def prefixes(self) -> tuple[str, ...]:
        return tuple(ensure_str(p) for p in self._prefixes)

    @staticmethod
    def join(*names: str) -> str:
        """Join name components with the separator: ``join('cb', 'sdp_l0')`` is 'cb_sdp_l0'."""
        return SEPARATOR.join(names)

    def view(self, name: Key, add_separator: bool = True, exclusive: bool = False):
        """A view that reads `name_` first, then the current prefixes, and writes to `name_`."""
        name = ensure_binary(name)
        if name and add_separator and not name.endswith(SEPARATOR_BYTES):
            name += SEPARATOR_BYTES
        prefixes = (name,) if exclusive else (name, *self._prefixes)
        return type(self)(self._backend, prefixes=prefixes)

    def root(self):
        """A view of the whole store with no prefix."""
        return type(self)(self._backend)

    def __repr__(self) -> str:
        return f"<{type(self).__module__}.{type(self).__name__} {self.prefixes} on {self._backend}>"

    def _full_keys(self, key: Key) -> list[bytes]:
        key = ensure_binary(key)
        return [prefix + key for prefix in self._prefixes]

    def _write_key(self, key: Key) -> bytes:
        return self._prefixes[0] + ensure_binary(key)

    # Decoding what the backends return

    @staticmethod
    def _decode(raw, key_type: KeyType, return_encoded: bool) -> Any:
        if key_type == KeyType.MUTABLE:
            raw, _ = split_sample(raw)
        elif key_type == KeyType.INDEXED:
            if return_encoded:
                return raw
            return {decode_value(k): decode_value(v) for k, v in raw.items()}
        return raw if return_encoded else decode_value(raw)

    # The operations, each a generator of backend calls

    def _op_get(self, key: Key, default: Any, return_encoded: bool) -> Op:
        raw, key_type = yield _call("get", self._full_keys(key))
        return default if key_type is None else self._decode(raw, key_type, return_encoded)

    def _op_getitem(self, key: Key) -> Op:
        raw, key_type = yield _call("get", self._full_keys(key))
        if key_type is None:
            raise KeyError(ensure_str(key))
        return self._decode(raw, key_type, False)

    def _op_get_many(self, keys: Sequence[Key], default: Any, return_encoded: bool) -> Op:
        replies = yield _call("get_many", [self._full_keys(key) for key in keys])
        return {
            key: default if key_type is None else self._decode(raw, key_type, return_encoded)
            for key, (raw, key_type) in zip(keys, replies, strict=True)
        }

    def _op_get_range(
        self, key: Key, st: float | None, et: float | None, include_previous: bool | None,
        include_end: bool, return_encoded: bool,
    ) -> Op:
        if et is None:
            et = math.inf
        if st is None:
            st = et
            if include_previous is None:
                include_previous = True
        elif include_previous is None:
            include_previous = False
        start = pack_query_timestamp(st, is_end=False)
        end = pack_query_timestamp(et, is_end=True, include_end=include_end)
        samples = yield _call("get_range", self._full_keys(key), start, end, include_previous)
        if samples is None:
            raise KeyError(ensure_str(key))
        if return_encoded:
            return [split_sample(sample) for sample in samples]
        return decode_samples(samples)

    def _op_get_indexed(self, key: Key, sub_key: Any, default: Any, return_encoded: bool) -> Op:
        found, raw = yield _call("get_indexed", self._full_keys(key), encode_sub_key(sub_key))
        if not found or raw is None:
            return default
        return raw if return_encoded else decode_value(raw)

    def _op_add(
        self, key: Key, value: Any, ts: float | None, immutable: bool, encoding: bytes
    ) -> Op:
        full_key = self._write_key(key)
        encoded = encode_value(value, encoding)
        if immutable:
            try:
                old = yield _call("set_immutable", full_key, encoded)
            except errors.ImmutableKeyError as exc:
                raise errors.ImmutableKeyError(
                    f"Attempt to change mutable key {ensure_str(full_key)} to immutable"
                ) from exc
            if old is not None and not equal_encoded_values(old, encoded):
                raise errors.ImmutableKeyError(
                    f"Attempt to change value of immutable key {ensure_str(full_key)} from "
                    f"{decode_value(old)!r} to {value!r}"
                )
            return
        sample = pack_timestamp(time.time() if ts is None else ts) + encoded
        try:
            yield _call("add_mutable", full_key, sample)
        except errors.ImmutableKeyError as exc:
            raise errors.ImmutableKeyError(
                f"Attempt to change immutable or indexed key {ensure_str(full_key)} to mutable"
            ) from exc

    def _op_add_many(self, samples: Iterable[tuple[Key, Any, float]], encoding: bytes) -> Op:
        packed = [
            (self._write_key(key), pack_timestamp(ts) + encode_value(value, encoding))
            for key, value, ts in samples
        ]
        try:
            yield _call("add_mutable_many", packed)
        except errors.ImmutableKeyError as exc:
            raise errors.ImmutableKeyError(f"add_many: {exc} (no sample was added)") from exc

    def _op_set_indexed(self, key: Key, sub_key: Any, value: Any, encoding: bytes) -> Op:
        full_key = self._write_key(key)
        encoded = encode_value(value, encoding)
        try:
            old = yield _call("set_indexed", full_key, encode_sub_key(sub_key), encoded)
        except errors.ImmutableKeyError as exc:
            raise errors.ImmutableKeyError(
                f"Attempt to change key {ensure_str(full_key)} to indexed"
            ) from exc
        if old is not None and not equal_encoded_values(old, encoded):
            raise errors.ImmutableKeyError(
                f"Attempt to change value of {ensure_str(full_key)}[{sub_key!r}] from "
                f"{decode_value(old)!r} to {value!r}"
            )

    def _op_exists(self, key: Key) -> Op:
        return (yield _call("exists", self._full_keys(key)))

    def _op_key_type(self, key: Key) -> Op:
        return (yield _call("key_type", self._full_keys(key)))

    def _op_keys(self, pattern: Key) -> Op:
        return [ensure_str(k) for k in (yield _call("keys", ensure_binary(pattern)))]

    def _op_delete(self, key: Key) -> Op:
        yield _call("delete", self._full_keys(key))

    def _op_clear(self) -> Op:
        yield _call("clear")

    # Waiting: subscribe first (the driver holds the monitor), then look, then follow updates.

    def _op_wait(
        self, full_keys: list[bytes], timeout: float | None,
        current: Callable[[], Op], from_update: Callable[[KeyType | None, bytes, bytes], Any],
    ) -> Op:
        deadline = None if timeout is None else time.monotonic() + timeout
        if (yield from current()):
            return
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            update = yield _NextUpdate(remaining)
            if update is None:
                break
            _, message = update
            if message is None:
                satisfied = yield from current()  # (re)subscribed: something may have changed
            else:
                key_type, payload, sub_key = parse_update(message)
                satisfied = from_update(key_type, payload, sub_key)
                if satisfied is None:
                    satisfied = yield from current()
            if satisfied:
                return
        names = ", ".join(ensure_str(k) for k in full_keys)
        raise errors.TimeoutError(f"timed out after {timeout} s waiting for {names}")

    def _op_wait_key(self, key: Key, condition: Condition | None, timeout: float | None) -> Op:
        full_keys = self._full_keys(key)

        def current() -> Op:
            raw, key_type = yield _call("get", full_keys)
            if key_type is None:
                return False
            if condition is None:
                return True
            ts = split_sample(raw)[1] if key_type == KeyType.MUTABLE else None
            return condition(self._decode(raw, key_type, False), ts)

        def from_update(key_type, payload, sub_key):
            if condition is None:
                return True
            if key_type == KeyType.IMMUTABLE:
                return condition(decode_value(payload), None)
            if key_type == KeyType.MUTABLE:
                encoded, ts = split_sample(payload)
                return condition(decode_value(encoded), ts)
            return None  # indexed or untyped update: look at the key itself

        return (yield from self._op_wait(full_keys, timeout, current, from_update))

    def _op_wait_indexed(
        self, key: Key, sub_key: Any, condition: Callable[[Any], bool] | None,
        timeout: float | None,
    ) -> Op:
        full_keys = self._full_keys(key)
        encoded_sub_key = encode_sub_key(sub_key)

        def satisfied(raw: bytes | None):
            if raw is None:
                return False
            return condition is None or condition(decode_value(raw))

        def current() -> Op:
            _, raw = yield _call("get_indexed", full_keys, encoded_sub_key)
            return satisfied(raw)

        def from_update(key_type, payload, update_sub_key):
            if key_type == KeyType.INDEXED:
                return satisfied(payload) if update_sub_key == encoded_sub_key else False
            return None

        return (yield from self._op_wait(full_keys, timeout, current, from_update))


def _backend_from_endpoint(endpoint, db: int):
    if endpoint == "" or endpoint is None:
        return MemoryBackend()
    if not isinstance(endpoint, str | bytes):
        return endpoint  # a backend instance
    endpoint = ensure_str(endpoint)
    if endpoint.startswith("memory://"):
        return named_memory_backend(endpoint[len("memory://"):])
    from .redis import RedisBackend

    if "://" not in endpoint:
        endpoint = "redis://" + endpoint  # host[:port], IPv6 hosts in brackets; port 6379
    return RedisBackend.from_url(endpoint, db=db)


class TelescopeState(TelescopeStateBase):
    """The telescope state: attributes, sensors and indexed keys, in memory or on Redis.

    Parameters
    ----------
    endpoint
        ``''`` for a new in-memory store, ``memory://name`` for the process-wide memory store
        of that name, a ``redis://host:port[/db]`` URL or ``host[:port]`` for a Redis server, or
        a backend instance.
    db
        Redis database number, when not given in the URL.
    prefixes
        Namespaces to read through (first match wins); writes go to the first.
    base
        Another TelescopeState whose backend to share.
    """

    def __init__(self, endpoint="", db: int = 0, prefixes: Sequence[Key] = (b"",), base=None):
        backend = None if base is not None else _backend_from_endpoint(endpoint, db)
        super().__init__(backend, prefixes, base)

    def _run(self, op: Op, next_update=None):
        try:
            request = next(op)
            while True:
                try:
                    if isinstance(request, _NextUpdate):
                        try:
                            result = next_update(request.timeout)
                        except queue.Empty:
                            result = None
                    else:
                        method, args = request
                        result = getattr(self._backend, method)(*args)
                except Exception as exc:
                    request = op.throw(exc)  # the operation may explain or handle it
                else:
                    request = op.send(result)
        except StopIteration as stop:
            return stop.value

    # Reading

    def get(self, key: Key, default: Any = None, return_encoded: bool = False) -> Any:
        """The value of an attribute, the latest value of a sensor, or an indexed key's dict."""
        return self._run(self._op_get(key, default, return_encoded))

    def __getitem__(self, key: Key) -> Any:
        return self._run(self._op_getitem(key))

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"telstate has no key {key!r}") from None

    def get_many(
        self, keys: Sequence[Key], default: Any = None, return_encoded: bool = False
    ) -> dict[Key, Any]:
        """Read many keys in one round trip; returns ``{key: value or default}``."""
        return self._run(self._op_get_many(list(keys), default, return_encoded))

    def get_range(
        self, key: Key, st: float | None = None, et: float | None = None,
        include_previous: bool | None = None, include_end: bool = False,
        return_encoded: bool = False,
    ) -> list[tuple[Any, float]]:
        """Sensor samples ``(value, timestamp)`` with ``st <= timestamp < et``.

        With ``st=None`` it is the latest sample before `et` (the latest of all by default).
        `include_previous` adds the last sample before `st` (default: only when `st` is None);
        `include_end` makes the interval closed.
        """
        return self._run(
            self._op_get_range(key, st, et, include_previous, include_end, return_encoded)
        )

    def get_indexed(
        self, key: Key, sub_key: Any, default: Any = None, return_encoded: bool = False
    ) -> Any:
        return self._run(self._op_get_indexed(key, sub_key, default, return_encoded))

    def __contains__(self, key: Key) -> bool:
        return self._run(self._op_exists(key))

    def exists(self, key: Key) -> bool:
        return key in self

    def key_type(self, key: Key) -> KeyType | None:
        return self._run(self._op_key_type(key))

    def is_immutable(self, key: Key) -> bool:
        return self.key_type(key) == KeyType.IMMUTABLE

    def keys(self, filter: Key = "*") -> list[str]:
        """All key names in the store matching a Redis glob, sorted (ignores the view)."""
        return self._run(self._op_keys(filter))

    # Writing

    def add(
        self, key: Key, value: Any, ts: float | None = None, immutable: bool = False,
        encoding: bytes = ENCODING_DEFAULT,
    ) -> None:
        """Add a sensor sample at `ts` (default now), or set an attribute if `immutable`."""
        self._run(self._op_add(key, value, ts, immutable, encoding))

    def set(self, key: Key, value: Any, encoding: bytes = ENCODING_DEFAULT) -> None:
        """Set an attribute (write once; setting it again to the same value is allowed)."""
        self.add(key, value, immutable=True, encoding=encoding)

    def __setitem__(self, key: Key, value: Any) -> None:
        self.set(key, value)

    def __setattr__(self, key: str, value: Any) -> None:
        if key.startswith("_"):
            object.__setattr__(self, key, value)
        elif hasattr(type(self), key):
            raise AttributeError(f"the name {key!r} is reserved; use telstate[{key!r}] = ...")
        else:
            self.set(key, value)

    def add_many(
        self, samples: Iterable[tuple[Key, Any, float]], encoding: bytes = ENCODING_DEFAULT
    ) -> None:
        """Add many ``(key, value, timestamp)`` sensor samples at once (one round trip)."""
        self._run(self._op_add_many(samples, encoding))

    def set_indexed(
        self, key: Key, sub_key: Any, value: Any, encoding: bytes = ENCODING_DEFAULT
    ) -> None:
        """Set ``key[sub_key]`` (each sub-key is write once)."""
        self._run(self._op_set_indexed(key, sub_key, value, encoding))

    def delete(self, key: Key) -> None:
        """Delete `key` under every prefix of this view."""
        self._run(self._op_delete(key))

    def clear(self) -> None:
        """Delete every key in the store."""
        self._run(self._op_clear())

    # Waiting

    def wait_key(
        self, key: Key, condition: Condition | None = None, timeout: float | None = None
    ) -> None:
        """Wait until `key` exists (and ``condition(value, timestamp)`` holds).

        Woken by the backend's update notifications (Redis pub/sub), not by polling.

        Raises
        ------
        karoo.telstate.TimeoutError
            If `timeout` seconds pass first.
        """
        full_keys = self._full_keys(key)
        with self._backend.monitor_keys(full_keys) as next_update:
            self._run(self._op_wait_key(key, condition, timeout), next_update)

    def wait_indexed(
        self, key: Key, sub_key: Any, condition: Callable[[Any], bool] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Wait until ``key[sub_key]`` exists (and ``condition(value)`` holds)."""
        full_keys = self._full_keys(key)
        with self._backend.monitor_keys(full_keys) as next_update:
            self._run(self._op_wait_indexed(key, sub_key, condition, timeout), next_update)

    # Files

    def dump(self, path, keys: Iterable[Key] | None = None) -> int:
        """Write the store (or the given keys) to an RDB file; returns the number of keys."""
        from .rdb import dump_rdb

        names = None if keys is None else [ensure_binary(k) for k in keys]
        return dump_rdb(path, self._run(_one("dump_records", names)))

    def load_from_file(self, file) -> int:
        """Load an RDB file into the store (all of it or nothing); returns the number of keys."""
        from .rdb import load_rdb

        return self._run(_one("load_records", load_rdb(file)))

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> TelescopeState:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
