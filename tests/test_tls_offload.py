"""TLS connections handed off by the reference app (xo.tls): the host
terminates TLS (Python ssl, memory BIOs), hands the session's record state
off with the TCP state, the target continues the session with the core's
record layer (this kernel has no TLS) and hands it back the same way.

Real clients (curl with TLS 1.2 and 1.3, Python ssl) in the lab's client
namespace: bodies checked by hash, several handoffs on one TLS connection,
the client's loss and reset counters unchanged. A target that takes no TLS
sessions refuses, the host rolls back and serves. A capture of the control
traffic during TLS handoffs holds neither the session's keys nor the
request plaintext."""

from __future__ import annotations

import datetime
import http.client
import os
import secrets
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from handoff_tools import client_socket, curl_many, docroot_digests, lab_name
from netns_tools import client_loss_counters, ktls_counters, sha256, wait_for
from pcap_tools import control_frames, tcp_streams
from xo import core
from xo.core import MsgType
from xo.demo import RefAppCluster, cluster
from xo.proto import DEFAULT_CONTROL_PORT
from xo.refapp import HTTPS_PORT
from xo.tls import CIPHERS

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

SERVER_NAME = "xo-host.test"
PATHS = ["/small.bin", "/medium.bin", "/small.bin", "/large.bin", "/small.bin", "/medium.bin"]


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    return make_cert(tmp_path)


def make_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for SERVER_NAME."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    crt = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
           .public_key(key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now - datetime.timedelta(days=1))
           .not_valid_after(now + datetime.timedelta(days=1))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), False)
           .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
           .sign(key, hashes.SHA256()))
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certfile.write_bytes(crt.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    keyfile.chmod(0o600)
    return certfile, keyfile


@pytest.fixture
def tls_cluster(cert: tuple[Path, Path], request: pytest.FixtureRequest) -> Iterator[RefAppCluster]:
    extra = getattr(request, "param", {})
    with cluster(targets=2, name=lab_name("tls"), tls_cert=str(cert[0]), tls_key=str(cert[1]),
                 **extra) as apps:
        yield apps


def _curl_args(apps: RefAppCluster, certfile: Path, version: str) -> tuple[str, ...]:
    return ("--cacert", str(certfile), "--resolve",
            f"{SERVER_NAME}:{HTTPS_PORT}:{apps.testbed.host.ipv4}",
            f"--tlsv{version}", "--tls-max", version)


def curl_session_on_targets(apps: RefAppCluster, certfile: Path, version: str,
                            tmp_path: Path) -> None:
    """PATHS on one curl TLS connection, then the host's /_xo/stats: every
    body by hash, every file from a target, one TCP and TLS connection.
    The last request is the host's own: curl's close_notify and FIN then
    reach the host with no transfer under way. (Client data and a FIN
    arriving while a target hands the connection back can cost the client
    one retransmission today: the TCP handoff path's business, with or
    without TLS.)"""
    digests = docroot_digests(apps)
    rows = curl_many(apps.testbed, f"https://{SERVER_NAME}:{HTTPS_PORT}",
                     [*PATHS, "/_xo/stats"], tmp_path / "out",
                     curl_args=_curl_args(apps, certfile, version))
    for path, row in zip(PATHS, rows, strict=False):
        body = Path(row["file"]).read_bytes()
        assert row["status"] == "200" and sha256(body) == digests[path[1:]], row
        assert row["served_by"] in ("t0", "t1"), (row, apps.host_stats())
    assert rows[-1]["status"] == "200" and rows[-1]["served_by"] == "host", rows[-1]
    assert sum(int(r["connects"]) for r in rows) == 1


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_curl_tls_session_handed_off_and_back(tls_cluster: RefAppCluster,
                                              cert: tuple[Path, Path], version: str,
                                              tmp_path: Path) -> None:
    apps = tls_cluster
    before = apps.host_stats()
    loss_before = client_loss_counters(apps.testbed.client.netns)
    curl_session_on_targets(apps, cert[0], version, tmp_path)
    after = apps.host_stats(settled=True)
    assert after["offloads"] - before["offloads"] >= len(PATHS)
    assert after["returns"] - before["returns"] >= len(PATHS) - 1
    assert after["rollbacks"] == before["rollbacks"]
    assert client_loss_counters(apps.testbed.client.netns) == loss_before


class _Client(http.client.HTTPSConnection):
    """Python's ssl over a socket in the client namespace; keys logged so the
    test knows them."""

    def __init__(self, apps: RefAppCluster, ctx: ssl.SSLContext) -> None:
        super().__init__(SERVER_NAME, HTTPS_PORT, context=ctx, timeout=30)
        self.apps = apps
        self.connects = 0

    def connect(self) -> None:
        self.connects += 1
        sock = client_socket(self.apps.testbed)
        sock.settimeout(self.timeout)
        sock.connect((self.apps.testbed.host.ipv4, HTTPS_PORT))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._context.wrap_socket(sock, server_hostname=SERVER_NAME)  # type: ignore[attr-defined]


def _client_keys(keylog: Path, cipher: str, version: str,
                 server_random: bytes) -> tuple[list[bytes], core.TlsState]:
    """The session's secrets and traffic keys as the client knows them (its
    key log; TLS 1.2 also needs the server's random from the ServerHello)."""
    entries = {}
    for line in keylog.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            entries[parts[0]] = (bytes.fromhex(parts[1]), bytes.fromhex(parts[2]))
    found: list[bytes] = []
    if version == "TLSv1.3":
        cs, ss = entries["CLIENT_TRAFFIC_SECRET_0"][1], entries["SERVER_TRAFFIC_SECRET_0"][1]
        state = core.tls13_state(CIPHERS[cipher], cs, ss, False, 0, 0)
        found += [cs, ss]
    else:
        client_random, master = entries["CLIENT_RANDOM"]
        state = core.tls12_state(CIPHERS[cipher], master, client_random, server_random, False,
                                 1, 1)
        found.append(master)
    for d in (state.tx, state.rx):
        assert d is not None
        found += [d.key, d.iv + d.salt if d.salt else d.iv]
    return found, state


def _first_request(state: core.TlsState, from_client: bytes) -> bytes:
    """The client's first application record in the capture, opened with the
    keys derived from its key log: proof those keys are the session's."""
    off = 0
    while off + 5 <= len(from_client):
        size = 5 + int.from_bytes(from_client[off + 3:off + 5], "big")
        record = from_client[off:off + size]
        off += size
        if record[0] != 23:
            continue
        # Opened as the server would: its receive side is the client's send side.
        layer = core.TlsRecordLayer(core.TlsState(state.version, state.cipher, state.rx,
                                                  state.tx))
        try:
            _, rec = layer.open(record)
        except core.XoError:
            continue  # TLS 1.3: a handshake record under the handshake keys
        if rec is not None:
            return rec.data
    raise AssertionError("no client record opens with the derived keys")


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_python_ssl_client_handoffs_and_control_capture(tls_cluster: RefAppCluster,
                                                        cert: tuple[Path, Path], version: str,
                                                        tmp_path: Path) -> None:
    """Several handoffs on one TLS connection (GETs and a PUT), while
    tcpdump records the host's interface: the control streams carry every
    handoff, yet neither the session's secrets and keys nor any request
    plaintext."""
    apps = tls_cluster
    digests = docroot_digests(apps)
    keylog = tmp_path / "client.keylog"
    ctx = ssl.create_default_context(cafile=str(cert[0]))
    ctx.keylog_filename = str(keylog)
    ctx.minimum_version = ctx.maximum_version = (
        ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2)
    pcap = tmp_path / "host.pcap"
    markers = [secrets.token_hex(16) for _ in range(8)]
    upload = os.urandom(200_000)
    before = apps.host_stats()
    loss_before = client_loss_counters(apps.testbed.client.netns)
    dump = apps.testbed.popen("host", [
        "tcpdump", "-i", apps.testbed.host.ifname, "-s", "0", "-B", "65536", "-U",
        "--immediate-mode", "-n",
        "-w", str(pcap), f"tcp port {DEFAULT_CONTROL_PORT} or tcp port {HTTPS_PORT}",
    ], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert dump.stderr is not None
        line = dump.stderr.readline()
        assert "listening on" in line, line
        conn = _Client(apps, ctx)
        served = []
        for marker in markers:
            conn.request("GET", "/small.bin", headers={"X-Secret": marker})
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200 and sha256(body) == digests["small.bin"]
            served.append(resp.getheader("X-Served-By", ""))
        # The client's counters over the GETs. (An upload still arriving
        # while its connection moves makes the client resend today, with or
        # without TLS: that is the TCP path's business, not this test's.)
        loss_after_gets = client_loss_counters(apps.testbed.client.netns)
        conn.request("PUT", "/upload", body=upload, headers={"X-Secret": markers[0]})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 201
        assert resp.getheader("X-Body-SHA256") == sha256(upload)
        assert conn.sock is not None
        cipher, version, _ = conn.sock.cipher()  # type: ignore[attr-defined]
        assert conn.connects == 1
        conn.close()
        wait_for(lambda: apps.host_stats()["returns"] - before["returns"] >= len(markers),
                 "the connection handed back after each response")
    finally:
        dump.stop()
    after = apps.host_stats()
    assert set(served) == {"t0", "t1"}, served  # every GET on a target
    assert after["offloads"] - before["offloads"] >= len(markers)
    assert loss_after_gets == loss_before
    assert client_loss_counters(apps.testbed.client.netns)["TcpOutRsts"] == 0

    streams = tcp_streams(pcap, DEFAULT_CONTROL_PORT)
    from_server = [data for flow, data in streams.items() if flow[1] == HTTPS_PORT]
    assert from_server and from_server[0][:1] == b"\x16" and from_server[0][5:6] == b"\x02"
    keys, state = _client_keys(keylog, cipher, version, from_server[0][11:43])
    from_client = [data for flow, data in streams.items() if flow[3] == HTTPS_PORT]
    assert _first_request(state, from_client[0]).startswith(b"GET /small.bin")
    control = {flow: data for flow, data in streams.items()
               if DEFAULT_CONTROL_PORT in (flow[1], flow[3])}
    tls_conn = [data for flow, data in streams.items() if HTTPS_PORT in (flow[1], flow[3])]
    assert control and tls_conn
    types: dict[int, int] = {}
    for data in control.values():
        for secret in keys:
            assert secret not in data
        for marker in markers:
            assert marker.encode() not in data
        assert b"GET /small.bin" not in data and b"X-Secret" not in data
        assert b"XOST" not in data  # the state codec's magic: states travel encrypted
        for frame in control_frames(data):
            types[frame.type] = types.get(frame.type, 0) + 1
    for data in tls_conn:  # the client's own connection is encrypted too
        assert all(m.encode() not in data for m in markers)
    assert types.get(MsgType.BEGIN_OFFLOAD, 0) >= len(markers), types
    assert types.get(MsgType.TARGET_DONE, 0) >= len(markers), types


REFUSING = {
    # configured to hold no session keys
    "no_tls": ({"no_tls": ("t0", "t1")}, "takes no TLS sessions"),
    # the C driver serves plaintext on the socket: TLS only through kernel TLS
    "c_driver": ({"drivers": {"host": "py", "t0": "c", "t1": "c"}}, "only with kernel TLS"),
}


@pytest.mark.parametrize("tls_cluster,why", list(REFUSING.values()), ids=list(REFUSING),
                         indirect=["tls_cluster"])
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_target_without_tls_refuses_and_host_serves(tls_cluster: RefAppCluster,
                                                    cert: tuple[Path, Path], version: str,
                                                    why: str, tmp_path: Path) -> None:
    """Targets that cannot hold the session (no_tls; the C driver, which has
    no record layer, on a kernel without TLS) refuse the handoff; the host
    rolls back and serves every request itself over the same session."""
    apps = tls_cluster
    digests = docroot_digests(apps)
    before = apps.host_stats()
    loss_before = client_loss_counters(apps.testbed.client.netns)
    paths = PATHS[:4]
    rows = curl_many(apps.testbed, f"https://{SERVER_NAME}:{HTTPS_PORT}", paths,
                     tmp_path / "out", curl_args=_curl_args(apps, cert[0], version))
    for path, row in zip(paths, rows, strict=True):
        body = Path(row["file"]).read_bytes()
        assert row["status"] == "200" and sha256(body) == digests[path[1:]], row
        assert row["served_by"] == "host", row
    assert sum(int(r["connects"]) for r in rows) == 1
    after = apps.host_stats()
    assert after["rollbacks"] - before["rollbacks"] >= len(paths)
    assert after["offloads"] == before["offloads"]
    assert after["served_locally"] - before["served_locally"] == len(paths)
    assert client_loss_counters(apps.testbed.client.netns) == loss_before
    assert why in apps.log_path("host").read_text()



BAD_STATES = {
    "unknown cipher": core.TlsState(core.TLS_1_3, 99, core.TlsDir(b"k" * 16, b"i" * 8,
                                                                   b"s" * 4, 0), None),
    "sequence at the end": core.TlsState(core.TLS_1_3, core.TLS_AES_GCM_128,
                                         core.TlsDir(b"k" * 16, b"i" * 8, b"s" * 4, 2**64 - 1),
                                         core.TlsDir(b"k" * 16, b"i" * 8, b"s" * 4, 0)),
    "salt on ChaCha20": core.TlsState(core.TLS_1_2, core.TLS_CHACHA20_POLY1305,
                                      core.TlsDir(b"k" * 32, b"i" * 12, b"s" * 4, 1),
                                      core.TlsDir(b"k" * 32, b"i" * 12, b"", 1)),
}


def test_target_with_another_cluster_key_gets_no_session(cert: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    """A target whose cluster key is not the host's (a wrong key file).
    Configured so from the start, the host refuses to start and says why.
    Restarted so later, its control connection never authenticates again,
    so no TLS session (nor its keys) reaches it: the other target serves
    every request handed off, and the client's session goes on undisturbed."""
    with pytest.raises(RuntimeError, match="HELLO does not verify"):
        with cluster(targets=2, name=lab_name("fk"), tls_cert=str(cert[0]),
                     tls_key=str(cert[1]), foreign_key=("t1",)):
            pass
    with cluster(targets=2, name=lab_name("fk"), tls_cert=str(cert[0]),
                 tls_key=str(cert[1])) as apps:
        apps.stop_member("t1")
        apps.foreign_key = ("t1",)
        apps.start_member("t1")
        loss_before = client_loss_counters(apps.testbed.client.netns)
        digests = docroot_digests(apps)
        rows = curl_many(apps.testbed, f"https://{SERVER_NAME}:{HTTPS_PORT}",
                         [*PATHS, "/_xo/stats"], tmp_path / "out",
                         curl_args=_curl_args(apps, cert[0], "1.3"))
        for path, row in zip(PATHS, rows, strict=False):
            body = Path(row["file"]).read_bytes()
            assert row["status"] == "200" and sha256(body) == digests[path[1:]], row
            assert row["served_by"] == "t0", row
        assert sum(int(r["connects"]) for r in rows) == 1
        stats = apps.host_stats(settled=True)
        assert stats["offloads"] >= len(PATHS) and stats["rollbacks"] == 0, stats
        assert " served " not in apps.log_path("t1").read_text()
        loss = client_loss_counters(apps.testbed.client.netns)
        assert loss == loss_before, (loss_before, loss)


@pytest.mark.parametrize("what", list(BAD_STATES))
def test_malformed_tls_state_refused_before_anything(what: str, tmp_path: Path) -> None:
    """xo_proto_offload_tls with a malformed TLS state: a clear error, and
    the connection was not touched (not frozen, still carrying bytes both
    ways), no rule inserted, no handoff started."""
    from xo.proto import Machine, Role
    from xo.steer import RuleManager, Steer

    steer = Steer(pin_dir=str(tmp_path / "pins"))
    try:
        with RuleManager(steer, 1, "none") as rules:
            machine = Machine(Role.HOST, secrets.token_bytes(32), rules, steer, 7)
            try:
                with socket.create_server(("127.0.0.1", 0)) as listener:
                    client = socket.create_connection(listener.getsockname())
                    server, _ = listener.accept()
                    with client, server:
                        with pytest.raises(core.XoError) as err:
                            machine.offload(1, server.fileno(), b"GET / HTTP/1.1\r\n\r\n",
                                            BAD_STATES[what])
                        assert err.value.code == core.lib.XO_E_FIELD, err.value
                        assert "offload: TLS: " in str(err.value), err.value
                        client.sendall(b"ping")
                        assert server.recv(4) == b"ping"
                        server.sendall(b"pong")
                        assert client.recv(4) == b"pong"
                assert steer.count() == 0
                assert machine.stats()["active"] == 0
            finally:
                machine.destroy()
    finally:
        steer.close(unpin=True)
        if os.path.ismount(tmp_path / "pins"):
            subprocess.run(["umount", "-l", str(tmp_path / "pins")], check=False)


# The lane emulates its CPUs (TCG, tens of times slower): a handoff there can
# outlast the default 2 s wait for TARGET_READY, and the host would roll back
# (correctly) and serve the request itself.
LANE_TIMEOUTS = {"timeouts": {"ready": 10.0}}


@pytest.mark.fullkernel
@pytest.mark.parametrize("tls_cluster", [LANE_TIMEOUTS], indirect=True, ids=["lane"])
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_curl_tls_session_continues_in_kernel_tls(tls_cluster: RefAppCluster,
                                                 cert: tuple[Path, Path], version: str,
                                                 tmp_path: Path) -> None:
    """The same keep-alive TLS session where the kernel has TLS (the full-kernel
    lane): each target restores the session into kernel TLS and serves the
    file through it, reads the client's next request through it before it
    hands back (a kernel-TLS socket moves with nothing queued), and the host
    takes the session back into kernel TLS too. Each namespace's tls_stat
    counts one kernel-TLS socket each way per connection it restored. curl
    sees one connection and one handshake, every body intact, no reset.
    (Under emulation a handoff outlasts the client's retransmission timer,
    so resends are not judged here; tests on the host's own kernel do.)"""
    apps = tls_cluster
    # The kernel loads its tls module at the first use; in the emulated lane
    # that takes longer than a handoff may (the first one would roll back).
    # Probing loads it, as a machine that already serves TLS would have it.
    available, why = core.tls_kernel_available()
    assert available, why
    members = ("host", "t0", "t1")
    before = apps.host_stats()
    ktls_before = {m: ktls_counters(apps.testbed.member(m).netns) for m in members}
    loss_before = client_loss_counters(apps.testbed.client.netns)
    curl_session_on_targets(apps, cert[0], version, tmp_path)
    after = apps.host_stats(settled=True)
    offloads = after["offloads"] - before["offloads"]
    returns = after["returns"] - before["returns"]
    assert offloads >= len(PATHS) and returns >= len(PATHS) - 1, after
    assert after["rollbacks"] == before["rollbacks"]
    ktls = {m: ktls_counters(apps.testbed.member(m).netns) - ktls_before[m] for m in members}
    restored_on_targets = sum(ktls[t]["TlsTxSw"] for t in ("t0", "t1"))
    assert restored_on_targets == offloads, ktls
    assert sum(ktls[t]["TlsRxSw"] for t in ("t0", "t1")) == offloads, ktls
    assert ktls["host"]["TlsTxSw"] == returns and ktls["host"]["TlsRxSw"] == returns, ktls
    assert all(ktls[m]["TlsDecryptError"] == 0 for m in members), ktls
    loss = client_loss_counters(apps.testbed.client.netns)
    for counter in ("TcpOutRsts", "TcpEstabResets"):
        assert loss[counter] == loss_before[counter], (loss_before, loss)
