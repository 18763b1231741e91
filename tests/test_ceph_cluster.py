"""`xo ceph vstart|status|stop` on loopback: a real Ceph cluster from Debian's
packages, boto3 against its stock radosgw, and bad input refused before any
change. (The lab layout with the XO front and agents: test_ceph_xo.py.)"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from ceph_tools import leftovers, rand, s3_client
from xo.ceph import cluster

XO = [sys.executable, "-m", "xo.cli"]


def xo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*XO, *args], capture_output=True, text=True, timeout=timeout)


def test_vstart_loopback_stock_rgw_then_stop(tmp_path: Path) -> None:
    workdir = tmp_path / "ceph"
    res = xo("ceph", "vstart", "--dir", str(workdir), "--osds", "3", "--json")
    try:
        assert res.returncode == 0, res.stderr
        st = json.loads(res.stdout)
        assert st["layout"] == "loopback"
        assert {n for n, p in st["processes"].items() if p["alive"]} == {
            "mon.a", "mgr.x", "osd.0", "osd.1", "osd.2", "rgw.front"}
        assert st["ceph"]["osdmap"]["num_up_osds"] == 3
        creds = json.loads((workdir / "s3-credentials.json").read_text())
        assert (workdir / "s3-credentials.json").stat().st_mode & 0o077 == 0
        state = cluster.ClusterState.load(workdir)
        s3 = s3_client(state.rgw_endpoint(0), state.users["xo"])
        assert creds["xo"]["access_key"] == state.users["xo"].access_key
        s3.create_bucket(Bucket="stock")
        s3.create_bucket(Bucket="stock-ec",
                         CreateBucketConfiguration={"LocationConstraint": ":ec-placement"})
        for bucket in ("stock", "stock-ec"):
            for size in (4096, 1 << 20):
                body = rand(size)
                s3.put_object(Bucket=bucket, Key=f"k{size}", Body=body)
                got = s3.get_object(Bucket=bucket, Key=f"k{size}")["Body"].read()
                assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest()
        status = xo("ceph", "status", "--dir", str(workdir), "--json")
        assert status.returncode == 0, status.stderr
    finally:
        stop = xo("ceph", "stop", "--dir", str(workdir))
    assert stop.returncode == 0, stop.stderr
    assert not leftovers(cluster.ClusterState.load(workdir))
    after = xo("ceph", "status", "--dir", str(workdir), "--json")
    assert after.returncode == 1  # processes listed, none alive
    assert not any(p["alive"] for p in json.loads(after.stdout)["processes"].values())
    assert xo("ceph", "stop", "--dir", str(workdir)).returncode == 0  # idempotent


def test_bad_input_changes_nothing(tmp_path: Path) -> None:
    workdir = tmp_path / "never"
    cases = [
        (["--osds", "0"], "0 OSDs"),
        (["--xo"], "lab layout"),
        (["--lab", "nosuch1"], "lab 'nosuch1' not found"),
        (["--objectstore", "filestore"], "invalid choice"),
    ]
    for args, message in cases:
        res = xo("ceph", "vstart", "--dir", str(workdir), *args)
        assert res.returncode != 0, args
        assert message in res.stderr, (args, res.stderr)
        assert not workdir.exists(), args
    res = xo("ceph", "status", "--dir", str(workdir))
    assert res.returncode == 1 and "no cluster in" in res.stderr
