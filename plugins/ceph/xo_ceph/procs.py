"""Processes the Ceph plugin starts and stops: each one recorded with its PID
and its kernel start time, so a stop signals exactly the process that was
started (never a later process that reused the PID), and never by name."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of
    /proc/PID/stat), None when it is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def netns_argv(netns: str | None, argv: Sequence[str]) -> list[str]:
    """argv run in a network namespace (only the network: nsenter keeps the
    mounts, so /sys/fs/bpf stays the machine's, unlike `ip netns exec`)."""
    if not netns:
        return list(argv)
    return ["nsenter", f"--net=/run/netns/{netns}", "--", *argv]


@dataclass
class Proc:
    """One started process."""

    name: str
    pid: int
    ticks: int
    argv: list[str]
    netns: str = ""
    log: str = ""

    def alive(self) -> bool:
        return start_ticks(self.pid) == self.ticks

    def signal(self, signum: int) -> bool:
        if not self.alive():
            return False
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            return False
        return True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Proc:
        return cls(**data)


_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def spawn(name: str, argv: Sequence[str], *, netns: str | None = None, log: Path,
          cwd: Path | None = None, env: dict[str, str] | None = None) -> Proc:
    """Start argv in the background, in its own session, output to log."""
    full = netns_argv(netns, argv)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        child = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True,
                                 cwd=cwd, env=env)
    _CHILDREN[child.pid] = child  # reaped by us while we live (no zombie)
    ticks = start_ticks(child.pid)
    if ticks is None:
        child.wait()
        raise RuntimeError(f"{name} exited at once (status {child.returncode}); see {log}")
    return Proc(name, child.pid, ticks, list(full), netns or "", str(log))


def reap() -> None:
    for pid, child in list(_CHILDREN.items()):
        if child.poll() is not None:
            _CHILDREN.pop(pid, None)


def exit_status(proc: Proc) -> int | None:
    """The exit status of a child started here that has exited, else None."""
    child = _CHILDREN.get(proc.pid)
    return child.poll() if child is not None else None


def stop_all(procs: Sequence[Proc], timeout: float = 10.0) -> list[str]:
    """SIGTERM each process (in the given order, without waiting in between),
    then SIGKILL whatever is left after timeout. Returns the names that
    needed SIGKILL."""
    for proc in procs:
        proc.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap()
        if not any(p.alive() for p in procs):
            return []
        time.sleep(0.05)
    killed = []
    for proc in procs:
        if proc.signal(signal.SIGKILL):
            killed.append(proc.name)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(p.alive() for p in procs):
        reap()
        time.sleep(0.02)
    reap()
    return killed
