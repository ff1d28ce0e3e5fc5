"""Finding a capture-block stream: its telstate (RDB file or URL, live Redis) and chunk store.

Sources accepted by :func:`open_source`:

* a local RDB path (or ``file://`` URL): loaded into a memory telstate. The chunk store is the
  directory two levels up (``<store>/<cbid>/<cbid>_<stream>.rdb``, the meta writer's layout)
  when it holds the stream's Zarr group.
* ``s3://[bucket/path/]<cbid>/<cbid>_<stream>.rdb``: read with s3fs (endpoint from the
  ``s3_endpoint_url`` option or the AWS environment); the chunk store is ``s3://[bucket/path]``
  on the same endpoint.
* ``http(s)://host[:port]/[bucket/path/]<cbid>/<rdb>``: the RDB is fetched over HTTP and the
  chunk store is the S3 service at ``http(s)://host[:port]``, as katdal does for the archive.
* ``redis://host:port[/db]``: a live telstate (``capture_block_id`` and ``stream_name`` options
  when the database holds no default).
* a :class:`karoo.telstate.TelescopeState` object (tests, embedded use).

Unless the caller gives ``chunk_store``, the store is found, in order, from
``<cbid>_<stream>_chunk_store_url`` (written by karoo's vis writer), from the RDB's location, and
from katdal's ``<stream>_s3_endpoint_url``. The URL query string supplies options
(``?capture_block_id=...&stream_name=...``); explicit keyword arguments win.
"""

from __future__ import annotations

import os
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from ..chunkstore.store import ChunkStore, stream_prefix
from ..telstate import TelescopeState


class DataSourceNotFound(Exception):
    """The source, its telstate keys or its chunk store could not be found or read."""


@dataclass
class StoreSpec:
    """How to (re)open a chunk store: picklable, without live connections."""

    url: str
    options: dict[str, Any] = field(default_factory=dict)

    def open(self) -> ChunkStore:
        return ChunkStore(self.url, read_only=True, **self.options)

    def __repr__(self) -> str:  # credentials stay out of logs and reprs
        endpoint = self.options.get("endpoint_url")
        return f"StoreSpec({self.url!r}{f', endpoint_url={endpoint!r}' if endpoint else ''})"


@dataclass
class TelstateSpec:
    """How to reopen the telstate on another process (a ``dask.distributed`` worker)."""

    kind: str  # 'rdb' (path or URL), 'bytes' (RDB contents), 'redis', 'records'
    location: Any
    options: dict[str, Any] = field(default_factory=dict)

    def open(self) -> TelescopeState:
        if self.kind == "redis":
            return TelescopeState(self.location)
        telstate = TelescopeState()
        if self.kind == "records":
            telstate.backend.load_records(self.location)
        elif self.kind == "bytes":
            telstate.load_from_file(self.location)
        else:
            telstate.load_from_file(_read_rdb(self.location, self.options))
        return telstate


_STORE_OPTION_NAMES = ("endpoint_url", "access_key", "secret_key", "retries", "backoff",
                       "max_backoff", "timeout", "storage_options")


def store_options(options: dict[str, Any]) -> dict[str, Any]:
    """The ChunkStore keyword arguments among the open() options (``s3_endpoint_url`` too)."""
    out = {k: options[k] for k in _STORE_OPTION_NAMES if options.get(k) is not None}
    if options.get("s3_endpoint_url"):
        out["endpoint_url"] = options["s3_endpoint_url"]
    return out


def _read_rdb(location: str, options: dict[str, Any]) -> bytes | str:
    """A local path as is; the contents of an s3:// or http(s):// RDB as bytes."""
    parsed = urllib.parse.urlsplit(location)
    if parsed.scheme in ("", "file"):
        return parsed.path if parsed.scheme else location
    if parsed.scheme == "s3":
        import s3fs

        opts = store_options(options)
        client_kwargs = {}
        if "endpoint_url" in opts:
            client_kwargs["endpoint_url"] = opts["endpoint_url"]
        elif os.environ.get("AWS_ENDPOINT_URL"):
            client_kwargs["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
        fs = s3fs.S3FileSystem(key=opts.get("access_key"), secret=opts.get("secret_key"),
                               client_kwargs=client_kwargs, skip_instance_cache=True)
        try:
            return fs.cat_file(f"{parsed.netloc}{parsed.path}")
        except FileNotFoundError as exc:
            raise DataSourceNotFound(f"no RDB at {location}") from exc
    if parsed.scheme in ("http", "https"):
        query = dict(urllib.parse.parse_qsl(parsed.query))
        headers = {}
        token = options.get("token") or query.get("token")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        url = urllib.parse.urlunsplit(parsed._replace(query=""))
        request = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=options.get("timeout", 60)) as reply:
                return reply.read()
        except OSError as exc:
            raise DataSourceNotFound(f"could not fetch RDB {url}: {exc}") from exc
    raise DataSourceNotFound(f"unsupported source scheme {parsed.scheme!r} in {location!r}")


@dataclass
class OpenedSource:
    """A telstate with the capture block and stream resolved, and where the chunks are."""

    telstate: TelescopeState
    telstate_spec: TelstateSpec | None
    capture_block_id: str
    stream_name: str
    store_spec: StoreSpec | None
    name: str


def _decode(value):
    return value.decode() if isinstance(value, bytes) else value


def _query_options(source: str) -> tuple[str, dict[str, str]]:
    parsed = urllib.parse.urlsplit(source)
    if not parsed.query or parsed.scheme in ("", "file"):
        return source, {}
    query = dict(urllib.parse.parse_qsl(parsed.query))
    keep = {k: v for k, v in query.items() if k == "token"}
    rest = {k: v for k, v in query.items() if k != "token"}
    stripped = urllib.parse.urlunsplit(parsed._replace(query=urllib.parse.urlencode(keep)))
    return stripped, rest


def open_source(source, chunk_store=None, **options) -> OpenedSource:
    """Open the telstate of `source` and find its capture block, stream and chunk store.

    Parameters
    ----------
    source
        RDB path, ``s3://``/``http(s)://`` URL of an RDB, ``redis://`` URL, or a TelescopeState.
    chunk_store
        A :class:`~karoo.chunkstore.ChunkStore`, a store URL (local directory or ``s3://...``),
        None to find it, or False for metadata only.
    **options
        ``capture_block_id``, ``stream_name``, ``s3_endpoint_url`` (or ``endpoint_url``),
        ``access_key``, ``secret_key``, ``token``, retry settings.

    Raises
    ------
    DataSourceNotFound
        With the reason, if the source cannot be read or has no capture block / stream.
    """
    if isinstance(source, TelescopeState):
        telstate = source
        spec = TelstateSpec("records", None)
        location = None
        name = "telstate"
    else:
        source = os.fspath(source)
        source, query = _query_options(source)
        options = {**query, **options}
        parsed = urllib.parse.urlsplit(source)
        name = os.path.basename(parsed.path) or source
        if parsed.scheme == "redis":
            try:
                telstate = TelescopeState(source)
                telstate.keys("capture_block_id")  # fail now if the server is not there
            except Exception as exc:
                raise DataSourceNotFound(f"cannot connect to telstate {source}: {exc}") from exc
            spec = TelstateSpec("redis", source)
            location = None
        else:
            data = _read_rdb(source, options)
            telstate = TelescopeState()
            try:
                telstate.load_from_file(data)
            except FileNotFoundError as exc:
                raise DataSourceNotFound(f"no RDB file {source}") from exc
            except Exception as exc:
                raise DataSourceNotFound(f"cannot load RDB {source}: {exc}") from exc
            spec = (TelstateSpec("rdb", source, {k: v for k, v in options.items()
                                                 if k in ("token", *_STORE_OPTION_NAMES,
                                                          "s3_endpoint_url")})
                    if parsed.scheme in ("", "file") else TelstateSpec("bytes", data))
            location = source

    cbid = options.get("capture_block_id") or _decode(telstate.get("capture_block_id"))
    stream = options.get("stream_name") or _decode(telstate.get("stream_name"))
    if not cbid:
        raise DataSourceNotFound(
            f"{name}: no capture block: pass capture_block_id= (no 'capture_block_id' key)")
    if not stream:
        raise DataSourceNotFound(f"{name}: no stream: pass stream_name= (no 'stream_name' key)")
    cbid, stream = str(cbid), str(stream)
    if spec.kind == "records":
        from ..telstate import MemoryBackend

        # A memory telstate travels with the DataSet when pickled; others cannot be reopened.
        spec = (TelstateSpec("records", telstate.backend.dump_records())
                if isinstance(telstate.backend, MemoryBackend) else None)
    store_spec = None
    if chunk_store is not False:
        store_spec = _find_store(telstate, cbid, stream, chunk_store, location, options)
    return OpenedSource(telstate, spec, cbid, stream, store_spec, name)


def _store_spec_of(store: ChunkStore) -> StoreSpec:
    opts: dict[str, Any] = {"retries": store.policy.retries, "backoff": store.policy.backoff,
                            "max_backoff": store.policy.max_backoff}
    if store.is_s3:
        s3 = dict(store._s3_options)
        for ours, theirs in (("endpoint_url", "endpoint_url"), ("access_key", "key"),
                             ("secret_key", "secret")):
            if theirs in s3:
                opts[ours] = s3.pop(theirs)
        if s3:
            opts["storage_options"] = s3
    return StoreSpec(store.url, opts)


def _find_store(telstate, cbid: str, stream: str, chunk_store, location: str | None,
                options: dict[str, Any]) -> StoreSpec | None:
    opts = store_options(options)
    if isinstance(chunk_store, ChunkStore):
        return _store_spec_of(chunk_store)
    if chunk_store is not None:
        return StoreSpec(os.fspath(chunk_store), opts)
    parsed = urllib.parse.urlsplit(location) if location is not None else None
    if parsed is not None and parsed.scheme in ("http", "https"):
        # an RDB served by the archive's S3 gateway: its chunks are on the same service
        opts.setdefault("endpoint_url", f"{parsed.scheme}://{parsed.netloc}")
    s3_endpoint = telstate.get(f"{stream}_s3_endpoint_url")
    if s3_endpoint and "endpoint_url" not in opts:
        opts["endpoint_url"] = _decode(s3_endpoint)
    url = telstate.get(f"{cbid}_{stream}_chunk_store_url")
    if url:
        return StoreSpec(_decode(url), opts)
    prefix = stream_prefix(cbid, stream)
    if parsed is not None:
        parts = parsed.path.strip("/").split("/")
        if parsed.scheme in ("", "file"):
            path = parsed.path if parsed.scheme else location
            root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
            if os.path.isdir(os.path.join(root, prefix)):
                return StoreSpec(root, opts)
        elif parsed.scheme == "s3":
            # s3://<bucket/path>/<cbid>/<rdb> -> s3://<bucket/path>; s3:// if cbid is the bucket
            whole = [parsed.netloc, *parts][:-2]
            return StoreSpec("s3://" + "/".join(whole), opts)
        elif parsed.scheme in ("http", "https"):
            return StoreSpec("s3://" + "/".join(parts[:-2]), opts)
    if s3_endpoint:
        return StoreSpec("s3://", opts)
    return None
