"""Fixtures giving a telescope state on every backend, through the sync and the asyncio API.

The asyncio API is driven through `SyncOverAsync`, which runs each coroutine on an event loop in
a background thread, so that one test body checks both APIs the same way.
"""

import asyncio
import threading

import pytest

from karoo.telstate import TelescopeState
from karoo.telstate import aio as telstate_aio


class SyncOverAsync:
    """Sync facade over an aio.TelescopeState (runs coroutines on a loop in another thread)."""

    def __init__(self, ts, loop):
        object.__setattr__(self, "_ts", ts)
        object.__setattr__(self, "_loop", loop)

    def _wait(self, awaitable):
        return asyncio.run_coroutine_threadsafe(_as_coro(awaitable), self._loop).result()

    def __getattr__(self, name):
        attr = getattr(self._ts, name)
        if name in ("view", "root"):
            return lambda *args, **kwargs: SyncOverAsync(attr(*args, **kwargs), self._loop)
        if callable(attr) and asyncio.iscoroutinefunction(attr):
            return lambda *args, **kwargs: self._wait(attr(*args, **kwargs))
        return attr

    def __getitem__(self, key):
        return self._wait(self._ts[key])

    def __setitem__(self, key, value):
        self._wait(self._ts.set(key, value))

    def __contains__(self, key):
        return self._wait(self._ts.exists(key))


async def _as_coro(awaitable):
    return await awaitable


@pytest.fixture(scope="module")
def event_loop_thread():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


@pytest.fixture(params=["memory-sync", "redis-sync", "memory-async", "redis-async"])
def ts(request, redis_server, event_loop_thread):
    """An empty telescope state, for each backend and API."""
    backend, api = request.param.split("-")
    redis_server.client().flushall()
    if api == "sync":
        state = TelescopeState(redis_server.url if backend == "redis" else "")
        yield state
        state.close()
    else:
        async def make():
            return await telstate_aio.TelescopeState.from_url(
                redis_server.url if backend == "redis" else ""
            )

        state = asyncio.run_coroutine_threadsafe(make(), event_loop_thread).result()
        facade = SyncOverAsync(state, event_loop_thread)
        yield facade
        facade.close()
