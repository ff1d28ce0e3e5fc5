"""The asyncio telescope state, used by the daemons.

Every call that reaches the store is a coroutine. The in-memory backend is the same object as the
synchronous one (so a sync and an async view can share it); Redis uses `AsyncRedisBackend`.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..encoding import ENCODING_DEFAULT, ensure_binary
from ..keytypes import KeyType
from ..memory import MemoryBackend, named_memory_backend
from ..redis import AsyncRedisBackend
from ..telescope_state import Condition, Key, TelescopeStateBase, _NextUpdate, _one

__all__ = ["AsyncRedisBackend", "MemoryBackend", "TelescopeState"]


class TelescopeState(TelescopeStateBase):
    """asyncio twin of `karoo.telstate.TelescopeState` (same operations, awaited).

    Parameters
    ----------
    backend
        `MemoryBackend` (default) or `AsyncRedisBackend`; see also `from_url`.
    prefixes, base
        As for the synchronous class.
    """

    def __init__(self, backend=None, prefixes: Sequence[Key] = (b"",), base=None) -> None:
        super().__init__(backend if backend is not None else MemoryBackend(), prefixes, base)

    @classmethod
    async def from_url(cls, url: str, db: int | None = None) -> TelescopeState:
        """Connect to a Redis server (``redis://host:port[/db]``); '' gives a new memory store
        and ``memory://name`` the process-wide memory store of that name."""
        if not url:
            return cls()
        if url.startswith("memory://"):
            return cls(named_memory_backend(url[len("memory://"):]))
        if "://" not in url:
            url = "redis://" + url
        return cls(await AsyncRedisBackend.from_url(url, db=db))

    async def _run(self, op, next_update=None):
        try:
            request = next(op)
            while True:
                try:
                    if isinstance(request, _NextUpdate):
                        try:
                            result = await asyncio.wait_for(next_update(), request.timeout)
                        except TimeoutError:
                            result = None
                    else:
                        method, args = request
                        result = getattr(self._backend, method)(*args)
                        if inspect.isawaitable(result):
                            result = await result
                except Exception as exc:
                    request = op.throw(exc)  # the operation may explain or handle it
                else:
                    request = op.send(result)
        except StopIteration as stop:
            return stop.value

    async def get(self, key: Key, default: Any = None, return_encoded: bool = False) -> Any:
        return await self._run(self._op_get(key, default, return_encoded))

    def __getitem__(self, key: Key):
        """``await ts[key]``: the value, or KeyError."""
        return self._run(self._op_getitem(key))

    async def get_many(
        self, keys: Sequence[Key], default: Any = None, return_encoded: bool = False
    ) -> dict[Key, Any]:
        return await self._run(self._op_get_many(list(keys), default, return_encoded))

    async def get_range(
        self, key: Key, st: float | None = None, et: float | None = None,
        include_previous: bool | None = None, include_end: bool = False,
        return_encoded: bool = False,
    ) -> list[tuple[Any, float]]:
        return await self._run(
            self._op_get_range(key, st, et, include_previous, include_end, return_encoded)
        )

    async def get_indexed(
        self, key: Key, sub_key: Any, default: Any = None, return_encoded: bool = False
    ) -> Any:
        return await self._run(self._op_get_indexed(key, sub_key, default, return_encoded))

    async def exists(self, key: Key) -> bool:
        return await self._run(self._op_exists(key))

    async def key_type(self, key: Key) -> KeyType | None:
        return await self._run(self._op_key_type(key))

    async def is_immutable(self, key: Key) -> bool:
        return await self.key_type(key) == KeyType.IMMUTABLE

    async def keys(self, filter: Key = "*") -> list[str]:
        return await self._run(self._op_keys(filter))

    async def add(
        self, key: Key, value: Any, ts: float | None = None, immutable: bool = False,
        encoding: bytes = ENCODING_DEFAULT,
    ) -> None:
        await self._run(self._op_add(key, value, ts, immutable, encoding))

    async def set(self, key: Key, value: Any, encoding: bytes = ENCODING_DEFAULT) -> None:
        await self.add(key, value, immutable=True, encoding=encoding)

    async def add_many(
        self, samples: Iterable[tuple[Key, Any, float]], encoding: bytes = ENCODING_DEFAULT
    ) -> None:
        await self._run(self._op_add_many(samples, encoding))

    async def set_indexed(
        self, key: Key, sub_key: Any, value: Any, encoding: bytes = ENCODING_DEFAULT
    ) -> None:
        await self._run(self._op_set_indexed(key, sub_key, value, encoding))

    async def delete(self, key: Key) -> None:
        await self._run(self._op_delete(key))

    async def clear(self) -> None:
        await self._run(self._op_clear())

    async def wait_key(
        self, key: Key, condition: Condition | None = None, timeout: float | None = None
    ) -> None:
        """Wait until `key` exists (and ``condition(value, timestamp)`` holds).

        Raises `karoo.telstate.TimeoutError` after `timeout` seconds; cancellation works too.
        """
        async with self._backend.amonitor_keys(self._full_keys(key)) as next_update:
            await self._run(self._op_wait_key(key, condition, timeout), next_update)

    async def wait_indexed(
        self, key: Key, sub_key: Any, condition: Callable[[Any], bool] | None = None,
        timeout: float | None = None,
    ) -> None:
        async with self._backend.amonitor_keys(self._full_keys(key)) as next_update:
            await self._run(self._op_wait_indexed(key, sub_key, condition, timeout), next_update)

    async def dump(self, path, keys: Iterable[Key] | None = None) -> int:
        """Write the store (or the given keys) to an RDB file, off the event loop."""
        from ..rdb import dump_rdb

        names = None if keys is None else [ensure_binary(k) for k in keys]
        records = await self._run(_one("dump_records", names))
        return await asyncio.to_thread(dump_rdb, path, records)

    async def load_from_file(self, file) -> int:
        """Load an RDB file into the store (all of it or nothing); returns the number of keys."""
        from ..rdb import load_rdb

        records = await asyncio.to_thread(load_rdb, file)
        return await self._run(_one("load_records", records))

    async def close(self) -> None:
        result = self._backend.close()
        if inspect.isawaitable(result):
            await result

