"""The reference host's other modes: the proxy baseline the benchmarks compare
XO against, and serving locally. Both must be correct, or the comparison
means nothing. And what it answers to malformed requests."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from handoff_faults_tools import client_connect, file_digest, read_response
from handoff_tools import curl_many, docroot_digests, lab_name
from netns_tools import sha256
from xo import http1
from xo.demo import cluster, iface_tx_bytes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
PATHS = ["/small.bin", "/large.bin", "/medium.bin"] * 4


@pytest.mark.parametrize("mode", ["proxy", "local"])
def test_host_modes_serve_every_byte(mode: str, tmp_path: Path) -> None:
    with cluster(targets=2, name=lab_name(mode[0]), mode=mode) as apps:
        digests = docroot_digests(apps)
        tx_before = iface_tx_bytes(apps.testbed, "host")
        rows = curl_many(apps.testbed, apps.url, PATHS, tmp_path / "out")
        tx = iface_tx_bytes(apps.testbed, "host") - tx_before
        body_bytes = 0
        for path, row in zip(PATHS, rows, strict=True):
            body = Path(row["file"]).read_bytes()
            assert row["status"] == "200" and sha256(body) == digests[path[1:]], row
            body_bytes += len(body)
        served_by = {row["served_by"] for row in rows}
        stats = apps.host_stats()
        assert stats["offloads"] == 0
        if mode == "proxy":
            assert served_by == {"t0", "t1"}  # relayed from both targets
            assert stats["proxied"] == len(PATHS)
        else:
            assert served_by == {"host"}
            assert stats["served_locally"] == len(PATHS)
        # Every response byte crossed the host's link: the cost XO removes.
        assert tx >= body_bytes


def test_offload_min_bytes_proxies_small_files_and_hands_off_the_rest(tmp_path: Path) -> None:
    """offload_min_bytes 64 KiB: on one keep-alive connection the 4 KiB file is
    relayed from a target (not handed off), the 256 KiB and 4 MiB files are
    handed off; the host's counters say which was which, every byte checked.
    On rate-limited links: the handoffs' control messages went through the
    shapers' control class (docs/lab.md)."""
    with cluster(targets=2, name=lab_name("m"), rate="200mbit",
                 offload_min_bytes=64 * 1024) as apps:
        assert "offload_min_bytes 65536" in (apps.workdir / "host.conf").read_text()
        digests = docroot_digests(apps)
        paths = ["/small.bin", "/medium.bin", "/small.bin", "/large.bin", "/small.bin"]
        host = apps.testbed.host
        control_before = _leaf_packets(host.netns, host.ifname, "10:")
        rows = curl_many(apps.testbed, apps.url, paths, tmp_path / "out")
        for path, row in zip(paths, rows, strict=True):
            assert row["status"] == "200", row
            assert sha256(Path(row["file"]).read_bytes()) == digests[path[1:]], row
            assert row["served_by"] in ("t0", "t1"), row
        assert sum(int(row["connects"]) for row in rows) == 1  # one keep-alive connection
        stats = apps.host_stats(settled=True)
        assert stats["below_offload_min"] == stats["proxied"] == 3, stats
        assert stats["offloads"] == 2 and stats["rollbacks"] == 0, stats
        assert stats["served_locally"] == 0, stats
        # BEGIN_OFFLOAD and HOST_READY per handoff (and the hand-backs' answers)
        # left the host as control traffic.
        assert _leaf_packets(host.netns, host.ifname, "10:") >= control_before + 4


def _leaf_packets(netns: str, ifname: str, handle: str) -> int:
    """Packets the lab shaper's leaf qdisc (10: control, 20: bulk) has sent."""
    out = subprocess.run(["tc", "-n", netns, "-s", "-j", "qdisc", "show", "dev", ifname],
                         capture_output=True, text=True, check=True)
    (leaf,) = [q for q in json.loads(out.stdout) if q["handle"] == handle]
    return int(leaf["packets"])


def test_c_driver_refuses_offload_min_bytes(tmp_path: Path) -> None:
    """The C driver has no proxy: it refuses the setting with a clear message
    instead of handing every request off."""
    from xo.demo import c_driver_binary

    conf = tmp_path / "host.conf"
    conf.write_text("role host\nname host\noffload_min_bytes 65536\n")
    res = subprocess.run([str(c_driver_binary()), str(conf)], capture_output=True, text=True,
                         timeout=10)
    assert res.returncode != 0
    assert f"{conf}:3: offload_min_bytes 65536" in res.stderr, res.stderr
    assert "cannot proxy" in res.stderr


BAD_REQUESTS = {
    "request line": (b"GET /small.bin\r\nHost: xo\r\n\r\n", "bad request line"),
    "header line": (b"GET /small.bin HTTP/1.1\r\nHost xo\r\n\r\n", "bad header line"),
    "content length": (b"PUT /up HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                       "bad Content-Length '-5'"),
    "chunked body": (b"PUT /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
                     "chunked request bodies are not supported"),
}


def test_bad_requests_get_a_clear_400_and_change_nothing() -> None:
    """Malformed requests (xo.http1's errors) are answered 400 with the reason
    and the connection is closed, before anything is handed off; a good
    request afterwards is handed off as usual."""
    with cluster(targets=1, name=lab_name("b")) as apps:
        before = apps.host_stats()
        for case, (request, reason) in BAD_REQUESTS.items():
            with client_connect(apps) as sock:
                sock.sendall(request)
                headers, body = read_response(sock)
                assert headers[":status"] == "400", case
                assert reason in body.decode(), (case, body)
                assert headers["connection"] == "close", case
                assert sock.recv(1) == b"", case  # closed after the answer
        stats = apps.host_stats()
        assert stats["offloads"] == before["offloads"] == 0
        assert stats["requests"] == before["requests"] + 1  # only the stats GET counted
        with client_connect(apps) as sock:
            sock.sendall(http1.get_request("/small.bin"))
            headers, body = read_response(sock)
        assert headers[":status"] == "200" and headers["x-served-by"] == "t0"
        assert sha256(body) == file_digest(apps, "small.bin")
