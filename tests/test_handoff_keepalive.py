"""One curl keep-alive connection through many handoffs, for each address
family and each host ingress path (tc, XDP) and, on tc, each mix of the two
drivers: the reference app (xo.refapp / xo-driver) in a real lab, real curl.

Every response is served by a target directly (DSR), byte-exact; the
connection goes host -> t0 -> host -> t1 ...; every handoff out comes back;
the client sees no reset and the targets no bad checksum; afterwards no
rule, offloaded connection or socket towards the client is left anywhere.
With XDP ingress the host's interface carries the XDP program in native
mode and no tc ingress program, its bridge port the pass-through program
XDP_TX on a veth needs (xo.lab.prepare_xdp_tx), and the XDP program's own
counters show it did the redirecting.

The connection ends with ``GET /_xo/stats``, which the host serves itself:
by then the connection has been handed back, so the client's close happens
on the host.
"""

from __future__ import annotations

import json
import os
import socket
from collections import Counter
from pathlib import Path

import pytest
from handoff_tools import (
    DRIVER_MIXES,
    assert_nothing_left,
    client_tag,
    curl_many,
    docroot_digests,
    lab_name,
    member_steer,
    rst_counters,
    served_lines,
    steering_entries,
)
from netns_tools import FAMILIES, sha256, snmp_tcp
from pyroute2 import IPRoute
from xo.demo import RefAppCluster, cluster, iface_tx_bytes
from xo.lab import Lab, in_netns
from xo.refapp import HTTP_PORT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

FILES = ["small.bin", "medium.bin", "large.bin"]
REQUESTS = 60  # 20 of each size
XDP_NATIVE = "xdp"  # IFLA_XDP_ATTACHED as pyroute2 names it (generic: "xdpgeneric")

# (family, host ingress, driver mix): the C driver runs tc ingress only.
CASES = [(family, "tc", drivers) for family in FAMILIES for drivers in DRIVER_MIXES]
CASES += [(family, "xdp", "py") for family in FAMILIES]


def host_dp_stats(apps: RefAppCluster) -> dict[str, int]:
    """The datapath counters (xo_stats) of the host's pinned steering object."""
    with member_steer(apps.testbed, "host") as steer:
        return steer.dp_stats()


def link_programs(ns: str, ifindex: int) -> tuple[int, str]:
    """(XDP program id, XDP attach mode) of one interface."""
    with in_netns(ns):
        ipr = IPRoute()
    try:
        xdp = ipr.link("get", index=ifindex)[0].get_attr("IFLA_XDP")
    finally:
        ipr.close()
    if xdp is None:
        return 0, "none"
    return xdp.get_attr("IFLA_XDP_PROG_ID") or 0, str(xdp.get_attr("IFLA_XDP_ATTACHED"))


def tc_filters(testbed: Lab, direction: str) -> str:
    """tc's listing of the host interface's filters in one direction."""
    out = testbed.run("host", ["tc", "filter", "show", "dev", testbed.host.ifname, direction],
                      capture_output=True, text=True, check=True)
    return out.stdout.strip()


def csum_errors(testbed: Lab, member: str) -> int:
    tcp = snmp_tcp(testbed.member(member).netns)
    return tcp["InCsumErrors"] + tcp["InErrs"]


def assert_xdp_attached(testbed: Lab) -> None:
    """XDP in native mode on the host's interface, no tc ingress program (tc
    egress stays: it blocks what a frozen socket still sends), and the
    pass-through program on its bridge port."""
    host = testbed.host
    prog_id, mode = link_programs(host.netns, host.ifindex)
    assert prog_id, "no XDP program on the host's interface"
    assert mode == XDP_NATIVE, f"XDP attach mode {mode}, expected native"
    assert tc_filters(testbed, "ingress") == "", "a tc ingress program is attached"
    assert "xo_tc_egress" in tc_filters(testbed, "egress")
    port_prog, _ = link_programs(testbed.bridge_netns, host.port_ifindex)
    assert port_prog and port_prog != prog_id


@pytest.mark.parametrize(("family_name", "ingress", "drivers"), CASES,
                         ids=[f"{f}-{i}-{d}" for f, i, d in CASES])
def test_keepalive_connection_moves_between_targets(tmp_path: Path, family_name: str,
                                                    ingress: str, drivers: str) -> None:
    family = FAMILIES[family_name]
    with cluster(targets=2, name=lab_name("k"), ingress=ingress,
                 drivers=DRIVER_MIXES[drivers]) as apps:
        testbed = apps.testbed
        if ingress == "xdp":
            assert_xdp_attached(testbed)
        digests = docroot_digests(apps)
        names = [FILES[i % len(FILES)] for i in range(REQUESTS)]
        host_ip = testbed.host.address(family)
        url = f"http://[{host_ip}]:{HTTP_PORT}" if family == socket.AF_INET6 else apps.url
        dp_before = host_dp_stats(apps)
        rst_before = rst_counters(testbed)
        bad_before = {t: csum_errors(testbed, t) for t in ("t0", "t1")}
        tx_before = iface_tx_bytes(testbed, "host")
        rows = curl_many(testbed, url, [f"/{n}" for n in names] + ["/_xo/stats"],
                         tmp_path / "out", curl_args=("-g",))
        tx_after = iface_tx_bytes(testbed, "host")

        # One connection of the family for everything.
        assert [r["connects"] for r in rows] == ["1"] + ["0"] * REQUESTS
        assert len({r["local_port"] for r in rows}) == 1
        assert {(r["local_ip"], r["remote_ip"]) for r in rows} == {
            (testbed.client.address(family), host_ip)}, rows[0]

        total = 0
        served_by: Counter[str] = Counter()
        for i, (name, row) in enumerate(zip(names, rows, strict=False)):
            body = Path(row["file"]).read_bytes()
            assert row["status"] == "200", f"request {i} ({name}): {row}"
            assert sha256(body) == digests[name], f"request {i} ({name}): body differs"
            total += len(body)
            served_by[row["served_by"]] += 1
        assert set(served_by) == {"t0", "t1"}, served_by
        assert min(served_by.values()) >= REQUESTS // 4, served_by

        # The stats request came last, on the same connection, after the last
        # hand-back: every handoff out came back.
        stats = json.loads(Path(rows[-1]["file"]).read_bytes())
        assert rows[-1]["served_by"] == "host"
        assert stats["offloads"] == stats["returns"] == REQUESTS, stats
        assert stats["rollbacks"] == stats["withdrawn"] == stats["served_locally"] == 0, stats
        assert stats["requests"] == REQUESTS + 1, stats

        # DSR: the host interface sent a tiny fraction of the response bytes.
        relayed = tx_after - tx_before
        assert relayed < 0.05 * total, f"host sent {relayed} B for {total} B of responses"
        assert rst_counters(testbed) == rst_before, "the client saw resets"
        for target in ("t0", "t1"):
            assert csum_errors(testbed, target) == bad_before[target], \
                f"{target} dropped segments with bad checksums"
            # The targets served this client (restored on their own address
            # of the family).
            lines = served_lines(apps, target)
            assert len(lines) == served_by[target], (target, len(lines), served_by)
            tag = client_tag(testbed.client.address(family))
            assert all(tag in line for line in lines), lines[:2]

        dp_after = host_dp_stats(apps)
        assert dp_after["errors"] == dp_before["errors"], (dp_before, dp_after)
        assert dp_after["redirected"] - dp_before["redirected"] >= REQUESTS
        if ingress == "xdp":  # the XDP program did it: tc ingress has nothing
            assert tc_filters(testbed, "ingress") == ""

        assert_nothing_left(apps, ["t0", "t1"])
        assert steering_entries(testbed, "host") == 0
        assert rst_counters(testbed) == rst_before, "resets while closing"
