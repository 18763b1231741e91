"""The handoff with the host's redirect path in XDP instead of tc.

The reference app's host runs with ``--ingress xdp``: its interface carries
the XDP program (native mode on the veth), no tc program at all, and blocks
and redirects client packets with XDP_DROP / XDP_TX. The lab prepares the
host's bridge port the way XDP_TX on a veth needs (xo.lab.prepare_xdp_tx:
a pass-through XDP program there, complete checksums towards the host).

What is checked is what a client and an operator can observe, as in
test_handoff_e2e.py, plus the datapath's own counters: the XDP program did
the redirecting, and the targets saw valid TCP segments (no checksum errors).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
from handoff_tools import (
    curl_many,
    docroot_digests,
    lab_name,
    member_steer,
    rst_counters,
    steering_entries,
)
from netns_tools import sha256, snmp_tcp, wait_for
from pyroute2 import IPRoute
from xo.demo import RefAppCluster, cluster
from xo.lab import Lab, in_netns
from xo.refapp import HTTP_PORT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

FILES = ["small.bin", "medium.bin", "large.bin"]
XDP_NATIVE = "xdp"  # IFLA_XDP_ATTACHED as pyroute2 names it (generic: "xdpgeneric")


def host_dp_stats(apps: RefAppCluster) -> dict[str, int]:
    """The datapath counters (xo_stats) of the host's pinned steering object."""
    with member_steer(apps.testbed, "host") as steer:
        return steer.dp_stats()


def link_programs(ns: str, ifindex: int) -> tuple[int, str, list[str]]:
    """(XDP program id, XDP attach mode, qdisc kinds) of one interface."""
    with in_netns(ns):
        ipr = IPRoute()
    try:
        link = ipr.link("get", index=ifindex)[0]
        xdp = link.get_attr("IFLA_XDP")
        prog_id = (xdp.get_attr("IFLA_XDP_PROG_ID") or 0) if xdp is not None else 0
        mode = str(xdp.get_attr("IFLA_XDP_ATTACHED")) if xdp is not None else "none"
        qdiscs = [q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(index=ifindex)]
    finally:
        ipr.close()
    return prog_id, mode, qdiscs


def tc_filters(testbed: Lab, direction: str) -> str:
    """tc's listing of the host interface's filters in one direction."""
    out = testbed.run("host", ["tc", "filter", "show", "dev", testbed.host.ifname, direction],
                      capture_output=True, text=True, check=True)
    return out.stdout.strip()


def csum_errors(testbed: Lab, member: str) -> int:
    tcp = snmp_tcp(testbed.member(member).netns)
    return tcp["InCsumErrors"] + tcp["InErrs"]


def check_run(apps: RefAppCluster, rows: list[dict[str, str]], names: list[str],
              digests: dict[str, str]) -> Counter[str]:
    """One keep-alive connection, byte-exact bodies, all served by targets."""
    assert [r["connects"] for r in rows] == ["1"] + ["0"] * (len(rows) - 1)
    assert len({r["local_port"] for r in rows}) == 1
    served_by: Counter[str] = Counter()
    for i, (name, row) in enumerate(zip(names, rows, strict=False)):
        assert row["status"] == "200", f"request {i} ({name}): {row}"
        assert sha256(Path(row["file"]).read_bytes()) == digests[name], \
            f"request {i} ({name}): body differs"
        served_by[row["served_by"]] += 1
    assert rows[-1]["served_by"] == "host"  # the closing GET /_xo/stats
    return served_by


def test_keepalive_connection_through_xdp_redirect(tmp_path: Path) -> None:
    """30 requests on ONE curl keep-alive connection, the host steering in
    XDP: every response comes from a target, every handoff comes back, the
    client sees no reset, the targets no bad checksum, the host's map is
    empty afterwards, and the XDP program (not tc) did the redirecting."""
    requests = 30
    with cluster(targets=2, name=lab_name("x"), ingress="xdp") as apps:
        testbed = apps.testbed
        host = testbed.host
        digests = docroot_digests(apps)

        # The host's interface: XDP in native mode and no tc ingress program
        # (tc egress stays: it blocks what a frozen socket still sends).
        prog_id, mode, _ = link_programs(host.netns, host.ifindex)
        assert prog_id, "no XDP program on the host's interface"
        assert mode == XDP_NATIVE, f"XDP attach mode {mode}, expected native"
        assert tc_filters(testbed, "ingress") == "", "a tc ingress program is attached"
        assert "xo_tc_egress" in tc_filters(testbed, "egress")
        # Its bridge port: the pass-through program XDP_TX on a veth needs.
        port_prog, _, _ = link_programs(testbed.bridge_netns, host.port_ifindex)
        assert port_prog and port_prog != prog_id

        dp_before = host_dp_stats(apps)
        rst_before = rst_counters(testbed)
        bad_before = {t: csum_errors(testbed, t) for t in ("t0", "t1")}

        names = [FILES[i % len(FILES)] for i in range(requests)]
        rows = curl_many(testbed, apps.url, [f"/{n}" for n in names] + ["/_xo/stats"],
                         tmp_path / "v4")
        served_by = check_run(apps, rows, names, digests)
        assert set(served_by) == {"t0", "t1"}, served_by

        stats = json.loads(Path(rows[-1]["file"]).read_bytes())
        assert stats["offloads"] == requests, stats
        assert stats["returns"] == requests, stats
        assert stats["rollbacks"] == 0, stats
        assert stats["withdrawn"] == 0, stats
        assert stats["served_locally"] == 0, stats

        rst_after = rst_counters(testbed)
        assert rst_after == rst_before, f"client saw resets: {rst_before} -> {rst_after}"
        for target in ("t0", "t1"):
            assert csum_errors(testbed, target) == bad_before[target], \
                f"{target} dropped segments with bad checksums"

        # The XDP program redirected the client's packets; tc never got any.
        dp_after = host_dp_stats(apps)
        redirected = dp_after["redirected"] - dp_before["redirected"]
        assert redirected >= requests, (dp_before, dp_after)
        assert dp_after["errors"] == dp_before["errors"], (dp_before, dp_after)
        assert tc_filters(testbed, "ingress") == ""

        wait_for(lambda: apps.host_stats()["rules"] == 0, "host steering map to empty", 5)
        assert steering_entries(testbed, "host") == 0
        for target in ("t0", "t1"):
            wait_for(lambda t=target: steering_entries(testbed, t) == 0,  # type: ignore[misc]
                     f"{target} steering map to empty", 5)


def test_ipv6_keepalive_connection_through_xdp_redirect(tmp_path: Path) -> None:
    """The same over IPv6: the XDP program's IPv6 rewrite (no header
    checksum, the address folded into the TCP checksum) must give the
    targets valid segments too."""
    requests = 12
    with cluster(targets=2, name=lab_name("y"), ingress="xdp") as apps:
        testbed = apps.testbed
        digests = docroot_digests(apps)
        dp_before = host_dp_stats(apps)
        rst_before = rst_counters(testbed)
        bad_before = {t: csum_errors(testbed, t) for t in ("t0", "t1")}

        url = f"http://[{testbed.host.ipv6}]:{HTTP_PORT}"
        names = [FILES[i % 2] for i in range(requests)]  # small / medium
        rows = curl_many(testbed, url, [f"/{n}" for n in names] + ["/_xo/stats"],
                         tmp_path / "v6")
        served_by = check_run(apps, rows, names, digests)
        assert set(served_by) == {"t0", "t1"}, served_by
        stats = json.loads(Path(rows[-1]["file"]).read_bytes())
        assert stats["offloads"] == stats["returns"] == requests, stats
        assert stats["rollbacks"] == 0, stats

        assert rst_counters(testbed) == rst_before
        for target in ("t0", "t1"):
            assert csum_errors(testbed, target) == bad_before[target], target
        dp_after = host_dp_stats(apps)
        assert dp_after["redirected"] - dp_before["redirected"] >= requests
        assert dp_after["errors"] == dp_before["errors"]
        wait_for(lambda: apps.host_stats()["rules"] == 0, "host steering map to empty", 5)
