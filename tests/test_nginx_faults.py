"""Real nginx front and targets with the XO module under traffic while
things change: `nginx -s reload` on the front and on each target, and a
target nginx killed (SIGKILL) mid-traffic.

Judged by what the clients got (status, server, body digest of every
request), the client namespace's counters, the front's xo_status counters
and the steering maps left behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns_tools import client_loss_counters, snmp_tcp
from nginx_tools import (
    NginxCluster,
    Traffic,
    build_params,
    nginx_cluster,
    put_random_files,
    wait_for,
)
from xo.lab import in_netns
from xo.steer import Steer

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

@pytest.fixture(params=build_params())
def cluster(request: pytest.FixtureRequest) -> Iterator[tuple[NginxCluster, dict[str, str]]]:
    with nginx_cluster(request.param) as c:
        digests = put_random_files(c, prefix="/")
        c.start_all()
        yield c, digests


def flow_entries(c: NginxCluster, member: str) -> list[object]:
    """The entries of the member's pinned steering map."""
    steer = Steer(pin_dir=f"/run/xo/bpf/{c.testbed.name}-{member}")
    try:
        return list(steer.list())
    finally:
        steer.close()


def reload_and_wait(c: NginxCluster, member: str) -> None:
    """SIGHUP: new workers start, the old ones finish what they serve and exit."""
    p = c.procs[member]
    old = set(p.workers())
    p.reload()
    wait_for(lambda: bool(set(p.workers()) - old), f"{member}: new workers")
    wait_for(lambda: not (set(p.workers()) & old), f"{member}: old workers gone", 60)


def test_reload_front_and_targets_during_traffic(
        cluster: tuple[NginxCluster, dict[str, str]], tmp_path: Path) -> None:
    """`nginx -s reload` on the front, then on each target, while clients
    fetch (keep-alive and one request per connection): every request is
    answered 200 with the right bytes; nobody's connection is reset."""
    c, digests = cluster
    ns = c.testbed.client.netns
    loss0 = client_loss_counters(ns)
    with Traffic(c, list(digests), tmp_path) as traffic:
        traffic.wait_for_requests(40)
        for member in ("host", *(t.name for t in c.testbed.targets)):
            reload_and_wait(c, member)
            if member == "host":
                c.wait_targets_up()
            traffic.wait_for_requests(40)
    loss = {k: v - loss0[k] for k, v in client_loss_counters(ns).items()}
    fetches = traffic.fetches
    by = {f.served_by for f in fetches}
    counts = {b: sum(1 for f in fetches if f.served_by == b) for b in sorted(by)}
    print(f"{len(fetches)} requests, served by {counts}, curl retries "
          f"{traffic.retries}, client {loss}")
    assert not traffic.errors, traffic.errors[:3]
    bad = [f for f in fetches if (f.rc, f.status) != (0, "200") or f.digest != digests[f.path]]
    assert not bad, bad[:5]
    assert {"t0", "t1"} <= by
    assert loss["TCPTimeouts"] == 0, loss
    # A stopping worker closes idle keep-alive connections; a request the
    # client sends at that moment meets a closed socket (the race of any
    # server closing an idle keep-alive connection, with or without XO):
    # the client gets a reset before any answer and sends it again. Each
    # reset here must be such a retry.
    assert loss["TcpEstabResets"] <= traffic.retries, (loss, traffic.retries)
    # Old workers left nothing open behind them (nginx says "open socket
    # ... left" when a worker exits with connections it did not close).
    for p in c.procs.values():
        alerts = [ln for ln in p.log_text().splitlines() if "[alert]" in ln or "[emerg]" in ln]
        assert not alerts, (p.name, alerts[:5])
    # The new front worker hands requests over again.
    stats = c.status("host")["stats"]
    assert stats["offloads"] > 0, stats  # type: ignore[index]


def test_target_killed_mid_traffic(cluster: tuple[NginxCluster, dict[str, str]]) -> None:
    """t0's nginx is SIGKILLed (master and worker) while one client is in the
    middle of a 64 MiB download t0 serves and three requests wait for t0's
    TARGET_READY (t0 stopped first, so they wait). The waiting requests are
    rolled back and served by the front; the downloading client gets a reset,
    promptly; nothing hangs; no steering entry is left on the front; t0's
    restarted nginx removes the dead worker's entries and serves again."""
    c, digests = cluster
    body = os.urandom(64 << 20)
    (c.docroot / "64m.bin").write_bytes(body)
    (c.docroot / "64m.bin").chmod(0o644)
    ns = c.testbed.client.netns
    # The front hands everything to t0 for this test.
    c.procs["host"].stop()
    front = c.start("host", c.front_conf("xo_pass t0;"))
    c.wait_targets_up(["t0"])
    t0 = c.procs["t0"]
    before = snmp_tcp(ns)
    # 1. A download t0 serves, stalled: the client reads 1 MiB and waits.
    with in_netns(ns):
        a = socket.create_connection((c.testbed.host.ipv4, 8080), timeout=20)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    a.sendall(b"GET /64m.bin HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    while len(got) < 1 << 20:
        got += a.recv(65536)
    assert b"X-Served-By: t0" in got.split(b"\r\n\r\n")[0], got[:300]
    assert flow_entries(c, "t0"), "t0 steers the download's packets"
    # 2. t0 stopped: three requests wait for its TARGET_READY.
    pids = [t0.proc.pid, *t0.workers()]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    waiting: list[subprocess.Popen[str]] = []
    try:
        for _ in range(3):
            waiting.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, "curl", "-sS", "-m", "20", "-o", "/dev/null",
                 "-w", "%{http_code} %header{x-served-by}", c.url + "/1m.bin"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        wait_for(lambda: c.status("host")["stats"]["active"] >= 4,  # type: ignore[index]
                 "three handoffs waiting for t0")
    finally:
        # 3. Killed (a stopped process dies on SIGKILL).
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    t0.proc.wait()
    for w in waiting:
        out, err = w.communicate(timeout=60)
        assert (w.returncode, out) == (0, "200 host"), (w.returncode, out, err)
    # The stalled download: what was sent arrives, then a reset (not a hang:
    # the socket timeout would fail this).
    with pytest.raises(ConnectionResetError):
        while a.recv(1 << 20):
            pass
    a.close()
    after = snmp_tcp(ns)
    assert after["EstabResets"] - before["EstabResets"] == 1, (before, after)
    stats = c.status("host")["stats"]
    print("front after the kill:", stats)
    assert stats["rollbacks"] == 3 and stats["withdrawn"] == 1, stats  # type: ignore[index]
    assert stats["active"] == 0, stats  # type: ignore[index]
    wait_for(lambda: flow_entries(c, "host") == [], "the front's steering entries gone")
    # The front serves on its own while t0 is down.
    res = c.curl("-o", "/dev/null", "-w", "%{http_code} %header{x-served-by}",
                 c.url + "/8k.bin")
    assert res.stdout == "200 host", res
    # 4. t0 restarted: the dead worker's entries are removed; t0 serves again.
    assert flow_entries(c, "t0"), "the killed worker left its entries"
    t0 = c.start("t0", c.target_conf("t0"))
    wait_for(lambda: flow_entries(c, "t0") == [], "t0's stale entries removed")
    c.wait_targets_up(["t0"])
    res = c.curl("-o", "/dev/null", "-w", "%{http_code} %header{x-served-by}",
                 c.url + "/8k.bin")
    assert res.stdout == "200 t0", res
    assert "steering entries of worker" in t0.log_text()
    assert front.proc.poll() is None
