"""Real nginx front and targets with the XO module under traffic while
things change: `nginx -s reload` on the front and on each target, and a
target nginx killed (SIGKILL) mid-traffic.

Judged by what the clients got (status, server, body digest of every
request), the client namespace's counters, the front's xo_status counters
and the steering maps left behind."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns_tools import client_loss_counters, sha256
from nginx_tools import DYNAMIC, NginxCluster, Traffic, nginx_cluster, wait_for
from xo.steer import Steer

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(DYNAMIC.available() is not None, reason=str(DYNAMIC.available())),
]

FILES = {"8k.bin": 8 << 10, "1m.bin": 1 << 20, "4m.bin": 4 << 20}


@pytest.fixture
def cluster() -> Iterator[tuple[NginxCluster, dict[str, str]]]:
    with nginx_cluster(DYNAMIC) as c:
        digests = {}
        for name, size in FILES.items():
            body = os.urandom(size)
            (c.docroot / name).write_bytes(body)
            (c.docroot / name).chmod(0o644)
            digests["/" + name] = sha256(body)
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
    assert loss["TcpEstabResets"] == 0 and loss["TCPTimeouts"] == 0, loss
    # Old workers left nothing open behind them (nginx says "open socket
    # ... left" when a worker exits with connections it did not close).
    for p in c.procs.values():
        alerts = [ln for ln in p.log_text().splitlines() if "[alert]" in ln or "[emerg]" in ln]
        assert not alerts, (p.name, alerts[:5])
    # The new front worker hands requests over again.
    stats = c.status("host")["stats"]
    assert stats["offloads"] > 0, stats  # type: ignore[index]
