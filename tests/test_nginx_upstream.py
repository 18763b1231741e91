"""nginx's own `upstream` blocks as XO target lists: `xo_pass NAME;` naming an
`upstream NAME { server ADDR[:PORT]; ... }` block hands requests to its
servers (their control addresses, port 7700 when the line gives none),
round robin with weights, `down` servers left out; what xo_pass cannot
honour stops `nginx -t` with the file and line. Both builds."""

from __future__ import annotations

import http.client
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns_tools import client_loss_counters, sha256
from nginx_tools import NginxBuild, NginxCluster, build_params, nginx_cluster
from xo.lab import in_netns

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

BODIES = {"8k.bin": 8 << 10, "1m.bin": 1 << 20}


@pytest.fixture(scope="module", params=build_params())
def cluster(request: pytest.FixtureRequest) -> Iterator[tuple[NginxCluster, dict[str, bytes]]]:
    with nginx_cluster(request.param) as c:
        bodies = {}
        (c.docroot / "w").mkdir(mode=0o755)
        for name, size in BODIES.items():
            bodies[name] = os.urandom(size)
            for where in (c.docroot / name, c.docroot / "w" / name):
                where.write_bytes(bodies[name])
                where.chmod(0o644)
        t0, t1 = c.testbed.targets
        # t0 without a port (the control port defaults to 7700), t1 with
        # it; a down server that does not exist is never connected to.
        upstreams = f"""
    upstream xo_pair {{ server {t0.ipv4}; server {t1.ipv4}:7700; }}
    upstream xo_weighted {{
        server {t0.ipv4}:7700 weight=2;
        server {t1.ipv4}:7700;
        server 198.18.255.254:7700 down;
    }}
    server {{
        listen {c.testbed.host.ipv4}:8081;
        root {c.docroot};
        location /w/ {{ xo_pass xo_weighted; }}
    }}
"""
        for t in c.testbed.targets:
            c.start(t.name, c.target_conf(t.name))
        c.start("host", c.front_conf("xo_pass xo_pair;", upstreams, xo_targets=False))
        c.wait_targets_up([f"{t0.ipv4}:7700", f"{t1.ipv4}:7700"])
        yield c, bodies


def keepalive_run(c: NginxCluster, port: int, paths: list[str],
                  bodies: dict[str, bytes]) -> list[str]:
    """The paths over one keep-alive connection; who served each (bodies
    checked by hash)."""
    served = []
    with in_netns(c.testbed.client.netns):
        conn = http.client.HTTPConnection(c.testbed.host.ipv4, port, timeout=20)
        for i, path in enumerate(paths):
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, (i, resp.status)
            assert sha256(body) == sha256(bodies[path.rsplit("/", 1)[1]]), i
            served.append(str(resp.getheader("X-Served-By")))
        conn.close()
    return served


def test_upstream_servers_alternate(cluster: tuple[NginxCluster, dict[str, bytes]]) -> None:
    """xo_pass xo_pair: 60 keep-alive requests alternate the two servers of
    the upstream block; nothing is served by the front; no client loss."""
    c, bodies = cluster
    loss0 = client_loss_counters(c.testbed.client.netns)
    paths = ["/1m.bin" if i % 2 else "/8k.bin" for i in range(60)]
    served = keepalive_run(c, 8080, paths, bodies)
    print("served by:", "".join(s[-1] for s in served))
    assert set(served) == {"t0", "t1"}, served
    assert all(a != b for a, b in zip(served, served[1:], strict=False)), served
    loss = client_loss_counters(c.testbed.client.netns)
    assert {k: loss[k] - loss0[k] for k in loss} == {k: 0 for k in loss}
    peers = c.status("host")["peers"]
    assert isinstance(peers, list)
    assert sorted(p["name"] for p in peers) == sorted(
        f"{t.ipv4}:7700" for t in c.testbed.targets), peers


def test_upstream_weight_and_down(cluster: tuple[NginxCluster, dict[str, bytes]]) -> None:
    """xo_pass xo_weighted: weight=2 gives t0 two of every three requests,
    the down server none (and no control connection)."""
    c, bodies = cluster
    loss0 = client_loss_counters(c.testbed.client.netns)
    served = keepalive_run(c, 8081, ["/w/8k.bin"] * 30, bodies)
    print("served by:", "".join(s[-1] for s in served))
    assert served.count("t0") == 20 and served.count("t1") == 10, served
    loss = client_loss_counters(c.testbed.client.netns)
    assert {k: loss[k] - loss0[k] for k in loss} == {k: 0 for k in loss}
    peers = c.status("host")["peers"]
    assert isinstance(peers, list)
    assert "198.18.255.254:7700" not in {p["name"] for p in peers}, peers


BAD = {
    "backup": ("upstream u {{\n  server 198.18.0.9:7700;\n  server 198.18.0.10 backup;\n}}\n",
               "server 198.18.0.10: backup is not supported"),
    "max_fails": ("upstream u {{\n  server 198.18.0.9 max_fails=3;\n}}\n",
                  "max_fails is not supported"),
    "balancing": ("upstream u {{\n  least_conn;\n  server 198.18.0.9;\n}}\n",
                  "balancing method"),
    "ipv6": ("upstream u {{\n  server [2001:2::9]:7700;\n}}\n", "IPv4 control addresses only"),
    "all_down": ("upstream u {{\n  server 198.18.0.9 down;\n}}\n", "no server"),
    "unknown": ("upstream v {{\n  server 198.18.0.9;\n}}\n", "no xo_target or upstream \"u\""),
    "both": ("upstream u {{\n  server 198.18.0.9;\n}}\nxo_target u 198.18.0.9;\n",
             "names both an xo_target and an upstream"),
}


@pytest.mark.parametrize("build", build_params())
@pytest.mark.parametrize("case", sorted(BAD))
def test_upstream_config_errors(tmp_path: Path, build: NginxBuild, case: str) -> None:
    """nginx -t refuses what xo_pass cannot honour in an upstream block,
    naming the upstream's file and line and the xo_pass line."""
    load = f"load_module {build.module};\n" if build.module else ""
    (tmp_path / "logs").mkdir()  # the static build's default log paths
    block, want = BAD[case]
    head = f"{load}error_log stderr;\npid {tmp_path}/p;\nevents {{}}\nhttp {{\n"
    conf = tmp_path / "bad.conf"
    text = (head + block.format() + "server {\n  listen 127.0.0.1:1;\n"
            "  location / { xo_pass u; }\n}\n}\n")
    conf.write_text(text)
    lines = text.splitlines()
    pass_line = next(i for i, ln in enumerate(lines, 1) if "xo_pass u" in ln)
    ups_line = next(i for i, ln in enumerate(lines, 1) if ln.startswith("upstream"))
    res = subprocess.run([str(build.binary), "-p", str(tmp_path), "-t", "-c", str(conf)],
                         capture_output=True, text=True)
    assert res.returncode != 0, res.stderr
    assert want in res.stderr, res.stderr
    assert f"{conf}:{pass_line}" in res.stderr, res.stderr
    if case not in ("unknown", "both"):
        assert f"{conf}:{ups_line}" in res.stderr, res.stderr
