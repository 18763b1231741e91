"""The reference app on machines of someone else's making: this test builds
its own namespaces, veth pairs and bridge, with its own names and addresses,
using the namespace helpers alone (xo.lab.namespaces: no Lab, no lab
description, no pin root of the lab), writes one config file per member
(xo.appconfig, the format xo-driver reads too), starts a host and a target
from those files alone, and fetches through the host: the target answers,
every byte checked, and nothing is left behind."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest
from netns_tools import sha256, start_refapp
from xo.appconfig import AppConfig, TargetEntry
from xo.engine import write_key
from xo.lab.namespaces import (
    add_addresses,
    add_bridge,
    add_veth,
    create_netns,
    link_info,
    remove_netns,
    set_master,
)
from xo.steer import default_object_path

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

ADDRS = {"client": "198.19.7.1", "host": "198.19.7.2", "t0": "198.19.7.10"}
PIN_ROOT = Path("/run/xo/bpf")


def test_refapp_runs_from_config_files_without_the_lab(tmp_path: Path) -> None:
    tag = "xo" + secrets.token_hex(3)
    ns = {m: f"{tag}-{m}" for m in ("br", *ADDRS)}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name in ns.values():
            create_netns(name)
        add_bridge(ns["br"], f"{tag}br")
        members: dict[str, tuple[int, str]] = {}
        for m, addr in ADDRS.items():
            dev, port = f"{tag}{m[0]}", f"{tag}p{m[0]}"
            add_veth(ns[m], dev, ns["br"], port)
            set_master(ns["br"], port, f"{tag}br")
            add_addresses(ns[m], dev, [f"{addr}/24"])
            members[m] = link_info(ns[m], dev)
        docroot = tmp_path / "docroot"
        docroot.mkdir()
        body = os.urandom(3 << 20)
        (docroot / "file.bin").write_bytes(body)
        key = tmp_path / "cluster.key"
        write_key(key)
        common = {"key": str(key), "docroot": str(docroot),
                  "bpf_object": str(default_object_path())}
        t0 = AppConfig(role="target", name="t0", ip4=ADDRS["t0"], ifindex=members["t0"][0],
                       mac=members["t0"][1], pin_dir=f"{PIN_ROOT}/{tag}-t0",
                       hosts=[ADDRS["host"]], **common)
        host = AppConfig(role="host", name="host", ip4=ADDRS["host"],
                         ifindex=members["host"][0], mac=members["host"][1],
                         pin_dir=f"{PIN_ROOT}/{tag}-host",
                         targets=[TargetEntry("t0", ADDRS["t0"], members["t0"][1])], **common)
        procs.append(start_refapp(ns["t0"], t0.write(tmp_path / "t0.conf"), tmp_path / "t0.log"))
        procs.append(start_refapp(ns["host"], host.write(tmp_path / "host.conf"),
                           tmp_path / "host.log"))
        url = f"http://{ADDRS['host']}:8080"
        out = tmp_path / "got.bin"
        for _ in range(3):
            res = subprocess.run(["ip", "netns", "exec", ns["client"], "curl", "-s", "-S",
                                  "-m", "20", "-o", str(out), "-w", "%header{x-served-by}",
                                  f"{url}/file.bin"], capture_output=True, text=True)
            assert res.returncode == 0, res.stderr
            assert res.stdout == "t0"
            assert sha256(out.read_bytes()) == sha256(body)
        stats = json.loads(subprocess.run(
            ["ip", "netns", "exec", ns["client"], "curl", "-s", "-m", "5", f"{url}/_xo/stats"],
            capture_output=True, text=True, check=True).stdout)
        assert stats["offloads"] == 3 and stats["rollbacks"] == 0, stats
        print("stats:", stats)
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for name in ns.values():
            remove_netns(name)
        for member in ("host", "t0"):
            pins = PIN_ROOT / f"{tag}-{member}"
            if pins.exists():  # the apps unpin on exit; a killed one may not have
                subprocess.run(["umount", "-l", str(pins)], capture_output=True)
                shutil.rmtree(pins, ignore_errors=True)
    assert not [n for n in ns.values() if Path(f"/run/netns/{n}").exists()]
