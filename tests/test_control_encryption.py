"""The control channel carries no readable secret: tcpdump on the host's lab
interface during real handoffs (both drivers), the TCP streams reassembled,
the control connections' messages parsed from their clear headers.

What must hold: the request bytes (a random marker per request, in a header)
travel in clear on the client's HTTP connection — proof the capture sees
them — but appear in no control stream; neither does the cluster key or the
state codec's magic; yet every handoff's BEGIN_OFFLOAD and TARGET_DONE is
in the capture. Only HELLO's payload (a public nonce) is readable."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest
from handoff_tools import DRIVER_MIXES, NetnsHTTPConnection, docroot_digests, lab_name
from netns_tools import sha256, wait_for
from pcap_tools import control_frames, tcp_streams
from xo.core import MsgType
from xo.demo import cluster
from xo.proto import DEFAULT_CONTROL_PORT
from xo.refapp import HTTP_PORT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

REQUESTS = 8


def ends(pcap: Path) -> int:
    """END_OFFLOAD messages in what tcpdump wrote so far."""
    streams = tcp_streams(pcap, DEFAULT_CONTROL_PORT)
    return sum(f.type == MsgType.END_OFFLOAD for flow, data in streams.items()
               if DEFAULT_CONTROL_PORT in (flow[1], flow[3]) for f in control_frames(data))


@pytest.mark.parametrize("drivers", ["py", "c"])
def test_capture_of_control_traffic_shows_no_request_and_no_key(tmp_path: Path,
                                                                drivers: str) -> None:
    pcap = tmp_path / "host.pcap"
    markers = [secrets.token_hex(16) for _ in range(REQUESTS)]
    with cluster(targets=2, name=lab_name("enc"), drivers=DRIVER_MIXES[drivers]) as apps:
        host = apps.testbed.host
        key = apps.key_path.read_bytes()
        digests = docroot_digests(apps)
        before = apps.host_stats()
        dump = apps.testbed.popen("host", [
            "tcpdump", "-i", host.ifname, "-s", "0", "-B", "65536", "-U", "--immediate-mode", "-n",
            "-w", str(pcap),
            f"tcp port {DEFAULT_CONTROL_PORT} or tcp port {HTTP_PORT}",
        ], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            assert dump.stderr is not None
            line = dump.stderr.readline()  # "listening on ..." once it captures
            assert "listening on" in line, line
            conn = NetnsHTTPConnection(apps.testbed)
            for marker in markers:
                conn.request("GET", "/small.bin", headers={"X-Secret": marker})
                resp = conn.getresponse()
                body = resp.read()
                assert resp.status == 200 and sha256(body) == digests["small.bin"]
                assert resp.getheader("X-Served-By", "").startswith("t")
            conn.request("GET", "/_xo/stats")
            conn.getresponse().read()
            conn.close()
            wait_for(lambda: apps.host_stats()["returns"] >= before["returns"] + REQUESTS,
                     "every connection handed back")
            wait_for(lambda: ends(pcap) >= REQUESTS, "tcpdump to write every END_OFFLOAD")
        finally:
            dump.stop()
        after = apps.host_stats()

    assert after["offloads"] - before["offloads"] >= REQUESTS
    streams = tcp_streams(pcap, DEFAULT_CONTROL_PORT)
    http = [data for (_s, sport, _d, dport), data in streams.items()
            if HTTP_PORT in (sport, dport)]
    control = {flow: data for flow, data in streams.items()
               if DEFAULT_CONTROL_PORT in (flow[1], flow[3])}
    # The capture sees the requests: every marker is on the client's connection.
    assert all(any(m.encode() in data for data in http) for m in markers)
    assert control, "no control traffic captured"
    types: dict[int, int] = {}
    for data in control.values():
        for marker in markers:
            assert marker.encode() not in data
        assert key not in data and key[:16] not in data
        assert b"XOST" not in data  # the state codec's magic: states are encrypted
        assert b"GET /small.bin" not in data and b"X-Secret" not in data
        for frame in control_frames(data):
            types[frame.type] = types.get(frame.type, 0) + 1
            if frame.type != MsgType.HELLO:
                assert b"X-Secret" not in frame.payload
    # Every handoff went over the captured control connections.
    assert types.get(MsgType.BEGIN_OFFLOAD, 0) >= REQUESTS, types
    assert types.get(MsgType.TARGET_DONE, 0) >= REQUESTS, types
    assert types.get(MsgType.HOST_READY, 0) >= REQUESTS, types
    print(f"{drivers}: {sum(len(d) for d in control.values())} control bytes captured, "
          f"messages by type {dict(sorted(types.items()))}")
