"""The `xo` command as a user runs it."""

from __future__ import annotations

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
