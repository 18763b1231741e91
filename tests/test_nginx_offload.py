"""Real nginx with the XO module as front and as targets, in a lab: curl and
http.client fetch through the front; target nginx serves the bodies
(checked by hash) and answers the client directly; the front's link does
not carry them; the client never retransmits nor sees a reset.

Each runs with both builds (ci/build-nginx.sh): the dynamic module loaded
into Debian's nginx, and nginx with the module compiled in (static)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns_tools import client_loss_counters, sha256, tcp_ext
from nginx_tools import (
    NginxBuild,
    NginxCluster,
    assert_curl_client_clean,
    build_params,
    nginx_cluster,
)
from pcap_tools import headers_capture, resends
from xo.lab import in_netns

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

SIZES = {"empty.bin": 0, "one.bin": 1, "8k.bin": 8 << 10, "1m.bin": 1 << 20,
         "64m.bin": 64 << 20}


@pytest.fixture(scope="module", params=build_params())
def cluster(request: pytest.FixtureRequest) -> Iterator[tuple[NginxCluster, dict[str, bytes]]]:
    with nginx_cluster(request.param) as c:
        bodies = {}
        for name, size in SIZES.items():
            bodies[name] = os.urandom(size)
            (c.docroot / name).write_bytes(bodies[name])
            (c.docroot / name).chmod(0o644)
        private = c.docroot / "private"
        private.mkdir(mode=0o755)
        (private / "secret.txt").write_text("no\n")
        (private / "secret.txt").chmod(0o644)
        c.start_all()
        yield c, bodies


def link_tx_bytes(c: NginxCluster, member: str) -> int:
    m = c.testbed.member(member)
    out = subprocess.run(["ip", "-n", m.netns, "-s", "-j", "link", "show", "dev", m.ifname],
                         capture_output=True, text=True, check=True).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])


def fetch(c: NginxCluster, path: str, out: Path, *args: str) -> tuple[int, str]:
    res = c.curl("-o", str(out), "-w", "%{http_code} %header{x-served-by}", *args,
                 c.url + path)
    assert res.returncode == 0, res.stderr
    code, _, served = res.stdout.partition(" ")
    return int(code), served


def test_bodies_by_hash_from_targets(cluster: tuple[NginxCluster, dict[str, bytes]],
                                     tmp_path: Path) -> None:
    c, bodies = cluster
    loss0 = client_loss_counters(c.testbed.client.netns)
    front0 = link_tx_bytes(c, "host")
    served = set()
    for name, body in bodies.items():
        out = tmp_path / name
        code, by = fetch(c, "/" + name, out)
        assert code == 200
        assert by in ("t0", "t1"), by
        served.add(by)
        assert sha256(out.read_bytes()) == sha256(body), name
    front_tx = link_tx_bytes(c, "host") - front0
    loss = client_loss_counters(c.testbed.client.netns)
    print("front tx bytes:", front_tx, "served by:", served)
    assert served == {"t0", "t1"}
    # 65 MiB went to the client; the front sent handshakes and control messages.
    assert front_tx < 2 << 20, front_tx
    assert_curl_client_clean({k: loss[k] - loss0[k] for k in loss})


def test_head_range_404_403(cluster: tuple[NginxCluster, dict[str, bytes]],
                            tmp_path: Path) -> None:
    c, bodies = cluster
    res = c.curl("-I", "-w", "%{http_code}", c.url + "/1m.bin")
    assert res.returncode == 0 and res.stdout.endswith("200"), res
    assert "Content-Length: 1048576" in res.stdout
    assert "X-Served-By: t" in res.stdout
    out = tmp_path / "range"
    code, by = fetch(c, "/1m.bin", out, "-r", "1000-299999")
    assert code == 206 and by.startswith("t")
    assert out.read_bytes() == bodies["1m.bin"][1000:300000]
    code, by = fetch(c, "/missing.bin", tmp_path / "404")
    assert (code, by[:1]) == (404, "t")
    code, by = fetch(c, "/private/secret.txt", tmp_path / "403")
    assert (code, by[:1]) == (403, "t")


def test_keepalive_alternates_targets(cluster: tuple[NginxCluster, dict[str, bytes]]) -> None:
    """One client connection, 100 requests: each is handed to a target and
    back to the front at the response boundary, round robin."""
    c, bodies = cluster
    loss0 = client_loss_counters(c.testbed.client.netns)
    served = []
    with in_netns(c.testbed.client.netns):
        conn = http.client.HTTPConnection(c.testbed.host.ipv4, 8080, timeout=20)
        for i in range(100):
            name = "8k.bin" if i % 2 else "1m.bin"
            conn.request("GET", "/" + name)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200
            assert sha256(body) == sha256(bodies[name]), i
            served.append(resp.getheader("X-Served-By"))
        conn.close()
    print("served by:", "".join(s[-1] for s in served))
    assert set(served) == {"t0", "t1"}
    # round robin: consecutive requests on the connection alternate
    changes = sum(1 for a, b in zip(served, served[1:], strict=False) if a != b)
    assert changes >= 90, served
    loss = client_loss_counters(c.testbed.client.netns)
    assert {k: loss[k] - loss0[k] for k in loss} == {k: 0 for k in loss}


@pytest.mark.parametrize("size", [1 << 20, 64 << 20])
def test_put_bodies_reach_target(cluster: tuple[NginxCluster, dict[str, bytes]],
                                 tmp_path: Path, size: int) -> None:
    """PUT with Expect: 100-continue (curl -T): the front hands the connection
    over with the head; the target sends 100 Continue and stores the body."""
    c, _ = cluster
    body = os.urandom(size)
    src = tmp_path / "up.bin"
    src.write_bytes(body)
    name = f"up-{size}.bin"
    res = c.curl("-T", str(src), "-w", "%{http_code} %header{x-served-by}",
                 c.url + f"/put/{name}")
    assert res.returncode == 0, res.stderr
    code, _, by = res.stdout.partition(" ")
    assert code in ("201", "204"), res.stdout
    stored = c.root / by / "put" / name
    assert sha256(stored.read_bytes()) == sha256(body)


@pytest.mark.parametrize("size", [1 << 20, 64 << 20], ids=["1MiB", "64MiB"])
@pytest.mark.parametrize("how", ["expect", "streamed", "chunked"])
def test_post_bodies_reach_target_app(cluster: tuple[NginxCluster, dict[str, bytes]],
                                      tmp_path: Path, size: int, how: str) -> None:
    """POST bodies through the front to an application behind target nginx
    (proxy_pass to tests/body_app.py), which answers with the SHA-256 of what
    it received: with Expect: 100-continue; streamed right behind the head
    (no Expect: body bytes arrive while the connection is handed over); and
    chunked (Transfer-Encoding: chunked, streamed)."""
    c, _ = cluster
    body = os.urandom(size)
    src = tmp_path / "body.bin"
    src.write_bytes(body)
    args = ["--data-binary", f"@{src}", "-H", "Content-Type: application/octet-stream"]
    args += {"expect": ["-H", "Expect: 100-continue"], "streamed": ["-H", "Expect:"],
             "chunked": ["-H", "Expect:", "-H", "Transfer-Encoding: chunked"]}[how]
    ns = c.testbed.client.netns
    loss0, dsack0 = client_loss_counters(ns), tcp_ext(ns)["TCPDSACKRecvSegs"]
    res = c.curl("-o", "/dev/null", "-w",
                 "%{http_code} %header{x-served-by} %header{x-body-length} "
                 "%header{x-body-sha256}", *args, c.url + "/post")
    assert res.returncode == 0, res.stderr
    code, by, length, digest = res.stdout.split(" ")
    assert (code, by[:1]) == ("200", "t"), res.stdout
    assert int(length) == size
    assert digest == sha256(body)
    loss = {k: v - loss0[k] for k, v in client_loss_counters(ns).items()}
    dsack = tcp_ext(ns)["TCPDSACKRecvSegs"] - dsack0
    print(f"{how} {size}: client {loss}, DSACKed segments {dsack}")
    # Judged by bytes, resets and timeouts: an upload faster than nginx
    # writes it meets zero windows in this lab, and the client's probes
    # resend segments now and then with or without XO (mostly ones the
    # receiver had: DSACKs; docs/benchmarks.md, bulk uploads).
    assert loss["TcpOutRsts"] == loss["TcpEstabResets"] == loss["TCPTimeouts"] == 0, loss


def test_wrk_through_the_front(cluster: tuple[NginxCluster, dict[str, bytes]],
                               tmp_path: Path) -> None:
    """wrk, 8 keep-alive connections for 3 s: every answer 2xx, no socket
    error; each request was handed to a target (the front's counters) and
    back; the targets' access logs hold them; the client never resent (and
    if it did, the client's capture says which segment and around what)."""
    c, _ = cluster
    ns = c.testbed.client.netns
    front0 = c.status("host")["stats"]
    logs0 = {t.name: c.procs[t.name].access_log.read_text().count('"GET /8k.bin ')
             for t in c.testbed.targets}
    with headers_capture(c.testbed, "client", tmp_path / "client.pcap", 8080) as pcap:
        loss0 = client_loss_counters(ns)
        tx0 = link_tx_bytes(c, "host")
        w = c.wrk("/8k.bin", connections=8, seconds=3)
        front_tx = link_tx_bytes(c, "host") - tx0
        loss = client_loss_counters(ns)
    front = c.status("host")["stats"]
    logs = {t.name: c.procs[t.name].access_log.read_text().count('"GET /8k.bin ')
            for t in c.testbed.targets}
    served = {k: logs[k] - logs0[k] for k in logs}
    print(f"wrk: {w.requests} requests, {w.rps:.0f}/s, latency {w.latency_ms}, "
          f"served {served}, front {front}, front tx {front_tx} B")
    assert w.requests > 0
    assert w.non_2xx == 0, w.text
    assert not any(w.socket_errors.values()), w.text
    offloads = front["offloads"] - front0["offloads"]  # type: ignore[index]
    returns = front["returns"] - front0["returns"]  # type: ignore[index]
    assert front["rollbacks"] == front0["rollbacks"]  # type: ignore[index]
    # every completed request was handed over (wrk may stop with a few in flight)
    assert w.requests <= offloads <= w.requests + 8
    assert returns >= w.requests - 8
    assert w.requests <= sum(served.values()) <= w.requests + 8
    assert all(v > 0 for v in served.values()), served
    # 8 KiB per answer went from the targets, not through the front
    assert front_tx < w.requests * 8192 // 4, front_tx
    resent = {k: loss[k] - loss0[k] for k in ("TcpRetransSegs", "TCPLossProbes",
                                               "TCPTimeouts")}
    assert resent == {"TcpRetransSegs": 0, "TCPLossProbes": 0, "TCPTimeouts": 0}, \
        f"{resent}; targets {[c.status(t.name)['stats'] for t in c.testbed.targets]}\n" \
        + resends(pcap, c.testbed.client.ipv4)


def test_pipelined_requests_in_order(cluster: tuple[NginxCluster, dict[str, bytes]]) -> None:
    c, bodies = cluster
    names = ["one.bin", "8k.bin", "1m.bin", "8k.bin"]
    req = b"".join(f"GET /{n} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for n in names)
    with in_netns(c.testbed.client.netns):
        s = socket.create_connection((c.testbed.host.ipv4, 8080), timeout=20)
        s.sendall(req)
        f = s.makefile("rb")
        for n in names:
            status = f.readline()
            assert status.startswith(b"HTTP/1.1 200"), status
            length = 0
            while (line := f.readline()) not in (b"\r\n", b""):
                k, _, v = line.decode().partition(":")
                if k.lower() == "content-length":
                    length = int(v)
            assert sha256(f.read(length)) == sha256(bodies[n]), n
        s.close()


@pytest.mark.parametrize("build", build_params())
def test_unused_module_changes_nothing(tmp_path: Path, build: NginxBuild) -> None:
    """Loaded (or compiled in) but unused: nginx -t passes and a plain server
    is untouched; configuration errors name the file and line."""
    load = f"load_module {build.module};\n" if build.module else ""
    (tmp_path / "logs").mkdir()  # the static build's default log paths
    conf = tmp_path / "plain.conf"
    conf.write_text(f"{load}error_log stderr;\npid {tmp_path}/p;\n"
                    "events {}\nhttp { server { listen 127.0.0.1:1; } }\n")
    res = subprocess.run([str(build.binary), "-p", str(tmp_path), "-t", "-c", str(conf)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    bad = tmp_path / "bad.conf"
    bad.write_text(f"{load}error_log stderr;\npid {tmp_path}/p;\n"
                   "events {}\nhttp {\n  xo_policy sideways;\n}\n")
    res = subprocess.run([str(build.binary), "-p", str(tmp_path), "-t", "-c", str(bad)],
                         capture_output=True, text=True)
    assert res.returncode != 0
    line = 6 if build.module else 5
    assert f"{bad}:{line}" in res.stderr and "xo_policy" in res.stderr, res.stderr
