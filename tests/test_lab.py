"""Tests of the one-machine lab (xo.lab) against the real kernel: no mocks.

Every test uses its own random lab name (so parallel runs and other engineers' labs
are never touched) and a fixture that tears the lab down even when the test fails.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import ipaddress
import itertools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pyroute2 import IPRoute, netns
from xo import lab as xolab
from xo.lab import Lab, LabError, LabExistsError, LabHost, in_netns, lab

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

IO_TIMEOUT = 5.0
FAMILIES = [pytest.param(socket.AF_INET, id="ipv4"), pytest.param(socket.AF_INET6, id="ipv6")]


def _random_lab_name() -> str:
    return "x" + secrets.token_hex(3)  # 7 characters of [a-z0-9]


@pytest.fixture
def lab_names() -> Iterator[Callable[[], str]]:
    """Hands out fresh lab names; every lab so named is torn down afterwards."""
    handed_out: list[str] = []

    def new_name() -> str:
        name = _random_lab_name()
        handed_out.append(name)
        return name

    yield new_name
    for name in handed_out:
        xolab.down(name)


@pytest.fixture
def lab_name(lab_names: Callable[[], str]) -> str:
    return lab_names()


@pytest.fixture
def two_target_lab(lab_name: str) -> Lab:
    return xolab.up(lab_name, targets=2)


# --------------------------------------------------------------------------- helpers


def _netns_inode_of_thread() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def _root_links_of(lab_name: str) -> list[str]:
    with IPRoute() as ipr:
        names = [link.get_attr("IFLA_IFNAME") for link in ipr.link("dump")]
    return [name for name in names if name.startswith(f"xo{lab_name}")]


def _assert_gone(lab_name: str) -> None:
    assert not [ns for ns in netns.listnetns() if ns.startswith(f"xo-{lab_name}-")]
    assert not xolab.lab_state_path(lab_name).exists()
    assert _root_links_of(lab_name) == []
    assert xolab.lab_in_use(lab_name) == []


def _listen(member: LabHost, family: int) -> socket.socket:
    with in_netns(member.netns):
        server = socket.socket(family, socket.SOCK_STREAM)
    server.settimeout(IO_TIMEOUT)
    server.bind((member.address(family), 0))
    server.listen()
    return server


def _connect(member: LabHost, family: int, address: tuple[str, int]) -> socket.socket:
    with in_netns(member.netns):
        client = socket.socket(family, socket.SOCK_STREAM)
    client.settimeout(IO_TIMEOUT)
    client.connect(address[:2])
    return client


def _tcp_echo(source: LabHost, destination: LabHost, family: int) -> None:
    """Connect from `source` to `destination`, send a message, get it echoed back."""
    message = f"{source.name}->{destination.name}".encode()
    with _listen(destination, family) as server:
        with _connect(source, family, server.getsockname()) as client:
            accepted, peer = server.accept()  # the handshake finished in the backlog
            with accepted:
                assert peer[0] == source.address(family)
                client.sendall(message)
                accepted.sendall(accepted.recv(1024))
                assert client.recv(1024) == message


def _bulk_transfer(sender: LabHost, receiver: LabHost, nbytes: int) -> tuple[str, str]:
    """Send nbytes of random data; (sha256 sent, sha256 received)."""
    sent, got = hashlib.sha256(), hashlib.sha256()
    with _listen(receiver, socket.AF_INET) as server:

        def receive() -> None:
            connection, _ = server.accept()
            with connection:
                connection.settimeout(IO_TIMEOUT)
                while chunk := connection.recv(1 << 20):
                    got.update(chunk)

        receiver_thread = threading.Thread(target=receive)
        receiver_thread.start()
        with _connect(sender, socket.AF_INET, server.getsockname()) as client:
            left = nbytes
            while left:
                chunk = os.urandom(min(left, 1 << 20))
                sent.update(chunk)
                client.sendall(chunk)
                left -= len(chunk)
        receiver_thread.join(IO_TIMEOUT * 4)
        assert not receiver_thread.is_alive()
    return sent.hexdigest(), got.hexdigest()


def _shaper_stats(netns: str, ifname: str) -> dict[str, dict[str, Any]]:
    """The qdiscs on ifname as the kernel reports them (options and counters),
    by handle: "1:" the htb root, "10:" the control leaf, "20:" the bulk leaf."""
    out = subprocess.run(["tc", "-n", netns, "-s", "-j", "qdisc", "show", "dev", ifname],
                         capture_output=True, text=True, check=True)
    return {q["handle"]: q for q in json.loads(out.stdout)}


def _shaper_classes(netns: str, ifname: str) -> dict[str, str]:
    """htb class id -> its line in `tc class show` (tc prints htb classes as text only)."""
    out = subprocess.run(["tc", "-n", netns, "class", "show", "dev", ifname],
                         capture_output=True, text=True, check=True)
    return {line.split()[2]: line for line in out.stdout.splitlines() if line.startswith("class")}


# --------------------------------------------------------------------------- pure functions


def test_lab_names_are_validated() -> None:
    for good in ("a", "lab", "x1b2c3d4"):
        assert xolab.validate_lab_name(good) == good
    for bad in ("", "Lab", "x-y", "toolongname", "a_b", "a.b"):
        with pytest.raises(LabError):
            xolab.validate_lab_name(bad)


def test_names_fit_ifnamsiz_and_are_unique_per_lab() -> None:
    longest = "a" * xolab.LAB_NAME_MAX_LEN
    members = ["client", "host"] + [f"t{i}" for i in range(xolab.MAX_TARGETS)]
    names = [xolab.bridge_ifname(longest)]
    for member in members:
        names += [xolab.member_ifname(longest, member), xolab.port_ifname(longest, member)]
    assert max(len(name) for name in names) <= 15
    assert len(set(names)) == len(names)
    assert all(name.startswith("xo") for name in names)
    # A lab name never contains '-', so "xo<lab>-" cannot be another lab's prefix.
    assert xolab.member_ifname("ab", "t1") != xolab.member_ifname("abt", "1")
    assert xolab.member_netns("demo", "t3") == "xo-demo-t3"
    assert xolab.LAB_NETNS_RE.fullmatch("xo-demo-t3")["lab"] == "demo"


def test_rates_parse_like_tc() -> None:
    assert xolab.parse_rate(None) is None
    assert xolab.parse_rate("200mbit") == 200_000_000
    assert xolab.parse_rate("1gbit") == 1_000_000_000
    assert xolab.parse_rate("2.5GBit") == 2_500_000_000
    assert xolab.parse_rate("125mbps") == 1_000_000_000  # bytes per second, as in tc
    assert xolab.parse_rate("25gbit") == 25_000_000_000
    assert xolab.format_rate(200_000_000) == "200mbit"
    for bad in ("fast", "10 furlongs", "1kbit", "100gbit"):
        with pytest.raises(LabError):
            xolab.parse_rate(bad)


# --------------------------------------------------------------------------- bring-up


def test_up_describes_two_targets(two_target_lab: Lab) -> None:
    testbed = two_target_lab
    assert [member.name for member in testbed.hosts] == ["client", "host", "t0", "t1"]
    assert [member.name for member in testbed.targets] == ["t0", "t1"]
    assert Lab.load(testbed.name) == testbed
    saved = json.loads(xolab.lab_state_path(testbed.name).read_text())
    assert saved["hosts"][2]["ipv4"] == testbed.targets[0].ipv4

    v4_range = ipaddress.ip_network("198.18.0.0/15")
    v6_range = ipaddress.ip_network("2001:2::/48")
    assert len({member.ipv4 for member in testbed.hosts}) == 4
    assert len({member.mac for member in testbed.hosts}) == 4
    for member in testbed.hosts:
        assert ipaddress.ip_address(member.ipv4) in v4_range
        assert ipaddress.ip_address(member.ipv6) in v6_range
        assert member.netns.startswith(f"xo-{testbed.name}-")
        assert member.ifname.startswith(f"xo{testbed.name}-")
        assert member.exists()
        with in_netns(member.netns), IPRoute() as ipr:
            link = ipr.link("get", index=member.ifindex)[0]
            assert link.get_attr("IFLA_IFNAME") == member.ifname
            assert link.get_attr("IFLA_ADDRESS") == member.mac
            assert link.get_attr("IFLA_OPERSTATE") == "UP"
            addresses = {a.get_attr("IFA_ADDRESS") for a in ipr.addr("dump", index=member.ifindex)}
            assert {member.ipv4, member.ipv6} <= addresses
            lo = ipr.link("get", index=ipr.link_lookup(ifname="lo")[0])[0]
            assert lo.get_attr("IFLA_OPERSTATE") in ("UNKNOWN", "UP")
            with open("/proc/sys/net/ipv4/tcp_no_metrics_save") as sysctl:
                assert sysctl.read().strip() == "1"
    # Nothing of the lab lives in the root namespace.
    assert _root_links_of(testbed.name) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_every_pair_talks_tcp(two_target_lab: Lab, family: int) -> None:
    for source, destination in itertools.permutations(two_target_lab.hosts, 2):
        _tcp_echo(source, destination, family)


def test_bridge_namespace_reaches_nothing(two_target_lab: Lab) -> None:
    testbed = two_target_lab
    with in_netns(testbed.bridge_netns), IPRoute() as ipr:
        routes = [
            route
            for family in (socket.AF_INET, socket.AF_INET6)
            for route in ipr.route("dump", family=family)
            if route.get_attr("RTA_TABLE") == 254  # main table (local holds only lo)
        ]
        assert routes == []
        addresses = {a.get_attr("IFA_ADDRESS") for a in ipr.addr("dump")}
        assert addresses <= {"127.0.0.1"}
        links = {link.get_attr("IFLA_IFNAME"): link for link in ipr.link("dump")}
        ports = {member.port_ifname for member in testbed.hosts}
        assert set(links) == {"lo", testbed.bridge_ifname} | ports
        for port in ports:  # each port's peer is in a lab member namespace
            assert links[port].get_attr("IFLA_LINK_NETNSID") is not None
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(IO_TIMEOUT)
            with pytest.raises(OSError) as unreachable:
                probe.connect((testbed.host.ipv4, 80))
            assert unreachable.value.errno == errno.ENETUNREACH


def test_in_netns_moves_the_thread_and_sockets_stay(two_target_lab: Lab) -> None:
    target = two_target_lab.targets[0]
    home = _netns_inode_of_thread()
    # A thread that already runs is not moved along (threads created inside would
    # inherit the namespace, like child processes).
    look_now, looked = threading.Event(), threading.Event()
    bystander_inodes: list[int] = []

    def bystander() -> None:
        look_now.wait(IO_TIMEOUT)
        bystander_inodes.append(_netns_inode_of_thread())
        looked.set()

    bystander_thread = threading.Thread(target=bystander)
    bystander_thread.start()
    with in_netns(target.netns):
        inside = _netns_inode_of_thread()
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        look_now.set()
        looked.wait(IO_TIMEOUT)
    bystander_thread.join()
    assert bystander_inodes == [home]
    assert inside == os.stat(f"/run/netns/{target.netns}").st_ino != home
    assert _netns_inode_of_thread() == home
    with server:
        # Back home, yet the socket still belongs to the target's namespace: it can bind
        # the target's address, which does not exist here.
        server.bind((target.ipv4, 0))
        server.listen()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as outside:
            with pytest.raises(OSError) as not_here:
                outside.bind((target.ipv4, 0))
            assert not_here.value.errno == errno.EADDRNOTAVAIL
        with _connect(two_target_lab.client, socket.AF_INET, server.getsockname()) as client:
            accepted, _ = server.accept()
            accepted.close()
            assert client.getpeername()[0] == target.ipv4


def test_in_netns_restores_on_exception(two_target_lab: Lab) -> None:
    home = _netns_inode_of_thread()
    with pytest.raises(ZeroDivisionError), in_netns(two_target_lab.host.netns):
        1 / 0  # noqa: B018
    assert _netns_inode_of_thread() == home
    with pytest.raises(LabError, match="does not exist"), in_netns("xo-nosuch-host"):
        pass


def test_run_and_popen_in_a_namespace(two_target_lab: Lab) -> None:
    target = two_target_lab.targets[0]
    bind_target = f"import socket; socket.socket().bind(({target.ipv4!r}, 0))"
    inside = two_target_lab.run("t0", [sys.executable, "-c", bind_target], capture_output=True)
    assert inside.returncode == 0, inside.stderr
    assert subprocess.run([sys.executable, "-c", bind_target], capture_output=True).returncode
    via_ip = xolab.run(
        target,
        ["ip", "-o", "link", "show", target.ifname],
        sysfs=True,
        capture_output=True,
        text=True,
        check=True,
    )
    assert target.ifname in via_ip.stdout

    server_code = (
        "import socket, sys\n"
        f"s = socket.create_server(({target.ipv4!r}, 0))\n"
        "print(s.getsockname()[1], flush=True)\n"
        "c, _ = s.accept(); c.sendall(b'hello'); c.close()\n"
        "s.accept()\n"  # then wait until stopped
    )
    server = two_target_lab.popen(
        target, [sys.executable, "-c", server_code], stdout=subprocess.PIPE, text=True
    )
    assert server.netns == target.netns
    port = int(server.stdout.readline())
    with _connect(two_target_lab.client, socket.AF_INET, (target.ipv4, port)) as client:
        assert client.recv(16) == b"hello"
    assert server.poll() is None
    assert server.stop(timeout=IO_TIMEOUT) == -signal.SIGTERM
    server.stdout.close()
    assert two_target_lab.processes == [server]
    two_target_lab.stop_processes()  # already stopped: a no-op
    assert two_target_lab.processes == []


def test_popen_escalates_to_sigkill(two_target_lab: Lab) -> None:
    stubborn = xolab.popen(
        two_target_lab.host,
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    with stubborn:
        assert stubborn.stdout.readline() == b"ready\n"
        assert stubborn.stop(timeout=0.3) == -signal.SIGKILL


def test_up_refuses_an_existing_lab_and_force_recreates(two_target_lab: Lab) -> None:
    name = two_target_lab.name
    with pytest.raises(LabExistsError, match="already exists"):
        xolab.up(name, targets=1)
    with pytest.raises(LabExistsError), lab(name, targets=1):
        pytest.fail("must not get here")
    assert two_target_lab.exists()  # the refused context manager did not tear it down
    recreated = xolab.up(name, targets=1, force=True)
    assert [member.name for member in recreated.hosts] == ["client", "host", "t0"]
    assert Lab.load(name) == recreated


# --------------------------------------------------------------------------- teardown


def test_down_removes_everything_and_twice_is_fine(two_target_lab: Lab) -> None:
    name = two_target_lab.name
    removed = xolab.down(name)
    assert sorted(removed) == sorted(two_target_lab.namespaces)
    _assert_gone(name)
    assert xolab.down(name) == []
    _assert_gone(name)


def test_down_removes_a_partial_lab(lab_name: str) -> None:
    # What an `up` killed half-way could leave: namespaces, no description.
    xolab.create_netns(xolab.bridge_netns(lab_name))
    xolab.create_netns(xolab.member_netns(lab_name, "host"))
    assert lab_name in xolab.list_labs()
    assert xolab.lab_status(lab_name)["described"] is False
    with pytest.raises(LabExistsError):
        xolab.up(lab_name)
    assert len(xolab.down(lab_name)) == 2
    _assert_gone(lab_name)


def test_down_removes_links_even_while_something_holds_the_namespace(lab_name: str) -> None:
    testbed = xolab.up(lab_name, targets=1)
    with in_netns(testbed.host.netns):
        pinning_socket = socket.socket()
    pinning_fd = os.open(f"/run/netns/{testbed.host.netns}", os.O_RDONLY)
    try:
        xolab.down(lab_name)
        _assert_gone(lab_name)
        # The namespace lives on (socket and fd refer to it), but without any link
        # but lo: the veth went with the bridge port that down() deleted.
        links = subprocess.run(
            ["nsenter", f"--net=/proc/self/fd/{pinning_fd}", "ip", "-o", "link", "show"],
            pass_fds=[pinning_fd],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        assert [line.split(":")[1].strip() for line in links] == ["lo"]
    finally:
        os.close(pinning_fd)
        pinning_socket.close()


def test_context_manager_tears_down_on_exception(lab_name: str) -> None:
    with pytest.raises(RuntimeError, match="boom"), lab(lab_name, targets=1) as testbed:
        assert testbed.exists()
        raise RuntimeError("boom")
    _assert_gone(lab_name)


def test_context_manager_tears_down_on_keyboard_interrupt(lab_name: str) -> None:
    with pytest.raises(KeyboardInterrupt), lab(lab_name, targets=1) as testbed:
        sleeper = testbed.popen("t0", ["sleep", "60"])
        raise KeyboardInterrupt
    assert sleeper.returncode == -signal.SIGTERM  # background processes are stopped too
    _assert_gone(lab_name)


def test_two_labs_coexist(lab_names: Callable[[], str]) -> None:
    first_name, second_name = lab_names(), lab_names()
    with lab(first_name, targets=1) as first, lab(second_name, targets=2) as second:
        assert set(first.namespaces).isdisjoint(second.namespaces)
        assert {first_name, second_name} <= set(xolab.list_labs())
        # Same addresses, separate bridges: each lab talks only within itself.
        _tcp_echo(first.client, first.targets[0], socket.AF_INET)
        _tcp_echo(second.client, second.targets[1], socket.AF_INET6)
        xolab.down(first_name)
        _assert_gone(first_name)
        assert second.exists()
        _tcp_echo(second.host, second.targets[0], socket.AF_INET)
    _assert_gone(second_name)


# --------------------------------------------------------------------------- rate limits


def test_rate_limit_shapes_bulk_traffic(lab_name: str) -> None:
    """The limit is judged by the shaper's own counters, not a stopwatch: every
    byte of a bulk transfer passes the host's shaper (its bulk class), which had
    to hold the sender back (overlimits), at the rate the lab asked for; the
    data arrives intact."""
    with lab(lab_name, targets=1, rate="200mbit") as testbed:
        host, target = testbed.host, testbed.targets[0]
        assert host.tbf is not None and testbed.client.tbf is None
        for member, ns, ifname in ((host, host.netns, host.ifname),
                                   (target, target.netns, target.ifname),
                                   (host, testbed.bridge_netns, host.port_ifname),
                                   (target, testbed.bridge_netns, target.port_ifname)):
            qdiscs = _shaper_stats(ns, ifname)
            assert qdiscs["1:"]["kind"] == "htb" and qdiscs["1:"]["root"], (member.name, qdiscs)
            assert qdiscs["1:"]["options"]["default"] == "0x20"
            classes = _shaper_classes(ns, ifname)
            # One class at the link rate holds the total; both leaves may use it all.
            assert "root rate 200Mbit ceil 200Mbit" in classes["1:1"], classes
            assert "prio 0 rate 100Mbit ceil 200Mbit" in classes["1:10"], classes
            assert "prio 1 rate 100Mbit ceil 200Mbit" in classes["1:20"], classes
        before = _shaper_stats(host.netns, host.ifname)
        nbytes = 16 << 20  # 128 burst-sized buckets: far more than the bucket holds
        sent, got = _bulk_transfer(host, target, nbytes)
        after = _shaper_stats(host.netns, host.ifname)
        assert got == sent
        assert after["20:"]["bytes"] - before["20:"]["bytes"] >= nbytes  # all of it as bulk
        assert after["10:"]["packets"] == before["10:"]["packets"]  # none as control
        assert after["1:"]["overlimits"] > before["1:"]["overlimits"]  # throttled the sender


def _port_transfer(sender: LabHost, receiver: LabHost, port: int, nbytes: int) -> None:
    """nbytes from sender to receiver's port (the receiver listens on it)."""
    with in_netns(receiver.netns):
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.settimeout(IO_TIMEOUT)
        server.bind((receiver.ipv4, port))
        server.listen()
        with _connect(sender, socket.AF_INET, (receiver.ipv4, port)) as client:
            accepted, _ = server.accept()
            with accepted:
                accepted.settimeout(IO_TIMEOUT)
                sender_thread = threading.Thread(target=client.sendall, args=(b"x" * nbytes,))
                sender_thread.start()
                got = 0
                while got < nbytes:
                    got += len(accepted.recv(1 << 20))
                sender_thread.join(IO_TIMEOUT)
                accepted.sendall(b"ok")  # an answer from the control port's side too
                assert client.recv(2) == b"ok"


def test_control_port_traffic_has_its_own_class(lab_name: str) -> None:
    """Segments to and from the XO control port go to the control class (prio 0)
    on every shaped interface they cross, in both directions; other ports' to
    the bulk class."""
    (port,) = xolab.CONTROL_PORTS
    with lab(lab_name, targets=1, rate="200mbit") as testbed:
        host, target = testbed.host, testbed.targets[0]
        ends = [(host.netns, host.ifname), (testbed.bridge_netns, target.port_ifname),
                (target.netns, target.ifname), (testbed.bridge_netns, host.port_ifname)]
        before = [_shaper_stats(ns, ifname) for ns, ifname in ends]
        _port_transfer(host, target, port, 1 << 20)  # host -> target:7700 and its ACKs
        after = [_shaper_stats(ns, ifname) for ns, ifname in ends]
        for (ns, ifname), b, a in zip(ends, before, after, strict=True):
            assert a["10:"]["packets"] > b["10:"]["packets"], (ns, ifname, a)
        # The data went host -> target: at least 1 MiB through the host's control
        # leaf and the target's bridge port's, none of it through their bulk leaves.
        for i in (0, 1):
            assert after[i]["10:"]["bytes"] - before[i]["10:"]["bytes"] >= 1 << 20
            assert after[i]["20:"]["bytes"] - before[i]["20:"]["bytes"] < 1 << 16
        middle = [_shaper_stats(ns, ifname) for ns, ifname in ends]
        _port_transfer(host, target, port + 1, 1 << 20)  # any other port: bulk
        final = [_shaper_stats(ns, ifname) for ns, ifname in ends]
        for i in (0, 1):
            assert final[i]["20:"]["bytes"] - middle[i]["20:"]["bytes"] >= 1 << 20
            assert final[i]["10:"]["packets"] == middle[i]["10:"]["packets"]


# --------------------------------------------------------------------------- CLI


def test_cli_up_status_down(lab_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert xolab.main(["up", "--name", lab_name, "--targets", "1", "--rate", "1gbit"]) == 0
    assert lab_name in capsys.readouterr().out
    assert xolab.main(["up", "--name", lab_name]) == 1
    assert "already exists" in capsys.readouterr().err

    assert xolab.main(["status", "--name", lab_name, "--json"]) == 0
    (status,) = json.loads(capsys.readouterr().out)["labs"]
    assert status["rate_bps"] == 1_000_000_000
    assert [member["netns_exists"] for member in status["hosts"]] == [True] * 3
    assert {member["link_state"] for member in status["hosts"]} == {"UP"}

    assert xolab.main(["status", "--name", lab_name]) == 0
    table = capsys.readouterr().out
    assert "xo-" + lab_name + "-t0" in table and "1gbit" in table

    assert xolab.main(["down", "--name", lab_name]) == 0
    assert xolab.main(["down", "--name", lab_name]) == 0
    assert "nothing to remove" in capsys.readouterr().out
    assert xolab.main(["status", "--name", lab_name]) == 1
    _assert_gone(lab_name)


def test_add_lab_commands_registers_on_a_parent_parser() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="xo")
    xolab.add_lab_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["lab", "down", "--all"])
    assert args.all and callable(args.func)
    args = parser.parse_args(["lab", "up", "--name", "demo", "--targets", "3", "--rate", "1gbit"])
    assert (args.name, args.targets, args.rate, args.force) == ("demo", 3, "1gbit", False)
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        parser.parse_args(["lab", "down", "--name", "demo", "--all"])
