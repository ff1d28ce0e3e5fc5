"""Naming and opening SPEAD transports: UDP (unicast/multicast), TCP and in-process queues.

One way to name a transport, used by every daemon's command line and by the product
configuration:

``udp://239.1.2.3+3:7148``
    UDP to four consecutive addresses 239.1.2.3 .. 239.1.2.6 on port 7148 (the MeerKAT
    ``a.b.c.d+N:port`` convention). Multicast if the address is a multicast one, unicast
    otherwise. A bare ``239.1.2.3+3:7148`` means the same.
``tcp://host:port``
    TCP; the receiver listens, the sender connects. One connection per endpoint.
``inproc://name`` or ``inproc://name+N``
    spead2 in-process queues from a process-wide registry (queue ``name`` or the N+1 queues
    ``name``, ``name.1``, ... ``name.N``), so that an embedded pipeline can run in one process.

Several specifications may be joined with commas; they must all use the same scheme.

Port 0 on a receiver binds an ephemeral port; the receiver then reports the real one
(see :func:`add_readers`), which is what tests use on loopback.

Notes on the sandbox/CI environment: UDP and TCP on 127.0.0.1 work everywhere. Multicast
needs a route for 224.0.0.0/4 and an interface that loops multicast back; on hosts without
one (containers often have only ``lo``, which lacks the MULTICAST flag) joining the group or
sending to it fails with an OSError, which is raised as is.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import threading
from dataclasses import dataclass
from typing import Literal

import spead2
import spead2.recv
import spead2.send
import spead2.send.asyncio

__all__ = [
    "Endpoint",
    "TransportSpec",
    "add_readers",
    "endpoint_list_to_str",
    "inproc_queue",
    "make_send_stream",
    "parse_endpoints",
    "parse_transport",
    "remove_inproc_queues",
]

Scheme = Literal["udp", "tcp", "inproc"]


@dataclass(frozen=True)
class Endpoint:
    """One network (host, port) or in-process queue name."""

    host: str
    port: int = 0

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def is_multicast(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_multicast
        except ValueError:
            return False


@dataclass(frozen=True)
class TransportSpec:
    """A parsed transport specification: a scheme and its endpoints."""

    scheme: Scheme
    endpoints: tuple[Endpoint, ...]

    def __str__(self) -> str:
        if self.scheme == "inproc":
            return ",".join(f"inproc://{ep.host}" for ep in self.endpoints)
        return ",".join(f"{self.scheme}://{ep}" for ep in self.endpoints)

    def __len__(self) -> int:
        return len(self.endpoints)


def _expand_host(host: str) -> list[str]:
    """Expand ``a.b.c.d+N`` into N+1 consecutive IPv4 addresses."""
    if "+" not in host:
        return [host]
    base, _, count = host.rpartition("+")
    try:
        n = int(count)
    except ValueError:
        raise ValueError(f"invalid address count in {host!r}") from None
    if n < 0:
        raise ValueError(f"negative address count in {host!r}")
    try:
        first = ipaddress.IPv4Address(base)
    except ValueError:
        raise ValueError(f"{base!r} is not an IPv4 address (needed for +N)") from None
    return [str(first + i) for i in range(n + 1)]


def parse_endpoints(text: str, default_port: int | None = None) -> list[Endpoint]:
    """Parse a comma-separated list of ``host[+N][:port]`` endpoints.

    Parameters
    ----------
    text
        For example ``"239.1.2.3+3:7148"`` or ``"10.0.0.1:7148,10.0.0.2:7149"``.
    default_port
        Port used where an entry has none; if None, a port is required.

    Returns
    -------
    list of Endpoint
        In order, with every ``+N`` expanded.

    Raises
    ------
    ValueError
        If an entry is malformed.
    """
    endpoints: list[Endpoint] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"empty endpoint in {text!r}")
        host, sep, port_text = part.rpartition(":")
        if not sep:
            host, port_text = part, ""
        if not port_text:
            if default_port is None:
                raise ValueError(f"endpoint {part!r} has no port")
            port = default_port
        else:
            try:
                port = int(port_text)
            except ValueError:
                raise ValueError(f"invalid port in endpoint {part!r}") from None
            if not 0 <= port < 65536:
                raise ValueError(f"port out of range in endpoint {part!r}")
        if not host:
            host = "0.0.0.0"
        endpoints.extend(Endpoint(h, port) for h in _expand_host(host))
    return endpoints


def endpoint_list_to_str(endpoints: list[Endpoint]) -> str:
    """Format endpoints as a comma-separated list (the inverse of :func:`parse_endpoints`)."""
    return ",".join(str(ep) for ep in endpoints)


def parse_transport(text: str | TransportSpec) -> TransportSpec:
    """Parse a transport specification (see the module docstring).

    Raises
    ------
    ValueError
        If the scheme is unknown, schemes are mixed, or an endpoint is malformed.
    """
    if isinstance(text, TransportSpec):
        return text
    schemes: set[str] = set()
    endpoints: list[Endpoint] = []
    for part in text.split(","):
        part = part.strip()
        scheme, sep, rest = part.partition("://")
        if not sep:
            scheme, rest = "udp", part
        if scheme not in ("udp", "tcp", "inproc", "spead"):
            raise ValueError(f"unknown transport scheme {scheme!r} in {text!r}")
        if scheme == "spead":  # katsdpcontroller's name for UDP SPEAD endpoints
            scheme = "udp"
        schemes.add(scheme)
        if scheme == "inproc":
            name, plus, count = rest.rpartition("+")
            if plus and count.isdigit():
                names = [name] + [f"{name}.{i}" for i in range(1, int(count) + 1)]
            else:
                names = [rest]
            if not all(names):
                raise ValueError(f"empty in-process queue name in {text!r}")
            endpoints.extend(Endpoint(n) for n in names)
        else:
            endpoints.extend(parse_endpoints(rest))
    if len(schemes) != 1:
        raise ValueError(f"mixed transport schemes in {text!r}")
    return TransportSpec(schemes.pop(), tuple(endpoints))  # type: ignore[arg-type]


# -- in-process queues -------------------------------------------------------------------------

_inproc_lock = threading.Lock()
# name -> queues: the first is the queue of `inproc_queue(name)` (and of the first reader); every
# further reader of the same name gets its own queue, so that an in-process stream, like a
# multicast group, reaches every receiver (the L0 stream feeds both the vis writer and cal).
_inproc_queues: dict[str, list[spead2.InprocQueue]] = {}
_inproc_readers: dict[str, int] = {}


def inproc_queue(name: str) -> spead2.InprocQueue:
    """The process-wide in-process queue called `name` (created on first use)."""
    with _inproc_lock:
        queues = _inproc_queues.setdefault(name, [])
        if not queues:
            queues.append(spead2.InprocQueue())
        return queues[0]


def _subscribe_inproc(name: str) -> spead2.InprocQueue:
    """A queue of `name` for a new reader: the first one, or a fresh one for each later reader."""
    with _inproc_lock:
        queues = _inproc_queues.setdefault(name, [])
        if not queues:
            queues.append(spead2.InprocQueue())
        readers = _inproc_readers.get(name, 0)
        _inproc_readers[name] = readers + 1
        if readers == 0:
            return queues[0]
        queue = spead2.InprocQueue()
        queues.append(queue)
        return queue


def _inproc_subscribers(name: str) -> list[spead2.InprocQueue]:
    with _inproc_lock:
        queues = _inproc_queues.setdefault(name, [])
        if not queues:
            queues.append(spead2.InprocQueue())
        return list(queues)


def remove_inproc_queues(spec: str | TransportSpec) -> None:
    """Forget the named queues, so the next user of the names gets fresh ones.

    A stopped queue cannot be restarted, so a new capture needs new queues.
    """
    spec = parse_transport(spec)
    with _inproc_lock:
        for ep in spec.endpoints:
            _inproc_queues.pop(ep.host, None)
            _inproc_readers.pop(ep.host, None)


class InprocFanoutStream:
    """An asyncio send stream over named in-process queues that copies each heap to every reader.

    Substream ``i`` is the queue name of endpoint ``i``; a heap sent to it goes to every queue
    registered under that name at the time of sending (readers that join later miss earlier
    heaps, as with multicast), through one spead2 stream per queue, with heap counters from
    the one sequence set by `set_cnt_sequence`.
    """

    def __init__(self, thread_pool: spead2.ThreadPool, names: list[str],
                 config: spead2.send.StreamConfig) -> None:
        self._pool = thread_pool
        self._names = names
        self._config = config
        self._next_cnt, self._cnt_step = 1, 1
        self._streams: dict[int, spead2.send.asyncio.InprocStream] = {}  # by id(queue)

    def _targets(self, substream_index: int) -> list[spead2.send.asyncio.InprocStream]:
        targets = []
        for queue in _inproc_subscribers(self._names[substream_index]):
            stream = self._streams.get(id(queue))
            if stream is None:
                stream = spead2.send.asyncio.InprocStream(self._pool, [queue], self._config)
                self._streams[id(queue)] = stream
            targets.append(stream)
        return targets

    def set_cnt_sequence(self, next: int, step: int) -> None:
        self._next_cnt, self._cnt_step = next, step

    def _cnt(self, cnt: int) -> int:
        # Counters are allocated here, not by the per-queue streams: a reader of several queues
        # must see distinct counters, and every copy of a heap the same one.
        if cnt >= 0:
            return cnt
        cnt, self._next_cnt = self._next_cnt, self._next_cnt + self._cnt_step
        return cnt

    async def async_send_heap(self, heap, cnt: int = -1, substream_index: int = 0) -> int:
        cnt = self._cnt(cnt)
        sizes = await asyncio.gather(*(stream.async_send_heap(heap, cnt)
                                       for stream in self._targets(substream_index)))
        return sizes[0] if sizes else 0

    async def async_send_heaps(self, heaps, mode=None) -> int:
        total = 0
        for ref in heaps:
            total += await self.async_send_heap(ref.heap, ref.cnt, ref.substream_index)
        return total

    async def async_flush(self) -> None:
        await asyncio.gather(*(stream.async_flush() for stream in self._streams.values()))


# -- send --------------------------------------------------------------------------------------


async def make_send_stream(
    spec: str | TransportSpec,
    config: spead2.send.StreamConfig,
    *,
    thread_pool: spead2.ThreadPool | None = None,
    interface_address: str = "",
    ttl: int = 1,
    buffer_size: int | None = None,
) -> spead2.send.asyncio.AsyncStream | InprocFanoutStream:
    """Open an asyncio send stream with one substream per endpoint of `spec`.

    TCP streams support exactly one endpoint (spead2 connects one socket per stream).
    """
    spec = parse_transport(spec)
    pool = thread_pool if thread_pool is not None else spead2.ThreadPool()
    addrs = [(ep.host, ep.port) for ep in spec.endpoints]
    if spec.scheme == "inproc":
        return InprocFanoutStream(pool, [ep.host for ep in spec.endpoints], config)
    if spec.scheme == "tcp":
        if len(addrs) != 1:
            raise ValueError(f"a TCP send stream has exactly one endpoint, not {len(addrs)}")
        kwargs = {} if buffer_size is None else {"buffer_size": buffer_size}
        return await spead2.send.asyncio.TcpStream.connect(pool, addrs, config, **kwargs)
    kwargs = {}
    if buffer_size is not None:
        kwargs["buffer_size"] = buffer_size
    if any(ep.is_multicast for ep in spec.endpoints):
        if interface_address:
            return spead2.send.asyncio.UdpStream(
                pool, addrs, config, ttl=ttl, interface_address=interface_address, **kwargs
            )
        return spead2.send.asyncio.UdpStream(pool, addrs, config, ttl=ttl, **kwargs)
    return spead2.send.asyncio.UdpStream(pool, addrs, config, **kwargs)


# -- receive -----------------------------------------------------------------------------------


def add_readers(
    stream: spead2.recv.ChunkRingStream | spead2.recv.Stream,
    spec: str | TransportSpec,
    *,
    max_packet_size: int = 9200,
    buffer_size: int = 8 * 1024 * 1024,
    interface_address: str = "",
) -> list[Endpoint]:
    """Add one reader per endpoint of `spec` to a spead2 receive stream.

    Returns
    -------
    list of Endpoint
        The endpoints actually bound (port 0 replaced by the ephemeral port chosen), in
        the order of `spec`; for in-process queues the names.
    """
    spec = parse_transport(spec)
    bound: list[Endpoint] = []
    for ep in spec.endpoints:
        if spec.scheme == "inproc":
            stream.add_inproc_reader(_subscribe_inproc(ep.host))
            bound.append(ep)
        elif spec.scheme == "tcp":
            acceptor = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            acceptor.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            acceptor.bind((ep.host, ep.port))
            acceptor.listen(1)
            bound.append(Endpoint(ep.host, acceptor.getsockname()[1]))
            stream.add_tcp_reader(acceptor, max_packet_size)
            acceptor.close()  # spead2 holds its own duplicate of the socket
        elif ep.is_multicast:
            if ep.port == 0:
                raise ValueError("a multicast endpoint needs an explicit port")
            stream.add_udp_reader(
                ep.host, ep.port, max_packet_size, buffer_size, interface_address
            )
            bound.append(ep)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with contextlib.suppress(OSError):  # capped by net.core.rmem_max: best effort
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_size)
            sock.bind((ep.host, ep.port))
            bound.append(Endpoint(ep.host, sock.getsockname()[1]))
            stream.add_udp_reader(sock, max_packet_size)
            sock.close()
    return bound
