"""Rule management against the real kernel: the pinned map, expiry, the
hybrid manager's hardware queue (with a slow recording test backend), the
flower backend's feature probe, and real TCP traffic blocked between two
network namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from xo._xo_cffi import lib
from xo.core import XoError, XoUnsupportedError
from xo.lab import add_addresses, add_veth, in_netns, scoped_namespaces
from xo.steer import FlowKey, HwBackend, InsertMode, Kind, Prog, Rule, RuleManager, Steer

BPF_FS_MAGIC = 0xCAFE4A11


def key(n: int, v6: bool = False) -> FlowKey:
    if v6:
        return FlowKey.tcp("2001:2::10", 20000 + n, "2001:2::1", 80)
    return FlowKey.tcp("198.18.0.10", 20000 + n, "198.18.0.1", 80)


def fs_magic(path: str) -> int:
    out = subprocess.run(["stat", "-f", "-c", "%t", path], capture_output=True, text=True)
    return int(out.stdout.strip(), 16) if out.returncode == 0 else 0


# ---- fixtures ----------------------------------------------------------------


@pytest.fixture
def pin_dir() -> Iterator[str]:
    """A fresh directory; the core mounts a bpffs on it (as it would on
    /sys/fs/bpf/xo) and takes it away again on close(unpin=True)."""
    base = tempfile.mkdtemp(prefix="xo-steer-test-")
    path = os.path.join(base, "pins")
    yield path
    if os.path.ismount(path):
        subprocess.run(["umount", "-l", path], check=False)
    with contextlib.suppress(OSError):
        os.rmdir(path)
    os.rmdir(base)


@pytest.fixture
def steer(pin_dir: str) -> Iterator[Steer]:
    s = Steer(pin_dir=pin_dir)
    yield s
    s.close(unpin=True)


# ---- software tier on the pinned map ----------------------------------------------


def test_pins_on_a_mounted_bpffs_and_unpins(pin_dir: str) -> None:
    s = Steer(pin_dir=pin_dir)
    try:
        assert s.pin_dir == pin_dir
        assert fs_magic(pin_dir) == BPF_FS_MAGIC
        assert {"xo_flows", "xo_stats"} <= set(os.listdir(pin_dir))
    finally:
        s.close(unpin=True)
    assert not os.path.exists(pin_dir)  # we created and mounted it: all gone


def test_insert_replace_remove_lookup_list(steer: Steer) -> None:
    k4, k6 = key(1), key(1, v6=True)
    block = Rule.block(ttl_s=30, owner=7)
    steer.insert(k4, block)
    steer.insert(k6, Rule.block(ttl_s=30, owner=7))
    got = steer.lookup(k4)
    assert got is not None and got.kind == block.kind and got.owner == 7
    assert got.expires_ns == block.expires_ns

    redirect = Rule.redirect("198.18.0.2", 18080, dst_mac="02:00:00:00:00:02",
                             src_mac="02:00:00:00:00:01", ttl_s=30, owner=7)
    steer.insert(k4, redirect)  # replace: one write
    assert steer.lookup(k4) == redirect
    assert steer.count() == 2
    assert dict(steer.list()) == {k4: redirect, k6: steer.lookup(k6)}

    steer.remove(k4)
    assert steer.lookup(k4) is None
    with pytest.raises(XoError) as err:
        steer.remove(k4)
    assert err.value.code == lib.XO_E_NOTFOUND
    assert steer.count() == 1


def test_insert_modes(steer: Steer) -> None:
    k = key(2)
    with pytest.raises(XoError) as err:
        steer.insert(k, Rule.block(ttl_s=30), InsertMode.REPLACE)
    assert err.value.code == lib.XO_E_NOTFOUND
    steer.insert(k, Rule.block(ttl_s=30), InsertMode.CREATE)
    with pytest.raises(XoError) as err:
        steer.insert(k, Rule.block(ttl_s=30), InsertMode.CREATE)
    assert err.value.code == lib.XO_E_BUSY
    steer.insert(k, Rule.block(ttl_s=60), InsertMode.REPLACE)


def test_rejects_entries_that_could_black_hole(steer: Steer) -> None:
    with pytest.raises(XoError, match="expiry") as err:
        steer.insert(key(3), Rule.block())  # no timeout
    assert err.value.code == lib.XO_E_INVAL
    with pytest.raises(XoError, match="redirect without"):
        steer.insert(key(3), Rule(kind=Kind.REDIRECT, expires_ns=1))
    assert steer.count() == 0


def test_second_handle_shares_the_pinned_map(steer: Steer, pin_dir: str) -> None:
    """Another process (or a restart) opening the same pin dir sees the rules."""
    steer.insert(key(4), Rule.block(ttl_s=30))
    other = Steer(pin_dir=pin_dir)
    try:
        assert other.lookup(key(4)) is not None
        other.remove(key(4))
        assert steer.lookup(key(4)) is None
    finally:
        other.close()  # no unpin: the fixture's handle owns the pins


def test_expiry_sweep_and_owner_purge(steer: Steer) -> None:
    now = time.monotonic_ns()
    steer.insert(key(5), Rule.block(expires_ns=now - 1))
    # key 6 expires a minute from now: a stalled test thread cannot make the
    # first sweep (at the real now) take it too.
    steer.insert(key(6), Rule.redirect("198.18.0.2", 1, expires_ns=now + 60 * 10**9))
    steer.insert(key(7), Rule.block(ttl_s=3600, owner=42))
    steer.insert(key(8), Rule.src_rewrite("198.18.0.1", 80, owner=42))  # never expires
    assert steer.sweep() == 1
    assert steer.lookup(key(5)) is None
    assert steer.sweep(now + 61 * 10**9) == 1  # as if a minute later: key 6, not key 7
    assert steer.lookup(key(6)) is None
    assert steer.purge_owner(42) == 2
    assert steer.count() == 0


# ---- hybrid manager: backend none -----------------------------------------------


def test_manager_without_hardware(steer: Steer) -> None:
    with RuleManager(steer, 1, "none") as rules:
        assert rules.backend_name == "none"
        rules.insert(key(10), Rule.block(ttl_s=30))
        assert steer.lookup(key(10)) is not None
        assert rules.hw_state(key(10)) == set()
        rules.remove(key(10))
        assert steer.lookup(key(10)) is None
        st = rules.stats()
        assert (st["sw_inserts"], st["sw_removes"], st["hw_enqueued"]) == (1, 1, 0)


# ---- hybrid manager: the queue, with a slow test backend --------------------------


def red(port: int = 18080) -> Rule:
    """A redirect: the kind that goes to hardware by default."""
    return Rule.redirect("198.18.0.2", port, dst_mac="02:00:00:00:00:02", ttl_s=30)


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait for an event; the timeout only turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.001)


def test_queued_insert_reaches_hardware(steer: Steer) -> None:
    hw = HwBackend.test(insert_delay_us=20_000)
    with RuleManager(steer, 1, hw) as rules:
        rules.insert(key(20), red())
        assert steer.lookup(key(20)) is not None  # software: immediately
        rules.drain()
        assert hw.has(key(20))
        assert rules.hw_state(key(20)) == {"installed"}
        assert [c.op for c in hw.calls()] == ["insert"]


def test_remove_cancels_queued_insert(steer: Steer) -> None:
    hw = HwBackend.test()
    with RuleManager(steer, 1, hw) as rules:
        with hw.holding_inserts():
            rules.insert(key(21), red())            # goes in flight, held there
            wait_for(lambda: hw.held() == 1)
            assert "inflight" in rules.hw_state(key(21))
            rules.insert(key(22), red())            # waits in the queue
            assert rules.hw_state(key(22)) == {"queued"}
            rules.remove(key(22))
            # Returned while the NIC is still busy with 21: nothing to wait for.
            assert "inflight" in rules.hw_state(key(21)) and hw.held() == 1
            assert steer.lookup(key(22)) is None
        rules.drain()
        assert [(c.op, c.key) for c in hw.calls()] == [("insert", key(21))]  # never saw 22
        assert rules.stats()["hw_cancelled"] == 1


def test_remove_waits_for_inflight_insert_then_cleans_both_tiers(steer: Steer) -> None:
    hw = HwBackend.test(remove_delay_us=50_000)
    with RuleManager(steer, 1, hw) as rules:
        errors: list[BaseException] = []

        def remove() -> None:
            try:
                rules.remove(key(23))
            except BaseException as exc:  # reported below, in the main thread
                errors.append(exc)

        with hw.holding_inserts():
            rules.insert(key(23), red())
            wait_for(lambda: hw.held() == 1)
            remover = threading.Thread(target=remove)
            remover.start()
            # remove() cannot return while the insert it waits for is held
            # (however long this thread looks away).
            remover.join(0.05)
            assert remover.is_alive()
            assert hw.held() == 1 and hw.calls() == []
        remover.join(30)
        assert not remover.is_alive() and not errors, errors
        done = time.monotonic_ns()
        # Both tiers clean the moment remove() returns.
        assert not hw.has(key(23))
        assert steer.lookup(key(23)) is None
        calls = hw.calls()
        assert [(c.op, c.key) for c in calls] == [("insert", key(23)), ("remove", key(23))]
        assert calls[0].end_ns <= calls[1].start_ns <= calls[1].end_ns <= done
        assert rules.hw_state(key(23)) == set()


def test_remove_of_installed_entry_is_synchronous(steer: Steer) -> None:
    hw = HwBackend.test(remove_delay_us=100_000)
    with RuleManager(steer, 1, hw) as rules:
        rules.insert(key(24), red())
        rules.drain()
        assert hw.has(key(24))
        rules.remove(key(24))
        done = time.monotonic_ns()
        # The (slow) backend removal had finished when remove() returned.
        calls = hw.calls()
        assert [c.op for c in calls] == ["insert", "remove"]
        assert calls[1].end_ns <= done
        assert not hw.has(key(24)) and steer.lookup(key(24)) is None
        assert rules.stats()["hw_removed"] == 1


def test_full_queue_falls_back_to_software(steer: Steer) -> None:
    hw = HwBackend.test()
    with RuleManager(steer, 1, hw, queue_capacity=2) as rules:
        with hw.holding_inserts():
            rules.insert(key(30), red())
            wait_for(lambda: hw.held() == 1)
            for n in range(31, 36):
                rules.insert(key(n), red())
            st = rules.stats()
            assert st["queue_len"] == 2 and st["hw_enqueued"] == 3
            assert st["hw_fallback_full"] == 3
            assert all(steer.lookup(key(n)) is not None for n in range(30, 36))  # software
        rules.drain()
        assert hw.installed() == 3
        assert {rules.hw_state(key(n)) == set() for n in (33, 34, 35)} == {True}
        for n in range(30, 36):  # removal works for both kinds of flow
            rules.remove(key(n))
        assert hw.installed() == 0 and steer.count() == 0


def test_fallback_removes_stale_hardware_entry(steer: Steer) -> None:
    hw = HwBackend.test()
    with RuleManager(steer, 1, hw, queue_capacity=1) as rules:
        rules.insert(key(40), red(1))
        rules.drain()
        assert hw.has(key(40))
        errors: list[BaseException] = []

        def insert_40() -> None:
            try:
                rules.insert(key(40), red(2))
            except BaseException as exc:  # reported below, in the main thread
                errors.append(exc)

        with hw.holding_inserts():
            rules.insert(key(41), red())
            wait_for(lambda: hw.held() == 1)
            rules.insert(key(42), red())  # fills the queue
            # No room: software only, decided now; taking the old hardware
            # entry out then waits for the backend, busy with 41.
            inserter = threading.Thread(target=insert_40)
            inserter.start()
            wait_for(lambda: rules.stats()["hw_fallback_full"] == 1)
        inserter.join(30)
        assert not inserter.is_alive() and not errors, errors
        assert not hw.has(key(40))  # ...and the old hardware redirect is gone
        entry = steer.lookup(key(40))
        assert entry is not None and entry.new_dst_port == 2  # software has the new one
        assert rules.stats()["hw_fallback_full"] == 1


def test_block_stays_in_software_and_retires_hardware_redirect(steer: Steer) -> None:
    """Moving a connection on (block, then redirect elsewhere) must not leave
    the old target's redirect in the NIC, where it would win over eBPF."""
    hw = HwBackend.test(remove_delay_us=50_000)
    with RuleManager(steer, 1, hw) as rules:
        rules.insert(key(43), red())
        rules.drain()
        assert hw.has(key(43))
        rules.insert(key(43), Rule.block(ttl_s=30))
        done = time.monotonic_ns()
        # Synchronous hardware removal: finished before insert() returned.
        calls = hw.calls()
        assert [c.op for c in calls] == ["insert", "remove"] and calls[1].end_ns <= done
        assert not hw.has(key(43))
        entry = steer.lookup(key(43))
        assert entry is not None and entry.kind == Kind.BLOCK
        rules.insert(key(44), Rule.src_rewrite("198.18.0.1", 80))
        rules.drain()
        assert [c.op for c in hw.calls()] == ["insert", "remove"]  # nothing else reached hw
        assert rules.stats()["sw_only"] == 2


def test_hw_kinds_sends_chosen_kinds_to_hardware(steer: Steer) -> None:
    hw = HwBackend.test()
    with RuleManager(steer, 1, hw, hw_kinds={Kind.BLOCK, Kind.REDIRECT}) as rules:
        rules.insert(key(45), Rule.block(ttl_s=30))
        rules.insert(key(46), Rule.src_rewrite("198.18.0.1", 80))
        rules.drain()
        assert hw.has(key(45)) and not hw.has(key(46))


def test_queued_inserts_coalesce(steer: Steer) -> None:
    hw = HwBackend.test(insert_delay_us=100_000)
    with RuleManager(steer, 1, hw) as rules:
        rules.insert(key(50), red())
        wait_for(lambda: "inflight" in rules.hw_state(key(50)))
        rules.insert(key(51), red(1))
        rules.insert(key(51), red(2))
        rules.drain()
        inserts = [c for c in hw.calls() if c.key == key(51)]
        assert len(inserts) == 1  # the NIC is told only the newest action
        assert rules.stats()["hw_coalesced"] == 1


def test_hardware_failure_leaves_software_in_charge(steer: Steer) -> None:
    hw = HwBackend.test()
    with RuleManager(steer, 1, hw) as rules:
        hw.fail_inserts(lib.XO_E_NOSPACE)
        rules.insert(key(60), red())
        rules.drain()
        assert rules.stats()["hw_errors"] == 1
        assert "injected insert failure" in rules.last_hw_error
        assert steer.lookup(key(60)) is not None and not hw.has(key(60))
        rules.remove(key(60))
        assert steer.lookup(key(60)) is None


def test_sweep_expires_both_tiers(steer: Steer) -> None:
    hw = HwBackend.test()
    with RuleManager(steer, 1, hw) as rules:
        rules.insert(key(70), Rule.redirect("198.18.0.2", 1,
                                            expires_ns=time.monotonic_ns() + 20_000_000))
        rules.insert(key(71), red())
        rules.drain()
        assert hw.installed() == 2
        assert rules.sweep(time.monotonic_ns() + 30_000_000) == 1
        assert not hw.has(key(70)) and hw.has(key(71))
        assert steer.lookup(key(70)) is None


def test_concurrent_producers(steer: Steer) -> None:
    """Many threads insert and remove distinct flows; both tiers end empty."""
    hw = HwBackend.test(insert_delay_us=200)
    with RuleManager(steer, 1, hw, queue_capacity=64) as rules:
        errors: list[BaseException] = []

        def worker(base: int) -> None:
            try:
                for i in range(200):
                    k = key(1000 + base * 1000 + i)
                    rules.insert(k, red())
                    if i % 3 == 0:
                        rules.remove(k)
            except BaseException as exc:  # reported below, in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        rules.drain()
        for k, _ in steer.list():
            rules.remove(k)
        assert steer.count() == 0
        assert hw.installed() == 0
        st = rules.stats()
        assert st["sw_inserts"] == 800
        assert st["hw_enqueued"] + st["hw_fallback_full"] == 800


# ---- network namespaces -------------------------------------------------------------


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def tc(*args: str) -> str:
    return subprocess.run(["tc", *args], check=True, capture_output=True, text=True).stdout


def ns_ifindex(ns: str, dev: str) -> int:
    return json.loads(ip("-n", ns, "-j", "link", "show", "dev", dev))[0]["ifindex"]


@pytest.fixture
def veth_pair() -> Iterator[dict[str, str]]:
    """Two namespaces joined by a veth pair: client xoc0 <-> server xos0."""
    tag = secrets.token_hex(3)  # unique to this run: never another run's namespaces
    names = {"client": f"xo-stc{tag}", "server": f"xo-sts{tag}"}
    with scoped_namespaces(names.values()):
        add_veth(names["client"], "xoc0", names["server"], "xos0")
        add_addresses(names["client"], "xoc0", ["198.18.200.1/24", "2001:2:0:200::1/64"])
        add_addresses(names["server"], "xos0", ["198.18.200.2/24", "2001:2:0:200::2/64"])
        yield names


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_block_drops_real_tcp_then_traffic_flows(veth_pair: dict[str, str], pin_dir: str,
                                                 family: str) -> None:
    client_ns, server_ns = veth_pair["client"], veth_pair["server"]
    af = socket.AF_INET if family == "ipv4" else socket.AF_INET6
    caddr, saddr = (("198.18.200.1", "198.18.200.2") if family == "ipv4"
                    else ("2001:2:0:200::1", "2001:2:0:200::2"))
    cport, sport = 41000, 8080

    steer = Steer(pin_dir=pin_dir)
    netns = f"/run/netns/{server_ns}"
    try:
        steer.attach(ns_ifindex(server_ns, "xos0"), Prog.TC_INGRESS, netns=netns)
        with in_netns(server_ns):
            listener = socket.socket(af, socket.SOCK_STREAM)
            listener.bind((saddr, sport))
            listener.listen(1)
        with in_netns(client_ns):
            client = socket.socket(af, socket.SOCK_STREAM)
            client.bind((caddr, cport))  # the block rule names the client port
        with listener, client:
            client.settimeout(5)
            client.connect((saddr, sport))
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(5)
                client.sendall(b"before")
                assert conn.recv(100) == b"before"

                k = FlowKey.tcp(caddr, cport, saddr, sport)
                steer.insert(k, Rule.block(ttl_s=30))
                client.sendall(b"blocked")
                conn.settimeout(1.5)
                with pytest.raises(TimeoutError):
                    conn.recv(100)  # segment and its retransmissions dropped
                entry = steer.lookup(k)
                assert entry is not None and entry.packets >= 1
                assert steer.dp_stats()["blocked"] >= 1

                steer.remove(k)
                conn.settimeout(10)  # the next retransmission gets through
                assert conn.recv(100) == b"blocked"
                conn.sendall(b"reply")
                assert client.recv(100) == b"reply"
    finally:
        steer.close(unpin=True)
    # close() detached the program and removed the clsact qdisc it created.
    assert "clsact" not in tc("-n", server_ns, "qdisc", "show", "dev", "xos0")


def test_attach_detach_every_program(veth_pair: dict[str, str], pin_dir: str) -> None:
    ns = veth_pair["server"]
    netns = f"/run/netns/{ns}"
    ifindex = ns_ifindex(ns, "xos0")
    steer = Steer(pin_dir=pin_dir)
    try:
        for prog in (Prog.TC_INGRESS, Prog.TC_EGRESS):
            steer.attach(ifindex, prog, netns=netns)
            steer.attach(ifindex, prog, netns=netns)  # again: replaces, no duplicate
        steer.attach(ifindex, Prog.XDP, netns=netns)
        assert "xo_tc_ingress" in tc("-n", ns, "filter", "show", "dev", "xos0", "ingress")
        assert "xo_tc_egress" in tc("-n", ns, "filter", "show", "dev", "xos0", "egress")
        assert tc("-n", ns, "filter", "show", "dev", "xos0", "ingress").count("handle 0x58") == 1
        assert "prog/xdp" in ip("-n", ns, "link", "show", "dev", "xos0")
        with pytest.raises(XoError) as err:
            steer.attach(ifindex, Prog.XDP, netns=netns)
        assert err.value.code == lib.XO_E_BUSY

        steer.detach(ifindex, Prog.XDP, netns=netns)
        assert "prog/xdp" not in ip("-n", ns, "link", "show", "dev", "xos0")
        steer.detach(ifindex, Prog.TC_INGRESS, netns=netns)
        assert "xo_tc_" not in tc("-n", ns, "filter", "show", "dev", "xos0", "ingress")
        assert "clsact" in tc("-n", ns, "qdisc", "show", "dev", "xos0")  # egress still on it
        with pytest.raises(XoError) as err:
            steer.detach(ifindex, Prog.TC_INGRESS, netns=netns)
        assert err.value.code == lib.XO_E_NOTFOUND
    finally:
        steer.close(unpin=True)  # detaches the egress program, removes clsact
    assert "clsact" not in tc("-n", ns, "qdisc", "show", "dev", "xos0")


def test_xdp_leaves_a_foreign_program_alone(veth_pair: dict[str, str], pin_dir: str) -> None:
    """An XDP program someone else attached is neither replaced nor removed."""
    ns = veth_pair["server"]
    netns = f"/run/netns/{ns}"
    ifindex = ns_ifindex(ns, "xos0")
    other = Steer(pin=False)
    mine = Steer(pin_dir=pin_dir)
    try:
        other.attach(ifindex, Prog.XDP, netns=netns)
        with pytest.raises(XoError) as err:
            mine.attach(ifindex, Prog.XDP, netns=netns)
        assert err.value.code == lib.XO_E_BUSY
        mine.close(unpin=True)
        assert "prog/xdp" in ip("-n", ns, "link", "show", "dev", "xos0")
    finally:
        other.close()
    assert "prog/xdp" not in ip("-n", ns, "link", "show", "dev", "xos0")


def test_xdp_takes_over_its_own_stale_program(veth_pair: dict[str, str], pin_dir: str) -> None:
    """A process killed with its XDP program attached: the next handle on the
    same pinned map (same role instance) replaces it instead of failing."""
    ns = veth_pair["server"]
    netns = f"/run/netns/{ns}"
    ifindex = ns_ifindex(ns, "xos0")
    dead = Steer(pin_dir=pin_dir)
    dead.attach(ifindex, Prog.XDP, netns=netns)
    stale_id = xdp_prog_id(ns)
    dead.close(keep_attached=True)  # what SIGKILL leaves: program attached, map pinned
    assert xdp_prog_id(ns) == stale_id
    successor = Steer(pin_dir=pin_dir)
    try:
        successor.attach(ifindex, Prog.XDP, netns=netns)
        assert xdp_prog_id(ns) not in (None, stale_id)
        successor.detach(ifindex, Prog.XDP, netns=netns)
        assert xdp_prog_id(ns) is None
    finally:
        successor.close(unpin=True)


def xdp_prog_id(ns: str) -> int | None:
    match = re.search(r"prog/xdp id (\d+)", ip("-n", ns, "-d", "link", "show", "dev", "xos0"))
    return int(match.group(1)) if match else None


# ---- flower backend ------------------------------------------------------------------


def kernel_has_flower(ns: str) -> bool:
    """Independent check with tc(8): can a flower filter be created?"""
    subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", "xos0", "clsact"],
                   check=False, capture_output=True)
    res = subprocess.run(["tc", "-n", ns, "filter", "add", "dev", "xos0", "ingress",
                          "protocol", "ip", "prio", "7", "flower", "skip_hw",
                          "ip_proto", "tcp", "dst_port", "1"], capture_output=True, text=True)
    subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", "xos0", "clsact"],
                   check=False, capture_output=True)
    return res.returncode == 0


def test_flower_backend_refuses_a_kernel_without_flower(veth_pair: dict[str, str],
                                                       steer: Steer) -> None:
    """This machine's kernel: the probe says what is missing and what to do,
    and leaves the interface as it found it. (On a kernel with flower, the
    backend's real work is tested in test_flower_lane.py.)"""
    ns = veth_pair["server"]
    netns = f"/run/netns/{ns}"
    ifindex = ns_ifindex(ns, "xos0")
    if kernel_has_flower(ns):
        pytest.skip("this kernel has tc-flower: test_flower_lane.py covers the backend")
    with pytest.raises(XoUnsupportedError) as err:
        RuleManager(steer, ifindex, "flower", netns=netns)
    text = str(err.value)
    assert err.value.code == lib.XO_E_UNSUPPORTED
    assert "CONFIG_NET_CLS_FLOWER" in text and "CONFIG_NET_ACT_PEDIT" in text
    assert "backend 'none'" in text
    assert "clsact" not in tc("-n", ns, "qdisc", "show", "dev", "xos0")


def test_flower_is_not_a_silent_default(steer: Steer) -> None:
    with pytest.raises(ValueError, match="backend"):
        RuleManager(steer, 1, "flowr")


def test_path_helpers() -> None:
    from xo.steer import default_object_path

    assert default_object_path().name == "xo_steer.bpf.o"
    assert Path(default_object_path()).exists()
