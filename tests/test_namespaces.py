"""The one namespace helper (xo.lab.namespaces) on the real kernel: what the
lab, the test beds and the benchmarks build their namespaces and links with.
Names are random per run; everything made is gone afterwards, also when a
step fails."""

from __future__ import annotations

import os
import secrets
import socket

import pytest
from pyroute2 import IPRoute
from xo.lab import (
    LabError,
    LabExistsError,
    add_addresses,
    add_bridge,
    add_veth,
    in_netns,
    link_info,
    move_link,
    netns_exists,
    scoped_namespaces,
    set_master,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


def tag() -> str:
    return secrets.token_hex(3)


def root_links() -> set[str]:
    with IPRoute() as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.link("dump")}


def echo(client_ns: str, server_ns: str, server_ip: str, family: int) -> bytes:
    with in_netns(server_ns):
        listener = socket.socket(family, socket.SOCK_STREAM)
    with listener:
        listener.bind((server_ip, 0))
        listener.listen(1)
        with in_netns(client_ns):
            client = socket.create_connection((server_ip, listener.getsockname()[1]),
                                              timeout=10)
        server, _ = listener.accept()
        with client, server:
            client.sendall(b"through the veth")
            server.sendall(server.recv(100))
            return client.recv(100)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_veth_pair_between_two_namespaces_never_in_the_root(family: int) -> None:
    t = tag()
    a, b = f"xo-ns{t}-a", f"xo-ns{t}-b"
    before = root_links()
    with scoped_namespaces([a, b], {"net.ipv4.tcp_no_metrics_save": "1"}) as made:
        assert made == [a, b] and all(netns_exists(ns) for ns in made)
        index_a, index_b = add_veth(a, f"xo{t}a", b, f"xo{t}b", mac="02:78:6f:00:01:01")
        assert link_info(a, f"xo{t}a") == (index_a, "02:78:6f:00:01:01")
        assert link_info(b, f"xo{t}b")[0] == index_b
        add_addresses(a, f"xo{t}a", ["198.18.9.1/24", "2001:2:0:9::1/64"])
        add_addresses(b, f"xo{t}b", ["198.18.9.2/24", "2001:2:0:9::2/64"])
        server_ip = "198.18.9.2" if family == socket.AF_INET else "2001:2:0:9::2"
        assert echo(a, b, server_ip, family) == b"through the veth"
        with in_netns(a), open("/proc/sys/net/ipv4/tcp_no_metrics_save") as f:
            assert f.read().strip() == "1"
        assert root_links() == before  # nothing was ever made in the root namespace
    assert not netns_exists(a) and not netns_exists(b)


def test_a_bridge_joins_three_namespaces() -> None:
    t = tag()
    br, members = f"xo-ns{t}-br", [f"xo-ns{t}-{i}" for i in range(3)]
    with scoped_namespaces([br, *members]):
        add_bridge(br, f"xo{t}br")
        for i, ns in enumerate(members):
            add_veth(br, f"xo{t}p{i}", ns, f"xo{t}m{i}", up=False)
            set_master(br, f"xo{t}p{i}", f"xo{t}br")
            add_addresses(ns, f"xo{t}m{i}", [f"198.18.9.{i + 1}/24"])
        assert echo(members[0], members[2], "198.18.9.3", socket.AF_INET) == b"through the veth"
        assert echo(members[1], members[0], "198.18.9.1", socket.AF_INET) == b"through the veth"
    assert not any(netns_exists(ns) for ns in (br, *members))


def test_moving_a_link_between_namespaces() -> None:
    t = tag()
    p, a, b = (f"xo-ns{t}-{x}" for x in "pab")
    with scoped_namespaces([p, a, b]):
        add_veth(p, f"xo{t}p", a, f"xo{t}h")
        add_addresses(p, f"xo{t}p", ["198.18.9.1/24"])
        add_addresses(a, f"xo{t}h", ["198.18.9.2/24"])
        assert echo(p, a, "198.18.9.2", socket.AF_INET) == b"through the veth"
        index = move_link(a, f"xo{t}h", b)
        with pytest.raises(LabError, match="not found"):
            link_info(a, f"xo{t}h")
        assert link_info(b, f"xo{t}h")[0] == index
        add_addresses(b, f"xo{t}h", ["198.18.9.2/24"])
        assert echo(p, b, "198.18.9.2", socket.AF_INET) == b"through the veth"


def test_an_existing_namespace_is_refused_and_left_alone() -> None:
    t = tag()
    mine, theirs = f"xo-ns{t}-mine", f"xo-ns{t}-theirs"
    with scoped_namespaces([theirs]):
        with pytest.raises(LabExistsError, match=theirs), \
                scoped_namespaces([mine, theirs]):
            pytest.fail("the block must not run")
        assert not netns_exists(mine)  # what the failed scope made is gone again
        assert netns_exists(theirs)  # and what it did not make is untouched
    assert not netns_exists(theirs)


def test_the_scope_removes_its_namespaces_when_the_block_fails() -> None:
    t = tag()
    names = [f"xo-ns{t}-a", f"xo-ns{t}-b"]
    with pytest.raises(RuntimeError, match="boom"), scoped_namespaces(names):
        add_veth(names[0], f"xo{t}a", names[1], f"xo{t}b")
        raise RuntimeError("boom")
    assert not any(netns_exists(ns) for ns in names)
