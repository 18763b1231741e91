"""Direct moves: a target that reads the next request on a connection and
finds it belongs to another target moves it there through the host's
control plane; the host re-points its redirect in one map write and never
restores the connection itself."""

from __future__ import annotations

import json
import os
import zlib

import pytest
from handoff_faults_tools import client_connect, read_response
from handoff_tools import lab_name, steering_entries
from netns_tools import client_loss_counters, sha256, wait_for
from xo.demo import cluster

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


def owner(path: str) -> str:
    """The target a path belongs to (the "path" policy of host and targets)."""
    return ["t0", "t1"][zlib.crc32(path.encode()) % 2]


def test_connection_moves_straight_between_targets() -> None:
    with cluster(targets=2, name=lab_name("m"), policy="path", move_policy="path") as apps:
        files: dict[str, list[str]] = {"t0": [], "t1": []}
        digests: dict[str, str] = {}
        for i in range(40):
            path = f"/mv{i}.bin"
            if len(files[owner(path)]) < 5:
                body = os.urandom(16384 + 37 * 1024 * i)
                (apps.docroot / path[1:]).write_bytes(body)
                digests[path] = sha256(body)
                files[owner(path)].append(path)
        assert all(len(v) == 5 for v in files.values()), files
        # Owners alternate: every request after the first is a move.
        order = [files["t0" if i % 2 == 0 else "t1"][i // 2 % 5] for i in range(20)]
        before = client_loss_counters(apps.testbed.client.netns)
        with client_connect(apps) as sock:
            for path in order:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: xo\r\n\r\n".encode())
                headers, body = read_response(sock)
                assert headers[":status"] == "200", (path, headers)
                assert headers["x-served-by"] == owner(path), (path, headers)
                assert sha256(body) == digests[path], path
            sock.sendall(b"GET /_xo/stats HTTP/1.1\r\nHost: xo\r\n\r\n")
            headers, body = read_response(sock)
            stats = json.loads(body)
        assert headers["x-served-by"] == "host"
        assert stats["offloads"] == 1, stats    # one outbound transfer ...
        assert stats["moves"] == 19, stats      # ... then target to target
        assert stats["returns"] == 1, stats     # back only for the stats request
        assert stats["rollbacks"] == 0, stats
        assert client_loss_counters(apps.testbed.client.netns) == before
        wait_for(lambda: apps.host_stats()["rules"] == 0, "the host's steering map to empty")
        for target in ("t0", "t1"):
            wait_for(lambda t=target: steering_entries(apps.testbed, t) == 0,  # type: ignore[misc]
                     f"{target}'s steering map to empty")
