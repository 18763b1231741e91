"""The reference host's other modes: the proxy baseline the benchmarks compare
XO against, and serving locally. Both must be correct, or the comparison
means nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from handoff_tools import curl_many, docroot_digests, lab_name
from netns_tools import sha256
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
