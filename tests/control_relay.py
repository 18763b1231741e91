"""A relay on the control path between the host and one target, under the
test's control: the on-path network (or attacker) that delays, drops,
duplicates or reorders whole control messages. It cannot forge or alter
one (it has no key), which is exactly what the envelope must make
harmless.

The relay listens in the host's namespace; the host is told to reach the
target's control port through it (RefAppCluster.control_via), and the relay
connects on to the target from the host's address, so the target sees its
host as usual.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field

from xo.core import ENV_HEADER_LEN, ENV_MAC_LEN, MsgType
from xo.engine import DEFAULT_CONTROL_PORT
from xo.lab import Lab, in_netns

TO_TARGET = "to_target"
TO_HOST = "to_host"


@dataclass
class Rule:
    """What happens to the next `count` messages of `mtype` going `direction`."""

    direction: str
    mtype: MsgType
    action: str  # "drop", "delay", "dup", "swap" (with the next message)
    seconds: float = 0.0
    count: int = 1


@dataclass
class Seen:
    direction: str
    mtype: MsgType
    action: str


@dataclass
class ControlRelay:
    testbed: Lab
    target: str
    rules: list[Rule] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        with in_netns(self.testbed.host.netns):
            self._listener = socket.create_server((self.testbed.host.ipv4, 0))
        self.port = self._listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def address(self) -> tuple[str, int]:
        return (self.testbed.host.ipv4, self.port)

    def add(self, rule: Rule) -> None:
        with self._lock:
            self.rules.append(rule)

    def count(self, direction: str, mtype: MsgType, action: str = "pass") -> int:
        with self._lock:
            return sum(1 for s in self.seen
                       if (s.direction, s.mtype, s.action) == (direction, mtype, action))

    def _rule_for(self, direction: str, mtype: MsgType) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.direction == direction and rule.mtype == mtype and rule.count > 0:
                    rule.count -= 1
                    return rule
        return None

    def _accept(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                down, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                with in_netns(self.testbed.host.netns):
                    up = socket.create_connection(
                        (self.testbed.member(self.target).ipv4, DEFAULT_CONTROL_PORT), 5)
            except OSError:
                down.close()
                continue
            self._socks += [down, up]
            for src, dst, direction in ((down, up, TO_TARGET), (up, down, TO_HOST)):
                t = threading.Thread(target=self._pipe, args=(src, dst, direction), daemon=True)
                t.start()
                self._threads.append(t)

    def _pipe(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        buf = b""
        held: bytes | None = None  # a message waiting to swap places
        try:
            while not self._stop.is_set():
                chunk = src.recv(65536)
                if not chunk:
                    break
                buf += chunk
                while len(buf) >= ENV_HEADER_LEN:
                    total = (ENV_HEADER_LEN + int.from_bytes(buf[32:36], "big")
                             + ENV_MAC_LEN)
                    if len(buf) < total:
                        break
                    frame, buf = buf[:total], buf[total:]
                    try:
                        mtype = MsgType(frame[3])
                    except ValueError:
                        dst.sendall(frame)
                        continue
                    if held is not None:
                        dst.sendall(frame + held)
                        held = None
                        self._note(direction, mtype, "pass")
                        continue
                    rule = self._rule_for(direction, mtype)
                    action = rule.action if rule else "pass"
                    self._note(direction, mtype, action)
                    if action == "drop":
                        continue
                    if action == "delay":
                        assert rule is not None
                        time.sleep(rule.seconds)  # everything behind it waits too
                    if action == "swap":
                        held = frame
                        continue
                    dst.sendall(frame * (2 if action == "dup" else 1))
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def _note(self, direction: str, mtype: MsgType, action: str) -> None:
        with self._lock:
            self.seen.append(Seen(direction, mtype, action))

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.close()
        for t in self._threads:
            t.join(timeout=2)
