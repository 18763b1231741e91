"""nginx front and targets with several workers (`worker_processes 2`): each
worker is a machine of its own with its own owner id, and the frames its
PARK entries keep go to a ring of its own (xo_park_rings), so no worker
takes another's parked frames. Several keep-alive clients at once; bodies
by hash; the client never resends (nstat). Both builds."""

from __future__ import annotations

import http.client
import os
import signal
import threading
from collections.abc import Iterator

import pytest
from netns_tools import client_loss_counters, sha256
from nginx_tools import NginxCluster, build_params, nginx_cluster, wait_for
from xo.lab import in_netns

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

BODIES = {"8k.bin": 8 << 10, "64k.bin": 64 << 10, "1m.bin": 1 << 20}
CLIENTS = 6
REQUESTS = 40  # per client and round, one keep-alive connection each


@pytest.fixture(scope="module", params=build_params())
def cluster(request: pytest.FixtureRequest) -> Iterator[tuple[NginxCluster, dict[str, bytes]]]:
    with nginx_cluster(request.param) as c:
        c.workers = 2
        bodies = {}
        for name, size in BODIES.items():
            bodies[name] = os.urandom(size)
            (c.docroot / name).write_bytes(bodies[name])
            (c.docroot / name).chmod(0o644)
        c.start_all()
        yield c, bodies


def worker_stats(c: NginxCluster, member: str, want: int) -> dict[int, dict[str, int]]:
    """Each worker's xo_status counters, by PID (any worker answers a
    request: ask until `want` workers have)."""
    seen: dict[int, dict[str, int]] = {}
    for _ in range(200):
        st = c.status(member)
        stats = st["stats"]
        assert isinstance(stats, dict)
        seen[int(str(st["pid"]))] = {k: int(v) for k, v in stats.items()}
        if len(seen) >= want:
            break
    return seen


def run_clients(c: NginxCluster, bodies: dict[str, bytes]) -> list[list[str]]:
    """CLIENTS threads, each REQUESTS requests over one keep-alive
    connection; who served each request, per client."""
    names = sorted(bodies)
    served: list[list[str]] = [[] for _ in range(CLIENTS)]
    errors: list[str] = []

    def client(i: int) -> None:
        try:
            conn = http.client.HTTPConnection(c.testbed.host.ipv4, 8080, timeout=30)
            with in_netns(c.testbed.client.netns):
                conn.connect()
            for k in range(REQUESTS):
                name = names[(i + k) % len(names)]
                conn.request("GET", "/" + name)
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200 or sha256(body) != sha256(bodies[name]):
                    errors.append(f"client {i} request {k}: {resp.status} {len(body)} B")
                    return
                served[i].append(str(resp.getheader("X-Served-By")))
            conn.close()
        except (OSError, http.client.HTTPException) as e:
            errors.append(f"client {i}: {e!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return served


def busy_workers(before: dict[int, dict[str, int]], after: dict[int, dict[str, int]],
                 counter: str) -> int:
    """How many workers' counter moved between two worker_stats()."""
    return sum(1 for pid, st in after.items()
               if st[counter] > before.get(pid, {}).get(counter, 0))


def test_two_workers_no_client_resend(cluster: tuple[NginxCluster, dict[str, bytes]]) -> None:
    """Rounds of CLIENTS concurrent keep-alive clients until a member had
    both its workers handing connections over at once (which front worker
    accepts a connection, and which target worker a front's control
    connection reached, is the kernel's choice): every body by hash, every
    request handed to a target, frames parked and moved, and the client's
    kernel never resent a segment, probed a tail or timed out."""
    c, bodies = cluster
    members = {"host": "offloads", **{t.name: "adopted" for t in c.testbed.targets}}
    before = {m: worker_stats(c, m, 2) for m in members}
    loss0 = client_loss_counters(c.testbed.client.netns)
    rounds = 0
    while True:
        rounds += 1
        served = run_clients(c, bodies)
        for i, s in enumerate(served):
            assert len(s) == REQUESTS and set(s) <= {"t0", "t1"}, (i, s)
        after = {m: worker_stats(c, m, 2) for m in members}
        busy = {m: busy_workers(before[m], after[m], k) for m, k in members.items()}
        if max(busy.values()) >= 2 or rounds == 8:
            break
    loss = client_loss_counters(c.testbed.client.netns)
    delta = {k: loss[k] - loss0[k] for k in loss}
    parked = {m: sum(st["parked_shipped"] + st["parked_replayed"] for st in after[m].values())
              - sum(st["parked_shipped"] + st["parked_replayed"] for st in before[m].values())
              for m in members}
    print(f"rounds {rounds}, busy workers {busy}, parked frames moved {parked}, "
          f"loss delta {delta}")
    assert max(busy.values()) >= 2, busy
    assert sum(parked.values()) > 0, parked
    assert delta == {k: 0 for k in delta}, delta


def test_killed_worker_ring_removed(cluster: tuple[NginxCluster, dict[str, bytes]]) -> None:
    """A target worker killed while idle leaves its ring in the object; the
    worker nginx starts in its place removes it (and says so), and the
    clients' next rounds go on with no resend."""
    c, bodies = cluster
    t0 = c.procs["t0"]
    old = t0.workers()
    assert len(old) == 2, old
    os.kill(old[0], signal.SIGKILL)
    wait_for(lambda: len(set(t0.workers()) - set(old)) == 1, "t0's new worker")
    wait_for(lambda: f"parked-frame ring of worker {old[0]} (gone) removed" in t0.log_text(),
             "the dead worker's ring removed")
    c.wait_targets_up()
    loss0 = client_loss_counters(c.testbed.client.netns)
    for _ in range(2):
        served = run_clients(c, bodies)
        assert all(len(s) == REQUESTS and set(s) <= {"t0", "t1"} for s in served), served
    loss = client_loss_counters(c.testbed.client.netns)
    assert {k: loss[k] - loss0[k] for k in loss} == {k: 0 for k in loss}
