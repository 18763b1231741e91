"""The flower hardware tier on a real kernel (the full-kernel lane).

Every test here is marked ``fullkernel``: it runs inside Debian's 6.1
kernel under QEMU (tests/vmlane.py), where tc-flower, act_pedit, act_csum,
act_mirred and act_gact exist. Filters are installed in software mode
(``skip_hw``) on veth interfaces, so the kernel's software datapath runs
exactly the filter a NIC would be given.

The lab is the paper's: a client, a host and a target namespace on one
bridge. The host's flower filter blocks, then redirects the client's
packets to the target (rewriting MACs, address and port, fixing checksums,
sending them back out the same port); the target's egress filter rewrites
its replies' source to the host's address and port.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from xo._xo_cffi import lib
from xo.core import XoUnsupportedError
from xo.lab import (
    add_addresses,
    add_bridge,
    add_veth,
    create_netns,
    in_netns,
    netns_exists,
    remove_netns,
    set_master,
)
from xo.steer import HW_KINDS, FlowKey, Kind, Rule, RuleManager, Steer

pytestmark = pytest.mark.fullkernel

ROLES = {"c": 1, "h": 2, "t": 3}  # client, host, target: last address byte
PRIO = lib.XO_FLOWER_PRIORITY


def run(*argv: str, check: bool = True) -> str:
    res = subprocess.run(argv, capture_output=True, text=True)
    if check and res.returncode:
        raise RuntimeError(f"{' '.join(argv)}: exit {res.returncode}: {res.stderr.strip()}")
    return res.stdout


@dataclass
class BridgeLab:
    """client, host and target namespaces, each with one veth port on a
    bridge that lives in a fourth namespace and reaches nothing else."""

    tag: str = field(default_factory=lambda: secrets.token_hex(2))

    def __post_init__(self) -> None:
        self.bridge_ns = f"xo{self.tag}b"
        self.ns = {r: f"xo{self.tag}{r}" for r in ROLES}
        self.dev = {r: f"xo{self.tag}{r}0" for r in ROLES}

    def v4(self, role: str) -> str:
        return f"198.18.210.{ROLES[role]}"

    def v6(self, role: str) -> str:
        return f"2001:2:0:210::{ROLES[role]}"

    def addr(self, role: str, v6: bool) -> str:
        return self.v6(role) if v6 else self.v4(role)

    def mac(self, role: str) -> str:
        return f"02:00:c6:12:d2:{ROLES[role]:02x}"

    def netns(self, role: str) -> str:
        return f"/run/netns/{self.ns[role]}"

    def ifindex(self, role: str) -> int:
        out = run("ip", "-n", self.ns[role], "-j", "link", "show", "dev", self.dev[role])
        return int(json.loads(out)[0]["ifindex"])

    def tc(self, role: str, *args: str) -> str:
        return run("tc", "-n", self.ns[role], *args)

    def filters(self, role: str, direction: str) -> list[dict[str, object]]:
        """The flower filters on a role's port (tc -s -j), one per handle."""
        out = self.tc(role, "-s", "-j", "filter", "show", "dev", self.dev[role], direction)
        return [f for f in json.loads(out or "[]")
                if f.get("kind") == "flower" and "options" in f]

    def open(self) -> BridgeLab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        create_netns(self.bridge_ns)
        br = f"xo{self.tag}br"
        add_bridge(self.bridge_ns, br)
        for role, ns in self.ns.items():
            create_netns(ns)
            port = f"xo{self.tag}{role}p"
            add_veth(self.bridge_ns, port, ns, self.dev[role], peer_mac=self.mac(role),
                     up=False)
            set_master(self.bridge_ns, port, br)
            add_addresses(ns, self.dev[role], [f"{self.v4(role)}/24", f"{self.v6(role)}/64"])

    def close(self) -> None:
        for ns in (*self.ns.values(), self.bridge_ns):
            remove_netns(ns)


@pytest.fixture
def lab() -> Iterator[BridgeLab]:
    bl = BridgeLab().open()
    try:
        yield bl
    finally:
        bl.close()
    assert not [ns for ns in (*bl.ns.values(), bl.bridge_ns) if netns_exists(ns)]


@pytest.fixture
def steer() -> Iterator[Steer]:
    # The software tier is needed by the manager but no program is
    # attached: only the flower filters act on packets here.
    s = Steer(pin=False)
    yield s
    s.close()


def flower_manager(steer: Steer, lab: BridgeLab, role: str, kinds: set[Kind],
                   **kw: object) -> RuleManager:
    return RuleManager(steer, lab.ifindex(role), "flower", flower_mode="skip_hw",
                       netns=lab.netns(role), hw_kinds=kinds, **kw)  # type: ignore[arg-type]


def action_kinds(flt: dict[str, object]) -> list[str]:
    opts = flt["options"]
    assert isinstance(opts, dict)
    return [str(a["kind"]) for a in opts.get("actions", [])]


def action_packets(flt: dict[str, object], kind: str) -> int:
    opts = flt["options"]
    assert isinstance(opts, dict)
    for a in opts.get("actions", []):
        if a["kind"] == kind:
            return int(a["stats"]["packets"])
    raise AssertionError(f"no {kind} action in {flt}")


def flag(flt: dict[str, object], name: str) -> bool:
    opts = flt["options"]
    assert isinstance(opts, dict)
    return bool(opts.get(name))


def filter_flow(flt: dict[str, object]) -> tuple[str, int]:
    """(source address, source port) a flower filter matches."""
    opts = flt["options"]
    assert isinstance(opts, dict)
    keys = opts["keys"]
    return str(keys["src_ip"]), int(keys["src_port"])


def wait_for(cond: object, what: str, timeout: float = 30.0) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


# ---- one connection: block, replace by redirect, withdraw ----------------------------


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_flower_block_redirect_rewrite_withdraw_on_real_tcp(lab: BridgeLab, steer: Steer,
                                                            family: str) -> None:
    v6 = family == "ipv6"
    af = socket.AF_INET6 if v6 else socket.AF_INET
    c_ip, h_ip, t_ip = (lab.addr(r, v6) for r in ("c", "h", "t"))
    c_port, h_port, t_port = 41000, 80, 18080
    k = FlowKey.tcp(c_ip, c_port, h_ip, h_port)           # client -> host (ingress, host)
    back = FlowKey.tcp(t_ip, t_port, c_ip, c_port)        # target -> client (egress, target)

    host = flower_manager(steer, lab, "h", {Kind.BLOCK, Kind.REDIRECT})
    target = flower_manager(steer, lab, "t", {Kind.SRC_REWRITE})
    with host, target:
        with in_netns(lab.ns["t"]):
            listener = socket.socket(af, socket.SOCK_STREAM)
            listener.bind((t_ip, t_port))
            listener.listen(1)
        with in_netns(lab.ns["c"]):
            client = socket.socket(af, socket.SOCK_STREAM)
            client.bind((c_ip, c_port))
        with listener, client:
            # Step 1: block the flow at the host; step 4: the target's rewrite.
            host.insert(k, Rule.block(ttl_s=60))
            target.insert(back, Rule.src_rewrite(h_ip, h_port))
            host.drain()
            target.drain()
            assert host.stats()["hw_entries"] == 1, host.last_hw_error
            assert target.stats()["hw_entries"] == 1, target.last_hw_error
            [blk] = lab.filters("h", "ingress")
            assert action_kinds(blk) == ["gact"]
            [rw] = lab.filters("t", "egress")
            assert action_kinds(rw) == ["pedit", "csum"]
            for flt in (blk, rw):  # software only, as asked, on both sides
                assert flag(flt, "skip_hw") and not flag(flt, "skip_sw")

            client.setblocking(False)
            assert client.connect_ex((h_ip, h_port)) == errno.EINPROGRESS
            wait_for(lambda: action_packets(lab.filters("h", "ingress")[0], "gact") >= 1,
                     "the block filter to drop the SYN")
            listener.setblocking(False)
            assert select.select([listener], [], [], 0.3)[0] == []  # nothing got through

            # Step 5: replace the block by the redirect, in place.
            host.insert(k, Rule.redirect(t_ip, t_port, dst_mac=lab.mac("t"),
                                         src_mac=lab.mac("h"), ttl_s=60))
            host.drain()
            assert host.stats()["hw_errors"] == 0, host.last_hw_error
            [red] = lab.filters("h", "ingress")
            assert red["options"]["handle"] == blk["options"]["handle"]  # type: ignore[index]
            assert action_kinds(red) == ["pedit", "csum", "mirred"]

            # The SYN's retransmission now reaches the target, rewritten.
            assert select.select([listener], [], [], 10)[0], "no connection at the target"
            conn, peer = listener.accept()
            with conn:
                assert peer[:2] == (c_ip, c_port)
                assert conn.getsockname()[:2] == (t_ip, t_port)
                _, w, _ = select.select([], [client], [], 10)
                assert w and client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                # ...and the client believes it talks to the host.
                assert client.getpeername()[:2] == (h_ip, h_port)
                client.setblocking(True)
                conn.setblocking(True)
                client.settimeout(10)
                conn.settimeout(10)
                client.sendall(b"request")
                assert conn.recv(100) == b"request"
                conn.sendall(b"response" * 100)
                got = b""
                while len(got) < 800:
                    got += client.recv(4096)
                assert got == b"response" * 100

                red_now = lab.filters("h", "ingress")[0]
                assert action_packets(red_now, "mirred") >= 3  # SYN, ACK, data
                assert action_packets(lab.filters("t", "egress")[0], "pedit") >= 2

                # Step 10: withdraw. The host has no socket on port 80, so
                # the client's next segment meets a reset from the host.
                host.remove(k)
                assert lab.filters("h", "ingress") == []
                assert steer.lookup(k) is None
                client.sendall(b"after")
                with pytest.raises(ConnectionResetError):
                    for _ in range(50):
                        if not client.recv(100):
                            break
                conn.settimeout(0.5)
                with pytest.raises(TimeoutError):
                    conn.recv(100)  # never redirected again
            target.remove(back)
            assert lab.filters("t", "egress") == []
        st = host.stats()
        assert (st["hw_inserted"], st["hw_removed"], st["hw_errors"]) == (2, 1, 0)
    for role in ("h", "t"):
        for direction in ("ingress", "egress"):
            assert lab.filters(role, direction) == []


# ---- modes on an interface that offloads nothing ----------------------------------


def test_flower_modes_on_a_veth(lab: BridgeLab, steer: Steer) -> None:
    """skip_sw (hardware only) is refused with advice and leaves the port as
    it was; auto falls back to plain filters the kernel runs in software."""
    dev = lab.dev["h"]
    with pytest.raises(XoUnsupportedError) as err:
        RuleManager(steer, lab.ifindex("h"), "flower", flower_mode="skip_sw",
                    netns=lab.netns("h"))
    assert err.value.code == lib.XO_E_UNSUPPORTED
    assert "does not offload" in str(err.value) and "hw-tc-offload" in str(err.value)
    assert "clsact" not in lab.tc("h", "qdisc", "show", "dev", dev)

    k = FlowKey.tcp(lab.v4("c"), 41001, lab.v4("h"), 80)
    back = FlowKey.tcp(lab.v4("h"), 80, lab.v4("c"), 41001)
    with RuleManager(steer, lab.ifindex("h"), "flower", flower_mode="auto",
                     netns=lab.netns("h"), hw_kinds=set(HW_KINDS)) as rules:
        rules.insert(k, Rule.redirect(lab.v4("t"), 18080, dst_mac=lab.mac("t"), ttl_s=60))
        rules.insert(back, Rule.src_rewrite(lab.v4("t"), 18080))
        rules.drain()
        assert rules.stats()["hw_entries"] == 2, rules.last_hw_error
        for flt in lab.filters("h", "ingress") + lab.filters("h", "egress"):
            assert not flag(flt, "skip_hw") and not flag(flt, "skip_sw")
            assert flag(flt, "not_in_hw")  # the veth took nothing
        # The same flow's action moves from ingress to egress: a new egress
        # filter, and the ingress one goes.
        rules.insert(k, Rule.src_rewrite(lab.v4("t"), 18081))
        rules.drain()
        assert rules.stats()["hw_errors"] == 0, rules.last_hw_error
        assert lab.filters("h", "ingress") == []
        assert sorted(filter_flow(f) for f in lab.filters("h", "egress")) == [
            (lab.v4("c"), 41001), (lab.v4("h"), 80)]
    assert lab.filters("h", "ingress") == [] and lab.filters("h", "egress") == []


# ---- the cancellable queue against real flower ---------------------------------------


def test_flower_queue_concurrent_inserts_and_removes_leave_nothing(lab: BridgeLab,
                                                                    steer: Steer) -> None:
    """Producers race on the queue (coalescing, cancelling queued inserts,
    removing installed and in-flight ones) while the consumer talks to the
    real kernel; at every quiet point hardware matches the manager's
    bookkeeping, and at the end nothing is left."""
    rules = flower_manager(steer, lab, "h", {Kind.BLOCK, Kind.REDIRECT, Kind.SRC_REWRITE},
                           queue_capacity=32)
    errors: list[BaseException] = []
    nthreads, nflows = 4, 60

    def flow(t: int, i: int) -> FlowKey:
        if i % 5 == 4:
            return FlowKey.tcp(f"2001:2:0:210::{100 + t}", 30000 + i, lab.v6("h"), 80)
        return FlowKey.tcp(f"198.18.211.{100 + t}", 30000 + i, lab.v4("h"), 80)

    def rule(i: int, second: bool) -> Rule:
        if i % 7 == 3:
            return Rule.src_rewrite(lab.v4("h") if i % 5 != 4 else lab.v6("h"), 80, ttl_s=60)
        if second or i % 4 == 1:
            dst = lab.v4("t") if i % 5 != 4 else lab.v6("t")
            return Rule.redirect(dst, 18080 + i, dst_mac=lab.mac("t"), src_mac=lab.mac("h"),
                                 ttl_s=60)
        return Rule.block(ttl_s=60)

    def worker(t: int) -> None:
        try:
            for i in range(nflows):
                k = flow(t, i)
                rules.insert(k, rule(i, False))
                if i % 2:
                    rules.insert(k, rule(i, True))  # coalesces or replaces
                if i % 3 == 0:
                    rules.remove(k)
        except BaseException as exc:  # reported below, in the main thread
            errors.append(exc)

    with rules:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        rules.drain(30_000)
        st = rules.stats()
        assert st["hw_errors"] == 0, rules.last_hw_error
        # The consumer (~0.1 ms per netlink request here) lags the producers,
        # so removes meet queued inserts (cancelled: the kernel never saw
        # them) and repeated inserts meet queued ones (coalesced).
        assert st["hw_cancelled"] > 0 and st["hw_coalesced"] > 0, st
        kept = [flow(t, i) for t in range(nthreads) for i in range(nflows) if i % 3]
        assert steer.count() == len(kept)
        in_kernel = lab.filters("h", "ingress") + lab.filters("h", "egress")
        installed = [k for k in kept if rules.hw_state(k) == {"installed"}]
        assert installed and len(in_kernel) == len(installed) == st["hw_entries"]
        # Exactly the flows the manager believes installed, nothing removed.
        assert sorted(filter_flow(f) for f in in_kernel) == sorted(
            (str(k.src), k.src_port) for k in installed)
        for k in kept:
            rules.remove(k)
        st = rules.stats()
        assert st["hw_entries"] == 0 and st["queue_len"] == 0 and st["hw_errors"] == 0
        assert steer.count() == 0
        assert st["sw_inserts"] == nthreads * (nflows + nflows // 2)
    for direction in ("ingress", "egress"):
        assert lab.tc("h", "filter", "show", "dev", lab.dev["h"], direction).strip() == ""


# ---- crash: a killed manager's filters, and its successor -------------------------------

CHILD = r"""
import json, sys, time
from xo.core import XoUnsupportedError
from xo.steer import HW_KINDS, FlowKey, Kind, Rule, RuleManager, Steer
cfg = json.loads(sys.argv[1])
steer = Steer(pin=False)
rules = RuleManager(steer, cfg["ifindex"], "flower", flower_mode="skip_hw",
                    netns=cfg["netns"], hw_kinds=set(HW_KINDS))
for n, (src, dst) in enumerate(cfg["flows"]):
    k = FlowKey.tcp(src, 40000 + n, dst, 80)
    if n % 3 == 0:
        rules.insert(k, Rule.block(ttl_s=600))
    elif n % 3 == 1:
        rules.insert(k, Rule.redirect(cfg["target"][":" in dst], 18080,
                                      dst_mac=cfg["mac"], ttl_s=600))
    else:
        rules.insert(k, Rule.src_rewrite(dst, 80))
rules.drain(30000)
st = rules.stats()
print(json.dumps({"hw_entries": st["hw_entries"], "error": rules.last_hw_error}), flush=True)
time.sleep(600)
"""


def test_flower_successor_of_a_killed_manager_starts_clean(lab: BridgeLab,
                                                           steer: Steer) -> None:
    flows = [(f"198.18.212.{n}", lab.v4("h")) if n % 2 else (f"2001:2:0:212::{n}", lab.v6("h"))
             for n in range(1, 9)]
    cfg = {"ifindex": lab.ifindex("h"), "netns": lab.netns("h"), "flows": flows,
           "target": [lab.v4("t"), lab.v6("t")], "mac": lab.mac("t")}
    # Someone else's flower filter on the same port, at another priority.
    dev = lab.dev["h"]
    lab.tc("h", "qdisc", "add", "dev", dev, "clsact")
    lab.tc("h", "filter", "add", "dev", dev, "ingress", "protocol", "ip", "prio", "7",
           "flower", "skip_hw", "ip_proto", "tcp", "dst_port", "9", "action", "drop")
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, child.stderr.read() if child.stderr else "child died"
        report = json.loads(line)
        assert report["hw_entries"] == len(flows), report["error"]
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL

    def ours(direction: str) -> list[dict[str, object]]:
        return [f for f in lab.filters("h", direction) if f["pref"] in (PRIO, PRIO + 1)]

    # What SIGKILL leaves: every filter of the dead manager, on both sides.
    left = ours("ingress") + ours("egress")
    assert len(left) == len(flows)
    assert {f["pref"] for f in left} == {PRIO, PRIO + 1}

    with flower_manager(steer, lab, "h", set(HW_KINDS)) as successor:
        # Started clean: the predecessor's filters are gone, the foreign one stays.
        assert ours("ingress") == [] and ours("egress") == []
        [foreign] = lab.filters("h", "ingress")
        assert foreign["pref"] == 7
        # The same flows again: handles restart without colliding.
        for n, (src, dst) in enumerate(flows):
            successor.insert(FlowKey.tcp(src, 40000 + n, dst, 80),
                             Rule.redirect(lab.v6("t") if ":" in dst else lab.v4("t"), 18080,
                                           dst_mac=lab.mac("t"), ttl_s=60))
        successor.drain(30_000)
        st = successor.stats()
        assert st["hw_errors"] == 0, successor.last_hw_error
        assert st["hw_entries"] == len(flows)
        handles = sorted(int(str(f["options"]["handle"]), 0)  # type: ignore[index]
                         for f in ours("ingress"))
        assert handles == list(range(1, len(flows) + 1))
    # Closing removes its own filters, never the foreign one.
    assert ours("ingress") == [] and ours("egress") == []
    assert [f["pref"] for f in lab.filters("h", "ingress")] == [7]


# ---- xo bench rules: the flower rows ------------------------------------------------


def test_bench_rules_measures_flower_through_the_core_and_tc() -> None:
    """`xo bench rules` on a kernel with flower: both flower rows are real
    measurements (every pair installed and deleted a filter, or it raised),
    and its namespace is gone afterwards."""
    from xo import bench_rules

    result = bench_rules.run(200, quiet=True, flower_count=50, tc_count=3)
    flower = result["flower"]
    assert flower["available"], flower
    assert (flower["count"], flower["tc_count"]) == (50, 3)
    for side in ("core", "tc"):
        for op in ("insert", "remove"):
            assert flower[side][op]["p50_us"] > 0
    assert "tc-flower skip_hw, core rtnetlink" in bench_rules.format_table(result)
    assert not netns_exists(flower["netns"])  # its own namespace, gone
