"""The Redis backends (sync and asyncio), sharing one description of every operation.

Each operation is written once, as a generator that yields the Redis requests it needs (a
command, a Lua script, or a batch sent in one round trip) and receives their replies. The sync
backend runs these generators on a ``redis.Redis`` client, the asyncio backend on a
``redis.asyncio.Redis`` client, so the two cannot drift apart.

Scripts make every write atomic: an attribute is set only if absent (and its old value returned
otherwise), sensor samples are added and announced in one step, and reads resolve all the
prefixes of a view in a single round trip instead of one per prefix.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from . import errors
from .encoding import UPDATE_CHANNEL_PREFIX
from .keytypes import KeyType

_TYPE_CHECK = """
local function check_type(key, wanted)
    local t = redis.call('TYPE', key)['ok']
    if t ~= wanted and t ~= 'none' then
        return redis.error_reply('WRONGTYPE key ' .. key .. ' is a ' .. t .. ', not a ' .. wanted)
    end
    return t
end
"""

SCRIPTS = {
    # KEYS: for each requested key, its ARGV[1] candidate keys in a view's order of priority.
    # Returns a flat {type, value, type, value, ...}: per requested key the first candidate that
    # exists (0 and '' if none does). One script call replaces thousands of round trips.
    "get": """
local n = tonumber(ARGV[1])
local out = {}
for first = 1, #KEYS, n do
    local found = false
    for i = first, first + n - 1 do
        local key = KEYS[i]
        local t = redis.call('TYPE', key)['ok']
        if t == 'string' then
            out[#out + 1] = 1
            out[#out + 1] = redis.call('GET', key)
        elseif t == 'zset' then
            out[#out + 1] = 2
            out[#out + 1] = redis.call('ZREVRANGEBYLEX', key, '+', '-', 'LIMIT', 0, 1)[1]
        elseif t == 'hash' then
            out[#out + 1] = 3
            out[#out + 1] = redis.call('HGETALL', key)
        elseif t ~= 'none' then
            return redis.error_reply('WRONGTYPE key ' .. key .. ' is a ' .. t)
        end
        if t ~= 'none' then
            found = true
            break
        end
    end
    if not found then
        out[#out + 1] = 0
        out[#out + 1] = ''
    end
end
return out
""",
    "set_immutable": """
if redis.call('SETNX', KEYS[1], ARGV[1]) == 1 then
    redis.call('PUBLISH', 'update/' .. KEYS[1], '\\1' .. ARGV[1])
    return false
end
return redis.call('GET', KEYS[1])
""",
    # KEYS[i] gets sample ARGV[i]. Types are checked first so that nothing is added on error.
    "add_mutable": _TYPE_CHECK + """
-- One key needs no check: ZADD itself fails on a wrong type before writing anything.
if #KEYS > 1 then
    local checked = {}
    for _, key in ipairs(KEYS) do
        if not checked[key] then
            local t = check_type(key, 'zset')
            if type(t) == 'table' then return t end
            checked[key] = true
        end
    end
end
for i, key in ipairs(KEYS) do
    if redis.call('ZADD', key, 0, ARGV[i]) == 1 then
        redis.call('PUBLISH', 'update/' .. key, '\\2' .. ARGV[i])
    end
end
return false
""",
    "set_indexed": """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
    local message = '\\3' .. string.len(ARGV[1]) .. '\\n' .. ARGV[1] .. ARGV[2]
    redis.call('PUBLISH', 'update/' .. KEYS[1], message)
    return false
end
return redis.call('HGET', KEYS[1], ARGV[1])
""",
    # Returns false if no candidate exists, {1} if the sub-key is missing, else {1, value}.
    "get_indexed": _TYPE_CHECK + """
for _, key in ipairs(KEYS) do
    local t = check_type(key, 'hash')
    if type(t) == 'table' then return t end
    if t == 'hash' then
        local value = redis.call('HGET', key, ARGV[1])
        if value then return {1, value} end
        return {1}
    end
end
return false
""",
}
SCRIPT_SHAS = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in SCRIPTS.items()}

_REDIS_TYPES = {b"string": KeyType.IMMUTABLE, b"zset": KeyType.MUTABLE, b"hash": KeyType.INDEXED}
# Sensor adds and loads are sent in batches of this many samples (each batch is atomic).
BATCH = 10_000


@dataclass(frozen=True)
class Call:
    """One Redis command."""

    args: tuple

    def __init__(self, *args: Any) -> None:
        object.__setattr__(self, "args", args)


@dataclass(frozen=True)
class Script:
    """One of `SCRIPTS`, run with EVALSHA."""

    name: str
    keys: Sequence[bytes]
    args: Sequence[bytes] = ()

    @property
    def command(self) -> tuple:
        return ("EVALSHA", SCRIPT_SHAS[self.name], len(self.keys), *self.keys, *self.args)


@dataclass(frozen=True)
class Batch:
    """Requests sent in one round trip (atomically, inside MULTI/EXEC, if `transaction`)."""

    requests: Sequence[Call | Script]
    transaction: bool = False
    raise_on_error: bool = True  # if False, failed requests give their exception as the reply


Request = Call | Script | Batch
Op = Generator[Request, Any, Any]


def _command(request: Call | Script) -> tuple:
    return request.command if isinstance(request, Script) else request.args


def _translate(exc: Exception, where: str) -> Exception:
    if isinstance(exc, redis.ResponseError) and "WRONGTYPE" in str(exc):
        return errors.ImmutableKeyError(str(exc).replace("WRONGTYPE ", ""))
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return errors.ConnectionError(f"lost connection to Redis at {where}: {exc}")
    return exc


def _as_update(message: dict) -> tuple[bytes, bytes | None] | None:
    """A pub/sub message as ``(key, update message)``; a (re)subscription gives ``(key, None)``
    because updates may have been missed before it, and anything else None."""
    key = message["channel"][len(UPDATE_CHANNEL_PREFIX) :]
    if message["type"] == "subscribe":
        return key, None
    if message["type"] == "message":
        return key, message["data"]
    return None


def _pairs(flat: list) -> dict:
    return dict(zip(flat[::2], flat[1::2], strict=True))


class _Operations:
    """Every backend operation as a generator of Redis requests (see the module docstring)."""

    def _key_type(self, keys: Sequence[bytes]) -> Op:
        types = yield Batch([Call("TYPE", key) for key in keys])
        for key_type in types:
            if key_type in _REDIS_TYPES:
                return _REDIS_TYPES[key_type]
            if key_type not in (b"none", "none"):
                raise errors.ImmutableKeyError(f"key has unsupported Redis type {key_type!r}")
        return None

    def _exists(self, keys: Sequence[bytes]) -> Op:
        return (yield Call("EXISTS", *keys)) > 0

    def _keys(self, pattern: bytes) -> Op:
        found, cursor = set(), 0
        while True:
            cursor, names = yield Call("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            found.update(names)
            if int(cursor) == 0:
                return sorted(found)

    def _get_many(self, key_lists: Sequence[Sequence[bytes]]) -> Op:
        """(value, KeyType) of the first existing candidate of each key list, or (None, None)."""
        if not key_lists:
            return []
        n = len(key_lists[0])
        if any(len(keys) != n for keys in key_lists):
            raise ValueError("every key needs the same number of candidates")
        per_call = max(1, BATCH // n)
        calls = [
            Script("get", [k for keys in key_lists[i : i + per_call] for k in keys], [n])
            for i in range(0, len(key_lists), per_call)
        ]
        replies = yield Batch(calls) if len(calls) > 1 else calls[0]
        flat = [x for reply in replies for x in reply] if len(calls) > 1 else replies
        out = []
        for code, value in zip(flat[::2], flat[1::2], strict=True):
            if code == 0:
                out.append((None, None))
            elif code == KeyType.INDEXED:
                out.append((_pairs(value), KeyType.INDEXED))
            else:
                out.append((value, KeyType(code)))
        return out

    def _get(self, keys: Sequence[bytes]) -> Op:
        return (yield from self._get_many([keys]))[0]

    def _get_indexed(self, keys: Sequence[bytes], sub_key: bytes) -> Op:
        reply = yield Script("get_indexed", keys, [sub_key])
        if reply is None:
            return False, None
        return True, (reply[1] if len(reply) > 1 else None)

    def _get_range(self, keys, start: bytes, end: bytes, include_previous: bool) -> Op:
        ranges = [Call("ZRANGEBYLEX", key, start, end) for key in keys]
        if include_previous:
            previous = [Call("ZREVRANGEBYLEX", key, start, "-", "LIMIT", 0, 1) for key in keys]
            ranges = previous + ranges
        if len(keys) == 1:
            # The common case, in one round trip without a transaction: ZRANGEBYLEX fails by
            # itself on a key of the wrong type, and only an empty answer needs a second look.
            replies = yield Batch(ranges) if include_previous else ranges[0]
            samples = [s for r in replies for s in r] if include_previous else replies
            if samples or (yield Call("EXISTS", keys[0])):
                return samples
            return None
        # Several prefixes: the first key that exists wins, whatever its type. A transaction
        # rather than a script: building a large Lua table of samples costs the server three
        # times what ZRANGEBYLEX does.
        replies = yield Batch([Call("TYPE", key) for key in keys] + ranges, transaction=True,
                              raise_on_error=False)
        per_key = 2 if include_previous else 1
        for i, (key, redis_type) in enumerate(zip(keys, replies, strict=False)):
            if redis_type in (b"none", "none"):
                continue
            if redis_type not in (b"zset", "zset"):
                raise errors.ImmutableKeyError(f"key {key!r} is a {redis_type!r}, not a sensor")
            found = [replies[len(keys) + j * len(keys) + i] for j in range(per_key)]
            return [sample for samples in found for sample in samples]
        return None

    def _set_immutable(self, key: bytes, value: bytes) -> Op:
        return (yield Script("set_immutable", [key], [value]))

    def _add_mutable(self, key: bytes, sample: bytes) -> Op:
        yield Script("add_mutable", [key], [sample])

    def _add_mutable_many(self, samples: Iterable[tuple[bytes, bytes]]) -> Op:
        samples = list(samples)
        batches = [samples[i : i + BATCH] for i in range(0, len(samples), BATCH)]
        if batches:
            yield Batch(
                [Script("add_mutable", [k for k, _ in b], [s for _, s in b]) for b in batches]
            )

    def _set_indexed(self, key: bytes, sub_key: bytes, value: bytes) -> Op:
        return (yield Script("set_indexed", [key], [sub_key, value]))

    def _delete(self, keys: Sequence[bytes]) -> Op:
        yield Call("UNLINK", *keys)

    def _clear(self) -> Op:
        yield Call("FLUSHDB", "ASYNC")

    def _dump_records(self, keys: Sequence[bytes] | None = None) -> Op:
        if keys is None:
            keys = yield from self._keys(b"*")
        records = []
        for i in range(0, len(keys), 1000):
            names = keys[i : i + 1000]
            types = yield Batch([Call("TYPE", key) for key in names])
            fetch, kinds = [], []
            for key, redis_type in zip(names, types, strict=True):
                key_type = _REDIS_TYPES.get(redis_type)
                if key_type is None:
                    continue  # deleted meanwhile, or not a telstate key
                kinds.append((key, key_type))
                fetch.append(
                    Call("GET", key) if key_type == KeyType.IMMUTABLE
                    else Call("ZRANGE", key, 0, -1) if key_type == KeyType.MUTABLE
                    else Call("HGETALL", key)
                )
            values = yield Batch(fetch, transaction=True)
            for (key, key_type), value in zip(kinds, values, strict=True):
                if value is None or value == [] or value == {}:
                    continue
                if isinstance(value, list) and key_type == KeyType.INDEXED:
                    value = _pairs(value)
                records.append((key, key_type, value))
        return records

    def _load_records(self, records: Iterable[tuple]) -> Op:
        requests: list[Call] = []
        count = 0
        for key, key_type, content in records:
            count += 1
            requests.append(Call("UNLINK", key))
            if key_type == KeyType.IMMUTABLE:
                requests.append(Call("SET", key, content))
            elif key_type == KeyType.MUTABLE:
                members = list(content)
                for i in range(0, len(members), BATCH):
                    chunk = members[i : i + BATCH]
                    requests.append(Call("ZADD", key, *(x for m in chunk for x in (0, m))))
            else:
                items = list(content.items())
                for i in range(0, len(items), BATCH):
                    chunk = items[i : i + BATCH]
                    requests.append(Call("HSET", key, *(x for kv in chunk for x in kv)))
        if requests:
            yield Batch(requests, transaction=True)
        return count


OPERATIONS = [
    "key_type", "exists", "keys", "get", "get_many", "get_indexed", "get_range",
    "set_immutable", "add_mutable", "add_mutable_many", "set_indexed", "delete", "clear",
    "dump_records", "load_records",
]


def _client_options(socket_timeout: float | None) -> dict:
    return dict(
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        health_check_interval=30,
        # Reconnect and resend on a dropped connection: every operation here is idempotent
        # (set-if-absent, add-if-new, reads), so a resend after a lost reply is harmless.
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


class RedisBackend(_Operations):
    """Telescope state on a Redis server, through a synchronous ``redis.Redis`` client."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        kwargs = client.connection_pool.connection_kwargs
        self.where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"

    @classmethod
    def from_url(cls, url: str, db: int | None = None, socket_timeout: float | None = 5.0):
        options = _client_options(socket_timeout)
        if db is not None:
            options["db"] = db
        backend = cls(redis.Redis.from_url(url, **options))
        backend._check_connection()
        return backend

    def __repr__(self) -> str:
        return f"<RedisBackend at {self.where}>"

    def _check_connection(self) -> None:
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise _translate(exc, self.where) from exc

    def _send(self, request: Request):
        if isinstance(request, Batch):
            pipe = self.client.pipeline(transaction=request.transaction)
            for sub in request.requests:
                pipe.execute_command(*_command(sub))
            return pipe.execute(raise_on_error=request.raise_on_error)
        return self.client.execute_command(*_command(request))

    def _load_scripts(self) -> None:
        for source in SCRIPTS.values():
            self.client.script_load(source)

    def _run(self, op: Op):
        try:
            request = next(op)
            while True:
                try:
                    reply = self._send(request)
                except redis.exceptions.NoScriptError:
                    self._load_scripts()  # a new or restarted server has no scripts cached
                    reply = self._send(request)
                request = op.send(reply)
        except StopIteration as stop:
            return stop.value
        except redis.RedisError as exc:
            raise _translate(exc, self.where) from exc

    @contextlib.contextmanager
    def monitor_keys(self, keys: Sequence[bytes]):
        """Subscribe to the update channels of `keys`; yields ``next_update(timeout)``.

        ``next_update`` returns ``(key, message)``, ``(key, None)`` when a (re)subscription is
        confirmed (state may have changed unseen, so check again), or raises `queue.Empty`.
        """
        pubsub = self.client.pubsub()
        try:
            pubsub.subscribe(*(UPDATE_CHANNEL_PREFIX + key for key in keys))

            def next_update(timeout: float | None):
                while True:
                    try:
                        message = pubsub.get_message(timeout=timeout)
                    except redis.RedisError as exc:
                        raise _translate(exc, self.where) from exc
                    if message is None:
                        raise queue.Empty
                    update = _as_update(message)
                    if update is not None:
                        return update

            yield next_update
        finally:
            pubsub.close()

    def close(self) -> None:
        self.client.close()


class AsyncRedisBackend(_Operations):
    """Telescope state on a Redis server, through a ``redis.asyncio.Redis`` client."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        kwargs = client.connection_pool.connection_kwargs
        self.where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"

    @classmethod
    async def from_url(cls, url: str, db: int | None = None, socket_timeout: float | None = 5.0):
        options = _client_options(socket_timeout)
        if db is not None:
            options["db"] = db
        backend = cls(redis.asyncio.Redis.from_url(url, **options))
        try:
            await backend.client.ping()
        except redis.RedisError as exc:
            await backend.client.aclose()
            raise _translate(exc, backend.where) from exc
        return backend

    def __repr__(self) -> str:
        return f"<AsyncRedisBackend at {self.where}>"

    async def _send(self, request: Request):
        if isinstance(request, Batch):
            async with self.client.pipeline(transaction=request.transaction) as pipe:
                for sub in request.requests:
                    pipe.execute_command(*_command(sub))
                return await pipe.execute(raise_on_error=request.raise_on_error)
        return await self.client.execute_command(*_command(request))

    async def _run(self, op: Op):
        try:
            request = next(op)
            while True:
                try:
                    reply = await self._send(request)
                except redis.exceptions.NoScriptError:
                    for source in SCRIPTS.values():
                        await self.client.script_load(source)
                    reply = await self._send(request)
                request = op.send(reply)
        except StopIteration as stop:
            return stop.value
        except redis.RedisError as exc:
            raise _translate(exc, self.where) from exc

    @contextlib.asynccontextmanager
    async def amonitor_keys(self, keys: Sequence[bytes]):
        """asyncio version of `RedisBackend.monitor_keys`; yields ``await next_update()``."""
        pubsub = self.client.pubsub()
        try:
            await pubsub.subscribe(*(UPDATE_CHANNEL_PREFIX + key for key in keys))

            async def next_update():
                while True:
                    try:
                        message = await pubsub.get_message(timeout=None)
                    except redis.RedisError as exc:
                        raise _translate(exc, self.where) from exc
                    update = None if message is None else _as_update(message)
                    if update is not None:
                        return update

            yield next_update
        finally:
            await pubsub.aclose()

    async def close(self) -> None:
        await self.client.aclose()


def _make_sync(name: str):
    op = getattr(_Operations, "_" + name)

    def method(self, *args, **kwargs):
        return self._run(op(self, *args, **kwargs))

    method.__name__ = name
    return method


def _make_async(name: str):
    op = getattr(_Operations, "_" + name)

    async def method(self, *args, **kwargs):
        return await self._run(op(self, *args, **kwargs))

    method.__name__ = name
    return method


for _name in OPERATIONS:
    setattr(RedisBackend, _name, _make_sync(_name))
    setattr(AsyncRedisBackend, _name, _make_async(_name))
