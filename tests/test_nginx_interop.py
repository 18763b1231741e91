"""The module and the Python driver speak one protocol (both drive the
core's machine): the Python reference app (xo.refapp, run from its config
file) as the front with nginx targets, and nginx as the front with Python
targets. Bodies checked by hash, each side's counters read."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns_tools import client_loss_counters, sha256
from nginx_tools import (
    FILES,
    NginxCluster,
    assert_curl_client_clean,
    build_params,
    nginx_cluster,
    put_random_files,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

@pytest.fixture(params=build_params())
def cluster(request: pytest.FixtureRequest) -> Iterator[tuple[NginxCluster, dict[str, str]]]:
    with nginx_cluster(request.param) as c:
        digests = put_random_files(c)
        yield c, digests


def fetch_all(c: NginxCluster, tmp_path: Path, names: list[str]) -> list[tuple[str, str, str]]:
    """One curl, one keep-alive connection: (status, server, body digest) each."""
    args: list[str] = []
    for i, name in enumerate(names):
        args += ["-o", str(tmp_path / f"r{i}"), f"{c.url}/{name}"]
    res = c.curl("-w", "%{http_code} %header{x-served-by}\\n", *args)
    assert res.returncode == 0 and "curl: (" not in res.stderr, res.stderr
    rows = []
    for i, line in enumerate(res.stdout.splitlines()):
        status, _, by = line.partition(" ")
        rows.append((status, by, sha256((tmp_path / f"r{i}").read_bytes())))
    return rows


def test_python_front_nginx_targets(cluster: tuple[NginxCluster, dict[str, str]],
                                    tmp_path: Path) -> None:
    c, digests = cluster
    for t in c.testbed.targets:
        c.start_body_app(t.name)
        c.start(t.name, c.target_conf(t.name))
    # Every state goes without its request bytes (they follow it, BYTES):
    # nginx takes them with the ADOPTED event as it takes request bytes.
    c.start_refapp("host", "host", bytes_follow_min=1)
    loss0 = client_loss_counters(c.testbed.client.netns)
    names = [n for _ in range(4) for n in FILES]
    rows = fetch_all(c, tmp_path, names)
    assert [(s, d) for s, _, d in rows] == [("200", digests[n]) for n in names]
    assert {by for _, by, _ in rows} == {"t0", "t1"}, rows
    loss = client_loss_counters(c.testbed.client.netns)
    # A POST body streams behind the head to the app behind target nginx
    # (judged by its digest: uploads meet zero windows in this lab and the
    # client resends now and then, with or without XO).
    body = os.urandom(1 << 20)
    (tmp_path / "post.bin").write_bytes(body)
    res = c.curl("-o", "/dev/null", "-H", "Expect:", "--data-binary", f"@{tmp_path}/post.bin",
                 "-w", "%{http_code} %header{x-served-by} %header{x-body-sha256}",
                 c.url + "/post")
    status, by, digest = res.stdout.split(" ")
    assert (status, by[:1], digest) == ("200", "t", sha256(body)), res
    stats = json.loads(c.curl(c.url + "/_xo/stats").stdout)
    adopted = sum(int(c.status(t.name)["stats"]["adopted"])  # type: ignore[index]
                  for t in c.testbed.targets)
    print("python front:", stats, "nginx targets adopted:", adopted, "client:", loss)
    assert stats["offloads"] == len(names) + 1 and stats["rollbacks"] == 0, stats
    assert stats["bytes_followed"] == stats["offloads"] and stats["bytes_missed"] == 0, stats
    # nginx handed each back (the last may be closed on its target instead
    # when curl leaves right after its answer; the POST's connection too)
    assert stats["returns"] >= len(names) - 1, stats
    assert adopted == len(names) + 1
    assert_curl_client_clean({k: loss[k] - loss0[k] for k in loss})


def test_nginx_front_python_targets(cluster: tuple[NginxCluster, dict[str, str]],
                                    tmp_path: Path) -> None:
    c, digests = cluster
    for t in c.testbed.targets:
        c.start_refapp(t.name, "target")
    c.start("host", c.front_conf())
    c.wait_targets_up()
    loss0 = client_loss_counters(c.testbed.client.netns)
    front0 = c.status("host")["stats"]
    names = [n for _ in range(4) for n in FILES]
    rows = fetch_all(c, tmp_path, names)
    assert [(s, d) for s, _, d in rows] == [("200", digests[n]) for n in names]
    assert {by for _, by, _ in rows} == {"t0", "t1"}, rows
    loss = client_loss_counters(c.testbed.client.netns)
    front = c.status("host")["stats"]
    print("nginx front:", front, "client:", loss)
    delta = {k: front[k] - front0[k] for k in ("offloads", "returns", "rollbacks")}  # type: ignore[index]
    # each handed back at the response boundary; the last one may instead
    # be closed on its target when curl leaves right after its answer
    assert delta["offloads"] == len(names) and delta["rollbacks"] == 0, delta
    assert len(names) - 1 <= delta["returns"] <= len(names), delta
    assert_curl_client_clean({k: loss[k] - loss0[k] for k in loss})
