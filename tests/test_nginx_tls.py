"""nginx `ssl` listeners hand TLS connections off (docs/nginx.md, "TLS").

A real nginx front terminates TLS with OpenSSL and, for a request to hand
off, takes the session's record state (TLS 1.3 secrets from the key log,
TLS 1.2 master secret, records counted each way) into the handoff; real
target nginx (this kernel has no TLS) continues the session with the
core's record layer behind the connection's recv/send, and hands it back;
the front continues it the same way and hands it off again. Clients are
curl (TLS 1.2 and 1.3) and Python's ssl: bodies by hash, several handoffs
on one TLS connection with one handshake, the client's reset counters
unchanged. A target configured without TLS refuses: the front rolls back
and serves over its own OpenSSL session, which goes on. Across drivers:
the Python reference app's targets continue the nginx front's sessions,
and nginx targets the Python front's."""

from __future__ import annotations

import http.client
import os
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns_tools import client_loss_counters, ktls_counters, sha256
from nginx_tools import (
    BUILDS,
    NginxBuild,
    NginxCluster,
    assert_curl_client_clean,
    assert_targets_track_nothing,
    build_params,
    nginx_cluster,
    wait_for,
)
from tls_tools import make_cert
from xo.lab import in_netns

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

TLS_PORT = 8443
SIZES = {"one.bin": 1, "1m.bin": 1 << 20, "16m.bin": 16 << 20}
NAME = "xo-tls-test"  # the certificate's name (tests/tls_tools.py)


def front_tls_server(c: NginxCluster, cert: Path, key: Path) -> str:
    return f"""
    server {{
        listen {c.testbed.host.ipv4}:{TLS_PORT} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        root {c.docroot};
        add_header X-Served-By host always;
        location = /here.txt {{ }}
        location / {{ xo_pass; }}
    }}
"""


@pytest.fixture(scope="module", params=build_params())
def cluster(request: pytest.FixtureRequest) -> Iterator[tuple[NginxCluster, dict[str, str], Path]]:
    with nginx_cluster(request.param) as c:
        digests, cert, key = files_and_cert(c)
        c.start_all(target_http="xo_tls on;", front_http=front_tls_server(c, cert, key))
        yield c, digests, cert


def stats(c: NginxCluster, member: str) -> dict[str, int]:
    return dict(c.status(member)["stats"])  # type: ignore[arg-type]


def curl_tls(c: NginxCluster, cert: Path, version: str, paths: list[str],
             out: Path, *extra: str, connections: int = 1
             ) -> tuple[list[tuple[str, str, str]], str]:
    """One curl run over one connection: (status, served by, digest) per
    path, and curl's -v trace."""
    out.mkdir(parents=True, exist_ok=True)
    args = ["-v", "--cacert", str(cert), "--resolve", f"{NAME}:{TLS_PORT}:{c.testbed.host.ipv4}",
            f"--tlsv{version}", "--tls-max", version,
            "-w", "%{http_code} %header{x-served-by} %{num_connects}\\n", *extra]
    for i, p in enumerate(paths):
        args += ["-o", str(out / str(i)), f"https://{NAME}:{TLS_PORT}{p}"]
    res = c.curl(*args, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = []
    connects = 0
    for i, line in enumerate(res.stdout.splitlines()):
        status, by, n = line.split()
        connects += int(n)
        rows.append((status, by, sha256((out / str(i)).read_bytes())))
    assert connects == connections, res.stdout  # one TCP and TLS connection
    return rows, res.stderr


def handshakes(trace: str) -> int:
    """TLS handshakes in a curl -v trace (each ends with this line)."""
    return len(re.findall(r"^\* SSL connection using ", trace, re.M))


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_curl_keepalive_handoffs(cluster: tuple[NginxCluster, dict[str, str], Path],
                                 version: str, tmp_path: Path) -> None:
    c, digests, cert = cluster
    paths = ["/one.bin", "/1m.bin", "/16m.bin", "/one.bin", "/1m.bin", "/here.txt"]
    front0, t0 = stats(c, "host"), {t.name: stats(c, t.name) for t in c.testbed.targets}
    loss0 = client_loss_counters(c.testbed.client.netns)
    rows, trace = curl_tls(c, cert, version, paths, tmp_path)
    for path, (status, by, digest) in zip(paths[:-1], rows, strict=False):
        assert status == "200" and by in ("t0", "t1"), (path, status, by)
        assert digest == digests[path[1:]], path
    assert rows[-1][:2] == ("200", "host")  # the front's own, after hand-backs
    assert {by for _, by, _ in rows[:-1]} == {"t0", "t1"}
    assert handshakes(trace) == 1, trace
    assert f"SSL connection using TLSv{version}" in trace
    loss = client_loss_counters(c.testbed.client.netns)
    assert_curl_client_clean({k: loss[k] - loss0[k] for k in loss})
    front = stats(c, "host")
    assert front["offloads"] - front0["offloads"] == len(paths) - 1
    assert front["returns"] - front0["returns"] >= len(paths) - 2
    assert front["rollbacks"] == front0["rollbacks"]
    adopted = sum(stats(c, t.name)["adopted"] - t0[t.name]["adopted"] for t in c.testbed.targets)
    assert adopted == len(paths) - 1


@pytest.mark.parametrize(("version", "suite"), [
    ("1.2", "ECDHE-ECDSA-CHACHA20-POLY1305"), ("1.2", "ECDHE-ECDSA-AES128-GCM-SHA256"),
    ("1.3", "TLS_CHACHA20_POLY1305_SHA256"), ("1.3", "TLS_AES_128_GCM_SHA256")])
def test_curl_suites(cluster: tuple[NginxCluster, dict[str, str], Path], version: str,
                     suite: str, tmp_path: Path) -> None:
    """Every suite the core carries moves (the default ones above are
    AES-256-GCM)."""
    c, digests, cert = cluster
    opt = "--tls13-ciphers" if version == "1.3" else "--ciphers"
    rows, trace = curl_tls(c, cert, version, ["/1m.bin", "/one.bin"], tmp_path, opt, suite)
    assert [(s, d) for s, _, d in rows] == [("200", digests["1m.bin"]), ("200", digests["one.bin"])]
    assert {by for _, by, _ in rows} <= {"t0", "t1"}, rows
    assert suite in trace and handshakes(trace) == 1


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_resumed_sessions(cluster: tuple[NginxCluster, dict[str, str], Path], version: str,
                          tmp_path: Path) -> None:
    """Connections whose TLS session resumes an earlier one (abbreviated
    handshake: session id or ticket) move as well: curl closes after each
    request and resumes the session on the next connection.

    With `Connection: close` and a 1-byte body the target serves the request
    and closes the connection inside its adoption, before the event that
    adopted it returns: the targets must not go on tracking it (CI once
    saw the next test's reload hang on such a connection)."""
    c, digests, cert = cluster
    paths = ["/1m.bin", "/one.bin", "/1m.bin"]
    rows, trace = curl_tls(c, cert, version, paths, tmp_path, "-H", "Connection: close",
                           connections=3)
    assert [(s, d) for s, _, d in rows] == [("200", digests[p[1:]]) for p in paths]
    assert {by for _, by, _ in rows} <= {"t0", "t1"}, rows
    assert "SSL re-using session ID" in trace, trace[-3000:]
    assert_targets_track_nothing(c)


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_put_over_tls(cluster: tuple[NginxCluster, dict[str, str], Path], version: str,
                      tmp_path: Path) -> None:
    """PUT with Expect: 100-continue: the front hands the head off; the target
    sends 100 Continue (nginx's c->send) and reads the body (c->recv) over
    the record layer, then the same connection fetches a body."""
    c, digests, cert = cluster
    body = os.urandom(4 << 20)
    src = tmp_path / "up.bin"
    src.write_bytes(body)
    name = f"tls-{version}.bin"
    res = c.curl("-v", "--cacert", str(cert), "--resolve",
                 f"{NAME}:{TLS_PORT}:{c.testbed.host.ipv4}", f"--tlsv{version}", "--tls-max",
                 version, "-w", "%{http_code} %header{x-served-by}\\n",
                 "-T", str(src), "-o", str(tmp_path / "put"),
                 f"https://{NAME}:{TLS_PORT}/put/{name}",
                 "-o", str(tmp_path / "got"), f"https://{NAME}:{TLS_PORT}/1m.bin", timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    (put_status, by), (get_status, by2) = (ln.split() for ln in res.stdout.splitlines())
    assert put_status in ("201", "204") and by in ("t0", "t1"), res.stdout
    assert "HTTP/1.1 100 Continue" in res.stderr
    assert sha256((c.root / by / "put" / name).read_bytes()) == sha256(body)
    assert get_status == "200" and by2 in ("t0", "t1")
    assert sha256((tmp_path / "got").read_bytes()) == digests["1m.bin"]
    assert handshakes(res.stderr) == 1


def test_suite_not_carried_is_served_here(cluster: tuple[NginxCluster, dict[str, str], Path],
                                          tmp_path: Path) -> None:
    """A CBC suite (no AEAD record state the core could continue): every
    request is served by the front over its OpenSSL session; no handoff is
    even tried."""
    c, digests, cert = cluster
    front0 = stats(c, "host")
    rows, trace = curl_tls(c, cert, "1.2", ["/1m.bin", "/one.bin"], tmp_path,
                           "--ciphers", "ECDHE-ECDSA-AES128-SHA")
    assert rows == [("200", "host", digests["1m.bin"]), ("200", "host", digests["one.bin"])]
    assert "ECDHE-ECDSA-AES128-SHA" in trace and handshakes(trace) == 1
    front = stats(c, "host")
    assert front["offloads"] == front0["offloads"] and front["rollbacks"] == front0["rollbacks"]
    assert ("xo: TLS session served here: a cipher suite the core does not carry"
            in c.procs["host"].log_text())


class _Client(http.client.HTTPSConnection):
    def __init__(self, c: NginxCluster, ctx: ssl.SSLContext) -> None:
        super().__init__(NAME, TLS_PORT, context=ctx, timeout=60)
        self.c = c
        self.connects = 0

    def connect(self) -> None:
        self.connects += 1
        with in_netns(self.c.testbed.client.netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect((self.c.testbed.host.ipv4, TLS_PORT))
        self.sock = self._context.wrap_socket(sock, server_hostname=NAME)  # type: ignore[attr-defined]


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_python_ssl_many_handoffs(cluster: tuple[NginxCluster, dict[str, str], Path],
                                  version: str, tmp_path: Path) -> None:
    """20 requests on one TLS connection, each handed to a target and back;
    the client's key log shows one handshake; nothing reset."""
    c, digests, cert = cluster
    keylog = tmp_path / "client.keylog"
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.keylog_filename = str(keylog)
    ctx.minimum_version = ctx.maximum_version = (
        ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2)
    loss0 = client_loss_counters(c.testbed.client.netns)
    front0 = stats(c, "host")
    conn = _Client(c, ctx)
    served = []
    for i in range(20):
        name = ["one.bin", "1m.bin", "one.bin", "16m.bin"][i % 4] if i < 8 else \
            ["one.bin", "1m.bin"][i % 2]
        conn.request("GET", "/" + name)
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200 and sha256(body) == digests[name], (i, name)
        served.append(resp.getheader("X-Served-By"))
    conn.request("GET", "/here.txt")
    resp = conn.getresponse()
    assert resp.read() == b"front\n" and resp.getheader("X-Served-By") == "host"
    assert conn.sock.version() == f"TLSv{version}"
    conn.close()
    assert conn.connects == 1
    assert set(served) == {"t0", "t1"}, served
    client_randoms = {line.split()[1] for line in keylog.read_text().splitlines()
                      if len(line.split()) == 3}
    assert len(client_randoms) == 1  # one handshake
    front = stats(c, "host")
    assert front["offloads"] - front0["offloads"] == 20
    assert front["rollbacks"] == front0["rollbacks"]
    loss = client_loss_counters(c.testbed.client.netns)
    # No reset, no timeout. Known gap (issue 7, docs/benchmarks.md): a
    # request the client sends while a target hands the connection back is
    # parked through two transfers in a row (the hand-back and the front's
    # next handoff); when they outlast the client's probe timeout it sends
    # one tail-loss probe. Seen in about one run in ten of these 40
    # transfers, once twice (clean-clone CI): at most two.
    delta = {k: loss[k] - loss0[k] for k in loss}
    assert delta["TcpOutRsts"] == delta["TcpEstabResets"] == delta["TCPTimeouts"] == 0, delta
    assert delta["TcpRetransSegs"] <= 2 and delta["TCPLossProbes"] <= 2, delta


def _responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """HTTP/1.1 responses with Content-Length, back to back."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        n = int(headers["content-length"])
        out.append((int(lines[0].split()[1]), headers, rest[:n]))
        data = rest[n:]
    return out


def test_pipelined_requests_in_one_record(cluster: tuple[NginxCluster, dict[str, str], Path]
                                          ) -> None:
    """Two requests in one TLS record: the front reads both, hands off with
    the second as unserved bytes, the target serves both over the record
    layer; then a third request on the same session."""
    c, digests, cert = cluster
    ctx = ssl.create_default_context(cafile=str(cert))
    loss0 = client_loss_counters(c.testbed.client.netns)
    with in_netns(c.testbed.client.netns):
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.settimeout(30)
    raw.connect((c.testbed.host.ipv4, TLS_PORT))
    sock = ctx.wrap_socket(raw, server_hostname=NAME)
    host = f"Host: {NAME}\r\n"
    sock.sendall(f"GET /1m.bin HTTP/1.1\r\n{host}\r\nGET /one.bin HTTP/1.1\r\n{host}\r\n"
                 .encode())
    data = b""
    while len(_complete(data)) < 2:
        chunk = sock.recv(1 << 20)
        assert chunk, data[:200]
        data += chunk
    sock.sendall(f"GET /16m.bin HTTP/1.1\r\n{host}Connection: close\r\n\r\n".encode())
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    sock.close()
    got = _responses(data)
    assert [(s, sha256(b)) for s, _, b in got] == [
        (200, digests["1m.bin"]), (200, digests["one.bin"]), (200, digests["16m.bin"])]
    assert all(h["x-served-by"] in ("t0", "t1") for _, h, _ in got), [h for _, h, _ in got]
    loss = client_loss_counters(c.testbed.client.netns)
    assert loss["TcpOutRsts"] == loss0["TcpOutRsts"]
    assert loss["TcpEstabResets"] == loss0["TcpEstabResets"]


def _complete(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The whole responses at the start of data."""
    try:
        out = _responses(data)
    except (ValueError, KeyError, IndexError):
        out = []
    if out and len(out[-1][2]) < int(out[-1][1]["content-length"]):
        out.pop()
    return out


class _BioClient:
    """A TLS client (Python ssl over memory BIOs) that sends records as it
    is told: whole, or cut anywhere."""

    def __init__(self, c: NginxCluster, cert: Path, version: str) -> None:
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.minimum_version = ctx.maximum_version = (
            ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2)
        with in_netns(c.testbed.client.netns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect((c.testbed.host.ipv4, TLS_PORT))
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname=NAME)
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.out.read())
                self._fill()
        self.sock.sendall(self.out.read())  # our Finished

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        assert data, "the server closed"
        self.inc.write(data)

    def record(self, plaintext: bytes) -> bytes:
        self.obj.write(plaintext)
        return self.out.read()

    def response(self) -> tuple[int, dict[str, str], bytes]:
        data = b""
        while not _complete(data):
            try:
                data += self.obj.read(1 << 20)
            except ssl.SSLWantReadError:
                self._fill()
        (resp,) = _complete(data)
        return resp


@pytest.mark.parametrize("cut", [3, 5], ids=["3-bytes", "header"])
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_partial_record_in_openssl_is_served_here(
        cluster: tuple[NginxCluster, dict[str, str], Path], version: str, cut: int) -> None:
    """A request followed, in the same segment, by the first bytes of the
    next record (3, or exactly its 5-byte header, which OpenSSL takes off the
    socket and counts before the body is there): OpenSSL has read part of a
    record, so the front serves the request itself over its session; the
    next request, once whole, moves."""
    c, digests, cert = cluster
    front0 = stats(c, "host")
    reason = "xo: TLS session served here: not at a record boundary"
    reasons0 = c.procs["host"].log_text().count(reason)
    client = _BioClient(c, cert, version)
    host = f"Host: {NAME}\r\n"
    first = client.record(f"GET /1m.bin HTTP/1.1\r\n{host}\r\n".encode())
    second = client.record(f"GET /one.bin HTTP/1.1\r\n{host}\r\n".encode())
    client.sock.sendall(first + second[:cut])
    status, headers, body = client.response()
    assert (status, headers["x-served-by"]) == (200, "host")
    assert sha256(body) == digests["1m.bin"]
    front = stats(c, "host")
    assert front["offloads"] == front0["offloads"]  # not even tried
    wait_for(lambda: c.procs["host"].log_text().count(reason) > reasons0,
             "the front's reason in its log")
    client.sock.sendall(second[cut:])
    status, headers, body = client.response()
    assert (status, headers["x-served-by"]) == (200, "t0") or headers["x-served-by"] == "t1"
    assert sha256(body) == digests["one.bin"]
    assert stats(c, "host")["offloads"] == front0["offloads"] + 1
    client.sock.close()


def reloaded(c: NginxCluster) -> None:
    """After a reload of the targets: each runs one worker (the old one is
    gone, with its control connections) and the front is connected to the
    new ones."""
    time.sleep(0.5)
    for t in c.testbed.targets:
        p = c.procs[t.name]
        try:
            wait_for(lambda p=p: len(p.workers()) == 1, f"{t.name}: old worker gone")
        except AssertionError as exc:
            # What holds the old worker: its sockets and its last words.
            # (Once a connection closed during its adoption, left tracked
            # under id 0: fixed, and test_resumed_sessions checks it.)
            sockets = subprocess.run(["ip", "netns", "exec", t.netns, "ss", "-tanpi"],
                                     capture_output=True, text=True).stdout
            raise AssertionError(f"{exc}\n{sockets}\n{p.log_text()[-4000:]}") from None
    time.sleep(1)  # the front notices the old control connections closed
    c.wait_targets_up()


@pytest.mark.parametrize("mode", ["off", "kernel"])
def test_target_without_tls_rolls_back(cluster: tuple[NginxCluster, dict[str, str], Path],
                                       mode: str, tmp_path: Path) -> None:
    """Targets reloaded with `xo_tls off`, or `xo_tls kernel` (the default) on
    this kernel without TLS, refuse TLS sessions: the front rolls back and
    serves every request over its own OpenSSL session, which goes on (one
    handshake, no reset); plain HTTP is still handed off."""
    c, digests, cert = cluster
    try:
        for t in c.testbed.targets:
            p = c.procs[t.name]
            p.conf.write_text(c.target_conf(t.name, extra_http=f"xo_tls {mode};"))
            p.reload()
        reloaded(c)
        front0 = stats(c, "host")
        loss0 = client_loss_counters(c.testbed.client.netns)
        paths = ["/one.bin", "/1m.bin", "/16m.bin", "/one.bin"]
        rows, trace = curl_tls(c, cert, "1.3", paths, tmp_path)
        for path, (status, by, digest) in zip(paths, rows, strict=True):
            assert (status, by) == ("200", "host") and digest == digests[path[1:]], path
        assert handshakes(trace) == 1
        front = stats(c, "host")
        assert front["rollbacks"] - front0["rollbacks"] == len(paths)
        assert front["offloads"] == front0["offloads"]
        loss = client_loss_counters(c.testbed.client.netns)
        assert_curl_client_clean({k: loss[k] - loss0[k] for k in loss})
        res = c.curl("-o", "/dev/null", "-w", "%{http_code} %header{x-served-by}",
                     c.url + "/1m.bin")
        assert res.stdout.split()[0] == "200" and res.stdout.split()[1] in ("t0", "t1")
    finally:
        for t in c.testbed.targets:
            p = c.procs[t.name]
            p.conf.write_text(c.target_conf(t.name, extra_http="xo_tls on;"))
            p.reload()
        reloaded(c)


def test_logs_clean(cluster: tuple[NginxCluster, dict[str, str], Path]) -> None:
    """No alert, no record layer error in any nginx's log after the above."""
    c, _, _ = cluster
    for name, p in c.procs.items():
        text = p.log_text()
        bad = [ln for ln in text.splitlines()
               if "[alert]" in ln or "[crit]" in ln or "[emerg]" in ln or "xo: TLS:" in ln
               or "(TLS record layer)" in ln]
        assert not bad, (name, bad[:5])


def files_and_cert(c: NginxCluster) -> tuple[dict[str, str], Path, Path]:
    """SIZES' files in the docroot (their digests) and a certificate for the
    front."""
    digests = {}
    for name, size in SIZES.items():
        body = os.urandom(size)
        (c.docroot / name).write_bytes(body)
        (c.docroot / name).chmod(0o644)
        digests[name] = sha256(body)
    (c.docroot / "here.txt").write_text("front\n")  # the front's own file
    (c.docroot / "here.txt").chmod(0o644)
    certdir = c.root / "cert"
    certdir.mkdir()
    cert, key = make_cert(certdir)
    return digests, cert, key


def curl_both_versions_from_targets(c: NginxCluster, cert: Path, digests: dict[str, str],
                                    tmp_path: Path) -> None:
    """With TLS 1.2 and 1.3, one curl session each for four bodies: each
    answered by a target, correct by hash, all over one handshake."""
    for version in ("1.2", "1.3"):
        paths = ["/one.bin", "/1m.bin", "/16m.bin", "/one.bin"]
        rows, trace = curl_tls(c, cert, version, paths, tmp_path / version)
        assert [(s, d) for s, _, d in rows] == [("200", digests[p[1:]]) for p in paths]
        assert {by for _, by, _ in rows} == {"t0", "t1"}, rows
        assert handshakes(trace) == 1


@pytest.mark.parametrize("build", build_params())
def test_nginx_front_python_targets(build: NginxBuild, tmp_path: Path) -> None:
    """The nginx front's TLS sessions continued by the Python driver's
    targets (xo.tls.RecordStream) and handed back to nginx, which continues
    them with its own record layer and hands them off again: both drivers
    read the same state."""
    with nginx_cluster(build) as c:
        digests, cert, key = files_and_cert(c)
        for t in c.testbed.targets:
            c.start_refapp(t.name, "target")
        c.start("host", c.front_conf(extra_http=front_tls_server(c, cert, key)))
        c.wait_targets_up()
        loss0 = client_loss_counters(c.testbed.client.netns)
        front0 = stats(c, "host")
        curl_both_versions_from_targets(c, cert, digests, tmp_path)
        front = stats(c, "host")
        assert front["offloads"] - front0["offloads"] == 8
        assert front["rollbacks"] == front0["rollbacks"]
        assert front["returns"] - front0["returns"] >= 6
        loss = client_loss_counters(c.testbed.client.netns)
        assert_curl_client_clean({k: loss[k] - loss0[k] for k in loss})


@pytest.mark.parametrize("build", build_params())
def test_python_front_nginx_targets(build: NginxBuild, tmp_path: Path) -> None:
    """The Python driver's HTTPS sessions (its own record counting) continued
    by nginx targets with `xo_tls on` and handed back to it."""
    with nginx_cluster(build) as c:
        digests, cert, key = files_and_cert(c)
        for t in c.testbed.targets:
            c.start(t.name, c.target_conf(t.name, extra_http="xo_tls on;"))
        c.start_refapp("host", "host", tls=(cert, key, TLS_PORT))
        loss0 = client_loss_counters(c.testbed.client.netns)
        curl_both_versions_from_targets(c, cert, digests, tmp_path)
        adopted = sum(stats(c, t.name)["adopted"] for t in c.testbed.targets)
        assert adopted == 8
        loss = client_loss_counters(c.testbed.client.netns)
        assert_curl_client_clean({k: loss[k] - loss0[k] for k in loss})


@pytest.mark.fullkernel
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_kernel_tls_targets(version: str, tmp_path: Path) -> None:
    """Where the kernel has TLS (the full-kernel lane), targets with the
    default `xo_tls kernel` install the session as kernel TLS and serve
    through it (sendfile included); the front takes it back the same way.
    Each target namespace's tls_stat counts one software kernel-TLS socket
    each way per adopted connection; curl sees one connection, one
    handshake, every body intact."""
    from xo import core

    # The kernel loads its tls module at the first use; in the emulated lane
    # that outlasts a handoff's wait for TARGET_READY. Probing loads it.
    available, why = core.tls_kernel_available()
    assert available, why
    build = next(b for b in BUILDS if b.available() is None)
    with nginx_cluster(build) as c:
        digests, cert, key = files_and_cert(c)
        c.start_all(front_http=front_tls_server(c, cert, key))
        # A first session warms the emulated lane up (first restores, first
        # map updates): there a first handoff can outlast the 2 s the front
        # waits for TARGET_READY, and it rolls back (correctly).
        curl_tls(c, cert, version, ["/one.bin", "/here.txt"], tmp_path / "warm")
        members = ["host", *(t.name for t in c.testbed.targets)]
        ktls0 = {m: ktls_counters(c.testbed.member(m).netns) for m in members}
        adopted0 = sum(stats(c, t.name)["adopted"] for t in c.testbed.targets)
        paths = ["/one.bin", "/1m.bin", "/16m.bin", "/one.bin", "/1m.bin", "/here.txt"]
        rows, trace = curl_tls(c, cert, version, paths, tmp_path / "run")
        front_log = [line for line in c.procs["host"].log_text().splitlines() if "xo" in line]
        for i, (path, (status, by, digest)) in enumerate(zip(paths[:-1], rows, strict=False)):
            assert digest == digests[path[1:]], path
            # The emulated lane is slow enough that curl's first request can
            # come before it acknowledged the server's session tickets (TLS
            # 1.3): a session moves only with empty queues, so the front
            # serves that one itself (1 run in 12 here, and once in CI).
            if i == 0 and by == "host" and any("moves with empty queu" in line
                                               for line in front_log):
                continue
            assert status == "200" and by in ("t0", "t1"), (path, status, by, front_log[-8:])
        assert rows[-1][:2] == ("200", "host")
        assert handshakes(trace) == 1, trace
        handed = sum(by in ("t0", "t1") for _, by, _ in rows[:-1])
        adopted = sum(stats(c, t.name)["adopted"] for t in c.testbed.targets) - adopted0
        ktls = {m: ktls_counters(c.testbed.member(m).netns) - ktls0[m] for m in members}
        assert adopted >= handed, (adopted, rows)
        tx = sum(ktls[t.name]["TlsTxSw"] for t in c.testbed.targets)
        rx = sum(ktls[t.name]["TlsRxSw"] for t in c.testbed.targets)
        # One install each way per adopted connection; a target that restored
        # a session after the front stopped waiting for it (the warm-up's, in
        # the emulated lane, may land after the counters above were read)
        # installed one for a handoff the front rolled back.
        rolled_back = stats(c, "host")["rollbacks"]
        if not (adopted <= tx <= adopted + rolled_back and rx == tx):
            logs = "\n".join(line for t in c.testbed.targets
                             for line in c.procs[t.name].log_text().splitlines()
                             if " xo: " in line and "control connection" not in line)
            pytest.fail(f"kernel TLS sockets on the targets: {tx} tx, {rx} rx; adopted "
                        f"{adopted}, front rollbacks {rolled_back}\n{ktls}\n"
                        f"{ {t.name: stats(c, t.name) for t in c.testbed.targets} }\n{logs}")
        assert all(ktls[m]["TlsDecryptError"] == 0 for m in members), ktls
