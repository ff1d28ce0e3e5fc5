"""The meta writer daemon (``karoo meta-writer``): telstate to RDB files next to the data.

The RDB file of a capture-block stream is the dataset's entry point for readers (``karoo.open``,
katdal). Two are written per stream, where katdal looks for them:

* ``<store>/<cbid>/<cbid>_<stream>.rdb``: the light dump, the keys a reader needs (those of
  katsdpmetawriter's light dump: the stream's shape, timing and chunk store keys, the capture
  block's observation keys, the subarray's, every antenna's ``observer``/``activity``/
  ``target`` and ``cbf_target``);
* ``<store>/<cbid>/<cbid>_<stream>.full.rdb``: every key in telstate.

Both also carry ``capture_block_id`` and ``stream_name`` so that a reader given only the file
knows what it holds. On S3 (``s3://``), ``<cbid>`` is the bucket; with ``s3://bucket/path`` the
files go under that path. Files are written by karoo's own RDB serializer
(:func:`karoo.telstate.rdb.dump_rdb`) and appear whole or not at all.

Requests: ``write-meta <cbid> [light] [stream]`` (light defaults to true; without a stream,
every ``sdp.vis`` stream in ``sdp_archived_streams``, or else every stream with a
``<cbid>_<stream>_chunk_info``); a full dump of all of them ends with the empty
``<cbid>/complete`` marker. ``capture-done`` (when the controller sends the capture cycle to
this daemon too) writes the light and the full dumps and the marker.
"""

# No `from __future__ import annotations`: aiokatcp reads request annotations as real types.
import argparse
import asyncio
import io
import logging
import time
from dataclasses import dataclass, fields
from typing import Optional

from aiokatcp import DeviceStatus, FailReply, Sensor

from ..service import Service, add_service_arguments, set_service_factory
from ..telstate import aio as telstate_aio
from .store import ChunkStore, ChunkStoreError

logger = logging.getLogger(__name__)

STREAM_KEYS = ("int_time", "sync_time", "bls_ordering", "n_chans", "bandwidth", "center_freq",
               "s3_endpoint_url", "stream_type", "need_weights_power_scale")
CAPTURE_BLOCK_KEYS = ("obs_params", "obs_script_log", "obs_label", "obs_activity")
CAPTURE_STREAM_KEYS = ("chunk_info", "first_timestamp", "chunk_store_url", "failed_chunks")
SUBARRAY_KEYS = ("sub_pool_resources", "sub_band", "sub_product", "cbf_target", "sdp_config")
ANTENNA_GLOBS = ("m???", "s????", "e???")
ANTENNA_KEYS = ("observer", "activity", "target")
# Keys that are not absent by mistake when missing (optional for readers).
OPTIONAL_KEYS = ("s3_endpoint_url", "need_weights_power_scale", "obs_script_log", "obs_label",
                 "sdp_config", "chunk_store_url", "failed_chunks")


def light_keys(capture_block_id: str, stream: str) -> list[str]:
    """Names of the keys of the light dump (without the antenna globs)."""
    return ([f"{stream}_{k}" for k in STREAM_KEYS]
            + [f"{capture_block_id}_{k}" for k in CAPTURE_BLOCK_KEYS]
            + [f"{capture_block_id}_{stream}_{k}" for k in CAPTURE_STREAM_KEYS]
            + list(SUBARRAY_KEYS))


def rdb_path(capture_block_id: str, stream: str, light: bool) -> str:
    """Path of an RDB file relative to the store (katdal's convention)."""
    suffix = "rdb" if light else "full.rdb"
    return f"{capture_block_id}/{capture_block_id}_{stream}.{suffix}"


@dataclass
class MetaWriterConfig:
    """Configuration of the meta writer (the ``karoo meta-writer`` options).

    Attributes
    ----------
    store
        Where the RDB files go: the chunk store URL (local directory or ``s3://[bucket/path]``).
    s3_endpoint_url
        S3 endpoint (else ``AWS_ENDPOINT_URL``); credentials come from the AWS environment.
    """

    store: str = "/var/kat/data"
    s3_endpoint_url: Optional[str] = None  # noqa: UP045 (module without __future__ annotations)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "MetaWriterConfig":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


class MetaWriterService(Service):
    """The meta writer daemon.

    Parameters
    ----------
    host, port
        KATCP address (port 0 picks a free one).
    telstate
        asyncio telescope state.
    name
        Task name.
    config
        Where to write.
    """

    VERSION = "karoo-meta-writer-1.0"

    def __init__(self, host: str, port: int, *, telstate, name: str,
                 config: MetaWriterConfig) -> None:
        super().__init__(host, port, telstate=telstate, name=name)
        self.config = config
        self.store = ChunkStore(config.store, endpoint_url=config.s3_endpoint_url)
        self._lock = asyncio.Lock()
        self.s_key_failures = self.add_counter("key-failures",
                                               "keys of a light dump missing from telstate")
        self.s_key_failures.status_func = (
            lambda v: Sensor.Status.WARN if v else Sensor.Status.NOMINAL)
        self.s_writes = self.add_counter("writes-total", "RDB files written")
        self.s_last_stream = self.add_gauge("last-write-stream", "stream of the last dump", "",
                                            str, default="")
        self.s_last_cbid = self.add_gauge("last-write-cbid", "capture block of the last dump",
                                          "", str, default="")
        self.s_rate = self.add_gauge("last-transfer-rate", "speed of the last dump", "B/s")
        self.s_duration = self.add_gauge("last-dump-duration", "time taken by the last dump", "s")

    async def streams(self, capture_block_id: str) -> list[str]:
        """The streams whose RDB files are written for a capture block."""
        ts = self.telstate
        archived = await ts.get("sdp_archived_streams")
        if archived:
            types = [await ts.get(f"{s}_stream_type") for s in archived]
            return [s for s, t in zip(archived, types, strict=True) if t == "sdp.vis"]
        prefix, suffix = f"{capture_block_id}_", "_chunk_info"
        found = []
        for key in await ts.keys(f"{prefix}*{suffix}"):
            stream = key[len(prefix):-len(suffix)]
            if await ts.get(f"{stream}_stream_type") in (None, "sdp.vis"):
                found.append(stream)
        return sorted(found)

    async def _key_names(self, capture_block_id: str, stream: str) -> tuple[list[str], int]:
        names = light_keys(capture_block_id, stream)
        present = []
        missing = 0
        for name in names:
            if await self.telstate.exists(name):
                present.append(name)
            elif not any(name.endswith("_" + k) or name == k for k in OPTIONAL_KEYS):
                missing += 1
                logger.warning("light dump of %s %s: no key %s", capture_block_id, stream, name)
        for glob in ANTENNA_GLOBS:
            for key in ANTENNA_KEYS:
                present += await self.telstate.keys(f"{glob}_{key}")
        return present, missing

    async def write_meta(self, capture_block_id: str, stream: str, light: bool) -> str:
        """Write one RDB file; returns its URL."""
        start = time.monotonic()
        if light:
            keys, missing = await self._key_names(capture_block_id, stream)
            if missing:
                self.s_key_failures.value += missing
        else:
            keys = None
        dumped = io.BytesIO()
        await self.telstate.dump(dumped, keys)
        # Add the two keys that make the file self-describing, in a scratch copy.
        scratch = telstate_aio.TelescopeState()
        dumped.seek(0)
        await scratch.load_from_file(dumped)
        for key, value in (("capture_block_id", capture_block_id), ("stream_name", stream)):
            await scratch.delete(key)
            await scratch.set(key, value)
        out = io.BytesIO()
        await scratch.dump(out)
        data = out.getvalue()
        url = await self.store.put(rdb_path(capture_block_id, stream, light), data)
        elapsed = time.monotonic() - start
        self.s_writes.value += 1
        self.s_last_stream.value = stream
        self.s_last_cbid.value = capture_block_id
        self.s_duration.value = elapsed
        self.s_rate.value = len(data) / max(elapsed, 1e-9)
        logger.info("wrote %s (%d bytes, %.2f s)", url, len(data), elapsed)
        return url

    async def _write_all(self, ctx, capture_block_id: str, kinds: tuple[bool, ...],
                         stream: Optional[str] = None) -> list[str]:  # noqa: UP045
        streams = [stream] if stream else await self.streams(capture_block_id)
        if not streams:
            raise FailReply(f"no sdp.vis stream found for capture block {capture_block_id}")
        urls = []
        async with self._lock:
            for name in streams:
                for light in kinds:
                    try:
                        url = await self.write_meta(capture_block_id, name, light)
                    except (ChunkStoreError, OSError) as exc:
                        self.set_device_status(DeviceStatus.FAIL, f"RDB not written: {exc}")
                        raise FailReply(f"could not write the RDB of {name}: {exc}") from exc
                    urls.append(url)
                    if ctx is not None:
                        ctx.inform(url)
        return urls

    async def request_write_meta(self, ctx, capture_block_id: str, light: bool = True,
                                 stream: Optional[str] = None) -> str:  # noqa: UP045
        """Dump telstate to the RDB file(s) of a capture block (write-meta cbid [light] [stream]).

        Informs give each file written; the reply gives how many.
        """
        urls = await self._write_all(ctx, capture_block_id, (light,), stream)
        if not light and stream is None:
            await self._mark_complete(capture_block_id)
        return f"{len(urls)} RDB files written"

    async def capture_done(self, capture_block_id: str) -> None:
        await self._write_all(None, capture_block_id, (True, False))
        await self._mark_complete(capture_block_id)

    async def _mark_complete(self, capture_block_id: str) -> None:
        """The empty ``<cbid>/complete`` marker, once the full dumps are written."""
        try:
            await self.store.put(f"{capture_block_id}/complete", b"")
        except (ChunkStoreError, OSError) as exc:
            self.set_device_status(DeviceStatus.FAIL, f"completion marker not written: {exc}")
            raise FailReply(f"could not write the completion marker: {exc}") from exc


def _make_service(telstate, args) -> MetaWriterService:
    return MetaWriterService(args.host, args.port, telstate=telstate, name=args.name,
                             config=MetaWriterConfig.from_args(args))


def add_commands(subparsers) -> None:
    """Add ``karoo meta-writer``."""
    parser = subparsers.add_parser(
        "meta-writer", help="write telstate to RDB files next to the data",
        description="Dump telstate to RDB files (light and full) per capture block stream, on "
        "a local directory or S3, on request (write-meta) and at capture-done.")
    parser.add_argument("--store", default=MetaWriterConfig.store,
                        help="directory or s3://[bucket/path] [%(default)s]")
    parser.add_argument("--s3-endpoint-url", default=None,
                        help="S3 endpoint (else AWS_ENDPOINT_URL; credentials from the AWS env)")
    add_service_arguments(parser, "meta_writer")
    set_service_factory(parser, _make_service)
    parser.set_defaults(port=2049)
