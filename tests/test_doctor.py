"""``xo doctor`` over the C core's probes (xo_core/src/probe.c).

Run as root, every probe gives an answer with its reason; run with
capabilities taken away (setpriv, a real privilege drop, not a mock), the
probes that cannot run their test say "unknown" and why, never "ok".
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from typing import Any

import pytest
from xo._xo_cffi import ffi, lib

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
XO = [sys.executable, "-m", "xo.cli"]
NAMES = ["TCP_REPAIR", "BPF", "bpffs", "clsact + cls_bpf", "XDP", "kernel TLS",
         "tc-flower + pedit/csum/mirred"]
NETNS_PROBES = ("clsact + cls_bpf", "XDP", "tc-flower + pedit/csum/mirred")


def doctor(*prefix: str) -> tuple[int, dict[str, dict[str, Any]]]:
    out = subprocess.run([*prefix, *XO, "doctor", "--json"], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout, out.stderr
    checks = json.loads(out.stdout)
    assert [c["name"] for c in checks] == NAMES
    for c in checks:
        assert c["status"] in ("ok", "missing", "unknown"), c
        assert c["ok"] == (c["status"] == "ok"), c
        assert c["detail"], c
        if c["status"] == "ok":
            assert not c["disables"] and not c["remedy"], c
        else:  # what it disables and what to do
            assert c["disables"] and c["remedy"], c
    return out.returncode, {c["name"]: c for c in checks}


def links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                         check=True)
    return {line.split(":")[1].strip().split("@")[0] for line in out.stdout.splitlines()}


def test_doctor_as_root_answers_every_probe_and_leaves_nothing() -> None:
    netns_before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    rc, checks = doctor()
    assert rc == 0
    assert checks["TCP_REPAIR"]["status"] == "ok"
    assert checks["BPF"]["status"] == "ok"
    # As root nothing stops the probes from running: no "unknown".
    assert not [c for c in checks.values() if c["status"] == "unknown"], checks
    # The probes' namespaces are unnamed and their veths die with them.
    assert not [n for n in links() if n.startswith("xo-pr")]
    netns_after = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    assert not [n for n in netns_after - netns_before if "doctor" in n or "-pr" in n]


def test_ktls_probe_agrees_with_the_kernel() -> None:
    """The same setsockopt from Python is the oracle."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    try:
        client.setsockopt(socket.IPPROTO_TCP, 31, b"tls")  # TCP_ULP
        expected = "ok"
    except OSError as exc:
        assert exc.errno in (errno.ENOENT, errno.EOPNOTSUPP), exc
        expected = "missing"
    finally:
        for s in (client, server, listener):
            s.close()
    res = ffi.new("struct xo_probe_result *")
    assert lib.xo_probe_run(lib.XO_PROBE_KTLS, res) == 0
    assert (res.status, ffi.string(res.name).decode()) == (
        {"ok": lib.XO_PROBE_OK, "missing": lib.XO_PROBE_MISSING}[expected], "kernel TLS")


def test_bpffs_probe_agrees_with_the_mount_table() -> None:
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f if line.split()[2] == "bpf"]
    res = ffi.new("struct xo_probe_result *")
    assert lib.xo_probe_run(lib.XO_PROBE_BPFFS, res) == 0
    detail = ffi.string(res.detail).decode()
    if points:
        assert res.status == lib.XO_PROBE_OK
        assert points[0] in detail
    else:
        assert res.status == lib.XO_PROBE_MISSING


def test_unknown_probe_id_is_an_error() -> None:
    res = ffi.new("struct xo_probe_result *")
    assert lib.xo_probe_run(lib.XO_PROBE_COUNT, res) == lib.XO_E_INVAL
    assert b"unknown" in ffi.string(lib.xo_last_error())


def test_without_capabilities_nothing_is_a_false_ok() -> None:
    # An empty bounding set: root's exec gets no capabilities at all.
    rc, checks = doctor("setpriv", "--bounding-set=-all", "--")
    assert rc == 1  # handoffs impossible
    assert checks["TCP_REPAIR"]["status"] == "missing"
    assert "CAP_NET_ADMIN" in checks["TCP_REPAIR"]["detail"] + checks["TCP_REPAIR"]["remedy"]
    assert checks["BPF"]["status"] == "missing"
    for name in NETNS_PROBES:
        assert checks[name]["status"] == "unknown", checks[name]
        assert "Operation not permitted" in checks[name]["detail"], checks[name]


def test_namespace_but_no_network_admin_is_unknown_not_missing() -> None:
    # CAP_SYS_ADMIN (private netns) and CAP_BPF (load), but no CAP_NET_ADMIN:
    # the probes build their test bed, then cannot attach. That says nothing
    # about the kernel: unknown.
    rc, checks = doctor("setpriv", "--bounding-set=-all,+sys_admin,+bpf", "--")
    assert rc == 1
    assert checks["BPF"]["status"] == "ok"
    for name in NETNS_PROBES:
        assert checks[name]["status"] == "unknown", checks[name]
        assert "not permitted" in checks[name]["detail"], checks[name]
