"""The `xo` command as a user runs it."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from xo import lab as xolab
from xo.lab import netns_exists

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
XO = [sys.executable, "-m", "xo.cli"]


def descendants(pid: int) -> dict[int, tuple[int, str]]:
    """Every live descendant of pid: PID -> (start time, command line)."""
    parent_of: dict[int, int] = {}
    info: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        parent_of[int(entry)] = int(fields[1])
        info[int(entry)] = (int(fields[19]), cmdline.replace(b"\0", b" ").decode())
    out: dict[int, tuple[int, str]] = {}
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parent_of.items():
            if parent == p and child not in out:
                out[child] = info[child]
                frontier.append(child)
    return out


def still_running(pid: int, started: int) -> bool:
    """The very process (not a reuse of its PID) is still there."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return int(stat[stat.rindex(")") + 2:].split()[19]) == started


def test_sigterm_during_demo_tears_everything_down(tmp_path: Path) -> None:
    name = "x" + secrets.token_hex(3)  # this run's own lab: never an operator's demo
    members = ("client", "host", "br", "t0", "t1")
    proc = subprocess.Popen([*XO, "lab", "demo", "--name", name, "--requests", "2000"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    started: dict[int, tuple[int, str]] = {}
    try:
        deadline = time.monotonic() + 60  # only turns a hang into a failure
        # Wait until the demo's host and both targets run, then interrupt it.
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            # Our demo's own processes: descendants of the PID we started.
            apps = {p: v for p, v in descendants(proc.pid).items() if "xo.refapp" in v[1]}
            if len(apps) >= 3 and Path(f"/run/xo/bpf/{name}-host").exists():
                break
            assert time.monotonic() < deadline, "demo did not start"
            time.sleep(0.05)
        started = descendants(proc.pid)  # everything the demo started, by PID
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert not any(netns_exists(f"xo-{name}-{m}") for m in members)
        assert not list(Path("/run/xo/bpf").glob(f"{name}-*"))
        leftover = [(p, v[1]) for p, v in started.items() if still_running(p, v[0])]
        assert not leftover
    finally:  # on a failure: stop what this test started (by PID) and remove its lab
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid, (start, _) in started.items():
            if still_running(pid, start):
                os.kill(pid, signal.SIGKILL)
        xolab.down(name)
