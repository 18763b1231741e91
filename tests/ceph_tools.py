"""Helpers for the Ceph tests: a real cluster (``xo.ceph.cluster``) on a lab,
boto3 clients whose sockets live in the lab's client namespace, and checks
that nothing is left behind."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xo import lab as xolab
from xo.ceph import cluster
from xo.ceph.procs import start_ticks
from xo.ceph.s3client import s3_client


def make_ca_and_cert(dirpath: Path, ip: str) -> tuple[Path, Path, Path]:
    """A test CA and a certificate it signed for ip (subjectAltName IP, so a
    client verifying against the CA accepts https://ip:port): (ca.pem,
    front.pem, front.key). P-256 keys."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    dirpath.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "xo-ceph-test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(
                ipaddress.ip_address(ip))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = dirpath / "ca.pem", dirpath / "front.pem", dirpath / "front.key"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return paths


def front_stats(state: cluster.ClusterState, settled: bool = True) -> dict[str, Any]:
    """The front's counters; settled: after its next rewrite (every 0.5 s), so
    they include every request already answered."""
    if settled:
        time.sleep(1.1)
    return dict(json.loads((state.path / "front-stats.json").read_text()))


def interface_bytes(netns: str, ifname: str) -> dict[str, int]:
    """tx/rx bytes of an interface in a namespace (the kernel's link counters)."""
    out = subprocess.run(["ip", "-n", netns, "-j", "-s", "link", "show", "dev", ifname],
                         capture_output=True, text=True, check=True).stdout
    stats = json.loads(out)[0]["stats64"]
    return {"tx": int(stats["tx"]["bytes"]), "rx": int(stats["rx"]["bytes"])}


def served_lines(state: cluster.ClusterState, osd: int) -> list[str]:
    path = state.log(f"agent.{osd}")
    if not path.exists():
        return []
    return [line for line in path.read_text(errors="replace").splitlines()
            if " served " in line]


def leftovers(state: cluster.ClusterState) -> list[str]:
    """Processes, pin directories and bpffs mounts of this cluster still present."""
    found = [f"process {p.name} (pid {p.pid})" for p in state.procs
             if start_ticks(p.pid) == p.ticks]
    found += [f"pin dir {d}" for d in state.pin_dirs if Path(d).exists()]
    mounts = Path("/proc/mounts").read_text()
    found += [f"mount {d}" for d in state.pin_dirs if f" {d} " in mounts]
    return found


@dataclass
class LabCluster:
    testbed: xolab.Lab
    state: cluster.ClusterState
    ca: Path | None = None  # the CA that signed the front's HTTPS certificate

    @property
    def client_ns(self) -> str:
        return self.testbed.client.netns

    def client(self, user: str | None = "xo", **kw: Any) -> Any:
        return s3_client(self.state.front_endpoint,
                         self.state.users[user] if user else None, **kw)

    def tls_client(self, user: str | None = "xo", **kw: Any) -> Any:
        """A client of the front's HTTPS endpoint, verifying its certificate."""
        assert self.state.front_tls_endpoint is not None and self.ca is not None
        return s3_client(self.state.front_tls_endpoint,
                         self.state.users[user] if user else None, verify=str(self.ca), **kw)

    def stock(self, user: str | None = "xo", **kw: Any) -> Any:
        """A client of the stock radosgw on the same host (the comparison)."""
        return s3_client(self.state.rgw_endpoint(0),
                         self.state.users[user] if user else None, **kw)


@contextlib.contextmanager
def lab_cluster(name: str, workdir: Path, osds: int = 3,
                threshold: int = 1 << 20, tls: bool = False) -> Iterator[LabCluster]:
    """A lab with one target host per OSD and a cluster with XO on it; both
    gone afterwards, checked. tls: the front serves HTTPS too, with a
    certificate for its address from a test CA (LabCluster.ca)."""
    with xolab.lab(name, targets=osds) as testbed:
        state = None
        ca = cert = key = None
        if tls:
            ca, cert, key = make_ca_and_cert(workdir.parent / "tls", testbed.host.ipv4)
        try:
            state = cluster.vstart(workdir, osds=osds, layout="lab", lab=name, xo=True,
                                   threshold=threshold, tls_cert=cert or "",
                                   tls_key=key or "")
            yield LabCluster(testbed, state, ca)
        finally:
            if (workdir / cluster.STATE_FILE).exists():
                cluster.stop(workdir)
                state = cluster.ClusterState.load(workdir)
                left = leftovers(state)
                assert not left, f"left behind: {left}"


def wipe(workdir: Path) -> None:
    if workdir.exists():
        shutil.rmtree(workdir, ignore_errors=True)


def rand(n: int) -> bytes:
    return os.urandom(n)
