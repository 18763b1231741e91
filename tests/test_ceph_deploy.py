"""`xo ceph deploy`: the config file it writes loads back as the front and the
agents read it, the units name the entry points, and bad input is refused."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

import pytest
from xo.ceph.config import ConfigError, XoCephConfig, control_port

XO = [sys.executable, "-m", "xo.cli", "ceph", "deploy"]


def test_deploy_writes_config_units_and_key(tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    res = subprocess.run([*XO, "--out", str(out), "--interface", "eth1", "--hosts",
                          "198.18.0.2,198.18.0.3", "--osds", "0,3", "--threshold", "2097152",
                          "--new-key"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    cfg = XoCephConfig.load(out / "xo-ceph.toml")
    assert cfg.front is not None and cfg.agent is not None
    assert cfg.front.interface == cfg.agent.interface == "eth1"
    assert cfg.front.listen == ("0.0.0.0", 8080) and cfg.front.threshold == 2097152
    assert cfg.agent.hosts == ["198.18.0.2", "198.18.0.3"]
    assert cfg.control_port_offset == 1000 and control_port(6800) == 7800
    key = out / "cluster.key"
    assert key.stat().st_mode & 0o077 == 0 and 16 <= key.stat().st_size <= 64
    for unit, entry in (("xo-ceph-front.service", "-m xo.ceph.front"),
                        ("xo-ceph-agent@.service", "-m xo.ceph.agent")):
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        parser.read(out / unit)
        exec_start = parser["Service"]["ExecStart"]
        assert exec_start.startswith(sys.executable) and entry in exec_start
        assert "CAP_NET_ADMIN" in parser["Service"]["AmbientCapabilities"]
    install = (out / "INSTALL.txt").read_text()
    assert "xo-ceph-agent@0.service" in install and "xo-ceph-agent@3.service" in install


def test_deploy_https_front(tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    res = subprocess.run([*XO, "--out", str(out), "--interface", "eth1", "--hosts", "198.18.0.2",
                          "--osds", "1", "--tls-cert", "/etc/xo/front.pem", "--tls-key",
                          "/etc/xo/front.key", "--tls-listen", "198.18.0.2:443"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "HTTPS" in res.stdout and "198.18.0.2:443" in res.stdout
    cfg = XoCephConfig.load(out / "xo-ceph.toml")
    assert cfg.front is not None and cfg.agent is not None
    assert cfg.front.tls_listen == ("198.18.0.2", 443)
    assert (cfg.front.tls_cert, cfg.front.tls_key) == ("/etc/xo/front.pem", "/etc/xo/front.key")
    assert cfg.agent.tls
    install = (out / "INSTALL.txt").read_text()
    assert "/etc/xo/front.key" in install and "xo-ceph-front.service" in install
    # front only: the agent takes no TLS when told so; the default port is 8443
    res = subprocess.run([*XO, "--out", str(tmp_path / "f"), "--interface", "eth1", "--role",
                          "agent", "--hosts", "198.18.0.2", "--no-agent-tls"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    agent_cfg = XoCephConfig.load(tmp_path / "f" / "xo-ceph.toml")
    assert agent_cfg.agent is not None and not agent_cfg.agent.tls
    toml = tmp_path / "t.toml"
    toml.write_text('[cluster]\nceph_conf = "/x"\nkey = "/k"\n[front]\ninterface = "e"\n'
                    'listen = "198.18.0.2:8080"\ntls_cert = "/c"\ntls_key = "/k"\n')
    front = XoCephConfig.load(toml).front
    assert front is not None and front.tls_listen == ("198.18.0.2", 8443)


def test_deploy_and_config_refuse_bad_input(tmp_path: Path) -> None:
    res = subprocess.run([*XO, "--out", str(tmp_path / "a"), "--interface", "eth0",
                          "--role", "agent"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "--hosts" in res.stderr
    res = subprocess.run([*XO, "--out", str(tmp_path / "b"), "--interface", "eth0",
                          "--role", "front", "--listen", "nohostport"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "HOST:PORT" in res.stderr
    res = subprocess.run([*XO, "--out", str(tmp_path / "c"), "--interface", "eth0",
                          "--hosts", "198.18.0.2", "--osds", "0,x"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "not an OSD id" in res.stderr
    res = subprocess.run([*XO, "--out", str(tmp_path / "d"), "--interface", "eth0",
                          "--role", "front", "--tls-cert", "/etc/xo/front.pem"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "--tls-key" in res.stderr
    assert not any((tmp_path / d).exists() for d in "abcd")  # nothing written
    half = tmp_path / "half.toml"
    half.write_text('[cluster]\nceph_conf = "/x"\nkey = "/k"\n[front]\ninterface = "e"\n'
                    'listen = "0.0.0.0:8080"\ntls_cert = "/c"\n')
    with pytest.raises(ConfigError, match="tls_key"):
        XoCephConfig.load(half)  # a front with a certificate but no key
    bad = tmp_path / "bad.toml"
    bad.write_text('[cluster]\nceph_conf = "/x"\n')
    with pytest.raises(ConfigError, match="key"):
        XoCephConfig.load(bad)  # a config without a key
    with pytest.raises(ConfigError, match="out of range"):
        control_port(65000)  # a control port over 65535
