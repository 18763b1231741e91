"""Handoffs on slow (rate-limited) links, where responses are still queued
when a connection moves and transfers outlive rule lifetimes."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from handoff_tools import curl_many, docroot_digests, lab_name, member_steer, rst_counters
from netns_tools import sha256
from xo.demo import cluster
from xo.lab import Lab
from xo.steer import Kind

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
TTL_S = 3.0


def redirect_expiries(testbed: Lab) -> list[int]:
    with member_steer(testbed, "host") as steer:
        return [rule.expires_ns for _, rule in steer.list() if rule.kind == Kind.REDIRECT]


def test_slow_transfer_outlives_the_redirect_ttl(tmp_path: Path) -> None:
    """The engines renew the host's redirect and the target's source rewrite
    while the flow is offloaded, so a slow client is never cut off (and a
    failed handoff still cannot hold a client port longer than the TTL)."""
    # 4 MiB at 5 Mbit/s takes ~7 s: more than twice the 3 s lifetime.
    with cluster(targets=1, name=lab_name("n"), rate="5mbit", redirect_ttl=TTL_S) as apps:
        out = tmp_path / "large.bin"
        result: dict[str, object] = {}

        def fetch() -> None:
            started = time.monotonic()
            res = apps.testbed.run("client", ["curl", "-s", "-S", "-m", "60", "-o", str(out),
                                              "-w", "%{http_code} %header{x-served-by}",
                                              f"{apps.url}/large.bin"],
                                   capture_output=True, text=True)
            result.update(rc=res.returncode, out=res.stdout, err=res.stderr,
                          seconds=time.monotonic() - started)

        worker = threading.Thread(target=fetch)
        worker.start()
        seen: list[int] = []
        while worker.is_alive():
            seen += redirect_expiries(apps.testbed)
            time.sleep(0.25)
        worker.join()
        assert result["rc"] == 0, result
        assert result["out"] == "200 t0", result
        assert float(result["seconds"]) > 2 * TTL_S  # really outlived the lifetime
        assert sha256(out.read_bytes()) == sha256((apps.docroot / "large.bin").read_bytes())
        # The redirect's expiry moved forward while the transfer ran.
        assert len(set(seen)) >= 2, seen


def test_hand_back_with_the_response_still_queued(tmp_path: Path) -> None:
    """Targets hand back at once (no drain): most of each large response is
    still in the target's send queue, some of it in flight, while its pacing
    timer keeps sending. The host takes over exactly where the client is:
    every byte arrives once, no resets."""
    paths = ["/large.bin", "/medium.bin", "/large.bin", "/small.bin"]
    with cluster(targets=2, name=lab_name("q"), rate="10mbit", drain_timeout=0) as apps:
        digests = docroot_digests(apps)
        before = rst_counters(apps.testbed)
        rows = curl_many(apps.testbed, apps.url, [*paths, "/_xo/stats"], tmp_path / "out")
        for path, row in zip(paths, rows, strict=False):
            body = Path(row["file"]).read_bytes()
            assert row["status"] == "200" and sha256(body) == digests[path[1:]], row
            assert row["served_by"] in ("t0", "t1")
        stats = apps.host_stats()
        assert stats["offloads"] == stats["returns"] == len(paths)
        assert stats["rollbacks"] == 0
        assert rst_counters(apps.testbed) == before
