"""The `xo` command as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from xo.lab import netns_exists

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
XO = [sys.executable, "-m", "xo.cli"]


def test_doctor_json_reports_every_feature() -> None:
    out = subprocess.run([*XO, "doctor", "--json"], capture_output=True, text=True, timeout=60)
    checks = {c["name"]: c for c in json.loads(out.stdout)}
    assert {"TCP_REPAIR", "BPF", "bpffs", "clsact + cls_bpf", "XDP", "kernel TLS",
            "tc-flower + pedit/csum/mirred"} <= set(checks)
    assert checks["TCP_REPAIR"]["ok"] and checks["BPF"]["ok"]
    for check in checks.values():
        if not check["ok"]:  # a missing feature says what it disables and what to do
            assert check["disables"] and check["remedy"], check
    assert out.returncode == 0
    # Its scratch namespace for the tc probes is gone again.
    assert not [n for n in os.listdir("/run/netns") if n.startswith("xo-doctor-")]


def test_sigterm_during_demo_tears_everything_down(tmp_path: Path) -> None:
    proc = subprocess.Popen([*XO, "lab", "demo", "--requests", "2000"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    # Wait until the demo's host process is up, then interrupt it.
    while not Path("/run/xo/bpf/demo-host").exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "demo did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert not any(netns_exists(f"xo-demo-{m}") for m in ("client", "host", "br", "t0", "t1"))
    assert not list(Path("/run/xo/bpf").glob("demo-*"))
    leftover = subprocess.run(["pgrep", "-f", "xo.refapp .* --lab demo "], capture_output=True)
    assert leftover.returncode == 1, leftover.stdout
