"""Transport naming and the endpoint parser."""

import asyncio
import socket

import numpy as np
import pytest

from karoo.spead.cbf import CBFReceiver, CBFSender, CBFStreamParams
from karoo.spead.transport import (
    Endpoint,
    endpoint_list_to_str,
    inproc_queue,
    parse_endpoints,
    parse_transport,
    remove_inproc_queues,
)


def test_parse_endpoints_plus_n():
    eps = parse_endpoints("239.1.2.3+3:7148")
    assert eps == [Endpoint(f"239.1.2.{i}", 7148) for i in range(3, 7)]
    assert all(ep.is_multicast for ep in eps)
    assert endpoint_list_to_str(eps).split(",")[0] == "239.1.2.3:7148"


def test_parse_endpoints_lists_and_defaults():
    eps = parse_endpoints("10.0.0.1:7148,10.0.0.2+1", default_port=7200)
    assert eps == [Endpoint("10.0.0.1", 7148), Endpoint("10.0.0.2", 7200),
                   Endpoint("10.0.0.3", 7200)]
    assert not eps[0].is_multicast
    assert parse_endpoints(":7148") == [Endpoint("0.0.0.0", 7148)]
    assert parse_endpoints("239.255.255.255+1:1")[1].host == "240.0.0.0"


@pytest.mark.parametrize(
    "text", ["239.1.2.3+x:7148", "239.1.2.3:port", "239.1.2.3", "host+2:7148", "1.2.3.4:70000",
             "1.2.3.4:7148,,"]
)
def test_parse_endpoints_errors(text):
    with pytest.raises(ValueError):
        parse_endpoints(text)


def test_parse_transport():
    spec = parse_transport("udp://239.1.2.3+1:7148")
    assert spec.scheme == "udp" and len(spec) == 2
    assert parse_transport("239.1.2.3:7148").scheme == "udp"
    assert parse_transport("spead://239.1.2.3:7148").scheme == "udp"
    tcp = parse_transport("tcp://127.0.0.1:7000,tcp://127.0.0.1:7001")
    assert [ep.port for ep in tcp.endpoints] == [7000, 7001]
    inproc = parse_transport("inproc://cbf+2")
    assert [ep.host for ep in inproc.endpoints] == ["cbf", "cbf.1", "cbf.2"]
    assert parse_transport(str(inproc)) == inproc
    with pytest.raises(ValueError, match="scheme"):
        parse_transport("http://x:1")
    with pytest.raises(ValueError, match="mixed"):
        parse_transport("tcp://1.2.3.4:1,udp://1.2.3.4:2")


def test_inproc_registry():
    q = inproc_queue("test-registry")
    assert inproc_queue("test-registry") is q
    remove_inproc_queues("inproc://test-registry")
    assert inproc_queue("test-registry") is not q
    remove_inproc_queues("inproc://test-registry")


def _multicast_works() -> bool:
    try:
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        rx.bind(("239.255.10.1", 0))
        port = rx.getsockname()[1]
        mreq = socket.inet_aton("239.255.10.1") + socket.inet_aton("127.0.0.1")
        rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        rx.settimeout(0.5)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        tx.sendto(b"x", ("239.255.10.1", port))
        return rx.recv(10) == b"x"
    except OSError:
        return False


async def test_cbf_over_multicast_loopback():
    """Multicast on the loopback interface, where the host allows it (see transport docs)."""
    if not _multicast_works():
        pytest.skip("multicast loopback on 127.0.0.1 is not available on this host")
    params = CBFStreamParams(n_chans=32, n_chans_per_substream=8, n_bls=6, timestamp_step=100)
    spec = "udp://239.255.10.2+1:47148"
    rx = CBFReceiver(spec, params, interface_address="127.0.0.1", stop_on_stop_item=False)
    tx = await CBFSender.create(spec, params, interface_address="127.0.0.1", rate=20e6)
    data = np.arange(32 * 6 * 2, dtype=np.int32).reshape(32, 6, 2)
    await tx.start()
    await tx.send_dump(data, 1000)
    for _ in range(1000):  # descriptors on both groups, then the four data heaps
        if rx.heaps_seen >= 6:
            break
        await asyncio.sleep(0.01)
    rx.stop()
    dumps = [(d.timestamp, d.data.copy(), d.present.copy()) async for d in rx]
    assert len(dumps) == 1
    assert dumps[0][0] == 1000 and dumps[0][2].all()
    np.testing.assert_array_equal(dumps[0][1], data)


async def test_inproc_fanout_heap_counters():
    """Every reader of a queue name gets every heap; counters are distinct across the queues of
    one stream (a reader of several queues must not merge heaps) and equal across copies."""
    import spead2
    import spead2.recv
    import spead2.send

    from karoo.spead.transport import add_readers, make_send_stream

    spec = "inproc://fanout-cnt+1"
    readers = []
    for _ in range(2):  # e.g. the vis writer and cal, each reading both queues separately
        per_queue = []
        for name in ("inproc://fanout-cnt", "inproc://fanout-cnt.1"):
            stream = spead2.recv.Stream(spead2.ThreadPool(), spead2.recv.StreamConfig())
            add_readers(stream, name)
            per_queue.append(stream)
        readers.append(per_queue)
    tx = await make_send_stream(spec, spead2.send.StreamConfig())
    tx.set_cnt_sequence(10, 2)
    ig = spead2.send.ItemGroup()
    ig.add_item(0x1600, "timestamp", "", shape=(), format=[("u", 48)], value=0)
    for i in range(6):
        ig["timestamp"].value = i
        await tx.async_send_heap(ig.get_heap(), substream_index=i % 2)
    await tx.async_send_heap(ig.get_end(), substream_index=0)
    await tx.async_send_heap(ig.get_end(), substream_index=1)
    cnts = [[[heap.cnt for heap in stream] for stream in per_queue] for per_queue in readers]
    remove_inproc_queues(spec)
    assert cnts[0] == cnts[1]  # both readers got the same heaps, with the same counters
    assert cnts[0] == [[10, 14, 18], [12, 16, 20]]  # one sequence over both queues
