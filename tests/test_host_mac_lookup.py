"""xo_proto_config.host_mac all zero means "look it up" (xo_proto.h): the
machine reads the interface's MAC at create time. Redirected client frames
must then carry that MAC as their source; frames with a zero source MAC are
kept with the client's source MAC instead (the bridge then learns the client
behind the host and sends the target's frames for the client there)."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
from pathlib import Path

import pytest
from netns_tools import start_refapp
from xo.appconfig import AppConfig, TargetEntry
from xo.engine import write_key
from xo.lab import in_netns, lab
from xo.steer import Kind, Steer, default_object_path

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

PIN_ROOT = Path("/run/xo/bpf")


def test_zero_host_mac_is_looked_up_for_redirects(tmp_path: Path) -> None:
    name = "hm" + secrets.token_hex(3)
    docroot = tmp_path / "docroot"
    docroot.mkdir()
    body = os.urandom(32 << 20)  # still being sent while the test looks
    (docroot / "file.bin").write_bytes(body)
    key = tmp_path / "cluster.key"
    write_key(key)
    procs: list[subprocess.Popen[bytes]] = []
    with lab(name, targets=1) as testbed:
        try:
            host, t0 = testbed.host, testbed.targets[0]
            common = {"key": str(key), "docroot": str(docroot),
                      "bpf_object": str(default_object_path())}
            tcfg = AppConfig(role="target", name="t0", ip4=t0.ipv4, ifindex=t0.ifindex,
                             mac=t0.mac, pin_dir=f"{PIN_ROOT}/{name}-t0", hosts=[host.ipv4],
                             **common)
            # The host's MAC left for the machine to look up.
            hcfg = AppConfig(role="host", name="host", ip4=host.ipv4, ifindex=host.ifindex,
                             mac="00:00:00:00:00:00", pin_dir=f"{PIN_ROOT}/{name}-host",
                             targets=[TargetEntry("t0", t0.ipv4, t0.mac)], **common)
            procs.append(start_refapp(t0.netns, tcfg.write(tmp_path / "t0.conf"),
                               tmp_path / "t0.log"))
            procs.append(start_refapp(host.netns, hcfg.write(tmp_path / "host.conf"),
                               tmp_path / "host.log"))
            # A download the target serves, held: the redirect is in place.
            with in_netns(testbed.client.netns):
                sock = socket.create_connection((host.ipv4, 8080), timeout=10)
            with sock:
                sock.sendall(b"GET /file.bin HTTP/1.1\r\nHost: x\r\n\r\n")
                assert b"X-Served-By: t0" in sock.recv(65536)
                steer = Steer(pin_dir=f"{PIN_ROOT}/{name}-host")
                try:
                    redirects = [r for _, r in steer.list() if r.kind == Kind.REDIRECT]
                finally:
                    steer.close()
            assert len(redirects) == 1, redirects
            print("redirect:", redirects[0])
            assert redirects[0].dst_mac == t0.mac
            assert redirects[0].src_mac == host.mac  # looked up, not zero
        finally:
            for proc in procs:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for member in ("host", "t0"):
                pins = PIN_ROOT / f"{name}-{member}"
                if pins.exists():
                    subprocess.run(["umount", "-l", str(pins)], capture_output=True)
                    subprocess.run(["rm", "-rf", str(pins)], capture_output=True)
