"""A daemon started by the controller gets its options, required ones included, from telstate."""

import pytest

from karoo.cli import parse_args
from karoo.telstate import TelescopeState


def test_required_option_from_telstate(redis_url):
    ts = TelescopeState(redis_url)
    ts.add("config.cal", {"l0_spead": "udp://239.192.0.1:7148", "servers": 2}, immutable=True)
    ts.add("config.cal.2", {"server_id": 2}, immutable=True)
    ts.close()
    args = parse_args(["cal", "--telstate", redis_url, "--name", "cal.2"])
    assert (args.l0_spead, args.servers, args.server_id) == ("udp://239.192.0.1:7148", 2, 2)
    # An explicit option still wins over telstate.
    args = parse_args(["cal", "--telstate", redis_url, "--name", "cal.2", "--servers", "3"])
    assert args.servers == 3


def test_required_option_still_required(redis_url):
    with pytest.raises(SystemExit):
        parse_args(["cal"])
    with pytest.raises(SystemExit):  # telstate without it
        parse_args(["cal", "--telstate", redis_url, "--name", "cal.1"])
