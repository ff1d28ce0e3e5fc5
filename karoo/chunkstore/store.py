"""Chunk store: one Zarr v3 group per capture-block stream, on a local directory or on S3.

Layout
------
A capture-block stream ``<cbid>_<stream>`` lives in the Zarr v3 group ``<prefix>`` with
``prefix = "<cbid>-<stream>"`` (every ``_`` turned into ``-``, as S3 bucket names need and as
katdal expects). With an S3 URL that names no bucket (``s3://``) the prefix *is* the bucket, as
in katdal's S3 layout; ``s3://bucket/path`` puts the groups under that path instead; a local
directory holds one sub-directory per group. The group holds four arrays:

=================  ===========  =========  ==========  ===================================
array              shape        dtype      fill value  compression (see below)
=================  ===========  =========  ==========  ===================================
correlator_data    (T, F, B)    complex64  0           none
flags              (T, F, B)    uint8      8           zstd level 1
weights            (T, F, B)    uint8      0           blosc lz4 + bit shuffle
weights_channel    (T, F)       float32    0           blosc lz4 + bit shuffle
=================  ===========  =========  ==========  ===================================

The ``flags`` fill value is ``data_lost`` (8), so a chunk that never arrived reads as lost data,
never as good zeros. Chunks split time and channel only, never baselines, in powers of two
chosen by :func:`choose_chunks` (at most 20 MB by default, so 10-20 MB unless the whole band is
smaller). With ``shard_chunks`` the chunks are grouped into Zarr shards (one object per shard),
for observations that would otherwise create millions of objects. A chunk written into a shard
with :meth:`StreamStore.write_chunk` is a read-modify-write of the whole shard (serialised per
shard); :meth:`StreamStore.write_shard` writes all the chunks of a shard in one go, without
reading, which is what the writer daemon does whenever it holds a whole shard.

The time axis grows as dumps arrive: :meth:`StreamStore.write_chunk` extends the arrays' shape
before writing beyond the end (to whole rows of chunks or shards, at least doubling the extent, so
a capture costs only a logarithmic number of metadata writes), and :meth:`StreamStore.finish`
sets the exact number of dumps at the end of the capture. During a capture the shape is thus an
upper bound, with chunks not yet written reading as their fill value; after ``finish`` it is
exact. This was preferred to a generous pre-set shape, which would leave a reader of a finished
store guessing where the data ends, and to growing by one row at a time (one metadata write per
array per row).

Compression was chosen by measuring numcodecs on realistic 17 MB chunks (4 x 256 x 4160) on the
2-core development machine (ratio, encode / decode MB/s on one core):

* ``correlator_data`` (Gaussian noise, like real visibilities): zstd-1 1.08x 696/865 MB/s, lz4
  1.00x, blosc-lz4-shuffle 1.07x 841/1709, blosc-lz4-bitshuffle 1.11x 912/1257. Nothing saves more
  than 10 %, and every codec costs more CPU than the disk or network it saves, so none.
* ``flags`` (mostly 0, a few flagged channels, 1 % RFI): zstd-1 46x 1724/2970 MB/s, lz4 19x,
  blosc-zstd-shuffle 50x 1231/1751, blosc-zstd-bitshuffle 51x 914/1034. zstd-1: nearly the best
  ratio at twice the speed of the blosc variants.
* ``weights`` (uint8 close to 255): blosc-lz4-bitshuffle 2.64x 2451/1844 MB/s, zstd-1 2.86x
  358/1371, blosc-zstd-bitshuffle 2.74x 821/1013. Bit shuffle + lz4 keeps nearly all the ratio at
  7x zstd's encode speed.
* ``weights_channel`` (float32 near 1): blosc-lz4-bitshuffle 1.64x 613/863 MB/s, zstd-1 1.38x
  180/271. It is tiny anyway.

Writes and atomicity
--------------------
:meth:`StreamStore.write_chunk` is a coroutine; the caller decides how many run at once (e.g. with
a semaphore); many in flight is what makes Zarr v3 fast. Every chunk object appears whole or not
at all: an S3 PUT is atomic by itself, and the local file system used here writes each object to
a temporary name in the same directory and renames it into place (fsspec's own local ``pipe``
writes in place, so a killed writer would leave half a chunk). Local directories and S3 go
through the same code: a Zarr ``FsspecStore`` over an fsspec file system, wrapped in a store
that retries transient failures.

Speed
-----
A whole chunk is encoded and stored (or fetched and decoded) through the array's own codec
pipeline without Zarr's intermediate merge buffer, and the object goes to the file system as a
view of the encoded buffer, not a fresh ``bytes`` copy; partial chunks (the last dumps of a
capture) and shards go through Zarr's ``setitem``/``getitem``. S3 requests are signed with
``UNSIGNED-PAYLOAD`` (botocore otherwise hashes every body with SHA-256 when the endpoint is
plain http, on the event loop); pass ``storage_options={"config_kwargs": {"s3":
{"payload_signing_enabled": True}}}`` to sign bodies. ``benchmarks/bench_chunkstore.py``
measures the effect against katdal's stores and raw I/O.

Errors
------
Failed S3 requests (connection refused or reset, timeouts, 5xx answers) are retried with
exponential backoff (``retries``, ``backoff``, ``max_backoff``) and then raise
:class:`StoreUnavailable`. A chunk that was never written reads as its fill value, so a reader
can tell "never written" (fill value, or ``False`` from :meth:`StreamStore.has_chunk`) from
"server failed" (an exception).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import io
import logging
import math
import os
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
import zarr.api.asynchronous as zarr_async
from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
from fsspec.implementations.local import LocalFileSystem
from zarr.abc.store import ByteRequest, Store
from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import FsspecStore, WrapperStore
from zarr.storage._fsspec import _dereference_path

from .. import flags

logger = logging.getLogger(__name__)

DATA_LOST = int(flags.DATA_LOST)
"""Flag bit for data that never arrived (katdal's ``data_lost``)."""

DEFAULT_MAX_CHUNK_BYTES = 20_000_000
DEFAULT_MAX_DUMPS = 16


class ChunkStoreError(Exception):
    """Base class of the chunk store's errors."""


class StoreUnavailable(ChunkStoreError, OSError):
    """The store failed, even after retries: a server error, not a missing chunk."""


class BadChunk(ChunkStoreError, ValueError):
    """A chunk of the wrong shape, dtype or position was given."""


@dataclass(frozen=True)
class ArraySpec:
    """What is stored for one array of a capture-block stream."""

    dtype: np.dtype
    ndim: int
    fill_value: Any
    compressors: tuple

    @property
    def dimension_names(self) -> tuple[str, ...]:
        return ("dump", "channel", "baseline")[: self.ndim]


def _lz4_bitshuffle(typesize: int) -> BloscCodec:
    return BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle, typesize=typesize)


ARRAYS: dict[str, ArraySpec] = {
    "correlator_data": ArraySpec(np.dtype(np.complex64), 3, 0j, ()),
    "flags": ArraySpec(np.dtype(np.uint8), 3, DATA_LOST, (ZstdCodec(level=1),)),
    "weights": ArraySpec(np.dtype(np.uint8), 3, 0, (_lz4_bitshuffle(1),)),
    "weights_channel": ArraySpec(np.dtype(np.float32), 2, 0.0, (_lz4_bitshuffle(4),)),
}
"""The arrays of a capture-block stream, by name."""


def stream_prefix(capture_block_id: str, stream: str) -> str:
    """Name of the group (katdal's ``prefix``, the bucket on S3) of a capture-block stream."""
    return f"{capture_block_id}-{stream}".replace("_", "-")


def _floor_power_of_two(x: float) -> int:
    return 1 << max(0, math.floor(math.log2(max(x, 1))))


def choose_chunks(
    n_chans: int,
    n_bls: int,
    dtype: np.typing.DTypeLike,
    max_bytes: float = DEFAULT_MAX_CHUNK_BYTES,
    max_dumps: int = DEFAULT_MAX_DUMPS,
    max_chans: int | None = None,
) -> tuple[int, int]:
    """Chunk extent in time and channel for one array, never splitting baselines.

    The channel extent is the largest power of two (or the whole band) whose one-dump chunk fits
    in `max_bytes`; the time extent is then doubled while the chunk still fits and stays within
    `max_dumps`. This is katsdpdatawriter's rule, so chunks come out at about half to all of
    `max_bytes`.

    Parameters
    ----------
    n_chans, n_bls
        Number of channels and baselines (pass ``n_bls=1`` for ``weights_channel``).
    dtype
        Element type.
    max_bytes
        Upper limit on the size of a chunk (one dump by one channel is the smallest chunk, even
        if larger).
    max_dumps
        Upper limit on the time extent (how many dumps a writer buffers).
    max_chans
        Optional upper limit on the channel extent.

    Returns
    -------
    tuple of int
        ``(dumps, channels)`` per chunk.
    """
    if n_chans < 1 or n_bls < 1 or max_dumps < 1:
        raise ValueError("n_chans, n_bls and max_dumps must be positive")
    itemsize = np.dtype(dtype).itemsize
    chans = n_chans if max_chans is None else min(n_chans, max_chans)
    if chans * n_bls * itemsize > max_bytes or chans < n_chans:
        chans = min(chans, _floor_power_of_two(max_bytes / (n_bls * itemsize)))
        chans = _floor_power_of_two(chans)
    dumps = 1
    while dumps * 2 <= max_dumps and dumps * 2 * chans * n_bls * itemsize <= max_bytes:
        dumps *= 2
    return dumps, chans


def _grid(extent: int, step: int) -> tuple[int, ...]:
    """Dask-style chunk sizes along one axis."""
    sizes = (step,) * (extent // step)
    return sizes + ((extent % step,) if extent % step else ())


def chunk_info_entry(prefix: str, shape: tuple[int, ...], chunks: tuple[int, ...],
                     dtype: np.typing.DTypeLike) -> dict:
    """One array's entry of katdal's ``chunk_info``.

    Returns
    -------
    dict
        ``{"prefix": str, "chunks": tuple of tuples of int, "shape": tuple, "dtype": descr}``
        with the dtype as the numpy descr string katdal expects (e.g. ``"<c8"``, ``"|u1"``).
    """
    return {
        "prefix": prefix,
        "chunks": tuple(_grid(n, c) for n, c in zip(shape, chunks, strict=True)),
        "shape": tuple(int(n) for n in shape),
        "dtype": np.lib.format.dtype_to_descr(np.dtype(dtype)),
    }


# -- the file systems and the retrying store ---------------------------------------------------


class AtomicLocalFileSystem(LocalFileSystem):
    """fsspec's local file system, with whole-object writes that never show half a file.

    ``pipe_file`` writes to a unique temporary name in the target directory and renames it into
    place, so a reader sees the old object, or the new one, never a part.
    """

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        path = self._strip_protocol(path)
        directory = os.path.dirname(path)
        if self.auto_mkdir:
            os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.partial")
        try:
            with open(tmp, "wb") as f:
                f.write(value)
            if mode == "create" and os.path.exists(path):
                raise FileExistsError(path)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


class _CopyFreeFsspecStore(FsspecStore):
    """Zarr's fsspec store, handing the file system a view of each object, not a copy.

    ``FsspecStore.set`` copies every object into a new ``bytes`` first (``Buffer.to_bytes``):
    on 15 MB chunks that copy, done on the event loop, was the largest single cost of a write.
    Local files take the view as it is; S3 gets it through one copy (see below).
    """

    async def set(self, key: str, value: Buffer, byte_range: tuple[int, int] | None = None):
        if not self._is_open:
            await self._open()
        self._check_writable()
        if byte_range is not None:
            raise NotImplementedError
        data = value.as_numpy_array()
        if not data.flags.c_contiguous:
            payload = value.to_bytes()
        elif isinstance(self.fs, AsyncFileSystemWrapper):  # local files
            payload = memoryview(data)
        else:
            # botocore's parameter check takes bytes, bytearray or files, and turns bytes into a
            # BytesIO that aiohttp copies again and sends in 64 kB pieces. A stand-in file
            # passes the check and is swapped for the view itself just before the request is
            # built (_send_view), which aiohttp sends as it is: no copy at all.
            payload = _ViewBody(memoryview(data))
        await self.fs._pipe_file(_dereference_path(self.path, key), payload)


class _ViewBody(io.BytesIO):
    """An empty file standing in for a memoryview body until botocore builds the request."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self.view = view

    def __len__(self) -> int:  # s3fs asks the size of a body
        return self.view.nbytes


def _send_view(params: dict, **kwargs) -> None:
    """botocore ``before-call`` handler: send a :class:`_ViewBody`'s view as the body."""
    body = params.get("body")
    if isinstance(body, _ViewBody):
        params["body"] = body.view


_LOCAL_IO_THREADS = 16
_local_io_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _local_io(func, *args, **kwargs):
    """Run a blocking file operation on the chunk store's own thread pool.

    asyncio's default pool has ``cpu_count + 4`` threads, too few to keep a disk busy with
    whole-chunk writes on a small machine, and shared with everything else in the process.
    """
    global _local_io_pool
    if _local_io_pool is None:
        _local_io_pool = concurrent.futures.ThreadPoolExecutor(
            _LOCAL_IO_THREADS, thread_name_prefix="karoo-chunk-io")
    return asyncio.get_running_loop().run_in_executor(
        _local_io_pool, functools.partial(func, *args, **kwargs))


class _LocalAsyncFileSystem(AsyncFileSystemWrapper):
    """fsspec's async wrapper of the local file system, with whole-object reads and writes on
    :func:`_local_io`'s threads."""

    async def _pipe_file(self, path, value, *args, **kwargs):
        return await _local_io(self.sync_fs.pipe_file, path, value, *args, **kwargs)

    async def _cat_file(self, path, *args, **kwargs):
        return await _local_io(self.sync_fs.cat_file, path, *args, **kwargs)


# Answers that mean "this object is not there" or "you may not": not worth retrying.
def _permanent_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [FileNotFoundError, IsADirectoryError,
                                         NotADirectoryError, FileExistsError, PermissionError]
    with contextlib.suppress(ImportError):
        import botocore.exceptions

        # A request botocore refuses to send is a programming error, not a server glitch.
        errors.append(botocore.exceptions.ParamValidationError)
    return tuple(errors)


_PERMANENT = _permanent_errors()
_BAD_REQUEST_ERRNOS = frozenset({errno.EINVAL, errno.ENAMETOOLONG, errno.EMSGSIZE})


def _transient_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, asyncio.TimeoutError, TimeoutError]
    with contextlib.suppress(ImportError):
        import botocore.exceptions

        errors += [botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError]
    with contextlib.suppress(ImportError):
        import aiohttp

        errors.append(aiohttp.ClientError)
    return tuple(errors)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently failed store requests are retried.

    Attempt ``n`` (from 1) that fails waits ``min(backoff * 2**(n-1), max_backoff)`` seconds
    before the next; after ``retries`` retries the error is raised as :class:`StoreUnavailable`.
    An attempt that takes longer than ``timeout`` seconds is abandoned and counts as failed (an
    S3 server can accept a request and never answer; the client's socket timeouts do not
    catch every such case).
    """

    retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0
    timeout: float | None = 120.0

    def delays(self) -> Iterable[float]:
        for n in range(self.retries):
            yield min(self.backoff * 2**n, self.max_backoff)


class RetryingStore(WrapperStore):
    """A Zarr store that retries transient failures and reports lasting ones clearly."""

    def __init__(self, store: Store, policy: RetryPolicy,
                 on_retry: Callable[[str, str, BaseException], None] | None = None) -> None:
        super().__init__(store)
        self.policy = policy
        self.on_retry = on_retry
        self._transient = _transient_errors()

    def _with_store(self, store: Store) -> RetryingStore:
        return type(self)(store, self.policy, self.on_retry)

    async def _retry(self, what: str, key: str, func, *args):
        delays = iter(self.policy.delays())
        attempt = 0
        while True:
            attempt += 1
            try:
                return await asyncio.wait_for(func(*args), self.policy.timeout)
            except _PERMANENT:
                raise
            except self._transient as exc:
                if isinstance(exc, OSError) and exc.errno in _BAD_REQUEST_ERRNOS:
                    # s3fs's mapping of S3 client errors (bad bucket name, bad argument...):
                    # asking again gets the same answer.
                    raise
                reason = f"{type(exc).__name__}: {exc or 'no answer in time'}"
                delay = next(delays, None)
                if delay is None:
                    raise StoreUnavailable(
                        f"{what} {key!r} failed after {attempt} attempts: {reason}"
                    ) from exc
                logger.warning("%s %r failed (%s), retrying in %.1f s", what, key, reason, delay)
                if self.on_retry is not None:
                    self.on_retry(what, key, exc)
                await asyncio.sleep(delay)

    async def get(self, key: str, prototype: BufferPrototype,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        return await self._retry("reading", key, self._store.get, key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        return await asyncio.gather(*(self.get(key, prototype, byte_range)
                                      for key, byte_range in key_ranges))

    async def set(self, key: str, value: Buffer) -> None:
        await self._retry("writing", key, self._store.set, key, value)

    async def exists(self, key: str) -> bool:
        return await self._retry("checking", key, self._store.exists, key)

    async def delete(self, key: str) -> None:
        await self._retry("deleting", key, self._store.delete, key)


# -- the store -----------------------------------------------------------------------------------


class ChunkStore:
    """Where capture-block streams are stored: a local directory or an S3 service.

    Parameters
    ----------
    url
        A local directory (``/data`` or ``file:///data``), ``s3://`` (one bucket per
        capture-block stream, named by its prefix, as katdal does) or ``s3://bucket[/path]`` (the
        groups under that path).
    endpoint_url, access_key, secret_key
        S3 endpoint and credentials. When not given, the standard AWS sources apply
        (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``~/.aws``).
    retries, backoff, max_backoff
        Retry policy for failed requests (see :class:`RetryPolicy`).
    timeout
        Seconds to wait for an S3 connection and for each read, and (times two)
        for a whole request.
    storage_options
        Further keyword arguments for :class:`s3fs.S3FileSystem`.
    read_only
        Refuse writes.
    on_retry
        Called as ``on_retry(what, key, exception)`` before each retry (e.g. to count them).
    """

    def __init__(
        self,
        url: str | os.PathLike,
        *,
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        timeout: float = 60.0,
        storage_options: Mapping[str, Any] | None = None,
        read_only: bool = False,
        on_retry: Callable[[str, str, BaseException], None] | None = None,
    ) -> None:
        url = os.fspath(url)
        self.on_retry = on_retry
        self.url = url
        self.policy = RetryPolicy(retries, backoff, max_backoff, 2 * timeout)
        self.read_only = read_only
        self.is_s3 = url.startswith("s3://")
        if self.is_s3:
            self._root = url[len("s3://"):].strip("/")
            self._s3_options = dict(storage_options or {})
            if endpoint_url is not None:
                self._s3_options.setdefault("endpoint_url", endpoint_url)
            if access_key is not None:
                self._s3_options.setdefault("key", access_key)
            if secret_key is not None:
                self._s3_options.setdefault("secret", secret_key)
            self._timeout = timeout
        else:
            path = url[len("file://"):] if url.startswith("file://") else url
            self._root = os.path.abspath(path)
            if not os.path.isdir(self._root):
                if read_only:
                    raise StoreUnavailable(f"chunk store directory {self._root} does not exist")
                os.makedirs(self._root, exist_ok=True)

    def _filesystem(self):
        if not self.is_s3:
            return _LocalAsyncFileSystem(AtomicLocalFileSystem(auto_mkdir=True),
                                         asynchronous=True)
        import s3fs

        options = dict(self._s3_options)
        config = dict(options.pop("config_kwargs", {}))
        # Our RetryPolicy does the retrying; botocore and s3fs make one attempt each.
        config.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
        config.setdefault("connect_timeout", self._timeout)
        config.setdefault("read_timeout", self._timeout)
        # Non-AWS servers (Ceph RGW, Swift) do not all accept the newer integrity checksums.
        config.setdefault("request_checksum_calculation", "when_required")
        config.setdefault("response_checksum_validation", "when_required")
        # Over plain http botocore hashes every body (SHA-256) into the signature, on the event
        # loop: a third of the CPU time of a 15 MB PUT. UNSIGNED-PAYLOAD, as AWS SDKs send over
        # https, leaves the body to TCP's checks; storage_options can turn signing back on.
        config.setdefault("s3", {"payload_signing_enabled": False})
        client_kwargs = dict(options.pop("client_kwargs", {}))
        if "endpoint_url" in options:
            client_kwargs.setdefault("endpoint_url", options.pop("endpoint_url"))
        elif os.environ.get("AWS_ENDPOINT_URL"):
            client_kwargs.setdefault("endpoint_url", os.environ["AWS_ENDPOINT_URL"])
        # With max_concurrency > 1 s3fs sends a HEAD before every whole-object GET, to see
        # whether to split it; chunks are far below its split size, so that is a wasted trip.
        options.setdefault("max_concurrency", 1)
        if "session" not in options:
            import aiobotocore.session

            session = aiobotocore.session.AioSession()
            session.register("before-call.s3.PutObject", _send_view)
            options["session"] = session
        fs = s3fs.S3FileSystem(
            asynchronous=True, skip_instance_cache=True, config_kwargs=config,
            client_kwargs=client_kwargs, **options,
        )
        fs.retries = 1
        return fs

    def group_path(self, prefix: str) -> str:
        """Path of a group in the file system (directory or ``bucket/key`` prefix)."""
        return f"{self._root}/{prefix}" if self._root else prefix

    def zarr_store(self, prefix: str, read_only: bool | None = None) -> RetryingStore:
        """A new Zarr store for one group, with its own connections and retries.

        Each call makes its own file system, bound to the event loop that first uses it: use
        one per event loop (Zarr's synchronous API runs on its own loop).
        """
        read_only = self.read_only if read_only is None else read_only
        store = _CopyFreeFsspecStore(self._filesystem(), read_only=read_only,
                            path=self.group_path(prefix))
        return RetryingStore(store, self.policy, self.on_retry)

    def object_url(self, path: str) -> str:
        """URL of an object at `path` (relative to the store) for people and logs."""
        full = f"{self._root}/{path}" if self._root else path
        return f"s3://{full}" if self.is_s3 else full

    async def put(self, path: str, data: bytes) -> str:
        """Write one whole object (e.g. an RDB file) at `path` relative to the store.

        On S3 without a bucket in the URL, the first component of `path` is the bucket (made
        if needed), as katsdpmetawriter does with ``<cbid>/<file>``. The object appears whole or
        not at all; failures are retried as for chunks. Returns :meth:`object_url`.
        """
        fs = self._filesystem()
        full = f"{self._root}/{path}" if self._root else path
        retrying = RetryingStore(FsspecStore(fs, path=""), self.policy, self.on_retry)
        try:
            if self.is_s3:
                bucket = full.split("/", 1)[0]

                async def make():
                    with contextlib.suppress(FileExistsError):
                        await fs._call_s3("create_bucket", Bucket=bucket)

                await retrying._retry("creating bucket", bucket, make)
            await retrying._retry("writing", full, fs._pipe_file, full, data)
        finally:
            client = getattr(fs, "_s3", None)
            if client is not None:
                await client.close()
        return self.object_url(path)

    async def _make_bucket(self, store: RetryingStore, prefix: str) -> None:
        if not self.is_s3:
            return
        fs = store._store.fs
        bucket = self.group_path(prefix).split("/", 1)[0]

        async def make():
            # CreateBucket of an existing bucket of ours is a no-op on RGW and AWS us-east-1.
            with contextlib.suppress(FileExistsError):
                await fs._call_s3("create_bucket", Bucket=bucket)

        await store._retry("creating bucket", bucket, make)

    async def create_stream(
        self,
        capture_block_id: str,
        stream: str,
        n_chans: int,
        n_bls: int,
        *,
        chunks: Mapping[str, tuple[int, int]] | None = None,
        max_chunk_bytes: float = DEFAULT_MAX_CHUNK_BYTES,
        max_dumps: int = DEFAULT_MAX_DUMPS,
        max_chans: int | None = None,
        shard_chunks: tuple[int, int] | None = None,
        attributes: Mapping[str, Any] | None = None,
        arrays: Iterable[str] | None = None,
    ) -> StreamStore:
        """Create the group and arrays of a capture-block stream.

        Parameters
        ----------
        capture_block_id, stream
            Names of the capture block and of the (L0 or flags) stream.
        n_chans, n_bls
            Number of channels and baselines.
        chunks
            ``(dumps, channels)`` per chunk for some arrays; the others get
            :func:`choose_chunks` with `max_chunk_bytes`, `max_dumps` and `max_chans`.
        shard_chunks
            ``(dumps, channels)`` counted in chunks per shard, to store several chunks per object.
        attributes
            Extra attributes for the group.
        arrays
            Which of :data:`ARRAYS` to create (all by default; a flags stream has only
            ``flags``).

        Returns
        -------
        StreamStore

        Raises
        ------
        FileExistsError
            If the stream already exists (archived data is never replaced silently).
        """
        prefix = stream_prefix(capture_block_id, stream)
        store = self.zarr_store(prefix)
        await self._make_bucket(store, prefix)
        group = await zarr_async.open_group(
            store=store, mode="w-", zarr_format=3,
            attributes={"capture_block_id": capture_block_id, "stream_name": stream,
                        "n_chans": n_chans, "n_bls": n_bls, **(attributes or {})},
        )
        names = list(ARRAYS) if arrays is None else list(arrays)
        unknown = set(names) - set(ARRAYS)
        if unknown:
            raise ValueError(f"unknown arrays {sorted(unknown)}; known: {list(ARRAYS)}")
        arrays = {}
        for name in names:
            spec = ARRAYS[name]
            n_b = n_bls if spec.ndim == 3 else 1
            dumps, chans = (chunks or {}).get(name) or choose_chunks(
                n_chans, n_b, spec.dtype, max_chunk_bytes, max_dumps, max_chans)
            chunk_shape = (dumps, chans, n_bls)[: spec.ndim]
            shards = None
            if shard_chunks is not None:
                shards = (dumps * shard_chunks[0], chans * shard_chunks[1], n_bls)[: spec.ndim]
            arrays[name] = await group.create_array(
                name, shape=(0, n_chans, n_bls)[: spec.ndim], dtype=spec.dtype,
                chunks=chunk_shape, shards=shards, fill_value=spec.fill_value,
                compressors=spec.compressors, dimension_names=spec.dimension_names,
                config={"write_empty_chunks": True},
            )
        return StreamStore(self, capture_block_id, stream, store, group, arrays)

    async def open_stream(self, capture_block_id: str, stream: str) -> StreamStore:
        """Open an existing capture-block stream (to read it, or to go on writing it).

        Raises
        ------
        FileNotFoundError
            If the stream is not in the store.
        """
        prefix = stream_prefix(capture_block_id, stream)
        store = self.zarr_store(prefix)
        try:
            group = await zarr_async.open_group(store=store, mode="r" if self.read_only else "r+",
                                                zarr_format=3)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"no stream {prefix!r} in chunk store {self.url}") from exc
        arrays = {}
        for name in ARRAYS:
            with contextlib.suppress(KeyError):
                arrays[name] = await group.getitem(name)
        return StreamStore(self, capture_block_id, stream, store, group, arrays)

    def open_zarr_group(self, capture_block_id: str, stream: str) -> zarr.Group:
        """The stream's group as synchronous Zarr objects, e.g. for ``dask.array.from_zarr``."""
        store = self.zarr_store(stream_prefix(capture_block_id, stream), read_only=True)
        return zarr.open_group(store=store, mode="r", zarr_format=3)


class StreamStore:
    """The arrays of one capture-block stream; made by :meth:`ChunkStore.create_stream` or
    :meth:`ChunkStore.open_stream`.

    Attributes
    ----------
    prefix : str
        Name of the group (katdal's ``prefix``).
    arrays : dict of str to :class:`zarr.AsyncArray`
        The arrays, by name.
    """

    def __init__(self, store: ChunkStore, capture_block_id: str, stream: str,
                 zarr_store: RetryingStore, group, arrays: dict) -> None:
        self.store = store
        self.capture_block_id = capture_block_id
        self.stream = stream
        self.prefix = stream_prefix(capture_block_id, stream)
        self.zarr_store = zarr_store
        self.group = group
        self.arrays = arrays
        self._grow_lock = asyncio.Lock()
        self._growing: asyncio.Future | None = None
        self._shard_locks: dict[tuple, asyncio.Lock] = {}

    def _array(self, name: str):
        try:
            return self.arrays[name]
        except KeyError:
            raise KeyError(f"stream {self.prefix!r} has no array {name!r}") from None

    def _chunk_slices(self, name: str, chunk_index: tuple[int, ...],
                      n_dumps: int | None = None, grid: tuple[int, ...] | None = None
                      ) -> tuple[slice, ...]:
        """Element slices of a chunk (or of a block of `grid`, e.g. a shard); with `n_dumps`,
        that many dumps (maybe past the end)."""
        arr = self._array(name)
        grid = arr.chunks if grid is None else grid
        chunk_index = tuple(int(i) for i in chunk_index)
        if len(chunk_index) != arr.ndim:
            raise BadChunk(f"{name}: chunk index {chunk_index} should have {arr.ndim} numbers")
        slices = []
        for axis, (i, step, extent) in enumerate(zip(chunk_index, grid, arr.shape,
                                                     strict=True)):
            if axis == 0 and n_dumps is not None:
                if i < 0:
                    raise BadChunk(f"{name}: negative chunk index {chunk_index}")
                slices.append(slice(i * step, i * step + n_dumps))
                continue
            if i < 0 or i * step >= extent:
                raise BadChunk(f"{name}: chunk index {chunk_index} is outside shape {arr.shape}")
            slices.append(slice(i * step, min((i + 1) * step, extent)))
        return tuple(slices)

    def _check_block(self, array: str, index: tuple[int, ...], data: np.ndarray,
                     grid: tuple[int, ...], what: str) -> tuple[np.ndarray, tuple[slice, ...]]:
        """Check a chunk or shard for dtype, shape and position; return it and its slices."""
        arr = self._array(array)
        data = np.asarray(data)
        if data.dtype != arr.dtype:
            raise BadChunk(f"{array}: {what} has dtype {data.dtype}, expected {arr.dtype}")
        if data.ndim != arr.ndim or data.shape[0] < 1 or data.shape[0] > grid[0]:
            raise BadChunk(f"{array}: {what} shape {data.shape} does not fit {what}s {grid}")
        slices = self._chunk_slices(array, index, n_dumps=data.shape[0], grid=grid)
        expected = tuple(s.stop - s.start for s in slices)
        if data.shape != expected:
            raise BadChunk(f"{array}: {what} {tuple(index)} should have shape {expected}, "
                           f"got {data.shape}")
        return data, slices

    async def _grow(self, n_dumps: int) -> None:
        """Extend the time axis of every array to cover `n_dumps`, at least doubling it.

        Doubling keeps the metadata writes down to a logarithmic number; :meth:`finish` trims.
        Writers that need more room while a resize is in flight join it rather than queue
        behind it, so a store that is down costs one round of retries for all of them, not
        one per chunk.
        """
        while any(arr.shape[0] < n_dumps for arr in self.arrays.values()):
            growing = self._growing
            # A finished resize is replaced here, not in a done callback: awaiting a finished
            # future does not yield, so a callback would never get to run.
            if growing is None or growing.done():
                growing = self._growing = asyncio.ensure_future(self._resize_all(n_dumps))
            await asyncio.shield(growing)

    async def _resize_all(self, n_dumps: int) -> None:
        async with self._grow_lock:
            for arr in self.arrays.values():
                if arr.shape[0] >= n_dumps:
                    continue
                row = (arr.shards or arr.chunks)[0]
                new = -(-max(n_dumps, 2 * arr.shape[0]) // row) * row
                await arr.resize((new, *arr.shape[1:]), delete_outside_chunks=False)

    async def write_chunk(self, array: str, chunk_index: tuple[int, ...],
                          data: np.ndarray) -> None:
        """Write one chunk, growing the time axis if needed.

        Parameters
        ----------
        array
            Array name (e.g. ``"correlator_data"``).
        chunk_index
            Position in the chunk grid (block indices, not element offsets).
        data
            The chunk, of the array's dtype and of the chunk's shape (shorter in time only for
            the last dumps of a capture; clipped at the end of the band).

        Raises
        ------
        BadChunk
            For a wrong dtype, shape or index.
        StoreUnavailable
            If the store still fails after the retries.
        """
        arr = self._array(array)
        data, slices = self._check_block(array, chunk_index, data, arr.chunks, "chunk")
        if slices[0].stop > self.arrays[array].shape[0]:
            await self._grow(slices[0].stop)
        arr = self.arrays[array]
        if arr.shards is None:
            if data.shape == tuple(arr.chunks):
                await self._put_whole_chunk(arr, chunk_index, data)
            else:  # short in time or clipped: Zarr merges it with what is stored
                await arr.setitem(slices, data)
            return
        # A chunk inside a shard is a read-modify-write of the shard: one at a time per shard.
        shard = tuple(s.start // n for s, n in zip(slices, arr.shards, strict=True))
        async with self._shard_lock(array, shard):
            await arr.setitem(slices, data)

    def _shard_lock(self, array: str, shard: tuple[int, ...]) -> asyncio.Lock:
        return self._shard_locks.setdefault((array, tuple(int(i) for i in shard)),
                                            asyncio.Lock())

    async def write_shard(self, array: str, shard_index: tuple[int, ...],
                          data: np.ndarray) -> None:
        """Write every chunk of one shard as one object, growing the time axis if needed.

        Unlike :meth:`write_chunk` on a sharded array, nothing is read back: the shard is
        encoded whole (chunk by chunk, with the index) and stored with one atomic write, which
        replaces whatever the shard held. Only the last shard of a capture (fewer dumps than
        the shard, past the current end of the array) is merged with what is stored.

        Parameters
        ----------
        array
            Array name; the array must be sharded.
        shard_index
            Position in the shard grid (shard indices, not chunk indices).
        data
            The shard, of the array's dtype and of the shard's shape (shorter in time only for
            the last dumps of a capture; clipped at the end of the band).

        Raises
        ------
        BadChunk
            For an unsharded array, or a wrong dtype, shape or index.
        StoreUnavailable
            If the store still fails after the retries.
        """
        arr = self._array(array)
        if arr.shards is None:
            raise BadChunk(f"{array}: not sharded; write its chunks with write_chunk")
        data, slices = self._check_block(array, shard_index, data, arr.shards, "shard")
        if slices[0].stop > arr.shape[0]:
            await self._grow(slices[0].stop)
        arr = self.arrays[array]
        async with self._shard_lock(array, shard_index):
            if data.shape == tuple(arr.shards):
                await self._put_whole_chunk(arr, shard_index, data)
            else:  # clipped at the band edge (whole, no read) or short in time (merged)
                await arr.setitem(slices, data)

    async def read_chunk(self, array: str, chunk_index: tuple[int, ...]) -> np.ndarray:
        """Read one chunk; a chunk never written comes back as the fill value.

        Raises
        ------
        StoreUnavailable
            If the store fails (even after retries), as opposed to the chunk being absent.
        """
        slices = self._chunk_slices(array, chunk_index)
        arr = self._array(array)
        if arr.shards is not None:
            return await arr.getitem(slices)
        index = tuple(int(i) for i in chunk_index)
        spec = arr.metadata.get_chunk_spec(index, arr.config, default_buffer_prototype())
        raw = await (arr.store_path / arr.metadata.encode_chunk_key(index)).get(spec.prototype)
        shape = tuple(s.stop - s.start for s in slices)
        if raw is None:
            return np.full(shape, arr.metadata.fill_value, arr.dtype)
        (decoded,) = await arr.codec_pipeline.decode([(raw, spec)])
        out = decoded.as_numpy_array()
        if out.shape != shape:  # the last chunk along an axis: stored whole, read clipped
            out = out[tuple(slice(0, n) for n in shape)]
        return out

    @staticmethod
    async def _put_whole_chunk(arr, chunk_index: tuple[int, ...], data: np.ndarray) -> None:
        """Encode and store one whole stored object (a chunk, or a shard of a sharded array),
        without Zarr's merge buffer (one copy less)."""
        index = tuple(int(i) for i in chunk_index)
        spec = arr.metadata.get_chunk_spec(index, arr.config, default_buffer_prototype())
        chunk = spec.prototype.nd_buffer.from_numpy_array(np.ascontiguousarray(data))
        (encoded,) = await arr.codec_pipeline.encode([(chunk, spec)])
        await (arr.store_path / arr.metadata.encode_chunk_key(index)).set(encoded)

    async def has_chunk(self, array: str, chunk_index: tuple[int, ...]) -> bool:
        """Whether a chunk (with shards: its shard) was written."""
        arr = self._array(array)
        index = tuple(int(i) for i in chunk_index)
        if arr.shards is not None:
            ratio = [s // c for s, c in zip(arr.shards, arr.chunks, strict=True)]
            index = tuple(i // r for i, r in zip(index, ratio, strict=True))
        key = f"{arr.path}/{arr.metadata.encode_chunk_key(index)}"
        return await self.zarr_store.exists(key)

    async def finish(self, n_dumps: int) -> None:
        """Set the exact number of dumps of the capture (the time axis was grown in whole rows)."""
        async with self._grow_lock:
            for arr in self.arrays.values():
                if arr.shape[0] != n_dumps:
                    await arr.resize((n_dumps, *arr.shape[1:]), delete_outside_chunks=False)

    def chunk_info(self, n_dumps: int | None = None) -> dict[str, dict]:
        """The chunk grid, shape and dtype of every array, in katdal's ``chunk_info`` layout.

        With `n_dumps`, the time extent is that (the capture's) rather than the arrays' current
        shape, e.g. when the store could not be reached to :meth:`finish` it.
        """
        return {
            name: chunk_info_entry(
                self.prefix, arr.shape if n_dumps is None else (n_dumps, *arr.shape[1:]),
                arr.chunks, arr.dtype)
            for name, arr in self.arrays.items()
        }

    def write_chunk_info(self, telstate) -> str:
        """Record :meth:`chunk_info` in telstate as ``<cbid>_<stream>_chunk_info`` (immutable).

        `telstate` is anything with katsdptelstate's ``add(key, value, immutable=True)``.
        Returns the key.
        """
        key = f"{self.capture_block_id}_{self.stream}_chunk_info"
        telstate.add(key, self.chunk_info(), immutable=True)
        return key

    async def close(self) -> None:
        """Close the connections of this stream's store (S3 clients)."""
        fs = getattr(self.zarr_store._store, "fs", None)
        client = getattr(fs, "_s3", None)
        if client is not None:
            await client.close()
            fs._s3 = None

    async def __aenter__(self) -> StreamStore:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def mark_complete(self) -> None:
        """Write the group attribute ``complete`` (katdal's ``<prefix>/complete`` marker)."""
        await self.group.update_attributes({"complete": True})
